// One tile of paged attention on mma.sync (flash-attention 2's layout): the same Problem interface and
// TileRows as attention_tile.cuh (64 query rows of one KV head, keys streamed 64 at a time), but
// scores, probabilities and the output accumulator stay in registers:
//   - each warp owns 16 rows; its Q fragments are loaded once from global memory;
//   - S = Q K^T as 8 n-blocks of 8 keys (32 floats per lane), masked, scaled, online softmax with
//     the row max reduced over the 4 lanes that share a row;
//   - the S accumulators are, element for element, the A operand of P V (mma_sync.cuh), so P never
//     goes through shared memory; O (D / 8 n-blocks, 4 floats each) is rescaled in registers.
// Shared memory holds only K and V, double-buffered: tile i + 1 arrives by cp.async while tile i is
// computed (70 KB at d = 128; the WMMA tile kernel needs 105 KB for one); the finished O rows go
// through the K/V space to Problem::write.
// Selected by BATCHLLM_ATTENTION_TILES=mma or mma128 (prefill and cascade prefixes; tile_kernels.cuh)
// until a GPU run decides. The softmax and epilogue helpers here serve attention_wgmma.cuh too.
#pragma once

#include <type_traits>

#include "kernels/cuda/attention_tile.cuh"
#include "kernels/cuda/mma_sync.cuh"

namespace batchllm::kernels::cuda {

template <typename T, int D>
struct MmaSmem {
  static constexpr int kLd = D + 8;  // 16-bit elements; rows 16-byte aligned, banks spread
  static constexpr int kLdO = D + 4;  // floats, for the finished rows
  static constexpr int kStages = 2;   // K/V tile i + 1 loads (cp.async) while tile i is computed
  union {
    struct {
      T k[kTileKeys * kLd];
      T v[kTileKeys * kLd];
    } kv[kStages];
    float o[kMaxTileRows * kLdO];  // the finished rows (128 fit where 2 K/V stages were)
  };
  TileRows<T> rows;
};

/// A thread's share of copying one K/V tile of kKeys keys (64 unless a kernel's tiles are wider) into
/// shared memory, by a CTA of kThreads threads. One warp instruction copies 8 keys x 4 16-byte chunks
/// (64 contiguous bytes of each key's row): lane l takes key l % 8 of the warp's 8 and chunk (l / 8) % 4
/// of the 4. A thread keeps its keys over its copies: kKeysPerThread keys, key(m) = 8 (warp + m warps)
/// + lane % 8, each in kQuads copies, chunk(j) = 4 j + (lane / 8) % 4, so it looks up and addresses
/// each key once a tile (the block table entry, the page's offset), not once a copy.
/// Each quarter warp (the 8 lanes of one shared-memory phase of a 16-byte access) writes 8 different
/// keys of one chunk column, which no bank conflict can serialize in either layout:
///   rows (kCoreMatrices = false): key k's dims at k * MmaSmem::kLd (rows padded by 16 bytes, for
///     ldmatrix: 8 keys' same chunk lands on 8 different 16-byte bank groups);
///   core matrices (true, wgmma.cuh's no-swizzle layout): chunk c of key k at byte
///     ((k / 8) (D / 8) + c) 128 + (k % 8) 16, so the quarter warp fills one 128-byte core matrix.
template <typename T, int D, int kThreads, bool kCoreMatrices, int kKeys = kTileKeys>
struct KvTileCopy {
  static constexpr int kChunks = D * sizeof(T) / 16;  // 16-byte chunks of a key
  static constexpr int kQuads = kChunks / 4;         // copies per key
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kKeysPerThread = kKeys / (8 * kWarps);
  static constexpr int kVecPerThread = kKeysPerThread * kQuads;
  static_assert(kChunks % 4 == 0 && kThreads % 32 == 0 && kKeys % (8 * kWarps) == 0,
                "tile loads must divide evenly");

