"""anticipation="momentum" (kpg.anticipation) against the rule written in plain PyTorch.

The plain rule keeps separate copies of every agent and one torch.optim optimizer per agent, and for
every step: gate_i = clip(cos(u1_i, u2_i), 0, 1) (0 while either is zero), the others at
base + gate * u1, each agent's gradient at its base parameters against them, one committed step,
then u2 = u1 and u1 = after - before. The fused ops are also checked one by one against
kpg.reference's agent-by-agent versions.
"""

import copy

import pytest
import torch
from cases import KMappoMinibatch

import kpg
from kpg import _ops as kernels
from kpg import anticipation as ops
from kpg import reference
from kpg.arena import ParameterArena

from helpers import CUDA_SKIP_REASON, RTOL, Game, assert_close_to_scale, torch_optimizer

OPTIMIZERS = {
    "sgd": ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adam": ("adam", dict(betas=(0.8, 0.99), eps=1e-6)),
    "adamw": ("adamw", dict(weight_decay=0.05, amsgrad=True)),
    "rmsprop": ("rmsprop", dict(alpha=0.9, momentum=0.5, centered=True)),
    "adagrad": ("adagrad", dict(lr_decay=0.01, initial_accumulator_value=0.1)),
}
TOLERANCE = 1e-12


class PlainMomentumRule:
    """The momentum rule over a Game's separate models, each stepped by its own torch.optim optimizer."""

    def __init__(self, game, optimizers):
        self.game, self.optimizers = game, optimizers
        self.latest = [torch.zeros_like(flat(m)) for m in game.models]
        self.previous = [torch.zeros_like(flat(m)) for m in game.models]

    def gates(self):
        gates = []
        for u1, u2 in zip(self.latest, self.previous):
            norms = u1.norm() * u2.norm()
            gates.append(0.0 if norms == 0 else float((u1.dot(u2) / norms).clamp(0.0, 1.0)))
        return gates

    def step(self):
        models = self.game.models
        base = [{n: p.detach().clone() for n, p in m.named_parameters()} for m in models]
        before = [flat(m) for m in models]
        anticipated = []
        for agent, gate in enumerate(self.gates()):
            moved = before[agent] + gate * self.latest[agent]
            anticipated.append(unflatten(moved, base[agent]))
        for agent, (model, opt) in enumerate(zip(models, self.optimizers)):
            own = {n: t.clone().requires_grad_() for n, t in base[agent].items()}
            loss = self.game.brute_force_loss(agent, own, anticipated)
            grads = torch.autograd.grad(loss, list(own.values()))
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()
        self.previous = self.latest
        self.latest = [flat(m) - b for m, b in zip(models, before)]

    def reset(self):
        self.latest = [torch.zeros_like(u) for u in self.latest]
        self.previous = [torch.zeros_like(u) for u in self.previous]


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def unflatten(vector, like):
    out, offset = {}, 0
    for name, t in like.items():
        out[name] = vector[offset : offset + t.numel()].view_as(t)
        offset += t.numel()
    return out


def build(optimizer, shared, seed=0, **options):
    name, hyper = OPTIMIZERS[optimizer]
    ours = Game(3, torch.float64, not shared, shared, seed)
    theirs = copy.deepcopy(ours)
    lr = 0.05
    opt = kpg.KPGOptimizer(
        ours.models[0] if shared else ours.models,
        k=2,
        optimizer=name,
        lr=lr,
        num_agents=3 if shared else None,
        anticipation="momentum",
        **options,
        **hyper,
    )
    plain = PlainMomentumRule(theirs, [torch_optimizer(name, list(m.parameters()), lr, **hyper) for m in theirs.models])
    return ours, opt, plain


def assert_same(ours, plain):
    for a, (mine, theirs) in enumerate(zip(ours.models, plain.game.models)):
        difference = (flat(mine) - flat(theirs)).abs().max().item()
        assert difference <= TOLERANCE, f"agent {a}'s parameters differ by {difference:.3g}"


