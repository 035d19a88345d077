"""kpg.nn's agent-batched layers against per-agent torch.nn modules, and KPGOptimizer on a batched
model against the same steps on the equivalent list of per-agent models.

Layers: outputs and gradients equal their per-agent counterparts (float64 to rounding; float32 no
further from the float64 truth than twice what torch.nn's own float32 error is), initialisation
draws exactly what torch.nn's draws, stack/unstack round-trip. Optimizer: k = 1..3, Adam and SGD,
per-agent learning rates and clipping, skipped agents, every closure style, state dicts.
"""

import json
import math
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from cases import OPTIMIZER_INFOS
from torch import nn
from torch.func import functional_call

import kpg
import kpg.nn as knn
from kpg import _ops as ops
from kpg.arena import ParameterArena

from helpers import CUDA_SKIP_REASON, RTOL, assert_as_accurate_as, assert_close_to_scale

ROOT = Path(__file__).parents[1]
RTOL64 = RTOL[torch.float64]
AGENT_COUNTS = [1, 3, 257]

# name -> (per-agent module factory, input feature shape, extra batch dims, takes a hidden state)
LAYERS = {
    "linear": (lambda: nn.Linear(5, 3), (5,), (), False),
    "linear-no-bias": (lambda: nn.Linear(5, 3, bias=False), (5,), (2,), False),
    "layer-norm": (lambda: nn.LayerNorm(4), (4,), (), False),
    "layer-norm-2d-no-bias": (lambda: nn.LayerNorm((2, 3), bias=False), (2, 3), (), False),
    "gru": (lambda: nn.GRUCell(4, 6), (4,), (), True),
    "gru-no-bias": (lambda: nn.GRUCell(4, 6, bias=False), (4,), (), True),
    "mlp-tanh": (
        lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)),
        (4,),
        (),
        False,
    ),
    "mlp-relu-layer-norm": (
        lambda: nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2)),
        (4,),
        (),
        False,
    ),
    "nested-gelu": (
        lambda: nn.Sequential(nn.Sequential(nn.Linear(3, 5), nn.GELU()), nn.Linear(5, 2)),
        (3,),
        (2,),
        False,
    ),
}
SAMPLES = 6


def per_agent_and_batched(layer, num_agents, dtype, seed=0):
    factory = LAYERS[layer][0]
    torch.manual_seed(seed)
    modules = [factory().to(dtype) for _ in range(num_agents)]
    for module in modules:  # LayerNorm starts at ones and zeros: move it off them
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return modules, knn.stack(modules)


def layer_inputs(layer, num_agents, dtype, seed=1):
    _, features, extra, recurrent = LAYERS[layer]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_agents, *extra, SAMPLES, *features, dtype=dtype, generator=g)
    hidden = torch.randn(num_agents, *extra, SAMPLES, 6, dtype=dtype, generator=g) if recurrent else None
    return x, hidden


def run_per_agent(modules, x, hidden):
    outputs = [m(x[a], hidden[a]) if hidden is not None else m(x[a]) for a, m in enumerate(modules)]
    return torch.stack(outputs)


def run_batched(batched, x, hidden):
    return batched(x, hidden) if hidden is not None else batched(x)


def outputs_and_gradients(modules, batched, x, hidden):
    """(per-agent output, batched output, stacked per-agent gradients, batched gradients) of the
    same random weighting of the outputs."""
    per_agent_out = run_per_agent(modules, x, hidden)
    batched_out = run_batched(batched, x, hidden)
    weights = torch.randn(per_agent_out.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(2))
    (per_agent_out * weights).sum().backward()
    (batched_out * weights).sum().backward()
    stacked = [torch.stack([p.grad for p in ps]) for ps in zip(*(m.parameters() for m in modules))]
    return per_agent_out.detach(), batched_out.detach(), stacked, [p.grad for p in batched.parameters()]


@pytest.mark.parametrize("num_agents", AGENT_COUNTS)
@pytest.mark.parametrize("layer", LAYERS)
def test_batched_layer_equals_per_agent_modules_float64(layer, num_agents):
    modules, batched = per_agent_and_batched(layer, num_agents, torch.float64)
    x, hidden = layer_inputs(layer, num_agents, torch.float64)
    expected, actual, expected_grads, actual_grads = outputs_and_gradients(modules, batched, x, hidden)
    assert_close_to_scale(actual, expected, RTOL64, what="output")
    assert len(actual_grads) == len(expected_grads) > 0
    for index, (a, e) in enumerate(zip(actual_grads, expected_grads)):
        assert_close_to_scale(a, e, RTOL64, what=f"gradient of parameter {index}")