  __device__ __forceinline__ static int key(int m) {
    return 8 * (static_cast<int>(threadIdx.x) / 32 + kWarps * m) + static_cast<int>(threadIdx.x) % 8;
  }
  __device__ __forceinline__ static int chunk(int j) { return 4 * j + (static_cast<int>(threadIdx.x) / 8) % 4; }
  /// The stage element where chunk j of key m lands.
  __device__ __forceinline__ static int dst(int m, int j) {
    const int k = key(m), c = chunk(j);
    return kCoreMatrices ? ((k / 8) * kChunks + c) * 64 + (k % 8) * 8 : k * MmaSmem<T, D>::kLd + c * 8;
  }
};

/// The block table entries of a thread's keys of one K/V tile. The key loops load them a tile before
/// the tile's copies are issued (prefetch_kv_blocks), so that issuing a copy never waits for a load.
template <int kVec>
struct KvTileBlocks {
  uint32_t block[kVec];
};

template <typename T, int D, int kThreads, bool kCoreMatrices = false, int kKeys = kTileKeys>
using KvTileBlocksFor = KvTileBlocks<KvTileCopy<T, D, kThreads, kCoreMatrices, kKeys>::kKeysPerThread>;

/// Loads the block table entries of this thread's keys of the tile starting at `first_key` (keys at or
/// past num_keys: none, 0, an address issue_kv_tile computes but does not read).
template <typename T, int D, int kThreads, bool kCoreMatrices = false, int kKeys = kTileKeys>
__device__ __forceinline__ void prefetch_kv_blocks(KvTileBlocksFor<T, D, kThreads, kCoreMatrices, kKeys>& blocks,
                                                   const PagedKvHead<T>& kv, int num_keys, int first_key) {
  using Copy = KvTileCopy<T, D, kThreads, kCoreMatrices, kKeys>;
#pragma unroll
  for (int m = 0; m < Copy::kKeysPerThread; ++m) {
    const int pos = first_key + Copy::key(m);
    blocks.block[m] = pos < num_keys ? kv.block_of(pos) : 0;
  }
}

/// Issues the cp.async copies of kKeys keys (from `first_key`) of one KV head into a stage, by a CTA of
/// kThreads threads (KvTileCopy's layout), with the block table entries `blocks` that
/// prefetch_kv_blocks loaded for that tile, and commits them as one group; keys past num_keys are
/// zero-filled.
template <typename T, int D, int kThreads, bool kCoreMatrices = false, int kKeys = kTileKeys>
__device__ __forceinline__ void issue_kv_tile(T* k_dst, T* v_dst, const PagedKvHead<T>& kv, int num_keys,
                                              int first_key,
                                              const KvTileBlocksFor<T, D, kThreads, kCoreMatrices, kKeys>& blocks) {
  using Copy = KvTileCopy<T, D, kThreads, kCoreMatrices, kKeys>;
#pragma unroll
  for (int m = 0; m < Copy::kKeysPerThread; ++m) {
    const int pos = first_key + Copy::key(m);
    const bool valid = pos < num_keys;
    const T* k_row = kv.k_at(blocks.block[m], pos, 0);
    const T* v_row = kv.v_at(blocks.block[m], pos, 0);
#pragma unroll
    for (int j = 0; j < Copy::kQuads; ++j) {
      cp_async_16(k_dst + Copy::dst(m, j), k_row + Copy::chunk(j) * 8, valid);
      cp_async_16(v_dst + Copy::dst(m, j), v_row + Copy::chunk(j) * 8, valid);
    }
  }
  cp_async_commit();
}

/// This lane's two rows of a warp's 16 (g and g + 8) through the key tiles: their causal limits and
/// flash attention's running max (log2 domain) and this lane's part of the running sums.
struct LaneRows {
  int limit0, limit1;
  float m0 = -INFINITY, m1 = -INFINITY;
  float l0 = 0.0f, l1 = 0.0f;
};

/// The A fragments of Q for the lane's rows q0, q1 (nullptr: unused row, zeros), D / 16 k-steps. Each
/// register is two neighbouring elements (an even column first: 4-byte aligned, as q rows are 16-byte
/// aligned), loaded as one 32-bit word (lower address in the low half, as pack2).
template <typename T, int D>
__device__ __forceinline__ void load_q_fragments(uint32_t (&qa)[D / 16][4], const T* q0, const T* q1, int t) {
  const auto pair = [](const T* row, int c) { return row ? *reinterpret_cast<const uint32_t*>(row + c) : 0u; };
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int c = kk * 16 + 2 * t;
    qa[kk][0] = pair(q0, c);
    qa[kk][1] = pair(q1, c);
    qa[kk][2] = pair(q0, c + 8);
    qa[kk][3] = pair(q1, c + 8);
  }
}

