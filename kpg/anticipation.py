"""Momentum-extrapolated anticipation: ``KPGOptimizer(anticipation="momentum")``.

Exact k=2 computes every agent's level-1 step (one closure evaluation, backward and optimizer pass)
only to know where the others will be. The momentum rule predicts that point from each agent's
own history instead (the first author's cheaper K2-MAPPO, docs/algorithm.md):

    u1 = the agent's last committed update (parameters after the step minus before)
    u2 = the update before it
    gate = clip(cos(u1, u2), 0, 1)           (0 when u1 or u2 is zero)
    anticipated parameters = base + gate * u1

and then runs only the last level: one closure evaluation with ``ctx.anticipated()`` at the
predicted point, one backward, one committed optimizer step. Per-agent networks get one gate per
agent; a shared network has one gate (it is one optimizer agent).

u2 enters the rule only through the gate, and the gate is computed when u1 is recorded (right after
the commit), so u2 is never stored: the optimizer keeps u1, its squared norm and the gate per agent,
and a buffer for the base parameters during a step. The step runs the fused kernels
(``torch.ops.kpg.momentum_predict`` and ``momentum_record``, csrc/kpg/momentum.h), one pass over
the arena each; the functions of this module are the same rule in plain PyTorch over the flat arena
(every agent at once), which the tests compare the kernels with, and :mod:`kpg.reference` holds it
agent by agent. The audit runs in plain PyTorch (it already costs a whole level).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kpg import _ops as kernels
from kpg.arena import ParameterArena

if TYPE_CHECKING:
    from kpg.optim import KPGOptimizer

__all__ = [
    "ANTICIPATIONS",
    "AUDIT_METRICS",
    "AgentTiling",
    "AuditMeans",
    "MomentumAnticipation",
    "momentum_audit",
    "momentum_predict",
    "momentum_record",
]

ANTICIPATIONS = ("exact", "momentum")
# The trainers' metrics.csv columns of the audit (AuditMeans): each figure of momentum_audit averaged
# over the agents, then over the actor steps of one update.
AUDIT_METRICS = ("audit_gate", "audit_cosine", "audit_relative_error", "audit_norm_ratio")


@dataclass(frozen=True)
class AgentTiling:
    """The arena as consecutive runs of elements, each owned by one agent: ``agents[r]`` owns
    ``lengths[r]`` elements, runs in arena order (an agent-batched arena gives an agent one run per
    parameter). Built once from the chunk table, so the ops need no host synchronization."""

    agents: Tensor  # int64 [runs], on the arena's device
    lengths: Tensor  # int64 [runs], on the arena's device
    num_agents: int
    numel: int
    one_run_per_agent: bool  # runs are agents 0, 1, ... in order (per-agent and shared arenas)
    # Agent-batched arenas: per parameter (first element, elements per agent); its elements are
    # [agents, per agent] row-major, so the rule runs as one broadcast op per parameter.
    blocks: tuple[tuple[int, int], ...] | None

    @classmethod
    def of(cls, arena: ParameterArena) -> AgentTiling:
        rows = sorted(map(tuple, arena.chunks.cpu().tolist()), key=lambda row: row[1])
        agents: list[int] = []
        lengths: list[int] = []
        position = 0
        for agent, begin, end in rows:
            if begin != position:
                raise AssertionError(f"the arena's chunk table leaves elements {position}..{begin} to no agent")
            if agents and agents[-1] == agent:
                lengths[-1] += end - begin
            else:
                agents.append(agent)
                lengths.append(end - begin)
            position = end
        device = arena.device
        return cls(
            torch.tensor(agents, dtype=torch.int64, device=device),
            torch.tensor(lengths, dtype=torch.int64, device=device),
            arena.num_agents,
            arena.numel,
            agents == list(range(arena.num_agents)),
            tuple((v.storage_offset(), v.numel() // arena.num_agents) for v in arena.param_views)
            if arena.is_batched
            else None,
        )

    def _rows(self, buffer: Tensor) -> list[Tensor]:
        """An agent-batched arena's ``buffer`` as one ``[agents, per agent]`` view per parameter."""
        agents = self.num_agents
        return [buffer[start : start + agents * width].view(agents, width) for start, width in self.blocks]

    def scale_add(self, param: Tensor, per_agent: Tensor, update: Tensor, out: Tensor) -> None:
        """``out = param + per_agent[agent] * update`` elementwise."""
        scale = per_agent.to(param.dtype)
        if self.blocks is None:
            torch.addcmul(param, self.per_element(scale), update, out=out)
            return
        column = scale.unsqueeze(1)
        for p, u, o in zip(self._rows(param), self._rows(update), self._rows(out)):
            torch.addcmul(p, column, u, out=o)

    def dot_and_square(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Per agent, in float64: the dot product of ``a`` and ``b`` and the squared norm of ``a``."""
        if self.blocks is None:
            dot, square = self.agent_sums(a * torch.stack((b, a)))
            return dot, square
        dot = torch.zeros(self.num_agents, dtype=torch.float64, device=a.device)
        square = torch.zeros_like(dot)
        for a_rows, b_rows in zip(self._rows(a), self._rows(b)):
            dot += torch.linalg.vecdot(a_rows, b_rows)
            square += torch.linalg.vecdot(a_rows, a_rows)
        return dot, square

    def per_element(self, per_agent: Tensor) -> Tensor:
        """``per_agent[agent of element]`` for every element of the arena."""
        per_run = per_agent if self.one_run_per_agent else per_agent.index_select(0, self.agents)
        return per_run.repeat_interleave(self.lengths, output_size=self.numel)

    def agent_sums(self, values: Tensor) -> Tensor:
        """Per agent, the sums of ``values`` (``[rows, arena elements]``) over its elements:
        ``[rows, agents]`` in float64, every row in one reduction. Each run is summed in the arena's
        dtype (converting every element to float64 first cost more than the rest of the rule), the
        runs of an agent in float64."""
        rows = values.shape[0]
        lengths = self.lengths.expand(rows, -1).contiguous()
        runs = torch.segment_reduce(values, "sum", lengths=lengths, axis=1).to(torch.float64)
        if self.one_run_per_agent:
            return runs
        sums = torch.zeros(rows, self.num_agents, dtype=torch.float64, device=values.device)
        return sums.index_add_(1, self.agents, runs)


def _gate(dot: Tensor, latest_sq: Tensor, previous_sq: Tensor) -> Tensor:
    """clip(cos(u1, u2), 0, 1), and 0 where either update is zero (no history yet)."""
    product = latest_sq * previous_sq
    cosine = dot / product.sqrt().where(product > 0, torch.ones_like(product))
    return cosine.clamp(0.0, 1.0).where(product > 0, torch.zeros_like(product))


def momentum_predict(param: Tensor, latest: Tensor, gate: Tensor, anticipated: Tensor, base: Tensor, tiling) -> None:
    """``anticipated = param + gate[agent] * latest`` (the predicted level-1 parameters) and
    ``base = param`` (kept for :func:`momentum_record`), every agent at once."""
    tiling.scale_add(param, gate, latest, anticipated)
    base.copy_(param)


def momentum_record(param: Tensor, base: Tensor, latest: Tensor, latest_sq: Tensor, gate: Tensor, tiling) -> None:
    """After a commit: ``latest`` (u1, about to become u2) becomes the new update ``param - base``;
    ``gate`` the next step's clip(cos(new update, old latest), 0, 1) and ``latest_sq`` the new
    update's squared norm, per agent."""
    fresh = param - base
    dot, fresh_sq = tiling.dot_and_square(fresh, latest)
    gate.copy_(_gate(dot, fresh_sq, latest_sq))
    latest_sq.copy_(fresh_sq)
    latest.copy_(fresh)


def momentum_audit(
    param: Tensor, exact: Tensor, latest: Tensor, latest_sq: Tensor, gate: Tensor, tiling
) -> dict[str, Tensor]:
    """How far the prediction ``gate * latest`` is from the exact level-1 step ``exact - param``, per
    agent: the gate, cos(u1, exact step) (NaN while u1 or the step is zero), ``|prediction - exact
    step| / |exact step|`` and ``|prediction| / |exact step|`` (NaN where the exact step is zero)."""
    step = exact - param
    dot, step_sq = tiling.dot_and_square(step, latest)
    nan = torch.full_like(step_sq, float("nan"))
    error_sq = (gate * gate * latest_sq - 2 * gate * dot + step_sq).clamp_min(0.0)
    step_norm = step_sq.sqrt()
    return {
        "gate": gate.clone(),
        "cosine": torch.where(latest_sq * step_sq > 0, dot / (latest_sq * step_sq).sqrt(), nan),
        "relative_error": torch.where(step_sq > 0, error_sq.sqrt() / step_norm, nan),
        "norm_ratio": torch.where(step_sq > 0, gate * latest_sq.sqrt() / step_norm, nan),
    }


class AuditMeans:
    """The audit of the actor steps of one trainer update, as metrics (:data:`AUDIT_METRICS`).

    :meth:`add` after each ``optimizer.step``; :meth:`metrics` gives each figure's mean over the
    agents and steps where it is defined (the cosine is undefined while u1 is zero, the ratios where
    the exact step is zero) and starts over; a figure defined nowhere is left out, so its column
    stays empty. Reading the figures synchronizes with the device once per step: the audit's price."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def add(self, optimizer: KPGOptimizer) -> None:
        audit = optimizer.stats.anticipation_audit
        if audit is None:  # a k=1 step audits nothing
            return
        for name, values in audit.items():
            defined = values[~values.isnan()]
            self._sums[name] = self._sums.get(name, 0.0) + float(defined.sum())
            self._counts[name] = self._counts.get(name, 0) + defined.numel()

    def metrics(self) -> dict[str, float]:
        means = {
            f"audit_{name}": total / self._counts[name] for name, total in self._sums.items() if self._counts[name]
        }
        self._sums, self._counts = {}, {}
        return means


class MomentumAnticipation:
    """The momentum rule's state and its part of :meth:`KPGOptimizer.step`.

    ``latest`` holds u1 (zeros before the first commit), ``latest_sq`` its squared norm and ``gate``
    the gate the next step uses, per agent; ``base`` the base parameters during a step. Every buffer
    keeps its address, and nothing is read on the host, so :meth:`KPGOptimizer.capture_step` can
    capture the step. With ``audit`` every step also computes the exact level-1 step (one more
    closure evaluation, backward and anticipate pass) and leaves :func:`momentum_audit`'s figures in
    ``optimizer.stats.anticipation_audit``; the committed step is the same with and without it.
    """

    def __init__(self, arena: ParameterArena, audit: bool):
        self.audit = audit
        self.tiling = AgentTiling.of(arena)
        self.chunks, self.agent_chunks = arena.chunks, arena.agent_chunks
        self.latest = arena.new_buffer()
        self.base = arena.new_buffer()
        f64 = dict(dtype=torch.float64, device=arena.device)
        self.latest_sq = torch.zeros(arena.num_agents, **f64)
        self.gate = torch.zeros(arena.num_agents, **f64)
        self.chunk_sums = torch.zeros(arena.chunks.shape[0], 2, **f64)

    def reset(self) -> None:
        """Forgets the history: u1 = u2 = 0, so the gate is 0 until two more steps are committed."""
        for buffer in (self.latest, self.base, self.latest_sq, self.gate):
            buffer.zero_()

    def check_capturable(self) -> None:
        """Raises ValueError where :meth:`KPGOptimizer.capture_step` cannot capture this mode's step.

        The step itself can: its buffers keep their addresses (no u1/u2 swap) and the gate is read
        only by the kernels. The audit cannot: it hands its figures back as new tensors in
        ``stats.anticipation_audit`` at every step, which a replayed graph does not do."""
        if self.audit:
            raise ValueError(
                "capture_step does not capture audit_anticipation=True: the audit hands back new tensors in "
                "stats.anticipation_audit at every step, which a replayed CUDA graph does not; capture an optimizer "
                "without the audit, or audit eager steps"
            )

    def run_levels(self, optimizer: KPGOptimizer, closure: Callable, takes_context: bool) -> Tensor:
        """The levels of one step in momentum mode; returns the loss of the committed level.

        k=1 is the plain step; k=2 one closure evaluation at level 2 at the predicted point. Both
        record the committed update. Nothing changes before the commit: a raising closure or
        ``nonfinite="raise"`` leaves parameters, optimizer state and the momentum history as they were.
        """
        k = optimizer.k
        if k > 2:
            raise ValueError(
                f"anticipation='momentum' predicts only level 1, so it runs k=1 or k=2, got k={k}; use "
                "anticipation='exact' for k >= 3"
            )
        arena, levels, anticipated = optimizer.arena, optimizer._levels, optimizer.agent_state.anticipated
        if self.audit:
            optimizer.stats.anticipation_audit = None  # until this step's audit, if it makes one
        if k == 2 and self.audit:
            loss, loss_nonfinite = levels.evaluate(closure, 1, k, takes_context)
            optimizer._update(1, False, loss_nonfinite)
            optimizer.stats.anticipation_audit = momentum_audit(
                arena.param, anticipated, self.latest, self.latest_sq, self.gate, self.tiling
            )
        if k == 2:
            kernels.momentum_predict(arena.param, self.latest, self.gate, anticipated, self.base, self.chunks)
        else:
            self.base.copy_(arena.param)
        loss, loss_nonfinite = levels.evaluate(closure, k, k, takes_context)
        # Without the audit no level 1 ran, so the committed level starts the step's skip flags.
        optimizer._update(k, True, loss_nonfinite, first_level=k == 1 or not self.audit)
        kernels.momentum_record(
            arena.param,
            self.base,
            self.latest,
            self.latest_sq,
            self.gate,
            self.chunk_sums,
            self.chunks,
            self.agent_chunks,
        )
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": "momentum",
            "audit": self.audit,
            "latest_update": self.latest.clone(),
            "latest_update_sq_norm": self.latest_sq.clone(),
            "gate": self.gate.clone(),
        }

    def stage(self, saved: Any) -> tuple[Tensor, Tensor, Tensor] | None:
        """Checks a saved ``state_dict()["kpg"]["anticipation"]`` against this arena and returns
        what :meth:`load` copies; None (a state dict of exact mode or of torch.optim): the history
        starts afresh."""
        if saved is None or saved.get("mode") != "momentum":
            return None
        missing = [key for key in ("latest_update", "latest_update_sq_norm", "gate") if key not in saved]
        if missing:
            raise ValueError(
                f"the state dict's momentum anticipation entry lacks {', '.join(missing)}; pass a state dict that "
                "KPGOptimizer(anticipation='momentum').state_dict() wrote"
            )
        tensors = (saved["latest_update"], saved["latest_update_sq_norm"], saved["gate"])
        expected = (self.latest, self.latest_sq, self.gate)
        for name, value, own in zip(("latest_update", "latest_update_sq_norm", "gate"), tensors, expected):
            if not isinstance(value, Tensor) or value.shape != own.shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"the state dict's momentum {name} has shape {got}, this optimizer's {tuple(own.shape)}; it was "
                    "saved by an optimizer over other parameters or agents"
                )
        return tensors

    def load(self, staged: tuple[Tensor, Tensor, Tensor] | None) -> None:
        if staged is None:
            self.reset()
            return
        for own, value in zip((self.latest, self.latest_sq, self.gate), staged):
            own.copy_(value)
        self.base.zero_()
