// CUDA layer ops (rms_norm, silu_and_mul, rotary_embedding; batchllm/kernels.h): the element-wise work
// between a decoder layer's GEMMs, one launch each where torch runs a chain of small kernels (about
// 28 per layer: a decode step of a 1B model spent a third of its device time in them on an H100,
// 2026-11-27, bench/profile_e2e.py). Same float32 math and the same roundings as the CPU references
// (csrc/kernels/cpu/layer_ops.cpp); only the order of rms_norm's sum of squares differs.
#include <algorithm>

#include "batchllm/kernels/cuda.h"
#include "kernels/cuda/cuda_common.cuh"

namespace batchllm::kernels {

namespace cuda {
namespace {

constexpr int kNormThreads = 256;

template <typename T>
__device__ __forceinline__ float round_to(float value) {
  return to_float(from_float<T>(value));
}

/// The sum of `value` over the CTA (kNormThreads threads), in every thread.
__device__ __forceinline__ float block_sum(float value, float* warp_sums) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kNormThreads / 32; ++w) total += warp_sums[w];
  return total;
}

/// One CTA per row: (residual add,) sum of squares, then the normalised row times the weight. The
/// second pass reads the row again (from L1/L2: a row is a few KB), so `out` may alias `x`.
template <typename T>
__global__ void __launch_bounds__(kNormThreads) rms_norm_kernel(RmsNormParams p) {
  __shared__ float warp_sums[kNormThreads / 32];
  const int64_t row = blockIdx.x, hidden = p.x.shape[1];
  const T* x = static_cast<const T*>(p.x.data) + row * p.x.stride[0];
  T* residual = p.residual.data != nullptr ? static_cast<T*>(p.residual.data) + row * p.residual.stride[0] : nullptr;
  const T* weight = static_cast<const T*>(p.weight.data);
  T* out = static_cast<T*>(p.out.data) + row * p.out.stride[0];
  float sum_squares = 0.0f;
  for (int64_t i = threadIdx.x; i < hidden; i += kNormThreads) {
    float v = to_float(x[i]);
    if (residual != nullptr) {
      const T sum = from_float<T>(v + to_float(residual[i]));
      residual[i] = sum;
      v = to_float(sum);
    }
    sum_squares += v * v;
  }
  const float inv_rms = 1.0f / sqrtf(block_sum(sum_squares, warp_sums) / static_cast<float>(hidden) + p.eps);
  const T* normed_source = residual != nullptr ? residual : x;
  for (int64_t i = threadIdx.x; i < hidden; i += kNormThreads) {
    const float normed = round_to<T>(to_float(normed_source[i]) * inv_rms);
    out[i] = from_float<T>(to_float(weight[i]) * normed);
  }
}

/// Grid-stride over [T, I]: out = round(round(silu(gate)) * up).
template <typename T>
__global__ void silu_and_mul_kernel(SiluAndMulParams p) {
  const int64_t width = p.out.shape[1], total = p.out.shape[0] * width;
  const T* gate_up = static_cast<const T*>(p.gate_up.data);
  T* out = static_cast<T*>(p.out.data);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / width, i = idx % width;
    const float gate = to_float(gate_up[t * p.gate_up.stride[0] + i]);
    const float up = to_float(gate_up[t * p.gate_up.stride[0] + width + i]);
    const float silu = round_to<T>(gate / (1.0f + expf(-gate)));
    out[t * p.out.stride[0] + i] = from_float<T>(silu * up);
  }
}

/// One CTA per token; a thread per (head, i < D/2) pair of q's then k's heads rotates x[i] and
/// x[i + D/2] (it reads both before writing either: in place).
template <typename T>
__global__ void rotary_embedding_kernel(RotaryParams p) {
  const int64_t t = blockIdx.x;
  const int half = static_cast<int>(p.q.shape[2] / 2);
  const int q_pairs = static_cast<int>(p.q.shape[1]) * half, pairs = q_pairs + static_cast<int>(p.k.shape[1]) * half;
  const float position = static_cast<float>(p.positions[t]);
  for (int idx = threadIdx.x; idx < pairs; idx += blockDim.x) {
    const bool is_q = idx < q_pairs;
    const TensorView& view = is_q ? p.q : p.k;
    const int local = is_q ? idx : idx - q_pairs, head = local / half, i = local % half;
    T* x = static_cast<T*>(view.data) + t * view.stride[0] + head * view.stride[1];
    const float angle = position * p.inv_freq[i];
    const float c = round_to<T>(cosf(angle)), s = round_to<T>(sinf(angle));
    const float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
    x[i] = from_float<T>(round_to<T>(x1 * c) - round_to<T>(x2 * s));
    x[i + half] = from_float<T>(round_to<T>(x2 * c) + round_to<T>(x1 * s));
  }
}

}  // namespace
}  // namespace cuda

/// Launches `kernel<T>` for the view's dtype (float32 too: these ops have no tensor-core path).
#define BATCHLLM_LAYER_OP_LAUNCH(dtype, grid, block, stream, kernel, params)                       \
  switch (dtype) {                                                                                \
    case DType::kFloat32: BATCHLLM_LAUNCH(grid, block, 0, stream, kernel<float>)(params); break;  \
    case DType::kFloat16: BATCHLLM_LAUNCH(grid, block, 0, stream, kernel<__half>)(params); break; \
    case DType::kBFloat16:                                                                        \
      BATCHLLM_LAUNCH(grid, block, 0, stream, kernel<__nv_bfloat16>)(params);                    \
      break;                                                                                      \
  }

cudaError_t rms_norm_cuda(const RmsNormParams& p, cudaStream_t stream) {
  const int64_t rows = p.x.shape[0];
  if (rows == 0) return cudaSuccess;
  BATCHLLM_LAYER_OP_LAUNCH(p.x.dtype, static_cast<unsigned>(rows), cuda::kNormThreads, stream,
                           cuda::rms_norm_kernel, p);
  return cuda::last_launch_error();
}

cudaError_t silu_and_mul_cuda(const SiluAndMulParams& p, cudaStream_t stream) {
  const int64_t total = p.out.shape[0] * p.out.shape[1];
  if (total == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 65535));
  BATCHLLM_LAYER_OP_LAUNCH(p.out.dtype, grid, 256, stream, cuda::silu_and_mul_kernel, p);
  return cuda::last_launch_error();
}

cudaError_t rotary_embedding_cuda(const RotaryParams& p, cudaStream_t stream) {
  const int64_t tokens = p.q.shape[0];
  if (tokens == 0) return cudaSuccess;
  const int64_t pairs = (p.q.shape[1] + p.k.shape[1]) * (p.q.shape[2] / 2);
  const unsigned block = static_cast<unsigned>(std::min<int64_t>(512, (pairs + 31) / 32 * 32));
  BATCHLLM_LAYER_OP_LAUNCH(p.q.dtype, static_cast<unsigned>(tokens), block, stream, cuda::rotary_embedding_kernel, p);
  return cuda::last_launch_error();
}

#undef BATCHLLM_LAYER_OP_LAUNCH

}  // namespace batchllm::kernels
