"""Aggregates the SMAX study (scripts/smax_study.py) into ``results/smax_study/``, finished or not.

Reads ``<study>/<map>/runs/<run>/`` (metrics.csv, config.json, summary.json) and writes:

- ``results.md``: one table, per map and variant (k=1, k=2, and k=2 with momentum anticipation where
  issue 28's runs exist), of the win rate at 1M, 2M and 3M steps (the mean of the per-update win rate
  over the last 8 % of the updates before the budget, then over seeds, with a 95 % Student-t
  interval), the paired per-seed differences K2 - K1 (and momentum K2 - K1, momentum K2 - exact K2),
  the step at which each seed's per-update win rate first reaches 0.5, CPU seconds per run, the
  actor update's time in units of the critic update's (free of the machine's load) and each
  difference's overhead; for audited momentum runs, the audit's means (gate, cosine, relative error);
  and a second table of how each variant trained: the policy's entropy and the clip fraction of its
  last level (the share of samples whose ratio, joint from level 2, was clipped) at each budget,
  averaged over the same windows;
- ``results.json``: the same numbers per seed, the command, the code commit, the versions of torch,
  JAX and JaxMARL that ran (from the runs' summaries) and each run's state;
- ``curves.png``: every run's curve, one panel per map;
- ``runs/<map>/<run>/``: a copy of each run's metrics.csv, config.json and summary.json.

A run still going (no summary.json) or stopped (its summary says interrupted) is marked as such; a
budget enters the table only for the runs whose curve has reached it, and says for how many seeds.

    python scripts/smax_study_report.py --study /work/studies/smax_study --out results/smax_study
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MAPS = ("3s_vs_5z", "2s3z", "3s5z", "10m_vs_11m")
BUDGETS = (1_000_000, 2_000_000, 3_000_000)
WINDOW = 0.08  # the last 8 % of the updates before a budget
THRESHOLD = 0.5
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(values) -> tuple[float, float, int]:
    """Mean, 95 % Student-t half-width (nan for one value) and count of the finite values."""
    values = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(values) == 0:
        return math.nan, math.nan, 0
    if len(values) == 1:
        return float(values[0]), math.nan, 1
    half = T95.get(len(values) - 1, 1.96) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(half), len(values)


def read_metrics(metrics: Path) -> list[dict]:
    """A run's metrics.csv rows, one per update ([] before the first update is written)."""
    if not metrics.exists():
        return []
    with open(metrics) as file:
        return list(csv.DictReader(file))


