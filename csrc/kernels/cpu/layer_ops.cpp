// CPU references of the layer ops (rms_norm, silu_and_mul, rotary_embedding; batchllm/kernels.h):
// plain loops in float32, rounding to the tensors' dtype where the torch model does.
#include <cmath>
#include <vector>

#include "batchllm/kernels.h"
#include "kernels/cpu/cpu_common.h"

namespace batchllm::kernels {

namespace {

/// `value` rounded to `dtype` and read back (the value a torch op of that dtype would hold).
float round_to(DType dtype, float value) {
  switch (dtype) {
    case DType::kFloat16: return cpu::half_to_float(cpu::float_to_half(value));
    case DType::kBFloat16: return cpu::bf16_to_float(cpu::float_to_bf16(value));
    case DType::kFloat32: break;
  }
  return value;
}

/// Element offset of [i, j] in a 2-d view (last dim contiguous).
int64_t offset2(const TensorView& view, int64_t i, int64_t j) { return i * view.stride[0] + j; }

}  // namespace

Status rms_norm_cpu(const RmsNormParams& p) {
  if (p.x.ndim != 2 || p.out.ndim != 2 || p.weight.ndim != 1) return Status::kInvalidArgument;
  const int64_t rows = p.x.shape[0], hidden = p.x.shape[1];
  const bool residual = p.residual.data != nullptr;
  std::vector<float> row(static_cast<size_t>(hidden));
  for (int64_t t = 0; t < rows; ++t) {
    float sum_squares = 0.0f;
    for (int64_t i = 0; i < hidden; ++i) {
      float v = cpu::load_float(p.x.data, p.x.dtype, offset2(p.x, t, i));
      if (residual) {
        v = round_to(p.x.dtype, v + cpu::load_float(p.residual.data, p.residual.dtype, offset2(p.residual, t, i)));
        cpu::store_float(p.residual.data, p.residual.dtype, offset2(p.residual, t, i), v);
      }
      row[static_cast<size_t>(i)] = v;
      sum_squares += v * v;
    }
    const float inv_rms = 1.0f / std::sqrt(sum_squares / static_cast<float>(hidden) + p.eps);
    for (int64_t i = 0; i < hidden; ++i) {
      const float normed = round_to(p.x.dtype, row[static_cast<size_t>(i)] * inv_rms);
      cpu::store_float(p.out.data, p.out.dtype, offset2(p.out, t, i),
                       cpu::load_float(p.weight.data, p.weight.dtype, i) * normed);
    }
  }
  return Status::kOk;
}

Status silu_and_mul_cpu(const SiluAndMulParams& p) {
  if (p.gate_up.ndim != 2 || p.out.ndim != 2 || p.gate_up.shape[1] != 2 * p.out.shape[1]) {
    return Status::kInvalidArgument;
  }
  const int64_t rows = p.out.shape[0], width = p.out.shape[1];
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t i = 0; i < width; ++i) {
      const float gate = cpu::load_float(p.gate_up.data, p.gate_up.dtype, offset2(p.gate_up, t, i));
      const float up = cpu::load_float(p.gate_up.data, p.gate_up.dtype, offset2(p.gate_up, t, width + i));
      const float silu = round_to(p.gate_up.dtype, gate / (1.0f + std::exp(-gate)));
      cpu::store_float(p.out.data, p.out.dtype, offset2(p.out, t, i), silu * up);
    }
  }
  return Status::kOk;
}

namespace {
void rotate_heads(const TensorView& x, int64_t t, float position, const float* inv_freq) {
  const int64_t heads = x.shape[1], half = x.shape[2] / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t base = cpu::offset3(x, t, h);
    for (int64_t i = 0; i < half; ++i) {
      const float angle = position * inv_freq[i];
      const float c = round_to(x.dtype, std::cos(angle)), s = round_to(x.dtype, std::sin(angle));
      const float x1 = cpu::load_float(x.data, x.dtype, base + i);
      const float x2 = cpu::load_float(x.data, x.dtype, base + half + i);
      cpu::store_float(x.data, x.dtype, base + i, round_to(x.dtype, x1 * c) - round_to(x.dtype, x2 * s));
      cpu::store_float(x.data, x.dtype, base + half + i, round_to(x.dtype, x2 * c) + round_to(x.dtype, x1 * s));
    }
  }
}
}  // namespace

Status rotary_embedding_cpu(const RotaryParams& p) {
  if (p.q.ndim != 3 || p.k.ndim != 3 || p.q.shape[2] % 2 != 0 || p.positions == nullptr || p.inv_freq == nullptr) {
    return Status::kInvalidArgument;
  }
  for (int64_t t = 0; t < p.q.shape[0]; ++t) {
    const float position = static_cast<float>(p.positions[t]);
    rotate_heads(p.q, t, position, p.inv_freq);
    rotate_heads(p.k, t, position, p.inv_freq);
  }
  if (p.slot_mapping == nullptr) return Status::kOk;
  StoreKvParams store;  // the fused store: the rotated k rows and the v rows, as store_kv writes them
  store.k = p.k;
  store.v = p.v;
  store.k_cache = p.k_cache;
  store.v_cache = p.v_cache;
  store.slot_mapping = p.slot_mapping;
  return store_kv_cpu(store);
}

}  // namespace batchllm::kernels
