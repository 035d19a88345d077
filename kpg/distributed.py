"""kpg on torch.distributed: data-parallel and agent-sharded KPG steps and the collectives they
use. kpg adds no communication layer: every exchange is one torch.distributed collective (gloo on
CPU, NCCL on GPUs) over the caller's process group. A training run's place among the ranks (its
environment copies, seeds and checkpoints) is the application's concern:
:class:`kpg.app.run_context.RunContext`, which runs its exchanges through :func:`collective`.

- Data parallel (``KPGOptimizer(..., process_group=group)``): every rank holds every agent and its
  own share of the batch. At each level the ranks first all-reduce a small control vector (which
  rank failed, each rank's k, which agents' losses are not finite), then average the arena's
  gradient buffer (one all-reduce per bucket); clipping, non-finite checks and the fused update run
  on the averaged gradient, so every rank computes the same anticipated and committed parameters.
- Agent sharded (``parallel="agents"``): each rank builds the optimizer over its own contiguous
  range of agents (:func:`agent_range`), so parameters, gradients and optimizer state stay local.
  The closure exchanges what the other agents need with all-gathers (``ctx.gather_agents`` for
  outputs, ``ctx.gather_anticipated_parameters`` for level parameters); each rank updates its own
  agents only.

Failure rule (note "agreed failure"): a step fails on every rank or on none. An exception or a
non-finite value on one rank is shared through the control all-reduce, every rank raises, and
nothing changed anywhere. A rank that dies makes the others' collective fail (connection lost, or
the process group's timeout): kpg raises a clear error and, on gloo, shuts the group down so that
ranks waiting on a third one stop at once instead of at the timeout.

Without a process group a KPGOptimizer holds a :class:`LocalCommunicator`, which exchanges nothing,
so that the step reads the same with and without torch.distributed.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "PARALLEL_MODES",
    "DEFAULT_BUCKET_BYTES",
    "DEFAULT_TIMEOUT",
    "Communicator",
    "LocalCommunicator",
    "agent_counts",
    "agent_range",
    "all_gather_agents",
    "average_gradients",
    "broadcast_parameters",
    "check_replicas_agree",
    "collective",
    "gather_samples",
    "init_from_environment",
]

PARALLEL_MODES = ("data", "agents")
DEFAULT_BUCKET_BYTES = 25 * 2**20  # torch DDP's default bucket size
DEFAULT_TIMEOUT = timedelta(minutes=5)


class CommunicationError(RuntimeError):
    """A collective failed: another rank stopped, or did not arrive within the group's timeout."""


def init_from_environment(device: str = "cpu", timeout: timedelta = DEFAULT_TIMEOUT) -> dist.ProcessGroup | None:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1) initializes the default process group, gloo for CPU
    and NCCL for CUDA, with ``timeout`` for every collective, and returns it; otherwise None. A
    group initialized earlier by the caller is returned as it is."""
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # torch.distributed.nn's functions take ``group=group.WORLD`` as a default argument, evaluated when
    # the module is first imported (torch.optim imports it with the first optimizer). Imported after
    # the group exists, those defaults hold it for the interpreter's life: destroy_process_group then
    # cannot free it, and gloo's worker threads run on into interpreter shutdown, where a rank can
    # abort ("terminate called without an active exception"). Imported now, the defaults are None.
    importlib.import_module("torch.distributed.nn")
    dist.init_process_group(backend, timeout=timeout)
    return dist.group.WORLD


def agent_counts(num_agents: int, world_size: int) -> list[int]:
    """How many agents each rank owns: contiguous ranges, the first ``num_agents % world_size``
    ranks one more."""
    if num_agents < world_size:
        raise ValueError(
            f"{num_agents} agents cannot be sharded over {world_size} ranks (every rank needs at least one agent); "
            "use fewer ranks or parallel='data'"
        )
    base, extra = divmod(num_agents, world_size)
    return [base + (rank < extra) for rank in range(world_size)]


def agent_range(num_agents: int, group: dist.ProcessGroup | None = None) -> range:
    """The global indices of the agents this rank owns under agent sharding (all agents without a group)."""
    if group is None:
        return range(num_agents)
    counts = agent_counts(num_agents, dist.get_world_size(group))
    rank = dist.get_rank(group)
    start = sum(counts[:rank])
    return range(start, start + counts[rank])


def all_gather_agents(tensor: Tensor, counts: Sequence[int], group: dist.ProcessGroup | None) -> Tensor:
    """Concatenates every rank's ``tensor`` (rank r's holds ``counts[r]`` agents in dim 0) in rank
    order, without gradient: the other agents' values are constants of this rank's losses."""
    tensor = tensor.detach()
    if group is None:
        return tensor
    rank = dist.get_rank(group)
    if tensor.shape[0] != counts[rank]:
        raise ValueError(
            f"rank {rank} gathers a tensor of shape {tuple(tensor.shape)} whose dim 0 should hold its {counts[rank]} "
            "agents; put this rank's agents first"
        )
    widest = max(counts)
    padded = tensor.new_zeros((widest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in counts]
    collective(
        lambda: dist.all_gather(gathered, padded.contiguous(), group=group), group, "the all-gather of agent values"
    )
    return torch.cat([part[:count] for part, count in zip(gathered, counts)])


def gather_samples(tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Every rank's ``tensor`` (equal shapes) concatenated along dim 0 in rank order; ``tensor``
    itself without a group. For statistics over the whole data-parallel batch."""
    if group is None:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    collective(lambda: dist.all_gather(parts, tensor.contiguous(), group=group), group, "the gather of samples")
    return torch.cat(parts)