@pytest.mark.parametrize("layer", LAYERS)
def test_batched_layer_float32_is_as_accurate_as_torch_nn(layer):
    num_agents = 3
    truth = outputs_and_gradients(
        *per_agent_and_batched(layer, num_agents, torch.float64), *layer_inputs(layer, num_agents, torch.float64)
    )
    modules, batched = per_agent_and_batched(layer, num_agents, torch.float64)
    modules, batched = [m.float() for m in modules], batched.float()
    x, hidden = layer_inputs(layer, num_agents, torch.float64)
    ours = outputs_and_gradients(modules, batched, x.float(), None if hidden is None else hidden.float())
    expected_out, actual_out, expected_grads, actual_grads = ours
    assert_as_accurate_as(actual_out, expected_out, truth[0], 1e-6, what="output")
    for index, (a, e, t) in enumerate(zip(actual_grads, expected_grads, truth[2])):
        assert_as_accurate_as(a, e, t, 1e-6, what=f"gradient of parameter {index}")


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer-norm"])
@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid", "gelu"])
def test_agent_mlp_equals_its_unstacked_modules(activation, layer_norm):
    """AgentMLP applies tanh, sigmoid and relu in place; values and gradients stay torch.nn's."""
    torch.manual_seed(0)
    batched = knn.AgentMLP(
        3, 4, 2, hidden_sizes=(5, 6), activation=activation, layer_norm=layer_norm, dtype=torch.float64
    )
    modules = knn.unstack(batched)
    x = torch.randn(3, SAMPLES, 4, dtype=torch.float64)
    expected, actual, expected_grads, actual_grads = outputs_and_gradients(modules, batched, x, None)
    assert_close_to_scale(actual, expected, RTOL64, what="output")
    for index, (a, e) in enumerate(zip(actual_grads, expected_grads)):
        assert_close_to_scale(a, e, RTOL64, what=f"gradient of parameter {index}")


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer-norm"])
def test_agent_mlp_in_cpu_blocks_equals_its_unstacked_modules(layer_norm):
    """129 agents of 128 samples and width 64 in float64 are 5 blocks of at most 32 agents."""
    num_agents, samples, width = 129, 128, 64
    assert samples * width * 8 * 32 == knn._CPU_BLOCK_BYTES
    torch.manual_seed(0)
    batched = knn.AgentMLP(num_agents, 4, 3, hidden_sizes=(width, 16), layer_norm=layer_norm, dtype=torch.float64)
    modules = knn.unstack(batched)
    x = torch.randn(num_agents, samples, 4, dtype=torch.float64)
    expected, actual, expected_grads, actual_grads = outputs_and_gradients(modules, batched, x, None)
    assert_close_to_scale(actual, expected, RTOL64, what="output")
    for index, (a, e) in enumerate(zip(actual_grads, expected_grads)):
        assert_close_to_scale(a, e, RTOL64, what=f"gradient of parameter {index}")
    x.requires_grad_(True)
    weights = torch.randn(num_agents, samples, 3, dtype=torch.float64)
    (input_grad,) = torch.autograd.grad((batched(x) * weights).sum(), x)
    (expected_input_grad,) = torch.autograd.grad((run_per_agent(modules, x, None) * weights).sum(), x)
    assert_close_to_scale(input_grad, expected_input_grad, RTOL64, what="input gradient")


def test_leading_batch_dimensions_are_kept():
    batched = knn.AgentMLP(3, 4, 2, hidden_sizes=(5,), dtype=torch.float64)
    x = torch.randn(3, 7, 2, 4, dtype=torch.float64)
    out = batched(x)
    assert out.shape == (3, 7, 2, 2)
    assert_close_to_scale(out[:, 3].detach(), batched(x[:, 3]).detach(), RTOL64)
    assert knn.AgentLinear(3, 4, 2)(torch.randn(3, 4)).shape == (3, 2)
    gru = knn.AgentGRUCell(3, 4, 5, dtype=torch.float64)
    x, h = torch.randn(3, 7, 2, 4, dtype=torch.float64), torch.randn(3, 7, 2, 5, dtype=torch.float64)
    assert_close_to_scale(gru(x, h)[:, 3].detach(), gru(x[:, 3], h[:, 3]).detach(), RTOL64)
    assert gru(torch.randn(3, 0, 4, dtype=torch.float64)).shape == (3, 0, 5)


# ---- initialisation ------------------------------------------------------------------------------

