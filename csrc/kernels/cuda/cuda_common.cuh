// Helpers shared by the CUDA kernels: element conversion, launch-error checks, dtype dispatch.
#pragma once

#include <cmath>
#include <cstdint>
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

/// Division of n in [0, 2^31) by a divisor d >= 1 fixed at run time, as a multiply-high, an add and a
/// shift (Granlund & Montgomery's round-up method, as PyTorch's IntDivider): the key loops divide
/// every key position by the block size, and a 32-bit division is ~25 instructions on the GPU.
struct FastDivisor {
  uint32_t divisor = 1, magic = 1, shift = 0;

  __host__ __device__ static FastDivisor make(uint32_t d) {
    FastDivisor f;
    f.divisor = d;
    while (f.shift < 32 && (uint64_t{1} << f.shift) < d) ++f.shift;
    f.magic = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << f.shift) - d)) / d + 1);
    return f;
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, magic) + n) >> shift; }
};

/// The paged K and V of one KV head of a cache [blocks, block_size, Hkv, D], for the key loops: base
/// addresses at the head, strides in bytes as 32-bit unsigned values (the bindings check that they
/// fit) and the block size as a FastDivisor, so that a key's address is a multiply-high, a shift and
/// one wide multiply-add on the base. Built once per CTA, held in registers.
template <typename T>
struct PagedKvHead {
  const char* k;
  const char* v;
  const int32_t* blocks;  // the sequence's (or prefix's) block list
  uint32_t k_block_bytes, k_slot_bytes, v_block_bytes, v_slot_bytes;
  FastDivisor block_size;

  __device__ __forceinline__ PagedKvHead(const TensorView& k_cache, const TensorView& v_cache,
                                         const int32_t* block_list, int kv_head, const FastDivisor& divisor)
      : k(static_cast<const char*>(k_cache.data) + kv_head * k_cache.stride[2] * sizeof(T)),
        v(static_cast<const char*>(v_cache.data) + kv_head * v_cache.stride[2] * sizeof(T)),
        blocks(block_list),
        k_block_bytes(static_cast<uint32_t>(k_cache.stride[0] * sizeof(T))),
        k_slot_bytes(static_cast<uint32_t>(k_cache.stride[1] * sizeof(T))),
        v_block_bytes(static_cast<uint32_t>(v_cache.stride[0] * sizeof(T))),
        v_slot_bytes(static_cast<uint32_t>(v_cache.stride[1] * sizeof(T))),
        block_size(divisor) {}

  /// The block table entry holding position pos (the one global load of a key's address).
  __device__ __forceinline__ uint32_t block_of(int pos) const {
    return static_cast<uint32_t>(blocks[block_size.div(static_cast<uint32_t>(pos))]);
  }
  __device__ __forceinline__ uint32_t slot_of(int pos) const {
    const uint32_t p = static_cast<uint32_t>(pos);
    return p - block_size.div(p) * block_size.divisor;
  }
  /// Byte offsets from the head's base of position pos's K and V rows, pos lying in block `block`
  /// (block_of(pos)).
  __device__ __forceinline__ uint64_t k_offset(uint32_t block, int pos) const {
    return static_cast<uint64_t>(block) * k_block_bytes + slot_of(pos) * k_slot_bytes;
  }
  __device__ __forceinline__ uint64_t v_offset(uint32_t block, int pos) const {
    return static_cast<uint64_t>(block) * v_block_bytes + slot_of(pos) * v_slot_bytes;
  }
  /// The addresses of byte `byte` of position pos's K and V rows.
  __device__ __forceinline__ const T* k_at(uint32_t block, int pos, uint32_t byte) const {
    return reinterpret_cast<const T*>(k + k_offset(block, pos) + byte);
  }
  __device__ __forceinline__ const T* v_at(uint32_t block, int pos, uint32_t byte) const {
    return reinterpret_cast<const T*>(v + v_offset(block, pos) + byte);
  }
};

/// Whether the attention launchers can take these caches and scale: PagedKvHead's 32-bit byte strides
/// of a block and a slot, and a positive scale (the softmax folds it in after the raw row max).
inline bool attention_args_fit(const TensorView& k_cache, const TensorView& v_cache, float scale) {
  return cache_stride_past_32_bits(k_cache) < 0 && cache_stride_past_32_bits(v_cache) < 0 && scale > 0.0f &&
         scale < INFINITY;
}

