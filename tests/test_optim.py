"""KPGOptimizer against a brute-force KPG written in plain PyTorch.

The brute force keeps separate copies of every agent, evaluates each agent's loss at the mixed
point (own parameters at base, the others at level l-1) with torch.func.functional_call, and steps
one torch.optim optimizer per agent from the base parameters, saving and restoring its state
around every intermediate level, exactly as docs/algorithm.md states the algorithm.
"""

import copy
import math

import pytest
import torch
from cases import OPTIMIZER_INFOS
from torch import nn

import kpg

from helpers import RTOL, Game, assert_close_to_scale, brute_force_step, torch_optimizer

# The table's multi-level configurations (tests/cases.py), every optimizer's.
OPTIMIZERS = {config.desc: (info.name, config.hyper) for info in OPTIMIZER_INFOS for config in info.multi_level_configs}
ONE_PER_OPTIMIZER = [info.multi_level_configs[0].desc for info in OPTIMIZER_INFOS]


def run_both(
    optimizer, k, num_agents, dtype, shared, heterogeneous, closure_style, clip, steps=3, seed=0, device="cpu"
):
    name, hyper = OPTIMIZERS[optimizer]
    ours = Game(num_agents, dtype, heterogeneous, shared, seed, device)
    theirs = copy.deepcopy(ours)
    segments = len(ours.models)
    lrs = [0.05 / (1 + a) for a in range(segments)]
    max_norms = [0.3 + 0.2 * a for a in range(segments)] if clip else None
    opt = kpg.KPGOptimizer(
        ours.models[0] if shared else ours.models,
        k=k,
        optimizer=name,
        lr=lrs[0] if shared else lrs,
        max_grad_norm=(max_norms[0] if shared else max_norms) if clip else None,
        num_agents=num_agents if shared else None,
        **hyper,
    )
    reference_optimizers = [
        torch_optimizer(name, list(m.parameters()), lr, **hyper) for m, lr in zip(theirs.models, lrs)
    ]
    closure = ours.closure_with_context if closure_style == "ctx" else ours.closure_without_context
    for _ in range(steps):
        opt.step(closure)
        brute_force_step(theirs, reference_optimizers, k, max_norms)
    return ours, theirs, opt, reference_optimizers


def assert_same_models(ours, theirs, dtype):
    for a, (m1, m2) in enumerate(zip(ours.models, theirs.models)):
        for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
            assert_close_to_scale(p1.detach(), p2.detach(), RTOL[dtype], what=f"agent {a} {name}")


