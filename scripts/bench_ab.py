"""Before/after of a benchmark in one run: ``bench/optimizer.py`` or ``bench/agents.py`` of two
checkouts, each with its own virtual environment (kpg built from that checkout), run alternately
(A B, B A, A B, ...) so that both see the same machine load, then per case and method the median
of the rounds' seconds and the ratio B / A.

    python scripts/bench_ab.py --a /work/main --b . --rounds 3 --bench optimizer -- --cases 512x16384
    python scripts/bench_ab.py --a /work/main --b . --rounds 3 --bench agents -- --agents 8 512 --no-memory

Each checkout runs its own copy of the benchmark (a refactor may change what the benchmark calls;
its methods and cases keep their names). Writes ``--json`` with every round's seconds, the two
commits and the command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def commit_of(tree: Path) -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=tree, capture_output=True, text=True, check=True)
    return head.stdout.strip() + ("+uncommitted changes" if dirty.stdout.strip() else "")


def run_once(tree: Path, bench: str, bench_args: list[str]) -> dict[str, float]:
    """Seconds per (case, method) of one run of ``tree``'s benchmark."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "out.json"
        command = [str(tree / ".venv" / "bin" / "python"), str(tree / "bench" / f"{bench}.py"), *bench_args]
        subprocess.run([*command, "--json", str(out)], cwd=tree, check=True, stdout=subprocess.DEVNULL)
        data = json.loads(out.read_text())
    cases = data["cases"] if isinstance(data, dict) else data
    seconds = {}
    for case in cases:
        name = f"{case['agents']}x{case['params_per_agent']}" if "params_per_agent" in case else str(case["agents"])
        for method, value in case["seconds"].items():
            seconds[f"{name} {method}"] = value
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="the checkout before (with .venv/)")
    parser.add_argument("--b", type=Path, required=True, help="the checkout after (with .venv/)")
    parser.add_argument("--bench", choices=("optimizer", "agents"), required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: the benchmark's own arguments")
    args = parser.parse_args(argv)
    bench_args = [a for a in args.bench_args if a != "--"]
    trees = {"a": args.a.resolve(), "b": args.b.resolve()}
    for tree in trees.values():
        if not (tree / ".venv" / "bin" / "python").exists():
            parser.error(f"{tree} has no .venv/bin/python with kpg built from it")
    rounds: dict[str, list[dict[str, float]]] = {"a": [], "b": []}
    for round_index in range(args.rounds):
        order = ("a", "b") if round_index % 2 == 0 else ("b", "a")
        for side in order:
            print(f"round {round_index}: {side} ({trees[side]})", file=sys.stderr, flush=True)
            rounds[side].append(run_once(trees[side], args.bench, bench_args))
    keys = [k for k in rounds["a"][0] if all(k in r for side in rounds.values() for r in side)]
    table = {}
    print(f"{'case method':<40} {'A ms':>10} {'B ms':>10} {'B / A':>7}  B/A per round")
    for key in keys:
        a = [r[key] for r in rounds["a"]]
        b = [r[key] for r in rounds["b"]]
        per_round = [y / x for x, y in zip(a, b)]
        table[key] = {"a_seconds": a, "b_seconds": b, "ratio_of_medians": statistics.median(b) / statistics.median(a)}
        print(
            f"{key:<40} {1e3 * statistics.median(a):10.3f} {1e3 * statistics.median(b):10.3f} "
            f"{table[key]['ratio_of_medians']:7.3f}  " + " ".join(f"{r:.2f}" for r in per_round)
        )
    if args.json:
        meta = {
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "a": {"tree": str(trees["a"]), "commit": commit_of(trees["a"])},
            "b": {"tree": str(trees["b"]), "commit": commit_of(trees["b"])},
            "bench": args.bench,
            "bench_args": bench_args,
            "rounds": args.rounds,
        }
        args.json.write_text(json.dumps({"meta": meta, "table": table}, indent=2))


if __name__ == "__main__":
    main()
