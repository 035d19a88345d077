"""TorchRL's multi-agent PPO on VMAS with the actor's Adam swapped for KPGOptimizer (K-MAPPO).

The loop of TorchRL's multi-agent PPO tutorial (VmasEnv with RewardSum, a shared-parameter
MultiAgentMLP actor with a TanhNormal head, a centralised MultiAgentMLP critic, its collector
(``Collector``, formerly ``SyncDataCollector``),
a replay buffer sampled without replacement, ClipPPOLoss with GAE), with two changes a TorchRL user
makes for K-level policy gradients (docs/vmas.md shows them as a diff):

1. the actor and the critic get their own optimizers (KPG steps only the agents' policies) and their
   gradients are clipped each on its own, as KPGOptimizer's ``max_grad_norm`` clips the actor's;
2. the actor's ``torch.optim.Adam`` becomes ``kpg.KPGOptimizer(k=2)``, whose ``step`` calls a
   closure once per level. From level 2 the closure evaluates the policy inside ``ctx.anticipated()``
   (every agent at its level l-1 parameters) and hands ClipPPOLoss the other agents' anticipated
   log-ratio through the stored log-probabilities: with ``old_i - sum_{j != i} (log pi_j^(l-1) -
   old_j)`` in their place, ClipPPOLoss's ratio is agent i's joint ratio ``r_i * prod_{j != i}
   r_j^(l-1)``, clipped as a whole (the K-MAPPO surrogate of docs/KPG.md), with the gradient only
   through agent i's own term.

``--optimizer adam`` runs the same loop with ``torch.optim.Adam`` for the actor; with ``--k 1`` the
KPG loop computes the same parameters (tests/test_torchrl_example.py).

    python examples/torchrl_mappo.py --k 2 --iterations 10
    python examples/torchrl_mappo.py --optimizer adam --iterations 10
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from tensordict.nn import TensorDictModule
from tensordict.nn.distributions import NormalParamExtractor
from torchrl.collectors import Collector
from torchrl.data.replay_buffers import ReplayBuffer
from torchrl.data.replay_buffers.samplers import SamplerWithoutReplacement
from torchrl.data.replay_buffers.storages import LazyTensorStorage
from torchrl.envs import RewardSum, TransformedEnv
from torchrl.envs.libs.vmas import VmasEnv
from torchrl.modules import MultiAgentMLP, ProbabilisticActor, TanhNormal
from torchrl.objectives import ClipPPOLoss, ValueEstimators

import kpg


@dataclass
class Settings:
    """The tutorial's hyperparameters (its defaults, except a smaller batch for a 2-core CPU)."""

    scenario: str = "navigation"
    agents: int = 3
    max_steps: int = 100  # episode steps before done
    envs: int = 60  # vectorized VMAS copies; frames per batch = envs * max_steps
    iterations: int = 10
    epochs: int = 30
    minibatch_size: int = 400
    lr: float = 3e-4
    max_grad_norm: float = 1.0
    clip_epsilon: float = 0.2
    gamma: float = 0.99
    lmbda: float = 0.9
    entropy_eps: float = 1e-4
    cells: int = 256
    seed: int = 0


def build(settings: Settings):
    """The tutorial's environment, policy, critic, collector, replay buffer and loss."""
    torch.manual_seed(settings.seed)
    frames_per_batch = settings.envs * settings.max_steps
    env = VmasEnv(
        scenario=settings.scenario,
        num_envs=settings.envs,
        continuous_actions=True,
        max_steps=settings.max_steps,
        seed=settings.seed,
        n_agents=settings.agents,
    )
    env = TransformedEnv(env, RewardSum(in_keys=[env.reward_key], out_keys=[("agents", "episode_reward")]))
    observations = env.observation_spec["agents", "observation"].shape[-1]
    actions = env.full_action_spec_unbatched[env.action_key].shape[-1]
    policy_net = torch.nn.Sequential(
        MultiAgentMLP(
            n_agent_inputs=observations,
            n_agent_outputs=2 * actions,
            n_agents=env.n_agents,
            centralised=False,
            share_params=True,
            depth=2,
            num_cells=settings.cells,
            activation_class=torch.nn.Tanh,
        ),
        NormalParamExtractor(),
    )
    policy_module = TensorDictModule(
        policy_net, in_keys=[("agents", "observation")], out_keys=[("agents", "loc"), ("agents", "scale")]
    )
    action_space = env.full_action_spec_unbatched[env.action_key].space
    policy = ProbabilisticActor(
        module=policy_module,
        spec=env.full_action_spec_unbatched,
        in_keys=[("agents", "loc"), ("agents", "scale")],
        out_keys=[env.action_key],
        distribution_class=TanhNormal,
        distribution_kwargs={"low": action_space.low, "high": action_space.high},
        return_log_prob=True,
        log_prob_key=("agents", "sample_log_prob"),
    )
    critic_net = MultiAgentMLP(
        n_agent_inputs=observations,
        n_agent_outputs=1,
        n_agents=env.n_agents,
        centralised=True,
        share_params=True,
        depth=2,
        num_cells=settings.cells,
        activation_class=torch.nn.Tanh,
    )
    critic = TensorDictModule(critic_net, in_keys=[("agents", "observation")], out_keys=[("agents", "state_value")])
    collector = Collector(
        env,
        policy,
        frames_per_batch=frames_per_batch,
        total_frames=frames_per_batch * settings.iterations,
    )
    replay_buffer = ReplayBuffer(
        storage=LazyTensorStorage(frames_per_batch),
        sampler=SamplerWithoutReplacement(),
        batch_size=settings.minibatch_size,
    )
    loss_module = ClipPPOLoss(
        actor_network=policy,
        critic_network=critic,
        clip_epsilon=settings.clip_epsilon,
        entropy_coeff=settings.entropy_eps,
        normalize_advantage=False,
    )
    loss_module.set_keys(
        reward=env.reward_key,
        action=env.action_key,
        sample_log_prob=("agents", "sample_log_prob"),
        value=("agents", "state_value"),
    )
    loss_module.make_value_estimator(ValueEstimators.GAE, gamma=settings.gamma, lmbda=settings.lmbda)
    return env, policy, critic, collector, replay_buffer, loss_module


