// Host-side use of the launch mapping (kpg/launch_plan.h): the simulation of a whole CUDA launch
// that lets CPU tests check the kernels' indexing.
#include "kpg/launch_plan.h"

#include <stdexcept>
#include <string>
#include <vector>

namespace kpg {

void count_element_visits(const int64_t* offsets, int64_t num_agents, int64_t chunk_elems,
                          int threads, int vec, int32_t* visits) {
  if (chunk_elems < 1 || threads < 1 || vec < 1 || vec > threads) {
    throw std::invalid_argument("count_element_visits: need chunk_elems >= 1 and 1 <= vec <= threads, got chunk_elems=" +
                                std::to_string(chunk_elems) + " threads=" + std::to_string(threads) +
                                " vec=" + std::to_string(vec));
  }
  const int64_t num_chunks = count_chunks(offsets, num_agents, chunk_elems);
  std::vector<int64_t> chunks(static_cast<size_t>(num_chunks * kChunkColumns));
  std::vector<int64_t> agent_chunks(static_cast<size_t>(num_agents + 1));
  fill_chunk_table(offsets, num_agents, chunk_elems, chunks.data(), agent_chunks.data());
  for (int64_t block = 0; block < num_chunks; ++block) {
    const ChunkRange r = chunk_at(chunks.data(), block);
    const ChunkSplit split = split_chunk(r.begin, r.end, vec);
    for (int thread = 0; thread < threads; ++thread) {
      for_each_thread_element(
          split, vec, thread, threads, [&](int64_t e) { ++visits[e]; },
          [&](int64_t e) {
            for (int lane = 0; lane < vec; ++lane) ++visits[e + lane];
          });
    }
  }
}

}  // namespace kpg
