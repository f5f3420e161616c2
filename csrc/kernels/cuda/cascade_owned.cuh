// Cascade decode with every row owned by one CTA (BATCHLLM_CASCADE_LAUNCH=owned): one launch writes
// the outputs, with no partial states in memory and no combine step.
//
// Why: at W1's decode step (256 rows of 4 heads, 4 prefixes of 1,024 keys, ~128 suffix keys a row)
// the three launches of the separate cascade took ~80 us a layer on an H100 (run 4 profile: decode_rows
// 44, prefix tiles 25, combine 10) for ~22 us of KV bytes. Each is short and latency-bound: a
// decode_rows CTA streams two steps of keys behind three dependent loads (length, block table, K/V),
// the prefix tiles' CTAs are a few key tiles each, and the combine reads the states back. Here a CTA
// takes a tile of consecutive rows (64 / group readers x their group heads, one KV head) through all
// of their levels:
//   A. every prefix whose reader range meets the tile: the mma tile's key loop (attention_mma.cuh,
//      64 rows, 4 warps) on one running state per row, rows outside a prefix's range masked (limit 0),
//      so the prefixes of a row merge in the online softmax itself; the state (m, l, unnormalised o)
//      then goes to shared memory;
//   B. the suffixes: each warp takes readers warp, warp + 4, ... and streams their suffix keys through
//      a ring of cp.async stages of its own (OwnedSmem) (each lane copies exactly the 16-byte chunks it reads, so
//      no barrier orders them), with decode_rows' lane layout and math (add_keys); the ring runs on
//      from one reader to the next without draining; a reader's state merges with its prefix state
//      from A and the output row and lse are written.
// A prefix is read from L2 once per row tile (4 tiles a prefix at W1), and a CTA's suffix stream keeps
// kStages - 1 stages of loads in flight across its readers. What it gives up: no key split, so a few
// long rows or a long prefix with few readers leave SMs idle (the separate launches split them); the
// A/B in bench_attention and e2e decides where it pays.
#pragma once

#include "kernels/cuda/attention_mma.cuh"
#include "kernels/cuda/decode_rows.cuh"
#include "kernels/cuda/prefix_states.cuh"

