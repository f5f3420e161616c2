#include "kernels/cpu/attention_core.h"

#include <cmath>

namespace batchllm::kernels::cpu {

float attend_one_row(const float* q, const float* k, const float* v, int64_t num_keys, int64_t head_dim,
                     float scale, float* scores, float* out) {
  for (int64_t d = 0; d < head_dim; ++d) out[d] = 0.0f;
  if (num_keys == 0) return -INFINITY;
  // Two passes (scores, then exp and weighted sum): every score is at hand, so the exact max is used
  // instead of an online rescale; k and v are each streamed once, row by row.
  float max_score = -INFINITY;
  for (int64_t t = 0; t < num_keys; ++t) {
    const float* key = k + t * head_dim;
    float dot = 0.0f;
    for (int64_t d = 0; d < head_dim; ++d) dot += q[d] * key[d];
    scores[t] = dot * scale;
    max_score = std::fmax(max_score, scores[t]);
  }
  float sum = 0.0f;
  for (int64_t t = 0; t < num_keys; ++t) {
    const float weight = std::exp(scores[t] - max_score);
    sum += weight;
    const float* value = v + t * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) out[d] += weight * value[d];
  }
  const float inv_sum = 1.0f / sum;
  for (int64_t d = 0; d < head_dim; ++d) out[d] *= inv_sum;
  return max_score + std::log(sum);
}

}  // namespace batchllm::kernels::cpu
