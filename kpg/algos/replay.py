"""Replay for the off-policy trainers (MADDPG, FACMAC): a preallocated ring buffer of multi-agent
transitions, and the collection of transitions from an :class:`~kpg.envs.EnvPool` with the true
next observations of episodes that just ended.

A transition row holds, with the agent dimension second (``[capacity, agents, ...]``):

- ``obs``, ``state``, ``alive``: what the agents saw; ``alive`` is 1 for agents that acted.
- ``actions``: the trainer's action encoding (one-hot for discrete actions, actions scaled to
  [-1, 1] for continuous ones), zero for agents that did not act and for padded dimensions.
- ``reward``, ``terminated``: per agent; ``terminated`` is 1 only for an end set by the task, not
  by a time limit, so a time-limited transition still bootstraps.
- ``next_obs``, ``next_state``: after the step, before any automatic reset (the final observation
  and state of an episode that ended at this step).
- ``next_present``: 1 for agents that have a next observation to act on: alive after the step, or
  cut off by a time limit at this step.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kpg.envs import AgentSpaces, EnvPool, StepResult

FieldSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]


def transition_fields(spaces: AgentSpaces, dtype: torch.dtype) -> FieldSpecs:
    """The fields of a multi-agent transition (module docstring) for ``spaces``, as ``{name:
    (shape per row, dtype)}``."""
    n = spaces.num_agents
    agents_obs, state, per_agent = (n, spaces.obs_size), (spaces.state_size,), (n,)
    return {
        "obs": (agents_obs, dtype),
        "state": (state, dtype),
        "alive": (per_agent, dtype),
        "actions": ((n, spaces.action_size), dtype),
        "reward": (per_agent, dtype),
        "terminated": (per_agent, dtype),
        "next_obs": (agents_obs, dtype),
        "next_state": (state, dtype),
        "next_present": (per_agent, dtype),
    }


class ReplayBuffer:
    """A ring buffer of ``capacity`` rows; each field is one preallocated tensor ``[capacity,
    *shape]``. Adding past the capacity overwrites the oldest rows. Sampling is uniform with
    replacement over the filled rows, drawn from a numpy ``Generator`` so that a run that saves
    the generator's state resumes exactly."""

    def __init__(self, capacity: int, fields: FieldSpecs, device: torch.device | str = "cpu"):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"replay capacity must be a positive int, got {capacity!r}")
        if not fields:
            raise ValueError("a replay buffer needs at least one field")
        self.capacity = capacity
        self.fields = {name: (tuple(shape), dtype) for name, (shape, dtype) in fields.items()}
        row_bytes = sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.fields.values())
        available = _memory_bytes(torch.device(device))
        if capacity * row_bytes > available:
            raise ValueError(
                f"a replay buffer of {capacity} rows of {row_bytes} bytes needs {capacity * row_bytes / 2**30:.1f} GiB, more than "
                f"the {available / 2**30:.1f} GiB of {device} memory; lower the buffer size"
            )
        self.storage = {
            name: torch.zeros((capacity, *shape), dtype=dtype, device=device) for name, (shape, dtype) in self.fields.items()
        }
        self.size = 0
        self.position = 0  # the row the next addition writes

    def __len__(self) -> int:
        return self.size

    def add(self, rows: dict[str, Any]) -> None:
        """Appends ``rows``: every field, each ``[n, *shape]`` (tensors or numpy arrays)."""
        missing, unknown = sorted(set(self.fields) - set(rows)), sorted(set(rows) - set(self.fields))
        if missing or unknown:
            raise ValueError(
                f"replay rows must have exactly the fields {', '.join(self.fields)}; missing {missing}, unknown {unknown}"
            )
        count = None
        staged = {}
        for name, (shape, dtype) in self.fields.items():
            value = torch.as_tensor(rows[name], dtype=dtype, device=self.storage[name].device)
            if value.dim() != len(shape) + 1 or tuple(value.shape[1:]) != shape:
                raise ValueError(f"replay field {name!r} must be [rows, {', '.join(map(str, shape))}], got {tuple(value.shape)}")
            if count is None:
                count = value.shape[0]
            elif value.shape[0] != count:
                raise ValueError(f"replay fields have different row counts: {name!r} has {value.shape[0]}, others {count}")
            staged[name] = value[-self.capacity:]
        written = min(count, self.capacity)
        indices = (self.position + torch.arange(written)) % self.capacity
        for name, value in staged.items():
            self.storage[name][indices.to(value.device)] = value
        self.position = (self.position + written) % self.capacity
        self.size = min(self.size + written, self.capacity)

    def sample(self, batch_size: int, generator: np.random.Generator) -> dict[str, Tensor]:
        """``batch_size`` rows drawn uniformly with replacement: ``{field: [batch_size, *shape]}``."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer; add transitions first")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        indices = torch.as_tensor(generator.integers(0, self.size, size=batch_size))
        return {name: tensor[indices.to(tensor.device)] for name, tensor in self.storage.items()}

    def state_dict(self) -> dict[str, Any]:
        """The filled rows (copied) and the write position; an empty buffer costs nothing."""
        return {
            "capacity": self.capacity,
            "size": self.size,
            "position": self.position,
            "storage": {name: tensor[: self.size].clone() for name, tensor in self.storage.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(
                f"the saved replay buffer holds {state['capacity']} rows, this one {self.capacity}; use the same capacity"
            )
        if set(state["storage"]) != set(self.fields):
            raise ValueError(f"the saved replay buffer has fields {sorted(state['storage'])}, this one {sorted(self.fields)}")
        for name, saved in state["storage"].items():
            if tuple(saved.shape) != (state["size"], *self.fields[name][0]):
                raise ValueError(
                    f"saved replay field {name!r} has shape {tuple(saved.shape)}, expected {(state['size'], *self.fields[name][0])}"
                )
        for name, saved in state["storage"].items():
            self.storage[name][: state["size"]] = saved.to(self.storage[name].device, self.storage[name].dtype)
            self.storage[name][state["size"]:] = 0
        self.size, self.position = state["size"], state["position"]


def _memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class _LastStepRecorder:
    """A transparent wrapper of one environment copy that keeps what its last ``step`` returned.

    EnvPool resets a copy as soon as its episode ends and keeps only the observations of agents
    that go on; a bootstrapped target needs the final observations too (the target actors act on
    them) and the final global state."""

    def __init__(self, env: Any):
        self.env = env
        self.last_obs: dict[str, Any] = {}
        self.ended = False
        self.final_state: np.ndarray | None = None

    def step(self, actions: dict[str, Any]):
        obs, rewards, terminations, truncations, infos = self.env.step(actions)
        self.last_obs = obs
        self.ended = not self.env.agents
        self.final_state = None
        if self.ended:
            try:
                self.final_state = np.asarray(self.env.state(), dtype=np.float32).reshape(-1)
            except NotImplementedError:
                pass  # the collector falls back to the observations, as EnvPool does
        return obs, rewards, terminations, truncations, infos

    def __getattr__(self, name: str) -> Any:
        if name == "env":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.env, name)


class TransitionCollector:
    """Steps an :class:`EnvPool` and returns each step's transitions as replay rows (one per copy),
    with the next observations and state taken before the pool's automatic reset.

    It wraps the pool's environment copies (``pool.envs``) in recorders of their last step; the
    pool steps them as before.
    """

    def __init__(self, pool: EnvPool):
        self.pool = pool
        spaces = pool.spaces
        self._index = {name: i for i, name in enumerate(spaces.names)}
        self._obs_sizes = spaces.obs_sizes
        self._recorders = []
        for c, env in enumerate(pool.envs):
            recorder = env if isinstance(env, _LastStepRecorder) else _LastStepRecorder(env)
            pool.envs[c] = recorder
            self._recorders.append(recorder)

    def step(self, env_actions: np.ndarray) -> tuple[StepResult, dict[str, np.ndarray]]:
        """Steps every copy with ``env_actions`` (EnvPool's format). Returns the pool's result and
        the rows of every field except ``actions``, which the caller adds in its own encoding."""
        pool = self.pool
        obs, state, alive = pool.obs.copy(), pool.state.copy(), pool.alive.copy()
        step = pool.step(env_actions)
        next_obs = np.zeros_like(obs)
        has_obs = np.zeros_like(alive)
        ended = np.zeros((pool.copies, 1), dtype=np.float32)
        for c, recorder in enumerate(self._recorders):
            for name, value in recorder.last_obs.items():
                i = self._index[name]
                next_obs[c, i, : self._obs_sizes[i]] = np.asarray(value, dtype=np.float32).reshape(-1)
                has_obs[c, i] = 1.0
            ended[c] = float(recorder.ended)
        truncated = step.done * (1.0 - step.terminated)
        # A copy that ended was reset, so step.alive is the new episode's: only its time-limited agents go on.
        next_present = np.maximum(step.alive * (1.0 - ended), alive * truncated * has_obs)
        next_obs *= next_present[..., None]
        next_state = step.state.copy()
        for c, recorder in enumerate(self._recorders):
            if recorder.ended:
                # Without env.state(), EnvPool's global state is the padded observations of the agents that go on.
                next_state[c] = recorder.final_state if recorder.final_state is not None else next_obs[c].reshape(-1)
        rows = {
            "obs": obs, "state": state, "alive": alive, "reward": step.reward * alive, "terminated": step.terminated * alive,
            "next_obs": next_obs, "next_state": next_state, "next_present": next_present,
        }
        return step, rows
