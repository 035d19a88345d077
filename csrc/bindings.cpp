// Python bindings of the kpg extension: raw addresses, counts and dtype codes in (NOTE
// [Torch-free boundary] in kpg/common.h), calls into the CPU or CUDA entry points, nothing else.
// kpg/_C.pyi mirrors this file.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <string>
#include <type_traits>

#include "kpg/launch_plan.h"
#include "kpg/norms.h"
#include "kpg/thread_pool.h"
#include "kpg/update.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace kpg {
namespace {

constexpr int kCpuDevice = -1;

template <typename T>
T* address(uintptr_t value) {
  return reinterpret_cast<T*>(value);
}

void* stream_of(uintptr_t stream) { return reinterpret_cast<void*>(stream); }

[[noreturn]] void no_cuda_build(const char* op) {
  throw std::runtime_error(std::string(op) +
                           ": this kpg build has no CUDA kernels (built without a CUDA compiler); "
                           "reinstall kpg where nvcc is available, or keep the tensors on the CPU");
}

UpdateBuffers update_buffers(int dtype, bool commit, uintptr_t param, uintptr_t grad,
                             uintptr_t anticipated, uintptr_t state0, uintptr_t state1,
                             uintptr_t state2, uintptr_t step, uintptr_t lr, uintptr_t grad_scale,
                             uintptr_t skip, uintptr_t chunks, int64_t num_chunks,
                             int64_t num_agents, int64_t numel) {
  return {address<void>(param),
          address<const void>(grad),
          address<void>(anticipated),
          {address<void>(state0), address<void>(state1), address<void>(state2)},
          address<double>(step),
          address<const double>(lr),
          address<const double>(grad_scale),
          address<const uint8_t>(skip),
          address<const int64_t>(chunks),
          num_chunks,
          num_agents,
          numel,
          dtype,
          commit};
}

// Runs the CPU or CUDA entry point of an update without the GIL.
template <typename Hyper>
void run_update(int device, uintptr_t stream, const UpdateBuffers& buffers, const Hyper& hyper,
                void (*cpu)(const UpdateBuffers&, const Hyper&),
                std::type_identity_t<void (*)(const UpdateBuffers&, const Hyper&, int, void*)> cuda,
                const char* op) {
  const std::string op_name = std::string(op) + (buffers.commit ? "_commit" : "_anticipate");
  py::gil_scoped_release no_gil;
  if (device == kCpuDevice) {
    check_chunk_table(op_name.c_str(), buffers.chunks, buffers.num_chunks, nullptr, buffers.num_agents, buffers.numel);
    cpu(buffers, hyper);
  } else if (cuda != nullptr) {
    cuda(buffers, hyper, device, stream_of(stream));
  } else {
    no_cuda_build(op_name.c_str());
  }
}

#if defined(KPG_WITH_CUDA)
#define KPG_CUDA_ENTRY(fn) (&(fn))
#else
#define KPG_CUDA_ENTRY(fn) nullptr
#endif

py::tuple chunk_table(py::array_t<int64_t, py::array::c_style | py::array::forcecast> offsets,
                      int64_t chunk_elems) {
  if (offsets.ndim() != 1 || offsets.shape(0) < 1 || chunk_elems < 1) {
    throw std::invalid_argument("chunk_table: offsets must be 1-D with num_agents + 1 entries and chunk_elems >= 1");
  }
  const int64_t num_agents = offsets.shape(0) - 1;
  const int64_t* o = offsets.data();
  for (int64_t a = 0; a < num_agents; ++a) {
    if (o[a + 1] < o[a]) {
      throw std::invalid_argument("chunk_table: offsets must not decrease (agent " + std::to_string(a) + ")");
    }
  }
  const int64_t num_chunks = count_chunks(o, num_agents, chunk_elems);
  py::array_t<int64_t> chunks({num_chunks, static_cast<int64_t>(kChunkColumns)});
  py::array_t<int64_t> agent_chunks(num_agents + 1);
  fill_chunk_table(o, num_agents, chunk_elems, chunks.mutable_data(), agent_chunks.mutable_data());
  return py::make_tuple(chunks, agent_chunks);
}

py::tuple range_chunk_table(py::array_t<int64_t, py::array::c_style | py::array::forcecast> ranges,
                            int64_t num_agents, int64_t chunk_elems) {
  if (ranges.ndim() != 2 || ranges.shape(1) != kChunkColumns || num_agents < 0 || chunk_elems < 1) {
    throw std::invalid_argument(
        "range_chunk_table: ranges must be [num_ranges, 3] rows of agent, begin, end, num_agents >= 0 and "
        "chunk_elems >= 1");
  }
  const int64_t num_ranges = ranges.shape(0);
  check_element_ranges(ranges.data(), num_ranges, num_agents);
  const int64_t num_chunks = count_range_chunks(ranges.data(), num_ranges, chunk_elems);
  py::array_t<int64_t> chunks({num_chunks, static_cast<int64_t>(kChunkColumns)});
  py::array_t<int64_t> agent_chunks(num_agents + 1);
  fill_range_chunk_table(ranges.data(), num_ranges, num_agents, chunk_elems, chunks.mutable_data(),
                         agent_chunks.mutable_data());
  return py::make_tuple(chunks, agent_chunks);
}

py::array_t<int32_t> element_visits(py::array_t<int64_t, py::array::c_style | py::array::forcecast> offsets,
                                    int64_t chunk_elems, int threads, int vec) {
  const int64_t num_agents = offsets.shape(0) - 1;
  py::array_t<int32_t> visits(offsets.data()[num_agents]);
  std::fill_n(visits.mutable_data(), visits.size(), 0);
  count_element_visits(offsets.data(), num_agents, chunk_elems, threads, vec, visits.mutable_data());
  return visits;
}

py::dict build_info() {
#if defined(KPG_WITH_CUDA)
  const bool with_cuda = true;
#else
  const bool with_cuda = false;
#endif
  return py::dict("cuda"_a = with_cuda, "cuda_version"_a = KPG_BUILD_CUDA_VERSION,
                  "cuda_architectures"_a = KPG_BUILD_CUDA_ARCHITECTURES,
                  "cxx_compiler"_a = KPG_BUILD_CXX_COMPILER);
}

}  // namespace

