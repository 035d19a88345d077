"""KPGOptimizer's parameter groups and state dicts as plain functions: the checks of every agent's
group, the exported state (torch.optim's layout), and the staging of a state dict to load, which
checks everything before the optimizer changes anything."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kpg import _ops as ops

__all__ = [
    "StagedState",
    "check_k",
    "check_tensor_lrs",
    "exported_state",
    "is_real",
    "stage_state_dict",
    "validate_groups",
]

# State tensors that only ever hold sums of squares: a negative value is a square root of a negative
# number at the next step (NaN in the parameters), which no gradient check sees coming.
NON_NEGATIVE_STATES = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"})


def is_real(value: Any) -> bool:
    """A real number as torch.optim takes one: Python and NumPy ints and floats, not bools or strings."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


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
        elif not (is_real(lr) and lr >= 0.0 and math.isfinite(lr)):
            raise ValueError(f"Invalid learning rate {lr!r} for agent {agent}: it must be a finite number >= 0")
        m = group["max_grad_norm"]
        if m is not None and not (is_real(m) and m > 0.0):
            raise ValueError(f"Invalid max_grad_norm {m!r} for agent {agent}: it must be > 0, or None for no clipping")
        for name, width, kind, _ in kernel.hyperparameters:
            value = group[name]
            if width > 1:
                if not (isinstance(value, (tuple, list)) and len(value) == width):
                    raise ValueError(f"Invalid {name} value {value!r} for agent {agent}: expected {width} numbers")
                for i, v in enumerate(value):
                    if not (is_real(v) and 0.0 <= v < 1.0):
                        raise ValueError(f"Invalid beta parameter at index {i}: {v} (agent {agent}'s {name})")
            elif kind == "flag":
                if value not in (True, False):
                    raise ValueError(f"Invalid {name} value {value!r} for agent {agent}: it must be True or False")
            elif not (is_real(value) and math.isfinite(value)):
                raise ValueError(f"Invalid {name} value: {value!r}; it must be a finite number (agent {agent})")
            elif kind == "non_negative" and not value >= 0.0:
                raise ValueError(f"Invalid {name} value: {value} (agent {agent}); it must be >= 0")
    agent, message = _invalid_row(kernel, groups)
    if agent >= 0:
        raise ValueError(f"{message} (agent {agent})")


def check_tensor_lrs(values: Tensor, agents: Sequence[Sequence[int]]) -> None:
    """Raises ValueError naming the agents if a tensor lr (``values[i]``, read by ``agents[i]``) is
    NaN, infinite or negative: it may have been changed in place (``lr.fill_``) since it was set, and
    the kernels would take it as it is (ascent, or NaN weights)."""
    bad = ~(torch.isfinite(values) & (values >= 0.0))
    if not bool(bad.any()):
        return
    index = int(bad.nonzero()[0, 0])
    who = ", ".join(map(str, agents[index]))
    raise ValueError(
        f"Invalid learning rate {float(values[index])!r} in the tensor lr of agent(s) {who}: it must be a finite "
        "number >= 0; it was changed in place (fill_, a scheduler) after it was set; nothing was stepped"
    )


def _invalid_row(kernel: ops.OptimizerKernel, groups: Sequence[dict[str, Any]]) -> tuple[int, str]:
    rows = np.array([kernel.row(g) for g in groups], dtype=np.float64).reshape(len(groups), -1)
    return ops.invalid_row(kernel, rows)


def exported_state(
    state: dict[str, Any], param_groups: Sequence[dict[str, Any]], live: Tensor, kernel: ops.OptimizerKernel
) -> dict[str, Any]:
    """torch.optim's ``state`` entries of ``Optimizer.state_dict()`` with tensors copied out of the
    arena: ``step`` and the scalar state (NAdam's ``mu_product``) always; a state tensor a parameter
    has not used yet (``live`` [pieces, states] is 0, the pieces numbered as the groups' parameters)
    is left out, as torch.optim keeps none."""
    live = live.cpu()
    state_names, always = kernel.state_names, ("step", *kernel.scalar_names)
    exported = dict(state)
    index = 0
    for group in param_groups:
        for _ in group["params"]:
            entry = state.get(index, {})
            exported[index] = {
                name: t.clone()
                for name, t in entry.items()
                if name in always or (name in state_names and live[index, state_names.index(name)])
            }
            index += 1
    return exported