/// start_lane_rows without the Q fragments (a kernel that reads Q from shared memory).
template <typename T, int D>
__device__ __forceinline__ LaneRows start_lane_state(const TileRows<T>& tile, int warp, int lane,
                                                     float (&o)[D / 8][4]) {
  const int r0 = warp * 16 + lane / 4, r1 = r0 + 8;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  return LaneRows{tile.q[r0] ? tile.key_limit[r0] : 0, tile.q[r1] ? tile.key_limit[r1] : 0};
}

/// The factors by which a tile's softmax rescales the lane's two output rows.
struct RowScale {
  float alpha0, alpha1;
};

/// A lane's start of a tile: its two rows of the warp's 16 (g and g + 8: warp * 16 + lane / 4 and
/// 8 more), their Q fragments in `qa` (zero for an unused row), a zero output `o`, and the rows'
/// causal limits and empty softmax state (returned).
template <typename T, int D>
__device__ __forceinline__ LaneRows start_lane_rows(const TileRows<T>& tile, int warp, int lane,
                                                    uint32_t (&qa)[D / 16][4], float (&o)[D / 8][4]) {
  const int r0 = warp * 16 + lane / 4, r1 = r0 + 8;
  load_q_fragments<T, D>(qa, tile.q[r0], tile.q[r1], lane % 4);
  return start_lane_state<T, D>(tile, warp, lane, o);
}

/// One key tile's online softmax on the lane's score accumulators (the mma.m16n8k16 C layout: n-block
/// n holds keys first_key + 8n .. + 7): with kMasked, masks keys at or past each row's limit (a tile
/// below the tile's unmasked_end, TileRows, needs no mask); scales (scale_log2 > 0, checked by the bindings, so
/// the max of the scaled scores is the scaled max and the scale folds into the exponent's FMA), turns S
/// into the unnormalised probabilities P in place and updates the running max and sums; returns the
/// factors the output rows must be rescaled by (rescale_rows) before this tile's P V is added. A row
/// with no valid key so far keeps l = 0 and its zero output.
template <bool kMasked, int kKeys = kTileKeys>
__device__ __forceinline__ RowScale softmax_scores(float (&s)[kKeys / 8][4], LaneRows& rows, int first_key,
                                                   int t, float scale_log2) {
  float tile_max0 = -INFINITY, tile_max1 = -INFINITY;  // of the raw scores
#pragma unroll
  for (int n = 0; n < kKeys / 8; ++n) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if constexpr (kMasked) {
        const int key = first_key + n * 8 + 2 * t + j;
        s[n][j] = key < rows.limit0 ? s[n][j] : -INFINITY;
        s[n][2 + j] = key < rows.limit1 ? s[n][2 + j] : -INFINITY;
      }
      tile_max0 = fmaxf(tile_max0, s[n][j]);
      tile_max1 = fmaxf(tile_max1, s[n][2 + j]);
    }
  }
