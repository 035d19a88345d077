// CPU path of the fused optimizer update (kpg/update.h): chunks of the arena spread over the
// thread pool; inside a chunk a plain loop over elements that the compiler vectorizes, specialised
// on the flags that change which buffers are read and written.
#include <cstring>

#include "kpg/launch_plan.h"
#include "kpg/thread_pool.h"
#include "kpg/update.h"

namespace kpg {
namespace {

template <typename T>
T* buffer(void* base) {
  return static_cast<T*>(base);
}

double grad_scale_of(const UpdateBuffers& b, int64_t agent) {
  return b.grad_scale != nullptr ? b.grad_scale[agent] : 1.0;
}

// A skipped agent keeps its base parameters; in anticipate mode those are its level parameters.
template <typename T>
bool handle_skipped_agent(const UpdateBuffers& b, const ChunkRange& r) {
  if (b.skip == nullptr || b.skip[r.agent] == 0) return false;
  if (!b.commit) {
    std::memcpy(buffer<T>(b.anticipated) + r.begin, buffer<T>(b.param) + r.begin,
                sizeof(T) * static_cast<size_t>(r.end - r.begin));
  }
  return true;
}

template <typename ChunkFn>
void for_each_chunk(const UpdateBuffers& b, ChunkFn&& chunk_fn) {
  auto item = [&](int64_t c) { chunk_fn(chunk_at(b.chunks, c)); };
  parallel_for(b.num_chunks, item);
  if (b.commit) {
    for (int64_t a = 0; a < b.num_agents; ++a) advance_agent_step(b.step, b.skip, a);
  }
}

template <typename T, bool kCommit, bool kMaximize, bool kWeightDecay, bool kMomentum, bool kFirst,
          bool kNesterov>
KPG_CPU_CLONES void sgd_chunk(const UpdateBuffers& b, const SGDCoefficients<T>& c, const ChunkRange& r) {
  T* __restrict param = buffer<T>(b.param);
  const T* __restrict grad = static_cast<const T*>(b.grad);
  T* __restrict anticipated = buffer<T>(b.anticipated);
  T* __restrict momentum_buffer = buffer<T>(b.state[0]);
  for (int64_t i = r.begin; i < r.end; ++i) {
    T p = param[i];
    T buf = kMomentum && !kFirst ? momentum_buffer[i] : T(0);
    sgd_element(p, grad[i], buf, c, kMaximize, kWeightDecay, kMomentum, kFirst, kNesterov);
    if constexpr (kCommit) {
      param[i] = p;
      if constexpr (kMomentum) momentum_buffer[i] = buf;
    } else {
      anticipated[i] = p;
    }
  }
}

template <typename T, bool kCommit, bool kMaximize, bool kWeightDecay, bool kDecoupled, bool kAmsgrad>
KPG_CPU_CLONES void adam_chunk(const UpdateBuffers& b, const AdamCoefficients<T>& c, const ChunkRange& r) {
  T* __restrict param = buffer<T>(b.param);
  const T* __restrict grad = static_cast<const T*>(b.grad);
  T* __restrict anticipated = buffer<T>(b.anticipated);
  T* __restrict exp_avg = buffer<T>(b.state[0]);
  T* __restrict exp_avg_sq = buffer<T>(b.state[1]);
  T* __restrict max_exp_avg_sq = buffer<T>(b.state[2]);
  for (int64_t i = r.begin; i < r.end; ++i) {
    T p = param[i], m = exp_avg[i], v = exp_avg_sq[i];
    T v_max = kAmsgrad ? max_exp_avg_sq[i] : T(0);
    adam_element(p, grad[i], m, v, v_max, c, kMaximize, kWeightDecay, kDecoupled, kAmsgrad);
    if constexpr (kCommit) {
      param[i] = p;
      exp_avg[i] = m;
      exp_avg_sq[i] = v;
      if constexpr (kAmsgrad) max_exp_avg_sq[i] = v_max;
    } else {
      anticipated[i] = p;
    }
  }
}

template <typename T, bool kCommit, bool kMaximize, bool kWeightDecay, bool kCentered, bool kMomentum>
KPG_CPU_CLONES void rmsprop_chunk(const UpdateBuffers& b, const RMSpropCoefficients<T>& c, const ChunkRange& r) {
  T* __restrict param = buffer<T>(b.param);
  const T* __restrict grad = static_cast<const T*>(b.grad);
  T* __restrict anticipated = buffer<T>(b.anticipated);
  T* __restrict square_avg = buffer<T>(b.state[0]);
  T* __restrict momentum_buffer = buffer<T>(b.state[1]);
  T* __restrict grad_avg = buffer<T>(b.state[2]);
  for (int64_t i = r.begin; i < r.end; ++i) {
    T p = param[i], sq = square_avg[i];
    T buf = kMomentum ? momentum_buffer[i] : T(0);
    T g_avg = kCentered ? grad_avg[i] : T(0);
    rmsprop_element(p, grad[i], sq, buf, g_avg, c, kMaximize, kWeightDecay, kCentered, kMomentum);
    if constexpr (kCommit) {
      param[i] = p;
      square_avg[i] = sq;
      if constexpr (kMomentum) momentum_buffer[i] = buf;
      if constexpr (kCentered) grad_avg[i] = g_avg;
    } else {
      anticipated[i] = p;
    }
  }
}

}  // namespace

void sgd_update_cpu(const UpdateBuffers& b, const SGDHyper& h) {
  dispatch_dtype(b.dtype, "sgd_update", [&](auto type_tag) {
    using T = decltype(type_tag);
    for_each_chunk(b, [&](const ChunkRange& r) {
      if (handle_skipped_agent<T>(b, r)) return;
      const auto c = sgd_coefficients<T>(h, b.lr[r.agent], grad_scale_of(b, r.agent));
      dispatch_bool(b.commit, [&](auto commit) {
      dispatch_bool(h.maximize, [&](auto maximize) {
      dispatch_bool(h.weight_decay != 0.0, [&](auto weight_decay) {
      dispatch_bool(h.momentum != 0.0, [&](auto momentum) {
      dispatch_bool(b.step[r.agent] == 0.0, [&](auto first) {
      dispatch_bool(h.nesterov, [&](auto nesterov) {
        sgd_chunk<T, decltype(commit)::value, decltype(maximize)::value, decltype(weight_decay)::value, decltype(momentum)::value, decltype(first)::value, decltype(nesterov)::value>(b, c, r);
      }); }); }); }); }); });
    });
  });
}

void adam_update_cpu(const UpdateBuffers& b, const AdamHyper& h) {
  dispatch_dtype(b.dtype, "adam_update", [&](auto type_tag) {
    using T = decltype(type_tag);
    for_each_chunk(b, [&](const ChunkRange& r) {
      if (handle_skipped_agent<T>(b, r)) return;
      const auto c = adam_coefficients<T>(h, b.lr[r.agent], b.step[r.agent] + 1.0,
                                          grad_scale_of(b, r.agent));
      dispatch_bool(b.commit, [&](auto commit) {
      dispatch_bool(h.maximize, [&](auto maximize) {
      dispatch_bool(h.weight_decay != 0.0, [&](auto weight_decay) {
      dispatch_bool(h.decoupled_weight_decay, [&](auto decoupled) {
      dispatch_bool(h.amsgrad, [&](auto amsgrad) {
        adam_chunk<T, decltype(commit)::value, decltype(maximize)::value, decltype(weight_decay)::value, decltype(decoupled)::value, decltype(amsgrad)::value>(b, c, r);
      }); }); }); }); });
    });
  });
}

void rmsprop_update_cpu(const UpdateBuffers& b, const RMSpropHyper& h) {
  dispatch_dtype(b.dtype, "rmsprop_update", [&](auto type_tag) {
    using T = decltype(type_tag);
    for_each_chunk(b, [&](const ChunkRange& r) {
      if (handle_skipped_agent<T>(b, r)) return;
      const auto c = rmsprop_coefficients<T>(h, b.lr[r.agent], grad_scale_of(b, r.agent));
      dispatch_bool(b.commit, [&](auto commit) {
      dispatch_bool(h.maximize, [&](auto maximize) {
      dispatch_bool(h.weight_decay != 0.0, [&](auto weight_decay) {
      dispatch_bool(h.centered, [&](auto centered) {
      dispatch_bool(h.momentum > 0.0, [&](auto momentum) {
        rmsprop_chunk<T, decltype(commit)::value, decltype(maximize)::value, decltype(weight_decay)::value, decltype(centered)::value, decltype(momentum)::value>(b, c, r);
      }); }); }); }); });
    });
  });
}

}  // namespace kpg
