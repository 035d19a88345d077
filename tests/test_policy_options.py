"""The continuous-policy options of the feed-forward MAPPO trainers (MAPPOConfig's action_scale, squash,
init, adam_eps, normalize_advantages): exact log-probabilities and entropies of the tanh-squashed Normal,
TorchRL's biased softplus scale, the initializations, and what the trainer stores and sends."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import AffineTransform, Normal, TanhTransform, TransformedDistribution

from kpg.algos import choose_trainer
from kpg.algos import mappo as mappo_module
from kpg.algos.common import PolicyHead, mlp
from kpg.algos.mappo import MAPPOConfig, MAPPOTrainer
from kpg.envs import EnvPool, make_env_factory
from kpg.options import OptionError

LOW = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
HIGH = torch.tensor([[1.0, 3.0], [0.5, 0.0]])
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # agent 1 has one action dimension; its bounds pad with zeros
SMALL = MAPPOConfig(rollout=5, epochs=2, minibatches=2, hidden=(16, 16))


def _reference(dist: Normal) -> TransformedDistribution:
    """torch.distributions' own tanh-then-affine Normal (float64: it inverts tanh by atanh), padded
    dimensions given the range [-1, 1]."""
    low, high, mask = LOW.double(), HIGH.double(), MASK.double()
    centre = (high + low) / 2
    half_range = torch.where(mask > 0, (high - low) / 2, torch.ones_like(low))
    transforms = [TanhTransform(), AffineTransform(centre[:, None, :], half_range[:, None, :])]
    return TransformedDistribution(Normal(dist.mean, dist.stddev), transforms)


def test_squashed_log_prob_is_torchs_transformed_distribution():
    torch.manual_seed(0)
    head = PolicyHead(False, MASK, scale="state", squash_bounds=(LOW, HIGH))
    dist = head.distribution(torch.randn(2, 64, 4))
    latent = dist.sample()
    actions = head.env_actions(latent)
    reference = _reference(Normal(dist.mean.double(), dist.stddev.double()))
    expected = (reference.log_prob(head.env_actions(latent.double())) * MASK.double()[:, None, :]).sum(-1)
    torch.testing.assert_close(head.log_prob(dist, latent).double(), expected, rtol=1e-5, atol=1e-5)
    assert bool(((actions >= LOW[:, None, :]) & (actions <= HIGH[:, None, :])).all())


def test_squashed_log_prob_stays_exact_where_tanh_saturates():
    """At |u| = 12 and 40, tanh(u) rounds to +-1 in float32 and log(1 - tanh(u)^2) would be -inf; the
    stable form gives the float64 hand computation log N(u) - log h - log(1 - tanh(u)^2)."""
    head = PolicyHead(False, torch.ones(1, 1), squash_bounds=(torch.full((1, 1), -2.0), torch.full((1, 1), 2.0)))
    latent = torch.tensor([[[12.0], [-40.0], [0.3]]])
    dist = head.distribution(torch.zeros(1, 3, 1), torch.zeros(1, 1))
    u = latent.double()
    log_one_minus_tanh_sq = torch.log(4.0 / (u.exp() + (-u).exp()).square())  # 1 - tanh^2 = sech^2
    expected = Normal(0.0, 1.0).log_prob(u) - math.log(2.0) - log_one_minus_tanh_sq
    log_prob = head.log_prob(dist, latent)
    assert bool(torch.isfinite(log_prob).all())
    torch.testing.assert_close(log_prob.double(), expected.squeeze(-1), rtol=1e-6, atol=1e-4)


def test_squashed_entropy_is_an_unbiased_estimate_with_gradients():
    """The entropy of a = 2 tanh(u), u ~ N(0.7, 0.8), by quadrature: H(u) + E[log(2 (1 - tanh(u)^2))]. The
    mean of many one-sample estimates is within 4 standard errors of it, and the estimate has gradients
    in the mean and the scale."""
    mean, std = 0.7, 0.8
    grid = torch.linspace(mean - 12 * std, mean + 12 * std, 200_001, dtype=torch.float64)
    density = Normal(mean, std).log_prob(grid).exp()
    log_jacobian = math.log(2.0) + torch.log(1 - torch.tanh(grid).square())
    exact = 0.5 * math.log(2 * math.pi * math.e * std**2) + torch.trapezoid(density * log_jacobian, grid).item()
    head = PolicyHead(False, torch.ones(1, 1), squash_bounds=(torch.full((1, 1), -2.0), torch.full((1, 1), 2.0)))
    output = torch.full((1, 100_000, 1), mean, requires_grad=True)
    log_std = torch.full((1, 1), math.log(std), requires_grad=True)
    torch.manual_seed(0)
    estimates = head.entropy(head.distribution(output, log_std))
    assert estimates.mean().item() == pytest.approx(exact, abs=4 * estimates.std().item() / math.sqrt(100_000))
    assert estimates.mean().item() < 0.5 * math.log(2 * math.pi * math.e * std**2)  # squashing lowers it
    estimates.mean().backward()
    assert output.grad.abs().sum() > 0 and log_std.grad.abs().sum() > 0


def test_state_dependent_scale_is_torchrls_biased_softplus():
    """BenchMARL's "biased_softplus_1.0": scale = softplus(raw + log(expm1(0.99))) + 0.01, 1.0 at raw = 0."""
    head = PolicyHead(False, torch.ones(1, 2), scale="state", scale_bias=1.0, scale_min=0.01)
    assert head.outputs_per_action == 2
    raw = torch.tensor([0.0, -50.0, 3.0])
    output = torch.stack([torch.tensor([0.5, -0.5, 0.0]), torch.zeros(3), raw, raw], dim=-1)[None]  # [mean, raw]
    dist = head.distribution(output)
    expected = nn.functional.softplus(raw + math.log(math.expm1(0.99))) + 0.01
    torch.testing.assert_close(dist.stddev[0, :, 0], expected)
    torch.testing.assert_close(dist.stddev[0, 0], torch.ones(2))
    assert dist.stddev.min() >= 0.01
    torch.testing.assert_close(dist.mean[0, :, 0], torch.tensor([0.5, -0.5, 0.0]))


