"""K-MAPPO on VMAS in one file: rollout, advantages, the KPG closure with the joint ratio, the critic, logging.

It reads top to bottom, as CleanRL's ``ppo.py`` does, and uses only kpg's public API
(``kpg.KPGOptimizer``, ``kpg.nn.AgentMLP``, ``kpg.joint_ratio_loss``). ``kpg train`` runs the same
algorithm with more options (recurrent policies, shared actors, checkpoints, many environment
families); this file is the algorithm without them.

- Actors: one MLP per agent (no parameter sharing), all agents in one ``kpg.nn.AgentMLP`` call. Each
  outputs the mean and the scale of a Normal over the agent's 2-D force; the scale is state
  dependent (a biased softplus with a floor). Actions are clamped to VMAS's bounds [-1, 1] when
  they reach the environment; the log-probabilities are those of the sampled, unclamped actions.
- Critic: one centralized MLP on every agent's observation, one value per agent, its own Adam.
- KPG: the actors' optimizer is ``kpg.KPGOptimizer(k=...)``. At level 1 the closure is MAPPO's clipped
  surrogate; from level 2 agent i's ratio is multiplied, inside the clip, by the other agents' ratios
  at their anticipated (level l-1) parameters (``kpg.joint_ratio_loss``). ``--k 1`` is MAPPO.

    python examples/kmappo_vmas.py --k 2 --iterations 50     # 300 000 frames of navigation, 3 agents
    python examples/kmappo_vmas.py --k 1 --iterations 50     # MAPPO, same seed
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import vmas
from torch import Tensor, nn
from torch.distributions import Normal

import kpg


@dataclass
class Settings:
    scenario: str = "navigation"
    agents: int = 3
    envs: int = 60  # vectorized VMAS copies
    max_steps: int = 100  # episode length (VMAS truncates there)
    rollout: int = 100  # steps per copy per iteration: frames per iteration = envs * rollout
    iterations: int = 50
    k: int = 2  # KPG levels; 1 is MAPPO
    others: str = "product"  # the others' factor in the joint ratio: "product" or "geometric"
    lr: float = 3e-4
    critic_lr: float = 3e-4
    epochs: int = 4
    minibatches: int = 4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    entropy_coef: float = 0.0
    max_grad_norm: float = 1.0
    hidden: int = 64
    seed: int = 0
    threads: int = 1


def parse_settings(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field in dataclasses.fields(Settings):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    return Settings(**vars(parser.parse_args(argv)))


SCALE_BIAS = 0.5413  # softplus(0.5413) = 1: the scale starts near 1 for a zero pre-activation
MIN_SCALE = 1e-4


def policy_distribution(actor: kpg.nn.AgentMLP, obs: Tensor) -> Normal:
    """Each agent's Normal over its action, ``obs`` [agents, batch, obs_size] -> batch shape [agents, batch, 2]."""
    mean, scale = actor(obs).chunk(2, dim=-1)
    return Normal(mean, F.softplus(scale + SCALE_BIAS) + MIN_SCALE)


class CentralCritic(nn.Module):
    """V_i(s) for every agent i from the joint observation (every agent's observation, concatenated)."""

    def __init__(self, agents: int, obs_size: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(agents * obs_size, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, agents),
        )

    def forward(self, obs: Tensor) -> Tensor:  # [agents, batch, obs_size] -> [agents, batch]
        joint = obs.permute(1, 0, 2).flatten(1)
        return self.net(joint).T


