// KvForecast (admission projection) and PrefixCache (fcfs-lru hash-of-block LRU cache).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <vector>

#include "batchllm/block_manager.h"
#include "runtime/prefix_cache.h"
#include "runtime/scheduler_forecast.h"

namespace batchllm {
namespace {

// Brute force: the footprint at every future step.
int64_t brute_peak(const std::vector<std::array<int64_t, 3>>& seqs, int bs) {
  int64_t horizon = 0;
  for (auto& s : seqs) horizon = std::max(horizon, s[1]);
  int64_t peak = 0;
  for (int64_t t = 0; t <= horizon; ++t) {
    int64_t tokens = 0, alive = 0;
    for (auto& s : seqs)
      if (t <= s[1]) {
        tokens += (s[0] + t) * s[2];
        alive += s[2];
      }
    peak = std::max(peak, (tokens + alive * (bs - 1)) / bs);
  }
  return peak;
}

TEST(KvForecast, PeakMatchesBruteForce) {
  std::vector<std::array<int64_t, 3>> seqs = {{100, 10, 1}, {10, 50, 2}, {0, 5, 3}, {64, 0, 1}, {33, 33, 1}};
  KvForecast f(16);
  for (auto& s : seqs) f.add(s[0], s[1], s[2]);
  EXPECT_EQ(f.peak_blocks(), brute_peak(seqs, 16));
  auto with = seqs;
  with.push_back({20, 40, 2});
  EXPECT_EQ(f.peak_blocks_with(20, 40, 2), brute_peak(with, 16));
  KvForecast bulk(16);
  for (auto& s : seqs) bulk.append_unsorted(s[0], s[1], s[2]);
  bulk.sort();
  EXPECT_EQ(bulk.peak_blocks_with(20, 40, 2), brute_peak(with, 16));
}

TEST(KvForecast, StaggeredWorkNeedsLessThanItsFinalSizes) {
  // a sequence about to finish and one just starting never peak together
  KvForecast f(1);
  f.add(100, 1);
  EXPECT_EQ(f.peak_blocks_with(0, 100, 1), 102);  // 101 + 1 at step 1, 100 at step 100: not 101 + 100
  EXPECT_EQ(f.peak_blocks(), 101);
}

TEST(PrefixCache, HitsOnlyMatchingTokensAndEvictsLeastRecentlyUsed) {
  BlockManager blocks(4, 2);
  PrefixCache cache(blocks, 2);
  const int32_t a[2] = {5, 6}, b[2] = {7, 8};
  const uint64_t ha = hash_block(0, a, 2), hb = hash_block(ha, b, 2);
  EXPECT_NE(ha, hash_block(0, b, 2));
  const int32_t block_a = blocks.allocate_block(), block_b = blocks.allocate_block();
  cache.insert(ha, a, block_a);
  cache.insert(hb, b, block_b);
  EXPECT_EQ(blocks.refcount(block_a), 2);
  EXPECT_EQ(cache.lookup(ha, a), block_a);
  EXPECT_EQ(cache.lookup(ha, b), -1);  // same hash, other tokens: a miss, not a wrong hit
  // the table lets go: both become idle (a first, so a is least recently used)
  blocks.release(block_a);
  cache.on_released(block_a);
  blocks.release(block_b);
  cache.on_released(block_b);
  EXPECT_EQ(cache.num_evictable(), 2);
  cache.acquire(block_a);  // reused: leaves the queue
  EXPECT_EQ(cache.num_evictable(), 1);
  cache.make_free(3);  // 2 free now, evicts b
  EXPECT_EQ(blocks.num_free_blocks(), 3);
  EXPECT_EQ(cache.lookup(hb, b), -1);
  EXPECT_EQ(cache.lookup(ha, a), block_a);
  blocks.release(block_a);
  cache.on_released(block_a);
  cache.clear();
  EXPECT_EQ(blocks.num_free_blocks(), 4);
  EXPECT_EQ(blocks.check_integrity(), "");
}

}  // namespace
}  // namespace batchllm
