"""VMAS (the Vectorized Multi-Agent Simulator, written in PyTorch): thousands of environment copies
as tensors on the training device, every copy stepped by one call.

``VMASPool(scenario, copies, seed, agents=N, device=...)`` holds ``copies`` copies of a VMAS
scenario (``navigation``, ``balance``, ``transport``, ``simple_spread``, ... any name of
``vmas.scenarios``) and keeps what the trainer reads as torch tensors: ``obs`` [copies, agents,
obs_size] and ``state`` [copies, agents * obs_size] (VMAS has no global state; the centralized
critic reads every agent's observation, a view of ``obs``). ``step(actions)`` takes [copies,
agents] action indices (``continuous=False``) or [copies, agents, action_size] (continuous, the
VMAS default; actions outside an agent's range are clamped to it).

Episodes end when the scenario says so (navigation: every agent on its goal; balance: the package
fell or reached its goal; transport: the packages are on their goals) or after ``max_steps``
(default 100, a time limit: the trainer bootstraps its last state's value). VMAS resets copies one
index per call (``Environment.reset_at``, as TorchRL's ``VmasEnv`` does): the pool resets all
copies with one call when all end together (a time limit reached by copies started together) and
the ended ones one by one otherwise.

Navigation places every agent and goal by rejection sampling in a square of half-width
``world_spawning_x`` (``_y``), default 1, where 32 or more agents do not fit and spawning never
ends. The pool scales the square with the agent count, keeping the default's density of 4 agents
in the 2 x 2 square: half-width ``sqrt(agents / 4)`` (64 agents: 4, 256 agents: 8), unless the
options set it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kpg.envs.pettingzoo import AgentSpaces

try:
    import vmas
except ImportError as error:
    raise ImportError(f"vmas: environments need the VMAS simulator: pip install 'kpg[vmas]' ({error})") from None

DEFAULT_MAX_STEPS = 100
# Agents per spawning square of navigation's default size (half-width 1): its default agent count.
NAVIGATION_AGENTS_PER_UNIT_SQUARE = 4


def available_scenarios() -> set[str]:
    """The scenario names VMAS loads (its own, the MPE ones and the debug ones)."""
    return {*vmas.scenarios, *vmas.mpe_scenarios, *vmas.debug_scenarios}


def scenario_options(scenario: str, agents: int | None, options: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of the VMAS scenario: ``n_agents`` from ``agents`` and, for navigation,
    a spawning square that fits them (see the module's docstring); ``options`` win."""
    chosen = dict(options)
    if agents is not None:
        chosen.setdefault("n_agents", agents)
    if scenario == "navigation":
        half_width = max(1.0, math.sqrt(chosen.get("n_agents", 4) / NAVIGATION_AGENTS_PER_UNIT_SQUARE))
        chosen.setdefault("world_spawning_x", half_width)
        chosen.setdefault("world_spawning_y", half_width)
    return chosen


@dataclass
class VMASStep:
    """One step of every copy; ``obs`` and ``state`` are after the ended copies' reset."""

    obs: Tensor  # [copies, agents, obs_size]
    state: Tensor  # [copies, agents * obs_size]
    reward: Tensor  # [copies, agents]
    done: Tensor  # [copies, agents] float: the copy's episode ended at this step (every agent's)
    terminated: Tensor  # [copies, agents] float: ended by the task, not by the time limit
    alive: Tensor  # [copies, agents]: every agent acts at every step in VMAS
    final_obs: Tensor  # [copies, agents, obs_size]: what the step led to, before any reset
    final_state: Tensor  # [copies, agents * obs_size]
    finished: list[dict[str, float]] = field(default_factory=list)  # {"return", "length"} per ended episode

    # EnvPool's StepResult's names for what the step led to, which the off-policy trainers' replay rows read.
    @property
    def next_obs(self) -> Tensor:
        return self.final_obs

    @property
    def next_state(self) -> Tensor:
        return self.final_state

    @property
    def next_present(self) -> Tensor:
        """[copies, agents]: 1 where the agent has a next observation to act on: in copies that go on or
        were cut off by the time limit (a VMAS task ends every agent's episode together)."""
        return 1.0 - self.terminated


