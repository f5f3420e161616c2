// Test helper: a contiguous TensorView over caller-owned memory.
#pragma once

#include <cstdint>
#include <vector>

#include "batchllm/kernels.h"

namespace batchllm::kernels::testing {

/// A row-major view of `data` with the given shape (strides in elements, last one 1).
inline TensorView contiguous_view(void* data, DType dtype, const std::vector<int64_t>& shape) {
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.ndim = static_cast<int32_t>(shape.size());
  int64_t stride = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.shape[d] = shape[d];
    v.stride[d] = stride;
    stride *= shape[d];
  }
  return v;
}

}  // namespace batchllm::kernels::testing
