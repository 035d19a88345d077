"""The CUDA path checked against the CPU path, with nothing but torch and kpg: what
scripts/gpu_check.sh runs on a GPU machine whether or not pytest is installed there.

Checks, each printed as PASS or FAIL with what differed (exit status 1 on any FAIL):

    update kernels   every optimizer and option, float32 and float64, commit and anticipate, aligned
                     and unaligned base addresses, skipped agents, per-agent gradient scales: CUDA
                     against the CPU kernels on the same inputs, agents with and without live state.
                     SGD, RMSprop and Adagrad must be bit-identical (both paths round the same
                     operations, no FMA: docs/cuda.md); Adam's per-agent
                     bias corrections use pow, which CUDA computes within 2 ulp of glibc, so Adam
                     must agree to a few units in the last place.
    norms            per-agent gradient norms, clipping scales and non-finite flags (CUDA sums its
                     8192-element chunks, the CPU its 16384-element ones: equal to rounding)
    KPGOptimizer     k=2 steps of an agent-batched MAPPO actor with per-agent clipping, CUDA vs CPU
    couplings        joint_inputs (both forms) and joint_ratio_loss under torch's sync debug mode
    capture_step     a captured K-MAPPO minibatch step replays equal to eager steps under a per-step
                     lr schedule

Run: python scripts/cuda_checks.py [--json PATH]. tests/test_cuda.py runs the comparisons CPU against CPU,
so that the script's own code is exercised where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

import kpg
from kpg import _C
from kpg import _ops as ops

# The test problems the pytest suites use, from a module that needs torch and kpg only.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cases import CONFIGS, UPDATE_CASES, KMappoMinibatch  # noqa: E402

# Agent sizes around the vector width and both paths' chunk sizes, with an empty agent.
SIZES = [0, 1, 3, 4, 5, 8191, 8192, 8193, 1027, 2051, 16385, 7]
# Optimizers whose coefficients use pow (Adam, NAdam, RAdam; cases.OptimizerInfo.bitwise_across_devices):
# units in the last place of the tensor's scale that pow's rounding may move a result.
POW_ULPS = 4


def arena_inputs(kind, dtype, offset, seed):
    """CPU tensors of one update: buffers start `offset` elements into their storage (offset 1
    makes every base address miss 16-byte alignment, so the kernels take their scalar path)."""
    g = torch.Generator().manual_seed(seed)
    n, a = sum(SIZES), len(SIZES)

    def buffer(values):
        storage = torch.zeros(n + offset, dtype=dtype)
        storage[offset:] = values
        return storage[offset:]

    tensors = {
        "param": buffer(torch.randn(n, dtype=dtype, generator=g)),
        "grad": buffer(torch.randn(n, dtype=dtype, generator=g)),
        **{name: buffer(torch.rand(n, dtype=dtype, generator=g)) for name in ops.KERNELS[kind].state_names},
        # Scalar state as torch.optim keeps it (float32), somewhere between its start and zero.
        **{name: torch.rand(a, generator=g) * initial for name, initial in ops.KERNELS[kind].scalar_states},
        "step": (torch.arange(a, dtype=torch.float64) % 4),
        # Agents that have stepped hold live state; the others take their first-step path.
        "live": (torch.arange(a) % 4 != 0).to(torch.uint8)[:, None].expand(a, ops.MAX_STATES).contiguous(),
        "lr": torch.rand(a, dtype=torch.float64, generator=g) * 0.1,
        "grad_scale": torch.rand(a, dtype=torch.float64, generator=g) + 0.25,
        "skip": (torch.arange(a) % 5 == 2).to(torch.uint8),
    }
    if kind == "rmsprop" and "grad_avg" in tensors:  # centered: keep square_avg above grad_avg ** 2
        tensors["square_avg"] = tensors["square_avg"] + tensors["grad_avg"] ** 2
    return tensors


def run_update(kind, hyper, commit, tensors, device):
    moved = {name: t.to(device) for name, t in tensors.items()}
    offsets = [0]
    for size in SIZES:
        offsets.append(offsets[-1] + size)
    chunks, _ = ops.chunk_table(offsets, device)
    anticipated = torch.full_like(moved["param"], 123.0)
    args = dict(param=moved["param"], grad=moved["grad"])
    if not commit:
        args["anticipated"] = anticipated
    args.update({name: moved[name] for name in (*ops.KERNELS[kind].state_names, *ops.KERNELS[kind].scalar_names)})
    args.update(
        step=moved["step"],
        live=moved["live"],
        lr=moved["lr"],
        grad_scale=moved["grad_scale"],
        skip=moved["skip"],
        chunks=chunks,
    )
    hyper_rows = ops.hyper_rows(kind, hyper, len(SIZES), device=device)
    ops.UPDATE_OPS[(kind, commit)](**args, hyper=hyper_rows)
    written = {
        "param": moved["param"],
        "step": moved["step"],
        "live": moved["live"],
        "anticipated": anticipated,
        **{name: moved[name] for name in (*ops.KERNELS[kind].state_names, *ops.KERNELS[kind].scalar_names)},
    }
    return {name: t.cpu() for name, t in written.items()}


def compare(cuda, cpu, exact, dtype):
    """'' when equal (bit for bit, or within POW_ULPS of the scale), else what differs."""
    problems = []
    for name, expected in cpu.items():
        actual = cuda[name]
        if exact or not expected.is_floating_point():
            if not torch.equal(actual, expected):  # the inputs are finite: no NaN to compare
                largest = (actual - expected).abs().max().item()
                problems.append(
                    f"{name}: {(actual != expected).sum().item()} elements differ, largest by {largest:.3e}"
                )
        else:
            scale = expected.abs().max().clamp_min(1e-30)
            bound = POW_ULPS * torch.finfo(dtype).eps * scale
            error = (actual.double() - expected.double()).abs().max()
            if not error <= bound:
                problems.append(f"{name}: differs by {error.item():.3e} > {bound.item():.3e}")
    return "; ".join(problems)


def check_updates(report, device="cuda"):
    for seed, (case, (kind, hyper)) in enumerate(UPDATE_CASES.items()):
        for dtype in (torch.float32, torch.float64):
            for offset in (0, 1):
                for commit in (False, True):
                    label = (
                        f"update {case} {str(dtype)[6:]} {'unaligned' if offset else 'aligned'} "
                        f"{'commit' if commit else 'anticipate'}"
                    )
                    tensors = arena_inputs(kind, dtype, offset, seed)
                    cpu = run_update(kind, hyper, commit, tensors, "cpu")
                    cuda = run_update(kind, hyper, commit, tensors, device)
                    exact = CONFIGS[case][0].bitwise_across_devices
                    report(label, compare(cuda, cpu, exact=exact, dtype=dtype))


def check_norms(report, device="cuda"):
    for dtype in (torch.float32, torch.float64):
        for clip in (False, True):
            g = torch.Generator().manual_seed(11)
            offsets = [0]
            for size in SIZES:
                offsets.append(offsets[-1] + size)
            grad = torch.randn(offsets[-1], dtype=dtype, generator=g) * 5
            grad[offsets[3] + 1] = float("nan")
            max_norm = torch.rand(len(SIZES), dtype=torch.float64, generator=g) * 50 if clip else None
            outputs = {}
            for label, on in (("cpu", "cpu"), ("cuda", device)):
                chunks, agent_chunks = ops.chunk_table(offsets, on)
                a = len(SIZES)
                out = dict(
                    norm=torch.zeros(a, dtype=torch.float64, device=on),
                    grad_scale=torch.zeros(a, dtype=torch.float64, device=on),
                    nonfinite=torch.zeros(a, dtype=torch.uint8, device=on),
                )
                chunk_sq = torch.zeros(chunks.shape[0], dtype=torch.float64, device=on)
                ops.agent_grad_norms(
                    grad.to(on),
                    chunks,
                    agent_chunks,
                    chunk_sq,
                    None if max_norm is None else max_norm.to(on),
                    out["norm"],
                    out["grad_scale"],
                    out["nonfinite"],
                )
                outputs[label] = {name: t.cpu() for name, t in out.items()}
            problems = []
            if not torch.equal(outputs["cuda"]["nonfinite"], outputs["cpu"]["nonfinite"]):
                problems.append("non-finite flags differ")
            for name in ("norm", "grad_scale"):
                a, b = outputs["cuda"][name], outputs["cpu"][name]
                finite = torch.isfinite(b)
                if not torch.equal(torch.isfinite(a), finite) or not torch.allclose(a[finite], b[finite], rtol=1e-12):
                    problems.append(f"{name}: {a.tolist()} vs {b.tolist()}")
            report(f"norms {str(dtype)[6:]} {'clip' if clip else 'no-clip'}", "; ".join(problems))


def train(device, k, steps, capture_from=None):
    """Parameters after `steps` minibatch steps; from step `capture_from` on, replays of a captured step."""
    problem = KMappoMinibatch(device, agents=4, obs=6, actions=3, batch=32)
    opt = kpg.KPGOptimizer(
        problem.policy, k=k, lr=[3e-3, 1e-3, 2e-3, 5e-3], max_grad_norm=[0.5, 1.0, 0.2, 0.05], nonfinite="skip"
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    return problem.train(opt, schedule, steps, capture_from)


def largest_difference(a, b):
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(a, b))


def check_optimizer(report, device="cuda"):
    for k in (1, 2):
        difference = largest_difference(train(device, k, 6), train("cpu", k, 6))
        report(
            f"KPGOptimizer k={k} CUDA vs CPU (6 steps, float64)",
            "" if difference <= 1e-9 else f"parameters differ by {difference:.3e} of their scale",
        )


def check_capture(report):
    for k in (1, 2):
        difference = largest_difference(train("cuda", k, 8, capture_from=2), train("cuda", k, 8))
        report(
            f"capture_step k={k}: 6 replays vs eager steps, per-step lr schedule",
            "" if difference <= 1e-12 else f"parameters differ by {difference:.3e} of their scale",
        )


def check_couplings_sync_free(report):
    g = torch.Generator().manual_seed(5)
    own = [torch.randn(5, w, generator=g).cuda().requires_grad_() for w in (2, 3, 1)]
    anticipated = [torch.randn(5, w, generator=g).cuda() for w in (2, 3, 1)]
    log_prob, old, advantages = (torch.randn(3, 7, generator=g).cuda() for _ in range(3))
    kpg.joint_inputs(own, anticipated)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kpg.joint_inputs(own, anticipated).sum().backward()
        kpg.joint_inputs(torch.stack(anticipated[:1] * 3), torch.stack(anticipated[:1] * 3), agent_dim=0)
        kpg.joint_ratio_loss(log_prob, old, advantages, log_prob + 0.1, level=2, others="geometric")
        problem = ""
    except RuntimeError as error:
        problem = f"synchronized: {error}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    report("couplings under torch.cuda.set_sync_debug_mode('error')", problem)


CHECKS = (check_updates, check_norms, check_optimizer, check_couplings_sync_free, check_capture)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write every check's outcome as JSON to PATH")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not _C.build_info()["cuda"]:
        sys.exit(
            "cuda_checks: needs kpg's CUDA kernels and a GPU torch can see "
            f"(kpg built with CUDA: {_C.build_info()['cuda']}, torch.cuda.is_available(): "
            f"{torch.cuda.is_available()})"
        )
    results = []

    def report(label, problem):
        results.append({"check": label, "passed": not problem, "problem": problem})
        print(f"{'PASS' if not problem else 'FAIL'}  {label}{'' if not problem else ': ' + problem}", flush=True)

    started = time.perf_counter()
    for check in CHECKS:
        try:
            check(report)
        except Exception as error:  # a crashing check is a failed check; the others still run
            report(check.__name__, f"{type(error).__name__}: {error}")
            traceback.print_exc()
    failed = [r for r in results if not r["passed"]]
    seconds = time.perf_counter() - started
    print(
        f"\n{len(results) - len(failed)} of {len(results)} CUDA checks passed in {seconds:.1f} s "
        f"on {torch.cuda.get_device_name()}"
    )
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, file, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