class VMASPool:
    """``copies`` copies of VMAS scenario ``scenario`` on ``device``; ``options`` are the scenario's
    keyword arguments (with ``agents`` for ``n_agents``) and ``max_steps`` and ``continuous``."""

    # The state is every agent's observation (``obs.flatten(1)``): a replay stores the observations once.
    state_is_observations = True

    def __init__(
        self,
        scenario: str,
        copies: int,
        seed: int,
        agents: int | None = None,
        device: str = "cpu",
        max_steps: int = DEFAULT_MAX_STEPS,
        continuous: bool = True,
        **options: Any,
    ):
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (VMAS scenarios need a time limit here), got {max_steps}")
        if not scenario:
            raise ValueError("vmas: needs a scenario name, e.g. vmas:navigation")
        self.scenario, self.copies, self.seed = scenario, copies, seed
        self.device = torch.device(device)
        kwargs = scenario_options(scenario, agents, options)
        if scenario not in available_scenarios():
            raise ValueError(
                f"unknown VMAS scenario {scenario!r}; e.g. vmas:navigation, vmas:balance, vmas:transport, "
                f"vmas:simple_spread (all: {', '.join(sorted(available_scenarios()))})"
            )
        self.env = vmas.make_env(
            scenario,
            num_envs=copies,
            device=self.device,
            continuous_actions=continuous,
            max_steps=max_steps,
            seed=seed,
            clamp_actions=True,
            terminated_truncated=True,
            **kwargs,
        )
        env = self.env
        names = [agent.name for agent in env.agents]
        n = len(names)
        obs_sizes = [int(space.shape[0]) for space in env.observation_space.spaces]
        if continuous:
            action_sizes = [env.get_agent_action_size(agent) for agent in env.agents]
            width = max(action_sizes)
            bounds = np.zeros((n, width), dtype=np.float32)
            for i, agent in enumerate(env.agents):
                bounds[i, : action_sizes[i]] = agent.action.u_range_tensor.cpu().numpy()[: action_sizes[i]]
            low, high = -bounds, bounds
        else:
            action_sizes, low, high = [int(space.n) for space in env.action_space.spaces], None, None
        self.spaces = AgentSpaces(names, obs_sizes, not continuous, action_sizes, low, high, n * max(obs_sizes))
        self._episode_return = torch.zeros(copies, device=self.device)
        self._episode_length = torch.zeros(copies, dtype=torch.long, device=self.device)
        self.resets = 0  # reset calls since construction (one for all copies, or one per ended copy)
        self.obs = self._current_observations()  # make_env has reset every copy
        self.alive = torch.ones(copies, n, device=self.device)

    @property
    def state(self) -> Tensor:
        return self.obs.flatten(1)

    def _observations(self, per_agent: list[Tensor]) -> Tensor:
        """[copies, agents, obs_size] from VMAS's list of per-agent [copies, obs_i]; padded with zeros
        to the largest size where agents differ."""
        if self.spaces.homogeneous:
            return torch.stack(per_agent, dim=1)
        width = self.spaces.obs_size
        return torch.stack([torch.nn.functional.pad(o, (0, width - o.shape[1])) for o in per_agent], dim=1)

    def _current_observations(self) -> Tensor:
        return self._observations(
            self.env.get_from_scenario(get_observations=True, get_rewards=False, get_infos=False, get_dones=False)[0]
        )

    def _per_agent_actions(self, actions: Tensor) -> list[Tensor]:
        if self.spaces.discrete:
            return list(actions.unsqueeze(-1).unbind(1))
        per_agent = actions.unbind(1)
        if len(set(self.spaces.action_sizes)) == 1:
            return list(per_agent)
        return [a[:, :size] for a, size in zip(per_agent, self.spaces.action_sizes)]

    def step(self, actions: Tensor | np.ndarray) -> VMASStep:
        """``actions``: [copies, agents] indices (discrete) or [copies, agents, action_size]."""
        spaces = self.spaces
        n = spaces.num_agents
        expected = (self.copies, n) if spaces.discrete else (self.copies, n, spaces.action_size)
        if tuple(np.shape(actions)) != expected:
            raise ValueError(
                f"VMASPool.step got actions of shape {tuple(np.shape(actions))}; expected {expected} "
                "(copies, agents" + (")" if spaces.discrete else ", action size)")
            )
        actions = torch.as_tensor(actions, device=self.device)
        obs, rewards, terminated, truncated, _ = self.env.step(self._per_agent_actions(actions))
        final_obs = self._observations(obs)
        reward = torch.stack(rewards, dim=1)
        ended = terminated | truncated
        self._episode_return += reward.mean(1)
        self._episode_length += 1
        finished: list[dict[str, float]] = []
        new_obs = final_obs
        ended_copies = ended.nonzero().flatten()
        if len(ended_copies):
            returns = self._episode_return[ended_copies].tolist()
            lengths = self._episode_length[ended_copies].tolist()
            finished = [{"return": r, "length": length} for r, length in zip(returns, lengths)]
            self._episode_return[ended_copies] = 0.0
            self._episode_length[ended_copies] = 0
            new_obs = self._reset(ended_copies, final_obs)
        self.obs = new_obs
        expand = lambda flags: flags.to(reward.dtype)[:, None].expand(-1, n)  # noqa: E731
        return VMASStep(
            new_obs,
            new_obs.flatten(1),
            reward,
            expand(ended),
            expand(terminated),
            self.alive,
            final_obs,
            final_obs.flatten(1),
            finished,
        )

    def _reset(self, ended_copies: Tensor, final_obs: Tensor) -> Tensor:
        """Observations after resetting ``ended_copies``: one VMAS call for all copies when all ended."""
        if len(ended_copies) == self.copies:
            self.resets += 1
            return self._observations(self.env.reset())
        for index in ended_copies.tolist():
            self.env.reset_at(index, return_observations=False)
        self.resets += len(ended_copies)
        fresh = self._current_observations()
        obs = final_obs.clone()
        obs[ended_copies] = fresh[ended_copies]
        return obs

    # ---- checkpoints: VMAS cannot save a world, so a resume starts every copy's episode afresh ----

    def state_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "copies": self.copies, "seed": self.seed, "resets": self.resets}

    def resharded_state(self, pool_states: Sequence[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any]:
        """This pool's state on ``rank`` of ``world_size`` from the states of a run on another number
        of ranks: every copy restarts its episode on any resume, so only the totals must agree; the
        reset counter this rank used before keeps its seeds from repeating."""
        saved = sum(state.get("copies", 0) for state in pool_states)
        if {state.get("scenario") for state in pool_states} != {self.scenario} or saved != self.copies * world_size:
            raise ValueError(
                f"the saved VMAS pools ran {pool_states[0].get('scenario')!r} with {saved} copies in all, this run "
                f"{self.scenario!r} with {self.copies * world_size}; resume with the same --env and --copies"
            )
        before = pool_states[rank] if rank < len(pool_states) else None
        return {**self.state_dict(), "resets": before["resets"] if before else 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("scenario") != self.scenario or state.get("copies") != self.copies:
            raise ValueError(
                f"the saved VMAS pool ran {state.get('scenario')!r} with {state.get('copies')} copies, this one "
                f"{self.scenario!r} with {self.copies}; resume with the same --env and --copies"
            )
        self.resets = state["resets"]
        # A new seed per resume, so that the restarted episodes are not the first ones again.
        self.obs = self._observations(self.env.reset(seed=self.seed + self.resets))
        self._episode_return.zero_()
        self._episode_length.zero_()

    @property
    def at_episode_start(self) -> bool:
        return bool((self._episode_length == 0).all())

    def close(self) -> None:
        pass
