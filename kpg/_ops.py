"""The fused kernels as ``torch.library`` custom ops: ``torch.ops.kpg.<name>``.

One op per optimizer family (csrc/kpg/optimizers.h, read through ``kpg._C``) and mode, plus the
per-agent gradient norms and momentum anticipation's prediction and bookkeeping
(csrc/kpg/momentum.h). Every op works on flat arena buffers laid out agent by agent (see
:class:`kpg.arena.ParameterArena`) and a chunk table from :func:`chunk_table`. Mode ``anticipate``
writes one KPG level's parameters to ``anticipated`` and changes nothing else; mode ``commit``
updates parameters, optimizer state and step counts in place; mode ``probe`` computes what
``commit`` would write and writes only which agents would get a non-finite value. Ops validate
their arguments, then hand raw addresses to ``kpg._C`` (NOTE [Torch-free boundary] in
csrc/kpg/common.h). ``kpg.reference`` holds the same ops in plain PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.weak
from torch import Tensor

from kpg import _C

_DTYPE_CODES = {getattr(torch, name): code for name, code in _C.DTYPES.items()}
SUPPORTED_DTYPES = tuple(_DTYPE_CODES)
MAX_STATES = _C.MAX_STATES
# torch.optim's dtype of per-parameter scalar state (``_get_scalar_dtype``), which kpg follows.
SCALAR_DTYPES = (torch.float32, torch.float64)
_CPU_DEVICE = -1


@dataclass(frozen=True)
class OptimizerKernel:
    """One optimizer family as its traits type (csrc/kpg/optimizers.h) describes it: state tensors,
    per-parameter scalar state (NAdam's ``mu_product``; NOTE [Scalar state] there) and
    hyperparameters, whose values reach the kernels as one float64 row per agent (NOTE
    [Hyperparameter rows] there)."""

    name: str
    code: int
    state_names: tuple[str, ...]
    hyperparameters: tuple[tuple[str, int, str, object], ...]  # (group key, row entries, kind, default)
    state_initial: tuple[int, ...]  # per state: the row entry it starts at, or -1 for zeros
    scalar_states: tuple[tuple[str, float], ...] = ()  # (torch.optim state key, value before the first step)

    @property
    def scalar_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.scalar_states)

    @property
    def row_names(self) -> tuple[str, ...]:
        """The row entries by name: a pair such as ``betas`` fills ``beta1`` and ``beta2``."""
        return tuple(
            name if width == 1 else f"{name[:-1]}{i + 1}"
            for name, width, _, _ in self.hyperparameters
            for i in range(width)
        )

    def row(self, values: dict) -> list[float]:
        """One agent's row from group keys (``betas``) or row names (``beta1``, ``beta2``)."""
        row = []
        for name, width, _, default in self.hyperparameters:
            if width == 1:
                row.append(float(values.get(name, default)))
            elif name in values:
                row.extend(float(v) for v in values[name])
            else:
                defaults = default if isinstance(default, tuple) else (default,) * width
                row.extend(float(values.get(f"{name[:-1]}{i + 1}", defaults[i])) for i in range(width))
        return row

    def kept_states(self, rows: np.ndarray) -> np.ndarray:
        """[agents, states] booleans: the state tensors a commit with each row keeps (and needs)."""
        return _C.kept_states(self.code, rows)

    def required_states(self, values: dict) -> tuple[str, ...]:
        """The state buffers a row of these values reads and writes; the others may be None."""
        kept = self.kept_states(np.asarray([self.row(values)], dtype=np.float64))[0]
        return tuple(name for name, keep in zip(self.state_names, kept) if keep)


@dataclass(frozen=True)
class OptimizerEntry:
    """A named torch.optim optimizer kpg offers: its family, defaults and torch's default lr."""

    name: str
    kernel: OptimizerKernel
    defaults: dict
    default_lr: float


def _table() -> tuple[dict[str, OptimizerKernel], dict[str, OptimizerEntry]]:
    kernels: dict[str, OptimizerKernel] = {}
    entries = {}
    for name, info in _C.OPTIMIZERS.items():
        hyper = tuple((h, width, kind, default) for h, width, kind, default in info["hyperparameters"])
        family = next((k for k in kernels.values() if k.code == info["family"]), None)
        if family is None:
            family = kernels[name] = OptimizerKernel(
                name,
                info["family"],
                tuple(info["states"]),
                hyper,
                tuple(info["state_initial"]),
                tuple((state, initial) for state, initial in info["scalar_states"]),
            )
        entries[name] = OptimizerEntry(name, family, {h: default for h, _, _, default in hyper}, info["default_lr"])
    return kernels, entries


KERNELS, OPTIMIZERS = _table()


def invalid_row(kernel: OptimizerKernel, rows: np.ndarray) -> tuple[int, str]:
    """(agent, message) of the first row that breaks a rule between hyperparameters (SGD's
    Nesterov needs momentum and no dampening), or (-1, "")."""
    return _C.invalid_row(kernel.code, rows)


def hyper_rows(
    kind: str, values: dict | list[dict], num_agents: int | None = None, device: torch.device | str = "cpu"
) -> Tensor:
    """The float64 ``[agents, row width]`` hyperparameter rows of family ``kind``: one dict per agent,
    or one dict for ``num_agents`` agents; keys are group keys or row names, missing ones default."""
    kernel = KERNELS[kind]
    if isinstance(values, dict):
        values = [values] * (num_agents if num_agents is not None else 1)
    rows = [kernel.row(v) for v in values]
    return torch.tensor(rows, dtype=torch.float64, device=device).reshape(len(rows), len(kernel.row_names))


def chunk_table(
    offsets: Sequence[int] | Tensor, device: torch.device | str = "cpu", chunk_elems: int | None = None
) -> tuple[Tensor, Tensor]:
    """Split agent segments ``[offsets[a], offsets[a+1])`` into chunks for the kernels.

    Returns ``chunks`` (int64 ``[num_chunks, 3]`` rows of agent, begin, end) and ``agent_chunks``
    (int64 ``[num_agents + 1]``: agent ``a`` owns rows ``agent_chunks[a]:agent_chunks[a+1]``), both
    on ``device``. ``chunk_elems`` defaults to the device's kernel chunk size.
    """
    device = torch.device(device)
    if chunk_elems is None:
        chunk_elems = _C.CUDA_CHUNK_ELEMS if device.type == "cuda" else _C.CPU_CHUNK_ELEMS
    offsets_np = np.asarray(offsets.cpu() if isinstance(offsets, Tensor) else offsets, dtype=np.int64)
    chunks, agent_chunks = _C.chunk_table(offsets_np, chunk_elems)
    return torch.from_numpy(chunks).to(device), torch.from_numpy(agent_chunks).to(device)


def range_chunk_table(
    ranges: Sequence[Sequence[int]] | np.ndarray | Tensor,
    num_agents: int,
    device: torch.device | str = "cpu",
    chunk_elems: int | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`chunk_table` for arenas whose agents own several separate element ranges.

    ``ranges`` holds rows (agent, begin, end) in any order, no two sharing an element (an
    agent-batched arena has one row per agent and parameter). The returned ``chunks`` are grouped by
    agent, each agent's rows in the order of its ranges, and ``agent_chunks`` says which rows each
    agent owns, as :func:`chunk_table` returns them.
    """
    device = torch.device(device)
    if chunk_elems is None:
        chunk_elems = _C.CUDA_CHUNK_ELEMS if device.type == "cuda" else _C.CPU_CHUNK_ELEMS
    ranges_np = np.asarray(ranges.cpu() if isinstance(ranges, Tensor) else ranges, dtype=np.int64)
    if ranges_np.size == 0:
        ranges_np = ranges_np.reshape(0, 3)
    chunks, agent_chunks = _C.range_chunk_table(ranges_np, num_agents, chunk_elems)
    return torch.from_numpy(chunks).to(device), torch.from_numpy(agent_chunks).to(device)


def _device_and_stream(tensor: Tensor) -> tuple[int, int]:
    if tensor.device.type == "cpu":
        threads = torch.get_num_threads()
        if threads != _C.get_num_threads():
            _C.set_num_threads(threads)
        return _CPU_DEVICE, 0
    if tensor.device.type == "cuda":
        return tensor.device.index, torch.cuda.current_stream(tensor.device).cuda_stream
    raise ValueError(f"kpg kernels run on CPU and CUDA tensors, got a tensor on {tensor.device}")


def _address(tensor: Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _overlaps(a: Tensor, b: Tensor) -> bool:
    a_begin, b_begin = a.data_ptr(), b.data_ptr()
    return a.numel() > 0 and b.numel() > 0 and a_begin < b_begin + b.nbytes and b_begin < a_begin + a.nbytes


def _check_storage(op: str, named: dict[str, Tensor | None]) -> None:
    """A tensor whose storage was freed or shrunk (``untyped_storage().resize_``) keeps its shape but
    points at memory it no longer owns; the kernels would write there. Called on contiguous tensors."""
    for name, tensor in named.items():
        if tensor is None or tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        needed = (tensor.storage_offset() + tensor.numel()) * tensor.element_size()
        held = tensor.untyped_storage().nbytes()
        if held < needed:
            raise ValueError(
                f"{op}: {name} needs {needed} bytes of storage but its storage holds {held}: it was freed or resized "
                "after the tensor was made; pass tensors that own their memory (rebuild the arena or optimizer)"
            )


def _check_disjoint(op: str, tensors: dict[str, Tensor | None], written: Sequence[str]) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    for out_name in written:
        out = present.get(out_name)
        if out is None:
            continue
        for name, tensor in present.items():
            if name != out_name and _overlaps(out, tensor):
                raise ValueError(f"{op}: {out_name} overlaps {name} in memory; every buffer needs storage of its own")


def _check_arena_tensors(op: str, param: Tensor, named: dict[str, Tensor | None], written: Sequence[str]):
    if param.dtype not in _DTYPE_CODES:
        raise TypeError(f"{op}: parameters of dtype {param.dtype} are not supported; use float32 or float64")
    if not param.is_contiguous():
        raise ValueError(f"{op}: param must be a contiguous flat buffer; pass the arena's buffer")
    for name, tensor in named.items():
        if tensor is None:
            continue
        if tensor.dtype != param.dtype or tensor.device != param.device or tensor.numel() != param.numel():
            raise ValueError(
                f"{op}: {name} must be a {param.dtype} tensor of {param.numel()} elements on {param.device} "
                f"like param, got {tensor.dtype} with {tensor.numel()} elements on {tensor.device}"
            )
        if not tensor.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous; pass a buffer laid out like the arena")


def _check_agent_tensors(
    op: str,
    device: torch.device,
    num_agents: int,
    named: dict[str, tuple[Tensor | None, torch.dtype]],
    per: str = "agent",
):
    for name, (tensor, dtype) in named.items():
        if tensor is None:
            continue
        if (
            tensor.dtype != dtype
            or tensor.device != device
            or tensor.numel() != num_agents
            or not tensor.is_contiguous()
        ):
            raise ValueError(
                f"{op}: {name} must be a contiguous {dtype} tensor with one entry per {per} ({num_agents}) on "
                f"{device}, got {tensor.dtype} with {tensor.numel()} entries on {tensor.device}"
            )


def _check_chunks(op: str, device: torch.device, chunks: Tensor, name: str = "chunks"):
    if chunks.dtype != torch.int64 or chunks.device != device or chunks.dim() != 2 or chunks.shape[1] != 3:
        raise ValueError(
            f"{op}: {name} must be an int64 [num_chunks, 3] table on {device} from kpg._ops.chunk_table, "
            f"got {chunks.dtype} {tuple(chunks.shape)} on {chunks.device}"
        )
    if not chunks.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


# Device-resident chunk tables already checked on the host, with the version counters they had.
_checked_device_tables: torch.utils.weak.WeakIdKeyDictionary = torch.utils.weak.WeakIdKeyDictionary()


def _check_buffers(
    op: str,
    everything: dict[str, Tensor | None],
    written: Sequence[str],
    chunks: Tensor,
    agent_chunks: Tensor | None,
    num_agents: int,
    numel: int,
) -> None:
    """The checks every op runs last, on all of its buffers: live storage, no buffer it writes
    overlapping another, and (on CUDA) a chunk table whose rows stay apart."""
    _check_storage(op, everything)
    _check_disjoint(op, everything, written)
    _check_device_chunk_table(op, chunks, agent_chunks, num_agents, numel)


def _check_device_chunk_table(
    op: str, chunks: Tensor, agent_chunks: Tensor | None, num_agents: int, numel: int
) -> None:
    """The CPU kernels check their chunk table at every call (bounds, no two rows sharing an
    element); the CUDA kernels cannot read it without a synchronization and only skip rows outside
    the arena, so rows that overlap would update elements twice and race. A CUDA table is copied to
    the host and checked once, and again after any in-place change (its version counter moves) or
    with other companions. A check with ``agent_chunks`` covers the rows alone too, so ops that pass
    the table without it (momentum_predict) and with it (agent_grad_norms, momentum_record) take
    turns on one table without copying it at every call."""
    if chunks.device.type != "cuda":
        return
    key = (
        chunks._version,
        num_agents,
        numel,
        None if agent_chunks is None else (id(agent_chunks), agent_chunks._version),
    )
    checked = _checked_device_tables.get(chunks)
    if checked == key or (agent_chunks is None and checked is not None and checked[:3] == key[:3]):
        return
    host_agent_chunks = None if agent_chunks is None else agent_chunks.cpu().numpy()
    _C.check_chunk_table(op, chunks.cpu().numpy(), host_agent_chunks, num_agents, numel)
    _checked_device_tables[chunks] = key


def _reject_meta(op: str, named: dict[str, object]) -> None:
    """The fake implementations double as the ops' Meta kernels, so meta tensors reach them outside
    tracing too; they hold no values to update, and returning would look as if the step had run."""
    for name, value in named.items():
        if isinstance(value, Tensor) and value.device.type == "meta":
            raise ValueError(
                f"{op}: {name} is on the meta device, which holds no values to update; kpg kernels run on "
                "CPU and CUDA tensors: allocate the buffers there (module.to_empty(device=...) materializes "
                "a meta model) before building the arena"
            )


def _define_update_op(kernel: OptimizerKernel, mode: str):
    op = f"{kernel.name}_{mode}"
    commit = mode == "commit"
    scalars = kernel.scalar_names
    if commit:
        written = ("param", *kernel.state_names, *scalars, "step", "live")
        states = ", ".join(
            [f"Tensor({chr(98 + i)}!)? {s}" for i, s in enumerate(kernel.state_names)]
            + [f"Tensor({chr(109 + i)}!) {s}" for i, s in enumerate(scalars)]
        )
        buffers = f"Tensor(a!) param, Tensor grad, {states}, Tensor(z!) step, Tensor(y!) live"
    elif mode == "anticipate":
        written = ("anticipated",)
        states = ", ".join([f"Tensor? {s}" for s in kernel.state_names] + [f"Tensor {s}" for s in scalars])
        buffers = f"Tensor param, Tensor grad, Tensor(a!) anticipated, {states}, Tensor step, Tensor live"
    else:
        written = ("nonfinite",)
        states = ", ".join([f"Tensor? {s}" for s in kernel.state_names] + [f"Tensor {s}" for s in scalars])
        buffers = f"Tensor param, Tensor grad, {states}, Tensor step, Tensor live"
    flags = ", Tensor(a!) nonfinite" if mode == "probe" else ""
    schema = f"({buffers}, Tensor lr, Tensor hyper, Tensor? grad_scale, Tensor? skip, Tensor chunks{flags}) -> ()"
    arg_names = [arg.split()[-1] for arg in schema[1 : schema.index(") ->")].split(", ")]
    width = len(kernel.row_names)

    def impl(*args):
        a = dict(zip(arg_names, args))
        param = a["param"]
        arena = {"grad": a["grad"], **{s: a[s] for s in kernel.state_names}}
        if mode == "anticipate":
            arena["anticipated"] = a["anticipated"]
        _check_arena_tensors(op, param, arena, written)
        num_agents = a["step"].numel()
        _check_agent_tensors(
            op,
            param.device,
            num_agents,
            {
                "step": (a["step"], torch.float64),
                "lr": (a["lr"], torch.float64),
                "grad_scale": (a["grad_scale"], torch.float64),
                "skip": (a["skip"], torch.uint8),
                "nonfinite": (a.get("nonfinite"), torch.uint8),
            },
        )
        scalar_dtype = a[scalars[0]].dtype if scalars else torch.float32
        if scalar_dtype not in SCALAR_DTYPES:
            raise ValueError(
                f"{op}: {scalars[0]} must be float32 or float64 (torch.optim's scalar state dtype), got {scalar_dtype}"
            )
        _check_agent_tensors(op, param.device, num_agents, {s: (a[s], scalar_dtype) for s in scalars})
        for name, dtype, columns in (("hyper", torch.float64, width), ("live", torch.uint8, _C.MAX_STATES)):
            t = a[name]
            if (
                t.dtype != dtype
                or t.device != param.device
                or t.shape != (num_agents, columns)
                or not t.is_contiguous()
            ):
                raise ValueError(
                    f"{op}: {name} must be a contiguous {dtype} tensor of shape ({num_agents}, {columns}) on "
                    f"{param.device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
                )
        _check_chunks(op, param.device, a["chunks"])
        everything = {
            "param": param,
            **arena,
            **{s: a[s] for s in scalars},
            **{name: a[name] for name in ("step", "live", "lr", "hyper", "grad_scale", "skip", "chunks")},
            "nonfinite": a.get("nonfinite"),
        }
        _check_buffers(op, everything, written, a["chunks"], None, num_agents, param.numel())
        device, stream = _device_and_stream(param)
        buffers = _C.UpdateBuffers()
        buffers.param, buffers.grad = param.data_ptr(), a["grad"].data_ptr()
        buffers.anticipated = _address(a.get("anticipated"))
        buffers.state = [_address(a[s]) for s in kernel.state_names]
        buffers.scalars = [a[s].data_ptr() for s in scalars]
        buffers.scalar_dtype = _DTYPE_CODES[scalar_dtype]
        buffers.step, buffers.live = a["step"].data_ptr(), a["live"].data_ptr()
        buffers.lr, buffers.hyper = a["lr"].data_ptr(), a["hyper"].data_ptr()
        buffers.grad_scale, buffers.skip = _address(a["grad_scale"]), _address(a["skip"])
        buffers.nonfinite = _address(a.get("nonfinite"))
        buffers.chunks, buffers.num_chunks = a["chunks"].data_ptr(), a["chunks"].shape[0]
        buffers.num_agents, buffers.numel = num_agents, param.numel()
        buffers.dtype, buffers.mode = _DTYPE_CODES[param.dtype], _C.UPDATE_MODES[mode]
        _C.update(kernel.code, device, stream, buffers)

    qualname = f"kpg::{op}"
    torch.library.define(qualname, schema)
    torch.library.impl(qualname, ("cpu", "cuda"))(impl)
    torch.library.register_fake(qualname)(lambda *args: _reject_meta(op, dict(zip(arg_names, args))))
    return getattr(torch.ops.kpg, op)


UPDATE_OPS = {
    (kind, commit): _define_update_op(kernel, "commit" if commit else "anticipate")
    for kind, kernel in KERNELS.items()
    for commit in (False, True)
}
# Mode probe (NOTE [Probe before commit] in csrc/kpg/update.h): the commit's arguments plus ``nonfinite``
# (uint8, one per agent), set to 1 where the commit would write an inf or NaN parameter or state value
# and to 0 elsewhere; nothing else is written.
PROBE_OPS = {kind: _define_update_op(kernel, "probe") for kind, kernel in KERNELS.items()}
# Each op also as kpg._ops.<family>_<mode> (adam_commit, adam_probe), named from the table.
globals().update({f"{kind}_{'commit' if commit else 'anticipate'}": op for (kind, commit), op in UPDATE_OPS.items()})
globals().update({f"{kind}_probe": op for kind, op in PROBE_OPS.items()})


@torch.library.custom_op("kpg::agent_grad_norms", mutates_args=("chunk_sq", "norm", "grad_scale", "nonfinite"))
def agent_grad_norms(
    grad: Tensor,
    chunks: Tensor,
    agent_chunks: Tensor,
    chunk_sq: Tensor,
    max_norm: Tensor | None,
    norm: Tensor,
    grad_scale: Tensor,
    nonfinite: Tensor,
) -> None:
    """Per-agent gradient 2-norms, clipping scales and non-finite flags in one pass over ``grad``.

    ``grad_scale[a] = min(1, max_norm[a] / (norm[a] + 1e-6))`` as ``torch.nn.utils.clip_grad_norm_``
    computes it (1 where ``max_norm`` is None); ``nonfinite[a]`` is 1 where the norm is inf or NaN.
    ``chunk_sq`` is a float64 workspace with one entry per chunk.
    """
    op = "agent_grad_norms"
    if grad.dtype not in _DTYPE_CODES:
        raise TypeError(f"{op}: gradients of dtype {grad.dtype} are not supported; use float32 or float64")
    if not grad.is_contiguous():
        raise ValueError(f"{op}: grad must be a contiguous flat buffer")
    _check_chunks(op, grad.device, chunks)
    num_agents = norm.numel()
    if (
        agent_chunks.dtype != torch.int64
        or agent_chunks.device != grad.device
        or agent_chunks.numel() != num_agents + 1
    ):
        raise ValueError(
            f"{op}: agent_chunks must be the int64 table of num_agents + 1 entries ({num_agents + 1}, one agent per "
            f"norm entry) on {grad.device} from chunk_table, got {agent_chunks.dtype} with {agent_chunks.numel()} "
            f"entries on {agent_chunks.device}"
        )
    if not agent_chunks.is_contiguous():
        raise ValueError(f"{op}: agent_chunks must be contiguous; pass the table chunk_table returned")
    _check_agent_tensors(
        op,
        grad.device,
        num_agents,
        {
            "max_norm": (max_norm, torch.float64),
            "norm": (norm, torch.float64),
            "grad_scale": (grad_scale, torch.float64),
            "nonfinite": (nonfinite, torch.uint8),
        },
    )
    _check_agent_tensors(op, grad.device, chunks.shape[0], {"chunk_sq": (chunk_sq, torch.float64)}, per="chunk")
    everything = dict(
        grad=grad,
        chunks=chunks,
        agent_chunks=agent_chunks,
        chunk_sq=chunk_sq,
        max_norm=max_norm,
        norm=norm,
        grad_scale=grad_scale,
        nonfinite=nonfinite,
    )
    _check_buffers(
        op, everything, ("chunk_sq", "norm", "grad_scale", "nonfinite"), chunks, agent_chunks, num_agents, grad.numel()
    )
    device, stream = _device_and_stream(grad)
    buffers = _C.NormBuffers()
    buffers.grad, buffers.chunks, buffers.agent_chunks = grad.data_ptr(), chunks.data_ptr(), agent_chunks.data_ptr()
    buffers.num_chunks, buffers.num_agents, buffers.numel = chunks.shape[0], num_agents, grad.numel()
    buffers.chunk_sq, buffers.max_norm, buffers.norm = chunk_sq.data_ptr(), _address(max_norm), norm.data_ptr()
    buffers.grad_scale, buffers.nonfinite = grad_scale.data_ptr(), nonfinite.data_ptr()
    buffers.dtype = _DTYPE_CODES[grad.dtype]
    _C.agent_grad_norms(device, stream, buffers)


@agent_grad_norms.register_fake
def _(grad, chunks, agent_chunks, chunk_sq, max_norm, norm, grad_scale, nonfinite) -> None:
    _reject_meta(
        "agent_grad_norms",
        dict(
            grad=grad,
            chunks=chunks,
            agent_chunks=agent_chunks,
            chunk_sq=chunk_sq,
            max_norm=max_norm,
            norm=norm,
            grad_scale=grad_scale,
            nonfinite=nonfinite,
        ),
    )


def _check_agent_chunks(op: str, device: torch.device, agent_chunks: Tensor, num_agents: int, per: str) -> None:
    if (
        agent_chunks.dtype != torch.int64
        or agent_chunks.device != device
        or agent_chunks.numel() != num_agents + 1
        or not agent_chunks.is_contiguous()
    ):
        raise ValueError(
            f"{op}: agent_chunks must be the contiguous int64 table of num_agents + 1 entries ({num_agents + 1}, "
            f"one agent per {per} entry) on {device} from chunk_table, got {agent_chunks.dtype} with "
            f"{agent_chunks.numel()} entries on {agent_chunks.device}"
        )


def _momentum(record: bool, param: Tensor, named: dict[str, Tensor], chunks: Tensor) -> None:
    """Hands the momentum buffers to ``kpg._C.momentum`` (csrc/kpg/momentum.h)."""
    device, stream = _device_and_stream(param)
    agent_chunks = named.get("agent_chunks")
    _C.momentum(
        record,
        device,
        stream,
        _DTYPE_CODES[param.dtype],
        param.data_ptr(),
        named["latest"].data_ptr(),
        named["base"].data_ptr(),
        _address(named.get("anticipated")),
        named["gate"].data_ptr(),
        _address(named.get("latest_sq")),
        _address(named.get("chunk_sums")),
        chunks.data_ptr(),
        _address(agent_chunks),
        chunks.shape[0],
        named["gate"].numel(),
        param.numel(),
    )


@torch.library.custom_op("kpg::momentum_predict", mutates_args=("anticipated", "base"))
def momentum_predict(
    param: Tensor, latest: Tensor, gate: Tensor, anticipated: Tensor, base: Tensor, chunks: Tensor
) -> None:
    """Momentum anticipation's prediction in one pass: ``anticipated = param + gate[agent] * latest``
    (``gate`` rounded to the parameters' dtype first) and ``base = param``, every agent's chunks at
    once. ``gate`` holds one float64 entry per agent of the chunk table."""
    op = "momentum_predict"
    arena = dict(latest=latest, anticipated=anticipated, base=base)
    _check_arena_tensors(op, param, arena, ("anticipated", "base"))
    _check_agent_tensors(op, param.device, gate.numel(), {"gate": (gate, torch.float64)})
    _check_chunks(op, param.device, chunks)
    everything = dict(param=param, **arena, gate=gate, chunks=chunks)
    _check_buffers(op, everything, ("anticipated", "base"), chunks, None, gate.numel(), param.numel())
    _momentum(False, param, everything, chunks)


@momentum_predict.register_fake
def _(param, latest, gate, anticipated, base, chunks) -> None:
    _reject_meta(
        "momentum_predict",
        dict(param=param, latest=latest, gate=gate, anticipated=anticipated, base=base, chunks=chunks),
    )


@torch.library.custom_op("kpg::momentum_record", mutates_args=("latest", "latest_sq", "gate", "chunk_sums"))
def momentum_record(
    param: Tensor,
    base: Tensor,
    latest: Tensor,
    latest_sq: Tensor,
    gate: Tensor,
    chunk_sums: Tensor,
    chunks: Tensor,
    agent_chunks: Tensor,
) -> None:
    """Momentum anticipation's bookkeeping after a commit, in one pass: ``latest`` (u1 before, then
    u2) becomes the committed update ``param - base``; per agent, ``gate`` the next step's
    clip(cos(new update, old latest), 0, 1) (0 while either is zero) and ``latest_sq`` the new
    update's squared norm (it held the old one's). Sums run in float64 in a fixed order (as
    :func:`agent_grad_norms`); ``chunk_sums`` is a float64 ``[num_chunks, 2]`` workspace."""
    op = "momentum_record"
    arena = dict(base=base, latest=latest)
    _check_arena_tensors(op, param, arena, ("latest",))
    num_agents = gate.numel()
    _check_agent_tensors(
        op, param.device, num_agents, {"gate": (gate, torch.float64), "latest_sq": (latest_sq, torch.float64)}
    )
    _check_chunks(op, param.device, chunks)
    _check_agent_chunks(op, param.device, agent_chunks, num_agents, "gate")
    if (
        chunk_sums.dtype != torch.float64
        or chunk_sums.device != param.device
        or chunk_sums.shape != (chunks.shape[0], 2)
        or not chunk_sums.is_contiguous()
    ):
        raise ValueError(
            f"{op}: chunk_sums must be a contiguous float64 workspace of shape ({chunks.shape[0]}, 2) (two sums per "
            f"chunk) on {param.device}, got {chunk_sums.dtype} {tuple(chunk_sums.shape)} on {chunk_sums.device}"
        )
    everything = dict(
        param=param,
        **arena,
        latest_sq=latest_sq,
        gate=gate,
        chunk_sums=chunk_sums,
        chunks=chunks,
        agent_chunks=agent_chunks,
    )
    _check_buffers(
        op, everything, ("latest", "latest_sq", "gate", "chunk_sums"), chunks, agent_chunks, num_agents, param.numel()
    )
    _momentum(True, param, everything, chunks)


@momentum_record.register_fake
def _(param, base, latest, latest_sq, gate, chunk_sums, chunks, agent_chunks) -> None:
    _reject_meta(
        "momentum_record",
        dict(
            param=param,
            base=base,
            latest=latest,
            latest_sq=latest_sq,
            gate=gate,
            chunk_sums=chunk_sums,
            chunks=chunks,
            agent_chunks=agent_chunks,
        ),
    )
