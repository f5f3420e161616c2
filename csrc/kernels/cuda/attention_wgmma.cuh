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
// =wgmma-k128 is the pipelined form on 128-key tiles (flash-attention 3's tile at d = 64 and 128):
// S is one m64n128 product per 16 dims, so each barrier, O rescale, row-max reduction and wgmma
// wait serves twice the keys; one tile ahead in flight (as many bytes as two 64-key tiles), in three
// stages (192 KB at d = 128, 96 KB at d = 64; one CTA an SM). Q waits in shared memory (32 KB at
// d = 128) for both operands of S to come from there, as in flash-attention 3: with Q's 32 fragment
// registers the d = 128 kernel needed 255 registers and spilled (ptxas, sm_90a).
// Why: a 64-key tile step of the pipelined kernel issues 416 (d = 64) / 480 (d = 128) instructions a
// warp against 512 / 1,024 cycles of an SM's tensor-core work for the CTA's 128 rows (sass_loops,
// sm_90a; 8 warps on 4 schedulers: 832 / 960 issue cycles), so at d = 64 the warps' issue, not the
// tensor cores, bounds it; the per-tile part of that issue (barrier, waits, O rescale, reductions,
// the products' descriptors) halves per key here: 358 / 399 instructions per 64 keys.
#pragma once

#include "kernels/cuda/attention_mma.cuh"
#include "kernels/cuda/wgmma.cuh"

