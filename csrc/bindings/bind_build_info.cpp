#include <pybind11/pybind11.h>

#include "batchllm/build_info.h"
#include "bindings/registry.h"

namespace py = pybind11;

namespace batchllm::bindings {

void register_build_info(py::module_& m) {
  m.def("build_info", [] {
    BuildInfo info = batchllm::build_info();
    py::dict d;
    d["version"] = info.version;
    d["cuda"] = info.cuda;
    d["cuda_version"] = info.cuda_version;
    d["cuda_architectures"] = info.cuda_architectures;
    d["compiler"] = info.compiler;
    return d;
  }, "What this build contains: version, whether CUDA kernels are compiled in, for which architectures.");
  m.def("cuda_device_count", &batchllm::cuda_device_count,
        "Number of CUDA devices usable now (0 without CUDA support, driver or device).");
}

}  // namespace batchllm::bindings
