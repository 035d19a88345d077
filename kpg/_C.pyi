"""Type stub of the compiled extension ``kpg._C``; mirrors csrc/bindings.cpp (tests/test_stub.py
keeps the two in sync).

Tensors cross as raw addresses (``int``, 0 for an absent optional buffer), element counts and a
dtype code (0 float32, 1 float64); ``device`` is -1 for the CPU or a CUDA device index, ``stream``
a ``cudaStream_t`` handle (0 on the CPU). Use ``kpg._ops`` rather than calling these directly.
"""

import numpy as np
import numpy.typing as npt

CPU_CHUNK_ELEMS: int
CUDA_CHUNK_ELEMS: int
CUDA_THREADS_PER_BLOCK: int
VECTOR_BYTES: int

def build_info() -> dict[str, bool | str]:
    """``cuda`` (bool), ``cuda_version``, ``cuda_architectures``, ``cxx_compiler`` (str)."""

def set_num_threads(num_threads: int) -> None: ...
def get_num_threads() -> int: ...
def chunk_table(offsets: npt.ArrayLike, chunk_elems: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(chunks [num_chunks, 3] rows of agent, begin, end; agent_chunks [num_agents + 1])."""

def range_chunk_table(
    ranges: npt.ArrayLike, num_agents: int, chunk_elems: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Like ``chunk_table``, from rows (agent, begin, end) in any order; the rows come grouped by agent."""

def element_visits(offsets: npt.ArrayLike, chunk_elems: int, threads: int, vec: int) -> npt.NDArray[np.int32]: ...

# csrc/device_bindings.cpp: the CUDA side without a GPU.
NORM_LANES: int
NORM_AGENTS_PER_BLOCK: int

def cuda_versions() -> dict[str, int | None]:
    """``driver`` (CUDA version the NVIDIA driver supports, 0 without a driver) and ``runtime`` (kpg's
    CUDA runtime), as 1000 * major + 10 * minor; both None in a build without CUDA kernels."""

def cuda_driver_problem(driver: int, runtime: int) -> str:
    """What a driver of CUDA version ``driver`` lacks to run kernels built with ``runtime``; '' if nothing."""

def norm_finish_readers(agent_chunks: npt.ArrayLike, num_chunks: int) -> npt.NDArray[np.int64]:
    """For each chunk row, the agent whose norm-finish warp read it (-1: none, -2: read twice)."""

def sgd_update(
    device: int,
    stream: int,
    dtype: int,
    commit: bool,
    param: int,
    grad: int,
    anticipated: int,
    momentum_buffer: int,
    step: int,
    lr: int,
    grad_scale: int,
    skip: int,
    chunks: int,
    num_chunks: int,
    num_agents: int,
    numel: int,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None: ...
def adam_update(
    device: int,
    stream: int,
    dtype: int,
    commit: bool,
    param: int,
    grad: int,
    anticipated: int,
    exp_avg: int,
    exp_avg_sq: int,
    max_exp_avg_sq: int,
    step: int,
    lr: int,
    grad_scale: int,
    skip: int,
    chunks: int,
    num_chunks: int,
    num_agents: int,
    numel: int,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
) -> None: ...
def rmsprop_update(
    device: int,
    stream: int,
    dtype: int,
    commit: bool,
    param: int,
    grad: int,
    anticipated: int,
    square_avg: int,
    momentum_buffer: int,
    grad_avg: int,
    step: int,
    lr: int,
    grad_scale: int,
    skip: int,
    chunks: int,
    num_chunks: int,
    num_agents: int,
    numel: int,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
) -> None: ...
def agent_grad_norms(
    device: int,
    stream: int,
    dtype: int,
    grad: int,
    chunks: int,
    agent_chunks: int,
    num_chunks: int,
    num_agents: int,
    numel: int,
    chunk_sq: int,
    max_norm: int,
    norm: int,
    grad_scale: int,
    nonfinite: int,
) -> None: ...
