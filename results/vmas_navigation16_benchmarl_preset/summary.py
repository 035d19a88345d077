"""K2 against K1 on VMAS navigation with 16 agents, finished or not: the return at 30 000, 100 000 and
300 000 frames of every run in this folder's runs/ (scripts/benchmarl_vmas.py's definition: the mean
of the three iterations ending at or before that many frames), per seed, paired K2 - K1.

    python results/vmas_navigation16_benchmarl_preset/summary.py > results/vmas_navigation16_benchmarl_preset/summary.md
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "scripts"))
from benchmarl_vmas import at_frames, kpg_run_rows  # noqa: E402

FRAMES = (30_000, 100_000, 300_000)
seeds = sorted({int(p.name.rsplit("-s", 1)[1]) for p in (HERE / "runs").iterdir() if p.is_dir()})
print("| seed | k | frames logged | " + " | ".join(f"return at {f // 1000}k [wall s]" for f in FRAMES) + " |")
print("| --- | --- | ---: | " + " | ".join("---" for _ in FRAMES) + " |")
paired = []
for seed in seeds:
    returns = {}
    for k in ("1", "2"):
        rows = kpg_run_rows(HERE, k, seed)
        points = [at_frames(rows, f) for f in FRAMES]
        returns[k] = [p and p["return"] for p in points]
        cells = ["-" if p is None else f"{p['return']:.2f} [{p['wall']:.0f}]" for p in points]
        print(f"| {seed} | {k} | {int(rows[-1]['frames']) if rows else 0} | " + " | ".join(cells) + " |")
    diffs = [None if a is None or b is None else b - a for a, b in zip(returns["1"], returns["2"])]
    paired.append(f"| {seed} | K2 - K1 | | " + " | ".join("-" if d is None else f"{d:+.2f}" for d in diffs) + " |")
print("\n".join(paired))