INIT_CASES = {
    "linear": (lambda a, dtype: knn.AgentLinear(a, 6, 4, dtype=dtype), lambda dtype: nn.Linear(6, 4, dtype=dtype)),
    "linear-no-bias": (
        lambda a, dtype: knn.AgentLinear(a, 6, 4, bias=False, dtype=dtype),
        lambda dtype: nn.Linear(6, 4, bias=False, dtype=dtype),
    ),
    "gru": (lambda a, dtype: knn.AgentGRUCell(a, 3, 5, dtype=dtype), lambda dtype: nn.GRUCell(3, 5, dtype=dtype)),
    "layer-norm": (lambda a, dtype: knn.AgentLayerNorm(a, 5, dtype=dtype), lambda dtype: nn.LayerNorm(5, dtype=dtype)),
    "mlp": (
        lambda a, dtype: knn.AgentMLP(a, 6, 2, hidden_sizes=(8, 8), activation="relu", dtype=dtype),
        lambda dtype: nn.Sequential(
            nn.Linear(6, 8, dtype=dtype),
            nn.ReLU(),
            nn.Linear(8, 8, dtype=dtype),
            nn.ReLU(),
            nn.Linear(8, 2, dtype=dtype),
        ),
    ),
    "mlp-layer-norm": (
        lambda a, dtype: knn.AgentMLP(a, 6, 2, hidden_sizes=(8,), layer_norm=True, dtype=dtype),
        lambda dtype: nn.Sequential(
            nn.Linear(6, 8, dtype=dtype), nn.LayerNorm(8, dtype=dtype), nn.Tanh(), nn.Linear(8, 2, dtype=dtype)
        ),
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", INIT_CASES)
def test_initialisation_equals_per_agent_modules_created_in_sequence(case, dtype):
    """With one seed, the batched module equals A torch.nn modules created one after the other,
    and leaves the random generator where they leave it."""
    make_batched, make_one = INIT_CASES[case]
    num_agents = 4
    torch.manual_seed(123)
    batched = make_batched(num_agents, dtype)
    after_batched = torch.rand(3)
    torch.manual_seed(123)
    modules = [make_one(dtype) for _ in range(num_agents)]
    after_modules = torch.rand(3)
    assert torch.equal(after_batched, after_modules), "the batched module drew a different number of values"
    for (name, p), q in zip(batched.named_parameters(), knn.stack(modules).parameters()):
        assert p.dtype == dtype and torch.equal(p, q), name
    if case.startswith("linear") or case == "gru":
        assert batched.num_agents == num_agents


# ---- stack / unstack -----------------------------------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS)
def test_stack_unstack_round_trip(layer):
    modules, batched = per_agent_and_batched(layer, 3, torch.float32)
    assert batched.num_agents == 3
    back = knn.unstack(batched)
    assert [repr(m) for m in back] == [repr(m) for m in modules]
    for original, restored in zip(modules, back):
        names = [n for n, _ in original.named_parameters()]
        assert names == [n for n, _ in restored.named_parameters()]
        for p, q in zip(original.parameters(), restored.parameters()):
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
    again = knn.stack(back)
    for p, q in zip(batched.parameters(), again.parameters()):
        assert torch.equal(p, q)


def test_stack_keeps_frozen_parameters_frozen_and_mlp_unstacks_to_sequential():
    modules = [nn.Linear(2, 2) for _ in range(2)]
    for m in modules:
        m.bias.requires_grad_(False)
    batched = knn.stack(modules)
    assert batched.weight.requires_grad and not batched.bias.requires_grad
    mlp = knn.AgentMLP(2, 3, 1, hidden_sizes=(4,), activation="leaky_relu")
    per_agent = knn.unstack(mlp)
    assert isinstance(per_agent[0], nn.Sequential) and isinstance(per_agent[0][1], nn.LeakyReLU)
    assert isinstance(mlp[:2], knn.AgentSequential) and len(mlp[:2]) == 2


def _mlp_with_gru_appended():
    mlp = knn.AgentMLP(2, 3, 2, hidden_sizes=(4,))
    mlp.append(knn.AgentGRUCell(2, 2, 2))
    return mlp


NN_ERRORS = [
    ("stack-empty", lambda: knn.stack([]), ValueError, r"needs at least one module"),
    (
        "stack-mixed-types",
        lambda: knn.stack([nn.Linear(2, 2), nn.LayerNorm(2)]),
        TypeError,
        r"modules\[1\] is a LayerNorm but modules\[0\] is a Linear",
    ),
    (
        "stack-mixed-sizes",
        lambda: knn.stack([nn.Linear(2, 2), nn.Linear(2, 3)]),
        ValueError,
        r"modules\[1\] is Linear\(in_features=2, out_features=3.*stack needs identical modules",
    ),
    (
        "stack-mixed-dtypes",
        lambda: knn.stack([nn.Linear(2, 2), nn.Linear(2, 2).double()]),
        ValueError,
        r"modules\[1\].weight is torch.float64 .* move every module to one dtype and device",
    ),
    (
        "stack-unsupported",
        lambda: knn.stack([nn.Conv1d(1, 1, 1)]),
        TypeError,
        r"cannot batch a Conv1d; it takes Linear, LayerNorm, GRUCell",
    ),
    ("stack-batched", lambda: knn.stack([knn.AgentLinear(2, 2, 2)]), TypeError, r"already agent-batched"),
    ("stack-parameter-free", lambda: knn.stack([nn.Tanh()]), TypeError, r"cannot batch a Tanh"),
    (
        "stack-sequential-lengths",
        lambda: knn.stack([nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2), nn.Tanh())]),
        ValueError,
        r"different lengths \[1, 2\]",
    ),
    (
        "stack-different-activations",
        lambda: knn.stack([nn.Sequential(nn.Linear(2, 2), nn.Tanh()), nn.Sequential(nn.Linear(2, 2), nn.ReLU())]),
        ValueError,
        r"modules\[1\]\[1\] is ReLU\(\) but the first module's is Tanh\(\)",
    ),
    (
        "unstack-torch-module",
        lambda: knn.unstack(nn.Linear(2, 2)),
        TypeError,
        r"takes an agent-batched module \(kpg.nn\), got Linear",
    ),
    ("zero-agents", lambda: knn.AgentLinear(0, 2, 2), ValueError, r"num_agents must be an int >= 1, got 0"),
    (
        "unknown-activation",
        lambda: knn.AgentMLP(2, 3, 1, activation="swish"),
        ValueError,
        r"unknown activation 'swish'; choose one of tanh, relu",
    ),
    (
        "input-without-agent-dim",
        lambda: knn.AgentLinear(3, 4, 2)(torch.randn(5, 4)),
        ValueError,
        r"AgentLinear expects input shaped \[agents=3, batch..., 4\], got \(5, 4\); put the agent dimension first",
    ),
    (
        "layer-norm-shape",
        lambda: knn.AgentLayerNorm(3, 4)(torch.randn(3, 5)),
        ValueError,
        r"AgentLayerNorm expects input shaped \[agents=3, batch..., 4\]",
    ),
    (
        "gru-hidden-shape",
        lambda: knn.AgentGRUCell(3, 4, 5)(torch.randn(3, 2, 4), torch.randn(3, 5)),
        ValueError,
        r"hx must have shape \(3, 2, 5\)",
    ),
    (
        "mlp-with-another-batched-layer",
        lambda: _mlp_with_gru_appended()(torch.randn(2, 5, 3)),
        TypeError,
        r"AgentMLP holds AgentLinear, AgentLayerNorm and activations, not AgentGRUCell; build an AgentSequential",
    ),
    (
        "sequential-mixed-agents",
        lambda: knn.AgentSequential(knn.AgentLinear(2, 2, 2), knn.AgentLinear(3, 2, 2)),
        ValueError,
        r"of one agent count; got agent counts \[2, 3\]",
    ),
    (
        "sequential-unbatched-layer",
        lambda: knn.AgentSequential(knn.AgentLinear(2, 2, 2), nn.Linear(2, 2)),
        TypeError,
        r"layer 1 of AgentSequential is a Linear with parameters but no agent dimension",
    ),
]


