"""Time per update of kpg's K-MAPPO with the authors' SMAX preset against the authors' JAX code,
side by side on this machine: ours at k=1 and k=2 (configs/smax_authors.toml), theirs MAPPO
(``mappo_rnn_smax_original_multiseed.py`` with ``config.yaml``) and K2-MAPPO (``ik2m_inner.py`` with
``config_ik2m_inner.yaml``), 64 copies x 128 steps, one seed, wandb disabled.

Their code is read from a checkout (never part of this repository), e.g.::

    git clone https://github.com/AryamanReddi99/cheap-talk /tmp/cheap-talk   # or any copy of it
    pip install "kpg[smax]" hydra-core omegaconf distrax wandb
    python bench/smax_speed.py --authors /tmp/cheap-talk --map 3s_vs_5z --updates 3 --rounds 2

Every measurement runs in its own process (compilation excluded: one warm-up update first; their
whole run is one compiled program, timed between the per-update callbacks it makes), the four
kinds taking turns round after round so that they see the same load. Wall-clock and CPU seconds
per update; ours also split into environment, critic and actor (per KPG level). Targets
(issue 18): our k=2 / k=1 <= 1.5, our k=2 no slower than their K2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THEIRS = {
    "mappo": ("cheap_talk/src/jax_experiments/smax/ppo/mappo/mappo_rnn_smax_original_multiseed.py", "config.yaml"),
    "k2": ("cheap_talk/src/jax_experiments/smax/ppo/kmappo/ik2mappo_inner/ik2m_inner.py", "config_ik2m_inner.yaml"),
}


def time_ours(map_name: str, k: int, updates: int) -> dict:
    import dataclasses

    from kpg.app.cli import _from_dict, _read_config_file
    from kpg.app.train import TrainConfig, build_trainer

    config = _from_dict(TrainConfig, _read_config_file(ROOT / "configs" / "smax_authors.toml"))
    config = dataclasses.replace(config, env=f"smax:{map_name}", k=k, steps=(updates + 1) * 64 * 128)
    _, trainer = build_trainer(config)
    trainer.iteration()  # compiles the environment's step
    trainer.clock.take()
    levels_before = trainer.actor_level_seconds()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(updates):
        trainer.iteration()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    phases = {name: seconds / updates for name, seconds in trainer.clock.take().items()}
    levels = [
        (after - before) / updates for after, before in zip(trainer.actor_level_seconds(), levels_before + [0.0] * k)
    ]
    return {
        "wall": wall / updates,
        "cpu": cpu / updates,
        "phases": phases,
        "actor_levels": levels,
        "env_steps_per_s": 64 * 128 / phases["environment"],
    }


class _UpdateClock:
    """Stands in for their wandb logger: notes when each update's callback arrives."""

    def __init__(self):
        self.stamps: list[tuple[float, float]] = []

    def log(self, *args, **kwargs):
        self.stamps.append((time.perf_counter(), time.process_time()))

    def finish(self):
        pass


def time_theirs(authors: Path, kind: str, map_name: str, updates: int) -> dict:
    import importlib.util

    import jax
    from omegaconf import OmegaConf

    sys.path.insert(0, str(authors))
    script, config_name = THEIRS[kind]
    path = authors / script
    spec = importlib.util.spec_from_file_location(f"authors_{kind}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = OmegaConf.to_container(OmegaConf.load(path.parent / config_name))
    config.update(
        MAP_NAME=map_name,
        NUM_SEEDS=1,
        WANDB_MODE="disabled",
        TOTAL_TIMESTEPS=(updates + 1) * config["NUM_ENVS"] * config["NUM_STEPS"],
    )
    clock = module.LOGGER = _UpdateClock()
    train = jax.jit(jax.vmap(module.make_train(config)))
    keys = jax.random.split(jax.random.PRNGKey(0), 1)
    jax.block_until_ready(train(keys, jax.numpy.arange(1)))
    (wall0, cpu0), (wall1, cpu1) = clock.stamps[0], clock.stamps[-1]
    done = len(clock.stamps) - 1
    return {"wall": (wall1 - wall0) / done, "cpu": (cpu1 - cpu0) / done}


def child(args) -> None:
    if args.child == "ours":
        result = time_ours(args.map, args.k, args.updates)
    else:
        result = time_theirs(Path(args.authors), args.child, args.map, args.updates)
    print("RESULT " + json.dumps(result), flush=True)


def run_child(kind: str, k: int, args) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--k",
        str(k),
        "--map",
        args.map,
        "--updates",
        str(args.updates),
        "--authors",
        str(args.authors),
    ]
    out = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{kind} k={k} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--authors", type=Path, help="checkout of AryamanReddi99/cheap-talk (omit: ours only)")
    parser.add_argument("--map", default="3s_vs_5z")
    parser.add_argument("--updates", type=int, default=3, help="timed updates per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=["ours", "mappo", "k2"], help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    kinds = [("ours", 1), ("ours", 2)] + ([("mappo", 1), ("k2", 2)] if args.authors else [])
    results: dict[str, list[dict]] = {f"{kind} k={k}": [] for kind, k in kinds}
    for round_ in range(args.rounds):
        for kind, k in kinds:
            results[f"{kind} k={k}"].append(run_child(kind, k, args))
            print(f"round {round_ + 1} {kind} k={k}: {results[f'{kind} k={k}'][-1]}", flush=True)
    median = {
        name: {m: statistics.median(r[m] for r in runs) for m in ("wall", "cpu")} for name, runs in results.items()
    }
    print(f"\n{args.map}, 64 copies x 128 steps, median of {args.rounds} rounds x {args.updates} updates")
    print("| implementation | wall s / update | CPU s / update | 2M-step run, CPU h |")
    print("|---|---|---|---|")
    updates_2m = 2_000_000 / (64 * 128)
    for name, m in median.items():
        print(f"| {name} | {m['wall']:.2f} | {m['cpu']:.2f} | {m['cpu'] * updates_2m / 3600:.2f} |")
    ours1, ours2 = median["ours k=1"]["cpu"], median["ours k=2"]["cpu"]
    print(f"ours k=2 / k=1 (CPU): {ours2 / ours1:.2f} (target <= 1.5)")
    if args.authors:
        print(
            f"theirs K2 / MAPPO (CPU): {median['k2 k=2']['cpu'] / median['mappo k=1']['cpu']:.2f}; "
            f"ours k=2 / theirs K2 (CPU): {ours2 / median['k2 k=2']['cpu']:.2f} (target <= 1)"
        )
    if args.json:
        args.json.write_text(json.dumps({"map": args.map, "runs": results, "median": median}, indent=2))


if __name__ == "__main__":
    main()
