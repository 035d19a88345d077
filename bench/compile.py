"""Compile benchmark: what does torch.compile buy a kpg step on the CPU, and where may it go?

``KPGOptimizer.step`` runs eagerly under torch.compile (its levels rebind the parameters, which a
graph cannot capture; docs/optimizer.md), so what can be compiled is the closure or the model it
calls. This script times one K-MAPPO actor update of bench/agents.py (AgentMLP 16-64-64-5 tanh, 256
samples per agent, Adam, float32, k=2, the own-policy forward reused through ctx.at_base) three
ways, side by side (call by call, in turn, round after round: agents.time_side_by_side):

    eager             the closure and the model as written
    compiled_closure  torch.compile(closure): Dynamo breaks the graph where ctx.anticipated() is
                      entered and left and compiles the pieces between
    compiled_model    torch.compile(actor) called inside the eager closure

Every method starts from the same weights and is warmed up (compiled) before timing; compile time
is reported separately. Run ``python bench/compile.py`` (``--agents 64 512``, ``--backend`` to pick
torch.compile's backend, default inductor; ``--quick`` for a smoke run; ``--json PATH`` for
machine-readable results).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agents import agent_losses, initial_actor, log_probs, make_rollout, time_side_by_side  # noqa: E402
from optimizer import machine_metadata  # noqa: E402

import kpg  # noqa: E402

LEARNING_RATE = 1e-4
WARMUP_STEPS = 3
METHODS = ("eager", "compiled_closure", "compiled_model")


def build(method: str, rollout, backend: str):
    actor = initial_actor(rollout.agents, rollout.device)
    optimizer = kpg.KPGOptimizer(actor, k=2, optimizer="adam", lr=LEARNING_RATE)
    forward = torch.compile(actor, backend=backend) if method == "compiled_model" else actor

    def closure(ctx: kpg.KPGContext) -> torch.Tensor:
        log_prob = ctx.at_base(lambda: log_probs(forward(rollout.observations), rollout.actions))
        anticipated_log_prob = None
        if ctx.level > 1:
            with ctx.anticipated():
                anticipated_log_prob = log_probs(forward(rollout.observations), rollout.actions)
        return agent_losses(rollout, log_prob, anticipated_log_prob, ctx.level)

    if method == "compiled_closure":
        closure = torch.compile(closure, backend=backend)
    started = time.perf_counter()
    for _ in range(WARMUP_STEPS):
        optimizer.step(closure)
    return (lambda: optimizer.step(closure)), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--min-run-time", type=float, default=2.0)
    parser.add_argument("--max-run-time", type=float, default=8.0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 agents, short timings")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.agents, args.min_run_time, args.max_run_time = [4], 0.01, 0.1
    device = torch.device("cpu")
    cases = []
    for agents in args.agents:
        rollout = make_rollout(agents, device)
        steps, warmup = {}, {}
        for method in METHODS:
            steps[method], warmup[method] = build(method, rollout, args.backend)
        timings = time_side_by_side(steps, args.min_run_time, args.max_run_time)
        eager = timings["eager"].median
        print(f"{agents} agents, k=2, backend {args.backend}:")
        for method in METHODS:
            t = timings[method]
            print(
                f"  {method:<17} {t.median * 1e3:9.2f} ms (iqr {t.iqr * 1e3:.2f}, {len(t.times)} calls)  "
                f"eager / this {eager / t.median:5.2f}  warm-up with compilation {warmup[method]:6.1f} s  "
                f"other processes {t.other_cores if t.other_cores is not None else float('nan'):.2f} cores"
            )
        cases.append(
            {
                "agents": agents,
                "seconds": {m: timings[m].median for m in METHODS},
                "iqr_seconds": {m: timings[m].iqr for m in METHODS},
                "warmup_seconds": warmup,
                "other_processes_cores": {m: timings[m].other_cores for m in METHODS},
            }
        )
        torch._dynamo.reset()
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_metadata(args), "backend": args.backend, "cases": cases}))


if __name__ == "__main__":
    main()
