"""KPGOptimizer: K-level policy-gradient steps over the user's Torch models.

The algorithm (../shared/KPG.md): at every level l = 1..k each agent takes the gradient of its loss
at its own *base* parameters while the other agents sit at their level l-1 (*anticipated*)
parameters, and applies the optimizer from the base parameters and the base optimizer state.
Levels 1..k-1 only produce anticipated parameters (fused ``anticipate`` kernels, which never touch
the optimizer state); level k is committed (fused ``commit`` kernel). This module holds no
arithmetic: the updates are the ops of :mod:`kpg._ops` over a :class:`kpg.arena.ParameterArena`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import operator
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kpg import _ops as ops
from kpg.arena import ParameterArena, batched_num_agents
from kpg.distributed import DEFAULT_BUCKET_BYTES, PARALLEL_MODES, CommunicationError, Communicator
from kpg.nn import AgentModule

__all__ = ["KPGOptimizer", "KPGContext", "KPGStats", "KSchedule"]

NONFINITE_POLICIES = ("raise", "skip", "propagate")


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


class KPGContext:
    """What the closure sees during a KPG step: the level, ``k`` and the anticipated parameters.

    Code inside ``with ctx.anticipated():`` runs with every agent's parameters at their level
    l-1 values and gradients off; code outside sees the base parameters with gradients on. At
    level 1 the anticipated parameters are the base parameters. For an agent-batched model
    (:mod:`kpg.nn`) both are batched: one forward inside ``anticipated()`` evaluates every agent at
    level l-1, one outside every agent at its base parameters.
    """

    def __init__(self, optimizer: KPGOptimizer, level: int):
        self._optimizer = optimizer
        self.level = level
        self.k = optimizer.k
        self.num_agents = optimizer.num_agents
        self._at_base_calls = 0

    @contextlib.contextmanager
    def anticipated(self):
        opt = self._optimizer
        swap = self.level > 1
        started = time.perf_counter()
        with torch.no_grad(), opt._range("anticipated_forward", self.level):
            if swap:
                opt._bind_parameters(opt._anticipated_views)
            opt._inside_anticipated = True
            try:
                yield self
            finally:
                opt._inside_anticipated = False
                if swap:
                    opt._bind_parameters(opt.arena.param_views)
                opt.stats.add("anticipated_forward", self.level, time.perf_counter() - started)

    def at_base(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` at the base parameters, computed once per step and reused at every level.

        The base parameters do not change between the levels of a step, so the agents' own outputs
        (the own-policy forward) are the same at every level; only the anticipated part changes.
        The first level evaluates ``fn()`` with gradients on; later levels get the same result,
        autograd graph included (kpg keeps the graph until the last level's backward). Calls are
        matched by their order within the closure: call ``at_base`` in the same order at every level.
        """
        opt = self._optimizer
        if opt._inside_anticipated:
            raise RuntimeError(
                "ctx.at_base was called inside ctx.anticipated(); it computes the agents' own outputs at the base "
                "parameters: call it outside the anticipated block"
            )
        call = self._at_base_calls
        self._at_base_calls += 1
        code = getattr(fn, "__code__", None)
        if call < len(opt._at_base_outputs):
            cached_code, value = opt._at_base_outputs[call]
            if cached_code is not code:
                raise ValueError(
                    f"call {call + 1} of ctx.at_base at level {self.level} runs other code than the call it reuses "
                    "from an earlier level; call ctx.at_base with the same functions in the same order at every level"
                )
            return value
        value = fn()
        opt._at_base_outputs.append((code, value))
        return value

    def anticipated_parameters(self, module: nn.Module) -> dict[str, Tensor]:
        """``module``'s parameters at level l-1 by name, for ``torch.func.functional_call``.

        Holds every parameter of ``module`` that this optimizer steps, as a view of the anticipated
        parameters without gradient (at level 1, of the base parameters): for an agent-batched
        module, batched tensors, so ``functional_call(module, ctx.anticipated_parameters(module),
        (obs,))`` evaluates every agent at level l-1 without touching the module.
        """
        opt = self._optimizer
        views = opt._anticipated_views if self.level > 1 else opt.arena.param_views
        index = opt._arena_index
        named = {name: views[index[id(p)]] for name, p in module.named_parameters() if id(p) in index}
        if not named:
            raise ValueError(
                f"ctx.anticipated_parameters got a {type(module).__name__} that holds none of the parameters this "
                "optimizer steps; pass the agents' model (or one of its submodules)"
            )
        return named

    @property
    def agents(self) -> range:
        """The global indices of the agents whose losses this rank's closure returns: every agent,
        or this rank's own range under agent sharding. A closure that indexes its per-agent inputs
        with ``ctx.agents`` runs unchanged sharded and unsharded."""
        communicator = self._optimizer._communicator
        if communicator is not None and communicator.sharded:
            return range(communicator.first_agent, communicator.first_agent + communicator.local_agents)
        return range(self.num_agents if self.num_agents is not None else 1)

    def gather_agents(self, tensor: Tensor) -> Tensor:
        """Every agent's ``tensor`` (dim 0: this rank's agents, as ``ctx.agents``) in global agent
        order, without gradient: one all-gather under agent sharding, ``tensor.detach()`` otherwise.
        Gather the anticipated outputs the other agents' terms need (their log-probabilities,
        actions); every rank must call it the same number of times at a level."""
        communicator = self._optimizer._communicator
        return tensor.detach() if communicator is None else communicator.gather_agents(tensor)

    def gather_anticipated_parameters(self, module: nn.Module) -> dict[str, Tensor]:
        """:meth:`anticipated_parameters` of an agent-batched ``module`` with every rank's agents
        (one all-gather under agent sharding): ``functional_call`` of a model built for all agents
        (on the meta device it costs no memory) evaluates every agent at level l-1 on every rank."""
        named = self.anticipated_parameters(module)
        opt = self._optimizer
        communicator = opt._communicator
        if communicator is None or not communicator.sharded:
            return named
        if not opt.arena.is_batched:
            raise ValueError(
                "ctx.gather_anticipated_parameters needs an agent-batched model (kpg.nn layers or agent_dim=0) whose "
                "dim 0 holds this rank's agents; with one module per agent gather their outputs with ctx.gather_agents"
            )
        agents = communicator.local_agents
        rows = torch.cat([t.reshape(agents, -1) for t in named.values()], dim=1)
        gathered = communicator.gather_agents(rows)
        widths = [t[0].numel() for t in named.values()]
        return {name: part.reshape(-1, *t.shape[1:])
                for (name, t), part in zip(named.items(), gathered.split(widths, dim=1))}


