"""CPU seconds per KPGOptimizer step (Adam, MAPPO-like closure) for A/B across two kpg checkouts.

python step_cost.py AGENTS K raise|skip|propagate     one measurement with the installed kpg
python step_cost.py --ab OLD_TREE [--rounds N]        interleaved A/B: OLD_TREE holds another
    kpg package (its Python files and built kpg/_C*.so); every round runs each configuration
    once with the old and once with the installed kpg, one after the other, then the medians
    and the range over the rounds are printed
"""

import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [(64, 1), (64, 2), (512, 1), (512, 2)]
# The old tree's kpg in place of the installed (editable) one: its finder is dropped from sys.meta_path.
OLD_BOOTSTRAP = (
    "import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if 'ScikitBuild' not in type(f).__name__]; "
    "sys.path.insert(0, {tree!r}); sys.argv = [{script!r}, *sys.argv[1:]]; "
    "runpy.run_path({script!r}, run_name='__main__')"
)


def measure(agents: int, k: int, nonfinite: str) -> float:
    import torch
    from torch.distributions import Categorical

    import kpg

    torch.set_num_threads(1)
    torch.manual_seed(0)
    actor = kpg.nn.AgentMLP(agents, 16, 5, hidden_sizes=(64, 64))
    opt = kpg.KPGOptimizer(actor, k=k, optimizer="adam", lr=3e-4, nonfinite=nonfinite)
    obs = torch.randn(agents, 256, 16)
    actions = torch.randint(0, 5, (agents, 256))
    adv = torch.randn(agents, 256)
    with torch.no_grad():
        old = Categorical(logits=actor(obs)).log_prob(actions)

    def closure(ctx):
        lp = Categorical(logits=actor(obs)).log_prob(actions)
        ant = None
        if ctx.level > 1:
            with ctx.anticipated():
                ant = Categorical(logits=actor(obs)).log_prob(actions)
        return kpg.joint_ratio_loss(lp, old, adv, ant, level=ctx.level, others="geometric").loss

    for _ in range(5):
        opt.step(closure)
    n = 40 if agents <= 64 else 8
    t = time.process_time()
    for _ in range(n):
        opt.step(closure)
    return (time.process_time() - t) / n * 1e3


def run(command: list[str]) -> float:
    return float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])


def ab(old_tree: str, rounds: int) -> None:
    script = str(Path(__file__).resolve())
    old = [sys.executable, "-c", OLD_BOOTSTRAP.format(tree=old_tree, script=script)]
    new = [sys.executable, script]
    variants = {"old raise": (old, "raise"), "new raise": (new, "raise"), "new skip": (new, "skip")}
    results = {(config, name): [] for config in CONFIGS for name in variants}
    for round_ in range(rounds):
        for config in CONFIGS:
            for name, (command, nonfinite) in variants.items():
                value = run([*command, str(config[0]), str(config[1]), nonfinite])
                results[config, name].append(value)
                print(f"round {round_ + 1}: {config[0]} agents, k={config[1]}, {name}: {value:.2f}", file=sys.stderr)
    print("| agents | k | " + " | ".join(f"{name}: median (min-max)" for name in variants) + " | new/old raise |")
    print("| ---: | ---: | " + " | ".join("---:" for _ in variants) + " | ---: |")
    for config in CONFIGS:
        cells = []
        for name in variants:
            values = results[config, name]
            cells.append(f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})")
        ratios = [n / o for n, o in zip(results[config, "new raise"], results[config, "old raise"])]
        ratio = f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
        print(f"| {config[0]} | {config[1]} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    if sys.argv[1] == "--ab":
        rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 5
        ab(sys.argv[2], rounds)
    else:
        print(f"{measure(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]):.2f}")
