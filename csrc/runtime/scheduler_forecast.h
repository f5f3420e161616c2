// KvForecast: the peak future KV footprint of admitted work, the test of memory-centric admission.
#pragma once

#include <cstdint>
#include <vector>

namespace batchllm {

/// Sequences that hold `tokens` KV tokens now, store one more per step for `steps` steps and then
/// free everything. The footprint at future step t is the sum over sequences still alive at t of
/// blocks(tokens + t); it grows between completions and drops at each, so its peak is found at the
/// completion times. With outputs that run to max_tokens this is exact up to block rounding (an
/// upper bound: each sequence is charged one partial block); with early stops it is conservative.
class KvForecast {
 public:
  explicit KvForecast(int block_size = 16) : block_size_(block_size) {}

  void clear() { entries_.clear(); }
  /// Adds `count` sequences of (tokens, steps); keeps entries sorted by steps, descending. O(n).
  void add(int64_t tokens, int64_t steps, int64_t count = 1);
  /// Bulk build: append unsorted, then sort once (O(n log n) instead of n sorted inserts).
  void append_unsorted(int64_t tokens, int64_t steps, int64_t count = 1);
  void sort();
  /// Peak blocks over all future steps if (tokens, steps, count) were added too. O(n).
  int64_t peak_blocks_with(int64_t tokens, int64_t steps, int64_t count) const;
  int64_t peak_blocks() const { return peak_blocks_with(0, 0, 0); }
  int64_t size() const { return static_cast<int64_t>(entries_.size()); }

 private:
  struct Entry {
    int64_t steps;
    int64_t tokens;
    int64_t count;
  };
  int block_size_;
  std::vector<Entry> entries_;
};

}  // namespace batchllm
