"""Critic-style KPG (MADDPG / FACMAC): agents coordinate through a centralized critic.

Each agent's deterministic actor outputs an action; the team is rewarded when the sum of all
actions hits a target that depends on the shared state. Agent i's loss reads the critic at the
joint action in which slot i is its own action (base parameters, with gradient) and every other
slot the anticipated action of level l-1: ``kpg.joint_inputs`` builds that batch for all agents
at once. The script trains with k=1 and k=2 from the same seed and prints the team error and
where the step time went. A step that makes the loss non-finite is rolled back and reported.

    python examples/critic_coupling.py --agents 4 --steps 60
"""

import argparse

import torch
from torch import nn

import kpg


def make_problem(num_agents: int, seed: int):
    torch.manual_seed(seed)
    obs_dims = [4 + a % 3 for a in range(num_agents)]  # agents may differ in observation size
    actors = [nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 1)) for d in obs_dims]
    state = torch.randn(256, 4)
    observations = [torch.cat([state, torch.randn(256, d - 4)], dim=1) for d in obs_dims]
    target = state.sum(dim=1, keepdim=True)
    return actors, observations, target


def critic(joint_actions: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The team's value of a joint action, [..., batch, agents] -> [..., batch]: a known critic
    here, a learned Q network in MADDPG."""
    return -(joint_actions.sum(dim=-1, keepdim=True) - target).square().squeeze(-1)


def train(k: int, num_agents: int, steps: int, lr: float, seed: int) -> list[float]:
    actors, observations, target = make_problem(num_agents, seed)
    optimizer = kpg.KPGOptimizer(actors, k=k, optimizer="sgd", lr=lr)

    def closure(ctx):
        own = [actor(obs) for actor, obs in zip(actors, observations)]
        with ctx.anticipated():
            anticipated = [actor(obs) for actor, obs in zip(actors, observations)]
        joint = kpg.joint_inputs(own, anticipated)  # [agents, batch, agents]: slot i is agent i's own
        return -critic(joint, target).mean(dim=1)  # one loss per agent

    errors: list[float] = []
    for _ in range(steps):
        try:
            optimizer.step(closure)
        except FloatingPointError as error:  # kpg rolled the step back and names the agent
            print(f"k={k} stopped at step {len(errors) + 1}: {error}")
            return errors + [float("inf")] * (steps - len(errors))
        with torch.no_grad():
            joint = torch.cat([actor(obs) for actor, obs in zip(actors, observations)], dim=1)
            errors.append(-critic(joint, target).mean().item())
    print(f"k={k} step-time split (seconds over {steps} steps):\n{optimizer.stats.summary()}\n")
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    curves = {k: train(k, args.agents, args.steps, args.lr, args.seed) for k in (1, 2)}
    print(
        f"team error (mean squared distance of the action sum from the target), {args.agents} agents, SGD lr {args.lr}"
    )
    print(f"{'step':>6}{'k=1':>14}{'k=2':>14}")
    for step in sorted({0, args.steps // 4, args.steps // 2, args.steps - 1}):
        print(f"{step + 1:>6}{curves[1][step]:>14.4f}{curves[2][step]:>14.4f}")


if __name__ == "__main__":
    main()