namespace batchllm::kernels::cuda {

constexpr int kOwnedWarps = 4;
constexpr int kOwnedThreads = 32 * kOwnedWarps;
constexpr int kOwnedRows = 16 * kOwnedWarps;  // tile rows: readers x group heads
constexpr int kOwnedMaxGroup = 8;             // a reader's heads in one lane state array (decode_rows' 8)

/// Readers (decode rows) of one owned tile for a GQA group.
__host__ __device__ __forceinline__ int owned_readers(int group) { return kOwnedRows / group; }

/// Shared memory of an owned-tile CTA: A's K/V stages, and afterwards (the same bytes) the rows'
/// prefix states and B's per-lane cp.async ring.
template <typename T, int D>
struct OwnedSmem {
  // B's ring: kStages stages a warp cycles through (kStages - 1 in flight), kPerLane keys a lane a
  // stage (a warp stage is kPerLane x 32 / (D / 8) keys: 16 at d = 64, 8 at d = 128). Four keys a
  // stage, as decode_rows' unrolled step, share a rescale of the states and the stage's wait: with
  // two, the key loop took 465 instructions a warp per 8 keys at d = 64 (sass), near the ~17 cycles
  // an SM has per key at HBM bandwidth with 4 issue slots a cycle.
  static constexpr int kStages = 3;
  static constexpr int kPerLane = 4;
  static constexpr int kLdO = D + 4;
  static constexpr int kPrefixStages = 3;  // A's K/V tiles: two in flight while one is computed
  struct Stage {
    T k[kTileKeys * MmaSmem<T, D>::kLd];
    T v[kTileKeys * MmaSmem<T, D>::kLd];
  };
  union {
    Stage kv[kPrefixStages];  // A
    struct {      // B
      float o[kOwnedRows * kLdO];  // prefix state of each tile row: unnormalised o (log2 domain, max m)
      float m[kOwnedRows];
      float l[kOwnedRows];
      uint4 k[kOwnedWarps][kStages][kPerLane][32];
      uint4 v[kOwnedWarps][kStages][kPerLane][32];
    } b;
  };
  int suffix_len[kOwnedRows];  // each reader's suffix keys (readers <= kOwnedRows)
  CoveringList prefixes;       // the prefixes meeting the tile's rows
};

/// Arguments of one owned launch: grid (row tile, KV head).
struct OwnedArgs {
  TensorView q;                  // [B, Hq, D]
  TensorView k_cache, v_cache;   // [blocks, block_size, Hkv, D]
  DecodeLevelsView levels;
  SuffixSplit suffix_split;      // only its rows: a device plan's rows past which suffixes are empty
  TensorView out;                // [B, Hq, D], q's dtype
  float* lse_out;                // [B, Hq] or nullptr
  float scale_log2;
  int group;
  FastDivisor block_size;
};

/// Part B for one warp: the suffixes of readers warp, warp + kOwnedWarps, ... of the tile, merged
/// with their prefix states (sm.b) and written out.
template <typename T, int D, int kHeads>
__device__ __forceinline__ void owned_suffixes(const OwnedArgs& args, OwnedSmem<T, D>& sm, int first_row,
                                               int readers, int kv_head) {
  using Smem = OwnedSmem<T, D>;
  constexpr int kStages = Smem::kStages, kPerLane = Smem::kPerLane;
  constexpr int kLanesPerKey = D / 8;
  constexpr int kKeysPerWarp = 32 / kLanesPerKey;
  constexpr int kStageKeys = kKeysPerWarp * kPerLane;  // a warp's keys a stage
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub = lane / kLanesPerKey, chunk = lane % kLanesPerKey;
  const int count = readers > warp ? (readers - warp + kOwnedWarps - 1) / kOwnedWarps : 0;  // this warp's
  const auto reader_of = [&](int i) { return warp + i * kOwnedWarps; };
  const auto kv_of = [&](int i) {
    const int row = first_row + reader_of(i);
    const int32_t* blocks = args.levels.suffix_block_tables + row * args.levels.max_suffix_blocks;
    return PagedKvHead<T>(args.k_cache, args.v_cache, blocks, kv_head, args.block_size);
  };

  // The issue cursor: the next stage to copy is keys [key, key + kStageKeys) of reader `at` (of this
  // warp's); `blocks` holds that stage's block table entries for this lane's keys, loaded one issue
  // ahead so that issuing never waits for them.
  int at = 0, key = 0;
  uint32_t blocks[kPerLane];
  const auto settle = [&] {  // past readers whose keys are all issued (or who have none)
    while (at < count && key >= sm.suffix_len[reader_of(at)]) {
      ++at;
      key = 0;
    }
    if (at < count) {
      const PagedKvHead<T> kv = kv_of(at);
      const int len = sm.suffix_len[reader_of(at)];
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) {
        const int pos = key + u * kKeysPerWarp + sub;
        blocks[u] = pos < len ? kv.block_of(pos) : 0u;
      }
    }
  };
  int issued = 0;
  const auto issue = [&] {
    if (at < count) {
      const PagedKvHead<T> kv = kv_of(at);
      const int len = sm.suffix_len[reader_of(at)], slot = issued % kStages;
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) {
        const int pos = key + u * kKeysPerWarp + sub;
        const bool valid = pos < len;  // past the end: zero-filled (V must be 0: weight 0 x garbage)
        cp_async_16(&sm.b.k[warp][slot][u][lane], kv.k_at(blocks[u], pos, 0) + chunk * 8, valid);
        cp_async_16(&sm.b.v[warp][slot][u][lane], kv.v_at(blocks[u], pos, 0) + chunk * 8, valid);
      }
      key += kStageKeys;
      settle();
    }
    cp_async_commit();  // an empty group past the last stage: the waits below count the same
    ++issued;
  };
  settle();
  for (int s = 0; s < kStages - 1; ++s) issue();

  int consumed = 0;
  for (int i = 0; i < count; ++i) {
    const int reader = reader_of(i), row = first_row + reader;
    const int len = sm.suffix_len[reader];
    const int heads = args.group;
    float q[kHeads][8];
    RunningState state[kHeads];
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      const int head = kv_head * args.group + min(h, heads - 1);  // unused slots repeat a used head
      const T* q_row = static_cast<const T*>(args.q.data) + row * args.q.stride[0] + head * args.q.stride[1];
      unpack8<T>(reinterpret_cast<const uint4*>(q_row)[chunk], q[h]);
#pragma unroll
      for (int j = 0; j < 8; ++j) q[h][j] *= args.scale_log2;
    }
    for (int first = 0; first < len; first += kStageKeys) {
      cp_async_wait<kStages - 2>();  // stage `consumed`: this lane's own copies, so no CTA barrier;
      __syncwarp();  // but a compiler barrier: the reads below must not move above the wait's asm
      const int slot = consumed % kStages;
      uint4 k_raw[kPerLane], v_raw[kPerLane];
      bool valid[kPerLane];
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) {
        k_raw[u] = sm.b.k[warp][slot][u][lane];
        v_raw[u] = sm.b.v[warp][slot][u][lane];
        valid[u] = first + u * kKeysPerWarp + sub < len;
      }
      add_keys<T, kLanesPerKey, kHeads, kPerLane>(k_raw, v_raw, valid, q, state);
      ++consumed;
      issue();  // into the slot read an iteration ago (its values were used above)
    }
