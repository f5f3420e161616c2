// Writing one token's K and V rows into their paged slot: the body of store_kv, and of the rotary
// kernel's fused store (rotary_embedding with a slot mapping).
#pragma once

#include "kernels/cuda/cuda_common.cuh"

namespace batchllm::kernels::cuda {

/// Copies token `token`'s K and V rows (every head) to cache slot `slot` (>= 0), 16 bytes a step,
/// the CTA's threads striding over (head, 16-byte chunk). Rows must be 16-byte aligned (the
/// bindings check); any element size.
__device__ __forceinline__ void store_token_kv(const TensorView& k, const TensorView& v, const TensorView& k_cache,
                                               const TensorView& v_cache, int64_t token, int64_t slot) {
  const int64_t element = k.dtype == DType::kFloat32 ? 4 : 2;
  const int64_t block = slot / k_cache.shape[1];
  const int64_t offset = slot % k_cache.shape[1];
  const int num_heads = static_cast<int>(k.shape[1]);
  const int chunks = static_cast<int>(k.shape[2] * element / 16);
  for (int idx = threadIdx.x; idx < num_heads * chunks; idx += blockDim.x) {
    const int head = idx / chunks, chunk = idx % chunks;
    const int64_t src_k = (token * k.stride[0] + head * k.stride[1]) * element;
    const int64_t src_v = (token * v.stride[0] + head * v.stride[1]) * element;
    const int64_t dst_k = (block * k_cache.stride[0] + offset * k_cache.stride[1] + head * k_cache.stride[2]) * element;
    const int64_t dst_v = (block * v_cache.stride[0] + offset * v_cache.stride[1] + head * v_cache.stride[2]) * element;
    reinterpret_cast<uint4*>(static_cast<char*>(k_cache.data) + dst_k)[chunk] =
        reinterpret_cast<const uint4*>(static_cast<const char*>(k.data) + src_k)[chunk];
    reinterpret_cast<uint4*>(static_cast<char*>(v_cache.data) + dst_v)[chunk] =
        reinterpret_cast<const uint4*>(static_cast<const char*>(v.data) + src_v)[chunk];
  }
}

}  // namespace batchllm::kernels::cuda
