"""BenchMARL's MAPPO on VMAS tasks next to kpg's MAPPO (k=1) and K2-MAPPO: same tasks, budget and
seeds (issue 16 item 4). Run with kpg's Python; BenchMARL runs in its own environment, given as
``--benchmarl-python`` (docs/vmas.md says how to install it: it needs torchrl < 0.12).

    python scripts/benchmarl_vmas.py --benchmarl-python /root/benchmarl-venv/bin/python \\
        --runs /root/benchmarl-runs --frames 300000 \\
        --kpg navigation=results/vmas_navigation_benchmarl_task balance=results/vmas_balance_benchmarl_task \\
              "navigation=results/vmas_navigation_benchmarl_settings=BenchMARL settings" \\
        --out results/vmas_benchmarl

Each (task, seed) runs BenchMARL's own entry point (``python -m benchmarl.run algorithm=mappo
task=vmas/TASK``) with its defaults, except the budget (``experiment.max_n_frames``), one thread,
CSV logging, no rendering, a checkpoint every ``--checkpoint-every`` frames and a greedy evaluation
every ``--evaluate-every`` frames. A finished run
(``finished.json`` in its folder) is never rerun; an unfinished one continues from its newest
checkpoint. Then the report: BenchMARL's per-iteration mean episode return (per agent, as kpg's
``episode_return``) averaged over the last 10 % of the frames, mean and 95 % interval over the
seeds, next to the ``kpg compare`` results folders given with ``--kpg``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from kpg.compare import FINAL_FRACTION, mean_and_halfwidth

RETURN_FILE = "collection_agents_reward_episode_reward_mean.csv"
EVAL_RETURN_FILE = "eval_agents_reward_episode_reward_mean.csv"
FRAMES_FILE = "counters_total_frames.csv"


def benchmarl_arguments(
    task: str, seed: int, frames: int, checkpoint_every: int, evaluate_every: int, folder: Path
) -> list[str]:
    arguments = [
        "algorithm=mappo",
        f"task=vmas/{task}",
        f"seed={seed}",
        f"experiment.max_n_frames={frames}",
        "experiment.loggers=[csv]",
        "experiment.render=False",
        f"experiment.checkpoint_interval={checkpoint_every}",
        f"experiment.evaluation_interval={evaluate_every}",
        f"experiment.save_folder={folder}",
    ]
    checkpoints = sorted(folder.glob("*/checkpoints/checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[-1]))
    if checkpoints:
        arguments.append(f"experiment.restore_file={checkpoints[-1]}")
    return arguments


def run_one(
    python: str, task: str, seed: int, frames: int, checkpoint_every: int, evaluate_every: int, runs: Path
) -> Path:
    folder = runs / f"{task}-s{seed}"
    if (folder / "finished.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    arguments = benchmarl_arguments(task, seed, frames, checkpoint_every, evaluate_every, folder)
    command = [python, "-m", "benchmarl.run", *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.perf_counter()
    with open(folder / "benchmarl.log", "a") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        # Hydra writes its outputs/ folder into the working directory: the run's folder, not the caller's.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=folder)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(
            f"BenchMARL {task} seed {seed} failed (exit {process.returncode}); see {folder / 'benchmarl.log'}"
        )
    finished = {
        "command": shlex.join(command),
        "frames": frames,
        "wall_seconds_last_leg": time.perf_counter() - started,
        "cpu_seconds_last_leg": usage.ru_utime + usage.ru_stime,
    }
    (folder / "finished.json").write_text(json.dumps(finished, indent=2))
    return folder


def scalar(folder: Path, name: str) -> dict[int, float]:
    """One BenchMARL CSV scalar by iteration; a resumed run may log an iteration twice: the last one counts."""
    values: dict[int, float] = {}
    for path in folder.glob(f"*/*/scalars/{name}"):
        with open(path) as file:
            for row in csv.reader(file):
                values[int(row[0])] = float(row[1])
    return values


def parse_kpg_study(entry: str) -> tuple[str, Path, str]:
    """``TASK=DIR`` or ``TASK=DIR=LABEL``: a ``kpg compare`` results folder for TASK and its rows' label."""
    task, folder, *label = entry.split("=")
    return task, Path(folder), label[0] if label else "kpg defaults"


def benchmarl_summary(folder: Path, frames: int) -> dict:
    returns, totals = scalar(folder, RETURN_FILE), scalar(folder, FRAMES_FILE)
    iterations = sorted(set(returns) & set(totals))
    if not iterations or totals[iterations[-1]] < frames:
        raise RuntimeError(f"{folder}: BenchMARL logged fewer than {frames} frames; rerun to finish it")
    last = [returns[i] for i in iterations if totals[i] > frames * (1 - FINAL_FRACTION)]
    evaluations = scalar(folder, EVAL_RETURN_FILE)
    times = scalar(folder, "timers_total_time.csv")
    return {
        "final_return": float(np.mean(last)),
        "eval_return": evaluations[max(evaluations)] if evaluations else None,
        "wall_seconds": times[max(times)] if times else None,
        "curve": [[totals[i], returns[i]] for i in iterations],
    }


