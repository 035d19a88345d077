"""What the CPU can prove about the CUDA path (issue 19), and the CUDA-only checks.

The CPU checks: the driver requirement and its messages, the build's refusal of an nvcc whose CUDA
major version differs from torch's, the per-agent norm finish's thread mapping and summation order
(simulated on the host with the kernels' own functions), and that the couplings create no host data
on the step's path. With a GPU: the couplings under torch's sync debug mode, and a captured K-MAPPO
minibatch step that replays equal to eager steps under a per-step lr schedule.
"""

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cases import OPTIMIZER_INFOS, KMappoMinibatch

import kpg
from kpg import _C
from kpg import _ops as ops

from helpers import CUDA_SKIP_REASON, assert_close_to_scale

ROOT = Path(__file__).parents[1]
needs_cuda = pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))

# ---- the driver requirement ----------------------------------------------------------------------


def test_driver_of_the_same_or_a_newer_major_version_runs_the_kernels():
    assert _C.cuda_driver_problem(13000, 13000) == ""
    assert _C.cuda_driver_problem(13020, 13000) == ""  # minor versions are compatible
    assert _C.cuda_driver_problem(12040, 12080) == ""
    assert _C.cuda_driver_problem(13000, 12080) == ""


def test_older_driver_gets_the_driver_version_and_the_rebuild_command():
    problem = _C.cuda_driver_problem(12040, 13000)
    assert "supports CUDA up to 12.4" in problem and "built with CUDA 13.0" in problem
    assert "Linux driver >= 580.65.06" in problem
    assert "KPG_CUDA_COMPILER=/usr/local/cuda-12.<minor>/bin/nvcc pip install --no-build-isolation" in problem


def test_missing_driver_is_named():
    problem = _C.cuda_driver_problem(0, 12080)
    assert problem.startswith("no NVIDIA driver was found") and "Linux driver >= 525.60.13" in problem


def test_cuda_versions_match_the_build():
    versions, build = _C.cuda_versions(), _C.build_info()
    if not build["cuda"]:
        assert versions == {"driver": None, "runtime": None}
        return
    major, minor = (int(part) for part in build["cuda_version"].split(".")[:2])
    assert versions["runtime"] == 1000 * major + 10 * minor
    assert versions["driver"] >= 0
    if torch.cuda.is_available():
        assert versions["driver"] > 0


