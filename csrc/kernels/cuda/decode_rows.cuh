// Decode attention of single query rows over their own paged keys, on CUDA cores: the suffix level of
// cascade decode. Each decode row reads keys no other row reads, so there is nothing to share and a
// tensor-core tile would leave 60 of its 64 rows empty (GQA group 4); what matters is keeping many
// 16-byte loads in flight. Layout (FlashInfer's batch decode, simplified):
//   grid (row x key split, KV head, head chunk): a CTA takes up to kHeads (4 or 8, by the GQA group:
//   every head of a group up to 8 reads the row's keys in one CTA, so they are loaded once) query heads
//   and one chunk of the row's keys (all of them unless the launch splits them; SuffixSplit), 128 threads;
//   a key's D elements are spread over D / 8 lanes (16 bytes each), so a warp takes 32 / (D / 8) keys
//   at a time and the CTA 4x that, kDecodeUnroll times per iteration: loads for all of them are issued
//   before any is used. Every lane group keeps its own online-softmax state (max, sum, o) per head;
//   the states are merged across the warp by shuffles and across warps through shared memory.
// Output: normalised o (float32) and lse (natural log; -inf and o = 0 for a row with no keys), one
// partial state per key split, which the cascade's combine step merges with the prefix states; or,
// with the merge epilogue (one split), the row merged with its prefix states, in q's dtype.
#pragma once

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/mma_sync.cuh"
#include "kernels/cuda/prefix_states.cuh"

namespace batchllm::kernels::cuda {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeWarps = kDecodeThreads / 32;
constexpr int kDecodeUnroll = 4;  // key groups loaded per lane before the first is used

/// Query heads per CTA for a GQA group: 4 up to a group of 4, else 8 (groups above 8 take several CTAs).
inline int decode_heads_per_cta(int group) { return group <= 4 ? 4 : 8; }

/// Running softmax state of one head over some keys: max m and sum l of exp2(score - m), in the
/// log2 domain, and the unnormalised output o of 8 elements. m = -inf means no keys yet (l = o = 0).
struct RunningState {
  float m = -INFINITY;
  float l = 0.0f;
  float o[8] = {0, 0, 0, 0, 0, 0, 0, 0};

  /// Starts adding kKeys keys with scaled scores s (log2 domain; -inf: masked), with one rescale of
  /// the state for all of them (flash decoding's online softmax, per group of keys instead of per key:
  /// one exp2 and 8 multiplies of the running output less per key): the max, the sum and the output
  /// rescaled; s becomes the keys' weights p, which accumulate() then adds with the values.
  template <int kKeys>
  __device__ __forceinline__ void rescale(float (&s)[kKeys]) {
    float m_new = m;
#pragma unroll
    for (int u = 0; u < kKeys; ++u) m_new = fmaxf(m_new, s[u]);
    // Every key masked and the state empty: weights 0 (exp2(-inf)), nothing rescaled.
    const float base = m_new == -INFINITY ? 0.0f : m_new;
    const float alpha = fast_exp2(m - base);  // m = -inf -> 0: the empty state contributes nothing
    float sum = 0.0f;
#pragma unroll
    for (int u = 0; u < kKeys; ++u) {
      s[u] = fast_exp2(s[u] - base);  // masked: exp2(-inf) = 0
      sum += s[u];
    }
    l = l * alpha + sum;
#pragma unroll
    for (int i = 0; i < 8; ++i) o[i] *= alpha;
    m = m_new;
  }

  /// Adds a key's value with its weight p (from rescale).
  __device__ __forceinline__ void accumulate(float p, const float (&v)[8]) {
#pragma unroll
    for (int i = 0; i < 8; ++i) o[i] = fmaf(p, v[i], o[i]);
  }

  /// Merges another state over disjoint keys into this one; either may be empty.
  __device__ __forceinline__ void merge(float m_b, float l_b, const float (&o_b)[8]) {
    const float m_new = fmaxf(m, m_b);
    if (m_new == -INFINITY) return;  // both empty: (-inf) - (-inf) below would be NaN
    const float alpha = exp2f(m - m_new), beta = exp2f(m_b - m_new);
    l = l * alpha + l_b * beta;
#pragma unroll
    for (int i = 0; i < 8; ++i) o[i] = o[i] * alpha + o_b[i] * beta;
    m = m_new;
  }
};

/// The 8 elements of a 16-byte load as floats. Copied out with memcpy, not read through a T pointer
/// into the uint4: that read breaks strict aliasing, and a compiler that assumes it may not observe
/// the uint4's stores reorders it before them (the CPU emulation at -O3 read a zeroed V that way).
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&out)[8]) {
  T values[8];
  memcpy(values, &raw, sizeof(values));
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_float(values[i]);
}

