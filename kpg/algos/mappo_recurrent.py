"""Recurrent K-MAPPO on environments with available-action masks (SMAX): the authors' SMAX loop.

One actor and one critic shared by all agents, each dense - GRU - dense - output with a one-hot
agent id on its input (the actor's is optional, ``actor_id``; the critic reads the global world
state), the GRU torch's cell or flax's (``gru``); trained on whole sequences by
backpropagation through time, the GRU state reset where an agent's previous step ended it (the
authors' ``ScannedRNN``). Minibatches are sets of environment copies with all their agents, so
that every agent's partners are in its minibatch at level 2. Options (:class:`MAPPOConfig`) cover
the authors' pieces: clipped value loss (``value_clip``), advantages normalized per minibatch
(``advantage_norm``), the actor loss one mean over all agents' samples (``actor_loss_mean``) and
the learning rate annealed linearly to 0 at ``lr_anneal_steps`` (default: the run's length) (``lr_anneal``)
by a ``torch.optim.lr_scheduler.LambdaLR``
that steps once per KPG step: the levels of a step all read the lr of the step's start, and only
the committed step advances the schedule, as the authors' optimizer-state reset restores optax's
count. docs/smax.md compares the loop with the authors' code line by line.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Categorical

from kpg.algos.common import WallClock, generalized_advantages
from kpg.algos.mappo import MAPPOConfig, MAPPOTrainer
from kpg.anticipation import AUDIT_METRICS, AuditMeans
from kpg.couplings import joint_ratio_loss
from kpg.optim import KPGOptimizer, KSchedule

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
HIDDEN_KEYS = ("actor_hidden", "critic_hidden")


class FlaxGRUCell(nn.Module):
    """flax's ``nn.GRUCell``: the gates of torch's GRU cell, with a bias on each input projection
    (r, z, n) and on the hidden projection of the candidate n only; torch's cell also has hidden
    biases for r and z, which only add to the input ones and double their Adam step.

    r = sigmoid(W_ir x + b_ir + W_hr h), z = sigmoid(W_iz x + b_iz + W_hz h),
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h.
    Parameters as torch's (``weight_ih``, ``weight_hh``: [3H, ...] in the order r, z, n; ``bias_ih``
    [3H]) but ``bias_hn`` [H]; one step is torch's fused cell with zeros for the missing biases."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.zeros(3 * hidden_size))
        self.bias_hn = nn.Parameter(torch.zeros(hidden_size))

    def hidden_bias(self) -> Tensor:
        """torch's [3H] hidden bias with zeros where flax has none: build once per sequence, not per step."""
        return torch.cat([self.bias_hn.new_zeros(2 * self.hidden_size), self.bias_hn])

    def forward(self, x: Tensor, h: Tensor, hidden_bias: Tensor | None = None) -> Tensor:
        bias_hh = self.hidden_bias() if hidden_bias is None else hidden_bias
        return torch.gru_cell(x, h, self.weight_ih, self.weight_hh, self.bias_ih, bias_hh)


GRU_CELLS = {"torch": nn.GRUCell, "flax": FlaxGRUCell}


