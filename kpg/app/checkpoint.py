"""Checkpoint files that hold data only: reading one runs no code.

A checkpoint is a pickle-free file: the line ``kpg-checkpoint-2``, a JSON line (the payload's tree
of dicts, lists, tuples, strings, numbers, booleans and None, where each tensor is replaced by a
reference to its dtype, shape and place in the data section), the tensors' raw bytes, and a last
line ``sha256:<hex>`` over everything before it. Reading parses JSON and copies bytes into tensors
of an allow-listed dtype; nothing in the file can name a function, a class or a module. Anything
else in a payload is refused when saving (the trainers convert their random generators' states to
plain data), and anything else in a file is refused when reading, with the file and the type named.

Checkpoints of earlier kpg versions (format ``kpg-checkpoint-1``) are pickles, which can run code
when read; kpg does not read them, and ``kpg convert-checkpoint PATH`` converts one on request.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import math
import os
import pathlib
import pickle
import pickletools
import re
import stat
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

MAGIC = b"kpg-checkpoint-2\n"
LEGACY_FORMAT = "kpg-checkpoint-1"
_CHECKSUM_PREFIX = b"sha256:"
_CHECKSUM_LINE = len(_CHECKSUM_PREFIX) + 64 + 1
_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
    )
}
_SCALARS = (str, int, float, type(None))  # bool is an int
_MAX_DIMENSIONS = 64  # torch's limit
_ALIGNMENT = 64  # bytes; the data section starts on such a boundary in memory
PLAIN_DATA = "tensors, numbers, strings, booleans, None, lists, tuples and dicts"


class CheckpointError(ValueError):
    """A file that is not a readable kpg checkpoint; the message names the file and the fix."""


# ---- writing ---------------------------------------------------------------------------------------


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Writes ``payload`` (plain data and tensors only: :data:`PLAIN_DATA`) atomically (temporary
    file, fsync, rename) with a SHA-256 of the content, so a crash mid-write leaves the previous
    checkpoint and a damaged file is detected on load."""
    tensors: list[torch.Tensor] = []
    tree = _encode(payload, tensors, "payload")
    table, offset = [], 0
    for tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        table.append(
            {
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "shape": list(tensor.shape),
                "offset": offset,
                "bytes": size,
            }
        )
        offset += size
    header = json.dumps({"tensors": table, "data_bytes": offset, "payload": tree}, separators=(",", ":"))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    digest = hashlib.sha256()
    with open(temporary, "wb") as file:
        for part in (MAGIC, header.encode() + b"\n", *(_raw_bytes(t) for t in tensors)):
            digest.update(part)
            file.write(part)
        file.write(_CHECKSUM_PREFIX + digest.hexdigest().encode() + b"\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    # The rename lives in the directory: without its fsync a power loss can undo it.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _encode(value: Any, tensors: list[torch.Tensor], where: str) -> Any:
    if isinstance(value, torch.Tensor):
        if str(value.dtype).removeprefix("torch.") not in _DTYPES or value.is_sparse:
            raise TypeError(
                f"checkpoint entry {where} is a {value.dtype} {value.layout} tensor; checkpoints hold "
                f"dense tensors of dtype {', '.join(_DTYPES)}"
            )
        tensors.append(value.detach().cpu().contiguous())
        return {"tensor": len(tensors) - 1}
    if isinstance(value, (bool, *_SCALARS)):
        return value
    if isinstance(value, list):
        return [_encode(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, tuple):
        return {"tuple": [_encode(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]}
    if isinstance(value, dict):
        for key in value:
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise TypeError(
                    f"checkpoint entry {where} has a key {key!r} of type {_type_name(key)}; keys are str or int"
                )
        items = [[key, _encode(item, tensors, f"{where}[{key!r}]")] for key, item in value.items()]
        if isinstance(value, OrderedDict):  # a module's state_dict, with its version metadata
            metadata = getattr(value, "_metadata", None)
            metadata = None if metadata is None else _encode(dict(metadata), tensors, where)
            return {"ordered_items": items, "metadata": metadata}
        return {"items": items}
    raise TypeError(
        f"checkpoint entry {where} is a {_type_name(value)}; a kpg checkpoint holds only {PLAIN_DATA}: "
        "convert it to those in the state_dict() that produced it"
    )


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


# ---- reading ---------------------------------------------------------------------------------------


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The payload of a checkpoint written by :func:`save_checkpoint`, tensors on the CPU. Runs no
    code from the file: anything but the format's data is refused with a :class:`CheckpointError`.
    The tensors are views of one buffer holding the file (an entry whose data is not aligned to
    its dtype is copied), so reading takes at most about twice the file's size."""
    path = Path(path)
    buffer, size = _read_regular_file(path)
    data = memoryview(buffer)[:size]
    if bytes(data[: len(MAGIC)]) != MAGIC:
        raise CheckpointError(_not_this_format(path, bytes(data)))
    trailer = bytes(data[-_CHECKSUM_LINE:])
    if not (trailer.startswith(_CHECKSUM_PREFIX) and trailer.endswith(b"\n")):
        raise CheckpointError(
            f"checkpoint {path} cannot be read: it is truncated or damaged (its closing checksum is "
            "missing); restore it or start over"
        )
    body = data[: size - _CHECKSUM_LINE]
    if hashlib.sha256(body).hexdigest().encode() != trailer[len(_CHECKSUM_PREFIX) : -1]:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its SHA-256 does not match the content; restore it or start over"
        )
    end_of_header = buffer.find(b"\n", len(MAGIC), len(body))
    try:
        if end_of_header < 0:
            raise ValueError("its header line has no end")
        header = json.loads(bytes(body[len(MAGIC) : end_of_header]))
        if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
            raise ValueError("its header is not a table with a list of tensors")
        data_bytes = len(body) - end_of_header - 1
        if header.get("data_bytes") != data_bytes:
            raise ValueError(f"the data section holds {data_bytes} bytes, the header says {header.get('data_bytes')!r}")
        del data, body  # views of the unaligned content
        data_start = _align_data_section(buffer, size, end_of_header + 1)
        tensors, offset = [], 0
        for index, entry in enumerate(header["tensors"]):
            tensors.append(_tensor(entry, index, offset, buffer, data_start, data_bytes))
            offset += entry["bytes"]
        if offset != data_bytes:
            raise ValueError(f"its tensor entries hold {offset} bytes of the data section's {data_bytes}")
        payload = _decode(header["payload"], tensors, "payload")
    except RecursionError:
        raise CheckpointError(
            f"checkpoint {path} cannot be read: its header is nested too deeply; it was not written by kpg "
            "(nothing in it was run)"
        ) from None
    except (ValueError, KeyError, TypeError, IndexError, OverflowError, RuntimeError) as error:
        reason = " ".join(str(error).split())[:300]  # one line, however the file was crafted
        raise CheckpointError(
            f"checkpoint {path} cannot be read: {reason}; it was not written by kpg (nothing in it was run)"
        ) from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} cannot be read: its payload is a {_type_name(payload)}, not a dict")
    return payload


def _read_regular_file(path: Path) -> tuple[bytearray, int]:
    """The bytes of ``path`` at the start of a buffer with :data:`_ALIGNMENT` spare bytes, and their
    count. Anything but a regular file is refused without blocking on it (a FIFO would block the
    read, ``/dev/zero`` never end)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise CheckpointError(f"checkpoint {path} cannot be opened: {error.strerror}") from None
    with os.fdopen(descriptor, "rb", buffering=0) as file:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise CheckpointError(
                f"checkpoint {path} is not a regular file (a FIFO, device or socket); a checkpoint is a file "
                "kpg wrote: restore it or start over"
            )
        buffer = bytearray(status.st_size + _ALIGNMENT)
        size = file.readinto(memoryview(buffer)[: status.st_size])
        if size != status.st_size or file.read(1):
            raise CheckpointError(f"checkpoint {path} changed while it was read; read it again")
    return buffer, size


def _align_data_section(buffer: bytearray, size: int, data_start: int) -> int:
    """Moves the file's bytes in ``buffer`` forward so that its data section starts on an
    :data:`_ALIGNMENT` boundary in memory (its tensors then are aligned views); returns where it starts."""
    address = ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))
    shift = -(address + data_start) % _ALIGNMENT
    ctypes.memmove(address + shift, address, size)  # memmove: the ranges overlap
    return data_start + shift


def _tensor(entry: Any, index: int, offset: int, buffer: bytearray, data_start: int, data_bytes: int) -> torch.Tensor:
    """Tensor ``index`` of the header, a view of ``buffer`` at ``offset`` of the data section (which
    starts at ``data_start``): entries follow each other in order, without gaps or overlaps, so none
    can alias another's bytes."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "offset", "bytes"}:
        raise ValueError(f"tensor entry {index} is not a table of dtype, shape, offset and bytes")
    dtype = _DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise ValueError(f"it holds a tensor of dtype {entry['dtype']!r}, which kpg does not write")
    shape, size = entry["shape"], entry["bytes"]
    integers = [entry["offset"], size, *shape] if isinstance(shape, list) else []
    if not integers or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in integers):
        raise ValueError(f"tensor entry {index} has a shape, offset or size that is not a list of integers >= 0")
    if len(shape) > _MAX_DIMENSIONS or any(n >= 2**63 for n in shape):
        raise ValueError(f"tensor entry {index} has a shape no tensor can have ({len(shape)} dimensions)")
    if entry["offset"] != offset:
        raise ValueError(
            f"tensor entry {index} starts at byte {entry['offset']} of the data section, not at {offset} where the "
            "previous one ends (entries follow each other without gaps or overlaps)"
        )
    numel = math.prod(shape)  # a Python integer: no overflow
    if size != numel * dtype.itemsize or offset + size > data_bytes:
        raise ValueError(f"a tensor entry does not fit the data section (entry {index}: {entry})")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(buffer, dtype=torch.uint8, count=size, offset=data_start + offset)
    if flat.data_ptr() % dtype.itemsize:  # after a tensor of odd size; kernels may assume aligned data
        flat = flat.clone()
    return flat.view(dtype).reshape(shape)


