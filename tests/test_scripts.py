"""The examples and the benchmarks run end to end on small settings and report what they
promise. Their numbers are not judged here: speed is the benchmark's job, on an idle machine."""

import contextlib
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import loaded_module

ROOT = Path(__file__).parents[1]


def _run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
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


def test_agents_benchmark_json_has_every_method_and_ratio(load_script, tmp_path):
    path = tmp_path / "agents.json"
    _run("bench/agents.py", "--quick", "--no-memory", "--json", str(path))
    report = json.loads(path.read_text())
    assert report["meta"]["threads"] >= 1 and report["meta"]["quick"]
    for case in report["cases"]:
        assert set(case["seconds"]) == {"torch_k1", "naive_k2", "kpg_k1", "kpg_k2", "kpg_mk2"}
        assert all(seconds > 0 for seconds in case["seconds"].values())
        assert case["ratios"]["k2_speedup_over_naive"] > 0 and case["ratios"]["kpg_k2_over_k1"] > 0
        assert case["ratios"]["kpg_k1_fraction_of_matmul_rate"] > 0


@pytest.fixture
def load_script():
    """Imports scripts as modules, registered while the test runs (dataclasses look their module up)."""
    with contextlib.ExitStack() as stack:
        yield lambda script: stack.enter_context(loaded_module(ROOT / script, Path(script).stem + "_script"))


class _FakeClock:
    """Stands in for the ``time`` module of a script: ``perf_counter`` moves only when a step runs."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_agents_benchmark_times_its_methods_in_turn(load_script, monkeypatch):
    """Every round visits every unsettled step: one untimed call, then timed calls for a slice."""
    bench = load_script("bench/agents.py")
    clock = _FakeClock()
    monkeypatch.setattr(bench, "time", clock)
    calls = []
    durations = {
        "a": lambda n: 0.004,
        "b": lambda n: 0.02,
        "noisy": lambda n: (0.001, 0.009, 0.002, 0.006, 0.01)[n % 5],
    }

    def step(name):
        def run():
            clock.now += durations[name](sum(c == name for c in calls))
            calls.append(name)

        return run

    min_run_time, max_run_time = 0.04, 0.2
    timings = bench.time_side_by_side({name: step(name) for name in durations}, min_run_time, max_run_time)

    runs = [name for index, name in enumerate(calls) if index == 0 or calls[index - 1] != name]
    rounds = bench.ROUNDS  # slices of min_run_time / ROUNDS: a and b are done after exactly ROUNDS rounds
    # noisy's spread stays large, so its last run goes on alone until max_run_time
    assert runs == ["a", "b", "noisy"] * rounds
    assert timings["a"].times == pytest.approx([0.004] * 3 * rounds)  # 3 calls fill a 0.01 s slice
    assert timings["b"].times == pytest.approx([0.02] * rounds)  # one call per slice at least
    assert calls.count("a") == 3 * rounds + rounds and calls.count("b") == 2 * rounds  # one untimed call a slice
    assert max_run_time <= sum(timings["noisy"].times) < max_run_time + 0.02
    assert timings["a"].median == pytest.approx(0.004) and timings["a"].iqr == pytest.approx(0.0)


def test_vmas_mappo_speed_takes_an_iterations_cost_from_the_difference_of_two_processes(
    load_script, monkeypatch, tmp_path
):
    bench = load_script("bench/vmas_mappo_speed.py")
    start_up = 9.0
    rate = {"benchmarl": 30.0, "kpg_k1": 27.0, "kpg_k2": 51.0, "kpg_light_k1": 1.2, "kpg_light_k2": 1.5}
    commands = []

    def fake_process(command, folder):
        commands.append(command)
        if "benchmarl.run" in command:
            variant = "benchmarl"
            frames = int(next(a for a in command if a.startswith("experiment.max_n_frames=")).split("=")[1])
        else:
            preset = json.loads(Path(command[command.index("--config") + 1]).read_text())
            light = preset["mappo"] == {"rollout": 100}
            variant = f"kpg_{'light_' if light else ''}k{command[command.index('--k') + 1]}"
            frames = int(command[command.index("--steps") + 1])
        cpu = start_up + rate[variant] * frames / bench.FRAMES_PER_ITERATION
        return {"cpu": cpu, "wall": 2 * cpu}

    monkeypatch.setattr(bench, "timed_process", fake_process)
    args = bench.argparse.Namespace(task="navigation", variants=list(bench.VARIANTS), iterations=3, rounds=2)
    per_iteration = bench.measure(args, tmp_path)
    assert len(commands) == 2 * 2 * 5  # rounds x (1 and more iterations) x variants
    frames = [int(c[c.index("--steps") + 1]) for c in commands if "--steps" in c]
    assert frames[:8] == [6000, 18000] * 2 + [6000, 126000] * 2  # the light preset: 20 extra iterations, not 2
    for variant, runs in per_iteration.items():
        assert [run["cpu"] for run in runs] == pytest.approx([rate[variant]] * 2)
        assert [run["wall"] for run in runs] == pytest.approx([2 * rate[variant]] * 2)
    rows = {line.split()[0]: line.split() for line in bench.report(per_iteration, "navigation")[2:]}
    assert float(rows["kpg_k2"][2]) == pytest.approx(51.0 / 30.0, abs=0.001)
    assert float(rows["kpg_light_k1"][2]) == pytest.approx(1.2 / 30.0, abs=0.001)


@pytest.mark.parametrize(
    "preset, epochs, minibatches, hidden",
    [("vmas_benchmarl.toml", 45, 15, [256, 256]), ("vmas_kpg.toml", 5, 2, [64, 64])],
)
def test_vmas_mappo_speed_runs_kpg_with_the_preset_it_names(
    load_script, monkeypatch, tmp_path, preset, epochs, minibatches, hidden
):
    """The kpg command the benchmark times parses into the preset's run (its update, 60 copies, ...)."""
    from kpg.app import cli

    bench = load_script("bench/vmas_mappo_speed.py")
    table = bench.train_table(bench.CONFIGS / preset, tmp_path / "table")
    command = bench.kpg_command("navigation", 2, 12000, tmp_path / "run", table)
    assert command[1:4] == ["-m", "kpg", "train"]
    seen = []
    config_class, _ = cli.COMMANDS["train"]
    monkeypatch.setitem(cli.COMMANDS, "train", (config_class, seen.append))
    cli.main(command[3:])
    (config,) = seen
    assert (config.k, config.steps, config.env, config.copies, config.threads) == (2, 12000, "vmas:navigation", 60, 1)
    assert (config.mappo.epochs, config.mappo.minibatches, config.mappo.rollout) == (epochs, minibatches, 100)
    assert list(config.mappo.hidden) == hidden
    assert config.env_options == {"shared_rew": "false"}


