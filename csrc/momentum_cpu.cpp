// CPU path of momentum anticipation (kpg/momentum.h): chunks of the arena spread over the thread
// pool, a plain loop over each chunk's elements that the compiler vectorizes; record's per-chunk
// sums in double, then the per-agent finish shared with CUDA.
#include "kpg/launch_plan.h"
#include "kpg/momentum.h"
#include "kpg/thread_pool.h"

namespace kpg {
namespace {

template <typename T>
KPG_CPU_CLONES void predict_chunk(const MomentumBuffers& b, const ChunkRange& r) {
  const T* __restrict param = static_cast<const T*>(b.param);
  const T* __restrict latest = static_cast<const T*>(b.latest);
  T* __restrict anticipated = static_cast<T*>(b.anticipated);
  T* __restrict base = static_cast<T*>(b.base);
  const T gate = static_cast<T>(b.gate[r.agent]);
  for (int64_t i = r.begin; i < r.end; ++i) {
    momentum_predict_element(param[i], latest[i], gate, anticipated[i], base[i]);
  }
}

template <typename T>
KPG_CPU_CLONES void record_chunk(const MomentumBuffers& b, int64_t c, const ChunkRange& r) {
  const T* __restrict param = static_cast<const T*>(b.param);
  const T* __restrict base = static_cast<const T*>(b.base);
  T* __restrict latest = static_cast<T*>(b.latest);
  // Four partial sums break the serial dependency so the loop vectorizes (as norms_cpu.cpp).
  double dot[4] = {0.0, 0.0, 0.0, 0.0};
  double square[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t i = r.begin;
  for (; i + 4 <= r.end; i += 4) {
    for (int lane = 0; lane < 4; ++lane) {
      momentum_record_element(param[i + lane], base[i + lane], latest[i + lane], dot[lane],
                              square[lane]);
    }
  }
  for (; i < r.end; ++i) momentum_record_element(param[i], base[i], latest[i], dot[0], square[0]);
  b.chunk_sums[2 * c] = (dot[0] + dot[1]) + (dot[2] + dot[3]);
  b.chunk_sums[2 * c + 1] = (square[0] + square[1]) + (square[2] + square[3]);
}

}  // namespace

void momentum_predict_cpu(const MomentumBuffers& b) {
  dispatch_dtype(b.dtype, "momentum_predict", [&](auto type_tag) {
    using T = decltype(type_tag);
    auto item = [&](int64_t c) { predict_chunk<T>(b, chunk_at(b.chunks, c)); };
    parallel_for(b.num_chunks, item);
  });
}

void momentum_record_cpu(const MomentumBuffers& b) {
  dispatch_dtype(b.dtype, "momentum_record", [&](auto type_tag) {
    using T = decltype(type_tag);
    auto item = [&](int64_t c) { record_chunk<T>(b, c, chunk_at(b.chunks, c)); };
    parallel_for(b.num_chunks, item);
  });
  for (int64_t a = 0; a < b.num_agents; ++a) finalize_agent_gate_host(b, a);
}

}  // namespace kpg
