// One tile of paged attention on Hopper's warpgroup MMA (wgmma.mma_async, sm_90a): the mma kernel's
// tile (attention_mma.cuh: same Problem, TileRows, grid, register layouts and online softmax), with
// its two matrix products on wgmma instead of ldmatrix + mma.sync:
//   - S (64 rows x 64 keys per warpgroup) = Q K^T: D / 16 wgmma m64n64k16, A = the Q fragments in
//     registers, B = the K tile in shared memory (K-major);
//   - O (64 rows x D) += P V: 4 wgmma m64nDk16, A = P from the S accumulators in registers, B = the
//     V tile in shared memory (N-major: V's head dims are the product's N).
// The tensor cores read K and V straight from shared memory (no ldmatrix through registers, no
// per-warp re-read of the tile's fragments), at the issue rate the H100's figures assume.
// 8 warps = 2 warpgroups = 128 rows per tile (mma128's tile; each K/V tile in shared memory serves 128
// rows). K/V tiles come by cp.async, two tiles ahead into three stages (one barrier per tile), in the
// core-matrix layout of wgmma.cuh, each thread copying 16 contiguous bytes (no bank conflicts); the
// finished rows leave through that space as in the mma kernel.
// Selected by BATCHLLM_ATTENTION_TILES=wgmma, or =wgmma-pipe for the pipelined form (the products of one
// key tile overlap the next tile's softmax; attention_wgmma below), where wgmma_available() (sm_90a
// build on a compute 9.0 device; otherwise mma128 runs) until a GPU run decides.
#pragma once

#include "kernels/cuda/attention_mma.cuh"
#include "kernels/cuda/wgmma.cuh"

