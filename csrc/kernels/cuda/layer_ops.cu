// CUDA layer ops (rms_norm, silu_and_mul, rotary_embedding; batchllm/kernels.h): the element-wise work
// between a decoder layer's GEMMs, one launch each where torch runs a chain of small kernels (about
// 28 per layer: a decode step of a 1B model spent a third of its device time in them on an H100,
// 2026-11-27, bench/profile_e2e.py). Same float32 math and the same roundings as the CPU references
// (csrc/kernels/cpu/layer_ops.cpp); only the order of rms_norm's sum of squares differs.
#include <algorithm>

#include "batchllm/kernels/cuda.h"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/store_token_kv.cuh"

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

/// kSize elements of T that one thread loads or stores at once: 16 bytes where a row's base, stride and
/// width allow (RowVec<T, true>; rows_in_vectors decides), else one element; the per-element math is
/// the same either way.
template <typename T, int kSize>
struct alignas(sizeof(T) * kSize) Vec {
  T v[kSize];
};

template <typename T, bool kVector>
using RowVec = Vec<T, kVector ? 16 / static_cast<int>(sizeof(T)) : 1>;

template <typename V, typename T>
__device__ __forceinline__ V load_vec(const T* p) {
  return *reinterpret_cast<const V*>(p);
}

template <typename V, typename T>
__device__ __forceinline__ void store_vec(T* p, const V& value) {
  *reinterpret_cast<V*>(p) = value;
}

/// One CTA per row: (residual add,) sum of squares, then the normalised row times the weight. The
/// second pass reads the row again (from L1/L2: a row is a few KB), so `out` may alias `x`. A thread
/// takes 16 contiguous bytes at a time where kVector (a hidden of 2,048 bf16 is one vector a thread:
/// elementwise, its loads waited one after another behind the residual's stores, 7 us a call on an
/// H100 at 256 rows, 2026-11-27).
template <typename T, bool kVector>
__global__ void __launch_bounds__(kNormThreads) rms_norm_kernel(RmsNormParams p) {
  begin_dependent_kernel();  // PDL: cuda_common.cuh
  using V = RowVec<T, kVector>;
  constexpr int kPer = sizeof(V) / sizeof(T);
  __shared__ float warp_sums[kNormThreads / 32];
  const int64_t row = blockIdx.x, hidden = p.x.shape[1];
  const T* x = static_cast<const T*>(p.x.data) + row * p.x.stride[0];
  T* residual = p.residual.data != nullptr ? static_cast<T*>(p.residual.data) + row * p.residual.stride[0] : nullptr;
  const T* weight = static_cast<const T*>(p.weight.data);
  T* out = static_cast<T*>(p.out.data) + row * p.out.stride[0];
  float sum_squares = 0.0f;
  for (int64_t i = threadIdx.x * kPer; i < hidden; i += kNormThreads * kPer) {
    V v = load_vec<V>(x + i);
    if (residual != nullptr) {
      const V r = load_vec<V>(residual + i);
#pragma unroll
      for (int j = 0; j < kPer; ++j) v.v[j] = from_float<T>(to_float(v.v[j]) + to_float(r.v[j]));
      store_vec(residual + i, v);
    }
#pragma unroll
    for (int j = 0; j < kPer; ++j) sum_squares += to_float(v.v[j]) * to_float(v.v[j]);
  }
  const float inv_rms = 1.0f / sqrtf(block_sum(sum_squares, warp_sums) / static_cast<float>(hidden) + p.eps);
  const T* normed_source = residual != nullptr ? residual : x;
  for (int64_t i = threadIdx.x * kPer; i < hidden; i += kNormThreads * kPer) {
    const V source = load_vec<V>(normed_source + i), w = load_vec<V>(weight + i);
    V o;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      o.v[j] = from_float<T>(to_float(w.v[j]) * round_to<T>(to_float(source.v[j]) * inv_rms));
    }
    store_vec(out + i, o);
  }
}

/// out = round(round(silu(gate)) * up) over [T, I]: a thread per kVector ? 16 bytes : one element of
/// a row (blockIdx.x, threadIdx.x), rows by blockIdx.y strided by gridDim.y. (A grid-stride loop over
/// T x I divided a 64-bit index per element: 14 us a call at 256 x 8,192 on an H100, 3x its bytes.)
template <typename T, bool kVector>
__global__ void silu_and_mul_kernel(SiluAndMulParams p) {
  begin_dependent_kernel();  // PDL: cuda_common.cuh
  using V = RowVec<T, kVector>;
  constexpr int kPer = sizeof(V) / sizeof(T);
  const int64_t width = p.out.shape[1], rows = p.out.shape[0];
  const int64_t col = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) * kPer;
  if (col >= width) return;
  for (int64_t t = blockIdx.y; t < rows; t += gridDim.y) {
    const T* gate_row = static_cast<const T*>(p.gate_up.data) + t * p.gate_up.stride[0];
    const V gate = load_vec<V>(gate_row + col), up = load_vec<V>(gate_row + width + col);
    V o;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const float g = to_float(gate.v[j]);
      const float silu = round_to<T>(g / (1.0f + expf(-g)));
      o.v[j] = from_float<T>(silu * to_float(up.v[j]));
    }
    store_vec(static_cast<T*>(p.out.data) + t * p.out.stride[0] + col, o);
  }
}

constexpr int kRopeTable = 128;  // cos/sin entries a rotary CTA keeps in shared memory at once

