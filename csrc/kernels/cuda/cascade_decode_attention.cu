// CUDA cascade_decode_attention: decode attention by shared-prefix levels (Hydragen / FlashInfer
// cascade). Three steps on one stream (BATCHLLM_CASCADE_LAUNCH=fused: steps 1 and 2 in one launch;
// =merge: step 2, then step 1 with step 3 as its epilogue; =streams: step 1 on a side stream beside
// step 2; cascade_launch() below):
//   1. suffix: each decode row's GQA heads over its own suffix blocks -> suffix state, by the CUDA-core
//      decode kernel (decode_rows.cuh; BATCHLLM_CASCADE_SUFFIX=tile selects the tensor-core tile
//      kernel instead, for A/B measurements);
//   2. prefix tiles: for each shared prefix, all its reader rows x GQA heads stacked as the rows of
//      one tensor-core tile matmul, so the prefix's KV is read once per 64 rows, not once per row;
//   3. combine: per (row, head), the suffix state merged by LSE with the state of every prefix that
//      covers the row (merge_lse), written in q's dtype (+ optional LSE).
// Long prefixes with few readers are split along their keys (split-KV) so that every SM has work;
// each chunk is one more partial state for step 3. Workspace layout: CascadePlan below.
#include <algorithm>
#include <array>

#include "batchllm/kernels/cuda.h"
#include "kernels/cuda/tile_kernels.cuh"
#include "kernels/cuda/cascade_owned.cuh"
#include "kernels/cuda/decode_rows.cuh"
#include "kernels/cuda/prefix_states.cuh"

namespace batchllm::kernels {

namespace {

int64_t multiprocessor_count() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count <= 0) {
    cudaGetLastError();
    return 132;  // an H100 SXM; only the split heuristics depend on it
  }
  return count;
}

/// decode_rows' CTAs per (row, key split): KV heads x head chunks.
int64_t decode_rows_ctas_per_item(int64_t kv_heads, int group) {
  const int heads_per_cta = cuda::decode_heads_per_cta(group);
  return kv_heads * ((group + heads_per_cta - 1) / heads_per_cta);
}

/// decode_rows CTAs an SM: 4 at 4 heads a CTA (128 registers, held there by its launch bounds), 2 at
/// 8 (239-249 registers: GQA groups above 4, Qwen2.5-7B's 7).
int64_t decode_rows_slots(int group, int64_t sms) { return (cuda::decode_heads_per_cta(group) == 4 ? 4 : 2) * sms; }

/// decode_rows' key split for `rows` rows whose longest suffix has `max_suffix_len` keys (splits and
/// chunk_keys): the keys are split while a wave of decode_rows CTAs would be under half full, into at
/// most 16 chunks of at least 256 keys (a multiple of the 64 keys a CTA loads a step).
cuda::SuffixSplit plan_suffix_split(int64_t rows, int64_t kv_heads, int group, int64_t max_suffix_len,
                                    int64_t sms) {
  constexpr int64_t kMinChunkKeys = 256;
  cuda::SuffixSplit split;
  const int64_t slots = decode_rows_slots(group, sms);
  const int64_t ctas = rows * decode_rows_ctas_per_item(kv_heads, group);
  const int64_t by_keys = (max_suffix_len + kMinChunkKeys - 1) / kMinChunkKeys;
  if (rows > 0 && 2 * ctas < slots && by_keys > 1) {
    split.splits = static_cast<int>(std::min<int64_t>({slots / ctas, by_keys, 16}));
    const int64_t per_split = (max_suffix_len + split.splits - 1) / split.splits;
    split.chunk_keys = static_cast<int>((per_split + 63) / 64 * 64);
  }
  return split;
}

/// The items (rows x key splits) a launch of `rows` rows holds when the split is decided per step on
/// the device (DecodeLevelsView::suffix_split): the rows unsplit, or a wave of split items, whichever
/// is more. plan_suffix_split never asks for more: its splits x rows stay within a wave (the slots
/// over the CTAs of an item).
int64_t device_split_items(int64_t rows, int64_t kv_heads, int group, int64_t sms) {
  return std::max<int64_t>(rows, decode_rows_slots(group, sms) / decode_rows_ctas_per_item(kv_heads, group));
}

/// The most prefix tile CTAs an SM a split plan counts (the occupancy query may report more for small
/// tiles); the workspace is sized for any count up to it.
constexpr int kMaxPrefixCtasPerSm = 4;

