"""What K-MAPPO costs inside BenchMARL: BenchMARL's mappo, kmappo k=1 and kmappo k=2 taking turns in
one process on one task, with BenchMARL's default experiment, MLP and MAPPO settings except the
batch (``--frames``, ``--envs``, ``--minibatch-iters``), so that a round fits a loaded 2-core CPU.

Per iteration: collection seconds (VMAS and the policy), training seconds (the minibatch steps: the
actor's KPG levels and the critic) and frames per second over both; each variant's training time and
frames per second against mappo's, from the medians over ``--rounds``.

    python bench/benchmarl_speed.py --json results/benchmarl/bench.json

(Not bench/benchmarl.py: a script of that name would shadow the benchmarl package it imports.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from benchmarl.algorithms import MappoConfig
from benchmarl.environments import VmasTask
from benchmarl.experiment import Callback, ExperimentConfig
from benchmarl.experiment import Experiment as BenchMARLExperiment
from benchmarl.models import MlpConfig

from kpg.benchmarl import Experiment, KMappoConfig


class Timer(Callback):
    """Collection and training seconds of every iteration (collection starts where the previous
    iteration's training ended; the first iteration's collection is not timed)."""

    def __init__(self):
        super().__init__()
        self.collection, self.training, self._mark = [], [], None

    def on_batch_collected(self, batch):
        now = time.perf_counter()
        if self._mark is not None:
            self.collection.append(now - self._mark)
        self._mark = now

    def on_train_end(self, training_td, group):
        now = time.perf_counter()
        self.training.append(now - self._mark)
        self._mark = now


def run(variant: str, args, folder: Path) -> dict:
    config = ExperimentConfig.get_from_yaml()
    folder.mkdir(parents=True)
    changes = dict(
        on_policy_collected_frames_per_batch=args.frames,
        on_policy_n_envs_per_worker=args.envs,
        on_policy_n_minibatch_iters=args.minibatch_iters,
        max_n_frames=args.frames * (args.iterations + 1),
        loggers=[],
        create_json=False,
        evaluation=False,
        render=False,
        save_folder=str(folder),
    )
    for name, value in changes.items():
        setattr(config, name, value)
    if variant == "mappo":
        experiment_class, algorithm = BenchMARLExperiment, MappoConfig.get_from_yaml()
    else:
        experiment_class, algorithm = Experiment, dataclasses.replace(KMappoConfig.get_from_yaml(), k=int(variant[-1]))
    timer = Timer()
    experiment = experiment_class(
        task=getattr(VmasTask, args.task.upper()).get_from_yaml(),
        algorithm_config=algorithm,
        model_config=MlpConfig.get_from_yaml(),
        seed=0,
        config=config,
        callbacks=[timer],
    )
    experiment.run()
    collection, training = statistics.median(timer.collection), statistics.median(timer.training[1:])
    return {"collection_s": collection, "training_s": training, "fps": args.frames / (collection + training)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="navigation", help="a VMAS task of BenchMARL's (VmasTask name)")
    parser.add_argument("--frames", type=int, default=1200, help="frames per batch (BenchMARL's default: 6000)")
    parser.add_argument("--envs", type=int, default=12, help="VMAS copies (BenchMARL's default: 10)")
    parser.add_argument("--minibatch-iters", type=int, default=4, help="epochs per batch (BenchMARL's default: 45)")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per run (after one untimed)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every variant, taking turns")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="SyncDataCollector has been deprecated")
    variants = ("mappo", "kmappo_k1", "kmappo_k2")
    results = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            for variant in variants:
                results[variant].append(run(variant, args, Path(folder) / f"{variant}_{round_}"))
                print(variant, round_, results[variant][-1], flush=True)
    summary = {}
    for variant in variants:
        medians = {key: statistics.median(r[key] for r in results[variant]) for key in results[variant][0]}
        summary[variant] = medians
    base = summary["mappo"]
    print(f"\n{args.task}, {args.frames} frames per batch, {args.minibatch_iters} epochs of 400-frame minibatches")
    print(f"{'variant':<10} {'collect s':>10} {'train s':>9} {'fps':>8} {'train/mappo':>12} {'fps/mappo':>10}")
    for variant, m in summary.items():
        train_ratio, fps_ratio = m["training_s"] / base["training_s"], m["fps"] / base["fps"]
        m.update(training_vs_mappo=train_ratio, fps_vs_mappo=fps_ratio)
        print(
            f"{variant:<10} {m['collection_s']:>10.2f} {m['training_s']:>9.2f} {m['fps']:>8.0f} "
            f"{train_ratio:>12.2f} {fps_ratio:>10.2f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__, "host": platform.node()}
        args.json.write_text(json.dumps({"meta": meta, "summary": summary, "runs": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
