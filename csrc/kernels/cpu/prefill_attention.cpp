// CPU reference of prefill_attention: ragged causal attention over paged context.
// Work item = (sequence, KV head): its context K/V is gathered to dense float once and every query
// row of the GQA group reads it from there.
#include <algorithm>
#include <vector>

#include "batchllm/kernels.h"
#include "kernels/cpu/attention_core.h"
#include "kernels/cpu/cpu_common.h"

namespace batchllm::kernels {

namespace {
void prefill_one(const PrefillParams& p, int64_t seq, int64_t kv_head) {
  const int64_t num_q_heads = p.q.shape[1];
  const int64_t head_dim = p.q.shape[2];
  const int64_t group = num_q_heads / p.k_cache.shape[2];
  const int64_t row_begin = p.query_start[seq];
  const int64_t q_len = p.query_start[seq + 1] - row_begin;
  const int64_t context_len = p.context_lens[seq];
  if (q_len == 0) return;
  const int32_t* blocks = p.block_tables + seq * p.max_blocks_per_seq;
  std::vector<float> keys, values;
  cpu::gather_paged(p.k_cache, blocks, context_len, kv_head, keys, /*transpose=*/true);
  cpu::gather_paged(p.v_cache, blocks, context_len, kv_head, values);
  std::vector<float> query(head_dim), out(head_dim), scores(context_len);
  for (int64_t j = 0; j < q_len; ++j) {
    const int64_t position = context_len - q_len + j;  // attends to keys 0..position
    for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
      cpu::load_row(p.q, row_begin + j, h, head_dim, query.data());
      cpu::attend_one_row(query.data(), keys.data(), context_len, values.data(), position + 1, head_dim, p.scale,
                          scores.data(), out.data());
      cpu::store_row(p.o, row_begin + j, h, head_dim, out.data());
    }
  }
}
}  // namespace

Status prefill_attention_cpu(const PrefillParams& params) {
  if (params.q.ndim != 3 || params.k_cache.ndim != 4 || params.o.ndim != 3) return Status::kInvalidArgument;
  const int64_t num_kv_heads = params.k_cache.shape[2];
  const int64_t num_items = params.num_seqs * num_kv_heads;
  if (num_items == 0) return Status::kOk;
  // Rough cost of one item for the threading decision: average rows x group x context x D x 4.
  int64_t total_rows = params.query_start[params.num_seqs] - params.query_start[0];
  int64_t max_context = 0;
  for (int64_t s = 0; s < params.num_seqs; ++s) max_context = std::max<int64_t>(max_context, params.context_lens[s]);
  const double cost = 4.0 * static_cast<double>(total_rows) * params.q.shape[1] * max_context *
                      params.q.shape[2] / static_cast<double>(num_items);
  cpu::parallel_for(num_items, cost, [&](int64_t item) {
    prefill_one(params, item / num_kv_heads, item % num_kv_heads);
  });
  return Status::kOk;
}

}  // namespace batchllm::kernels
