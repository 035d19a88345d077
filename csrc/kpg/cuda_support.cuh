// What the CUDA launchers share: a guard that makes the arena's device current for the launch and
// restores the caller's, the launch-error check (with the fix for driver and architecture
// mismatches), and 16-byte vector loads and stores.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "kpg/cuda_versions.h"

namespace kpg {

// What to do about errors whose fix lies outside the program: the driver or the build.
inline std::string cuda_error_hint(cudaError_t status) {
  if (status == cudaErrorInsufficientDriver) {
    const CudaVersions versions = cuda_versions();
    return "; " + cuda_driver_problem(versions.driver, versions.runtime) +
           " (python -m kpg.info, docs/cuda.md)";
  }
  if (status == cudaErrorNoKernelImageForDevice || status == cudaErrorUnsupportedPtxVersion) {
    return std::string("; this kpg holds kernels for CUDA architectures ") +
           KPG_BUILD_CUDA_ARCHITECTURES +
           " only: rebuild it on this machine with KPG_CUDA_ARCHITECTURES=native (docs/cuda.md)";
  }
  return "";
}

inline void check_cuda(cudaError_t status, const char* op) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(op) + ": CUDA error " + cudaGetErrorName(status) + ": " +
                             cudaGetErrorString(status) + cuda_error_hint(status));
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
