"""Pieces the trainers share: networks, action distributions over padded action sets, return
normalization, and the wall-clock split of an update."""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Normal
from torch.nn.utils import skip_init

from kpg import nn as kpg_nn

INITS = ("orthogonal", "torch")


def mlp(
    inputs: int,
    hidden: Sequence[int],
    outputs: int,
    activation: str = "tanh",
    output_gain: float = 1.0,
    init: str = "orthogonal",
) -> nn.Sequential:
    """An MLP. ``init``: ``orthogonal`` (the MAPPO/PPO convention: zero biases, orthogonal weights,
    ``output_gain`` on the last layer; 0.01 for policy outputs keeps the initial policy near uniform)
    or ``torch`` (``nn.Linear``'s own initialization everywhere, as TorchRL's and BenchMARL's MLPs;
    ``output_gain`` is not used)."""
    if activation not in kpg_nn.ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(kpg_nn.ACTIVATIONS)}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    layers: list[nn.Module] = []
    width = inputs
    for size in hidden:
        layers += [nn.Linear(width, size), kpg_nn.ACTIVATIONS[activation]()]
        width = size
    layers.append(nn.Linear(width, outputs))
    if init == "torch":
        return nn.Sequential(*layers)
    gain = nn.init.calculate_gain("relu" if activation == "relu" else "tanh")
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    for layer in linears:
        nn.init.orthogonal_(layer.weight, gain=output_gain if layer is linears[-1] else gain)
        nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


ACTOR_LAYOUTS = ("shared", "batched", "per_agent")


def actor_layout(share_actor: bool, batch_actors: bool, homogeneous: bool) -> str:
    """``shared`` with parameter sharing; else ``batched`` (one kpg.nn network holding every agent's
    own) for agents of equal observation and action sizes unless ``batch_actors`` is off; else
    ``per_agent``."""
    if share_actor:
        return "shared"
    return "batched" if batch_actors and homogeneous else "per_agent"


class AgentActors(nn.ModuleList):
    """Every agent's actor network, evaluated for all agents at once: observations ``[agents,
    batch, obs_size]`` -> outputs ``[agents, batch, outputs]``. Its entries (``networks``) depend on
    the ``layout`` (:data:`ACTOR_LAYOUTS`):

    - ``shared``: one :func:`mlp` for all agents, a one-hot agent id appended to its input (unless
      ``agent_id`` is off: then every agent's observation is the whole input);
    - ``batched``: one :class:`kpg.nn.AgentMLP` holding each agent's own MLP, all agents in one
      batched call (KPGOptimizer steps its agent slices in one fused pass);
    - ``per_agent``: one :func:`mlp` per agent, called one after the other (agents of unequal
      observation or action sizes, padded to the largest).

    ``batched`` and ``per_agent`` are initialised alike (agent after agent, as :func:`mlp`
    initialises), so with the same torch seed they hold the same networks.
    """

    def __init__(
        self,
        layout: str,
        num_agents: int,
        obs_size: int,
        outputs: int,
        hidden: Sequence[int],
        activation: str,
        output_gain: float,
        init: str = "orthogonal",
        agent_id: bool = True,
    ):
        if layout not in ACTOR_LAYOUTS:
            raise ValueError(f"unknown actor layout {layout!r}; choose one of {', '.join(ACTOR_LAYOUTS)}")
        if not agent_id and layout != "shared":
            raise ValueError(
                f"agent_id off drops the id a shared actor reads; the {layout} layout has one network per agent and "
                "no id: leave agent_id on"
            )
        if layout == "shared":
            inputs = obs_size + (num_agents if agent_id else 0)
            networks = [mlp(inputs, hidden, outputs, activation, output_gain, init)]
        else:
            networks = [mlp(obs_size, hidden, outputs, activation, output_gain, init) for _ in range(num_agents)]
        if layout == "batched":
            # The per-agent networks' initialization, in AgentMLP's faster evaluation (skip_init draws no
            # random numbers, so the torch generator advances exactly as in the per-agent layout).
            batched = skip_init(kpg_nn.AgentMLP, num_agents, obs_size, outputs, tuple(hidden), activation)
            batched.load_state_dict(kpg_nn.stack(networks).state_dict())
            networks = [batched]
        super().__init__(networks)
        self.layout, self.num_agents, self.agent_id = layout, num_agents, agent_id

    def forward(self, obs: Tensor) -> Tensor:
        if self.layout == "shared" and not self.agent_id:
            return self[0](obs)
        if self.layout == "shared":
            ids = agent_ids(self.num_agents, obs.shape[1], obs.device).to(obs.dtype)
            return self[0](torch.cat([obs, ids], dim=-1))
        if self.layout == "batched":
            return self[0](obs)
        return torch.stack([network(obs[i]) for i, network in enumerate(self)])

    def per_agent_networks(self) -> list[nn.Module]:
        """Each agent's network as a ``torch.nn`` module (copies for the batched layout)."""
        if self.layout == "batched":
            return kpg_nn.unstack(self[0])
        return [self[0] if self.layout == "shared" else self[i] for i in range(self.num_agents)]

    def optimizer_arguments(self, extra: Sequence[nn.Parameter] = ()) -> tuple[Any, dict[str, Any]]:
        """The ``agents`` argument of :class:`kpg.KPGOptimizer` for these actors and its keyword
        arguments: the shared network (``num_agents``), the batched network's parameters
        (``agent_dim=0``), or one network per agent. ``extra``: one more parameter per network, in its
        layout (``[agents, ...]`` for the batched one), stepped with the network's agents."""
        extra = list(extra)
        if extra and len(extra) != len(self):
            raise ValueError(
                f"extra holds {len(extra)} parameters but the {self.layout} actors have {len(self)} networks; "
                "pass one per network"
            )
        per_network = [[*network.parameters(), *extra[i : i + 1]] for i, network in enumerate(self)]
        if self.layout == "shared":
            return per_network[0], {"num_agents": self.num_agents}
        if self.layout == "batched":
            return per_network[0], {"agent_dim": 0}
        return per_network, {}


