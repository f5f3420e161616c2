// CPU reference of cascade_decode_attention. It follows the level decomposition on purpose (suffix
// state first, then one partial state per covering prefix, merged by merge_lse) so that the CPU
// tests exercise the same merge math as the CUDA path, against a plain float64 reference.
#include <algorithm>
#include <vector>

#include "batchllm/kernels.h"
#include "kernels/cpu/attention_core.h"
#include "kernels/cpu/cpu_common.h"

namespace batchllm::kernels {

namespace {

/// Running (o, lse) state of every (row, q head), float32: o [B, Hq, D], lse [B, Hq].
struct RowStates {
  std::vector<float> o;
  std::vector<float> lse;
};

/// Attends rows [row_begin, row_end) x the q heads of `kv_head` to dense keys (transposed) and values, merging each
/// partial state into `states` (the first call per row may find lse -inf: merge_lse then copies).
void attend_and_merge(const CascadeDecodeParams& p, const std::vector<float>& keys,
                      const std::vector<float>& values, int64_t num_keys, int64_t row_begin, int64_t row_end,
                      int64_t kv_head, RowStates& states) {
  const int64_t num_q_heads = p.q.shape[1];
  const int64_t head_dim = p.q.shape[2];
  const int64_t group = num_q_heads / p.k_cache.shape[2];
  std::vector<float> query(head_dim), partial(head_dim), scores(std::max<int64_t>(num_keys, 1));
  for (int64_t b = row_begin; b < row_end; ++b) {
    for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
      cpu::load_row(p.q, b, h, head_dim, query.data());
      const float partial_lse = cpu::attend_one_row(query.data(), keys.data(), num_keys, values.data(), num_keys,
                                                    head_dim, p.scale, scores.data(), partial.data());
      const int64_t state = b * num_q_heads + h;
      float* o_state = states.o.data() + state * head_dim;
      const LseMerge w = merge_lse(states.lse[state], partial_lse);
      for (int64_t d = 0; d < head_dim; ++d) o_state[d] = merge_value(w, o_state[d], partial[d]);
      states.lse[state] = w.lse;
    }
  }
}

}  // namespace

Status cascade_decode_attention_cpu(const CascadeDecodeParams& params) {
  if (params.q.ndim != 3 || params.k_cache.ndim != 4 || params.o.ndim != 3) return Status::kInvalidArgument;
  const DecodeLevelsView& levels = params.levels;
  const int64_t num_rows = params.q.shape[0];
  const int64_t num_q_heads = params.q.shape[1];
  const int64_t head_dim = params.q.shape[2];
  const int64_t num_kv_heads = params.k_cache.shape[2];
  RowStates states;
  states.o.assign(static_cast<size_t>(num_rows * num_q_heads * head_dim), 0.0f);
  states.lse.assign(static_cast<size_t>(num_rows * num_q_heads), -INFINITY);

  // Each work item owns one KV head: the (row, q head) states it touches are disjoint from the others'.
  const double cost = 4.0 * num_rows * (num_q_heads / num_kv_heads) * head_dim *
                      (levels.max_suffix_kv_len + levels.max_prefix_kv_len + 16.0);
  cpu::parallel_for(num_kv_heads, cost, [&](int64_t kv_head) {
    std::vector<float> keys, values;
    for (int64_t b = 0; b < num_rows; ++b) {
      const int64_t suffix_len = levels.suffix_kv_lens[b];
      const int32_t* blocks = levels.suffix_block_tables + b * levels.max_suffix_blocks;
      cpu::gather_paged(params.k_cache, blocks, suffix_len, kv_head, keys, /*transpose=*/true);
      cpu::gather_paged(params.v_cache, blocks, suffix_len, kv_head, values);
      attend_and_merge(params, keys, values, suffix_len, b, b + 1, kv_head, states);
    }
    for (int64_t prefix = 0; prefix < levels.num_prefixes; ++prefix) {
      const int64_t prefix_len = levels.prefix_kv_lens[prefix];
      const int32_t* blocks = levels.prefix_kv_blocks + levels.prefix_kv_indptr[prefix];
      // The prefix is gathered once for all its readers (the CUDA kernel reads it once from HBM).
      cpu::gather_paged(params.k_cache, blocks, prefix_len, kv_head, keys, /*transpose=*/true);
      cpu::gather_paged(params.v_cache, blocks, prefix_len, kv_head, values);
      attend_and_merge(params, keys, values, prefix_len, levels.prefix_q_range[2 * prefix],
                       levels.prefix_q_range[2 * prefix + 1], kv_head, states);
    }
  });

  for (int64_t b = 0; b < num_rows; ++b) {
    for (int64_t h = 0; h < num_q_heads; ++h) {
      cpu::store_row(params.o, b, h, head_dim, states.o.data() + (b * num_q_heads + h) * head_dim);
    }
  }
  if (params.lse != nullptr) std::copy(states.lse.begin(), states.lse.end(), params.lse);
  return Status::kOk;
}

}  // namespace batchllm::kernels
