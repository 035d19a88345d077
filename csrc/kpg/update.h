// Entry points of the fused optimizer update: one call updates every agent of an arena for one KPG
// level. Mode anticipate reads the base parameters and base state and writes the level's
// parameters to `anticipated`, changing nothing else: the optimizer-state reset of KPG without a
// copy. Mode commit updates parameters and state in place and advances each agent's step count.
#pragma once

#include <cstdint>

#include "kpg/optim_math.h"

namespace kpg {

// Flat buffers of one arena (one dtype, one device), all laid out agent by agent. The meaning of
// state[0..2] is the optimizer's: SGD (momentum_buffer), Adam (exp_avg, exp_avg_sq,
// max_exp_avg_sq), RMSprop (square_avg, momentum_buffer, grad_avg); unused ones are null.
struct UpdateBuffers {
  void* param;
  const void* grad;
  void* anticipated;      // written in anticipate mode only
  void* state[3];
  double* step;           // [agents] steps taken so far; commit adds one where not skipped
  const double* lr;       // [agents]
  const double* grad_scale;  // [agents] gradient multiplier (clipping), or null for 1
  const uint8_t* skip;    // [agents] nonzero: leave the agent as it is, or null
  const int64_t* chunks;  // [num_chunks, kChunkColumns], see launch_plan.h
  int64_t num_chunks;
  int64_t num_agents;
  int64_t numel;          // elements of every arena buffer
  int dtype;              // DType code
  bool commit;
};

void sgd_update_cpu(const UpdateBuffers& buffers, const SGDHyper& hyper);
void adam_update_cpu(const UpdateBuffers& buffers, const AdamHyper& hyper);
void rmsprop_update_cpu(const UpdateBuffers& buffers, const RMSpropHyper& hyper);

#if defined(KPG_WITH_CUDA)
// Launch on `stream` (a cudaStream_t) of CUDA device `device`; no synchronization, no allocation.
void sgd_update_cuda(const UpdateBuffers& buffers, const SGDHyper& hyper, int device, void* stream);
void adam_update_cuda(const UpdateBuffers& buffers, const AdamHyper& hyper, int device, void* stream);
void rmsprop_update_cuda(const UpdateBuffers& buffers, const RMSpropHyper& hyper, int device,
                         void* stream);
#endif

// The step count after a commit, shared by both paths.
KPG_HD void advance_agent_step(double* step, const uint8_t* skip, int64_t agent) {
  if (skip == nullptr || skip[agent] == 0) step[agent] += 1.0;
}

}  // namespace kpg
