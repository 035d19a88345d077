"""KPGOptimizer's errors: clear messages, raised before anything changes (atomic steps)."""

import copy
import math

import pytest
import torch
from torch import nn

import kpg


def two_agents(dtype=torch.float32):
    torch.manual_seed(0)
    return [nn.Linear(3, 2).to(dtype), nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).to(dtype)]


CONSTRUCTION_ERRORS = [
    ("k-zero", lambda: kpg.KPGOptimizer(two_agents(), k=0), ValueError, r"k must be an int >= 1.*got 0"),
    ("k-float", lambda: kpg.KPGOptimizer(two_agents(), k=1.5), ValueError, r"k must be an int >= 1"),
    ("k-bool", lambda: kpg.KPGOptimizer(two_agents(), k=True), ValueError, r"k must be an int >= 1"),
    (
        "unknown-optimizer",
        lambda: kpg.KPGOptimizer(two_agents(), optimizer="lion"),
        ValueError,
        r"unknown optimizer 'lion'; choose one of sgd, adam, adamw, rmsprop",
    ),
    (
        "unknown-hyperparameter",
        lambda: kpg.KPGOptimizer(two_agents(), optimizer="sgd", betas=(0.9, 0.9)),
        TypeError,
        r"unknown hyperparameter\(s\) betas for optimizer 'sgd'",
    ),
    (
        "float16",
        lambda: kpg.KPGOptimizer([nn.Linear(2, 2).half()]),
        TypeError,
        r"agent 0's parameter 0 has dtype torch.float16; kpg supports float32 and float64",
    ),
    (
        "mixed-dtypes",
        lambda: kpg.KPGOptimizer([nn.Linear(2, 2), nn.Linear(2, 2).double()]),
        ValueError,
        r"agent 1's parameter 0 is torch.float64 on cpu but the first parameter is torch.float32",
    ),
    (
        "mixed-devices",
        lambda: kpg.KPGOptimizer([nn.Linear(2, 2), nn.Linear(2, 2, device="meta")]),
        ValueError,
        r"agent 1's parameter 0 .* on meta but the first parameter is .* on cpu; move every agent to one device",
    ),
    (
        "parameter-under-two-agents",
        lambda: (lambda m: kpg.KPGOptimizer([m, [m.weight]]))(nn.Linear(2, 2)),
        ValueError,
        r"listed twice \(agents 0 and 1\)",
    ),
    ("no-agents", lambda: kpg.KPGOptimizer([]), ValueError, r"got no agents"),
    (
        "agent-without-trainable",
        lambda: kpg.KPGOptimizer([nn.Linear(2, 2), nn.Linear(2, 2).requires_grad_(False)]),
        ValueError,
        r"agent 1 has no trainable parameters",
    ),
    (
        "lr-length",
        lambda: kpg.KPGOptimizer(two_agents(), lr=[0.1, 0.2, 0.3]),
        ValueError,
        r"lr has 3 entries but there are 2 agents",
    ),
    (
        "lr-negative",
        lambda: kpg.KPGOptimizer(two_agents(), lr=[0.1, -0.2]),
        ValueError,
        r"Invalid learning rate -0.2 for agent 1",
    ),
    (
        "max-grad-norm-zero",
        lambda: kpg.KPGOptimizer(two_agents(), max_grad_norm=0.0),
        ValueError,
        r"Invalid max_grad_norm 0.0 for agent 0",
    ),
    (
        "per-agent-lr-with-sharing",
        lambda: kpg.KPGOptimizer(nn.Linear(2, 2), lr=[0.1, 0.2]),
        ValueError,
        r"lr is per agent but the agents share one network",
    ),
    (
        "nonfinite-policy",
        lambda: kpg.KPGOptimizer(two_agents(), nonfinite="ignore"),
        ValueError,
        r"nonfinite must be one of 'raise', 'skip', 'propagate'",
    ),
    (
        "beta-one",
        lambda: kpg.KPGOptimizer(two_agents(), betas=(0.9, 1.0)),
        ValueError,
        r"Invalid beta parameter at index 1: 1.0",
    ),
    (
        "nesterov-without-momentum",
        lambda: kpg.KPGOptimizer(two_agents(), optimizer="sgd", nesterov=True),
        ValueError,
        r"Nesterov momentum requires a momentum",
    ),
    (
        "single-tensor",
        lambda: kpg.KPGOptimizer(torch.zeros(2, requires_grad=True)),
        TypeError,
        r"got a single tensor: wrap it in a list",
    ),
    (
        "num-agents-mismatch",
        lambda: kpg.KPGOptimizer(two_agents(), num_agents=3),
        ValueError,
        r"num_agents=3 but 2 agents were given",
    ),
]


