// Scheduler: building one step. Every running sequence decodes; chunked prefill (shared prefixes
// before their members' own tokens) fills the rest of the token budget; then new work is admitted.
#include <algorithm>
#include <stdexcept>

#include "runtime/scheduler_state.h"

namespace batchllm {

const StepPlan* Scheduler::Impl::next_step(bool overlap) {
  if (!added) throw std::invalid_argument("next_step: add_requests first");
  if (out_pending || reserved_pending) {
    if (!overlap) throw std::invalid_argument("next_step: commit the previous step first");
    if (out_pending && reserved_pending)
      throw std::invalid_argument("next_step: two steps are uncommitted; commit one first");
    if (out_pending) reserve_samples();
  }
  overlapping = reserved_pending;
  bool allow_admission = true;
  // Each retry preempts or fails something, so the loop ends; the bound only guards against a bug.
  const int64_t max_attempts = 4 * static_cast<int64_t>(seqs.size()) + 16;
  for (int64_t attempt = 0;; ++attempt) {
    if (unfinished == 0) {
      if (cache) cache->clear();  // the job is over: nothing is kept "in case"
      return nullptr;
    }
    if (attempt > max_attempts) throw std::logic_error("scheduler made no progress (internal error)");
    out.clear();
    entries.clear();
    budget_left = budget;
    schedule_decodes();
    out.num_decode_seqs = static_cast<int32_t>(entries.size());
    budget_left = budget - out.num_tokens();
    schedule_running_prefills();
    if (allow_admission || running.empty()) admit_new();
    if (out.num_tokens() > 0) break;
    if (overlapping) {  // wait for the uncommitted step: its samples may finish work and free memory
      out.clear();
      entries.clear();
      return nullptr;
    }
    // Nothing could run: memory is held by partial prefills. Make room by preempting (or failing a
    // sequence that cannot fit even alone), and do not re-admit in this step (that would loop).
    if (!running.empty()) allow_admission = false;
    unstick();
  }
  finalize_plan();
  ++stats.steps;
  stats.prefill_tokens += out.num_prefill_tokens;
  stats.decode_tokens += out.num_tokens() - out.num_prefill_tokens;
  const int64_t held = blocks.num_used_blocks() - (cache ? cache->num_evictable() : 0);
  stats.peak_kv_blocks = std::max(stats.peak_kv_blocks, held);
  step_tokens.push_back(static_cast<int32_t>(out.num_tokens()));
  ++step_index;
  out_pending = true;
  return &out;
}

void Scheduler::Impl::reserve_samples() {
  // The next plan is built in `out`: keep what commit needs of this one (buffers reused).
  reserved.seq_ids.assign(out.sample_seq_ids.begin(), out.sample_seq_ids.end());
  out_pending = false;
  reserved_pending = true;
  fork_waiting_siblings(reserved.seq_ids);
  reserved.out_index.assign(reserved.seq_ids.size(), -1);
  for (size_t r = 0; r < reserved.seq_ids.size(); ++r) {
    Sequence& seq = seqs[reserved.seq_ids[r]];
    if (seq.status != SeqStatus::kRunning) continue;  // finished or failed since: its sample is discarded
    seq.output.push_back(kPendingToken);
    seq.pending_pos = static_cast<int32_t>(seq.output.size()) - 1;
    reserved.out_index[r] = seq.pending_pos;
    if (static_cast<int64_t>(seq.output.size()) >= job.max_tokens[seq.request]) seq.length_pending = true;
  }
}

void Scheduler::Impl::fork_waiting_siblings(const std::vector<int64_t>& sample_seq_ids) {
  // Samples of a prompt fork its blocks before anyone (the leader included) may finish and free them.
  if (pending_forks == 0) return;
  for (int64_t id : sample_seq_ids)
    if (seqs[id].status == SeqStatus::kAwaitingLeader) fork_sibling(id);
}

void Scheduler::Impl::schedule_decodes() {
  // Decode rows are written by index into arrays sized for every running sequence (trimmed at the
  // end): this loop runs for ~1,000 sequences every step and is the scheduler's hot path.
  prefill_candidates.clear();
  const size_t cap = running.size();
  out.input_ids.resize(cap);
  out.positions.resize(cap);
  out.slot_mapping.resize(cap);
  out.sample_rows.resize(cap);
  out.sample_seq_ids.resize(cap);
  out.sample_requests.resize(cap);
  out.sample_indices.resize(cap);
  out.sample_output_lens.resize(cap);
  entries.resize(cap);
  out.seq_ids.resize(cap);
  out.context_lens.resize(cap);
  out.query_start.resize(cap + 1);
  out.query_start[0] = 0;
  int32_t table_width = 0, suffix_width = 0;
  int32_t rows = 0;
  int64_t decode_with_output = 0;
  const int bs = config.block_size;
  for (size_t i = 0; i < running.size(); ++i) {
    const int64_t id = running[i];
    Sequence& seq = seqs[id];
    if (seq.length_pending) continue;  // its uncommitted sample is its last: no row, finished at commit
    const bool chain_ready = seq.node < 0 || nodes[seq.node].num_computed == plan.nodes[seq.node].end;
    // A prompt whose waiting samples draw from its last row goes through the prefill path (n sample rows).
    if (seq.len() - seq.num_computed != 1 || !chain_ready || seq.unforked > 0) {
      prefill_candidates.push_back(id);
      continue;
    }
    int32_t cow_src = -1, cow_dst = -1;
    const int64_t slot = decode_slot(id, &cow_src, &cow_dst);
    if (slot < 0) break;  // it stepped aside (preempted) or failed: it was the latest running sequence
    if (cow_src >= 0) {
      out.cow_src.push_back(cow_src);
      out.cow_dst.push_back(cow_dst);
    }
    if (cow_src >= 0 || slot % bs == 0) seq.table_changed = true;  // a copy or a new block
    const int64_t n_out = static_cast<int64_t>(seq.output.size());
    out.input_ids[rows] = seq.token(seq.num_computed);
    out.positions[rows] = static_cast<int32_t>(seq.num_computed);
    out.slot_mapping[rows] = slot;
    out.sample_rows[rows] = rows;
    out.sample_seq_ids[rows] = id;
    out.sample_requests[rows] = seq.request;
    out.sample_indices[rows] = seq.sample;
    out.sample_output_lens[rows] = static_cast<int32_t>(n_out);
    entries[rows] = {id, -1, 1};
    out.seq_ids[rows] = id;
    out.context_lens[rows] = static_cast<int32_t>(seq.num_computed + 1);
    out.query_start[rows + 1] = rows + 1;
    const int32_t own_blocks = static_cast<int32_t>(seq.table.blocks.size());
    table_width = std::max(table_width, static_cast<int32_t>(seq.shared_len / bs) + own_blocks);
    suffix_width = std::max(suffix_width, own_blocks);
    ++rows;
    ++seq.num_computed;
    if (n_out > 0) ++decode_with_output;
    if (cache) register_computed_blocks(seq);
  }
  out.input_ids.resize(rows);
  out.positions.resize(rows);
  out.slot_mapping.resize(rows);
  out.sample_rows.resize(rows);
  out.sample_seq_ids.resize(rows);
  out.sample_requests.resize(rows);
  out.sample_indices.resize(rows);
  out.sample_output_lens.resize(rows);
  entries.resize(rows);
  out.seq_ids.resize(rows);
  out.context_lens.resize(rows);
  out.query_start.resize(rows + 1);
  decode_table_width = table_width;
  decode_suffix_width = suffix_width;
  out.num_prefill_tokens = rows - decode_with_output;
}

int64_t Scheduler::Impl::decode_slot(int64_t id, int32_t* cow_src, int32_t* cow_dst) {
  Sequence& seq = seqs[id];
  const int64_t slot = blocks.append_slot(seq.table, cow_src, cow_dst);  // the common case: room in its block
  if (slot >= 0) return slot;
  if (make_room(blocks.blocks_needed_to_append(seq.table, 1), true, id, &seq.table, 1))
    return blocks.append_slot(seq.table, cow_src, cow_dst);
  // Overlapped, alone and its sample not known: it may be stopping; decide after the commit.
  if (overlapping && running.size() == 1 && seq.pending_pos >= 0) return -1;
  // It is the latest running sequence in run order: step aside, or fail when nothing else holds blocks.
  if (running.size() == 1) {
    fail_request(seq.request, "sequence of " + std::to_string(seq.len()) +
                                  " tokens needs more KV blocks than the cache has (" +
                                  std::to_string(config.num_blocks) + ")");
  } else {
    preempt(id);
    running.pop_back();
  }
  return -1;
}

void Scheduler::Impl::schedule_running_prefills() {
  for (int64_t id : prefill_candidates) {
    if (budget_left <= 0) break;
    if (seqs[id].status == SeqStatus::kRunning) schedule_prefill(id);
  }
}

void Scheduler::Impl::admit_new() {
  while (budget_left > 0) {
    const int64_t id = next_waiting();
    if (id < 0) break;
    const AdmitResult result = try_admit(id, running.empty());
    if (result == AdmitResult::kNoRoom) break;
    if (result == AdmitResult::kAdmitted) schedule_prefill(id);
  }
}

bool Scheduler::Impl::unstick() {
  if (running.size() > 1) {
    preempt(running.back());
    running.pop_back();
    return true;
  }
  if (running.size() == 1) {
    // Alone, with every evictable and idle block already released by make_room: it cannot fit.
    const Sequence& seq = seqs[running.front()];
    fail_request(seq.request, "sequence of " + std::to_string(seq.len()) +
                                  " tokens needs more KV blocks than the cache has (" +
                                  std::to_string(config.num_blocks) + ")");
    return true;
  }
  return false;
}

bool Scheduler::Impl::schedule_node_chunks(int32_t deepest) {
  int32_t chain[64];
  int depth = 0;
  for (int32_t n = deepest; n >= 0 && depth < 64; n = plan.nodes[n].parent) chain[depth++] = n;
  const int bs = config.block_size;
  for (int d = depth - 1; d >= 0; --d) {
    const int32_t n = chain[d];
    NodeState& state = nodes[n];
    const PlanNode& pn = plan.nodes[n];
    if (state.num_computed >= pn.end) continue;
    if (budget_left <= 0) return false;
    const int64_t chunk = std::min(pn.end - state.num_computed, budget_left);
    const int32_t* src = job.tokens.data() + job.offsets[pn.source_request];
    for (int64_t t = state.num_computed; t < state.num_computed + chunk; ++t) {
      const int64_t local = t - pn.begin;
      out.input_ids.push_back(src[t]);
      out.positions.push_back(static_cast<int32_t>(t));
      out.slot_mapping.push_back(static_cast<int64_t>(state.blocks[local / bs]) * bs + local % bs);
    }
    state.num_computed += chunk;
    budget_left -= chunk;
    out.num_prefill_tokens += chunk;
    entries.push_back({-1, n, static_cast<int32_t>(chunk)});
    if (state.num_computed < pn.end) return false;  // members wait for the rest of their prefix
  }
  return true;
}

bool Scheduler::Impl::schedule_prefill(int64_t id) {
  Sequence& seq = seqs[id];
  if (seq.node >= 0 && !schedule_node_chunks(seq.node)) return false;
  const int64_t chunk = std::min(seq.len() - seq.num_computed, budget_left);
  if (chunk <= 0) return false;
  const int64_t need = blocks.blocks_needed_to_append(seq.table, chunk);
  if (need > blocks.num_free_blocks()) make_room(need, false, id, &seq.table, chunk);  // a prefill never preempts: it shrinks
  int64_t appended = 0;
  for (; appended < chunk; ++appended) {
    int32_t cow_src = -1, cow_dst = -1;
    const int64_t slot = blocks.append_slot(seq.table, &cow_src, &cow_dst);
    if (slot < 0) break;
    if (cow_src >= 0) {
      out.cow_src.push_back(cow_src);
      out.cow_dst.push_back(cow_dst);
    }
    const int64_t t = seq.num_computed + appended;
    out.input_ids.push_back(seq.token(t));
    out.positions.push_back(static_cast<int32_t>(t));
    out.slot_mapping.push_back(slot);
  }
  if (appended == 0) return false;
  seq.table_changed = true;
  seq.num_computed += appended;
  budget_left -= appended;
  out.num_prefill_tokens += appended;
  entries.push_back({id, -1, static_cast<int32_t>(appended)});
  if (seq.num_computed == seq.len()) emit_samples(id, static_cast<int32_t>(out.input_ids.size()) - 1);
  if (cache) register_computed_blocks(seq);
  return true;
}

void Scheduler::Impl::emit_samples(int64_t id, int32_t row) {
  const Sequence& seq = seqs[id];
  auto emit = [&](int64_t sid) {
    out.sample_rows.push_back(row);
    out.sample_seq_ids.push_back(sid);
    out.sample_requests.push_back(seqs[sid].request);
    out.sample_indices.push_back(seqs[sid].sample);
    out.sample_output_lens.push_back(static_cast<int32_t>(seqs[sid].output.size()));
  };
  emit(id);
  if (seq.unforked == 0) return;
  // The n samples of a prompt draw from its last row: one sample row per waiting sibling.
  const int64_t first = request_first_seq[seq.request];
  for (int64_t sid = first; sid < first + job.num_samples[seq.request]; ++sid)
    if (seqs[sid].status == SeqStatus::kAwaitingLeader) emit(sid);
}

void Scheduler::Impl::register_computed_blocks(Sequence& seq) {
  const int bs = config.block_size;
  int64_t full = seq.num_computed / bs;
  // A block holding an uncommitted sample is hashed once that sample is known (a later call).
  if (seq.pending_pos >= 0) full = std::min(full, (seq.prompt_len + seq.pending_pos) / bs);
  if (seq.num_registered >= full) return;
  int32_t tokens[1024];
  std::vector<int32_t> big;
  int32_t* buf = tokens;
  if (bs > 1024) {
    big.resize(bs);
    buf = big.data();
  }
  for (; seq.num_registered < full; ++seq.num_registered) {
    const int64_t first = seq.num_registered * bs;
    for (int i = 0; i < bs; ++i) buf[i] = seq.token(first + i);
    const uint64_t h = hash_block(seq.last_hash, buf, bs);
    cache->insert(h, buf, seq.table.blocks[seq.num_registered]);
    seq.last_hash = h;
  }
}

}  // namespace batchllm
