// One registration function per binding file; module.cpp calls them all.
#pragma once

#include <pybind11/pybind11.h>

namespace batchllm::bindings {

void register_build_info(pybind11::module_& m);
void register_prefix_tree(pybind11::module_& m);
void register_block_manager(pybind11::module_& m);
void register_scheduler(pybind11::module_& m);
void register_kernels(pybind11::module_& m);

}  // namespace batchllm::bindings
