// Python bindings of the kpg extension: raw addresses, counts and dtype codes in (NOTE
// [Torch-free boundary] in kpg/common.h) through the UpdateBuffers and NormBuffers structs, calls
// into the CPU or CUDA entry points, and the optimizer table of kpg/optimizers.h out; nothing else.
// kpg/_C.pyi mirrors this file.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "kpg/launch_plan.h"
#include "kpg/momentum.h"
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

const char* hyper_kind_name(HyperKind kind) {
  switch (kind) {
    case HyperKind::Real:
      return "real";
    case HyperKind::NonNegative:
      return "non_negative";
    case HyperKind::Fraction:
      return "fraction";
    case HyperKind::Flag:
      return "flag";
  }
  return "unknown";
}

// The op's name for errors: the optimizer family's first table name and the mode (adam_commit).
std::string update_op_name(int family, UpdateMode mode) {
  std::string name = "update";
  for (const OptimizerEntry& entry : kOptimizers) {
    if (static_cast<int>(entry.family) == family) {
      name = entry.name;
      break;
    }
  }
  const char* suffixes[] = {"_anticipate", "_commit", "_probe"};
  const int code = static_cast<int>(mode);
  if (code < 0 || code > 2) {
    throw std::invalid_argument(name + ": unknown mode " + std::to_string(code) +
                                "; valid modes are 0 (anticipate), 1 (commit) and 2 (probe)");
  }
  return name + suffixes[code];
}

// The scalar state a family keeps must come with every update, in a dtype the kernels know; the
// addresses and the code are on the host, so both paths are checked here.
void check_scalar_buffers(int family, const UpdateBuffers& buffers, const char* op) {
  dispatch_family(family, op, [&](auto traits) {
    using Traits = decltype(traits);
    for (int s = 0; s < kNumScalarStates<Traits>; ++s) {
      if (buffers.scalars[s] == nullptr && buffers.num_agents > 0) {
        throw std::invalid_argument(std::string(op) + ": the scalar state buffer " +
                                    Traits::kScalarStates[s].name + " is missing; pass it");
      }
    }
    if (kNumScalarStates<Traits> > 0) dispatch_dtype(buffers.scalar_dtype, op, [](auto) {});
  });
}

// Runs the CPU or CUDA update without the GIL; the CPU path checks the chunk table and the rows
// against the buffers first (a device-resident table cannot be read without a synchronization).
void update(int family, int device, uintptr_t stream, const UpdateBuffers& buffers) {
  dispatch_family(family, "update", [](auto) {});
  const std::string op_name = update_op_name(family, buffers.mode);
  const char* op = op_name.c_str();
  check_scalar_buffers(family, buffers, op);
  py::gil_scoped_release no_gil;
  if (device == kCpuDevice) {
    check_chunk_table(op, buffers.chunks, buffers.num_chunks, nullptr, buffers.num_agents,
                      buffers.numel);
    check_update_buffers(family, buffers, op);
    update_cpu(family, buffers, op);
  } else {
#if defined(KPG_WITH_CUDA)
    update_cuda(family, buffers, device, stream_of(stream), op);
#else
    (void)stream;
    no_cuda_build(op);
#endif
  }
}

// The per-agent gradient norms on the CPU or CUDA, without the GIL; the CPU path checks the chunk
// table first.
void agent_grad_norms(int device, uintptr_t stream, const NormBuffers& buffers) {
  const char* op = "agent_grad_norms";
  py::gil_scoped_release no_gil;
  if (device == kCpuDevice) {
    check_chunk_table(op, buffers.chunks, buffers.num_chunks, buffers.agent_chunks,
                      buffers.num_agents, buffers.numel);
    agent_grad_norms_cpu(buffers);
  } else {
#if defined(KPG_WITH_CUDA)
    agent_grad_norms_cuda(buffers, device, stream_of(stream));
#else
    (void)stream;
    no_cuda_build(op);
#endif
  }
}

