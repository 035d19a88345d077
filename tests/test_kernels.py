"""The fused kernels (torch.ops.kpg) against the plain-PyTorch reference and torch.optim."""

import copy

import pytest
import torch
from cases import UPDATE_CASES

from kpg import _ops as ops
from kpg import reference

from helpers import (
    RTOL,
    Arena,
    agent_grad_norms_of_kernel_and_reference,
    assert_as_accurate_as,
    assert_close_to_scale,
    no_live,
    rows,
    torch_optimizer,
)

# Agent segment sizes: an empty agent, a single element, vector width +-1, chunk size +-1 for
# both paths, the sizes that leave tails in naive launches, and 257 agents.
LAYOUTS = {
    "single-agent": [7],
    "mixed-with-empty": [0, 1, 3, 4, 5, 8191, 8192, 8193, 1025, 1026, 1027, 2049, 2050, 2051, 4097, 0, 16385],
    "257-agents": [(a * 37) % 300 + (a % 5 == 0) * 4093 for a in range(257)],
}

NONFINITE = {"finite": None, "nan-inf-first-middle-last": (float("nan"), float("inf"), float("-inf"))}


def _hyper(case):
    return UPDATE_CASES[case]


@pytest.mark.parametrize("nonfinite", NONFINITE.values(), ids=NONFINITE.keys())
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", UPDATE_CASES)
@pytest.mark.parametrize("commit", [False, True], ids=["anticipate", "commit"])
def test_update_matches_reference(commit, case, dtype, layout, nonfinite, device):
    """float64: the kernel equals the reference to rounding. float32: it is as accurate as the
    float32 reference, both measured against the float64 reference on the same inputs. The agents
    are at their seventh step, past RAdam's switch to the rectified step."""
    kind, hyper = _hyper(case)
    base = Arena(kind, layout, dtype, seed=1, nonfinite=nonfinite, device=device, start_step=4).warm_up(kind, hyper)
    runs = {"kernel": (ops, base), "reference": (reference, copy.deepcopy(base))}
    if dtype != torch.float64:
        runs["truth"] = (reference, base.upcast())
    results = {}
    for label, (module, arena) in runs.items():
        anticipated = torch.full_like(arena.param, 123.0)
        if commit:
            module.UPDATE_OPS[(kind, True)](**arena.commit_args(), **rows(kind, hyper, arena.step))
        else:
            module.UPDATE_OPS[(kind, False)](**arena.anticipate_args(anticipated), **rows(kind, hyper, arena.step))
        results[label] = {**arena.tensors(), "anticipated": anticipated}
    for name, expected in results["reference"].items():
        if dtype == torch.float64:
            assert_close_to_scale(results["kernel"][name], expected, RTOL[dtype], what=name)
        else:
            assert_as_accurate_as(results["kernel"][name], expected, results["truth"][name], RTOL[dtype], what=name)