#pragma unroll
    for (int h = 0; h < kHeads; ++h) merge_lane_groups<kLanesPerKey>(state[h]);
    if (sub == 0) {
#pragma unroll
      for (int h = 0; h < kHeads; ++h) {
        if (h >= heads) break;
        const int tile_row = reader * args.group + h;
        float o_a[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) o_a[j] = sm.b.o[tile_row * Smem::kLdO + chunk * 8 + j];
        state[h].merge(sm.b.m[tile_row], sm.b.l[tile_row], o_a);
        const float l = state[h].l;
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // no keys at all: 0, whatever o holds
        const int64_t head = static_cast<int64_t>(kv_head) * args.group + h;
        T* dst = static_cast<T*>(args.out.data) + row * args.out.stride[0] + head * args.out.stride[1] + chunk * 8;
#pragma unroll
        for (int j = 0; j < 8; ++j) dst[j] = from_float<T>(state[h].o[j] * inv);  // o's rows: any alignment
        if (chunk == 0 && args.lse_out != nullptr) {
          args.lse_out[row * args.q.shape[1] + head] =
              l > 0.0f ? (state[h].m + log2f(l)) * 0.69314718055994531f : -INFINITY;
        }
      }
    }
  }
  cp_async_wait<0>();  // no copy outlives the CTA
}

