// CPU reference of sample_rows: per row, the logsumexp of the logits and the draw of
// batchllm/kernels/sampling.h (greedy argmax or Gumbel-max), in one pass.
#include <cmath>

#include "batchllm/kernels.h"
#include "batchllm/kernels/sampling.h"
#include "kernels/cpu/cpu_common.h"

namespace batchllm::kernels {

Status sample_rows_cpu(const SampleRowsParams& params) {
  const TensorView& logits = params.logits;
  if (logits.ndim != 2 || params.temperature == nullptr || params.keys == nullptr || params.token_ids == nullptr ||
      params.lse == nullptr || params.logprobs == nullptr) {
    return Status::kInvalidArgument;
  }
  const int64_t vocab = logits.shape[1];
  for (int64_t r = 0; r < logits.shape[0]; ++r) {
    const float temperature = params.temperature[r];
    const uint32_t key = static_cast<uint32_t>(params.keys[r]);
    const int64_t base = r * logits.stride[0];
    float max = -INFINITY, sum = 0.0f;  // online logsumexp
    // (-inf, no token) loses to any non-NaN score: the lowest id wins among all -inf; NaN never.
    float best = -INFINITY, best_logit = -INFINITY;
    uint32_t best_token = kNoToken;
    for (int64_t v = 0; v < vocab; ++v) {
      const float x = cpu::load_float(logits.data, logits.dtype, base + v);
      if (x > max) {
        sum = sum * std::exp(max - x) + 1.0f;
        max = x;
      } else if (x > -INFINITY) {
        sum += std::exp(x - max);
      }
      const float score = draw_score(x, temperature, key, static_cast<uint32_t>(v));
      if (draw_beats(score, static_cast<uint32_t>(v), best, best_token)) {
        best = score;
        best_token = static_cast<uint32_t>(v);
        best_logit = x;
      }
    }
    const float lse = max == -INFINITY ? -INFINITY : max + std::log(sum);
    params.token_ids[r] = best_token == kNoToken ? 0 : best_token;  // an all-NaN row: token 0
    params.lse[r] = lse;
    params.logprobs[r] = best_logit - lse;
  }
  return Status::kOk;
}

}  // namespace batchllm::kernels
