// Scheduler: whole jobs under every policy, integrity after every step, prefix lifetimes, failures.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <set>
#include <vector>

#include "batchllm/scheduler.h"

namespace batchllm {
namespace {

JobRequests fewshot(int groups, int per_group, int prefix, int suffix, int max_tokens, int n = 1, int seed = 0) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> tok(10, 5000);
  JobRequests job;
  job.offsets = {0};
  job.stop_offsets = {0};
  for (int g = 0; g < groups; ++g) {
    std::vector<int32_t> shared(prefix);
    for (auto& t : shared) t = tok(rng);
    for (int i = 0; i < per_group; ++i) {
      job.tokens.insert(job.tokens.end(), shared.begin(), shared.end());
      for (int s = 0; s < suffix; ++s) job.tokens.push_back(tok(rng));
      job.offsets.push_back(static_cast<int64_t>(job.tokens.size()));
      job.max_tokens.push_back(max_tokens);
      job.num_samples.push_back(n);
      job.min_tokens.push_back(0);
      job.ignore_eos.push_back(1);
      job.stop_offsets.push_back(0);
    }
  }
  job.eos_token_ids = {2};
  return job;
}

struct RunResult {
  std::map<std::pair<int64_t, int32_t>, size_t> finished;  // (request, sample) -> output length
  std::vector<int64_t> failed;
  SchedulerStats stats;
};

RunResult run(Scheduler& s, JobRequests job) {
  s.add_requests(std::move(job));
  RunResult result;
  std::vector<int32_t> sampled;
  for (int step = 0; step < 1000000; ++step) {
    const StepPlan* plan = s.next_step();
    if (!plan) break;
    EXPECT_EQ(s.check_integrity(), "");
    EXPECT_GT(plan->num_tokens(), 0);
    sampled.assign(plan->num_sample_rows(), 11);
    s.commit(sampled.data(), static_cast<int64_t>(sampled.size()));
    EXPECT_EQ(s.check_integrity(), "");
    for (auto& f : s.pop_finished()) {
      auto key = std::make_pair(f.request, f.sample_index);
      EXPECT_EQ(result.finished.count(key), 0u) << "finished twice";
      result.finished[key] = f.token_ids.size();
    }
  }
  for (auto& f : s.pop_failed()) result.failed.push_back(f.request);
  result.stats = s.stats();
  EXPECT_TRUE(s.done());
  EXPECT_EQ(s.num_free_blocks(), s.config().num_blocks);
  return result;
}

SchedulerConfig config(SchedulePolicy policy, int64_t num_blocks, int bs = 16, int64_t budget = 256) {
  SchedulerConfig c;
  c.policy = policy;
  c.num_blocks = num_blocks;
  c.block_size = bs;
  c.token_budget = budget;
  c.tile_tokens = 64;
  return c;
}

TEST(Scheduler, EveryPolicyFinishesEveryRequestWithItsMaxTokens) {
  for (SchedulePolicy p : {SchedulePolicy::kBatchLLM, SchedulePolicy::kFcfsLru, SchedulePolicy::kNoShare}) {
    for (int64_t blocks : {int64_t{10}, int64_t{40}, int64_t{400}}) {
      Scheduler s(config(p, blocks));
      RunResult r = run(s, fewshot(4, 6, 64, 10, 20, 2));
      EXPECT_TRUE(r.failed.empty()) << policy_name(p) << " " << blocks;
      EXPECT_EQ(r.finished.size(), 48u);
      for (auto& [key, len] : r.finished) EXPECT_EQ(len, 20u);
    }
  }
}

TEST(Scheduler, BatchLLMPrefillsEachSharedPrefixOnce) {
  Scheduler s(config(SchedulePolicy::kBatchLLM, 1000));
  RunResult r = run(s, fewshot(4, 8, 128, 16, 8));
  EXPECT_EQ(r.stats.prefill_tokens, 4 * 128 + 32 * 16);
  EXPECT_EQ(r.stats.decode_tokens, 32 * 7);  // the first token comes from the prefill row
  EXPECT_EQ(r.stats.preemptions, 0);
}

TEST(Scheduler, TightMemoryPreemptsButNeverDeadlocks) {
  // one sequence needs (64 + 10 + 39) / 16 = 8 blocks; 9 blocks barely hold one
  for (SchedulePolicy p : {SchedulePolicy::kBatchLLM, SchedulePolicy::kFcfsLru, SchedulePolicy::kNoShare}) {
    Scheduler s(config(p, 9));
    RunResult r = run(s, fewshot(3, 4, 64, 10, 40, 2, 7));
    EXPECT_TRUE(r.failed.empty()) << policy_name(p);
    EXPECT_EQ(r.finished.size(), 24u);
  }
}

TEST(Scheduler, OversizedPromptFailsAloneWithAMessage) {
  JobRequests job = fewshot(1, 3, 16, 4, 4);
  // make request 1 longer than the whole cache
  std::vector<int32_t> tokens;
  std::vector<int64_t> offsets = {0};
  for (int r = 0; r < 3; ++r) {
    int64_t len = r == 1 ? 400 : job.offsets[r + 1] - job.offsets[r];
    for (int64_t i = 0; i < len; ++i) tokens.push_back(static_cast<int32_t>(10 + i));
    offsets.push_back(static_cast<int64_t>(tokens.size()));
  }
  job.tokens = tokens;
  job.offsets = offsets;
  Scheduler s(config(SchedulePolicy::kBatchLLM, 8));
  s.add_requests(job);
  auto failed = s.pop_failed();
  ASSERT_EQ(failed.size(), 1u);
  EXPECT_EQ(failed[0].request, 1);
  EXPECT_NE(failed[0].message.find("KV blocks"), std::string::npos);
  std::vector<int32_t> sampled;
  int finished = 0;
  while (const StepPlan* plan = s.next_step()) {
    sampled.assign(plan->num_sample_rows(), 11);
    s.commit(sampled.data(), static_cast<int64_t>(sampled.size()));
    finished += static_cast<int>(s.pop_finished().size());
  }
  EXPECT_EQ(finished, 2);
}

TEST(Scheduler, SteadyDecodeReusesThePlanBuffers) {
  Scheduler s(config(SchedulePolicy::kBatchLLM, 4000, 16, 2048));
  s.add_requests(fewshot(8, 16, 64, 8, 200));
  std::vector<int32_t> sampled;
  std::set<const int32_t*> ids, tables;
  for (int step = 0; step < 100; ++step) {
    const StepPlan* plan = s.next_step();
    ASSERT_NE(plan, nullptr);
    if (step >= 20) {  // past warm-up: buffers are reused (tables only grow geometrically as sequences do)
      EXPECT_EQ(plan->num_decode_seqs, 128);
      ids.insert(plan->input_ids.data());
      tables.insert(plan->block_tables.data());
    }
    sampled.assign(plan->num_sample_rows(), 11);
    s.commit(sampled.data(), static_cast<int64_t>(sampled.size()));
  }
  EXPECT_EQ(ids.size(), 1u);
  EXPECT_LE(tables.size(), 2u);
}

// Overlapped loop: step i+1 is planned before step i is committed; sequences stop on eos (token 2)
// at varying lengths, so some rows of overlapped steps are discarded. Same completions as serial.
std::map<std::pair<int64_t, int32_t>, std::vector<int32_t>> run_with_eos(Scheduler& s, JobRequests job,
                                                                         bool overlap) {
  for (auto& e : job.ignore_eos) e = 0;
  s.add_requests(std::move(job));
  std::map<std::pair<int64_t, int32_t>, std::vector<int32_t>> done;
  std::map<int64_t, int32_t> produced;  // sequence id -> tokens drawn for it
  auto draw = [&](const StepPlan& plan) {
    std::vector<int32_t> ids;
    for (int64_t r = 0; r < plan.num_sample_rows(); ++r) {
      const int64_t seq = plan.sample_seq_ids[r];
      const int32_t k = produced[seq]++;
      ids.push_back((seq * 7 + k * 3) % 11 == 0 ? 2 : 20 + k);
    }
    return ids;
  };
  std::vector<int32_t> pending;
  bool has_pending = false;
  for (int step = 0; step < 100000; ++step) {
    const StepPlan* plan = s.next_step(overlap && has_pending);
    std::vector<int32_t> ids;
    if (plan) {
      EXPECT_EQ(s.check_integrity(), "");
      for (int32_t r = 0; r < plan->num_decode_seqs; ++r)
        if (plan->input_ids[r] == kPendingToken) EXPECT_TRUE(overlap);
      ids = draw(*plan);
    }
    if (has_pending) {
      s.commit(pending.data(), static_cast<int64_t>(pending.size()));
      has_pending = false;
    } else if (!plan) {
      break;
    }
    if (plan && !overlap) {
      s.commit(ids.data(), static_cast<int64_t>(ids.size()));
    } else if (plan) {
      pending = ids;
      has_pending = true;
    }
    EXPECT_EQ(s.check_integrity(), "");
    for (auto& f : s.pop_finished()) done[{f.request, f.sample_index}] = f.token_ids;
  }
  EXPECT_TRUE(s.done());
  EXPECT_EQ(s.num_free_blocks(), s.config().num_blocks);
  return done;
}

TEST(Scheduler, OverlappedStepsGiveTheSerialCompletions) {
  for (SchedulePolicy p : {SchedulePolicy::kBatchLLM, SchedulePolicy::kFcfsLru, SchedulePolicy::kNoShare}) {
    for (int64_t blocks : {400, 40}) {
      Scheduler serial(config(p, blocks, 16, 128)), overlapped(config(p, blocks, 16, 128));
      const auto a = run_with_eos(serial, fewshot(3, 6, 40, 5, 12), false);
      const auto b = run_with_eos(overlapped, fewshot(3, 6, 40, 5, 12), true);
      EXPECT_EQ(a.size(), 18u);
      EXPECT_EQ(a, b) << policy_name(p) << " " << blocks << " blocks";
      EXPECT_EQ(serial.stats().discarded_rows, 0);
      EXPECT_GT(overlapped.stats().discarded_rows, 0);
    }
  }
}

TEST(Scheduler, RejectsBadConfigAndJobs) {
  EXPECT_THROW(Scheduler(config(SchedulePolicy::kBatchLLM, 0)), std::invalid_argument);
  EXPECT_THROW(parse_policy("lru"), std::invalid_argument);
  Scheduler s(config(SchedulePolicy::kBatchLLM, 10));
  JobRequests bad = fewshot(1, 2, 4, 2, 3);
  bad.max_tokens[1] = 0;
  EXPECT_THROW(s.add_requests(bad), std::invalid_argument);
  EXPECT_THROW(s.next_step(), std::invalid_argument);
}

}  // namespace
}  // namespace batchllm
