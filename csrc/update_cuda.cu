// CUDA path of the fused optimizer update (kpg/update.h): one block per chunk of the arena (the
// mapping of launch_plan.h), the per-element math of optim_math.h, 16-byte vector loads and stores
// where every base address allows them, on the caller's stream, without synchronizing.
#include "kpg/cuda_support.cuh"
#include "kpg/launch_plan.h"
#include "kpg/update.h"

namespace kpg {
namespace {

__device__ __forceinline__ double grad_scale_of(const UpdateBuffers& b, int64_t agent) {
  return b.grad_scale != nullptr ? b.grad_scale[agent] : 1.0;
}

template <typename T>
__device__ __forceinline__ T* buffer(void* base) {
  return static_cast<T*>(base);
}

// Each optimizer names its per-agent coefficients and how V consecutive elements are updated.
struct SGDKernel {
  using Hyper = SGDHyper;
  template <typename T>
  struct Coefficients {
    SGDCoefficients<T> math;
    bool first_step;
  };
  template <typename T>
  __device__ static Coefficients<T> coefficients(const UpdateBuffers& b, const Hyper& h, int64_t agent) {
    return {sgd_coefficients<T>(h, b.lr[agent], grad_scale_of(b, agent)), b.step[agent] == 0.0};
  }
  template <typename T, int V>
  __device__ static void apply(const UpdateBuffers& b, const Hyper& h, const Coefficients<T>& c, int64_t e) {
    const bool has_momentum = h.momentum != 0.0;
    Pack<T, V> p = load_pack<V>(buffer<T>(b.param), e);
    const Pack<T, V> g = load_pack<V>(static_cast<const T*>(b.grad), e);
    Pack<T, V> buf{};
    if (has_momentum && !c.first_step) buf = load_pack<V>(buffer<T>(b.state[0]), e);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      sgd_element(p.lane[i], g.lane[i], buf.lane[i], c.math, h.maximize, h.weight_decay != 0.0,
                  has_momentum, c.first_step, h.nesterov);
    }
    if (b.commit) {
      store_pack<V>(buffer<T>(b.param), e, p);
      if (has_momentum) store_pack<V>(buffer<T>(b.state[0]), e, buf);
    } else {
      store_pack<V>(buffer<T>(b.anticipated), e, p);
    }
  }
};

struct AdamKernel {
  using Hyper = AdamHyper;
  template <typename T>
  using Coefficients = AdamCoefficients<T>;
  template <typename T>
  __device__ static Coefficients<T> coefficients(const UpdateBuffers& b, const Hyper& h, int64_t agent) {
    return adam_coefficients<T>(h, b.lr[agent], b.step[agent] + 1.0, grad_scale_of(b, agent));
  }
  template <typename T, int V>
  __device__ static void apply(const UpdateBuffers& b, const Hyper& h, const Coefficients<T>& c, int64_t e) {
    Pack<T, V> p = load_pack<V>(buffer<T>(b.param), e);
    const Pack<T, V> g = load_pack<V>(static_cast<const T*>(b.grad), e);
    Pack<T, V> m = load_pack<V>(buffer<T>(b.state[0]), e);
    Pack<T, V> v = load_pack<V>(buffer<T>(b.state[1]), e);
    Pack<T, V> v_max{};
    if (h.amsgrad) v_max = load_pack<V>(buffer<T>(b.state[2]), e);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      adam_element(p.lane[i], g.lane[i], m.lane[i], v.lane[i], v_max.lane[i], c, h.maximize,
                   h.weight_decay != 0.0, h.decoupled_weight_decay, h.amsgrad);
    }
    if (b.commit) {
      store_pack<V>(buffer<T>(b.param), e, p);
      store_pack<V>(buffer<T>(b.state[0]), e, m);
      store_pack<V>(buffer<T>(b.state[1]), e, v);
      if (h.amsgrad) store_pack<V>(buffer<T>(b.state[2]), e, v_max);
    } else {
      store_pack<V>(buffer<T>(b.anticipated), e, p);
    }
  }
};

struct RMSpropKernel {
  using Hyper = RMSpropHyper;
  template <typename T>
  using Coefficients = RMSpropCoefficients<T>;
  template <typename T>
  __device__ static Coefficients<T> coefficients(const UpdateBuffers& b, const Hyper& h, int64_t agent) {
    return rmsprop_coefficients<T>(h, b.lr[agent], grad_scale_of(b, agent));
  }
  template <typename T, int V>
  __device__ static void apply(const UpdateBuffers& b, const Hyper& h, const Coefficients<T>& c, int64_t e) {
    const bool has_momentum = h.momentum > 0.0;
    Pack<T, V> p = load_pack<V>(buffer<T>(b.param), e);
    const Pack<T, V> g = load_pack<V>(static_cast<const T*>(b.grad), e);
    Pack<T, V> square_avg = load_pack<V>(buffer<T>(b.state[0]), e);
    Pack<T, V> buf{};
    Pack<T, V> grad_avg{};
    if (has_momentum) buf = load_pack<V>(buffer<T>(b.state[1]), e);
    if (h.centered) grad_avg = load_pack<V>(buffer<T>(b.state[2]), e);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      rmsprop_element(p.lane[i], g.lane[i], square_avg.lane[i], buf.lane[i], grad_avg.lane[i], c,
                      h.maximize, h.weight_decay != 0.0, h.centered, has_momentum);
    }
    if (b.commit) {
      store_pack<V>(buffer<T>(b.param), e, p);
      store_pack<V>(buffer<T>(b.state[0]), e, square_avg);
      if (has_momentum) store_pack<V>(buffer<T>(b.state[1]), e, buf);
      if (h.centered) store_pack<V>(buffer<T>(b.state[2]), e, grad_avg);
    } else {
      store_pack<V>(buffer<T>(b.anticipated), e, p);
    }
  }
};

