// Planner: radix-tree prefix groups -> PlanNodes, sample groups for n > 1, decode-heavy-first order.
#include "runtime/planner.h"

#include <algorithm>
#include <numeric>

#include "batchllm/prefix_tree.h"

namespace batchllm {
namespace {

int64_t prompt_len(const JobRequests& job, int64_t r) { return job.offsets[r + 1] - job.offsets[r]; }

// Keeps the tree's prefixes that at least two sequences read, merged where a child has exactly its
// parent's readers (two levels with one reader set are one level). Returns old index -> kept index.
std::vector<int32_t> keep_shared_nodes(const SharingPlan& sharing, const std::vector<int32_t>& deepest,
                                       const JobRequests& job, std::vector<PlanNode>& kept) {
  const size_t num = sharing.prefixes.size();
  std::vector<int64_t> readers(num, 0);
  for (size_t r = 0; r < deepest.size(); ++r) {
    for (int32_t n = deepest[r]; n >= 0; n = sharing.prefixes[n].parent) readers[n] += job.num_samples[r];
  }
  std::vector<int32_t> map(num, -1);
  for (size_t i = 0; i < num; ++i) {
    const SharedPrefix& p = sharing.prefixes[i];
    const int32_t kept_parent = p.parent >= 0 ? map[p.parent] : -1;
    if (readers[i] < 2) {
      map[i] = kept_parent;  // too few readers: its readers use the nearest kept ancestor
      continue;
    }
    if (kept_parent >= 0 && kept[kept_parent].num_readers == readers[i]) {
      kept[kept_parent].end = p.end;  // same readers as the parent: extend the parent
      map[i] = kept_parent;
      continue;
    }
    PlanNode node;
    node.parent = kept_parent;
    node.depth = kept_parent >= 0 ? kept[kept_parent].depth + 1 : 0;
    node.begin = kept_parent >= 0 ? kept[kept_parent].end : 0;
    node.end = p.end;
    node.source_request = p.requests.empty() ? 0 : p.requests.front();
    node.num_readers = readers[i];
    map[i] = static_cast<int32_t>(kept.size());
    kept.push_back(node);
  }
  return map;
}

// Deepest tree prefix of each request that still leaves it at least its last prompt token.
std::vector<int32_t> clamp_to_prompts(const SharingPlan& sharing, const JobRequests& job) {
  const int64_t n = job.num_requests();
  std::vector<int32_t> deepest(n, -1);
  for (int64_t r = 0; r < n; ++r) {
    int32_t node = r < static_cast<int64_t>(sharing.request_prefix.size()) ? sharing.request_prefix[r] : -1;
    while (node >= 0 && sharing.prefixes[node].end > prompt_len(job, r) - 1) node = sharing.prefixes[node].parent;
    deepest[r] = node;
  }
  return deepest;
}

void add_sample_groups(const JobRequests& job, int block_size, JobPlan& plan) {
  for (int64_t r = 0; r < job.num_requests(); ++r) {
    if (job.num_samples[r] < 2) continue;
    const int32_t parent = plan.request_node[r];
    const int64_t begin = parent >= 0 ? plan.nodes[parent].end : 0;
    const int64_t end = (prompt_len(job, r) - 1) / block_size * block_size;
    if (end <= begin) continue;  // the samples share their prompt through the leader's forked blocks
    PlanNode node;
    node.parent = parent;
    node.depth = parent >= 0 ? plan.nodes[parent].depth + 1 : 0;
    node.begin = begin;
    node.end = end;
    node.source_request = r;
    node.num_readers = job.num_samples[r];
    node.is_sample_group = true;
    plan.request_node[r] = static_cast<int32_t>(plan.nodes.size());
    plan.nodes.push_back(node);
  }
}

// Depth-first over the kept nodes: a node's own requests, then its children, so that every node's
// readers are contiguous in the order (decode attention levels need contiguous query rows).
void order_groups(const JobRequests& job, JobPlan& plan) {
  const int64_t num_requests = job.num_requests();
  const size_t num_nodes = plan.nodes.size();
  std::vector<std::vector<int32_t>> children(num_nodes);
  std::vector<std::vector<int64_t>> members(num_nodes);
  std::vector<int32_t> roots;
  for (size_t i = 0; i < num_nodes; ++i) {
    if (plan.nodes[i].parent >= 0) children[plan.nodes[i].parent].push_back(static_cast<int32_t>(i));
    else roots.push_back(static_cast<int32_t>(i));
  }
  std::vector<int64_t> lone;
  for (int64_t r = 0; r < num_requests; ++r) {
    if (plan.request_node[r] >= 0) members[plan.request_node[r]].push_back(r);
    else lone.push_back(r);
  }
  struct Pending { PlanGroup group; std::vector<int64_t> requests; int64_t first_input; };
  std::vector<Pending> pending;
  for (int32_t root : roots) {
    Pending p;
    p.group.root = root;
    std::vector<int32_t> stack{root};
    while (!stack.empty()) {
      const int32_t node = stack.back();
      stack.pop_back();
      p.group.prefill_tokens += plan.nodes[node].end - plan.nodes[node].begin;
      p.requests.insert(p.requests.end(), members[node].begin(), members[node].end());
      for (auto it = children[node].rbegin(); it != children[node].rend(); ++it) stack.push_back(*it);
    }
    pending.push_back(std::move(p));
  }
  for (int64_t r : lone) {
    Pending p;
    p.requests.push_back(r);
    pending.push_back(std::move(p));
  }
  for (Pending& p : pending) {
    p.first_input = p.requests.empty() ? 0 : *std::min_element(p.requests.begin(), p.requests.end());
    for (int64_t r : p.requests) {
      p.group.prefill_tokens += prompt_len(job, r) - plan.shared_len(r);
      p.group.decode_tokens += static_cast<int64_t>(job.num_samples[r]) * job.max_tokens[r];
    }
  }
  // Decode-heavy first (BatchLLM): later prefill chunks then fill steps that decodes leave short.
  std::stable_sort(pending.begin(), pending.end(), [](const Pending& a, const Pending& b) {
    const double ra = static_cast<double>(a.group.decode_tokens) / std::max<int64_t>(1, a.group.prefill_tokens);
    const double rb = static_cast<double>(b.group.decode_tokens) / std::max<int64_t>(1, b.group.prefill_tokens);
    if (ra != rb) return ra > rb;
    return a.first_input < b.first_input;
  });
  plan.order.reserve(num_requests);
  for (Pending& p : pending) {
    p.group.first = static_cast<int64_t>(plan.order.size());
    plan.order.insert(plan.order.end(), p.requests.begin(), p.requests.end());
    p.group.last = static_cast<int64_t>(plan.order.size());
    plan.prefill_tokens += p.group.prefill_tokens;
    plan.groups.push_back(p.group);
  }
}

}  // namespace

JobPlan plan_job(const JobRequests& job, int block_size, SchedulePolicy policy, int max_depth) {
  JobPlan plan;
  const int64_t num_requests = job.num_requests();
  plan.request_node.assign(num_requests, -1);
  if (policy != SchedulePolicy::kBatchLLM) {
    plan.order.resize(num_requests);
    std::iota(plan.order.begin(), plan.order.end(), 0);
    PlanGroup all;
    all.last = num_requests;
    for (int64_t r = 0; r < num_requests; ++r) {
      all.prefill_tokens += prompt_len(job, r) * (policy == SchedulePolicy::kNoShare ? job.num_samples[r] : 1);
      all.decode_tokens += static_cast<int64_t>(job.num_samples[r]) * job.max_tokens[r];
    }
    plan.prefill_tokens = all.prefill_tokens;
    plan.groups.push_back(all);
    return plan;
  }
  PrefixTree tree;
  tree.insert(job.tokens.data(), job.offsets.data(), num_requests);
  const SharingPlan sharing = tree.group_multi_level(block_size, max_depth, block_size);
  const std::vector<int32_t> deepest = clamp_to_prompts(sharing, job);
  const std::vector<int32_t> map = keep_shared_nodes(sharing, deepest, job, plan.nodes);
  for (int64_t r = 0; r < num_requests; ++r) plan.request_node[r] = deepest[r] >= 0 ? map[deepest[r]] : -1;
  // A node's tokens come from a request that reads all of it (the tree's first reader may have been
  // clamped away from a merged, longer node).
  for (PlanNode& node : plan.nodes) node.source_request = -1;
  for (int64_t r = 0; r < num_requests; ++r) {
    for (int32_t n = plan.request_node[r]; n >= 0 && plan.nodes[n].source_request < 0; n = plan.nodes[n].parent)
      plan.nodes[n].source_request = r;
  }
  add_sample_groups(job, block_size, plan);
  order_groups(job, plan);
  return plan;
}

}  // namespace batchllm
