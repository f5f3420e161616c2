// The one definition of a draw's arithmetic, shared by the CPU reference and the CUDA kernel of
// sample_rows, and equal to the sampler's torch path (python/batchllm_core/sampling.py): the noise of
// a draw is a pure function of the row's 32-bit key and the token id (counter-based randomness), so
// a seeded request draws the same tokens wherever it runs in a batch.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "batchllm/kernels/merge.h"  // BATCHLLM_HOST_DEVICE

namespace batchllm::kernels {

/// murmur3's fmix32: sampling.py's _hash32.
BATCHLLM_HOST_DEVICE uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}

/// Gumbel(0, 1) noise of token `token` in the draw with key `key` (sampling.py's _gumbel_noise): 23
/// hash bits k -> u = (k + 1/2) / 2^23, exact in float32 and in [2^-24, 1 - 2^-24], so both logs are
/// finite (the noise lies in [-2.8, 16.6]). (With 24 bits, k = 2^24 - 1 made k + 1/2 round to 2^24:
/// u = 1 and infinite noise, so about one draw in 130 over a 128k vocabulary took a uniform token.)
BATCHLLM_HOST_DEVICE float gumbel_noise(uint32_t key, uint32_t token) {
  const uint32_t bits = hash32(key ^ hash32(token ^ 0x2545F491u));
  const float u = (static_cast<float>(bits >> 9) + 0.5f) * (1.0f / 8388608.0f);
  return -logf(-logf(u));
}

/// The score a draw maximises: the logit itself for a greedy row (temperature 0), else the tempered
/// logit plus the token's Gumbel noise (Gumbel-max: a draw from softmax(logits / temperature)).
BATCHLLM_HOST_DEVICE float draw_score(float logit, float temperature, uint32_t key, uint32_t token) {
  return temperature > 0.0f ? logit / temperature + gumbel_noise(key, token) : logit;
}

/// The best_token of a draw before any token was seen.
constexpr uint32_t kNoToken = 0xFFFFFFFFu;

/// Whether (score, token) beats (best, best_token): higher score, ties to the lower token id (as
/// torch.argmax); a NaN score never wins.
BATCHLLM_HOST_DEVICE bool draw_beats(float score, uint32_t token, float best, uint32_t best_token) {
  return score > best || (score == best && token < best_token);
}

/// An online logsumexp: max + log(sum) of what was added (a row's logits, or its tempered ones).
struct OnlineLse {
  float max = -INFINITY, sum = 0.0f;

  BATCHLLM_HOST_DEVICE void add(float x) {
    if (x > max) {
      sum = sum * expf(max - x) + 1.0f;
      max = x;
    } else if (x > -INFINITY) {
      sum += expf(x - max);
    }
  }
  BATCHLLM_HOST_DEVICE void merge(float o_max, float o_sum) {
    const float m = fmaxf(max, o_max);
    if (m > -INFINITY) {
      sum = (max > -INFINITY ? sum * expf(max - m) : 0.0f) + (o_max > -INFINITY ? o_sum * expf(o_max - m) : 0.0f);
      max = m;
    }
  }
  BATCHLLM_HOST_DEVICE float value() const { return max == -INFINITY ? -INFINITY : max + logf(sum); }
};

/// The best draw among the tokens offered: its score, id and raw logit. (-inf, no token) loses to
/// any non-NaN score, so the lowest id wins among all -inf; NaN never.
struct BestDraw {
  float score = -INFINITY, logit = -INFINITY;
  uint32_t token = kNoToken;

  BATCHLLM_HOST_DEVICE void offer(float s, uint32_t t, float x) {
    if (draw_beats(s, t, score, token)) {
      score = s;
      token = t;
      logit = x;
    }
  }
  BATCHLLM_HOST_DEVICE void merge(const BestDraw& o) { offer(o.score, o.token, o.logit); }
  /// Offers token `token` (raw logit x) of a draw (draw_score). A random draw's noise is at most
  /// kMaxGumbelNoise, so a token whose tempered logit is that far below the best score cannot win
  /// (float addition is monotone: its score <= s + kMaxGumbelNoise < best) and skips its hashes and
  /// logs: most of a trained model's vocabulary, which sits far below its top logits.
  BATCHLLM_HOST_DEVICE void draw(float x, float temperature, uint32_t key, uint32_t token);
};

/// Above gumbel_noise's largest value, -log(-log(1 - 2^-24)) = 16.6355 (with a margin for logf's
/// rounding): no token's noise reaches it.
constexpr float kMaxGumbelNoise = 17.0f;

BATCHLLM_HOST_DEVICE void BestDraw::draw(float x, float temperature, uint32_t key, uint32_t token) {
  if (temperature > 0.0f && x / temperature + kMaxGumbelNoise < score) return;
  offer(draw_score(x, temperature, key, token), token, x);
}

/// A draw's filters, for rows with temperature > 0 (greedy rows ignore them): keep the row's first
/// top_k tokens (0: all), then those whose probability mass before them is below top_p (1: all; the
/// probabilities are softmax(logits / temperature) over what top_k kept), then those whose
/// probability is at least min_p times the largest (0: all). "First" and "before" are in the row's
/// order: larger tempered logit first, ties to the lower id (draw_before). The first token is always
/// kept. The draw is the Gumbel-max over the kept tokens.
struct DrawFilters {
  int64_t top_k = 0;
  float top_p = 1.0f;
  float min_p = 0.0f;

  BATCHLLM_HOST_DEVICE bool any() const { return top_k > 0 || top_p < 1.0f || min_p > 0.0f; }
  /// Whether a candidate is kept: `rank` tokens come before it, with `mass_before` of `mass` (the
  /// row's, or its top_k tokens' where top_k cuts; all sums of exp(s - s_max) over tempered logits
  /// s), and its own s - s_max.
  BATCHLLM_HOST_DEVICE bool keeps(int64_t rank, float mass_before, float mass, float s_minus_max) const {
    return (top_k <= 0 || rank < top_k) && (top_p >= 1.0f || mass_before < top_p * mass) &&
           (min_p <= 0.0f || expf(s_minus_max) >= min_p);
  }
};

/// Whether token j (tempered logit sj) comes before token c (sc) in a row's order: larger first,
/// ties to the lower id; a NaN comes before nothing and nothing comes before it.
BATCHLLM_HOST_DEVICE bool draw_before(float sj, uint32_t j, float sc, uint32_t c) {
  return sj > sc || (sj == sc && j < c);
}

/// A key of a tempered logit that sorts ascending in the row's order (larger logits first; -0 as
/// +0, which compare equal): top_k's threshold is the k-th smallest key (a radix select on the
/// device). NaN has no place in the order: callers leave it out.
BATCHLLM_HOST_DEVICE uint32_t order_key(float s) {
  if (s == 0.0f) s = 0.0f;
  uint32_t u;
  memcpy(&u, &s, sizeof u);
  return (u & 0x80000000u) ? u : ~(u | 0x80000000u);
}

/// The tempered logit of an order_key.
BATCHLLM_HOST_DEVICE float order_key_value(uint32_t key) {
  const uint32_t u = (key & 0x80000000u) ? key : (~key & 0x7FFFFFFFu);
  float s;
  memcpy(&s, &u, sizeof s);
  return s;
}

}  // namespace batchllm::kernels