class KPGOptimizer(torch.optim.Optimizer):
    """K-level policy-gradient optimizer over several agents' models.

    Args:
        agents: one entry per agent, each an ``nn.Module`` or an iterable of parameters (agents may
            differ in shape); or a single ``nn.Module`` / iterable of parameters shared by all
            agents (parameter sharing); or one agent-batched model: a module built from
            :mod:`kpg.nn` layers (detected), whose slice ``[a]`` of every parameter is agent ``a``.
        k: recursion depth; ``k=1`` is the plain optimizer step, ``k=2`` the practical default.
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"`` or ``"adagrad"``, with
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
    - a tensor ``lr`` is read on the device at every step (a scheduler's ``fill_`` acts; keep it on
      the parameters' device so no host copy is needed, and under :meth:`capture_step`).
    - ``state_dict()`` and ``load_state_dict()`` use torch.optim's layout and names (``step``,
      ``exp_avg``, ``momentum_buffer``, ``sum``, ...): state dicts move both ways between kpg and
      torch.optim of the same optimizer over the same parameters, settings included.

    What it cannot follow: parameters are fixed at construction (``add_param_group`` raises: they
    live in one arena); ``zero_grad(set_to_none=True)`` zeroes (gradients stay arena views);
    ``foreach``, ``fused``, ``capturable`` and ``differentiable`` group keys loaded from a torch.optim
    state dict are kept but have no effect (kpg has one fused path and is not differentiable);
    sparse gradients and complex parameters are not supported (float32 and float64 only); with a
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
        **hyperparameters: Any,
    ):
        if parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {', '.join(map(repr, PARALLEL_MODES))}, got {parallel!r}")
        if parallel == "agents" and process_group is None:
            raise ValueError("parallel='agents' shards the agents over the ranks of a process group; pass process_group=")
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
            given = f"the agent-batched model has {segments} agents" if batched_params is not None else f"{segments} agents were given"
            raise ValueError(f"num_agents={num_agents} but {given}")
        _check_k(k)
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
        _validate_groups(entry.kernel, [{"lr": lr_a, "max_grad_norm": m, **hyperparameters} for lr_a, m in zip(lrs, max_norms)])

        self.arena = ParameterArena.batched(batched_params) if batched_params is not None else ParameterArena(agent_params)
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

        arena, device = self.arena, self.arena.device
        f64 = dict(dtype=torch.float64, device=device)
        self._state_buffers: dict[str, Tensor | None] = {name: None for name in self._kernel.state_names}
        self._step = torch.zeros(segments, **f64)
        # Per-agent values the kernels read, in one device buffer filled by one copy (sync_hyperparameters).
        width = len(self._kernel.row_names)
        self._group_keys = ("lr", "max_grad_norm", *(h[0] for h in self._kernel.hyperparameters))
        self._read_groups = operator.itemgetter(*self._group_keys)
        self._values = torch.zeros(segments * (2 + width), **f64)
        self._lr = self._values[:segments]
        self._max_norm = self._values[segments : 2 * segments]
        self._hyper = self._values[2 * segments :].view(segments, width)
        self._live = torch.zeros(segments, ops.MAX_STATES, dtype=torch.uint8, device=device)
        self._synced_groups: list[tuple] | None = None
        self._tensor_lrs: tuple[list[Tensor], Tensor, Tensor] | None = None
        self._norm = torch.zeros(segments, **f64)
        self._grad_scale = torch.ones(segments, **f64)
        self._nonfinite = torch.zeros(segments, dtype=torch.uint8, device=device)
        self._skip = torch.zeros(segments, dtype=torch.uint8, device=device)
        self._chunk_sq = torch.zeros(arena.chunks.shape[0], **f64)
        self._anticipated = arena.new_buffer()
        self._anticipated_views = arena.views(self._anticipated)
        self._arena_index = {id(p): index for index, p in enumerate(arena.parameters)}
        self._at_base_outputs: list[tuple[Any, Any]] = []
        self._inside_anticipated = False
        self.sync_hyperparameters()
        self._expose_state()
        self._initialize_states(range(segments))
        self.stats = KPGStats(skipped_agent_steps_tensor=torch.zeros((), dtype=torch.int64, device=device))
        self.verify_replicas = verify_replicas
        self._communicator = None
        if process_group is not None:
            self._communicator = Communicator(process_group, parallel, segments, bucket_bytes, device)
            self._communicator.check_layout(arena.numel, repr(self))
            self._communicator.check_replicas([arena.param], "the agents' parameters")

    # ---- torch.optim.Optimizer interface --------------------------------------------------------

    def __getstate__(self):
        raise TypeError(
            "a KPGOptimizer cannot be pickled or deep-copied: the models' parameters are views into its arena, "
            "which a copy would silently detach; save optimizer.state_dict() and build a new KPGOptimizer over the "
            "copied models instead"
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not self._constructing:
            raise RuntimeError("KPGOptimizer's agents are fixed at construction; build a new KPGOptimizer to add parameters")
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
        every hyperparameter), with tensors copied out of the arena, plus a ``kpg`` entry (k,
        optimizer). A state tensor an agent has not used yet (SGD's momentum buffer before momentum
        was on) is left out, as torch.optim keeps none."""
        state = super().state_dict()
        live = self._live.cpu()
        names = self._kernel.state_names
        index = 0
        for agent, group in enumerate(self.param_groups):
            for _ in group["params"]:
                entry = state["state"].get(index, {})
                state["state"][index] = {
                    name: t.clone() for name, t in entry.items()
                    if name == "step" or (name in names and live[agent, names.index(name)])
                }
                index += 1
        state["kpg"] = {"k": self.k, "optimizer": self.optimizer_name, "nonfinite": self.nonfinite}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a :meth:`state_dict`, or a torch.optim state dict of the same optimizer over the
        same parameters, by copying into the arena: its ``param_groups`` hyperparameters act from
        the next step, and the state buffers they or the saved state need are created. Every check
        runs before anything changes."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), list) or not isinstance(
                state_dict.get("state"), dict):
            raise ValueError(
                f"load_state_dict needs an optimizer state dict (a dict with 'state' and 'param_groups', as state_dict() "
                f"returns), got {type(state_dict).__name__}" + (f" with keys {sorted(map(str, state_dict))}" if isinstance(state_dict, dict) else "")
            )
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"the state dict has {len(groups)} parameter groups, this optimizer {len(self.param_groups)} (one per agent)"
            )
        extra = state_dict.get("kpg", {})
        if extra.get("optimizer", self.optimizer_name) != self.optimizer_name:
            raise ValueError(f"the state dict is for optimizer {extra['optimizer']!r}, this one is {self.optimizer_name!r}")
        if "k" in extra:
            _check_k(extra["k"])
        merged = [{**own, **{key: value for key, value in saved.items() if key != "params"}}
                  for own, saved in zip(self.param_groups, groups)]
        for group in merged:
            if isinstance(group["lr"], (int, float)) and not isinstance(group["lr"], bool):
                group["lr"] = float(group["lr"])
        _validate_groups(self._kernel, merged)
        names = self._kernel.state_names
        staged: list[tuple[int, str, int, Tensor]] = []
        steps = torch.zeros_like(self._step, device="cpu")
        live = torch.zeros_like(self._live, device="cpu")
        for agent, (group, saved_group) in enumerate(zip(self.param_groups, groups)):
            if len(saved_group["params"]) != len(group["params"]):
                raise ValueError(
                    f"agent {agent} has {len(group['params'])} parameters, the state dict {len(saved_group['params'])}"
                )
            agent_steps, agent_live = set(), set()
            for position, (p, saved_id) in enumerate(zip(group["params"], saved_group["params"])):
                saved = {n: v for n, v in state_dict["state"].get(saved_id, {}).items() if v is not None}
                present = frozenset(n for n in names if n in saved)
                agent_live.add(present)
                if present:
                    # torch.optim's SGD keeps no step count: a saved momentum buffer means "stepped".
                    agent_steps.add(float(saved.get("step", 1.0)))
                elif "step" in saved:
                    agent_steps.add(float(saved["step"]))
                for name in present:
                    value = torch.as_tensor(saved[name])
                    if value.shape != p.shape:
                        raise ValueError(
                            f"{name!r} of agent {agent}'s parameter has shape {tuple(value.shape)}, "
                            f"expected {tuple(p.shape)}"
                        )
                    if not bool(torch.isfinite(value).all()):
                        raise ValueError(
                            f"{name!r} of agent {agent}'s parameter of shape {tuple(p.shape)} holds inf or NaN: the saved run had "
                            "already diverged; load an earlier state dict"
                        )
                    staged.append((agent, name, position, value))
            if len(agent_steps) > 1:
                raise ValueError(f"agent {agent}'s parameters have different step counts {sorted(agent_steps)}; kpg steps an agent as a whole")
            if len(agent_live) > 1:
                raise ValueError(
                    f"agent {agent}'s parameters hold different state tensors ({sorted(map(sorted, agent_live))}); kpg "
                    "steps an agent as a whole"
                )
            steps[agent] = agent_steps.pop() if agent_steps else 0.0
            for name in (agent_live.pop() if agent_live else ()):
                live[agent, names.index(name)] = 1
        # Everything is checked: from here on nothing raises.
        for group, merged_group in zip(self.param_groups, merged):
            group.update({key: value for key, value in merged_group.items() if key != "params"})
        self.sync_hyperparameters()
        for name in {name for _, name, _, _ in staged}:
            if self._state_buffers[name] is None:
                self._state_buffers[name] = self.arena.new_buffer()
                self._expose_state()
        with torch.no_grad():
            self._initialize_states(range(len(self.param_groups)))
            views = {name: self.arena.agent_views(b) for name, b in self._state_buffers.items() if b is not None}
            for agent, name, position, value in staged:
                views[name][agent][position].copy_(value)
            self._step.copy_(steps)
            self._live.copy_(live)
        if "k" in extra:
            self.k = extra["k"]

    # ---- the KPG step -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[..., Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """One KPG step: k levels, each one closure evaluation, backward and fused update; only
        the last level changes parameters and optimizer state. Returns the last level's loss."""
        if closure is None:
            raise ValueError(
                "KPGOptimizer.step needs a closure: each level re-evaluates the loss at new anticipated "
                "parameters. Pass closure(ctx) returning the loss (kpg calls backward)."
            )
        _check_k(self.k)
        takes_context = _closure_takes_context(closure)
        if not takes_context and self.shared:
            raise ValueError(
                "with parameter sharing the closure must take ctx: own and anticipated parts are one network at "
                "two parameter values, which only ctx.anticipated() can tell apart"
            )
        if not takes_context and self._communicator is not None and self._communicator.sharded:
            raise ValueError(
                "under agent sharding the closure must take ctx: the other ranks' agents reach this rank only through "
                "ctx.gather_agents or ctx.gather_anticipated_parameters"
            )
        self.arena.check_parameters_bound()
        self.sync_hyperparameters()
        self.arena.restore_gradient_views()
        try:
            for level in range(1, self.k + 1):
                loss = self._level_gradients(closure, level, takes_context)
                self._update(level, commit=level == self.k)
        finally:
            self._bind_parameters(self.arena.param_views)
            self._at_base_outputs = []
        self.stats.steps += 1
        if self.verify_replicas and self._communicator is not None:
            states = [b for b in self._state_buffers.values() if b is not None]
            self._communicator.check_replicas([self.arena.param, *states, self._step], "parameters and optimizer state after a step")
        return loss.detach()

    def capture_step(self, closure: Callable[..., Tensor], warmup_steps: int = 3) -> Callable[[], None]:
        """Captures one whole KPG step (all k levels) into a CUDA graph; returns its replay.

        The warm-up steps (on a side stream, as CUDA graphs require) are real steps. The closure
        must read its inputs from tensors that keep their storage, refilled in place before each
        replay. Each replay is a step with the captured k; after changing a learning rate, call
        :meth:`sync_hyperparameters` before the next replay. Needs ``nonfinite="skip"`` or
        ``"propagate"``: ``"raise"`` reads flags on the host, which a graph cannot do.
        """
        if self.arena.device.type != "cuda":
            raise ValueError(f"capture_step needs the agents on a CUDA device, they are on {self.arena.device}")
        if self.nonfinite == "raise":
            raise ValueError("capture_step needs nonfinite='skip' or 'propagate': nonfinite='raise' synchronizes with the host")
        if self._communicator is not None:
            raise ValueError("capture_step cannot capture a distributed step: the ranks agree on failures on the host every level")
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

    def _level_gradients(self, closure, level: int, takes_context: bool) -> Tensor:
        self.arena.grad.zero_()
        if self._communicator is not None:
            return self._exchanged_level(closure, level, takes_context)
        if takes_context:
            return self._context_level(closure, level)
        return self._brute_force_level(closure, level)

    def _exchanged_level(self, closure, level: int, takes_context: bool) -> Tensor:
        """A level under torch.distributed: the ranks learn whether any of them failed before the
        gradients are averaged, so all raise or none (note "agreed failure" in kpg/distributed.py)."""
        communicator, error, loss = self._communicator, None, None
        try:
            loss = self._context_level(closure, level) if takes_context else self._brute_force_level(closure, level)
        except CommunicationError:
            raise
        except Exception as caught:
            error = caught
        self._loss_nonfinite = communicator.agree_on_level(level, self.k, error, None if error else self._loss_nonfinite)
        if not communicator.sharded:
            communicator.average_gradients(self.arena.grad, level)
        return loss

    def _context_level(self, closure, level: int) -> Tensor:
        ctx = KPGContext(self, level)
        with self._timed("closure", level), torch.enable_grad():
            loss = closure(ctx)
        agent_losses = self._checked_loss(loss, level)
        # ctx.at_base outputs are reused by the next level, so their graph must survive this backward.
        keep_graph = bool(self._at_base_outputs) and level < self.k
        with self._timed("backward", level), torch.enable_grad():
            torch.autograd.backward(loss.sum(), inputs=self.arena.parameters, retain_graph=keep_graph)
        self._loss_nonfinite = ~torch.isfinite(agent_losses.detach())
        return loss

    def _brute_force_level(self, closure, level: int) -> Tensor:
        arena = self.arena
        if level == 1:
            with self._timed("closure", level), torch.enable_grad():
                loss = closure()
            agent_losses = self._checked_loss(loss, level)
            with self._timed("backward", level), torch.enable_grad():
                if loss.dim() == 0:
                    torch.autograd.backward(loss, inputs=arena.parameters)
                else:
                    for agent in range(arena.num_agents):
                        self._add_agent_gradient(agent, agent_losses[agent], retain_graph=True)
            self._loss_nonfinite = ~torch.isfinite(agent_losses.detach())
            return loss
        # Level >= 2: agent i at its base parameters, every other agent at level l-1, in one
        # "mixed" buffer that holds the anticipated parameters with agent i's share swapped in.
        mixed = self._mixed_point
        mixed.buffer.copy_(self._anticipated)
        flags = []
        self._bind_parameters(mixed.views)
        try:
            for agent in range(arena.num_agents):
                for slot, base in zip(mixed.agent_views[agent], mixed.base_agent_views[agent]):
                    slot.copy_(base)
                try:
                    with self._timed("closure", level), torch.enable_grad():
                        loss = closure()
                    self._checked_loss(loss, level)
                    with self._timed("backward", level), torch.enable_grad():
                        agent_loss = loss[agent] if loss.dim() == 1 else loss
                        self._add_agent_gradient(agent, agent_loss, retain_graph=False)
                    flags.append(~torch.isfinite(agent_loss.detach()).reshape(1))
                finally:
                    for slot, anticipated in zip(mixed.agent_views[agent], mixed.anticipated_agent_views[agent]):
                        slot.copy_(anticipated)
        finally:
            self._bind_parameters(arena.param_views)
        self._loss_nonfinite = torch.cat(flags)
        return loss

    def _add_agent_gradient(self, agent: int, loss: Tensor, retain_graph: bool) -> None:
        """Adds the gradient of ``loss`` with respect to agent ``agent``'s share of the parameters
        (whole tensors, or its slices of batched ones) to that share of the arena's gradient."""
        pieces = self.arena.agent_pieces[agent]
        inputs = [self.arena.parameters[index] for index, _ in pieces]
        grads = torch.autograd.grad(loss, inputs, retain_graph=retain_graph, allow_unused=True)
        for (_, slot), grad, target in zip(pieces, grads, self._agent_grad_views[agent]):
            if grad is not None:
                target += grad if slot is None else grad[slot]

    @functools.cached_property
    def _agent_grad_views(self) -> list[list[Tensor]]:
        """Each agent's share of the gradient buffer; only closures without parameters need it."""
        return self.arena.agent_views(self.arena.grad)

    @functools.cached_property
    def _mixed_point(self) -> _MixedPoint:
        """The buffer and views of the mixed points a closure without parameters is evaluated at."""
        buffer = self.arena.new_buffer()
        return _MixedPoint(buffer, self.arena.views(buffer), self.arena.agent_views(buffer),
                           self.arena.agent_views(self.arena.param), self.arena.agent_views(self._anticipated))

    def _checked_loss(self, loss: Any, level: int) -> Tensor:
        """The loss per optimizer agent (arena segment), after checking type and shape."""
        if not isinstance(loss, Tensor):
            raise TypeError(f"the closure returned {type(loss).__name__} at level {level}; it must return the loss as a tensor")
        if not loss.is_floating_point():
            raise TypeError(f"the closure returned a {loss.dtype} loss at level {level}; return a floating-point loss")
        if loss.dim() > 1:
            raise ValueError(
                f"the closure returned a loss of shape {tuple(loss.shape)} at level {level}; expected a scalar or "
                f"one loss per agent, shape ({self.num_agents if self.num_agents is not None else 'agents'},)"
            )
        if loss.dim() == 1 and self.num_agents is not None and loss.shape[0] != self.num_agents:
            raise ValueError(
                f"the closure returned {loss.shape[0]} losses at level {level}; expected a scalar or one per agent "
                f"({self.num_agents})"
            )
        if not loss.requires_grad:
            raise ValueError(
                f"the closure's loss at level {level} does not depend on any agent's base parameters with gradient; "
                "compute the agents' own terms outside ctx.anticipated()"
            )
        segments = self.arena.num_agents
        if loss.dim() == 0 or self.shared:
            return loss.reshape(1).expand(segments) if loss.dim() == 0 else loss.sum().reshape(1)
        return loss

    def _update(self, level: int, commit: bool) -> None:
        with self._timed("update", level):
            check = self.nonfinite != "propagate"
            clipping = self._clipping
            if check or clipping:
                ops.agent_grad_norms(
                    self.arena.grad, self.arena.chunks, self.arena.agent_chunks, self._chunk_sq,
                    self._max_norm if clipping else None, self._norm, self._grad_scale, self._nonfinite,
                )
            skip = None
            if check:
                # An agent non-finite at any level of the step is skipped from then on, commit included.
                flags = torch.logical_or(self._nonfinite.bool(), self._loss_nonfinite)
                if level == 1:
                    self._skip.copy_(flags)
                else:
                    self._skip.logical_or_(flags)
                if self.nonfinite == "raise":
                    self._raise_if_nonfinite(level)
                else:
                    skip = self._skip
                    if commit:
                        self.stats.skipped_agent_steps_tensor += self._skip.sum()
            kernel = ops.UPDATE_OPS[(self._kernel.name, commit)]
            common = dict(step=self._step, live=self._live, lr=self._lr, hyper=self._hyper,
                          grad_scale=self._grad_scale if clipping else None, skip=skip, chunks=self.arena.chunks)
            if commit:
                kernel(self.arena.param, self.arena.grad, **self._state_buffers, **common)
            else:
                kernel(self.arena.param, self.arena.grad, self._anticipated, **self._state_buffers, **common)

    def _raise_if_nonfinite(self, level: int) -> None:
        if self._communicator is not None and self._communicator.sharded:
            bad, from_loss = self._communicator.nonfinite_agents(self._skip, self._loss_nonfinite)
        else:
            bad = self._skip.nonzero().flatten().tolist()
            from_loss = [bool(self._loss_nonfinite[agent]) for agent in bad[:1]]
        if not bad:
            return
        agent = bad[0]
        what = "loss" if from_loss[0] else "gradient"
        who = "the shared network's" if self.shared else f"agent {agent}'s"
        others = f" (and {len(bad) - 1} more agents)" if len(bad) > 1 else ""
        raise FloatingPointError(
            f"{who} {what} is not finite at level {level}{others}; the step was rolled back and nothing changed; "
            "pass nonfinite='skip' to skip such agents instead"
        )

    # ---- helpers ------------------------------------------------------------------------------

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """Agent 0's hyperparameters other than lr and max_grad_norm; every agent's are in
        ``param_groups``, which the kernels read at every step."""
        return {name: self.param_groups[0][name] for name in self._group_keys[2:]}

    def sync_hyperparameters(self) -> None:
        """Copies every agent's lr, max_grad_norm and hyperparameters from ``param_groups`` (edits,
        schedulers and loaded state dicts change them) to the device tensors the kernels read, and
        creates the state buffers a newly enabled setting needs; a bad value raises, naming the
        agent, before anything changes. step() calls it; call it yourself between replays of a
        captured step (:meth:`capture_step`).

        Plain numbers travel in one copy, and only when some value changed (on CUDA from pinned
        memory, without waiting for the device); a tensor ``lr`` is copied on the device at every
        call, so that in-place changes (schedulers ``fill_`` it) act without a synchronization.
        """
        current = list(map(self._read_groups, self.param_groups))
        if current != self._synced_groups:
            self._upload_groups(current)
        if self._tensor_lrs is not None:
            tensors, agents, which = self._tensor_lrs
            values = torch.stack([t.detach().reshape(()) for t in tensors]).to(self._lr, non_blocking=True)
            self._lr.index_copy_(0, agents, values.index_select(0, which))

    def _upload_groups(self, current: list[tuple]) -> None:
        groups = [dict(zip(self._group_keys, values)) for values in current]
        _validate_groups(self._kernel, groups)
        rows = np.array([self._kernel.row(g) for g in groups], dtype=np.float64).reshape(len(groups), -1)
        kept = self._kernel.kept_states(rows)
        new_states = [name for name, needed in zip(self._kernel.state_names, kept.any(axis=0))
                      if needed and self._state_buffers[name] is None]
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
            self._state_buffers[name] = self.arena.new_buffer()
        if new_states:
            self._expose_state()

    def _initialize_states(self, agents: Iterable[int]) -> None:
        """Sets the agents' state to where torch.optim starts it (zeros, or a hyperparameter's value:
        Adagrad's initial_accumulator_value) and marks it not live."""
        for name, start in zip(self._kernel.state_names, self._kernel.state_initial):
            buffer = self._state_buffers[name]
            if buffer is None:
                continue
            views = self.arena.agent_views(buffer)
            for agent in agents:
                value = 0.0 if start < 0 else self._kernel.row(self.param_groups[agent])[start]
                for view in views[agent]:
                    view.fill_(value)
        for agent in agents:
            self._live[agent].zero_()

    def _bind_parameters(self, views: Sequence[Tensor]) -> None:
        for p, view in zip(self.arena.parameters, views):
            p.data = view

    def _expose_state(self) -> None:
        """``self.state[p]`` holds views of the arena's state, as torch.optim keeps per-parameter
        state, with ``step`` a view of the agent's step count; for an agent-batched model ``p`` is an
        agent's slice of a parameter (the tensors of the parameter groups). A state tensor that an
        agent's settings never used holds its starting value (:meth:`state_dict` leaves it out)."""
        buffer_views = {name: self.arena.agent_views(b) for name, b in self._state_buffers.items() if b is not None}
        for agent, tensors in enumerate(self.arena.agent_tensors):
            for index, p in enumerate(tensors):
                self.state[p] = {"step": self._step[agent], **{name: views[agent][index] for name, views in buffer_views.items()}}

    def _range(self, phase: str, level: int):
        if _profiler_active():
            return torch.profiler.record_function(f"kpg/level{level}/{phase}")
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _timed(self, phase: str, level: int):
        started = time.perf_counter()
        with self._range(phase, level):
            try:
                yield
            finally:
                self.stats.add(phase, level, time.perf_counter() - started)

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