/// The prefix tiles' key split for `num_prefixes` prefixes of at most `max_rows` readers and
/// `max_len` keys (host fields of a PrefixSplit: row tiles, splits, chunk keys, state rows, items).
/// The split count with the least time per key chunk: waves(splits) / splits, where a wave is one
/// CTA per slot (the tile kernel's CTAs an SM: one of the 128-row tiles, 3 of wgmma64's 64-row tiles
/// at d = 64). A longer split list must win by 5%, so ties keep fewer, larger chunks (less combine work).
/// Chunks are whole key steps of the tile kernel (`tile_keys`: 64, or 128 for wgmma-k128).
cuda::PrefixSplit plan_prefix_split(int64_t num_prefixes, int64_t max_rows, int64_t max_len, int64_t kv_heads,
                                    int group, int tile_rows, int ctas_per_sm, int64_t sms,
                                    int tile_keys = cuda::kTileKeys) {
  cuda::PrefixSplit split;
  split.row_tiles = static_cast<int>((max_rows * group + tile_rows - 1) / tile_rows);
  split.state_rows = static_cast<int>(max_rows);
  split.tile_rows = tile_rows;
  split.group = group;
  const int64_t base_ctas = static_cast<int64_t>(split.row_tiles) * num_prefixes * kv_heads;
  if (base_ctas > 0 && max_len > 0) {
    constexpr int64_t kMinChunkKeys = 256;  // below this a chunk's fixed costs dominate
    const int64_t slots = std::clamp(ctas_per_sm, 1, kMaxPrefixCtasPerSm) * sms;
    const int64_t most = std::min<int64_t>(64, (max_len + kMinChunkKeys - 1) / kMinChunkKeys);
    double best_cost = 1.0 * ((base_ctas + slots - 1) / slots);
    for (int64_t s = 2; s <= most; ++s) {
      const double cost = static_cast<double>((base_ctas * s + slots - 1) / slots) / static_cast<double>(s);
      if (cost < 0.95 * best_cost) {
        best_cost = cost;
        split.splits = static_cast<int>(s);
      }
    }
  }
  const int64_t per_split = (max_len + split.splits - 1) / split.splits;
  split.chunk_keys = static_cast<int>((per_split + tile_keys - 1) / tile_keys * tile_keys);
  split.items = split.row_tiles * split.splits;
  return split;
}

/// Host-side sizes of one cascade call: tiles, split-KV chunks of the prefixes, workspace offsets.
/// A prefix whose tiles alone would leave most SMs idle (few readers x KV heads) is split along its
/// keys into chunks; each chunk's partial state is one more state for the combine step to merge.
struct CascadePlan {
  int group = 1;
  // The prefix level's split: by this plan (the hints), or per step on the device.
  cuda::PrefixSplit prefix;
  // The suffix level (decode_rows) is split along its keys too when rows x KV heads leave SMs idle
  // (the tail of a job: few sequences, long outputs): by this plan, or per step on the device.
  cuda::SuffixSplit suffix;
  // Workspace offsets in floats: suffix o [suffix items, Hq, D], suffix lse [suffix items, Hq],
  // prefix o [P, splits, R, Hq, D], prefix lse [P, splits, R, Hq] (R = state rows: max_prefix_rows,
  // or with a device-decided split room for items x rows_per_tile).
  int64_t suffix_o = 0, suffix_lse = 0, prefix_o = 0, prefix_lse = 0, total = 0;

  /// `suffix_by_tiles`: the tile suffix kernel, which takes no suffix splits; `tile_rows`: rows per
  /// prefix tile (64, or 128 for the 8-warp kernels); `prefix_ctas_per_sm`: the prefix tile kernel's
  /// CTAs an SM (cuda::tile_ctas_per_sm; at most kMaxPrefixCtasPerSm count); `device_suffix_split`,
  /// `device_prefix_split`: the splits come from levels.suffix_split / prefix_split (room for any
  /// split those may ask for: device_split_items; the host plan's prefix items).
  CascadePlan(int64_t rows, int64_t q_heads, int64_t kv_heads, int64_t head_dim, const DecodeLevelsView& levels,
              bool suffix_by_tiles, int tile_rows, int prefix_ctas_per_sm, bool device_suffix_split,
              bool device_prefix_split, int tile_keys = cuda::kTileKeys) {
    group = static_cast<int>(q_heads / kv_heads);
    const int64_t sms = multiprocessor_count();
    if (!suffix_by_tiles && levels.max_suffix_kv_len > 0) {
      suffix = plan_suffix_split(rows, kv_heads, group, levels.max_suffix_kv_len, sms);
    }
    suffix.rows = static_cast<int>(rows);
    suffix.items = static_cast<int>(rows * suffix.splits);
    if (!suffix_by_tiles && device_suffix_split) {
      suffix.items = static_cast<int>(device_split_items(rows, kv_heads, group, sms));
      suffix.plan = levels.suffix_split;
    }
    prefix = plan_prefix_split(levels.num_prefixes, levels.max_prefix_rows, levels.max_prefix_kv_len, kv_heads,
                               group, tile_rows, prefix_ctas_per_sm, sms, tile_keys);
    int64_t prefix_rows_per_split = static_cast<int64_t>(prefix.splits) * levels.max_prefix_rows;
    if (device_prefix_split) {
      prefix.plan = levels.prefix_split;
      const int64_t rows_per_tile = (tile_rows + group - 1) / group;  // a device plan's states: at most
      prefix_rows_per_split = std::max(prefix_rows_per_split, static_cast<int64_t>(prefix.items) * rows_per_tile);
    }
    const int64_t prefix_states = levels.num_prefixes * prefix_rows_per_split * q_heads;
    suffix_o = 0;
    suffix_lse = static_cast<int64_t>(suffix.items) * q_heads * head_dim;
    prefix_o = suffix_lse + static_cast<int64_t>(suffix.items) * q_heads;
    prefix_lse = prefix_o + prefix_states * head_dim;
    total = prefix_lse + prefix_states;
  }
};

}  // namespace

