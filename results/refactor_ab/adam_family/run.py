"""c2d3e24's regrouped Adam-family math against the build before it: the same short runs with the installed
kpg._C or with the extension file given (swapped in before kpg is imported), every result saved to compare."""

import importlib.util
import sys
from pathlib import Path

if sys.argv[1] == "compare":  # run.py compare OLD NEW: how many cases differ in any bit
    import torch

    old, new = (torch.load(f"{folder}/params.pt") for folder in sys.argv[2:4])
    differ = [case for case in old if not all(map(torch.equal, old[case], new[case]))]
    print(f"{len(old)} cases, {len(differ)} differ bitwise: {differ}")
    sys.exit(0)
so, out = sys.argv[1], sys.argv[2]
if so != "installed":
    spec = importlib.util.spec_from_file_location("kpg._C", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["kpg._C"] = module
import torch  # noqa: E402

import kpg  # noqa: E402

print("extension:", sys.modules["kpg._C"].__file__)
torch.set_num_threads(1)
results = {}
cases = [
    ("adam", {}),
    ("adam", {"amsgrad": True}),
    ("adamw", {}),
    ("nadam", {}),
    ("nadam", {"decoupled_weight_decay": True}),
    ("radam", {}),
    ("radam", {"decoupled_weight_decay": True}),
]
for name, extra in cases:
    for dtype in (torch.float32, torch.float64):
        for k in (1, 2, 3):
            torch.manual_seed(0)
            agents = kpg.nn.AgentMLP(5, 7, 3, hidden_sizes=(33,)).to(dtype)
            x = torch.randn(5, 64, 7, dtype=dtype)
            opt = kpg.KPGOptimizer(agents, k=k, optimizer=name, lr=3e-3, weight_decay=0.01, **extra)

            def closure(ctx):
                own = agents(x)
                if ctx.level == 1:
                    return own.pow(2).sum(dim=(1, 2))
                with ctx.anticipated():
                    others = agents(x)
                return own.pow(2).sum(dim=(1, 2)) + (own * others.roll(1, dims=0)).sum(dim=(1, 2))

            for _ in range(30):
                opt.step(closure)
            results[f"{name}{extra}-{dtype}-k{k}"] = [p.detach().clone() for p in agents.parameters()]
Path(out).mkdir(parents=True, exist_ok=True)
torch.save(results, f"{out}/params.pt")
print(len(results), "cases")