void bind_device_info(py::module_& m);  // csrc/device_bindings.cpp
}  // namespace kpg

PYBIND11_MODULE(_C, m) {
  using namespace kpg;
  m.doc() = "kpg's fused multi-agent optimizer kernels (CPU and CUDA); use kpg._ops, not this module";
  m.attr("CPU_CHUNK_ELEMS") = kCpuChunkElems;
  m.attr("CUDA_CHUNK_ELEMS") = kCudaChunkElems;
  m.attr("CUDA_THREADS_PER_BLOCK") = kCudaThreadsPerBlock;
  m.attr("VECTOR_BYTES") = kVectorBytes;
  m.def("build_info", &build_info);
  bind_device_info(m);
  m.def("set_num_threads", &set_num_threads, "num_threads"_a);
  m.def("get_num_threads", &get_num_threads);
  m.def("chunk_table", &chunk_table, "offsets"_a, "chunk_elems"_a);
  m.def("range_chunk_table", &range_chunk_table, "ranges"_a, "num_agents"_a, "chunk_elems"_a);
  m.def("element_visits", &element_visits, "offsets"_a, "chunk_elems"_a, "threads"_a, "vec"_a);

  m.def(
      "sgd_update",
      [](int device, uintptr_t stream, int dtype, bool commit, uintptr_t param, uintptr_t grad,
         uintptr_t anticipated, uintptr_t momentum_buffer, uintptr_t step, uintptr_t lr,
         uintptr_t grad_scale, uintptr_t skip, uintptr_t chunks, int64_t num_chunks,
         int64_t num_agents, int64_t numel, double momentum, double dampening, double weight_decay, bool nesterov,
         bool maximize) {
        const auto buffers = update_buffers(dtype, commit, param, grad, anticipated, momentum_buffer,
                                            0, 0, step, lr, grad_scale, skip, chunks, num_chunks,
                                            num_agents, numel);
        run_update(device, stream, buffers, SGDHyper{momentum, dampening, weight_decay, nesterov, maximize},
                   &sgd_update_cpu, KPG_CUDA_ENTRY(sgd_update_cuda), "sgd");
      },
      "device"_a, "stream"_a, "dtype"_a, "commit"_a, "param"_a, "grad"_a, "anticipated"_a,
      "momentum_buffer"_a, "step"_a, "lr"_a, "grad_scale"_a, "skip"_a, "chunks"_a, "num_chunks"_a,
      "num_agents"_a, "numel"_a, "momentum"_a, "dampening"_a, "weight_decay"_a, "nesterov"_a, "maximize"_a);

  m.def(
      "adam_update",
      [](int device, uintptr_t stream, int dtype, bool commit, uintptr_t param, uintptr_t grad,
         uintptr_t anticipated, uintptr_t exp_avg, uintptr_t exp_avg_sq, uintptr_t max_exp_avg_sq,
         uintptr_t step, uintptr_t lr, uintptr_t grad_scale, uintptr_t skip, uintptr_t chunks,
         int64_t num_chunks, int64_t num_agents, int64_t numel, double beta1, double beta2, double eps,
         double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay) {
        const auto buffers = update_buffers(dtype, commit, param, grad, anticipated, exp_avg,
                                            exp_avg_sq, max_exp_avg_sq, step, lr, grad_scale, skip,
                                            chunks, num_chunks, num_agents, numel);
        run_update(device, stream, buffers,
                   AdamHyper{beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay},
                   &adam_update_cpu, KPG_CUDA_ENTRY(adam_update_cuda), "adam");
      },
      "device"_a, "stream"_a, "dtype"_a, "commit"_a, "param"_a, "grad"_a, "anticipated"_a,
      "exp_avg"_a, "exp_avg_sq"_a, "max_exp_avg_sq"_a, "step"_a, "lr"_a, "grad_scale"_a, "skip"_a,
      "chunks"_a, "num_chunks"_a, "num_agents"_a, "numel"_a, "beta1"_a, "beta2"_a, "eps"_a, "weight_decay"_a,
      "amsgrad"_a, "maximize"_a, "decoupled_weight_decay"_a);

  m.def(
      "rmsprop_update",
      [](int device, uintptr_t stream, int dtype, bool commit, uintptr_t param, uintptr_t grad,
         uintptr_t anticipated, uintptr_t square_avg, uintptr_t momentum_buffer, uintptr_t grad_avg,
         uintptr_t step, uintptr_t lr, uintptr_t grad_scale, uintptr_t skip, uintptr_t chunks,
         int64_t num_chunks, int64_t num_agents, int64_t numel, double alpha, double eps, double weight_decay,
         double momentum, bool centered, bool maximize) {
        const auto buffers = update_buffers(dtype, commit, param, grad, anticipated, square_avg,
                                            momentum_buffer, grad_avg, step, lr, grad_scale, skip,
                                            chunks, num_chunks, num_agents, numel);
        run_update(device, stream, buffers,
                   RMSpropHyper{alpha, eps, weight_decay, momentum, centered, maximize},
                   &rmsprop_update_cpu, KPG_CUDA_ENTRY(rmsprop_update_cuda), "rmsprop");
      },
      "device"_a, "stream"_a, "dtype"_a, "commit"_a, "param"_a, "grad"_a, "anticipated"_a,
      "square_avg"_a, "momentum_buffer"_a, "grad_avg"_a, "step"_a, "lr"_a, "grad_scale"_a, "skip"_a,
      "chunks"_a, "num_chunks"_a, "num_agents"_a, "numel"_a, "alpha"_a, "eps"_a, "weight_decay"_a,
      "momentum"_a, "centered"_a, "maximize"_a);

  m.def(
      "agent_grad_norms",
      [](int device, uintptr_t stream, int dtype, uintptr_t grad, uintptr_t chunks,
         uintptr_t agent_chunks, int64_t num_chunks, int64_t num_agents, int64_t numel, uintptr_t chunk_sq,
         uintptr_t max_norm, uintptr_t norm, uintptr_t grad_scale, uintptr_t nonfinite) {
        const NormBuffers buffers{address<const void>(grad),    address<const int64_t>(chunks),
                                  address<const int64_t>(agent_chunks), num_chunks, num_agents, numel,
                                  address<double>(chunk_sq),   address<const double>(max_norm),
                                  address<double>(norm),       address<double>(grad_scale),
                                  address<uint8_t>(nonfinite), dtype};
        py::gil_scoped_release no_gil;
        if (device == kCpuDevice) {
          check_chunk_table("agent_grad_norms", buffers.chunks, num_chunks, buffers.agent_chunks, num_agents, numel);
          agent_grad_norms_cpu(buffers);
        } else {
#if defined(KPG_WITH_CUDA)
          agent_grad_norms_cuda(buffers, device, stream_of(stream));
#else
          (void)stream;
          no_cuda_build("agent_grad_norms");
#endif
        }
      },
      "device"_a, "stream"_a, "dtype"_a, "grad"_a, "chunks"_a, "agent_chunks"_a, "num_chunks"_a,
      "num_agents"_a, "numel"_a, "chunk_sq"_a, "max_norm"_a, "norm"_a, "grad_scale"_a, "nonfinite"_a);
}