/// One CTA per token. Its cos and sin (of position x inv_freq[i], rounded to T) go to shared memory
/// once, kRopeTable frequencies at a time (each was computed by every head before: 40 times at
/// llama-1b); then a thread per (head, i) pair of q's then k's heads rotates x[i] and x[i + D/2] (it
/// reads both before writing either: in place). With a slot mapping, the CTA then writes its token's
/// rotated k rows and v rows to their paged slot (store_kv fused in).
template <typename T>
__global__ void rotary_embedding_kernel(RotaryParams p) {
  begin_dependent_kernel();  // PDL: cuda_common.cuh
  __shared__ float cos_table[kRopeTable], sin_table[kRopeTable];
  const int64_t t = blockIdx.x;
  const int half = static_cast<int>(p.q.shape[2] / 2), q_heads = static_cast<int>(p.q.shape[1]);
  const int heads = q_heads + static_cast<int>(p.k.shape[1]);
  const float position = static_cast<float>(p.positions[t]);
  for (int first = 0; first < half; first += kRopeTable) {
    const int count = min(kRopeTable, half - first);
    __syncthreads();  // the previous frequencies' pairs are done with the tables
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
      const float angle = position * p.inv_freq[first + i];
      cos_table[i] = round_to<T>(cosf(angle));
      sin_table[i] = round_to<T>(sinf(angle));
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < heads * count; idx += blockDim.x) {
      const int head = idx / count, i = first + idx % count;
      const bool is_q = head < q_heads;
      const TensorView& view = is_q ? p.q : p.k;
      T* x = static_cast<T*>(view.data) + t * view.stride[0] + (is_q ? head : head - q_heads) * view.stride[1];
      const float c = cos_table[i - first], s = sin_table[i - first];
      const float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
      x[i] = from_float<T>(round_to<T>(x1 * c) - round_to<T>(x2 * s));
      x[i + half] = from_float<T>(round_to<T>(x2 * c) + round_to<T>(x1 * s));
    }
  }
  if (p.slot_mapping == nullptr) return;
  const int64_t slot = p.slot_mapping[t];  // the fused store: the same for the whole CTA
  if (slot < 0) return;
  __syncthreads();  // every thread's rotated k elements are written (and visible to the CTA) first
  store_token_kv(p.k, p.v, p.k_cache, p.v_cache, t, slot);
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

/// BATCHLLM_LAYER_OP_LAUNCH of `kernel<T, true>` (rows in 16-byte vectors) where `vector`, else of
/// `kernel<T, false>`.
#define BATCHLLM_ROW_OP_LAUNCH(dtype, vector, grid, block, stream, kernel, params)                       \
  switch (dtype) {                                                                                      \
    case DType::kFloat32:                                                                               \
      if (vector) BATCHLLM_LAUNCH(grid, block, 0, stream, kernel<float, true>)(params);                 \
      else BATCHLLM_LAUNCH(grid, block, 0, stream, kernel<float, false>)(params);                       \
      break;                                                                                            \
    case DType::kFloat16:                                                                               \
      if (vector) BATCHLLM_LAUNCH(grid, block, 0, stream, kernel<__half, true>)(params);                \
      else BATCHLLM_LAUNCH(grid, block, 0, stream, kernel<__half, false>)(params);                      \
      break;                                                                                            \
    case DType::kBFloat16:                                                                              \
      if (vector) BATCHLLM_LAUNCH(grid, block, 0, stream, kernel<__nv_bfloat16, true>)(params);         \
      else BATCHLLM_LAUNCH(grid, block, 0, stream, kernel<__nv_bfloat16, false>)(params);               \
      break;                                                                                            \
  }

namespace {

/// Whether a [rows, width] view's rows (from column `offset`) can be read in 16-byte vectors: its
/// base, row stride, offset and width all multiples of 16 bytes. A 1-d view is one row.
bool rows_in_vectors(const TensorView& view, int64_t width, int64_t offset = 0) {
  const int64_t bytes = dtype_size(view.dtype), row_stride = view.ndim == 1 ? 0 : view.stride[0];
  return reinterpret_cast<uintptr_t>(view.data) % 16 == 0 && (row_stride * bytes) % 16 == 0 &&
         (width * bytes) % 16 == 0 && (offset * bytes) % 16 == 0;
}

}  // namespace

cudaError_t rms_norm_cuda(const RmsNormParams& p, cudaStream_t stream) {
  const int64_t rows = p.x.shape[0], hidden = p.x.shape[1];
  if (rows == 0) return cudaSuccess;
  const bool vector = rows_in_vectors(p.x, hidden) && rows_in_vectors(p.out, hidden) &&
                      rows_in_vectors(p.weight, hidden) &&
                      (p.residual.data == nullptr || rows_in_vectors(p.residual, hidden));
  BATCHLLM_ROW_OP_LAUNCH(p.x.dtype, vector, static_cast<unsigned>(rows), cuda::kNormThreads, stream,
                         cuda::rms_norm_kernel, p);
  return cuda::last_launch_error();
}

cudaError_t silu_and_mul_cuda(const SiluAndMulParams& p, cudaStream_t stream) {
  const int64_t rows = p.out.shape[0], width = p.out.shape[1];
  if (rows * width == 0) return cudaSuccess;
  const bool vector = rows_in_vectors(p.gate_up, width) && rows_in_vectors(p.gate_up, width, width) &&
                      rows_in_vectors(p.out, width);
  const int64_t per_thread = vector ? 16 / dtype_size(p.out.dtype) : 1;
  const dim3 grid(static_cast<unsigned>((width / per_thread + 255) / 256),
                  static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
  BATCHLLM_ROW_OP_LAUNCH(p.out.dtype, vector, grid, 256, stream, cuda::silu_and_mul_kernel, p);
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
#undef BATCHLLM_ROW_OP_LAUNCH

}  // namespace batchllm::kernels
