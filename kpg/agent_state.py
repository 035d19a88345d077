"""The agents' optimizer state on the device: every per-agent tensor the fused kernels read or write,
kept, uploaded, created, loaded and passed to the ops of :mod:`kpg._ops` in one place.

Its tensors map one to one onto the kernels' arguments (``UpdateBuffers`` in csrc/kpg/update.h,
the norms' outputs in csrc/kpg/norms.h): the state buffers (one flat buffer per state tensor, laid
out like the arena), the step counts and liveness per piece (an agent's tensor, or its slice of an
agent-batched one: torch.optim keeps both per parameter), the learning rates and hyperparameter rows
per agent and per piece, the gradient norms, clipping scales and non-finite flags per agent, and the
anticipated parameters the anticipate kernels write. :class:`kpg.optim.KPGOptimizer` owns one and
drives it: argument parsing, the torch.optim interface and the levels stay there. The checks of the
parameter groups and of a state dict to load are plain functions of :mod:`kpg.optim_state`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kpg import _ops as ops
from kpg.arena import ParameterArena
from kpg.distributed import Communicator, LocalCommunicator
from kpg.optim_state import StagedState, check_tensor_lrs, validate_groups

__all__ = ["AgentState"]


class AgentState:
    """The per-agent device tensors of one optimizer over ``arena`` with kernel family ``kernel``.

    Read them through the properties (the kernels write them in place; writing them yourself changes
    the optimizer). ``communicator`` tells every rank every rank's non-finite flags (all raise or
    none); ``shared`` says the agents share one network (for error messages);
    ``skipped_agent_steps`` counts, on the device, the agents that ``nonfinite="skip"`` left unchanged.
    """

    def __init__(
        self,
        arena: ParameterArena,
        kernel: ops.OptimizerKernel,
        communicator: Communicator | LocalCommunicator,
        shared: bool,
        skipped_agent_steps: Tensor,
    ):
        self._arena, self._kernel = arena, kernel
        self._communicator, self._shared = communicator, shared
        self._skipped_agent_steps = skipped_agent_steps
        device, agents, pieces = arena.device, arena.num_agents, arena.num_pieces
        f64 = dict(dtype=torch.float64, device=device)
        self._state_buffers: dict[str, Tensor | None] = dict.fromkeys(kernel.state_names)
        # Step counts and live states are per piece (an agent's tensor), as torch.optim keeps them per
        # parameter: a piece that backward did not reach is not stepped (NOTE [No gradient, not stepped]).
        self._step = torch.zeros(pieces, **f64)
        self._live = torch.zeros(pieces, ops.MAX_STATES, dtype=torch.uint8, device=device)
        # Per-piece scalar state (NAdam's mu_product) in torch.optim's scalar dtype (_get_scalar_dtype).
        scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        self._scalar_states = {
            name: torch.full((pieces,), initial, dtype=scalar_dtype, device=device)
            for name, initial in kernel.scalar_states
        }
        # Per-agent values the kernels read, in one device buffer filled by one copy (sync).
        width = len(kernel.row_names)
        self._group_keys = ("lr", "max_grad_norm", *(h[0] for h in kernel.hyperparameters))
        self._read_groups = operator.itemgetter(*self._group_keys)
        self._values = torch.zeros(agents * (2 + width), **f64)
        self._lr = self._values[:agents]
        self._max_norm = self._values[agents : 2 * agents]
        self._hyper = self._values[2 * agents :].view(agents, width)
        # The per-agent values above, expanded to the pieces the update kernels step.
        self._piece_lr = torch.zeros(pieces, **f64)
        self._piece_hyper = torch.zeros(pieces, width, **f64)
        self._piece_scale = torch.ones(pieces, **f64)
        self._piece_skip = torch.zeros(pieces, dtype=torch.uint8, device=device)
        self._synced_groups: list[tuple] | None = None
        self._tensor_lrs: tuple[list[Tensor], Tensor, Tensor] | None = None
        self._clipping = False
        self._norm = torch.zeros(agents, **f64)
        self._grad_scale = torch.ones(agents, **f64)
        self._grad_nonfinite = torch.zeros(agents, dtype=torch.uint8, device=device)
        self._skip = torch.zeros(agents, dtype=torch.uint8, device=device)
        self._chunk_sq = torch.zeros(arena.chunks.shape[0], **f64)
        self._piece_nonfinite = torch.zeros(pieces, dtype=torch.uint8, device=device)  # the probe's flags
        self._anticipated = arena.new_buffer()

    # ---- read-only views ----------------------------------------------------------------------

    @property
    def kernel(self) -> ops.OptimizerKernel:
        """The optimizer family the update ops run."""
        return self._kernel

    @property
    def state_buffers(self) -> Mapping[str, Tensor | None]:
        """Per state name (the kernel's ``state_names``), its flat buffer laid out like the arena, or
        None while no agent's settings have needed it."""
        return MappingProxyType(self._state_buffers)

    @property
    def step(self) -> Tensor:
        """float64 ``[pieces]``: the steps each piece (an agent's tensor) has taken."""
        return self._step

    @property
    def live(self) -> Tensor:
        """uint8 ``[pieces, MAX_STATES]``: 1 where state tensor s of a piece holds values."""
        return self._live

    @property
    def scalar_states(self) -> Mapping[str, Tensor]:
        """Per scalar state name (the kernel's ``scalar_names``: NAdam's ``mu_product``), its
        ``[pieces]`` values."""
        return MappingProxyType(self._scalar_states)

    @property
    def lr(self) -> Tensor:
        """float64 ``[agents]``: the learning rates of the last :meth:`sync`."""
        return self._lr

    @property
    def grad_scale(self) -> Tensor:
        """float64 ``[agents]``: the last level's clipping multipliers (1 where not clipped)."""
        return self._grad_scale

    @property
    def anticipated(self) -> Tensor:
        """The level l-1 parameters the anticipate kernels write, laid out like the arena."""
        return self._anticipated

    def update_arguments(self, commit: bool) -> dict[str, Tensor | None]:
        """The keyword arguments of ``kpg._ops.UPDATE_OPS[(kernel.name, commit)]`` a step passes."""
        anticipated = {} if commit else {"anticipated": self._anticipated}
        return dict(
            param=self._arena.param,
            grad=self._arena.grad,
            **anticipated,
            **self._state_buffers,
            **self._scalar_states,
            step=self._step,
            live=self._live,
            lr=self._piece_lr,
            hyper=self._piece_hyper,
            grad_scale=self._piece_scale,
            skip=self._piece_skip,
            chunks=self._arena.piece_chunks,
        )

    def norm_arguments(self) -> tuple[Tensor, ...]:
        """The positional arguments of ``kpg._ops.agent_grad_norms`` a step passes (clipping on)."""
        arena = self._arena
        return (
            arena.grad,
            arena.chunks,
            arena.agent_chunks,
            self._chunk_sq,
            self._max_norm,
            self._norm,
            self._grad_scale,
            self._grad_nonfinite,
        )

    # ---- hyperparameters and state lifecycle --------------------------------------------------

    def sync(self, param_groups: Sequence[dict[str, Any]]) -> bool:
        """Uploads every agent's lr, max_grad_norm and hyperparameters from ``param_groups`` to the
        tensors the kernels read, only when one changed (one copy; on CUDA from pinned memory,
        without waiting for the device), and spreads them to the pieces; a tensor lr is copied on
        the device at every call and checked (NaN, inf or negative raises; one synchronization for a
        CUDA tensor lr, left out while a CUDA graph is being captured). Creates the state buffers a
        newly enabled setting needs. A bad value raises, naming the agent, before anything changes.
        Returns whether it created a state buffer."""
        current = list(map(self._read_groups, param_groups))
        created = False
        if current != self._synced_groups:
            created = self._upload_groups(current)
        if self._tensor_lrs is not None:
            tensors, agents, which = self._tensor_lrs
            values = torch.stack([t.detach().reshape(()) for t in tensors])
            if not _capturing(values.device):
                readers = [[a for a, w in zip(agents.tolist(), which.tolist()) if w == i] for i in range(len(tensors))]
                check_tensor_lrs(values, readers)
            self._lr.index_copy_(0, agents, values.to(self._lr, non_blocking=True).index_select(0, which))
            torch.index_select(self._lr, 0, self._arena.piece_agent, out=self._piece_lr)
        return created

    def _upload_groups(self, current: list[tuple]) -> bool:
        groups = [dict(zip(self._group_keys, values)) for values in current]
        validate_groups(self._kernel, groups)
        rows = np.array([self._kernel.row(g) for g in groups], dtype=np.float64).reshape(len(groups), -1)
        kept = self._kernel.kept_states(rows)
        new_states = [
            name
            for name, needed in zip(self._kernel.state_names, kept.any(axis=0))
            if needed and self._state_buffers[name] is None
        ]
        tensor_agents = [agent for agent, g in enumerate(groups) if isinstance(g["lr"], Tensor)]
        lrs = [0.0 if isinstance(g["lr"], Tensor) else float(g["lr"]) for g in groups]
        max_norms = [math.inf if g["max_grad_norm"] is None else float(g["max_grad_norm"]) for g in groups]
        values = np.concatenate([np.asarray(lrs), np.asarray(max_norms), rows.reshape(-1)])
        if self._values.device.type == "cuda":
            # A fresh pinned block per upload: the caching host allocator keeps it until the copy ran.
            staging = torch.empty(values.size, dtype=torch.float64, pin_memory=True)
            staging.numpy()[:] = values
            self._values.copy_(staging, non_blocking=True)
        else:
            self._values.copy_(torch.from_numpy(values))
        piece_agent = self._arena.piece_agent
        torch.index_select(self._lr, 0, piece_agent, out=self._piece_lr)
        torch.index_select(self._hyper, 0, piece_agent, out=self._piece_hyper)
        self._tensor_lrs = None
        if tensor_agents:
            tensors: list[Tensor] = []
            which = []
            for agent in tensor_agents:
                lr = groups[agent]["lr"]
                index = next((i for i, t in enumerate(tensors) if t is lr), None)
                if index is None:
                    index = len(tensors)
                    tensors.append(lr)
                which.append(index)
            device = self._lr.device
            self._tensor_lrs = (tensors, torch.tensor(tensor_agents, device=device), torch.tensor(which, device=device))
        self._clipping = any(g["max_grad_norm"] is not None for g in groups)
        self._synced_groups = current
        for name in new_states:
            self._state_buffers[name] = self._arena.new_buffer()
        return bool(new_states)

    def initialize_states(self, agents: Iterable[int], param_groups: Sequence[dict[str, Any]]) -> None:
        """Sets the agents' state to where torch.optim starts it (zeros, or a hyperparameter's value:
        Adagrad's initial_accumulator_value; scalar state at its initial value) and marks it not live."""
        for name, start in zip(self._kernel.state_names, self._kernel.state_initial):
            buffer = self._state_buffers[name]
            if buffer is None:
                continue
            views = self._arena.agent_views(buffer)
            for agent in agents:
                value = 0.0 if start < 0 else self._kernel.row(param_groups[agent])[start]
                for view in views[agent]:
                    view.fill_(value)
        first = self._arena.agent_first_piece
        for agent in agents:
            self._live[first[agent] : first[agent + 1]].zero_()
            for name, initial in self._kernel.scalar_states:
                self._scalar_states[name][first[agent] : first[agent + 1]].fill_(initial)

    def torch_state(self) -> dict[Tensor, dict[str, Tensor]]:
        """torch.optim's per-parameter ``state`` as views of these tensors: per tensor of the
        parameter groups, its ``step`` count and its share of every state buffer."""
        buffer_views = {name: self._arena.agent_views(b) for name, b in self._state_buffers.items() if b is not None}
        first = self._arena.agent_first_piece
        return {
            p: {
                "step": self._step[first[agent] + index],
                **{name: values[first[agent] + index] for name, values in self._scalar_states.items()},
                **{name: views[agent][index] for name, views in buffer_views.items()},
            }
            for agent, tensors in enumerate(self._arena.agent_tensors)
            for index, p in enumerate(tensors)
        }

    def load(self, staged: StagedState, param_groups: Sequence[dict[str, Any]]) -> bool:
        """Copies a checked state dict in (``param_groups`` already hold its settings): the state
        buffers its tensors need are created, every agent's state starts afresh and takes the saved
        values, step counts, liveness and scalar state. Nothing here raises. Returns whether
        :meth:`torch_state`'s tensors changed (a buffer created, the scalar state replaced)."""
        created = self.sync(param_groups)
        for name in {name for _, name, _, _ in staged.tensors}:
            if self._state_buffers[name] is None:
                self._state_buffers[name] = self._arena.new_buffer()
                created = True
        with torch.no_grad():
            self.initialize_states(range(len(param_groups)), param_groups)
            views = {name: self._arena.agent_views(b) for name, b in self._state_buffers.items() if b is not None}
            for agent, name, position, value in staged.tensors:
                views[name][agent][position].copy_(value)
            self._step.copy_(staged.steps)
            self._live.copy_(staged.live)
            # torch.optim's load_state_dict casts per-parameter state other than step to the
            # parameter's dtype, NAdam's mu_product included; its later steps compute in that dtype.
            for name, values in staged.scalars.items():
                self._scalar_states[name] = values.to(self._arena.param)
        return created or bool(self._scalar_states)

    def replicated_tensors(self) -> list[Tensor]:
        """The optimizer state every data-parallel rank must hold alike: state buffers, step counts and
        scalar state."""
        return [*(b for b in self._state_buffers.values() if b is not None), self._step, *self._scalar_states.values()]

    # ---- the fused update ---------------------------------------------------------------------

    def update(
        self,
        level: int,
        commit: bool,
        loss_nonfinite: Tensor,
        unreached: Tensor | None,
        nonfinite: str,
        first_level: bool,
    ) -> None:
        """One level's fused update over every agent: the gradient norms (clipping scales and
        non-finite flags), then the anticipate kernel (writes :attr:`anticipated`) or the commit
        kernel (updates parameters, state, step counts in place).

        ``loss_nonfinite`` ([agents] bool) flags the agents whose loss at this level is not finite;
        ``unreached`` ([pieces] uint8, or None) the pieces backward did not reach, left as they are;
        ``nonfinite`` is the policy (``"raise"``, which also probes the commit before it writes,
        ``"skip"`` or ``"propagate"``); ``first_level`` starts the step's skip flags afresh (an
        agent non-finite at any level of a step is skipped from then on, commit included).
        """
        arena = self._arena
        check = nonfinite != "propagate"
        clipping = self._clipping
        if check or clipping:
            ops.agent_grad_norms(
                arena.grad,
                arena.chunks,
                arena.agent_chunks,
                self._chunk_sq,
                self._max_norm if clipping else None,
                self._norm,
                self._grad_scale,
                self._grad_nonfinite,
            )
        skip = None
        if check:
            flags = torch.logical_or(self._grad_nonfinite.bool(), loss_nonfinite)
            if first_level:
                self._skip.copy_(flags)
            else:
                self._skip.logical_or_(flags)
            if nonfinite == "raise":
                self._raise_if_nonfinite(level, loss_nonfinite)
            else:
                skip = self._skip
                if commit:
                    self._skipped_agent_steps += self._skip.sum()
        piece_agent = arena.piece_agent
        if clipping:
            torch.index_select(self._grad_scale, 0, piece_agent, out=self._piece_scale)
        piece_skip = None
        if skip is not None or unreached is not None:
            if skip is not None:
                torch.index_select(skip, 0, piece_agent, out=self._piece_skip)
            else:
                self._piece_skip.zero_()
            if unreached is not None:
                self._piece_skip.bitwise_or_(unreached)
            piece_skip = self._piece_skip
        arguments = self.update_arguments(commit)
        arguments["grad_scale"] = self._piece_scale if clipping else None
        arguments["skip"] = piece_skip
        if commit and nonfinite == "raise":
            self._refuse_nonfinite_commit(arguments)
        ops.UPDATE_OPS[(self._kernel.name, commit)](**arguments)

    def _refuse_nonfinite_commit(self, arguments: dict[str, Tensor | None]) -> None:
        """Raises FloatingPointError, before anything is written, if the commit with ``arguments``
        would make a parameter or state value inf or NaN although every loss and gradient was finite
        (an lr or eps that overflows, a sum of squares that does): ``nonfinite="raise"`` promises
        that no step leaves one. One read-only pass of the commit's math (the probe op, NOTE [Probe
        before commit] in csrc/kpg/update.h) and one host synchronization; no backup."""
        ops.PROBE_OPS[self._kernel.name](**arguments, nonfinite=self._piece_nonfinite)
        flags = torch.zeros_like(self._grad_nonfinite).scatter_reduce_(
            0, self._arena.piece_agent, self._piece_nonfinite, "amax"
        )
        # Every rank learns every rank's flags (agent sharding), so all raise or none.
        bad, _ = self._communicator.nonfinite_agents(flags, torch.zeros_like(flags))
        if not bad:
            return
        who = "the shared network's" if self._shared else f"agent {bad[0]}'s"
        others = f" (and {len(bad) - 1} more agents)" if len(bad) > 1 else ""
        raise FloatingPointError(
            f"the update made {who} parameters or optimizer state inf or NaN{others} although its losses and "
            "gradients were finite (a learning rate or eps that overflows, or state that does); the step was rolled "
            "back and nothing changed; lower the learning rate or raise eps, or pass nonfinite='propagate' to let "
            "the values through"
        )

    def _raise_if_nonfinite(self, level: int, loss_nonfinite: Tensor) -> None:
        bad, from_loss = self._communicator.nonfinite_agents(self._skip, loss_nonfinite)
        if not bad:
            return
        what = "loss" if from_loss else "gradient"
        who = "the shared network's" if self._shared else f"agent {bad[0]}'s"
        others = f" (and {len(bad) - 1} more agents)" if len(bad) > 1 else ""
        raise FloatingPointError(
            f"{who} {what} is not finite at level {level}{others}; the step was rolled back and nothing changed; "
            "pass nonfinite='skip' to skip such agents instead"
        )


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream (no host reads then)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
