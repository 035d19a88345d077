"""Steps kpg refuses because it cannot give the right result (issue 25 items 4, 5, 8): a closure
that calls backward() itself, a step started inside a step's closure, sparse gradients, and op
calls whose chunk rows overlap. Each is refused with a message naming the fix, before anything
changes."""

import numpy as np
import pytest
import torch
from torch import nn

import kpg
from kpg import _C
from kpg import _ops as ops


def _two_linear_agents():
    torch.manual_seed(0)
    return [nn.Linear(3, 1), nn.Linear(3, 1)]


def _snapshot(agents, opt):
    return [p.clone() for a in agents for p in a.parameters()], opt.state_dict()


def _assert_unchanged(agents, opt, snapshot):
    params, state = snapshot
    assert all(torch.equal(p, b) for p, b in zip((p for a in agents for p in a.parameters()), params))
    now = opt.state_dict()
    assert now["state"].keys() == state["state"].keys()
    for index, entries in state["state"].items():
        for name, value in entries.items():
            assert torch.equal(now["state"][index][name], value), f"state {name} of parameter {index} changed"


X = torch.linspace(-1, 1, 15).reshape(5, 3)


def _loss(agents, ctx, linear):
    own = torch.stack([a(X).mean() for a in agents])
    if ctx is None:
        return own if linear else (own * own.flip(0) - 0.5) ** 2
    with ctx.anticipated():
        anticipated = torch.stack([a(X).mean() for a in agents])
    return own if linear else (own * anticipated.flip(0) - 0.5) ** 2


# ---- item 4: a closure that calls backward() ------------------------------------------------------


