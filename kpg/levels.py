"""One level of a KPG step: the closure evaluated at the right parameters, its loss checked, and
every agent's gradient taken at the mixed point into the arena's gradient buffer.

A closure that takes ``ctx`` (:class:`KPGContext`) is evaluated once per level: its own terms see
the base parameters, the code inside ``ctx.anticipated()`` every agent at level l-1. A closure
without parameters cannot tell the two apart, so from level 2 on it is evaluated once per agent at
the *mixed point*: that agent at its base parameters, every other agent at level l-1 (brute force).
Nothing here changes parameters or optimizer state: :mod:`kpg.optim` applies the update.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kpg.arena import ParameterArena
from kpg.distributed import CommunicationError, Communicator, LocalCommunicator
from kpg.profiling import PhaseTimer

__all__ = ["KPGContext", "LevelEvaluator"]


class KPGContext:
    """What the closure sees during a KPG step: the level, ``k`` and the anticipated parameters.

    Code inside ``with ctx.anticipated():`` runs with every agent's parameters at their level
    l-1 values and gradients off; code outside sees the base parameters with gradients on. At
    level 1 the anticipated parameters are the base parameters. For an agent-batched model
    (:mod:`kpg.nn`) both are batched: one forward inside ``anticipated()`` evaluates every agent at
    level l-1, one outside every agent at its base parameters.
    """

    def __init__(self, levels: LevelEvaluator, level: int, k: int):
        self._levels = levels
        self.level = level
        self.k = k
        self.num_agents = levels.num_agents
        self._at_base_calls = 0

    def anticipated(self):
        return self._levels.anticipated(self)

    def at_base(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` at the base parameters, computed once per step and reused at every level.

        The base parameters do not change between the levels of a step, so the agents' own outputs
        (the own-policy forward) are the same at every level; only the anticipated part changes.
        The first level evaluates ``fn()`` with gradients on; later levels get the same result,
        autograd graph included (kpg keeps the graph until the last level's backward). Calls are
        matched by their order within the closure: call ``at_base`` in the same order at every level.
        """
        levels = self._levels
        if levels.inside_anticipated:
            raise RuntimeError(
                "ctx.at_base was called inside ctx.anticipated(); it computes the agents' own outputs at the base "
                "parameters: call it outside the anticipated block"
            )
        call = self._at_base_calls
        self._at_base_calls += 1
        code = getattr(fn, "__code__", None)
        if call < len(levels.at_base_outputs):
            cached_code, value = levels.at_base_outputs[call]
            if cached_code is not code:
                raise ValueError(
                    f"call {call + 1} of ctx.at_base at level {self.level} runs other code than the call it reuses "
                    "from an earlier level; call ctx.at_base with the same functions in the same order at every level"
                )
            return value
        value = fn()
        levels.at_base_outputs.append((code, value))
        return value

    def anticipated_parameters(self, module: nn.Module) -> dict[str, Tensor]:
        """``module``'s parameters at level l-1 by name, for ``torch.func.functional_call``.

        Holds every parameter of ``module`` that this optimizer steps, as a view of the anticipated
        parameters without gradient (at level 1, of the base parameters): for an agent-batched
        module, batched tensors, so ``functional_call(module, ctx.anticipated_parameters(module),
        (obs,))`` evaluates every agent at level l-1 without touching the module.
        """
        views = self._levels.anticipated_views(self.level)
        index = self._levels.arena_index
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
        communicator = self._levels.communicator
        if communicator.sharded:
            return range(communicator.first_agent, communicator.first_agent + communicator.local_agents)
        return range(self.num_agents if self.num_agents is not None else 1)

    def gather_agents(self, tensor: Tensor) -> Tensor:
        """Every agent's ``tensor`` (dim 0: this rank's agents, as ``ctx.agents``) in global agent
        order, without gradient: one all-gather under agent sharding, ``tensor.detach()`` otherwise.
        Gather the anticipated outputs the other agents' terms need (their log-probabilities,
        actions); every rank must call it the same number of times at a level."""
        return self._levels.communicator.gather_agents(tensor)

    def gather_anticipated_parameters(self, module: nn.Module) -> dict[str, Tensor]:
        """:meth:`anticipated_parameters` of an agent-batched ``module`` with every rank's agents
        (one all-gather under agent sharding): ``functional_call`` of a model built for all agents
        (on the meta device it costs no memory) evaluates every agent at level l-1 on every rank."""
        named = self.anticipated_parameters(module)
        communicator = self._levels.communicator
        if not communicator.sharded:
            return named
        if not self._levels.arena.is_batched:
            raise ValueError(
                "ctx.gather_anticipated_parameters needs an agent-batched model (kpg.nn layers or agent_dim=0) whose "
                "dim 0 holds this rank's agents; with one module per agent gather their outputs with ctx.gather_agents"
            )
        agents = communicator.local_agents
        rows = torch.cat([t.reshape(agents, -1) for t in named.values()], dim=1)
        gathered = communicator.gather_agents(rows)
        widths = [t[0].numel() for t in named.values()]
        return {
            name: part.reshape(-1, *t.shape[1:])
            for (name, t), part in zip(named.items(), gathered.split(widths, dim=1))
        }


