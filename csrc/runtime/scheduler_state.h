// Scheduler internals shared by scheduler*.cpp and step_plan*.cpp (not part of the public API).
#pragma once

#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "batchllm/block_manager.h"
#include "batchllm/scheduler.h"
#include "runtime/planner.h"
#include "runtime/prefix_cache.h"
#include "runtime/scheduler_forecast.h"

namespace batchllm {

enum class SeqStatus : uint8_t {
  kWaiting,         ///< queued: never admitted, or preempted (recompute)
  kRunning,         ///< admitted; holds its own blocks
  kAwaitingLeader,  ///< batchllm n > 1: sample 1..n-1 before sample 0 finished the prompt (then forks)
  kFinished,
  kFailed,
};

/// One sample of one request. Sequence ids are ranks in the planned run order.
struct Sequence {
  int64_t request = 0;
  int32_t sample = 0;
  int32_t node = -1;         ///< deepest shared prefix node read, -1 for none
  int64_t shared_len = 0;    ///< tokens covered by the prefix chain (block aligned)
  int64_t prompt_len = 0;
  const int32_t* prompt = nullptr;  ///< into JobRequests::tokens (owned by the scheduler)
  std::vector<int32_t> output;
  int64_t num_computed = 0;  ///< tokens whose KV is (or is being, this step) stored, >= shared_len
  BlockTable table;          ///< own blocks: tokens [shared_len, ...)
  SeqStatus status = SeqStatus::kWaiting;
  bool length_pending = false;  ///< overlap: its pending sample is its last (max_tokens); no more rows
  int32_t unforked = 0;         ///< leader: siblings still waiting for its prompt
  int64_t num_registered = 0;   ///< fcfs-lru: full blocks already offered to the prefix cache
  uint64_t last_hash = 0;       ///< fcfs-lru: hash of block num_registered - 1
  bool ever_admitted = false;
  bool table_changed = true;    ///< own blocks changed since its plan rows were last written
  /// Overlap: index in `output` of a sampled token not committed yet (kPendingToken there), or -1.
  int32_t pending_pos = -1;

  int64_t len() const { return prompt_len + static_cast<int64_t>(output.size()); }
  int32_t token(int64_t t) const { return t < prompt_len ? prompt[t] : output[t - prompt_len]; }
};

/// A planned shared prefix at run time: resident (pinned) from its first member's admission until its
/// last member finishes; released earlier only under memory pressure when no member is running.
struct NodeState {
  std::vector<int32_t> blocks;
  std::vector<int32_t> children;
  int64_t num_computed = 0;  ///< absolute position computed up to (begin when nothing)
  int64_t unfinished = 0;    ///< sequences reading it that have not finished or failed
  int64_t admitted = 0;      ///< running sequences reading it
  int64_t first_seq = 0;     ///< smallest reader sequence id (release order under pressure)
  bool allocated = false;
  int64_t level_step = -1;   ///< step in which its decode level was last emitted
  int32_t level_index = 0;
};

/// A sequence (id >= 0) or shared-prefix chunk (node >= 0) scheduled in the step being built.
struct StepEntry {
  int64_t seq = -1;
  int32_t node = -1;
  int32_t num_rows = 0;
};

enum class AdmitResult { kAdmitted, kNoRoom, kFailed };

/// Overlap: an uncommitted plan whose arrays the next plan reuses: which sequence each sample row
/// belongs to and where its reserved sample sits in that sequence's output (-1: discarded).
struct ReservedPlan {
  std::vector<int64_t> seq_ids;
  std::vector<int64_t> out_index;
};

struct Scheduler::Impl {
  explicit Impl(const SchedulerConfig& config);

