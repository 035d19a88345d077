// Which NVIDIA driver kpg's CUDA kernels need. The CUDA runtime is linked statically, so the driver
// must support the CUDA major version kpg was built with (minor versions are compatible from
// CUDA 11 on). Plain host code: the CPU tests check the messages with made-up versions.
#pragma once

#include <string>

namespace kpg {

struct CudaVersions {
  int driver;  // cudaDriverGetVersion: the newest CUDA the installed driver supports; 0 without one
  int runtime;  // CUDART_VERSION of the runtime linked into kpg
};

#if defined(KPG_WITH_CUDA)
CudaVersions cuda_versions();  // csrc/cuda_versions.cu
#endif

// CUDA versions as cudaDriverGetVersion gives them: 1000 * major + 10 * minor; 0 is no driver.
inline std::string cuda_version_text(int version) {
  return std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
}

// The oldest Linux driver of each CUDA major version (NVIDIA's CUDA toolkit release notes).
inline std::string minimum_linux_driver(int cuda_major) {
  switch (cuda_major) {
    case 11:
      return "450.80.02";
    case 12:
      return "525.60.13";
    case 13:
      return "580.65.06";
  }
  return "the one of CUDA " + std::to_string(cuda_major) + ".0";
}

// Empty when a driver supporting CUDA `driver` runs kernels built with CUDA `runtime`; otherwise
// what is missing and the two ways out.
inline std::string cuda_driver_problem(int driver, int runtime) {
  if (runtime <= 0 || (driver > 0 && driver / 1000 >= runtime / 1000)) return "";
  const std::string needed = "a driver for CUDA >= " + std::to_string(runtime / 1000) +
                             ".0 (Linux driver >= " + minimum_linux_driver(runtime / 1000) + ")";
  const std::string built = "this kpg was built with CUDA " + cuda_version_text(runtime) +
                            ", whose runtime it links statically, so it needs " + needed;
  if (driver <= 0) return "no NVIDIA driver was found; " + built;
  const std::string major = std::to_string(driver / 1000);
  return "the NVIDIA driver supports CUDA up to " + cuda_version_text(driver) + " but " + built +
         ". Update the driver, or rebuild kpg with a CUDA " + major +
         ".x toolkit (the one the installed torch was built for, torch.version.cuda): "
         "KPG_CUDA_COMPILER=/usr/local/cuda-" +
         major +
         ".<minor>/bin/nvcc pip install --no-build-isolation --no-deps --force-reinstall <kpg "
         "source>";
}

}  // namespace kpg
