"""K-MADDPG and K-FACMAC: replay, losses against hand computations, the KPG actor coupling against
a brute force, smoke runs and exact resumption.

The brute force takes the algorithm as docs/algorithm.md states it: at every level each agent's
gradient is that of its loss with its own actor at the base parameters and every other agent's
actor a deep copy stepped one level earlier by a torch.optim.Adam copy of the base optimizer
state; only the last level is committed.
"""

import contextlib
import copy
import math
import types

import numpy as np
import pytest
import torch
from gymnasium import spaces as gym_spaces
from pettingzoo import ParallelEnv
from torch import nn

from kpg.algos import FACMACConfig, FACMACTrainer, MADDPGConfig, MADDPGTrainer
from kpg.algos.common import gumbel_noise, polyak_update, straight_through_gumbel_softmax
from kpg.algos.facmac import MonotonicMixer
from kpg.algos.replay import ReplayBuffer
from kpg.app.checkpoint import load_checkpoint, save_checkpoint
from kpg.app.train import TrainConfig, train
from kpg.envs import EnvPool, make_env_factory
from kpg.nn import AgentLinear, AgentMLP

TRAINERS = {"maddpg": (MADDPGTrainer, MADDPGConfig), "facmac": (FACMACTrainer, FACMACConfig)}


class HeterogeneousEnv(ParallelEnv):
    """Three agents with observation sizes 2, 3, 4 and action sizes 1, 2, 2 (continuous, agent a's
    in [0, 2]) or 2, 3, 4 actions (discrete). Agent c's task ends at step ``c_ends``; the episode
    is cut off by a time limit at ``max_steps``, or ended by the task for everyone at
    ``all_end`` when given; ``has_state=False`` leaves ``state()`` unimplemented. Every observation
    is the tail of the global state, whose last entry is the time, so final observations are told
    apart from those after a reset."""

    metadata = {"name": "heterogeneous_v0"}

    def __init__(self, discrete=False, max_steps=6, c_ends=3, all_end=None, has_state=True):
        self.possible_agents = ["a", "b", "c"]
        self.discrete, self.max_steps, self.c_ends, self.all_end = discrete, max_steps, c_ends, all_end
        self.has_state = has_state
        self.obs_sizes = {"a": 2, "b": 3, "c": 4}
        self.action_sizes = {"a": 2, "b": 3, "c": 4} if discrete else {"a": 1, "b": 2, "c": 2}
        self.agents = []

    def observation_space(self, agent):
        return gym_spaces.Box(-np.inf, np.inf, (self.obs_sizes[agent],), np.float32)

    def action_space(self, agent):
        if self.discrete:
            return gym_spaces.Discrete(self.action_sizes[agent])
        low = 0.0 if agent == "a" else -1.0
        return gym_spaces.Box(low, low + 2.0, (self.action_sizes[agent],), np.float32)

    def state(self):
        if not self.has_state:
            raise NotImplementedError
        return self._global()

    def _global(self):
        return np.concatenate([self.position, [self.t / self.max_steps]]).astype(np.float32)

    def _observations(self):
        return {agent: self._global()[-self.obs_sizes[agent] :] for agent in self.agents}

    def reset(self, seed=None, options=None):
        self.position = np.random.default_rng(seed).normal(size=4)
        self.t = 0
        self.agents = list(self.possible_agents)
        return self._observations(), {agent: {} for agent in self.agents}

    def step(self, actions):
        self.t += 1
        for index, agent in enumerate(self.agents):
            move = actions[agent] - 1 if self.discrete else np.asarray(actions[agent]).sum()
            self.position[index] += 0.1 * float(move)
        rewards = {agent: -float(np.abs(self.position).sum()) - 0.1 * i for i, agent in enumerate(self.agents)}
        terminations = {
            agent: (agent == "c" and self.t == self.c_ends) or self.t == self.all_end for agent in self.agents
        }
        truncations = dict.fromkeys(self.agents, self.t >= self.max_steps)
        observations = self._observations()
        self.agents = [a for a in self.agents if not (terminations[a] or truncations[a])]
        return observations, rewards, terminations, truncations, {agent: {} for agent in observations}


def heterogeneous_pool(copies=2, seed=0, **options):
    return EnvPool(lambda: HeterogeneousEnv(**options), copies, seed=seed)