/// How a decode_rows launch splits its rows' keys, and where each (row, split) state goes: work item
/// x of the grid (its x dimension) is row x / splits, key chunk x % splits (keys [split * chunk_keys,
/// (split + 1) * chunk_keys)); its state is state x, so a row's splits are adjacent ([row, split]).
/// Either the host plan's split (plan == nullptr: items = rows x splits), or one decided per step on
/// the host and read from device memory (`plan`, DecodeLevelsView::suffix_split: {splits, chunk_keys,
/// rows covered}), which a CUDA graph captured for a batch bucket replays with whatever split the
/// step's own rows call for: its grid has room for `items` (cascade_suffix_split keeps every plan
/// within it) and the items past the plan's exit at once.
struct SuffixSplit {
  int splits = 1;
  int chunk_keys = 1 << 30;   // keys per split (any value >= the longest row when not split)
  int rows = 0;               // rows with states: the launch's (host plan), or the plan's rows covered
  int items = 0;              // the grid's items (x): rows x splits, or the capacity for a device plan
  const int32_t* plan = nullptr;
  // No prefix level covers any row (a step without sharing): where the split in effect is 1, a row's
  // state is its output, so decode_rows writes the output row (and lse) itself and the combine step
  // leaves the row alone (no state round trip; an eager step skips the combine launch).
  bool direct = false;

  /// The split in effect: the device plan's, or the host plan's where there is none or the launch
  /// cannot hold it (its rows past the launch's, or its rows x splits past the items; every kernel of
  /// the call resolves it alike, so they agree).
  __device__ __forceinline__ SuffixSplit resolved() const {
    if (plan == nullptr) return *this;
    const int wanted = plan[0], covered = plan[2];
    if (wanted < 1 || plan[1] < 1 || covered < 0 || covered > rows ||
        static_cast<int64_t>(wanted) * covered > items) {
      return *this;
    }
    SuffixSplit split = *this;
    split.splits = wanted;
    split.chunk_keys = plan[1];
    split.rows = covered;
    return split;
  }
};

/// Whether the rows of a resolved split write their outputs in decode_rows (SuffixSplit::direct).
__host__ __device__ __forceinline__ bool writes_output_directly(const SuffixSplit& resolved) {
  return resolved.direct && resolved.splits == 1;
}

/// Rows, keys and outputs of one decode_rows launch.
struct DecodeRowsArgs {
  TensorView q;                  // [B, Hq, D]
  TensorView k_cache, v_cache;   // [blocks, block_size, Hkv, D]
  const int32_t* block_tables;   // [B, max_blocks]
  int64_t max_blocks;
  const int32_t* kv_lens;        // [B]
  float* state_o;                // [items, Hq, D] normalised (item = row * splits + split)
  float* state_lse;              // [items, Hq] natural log
  float scale_log2;              // softmax scale * log2(e)
  int group;                     // Hq / Hkv
  SuffixSplit split;             // the key split and the grid's items
  FastDivisor block_size;        // the caches' block size (shape[1])
  // Merge epilogue (cascade with BATCHLLM_CASCADE_LAUNCH=merge; one key split only): instead of the
  // state, merge it with the states of the prefixes covering the row (the prefix tiles ran before
  // this launch) and write the output row and its lse: no suffix state round trip, no combine launch.
  bool merge_prefixes = false;
  DecodeLevelsView levels = {};
  PrefixStates prefix_states = {};
  TensorView out = {};           // [B, Hq, D], q's dtype (the merge epilogue, or split.direct)
  float* lse_out = nullptr;      // [B, Hq] or nullptr
};

/// Shared memory of one decode_rows CTA: the warps' states, merged at the end.
template <int D, int kHeads>
struct DecodeSmem {
  float m[kDecodeWarps][kHeads];
  float l[kDecodeWarps][kHeads];
  float o[kDecodeWarps][kHeads][D];
  float weight[kDecodeWarps][kHeads];  // the epilogue's per-head merge of the warps: each warp's weight,
  float row_l[kHeads];                 // the row's sum and lse (computed once per head, not per element)
  float row_lse[kHeads];
  CoveringList covering;       // the merge epilogue's prefixes
  MergeSteps<kHeads> merges;   // and its merge steps with their states
  bool direct_output;          // the row's output written here, not its state (SuffixSplit::direct)
};

