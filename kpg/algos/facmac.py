"""K-FACMAC: FACMAC (Peng et al., 2021) whose actor update is a KPG step.

Per-agent utilities Q_i(o_i, a_i) (one network shared with a one-hot agent id by default), a
monotonic QMIX-style mixer whose weights are absolute values of hypernetworks of the global state,
Q_tot(s, Q_1, ..., Q_n), target networks with Polyak averaging, a replay buffer, deterministic
actors (continuous actions; discrete ones through the straight-through Gumbel-softmax) and the
centralized policy gradient through the mixer: the actor loss is -Q_tot(s, Q_1(o_1, mu_1(o_1)),
..., Q_n(o_n, mu_n(o_n))) with every agent's action from the current policies.

The actor update goes through :class:`kpg.KPGOptimizer`. At level 1 the loss is exactly FACMAC's
(one mixer pass, its gradient is every agent's own), so k=1 is FACMAC. From level 2 agent i's loss
is -Q_tot with agent i's utility at its own action mu_i(o_i; theta_i) from the base parameters and
every other agent's utility at its anticipated action mu_j(o_j; theta_j^(l-1))
(:func:`kpg.joint_inputs` over the utilities). The utilities and the mixer are trained together
with Adam on the TD error of Q_tot against the team reward (the mean over the agents that acted);
the target bootstraps while any agent goes on, including through a time limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kpg import nn as kpg_nn
from kpg.algos.common import agent_ids
from kpg.algos.off_policy import OffPolicyTrainer, validate_off_policy
from kpg.couplings import joint_inputs


@dataclass
class FACMACConfig:
    """FACMAC hyperparameters (defaults for simple_spread on 2 cores; QMIX's mixer sizes: mixing
    embedding 32, hypernetwork embedding 64; actors and utilities shared by all agents). On
    MaMuJoCo the FACMAC authors train with gamma 0.99, tau 0.001, batch 100 and 400-unit networks."""

    buffer_size: int = 100_000  # transitions (one per environment copy and step), split evenly over data-parallel ranks
    batch_size: int = 512  # samples per gradient step, split evenly over data-parallel ranks
    rollout: int = 25  # environment steps per copy between update phases
    updates_per_iteration: int = 8  # gradient steps (critic, actor, targets) per update phase
    learning_starts: int = 5_000  # environment steps of uniformly random actions before the first update
    actor_lr: float = 1e-3
    critic_lr: float = 1e-3  # utilities and mixer
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "relu"
    # The FACMAC authors' particle-environment discount. At 0.95 the hypernetwork mixer's Q_tot
    # overestimated without bound on simple_spread after about 70k steps (the sum of utilities did not).
    gamma: float = 0.85
    tau: float = 0.01  # Polyak coefficient of the target networks
    max_grad_norm: float = 0.5  # per agent for the actors; over utilities and mixer for the critic
    exploration_noise: float = 0.1  # Gaussian std of continuous actions, which span [-1, 1]
    gumbel_temperature: float = 1.0  # discrete actions
    actor_regularization: float = 1e-3  # weight of the mean squared pre-activation actor output
    share_actor: bool = True  # one actor for all agents (with agent ids), else one per agent
    batch_actors: bool = True  # per-agent actors of equally sized agents as one kpg.nn batched network
    share_utility: bool = True  # one utility network for all agents (with agent ids), else one per agent
    mixer_embed: int = 32
    hypernet_embed: int = 64

    def validate(self) -> None:
        """Raises :class:`kpg.options.OptionError` for a value out of range (types: kpg.options.check_options)."""
        validate_off_policy(self, "facmac.")


class MonotonicMixer(nn.Module):
    """QMIX's mixer (Rashid et al., 2018): Q_tot = w2(s) . elu(W1(s) u + b1(s)) + V(s) with W1 and
    w2 the absolute values of hypernetwork outputs, so dQ_tot/du_i >= 0 for every agent."""

    def __init__(self, num_agents: int, state_size: int, embed: int = 32, hypernet_embed: int = 64):
        super().__init__()
        if embed < 1 or hypernet_embed < 1:
            raise ValueError(
                f"mixer embeddings must be positive, got mixer_embed={embed}, hypernet_embed={hypernet_embed}"
            )
        self.num_agents, self.embed = num_agents, embed
        self.hyper_w1 = nn.Sequential(
            nn.Linear(state_size, hypernet_embed), nn.ReLU(), nn.Linear(hypernet_embed, num_agents * embed)
        )
        self.hyper_b1 = nn.Linear(state_size, embed)
        self.hyper_w2 = nn.Sequential(
            nn.Linear(state_size, hypernet_embed), nn.ReLU(), nn.Linear(hypernet_embed, embed)
        )
        self.value = nn.Sequential(nn.Linear(state_size, embed), nn.ReLU(), nn.Linear(embed, 1))

    def forward(self, utilities: Tensor, state: Tensor) -> Tensor:
        """``utilities`` [..., batch, agents], ``state`` [batch, state_size] -> Q_tot [..., batch].
        Leading dimensions of ``utilities`` share the state's hypernetwork outputs."""
        batch = state.shape[0]
        if utilities.shape[-2:] != (batch, self.num_agents):
            raise ValueError(
                f"utilities must be [..., {batch}, {self.num_agents}] for this state batch, got "
                f"{tuple(utilities.shape)}"
            )
        w1 = self.hyper_w1(state).abs().view(batch, self.num_agents, self.embed)
        hidden = nn.functional.elu(torch.einsum("...ba,bae->...be", utilities, w1) + self.hyper_b1(state))
        w2 = self.hyper_w2(state).abs()
        return (hidden * w2).sum(-1) + self.value(state).squeeze(-1)


