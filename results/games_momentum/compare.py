"""The games study's k=1, exact k=2 and momentum k=2 side by side: reads exact/results.json and
momentum/results.json beside this file and prints a Markdown table of the best share per game and
optimizer (its 95 % interval and learning rate) and the median CPU time per KPG step.

    python results/games_momentum/compare.py
"""

import json
import statistics
from pathlib import Path

here = Path(__file__).parent
exact = json.loads((here / "exact" / "results.json").read_text())
momentum = json.loads((here / "momentum" / "results.json").read_text())


def best(results, k):
    return {(b["game"], b["optimizer"]): b for b in results["best"] if b["k"] == k}


def cell(b):
    low, high = b["share_ci95"]
    return f"{b['share']:.2f} [{low:.2f}, {high:.2f}] ({b['lr']:g})"


columns = {"k=1": best(exact, 1), "exact k=2": best(exact, 2), "momentum k=2": best(momentum, 2)}
print("| game | optimizer | " + " | ".join(f"{name}: share (lr)" for name in columns) + " |")
print("| --- | --- | " + " | ".join("---" for _ in columns) + " |")
for game, optimizer in columns["k=1"]:
    print(f"| {game} | {optimizer} | " + " | ".join(cell(c[(game, optimizer)]) for c in columns.values()) + " |")


def cpu_ms(results, k):
    cells = {(r["game"], r["optimizer"]): r["cpu_seconds_per_step"] for r in results["rows"] if r["k"] == k}
    return 1e3 * statistics.median(cells.values())


print()
print(
    f"median CPU ms per KPG step over the cells: k=1 {cpu_ms(exact, 1):.2f}, exact k=2 {cpu_ms(exact, 2):.2f}, "
    f"momentum k=2 {cpu_ms(momentum, 2):.2f}"
)
