"""Replay for the off-policy trainers (MADDPG, FACMAC): a preallocated ring buffer of multi-agent
transitions, and the rows of one :class:`~kpg.envs.EnvPool` step.

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

A pool whose global state is every agent's observation (VMAS, ``state_is_observations``) stores no
``state`` and ``next_state``: :func:`with_observation_states` makes them views of the sampled
``obs`` and ``next_obs``, so the buffer holds each observation once.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kpg.envs import AgentSpaces, StepResult

FieldSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]
Array = np.ndarray | Tensor
# The fields a pool whose state is every agent's observation does not store (module docstring).
STATE_FIELDS = ("state", "next_state")


def transition_fields(spaces: AgentSpaces, dtype: torch.dtype, state_is_observations: bool = False) -> FieldSpecs:
    """The fields of a multi-agent transition (module docstring) for ``spaces``, as ``{name:
    (shape per row, dtype)}``; without :data:`STATE_FIELDS` where ``state_is_observations``."""
    n = spaces.num_agents
    agents_obs, state, per_agent = (n, spaces.obs_size), (spaces.state_size,), (n,)
    fields = {
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
    if state_is_observations:
        for name in STATE_FIELDS:
            del fields[name]
    return fields


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
                f"a replay buffer of {capacity} rows of {row_bytes} bytes needs "
                f"{capacity * row_bytes / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB of {device} "
                "memory; lower the buffer size"
            )
        self.storage = {
            name: torch.zeros((capacity, *shape), dtype=dtype, device=device)
            for name, (shape, dtype) in self.fields.items()
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
                f"replay rows must have exactly the fields {', '.join(self.fields)}; "
                f"missing {missing}, unknown {unknown}"
            )
        count = None
        staged = {}
        for name, (shape, dtype) in self.fields.items():
            value = torch.as_tensor(rows[name], dtype=dtype, device=self.storage[name].device)
            if value.dim() != len(shape) + 1 or tuple(value.shape[1:]) != shape:
                raise ValueError(
                    f"replay field {name!r} must be [rows, {', '.join(map(str, shape))}], got {tuple(value.shape)}"
                )
            if count is None:
                count = value.shape[0]
            elif value.shape[0] != count:
                raise ValueError(
                    f"replay fields have different row counts: {name!r} has {value.shape[0]}, others {count}"
                )
            staged[name] = value[-self.capacity :]
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
        """Loads a :meth:`state_dict` (or :func:`without_rows` of one, leaving the buffer empty)."""
        if state["capacity"] != self.capacity:
            raise ValueError(
                f"the saved replay buffer holds {state['capacity']} rows, this one {self.capacity}; "
                "use the same capacity"
            )
        if set(state["storage"]) != set(self.fields):
            raise ValueError(
                f"the saved replay buffer has fields {sorted(state['storage'])}, this one {sorted(self.fields)}"
            )
        for name, saved in state["storage"].items():
            if tuple(saved.shape) != (state["size"], *self.fields[name][0]):
                raise ValueError(
                    f"saved replay field {name!r} has shape {tuple(saved.shape)}, "
                    f"expected {(state['size'], *self.fields[name][0])}"
                )
        for name, saved in state["storage"].items():
            self.storage[name][: state["size"]] = saved.to(self.storage[name].device, self.storage[name].dtype)
            self.storage[name][state["size"] :] = 0
        self.size, self.position = state["size"], state["position"]


def _memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def transition_rows(obs: Array, state: Array, alive: Array, step: StepResult) -> dict[str, Array]:
    """The replay rows (one per environment copy) of the step from ``obs``, ``state`` and ``alive``
    (the pool's before it) to ``step``, every field except ``actions``, which the caller adds in its
    own encoding. The next observations and state are the step's, taken before any reset. NumPy
    arrays from an EnvPool, or tensors from a tensor pool (a :class:`~kpg.envs.vmas.VMASStep`, which
    has StepResult's fields)."""
    return {
        "obs": obs,
        "state": state,
        "alive": alive,
        "reward": step.reward * alive,
        "terminated": step.terminated * alive,
        "next_obs": step.next_obs,
        "next_state": step.next_state,
        "next_present": step.next_present,
    }


def with_observation_states(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``batch`` with ``state`` and ``next_state`` [rows, agents * obs_size], views of its ``obs`` and
    ``next_obs``: the global state of a pool whose state is every agent's observation."""
    return {**batch, "state": batch["obs"].flatten(1), "next_state": batch["next_obs"].flatten(1)}


def without_rows(state: dict[str, Any]) -> dict[str, Any]:
    """A replay :meth:`ReplayBuffer.state_dict` with its rows dropped: checkpoints without the
    buffer stay small, and a run resumed from one refills it (so it does not continue exactly)."""
    return {**state, "size": 0, "position": 0, "storage": {name: rows[:0] for name, rows in state["storage"].items()}}
