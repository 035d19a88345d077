"""One team of a multi-team PettingZoo environment (MAgent2's battles) as an environment of its own,
the other team acting by an opponent policy."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np


def magent2_factory(task: str, team: str | None = None, opponent: str = "random", **options: Any) -> Callable[[], Any]:
    opponent_policy = _opponent_policy(opponent)
    try:
        module = importlib.import_module(f"magent2.environments.{task}")
    except ImportError as error:
        raise ImportError(
            f"MAgent2 task {task!r} is unavailable ({error}); pip install magent2, tasks like battle_v4"
        ) from None
    return lambda: TeamControl(module.parallel_env(**options), team, opponent_policy)


OpponentPolicy = Callable[[dict[str, np.ndarray], Any, np.random.Generator], dict[str, Any]]


def random_opponent(observations: dict[str, np.ndarray], env: Any, rng: np.random.Generator) -> dict[str, Any]:
    """Uniformly random actions (drawn from ``rng``, which TeamControl seeds from the episode seed)."""
    action_counts = [env.action_space(name).n for name in observations]
    return dict(zip(observations, rng.integers(action_counts).tolist()))


OPPONENTS: dict[str, OpponentPolicy] = {"random": random_opponent}


def _opponent_policy(name: str) -> OpponentPolicy:
    if name in OPPONENTS:
        return OPPONENTS[name]
    module_name, separator, attribute = name.partition(":")
    if not separator:
        raise ValueError(
            f"unknown opponent {name!r}; use {', '.join(OPPONENTS)} or module:callable, a function "
            "(observations, env, rng) -> actions of the opponents"
        )
    return getattr(importlib.import_module(module_name), attribute)


class TeamControl:
    """One team of a multi-team PettingZoo Parallel environment as a Parallel environment of its own:
    the trainer's agents are the team's (``possible_agents`` whose name before the last ``_`` starts
    with ``team``; by default the first agent's team, ``red`` in MAgent2's battle), and the other
    agents act by ``opponent(observations, env, rng)`` on their own observations. The episode ends
    when the team's last agent is done (killed, or the environment's end); ``state()`` is the
    wrapped environment's global state, both teams included.
    """

    def __init__(self, env: Any, team: str | None, opponent: OpponentPolicy):
        self.env, self.opponent = env, opponent
        names = list(env.possible_agents)
        self.team = team if team is not None else names[0].rsplit("_", 1)[0]
        self.possible_agents = [name for name in names if name.rsplit("_", 1)[0].startswith(self.team)]
        if not self.possible_agents:
            teams = sorted({name.rsplit("_", 1)[0] for name in names})
            raise ValueError(f"no agent of team {self.team!r}; the environment's teams are {', '.join(teams)}")
        self._controlled = set(self.possible_agents)
        self.agents: list[str] = []
        self._opponent_obs: dict[str, np.ndarray] = {}
        self._rng = np.random.default_rng(0)

    def observation_space(self, agent: str) -> Any:
        return self.env.observation_space(agent)

    def action_space(self, agent: str) -> Any:
        return self.env.action_space(agent)

    def state(self) -> np.ndarray:
        return self.env.state()

    def reset(self, seed: int | None = None, options: dict | None = None):
        obs, infos = self.env.reset(seed=seed, options=options)
        self._rng = np.random.default_rng(seed)
        self._split(obs)
        return {name: obs[name] for name in self.agents}, {name: infos.get(name, {}) for name in self.agents}

    def step(self, actions: dict[str, Any]):
        opponents = {name: self._opponent_obs[name] for name in self.env.agents if name not in self._controlled}
        joint = {**(self.opponent(opponents, self.env, self._rng) if opponents else {}), **actions}
        obs, rewards, terminations, truncations, infos = self.env.step(joint)
        self._split(obs)
        ours = lambda values: {name: value for name, value in values.items() if name in self._controlled}  # noqa: E731
        return ours(obs), ours(rewards), ours(terminations), ours(truncations), ours(infos)

    def _split(self, obs: dict[str, np.ndarray]) -> None:
        self.agents = [name for name in self.env.agents if name in self._controlled]
        self._opponent_obs = {name: value for name, value in obs.items() if name not in self._controlled}

    def close(self) -> None:
        self.env.close()