def simple_spread_pool(copies=2, seed=0):
    return EnvPool(make_env_factory("simple_spread", agents=3), copies, seed=seed)


def small_config(algo, **overrides):
    values = dict(
        buffer_size=500,
        batch_size=16,
        rollout=5,
        updates_per_iteration=1,
        learning_starts=0,
        hidden=(8,),
        actor_regularization=0.1,
    )
    if algo == "facmac":
        values.update(mixer_embed=4, hypernet_embed=6)
    values.update(overrides)
    return TRAINERS[algo][1](**values)


# ---- replay ----------------------------------------------------------------------------------------


def test_replay_buffer_wraps_samples_and_round_trips():
    fields = {"x": ((2,), torch.float32), "alive": ((1,), torch.float32)}
    buffer = ReplayBuffer(3, fields)
    buffer.add({"x": [[1, 1], [2, 2]], "alive": [[1], [1]]})
    buffer.add({"x": [[3, 3], [4, 4]], "alive": [[1], [0]]})
    assert len(buffer) == 3 and buffer.position == 1
    assert buffer.storage["x"][:, 0].tolist() == [4, 2, 3]  # the oldest row was overwritten
    draws = buffer.sample(5, np.random.default_rng(7))["x"][:, 0]
    expected = torch.tensor([[4.0, 2.0, 3.0][i] for i in np.random.default_rng(7).integers(0, 3, size=5)])
    assert torch.equal(draws, expected)
    restored = ReplayBuffer(3, fields)
    restored.load_state_dict(buffer.state_dict())
    assert restored.size == 3 and restored.position == 1
    assert all(torch.equal(restored.storage[n], buffer.storage[n]) for n in fields)
    with pytest.raises(ValueError, match="must be \\[rows, 2\\]"):
        buffer.add({"x": [[1, 2, 3]], "alive": [[1]]})
    with pytest.raises(ValueError, match="missing \\['alive'\\]"):
        buffer.add({"x": [[1, 2]]})
    with pytest.raises(ValueError, match="same capacity"):
        ReplayBuffer(4, fields).load_state_dict(buffer.state_dict())
    with pytest.raises(ValueError, match="empty replay buffer"):
        ReplayBuffer(3, fields).sample(1, np.random.default_rng(0))


def test_pool_keeps_final_observations_and_tells_truncation_from_termination():
    pool = heterogeneous_pool(copies=2)
    zero = np.zeros((2, 3, 2), dtype=np.float32)
    steps = [pool.step(zero) for _ in range(6)]
    # Step 3: agent c's task ended it: no bootstrap, no next observation; it does not act afterwards.
    assert steps[2].terminated[:, 2].tolist() == [1, 1] and steps[2].next_present[:, 2].tolist() == [0, 0]
    assert steps[2].alive[:, 2].tolist() == [0, 0] and steps[3].reward[:, 2].tolist() == [0, 0]
    # Step 6: the time limit ended the episode; a and b bootstrap from the final state and observations.
    last = steps[5]
    assert last.terminated.sum() == 0 and last.done[:, :2].all()
    assert last.next_present.tolist() == [[1, 1, 0], [1, 1, 0]]
    for c in range(2):
        assert last.next_state[c, -1] == 1.0 and last.state[c, -1] == 0.0  # final time, not the reset's
        assert np.array_equal(last.next_obs[c, 0, :2], last.next_state[c, -2:])
        assert np.array_equal(last.next_obs[c, 1, :3], last.next_state[c, -3:])
        assert not last.next_obs[c, 2].any()
    # Mid-episode, the next observations and state are the step's own.
    assert np.array_equal(steps[1].next_obs, steps[1].obs) and np.array_equal(steps[1].next_state, steps[1].state)
    # Every agent ended by the task: nothing is present after the step.
    pool = heterogeneous_pool(copies=1, all_end=2)
    pool.step(zero[:1])
    step = pool.step(zero[:1])
    assert step.terminated.tolist() == [[1, 1, 1]] and step.next_present.sum() == 0
    # Without env.state() the global state is the padded observations of the agents that go on or were cut off.
    pool = heterogeneous_pool(copies=1, has_state=False)
    for _ in range(6):
        step = pool.step(zero[:1])
    assert np.array_equal(step.next_state[0], step.next_obs[0].reshape(-1))
    assert step.next_obs[0, 0, 1] == 1.0 and step.state[0, 1] == 0.0  # final time, not the reset's


