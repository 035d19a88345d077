"""``kpg compare``: the same training run for several k and seeds, then learning curves with
confidence bands (PNG), a results table (Markdown and JSON) and the wall-clock split.
``--anticipations exact momentum`` adds momentum anticipation's runs beside exact ones at every k >= 2
(k=1 has nothing to anticipate and runs once): results keyed ``k`` for exact, ``"k-momentum"`` for
momentum.

Runs go to ``<out>/runs/``; they are started in ``workers`` processes (one torch thread each) and a
finished run (its ``summary.json`` exists) is not run again, so an interrupted comparison resumes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shlex
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from kpg.app.train import TrainConfig, train
from kpg.options import require, require_ranges

CURVE_POINTS = 50
FINAL_FRACTION = 0.1  # the final return averages the rows logged in the last 10 % of steps
# --metric: the metrics.csv column of the curves, its name in the table, the plot's axis label. Each iteration's
# own return, not recent_return: that one averages the last 20 iterations and so lags a rising curve, most of all
# the one that rises later, which would bias K2 - K1.
CURVE_METRICS = {
    "return": ("episode_return", "return", "episode return (per iteration)"),
    "win_rate": ("win_rate", "win rate", "win rate (episodes won / finished, per update)"),
}


@dataclass
class CompareConfig:
    """k values x seeds of one training configuration, compared."""

    ks: tuple[int, ...] = (1, 2)
    anticipations: tuple[Literal["exact", "momentum"], ...] = ("exact",)  # at each k >= 2 (train --anticipation)
    seeds: tuple[int, ...] = (0, 1, 2)
    workers: int = 2  # runs in parallel, one process each
    out: Path = Path("results/compare")
    metric: Literal["return", "win_rate"] = "return"  # what the curves and the final value show (win_rate: SMAX)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(progress=False))

    def validate(self) -> None:
        """Raises :class:`kpg.options.OptionError` for a value out of range (types: kpg.options.check_options)."""
        require_ranges(self, "", {"ks": (1, None, False), "seeds": (0, 2**32 - 1, False), "workers": (1, None, False)})
        require(self, "", "ks", len(self.ks) > 0, "at least one k")
        require(self, "", "seeds", len(self.seeds) > 0, "at least one seed")
        require(self, "", "anticipations", len(self.anticipations) > 0, "at least one anticipation")
        require(
            self,
            "",
            "ks",
            "momentum" not in self.anticipations or max(self.ks) <= 2,
            "k of 1 or 2 with --anticipations momentum (momentum predicts level 1 only)",
        )
        for folder in (self.out, *self.out.parents):
            require(self, "", "out", not folder.exists() or folder.is_dir(), f"a folder; {folder} is a file")


def _run(config: TrainConfig) -> dict:
    summary_path = config.run_dir / "summary.json"
    if summary_path.exists():
        try:  # data only (JSON), like every file kpg reads
            summary = json.loads(summary_path.read_text())
        except ValueError as error:
            raise ValueError(
                f"{summary_path} is not valid JSON ({error}); delete it to run {config.run_name} again"
            ) from None
        if not summary.get("interrupted") and summary["env_steps"] >= config.steps:
            return summary
    # A run stopped before its end (its summary says interrupted) continues from its last checkpoint;
    # one stopped before its first checkpoint starts over.
    resume = (config.run_dir / "checkpoint.pt").exists()
    return train(dataclasses.replace(config, resume=resume, overwrite=not resume))


def _t_quantile_95(samples: int) -> float:
    """Two-sided 95 % Student-t quantile for ``samples - 1`` degrees of freedom."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
    return table.get(samples - 1, 1.96)


