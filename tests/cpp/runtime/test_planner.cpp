// Planner: prefix groups from the radix tree, sample groups, decode-heavy-first order.
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "runtime/planner.h"

namespace batchllm {
namespace {

struct JobBuilder {
  JobRequests job;
  JobBuilder() {
    job.offsets = {0};
    job.stop_offsets = {0};
  }
  JobBuilder& add(const std::vector<int32_t>& prompt, int32_t max_tokens = 4, int32_t n = 1) {
    job.tokens.insert(job.tokens.end(), prompt.begin(), prompt.end());
    job.offsets.push_back(static_cast<int64_t>(job.tokens.size()));
    job.max_tokens.push_back(max_tokens);
    job.num_samples.push_back(n);
    job.min_tokens.push_back(0);
    job.ignore_eos.push_back(1);
    job.stop_offsets.push_back(0);
    return *this;
  }
};

std::vector<int32_t> seq(int32_t start, int n) {
  std::vector<int32_t> v(n);
  std::iota(v.begin(), v.end(), start);
  return v;
}

std::vector<int32_t> cat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

TEST(Planner, GroupsShareTheirPrefixOnceAndKeepEveryRequest) {
  JobBuilder b;
  const auto p1 = seq(100, 32), p2 = seq(500, 48);
  for (int i = 0; i < 3; ++i) b.add(cat(p1, seq(1000 + 10 * i, 5)));
  for (int i = 0; i < 2; ++i) b.add(cat(p2, seq(2000 + 10 * i, 7)));
  b.add(seq(3000, 9));  // shares nothing
  const JobPlan plan = plan_job(b.job, 16, SchedulePolicy::kBatchLLM, 8);
  ASSERT_EQ(plan.nodes.size(), 2u);
  EXPECT_EQ(plan.shared_len(0), 32);
  EXPECT_EQ(plan.shared_len(3), 48);
  EXPECT_EQ(plan.shared_len(5), 0);
  EXPECT_EQ(plan.prefill_tokens, 32 + 3 * 5 + 48 + 2 * 7 + 9);
  std::vector<int64_t> sorted = plan.order;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(sorted, (std::vector<int64_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(plan.groups.size(), 3u);
}

TEST(Planner, DecodeHeavyGroupsRunFirst) {
  JobBuilder b;
  const auto light = seq(100, 64), heavy = seq(500, 16);
  b.add(cat(light, {1}), 2).add(cat(light, {2}), 2);      // decode/prefill small
  b.add(cat(heavy, {3}), 200).add(cat(heavy, {4}), 200);  // decode/prefill large
  const JobPlan plan = plan_job(b.job, 16, SchedulePolicy::kBatchLLM, 8);
  ASSERT_EQ(plan.order.size(), 4u);
  EXPECT_EQ(plan.order[0], 2);
  EXPECT_EQ(plan.order[1], 3);
}

TEST(Planner, NestedPrefixesKeepReadersContiguous) {
  JobBuilder b;
  const auto system = seq(100, 32), shots_a = seq(300, 32), shots_b = seq(600, 32);
  // interleave the two shot sets in the input order
  for (int i = 0; i < 6; ++i) b.add(cat(cat(system, i % 2 ? shots_a : shots_b), {static_cast<int32_t>(900 + i)}));
  const JobPlan plan = plan_job(b.job, 16, SchedulePolicy::kBatchLLM, 8);
  ASSERT_EQ(plan.nodes.size(), 3u);
  // each request's deepest node must be contiguous in the order
  std::vector<int32_t> deepest;
  for (int64_t r : plan.order) deepest.push_back(plan.request_node[r]);
  EXPECT_EQ(deepest[0], deepest[1]);
  EXPECT_EQ(deepest[1], deepest[2]);
  EXPECT_EQ(deepest[3], deepest[4]);
  EXPECT_NE(deepest[2], deepest[3]);
  for (int64_t r = 0; r < 6; ++r) EXPECT_EQ(plan.shared_len(r), 64);
}

TEST(Planner, SamplesOfOnePromptFormAGroupOverItsFullBlocks) {
  JobBuilder b;
  b.add(seq(100, 40), 8, 4);  // 2.5 blocks of 16
  b.add(seq(900, 10), 8, 3);  // shorter than a block: no node, the samples fork the leader's blocks
  const JobPlan plan = plan_job(b.job, 16, SchedulePolicy::kBatchLLM, 8);
  ASSERT_EQ(plan.nodes.size(), 1u);
  EXPECT_TRUE(plan.nodes[0].is_sample_group);
  EXPECT_EQ(plan.nodes[0].end, 32);
  EXPECT_EQ(plan.nodes[0].num_readers, 4);
  EXPECT_EQ(plan.request_node[1], -1);
}

TEST(Planner, APromptEqualToItsPrefixStillComputesItsLastToken) {
  JobBuilder b;
  const auto p = seq(100, 32);
  b.add(p).add(cat(p, {7})).add(cat(p, {8}));
  const JobPlan plan = plan_job(b.job, 16, SchedulePolicy::kBatchLLM, 8);
  EXPECT_LE(plan.shared_len(0), 16);  // never its whole prompt
  EXPECT_GE(plan.shared_len(1), 16);  // how deep the longer two share is the tree's call
  EXPECT_EQ(plan.shared_len(1), plan.shared_len(2));
}

TEST(Planner, OtherPoliciesRunInInputOrderWithoutNodes) {
  JobBuilder b;
  b.add(seq(1, 20)).add(seq(1, 20)).add(seq(50, 3), 2, 2);
  for (SchedulePolicy p : {SchedulePolicy::kFcfsLru, SchedulePolicy::kNoShare}) {
    const JobPlan plan = plan_job(b.job, 16, p, 8);
    EXPECT_TRUE(plan.nodes.empty());
    EXPECT_EQ(plan.order, (std::vector<int64_t>{0, 1, 2}));
  }
}

}  // namespace
}  // namespace batchllm