/// Adds kKeys keys of this lane group to the heads' running states: k_raw / v_raw hold this lane's
/// 16 bytes of each key's K and V rows, valid[u] whether key u lies before the end (else its score is
/// -inf; its V must be zero: weight 0 times garbage could be NaN). The scores (each a dot product
/// summed over the key's lanes), one rescale of each state for all of them, then the values: the
/// math of both key loops of decode_rows.
template <typename T, int kLanesPerKey, int kHeads, int kKeys>
__device__ __forceinline__ void add_keys(const uint4 (&k_raw)[kKeys], const uint4 (&v_raw)[kKeys],
                                         const bool (&valid)[kKeys], const float (&q)[kHeads][8],
                                         RunningState (&state)[kHeads]) {
  float s[kHeads][kKeys];
#pragma unroll
  for (int u = 0; u < kKeys; ++u) {
    float k[8];
    unpack8<T>(k_raw[u], k);
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) dot = fmaf(q[h][i], k[i], dot);
      // Sum over the key's lanes (xor offsets below kLanesPerKey stay inside the lane group); every
      // lane of the warp takes part, valid key or not.
#pragma unroll
      for (int offset = kLanesPerKey / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
      s[h][u] = valid[u] ? dot : -INFINITY;  // uniform within a lane group
    }
  }
#pragma unroll
  for (int h = 0; h < kHeads; ++h) state[h].rescale(s[h]);
#pragma unroll
  for (int u = 0; u < kKeys; ++u) {
    float v[8];
    unpack8<T>(v_raw[u], v);
#pragma unroll
    for (int h = 0; h < kHeads; ++h) state[h].accumulate(s[h][u], v);
  }
}

/// Merges the states of a warp's lane groups (the lanes of one 8-element chunk of the head, each over
/// other keys), by butterfly shuffles: every lane ends with its chunk's state over all the warp's keys.
template <int kLanesPerKey>
__device__ __forceinline__ void merge_lane_groups(RunningState& state) {
#pragma unroll
  for (int offset = kLanesPerKey; offset < 32; offset *= 2) {
    const float m_b = __shfl_xor_sync(0xffffffffu, state.m, offset);
    const float l_b = __shfl_xor_sync(0xffffffffu, state.l, offset);
    float o_b[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) o_b[i] = __shfl_xor_sync(0xffffffffu, state.o[i], offset);
    state.merge(m_b, l_b, o_b);
  }
}

/// The staged key loop's K/V tiles (BATCHLLM_DECODE_ROWS=staged): kStages tiles of kKeys keys in
/// shared memory, filled by cp.async kStages - 1 tiles ahead of the one being read. The unrolled loop
/// (the default) holds kDecodeUnroll key groups of loads in registers and issues the next ones only
/// after using them: at W1's decode rows (~128 keys) 2 such rounds a CTA, each waiting a full
/// latency with nothing in flight while it computes. Here up to (kStages - 1) x kKeys keys are in
/// flight the whole time, in no registers. 32 KB at d = 64 (4 x 32 keys), 24 KB at d = 128 (3 x 16):
/// with DecodeSmem under the 48 KB of static shared memory for both head chunk sizes.
template <typename T, int D>
struct DecodeStages {
  static constexpr int kKeys = D <= 64 ? 32 : 16;
  static constexpr int kStages = D <= 64 ? 4 : 3;
  static constexpr int kChunks = D * static_cast<int>(sizeof(T)) / 16;  // 16-byte chunks of a row
  uint4 k[kStages][kKeys][kChunks];
  uint4 v[kStages][kKeys][kChunks];
};

