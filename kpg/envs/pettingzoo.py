"""Multi-agent environments for the trainers: any PettingZoo Parallel environment, several copies
stepped together, with every agent's observations and actions in fixed-shape arrays.

``make_env_factory(name, **options)`` names the built-in tasks; ``EnvPool(factory, copies, seed)``
steps copies of one. Agents may differ in observation and action size (observations are
zero-padded to the largest; discrete action sets are padded and the extra actions masked;
continuous actions are cut to each agent's size) and may finish early (``alive`` is 0 from the
step after an agent's episode ended until its copy resets). A copy resets when its last agent is
done; the step that ended it reports the episode in ``StepResult.finished``, and every step reports
the observations and global state it led to before any reset (``next_obs``, ``next_state``), so that
the value of a state cut off by a time limit can be bootstrapped.

``magent2:TASK`` trains one team of a MAgent2 battle against an opponent policy
(:class:`~kpg.envs.teams.TeamControl`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kpg.envs.teams import magent2_factory
from kpg.options import OptionError

EnvFactory = Callable[[], Any]


def _mpe2(scenario: str, **options: Any) -> EnvFactory:
    try:
        module = importlib.import_module(f"mpe2.{scenario}")
    except ImportError as error:
        raise ValueError(
            f"unknown mpe2 scenario {scenario!r} ({error}); e.g. simple_spread_v3, simple_reference_v3"
        ) from None
    return lambda: module.parallel_env(**options)


def _simple_spread(agents: int = 3, max_cycles: int = 25, continuous: bool = False, **options: Any) -> EnvFactory:
    return _mpe2("simple_spread_v3", N=agents, max_cycles=max_cycles, continuous_actions=continuous, **options)


def _mamujoco(task: str, **options: Any) -> EnvFactory:
    scenario, _, conf = task.partition("-")
    if not conf:
        raise ValueError(f"a MaMuJoCo task is SCENARIO-CONF such as HalfCheetah-2x3 or HalfCheetah-6x1, got {task!r}")
    try:
        from gymnasium_robotics import mamujoco_v1
    except ImportError as error:
        raise ImportError(f"MaMuJoCo needs gymnasium-robotics and mujoco: pip install 'kpg[envs]' ({error})") from None
    return lambda: mamujoco_v1.parallel_env(scenario, conf, **options)


def _custom(target: str, **options: Any) -> EnvFactory:
    module_name, _, attribute = target.partition(":")
    allowed = "module:callable naming a function that returns a PettingZoo ParallelEnv"
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise OptionError("--env", target, f"expected {allowed} ({type(error).__name__}: {error})") from None
    if not callable(factory):
        raise OptionError("--env", target, f"expected {allowed}; it names a {type(factory).__name__}")

    def make():
        env = factory(**options)
        if not all(hasattr(env, name) for name in ("possible_agents", "reset", "step", "observation_space")):
            raise OptionError("--env", target, f"expected {allowed}; it returned a {type(env).__name__}")
        return env

    return make


FAMILIES: dict[str, Callable[..., EnvFactory]] = {"mpe2": _mpe2, "mamujoco": _mamujoco, "magent2": magent2_factory}


def make_env_factory(name: str, **options: Any) -> EnvFactory:
    """A zero-argument constructor of the Parallel environment ``name`` with ``options``:

    ``simple_spread`` (mpe2, options ``agents``, ``max_cycles``, ``continuous``), ``mpe2:SCENARIO``,
    ``mamujoco:SCENARIO-CONF`` (e.g. ``mamujoco:HalfCheetah-2x3``), ``magent2:TASK`` (e.g.
    ``magent2:battle_v4``; options ``team``, the team trained, default the first, and ``opponent``,
    the other team's policy: ``random`` or ``module:callable``; the task's own such as ``map_size``
    and ``max_cycles``), or ``package.module:callable`` for any function returning a PettingZoo
    ParallelEnv.
    """
    if name == "simple_spread":
        return _simple_spread(**options)
    family, separator, task = name.partition(":")
    if separator and family in FAMILIES:
        return FAMILIES[family](task, **options)
    if separator:
        return _custom(name, **options)
    raise ValueError(
        f"unknown environment {name!r}; use simple_spread, mpe2:SCENARIO, mamujoco:SCENARIO-CONF, magent2:TASK "
        "or module:callable"
    )


@dataclass
class AgentSpaces:
    """What the policies see of every agent, in ``possible_agents`` order."""

    names: list[str]
    obs_sizes: list[int]
    discrete: bool
    action_sizes: list[int]  # number of actions (discrete) or action dimensions (continuous)
    action_low: np.ndarray | None  # [agents, max action dims], continuous only
    action_high: np.ndarray | None
    state_size: int

    @property
    def num_agents(self) -> int:
        return len(self.names)

    @property
    def obs_size(self) -> int:
        return max(self.obs_sizes)

    @property
    def action_size(self) -> int:
        return max(self.action_sizes)

    @property
    def homogeneous(self) -> bool:
        return len(set(self.obs_sizes)) == 1 and len(set(self.action_sizes)) == 1

    def action_mask(self) -> np.ndarray:
        """[agents, action_size]: 1 where the agent has that action (dimension)."""
        return (np.arange(self.action_size)[None, :] < np.asarray(self.action_sizes)[:, None]).astype(np.float32)


@dataclass
class StepResult:
    obs: np.ndarray  # [copies, agents, obs_size], after auto-reset
    state: np.ndarray  # [copies, state_size], after auto-reset
    reward: np.ndarray  # [copies, agents]
    done: np.ndarray  # [copies, agents]: the agent's episode ended at this step (terminated or truncated)
    terminated: np.ndarray  # [copies, agents]: ended by the task, not by a time limit
    alive: np.ndarray  # [copies, agents]: the agent acts at the next step
    # What this step led to, before a copy whose episode ended was reset (the final observations and
    # state of that episode); equal to obs and state for copies that go on.
    next_obs: np.ndarray  # [copies, agents, obs_size]: zero for agents without a next observation to act on
    next_state: np.ndarray  # [copies, state_size]
    # [copies, agents]: the agent has a next observation to act on: alive after the step, or cut off by
    # a time limit at it (its value after the step counts); 0 for terminated and absent agents.
    next_present: np.ndarray
    finished: list[dict[str, float]] = field(default_factory=list)  # {"return", "length"} per ended episode


class EnvPool:
    """``copies`` instances of one Parallel environment stepped in lockstep, episode seeds drawn
    from ``seed`` so that a run is reproducible."""

    def __init__(self, factory: EnvFactory, copies: int, seed: int):
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        self.envs = [factory() for _ in range(copies)]
        self.copies = copies
        self.seed = seed
        self.episodes_started = 0
        first = self.envs[0]
        names = list(first.possible_agents)
        if not names:
            raise ValueError("the environment has no agents (possible_agents is empty)")
        self.spaces = _agent_spaces(first, names)
        self._index = {name: i for i, name in enumerate(names)}
        self._episode_return = np.zeros(copies)
        self._episode_length = np.zeros(copies, dtype=np.int64)
        self.obs = np.zeros((copies, self.spaces.num_agents, self.spaces.obs_size), dtype=np.float32)
        self.state = np.zeros((copies, self.spaces.state_size), dtype=np.float32)
        self.alive = np.zeros((copies, self.spaces.num_agents), dtype=np.float32)
        self._episode_seeds = [0] * copies
        for c in range(copies):
            self._reset_copy(c)

    def close(self) -> None:
        for env in self.envs:
            env.close()

    @property
    def at_episode_start(self) -> bool:
        """Every copy has just reset; a checkpoint taken now resumes exactly."""
        return bool((self._episode_length == 0).all())

    def state_dict(self) -> dict[str, Any]:
        """The episode seeds. Environments cannot be saved in general, so a pool loading this
        restarts each copy's current episode from its seed: exact when :attr:`at_episode_start`."""
        return {
            "seed": self.seed,
            "episodes_started": self.episodes_started,
            "episode_seeds": list(self._episode_seeds),
        }

    def resharded_state(self, pool_states: Sequence[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any]:
        """This pool's state on ``rank`` of ``world_size`` from the states of a run on another number
        of ranks: its slice of all copies' episode seeds (each copy restarts its current episode from
        its seed) and the episode counter this rank used before, so no episode seed repeats."""
        seeds = [s for state in pool_states for s in state["episode_seeds"]]
        if len(seeds) != self.copies * world_size:
            raise ValueError(
                f"the checkpoint holds {len(seeds)} environment copies, this run {self.copies * world_size}; "
                "resume with the same --copies"
            )
        before = pool_states[rank] if rank < len(pool_states) else None
        return {
            "seed": self.seed,
            "episodes_started": before["episodes_started"] if before else 0,
            "episode_seeds": seeds[rank * self.copies : (rank + 1) * self.copies],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["episode_seeds"]) != self.copies:
            raise ValueError(
                f"the saved pool had {len(state['episode_seeds'])} environment copies, this one has {self.copies}; "
                "resume with the same number of copies"
            )
        self.seed = state["seed"]
        self._episode_return[:] = 0
        self._episode_length[:] = 0
        for c, episode_seed in enumerate(state["episode_seeds"]):
            self._reset_copy(c, episode_seed)
        self.episodes_started = state["episodes_started"]

    def step(self, actions: np.ndarray) -> StepResult:
        """``actions``: [copies, agents] action indices (discrete) or [copies, agents, action_size]."""
        spaces = self.spaces
        n = spaces.num_agents
        expected = (self.copies, n) if spaces.discrete else (self.copies, n, spaces.action_size)
        if np.shape(actions) != expected:
            raise ValueError(
                f"EnvPool.step got actions of shape {np.shape(actions)}; expected {expected} "
                "(copies, agents" + (")" if spaces.discrete else ", action size)")
            )
        reward = np.zeros((self.copies, n), dtype=np.float32)
        done = np.zeros((self.copies, n), dtype=np.float32)
        terminated = np.zeros((self.copies, n), dtype=np.float32)
        next_obs = np.zeros_like(self.obs)
        next_present = np.zeros_like(self.alive)
        next_state = np.zeros_like(self.state)
        finished = []
        for c, env in enumerate(self.envs):
            acting = list(env.agents)
            joint = {name: self._env_action(actions[c, self._index[name]], self._index[name]) for name in acting}
            obs, rewards, terms, truncs, _ = env.step(joint)
            cut_off = set()
            for name in acting:
                i = self._index[name]
                reward[c, i] = rewards.get(name, 0.0)
                term, trunc = bool(terms.get(name, False)), bool(truncs.get(name, False))
                done[c, i] = float(term or trunc)
                terminated[c, i] = float(term)
                if trunc and not term:
                    cut_off.add(name)  # a time limit ended it, not the task: its next observation still counts
            going_on = set(env.agents)
            self.obs[c] = 0.0
            self.alive[c] = 0.0
            for name, value in obs.items():
                if name not in going_on and name not in cut_off:
                    continue
                i = self._index[name]
                next_obs[c, i, : spaces.obs_sizes[i]] = self._flat_observation(i, value)
                next_present[c, i] = 1.0
                if name in going_on:
                    self.obs[c, i] = next_obs[c, i]
                    self.alive[c, i] = 1.0
            next_state[c] = self._global_state(env, next_obs[c])
            if acting:
                self._episode_return[c] += reward[c, [self._index[name] for name in acting]].mean()
            self._episode_length[c] += 1
            if going_on:
                self.state[c] = next_state[c]
            else:
                finished.append({"return": float(self._episode_return[c]), "length": int(self._episode_length[c])})
                self._episode_return[c] = 0.0
                self._episode_length[c] = 0
                self._reset_copy(c)
        return StepResult(
            self.obs.copy(),
            self.state.copy(),
            reward,
            done,
            terminated,
            self.alive.copy(),
            next_obs,
            next_state,
            next_present,
            finished,
        )

    def _reset_copy(self, c: int, episode_seed: int | None = None) -> None:
        if episode_seed is None:
            episode_seed = self.seed * 1_000_003 + self.episodes_started
            self.episodes_started += 1
        self._episode_seeds[c] = episode_seed
        env = self.envs[c]
        obs, _ = env.reset(seed=episode_seed)
        self.obs[c] = 0.0
        self.alive[c] = 0.0
        for name, value in obs.items():
            i = self._index[name]
            self.obs[c, i, : self.spaces.obs_sizes[i]] = self._flat_observation(i, value)
            self.alive[c, i] = 1.0
        self.state[c] = self._global_state(env, self.obs[c])

    def _flat_observation(self, agent: int, value: Any) -> np.ndarray:
        flat = np.asarray(value, dtype=np.float32).reshape(-1)
        if flat.size != self.spaces.obs_sizes[agent]:
            raise ValueError(
                f"agent {self.spaces.names[agent]!r} got an observation of shape {np.shape(value)} ({flat.size} "
                "values) but its "
                f"observation space has {self.spaces.obs_sizes[agent]}; fix the environment's observation or its "
                "observation_space so they agree"
            )
        return flat

    @staticmethod
    def _global_state(env: Any, present_obs: np.ndarray) -> np.ndarray:
        """``env.state()``, or for environments without one the padded observations [agents,
        obs_size] of the agents that have one to act on."""
        try:
            return np.asarray(env.state(), dtype=np.float32).reshape(-1)
        except NotImplementedError:
            return present_obs.reshape(-1)

    def _env_action(self, action: np.ndarray, agent: int) -> Any:
        if self.spaces.discrete:
            return int(action)
        size = self.spaces.action_sizes[agent]
        low, high = self.spaces.action_low[agent, :size], self.spaces.action_high[agent, :size]
        return np.clip(np.asarray(action[:size], dtype=np.float32), low, high)


def _agent_spaces(env: Any, names: list[str]) -> AgentSpaces:
    from gymnasium import spaces as gym_spaces

    obs_sizes, action_sizes, lows, highs, kinds = [], [], [], [], set()
    for name in names:
        obs_space, action_space = env.observation_space(name), env.action_space(name)
        if not isinstance(obs_space, gym_spaces.Box):
            raise TypeError(
                f"agent {name}: observation space {obs_space} is not a Box; kpg trainers take flat vector observations"
            )
        obs_sizes.append(int(np.prod(obs_space.shape)))
        if isinstance(action_space, gym_spaces.Discrete):
            kinds.add("discrete")
            action_sizes.append(int(action_space.n))
        elif isinstance(action_space, gym_spaces.Box) and len(action_space.shape) == 1:
            kinds.add("continuous")
            action_sizes.append(int(action_space.shape[0]))
            lows.append(action_space.low.astype(np.float32))
            highs.append(action_space.high.astype(np.float32))
        else:
            raise TypeError(f"agent {name}: action space {action_space} is neither Discrete nor a 1-D Box")
    if len(kinds) > 1:
        raise TypeError("agents mix discrete and continuous action spaces; kpg trainers need one kind per environment")
    discrete = kinds == {"discrete"}
    low = high = None
    if not discrete:
        width = max(action_sizes)
        low = np.stack([np.pad(l, (0, width - len(l)), constant_values=-1.0) for l in lows])
        high = np.stack([np.pad(h, (0, width - len(h)), constant_values=1.0) for h in highs])
    env.reset(seed=0)
    try:
        state_size = int(np.asarray(env.state()).size)
    except NotImplementedError:
        state_size = len(names) * max(obs_sizes)
    return AgentSpaces(names, obs_sizes, discrete, action_sizes, low, high, state_size)