@pytest.mark.parametrize("build,error,message", [c[1:] for c in NN_ERRORS], ids=[c[0] for c in NN_ERRORS])
def test_nn_errors(build, error, message):
    with pytest.raises(error, match=message):
        build()


# ---- the arena and its chunk table ---------------------------------------------------------------


def test_batched_parameters_stay_one_view_each_and_groups_hold_agent_slices():
    batched = knn.AgentMLP(5, 3, 2, hidden_sizes=(4,))
    opt = kpg.KPGOptimizer(batched, k=2)
    arena = opt.arena
    assert arena.is_batched and arena.num_agents == opt.num_agents == batched.num_agents == 5
    offset = 0
    for p in batched.parameters():  # parameter-major: W for all agents, then b for all agents
        assert p.data_ptr() == arena.param.data_ptr() + offset * p.element_size() and p.is_contiguous()
        assert p.grad.data_ptr() == arena.grad.data_ptr() + offset * p.element_size()
        offset += p.numel()
    assert offset == arena.numel
    for agent, group in enumerate(opt.param_groups):
        for p, slot in zip(batched.parameters(), group["params"]):
            assert slot.shape == p.shape[1:] and slot.data_ptr() == p[agent].data_ptr()
            assert opt.state[slot]["exp_avg"].data_ptr() == opt.agent_state.state_buffers["exp_avg"].data_ptr() + (
                slot.data_ptr() - arena.param.data_ptr()
            )


def test_chunk_table_covers_every_element_once_with_its_agent():
    batched = knn.AgentMLP(6, 3, 2, hidden_sizes=(5,))
    arena = ParameterArena.batched(list(batched.parameters()))
    owner = torch.cat([torch.arange(6).repeat_interleave(p[0].numel()) for p in batched.parameters()])
    for chunk_elems in (1, 4, 1000):
        chunks, agent_chunks = ops.range_chunk_table(
            [
                (a, int(b), int(e))
                for a, b, e in [
                    (a, v.storage_offset() + a * v[0].numel(), v.storage_offset() + (a + 1) * v[0].numel())
                    for v in arena.param_views
                    for a in range(6)
                ]
            ][::-1],  # any order in, grouped out
            6,
            chunk_elems=chunk_elems,
        )
        visits = torch.zeros(arena.numel, dtype=torch.int64)
        for agent in range(6):
            for a, begin, end in chunks[agent_chunks[agent] : agent_chunks[agent + 1]].tolist():
                assert a == agent and end - begin <= chunk_elems
                assert bool((owner[begin:end] == agent).all())
                visits[begin:end] += 1
        assert bool((visits == 1).all()) and int(agent_chunks[-1]) == chunks.shape[0]
    visits = torch.zeros(arena.numel, dtype=torch.int64)
    for _agent, begin, end in arena.chunks.tolist():
        visits[begin:end] += 1
    assert bool((visits == 1).all())


