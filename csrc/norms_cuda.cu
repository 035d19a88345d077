// CUDA path of the per-agent gradient-norm reduction (kpg/norms.h): one block per chunk sums the
// squares in double (deterministic tree order), then one warp per agent adds its chunks' sums in
// the order norms.h fixes (as the CPU does) and writes norm, clipping scale and the non-finite
// flag.
#include "kpg/cuda_support.cuh"
#include "kpg/launch_plan.h"
#include "kpg/norms.h"

namespace kpg {
namespace {

__device__ __forceinline__ double block_sum(double value) {
  __shared__ double warp_sums[kCudaThreadsPerBlock / 32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset /= 2)
    value += __shfl_down_sync(0xffffffffu, value, offset);
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  value = threadIdx.x < blockDim.x / 32 ? warp_sums[lane] : 0.0;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset /= 2)
      value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;
}

template <typename T, int V>
__global__ void __launch_bounds__(kCudaThreadsPerBlock)
    chunk_sum_squares_kernel(const NormBuffers b) {
  const ChunkRange r = chunk_at(b.chunks, blockIdx.x);
  if (!chunk_in_bounds(r, b.num_agents, b.numel)) {
    if (threadIdx.x == 0) b.chunk_sq[blockIdx.x] = 0.0;
    return;
  }
  const T* grad = static_cast<const T*>(b.grad);
  double sum = 0.0;
  for_each_thread_element(
      split_chunk(r.begin, r.end, V), V, static_cast<int>(threadIdx.x),
      static_cast<int>(blockDim.x),
      [&](int64_t e) {
        const double g = static_cast<double>(grad[e]);
        sum += g * g;
      },
      [&](int64_t e) {
        const Pack<T, V> pack = load_pack<V>(grad, e);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const double g = static_cast<double>(pack.lane[i]);
          sum += g * g;
        }
      });
  sum = block_sum(sum);
  if (threadIdx.x == 0) b.chunk_sq[blockIdx.x] = sum;
}

__global__ void __launch_bounds__(kNormLanes* kNormAgentsPerBlock)
    finalize_norms_kernel(const NormBuffers b) {
  const NormLane where = norm_lane_of(blockIdx.x, static_cast<int>(threadIdx.x));
  // A warp's lanes share the agent, so a warp leaves whole and the shuffles below see all 32 lanes.
  if (where.agent >= b.num_agents) return;
  double sum = lane_sum_squares(b, where.agent, where.lane);
  for (int offset = kNormLanes / 2; offset > 0; offset /= 2)
    sum += __shfl_down_sync(0xffffffffu, sum, offset);
  if (where.lane == 0) write_agent_norm(b, where.agent, sum);
}

}  // namespace

void agent_grad_norms_cuda(const NormBuffers& b, int device, void* stream) {
  const char* op = "agent_grad_norms";
  CudaDeviceGuard guard(device, op);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  dispatch_dtype(b.dtype, op, [&](auto type_tag) {
    using T = decltype(type_tag);
    constexpr int kVec = kVectorBytes / static_cast<int>(sizeof(T));
    if (b.num_chunks > 0) {
      const unsigned int blocks = grid_size(b.num_chunks, op);
      if (is_vector_aligned(b.grad)) {
        chunk_sum_squares_kernel<T, kVec><<<blocks, kCudaThreadsPerBlock, 0, cuda_stream>>>(b);
      } else {
        chunk_sum_squares_kernel<T, 1><<<blocks, kCudaThreadsPerBlock, 0, cuda_stream>>>(b);
      }
      check_cuda(cudaGetLastError(), op);
    }
  });
  if (b.num_agents > 0) {
    const unsigned int blocks = grid_size(norm_finish_blocks(b.num_agents), op);
    finalize_norms_kernel<<<blocks, kNormLanes * kNormAgentsPerBlock, 0, cuda_stream>>>(b);
    check_cuda(cudaGetLastError(), op);
  }
}

}  // namespace kpg
