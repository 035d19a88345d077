"""Pieces the trainers share: networks, action distributions over padded action sets, return
normalization, and the wall-clock split of an update."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Normal

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU}


def mlp(inputs: int, hidden: Sequence[int], outputs: int, activation: str = "tanh", output_gain: float = 1.0) -> nn.Sequential:
    """An MLP with orthogonal initialization (the MAPPO/PPO convention); ``output_gain`` scales the
    last layer (0.01 for policy logits keeps the initial policy near uniform)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    width = inputs
    for size in hidden:
        layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
        width = size
    layers.append(nn.Linear(width, outputs))
    gain = nn.init.calculate_gain("relu" if activation == "relu" else "tanh")
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    for layer in linears:
        nn.init.orthogonal_(layer.weight, gain=output_gain if layer is linears[-1] else gain)
        nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class PolicyHead:
    """Action distributions for every agent at once from network outputs ``[..., action_size]``.

    Discrete: logits, with the actions an agent does not have masked out. Continuous: a Gaussian
    whose mean is the output and whose log standard deviation is a learned parameter per agent and
    action dimension; dimensions an agent does not have contribute nothing to log-probabilities or
    entropy.
    """

    def __init__(self, discrete: bool, action_mask: Tensor):
        self.discrete = discrete
        self.action_mask = action_mask  # [agents, action_size]

    def distribution(self, output: Tensor, log_std: Tensor | None = None):
        """``output``: [agents, batch, action_size]; ``log_std``: [agents, action_size]."""
        if self.discrete:
            logits = output.masked_fill(self.action_mask[:, None, :] == 0, torch.finfo(output.dtype).min)
            return Categorical(logits=logits)
        return Normal(output, log_std[:, None, :].exp().expand_as(output))

    def log_prob(self, dist, actions: Tensor) -> Tensor:
        """[agents, batch] log-probabilities of ``actions`` ([agents, batch] or [agents, batch, dims])."""
        if self.discrete:
            return dist.log_prob(actions)
        return (dist.log_prob(actions) * self.action_mask[:, None, :]).sum(-1)

    def entropy(self, dist) -> Tensor:
        if self.discrete:
            return dist.entropy()
        return (dist.entropy() * self.action_mask[:, None, :]).sum(-1)


class ReturnNormalizer(nn.Module):
    """Running mean and variance of value targets (MAPPO's ValueNorm): the critic learns normalized
    targets, so one learning rate works across reward scales. Debiased exponential averages."""

    def __init__(self, size: int, beta: float = 0.99999, epsilon: float = 1e-5):
        super().__init__()
        self.beta, self.epsilon = beta, epsilon
        self.register_buffer("mean", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("mean_sq", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("debias", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, values: Tensor, mask: Tensor) -> None:
        """``values``, ``mask``: [..., size]; masked-out entries do not count."""
        flat_values = values.reshape(-1, values.shape[-1]).double()
        flat_mask = mask.reshape(-1, mask.shape[-1]).double()
        count = flat_mask.sum(0).clamp_min(1.0)
        batch_mean = (flat_values * flat_mask).sum(0) / count
        batch_mean_sq = (flat_values.square() * flat_mask).sum(0) / count
        self.mean.mul_(self.beta).add_(batch_mean * (1 - self.beta))
        self.mean_sq.mul_(self.beta).add_(batch_mean_sq * (1 - self.beta))
        self.debias.mul_(self.beta).add_(1 - self.beta)

    def _moments(self) -> tuple[Tensor, Tensor]:
        debias = self.debias.clamp_min(self.epsilon)
        mean = self.mean / debias
        var = (self.mean_sq / debias - mean.square()).clamp_min(1e-2)
        return mean, var

    def normalize(self, values: Tensor) -> Tensor:
        mean, var = self._moments()
        return ((values.double() - mean) / var.sqrt()).to(values.dtype)

    def denormalize(self, values: Tensor) -> Tensor:
        mean, var = self._moments()
        return (values.double() * var.sqrt() + mean).to(values.dtype)


class WallClock:
    """Seconds per phase of training (environment, critic, actor, ...), summed since the last
    :meth:`take`."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    def take(self) -> dict[str, float]:
        seconds, self.seconds = dict(self.seconds), defaultdict(float)
        return seconds


def generalized_advantages(rewards: Tensor, values: Tensor, dones: Tensor, gamma: float, gae_lambda: float) -> Tensor:
    """GAE (Schulman et al., 2016) over time-major ``rewards`` and ``dones`` [T, ...] and ``values``
    [T + 1, ...]. ``dones[t]`` cuts the recursion after step t: the next value belongs to a new
    episode. A time limit is not a terminal state; add gamma * V(final state) to its reward first."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        not_done = 1.0 - dones[t]
        delta = rewards[t] + gamma * values[t + 1] * not_done - values[t]
        running = delta + gamma * gae_lambda * not_done * running
        advantages[t] = running
    return advantages


def agent_ids(num_agents: int, batch: int, device: torch.device | str) -> Tensor:
    """[agents, batch, agents] one-hot agent ids, the input that tells a shared network who it is."""
    return torch.eye(num_agents, device=device)[:, None, :].expand(num_agents, batch, num_agents)
