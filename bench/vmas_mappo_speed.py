"""kpg's MAPPO against BenchMARL's MAPPO on one VMAS task: CPU seconds per iteration (6000 frames collected,
then the update), side by side in one run (issue 29: "keep kpg's speed"). Two kpg presets: configs/vmas_benchmarl.toml
does BenchMARL's update (45 passes of 15 minibatches = 675 Adam steps of 256 x 256 actor and critic), configs/
vmas_kpg.toml kpg's default one (5 passes of 2 minibatches of 64 x 64 networks).

Each variant is its own process, as users run them: BenchMARL's entry point (``python -m benchmarl.run
algorithm=mappo task=vmas/TASK``, no evaluation, no checkpoints, no loggers) and ``kpg train`` with a
preset's [train] table (k=1 and k=2). Every round runs each variant twice, for 1 and for more iterations
(``--iterations``; ten times as many extra iterations for the light preset, whose iteration is short), the
variants taking turns; a variant's cost per iteration is the difference of the two processes' CPU time (user +
system, from ``wait4``) over the extra iterations, so start-up and imports drop out. CPU time, because the
machines this runs on are often shared: wall-clock counts the time a process waits for a core, CPU time mostly
does not. Wall-clock is printed beside it. One torch thread everywhere (OMP_NUM_THREADS=1, MKL_NUM_THREADS=1, the
presets' threads = 1).

    python bench/vmas_mappo_speed.py --json results/vmas_benchmarl/speed.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same reader, kpg[train]'s dependency
    import tomli as tomllib

FRAMES_PER_ITERATION = 6000  # base_experiment.yaml on_policy_collected_frames_per_batch
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@dataclasses.dataclass(frozen=True)
class Variant:
    preset: str | None  # a file in configs/; None: BenchMARL itself
    k: int = 1
    iteration_scale: int = 1  # extra iterations per extra iteration of --iterations


VARIANTS = {
    "benchmarl": Variant(None),
    "kpg_k1": Variant("vmas_benchmarl.toml", 1),
    "kpg_k2": Variant("vmas_benchmarl.toml", 2),
    "kpg_light_k1": Variant("vmas_kpg.toml", 1, iteration_scale=10),
    "kpg_light_k2": Variant("vmas_kpg.toml", 2, iteration_scale=10),
}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def benchmarl_command(task: str, frames: int, folder: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "benchmarl.run",
        "algorithm=mappo",
        f"task=vmas/{task}",
        "seed=0",
        f"experiment.max_n_frames={frames}",
        "experiment.loggers=[]",
        "experiment.render=False",
        "experiment.evaluation=False",
        "experiment.checkpoint_interval=0",
        f"experiment.save_folder={folder}",
    ]


def kpg_command(task: str, k: int, frames: int, folder: Path, preset: Path) -> list[str]:
    # shared_rew false: BenchMARL's vmas/navigation task (its navigation.yaml); balance has no such option.
    env_options = ["--env-options", "shared_rew", "false"] if task == "navigation" else []
    return [
        sys.executable,
        "-m",
        "kpg",
        "train",
        "--config",
        str(preset),
        "--env",
        f"vmas:{task}",
        "--k",
        str(k),
        "--steps",
        str(frames),
        "--seed",
        "0",
        "--eval-episodes",
        "0",
        "--checkpoint-every",
        "0",
        "--no-tensorboard",
        "--logdir",
        str(folder),
        *env_options,
    ]


def train_table(path: Path, folder: Path) -> Path:
    """The preset's [train] table as a config file ``kpg train`` reads (the preset also holds kpg
    compare's keys)."""
    table = tomllib.loads(path.read_text())["train"]
    folder.mkdir(parents=True, exist_ok=True)
    written = folder / "train.json"
    written.write_text(json.dumps(table))
    return written


def timed_process(command: list[str], folder: Path) -> dict[str, float]:
    """Runs ``command`` in ``folder`` (Hydra writes its outputs/ there); its CPU and wall seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(folder / "output.txt", "w") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, cwd=folder, env={**os.environ, **ONE_THREAD}
        )
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed; see {folder / 'output.txt'}")
    return {"cpu": usage.ru_utime + usage.ru_stime, "wall": wall}


def command_for(name: str, task: str, frames: int, folder: Path, tables: dict[str, Path]) -> list[str]:
    variant = VARIANTS[name]
    if variant.preset is None:
        return benchmarl_command(task, frames, folder)
    return kpg_command(task, variant.k, frames, folder, tables[variant.preset])


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, list[dict[str, float]]]:
    """Per variant and round: CPU and wall seconds per extra iteration."""
    presets = {VARIANTS[name].preset for name in args.variants} - {None}
    tables = {preset: train_table(CONFIGS / preset, workdir / preset) for preset in presets}
    per_iteration: dict[str, list[dict[str, float]]] = {variant: [] for variant in args.variants}
    for round_index in range(args.rounds):
        for variant in args.variants:
            extra = (args.iterations - 1) * VARIANTS[variant].iteration_scale
            runs = {}
            for iterations in (1, 1 + extra):
                folder = workdir / f"r{round_index}-{variant}-{iterations}"
                command = command_for(variant, args.task, iterations * FRAMES_PER_ITERATION, folder, tables)
                runs[iterations] = timed_process(command, folder)
            cost = {key: (runs[1 + extra][key] - runs[1][key]) / extra for key in ("cpu", "wall")}
            per_iteration[variant].append(cost)
            print(
                f"round {round_index}: {variant:13s} {cost['cpu']:7.2f} CPU s, {cost['wall']:7.2f} wall s an iteration",
                flush=True,
            )
    return per_iteration


def report(per_iteration: dict[str, list[dict[str, float]]], task: str) -> list[str]:
    baseline_runs = per_iteration.get("benchmarl")
    baseline = statistics.median(run["cpu"] for run in baseline_runs) if baseline_runs else float("nan")
    lines = [
        f"{task}: seconds per iteration ({FRAMES_PER_ITERATION} frames and an update), medians over rounds",
        f"{'variant':13s} {'CPU s':>8s} {'x BenchMARL':>12s} {'wall s':>8s}",
    ]
    for variant, runs in per_iteration.items():
        cpu = statistics.median(run["cpu"] for run in runs)
        wall = statistics.median(run["wall"] for run in runs)
        lines.append(f"{variant:13s} {cpu:8.2f} {cpu / baseline:12.3f} {wall:8.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="navigation", choices=("navigation", "balance"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--iterations", type=int, default=3, help="the longer run's iterations (at least 2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures and the machine's description here")
    args = parser.parse_args()
    if args.iterations < 2 or args.rounds < 1:
        parser.error("--iterations must be at least 2 and --rounds at least 1")
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=CONFIGS)
    with tempfile.TemporaryDirectory(prefix="vmas_mappo_speed-") as workdir:
        per_iteration = measure(args, Path(workdir))
    lines = report(per_iteration, args.task)
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "started": started,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "code_commit": commit.stdout.strip(),  # at the start: the checkout may move while it runs
            "versions": {name: version(name) for name in ("torch", "benchmarl", "torchrl", "vmas", "kpg")},
        }
        args.json.write_text(
            json.dumps({"metadata": metadata, "per_iteration": per_iteration, "report": lines}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
