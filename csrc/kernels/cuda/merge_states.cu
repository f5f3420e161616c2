// CUDA merge_states: row-wise LSE merge of two partial attention states (float32, fp16 or bf16).
// One warp per (row, head); the merge weights come from merge_lse (batchllm/kernels/merge.h).
#include "batchllm/kernels/cuda.h"
#include "kernels/cuda/cuda_common.cuh"

namespace batchllm::kernels {

namespace cuda {
namespace {

template <typename T>
__global__ void merge_states_kernel(MergeStatesParams p) {
  begin_dependent_kernel();  // PDL: cuda_common.cuh
  const int64_t num_heads = p.o_a.shape[1];
  const int64_t state = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (state >= p.o_a.shape[0] * num_heads) return;
  const int lane = threadIdx.x % 32;
  const int64_t n = state / num_heads, h = state % num_heads;
  const LseMerge w = merge_lse(p.lse_a[state], p.lse_b[state]);
  const T* a = static_cast<const T*>(p.o_a.data) + n * p.o_a.stride[0] + h * p.o_a.stride[1];
  const T* b = static_cast<const T*>(p.o_b.data) + n * p.o_b.stride[0] + h * p.o_b.stride[1];
  T* o = static_cast<T*>(p.o.data) + n * p.o.stride[0] + h * p.o.stride[1];
  // Element-wise read-then-write: o may alias o_a or o_b.
  for (int64_t d = lane; d < p.o_a.shape[2]; d += 32) {
    o[d] = from_float<T>(merge_value(w, to_float(a[d]), to_float(b[d])));
  }
  __syncwarp();  // every lane has read lse_a/lse_b before lane 0 may overwrite an aliased lse
  if (lane == 0 && p.lse != nullptr) p.lse[state] = w.lse;
}

}  // namespace
}  // namespace cuda

cudaError_t merge_states_cuda(const MergeStatesParams& p, cudaStream_t stream) {
  const int64_t num_states = p.o_a.shape[0] * p.o_a.shape[1];
  if (num_states == 0) return cudaSuccess;
  constexpr int kWarpsPerBlock = 8;
  const unsigned grid = static_cast<unsigned>((num_states + kWarpsPerBlock - 1) / kWarpsPerBlock);
  switch (p.o_a.dtype) {
    case DType::kFloat32: BATCHLLM_LAUNCH(grid, 32 * kWarpsPerBlock, 0, stream, cuda::merge_states_kernel<float>)(p); break;
    case DType::kFloat16: BATCHLLM_LAUNCH(grid, 32 * kWarpsPerBlock, 0, stream, cuda::merge_states_kernel<__half>)(p); break;
    case DType::kBFloat16:
      BATCHLLM_LAUNCH(grid, 32 * kWarpsPerBlock, 0, stream, cuda::merge_states_kernel<__nv_bfloat16>)(p);
      break;
  }
  return cuda::last_launch_error();
}

}  // namespace batchllm::kernels
