// PrefixTree: radix structure, BatchLLM gain rule, capping/rounding, multi-level shape, bad input.
#include "batchllm/prefix_tree.h"

#include <gtest/gtest.h>

#include <numeric>
#include <random>
#include <stdexcept>
#include <vector>

namespace batchllm {
namespace {

using Prompts = std::vector<std::vector<int32_t>>;

PrefixTree build(const Prompts& prompts) {
  std::vector<int32_t> tokens;
  std::vector<int64_t> offsets{0};
  for (const auto& p : prompts) {
    tokens.insert(tokens.end(), p.begin(), p.end());
    offsets.push_back(static_cast<int64_t>(tokens.size()));
  }
  PrefixTree tree;
  tree.insert(tokens.data(), offsets.data(), static_cast<int64_t>(prompts.size()));
  return tree;
}

std::vector<int32_t> random_run(std::mt19937& rng, int n) {
  std::vector<int32_t> out(static_cast<size_t>(n));
  for (auto& t : out) t = static_cast<int32_t>(10 + rng() % 32000);
  return out;
}

std::vector<int32_t> concat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

TEST(PrefixTree, EmptyTree) {
  PrefixTree tree;
  EXPECT_EQ(tree.num_requests(), 0);
  const SharingPlan plan = tree.group_single_level(16);
  EXPECT_TRUE(plan.prefixes.empty());
  const PrefixTreeStats s = tree.stats(plan);
  EXPECT_EQ(s.nodes, 1);  // the root
  EXPECT_EQ(s.prompt_tokens, 0);
}

TEST(PrefixTree, PartialMatchSplitsANode) {
  PrefixTree tree = build({{1, 2, 3, 4}, {1, 2, 5}, {7}});
  // root, [1 2], [3 4], [5], [7]
  EXPECT_EQ(tree.stats(SharingPlan{{}, {-1, -1, -1}}).nodes, 5);
  EXPECT_EQ(tree.prompt_length(0), 4);
  EXPECT_EQ(tree.prompt_length(1), 3);
  const SharingPlan plan = tree.group_single_level(1);
  ASSERT_EQ(plan.prefixes.size(), 1u);
  EXPECT_EQ(plan.prefixes[0].end, 2);
  EXPECT_EQ(plan.prefixes[0].requests, (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(plan.request_prefix, (std::vector<int32_t>{0, 0, -1}));
}

TEST(PrefixTree, IdenticalNestedAndEmptyPrompts) {
  std::vector<int32_t> a(40, 5);
  std::vector<int32_t> longer = concat(a, {6, 7, 8});
  PrefixTree tree = build({a, {}, a, longer, {}});
  EXPECT_EQ(tree.stats(SharingPlan{{}, std::vector<int32_t>(5, -1)}).nodes, 3);  // root, a, [6 7 8]
  // The shared prefix stops before the shortest member's last token (39), then rounds down to 32.
  SharingPlan plan = tree.group_single_level(16);
  ASSERT_EQ(plan.prefixes.size(), 1u);
  EXPECT_EQ(plan.prefixes[0].end, 32);
  EXPECT_EQ(plan.request_prefix, (std::vector<int32_t>{0, -1, 0, 0, -1}));
  plan = tree.group_single_level(1);
  EXPECT_EQ(plan.prefixes[0].end, 39);
  const PrefixTreeStats s = tree.stats(plan);
  EXPECT_EQ(s.shared_tokens, 39 * 2);
  EXPECT_EQ(s.prefill_tokens, 40 + 40 + 43 - 78);
}

TEST(PrefixTree, GainRulePromotesOnlyWhenSharingPays) {
  std::mt19937 rng(7);
  const auto system = random_run(rng, 100);
  // Three prompts under a 20-token branch: gain = (3 - 1) * 20 - 100 < 0, the branch stays in the group.
  // Three prompts under a 60-token branch: gain = (3 - 1) * 60 - 100 > 0, it becomes its own group.
  const auto short_branch = random_run(rng, 20), long_branch = random_run(rng, 60);
  Prompts prompts;
  for (int i = 0; i < 3; ++i) prompts.push_back(concat(concat(system, short_branch), random_run(rng, 5)));
  for (int i = 0; i < 3; ++i) prompts.push_back(concat(concat(system, long_branch), random_run(rng, 5)));
  for (int i = 0; i < 2; ++i) prompts.push_back(concat(system, random_run(rng, 5)));
  PrefixTree tree = build(prompts);
  const SharingPlan plan = tree.group_single_level(1);
  ASSERT_EQ(plan.prefixes.size(), 2u);
  EXPECT_EQ(plan.prefixes[0].end, 100);  // system: the short branch and the lone prompts
  EXPECT_EQ(plan.prefixes[0].requests, (std::vector<int64_t>{0, 1, 2, 6, 7}));
  EXPECT_EQ(plan.prefixes[1].end, 160);  // system + long branch
  EXPECT_EQ(plan.prefixes[1].requests, (std::vector<int64_t>{3, 4, 5}));
  // min_prefix_tokens drops the groups that are too short.
  EXPECT_EQ(tree.group_single_level(1, 120).prefixes.size(), 1u);
}

TEST(PrefixTree, MultiLevelFollowsTheTree) {
  std::mt19937 rng(11);
  Prompts prompts;
  for (int s = 0; s < 2; ++s) {
    const auto system = random_run(rng, 32);
    for (int f = 0; f < 3; ++f) {
      const auto shots = random_run(rng, 48);
      for (int q = 0; q < 4; ++q) prompts.push_back(concat(concat(system, shots), random_run(rng, 8)));
    }
  }
  PrefixTree tree = build(prompts);
  const SharingPlan plan = tree.group_multi_level(16);
  ASSERT_EQ(plan.prefixes.size(), 8u);
  for (size_t i = 0; i < plan.prefixes.size(); ++i) {
    const SharedPrefix& p = plan.prefixes[i];
    const bool top = i % 4 == 0;
    EXPECT_EQ(p.depth, top ? 0 : 1);
    EXPECT_EQ(p.parent, top ? -1 : static_cast<int32_t>(i / 4 * 4));
    EXPECT_EQ(p.begin, top ? 0 : 32);
    EXPECT_EQ(p.end, top ? 32 : 80);
    EXPECT_EQ(p.requests.size(), top ? 12u : 4u);
  }
  EXPECT_EQ(plan.request_prefix[0], 1);
  EXPECT_EQ(plan.request_prefix[23], 7);
  const PrefixTreeStats s = tree.stats(plan);
  EXPECT_EQ(s.shared_tokens, 2 * 32 * 11 + 6 * 48 * 3);
  EXPECT_EQ(tree.group_multi_level(16, 1).prefixes.size(), 2u);
  EXPECT_EQ(tree.group_multi_level(16, 8, 64).prefixes.size(), 6u);  // 32-token system levels too short
}

TEST(PrefixTree, DeepNestingNeedsNoRecursion) {
  // 3,000 prompts each one token longer than the last: a 3,000-node chain.
  std::vector<int32_t> all(3000);
  std::iota(all.begin(), all.end(), 1);
  Prompts prompts;
  for (int k = 1; k <= 3000; ++k) prompts.emplace_back(all.begin(), all.begin() + k);
  PrefixTree tree = build(prompts);
  const SharingPlan single = tree.group_single_level(16);
  for (const SharedPrefix& p : single.prefixes) {
    EXPECT_EQ(p.end % 16, 0);
    for (int64_t r : p.requests) EXPECT_LE(p.end, tree.prompt_length(r) - 1);
  }
  const SharingPlan multi = tree.group_multi_level(16, 8);
  ASSERT_EQ(multi.prefixes.size(), 8u);  // one level per 16-token step, cut at max_depth
  EXPECT_EQ(multi.prefixes[7].end, 128);
  EXPECT_EQ(multi.prefixes[7].requests.size(), 3000u - 128u);
}

TEST(PrefixTree, LongPromptsAndWideNodes) {
  std::mt19937 rng(9);
  // Runs longer than an arena chunk (1M tokens) get their own chunk; a split inside one works.
  const auto shared = random_run(rng, 1'500'000);
  Prompts prompts{concat(shared, random_run(rng, 10)), concat(shared, random_run(rng, 20))};
  // 50,000 single-token prompts: the root's child index grows far past its first size.
  for (int32_t t = 0; t < 50'000; ++t) prompts.push_back({t});
  PrefixTree tree = build(prompts);
  EXPECT_EQ(tree.prompt_length(1), 1'500'020);
  const SharingPlan plan = tree.group_single_level(16);
  ASSERT_EQ(plan.prefixes.size(), 1u);
  EXPECT_EQ(plan.prefixes[0].end, 1'500'000);
  EXPECT_EQ(plan.prefixes[0].requests, (std::vector<int64_t>{0, 1}));
  // Every single-token prompt is a leaf of the root, except the one equal to the long run's first
  // token: it ends inside that edge and splits it (root, split, long run, 2 suffixes, 49,999 leaves).
  EXPECT_EQ(tree.stats(plan).nodes, 1 + 1 + 1 + 2 + 49'999);
}

TEST(PrefixTree, NegativeTokenRejectsTheWholeCall) {
  PrefixTree tree = build({{1, 2, 3}, {1, 2, 4}});
  const std::vector<int32_t> tokens{1, 2, 9, 9, 1, 2, 5, -3};
  const std::vector<int64_t> offsets{0, 4, 8};
  EXPECT_THROW(tree.insert(tokens.data(), offsets.data(), 2), std::invalid_argument);
  EXPECT_EQ(tree.num_requests(), 2);
  EXPECT_EQ(tree.stats(tree.group_single_level(1)).nodes, 4);
  const std::vector<int64_t> decreasing{0, 4, 3};
  EXPECT_THROW(tree.insert(tokens.data(), decreasing.data(), 2), std::invalid_argument);
  EXPECT_THROW(tree.group_single_level(0), std::invalid_argument);
  EXPECT_THROW(tree.group_multi_level(16, 0), std::invalid_argument);
}

TEST(PrefixTree, StatsAddUpOnARandomJob) {
  std::mt19937 rng(5);
  Prompts prompts;
  std::vector<std::vector<int32_t>> stems;
  for (int g = 0; g < 50; ++g) stems.push_back(random_run(rng, 64));
  for (int i = 0; i < 5000; ++i)
    prompts.push_back(concat(stems[rng() % stems.size()], random_run(rng, 1 + static_cast<int>(rng() % 40))));
  PrefixTree tree = build(prompts);
  const SharingPlan plan = tree.group_single_level(16);
  const PrefixTreeStats s = tree.stats(plan);
  EXPECT_EQ(s.requests, 5000);
  EXPECT_EQ(s.groups, 50);
  EXPECT_EQ(s.shared_tokens + s.prefill_tokens, s.prompt_tokens);
  EXPECT_EQ(s.shared_tokens, (5000 - 50) * 64);
  EXPECT_GT(s.memory_bytes, s.prompt_tokens / 2);
}

}  // namespace
}  // namespace batchllm