#pragma unroll
  for (int offset = 1; offset < 4; offset *= 2) {  // the row's 4 lanes
    tile_max0 = fmaxf(tile_max0, __shfl_xor_sync(0xffffffffu, tile_max0, offset));
    tile_max1 = fmaxf(tile_max1, __shfl_xor_sync(0xffffffffu, tile_max1, offset));
  }
  const float new_m0 = fmaxf(rows.m0, tile_max0 * scale_log2), new_m1 = fmaxf(rows.m1, tile_max1 * scale_log2);
  // A row with no valid key yet (max -inf; masked tiles only) subtracts 0 instead: exp2 of
  // -inf - -inf would be NaN, and exp2(-inf - 0) = 0 keeps it empty. An empty old max gives factor 0.
  const float base0 = kMasked && new_m0 == -INFINITY ? 0.0f : new_m0;
  const float base1 = kMasked && new_m1 == -INFINITY ? 0.0f : new_m1;
  const RowScale scale{fast_exp2(rows.m0 - base0), fast_exp2(rows.m1 - base1)};
  rows.m0 = new_m0;
  rows.m1 = new_m1;
  float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
  for (int n = 0; n < kKeys / 8; ++n) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      s[n][j] = fast_exp2(fmaf(s[n][j], scale_log2, -base0));
      s[n][2 + j] = fast_exp2(fmaf(s[n][2 + j], scale_log2, -base1));
      sum0 += s[n][j];
      sum1 += s[n][2 + j];
    }
  }
  rows.l0 = rows.l0 * scale.alpha0 + sum0;
  rows.l1 = rows.l1 * scale.alpha1 + sum1;
  return scale;
}

template <int D>
__device__ __forceinline__ void rescale_rows(float (&o)[D / 8][4], const RowScale& scale) {
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    o[n][0] *= scale.alpha0;
    o[n][1] *= scale.alpha0;
    o[n][2] *= scale.alpha1;
    o[n][3] *= scale.alpha1;
  }
}

/// softmax_scores, then the output rows rescaled at once.
template <int D, bool kMasked>
__device__ __forceinline__ void softmax_tile(float (&s)[kTileKeys / 8][4], float (&o)[D / 8][4], LaneRows& rows,
                                             int first_key, int t, float scale_log2) {
  rescale_rows<D>(o, softmax_scores<kMasked>(s, rows, first_key, t, scale_log2));
}

/// Runs `key_tile(first_key, masked)` over the tile's key range in kKeys-key steps: first the tiles below
/// its unmasked_end with masked = std::false_type, then the rest with std::true_type. Two loops, not a
/// branch per tile: the choice stays uniform over the CTA as the compiler sees it (a branch between
/// wgmma instructions that ptxas cannot prove warpgroup-uniform makes it serialize them, C7520).
template <int kKeys = kTileKeys, typename KeyTile>
__device__ __forceinline__ void for_each_key_tile(int key_begin, int unmasked_end, int keys_end, KeyTile&& key_tile) {
  unmasked_end = min(unmasked_end, keys_end);
  int first_key = key_begin;
  for (; first_key + kKeys <= unmasked_end; first_key += kKeys) key_tile(first_key, std::false_type{});
  for (; first_key < keys_end; first_key += kKeys) key_tile(first_key, std::true_type{});
}

/// for_each_key_tile over a tile's key range (TileRows: key_begin, unmasked_end, num_keys).
template <int kKeys = kTileKeys, typename T, typename KeyTile>
__device__ __forceinline__ void for_each_key_tile(const TileRows<T>& tile, KeyTile&& key_tile) {
  for_each_key_tile<kKeys>(tile.key_begin, tile.unmasked_end, tile.num_keys, static_cast<KeyTile&&>(key_tile));
}

/// The A fragment of P for the 16-key step j: S n-blocks 2j and 2j + 1, element for element.
template <typename T, int kKeys = kTileKeys>
__device__ __forceinline__ void p_fragment(uint32_t (&pa)[4], const float (&s)[kKeys / 8][4], int j) {
  pa[0] = pack2<T>(s[2 * j][0], s[2 * j][1]);
  pa[1] = pack2<T>(s[2 * j][2], s[2 * j][3]);
  pa[2] = pack2<T>(s[2 * j + 1][0], s[2 * j + 1][1]);
  pa[3] = pack2<T>(s[2 * j + 1][2], s[2 * j + 1][3]);
}

