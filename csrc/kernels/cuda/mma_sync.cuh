// The warp-level tensor-core instruction mma.sync.m16n8k16 (sm_80+), fp16/bf16 in, float32 accumulate,
// with the fragment layout of the PTX ISA ("Matrix Fragments for mma.m16n8k16"). For lane l,
// g = l / 4 (group) and t = l % 4 (thread in group):
//   A (16 x 16, row-major), 4 x 32-bit registers of 2 elements (lower column in the low half):
//     a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9]
//   B (16 x 8, k x n), 2 registers: b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]
//   C, D (16 x 8, float): c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
// So the C fragments of two neighbouring n-blocks are, element for element, the A fragment of one
// k-step: an attention kernel turns its scores into the probabilities operand without moving them.
// The CPU emulation implements the same layout (tests/cpp/cuda_emulation).
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels/cuda/cuda_common.cuh"

namespace batchllm::kernels::cuda {

/// d += a * b for one warp's 16 x 8 x 16 tile.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(BATCHLLM_CUDA_EMULATION_ACTIVE)
  batchllm_emulation::mma_m16n8k16(d, a, b, std::is_same_v<T, __nv_bfloat16>);
#else
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

/// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: four 8 x 8 matrices of 16-bit elements from
/// shared memory, warp-collective. Lane l gives the address of row l % 8 of matrix l / 8 (16-byte
/// aligned); register i receives, of matrix i, elements [l / 4][2 (l % 4)] and [l / 4][2 (l % 4) + 1]
/// (with .trans: [2 (l % 4)][l / 4] and [2 (l % 4) + 1][l / 4]) - exactly an mma A or B fragment.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(BATCHLLM_CUDA_EMULATION_ACTIVE)
  batchllm_emulation::ldmatrix_x4(r, row, kTrans);
#else
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  }
#endif
}

/// cp.async.cg.shared.global: 16 bytes from global to shared memory without passing through
/// registers (sm_80+); zero-filled when !valid (then src is not read). Visible after
/// cp_async_wait<N>() in the issuing thread, and to others after a barrier that follows it.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* global_src, bool valid) {
#if defined(BATCHLLM_CUDA_EMULATION_ACTIVE)
  batchllm_emulation::cp_async_16(smem_dst, global_src, valid);
#else
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global_src),
               "r"(valid ? 16 : 0));
#endif
}

/// Closes the group of the cp_async_16 calls issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#if defined(BATCHLLM_CUDA_EMULATION_ACTIVE)
  batchllm_emulation::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

/// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(BATCHLLM_CUDA_EMULATION_ACTIVE)
  batchllm_emulation::cp_async_wait(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

/// Two floats as one register of two 16-bit T (lo in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T l = from_float<T>(lo), h = from_float<T>(hi);
  uint16_t lb, hb;
  memcpy(&lb, &l, 2);
  memcpy(&hb, &h, 2);
  return static_cast<uint32_t>(lb) | (static_cast<uint32_t>(hb) << 16);
}

/// Two 16-bit elements from two addresses as one register (lo in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(const T* lo, const T* hi) {
  uint16_t lb, hb;
  memcpy(&lb, lo, 2);
  memcpy(&hb, hi, 2);
  return static_cast<uint32_t>(lb) | (static_cast<uint32_t>(hb) << 16);
}

}  // namespace batchllm::kernels::cuda
