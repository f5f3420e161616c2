// CUDA store_kv: scatter the step's new K/V rows into their paged slots. One CTA per token; each
// thread moves 16 bytes (rows are 16-byte aligned: checked by the binding).
#include "batchllm/kernels/cuda.h"
#include "kernels/cuda/store_token_kv.cuh"

namespace batchllm::kernels {

namespace cuda {
namespace {

__global__ void store_kv_kernel(TensorView k, TensorView v, TensorView k_cache, TensorView v_cache,
                                const int64_t* slot_mapping) {
  begin_dependent_kernel();  // PDL: cuda_common.cuh
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0) return;  // padding row
  store_token_kv(k, v, k_cache, v_cache, token, slot);
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
