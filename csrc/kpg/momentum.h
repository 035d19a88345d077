// Entry points of momentum-extrapolated anticipation (KPGOptimizer(anticipation="momentum"),
// kpg/anticipation.py): the prediction before the last level and the bookkeeping after its commit,
// each one pass over the arena.
//
//   predict: anticipated = param + gate[agent] * latest, base = param
//   record:  latest = param - base (the committed update u1; the old latest was u2), and per agent
//            the new update's squared norm and the gate of the next step, clip(cos(u1, u2), 0, 1)
//
// u2 enters the rule only through the gate, so it is never stored: record reads the old latest
// (u2) element by element, adds it into the dot product and overwrites it with u1 in the same
// pass. The per-element math below is shared by the CPU and CUDA paths; the per-agent sums follow
// the fixed order of the gradient norms (norms.h): a sum per chunk, then per agent a lane-strided
// sum of its chunks' sums and a fixed tree over the lanes.
#pragma once

#include <cmath>
#include <cstdint>

#include "kpg/common.h"
#include "kpg/norms.h"

namespace kpg {

struct MomentumBuffers {
  void* param = nullptr;
  void* latest = nullptr;        // u1; record overwrites it with the new update
  void* base = nullptr;          // predict writes the base parameters here, record reads them
  void* anticipated = nullptr;   // predict's output
  double* gate = nullptr;        // [agents] predict reads it, record writes the next step's
  double* latest_sq = nullptr;   // [agents] |u1|^2; record reads it (as |u2|^2) and writes |u1|^2
  double* chunk_sums = nullptr;  // [num_chunks, 2] workspace: dot(u1, u2), |u1|^2 per chunk
  const int64_t* chunks = nullptr;        // [num_chunks, kChunkColumns], see launch_plan.h
  const int64_t* agent_chunks = nullptr;  // [num_agents + 1] (record only)
  int64_t num_chunks = 0;
  int64_t num_agents = 0;
  int64_t numel = 0;
  int dtype = 0;
};

void momentum_predict_cpu(const MomentumBuffers& buffers);
void momentum_record_cpu(const MomentumBuffers& buffers);
#if defined(KPG_WITH_CUDA)
// Launch on `stream` (a cudaStream_t) of CUDA device `device`; no synchronization, no allocation.
void momentum_predict_cuda(const MomentumBuffers& buffers, int device, void* stream);
void momentum_record_cuda(const MomentumBuffers& buffers, int device, void* stream);
#endif

// The prediction of one element. The gate is rounded to T first and the product added
// separately (no FMA, common.h), as torch.addcmul(param, gate.to(T), latest) rounds.
template <typename T>
KPG_HD void momentum_predict_element(const T& param, const T& latest, T gate, T& anticipated,
                                     T& base) {
  anticipated = param + gate * latest;
  base = param;
}

// The bookkeeping of one element: the new update, and its terms of dot(u1, u2) and |u1|^2 in
// double.
template <typename T>
KPG_HD void momentum_record_element(const T& param, const T& base, T& latest, double& dot,
                                    double& square) {
  const T update = param - base;
  const double u1 = static_cast<double>(update);
  dot += u1 * static_cast<double>(latest);
  square += u1 * u1;
  latest = update;
}

// clip(cos(u1, u2), 0, 1), and 0 while either update is zero (no history yet) or the product of
// the squared norms is not a positive number; NaN stays NaN as in torch.clamp.
KPG_HD double momentum_gate(double dot, double latest_sq, double previous_sq) {
  const double product = latest_sq * previous_sq;
  if (!(product > 0.0)) return 0.0;
  const double cosine = dot / ::sqrt(product);
  return cosine < 0.0 ? 0.0 : (cosine > 1.0 ? 1.0 : cosine);
}

// Lane `lane` of `agent`'s finish (norms.h's order): its share of the agent's chunk sums.
KPG_HD void momentum_lane_sums(const MomentumBuffers& b, int64_t agent, int lane, double& dot,
                               double& square) {
  const int64_t first = b.agent_chunks[agent] > 0 ? b.agent_chunks[agent] : 0;
  const int64_t last =
      b.agent_chunks[agent + 1] < b.num_chunks ? b.agent_chunks[agent + 1] : b.num_chunks;
  dot = 0.0;
  square = 0.0;
  for (int64_t c = first + lane; c < last; c += kNormLanes) {
    dot += b.chunk_sums[2 * c];
    square += b.chunk_sums[2 * c + 1];
  }
}

KPG_HD void write_agent_gate(const MomentumBuffers& b, int64_t agent, double dot, double square) {
  b.gate[agent] = momentum_gate(dot, square, b.latest_sq[agent]);
  b.latest_sq[agent] = square;
}

// The host's run of one agent's finish warp: the lanes' partials, then the shuffle tree on lane 0.
inline void finalize_agent_gate_host(const MomentumBuffers& b, int64_t agent) {
  double dot[kNormLanes];
  double square[kNormLanes];
  for (int lane = 0; lane < kNormLanes; ++lane)
    momentum_lane_sums(b, agent, lane, dot[lane], square[lane]);
  for (int offset = kNormLanes / 2; offset > 0; offset /= 2) {
    for (int lane = 0; lane < offset; ++lane) {
      dot[lane] += dot[lane + offset];
      square[lane] += square[lane + offset];
    }
  }
  write_agent_gate(b, agent, dot[0], square[0]);
}

}  // namespace kpg