@pytest.mark.parametrize("clip", [False, True], ids=["no-clip", "clip"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_matches_brute_force_two_heterogeneous_agents(optimizer, k, clip, device):
    ours, theirs, _, _ = run_both(
        optimizer, k, 2, torch.float64, shared=False, heterogeneous=True, closure_style="ctx", clip=clip, device=device
    )
    assert_same_models(ours, theirs, torch.float64)


VARIANTS = {
    "1-agent": dict(num_agents=1, shared=False, heterogeneous=False, closure_style="ctx"),
    "5-agents-heterogeneous": dict(num_agents=5, shared=False, heterogeneous=True, closure_style="ctx"),
    "5-agents-no-context-closure": dict(num_agents=5, shared=False, heterogeneous=True, closure_style="plain"),
    "2-agents-no-context-closure": dict(num_agents=2, shared=False, heterogeneous=False, closure_style="plain"),
    "shared-network-3-agents": dict(num_agents=3, shared=True, heterogeneous=False, closure_style="ctx"),
    "shared-network-1-agent": dict(num_agents=1, shared=True, heterogeneous=False, closure_style="ctx"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("optimizer", ONE_PER_OPTIMIZER)
def test_matches_brute_force_variants(optimizer, variant, k, dtype, device):
    clip = variant.startswith("5")
    ours, theirs, _, _ = run_both(optimizer, k, dtype=dtype, clip=clip, device=device, **VARIANTS[variant])
    assert_same_models(ours, theirs, dtype)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_k1_equals_plain_torch_optim_step(optimizer):
    """k=1 is the ordinary update: the same models stepped by torch.optim on the plain loss."""
    name, hyper = OPTIMIZERS[optimizer]
    ours = Game(3, torch.float32, True, False, seed=1)
    theirs = copy.deepcopy(ours)
    opt = kpg.KPGOptimizer(ours.models, k=1, optimizer=name, lr=0.01, **hyper)
    plain = [torch_optimizer(name, list(m.parameters()), 0.01, **hyper) for m in theirs.models]
    for _ in range(5):
        opt.step(ours.closure_with_context)
        losses = theirs.closure_without_context()
        for o in plain:
            o.zero_grad()
        for i in range(len(plain)):
            grads = torch.autograd.grad(losses[i], list(theirs.models[i].parameters()), retain_graph=True)
            for p, g in zip(theirs.models[i].parameters(), grads):
                p.grad = g
        for o in plain:
            o.step()
    assert_same_models(ours, theirs, torch.float32)


def test_hand_computed_game_shows_k2_differs_from_k1():
    """L(x, y) = (x + 2y - 3)^2 / 2 for both agents, SGD lr 0.1 from (0, 0).
    k=1: dL/dx = -3, dL/dy = -6 -> (0.3, 0.6).
    k=2: x takes dL/dx at (0, 0.6) = -1.8 -> 0.18; y takes dL/dy at (0.3, 0) = -5.4 -> 0.54.
    k=3: x at (0, 0.54): -1.92 -> 0.192; y at (0.18, 0): -5.64 -> 0.564."""
    expected = {1: (0.3, 0.6), 2: (0.18, 0.54), 3: (0.192, 0.564)}
    for k, (x_k, y_k) in expected.items():
        for style in ("ctx", "plain"):
            x = nn.Parameter(torch.zeros((), dtype=torch.float64))
            y = nn.Parameter(torch.zeros((), dtype=torch.float64))
            opt = kpg.KPGOptimizer([[x], [y]], k=k, optimizer="sgd", lr=0.1)

            def game(a, b):
                return (a + 2 * b - 3) ** 2 / 2

            def closure_with_context(ctx):
                with ctx.anticipated():
                    x_anticipated, y_anticipated = x.clone(), y.clone()
                return torch.stack([game(x, y_anticipated), game(x_anticipated, y)])

            def closure_without_context():
                return game(x, y)

            opt.step(closure_with_context if style == "ctx" else closure_without_context)
            assert x.item() == pytest.approx(x_k, abs=1e-12), (k, style)
            assert y.item() == pytest.approx(y_k, abs=1e-12), (k, style)


def test_intermediate_levels_leave_optimizer_state_untouched():
    """State after a k=3 step equals the state after one plain step from the same base with the
    level-3 gradient: the brute force restores it, the kernels never write it."""
    ours, theirs, opt, reference_optimizers = run_both(
        "adam-betas-eps", 3, 2, torch.float64, False, False, "ctx", clip=False, steps=1
    )
    for p, q in zip(
        [p for m in ours.models for p in m.parameters()], [p for m in theirs.models for p in m.parameters()]
    ):
        ours_state = opt.state[p]
        theirs_state = next(o.state[q] for o in reference_optimizers if q in o.state)
        assert float(ours_state["step"]) == float(theirs_state["step"]) == 1.0
        assert_close_to_scale(ours_state["exp_avg"], theirs_state["exp_avg"], 1e-11)
        assert_close_to_scale(ours_state["exp_avg_sq"], theirs_state["exp_avg_sq"], 1e-11)


def test_state_dict_round_trips_exactly_and_matches_torch_layout():
    ours, _, opt, reference_optimizers = run_both(
        "adamw-amsgrad", 2, 2, torch.float32, False, True, "ctx", clip=True, steps=2
    )
    saved = opt.state_dict()
    assert set(saved["state"][0]) == set(reference_optimizers[0].state_dict()["state"][0])
    clone = copy.deepcopy(ours)
    other = kpg.KPGOptimizer(
        clone.models, k=1, optimizer="adamw", lr=[1.0, 1.0], max_grad_norm=None, weight_decay=0.05, amsgrad=True
    )
    other.load_state_dict(saved)
    assert other.k == 2
    assert [g["lr"] for g in other.param_groups] == [g["lr"] for g in opt.param_groups]
    for _ in range(2):
        opt.step(ours.closure_with_context)
        other.step(clone.closure_with_context)
    for p, q in zip(
        [p for m in ours.models for p in m.parameters()], [p for m in clone.models for p in m.parameters()]
    ):
        assert torch.equal(p, q)
    resaved = other.state_dict()
    for index, entry in opt.state_dict()["state"].items():
        for name, tensor in entry.items():
            assert torch.equal(tensor, resaved["state"][index][name])


def test_loads_a_torch_optim_state_dict():
    ours = Game(2, torch.float64, True, False, seed=3)
    theirs = copy.deepcopy(ours)
    reference = [torch.optim.Adam(list(m.parameters()), lr=0.01, foreach=False) for m in theirs.models]
    for _ in range(3):
        losses = theirs.closure_without_context()
        for i, o in enumerate(reference):
            o.zero_grad()
            grads = torch.autograd.grad(losses[i], list(theirs.models[i].parameters()), retain_graph=True)
            for p, g in zip(theirs.models[i].parameters(), grads):
                p.grad = g
            o.step()
    for m_ours, m_theirs in zip(ours.models, theirs.models):
        m_ours.load_state_dict(m_theirs.state_dict())
    opt = kpg.KPGOptimizer(ours.models, k=1, optimizer="adam", lr=0.01)
    merged = {"state": {}, "param_groups": []}
    offset = 0
    for o in reference:
        sd = o.state_dict()
        ids = sd["param_groups"][0]["params"]
        merged["param_groups"].append({**sd["param_groups"][0], "params": [offset + i for i in ids]})
        merged["state"].update({offset + i: sd["state"][i] for i in ids})
        offset += len(ids)
    opt.load_state_dict(merged)
    assert [float(opt.agent_state.step[first]) for first in opt.arena.agent_first_piece[:-1]] == [3.0, 3.0]
    opt.step(ours.closure_with_context)
    losses = theirs.closure_without_context()
    for i, o in enumerate(reference):
        grads = torch.autograd.grad(losses[i], list(theirs.models[i].parameters()), retain_graph=True)
        for p, g in zip(theirs.models[i].parameters(), grads):
            p.grad = g
        o.step()
    assert_same_models(ours, theirs, torch.float64)


def test_lr_scheduler_drives_per_agent_learning_rates():
    game = Game(2, torch.float64, False, False, seed=4)
    opt = kpg.KPGOptimizer(game.models, k=2, optimizer="sgd", lr=[0.1, 0.2])
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(game.closure_with_context)
    scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.1]
    opt.step(game.closure_with_context)
    assert opt.agent_state.lr.tolist() == [0.05, 0.1]


def test_k_schedule_switches_from_2_to_1():
    game = Game(2, torch.float64, False, False, seed=5)
    opt = kpg.KPGOptimizer(game.models, k=3)
    schedule = kpg.KSchedule(opt, switch_step=2)
    ks = []
    for _ in range(4):
        ks.append(opt.k)
        opt.step(game.closure_with_context)
        schedule.step()
    assert ks == [2, 2, 1, 1]
    assert opt.stats.steps == 4
    restored = kpg.KSchedule(opt, switch_step=100)
    restored.load_state_dict(schedule.state_dict())
    assert opt.k == 1 and restored.steps_done == 4


def test_stats_record_every_phase_and_level():
    game = Game(2, torch.float32, False, False, seed=6)
    opt = kpg.KPGOptimizer(game.models, k=2)
    opt.step(game.closure_with_context)
    for phase in ("closure", "anticipated_forward", "backward", "update"):
        assert len(opt.stats.seconds[phase]) == 2 and all(s > 0 for s in opt.stats.seconds[phase]), phase
    assert "level 2" in opt.stats.summary()
    with torch.profiler.profile() as prof:
        opt.step(game.closure_with_context)
    names = {e.name for e in prof.events()}
    assert {"kpg/level1/update", "kpg/level2/update", "kpg/level2/anticipated_forward", "kpg/level1/backward"} <= names


def test_anticipated_swaps_storage_without_copying():
    game = Game(2, torch.float32, False, False, seed=7)
    opt = kpg.KPGOptimizer(game.models, k=2)
    weight = game.models[0][0].weight
    seen = {}

    def closure(ctx):
        with ctx.anticipated():
            seen[ctx.level] = (weight.data_ptr(), torch.is_grad_enabled())
        assert weight.data_ptr() == opt.arena.param_views[0].data_ptr()
        return game.closure_with_context(ctx)

    opt.step(closure)
    anticipated_start = opt.agent_state.anticipated.data_ptr()
    assert seen[1] == (opt.arena.param.data_ptr(), False)
    assert seen[2] == (anticipated_start, False)


def test_does_not_touch_gradients_of_other_tensors():
    """The critic's parameters sit in the actor loss; kpg backpropagates only into the agents."""
    game = Game(2, torch.float32, False, False, seed=8)
    for p in game.critic.parameters():
        p.requires_grad_(True)
    opt = kpg.KPGOptimizer(game.models, k=2)
    opt.step(game.closure_with_context)
    assert all(p.grad is None for p in game.critic.parameters())


def test_skip_mode_skips_only_the_agent_with_a_nonfinite_loss():
    game = Game(3, torch.float64, False, False, seed=9)
    before = [[p.detach().clone() for p in m.parameters()] for m in game.models]
    opt = kpg.KPGOptimizer(game.models, k=2, nonfinite="skip")

    def closure(ctx):
        losses = game.closure_with_context(ctx)
        return losses * torch.tensor([1.0, math.nan, 1.0], dtype=losses.dtype)

    opt.step(closure)
    changed = [not all(torch.equal(p, b) for p, b in zip(m.parameters(), bs)) for m, bs in zip(game.models, before)]
    assert changed == [True, False, True]
    assert opt.stats.skipped_agent_steps == 1
    assert [float(opt.agent_state.step[first]) for first in opt.arena.agent_first_piece[:-1]] == [1.0, 0.0, 1.0]
