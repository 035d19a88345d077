"""Momentum anticipation's price: one MAPPO actor update with kpg at k=1, exact k=2 and momentum k=2
(``KPGOptimizer(anticipation="momentum")``), side by side, from 8 to 2048 agents.

The update, the models, the rollout and the side-by-side timing are bench/agents.py's (its kpg_k1,
kpg_k2 and kpg_mk2 methods, timed call by call in turn by its ``time_side_by_side``); this script
times only these three, so that it finishes on a loaded machine where agents.py's plain-PyTorch
methods (seconds per call at 2048 agents) do not. Target (issue 28): momentum k=2 at most 1.35x
k=1 at every agent count, the floor being one extra forward of the others' terms. With
``--process-time`` (this process's CPU time, for machines shared with other jobs) it also times the
rule alone (predict and record over the arena, no closure), in the same turns: ``rule`` with the
fused kernels the optimizer runs, ``rule_plain`` with the same rule in plain PyTorch ops.

    python bench/anticipation.py [--agents 8 64 512 2048] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kpg import _ops as kernels
from kpg.anticipation import momentum_predict, momentum_record

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agents import (  # noqa: E402
    BUILDERS,
    FULL_AGENTS,
    initial_actor,
    kpg_actor_step,
    log_probs,
    make_rollout,
    pin_malloc_thresholds,
    time_side_by_side,
)
from optimizer import machine_metadata  # noqa: E402

METHODS = ("kpg_k1", "kpg_k2", "kpg_mk2")
TARGET = 1.35  # momentum k=2 / k=1


def process_time_side_by_side(steps: dict, calls: int) -> dict[str, list[float]]:
    """This process's CPU seconds per call, the steps taking turns call by call: on a machine shared
    with other jobs, CPU time is what the other jobs inflate least (wall-clock counts the time the
    process waits for a core)."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(calls):
        for name, step in steps.items():
            started = time.process_time()
            step()
            times[name].append(time.process_time() - started)
    return times


def rule_steps(rollout) -> dict[str, Callable[[], object]]:
    """The momentum rule alone (predict, then record) on the arena of kpg_mk2's optimizer: what
    momentum adds over a k=1 step besides the closure's level-2 work. ``rule``: the fused kernels
    the optimizer runs (torch.ops.kpg.momentum_predict and momentum_record, one pass each);
    ``rule_plain``: the same rule in plain PyTorch ops (kpg.anticipation's reference), on copies."""
    optimizer, _ = kpg_actor_step(rollout, 2, anticipation="momentum")
    arena, rule = optimizer.arena, optimizer.momentum_anticipation
    anticipated = optimizer.agent_state.anticipated

    def fused() -> None:
        kernels.momentum_predict(arena.param, rule.latest, rule.gate, anticipated, rule.base, rule.chunks)
        kernels.momentum_record(
            arena.param,
            rule.base,
            rule.latest,
            rule.latest_sq,
            rule.gate,
            rule.chunk_sums,
            rule.chunks,
            rule.agent_chunks,
        )

    latest, base = rule.latest.clone(), rule.base.clone()
    latest_sq, gate = rule.latest_sq.clone(), rule.gate.clone()

    def plain() -> None:
        momentum_predict(arena.param, latest, gate, anticipated, base, rule.tiling)
        momentum_record(arena.param, base, latest, latest_sq, gate, rule.tiling)

    return {"rule": fused, "rule_plain": plain}


def anticipated_forward(rollout) -> Callable[[], object]:
    """What a momentum k=2 closure must add to k=1's: the forward of every agent's policy at the
    anticipated parameters, gradients off (the closure's ``with ctx.anticipated():`` block). A k=1
    step plus this (plus the rule) is the floor of a momentum k=2 step with this closure."""
    actor = initial_actor(rollout.agents, rollout.device)

    def forward() -> None:
        with torch.no_grad():
            log_probs(actor(rollout.observations), rollout.actions)

    return forward


