"""MAPPO-style KPG (K-MAPPO): the joint-ratio clipped surrogate with a shared actor.

A one-shot coordination game: N agents each pick one of several actions and the team is rewarded
only when all pick the same one. One actor network is shared by all agents and sees a one-hot
agent id (the authors' K-MAPPO setting). Every round collects a batch with the current policy
(its log-probabilities are the stored pi_old), then runs PPO epochs in which each minibatch is one
KPG step. At level 1 the surrogate is plain MAPPO; from level 2 agent i's ratio is multiplied,
inside the clip, by the other agents' anticipated ratios (``kpg.joint_ratio_loss``, computed in
O(agents) from log-ratios). The script trains k=1 and k=2 from the same seed and prints the
probability that the agents coordinate, and the share of clipped samples per level.

    python examples/mappo_joint_ratio.py --agents 3 --rounds 20
"""

import argparse

import torch
from torch import nn
from torch.distributions import Categorical

import kpg


def coordination_probability(logits: torch.Tensor) -> float:
    """P(all agents pick the same action) under independent policies, logits [agents, actions]."""
    return torch.softmax(logits, dim=-1).prod(dim=0).sum().item()


def train(k: int, num_agents: int, num_actions: int, rounds: int, batch: int, epochs: int, minibatches: int, seed: int):
    torch.manual_seed(seed)
    actor = nn.Sequential(nn.Linear(num_agents, 32), nn.Tanh(), nn.Linear(32, num_actions))
    agent_ids = torch.eye(num_agents)  # [agents, agents]: each agent's observation is its id
    optimizer = kpg.KPGOptimizer(
        actor, k=k, optimizer="adam", lr=3e-3, max_grad_norm=0.5, num_agents=num_agents, eps=1e-5
    )
    clip_fractions: dict[int, list[float]] = {}
    curve = []
    for _ in range(rounds):
        with torch.no_grad():
            policy = Categorical(logits=actor(agent_ids).unsqueeze(1).expand(num_agents, batch, num_actions))
            actions = policy.sample()  # [agents, batch]
            old_log_prob = policy.log_prob(actions)
            reward = (actions == actions[:1]).all(dim=0).float()  # [batch]: 1 when all agree
            advantages = (reward - reward.mean()) / (reward.std() + 1e-8)
        for _ in range(epochs):
            for rows in torch.randperm(batch).chunk(minibatches):

                def closure(ctx):
                    logits = actor(agent_ids).unsqueeze(1).expand(num_agents, len(rows), num_actions)
                    log_prob = Categorical(logits=logits).log_prob(actions[:, rows])
                    anticipated_log_prob = None
                    if ctx.level > 1:  # at level 1 the surrogate is plain MAPPO
                        with ctx.anticipated():
                            anticipated_logits = actor(agent_ids).unsqueeze(1).expand_as(logits)
                            anticipated_log_prob = Categorical(logits=anticipated_logits).log_prob(actions[:, rows])
                    result = kpg.joint_ratio_loss(
                        log_prob,
                        old_log_prob[:, rows],
                        advantages[rows],
                        anticipated_log_prob,
                        level=ctx.level,
                        clip_eps=0.2,
                    )
                    clip_fractions.setdefault(ctx.level, []).append(result.clip_fraction.mean().item())
                    return result.loss  # one loss per agent

                optimizer.step(closure)
        with torch.no_grad():
            curve.append(coordination_probability(actor(agent_ids)))
    return curve, {level: sum(v) / len(v) for level, v in clip_fractions.items()}, optimizer.stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--actions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(f"P(all {args.agents} agents coordinate) after each round, mean over {args.seeds} seeds")
    results = {}
    for k in (1, 2):
        runs = [
            train(k, args.agents, args.actions, args.rounds, args.batch, args.epochs, args.minibatches, seed)
            for seed in range(args.seeds)
        ]
        curve = [sum(run[0][r] for run in runs) / len(runs) for r in range(args.rounds)]
        clip = {level: sum(run[1][level] for run in runs) / len(runs) for level in runs[0][1]}
        results[k] = (curve, clip, runs[-1][2])
    print(f"{'round':>6}{'k=1':>10}{'k=2':>10}")
    for r in sorted({0, args.rounds // 4, args.rounds // 2, args.rounds - 1}):
        print(f"{r + 1:>6}{results[1][0][r]:>10.3f}{results[2][0][r]:>10.3f}")
    for k, (_, clip, _stats) in results.items():
        shares = ", ".join(f"level {level}: {100 * share:.1f}%" for level, share in sorted(clip.items()))
        print(f"k={k}: clipped samples {shares}")
    print(f"\nk=2 step-time split, last seed (seconds):\n{results[2][2].summary()}")


if __name__ == "__main__":
    main()