namespace cuda {
namespace {

/// Writes a finished row state (normalised o, lse) as float32 into the workspace.
__device__ __forceinline__ void write_state(float* o_dst, float* lse_dst, const float* o_row, float inv_sum,
                                            float lse, int head_dim, int lane) {
  for (int d = lane; d < head_dim; d += 32) o_dst[d] = o_row[d] * inv_sum;
  if (lane == 0) *lse_dst = lse;
}

template <typename T>
struct SuffixProblem {
  TensorView q;
  DecodeLevelsView levels;
  float* state_o;    // [B, Hq, D]
  float* state_lse;  // [B, Hq]
  int group;

  __device__ bool setup(TileRows<T>& rows, const dim3& item) const {
    const int row = item.y, kv_head = item.z, first = item.x * kTileRows;
    if (first >= group) return false;
    rows.num_keys = rows.unmasked_end = levels.suffix_kv_lens[row];
    rows.blocks = levels.suffix_block_tables + row * levels.max_suffix_blocks;
    rows.kv_head = kv_head;
    return true;
  }

  __device__ void setup_row(TileRows<T>& rows, const dim3& item, int r) const {
    const int row = item.y, first = item.x * kTileRows;
    const int head = static_cast<int>(item.z) * group + first + r;
    const bool used = r < kTileRows && first + r < group;
    rows.q[r] = used ? static_cast<const T*>(q.data) + row * q.stride[0] + head * q.stride[1] : nullptr;
    rows.key_limit[r] = used ? levels.suffix_kv_lens[row] : 0;
  }

  __device__ void write(const dim3& item, int r, const float* o_row, float inv_sum, float lse, int lane) const {
    const int64_t state = static_cast<int64_t>(item.y) * q.shape[1] + item.z * group + item.x * kTileRows + r;
    write_state(state_o + state * q.shape[2], state_lse + state, o_row, inv_sum, lse, q.shape[2], lane);
  }
};

/// grid.x = row tile + split * row_tiles: chunk `split` of the prefix's keys for 64 reader rows.
template <typename T>
struct PrefixProblem {
  TensorView q;
  DecodeLevelsView levels;
  float* state_o;    // [P, splits, R, Hq, D] (R: split.state_rows)
  float* state_lse;  // [P, splits, R, Hq]
  int group;
  int tile_rows;  // rows per tile: the kernel's (tile_rows(kernel))
  PrefixSplit split;  // the host plan's, or a device plan within its items (resolved per CTA)

  __device__ bool setup(TileRows<T>& rows, const dim3& item) const {
    const PrefixSplit s = split.resolved();
    if (static_cast<int>(item.x) >= s.row_tiles * s.splits) return false;  // past a device plan's items
    const int prefix = item.y, kv_head = item.z;
    const int first = (item.x % s.row_tiles) * tile_rows, chunk = item.x / s.row_tiles;
    const int begin = levels.prefix_q_range[2 * prefix], end = levels.prefix_q_range[2 * prefix + 1];
    if (first >= (end - begin) * group) return false;
    // An empty chunk (prefix shorter than this split's start) still writes lse -inf, o 0: a no-op merge.
    rows.key_begin = chunk * s.chunk_keys;
    rows.num_keys = min(levels.prefix_kv_lens[prefix], rows.key_begin + s.chunk_keys);
    rows.num_keys = rows.unmasked_end = max(rows.num_keys, rows.key_begin);
    rows.blocks = levels.prefix_kv_blocks + levels.prefix_kv_indptr[prefix];
    rows.kv_head = kv_head;
    return true;
  }

  __device__ void setup_row(TileRows<T>& rows, const dim3& item, int r) const {
    const int prefix = item.y;
    const int idx = (item.x % split.resolved().row_tiles) * tile_rows + r;
    const int row = levels.prefix_q_range[2 * prefix] + idx / group;
    const bool used = r < tile_rows && row < levels.prefix_q_range[2 * prefix + 1];
    const int head = static_cast<int>(item.z) * group + idx % group;
    rows.q[r] = used ? static_cast<const T*>(q.data) + row * q.stride[0] + head * q.stride[1] : nullptr;
    rows.key_limit[r] = used ? rows.num_keys : 0;  // rows.num_keys: set by setup, before the barrier
  }

