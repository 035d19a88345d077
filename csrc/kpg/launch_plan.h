// Which elements of the arena each unit of work touches. The arena holds every agent's elements
// agent by agent, or parameter by parameter for agent-batched models; a chunk is a contiguous
// range of one agent's elements. The CPU path hands whole chunks to threads; a CUDA block takes
// one chunk and its threads split it as for_each_thread_element says. All of it is plain
// host/device code so tests can drive the CUDA mapping on the CPU.
#pragma once

#include <cstdint>

#include "kpg/common.h"

namespace kpg {

// The chunk table is an int64 array of rows (agent, begin, end); end is exclusive.
constexpr int kChunkColumns = 3;
constexpr int64_t kCpuChunkElems = 16384;
constexpr int64_t kCudaChunkElems = 8192;
constexpr int kCudaThreadsPerBlock = 256;
constexpr int kVectorBytes = 16;

struct ChunkRange {
  int64_t agent, begin, end;
};

KPG_HD ChunkRange chunk_at(const int64_t* chunks, int64_t chunk) {
  const int64_t* row = chunks + chunk * kChunkColumns;
  return {row[0], row[1], row[2]};
}

// Chunk tables reach the kernels from the caller; a row from another arena or a corrupted table
// must not send a kernel past the end of the buffers. The CPU path rejects the whole table before
// touching memory (check_chunk_table); a CUDA block skips its row, since a device-resident table
// cannot be read on the host without a synchronization.
KPG_HD bool chunk_in_bounds(const ChunkRange& r, int64_t num_agents, int64_t numel) {
  return 0 <= r.agent && r.agent < num_agents && 0 <= r.begin && r.begin <= r.end && r.end <= numel;
}

// offsets: num_agents + 1 ascending element offsets. Agents with no elements get no chunk.
inline int64_t count_chunks(const int64_t* offsets, int64_t num_agents, int64_t chunk_elems) {
  int64_t count = 0;
  for (int64_t a = 0; a < num_agents; ++a) {
    count += (offsets[a + 1] - offsets[a] + chunk_elems - 1) / chunk_elems;
  }
  return count;
}

// Fills `chunks` (count_chunks rows) and `agent_chunks` (num_agents + 1 entries: agent a owns
// rows agent_chunks[a] .. agent_chunks[a + 1] - 1).
inline void fill_chunk_table(const int64_t* offsets, int64_t num_agents, int64_t chunk_elems,
                             int64_t* chunks, int64_t* agent_chunks) {
  int64_t row = 0;
  for (int64_t a = 0; a < num_agents; ++a) {
    agent_chunks[a] = row;
    for (int64_t begin = offsets[a]; begin < offsets[a + 1]; begin += chunk_elems, ++row) {
      const int64_t end =
          begin + chunk_elems < offsets[a + 1] ? begin + chunk_elems : offsets[a + 1];
      chunks[row * kChunkColumns + 0] = a;
      chunks[row * kChunkColumns + 1] = begin;
      chunks[row * kChunkColumns + 2] = end;
    }
  }
  agent_chunks[num_agents] = row;
}

// Chunk tables over arbitrary element ranges: rows (agent, begin, end) in any order, as in an arena
// of agent-batched parameters, where each weight holds every agent's slice and an agent's elements
// are one range per weight. Each range is split into chunks of at most chunk_elems elements.
inline int64_t count_range_chunks(const int64_t* ranges, int64_t num_ranges, int64_t chunk_elems) {
  int64_t count = 0;
  for (int64_t r = 0; r < num_ranges; ++r) {
    const int64_t* row = ranges + r * kChunkColumns;
    count += (row[2] - row[1] + chunk_elems - 1) / chunk_elems;
  }
  return count;
}

// A chunk seen by vector loads of `vec` elements: a scalar head up to the first element index that
// is a multiple of vec, whole vectors, then a scalar tail. Element index e is vector-aligned when
// e % vec == 0 because every buffer's base address is (checked by the launcher).
struct ChunkSplit {
  int64_t begin, aligned_begin, aligned_end, end;
};

KPG_HD ChunkSplit split_chunk(int64_t begin, int64_t end, int vec) {
  int64_t aligned_begin = (begin + vec - 1) / vec * vec;
  if (aligned_begin > end) aligned_begin = end;
  int64_t aligned_end = end / vec * vec;
  if (aligned_end < aligned_begin) aligned_end = aligned_begin;
  return {begin, aligned_begin, aligned_end, end};
}

// Thread `thread` of `threads` takes head element `thread`, every threads-th vector from its own,
// and tail element `thread`. Needs vec <= threads, so head and tail fit one pass.
template <typename ScalarFn, typename VectorFn>
KPG_HD void for_each_thread_element(const ChunkSplit& split, int vec, int thread, int threads,
                                    ScalarFn&& scalar, VectorFn&& vector) {
  if (thread < split.aligned_begin - split.begin) scalar(split.begin + thread);
  const int64_t stride = static_cast<int64_t>(threads) * vec;
  for (int64_t e = split.aligned_begin + static_cast<int64_t>(thread) * vec; e < split.aligned_end;
       e += stride) {
    vector(e);
  }
  if (thread < split.end - split.aligned_end) scalar(split.aligned_end + thread);
}

inline bool is_vector_aligned(const void* address) {
  return reinterpret_cast<uintptr_t>(address) % kVectorBytes == 0;
}

}  // namespace kpg

namespace kpg {

// Throws std::invalid_argument naming the first row of `chunks` outside an arena of `numel`
// elements and `num_agents` agents, and, when `agent_chunks` is given, the first agent whose rows
// are not a range of the table.
void check_chunk_table(const char* op, const int64_t* chunks, int64_t num_chunks,
                       const int64_t* agent_chunks, int64_t num_agents, int64_t numel);

// Throws std::invalid_argument naming the first bad row of `ranges` (rows agent, begin, end): an
// agent outside [0, num_agents), a negative or reversed range, or two rows sharing elements.
void check_element_ranges(const int64_t* ranges, int64_t num_ranges, int64_t num_agents);

// Fills `chunks` (count_range_chunks rows) and `agent_chunks` (num_agents + 1 entries) from checked
// ranges; the rows come grouped by agent, as agent_chunks needs, each agent's in the order of its
// ranges.
void fill_range_chunk_table(const int64_t* ranges, int64_t num_ranges, int64_t num_agents,
                            int64_t chunk_elems, int64_t* chunks, int64_t* agent_chunks);

// How often a CUDA launch over the chunk table of `offsets` visits each element, every block and
// thread simulated with the kernels' own mapping; the coverage test expects all ones.
void count_element_visits(const int64_t* offsets, int64_t num_agents, int64_t chunk_elems,
                          int threads, int vec, int32_t* visits);

}  // namespace kpg