RANGE_ERRORS = [
    ("overlap", [(0, 0, 5), (1, 4, 8)], 2, r"rows 0 and 1 share elements from 4"),
    ("overlap-behind-an-empty-range", [(0, 0, 10), (1, 5, 5), (1, 6, 8)], 2, r"rows 0 and 2 share elements from 6"),
    ("agent-out-of-range", [(2, 0, 5)], 2, r"row 0 \(agent 2, elements 0..5\) needs 0 <= agent < 2"),
    ("reversed", [(0, 5, 4)], 1, r"0 <= begin <= end"),
    ("two-columns", np.zeros((2, 2)), 1, r"ranges must be \[num_ranges, 3\] rows"),
]


@pytest.mark.parametrize("ranges,num_agents,message", [c[1:] for c in RANGE_ERRORS], ids=[c[0] for c in RANGE_ERRORS])
def test_range_chunk_table_errors(ranges, num_agents, message):
    with pytest.raises(ValueError, match=message):
        ops.range_chunk_table(ranges, num_agents)


def test_range_chunk_table_of_no_ranges_gives_empty_agents():
    chunks, agent_chunks = ops.range_chunk_table([], 3)
    assert chunks.shape == (0, 3) and agent_chunks.tolist() == [0, 0, 0, 0]


# ---- KPGOptimizer: a batched model against the list of per-agent models --------------------------

NUM_AGENTS = 4
OBS, ACT, BATCH = 3, 3, 8


class Twins:
    """The same agents twice: one agent-batched MLP and the list of per-agent nn.Sequential, with a
    MAPPO rollout and a fixed centralized critic."""

    def __init__(self, dtype=torch.float64, seed=0, layer_norm=False, device="cpu"):
        torch.manual_seed(seed)
        self.batched = knn.AgentMLP(NUM_AGENTS, OBS, ACT, hidden_sizes=(6,), layer_norm=layer_norm, dtype=dtype)
        self.per_agent = knn.unstack(self.batched)
        g = torch.Generator().manual_seed(seed + 1)
        self.obs = torch.randn(NUM_AGENTS, BATCH, OBS, dtype=dtype, generator=g)
        self.actions = torch.randint(ACT, (NUM_AGENTS, BATCH), generator=g)
        self.old_log_prob = (
            torch.log_softmax(torch.randn(NUM_AGENTS, BATCH, ACT, dtype=dtype, generator=g), -1)
            .gather(-1, self.actions.unsqueeze(-1))
            .squeeze(-1)
        )
        self.advantages = torch.randn(NUM_AGENTS, BATCH, dtype=dtype, generator=g)
        self.critic = nn.Sequential(nn.Linear(NUM_AGENTS * ACT, 8), nn.Tanh(), nn.Linear(8, NUM_AGENTS)).to(dtype)
        self.critic.requires_grad_(False)
        # Drawn on the CPU from the seeds, so every device starts from the same values.
        for name in ("obs", "actions", "old_log_prob", "advantages"):
            setattr(self, name, getattr(self, name).to(device))
        for module in (self.batched, *self.per_agent, self.critic):
            module.to(device)

    def batched_logits(self):
        return self.batched(self.obs)

    def per_agent_logits(self):
        return torch.stack([m(self.obs[a]) for a, m in enumerate(self.per_agent)])

    def log_prob(self, logits):
        return torch.log_softmax(logits, -1).gather(-1, self.actions.unsqueeze(-1)).squeeze(-1)

    def mappo_loss(self, log_prob, anticipated_log_prob, level):
        return kpg.joint_ratio_loss(
            log_prob, self.old_log_prob, self.advantages, anticipated_log_prob, level=level
        ).loss

    def critic_loss(self, own_logits, anticipated_logits):
        joint = kpg.joint_inputs(torch.tanh(own_logits), torch.tanh(anticipated_logits), agent_dim=0)  # [A, A, B, ACT]
        q = self.critic(joint.permute(0, 2, 1, 3).reshape(NUM_AGENTS, BATCH, NUM_AGENTS * ACT))
        return -q.diagonal(dim1=0, dim2=2).mean(0)


def closures(twins, style):
    """(closure over the batched model, closure over the per-agent list), the same loss."""
    t = twins
    if style == "mappo-at-base":

        def batched(ctx):
            log_prob = ctx.at_base(lambda: t.log_prob(t.batched_logits()))
            with ctx.anticipated():
                anticipated = t.log_prob(t.batched_logits())
            return t.mappo_loss(log_prob, anticipated, ctx.level)
    elif style == "mappo-functional-call":

        def batched(ctx):
            anticipated_logits = functional_call(t.batched, ctx.anticipated_parameters(t.batched), (t.obs,))
            assert not anticipated_logits.requires_grad
            return t.mappo_loss(t.log_prob(t.batched_logits()), t.log_prob(anticipated_logits), ctx.level)
    elif style == "critic":

        def batched(ctx):
            own = t.batched_logits()
            with ctx.anticipated():
                anticipated = t.batched_logits()
            return t.critic_loss(own, anticipated)
    elif style == "no-context":

        def batched():
            logits = t.batched_logits()
            return t.critic_loss(logits, logits)

    if style == "no-context":

        def per_agent():
            logits = t.per_agent_logits()
            return t.critic_loss(logits, logits)
    elif style == "critic":

        def per_agent(ctx):
            own = t.per_agent_logits()
            with ctx.anticipated():
                anticipated = t.per_agent_logits()
            return t.critic_loss(own, anticipated)
    else:

        def per_agent(ctx):
            log_prob = t.log_prob(t.per_agent_logits())
            with ctx.anticipated():
                anticipated = t.log_prob(t.per_agent_logits())
            return t.mappo_loss(log_prob, anticipated, ctx.level)

    return batched, per_agent