@pytest.mark.parametrize("linear", [True, False], ids=["linear-loss", "nonlinear-loss"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("takes_context", [True, False], ids=["ctx-closure", "zero-argument-closure"])
def test_closure_calling_backward_is_refused_and_changes_nothing(linear, k, takes_context):
    agents = _two_linear_agents()
    opt = kpg.KPGOptimizer(agents, k=k, optimizer="adam", lr=0.1)

    def loss(ctx=None):
        return _loss(agents, ctx, linear)

    def closure(ctx):
        value = loss(ctx)
        value.sum().backward()
        return value

    def zero_argument_closure():
        value = loss()
        value.sum().backward()
        return value

    snapshot = _snapshot(agents, opt)
    with pytest.raises(RuntimeError, match=r"called backward\(\).*kpg runs the backward pass itself"):
        opt.step(closure if takes_context else zero_argument_closure)
    _assert_unchanged(agents, opt, snapshot)
    assert opt.stats.steps == 0

    # zero_grad() in the closure (the other torch.optim habit) writes only zeros at level 1: the
    # step goes on and equals the same step without it.
    results = []
    for zeroing in (False, True):
        fresh = _two_linear_agents()
        fresh_opt = kpg.KPGOptimizer(fresh, k=1, optimizer="adam", lr=0.1)

        def fresh_closure(ctx, fresh=fresh, fresh_opt=fresh_opt, zeroing=zeroing):
            if zeroing:
                fresh_opt.zero_grad()
            return _loss(fresh, ctx, linear)

        fresh_opt.step(fresh_closure)
        results.append([p for a in fresh for p in a.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(*results))


def test_zero_grad_in_a_zero_argument_closure_after_earlier_agents_is_refused():
    """From level 2 a closure without parameters is evaluated once per agent into one gradient
    buffer; zero_grad() there would erase the gradients of the agents before."""
    agents = _two_linear_agents()
    opt = kpg.KPGOptimizer(agents, k=2, optimizer="sgd", lr=0.1)

    def closure():
        opt.zero_grad()
        return _loss(agents, None, linear=False)

    snapshot = _snapshot(agents, opt)
    with pytest.raises(RuntimeError, match=r"wrote into the agents' gradients at level 2.*zero_grad\(\)"):
        opt.step(closure)
    _assert_unchanged(agents, opt, snapshot)


# ---- item 5: a step inside a step's closure -------------------------------------------------------


@pytest.mark.parametrize("inner_level", [1, 2])
def test_step_inside_the_closure_is_refused_and_the_outer_step_changes_nothing(inner_level):
    agents = _two_linear_agents()
    opt = kpg.KPGOptimizer(agents, k=2, optimizer="adam", lr=0.1)
    inner_calls = []

    def inner_closure(ctx):
        return _loss(agents, ctx, linear=False)

    def outer_closure(ctx):
        if ctx.level == inner_level and not inner_calls:
            inner_calls.append(ctx.level)
            opt.step(inner_closure)
        return _loss(agents, ctx, linear=False)

    snapshot = _snapshot(agents, opt)
    with pytest.raises(RuntimeError, match=r"step was called from inside its own closure"):
        opt.step(outer_closure)
    assert inner_calls == [inner_level]
    _assert_unchanged(agents, opt, snapshot)
    assert opt.stats.steps == 0
    # The optimizer is usable afterwards.
    opt.step(inner_closure)
    assert opt.stats.steps == 1


# ---- item 8: sparse gradients, overlapping chunk rows ---------------------------------------------


class _Bag(nn.Module):
    def __init__(self, sparse):
        super().__init__()
        self.embed = nn.Embedding(6, 2, sparse=sparse)
        self.head = nn.Linear(2, 1)

    def forward(self, tokens):
        return self.head(self.embed(tokens)).mean()


def _bag_closure(agents):
    tokens = torch.tensor([0, 2, 2, 5])

    def closure(ctx):
        own = torch.stack([a(tokens) for a in agents])
        with ctx.anticipated():
            anticipated = torch.stack([a(tokens) for a in agents])
        return (own * anticipated.flip(0) - 0.5) ** 2

    return closure


def test_an_embedding_with_sparse_gradients_is_refused_at_construction():
    torch.manual_seed(0)
    agents = [_Bag(sparse=False), _Bag(sparse=True)]
    with pytest.raises(
        ValueError, match=r"Embedding agents\[1\]\.embed has sparse=True.*build the layer with sparse=False"
    ):
        kpg.KPGOptimizer(agents, k=2)
    with pytest.raises(ValueError, match=r"Embedding embed has sparse=True"):
        kpg.KPGOptimizer(agents[1], k=2)
    agents[1].embed.weight.requires_grad_(False)  # a frozen sparse layer makes no gradient: accepted
    kpg.KPGOptimizer(agents, k=2).step(_bag_closure(agents))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_sparse_gradients_switched_on_after_construction_are_refused_at_the_step(optimizer):
    torch.manual_seed(0)
    agents = [_Bag(sparse=False), _Bag(sparse=False)]
    hyperparameters = {"momentum": 0.9} if optimizer == "sgd" else {}
    opt = kpg.KPGOptimizer(agents, k=2, optimizer=optimizer, lr=0.1, **hyperparameters)
    closure = _bag_closure(agents)
    opt.step(closure)
    agents[0].embed.sparse = True
    snapshot = _snapshot(agents, opt)
    with pytest.raises(ValueError, match=r"Embedding agents\[0\]\.embed has sparse=True"):
        opt.step(closure)
    _assert_unchanged(agents, opt, snapshot)


def _overlapping_sgd_call(device):
    """An SGD commit over 10 elements of one agent whose two chunk rows share elements 5..9."""
    param = torch.linspace(-1, 1, 10, dtype=torch.float64, device=device)
    grad = torch.ones(10, dtype=torch.float64, device=device)
    chunks = torch.tensor([[0, 0, 10], [0, 5, 10]], dtype=torch.int64, device=device)
    arguments = dict(
        param=param,
        grad=grad,
        momentum_buffer=None,
        step=torch.zeros(1, dtype=torch.float64, device=device),
        live=torch.zeros(1, ops.MAX_STATES, dtype=torch.uint8, device=device),
        lr=torch.full((1,), 0.1, dtype=torch.float64, device=device),
        hyper=ops.hyper_rows("sgd", {}, 1, device=device),
        grad_scale=None,
        skip=None,
        chunks=chunks,
    )
    return ops.sgd_commit, arguments


def test_update_op_with_overlapping_chunk_rows_is_refused(device):
    op, arguments = _overlapping_sgd_call(device)
    before = arguments["param"].clone()
    with pytest.raises(ValueError, match=r"sgd_commit: chunk rows 0 and 1 share elements from 5"):
        op(**arguments)
    assert torch.equal(arguments["param"], before)
    # The same rows without the overlap step every element once.
    arguments["chunks"] = torch.tensor([[0, 0, 5], [0, 5, 10]], dtype=torch.int64, device=device)
    op(**arguments)
    assert torch.allclose(arguments["param"], before - 0.1)


def test_agent_grad_norms_with_overlapping_chunk_rows_is_refused(device):
    f64 = dict(dtype=torch.float64, device=device)
    chunks = torch.tensor([[0, 0, 4], [0, 2, 6], [1, 6, 8]], dtype=torch.int64, device=device)
    norm = torch.zeros(2, **f64)
    with pytest.raises(ValueError, match=r"agent_grad_norms: chunk rows 0 and 1 share elements from 2"):
        ops.agent_grad_norms(
            torch.ones(8, **f64),
            chunks,
            torch.tensor([0, 2, 3], dtype=torch.int64, device=device),
            torch.zeros(3, **f64),
            None,
            norm,
            torch.zeros(2, **f64),
            torch.zeros(2, dtype=torch.uint8, device=device),
        )
    assert torch.equal(norm, torch.zeros(2, **f64))


def test_host_check_of_a_device_chunk_table_refuses_overlapping_rows():
    """The check a CUDA chunk table gets on the host (at its first use and after in-place changes),
    run here on host arrays: rows in any order pass when disjoint; shared elements do not."""
    grouped_by_agent = np.array([[0, 6, 8], [0, 0, 2], [1, 2, 6]], dtype=np.int64)
    _C.check_chunk_table("adam_commit", grouped_by_agent, np.array([0, 2, 3]), 2, 8)
    overlapping = np.array([[0, 6, 8], [0, 0, 3], [1, 2, 6]], dtype=np.int64)
    with pytest.raises(ValueError, match=r"adam_commit: chunk rows 1 and 2 share elements from 2"):
        _C.check_chunk_table("adam_commit", overlapping, None, 2, 8)
    empty_rows_share_nothing = np.array([[0, 2, 2], [0, 0, 4], [1, 4, 8]], dtype=np.int64)
    _C.check_chunk_table("adam_commit", empty_rows_share_nothing, None, 2, 8)