def mean_and_halfwidth(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and 95 % confidence half-width over ``axis`` (zero width for one sample)."""
    n = values.shape[axis]
    mean = values.mean(axis=axis)
    if n < 2:
        return mean, np.zeros_like(mean)
    return mean, _t_quantile_95(n) * values.std(axis=axis, ddof=1) / math.sqrt(n)


def _logged(run_dir: Path, column: str) -> tuple[np.ndarray, np.ndarray]:
    """The steps and values of ``column`` in the rows of a run's metrics.csv that have it."""
    steps, values = [], []
    with open(run_dir / "metrics.csv") as file:
        for row in csv.DictReader(file):
            if row.get(column):
                steps.append(float(row["env_steps"]))
                values.append(float(row[column]))
    return np.array(steps), np.array(values)


def _curve(run_dir: Path, grid: np.ndarray, column: str) -> np.ndarray:
    return np.interp(grid, *_logged(run_dir, column))


def final_mean(logged: np.ndarray, values: np.ndarray, steps: int) -> float:
    """The mean of the ``values`` logged (at ``logged`` steps) in the last FINAL_FRACTION of ``steps``; the last
    value where none is logged there (short runs whose episodes outlast an update)."""
    window = values[logged > steps * (1 - FINAL_FRACTION)]
    return float(window.mean() if window.size else values[-1])


def _final(run_dir: Path, steps: int, column: str) -> float:
    return final_mean(*_logged(run_dir, column), steps)


def compare(config: CompareConfig) -> dict:
    config.out.mkdir(parents=True, exist_ok=True)
    # A seed's k values run next to each other, so with --workers len(ks) they share the machine's load alike.
    variants = _variants(config)
    runs = [
        dataclasses.replace(
            config.train,
            k=k,
            anticipation=anticipation,
            # The momentum-only options leave the exact runs.
            anticipation_reset=config.train.anticipation_reset and anticipation == "momentum",
            anticipation_audit=config.train.anticipation_audit and anticipation == "momentum",
            seed=seed,
            logdir=config.out / "runs",
            name=None,
            resume=False,
            overwrite=False,
            progress=False,
        )
        for seed in config.seeds
        for k, anticipation in variants
    ]
    if config.workers > 1:
        with ProcessPoolExecutor(max_workers=config.workers) as executor:
            summaries = list(executor.map(_run, runs))
    else:
        summaries = [_run(run) for run in runs]
    grid = np.linspace(config.train.steps / CURVE_POINTS, config.train.steps, CURVE_POINTS)
    results = {
        "command": "kpg compare " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        if sys.argv[1:2] == ["compare"]
        else None,
        "train": json.loads(json.dumps(dataclasses.asdict(config.train), default=str)),
        "by_k": {},
        "metric": config.metric,
        # The trainers' count: environments such as smax:MAP decide it, whatever --agents says.
        "agents": summaries[0]["agents"],
    }
    curves = {}
    for k, anticipation in variants:
        label = _label(k, anticipation)
        mine = [(run, s) for run, s in zip(runs, summaries) if (run.k, run.anticipation) == (k, anticipation)]
        curve = np.stack([_curve(run.run_dir, grid, CURVE_METRICS[config.metric][0]) for run, _ in mine])
        curves[label] = curve
        finals = np.array([_final(run.run_dir, config.train.steps, CURVE_METRICS[config.metric][0]) for run, _ in mine])
        final, final_ci = mean_and_halfwidth(finals)
        evals = [s["eval_return"] for _, s in mine if s.get("eval_return") is not None]
        wall, wall_ci = mean_and_halfwidth(np.array([s["wall_seconds"] for _, s in mine]))
        cpu, cpu_ci = mean_and_halfwidth(np.array([s.get("cpu_seconds", np.nan) for _, s in mine]))
        split = {
            phase: float(np.mean([s["seconds"].get(phase, 0.0) for _, s in mine]))
            for phase in ("environment", "critic", "actor")
        }
        levels = max(len(s["actor_level_seconds"]) for _, s in mine)
        split_levels = [
            float(np.mean([s["actor_level_seconds"][l] if l < len(s["actor_level_seconds"]) else 0.0 for _, s in mine]))
            for l in range(levels)
        ]
        results["by_k"][label] = {
            "k": k,
            "anticipation": anticipation,
            "seeds": [s["seed"] for _, s in mine],
            "final_return": float(final),
            "final_return_ci95": float(final_ci),
            "final_return_per_seed": finals.tolist(),
            "eval_return": float(np.mean(evals)) if evals else None,
            "wall_seconds": float(wall),
            "wall_seconds_ci95": float(wall_ci),
            "cpu_seconds": float(cpu),
            "cpu_seconds_ci95": float(cpu_ci),
            "seconds": split,
            "actor_level_seconds": split_levels,
        }
    base_k = _label(*variants[0])
    for entry in results["by_k"].values():
        entry[f"wall_overhead_vs_k{base_k}"] = entry["wall_seconds"] / results["by_k"][base_k]["wall_seconds"] - 1.0
        entry[f"cpu_overhead_vs_k{base_k}"] = entry["cpu_seconds"] / results["by_k"][base_k]["cpu_seconds"] - 1.0
    (config.out / "results.json").write_text(json.dumps(results, indent=2))
    (config.out / "results.md").write_text(_markdown(results, base_k))
    _plot(config, grid, curves, results["agents"])
    print((config.out / "results.md").read_text())
    print(f"learning curves: {config.out / 'curves.png'}; runs (CSV, TensorBoard, checkpoints): {config.out / 'runs'}")
    return results


def _variants(config: CompareConfig) -> list[tuple[int, str]]:
    """(k, anticipation) of every run of a seed, k in order: k=1 once (exact; momentum's k=1 is the
    same plain step), each k >= 2 with every anticipation."""
    variants = []
    for k in sorted(set(config.ks)):
        anticipations = ("exact",) if k == 1 else dict.fromkeys(config.anticipations)
        variants.extend((k, anticipation) for anticipation in anticipations)
    return variants


def _label(k: int, anticipation: str) -> int | str:
    """The key of a variant in results.json's by_k (its row in the table, its curve): k for exact."""
    return k if anticipation == "exact" else f"{k}-{anticipation}"


def _markdown(results: dict, base_k: int | str) -> str:
    train_config = results["train"]
    lines = [
        f"# {train_config['algo']} on {train_config['env']} ({results['agents']} agents), "
        f"{train_config['steps']} environment steps",
        "",
        f"Command: `{results['command']}`" if results["command"] else "",
        "",
        f"| k | seeds | final {CURVE_METRICS[results['metric']][1]} (95% CI) | greedy eval return | wall-clock s | "
        f"overhead vs k={base_k} | "
        f"CPU s | CPU overhead vs k={base_k} | environment s | critic s | actor s | actor s per level |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, e in results["by_k"].items():
        k = str(key).replace("-", " ")
        levels = " / ".join(f"{s:.1f}" for s in e["actor_level_seconds"])
        evaluation = "-" if e["eval_return"] is None else f"{e['eval_return']:.2f}"
        lines.append(
            f"| {k} | {len(e['seeds'])} | {e['final_return']:.2f} ± {e['final_return_ci95']:.2f} | {evaluation} | "
            f"{e['wall_seconds']:.0f} ± {e['wall_seconds_ci95']:.0f} | "
            f"{100 * e[f'wall_overhead_vs_k{base_k}']:+.0f}% | "
            f"{e['cpu_seconds']:.0f} ± {e['cpu_seconds_ci95']:.0f} | {100 * e[f'cpu_overhead_vs_k{base_k}']:+.0f}% | "
            f"{e['seconds']['environment']:.0f} | {e['seconds']['critic']:.0f} | {e['seconds']['actor']:.0f} | "
            f"{levels} |"
        )
    lines += [
        "",
        "Final return: each iteration's mean return over the episodes that ended in it (final win rate: the win "
        "rate per update), averaged over the last 10 % of the run, then over seeds. Wall-clock and CPU time (of "
        "the run's process: its cost whatever else shares the cores) "
        "per run, from start to the end of training, evaluation excluded; the phase split is wall-clock.",
    ]
    return "\n".join(lines) + "\n"


def _plot(config: CompareConfig, grid: np.ndarray, curves: dict[int | str, np.ndarray], agents: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for k, curve in curves.items():
        mean, halfwidth = mean_and_halfwidth(curve)
        axes.plot(grid, mean, label=f"k={str(k).replace('-', ' ')}" + (" (plain)" if k == 1 else ""))
        axes.fill_between(grid, mean - halfwidth, mean + halfwidth, alpha=0.25)
    t = config.train
    axes.set_title(f"{t.algo} on {t.env} ({agents} agents), {len(config.seeds)} seeds, 95% CI")
    axes.set_xlabel("environment steps")
    axes.set_ylabel(CURVE_METRICS[config.metric][2])
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(config.out / "curves.png", dpi=120)
    plt.close(figure)