@pytest.mark.parametrize("shared", [False, True], ids=["per-agent", "shared"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_momentum_k2_equals_the_plain_rule_across_steps_and_a_state_dict_round_trip(optimizer, shared):
    ours, opt, plain = build(optimizer, shared)
    for _ in range(4):
        opt.step(ours.closure_with_context)
        plain.step()
        assert_same(ours, plain)
    assert (opt.momentum_anticipation.gate > 0).all(), (
        "the gate never opened: the test would not exercise the prediction"
    )
    expected_gates = torch.tensor(plain.gates(), dtype=torch.float64)
    assert torch.allclose(opt.momentum_anticipation.gate, expected_gates, rtol=0, atol=TOLERANCE)

    # A fresh optimizer over copies of the models, loaded from the state dict, goes on as the original.
    saved = copy.deepcopy(opt.state_dict())
    resumed_game = copy.deepcopy(ours)
    name, hyper = OPTIMIZERS[optimizer]
    resumed = kpg.KPGOptimizer(
        resumed_game.models[0] if shared else resumed_game.models,
        k=2,
        optimizer=name,
        num_agents=3 if shared else None,
        anticipation="momentum",
        **hyper,
    )
    resumed.load_state_dict(saved)
    for _ in range(2):
        resumed.step(resumed_game.closure_with_context)
        plain.step()
        assert_same(resumed_game, plain)


def test_first_two_steps_have_gate_zero_and_reset_closes_it_again():
    ours, opt, plain = build("adam", shared=False)
    opt.step(ours.closure_with_context)
    plain.step()
    assert opt.momentum_anticipation.gate.eq(0).all(), "one committed update gives no cosine: the gate stays 0"
    for _ in range(2):
        opt.step(ours.closure_with_context)
        plain.step()
    assert (opt.momentum_anticipation.gate > 0).all()
    opt.reset_anticipation()
    plain.reset()
    assert opt.momentum_anticipation.gate.eq(0).all()
    for _ in range(3):
        opt.step(ours.closure_with_context)
        plain.step()
        assert_same(ours, plain)


def test_momentum_k1_is_the_plain_step():
    ours, opt, _ = build("adam", shared=False)
    exact_game = copy.deepcopy(ours)
    exact = kpg.KPGOptimizer(exact_game.models, k=1, optimizer="adam", lr=0.05, betas=(0.8, 0.99), eps=1e-6)
    opt.k = 1
    for _ in range(3):
        opt.step(ours.closure_with_context)
        exact.step(exact_game.closure_with_context)
    for mine, theirs in zip(ours.models, exact_game.models):
        assert torch.equal(flat(mine), flat(theirs))


def test_audit_leaves_the_step_unchanged_and_reports_the_exact_level1_step():
    ours, opt, plain = build("sgd", shared=False, audit_anticipation=True)
    for _ in range(4):
        # The exact level-1 step of this step, from a copy with its own optimizer state.
        probe_game = copy.deepcopy(ours)
        probe = kpg.KPGOptimizer(probe_game.models, k=1, optimizer="sgd", lr=0.05, **OPTIMIZERS["sgd"][1])
        probe.load_state_dict(opt.state_dict())
        probe.k = 1
        before = [flat(m) for m in probe_game.models]
        probe.step(probe_game.closure_with_context)
        exact_steps = [flat(m) - b for m, b in zip(probe_game.models, before)]
        gates, latest = opt.momentum_anticipation.gate.clone(), opt.momentum_anticipation.latest.clone()

        opt.step(ours.closure_with_context)
        plain.step()
        assert_same(ours, plain)
        audit = opt.stats.anticipation_audit
        assert torch.equal(audit["gate"], gates)
        for agent, (step, u1) in enumerate(zip(exact_steps, opt.arena.agent_views(latest))):
            u1 = torch.cat([t.reshape(-1) for t in u1])
            prediction = gates[agent] * u1
            if u1.norm() > 0:
                expected_cosine = u1.dot(step) / (u1.norm() * step.norm())
                assert abs(audit["cosine"][agent] - expected_cosine) <= 1e-10
            else:
                assert audit["cosine"][agent].isnan()
            expected_error = (prediction - step).norm() / step.norm()
            assert abs(audit["relative_error"][agent] - expected_error) <= 1e-10
            assert abs(audit["norm_ratio"][agent] - prediction.norm() / step.norm()) <= 1e-10


@pytest.mark.parametrize("batched", [False, True], ids=["per-agent", "agent-batched"])
def test_plain_torch_ops_equal_the_agent_by_agent_reference(batched):
    torch.manual_seed(3)
    if batched:
        arena = ParameterArena.batched(
            [torch.randn(4, 3, 2, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)]
        )
    else:
        sizes = [(7,), (2, 3), (4,)]
        arena = ParameterArena([[torch.randn(*size, dtype=torch.float64)] for size in sizes])
    tiling = ops.AgentTiling.of(arena)
    agents = arena.num_agents
    param, history, exact = arena.param, torch.randn_like(arena.param), torch.randn_like(arena.param)
    # One agent without history (u1 = 0), one whose new update points away from u1 (gate 0).
    for view in arena.agent_views(history)[0]:
        view.zero_()
    gate = torch.rand(agents, dtype=torch.float64)
    latest_sq = torch.stack([sum(v.pow(2).sum() for v in views) for views in arena.agent_views(history)])
    results = {}
    for name, module in (("plain", ops), ("reference", reference)):
        latest, anticipated, base = history.clone(), torch.zeros_like(param), torch.zeros_like(param)
        module.momentum_predict(param, latest, gate, anticipated, base, tiling)
        moved = param + torch.randn(param.shape, generator=torch.Generator().manual_seed(5), dtype=param.dtype)
        for target, start, u1 in zip(*(arena.agent_views(b)[1] for b in (moved, param, latest))):
            target.copy_(start - u1)
        audit = module.momentum_audit(param, exact, latest, latest_sq, gate, tiling)
        record_gate, record_sq = gate.clone(), latest_sq.clone()
        module.momentum_record(moved, base, latest, record_sq, record_gate, tiling)
        results[name] = dict(anticipated=anticipated, update=latest, next_gate=record_gate, sq=record_sq, **audit)
    plain, expected = results["plain"], results["reference"]
    assert expected["cosine"][0].isnan() and expected["next_gate"][1] == 0
    for key in plain:
        assert torch.allclose(plain[key], expected[key], rtol=0, atol=TOLERANCE, equal_nan=True), key


def kernel_arena(layout, dtype, device="cpu"):
    """Arenas of every kind the optimizer builds: agents of different sizes, agents spanning several
    chunks (kCpuChunkElems = 16384 elements), more agents than a finish warp has lanes, agent-batched
    tensors (an agent owns one range per parameter) and one shared network (one agent)."""
    generator = torch.Generator().manual_seed(11)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).to(device)

    if layout == "per-agent":
        return ParameterArena([[tensor(7)], [tensor(2, 3), tensor(5)], [tensor(40000)], [tensor(1)]])
    if layout == "many-agents":
        return ParameterArena([[tensor(3 + agent % 5)] for agent in range(70)])
    if layout == "agent-batched":
        return ParameterArena.batched([tensor(6, 9000, 2), tensor(6, 5)])
    return ParameterArena([[tensor(130, 200), tensor(200)]])  # a shared network: one optimizer agent


KERNEL_LAYOUTS = ("per-agent", "many-agents", "agent-batched", "shared")


def kernel_case(arena):
    """History, gates and a committed step chosen so that every branch of the rule is taken: agent 0
    has no history (u1 = 0, gate 0), agent 1's new update is -u1 (cosine -1: gate 0), the others'
    lean on u1 (gate > 0)."""
    generator = torch.Generator().manual_seed(12)

    def noise():
        return torch.randn(arena.numel, generator=generator, dtype=arena.dtype).to(arena.device)

    latest = noise()
    agents = arena.num_agents
    if agents > 1:
        for view in arena.agent_views(latest)[0]:
            view.zero_()
    gate = torch.rand(agents, generator=generator, dtype=torch.float64).to(arena.device)
    latest_sq = torch.stack([sum(v.double().pow(2).sum() for v in views) for views in arena.agent_views(latest)]).to(
        arena.device
    )
    moved = arena.param + latest + 0.1 * noise()  # a new update that leans on u1: the gate opens
    if agents > 1:
        for target, start, u1 in zip(*(arena.agent_views(b)[1] for b in (moved, arena.param, latest))):
            target.copy_(start - u1)
    return latest, gate, latest_sq, moved


def run_kernels_and_plain_rule(arena, case=None):
    """The kernels and the plain-PyTorch rule on the same inputs (``case``, default
    ``kernel_case(arena)``): {name: (kernels' result, plain's)}."""
    latest, gate, latest_sq, moved = case or kernel_case(arena)
    tiling = ops.AgentTiling.of(arena)
    results = {}
    for name in ("kernels", "plain"):
        u1, sq, next_gate = latest.clone(), latest_sq.clone(), gate.clone()
        anticipated, base = torch.zeros_like(arena.param), torch.zeros_like(arena.param)
        if name == "kernels":
            kernels.momentum_predict(arena.param, u1, next_gate, anticipated, base, arena.chunks)
            chunk_sums = torch.zeros(arena.chunks.shape[0], 2, dtype=torch.float64, device=arena.device)
            kernels.momentum_record(moved, base, u1, sq, next_gate, chunk_sums, arena.chunks, arena.agent_chunks)
        else:
            ops.momentum_predict(arena.param, u1, next_gate, anticipated, base, tiling)
            ops.momentum_record(moved, base, u1, sq, next_gate, tiling)
        results[name] = dict(anticipated=anticipated, base=base, update=u1, latest_sq=sq, gate=next_gate)
    return {key: (results["kernels"][key], results["plain"][key]) for key in results["kernels"]}


@pytest.mark.parametrize("dtype", kernels.SUPPORTED_DTYPES, ids=str)
@pytest.mark.parametrize("layout", KERNEL_LAYOUTS)
def test_kernels_equal_the_plain_torch_rule(layout, dtype, device):
    arena = kernel_arena(layout, dtype, device)
    results = run_kernels_and_plain_rule(arena)
    # Element by element: the copy and the difference round alike; torch's float32 addcmul fuses the
    # multiply-add on the CPU, one unit in the last place from the kernels' separate operations.
    for key in ("base", "update"):
        assert torch.equal(*results[key]), key
    assert_close_to_scale(*results["anticipated"], RTOL[dtype], "anticipated")
    # The per-agent sums: the kernels add in float64 in their fixed order, the plain rule adds each run
    # in the arena's dtype (kpg.anticipation.AgentTiling.agent_sums).
    tolerance = TOLERANCE if dtype == torch.float64 else 1e-5
    for key in ("latest_sq", "gate"):
        fused, plain = results[key]
        assert torch.allclose(fused, plain, rtol=tolerance, atol=0), (key, fused, plain)
    gate = results["gate"][0]
    if arena.num_agents > 1:
        assert gate[0] == 0 and gate[1] == 0, "the no-history and opposed-update agents must get gate 0"
    assert (gate[2:] > 0).all() if arena.num_agents > 1 else gate[0] > 0


def test_kernel_gates_do_not_depend_on_the_thread_count():
    """The per-agent sums run in a fixed order (a sum per chunk, then norms.h's lane tree), so the gates
    are the same bits with one thread or several."""
    arena = kernel_arena("per-agent", torch.float32)
    case = kernel_case(arena)  # torch's own sums (the inputs' norms) may change with the thread count
    previous = torch.get_num_threads()
    gates = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            gates.append(run_kernels_and_plain_rule(arena, case)["gate"][0])
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(gates[0], g) for g in gates[1:])