@pytest.mark.parametrize("algo", ["maddpg", "facmac"])
def test_replay_holds_the_final_observations_of_time_limited_episodes(algo):
    trainer_class, _ = TRAINERS[algo]
    # Six steps are one episode; learning_starts keeps the trainer collecting.
    trainer = trainer_class(
        heterogeneous_pool(copies=2),
        small_config(algo, rollout=6, learning_starts=100),
        k=2,
        k_until=None,
        device="cpu",
        seed=0,
    )
    trainer.iteration()
    rows = {name: value[:12].view(6, 2, *value.shape[1:]) for name, value in trainer.buffer.storage.items()}
    assert len(trainer.buffer) == 12 and (rows["state"][0, :, -1] == 0).all()
    last = {name: value[5] for name, value in rows.items()}  # the time-limited step, both copies
    assert last["next_present"].tolist() == [[1, 1, 0], [1, 1, 0]] and last["terminated"].sum() == 0
    assert (last["next_state"][:, -1] == 1.0).all()  # the final state, not the reset's
    assert torch.equal(last["next_obs"][:, 1, :3], last["next_state"][:, -3:])
    assert (rows["next_present"][2, :, 2] == 0).all() and (rows["alive"][3:, :, 2] == 0).all()  # c ended at step 3


# ---- losses against hand computations ---------------------------------------------------------------


def test_polyak_update_by_hand():
    source, target = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        source.weight.copy_(torch.tensor([[1.0, 2.0]])), source.bias.fill_(4.0)
        target.weight.copy_(torch.tensor([[-1.0, 0.0]])), target.bias.fill_(0.0)
    polyak_update(target, source, tau=0.25)
    assert torch.equal(target.weight, torch.tensor([[-0.5, 0.5]])) and torch.equal(target.bias, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="tau"):
        polyak_update(target, source, tau=0.0)


def test_straight_through_gumbel_softmax_by_hand():
    logits = torch.tensor([[0.5, 2.0, 1.0, 9.0]], dtype=torch.float64, requires_grad=True)
    noise = torch.tensor([[0.3, -0.2, 0.4, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)  # the last action is padding
    temperature = 0.5
    actions = straight_through_gumbel_softmax(logits, noise, temperature, mask)
    assert actions.tolist() == [[0.0, 1.0, 0.0, 0.0]]  # argmax of (0.8, 1.8, 1.4) among the real actions
    weights = torch.tensor([[1.0, -2.0, 3.0, 5.0]], dtype=torch.float64)
    (actions * weights).sum().backward()
    z = torch.tensor([0.8, 1.8, 1.4], dtype=torch.float64) / temperature
    soft = torch.exp(z) / torch.exp(z).sum()
    w = weights[0, :3]
    expected = soft * (w - (soft * w).sum()) / temperature  # softmax Jacobian-vector product
    assert torch.allclose(logits.grad[0, :3], expected, rtol=1e-12, atol=0)
    assert logits.grad[0, 3] == 0


def test_monotonic_mixer_by_hand_and_monotonic():
    mixer = MonotonicMixer(num_agents=2, state_size=1, embed=2, hypernet_embed=3).double()
    with torch.no_grad():
        for layer, bias in (
            (mixer.hyper_w1[-1], [-1.0, 2.0, 0.5, -3.0]),
            (mixer.hyper_b1, [0.1, -0.2]),
            (mixer.hyper_w2[-1], [-2.0, 1.0]),
            (mixer.value[-1], [0.7]),
        ):
            layer.weight.zero_()
            layer.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    q = mixer(torch.tensor([[1.0, -1.0]], dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64))
    # W1 = |[[-1, 2], [0.5, -3]]|: u W1 + b1 = (1 - 0.5 + 0.1, 2 - 3 - 0.2); w2 = (2, 1).
    expected = 2 * 0.6 + 1 * (math.exp(-1.2) - 1) + 0.7
    assert q.item() == pytest.approx(expected, rel=1e-12)
    torch.manual_seed(1)
    mixer = MonotonicMixer(num_agents=4, state_size=5).double()
    utilities = torch.randn(3, 64, 4, dtype=torch.float64, requires_grad=True)
    q = mixer(utilities, torch.randn(64, 5, dtype=torch.float64))
    assert q.shape == (3, 64)
    (gradient,) = torch.autograd.grad(q.sum(), utilities)
    assert bool((gradient >= 0).all()) and bool((gradient > 0).any())


def manual_member(network: AgentMLP, member: int, x: torch.Tensor, activation=torch.relu) -> torch.Tensor:
    """Agent ``member``'s network of an agent-batched MLP as a plain MLP on [batch, inputs]."""
    linears = [layer for layer in network if isinstance(layer, AgentLinear)]
    for layer, linear in enumerate(linears):
        x = x @ linear.weight[member].T + linear.bias[member]
        if layer < len(linears) - 1:
            x = activation(x)
    return x.squeeze(-1)


def hand_batch(trainer, generator):
    """Three transitions of the heterogeneous task: an ordinary one; a time-limited end (a and b go
    on, c had ended); one where b's task ended while a goes on and c did not act."""
    n, obs_size, state_size, action_size = (
        3,
        trainer.spaces.obs_size,
        trainer.spaces.state_size,
        trainer.spaces.action_size,
    )
    dtype = torch.float64
    mask = trainer.action_mask
    batch = {
        "obs": torch.randn(3, n, obs_size, generator=generator, dtype=dtype),
        "state": torch.randn(3, state_size, generator=generator, dtype=dtype),
        "alive": torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0]], dtype=dtype),
        "actions": torch.rand(3, n, action_size, generator=generator, dtype=dtype) * 2 - 1,
        "reward": torch.tensor([[-1.0, -2.0, -3.0], [0.5, 0.25, 0.0], [2.0, -1.0, 0.0]], dtype=dtype),
        "terminated": torch.tensor([[0, 0, 0], [0, 0, 0], [0, 1, 0]], dtype=dtype),
        "next_obs": torch.randn(3, n, obs_size, generator=generator, dtype=dtype),
        "next_state": torch.randn(3, state_size, generator=generator, dtype=dtype),
        "next_present": torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=dtype),
    }
    batch["actions"] = batch["actions"] * mask * batch["alive"][..., None]
    return batch