class LevelEvaluator:
    """Evaluates the levels of a KPG step over ``arena``: what :class:`KPGContext` talks to.

    ``anticipated`` is the buffer of the level l-1 parameters (the optimizer's anticipate kernels
    write it); ``num_agents`` the agents the closure's losses count (None: not checked), ``shared``
    whether one network serves every agent.
    """

    def __init__(
        self,
        arena: ParameterArena,
        anticipated: Tensor,
        num_agents: int | None,
        shared: bool,
        communicator: Communicator | LocalCommunicator,
        timer: PhaseTimer,
    ):
        self.arena = arena
        self.anticipated_buffer = anticipated
        self.num_agents, self.shared = num_agents, shared
        self.communicator = communicator
        self.timer = timer
        self.arena_index = {id(p): index for index, p in enumerate(arena.parameters)}
        self.at_base_outputs: list[tuple[Any, Any]] = []
        self.inside_anticipated = False
        self._anticipated_views = arena.views(anticipated)
        # NOTE [No gradient, not stepped]: torch.optim skips a parameter whose .grad is None: the loss
        # does not reach it. kpg's gradients are arena views, never None, so whether backward reached
        # a parameter is recorded here: by a hook that autograd calls after accumulating into it, or
        # by autograd.grad's None; the update kernels leave an unreached piece as it is (its own step
        # count included), as torch.optim leaves a parameter without gradient.
        self._parameter_reached = [False] * len(arena.parameters)
        self._piece_reached = [True] * arena.num_pieces
        self._unreached_masks: dict[tuple[int, ...], Tensor] = {}
        for index, p in enumerate(arena.parameters):
            p.register_post_accumulate_grad_hook(_reached_hook(self._parameter_reached, index))

    def anticipated_views(self, level: int) -> list[Tensor]:
        """Per parameter, its level ``level - 1`` values (the base parameters at level 1)."""
        return self._anticipated_views if level > 1 else self.arena.param_views

    def anticipated(self, ctx: KPGContext) -> _AnticipatedBlock:
        """``ctx.anticipated()``: the agents' parameters at level l-1, gradients off."""
        return _AnticipatedBlock(self, ctx)

    def evaluate(self, closure: Callable, level: int, k: int, takes_context: bool) -> tuple[Tensor, Tensor]:
        """Level ``level``'s gradients into ``arena.grad`` (zeroed first); returns the loss and
        which agents' losses are not finite. Under torch.distributed the ranks learn whether any of
        them failed before the gradients are averaged, so all raise or none (note "agreed failure"
        in kpg/distributed.py); on its own the communicator re-raises a failure as it is."""
        self.arena.grad.zero_()
        communicator, error, loss, loss_nonfinite = self.communicator, None, None, None
        try:
            if takes_context:
                loss, loss_nonfinite = self._context_level(closure, level, k)
            else:
                loss, loss_nonfinite = self._brute_force_level(closure, level)
        except CommunicationError:
            raise
        except Exception as caught:
            error = caught
        loss_nonfinite = communicator.agree_on_level(level, k, error, loss_nonfinite)
        self._piece_reached = communicator.agree_on_reached(self._piece_reached, level)
        if not communicator.sharded:
            communicator.average_gradients(self.arena.grad, level)
        return loss, loss_nonfinite

    def unreached_pieces(self) -> Tensor | None:
        """The last level's pieces that backward did not reach (uint8 [pieces] on the arena's device,
        1 = not reached), or None when it reached every piece."""
        if all(self._piece_reached):
            return None
        key = tuple(piece for piece, reached in enumerate(self._piece_reached) if not reached)
        mask = self._unreached_masks.get(key)
        if mask is None:
            if len(self._unreached_masks) >= 64:
                self._unreached_masks.clear()
            mask = torch.zeros(self.arena.num_pieces, dtype=torch.uint8)
            mask[list(key)] = 1
            mask = self._unreached_masks[key] = mask.to(self.arena.device)
        return mask

    def _backward_into_parameters(self, loss: Tensor, retain_graph: bool) -> None:
        """``loss``'s gradient accumulated into every parameter it reaches, and which it reached."""
        self._parameter_reached[:] = [False] * len(self._parameter_reached)
        torch.autograd.backward(loss, inputs=self.arena.parameters, retain_graph=retain_graph)
        self._piece_reached = [self._parameter_reached[index] for index in self.arena.piece_parameter]

    def end_step(self) -> None:
        """Back to the base parameters, and the step's ``ctx.at_base`` outputs dropped."""
        self.bind(self.arena.param_views)
        self.at_base_outputs = []

    def bind(self, views: Sequence[Tensor]) -> None:
        for p, view in zip(self.arena.parameters, views):
            p.data = view

    def _context_level(self, closure, level: int, k: int) -> tuple[Tensor, Tensor]:
        ctx = KPGContext(self, level, k)
        version = self.arena.grad._version
        with self.timer.timed("closure", level), torch.enable_grad():
            loss = closure(ctx)
        self._refuse_gradients_written(version, level, gradients_held=False)
        agent_losses = self._checked_loss(loss, level)
        # ctx.at_base outputs are reused by the next level, so their graph must survive this backward.
        keep_graph = bool(self.at_base_outputs) and level < k
        with self.timer.timed("backward", level), torch.enable_grad():
            self._backward_into_parameters(loss.sum(), retain_graph=keep_graph)
        return loss, ~torch.isfinite(agent_losses.detach())

    def _brute_force_level(self, closure, level: int) -> tuple[Tensor, Tensor]:
        arena = self.arena
        if level == 1:
            version = arena.grad._version
            with self.timer.timed("closure", level), torch.enable_grad():
                loss = closure()
            self._refuse_gradients_written(version, level, gradients_held=False)
            agent_losses = self._checked_loss(loss, level)
            with self.timer.timed("backward", level), torch.enable_grad():
                if loss.dim() == 0:
                    self._backward_into_parameters(loss, retain_graph=False)
                else:
                    for agent in range(arena.num_agents):
                        self._add_agent_gradient(agent, agent_losses[agent], retain_graph=True)
            return loss, ~torch.isfinite(agent_losses.detach())
        # Level >= 2: agent i at its base parameters, every other agent at level l-1, in one
        # "mixed" buffer that holds the anticipated parameters with agent i's share swapped in.
        mixed = self._mixed_point
        mixed.buffer.copy_(self.anticipated_buffer)
        flags = []
        self.bind(mixed.views)
        try:
            for agent in range(arena.num_agents):
                for slot, base in zip(mixed.agent_views[agent], mixed.base_agent_views[agent]):
                    slot.copy_(base)
                try:
                    version = arena.grad._version
                    with self.timer.timed("closure", level), torch.enable_grad():
                        loss = closure()
                    self._refuse_gradients_written(version, level, gradients_held=agent > 0)
                    self._checked_loss(loss, level)
                    with self.timer.timed("backward", level), torch.enable_grad():
                        agent_loss = loss[agent] if loss.dim() == 1 else loss
                        self._add_agent_gradient(agent, agent_loss, retain_graph=False)
                    flags.append(~torch.isfinite(agent_loss.detach()).reshape(1))
                finally:
                    for slot, anticipated in zip(mixed.agent_views[agent], mixed.anticipated_agent_views[agent]):
                        slot.copy_(anticipated)
        finally:
            self.bind(arena.param_views)
        return loss, torch.cat(flags)

    def _refuse_gradients_written(self, version: int, level: int, gradients_held: bool) -> None:
        """Refuses a closure that wrote into the gradient buffer, as one that calls ``backward()``
        (the torch.optim habit) does: kpg's own backward would add to it, counting a linear loss
        twice, silently. Every write bumps the buffer's version counter (the parameters' ``.grad``
        views share it), so this costs nothing unless something wrote; then a buffer that is still
        all zeros (``zero_grad()`` in the closure) passes, unless it held earlier agents' gradients
        (``gradients_held``), which any write corrupts."""
        grad = self.arena.grad
        if grad._version == version or (not gradients_held and not bool(grad.any())):
            return
        raise RuntimeError(
            f"the closure wrote into the agents' gradients at level {level}: it called backward() (or zero_grad(), "
            "or changed .grad in place); kpg runs the backward pass itself, only into the agents' parameters, so "
            "return the loss without calling backward(). Parameters and optimizer state are unchanged"
        )

    def _add_agent_gradient(self, agent: int, loss: Tensor, retain_graph: bool) -> None:
        """Adds the gradient of ``loss`` with respect to agent ``agent``'s share of the parameters
        (whole tensors, or its slices of batched ones) to that share of the arena's gradient."""
        pieces = self.arena.agent_pieces[agent]
        inputs = [self.arena.parameters[index] for index, _ in pieces]
        grads = torch.autograd.grad(loss, inputs, retain_graph=retain_graph, allow_unused=True)
        first = self.arena.agent_first_piece[agent]
        for position, ((_, slot), grad, target) in enumerate(zip(pieces, grads, self._agent_grad_views[agent])):
            self._piece_reached[first + position] = grad is not None
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
        return _MixedPoint(
            buffer,
            self.arena.views(buffer),
            self.arena.agent_views(buffer),
            self.arena.agent_views(self.arena.param),
            self.arena.agent_views(self.anticipated_buffer),
        )

    def _checked_loss(self, loss: Any, level: int) -> Tensor:
        """The loss per optimizer agent (arena segment), after checking type and shape."""
        if not isinstance(loss, Tensor):
            raise TypeError(
                f"the closure returned {type(loss).__name__} at level {level}; it must return the loss as a tensor"
            )
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