/// One owned tile: rows [first_row, first_row + readers) of KV head blockIdx.y, every level.
template <typename T, int D, int kHeads>
__global__ void __launch_bounds__(kOwnedThreads) cascade_owned_kernel(OwnedArgs args) {
  begin_dependent_kernel();  // PDL: cuda_common.cuh
  BATCHLLM_DYNAMIC_SHARED_MEMORY(smem_raw);
  using Smem = OwnedSmem<T, D>;
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  const int group = args.group;
  const int tile_readers = owned_readers(group);
  const int num_rows = static_cast<int>(args.q.shape[0]);
  const int first_row = blockIdx.x * tile_readers;
  const int readers = min(tile_readers, num_rows - first_row);
  const int kv_head = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Rows past a device split plan's rows have empty suffixes (as in the separate launches).
  const int suffix_rows = args.suffix_split.resolved().rows;
  for (int r = threadIdx.x; r < readers; r += kOwnedThreads) {
    const int row = first_row + r;
    sm.suffix_len[r] = row < suffix_rows ? args.levels.suffix_kv_lens[row] : 0;
  }

  // A: the prefix levels. Tile row r is reader r / group, head kv_head * group + r % group.
  const int r0 = warp * 16 + lane / 4, r1 = r0 + 8;
  const auto q_of = [&](int r) -> const T* {
    if (r / group >= readers) return nullptr;
    const int row = first_row + r / group, head = kv_head * group + r % group;
    return static_cast<const T*>(args.q.data) + row * args.q.stride[0] + head * args.q.stride[1];
  };
  const T* q0 = q_of(r0);
  const T* q1 = q_of(r1);
  uint32_t qa[D / 16][4];
  load_q_fragments<T, D>(qa, q0, q1, lane % 4);
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  LaneRows rows{0, 0};
  const DecodeLevelsView& levels = args.levels;
  // The prefixes meeting the tile, listed by the CTA's threads together (a step of W4's shape has 256
  // prefixes: a serial scan of their ranges by each CTA cost microseconds); past kMaxCovering, every
  // prefix is looked at in turn.
  const int listed = list_prefixes_meeting(levels, first_row, first_row + readers, sm.prefixes);
  const int64_t candidates = listed >= 0 ? listed : levels.num_prefixes;
  for (int64_t i = 0; i < candidates; ++i) {
    const int64_t p = listed >= 0 ? sm.prefixes.prefixes[i] : i;
    const int begin = levels.prefix_q_range[2 * p], end = levels.prefix_q_range[2 * p + 1];
    if (end <= first_row || begin >= first_row + readers || end <= begin) continue;  // uniform over the CTA
    const int len = levels.prefix_kv_lens[p];
    const auto covers = [&](int r) {
      const int row = first_row + r / group;
      return r / group < readers && row >= begin && row < end;
    };
    rows.limit0 = covers(r0) ? len : 0;
    rows.limit1 = covers(r1) ? len : 0;
    // Unmasked only where the prefix covers every reader of the tile.
    const bool all = begin <= first_row && end >= first_row + readers;
    const PagedKvHead<T> kv(args.k_cache, args.v_cache, levels.prefix_kv_blocks + levels.prefix_kv_indptr[p], kv_head,
                            args.block_size);
    mma_key_loop<T, D, kOwnedThreads, Smem::kPrefixStages>(sm.kv, kv, 0, all ? len : 0, len, qa, o, rows,
                                                           args.scale_log2);
  }
  __syncthreads();  // A's stages are free (also without prefixes): B's bytes from here
  // The rows' prefix states: whole-row sums over the row's 4 lanes; o stays unnormalised.
#pragma unroll
  for (int offset = 1; offset < 4; offset *= 2) {
    rows.l0 += __shfl_xor_sync(0xffffffffu, rows.l0, offset);
    rows.l1 += __shfl_xor_sync(0xffffffffu, rows.l1, offset);
  }
  const int t = lane % 4;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    const int c = n * 8 + 2 * t;
    sm.b.o[r0 * Smem::kLdO + c] = o[n][0];
    sm.b.o[r0 * Smem::kLdO + c + 1] = o[n][1];
    sm.b.o[r1 * Smem::kLdO + c] = o[n][2];
    sm.b.o[r1 * Smem::kLdO + c + 1] = o[n][3];
  }
  if (t == 0) {
    sm.b.m[r0] = rows.m0;
    sm.b.l[r0] = rows.l0;
    sm.b.m[r1] = rows.m1;
    sm.b.l[r1] = rows.l1;
  }
  __syncthreads();  // every row's prefix state, for the warp that takes its reader in B
  // B: the suffixes.
  owned_suffixes<T, D, kHeads>(args, sm, first_row, readers, kv_head);
}

/// Launches the owned cascade kernel for kHeads heads a reader state array.
template <typename T, int D, int kHeads>
cudaError_t launch_cascade_owned_heads(const OwnedArgs& args, dim3 grid, cudaStream_t stream) {
  constexpr auto kKernel = cascade_owned_kernel<T, D, kHeads>;
  constexpr size_t kSmemBytes = sizeof(OwnedSmem<T, D>);
  static const cudaError_t attribute_error =
      cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmemBytes));
  BATCHLLM_CUDA_RETURN_IF_ERROR(attribute_error);
  BATCHLLM_LAUNCH(grid, kOwnedThreads, kSmemBytes, stream, kKernel)(args);
  return last_launch_error();
}

/// Launches the owned cascade over every row (group <= kOwnedMaxGroup): grid (row tile, KV head).
template <typename T, int D>
cudaError_t launch_cascade_owned(const OwnedArgs& args, int num_kv_heads, cudaStream_t stream) {
  const int64_t num_rows = args.q.shape[0];
  if (num_rows == 0) return cudaSuccess;
  const int readers = owned_readers(args.group);
  const dim3 grid(static_cast<unsigned>((num_rows + readers - 1) / readers), static_cast<unsigned>(num_kv_heads));
  return args.group <= 4 ? launch_cascade_owned_heads<T, D, 4>(args, grid, stream)
                         : launch_cascade_owned_heads<T, D, 8>(args, grid, stream);
}

}  // namespace batchllm::kernels::cuda
