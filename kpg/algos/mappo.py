"""K-MAPPO: MAPPO (Yu et al., 2022) whose actor update is a KPG step per PPO minibatch.

Centralized critic V(global state, agent id) (or one V(global state) for all agents: ``shared_value``),
GAE, clipped surrogate, several epochs of minibatches, entropy bonus, value normalization. The actor is
one network shared by all agents (with a one-hot agent id appended to the observation; the default) or
one network per agent, evaluated for all agents in one batched call (kpg.nn) when their sizes are equal
(:class:`~kpg.algos.common.AgentActors`). Its update goes through :class:`kpg.KPGOptimizer`: at
level 1 the surrogate is plain MAPPO; from level 2 agent i's ratio is multiplied, inside the clip,
by the other agents' ratios at their anticipated level l-1 parameters (:func:`kpg.joint_ratio_loss`).
k=1 is exactly MAPPO. The critic is trained normally.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from kpg.algos.common import (
    AgentActors,
    PolicyHead,
    ReturnNormalizer,
    WallClock,
    actor_layout,
    actor_level_seconds,
    generalized_advantages,
    mlp,
)
from kpg.anticipation import AUDIT_METRICS, AuditMeans
from kpg.couplings import FORMS, OTHERS_MODES, joint_ratio_loss
from kpg.distributed import average_gradients, check_replicas_agree, gather_samples
from kpg.envs import EnvPool
from kpg.nn import ACTIVATIONS
from kpg.optim import KPGOptimizer, KSchedule
from kpg.options import require, require_ranges


@dataclass
class MAPPOConfig:
    """MAPPO hyperparameters (defaults: the MAPPO paper's MPE settings, scaled to 2 cores)."""

    rollout: int = 25  # environment steps per copy between updates
    epochs: int = 5
    minibatches: int = 2
    lr: float = 7e-4  # actor
    critic_lr: float = 7e-4
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "tanh"
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    entropy_coef: float = 0.01
    max_grad_norm: float = 10.0
    share_actor: bool = True  # one actor for all agents (with agent ids), else one per agent
    batch_actors: bool = True  # per-agent actors of equally sized agents as one kpg.nn batched network
    others: str = "product"  # how the others' anticipated ratios combine: product or geometric
    coupling: str = "joint_clip"  # joint_clip (the authors') or weighted
    normalize_returns: bool = True
    initial_log_std: float = -0.5  # continuous actions
    # The authors' SMAX loop (configs/smax_authors.toml, docs/smax.md); only the recurrent trainer reads these.
    # dense-GRU-dense actor and critic (hidden: the 3 sizes), BPTT over whole sequences; environments with masks (smax:)
    recurrent: bool = False
    lr_anneal: bool = False  # lr (actor and critic) falls linearly to 0, one value per update
    # the anneal's horizon in environment steps (the lr reaches 0 there); None: the run's --steps
    lr_anneal_steps: int | None = None
    # the shared actor (recurrent or not) reads a one-hot agent id after the observation; off: the observation alone
    # (BenchMARL's shared policy)
    actor_id: bool = True
    # the recurrent nets' GRU cell: torch's (two full bias vectors) or flax's (input biases for r, z, n; hidden only n)
    gru: Literal["torch", "flax"] = "torch"
    value_coef: float = 0.5  # weight of the value loss 0.5 * mean squared error (the critic has its own Adam)
    value_clip: float | None = None  # clipped value loss: the worse of V's and V_old + clip(V - V_old)'s errors
    # batch: once over the rollout; minibatch: per minibatch, inside the loss
    advantage_norm: Literal["batch", "minibatch"] = "batch"
    # agents: a sum of per-agent means (N times the gradient with a shared actor); samples: one mean over all samples
    actor_loss_mean: Literal["agents", "samples"] = "agents"
    # Policy parametrization and optimizer details of the feed-forward trainers (configs/vmas_benchmarl.toml sets
    # BenchMARL's; docs/vmas.md). The defaults are kpg's own.
    # Continuous actions' scale: "parameter", a learned log-std per action dimension starting at initial_log_std;
    # "state", from the actor's output: softplus(raw + b) + scale_min, b such that raw = 0 gives scale_bias
    # (TorchRL's biased_softplus; BenchMARL's scale_mapping "biased_softplus_1.0" is scale_bias 1, scale_min 0.01)
    action_scale: Literal["parameter", "state"] = "parameter"
    scale_bias: float = 1.0
    scale_min: float = 0.01
    squash: bool = (
        False  # continuous: tanh-squashed Normal onto the action bounds (TorchRL's TanhNormal), else a Normal
    )
    init: Literal["orthogonal", "torch"] = "orthogonal"  # torch: nn.Linear's default init, actor and critic
    actor_output_gain: float = 0.01  # the orthogonal init's gain of the actor's last layer
    adam_eps: float = 1e-5  # actor and critic
    normalize_advantages: bool = True  # standardize each rollout's advantages (BenchMARL's MAPPO does not)
    # A time limit's last reward gains gamma * V(the state it cut off); off: a time limit ends the episode like a
    # terminal state (TorchRL's VmasEnv marks it terminated, so BenchMARL's GAE does not bootstrap it)
    bootstrap_time_limit: bool = True
    # One value V(state) for every agent (BenchMARL's MAPPO critic, share_param_critic True: one MLP output expanded
    # over the agents, trained on every agent's target); off: V(state, one-hot agent id), a value per agent
    shared_value: bool = False

    def validate(self) -> None:
        """Raises :class:`kpg.options.OptionError` for a value out of range (types: kpg.options.check_options)."""
        require_ranges(
            self,
            "mappo.",
            {
                **dict.fromkeys(("rollout", "epochs", "minibatches", "hidden"), (1, None, False)),
                **dict.fromkeys(("lr", "critic_lr", "clip_eps", "max_grad_norm", "value_clip"), (0, None, True)),
                **dict.fromkeys(("gamma", "gae_lambda"), (0, 1, False)),
                **dict.fromkeys(("entropy_coef", "value_coef"), (0, None, False)),
            },
        )
        require(self, "mappo.", "activation", self.activation in ACTIVATIONS, f"one of {', '.join(ACTIVATIONS)}")
        require(self, "mappo.", "others", self.others in OTHERS_MODES, f"one of {', '.join(OTHERS_MODES)}")
        require(self, "mappo.", "coupling", self.coupling in FORMS, f"one of {', '.join(FORMS)}")
        # Per-agent actors (share_actor off) read no id; the recurrent trainer's one actor is always shared.
        require(
            self,
            "mappo.",
            "actor_id",
            self.actor_id or self.share_actor or self.recurrent,
            "on with --mappo.no-share-actor (one actor per agent reads no id to drop)",
        )


class MAPPOTrainer:
    """Collects ``rollout`` steps from every environment copy, then runs PPO epochs where every
    minibatch is one KPG step of the actor and one Adam step of the critic."""

    METRICS = (
        "actor_loss",
        "value_loss",
        "entropy",
        "clip_fraction_level1",
        "clip_fraction_level2",
        "clip_fraction_level3",
        "k",
    )
    # Every rank's state_dict() is alike: the ranks' rollouts are not kept between iterations.
    RANK_STATE: tuple[str, ...] = ()

    def __init__(
        self,
        pool: EnvPool,
        config: MAPPOConfig,
        k: int,
        k_until: int | None,
        device: str,
        seed: int,
        process_group=None,
        anticipation: str = "exact",
        anticipation_reset: bool = False,
        anticipation_audit: bool = False,
    ):
        """``k_until``: environment steps after which the actor drops to k=1 (the paper's schedule:
        coordinate early, save compute later); None keeps ``k`` throughout. ``process_group``: train
        data-parallel with the other ranks (each steps its own ``pool``; ``env_steps`` counts all).
        ``anticipation``: the actor optimizer's (KPGOptimizer); ``anticipation_reset``: momentum mode
        forgets its history at every new rollout (the authors' RESET_MOMENTUM_EACH_UPDATE)."""
        torch.manual_seed(seed)
        self.pool, self.config, self.device = pool, config, torch.device(device)
        self.dtype = torch.get_default_dtype()
        self.generator = np.random.default_rng(seed)
        spaces = pool.spaces
        n, c = spaces.num_agents, config
        self.num_agents = n
        self.head = PolicyHead(
            spaces.discrete,
            torch.as_tensor(spaces.action_mask(), device=self.device),
            scale=c.action_scale,
            squash_bounds=self._action_bounds(spaces) if c.squash else None,
            scale_bias=c.scale_bias,
            scale_min=c.scale_min,
        )
        layout = actor_layout(c.share_actor, c.batch_actors, spaces.homogeneous)
        self.actor = AgentActors(
            layout,
            n,
            spaces.obs_size,
            spaces.action_size * self.head.outputs_per_action,
            c.hidden,
            c.activation,
            output_gain=c.actor_output_gain,
            init=c.init,
            agent_id=c.actor_id,
        ).to(self.device)
        # Continuous actions with a state-independent scale: a learned log-std per network (with the
        # batched network's agent dimension), so it belongs to that agent's KPG segment.
        log_std_shape = (n, spaces.action_size) if layout == "batched" else (spaces.action_size,)
        self.log_std = nn.ParameterList(
            nn.Parameter(torch.full(log_std_shape, c.initial_log_std, device=self.device))
            for _ in range(0 if spaces.discrete or c.action_scale == "state" else len(self.actor))
        )
        critic_inputs = spaces.state_size + (0 if c.shared_value else n)
        self.critic = mlp(critic_inputs, c.hidden, 1, c.activation, init=c.init).to(self.device)
        # A shared value learns every agent's targets, so their moments are pooled over the agents.
        self.returns = ReturnNormalizer(1 if c.shared_value else n).to(self.device)
        actor_agents, layout_arguments = self.actor.optimizer_arguments(extra=list(self.log_std))
        self.actor_optimizer = KPGOptimizer(
            actor_agents,
            k=k,
            optimizer="adam",
            lr=c.lr,
            eps=c.adam_eps,
            max_grad_norm=c.max_grad_norm,
            **layout_arguments,
            process_group=process_group,
            anticipation=anticipation,
            audit_anticipation=anticipation_audit,
        )
        self.anticipation_reset = anticipation_reset
        # The audit's figures join this run's metrics.csv columns (kpg.anticipation.AUDIT_METRICS).
        self.audit = AuditMeans() if anticipation_audit else None
        if anticipation_audit:
            self.METRICS = (*type(self).METRICS, *AUDIT_METRICS)
        self.process_group = process_group
        check_replicas_agree(list(self.critic.parameters()), process_group, "the critic's parameters")
        self.copies_per_iteration = pool.copies * (1 if process_group is None else process_group.size())
        self.k_schedule = None
        if k_until is not None:
            iterations = -(-k_until // (c.rollout * self.copies_per_iteration))
            self.k_schedule = KSchedule(
                self.actor_optimizer, iterations * c.epochs * c.minibatches, early_k=k, late_k=1
            )
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=c.critic_lr, eps=c.adam_eps)
        self.clock = WallClock()
        self.env_steps = 0
        self.updates = 0

    def _action_bounds(self, spaces) -> tuple[Tensor, Tensor]:
        if spaces.discrete or spaces.action_low is None:
            raise ValueError(
                "--mappo.squash maps continuous actions onto the environment's bounds; this environment has "
                f"{'discrete actions' if spaces.discrete else 'no action bounds'}: leave --mappo.squash off"
            )
        as_tensor = lambda bounds: torch.as_tensor(bounds, dtype=self.dtype, device=self.device)  # noqa: E731
        return as_tensor(spaces.action_low), as_tensor(spaces.action_high)

    # ---- acting ------------------------------------------------------------------------------

    def _log_std(self) -> Tensor | None:
        """[agents, action_size], or None for discrete actions."""
        if not len(self.log_std):  # discrete actions, or the scale comes from the actor's output
            return None
        if self.actor.layout == "per_agent":
            return torch.stack(list(self.log_std))
        return self.log_std[0].expand(self.num_agents, -1)

    def _distribution(self, obs: Tensor):
        """The policies of every agent from observations [agents, batch, obs_size]."""
        return self.head.distribution(self.actor(obs), self._log_std())

    def _returns_of(self, values: Tensor) -> Tensor:
        """The critic's outputs as returns: denormalized when it learns normalized targets, else as
        they are (the normalizer then never sees a target; its neutral moments must not rescale them)."""
        return self.returns.denormalize(values) if self.config.normalize_returns else values

    def _values(self, state: Tensor) -> Tensor:
        """Normalized values [batch, agents] of global states [batch, state_size].

        The critic's first layer reads (state, one-hot agent id); its state part is computed once
        per state and the id part is a column per agent, so no [batch, agents, state_size] input is
        built (MAgent2's global state has 12 500 values for 100 agents a side). With ``shared_value``
        the critic reads the state alone and its one value is every agent's."""
        if self.config.shared_value:
            return self.critic(state).expand(-1, self.num_agents)
        first, rest = self.critic[0], self.critic[1:]
        state_size = state.shape[-1]
        per_state = nn.functional.linear(state, first.weight[:, :state_size], first.bias)  # [batch, hidden]
        per_agent = first.weight[:, state_size:].T  # [agents, hidden]: the id's column
        return rest(per_state[:, None, :] + per_agent).squeeze(-1)

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """Actions for observations [copies, agents, obs_size]."""
        return self.act_tensor(obs, deterministic).cpu().numpy()

    @torch.no_grad()
    def act_tensor(self, obs: np.ndarray | Tensor, deterministic: bool = False) -> Tensor:
        """:meth:`act` as a tensor [copies, agents, ...] on the trainer's device."""
        dist = self._distribution(torch.as_tensor(obs, dtype=self.dtype, device=self.device).transpose(0, 1))
        actions = self.head.greedy(dist) if deterministic else self.head.env_actions(dist.sample())
        return actions.transpose(0, 1)

    # ---- one iteration: rollout, then update -----------------------------------------------------

    def iteration(self) -> dict[str, float]:
        with self.clock.phase("environment"):
            batch, episodes = self._collect()
        metrics = self._update(batch)
        metrics["episodes"] = len(episodes)
        if episodes:
            metrics["episode_return"] = float(np.mean([e["return"] for e in episodes]))
            metrics["episode_length"] = float(np.mean([e["length"] for e in episodes]))
        self.updates += 1
        return metrics

    def _collect(self):
        c, pool, device = self.config, self.pool, self.device
        as_tensor = lambda arrays: torch.as_tensor(np.stack(arrays), dtype=self.dtype, device=device)  # noqa: E731
        obs_list, state_list, action_list, logp_list, reward_list, done_list, alive_list = [], [], [], [], [], [], []
        cut_off_list, next_state_list = [], []
        episodes = []
        obs, state, alive = pool.obs.copy(), pool.state.copy(), pool.alive.copy()
        for _ in range(c.rollout):
            with torch.no_grad():
                obs_t = torch.as_tensor(obs, dtype=self.dtype, device=device).transpose(0, 1)
                dist = self._distribution(obs_t)
                action = dist.sample()
                logp = self.head.log_prob(dist, action)
            step = pool.step(self.head.env_actions(action).transpose(0, 1).cpu().numpy())
            obs_list.append(obs), state_list.append(state), alive_list.append(alive)
            action_list.append(action.transpose(0, 1)), logp_list.append(logp.transpose(0, 1))
            reward_list.append(step.reward), done_list.append(step.done)
            cut_off_list.append(step.done * (1.0 - step.terminated)), next_state_list.append(step.next_state)
            episodes += step.finished
            obs, state, alive = step.obs, step.state, step.alive
        self.env_steps += c.rollout * self.copies_per_iteration
        rewards, dones, cut_off = as_tensor(reward_list), as_tensor(done_list), as_tensor(cut_off_list)
        alive_mask = as_tensor(alive_list)
        with torch.no_grad():
            states = as_tensor(state_list + [state])
            values = self._returns_of(self._values(states.flatten(0, 1)).view(c.rollout + 1, pool.copies, -1))
            # A time limit is not a terminal state: the value of the state it cut off is added to the last reward.
            steps, copies = cut_off.sum(-1).nonzero(as_tuple=True)
            if len(steps) and c.bootstrap_time_limit:
                final_states = as_tensor(next_state_list)[steps, copies]
                final_values = self._returns_of(self._values(final_states))
                rewards[steps, copies] += c.gamma * final_values * cut_off[steps, copies]
        advantages = generalized_advantages(rewards, values, dones, c.gamma, c.gae_lambda)
        targets = advantages + values[:-1]
        batch = {
            "obs": as_tensor(obs_list),  # [T, copies, agents, obs]
            "state": states[:-1],
            "actions": torch.stack(action_list),
            "old_log_prob": torch.stack(logp_list),
            "advantages": advantages,
            "targets": targets,
            "alive": alive_mask,
        }
        return {name: value.flatten(0, 1) for name, value in batch.items()}, episodes

    def _update(self, batch: dict[str, Tensor]) -> dict[str, float]:
        c = self.config
        if self.anticipation_reset:
            self.actor_optimizer.reset_anticipation()
        k = self.actor_optimizer.k  # the schedule switches k only between iterations
        alive = batch["alive"]  # [samples, agents]
        # Statistics over every rank's samples, so that data-parallel ranks normalize alike.
        all_advantages, all_targets, all_alive = (
            gather_samples(batch[name], self.process_group) for name in ("advantages", "targets", "alive")
        )
        valid = all_alive.sum().clamp_min(1.0)
        mean = (all_advantages * all_alive).sum() / valid
        std = (((all_advantages - mean) * all_alive).square().sum() / valid).sqrt()
        advantages = (batch["advantages"] - mean) / (std + 1e-8) if c.normalize_advantages else batch["advantages"]
        if c.normalize_returns:
            pooled = (lambda samples: samples.reshape(-1, 1)) if c.shared_value else (lambda samples: samples)
            self.returns.update(pooled(all_targets), pooled(all_alive))
        targets = self.returns.normalize(batch["targets"]) if c.normalize_returns else batch["targets"]
        samples = alive.shape[0]
        clip_fractions: dict[int, list[float]] = {}
        sums = {"actor_loss": 0.0, "entropy": 0.0, "value_loss": 0.0}
        steps = 0
        for _ in range(c.epochs):
            order = torch.as_tensor(self.generator.permutation(samples), device=self.device)
            for rows in order.chunk(c.minibatches):
                obs = batch["obs"][rows].transpose(0, 1)  # [agents, rows, obs]
                actions = batch["actions"][rows].transpose(0, 1)
                old_log_prob = batch["old_log_prob"][rows].transpose(0, 1)
                adv = advantages[rows].transpose(0, 1)
                mask = alive[rows].transpose(0, 1)
                entropy_seen = []

                def closure(ctx, obs=obs, actions=actions, old_log_prob=old_log_prob, adv=adv, mask=mask):
                    def own_policy():
                        dist = self._distribution(obs)
                        entropy = (self.head.entropy(dist) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
                        return self.head.log_prob(dist, actions), entropy

                    # The base parameters do not change within a step: every level reuses level 1's own-policy forward.
                    log_prob, entropy = ctx.at_base(own_policy)
                    anticipated_log_prob = None
                    if ctx.level > 1:
                        with ctx.anticipated():
                            anticipated_log_prob = self.head.log_prob(self._distribution(obs), actions)
                    surrogate = joint_ratio_loss(
                        log_prob,
                        old_log_prob,
                        adv,
                        anticipated_log_prob,
                        level=ctx.level,
                        clip_eps=c.clip_eps,
                        others=c.others,
                        form=c.coupling,
                        mask=mask,
                    )
                    clip_fractions.setdefault(ctx.level, []).append(float(surrogate.clip_fraction.mean()))
                    entropy_seen.append(entropy.detach())
                    return surrogate.loss - c.entropy_coef * entropy

                with self.clock.phase("actor"):
                    actor_loss = self.actor_optimizer.step(closure)
                if self.audit is not None:
                    self.audit.add(self.actor_optimizer)
                if self.k_schedule is not None:
                    self.k_schedule.step()
                with self.clock.phase("critic"):
                    values = self._values(batch["state"][rows])
                    value_mask = alive[rows]
                    value_loss = (
                        nn.functional.huber_loss(values, targets[rows], reduction="none", delta=10.0) * value_mask
                    ).sum()
                    value_loss = value_loss / value_mask.sum().clamp_min(1.0)
                    self.critic_optimizer.zero_grad(set_to_none=True)
                    value_loss.backward()
                    average_gradients(self.critic.parameters(), self.process_group)
                    nn.utils.clip_grad_norm_(self.critic.parameters(), c.max_grad_norm)
                    self.critic_optimizer.step()
                sums["actor_loss"] += actor_loss.detach().mean().item()
                sums["entropy"] += float(entropy_seen[-1].mean())
                sums["value_loss"] += value_loss.item()
                steps += 1
        metrics = {name: total / steps for name, total in sums.items()}
        for level, fractions in clip_fractions.items():
            metrics[f"clip_fraction_level{level}"] = float(np.mean(fractions))
        metrics["k"] = k
        if self.audit is not None:
            metrics.update(self.audit.metrics())
        return metrics

    # ---- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "actor": self.actor.state_dict(),
            "log_std": self.log_std.state_dict(),
            "critic": self.critic.state_dict(),
            "returns": self.returns.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "k_schedule": None if self.k_schedule is None else self.k_schedule.state_dict(),
            "generator": self.generator.bit_generator.state,
            "env_steps": self.env_steps,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        # load_state_dict copies in place, so the parameters stay views of the optimizer's arena.
        self.actor.load_state_dict(state["actor"])
        self.log_std.load_state_dict(state["log_std"])
        self.critic.load_state_dict(state["critic"])
        self.returns.load_state_dict(state["returns"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        if self.k_schedule is not None:
            self.k_schedule.load_state_dict(state["k_schedule"])
        self.generator.bit_generator.state = state["generator"]
        self.env_steps, self.updates = state["env_steps"], state["updates"]

    def actor_level_seconds(self) -> list[float]:
        """Seconds of the actor update per KPG level since construction (closure, backward, kernels)."""
        return actor_level_seconds(self.actor_optimizer)
