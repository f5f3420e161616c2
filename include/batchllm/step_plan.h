// StepPlan: everything the model runner needs to execute one engine step, as flat arrays.
#pragma once

#include <cstdint>
#include <vector>

namespace batchllm {

/// One step of the engine: a flat ragged token batch (no padding) plus its attention metadata.
///
/// Rows (tokens) are ordered decode rows first (one per decoding sequence), then prefill chunks.
/// Every array lives in buffers the Scheduler owns and reuses: they stay valid until the next
/// `next_step()` or `commit()`, and the Python binding exposes them as zero-copy numpy views.
///
/// Sequences with a negative id are shared-prefix prefill chunks (prefix node `-id - 1`): their rows
/// compute a group's shared prefix once; they have no sample row.
struct StepPlan {
  // ---- tokens: T rows
  std::vector<int32_t> input_ids;     ///< [T] token run at each row
  std::vector<int32_t> positions;     ///< [T] position of each row's token in its sequence
  std::vector<int64_t> slot_mapping;  ///< [T] KV slot (block * block_size + offset) for each row

  // ---- sequences: S entries in row order (decodes first)
  std::vector<int64_t> seq_ids;       ///< [S] scheduler sequence id (< 0: shared prefix chunk)
  std::vector<int32_t> query_start;   ///< [S+1] rows of sequence s: query_start[s]:query_start[s+1]
  std::vector<int32_t> context_lens;  ///< [S] KV length of s after this step's tokens are stored
  std::vector<int32_t> block_tables;  ///< [S, max_blocks] row-major, padded with -1
  int32_t max_blocks = 0;             ///< width of block_tables (rounded up to a multiple of 8)
  int32_t num_decode_seqs = 0;        ///< the first num_decode_seqs sequences are decodes (1 row each)

  // ---- decode attention levels (decode rows 0..num_decode_seqs-1 only)
  std::vector<int32_t> prefix_kv_indptr;     ///< [P+1] prefix p reads prefix_kv_blocks[indptr[p]:indptr[p+1]]
  std::vector<int32_t> prefix_kv_blocks;     ///< [sum of prefix blocks]
  std::vector<int32_t> prefix_kv_lens;       ///< [P] tokens of prefix p (a multiple of the block size)
  std::vector<int32_t> prefix_q_range;       ///< [P, 2] decode rows [begin, end) reading prefix p
  std::vector<int32_t> suffix_block_tables;  ///< [B, max_suffix_blocks] each row's own KV, -1 padded
  int32_t max_suffix_blocks = 0;             ///< width of suffix_block_tables
  std::vector<int32_t> suffix_kv_lens;       ///< [B] tokens of each row's own KV (after its deepest prefix)

  // ---- sampling: R rows (a row repeats when the n samples of a prompt draw from its last row)
  std::vector<int32_t> sample_rows;         ///< [R] row whose logits are sampled
  std::vector<int64_t> sample_seq_ids;      ///< [R] sequence each sampled token goes to
  std::vector<int64_t> sample_requests;     ///< [R] input index of that sequence's request
  std::vector<int32_t> sample_indices;      ///< [R] sample index within the request (0..n-1)
  std::vector<int32_t> sample_output_lens;  ///< [R] tokens the sequence generated before this step

  // ---- block copies to run before the step (all layers): dst slots [0, bs) <- src slots
  std::vector<int32_t> cow_src;  ///< [C]
  std::vector<int32_t> cow_dst;  ///< [C]

  std::vector<int32_t> nano_batch_offsets;  ///< [K+1] row split points; [0, T] for now

  // ---- accounting for the cost model (not needed to run the step)
  int64_t num_prefill_tokens = 0;     ///< rows that are not decode rows
  int64_t decode_kv_tokens_read = 0;  ///< KV tokens decode attention reads (each shared prefix once)
  int64_t decode_kv_tokens_unshared = 0;  ///< the same if every row read its whole context itself

  int64_t num_tokens() const { return static_cast<int64_t>(input_ids.size()); }
  int64_t num_seqs() const { return static_cast<int64_t>(seq_ids.size()); }
  int64_t num_sample_rows() const { return static_cast<int64_t>(sample_rows.size()); }
  int64_t num_prefixes() const { return static_cast<int64_t>(prefix_kv_lens.size()); }

  /// Empties every array but the two table matrices (the scheduler resizes and rewrites those,
  /// keeping unchanged rows), keeping their capacity: no allocation in steady state.
  void clear();
};

}  // namespace batchllm
