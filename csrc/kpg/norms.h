// Entry points of the per-agent gradient-norm reduction that feeds per-agent clipping and the
// non-finite flags: a sum of squares per chunk (in parallel), then per agent a fixed-order sum of
// its chunks' sums, so the result does not depend on the thread count.
#pragma once

#include <cmath>
#include <cstdint>

#include "kpg/common.h"

namespace kpg {

struct NormBuffers {
  const void* grad = nullptr;
  const int64_t* chunks = nullptr;        // [num_chunks, kChunkColumns]
  const int64_t* agent_chunks = nullptr;  // [num_agents + 1]
  int64_t num_chunks = 0;
  int64_t num_agents = 0;
  int64_t numel = 0;                 // elements of grad
  double* chunk_sq = nullptr;        // [num_chunks] workspace
  const double* max_norm = nullptr;  // [agents] clipping threshold, or null for no clipping
  double* norm = nullptr;            // [agents] out: 2-norm of the agent's gradient
  double* grad_scale =
      nullptr;  // [agents] out: min(1, max_norm / (norm + 1e-6)); 1 without clipping
  uint8_t* nonfinite = nullptr;  // [agents] out: 1 where the norm is not finite
  int dtype = 0;                 // DType code of grad
};

void agent_grad_norms_cpu(const NormBuffers& buffers);
#if defined(KPG_WITH_CUDA)
void agent_grad_norms_cuda(const NormBuffers& buffers, int device, void* stream);
#endif

// The per-agent finish, the same sums in the same order on the CPU and on CUDA: a CUDA warp per
// agent (kNormLanes lanes, kNormAgentsPerBlock agents per block); lane l adds the agent's chunk
// sums l, l + kNormLanes, ... in table order, then the lanes' partials are added in a fixed tree
// (offsets 16, 8, 4, 2, 1, as warp shuffles do). Serial loads per agent drop from its chunk count
// to a 32nd of it.
constexpr int kNormLanes = 32;
constexpr int kNormAgentsPerBlock = 8;

struct NormLane {
  int64_t agent;
  int lane;
};

KPG_HD NormLane norm_lane_of(int64_t block, int thread) {
  return {block * kNormAgentsPerBlock + thread / kNormLanes, thread % kNormLanes};
}

KPG_HD int64_t norm_finish_blocks(int64_t num_agents) {
  return (num_agents + kNormAgentsPerBlock - 1) / kNormAgentsPerBlock;
}

// Rows first..last - 1 of the chunk table belong to `agent`; clamped to the table: on CUDA a
// malformed agent_chunks is not checked on the host.
KPG_HD void agent_chunk_rows(const NormBuffers& b, int64_t agent, int64_t& first, int64_t& last) {
  first = b.agent_chunks[agent] > 0 ? b.agent_chunks[agent] : 0;
  last = b.agent_chunks[agent + 1] < b.num_chunks ? b.agent_chunks[agent + 1] : b.num_chunks;
}

// Calls visit(row) for each chunk row that lane `lane` of `agent`'s warp adds, in order.
template <typename Visit>
KPG_HD void for_each_lane_row(const NormBuffers& b, int64_t agent, int lane, Visit&& visit) {
  int64_t first = 0, last = 0;
  agent_chunk_rows(b, agent, first, last);
  for (int64_t c = first + lane; c < last; c += kNormLanes) visit(c);
}

KPG_HD double lane_sum_squares(const NormBuffers& b, int64_t agent, int lane) {
  double sum = 0.0;
  for_each_lane_row(b, agent, lane, [&](int64_t c) { sum += b.chunk_sq[c]; });
  return sum;
}

// torch.nn.utils.clip_grad_norm_'s coefficient, clamped like torch.clamp (NaN stays NaN).
KPG_HD void write_agent_norm(const NormBuffers& b, int64_t agent, double sum_sq) {
  const double norm = ::sqrt(sum_sq);
  b.norm[agent] = norm;
  b.nonfinite[agent] = !(norm - norm == 0.0);
  double scale = 1.0;
  if (b.max_norm != nullptr) {
    const double coefficient = b.max_norm[agent] / (norm + 1e-6);
    scale = coefficient > 1.0 ? 1.0 : coefficient;
  }
  b.grad_scale[agent] = scale;
}

// The host's run of one agent's warp: the lanes' partials, then the shuffle tree on lane 0.
inline void finalize_agent_norm_host(const NormBuffers& b, int64_t agent) {
  double partial[kNormLanes];
  for (int lane = 0; lane < kNormLanes; ++lane) partial[lane] = lane_sum_squares(b, agent, lane);
  for (int offset = kNormLanes / 2; offset > 0; offset /= 2) {
    for (int lane = 0; lane < offset; ++lane) partial[lane] += partial[lane + offset];
  }
  write_agent_norm(b, agent, partial[0]);
}

}  // namespace kpg