/// 2^x on the special-function unit with denormal results flushed to zero (ex2.approx.ftz.f32): one
/// instruction, where exp2f's denormal-safe form adds a compare and two multiplies around it. The
/// softmax loops only take it of arguments <= 0, whose denormal results are below any probability
/// that matters.
__device__ __forceinline__ float fast_exp2(float x) {
#if defined(BATCHLLM_CUDA_EMULATION_ACTIVE)
  const float y = exp2f(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

/// Whether the environment variable `name` equals `value`: the kernel variants kept for A/B
/// measurements are chosen so, at every launch (BATCHLLM_CASCADE_SUFFIX, BATCHLLM_ATTENTION_TILES).
inline bool env_equals(const char* name, const char* value) {
  const char* set = std::getenv(name);
  return set != nullptr && std::strcmp(set, value) == 0;
}

// Programmatic dependent launch (PDL, Hopper and later; BATCHLLM_PDL=1, opt-in until a GPU run
// decides). A kernel launched with it may start while the kernel before it on the stream finishes:
// its CTAs are scheduled as the earlier one's last CTAs exit, instead of after the whole grid is done
// and its completion has gone through the launch queue (a graph's kernel-to-kernel gap, ~1-2 us,
// paid ~10 times a layer). Every kernel here calls wait_for_prerequisite_grids() before it reads
// anything an earlier kernel of the step wrote, and before it writes global memory or exits, in every
// CTA: so a kernel's completion still implies its predecessors' (a CTA that exited without waiting
// would let the next kernel start while the one before it still runs). Each CTA also lets the next
// kernel launch as it starts (griddepcontrol.launch_dependents): the next kernel's CTAs are placed
// once every CTA of this one has started, so they never take an SM slot from one of this kernel's
// CTAs still unplaced, and their launch and prologue overlap this kernel's last wave. Launched
// without PDL, both are no-ops.

/// Blocks until the grids this one depends on have completed and their writes are visible
/// (griddepcontrol.wait); a no-op without PDL, before sm_90, and on the CPU emulation.
__device__ __forceinline__ void wait_for_prerequisite_grids() {
#if !defined(BATCHLLM_CUDA_EMULATION_ACTIVE) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

/// Lets the kernel after this one on the stream launch once every CTA of this one has called it (or
/// exited): griddepcontrol.launch_dependents; a no-op without PDL, before sm_90 and on the emulation.
__device__ __forceinline__ void allow_dependents_to_launch() {
#if !defined(BATCHLLM_CUDA_EMULATION_ACTIVE) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

/// A kernel's first step under PDL: allow_dependents_to_launch(), then wait_for_prerequisite_grids().
__device__ __forceinline__ void begin_dependent_kernel() {
  allow_dependents_to_launch();
  wait_for_prerequisite_grids();
}

/// The current device's compute capability as 10 major + minor (90: an H100), asked once per device;
/// 0 where it cannot be asked (the error is cleared). The kernels' choices by architecture read it at
/// every launch (wgmma_available, pdl_enabled).
inline int device_compute_capability() {
#if defined(BATCHLLM_CUDA_EMULATION_ACTIVE)
  return 0;
#else
  static int known[64] = {};  // 0: not asked yet; -1: asked, failed
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) {
    cudaGetLastError();
    return 0;
  }
  if (known[device] == 0) {
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess) {
      known[device] = 10 * major + minor;
    } else {
      cudaGetLastError();
      known[device] = -1;
    }
  }
  return known[device] > 0 ? known[device] : 0;
#endif
}

/// Whether launches use PDL: BATCHLLM_PDL=1 (read at every launch, like the other A/B switches) on a
/// device of compute capability 9.0 or later; never on the emulation, which runs launches in turn.
inline bool pdl_enabled() { return env_equals("BATCHLLM_PDL", "1") && device_compute_capability() >= 90; }

/// A kernel launch BATCHLLM_LAUNCH spells: with the programmatic stream serialization attribute where
/// pdl_enabled(), else (or if that launch is refused) a plain <<<>>> launch. Errors are left for
/// cudaGetLastError, as a <<<>>> launch leaves them.
template <typename... Params>
struct KernelLaunch {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;

  template <typename... Args>
  void operator()(const Args&... args) const {
#if !defined(BATCHLLM_CUDA_EMULATION_ACTIVE)
    if (pdl_enabled()) {
      cudaLaunchAttribute attribute[1];
      attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attribute[0].val.programmaticStreamSerializationAllowed = 1;
      cudaLaunchConfig_t config = {};
      config.gridDim = grid;
      config.blockDim = block;
      config.dynamicSmemBytes = smem;
      config.stream = stream;
      config.attrs = attribute;
      config.numAttrs = 1;
      if (cudaLaunchKernelEx(&config, kernel, args...) == cudaSuccess) return;
      cudaGetLastError();  // refused (an older driver): launch it plainly
    }
    kernel<<<grid, block, smem, stream>>>(args...);
#endif
  }
};

template <typename... Params>
KernelLaunch<Params...> make_launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                    cudaStream_t stream) {
  return KernelLaunch<Params...>{kernel, grid, block, smem, stream};
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
#define BATCHLLM_LAUNCH(grid, block, smem, stream, ...) \
  ::batchllm::kernels::cuda::make_launch(__VA_ARGS__, grid, block, smem, stream)
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