def _decode(node: Any, tensors: list[torch.Tensor], where: str) -> Any:
    if isinstance(node, list):
        return [_decode(item, tensors, f"{where}[{i}]") for i, item in enumerate(node)]
    if not isinstance(node, dict):
        if isinstance(node, (bool, *_SCALARS)):
            return node
        raise ValueError(f"{where} is a {_type_name(node)}")
    kind = next(iter(node), None)
    if set(node) == {"tensor"}:
        index = node["tensor"]
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(tensors):
            raise ValueError(f"{where} refers to tensor {index!r} of {len(tensors)}")
        return tensors[index]
    if set(node) == {"tuple"}:
        return tuple(_decode(item, tensors, f"{where}[{i}]") for i, item in enumerate(node["tuple"]))
    if set(node) in ({"items"}, {"ordered_items", "metadata"}):
        items = node.get("items", node.get("ordered_items"))
        decoded = {}
        for key, item in items:
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise ValueError(f"{where} has a key of type {_type_name(key)}")
            decoded[key] = _decode(item, tensors, f"{where}[{key!r}]")
        if "items" in node:
            return decoded
        ordered = OrderedDict(decoded)
        if node["metadata"] is not None:
            ordered._metadata = _decode(node["metadata"], tensors, where)  # type: ignore[attr-defined]
        return ordered
    raise ValueError(f"{where} is an entry of type {kind!r}, which a kpg checkpoint never holds")


