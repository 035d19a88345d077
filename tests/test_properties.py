"""Property tests: the kernels against kpg.reference on drawn layouts, dtypes, optimizers and
hyperparameters, zero and extreme values included.

float64 must match the reference to rounding (the same operations in the same order); float32 must
be as accurate as the float32 reference, both measured against the reference run in float64 on the
same (upcast) inputs. The hypothesis profile comes from conftest.py ("ci": 40 derandomized examples).
"""

import copy
from dataclasses import dataclass

import torch
from hypothesis import given
from hypothesis import strategies as st

from kpg import _ops as ops
from kpg import reference

from helpers import (
    HYPER,
    RTOL,
    Arena,
    agent_grad_norms_of_kernel_and_reference,
    assert_as_accurate_as,
    assert_close_to_scale,
    rows,
)

DTYPES = st.sampled_from([torch.float32, torch.float64])
# Any size up to 3000; sizes next to multiples of 4 (the float32 vector width) and tiny ones are
# drawn on purpose, since they end in the scalar tails of vector loops.
SEGMENT_SIZES = st.one_of(
    st.integers(0, 3000),
    st.builds(lambda k, d: max(4 * k + d, 0), st.integers(0, 750), st.sampled_from([-1, 0, 1])),
    st.integers(0, 5),
)


@dataclass
class Problem:
    kind: str
    hyper: dict
    commit: bool
    arena: Arena
    chunk_elems: int | None

    def __repr__(self) -> str:
        a = self.arena
        sizes = [end - begin for begin, end in zip(a.offsets, a.offsets[1:])]
        optional = {
            name: None if t is None else t.tolist() for name, t in (("grad_scale", a.grad_scale), ("skip", a.skip))
        }
        return (
            f"Problem({self.kind} {'commit' if self.commit else 'anticipate'} {a.param.dtype} {self.hyper} "
            f"sizes={sizes} chunk_elems={self.chunk_elems} steps={a.step.tolist()} lr={a.lr.tolist()} {optional})"
        )


@st.composite
def update_problems(draw):
    kind = draw(st.sampled_from(sorted(HYPER)))
    hyper = draw(HYPER[kind])
    sizes = draw(st.lists(SEGMENT_SIZES, min_size=1, max_size=40))
    dtype = draw(DTYPES)
    num_agents = len(sizes)
    arena = Arena(kind, sizes, dtype, seed=draw(st.integers(0, 2**16)), warm_steps=draw(st.integers(0, 2)))
    # Chunks smaller than an agent split it between threads; 1 and 7 put chunk edges everywhere.
    chunk_elems = draw(st.sampled_from([None, 1, 7, 1000]))
    arena.chunks, arena.agent_chunks = ops.chunk_table(arena.offsets, chunk_elems=chunk_elems)
    per_agent = lambda values: st.lists(values, min_size=num_agents, max_size=num_agents)  # noqa: E731
    arena.lr = torch.tensor(draw(per_agent(st.sampled_from([0.0, 1e-4, 0.01, 0.3, 1.0]))), dtype=torch.float64)
    scales = draw(st.none() | per_agent(st.sampled_from([0.0, 1e-3, 0.5, 1.0, 7.0])))
    arena.grad_scale = None if scales is None else torch.tensor(scales, dtype=torch.float64)
    skips = draw(st.none() | per_agent(st.booleans()))
    arena.skip = None if skips is None else torch.tensor(skips, dtype=torch.uint8)
    return Problem(kind, hyper, draw(st.booleans()), arena.warm_up(kind, hyper), chunk_elems)


def _run(module, problem: Problem, arena: Arena) -> dict[str, torch.Tensor]:
    anticipated = torch.full_like(arena.param, 123.0)
    if problem.commit:
        module.UPDATE_OPS[(problem.kind, True)](**arena.commit_args(), **rows(problem.kind, problem.hyper, arena.step))
    else:
        module.UPDATE_OPS[(problem.kind, False)](
            **arena.anticipate_args(anticipated), **rows(problem.kind, problem.hyper, arena.step)
        )
    return {**arena.tensors(), "anticipated": anticipated}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor: equal bits, NaN included."""
    return tensor.view(torch.uint8)


@given(problem=update_problems())
def test_update_matches_reference(problem):
    kernel = _run(ops, problem, copy.deepcopy(problem.arena))
    expected = _run(reference, problem, copy.deepcopy(problem.arena))
    dtype = problem.arena.param.dtype
    truth = _run(reference, problem, problem.arena.upcast()) if dtype != torch.float64 else None
    for name, value in expected.items():
        if truth is None:
            assert_close_to_scale(kernel[name], value, RTOL[dtype], what=name)
        else:
            assert_as_accurate_as(kernel[name], value, truth[name], RTOL[dtype], what=name)


@given(problem=update_problems())
def test_anticipate_writes_what_commit_would_and_nothing_else(problem):
    """The level parameters of anticipate are bit-identical to the parameters commit leaves, and
    anticipate leaves the base parameters, the state and the step counts as they were."""
    before = copy.deepcopy(problem.arena)
    anticipating, committing = copy.deepcopy(before), copy.deepcopy(before)
    anticipated = torch.full_like(before.param, 123.0)
    ops.UPDATE_OPS[(problem.kind, False)](
        **anticipating.anticipate_args(anticipated), **rows(problem.kind, problem.hyper, anticipating.step)
    )
    ops.UPDATE_OPS[(problem.kind, True)](
        **committing.commit_args(), **rows(problem.kind, problem.hyper, committing.step)
    )
    assert torch.equal(_bits(anticipated), _bits(committing.param))
    for name, value in anticipating.tensors().items():
        assert torch.equal(_bits(value), _bits(before.tensors()[name])), f"anticipate changed {name}"


@given(
    sizes=st.lists(SEGMENT_SIZES, min_size=1, max_size=40),
    dtype=DTYPES,
    chunk_elems=st.sampled_from([None, 1, 7, 1000]),
    clip=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_agent_grad_norms_match_reference(sizes, dtype, chunk_elems, clip, seed):
    arena = Arena("sgd", sizes, dtype, seed=seed)
    chunks, agent_chunks = ops.chunk_table(arena.offsets, chunk_elems=chunk_elems)
    a = len(sizes)
    max_norm = torch.rand(a, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 40 if clip else None
    agent_grad_norms_of_kernel_and_reference(arena, max_norm, chunks, agent_chunks)
