"""nonfinite="raise"'s probe (NOTE [Probe before commit] in csrc/kpg/update.h): the probe op flags
exactly the agents whose commit would write an inf or NaN parameter or state value, and writes
nothing else; a step whose commit would do so raises and changes nothing, for every optimizer."""

import copy

import pytest
import torch
from cases import CONFIGS, UPDATE_CASES
from torch import nn

import kpg
from kpg import _ops as ops
from kpg import reference

from helpers import Arena, rows

# Agent 1 spans several CPU and CUDA chunks; its overflowing element sits in a later one.
SIZES = [5, 40000, 7, 3]
OVERFLOWING_ELEMENT = 5 + 30000
# A gradient and an lr whose product, or the gradient's square, is beyond the dtype's range.
HUGE_GRAD = {torch.float32: 1e30, torch.float64: 1e200}
HUGE_LR = {torch.float32: 1e20, torch.float64: 1e300}


def _nonfinite_agents(arena) -> list[int]:
    """Per agent, 1 if a parameter or state value of its segment is inf or NaN."""
    flags = []
    for begin, end in zip(arena.offsets, arena.offsets[1:]):
        tensors = [arena.param, *arena.states.values()]
        flags.append(int(not all(bool(torch.isfinite(t[begin:end]).all()) for t in tensors)))
    return flags


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", UPDATE_CASES)
def test_probe_flags_exactly_the_agents_whose_commit_would_write_inf_or_nan(case, dtype, device):
    kind, hyper = UPDATE_CASES[case]
    arena = Arena(kind, SIZES, dtype, seed=4, device=device).warm_up(kind, hyper)
    arena.skip = torch.tensor([0, 0, 0, 1], dtype=torch.uint8, device=device)  # agent 3 is skipped: not flagged
    arena.lr[1] = arena.lr[3] = HUGE_LR[dtype]
    arena.grad[OVERFLOWING_ELEMENT] = arena.grad[-1] = HUGE_GRAD[dtype]
    before = {name: t.clone() for name, t in {**arena.commit_args(), "grad": arena.grad}.items() if t is not None}
    flags = torch.ones(len(SIZES), dtype=torch.uint8, device=device)  # the probe clears what it does not set
    ops.PROBE_OPS[kind](**arena.commit_args(), **rows(kind, hyper, arena.step), nonfinite=flags)
    for name, tensor in {**arena.commit_args(), "grad": arena.grad}.items():
        if tensor is not None:
            assert torch.equal(tensor, before[name]), f"the probe changed {name}"
    committed = copy.deepcopy(arena)
    reference.UPDATE_OPS[(kind, True)](**committed.commit_args(), **rows(kind, hyper, committed.step))
    expected = _nonfinite_agents(committed)
    assert expected == [0, 1, 0, 0], "the problem should overflow agent 1's commit only"
    assert flags.tolist() == expected


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("case", CONFIGS)
def test_a_commit_that_would_overflow_raises_naming_the_agent_and_changes_nothing(case, k):
    """float32 weights; agent 1's gradient (1e25) and lr (1e20) are finite, its commit is not: a
    squared gradient or lr * gradient beyond float32's range."""
    info, config = CONFIGS[case]
    torch.manual_seed(0)
    weights = [nn.Parameter(torch.randn(4)) for _ in range(3)]
    opt = kpg.KPGOptimizer([[w] for w in weights], k=k, optimizer=info.name, **{"lr": 0.01, **config.hyper})
    slopes = torch.tensor([1.0, 1.0, 1.0])

    def closure(ctx):
        return torch.stack([(w * s).sum() + w.square().sum() for w, s in zip(weights, slopes)])

    opt.step(closure)  # the state tensors become live
    slopes[1] = 1e25
    opt.param_groups[1]["lr"] = 1e20
    state = opt.agent_state
    before = [w.detach().clone() for w in weights]
    buffers = {n: b.clone() for n, b in state.state_buffers.items() if b is not None}
    step, live = state.step.clone(), state.live.clone()
    message = r"agent 1's parameters or optimizer state inf or NaN.*nothing changed"
    with pytest.raises(FloatingPointError, match=message):
        opt.step(closure)
    assert all(torch.equal(w, b) for w, b in zip(weights, before))
    assert all(torch.equal(state.state_buffers[n], b) for n, b in buffers.items())
    assert torch.equal(state.step, step) and torch.equal(state.live, live)
    opt.param_groups[1]["lr"] = 0.01
    slopes[1] = 1.0
    opt.step(closure)
    assert all(bool(torch.isfinite(w).all()) for w in weights) and not torch.equal(weights[0], before[0])
