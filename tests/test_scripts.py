"""The examples and the benchmarks run end to end on small settings and report what they
promise. Their numbers are not judged here: speed is the benchmark's job, on an idle machine."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_critic_coupling_example_reports_both_levels():
    out = _run("examples/critic_coupling.py", "--steps", "3")
    header = next(line for line in out.splitlines() if line.split()[:1] == ["step"])
    assert header.split() == ["step", "k=1", "k=2"]


def test_mappo_example_runs_a_round_per_level():
    out = _run("examples/mappo_joint_ratio.py", "--rounds", "1", "--seeds", "1", "--batch", "32")
    header = next(line for line in out.splitlines() if line.split()[:1] == ["round"])
    assert header.split() == ["round", "k=1", "k=2"]
    assert "skipped agent steps: 0" in out


def test_benchmark_json_has_every_method_and_ratio(tmp_path):
    path = tmp_path / "optimizer.json"
    _run("bench/optimizer.py", "--quick", "--cases", "2x1000", "3x333", "--device", "cpu", "--json", str(path))
    report = json.loads(path.read_text())
    cases = report["cases"]
    assert [(c["agents"], c["params_per_agent"]) for c in cases] == [(2, 1000), (3, 333)]
    for case in cases:
        assert set(case["seconds"]) | set(case["unavailable"]) == set(report["meta"]["byte_model_elements_per_param"])
        assert all(seconds > 0 for seconds in case["seconds"].values())
        assert {"commit_vs_torch_fused", "k2_vs_naive", "commit_fraction_of_copy_bandwidth"} <= set(case["ratios"])
        assert case["ratios"]["k2_vs_naive"] > 0


def test_agents_benchmark_json_has_every_method_and_ratio(tmp_path):
    path = tmp_path / "agents.json"
    _run("bench/agents.py", "--quick", "--no-memory", "--json", str(path))
    report = json.loads(path.read_text())
    assert report["meta"]["threads"] >= 1 and report["meta"]["quick"]
    for case in report["cases"]:
        assert set(case["seconds"]) == {"torch_k1", "naive_k2", "kpg_k1", "kpg_k2"}
        assert all(seconds > 0 for seconds in case["seconds"].values())
        assert case["ratios"]["k2_speedup_over_naive"] > 0 and case["ratios"]["kpg_k2_over_k1"] > 0
        assert 0 < case["ratios"]["kpg_k1_fraction_of_matmul_rate"]