def run_case(agents: int, min_run_time: float, max_run_time: float, process_calls: int | None) -> dict:
    rollout = make_rollout(agents, torch.device("cpu"))
    steps = {name: BUILDERS[name](rollout) for name in METHODS}
    steps["forward"] = anticipated_forward(rollout)
    if process_calls is not None:
        steps.update(rule_steps(rollout))
        times = process_time_side_by_side(steps, process_calls)
        return _case(agents, {name: statistics.median(t) for name, t in times.items()}, times, None)
    timings = time_side_by_side(steps, min_run_time, max_run_time)
    seconds = {name: timing.median for name, timing in timings.items()}
    others = {name: timing.other_cores for name, timing in timings.items()}
    return _case(agents, seconds, {name: timing.times for name, timing in timings.items()}, others)


def _case(agents: int, seconds: dict, times: dict, others: dict | None) -> dict:
    return {
        "agents": agents,
        "seconds": seconds,
        "samples": {name: len(t) for name, t in times.items()},
        "other_processes_cores": others or {},
        "momentum_k2_over_k1": seconds["kpg_mk2"] / seconds["kpg_k1"],
        "momentum_k2_over_exact_k2": seconds["kpg_mk2"] / seconds["kpg_k2"],
        "exact_k2_over_k1": seconds["kpg_k2"] / seconds["kpg_k1"],
        # k=1 plus the anticipated forward (plus the rule where it was timed), over k=1
        "momentum_k2_floor_over_k1": (seconds["kpg_k1"] + seconds["forward"] + seconds.get("rule", 0.0))
        / seconds["kpg_k1"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", nargs="+", type=int, default=list(FULL_AGENTS), metavar="N")
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--max-run-time", type=float, default=10.0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument(
        "--process-time",
        type=int,
        metavar="CALLS",
        help="time this process's CPU seconds over CALLS calls per method, in turn, instead of wall-clock",
    )
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pin_malloc_thresholds()
    cases = []
    for agents in args.agents:
        print(f"timing {agents} agents ...", file=sys.stderr)
        case = run_case(agents, args.min_run_time, args.max_run_time, args.process_time)
        cases.append(case)
        ms = "  ".join(f"{name} {seconds * 1e3:.2f} ms" for name, seconds in case["seconds"].items())
        print(f"  {ms}; momentum k=2 / k=1 {case['momentum_k2_over_k1']:.2f}", file=sys.stderr)
    clock = "process CPU time" if args.process_time else "wall-clock"
    print(f"\none actor update, ms (median {clock}), cpu, {torch.get_num_threads()} threads; bench/agents.py's update")
    print(
        f"{'agents':>6}  {'kpg k=1':>9}  {'exact k=2':>9}  {'mom. k=2':>9}  {'k2/k1':>6}  {'mk2/k1':>6}  "
        f"{'mk2/k2':>6}  {'rule':>7}  {'plain':>7}  {'forward':>8}  {'floor':>6}  others"
    )
    for case in cases:
        s = case["seconds"]
        busiest = max((c for c in case["other_processes_cores"].values() if c is not None), default=None)
        print(
            f"{case['agents']:>6}  {s['kpg_k1'] * 1e3:9.2f}  {s['kpg_k2'] * 1e3:9.2f}  {s['kpg_mk2'] * 1e3:9.2f}  "
            f"{case['exact_k2_over_k1']:6.2f}  {case['momentum_k2_over_k1']:6.2f}  "
            f"{case['momentum_k2_over_exact_k2']:6.2f}  {s['rule'] * 1e3 if 'rule' in s else float('nan'):7.2f}  "
            f"{s['rule_plain'] * 1e3 if 'rule_plain' in s else float('nan'):7.2f}  "
            f"{s['forward'] * 1e3:8.2f}  {case['momentum_k2_floor_over_k1']:6.2f}  "
            f"{'-' if busiest is None else f'{busiest:.2f}'}"
        )
    for case in cases:
        value = case["momentum_k2_over_k1"]
        verdict = "PASS" if value <= TARGET else "MISS"
        print(f"target momentum k=2 / k=1 <= {TARGET} at {case['agents']} agents: {value:.2f}  {verdict}")
    print(
        "forward: the anticipated forward alone (every agent's policy, gradients off); floor: (k=1 + forward"
        " + rule) / k=1, what a momentum k=2 step with this closure cannot go below"
    )
    print("others: the most cores other processes kept busy while one of the row's steps was timed")
    if args.json:
        meta = machine_metadata(argparse.Namespace(**vars(args), quick=False))
        Path(args.json).write_text(json.dumps({"meta": meta, "cases": cases}, indent=2) + "\n")
    return cases


if __name__ == "__main__":
    main()
