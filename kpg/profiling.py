"""Where a KPG step's time goes: host wall-clock per phase and level (:class:`KPGStats`) and
``torch.profiler`` ranges named ``kpg/level<l>/<phase>`` (:class:`PhaseTimer`)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["KPGStats", "PhaseTimer"]


@dataclass
class KPGStats:
    """Where the time of the steps went, accumulated since construction (or :meth:`reset`).

    ``seconds[phase][level - 1]`` is the host wall-clock of a phase at a level: ``closure`` (the
    whole loss computation), ``anticipated_forward`` (the part of it inside
    ``ctx.anticipated()``), ``backward`` and ``update`` (norms and fused kernel). On CUDA the host
    does not wait for the device, so these are launch times; use ``torch.profiler`` (every phase is
    a ``record_function`` range named ``kpg/level<l>/<phase>``) for device time.
    """

    steps: int = 0
    seconds: dict[str, list[float]] = field(default_factory=dict)
    # Agents left unchanged by committed steps (nonfinite="skip"), counted on the device.
    skipped_agent_steps_tensor: Tensor | None = None
    # anticipation="momentum" with audit_anticipation=True: this step's per-agent figures (None after a k=1 step)
    # (kpg.anticipation.momentum_audit: gate, cosine, relative_error, norm_ratio), on the device.
    anticipation_audit: dict[str, Tensor] | None = None

    @property
    def skipped_agent_steps(self) -> int:
        """Agents left unchanged by committed steps; reading it synchronizes with the device."""
        return 0 if self.skipped_agent_steps_tensor is None else int(self.skipped_agent_steps_tensor)

    def add(self, phase: str, level: int, seconds: float) -> None:
        per_level = self.seconds.setdefault(phase, [])
        per_level.extend([0.0] * (level - len(per_level)))
        per_level[level - 1] += seconds

    def reset(self) -> None:
        self.steps, self.seconds = 0, {}
        if self.skipped_agent_steps_tensor is not None:
            self.skipped_agent_steps_tensor.zero_()

    def summary(self) -> str:
        """A table of seconds per phase and level, and each phase's share of the total."""
        total = sum(sum(v) for v in self.seconds.values()) or 1.0
        levels = max((len(v) for v in self.seconds.values()), default=0)
        lines = [f"{'phase':<22}" + "".join(f"{'level ' + str(l + 1):>12}" for l in range(levels)) + f"{'share':>8}"]
        for phase, per_level in self.seconds.items():
            cells = "".join(f"{s:>12.4f}" for s in per_level + [0.0] * (levels - len(per_level)))
            lines.append(f"{phase:<22}{cells}{100 * sum(per_level) / total:>7.1f}%")
        lines.append(f"steps: {self.steps}, skipped agent steps: {self.skipped_agent_steps}")
        return "\n".join(lines)


class PhaseTimer:
    """Times the phases of a step into ``stats``, each inside a profiler range while one records."""

    def __init__(self, stats: KPGStats):
        self.stats = stats

    def range(self, phase: str, level: int):
        if profiler_active():
            return torch.profiler.record_function(f"kpg/level{level}/{phase}")
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def timed(self, phase: str, level: int):
        started = time.perf_counter()
        with self.range(phase, level):
            try:
                yield
            finally:
                self.stats.add(phase, level, time.perf_counter() - started)


def profiler_active() -> bool:
    """Whether a torch profiler records: the ranges cost ~30 us each otherwise. torch has no public
    query; torch.autograd._profiler_enabled is the state the profiler itself consults, and where a
    torch lacks it every range is recorded."""
    enabled = getattr(torch.autograd, "_profiler_enabled", None)
    return True if enabled is None else bool(enabled())