namespace batchllm::kernels::cuda {

/// Shared memory of a wgmma tile: kStages K/V tiles in flight and computed (the finished rows reuse
/// the space), and the rows. Tile i + 2 is issued at iteration i into the stage of tile i + 2 -
/// kStages, which every warp finished with before iteration i's barrier: tile i - 1 with three
/// stages (the plain kernel); tile i - 2 with four (the pipelined one, whose products of tile i - 1
/// still read its V during iteration i). One barrier per key tile either way.
template <typename T, int D, int kStageCount>
struct WgmmaSmem {
  static constexpr int kLdO = D + 4;  // floats, for the finished rows
  static constexpr int kStages = kStageCount;
  union {
    struct {
      T k[kTileKeys * D];  // core matrix (key / 8, dim / 8) at ((key / 8) * (D / 8) + dim / 8) * 64 elements
      T v[kTileKeys * D];
    } kv[kStages];
    float o[kMaxTileRows * kLdO];
  };
  TileRows<T> rows;
};

template <typename T, int D, bool kPipelined>
using WgmmaSmemFor = WgmmaSmem<T, D, kPipelined ? 4 : 3>;

/// One work item of the wgmma tile kernel on a CTA of kWarps warps (a multiple of 4: whole
/// warpgroups; 16 rows per warp, the Problem's tile_rows = 16 * kWarps), in `smem_raw`
/// (WgmmaSmemFor<T, D, kPipelined>, 128-byte aligned).
///
/// Plain (kPipelined = false), per key tile i: S(i) = Q K(i)^T, wait; softmax; O += P(i) V(i), wait.
/// The tensor cores idle while the warpgroup computes its softmax.
/// Pipelined (flash-attention 3's intra-warpgroup overlap): S(i) and then O += P(i-1) V(i-1) are
/// issued together; the warpgroup waits for S(i) only, computes the softmax scores of tile i while
/// the tensor cores still run P(i-1) V(i-1), then waits for that, rescales O and packs P(i); the
/// last tile's P V follows the loop.
template <typename T, int D, int kWarps, bool kPipelined, typename Problem>
__device__ __forceinline__ void attention_wgmma(const Problem& problem, const dim3& item, unsigned char* smem_raw,
                                                const TensorView& k_cache, const TensorView& v_cache,
                                                float scale_log2) {
  static_assert(kWarps % 4 == 0 && 16 * kWarps <= kMaxTileRows, "whole warpgroups of 64 rows");
  constexpr int kThreads = 32 * kWarps;
  // Byte steps between core matrices (wgmma.cuh): K-major K tile: along dims 128, along keys 16 D;
  // N-major V tile: along keys (the product's K) 16 D, along dims (its N) 128.
  constexpr uint32_t kCoreBytes = 128, kKeyGroupBytes = 16 * D;
  using Smem = WgmmaSmemFor<T, D, kPipelined>;
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int t = lane % 4;

  if (!setup_rows(problem, sm.rows, k_cache, item)) return;

  // Warp w of warpgroup w / 4 holds rows 16 w + g and 16 w + g + 8 of the tile: the mma kernel's rows.
  uint32_t qa[D / 16][4];
  float o[D / 8][4];
  LaneRows rows = start_lane_rows<T, D>(sm.rows, warp, lane, qa, o);
  // P of a tile as the A fragments of its 4 16-key steps. All are packed before the first issue
  // (registers written between the issues of one group make ptxas wait for the earlier ones).
  // Pipelined: the P V of tile i - 1 is issued with the S of tile i. Tile 0 has no predecessor: its
  // iteration issues P = 0 over its own V (copied or zero-filled, so finite), an exact no-op, rather
  // than branch between wgmma instructions (ptxas serializes every wgmma of a kernel with a branch
  // there that it cannot prove warpgroup-uniform, warning C7520).
  uint32_t pa[kTileKeys / 16][4];
#pragma unroll
  for (int j = 0; j < kTileKeys / 16; ++j) pa[j][0] = pa[j][1] = pa[j][2] = pa[j][3] = 0u;
  const T* v_prev = sm.kv[0].v;

  // O += P V over the V tile `v_tile`: k-step j takes keys 16 j .. 16 j + 15, i.e. core-matrix rows
  // 2 j and 2 j + 1 of V. Issued, not waited for.
  auto issue_pv = [&](const T* v_tile) {
#pragma unroll
    for (int j = 0; j < kTileKeys / 16; ++j) {
      wgmma_m64k16<T, D, true>(o, pa[j], wgmma_descriptor(v_tile + j * 2 * kKeyGroupBytes / sizeof(T),
                                                          kKeyGroupBytes, kCoreBytes));
    }
  };

  const int keys_end = sm.rows.num_keys;
  const PagedKvHead<T> kv(k_cache, v_cache, sm.rows.blocks, sm.rows.kv_head, sm.rows.block_div);
  KvTileBlocksFor<T, D, kThreads, true> next;  // block table entries of the next tile to issue
  // Prologue: tiles 0 and 1 in flight, one cp.async group each (past the end, a group of zero-fills:
  // every iteration commits one group and waits for all but the newest, with no branch); tile 2's
  // entries loaded.
  for (int i = 0; i < 2; ++i) {
    const int key = sm.rows.key_begin + i * kTileKeys;
    prefetch_kv_blocks<T, D, kThreads, true>(next, kv, keys_end, key);
    issue_kv_tile<T, D, kThreads, true>(sm.kv[i].k, sm.kv[i].v, kv, keys_end, key, next);
  }
  prefetch_kv_blocks<T, D, kThreads, true>(next, kv, keys_end, sm.rows.key_begin + 2 * kTileKeys);
  int stage = 0;
  for_each_key_tile(sm.rows, [&](int first_key, auto masked) {
    constexpr bool kMasked = decltype(masked)::value;
    cp_async_wait<1>();          // this tile's group; the next tile's may still be in flight
    fence_proxy_async_shared();  // this thread's copies, before the async proxy (wgmma) reads them
    __syncthreads();             // every thread's copies of this tile are in, and every warp is done with
                                 // the stage the refill below overwrites (WgmmaSmem)
    const T* k_tile = sm.kv[stage].k;
    const T* v_tile = sm.kv[stage].v;
    // Tile i + 2's copies (zero-fills past the end), issued once this iteration's products are: the
    // tensor cores work while the threads issue them; the next tile's entries are loaded meanwhile.
    auto refill = [&] {
      const int refill_stage = (stage + 2) % Smem::kStages;
      issue_kv_tile<T, D, kThreads, true>(sm.kv[refill_stage].k, sm.kv[refill_stage].v, kv, keys_end,
                                          first_key + 2 * kTileKeys, next);
      prefetch_kv_blocks<T, D, kThreads, true>(next, kv, keys_end, first_key + 3 * kTileKeys);
    };

    // S = Q K^T: k-step kk takes dims 16 kk .. 16 kk + 15, i.e. core-matrix columns 2 kk and 2 kk + 1.
    float s[kTileKeys / 8][4];
#pragma unroll
    for (int n = 0; n < kTileKeys / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
    wgmma_fence_operands(s);
    wgmma_fence_operands(o);
    wgmma_fence();  // S zeroed, and (pipelined) O rescaled and P packed by the threads since the last issue
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      wgmma_m64k16<T, kTileKeys, false>(s, qa[kk], wgmma_descriptor(k_tile + kk * 16 * 8, kCoreBytes,
                                                                      kKeyGroupBytes));
    }
    wgmma_commit();
    if constexpr (kPipelined) {
      issue_pv(v_prev);
      wgmma_commit();
      refill();
      wgmma_wait<1>();  // S of this tile; the previous tile's P V may still run
      wgmma_fence_operands(s);
      const RowScale scale = softmax_scores<kMasked>(s, rows, first_key, t, scale_log2);
      wgmma_fence_operands(s);  // the probabilities are computed before the wait below, not after it
      wgmma_wait<0>();  // the previous P V: O and P are the threads' again
      wgmma_fence_operands(o);
      rescale_rows<D>(o, scale);
#pragma unroll
      for (int j = 0; j < kTileKeys / 16; ++j) p_fragment<T>(pa[j], s, j);
      v_prev = v_tile;
    } else {
      refill();
      wgmma_wait<0>();
      wgmma_fence_operands(s);
      softmax_tile<D, kMasked>(s, o, rows, first_key, t, scale_log2);
#pragma unroll
      for (int j = 0; j < kTileKeys / 16; ++j) p_fragment<T>(pa[j], s, j);
      wgmma_fence_operands(o);
      wgmma_fence();  // O rescaled and P packed by the threads
      issue_pv(v_tile);
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_operands(o);
    }
    stage = stage == Smem::kStages - 1 ? 0 : stage + 1;
  });
  if (kPipelined && sm.rows.key_begin < keys_end) {  // the last tile's P V
    wgmma_fence_operands(o);
    wgmma_fence();
    issue_pv(v_prev);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(o);
  }
  cp_async_wait<0>();  // the zero-fills past the end land before the finished rows reuse their space
  write_tile_rows<T, D, Smem::kLdO>(problem, item, o, rows, sm.o, sm.rows, warp, lane);
}

/// CTAs an SM the wgmma tile kernel is held to by registers: 2 for the plain (not pipelined) 128-row
/// tile at d = 64, which fits 128 registers without spills (ptxas, nvcc 13), so that one CTA's
/// softmax runs while the other's products do (the pipelined tile overlaps them within a CTA, at
/// 148-162 registers: one CTA an SM); 1 elsewhere.
template <int D, int kWarps, bool kPipelined>
constexpr int kWgmmaMinCtas = D == 64 && kWarps == 8 && !kPipelined ? 2 : 1;

/// The wgmma tile kernel: grid and Problem as attention_tile_kernel, 32 * kWarps threads; dynamic
/// smem: WgmmaSmem.
template <typename T, int D, typename Problem, int kWarps, bool kPipelined>
__global__ void __launch_bounds__(32 * kWarps, (kWgmmaMinCtas<D, kWarps, kPipelined>))
    attention_wgmma_kernel(Problem problem, TensorView k_cache, TensorView v_cache, float scale_log2) {
  BATCHLLM_DYNAMIC_SHARED_MEMORY(smem_raw);
  attention_wgmma<T, D, kWarps, kPipelined>(problem, blockIdx, smem_raw, k_cache, v_cache, scale_log2);
}

}  // namespace batchllm::kernels::cuda
