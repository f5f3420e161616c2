// The inner loop of every CPU attention reference: one query row against a dense float K/V range.
#pragma once

#include <cstdint>

namespace batchllm::kernels::cpu {

/// Softmax attention of one query over keys [0, num_keys) of a context gathered to dense floats.
/// Keys are stored transposed, k_t[d * key_stride + t], so the score loop runs over contiguous keys
/// (independent lanes the compiler vectorises); values row-major v[t * head_dim + d].
/// \param q       [head_dim] query (float)
/// \param k_t     [head_dim, key_stride] keys, transposed
/// \param v       [key_stride, head_dim] values
/// \param scores  scratch of >= num_keys floats
/// \param out     [head_dim] normalised output; all zeros when num_keys == 0
/// \return natural-log sum of exp(scale * q.k) over the keys; -inf when num_keys == 0
float attend_one_row(const float* q, const float* k_t, int64_t key_stride, const float* v, int64_t num_keys,
                     int64_t head_dim, float scale, float* scores, float* out);

}  // namespace batchllm::kernels::cpu
