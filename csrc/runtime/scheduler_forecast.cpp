// KvForecast: peak of the projected KV footprint. See scheduler_forecast.h.
#include "runtime/scheduler_forecast.h"

#include <algorithm>

namespace batchllm {

void KvForecast::add(int64_t tokens, int64_t steps, int64_t count) {
  if (count <= 0) return;
  const Entry entry{std::max<int64_t>(0, steps), tokens, count};
  auto pos = std::upper_bound(entries_.begin(), entries_.end(), entry,
                              [](const Entry& a, const Entry& b) { return a.steps > b.steps; });
  entries_.insert(pos, entry);
}

void KvForecast::append_unsorted(int64_t tokens, int64_t steps, int64_t count) {
  if (count > 0) entries_.push_back({std::max<int64_t>(0, steps), tokens, count});
}

void KvForecast::sort() {
  std::stable_sort(entries_.begin(), entries_.end(), [](const Entry& a, const Entry& b) { return a.steps > b.steps; });
}

int64_t KvForecast::peak_blocks_with(int64_t tokens, int64_t steps, int64_t count) const {
  // Sweep completion times from the latest down: at time t every sequence with steps >= t is alive
  // and holds tokens + t, charged (tokens + t) / block_size rounded up, summed as one ceiling each.
  const int64_t bs = block_size_;
  const int64_t cand_steps = std::max<int64_t>(0, steps);
  bool cand_pending = count > 0;
  int64_t alive = 0, alive_tokens = 0, peak = 0;
  auto footprint = [&](int64_t t) { return (alive_tokens + alive * t + alive * (bs - 1)) / bs; };
  auto add_cand = [&] {
    alive += count;
    alive_tokens += tokens * count;
    peak = std::max(peak, footprint(cand_steps));
    cand_pending = false;
  };
  for (const Entry& e : entries_) {
    if (cand_pending && cand_steps >= e.steps) add_cand();
    alive += e.count;
    alive_tokens += e.tokens * e.count;
    peak = std::max(peak, footprint(e.steps));
  }
  if (cand_pending) add_cand();
  return peak;
}

}  // namespace batchllm