def average_gradients(
    parameters: Iterable[Tensor], group: dist.ProcessGroup | None, bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> None:
    """Replaces every parameter's ``.grad`` by its mean over the ranks (for models trained beside
    the KPG actor, such as a critic); a missing gradient counts as zero."""
    if group is None:
        return
    parameters = [p for p in parameters if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    _average_(flat, group, bucket_bytes, "the all-reduce of gradients")
    offset = 0
    for p, g in zip(parameters, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def broadcast_parameters(parameters: Iterable[Tensor], group: dist.ProcessGroup | None, src: int = 0) -> None:
    """Copies rank ``src``'s values of ``parameters`` (and buffers passed with them) to every rank."""
    if group is None:
        return
    with torch.no_grad():
        for p in parameters:
            collective(
                lambda p=p: dist.broadcast(p.data, src=dist.get_global_rank(group, src), group=group),
                group,
                "the broadcast of parameters",
            )


def check_replicas_agree(tensors: Sequence[Tensor] | Tensor, group: dist.ProcessGroup | None, what: str) -> None:
    """Raises the same ValueError on every rank unless every rank holds exactly rank 0's ``tensors``."""
    if group is None:
        return
    tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    flat = torch.cat([t.detach().reshape(-1) for t in tensors]) if tensors else torch.zeros(0)
    reference = flat.clone()
    collective(
        lambda: dist.broadcast(reference, src=dist.get_global_rank(group, 0), group=group),
        group,
        f"the agreement check of {what}",
    )
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    differing = ~((flat == reference) | (flat.isnan() & reference.isnan()))
    report = torch.zeros(2 * world, dtype=torch.float64, device=flat.device)
    report[rank] = float(differing.sum())
    report[world + rank] = float((flat - reference).abs()[differing].max()) if bool(differing.any()) else 0.0
    collective(lambda: dist.all_reduce(report, group=group), group, f"the agreement check of {what}")
    counts, gaps = report[:world].tolist(), report[world:].tolist()
    bad = [r for r in range(world) if counts[r] > 0]
    if bad:
        details = ", ".join(
            f"rank {r}: {int(counts[r])} differing values, largest difference {gaps[r]:.3g}" for r in bad
        )
        raise ValueError(
            f"{what} differ across ranks ({details}); every rank must start from the same values: seed every rank "
            "alike before building the models, or call kpg.distributed.broadcast_parameters(model.parameters(), group)"
        )


class Communicator:
    """What a :class:`kpg.KPGOptimizer` exchanges with the other ranks, one object per optimizer.

    ``local_agents`` is the number of agent segments this rank steps (all agents in data-parallel
    mode, its own range under agent sharding).
    """

    def __init__(
        self, group: dist.ProcessGroup, parallel: str, local_agents: int, bucket_bytes: int, device: torch.device
    ):
        if parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {', '.join(map(repr, PARALLEL_MODES))}, got {parallel!r}")
        if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
        self.group, self.parallel, self.bucket_bytes = group, parallel, bucket_bytes
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.local_agents = local_agents
        self._device = device  # NCCL exchanges device tensors only
        self.counts = [local_agents] * self.world_size
        self.first_agent = 0

    @property
    def sharded(self) -> bool:
        return self.parallel == "agents"

    def check_layout(self, numel: int, describe: str) -> None:
        """Every rank must have built a compatible optimizer; under agent sharding this also learns
        how many agents every rank owns."""
        layout = torch.zeros(2 * self.world_size, dtype=torch.float64, device=self._device)
        layout[self.rank], layout[self.world_size + self.rank] = float(self.local_agents), float(numel)
        collective(lambda: dist.all_reduce(layout, group=self.group), self.group, "the layout check")
        counts = [int(c) for c in layout[: self.world_size].tolist()]
        sizes = [int(s) for s in layout[self.world_size :].tolist()]
        if self.sharded:
            self.counts = counts
            self.first_agent = sum(counts[: self.rank])
        elif len(set(counts)) > 1 or len(set(sizes)) > 1:
            raise ValueError(
                f"data-parallel ranks built different optimizers ({describe}; agents per rank {counts}, parameters per "
                f"rank {sizes}); every rank needs every agent with the same networks, or pass parallel='agents' to "
                "shard "
                "agents over the ranks"
            )

    def agree_on_level(
        self, level: int, k: int, error: BaseException | None, loss_nonfinite: Tensor | None
    ) -> Tensor | None:
        """The control all-reduce of a level: raises on every rank if any rank failed or the ranks
        run different k; returns the loss non-finite flags of all ranks combined (data parallel) or
        this rank's own (agent sharding, where each rank owns its agents' losses)."""
        world = self.world_size
        # Every rank sends the same size, a failed one zeros for its loss flags.
        combine_losses = not self.sharded
        control = torch.zeros(
            2 * world + (self.local_agents if combine_losses else 0), dtype=torch.float64, device=self._device
        )
        control[self.rank] = float(error is not None)
        control[world + self.rank] = float(k)
        if combine_losses and loss_nonfinite is not None:
            control[2 * world :] = loss_nonfinite.to(torch.float64)
        collective(
            lambda: dist.all_reduce(control, group=self.group), self.group, f"the control all-reduce of level {level}"
        )
        summary = control[: 2 * world].tolist()
        failed = [r for r in range(world) if summary[r] > 0]
        if failed:
            self._raise_agreed_failure(level, failed, error)
        ks = [int(v) for v in summary[world:]]
        if len(set(ks)) > 1:
            raise ValueError(
                f"the ranks step with different k ({', '.join(f'rank {r}: k={v}' for r, v in enumerate(ks))}); set k "
                "alike "
                "on every rank (KSchedule steps the same way everywhere); the step was rolled back on every rank"
            )
        if combine_losses:
            return control[2 * world :] > 0
        return loss_nonfinite

    def _raise_agreed_failure(self, level: int, failed: list[int], error: BaseException | None) -> None:
        messages: list[Any] = [None] * self.world_size
        mine = None if error is None else f"{type(error).__name__}: {error}"
        collective(
            lambda: dist.all_gather_object(messages, mine, group=self.group),
            self.group,
            f"the exchange of error messages at level {level}",
        )
        if error is not None:
            raise error
        first = failed[0]
        others = f" (and ranks {', '.join(map(str, failed[1:]))})" if len(failed) > 1 else ""
        raise RuntimeError(
            f"rank {first}{others} failed at level {level} of the KPG step with {messages[first]}; the step was rolled "
            f"back on every rank (rank {self.rank} included), so parameters and optimizer state are unchanged "
            "everywhere"
        )

    def agree_on_reached(self, reached: list[bool], level: int) -> list[bool]:
        """Which pieces (an agent's tensors) backward reached, agreed by the ranks. Data parallel: a
        piece reached on any rank is reached on all, since its averaged gradient is every rank's,
        and all ranks must step the same pieces to stay replicas. Agent sharding: this rank's own."""
        if self.sharded:
            return reached
        flags = torch.tensor(reached, dtype=torch.float64).to(self._device)
        collective(
            lambda: dist.all_reduce(flags, group=self.group), self.group, f"the reached all-reduce of level {level}"
        )
        return [count > 0 for count in flags.tolist()]

    def average_gradients(self, grad: Tensor, level: int) -> None:
        _average_(grad, self.group, self.bucket_bytes, f"the gradient all-reduce of level {level}")

    def gather_agents(self, tensor: Tensor) -> Tensor:
        if not self.sharded:
            return tensor.detach()
        return all_gather_agents(tensor, self.counts, self.group)

    def nonfinite_agents(self, skip: Tensor, loss_nonfinite: Tensor) -> tuple[list[int], bool]:
        """(agents whose loss or gradient is not finite, whether the first one's loss was), in
        global agent indices and the same on every rank."""
        flags = torch.stack([skip.to(torch.float64), loss_nonfinite.to(torch.float64)], dim=1)
        if self.sharded:
            flags = all_gather_agents(flags, self.counts, self.group)
        flags = flags.tolist()
        bad = [agent for agent, (skipped, _) in enumerate(flags) if skipped]
        return bad, bool(bad) and bool(flags[bad[0]][1])

    def check_replicas(self, tensors: Sequence[Tensor], what: str) -> None:
        if not self.sharded:
            check_replicas_agree(tensors, self.group, what)

    def check_capturable(self) -> None:
        raise ValueError(
            "capture_step cannot capture a distributed step: the ranks agree on failures on the host every level"
        )


class LocalCommunicator:
    """:class:`Communicator`'s interface for a KPGOptimizer without a process group: one rank holds
    every agent, so there is nothing to exchange and a failure is raised as it is."""

    sharded = False
    first_agent = 0

    def __init__(self, local_agents: int):
        self.local_agents = local_agents

    def agree_on_level(
        self, level: int, k: int, error: BaseException | None, loss_nonfinite: Tensor | None
    ) -> Tensor | None:
        if error is not None:
            raise error
        return loss_nonfinite

    def agree_on_reached(self, reached: list[bool], level: int) -> list[bool]:
        return reached

    def average_gradients(self, grad: Tensor, level: int) -> None:
        pass

    def gather_agents(self, tensor: Tensor) -> Tensor:
        return tensor.detach()

    def nonfinite_agents(self, skip: Tensor, loss_nonfinite: Tensor) -> tuple[list[int], bool]:
        bad = skip.nonzero().flatten().tolist()
        return bad, bool(bad) and bool(loss_nonfinite[bad[0]])

    def check_replicas(self, tensors: Sequence[Tensor], what: str) -> None:
        pass

    def check_capturable(self) -> None:
        pass


def _average_(buffer: Tensor, group: dist.ProcessGroup, bucket_bytes: int, what: str) -> None:
    """``buffer`` <- its mean over the ranks: sums of buckets of at most ``bucket_bytes`` (all in
    flight together), then one division. gloo has no average operation; NCCL's would round alike."""
    bucket = max(1, bucket_bytes // buffer.element_size())

    def reduce() -> None:
        works = [dist.all_reduce(part, group=group, async_op=True) for part in buffer.split(bucket)]
        for work in works:
            work.wait()

    collective(reduce, group, what)
    buffer.div_(dist.get_world_size(group))


def collective(run: Callable[[], Any], group: dist.ProcessGroup, what: str) -> Any:
    """Runs ``run()``, one torch.distributed collective over ``group``; if it fails, raises
    CommunicationError naming this rank and ``what``, after shutting a gloo group down (note
    "agreed failure" in the module docstring)."""
    rank = dist.get_rank(group)
    try:
        return run()
    except CommunicationError:
        raise
    except RuntimeError as error:
        if dist.get_backend(group) == "gloo":
            dist.destroy_process_group(group)
        raise CommunicationError(
            f"rank {rank}: {what} failed ({str(error).splitlines()[0][:300]}); another rank stopped (crashed, was "
            "killed, or raised outside the KPG step) or did not arrive within the process group's timeout. Nothing "
            "was committed by the interrupted step on this rank; this process group is shut down: restart the run "
            "(kpg train --resume continues from the last checkpoint)"
        ) from error
