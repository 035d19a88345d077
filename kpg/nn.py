"""Agent-batched layers: every agent's copy of a layer in one module, evaluated for all agents in one call.

A batched module's parameters carry a leading agent dimension (``AgentLinear(A, i, o).weight`` is
``[A, o, i]``) and its inputs are ``[agents, batch..., features]``; agent ``a``'s output depends only
on agent ``a``'s slice of every parameter, and one ``torch.bmm`` does the work of ``A`` small
matmuls. Each module is initialised agent by agent exactly as its ``torch.nn`` counterpart: with the
same torch seed, ``AgentLinear(A, i, o)`` equals ``A`` ``nn.Linear(i, o)`` created one after the
other, and ``AgentMLP(A, ...)`` equals ``A`` per-agent ``nn.Sequential`` MLPs created one after the
other (each agent's layers in order, then the next agent's).

:func:`stack` turns a list of identical per-agent ``torch.nn`` modules into one batched module with
the same outputs; :func:`unstack` goes back. ``kpg.KPGOptimizer(batched_module)`` steps each agent's
slice as one agent without copying the parameters.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init
from torch.nn.utils import skip_init

__all__ = [
    "ACTIVATIONS",
    "AgentGRUCell",
    "AgentLayerNorm",
    "AgentLinear",
    "AgentMLP",
    "AgentModule",
    "AgentSequential",
    "stack",
    "unstack",
]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "identity": nn.Identity,
}


class AgentModule(nn.Module):
    """Base of the agent-batched modules: dim 0 of every parameter indexes the ``num_agents`` agents.

    ``reset_parameters()`` initialises agent after agent, each with :meth:`reset_agent_parameters`,
    which draws exactly what the ``torch.nn`` counterpart's ``reset_parameters`` draws.
    """

    num_agents: int

    def reset_agent_parameters(self, agent: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} must say how one agent's slice is initialised")

    def reset_parameters(self) -> None:
        for agent in range(self.num_agents):
            self.reset_agent_parameters(agent)

    def _agent_input(self, x: Tensor, features: int, what: str) -> Tensor:
        """``x`` as ``[agents, samples, features]``, after checking its agent and feature sizes."""
        if x.dim() < 2 or x.shape[0] != self.num_agents or x.shape[-1] != features:
            raise ValueError(
                f"{type(self).__name__} expects {what} shaped [agents={self.num_agents}, batch..., {features}], "
                f"got {tuple(x.shape)}; put the agent dimension first"
            )
        return x.reshape(self.num_agents, math.prod(x.shape[1:-1]), features)


def _check_num_agents(num_agents: int) -> None:
    if isinstance(num_agents, bool) or not isinstance(num_agents, int) or num_agents < 1:
        raise ValueError(f"num_agents must be an int >= 1, got {num_agents!r}")


def _batched_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight[a].T + bias[a]`` for every agent a, on ``x`` of shape ``[agents, samples, in]``."""
    if bias is None:
        return torch.bmm(x, weight.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def _batched_layer_norm(
    x: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """Layer norm of ``x`` ``[agents, batch..., *normalized_shape]`` with agent a's weight and bias."""
    out = F.layer_norm(x, normalized_shape, None, None, eps)
    broadcast = (x.shape[0],) + (1,) * (x.dim() - 1 - len(normalized_shape)) + normalized_shape
    if weight is not None:
        out = out * weight.view(broadcast)
    if bias is not None:
        out = out + bias.view(broadcast)
    return out


class AgentLinear(AgentModule):
    """``num_agents`` independent ``nn.Linear(in_features, out_features)``: weight ``[A, out, in]``,
    bias ``[A, out]``; ``[A, batch..., in] -> [A, batch..., out]`` in one ``torch.baddbmm``."""

    def __init__(
        self,
        num_agents: int,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        _check_num_agents(num_agents)
        factory = dict(device=device, dtype=dtype)
        self.num_agents, self.in_features, self.out_features = num_agents, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_agents, out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_agents, out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_agent_parameters(self, agent: int) -> None:
        # nn.Linear.reset_parameters, on this agent's slice.
        weight = self.weight[agent]
        init.kaiming_uniform_(weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.bias[agent], -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        out = _batched_linear(self._agent_input(x, self.in_features, "input"), self.weight, self.bias)
        # A view would make an in-place op on the output (AgentMLP's activations) rebase autograd
        # onto a copy of the whole output.
        return out if x.dim() == 3 else out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"num_agents={self.num_agents}, in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


class AgentLayerNorm(AgentModule):
    """``num_agents`` independent ``nn.LayerNorm(normalized_shape)``: weight and bias
    ``[A, *normalized_shape]``; normalizes the trailing dimensions of ``[A, batch..., *normalized_shape]``."""

    def __init__(
        self,
        num_agents: int,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        _check_num_agents(num_agents)
        factory = dict(device=device, dtype=dtype)
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.num_agents, self.normalized_shape, self.eps = num_agents, shape, eps
        self.elementwise_affine = elementwise_affine
        self.weight = nn.Parameter(torch.empty(num_agents, *shape, **factory)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.empty(num_agents, *shape, **factory)) if elementwise_affine and bias else None
        self.reset_parameters()

    def reset_agent_parameters(self, agent: int) -> None:
        if self.weight is not None:
            init.ones_(self.weight[agent])
        if self.bias is not None:
            init.zeros_(self.bias[agent])

    def forward(self, x: Tensor) -> Tensor:
        ndim = len(self.normalized_shape)
        if x.dim() <= ndim or x.shape[0] != self.num_agents or tuple(x.shape[-ndim:]) != self.normalized_shape:
            raise ValueError(
                f"AgentLayerNorm expects input shaped [agents={self.num_agents}, batch..., "
                f"{', '.join(map(str, self.normalized_shape))}], got {tuple(x.shape)}; put the agent dimension first"
            )
        return _batched_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"num_agents={self.num_agents}, {self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}"
        )


class AgentGRUCell(AgentModule):
    """``num_agents`` independent ``nn.GRUCell(input_size, hidden_size)``, for recurrent policies:
    ``(input [A, batch..., input_size], hx [A, batch..., hidden_size] or None) -> h' [A, batch..., hidden_size]``,
    with ``torch.nn.GRUCell``'s gate order (reset, update, new) and parameter names."""

    def __init__(
        self,
        num_agents: int,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        _check_num_agents(num_agents)
        factory = dict(device=device, dtype=dtype)
        self.num_agents, self.input_size, self.hidden_size, self.bias = num_agents, input_size, hidden_size, bias
        gates = 3 * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(num_agents, gates, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(num_agents, gates, hidden_size, **factory))
        self.bias_ih = nn.Parameter(torch.empty(num_agents, gates, **factory)) if bias else None
        self.bias_hh = nn.Parameter(torch.empty(num_agents, gates, **factory)) if bias else None
        self.reset_parameters()

    def reset_agent_parameters(self, agent: int) -> None:
        # nn.GRUCell (RNNCellBase.reset_parameters): every parameter in registration order.
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for p in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh):
            if p is not None:
                init.uniform_(p[agent], -stdv, stdv)

    def forward(self, x: Tensor, hx: Tensor | None = None) -> Tensor:
        flat_x = self._agent_input(x, self.input_size, "input")
        hidden_shape = (*x.shape[:-1], self.hidden_size)
        if hx is None:
            hx = torch.zeros(hidden_shape, dtype=x.dtype, device=x.device)
        elif tuple(hx.shape) != hidden_shape:
            raise ValueError(
                f"AgentGRUCell: hx must have shape {hidden_shape} for an input of shape {tuple(x.shape)}, "
                f"got {tuple(hx.shape)}"
            )
        flat_h = hx.reshape(self.num_agents, -1, self.hidden_size)
        input_r, input_z, input_n = _batched_linear(flat_x, self.weight_ih, self.bias_ih).chunk(3, dim=-1)
        hidden_r, hidden_z, hidden_n = _batched_linear(flat_h, self.weight_hh, self.bias_hh).chunk(3, dim=-1)
        # The operation order of ATen's GRUCell (aten/src/ATen/native/RNN.cpp).
        reset = torch.sigmoid(hidden_r + input_r)
        update = torch.sigmoid(hidden_z + input_z)
        new = torch.tanh(input_n + hidden_n * reset)
        return ((flat_h - new) * update + new).view(hidden_shape)

    def extra_repr(self) -> str:
        return f"num_agents={self.num_agents}, {self.input_size}, {self.hidden_size}, bias={self.bias}"


class AgentSequential(AgentModule, nn.Sequential):
    """``nn.Sequential`` of agent-batched layers and parameter-free modules (activations), all
    applied to ``[A, batch..., features]``; every batched layer must have the same ``num_agents``."""

    def __init__(self, *layers: nn.Module):
        nn.Sequential.__init__(self, *layers)
        counts = {layer.num_agents for layer in self if isinstance(layer, AgentModule)}
        if len(counts) != 1:
            raise ValueError(
                "AgentSequential needs agent-batched layers (kpg.nn) of one agent count; got "
                + (f"agent counts {sorted(counts)}" if counts else "none")
            )
        for index, layer in enumerate(self):
            if not isinstance(layer, AgentModule) and any(True for _ in layer.parameters()):
                raise TypeError(
                    f"layer {index} of AgentSequential is a {type(layer).__name__} with parameters but no agent "
                    "dimension; batch it with kpg.nn.stack"
                )
        self.num_agents = counts.pop()

    def __getitem__(self, index: int | slice) -> nn.Module:
        # nn.Sequential rebuilds a slice with type(self)(OrderedDict), which subclasses such as
        # AgentMLP do not take.
        if isinstance(index, slice):
            return AgentSequential(*list(self)[index])
        return super().__getitem__(index)

    def reset_agent_parameters(self, agent: int) -> None:
        for layer in self:
            if isinstance(layer, AgentModule):
                layer.reset_agent_parameters(agent)


class AgentMLP(AgentSequential):
    """``num_agents`` independent MLPs: ``AgentLinear`` layers of ``hidden_sizes``, each followed by an
    optional ``AgentLayerNorm`` and the activation, then an output ``AgentLinear`` (no activation).

    Equivalent per agent to ``nn.Sequential(nn.Linear(in, h1), [nn.LayerNorm(h1)], act(), ...,
    nn.Linear(h_last, out))`` (what :func:`unstack` returns), and initialised like ``A`` of those
    created one after the other. ``activation`` is a name from :data:`ACTIVATIONS` or a callable
    returning a parameter-free module.

    Evaluation is tuned for many agents; values and gradients are those of the layers one after
    the other. On the CPU the agents go through the network in blocks whose activations fit in
    cache (about 2 MiB per layer output), so each operation reads what the one before it has just
    written instead of streaming activation-sized tensors through memory. tanh, sigmoid and relu
    overwrite the output of the layer before them (one activation-sized tensor less per hidden
    layer), so forward hooks on the hidden layers see their outputs after the activation.
    """

    def __init__(
        self,
        num_agents: int,
        in_features: int,
        out_features: int,
        hidden_sizes: Sequence[int] = (64, 64),
        activation: str | Callable[[], nn.Module] = "tanh",
        layer_norm: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        _check_num_agents(num_agents)
        make_activation = _activation(activation)
        # The layers are created uninitialised and initialised agent by agent below, so that the
        # random draws come in the order of per-agent MLPs created one after the other.
        device = torch.empty(0, device=device).device
        factory = dict(device=device, dtype=dtype)
        layers: list[nn.Module] = []
        width = in_features
        for hidden in hidden_sizes:
            layers.append(skip_init(AgentLinear, num_agents, width, hidden, **factory))
            if layer_norm:
                layers.append(skip_init(AgentLayerNorm, num_agents, hidden, **factory))
            layers.append(make_activation())
            width = hidden
        layers.append(skip_init(AgentLinear, num_agents, width, out_features, **factory))
        super().__init__(*layers)
        self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        first = self[0]
        flat = first._agent_input(x, first.in_features, "input")
        parameters = [
            (layer.weight, layer.bias) if isinstance(layer, (AgentLinear, AgentLayerNorm)) else (None, None)
            for layer in self
        ]
        width = max(layer.out_features for layer in self if isinstance(layer, AgentLinear))
        per_block = self.num_agents
        if flat.device.type == "cpu":
            per_block = max(1, _CPU_BLOCK_BYTES // max(1, flat.shape[1] * width * flat.element_size()))
        if per_block >= self.num_agents:
            out = self._evaluate(flat, parameters)
        else:
            # One split per parameter: backward gathers the blocks' gradients with a single cat.
            blocks = [[None if p is None else p.split(per_block) for p in pair] for pair in parameters]
            out = torch.cat(
                [
                    self._evaluate(h, [tuple(None if p is None else p[block] for p in pair) for pair in blocks])
                    for block, h in enumerate(flat.split(per_block))
                ]
            )
        return out.view(*x.shape[:-1], out.shape[-1])

    def _evaluate(self, h: Tensor, parameters: list[tuple[Tensor | None, Tensor | None]]) -> Tensor:
        """The layers on ``h`` ``[agents, samples, features]`` with the given (weight, bias) per layer."""
        for layer, (weight, bias) in zip(self, parameters):
            if isinstance(layer, AgentLinear):
                h = _batched_linear(h, weight, bias)
            elif isinstance(layer, AgentLayerNorm):
                h = _batched_layer_norm(h, layer.normalized_shape, weight, bias, layer.eps)
            elif isinstance(layer, AgentModule):
                raise TypeError(
                    f"AgentMLP holds AgentLinear, AgentLayerNorm and activations, not {type(layer).__name__}; "
                    "build an AgentSequential for other layers"
                )
            else:
                # A hidden layer's fresh output is not needed by its own backward, so the activation
                # may overwrite it.
                in_place = _IN_PLACE_ACTIVATIONS.get(type(layer))
                h = in_place(h) if in_place is not None else layer(h)
        return h


# Bytes of a block's widest activation when AgentMLP evaluates agents in blocks on the CPU: well
# inside the last-level cache, large enough that each operation's fixed cost stays small (1 to
# 4 MiB measured fastest for the bench/agents.py actor on a 2-core EPYC with 32 MiB of L3;
# unblocked is 15-35 % slower).
_CPU_BLOCK_BYTES = 2 << 20


# Activations whose in-place form computes the same values and saves the same tensors for
# backward (the output) as the module.
_IN_PLACE_ACTIVATIONS: dict[type, Callable[[Tensor], Tensor]] = {
    nn.Tanh: torch.tanh_,
    nn.Sigmoid: torch.sigmoid_,
    nn.ReLU: torch.relu_,
}


def _activation(activation: str | Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)} or pass a callable"
            )
        return ACTIVATIONS[activation]
    if not callable(activation):
        raise TypeError(f"activation must be a name or a callable returning a module, got {type(activation).__name__}")
    return activation


# ---- stack / unstack ----------------------------------------------------------------------------

# torch.nn layer -> (batched layer, constructor arguments of both after num_agents, parameter names)
_LAYERS: dict[type, tuple[type, Callable[[nn.Module], tuple], tuple[str, ...]]] = {
    nn.Linear: (AgentLinear, lambda m: (m.in_features, m.out_features, m.bias is not None), ("weight", "bias")),
    nn.LayerNorm: (
        AgentLayerNorm,
        lambda m: (m.normalized_shape, m.eps, m.elementwise_affine, m.bias is not None),
        ("weight", "bias"),
    ),
    nn.GRUCell: (
        AgentGRUCell,
        lambda m: (m.input_size, m.hidden_size, m.bias),
        ("weight_ih", "weight_hh", "bias_ih", "bias_hh"),
    ),
}
_UNSTACKED = {batched: layer for layer, (batched, _, _) in _LAYERS.items()}


def stack(modules: Sequence[nn.Module]) -> AgentModule:
    """One agent-batched module equal to the identical per-agent ``modules`` (module ``a`` -> agent ``a``).

    Takes ``nn.Linear``, ``nn.LayerNorm``, ``nn.GRUCell`` and ``nn.Sequential`` of those and of
    parameter-free modules (activations), nested freely. The modules must agree in type, sizes,
    dtype and device. The result holds copies of the parameters (``requires_grad`` as in module 0).
    """
    modules = list(modules)
    if not modules:
        raise ValueError("kpg.nn.stack needs at least one module; got an empty sequence")
    return _stack(modules, "modules")


def _stack(modules: list[nn.Module], where: str) -> AgentModule:
    first = modules[0]
    for index, module in enumerate(modules):
        if type(module) is not type(first):
            raise TypeError(
                f"{where}[{index}] is a {type(module).__name__} but {where}[0] is a {type(first).__name__}; "
                "stack needs identical modules"
            )
    if isinstance(first, AgentModule):
        raise TypeError(
            f"{where}[0] is already agent-batched ({type(first).__name__}); stack takes per-agent torch.nn modules"
        )
    if type(first) is nn.Sequential:
        lengths = {len(m) for m in modules}
        if len(lengths) > 1:
            raise ValueError(
                f"the nn.Sequential modules of {where} have different lengths {sorted(lengths)}; "
                "stack needs identical modules"
            )
        return AgentSequential(*(_stack_layer([m[i] for m in modules], f"{where}[*][{i}]") for i in range(len(first))))
    if type(first) not in _LAYERS:
        raise TypeError(
            f"kpg.nn.stack cannot batch a {type(first).__name__}; it takes "
            f"{', '.join(t.__name__ for t in _LAYERS)} and nn.Sequential of those and of parameter-free modules"
        )
    if not any(True for _ in first.parameters()):
        raise ValueError(f"{where}[0] ({first}) has no parameters: there is nothing to batch; use it as it is")
    batched_type, config_of, names = _LAYERS[type(first)]
    config = config_of(first)
    for index, module in enumerate(modules):
        if config_of(module) != config:
            raise ValueError(f"{where}[{index}] is {module} but {where}[0] is {first}; stack needs identical modules")
    parameters = [_agent_parameters(modules, name, where) for name in names]
    reference = next(p for p in parameters if p is not None)
    batched = skip_init(batched_type, len(modules), *config, device=reference.device, dtype=reference.dtype)
    with torch.no_grad():
        for name, values in zip(names, parameters):
            if values is not None:
                getattr(batched, name).copy_(values)
                getattr(batched, name).requires_grad_(getattr(first, name).requires_grad)
    return batched


def _stack_layer(layers: list[nn.Module], where: str) -> nn.Module:
    if any(True for _ in layers[0].parameters()):
        return _stack(layers, where)
    for index, layer in enumerate(layers):
        if type(layer) is not type(layers[0]) or repr(layer) != repr(layers[0]):
            raise ValueError(
                f"{where.replace('*', str(index))} is {layer} but the first module's is {layers[0]}; "
                "stack needs identical modules"
            )
    return copy.deepcopy(layers[0])


def _agent_parameters(modules: list[nn.Module], name: str, where: str) -> Tensor | None:
    values = [getattr(m, name) for m in modules]
    if values[0] is None:
        return None
    first = values[0]
    for index, value in enumerate(values):
        if value.dtype != first.dtype or value.device != first.device:
            raise ValueError(
                f"{where}[{index}].{name} is {value.dtype} on {value.device} but {where}[0].{name} is "
                f"{first.dtype} on {first.device}; move every module to one dtype and device"
            )
    return torch.stack([v.detach() for v in values])


def unstack(batched: AgentModule) -> list[nn.Module]:
    """The per-agent ``torch.nn`` modules equal to ``batched``: ``nn.Linear``, ``nn.LayerNorm``,
    ``nn.GRUCell`` or ``nn.Sequential`` (for ``AgentSequential`` and ``AgentMLP``), one per agent,
    holding copies of the agent's slices."""
    if not isinstance(batched, AgentModule):
        raise TypeError(f"kpg.nn.unstack takes an agent-batched module (kpg.nn), got {type(batched).__name__}")
    if isinstance(batched, AgentSequential):
        per_layer = [
            unstack(layer)
            if isinstance(layer, AgentModule)
            else [copy.deepcopy(layer) for _ in range(batched.num_agents)]
            for layer in batched
        ]
        return [nn.Sequential(*(layers[agent] for layers in per_layer)) for agent in range(batched.num_agents)]
    layer_type = _UNSTACKED[type(batched)]
    _, config_of, names = _LAYERS[layer_type]
    reference = next(batched.parameters(), None)
    factory = {} if reference is None else dict(device=reference.device, dtype=reference.dtype)
    modules = []
    for agent in range(batched.num_agents):
        module = skip_init(layer_type, *config_of(batched), **factory)
        with torch.no_grad():
            for name in names:
                source = getattr(batched, name)
                if source is not None:
                    getattr(module, name).copy_(source[agent])
                    getattr(module, name).requires_grad_(source.requires_grad)
        modules.append(module)
    return modules
