"""The off-policy trainers' common part: :class:`OffPolicyTrainer` holds what K-MADDPG
(:mod:`kpg.algos.maddpg`) and K-FACMAC (:mod:`kpg.algos.facmac`) share: actors and their targets,
acting and exploration, replay collection, the iteration loop, KPG scheduling and checkpoints.

The pool is an :class:`~kpg.envs.EnvPool` (NumPy arrays, PettingZoo environments stepped one by
one) or a tensor pool (:class:`~kpg.envs.vmas.VMASPool`: every copy a tensor on the training
device, stepped in one call). From a tensor pool the collection takes actions, transitions and
replay rows as tensors on the device, with no copy through NumPy and no loop over copies or agents.

Data parallel under ``torchrun`` (``process_group``): every rank holds every agent's actor and
critic (checked identical at construction), steps its own environment copies into its own replay
buffer, and at each gradient step samples its own share of the minibatch from its own random
streams. The critic's gradients are averaged over the ranks before clipping, and the actor step is
a data-parallel KPG step, so every rank commits the same parameters and keeps the same targets: one
gradient step over ``R`` ranks equals one process's step on the concatenated minibatch.
"""

from __future__ import annotations

import abc
import copy

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from kpg.algos.common import (
    AgentActors,
    WallClock,
    actor_layout,
    actor_level_seconds,
    gumbel_noise,
    polyak_update,
    rank_seed,
    straight_through_gumbel_softmax,
)
from kpg.algos.replay import (
    STATE_FIELDS,
    ReplayBuffer,
    transition_fields,
    transition_rows,
    with_observation_states,
)
from kpg.distributed import average_gradients, check_replicas_agree
from kpg.envs import EnvPool
from kpg.nn import ACTIVATIONS
from kpg.optim import KPGOptimizer
from kpg.options import check_options, require, require_ranges


def validate_off_policy(config, prefix: str, activations: tuple[str, ...] = ()) -> None:
    """The ranges of MADDPGConfig's and FACMACConfig's common options (``prefix``: "maddpg." or
    "facmac."; ``activations``: its activation options besides ``activation``)."""
    require_ranges(
        config,
        prefix,
        {
            **dict.fromkeys(
                ("buffer_size", "batch_size", "rollout", "updates_per_iteration", "hidden"), (1, None, False)
            ),
            **dict.fromkeys(("learning_starts", "exploration_noise", "actor_regularization"), (0, None, False)),
            **dict.fromkeys(("actor_lr", "critic_lr", "max_grad_norm", "gumbel_temperature"), (0, None, True)),
            "gamma": (0, 1, False),
            "tau": (0, 1, True),
        },
    )
    embeddings = [name for name in ("mixer_embed", "hypernet_embed") if hasattr(config, name)]  # FACMAC's mixer
    require_ranges(config, prefix, dict.fromkeys(embeddings, (1, None, False)))
    require(config, prefix, "hidden", len(config.hidden) > 0, "at least one layer width")
    for name in ("activation", *activations):
        require(config, prefix, name, getattr(config, name) in ACTIVATIONS, f"one of {', '.join(ACTIVATIONS)}")


