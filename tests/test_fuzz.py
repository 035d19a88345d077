"""Fuzzing against the plain-PyTorch references (hypothesis).

KPGOptimizer is checked against a brute-force KPG (one torch.optim optimizer per agent, state saved
and restored around every intermediate level, ``clip_grad_norm_`` per agent) on drawn agent counts,
parameter sizes (1 and sizes off the vector width included), layouts (per-agent tensors or one
agent-batched tensor), dtypes, optimizers, hyperparameters at zero and extreme values (lr 0, betas
near 1, tiny eps, weight decay), k and clipping thresholds. The kernels get what
test_properties.py does not draw: zero agents and hundreds of tiny ones, non-finite gradients at
drawn positions, and gradient norms from 1e-30 to 1e30 against tiny and huge thresholds.

Profiles (conftest.py): "ci" by default; ``pytest --nightly`` (or KPG_HYPOTHESIS_PROFILE=nightly)
runs the nightly size.
"""

import copy

import torch
from cases import OPTIMIZER_INFO
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import kpg
from kpg import _ops as ops
from kpg import reference

from helpers import (
    HYPER,
    RTOL,
    Arena,
    agent_grad_norms_of_kernel_and_reference,
    assert_as_accurate_as,
    assert_close_to_scale,
    drawn_hyper,
    restore_state,
    rows,
    saved_state,
    torch_optimizer,
)

# Sizes of one agent's tensors: 1, around the float32 (4) and float64 (2) vector widths, odd ones.
TENSOR_SIZES = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 17, 33])
LR = st.sampled_from([0.0, 1e-4, 0.01, 0.3])


@st.composite
def optimizer_settings(draw, dtype):
    """An optimizer of the table (tests/cases.py) and hyperparameters from its fuzz domain."""
    name = draw(st.sampled_from(sorted(OPTIMIZER_INFO)))
    return name, draw(drawn_hyper(name, dtype))


@st.composite
def games(draw):
    num_agents = draw(st.integers(1, 6))
    batched = draw(st.booleans())
    if batched:  # one tensor per parameter, dim 0 the agents: every agent has the same sizes
        sizes = [draw(st.lists(TENSOR_SIZES, min_size=1, max_size=2))] * num_agents
    else:
        sizes = [draw(st.lists(TENSOR_SIZES, min_size=1, max_size=3)) for _ in range(num_agents)]
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    name, hyper = draw(optimizer_settings(dtype))
    lrs = draw(st.lists(LR, min_size=num_agents, max_size=num_agents))
    clip = draw(st.sampled_from([None, 1e-6, 0.1, 10.0]))
    max_norms = None if clip is None else [clip * (1 + a) for a in range(num_agents)]
    return dict(
        num_agents=num_agents,
        batched=batched,
        sizes=sizes,
        optimizer=name,
        hyper=hyper,
        lrs=lrs,
        max_norms=max_norms,
        k=draw(st.integers(1, 4)),
        steps=draw(st.integers(1, 3)),
        dtype=dtype,
        seed=draw(st.integers(0, 2**16)),
    )


class Game:
    """Agent i's loss couples its own parameters (base) with the others' (anticipated):
    L_i = 0.5 |x_i - t_i|^2 + (tanh(x_i) . u_i) * mean_{j != i} tanh(x_j) . w_j, x_i its flat parameters."""

    def __init__(self, spec, dtype):
        g = torch.Generator().manual_seed(spec["seed"])
        self.num_agents, self.batched = spec["num_agents"], spec["batched"]
        sizes = spec["sizes"]
        if self.batched:
            self.tensors = [
                nn.Parameter(torch.randn(self.num_agents, n, generator=g, dtype=torch.float64).to(dtype))
                for n in sizes[0]
            ]
        else:
            self.tensors = [
                [nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64).to(dtype)) for n in agent]
                for agent in sizes
            ]
        widths = [sum(agent) for agent in sizes]
        self.targets = [torch.randn(w, generator=g, dtype=torch.float64).to(dtype) for w in widths]
        self.u = [torch.randn(w, generator=g, dtype=torch.float64).to(dtype) for w in widths]
        self.w = [torch.randn(w, generator=g, dtype=torch.float64).to(dtype) for w in widths]

    def flat(self, agent, tensors=None):
        if tensors is not None:
            return torch.cat(tensors)
        if self.batched:
            return torch.cat([t[agent] for t in self.tensors])
        return torch.cat(list(self.tensors[agent]))

    def losses(self, own, anticipated):
        """own: each agent's flat parameters with gradient; anticipated: the same without."""
        signals = torch.stack([torch.tanh(x) @ w for x, w in zip(anticipated, self.w)])
        others = (signals.sum() - signals) / max(self.num_agents - 1, 1)
        return torch.stack(
            [
                0.5 * (x - t).square().sum() + (torch.tanh(x) @ u) * o
                for x, t, u, o in zip(own, self.targets, self.u, others)
            ]
        )

    def closure(self, ctx):
        own = [self.flat(a) for a in range(self.num_agents)]
        with ctx.anticipated():
            anticipated = [self.flat(a) for a in range(self.num_agents)]
        return self.losses(own, anticipated)

    def agent_tensors(self, agent):
        """Separate tensors for the brute force, copied from agent ``agent``'s share."""
        source = [t[agent] for t in self.tensors] if self.batched else self.tensors[agent]
        return [nn.Parameter(t.detach().clone()) for t in source]