def assert_twins_equal(twins, rtol=RTOL64):
    for a, (restored, model) in enumerate(zip(knn.unstack(twins.batched), twins.per_agent)):
        for (name, p), q in zip(restored.named_parameters(), model.parameters()):
            assert_close_to_scale(p.detach(), q.detach(), rtol, what=f"agent {a} {name}")


# One multi-level configuration of each optimizer of the table (tests/cases.py).
OPTIMIZERS = {info.name: (info.name, info.multi_level_configs[0].hyper) for info in OPTIMIZER_INFOS}
LRS = [0.05, 0.02, 0.1, 0.03]
MAX_NORMS = [0.05, 1e3, 0.2, 0.1]


@pytest.mark.parametrize("style", ["mappo-at-base", "mappo-functional-call", "critic", "no-context"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_kpg_step_on_batched_model_equals_per_agent_models(optimizer, k, style, device):
    name, hyper = OPTIMIZERS[optimizer]
    twins = Twins(layer_norm=style == "critic", device=device)
    batched_closure, per_agent_closure = closures(twins, style)
    ours = kpg.KPGOptimizer(twins.batched, k=k, optimizer=name, lr=LRS, max_grad_norm=MAX_NORMS, **hyper)
    theirs = kpg.KPGOptimizer(twins.per_agent, k=k, optimizer=name, lr=LRS, max_grad_norm=MAX_NORMS, **hyper)
    for _ in range(3):
        loss_ours = ours.step(batched_closure)
        loss_theirs = theirs.step(per_agent_closure)
        assert_close_to_scale(loss_ours, loss_theirs, RTOL64, what="loss")
    assert_twins_equal(twins)
    assert ours.agent_state.step.tolist() == theirs.agent_state.step.tolist() == [3.0] * ours.arena.num_pieces
    for slot_ours, slot_theirs in zip(
        *([p for group in opt.param_groups for p in group["params"]] for opt in (ours, theirs))
    ):
        for state_name, value in theirs.state[slot_theirs].items():
            assert_close_to_scale(ours.state[slot_ours][state_name], value, RTOL64, what=state_name)


def test_clipping_binds_per_agent():
    """The thresholds of the parity test above clip some agents and not others."""
    twins = Twins()
    batched_closure, _ = closures(twins, "mappo-at-base")
    opt = kpg.KPGOptimizer(twins.batched, k=2, lr=LRS, max_grad_norm=MAX_NORMS)
    opt.step(batched_closure)
    clipped = (opt.agent_state.grad_scale < 1).tolist()
    assert any(clipped) and not all(clipped)


def test_nonfinite_gradient_in_one_agent_skips_only_that_agent(device):
    twins = Twins(device=device)
    batched_closure, per_agent_closure = closures(twins, "mappo-at-base")
    bad = 2

    def infinite_slope(weight):  # zero in value, infinite in gradient
        return torch.sqrt(weight.sum() - weight.sum().detach())

    def with_bad_agent(closure, weight):
        def wrapped(ctx):
            losses = closure(ctx)
            return losses + torch.nn.functional.one_hot(torch.tensor(bad, device=device), NUM_AGENTS) * infinite_slope(
                weight()
            )

        return wrapped

    ours = kpg.KPGOptimizer(twins.batched, k=2, lr=LRS, max_grad_norm=MAX_NORMS, nonfinite="skip")
    theirs = kpg.KPGOptimizer(twins.per_agent, k=2, lr=LRS, max_grad_norm=MAX_NORMS, nonfinite="skip")
    before = [p.detach().clone() for p in twins.per_agent[bad].parameters()]
    ours.step(with_bad_agent(batched_closure, lambda: twins.batched[0].weight[bad]))
    theirs.step(with_bad_agent(per_agent_closure, lambda: twins.per_agent[bad][0].weight))
    assert ours.stats.skipped_agent_steps == theirs.stats.skipped_agent_steps == 1
    assert [float(ours.agent_state.step[first]) for first in ours.arena.agent_first_piece[:-1]] == [1.0, 1.0, 0.0, 1.0]
    assert all(torch.equal(p, b) for p, b in zip(twins.per_agent[bad].parameters(), before))
    assert_twins_equal(twins)


def test_state_dict_has_the_layout_of_per_agent_models_and_loads_both_ways():
    twins = Twins()
    batched_closure, per_agent_closure = closures(twins, "mappo-at-base")
    ours = kpg.KPGOptimizer(twins.batched, k=2, lr=LRS)
    theirs = kpg.KPGOptimizer(twins.per_agent, k=2, lr=LRS)
    for _ in range(2):
        ours.step(batched_closure)
        theirs.step(per_agent_closure)
    saved_ours, saved_theirs = ours.state_dict(), theirs.state_dict()
    assert saved_ours["param_groups"] == saved_theirs["param_groups"]
    for index, entry in saved_theirs["state"].items():
        for name, value in entry.items():
            assert_close_to_scale(saved_ours["state"][index][name], value, RTOL64, what=name)
    copies = Twins()
    copies.batched.load_state_dict(twins.batched.state_dict())
    resumed = kpg.KPGOptimizer(copies.batched, k=1, lr=1.0)
    resumed.load_state_dict(saved_theirs)  # a per-agent optimizer's state into a batched one
    assert resumed.k == 2 and [g["lr"] for g in resumed.param_groups] == LRS
    resumed_closure, _ = closures(copies, "mappo-at-base")
    resumed.step(resumed_closure)
    theirs.step(per_agent_closure)
    copies.per_agent = twins.per_agent
    assert_twins_equal(copies)


def test_at_base_evaluates_once_per_step_and_checks_its_use():
    twins = Twins()
    calls = []

    outputs = []

    def own_log_prob():
        calls.append(1)
        log_prob = twins.log_prob(twins.batched_logits())
        outputs.append(weakref.ref(log_prob))
        return log_prob

    def closure(ctx):
        log_prob = ctx.at_base(own_log_prob)
        with ctx.anticipated():
            anticipated = twins.log_prob(twins.batched_logits())
        return twins.mappo_loss(log_prob, anticipated, ctx.level)

    opt = kpg.KPGOptimizer(twins.batched, k=3)
    opt.step(closure)
    opt.step(closure)
    # The step reused each output at every level, then let it go.
    assert len(calls) == 2 and [output() for output in outputs] == [None, None]

    def inside_anticipated(ctx):
        with ctx.anticipated():
            ctx.at_base(own_log_prob)

    with pytest.raises(RuntimeError, match="ctx.at_base was called inside ctx.anticipated"):
        opt.step(inside_anticipated)

    def other_code_at_level_2(ctx):
        if ctx.level == 1:
            log_prob = ctx.at_base(own_log_prob)
        else:
            log_prob = ctx.at_base(lambda: twins.log_prob(twins.batched_logits()))
        return twins.mappo_loss(log_prob, None, 1)

    before = [p.detach().clone() for p in twins.batched.parameters()]
    with pytest.raises(ValueError, match="call 1 of ctx.at_base at level 2 runs other code"):
        opt.step(other_code_at_level_2)
    assert all(torch.equal(p, b) for p, b in zip(twins.batched.parameters(), before))
    opt.step(closure)
    assert len(calls) == 4 and not all(torch.equal(p, b) for p, b in zip(twins.batched.parameters(), before))


def test_anticipated_parameters_are_the_anticipated_views():
    twins = Twins()
    seen = {}

    def closure(ctx):
        named = ctx.anticipated_parameters(twins.batched)
        seen[ctx.level] = {n: t.data_ptr() for n, t in named.items()}
        with ctx.anticipated():
            swapped = {n: p.data_ptr() for n, p in twins.batched.named_parameters()}
        assert swapped == seen[ctx.level]
        return closures(twins, "mappo-at-base")[0](ctx)

    opt = kpg.KPGOptimizer(twins.batched, k=2)
    opt.step(closure)
    assert set(seen[1]) == {n for n, _ in twins.batched.named_parameters()}
    assert seen[1]["0.weight"] == twins.batched[0].weight.data_ptr()
    assert seen[2]["0.weight"] == opt.agent_state.anticipated.data_ptr()
    with pytest.raises(ValueError, match="holds none of the parameters this optimizer steps"):
        opt.step(lambda ctx: ctx.anticipated_parameters(nn.Linear(2, 2)))


def test_agent_dim_declares_a_plain_model_batched():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(3, 2, dtype=torch.float64))
    x = torch.randn(3, 5, 2, dtype=torch.float64)
    targets = torch.randn(3, 5, dtype=torch.float64)
    opt = kpg.KPGOptimizer([weight], k=2, optimizer="sgd", lr=[0.1, 0.2, 0.3], agent_dim=0)
    per_agent = [nn.Parameter(weight[a].detach().clone()) for a in range(3)]
    reference = kpg.KPGOptimizer([[p] for p in per_agent], k=2, optimizer="sgd", lr=[0.1, 0.2, 0.3])

    def loss(own, anticipated):  # agent i fits its targets with the others' mean prediction added
        predictions = (x * own[:, None]).sum(-1)
        others = (x * anticipated[:, None]).sum(-1)
        return ((predictions + others.sum(0) - others - targets) ** 2).mean(-1)

    def batched_closure(ctx):
        with ctx.anticipated():
            anticipated = weight.clone()
        return loss(weight, anticipated)

    def per_agent_closure(ctx):
        with ctx.anticipated():
            anticipated = torch.stack([p.clone() for p in per_agent])
        return loss(torch.stack(per_agent), anticipated)

    opt.step(batched_closure)
    reference.step(per_agent_closure)
    assert_close_to_scale(weight.detach(), torch.stack(per_agent).detach(), RTOL64)


OPTIMIZER_ERRORS = [
    (
        "batched-inside-a-list",
        lambda: kpg.KPGOptimizer([knn.AgentLinear(2, 2, 2)]),
        TypeError,
        r"agents\[0\] is an agent-batched model \(kpg.nn\) inside a list of agents; pass it alone",
    ),
    (
        "parameter-without-agent-dim",
        lambda: kpg.KPGOptimizer(nn.ModuleList([knn.AgentLinear(2, 2, 2), nn.Linear(2, 2)])),
        ValueError,
        r"parameter '1.weight' of shape \(2, 2\) is outside the kpg.nn layers .* freeze it",
    ),
    (
        "mixed-agent-counts",
        lambda: kpg.KPGOptimizer(nn.ModuleList([knn.AgentLinear(2, 2, 2), knn.AgentLinear(3, 2, 2)])),
        ValueError,
        r"mixes layers of \[2, 3\] agents",
    ),
    (
        "agent-dim-1",
        lambda: kpg.KPGOptimizer(knn.AgentLinear(2, 2, 2), agent_dim=1),
        ValueError,
        r"agent_dim=1 is not supported: kpg needs the agent dimension first",
    ),
    (
        "agent-dim-unequal-sizes",
        lambda: kpg.KPGOptimizer([nn.Parameter(torch.zeros(2, 3)), nn.Parameter(torch.zeros(3))], agent_dim=0),
        ValueError,
        r"batched parameter 1 has shape \(3,\) and parameter 0 \(2, 3\); every parameter .* same leading agent "
        r"dimension",
    ),
    (
        "agent-dim-scalar",
        lambda: kpg.KPGOptimizer([nn.Parameter(torch.zeros(()))], agent_dim=0),
        ValueError,
        r"batched parameter 0 has shape \(\)",
    ),
    (
        "num-agents-mismatch",
        lambda: kpg.KPGOptimizer(knn.AgentLinear(2, 2, 2), num_agents=3),
        ValueError,
        r"num_agents=3 but the agent-batched model has 2 agents",
    ),
    (
        "lr-length",
        lambda: kpg.KPGOptimizer(knn.AgentLinear(2, 2, 2), lr=[0.1, 0.2, 0.3]),
        ValueError,
        r"lr has 3 entries but there are 2 agents",
    ),
]


@pytest.mark.parametrize("build,error,message", [c[1:] for c in OPTIMIZER_ERRORS], ids=[c[0] for c in OPTIMIZER_ERRORS])
def test_optimizer_errors_with_batched_models(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_failed_construction_leaves_the_batched_model_untouched():
    model = nn.ModuleList([knn.AgentLinear(2, 2, 2), nn.Linear(2, 2)])
    pointers = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(ValueError):
        kpg.KPGOptimizer(model)
    assert pointers == [p.data_ptr() for p in model.parameters()]


def test_repr_and_segment_name_the_layout():
    opt = kpg.KPGOptimizer(knn.AgentLinear(3, 2, 2), k=2)
    assert "3 agents in one agent-batched model" in repr(opt)
    assert "agent-batched tensors" in repr(opt.arena)
    with pytest.raises(ValueError, match="no per-agent segment.*use agent_views"):
        opt.arena.segment(opt.arena.param, 0)


@pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))
def test_batched_step_on_cuda_equals_cpu():
    on_cpu, on_cuda = Twins(), Twins(device="cuda")
    optimizers = [kpg.KPGOptimizer(t.batched, k=2, lr=LRS, max_grad_norm=MAX_NORMS) for t in (on_cpu, on_cuda)]
    for _ in range(3):
        for t, opt in zip((on_cpu, on_cuda), optimizers):
            opt.step(closures(t, "mappo-at-base")[0])
    for p, q in zip(on_cpu.batched.parameters(), on_cuda.batched.parameters()):
        assert_close_to_scale(q.detach().cpu(), p.detach(), 1e-9)


# ---- the benchmark -------------------------------------------------------------------------------


def test_agents_benchmark_reports_every_method(tmp_path):
    path = tmp_path / "agents.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench/agents.py"), "--quick", "--agents", "2", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    case = json.loads(path.read_text())["cases"][0]
    methods = {"torch_k1", "naive_k2", "kpg_k1", "kpg_k2", "kpg_mk2"}  # kpg_mk2: momentum anticipation, k=2
    assert set(case["seconds"]) == set(case["memory"]) == methods
    assert all(s > 0 for s in case["seconds"].values())
    assert all(m["peak_bytes_above_baseline"] > 0 for m in case["memory"].values())
    assert case["matmul_flops_per_second"] > 0 and math.isfinite(case["ratios"]["kpg_k2_over_k1"])
    assert math.isfinite(case["ratios"]["kpg_momentum_k2_over_k1"])