  // ---- setup (scheduler.cpp)
  void add_requests(JobRequests job);
  // ---- step building (scheduler_step.cpp)
  const StepPlan* next_step(bool overlap);
  /// Overlap: moves the uncommitted plan in `out` to `reserved`, appending a kPendingToken to each
  /// of its sampled sequences (forking waiting n>1 siblings first).
  void reserve_samples();
  /// Forks the n>1 siblings of the plan's sample rows that wait for their leader's prompt.
  void fork_waiting_siblings(const std::vector<int64_t>& sample_seq_ids);
  /// The finish reason a sample gives its sequence (n_out: tokens generated with it), or nullptr.
  const char* stop_reason(const Sequence& seq, int64_t n_out, int32_t token) const;
  void schedule_decodes();
  /// A KV slot for the next token of running sequence `id`, making room (preempting later work) if
  /// needed; -1 when `id`, the latest running sequence by then, had to step aside (preempted) or fail.
  int64_t decode_slot(int64_t id, int32_t* cow_src, int32_t* cow_dst);
  void schedule_running_prefills();
  void admit_new();
  bool unstick();
  bool schedule_prefill(int64_t id);
  bool schedule_node_chunks(int32_t deepest);
  void emit_samples(int64_t id, int32_t row);
  void register_computed_blocks(Sequence& seq);
  // ---- admission, preemption, lifetime (scheduler_admit.cpp)
  AdmitResult try_admit(int64_t id, bool force);
  AdmitResult admit_with_forecast(Sequence& seq, bool force);
  AdmitResult admit_fcfs(Sequence& seq, bool force);
  int64_t next_waiting();
  void build_admit_order();
  /// Frees blocks until `blocks` (or what `grow` needs for grow_tokens more) are free: evicts LRU cache
  /// blocks, releases idle prefixes, then (if allowed) preempts the running sequence latest in run order (highest id), never `self`.
  bool make_room(int64_t blocks, bool allow_preempt, int64_t self, const BlockTable* grow = nullptr,
                 int64_t grow_tokens = 0);
  bool release_one_idle_node();
  void release_node(int32_t node);
  bool allocate_node(int32_t node);
  void preempt(int64_t id);
  void release_table(Sequence& seq);
  void finish(int64_t id, const std::string& reason);
  void fail_request(int64_t request, const std::string& message);
  void insert_running(int64_t id);
  void compact_running();
  void fork_sibling(int64_t id);
  void forecast_entry(const Sequence& seq, int64_t& tokens, int64_t& steps) const;
  void refresh_forecast();
  // ---- plan arrays (step_plan_builder.cpp)
  void finalize_plan();
  void build_decode_levels();
  /// Decode level of prefix `node` for decode row `row`: opened at its first reader, extended after.
  int32_t open_level(int32_t node, int32_t row);
  // ---- commit and checks (scheduler.cpp)
  void commit(const int32_t* sampled, int64_t count);
  std::string check_integrity() const;

  SchedulerConfig config;
  int64_t budget = 0;              ///< tile-aligned token budget
  BlockManager blocks;
  std::unique_ptr<PrefixCache> cache;  ///< fcfs-lru only
  JobRequests job;
  JobPlan plan;
  std::vector<Sequence> seqs;          ///< by id (= run order)
  std::vector<int64_t> request_first_seq;
  std::vector<NodeState> nodes;
  std::vector<int64_t> running;        ///< sorted by id: a prefix's readers stay contiguous
  std::set<int64_t> preempted;         ///< waiting after preemption, by id
  std::vector<int64_t> admit_order;    ///< never-admitted sequences in admission order
  size_t fresh_cursor = 0;             ///< next entry of admit_order to consider
  KvForecast forecast;                 ///< batchllm: projected KV of running work (rebuilt per step)
  int64_t forecast_step = -1;          ///< step the forecast was built for
  int64_t pinned_node_blocks = 0;      ///< blocks held by resident prefix nodes
  int64_t pending_forks = 0;
  int64_t unfinished = 0;              ///< sequences not finished or failed
  bool added = false;

  // ---- the step being built
  StepPlan out;
  std::vector<StepEntry> entries;
  std::vector<int64_t> prefill_candidates;
  int64_t budget_left = 0;
  int32_t decode_table_width = 0;   ///< widest block table among this step's decode rows
  int32_t decode_suffix_width = 0;  ///< widest own table among this step's decode rows
  int64_t step_index = 0;
  bool out_pending = false;       ///< the plan in `out` is uncommitted (its samples not reserved)
  bool reserved_pending = false;  ///< `reserved` holds an older uncommitted plan (overlap)
  ReservedPlan reserved;
  bool overlapping = false;       ///< the step being built overlaps an uncommitted one
  std::vector<int32_t> discarded;     ///< sample rows the last commit discarded
  // rows of the table matrices as last written (kept when the next step runs the same sequences)
  std::vector<int64_t> kept_seq_ids;
  int32_t kept_table_width = -1;
  std::vector<int64_t> kept_suffix_seq_ids;
  int32_t kept_suffix_rows = -1;
  int32_t kept_suffix_width = -1;

  std::vector<FinishedSequence> finished;
  std::vector<FailedRequest> failed;
  SchedulerStats stats;
  std::vector<int32_t> step_tokens;
};

}  // namespace batchllm
