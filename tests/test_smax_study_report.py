"""scripts/smax_study_report.py on a small fake study folder: finished pairs, a run still going, momentum runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import loaded_module

ROOT = Path(__file__).parents[1]
PER_UPDATE = 100_000  # 30 updates to 3M steps


@pytest.fixture(scope="module")
def report_module():
    with loaded_module(ROOT / "scripts" / "smax_study_report.py", "smax_study_report") as module:
        yield module


def _fake_run(
    study: Path,
    map_name: str,
    k: int,
    seed: int,
    wins: list[float],
    cpu: float | None,
    anticipation: str = "exact",
    audit_cosines: list[float] | None = None,
    actor_time: float = 1.0,
) -> None:
    """A run folder; its update phases take 0.8 (environment), 1 (critic) and ``actor_time`` seconds."""
    suffix = "" if anticipation == "exact" else f"-{anticipation}"
    run = study / map_name / "runs" / f"mappo-smax_{map_name}-k{k}{suffix}-s{seed}"
    run.mkdir(parents=True)
    config = {"k": k, "seed": seed, "steps": 3_000_000, "env": f"smax:{map_name}", "anticipation": anticipation}
    (run / "config.json").write_text(json.dumps(config))
    # the trainer's audit columns stay empty in the updates without a k=2 step, as metrics.csv writes them
    audits = audit_cosines or [None] * len(wins)
    # entropy falls from 1 by 0.01 per update; the last level's clip fraction is 0.05 k (level 1's 0.01 at k=2)
    rows = [
        "env_steps,win_rate,actor_loss,entropy,clip_fraction_level1,clip_fraction_level2,seconds_environment,"
        "seconds_critic,seconds_actor,audit_gate,audit_cosine,audit_relative_error,audit_norm_ratio"
    ]
    rows += [
        f"{(u + 1) * PER_UPDATE},{w},0.1,{1 - 0.01 * u},{0.05 if k == 1 else 0.01},{0.1 if k == 2 else ''},"
        f"{0.8 * (u + 1)},{u + 1},{actor_time * (u + 1)}," + (",,," if c is None else f"0.5,{c},0.4,1.1")
        for u, (w, c) in enumerate(zip(wins, audits))
    ]
    (run / "metrics.csv").write_text("\n".join(rows) + "\n")
    if cpu is not None:
        summary = {"cpu_seconds": cpu, "wall_seconds": 2 * cpu, "interrupted": False, "env_steps": 3_000_000}
        summary["versions"] = {"torch": "2.13.0", "jax": "0.6.0", "jaxmarl": "0.0.7"}
        (run / "summary.json").write_text(json.dumps(summary))


def test_report_of_a_partial_study(report_module, tmp_path):
    study, out = tmp_path / "study", tmp_path / "out"
    # k=1: 0.2 everywhere. k=2 seed 0: 0.6, but 0.0 at update 27 and 0.9 in the last 3 updates (the 8 % window of
    # 30 updates is 3 updates, of 10 updates 1, of 20 updates 2); seed 1: 0.4 up to 1M, then 0.7.
    k2_seed0 = [0.6] * 26 + [0.0] + [0.9] * 3
    k2_seed1 = [0.4] * 10 + [0.7] * 20
    for seed in (0, 1):
        _fake_run(study, "3s_vs_5z", 1, seed, [0.2] * 30, cpu=100.0)
    _fake_run(study, "3s_vs_5z", 2, 0, k2_seed0, cpu=130.0)
    _fake_run(study, "3s_vs_5z", 2, 1, k2_seed1, cpu=126.0)
    _fake_run(study, "3s_vs_5z", 2, 2, [0.55] * 15, cpu=None)  # still going at 1.5M steps
    _fake_run(study, "3s_vs_5z", 1, 2, [0.3] * 15, cpu=None)

    results = report_module.report(study, out, command="python scripts/smax_study_report.py")
    by_k = {int(name[2:]): entry for name, entry in results["maps"]["3s_vs_5z"]["by_variant"].items()}
    assert by_k[2]["win_rate_1000000_per_seed"] == {0: 0.6, 1: 0.4, 2: 0.55}
    assert by_k[2]["win_rate_2000000_per_seed"] == {0: 0.6, 1: 0.7, 2: None}  # seed 2 has not reached 2M
    assert by_k[2]["win_rate_3000000_per_seed"] == {0: pytest.approx(0.9), 1: pytest.approx(0.7), 2: None}
    assert by_k[2]["first_step_win_rate_0.5"] == {0: 100_000, 1: 1_100_000, 2: 100_000}
    assert by_k[1]["first_step_win_rate_0.5"] == {0: None, 1: None, 2: None}
    assert by_k[2]["states"][2].startswith("running")
    differences = results["maps"]["3s_vs_5z"]["differences"]["K2 - K1"]
    assert differences["3000000"]["per_seed"] == {0: pytest.approx(0.7), 1: pytest.approx(0.5)}
    mean, half, n = differences["3000000"]["mean_ci"]
    assert (mean, n) == (pytest.approx(0.6), 2) and half == pytest.approx(12.706 * 0.1414213 / 2**0.5, rel=1e-4)
    assert differences["1000000"]["per_seed"] == {0: pytest.approx(0.4), 1: pytest.approx(0.2), 2: pytest.approx(0.25)}
    assert differences["cpu_overhead"]["per_seed"] == {0: pytest.approx(0.30), 1: pytest.approx(0.26)}
    # the diagnostics over the same windows: entropy at 1M of update 10 alone, at 3M of updates 28-30; the
    # clip fraction of each run's last level (k=2: level 2's 0.1, not level 1's 0.01)
    assert by_k[1]["entropy_1000000"] == (pytest.approx(0.91), pytest.approx(0.0), 3)
    assert by_k[2]["entropy_3000000"][::2] == (pytest.approx(0.72), 2)
    assert by_k[2]["clip_fraction_1000000"][::2] == (pytest.approx(0.1), 3)
    assert by_k[1]["clip_fraction_3000000"][::2] == (pytest.approx(0.05), 2)
    assert results["commit"] and results["versions_ran"] == [{"jax": "0.6.0", "jaxmarl": "0.0.7", "torch": "2.13.0"}]

    table = (out / "results.md").read_text()
    assert "| 3s_vs_5z | k=2 | 0.52 ± " in table and "(n=3)" in table  # 1M: mean of 0.6, 0.4, 0.55
    assert "| 3s_vs_5z | K2 - K1 | " in table and "CPU +28 % (n=2)" in table
    assert "k=2 momentum" not in table and "| map | seed | gate |" not in table
    assert "s2: running or stopped without a summary, 1500000 steps" in table
    assert "Not started yet: 2s3z, 3s5z, 10m_vs_11m." in table
    assert (
        "| 3s_vs_5z | k=2 | 0.91 ± 0.00 (n=3) | 0.82 ± 0.00 (n=2) | 0.72 ± 0.00 (n=2) | 0.100 ± 0.000 (n=3) |" in table
    )
    assert (out / "curves.png").stat().st_size > 0
    copied = out / "runs" / "3s_vs_5z" / "mappo-smax_3s_vs_5z-k2-s2"
    assert (copied / "metrics.csv").read_text() == (
        study / "3s_vs_5z" / "runs" / "mappo-smax_3s_vs_5z-k2-s2" / "metrics.csv"
    ).read_text()
    assert not (copied / "summary.json").exists()


def test_report_puts_momentum_runs_beside_the_exact_ones(report_module, tmp_path):
    study, out = tmp_path / "study", tmp_path / "out"
    for seed in (0, 1):
        _fake_run(study, "2s3z", 1, seed, [0.2] * 30, cpu=100.0)
        _fake_run(study, "2s3z", 2, seed, [0.6] * 30, cpu=140.0, actor_time=2.0)
    # seed 0 audited (the exact level 1 too, exact k=2's actor time): no audit in the first two updates (gate 0,
    # no history), then cosines 0.8 and 0.2
    audits = [None] * 2 + [0.8, 0.2] * 14
    _fake_run(study, "2s3z", 2, 0, [0.5] * 30, cpu=110.0, anticipation="momentum", audit_cosines=audits, actor_time=2.0)
    _fake_run(study, "2s3z", 2, 1, [0.3] * 30, cpu=112.0, anticipation="momentum", actor_time=1.4)
    _fake_run(study, "2s3z", 2, 2, [0.3] * 10, cpu=None, anticipation="momentum", actor_time=1.4)  # still going

    results = report_module.report(study, out, command="python scripts/smax_study_report.py")
    entry = results["maps"]["2s3z"]
    assert sorted(entry["by_variant"]) == ["k=1", "k=2", "k=2 momentum"]
    momentum = entry["by_variant"]["k=2 momentum"]
    assert momentum["win_rate_3000000_per_seed"] == {0: pytest.approx(0.5), 1: pytest.approx(0.3), 2: None}
    assert momentum["audit_per_seed"] == {
        0: {
            "audit_gate": pytest.approx(0.5),
            "audit_cosine": pytest.approx(0.5),
            "audit_relative_error": pytest.approx(0.4),
            "audit_norm_ratio": pytest.approx(1.1),
        }
    }
    differences = entry["differences"]
    assert differences["momentum K2 - K1"]["3000000"]["per_seed"] == {0: pytest.approx(0.3), 1: pytest.approx(0.1)}
    assert differences["momentum K2 - exact K2"]["3000000"]["per_seed"] == {
        0: pytest.approx(-0.1),
        1: pytest.approx(-0.3),
    }
    # the audited run computes the exact level 1 too: left out of the cost figures
    assert differences["momentum K2 - K1"]["cpu_overhead"]["per_seed"] == {1: pytest.approx(0.12)}
    # an update in critic units: k=1 0.8 + 1 + 1 = 2.8, exact k=2 3.8, momentum 3.2; unfinished runs left out
    assert entry["by_variant"]["k=2"]["actor_over_critic"] == (pytest.approx(2.0), pytest.approx(0.0), 2)
    assert momentum["phases_in_critic_time_per_seed"][2] is None and 0 not in momentum["cpu_seconds_per_seed"]
    assert differences["K2 - K1"]["update_time_overhead"]["per_seed"] == {
        0: pytest.approx(1 / 2.8),
        1: pytest.approx(1 / 2.8),
    }
    assert differences["momentum K2 - exact K2"]["update_time_overhead"]["per_seed"] == {
        1: pytest.approx(3.2 / 3.8 - 1)
    }
    table = (out / "results.md").read_text()
    assert "| 2s3z | momentum K2 - K1 | " in table and "| CPU +12 % (n=1) | update +14 % (n=1) | |" in table
    assert "| 2s3z | k=2 momentum | 0.37 ± " in table and "| 2s3z | momentum K2 - exact K2 | " in table
    assert "| 2s3z | 0 | 0.500 | 0.500 | 0.400 | 1.100 |" in table
    assert (out / "runs" / "2s3z" / "mappo-smax_2s3z-k2-momentum-s0" / "metrics.csv").exists()


def test_report_refuses_a_folder_that_is_not_a_study(report_module, tmp_path):
    report = report_module.report
    with pytest.raises(FileNotFoundError, match="no study folder"):
        report(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ValueError, match="holds no <map>/runs/"):
        report(tmp_path, tmp_path / "out")
