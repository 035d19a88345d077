"""Aggregates the K2-against-K1 BenchMARL runs (scripts/benchmarl_kmappo.py) into ``results/benchmarl/``.

Reads ``<runs>/<task>_k<K>_s<SEED>/`` (BenchMARL's CSV scalars of the experiment folder that logged the
most frames, ``provenance.json``, ``done``) and writes:

- ``k2_vs_k1.md``: per task and k, the final return (BenchMARL's ``collection/reward/episode_reward_mean``
  averaged over the last 10 % of the iterations, then over seeds, with a 95 % Student-t interval), the
  paired per-seed differences K2 - K1, and seconds per iteration with k=2's paired overhead;
- ``k2_vs_k1.json``: the same numbers per seed, the command, the code commit and the package versions
  of every start of every run;
- ``k2_vs_k1.png``: every run's curve, one panel per task;
- ``runs/<run>/metrics.csv`` (frames, return, evaluation return where BenchMARL evaluated, iteration
  seconds) and ``runs/<run>/provenance.json``.

A run without ``done`` is reported as running, with the frames it has logged, and left out of the means.

    python scripts/benchmarl_kmappo_report.py --runs /work/studies/benchmarl --out results/benchmarl
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
from smax_study_report import _commit, _fmt, mean_ci

REPO = Path(__file__).resolve().parent.parent
WINDOW = 0.10  # the last 10 % of the iterations
SCALARS = {
    "frames": "counters_total_frames.csv",
    "episode_reward_mean": "collection_reward_episode_reward_mean.csv",
    "eval_episode_reward_mean": "eval_reward_episode_reward_mean.csv",
    "iteration_seconds": "timers_iteration_time.csv",
}


def read_scalar(path: Path) -> dict[int, float]:
    """BenchMARL's CSV logger writes ``step,value`` rows without a header; the step is the iteration."""
    if not path.exists():
        return {}
    with open(path) as file:
        return {int(float(step)): float(value) for step, value in csv.reader(file)}


def read_run(folder: Path) -> dict | None:
    """The curves of the experiment folder that logged the most iterations (a start that stopped
    before its first checkpoint leaves a shorter one behind)."""
    best = None
    for experiment in folder.glob("kmappo_*"):
        scalars = experiment / experiment.name / "scalars"
        if not scalars.is_dir():
            continue
        columns = {name: read_scalar(scalars / file) for name, file in SCALARS.items()}
        if best is None or len(columns["frames"]) > len(best["frames"]):
            best = columns
    if best is None or not best["frames"]:
        return None
    task, k, seed = folder.name.rsplit("_", 2)
    iterations = sorted(best["frames"])
    curve = {name: [best[name].get(i, math.nan) for i in iterations] for name in SCALARS}
    returns = np.asarray(curve["episode_reward_mean"])
    window = max(1, math.ceil(WINDOW * len(returns)))
    provenance = folder / "provenance.json"
    starts = json.loads(provenance.read_text()) if provenance.exists() else None
    return {
        "run": folder.name,
        "dir": folder,
        "task": task,
        "k": int(k[1:]),
        "seed": int(seed[1:]),
        "finished": (folder / "done").exists(),
        "frames": int(curve["frames"][-1]),
        "iterations": len(iterations),
        "final_return": float(np.nanmean(returns[-window:])),
        "seconds_per_iteration": float(np.nanmedian(curve["iteration_seconds"])),
        "provenance": starts,
        "task_options": task_options(starts[-1].get("command", "")) if starts else [],
        "curve": curve,
    }


def task_options(command: str) -> list[str]:
    """The ``task.KEY=VALUE`` overrides of a scripts/benchmarl_kmappo.py run command."""
    return [argument.removeprefix("task.") for argument in shlex.split(command) if argument.startswith("task.")]


def summarize(runs: list[dict]) -> dict:
    table = {}
    for task in sorted({r["task"] for r in runs}):
        finished = [r for r in runs if r["task"] == task and r["finished"]]
        by_k = {}
        for k in sorted({r["k"] for r in finished}):
            per_seed = {r["seed"]: r for r in finished if r["k"] == k}
            by_k[k] = {
                "final_return_per_seed": {s: r["final_return"] for s, r in sorted(per_seed.items())},
                "final_return": mean_ci(r["final_return"] for r in per_seed.values()),
                "seconds_per_iteration_per_seed": {s: r["seconds_per_iteration"] for s, r in sorted(per_seed.items())},
            }
        paired = {}
        if 1 in by_k and 2 in by_k:
            one, two = by_k[1], by_k[2]
            seeds = sorted(set(one["final_return_per_seed"]) & set(two["final_return_per_seed"]))
            returns = {s: two["final_return_per_seed"][s] - one["final_return_per_seed"][s] for s in seeds}
            overhead = {
                s: two["seconds_per_iteration_per_seed"][s] / one["seconds_per_iteration_per_seed"][s] - 1
                for s in seeds
            }
            paired = {
                "return_per_seed": returns,
                "return": mean_ci(returns.values()),
                "iteration_overhead_per_seed": overhead,
                "iteration_overhead": mean_ci(overhead.values()),
            }
        table[task] = {"by_k": by_k, "k2_minus_k1": paired}
    return table


