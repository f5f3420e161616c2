// Scheduler: job setup, commit (stop rules), checks, and the public wrappers around Impl.
#include <algorithm>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "runtime/scheduler_state.h"

namespace batchllm {

SchedulePolicy parse_policy(const std::string& name) {
  if (name == "batchllm") return SchedulePolicy::kBatchLLM;
  if (name == "fcfs-lru") return SchedulePolicy::kFcfsLru;
  if (name == "no-share") return SchedulePolicy::kNoShare;
  throw std::invalid_argument("policy must be 'batchllm', 'fcfs-lru' or 'no-share', got '" + name + "'");
}

const char* policy_name(SchedulePolicy policy) {
  switch (policy) {
    case SchedulePolicy::kBatchLLM: return "batchllm";
    case SchedulePolicy::kFcfsLru: return "fcfs-lru";
    case SchedulePolicy::kNoShare: return "no-share";
  }
  return "?";
}

std::string JobRequests::validate() const {
  std::ostringstream err;
  if (offsets.empty() || offsets.front() != 0) return "offsets must start with 0";
  const int64_t n = num_requests();
  if (offsets.back() != static_cast<int64_t>(tokens.size()))
    return "offsets[-1] must equal len(tokens)";
  for (int64_t i = 0; i < n; ++i) {
    if (offsets[i + 1] <= offsets[i]) {
      err << "offsets: prompt " << i << " is empty or offsets decrease";
      return err.str();
    }
  }
  auto sized = [&](size_t size, const char* name) {
    if (static_cast<int64_t>(size) != n) err << name << " must have one entry per request (" << n << "); ";
  };
  sized(max_tokens.size(), "max_tokens");
  sized(num_samples.size(), "num_samples");
  sized(min_tokens.size(), "min_tokens");
  sized(ignore_eos.size(), "ignore_eos");
  if (!err.str().empty()) return err.str();
  for (int32_t t : tokens)
    if (t < 0) return "tokens must be >= 0";
  for (int64_t i = 0; i < n; ++i) {
    if (max_tokens[i] < 1) return "max_tokens must be >= 1 (request " + std::to_string(i) + ")";
    if (num_samples[i] < 1) return "num_samples must be >= 1 (request " + std::to_string(i) + ")";
    if (min_tokens[i] < 0) return "min_tokens must be >= 0 (request " + std::to_string(i) + ")";
  }
  if (stop_offsets.size() != static_cast<size_t>(n + 1) || stop_offsets.front() != 0 ||
      stop_offsets.back() != static_cast<int64_t>(stop_token_ids.size()))
    return "stop_token_offsets must have N+1 entries from 0 to len(stop_token_ids)";
  for (int64_t i = 0; i < n; ++i)
    if (stop_offsets[i + 1] < stop_offsets[i]) return "stop_token_offsets must be non-decreasing";
  return "";
}

Scheduler::Impl::Impl(const SchedulerConfig& cfg)
    : config(cfg), blocks(cfg.num_blocks, cfg.block_size), forecast(cfg.block_size) {
  if (cfg.num_blocks < 1) throw std::invalid_argument("num_blocks must be >= 1");
  if (cfg.tile_tokens < 1) throw std::invalid_argument("tile_tokens must be >= 1");
  if (cfg.token_budget < 1) throw std::invalid_argument("token_budget must be >= 1");
  if (cfg.max_num_seqs < 1) throw std::invalid_argument("max_num_seqs must be >= 1");
  if (cfg.watermark < 0 || cfg.watermark >= 1) throw std::invalid_argument("watermark must be in [0, 1)");
  if (cfg.admission_horizon < 0) throw std::invalid_argument("admission_horizon must be >= 0");
  // Chains are walked in fixed 64-entry arrays: depth levels plus one sample-group level fit.
  if (cfg.max_prefix_depth < 1 || cfg.max_prefix_depth > 32)
    throw std::invalid_argument("max_prefix_depth must be in [1, 32]");
  // Sarathi-Serve: a budget just past a tile boundary costs a whole extra tile; never go below one tile.
  budget = std::max(cfg.tile_tokens, cfg.token_budget / cfg.tile_tokens * cfg.tile_tokens);
  if (cfg.policy == SchedulePolicy::kFcfsLru) cache = std::make_unique<PrefixCache>(blocks, cfg.block_size);
}

void Scheduler::Impl::add_requests(JobRequests new_job) {
  if (added) throw std::invalid_argument("add_requests: a scheduler runs one job; create a new one");
  const std::string problem = new_job.validate();
  if (!problem.empty()) throw std::invalid_argument("add_requests: " + problem);
  job = std::move(new_job);
  added = true;
  plan = plan_job(job, config.block_size, config.policy, config.max_prefix_depth);
  const int64_t n = job.num_requests();
  const bool batchllm = config.policy == SchedulePolicy::kBatchLLM;
  nodes.resize(plan.nodes.size());
  for (size_t i = 0; i < plan.nodes.size(); ++i) {
    nodes[i].num_computed = plan.nodes[i].begin;
    if (plan.nodes[i].parent >= 0) nodes[plan.nodes[i].parent].children.push_back(static_cast<int32_t>(i));
  }
  int64_t total = 0;
  for (int64_t r = 0; r < n; ++r) total += job.num_samples[r];
  seqs.resize(total);
  request_first_seq.assign(n, 0);
  int64_t id = 0;
  for (int64_t r : plan.order) {
    request_first_seq[r] = id;
    const int64_t len = job.offsets[r + 1] - job.offsets[r];
    const bool too_long = blocks.blocks_for_tokens(len) > config.num_blocks;
    for (int32_t s = 0; s < job.num_samples[r]; ++s, ++id) {
      Sequence& seq = seqs[id];
      seq.request = r;
      seq.sample = s;
      seq.node = plan.request_node[r];
      seq.shared_len = plan.shared_len(r);
      seq.prompt_len = len;
      seq.prompt = job.tokens.data() + job.offsets[r];
      seq.num_computed = seq.shared_len;
      seq.output.reserve(std::min<int32_t>(job.max_tokens[r], 4096));
      seq.status = too_long ? SeqStatus::kFailed
                   : (batchllm && s > 0) ? SeqStatus::kAwaitingLeader : SeqStatus::kWaiting;
      if (batchllm && s == 0) seq.unforked = job.num_samples[r] - 1;
      if (too_long) continue;
      ++unfinished;
      for (int32_t node = seq.node; node >= 0; node = plan.nodes[node].parent) {
        if (nodes[node].unfinished++ == 0) nodes[node].first_seq = id;
      }
    }
    if (too_long) {
      failed.push_back({r, "prompt of " + std::to_string(len) + " tokens needs " +
                               std::to_string(blocks.blocks_for_tokens(len)) + " KV blocks but the cache has only " +
                               std::to_string(config.num_blocks)});
      ++stats.failed_requests;
    }
  }
  build_admit_order();
  stats.prefix_nodes = static_cast<int64_t>(plan.nodes.size());
  stats.planned_prefill_tokens = plan.prefill_tokens;
}

const char* Scheduler::Impl::stop_reason(const Sequence& seq, int64_t n_out, int32_t token) const {
  const int64_t req = seq.request;
  if (seq.length_pending || n_out >= job.max_tokens[req]) return "length";
  if (n_out < job.min_tokens[req]) return nullptr;
  const int32_t* stop = job.stop_token_ids.data();
  if (std::find(stop + job.stop_offsets[req], stop + job.stop_offsets[req + 1], token) != stop + job.stop_offsets[req + 1])
    return "stop";
  if (!job.ignore_eos[req] &&
      std::find(job.eos_token_ids.begin(), job.eos_token_ids.end(), token) != job.eos_token_ids.end())
    return "stop";
  return nullptr;
}

void Scheduler::Impl::commit(const int32_t* sampled, int64_t count) {
  // The oldest uncommitted plan: a reserved one (overlap), else the one in `out`.
  if (!reserved_pending && !out_pending)
    throw std::invalid_argument("commit: no step is pending (call next_step first)");
  const bool from_reserved = reserved_pending;
  const std::vector<int64_t>& seq_ids = from_reserved ? reserved.seq_ids : out.sample_seq_ids;
  const int64_t expected = static_cast<int64_t>(seq_ids.size());
  if (count != expected)
    throw std::invalid_argument("commit: expected " + std::to_string(expected) +
                                " sampled tokens (one per sample row), got " + std::to_string(count));
  if (!from_reserved) fork_waiting_siblings(seq_ids);
  discarded.clear();
  bool any_finished = false;
  for (int64_t r = 0; r < count; ++r) {
    const int64_t id = seq_ids[r];
    Sequence& seq = seqs[id];
    const int64_t index = from_reserved ? reserved.out_index[r] : 0;
    if (index < 0 || seq.status == SeqStatus::kFinished || seq.status == SeqStatus::kFailed) {
      discarded.push_back(static_cast<int32_t>(r));  // it finished or failed after this step was planned
      continue;
    }
    int64_t n_out;
    if (from_reserved) {
      seq.output[index] = sampled[r];
      seq.pending_pos = -1;
      n_out = index + 1;
    } else {
      seq.output.push_back(sampled[r]);
      n_out = static_cast<int64_t>(seq.output.size());
    }
    if (const char* reason = stop_reason(seq, n_out, sampled[r])) {
      seq.length_pending = false;
      preempted.erase(id);  // overlap: preempted while its sample was pending
      finish(id, reason);
      any_finished = true;
    }
  }
  stats.discarded_rows += static_cast<int64_t>(discarded.size());
  (from_reserved ? reserved_pending : out_pending) = false;
  if (any_finished) compact_running();
}

std::string Scheduler::Impl::check_integrity() const {
  std::ostringstream err;
  std::vector<int32_t> refs(static_cast<size_t>(config.num_blocks), 0);
  std::vector<int64_t> admitted(nodes.size(), 0);
  for (size_t i = 0; i < nodes.size(); ++i) {
    if (nodes[i].allocated) {
      for (int32_t b : nodes[i].blocks) ++refs[b];
    } else if (!nodes[i].blocks.empty()) {
      err << "released node " << i << " still lists blocks; ";
    }
  }
  if (cache) cache->add_references(refs);
  for (size_t id = 0; id < seqs.size(); ++id) {
    const Sequence& seq = seqs[id];
    if (seq.status != SeqStatus::kRunning) {
      if (!seq.table.blocks.empty()) err << "sequence " << id << " holds blocks while not running; ";
      continue;
    }
    for (int32_t b : seq.table.blocks) ++refs[b];
    if (seq.table.num_tokens != seq.num_computed - seq.shared_len)
      err << "sequence " << id << " table has " << seq.table.num_tokens << " tokens, expected "
          << seq.num_computed - seq.shared_len << "; ";
    for (int32_t node = seq.node; node >= 0; node = plan.nodes[node].parent) {
      ++admitted[node];
      if (!nodes[node].allocated) err << "running sequence " << id << " reads released prefix " << node << "; ";
    }
  }
  for (size_t i = 0; i < nodes.size(); ++i) {
    if (admitted[i] != nodes[i].admitted)
      err << "prefix " << i << " counts " << nodes[i].admitted << " running readers, found " << admitted[i] << "; ";
  }
  for (int64_t id : running)
    if (seqs[id].status != SeqStatus::kRunning) err << "running list holds non-running sequence " << id << "; ";
  if (!std::is_sorted(running.begin(), running.end())) err << "running list is not sorted; ";
  err << blocks.check_integrity(refs);
  return err.str();
}

// ---- public wrappers

Scheduler::Scheduler(const SchedulerConfig& config) : impl_(std::make_unique<Impl>(config)) {}
Scheduler::~Scheduler() = default;
void Scheduler::add_requests(JobRequests job) { impl_->add_requests(std::move(job)); }
const StepPlan* Scheduler::next_step(bool overlap) { return impl_->next_step(overlap); }
const std::vector<int32_t>& Scheduler::last_discarded_rows() const { return impl_->discarded; }
void Scheduler::commit(const int32_t* sampled, int64_t count) { impl_->commit(sampled, count); }

void Scheduler::finish_sequence(int64_t seq_id, const std::string& reason) {
  if (seq_id < 0 || seq_id >= static_cast<int64_t>(impl_->seqs.size()))
    throw std::invalid_argument("finish_sequence: unknown seq_id " + std::to_string(seq_id));
  const Sequence& seq = impl_->seqs[seq_id];
  if (seq.status == SeqStatus::kFinished || seq.status == SeqStatus::kFailed) return;  // already done
  if (seq.output.empty() || seq.unforked > 0)
    throw std::invalid_argument("finish_sequence: sequence " + std::to_string(seq_id) + " has no output yet");
  if (seq.pending_pos >= 0 || seq.length_pending)
    throw std::invalid_argument("finish_sequence: sequence " + std::to_string(seq_id) +
                                " has an uncommitted sample; commit that step first");
  impl_->preempted.erase(seq_id);
  impl_->finish(seq_id, reason);
  impl_->compact_running();
}

std::vector<FinishedSequence> Scheduler::pop_finished() { return std::exchange(impl_->finished, {}); }
std::vector<FailedRequest> Scheduler::pop_failed() { return std::exchange(impl_->failed, {}); }
SchedulerStats Scheduler::stats() const { return impl_->stats; }
const std::vector<int32_t>& Scheduler::step_token_counts() const { return impl_->step_tokens; }
std::string Scheduler::check_integrity() const { return impl_->check_integrity(); }
int64_t Scheduler::num_free_blocks() const { return impl_->blocks.num_free_blocks(); }
int64_t Scheduler::num_running() const { return static_cast<int64_t>(impl_->running.size()); }
int64_t Scheduler::num_waiting() const { return impl_->unfinished - num_running(); }
bool Scheduler::done() const { return impl_->added && impl_->unfinished == 0; }
const SchedulerConfig& Scheduler::config() const { return impl_->config; }

}  // namespace batchllm