def test_anticipation_benchmark_reports_momentums_floor(tmp_path):
    path = tmp_path / "anticipation.json"
    out = _run("bench/anticipation.py", "--agents", "2", "--threads", "1", "--process-time", "1", "--json", str(path))
    (case,) = json.loads(path.read_text())["cases"]
    seconds = case["seconds"]
    assert set(seconds) == {"kpg_k1", "kpg_k2", "kpg_mk2", "forward", "rule", "rule_plain"}
    floor = (seconds["kpg_k1"] + seconds["forward"] + seconds["rule"]) / seconds["kpg_k1"]
    assert case["momentum_k2_floor_over_k1"] == pytest.approx(floor)
    assert "target momentum k=2 / k=1 <= 1.35 at 2 agents" in out


def test_smax_study_adds_momentum_runs_beside_the_exact_pairs(load_script, tmp_path):
    study = load_script("scripts/smax_study.py")
    exact = study.run_configs(tmp_path, maps=["2s3z"], seeds=[0, 1])
    assert [(c.k, c.seed, c.anticipation, c.anticipation_audit) for c in exact] == [
        (1, 0, "exact", False),
        (2, 0, "exact", False),
        (1, 1, "exact", False),
        (2, 1, "exact", False),
    ]
    momentum = study.run_configs(
        tmp_path, maps=["3s_vs_5z", "2s3z"], seeds=[0, 1], anticipation="momentum", audit_seeds={0}
    )
    assert [(c.env, c.k, c.seed, c.anticipation_audit) for c in momentum] == [
        ("smax:3s_vs_5z", 2, 0, True),
        ("smax:3s_vs_5z", 2, 1, False),
        ("smax:2s3z", 2, 0, True),
        ("smax:2s3z", 2, 1, False),
    ]
    # their own folders beside the exact runs of the same map, and nothing else of the preset changed
    assert momentum[2].run_dir == tmp_path / "2s3z" / "runs" / "mappo-smax_2s3z-k2-momentum-s0"
    assert exact[1].run_dir == tmp_path / "2s3z" / "runs" / "mappo-smax_2s3z-k2-s0"
    assert {
        f.name for f in dataclasses.fields(exact[1]) if getattr(exact[1], f.name) != getattr(momentum[2], f.name)
    } == {
        "anticipation",
        "anticipation_audit",
    }


def test_benchmark_targets_pass_on_their_side_of_the_limit_and_fail_unmeasured(load_script):
    bench = load_script("bench/optimizer.py")
    ratios = {"commit_vs_torch_fused": 3.0, "k2_vs_naive": 4.9, "commit_fraction_of_copy_bandwidth": None}
    verdicts = bench.judge_targets({"agents": 4096, "params_per_agent": 4096, "device": "cpu", "ratios": ratios})
    assert [(v["ratio"], v["passed"]) for v in verdicts] == [
        ("commit_vs_torch_fused", True),  # at least 3.0: the limit itself passes
        ("k2_vs_naive", False),
        ("commit_fraction_of_copy_bandwidth", False),  # not measured is not passed
    ]
    at_most = bench.Target("k2_over_torch_fused_stacked", 1.8, None, at_least=False)
    assert bench.judged(at_most, 1.8)["passed"] and not bench.judged(at_most, 1.81)["passed"]
    assert bench.judge_targets({"agents": 8, "params_per_agent": 64, "device": "cpu", "ratios": ratios}) == []


