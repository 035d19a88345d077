"""K-MADDPG: MADDPG (Lowe et al., 2017) whose actor update is a KPG step.

Deterministic actors (:class:`~kpg.algos.common.AgentActors`: one per agent, batched into one
kpg.nn network when the agents' sizes are equal, or one shared with a one-hot agent id), a
centralized critic per agent Q_i(global state, joint action) (one :class:`kpg.nn.AgentMLP`
holding every agent's critic, evaluated in one batched pass), target networks with Polyak
averaging, a replay buffer, Gaussian exploration noise for continuous actions and Gumbel-softmax
for discrete ones (straight-through: a hard one-hot action in the forward pass, the relaxed
gradient in the backward pass; the critics see one-hot actions).

The actor update goes through :class:`kpg.KPGOptimizer`: agent i's loss is
``-Q_i(s, a_i = mu_i(o_i; theta_i), a_-i = mu_-i(o_-i; theta_-i^(l-1)))``, its own action from
its base parameters and the others' from their anticipated level l-1 parameters
(:func:`kpg.joint_inputs`). At level 1 the others' actions are their current policies' (as in
MADDPG implementations that recompute every agent's action for the policy gradient, rather than
reusing the replayed ones), so k=1 is exactly MADDPG. From level 2 on, with discrete actions, the
others' anticipated actions are their *relaxed* Gumbel-softmax samples (the softmax of the
perturbed logits, with the same noise as the own action:
:meth:`kpg.algos.off_policy.OffPolicyTrainer.anticipated_actions`), not the straight-through
one-hot forward values: a one-hot changes only where an argmax flips, so an anticipation fed as
one-hot would carry almost none of the others' level l-1 change and k=2 would be nearly inert.
The critics, trained on one-hot actions, then see the others' relaxed actions, which stay on the
simplex and equal the one-hot in the low-temperature limit. The critics are trained with Adam on
the TD error; a time limit is not a terminal state, so the target bootstraps from the final state
of a time-limited episode.

What MADDPG and FACMAC share (acting, replay, the iteration loop, data parallel under
``torchrun``) is :class:`kpg.algos.off_policy.OffPolicyTrainer`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kpg import nn as kpg_nn
from kpg.algos.common import clip_member_grad_norms_
from kpg.algos.off_policy import OffPolicyTrainer, validate_off_policy
from kpg.couplings import joint_inputs


@dataclass
class MADDPGConfig:
    """MADDPG hyperparameters (defaults: Lowe et al.'s MPE settings where they fit 2 cores: 64-unit
    networks, ReLU actors, gamma 0.95, tau 0.01, gradient-norm clipping 0.5, output regularization
    1e-3; ELU critics, see ``critic_activation``)."""

    buffer_size: int = 100_000  # transitions (one per environment copy and step), split evenly over data-parallel ranks
    batch_size: int = 512  # samples per gradient step, split evenly over data-parallel ranks
    rollout: int = 25  # environment steps per copy between update phases
    updates_per_iteration: int = 8  # gradient steps (critic, actor, targets) per update phase
    learning_starts: int = 5_000  # environment steps of uniformly random actions before the first update
    actor_lr: float = 1e-3
    critic_lr: float = 1e-3
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "relu"  # actors
    # A ReLU critic is piecewise linear in the joint action: agent i's action gradient would change
    # with the others' (anticipated) actions only where a unit switches, leaving KPG almost nothing.
    critic_activation: str = "elu"
    gamma: float = 0.95
    tau: float = 0.01  # Polyak coefficient of the target networks
    max_grad_norm: float = 0.5  # per agent, actors and critics
    exploration_noise: float = 0.1  # Gaussian std of continuous actions, which span [-1, 1]
    gumbel_temperature: float = 1.0  # discrete actions
    actor_regularization: float = 1e-3  # weight of the mean squared pre-activation actor output
    share_actor: bool = False  # one actor for all agents (with agent ids), else one per agent
    batch_actors: bool = True  # per-agent actors of equally sized agents as one kpg.nn batched network

    def validate(self) -> None:
        """Raises :class:`kpg.options.OptionError` for a value out of range (types: kpg.options.check_options)."""
        validate_off_policy(self, "maddpg.", ("critic_activation",))


class MADDPGTrainer(OffPolicyTrainer):
    """K-MADDPG (module docstring)."""

    def _build_critic(self) -> None:
        spaces = self.spaces
        joint_action = self.num_agents * spaces.action_size
        self.critic = kpg_nn.AgentMLP(
            self.num_agents,
            spaces.state_size + joint_action,
            1,
            self.config.hidden,
            self.config.critic_activation,
            device=self.device,
        )

    def q_values(self, critic: kpg_nn.AgentMLP, state: Tensor, joint_actions: Tensor) -> Tensor:
        """Every agent's Q [agents, batch] from global states [batch, state_size] and joint actions
        [batch, agents * action_size] (one for all critics) or [agents, batch, agents * action_size]
        (critic i reads row i)."""
        n = self.num_agents
        if joint_actions.dim() == 2:
            joint_actions = joint_actions.expand(n, -1, -1)
        return critic(torch.cat([state.expand(n, -1, -1), joint_actions], dim=-1)).squeeze(-1)

    def critic_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Sum over agents of the mean squared TD error of Q_i over the samples where agent i acted,
        with targets r_i + gamma * (1 - terminated_i) * Q'_i(s', mu'(o')); agents without a next
        observation (terminated) contribute a zero action to the target's joint action."""
        c = self.config
        alive = batch["alive"].T  # [agents, batch]
        with torch.no_grad():
            present = batch["next_present"].T
            next_obs = batch["next_obs"].transpose(0, 1)
            next_actions = self.greedy_actions(self.target_actor(next_obs)) * present[..., None]
            next_q = self.q_values(self.target_critic, batch["next_state"], next_actions.transpose(0, 1).flatten(1))
            target = batch["reward"].T + c.gamma * (1.0 - batch["terminated"].T) * next_q
        q = self.q_values(self.critic, batch["state"], batch["actions"].flatten(1))
        count = alive.sum(1).clamp_min(1.0)
        loss = (((q - target).square() * alive).sum(1) / count).sum()
        return loss, ((q.detach() * alive).sum(1) / count).mean()

    def _clip_critic_gradients(self) -> None:
        clip_member_grad_norms_(self.critic, self.config.max_grad_norm)

    def actor_losses(self, ctx, batch: dict[str, Tensor], noise: Tensor | None) -> Tensor:
        """Agent i: -Q_i(s, own action mu_i(o_i) at base, the others' at level l-1), averaged over
        the samples where agent i acted, plus the output penalty."""
        obs = batch["obs"].transpose(0, 1)  # [agents, batch, obs]
        alive = batch["alive"].T
        outputs = self.actor(obs)
        own = self.policy_actions(outputs, noise) * alive[..., None]
        if ctx.level == 1:
            anticipated = own.detach()  # level l-1 = 0 is the base parameters: the same actions
        else:
            with ctx.anticipated():
                anticipated = self.anticipated_actions(self.actor(obs), noise) * alive[..., None]
        joint = joint_inputs(own, anticipated)  # [agents i, agents j, batch, action]: j's action in i's loss
        q = self.q_values(self.critic, batch["state"], joint.transpose(1, 2).flatten(2))
        policy_value = (q * alive).sum(1) / alive.sum(1).clamp_min(1.0)
        return -policy_value + self.config.actor_regularization * self.output_penalty(outputs, alive)