ACTION_SCALES = ("parameter", "state")


def inverse_softplus(value: float) -> float:
    """The x with softplus(x) = value (value > 0)."""
    return math.log(math.expm1(value))


class PolicyHead:
    """Action distributions for every agent at once from network outputs ``[..., outputs]``.

    Discrete: logits, with the actions an agent does not have masked out. Continuous: a Gaussian over
    a latent action u per dimension; dimensions an agent does not have contribute nothing to
    log-probabilities or entropy.

    - ``scale="parameter"``: the output is the mean; the log standard deviation is a learned
      parameter per agent and action dimension, given to :meth:`distribution`.
    - ``scale="state"``: the output holds the mean and a raw scale per dimension (``[mean, raw]``,
      twice the action size); the standard deviation is ``softplus(raw + b) + scale_min`` with b
      chosen so that raw = 0 gives ``scale_bias`` (TorchRL's ``biased_softplus``, the scale mapping of
      BenchMARL's MAPPO).
    - ``squash_bounds=(low, high)`` ([agents, action_size], finite): the environment's action is
      ``a = c + h tanh(u)`` with ``c = (high + low) / 2``, ``h = (high - low) / 2`` (TorchRL's
      ``TanhNormal``), so it always lies inside the bounds. The trainers keep u (the latent) as the
      action they store, and :meth:`env_actions` maps it to a. Log-probabilities are those of a, by
      the change of variables: ``log N(u) - sum log(h (1 - tanh(u)^2))``, with ``log(1 - tanh(u)^2)
      = 2 (log 2 - u - softplus(-2u))``, finite for every u. Without bounds a = u (a plain Normal,
      which the environment clamps).

    The entropy of a squashed Normal has no closed form. :meth:`entropy` returns an unbiased
    one-sample estimate: the Normal's exact entropy plus ``sum log(h (1 - tanh(u)^2))`` at one
    reparameterized draw u (differentiable in the mean and scale). TorchRL estimates it by
    ``-log p(a)`` at a draw; the two have the same expectation, this one a smaller variance.
    """

    def __init__(
        self,
        discrete: bool,
        action_mask: Tensor,
        scale: str = "parameter",
        squash_bounds: tuple[Tensor, Tensor] | None = None,
        scale_bias: float = 1.0,
        scale_min: float = 0.01,
    ):
        if scale not in ACTION_SCALES:
            raise ValueError(f"unknown action scale {scale!r}; choose one of {', '.join(ACTION_SCALES)}")
        if discrete and (scale != "parameter" or squash_bounds is not None):
            raise ValueError(
                "the action scale and tanh squashing are options of continuous actions; this environment's actions "
                "are discrete: leave them at their defaults"
            )
        if scale == "state" and not 0 < scale_min < scale_bias:
            raise ValueError(
                f"a state-dependent scale needs 0 < scale_min < scale_bias, got scale_min={scale_min}, "
                f"scale_bias={scale_bias}"
            )
        self.discrete = discrete
        self.action_mask = action_mask  # [agents, action_size]
        self.scale = scale
        self.scale_min = scale_min
        self.softplus_shift = inverse_softplus(scale_bias - scale_min) if scale == "state" else 0.0
        self.squash = squash_bounds is not None
        if self.squash:
            low, high = squash_bounds
            present = action_mask != 0
            if not (torch.isfinite(low) & torch.isfinite(high) & (high > low))[present].all():
                raise ValueError(
                    "a tanh-squashed policy needs finite action bounds with high > low for every action dimension; "
                    f"got low={low.tolist()}, high={high.tolist()}: use the plain Normal (no squashing)"
                )
            # Missing dimensions: centre 0, half-range 1 (log 1 = 0), masked out of every sum anyway.
            self.centre = torch.where(present, (high + low) / 2, torch.zeros_like(low))
            self.half_range = torch.where(present, (high - low) / 2, torch.ones_like(low))

    @property
    def outputs_per_action(self) -> int:
        """Network outputs per action dimension: 2 (mean and raw scale) for a state-dependent scale."""
        return 2 if self.scale == "state" else 1

    def distribution(self, output: Tensor, log_std: Tensor | None = None):
        """``output``: [agents, batch, outputs]; ``log_std``: [agents, action_size] (``scale="parameter"``).
        Continuous: the Normal of the latent u."""
        if self.discrete:
            logits = output.masked_fill(self.action_mask[:, None, :] == 0, torch.finfo(output.dtype).min)
            return Categorical(logits=logits)
        if self.scale == "state":
            mean, raw = output.chunk(2, dim=-1)
            return Normal(mean, nn.functional.softplus(raw + self.softplus_shift) + self.scale_min)
        return Normal(output, log_std[:, None, :].exp().expand_as(output))

    def _log_jacobian(self, latent: Tensor) -> Tensor:
        """log |da/du| per dimension, [agents, batch, action_size]."""
        log_one_minus_tanh_sq = 2.0 * (math.log(2.0) - latent - nn.functional.softplus(-2.0 * latent))
        return self.half_range[:, None, :].log() + log_one_minus_tanh_sq

    def log_prob(self, dist, actions: Tensor) -> Tensor:
        """[agents, batch] log-probabilities of ``actions`` ([agents, batch] or [agents, batch, dims];
        continuous: the latent u) as actions of the environment (squashed: a's density)."""
        if self.discrete:
            return dist.log_prob(actions)
        log_prob = dist.log_prob(actions)
        if self.squash:
            log_prob = log_prob - self._log_jacobian(actions)
        return (log_prob * self.action_mask[:, None, :]).sum(-1)

    def entropy(self, dist) -> Tensor:
        """[agents, batch] entropies (squashed: the one-sample estimate of the class docstring)."""
        if self.discrete:
            return dist.entropy()
        entropy = dist.entropy()
        if self.squash:
            entropy = entropy + self._log_jacobian(dist.rsample())
        return (entropy * self.action_mask[:, None, :]).sum(-1)

    def env_actions(self, actions: Tensor) -> Tensor:
        """The environment's actions for sampled ``actions`` [agents, batch, ...]: a = c + h tanh(u) when
        squashed, else the actions themselves."""
        if not self.squash:
            return actions
        # A dimension an agent does not have gets the centre, 0.
        return self.centre[:, None, :] + (self.half_range * self.action_mask)[:, None, :] * torch.tanh(actions)

    def greedy(self, dist) -> Tensor:
        """The deterministic action: the most likely one (discrete), or the mean's (squashed) image."""
        return dist.probs.argmax(-1) if self.discrete else self.env_actions(dist.mean)


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


