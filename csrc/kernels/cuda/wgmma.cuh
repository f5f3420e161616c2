// Hopper's warpgroup matrix multiply (wgmma.mma_async, sm_90a only), the form attention_wgmma.cuh
// uses: D (64 x N, float) += A (64 x 16, 16-bit, in registers) * B (16 x N, 16-bit, in shared memory
// through a matrix descriptor), issued by the 4 warps of a warpgroup (128 threads) together.
//
// Register layouts (PTX ISA, "Register Fragments", m64nNk16): warp w of the warpgroup holds rows
// 16w .. 16w + 15; within the warp they are mma.m16n8k16's (mma_sync.cuh): A's 4 registers are the
// A fragment of its 16 rows; D's N / 2 floats are N / 8 blocks of 4, block i being the C fragment of
// columns 8i .. 8i + 7. So attention keeps flash-attention 2's register code: the S accumulators of
// two neighbouring key blocks are the A fragment of P for one 16-key step.
//
// Shared memory (PTX ISA, "Shared Memory Matrix Layout", no swizzle): B is made of core matrices of
// 8 rows x 16 bytes (8 elements), each 128 contiguous bytes. K-major B (trans_b = 0; K's rows are
// keys, its columns head dims: S = Q K^T) has core-matrix rows along N; N-major B (trans_b = 1; V's
// rows are keys along K: O = P V) has them along K. Either way the descriptor gives the byte step
// between core matrices along K (leading byte offset, LBO) and along N (stride byte offset, SBO).
// attention_wgmma.cuh stores a 64-key K or V tile as core matrix (key / 8, dim / 8) at
// ((key / 8) * (D / 8) + dim / 8) * 128 bytes, so K is LBO = 128, SBO = 16 D and V is LBO = 16 D,
// SBO = 128.
//
// Ordering (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate Instructions"):
// wgmma_fence() before the first wgmma that reads registers the threads wrote; wgmma_commit() closes a
// group; wgmma_wait<N>() until at most N groups are in flight - the accumulators are not to be touched
// before it. Shared memory written by the threads (cp.async included) is read by wgmma through the
// async proxy: fence_proxy_async_shared() after the writes and before the barrier that publishes them.
// The CPU emulation (tests/cpp/cuda_emulation) implements the same reading of the layouts, and adds
// the product only at the wait.
#pragma once

#include <cstdint>

#include "kernels/cuda/cuda_common.cuh"

namespace batchllm::kernels::cuda {

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Built for an architecture without wgmma (every one but sm_90a): the launchers never run these
// kernels there (wgmma_available()); a launch anyway traps rather than computing garbage.
#define BATCHLLM_WGMMA_UNAVAILABLE 1
#endif

/// Whether the wgmma kernels can run on the current device: this build holds sm_90a code
/// (CMAKE_CUDA_ARCHITECTURES with 90a: BATCHLLM_CUDA_HAS_SM90A) and the device is compute 9.0; always
/// on the CPU emulation.
inline bool wgmma_available() {
#if defined(BATCHLLM_CUDA_EMULATION_ACTIVE)
  return true;
#elif defined(BATCHLLM_CUDA_HAS_SM90A)
  return device_compute_capability() == 90;
#else
  return false;
#endif
}

/// The 64-bit descriptor of a no-swizzle matrix at `smem` (16-byte aligned) with the byte steps
/// between core matrices along K (lbo) and along M/N (sbo): bits 0-13 address >> 4, 16-29 lbo >> 4,
/// 32-45 sbo >> 4, base offset 0, swizzle mode 0.
__device__ __forceinline__ uint64_t wgmma_descriptor(const void* smem, uint32_t lbo, uint32_t sbo) {
#if defined(BATCHLLM_CUDA_EMULATION_ACTIVE)
  const uint64_t address = static_cast<uint64_t>(static_cast<const unsigned char*>(smem) -
                                                 ::batchllm_emulation::dynamic_shared_memory());
#else
  const uint64_t address = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
#endif
  return ((address & 0x3FFFF) >> 4) | (static_cast<uint64_t>((lbo & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((sbo & 0x3FFFF) >> 4) << 32);
}

__device__ __forceinline__ void wgmma_fence() {
#if defined(BATCHLLM_CUDA_EMULATION_ACTIVE)
#elif defined(BATCHLLM_WGMMA_UNAVAILABLE)
  __trap();
#else
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#if defined(BATCHLLM_CUDA_EMULATION_ACTIVE)
  ::batchllm_emulation::wgmma_commit();
#elif defined(BATCHLLM_WGMMA_UNAVAILABLE)
  __trap();
#else
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#if defined(BATCHLLM_CUDA_EMULATION_ACTIVE)
  ::batchllm_emulation::wgmma_wait(kPending);
#elif defined(BATCHLLM_WGMMA_UNAVAILABLE)
  __trap();
#else
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}

/// Orders this thread's earlier shared-memory writes (generic proxy, cp.async included) before later
/// reads of the async proxy (wgmma).
__device__ __forceinline__ void fence_proxy_async_shared() {
#if !defined(BATCHLLM_CUDA_EMULATION_ACTIVE) && !defined(BATCHLLM_WGMMA_UNAVAILABLE)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

/// Keeps the compiler from moving accesses of the accumulators across a wgmma issue or wait (the
/// registers are the instruction's until the wait).
template <int kBlocks>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[kBlocks][4]) {
#if !defined(BATCHLLM_CUDA_EMULATION_ACTIVE)
#pragma unroll
  for (int i = 0; i < kBlocks; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+f"(d[i][j])::"memory");
  }
#endif
}

// The accumulator operands of an m64nN instruction: d[N / 8][4], in order (n128: n64's, then 8 more blocks).
#define BATCHLLM_WGMMA_D64                                                                         \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),                                      \
  "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),                                      \
  "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),                                      \
  "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),                                      \
  "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),                                      \
  "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),                                      \
  "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),                                      \
  "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