/// The staged key loop over keys [key_begin, len) of one KV head: the same scores, rescales and
/// accumulations as decode_rows' unrolled loop (a lane group's keys in the same order), its K/V
/// read from shared memory tiles. Keys past len: K and V zero-filled, scores -inf.
template <typename T, int D, int kHeads>
__device__ __forceinline__ void staged_key_loop(DecodeStages<T, D>& st, const PagedKvHead<T>& kv, int key_begin,
                                                int len, int group_id, int chunk, const float (&q)[kHeads][8],
                                                RunningState (&state)[kHeads]) {
  using Stages = DecodeStages<T, D>;
  constexpr int kLanesPerKey = D / 8;
  constexpr int kGroups = kDecodeWarps * (32 / kLanesPerKey);
  constexpr int kPerGroup = Stages::kKeys / kGroups;  // keys of a tile per lane group: 2 (d = 64 and 128)
  static_assert(Stages::kKeys % kGroups == 0, "a tile holds whole rounds of the CTA's lane groups");
  const int tiles = len > key_begin ? (len - key_begin + Stages::kKeys - 1) / Stages::kKeys : 0;
  const auto issue = [&](int tile) {
    if (tile < tiles) {
      const int stage = tile % Stages::kStages, first = key_begin + tile * Stages::kKeys;
      for (int c = threadIdx.x; c < Stages::kKeys * Stages::kChunks; c += kDecodeThreads) {
        const int key = c / Stages::kChunks, part = c % Stages::kChunks, pos = first + key;
        const bool valid = pos < len;
        const uint32_t block = valid ? kv.block_of(pos) : 0u;
        cp_async_16(&st.k[stage][key][part], kv.k + (valid ? kv.k_offset(block, pos) : 0) + part * 16, valid);
        cp_async_16(&st.v[stage][key][part], kv.v + (valid ? kv.v_offset(block, pos) : 0) + part * 16, valid);
      }
    }
    cp_async_commit();  // an empty group past the last tile: every thread waits on the same counts
  };
  for (int t = 0; t < Stages::kStages - 1; ++t) issue(t);
  for (int tile = 0; tile < tiles; ++tile) {
    cp_async_wait<Stages::kStages - 2>();  // this thread's copies of `tile` are done
    // Everyone's copies of `tile` are visible, and everyone is done reading tile - 1, whose stage
    // the next issue refills.
    __syncthreads();
    issue(tile + Stages::kStages - 1);
    const int stage = tile % Stages::kStages, first = key_begin + tile * Stages::kKeys;
    uint4 k_raw[kPerGroup], v_raw[kPerGroup];
    bool valid[kPerGroup];
#pragma unroll
    for (int u = 0; u < kPerGroup; ++u) {
      const int key = u * kGroups + group_id;
      valid[u] = first + key < len;
      k_raw[u] = st.k[stage][key][chunk];
      v_raw[u] = st.v[stage][key][chunk];  // zero past the end (cp.async's zero fill)
    }
    add_keys<T, kLanesPerKey, kHeads, kPerGroup>(k_raw, v_raw, valid, q, state);
  }
}

/// Whether decode_rows runs the staged key loop (BATCHLLM_DECODE_ROWS=staged, read at each launch so
/// that a benchmark compares both in one process; the fused cascade kernel keeps the unrolled one).
inline bool decode_rows_staged() { return env_equals("BATCHLLM_DECODE_ROWS", "staged"); }

/// The grid of a decode_rows launch: (item = row x key split, KV head, head chunk).
inline dim3 decode_rows_grid(const SuffixSplit& split, int num_kv_heads, int group) {
  const int heads = decode_heads_per_cta(group);
  return dim3(static_cast<unsigned>(split.items), static_cast<unsigned>(num_kv_heads),
              static_cast<unsigned>((group + heads - 1) / heads));
}

