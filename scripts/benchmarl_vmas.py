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
checkpoint. ``--benchmarl-results`` takes BenchMARL's side from an earlier report's results.json
instead (its per-seed returns, curves and seconds), so BenchMARL need not be installed to remake the
table.

Then the report: BenchMARL's per-iteration mean episode return (per agent, as kpg's
``episode_return``) averaged over the last 10 % of the frames, mean and 95 % interval over the
seeds, next to the ``kpg compare`` results folders given with ``--kpg``; and the return at
``--at`` frames (30 000, 100 000, 300 000): the mean of the three iterations that end at or before
that many frames (BenchMARL's ``episode_reward_mean``, kpg's ``episode_return``: the same quantity,
the mean return per agent of the episodes that ended in the iteration), with the wall-clock seconds
each run took to get there, and the paired per-seed difference K2 - K1. A kpg folder whose runs
have not all finished (no results.json yet) is reported from its runs' metrics.csv, up to the
frames each run reached. A kpg folder may have run longer than ``--frames`` (the light preset,
configs/vmas_kpg.toml): its final row is at its own budget and says so.

With ``--speed TASK=SPEED.json`` (bench/vmas_mappo_speed.py's output for TASK) the report adds the
returns at equal CPU time: at the CPU seconds BenchMARL spends on each ``--at`` frames, the frames
each finished kpg study collects in as many CPU seconds, and its return there.
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

from kpg.app.compare import final_mean, mean_and_halfwidth

RETURN_FILE = "collection_agents_reward_episode_reward_mean.csv"
EVAL_RETURN_FILE = "eval_agents_reward_episode_reward_mean.csv"
FRAMES_FILE = "counters_total_frames.csv"
WINDOW = 3  # iterations averaged for the return at a checkpoint
TARGET_FRACTION = 0.9  # of BenchMARL's final return: the level whose CPU time to reach is reported


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
    final = final_mean(np.array([totals[i] for i in iterations]), np.array([returns[i] for i in iterations]), frames)
    evaluations = scalar(folder, EVAL_RETURN_FILE)
    times = scalar(folder, "timers_total_time.csv")
    return {
        "final_return": final,
        "eval_return": evaluations[max(evaluations)] if evaluations else None,
        "wall_seconds": times[max(times)] if times else None,
        "curve": [[totals[i], returns[i]] for i in iterations],
    }


def benchmarl_entry(summaries: list[dict]) -> dict:
    finals = np.array([s["final_return"] for s in summaries])
    mean, halfwidth = mean_and_halfwidth(finals)
    evals = [s["eval_return"] for s in summaries if s["eval_return"] is not None]
    walls = [s["wall_seconds"] for s in summaries if s["wall_seconds"] is not None]
    return {
        "final_return": float(mean),
        "final_return_ci95": float(halfwidth),
        "final_return_per_seed": finals.tolist(),
        "eval_return": float(np.mean(evals)) if evals else None,
        "wall_seconds": float(np.mean(walls)) if walls else None,
        "curves": [s["curve"] for s in summaries],
    }


def earlier_benchmarl(path: Path, task: str, frames: int, seeds: list[int]) -> dict:
    """BenchMARL's entry for ``task`` in an earlier report of this script (same frames and seeds)."""
    earlier = json.loads(path.read_text())
    if earlier["frames"] != frames or earlier["seeds"] != seeds or task not in earlier["tasks"]:
        raise ValueError(
            f"{path} holds BenchMARL's {', '.join(earlier['tasks'])} at {earlier['frames']} frames, seeds "
            f"{earlier['seeds']}; this report needs {task} at {frames} frames, seeds {seeds}: run BenchMARL "
            "(--benchmarl-python, --runs) or pass a matching file"
        )
    return earlier["tasks"][task]["benchmarl"]


def kpg_run_rows(folder: Path, k: str, seed: int) -> list[dict[str, float]]:
    """A kpg run's per-iteration rows (frames, return of the iteration's episodes, wall seconds so far)."""
    path = folder / "runs"
    matches = sorted(path.glob(f"*-k{k}-s{seed}/metrics.csv"))
    if not matches:
        return []
    rows = []
    with open(matches[0]) as file:
        for row in csv.DictReader(file):
            if row.get("episode_return"):
                rows.append(
                    {
                        "frames": float(row["env_steps"]),
                        "return": float(row["episode_return"]),
                        "wall": float(row["wall_seconds"]),
                    }
                )
    return rows


def first_reaching(rows: list[dict[str, float]], target: float) -> float | None:
    """The frames at which the mean return of WINDOW consecutive iterations first reaches ``target``."""
    for end in range(WINDOW, len(rows) + 1):
        if np.mean([row["return"] for row in rows[end - WINDOW : end]]) >= target:
            return rows[end - 1]["frames"]
    return None


def final_episode_return(rows: list[dict[str, float]], frames: int) -> float | None:
    """A kpg run's final return as BenchMARL's is taken: its per-iteration return averaged over the iterations
    in the last 10 % of ``frames`` (compare's final_mean; None for a run without metrics.csv or short of ``frames``)."""
    if not rows or rows[-1]["frames"] < frames:
        return None
    return final_mean(np.array([row["frames"] for row in rows]), np.array([row["return"] for row in rows]), frames)


def at_frames(rows: list[dict[str, float]], frames: int) -> dict[str, float] | None:
    """The return at ``frames``: the mean of the WINDOW iterations ending at or before it, and the
    wall-clock seconds of the last of them (None when the run has not got there)."""
    before = [row for row in rows if row["frames"] <= frames]
    if not rows or rows[-1]["frames"] < frames or len(before) < WINDOW:
        return None
    window = before[-WINDOW:]
    return {"return": float(np.mean([row["return"] for row in window])), "wall": window[-1].get("wall")}


def checkpoint_lines(args: argparse.Namespace, results: dict) -> list[str]:
    """The returns at --at frames and the paired K2 - K1 differences, for every implementation."""
    header = " | ".join(f"{f // 1000}k frames: return (95% CI) [s]" for f in args.at)
    lines = [
        "",
        "## Returns at " + ", ".join(f"{f:_}".replace("_", " ") for f in args.at) + " frames",
        "",
        f"The mean of the {WINDOW} iterations (6000 frames each) that end at or before that many frames, per seed; "
        "then the mean and 95 % interval over the seeds that got there (n), and in brackets the mean wall-clock "
        "seconds from the start of a run to that frame (BenchMARL: its whole run at the last frame only). "
        "Only folders whose runs' metrics.csv are at hand have a row.",
        "",
        f"| task | implementation | {header} |",
        "| --- | --- | " + " | ".join("---" for _ in args.at) + " |",
    ]
    paired = []
    for task, entry in results["tasks"].items():
        rows = {
            "BenchMARL MAPPO": [
                [{"frames": f, "return": r} for f, r in curve] for curve in entry["benchmarl"]["curves"]
            ]
        }
        walls = {"BenchMARL MAPPO": entry["benchmarl"]["wall_seconds"]}
        for study in entry["kpg"]:
            for k in study["ks"]:
                runs = [kpg_run_rows(Path(study["results"]), k, seed) for seed in args.seeds]
                rows[f"kpg {'MAPPO (k=1)' if k == '1' else f'K{k}-MAPPO'}, {study['label']}"] = runs
        for name, runs in rows.items():
            cells = []
            for frames in args.at:
                points = [at_frames(run, frames) for run in runs]
                reached = [p for p in points if p is not None]
                if not reached:
                    cells.append("-")
                    continue
                mean, halfwidth = mean_and_halfwidth(np.array([p["return"] for p in reached]))
                seconds = [p["wall"] for p in reached if p.get("wall") is not None]
                if name in walls and frames == args.frames and walls[name] is not None:
                    seconds = [walls[name]]
                wall = f" [{np.mean(seconds):.0f}]" if seconds else ""
                spread = f" ± {halfwidth:.2f}" if len(reached) > 1 else ""
                cells.append(f"{mean:.2f}{spread} (n={len(reached)}){wall}")
            if any(cell != "-" for cell in cells):  # folders without their runs' metrics (not kept) have no row
                lines.append(f"| {task} | {name} | " + " | ".join(cells) + " |")
        for study in entry["kpg"]:
            if not {"1", "2"} <= set(study["ks"]):
                continue
            for frames in args.at:
                for seed in args.seeds:
                    k1 = at_frames(kpg_run_rows(Path(study["results"]), "1", seed), frames)
                    k2 = at_frames(kpg_run_rows(Path(study["results"]), "2", seed), frames)
                    if k1 is not None and k2 is not None:
                        paired.append((task, study["label"], frames, seed, k1["return"], k2["return"]))
    lines += [
        "",
        "Paired per seed, K2 - K1 (the same seed: the same initial networks and environment seeds):",
        "",
        "| task | kpg | frames | seed | k=1 | k=2 | K2 - K1 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {t} | {label} | {f} | {s} | {a:.2f} | {b:.2f} | {b - a:+.2f} |" for t, label, f, s, a, b in paired]
    if not paired:
        lines.append("| (no seed has both k at any of these frames yet) | | | | | | |")
    return lines


def cpu_per_iteration(folder: Path, k: str, seeds: list[int]) -> float | None:
    """The median over seeds of a kpg run's CPU seconds per iteration (its summary.json), None until all finished."""
    summaries = [sorted((folder / "runs").glob(f"*-k{k}-s{seed}/summary.json")) for seed in seeds]
    if not all(summaries):
        return None
    per_run = [json.loads(path[0].read_text()) for path in summaries]
    return float(np.median([run["cpu_seconds"] / run["updates"] for run in per_run]))


def parse_speed(entry: str) -> tuple[str, float]:
    """``TASK=SPEED.json`` (bench/vmas_mappo_speed.py's --json): BenchMARL's median CPU seconds per iteration."""
    task, path = entry.split("=", 1)
    speed = json.loads(Path(path).read_text())
    return task, float(np.median([run["cpu"] for run in speed["per_iteration"]["benchmarl"]]))


def cpu_budget_lines(args: argparse.Namespace, results: dict) -> list[str]:
    """Returns at the CPU seconds BenchMARL spends on each --at frames (up to --frames): each kpg study gets
    as many frames as its own runs' CPU per iteration buys in that time."""
    benchmarl_cpu = dict(parse_speed(entry) for entry in args.speed)
    budgets = [f for f in args.at if f <= args.frames]
    lines = [
        "",
        "## Returns at equal CPU time",
        "",
        "Per second rather than per frame: the CPU seconds BenchMARL's MAPPO spends on "
        + ", ".join(f"{f:_}".replace("_", " ") for f in budgets)
        + " frames (its CPU seconds per iteration from bench/vmas_mappo_speed.py, "
        + ", ".join(f"`{entry.split('=', 1)[1]}`" for entry in args.speed)
        + "), and the return each implementation has after as many CPU seconds: a kpg study's frames are that time "
        "over its own runs' CPU seconds per iteration (median of the runs' summary.json) times 6000, its return "
        "there as in the table above. CPU time, because wall-clock on this shared machine moves with the load.",
        "",
        f"The last column: the CPU seconds until a seed's return (the mean of {WINDOW} iterations, as above) first "
        f"reaches {TARGET_FRACTION:.0%} of BenchMARL's final return, the mean over the seeds that got there (how "
        "many did).",
        "",
        "| task | implementation | CPU s per iteration | "
        + " | ".join(f"at BenchMARL's {f // 1000}k frames: CPU s, frames, return (95% CI)" for f in budgets)
        + f" | CPU s to {TARGET_FRACTION:.0%} of BenchMARL's final return |",
        "| --- | --- | --- | " + " | ".join("---" for _ in budgets) + " | --- |",
    ]
    for task, entry in results["tasks"].items():
        if task not in benchmarl_cpu:
            continue
        per_iteration = benchmarl_cpu[task]
        candidates = [("BenchMARL MAPPO", None, None, per_iteration)]
        for study in entry["kpg"]:
            for k in study["ks"]:
                cost = cpu_per_iteration(Path(study["results"]), k, args.seeds)
                if cost is not None:
                    name = f"kpg {'MAPPO (k=1)' if k == '1' else f'K{k}-MAPPO'}, {study['label']}"
                    candidates.append((name, Path(study["results"]), k, cost))
        for name, folder, k, cost in candidates:
            if folder is None:
                runs = [[{"frames": f, "return": r} for f, r in c] for c in entry["benchmarl"]["curves"]]
            else:
                runs = [kpg_run_rows(folder, k, seed) for seed in args.seeds]
            cells = []
            for frames in budgets:
                seconds = per_iteration * frames / 6000
                reached = seconds / cost * 6000
                budget = f"{seconds:.0f}, {reached:_.0f}".replace("_", " ")
                points = [p for p in (at_frames(run, reached) for run in runs) if p is not None]
                if len(points) < len(runs):
                    cells.append(f"{budget}, - (runs too short)")
                    continue
                mean, halfwidth = mean_and_halfwidth(np.array([p["return"] for p in points]))
                spread = f" ± {halfwidth:.2f}" if len(points) > 1 else ""
                cells.append(f"{budget}, {mean:.2f}{spread}")
            target = TARGET_FRACTION * entry["benchmarl"]["final_return"]
            firsts = [first_reaching(run, target) for run in runs]
            reached_target = [frames / 6000 * cost for frames in firsts if frames is not None]
            cells.append(
                f"{np.mean(reached_target):.0f} ({len(reached_target)}/{len(runs)})" if reached_target else "- (none)"
            )
            lines.append(f"| {task} | {name} | {cost:.2f} | " + " | ".join(cells) + " |")
    return lines


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
        if args.benchmarl_results is not None:
            entry = {"benchmarl": earlier_benchmarl(args.benchmarl_results, task, args.frames, args.seeds)}
        else:
            entry = {
                "benchmarl": benchmarl_entry([benchmarl_summary(folders[task, s], args.frames) for s in args.seeds])
            }
        rows = [("BenchMARL MAPPO", entry["benchmarl"])]
        entry["kpg"] = []
        for study_task, folder, label in kpg_studies:
            if study_task != task:
                continue
            if not (folder / "results.json").exists():
                # Still running: its rows come from the runs' metrics (the returns at --at frames below).
                ks = sorted({path.name.rsplit("-k", 1)[1].split("-s")[0] for path in (folder / "runs").glob("*-k*-s*")})
                entry["kpg"].append({"results": str(folder), "label": label, "ks": ks, "unfinished": True})
                continue
            kpg_results = json.loads((folder / "results.json").read_text())
            steps = kpg_results["train"]["steps"]
            if steps < args.frames:
                raise ValueError(f"{folder} ran {steps} steps, fewer than the report's {args.frames}")
            if steps > args.frames:  # its final row is at its own budget: the label says so
                label = f"{label}, " + f"{steps:_} frames".replace("_", " ")
            ks = sorted(kpg_results["by_k"])
            entry["kpg"].append({"results": str(folder), "label": label, "ks": ks, **kpg_results})
            for k, by_k in sorted(kpg_results["by_k"].items()):
                name = f"kpg {'MAPPO (k=1)' if k == '1' else f'K{k}-MAPPO'}, {label}"
                finals = [final_episode_return(kpg_run_rows(folder, k, seed), steps) for seed in by_k["seeds"]]
                if all(final is not None for final in finals):
                    mean, halfwidth = mean_and_halfwidth(np.array(finals))
                    by_k = {
                        **by_k,
                        "final_return": mean,
                        "final_return_ci95": halfwidth,
                        "final_return_per_seed": finals,
                    }
                else:  # no metrics.csv kept: kpg compare's final return, which lags a rising curve
                    name += " †"
                rows.append((name, by_k))
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
        "Final return: the mean episode return per agent of each iteration, averaged over the iterations in the "
        "last 10 % of the frames, then over seeds (95 % Student-t interval). BenchMARL: its per-iteration "
        "`collection/agents/reward/episode_reward_mean` (the episodes that ended in each 6000-frame iteration); "
        "kpg: its runs' per-iteration `episode_return` in metrics.csv, the same quantity. † (folders that kept no "
        "metrics.csv): the final return `kpg compare` wrote when they were made, before 2026-12-08: the last 10 % "
        "of its recent return, which averages the last 20 iterations' returns (40 % of a 300 000-frame run) and "
        "so lags a rising curve. Greedy eval "
        "return: BenchMARL's last deterministic evaluation (10 episodes), kpg's 20 greedy episodes after "
        "training. kpg commands: ",
    ]
    kpg_commands = [
        study["command"] for entry in results["tasks"].values() for study in entry["kpg"] if "command" in study
    ]
    lines[-1] += "; ".join(f"`{command}`" for command in kpg_commands)
    unfinished = [
        study["results"] for entry in results["tasks"].values() for study in entry["kpg"] if "unfinished" in study
    ]
    if unfinished:
        lines[-1] += (
            f". Not finished when this report was made (no final row; returns at the frames they reached below): "
            f"{', '.join(unfinished)}"
        )
    lines += checkpoint_lines(args, results)
    if args.speed:
        lines += cpu_budget_lines(args, results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    plot(args, results)
    return results


def plot(args: argparse.Namespace, results: dict) -> None:
    """curves.png: the return against frames per task; with --speed, a second row against CPU seconds, to
    BenchMARL's CPU time for --frames (each implementation's CPU seconds per iteration as in the table). One
    colour per implementation in every panel, and one legend under them (the labels are long)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kpg.app.compare import CURVE_POINTS

    benchmarl_cpu = dict(parse_speed(entry) for entry in args.speed)
    panels = []  # (row, column, x, curves by implementation)
    grid = np.linspace(args.frames / CURVE_POINTS, args.frames, CURVE_POINTS)
    for column, task in enumerate(args.tasks):
        entry = results["tasks"][task]
        panels.append((0, column, grid, _curves_at_frames(entry, args.seeds, lambda cost: grid)))
        if task in benchmarl_cpu:
            seconds = np.linspace(0.0, benchmarl_cpu[task] * args.frames / 6000, CURVE_POINTS + 1)[1:]
            curves = _curves_at_frames(entry, args.seeds, lambda c: seconds / c * 6000, benchmarl_cpu[task])
            panels.append((1, column, seconds, curves))
    names = list(dict.fromkeys(name for *_, curves in panels for name in curves))
    colors = dict(zip(names, plt.get_cmap("tab10").colors * (1 + len(names) // 10)))
    rows = 1 + any(row == 1 for row, *_ in panels)
    legend_inches = 0.25 * len(names) + 0.3
    figure, axes = plt.subplots(
        rows, len(args.tasks), figsize=(6 * len(args.tasks), 4 * rows + legend_inches), squeeze=False
    )
    for row, column, x, curves in panels:
        axis = axes[row][column]
        for name, curve in curves.items():
            mean, halfwidth = mean_and_halfwidth(curve) if len(curve) > 1 else (curve[0], np.zeros_like(curve[0]))
            axis.plot(x, mean, color=colors[name], label=name)
            axis.fill_between(x, mean - halfwidth, mean + halfwidth, color=colors[name], alpha=0.2)
        axis.set_title(f"vmas:{args.tasks[column]}")
        axis.set_xlabel("environment steps (frames)" if row == 0 else "CPU seconds (per iteration x iterations)")
        axis.set_ylabel("episode return per agent")
    for row in range(rows):
        for column in range(len(args.tasks)):
            if not axes[row][column].has_data():
                axes[row][column].set_axis_off()
    handles = [plt.Line2D([], [], color=colors[name]) for name in names]
    figure.legend(handles, names, loc="lower center", fontsize="small", frameon=False)
    figure.tight_layout(rect=(0, legend_inches / (4 * rows + legend_inches), 1, 1))
    figure.savefig(args.out / "curves.png", dpi=120)


def _curves_at_frames(entry: dict, seeds: list[int], frames_at, benchmarl_cost: float | None = None) -> dict:
    """Each implementation's per-seed curves at ``frames_at(its CPU seconds per iteration)`` frames, NaN beyond
    the frames a run reached. With ``benchmarl_cost`` (BenchMARL's CPU seconds per iteration) only the kpg studies
    whose runs all finished, whose CPU seconds per iteration are known, are drawn."""
    curves = {}
    benchmarl_frames = frames_at(benchmarl_cost)
    curves["BenchMARL MAPPO"] = np.stack(
        [
            np.where(benchmarl_frames <= curve[-1][0], np.interp(benchmarl_frames, *np.array(curve).T), np.nan)
            for curve in entry["benchmarl"]["curves"]
        ]
    )
    for study in entry["kpg"]:
        for k in study["ks"]:
            cost = cpu_per_iteration(Path(study["results"]), k, seeds) if benchmarl_cost else None
            if benchmarl_cost and cost is None:
                continue
            # Runs shorter than the budget (unfinished) are drawn only as far as they got.
            folders = sorted((Path(study["results"]) / "runs").glob(f"*-k{k}-s*/metrics.csv"))
            if folders:
                frames = frames_at(cost)
                curves[f"kpg k={k}, {study['label']}"] = np.stack([_partial_curve(f.parent, frames) for f in folders])
    return curves


def _partial_curve(run_dir: Path, grid: np.ndarray) -> np.ndarray:
    """A run's per-iteration return (episode_return: BenchMARL's curves' quantity, not the lagging recent_return)
    at ``grid`` frames, NaN beyond the frames the run reached."""
    from kpg.app.compare import _curve

    with open(run_dir / "metrics.csv") as file:
        reached = max((float(row["env_steps"]) for row in csv.DictReader(file)), default=0.0)
    curve = _curve(run_dir, grid, column="episode_return") if reached else np.full_like(grid, np.nan)
    return np.where(grid <= reached, curve, np.nan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmarl-python", help="the Python of an environment with benchmarl")
    parser.add_argument("--runs", type=Path, help="BenchMARL's run folders (outside the repository)")
    parser.add_argument(
        "--benchmarl-results",
        type=Path,
        help="take BenchMARL's side from this earlier results.json of this script instead of running it",
    )
    parser.add_argument("--at", nargs="+", type=int, default=[30_000, 100_000, 300_000], help="frames to compare at")
    parser.add_argument("--tasks", nargs="+", default=["navigation", "balance"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--frames", type=int, default=300_000)
    parser.add_argument("--checkpoint-every", type=int, default=60_000, help="frames; a multiple of 6000")
    parser.add_argument("--evaluate-every", type=int, default=60_000, help="frames; a multiple of 6000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--kpg", nargs="*", default=[], metavar="TASK=DIR[=LABEL]", help="kpg compare results folders, any per task"
    )
    parser.add_argument(
        "--speed",
        nargs="*",
        default=[],
        metavar="TASK=SPEED.json",
        help="bench/vmas_mappo_speed.py's --json for TASK: adds the returns at equal CPU time",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.benchmarl_results is not None:
        report(args, {})
        print((args.out / "results.md").read_text())
        return
    if args.benchmarl_python is None or args.runs is None:
        parser.error("give --benchmarl-python and --runs (to run BenchMARL), or --benchmarl-results")
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
