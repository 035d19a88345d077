// Python bindings of what kpg knows about its CUDA side without a GPU: the driver and runtime
// versions, the driver requirement, and the per-agent norm finish's mapping of CUDA threads to
// chunk rows, simulated on the host so CPU tests check it (kpg/norms.h).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "kpg/cuda_versions.h"
#include "kpg/norms.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace kpg {
namespace {

py::dict cuda_versions_dict() {
#if defined(KPG_WITH_CUDA)
  const CudaVersions versions = cuda_versions();
  return py::dict("driver"_a = versions.driver, "runtime"_a = versions.runtime);
#else
  return py::dict("driver"_a = py::none(), "runtime"_a = py::none());
#endif
}

// For each chunk row, the agent whose finish warp read it: -1 when none did, -2 when read twice.
py::array_t<int64_t> norm_finish_readers(
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> agent_chunks,
    int64_t num_chunks) {
  if (agent_chunks.ndim() != 1 || agent_chunks.shape(0) < 1 || num_chunks < 0) {
    throw std::invalid_argument(
        "norm_finish_readers: agent_chunks must be 1-D with num_agents + 1 entries");
  }
  NormBuffers b{};
  b.agent_chunks = agent_chunks.data();
  b.num_agents = agent_chunks.shape(0) - 1;
  b.num_chunks = num_chunks;
  py::array_t<int64_t> readers(num_chunks);
  int64_t* reader = readers.mutable_data();
  std::fill_n(reader, num_chunks, -1);
  for (int64_t block = 0; block < norm_finish_blocks(b.num_agents); ++block) {
    for (int thread = 0; thread < kNormLanes * kNormAgentsPerBlock; ++thread) {
      const NormLane where = norm_lane_of(block, thread);
      if (where.agent >= b.num_agents) continue;
      for_each_lane_row(b, where.agent, where.lane,
                        [&](int64_t c) { reader[c] = reader[c] == -1 ? where.agent : -2; });
    }
  }
  return readers;
}

}  // namespace

void bind_device_info(py::module_& m) {
  m.attr("NORM_LANES") = kNormLanes;
  m.attr("NORM_AGENTS_PER_BLOCK") = kNormAgentsPerBlock;
  m.def("cuda_versions", &cuda_versions_dict,
        "The CUDA version the NVIDIA driver supports and the one kpg's runtime was built with "
        "(1000 * major + "
        "10 * minor; driver 0 when none is installed), or None for both in a build without CUDA "
        "kernels.");
  m.def("cuda_driver_problem", &cuda_driver_problem, "driver"_a, "runtime"_a,
        "What a driver of CUDA version `driver` lacks to run kernels built with `runtime`, or '' "
        "when nothing.");
  m.def("norm_finish_readers", &norm_finish_readers, "agent_chunks"_a, "num_chunks"_a);
}

}  // namespace kpg
