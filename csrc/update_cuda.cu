// CUDA path of the fused optimizer update (kpg/update.h): one block per chunk of the arena (the
// mapping of launch_plan.h), the per-element update of the family's traits (optimizers.h), 16-byte
// vector loads and stores where every base address allows them, on the caller's stream, without
// synchronizing.
#include "kpg/cuda_support.cuh"
#include "kpg/launch_plan.h"
#include "kpg/update.h"

namespace kpg {
namespace {

// V consecutive elements from e: load what the agent's flags use, update, store (probe mode: store
// nothing). Returns, in probe mode, whether a new value is not finite (false otherwise).
template <typename Traits, typename T, int V>
__device__ __forceinline__ bool update_elements(const UpdateBuffers& b,
                                                const typename Traits::template Coefficients<T>& c,
                                                const RuntimeFlags& f, int64_t e) {
  Pack<T, V> p = load_pack<V>(static_cast<T*>(b.param), e);
  const Pack<T, V> g = load_pack<V>(static_cast<const T*>(b.grad), e);
  Pack<T, V> state[kMaxStates] = {};
#pragma unroll
  for (int s = 0; s < Traits::kNumStates; ++s) {
    if (Traits::uses_state(s, f)) state[s] = load_pack<V>(static_cast<T*>(b.state[s]), e);
  }
  bool finite = true;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    T lane_state[kMaxStates] = {state[0].lane[i], state[1].lane[i], state[2].lane[i]};
    Traits::element(p.lane[i], g.lane[i], lane_state, c, f);
    finite = finite && is_finite_value(p.lane[i]);
#pragma unroll
    for (int s = 0; s < kMaxStates; ++s) {
      state[s].lane[i] = lane_state[s];
      if (s < Traits::kNumStates && Traits::uses_state(s, f)) {
        finite = finite && is_finite_value(lane_state[s]);
      }
    }
  }
  if (b.mode == UpdateMode::Commit) {
    store_pack<V>(static_cast<T*>(b.param), e, p);
#pragma unroll
    for (int s = 0; s < Traits::kNumStates; ++s) {
      if (Traits::uses_state(s, f)) store_pack<V>(static_cast<T*>(b.state[s]), e, state[s]);
    }
  } else if (b.mode == UpdateMode::Anticipate) {
    store_pack<V>(static_cast<T*>(b.anticipated), e, p);
  }
  return b.mode == UpdateMode::Probe && !finite;
}

template <typename Traits, typename T>
struct AgentSetup {
  typename Traits::template Coefficients<T> coefficients;
  RuntimeFlags flags;
  bool runnable;  // false where the row needs a state buffer that was not passed
};

template <typename Traits, typename T, int V>
__global__ void __launch_bounds__(kCudaThreadsPerBlock) fused_update_kernel(const UpdateBuffers b) {
  const ChunkRange r = chunk_at(b.chunks, blockIdx.x);
  if (!chunk_in_bounds(r, b.num_agents, b.numel)) return;
  const ChunkSplit split = split_chunk(r.begin, r.end, V);
  const int thread = static_cast<int>(threadIdx.x);
  const int threads = static_cast<int>(blockDim.x);
  if (agent_skipped(b, r.agent)) {
    if (b.mode == UpdateMode::Anticipate) {
      const T* param = static_cast<const T*>(b.param);
      T* anticipated = static_cast<T*>(b.anticipated);
      for_each_thread_element(
          split, V, thread, threads, [&](int64_t e) { keep_base_parameter<T>(b, e); },
          [&](int64_t e) { store_pack<V>(anticipated, e, load_pack<V>(param, e)); });
    }
    return;
  }
  __shared__ AgentSetup<Traits, T> shared_setup;
  if (thread == 0) {
    const double* row = agent_row<Traits>(b, r.agent);
    AgentSetup<Traits, T> setup{
        Traits::template coefficients<T>(row, agent_scalars<Traits>(b, r.agent)),
        agent_flags<Traits>(b, r.agent), true};
    // A device-resident row cannot be checked on the host (check_update_buffers) without a
    // synchronization; a row that needs a missing buffer leaves its chunk untouched instead.
    for (int s = 0; s < Traits::kNumStates; ++s) {
      if (Traits::uses_state(s, setup.flags) && b.state[s] == nullptr) setup.runnable = false;
    }
    shared_setup = setup;
  }
  __syncthreads();
  const AgentSetup<Traits, T> setup = shared_setup;
  if (!setup.runnable) return;
  bool nonfinite = false;
  for_each_thread_element(
      split, V, thread, threads,
      [&](int64_t e) {
        nonfinite |= update_elements<Traits, T, 1>(b, setup.coefficients, setup.flags, e);
      },
      [&](int64_t e) {
        nonfinite |= update_elements<Traits, T, V>(b, setup.coefficients, setup.flags, e);
      });
  // The mode is the same for every block, so every thread of this one reaches the barrier.
  if (b.mode == UpdateMode::Probe && __syncthreads_or(nonfinite) && thread == 0) {
    b.nonfinite[r.agent] = 1;  // blocks of one agent only ever set the flag
  }
}

template <typename Traits>
__global__ void finish_agents_kernel(const UpdateBuffers b) {
  const int64_t agent = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (agent < b.num_agents) finish_agent<Traits>(b, agent);
}

bool all_bases_vector_aligned(const UpdateBuffers& b) {
  return is_vector_aligned(b.param) && is_vector_aligned(b.grad) &&
         is_vector_aligned(b.anticipated) && is_vector_aligned(b.state[0]) &&
         is_vector_aligned(b.state[1]) && is_vector_aligned(b.state[2]);
}

template <typename Traits>
void launch_update(const UpdateBuffers& b, int device, void* stream, const char* op) {
  CudaDeviceGuard guard(device, op);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  if (b.mode == UpdateMode::Probe && b.num_agents > 0) {
    check_cuda(cudaMemsetAsync(b.nonfinite, 0, b.num_agents, cuda_stream), op);
  }
  dispatch_dtype(b.dtype, op, [&](auto type_tag) {
    using T = decltype(type_tag);
    constexpr int kVec = kVectorBytes / static_cast<int>(sizeof(T));
    if (b.num_chunks > 0) {
      const unsigned int blocks = grid_size(b.num_chunks, op);
      if (all_bases_vector_aligned(b)) {
        fused_update_kernel<Traits, T, kVec><<<blocks, kCudaThreadsPerBlock, 0, cuda_stream>>>(b);
      } else {
        fused_update_kernel<Traits, T, 1><<<blocks, kCudaThreadsPerBlock, 0, cuda_stream>>>(b);
      }
      check_cuda(cudaGetLastError(), op);
    }
  });
  if (b.mode == UpdateMode::Commit && b.num_agents > 0) {
    const unsigned int blocks =
        grid_size((b.num_agents + kCudaThreadsPerBlock - 1) / kCudaThreadsPerBlock, op);
    finish_agents_kernel<Traits><<<blocks, kCudaThreadsPerBlock, 0, cuda_stream>>>(b);
    check_cuda(cudaGetLastError(), op);
  }
}

}  // namespace

void update_cuda(int family, const UpdateBuffers& b, int device, void* stream, const char* op) {
  dispatch_family(family, op,
                  [&](auto traits) { launch_update<decltype(traits)>(b, device, stream, op); });
}

}  // namespace kpg
