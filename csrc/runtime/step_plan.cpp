// StepPlan buffers: cleared, never shrunk, so a steady-state step allocates nothing. The two table
// matrices are left to the builder, which keeps rows that did not change since the last step.
#include "batchllm/step_plan.h"

namespace batchllm {

void StepPlan::clear() {
  input_ids.clear();
  positions.clear();
  slot_mapping.clear();
  seq_ids.clear();
  query_start.clear();
  context_lens.clear();
  max_blocks = 0;
  num_decode_seqs = 0;
  prefix_kv_indptr.clear();
  prefix_kv_blocks.clear();
  prefix_kv_lens.clear();
  prefix_q_range.clear();
  max_suffix_blocks = 0;
  suffix_kv_lens.clear();
  sample_rows.clear();
  sample_seq_ids.clear();
  sample_requests.clear();
  sample_indices.clear();
  sample_output_lens.clear();
  cow_src.clear();
  cow_dst.clear();
  nano_batch_offsets.clear();
  num_prefill_tokens = 0;
  decode_kv_tokens_read = 0;
  decode_kv_tokens_unshared = 0;
}

}  // namespace batchllm
