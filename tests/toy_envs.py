"""Tiny deterministic PettingZoo Parallel environments for the trainer tests: agents of different
observation and action sizes, one that finishes early, a time limit."""

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv


class UnevenAgents(ParallelEnv):
    """Agent ``short`` (3 observations, 2 actions) is terminated after ``short_steps`` steps;
    ``long`` (5 observations, 4 actions) runs until the time limit ``max_steps`` (truncated).
    The reward of each agent is 1 when its action equals the step count modulo its action count;
    observations encode the step count, so the task is learnable."""

    metadata = {"name": "uneven_agents_v0"}

    def __init__(self, short_steps: int = 2, max_steps: int = 4, continuous: bool = False):
        self.possible_agents = ["short", "long"]
        self.short_steps, self.max_steps, self.continuous = short_steps, max_steps, continuous
        self._obs_sizes = {"short": 3, "long": 5}
        self._action_sizes = {"short": 2, "long": 4}
        self.agents: list[str] = []
        self.t = 0

    def observation_space(self, agent):
        return spaces.Box(-10.0, 10.0, (self._obs_sizes[agent],), np.float32)

    def action_space(self, agent):
        if self.continuous:
            return spaces.Box(-1.0, 1.0, (self._action_sizes[agent] // 2,), np.float32)
        return spaces.Discrete(self._action_sizes[agent])

    def _observe(self, agent):
        obs = np.zeros(self._obs_sizes[agent], dtype=np.float32)
        obs[self.t % self._obs_sizes[agent]] = 1.0
        obs[-1] = self.t / self.max_steps
        return obs

    def state(self):
        return np.concatenate([self._observe(a) for a in self.possible_agents])

    def reset(self, seed=None, options=None):
        self.t = 0
        self.agents = list(self.possible_agents)
        return {a: self._observe(a) for a in self.agents}, {a: {} for a in self.agents}

    def step(self, actions):
        rewards = {}
        for agent, action in actions.items():
            target = self.t % self._action_sizes[agent]
            if self.continuous:
                rewards[agent] = float(-np.abs(np.asarray(action) - target / self._action_sizes[agent]).sum())
            else:
                rewards[agent] = float(int(action) == target)
        self.t += 1
        terminations = {a: a == "short" and self.t >= self.short_steps for a in self.agents}
        truncations = {a: self.t >= self.max_steps and not terminations[a] for a in self.agents}
        observations = {a: self._observe(a) for a in self.agents}
        self.agents = [a for a in self.agents if not (terminations[a] or truncations[a])]
        return observations, rewards, terminations, truncations, {a: {} for a in observations}


def uneven_agents(**options):
    return UnevenAgents(**options)


class TwoTeams(ParallelEnv):
    """Team ``red`` (``red_0``, ``red_1``) against team ``blue`` (``blue_0``), 2 observations and 3
    actions each. ``red_1`` is killed at step ``red_1_dies``; the episode ends by the time limit
    ``max_steps``. Every agent observes (its own last action, time); the global state is every
    agent's observation, so what the opponent did shows in it."""

    metadata = {"name": "two_teams_v0"}

    def __init__(self, red_1_dies: int = 2, max_steps: int = 4):
        self.possible_agents = ["red_0", "red_1", "blue_0"]
        self.red_1_dies, self.max_steps = red_1_dies, max_steps
        self.agents: list[str] = []
        self.last_action = {}
        self.t = 0

    def observation_space(self, agent):
        return spaces.Box(-10.0, 10.0, (2,), np.float32)

    def action_space(self, agent):
        return spaces.Discrete(3)

    def _observe(self, agent):
        return np.array([self.last_action.get(agent, -1), self.t], dtype=np.float32)

    def state(self):
        return np.concatenate([self._observe(a) for a in self.possible_agents])

    def reset(self, seed=None, options=None):
        self.t, self.last_action = 0, {}
        self.agents = list(self.possible_agents)
        return {a: self._observe(a) for a in self.agents}, {a: {} for a in self.agents}

    def step(self, actions):
        missing = set(self.agents) - set(actions)
        if missing:
            raise ValueError(f"no action for {sorted(missing)}")
        self.last_action.update({agent: int(action) for agent, action in actions.items()})
        self.t += 1
        rewards = {a: float(actions[a]) for a in self.agents}
        terminations = {a: a == "red_1" and self.t >= self.red_1_dies for a in self.agents}
        truncations = {a: self.t >= self.max_steps and not terminations[a] for a in self.agents}
        observations = {a: self._observe(a) for a in self.agents}
        self.agents = [a for a in self.agents if not (terminations[a] or truncations[a])]
        return observations, rewards, terminations, truncations, {a: {} for a in observations}


def opponent_plays_time(observations, env, rng):
    """A scripted opponent: action = the time it observes, modulo 3."""
    return {name: int(obs[1]) % 3 for name, obs in observations.items()}


def opponent_plays_first_action(observations, env, rng):
    """A fixed opponent for any discrete environment: action 0 for everyone."""
    return {name: 0 for name in observations}
