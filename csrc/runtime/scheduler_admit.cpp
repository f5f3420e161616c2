// Scheduler: admission (memory-centric or FCFS), preemption by recompute, prefix lifetimes.
#include <algorithm>
#include <stdexcept>

#include "runtime/scheduler_state.h"

namespace batchllm {

void Scheduler::Impl::forecast_entry(const Sequence& seq, int64_t& tokens, int64_t& steps) const {
  // Charged as if its pending prefill were stored now (conservative), living on for the tokens it may
  // still generate plus the steps its prefill takes (so it is not assumed gone too early).
  tokens = seq.len() - seq.shared_len;
  const int64_t final_tokens = seq.prompt_len + job.max_tokens[seq.request] - 1 - seq.shared_len;
  const int64_t pending = seq.len() - seq.num_computed;
  steps = std::max<int64_t>(0, final_tokens - tokens) + (pending + budget - 1) / budget;
  if (config.admission_horizon > 0 && steps > config.admission_horizon) {
    // Only the next admission_horizon steps are promised (the footprint up to then is unchanged by
    // the clamp); growth past them may have to preempt (recompute) later.
    steps = config.admission_horizon;
  }
}

void Scheduler::Impl::refresh_forecast() {
  forecast.clear();
  int64_t tokens, steps;
  for (int64_t id : running) {
    forecast_entry(seqs[id], tokens, steps);
    forecast.append_unsorted(tokens, steps, 1 + seqs[id].unforked);
  }
  forecast.sort();
  forecast_step = step_index;
}

void Scheduler::Impl::build_admit_order() {
  admit_order.clear();
  std::vector<char> queued(seqs.size(), 0);
  if (config.policy == SchedulePolicy::kBatchLLM) {
    // The first reader of every shared prefix goes first: the prefixes are computed before the steps
    // fill with decodes, so the last prefill (and with it the job) ends earlier. The forecast and
    // pinned-prefix accounting still bound the memory this takes.
    for (size_t n = 0; n < nodes.size(); ++n) {
      if (plan.nodes[n].is_sample_group || nodes[n].unfinished == 0) continue;
      queued[nodes[n].first_seq] = 1;
    }
    for (size_t id = 0; id < seqs.size(); ++id)
      if (queued[id]) admit_order.push_back(static_cast<int64_t>(id));
  }
  for (size_t id = 0; id < seqs.size(); ++id)
    if (!queued[id] && seqs[id].status == SeqStatus::kWaiting) admit_order.push_back(static_cast<int64_t>(id));
  fresh_cursor = 0;
}

int64_t Scheduler::Impl::next_waiting() {
  if (!preempted.empty()) {  // preempted work was admitted earlier: it goes first
    const Sequence& first = seqs[*preempted.begin()];
    // Overlap: its last sample is not committed yet, so its tokens are not all known; nothing
    // overtakes it, so nothing is admitted until that commit.
    return first.pending_pos >= 0 || first.length_pending ? -1 : *preempted.begin();
  }
  while (fresh_cursor < admit_order.size()) {
    const Sequence& seq = seqs[admit_order[fresh_cursor]];
    if (seq.status == SeqStatus::kWaiting && !seq.ever_admitted) return admit_order[fresh_cursor];
    ++fresh_cursor;
  }
  return -1;
}

void Scheduler::Impl::insert_running(int64_t id) {
  running.insert(std::upper_bound(running.begin(), running.end(), id), id);
}

void Scheduler::Impl::compact_running() {
  running.erase(std::remove_if(running.begin(), running.end(),
                               [&](int64_t id) { return seqs[id].status != SeqStatus::kRunning; }),
                running.end());
}

bool Scheduler::Impl::allocate_node(int32_t node) {
  NodeState& state = nodes[node];
  if (state.allocated) return true;
  const PlanNode& pn = plan.nodes[node];
  const int64_t need = (pn.end - pn.begin) / config.block_size;
  if (!make_room(need, false, -1)) return false;
  if (!blocks.allocate(need, state.blocks)) return false;
  state.allocated = true;
  state.num_computed = pn.begin;
  pinned_node_blocks += need;
  return true;
}

void Scheduler::Impl::release_node(int32_t node) {
  NodeState& state = nodes[node];
  if (!state.allocated) return;
  // Children were computed on top of this KV; they go with it so "deepest computed" implies the chain is.
  for (int32_t child : state.children) release_node(child);
  for (int32_t b : state.blocks) blocks.release(b);
  pinned_node_blocks -= static_cast<int64_t>(state.blocks.size());
  state.blocks.clear();
  state.allocated = false;
  state.num_computed = plan.nodes[node].begin;
}

bool Scheduler::Impl::release_one_idle_node() {
  // A resident prefix none of whose members runs: the latest group's goes first (it is recomputed later).
  int32_t best = -1;
  for (size_t i = 0; i < nodes.size(); ++i) {
    if (nodes[i].allocated && nodes[i].admitted == 0 && (best < 0 || nodes[i].first_seq > nodes[best].first_seq))
      best = static_cast<int32_t>(i);
  }
  if (best < 0) return false;
  release_node(best);
  return true;
}

bool Scheduler::Impl::make_room(int64_t need, bool allow_preempt, int64_t self, const BlockTable* grow,
                                int64_t grow_tokens) {
  // When growing a table, what it needs can shrink as others let go (a copy-on-write becomes moot).
  auto needed = [&] { return grow ? blocks.blocks_needed_to_append(*grow, grow_tokens) : need; };
  while (blocks.num_free_blocks() < needed()) {
    if (cache && cache->num_evictable() > 0) {
      cache->make_free(needed());
      continue;
    }
    if (pinned_node_blocks > 0 && release_one_idle_node()) continue;
    if (!allow_preempt || running.empty() || running.back() == self) return false;
    const int64_t victim = running.back();
    preempt(victim);
    running.pop_back();
  }
  return true;
}

void Scheduler::Impl::release_table(Sequence& seq) {
  if (!cache) {
    blocks.free(seq.table);
    return;
  }
  // Last blocks first into the LRU queue: a prefix's tail is evicted before its head (vLLM order).
  for (auto it = seq.table.blocks.rbegin(); it != seq.table.blocks.rend(); ++it) {
    blocks.release(*it);
    cache->on_released(*it);
  }
  seq.table.blocks.clear();
  seq.table.num_tokens = 0;
}

AdmitResult Scheduler::Impl::try_admit(int64_t id, bool force) {
  Sequence& seq = seqs[id];
  const int32_t group_size = 1 + seq.unforked;
  if (!force && static_cast<int64_t>(running.size()) + pending_forks + group_size > config.max_num_seqs)
    return AdmitResult::kNoRoom;
  const AdmitResult result =
      config.policy == SchedulePolicy::kBatchLLM ? admit_with_forecast(seq, force) : admit_fcfs(seq, force);
  if (result != AdmitResult::kAdmitted) return result;
  seq.status = SeqStatus::kRunning;
  seq.table_changed = true;
  pending_forks += seq.unforked;
  insert_running(id);
  preempted.erase(id);
  seq.ever_admitted = true;
  return AdmitResult::kAdmitted;
}

AdmitResult Scheduler::Impl::admit_with_forecast(Sequence& seq, bool force) {
  // Memory-centric admission: the projected peak of all admitted KV (each sequence growing a token
  // per step to max_tokens, freed when done) plus resident prefixes must fit.
  const int32_t group_size = 1 + seq.unforked;
  int64_t missing_node_blocks = 0;
  for (int32_t n = seq.node; n >= 0; n = plan.nodes[n].parent)
    if (!nodes[n].allocated) missing_node_blocks += (plan.nodes[n].end - plan.nodes[n].begin) / config.block_size;
  if (forecast_step != step_index) refresh_forecast();
  int64_t tokens, steps;
  forecast_entry(seq, tokens, steps);
  if (!force && forecast.peak_blocks_with(tokens, steps, group_size) + pinned_node_blocks + missing_node_blocks >
                    config.num_blocks)
    return AdmitResult::kNoRoom;
  for (int32_t n = seq.node; n >= 0; n = plan.nodes[n].parent) ++nodes[n].admitted;  // protects the chain
  // Allocate root first so a parent is never missing under a resident child.
  int32_t chain[64];
  int depth = 0;
  for (int32_t n = seq.node; n >= 0 && depth < 64; n = plan.nodes[n].parent) chain[depth++] = n;
  for (int d = depth - 1; d >= 0; --d) {
    if (allocate_node(chain[d])) continue;
    for (int32_t n = seq.node; n >= 0; n = plan.nodes[n].parent) --nodes[n].admitted;
    if (!force) return AdmitResult::kNoRoom;
    fail_request(seq.request, "its shared prefixes need more KV blocks than the cache has (" +
                                  std::to_string(config.num_blocks) + ")");
    return AdmitResult::kFailed;
  }
  forecast.add(tokens, steps, group_size);
  return AdmitResult::kAdmitted;
}

AdmitResult Scheduler::Impl::admit_fcfs(Sequence& seq, bool force) {
  // FCFS: admit while the prompt's uncached blocks fit above the watermark (vLLM's can_allocate).
  // Reuse the longest run of computed blocks in the cache (never the block holding the last token:
  // that token must be computed to be sampled from).
  const int bs = config.block_size;
  const int64_t max_hits = cache ? (seq.len() - 1) / bs : 0;
  std::vector<int32_t> hit_blocks;
  std::vector<int32_t> block_tokens(bs);
  uint64_t hash = 0;
  while (static_cast<int64_t>(hit_blocks.size()) < max_hits) {
    const int64_t first = static_cast<int64_t>(hit_blocks.size()) * bs;
    for (int i = 0; i < bs; ++i) block_tokens[i] = seq.token(first + i);
    const uint64_t h = hash_block(hash, block_tokens.data(), bs);
    const int32_t block = cache->lookup(h, block_tokens.data());
    if (block < 0) break;
    hit_blocks.push_back(block);
    hash = h;
  }
  const int64_t hits = static_cast<int64_t>(hit_blocks.size());
  const int64_t need = blocks.blocks_for_tokens(seq.len()) - hits;
  int64_t hit_idle = 0;
  for (int32_t b : hit_blocks)
    if (blocks.refcount(b) == 1) ++hit_idle;  // reusing it takes it off the LRU queue
  const int64_t watermark = static_cast<int64_t>(config.watermark * config.num_blocks);
  const int64_t available = blocks.num_free_blocks() + (cache ? cache->num_evictable() : 0) - hit_idle;
  if (!force && available - need < watermark) return AdmitResult::kNoRoom;
  if (force && need > available) {
    fail_request(seq.request, "sequence of " + std::to_string(seq.len()) +
                                  " tokens needs more KV blocks than the cache has (" +
                                  std::to_string(config.num_blocks) + ")");
    return AdmitResult::kFailed;
  }
  for (int32_t b : hit_blocks) {
    cache->acquire(b);
    seq.table.blocks.push_back(b);
  }
  seq.table.num_tokens = hits * bs;
  seq.num_computed = hits * bs;
  seq.num_registered = hits;
  seq.last_hash = hash;
  stats.cached_prefix_tokens += hits * bs;
  return AdmitResult::kAdmitted;
}

void Scheduler::Impl::fork_sibling(int64_t id) {
  Sequence& sib = seqs[id];
  Sequence& leader = seqs[request_first_seq[sib.request]];
  sib.table = blocks.fork(leader.table);
  sib.table_changed = true;
  sib.num_computed = leader.num_computed;
  sib.status = SeqStatus::kRunning;
  --leader.unforked;
  --pending_forks;
  for (int32_t n = sib.node; n >= 0; n = plan.nodes[n].parent) ++nodes[n].admitted;
  insert_running(id);
}

void Scheduler::Impl::preempt(int64_t id) {
  Sequence& seq = seqs[id];
  release_table(seq);
  seq.num_computed = seq.shared_len;
  seq.num_registered = 0;
  seq.last_hash = 0;
  seq.status = SeqStatus::kWaiting;
  pending_forks -= seq.unforked;
  for (int32_t n = seq.node; n >= 0; n = plan.nodes[n].parent) --nodes[n].admitted;
  preempted.insert(id);
  ++stats.preemptions;
}

void Scheduler::Impl::finish(int64_t id, const std::string& reason) {
  Sequence& seq = seqs[id];
  const bool was_running = seq.status == SeqStatus::kRunning;
  if (was_running) {
    release_table(seq);
  }
  seq.status = SeqStatus::kFinished;
  --unfinished;
  ++stats.finished_sequences;
  for (int32_t n = seq.node; n >= 0; n = plan.nodes[n].parent) {
    if (was_running) --nodes[n].admitted;
    if (--nodes[n].unfinished == 0) release_node(n);  // the last member is done: free the prefix now
  }
  finished.push_back({seq.request, seq.sample, seq.output, reason});
}

void Scheduler::Impl::fail_request(int64_t request, const std::string& message) {
  const int64_t first = request_first_seq[request];
  for (int64_t id = first; id < first + job.num_samples[request]; ++id) {
    Sequence& seq = seqs[id];
    if (seq.status == SeqStatus::kFinished || seq.status == SeqStatus::kFailed) continue;
    const bool was_running = seq.status == SeqStatus::kRunning;
    if (was_running) {
      release_table(seq);
      pending_forks -= seq.unforked;
    }
    preempted.erase(id);
    seq.status = SeqStatus::kFailed;
    seq.unforked = 0;
    --unfinished;
    for (int32_t n = seq.node; n >= 0; n = plan.nodes[n].parent) {
      if (was_running) --nodes[n].admitted;
      if (--nodes[n].unfinished == 0) release_node(n);
    }
  }
  compact_running();
  failed.push_back({request, message});
  ++stats.failed_requests;
}

}  // namespace batchllm
