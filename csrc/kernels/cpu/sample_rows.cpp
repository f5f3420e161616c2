// CPU reference of sample_rows: per row, the logsumexp of the logits and the draw of
// batchllm/kernels/sampling.h (greedy argmax or Gumbel-max), in one pass; a filtered row then tries
// candidates in turn (each a pass: its rank, the mass before it, the best draw before it).
#include <algorithm>
#include <cmath>
#include <vector>

#include "batchllm/kernels.h"
#include "batchllm/kernels/sampling.h"
#include "kernels/cpu/cpu_common.h"

namespace batchllm::kernels {
namespace {

/// The draw of a filtered row (temperature > 0) whose unfiltered best is `best`: while the filters
/// drop the candidate, the next one is the best draw among the tokens before it (the kept tokens are
/// a prefix of the row's order, so they all come before a dropped candidate).
BestDraw filtered_draw(const TensorView& logits, int64_t base, int64_t vocab, float temperature, uint32_t key,
                       const DrawFilters& filters, float s_max, float mass, BestDraw best) {
  while (best.token != kNoToken) {
    const float s_c = best.logit / temperature;
    const uint32_t c = best.token;
    int64_t rank = 0;
    float mass_before = 0.0f;
    BestDraw next;
    for (int64_t v = 0; v < vocab; ++v) {
      const float x = cpu::load_float(logits.data, logits.dtype, base + v);
      const float s = x / temperature;
      if (!draw_before(s, static_cast<uint32_t>(v), s_c, c)) continue;
      ++rank;
      mass_before += std::exp(s - s_max);
      next.draw(x, temperature, key, static_cast<uint32_t>(v));
    }
    if (filters.keeps(rank, mass_before, mass, s_c - s_max)) return best;
    best = next;
  }
  return best;
}

/// The mass (sum of exp(s - s_max)) of a row's first `top_k` tokens in its order, or `mass` where
/// top_k cuts nothing: the keys' k-th smallest is the threshold; the tokens tied at it share the
/// remaining places (the lower ids, which all have its mass).
float top_k_mass(const TensorView& logits, int64_t base, int64_t vocab, float temperature, int64_t top_k,
                 float s_max, float mass) {
  std::vector<uint32_t> keys;
  keys.reserve(static_cast<size_t>(vocab));
  for (int64_t v = 0; v < vocab; ++v) {
    const float s = cpu::load_float(logits.data, logits.dtype, base + v) / temperature;
    if (!std::isnan(s)) keys.push_back(order_key(s));
  }
  if (top_k <= 0 || top_k >= static_cast<int64_t>(keys.size())) return mass;
  std::vector<uint32_t> sorted = keys;
  std::nth_element(sorted.begin(), sorted.begin() + (top_k - 1), sorted.end());
  const uint32_t threshold = sorted[static_cast<size_t>(top_k - 1)];
  int64_t before = 0;
  float kept = 0.0f;
  for (const uint32_t key : keys) {
    if (key < threshold) {
      ++before;
      kept += std::exp(order_key_value(key) - s_max);
    }
  }
  return kept + static_cast<float>(top_k - before) * std::exp(order_key_value(threshold) - s_max);
}

}  // namespace

Status sample_rows_cpu(const SampleRowsParams& params) {
  const TensorView& logits = params.logits;
  if (logits.ndim != 2 || params.temperature == nullptr || params.keys == nullptr || params.token_ids == nullptr ||
      params.lse == nullptr || params.logprobs == nullptr) {
    return Status::kInvalidArgument;
  }
  const bool has_filters = params.top_k != nullptr;
  if (has_filters != (params.top_p != nullptr) || has_filters != (params.min_p != nullptr)) {
    return Status::kInvalidArgument;
  }
  const int64_t vocab = logits.shape[1];
  for (int64_t r = 0; r < logits.shape[0]; ++r) {
    const float temperature = params.temperature[r];
    const uint32_t key = static_cast<uint32_t>(params.keys[r]);
    DrawFilters filters;
    if (has_filters && temperature > 0.0f) filters = {params.top_k[r], params.top_p[r], params.min_p[r]};
    const int64_t base = r * logits.stride[0];
    OnlineLse lse;       // of the logits
    OnlineLse tempered;  // of the tempered logits (a filtered row's mass)
    BestDraw best;
    for (int64_t v = 0; v < vocab; ++v) {
      const float x = cpu::load_float(logits.data, logits.dtype, base + v);
      lse.add(x);
      if (filters.any()) tempered.add(x / temperature);
      best.draw(x, temperature, key, static_cast<uint32_t>(v));
    }
    if (filters.any()) {
      // top_p weighs the mass of what top_k keeps.
      const float kept = filters.top_p < 1.0f ? top_k_mass(logits, base, vocab, temperature, filters.top_k,
                                                           tempered.max, tempered.sum)
                                              : tempered.sum;
      best = filtered_draw(logits, base, vocab, temperature, key, filters, tempered.max, kept, best);
    }
    params.token_ids[r] = best.token == kNoToken ? 0 : best.token;  // an all-NaN row: token 0
    params.lse[r] = lse.value();
    params.logprobs[r] = best.logit - lse.value();
  }
  return Status::kOk;
}

}  // namespace batchllm::kernels