/// The end of a tile: whole-row sums over the row's 4 lanes, the normalised rows through shared memory
/// `o_smem` (row stride kLdO floats; space the CTA's K/V stages held: the barrier here waits until
/// every warp is done with them) to Problem::write with their natural-log lse (-inf: no keys).
template <typename T, int D, int kLdO, typename Problem>
__device__ __forceinline__ void write_tile_rows(const Problem& problem, const dim3& item, const float (&o)[D / 8][4],
                                                LaneRows rows, float* o_smem, const TileRows<T>& tile, int warp,
                                                int lane) {
  const int g = lane / 4, t = lane % 4, r0 = warp * 16 + g, r1 = r0 + 8;
#pragma unroll
  for (int offset = 1; offset < 4; offset *= 2) {
    rows.l0 += __shfl_xor_sync(0xffffffffu, rows.l0, offset);
    rows.l1 += __shfl_xor_sync(0xffffffffu, rows.l1, offset);
  }
  const float inv0 = rows.l0 > 0.0f ? 1.0f / rows.l0 : 0.0f, inv1 = rows.l1 > 0.0f ? 1.0f / rows.l1 : 0.0f;
  __syncthreads();  // every warp is done with K/V: the space holds the finished rows now
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    const int c = n * 8 + 2 * t;
    o_smem[r0 * kLdO + c] = o[n][0] * inv0;
    o_smem[r0 * kLdO + c + 1] = o[n][1] * inv0;
    o_smem[r1 * kLdO + c] = o[n][2] * inv1;
    o_smem[r1 * kLdO + c + 1] = o[n][3] * inv1;
  }
  __syncwarp();
  // lse back to natural log: (max + log2(sum)) * ln 2; -inf when the row saw no keys.
  const float lse0 = rows.l0 > 0.0f ? (rows.m0 + log2f(rows.l0)) * 0.69314718055994531f : -INFINITY;
  const float lse1 = rows.l1 > 0.0f ? (rows.m1 + log2f(rows.l1)) * 0.69314718055994531f : -INFINITY;
  for (int i = 0; i < 16; ++i) {
    const int r = warp * 16 + i;
    if (!tile.q[r]) continue;
    // Row i's lse lives in the lanes of group i % 8 (first or second row of the lane).
    const float lse = __shfl_sync(0xffffffffu, i < 8 ? lse0 : lse1, (i % 8) * 4);
    problem.write(item, r, o_smem + r * kLdO, 1.0f, lse, lane);
  }
}

/// One key tile of the mma tile on the K/V tile in shared memory (rows kLd apart): S = Q K^T, the
/// online softmax (kMasked: keys at or past the rows' limits masked) and O += P V into the lane's
/// `o` and `rows`.
template <typename T, int D, bool kMasked>
__device__ __forceinline__ void mma_key_tile(const T* k_tile, const T* v_tile, int first_key,
                                             const uint32_t (&qa)[D / 16][4], float (&o)[D / 8][4], LaneRows& rows,
                                             float scale_log2) {
  constexpr int kLd = MmaSmem<T, D>::kLd;
  const int lane = threadIdx.x % 32, t = lane % 4;
  // S = Q K^T: n-block n holds keys n*8 .. n*8+7; B fragment b0 = K[key g][dims 2t, 2t+1], which is
  // ldmatrix (no transpose) of the 8 x 8 blocks (keys of n, 8 dims): one x4 feeds two k-steps.
  float s[kTileKeys / 8][4];
#pragma unroll
  for (int n = 0; n < kTileKeys / 8; ++n) {
    s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
    const T* k_rows = k_tile + (n * 8 + lane % 8) * kLd + (lane / 8) * 8;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk += 2) {
      uint32_t b[4];
      ldmatrix_x4<false>(b, k_rows + kk * 16);
      const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
      mma_m16n8k16<T>(s[n], qa[kk], b0);
      mma_m16n8k16<T>(s[n], qa[kk + 1], b1);
    }
  }
  softmax_tile<D, kMasked>(s, o, rows, first_key, t, scale_log2);
  // O += P V. k-step j covers keys 16j .. 16j+15: its A fragment is S n-blocks 2j and 2j+1;
  // B fragment b0 = V[keys 2t, 2t+1][dim g]: ldmatrix.trans of the 8 x 8 blocks (8 keys, dims of
  // n); one x4 gives b0 and b1 of two dim blocks.