def brute_force(game, spec, dtype):
    """Every agent's parameters after spec["steps"] brute-force KPG steps, and its optimizers."""
    params = [game.agent_tensors(a) for a in range(game.num_agents)]
    optimizers = [torch_optimizer(spec["optimizer"], p, lr, **spec["hyper"]) for p, lr in zip(params, spec["lrs"])]
    for _ in range(spec["steps"]):
        base = [[p.detach().clone() for p in agent] for agent in params]
        anticipated = [game.flat(a, base[a]) for a in range(game.num_agents)]
        for level in range(1, spec["k"] + 1):
            new = []
            for i, (agent, opt) in enumerate(zip(params, optimizers)):
                own = [b.clone().requires_grad_() for b in base[i]]
                own_flat = game.flat(i, own)
                loss = game.losses(
                    [own_flat if j == i else anticipated[j] for j in range(game.num_agents)],
                    [x.detach() for x in anticipated],
                )[i]
                grads = torch.autograd.grad(loss, own)
                saved = saved_state(opt)
                with torch.no_grad():
                    for p, b, grad in zip(agent, base[i], grads):
                        p.copy_(b)
                        p.grad = grad.clone()
                if spec["max_norms"] is not None:
                    torch.nn.utils.clip_grad_norm_(agent, spec["max_norms"][i], foreach=False)
                opt.step()
                new.append(game.flat(i, [p.detach().clone() for p in agent]))
                if level < spec["k"]:
                    restore_state(opt, saved)
            anticipated = new
    return params, optimizers


def kpg_run(game, spec):
    opt = kpg.KPGOptimizer(
        game.tensors,
        agent_dim=0 if game.batched else None,
        k=spec["k"],
        optimizer=spec["optimizer"],
        lr=spec["lrs"],
        max_grad_norm=spec["max_norms"],
        **spec["hyper"],
    )
    for _ in range(spec["steps"]):
        opt.step(game.closure)
    return opt


def kpg_state(game, opt, agent):
    """Agent ``agent``'s parameters and optimizer state in the brute force's layout."""
    tensors = opt.arena.agent_tensors[agent]
    state = [{name: value.clone() for name, value in opt.state[t].items() if name != "step"} for t in tensors]
    return [t.detach().clone() for t in tensors], state


def brute_force_state(params, opt):
    state = [{name: value.clone() for name, value in opt.state[p].items() if name != "step"} for p in params]
    return [p.detach().clone() for p in params], state


def flat_values(entries) -> dict[str, torch.Tensor]:
    """Every agent's parameters, and each state buffer, as one float64 vector per name."""
    named: dict[str, list[torch.Tensor]] = {}
    for params, state in entries:
        named.setdefault("parameters", []).extend(p.flatten() for p in params)
        for buffers in state:
            for name, value in buffers.items():
                named.setdefault(name, []).append(value.flatten())
    return {name: torch.cat(values).double() for name, values in named.items()}


