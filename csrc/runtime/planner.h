// Planner: turns a whole job into shared-prefix nodes and a run order (internal to the scheduler).
#pragma once

#include <cstdint>
#include <vector>

#include "batchllm/scheduler.h"

namespace batchllm {

/// A shared prefix whose KV is computed once: tokens [begin, end) of every reader, where begin is the
/// parent's end (0 at top). begin and end are multiples of the block size; end <= prompt_len - 1 for
/// every reader so each reader still computes at least its last prompt token itself.
struct PlanNode {
  int32_t parent = -1;          ///< enclosing node, -1 at top; parents come before children
  int32_t depth = 0;
  int64_t begin = 0;
  int64_t end = 0;
  int64_t source_request = 0;   ///< a reader whose prompt supplies the tokens
  int64_t num_readers = 0;      ///< sequences (samples) that read it
  bool is_sample_group = false; ///< the n samples of one prompt (not a prefix of several prompts)
};

/// A top-level prefix group (or one lone request) and its planned work.
struct PlanGroup {
  int32_t root = -1;            ///< top-level node, -1 for a request that shares nothing
  int64_t first = 0;            ///< its requests are order[first, last)
  int64_t last = 0;
  int64_t prefill_tokens = 0;   ///< shared prefixes once + every member's own prompt part
  int64_t decode_tokens = 0;    ///< sum of n * max_tokens
};

struct JobPlan {
  std::vector<PlanNode> nodes;
  std::vector<int32_t> request_node;  ///< [N] deepest node each request reads, -1 for none
  std::vector<int64_t> order;         ///< requests in run order; a node's readers are contiguous
  std::vector<PlanGroup> groups;      ///< in run order
  int64_t prefill_tokens = 0;         ///< total planned prefill (no recompute)

  /// Tokens of request r covered by its shared prefixes.
  int64_t shared_len(int64_t request) const {
    const int32_t node = request_node[request];
    return node < 0 ? 0 : nodes[node].end;
  }
};

/// batchllm: multi-level prefix groups from the radix tree, n > 1 samples as a group over the
/// prompt, groups ordered by decode/prefill ratio (descending, ties by first input index).
/// Other policies: no nodes, input order.
JobPlan plan_job(const JobRequests& job, int block_size, SchedulePolicy policy, int max_depth);

}  // namespace batchllm