@pytest.mark.parametrize(
    "build,error,message", [c[1:] for c in CONSTRUCTION_ERRORS], ids=[c[0] for c in CONSTRUCTION_ERRORS]
)
def test_construction_errors(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_failed_construction_leaves_models_untouched():
    models = [nn.Linear(2, 2), nn.Linear(2, 2).double()]
    pointers = [p.data_ptr() for m in models for p in m.parameters()]
    with pytest.raises(ValueError):
        kpg.KPGOptimizer(models)
    assert pointers == [p.data_ptr() for m in models for p in m.parameters()]


class Problem:
    """Two agents with a coupled loss; `closure(ctx)` can be told to fail in several ways."""

    def __init__(self, nonfinite="raise"):
        self.models = two_agents()
        self.inputs = [torch.randn(7, 3), torch.randn(7, 4)]
        self.optimizer = kpg.KPGOptimizer(
            self.models, k=3, optimizer="adam", lr=0.01, max_grad_norm=1.0, nonfinite=nonfinite
        )
        self.optimizer.step(self.closure)  # non-trivial optimizer state

    def losses(self, outputs, anticipated):
        a, b = outputs
        a_anticipated, b_anticipated = anticipated
        return torch.stack(
            [
                (a.sum(1) * b_anticipated.squeeze(1)).square().mean(),
                (a_anticipated.sum(1) - b.squeeze(1)).square().mean(),
            ]
        )

    def closure(self, ctx, fail_at_level=None, failure=None):
        outputs = [m(x) for m, x in zip(self.models, self.inputs)]
        with ctx.anticipated():
            anticipated = [m(x) for m, x in zip(self.models, self.inputs)]
        losses = self.losses(outputs, anticipated)
        if ctx.level != fail_at_level:
            return losses
        return failure(losses)

    def snapshot(self):
        return {
            "params": [p.detach().clone() for m in self.models for p in m.parameters()],
            "pointers": [p.data_ptr() for m in self.models for p in m.parameters()],
            "grad_views": [p.grad for m in self.models for p in m.parameters()],
            "state": copy.deepcopy(self.optimizer.state_dict()),
        }

    def assert_unchanged(self, before):
        after = self.snapshot()
        assert all(torch.equal(a, b) for a, b in zip(after["params"], before["params"])), "parameters changed"
        assert after["pointers"] == before["pointers"], "parameters left bound to the anticipated buffer"
        assert all(a is b for a, b in zip(after["grad_views"], before["grad_views"])), (
            "gradients unbound from the arena"
        )
        for index, entry in before["state"]["state"].items():
            for name, tensor in entry.items():
                assert torch.equal(after["state"]["state"][index][name], tensor), f"optimizer state {name} changed"


def raise_error(_):
    raise KeyError("user code failed")


STEP_ERRORS = [
    ("closure-raises", raise_error, KeyError, r"user code failed"),
    (
        "loss-not-a-tensor",
        lambda losses: float(losses.detach().sum()),
        TypeError,
        r"returned float at level \d; it must return the loss as a tensor",
    ),
    (
        "loss-2d",
        lambda losses: losses.reshape(1, 2),
        ValueError,
        r"loss of shape \(1, 2\) at level \d; expected a scalar or one loss per agent, shape \(2,\)",
    ),
    (
        "loss-wrong-length",
        lambda losses: torch.cat([losses, losses]),
        ValueError,
        r"returned 4 losses at level \d; expected a scalar or one per agent \(2\)",
    ),
    ("loss-integer", lambda losses: losses.long(), TypeError, r"returned a torch.int64 loss"),
    (
        "loss-without-gradient",
        lambda losses: losses.detach(),
        ValueError,
        r"does not depend on any agent's base parameters",
    ),
    (
        "loss-nan",
        lambda losses: losses * torch.tensor([1.0, math.nan]),
        FloatingPointError,
        r"agent 1's loss is not finite at level \d; the step was rolled back and nothing changed; pass "
        r"nonfinite='skip'",
    ),
    (
        "gradient-inf",
        lambda losses: losses + torch.tensor([0.0, 1.0]) * infinite_slope_at_agent_1(),
        FloatingPointError,
        r"agent 1's gradient is not finite at level \d; the step was rolled back",
    ),
]

_current = {}


def infinite_slope_at_agent_1():
    """Zero in value, infinite in gradient: sqrt at 0 of a function of agent 1's weights."""
    weight_sum = _current["problem"].models[1][0].weight.sum()
    return torch.sqrt(weight_sum - weight_sum.detach())


@pytest.mark.parametrize("level", [1, 2, 3])
@pytest.mark.parametrize("failure,error,message", [c[1:] for c in STEP_ERRORS], ids=[c[0] for c in STEP_ERRORS])
def test_failed_step_changes_nothing_and_the_next_step_works(failure, error, message, level):
    problem = Problem()
    _current["problem"] = problem
    twin = Problem()
    before = problem.snapshot()
    with pytest.raises(error, match=message):
        problem.optimizer.step(lambda ctx: problem.closure(ctx, level, failure))
    problem.assert_unchanged(before)
    problem.optimizer.step(problem.closure)
    twin.optimizer.step(twin.closure)
    for p, q in zip(
        [p for m in problem.models for p in m.parameters()], [p for m in twin.models for p in m.parameters()]
    ):
        assert torch.equal(p, q), "the step after a failure differs from an undisturbed step"


def test_step_without_closure_explains_why_it_is_needed():
    problem = Problem()
    with pytest.raises(ValueError, match="needs a closure: each level re-evaluates the loss"):
        problem.optimizer.step()


def test_shared_network_needs_a_context_closure():
    model = nn.Linear(2, 1)
    opt = kpg.KPGOptimizer(model, k=2)
    with pytest.raises(ValueError, match="with parameter sharing the closure must take ctx"):
        opt.step(lambda: model(torch.ones(1, 2)).sum())


def test_changing_k_to_zero_between_steps_is_rejected_before_the_step():
    problem = Problem()
    before = problem.snapshot()
    problem.optimizer.k = 0
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        problem.optimizer.step(problem.closure)
    problem.assert_unchanged(before)


def test_adding_parameter_groups_is_refused():
    problem = Problem()
    with pytest.raises(RuntimeError, match="agents are fixed at construction"):
        problem.optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def test_user_cleared_gradients_are_rebound_to_the_arena():
    problem = Problem()
    for m in problem.models:
        m.zero_grad(set_to_none=True)
    problem.optimizer.step(problem.closure)
    arena = problem.optimizer.arena
    assert all(p.grad is v for p, v in zip(arena.parameters, arena.grad_views))


def test_load_state_dict_rejects_mismatches_without_changing_anything():
    problem = Problem()
    saved = problem.optimizer.state_dict()
    before = problem.snapshot()
    wrong_shape = copy.deepcopy(saved)
    wrong_shape["state"][0]["exp_avg"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"'exp_avg' of agent 0's parameter has shape \(5,\), expected \(2, 3\)"):
        problem.optimizer.load_state_dict(wrong_shape)
    other_optimizer = copy.deepcopy(saved)
    other_optimizer["kpg"]["optimizer"] = "sgd"
    with pytest.raises(ValueError, match="is for optimizer 'sgd', this one is 'adam'"):
        problem.optimizer.load_state_dict(other_optimizer)
    fewer_groups = copy.deepcopy(saved)
    fewer_groups["param_groups"] = fewer_groups["param_groups"][:1]
    with pytest.raises(ValueError, match="has 1 parameter groups, this optimizer 2"):
        problem.optimizer.load_state_dict(fewer_groups)
    problem.assert_unchanged(before)


def test_copying_is_refused_with_the_alternative():
    with pytest.raises(TypeError, match="cannot be pickled or deep-copied.*save optimizer.state_dict"):
        copy.deepcopy(Problem().optimizer)


def test_repr_names_the_agents():
    problem = Problem()
    assert "2 agents" in repr(problem.optimizer) and "k=3" in repr(problem.optimizer)
    assert "one network shared by all agents" in repr(kpg.KPGOptimizer(nn.Linear(2, 2)))
