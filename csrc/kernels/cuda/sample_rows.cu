// CUDA sample_rows: one CTA per row reads the row's logits once (16-byte loads where the row allows),
// keeping per thread an online logsumexp and the best draw of batchllm/kernels/sampling.h; the
// threads' states are merged by shuffles, then across warps in shared memory.
#include "batchllm/kernels/cuda.h"
#include "batchllm/kernels/sampling.h"
#include "kernels/cuda/cuda_common.cuh"

namespace batchllm::kernels {

namespace cuda {
namespace {

constexpr int kSampleThreads = 256;

/// A thread's (then a warp's, then the row's) part of the pass.
struct DrawState {
  float max = -INFINITY, sum = 0.0f;  // logsumexp = max + log(sum)
  float best = -INFINITY, best_logit = -INFINITY;
  uint32_t best_token = kNoToken;

  __device__ __forceinline__ void add(float x, float temperature, uint32_t key, uint32_t token) {
    if (x > max) {
      sum = sum * expf(max - x) + 1.0f;
      max = x;
    } else if (x > -INFINITY) {
      sum += expf(x - max);
    }
    const float score = draw_score(x, temperature, key, token);
    if (draw_beats(score, token, best, best_token)) {
      best = score;
      best_token = token;
      best_logit = x;
    }
  }

  __device__ __forceinline__ void merge(const DrawState& o) {
    const float m = fmaxf(max, o.max);
    if (m > -INFINITY) {
      sum = (max > -INFINITY ? sum * expf(max - m) : 0.0f) + (o.max > -INFINITY ? o.sum * expf(o.max - m) : 0.0f);
      max = m;
    }
    if (draw_beats(o.best, o.best_token, best, best_token)) {
      best = o.best;
      best_token = o.best_token;
      best_logit = o.best_logit;
    }
  }

  __device__ __forceinline__ DrawState shuffled(int offset) const {
    DrawState o;
    o.max = __shfl_xor_sync(0xffffffffu, max, offset);
    o.sum = __shfl_xor_sync(0xffffffffu, sum, offset);
    o.best = __shfl_xor_sync(0xffffffffu, best, offset);
    o.best_logit = __shfl_xor_sync(0xffffffffu, best_logit, offset);
    o.best_token = __shfl_xor_sync(0xffffffffu, best_token, offset);
    return o;
  }
};

template <typename T>
__global__ void __launch_bounds__(kSampleThreads) sample_rows_kernel(SampleRowsParams p) {
  begin_dependent_kernel();  // PDL: cuda_common.cuh
  __shared__ DrawState warp_states[kSampleThreads / 32];
  const int64_t row = blockIdx.x;
  const int64_t vocab = p.logits.shape[1];
  const T* logits = static_cast<const T*>(p.logits.data) + row * p.logits.stride[0];
  const float temperature = p.temperature[row];
  const uint32_t key = static_cast<uint32_t>(p.keys[row]);
  DrawState state;
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte load
  if (vocab % kVec == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0) {
    for (int64_t v = static_cast<int64_t>(threadIdx.x) * kVec; v < vocab; v += kSampleThreads * kVec) {
      union {
        uint4 raw;
        T values[kVec];
      } chunk;
      chunk.raw = *reinterpret_cast<const uint4*>(logits + v);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        state.add(to_float(chunk.values[i]), temperature, key, static_cast<uint32_t>(v + i));
      }
    }
  } else {
    for (int64_t v = threadIdx.x; v < vocab; v += kSampleThreads) {
      state.add(to_float(logits[v]), temperature, key, static_cast<uint32_t>(v));
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) state.merge(state.shuffled(offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_states[warp] = state;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kSampleThreads / 32; ++w) state.merge(warp_states[w]);
    const float lse = state.max == -INFINITY ? -INFINITY : state.max + logf(state.sum);
    p.token_ids[row] = state.best_token == kNoToken ? 0 : state.best_token;  // an all-NaN row: token 0
    p.lse[row] = lse;
    p.logprobs[row] = state.best_logit - lse;
  }
}

}  // namespace
}  // namespace cuda

cudaError_t sample_rows_cuda(const SampleRowsParams& p, cudaStream_t stream) {
  const int64_t rows = p.logits.shape[0];
  if (rows == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(rows);
  switch (p.logits.dtype) {
    case DType::kFloat32:
      BATCHLLM_LAUNCH(grid, cuda::kSampleThreads, 0, stream, cuda::sample_rows_kernel<float>)(p);
      break;
    case DType::kFloat16:
      BATCHLLM_LAUNCH(grid, cuda::kSampleThreads, 0, stream, cuda::sample_rows_kernel<__half>)(p);
      break;
    case DType::kBFloat16:
      BATCHLLM_LAUNCH(grid, cuda::kSampleThreads, 0, stream, cuda::sample_rows_kernel<__nv_bfloat16>)(p);
      break;
  }
  return cuda::last_launch_error();
}

}  // namespace batchllm::kernels
