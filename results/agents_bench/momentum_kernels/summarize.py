"""The table of README.md from the three runs' JSON: per agent count the median over runs of each
method's median, and of each ratio (with its range over the runs)."""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
runs = [json.loads((HERE / f"anticipation_cpu_run{i}.json").read_text()) for i in (1, 2, 3)]
print(
    "| agents | kpg k=1 | exact k=2 | momentum k=2 | exact k=2 / k=1 | momentum k=2 / k=1 | momentum / exact k=2 "
    "| rule, fused kernels | rule, plain PyTorch ops |"
)
print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for index, case in enumerate(runs[0]["cases"]):

    def milliseconds(method: str) -> float:
        return statistics.median(run["cases"][index]["seconds"][method] for run in runs) * 1e3

    def ratio(key: str) -> str:
        values = sorted(run["cases"][index][key] for run in runs)
        return f"{statistics.median(values):.2f} ({values[0]:.2f}-{values[-1]:.2f})"

    print(
        f"| {case['agents']} | {milliseconds('kpg_k1'):.2f} | {milliseconds('kpg_k2'):.2f} | "
        f"{milliseconds('kpg_mk2'):.2f} | {ratio('exact_k2_over_k1')} | {ratio('momentum_k2_over_k1')} | "
        f"{ratio('momentum_k2_over_exact_k2')} | {milliseconds('rule'):.2f} | {milliseconds('rule_plain'):.2f} |"
    )
