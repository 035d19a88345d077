"""scripts/benchmarl_kmappo_report.py on a small fake runs folder: finished pairs, a stale start, a run going."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from helpers import loaded_module

ROOT = Path(__file__).parents[1]


@pytest.fixture
def report_module(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # the report reuses smax_study_report's statistics
    with loaded_module(ROOT / "scripts" / "benchmarl_kmappo_report.py", "benchmarl_kmappo_report") as module:
        yield module


def _scalar(folder: Path, name: str, values: list[float]) -> None:
    (folder / name).write_text("".join(f"{i},{v}\n" for i, v in enumerate(values)))


def _fake_run(
    runs: Path, k: int, seed: int, returns: list[float], seconds: float, done: bool, stamp="00_00_00",
    task="navigation", command="python -m kpg.benchmarl.run algorithm=kmappo task=vmas/navigation",
):  # fmt: skip
    folder = runs / f"{task}_k{k}_s{seed}"
    experiment = folder / f"kmappo_navigation_mlp__{stamp}"
    scalars = experiment / experiment.name / "scalars"
    scalars.mkdir(parents=True)
    _scalar(scalars, "counters_total_frames.csv", [6000.0 * (i + 1) for i in range(len(returns))])
    _scalar(scalars, "collection_reward_episode_reward_mean.csv", returns)
    _scalar(scalars, "timers_iteration_time.csv", [seconds] * len(returns))
    _scalar(scalars, "eval_reward_episode_reward_mean.csv", returns[:1])
    (folder / "provenance.json").write_text(
        json.dumps([{"commit": "abc", "command": command, "versions": {"benchmarl": "1.5.2"}}])
    )
    if done:
        (folder / "done").touch()


def test_report_of_a_partial_study(report_module, tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    # 20 iterations: the 10 % window is the last 2.
    _fake_run(runs, 1, 0, [0.0] * 18 + [0.5, 0.7], seconds=30.0, done=True)
    _fake_run(runs, 1, 0, [0.9] * 3, seconds=30.0, done=True, stamp="11_11_11")  # a stale, shorter start
    _fake_run(runs, 2, 0, [0.0] * 18 + [0.8, 0.8], seconds=57.0, done=True)
    _fake_run(runs, 1, 1, [0.2] * 20, seconds=40.0, done=True)
    _fake_run(runs, 2, 1, [0.1] * 20, seconds=60.0, done=True)
    _fake_run(runs, 2, 2, [0.3] * 5, seconds=60.0, done=False)
    many = "python -m kpg.benchmarl.run algorithm=kmappo task=vmas/navigation task.n_agents=16 task.shared_rew=true"
    for k, final in ((1, 0.4), (2, 0.1)):
        _fake_run(runs, k, 0, [final] * 20, seconds=90.0 * k, done=True, task="navigation-16agents", command=many)

    results = report_module.report(runs, out)
    by_k = results["tasks"]["navigation"]["by_k"]
    assert by_k[1]["final_return_per_seed"] == {0: pytest.approx(0.6), 1: pytest.approx(0.2)}
    assert by_k[2]["final_return_per_seed"] == {0: pytest.approx(0.8), 1: pytest.approx(0.1)}  # seed 2 still going
    paired = results["tasks"]["navigation"]["k2_minus_k1"]
    assert paired["return_per_seed"] == {0: pytest.approx(0.2), 1: pytest.approx(-0.1)}
    assert paired["iteration_overhead_per_seed"] == {0: pytest.approx(0.9), 1: pytest.approx(0.5)}
    mean, half, n = paired["return"]
    assert (mean, n) == (pytest.approx(0.05), 2) and half == pytest.approx(12.706 * 0.3 / 2**0.5 / 2**0.5, rel=1e-4)

    # A task variant is its own row group, kept apart from the task it changes, its options named.
    variant = results["tasks"]["navigation-16agents"]
    assert variant["k2_minus_k1"]["return_per_seed"] == {0: pytest.approx(-0.3)}
    assert variant["k2_minus_k1"]["iteration_overhead_per_seed"] == {0: pytest.approx(1.0)}

    table = (out / "k2_vs_k1.md").read_text()
    assert "navigation_k2_s2 (30000 frames)" in table
    assert "navigation-16agents: n_agents=16, shared_rew=true" in table
    with open(out / "runs" / "navigation_k1_s0" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 20 and rows[-1]["episode_reward_mean"] == "0.7" and rows[1]["eval_episode_reward_mean"] == ""
    assert json.loads((out / "runs" / "navigation_k1_s0" / "provenance.json").read_text())[0]["commit"] == "abc"
    assert (out / "k2_vs_k1.png").stat().st_size > 0


def test_report_refuses_a_folder_without_runs(report_module, tmp_path):
    with pytest.raises(ValueError, match="no run with BenchMARL CSV scalars"):
        report_module.report(tmp_path, tmp_path / "out")