class RecurrentAgentNet(nn.Module):
    """Dense - activation - GRU - dense - activation - dense, shared by ``num_agents`` agents whose
    one-hot id is the last ``num_agents`` inputs of the first layer (``agent_id``; without it every
    agent reads its features alone). Inputs are per agent (``[T, B, agents, F]``) or shared by the
    agents (``[T, B, F]``: the first layer's product is then computed once and each agent adds its
    id's column). ``gru``: torch's cell or flax's (:class:`FlaxGRUCell`, the authors'). Initialised as
    the authors' flax networks: orthogonal dense kernels with gains sqrt(2), 2 and ``output_gain``,
    zero biases, and the GRU's input kernels LeCun-normal, its recurrent kernels orthogonal per gate.
    """

    def __init__(
        self,
        features: int,
        num_agents: int,
        hidden: tuple[int, int, int],
        outputs: int,
        activation: str,
        output_gain: float,
        agent_id: bool = True,
        gru: str = "torch",
    ):
        super().__init__()
        if len(hidden) != 3:
            raise ValueError(
                f"a recurrent network takes hidden = (dense, GRU, dense) sizes, e.g. (128, 128, 128); got {hidden}"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}")
        if gru not in GRU_CELLS:
            raise ValueError(f"unknown GRU cell {gru!r}; use one of {', '.join(GRU_CELLS)}")
        self.features, self.num_agents, self.agent_id = features, num_agents, agent_id
        self.embed = nn.Linear(features + (num_agents if agent_id else 0), hidden[0])
        self.gru = GRU_CELLS[gru](hidden[0], hidden[1])
        self.dense = nn.Linear(hidden[1], hidden[2])
        self.out = nn.Linear(hidden[2], outputs)
        self.activation = ACTIVATIONS[activation]()
        for layer, gain in ((self.embed, math.sqrt(2.0)), (self.dense, 2.0), (self.out, output_gain)):
            nn.init.orthogonal_(layer.weight, gain)
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.gru.weight_ih, std=1.0 / math.sqrt(hidden[0]))
        for gate in self.gru.weight_hh.data.chunk(3):
            nn.init.orthogonal_(gate)
        for name, bias in self.gru.named_parameters():
            if name.startswith("bias"):
                nn.init.zeros_(bias)

    @property
    def hidden_size(self) -> int:
        return self.gru.hidden_size

    def forward(self, x: Tensor, resets: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` [T, B, agents, F] or [T, B, F]; ``resets`` [T, B, agents] (1: zero the GRU state before
        step t); ``hidden`` [B, agents, H]. Returns outputs [T, B, agents, outputs] and the last state."""
        weight = self.embed.weight
        embedded = nn.functional.linear(x, weight[:, : self.features], self.embed.bias)
        if x.dim() == 3:
            embedded = embedded.unsqueeze(2)
        if self.agent_id:
            embedded = embedded + weight[:, self.features :].T  # + the agent id's column
        embedded = self.activation(embedded)
        batch_shape = hidden.shape[:-1]
        embedded = embedded.expand(embedded.shape[0], *batch_shape, -1).flatten(1, 2)
        keep = (1.0 - resets).flatten(1, 2).unsqueeze(-1)
        state = hidden.flatten(0, 1)
        states = []
        step = self.gru
        if isinstance(self.gru, FlaxGRUCell):
            hidden_bias = self.gru.hidden_bias()
            step = lambda x_t, h_t: self.gru(x_t, h_t, hidden_bias)  # noqa: E731
        # unbind, not embedded[t]: each indexing's backward would write a zero-filled gradient of the whole sequence.
        for embedded_t, keep_t in zip(embedded.unbind(0), keep.unbind(0)):
            state = step(embedded_t, state * keep_t)
            states.append(state)
        features = self.activation(self.dense(torch.stack(states)))
        return self.out(features).unflatten(1, batch_shape), state.unflatten(0, batch_shape)


def anneal_factor(count: int, steps_per_update: int, updates: int) -> float:
    """The authors' linear decay: 1 - (completed updates) / updates, constant within an update."""
    return max(0.0, 1.0 - (count // steps_per_update) / updates)


class RecurrentMAPPOTrainer:
    """Collects ``rollout`` steps of every copy with the recurrent policy, then ``epochs`` passes of
    ``minibatches`` minibatches of whole sequences; each minibatch is one KPG step of the actor and
    one Adam step of the critic. ``total_steps`` (environment steps of the run) sets the length of
    the learning-rate decay."""

    METRICS = (*MAPPOTrainer.METRICS, "win_rate", "episodes_won")
    RANK_STATE: tuple[str, ...] = ()

    def __init__(
        self,
        pool,
        config: MAPPOConfig,
        k: int,
        k_until: int | None,
        device: str,
        seed: int,
        process_group=None,
        total_steps: int | None = None,
        anticipation: str = "exact",
        anticipation_reset: bool = False,
        anticipation_audit: bool = False,
    ):
        if process_group is not None:
            raise ValueError("the recurrent MAPPO trainer runs in one process; start it without torchrun")
        if not hasattr(pool, "avail"):
            raise ValueError(
                "the recurrent MAPPO trainer needs an environment with available-action masks (smax:MAP); "
                "for PettingZoo environments leave --mappo.recurrent off"
            )
        c = config
        if c.minibatches > pool.copies:
            raise ValueError(
                f"--mappo.minibatches {c.minibatches} exceeds --copies {pool.copies}: minibatches are sets of copies"
            )
        torch.manual_seed(seed)
        self.pool, self.config, self.device = pool, c, torch.device(device)
        self.generator = np.random.default_rng(seed)
        spaces = pool.spaces
        n = self.num_agents = spaces.num_agents
        hidden = tuple(c.hidden)
        self.actor = RecurrentAgentNet(
            spaces.obs_size, n, hidden, spaces.action_size, c.activation, 0.01, agent_id=c.actor_id, gru=c.gru
        ).to(self.device)
        self.critic = RecurrentAgentNet(spaces.state_size, n, hidden, 1, c.activation, 1.0, gru=c.gru).to(self.device)
        self.actor_optimizer = KPGOptimizer(
            self.actor,
            k=k,
            optimizer="adam",
            lr=c.lr,
            eps=1e-5,
            max_grad_norm=c.max_grad_norm,
            num_agents=n,
            anticipation=anticipation,
            audit_anticipation=anticipation_audit,
        )
        self.anticipation_reset = anticipation_reset
        # The audit's figures join this run's metrics.csv columns (kpg.anticipation.AUDIT_METRICS).
        self.audit = AuditMeans() if anticipation_audit else None
        if anticipation_audit:
            self.METRICS = (*type(self).METRICS, *AUDIT_METRICS)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=c.critic_lr, eps=1e-5)
        steps_per_iteration = c.rollout * pool.copies
        self.schedulers = []
        self.anneal_updates = None
        if c.lr_anneal_steps is not None and (not c.lr_anneal or c.lr_anneal_steps < steps_per_iteration):
            raise ValueError(
                f"--mappo.lr-anneal-steps {c.lr_anneal_steps} needs --mappo.lr-anneal and at least one update's "
                f"steps ({steps_per_iteration} = --mappo.rollout x --copies)"
            )
        if c.lr_anneal:
            horizon = c.lr_anneal_steps if c.lr_anneal_steps is not None else total_steps
            if horizon is None:
                raise ValueError("--mappo.lr-anneal needs the run's length (total_steps) or --mappo.lr-anneal-steps")
            # The authors' NUM_UPDATES = TOTAL_TIMESTEPS // NUM_STEPS // NUM_ENVS.
            updates = self.anneal_updates = max(1, horizon // steps_per_iteration)
            per_update = c.epochs * c.minibatches
            factor = lambda count: anneal_factor(count, per_update, updates)  # noqa: E731
            self.schedulers = [
                torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (self.actor_optimizer, self.critic_optimizer)
            ]
        self.k_schedule = None
        if k_until is not None:
            iterations = -(-k_until // steps_per_iteration)
            self.k_schedule = KSchedule(
                self.actor_optimizer, iterations * c.epochs * c.minibatches, early_k=k, late_k=1
            )
        copies, h = pool.copies, self.actor.hidden_size
        self.actor_hidden = torch.zeros(copies, n, h, device=self.device)
        self.critic_hidden = torch.zeros(copies, n, self.critic.hidden_size, device=self.device)
        self.last_done = torch.zeros(copies, n, device=self.device)
        self.clock = WallClock()
        self.env_steps = 0
        self.updates = 0

    # ---- acting ------------------------------------------------------------------------------

    def _distribution(self, logits: Tensor, avail: Tensor) -> Categorical:
        """The policy with the unavailable actions masked out of the logits."""
        return Categorical(logits=logits.masked_fill(~avail, torch.finfo(logits.dtype).min))

    # ---- one iteration: rollout, then update -----------------------------------------------------

    def iteration(self) -> dict[str, float]:
        with self.clock.phase("environment"):
            batch, episodes = self._collect()
        metrics = self._update(batch)
        metrics["episodes"] = len(episodes)
        if episodes:
            metrics["episode_return"] = float(np.mean([e["return"] for e in episodes]))
            metrics["episode_length"] = float(np.mean([e["length"] for e in episodes]))
            metrics["episodes_won"] = float(sum(e["won"] for e in episodes))
            metrics["win_rate"] = metrics["episodes_won"] / len(episodes)
        self.updates += 1
        return metrics

    def _collect(self):
        c, pool = self.config, self.pool
        start = dict(zip(HIDDEN_KEYS, (self.actor_hidden, self.critic_hidden)))
        keys = ("obs", "state", "avail", "resets", "actions", "log_prob", "values", "rewards", "dones")
        steps: dict[str, list[Tensor]] = {key: [] for key in keys}
        episodes = []
        critic_hidden = self.critic_hidden
        for _ in range(c.rollout):
            obs, state, avail, resets = pool.obs, pool.state, pool.avail, self.last_done
            with torch.no_grad():
                logits, self.actor_hidden = self.actor(obs[None], resets[None], self.actor_hidden)
                dist = self._distribution(logits[0], avail)
                actions = dist.sample()
                values, critic_hidden = self.critic(state[None], resets[None], critic_hidden)
            step = pool.step(actions)
            for key, value in zip(
                keys,
                (
                    obs,
                    state,
                    avail,
                    resets,
                    actions,
                    dist.log_prob(actions),
                    values[0, ..., 0],
                    step.reward,
                    step.episode_done[:, None].expand_as(step.reward),
                ),
            ):
                steps[key].append(value)
            self.last_done = step.done
            episodes += step.finished
        self.critic_hidden = critic_hidden
        self.env_steps += c.rollout * pool.copies
        batch = {key: torch.stack(values) for key, values in steps.items()}  # [T, copies, ...]
        with torch.no_grad():
            last_value, _ = self.critic(pool.state[None], self.last_done[None], critic_hidden)
        values = torch.cat([batch["values"], last_value[..., 0]])
        batch["advantages"] = generalized_advantages(
            batch["rewards"], values, batch["dones"].float(), c.gamma, c.gae_lambda
        )
        batch["targets"] = batch["advantages"] + batch["values"]
        return {**batch, **start}, episodes

    def _update(self, batch: dict[str, Tensor]) -> dict[str, float]:
        if self.anticipation_reset:
            self.actor_optimizer.reset_anticipation()
        c = self.config
        k = self.actor_optimizer.k  # the schedule switches k only between iterations
        advantages = batch["advantages"]
        if c.advantage_norm == "batch":
            advantages = (advantages - advantages.mean()) / (advantages.std(correction=0) + 1e-8)
        clip_fractions: dict[int, list[float]] = {}
        sums = {"actor_loss": 0.0, "entropy": 0.0, "value_loss": 0.0}
        steps = 0
        for _ in range(c.epochs):
            order = torch.as_tensor(self.generator.permutation(self.pool.copies), device=self.device)
            for rows in order.chunk(c.minibatches):
                # Time-major sequences [T, copies, ...], and the GRU states [copies, ...] they started from.
                mb = {key: value[rows] if key in HIDDEN_KEYS else value[:, rows] for key, value in batch.items()}
                adv = advantages[:, rows]
                if c.advantage_norm == "minibatch":
                    adv = (adv - adv.mean()) / (adv.std(correction=0) + 1e-8)
                with self.clock.phase("actor"):
                    actor_loss, entropy = self._actor_step(mb, adv, clip_fractions)
                if self.audit is not None:
                    self.audit.add(self.actor_optimizer)
                with self.clock.phase("critic"):
                    value_loss = self._critic_step(mb)
                for scheduler in self.schedulers:
                    scheduler.step()
                if self.k_schedule is not None:
                    self.k_schedule.step()
                sums["actor_loss"] += actor_loss
                sums["entropy"] += entropy
                sums["value_loss"] += value_loss
                steps += 1
        metrics = {name: total / steps for name, total in sums.items()}
        for level, fractions in clip_fractions.items():
            metrics[f"clip_fraction_level{level}"] = float(np.mean(fractions))
        metrics["k"] = k
        if self.audit is not None:
            metrics.update(self.audit.metrics())
        return metrics

    def _sequence_log_prob(self, mb: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Log-probabilities of the taken actions and entropies, [agents, samples], by BPTT over the sequences."""
        logits, _ = self.actor(mb["obs"], mb["resets"], mb["actor_hidden"])
        dist = self._distribution(logits, mb["avail"])
        as_agents = lambda t: t.permute(2, 0, 1).flatten(1)  # noqa: E731  [T, B, agents] -> [agents, T * B]
        return as_agents(dist.log_prob(mb["actions"])), as_agents(dist.entropy())

    def _actor_step(
        self, mb: dict[str, Tensor], adv: Tensor, clip_fractions: dict[int, list[float]]
    ) -> tuple[float, float]:
        c, n = self.config, self.num_agents
        old_log_prob = mb["log_prob"].permute(2, 0, 1).flatten(1)
        adv = adv.permute(2, 0, 1).flatten(1)
        # The shared actor's gradient is that of the sum of the agents' losses: "samples" divides by N
        # so that the loss is one mean over all agents' samples (the authors'), not N of them.
        scale = 1.0 / n if c.actor_loss_mean == "samples" else 1.0
        entropy_seen = []

        def closure(ctx):
            log_prob, entropy = ctx.at_base(lambda: self._sequence_log_prob(mb))
            anticipated_log_prob = None
            if ctx.level > 1:
                with ctx.anticipated(), torch.no_grad():
                    anticipated_log_prob, _ = self._sequence_log_prob(mb)
            surrogate = joint_ratio_loss(
                log_prob,
                old_log_prob,
                adv,
                anticipated_log_prob,
                level=ctx.level,
                clip_eps=c.clip_eps,
                others=c.others,
                form=c.coupling,
            )
            clip_fractions.setdefault(ctx.level, []).append(float(surrogate.clip_fraction.mean()))
            entropy = entropy.mean(1)
            entropy_seen.append(entropy.detach())
            return (surrogate.loss - c.entropy_coef * entropy) * scale

        loss = self.actor_optimizer.step(closure)
        return float(loss.sum()), float(entropy_seen[-1].mean())

    def _critic_step(self, mb: dict[str, Tensor]) -> float:
        c = self.config
        values, _ = self.critic(mb["state"], mb["resets"], mb["critic_hidden"])
        loss = value_loss(values[..., 0], mb["values"], mb["targets"], c.value_clip)
        self.critic_optimizer.zero_grad(set_to_none=True)
        (c.value_coef * loss).backward()
        nn.utils.clip_grad_norm_(self.critic.parameters(), c.max_grad_norm)
        self.critic_optimizer.step()
        return float(loss.detach())

    # ---- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "schedulers": [s.state_dict() for s in self.schedulers],
            "anneal_updates": self.anneal_updates,
            "k_schedule": None if self.k_schedule is None else self.k_schedule.state_dict(),
            "generator": self.generator.bit_generator.state,
            "hidden": {"actor": self.actor_hidden, "critic": self.critic_hidden, "last_done": self.last_done},
            "env_steps": self.env_steps,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        saved_anneal = state.get("anneal_updates", self.anneal_updates)
        if saved_anneal != self.anneal_updates:
            raise ValueError(
                f"the saved run anneals its lr over {saved_anneal} updates, this one over {self.anneal_updates}; "
                "resume with the run's --steps, or set --mappo.lr-anneal-steps to the saved horizon "
                "(its updates x --mappo.rollout x --copies)"
            )
        # load_state_dict copies in place, so the actor's parameters stay views of the optimizer's arena.
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)
        if self.k_schedule is not None:
            self.k_schedule.load_state_dict(state["k_schedule"])
        self.generator.bit_generator.state = state["generator"]
        hidden = state["hidden"]
        self.actor_hidden, self.critic_hidden = hidden["actor"].to(self.device), hidden["critic"].to(self.device)
        self.last_done = hidden["last_done"].to(self.device)
        self.env_steps, self.updates = state["env_steps"], state["updates"]

    def actor_level_seconds(self) -> list[float]:
        """Seconds of the actor update per KPG level since construction (closure, backward, kernels)."""
        seconds = self.actor_optimizer.stats.seconds
        levels = max((len(v) for v in seconds.values()), default=0)
        return [
            sum(v[l] for phase, v in seconds.items() if phase != "anticipated_forward" and l < len(v))
            for l in range(levels)
        ]


def value_loss(values: Tensor, old_values: Tensor, targets: Tensor, clip: float | None) -> Tensor:
    """0.5 * mean squared error of the values; with ``clip``, of the worse of the values and the old
    values moved by at most ``clip`` towards them (PPO's clipped value loss)."""
    errors = (values - targets).square()
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        errors = torch.maximum(errors, (clipped - targets).square())
    return 0.5 * errors.mean()
