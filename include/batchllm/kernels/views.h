// Raw tensor views and status codes shared by the CPU reference kernels and the CUDA launchers.
// No torch type crosses this boundary: a kernel sees a pointer, a shape, strides and a dtype.
#pragma once

#include <cstdint>

namespace batchllm::kernels {

/// Element type of a floating-point tensor view.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

/// Bytes per element of `dtype`.
inline int dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

/// Name used in error messages ("float32", "float16", "bfloat16").
inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

/// What a CPU reference kernel returns. The bindings validate every argument before a call, so a
/// non-kOk status means a caller skipped validation (an embedding C++ program, a test).
enum class Status : int32_t { kOk = 0, kInvalidArgument = 1, kUnsupported = 2 };

/// A strided view of a floating-point tensor of up to 4 dimensions. Strides are in elements.
/// Kernels require stride[ndim - 1] == 1 (checked by the bindings), other strides are free.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  int32_t ndim = 0;
  int64_t shape[4] = {0, 0, 0, 0};
  int64_t stride[4] = {0, 0, 0, 0};

  int64_t size(int dim) const { return shape[dim]; }
};

/// The first of a paged cache view's block and slot dims ([blocks, block_size, Hkv, D]: 0, 1) whose
/// stride in bytes does not fit 32 bits, or -1: the CUDA key loops address keys with them
/// (PagedKvHead).
inline int cache_stride_past_32_bits(const TensorView& cache) {
  const int64_t elem = dtype_size(cache.dtype);
  for (int d = 0; d < 2; ++d) {
    if (cache.stride[d] < 0 || cache.stride[d] * elem >= (int64_t{1} << 32)) return d;
  }
  return -1;
}

}  // namespace batchllm::kernels