  __device__ void write(const dim3& item, int r, const float* o_row, float inv_sum, float lse, int lane) const {
    const PrefixSplit s = split.resolved();
    const int idx = (item.x % s.row_tiles) * tile_rows + r;
    const int64_t chunk = item.x / s.row_tiles;
    const int64_t local_row = idx / group;
    const int64_t head = item.z * group + idx % group;
    const int64_t state =
        ((static_cast<int64_t>(item.y) * s.splits + chunk) * s.state_rows + local_row) * q.shape[1] + head;
    write_state(state_o + state * q.shape[2], state_lse + state, o_row, inv_sum, lse, q.shape[2], lane);
  }
};

/// Work item `i` of `grid`, counted x fastest (as the hardware numbers CTAs).
__device__ __forceinline__ dim3 grid_item(unsigned i, const dim3& grid) {
  return dim3(i % grid.x, i / grid.x % grid.y, i / (grid.x * grid.y));
}

__host__ __device__ __forceinline__ unsigned grid_items(const dim3& grid) { return grid.x * grid.y * grid.z; }

/// Steps 1 and 2 in one launch (BatchLLM's horizontally fused kernel): CTAs [0, prefix items) are the
/// prefix tiles, the rest the suffix's decode_rows items, so the long prefix tiles start first and the
/// short suffix items fill the SMs around them and the prefix tail; no launch gap between the two.
/// Every CTA gets the larger of the two shared-memory layouts (and the larger register count): the
/// suffix items run at the tiles' occupancy, the price the A/B measures (BATCHLLM_CASCADE_LAUNCH=fused).
template <typename T, int D, int kHeads, bool kMma>
__global__ void __launch_bounds__(kTileThreads)
    cascade_fused_kernel(PrefixProblem<T> prefix, dim3 prefix_grid, DecodeRowsArgs suffix, dim3 suffix_grid,
                         TensorView k_cache, TensorView v_cache, float scale_log2) {
  static_assert(kTileThreads == kDecodeThreads, "prefix and suffix items share the block size");
  begin_dependent_kernel();  // PDL: cuda_common.cuh
  BATCHLLM_DYNAMIC_SHARED_MEMORY(smem_raw);
  const unsigned prefix_items = grid_items(prefix_grid);
  if (blockIdx.x < prefix_items) {
    const dim3 item = grid_item(blockIdx.x, prefix_grid);
    if constexpr (kMma) {
      attention_mma<T, D, 4>(prefix, item, smem_raw, k_cache, v_cache, scale_log2);
    } else {
      attention_tile<T, D>(prefix, item, smem_raw, k_cache, v_cache, scale_log2);
    }
  } else {
    decode_rows<T, D, kHeads>(suffix, grid_item(blockIdx.x - prefix_items, suffix_grid),
                              *reinterpret_cast<DecodeSmem<D, kHeads>*>(smem_raw));
  }
}

template <typename T, int D, int kHeads, bool kMma>
cudaError_t launch_cascade_fused(const PrefixProblem<T>& prefix, dim3 prefix_grid, const DecodeRowsArgs& suffix,
                                 dim3 suffix_grid, const TensorView& k_cache, const TensorView& v_cache,
                                 float scale, cudaStream_t stream) {
  static_assert(sizeof(PrefixProblem<T>) + sizeof(DecodeRowsArgs) + 2 * sizeof(TensorView) + 2 * sizeof(dim3) +
                        sizeof(float) <= 4096,
                "kernel parameters must stay within the 4 KB every architecture takes");
  constexpr auto kKernel = cascade_fused_kernel<T, D, kHeads, kMma>;
  constexpr size_t kTileSmem = kMma ? sizeof(MmaSmem<T, D>) : sizeof(TileSmem<T, D>);
  constexpr size_t kSmemBytes = std::max(kTileSmem, sizeof(DecodeSmem<D, kHeads>));
  const unsigned items = grid_items(prefix_grid) + grid_items(suffix_grid);
  if (items == 0) return cudaSuccess;
  static const cudaError_t attribute_error =
      cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmemBytes));
  BATCHLLM_CUDA_RETURN_IF_ERROR(attribute_error);
  constexpr float kLog2e = 1.4426950408889634f;
  BATCHLLM_LAUNCH(items, kTileThreads, kSmemBytes, stream, kKernel)(prefix, prefix_grid, suffix, suffix_grid,
                                                                     k_cache, v_cache, scale * kLog2e);
  return last_launch_error();
}