def rank_seed(seed: int, rank: int) -> int:
    """The seed of data-parallel rank ``rank``: rank 0 keeps ``seed`` (one rank runs exactly as
    without torchrun); the others get streams of their own, far from rank 0's and from the
    evaluation pool's (seed + 10 000)."""
    return seed + 100_003 * rank


def agent_ids(num_agents: int, batch: int, device: torch.device | str) -> Tensor:
    """[agents, batch, agents] one-hot agent ids, the input that tells a shared network who it is."""
    return torch.eye(num_agents, device=device)[:, None, :].expand(num_agents, batch, num_agents)


def actor_level_seconds(optimizer) -> list[float]:
    """Seconds of a :class:`kpg.KPGOptimizer`'s steps per KPG level since construction (closure,
    backward, kernels; the anticipated forward is part of the closure)."""
    seconds = optimizer.stats.seconds
    levels = max((len(v) for v in seconds.values()), default=0)
    return [
        sum(v[l] for phase, v in seconds.items() if phase != "anticipated_forward" and l < len(v))
        for l in range(levels)
    ]


def clip_member_grad_norms_(network: kpg_nn.AgentModule, max_norm: float) -> Tensor:
    """``clip_grad_norm_`` applied to each agent's slice of an agent-batched network on its own, so
    that one agent's large critic gradient does not shrink the others'. Returns the norms before
    clipping."""
    grads = [p.grad for p in network.parameters() if p.grad is not None]
    norms = torch.stack([g.flatten(1).square().sum(1) for g in grads]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))
    return norms


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- (1 - tau) * target + tau * source, parameter by parameter (target networks of
    DDPG-style methods). The modules must have the same structure."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"the Polyak coefficient tau must be in (0, 1], got {tau}")
    target_params, source_params = list(target.parameters()), list(source.parameters())
    if len(target_params) != len(source_params):
        raise ValueError(f"target has {len(target_params)} parameters, source {len(source_params)}; they must match")
    for t, s in zip(target_params, source_params):
        t.lerp_(s, tau)