@pytest.mark.parametrize("case", UPDATE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_anticipate_leaves_base_and_state_bit_identical(case, dtype, device):
    kind, hyper = _hyper(case)
    arena = Arena(kind, LAYOUTS["mixed-with-empty"], dtype, seed=2, device=device).warm_up(kind, hyper)
    before = {name: t.clone() for name, t in arena.tensors().items()}
    grad_before = arena.grad.clone()
    anticipated = torch.zeros_like(arena.param)
    ops.UPDATE_OPS[(kind, False)](**arena.anticipate_args(anticipated), **rows(kind, hyper, arena.step))
    for name, tensor in arena.tensors().items():
        assert torch.equal(tensor, before[name]), f"anticipate changed {name}"
    assert torch.equal(arena.grad, grad_before)
    assert not torch.equal(anticipated, arena.param), "anticipate wrote no update"


@pytest.mark.parametrize("clip", [False, True], ids=["no-clip", "per-agent-clip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", UPDATE_CASES)
def test_commit_20_steps_equals_torch_optim(case, dtype, clip, device):
    """Our arena + commit against one torch.optim optimizer per agent on separate tensors."""
    kind, hyper = _hyper(case)
    sizes = [1, 7, 300, 4097, 0]
    lrs = [0.01, 0.003, 0.02, 0.001, 0.05]
    max_norms = [0.5, 100.0, 1.0, 2.0, 1.0]
    g = torch.Generator().manual_seed(3)
    initial = [torch.randn(s, dtype=dtype, generator=g).to(device) for s in sizes]
    theirs = [torch.nn.Parameter(t.clone()) for t in initial]
    optimizers = [torch_optimizer(kind, [p], lr, **hyper) for p, lr in zip(theirs, lrs)]
    truth = [torch.nn.Parameter(t.double()) for t in initial]
    truth_optimizers = [torch_optimizer(kind, [p], lr, **hyper) for p, lr in zip(truth, lrs)]

    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    chunks, agent_chunks = ops.chunk_table(offsets, device)
    param = torch.cat(initial)
    grad = torch.zeros_like(param)
    states = {name: torch.zeros_like(param) for name in ops.KERNELS[kind].state_names}
    # torch.optim keeps scalar state in its default scalar dtype, float32 (NAdam's mu_product).
    scalars = {
        name: torch.full((len(sizes),), initial, device=device) for name, initial in ops.KERNELS[kind].scalar_states
    }
    for name, start in zip(ops.KERNELS[kind].state_names, ops.KERNELS[kind].state_initial):
        if start >= 0:  # Adagrad's sum starts at initial_accumulator_value, as torch.optim starts it
            states[name].fill_(ops.KERNELS[kind].row(hyper)[start])
    a = len(sizes)
    step = torch.zeros(a, dtype=torch.float64, device=device)
    live = no_live(a, device)
    lr = torch.tensor(lrs, dtype=torch.float64, device=device)
    max_norm = torch.tensor(max_norms, dtype=torch.float64, device=device)
    norm, grad_scale = torch.zeros_like(lr), torch.ones_like(lr)
    nonfinite = torch.zeros(a, dtype=torch.uint8, device=device)
    chunk_sq = torch.zeros(chunks.shape[0], dtype=torch.float64, device=device)

    for _ in range(20):
        grads = [(torch.randn(s, dtype=dtype, generator=g) * 3).to(device) for s in sizes]
        grad.copy_(torch.cat(grads))
        for p, opt, gr, mn in zip(theirs + truth, optimizers + truth_optimizers, grads + grads, max_norms * 2):
            p.grad = gr.to(p.dtype)
            if clip:
                torch.nn.utils.clip_grad_norm_([p], mn, foreach=False)
            opt.step()
        if clip:
            ops.agent_grad_norms(grad, chunks, agent_chunks, chunk_sq, max_norm, norm, grad_scale, nonfinite)
        ops.UPDATE_OPS[(kind, True)](
            param,
            grad,
            *states.values(),
            *scalars.values(),
            step,
            live,
            lr,
            rows(kind, hyper, step)["hyper"],
            grad_scale if clip else None,
            None,
            chunks,
        )
    for agent, p in enumerate(theirs):
        ours = param[offsets[agent] : offsets[agent + 1]]
        if dtype == torch.float64:
            assert_close_to_scale(ours, p.detach(), RTOL[dtype], what=f"agent {agent} params")
        else:
            assert_as_accurate_as(ours, p.detach(), truth[agent].detach(), RTOL[dtype], what=f"agent {agent} params")
    assert step.tolist() == [20.0] * a


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("clip", [False, True], ids=["no-clip", "clip"])
@pytest.mark.parametrize("nonfinite", NONFINITE.values(), ids=NONFINITE.keys())
def test_agent_grad_norms_match_reference(dtype, layout, clip, nonfinite, device):
    arena = Arena("sgd", layout, dtype, seed=4, nonfinite=nonfinite, device=device)
    max_norm = (torch.rand(len(layout), dtype=torch.float64) * 40).to(device) if clip else None
    outputs = agent_grad_norms_of_kernel_and_reference(arena, max_norm)
    if nonfinite is not None:
        assert outputs[0]["nonfinite"].sum() >= 1


def test_clipping_equals_clip_grad_norm_per_agent():
    sizes = [5, 4097, 33]
    grads = [torch.randn(s) * 10 for s in sizes]
    offsets = [0, 5, 4102, 4135]
    chunks, agent_chunks = ops.chunk_table(offsets)
    max_norm = torch.tensor([1.0, 1e9, 0.1], dtype=torch.float64)
    norm, scale = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    nonfinite, chunk_sq = torch.zeros(3, dtype=torch.uint8), torch.zeros(chunks.shape[0], dtype=torch.float64)
    ops.agent_grad_norms(torch.cat(grads), chunks, agent_chunks, chunk_sq, max_norm, norm, scale, nonfinite)
    for agent, g in enumerate(grads):
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        returned_norm = torch.nn.utils.clip_grad_norm_([p], max_norm[agent].item())
        assert norm[agent].item() == pytest.approx(returned_norm.item(), rel=1e-6)
        assert_close_to_scale((g.double() * scale[agent]).float(), p.grad, 1e-6, what=f"agent {agent}")


def test_nonfinite_gradient_skips_only_that_agent(device):
    kind, hyper = _hyper("adam")
    arena = Arena(kind, [5, 6, 7], torch.float32, seed=5, device=device).warm_up(kind, hyper)
    arena.skip = None
    arena.grad[7] = float("nan")  # agent 1
    before = {k: v.clone() for k, v in arena.tensors().items()}
    a = 3
    norm, scale = torch.zeros(a, dtype=torch.float64, device=device), torch.zeros(a, dtype=torch.float64, device=device)
    nonfinite = torch.zeros(a, dtype=torch.uint8, device=device)
    chunk_sq = torch.zeros(arena.chunks.shape[0], dtype=torch.float64, device=device)
    ops.agent_grad_norms(arena.grad, arena.chunks, arena.agent_chunks, chunk_sq, None, norm, scale, nonfinite)
    assert nonfinite.tolist() == [0, 1, 0]
    args = arena.commit_args(skip=False)
    args["skip"] = nonfinite
    args["grad_scale"] = None
    ops.adam_commit(**args, **rows(kind, hyper, arena.step))
    assert arena.step.tolist() == [3.0, 2.0, 3.0]
    for name in ("param", "exp_avg", "exp_avg_sq"):
        tensor = arena.tensors()[name]
        assert torch.equal(tensor[5:11], before[name][5:11]), f"skipped agent's {name} changed"
        assert not torch.equal(tensor[:5], before[name][:5]) and not torch.equal(tensor[11:], before[name][11:])
        assert torch.isfinite(tensor).all()


def test_one_step_changes_no_buffer_it_does_not_own():
    kind, hyper = _hyper("rmsprop-centered-momentum-wd")
    arena = Arena(kind, [9, 9], torch.float64, seed=6).warm_up(kind, hyper)
    grad, lr, chunks = arena.grad.clone(), arena.lr.clone(), arena.chunks.clone()
    ops.rmsprop_commit(**arena.commit_args(), **rows(kind, hyper, arena.step))
    assert torch.equal(arena.grad, grad) and torch.equal(arena.lr, lr) and torch.equal(arena.chunks, chunks)


def test_deepcopy_of_reference_case_is_independent():
    # Guards the test helper itself: two Arena objects from one seed must be equal and separate.
    a1 = Arena("adam", [3, 4], torch.float32, seed=9)
    a2 = copy.deepcopy(a1)
    a2.param += 1
    assert not torch.equal(a1.param, a2.param)
    assert torch.equal(Arena("adam", [3, 4], torch.float32, seed=9).param, a1.param)