def read_curve(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(env_steps, win_rate) per update; an update in which no episode ended has no win rate (nan)."""
    steps = [float(row["env_steps"]) for row in rows]
    wins = [float(row["win_rate"]) if row.get("win_rate") else math.nan for row in rows]
    return np.asarray(steps), np.asarray(wins)


PHASES = ("environment", "critic", "actor")
WARM_UP = 10  # updates left out of the time figures: the first include JAX's and torch's first compilations


def phase_ratios(rows: list[dict]) -> dict | None:
    """The time an update spends in each phase (metrics.csv's seconds_<phase>, cumulative over the run)
    in units of its critic time: per phase the median over the updates after the warm-up of the
    update's phase seconds over its critic seconds, and the same for the whole update ("update").
    The critic's work is the same in every variant, and an update's phases share its process and the
    machine's load at that moment, so these ratios compare variants across runs that ran at different
    loads, where CPU seconds per run do not; the median leaves out updates stretched by a pause
    (a SIGSTOP, a stop and resume). None: too few updates logged."""
    seconds = np.asarray([[float(row[f"seconds_{phase}"] or "nan") for phase in PHASES] for row in rows])
    if len(seconds) < WARM_UP + 2:
        return None
    per_update = np.diff(seconds[WARM_UP:], axis=0)
    per_update = per_update[per_update[:, 1] > 0]
    critic = per_update[:, 1]
    ratios = {phase: float(np.median(per_update[:, i] / critic)) for i, phase in enumerate(PHASES)}
    return ratios | {"update": float(np.median(per_update.sum(axis=1) / critic))}


def mean_before(steps: np.ndarray, values: np.ndarray, budget: int, total_steps: int) -> float | None:
    """Mean of a per-update figure over the last 8 % of the updates before ``budget``; None if the run
    has not got there (its next update would not pass the budget yet) or the budget lies beyond its
    length."""
    if len(steps) == 0 or budget > total_steps:
        return None
    per_update = steps[0]
    if steps[-1] + per_update <= budget:
        return None
    before = values[steps <= budget]
    window = max(1, math.ceil(WINDOW * len(before)))
    return float(np.nanmean(before[-window:]))


# How a variant trained, beside what it won: metrics.csv's entropy, and the clip fraction of the run's
# last level (clip_fraction_level<k>: from level 2 the joint ratio's).
DIAGNOSTICS = ("entropy", "clip_fraction")


def diagnostics_at(rows: list[dict], steps: np.ndarray, k: int, total_steps: int) -> dict:
    """Per diagnostic, per budget the mean over the budget's window (None: not reached or not logged)."""
    columns = {"entropy": "entropy", "clip_fraction": f"clip_fraction_level{k}"}
    figures = {}
    for name, column in columns.items():
        values = np.asarray([float(row[column]) if row.get(column) else math.nan for row in rows])
        figures[name] = {
            str(b): None if np.isnan(values).all() else mean_before(steps, values, b, total_steps)
            for b in BUDGETS
            if b <= total_steps
        }
    return figures


def variant(config: dict) -> str:
    """A run's row: its k, and "momentum" where its level 1 was extrapolated (issue 28)."""
    anticipation = config.get("anticipation", "exact")
    return f"k={config['k']}" + ("" if anticipation == "exact" else f" {anticipation}")


# The paired comparisons of the table, (name, minuend, subtrahend), where both variants have runs.
COMPARISONS = (
    ("K2 - K1", "k=2", "k=1"),
    ("momentum K2 - K1", "k=2 momentum", "k=1"),
    ("momentum K2 - exact K2", "k=2 momentum", "k=2"),
)
AUDIT = ("audit_gate", "audit_cosine", "audit_relative_error", "audit_norm_ratio")


def audit_means(rows: list[dict]) -> dict | None:
    """The audit's per-update figures averaged over the run's updates (None: the run was not audited)."""
    if not any(row.get("audit_cosine") for row in rows):
        return None
    return {name: float(np.mean([float(row[name]) for row in rows if row.get(name)])) for name in AUDIT}


def first_passing(steps: np.ndarray, wins: np.ndarray) -> float | None:
    passed = np.nonzero(wins >= THRESHOLD)[0]
    return float(steps[passed[0]]) if len(passed) else None


def run_state(run_dir: Path) -> tuple[str, dict | None]:
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        return "running or stopped without a summary", None
    summary = json.loads(summary_path.read_text())
    if summary.get("interrupted"):
        return "interrupted (resumes)", summary
    return "finished", summary


def collect(study: Path) -> dict:
    """Every run of the study folder, per map, with its numbers."""
    maps = {}
    for map_dir in sorted(p for p in study.iterdir() if (p / "runs").is_dir()):
        runs = []
        for run_dir in sorted(p for p in (map_dir / "runs").iterdir() if (p / "config.json").exists()):
            config = json.loads((run_dir / "config.json").read_text())
            state, summary = run_state(run_dir)
            rows = read_metrics(run_dir / "metrics.csv")
            steps, wins = read_curve(rows)
            runs.append(
                {
                    "run": run_dir.name,
                    "dir": run_dir,
                    "variant": variant(config),
                    "k": config["k"],
                    "seed": config["seed"],
                    "steps": config["steps"],
                    "state": state,
                    "updates_logged": len(steps),
                    "env_steps_logged": int(steps[-1]) if len(steps) else 0,
                    "win_rate_at": {
                        str(b): mean_before(steps, wins, b, config["steps"]) for b in BUDGETS if b <= config["steps"]
                    },
                    "diagnostics_at": diagnostics_at(rows, steps, config["k"], config["steps"]),
                    "first_step_win_rate_0.5": first_passing(steps, wins),
                    "cpu_seconds": summary["cpu_seconds"] if state == "finished" else None,
                    "wall_seconds": summary["wall_seconds"] if state == "finished" else None,
                    "versions": (summary or {}).get("versions"),
                    "audit": audit_means(rows),
                    "phases_in_critic_time": phase_ratios(rows),
                    "curve": (steps, wins),
                }
            )
        maps[map_dir.name] = runs
    return maps


def _percent(mean: float, half: float, n: int) -> str:
    return "-" if n == 0 else f"{100 * mean:+.0f} % (n={n})"


def _fmt(mean: float, half: float, n: int, digits: int = 2) -> str:
    if n == 0:
        return "-"
    text = f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"
    return f"{text} (n={n})"


def summarize(maps: dict) -> dict:
    """Per map: per variant the budgets' mean and interval, the paired differences, first passes, CPU."""
    table = {}
    for map_name, runs in maps.items():
        by_variant = {}
        for name in sorted({r["variant"] for r in runs}):
            mine = sorted((r for r in runs if r["variant"] == name), key=lambda r: r["seed"])
            entry = {
                "seeds": [r["seed"] for r in mine],
                "states": {
                    r["seed"]: r["state"]
                    if r["state"] == "finished"
                    else f"{r['state']}, {r['env_steps_logged']} steps"
                    for r in mine
                },
            }
            for budget in map(str, BUDGETS):
                values = {r["seed"]: r["win_rate_at"].get(budget) for r in mine}
                entry[f"win_rate_{budget}"] = mean_ci(values.values())
                entry[f"win_rate_{budget}_per_seed"] = values
            for diagnostic in DIAGNOSTICS:
                for budget in map(str, BUDGETS):
                    per_seed = [r["diagnostics_at"][diagnostic].get(budget) for r in mine]
                    entry[f"{diagnostic}_{budget}"] = mean_ci(per_seed)
            entry["first_step_win_rate_0.5"] = {r["seed"]: r["first_step_win_rate_0.5"] for r in mine}
            # An audited run also computes the exact level 1: its cost is exact k=2's, not the variant's.
            counted = [r for r in mine if r["audit"] is None]
            entry["cpu_seconds_per_seed"] = {r["seed"]: r["cpu_seconds"] for r in counted}
            entry["cpu_seconds"] = mean_ci(entry["cpu_seconds_per_seed"].values())
            entry["phases_in_critic_time_per_seed"] = {r["seed"]: r["phases_in_critic_time"] for r in counted}
            entry["actor_over_critic"] = mean_ci(
                (p or {}).get("actor") for p in entry["phases_in_critic_time_per_seed"].values()
            )
            entry["audit_per_seed"] = {r["seed"]: r["audit"] for r in mine if r["audit"]}
            by_variant[name] = entry
        differences = {}
        for label, minuend, subtrahend in COMPARISONS:
            if minuend in by_variant and subtrahend in by_variant:
                differences[label] = _paired(by_variant[minuend], by_variant[subtrahend])
        table[map_name] = {"by_variant": by_variant, "differences": differences}
    return table


def _paired(minuend: dict, subtrahend: dict) -> dict:
    """Per budget the per-seed differences of two variants (same seed) and their mean, and the CPU ratio - 1."""
    paired = {}
    for budget in map(str, BUDGETS):
        a, b = minuend[f"win_rate_{budget}_per_seed"], subtrahend[f"win_rate_{budget}_per_seed"]
        per_seed = {s: a[s] - b[s] for s in a if a[s] is not None and b.get(s) is not None}
        paired[budget] = {"per_seed": per_seed, "mean_ci": mean_ci(per_seed.values())}
    cpu_a, cpu_b = minuend["cpu_seconds_per_seed"], subtrahend["cpu_seconds_per_seed"]
    ratios = {s: cpu_a[s] / cpu_b[s] - 1 for s in cpu_a if cpu_a[s] and cpu_b.get(s)}
    paired["cpu_overhead"] = {"per_seed": ratios, "mean_ci": mean_ci(ratios.values())}
    phases_a, phases_b = minuend["phases_in_critic_time_per_seed"], subtrahend["phases_in_critic_time_per_seed"]
    ratios = {s: phases_a[s]["update"] / phases_b[s]["update"] - 1 for s in phases_a if phases_a[s] and phases_b.get(s)}
    paired["update_time_overhead"] = {"per_seed": ratios, "mean_ci": mean_ci(ratios.values())}
    return paired


def markdown(table: dict, maps: dict, meta: dict) -> str:
    header = (
        "| map | variant | win rate 1M | win rate 2M | win rate 3M | first step at 0.5, per seed | CPU s per run "
        "| actor : critic time | runs |"
    )
    lines = [
        "# SMAX study: K2-MAPPO against MAPPO, four maps, one preset",
        "",
        f"Command: `{meta['command']}`; code commit `{meta['commit']}`; study folder `{meta['study']}`.",
        f"Ran on: {meta['versions_ran']}.",
        "",
        header,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    audits = []
    for map_name, entry in table.items():
        for name, e in entry["by_variant"].items():
            firsts = ", ".join(
                "-" if v is None else f"{v / 1e6:.2f}M" for _, v in sorted(e["first_step_win_rate_0.5"].items())
            )
            states = ", ".join(f"s{s}: {st}" for s, st in sorted(e["states"].items()))
            lines.append(
                f"| {map_name} | {name} | "
                + " | ".join(_fmt(*e[f"win_rate_{b}"]) for b in BUDGETS)
                + f" | {firsts} | {_fmt(*e['cpu_seconds'], digits=0)} | {_fmt(*e['actor_over_critic'])} | {states} |"
            )
            audits += [
                f"| {map_name} | {seed} | " + " | ".join(f"{figures[n]:.3f}" for n in AUDIT) + " |"
                for seed, figures in sorted(e["audit_per_seed"].items())
            ]
        for label, d in entry["differences"].items():
            per_seed = lambda values: ", ".join(f"{v:+.2f}" for _, v in sorted(values.items()))  # noqa: E731
            cells = [f"{_fmt(*d[str(b)]['mean_ci'])} [{per_seed(d[str(b)]['per_seed'])}]" for b in BUDGETS]
            cpu, update = (_percent(*d[key]["mean_ci"]) for key in ("cpu_overhead", "update_time_overhead"))
            lines.append(f"| {map_name} | {label} | " + " | ".join(cells) + f" | | CPU {cpu} | update {update} | |")
    missing = [m for m in MAPS if m not in table]
    if missing:
        lines += ["", f"Not started yet: {', '.join(missing)}."]
    lines += [
        "",
        "Win rate at a budget: the per-update win rate (episodes won / finished in the update) averaged over the "
        "last 8 % of the updates before the budget, then over the seeds that reached it (n), ± the 95 % Student-t "
        "half-width. K2 - K1 (and, where momentum runs exist, momentum K2 - K1 and momentum K2 - exact K2): the "
        "paired per-seed differences (same seed), their mean ± 95 % half-width, and each seed's difference in "
        "brackets. First step at 0.5: the first update whose win rate reaches 0.5 (- : none yet). CPU s: the "
        "run's process CPU time (one core; finished runs only); a difference's CPU: the first variant's CPU over "
        "the second's - 1, paired per seed. CPU seconds move with the machine's load (runs ran two to four "
        "at a time on two cores, at different times). Actor : critic time: per update, the wall-clock seconds "
        "of the actor update over those of the critic update (metrics.csv's seconds_actor and seconds_critic), "
        "the median over the run's updates after the first 10; the critic's work is the same in every variant "
        "and shares the update's load, so this is the actor update's cost free of the load. A difference's "
        "update: the whole update's time (environment + critic + actor) in critic units, the same median, "
        "first variant over second - 1, paired per seed. Audited runs (below) also compute the exact level 1 "
        "and are left out of the CPU and time figures. "
        "Curves of every run: curves.png; raw per-run metrics.csv, config.json and summary.json under runs/.",
    ]
    lines += [
        "",
        "How each variant trained: the policy's entropy and its last level's clip fraction (the share of samples "
        "whose ratio, from level 2 the joint ratio with the others' anticipated ratios, fell outside the clip "
        "range and so gave no gradient), each averaged over the same windows as the win rate, then over seeds.",
        "",
        "| map | variant | "
        + " | ".join(f"entropy {b // 1_000_000}M" for b in BUDGETS)
        + " | "
        + " | ".join(f"clip fraction {b // 1_000_000}M" for b in BUDGETS)
        + " |",
        "| --- | --- | " + " | ".join("---" for _ in range(2 * len(BUDGETS))) + " |",
    ]
    for map_name, entry in table.items():
        for name, e in entry["by_variant"].items():
            cells = [_fmt(*e[f"entropy_{b}"]) for b in BUDGETS] + [
                _fmt(*e[f"clip_fraction_{b}"], digits=3) for b in BUDGETS
            ]
            lines.append(f"| {map_name} | {name} | " + " | ".join(cells) + " |")
    if audits:
        lines += [
            "",
            "Audited momentum runs (k=2 momentum: the exact level-1 step computed beside the prediction), each "
            "figure the mean over agents, then over the run's updates: gate = clip(cos(u1, u2), 0, 1); cosine = "
            "cos(u1, exact step); relative error = |gate u1 - exact step| / |exact step|; norm ratio = |gate u1| "
            "/ |exact step| (docs/algorithm.md).",
            "",
            "| map | seed | gate | cosine | relative error | norm ratio |",
            "| --- | --- | --- | --- | --- | --- |",
            *audits,
        ]
    return "\n".join(lines) + "\n"


COLORS = {"k=1": "tab:blue", "k=2": "tab:orange", "k=2 momentum": "tab:green"}


def plot(maps: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in MAPS if m in maps] + [m for m in maps if m not in MAPS]
    figure, axes = plt.subplots(1, max(1, len(names)), figsize=(4.2 * max(1, len(names)), 3.6), squeeze=False)
    for axis, map_name in zip(axes[0], names):
        for run in sorted(maps[map_name], key=lambda r: (r["variant"], r["seed"])):
            steps, wins = run["curve"]
            if len(steps):
                color = COLORS.get(run["variant"], "tab:gray")
                axis.plot(steps, wins, color=color, alpha=0.75, lw=0.9, label=f"{run['variant']} s{run['seed']}")
        axis.set_title(map_name)
        axis.set_xlabel("environment steps")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("win rate per update")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        axes[0][0].legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(study: Path, out: Path, command: str | None = None) -> dict:
    if not study.is_dir():
        raise FileNotFoundError(f"no study folder at {study}; run scripts/smax_study.py --out {study} first")
    maps = collect(study)
    if not maps:
        raise ValueError(f"{study} holds no <map>/runs/ folder with runs; is it the folder of scripts/smax_study.py?")
    table = summarize(maps)
    ran = [r["versions"] for rs in maps.values() for r in rs if r["versions"]]
    versions_ran = sorted({json.dumps(v, sort_keys=True) for v in ran})
    meta = {
        "command": command or "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "commit": _commit(),
        "study": str(study),
        "versions_ran": "; ".join(versions_ran) if versions_ran else "no finished run yet",
    }
    out.mkdir(parents=True, exist_ok=True)
    for map_name, runs in maps.items():
        for run in runs:
            target = out / "runs" / map_name / run["run"]
            target.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.csv", "config.json", "summary.json"):
                if (run["dir"] / name).exists():
                    shutil.copyfile(run["dir"] / name, target / name)
    results = {
        **meta,
        "versions_ran": [json.loads(v) for v in versions_ran],
        "budgets": list(BUDGETS),
        "window": WINDOW,
        "maps": table,
        "runs": {
            m: [{key: value for key, value in r.items() if key not in ("dir", "curve")} for r in rs]
            for m, rs in maps.items()
        },
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(markdown(table, maps, meta))
    plot(maps, out / "curves.png")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=Path("/work/studies/smax_study"))
    parser.add_argument("--out", type=Path, default=REPO / "results" / "smax_study")
    args = parser.parse_args(argv)
    report(args.study, args.out)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
