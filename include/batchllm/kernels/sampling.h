// The one definition of a draw's arithmetic, shared by the CPU reference and the CUDA kernel of
// sample_rows, and equal to the sampler's torch path (python/batchllm_core/sampling.py): the noise of
// a draw is a pure function of the row's 32-bit key and the token id (counter-based randomness), so
// a seeded request draws the same tokens wherever it runs in a batch.
#pragma once

#include <cmath>
#include <cstdint>

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

/// Gumbel(0, 1) noise of token `token` in the draw with key `key` (sampling.py's _gumbel_noise): 24
/// hash bits -> u in (0, 1), exact in float32 and never 0 or 1, so both logs are finite.
BATCHLLM_HOST_DEVICE float gumbel_noise(uint32_t key, uint32_t token) {
  const uint32_t bits = hash32(key ^ hash32(token ^ 0x2545F491u));
  const float u = (static_cast<float>(bits >> 8) + 0.5f) * (1.0f / 16777216.0f);
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

}  // namespace batchllm::kernels
