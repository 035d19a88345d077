"""Long runs: the CPU kernels let other Python threads run (the extension drops the GIL around
them), and the soak script's short form runs and reports flat memory. The full soak (100 000
steps) is scripts/soak.py; its figures are in docs/reliability.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kpg import _ops as ops

from helpers import python_thread_progress

ROOT = Path(__file__).parents[1]
F64 = torch.float64
N = 8 * 1024 * 1024


def _large_norms():
    grad = torch.randn(N)
    chunks, agent_chunks = ops.chunk_table([0, N // 2, N])
    out = dict(
        chunk_sq=torch.zeros(chunks.shape[0], dtype=F64),
        norm=torch.zeros(2, dtype=F64),
        grad_scale=torch.zeros(2, dtype=F64),
        nonfinite=torch.zeros(2, dtype=torch.uint8),
    )
    return lambda: ops.agent_grad_norms(
        grad,
        chunks,
        agent_chunks,
        out["chunk_sq"],
        torch.ones(2, dtype=F64),
        out["norm"],
        out["grad_scale"],
        out["nonfinite"],
    )


def _large_anticipate():
    param, grad, anticipated = torch.randn(N), torch.randn(N), torch.empty(N)
    chunks, _ = ops.chunk_table([0, N // 3, N])
    step, lr = torch.zeros(2, dtype=F64), torch.full((2,), 1e-2, dtype=F64)
    buffer = torch.zeros(N)
    hyper = ops.hyper_rows("sgd", dict(momentum=0.9), 2)
    live = torch.zeros(2, ops.MAX_STATES, dtype=torch.uint8)
    return lambda: ops.sgd_anticipate(param, grad, anticipated, buffer, step, live, lr, hyper, None, None, chunks)


@pytest.mark.parametrize("make_call", [_large_norms, _large_anticipate], ids=["agent_grad_norms", "sgd_anticipate"])
def test_a_python_thread_keeps_running_during_a_large_cpu_kernel(make_call):
    """The counting thread yields the GIL at every iteration; while the main thread is inside a
    kernel it can only advance if the kernel runs without the GIL. With the GIL held it would get
    at most a switch or two per call (the op's own Python takes well under 1 ms)."""
    call = make_call()
    call()  # warm: allocate the pool's workers outside the measurement
    during = python_thread_progress(call)
    assert max(during) > 20, f"the counting thread advanced only {during} times during the calls"


def test_soak_script_reports_flat_memory(tmp_path):
    report_path = tmp_path / "soak.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "soak.py"),
            "--steps",
            "600",
            "--window",
            "200",
            "--max-slowdown",
            "100",
            "--json",
            str(report_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(report_path.read_text())
    assert report["optimizer_steps"] == 600 and len(report["windows"]) == 3 and report["parameters_finite"]
    assert report["rss_growth_mib"] <= 8.0, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