@dataclass
class _MixedPoint:
    """One agent at its base parameters, the others at level l-1, in a buffer laid out like the arena."""

    buffer: Tensor
    views: list[Tensor]  # per parameter, for binding
    agent_views: list[list[Tensor]]  # each agent's share of buffer
    base_agent_views: list[list[Tensor]]  # ... of the base parameters
    anticipated_agent_views: list[list[Tensor]]  # ... of the anticipated parameters


class KSchedule:
    """The paper's suggested k schedule: ``early_k`` for the first ``switch_step`` steps, then
    ``late_k`` (k=2 early for coordination, k=1 later to save compute). Call :meth:`step` once per
    optimizer step, like a learning-rate scheduler."""

    def __init__(self, optimizer: KPGOptimizer, switch_step: int, early_k: int = 2, late_k: int = 1):
        _check_k(early_k)
        _check_k(late_k)
        if switch_step < 0:
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
        return {"steps_done": self.steps_done, "switch_step": self.switch_step, "early_k": self.early_k, "late_k": self.late_k}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps_done, self.switch_step = state["steps_done"], state["switch_step"]
        self.early_k, self.late_k = state["early_k"], state["late_k"]
        self.optimizer.k = self.current_k()


def _profiler_active() -> bool:
    """Whether a torch profiler records: the ranges cost ~30 us each otherwise. torch has no public
    query; torch.autograd._profiler_enabled is the state the profiler itself consults, and where a
    torch lacks it every range is recorded."""
    enabled = getattr(torch.autograd, "_profiler_enabled", None)
    return True if enabled is None else bool(enabled())