/// One work item (row x key split, KV head, head chunk) of decode_rows on a CTA of kDecodeThreads:
/// the body of decode_rows_kernel and of the fused cascade kernel's suffix items.
template <typename T, int D, int kHeads, bool kStaged = false>
__device__ __forceinline__ void decode_rows(const DecodeRowsArgs& args, const dim3& item,
                                            DecodeSmem<D, kHeads>& sm, DecodeStages<T, D>* stages = nullptr) {
  constexpr int kLanesPerKey = D / 8;
  constexpr int kKeysPerWarp = 32 / kLanesPerKey;
  constexpr int kGroups = kDecodeWarps * kKeysPerWarp;  // keys in flight per unrolled step

  const SuffixSplit split_in_effect = args.split.resolved();
  const int row = item.x / split_in_effect.splits, split = item.x % split_in_effect.splits;
  if (row >= split_in_effect.rows) return;  // past a device plan's items: the whole CTA, before any barrier
  // Whether the row's output is written here (SuffixSplit::direct), kept in shared memory through the
  // key loop: in a register it cost a spill a key step at d = 64, bf16, 4 heads (ptxas, nvcc 13).
  if (threadIdx.x == 0) sm.direct_output = writes_output_directly(split_in_effect);
  const int kv_head = item.y, head_chunk = item.z;
  const int first_head = kv_head * args.group + head_chunk * kHeads;
  const int heads = min(kHeads, args.group - head_chunk * kHeads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub = lane / kLanesPerKey, chunk = lane % kLanesPerKey;  // chunk: which 8 elements
  const int group_id = warp * kKeysPerWarp + sub;
  // This split's keys [key_begin, len); an empty range writes the empty state (lse -inf, o 0).
  const int chunk_keys = split_in_effect.chunk_keys;
  const int key_begin = split * chunk_keys;
  const int len = min(args.kv_lens[row], key_begin + chunk_keys);
  const PagedKvHead<T> kv(args.k_cache, args.v_cache, args.block_tables + row * args.max_blocks, kv_head,
                          args.block_size);
  float q[kHeads][8];
  RunningState state[kHeads];
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    const int head = first_head + min(h, heads - 1);  // unused slots repeat a used head, never read out
    const T* q_row = static_cast<const T*>(args.q.data) + row * args.q.stride[0] + head * args.q.stride[1];
    unpack8<T>(reinterpret_cast<const uint4*>(q_row)[chunk], q[h]);
#pragma unroll
    for (int i = 0; i < 8; ++i) q[h][i] *= args.scale_log2;
  }

  if constexpr (kStaged) {
    staged_key_loop<T, D, kHeads>(*stages, kv, key_begin, len, group_id, chunk, q, state);
  } else {
    // This lane's 16 bytes of the head's K and V rows in block 0, slot 0: a key's address adds its
    // block and slot offsets (computed here once, not again for every key of the loop).
    const char* k_lane = reinterpret_cast<const char*>(kv.k) + chunk * 16;
    const char* v_lane = reinterpret_cast<const char*>(kv.v) + chunk * 16;

    // The block table entries of the lane group's keys of the next step, loaded a step ahead so that
    // the K/V loads never wait for them (keys at or past len: 0, an address computed, never read).
    constexpr int kStep = kGroups * kDecodeUnroll;
    uint32_t blocks[kDecodeUnroll];
    auto load_blocks = [&](int base) {
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u) {
        const int pos = base + u * kGroups + group_id;
        blocks[u] = pos < len ? kv.block_of(pos) : 0u;
      }
    };
    load_blocks(key_begin);
    for (int base = key_begin; base < len; base += kStep) {
      // Every lane loads, a key past len from block 0, slot of pos (cache memory, never past it), so
      // that there is no branch for the compiler to sink the address arithmetic into. Such a key's
      // score is -inf whatever its K; its V is zeroed (weight 0 times garbage could be NaN).
      uint4 k_raw[kDecodeUnroll], v_raw[kDecodeUnroll];
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u) {
        const int pos = base + u * kGroups + group_id;
        k_raw[u] = *reinterpret_cast<const uint4*>(k_lane + kv.k_offset(blocks[u], pos));
        v_raw[u] = *reinterpret_cast<const uint4*>(v_lane + kv.v_offset(blocks[u], pos));
        if (pos >= len) v_raw[u] = make_uint4(0, 0, 0, 0);
      }
      load_blocks(base + kStep);
      bool valid[kDecodeUnroll];
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u) valid[u] = base + u * kGroups + group_id < len;
      add_keys<T, kLanesPerKey, kHeads, kDecodeUnroll>(k_raw, v_raw, valid, q, state);
    }
  }

  // Merge the warp's lane groups (same chunk, other sub), then the warps through shared memory.
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    merge_lane_groups<kLanesPerKey>(state[h]);
    if (sub == 0) {
#pragma unroll
      for (int i = 0; i < 8; ++i) sm.o[warp][h][chunk * 8 + i] = state[h].o[i];
      if (chunk == 0) {
        sm.m[warp][h] = state[h].m;
        sm.l[warp][h] = state[h].l;
      }
    }
  }
  // The merge epilogue's covering prefixes (its barriers also order the smem states above).
  const int listed = args.merge_prefixes ? list_covering_prefixes(args.levels, row, sm.covering) : 0;
  const PrefixStates prefix_states{args.prefix_states.o, args.prefix_states.lse,
                                   args.merge_prefixes ? args.prefix_states.split.resolved() : PrefixSplit{}};
  const int64_t num_heads = args.q.shape[1];
  if (args.merge_prefixes && threadIdx.x == 0) {
    sm.merges.count = append_prefix_steps(sm.merges.state, 0, args.levels, sm.covering, listed, prefix_states,
                                          row, num_heads);
  }
  __syncthreads();
  const int merge_steps = args.merge_prefixes ? sm.merges.count : 0;  // -1: merged element by element
  const bool write_output = args.merge_prefixes || sm.direct_output;  // thread 0's, past the barrier above
  // The warps' states merge with weights that depend on the head alone: one thread per head computes
  // them, the row's sum and its lse once (they were recomputed for each of the head's D elements).
  if (static_cast<int>(threadIdx.x) < heads) {
    const int h = threadIdx.x;
    float m = -INFINITY;
    for (int w = 0; w < kDecodeWarps; ++w) m = fmaxf(m, sm.m[w][h]);
    float l = 0.0f;
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float weight = m != -INFINITY ? exp2f(sm.m[w][h] - m) : 0.0f;  // an empty warp: exp2(-inf) = 0
      sm.weight[w][h] = weight;
      l += sm.l[w][h] * weight;
    }
    sm.row_l[h] = l;
    float lse = l > 0.0f ? (m + log2f(l)) * 0.69314718055994531f : -INFINITY;
    if (merge_steps > 0) {  // the merge epilogue's chain over the covering prefixes' states
      lse = chain_merge_weights(sm.merges, merge_steps, h, first_head + h, lse,
                                [&](int) { return args.prefix_states.lse; });
    }
    sm.row_lse[h] = lse;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < heads * D; idx += kDecodeThreads) {
    const int h = idx / D, d = idx % D;
    const float l = sm.row_l[h];
    float o = 0.0f;
    for (int w = 0; w < kDecodeWarps; ++w) o += sm.o[w][h][d] * sm.weight[w][h];
    float value = l > 0.0f ? o / l : 0.0f;  // no keys at all (l = 0): 0, whatever o holds
    float lse = sm.row_lse[h];
    const int64_t head = first_head + h;
    if (write_output) {  // the row merged with its prefixes, or (direct) the row's own state as it is
      if (args.merge_prefixes && merge_steps >= 0) {
        value = apply_merge_steps(sm.merges, merge_steps, h, head, d, D, value,
                                  [&](int) { return args.prefix_states.o; });
      } else if (args.merge_prefixes) {  // too many steps to keep (row_lse is the row's own): by element
        merge_prefix_states(value, lse, args.levels, sm.covering, listed, prefix_states, row, head, num_heads, d,
                            D);
      }
      static_cast<T*>(args.out.data)[row * args.out.stride[0] + head * args.out.stride[1] + d] = from_float<T>(value);
      if (d == 0 && args.lse_out != nullptr) args.lse_out[row * num_heads + head] = lse;
    } else {
      const int64_t out_state = static_cast<int64_t>(item.x) * num_heads + head;  // item = row * splits + split
      args.state_o[out_state * D + d] = value;
      if (d == 0) args.state_lse[out_state] = lse;
    }
  }
}

