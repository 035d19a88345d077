"""What K-MAPPO costs inside BenchMARL: BenchMARL's mappo, kmappo k=1 and kmappo k=2 side by side in one
process, with BenchMARL's default experiment, MLP (256 x 256) and MAPPO settings on one VMAS task.

1. Collection: one batch of ``--frames`` frames with ``--envs`` VMAS copies (the same for every
   variant: the policy's forward and VMAS), seconds per frame.
2. Training: the three experiments, built from the same seed, train on that batch (GAE, then
   BenchMARL's minibatch step ``_optimizer_loop``: 400-frame minibatches, the actor's KPG levels and
   the critic), taking turns in blocks of ``--steps`` steps for ``--rounds`` rounds; the median
   seconds per minibatch step of each variant, and its ratio to mappo's.
3. An iteration at BenchMARL's defaults (6000 frames; 45 epochs x 15 minibatches = 675 steps):
   collection seconds per frame x 6000 plus 675 steps, and the frames per second that gives.

    python bench/benchmarl_speed.py --json results/benchmarl/bench.json
    python bench/benchmarl_speed.py --task-options n_agents=16 shared_rew=true   # 16 agents, VMAS's defaults

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
import yaml
from benchmarl.algorithms import MappoConfig
from benchmarl.environments import VmasTask
from benchmarl.experiment import Experiment as BenchMARLExperiment
from benchmarl.experiment import ExperimentConfig
from benchmarl.models import MlpConfig

from kpg.benchmarl import Experiment, KMappoConfig

GROUP = "agents"
DEFAULT_FRAMES, DEFAULT_STEPS = 6000, 45 * 15  # BenchMARL's on-policy defaults: frames and minibatch steps per batch


def task(name: str, options: list[str]):
    """BenchMARL's VMAS task ``name`` with ``KEY=VALUE`` changes to its own options (values read as YAML)."""
    chosen = getattr(VmasTask, name.upper()).get_from_yaml()
    for option in options:
        key, separator, value = option.partition("=")
        if not separator or key not in chosen.config:
            raise SystemExit(
                f"--task-options {option!r}: give KEY=VALUE, KEY one of vmas/{name}'s options {sorted(chosen.config)}"
            )
        default, parsed = chosen.config[key], yaml.safe_load(value)
        if type(parsed) is not type(default) and not (isinstance(default, float) and type(parsed) is int):
            raise SystemExit(
                f"--task-options {option!r}: {key} takes {type(default).__name__} values (default {default!r})"
            )
        chosen.config[key] = parsed
    return chosen


def build(variant: str, args, folder: Path):
    config = ExperimentConfig.get_from_yaml()
    folder.mkdir(parents=True)
    changes = dict(
        on_policy_collected_frames_per_batch=args.frames,
        on_policy_n_envs_per_worker=args.envs,
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
    return experiment_class(
        task=task(args.task, args.task_options),
        algorithm_config=algorithm,
        model_config=MlpConfig.get_from_yaml(),
        seed=0,
        config=config,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="navigation", help="a VMAS task of BenchMARL's (VmasTask name)")
    parser.add_argument("--task-options", nargs="*", default=[], metavar="KEY=VALUE", help="the task's own options")
    parser.add_argument("--frames", type=int, default=600, help="frames collected (BenchMARL's default batch: 6000)")
    parser.add_argument("--envs", type=int, default=6, help="VMAS copies for the collection")
    parser.add_argument("--steps", type=int, default=10, help="minibatch steps per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="timed blocks of every variant, taking turns")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="SyncDataCollector has been deprecated")
    variants = ("mappo", "kmappo_k1", "kmappo_k2")
    with tempfile.TemporaryDirectory() as folder:
        experiments = {v: build(v, args, Path(folder) / v) for v in variants}
        collector = experiments["mappo"].collector
        started = time.perf_counter()
        batch = next(iter(collector))
        collection_per_frame = (time.perf_counter() - started) / batch.numel()
        for experiment in experiments.values():
            group_batch = batch.exclude(*experiment._get_excluded_keys(GROUP)).clone()
            group_batch = experiment.algorithm.process_batch(GROUP, group_batch).reshape(-1)
            experiment.replay_buffers[GROUP].extend(group_batch)
            experiment._optimizer_loop(GROUP)  # warm-up
        seconds = {v: [] for v in variants}
        for round_ in range(args.rounds):
            for variant, experiment in experiments.items():
                started = time.perf_counter()
                for _ in range(args.steps):
                    experiment._optimizer_loop(GROUP)
                seconds[variant].append((time.perf_counter() - started) / args.steps)
            print(f"round {round_}: " + ", ".join(f"{v} {s[-1] * 1e3:.1f} ms" for v, s in seconds.items()), flush=True)
        for experiment in experiments.values():
            experiment.close()
    collection = collection_per_frame * DEFAULT_FRAMES
    summary = {}
    for variant in variants:
        step = statistics.median(seconds[variant])
        training = step * DEFAULT_STEPS
        summary[variant] = dict(
            step_ms=step * 1e3,
            iteration_training_s=training,
            iteration_s=collection + training,
            fps=DEFAULT_FRAMES / (collection + training),
        )
    base = summary["mappo"]
    print(
        f"\n{' '.join([args.task, *args.task_options])}: collection {collection_per_frame * 1e3:.2f} ms per frame "
        f"({args.envs} copies); "
        f"an iteration at BenchMARL's defaults = {DEFAULT_FRAMES} frames + {DEFAULT_STEPS} minibatch steps"
    )
    print(f"{'variant':<10} {'ms/step':>8} {'x mappo':>8} {'iteration s':>12} {'fps':>6} {'x mappo':>8}")
    for variant, m in summary.items():
        m.update(step_vs_mappo=m["step_ms"] / base["step_ms"], fps_vs_mappo=m["fps"] / base["fps"])
        print(
            f"{variant:<10} {m['step_ms']:>8.1f} {m['step_vs_mappo']:>8.2f} {m['iteration_s']:>12.1f} "
            f"{m['fps']:>6.1f} {m['fps_vs_mappo']:>8.2f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "torch": torch.__version__,
            "host": platform.node(),
            "collection_ms_per_frame": collection_per_frame * 1e3,
        }
        args.json.write_text(json.dumps({"meta": meta, "summary": summary, "seconds_per_step": seconds}, indent=2))


if __name__ == "__main__":
    main()
