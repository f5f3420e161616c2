#include "bindings/registry.h"

namespace py = pybind11;

namespace batchllm::bindings {

void register_scheduler(py::module_& m) {}

}  // namespace batchllm::bindings