def anticipated_log_prob_key(data, policy, ctx):
    """The stored log-probabilities that make ClipPPOLoss's ratio agent i's joint ratio at this level:
    ``old_i`` minus the other agents' anticipated log-ratios (their level l-1 policies, no gradient)."""
    old = data.get(("agents", "sample_log_prob"))  # [batch, agents]
    with ctx.anticipated():
        anticipated = policy.get_dist(data).log_prob(data.get(("agents", "action")))
    log_ratio = anticipated - old
    others = log_ratio.sum(-1, keepdim=True) - log_ratio
    joint = data.clone(False)
    joint.set(("agents", "sample_log_prob"), old - others)
    return joint


def train(settings: Settings, k: int | None) -> dict:
    """Trains for ``settings.iterations``; ``k=None`` steps the actor with torch.optim.Adam, else
    with KPGOptimizer(k). Returns the final parameters and the mean episode reward per iteration."""
    env, policy, critic, collector, replay_buffer, loss_module = build(settings)
    if k is None:
        actor_optim = torch.optim.Adam(policy.parameters(), settings.lr)
    else:
        actor_optim = kpg.KPGOptimizer(
            policy.parameters(), k=k, optimizer="adam", lr=settings.lr, max_grad_norm=settings.max_grad_norm
        )
    critic_optim = torch.optim.Adam(critic.parameters(), settings.lr)
    rewards = []
    for data in collector:
        # VMAS's done flags are the copy's: expanded over the agents, as the value estimator expects.
        for key in ("done", "terminated"):
            expanded = data.get(("next", key)).unsqueeze(-1).expand(data.get(("next", env.reward_key)).shape)
            data.set(("next", key), expanded)
        with torch.no_grad():
            loss_module.value_estimator(
                data, params=loss_module.critic_network_params, target_params=loss_module.target_critic_network_params
            )
        replay_buffer.extend(data.reshape(-1))
        for _ in range(settings.epochs):
            for _ in range(data.numel() // settings.minibatch_size):
                subdata = replay_buffer.sample()
                if k is None:
                    loss_vals = loss_module(subdata)
                    actor_optim.zero_grad()
                    (loss_vals["loss_objective"] + loss_vals["loss_entropy"]).backward()
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), settings.max_grad_norm)
                    actor_optim.step()
                else:
                    critic_losses = []

                    def closure(ctx, subdata=subdata, critic_losses=critic_losses):
                        joint = subdata if ctx.level == 1 else anticipated_log_prob_key(subdata, policy, ctx)
                        loss_vals = loss_module(joint)
                        critic_losses.append(loss_vals["loss_critic"])
                        return loss_vals["loss_objective"] + loss_vals["loss_entropy"]

                    actor_optim.step(closure)
                    loss_vals = {"loss_critic": critic_losses[0]}  # level 1's: the critic's loss is plain MAPPO's
                critic_optim.zero_grad()
                loss_vals["loss_critic"].backward()
                torch.nn.utils.clip_grad_norm_(critic.parameters(), settings.max_grad_norm)
                critic_optim.step()
        collector.update_policy_weights_()
        done = data.get(("next", "done"))
        episode_reward = data.get(("next", "agents", "episode_reward"))
        rewards.append(episode_reward[done].mean().item() if done.any() else float("nan"))
    collector.shutdown()
    return {
        "policy": {n: p.detach().clone() for n, p in policy.named_parameters()},
        "critic": {n: p.detach().clone() for n, p in critic.named_parameters()},
        "rewards": rewards,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=("kpg", "adam"), default="kpg")
    parser.add_argument("--k", type=int, default=2)
    for name, value in vars(Settings()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args())
    optimizer, k = args.pop("optimizer"), args.pop("k")
    result = train(Settings(**args), None if optimizer == "adam" else k)
    label = "Adam" if optimizer == "adam" else f"KPGOptimizer(k={k})"
    for iteration, reward in enumerate(result["rewards"], 1):
        print(f"{label} iteration {iteration}: episode reward mean {reward:.3f}")


if __name__ == "__main__":
    main()