def test_info_reports_the_driver_requirement():
    result = subprocess.run([sys.executable, "-m", "kpg.info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    fields = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in result.stdout.splitlines()}
    assert "CUDA driver" in fields and "kpg's CUDA kernels can run" in fields
    if not _C.build_info()["cuda"]:
        assert fields["kpg's CUDA kernels can run"].startswith("no (this build has no CUDA kernels")
    elif _C.cuda_versions()["driver"] == 0:
        assert fields["kpg's CUDA kernels can run"].startswith("no: no NVIDIA driver was found")


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("cmake") is None, reason="needs nvcc and cmake")
def test_configure_refuses_an_nvcc_of_another_major_version_than_torch(tmp_path):
    """nvcc on this machine against a torch claimed to run the other CUDA major version."""
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    nvcc_major = int(nvcc.split("release ")[1].split(".")[0])
    other = f"{nvcc_major - 1}.8"
    pybind11 = pytest.importorskip("pybind11", reason="needs pybind11 importable (pip install pybind11)")

    def configure(*extra):
        env = {key: value for key, value in os.environ.items() if not key.startswith(("KPG_", "CUDACXX"))}
        return subprocess.run(
            [
                "cmake",
                "-S",
                str(ROOT),
                "-B",
                str(tmp_path / "build"),
                f"-DPython_EXECUTABLE={sys.executable}",
                f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                "-DKPG_CUDA=ON",
                f"-DKPG_TORCH_CUDA_VERSION={other}",
                f"-DKPG_CUDA_COMPILER={shutil.which('nvcc')}",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )

    refused = configure()
    message = " ".join(refused.stderr.split())  # CMake wraps its messages
    assert refused.returncode != 0
    assert f"is CUDA {nvcc_major}." in message and f"but torch (KPG_TORCH_CUDA_VERSION) runs CUDA {other}" in message
    assert f"KPG_CUDA_COMPILER=/usr/local/cuda-{other}/bin/nvcc" in message and "KPG_CUDA_MATCH_TORCH=OFF" in message
    allowed = configure("-DKPG_CUDA_MATCH_TORCH=OFF")
    assert allowed.returncode == 0, allowed.stderr
    assert f"the driver must then support CUDA {nvcc_major}.x" in " ".join(allowed.stderr.split())


# ---- the per-agent norm finish ---------------------------------------------------------------------


AGENT_CHUNK_COUNTS = {
    "one-agent-one-chunk": [1],
    "lane-edges": [0, 1, 31, 32, 33, 64, 65, 0],
    "one-shared-network": [12_208],  # 100 M float32 parameters in 8192-element chunks
    "more-agents-than-a-block": [(a * 7) % 40 for a in range(4 * _C.NORM_AGENTS_PER_BLOCK + 3)],
}


@pytest.mark.parametrize("counts", AGENT_CHUNK_COUNTS.values(), ids=AGENT_CHUNK_COUNTS.keys())
def test_norm_finish_reads_every_chunk_row_once_by_its_own_agent(counts):
    agent_chunks = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    readers = _C.norm_finish_readers(agent_chunks, int(agent_chunks[-1]))
    owners = np.repeat(np.arange(len(counts)), counts)
    assert np.array_equal(readers, owners), f"rows read by {sorted(set(readers.tolist()) - set(owners.tolist()))}"


def test_norm_finish_sums_in_the_fixed_lane_tree_order():
    """The CPU's norm is bit for bit the warp's order: lane l adds rows l, l + 32, ... of its agent,
    then the lanes meet in a tree of offsets 16, 8, 4, 2, 1 (as CUDA's shuffles)."""
    chunk = _C.CPU_CHUNK_ELEMS
    sizes = [chunk * 70 + 5, 3, 0, chunk * 33]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    chunks, agent_chunks = ops.chunk_table(offsets)
    g = torch.Generator().manual_seed(7)
    grad = torch.randn(offsets[-1], dtype=torch.float32, generator=g) * torch.logspace(-6, 6, offsets[-1]).float()
    a = len(sizes)
    chunk_sq = torch.zeros(chunks.shape[0], dtype=torch.float64)
    norm, scale = torch.zeros(a, dtype=torch.float64), torch.zeros(a, dtype=torch.float64)
    nonfinite = torch.zeros(a, dtype=torch.uint8)
    ops.agent_grad_norms(grad, chunks, agent_chunks, chunk_sq, None, norm, scale, nonfinite)
    sums = chunk_sq.tolist()
    for agent in range(a):
        rows = range(int(agent_chunks[agent]), int(agent_chunks[agent + 1]))
        lanes = [0.0] * _C.NORM_LANES
        for lane in range(_C.NORM_LANES):
            for row in rows[lane :: _C.NORM_LANES]:
                lanes[lane] += sums[row]
        offset = _C.NORM_LANES // 2
        while offset:
            for lane in range(offset):
                lanes[lane] += lanes[lane + offset]
            offset //= 2
        assert norm[agent].item() == float(np.sqrt(np.float64(lanes[0]))), f"agent {agent}"


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_cuda_norms_equal_the_cpu_order_on_cuda_chunk_sums(device):
    """On CUDA the finish reads CUDA's chunk sums; given them, the CPU's tree gives the same norms."""
    sizes = [_C.CUDA_CHUNK_ELEMS * 40 + 1, 17, 0, _C.CUDA_CHUNK_ELEMS * 3]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    chunks, agent_chunks = ops.chunk_table(offsets, device)
    grad = torch.randn(offsets[-1], dtype=torch.float32, device=device)
    a = len(sizes)
    out = (
        [torch.zeros(chunks.shape[0], dtype=torch.float64, device=device)]
        + [torch.zeros(a, dtype=torch.float64, device=device) for _ in range(2)]
        + [torch.zeros(a, dtype=torch.uint8, device=device)]
    )
    ops.agent_grad_norms(grad, chunks, agent_chunks, out[0], None, out[1], out[2], out[3])
    sums, agent_rows = out[0].cpu().tolist(), agent_chunks.cpu().tolist()
    for agent in range(a):
        rows = range(agent_rows[agent], agent_rows[agent + 1])
        lanes = [sum((sums[r] for r in rows[lane :: _C.NORM_LANES]), 0.0) for lane in range(_C.NORM_LANES)]
        offset = _C.NORM_LANES // 2
        while offset:
            for lane in range(offset):
                lanes[lane] += lanes[lane + offset]
            offset //= 2
        assert out[1][agent].item() == float(np.sqrt(np.float64(lanes[0])))


# ---- the couplings without host synchronization ----------------------------------------------------


@contextlib.contextmanager
def no_host_data(monkeypatch):
    """Fails on what synchronizes a CUDA stream with the host or leaves a CUDA graph's capture:
    reading a tensor on the host, or making a tensor from host data."""

    def refuse(name):
        def refused(*args, **kwargs):
            raise AssertionError(f"{name} on the coupling's path")

        return refused

    with monkeypatch.context() as patch:
        for name in ("tensor", "as_tensor", "from_numpy"):
            patch.setattr(torch, name, refuse(f"torch.{name}"))
        for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
            patch.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
        yield


def coupling_inputs(device, widths=(2, 3, 1, 3)):
    g = torch.Generator().manual_seed(3)
    own = [torch.randn(5, w, generator=g, dtype=torch.float64).to(device).requires_grad_() for w in widths]
    anticipated = [torch.randn(5, w, generator=g, dtype=torch.float64).to(device) for w in widths]
    return own, anticipated


@pytest.mark.parametrize("widths", [(2, 3, 1, 3), (4, 4, 4)], ids=["mixed-widths", "equal-widths"])
def test_joint_inputs_list_form_equals_slot_by_slot(widths, device):
    own, anticipated = coupling_inputs(device, widths)
    joint = kpg.joint_inputs(own, anticipated)
    for i in range(len(widths)):
        expected = torch.cat([own[j] if j == i else anticipated[j] for j in range(len(widths))], dim=-1)
        assert torch.equal(joint[i], expected)
    joint.sum().backward()
    assert all(torch.equal(o.grad, torch.ones_like(o)) for o in own)  # once per agent


@pytest.mark.parametrize("widths", [(2, 3, 1, 3), (4, 4, 4)], ids=["mixed-widths", "equal-widths"])
def test_couplings_make_no_host_data(widths, monkeypatch):
    own, anticipated = coupling_inputs("cpu", widths)
    stacked_own, stacked_anticipated = torch.randn(3, 5, 2), torch.randn(3, 5, 2)
    log_prob, old, adv = torch.randn(3, 7), torch.randn(3, 7), torch.randn(7)
    mask = torch.ones(3, 7)
    with no_host_data(monkeypatch):
        kpg.joint_inputs(own, anticipated).sum().backward()
        kpg.joint_inputs(stacked_own, stacked_anticipated, agent_dim=0)
        for others in ("product", "geometric"):
            for form in ("joint_clip", "weighted"):
                kpg.joint_ratio_loss(log_prob, old, adv, log_prob + 0.1, level=2, others=others, form=form, mask=mask)


def test_the_host_data_guard_catches_the_former_joint_inputs(monkeypatch):
    """Guards the guard: the list form as it was (widths sent to the device as a tensor) fails it."""
    own, _ = coupling_inputs("cpu")
    with no_host_data(monkeypatch), pytest.raises(AssertionError, match="torch.tensor"):
        torch.repeat_interleave(torch.arange(len(own)), torch.tensor([o.shape[-1] for o in own]))


@needs_cuda
def test_couplings_do_not_synchronize_on_cuda():
    own, anticipated = coupling_inputs("cuda")
    log_prob, old, adv = (torch.randn(3, 7, device="cuda") for _ in range(3))
    kpg.joint_inputs(own, anticipated)  # first calls may initialize CUDA state outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kpg.joint_inputs(own, anticipated).sum().backward()
        kpg.joint_ratio_loss(log_prob, old, adv, log_prob + 0.1, level=2, others="geometric")
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---- a captured K-MAPPO minibatch step -------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("k", [1, 2])
def test_captured_kmappo_step_replays_equal_to_eager_steps(k):
    runs = {}
    for mode in ("eager", "captured"):
        problem = KMappoMinibatch("cuda")
        opt = kpg.KPGOptimizer(
            problem.policy, k=k, lr=[3e-3, 1e-3, 2e-3], max_grad_norm=[0.5, 1.0, 0.2], nonfinite="skip"
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        runs[mode] = problem.train(opt, schedule, steps=8, capture_from=None if mode == "eager" else 2)
    for eager, captured in zip(runs["eager"], runs["captured"]):
        assert_close_to_scale(captured, eager, 1e-12, what="parameters after the captured steps")


# ---- scripts/cuda_checks.py, exercised on the CPU --------------------------------------------------


def test_cuda_check_script_runs_its_comparisons_cpu_against_cpu(monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import cuda_checks
    finally:
        sys.path.pop(0)
    one_case_per_optimizer = {
        info.configs[-1].desc: cuda_checks.UPDATE_CASES[info.configs[-1].desc] for info in OPTIMIZER_INFOS
    }
    monkeypatch.setattr(cuda_checks, "UPDATE_CASES", one_case_per_optimizer)
    results = []
    for check in (cuda_checks.check_updates, cuda_checks.check_norms, cuda_checks.check_optimizer):
        check(lambda label, problem: results.append((label, problem)), device="cpu")
    assert len(results) == len(one_case_per_optimizer) * 8 + 4 + 2
    assert [problem for _, problem in results if problem] == []


def test_cuda_check_script_refuses_without_a_gpu():
    if CUDA_SKIP_REASON is None:
        pytest.skip("a GPU is present")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/cuda_checks.py")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and "needs kpg's CUDA kernels and a GPU" in result.stderr