def target_actions_by_hand(trainer, next_obs, present):
    """The target actors' actions [batch, agents, action_size]: tanh of each agent's own network
    on its observation, zero in padded dimensions and for absent agents."""
    rows = []
    for j in range(trainer.num_agents):
        out = trainer.target_actor[j](next_obs[:, j])
        rows.append(torch.tanh(out) * trainer.action_mask[j] * present[:, j : j + 1])
    return torch.stack(rows, dim=1)


def test_maddpg_critic_loss_by_hand(float64):
    trainer = MADDPGTrainer(
        heterogeneous_pool(), small_config("maddpg", gamma=0.9), k=1, k_until=None, device="cpu", seed=0
    )
    batch = hand_batch(trainer, torch.Generator().manual_seed(0))
    loss, _ = trainer.critic_loss(batch)
    next_joint = target_actions_by_hand(trainer, batch["next_obs"], batch["next_present"]).flatten(1)
    joint = batch["actions"].flatten(1)
    expected = 0.0
    for i in range(3):
        next_q = manual_member(
            trainer.target_critic, i, torch.cat([batch["next_state"], next_joint], dim=1), nn.functional.elu
        )
        target = batch["reward"][:, i] + 0.9 * (1 - batch["terminated"][:, i]) * next_q
        q = manual_member(trainer.critic, i, torch.cat([batch["state"], joint], dim=1), nn.functional.elu)
        alive = batch["alive"][:, i]
        expected = expected + ((q - target) ** 2 * alive).sum() / alive.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    # b's terminated transition does not depend on the next state; a's time-limited one does.
    moved = {**batch, "next_state": batch["next_state"] + torch.tensor([[0.0], [0.0], [1.0]])}
    assert trainer.critic_loss(moved)[0].item() != pytest.approx(loss.item(), rel=1e-9)
    only_b = {**moved, "alive": torch.tensor([[0.0, 1, 0]] * 3)}
    unmoved_b = {**batch, "alive": only_b["alive"]}
    assert trainer.critic_loss(only_b)[0].item() == pytest.approx(trainer.critic_loss(unmoved_b)[0].item(), rel=1e-12)


