"""KPGOptimizer under torch.compile: a compiled step, a compiled closure and a compiled model each
give the eager step bit for bit (issue 25 item 1: a compiled k >= 2 step used to train nothing)."""

import pytest
import torch
from torch import nn

import kpg
from kpg import _ops as ops

BACKENDS = ["eager", "aot_eager"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _game(k: int, optimizer: str, compile_model: str | None = None, **options):
    """Two small agents with a coupled, non-linear loss: each agent's loss reads the other's
    anticipated output. ``compile_model`` names a backend that compiles the agents' modules."""
    torch.manual_seed(0)
    agents = [nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)) for _ in range(2)]
    opt = kpg.KPGOptimizer(agents, k=k, optimizer=optimizer, lr=0.1, **options)
    forwards = [torch.compile(a, backend=compile_model) for a in agents] if compile_model else agents
    x = torch.randn(5, 3)

    def closure(ctx):
        own = torch.stack([f(x).mean() for f in forwards])
        with ctx.anticipated():
            anticipated = torch.stack([f(x).mean() for f in forwards])
        return (own * anticipated.flip(0) - 0.5) ** 2 + own

    def zero_argument_closure():
        outputs = torch.stack([f(x).mean() for f in forwards])
        return (outputs * outputs.flip(0) - 0.5) ** 2 + outputs

    return agents, opt, closure, zero_argument_closure


def _assert_same(compiled_run, eager_run):
    (agents, opt), (eager_agents, eager_opt) = compiled_run, eager_run
    for agent, eager_agent in zip(agents, eager_agents):
        for p, q in zip(agent.parameters(), eager_agent.parameters()):
            assert torch.equal(p, q), "the compiled step's parameters differ from the eager step's"
    state, eager_state = opt.state_dict()["state"], eager_opt.state_dict()["state"]
    assert state.keys() == eager_state.keys()
    for index, entries in state.items():
        for name, value in entries.items():
            assert torch.equal(value, eager_state[index][name]), f"state {name} of parameter {index} differs"


def _eager(k, optimizer, steps, zero_argument=False):
    agents, opt, closure, zero_argument_closure = _game(k, optimizer)
    before = [p.clone() for a in agents for p in a.parameters()]
    for _ in range(steps):
        opt.step(zero_argument_closure if zero_argument else closure)
    assert any(not torch.equal(p, b) for p, b in zip((p for a in agents for p in a.parameters()), before))
    return agents, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_compiled_step_equals_the_eager_step(backend, optimizer, k):
    agents, opt, closure, _ = _game(k, optimizer)
    step = torch.compile(lambda: opt.step(closure), backend=backend)
    for _ in range(2):
        step()
    _assert_same((agents, opt), _eager(k, optimizer, steps=2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_with_a_zero_argument_closure_equals_the_eager_step(backend):
    agents, opt, _, zero_argument_closure = _game(2, "adam")
    step = torch.compile(lambda: opt.step(zero_argument_closure), backend=backend)
    for _ in range(2):
        step()
    _assert_same((agents, opt), _eager(2, "adam", steps=2, zero_argument=True))


def test_fullgraph_compile_of_the_step_refuses_and_says_what_to_compile():
    agents, opt, closure, _ = _game(2, "sgd")
    before = [p.clone() for a in agents for p in a.parameters()]
    step = torch.compile(lambda: opt.step(closure), backend="eager", fullgraph=True)
    with pytest.raises(RuntimeError, match=r"compile the model or the closure instead, or use capture_step"):
        step()
    assert all(torch.equal(p, b) for p, b in zip((p for a in agents for p in a.parameters()), before))
    assert opt.stats.steps == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer,k", [("adam", 1), ("adam", 2), ("adam", 3), ("sgd", 2)])
def test_compiled_closure_equals_the_eager_closure(backend, optimizer, k):
    agents, opt, closure, _ = _game(k, optimizer)
    compiled = torch.compile(closure, backend=backend)
    for _ in range(2):
        opt.step(compiled)
    _assert_same((agents, opt), _eager(k, optimizer, steps=2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_closure_over_compiled_models_equals_the_eager_closure(backend, k):
    """The documented fast path: the agents' modules compiled, the closure and the step eager."""
    agents, opt, closure, _ = _game(k, "adam", compile_model=backend)
    for _ in range(2):
        opt.step(closure)
    _assert_same((agents, opt), _eager(k, "adam", steps=2))


@pytest.mark.parametrize("optimizer,hyperparameters", [("adam", {"amsgrad": True}), ("sgd", {"momentum": 0.9})])
def test_ops_pass_opcheck_on_the_buffers_of_a_live_optimizer(optimizer, hyperparameters):
    """torch.library.opcheck (schema, fake tensors, AOT dispatch) with the arguments a step passes:
    the arena's buffers, the optimizer's per-piece rows and the per-agent norms (lr, max_norm and
    the hyperparameter rows are views of one buffer)."""
    _, opt, closure, _ = _game(2, optimizer, max_grad_norm=1.0, **hyperparameters)
    opt.step(closure)
    opt.arena.grad.normal_(generator=torch.Generator().manual_seed(0))
    state = opt.agent_state
    flags = torch.zeros(opt.arena.num_pieces, dtype=torch.uint8)
    for mode in ("anticipate", "commit", "probe"):
        commit = mode != "anticipate"
        op = ops.PROBE_OPS[state.kernel.name] if mode == "probe" else ops.UPDATE_OPS[(state.kernel.name, commit)]
        named = {**state.update_arguments(commit), "nonfinite": flags}
        results = torch.library.opcheck(op, tuple(named[a.name] for a in op.default._schema.arguments))
        assert set(results.values()) == {"SUCCESS"}, (op, results)
    norms = state.norm_arguments()
    assert norms[4].untyped_storage().data_ptr() == state.lr.untyped_storage().data_ptr()  # max_norm beside lr
    results = torch.library.opcheck(torch.ops.kpg.agent_grad_norms, norms)
    assert set(results.values()) == {"SUCCESS"}, results
