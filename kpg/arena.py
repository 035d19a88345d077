"""The parameter arena: every agent's trainable tensors in one flat buffer.

Two layouts. Agent by agent (``ParameterArena(agents)``): agent ``a`` owns the contiguous segment
``offsets[a]:offsets[a+1]`` (agents may differ in size). Parameter by parameter
(``ParameterArena.batched(parameters)``, for agent-batched models such as :mod:`kpg.nn`'s): every
parameter carries a leading agent dimension and stays one tensor, a view of the arena (``W`` for all
agents, then ``b`` for all agents), so agent ``a`` owns one range per parameter (``W[a]``, ``b[a]``).
The chunk table maps element ranges to agents, so the kernels run on either layout unchanged.

The user's ``nn.Parameter`` objects become views into the arena, and their ``.grad`` views into a
gradient buffer of the same layout, so models keep working unchanged while the fused kernels see
a few flat buffers. Optimizer state and the anticipated (level) parameters use the same layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from typing import Any

import torch
from torch import Tensor

from kpg._ops import SUPPORTED_DTYPES, chunk_table, range_chunk_table


class ParameterArena:
    """Moves ``agents[a]``'s parameters into segment ``a`` of one flat buffer.

    ``agents`` is a sequence with one entry per agent, each a sequence of tensors (usually
    ``nn.Parameter``). All tensors must share one dtype (float32 or float64) and one device, and no
    tensor may belong to two agents. After construction ``p.data`` is a view of :attr:`param` and
    ``p.grad`` a view of :attr:`grad` for every parameter ``p``; existing values and gradients are
    copied in. :meth:`batched` builds the parameter-by-parameter layout of agent-batched models.

    ``agent_pieces[a]`` lists agent ``a``'s share of the parameters as (index into
    :attr:`parameters`, index along the agent dimension or None for the whole tensor), and
    ``agent_tensors[a]`` the matching tensors: the parameters themselves, or their agent slices
    (views of :attr:`param`).

    The *pieces* are those shares numbered agent after agent (agent 0's tensors, then agent 1's):
    torch.optim's unit of state, each with its own step count and its own "no gradient, not stepped".
    ``piece_chunks`` is the chunk table over pieces (its first column a piece number, as the
    update kernels read per-"agent" values), ``piece_agent`` the agent of each piece and
    ``piece_parameter`` its index into :attr:`parameters`.
    """

    def __init__(self, agents: Sequence[Sequence[Tensor]]):
        agents = [list(agent) for agent in agents]
        parameters = _validated_parameters(agents)
        sizes = [sum(p.numel() for p in agent) for agent in agents]
        self.offsets: list[int] | None = list(accumulate(sizes, initial=0))
        first_index = list(accumulate((len(agent) for agent in agents), initial=0))
        pieces = [[(first_index[a] + j, None) for j in range(len(agent))] for a, agent in enumerate(agents)]
        self._place(parameters, pieces)
        self.agent_tensors = [[parameters[index] for index, _ in agent] for agent in pieces]
        self.chunks, self.agent_chunks = chunk_table(self.offsets, self.device)
        self._number_pieces()

    @classmethod
    def batched(cls, parameters: Sequence[Tensor]) -> ParameterArena:
        """The arena of agent-batched parameters: dim 0 of every tensor indexes the same agents, and
        agent ``a``'s parameters are the slices ``p[a]``. Each parameter stays one tensor (a view of
        :attr:`param`); nothing is copied per agent."""
        parameters = list(parameters)
        num_agents = batched_num_agents(parameters)
        arena = cls.__new__(cls)
        arena.offsets = None
        arena._place(parameters, [[(index, agent) for index in range(len(parameters))] for agent in range(num_agents)])
        arena.agent_tensors = arena.agent_views(arena.param)
        ranges = []
        for view in arena.param_views:
            per_agent = view.numel() // num_agents
            begin = view.storage_offset()
            ranges.extend(
                (agent, begin + agent * per_agent, begin + (agent + 1) * per_agent) for agent in range(num_agents)
            )
        arena.chunks, arena.agent_chunks = range_chunk_table(ranges, num_agents, arena.device)
        arena._number_pieces()
        return arena

    def _number_pieces(self) -> None:
        ranges, agents, parameters = [], [], []
        for agent, pieces in enumerate(self.agent_pieces):
            for index, slot in pieces:
                view = self.param_views[index]
                size = view.numel() if slot is None else view[slot].numel()
                begin = view.storage_offset() + (0 if slot is None else slot * size)
                ranges.append((len(agents), begin, begin + size))
                agents.append(agent)
                parameters.append(index)
        self.num_pieces = len(agents)
        self.piece_parameter = parameters
        self.piece_agent = torch.tensor(agents, dtype=torch.int64, device=self.device)
        self.piece_chunks, _ = range_chunk_table(ranges, self.num_pieces, self.device)
        first = [0]
        for pieces in self.agent_pieces:
            first.append(first[-1] + len(pieces))
        self.agent_first_piece = first

    @property
    def is_batched(self) -> bool:
        return self.offsets is None

    def _place(self, parameters: list[Tensor], pieces: list[list[tuple[int, int | None]]]) -> None:
        """Allocates the buffers, copies ``parameters`` in (in order) and rebinds them to views."""
        first = parameters[0]
        self.parameters = parameters
        self.dtype, self.device = first.dtype, first.device
        self.num_agents = len(pieces)
        self.agent_pieces = pieces
        self.numel = sum(p.numel() for p in parameters)
        self.param = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        self.grad = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        self.param_views: list[Tensor] = []
        self.grad_views: list[Tensor] = []
        offset = 0
        with torch.no_grad():
            for p in parameters:
                param_view = self.param[offset : offset + p.numel()].view(p.shape)
                grad_view = self.grad[offset : offset + p.numel()].view(p.shape)
                param_view.copy_(p)
                if p.grad is not None:
                    grad_view.copy_(p.grad)
                p.data = param_view
                p.grad = grad_view
                self.param_views.append(param_view)
                self.grad_views.append(grad_view)
                offset += p.numel()
        self._bindings = [(view.data_ptr(), view.shape) for view in self.param_views]

    def new_buffer(self) -> Tensor:
        """A zero buffer with the arena's layout (optimizer state, anticipated parameters)."""
        return torch.zeros_like(self.param)

    def views(self, buffer: Tensor) -> list[Tensor]:
        """Per-parameter views of ``buffer``, shaped like the parameters, in arena order."""
        return [buffer[v.storage_offset() : v.storage_offset() + v.numel()].view(v.shape) for v in self.param_views]

    def agent_views(self, buffer: Tensor) -> list[list[Tensor]]:
        """For every agent, views of ``buffer`` shaped like its ``agent_tensors``."""
        views = self.views(buffer)
        return [
            [views[index] if agent is None else views[index][agent] for index, agent in pieces]
            for pieces in self.agent_pieces
        ]

    def segment(self, buffer: Tensor, agent: int) -> Tensor:
        """Agent ``agent``'s flat segment of ``buffer`` (agent-by-agent layout only)."""
        if self.offsets is None:
            raise ValueError(
                "an arena of agent-batched parameters has no per-agent segment: each agent owns one slice of every "
                "parameter; use agent_views(buffer)[agent]"
            )
        return buffer[self.offsets[agent] : self.offsets[agent + 1]]

    def check_parameters_bound(self) -> None:
        """Raises RuntimeError if user code replaced, resized or freed a parameter's memory after the
        arena was built (``p.data = ...``, ``module.to(...)``, ``p.set_(...)``,
        ``untyped_storage().resize_``): the kernels would step memory the model no longer reads,
        training nothing while reporting progress, or write into freed memory."""
        held = self.param.untyped_storage().nbytes()
        if held >= self.param.nbytes and [(p.data_ptr(), p.shape) for p in self.parameters] == self._bindings:
            return
        for index, (p, (address, shape)) in enumerate(zip(self.parameters, self._bindings)):
            if held < self.param.nbytes or p.data_ptr() != address or p.shape != shape:
                if self.is_batched:
                    owner = f"parameter {index} of the agent-batched model"
                else:
                    agent = next(a for a, pieces in enumerate(self.agent_pieces) if any(i == index for i, _ in pieces))
                    owner = f"agent {agent}'s parameter of shape {tuple(shape)}"
                raise RuntimeError(
                    f"{owner} is no longer a view of the optimizer's arena: its .data was replaced, resized or freed "
                    "after the optimizer was built (p.data = ..., module.to(...), storage resize_), so a step would "
                    "train memory the model does not read; change values in place (with torch.no_grad(): "
                    "p.copy_(new), or load_state_dict) and move or convert models before building the optimizer, "
                    "or build a new one"
                )

    def restore_gradient_views(self) -> None:
        """Rebinds ``p.grad`` to the arena where user code replaced or cleared it (``set_to_none``)."""
        for p, grad_view in zip(self.parameters, self.grad_views):
            current = p.grad
            if current is not grad_view:
                if current is not None:
                    grad_view.copy_(current)
                else:
                    grad_view.zero_()
                p.grad = grad_view

    def __repr__(self) -> str:
        layout = "agent-batched tensors" if self.is_batched else "tensors"
        return (
            f"ParameterArena({self.num_agents} agents, {self.numel} {str(self.dtype).removeprefix('torch.')} "
            f"elements on {self.device}, {len(self.parameters)} {layout})"
        )