/// Elements (head x dim) of one decode row per combine CTA: a row's Hq x D elements are split over
/// several CTAs, so that a batch of few rows still spreads its merges over the SMs.
constexpr int kCombineElements = 512;
/// grid (row, element chunk): merge the suffix state (every key split) of kCombineElements elements of
/// the row with every covering prefix's state, in the order of merge_prefix_states (decode_rows' merge
/// epilogue shares it): suffix splits, then the covering prefixes ascending, each split by split.
/// A merge step's weights depend on the (row, head) alone, so they are computed once per head, by one
/// thread each, and every element applies them (MergeSteps, prefix_states.cuh): the same bits as
/// merging element by element, at a multiply-add per element and step instead of two expf, a logf
/// and a division. Past kMergeSteps steps or kMaxCovering prefixes, element by element.
/// D: the head dim, a compile-time constant so that an element's head and dim are a shift and a mask.
template <typename T, int D>
__global__ void combine_levels_kernel(TensorView o, float* lse_out, DecodeLevelsView levels, PrefixStates prefix_plan,
                                      SuffixSplit suffix_split, const float* suffix_o, const float* suffix_lse) {
  begin_dependent_kernel();  // PDL: cuda_common.cuh
  const int row = blockIdx.x;
  // The row's suffix states (row, split 0..splits-1) are adjacent; a row past a device plan's rows
  // (a graph's padded row, when the step's own rows are split) has none: its suffix is empty.
  const SuffixSplit split = suffix_split.resolved();
  if (writes_output_directly(split) && row < split.rows) return;  // decode_rows wrote it (the whole CTA)
  const PrefixStates prefix{prefix_plan.o, prefix_plan.lse, prefix_plan.split.resolved()};
  constexpr int kHeads = kCombineElements / D;  // heads of a full chunk
  static_assert(kCombineElements % D == 0, "a combine chunk holds whole heads");
  __shared__ CoveringList covering;
  __shared__ MergeSteps<kHeads> steps;
  const int64_t num_heads = o.shape[1];
  constexpr int64_t head_dim = D;
  const int listed = list_covering_prefixes(levels, row, covering);
  const int begin = blockIdx.y * kCombineElements;
  const int end = static_cast<int>(min(num_heads * head_dim, static_cast<int64_t>(begin + kCombineElements)));
  const int first_head = begin / D;
  const int heads = (end - begin) / D;
  const bool has_suffix = row < split.rows;
  const int suffix_steps = has_suffix ? split.splits - 1 : 0;
  const int64_t suffix_base = static_cast<int64_t>(row) * split.splits * num_heads;  // (row, split 0), head 0
  const auto own_lse = [&](int64_t head) { return has_suffix ? suffix_lse[suffix_base + head] : -INFINITY; };
  const auto own_o = [&](int64_t head, int64_t d) {
    return has_suffix ? suffix_o[(suffix_base + head) * head_dim + d] : 0.0f;
  };
  if (threadIdx.x == 0) {  // the steps' states, for head 0: suffix splits, then covering prefixes
    int count = suffix_steps <= kMergeSteps ? suffix_steps : -1;
    for (int s = 1; count >= 0 && s <= suffix_steps; ++s) steps.state[s - 1] = suffix_base + s * num_heads;
    steps.count = append_prefix_steps(steps.state, count, levels, covering, listed, prefix, row, num_heads);
  }
  __syncthreads();
  const int count = steps.count;
  if (count < 0) {  // too many steps to keep: merge element by element (same order, same bits)
    for (int idx = begin + threadIdx.x; idx < end; idx += blockDim.x) {
      const int64_t head = idx / D, d = idx % D;
      float value = own_o(head, d);
      float lse = own_lse(head);
      for (int64_t s = 1; s <= suffix_steps; ++s) {
        const int64_t state = suffix_base + s * num_heads + head;
        const LseMerge w = merge_lse(lse, suffix_lse[state]);
        value = merge_value(w, value, suffix_o[state * head_dim + d]);
        lse = w.lse;
      }
      merge_prefix_states(value, lse, levels, covering, listed, prefix, row, head, num_heads, d, head_dim);
      static_cast<T*>(o.data)[row * o.stride[0] + head * o.stride[1] + d] = from_float<T>(value);
      if (d == 0 && lse_out != nullptr) lse_out[row * num_heads + head] = lse;
    }
    return;
  }
  // Steps below suffix_steps read the suffix's split states, the rest the prefixes'.
  const auto lse_src = [&](int k) { return k < suffix_steps ? suffix_lse : prefix.lse; };
  const auto o_src = [&](int k) { return k < suffix_steps ? suffix_o : prefix.o; };
  if (static_cast<int>(threadIdx.x) < heads) {  // a thread per head: its merge weights and the row's lse
    const int64_t head = first_head + threadIdx.x;
    const float lse = chain_merge_weights(steps, count, threadIdx.x, head, own_lse(head), lse_src);
    if (lse_out != nullptr) lse_out[row * num_heads + head] = lse;
  }
  __syncthreads();
  for (int idx = begin + threadIdx.x; idx < end; idx += blockDim.x) {
    const int h = idx / D - first_head, d = idx % D;
    const int64_t head = first_head + h;
    const float value = apply_merge_steps(steps, count, h, head, d, head_dim, own_o(head, d), o_src);
    static_cast<T*>(o.data)[row * o.stride[0] + head * o.stride[1] + d] = from_float<T>(value);
  }
}

}  // namespace
}  // namespace cuda

namespace {

/// The suffix kernel: the decode kernel unless BATCHLLM_CASCADE_SUFFIX=tile (read at every launch, so
/// that a benchmark can compare both in one process).
bool suffix_by_tiles() { return cuda::env_equals("BATCHLLM_CASCADE_SUFFIX", "tile"); }

/// How the steps are launched (BATCHLLM_CASCADE_LAUNCH, for the A/B; decode_rows suffix only):
///   separate (default): suffix, prefix tiles, combine;
///   fused: suffix and prefix tiles in one launch (cascade_fused_kernel), then combine;
///   merge: prefix tiles, then the suffix with decode_rows' merge epilogue, which writes the output:
///          no suffix state round trip through memory, no combine launch (one suffix key split only;
///          with more, separate);
///   streams: as separate, with the suffix on a side stream forked from and joined back to the
///          caller's, so suffix and prefix CTAs share the SMs each with its own kernel's resources
///          (the fused launch's overlap without its occupancy price);
///   owned: one launch in which each CTA takes a tile of rows through every level and writes their
///          outputs (cascade_owned.cuh): no states in memory, no combine, no key splits (GQA groups
///          up to 8; larger ones run separate);
///   auto: owned where it should pay (owned_pays), else separate.
enum class CascadeLaunch { kSeparate, kFused, kMerge, kStreams, kOwned, kAuto };

CascadeLaunch cascade_launch() {
  if (cuda::env_equals("BATCHLLM_CASCADE_LAUNCH", "owned")) return CascadeLaunch::kOwned;
  if (cuda::env_equals("BATCHLLM_CASCADE_LAUNCH", "auto")) return CascadeLaunch::kAuto;
  if (cuda::env_equals("BATCHLLM_CASCADE_LAUNCH", "fused")) return CascadeLaunch::kFused;
  if (cuda::env_equals("BATCHLLM_CASCADE_LAUNCH", "merge")) return CascadeLaunch::kMerge;
  if (cuda::env_equals("BATCHLLM_CASCADE_LAUNCH", "streams")) return CascadeLaunch::kStreams;
  return CascadeLaunch::kSeparate;
}

/// The side stream of the streams launch and its fork / join events, one set per device, made at the
/// first use outside a graph capture (making them while the caller's stream is being captured could
/// be refused: such a call runs serially instead). One host thread launches per device (the engine's
/// step loop), so the two events are never in use by two calls at once.
struct SideStream {
  cudaStream_t stream = nullptr;
  cudaEvent_t fork = nullptr, join = nullptr;
  bool ready = false;
};

const SideStream* side_stream(cudaStream_t caller) {
  constexpr int kMaxDevices = 64;
  static SideStream streams[kMaxDevices];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return nullptr;
  SideStream& side = streams[device];
  if (!side.ready) {
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(caller, &capturing) != cudaSuccess || capturing != cudaStreamCaptureStatusNone) {
      cudaGetLastError();
      return nullptr;
    }
    side.ready = cudaStreamCreateWithFlags(&side.stream, cudaStreamNonBlocking) == cudaSuccess &&
                 cudaEventCreateWithFlags(&side.fork, cudaEventDisableTiming) == cudaSuccess &&
                 cudaEventCreateWithFlags(&side.join, cudaEventDisableTiming) == cudaSuccess;
    if (!side.ready) {
      cudaGetLastError();
      return nullptr;
    }
  }
  return &side;
}