def _reached_hook(flags: list[bool], index: int) -> Callable[[Tensor], None]:
    """A post-accumulate-grad hook that records that backward reached parameter ``index``; it holds
    the flags only, not the optimizer."""

    def hook(_: Tensor) -> None:
        flags[index] = True

    return hook


class _AnticipatedBlock:
    """``with ctx.anticipated():``: the parameters rebound to level l-1 (``.data`` of every parameter
    swapped) and gradients off while the block runs. torch.compile cannot trace the rebinding: a
    compiled closure would run the block at the base parameters, silently. Entering and leaving
    therefore run eagerly (``torch.compiler.disable``): Dynamo breaks the closure's graph there, and
    the forwards inside the block (or a compiled model they call) see the rebound parameters."""

    def __init__(self, levels: LevelEvaluator, ctx: KPGContext):
        self._levels, self._ctx = levels, ctx
        self._exits = contextlib.ExitStack()
        self._started = 0.0

    @torch.compiler.disable
    def __enter__(self) -> KPGContext:
        levels, level = self._levels, self._ctx.level
        self._started = time.perf_counter()
        self._exits.enter_context(torch.no_grad())
        self._exits.enter_context(levels.timer.range("anticipated_forward", level))
        if level > 1:
            levels.bind(levels.anticipated_views(level))
        levels.inside_anticipated = True
        return self._ctx

    @torch.compiler.disable
    def __exit__(self, *exception: Any) -> bool:
        levels, level = self._levels, self._ctx.level
        levels.inside_anticipated = False
        if level > 1:
            levels.bind(levels.arena.param_views)
        self._exits.__exit__(*exception)
        levels.timer.stats.add("anticipated_forward", level, time.perf_counter() - self._started)
        return False


@dataclass
class _MixedPoint:
    """One agent at its base parameters, the others at level l-1, in a buffer laid out like the arena."""

    buffer: Tensor
    views: list[Tensor]  # per parameter, for binding
    agent_views: list[list[Tensor]]  # each agent's share of buffer
    base_agent_views: list[list[Tensor]]  # ... of the base parameters
    anticipated_agent_views: list[list[Tensor]]  # ... of the anticipated parameters