#define BATCHLLM_WGMMA_D128                                                                        \
  BATCHLLM_WGMMA_D64,                                                                              \
  "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),                                      \
  "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),                                      \
  "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),                                  \
  "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),                                  \
  "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),                                  \
  "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),                                  \
  "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),                                  \
  "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])

#define BATCHLLM_WGMMA_M64N64K16(TYPE, TRANS_B)                                                    \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." #TYPE "." #TYPE " {"                           \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "           \
      "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"                       \
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, " #TRANS_B ";\n}\n"                                  \
      : BATCHLLM_WGMMA_D64                                                                         \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))
#define BATCHLLM_WGMMA_M64N128K16(TYPE, TRANS_B)                                                   \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." #TYPE "." #TYPE " {"                          \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "           \
      "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, "           \
      "%34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, "           \
      "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"                       \
      "}, {%64, %65, %66, %67}, %68, p, 1, 1, " #TRANS_B ";\n}\n"                                  \
      : BATCHLLM_WGMMA_D128                                                                        \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))

#define BATCHLLM_WGMMA_SS_M64N64K16(TYPE, TRANS_B)                                                 \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." #TYPE "." #TYPE " {"                           \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "           \
      "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"                       \
      "}, %32, %33, p, 1, 1, 0, " #TRANS_B ";\n}\n"                                                \
      : BATCHLLM_WGMMA_D64                                                                         \
      : "l"(desc_a), "l"(desc_b), "r"(1))
#define BATCHLLM_WGMMA_SS_M64N128K16(TYPE, TRANS_B)                                                \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." #TYPE "." #TYPE " {"                          \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "           \
      "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, "           \
      "%34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, "           \
      "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"                       \
      "}, %64, %65, p, 1, 1, 0, " #TRANS_B ";\n}\n"                                                \
      : BATCHLLM_WGMMA_D128                                                                        \
      : "l"(desc_a), "l"(desc_b), "r"(1))

// The instruction of one operand form for N (64 or 128), T (kBf16) and B's major-ness (kTransB):
// BATCHLLM_WGMMA_FORMS(the form's n64 macro, its n128 macro), inside a function that has them.
#define BATCHLLM_WGMMA_FORMS(M64, M128)                                                            \
  do {                                                                                             \
    if constexpr (N == 64) {                                                                       \
      if constexpr (kBf16 && kTransB) M64(bf16, 1);                                                \
      else if constexpr (kBf16) M64(bf16, 0);                                                      \
      else if constexpr (kTransB) M64(f16, 1);                                                     \
      else M64(f16, 0);                                                                            \
    } else {                                                                                       \
      if constexpr (kBf16 && kTransB) M128(bf16, 1);                                               \
      else if constexpr (kBf16) M128(bf16, 0);                                                     \
      else if constexpr (kTransB) M128(f16, 1);                                                    \
      else M128(f16, 0);                                                                           \
    }                                                                                              \
  } while (0)

/// d += A * B for one warpgroup with A (64 x 16, K-major, no swizzle) in shared memory too, at
/// desc_a: the warpgroup's rows need no registers (flash-attention 3 keeps Q there). B as
/// wgmma_m64k16's.
template <typename T, int N, bool kTransB>
__device__ __forceinline__ void wgmma_m64k16_ss(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b) {
  static_assert(N == 64 || N == 128, "wgmma shapes built: n64, n128");
#if defined(BATCHLLM_CUDA_EMULATION_ACTIVE)
  ::batchllm_emulation::wgmma_m64k16_ss(&d[0][0], N, desc_a, desc_b, kTransB, std::is_same_v<T, __nv_bfloat16>);
#elif defined(BATCHLLM_WGMMA_UNAVAILABLE)
  __trap();
#else
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  BATCHLLM_WGMMA_FORMS(BATCHLLM_WGMMA_SS_M64N64K16, BATCHLLM_WGMMA_SS_M64N128K16);
#endif
}

/// d += a * B for one warpgroup, B (16 x N) at desc_b: K-major (kTransB = false) or N-major (true).
/// T: __half or __nv_bfloat16; N: 64 or 128.
template <typename T, int N, bool kTransB>
__device__ __forceinline__ void wgmma_m64k16(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b) {
  static_assert(N == 64 || N == 128, "wgmma shapes built: n64, n128");
#if defined(BATCHLLM_CUDA_EMULATION_ACTIVE)
  ::batchllm_emulation::wgmma_m64k16(&d[0][0], N, a, desc_b, kTransB, std::is_same_v<T, __nv_bfloat16>);
#elif defined(BATCHLLM_WGMMA_UNAVAILABLE)
  __trap();
#else
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  BATCHLLM_WGMMA_FORMS(BATCHLLM_WGMMA_M64N64K16, BATCHLLM_WGMMA_M64N128K16);
#endif
}

}  // namespace batchllm::kernels::cuda
