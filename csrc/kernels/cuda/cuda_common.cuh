// Helpers shared by the CUDA kernels: element conversion, launch-error checks, dtype dispatch.
#pragma once

#include <cstdlib>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "batchllm/kernels.h"

namespace batchllm::kernels::cuda {

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

/// The error of the launch just made (configuration errors, or a fault of an earlier kernel).
inline cudaError_t last_launch_error() { return cudaGetLastError(); }

/// Element offset of position `pos` of KV head `kv_head` in a paged cache [blocks, block_size, Hkv, D]
/// whose blocks for this sequence (or prefix) are listed in `blocks`.
__device__ __forceinline__ int64_t paged_kv_offset(const TensorView& cache, const int32_t* blocks, int block_size,
                                                   int kv_head, int pos) {
  const int64_t block = blocks[pos / block_size], slot = pos % block_size;
  return block * cache.stride[0] + slot * cache.stride[1] + kv_head * cache.stride[2];
}

/// Whether the environment variable `name` equals `value`: the kernel variants kept for A/B
/// measurements are chosen so, at every launch (BATCHLLM_CASCADE_SUFFIX, BATCHLLM_ATTENTION_TILES).
inline bool env_equals(const char* name, const char* value) {
  const char* set = std::getenv(name);
  return set != nullptr && std::strcmp(set, value) == 0;
}

}  // namespace batchllm::kernels::cuda

/// Launch and dynamic shared memory spelled so that the kernels also compile as C++ for the CPU
/// emulation that tests them where there is no GPU (tests/cpp/cuda_emulation): the kernel goes last,
/// so that a template's commas need no parentheses.
///   BATCHLLM_LAUNCH(grid, block, smem, stream, kernel<T, D>)(args...);
#if defined(BATCHLLM_CUDA_EMULATION_ACTIVE)
#define BATCHLLM_LAUNCH(grid, block, smem, stream, ...) \
  ::batchllm_emulation::launch(__VA_ARGS__, grid, block, smem, stream)
#define BATCHLLM_DYNAMIC_SHARED_MEMORY(name) unsigned char* name = ::batchllm_emulation::dynamic_shared_memory()
#else
#define BATCHLLM_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define BATCHLLM_DYNAMIC_SHARED_MEMORY(name) extern __shared__ __align__(128) unsigned char name[]
#endif

/// Returns from the enclosing launcher with the error of the expression, if any.
#define BATCHLLM_CUDA_RETURN_IF_ERROR(expr)    \
  do {                                         \
    const cudaError_t batchllm_err_ = (expr);  \
    if (batchllm_err_ != cudaSuccess) return batchllm_err_; \
  } while (0)

/// Runs `...` with `scalar_t` bound to the CUDA type of a 16-bit `dtype`; float32 -> invalid value.
#define BATCHLLM_DISPATCH_HALF_TYPES(dtype, ...)                                   \
  [&]() -> cudaError_t {                                                           \
    if ((dtype) == ::batchllm::kernels::DType::kFloat16) {                         \
      using scalar_t = __half;                                                     \
      return __VA_ARGS__();                                                        \
    }                                                                              \
    if ((dtype) == ::batchllm::kernels::DType::kBFloat16) {                        \
      using scalar_t = __nv_bfloat16;                                              \
      return __VA_ARGS__();                                                        \
    }                                                                              \
    return cudaErrorInvalidValue;                                                  \
  }()

/// Runs `...` with `kHeadDim` bound to a compiled head dim (64 or 128); others -> invalid value.
#define BATCHLLM_DISPATCH_HEAD_DIM(head_dim, ...)   \
  [&]() -> cudaError_t {                            \
    if ((head_dim) == 64) {                         \
      constexpr int kHeadDim = 64;                  \
      return __VA_ARGS__();                         \
    }                                               \
    if ((head_dim) == 128) {                        \
      constexpr int kHeadDim = 128;                 \
      return __VA_ARGS__();                         \
    }                                               \
    return cudaErrorInvalidValue;                   \
  }()
