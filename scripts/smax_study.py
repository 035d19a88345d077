"""The SMAX study of issue 26: K2-MAPPO against MAPPO on four maps with one preset, resumable.

Maps 3s_vs_5z, 2s3z, 3s5z and 10m_vs_11m (in that order), k in {1, 2}, seeds 0, 1, 2, 3 000 000
environment steps each, every run with configs/smax_authors.toml and nothing tuned per map. Runs go
two at a time, a map's k=1 and k=2 runs of one seed side by side, so that they finish together and
a partial study always holds complete pairs. Each run writes ``<out>/<map>/runs/<run>/`` (config.json,
metrics.csv, summary.json, checkpoint.pt every 10 updates) and its output to ``<run>.log`` beside it.

Stopped at any point (a killed session, Ctrl-C), the same command continues: a finished run (its
summary.json complete) is never run again, an unfinished one resumes from its last checkpoint,
exactly (kpg.app.compare's rule). ``scripts/smax_study_report.py`` aggregates whatever has finished.

``--anticipation momentum`` adds issue 28's runs to the same folder: k=2 with the momentum-extrapolated
level 1 (``-k2-momentum-`` run folders) on 3s_vs_5z and 2s3z, the same seeds, with the audit (the exact
level-1 step computed beside the prediction; the committed step is the same with or without it) on
for the seeds of ``--audit-seeds``. The report puts them beside the exact runs of the same seeds.

    nohup nice -n 15 python scripts/smax_study.py --out /work/studies/smax_study > study.log 2>&1 &
    nohup nice -n 15 python scripts/smax_study.py --out /work/studies/smax_study --anticipation momentum &
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRESET = REPO / "configs" / "smax_authors.toml"
MAPS = ("3s_vs_5z", "2s3z", "3s5z", "10m_vs_11m")
MOMENTUM_MAPS = ("3s_vs_5z", "2s3z")  # issue 28: the maps of the authors' momentum variant's comparison
KS = (1, 2)
SEEDS = (0, 1, 2)
STEPS = 3_000_000


def run_configs(
    out: Path,
    maps=MAPS,
    ks=KS,
    seeds=SEEDS,
    steps: int = STEPS,
    anticipation: str = "exact",
    audit_seeds=(),
) -> list:
    """The study's runs in the order they run: per map and seed, every k (exact), or k=2 alone (momentum)."""
    from kpg.app.cli import _from_dict, _read_config_file
    from kpg.app.train import TrainConfig

    preset = _from_dict(TrainConfig, _read_config_file(PRESET))
    return [
        dataclasses.replace(
            preset,
            env=f"smax:{map_name}",
            k=k,
            seed=seed,
            steps=steps,
            anticipation=anticipation,
            anticipation_audit=anticipation == "momentum" and seed in audit_seeds,
            logdir=out / map_name / "runs",
            name=None,
            resume=False,
            progress=False,
            tensorboard=False,
        )
        for map_name in maps
        for seed in seeds
        for k in (ks if anticipation == "exact" else (2,))
    ]


def _run_logged(config) -> dict:
    """One run (kpg.app.compare's skip-or-resume rule) with its output in ``<run>.log``."""
    from kpg.app.compare import _run

    config.logdir.mkdir(parents=True, exist_ok=True)
    streams = sys.stdout, sys.stderr
    with open(config.logdir / f"{config.run_name}.log", "a") as log:
        sys.stdout = sys.stderr = log
        try:
            print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {config.run_name}", flush=True)
            summary = _run(config)
            print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} done: {json.dumps(summary)}", flush=True)
        finally:
            sys.stdout, sys.stderr = streams
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the study folder (outside the repository)")
    parser.add_argument("--maps", nargs="+", help=f"default: {' '.join(MAPS)} ({' '.join(MOMENTUM_MAPS)} for momentum)")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument(
        "--anticipation", choices=("exact", "momentum"), default="exact", help="momentum: issue 28's k=2 runs"
    )
    parser.add_argument(
        "--audit-seeds", nargs="*", type=int, default=[0], help="momentum: the seeds run with the audit on"
    )
    parser.add_argument("--workers", type=int, default=len(KS), help="runs at a time (default: one pair)")
    args = parser.parse_args(argv)
    maps = args.maps or list(MAPS if args.anticipation == "exact" else MOMENTUM_MAPS)
    args.out.mkdir(parents=True, exist_ok=True)
    configs = run_configs(
        args.out.resolve(), maps, KS, args.seeds, args.steps, args.anticipation, set(args.audit_seeds)
    )
    # Exact runs go a pair at a time (a map's k=1 and k=2 runs of one seed), so that a partial study
    # always holds complete pairs; momentum runs have no partner and go one after another.
    group = len(KS) if args.anticipation == "exact" else len(configs)
    batches = [configs[i : i + group] for i in range(0, len(configs), group)]
    # spawn: no worker inherits a parent's JAX or torch threads; each run sets its own single-threaded XLA.
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for batch in batches:
            names = ", ".join(c.run_name for c in batch)
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} start {names}", flush=True)
            for summary in pool.map(_run_logged, batch):
                print(
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')} finished {summary['run']}: {summary['updates']} updates, "
                    f"{summary['cpu_seconds']:.0f} CPU s, {summary['wall_seconds']:.0f} wall s",
                    flush=True,
                )
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} study complete: {args.out}", flush=True)


if __name__ == "__main__":
    main()
