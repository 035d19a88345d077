// Definitions every kpg translation unit shares: the host/device qualifier, the dtype codes that
// cross the Python boundary, and the one dtype-dispatch helper (NOTE [Torch-free boundary]).
//
// NOTE [Torch-free boundary]: the extension never links libtorch. Tensors arrive as raw addresses,
// element counts, a dtype code and (on CUDA) the caller's stream handle, so one binary works with
// every torch version. kpg/_ops.py is the only place that turns tensors into these arguments.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#if defined(__CUDACC__)
#define KPG_HD __host__ __device__ __forceinline__
#else
#define KPG_HD inline
#endif

// The CPU element loops are compiled twice, for AVX2 and for the build's baseline ISA; the dynamic
// loader picks one per machine (GNU ifunc). Neither clone may use FMA: contracting a*b+c would
// round differently from torch.optim's separate operations, and from the other clone.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__CUDACC__)
#define KPG_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define KPG_CPU_CLONES
#endif

namespace kpg {

// Codes of the parameter dtypes; kpg/_ops.py reads them from kpg._C.DTYPES (built from kDTypes).
enum class DType : int { Float32 = 0, Float64 = 1 };
constexpr DType kDTypes[] = {DType::Float32, DType::Float64};

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::Float32:
      return "float32";
    case DType::Float64:
      return "float64";
  }
  return "unknown";
}

// Calls fn(T{}) with T the C++ type of `dtype`; the error lists what is supported.
template <typename Fn>
decltype(auto) dispatch_dtype(int code, const char* op, Fn&& fn) {
  switch (static_cast<DType>(code)) {
    case DType::Float32:
      return fn(float{});
    case DType::Float64:
      return fn(double{});
  }
  std::string supported;
  for (DType dtype : kDTypes)
    supported += std::string(supported.empty() ? "" : ", ") + dtype_name(dtype);
  throw std::invalid_argument(std::string(op) + ": unsupported dtype code " + std::to_string(code) +
                              "; supported parameter dtypes are " + supported);
}

// Calls fn(std::integral_constant<bool, flag>{}) so loops can be specialised on a runtime flag.
template <typename Fn>
decltype(auto) dispatch_bool(bool flag, Fn&& fn) {
  if (flag) return fn(std::true_type{});
  return fn(std::false_type{});
}

}  // namespace kpg
