// The one place where two partial softmax-attention states are merged by log-sum-exp.
// Used by the CPU references, the CUDA cascade kernels and merge_states alike.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define BATCHLLM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define BATCHLLM_HOST_DEVICE inline
#endif

namespace batchllm::kernels {

/// Weights of a merge of two partial attention states (o_a, lse_a) and (o_b, lse_b), where each o is
/// the softmax-normalised output over its own key set and lse its natural-log sum of exp(scores):
///   lse = log(exp(lse_a) + exp(lse_b)),  o = weight_a * o_a + weight_b * o_b,
///   weight_x = exp(lse_x - lse).
struct LseMerge {
  float weight_a;
  float weight_b;
  float lse;
};

/// Computes the merge weights stably (shift by the larger lse before exponentiating).
/// lse = -inf means "this side saw no keys": its weight is exactly 0 and the other side's weight is
/// exactly 1, so the merge returns the other state unchanged, bit for bit.
BATCHLLM_HOST_DEVICE LseMerge merge_lse(float lse_a, float lse_b) {
  const float m = fmaxf(lse_a, lse_b);
  // Edge case handled here: both sides empty. m is -inf and lse - m would be (-inf) - (-inf) = NaN;
  // the merged state is empty too: weights 0, lse -inf (the output row is defined as 0).
  if (m == -INFINITY) return {0.0f, 0.0f, -INFINITY};
  // One side -inf: expf(-inf - m) = 0 exactly and the other side's expf(0) = 1 exactly, so the
  // division below leaves weights {0, 1} and lse = m: no special case needed.
  const float exp_a = expf(lse_a - m);
  const float exp_b = expf(lse_b - m);
  const float sum = exp_a + exp_b;
  return {exp_a / sum, exp_b / sum, m + logf(sum)};
}

/// weight_a * x_a + weight_b * x_b, skipping a side whose weight is 0 so that an unwritten (or NaN)
/// value of an empty side never leaks into the result (0 * NaN would be NaN).
BATCHLLM_HOST_DEVICE float merge_value(const LseMerge& w, float x_a, float x_b) {
  float out = 0.0f;
  if (w.weight_a != 0.0f) out += w.weight_a * x_a;
  if (w.weight_b != 0.0f) out += w.weight_b * x_b;
  return out;
}

}  // namespace batchllm::kernels