def test_benchmarl_kmappo_puts_a_task_variant_in_its_own_folders(load_script, monkeypatch, tmp_path):
    script = load_script("scripts/benchmarl_kmappo.py")
    commands = []
    monkeypatch.setattr(script, "record_start", lambda folder, command: None)
    monkeypatch.setattr(script.subprocess, "run", lambda command, check: commands.append(command))
    arguments = ["--runs", str(tmp_path), "--tasks", "navigation", "--ks", "2", "--seeds", "0"]
    monkeypatch.setattr(
        sys, "argv", ["benchmarl_kmappo.py", *arguments, "--task-options", "n_agents=16", "--label", "16agents"]
    )
    script.main()
    (command,) = commands
    assert "task=vmas/navigation" in command and "task.n_agents=16" in command
    assert f"experiment.save_folder={tmp_path / 'navigation-16agents_k2_s0'}" in command
    assert (tmp_path / "navigation-16agents_k2_s0" / "done").exists()
    # options without a label would write into the unchanged task's folders: refused before any run
    monkeypatch.setattr(sys, "argv", ["benchmarl_kmappo.py", *arguments, "--task-options", "n_agents=16"])
    with pytest.raises(SystemExit):
        script.main()
    assert len(commands) == 1 and not (tmp_path / "navigation_k2_s0").exists()


def test_benchmarl_vmas_compares_returns_at_the_cpu_time_benchmarl_spends(load_script, tmp_path):
    """BenchMARL's 30 000 frames cost 5 x 22 CPU s (its median iteration); a kpg run at 2 CPU s an iteration gets
    55 iterations (330 000 frames) in that time, and its return is read there. 90 % of BenchMARL's final 5.0
    is first reached by BenchMARL's 3-iteration mean at 54 000 frames (9 x 22 CPU s), by the run's at 456 000
    (76 x 2 CPU s)."""
    report = load_script("scripts/benchmarl_vmas.py")
    speed = tmp_path / "speed.json"
    speed.write_text(json.dumps({"per_iteration": {"benchmarl": [{"cpu": 18.0}, {"cpu": 22.0}, {"cpu": 30.0}]}}))
    run = tmp_path / "light" / "runs" / "mappo-vmas_navigation-k1-s0"
    run.mkdir(parents=True)
    frames = range(6000, 600_001, 6000)
    run.joinpath("metrics.csv").write_text(
        "env_steps,episode_return,wall_seconds\n" + "".join(f"{f},{f / 1e5},{f / 1e3}\n" for f in frames)
    )
    run.joinpath("summary.json").write_text(json.dumps({"cpu_seconds": 200.0, "updates": 100}))
    benchmarl_curve = [[f, f / 1e4] for f in range(6000, 300_001, 6000)]
    results = {
        "tasks": {
            "navigation": {
                "benchmarl": {"curves": [benchmarl_curve], "final_return": 5.0},
                "kpg": [{"results": str(tmp_path / "light"), "label": "light", "ks": ["1"]}],
            }
        }
    }
    args = report.argparse.Namespace(
        at=[30_000, 100_000, 1_000_000], frames=300_000, seeds=[0], speed=[f"navigation={speed}"]
    )
    rows = [line for line in report.cpu_budget_lines(args, results) if line.startswith("| navigation")]
    assert rows == [
        "| navigation | BenchMARL MAPPO | 22.00 | 110, 30 000, 2.40 | 367, 100 000, 9.00 | 198 (1/1) |",
        "| navigation | kpg MAPPO (k=1), light | 2.00 | 110, 330 000, 3.24 | 367, 1 100 000, - (runs too short) "
        "| 152 (1/1) |",
    ]


def test_benchmarl_vmas_takes_kpgs_final_return_as_benchmarls(load_script):
    """The per-iteration return over the iterations in the last 10 % of the frames (not kpg compare's recent
    return, which averages 20 iterations); None for a run short of the frames."""
    report = load_script("scripts/benchmarl_vmas.py")
    rows = [{"frames": float(f), "return": f / 1e5} for f in range(6000, 300_001, 6000)]
    assert report.final_episode_return(rows, 300_000) == pytest.approx((2.76 + 2.82 + 2.88 + 2.94 + 3.0) / 5)
    assert report.final_episode_return(rows[:-1], 300_000) is None and report.final_episode_return([], 1) is None