def gumbel_noise(
    shape: Sequence[int], generator: torch.Generator, device: torch.device | str, dtype: torch.dtype
) -> Tensor:
    """Standard Gumbel samples -log(-log U), drawn from ``generator``."""
    uniform = torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    return -torch.log(-torch.log(uniform.clamp(tiny, 1.0 - torch.finfo(dtype).eps)))


def straight_through_gumbel_softmax(
    logits: Tensor, noise: Tensor, temperature: float, mask: Tensor | None = None
) -> Tensor:
    """Gumbel-softmax with the straight-through estimator (Jang et al., 2017): the forward value is
    the one-hot of argmax(logits + noise), the gradient that of softmax((logits + noise) /
    temperature). ``mask`` (broadcastable to ``logits``, 1 for actions the agent has) keeps padded
    actions at probability zero. The noise is an argument so that a loss evaluated several times
    (once per KPG level) sees the same sample."""
    if temperature <= 0:
        raise ValueError(f"the Gumbel-softmax temperature must be > 0, got {temperature}")
    perturbed = (logits + noise) / temperature
    if mask is not None:
        perturbed = perturbed.masked_fill(mask == 0, torch.finfo(perturbed.dtype).min)
    soft = torch.softmax(perturbed, dim=-1)
    hard = nn.functional.one_hot(perturbed.argmax(-1), logits.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft
