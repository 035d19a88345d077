"""Inputs that used to give a silent wrong result (issue 25, items 3, 6 and 7): each is now either taken
as torch.optim takes it or refused with a message naming it, and a refusal changes nothing."""

import numpy as np
import pytest
import torch
from torch import nn

import kpg


def two_agents(dtype=torch.float64):
    torch.manual_seed(0)
    return [nn.Linear(3, 2).to(dtype), nn.Linear(4, 1).to(dtype)]


def quadratic_closure(models):
    def closure(ctx):
        x = [torch.linspace(-1, 1, 3, dtype=torch.float64), torch.linspace(0, 1, 4, dtype=torch.float64)]
        return torch.stack([m(xi).square().sum() for m, xi in zip(models, x)])

    return closure


def snapshot(opt):
    """Parameters, state buffers and step counts, bit for bit."""
    state = [b.clone() for b in opt.agent_state.state_buffers.values() if b is not None]
    return [opt.arena.param.clone(), *state, opt.agent_state.step.clone(), opt.agent_state.live.clone()]


def assert_unchanged(before, after):
    assert len(before) == len(after)
    for b, a in zip(before, after):
        assert torch.equal(b, a)


# ---- item 3: values that pass validation must not write NaN ------------------------------------


def stepped(optimizer, **options):
    models = two_agents()
    opt = kpg.KPGOptimizer(models, k=1, optimizer=optimizer, lr=0.1, **options)
    opt.step(quadratic_closure(models))
    return models, opt


@pytest.mark.parametrize(
    "optimizer,name,value,message",
    [
        ("adam", "step", -1.0, r"saved 'step' is -1.0"),
        ("adam", "step", float("nan"), r"saved 'step' is nan"),
        ("adam", "exp_avg_sq", -1.0, r"'exp_avg_sq' .* holds negative values"),
        ("rmsprop", "square_avg", -1.0, r"'square_avg' .* holds negative values"),
        ("adagrad", "sum", -1.0, r"'sum' .* holds negative values"),
    ],
)
def test_load_refuses_state_that_would_write_nan(optimizer, name, value, message):
    models, opt = stepped(optimizer)
    saved = opt.state_dict()
    for entry in saved["state"].values():
        entry[name] = torch.full_like(torch.as_tensor(entry[name]), value)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(saved)
    assert_unchanged(before, snapshot(opt))
    opt.step(quadratic_closure(models))
    assert torch.isfinite(opt.arena.param).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_a_tensor_lr_changed_in_place_is_refused_before_anything_changes(bad):
    models = two_agents()
    lr = torch.tensor(0.1, dtype=torch.float64)
    opt = kpg.KPGOptimizer(models, k=2, optimizer="sgd", lr=lr, nonfinite="skip")
    opt.step(quadratic_closure(models))
    lr.fill_(bad)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"Invalid learning rate .* in the tensor lr of agent\(s\) 0, 1"):
        opt.step(quadratic_closure(models))
    assert_unchanged(before, snapshot(opt))
    lr.fill_(0.05)
    opt.step(quadratic_closure(models))
    assert torch.isfinite(opt.arena.param).all()


def test_raise_rolls_back_an_update_that_overflows():
    """Finite losses and gradients, but an lr of 1e300 in float64 overflows the parameters: with
    nonfinite='raise' the step raises and changes nothing, instead of returning with inf weights."""
    models = two_agents()
    opt = kpg.KPGOptimizer(models, k=2, optimizer="sgd", lr=0.1, momentum=0.9)
    opt.step(quadratic_closure(models))  # momentum buffers become live
    opt.param_groups[1]["lr"] = 1e308
    with torch.no_grad():
        models[1].weight.fill_(1e10)  # a gradient of about 1e10: 1e308 * 1e10 overflows
    before = snapshot(opt)
    with pytest.raises(FloatingPointError, match=r"agent 1's parameters or optimizer state inf or NaN.*rolled back"):
        opt.step(quadratic_closure(models))
    assert_unchanged(before, snapshot(opt))


def test_adam_without_eps_on_a_zero_gradient_raises_instead_of_writing_nan():
    """eps=0 is a valid Adam setting, and Adam's first step on a zero gradient is 0/0 (NaN in torch.optim too)."""
    weight = nn.Parameter(torch.ones(3, dtype=torch.float64))
    other = nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = kpg.KPGOptimizer([[weight], [other]], k=1, optimizer="adam", eps=0.0)
    before = snapshot(opt)
    with pytest.raises(FloatingPointError, match=r"agent 0's parameters or optimizer state inf or NaN"):
        opt.step(lambda ctx: torch.stack([(weight * 0).sum(), other.square().sum()]))
    assert_unchanged(before, snapshot(opt))