def test_kernels_refuse_bad_buffers_and_change_nothing():
    arena = kernel_arena("per-agent", torch.float64)
    latest, gate, latest_sq, moved = kernel_case(arena)
    base = torch.zeros_like(arena.param)
    sums = torch.zeros(arena.chunks.shape[0], 2, dtype=torch.float64)
    before = [t.clone() for t in (latest, gate, latest_sq)]
    with pytest.raises(ValueError, match=r"gate must be a contiguous torch.float64 tensor"):
        kernels.momentum_predict(arena.param, latest, gate.float(), torch.zeros_like(base), base, arena.chunks)
    with pytest.raises(ValueError, match=r"chunk_sums must be a contiguous float64 workspace of shape \(6, 2\)"):
        kernels.momentum_record(moved, base, latest, latest_sq, gate, sums[:3], arena.chunks, arena.agent_chunks)
    with pytest.raises(ValueError, match="agent_chunks must be the contiguous int64 table of num_agents \\+ 1"):
        kernels.momentum_record(moved, base, latest, latest_sq, gate, sums, arena.chunks, arena.agent_chunks[:-1])
    with pytest.raises(ValueError, match="latest overlaps base in memory"):
        kernels.momentum_record(moved, latest, latest, latest_sq, gate, sums, arena.chunks, arena.agent_chunks)
    assert all(torch.equal(b, a) for b, a in zip(before, (latest, gate, latest_sq)))


