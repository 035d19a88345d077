"""KPGOptimizer: K-level policy-gradient steps over the user's Torch models.

The algorithm (../shared/KPG.md): at every level l = 1..k each agent takes the gradient of its loss
at its own *base* parameters while the other agents sit at their level l-1 (*anticipated*)
parameters, and applies the optimizer from the base parameters and the base optimizer state.
Levels 1..k-1 only produce anticipated parameters (fused ``anticipate`` kernels, which never touch
the optimizer state); level k is committed (fused ``commit`` kernel). This module holds the
arguments, the torch.optim interface and the level loop, no arithmetic and no device state: the
agents' optimizer state on the device and the calls of the fused ops of :mod:`kpg._ops` are
:class:`kpg.agent_state.AgentState`, over a :class:`kpg.arena.ParameterArena`. The levels' closure
evaluations are :mod:`kpg.levels`, the parameter groups' checks and the state dicts' format
:mod:`kpg.optim_state`, the timing :mod:`kpg.profiling`; torch.distributed, when given a process
group, is behind a communicator (:mod:`kpg.distributed`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kpg import _ops as ops
from kpg.agent_state import AgentState
from kpg.anticipation import ANTICIPATIONS, MomentumAnticipation
from kpg.arena import ParameterArena, batched_num_agents
from kpg.distributed import DEFAULT_BUCKET_BYTES, PARALLEL_MODES, Communicator, LocalCommunicator
from kpg.levels import KPGContext, LevelEvaluator
from kpg.nn import AgentModule
from kpg.optim_state import check_k, exported_state, is_real, stage_state_dict, validate_groups
from kpg.profiling import KPGStats, PhaseTimer

__all__ = ["KPGOptimizer", "KPGContext", "KPGStats", "KSchedule"]

NONFINITE_POLICIES = ("raise", "skip", "propagate")
_COMPILE_THE_CLOSURE = (
    "KPGOptimizer.step runs eagerly under torch.compile (its levels rebind the parameters, which a graph cannot "
    "capture); compile the model or the closure instead, or use capture_step for CUDA graphs"
)


class KPGOptimizer(torch.optim.Optimizer):
    """K-level policy-gradient optimizer over several agents' models.

    Args:
        agents: one entry per agent, each an ``nn.Module`` or an iterable of parameters (agents may
            differ in shape); or a single ``nn.Module`` / iterable of parameters shared by all
            agents (parameter sharing); or one agent-batched model: a module built from
            :mod:`kpg.nn` layers (detected), whose slice ``[a]`` of every parameter is agent ``a``.
            An ``nn.ModuleList`` / ``nn.ModuleDict`` is refused (it could mean either); parameters
            must be leaf tensors.
        k: recursion depth; ``k=1`` is the plain optimizer step, ``k=2`` the practical default.
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"``, ``"adagrad"``, ``"nadam"`` or ``"radam"``, with
            ``torch.optim``'s hyperparameters and defaults (``betas``, ``eps``, ``weight_decay``,
            ``momentum``, ...; ``kpg._ops.OPTIMIZERS`` lists them, read from the kernels' table).
        lr: learning rate (a float or a one-element tensor, as torch.optim takes), or one per agent.
            Defaults to ``torch.optim``'s for the optimizer.
        max_grad_norm: per-agent gradient-norm clipping threshold (``clip_grad_norm_`` applied to
            each agent's gradient at every level), or one per agent, or None.
        nonfinite: what a non-finite loss or gradient does: ``"raise"`` (the step is rolled back and
            a ``FloatingPointError`` names the agent and level; one host synchronization per level),
            ``"skip"`` (the affected agents keep their parameters and state for this step, counted
            in ``stats.skipped_agent_steps``; no synchronization), or ``"propagate"`` (no check, as in
            ``torch.optim``).
        num_agents: with parameter sharing, the number of agents whose losses a closure returns
            (checked against the loss length when given).
        agent_dim: ``0`` declares ``agents`` (a module or an iterable of parameters) agent-batched
            without :mod:`kpg.nn` layers: dim 0 of every trainable parameter indexes the agents.
            kpg.nn models are detected without it.
        process_group: a ``torch.distributed`` group to step with (see :mod:`kpg.distributed`):
            with ``parallel="data"`` every rank passes every agent and its own equal share of the
            batch (the loss a mean over it); each level averages the gradients over the ranks before
            clipping and the update, so all ranks compute the same parameters (checked at
            construction). With ``parallel="agents"`` every rank passes only its own agents
            (:func:`kpg.distributed.agent_range`) and the closure exchanges what the others need
            through ``ctx.gather_agents`` or ``ctx.gather_anticipated_parameters``.
        verify_replicas: data parallel: check after every step that all ranks hold the same
            parameters and optimizer state (a debugging aid; one broadcast of both per step).
        bucket_bytes: the largest all-reduce of the data-parallel gradient average.
        anticipation: ``"exact"`` computes levels 1..k-1 (the paper's rule); ``"momentum"`` predicts
            each agent's level-1 parameters from its last two committed updates and runs only the
            last level (:mod:`kpg.anticipation`; k=1 or k=2). :meth:`reset_anticipation` forgets
            the history (at a new rollout, say).
        audit_anticipation: momentum mode: also compute the exact level-1 step at every k=2 step (at
            its cost; the committed step is unchanged) and report per agent in
            ``stats.anticipation_audit`` how far the prediction is from it.

    ``step(closure)`` calls ``closure(ctx)`` once per level; see :class:`KPGContext`. A closure
    without parameters is also accepted, for objectives that cannot be split into own and
    anticipated parts: for every level >= 2 and every agent i it is called with agent i at its
    base parameters and every other agent at level l-1, so its cost grows with the number of
    agents. The closure returns the loss: a scalar, or a 1-D tensor with one loss per agent. kpg
    runs the backward pass itself, only into the agents' parameters.

    torch.optim conventions it follows (at k=1 a step equals the torch.optim optimizer's
    single-tensor step, ``foreach=False, fused=False``; tests/test_optim_drop_in.py):

    - one parameter group per agent holding every hyperparameter (``lr``, ``betas``,
      ``weight_decay``, ...) plus ``max_grad_norm``, in ``param_groups`` and ``defaults``; each step
      reads them, so edits, schedulers (``StepLR`` ... ``OneCycleLR``, ``CyclicLR`` with
      ``cycle_momentum``, ``ReduceLROnPlateau``, chained) and loaded state dicts act at the next
      step, per agent. A bad value raises at that step, naming the agent, before anything changes.
    - a setting that needs a state tensor (amsgrad, momentum, centered) creates it when turned on:
      SGD's momentum buffer starts from the gradient at its first use, as torch's; where torch.optim
      raises ``KeyError`` (amsgrad, RMSprop momentum or centering turned on after its state exists)
      kpg starts the buffer at zeros, where torch would have started it at construction.
    - a parameter that the backward of the loss did not reach is not stepped at that level, as
      torch.optim skips a parameter whose ``.grad`` is None (its state and step count included:
      step counts are per parameter).
    - a tensor ``lr`` is read on the device at every step (a scheduler's ``fill_`` acts; keep it on
      the parameters' device so no host copy is needed, and under :meth:`capture_step`).
    - ``state_dict()`` and ``load_state_dict()`` use torch.optim's layout and names (``step``,
      ``exp_avg``, ``momentum_buffer``, ``sum``, ...): state dicts move both ways between kpg and
      torch.optim of the same optimizer over the same parameters, settings included.

    What it cannot follow: parameters are fixed at construction (``add_param_group`` raises: they
    live in one arena); ``zero_grad(set_to_none=True)`` zeroes (gradients stay arena views);
    ``foreach``, ``fused``, ``capturable`` and ``differentiable`` group keys loaded from a torch.optim
    state dict are kept but have no effect (kpg has one fused path and is not differentiable);
    sparse gradients are refused (an embedding layer with ``sparse=True`` among the agents' modules, at
    construction and at every step) and complex parameters are not supported (float32 and float64 only); with a
    float32 tensor lr torch computes Adam's step size in float32 while kpg uses float64.

    Parameters become views into one flat arena (and their ``.grad`` views into its gradient
    buffer): keep using the same modules; do not replace their ``.data`` or ``.grad``. An
    agent-batched model's parameters stay one tensor each, laid out parameter by parameter; its
    parameter groups (one per agent) hold the agents' slices, views of the arena, and
    ``state[slice]`` their optimizer state, in the layout of per-agent models.
    """

    def __init__(
        self,
        agents: nn.Module | Iterable[Any],
        k: int = 2,
        optimizer: str = "adam",
        lr: float | Sequence[float] | None = None,
        max_grad_norm: float | Sequence[float] | None = None,
        nonfinite: str = "raise",
        num_agents: int | None = None,
        agent_dim: int | None = None,
        process_group: Any = None,
        parallel: str = "data",
        verify_replicas: bool = False,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        anticipation: str = "exact",
        audit_anticipation: bool = False,
        **hyperparameters: Any,
    ):
        _check_anticipation(anticipation, audit_anticipation, k)
        if parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {', '.join(map(repr, PARALLEL_MODES))}, got {parallel!r}")
        if parallel == "agents" and process_group is None:
            raise ValueError(
                "parallel='agents' shards the agents over the ranks of a process group; pass process_group="
            )
        self._embeddings = _embedding_layers(agents)
        _refuse_sparse_gradients(self._embeddings)
        agent_params, self.shared, batched_params = _agent_parameters(agents, agent_dim)
        if parallel == "agents" and self.shared:
            raise ValueError(
                "parallel='agents' gives every rank its own agents' networks, but these agents share one network; "
                "use parallel='data' (each rank holds the shared network and its share of the batch)"
            )
        segments = batched_num_agents(batched_params) if batched_params is not None else len(agent_params)
        if self.shared and num_agents is not None and (not isinstance(num_agents, int) or num_agents < 1):
            raise ValueError(f"num_agents must be a positive int, got {num_agents!r}")
        if not self.shared and num_agents is not None and num_agents != segments:
            given = (
                f"the agent-batched model has {segments} agents"
                if batched_params is not None
                else f"{segments} agents were given"
            )
            raise ValueError(f"num_agents={num_agents} but {given}")
        check_k(k)
        if optimizer not in ops.OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(ops.OPTIMIZERS)}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {', '.join(map(repr, NONFINITE_POLICIES))}, got {nonfinite!r}")
        entry = ops.OPTIMIZERS[optimizer]
        defaults, default_lr = entry.defaults, entry.default_lr
        unknown = sorted(set(hyperparameters) - set(defaults))
        if unknown:
            raise TypeError(
                f"unknown hyperparameter(s) {', '.join(unknown)} for optimizer {optimizer!r}; "
                f"it takes lr, max_grad_norm and {', '.join(defaults)}"
            )
        lrs = _per_agent("lr", default_lr if lr is None else lr, segments, self.shared)
        max_norms = _per_agent("max_grad_norm", max_grad_norm, segments, self.shared)
        hyperparameters = {**defaults, **hyperparameters}
        validate_groups(
            entry.kernel, [{"lr": lr_a, "max_grad_norm": m, **hyperparameters} for lr_a, m in zip(lrs, max_norms)]
        )

        self.arena = (
            ParameterArena.batched(batched_params) if batched_params is not None else ParameterArena(agent_params)
        )
        self.k = k
        self.optimizer_name = optimizer
        self.nonfinite = nonfinite
        self.num_agents = num_agents if self.shared else segments
        self._kernel = entry.kernel
        self._constructing = True
        super().__init__(
            [
                {"params": params, "lr": lr_a, "max_grad_norm": norm_a, **hyperparameters}
                for params, lr_a, norm_a in zip(self.arena.agent_tensors, lrs, max_norms)
            ],
            {"lr": lrs[0], "max_grad_norm": max_norms[0], **hyperparameters},
        )
        self._constructing = False
        self._stepping = False  # a step in progress: its closure may not start another (see step)

        arena, device = self.arena, self.arena.device
        self.stats = KPGStats(skipped_agent_steps_tensor=torch.zeros((), dtype=torch.int64, device=device))
        self._timer = PhaseTimer(self.stats)
        self.verify_replicas = verify_replicas
        if process_group is None:
            self._communicator = LocalCommunicator(segments)
        else:
            self._communicator = Communicator(process_group, parallel, segments, bucket_bytes, device)
            self._communicator.check_layout(arena.numel, repr(self))
            self._communicator.check_replicas([arena.param], "the agents' parameters")
        self._agent_state = AgentState(
            arena, self._kernel, self._communicator, self.shared, self.stats.skipped_agent_steps_tensor
        )
        self._agent_state.sync(self.param_groups)
        self.state.update(self._agent_state.torch_state())
        self._agent_state.initialize_states(range(segments), self.param_groups)
        self._levels = LevelEvaluator(
            arena, self._agent_state.anticipated, self.num_agents, self.shared, self._communicator, self._timer
        )
        self.anticipation = anticipation
        self._momentum = MomentumAnticipation(arena, audit_anticipation) if anticipation == "momentum" else None

    @property
    def agent_state(self) -> AgentState:
        """The agents' optimizer state on the device (:class:`kpg.agent_state.AgentState`): step
        counts, liveness, learning rates, clipping scales, state buffers and the anticipated
        parameters, as the fused kernels read and write them. Read them; the optimizer owns them."""
        return self._agent_state

    @property
    def momentum_anticipation(self) -> MomentumAnticipation | None:
        """``anticipation="momentum"``: the rule's history (``latest`` update, ``latest_sq``, ``gate``
        per agent; :class:`kpg.anticipation.MomentumAnticipation`), for reading; None in exact mode."""
        return self._momentum

    # ---- torch.optim.Optimizer interface --------------------------------------------------------

    def __getstate__(self):
        raise TypeError(
            "a KPGOptimizer cannot be pickled or deep-copied: the models' parameters are views into its arena, "
            "which a copy would silently detach; save optimizer.state_dict() and build a new KPGOptimizer over the "
            "copied models instead"
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not self._constructing:
            raise RuntimeError(
                "KPGOptimizer's agents are fixed at construction; build a new KPGOptimizer to add parameters"
            )
        # The groups come complete from the arena, which has checked that no tensor belongs to two
        # agents; torch.optim's own check compares each group with every earlier one, which is
        # quadratic in the number of agents (seconds at a few thousand).
        self.param_groups.append(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes every agent's gradient in place (one fill of the arena's gradient buffer).

        Gradients stay views of the arena, so ``set_to_none`` is accepted for compatibility and
        has no other effect.
        """
        self.arena.restore_gradient_views()
        self.arena.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout (per-parameter ``step``, ``exp_avg``, ... and ``param_groups`` with
        every hyperparameter), with tensors copied out of the arena, plus a ``kpg`` entry (``k``,
        ``optimizer`` and ``nonfinite``, all restored by :meth:`load_state_dict`). A state tensor an
        agent has not used yet (SGD's momentum buffer before momentum was on) is left out, as
        torch.optim keeps none."""
        state = super().state_dict()
        state["state"] = exported_state(state["state"], self.param_groups, self._agent_state.live, self._kernel)
        state["kpg"] = {"k": self.k, "optimizer": self.optimizer_name, "nonfinite": self.nonfinite}
        if self._momentum is not None:
            state["kpg"]["anticipation"] = self._momentum.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a :meth:`state_dict`, or a torch.optim state dict of the same optimizer over the
        same parameters, by copying into the arena: its ``param_groups`` hyperparameters act from
        the next step, and the state buffers they or the saved state need are created; the ``k`` and
        ``nonfinite`` a kpg state dict carries are restored too (a torch.optim one carries neither,
        and leaves both as they are). Every check runs before anything changes: a state dict of
        another optimizer, a step count that is negative or not finite, a sum of squares below zero
        or any non-finite state value is refused."""
        staged = stage_state_dict(state_dict, self.param_groups, self._kernel, self.optimizer_name, NONFINITE_POLICIES)
        if self._momentum is not None:
            staged_momentum = self._momentum.stage(state_dict.get("kpg", {}).get("anticipation"))
        # Everything is checked: from here on nothing raises.
        for group, merged_group in zip(self.param_groups, staged.groups):
            group.update({key: value for key, value in merged_group.items() if key != "params"})
        if self._agent_state.load(staged, self.param_groups):
            self.state.update(self._agent_state.torch_state())
        if staged.k is not None:
            self.k = staged.k
        if staged.nonfinite is not None:
            self.nonfinite = staged.nonfinite
        if self._momentum is not None:
            self._momentum.load(staged_momentum)

    def reset_anticipation(self) -> None:
        """Momentum mode: forgets the committed updates (u1 = u2 = 0), so the others sit at their
        base parameters until two more steps are committed; the authors' RESET_MOMENTUM_EACH_UPDATE
        calls it before the first minibatch of every new rollout. Exact mode has nothing to forget."""
        if self._momentum is not None:
            self._momentum.reset()

    # ---- the KPG step -------------------------------------------------------------------------

    # Under torch.compile the step runs eagerly (Dynamo breaks the graph here): traced, the levels'
    # parameter rebinding and host-side bookkeeping are lost and a k >= 2 step silently trains nothing.
    @torch.compiler.disable(reason=_COMPILE_THE_CLOSURE)
    @torch.no_grad()
    def step(self, closure: Callable[..., Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """One KPG step: k levels, each one closure evaluation, backward and fused update; only
        the last level changes parameters and optimizer state. Returns the last level's loss."""
        if closure is None:
            raise ValueError(
                "KPGOptimizer.step needs a closure: each level re-evaluates the loss at new anticipated "
                "parameters. Pass closure(ctx) returning the loss (kpg calls backward)."
            )
        check_k(self.k)
        takes_context = _closure_takes_context(closure)
        if not takes_context and self.shared:
            raise ValueError(
                "with parameter sharing the closure must take ctx: own and anticipated parts are one network at "
                "two parameter values, which only ctx.anticipated() can tell apart"
            )
        if not takes_context and self._communicator.sharded:
            raise ValueError(
                "under agent sharding the closure must take ctx: the other ranks' agents reach this rank only through "
                "ctx.gather_agents or ctx.gather_anticipated_parameters"
            )
        if self._stepping:
            raise RuntimeError(
                "KPGOptimizer.step was called from inside its own closure; a step's closure only computes the loss "
                "(kpg evaluates it once per level and commits once at the end): call step outside the closure"
            )
        _refuse_sparse_gradients(self._embeddings)
        self.arena.check_parameters_bound()
        self.sync_hyperparameters()
        self.arena.restore_gradient_views()
        self._stepping = True
        try:
            if self._momentum is not None:
                loss = self._momentum.run_levels(self, closure, takes_context)
            else:
                for level in range(1, self.k + 1):
                    loss, loss_nonfinite = self._levels.evaluate(closure, level, self.k, takes_context)
                    self._update(level, level == self.k, loss_nonfinite)
        finally:
            self._stepping = False
            self._levels.end_step()
        self.stats.steps += 1
        if self.verify_replicas:
            self._communicator.check_replicas(
                [self.arena.param, *self._agent_state.replicated_tensors()],
                "parameters and optimizer state after a step",
            )
        return loss.detach()

    def capture_step(self, closure: Callable[..., Tensor], warmup_steps: int = 3) -> Callable[[], None]:
        """Captures one whole KPG step (all k levels) into a CUDA graph; returns its replay.

        The warm-up steps (on a side stream, as CUDA graphs require) are real steps. The closure
        must read its inputs from tensors that keep their storage, refilled in place before each
        replay. Each replay is a step with the captured k; after changing a learning rate, call
        :meth:`sync_hyperparameters` before the next replay. Needs ``nonfinite="skip"`` or
        ``"propagate"``: ``"raise"`` reads flags on the host, which a graph cannot do. In momentum
        mode the gate and the updates stay on the device and each replay advances them; the audit
        is refused (:meth:`MomentumAnticipation.check_capturable`).
        """
        if self._momentum is not None:
            self._momentum.check_capturable()
        if self.arena.device.type != "cuda":
            raise ValueError(f"capture_step needs the agents on a CUDA device, they are on {self.arena.device}")
        if self.nonfinite == "raise":
            raise ValueError(
                "capture_step needs nonfinite='skip' or 'propagate': nonfinite='raise' synchronizes with the host"
            )
        self._communicator.check_capturable()
        side_stream = torch.cuda.Stream(self.arena.device)
        side_stream.wait_stream(torch.cuda.current_stream(self.arena.device))
        with torch.cuda.stream(side_stream):
            for _ in range(warmup_steps):
                self.step(closure)
        torch.cuda.current_stream(self.arena.device).wait_stream(side_stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step(closure)
        return graph.replay

    def _update(self, level: int, commit: bool, loss_nonfinite: Tensor, first_level: bool | None = None) -> None:
        """Level ``level``'s fused update (:meth:`AgentState.update`); ``loss_nonfinite`` flags the
        agents whose loss is not finite. ``first_level`` (default: level 1) starts the step's skip
        flags afresh: momentum anticipation's k=2 step runs level 2 first."""
        with self._timer.timed("update", level):
            self._agent_state.update(
                level,
                commit,
                loss_nonfinite,
                self._levels.unreached_pieces(),
                self.nonfinite,
                level == 1 if first_level is None else first_level,
            )

    # ---- helpers ------------------------------------------------------------------------------

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """Agent 0's hyperparameters other than lr and max_grad_norm; every agent's are in
        ``param_groups``, which the kernels read at every step."""
        return {name: self.param_groups[0][name] for name, *_ in self._kernel.hyperparameters}

    def sync_hyperparameters(self) -> None:
        """Copies every agent's lr, max_grad_norm and hyperparameters from ``param_groups`` (edits,
        schedulers and loaded state dicts change them) to the device tensors the kernels read, and
        creates the state buffers a newly enabled setting needs; a bad value raises, naming the
        agent, before anything changes. step() calls it; call it yourself between replays of a
        captured step (:meth:`capture_step`).

        Plain numbers travel in one copy, and only when some value changed (on CUDA from pinned
        memory, without waiting for the device); a tensor ``lr`` is copied on the device at every
        call, so that in-place changes (schedulers ``fill_`` it) act, and checked (NaN, inf or
        negative raises before anything changes): for a CUDA tensor lr that check is one
        synchronization per step, left out while a CUDA graph is being captured.
        """
        if self._agent_state.sync(self.param_groups):
            self.state.update(self._agent_state.torch_state())

    def __repr__(self) -> str:
        if self.shared:
            sharing = "one network shared by all agents"
        elif self.arena.is_batched:
            sharing = f"{self.num_agents} agents in one agent-batched model"
        else:
            sharing = f"{self.num_agents} agents"
        return (
            f"KPGOptimizer(k={self.k}, optimizer={self.optimizer_name!r}, {sharing}, "
            f"{self.arena.numel} {str(self.arena.dtype).removeprefix('torch.')} parameters on {self.arena.device}, "
            f"nonfinite={self.nonfinite!r})"
        )


class KSchedule:
    """The paper's suggested k schedule: ``early_k`` for the first ``switch_step`` steps, then
    ``late_k`` (k=2 early for coordination, k=1 later to save compute). Call :meth:`step` once per
    optimizer step, like a learning-rate scheduler."""

    def __init__(self, optimizer: KPGOptimizer, switch_step: int, early_k: int = 2, late_k: int = 1):
        check_k(early_k)
        check_k(late_k)
        if isinstance(switch_step, bool) or not isinstance(switch_step, int) or switch_step < 0:
            raise ValueError(f"switch_step must be >= 0, got {switch_step}")
        self.optimizer, self.switch_step, self.early_k, self.late_k = optimizer, switch_step, early_k, late_k
        self.steps_done = 0
        optimizer.k = self.current_k()

    def current_k(self) -> int:
        return self.early_k if self.steps_done < self.switch_step else self.late_k

    def step(self) -> None:
        self.steps_done += 1
        self.optimizer.k = self.current_k()

    def state_dict(self) -> dict[str, int]:
        return {
            "steps_done": self.steps_done,
            "switch_step": self.switch_step,
            "early_k": self.early_k,
            "late_k": self.late_k,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restores :meth:`state_dict`'s four counts, after checking all of them (nothing changes
        if one is missing or invalid)."""
        keys = ("steps_done", "switch_step", "early_k", "late_k")
        if not isinstance(state, dict) or set(keys) - set(state):
            raise ValueError(f"KSchedule.load_state_dict needs a dict with {', '.join(keys)}, got {state!r}")
        check_k(state["early_k"])
        check_k(state["late_k"])
        for key in ("steps_done", "switch_step"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"KSchedule state {key} must be an int >= 0, got {value!r}")
        self.steps_done, self.switch_step = state["steps_done"], state["switch_step"]
        self.early_k, self.late_k = state["early_k"], state["late_k"]
        self.optimizer.k = self.current_k()


def _check_anticipation(anticipation: Any, audit: Any, k: Any) -> None:
    if anticipation not in ANTICIPATIONS:
        raise ValueError(f"anticipation must be one of {', '.join(map(repr, ANTICIPATIONS))}, got {anticipation!r}")
    if not isinstance(audit, bool):
        raise TypeError(f"audit_anticipation must be True or False, got {audit!r}")
    if audit and anticipation != "momentum":
        raise ValueError(
            "audit_anticipation=True measures the momentum prediction against the exact level-1 step; it needs "
            "anticipation='momentum'"
        )
    if anticipation == "momentum" and isinstance(k, int) and k > 2:
        raise ValueError(
            f"anticipation='momentum' predicts only level 1, so it runs k=1 or k=2, got k={k}; use "
            "anticipation='exact' for k >= 3"
        )


def _embedding_layers(agents: Any) -> list[tuple[str, nn.Embedding | nn.EmbeddingBag]]:
    """(name, layer) of every embedding layer in the agents' modules: the layers whose ``sparse``
    flag makes autograd produce sparse gradients (it may be switched on after construction)."""
    if isinstance(agents, nn.Module):
        roots = [("", agents)]
    elif isinstance(agents, (list, tuple)):
        roots = [(f"agents[{index}].", entry) for index, entry in enumerate(agents) if isinstance(entry, nn.Module)]
    else:
        return []
    return [
        (prefix + name, module)
        for prefix, root in roots
        for name, module in root.named_modules()
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag))
    ]


def _refuse_sparse_gradients(embeddings: list[tuple[str, nn.Embedding | nn.EmbeddingBag]]) -> None:
    """A sparse gradient reaching the arena's dense gradient buffer is added into it densely, in
    silence: momentum, Adam's moments and weight decay then move rows the batch never touched, where
    torch.optim's Adam refuses sparse gradients and its Adagrad steps only the rows present."""
    for name, layer in embeddings:
        if layer.sparse and layer.weight.requires_grad:
            raise ValueError(
                f"{type(layer).__name__} {name or '(the model)'} has sparse=True, which makes sparse gradients; kpg "
                "steps dense gradients only (its gradients are views of one dense buffer): build the layer with "
                "sparse=False (the default), or freeze it"
            )


def _closure_takes_context(closure: Callable) -> bool:
    """Whether ``closure`` takes the context: any positional parameter (``ctx``, ``ctx=None``) or
    ``*args``; a closure without parameters, or with keyword-only ones, does not."""
    try:
        parameters = inspect.signature(closure).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in parameters)


def _agent_parameters(
    agents: Any, agent_dim: int | None
) -> tuple[list[list[Tensor]] | None, bool, list[Tensor] | None]:
    """(parameters of each agent, shared, agent-batched parameters): a module or a flat iterable of
    tensors is one network shared by all agents, unless it is agent-batched (kpg.nn layers, or
    ``agent_dim=0``); a sequence of modules or of iterables is one entry per agent."""
    if isinstance(agents, Tensor):
        raise TypeError(
            "agents must be a sequence of modules or parameter iterables, or one module; got a single tensor: wrap "
            "it in a list"
        )
    if agent_dim is not None:
        if isinstance(agent_dim, bool) or agent_dim != 0:
            raise ValueError(
                f"agent_dim={agent_dim!r} is not supported: kpg needs the agent dimension first (agent_dim=0) so that "
                "each agent's slice of a parameter is contiguous; move it there with movedim"
            )
        params = agents.parameters() if isinstance(agents, nn.Module) else agents
        return None, False, _trainable(params, "the agent-batched model")
    if isinstance(agents, nn.Module):
        if _is_agent_batched(agents):
            return None, False, _batched_trainable(agents)
        if isinstance(agents, (nn.ModuleList, nn.ModuleDict)):
            entries = "list(agents.values())" if isinstance(agents, nn.ModuleDict) else "list(agents)"
            raise TypeError(
                f"agents is an nn.{type(agents).__name__}, which could mean one network per entry or one network "
                f"shared by all agents; say which: KPGOptimizer({entries}, ...) for one agent per entry, or "
                "KPGOptimizer(list(agents.parameters()), ...) for one network shared by all agents"
            )
        return [_trainable(agents.parameters(), "the shared model")], True, None
    entries = list(agents)
    if not entries:
        raise ValueError("KPGOptimizer got no agents; pass one module (or parameter list) per agent")
    if all(isinstance(e, Tensor) for e in entries):
        return [_trainable(entries, "the shared parameters")], True, None
    per_agent = []
    for index, entry in enumerate(entries):
        if isinstance(entry, Tensor):
            raise TypeError(
                f"agents[{index}] is a tensor while other entries are modules or iterables; give every agent as a "
                "module "
                "or a list of parameters"
            )
        if isinstance(entry, nn.Module) and _is_agent_batched(entry):
            raise TypeError(
                f"agents[{index}] is an agent-batched model (kpg.nn) inside a list of agents; pass it alone, "
                "KPGOptimizer(model), to step each of its agents' slices as one agent"
            )
        params = entry.parameters() if isinstance(entry, nn.Module) else entry
        per_agent.append(_trainable(params, f"agent {index}"))
    return per_agent, False, None


def _is_agent_batched(module: nn.Module) -> bool:
    return any(isinstance(m, AgentModule) for m in module.modules())


def _batched_trainable(module: nn.Module) -> list[Tensor]:
    """The trainable parameters of a model built from kpg.nn layers, each held by one of them."""
    counts = sorted({m.num_agents for m in module.modules() if isinstance(m, AgentModule)})
    if len(counts) > 1:
        raise ValueError(
            f"the agent-batched model mixes layers of {counts} agents; every kpg.nn layer needs the same num_agents"
        )
    batched = {id(p) for m in module.modules() if isinstance(m, AgentModule) for p in m.parameters(recurse=False)}
    for name, p in module.named_parameters():
        if p.requires_grad and id(p) not in batched:
            raise ValueError(
                f"parameter {name!r} of shape {tuple(p.shape)} is outside the kpg.nn layers of this agent-batched "
                "model, "
                "so it has no agent dimension; batch its layer with kpg.nn.stack, freeze it (requires_grad_(False)), "
                "or pass agent_dim=0 if its dim 0 indexes the agents"
            )
    return _trainable(module.parameters(), "the agent-batched model")


def _trainable(params: Iterable[Any], who: str) -> list[Tensor]:
    params = list(params)
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"{who} has a {type(p).__name__} among its parameters; pass tensors or modules")
    trainable = [p for p in params if p.requires_grad]
    for p in trainable:
        if not p.is_leaf:
            raise ValueError(
                f"{who} has a non-leaf tensor of shape {tuple(p.shape)} (computed by {type(p.grad_fn).__name__}) "
                "among its parameters: backward does not fill a non-leaf tensor's .grad and a step cannot change "
                "the values it was computed from, so it would never train; pass leaf tensors (nn.Parameter, or "
                "t.detach().requires_grad_())"
            )
    if not trainable:
        raise ValueError(f"{who} has no trainable parameters (none requires grad)")
    return trainable


def _per_agent(name: str, value: Any, segments: int, shared: bool) -> list[Any]:
    if isinstance(value, Tensor) and value.numel() == 1:
        return [value] * segments  # one tensor for every agent, as torch.optim gives every group the default
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if value is None or is_real(value):
        return [None if value is None else float(value)] * segments
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        raise TypeError(
            f"{name}={value!r} is a {type(value).__name__}; pass a number, a one-element tensor, or a sequence with "
            "one per agent"
        )
    values = list(value)
    for agent, v in enumerate(values):
        if not (v is None or is_real(v) or (isinstance(v, Tensor) and v.numel() == 1)):
            raise TypeError(f"{name}[{agent}]={v!r} is a {type(v).__name__}; pass a number for each agent")
    if shared:
        raise ValueError(f"{name} is per agent but the agents share one network; pass a single {name}")
    if len(values) != segments:
        raise ValueError(
            f"{name} has {len(values)} entries but there are {segments} agents; pass one per agent or a single value"
        )
    return [None if v is None else v if isinstance(v, Tensor) else float(v) for v in values]
