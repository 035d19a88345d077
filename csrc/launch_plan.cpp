// Host-side use of the launch mapping (kpg/launch_plan.h): chunk tables over arbitrary element
// ranges, table checks, and the simulation of a whole CUDA launch that lets CPU tests check the
// kernels' indexing.
#include "kpg/launch_plan.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace kpg {

void check_chunk_table(const char* op, const int64_t* chunks, int64_t num_chunks,
                       const int64_t* agent_chunks, int64_t num_agents, int64_t numel) {
  for (int64_t c = 0; c < num_chunks; ++c) {
    const ChunkRange r = chunk_at(chunks, c);
    if (!chunk_in_bounds(r, num_agents, numel)) {
      throw std::invalid_argument(
          std::string(op) + ": chunk row " + std::to_string(c) + " (agent " +
          std::to_string(r.agent) + ", elements " + std::to_string(r.begin) + ".." +
          std::to_string(r.end) + ") lies outside this arena of " + std::to_string(num_agents) +
          " agents and " + std::to_string(numel) +
          " elements; build the table from this arena's offsets with chunk_table");
    }
  }
  // Two rows sharing an element would update it twice (on CUDA, two blocks would race on it).
  std::vector<std::pair<int64_t, int64_t>> begin_and_row;
  begin_and_row.reserve(static_cast<size_t>(num_chunks));
  for (int64_t c = 0; c < num_chunks; ++c) {
    const ChunkRange r = chunk_at(chunks, c);
    if (r.begin < r.end) begin_and_row.emplace_back(r.begin, c);
  }
  // chunk_table's rows come sorted; range_chunk_table's are grouped by agent.
  if (!std::is_sorted(begin_and_row.begin(), begin_and_row.end())) {
    std::sort(begin_and_row.begin(), begin_and_row.end());
  }
  for (size_t i = 1; i < begin_and_row.size(); ++i) {
    const int64_t previous = begin_and_row[i - 1].second, row = begin_and_row[i].second;
    if (begin_and_row[i].first < chunk_at(chunks, previous).end) {
      throw std::invalid_argument(
          std::string(op) + ": chunk rows " + std::to_string(previous) + " and " +
          std::to_string(row) + " share elements from " + std::to_string(begin_and_row[i].first) +
          "; an element in two rows would be updated twice. Every element belongs to at most one "
          "row: build the table with chunk_table or range_chunk_table");
    }
  }
  if (agent_chunks == nullptr) return;
  for (int64_t a = 0; a < num_agents; ++a) {
    if (agent_chunks[a] < 0 || agent_chunks[a] > agent_chunks[a + 1] ||
        agent_chunks[a + 1] > num_chunks) {
      throw std::invalid_argument(
          std::string(op) + ": agent_chunks of agent " + std::to_string(a) +
          " is not a range of the " + std::to_string(num_chunks) +
          "-row chunk table; pass the agent_chunks that chunk_table returned with it");
    }
  }
}

void check_element_ranges(const int64_t* ranges, int64_t num_ranges, int64_t num_agents) {
  std::vector<std::pair<int64_t, int64_t>> begin_and_row;
  begin_and_row.reserve(static_cast<size_t>(num_ranges));
  for (int64_t r = 0; r < num_ranges; ++r) {
    const ChunkRange range = chunk_at(ranges, r);
    if (range.agent < 0 || range.agent >= num_agents || range.begin < 0 ||
        range.begin > range.end) {
      throw std::invalid_argument(
          "range_chunk_table: row " + std::to_string(r) + " (agent " + std::to_string(range.agent) +
          ", elements " + std::to_string(range.begin) + ".." + std::to_string(range.end) +
          ") needs 0 <= agent < " + std::to_string(num_agents) + " and 0 <= begin <= end");
    }
    begin_and_row.emplace_back(range.begin, r);
  }
  std::sort(begin_and_row.begin(), begin_and_row.end());
  // Sorted by begin, with no overlap so far, the last non-empty row reaches furthest.
  int64_t previous_row = -1;
  for (const auto& entry : begin_and_row) {
    const int64_t row = entry.second;
    const ChunkRange current = chunk_at(ranges, row);
    if (current.begin == current.end) continue;
    if (previous_row >= 0 && current.begin < chunk_at(ranges, previous_row).end) {
      throw std::invalid_argument("range_chunk_table: rows " + std::to_string(previous_row) +
                                  " and " + std::to_string(row) + " share elements from " +
                                  std::to_string(current.begin) +
                                  "; every element belongs to at most one range");
    }
    previous_row = row;
  }
}

void fill_range_chunk_table(const int64_t* ranges, int64_t num_ranges, int64_t num_agents,
                            int64_t chunk_elems, int64_t* chunks, int64_t* agent_chunks) {
  std::fill_n(agent_chunks, num_agents + 1, 0);
  for (int64_t r = 0; r < num_ranges; ++r) {
    const ChunkRange range = chunk_at(ranges, r);
    agent_chunks[range.agent + 1] += (range.end - range.begin + chunk_elems - 1) / chunk_elems;
  }
  for (int64_t a = 0; a < num_agents; ++a) agent_chunks[a + 1] += agent_chunks[a];
  std::vector<int64_t> next_row(agent_chunks, agent_chunks + num_agents);
  for (int64_t r = 0; r < num_ranges; ++r) {
    const ChunkRange range = chunk_at(ranges, r);
    for (int64_t begin = range.begin; begin < range.end; begin += chunk_elems) {
      int64_t* row = chunks + next_row[range.agent]++ * kChunkColumns;
      row[0] = range.agent;
      row[1] = begin;
      row[2] = std::min(begin + chunk_elems, range.end);
    }
  }
}

void count_element_visits(const int64_t* offsets, int64_t num_agents, int64_t chunk_elems,
                          int threads, int vec, int32_t* visits) {
  if (chunk_elems < 1 || threads < 1 || vec < 1 || vec > threads) {
    throw std::invalid_argument(
        "count_element_visits: need chunk_elems >= 1 and 1 <= vec <= threads, got chunk_elems=" +
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
