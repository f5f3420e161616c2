// The global prefix-sharing scheduler: plans a whole job, then hands out one StepPlan at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "batchllm/step_plan.h"

namespace batchllm {

/// How a job reuses KV and in which order it runs.
enum class SchedulePolicy {
  kBatchLLM,  ///< global prefix groups, decode-heavy first, memory-centric admission, pinned prefixes
  kFcfsLru,   ///< FCFS admission in input order + vLLM-style hash-of-block LRU prefix cache
  kNoShare,   ///< FCFS, no KV reuse at all
};

/// Parses "batchllm" / "fcfs-lru" / "no-share"; throws std::invalid_argument otherwise.
SchedulePolicy parse_policy(const std::string& name);
const char* policy_name(SchedulePolicy policy);

struct SchedulerConfig {
  int64_t num_blocks = 0;        ///< KV blocks in the pool
  int block_size = 16;           ///< token slots per block
  int64_t token_budget = 2048;   ///< rows per step (rounded down to a multiple of tile_tokens)
  int64_t tile_tokens = 128;     ///< tile alignment of the token budget
  int64_t max_num_seqs = 1024;   ///< running sequences at most
  SchedulePolicy policy = SchedulePolicy::kBatchLLM;
  int max_prefix_depth = 8;      ///< batchllm: levels of nested shared prefixes
  /// batchllm: admission keeps the projected KV footprint within capacity for this many future
  /// steps (0: until every admitted sequence finishes, i.e. never preempt for growth).
  int64_t admission_horizon = 128;
  /// fcfs-lru / no-share admit a prompt only while this fraction of blocks stays free (vLLM watermark).
  double watermark = 0.01;
};

/// A whole job in flat arrays (what the binding receives from numpy).
/// Request i: prompt tokens[offsets[i], offsets[i+1]); stop token ids
/// stop_token_ids[stop_offsets[i], stop_offsets[i+1]); eos_token_ids apply to every request.
struct JobRequests {
  std::vector<int32_t> tokens;
  std::vector<int64_t> offsets;         ///< [N+1]
  std::vector<int32_t> max_tokens;      ///< [N] >= 1
  std::vector<int32_t> num_samples;     ///< [N] >= 1 (n)
  std::vector<int32_t> min_tokens;      ///< [N] >= 0
  std::vector<uint8_t> ignore_eos;      ///< [N]
  std::vector<int32_t> stop_token_ids;
  std::vector<int64_t> stop_offsets;    ///< [N+1]
  std::vector<int32_t> eos_token_ids;

  int64_t num_requests() const { return offsets.empty() ? 0 : static_cast<int64_t>(offsets.size()) - 1; }
  /// Empty when sound, else what is wrong (names the field).
  std::string validate() const;
};

/// One finished sample: output tokens (the stop token included when one stopped it).
struct FinishedSequence {
  int64_t request = 0;
  int32_t sample_index = 0;
  std::vector<int32_t> token_ids;
  std::string finish_reason;  ///< "length", "stop", or the reason given to finish_sequence
};

struct FailedRequest {
  int64_t request = 0;
  std::string message;
};

struct SchedulerStats {
  int64_t steps = 0;
  int64_t prefill_tokens = 0;    ///< prompt/recompute/shared-prefix tokens actually computed
  int64_t decode_tokens = 0;     ///< decode rows
  int64_t peak_kv_blocks = 0;    ///< most blocks held by work (idle LRU-cached blocks not counted)
  int64_t preemptions = 0;       ///< sequences preempted (recompute)
  int64_t cached_prefix_tokens = 0;  ///< fcfs-lru: prompt tokens served by the prefix cache
  int64_t finished_sequences = 0;
  int64_t failed_requests = 0;
  int64_t prefix_nodes = 0;      ///< batchllm: shared prefixes planned
  int64_t planned_prefill_tokens = 0;  ///< prefill tokens the plan needs without any recompute
  int64_t discarded_rows = 0;    ///< overlapped steps: rows of sequences that had finished meanwhile
};

/// Token id a decode row carries while its input is the still-uncommitted sample of the step before
/// (overlapped scheduling): the engine feeds that sample on the device.
constexpr int32_t kPendingToken = -1;

/// Plans a job (add_requests) and runs it step by step: next_step() -> run the model -> commit().
/// Not copyable; not thread-safe (one engine loop drives it).
class Scheduler {
 public:
  /// Throws std::invalid_argument on a bad config.
  explicit Scheduler(const SchedulerConfig& config);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  /// Adds the whole job and plans it (prefix groups, order). Once per scheduler, before next_step.
  /// Requests whose prompt alone exceeds the KV capacity fail at once (pop_failed).
  void add_requests(JobRequests job);

  /// Schedules the next step; nullptr when every request has finished or failed. The plan and its
  /// arrays stay valid until the next call of next_step/commit. Mutates (blocks, computed counts).
  ///
  /// overlap = true plans the next step while the last one is still uncommitted (its samples not
  /// known yet, the GPU still running it): each sequence sampled there is taken to go on, its decode
  /// row carrying kPendingToken as input (the engine feeds the real id on the device), except those
  /// max_tokens ends, which get no row. A sequence that its sample then stops (eos, stop id or
  /// string) has its row of the overlapped step discarded at that step's commit. Returns nullptr
  /// also when nothing can be planned before that commit (then commit and call again); done() tells
  /// the two apart. At most two plans are uncommitted.
  const StepPlan* next_step(bool overlap = false);
  /// Applies one sampled token per sample row of the oldest uncommitted plan (row order); finishes
  /// sequences by max_tokens / stop ids / eos. Throws std::invalid_argument on a count mismatch or
  /// no pending plan.
  void commit(const int32_t* sampled, int64_t count);
  /// Sample rows of the last commit that were discarded (their sequence had finished or failed).
  const std::vector<int32_t>& last_discarded_rows() const;
  /// Finishes a running sequence now (Python-side stop strings) and frees its blocks. Allowed while
  /// a plan is uncommitted (its row for the sequence is then discarded), not while the sequence's
  /// own last sample is (overlap: commit that step first).
  void finish_sequence(int64_t seq_id, const std::string& reason);

  std::vector<FinishedSequence> pop_finished();
  std::vector<FailedRequest> pop_failed();
  SchedulerStats stats() const;
  /// Token rows of each step so far (the cost model's per-step input).
  const std::vector<int32_t>& step_token_counts() const;

  /// Empty when block refcounts equal the references the scheduler holds and every running
  /// sequence's shared prefixes are resident; else what is wrong.
  std::string check_integrity() const;
  int64_t num_free_blocks() const;
  int64_t num_running() const;
  int64_t num_waiting() const;
  bool done() const;
  const SchedulerConfig& config() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace batchllm
