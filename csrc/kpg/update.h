// Entry points of the fused optimizer update: one call updates every agent of an arena for one KPG
// level. Mode anticipate reads the base parameters and base state and writes the level's
// parameters to `anticipated`, changing nothing else: the optimizer-state reset of KPG without a
// copy. Mode commit updates parameters and state in place, advances each agent's step count and
// scalar state, and marks the state tensors its row keeps as live. Mode probe computes what commit
// would write, with the same per-element math, writes none of it, and flags the agents for which a
// new parameter or state value would be inf or NaN (NOTE [Probe before commit]).
//
// NOTE [Probe before commit]: nonfinite="raise" promises that no step leaves a non-finite parameter
// or state value, even where every loss and gradient was finite (an lr or eps that overflows). The
// probe answers "would this commit make one?" before anything is written, so a refused step changes
// nothing and needs no backup: it reads what the commit reads and writes one flag per agent.
#pragma once

#include <cfloat>
#include <cstdint>

#include "kpg/optimizers.h"

namespace kpg {

enum class UpdateMode : int { Anticipate = 0, Commit = 1, Probe = 2 };

// Flat buffers of one arena (one dtype, one device), all laid out agent by agent. state[s] is the
// optimizer's state tensor s (its traits' kStates order); unused ones are null.
struct UpdateBuffers {
  void* param = nullptr;
  const void* grad = nullptr;
  void* anticipated = nullptr;  // written in anticipate mode only
  void* state[kMaxStates] = {};
  // [agents] each: scalar state s (its traits' kScalarStates order) of dtype scalar_dtype, read and
  // advanced by commit; unused ones are null (NOTE [Scalar state] in optimizers.h).
  void* scalars[kMaxScalarStates] = {};
  int scalar_dtype = 0;           // DType code of the scalar state: torch's scalar dtype
  double* step = nullptr;         // [agents] steps taken so far; commit adds one where not skipped
  const double* lr = nullptr;     // [agents]
  const double* hyper = nullptr;  // [agents, row width] (NOTE [Hyperparameter rows])
  uint8_t* live = nullptr;        // [agents, kMaxStates] 1 where state s holds values; commit sets
  const double* grad_scale = nullptr;  // [agents] gradient multiplier (clipping), or null for 1
  const uint8_t* skip = nullptr;       // [agents] nonzero: leave the agent as it is, or null
  uint8_t* nonfinite = nullptr;     // probe mode: [agents] set to 1 where a new value is not finite
  const int64_t* chunks = nullptr;  // [num_chunks, kChunkColumns], see launch_plan.h
  int64_t num_chunks = 0;
  int64_t num_agents = 0;
  int64_t numel = 0;  // elements of every arena buffer
  int dtype = 0;      // DType code
  UpdateMode mode = UpdateMode::Anticipate;
};

// Checks on the host that every agent's row finds the state tensors it needs (CPU path).
void check_update_buffers(int family, const UpdateBuffers& buffers, const char* op);

// `op` names the operation in errors (adam_commit).
void update_cpu(int family, const UpdateBuffers& buffers, const char* op);

#if defined(KPG_WITH_CUDA)
// Launch on `stream` (a cudaStream_t) of CUDA device `device`; no synchronization, no allocation.
void update_cuda(int family, const UpdateBuffers& buffers, int device, void* stream,
                 const char* op);
#endif

// What both paths share per agent.
KPG_HD bool agent_skipped(const UpdateBuffers& b, int64_t agent) {
  return b.skip != nullptr && b.skip[agent] != 0;
}

template <typename Traits>
KPG_HD const double* agent_row(const UpdateBuffers& b, int64_t agent) {
  return b.hyper + agent * Traits::kRowWidth;
}

// The agent's scalar state advanced by this step, in its type S, returned as doubles.
template <typename Traits, typename S>
KPG_HD void advance_agent_scalars(const UpdateBuffers& b, int64_t agent, double step, double* out) {
  S scalars[kMaxScalarStates] = {};
  for (int s = 0; s < kNumScalarStates<Traits>; ++s) {
    scalars[s] = static_cast<const S*>(b.scalars[s])[agent];
  }
  Traits::advance_scalars(agent_row<Traits>(b, agent), step, scalars);
  for (int s = 0; s < kNumScalarStates<Traits>; ++s) out[s] = static_cast<double>(scalars[s]);
}

template <typename Traits>
KPG_HD AgentScalars agent_scalars(const UpdateBuffers& b, int64_t agent) {
  AgentScalars a{
      b.lr[agent], b.step[agent] + 1.0, b.grad_scale != nullptr ? b.grad_scale[agent] : 1.0, {}};
  if constexpr (kNumScalarStates<Traits> > 0) {
    if (b.scalar_dtype == static_cast<int>(DType::Float64)) {
      advance_agent_scalars<Traits, double>(b, agent, a.step, a.scalars);
    } else {
      advance_agent_scalars<Traits, float>(b, agent, a.step, a.scalars);
    }
  }
  return a;
}

template <typename Traits>
KPG_HD RuntimeFlags agent_flags(const UpdateBuffers& b, int64_t agent) {
  RuntimeFlags f{};
  Traits::flags(agent_row<Traits>(b, agent), b.live + agent * kMaxStates, f.values);
  return f;
}

// Whether a value the update computed is a finite number: NaN fails the comparison. One comparison
// and a select, no branch, so that the CPU loops that OR it into an int still vectorize.
template <typename T>
KPG_HD bool is_finite_value(T x) {
  constexpr T kLargest = sizeof(T) == sizeof(float) ? T(FLT_MAX) : T(DBL_MAX);
  return (x < T(0) ? -x : x) <= kLargest;
}

// A skipped agent keeps its base parameters; in anticipate mode those are its level parameters.
template <typename T>
KPG_HD void keep_base_parameter(const UpdateBuffers& b, int64_t element) {
  static_cast<T*>(b.anticipated)[element] = static_cast<const T*>(b.param)[element];
}

// After a commit: the scalar state and the step count advance and the state tensors the row kept
// become live.
template <typename Traits>
KPG_HD void finish_agent(const UpdateBuffers& b, int64_t agent) {
  if (agent_skipped(b, agent)) return;
  if constexpr (kNumScalarStates<Traits> > 0) {
    const AgentScalars a = agent_scalars<Traits>(b, agent);
    for (int s = 0; s < kNumScalarStates<Traits>; ++s) {
      if (b.scalar_dtype == static_cast<int>(DType::Float64)) {
        static_cast<double*>(b.scalars[s])[agent] = a.scalars[s];
      } else {
        static_cast<float*>(b.scalars[s])[agent] = static_cast<float>(a.scalars[s]);
      }
    }
  }
  b.step[agent] += 1.0;
  const double* row = agent_row<Traits>(b, agent);
  for (int s = 0; s < Traits::kNumStates; ++s) {
    if (keeps_state<Traits>(row, s)) b.live[agent * kMaxStates + s] = 1;
  }
}

}  // namespace kpg
