"""KPGOptimizer as a drop-in for torch.optim (issue 14): everything a torch.optim user touches acts
as in torch.optim.

At k=1 KPGOptimizer is compared with one torch.optim optimizer (``foreach=False``, ``fused=False``)
holding one parameter group per agent, the layout of KPGOptimizer's ``param_groups``: every
constructor argument, every group key edited mid-run for one agent only, the learning-rate and
momentum schedulers, state dicts carried from one to the other mid-run, a tensor lr; float32 and
float64. At k=2 the same edits are checked against the brute-force KPG of tests/helpers.py (the one
tests/test_optim.py uses).
"""

import copy
import math

import pytest
import torch
from cases import CONFIGS, OPTIMIZER_INFO, OPTIMIZER_INFOS
from torch import nn

import kpg
from kpg import _ops as ops
from kpg import reference

from helpers import RTOL, Game, assert_close_to_scale, brute_force_step

AGENTS = 2


class Problem:
    """Two agents (one linear layer each) with quadratic losses, stepped by kpg and by torch.optim."""

    def __init__(self, name, dtype, lr=0.05, k=1, seed=0, device="cpu", **hyper):
        torch.manual_seed(seed)
        self.dtype = dtype
        self.ours = [nn.Linear(3, 2).to(device, dtype) for _ in range(AGENTS)]
        self.theirs = copy.deepcopy(self.ours)
        g = torch.Generator().manual_seed(seed)
        self.inputs = [torch.randn(5, 3, dtype=dtype, generator=g).to(device) for _ in range(AGENTS)]
        self.targets = [torch.randn(5, 2, dtype=dtype, generator=g).to(device) for _ in range(AGENTS)]
        self.kpg = kpg.KPGOptimizer(self.ours, k=k, optimizer=name, lr=_copy_lr(lr), **hyper)
        groups = [{"params": list(m.parameters())} for m in self.theirs]
        self.torch = OPTIMIZER_INFO[name].torch_optimizer(groups, _copy_lr(lr), **hyper)

    def losses(self, models):
        return torch.stack([((m(x) - y) ** 2).mean() for m, x, y in zip(models, self.inputs, self.targets)])

    def step(self):
        self.kpg.step(lambda ctx: self.losses(self.ours))
        self.torch.zero_grad()
        self.losses(self.theirs).sum().backward()
        self.torch.step()

    def edit(self, agent, key, value):
        self.kpg.param_groups[agent][key] = value
        self.torch.param_groups[agent][key] = value

    def assert_same(self, what=""):
        for a, (m1, m2) in enumerate(zip(self.ours, self.theirs)):
            for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
                assert_close_to_scale(p1.detach(), p2.detach(), RTOL[self.dtype], what=f"{what} agent {a} {name}")


def _copy_lr(lr):
    return lr.clone() if isinstance(lr, torch.Tensor) else lr


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])

# The table's configurations (tests/cases.py): every constructor argument of each optimizer, alone or
# combined.
CONSTRUCTOR_CASES = {desc: (info.name, config.hyper) for desc, (info, config) in CONFIGS.items()}


@DTYPES
@pytest.mark.parametrize("case", CONSTRUCTOR_CASES)
def test_constructor_arguments_match_torch_optim(case, dtype, device):
    name, hyper = CONSTRUCTOR_CASES[case]
    problem = Problem(name, dtype, device=device, **hyper)
    for _ in range(8):  # past RAdam's switch to the rectified step at the sixth
        problem.step()
    problem.assert_same(case)


ERROR_INPUTS = {
    f"{info.name}-{error.desc}": (info, error) for info in OPTIMIZER_INFOS for error in info.all_error_inputs()
}