template <typename T, int D, int kHeads, bool kStaged>
__global__ void __launch_bounds__(kDecodeThreads, kHeads == 4 ? 4 : 1) decode_rows_kernel(DecodeRowsArgs args) {
  begin_dependent_kernel();  // PDL: cuda_common.cuh
  __shared__ DecodeSmem<D, kHeads> sm;
  if constexpr (kStaged) {
    __shared__ DecodeStages<T, D> stages;
    decode_rows<T, D, kHeads, true>(args, blockIdx, sm, &stages);
  } else {
    decode_rows<T, D, kHeads>(args, blockIdx, sm);
  }
}

/// Launches decode_rows_kernel over args.split's items.
template <typename T, int D>
cudaError_t launch_decode_rows(const DecodeRowsArgs& args, int num_kv_heads, cudaStream_t stream) {
  if (args.split.items == 0) return cudaSuccess;
  const dim3 grid = decode_rows_grid(args.split, num_kv_heads, args.group);
  const bool staged = decode_rows_staged();
  if (decode_heads_per_cta(args.group) == 4) {
    if (staged) BATCHLLM_LAUNCH(grid, kDecodeThreads, 0, stream, decode_rows_kernel<T, D, 4, true>)(args);
    else BATCHLLM_LAUNCH(grid, kDecodeThreads, 0, stream, decode_rows_kernel<T, D, 4, false>)(args);
  } else {
    if (staged) BATCHLLM_LAUNCH(grid, kDecodeThreads, 0, stream, decode_rows_kernel<T, D, 8, true>)(args);
    else BATCHLLM_LAUNCH(grid, kDecodeThreads, 0, stream, decode_rows_kernel<T, D, 8, false>)(args);
  }
  return last_launch_error();
}

}  // namespace batchllm::kernels::cuda
