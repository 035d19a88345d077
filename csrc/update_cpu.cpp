// CPU path of the fused optimizer update (kpg/update.h): chunks of the arena spread over the
// thread pool; inside a chunk a plain loop over elements that the compiler vectorizes, specialised
// on the chunk's agent's flags (its traits' Flag list, optimizers.h), which change which buffers
// are read and written.
#include <atomic>
#include <cstring>
#include <string>

#include "kpg/launch_plan.h"
#include "kpg/thread_pool.h"
#include "kpg/update.h"

namespace kpg {
namespace {

// Calls fn(StaticFlags<f[0], ..., f[N-1]>{}).
template <int N, bool... B, typename Fn>
void dispatch_flags(const bool* f, Fn&& fn) {
  if constexpr (sizeof...(B) == N) {
    fn(StaticFlags<B...>{});
  } else {
    dispatch_bool(f[sizeof...(B)],
                  [&](auto flag) { dispatch_flags<N, B..., decltype(flag)::value>(f, fn); });
  }
}

// Calls fn(std::integral_constant<UpdateMode, mode>{}).
template <typename Fn>
void dispatch_mode(UpdateMode mode, Fn&& fn) {
  switch (mode) {
    case UpdateMode::Anticipate:
      return fn(std::integral_constant<UpdateMode, UpdateMode::Anticipate>{});
    case UpdateMode::Commit:
      return fn(std::integral_constant<UpdateMode, UpdateMode::Commit>{});
    case UpdateMode::Probe:
      return fn(std::integral_constant<UpdateMode, UpdateMode::Probe>{});
  }
  throw std::invalid_argument("update: unknown mode " + std::to_string(static_cast<int>(mode)));
}

// Returns, in probe mode, whether a new value of the chunk is not finite (false otherwise).
template <typename Traits, typename T, UpdateMode kMode, typename F>
KPG_CPU_CLONES bool update_chunk(const UpdateBuffers& b,
                                 const typename Traits::template Coefficients<T>& c, F flags,
                                 const ChunkRange& r) {
  T* __restrict param = static_cast<T*>(b.param);
  const T* __restrict grad = static_cast<const T*>(b.grad);
  T* __restrict anticipated = static_cast<T*>(b.anticipated);
  T* __restrict state0 = static_cast<T*>(b.state[0]);
  T* __restrict state1 = static_cast<T*>(b.state[1]);
  T* __restrict state2 = static_cast<T*>(b.state[2]);
  constexpr int kStates = Traits::kNumStates;
  constexpr bool kUses0 = Traits::uses_state(0, F{});
  constexpr bool kUses1 = kStates > 1 && Traits::uses_state(1, F{});
  constexpr bool kUses2 = kStates > 2 && Traits::uses_state(2, F{});
  int nonfinite =
      0;  // an int OR without short-circuits keeps the probe loop branch-free (vectorized)
  for (int64_t i = r.begin; i < r.end; ++i) {
    T p = param[i];
    T s[kMaxStates] = {kUses0 ? state0[i] : T(0), kUses1 ? state1[i] : T(0),
                       kUses2 ? state2[i] : T(0)};
    Traits::element(p, grad[i], s, c, flags);
    if constexpr (kMode == UpdateMode::Commit) {
      param[i] = p;
      if constexpr (kUses0) state0[i] = s[0];
      if constexpr (kUses1) state1[i] = s[1];
      if constexpr (kUses2) state2[i] = s[2];
    } else if constexpr (kMode == UpdateMode::Anticipate) {
      anticipated[i] = p;
    } else {
      nonfinite |= !is_finite_value(p);
      if constexpr (kUses0) nonfinite |= !is_finite_value(s[0]);
      if constexpr (kUses1) nonfinite |= !is_finite_value(s[1]);
      if constexpr (kUses2) nonfinite |= !is_finite_value(s[2]);
    }
  }
  return nonfinite != 0;
}

template <typename Traits, typename T>
void update_chunk_of_agent(const UpdateBuffers& b, const ChunkRange& r) {
  if (agent_skipped(b, r.agent)) {
    if (b.mode == UpdateMode::Anticipate) {
      for (int64_t i = r.begin; i < r.end; ++i) keep_base_parameter<T>(b, i);
    }
    return;
  }
  const auto c = Traits::template coefficients<T>(agent_row<Traits>(b, r.agent),
                                                  agent_scalars<Traits>(b, r.agent));
  const RuntimeFlags f = agent_flags<Traits>(b, r.agent);
  dispatch_mode(b.mode, [&](auto mode) {
    dispatch_flags<Traits::kNumFlags>(f.values, [&](auto flags) {
      if (update_chunk<Traits, T, decltype(mode)::value>(b, c, flags, r)) {
        // Chunks of one agent run on several threads; each only ever sets the flag.
        std::atomic_ref<uint8_t>(b.nonfinite[r.agent]).store(1, std::memory_order_relaxed);
      }
    });
  });
}

}  // namespace

void check_update_buffers(int family, const UpdateBuffers& b, const char* op) {
  if (b.mode == UpdateMode::Probe && b.nonfinite == nullptr && b.num_agents > 0) {
    throw std::invalid_argument(std::string(op) + ": probe mode needs the nonfinite flags buffer");
  }
  if (b.numel == 0) return;  // empty buffers have no address and nothing to update
  dispatch_family(family, op, [&](auto traits) {
    using Traits = decltype(traits);
    for (int64_t a = 0; a < b.num_agents; ++a) {
      const double* row = agent_row<Traits>(b, a);
      for (int s = 0; s < Traits::kNumStates; ++s) {
        if (b.state[s] == nullptr && keeps_state<Traits>(row, s)) {
          throw std::invalid_argument(
              std::string(op) + ": these hyperparameters need the state buffer " +
              Traits::kStates[s] + " (agent " + std::to_string(a) + "'s row); pass it");
        }
      }
    }
  });
}

void update_cpu(int family, const UpdateBuffers& b, const char* op) {
  dispatch_family(family, op, [&](auto traits) {
    using Traits = decltype(traits);
    dispatch_dtype(b.dtype, op, [&](auto type_tag) {
      using T = decltype(type_tag);
      auto item = [&](int64_t c) { update_chunk_of_agent<Traits, T>(b, chunk_at(b.chunks, c)); };
      if (b.mode == UpdateMode::Probe && b.num_agents > 0)
        std::memset(b.nonfinite, 0, b.num_agents);
      parallel_for(b.num_chunks, item);
    });
    if (b.mode == UpdateMode::Commit) {
      for (int64_t a = 0; a < b.num_agents; ++a) finish_agent<Traits>(b, a);
    }
  });
}

}  // namespace kpg
