// Scheduler: turns the scheduled entries of a step into the StepPlan's sequence, block-table and
// decode-level arrays.
//
// The two table matrices dominate a steady decode step (1,024 rows x context blocks). When a step of
// decodes alone runs the same sequences in the same order as the previous step, their rows are kept
// and only rows of sequences whose own table changed (Sequence::table_changed: a new block, a copy-on-
// write, an admission or fork) are rewritten, without reading the kept rows; widths are
// rounded up so the matrices are rebuilt only every kWidthQuantum blocks of growth.
#include <algorithm>
#include <stdexcept>

#include "runtime/scheduler_state.h"

namespace batchllm {
namespace {

constexpr int32_t kWidthQuantum = 8;

int32_t round_width(int32_t w) { return (w + kWidthQuantum - 1) / kWidthQuantum * kWidthQuantum; }

// resize() after clear() would allocate exactly what is asked each time a table widens; grow
// geometrically instead so steady decode (tables widen by a block now and then) stops allocating.
void resize_with_headroom(std::vector<int32_t>& v, size_t n) {
  if (n > v.capacity()) v.reserve(n + n / 2);
  v.resize(n);
}

// Prefix nodes of `deepest`, root first. Returns the count.
int chain_of(const JobPlan& plan, int32_t deepest, int32_t* chain) {
  int depth = 0;
  for (int32_t n = deepest; n >= 0 && depth < 64; n = plan.nodes[n].parent) chain[depth++] = n;
  std::reverse(chain, chain + depth);
  return depth;
}

}  // namespace

void Scheduler::Impl::finalize_plan() {
  const int bs = config.block_size;
  const size_t num_entries = entries.size();
  // ---- per-sequence arrays and the widest block table
  // Decode rows' seq_ids, context_lens, query_start and widths were written by schedule_decodes.
  int32_t width = decode_table_width;
  int32_t row = out.num_decode_seqs;
  bool all_seqs = true;
  for (size_t s = static_cast<size_t>(out.num_decode_seqs); s < num_entries; ++s) {
    const StepEntry& e = entries[s];
    int32_t table_blocks;
    if (e.seq >= 0) {
      const Sequence& seq = seqs[e.seq];
      out.seq_ids.push_back(e.seq);
      out.context_lens.push_back(static_cast<int32_t>(seq.num_computed));
      table_blocks = static_cast<int32_t>(seq.shared_len / bs + seq.table.blocks.size());
    } else {
      all_seqs = false;
      out.seq_ids.push_back(-1 - static_cast<int64_t>(e.node));
      out.context_lens.push_back(static_cast<int32_t>(nodes[e.node].num_computed));
      table_blocks = static_cast<int32_t>(blocks.blocks_for_tokens(nodes[e.node].num_computed));
    }
    width = std::max(width, table_blocks);
    row += e.num_rows;
    out.query_start.push_back(row);
  }
  width = round_width(width);
  // Only a step of decodes alone may keep rows: a sequence preempted and re-admitted within one
  // next_step keeps its place in the order but not its blocks, and it shows up as a prefill entry.
  const bool all_decodes = all_seqs && out.num_decode_seqs == static_cast<int32_t>(num_entries);
  const bool same_rows = all_decodes && width == kept_table_width && out.seq_ids == kept_seq_ids &&
                         out.block_tables.size() == num_entries * static_cast<size_t>(width);
  out.max_blocks = width;
  if (!same_rows) resize_with_headroom(out.block_tables, num_entries * static_cast<size_t>(width));
  int32_t chain[64];
  for (size_t s = 0; s < num_entries; ++s) {
    const StepEntry& e = entries[s];
    int32_t* row_begin = out.block_tables.data() + s * width;
    if (same_rows && !seqs[e.seq].table_changed) continue;  // the row still holds exactly its blocks
    if (e.seq >= 0 && s >= static_cast<size_t>(out.num_decode_seqs)) seqs[e.seq].table_changed = false;
    const int depth = chain_of(plan, e.seq >= 0 ? seqs[e.seq].node : e.node, chain);
    int32_t* dst = row_begin;
    if (e.seq >= 0) {
      for (int d = 0; d < depth; ++d) dst = std::copy(nodes[chain[d]].blocks.begin(), nodes[chain[d]].blocks.end(), dst);
      dst = std::copy(seqs[e.seq].table.blocks.begin(), seqs[e.seq].table.blocks.end(), dst);
    } else {
      // A prefix chunk sees its node's blocks only up to what is computed (the rest is allocated, unwritten).
      int32_t* limit = row_begin + blocks.blocks_for_tokens(nodes[e.node].num_computed);
      for (int d = 0; d < depth && dst < limit; ++d) {
        const std::vector<int32_t>& nb = nodes[chain[d]].blocks;
        const size_t take = std::min<size_t>(nb.size(), static_cast<size_t>(limit - dst));
        dst = std::copy(nb.begin(), nb.begin() + take, dst);
      }
    }
    std::fill(dst, row_begin + width, -1);
  }
  kept_seq_ids.assign(out.seq_ids.begin(), out.seq_ids.end());
  kept_table_width = width;
  build_decode_levels();  // clears table_changed of the decode rows
  out.nano_batch_offsets.push_back(0);
  out.nano_batch_offsets.push_back(static_cast<int32_t>(out.num_tokens()));
}

int32_t Scheduler::Impl::open_level(int32_t node, int32_t row) {
  NodeState& state = nodes[node];
  if (state.level_step != step_index) {  // first reader this step: the level starts here
    state.level_step = step_index;
    state.level_index = static_cast<int32_t>(out.prefix_kv_lens.size());
    out.prefix_kv_blocks.insert(out.prefix_kv_blocks.end(), state.blocks.begin(), state.blocks.end());
    out.prefix_kv_indptr.push_back(static_cast<int32_t>(out.prefix_kv_blocks.size()));
    const int32_t len = static_cast<int32_t>(plan.nodes[node].end - plan.nodes[node].begin);
    out.prefix_kv_lens.push_back(len);
    out.prefix_q_range.push_back(row);
    out.prefix_q_range.push_back(row + 1);
    out.decode_kv_tokens_read += len;
  } else {
    int32_t& range_end = out.prefix_q_range[2 * state.level_index + 1];
    if (range_end != row) throw std::logic_error("decode rows of a shared prefix are not contiguous");
    range_end = row + 1;
  }
  return state.level_index;
}

void Scheduler::Impl::build_decode_levels() {
  // ---- each shared prefix once, with the contiguous decode rows that read it; then own (suffix) KV
  const int32_t num_decode = out.num_decode_seqs;
  const int32_t width = round_width(decode_suffix_width);
  const bool same_rows = num_decode == static_cast<int32_t>(entries.size()) && width == kept_suffix_width &&
                         num_decode == kept_suffix_rows &&
                         std::equal(out.seq_ids.begin(), out.seq_ids.begin() + num_decode, kept_suffix_seq_ids.begin(),
                                    kept_suffix_seq_ids.end());
  out.max_suffix_blocks = width;
  if (!same_rows) resize_with_headroom(out.suffix_block_tables, static_cast<size_t>(num_decode) * width);
  out.prefix_kv_indptr.push_back(0);
  int32_t chain[64];
  // The rows of a group come in a run: a row with the previous row's deepest prefix only extends
  // the ranges of that run's levels, without walking the chain again.
  int32_t run_node = -2;
  int run_depth = 0;
  int32_t run_levels[64];
  for (int32_t i = 0; i < num_decode; ++i) {
    Sequence& seq = seqs[entries[i].seq];
    if (seq.node == run_node) {
      for (int d = 0; d < run_depth; ++d) out.prefix_q_range[2 * run_levels[d] + 1] = i + 1;
    } else {
      run_node = seq.node;
      run_depth = chain_of(plan, seq.node, chain);
      for (int d = 0; d < run_depth; ++d) run_levels[d] = open_level(chain[d], i);
    }
    int32_t* row_begin = out.suffix_block_tables.data() + static_cast<size_t>(i) * width;
    if (!same_rows || seq.table_changed) {
      int32_t* dst = std::copy(seq.table.blocks.begin(), seq.table.blocks.end(), row_begin);
      std::fill(dst, row_begin + width, -1);
    }
    seq.table_changed = false;
    out.suffix_kv_lens.push_back(static_cast<int32_t>(seq.table.num_tokens));
    out.decode_kv_tokens_read += seq.table.num_tokens;
    out.decode_kv_tokens_unshared += seq.num_computed;
  }
  kept_suffix_seq_ids.assign(out.seq_ids.begin(), out.seq_ids.begin() + num_decode);
  kept_suffix_rows = num_decode;
  kept_suffix_width = width;
}

}  // namespace batchllm