def test_greedy_action_is_the_squashed_mean_and_padded_dimensions_stay_finite():
    head = PolicyHead(False, MASK, squash_bounds=(LOW, HIGH))
    output = torch.tensor([[[0.3, -1.0]], [[2.0, 5.0]]])
    dist = head.distribution(output, torch.zeros(2, 2))
    greedy = head.greedy(dist)
    torch.testing.assert_close(greedy[0, 0], torch.tensor([math.tanh(0.3), 0.5 + 2.5 * math.tanh(-1.0)]))
    torch.testing.assert_close(greedy[1, 0, 0], torch.tensor(0.5 * math.tanh(2.0)))
    assert bool(torch.isfinite(head.log_prob(dist, dist.sample())).all())
    assert bool(torch.isfinite(head.entropy(dist)).all())


def test_policy_head_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="discrete"):
        PolicyHead(True, torch.ones(1, 3), squash_bounds=(torch.zeros(1, 3), torch.ones(1, 3)))
    with pytest.raises(ValueError, match="finite action bounds"):
        PolicyHead(False, torch.ones(1, 1), squash_bounds=(torch.full((1, 1), -math.inf), torch.ones(1, 1)))
    with pytest.raises(ValueError, match="scale_min < scale_bias"):
        PolicyHead(False, torch.ones(1, 1), scale="state", scale_bias=0.01, scale_min=0.01)
    with pytest.raises(ValueError, match="unknown action scale"):
        PolicyHead(False, torch.ones(1, 1), scale="exp")


