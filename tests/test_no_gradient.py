"""A parameter that backward does not reach is not stepped, as torch.optim skips a parameter whose
``.grad`` is None (issue 25 item 2): no weight decay, momentum, Adam moments or step count for it, at
k = 1 (against torch.optim) and at every level (against the brute-force KPG)."""

import copy

import pytest
import torch
from cases import CONFIGS, OPTIMIZER_INFOS
from torch import nn

import kpg

from helpers import RTOL, Game, assert_close_to_scale, brute_force_step, torch_optimizer

# The table's configurations (tests/cases.py); the multi-level ones for the brute force.
OPTIMIZERS = {desc: (info.name, config.hyper) for desc, (info, config) in CONFIGS.items()}
MULTI_LEVEL = [config.desc for info in OPTIMIZER_INFOS for config in info.multi_level_configs]
ONE_PER_OPTIMIZER = [info.multi_level_configs[0].desc for info in OPTIMIZER_INFOS]


class TwoHeads(nn.Module):
    """A body and two heads, of which a step uses one (or, for some agents, none)."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(3, 4).double()
        self.heads = nn.ModuleList([nn.Linear(4, 1).double(), nn.Linear(4, 1).double()])

    def loss(self, head):
        x = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3)
        return self.heads[head](torch.tanh(self.body(x))).square().mean() + 0.1


def losses(models, unrelated, step):
    """Step t: agent 0 uses head t % 2; agent 1 uses head (t + 1) % 2, except every third step,
    where its loss depends only on a leaf outside the optimizer (a critic parameter, say)."""
    agent1 = unrelated.square().sum() if step % 3 == 2 else models[1].loss((step + 1) % 2)
    return torch.stack([models[0].loss(step % 2), agent1])


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_k1_equals_torch_optim_when_parameters_get_no_gradient(optimizer):
    name, hyper = OPTIMIZERS[optimizer]
    ours = [TwoHeads(0), TwoHeads(1)]
    theirs = copy.deepcopy(ours)
    unrelated = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    opt = kpg.KPGOptimizer(ours, k=1, optimizer=name, lr=0.1, **hyper)
    reference = torch_optimizer(name, [p for m in theirs for p in m.parameters()], 0.1, **hyper)
    for step in range(6):
        opt.step(lambda ctx, step=step: losses(ours, unrelated, step))
        reference.zero_grad(set_to_none=True)
        losses(theirs, unrelated, step).sum().backward()
        reference.step()
        for a, (mine, torchs) in enumerate(zip(ours, theirs)):
            for (parameter, p), q in zip(mine.named_parameters(), torchs.parameters()):
                assert_close_to_scale(p.detach(), q.detach(), 1e-13, what=f"step {step} agent {a} {parameter}")
                if name != "sgd":  # torch.optim's SGD keeps no step count
                    theirs_step = float(reference.state.get(q, {}).get("step", 0.0))
                    assert float(opt.state[p]["step"]) == theirs_step, f"step {step} agent {a} {parameter}"
    if name != "sgd":
        assert [float(opt.state[p]["step"]) for p in ours[1].parameters()] == [4.0, 4.0, 2.0, 2.0, 2.0, 2.0]


class GameWithSpares(Game):
    """The brute-force test game, with a parameter in every agent's model that its policy never
    reads, and agent 1's loss depending only on a leaf outside the optimizer.

    "Reached" is autograd's: a parameter reached through an operation whose gradient is zero (the
    unselected branch of joint_inputs' torch.where, an entry of a stacked loss vector) gets a zero
    gradient, not None, and torch.optim steps it. The closure with ctx detaches agent 1's own
    actions and the brute force computes agent 1's loss on its own, so neither reaches agent 1; the
    closure without ctx returns one stacked vector, whose entry 1 reaches every agent, in kpg and in
    the brute force alike.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for a, model in enumerate(self.models):
            model.register_parameter("spare", nn.Parameter(torch.full((2,), 1.0 + a, dtype=torch.float64)))
        self.unrelated = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)

    def agent_losses(self, joint):
        losses = super().agent_losses(joint)
        return torch.stack([losses[0], self.unrelated.square().sum(), *losses[2:]])

    def brute_force_loss(self, segment, own, anticipated):
        if segment == 1 and self.agent1_alone:
            return self.unrelated.square().sum()
        return super().brute_force_loss(segment, own, anticipated)

    def closure_with_context(self, ctx):
        """As Game's, with agent 1's own actions detached: joint_inputs' torch.where would otherwise
        reach them through its unselected branches (a zero gradient, which torch.optim steps)."""
        own = self.actions()
        own[1] = own[1].detach()
        with ctx.anticipated():
            anticipated = self.actions()
        return self.agent_losses(kpg.joint_inputs(own, anticipated))