def _validated_parameters(agents: list[list[Tensor]]) -> list[Tensor]:
    if not agents:
        raise ValueError("ParameterArena needs at least one agent; got an empty sequence of agents")
    parameters = [p for agent in agents for p in agent]
    if not parameters:
        raise ValueError("ParameterArena got agents without any parameters; pass each agent's parameters")
    owner: dict[int, int] = {}
    first = parameters[0]
    for agent, params in enumerate(agents):
        for index, p in enumerate(params):
            _check_like_first(
                p,
                first,
                f"agent {agent}'s parameter {index}",
                "the first parameter",
                "move every agent to one device and dtype",
            )
            previous = owner.setdefault(id(p), agent)
            if previous != agent or sum(q is p for q in params) > 1:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is listed twice (agents {previous} and {agent}); "
                    "each tensor must belong to exactly one agent: for parameter sharing pass the shared model once"
                )
    return parameters


def batched_num_agents(parameters: Sequence[Tensor]) -> int:
    """The number of agents of agent-batched ``parameters`` (the common size of dim 0), after checking
    them as :meth:`ParameterArena.batched` needs; raises ValueError or TypeError naming the problem."""
    parameters = list(parameters)
    if not parameters:
        raise ValueError("ParameterArena.batched got no parameters; pass the agent-batched model's parameters")
    first = parameters[0]
    for index, p in enumerate(parameters):
        _check_like_first(
            p, first, f"batched parameter {index}", "parameter 0", "move the model to one device and dtype"
        )
        if p.dim() == 0 or p.shape[0] != first.shape[0]:
            raise ValueError(
                f"batched parameter {index} has shape {tuple(p.shape)} and parameter 0 {tuple(first.shape)}; every "
                "parameter of an agent-batched model needs the same leading agent dimension"
            )
        if sum(q is p for q in parameters) > 1:
            raise ValueError(
                f"batched parameter {index} of shape {tuple(p.shape)} is listed twice; list each tensor once"
            )
    if first.shape[0] < 1:
        raise ValueError(
            f"the batched parameters have an agent dimension of size 0 (shape {tuple(first.shape)}); "
            "an agent-batched model needs at least one agent"
        )
    return first.shape[0]


def _check_like_first(p: Any, first: Tensor, name: str, first_name: str, fix: str) -> None:
    """Raise TypeError or ValueError unless ``p`` is a supported tensor of ``first``'s dtype and device."""
    if not isinstance(p, Tensor):
        raise TypeError(f"{name} is a {type(p).__name__}, not a tensor")
    if p.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {p.dtype}; kpg supports float32 and float64 parameters: convert the model with "
            ".float() or .double()"
        )
    if p.dtype != first.dtype or p.device != first.device:
        raise ValueError(
            f"{name} is {p.dtype} on {p.device} but {first_name} is {first.dtype} on {first.device}; {fix}"
        )