/// Whether the owned launch should beat the separate ones (BATCHLLM_CASCADE_LAUNCH=auto), by the
/// call's host sizes (a graph's: its bucket's hints). It splits no keys, so a CTA's time is its tile's
/// whole prefix (on mma.sync, one CTA a tile) and its readers' suffixes: it needs prefixes short
/// enough that no tile runs long after the others (at most 2,048 keys: 32 key tiles, about what the
/// separate launches' fixed costs take) and tiles enough to spread over at least half the SMs.
/// Where it loses, by that reasoning: a long prefix with few readers ((256, 8192, 128): 128 CTAs of
/// 8,192 keys each, against the separate launches' key splits over every SM), few rows with long
/// suffixes ((32, 4096, 1024): 16 CTAs), and prefixes of fewer readers than a few tiles hold: tiles
/// then straddle prefixes and run each one's key loop for part of their rows (W6's 16 readers a
/// prefix against Qwen's 9 a tile: most tiles would take two 2,000-key prefixes). A first guess for
/// the GPU runs to move (bench_attention's grid and flat_d64 time owned, auto and separate).
bool owned_pays(int64_t rows, int64_t kv_heads, int group, const DecodeLevelsView& levels) {
  constexpr int32_t kMaxOwnedPrefix = 2048;
  const int readers = cuda::owned_readers(group);
  const int64_t tiles = (rows + readers - 1) / readers;
  return levels.max_prefix_kv_len <= kMaxOwnedPrefix && levels.max_prefix_rows >= 4 * readers &&
         2 * tiles * kv_heads >= multiprocessor_count();
}

}  // namespace

bool cuda_head_dim_supported(int64_t head_dim) { return head_dim == 64 || head_dim == 128; }

namespace {

/// The prefix tile kernel's CTAs an SM (its occupancy) for q's dtype and head dim; 0 for a dtype or
/// head dim without kernels.
int prefix_tile_ctas_per_sm(cuda::TileKernel kernel, DType dtype, int64_t head_dim) {
  int ctas = 0;
  const cudaError_t dispatched = BATCHLLM_DISPATCH_HALF_TYPES(dtype, [&] {
    return BATCHLLM_DISPATCH_HEAD_DIM(head_dim, [&] {
      ctas = cuda::tile_ctas_per_sm<scalar_t, kHeadDim, cuda::PrefixProblem<scalar_t>>(kernel);
      return cudaSuccess;
    });
  });
  return dispatched == cudaSuccess ? ctas : 0;
}

}  // namespace

size_t cascade_workspace_floats(int64_t num_rows, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                const DecodeLevelsView& levels, bool device_suffix_split, bool device_prefix_split) {
  // Enough for every kernel variant (the launch picks one from the environment): the split counts,
  // and so the states, differ between 64- and 128-row prefix tiles; the tile suffix takes no splits.
  // The prefix split follows the tile kernel's CTAs an SM (its occupancy, known with the dtype at
  // launch): every count the plan takes is sized for.
  int64_t most = 0;
  for (int rows : {cuda::kTileRows, cuda::kMaxTileRows}) {
    for (int ctas = 1; ctas <= kMaxPrefixCtasPerSm; ++ctas) {
      most = std::max(most, CascadePlan(num_rows, num_q_heads, num_kv_heads, head_dim, levels, false, rows, ctas,
                                        device_suffix_split, device_prefix_split)
                                .total);
    }
  }
  return static_cast<size_t>(most);
}