@pytest.mark.parametrize("shared", [False, True], ids=["per-agent", "shared"])
def test_kernels_pass_opcheck_on_the_buffers_of_a_live_optimizer(shared):
    ours, opt, _ = build("adam", shared)
    for _ in range(3):
        opt.step(ours.closure_with_context)
    state = opt.momentum_anticipation
    predict = (opt.arena.param, state.latest, state.gate, opt.agent_state.anticipated, state.base, state.chunks)
    results = torch.library.opcheck(torch.ops.kpg.momentum_predict, predict)
    assert set(results.values()) == {"SUCCESS"}, results
    record = (opt.arena.param, state.base, state.latest, state.latest_sq, state.gate, state.chunk_sums)
    results = torch.library.opcheck(torch.ops.kpg.momentum_record, (*record, state.chunks, state.agent_chunks))
    assert set(results.values()) == {"SUCCESS"}, results


def test_bad_settings_are_refused_clearly():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="anticipation must be one of 'exact', 'momentum', got 'lookahead'"):
        kpg.KPGOptimizer([model], anticipation="lookahead")
    with pytest.raises(ValueError, match="k=1 or k=2, got k=3"):
        kpg.KPGOptimizer([model], k=3, anticipation="momentum")
    with pytest.raises(ValueError, match="needs anticipation='momentum'"):
        kpg.KPGOptimizer([model], audit_anticipation=True)
    ours, opt, _ = build("adam", shared=False)
    opt.k = 3
    before = [flat(m) for m in ours.models]
    with pytest.raises(ValueError, match="k=1 or k=2, got k=3"):
        opt.step(ours.closure_with_context)
    assert all(torch.equal(b, flat(m)) for b, m in zip(before, ours.models))