class FACMACTrainer(OffPolicyTrainer):
    """K-FACMAC (module docstring)."""

    def _build_critic(self) -> None:
        c, spaces, n = self.config, self.spaces, self.num_agents
        inputs = spaces.obs_size + spaces.action_size + (n if c.share_utility else 0)
        utility = kpg_nn.AgentMLP(1 if c.share_utility else n, inputs, 1, c.hidden, c.activation)
        mixer = MonotonicMixer(n, spaces.state_size, c.mixer_embed, c.hypernet_embed)
        self.critic = nn.ModuleDict({"utility": utility, "mixer": mixer}).to(self.device)

    def utilities(self, critic: nn.ModuleDict, obs: Tensor, actions: Tensor) -> Tensor:
        """Q_i(o_i, a_i) [agents, batch] from observations [agents, batch, obs_size] and actions
        [agents, batch, action_size]."""
        n, batch = self.num_agents, obs.shape[1]
        if self.config.share_utility:
            inputs = torch.cat([obs, actions, agent_ids(n, batch, obs.device).to(obs.dtype)], dim=-1)
            return critic["utility"](inputs.reshape(1, n * batch, -1)).view(n, batch)
        return critic["utility"](torch.cat([obs, actions], dim=-1)).squeeze(-1)

    def critic_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Mean squared TD error of Q_tot(s, Q_i(o_i, a_i)) against r + gamma * continues *
        Q'_tot(s', Q'_i(o'_i, mu'_i(o'_i))), with r the mean reward of the agents that acted and
        ``continues`` 0 only when no agent has a next observation (every agent terminated).
        Agents that did not act, or have no next observation, contribute a zero utility."""
        c = self.config
        alive = batch["alive"].T  # [agents, batch]
        with torch.no_grad():
            present = batch["next_present"].T
            next_obs = batch["next_obs"].transpose(0, 1)
            next_actions = self.greedy_actions(self.target_actor(next_obs)) * present[..., None]
            next_utilities = self.utilities(self.target_critic, next_obs, next_actions) * present
            next_q = self.target_critic["mixer"](next_utilities.T, batch["next_state"])
            team_reward = (batch["reward"] * batch["alive"]).sum(1) / batch["alive"].sum(1).clamp_min(1.0)
            continues = (batch["next_present"].sum(1) > 0).to(next_q.dtype)
            target = team_reward + c.gamma * continues * next_q
        utilities = self.utilities(self.critic, batch["obs"].transpose(0, 1), batch["actions"].transpose(0, 1)) * alive
        q = self.critic["mixer"](utilities.T, batch["state"])
        return (q - target).square().mean(), q.detach().mean()

    def _clip_critic_gradients(self) -> None:
        nn.utils.clip_grad_norm_(self.critic.parameters(), self.config.max_grad_norm)

    def actor_losses(self, ctx, batch: dict[str, Tensor], noise: Tensor | None) -> Tensor:
        """Level 1: -mean Q_tot with every agent's current action (a scalar: its gradient is each
        agent's own). Level l >= 2, agent i: -mean Q_tot with agent i's utility at its own action
        and the others' at their level l-1 actions. Plus each agent's output penalty."""
        obs = batch["obs"].transpose(0, 1)  # [agents, batch, obs]
        alive = batch["alive"].T
        outputs = self.actor(obs)
        own = self.policy_actions(outputs, noise) * alive[..., None]
        own_utilities = self.utilities(self.critic, obs, own) * alive
        penalty = self.config.actor_regularization * self.output_penalty(outputs, alive)
        if ctx.level == 1:
            return -self.critic["mixer"](own_utilities.T, batch["state"]).mean() + penalty.sum()
        with ctx.anticipated():
            # Relaxed actions for discrete agents (see the note in kpg/algos/maddpg.py's docstring).
            anticipated = self.anticipated_actions(self.actor(obs), noise) * alive[..., None]
            anticipated_utilities = self.utilities(self.critic, obs, anticipated) * alive
        joint = joint_inputs(own_utilities, anticipated_utilities)  # [agents i, agents j, batch]
        q_tot = self.critic["mixer"](joint.transpose(1, 2), batch["state"])  # [agents i, batch]
        return -q_tot.mean(1) + penalty
