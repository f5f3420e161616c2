// The cascade's prefix states and their merge into a decode row: which prefixes cover a row (one per
// level, so a handful of a batch's P), and the merge of the row's running state with each covering
// prefix's states (every key split), in ascending prefix order. Used by the combine kernel and by
// decode_rows' merge epilogue (BATCHLLM_CASCADE_LAUNCH=merge), so both merge in the same order.
// Prefix state layout (the prefix tiles write it): o [P, splits, R, Hq, D], lse [P, splits, R, Hq]
// with R = PrefixSplit::state_rows and the reader's row index within its prefix's range.
#pragma once

#include "batchllm/kernels/merge.h"
#include "kernels/cuda/cuda_common.cuh"

namespace batchllm::kernels::cuda {

constexpr int kMaxCovering = 32;  // more covering prefixes than this (not a real tree): scan every one

/// Shared memory of a covering list.
struct CoveringList {
  int prefixes[kMaxCovering];
  int count;
};

/// Lists, by every thread of the CTA, the prefixes whose reader range meets rows [first, last),
/// ascending. Returns how many, or -1 when there are more than kMaxCovering (the caller then scans every
/// prefix). Contains __syncthreads: every thread of the CTA calls it.
__device__ __forceinline__ int list_prefixes_meeting(const DecodeLevelsView& levels, int first, int last,
                                                     CoveringList& list) {
  if (threadIdx.x == 0) list.count = 0;
  __syncthreads();
  for (int64_t p = threadIdx.x; p < levels.num_prefixes; p += blockDim.x) {
    const int begin = levels.prefix_q_range[2 * p], end = levels.prefix_q_range[2 * p + 1];
    if (begin < end && begin < last && end > first) {
      const int slot = atomicAdd(&list.count, 1);
      if (slot < kMaxCovering) list.prefixes[slot] = static_cast<int>(p);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0 && list.count <= kMaxCovering) {
    for (int i = 1; i < list.count; ++i) {  // insertion sort of a few entries
      const int p = list.prefixes[i];
      int j = i;
      for (; j > 0 && list.prefixes[j - 1] > p; --j) list.prefixes[j] = list.prefixes[j - 1];
      list.prefixes[j] = p;
    }
  }
  __syncthreads();
  return list.count <= kMaxCovering ? list.count : -1;
}

/// Lists, by every thread of the CTA, the prefixes whose reader range holds `row`, ascending
/// (list_prefixes_meeting of the one row; merge_prefix_states scans every prefix past kMaxCovering).
__device__ __forceinline__ int list_covering_prefixes(const DecodeLevelsView& levels, int row, CoveringList& list) {
  return list_prefixes_meeting(levels, row, row + 1, list);
}

/// How the prefix tiles split their prefixes' keys and lay out their states: the launch's x items are
/// (row tile x % row_tiles, key chunk x / row_tiles), chunk `split` holding keys [split * chunk_keys,
/// (split + 1) * chunk_keys); the state of (prefix p, split, reader row r, head h) is at
/// ((p * splits + split) * state_rows + r) * Hq + h. Either the host plan's (plan == nullptr) or a
/// step's own, decided on the host and read from device memory (DecodeLevelsView::prefix_split:
/// {splits, chunk_keys, state_rows}; its row tiles follow from the state rows), which a CUDA graph
/// captured for a larger bucket replays within its grid's `items`; the states of any split that fits
/// take no more than items x ceil(tile_rows / group) rows a prefix, which the workspace holds.
struct PrefixSplit {
  int splits = 1;
  int chunk_keys = 0;
  int row_tiles = 0;
  int state_rows = 0;  // reader rows per (prefix, split) in the states: max_prefix_rows (host plan)
  int items = 0;       // the launch's x items: row tiles x splits of the host plan
  int tile_rows = 64;  // the tile kernel's rows
  int group = 1;       // GQA group: a reader row is `group` tile rows
  const int32_t* plan = nullptr;

  /// The split in effect: the device plan's, or the host plan's where there is none or the launch's
  /// items cannot hold it (every kernel of the call resolves it alike, so they agree).
  __device__ __forceinline__ PrefixSplit resolved() const {
    if (plan == nullptr) return *this;
    const int rows = plan[2], wanted = plan[0];
    const int tiles = max(1, (max(rows, 0) * group + tile_rows - 1) / tile_rows);
    if (rows < 0 || wanted < 1 || plan[1] < 1 || static_cast<int64_t>(wanted) * tiles > items) return *this;
    PrefixSplit split = *this;
    split.row_tiles = tiles;
    split.splits = wanted;
    split.chunk_keys = plan[1];
    split.state_rows = rows;
    return split;
  }
};

/// Where the prefix tiles wrote their states, and their layout.
struct PrefixStates {
  const float* o;    // [P, splits, state_rows, Hq, D]
  const float* lse;  // [P, splits, state_rows, Hq]
  PrefixSplit split;
};

/// Merges element d of (row, head)'s running state (value, lse; natural log, -inf: empty) with the
/// states of the prefixes covering the row: the `listed` entries of `list`, or every prefix that
/// covers it when listed < 0.
__device__ __forceinline__ void merge_prefix_states(float& value, float& lse, const DecodeLevelsView& levels,
                                                    const CoveringList& list, int listed, const PrefixStates& states,
                                                    int row, int64_t head, int64_t num_heads, int64_t d,
                                                    int64_t head_dim) {
  const int64_t candidates = listed >= 0 ? listed : levels.num_prefixes;
  for (int64_t c = 0; c < candidates; ++c) {
    const int64_t p = listed >= 0 ? list.prefixes[c] : c;
    const int begin = levels.prefix_q_range[2 * p], end = levels.prefix_q_range[2 * p + 1];
    if (row < begin || row >= end) continue;
    for (int64_t split = 0; split < states.split.splits; ++split) {
      const int64_t state =
          ((p * states.split.splits + split) * states.split.state_rows + (row - begin)) * num_heads + head;
      const LseMerge w = merge_lse(lse, states.lse[state]);
      value = merge_value(w, value, states.o[state * head_dim + d]);
      lse = w.lse;
    }
  }
}

/// Merge steps per (row, head) whose weights a CTA keeps in shared memory (the suffix's key splits
/// after the first, then every split of every covering prefix). More (a deep tree of long, split
/// prefixes) merge element by element, in the same order.
constexpr int kMergeSteps = 48;

/// A CTA's merge steps for the heads of one row: where each step's state is for head 0 (add the
/// head), and each head's weights, computed once per (row, head) instead of once per element. A
/// step's weights depend on the (row, head) alone (the lse chain), so applying them to every element
/// is the same float operations, in the same order, as merging element by element: the same bits.
template <int kHeads>
struct MergeSteps {
  int64_t state[kMergeSteps];
  float weight_a[kHeads][kMergeSteps];
  float weight_b[kHeads][kMergeSteps];
  int count;  // -1: more than kMergeSteps, or more covering prefixes than listed
};

/// By one thread: appends the states of the prefixes covering `row` (the `listed` entries of `list`,
/// ascending, each split by split; merge_prefix_states' order) to `count` steps already in `steps`.
/// Returns the new count, or -1 when they do not fit or listed < 0.
__device__ __forceinline__ int append_prefix_steps(int64_t* steps, int count, const DecodeLevelsView& levels,
                                                   const CoveringList& list, int listed, const PrefixStates& states,
                                                   int row, int64_t num_heads) {
  if (count < 0 || listed < 0) return -1;
  for (int c = 0; c < listed; ++c) {
    const int64_t p = list.prefixes[c];
    const int begin = levels.prefix_q_range[2 * p];
    for (int64_t split = 0; split < states.split.splits; ++split) {
      if (count == kMergeSteps) return -1;
      steps[count++] = ((p * states.split.splits + split) * states.split.state_rows + (row - begin)) * num_heads;
    }
  }
  return count;
}

/// By the thread of head slot `h` (head `head`): the chain of merges of its running lse with the
/// steps' states (lse read from `lse_src(k)`), weights into `steps`; returns the merged lse.
template <int kHeads, typename LseSource>
__device__ __forceinline__ float chain_merge_weights(MergeSteps<kHeads>& steps, int count, int h, int64_t head,
                                                     float lse, LseSource lse_src) {
  for (int k = 0; k < count; ++k) {
    const LseMerge w = merge_lse(lse, lse_src(k)[steps.state[k] + head]);
    steps.weight_a[h][k] = w.weight_a;
    steps.weight_b[h][k] = w.weight_b;
    lse = w.lse;
  }
  return lse;
}

/// Element d of head slot `h` (head `head`): `value` merged with every step's state (o read from
/// `o_src(k)`, D floats a state), by the weights chain_merge_weights left.
template <int kHeads, typename OSource>
__device__ __forceinline__ float apply_merge_steps(const MergeSteps<kHeads>& steps, int count, int h, int64_t head,
                                                   int64_t d, int64_t head_dim, float value, OSource o_src) {
  for (int k = 0; k < count; ++k) {
    const LseMerge w{steps.weight_a[h][k], steps.weight_b[h][k], 0.0f};
    value = merge_value(w, value, o_src(k)[(steps.state[k] + head) * head_dim + d]);
  }
  return value;
}

}  // namespace batchllm::kernels::cuda
