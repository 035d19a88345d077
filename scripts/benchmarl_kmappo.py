"""K2 against K1 inside BenchMARL (issue 30): ``python -m kpg.benchmarl.run algorithm=kmappo`` on VMAS
tasks with BenchMARL's MAPPO settings (its defaults) except the frame budget, one run at a time,
resumable: a finished run leaves ``done`` in its folder and is skipped; an interrupted one restarts
from its newest checkpoint (every ``--checkpoint-frames``; the optimizer state included, the VMAS
episodes restarted).

    nohup nice -n 15 python scripts/benchmarl_kmappo.py --runs /work/studies/benchmarl \\
        --tasks navigation balance --ks 1 2 --seeds 0 1 2 --frames 300000 > /work/studies/benchmarl/log.txt 2>&1 &

``--task-options`` changes the tasks' own options (BenchMARL's ``task.KEY=VALUE`` overrides), and
``--label`` names that variant in the run folders (``TASK-LABEL_kK_sSEED``), e.g. navigation with 16
agents and VMAS's own defaults for the rest (BenchMARL's navigation.yaml sets shared_rew False):

    python scripts/benchmarl_kmappo.py --runs /work/studies/benchmarl --tasks navigation \
        --task-options n_agents=16 shared_rew=true --label 16agents --seeds 0

Each run's BenchMARL CSV logs are under ``RUNS/TASK_kK_sSEED/kmappo_*/``; ``provenance.json`` beside them
lists, for every start or resumption, the command, the code commit and the package versions that ran it.
``scripts/benchmarl_kmappo_report.py`` turns the folder into ``results/benchmarl/``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("kpg", "torch", "benchmarl", "torchrl", "tensordict", "vmas", "hydra-core")


def newest_checkpoint(folder: Path) -> Path | None:
    checkpoints = list(folder.glob("*/checkpoints/checkpoint_*.pt"))
    return max(checkpoints, key=lambda p: int(p.stem.split("_")[-1])) if checkpoints else None


def record_start(folder: Path, command: list[str]) -> None:
    """Appends this start's command, code commit and package versions to the run's provenance.json."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    path = folder / "provenance.json"
    starts = json.loads(path.read_text()) if path.exists() else []
    starts.append(
        {
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": " ".join(command),
            "commit": commit + ("+uncommitted changes" if dirty else ""),
            "versions": {name: metadata.version(name) for name in PACKAGES},
        }
    )
    path.write_text(json.dumps(starts, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--tasks", nargs="+", default=["navigation", "balance"])
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--frames", type=int, default=300_000)
    parser.add_argument("--checkpoint-frames", type=int, default=60_000, help="a multiple of 6000 frames per batch")
    parser.add_argument("--task-options", nargs="*", default=[], metavar="KEY=VALUE", help="the task's own options")
    parser.add_argument("--label", help="names the --task-options variant in the run folders; required with them")
    args = parser.parse_args()
    if args.task_options and not args.label:
        parser.error("--task-options changes the task, so its runs need their own folders: give --label NAME")
    malformed = [option for option in args.task_options if "=" not in option]
    if malformed:
        parser.error(f"--task-options takes KEY=VALUE pairs; {malformed} has no '='")
    if args.label and not args.label.replace("-", "").isalnum():
        parser.error(f"--label {args.label!r}: use letters, digits and '-' (it becomes part of a folder name)")
    for seed in args.seeds:
        for task in args.tasks:
            for k in args.ks:
                name = f"{task}-{args.label}" if args.label else task
                folder = (args.runs / f"{name}_k{k}_s{seed}").resolve()
                if (folder / "done").exists():
                    continue
                folder.mkdir(parents=True, exist_ok=True)
                command = [
                    sys.executable,
                    "-m",
                    "kpg.benchmarl.run",
                    "algorithm=kmappo",
                    f"task=vmas/{task}",
                    f"algorithm.k={k}",
                    *(f"task.{option}" for option in args.task_options),
                    f"seed={seed}",
                    f"experiment.max_n_frames={args.frames}",
                    f"experiment.checkpoint_interval={args.checkpoint_frames}",
                    "experiment.loggers=[csv]",
                    "experiment.render=false",
                    f"experiment.save_folder={folder}",
                    f"hydra.run.dir={folder}/hydra",
                ]
                checkpoint = newest_checkpoint(folder)
                if checkpoint is not None:
                    command.append(f"experiment.restore_file={checkpoint}")
                print(" ".join(command), flush=True)
                record_start(folder, command)
                subprocess.run(command, check=True)
                (folder / "done").touch()


if __name__ == "__main__":
    main()