template <typename Kernel, typename T, int V>
__global__ void __launch_bounds__(kCudaThreadsPerBlock)
    fused_update_kernel(const UpdateBuffers b, const typename Kernel::Hyper h) {
  const ChunkRange r = chunk_at(b.chunks, blockIdx.x);
  if (!chunk_in_bounds(r, b.num_agents, b.numel)) return;
  const ChunkSplit split = split_chunk(r.begin, r.end, V);
  const int thread = static_cast<int>(threadIdx.x);
  const int threads = static_cast<int>(blockDim.x);
  // A skipped agent keeps its base parameters; in anticipate mode those are its level parameters.
  if (b.skip != nullptr && b.skip[r.agent] != 0) {
    if (!b.commit) {
      const T* param = static_cast<const T*>(b.param);
      T* anticipated = buffer<T>(b.anticipated);
      for_each_thread_element(
          split, V, thread, threads, [&](int64_t e) { anticipated[e] = param[e]; },
          [&](int64_t e) { store_pack<V>(anticipated, e, load_pack<V>(param, e)); });
    }
    return;
  }
  __shared__ typename Kernel::template Coefficients<T> shared_coefficients;
  if (thread == 0) shared_coefficients = Kernel::template coefficients<T>(b, h, r.agent);
  __syncthreads();
  const auto c = shared_coefficients;
  for_each_thread_element(
      split, V, thread, threads, [&](int64_t e) { Kernel::template apply<T, 1>(b, h, c, e); },
      [&](int64_t e) { Kernel::template apply<T, V>(b, h, c, e); });
}

__global__ void advance_steps_kernel(double* step, const uint8_t* skip, int64_t num_agents) {
  const int64_t agent = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (agent < num_agents) advance_agent_step(step, skip, agent);
}

bool all_bases_vector_aligned(const UpdateBuffers& b) {
  return is_vector_aligned(b.param) && is_vector_aligned(b.grad) &&
         is_vector_aligned(b.anticipated) && is_vector_aligned(b.state[0]) &&
         is_vector_aligned(b.state[1]) && is_vector_aligned(b.state[2]);
}

template <typename Kernel>
void launch_update(const UpdateBuffers& b, const typename Kernel::Hyper& h, int device,
                   void* stream, const char* op) {
  CudaDeviceGuard guard(device, op);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  dispatch_dtype(b.dtype, op, [&](auto type_tag) {
    using T = decltype(type_tag);
    constexpr int kVec = kVectorBytes / static_cast<int>(sizeof(T));
    if (b.num_chunks > 0) {
      const unsigned int blocks = grid_size(b.num_chunks, op);
      if (all_bases_vector_aligned(b)) {
        fused_update_kernel<Kernel, T, kVec><<<blocks, kCudaThreadsPerBlock, 0, cuda_stream>>>(b, h);
      } else {
        fused_update_kernel<Kernel, T, 1><<<blocks, kCudaThreadsPerBlock, 0, cuda_stream>>>(b, h);
      }
      check_cuda(cudaGetLastError(), op);
    }
  });
  if (b.commit && b.num_agents > 0) {
    const unsigned int blocks = grid_size((b.num_agents + kCudaThreadsPerBlock - 1) / kCudaThreadsPerBlock, op);
    advance_steps_kernel<<<blocks, kCudaThreadsPerBlock, 0, cuda_stream>>>(b.step, b.skip, b.num_agents);
    check_cuda(cudaGetLastError(), op);
  }
}

}  // namespace

void sgd_update_cuda(const UpdateBuffers& b, const SGDHyper& h, int device, void* stream) {
  launch_update<SGDKernel>(b, h, device, stream, "sgd_update");
}

void adam_update_cuda(const UpdateBuffers& b, const AdamHyper& h, int device, void* stream) {
  launch_update<AdamKernel>(b, h, device, stream, "adam_update");
}

void rmsprop_update_cuda(const UpdateBuffers& b, const RMSpropHyper& h, int device, void* stream) {
  launch_update<RMSpropKernel>(b, h, device, stream, "rmsprop_update");
}

}  // namespace kpg
