// CUDA path of momentum anticipation (kpg/momentum.h): one block per chunk of the arena (the
// mapping of launch_plan.h), 16-byte vector loads and stores where every base address allows them;
// record's per-chunk sums in double in a fixed tree order, then one warp per agent adds its chunks'
// sums in the order norms.h fixes (as the CPU does) and writes the gate. On the caller's stream,
// without synchronizing: the gate stays on the device.
#include "kpg/cuda_support.cuh"
#include "kpg/launch_plan.h"
#include "kpg/momentum.h"

namespace kpg {
namespace {

template <typename T, int V>
__global__ void __launch_bounds__(kCudaThreadsPerBlock) predict_kernel(const MomentumBuffers b) {
  const ChunkRange r = chunk_at(b.chunks, blockIdx.x);
  if (!chunk_in_bounds(r, b.num_agents, b.numel)) return;
  const T* param = static_cast<const T*>(b.param);
  const T* latest = static_cast<const T*>(b.latest);
  T* anticipated = static_cast<T*>(b.anticipated);
  T* base = static_cast<T*>(b.base);
  const T gate = static_cast<T>(b.gate[r.agent]);
  for_each_thread_element(
      split_chunk(r.begin, r.end, V), V, static_cast<int>(threadIdx.x),
      static_cast<int>(blockDim.x),
      [&](int64_t e) {
        momentum_predict_element(param[e], latest[e], gate, anticipated[e], base[e]);
      },
      [&](int64_t e) {
        const Pack<T, V> p = load_pack<V>(param, e);
        const Pack<T, V> u = load_pack<V>(latest, e);
        Pack<T, V> a;
        Pack<T, V> kept;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          momentum_predict_element(p.lane[i], u.lane[i], gate, a.lane[i], kept.lane[i]);
        }
        store_pack<V>(anticipated, e, a);
        store_pack<V>(base, e, kept);
      });
}

// Sums of two values over the block, in a fixed order; the totals are on thread 0.
__device__ __forceinline__ void block_sum_pair(double& first, double& second) {
  __shared__ double warp_sums[2][kCudaThreadsPerBlock / 32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset /= 2) {
    first += __shfl_down_sync(0xffffffffu, first, offset);
    second += __shfl_down_sync(0xffffffffu, second, offset);
  }
  if (lane == 0) {
    warp_sums[0][warp] = first;
    warp_sums[1][warp] = second;
  }
  __syncthreads();
  const bool holds = threadIdx.x < blockDim.x / 32;
  first = holds ? warp_sums[0][lane] : 0.0;
  second = holds ? warp_sums[1][lane] : 0.0;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset /= 2) {
      first += __shfl_down_sync(0xffffffffu, first, offset);
      second += __shfl_down_sync(0xffffffffu, second, offset);
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kCudaThreadsPerBlock) record_kernel(const MomentumBuffers b) {
  const ChunkRange r = chunk_at(b.chunks, blockIdx.x);
  if (!chunk_in_bounds(r, b.num_agents, b.numel)) {
    if (threadIdx.x == 0) {
      b.chunk_sums[2 * blockIdx.x] = 0.0;
      b.chunk_sums[2 * blockIdx.x + 1] = 0.0;
    }
    return;
  }
  const T* param = static_cast<const T*>(b.param);
  const T* base = static_cast<const T*>(b.base);
  T* latest = static_cast<T*>(b.latest);
  double dot = 0.0;
  double square = 0.0;
  for_each_thread_element(
      split_chunk(r.begin, r.end, V), V, static_cast<int>(threadIdx.x),
      static_cast<int>(blockDim.x),
      [&](int64_t e) { momentum_record_element(param[e], base[e], latest[e], dot, square); },
      [&](int64_t e) {
        const Pack<T, V> p = load_pack<V>(param, e);
        const Pack<T, V> kept = load_pack<V>(base, e);
        Pack<T, V> u = load_pack<V>(latest, e);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          momentum_record_element(p.lane[i], kept.lane[i], u.lane[i], dot, square);
        }
        store_pack<V>(latest, e, u);
      });
  block_sum_pair(dot, square);
  if (threadIdx.x == 0) {
    b.chunk_sums[2 * blockIdx.x] = dot;
    b.chunk_sums[2 * blockIdx.x + 1] = square;
  }
}

__global__ void __launch_bounds__(kNormLanes* kNormAgentsPerBlock)
    finalize_gates_kernel(const MomentumBuffers b) {
  const NormLane where = norm_lane_of(blockIdx.x, static_cast<int>(threadIdx.x));
  // A warp's lanes share the agent, so a warp leaves whole and the shuffles below see all 32 lanes.
  if (where.agent >= b.num_agents) return;
  double dot = 0.0;
  double square = 0.0;
  momentum_lane_sums(b, where.agent, where.lane, dot, square);
  for (int offset = kNormLanes / 2; offset > 0; offset /= 2) {
    dot += __shfl_down_sync(0xffffffffu, dot, offset);
    square += __shfl_down_sync(0xffffffffu, square, offset);
  }
  if (where.lane == 0) write_agent_gate(b, where.agent, dot, square);
}

bool all_bases_vector_aligned(const MomentumBuffers& b, bool predict) {
  return is_vector_aligned(b.param) && is_vector_aligned(b.latest) && is_vector_aligned(b.base) &&
         (!predict || is_vector_aligned(b.anticipated));
}

}  // namespace

void momentum_predict_cuda(const MomentumBuffers& b, int device, void* stream) {
  const char* op = "momentum_predict";
  CudaDeviceGuard guard(device, op);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  if (b.num_chunks == 0) return;
  const unsigned int blocks = grid_size(b.num_chunks, op);
  dispatch_dtype(b.dtype, op, [&](auto type_tag) {
    using T = decltype(type_tag);
    constexpr int kVec = kVectorBytes / static_cast<int>(sizeof(T));
    if (all_bases_vector_aligned(b, true)) {
      predict_kernel<T, kVec><<<blocks, kCudaThreadsPerBlock, 0, cuda_stream>>>(b);
    } else {
      predict_kernel<T, 1><<<blocks, kCudaThreadsPerBlock, 0, cuda_stream>>>(b);
    }
    check_cuda(cudaGetLastError(), op);
  });
}

void momentum_record_cuda(const MomentumBuffers& b, int device, void* stream) {
  const char* op = "momentum_record";
  CudaDeviceGuard guard(device, op);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  dispatch_dtype(b.dtype, op, [&](auto type_tag) {
    using T = decltype(type_tag);
    constexpr int kVec = kVectorBytes / static_cast<int>(sizeof(T));
    if (b.num_chunks > 0) {
      const unsigned int blocks = grid_size(b.num_chunks, op);
      if (all_bases_vector_aligned(b, false)) {
        record_kernel<T, kVec><<<blocks, kCudaThreadsPerBlock, 0, cuda_stream>>>(b);
      } else {
        record_kernel<T, 1><<<blocks, kCudaThreadsPerBlock, 0, cuda_stream>>>(b);
      }
      check_cuda(cudaGetLastError(), op);
    }
  });
  if (b.num_agents > 0) {
    const unsigned int blocks = grid_size(norm_finish_blocks(b.num_agents), op);
    finalize_gates_kernel<<<blocks, kNormLanes * kNormAgentsPerBlock, 0, cuda_stream>>>(b);
    check_cuda(cudaGetLastError(), op);
  }
}

}  // namespace kpg
