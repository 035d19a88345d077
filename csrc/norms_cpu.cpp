// CPU path of the per-agent gradient-norm reduction (kpg/norms.h): each chunk's sum of squares in
// double on the thread pool, then the per-agent finalization shared with CUDA.
#include "kpg/launch_plan.h"
#include "kpg/norms.h"
#include "kpg/thread_pool.h"

namespace kpg {
namespace {

template <typename T>
KPG_CPU_CLONES double chunk_sum_squares(const T* __restrict grad, const ChunkRange& r) {
  // Four partial sums break the serial dependency so the loop vectorizes.
  double partial[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t i = r.begin;
  for (; i + 4 <= r.end; i += 4) {
    for (int lane = 0; lane < 4; ++lane) {
      const double g = static_cast<double>(grad[i + lane]);
      partial[lane] += g * g;
    }
  }
  for (; i < r.end; ++i) {
    const double g = static_cast<double>(grad[i]);
    partial[0] += g * g;
  }
  return (partial[0] + partial[1]) + (partial[2] + partial[3]);
}

}  // namespace

void agent_grad_norms_cpu(const NormBuffers& b) {
  dispatch_dtype(b.dtype, "agent_grad_norms", [&](auto type_tag) {
    using T = decltype(type_tag);
    auto chunk_sum = [&](int64_t c) {
      b.chunk_sq[c] = chunk_sum_squares(static_cast<const T*>(b.grad), chunk_at(b.chunks, c));
    };
    parallel_for(b.num_chunks, chunk_sum);
  });
  for (int64_t a = 0; a < b.num_agents; ++a) finalize_agent_norm_host(b, a);
}

}  // namespace kpg