def _not_this_format(path: Path, data: bytes) -> str:
    if data.startswith(b"PK\x03\x04") or data[:1] == b"\x80":
        imports = pickle_imports(data)
        usual = ("torch.", "collections.", "_codecs.encode")  # what kpg-checkpoint-1 envelopes import
        unexpected = sorted(name for name in imports if not name.startswith(usual))
        held = f" and imports {', '.join(unexpected)}" if unexpected else ""
        return (
            f"checkpoint {path} is a pickle{held} (kpg's earlier checkpoint format {LEGACY_FORMAT}, or a file "
            "made to look like one): reading a pickle can run any code it holds, so kpg does not read it (nothing "
            f"in it was run). If you wrote it with kpg yourself, convert it once: kpg convert-checkpoint {path}"
        )
    return (
        f"checkpoint {path} cannot be read: it is not a kpg checkpoint (it does not start with "
        f"{MAGIC.decode().strip()!r}); it is damaged or another kind of file"
    )


def pickle_imports(data: bytes) -> set[str]:
    """The module.name globals a pickle (bare, or a torch zip file's data.pkl) would import,
    found by scanning its opcodes without running it; empty where it cannot be scanned."""
    try:
        if data.startswith(b"PK\x03\x04"):
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                data = archive.read(name)
        found, strings = set(), []
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"):
                strings.append(argument)
            elif opcode.name == "GLOBAL":
                found.add(argument.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.add(f"{strings[-2]}.{strings[-1]}")
        return found
    except Exception:  # a damaged pickle: the message then names no imports
        return set()


# ---- converting checkpoints of kpg-checkpoint-1 ------------------------------------------------------


def _legacy_safe_globals() -> list[Any]:
    """What kpg-checkpoint-1 files hold beyond torch's weights-only defaults: the run's paths and
    numpy's global generator state (an array)."""
    multiarray = getattr(np, "_core", None) or np.core
    return [
        pathlib.PosixPath,
        pathlib.WindowsPath,
        np.ndarray,
        np.dtype,
        multiarray.multiarray._reconstruct,
        type(np.dtype(np.uint32)),
    ]


def read_legacy_checkpoint(path: Path, trust: bool) -> dict[str, Any]:
    """The payload of a kpg-checkpoint-1 file. Without ``trust``, torch's weights-only unpickler
    with :func:`_legacy_safe_globals` (no code runs; anything else is refused, named); with it,
    the full pickle reader, which runs whatever code the file holds."""

    def load(source):
        if trust:
            return torch.load(source, map_location="cpu", weights_only=False)
        if not hasattr(torch.serialization, "safe_globals"):  # torch before 2.5: the process-wide allow-list
            torch.serialization.add_safe_globals(_legacy_safe_globals())
            return torch.load(source, map_location="cpu", weights_only=True)
        with torch.serialization.safe_globals(_legacy_safe_globals()):
            return torch.load(source, map_location="cpu", weights_only=True)

    try:
        wrapper = load(path)
        if not isinstance(wrapper, dict) or wrapper.get("format") != LEGACY_FORMAT:
            raise CheckpointError(f"{path} is not a kpg checkpoint of format {LEGACY_FORMAT}")
        if hashlib.sha256(wrapper["payload"]).hexdigest() != wrapper["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: its SHA-256 does not match the content")
        return load(io.BytesIO(wrapper["payload"]))
    except pickle.UnpicklingError as error:
        named = re.search(r"GLOBAL ([\w.]+)", str(error))
        if named and not trust:
            raise CheckpointError(
                f"checkpoint {path} holds {named.group(1)}, which kpg checkpoints never held; it was not converted "
                "and nothing in it was run. Only if you trust the file like a program you run, convert it with "
                "--trust-pickle"
            ) from None
        lines = [line.strip() for line in str(error).splitlines() if line.strip() and "documentation" not in line]
        raise CheckpointError(
            f"checkpoint {path} cannot be read as format {LEGACY_FORMAT} ({lines[-1][:300]}); it is "
            "damaged or another kind of file"
        ) from None
    except (RuntimeError, EOFError, KeyError, TypeError) as error:  # not a torch file, or not kpg's envelope
        raise CheckpointError(
            f"checkpoint {path} cannot be read as format {LEGACY_FORMAT} ({type(error).__name__}: "
            f"{str(error)[:300]}); it is damaged or another kind of file"
        ) from None


def upgrade_legacy_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """A kpg-checkpoint-1 payload in today's plain layout: the run's config as JSON data and numpy's
    global generator states (``rng.numpy``, every rank's) as :func:`numpy_state_as_data`."""
    payload = dict(payload)
    payload["config"] = json.loads(json.dumps(payload.get("config"), default=str))
    for holder in [payload, *payload.get("ranks", [])]:
        rng = holder.get("rng")
        if isinstance(rng, dict) and isinstance(rng.get("numpy"), tuple):
            name, key, position, has_gauss, gauss = rng["numpy"]
            rng["numpy"] = {
                "bit_generator": name,
                "state": {"key": torch.from_numpy(np.asarray(key, np.int64)), "pos": int(position)},
                "has_gauss": int(has_gauss),
                "gauss": float(gauss),
            }
    return payload


def numpy_state_as_data(state: dict[str, Any]) -> dict[str, Any]:
    """``np.random.get_state(legacy=False)`` with its key array as an int64 tensor."""
    return {**state, "state": {**state["state"], "key": torch.from_numpy(state["state"]["key"].astype(np.int64))}}


def numpy_state_from_data(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`numpy_state_as_data`, for ``np.random.set_state``."""
    return {**state, "state": {**state["state"], "key": state["state"]["key"].numpy().astype(np.uint32)}}


def convert_checkpoint(path: Path, trust: bool = False) -> Path:
    """Rewrites the kpg-checkpoint-1 file ``path`` in today's format; the original is kept as
    ``PATH.v1``. Returns the kept original's path."""
    path = Path(path)
    with open(path, "rb") as file:
        current = file.read(len(MAGIC)) == MAGIC
    if current:
        raise CheckpointError(f"checkpoint {path} is already in format {MAGIC.decode().strip()}; nothing to convert")
    payload = upgrade_legacy_payload(read_legacy_checkpoint(path, trust))
    kept = path.with_name(path.name + ".v1")
    converted = path.with_name(path.name + ".converted")
    save_checkpoint(converted, payload)
    os.replace(path, kept)
    os.replace(converted, path)
    return kept


@dataclass
class ConvertConfig:
    """Converts a checkpoint of kpg's earlier pickle format (kpg-checkpoint-1) to today's format, from
    which reading runs no code; the original is kept as PATH.v1."""

    path: Path  # positional on the command line (kpg.app.cli makes required options positional)
    # Read with Python's full pickle reader, which runs any code the file holds: only for a file you
    # trust like a program you run (by default torch's weights-only reader reads it, running no code).
    trust_pickle: bool = False


def convert_command(config: ConvertConfig) -> None:
    if not config.path.is_file():
        raise SystemExit(f"kpg convert-checkpoint: {config.path} does not exist")
    reader = (
        "Python's full pickle reader, which runs any code the file holds (--trust-pickle)"
        if config.trust_pickle
        else "torch's weights-only reader, which runs no code"
    )
    print(f"reading {config.path} with {reader}", file=sys.stderr)
    kept = convert_checkpoint(config.path, config.trust_pickle)
    print(f"converted {config.path} to format {MAGIC.decode().strip()}; the original is kept as {kept}")
