"""KPGOptimizer's parameter groups and state dicts as plain functions: the checks of every agent's
group, the exported state (torch.optim's layout), and the staging of a state dict to load, which
checks everything before the optimizer changes anything."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kpg import _ops as ops

__all__ = ["StagedState", "check_k", "exported_state", "stage_state_dict", "validate_groups"]


def check_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(
            f"k must be an int >= 1 (k=1 is the plain optimizer step, k=2 the practical default), got {k!r}"
        )


def validate_groups(kernel: ops.OptimizerKernel, groups: Sequence[dict[str, Any]]) -> None:
    """torch.optim's checks of every agent's group, and the values kpg cannot take: a bad value
    raises naming the agent; infinite or NaN coefficients would turn every parameter into inf or
    NaN in one step, and no gradient check sees it coming."""
    for agent, group in enumerate(groups):
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if lr.numel() != 1 or not lr.is_floating_point():
                raise ValueError(
                    f"Invalid learning rate for agent {agent}: a tensor lr must hold one "
                    f"floating-point value, got {lr.dtype} of shape {tuple(lr.shape)}"
                )
            if lr.device.type == "cpu" and not (float(lr) >= 0.0 and math.isfinite(float(lr))):
                raise ValueError(
                    f"Invalid learning rate {float(lr)!r} for agent {agent}: it must be a finite number >= 0"
                )
        elif isinstance(lr, bool) or not (isinstance(lr, (int, float)) and lr >= 0.0 and math.isfinite(lr)):
            raise ValueError(f"Invalid learning rate {lr!r} for agent {agent}: it must be a finite number >= 0")
        m = group["max_grad_norm"]
        if m is not None and not (isinstance(m, (int, float)) and m > 0.0):
            raise ValueError(f"Invalid max_grad_norm {m!r} for agent {agent}: it must be > 0, or None for no clipping")
        for name, width, kind, _ in kernel.hyperparameters:
            value = group[name]
            if width > 1:
                if not (isinstance(value, (tuple, list)) and len(value) == width):
                    raise ValueError(f"Invalid {name} value {value!r} for agent {agent}: expected {width} numbers")
                for i, v in enumerate(value):
                    if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
                        raise ValueError(f"Invalid beta parameter at index {i}: {v} (agent {agent}'s {name})")
            elif kind == "flag":
                if value not in (True, False):
                    raise ValueError(f"Invalid {name} value {value!r} for agent {agent}: it must be True or False")
            elif not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
                raise ValueError(f"Invalid {name} value: {value!r}; it must be a finite number (agent {agent})")
            elif kind == "non_negative" and not value >= 0.0:
                raise ValueError(f"Invalid {name} value: {value} (agent {agent}); it must be >= 0")
    agent, message = _invalid_row(kernel, groups)
    if agent >= 0:
        raise ValueError(f"{message} (agent {agent})")


def _invalid_row(kernel: ops.OptimizerKernel, groups: Sequence[dict[str, Any]]) -> tuple[int, str]:
    rows = np.array([kernel.row(g) for g in groups], dtype=np.float64).reshape(len(groups), -1)
    return ops.invalid_row(kernel, rows)


def exported_state(
    state: dict[str, Any], param_groups: Sequence[dict[str, Any]], live: Tensor, state_names: Sequence[str]
) -> dict[str, Any]:
    """torch.optim's ``state`` entries of ``Optimizer.state_dict()`` with tensors copied out of the
    arena; a state tensor an agent has not used yet (``live`` [agents, states] is 0) is left out,
    as torch.optim keeps none."""
    live = live.cpu()
    exported = dict(state)
    index = 0
    for agent, group in enumerate(param_groups):
        for _ in group["params"]:
            entry = state.get(index, {})
            exported[index] = {
                name: t.clone()
                for name, t in entry.items()
                if name == "step" or (name in state_names and live[agent, state_names.index(name)])
            }
            index += 1
    return exported


@dataclass
class StagedState:
    """A checked state dict, ready to copy in: nothing in it can fail."""

    groups: list[dict[str, Any]]  # every agent's group settings, merged over the current ones
    tensors: list[tuple[int, str, int, Tensor]]  # (agent, state name, parameter position, value)
    steps: Tensor  # [agents] float64 on the CPU
    live: Tensor  # [agents, states] uint8 on the CPU
    k: int | None  # the saved k, if any


def stage_state_dict(
    state_dict: Any, param_groups: Sequence[dict[str, Any]], kernel: ops.OptimizerKernel, optimizer_name: str
) -> StagedState:
    """Checks a KPGOptimizer or torch.optim state dict of optimizer ``optimizer_name`` against the
    optimizer's ``param_groups`` (one per agent) and stages what loading it copies in."""
    if (
        not isinstance(state_dict, dict)
        or not isinstance(state_dict.get("param_groups"), list)
        or not isinstance(state_dict.get("state"), dict)
    ):
        keys = f" with keys {sorted(map(str, state_dict))}" if isinstance(state_dict, dict) else ""
        raise ValueError(
            f"load_state_dict needs an optimizer state dict (a dict with 'state' and 'param_groups', as state_dict() "
            f"returns), got {type(state_dict).__name__}{keys}"
        )
    groups = state_dict["param_groups"]
    if len(groups) != len(param_groups):
        raise ValueError(
            f"the state dict has {len(groups)} parameter groups, this optimizer {len(param_groups)} (one per agent)"
        )
    extra = state_dict.get("kpg", {})
    if extra.get("optimizer", optimizer_name) != optimizer_name:
        raise ValueError(f"the state dict is for optimizer {extra['optimizer']!r}, this one is {optimizer_name!r}")
    if "k" in extra:
        check_k(extra["k"])
    merged = [
        {**own, **{key: value for key, value in saved.items() if key != "params"}}
        for own, saved in zip(param_groups, groups)
    ]
    for group in merged:
        if isinstance(group["lr"], (int, float)) and not isinstance(group["lr"], bool):
            group["lr"] = float(group["lr"])
    validate_groups(kernel, merged)
    names = kernel.state_names
    staged: list[tuple[int, str, int, Tensor]] = []
    steps = torch.zeros(len(param_groups), dtype=torch.float64)
    live = torch.zeros(len(param_groups), ops.MAX_STATES, dtype=torch.uint8)
    for agent, (group, saved_group) in enumerate(zip(param_groups, groups)):
        if len(saved_group["params"]) != len(group["params"]):
            raise ValueError(
                f"agent {agent} has {len(group['params'])} parameters, the state dict {len(saved_group['params'])}"
            )
        agent_steps, agent_live = set(), set()
        for position, (p, saved_id) in enumerate(zip(group["params"], saved_group["params"])):
            saved = {n: v for n, v in state_dict["state"].get(saved_id, {}).items() if v is not None}
            present = frozenset(n for n in names if n in saved)
            agent_live.add(present)
            if present:
                # torch.optim's SGD keeps no step count: a saved momentum buffer means "stepped".
                agent_steps.add(float(saved.get("step", 1.0)))
            elif "step" in saved:
                agent_steps.add(float(saved["step"]))
            for name in present:
                value = torch.as_tensor(saved[name])
                if value.shape != p.shape:
                    raise ValueError(
                        f"{name!r} of agent {agent}'s parameter has shape {tuple(value.shape)}, "
                        f"expected {tuple(p.shape)}"
                    )
                if not bool(torch.isfinite(value).all()):
                    raise ValueError(
                        f"{name!r} of agent {agent}'s parameter of shape {tuple(p.shape)} holds inf or NaN: the "
                        "saved run had already diverged; load an earlier state dict"
                    )
                staged.append((agent, name, position, value))
        if len(agent_steps) > 1:
            raise ValueError(
                f"agent {agent}'s parameters have different step counts {sorted(agent_steps)}; kpg steps an agent as a "
                "whole"
            )
        if len(agent_live) > 1:
            raise ValueError(
                f"agent {agent}'s parameters hold different state tensors ({sorted(map(sorted, agent_live))}); kpg "
                "steps an agent as a whole"
            )
        steps[agent] = agent_steps.pop() if agent_steps else 0.0
        for name in agent_live.pop() if agent_live else ():
            live[agent, names.index(name)] = 1
    return StagedState(merged, staged, steps, live, extra.get("k"))
