// Entry points of the per-agent gradient-norm reduction that feeds per-agent clipping and the
// non-finite flags: a sum of squares per chunk (in parallel), then one pass per agent over its
// chunks in table order, so the result does not depend on the thread count.
#pragma once

#include <cmath>
#include <cstdint>

#include "kpg/common.h"

namespace kpg {

struct NormBuffers {
  const void* grad;
  const int64_t* chunks;        // [num_chunks, kChunkColumns]
  const int64_t* agent_chunks;  // [num_agents + 1]
  int64_t num_chunks;
  int64_t num_agents;
  int64_t numel;                // elements of grad
  double* chunk_sq;             // [num_chunks] workspace
  const double* max_norm;       // [agents] clipping threshold, or null for no clipping
  double* norm;                 // [agents] out: 2-norm of the agent's gradient
  double* grad_scale;           // [agents] out: min(1, max_norm / (norm + 1e-6)); 1 without clipping
  uint8_t* nonfinite;           // [agents] out: 1 where the norm is not finite
  int dtype;
};

void agent_grad_norms_cpu(const NormBuffers& buffers);
#if defined(KPG_WITH_CUDA)
void agent_grad_norms_cuda(const NormBuffers& buffers, int device, void* stream);
#endif

// torch.nn.utils.clip_grad_norm_'s coefficient, clamped like torch.clamp (NaN stays NaN).
KPG_HD void finalize_agent_norm(const NormBuffers& b, int64_t agent) {
  double sum_sq = 0.0;
  // Clamped to the table: on CUDA a malformed agent_chunks is not checked on the host.
  const int64_t first = b.agent_chunks[agent] > 0 ? b.agent_chunks[agent] : 0;
  const int64_t last = b.agent_chunks[agent + 1] < b.num_chunks ? b.agent_chunks[agent + 1] : b.num_chunks;
  for (int64_t c = first; c < last; ++c) sum_sq += b.chunk_sq[c];
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

}  // namespace kpg