def test_a_failed_step_leaves_the_history_unchanged():
    ours, opt, _ = build("adam", shared=False)
    for _ in range(3):
        opt.step(ours.closure_with_context)
    rule = opt.momentum_anticipation
    history = [t.clone() for t in (rule.latest, rule.latest_sq, rule.gate)]

    def failing(ctx):
        losses = ours.closure_with_context(ctx)
        return losses * float("nan")

    with pytest.raises(FloatingPointError):
        opt.step(failing)
    after = (opt.momentum_anticipation.latest, opt.momentum_anticipation.latest_sq, opt.momentum_anticipation.gate)
    assert all(torch.equal(b, a) for b, a in zip(history, after))


def test_capture_step_takes_momentum_and_refuses_only_its_audit():
    ours, opt, _ = build("adam", shared=False)
    # The CPU arena is the next refusal: the momentum step itself is capturable.
    with pytest.raises(ValueError, match="capture_step needs the agents on a CUDA device"):
        opt.capture_step(ours.closure_with_context)
    ours, opt, _ = build("adam", shared=False, audit_anticipation=True)
    before = [flat(m) for m in ours.models]
    with pytest.raises(ValueError, match="capture_step does not capture audit_anticipation=True"):
        opt.capture_step(ours.closure_with_context)
    assert all(torch.equal(b, flat(m)) for b, m in zip(before, ours.models))


@pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))
@pytest.mark.parametrize("reset", [False, True], ids=["carried", "reset-before-capture"])
def test_captured_momentum_steps_on_cuda_replay_equal_to_eager_steps(reset):
    """The gate, u1 and the base live in device buffers that keep their addresses, so replays of a
    captured momentum step advance the history as eager steps do (warm-up and capture included)."""
    runs, gates = {}, {}
    for mode in ("eager", "captured"):
        problem = KMappoMinibatch("cuda")
        opt = kpg.KPGOptimizer(problem.policy, k=2, lr=3e-3, nonfinite="skip", anticipation="momentum")
        if reset:
            opt.step(problem.closure)
            opt.reset_anticipation()
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        runs[mode] = problem.train(opt, schedule, steps=8, capture_from=None if mode == "eager" else 2)
        gates[mode] = opt.momentum_anticipation.gate.cpu()
    assert (gates["eager"] > 0).all(), "the gate never opened: the replays would not exercise the prediction"
    assert_close_to_scale(gates["captured"], gates["eager"], 1e-12, what="gates after the captured steps")
    for eager, captured in zip(runs["eager"], runs["captured"]):
        assert_close_to_scale(captured, eager, 1e-12, what="parameters after the captured steps")


@pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))
def test_momentum_steps_do_not_synchronize_on_cuda():
    """After the first step (which checks the device chunk table on the host once), a momentum step
    reads nothing on the host: the prediction and the gate stay on the device."""
    problem = KMappoMinibatch("cuda")
    opt = kpg.KPGOptimizer(problem.policy, k=2, lr=3e-3, nonfinite="skip", anticipation="momentum")
    for minibatch in range(2):
        problem.refill(minibatch)
        opt.step(problem.closure)
    for minibatch in range(2, 4):
        problem.refill(minibatch)  # copies from host memory, outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step(problem.closure)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_a_closure_without_context_follows_the_same_rule():
    """Such a closure is evaluated once per agent at the mixed point; the others sit at the prediction."""
    ours, opt, plain = build("adam", shared=False)
    for _ in range(4):
        opt.step(ours.closure_without_context)
        plain.step()
        assert_same(ours, plain)


def test_a_damaged_momentum_state_dict_is_refused_before_anything_changes():
    ours, opt, _ = build("adam", shared=False)
    for _ in range(3):
        opt.step(ours.closure_with_context)
    saved = copy.deepcopy(opt.state_dict())
    before = opt.momentum_anticipation.latest.clone()
    damaged = copy.deepcopy(saved)
    del damaged["kpg"]["anticipation"]["gate"]
    with pytest.raises(ValueError, match="lacks gate"):
        opt.load_state_dict(damaged)
    damaged = copy.deepcopy(saved)
    damaged["kpg"]["anticipation"]["latest_update"] = torch.zeros(3)
    with pytest.raises(ValueError, match="latest_update has shape"):
        opt.load_state_dict(damaged)
    assert torch.equal(opt.momentum_anticipation.latest, before)
    # A state dict without the entry (exact mode, torch.optim) starts the history afresh.
    del saved["kpg"]["anticipation"]
    opt.load_state_dict(saved)
    assert opt.momentum_anticipation.gate.eq(0).all() and opt.momentum_anticipation.latest.eq(0).all()
