"""BenchMARL's Experiment with a KPGOptimizer for K-MAPPO's actor and optimizer state in checkpoints.

For :class:`~kpg.benchmarl.KMappo` the actor's ``torch.optim.Adam`` becomes a ``KPGOptimizer`` with
the same settings (``lr``, ``adam_eps``, ``adam_extra_kwargs``; ``clip_grad_val`` as its
``max_grad_norm``), stepped with a closure that runs the group's loss once per level. The critic's
optimizer, the minibatch sampling and the logging stay BenchMARL's. Every other algorithm runs as in
BenchMARL. Checkpoints carry every optimizer's state (BenchMARL's carry none), so a resumed run's
updates continue from the moments and step counts it stopped at.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from benchmarl.experiment import Experiment as BenchMARLExperiment
from tensordict import TensorDictBase

from kpg.benchmarl.algorithm import KMappo
from kpg.optim import KPGOptimizer

OPTIMIZERS_KEY = "optimizers"


class Experiment(BenchMARLExperiment):
    """:class:`benchmarl.experiment.Experiment` that steps :class:`~kpg.benchmarl.KMappo`'s actor with
    ``KPGOptimizer`` and saves and loads the optimizers' state with its checkpoints."""

    def _setup_algorithm(self):
        super()._setup_algorithm()
        if isinstance(self.algorithm, KMappo):
            for group in self.group_map:
                self.optimizers[group]["loss_objective"] = self._actor_optimizer(group)

    def _actor_optimizer(self, group: str) -> KPGOptimizer:
        """BenchMARL's Adam settings as a KPGOptimizer over the group's policy: one shared network
        (``share_policy_params``) or the agents' networks stacked with the agents in dim 0."""
        if not self.config.clip_grad_norm and self.config.clip_grad_val is not None:
            raise ValueError(
                f"kmappo clips gradients by norm only, but the experiment has clip_grad_norm=False with clip_grad_val="
                f"{self.config.clip_grad_val} (clip by value): set experiment.clip_grad_norm=true, or "
                "experiment.clip_grad_val=null for no clipping"
            )
        params = self.algorithm.get_parameters(group)["loss_objective"]
        settings = dict(
            k=self.algorithm.k,
            optimizer="adam",
            lr=self.config.lr,
            eps=self.config.adam_eps,
            max_grad_norm=self.config.clip_grad_val if self.config.clip_grad_norm else None,
            **self.config.adam_extra_kwargs,
        )
        if self.config.share_policy_params:
            return KPGOptimizer(params, **settings)
        num_agents = len(self.group_map[group])
        unbatched = [tuple(p.shape) for p in params if p.dim() == 0 or p.shape[0] != num_agents]
        if unbatched:
            raise ValueError(
                f"kmappo with share_policy_params=false needs every policy parameter of group {group!r} stacked with "
                f"its {num_agents} agents in dim 0, but parameters of shape {unbatched} are not: use a model that "
                "stacks per-agent parameters (BenchMARL's mlp does) or experiment.share_policy_params=true"
            )
        return KPGOptimizer(params, agent_dim=0, **settings)

    def _optimizer_loop(self, group: str) -> TensorDictBase:
        if not isinstance(self.algorithm, KMappo):
            return super()._optimizer_loop(group)
        subdata = self.replay_buffers[group].sample().to(self.config.train_device)
        loss_module, optimizers = self.losses[group], self.optimizers[group]
        actor_optimizer = optimizers["loss_objective"]
        level_one = {}

        def closure(ctx):
            batch = subdata if ctx.level == 1 else self.algorithm.joint_ratio_batch(group, subdata, ctx)
            loss_vals = loss_module(batch)
            if ctx.level == 1:
                # Logged and used for the critic as in MAPPO: the level-1 loss is MAPPO's.
                level_one["training_td"] = loss_vals.detach()
                loss_vals = self.algorithm.process_loss_vals(group, loss_vals)
                level_one["loss_vals"] = loss_vals
                return loss_vals["loss_objective"]
            return self.algorithm.process_loss_vals(group, loss_vals)["loss_objective"]

        actor_optimizer.step(closure)
        training_td, loss_vals = level_one["training_td"], level_one["loss_vals"]
        # The norm of the last level's gradient before clipping, as BenchMARL logs the actor's. (The
        # optimizer's parameter groups hold per-agent slices of stacked parameters, without .grad.)
        actor_grads = [p.grad for p in self.algorithm.get_parameters(group)["loss_objective"]]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in actor_grads]))
        training_td.set("grad_norm_loss_objective", grad_norm.to(self.config.train_device, torch.float32))
        actor_optimizer.zero_grad()
        for loss_name, loss_value in loss_vals.items():
            if loss_name == "loss_objective" or loss_name not in optimizers:
                continue
            optimizer = optimizers[loss_name]
            loss_value.backward()
            training_td.set(
                f"grad_norm_{loss_name}", torch.tensor(self._grad_clip(optimizer), device=self.config.train_device)
            )
            optimizer.step()
            optimizer.zero_grad()
        self.replay_buffers[group].update_tensordict_priority(subdata)
        if self.target_updaters[group] is not None:
            self.target_updaters[group].step()
        callback_loss = self._on_train_step(subdata, group)
        if callback_loss is not None:
            training_td.update(callback_loss)
        return training_td

    def state_dict(self) -> OrderedDict:
        state_dict = super().state_dict()
        state_dict[OPTIMIZERS_KEY] = {
            group: {name: optimizer.state_dict() for name, optimizer in optimizers.items()}
            for group, optimizers in self.optimizers.items()
        }
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get(OPTIMIZERS_KEY)
        if saved is None:
            raise ValueError(
                "this checkpoint holds no optimizer state (BenchMARL's own Experiment writes none), so the run "
                "would resume with fresh Adam moments and step counts, not where it stopped: resume it with "
                "benchmarl.experiment.Experiment if that is what you want"
            )
        expected = {group: sorted(optimizers) for group, optimizers in self.optimizers.items()}
        found = {group: sorted(optimizers) for group, optimizers in saved.items()}
        if found != expected:
            raise ValueError(f"the checkpoint's optimizers are {found}, this experiment's {expected}")
        super().load_state_dict(state_dict)
        for group, optimizers in self.optimizers.items():
            for name, optimizer in optimizers.items():
                optimizer.load_state_dict(saved[group][name])
