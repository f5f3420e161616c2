// CUDA store_kv: scatter the step's new K/V rows into their paged slots. One CTA per token; each
// thread moves 16 bytes (rows are 16-byte aligned: checked by the binding).
#include "batchllm/kernels/cuda.h"
#include "kernels/cuda/cuda_common.cuh"

namespace batchllm::kernels {

namespace cuda {
namespace {

__global__ void store_kv_kernel(TensorView k, TensorView v, TensorView k_cache, TensorView v_cache,
                                const int64_t* slot_mapping) {
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0) return;  // padding row
  const int64_t block = slot / k_cache.shape[1];
  const int64_t offset = slot % k_cache.shape[1];
  const int num_heads = static_cast<int>(k.shape[1]);
  const int vec_per_head = static_cast<int>(k.shape[2]) * 2 / 16;  // 16-bit elements
  for (int idx = threadIdx.x; idx < num_heads * vec_per_head; idx += blockDim.x) {
    const int head = idx / vec_per_head, chunk = idx % vec_per_head;
    const int64_t src_k = token * k.stride[0] + head * k.stride[1];
    const int64_t src_v = token * v.stride[0] + head * v.stride[1];
    const int64_t dst = block * k_cache.stride[0] + offset * k_cache.stride[1] + head * k_cache.stride[2];
    const int64_t dst_v = block * v_cache.stride[0] + offset * v_cache.stride[1] + head * v_cache.stride[2];
    reinterpret_cast<uint4*>(static_cast<uint16_t*>(k_cache.data) + dst)[chunk] =
        reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(k.data) + src_k)[chunk];
    reinterpret_cast<uint4*>(static_cast<uint16_t*>(v_cache.data) + dst_v)[chunk] =
        reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(v.data) + src_v)[chunk];
  }
}

}  // namespace
}  // namespace cuda

cudaError_t store_kv_cuda(const StoreKvParams& p, cudaStream_t stream) {
  if (p.k.dtype == DType::kFloat32) return cudaErrorInvalidValue;
  if ((p.k.shape[2] * 2) % 16 != 0) return cudaErrorInvalidValue;
  const int64_t num_tokens = p.k.shape[0];
  if (num_tokens == 0) return cudaSuccess;
  BATCHLLM_LAUNCH(static_cast<unsigned>(num_tokens), 128, 0, stream, cuda::store_kv_kernel)(
      p.k, p.v, p.k_cache, p.v_cache, p.slot_mapping);
  return cuda::last_launch_error();
}

}  // namespace batchllm::kernels