def markdown(table: dict, runs: list[dict], meta: dict) -> str:
    lines = [
        "# K2 against K1 inside BenchMARL (VMAS, BenchMARL's MAPPO settings)",
        "",
        f"Command: `{meta['command']}`; report made at code commit `{meta['commit']}`. Each run's own command, "
        "commit and package versions: runs/<run>/provenance.json.",
        "",
        "| task | k | final return, per seed | mean (95 % CI) | s per iteration, per seed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for task, entry in table.items():
        for k, e in entry["by_k"].items():
            seeds = ", ".join(f"s{s}: {v:.3f}" for s, v in e["final_return_per_seed"].items())
            times = ", ".join(f"s{s}: {v:.0f}" for s, v in e["seconds_per_iteration_per_seed"].items())
            lines.append(f"| {task} | {k} | {seeds} | {_fmt(*e['final_return'], digits=3)} | {times} |")
        d = entry["k2_minus_k1"]
        if d:
            seeds = ", ".join(f"s{s}: {v:+.3f}" for s, v in d["return_per_seed"].items())
            overhead = ", ".join(f"s{s}: {100 * v:+.0f} %" for s, v in d["iteration_overhead_per_seed"].items())
            lines.append(f"| {task} | K2 - K1 | {seeds} | {_fmt(*d['return'], digits=3)} | {overhead} |")
    variants = {r["task"]: r["task_options"] for r in runs if r["task_options"]}
    if variants:
        described = "; ".join(f"{task}: {', '.join(options)}" for task, options in sorted(variants.items()))
        lines += ["", f"Task options changed from BenchMARL's task files: {described}."]
    running = [f"{r['run']} ({r['frames']} frames)" for r in runs if not r["finished"]]
    if running:
        lines += ["", f"Not finished (left out of the table): {', '.join(running)}."]
    lines += [
        "",
        "Final return: BenchMARL's collection/reward/episode_reward_mean (the mean episode return of the "
        "iteration's 6000 training frames) averaged over the last 10 % of the iterations; mean over seeds "
        "± the 95 % Student-t half-width. K2 - K1: paired by seed. Seconds per iteration: the median of "
        "BenchMARL's timers/iteration_time, on a 2-core machine shared with other jobs, so only the paired "
        "ratio means anything. Curves: k2_vs_k1.png; raw per-run curves: runs/<run>/metrics.csv.",
    ]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in runs})
    figure, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for run in sorted((r for r in runs if r["task"] == task), key=lambda r: (r["k"], r["seed"])):
            color = "tab:blue" if run["k"] == 1 else "tab:orange"
            curve = run["curve"]
            axis.plot(curve["frames"], curve["episode_reward_mean"], color=color, lw=0.9, alpha=0.8,
                      label=f"k={run['k']} s{run['seed']}")  # fmt: skip
        axis.set_title(f"vmas/{task}")
        axis.set_xlabel("frames")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    axes[0][0].set_ylabel("episode return (collection)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_curve(run: dict, path: Path) -> None:
    curve = run["curve"]
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(list(SCALARS))
        for row in zip(*(curve[name] for name in SCALARS)):
            writer.writerow(["" if math.isnan(v) else repr(v) for v in row])


def report(runs_folder: Path, out: Path) -> dict:
    if not runs_folder.is_dir():
        raise FileNotFoundError(f"no runs folder at {runs_folder}; run scripts/benchmarl_kmappo.py first")
    runs = [run for folder in sorted(runs_folder.iterdir()) if folder.is_dir() and (run := read_run(folder))]
    if not runs:
        raise ValueError(f"{runs_folder} holds no run with BenchMARL CSV scalars; is it scripts/benchmarl_kmappo.py's?")
    table = summarize(runs)
    meta = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "commit": _commit()}
    for run in runs:
        target = out / "runs" / run["run"]
        target.mkdir(parents=True, exist_ok=True)
        write_curve(run, target / "metrics.csv")
        if run["provenance"] is not None:
            shutil.copyfile(run["dir"] / "provenance.json", target / "provenance.json")
    results = {
        **meta,
        "window": WINDOW,
        "tasks": table,
        "runs": [{key: value for key, value in r.items() if key not in ("dir", "curve")} for r in runs],
    }
    (out / "k2_vs_k1.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "k2_vs_k1.md").write_text(markdown(table, runs, meta))
    plot(runs, out / "k2_vs_k1.png")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("/work/studies/benchmarl"))
    parser.add_argument("--out", type=Path, default=REPO / "results" / "benchmarl")
    args = parser.parse_args(argv)
    report(args.runs, args.out)
    print((args.out / "k2_vs_k1.md").read_text())


if __name__ == "__main__":
    main()
