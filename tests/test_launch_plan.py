"""The mapping of CUDA blocks and threads to arena elements, driven on the CPU.

Every block (one per chunk) and every thread of a launch is simulated with the kernels' own
mapping (csrc/kpg/launch_plan.h); each element must be visited exactly once. The sizes are the
ones where a launch that rounds wrongly leaves elements out: 0, 1, vector width +-1, chunk size
+-1, 1025-1027, 2049-2051, 4097 and mixes of them.
"""

import numpy as np
import pytest

from kpg import _C

CUDA_CHUNK = _C.CUDA_CHUNK_ELEMS
THREADS = _C.CUDA_THREADS_PER_BLOCK
EDGE_SIZES = [
    0,
    1,
    2,
    3,
    4,
    5,
    7,
    8,
    9,
    1025,
    1026,
    1027,
    2049,
    2050,
    2051,
    4097,
    CUDA_CHUNK - 1,
    CUDA_CHUNK,
    CUDA_CHUNK + 1,
    2 * CUDA_CHUNK + 3,
]

LAYOUTS = {
    **{f"one-agent-{s}": [s] for s in EDGE_SIZES},
    "all-edge-sizes": EDGE_SIZES,
    "edge-sizes-reversed": EDGE_SIZES[::-1],
    "257-mixed": [EDGE_SIZES[(7 * a) % len(EDGE_SIZES)] for a in range(257)],
    "empty-agents-only": [0, 0, 0],
}


def offsets_of(sizes):
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


# vec 4 and 2: float32 and float64 with 16-byte loads; vec 1: an unaligned base address.
@pytest.mark.parametrize("vec", [1, 2, 4])
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_cuda_launch_visits_every_element_once(layout, vec):
    visits = _C.element_visits(offsets_of(layout), CUDA_CHUNK, THREADS, vec)
    assert visits.shape == (sum(layout),)
    assert np.all(visits == 1), f"elements visited {sorted(set(visits.tolist()))} times"


@pytest.mark.parametrize("threads,chunk", [(4, 64), (8, 8), (32, 1000), (4, 5)])
def test_small_blocks_and_chunks_visit_every_element_once(threads, chunk):
    """Blocks that need many passes per chunk, and chunks shorter than a vector."""
    sizes = [0, 1, 3, 4, 5, 63, 64, 65, 129, 1000, 1001, 2051]
    for vec in (1, 2, 4):
        visits = _C.element_visits(offsets_of(sizes), chunk, threads, vec)
        assert np.all(visits == 1), (threads, chunk, vec)


def test_chunk_table_rows_stay_inside_their_agent():
    sizes = [0, 5, CUDA_CHUNK + 1, 0, 1]
    offsets = offsets_of(sizes)
    chunks, agent_chunks = _C.chunk_table(offsets, CUDA_CHUNK)
    assert chunks.tolist() == [
        [1, 0, 5],
        [2, 5, 5 + CUDA_CHUNK],
        [2, 5 + CUDA_CHUNK, 6 + CUDA_CHUNK],
        [4, 6 + CUDA_CHUNK, 7 + CUDA_CHUNK],
    ]
    assert agent_chunks.tolist() == [0, 0, 1, 3, 3, 4]


@pytest.mark.parametrize(
    "offsets,chunk_elems,message",
    [
        ([[0, 1]], 4, "1-D"),
        ([], 4, "1-D"),
        ([0, 5, 3], 4, "must not decrease"),
        ([0, 5], 0, "chunk_elems >= 1"),
    ],
    ids=["2-d", "empty", "decreasing", "zero-chunk"],
)
def test_chunk_table_rejects_bad_offsets(offsets, chunk_elems, message):
    with pytest.raises(ValueError, match=message):
        _C.chunk_table(np.asarray(offsets, dtype=np.int64), chunk_elems)


def test_element_visits_rejects_vector_wider_than_block():
    with pytest.raises(ValueError, match="vec <= threads"):
        _C.element_visits(offsets_of([8]), 8, 2, 4)