# ---- item 6: state dicts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "theirs,ours,found",
    [
        (torch.optim.SGD, "adam", "'dampening', 'momentum', 'nesterov'.*state dict of 'sgd'"),
        (torch.optim.Adam, "sgd", "'amsgrad', 'betas', 'decoupled_weight_decay', 'eps'.*state dict of 'adam'"),
        (torch.optim.RMSprop, "adam", "'alpha', 'centered', 'momentum'.*state dict of 'rmsprop'"),
        (torch.optim.Adagrad, "rmsprop", "'initial_accumulator_value', 'lr_decay'.*state dict of 'adagrad'"),
    ],
)
def test_a_state_dict_of_another_optimizer_is_refused(theirs, ours, found):
    models = two_agents()
    opt = kpg.KPGOptimizer(models, k=1, optimizer=ours, lr=0.1)
    opt.step(quadratic_closure(models))
    foreign = theirs([{"params": list(m.parameters())} for m in models], lr=0.5)
    before, groups = snapshot(opt), [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=rf"holds {found}"):
        opt.load_state_dict(foreign.state_dict())
    assert_unchanged(before, snapshot(opt))
    assert [dict(g) for g in opt.param_groups] == groups


def test_a_state_dict_restores_k_and_nonfinite_together():
    models = two_agents()
    saved = kpg.KPGOptimizer(models, k=3, optimizer="sgd", nonfinite="skip").state_dict()
    opt = kpg.KPGOptimizer(two_agents(), k=1, optimizer="sgd", nonfinite="raise")
    opt.load_state_dict(saved)
    assert (opt.k, opt.nonfinite) == (3, "skip")
    saved["kpg"]["nonfinite"] = "ignore"
    with pytest.raises(ValueError, match=r"nonfinite='ignore' is not one of 'raise', 'skip', 'propagate'"):
        opt.load_state_dict(saved)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("early_k", 0, r"k must be an int >= 1"),
        ("late_k", 1.5, r"k must be an int >= 1"),
        ("steps_done", -1, r"steps_done must be an int >= 0"),
        ("switch_step", "10", r"switch_step must be an int >= 0"),
    ],
)
def test_kschedule_load_state_dict_is_validated(key, value, message):
    opt = kpg.KPGOptimizer(two_agents(), optimizer="sgd")
    schedule = kpg.KSchedule(opt, switch_step=5)
    state = {**schedule.state_dict(), key: value}
    with pytest.raises(ValueError, match=message):
        schedule.load_state_dict(state)
    assert schedule.state_dict() == {"steps_done": 0, "switch_step": 5, "early_k": 2, "late_k": 1}
    assert opt.k == 2


# ---- item 7: ambiguous inputs -------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(lr="1234"), r"lr='1234' is a str; pass a number"),
        (dict(lr=["0.1", "0.2"]), r"lr\[0\]='0.1' is a str; pass a number for each agent"),
        (dict(max_grad_norm="1.0"), r"max_grad_norm='1.0' is a str"),
    ],
)
def test_strings_are_refused_where_numbers_are_expected(options, message):
    with pytest.raises((TypeError, ValueError), match=message):
        kpg.KPGOptimizer(two_agents(), optimizer="sgd", **options)


@pytest.mark.parametrize("make", [np.float32, np.int64], ids=lambda f: f.__name__)
def test_numpy_scalars_are_taken_as_torch_optim_takes_them(make):
    models = two_agents()
    theirs = [nn.Linear(3, 2).double(), nn.Linear(4, 1).double()]
    for t, m in zip(theirs, models):
        t.load_state_dict(m.state_dict())
    opt = kpg.KPGOptimizer(models, k=1, optimizer="sgd", lr=make(1), momentum=make(0.5) if make is not np.int64 else 0)
    reference = torch.optim.SGD(
        [p for t in theirs for p in t.parameters()],
        lr=make(1),
        momentum=make(0.5) if make is not np.int64 else 0,
        foreach=False,
    )
    opt.param_groups[1]["lr"] = make(1)
    opt.step(quadratic_closure(models))
    reference.zero_grad()
    quadratic_closure(theirs)(None).sum().backward()
    reference.step()
    for t, m in zip(theirs, models):
        for a, b in zip(t.parameters(), m.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_non_leaf_tensors_are_refused():
    leaf = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"agent 1 has a non-leaf tensor of shape \(3,\) .*pass leaf tensors"):
        kpg.KPGOptimizer([[torch.ones(2, requires_grad=True)], [leaf * 2]])


@pytest.mark.parametrize("container", [nn.ModuleList, nn.ModuleDict])
def test_module_containers_are_refused_with_both_meanings(container):
    nets = [nn.Linear(2, 2), nn.Linear(2, 2)]
    agents = nn.ModuleList(nets) if container is nn.ModuleList else nn.ModuleDict({"a": nets[0], "b": nets[1]})
    entries = r"list\(agents\)" if container is nn.ModuleList else r"list\(agents.values\(\)\)"
    with pytest.raises(TypeError, match=rf"KPGOptimizer\({entries}, ...\) for one agent per entry.*shared by all"):
        kpg.KPGOptimizer(agents)
    assert kpg.KPGOptimizer(list(agents) if container is nn.ModuleList else list(agents.values())).num_agents == 2
