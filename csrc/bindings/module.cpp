// batchllm_core._C: the private native module. Each area registers its own bindings.
#include "bindings/registry.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "batchllm native core: prefix tree, block manager, scheduler, attention kernels";
  batchllm::bindings::register_build_info(m);
  batchllm::bindings::register_prefix_tree(m);
  batchllm::bindings::register_block_manager(m);
  batchllm::bindings::register_scheduler(m);
  batchllm::bindings::register_kernels(m);
}