@pytest.mark.parametrize("case", ERROR_INPUTS)
def test_error_inputs_are_refused_with_their_message(case):
    """The table's error inputs: KPGOptimizer refuses them with the expected message (torch.optim too
    where the entry says so); the implementation arguments (foreach, fused, capturable,
    differentiable) torch takes and kpg, with its one fused path, refuses."""
    info, error = ERROR_INPUTS[case]
    with pytest.raises(error.error, match=error.match):
        kpg.KPGOptimizer([nn.Linear(2, 2)], optimizer=info.name, **error.hyper)
    if error.torch_too:
        with pytest.raises(error.error, match=error.match):
            info.torch_optimizer(nn.Linear(2, 2).parameters(), 0.01, **error.hyper)


# Every group key edited mid-run, for agent 1 only (issue 14 item 1), from the table's edits. Where
# torch.optim raises (KeyError: turning amsgrad, RMSprop momentum or centering on after the state
# exists) the edit is checked against the reference kernels instead
# (test_enabling_a_state_mid_run_...).
EDIT_CASES = {
    f"{info.name}-{edit.key}-{edit.value}": (info.name, edit.hyper, edit.key, edit.value)
    for info in OPTIMIZER_INFOS
    for edit in info.edits
}


@DTYPES
@pytest.mark.parametrize("case", EDIT_CASES)
def test_group_edits_act_at_the_next_step_per_agent(case, dtype, device):
    name, hyper, key, value = EDIT_CASES[case]
    problem = Problem(name, dtype, device=device, **hyper)
    for _ in range(2):
        problem.step()
    problem.edit(1, key, value)
    for _ in range(3):
        problem.step()
    problem.assert_same(case)


SCHEDULERS = {
    "step": ("sgd", dict(momentum=0.9), lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)),
    "lambda": ("adam", {}, lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s))),
    "one-cycle-adam": ("adam", {}, lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10)),
    "one-cycle-sgd": (
        "sgd",
        dict(momentum=0.9),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10),
    ),
    "one-cycle-rmsprop": (
        "rmsprop",
        dict(momentum=0.5),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=10),
    ),
    "cyclic-momentum-sgd": (
        "sgd",
        dict(momentum=0.9),
        lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3, cycle_momentum=True),
    ),
    "cyclic-betas-adam": (
        "adam",
        {},
        lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3, cycle_momentum=True),
    ),
    "chained": (
        "adam",
        {},
        lambda o: torch.optim.lr_scheduler.ChainedScheduler(
            [torch.optim.lr_scheduler.ExponentialLR(o, 0.9), torch.optim.lr_scheduler.StepLR(o, 3, 0.5)]
        ),
    ),
    "sequential": (
        "sgd",
        {},
        lambda o: torch.optim.lr_scheduler.SequentialLR(
            o,
            [
                torch.optim.lr_scheduler.ConstantLR(o, 0.5, total_iters=2),
                torch.optim.lr_scheduler.ExponentialLR(o, 0.8),
            ],
            milestones=[2],
        ),
    ),
}


@DTYPES
@pytest.mark.parametrize("case", SCHEDULERS)
def test_schedulers_drive_lr_momentum_and_betas(case, dtype, device):
    """Issue 14 item 2: OneCycleLR and CyclicLR(cycle_momentum=True) look for momentum or betas."""
    name, hyper, make = SCHEDULERS[case]
    problem = Problem(name, dtype, device=device, **hyper)
    schedulers = [make(problem.kpg), make(problem.torch)]
    for _ in range(8):
        problem.step()
        for s in schedulers:
            s.step()
    problem.assert_same(case)
    assert [g["lr"] for g in problem.kpg.param_groups] == [g["lr"] for g in problem.torch.param_groups]


@DTYPES
def test_reduce_lr_on_plateau(dtype):
    problem = Problem("adam", dtype, lr=0.1)
    schedulers = [
        torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5) for o in (problem.kpg, problem.torch)
    ]
    for _ in range(6):
        problem.step()
        for s in schedulers:
            s.step(1.0)  # no improvement: the lr halves
    assert problem.kpg.param_groups[0]["lr"] < 0.1
    problem.assert_same()


