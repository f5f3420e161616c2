#include "bindings/registry.h"

namespace py = pybind11;

namespace batchllm::bindings {

void register_block_manager(py::module_& m) {}

}  // namespace batchllm::bindings