namespace batchllm::kernels::cuda {

/// Key tiles in flight ahead of the one computed: two of 64 keys, one of 128 (the same bytes).
template <int kKeys>
constexpr int kWgmmaAhead = kKeys == kTileKeys ? 2 : 1;

/// Whether a wgmma tile of kKeys keys reads Q from shared memory (both operands of S there) instead
/// of holding its fragments in registers: the 128-key tiles, whose S accumulators are twice as many.
template <int kKeys>
constexpr bool kWgmmaQInSmem = kKeys != kTileKeys;

/// Shared memory of a wgmma tile: kStages K/V tiles of kKeys keys in flight and computed (the finished
/// rows reuse the space), and the rows. Tile i + A (A = kWgmmaAhead) is issued at iteration i into the
/// stage of tile i + A - kStages, which every warp finished with before iteration i's barrier: tile
/// i - 1 with A + 1 stages (the plain kernel); tile i - 2 with A + 2 (the pipelined one, whose
/// products of tile i - 1 still read its V during iteration i). One barrier per key tile either way.
template <typename T, int D, int kStageCount, int kKeys = kTileKeys>
struct WgmmaSmem {
  static constexpr int kLdO = D + 4;  // floats, for the finished rows
  static constexpr int kStages = kStageCount;
  union {
    struct {
      T k[kKeys * D];  // core matrix (key / 8, dim / 8) at ((key / 8) * (D / 8) + dim / 8) * 64 elements
      T v[kKeys * D];
    } kv[kStages];
    float o[kMaxTileRows * kLdO];
  };
  // kWgmmaQInSmem: the tile's Q rows, core matrix (row / 8, dim / 8) as K's (key / 8, dim / 8).
  T q[kWgmmaQInSmem<kKeys> ? kMaxTileRows * D : 8];
  TileRows<T> rows;
};

template <typename T, int D, bool kPipelined, int kKeys = kTileKeys>
using WgmmaSmemFor = WgmmaSmem<T, D, kWgmmaAhead<kKeys> + (kPipelined ? 2 : 1), kKeys>;

/// Stores the tile's Q rows (zeros for unused ones) into `q_smem` in WgmmaSmem::q's core matrices, by
/// a CTA of kThreads threads: 16-byte chunk c of row r at byte ((r / 8) (D / 8) + c) 128 + (r % 8) 16.
/// All the loads of a thread are issued before its stores. The caller fences them for the async
/// proxy and publishes them by a barrier before the first product reads them.
template <typename T, int D, int kThreads>
__device__ __forceinline__ void store_q_tile(T* q_smem, const TileRows<T>& tile) {
  constexpr int kChunks = D * sizeof(T) / 16;
  constexpr int kPerThread = kMaxTileRows * kChunks / kThreads;
  static_assert(kMaxTileRows * kChunks % kThreads == 0, "Q loads must divide evenly");
  uint4 chunk[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int idx = threadIdx.x + i * kThreads, r = idx / kChunks, c = idx % kChunks;
    const T* row = tile.q[r];
    chunk[i] = row ? reinterpret_cast<const uint4*>(row)[c] : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int idx = threadIdx.x + i * kThreads, r = idx / kChunks, c = idx % kChunks;
    reinterpret_cast<uint4*>(q_smem)[((r / 8) * kChunks + c) * 8 + r % 8] = chunk[i];
  }
}

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
template <typename T, int D, int kWarps, bool kPipelined, int kKeys = kTileKeys, typename Problem>
__device__ __forceinline__ void attention_wgmma(const Problem& problem, const dim3& item, unsigned char* smem_raw,
                                                const TensorView& k_cache, const TensorView& v_cache,
                                                float scale_log2) {
  static_assert(kWarps % 4 == 0 && 16 * kWarps <= kMaxTileRows, "whole warpgroups of 64 rows");
  static_assert(kKeys == 64 || kKeys == 128, "wgmma shapes built: n64, n128");
  static_assert(kPipelined || kKeys == kTileKeys, "128-key tiles: the pipelined kernel");
  constexpr int kThreads = 32 * kWarps;
  constexpr int kAhead = kWgmmaAhead<kKeys>;
  // Byte steps between core matrices (wgmma.cuh): K-major K tile: along dims 128, along keys 16 D;
  // N-major V tile: along keys (the product's K) 16 D, along dims (its N) 128.
  constexpr uint32_t kCoreBytes = 128, kKeyGroupBytes = 16 * D;
  using Smem = WgmmaSmemFor<T, D, kPipelined, kKeys>;
  // A Hopper CTA's dynamic shared memory at most (wgmma-k128 at d = 128: 230,960 bytes).
  static_assert(sizeof(Smem) <= 227 * 1024, "the tile's shared memory exceeds an H100 CTA's 227 KB");
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int t = lane % 4;

  if (!setup_rows(problem, sm.rows, k_cache, item)) return;

  // Warp w of warpgroup w / 4 holds rows 16 w + g and 16 w + g + 8 of the tile: the mma kernel's rows.
  // Q: fragments in registers, or (kWgmmaQInSmem) the warpgroup's 64 rows in shared memory.
  constexpr bool kQInSmem = kWgmmaQInSmem<kKeys>;
  uint32_t qa[kQInSmem ? 1 : D / 16][4];
  float o[D / 8][4];
  LaneRows rows;
  if constexpr (kQInSmem) {
    store_q_tile<T, D, kThreads>(sm.q, sm.rows);
    fence_proxy_async_shared();  // published by the first key tile's barrier
    rows = start_lane_state<T, D>(sm.rows, warp, lane, o);
  } else {
    rows = start_lane_rows<T, D>(sm.rows, warp, lane, qa, o);
  }
  const T* q_rows = sm.q + (warp / 4) * 64 * D;  // kQInSmem: the warpgroup's rows
  // P of a tile as the A fragments of its 4 16-key steps. All are packed before the first issue
  // (registers written between the issues of one group make ptxas wait for the earlier ones).
  // Pipelined: the P V of tile i - 1 is issued with the S of tile i. Tile 0 has no predecessor: its
  // iteration issues P = 0 over its own V (copied or zero-filled, so finite), an exact no-op, rather
  // than branch between wgmma instructions (ptxas serializes every wgmma of a kernel with a branch
  // there that it cannot prove warpgroup-uniform, warning C7520).
  uint32_t pa[kKeys / 16][4];
#pragma unroll
  for (int j = 0; j < kKeys / 16; ++j) pa[j][0] = pa[j][1] = pa[j][2] = pa[j][3] = 0u;
  const T* v_prev = sm.kv[0].v;

  // O += P V over the V tile `v_tile`: k-step j takes keys 16 j .. 16 j + 15, i.e. core-matrix rows
  // 2 j and 2 j + 1 of V. Issued, not waited for.
  auto issue_pv = [&](const T* v_tile) {
#pragma unroll
    for (int j = 0; j < kKeys / 16; ++j) {
      wgmma_m64k16<T, D, true>(o, pa[j], wgmma_descriptor(v_tile + j * 2 * kKeyGroupBytes / sizeof(T),
                                                          kKeyGroupBytes, kCoreBytes));
    }
  };

  const int keys_end = sm.rows.num_keys;
  const PagedKvHead<T> kv(k_cache, v_cache, sm.rows.blocks, sm.rows.kv_head, sm.rows.block_div);
  KvTileBlocksFor<T, D, kThreads, true, kKeys> next;  // block table entries of the next tile to issue
  // Prologue: tiles 0 .. kAhead - 1 in flight, one cp.async group each (past the end, a group of
  // zero-fills: every iteration commits one group and waits for all but the newest kAhead - 1, with
  // no branch); tile kAhead's entries loaded.
  for (int i = 0; i < kAhead; ++i) {
    const int key = sm.rows.key_begin + i * kKeys;
    prefetch_kv_blocks<T, D, kThreads, true, kKeys>(next, kv, keys_end, key);
    issue_kv_tile<T, D, kThreads, true, kKeys>(sm.kv[i].k, sm.kv[i].v, kv, keys_end, key, next);
  }
  prefetch_kv_blocks<T, D, kThreads, true, kKeys>(next, kv, keys_end, sm.rows.key_begin + kAhead * kKeys);
  int stage = 0;
  for_each_key_tile<kKeys>(sm.rows, [&](int first_key, auto masked) {
    constexpr bool kMasked = decltype(masked)::value;
    cp_async_wait<kAhead - 1>();  // this tile's group; later tiles' may still be in flight
    fence_proxy_async_shared();  // this thread's copies, before the async proxy (wgmma) reads them
    __syncthreads();             // every thread's copies of this tile are in, and every warp is done with
                                 // the stage the refill below overwrites (WgmmaSmem)
    const T* k_tile = sm.kv[stage].k;
    const T* v_tile = sm.kv[stage].v;
    // Tile i + kAhead's copies (zero-fills past the end), issued once this iteration's products are:
    // the tensor cores work while the threads issue them; the next tile's entries are loaded meanwhile.
    auto refill = [&] {
      const int refill_stage = (stage + kAhead) % Smem::kStages;
      issue_kv_tile<T, D, kThreads, true, kKeys>(sm.kv[refill_stage].k, sm.kv[refill_stage].v, kv, keys_end,
                                                 first_key + kAhead * kKeys, next);
      prefetch_kv_blocks<T, D, kThreads, true, kKeys>(next, kv, keys_end, first_key + (kAhead + 1) * kKeys);
    };

    // S = Q K^T: k-step kk takes dims 16 kk .. 16 kk + 15, i.e. core-matrix columns 2 kk and 2 kk + 1.
    float s[kKeys / 8][4];
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
    wgmma_fence_operands(s);
    wgmma_fence_operands(o);
    wgmma_fence();  // S zeroed, and (pipelined) O rescaled and P packed by the threads since the last issue
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint64_t k_desc = wgmma_descriptor(k_tile + kk * 16 * 8, kCoreBytes, kKeyGroupBytes);
      if constexpr (kQInSmem) {  // Q's rows as K's keys: the same layout, so the same byte steps
        wgmma_m64k16_ss<T, kKeys, false>(s, wgmma_descriptor(q_rows + kk * 16 * 8, kCoreBytes, kKeyGroupBytes),
                                         k_desc);
      } else {
        wgmma_m64k16<T, kKeys, false>(s, qa[kk], k_desc);
      }
    }
    wgmma_commit();
    if constexpr (kPipelined) {
      issue_pv(v_prev);
      wgmma_commit();
      refill();
      wgmma_wait<1>();  // S of this tile; the previous tile's P V may still run
      wgmma_fence_operands(s);
      const RowScale scale = softmax_scores<kMasked, kKeys>(s, rows, first_key, t, scale_log2);
      wgmma_fence_operands(s);  // the probabilities are computed before the wait below, not after it
      wgmma_wait<0>();  // the previous P V: O and P are the threads' again
      wgmma_fence_operands(o);
      rescale_rows<D>(o, scale);
#pragma unroll
      for (int j = 0; j < kKeys / 16; ++j) p_fragment<T, kKeys>(pa[j], s, j);
      v_prev = v_tile;
    } else {
      refill();
      wgmma_wait<0>();
      wgmma_fence_operands(s);
      softmax_tile<D, kMasked>(s, o, rows, first_key, t, scale_log2);
#pragma unroll
      for (int j = 0; j < kKeys / 16; ++j) p_fragment<T, kKeys>(pa[j], s, j);
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
template <typename T, int D, typename Problem, int kWarps, bool kPipelined, int kKeys = kTileKeys>
__global__ void __launch_bounds__(32 * kWarps, (kWgmmaMinCtas<D, kWarps, kPipelined>))
    attention_wgmma_kernel(Problem problem, TensorView k_cache, TensorView v_cache, float scale_log2) {
  BATCHLLM_DYNAMIC_SHARED_MEMORY(smem_raw);
  attention_wgmma<T, D, kWarps, kPipelined, kKeys>(problem, blockIdx, smem_raw, k_cache, v_cache, scale_log2);
}

}  // namespace batchllm::kernels::cuda
