// Argument parsing and validation for the kernel bindings (bind_kernels.cpp). Python passes each
// tensor as a view tuple (data_ptr, dtype name, shape, strides, device index; -1 = CPU) built by
// batchllm_core.ops; nothing here knows torch. Every failure raises ValueError naming the kernel
// and the argument, before any kernel runs.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "batchllm/kernels.h"
#ifdef BATCHLLM_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace batchllm::bindings {

/// One parsed view tuple.
struct ViewArg {
  std::string name;
  uintptr_t data = 0;
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;
  int device = -1;

  bool is_cuda() const { return device >= 0; }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
};

/// Validation context of one kernel call: every message starts with the kernel's name.
class ArgChecker {
 public:
  explicit ArgChecker(const char* kernel) : kernel_(kernel) {}

  [[noreturn]] void fail(const std::string& arg, const std::string& what) const {
    throw pybind11::value_error(std::string(kernel_) + ": argument '" + arg + "' " + what);
  }
  void require(bool ok, const std::string& arg, const std::string& what) const {
    if (!ok) fail(arg, what);
  }

  ViewArg parse(const pybind11::handle& obj, const std::string& name) const {
    auto tuple = pybind11::reinterpret_borrow<pybind11::tuple>(obj);
    require(pybind11::isinstance<pybind11::tuple>(obj) && tuple.size() == 5, name,
            "must be a view tuple (data_ptr, dtype, shape, strides, device)");
    ViewArg view;
    view.name = name;
    view.data = tuple[0].cast<uintptr_t>();
    view.dtype = tuple[1].cast<std::string>();
    view.shape = tuple[2].cast<std::vector<int64_t>>();
    view.strides = tuple[3].cast<std::vector<int64_t>>();
    view.device = tuple[4].cast<int>();
    require(view.shape.size() == view.strides.size(), name, "has shape and strides of different ranks");
    return view;
  }

  /// A floating-point tensor of rank `ndim` with a contiguous last dimension.
  kernels::TensorView tensor(const ViewArg& arg, int ndim) const {
    require(static_cast<int>(arg.shape.size()) == ndim, arg.name,
            "must have " + std::to_string(ndim) + " dimensions, got " + std::to_string(arg.shape.size()));
    kernels::TensorView view;
    if (arg.dtype == "float32") view.dtype = kernels::DType::kFloat32;
    else if (arg.dtype == "float16") view.dtype = kernels::DType::kFloat16;
    else if (arg.dtype == "bfloat16") view.dtype = kernels::DType::kBFloat16;
    else fail(arg.name, "has dtype " + arg.dtype + "; expected float32, float16 or bfloat16");
    require(arg.strides[ndim - 1] == 1 || arg.shape[ndim - 1] <= 1 || arg.numel() == 0, arg.name,
            "must have a contiguous last dimension (stride 1), got stride " + std::to_string(arg.strides[ndim - 1]));
    require(arg.numel() == 0 || arg.data != 0, arg.name, "has a null data pointer");
    view.data = reinterpret_cast<void*>(arg.data);
    view.ndim = ndim;
    for (int d = 0; d < ndim; ++d) {
      view.shape[d] = arg.shape[d];
      view.stride[d] = arg.strides[d];
    }
    return view;
  }

  /// CUDA kernels move rows in 16-byte vectors: the base pointer and every row start must be 16-byte
  /// aligned (true for tensors torch allocates and for their row slices when D * element size % 16 == 0).
  void rows_aligned_16(const ViewArg& arg, const kernels::TensorView& view) const {
    const int64_t elem = kernels::dtype_size(view.dtype);
    bool ok = arg.data % 16 == 0 && (view.shape[view.ndim - 1] * elem) % 16 == 0;
    for (int d = 0; d + 1 < view.ndim; ++d) ok = ok && (view.stride[d] * elem) % 16 == 0;
    require(ok, arg.name, "must have 16-byte aligned rows on CUDA (data pointer, strides and row bytes)");
  }

  /// A contiguous integer array of `dtype` ("int32"/"int64") and the given shape (-1: any size).
  void index_array(const ViewArg& arg, const char* dtype, std::vector<int64_t> shape) const {
    require(arg.dtype == dtype, arg.name, std::string("must be ") + dtype + ", got " + arg.dtype);
    require(arg.shape.size() == shape.size(), arg.name, "must have " + std::to_string(shape.size()) + " dimensions");
    // An empty array has no element to address: its strides mean nothing (numpy and torch give
    // empty views strides such as (0, 0)), so only non-empty arrays must be contiguous.
    const bool empty = arg.numel() == 0;
    int64_t expected_stride = 1;
    for (int d = static_cast<int>(shape.size()) - 1; d >= 0; --d) {
      require(shape[d] < 0 || arg.shape[d] == shape[d], arg.name,
              "has size " + std::to_string(arg.shape[d]) + " in dim " + std::to_string(d) + ", expected " +
                  std::to_string(shape[d]));
      require(empty || arg.shape[d] <= 1 || arg.strides[d] == expected_stride, arg.name, "must be contiguous");
      expected_stride *= arg.shape[d];
    }
    require(arg.numel() == 0 || arg.data != 0, arg.name, "has a null data pointer");
  }

  void same_device(const std::vector<const ViewArg*>& args) const {
    for (const ViewArg* arg : args) {
      require(arg->device == args[0]->device, arg->name,
              "is on device " + std::to_string(arg->device) + " but '" + args[0]->name + "' is on device " +
                  std::to_string(args[0]->device) + " (-1 = CPU)");
    }
  }

  /// Copies an index array to host (a device-to-host copy for CUDA memory) for content checks.
  template <typename T>
  std::vector<T> read(const ViewArg& arg) const {
    std::vector<T> host(static_cast<size_t>(arg.numel()));
    if (host.empty()) return host;
    if (!arg.is_cuda()) {
      std::memcpy(host.data(), reinterpret_cast<const void*>(arg.data), host.size() * sizeof(T));
      return host;
    }
#ifdef BATCHLLM_WITH_CUDA
    const cudaError_t err = cudaMemcpy(host.data(), reinterpret_cast<const void*>(arg.data),
                                       host.size() * sizeof(T), cudaMemcpyDeviceToHost);
    require(err == cudaSuccess, arg.name, std::string("could not be read for checking: ") + cudaGetErrorString(err));
#else
    fail(arg.name, "is on a CUDA device but this build has no CUDA support");
#endif
    return host;
  }

  const char* kernel() const { return kernel_; }

 private:
  const char* kernel_;
};

}  // namespace batchllm::bindings
