"""CPU seconds per KPGOptimizer step (Adam, MAPPO-like closure) for A/B across two kpg checkouts."""

import sys
import time

import torch
from torch.distributions import Categorical

import kpg

torch.set_num_threads(1)
agents, k, nonfinite = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
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
print(f"{(time.process_time() - t) / n * 1e3:.2f}")
