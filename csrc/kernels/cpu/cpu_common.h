// Helpers shared by the CPU reference kernels: element conversion, view indexing, paged-KV gather,
// and a small parallel_for. Internal to csrc/kernels/cpu.
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "batchllm/kernels/views.h"

namespace batchllm::kernels::cpu {

/// IEEE half -> float, including subnormals, infinities and NaN.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1fu) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf / NaN
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);  // 112 = 127 - 15
  } else if (mantissa == 0) {
    bits = sign;  // signed zero
  } else {
    // Subnormal: normalise the mantissa.
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

/// float -> IEEE half, round to nearest even, overflow to inf, NaN kept NaN.
inline uint16_t float_to_half(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits >= 0x7f800000u) {  // inf or NaN
    return sign | 0x7c00u | (abs_bits > 0x7f800000u ? 0x200u : 0u);
  }
  if (abs_bits >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: overflow
  if (abs_bits < 0x38800000u) {                           // below the smallest normal half
    if (abs_bits < 0x33000000u) return sign;              // rounds to zero
    const uint32_t exponent = abs_bits >> 23;
    const uint32_t mantissa = (abs_bits & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exponent;  // 113 - exponent + 13
    uint32_t half_mantissa = mantissa >> shift;
    const uint32_t remainder = mantissa & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (remainder > halfway || (remainder == halfway && (half_mantissa & 1u))) ++half_mantissa;
    return sign | static_cast<uint16_t>(half_mantissa);
  }
  uint32_t rounded = abs_bits + 0xfffu + ((abs_bits >> 13) & 1u);  // round to nearest even
  return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(bits >> 16);
}

/// Reads element `offset` (in elements) of a buffer of `dtype`.
inline float load_float(const void* data, DType dtype, int64_t offset) {
  switch (dtype) {
    case DType::kFloat16: return half_to_float(static_cast<const uint16_t*>(data)[offset]);
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(data)[offset]);
    case DType::kFloat32: break;
  }
  return static_cast<const float*>(data)[offset];
}

/// Writes `value` as element `offset` of a buffer of `dtype`.
inline void store_float(void* data, DType dtype, int64_t offset, float value) {
  switch (dtype) {
    case DType::kFloat16: static_cast<uint16_t*>(data)[offset] = float_to_half(value); return;
    case DType::kBFloat16: static_cast<uint16_t*>(data)[offset] = float_to_bf16(value); return;
    case DType::kFloat32: break;
  }
  static_cast<float*>(data)[offset] = value;
}

/// Element offset of [i, j, :] in a 3-d view (last dim contiguous).
inline int64_t offset3(const TensorView& view, int64_t i, int64_t j) {
  return i * view.stride[0] + j * view.stride[1];
}

/// Reads row [i, j, 0:n] of a 3-d view into `out` as float.
inline void load_row(const TensorView& view, int64_t i, int64_t j, int64_t n, float* out) {
  const int64_t base = offset3(view, i, j);
  for (int64_t d = 0; d < n; ++d) out[d] = load_float(view.data, view.dtype, base + d);
}

/// Writes `n` floats as row [i, j, 0:n] of a 3-d view.
inline void store_row(const TensorView& view, int64_t i, int64_t j, int64_t n, const float* in) {
  const int64_t base = offset3(view, i, j);
  for (int64_t d = 0; d < n; ++d) store_float(view.data, view.dtype, base + d, in[d]);
}

/// Gathers `num_tokens` tokens of KV head `kv_head` from a paged cache [N, bs, Hkv, D] through
/// `blocks` into dense floats, so that the attention loops stream through contiguous memory:
/// row-major out[t * D + d], or transposed out[d * num_tokens + t] when `transpose` is set.
void gather_paged(const TensorView& cache, const int32_t* blocks, int64_t num_tokens, int64_t kv_head,
                  std::vector<float>& out, bool transpose = false);

/// Runs body(i) for i in [0, count) on up to hardware_concurrency threads (work-stealing by an
/// atomic counter). Calls must be independent: each i writes its own outputs only.
/// `cost_per_item` (rough scalar ops) keeps small problems on the calling thread.
void parallel_for(int64_t count, double cost_per_item, const std::function<void(int64_t)>& body);

}  // namespace batchllm::kernels::cpu
