"""VMAS against the PettingZoo path, and where a K2-MAPPO iteration's time goes on VMAS, in one run.

1. Throughput with random actions: ``vmas:simple_spread`` (VMASPool, ``--copies`` copies, discrete
   actions, 25-step episodes) against PettingZoo's simple_spread (mpe2 through EnvPool, 8 copies,
   the path ``kpg train --env simple_spread`` steps), 3 and 16 agents; environment steps per second
   (one step of one copy) and agent steps per second (times the agents).
2. K-MAPPO iterations on ``vmas:navigation`` at each ``--agents`` count with ``--copies`` copies
   (``--copies-256`` at 256 agents), k=1 and k=2 taking turns on the same pool, ``--rounds`` each:
   seconds per iteration, split into environment (rollout: simulation and acting), critic, and the
   actor's KPG levels; the whole-loop k=2 overhead is k=2's iteration time over k=1's.

Navigation runs with ``collisions=False`` (no LIDAR, no agent-agent collisions): VMAS checks
collisions and casts LIDAR rays over every pair of entities in a Python loop, so with collisions one
step of 64 agents x 1024 copies takes about 17 s on the 2-core machine and 256 agents do not
finish; without them the simulator's work grows linearly with the agents.

    python bench/vmas_speed.py --json results/vmas_bench/bench.json

(Not bench/vmas.py: a script of that name would shadow the vmas package it imports.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch


def throughput_vmas(agents: int, copies: int, seconds: float) -> dict:
    from kpg.envs.vmas import VMASPool

    pool = VMASPool("simple_spread", copies, seed=0, agents=agents, continuous=False, max_steps=25)
    actions = pool.spaces.action_size
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or steps < 3:
        pool.step(torch.randint(actions, (copies, agents)))
        steps += 1
    elapsed = time.perf_counter() - started
    return {
        "copies": copies,
        "env_steps_per_s": steps * copies / elapsed,
        "agent_steps_per_s": steps * copies * agents / elapsed,
    }


def throughput_pettingzoo(agents: int, copies: int, seconds: float) -> dict:
    from kpg.envs import EnvPool, make_env_factory

    pool = EnvPool(make_env_factory("simple_spread", agents=agents), copies, seed=0)
    generator = np.random.default_rng(0)
    actions = pool.spaces.action_size
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or steps < 3:
        pool.step(generator.integers(actions, size=(copies, agents)))
        steps += 1
    elapsed = time.perf_counter() - started
    pool.close()
    return {
        "copies": copies,
        "env_steps_per_s": steps * copies / elapsed,
        "agent_steps_per_s": steps * copies * agents / elapsed,
    }


def iteration_split(agents: int, copies: int, rounds: int, mappo) -> dict:
    from kpg.algos.mappo_vectorized import VectorizedMAPPOTrainer
    from kpg.envs.vmas import VMASPool

    built = time.perf_counter()
    pool = VMASPool("navigation", copies, seed=0, agents=agents, collisions=False)
    build_seconds = time.perf_counter() - built
    trainers = {k: VectorizedMAPPOTrainer(pool, mappo, k, None, "cpu", seed=0) for k in (1, 2)}
    samples: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(rounds):
        for k, trainer in trainers.items():
            levels_before = trainer.actor_level_seconds() + [0.0] * k
            started = time.perf_counter()
            trainer.iteration()
            wall = time.perf_counter() - started
            phases = trainer.clock.take()
            levels = [after - before for after, before in zip(trainer.actor_level_seconds(), levels_before)]
            samples[k].append({"wall": wall, **{f"seconds_{p}": s for p, s in phases.items()}, "actor_levels": levels})
    result = {
        "agents": agents,
        "copies": copies,
        "pool_build_seconds": build_seconds,
        "samples_per_iteration": mappo.rollout * copies * agents,
    }
    for k, rows in samples.items():
        median = lambda key: float(np.median([row[key] for row in rows]))  # noqa: E731
        result[f"k{k}"] = {
            "wall": median("wall"),
            "environment": median("seconds_environment"),
            "critic": median("seconds_critic"),
            "actor": median("seconds_actor"),
            "actor_levels": [float(np.median([row["actor_levels"][level] for row in rows])) for level in range(k)],
        }
    result["k2_over_k1"] = result["k2"]["wall"] / result["k1"]["wall"]
    return result


def main() -> None:
    from kpg.algos.mappo import MAPPOConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=1024)
    parser.add_argument("--copies-256", type=int, default=1024, help="copies at 256 agents")
    parser.add_argument("--agents", type=int, nargs="+", default=[4, 64, 256])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rollout", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--minibatches", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput measurement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mappo = MAPPOConfig(rollout=args.rollout, epochs=args.epochs, minibatches=args.minibatches)
    report = {
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "args": vars(args) | {"json": str(args.json)},
        "mappo": dataclasses.asdict(mappo),
        "throughput": [],
        "iterations": [],
    }
    for agents in (3, 16):
        row = {
            "agents": agents,
            "vmas": throughput_vmas(agents, args.copies, args.seconds),
            "pettingzoo": throughput_pettingzoo(agents, 8, args.seconds),
        }
        row["env_speedup"] = row["vmas"]["env_steps_per_s"] / row["pettingzoo"]["env_steps_per_s"]
        report["throughput"].append(row)
        print(json.dumps(row), flush=True)
    for agents in args.agents:
        copies = args.copies_256 if agents >= 256 else args.copies
        row = iteration_split(agents, copies, args.rounds, mappo)
        report["iterations"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
