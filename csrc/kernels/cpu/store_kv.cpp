// CPU reference of store_kv: scatter the step's new K/V rows into their paged slots.
#include "batchllm/kernels.h"
#include "kernels/cpu/cpu_common.h"

namespace batchllm::kernels {

namespace {
void store_rows(const TensorView& src, const TensorView& cache, const int64_t* slot_mapping) {
  const int64_t num_tokens = src.shape[0];
  const int64_t num_heads = src.shape[1];
  const int64_t head_dim = src.shape[2];
  const int64_t block_size = cache.shape[1];
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t slot = slot_mapping[t];
    if (slot < 0) continue;  // padding row: nothing to store
    const int64_t block = slot / block_size;
    const int64_t offset = slot % block_size;
    for (int64_t h = 0; h < num_heads; ++h) {
      const int64_t src_base = cpu::offset3(src, t, h);
      const int64_t dst_base = block * cache.stride[0] + offset * cache.stride[1] + h * cache.stride[2];
      for (int64_t d = 0; d < head_dim; ++d) {
        cpu::store_float(cache.data, cache.dtype, dst_base + d, cpu::load_float(src.data, src.dtype, src_base + d));
      }
    }
  }
}
}  // namespace

Status store_kv_cpu(const StoreKvParams& params) {
  if (params.k.ndim != 3 || params.k_cache.ndim != 4 || params.slot_mapping == nullptr) {
    return Status::kInvalidArgument;
  }
  store_rows(params.k, params.k_cache, params.slot_mapping);
  store_rows(params.v, params.v_cache, params.slot_mapping);
  return Status::kOk;
}

}  // namespace batchllm::kernels
