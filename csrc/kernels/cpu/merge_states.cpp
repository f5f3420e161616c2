// CPU reference of merge_states: row-wise LSE merge of two partial attention states.
#include "batchllm/kernels.h"
#include "kernels/cpu/cpu_common.h"

namespace batchllm::kernels {

Status merge_states_cpu(const MergeStatesParams& params) {
  if (params.o_a.ndim != 3 || params.lse_a == nullptr || params.lse_b == nullptr) return Status::kInvalidArgument;
  const int64_t num_rows = params.o_a.shape[0];
  const int64_t num_heads = params.o_a.shape[1];
  const int64_t head_dim = params.o_a.shape[2];
  for (int64_t n = 0; n < num_rows; ++n) {
    for (int64_t h = 0; h < num_heads; ++h) {
      const LseMerge w = merge_lse(params.lse_a[n * num_heads + h], params.lse_b[n * num_heads + h]);
      const int64_t a_base = cpu::offset3(params.o_a, n, h);
      const int64_t b_base = cpu::offset3(params.o_b, n, h);
      const int64_t o_base = cpu::offset3(params.o, n, h);
      // Element by element, reading before writing: o may alias o_a or o_b.
      for (int64_t d = 0; d < head_dim; ++d) {
        const float a = cpu::load_float(params.o_a.data, params.o_a.dtype, a_base + d);
        const float b = cpu::load_float(params.o_b.data, params.o_b.dtype, b_base + d);
        cpu::store_float(params.o.data, params.o.dtype, o_base + d, merge_value(w, a, b));
      }
      if (params.lse != nullptr) params.lse[n * num_heads + h] = w.lse;
    }
  }
  return Status::kOk;
}

}  // namespace batchllm::kernels