@pytest.mark.parametrize("closure_style", ["ctx", "no-ctx"])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("optimizer", MULTI_LEVEL)
def test_every_level_leaves_parameters_without_gradient_as_brute_force(optimizer, k, closure_style):
    name, hyper = OPTIMIZERS[optimizer]
    ours = GameWithSpares(3, torch.float64, True, False, seed=4)
    ours.agent1_alone = closure_style == "ctx"
    theirs = copy.deepcopy(ours)
    theirs.unrelated = ours.unrelated
    before = [[p.detach().clone() for p in m.parameters()] for m in ours.models]
    opt = kpg.KPGOptimizer(ours.models, k=k, optimizer=name, lr=0.05, **hyper)
    reference = [torch_optimizer(name, list(m.parameters()), 0.05, **hyper) for m in theirs.models]
    closure = ours.closure_with_context if closure_style == "ctx" else ours.closure_without_context
    for _ in range(3):
        opt.step(closure)
        brute_force_step(theirs, reference, k, None)
    for a, (m1, m2) in enumerate(zip(ours.models, theirs.models)):
        for (parameter, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
            assert_close_to_scale(p1.detach(), p2.detach(), RTOL[torch.float64], what=f"agent {a} {parameter}")
    if closure_style == "ctx":
        assert all(torch.equal(p, b) for p, b in zip(ours.models[1].parameters(), before[1]))
    assert all(torch.equal(m.spare, b[0]) for m, b in zip(ours.models, before))  # spare is listed first


@pytest.mark.parametrize("optimizer", ONE_PER_OPTIMIZER)
def test_an_unused_layer_of_an_agent_batched_model_is_not_stepped(optimizer):
    """kpg.nn: an agent-batched layer the loss does not use gets no gradient in torch.optim (over the
    same batched model), and every agent's slice of it stays as it is in kpg."""
    name, hyper = OPTIMIZERS[optimizer]
    torch.manual_seed(0)
    ours = nn.ModuleList(
        [kpg.nn.AgentLinear(3, 2, 4, dtype=torch.float64), kpg.nn.AgentLinear(3, 4, 1, dtype=torch.float64)]
    )
    theirs = copy.deepcopy(ours)
    x = torch.linspace(-1, 1, 3 * 5 * 2, dtype=torch.float64).reshape(3, 5, 2)
    opt = kpg.KPGOptimizer(ours, k=1, optimizer=name, lr=0.1, **hyper)
    reference = torch_optimizer(name, list(theirs.parameters()), 0.1, **hyper)
    for step in range(3):
        layers = 2 if step == 1 else 1  # the second layer is used at step 1 only
        opt.step(lambda ctx, layers=layers: torch.nn.Sequential(*ours[:layers])(x).square().mean(dim=(1, 2)))
        reference.zero_grad(set_to_none=True)
        torch.nn.Sequential(*theirs[:layers])(x).square().mean(dim=(1, 2)).sum().backward()
        reference.step()
        for p, q in zip(ours.parameters(), theirs.parameters()):
            assert_close_to_scale(p.detach(), q.detach(), 1e-13, what=f"step {step}")