TENSOR_LR = {
    "adam": ("adam", {}),
    "sgd-momentum": ("sgd", dict(momentum=0.9)),
    "rmsprop": ("rmsprop", {}),
}


@DTYPES
@pytest.mark.parametrize("case", TENSOR_LR)
def test_tensor_lr_with_a_scheduler(case, dtype):
    """Issue 14 item 3: lr=torch.tensor(0.01) as torch.optim takes it; schedulers fill_ it in place."""
    name, hyper = TENSOR_LR[case]
    problem = Problem(name, dtype, lr=torch.tensor(0.05, dtype=dtype), **hyper)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (problem.kpg, problem.torch)]
    for _ in range(4):
        problem.step()
        for s in schedulers:
            s.step()
    assert (
        float(problem.kpg.param_groups[0]["lr"])
        == float(problem.torch.param_groups[0]["lr"])
        == pytest.approx(0.05 / 16)
    )
    problem.assert_same(case)


# torch.optim state dicts into kpg and kpg's back into torch.optim, mid-run (issue 14 item 4): the
# receiving optimizer is built with defaults; the state dict brings the settings and the buffers.
STATE_DICT_CASES = {
    f"{info.name}-{'-'.join(hyper)}": (info.name, hyper) for info in OPTIMIZER_INFOS for hyper in info.state_dict_hyper
}


@DTYPES
@pytest.mark.parametrize("direction", ["torch-to-kpg", "kpg-to-torch"])
@pytest.mark.parametrize("case", STATE_DICT_CASES)
def test_state_dicts_carry_settings_and_state_mid_run(case, direction, dtype, device):
    name, hyper = STATE_DICT_CASES[case]
    trained = Problem(name, dtype, device=device, **hyper)
    for _ in range(3):
        trained.step()
    fresh = Problem(name, dtype, lr=0.05, seed=1, device=device)  # defaults: none of the settings above
    for ours, theirs, m_ours, m_theirs in zip(fresh.ours, fresh.theirs, trained.ours, trained.theirs):
        ours.load_state_dict(m_ours.state_dict())
        theirs.load_state_dict(m_theirs.state_dict())
    fresh.inputs, fresh.targets = trained.inputs, trained.targets
    # torch.optim's load_state_dict keeps the tensors it gets: each load gets its own copy.
    source = trained.torch if direction == "torch-to-kpg" else trained.kpg
    fresh.kpg.load_state_dict(copy.deepcopy(source.state_dict()))
    fresh.torch.load_state_dict(copy.deepcopy(source.state_dict()))
    for _ in range(3):
        trained.step()
        fresh.step()
    fresh.assert_same(case)
    trained.assert_same(case)
    # Loading casts scalar state (NAdam's float32 mu_product) to the parameters' dtype, in torch.optim
    # as in kpg: the loaded run goes on with a more precise mu_product than the one it was saved
    # from, so the two agree to the scalar state's float32 precision, not to float64 rounding.
    rtol = max(RTOL[dtype], RTOL[torch.float32]) if ops.OPTIMIZERS[name].kernel.scalar_states else RTOL[dtype]
    for m1, m2 in zip(fresh.ours, trained.ours):
        for p1, p2 in zip(m1.parameters(), m2.parameters()):
            assert_close_to_scale(p1.detach(), p2.detach(), rtol, what=case)