def advantages_and_returns(
    rewards: Tensor, values: Tensor, terminated: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """GAE over [steps, agents, envs]. ``values`` has one more step (the bootstrap); a terminated step
    does not bootstrap. Truncation by the time limit is folded into the reward during the rollout."""
    steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in reversed(range(steps)):
        not_done = 1.0 - terminated[t].to(rewards.dtype)
        delta = rewards[t] + gamma * values[t + 1] * not_done - values[t]
        running = delta + gamma * lam * not_done * running
        advantages[t] = running
    return advantages, advantages + values[:-1]


def train(s: Settings) -> list[dict[str, float]]:
    torch.manual_seed(s.seed)
    torch.set_num_threads(s.threads)
    env = vmas.make_env(
        s.scenario,
        num_envs=s.envs,
        device="cpu",
        continuous_actions=True,
        seed=s.seed,
        n_agents=s.agents,
        max_steps=s.max_steps,
        terminated_truncated=True,
    )
    obs = torch.stack(env.reset())  # [agents, envs, obs_size]
    obs_size, action_size = obs.shape[-1], env.action_space[0].shape[0]

    actor = kpg.nn.AgentMLP(s.agents, obs_size, 2 * action_size, hidden_sizes=(s.hidden, s.hidden))
    critic = CentralCritic(s.agents, obs_size, s.hidden)
    actor_opt = kpg.KPGOptimizer(actor, k=s.k, optimizer="adam", lr=s.lr, max_grad_norm=s.max_grad_norm)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=s.critic_lr)

    episode_return = torch.zeros(s.agents, s.envs)
    log: list[dict[str, float]] = []
    start = time.perf_counter()
    for iteration in range(s.iterations):
        # Rollout: every tensor is [steps, agents, envs, ...].
        buffer = {name: [] for name in ("obs", "actions", "log_prob", "rewards", "terminated", "values")}
        finished_returns: list[Tensor] = []
        for _ in range(s.rollout):
            with torch.no_grad():
                dist = policy_distribution(actor, obs)
                actions = dist.sample()
                log_prob = dist.log_prob(actions).sum(-1)
                values = critic(obs)
            next_obs, rewards, terminated, truncated, _ = env.step(list(actions.clamp(-1.0, 1.0)))
            next_obs, rewards = torch.stack(next_obs), torch.stack(rewards)
            episode_return += rewards
            if truncated.any():
                # A time limit is not a terminal state: bootstrap from the value of the last observation.
                with torch.no_grad():
                    rewards = rewards + s.gamma * critic(next_obs) * (truncated & ~terminated).to(rewards.dtype)
            for name, value in zip(buffer, (obs, actions, log_prob, rewards, terminated, values)):
                buffer[name].append(value)
            done = terminated | truncated
            if done.any():
                finished_returns.append(episode_return[:, done].mean(dim=0))  # per episode, mean over agents
                episode_return[:, done] = 0.0
                for index in done.nonzero().flatten().tolist():
                    reset_obs = env.reset_at(index)
                    next_obs[:, index] = torch.stack(reset_obs)[:, index]
            obs = next_obs
        batch = {name: torch.stack(values) for name, values in buffer.items()}
        with torch.no_grad():
            values = torch.cat([batch["values"], critic(obs).unsqueeze(0)])
        advantages, returns = advantages_and_returns(
            batch["rewards"], values, batch["terminated"], s.gamma, s.gae_lambda
        )

        # Samples: [agents, steps * envs, ...]; a minibatch takes the same transitions for every agent,
        # since agent i's joint ratio needs the others' ratios on the samples it learns from.
        def agents_first(x: Tensor) -> Tensor:
            return x.transpose(0, 1).flatten(1, 2)

        sample_obs, sample_actions = agents_first(batch["obs"]), agents_first(batch["actions"])
        sample_log_prob, sample_advantages = agents_first(batch["log_prob"]), agents_first(advantages)
        sample_returns = agents_first(returns)
        samples = sample_obs.shape[1]
        minibatch_size = samples // s.minibatches
        clip_fractions, actor_losses, critic_losses = [], [], []
        for _ in range(s.epochs):
            order = torch.randperm(samples)
            for first in range(0, minibatch_size * s.minibatches, minibatch_size):
                index = order[first : first + minibatch_size]
                mb_obs, mb_actions, mb_old = sample_obs[:, index], sample_actions[:, index], sample_log_prob[:, index]
                mb_advantages = sample_advantages[:, index]
                mb_advantages = (mb_advantages - mb_advantages.mean(dim=1, keepdim=True)) / (
                    mb_advantages.std(dim=1, keepdim=True) + 1e-8
                )

                def closure(ctx: kpg.KPGContext) -> Tensor:
                    dist = policy_distribution(actor, mb_obs)  # own policies, base parameters
                    anticipated = None
                    if ctx.level > 1:
                        with ctx.anticipated():  # every agent at its level l-1 parameters
                            anticipated = policy_distribution(actor, mb_obs).log_prob(mb_actions).sum(-1)
                    result = kpg.joint_ratio_loss(
                        dist.log_prob(mb_actions).sum(-1),
                        mb_old,
                        mb_advantages,
                        anticipated,
                        level=ctx.level,
                        clip_eps=s.clip_eps,
                        others=s.others,
                    )
                    if ctx.level == ctx.k:
                        clip_fractions.append(result.clip_fraction.mean().item())
                    return result.loss - s.entropy_coef * dist.entropy().sum(-1).mean(dim=1)  # one loss per agent

                actor_losses.append(actor_opt.step(closure).sum().item())

                critic_loss = F.mse_loss(critic(mb_obs), sample_returns[:, index])
                critic_opt.zero_grad()
                critic_loss.backward()
                nn.utils.clip_grad_norm_(critic.parameters(), s.max_grad_norm)
                critic_opt.step()
                critic_losses.append(critic_loss.item())

        frames = (iteration + 1) * s.envs * s.rollout
        row = {
            "iteration": iteration + 1,
            "frames": frames,
            "episode_return": torch.cat(finished_returns).mean().item() if finished_returns else float("nan"),
            "actor_loss": sum(actor_losses) / len(actor_losses),
            "critic_loss": sum(critic_losses) / len(critic_losses),
            "clip_fraction": sum(clip_fractions) / len(clip_fractions),
            "frames_per_second": frames / (time.perf_counter() - start),
        }
        log.append(row)
        print(
            f"iteration {row['iteration']:4d}  frames {frames:8d}  return {row['episode_return']:8.3f}  "
            f"clip {row['clip_fraction']:.3f}  critic {row['critic_loss']:.4f}  fps {row['frames_per_second']:7.0f}"
        )
    return log


if __name__ == "__main__":
    train(parse_settings())