def report(args: argparse.Namespace, folders: dict[tuple[str, int], Path]) -> dict:
    results: dict = {
        "command": "python " + shlex.join(sys.argv),
        "frames": args.frames,
        "seeds": args.seeds,
        "tasks": {},
    }
    lines = [
        f"# MAPPO on VMAS: BenchMARL 1.5.2 against kpg's MAPPO (k=1) and K2-MAPPO, {args.frames} frames, "
        f"seeds {', '.join(map(str, args.seeds))}",
        "",
        f"Command: `{results['command']}`",
        "",
        "| task | implementation | final return (95% CI) | per seed | greedy eval return | wall-clock s per run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    kpg_studies = [parse_kpg_study(entry) for entry in args.kpg]
    for task in args.tasks:
        summaries = [benchmarl_summary(folders[task, seed], args.frames) for seed in args.seeds]
        finals = np.array([s["final_return"] for s in summaries])
        mean, halfwidth = mean_and_halfwidth(finals)
        evals = [s["eval_return"] for s in summaries if s["eval_return"] is not None]
        walls = [s["wall_seconds"] for s in summaries if s["wall_seconds"] is not None]
        entry = {
            "benchmarl": {
                "final_return": float(mean),
                "final_return_ci95": float(halfwidth),
                "final_return_per_seed": finals.tolist(),
                "eval_return": float(np.mean(evals)) if evals else None,
                "wall_seconds": float(np.mean(walls)) if walls else None,
                "curves": [s["curve"] for s in summaries],
            }
        }
        rows = [("BenchMARL MAPPO", entry["benchmarl"])]
        entry["kpg"] = []
        for study_task, folder, label in kpg_studies:
            if study_task != task:
                continue
            kpg_results = json.loads((folder / "results.json").read_text())
            if kpg_results["train"]["steps"] != args.frames:
                raise ValueError(f"{folder} ran {kpg_results['train']['steps']} steps, not {args.frames}")
            entry["kpg"].append({"results": str(folder), "label": label, **kpg_results})
            for k, by_k in sorted(kpg_results["by_k"].items()):
                rows.append((f"kpg {'MAPPO (k=1)' if k == '1' else f'K{k}-MAPPO'}, {label}", by_k))
        for name, row in rows:
            eval_return = f"{row['eval_return']:.2f}" if row.get("eval_return") is not None else "-"
            wall = f"{row['wall_seconds']:.0f}" if row.get("wall_seconds") is not None else "-"
            per_seed = ", ".join(f"{v:.2f}" for v in row["final_return_per_seed"])
            lines.append(
                f"| {task} | {name} | {row['final_return']:.2f} ± {row['final_return_ci95']:.2f} | {per_seed} | "
                f"{eval_return} | {wall} |"
            )
        results["tasks"][task] = entry
    lines += [
        "",
        "Final return: the mean episode return per agent, averaged over the last 10 % of the frames, then over "
        "seeds (95 % Student-t interval). BenchMARL: its per-iteration `collection/agents/reward/"
        "episode_reward_mean` (the episodes that ended in each 6000-frame iteration); kpg: the mean of the last "
        "20 episodes, as `kpg compare` reports it. Greedy eval return: BenchMARL's last deterministic evaluation "
        "(10 episodes), kpg's 20 greedy episodes after training. kpg commands: ",
    ]
    kpg_commands = [study["command"] for entry in results["tasks"].values() for study in entry["kpg"]]
    lines[-1] += "; ".join(f"`{command}`" for command in kpg_commands)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    plot(args, results)
    return results


def plot(args: argparse.Namespace, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kpg.compare import CURVE_POINTS, _curve

    figure, axes = plt.subplots(1, len(args.tasks), figsize=(6 * len(args.tasks), 4), squeeze=False)
    grid = np.linspace(args.frames / CURVE_POINTS, args.frames, CURVE_POINTS)
    for axis, task in zip(axes[0], args.tasks):
        entry = results["tasks"][task]
        curves = {
            "BenchMARL MAPPO": np.stack([np.interp(grid, *np.array(curve).T) for curve in entry["benchmarl"]["curves"]])
        }
        for study in entry["kpg"]:
            for k in study["by_k"]:
                folders = sorted((Path(study["results"]) / "runs").glob(f"*-k{k}-s*"))
                curves[f"kpg k={k}, {study['label']}"] = np.stack([_curve(folder, grid) for folder in folders])
        for name, curve in curves.items():
            mean, halfwidth = mean_and_halfwidth(curve)
            axis.plot(grid, mean, label=name)
            axis.fill_between(grid, mean - halfwidth, mean + halfwidth, alpha=0.2)
        axis.set_title(f"vmas:{task}")
        axis.set_xlabel("environment steps (frames)")
        axis.set_ylabel("episode return per agent")
        axis.legend()
    figure.tight_layout()
    figure.savefig(args.out / "curves.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmarl-python", required=True, help="the Python of an environment with benchmarl")
    parser.add_argument("--runs", type=Path, required=True, help="BenchMARL's run folders (outside the repository)")
    parser.add_argument("--tasks", nargs="+", default=["navigation", "balance"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--frames", type=int, default=300_000)
    parser.add_argument("--checkpoint-every", type=int, default=60_000, help="frames; a multiple of 6000")
    parser.add_argument("--evaluate-every", type=int, default=60_000, help="frames; a multiple of 6000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--kpg", nargs="*", default=[], metavar="TASK=DIR[=LABEL]", help="kpg compare results folders, any per task"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    jobs = [(task, seed) for seed in args.seeds for task in args.tasks]
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        done = pool.map(
            lambda job: run_one(
                args.benchmarl_python, *job, args.frames, args.checkpoint_every, args.evaluate_every, args.runs
            ),
            jobs,
        )
        folders = dict(zip(jobs, done))
    report(args, folders)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
