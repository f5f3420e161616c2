#include "kernels/cpu/cpu_common.h"

#include <algorithm>
#include <atomic>
#include <thread>

namespace batchllm::kernels::cpu {

void gather_paged(const TensorView& cache, const int32_t* blocks, int64_t num_tokens, int64_t kv_head,
                  std::vector<float>& out, bool transpose) {
  const int64_t block_size = cache.shape[1];
  const int64_t head_dim = cache.shape[3];
  out.resize(static_cast<size_t>(num_tokens * head_dim));
  const int64_t t_step = transpose ? 1 : head_dim;
  const int64_t d_step = transpose ? num_tokens : 1;
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t base = blocks[t / block_size] * cache.stride[0] + (t % block_size) * cache.stride[1] +
                         kv_head * cache.stride[2];
    float* dst = out.data() + t * t_step;
    for (int64_t d = 0; d < head_dim; ++d) dst[d * d_step] = load_float(cache.data, cache.dtype, base + d);
  }
}

void parallel_for(int64_t count, double cost_per_item, const std::function<void(int64_t)>& body) {
  // Below ~1M scalar ops a thread start costs more than it saves.
  constexpr double kMinCostPerThread = 1e6;
  const int64_t hardware = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t by_cost = static_cast<int64_t>(count * cost_per_item / kMinCostPerThread);
  const int64_t num_threads = std::min({hardware, count, std::max<int64_t>(1, by_cost)});
  if (num_threads <= 1) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) body(i);
  };
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(num_threads - 1));
  for (int64_t t = 1; t < num_threads; ++t) threads.emplace_back(worker);
  worker();
  for (auto& thread : threads) thread.join();
}

}  // namespace batchllm::kernels::cpu
