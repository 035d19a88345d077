"""Soak test: steps KPGOptimizer many times on a small model and shows that resident memory and step
time stay flat (no leak, no slowdown over a long run).

    python scripts/soak.py                      # 100 000 steps, a report line every 10 000
    python scripts/soak.py --steps 5000 --window 1000 --json soak.json

Four agents, each an MLP 8-32-2 (tanh), a coupled loss through the anticipated actions, k=2, Adam
with per-agent clipping, float32, one thread. Every window reports the resident set size at its
end and the median step time within it, as wall-clock and as the CPU time of the stepping thread:
on a shared machine the wall-clock follows the other processes' load, the CPU time only the work
of a step. The run passes when the resident set grows by at most --max-growth-mib from the end of
the first window (allocator and autograd caches settle during it) to the end, and the last
window's median CPU time per step is at most --max-slowdown times the first's. Exit status 1 when
either fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

import kpg

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_BYTES / 2**20


def build(num_agents: int, seed: int):
    torch.manual_seed(seed)
    actors = [nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2)) for _ in range(num_agents)]
    observations = torch.randn(num_agents, 64, 8)
    targets = torch.randn(num_agents, 64, 2)
    optimizer = kpg.KPGOptimizer(actors, k=2, optimizer="adam", lr=1e-3, max_grad_norm=0.5)

    def closure(ctx):
        own = torch.stack([actor(obs) for actor, obs in zip(actors, observations)])
        with ctx.anticipated():
            anticipated = torch.stack([actor(obs) for actor, obs in zip(actors, observations)])
        others = (anticipated.sum(0, keepdim=True) - anticipated) / max(num_agents - 1, 1)
        return ((own + 0.5 * others - targets) ** 2).mean(dim=(1, 2))

    return optimizer, closure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=10_000)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--max-growth-mib", type=float, default=8.0)
    parser.add_argument("--max-slowdown", type=float, default=1.5)
    parser.add_argument("--json", help="write the per-window figures here")
    args = parser.parse_args(argv)
    if args.steps < 2 * args.window or args.window < 1:
        parser.error("--steps must cover at least two windows of --window >= 1 steps")

    torch.set_num_threads(1)
    optimizer, closure = build(args.agents, seed=0)
    windows = []
    started_rss = resident_mib()
    wall: list[float] = []
    cpu: list[float] = []
    for step in range(1, args.steps + 1):
        began, began_cpu = time.perf_counter(), time.thread_time()
        optimizer.step(closure)
        cpu.append(time.thread_time() - began_cpu)
        wall.append(time.perf_counter() - began)
        if step % args.window == 0:
            windows.append(
                {
                    "steps": step,
                    "rss_mib": resident_mib(),
                    "median_step_ms": 1e3 * statistics.median(wall),
                    "median_step_cpu_ms": 1e3 * statistics.median(cpu),
                }
            )
            wall, cpu = [], []
            w = windows[-1]
            print(
                f"step {step:>7}: resident {w['rss_mib']:7.1f} MiB, median step {w['median_step_ms']:.3f} ms wall, "
                f"{w['median_step_cpu_ms']:.3f} ms CPU",
                flush=True,
            )
    first, last = windows[0], windows[-1]
    growth = last["rss_mib"] - first["rss_mib"]
    slowdown = last["median_step_cpu_ms"] / first["median_step_cpu_ms"]
    finite = bool(torch.isfinite(optimizer.arena.param).all())
    report = {
        "steps": args.steps,
        "agents": args.agents,
        "rss_mib_before_first_step": started_rss,
        "rss_mib_after_first_window": first["rss_mib"],
        "rss_mib_at_end": last["rss_mib"],
        "rss_growth_mib": growth,
        "first_window_median_step_ms": first["median_step_ms"],
        "last_window_median_step_ms": last["median_step_ms"],
        "first_window_median_step_cpu_ms": first["median_step_cpu_ms"],
        "last_window_median_step_cpu_ms": last["median_step_cpu_ms"],
        "cpu_slowdown": slowdown,
        "parameters_finite": finite,
        "optimizer_steps": optimizer.stats.steps,
        "windows": windows,
    }
    passed = growth <= args.max_growth_mib and slowdown <= args.max_slowdown and finite
    print(
        f"resident {first['rss_mib']:.1f} -> {last['rss_mib']:.1f} MiB "
        f"({growth:+.1f} MiB, limit {args.max_growth_mib}); "
        f"median step CPU {first['median_step_cpu_ms']:.3f} -> {last['median_step_cpu_ms']:.3f} ms ({slowdown:.2f}x, "
        f"limit {args.max_slowdown}x), wall {first['median_step_ms']:.3f} -> {last['median_step_ms']:.3f} ms; "
        f"{'PASS' if passed else 'FAIL'}"
    )
    if args.json:
        with open(args.json, "w") as file:
            json.dump({**report, "passed": passed}, file, indent=2)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