std::array<int32_t, 3> cascade_prefix_split(int64_t num_prefixes, int64_t max_rows, int64_t max_len,
                                            int64_t bucket_prefixes, int64_t bucket_rows, int64_t bucket_len,
                                            int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, DType dtype) {
  const int group = static_cast<int>(num_q_heads / num_kv_heads);
  const cuda::TileKernel kernel = cuda::tile_kernel(cuda::TileUse::kPrefix, head_dim);
  const int tile_rows = cuda::tile_rows(kernel);
  const int ctas = std::max(1, prefix_tile_ctas_per_sm(kernel, dtype, head_dim));
  const int64_t sms = multiprocessor_count();
  // The launch's items: the bucket's plan (the graph's grid); the step's own split within them.
  const int keys = cuda::tile_keys(kernel);
  const cuda::PrefixSplit bucket =
      plan_prefix_split(bucket_prefixes, bucket_rows, bucket_len, num_kv_heads, group, tile_rows, ctas, sms, keys);
  const cuda::PrefixSplit own =
      plan_prefix_split(num_prefixes, max_rows, max_len, num_kv_heads, group, tile_rows, ctas, sms, keys);
  const int tiles = std::max(1, own.row_tiles);
  int splits = std::max(1, std::min(own.splits, bucket.items / tiles));
  if (tiles > bucket.items) splits = own.splits;  // cannot be held: the kernels run the bucket's plan
  const int64_t per_split = (max_len + splits - 1) / splits;
  const int chunk_keys = static_cast<int>(std::max<int64_t>(keys, (per_split + keys - 1) / keys * keys));
  return {splits, chunk_keys, static_cast<int32_t>(max_rows)};
}

std::array<int32_t, 3> cascade_suffix_split(int64_t rows, int64_t padded_rows, int64_t num_q_heads,
                                            int64_t num_kv_heads, int64_t max_suffix_kv_len) {
  const int group = static_cast<int>(num_q_heads / num_kv_heads);
  const cuda::SuffixSplit split =
      plan_suffix_split(rows, num_kv_heads, group, max_suffix_kv_len, multiprocessor_count());
  // Unsplit, every row of the launch (padded ones too: they read one key) has its state, as without a
  // device plan; split, only the step's own rows, whose splits fill at most device_split_items.
  return {split.splits, split.chunk_keys, static_cast<int32_t>(split.splits == 1 ? padded_rows : rows)};
}