@given(spec=games())
def test_kpg_optimizer_matches_brute_force(spec):
    """float64: equal to rounding. float32: as accurate as the float32 brute force, both against the
    float64 brute force, over all agents at once: with clipping, lr 0.3 and RMSprop's alpha near 1 a
    step moves a parameter by hundreds, so one rounding difference (torch clips in float32, kpg in
    float64) grows alike on both sides, and a one-element tensor is too small a sample of it."""
    dtype = spec["dtype"]
    game = Game(spec, dtype)
    expected_params, expected_opts = brute_force(Game(spec, dtype), spec, dtype)
    opt = kpg_run(game, spec)
    agents = range(spec["num_agents"])
    actual = flat_values(kpg_state(game, opt, a) for a in agents)
    expected = flat_values(brute_force_state(expected_params[a], expected_opts[a]) for a in agents)
    assert actual.keys() == expected.keys()
    if dtype == torch.float64:
        for name in expected:
            assert_close_to_scale(actual[name], expected[name], 1e-10, what=name)
    else:
        truth_params, truth_opts = brute_force(Game(spec, torch.float64), spec, torch.float64)
        truth = flat_values(brute_force_state(truth_params[a], truth_opts[a]) for a in agents)
        for name in expected:
            assert_as_accurate_as(actual[name], expected[name], truth[name], 2e-6, what=name)
    assert all(float(opt.state[opt.arena.agent_tensors[a][0]]["step"]) == spec["steps"] for a in agents)


# ---- kernels -----------------------------------------------------------------------------------


@st.composite
def many_agent_problems(draw):
    """Zero to 300 agents of 0 to 9 elements, non-finite gradients at drawn positions."""
    kind = draw(st.sampled_from(sorted(HYPER)))
    hyper = draw(HYPER[kind])
    sizes = draw(st.lists(st.integers(0, 9), min_size=0, max_size=300))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    arena = Arena(kind, sizes, dtype, seed=draw(st.integers(0, 2**16)), warm_steps=draw(st.integers(0, 2)))
    arena.chunks, arena.agent_chunks = ops.chunk_table(arena.offsets, chunk_elems=draw(st.sampled_from([None, 1, 3])))
    arena.warm_up(kind, hyper)
    n = arena.param.numel()
    if n:
        positions = draw(st.lists(st.integers(0, n - 1), max_size=4))
        for position in positions:
            arena.grad[position] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    return kind, hyper, draw(st.booleans()), arena


@given(problem=many_agent_problems())
def test_kernels_on_zero_to_hundreds_of_tiny_agents_with_nonfinite_gradients(problem):
    kind, hyper, commit, base = problem
    results = []
    for module, arena in ((ops, copy.deepcopy(base)), (reference, copy.deepcopy(base))):
        anticipated = torch.full_like(arena.param, 123.0)
        if commit:
            module.UPDATE_OPS[(kind, True)](**arena.commit_args(), **rows(kind, hyper, arena.step))
        else:
            module.UPDATE_OPS[(kind, False)](**arena.anticipate_args(anticipated), **rows(kind, hyper, arena.step))
        results.append({**arena.tensors(), "anticipated": anticipated})
    dtype = base.param.dtype
    truth = None
    if dtype != torch.float64:
        upcast = base.upcast()
        anticipated = torch.full_like(upcast.param, 123.0)
        args = upcast.commit_args() if commit else upcast.anticipate_args(anticipated)
        reference.UPDATE_OPS[(kind, commit)](**args, **rows(kind, hyper, upcast.step))
        truth = {**upcast.tensors(), "anticipated": anticipated}
    for name, expected in results[1].items():
        if truth is None:
            assert_close_to_scale(results[0][name], expected, RTOL[dtype], what=name)
        else:
            assert_as_accurate_as(results[0][name], expected, truth[name], RTOL[dtype], what=name)


@given(
    sizes=st.lists(st.integers(0, 40), min_size=0, max_size=50),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    magnitude=st.sampled_from([1e-30, 1e-12, 1.0, 1e12, 1e30]),
    threshold=st.sampled_from([None, 1e-12, 0.5, 1e12]),
    nonfinite=st.sampled_from([None, float("nan"), float("inf")]),
    seed=st.integers(0, 2**16),
)
def test_grad_norms_at_extreme_magnitudes_and_thresholds(sizes, dtype, magnitude, threshold, nonfinite, seed):
    arena = Arena("sgd", sizes, dtype, seed=seed)
    arena.grad.mul_(magnitude)
    if nonfinite is not None and arena.grad.numel():
        arena.grad[seed % arena.grad.numel()] = nonfinite
    max_norm = None if threshold is None else torch.full((len(sizes),), threshold, dtype=torch.float64)
    outputs = agent_grad_norms_of_kernel_and_reference(arena, max_norm)
    scale = outputs[0]["grad_scale"]
    assert bool(((scale <= 1.0) | scale.isnan()).all()), "a clipping scale above 1"
