// Host-side use of the launch mapping (kpg/launch_plan.h): the simulation of a whole CUDA launch
// that lets CPU tests check the kernels' indexing.
#include "kpg/launch_plan.h"

#include <stdexcept>
#include <string>
#include <vector>

namespace kpg {

void check_chunk_table(const char* op, const int64_t* chunks, int64_t num_chunks,
                       const int64_t* agent_chunks, int64_t num_agents, int64_t numel) {
  for (int64_t c = 0; c < num_chunks; ++c) {
    const ChunkRange r = chunk_at(chunks, c);
    if (!chunk_in_bounds(r, num_agents, numel)) {
      throw std::invalid_argument(
          std::string(op) + ": chunk row " + std::to_string(c) + " (agent " + std::to_string(r.agent) +
          ", elements " + std::to_string(r.begin) + ".." + std::to_string(r.end) +
          ") lies outside this arena of " + std::to_string(num_agents) + " agents and " +
          std::to_string(numel) + " elements; build the table from this arena's offsets with chunk_table");
    }
  }
  if (agent_chunks == nullptr) return;
  for (int64_t a = 0; a < num_agents; ++a) {
    if (agent_chunks[a] < 0 || agent_chunks[a] > agent_chunks[a + 1] || agent_chunks[a + 1] > num_chunks) {
      throw std::invalid_argument(std::string(op) + ": agent_chunks of agent " + std::to_string(a) +
                                  " is not a range of the " + std::to_string(num_chunks) +
                                  "-row chunk table; pass the agent_chunks that chunk_table returned with it");
    }
  }
}

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
