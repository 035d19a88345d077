"""Type stub of the compiled extension ``kpg._C``; mirrors csrc/bindings.cpp (tests/test_stub.py
keeps the two in sync).

Tensors cross as raw addresses (``int``, 0 for an absent optional buffer), element counts and a
dtype code (``DTYPES``); ``device`` is -1 for the CPU or a CUDA device index, ``stream``
a ``cudaStream_t`` handle (0 on the CPU). Use ``kpg._ops`` rather than calling these directly.
"""

import numpy as np
import numpy.typing as npt

CPU_CHUNK_ELEMS: int
CUDA_CHUNK_ELEMS: int
CUDA_THREADS_PER_BLOCK: int
VECTOR_BYTES: int
MAX_STATES: int
UPDATE_MODES: dict
"""mode name (anticipate, commit, probe) -> code of ``UpdateBuffers.mode``."""
MAX_SCALAR_STATES: int
DTYPES: dict
"""dtype name -> code of the parameter dtypes the kernels take."""
OPTIMIZERS: dict
"""name -> family code, default_lr, row_width, hyperparameters (name, width, kind, default) in row
order, states, state_initial, scalar_states (name, initial) (csrc/kpg/optimizers.h)."""

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

def check_chunk_table(
    op: str, chunks: npt.ArrayLike, agent_chunks: npt.ArrayLike | None, num_agents: int, numel: int
) -> None:
    """Raises ValueError naming ``op`` and the first row outside the arena, two rows sharing an
    element, or an agent whose ``agent_chunks`` entries are not a range of the table."""

def element_visits(offsets: npt.ArrayLike, chunk_elems: int, threads: int, vec: int) -> npt.NDArray[np.int32]: ...
def kept_states(family: int, rows: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """[agents, states]: the state tensors a commit with each hyperparameter row keeps."""

def invalid_row(family: int, rows: npt.ArrayLike) -> tuple[int, str]:
    """(agent, message) of the first row breaking a rule between hyperparameters, or (-1, "")."""

class UpdateBuffers:
    """The arena buffers of one update by address (0 for none); csrc/kpg/update.h."""

    param: int
    grad: int
    anticipated: int
    state: list[int]
    scalars: list[int]
    scalar_dtype: int
    step: int
    lr: int
    hyper: int
    live: int
    grad_scale: int
    skip: int
    nonfinite: int
    chunks: int
    num_chunks: int
    num_agents: int
    numel: int
    dtype: int
    mode: int
    def __init__(self) -> None: ...

def update(family: int, device: int, stream: int, buffers: UpdateBuffers) -> None:
    """One fused update of optimizer family ``family`` in ``buffers.mode`` (``UPDATE_MODES``: anticipate, commit
    or probe)."""

class NormBuffers:
    """The buffers of one per-agent gradient-norm pass by address (0 for none); csrc/kpg/norms.h."""

    grad: int
    chunks: int
    agent_chunks: int
    chunk_sq: int
    max_norm: int
    norm: int
    grad_scale: int
    nonfinite: int
    num_chunks: int
    num_agents: int
    numel: int
    dtype: int
    def __init__(self) -> None: ...

def agent_grad_norms(device: int, stream: int, buffers: NormBuffers) -> None:
    """Per-agent gradient 2-norms, clipping scales and non-finite flags (``agent_grad_norms`` in kpg._ops)."""

def momentum(
    record: bool,
    device: int,
    stream: int,
    dtype: int,
    param: int,
    latest: int,
    base: int,
    anticipated: int,
    gate: int,
    latest_sq: int,
    chunk_sums: int,
    chunks: int,
    agent_chunks: int,
    num_chunks: int,
    num_agents: int,
    numel: int,
) -> None:
    """Momentum anticipation's prediction (``record`` False) or its bookkeeping after a commit (csrc/kpg/momentum.h)."""

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
