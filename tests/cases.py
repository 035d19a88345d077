"""Test problems shared by the pytest suites and scripts/cuda_checks.py, which runs on a lent GPU
machine without pytest or the trainers' dependencies: this module needs torch and kpg only."""

import torch
from torch import nn

import kpg
import kpg.nn as knn

# (optimizer, hyperparameters) cases, each id naming what it exercises.
UPDATE_CASES = {
    "sgd-plain": ("sgd", dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)),
    "sgd-momentum-dampening-wd": (
        "sgd",
        dict(momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, maximize=False),
    ),
    "sgd-nesterov-maximize": ("sgd", dict(momentum=0.8, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=True)),
    "adam": (
        "adam",
        dict(
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            amsgrad=False,
            maximize=False,
            decoupled_weight_decay=False,
        ),
    ),
    "adam-l2-amsgrad-maximize": (
        "adam",
        dict(
            beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1, amsgrad=True, maximize=True, decoupled_weight_decay=False
        ),
    ),
    "adamw": (
        "adam",
        dict(
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            amsgrad=False,
            maximize=False,
            decoupled_weight_decay=True,
        ),
    ),
    "adamw-amsgrad-beta1-large-weight": (
        "adam",
        dict(
            beta1=0.3, beta2=0.9, eps=1e-5, weight_decay=0.05, amsgrad=True, maximize=False, decoupled_weight_decay=True
        ),
    ),
    "rmsprop": ("rmsprop", dict(alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False)),
    "rmsprop-centered-momentum-wd": (
        "rmsprop",
        dict(alpha=0.9, eps=1e-6, weight_decay=0.01, momentum=0.5, centered=True, maximize=False),
    ),
    "rmsprop-alpha-small-maximize": (
        "rmsprop",
        dict(alpha=0.3, eps=1e-8, weight_decay=0.0, momentum=0.9, centered=True, maximize=True),
    ),
    "adagrad": (
        "adagrad",
        dict(lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10, maximize=False),
    ),
    "adagrad-decay-wd-maximize": (
        "adagrad",
        dict(lr_decay=0.1, weight_decay=0.05, initial_accumulator_value=0.5, eps=1e-6, maximize=True),
    ),
}


class KMappoMinibatch:
    """An agent-batched policy trained by K-MAPPO's joint ratio plus a centralized critic term that
    reads joint_inputs in its tensor form and its list form; inputs live in static buffers."""

    def __init__(self, device, agents: int = 3, obs: int = 5, actions: int = 4, batch: int = 16):
        self.sizes = agents, obs, actions, batch
        torch.manual_seed(0)
        self.policy = knn.AgentMLP(agents, obs, actions, hidden_sizes=(8,), dtype=torch.float64).to(device)
        self.critic = nn.Sequential(nn.Linear(agents * actions, 8), nn.Tanh(), nn.Linear(8, agents)).double().to(device)
        self.critic.requires_grad_(False)
        self.obs = torch.zeros(agents, batch, obs, dtype=torch.float64, device=device)
        self.actions = torch.zeros(agents, batch, dtype=torch.int64, device=device)
        self.old_log_prob = torch.zeros(agents, batch, dtype=torch.float64, device=device)
        self.advantages = torch.zeros(agents, batch, dtype=torch.float64, device=device)

    def refill(self, minibatch):
        g = torch.Generator().manual_seed(100 + minibatch)
        self.obs.copy_(torch.randn(self.obs.shape, generator=g, dtype=torch.float64))
        self.actions.copy_(torch.randint(self.sizes[2], self.actions.shape, generator=g))
        self.old_log_prob.copy_(-torch.rand(self.old_log_prob.shape, generator=g, dtype=torch.float64) - 1)
        self.advantages.copy_(torch.randn(self.advantages.shape, generator=g, dtype=torch.float64))

    def log_prob(self, logits):
        return torch.log_softmax(logits, -1).gather(-1, self.actions.unsqueeze(-1)).squeeze(-1)

    def closure(self, ctx):
        own_logits = ctx.at_base(lambda: self.policy(self.obs))
        with ctx.anticipated():
            anticipated_logits = self.policy(self.obs)
        surrogate = kpg.joint_ratio_loss(
            self.log_prob(own_logits),
            self.old_log_prob,
            self.advantages,
            self.log_prob(anticipated_logits),
            level=ctx.level,
        ).loss
        own, anticipated = torch.tanh(own_logits), torch.tanh(anticipated_logits)
        stacked = kpg.joint_inputs(own, anticipated, agent_dim=0)  # [A, A, B, ACT]
        listed = kpg.joint_inputs(list(own.unbind(0)), list(anticipated.unbind(0)))  # [A, B, A * ACT]
        agents, _, actions, batch = self.sizes
        q_stacked = self.critic(stacked.permute(0, 2, 1, 3).reshape(agents, batch, agents * actions))
        q_listed = self.critic(listed)
        critic_term = q_stacked.diagonal(dim1=0, dim2=2).mean(0) + q_listed.diagonal(dim1=0, dim2=2).mean(0)
        return surrogate - 0.1 * critic_term

    def train(self, opt, schedule, steps: int, capture_from: int | None = None) -> list[torch.Tensor]:
        """The policy's parameters (on the CPU) after ``steps`` minibatch steps of ``opt``, one
        ``schedule`` step each; from minibatch ``capture_from`` on, replays of a captured step."""
        replay = None
        for minibatch in range(steps):
            self.refill(minibatch)
            if capture_from is None or minibatch < capture_from:
                opt.step(self.closure)
            elif replay is None:  # capture_step's warm-up step is a real step: this minibatch's
                replay = opt.capture_step(self.closure, warmup_steps=1)
            else:
                replay()
            schedule.step()
            opt.sync_hyperparameters()
        if self.obs.is_cuda:
            torch.cuda.synchronize()
        return [p.detach().cpu() for p in self.policy.parameters()]