def test_torch_init_is_nn_linears_own_and_orthogonal_keeps_its_gain():
    torch.manual_seed(3)
    network = mlp(5, (8,), 2, init="torch")
    torch.manual_seed(3)
    expected = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    for p, q in zip(network.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    orthogonal = mlp(5, (8,), 2, output_gain=0.01)
    assert orthogonal[-1].weight.abs().max() < 0.02 and orthogonal[-1].bias.abs().max() == 0
    with pytest.raises(ValueError, match="unknown init"):
        mlp(5, (8,), 2, init="xavier")


def _continuous_pool() -> EnvPool:
    return EnvPool(make_env_factory("simple_spread", agents=2, continuous=True), copies=2, seed=0)


def test_trainer_stores_the_latent_and_sends_the_squashed_action():
    pool = _continuous_pool()
    config = dataclasses.replace(SMALL, action_scale="state", squash=True, init="torch", adam_eps=1e-6)
    trainer = MAPPOTrainer(pool, config, k=2, k_until=None, device="cpu", seed=0)
    assert len(trainer.log_std) == 0 and trainer.actor[0][-1].out_features == 2 * pool.spaces.action_size
    assert trainer.actor_optimizer.defaults["eps"] == trainer.critic_optimizer.defaults["eps"] == 1e-6
    sent, step = [], pool.step
    pool.step = lambda actions: sent.append(actions) or step(actions)
    batch, _ = trainer._collect()
    sent_actions = torch.as_tensor(np.stack(sent), dtype=torch.float32).flatten(0, 1)  # [T * copies, agents, dims]
    low, high = (torch.as_tensor(bound) for bound in (pool.spaces.action_low, pool.spaces.action_high))
    assert bool(((sent_actions >= low) & (sent_actions <= high)).all())
    centre, half_range = (high + low) / 2, (high - low) / 2
    torch.testing.assert_close(sent_actions, centre + half_range * torch.tanh(batch["actions"]))
    with torch.no_grad():
        dist = trainer._distribution(batch["obs"].transpose(0, 1))
        log_prob = trainer.head.log_prob(dist, batch["actions"].transpose(0, 1))
    torch.testing.assert_close(batch["old_log_prob"], log_prob.T)
    metrics = trainer.iteration()
    assert all(math.isfinite(metrics[name]) for name in ("actor_loss", "value_loss", "entropy"))
    greedy = torch.as_tensor(trainer.act(pool.obs, deterministic=True))
    assert greedy.shape == (2, 2, pool.spaces.action_size) and bool(((greedy >= low) & (greedy <= high)).all())


@pytest.mark.parametrize("normalize", [True, False])
def test_advantages_are_standardized_only_when_asked(monkeypatch, normalize):
    seen = []
    original = mappo_module.joint_ratio_loss
    monkeypatch.setattr(mappo_module, "joint_ratio_loss", lambda *a, **kw: seen.append(a[2]) or original(*a, **kw))
    config = dataclasses.replace(SMALL, epochs=1, minibatches=1, normalize_advantages=normalize)
    trainer = MAPPOTrainer(_continuous_pool(), config, k=1, k_until=None, device="cpu", seed=0)
    batch, _ = trainer._collect()
    trainer._update(batch)
    raw = batch["advantages"]
    expected = (raw - raw.mean()) / (raw.std(unbiased=False) + 1e-8) if normalize else raw
    # One minibatch of every sample in a permuted order: compare the sorted values.
    torch.testing.assert_close(seen[0].flatten().sort().values, expected.flatten().sort().values)


def test_recurrent_trainer_refuses_the_feed_forward_options():
    mappo = dataclasses.replace(MAPPOConfig(), recurrent=True, squash=True)
    with pytest.raises(ValueError, match="--mappo.squash is an option of the feed-forward MAPPO trainers"):
        choose_trainer("mappo", "simple_spread", mappo, 1000)


def test_without_return_normalization_the_rollout_uses_the_critics_values_as_they_are():
    """normalize_returns off: the critic learns raw targets, so GAE must run against its raw outputs (the
    unused normalizer's neutral moments once scaled them by 0.1)."""
    config = dataclasses.replace(SMALL, normalize_returns=False)
    trainer = MAPPOTrainer(_continuous_pool(), config, k=1, k_until=None, device="cpu", seed=0)
    trainer._values = lambda state: torch.full((state.shape[0], 2), 2.0)
    batch, _ = trainer._collect()
    torch.testing.assert_close(batch["targets"] - batch["advantages"], torch.full_like(batch["targets"], 2.0))


@pytest.mark.parametrize("normalize_returns", [True, False])
def test_shared_value_is_one_value_of_the_state_for_every_agent(normalize_returns):
    """shared_value (BenchMARL's MAPPO critic, share_param_critic True): the critic reads the state alone and its one
    output is every agent's value; with return normalization the moments are pooled over the agents' targets."""
    config = dataclasses.replace(SMALL, shared_value=True, normalize_returns=normalize_returns)
    trainer = MAPPOTrainer(_continuous_pool(), config, k=1, k_until=None, device="cpu", seed=0)
    state_size = trainer.pool.spaces.state_size
    assert trainer.critic[0].in_features == state_size
    states = torch.randn(7, state_size)
    with torch.no_grad():
        values = trainer._values(states)
        torch.testing.assert_close(values, trainer.critic(states).expand(7, 2))
    batch, _ = trainer._collect()
    trainer._update(batch)
    if normalize_returns:
        trainer_mean, _ = trainer.returns._moments()
        targets = batch["targets"].double()
        torch.testing.assert_close(trainer_mean, targets.mean().reshape(1))


def test_shared_actor_without_agent_id_reads_the_observation_alone():
    """actor_id off (BenchMARL's shared policy): the feed-forward shared actor's input is the observation, so agents
    with equal observations get equal outputs; per-agent actors, which read no id, refuse it."""
    config = dataclasses.replace(SMALL, actor_id=False)
    trainer = MAPPOTrainer(_continuous_pool(), config, k=1, k_until=None, device="cpu", seed=0)
    obs_size = trainer.pool.spaces.obs_size
    assert trainer.actor[0][0].in_features == obs_size
    obs = torch.randn(1, 5, obs_size).expand(2, 5, obs_size)
    with torch.no_grad():
        outputs = trainer.actor(obs)
    torch.testing.assert_close(outputs[0], outputs[1])
    choose_trainer("mappo", "simple_spread", config, steps=1000)
    with pytest.raises(OptionError, match="mappo.actor-id"):
        dataclasses.replace(config, share_actor=False).validate()