@pytest.mark.parametrize(
    "name,key,state",
    [
        ("adam", "amsgrad", "max_exp_avg_sq"),
        ("rmsprop", "centered", "grad_avg"),
        ("rmsprop", "momentum", "momentum_buffer"),
        ("sgd", "momentum", "momentum_buffer"),
    ],
    ids=["adam-amsgrad", "rmsprop-centered", "rmsprop-momentum", "sgd-momentum"],
)
def test_enabling_a_state_mid_run_creates_its_buffer_for_that_agent(name, key, state):
    """Where torch.optim raises KeyError (amsgrad, RMSprop momentum or centering turned on after the
    state exists) kpg starts the buffer where torch would have started it at construction (zeros);
    SGD's momentum buffer starts from the gradient, as torch's does. Checked against the reference
    kernels with agent 1's row switched on."""
    problem = Problem(name, torch.float64)
    for _ in range(2):
        problem.step()
    opt = problem.kpg
    kernel = opt.agent_state.kernel
    assert (
        opt.agent_state.state_buffers[state] is None
        or not opt.agent_state.live[:, ops.KERNELS[kernel.name].state_names.index(state)].any()
    )
    expected = {n: (None if b is None else b.clone()) for n, b in opt.agent_state.state_buffers.items()}
    param, step, live = opt.arena.param.clone(), opt.agent_state.step.clone(), opt.agent_state.live.clone()
    value = True if key in ("amsgrad", "centered") else 0.9
    opt.param_groups[1][key] = value
    opt.step(lambda ctx: problem.losses(problem.ours))
    piece_agent = opt.arena.piece_agent
    rows = ops.hyper_rows(kernel.name, [opt.param_groups[0], opt.param_groups[1]])[piece_agent].contiguous()
    states = [expected[n] if expected[n] is not None else torch.zeros_like(param) for n in kernel.state_names]
    reference.UPDATE_OPS[(kernel.name, True)](
        param,
        opt.arena.grad,
        *states,
        step,
        live,
        opt.agent_state.lr[piece_agent].clone(),
        rows,
        None,
        None,
        opt.arena.piece_chunks,
    )
    assert_close_to_scale(opt.arena.param, param, 1e-12, what="param")
    index = kernel.state_names.index(state)
    assert opt.agent_state.live[:, index].tolist() == [0 if agent == 0 else 1 for agent in piece_agent.tolist()]
    assert state in opt.state_dict()["state"][2] and state not in opt.state_dict()["state"][0]


def test_bad_edit_raises_naming_the_agent_and_changes_nothing():
    problem = Problem("adam", torch.float64)
    problem.step()
    before = [p.detach().clone() for m in problem.ours for p in m.parameters()]
    problem.kpg.param_groups[1]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match=r"Invalid beta parameter at index 1: 1.5 \(agent 1's betas\)"):
        problem.kpg.step(lambda ctx: problem.losses(problem.ours))
    assert all(torch.equal(p, b) for p, b in zip([p for m in problem.ours for p in m.parameters()], before))
    problem.kpg.param_groups[1]["betas"] = (0.9, 0.999)
    problem.kpg.step(lambda ctx: problem.losses(problem.ours))


# ---- k=2: the same edits against the brute-force KPG --------------------------------------------

K2_EDITS = EDIT_CASES


@pytest.mark.parametrize("case", K2_EDITS)
def test_k2_edits_match_brute_force(case, device):
    name, hyper, key, value = K2_EDITS[case]
    ours = Game(2, torch.float64, True, False, seed=2, device=device)
    theirs = copy.deepcopy(ours)
    opt = kpg.KPGOptimizer(ours.models, k=2, optimizer=name, lr=[0.05, 0.02], **hyper)
    reference_optimizers = [
        OPTIMIZER_INFO[name].torch_optimizer(list(m.parameters()), lr, **hyper)
        for m, lr in zip(theirs.models, (0.05, 0.02))
    ]
    for step in range(4):
        if step == 2:
            opt.param_groups[1][key] = value
            reference_optimizers[1].param_groups[0][key] = value
        opt.step(ours.closure_with_context)
        brute_force_step(theirs, reference_optimizers, 2, None)
    for a, (m1, m2) in enumerate(zip(ours.models, theirs.models)):
        for p1, p2 in zip(m1.parameters(), m2.parameters()):
            assert_close_to_scale(p1.detach(), p2.detach(), 1e-11, what=f"{case} agent {a}")


@pytest.mark.parametrize("k", [2, 3])
def test_k_levels_adagrad_match_brute_force(k, device):
    ours = Game(3, torch.float64, True, False, seed=4, device=device)
    theirs = copy.deepcopy(ours)
    hyper = dict(lr_decay=0.05, weight_decay=0.01, initial_accumulator_value=0.1, eps=1e-8)
    opt = kpg.KPGOptimizer(ours.models, k=k, optimizer="adagrad", lr=0.05, max_grad_norm=0.5, **hyper)
    reference_optimizers = [
        torch.optim.Adagrad(list(m.parameters()), lr=0.05, foreach=False, **hyper) for m in theirs.models
    ]
    for _ in range(3):
        opt.step(ours.closure_with_context)
        brute_force_step(theirs, reference_optimizers, k, [0.5] * 3)
    for a, (m1, m2) in enumerate(zip(ours.models, theirs.models)):
        for p1, p2 in zip(m1.parameters(), m2.parameters()):
            assert_close_to_scale(p1.detach(), p2.detach(), 1e-11, what=f"agent {a}")


# ---- closures, non-finite agents, the reference on batched tables --------------------------------


def test_closure_with_an_optional_ctx_gets_the_context():
    """Issue 14 item 5: ``def closure(ctx=None)`` takes ctx (one evaluation per level)."""
    problem = Problem("sgd", torch.float64, k=2)
    seen = []

    def closure(ctx=None):
        seen.append(ctx)
        return problem.losses(problem.ours)

    problem.kpg.step(closure)
    assert len(seen) == 2 and all(isinstance(c, kpg.KPGContext) for c in seen)


def test_agent_nonfinite_at_an_intermediate_level_is_skipped_at_commit():
    """Issue 14 item 6: agent 1's loss is NaN at level 1 only; with nonfinite='skip' it keeps its
    parameters and state through the commit at level 2, and the other agent steps."""
    game = Game(2, torch.float64, False, False, seed=9)
    before = [[p.detach().clone() for p in m.parameters()] for m in game.models]
    opt = kpg.KPGOptimizer(game.models, k=2, nonfinite="skip")

    def closure(ctx):
        losses = game.closure_with_context(ctx)
        if ctx.level == 1:
            return losses * torch.tensor([1.0, math.nan], dtype=losses.dtype)
        return losses

    opt.step(closure)
    changed = [not all(torch.equal(p, b) for p, b in zip(m.parameters(), bs)) for m, bs in zip(game.models, before)]
    assert changed == [True, False]
    assert opt.agent_state.step.tolist() == [1.0] * len(before[0]) + [0.0] * len(before[1])
    assert opt.stats.skipped_agent_steps == 1
    first_of_agent_1 = len(before[0])
    assert "exp_avg" not in opt.state_dict()["state"][first_of_agent_1]  # never stepped: no state, as in torch
    assert all(float(s["exp_avg"].abs().sum()) == 0.0 for p in game.models[1].parameters() for s in [opt.state[p]])


def test_joint_ratio_loss_selects_rather_than_multiplies():
    """Issue 14 item 7: a masked agent with non-finite log-probabilities leaves the others' losses
    finite, and no gradient reaches old_log_prob."""
    g = torch.Generator().manual_seed(0)
    log_prob = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    old = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    anticipated = torch.randn(3, 4, generator=g, dtype=torch.float64)
    anticipated[2] = math.nan
    mask = torch.ones(3, 4, dtype=torch.float64)
    mask[2] = 0
    advantages = torch.randn(4, generator=g, dtype=torch.float64)
    for others in ("product", "geometric"):
        for form in ("joint_clip", "weighted"):
            result = kpg.joint_ratio_loss(
                log_prob, old, advantages, anticipated, 2, others=others, form=form, mask=mask
            )
            assert torch.isfinite(result.loss[:2]).all(), (others, form)
            result.loss[:2].sum().backward()
            assert old.grad is None
            assert torch.isfinite(log_prob.grad).all()
            log_prob.grad = None


