"""What nonfinite="raise" adds to a commit, alone: the probe before it (this code) against a backup
before it and a scan after it (the code before; re-enacted here with the same tensor ops), and the
bare commit, over the arena of an Adam optimizer on an AgentMLP 16-64-64-5, side by side.

Each repetition times the three, in turn, on the same buffers (CPU time of this process, so a
loaded machine's other jobs count less); the medians and ranges over the repetitions are printed.
The gradient is small, so repeated commits stay finite.

    python bench/checked_commit.py [--agents 64 512] [--repetitions 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kpg
from kpg import _ops as ops


def commit_with_backup(state, arguments, backups) -> None:
    """The former check: copy parameters and state, commit, scan everything for inf or NaN."""
    buffers = [arguments["param"], *(b for b in state.state_buffers.values() if b is not None)]
    for backup, buffer in zip(backups, buffers):
        backup.copy_(buffer)
    step, live = state.step.clone(), state.live.clone()
    ops.UPDATE_OPS[(state.kernel.name, True)](**arguments)
    if not bool(torch.stack([torch.isfinite(buffer).all() for buffer in buffers]).all()):
        raise AssertionError("the benchmark's commit overflowed")
    del step, live


def commit_with_probe(state, arguments, piece_agent, piece_flags, agent_flags) -> None:
    """This code's check: the probe, its flags per agent read on the host, then the commit."""
    ops.PROBE_OPS[state.kernel.name](**arguments, nonfinite=piece_flags)
    flags = agent_flags.zero_().scatter_reduce_(0, piece_agent, piece_flags, "amax")
    if flags.nonzero().flatten().tolist():
        raise AssertionError("the benchmark's commit overflowed")
    ops.UPDATE_OPS[(state.kernel.name, True)](**arguments)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--repetitions", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        "| agents | elements | bare commit, ms | probe + commit, ms | backup + commit + scan, ms | "
        "probe's cost / backup's cost |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for agents in args.agents:
        torch.manual_seed(0)
        actor = kpg.nn.AgentMLP(agents, 16, 5, hidden_sizes=(64, 64))
        opt = kpg.KPGOptimizer(actor, k=1, optimizer="adam", lr=3e-4)
        opt.step(lambda ctx: actor(torch.randn(agents, 8, 16)).square().mean(dim=(1, 2)))
        state, arena = opt.agent_state, opt.arena
        arena.grad.normal_(std=1e-3)
        arguments = state.update_arguments(True)
        arguments["grad_scale"] = arguments["skip"] = None
        backups = [arena.new_buffer() for b in (arena.param, *state.state_buffers.values()) if b is not None]
        piece_flags = torch.zeros(arena.num_pieces, dtype=torch.uint8)
        agent_flags = torch.zeros(arena.num_agents, dtype=torch.uint8)
        variants = {
            "bare": lambda: ops.UPDATE_OPS[(state.kernel.name, True)](**arguments),
            "probe": lambda: commit_with_probe(state, arguments, arena.piece_agent, piece_flags, agent_flags),
            "backup": lambda: commit_with_backup(state, arguments, backups),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(3):
            for run in variants.values():
                run()
        for _ in range(args.repetitions):
            for name, run in variants.items():
                started = time.process_time()
                run()
                times[name].append((time.process_time() - started) * 1e3)

        def cell(name: str) -> str:
            values = times[name]
            return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"

        bare = statistics.median(times["bare"])
        ratio = (statistics.median(times["probe"]) - bare) / (statistics.median(times["backup"]) - bare)
        print(f"| {agents} | {arena.numel} | {cell('bare')} | {cell('probe')} | {cell('backup')} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
