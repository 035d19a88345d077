"""The parameter arena: every agent's trainable tensors in one flat buffer, agent by agent.

Agent ``a`` owns the contiguous segment ``offsets[a]:offsets[a+1]`` (agents may differ in size).
The user's ``nn.Parameter`` objects become views into the arena, and their ``.grad`` views into a
gradient buffer of the same layout, so models keep working unchanged while the fused kernels see
a few flat buffers. Optimizer state and the anticipated (level) parameters use the same layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import torch
from torch import Tensor

from kpg._ops import SUPPORTED_DTYPES, chunk_table


class ParameterArena:
    """Moves ``agents[a]``'s parameters into segment ``a`` of one flat buffer.

    ``agents`` is a sequence with one entry per agent, each a sequence of tensors (usually
    ``nn.Parameter``). All tensors must share one dtype (float32 or float64) and one device, and no
    tensor may belong to two agents. After construction ``p.data`` is a view of :attr:`param` and
    ``p.grad`` a view of :attr:`grad` for every parameter ``p``; existing values and gradients are
    copied in.
    """

    def __init__(self, agents: Sequence[Sequence[Tensor]]):
        agents = [list(agent) for agent in agents]
        self.parameters = _validated_parameters(agents)
        first = self.parameters[0]
        self.dtype, self.device = first.dtype, first.device
        self.num_agents = len(agents)
        sizes = [sum(p.numel() for p in agent) for agent in agents]
        self.offsets = list(accumulate(sizes, initial=0))
        self.numel = self.offsets[-1]
        self.param = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        self.grad = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        self.param_views: list[Tensor] = []
        self.grad_views: list[Tensor] = []
        self.agent_of_parameter: list[int] = []
        offset = 0
        with torch.no_grad():
            for agent, params in enumerate(agents):
                for p in params:
                    param_view = self.param[offset : offset + p.numel()].view(p.shape)
                    grad_view = self.grad[offset : offset + p.numel()].view(p.shape)
                    param_view.copy_(p)
                    if p.grad is not None:
                        grad_view.copy_(p.grad)
                    p.data = param_view
                    p.grad = grad_view
                    self.param_views.append(param_view)
                    self.grad_views.append(grad_view)
                    self.agent_of_parameter.append(agent)
                    offset += p.numel()
        self.chunks, self.agent_chunks = chunk_table(self.offsets, self.device)

    def new_buffer(self) -> Tensor:
        """A zero buffer with the arena's layout (optimizer state, anticipated parameters)."""
        return torch.zeros_like(self.param)

    def views(self, buffer: Tensor) -> list[Tensor]:
        """Per-parameter views of ``buffer``, shaped like the parameters, in arena order."""
        return [buffer[v.storage_offset() : v.storage_offset() + v.numel()].view(v.shape) for v in self.param_views]

    def segment(self, buffer: Tensor, agent: int) -> Tensor:
        """Agent ``agent``'s flat segment of ``buffer``."""
        return buffer[self.offsets[agent] : self.offsets[agent + 1]]

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
        return (
            f"ParameterArena({self.num_agents} agents, {self.numel} {str(self.dtype).removeprefix('torch.')} "
            f"elements on {self.device}, {len(self.parameters)} tensors)"
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
            if not isinstance(p, Tensor):
                raise TypeError(f"agent {agent}'s parameter {index} is a {type(p).__name__}, not a tensor")
            if p.dtype not in SUPPORTED_DTYPES:
                raise TypeError(
                    f"agent {agent}'s parameter {index} has dtype {p.dtype}; kpg supports float32 and float64 "
                    "parameters: convert the model with .float() or .double()"
                )
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(
                    f"agent {agent}'s parameter {index} is {p.dtype} on {p.device} but the first parameter is "
                    f"{first.dtype} on {first.device}; move every agent to one device and dtype"
                )
            previous = owner.setdefault(id(p), agent)
            if previous != agent or sum(q is p for q in params) > 1:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is listed twice (agents {previous} and {agent}); "
                    "each tensor must belong to exactly one agent: for parameter sharing pass the shared model once"
                )
    return parameters