def test_reference_agent_segments_follow_the_rows_of_batched_tables():
    """Issue 8: on an agent-batched arena each agent owns one range per parameter; the reference
    must update exactly those ranges, as the kernels do."""
    # Two parameters of 2 agents each: [agent 0 | agent 1] [agent 0 | agent 1].
    ranges = [(0, 0, 3), (1, 3, 6), (0, 6, 8), (1, 8, 10)]
    chunks, _ = ops.range_chunk_table(ranges, 2)
    assert [(a, s.start, s.stop) for a, s in reference.agent_segments(chunks)] == sorted(ranges)
    g = torch.Generator().manual_seed(1)
    base = dict(
        param=torch.randn(10, dtype=torch.float64, generator=g), grad=torch.randn(10, dtype=torch.float64, generator=g)
    )
    results = []
    for module in (ops, reference):
        param, grad = base["param"].clone(), base["grad"].clone()
        states = [torch.zeros(10, dtype=torch.float64) for _ in range(3)]
        step, live = torch.zeros(2, dtype=torch.float64), torch.zeros(2, ops.MAX_STATES, dtype=torch.uint8)
        lr = torch.tensor([0.1, 0.01], dtype=torch.float64)
        rows = ops.hyper_rows("adam", [dict(betas=(0.5, 0.9)), dict(betas=(0.9, 0.99))])
        module.UPDATE_OPS[("adam", True)](param, grad, *states, step, live, lr, rows, None, None, chunks)
        results.append(param)
    assert_close_to_scale(results[0], results[1], 1e-12)


@pytest.mark.parametrize("name", sorted(ops.OPTIMIZERS))
def test_the_kernels_table_has_torch_optims_defaults(name):
    """The defaults kpg learns from csrc/kpg/optimizers.h are torch.optim's, key by key."""
    entry = ops.OPTIMIZERS[name]
    theirs = OPTIMIZER_INFO[name].torch_class([torch.zeros(1, requires_grad=True)]).defaults
    assert theirs["lr"] == entry.default_lr
    for key, value in entry.defaults.items():
        assert theirs[key] == value, key
    opt = kpg.KPGOptimizer([nn.Linear(2, 2)], k=1, optimizer=name)
    assert {key: opt.defaults[key] for key in theirs if key in opt.defaults} == {
        key: theirs[key] for key in theirs if key in opt.defaults
    }
    assert set(opt.state_dict()["param_groups"][0]) >= set(entry.defaults) | {"lr", "max_grad_norm"}


@pytest.mark.parametrize("name", sorted(OPTIMIZER_INFO))
def test_state_dicts_have_torch_optims_keys(name):
    """Every parameter's state holds the keys torch.optim's does (NAdam's mu_product beside step);
    kpg counts SGD's steps too, where torch.optim's SGD keeps no count."""
    problem = Problem(name, torch.float64, **OPTIMIZER_INFO[name].configs[-1].hyper)
    for _ in range(2):
        problem.step()
    ours, theirs = problem.kpg.state_dict()["state"], problem.torch.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for index in theirs:
        assert ours[index].keys() - {"step"} == theirs[index].keys() - {"step"}, index
        assert "step" in ours[index]


def test_nadam_refuses_a_state_dict_without_mu_product():
    """A RAdam state dict holds NAdam's group keys and state tensors but no mu_product: loading it
    into NAdam would start every mu_product at 1 mid-run; torch.optim's NAdam fails on it too."""
    radam = Problem("radam", torch.float64)
    radam.step()
    nadam = Problem("nadam", torch.float64)
    before = copy.deepcopy(nadam.kpg.state_dict())
    with pytest.raises(ValueError, match="no 'mu_product', which 'nadam' keeps beside them"):
        nadam.kpg.load_state_dict(radam.torch.state_dict())
    assert nadam.kpg.state_dict()["state"].keys() == before["state"].keys()
