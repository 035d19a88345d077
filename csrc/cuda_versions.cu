// The CUDA versions kpg runs with: the driver's (no device needed) and the runtime's it was built
// with.
#include "kpg/cuda_support.cuh"

namespace kpg {

CudaVersions cuda_versions() {
  int driver = 0;
  // With no driver installed this succeeds and reports 0.
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
  return {driver, CUDART_VERSION};
}

}  // namespace kpg
