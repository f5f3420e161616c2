// Attention kernels of batchllm: paged KV store, ragged paged prefill, shared-prefix (cascade)
// decode and LSE state merge. Each has a CPU reference (always built) and, when the library is built
// with CUDA (BATCHLLM_WITH_CUDA), a CUDA launcher taking the same parameter struct plus a stream
// (include/batchllm/kernels/cuda.h). Arguments are validated by the caller (the Python bindings do it
// once at the boundary); the kernels trust them.
//
// Shapes (see docs/architecture.md, "Ops"):
//   KV cache  k_cache, v_cache  [num_blocks, block_size, Hkv, D], slot = block * block_size + offset
//   queries   q                 [T, Hq, D]; GQA: q head h reads KV head h / (Hq / Hkv)
//   LSE                         float32, natural log, -inf for a row that saw no keys
#pragma once

#include <cstdint>

#include "batchllm/kernels/merge.h"
#include "batchllm/kernels/views.h"

namespace batchllm::kernels {

/// store_kv: row t of k/v goes to slot slot_mapping[t] of k_cache/v_cache; slot < 0 is skipped.
struct StoreKvParams {
  TensorView k;                           ///< [T, Hkv, D]
  TensorView v;                           ///< [T, Hkv, D]
  TensorView k_cache;                     ///< [num_blocks, block_size, Hkv, D], same dtype as k
  TensorView v_cache;                     ///< [num_blocks, block_size, Hkv, D], same dtype as v
  const int64_t* slot_mapping = nullptr;  ///< [T], contiguous
};

/// prefill_attention: ragged causal attention over paged context.
/// Sequence s owns query rows [query_start[s], query_start[s+1]); query j of its q_len rows sits at
/// position context_lens[s] - q_len + j and attends to KV positions 0..position through
/// block_tables[s]. Decode rows are the q_len == 1 case.
struct PrefillParams {
  TensorView q;                           ///< [T, Hq, D]
  TensorView k_cache;                     ///< [num_blocks, block_size, Hkv, D]
  TensorView v_cache;                     ///< [num_blocks, block_size, Hkv, D]
  TensorView o;                           ///< [T, Hq, D] output, q's dtype
  const int32_t* block_tables = nullptr;  ///< [S, max_blocks_per_seq], contiguous rows
  int64_t max_blocks_per_seq = 0;         ///< row length of block_tables
  const int32_t* query_start = nullptr;   ///< [S + 1]
  const int32_t* context_lens = nullptr;  ///< [S]
  int64_t num_seqs = 0;                   ///< S
  float scale = 1.0f;                     ///< softmax scale, usually 1/sqrt(D)
  int32_t max_q_len = 0;                  ///< upper bound of any q_len (CUDA grid size; CPU ignores)
};

/// The levels of a decode step (docs/architecture.md, DecodeLevels): shared prefixes, each read by a
/// contiguous range of query rows (ranges nest across levels), then each row's own suffix KV.
/// All arrays are contiguous int32.
struct DecodeLevelsView {
  int64_t num_prefixes = 0;                      ///< P
  const int32_t* prefix_kv_indptr = nullptr;     ///< [P + 1] into prefix_kv_blocks
  const int32_t* prefix_kv_blocks = nullptr;     ///< [prefix_kv_indptr[P]]
  const int32_t* prefix_kv_lens = nullptr;       ///< [P] tokens of each prefix
  const int32_t* prefix_q_range = nullptr;       ///< [P, 2] reader rows [begin, end)
  const int32_t* suffix_block_tables = nullptr;  ///< [B, max_suffix_blocks]
  int64_t max_suffix_blocks = 0;                 ///< row length of suffix_block_tables
  const int32_t* suffix_kv_lens = nullptr;       ///< [B] (0 allowed)
  // Host-side upper bounds that size the CUDA grids (the CPU reference ignores them).
  int32_t max_prefix_kv_len = 0;                 ///< >= every prefix_kv_lens[p]
  int32_t max_prefix_rows = 0;                   ///< >= every end - begin
  int32_t max_suffix_kv_len = 0;                 ///< >= every suffix_kv_lens[b]
  /// Optional, CUDA only: int32 [3] {splits, chunk_keys, rows covered} (cascade_suffix_split, in
  /// batchllm/kernels/cuda.h), the suffix level's key split decided per step and read by the kernels
  /// instead of the host plan's: a CUDA graph captured for a batch bucket then still splits the long
  /// rows of a step that has few. nullptr: the host plan's split. The CPU reference ignores it (how
  /// the keys are split does not change the result).
  const int32_t* suffix_split = nullptr;
  /// Optional, CUDA only: int32 [3] {splits, chunk_keys, state_rows} (cascade_prefix_split),
  /// the prefix level's key split decided per step, read by the kernels instead of the host plan's
  /// (which the hints still size: the grid and the workspace); the CPU reference ignores it.
  const int32_t* prefix_split = nullptr;
};

/// cascade_decode_attention: one query row per sequence; exact attention of each row over the
/// concatenation of the prefixes that cover it and its suffix, computed level by level and merged
/// by log-sum-exp.
struct CascadeDecodeParams {
  TensorView q;          ///< [B, Hq, D]
  TensorView k_cache;    ///< [num_blocks, block_size, Hkv, D]
  TensorView v_cache;    ///< [num_blocks, block_size, Hkv, D]
  TensorView o;          ///< [B, Hq, D] output, q's dtype
  float* lse = nullptr;  ///< optional [B, Hq] float32 output, contiguous (nullptr: not written)
  DecodeLevelsView levels;
  float scale = 1.0f;
  /// CUDA only: float32 scratch of cascade_workspace_floats(...) elements (partial prefix states).
  float* workspace = nullptr;
};

/// merge_states: (o, lse) = merge of (o_a, lse_a) and (o_b, lse_b) row by row; lse = -inf means
/// "no keys" and takes the other side unchanged. o may alias o_a or o_b; lse may alias lse_a/lse_b.
struct MergeStatesParams {
  TensorView o_a;                ///< [N, H, D]
  const float* lse_a = nullptr;  ///< [N, H] contiguous
  TensorView o_b;                ///< [N, H, D], o_a's dtype
  const float* lse_b = nullptr;  ///< [N, H] contiguous
  TensorView o;                  ///< [N, H, D], o_a's dtype
  float* lse = nullptr;          ///< [N, H] contiguous, optional (nullptr: not written)
};

/// sample_rows: one token per row of logits, for rows with no masked tokens (python/batchllm_core/
/// sampling.py keeps those): greedy rows (temperature 0) take the
/// argmax, others the Gumbel-max draw of batchllm/kernels/sampling.h over the tokens their filters
/// keep; plus each row's logsumexp and the drawn token's log-probability under the raw logits. One
/// read of the logits, in their own dtype, for an unfiltered row.
struct SampleRowsParams {
  TensorView logits;                 ///< [R, V], last dim contiguous; fp32, fp16 or bf16
  const float* temperature = nullptr;  ///< [R]: 0 greedy, > 0 Gumbel-max
  const int64_t* keys = nullptr;     ///< [R]: the draw's 32-bit key (low 32 bits; read where temperature > 0)
  int64_t* token_ids = nullptr;      ///< [R] out
  float* lse = nullptr;              ///< [R] out: log(sum(exp(logits))) of the row
  float* logprobs = nullptr;         ///< [R] out: logits[row, token] - lse
  /// Optional, all three or none ([R] each, read where temperature > 0): the draw's filters
  /// (batchllm/kernels/sampling.h, DrawFilters). A filtered row costs one more read of its logits
  /// per rejected candidate: the best draw over the row is kept if the filters keep it, else the
  /// best over the tokens before it is tried, and so on (each try a pass that ranks the candidate,
  /// sums the mass before it and finds the next). With both top_k and top_p, the mass top_p weighs
  /// is that of the first top_k tokens: five passes more (the k-th key by a radix select, its mass).
  const int64_t* top_k = nullptr;
  const float* top_p = nullptr;
  const float* min_p = nullptr;
};

/// Layer ops of a decoder step (the element-wise work between the GEMMs, one launch each instead of
/// torch's chain of small kernels). Each rounds to the tensors' dtype exactly where the torch model
/// (python/batchllm_core/models/llama.py) does, so either path gives the same values up to the order
/// of one float32 sum.
///
/// rms_norm, row by row over the last dim H (float32 math):
///   without residual: out = round(weight * round(x * rsqrt(mean(x^2) + eps)))   (Hugging Face Llama)
///   with residual:    residual = round(x + residual), then out = rms_norm(residual)  (the pre-norm
///                     layer's skip connection fused in; vLLM's fused_add_rms_norm)
/// `out` may be `x` itself.
struct RmsNormParams {
  TensorView x;         ///< [T, H], last dim contiguous
  TensorView residual;  ///< [T, H] updated in place, or data == nullptr: no residual
  TensorView weight;    ///< [H], x's dtype, contiguous
  TensorView out;       ///< [T, H], x's dtype
  float eps = 1e-6f;
};

/// silu_and_mul: out = round(round(silu(gate)) * up) with gate = gate_up[:, :I], up = gate_up[:, I:]
/// (the SwiGLU MLP's activation).
struct SiluAndMulParams {
  TensorView gate_up;  ///< [T, 2I], last dim contiguous
  TensorView out;      ///< [T, I], gate_up's dtype
};

/// rotary_embedding: rotate-half ("neox") rope of q and k in place, at each token's position:
///   angle_i = float(position) * inv_freq[i], c = round(cos(angle_i)), s = round(sin(angle_i)),
///   x[i] <- round(round(x[i] * c) - round(x[i + D/2] * s)),
///   x[i + D/2] <- round(round(x[i + D/2] * c) + round(x[i] * s))      for i < D/2.
/// With `slot_mapping` set, the step's store_kv is fused in: after its rotation, each token's k rows
/// (rotated) and v rows go to their paged slot exactly as store_kv writes them (a slot < 0: none).
struct RotaryParams {
  TensorView q;                      ///< [T, Hq, D], last dim contiguous, modified in place
  TensorView k;                      ///< [T, Hk, D], q's dtype, modified in place
  const int32_t* positions = nullptr;  ///< [T]
  const float* inv_freq = nullptr;   ///< [D / 2] (rope scaling already applied)
  TensorView v;                      ///< [T, Hk, D], k's dtype (the fused store only)
  TensorView k_cache, v_cache;       ///< [blocks, block_size, Hk, D], k's dtype (the fused store only)
  const int64_t* slot_mapping = nullptr;  ///< [T]: the fused store's slots; nullptr: rotation only
};

// ---- CPU references: plain loops, float accumulation, any head dim, fp32/fp16/bf16 views.
Status store_kv_cpu(const StoreKvParams& params);
Status prefill_attention_cpu(const PrefillParams& params);
Status cascade_decode_attention_cpu(const CascadeDecodeParams& params);
Status merge_states_cpu(const MergeStatesParams& params);
Status sample_rows_cpu(const SampleRowsParams& params);
Status rms_norm_cpu(const RmsNormParams& params);
Status silu_and_mul_cpu(const SiluAndMulParams& params);
Status rotary_embedding_cpu(const RotaryParams& params);

}  // namespace batchllm::kernels
