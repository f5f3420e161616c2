// batchllm_core's kernel bindings (csrc/bindings/bind_kernels.cpp, unchanged) over the CUDA kernels
// compiled for the CPU emulation: the Python module `_cuda_emulation`, built with the tests. The
// GPU op tests (tests/python/test_cuda_ops.py) run through it where there is no GPU, with CPU tensors
// presented to the bindings as device 0 (tests/python/cuda_emulation.py), so ops.py's CUDA branch,
// the bindings' CUDA checks and the kernels run together as they do on a device.
#include <pybind11/pybind11.h>

#include "bindings/registry.h"
#include "cuda_emulation.h"

PYBIND11_MODULE(_cuda_emulation, m) {
  m.doc() = "batchllm kernel bindings over the CPU emulation of the CUDA kernels (tests only)";
  batchllm::bindings::register_kernels(m);
  m.def("set_order", [](int order, unsigned seed) {
    batchllm_emulation::set_order(static_cast<batchllm_emulation::Order>(order), seed);
  }, pybind11::arg("order"), pybind11::arg("seed") = 0,
     "Thread and CTA order of the launches that follow: 0 forward, 1 reverse, 2 shuffled.");
  m.def("launch_count", &batchllm_emulation::launch_count, "Kernel launches so far.");
}