#pragma unroll
  for (int j = 0; j < kTileKeys / 16; ++j) {
    uint32_t pa[4];
    p_fragment<T>(pa, s, j);
    const T* v_rows = v_tile + (16 * j + (lane / 8) % 2 * 8 + lane % 8) * kLd + (lane / 16) * 8;
#pragma unroll
    for (int n = 0; n < D / 8; n += 2) {
      uint32_t b[4];
      ldmatrix_x4<true>(b, v_rows + n * 8);
      const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
      mma_m16n8k16<T>(o[n], pa, b0);
      mma_m16n8k16<T>(o[n + 1], pa, b1);
    }
  }
}

/// The key loop of the mma tile over keys [key_begin, keys_end) of one paged KV head, for a CTA of
/// kThreads threads: K/V tiles by cp.async into kStages >= 3 `stages` (MmaSmem::kv's layout), then
/// mma_key_tile on each (tiles from unmasked_end on masked by the rows' limits). kStages - 1 tiles in
/// flight and one barrier a tile: after it, every warp is done with tile i - 1, whose stage takes tile
/// i + kStages - 1. (The tile kernel keeps its own two-stage loop above: the same loop with two
/// stages, a function of its own, compiled 12% more instructions into its d = 128 prefix key loop.)
/// Starts and ends with every warp done with the stages, so a CTA may call it again, for another key
/// range or KV source, on the same running state (cascade_owned.cuh: each prefix level in turn).
template <typename T, int D, int kThreads, int kStages, typename Stage>
__device__ __forceinline__ void mma_key_loop(Stage (&stages)[kStages], const PagedKvHead<T>& kv, int key_begin,
                                             int unmasked_end, int keys_end, const uint32_t (&qa)[D / 16][4],
                                             float (&o)[D / 8][4], LaneRows& rows, float scale_log2) {
  static_assert(kStages >= 3, "two tiles in flight while one is computed");
  KvTileBlocksFor<T, D, kThreads> next;  // block table entries of the next tile to issue
  prefetch_kv_blocks<T, D, kThreads>(next, kv, keys_end, key_begin);
  // Tile j (keys key_begin + 64 j) goes to stage j % kStages; a tile past the end is an empty group,
  // so that every wait counts the same groups.
  int issued = 0;
  const auto issue_next = [&] {
    const int first = key_begin + issued * kTileKeys;
    if (first < keys_end) {
      Stage& stage = stages[issued % kStages];
      issue_kv_tile<T, D, kThreads>(stage.k, stage.v, kv, keys_end, first, next);
      prefetch_kv_blocks<T, D, kThreads>(next, kv, keys_end, first + kTileKeys);
    } else {
      cp_async_commit();
    }
    ++issued;
  };
  for (int j = 0; j < kStages - 1; ++j) issue_next();
  int tile = 0;
  for_each_key_tile(key_begin, unmasked_end, keys_end, [&](int first_key, auto masked) {
    cp_async_wait<kStages - 2>();  // this thread's copies of `tile`
    __syncthreads();  // everyone's copies of `tile` visible; everyone done with tile - 1's stage
    issue_next();     // tile + kStages - 1, into tile - 1's stage
    const Stage& stage = stages[tile % kStages];
    mma_key_tile<T, D, decltype(masked)::value>(stage.k, stage.v, first_key, qa, o, rows, scale_log2);
    ++tile;
  });
  cp_async_wait<0>();  // the empty groups past the end
  __syncthreads();     // every warp done with the stages
}