def test_facmac_critic_loss_by_hand(float64):
    trainer = FACMACTrainer(
        heterogeneous_pool(),
        small_config("facmac", gamma=0.9, share_actor=False, share_utility=False),
        k=1,
        k_until=None,
        device="cpu",
        seed=0,
    )
    batch = hand_batch(trainer, torch.Generator().manual_seed(1))
    loss, _ = trainer.critic_loss(batch)
    next_actions = target_actions_by_hand(trainer, batch["next_obs"], batch["next_present"])
    utility, target_utility = trainer.critic["utility"], trainer.target_critic["utility"]
    next_u = (
        torch.stack(
            [
                manual_member(target_utility, j, torch.cat([batch["next_obs"][:, j], next_actions[:, j]], 1))
                for j in range(3)
            ],
            1,
        )
        * batch["next_present"]
    )
    u = (
        torch.stack(
            [manual_member(utility, j, torch.cat([batch["obs"][:, j], batch["actions"][:, j]], 1)) for j in range(3)], 1
        )
        * batch["alive"]
    )
    team_reward = torch.tensor([-2.0, 0.375, 0.5], dtype=torch.float64)  # mean over the agents that acted
    continues = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)  # someone goes on in every transition
    target = team_reward + 0.9 * continues * trainer.target_critic["mixer"](next_u, batch["next_state"])
    expected = ((trainer.critic["mixer"](u, batch["state"]) - target) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    # Nobody goes on: the target is the reward alone.
    ended = {**batch, "next_present": torch.zeros(3, 3, dtype=torch.float64)}
    q = trainer.critic["mixer"](u, batch["state"])
    assert trainer.critic_loss(ended)[0].item() == pytest.approx(((q - team_reward) ** 2).mean().item(), rel=1e-12)


def test_actor_losses_by_hand_at_level_one(float64):
    level_one = types.SimpleNamespace(level=1)
    maddpg = MADDPGTrainer(heterogeneous_pool(), small_config("maddpg"), k=1, k_until=None, device="cpu", seed=0)
    batch = hand_batch(maddpg, torch.Generator().manual_seed(2))
    outputs = [maddpg.actor[j](batch["obs"][:, j]) for j in range(3)]
    actions = torch.stack(
        [torch.tanh(o) * maddpg.action_mask[j] * batch["alive"][:, j : j + 1] for j, o in enumerate(outputs)], 1
    )
    penalty = [((o**2) * maddpg.action_mask[j]).sum(1) / maddpg.spaces.action_sizes[j] for j, o in enumerate(outputs)]
    losses = maddpg.actor_losses(level_one, batch, None)
    for i in range(3):
        q = manual_member(maddpg.critic, i, torch.cat([batch["state"], actions.flatten(1)], 1), nn.functional.elu)
        alive = batch["alive"][:, i]
        expected = -(q * alive).sum() / alive.sum() + 0.1 * (penalty[i] * alive).sum() / alive.sum()
        assert losses[i].item() == pytest.approx(expected.item(), rel=1e-12)
    facmac = FACMACTrainer(
        heterogeneous_pool(),
        small_config("facmac", share_actor=False, share_utility=False),
        k=1,
        k_until=None,
        device="cpu",
        seed=0,
    )
    outputs = [facmac.actor[j](batch["obs"][:, j]) for j in range(3)]
    actions = [torch.tanh(o) * facmac.action_mask[j] * batch["alive"][:, j : j + 1] for j, o in enumerate(outputs)]
    u = (
        torch.stack(
            [
                manual_member(facmac.critic["utility"], j, torch.cat([batch["obs"][:, j], actions[j]], 1))
                for j in range(3)
            ],
            1,
        )
        * batch["alive"]
    )
    penalty = sum(
        (((o**2) * facmac.action_mask[j]).sum(1) / facmac.spaces.action_sizes[j] * batch["alive"][:, j]).sum()
        / batch["alive"][:, j].sum()
        for j, o in enumerate(outputs)
    )
    expected = -facmac.critic["mixer"](u, batch["state"]).mean() + 0.1 * penalty
    assert facmac.actor_losses(level_one, batch, None).item() == pytest.approx(expected.item(), rel=1e-12)


# ---- the KPG coupling against a brute force ---------------------------------------------------------


def brute_force_loss(trainer, agent, networks, batch, noise, level=1):
    """Agent ``agent``'s actor loss where agent j's outputs come from ``networks[j]``; only the
    agent's own network keeps its gradient. From level 2 the others' actions are their anticipated
    (relaxed, for discrete actions) ones."""
    obs, alive = batch["obs"].transpose(0, 1), batch["alive"].T
    n = trainer.num_agents
    rows = []
    for j in range(n):
        x = obs[j]
        if trainer.config.share_actor:
            x = torch.cat(
                [x, nn.functional.one_hot(torch.tensor(j, device=x.device), n).to(x.dtype).expand(x.shape[0], n)], dim=1
            )
        out = networks[j](x)
        rows.append(out if j == agent else out.detach())
    outputs = torch.stack(rows)
    actions = trainer.policy_actions(outputs, noise)
    if level >= 2:
        others = trainer.anticipated_actions(outputs.detach(), noise)
        actions = torch.stack([actions[j] if j == agent else others[j] for j in range(n)])
    actions = actions * alive[..., None]
    penalty = trainer.config.actor_regularization * trainer.output_penalty(outputs, alive)[agent]
    if isinstance(trainer, MADDPGTrainer):
        q = trainer.q_values(trainer.critic, batch["state"], actions.transpose(0, 1).flatten(1))[agent]
        return -(q * alive[agent]).sum() / alive[agent].sum().clamp_min(1) + penalty
    utilities = trainer.utilities(trainer.critic, obs, actions) * alive
    return -trainer.critic["mixer"](utilities.T, batch["state"]).mean() + penalty


def actor_networks(trainer):
    """The networks the actor optimizer steps as torch.nn modules: the shared one, or one per agent
    (copies of a batched network's agents)."""
    return [trainer.actor[0]] if trainer.actor.layout == "shared" else trainer.actor.per_agent_networks()


def adam_step_from_base(trainer, network_index, base_network, grads):
    """A copy of ``base_network`` stepped once by torch.optim.Adam from the trainer's base Adam
    state, after clipping the gradient by norm as KPGOptimizer does per agent."""
    stepped = copy.deepcopy(base_network)
    adam = torch.optim.Adam(stepped.parameters(), lr=trainer.config.actor_lr, foreach=False)
    kpg_state = trainer.actor_optimizer.state
    for p, original, g in zip(
        stepped.parameters(), trainer.actor_optimizer.param_groups[network_index]["params"], grads
    ):
        saved = kpg_state[original]
        adam.state[p] = {
            "step": torch.tensor(float(saved["step"])),
            "exp_avg": saved["exp_avg"].clone(),
            "exp_avg_sq": saved["exp_avg_sq"].clone(),
        }
        p.grad = g.clone()
    nn.utils.clip_grad_norm_(stepped.parameters(), trainer.config.max_grad_norm)
    adam.step()
    return stepped


def brute_force_actor_step(trainer, batch, noise, k):
    shared = trainer.config.share_actor
    n = trainer.num_agents
    base = [copy.deepcopy(net) for net in actor_networks(trainer)]
    network_of = (lambda j: 0) if shared else (lambda j: j)
    anticipated = base
    for level in range(1, k + 1):
        grads = [[torch.zeros_like(p) for p in net.parameters()] for net in base]
        for agent in range(n):
            own = copy.deepcopy(base[network_of(agent)])
            networks = [own if j == agent else anticipated[network_of(j)] for j in range(n)]
            loss = brute_force_loss(trainer, agent, networks, batch, noise, level)
            for total, g in zip(grads[network_of(agent)], torch.autograd.grad(loss, list(own.parameters()))):
                total += g
        anticipated = [adam_step_from_base(trainer, m, base[m], grads[m]) for m in range(len(base))]
    return anticipated


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize(
    "algo,env,shared",
    [
        ("maddpg", "heterogeneous", False),
        ("maddpg", "simple_spread", False),
        ("maddpg", "heterogeneous-discrete", True),
        ("facmac", "heterogeneous", True),
        ("facmac", "simple_spread", False),
    ],
)
def test_actor_step_matches_brute_force(float64, algo, env, shared, k, device):
    discrete = env == "simple_spread" or env.endswith("discrete")
    pool = simple_spread_pool() if env == "simple_spread" else heterogeneous_pool(discrete=discrete)
    trainer_class, _ = TRAINERS[algo]
    # The others' one-hot actions change between levels only where an argmax flips: a large step makes some flip.
    config = small_config(algo, share_actor=shared, max_grad_norm=0.05, actor_lr=0.3 if discrete else 1e-2)
    trainer = trainer_class(pool, config, k=k, k_until=None, device=str(device), seed=3)
    # Equally sized agents without sharing get one kpg.nn batched network; the heterogeneous ones one network each.
    assert trainer.actor.layout == ("shared" if shared else "batched" if env == "simple_spread" else "per_agent")
    trainer.iteration()  # a real update first, so the Adam state is not the initial one
    trainer.iteration()
    batch = trainer.buffer.sample(16, np.random.default_rng(5))
    noise = trainer.actor_noise(16)
    expected = brute_force_actor_step(trainer, batch, noise, k)
    if k > 1:  # the comparison can tell the anticipated others from the current ones
        plain = brute_force_actor_step(trainer, batch, noise, 1)
        gap = max(
            (p - q).abs().max().item() for a, b in zip(expected, plain) for p, q in zip(a.parameters(), b.parameters())
        )
        assert gap > 1e-6
    trainer.actor_step(batch, noise)
    for network, reference in zip(actor_networks(trainer), expected):
        for p, q in zip(network.parameters(), reference.parameters()):
            assert torch.allclose(p, q, rtol=1e-10, atol=1e-12), (p - q).abs().max()


def test_k2_differs_from_k1(float64):
    results = []
    for k in (1, 2):
        trainer = MADDPGTrainer(
            heterogeneous_pool(), small_config("maddpg", actor_lr=0.05), k=k, k_until=None, device="cpu", seed=3
        )
        trainer.iteration()
        trainer.actor_step(trainer.buffer.sample(16, np.random.default_rng(5)), None)
        results.append(torch.cat([p.flatten() for p in trainer.actor.parameters()]))
    assert not torch.allclose(results[0], results[1])


# ---- runs --------------------------------------------------------------------------------------------


def smoke_config(algo, env, tmp_path, **options):
    overrides = dict(
        buffer_size=2_000, batch_size=32, rollout=25, updates_per_iteration=2, learning_starts=50, hidden=(16,)
    )
    return TrainConfig(
        algo=algo,
        env=env,
        steps=200,
        copies=2,
        logdir=tmp_path,
        tensorboard=False,
        progress=False,
        **{algo: TRAINERS[algo][1](**overrides)},
        **options,
    )


@pytest.mark.parametrize("algo", ["maddpg", "facmac"])
def test_smoke_simple_spread(algo, tmp_path):
    summary = train(smoke_config(algo, "simple_spread", tmp_path, eval_episodes=2))
    assert summary["env_steps"] == 200 and summary["updates"] == 4
    assert math.isfinite(summary["recent_return"]) and math.isfinite(summary["eval_return"])
    assert len(summary["actor_level_seconds"]) == 2
    rows = (tmp_path / summary["run"] / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    last = dict(zip(header, rows[-1].split(",")))
    assert math.isfinite(float(last["critic_loss"])) and math.isfinite(float(last["actor_loss"]))
    assert float(last["gradient_steps"]) == 8


@pytest.mark.parametrize("algo", ["maddpg", "facmac"])
def test_smoke_heterogeneous_discrete_with_early_termination(algo):
    trainer_class, _ = TRAINERS[algo]
    trainer = trainer_class(
        heterogeneous_pool(discrete=True), small_config(algo), k=2, k_until=20, device="cpu", seed=0
    )
    metrics = [trainer.iteration() for _ in range(3)]
    assert all(math.isfinite(m["critic_loss"]) and math.isfinite(m["actor_loss"]) for m in metrics)
    assert metrics[0]["k"] == 2 and metrics[-1]["k"] == 1  # 10 environment steps per iteration, k_until=20
    assert trainer.act(trainer.pool.obs, deterministic=True).shape == (2, 3)


@pytest.mark.parametrize("algo", ["maddpg", "facmac"])
def test_smoke_mamujoco_half_cheetah(algo, tmp_path):
    pytest.importorskip("gymnasium_robotics")
    pytest.importorskip("mujoco")
    summary = train(smoke_config(algo, "mamujoco:HalfCheetah-2x3", tmp_path, eval_episodes=0))
    assert summary["env_steps"] == 200 and summary["agents"] == 2
    trainer_class, _ = TRAINERS[algo]
    actions = trainer_class(
        EnvPool(make_env_factory("mamujoco:HalfCheetah-2x3"), 1, seed=0),
        small_config(algo),
        k=2,
        k_until=None,
        device="cpu",
        seed=0,
    ).act(np.zeros((1, 2, 12), np.float32), deterministic=False)
    assert actions.shape == (1, 2, 3) and np.abs(actions).max() <= 1.0


def all_state(trainer):
    tensors = {}
    for name, module in (
        ("actor", trainer.actor),
        ("target_actor", trainer.target_actor),
        ("critic", trainer.critic),
        ("target_critic", trainer.target_critic),
    ):
        tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    for name, value in trainer.buffer.storage.items():
        tensors[f"replay.{name}"] = value
    for i, state in trainer.actor_optimizer.state_dict()["state"].items():
        tensors.update({f"actor_optimizer.{i}.{k}": v for k, v in state.items()})
    return tensors


@pytest.mark.parametrize("algo", ["maddpg", "facmac"])
def test_resume_continues_exactly(algo, tmp_path):
    trainer_class, _ = TRAINERS[algo]
    # 25 steps per copy is one simple_spread episode, so checkpoints fall on episode starts.
    config = small_config(algo, rollout=25, learning_starts=50, updates_per_iteration=2, buffer_size=120)
    pool = simple_spread_pool()
    trainer = trainer_class(pool, config, k=2, k_until=None, device="cpu", seed=0)
    for _ in range(3):
        trainer.iteration()
    save_checkpoint(tmp_path / "checkpoint.pt", {"trainer": trainer.state_dict(), "pool": pool.state_dict()})
    for _ in range(2):
        trainer.iteration()
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    resumed_pool = simple_spread_pool(seed=1)
    resumed = trainer_class(resumed_pool, config, k=2, k_until=None, device="cpu", seed=1)
    resumed.load_state_dict(state["trainer"])
    resumed_pool.load_state_dict(state["pool"])
    for _ in range(2):
        resumed.iteration()
    assert resumed.env_steps == trainer.env_steps and resumed.gradient_steps == trainer.gradient_steps == 10
    expected, actual = all_state(trainer), all_state(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_bad_configuration_is_reported():
    with pytest.raises(ValueError, match="tau"):
        MADDPGTrainer(simple_spread_pool(), MADDPGConfig(tau=0.0), k=1, k_until=None, device="cpu", seed=0)
    with pytest.raises(ValueError, match="--facmac.batch-size 0: expected an integer >= 1"):
        FACMACTrainer(simple_spread_pool(), FACMACConfig(batch_size=0), k=1, k_until=None, device="cpu", seed=0)
    with pytest.raises(ValueError, match="Gumbel-softmax temperature"):
        straight_through_gumbel_softmax(
            torch.zeros(1, 2), gumbel_noise((1, 2), torch.Generator(), "cpu", torch.float32), 0.0
        )


@pytest.mark.parametrize("algo", ["maddpg", "facmac"])
def test_discrete_anticipation_moves_with_the_others_parameters(float64, algo):
    """Issue 14 item 10: from level 2 the others' anticipated discrete actions are relaxed
    Gumbel-softmax samples, so a small change of their level l-1 parameters (no argmax flips)
    changes agent i's loss; fed as one-hot forward values it would change nothing."""
    trainer_class, _ = TRAINERS[algo]
    trainer = trainer_class(
        heterogeneous_pool(discrete=True), small_config(algo), k=2, k_until=None, device="cpu", seed=1
    )
    trainer.iteration()
    batch = trainer.buffer.sample(8, np.random.default_rng(2))
    noise = trainer.actor_noise(8)
    opt = trainer.actor_optimizer

    class Level2:
        level, k = 2, 2

        def __init__(self, shift):
            self.shift = shift

        @contextlib.contextmanager
        def anticipated(self):
            with torch.no_grad():
                saved = [p.detach().clone() for p in opt.arena.parameters]
                for p in opt.arena.parameters:
                    p.add_(self.shift)
                try:
                    yield self
                finally:
                    for p, s in zip(opt.arena.parameters, saved):
                        p.copy_(s)

    with torch.no_grad():
        losses = [trainer.actor_losses(Level2(shift), batch, noise) for shift in (0.0, 1e-3)]
    assert not torch.equal(losses[0], losses[1])
    outputs = trainer.actor(batch["obs"].transpose(0, 1))
    relaxed = trainer.anticipated_actions(outputs, noise)
    assert torch.allclose(relaxed.sum(-1), torch.ones_like(relaxed.sum(-1)))
    assert not torch.equal(relaxed, trainer.policy_actions(outputs, noise))