cudaError_t cascade_decode_attention_cuda(const CascadeDecodeParams& p, cudaStream_t stream) {
  const int64_t num_rows = p.q.shape[0], num_heads = p.q.shape[1], head_dim = p.q.shape[2];
  if (!cuda::attention_args_fit(p.k_cache, p.v_cache, p.scale)) return cudaErrorInvalidValue;
  if (num_rows == 0) return cudaSuccess;
  const int num_kv_heads = static_cast<int>(p.k_cache.shape[2]);
  const bool tiles = suffix_by_tiles();
  const cuda::TileKernel kernel = cuda::tile_kernel(cuda::TileUse::kPrefix, head_dim);
  const CascadeLaunch launch_mode = cascade_launch();
  const int prefix_ctas_per_sm = p.levels.num_prefixes > 0 ? prefix_tile_ctas_per_sm(kernel, p.q.dtype, head_dim) : 1;
  if (prefix_ctas_per_sm < 1) return cudaErrorInvalidValue;  // a dtype or head dim without kernels
  const CascadePlan plan(num_rows, num_heads, num_kv_heads, head_dim, p.levels, tiles, cuda::tile_rows(kernel),
                         prefix_ctas_per_sm, p.levels.suffix_split != nullptr, p.levels.prefix_split != nullptr,
                         cuda::tile_keys(kernel));
  // The fused grid shares one block size: 4-warp WMMA or mma prefix tiles only (others: separate).
  const bool fused = !tiles && launch_mode == CascadeLaunch::kFused &&
                     (kernel == cuda::TileKernel::kWmma || kernel == cuda::TileKernel::kMma);
  // The merge epilogue takes one key split: not a device-decided one, which may split.
  const bool merge = !tiles && launch_mode == CascadeLaunch::kMerge && plan.suffix.splits == 1 &&
                     plan.suffix.plan == nullptr;
  const bool direct = !tiles && !merge && p.levels.num_prefixes == 0;
  // Nothing to run beside the suffix without prefixes: the side stream would only add its events.
  const SideStream* side = !tiles && !direct && launch_mode == CascadeLaunch::kStreams ? side_stream(stream)
                                                                                         : nullptr;
  const int group = plan.group;
  // Owned tiles where asked for and there are prefixes (without, decode_rows writes the rows directly).
  const bool owned = !tiles && p.levels.num_prefixes > 0 && group <= cuda::kOwnedMaxGroup &&
                     (launch_mode == CascadeLaunch::kOwned ||
                      (launch_mode == CascadeLaunch::kAuto && owned_pays(num_rows, num_kv_heads, group, p.levels)));
  float* ws = p.workspace;
  const dim3 prefix_grid(plan.prefix.items, static_cast<unsigned>(p.levels.num_prefixes), num_kv_heads);
  return BATCHLLM_DISPATCH_HALF_TYPES(p.q.dtype, [&] {
    return BATCHLLM_DISPATCH_HEAD_DIM(head_dim, [&] {
      const cuda::PrefixProblem<scalar_t> prefix{p.q,     p.levels, ws + plan.prefix_o, ws + plan.prefix_lse,
                                                 group,   cuda::tile_rows(kernel), plan.prefix};
      constexpr float kLog2e = 1.4426950408889634f;
      // A step without prefixes: unsplit rows write their outputs in decode_rows (SuffixSplit::direct).
      cuda::SuffixSplit suffix_split = plan.suffix;
      suffix_split.direct = direct;
      cuda::DecodeRowsArgs suffix{p.q, p.k_cache, p.v_cache, p.levels.suffix_block_tables,
                                  p.levels.max_suffix_blocks, p.levels.suffix_kv_lens, ws + plan.suffix_o,
                                  ws + plan.suffix_lse, p.scale * kLog2e, group, suffix_split,
                                  cuda::FastDivisor::make(static_cast<uint32_t>(p.k_cache.shape[1]))};
      if (direct) {
        suffix.out = p.o;
        suffix.lse_out = p.lse;
      }
      const cuda::PrefixStates prefix_states{ws + plan.prefix_o, ws + plan.prefix_lse, plan.prefix};
      if (owned) {
        const cuda::OwnedArgs args{p.q,   p.k_cache, p.v_cache, p.levels, plan.suffix, p.o, p.lse, p.scale * kLog2e,
                                   group, cuda::FastDivisor::make(static_cast<uint32_t>(p.k_cache.shape[1]))};
        return cuda::launch_cascade_owned<scalar_t, kHeadDim>(args, num_kv_heads, stream);
      }
      if (merge) {
        BATCHLLM_CUDA_RETURN_IF_ERROR((cuda::launch_tiles<scalar_t, kHeadDim>(kernel, prefix, prefix_grid, p.k_cache,
                                                                              p.v_cache, p.scale, stream)));
        suffix.merge_prefixes = true;
        suffix.levels = p.levels;
        suffix.prefix_states = prefix_states;
        suffix.out = p.o;
        suffix.lse_out = p.lse;
        return cuda::launch_decode_rows<scalar_t, kHeadDim>(suffix, num_kv_heads, stream);
      }
      if (fused) {
        const dim3 suffix_grid = cuda::decode_rows_grid(plan.suffix, num_kv_heads, group);
        const bool mma = kernel == cuda::TileKernel::kMma;
        const bool four = cuda::decode_heads_per_cta(group) == 4;
        const auto launch = mma ? (four ? cuda::launch_cascade_fused<scalar_t, kHeadDim, 4, true>
                                        : cuda::launch_cascade_fused<scalar_t, kHeadDim, 8, true>)
                                : (four ? cuda::launch_cascade_fused<scalar_t, kHeadDim, 4, false>
                                        : cuda::launch_cascade_fused<scalar_t, kHeadDim, 8, false>);
        BATCHLLM_CUDA_RETURN_IF_ERROR(
            launch(prefix, prefix_grid, suffix, suffix_grid, p.k_cache, p.v_cache, p.scale, stream));
      } else {
        if (tiles) {
          const dim3 suffix_grid((group + cuda::kTileRows - 1) / cuda::kTileRows, static_cast<unsigned>(num_rows),
                                 num_kv_heads);
          const cuda::SuffixProblem<scalar_t> tile_suffix{p.q, p.levels, ws + plan.suffix_o, ws + plan.suffix_lse,
                                                          group};
          BATCHLLM_CUDA_RETURN_IF_ERROR((cuda::launch_attention_tiles<scalar_t, kHeadDim>(
              tile_suffix, suffix_grid, p.k_cache, p.v_cache, p.scale, stream)));
        } else if (side != nullptr) {  // fork: the suffix on the side stream, after the caller's work so far
          BATCHLLM_CUDA_RETURN_IF_ERROR(cudaEventRecord(side->fork, stream));
          BATCHLLM_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(side->stream, side->fork, 0));
          BATCHLLM_CUDA_RETURN_IF_ERROR(
              (cuda::launch_decode_rows<scalar_t, kHeadDim>(suffix, num_kv_heads, side->stream)));
        } else {
          BATCHLLM_CUDA_RETURN_IF_ERROR((cuda::launch_decode_rows<scalar_t, kHeadDim>(suffix, num_kv_heads, stream)));
        }
        BATCHLLM_CUDA_RETURN_IF_ERROR((cuda::launch_tiles<scalar_t, kHeadDim>(kernel, prefix, prefix_grid, p.k_cache,
                                                                              p.v_cache, p.scale, stream)));
        if (side != nullptr) {  // join: the combine below waits for the suffix
          BATCHLLM_CUDA_RETURN_IF_ERROR(cudaEventRecord(side->join, side->stream));
          BATCHLLM_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream, side->join, 0));
        }
      }
      // Every row written by decode_rows (a host plan, unsplit, direct): no combine. A device plan
      // decides per step, so a captured graph keeps the combine, whose CTAs return for such rows.
      if (suffix_split.plan == nullptr && cuda::writes_output_directly(suffix_split)) return cudaSuccess;
      const dim3 combine_grid(static_cast<unsigned>(num_rows), static_cast<unsigned>(
          (num_heads * head_dim + cuda::kCombineElements - 1) / cuda::kCombineElements));
      BATCHLLM_LAUNCH(combine_grid, 128, 0, stream, cuda::combine_levels_kernel<scalar_t, kHeadDim>)(
          p.o, p.lse, p.levels, prefix_states, suffix_split, ws + plan.suffix_o, ws + plan.suffix_lse);
      return cuda::last_launch_error();
    });
  });
}

}  // namespace batchllm::kernels