// Momentum anticipation's prediction (record false) or bookkeeping (record true), without the GIL;
// the CPU path checks the chunk table first (record: with agent_chunks, whose rows it sums).
void momentum(bool record, int device, uintptr_t stream, int dtype, uintptr_t param,
              uintptr_t latest, uintptr_t base, uintptr_t anticipated, uintptr_t gate,
              uintptr_t latest_sq, uintptr_t chunk_sums, uintptr_t chunks, uintptr_t agent_chunks,
              int64_t num_chunks, int64_t num_agents, int64_t numel) {
  MomentumBuffers b;
  b.param = address<void>(param);
  b.latest = address<void>(latest);
  b.base = address<void>(base);
  b.anticipated = address<void>(anticipated);
  b.gate = address<double>(gate);
  b.latest_sq = address<double>(latest_sq);
  b.chunk_sums = address<double>(chunk_sums);
  b.chunks = address<const int64_t>(chunks);
  b.agent_chunks = address<const int64_t>(agent_chunks);
  b.num_chunks = num_chunks;
  b.num_agents = num_agents;
  b.numel = numel;
  b.dtype = dtype;
  const char* op = record ? "momentum_record" : "momentum_predict";
  py::gil_scoped_release no_gil;
  if (device == kCpuDevice) {
    check_chunk_table(op, b.chunks, num_chunks, record ? b.agent_chunks : nullptr, num_agents,
                      numel);
    if (record) {
      momentum_record_cpu(b);
    } else {
      momentum_predict_cpu(b);
    }
  } else {
#if defined(KPG_WITH_CUDA)
    if (record) {
      momentum_record_cuda(b, device, stream_of(stream));
    } else {
      momentum_predict_cuda(b, device, stream_of(stream));
    }
#else
    (void)stream;
    no_cuda_build(op);
#endif
  }
}

// Every named optimizer as Python sees it: family code, torch's default lr, hyperparameters (name,
// width, kind, default) in row order, state tensor names and starts, scalar states (name, initial).
py::dict optimizers() {
  py::dict table;
  for (const OptimizerEntry& entry : kOptimizers) {
    dispatch_family(static_cast<int>(entry.family), "optimizers", [&](auto traits) {
      using Traits = decltype(traits);
      py::list hyper;
      for (const HyperSpec& spec : Traits::kHyper) {
        double defaults[2] = {spec.defaults[0], spec.defaults[1]};
        for (const DefaultOverride& o : entry.overrides) {
          if (o.name != nullptr && std::string(o.name) == spec.name) defaults[0] = o.value;
        }
        py::object value = spec.width == 2 ? py::object(py::make_tuple(defaults[0], defaults[1]))
                           : spec.kind == HyperKind::Flag
                               ? py::object(py::bool_(defaults[0] != 0.0))
                               : py::object(py::float_(defaults[0]));
        hyper.append(py::make_tuple(spec.name, spec.width, hyper_kind_name(spec.kind), value));
      }
      py::list states;
      py::list state_initial;
      for (const char* name : Traits::kStates) states.append(name);
      for (int row_entry : Traits::kStateInitial) state_initial.append(row_entry);
      py::list scalar_states;
      for (const ScalarStateSpec& spec : Traits::kScalarStates)
        scalar_states.append(py::make_tuple(spec.name, spec.initial));
      table[entry.name] =
          py::dict("family"_a = static_cast<int>(entry.family), "default_lr"_a = entry.default_lr,
                   "row_width"_a = static_cast<int>(Traits::kRowWidth), "hyperparameters"_a = hyper,
                   "states"_a = states, "state_initial"_a = state_initial,
                   "scalar_states"_a = scalar_states);
    });
  }
  return table;
}

using Rows = py::array_t<double, py::array::c_style | py::array::forcecast>;

template <typename Traits>
const double* checked_rows(const Rows& rows, const char* op) {
  if (rows.ndim() != 2 || rows.shape(1) != Traits::kRowWidth) {
    throw std::invalid_argument(std::string(op) + ": rows must be [agents, " +
                                std::to_string(Traits::kRowWidth) +
                                "] hyperparameter rows of this optimizer");
  }
  return rows.data();
}

// [agents, states] booleans: which state tensors a commit with each row keeps (and so needs).
py::array_t<bool> kept_states(int family, const Rows& rows) {
  return dispatch_family(family, "kept_states", [&](auto traits) -> py::array_t<bool> {
    using Traits = decltype(traits);
    const double* data = checked_rows<Traits>(rows, "kept_states");
    const int64_t agents = rows.shape(0);
    py::array_t<bool> kept({agents, static_cast<int64_t>(Traits::kNumStates)});
    bool* out = kept.mutable_data();
    for (int64_t a = 0; a < agents; ++a) {
      const double* row = data + a * Traits::kRowWidth;
      for (int s = 0; s < Traits::kNumStates; ++s)
        out[a * Traits::kNumStates + s] = keeps_state<Traits>(row, s);
    }
    return kept;
  });
}