def _check_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1 (k=1 is the plain optimizer step, k=2 the practical default), got {k!r}")


def _closure_takes_context(closure: Callable) -> bool:
    """Whether ``closure`` takes the context: any positional parameter (``ctx``, ``ctx=None``) or
    ``*args``; a closure without parameters, or with keyword-only ones, does not."""
    try:
        parameters = inspect.signature(closure).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in parameters)


def _agent_parameters(agents: Any, agent_dim: int | None) -> tuple[list[list[Tensor]] | None, bool, list[Tensor] | None]:
    """(parameters of each agent, shared, agent-batched parameters): a module or a flat iterable of
    tensors is one network shared by all agents, unless it is agent-batched (kpg.nn layers, or
    ``agent_dim=0``); a sequence of modules or of iterables is one entry per agent."""
    if isinstance(agents, Tensor):
        raise TypeError("agents must be a sequence of modules or parameter iterables, or one module; got a single tensor: wrap it in a list")
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
                f"agents[{index}] is a tensor while other entries are modules or iterables; give every agent as a module "
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
        raise ValueError(f"the agent-batched model mixes layers of {counts} agents; every kpg.nn layer needs the same num_agents")
    batched = {id(p) for m in module.modules() if isinstance(m, AgentModule) for p in m.parameters(recurse=False)}
    for name, p in module.named_parameters():
        if p.requires_grad and id(p) not in batched:
            raise ValueError(
                f"parameter {name!r} of shape {tuple(p.shape)} is outside the kpg.nn layers of this agent-batched model, "
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
    if not trainable:
        raise ValueError(f"{who} has no trainable parameters (none requires grad)")
    return trainable


def _per_agent(name: str, value: Any, segments: int, shared: bool) -> list[Any]:
    if isinstance(value, Tensor) and value.numel() == 1:
        return [value] * segments  # one tensor for every agent, as torch.optim gives every group the default
    if value is None or isinstance(value, (int, float)):
        return [None if value is None else float(value)] * segments
    values = list(value)
    if shared:
        raise ValueError(f"{name} is per agent but the agents share one network; pass a single {name}")
    if len(values) != segments:
        raise ValueError(f"{name} has {len(values)} entries but there are {segments} agents; pass one per agent or a single value")
    return [None if v is None else v if isinstance(v, Tensor) else float(v) for v in values]


def _validate_groups(kernel: ops.OptimizerKernel, groups: Sequence[dict[str, Any]]) -> None:
    """torch.optim's checks of every agent's group, and the values kpg cannot take: a bad value
    raises naming the agent; infinite or NaN coefficients would turn every parameter into inf or
    NaN in one step, and no gradient check sees it coming."""
    for agent, group in enumerate(groups):
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if lr.numel() != 1 or not lr.is_floating_point():
                raise ValueError(f"Invalid learning rate for agent {agent}: a tensor lr must hold one "
                                 f"floating-point value, got {lr.dtype} of shape {tuple(lr.shape)}")
            if lr.device.type == "cpu" and not (float(lr) >= 0.0 and math.isfinite(float(lr))):
                raise ValueError(
                    f"Invalid learning rate {float(lr)!r} for agent {agent}: it must be a finite number >= 0")
        elif isinstance(lr, bool) or not (isinstance(lr, (int, float)) and lr >= 0.0 and math.isfinite(lr)):
            raise ValueError(f"Invalid learning rate {lr!r} for agent {agent}: it must be a finite number >= 0")
        m = group["max_grad_norm"]
        if m is not None and not (isinstance(m, (int, float)) and m > 0.0):
            raise ValueError(f"Invalid max_grad_norm {m!r} for agent {agent}: it must be > 0, or None for no clipping")
        for name, width, kind, _ in kernel.hyperparameters:
            value = group[name]
            if width > 1:
                if not (isinstance(value, (tuple, list)) and len(value) == width):
                    raise ValueError(f"Invalid {name} value {value!r} for agent {agent}: expected {width} numbers")
                for i, v in enumerate(value):
                    if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
                        raise ValueError(f"Invalid beta parameter at index {i}: {v} (agent {agent}'s {name})")
            elif kind == "flag":
                if value not in (True, False):
                    raise ValueError(f"Invalid {name} value {value!r} for agent {agent}: it must be True or False")
            elif not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
                raise ValueError(f"Invalid {name} value: {value!r}; it must be a finite number (agent {agent})")
            elif kind == "non_negative" and not value >= 0.0:
                raise ValueError(f"Invalid {name} value: {value} (agent {agent}); it must be >= 0")
    agent, message = _invalid_row(kernel, groups)
    if agent >= 0:
        raise ValueError(f"{message} (agent {agent})")


def _invalid_row(kernel: ops.OptimizerKernel, groups: Sequence[dict[str, Any]]) -> tuple[int, str]:
    rows = np.array([kernel.row(g) for g in groups], dtype=np.float64).reshape(len(groups), -1)
    return ops.invalid_row(kernel, rows)