/// One work item of the mma tile kernel on a CTA of kWarps warps (16 rows each; the Problem's
/// tile_rows = 16 * kWarps), in `smem_raw` (MmaSmem, 128-byte aligned): the body of
/// attention_mma_kernel and of the fused cascade kernel's prefix items.
template <typename T, int D, int kWarps, typename Problem>
__device__ __forceinline__ void attention_mma(const Problem& problem, const dim3& item, unsigned char* smem_raw,
                                              const TensorView& k_cache, const TensorView& v_cache,
                                              float scale_log2) {
  static_assert(16 * kWarps <= kMaxTileRows, "a warp takes 16 rows");
  static_assert(sizeof(float) * kMaxTileRows * (D + 4) <= 4 * sizeof(T) * kTileKeys * (D + 8),
                "finished rows must fit in the K/V space");
  constexpr int kThreads = 32 * kWarps;
  using Smem = MmaSmem<T, D>;
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  if (!setup_rows(problem, sm.rows, k_cache, item)) return;

  uint32_t qa[D / 16][4];
  float o[D / 8][4];
  LaneRows rows = start_lane_rows<T, D>(sm.rows, warp, lane, qa, o);

  const int keys_end = sm.rows.num_keys;
  const PagedKvHead<T> kv(k_cache, v_cache, sm.rows.blocks, sm.rows.kv_head, sm.rows.block_div);
  KvTileBlocksFor<T, D, kThreads> next;  // block table entries of the next tile to issue
  prefetch_kv_blocks<T, D, kThreads>(next, kv, keys_end, sm.rows.key_begin);
  if (sm.rows.key_begin < keys_end) {
    issue_kv_tile<T, D, kThreads>(sm.kv[0].k, sm.kv[0].v, kv, keys_end, sm.rows.key_begin, next);
  }
  prefetch_kv_blocks<T, D, kThreads>(next, kv, keys_end, sm.rows.key_begin + kTileKeys);
  int stage = 0;
  for_each_key_tile(sm.rows, [&](int first_key, auto masked) {
    if (first_key + kTileKeys < keys_end) {  // the next tile into the other stage, then wait for this one
      issue_kv_tile<T, D, kThreads>(sm.kv[stage ^ 1].k, sm.kv[stage ^ 1].v, kv, keys_end, first_key + kTileKeys,
                                    next);
      prefetch_kv_blocks<T, D, kThreads>(next, kv, keys_end, first_key + 2 * kTileKeys);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // this stage's copies, by every thread, are visible
    mma_key_tile<T, D, decltype(masked)::value>(sm.kv[stage].k, sm.kv[stage].v, first_key, qa, o, rows, scale_log2);
    __syncthreads();  // every warp is done with this stage before the next iteration refills it
    stage ^= 1;
  });
  write_tile_rows<T, D, Smem::kLdO>(problem, item, o, rows, sm.o, sm.rows, warp, lane);
}

/// The mma tile kernel: grid and Problem as attention_tile_kernel, 32 * kWarps threads; dynamic smem:
/// MmaSmem.
template <typename T, int D, typename Problem, int kWarps>
__global__ void __launch_bounds__(32 * kWarps) attention_mma_kernel(Problem problem, TensorView k_cache,
                                                                    TensorView v_cache, float scale_log2) {
  BATCHLLM_DYNAMIC_SHARED_MEMORY(smem_raw);
  attention_mma<T, D, kWarps>(problem, blockIdx, smem_raw, k_cache, v_cache, scale_log2);
}

}  // namespace batchllm::kernels::cuda