// The first row that breaks a rule beyond each hyperparameter's own range, as (agent, message),
// or (-1, "").
py::tuple invalid_row(int family, const Rows& rows) {
  return dispatch_family(family, "invalid_row", [&](auto traits) -> py::tuple {
    using Traits = decltype(traits);
    const double* data = checked_rows<Traits>(rows, "invalid_row");
    for (int64_t a = 0; a < rows.shape(0); ++a) {
      if (const char* message = Traits::invalid(data + a * Traits::kRowWidth))
        return py::make_tuple(a, message);
    }
    return py::make_tuple(-1, std::string());
  });
}

py::tuple chunk_table(py::array_t<int64_t, py::array::c_style | py::array::forcecast> offsets,
                      int64_t chunk_elems) {
  if (offsets.ndim() != 1 || offsets.shape(0) < 1 || chunk_elems < 1) {
    throw std::invalid_argument(
        "chunk_table: offsets must be 1-D with num_agents + 1 entries and chunk_elems >= 1");
  }
  const int64_t num_agents = offsets.shape(0) - 1;
  const int64_t* o = offsets.data();
  for (int64_t a = 0; a < num_agents; ++a) {
    if (o[a + 1] < o[a]) {
      throw std::invalid_argument("chunk_table: offsets must not decrease (agent " +
                                  std::to_string(a) + ")");
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
        "range_chunk_table: ranges must be [num_ranges, 3] rows of agent, begin, end, num_agents "
        ">= 0 and "
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

// The CPU entry points' check of a chunk table (bounds, overlapping rows, agent_chunks), for a
// table copied from the device: the CUDA path cannot read it without a synchronization.
void check_chunk_table_on_host(
    const std::string& op, py::array_t<int64_t, py::array::c_style | py::array::forcecast> chunks,
    std::optional<py::array_t<int64_t, py::array::c_style | py::array::forcecast>> agent_chunks,
    int64_t num_agents, int64_t numel) {
  if (chunks.ndim() != 2 || chunks.shape(1) != kChunkColumns ||
      (agent_chunks && agent_chunks->size() != num_agents + 1)) {
    throw std::invalid_argument(
        op + ": chunks must be [num_chunks, 3] and agent_chunks num_agents + 1 entries");
  }
  check_chunk_table(op.c_str(), chunks.data(), chunks.shape(0),
                    agent_chunks ? agent_chunks->data() : nullptr, num_agents, numel);
}

py::array_t<int32_t> element_visits(
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> offsets, int64_t chunk_elems,
    int threads, int vec) {
  const int64_t num_agents = offsets.shape(0) - 1;
  py::array_t<int32_t> visits(offsets.data()[num_agents]);
  std::fill_n(visits.mutable_data(), visits.size(), 0);
  count_element_visits(offsets.data(), num_agents, chunk_elems, threads, vec,
                       visits.mutable_data());
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
  m.doc() =
      "kpg's fused multi-agent optimizer kernels (CPU and CUDA); use kpg._ops, not this module";
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
  m.def("check_chunk_table", &check_chunk_table_on_host, "op"_a, "chunks"_a, "agent_chunks"_a,
        "num_agents"_a, "numel"_a);
  m.def("element_visits", &element_visits, "offsets"_a, "chunk_elems"_a, "threads"_a, "vec"_a);

  py::dict dtypes;
  for (DType dtype : kDTypes) dtypes[dtype_name(dtype)] = static_cast<int>(dtype);
  m.attr("DTYPES") = dtypes;
  m.attr("OPTIMIZERS") = optimizers();
  m.attr("MAX_STATES") = kMaxStates;
  py::dict modes;
  modes["anticipate"] = static_cast<int>(UpdateMode::Anticipate);
  modes["commit"] = static_cast<int>(UpdateMode::Commit);
  modes["probe"] = static_cast<int>(UpdateMode::Probe);
  m.attr("UPDATE_MODES") = modes;
  m.attr("MAX_SCALAR_STATES") = kMaxScalarStates;
  m.def("kept_states", &kept_states, "family"_a, "rows"_a);
  m.def("invalid_row", &invalid_row, "family"_a, "rows"_a);

  // The boundary of an update: addresses (0 for none), counts, dtype code and mode, by name.
  py::class_<UpdateBuffers>(m, "UpdateBuffers")
      .def(py::init<>())
#define KPG_ADDRESS_FIELD(field, type)                                                     \
  def_property(                                                                            \
      #field, [](const UpdateBuffers& b) { return reinterpret_cast<uintptr_t>(b.field); }, \
      [](UpdateBuffers& b, uintptr_t value) { b.field = reinterpret_cast<type>(value); })
      .KPG_ADDRESS_FIELD(param, void*)
      .KPG_ADDRESS_FIELD(grad, const void*)
      .KPG_ADDRESS_FIELD(anticipated, void*)
      .KPG_ADDRESS_FIELD(step, double*)
      .KPG_ADDRESS_FIELD(lr, const double*)
      .KPG_ADDRESS_FIELD(hyper, const double*)
      .KPG_ADDRESS_FIELD(live, uint8_t*)
      .KPG_ADDRESS_FIELD(grad_scale, const double*)
      .KPG_ADDRESS_FIELD(skip, const uint8_t*)
      .KPG_ADDRESS_FIELD(nonfinite, uint8_t*)
      .KPG_ADDRESS_FIELD(chunks, const int64_t*)
#undef KPG_ADDRESS_FIELD
      .def_property(
          "state",
          [](const UpdateBuffers& b) {
            py::list out;
            for (void* s : b.state) out.append(reinterpret_cast<uintptr_t>(s));
            return out;
          },
          [](UpdateBuffers& b, const std::vector<uintptr_t>& values) {
            if (values.size() > static_cast<size_t>(kMaxStates)) {
              throw std::invalid_argument("UpdateBuffers.state takes at most " +
                                          std::to_string(kMaxStates) + " addresses");
            }
            for (int s = 0; s < kMaxStates; ++s) {
              b.state[s] = s < static_cast<int>(values.size()) ? address<void>(values[s]) : nullptr;
            }
          })
      .def_property(
          "scalars",
          [](const UpdateBuffers& b) {
            py::list out;
            for (void* s : b.scalars) out.append(reinterpret_cast<uintptr_t>(s));
            return out;
          },
          [](UpdateBuffers& b, const std::vector<uintptr_t>& values) {
            if (values.size() > static_cast<size_t>(kMaxScalarStates)) {
              throw std::invalid_argument("UpdateBuffers.scalars takes at most " +
                                          std::to_string(kMaxScalarStates) + " addresses");
            }
            for (int s = 0; s < kMaxScalarStates; ++s) {
              b.scalars[s] =
                  s < static_cast<int>(values.size()) ? address<void>(values[s]) : nullptr;
            }
          })
      .def_readwrite("num_chunks", &UpdateBuffers::num_chunks)
      .def_readwrite("num_agents", &UpdateBuffers::num_agents)
      .def_readwrite("numel", &UpdateBuffers::numel)
      .def_readwrite("dtype", &UpdateBuffers::dtype)
      .def_readwrite("scalar_dtype", &UpdateBuffers::scalar_dtype)
      .def_property(
          "mode", [](const UpdateBuffers& b) { return static_cast<int>(b.mode); },
          [](UpdateBuffers& b, int mode) { b.mode = static_cast<UpdateMode>(mode); });
  m.def("update", &update, "family"_a, "device"_a, "stream"_a, "buffers"_a);

  // The boundary of the gradient norms, by name like UpdateBuffers.
  py::class_<NormBuffers>(m, "NormBuffers")
      .def(py::init<>())
#define KPG_ADDRESS_FIELD(field, type)                                                   \
  def_property(                                                                          \
      #field, [](const NormBuffers& b) { return reinterpret_cast<uintptr_t>(b.field); }, \
      [](NormBuffers& b, uintptr_t value) { b.field = reinterpret_cast<type>(value); })
      .KPG_ADDRESS_FIELD(grad, const void*)
      .KPG_ADDRESS_FIELD(chunks, const int64_t*)
      .KPG_ADDRESS_FIELD(agent_chunks, const int64_t*)
      .KPG_ADDRESS_FIELD(chunk_sq, double*)
      .KPG_ADDRESS_FIELD(max_norm, const double*)
      .KPG_ADDRESS_FIELD(norm, double*)
      .KPG_ADDRESS_FIELD(grad_scale, double*)
      .KPG_ADDRESS_FIELD(nonfinite, uint8_t*)
#undef KPG_ADDRESS_FIELD
      .def_readwrite("num_chunks", &NormBuffers::num_chunks)
      .def_readwrite("num_agents", &NormBuffers::num_agents)
      .def_readwrite("numel", &NormBuffers::numel)
      .def_readwrite("dtype", &NormBuffers::dtype);
  m.def("agent_grad_norms", &agent_grad_norms, "device"_a, "stream"_a, "buffers"_a);
  m.def("momentum", &momentum, "record"_a, "device"_a, "stream"_a, "dtype"_a, "param"_a, "latest"_a,
        "base"_a, "anticipated"_a, "gate"_a, "latest_sq"_a, "chunk_sums"_a, "chunks"_a,
        "agent_chunks"_a, "num_chunks"_a, "num_agents"_a, "numel"_a);
}
