// What the CUDA launchers share: a guard that makes the arena's device current for the launch and
// restores the caller's, the launch-error check, and 16-byte vector loads and stores.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace kpg {

inline void check_cuda(cudaError_t status, const char* op) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(op) + ": CUDA error " + cudaGetErrorName(status) + ": " +
                             cudaGetErrorString(status));
  }
}

class CudaDeviceGuard {
 public:
  CudaDeviceGuard(int device, const char* op) {
    check_cuda(cudaGetDevice(&previous_), op);
    if (previous_ != device) check_cuda(cudaSetDevice(device), op);
  }
  ~CudaDeviceGuard() {
    int current = previous_;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

inline unsigned int grid_size(int64_t blocks, const char* op) {
  if (blocks > 0x7fffffff) {
    throw std::invalid_argument(std::string(op) + ": " + std::to_string(blocks) +
                                " chunks exceed CUDA's grid limit of 2^31 - 1 blocks");
  }
  return static_cast<unsigned int>(blocks);
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T lane[V];
};

template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load_pack(const T* base, int64_t element) {
  return *reinterpret_cast<const Pack<T, V>*>(base + element);
}

template <int V, typename T>
__device__ __forceinline__ void store_pack(T* base, int64_t element, const Pack<T, V>& pack) {
  *reinterpret_cast<Pack<T, V>*>(base + element) = pack;
}

}  // namespace kpg