@dataclass
class StagedState:
    """A checked state dict, ready to copy in: nothing in it can fail."""

    groups: list[dict[str, Any]]  # every agent's group settings, merged over the current ones
    tensors: list[tuple[int, str, int, Tensor]]  # (agent, state name, parameter position, value)
    steps: Tensor  # [pieces] float64 on the CPU: every agent's parameters, in the groups' order
    live: Tensor  # [pieces, states] uint8 on the CPU
    scalars: dict[str, Tensor]  # scalar state name -> [pieces] float64 on the CPU (initial where not saved)
    k: int | None  # the saved k, if any
    nonfinite: str | None  # the saved nonfinite policy, if any


def stage_state_dict(
    state_dict: Any,
    param_groups: Sequence[dict[str, Any]],
    kernel: ops.OptimizerKernel,
    optimizer_name: str,
    nonfinite_policies: Sequence[str],
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
    if not isinstance(extra, dict):
        raise ValueError(f"the state dict's 'kpg' entry must be a dict (k, optimizer, nonfinite), got {extra!r}")
    if extra.get("optimizer", optimizer_name) != optimizer_name:
        raise ValueError(f"the state dict is for optimizer {extra['optimizer']!r}, this one is {optimizer_name!r}")
    if "k" in extra:
        check_k(extra["k"])
    if "nonfinite" in extra and extra["nonfinite"] not in nonfinite_policies:
        raise ValueError(
            f"the state dict's nonfinite={extra['nonfinite']!r} is not one of "
            f"{', '.join(map(repr, nonfinite_policies))}"
        )
    _check_same_optimizer(state_dict, kernel, optimizer_name)
    merged = [
        {**own, **{key: value for key, value in saved.items() if key != "params"}}
        for own, saved in zip(param_groups, groups)
    ]
    for group in merged:
        if is_real(group["lr"]):
            group["lr"] = float(group["lr"])
    validate_groups(kernel, merged)
    names = kernel.state_names
    staged: list[tuple[int, str, int, Tensor]] = []
    pieces = sum(len(group["params"]) for group in param_groups)
    steps = torch.zeros(pieces, dtype=torch.float64)
    live = torch.zeros(pieces, ops.MAX_STATES, dtype=torch.uint8)
    scalars = {name: torch.full((pieces,), initial, dtype=torch.float64) for name, initial in kernel.scalar_states}
    piece = 0
    for agent, (group, saved_group) in enumerate(zip(param_groups, groups)):
        if len(saved_group["params"]) != len(group["params"]):
            raise ValueError(
                f"agent {agent} has {len(group['params'])} parameters, the state dict {len(saved_group['params'])}"
            )
        for position, (p, saved_id) in enumerate(zip(group["params"], saved_group["params"])):
            saved = {n: v for n, v in state_dict["state"].get(saved_id, {}).items() if v is not None}
            present = [n for n in names if n in saved]
            if present:
                # torch.optim's SGD keeps no step count: a saved momentum buffer means "stepped".
                steps[piece + position] = _checked_step(saved.get("step", 1.0), agent)
            elif "step" in saved:
                steps[piece + position] = _checked_step(saved["step"], agent)
            for name in present:
                live[piece + position, names.index(name)] = 1
            for name in kernel.scalar_names:
                if name in saved:
                    scalars[name][piece + position] = _checked_scalar(saved[name], name, agent)
                elif present:
                    raise ValueError(
                        f"agent {agent}'s saved state has {', '.join(map(repr, present))} but no {name!r}, which "
                        f"{optimizer_name!r} keeps beside them (torch.optim's too): the state dict is of another "
                        f"optimizer or was edited; load it into the optimizer that wrote it"
                    )
            for name in present:
                value = torch.as_tensor(saved[name])
                if not value.is_floating_point():
                    raise ValueError(
                        f"{name!r} of agent {agent}'s parameter is a {value.dtype} tensor; optimizer state is "
                        "floating-point"
                    )
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
                if name in NON_NEGATIVE_STATES and bool((value < 0).any()):
                    raise ValueError(
                        f"{name!r} of agent {agent}'s parameter of shape {tuple(p.shape)} holds negative values "
                        f"(min {float(value.min())!r}); it is a running sum of squares, >= 0 in any run, and a "
                        "negative value turns the parameters into NaN at the next step: the state dict was edited "
                        "or corrupted"
                    )
                staged.append((agent, name, position, value))
        piece += len(group["params"])
    return StagedState(merged, staged, steps, live, scalars, extra.get("k"), extra.get("nonfinite"))


def _checked_scalar(value: Any, name: str, agent: int) -> float:
    """A saved scalar state (NAdam's mu_product) as a float, refused unless it is one finite number."""
    if isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point() or is_real(value):
        number = float(value)
    else:
        shape = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else repr(value)
        raise ValueError(f"agent {agent}'s saved {name!r} is {shape}; expected one floating-point number")
    if not math.isfinite(number):
        raise ValueError(
            f"agent {agent}'s saved {name!r} is {number!r}; it must be finite: the saved run had already diverged "
            "or the state dict was edited"
        )
    return number


def _checked_step(value: Any, agent: int) -> float:
    """A saved step count as a float, refused unless it is one finite number >= 0."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(
                f"agent {agent}'s saved 'step' is a tensor of shape {tuple(value.shape)}; expected one number"
            )
        number = float(value)
    elif is_real(value):
        number = float(value)
    else:
        raise ValueError(f"agent {agent}'s saved 'step' is {value!r}; expected a number of steps taken")
    if not (math.isfinite(number) and number >= 0.0):
        raise ValueError(
            f"agent {agent}'s saved 'step' is {number!r}; a step count is a finite number >= 0 (Adam's bias "
            "correction divides by 1 - beta**step, which a negative or non-finite count turns into inf or NaN)"
        )
    return number


def _check_same_optimizer(state_dict: dict[str, Any], kernel: ops.OptimizerKernel, optimizer_name: str) -> None:
    """Refuses a state dict written by another optimizer (torch.optim's SGD into kpg's Adam): its groups
    hold hyperparameters, or its state tensors, that only other optimizers have; they would be taken
    as settings of this one, or dropped, in silence."""
    own_keys = {name for name, *_ in kernel.hyperparameters}
    others = [entry for entry in ops.OPTIMIZERS.values() if entry.kernel is not kernel]
    foreign_keys = {key for entry in others for key in entry.defaults} - own_keys
    foreign_states = {name for entry in others for name in (*entry.kernel.state_names, *entry.kernel.scalar_names)} - {
        *kernel.state_names,
        *kernel.scalar_names,
    }
    keys = {key for group in state_dict["param_groups"] if isinstance(group, dict) for key in group}
    states = {name for saved in state_dict["state"].values() if isinstance(saved, dict) for name in saved}
    found = sorted(keys & foreign_keys) + sorted(states & foreign_states)
    if not found:
        return
    # The optimizer whose hyperparameters the groups hold, the most specific one (NAdam's include RAdam's).
    sources = [entry for entry in others if set(entry.defaults) <= keys]
    source = max(sources, key=lambda entry: len(entry.defaults)).name if sources else None
    looks_like = f"a state dict of {source!r}" if source else "another optimizer's state dict"
    fix = f"load it into KPGOptimizer(..., optimizer={source!r})" if source else "load it into that optimizer"
    raise ValueError(
        f"the state dict holds {', '.join(map(repr, found))}, which {optimizer_name!r} does not have: it looks like "
        f"{looks_like}; {fix}, or build this optimizer's state by training with it"
    )