class OffPolicyTrainer(abc.ABC):
    """Collects ``rollout`` steps from every environment copy into the replay buffer, then (after
    ``learning_starts`` environment steps) runs ``updates_per_iteration`` gradient steps, each a
    critic step (Adam), an actor step (KPG) and a Polyak update of the targets.

    Subclasses build the critic (``_build_critic`` sets ``critic``) and define ``critic_loss``,
    ``actor_losses`` (the KPG closure's body) and ``_clip_critic_gradients``.
    """

    METRICS = ("critic_loss", "actor_loss", "q_mean", "gradient_steps", "buffer_size", "k")
    # The entries of state_dict() that are each data-parallel rank's own; the rest is alike on every rank.
    RANK_STATE = ("replay", "generator", "noise_generator")

    def __init__(
        self,
        pool: EnvPool,
        config,
        k: int,
        k_until: int | None,
        device: str,
        seed: int,
        process_group=None,
        anticipation: str = "exact",
    ):
        """``k_until``: environment steps after which the actor drops to k=1; None keeps ``k``.
        ``process_group``: train data-parallel with the other ranks (module docstring); each steps
        its own ``pool``, and ``env_steps`` counts every rank's. ``anticipation``: the actor
        optimizer's (KPGOptimizer)."""
        check_options(config, type(config).__name__.removesuffix("Config").lower() + ".")
        if k_until is not None and k_until < 0:
            raise ValueError(f"k_until must be >= 0 environment steps or None, got {k_until}")
        rank = 0 if process_group is None else dist.get_rank(process_group)
        world_size = 1 if process_group is None else dist.get_world_size(process_group)
        if config.batch_size % world_size:
            raise ValueError(
                f"batch_size {config.batch_size} cannot be split evenly over {world_size} ranks; pass a multiple of "
                f"{world_size} (every rank samples an equal share of each minibatch)"
            )
        torch.manual_seed(seed)
        c = config
        self.pool, self.config, self.device = pool, config, torch.device(device)
        self.process_group, self.world_size = process_group, world_size
        self.local_batch_size = c.batch_size // world_size
        self.dtype = torch.get_default_dtype()
        self.k, self.k_until = k, k_until
        # Each rank samples its own rows and noise; rank 0's streams are those of one process.
        own_seed = rank_seed(seed, rank)
        self.generator = np.random.default_rng(own_seed)  # replay sampling
        self.noise_generator = torch.Generator(device=self.device).manual_seed(own_seed)  # exploration, Gumbel noise
        spaces = self.spaces = pool.spaces
        n = self.num_agents = spaces.num_agents
        self.discrete = spaces.discrete
        as_tensor = lambda array: torch.as_tensor(array, dtype=self.dtype, device=self.device)  # noqa: E731
        self.action_mask = as_tensor(spaces.action_mask())  # [agents, action_size]
        self.action_sizes = as_tensor(spaces.action_sizes)
        if not self.discrete:
            if not (np.isfinite(spaces.action_low).all() and np.isfinite(spaces.action_high).all()):
                raise ValueError(
                    "continuous actions need finite bounds: the deterministic actors squash their output into "
                    f"[low, high]; got low {spaces.action_low.tolist()} and high {spaces.action_high.tolist()}"
                )
            self.action_bounds = as_tensor(spaces.action_low), as_tensor(spaces.action_high)
        # A tensor pool (VMAS) holds its copies as tensors on the training device: the collection reads
        # and steps them as tensors, with no copy through NumPy.
        self.tensor_pool = isinstance(pool.obs, Tensor)
        self.state_is_observations = getattr(pool, "state_is_observations", False)
        layout = actor_layout(c.share_actor, c.batch_actors, spaces.homogeneous)
        self.actor = AgentActors(
            layout, n, spaces.obs_size, spaces.action_size, c.hidden, c.activation, output_gain=0.01
        ).to(self.device)
        self.target_actor = copy.deepcopy(self.actor).requires_grad_(False)
        self._build_critic()
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=c.critic_lr)
        actor_agents, layout_arguments = self.actor.optimizer_arguments()
        self.actor_optimizer = KPGOptimizer(
            actor_agents,
            k=k,
            optimizer="adam",
            lr=c.actor_lr,
            max_grad_norm=c.max_grad_norm,
            **layout_arguments,
            process_group=process_group,
            anticipation=anticipation,
        )
        check_replicas_agree(list(self.critic.parameters()), process_group, "the critic's parameters")
        local_capacity = -(-c.buffer_size // world_size)
        fields = transition_fields(spaces, self.dtype, self.state_is_observations)
        self.buffer = ReplayBuffer(local_capacity, fields, self.device)
        self.clock = WallClock()
        self.env_steps = 0
        self.updates = 0
        self.gradient_steps = 0

    @abc.abstractmethod
    def _build_critic(self) -> None:
        """Sets ``self.critic``, the module the critic optimizer trains and the target copies."""

    @abc.abstractmethod
    def critic_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The critic's TD loss on ``batch`` and the mean Q it predicts."""

    @abc.abstractmethod
    def actor_losses(self, ctx, batch: dict[str, Tensor], noise: Tensor | None) -> Tensor:
        """The KPG closure's loss at ``ctx.level``: one per agent, or a scalar whose gradient is
        every agent's."""

    @abc.abstractmethod
    def _clip_critic_gradients(self) -> None:
        """Clips the critic's gradients before its optimizer step."""

    # ---- policies ------------------------------------------------------------------------------

    def policy_actions(self, outputs: Tensor, noise: Tensor | None) -> Tensor:
        """The actions the actor loss differentiates: tanh of the outputs (continuous), or the
        straight-through Gumbel-softmax of the logits with ``noise`` (discrete)."""
        mask = self.action_mask[:, None, :]
        if self.discrete:
            return straight_through_gumbel_softmax(outputs, noise, self.config.gumbel_temperature, mask)
        return torch.tanh(outputs) * mask

    def anticipated_actions(self, outputs: Tensor, noise: Tensor | None) -> Tensor:
        """The actions the others' anticipation feeds from level 2 on: tanh of the outputs
        (continuous), or the relaxed Gumbel-softmax of the logits with ``noise`` (discrete: the
        sample whose one-hot :meth:`policy_actions` takes, so its value moves with the parameters)."""
        mask = self.action_mask[:, None, :]
        if self.discrete:
            perturbed = (outputs + noise) / self.config.gumbel_temperature
            perturbed = perturbed.masked_fill(mask == 0, torch.finfo(perturbed.dtype).min)
            return torch.softmax(perturbed, dim=-1)
        return torch.tanh(outputs) * mask

    def greedy_actions(self, outputs: Tensor) -> Tensor:
        """Deterministic actions in the critics' encoding: one-hot argmax, or tanh of the outputs."""
        mask = self.action_mask[:, None, :]
        if self.discrete:
            logits = outputs.masked_fill(mask == 0, torch.finfo(outputs.dtype).min)
            return nn.functional.one_hot(logits.argmax(-1), outputs.shape[-1]).to(outputs.dtype)
        return torch.tanh(outputs) * mask

    def actor_noise(self, batch_size: int) -> Tensor | None:
        """The Gumbel noise of one actor step (drawn once, so every KPG level sees the same sample)."""
        if not self.discrete:
            return None
        shape = (self.num_agents, batch_size, self.spaces.action_size)
        return gumbel_noise(shape, self.noise_generator, self.device, self.dtype)

    def output_penalty(self, outputs: Tensor, alive: Tensor) -> Tensor:
        """Per agent [agents]: the mean square of the pre-activation outputs over the agent's action
        dimensions and alive samples (keeps logits and tanh inputs from saturating)."""
        per_sample = (outputs.square() * self.action_mask[:, None, :]).sum(-1) / self.action_sizes[:, None]
        return (per_sample * alive).sum(1) / alive.sum(1).clamp_min(1.0)

    @torch.no_grad()
    def _exploration_actions(self, obs: Tensor, uniform: bool) -> Tensor:
        """Behaviour actions [agents, copies, action_size] in the critics' encoding: uniformly
        random, or the actors' with Gaussian noise (continuous) or sampled from the softmax of the
        logits (discrete: argmax of logits plus Gumbel noise)."""
        shape = (self.num_agents, obs.shape[1], self.spaces.action_size)
        mask = self.action_mask[:, None, :]
        if self.discrete:
            logits = torch.zeros(shape, dtype=self.dtype, device=self.device) if uniform else self.actor(obs)
            noise = gumbel_noise(shape, self.noise_generator, self.device, self.dtype)
            perturbed = (logits + noise).masked_fill(mask == 0, torch.finfo(self.dtype).min)
            return nn.functional.one_hot(perturbed.argmax(-1), shape[-1]).to(self.dtype)
        if uniform:
            actions = torch.rand(shape, generator=self.noise_generator, device=self.device, dtype=self.dtype) * 2 - 1
        else:
            noise = torch.randn(shape, generator=self.noise_generator, device=self.device, dtype=self.dtype)
            actions = (torch.tanh(self.actor(obs)) + self.config.exploration_noise * noise).clamp(-1.0, 1.0)
        return actions * mask

    def _env_actions(self, actions: Tensor, tensors: bool = False) -> np.ndarray | Tensor:
        """The pools' format [copies, agents(, action_size)] from [agents, copies, action_size]: a
        tensor on the trainer's device for a tensor pool (``tensors``), else a NumPy array (EnvPool)."""
        if self.discrete:
            env_actions = actions.argmax(-1).transpose(0, 1)
        else:
            low, high = self.action_bounds
            env_actions = low + (actions.transpose(0, 1) + 1.0) * 0.5 * (high - low)
        return env_actions if tensors else env_actions.cpu().numpy()

    @torch.no_grad()
    def act(self, obs: np.ndarray | Tensor, deterministic: bool = False) -> np.ndarray | Tensor:
        """Actions for observations [copies, agents, obs_size] in the pool's format (a tensor for a
        tensor pool's observations, else a NumPy array): the greedy policy, or the exploring
        behaviour policy."""
        obs_t = torch.as_tensor(obs, dtype=self.dtype, device=self.device).transpose(0, 1)
        tensors = isinstance(obs, Tensor)
        if deterministic:
            return self._env_actions(self.greedy_actions(self.actor(obs_t)), tensors)
        return self._env_actions(self._exploration_actions(obs_t, uniform=False), tensors)

    # ---- one iteration: collect, then update ----------------------------------------------------

    def iteration(self) -> dict[str, float]:
        with self.clock.phase("environment"):
            episodes = self._collect()
        metrics: dict[str, float] = {}
        if self.env_steps >= self.config.learning_starts:
            metrics.update(self._update())
        self.updates += 1
        metrics.update(
            gradient_steps=self.gradient_steps,
            buffer_size=len(self.buffer),
            k=self.actor_optimizer.k,
            episodes=len(episodes),
        )
        if episodes:
            metrics["episode_return"] = float(np.mean([e["return"] for e in episodes]))
            metrics["episode_length"] = float(np.mean([e["length"] for e in episodes]))
        return metrics

    def _collect(self) -> list[dict[str, float]]:
        episodes = []
        for _ in range(self.config.rollout):
            obs, state, alive = self._pool_before_step()
            obs_t = torch.as_tensor(obs, dtype=self.dtype, device=self.device).transpose(0, 1)
            actions = self._exploration_actions(obs_t, uniform=self.env_steps < self.config.learning_starts)
            step = self.pool.step(self._env_actions(actions, self.tensor_pool))
            rows = transition_rows(obs, state, alive, step)
            if self.state_is_observations:  # the replay holds the observations once (replay.py's docstring)
                for name in STATE_FIELDS:
                    del rows[name]
            alive_t = torch.as_tensor(alive, dtype=self.dtype, device=self.device)
            rows["actions"] = actions.transpose(0, 1) * alive_t[..., None]
            self.buffer.add(rows)
            episodes += step.finished
            self.env_steps += self.pool.copies * self.world_size
        return episodes

    def _pool_before_step(self) -> tuple[np.ndarray | Tensor, np.ndarray | Tensor, np.ndarray | Tensor]:
        """The pool's observations, state and alive flags before a step: copies of an EnvPool's
        arrays, which its step overwrites; a tensor pool's own tensors, which its step replaces."""
        pool = self.pool
        if self.tensor_pool:
            return pool.obs, pool.state, pool.alive
        return pool.obs.copy(), pool.state.copy(), pool.alive.copy()

    def _update(self) -> dict[str, float]:
        c = self.config
        if self.k_until is not None:
            self.actor_optimizer.k = self.k if self.env_steps < self.k_until else 1
        critic_losses, actor_losses, q_means = [], [], []
        for _ in range(c.updates_per_iteration):
            batch = self.sample(self.local_batch_size)
            critic_loss, q_mean, actor_loss = self.gradient_step(batch, self.actor_noise(self.local_batch_size))
            critic_losses.append(critic_loss)
            actor_losses.append(actor_loss.mean())
            q_means.append(q_mean)
        return {
            "critic_loss": torch.stack(critic_losses).mean().item(),
            "actor_loss": torch.stack(actor_losses).mean().item(),
            "q_mean": torch.stack(q_means).mean().item(),
        }

    def sample(self, batch_size: int) -> dict[str, Tensor]:
        """``batch_size`` replay rows drawn with this rank's generator, with every field the losses read."""
        batch = self.buffer.sample(batch_size, self.generator)
        return with_observation_states(batch) if self.state_is_observations else batch

    def gradient_step(self, batch: dict[str, Tensor], noise: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """A critic step, an actor step and the targets' Polyak updates on ``batch`` (this rank's
        share of the minibatch under data parallel) with the actors' Gumbel ``noise``; returns the
        critic loss, the mean Q and the actor losses of this rank's share."""
        tau = self.config.tau
        with self.clock.phase("critic"):
            critic_loss, q_mean = self.critic_step(batch)
            polyak_update(self.target_critic, self.critic, tau)
        with self.clock.phase("actor"):
            actor_loss = self.actor_step(batch, noise)
            polyak_update(self.target_actor, self.actor, tau)
        self.gradient_steps += 1
        return critic_loss, q_mean, actor_loss

    def critic_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """One Adam step of the critic on ``batch``; returns the loss and the mean Q (detached)."""
        loss, q_mean = self.critic_loss(batch)
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Clipping after the average, so that every rank takes the step of the whole minibatch.
        average_gradients(self.critic.parameters(), self.process_group)
        self._clip_critic_gradients()
        self.critic_optimizer.step()
        return loss.detach(), q_mean.detach()

    def actor_step(self, batch: dict[str, Tensor], noise: Tensor | None) -> Tensor:
        """One KPG step of the actors on ``batch``; returns the last level's losses."""
        return self.actor_optimizer.step(lambda ctx: self.actor_losses(ctx, batch, noise))

    # ---- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "actor": self.actor.state_dict(),
            "target_actor": self.target_actor.state_dict(),
            "critic": self.critic.state_dict(),
            "target_critic": self.target_critic.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "replay": self.buffer.state_dict(),
            "generator": self.generator.bit_generator.state,
            "noise_generator": self.noise_generator.get_state(),
            "env_steps": self.env_steps,
            "updates": self.updates,
            "gradient_steps": self.gradient_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        # load_state_dict copies in place, so the actors' parameters stay views of the optimizer's arena.
        self.actor.load_state_dict(state["actor"])
        self.target_actor.load_state_dict(state["target_actor"])
        self.critic.load_state_dict(state["critic"])
        self.target_critic.load_state_dict(state["target_critic"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.buffer.load_state_dict(state["replay"])
        self.generator.bit_generator.state = state["generator"]
        self.noise_generator.set_state(state["noise_generator"])
        self.env_steps, self.updates, self.gradient_steps = (
            state["env_steps"],
            state["updates"],
            state["gradient_steps"],
        )

    def actor_level_seconds(self) -> list[float]:
        """Seconds of the actor update per KPG level since construction (closure, backward, kernels)."""
        return actor_level_seconds(self.actor_optimizer)
