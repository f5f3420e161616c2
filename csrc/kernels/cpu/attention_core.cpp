#include "kernels/cpu/attention_core.h"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace batchllm::kernels::cpu {

namespace {

/// exp(x) for x <= 0 (softmax weights after subtracting the max), about 1 ulp (Cephes expf:
/// Cody-Waite reduction by ln 2, degree-6 polynomial, 2^n by exponent bits). Branch-free so that
/// the loop calling it vectorises: std::exp was most of the CPU prefill's time at small head dims.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;  // exp(-87) ~ 1.6e-38: still a normal float, negligible against sum >= 1
  const float n = static_cast<float>(static_cast<int32_t>(x * 1.44269504088896341f - 0.5f));  // round(x / ln 2)
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

}  // namespace

float attend_one_row(const float* q, const float* k_t, int64_t key_stride, const float* v, int64_t num_keys,
                     int64_t head_dim, float scale, float* scores, float* out) {
  for (int64_t d = 0; d < head_dim; ++d) out[d] = 0.0f;
  if (num_keys == 0) return -INFINITY;
  // scores = scale * q . k over all keys at once, one head-dim component at a time: the inner loop
  // touches contiguous keys with independent sums, so it vectorises without reassociating anything.
  for (int64_t t = 0; t < num_keys; ++t) scores[t] = 0.0f;
  for (int64_t d = 0; d < head_dim; ++d) {
    const float qd = q[d] * scale;
    const float* row = k_t + d * key_stride;
    for (int64_t t = 0; t < num_keys; ++t) scores[t] += qd * row[t];
  }
  // Every score is at hand, so the exact max is used instead of an online rescale.
  float max_score = -INFINITY;
  for (int64_t t = 0; t < num_keys; ++t) max_score = std::fmax(max_score, scores[t]);
  float sum = 0.0f;
  for (int64_t t = 0; t < num_keys; ++t) scores[t] = exp_nonpositive(scores[t] - max_score);
  for (int64_t t = 0; t < num_keys; ++t) sum += scores[t];
  for (int64_t t = 0; t < num_keys; ++t) {
    const float weight = scores[t];
    const float* value = v + t * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) out[d] += weight * value[d];
  }
  const float inv_sum = 1.0f / sum;
  for (int64_t d = 0; d < head_dim; ++d) out[d] *= inv_sum;
  return max_score + std::log(sum);
}

}  // namespace batchllm::kernels::cpu
