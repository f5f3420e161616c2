// Prefix tree -> SharingPlan: BatchLLM single-level groups and the multi-level structure.
//
// Rules shared with the plain-Python reference (python/batchllm_core/reference/prefix_tree.py), which
// tests compare against:
// - a shared prefix never covers a member's whole prompt (capped at prompt_len - 1: the scheduler
//   must compute at least the last prompt token of every request to get its logits), and is then
//   cut down to a multiple of block_size;
// - a prefix read by fewer than two requests, or shorter than max(block_size, min_prefix_tokens)
//   (per level for the multi-level structure), is not shared: its readers stay with the enclosing level.
#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

#include "batchllm/prefix_tree.h"
#include "runtime/prefix_tree_impl.h"

namespace batchllm {
namespace {

constexpr int64_t kNone = std::numeric_limits<int64_t>::max();

int64_t round_down(int64_t tokens, int block_size) { return tokens <= 0 ? 0 : tokens / block_size * block_size; }

void check_block_size(int block_size, int64_t min_prefix_tokens) {
  if (block_size < 1) throw std::invalid_argument("block_size must be >= 1, got " + std::to_string(block_size));
  if (min_prefix_tokens < 0)
    throw std::invalid_argument("min_prefix_tokens must be >= 0, got " + std::to_string(min_prefix_tokens));
}

/// BatchLLM's first-level enlargement (vllm/inputs/prefix_clustering.py, _enlarge_1st_prefix_tokens),
/// bottom-up and without recursion. Every node c starts as an "item" in its parent v's list; after c's
/// own subtree is done, each item g in c's list moves up into v's list when
///     gain = (leaves(g) - 1) * |g| - |c| > 0
/// (|g|: tokens g adds below c; |c|: tokens c adds below v): sharing g's run among its readers saves
/// more than computing c's run once more costs. An item left with one child item and no prompt of
/// its own runs on into that child (its readers share the longer prefix). An emptied item vanishes;
/// this equals BatchLLM merging the last child in (same readers, same prefix), so the outcome does
/// not depend on the order items are visited.
/// Returns, per node, the top-level item whose group its prompts join (-1 for the root).
std::vector<int32_t> first_level_heads(const std::vector<detail::TreeNode>& nodes,
                                       const detail::TreeTopology& topo) {
  const size_t n = nodes.size();
  std::vector<int32_t> owner(n), effective(n), list_head(n, -1), next_item(n, -1);
  std::vector<int64_t> direct(n), leaves(n, 0);
  for (size_t v = 0; v < n; ++v) {
    owner[v] = nodes[v].parent;  // the node whose item list holds v's item
    effective[v] = static_cast<int32_t>(v);
    direct[v] = nodes[v].num_ends;
  }
  auto depth = [&](int32_t v) { return nodes[v].depth; };
  for (size_t k = n; k-- > 0;) {  // reverse preorder: every child is finished before its parent
    const int32_t v = topo.preorder[k];
    int32_t items = -1;
    for (int32_t i = topo.child_begin[v]; i < topo.child_begin[v + 1]; ++i) {
      const int32_t c = topo.child_list[i];
      const int64_t len_c = depth(effective[c]) - depth(v);
      int32_t kept = -1;
      int64_t kept_count = 0, kept_leaves = direct[c];
      for (int32_t g = list_head[c], next; g >= 0; g = next) {
        next = next_item[g];
        const int64_t len_g = depth(effective[g]) - depth(effective[c]);
        if ((leaves[g] - 1) * len_g - len_c > 0) {
          owner[g] = v;
          next_item[g] = items;
          items = g;
        } else {
          next_item[g] = kept;
          kept = g;
          kept_leaves += leaves[g];
          ++kept_count;
        }
      }
      list_head[c] = kept;
      leaves[c] = kept_leaves;
      if (direct[c] == 0 && kept_count == 1) {  // c's readers all go on into one child: share its run too
        effective[c] = effective[kept];
        direct[c] = direct[kept];
        list_head[c] = list_head[kept];
      }
      if (leaves[c] > 0) {
        next_item[c] = items;
        items = c;
      }
    }
    list_head[v] = items;
  }
  // Owners are ancestors, so a preorder pass resolves each node's top-level item.
  std::vector<int32_t> head(n, -1);
  for (size_t k = 1; k < n; ++k) {
    const int32_t v = topo.preorder[k];
    head[v] = owner[v] == 0 ? v : head[owner[v]];
  }
  return head;
}

/// Lowest common ancestor of each query's two nodes, where tin(first) <= tin(second): the deepest
/// node on second's root path whose preorder index is <= first's. One preorder sweep with the root
/// path on a stack (no recursion, no walking up), a binary search per query.
std::vector<int32_t> lowest_common_ancestors(const std::vector<detail::TreeNode>& nodes,
                                             const detail::TreeTopology& topo,
                                             const std::vector<int32_t>& tin,
                                             const std::vector<std::pair<int32_t, int32_t>>& queries) {
  std::vector<int32_t> order(queries.size());
  for (size_t q = 0; q < queries.size(); ++q) order[q] = static_cast<int32_t>(q);
  std::sort(order.begin(), order.end(),
            [&](int32_t a, int32_t b) { return tin[queries[a].second] < tin[queries[b].second]; });
  std::vector<int32_t> answer(queries.size(), 0), path, path_tin;
  size_t next = 0;
  for (size_t k = 0; k < topo.preorder.size() && next < order.size(); ++k) {
    const int32_t v = topo.preorder[k];
    while (!path.empty() && path.back() != nodes[v].parent) {
      path.pop_back();
      path_tin.pop_back();
    }
    path.push_back(v);
    path_tin.push_back(static_cast<int32_t>(k));
    for (; next < order.size() && queries[order[next]].second == v; ++next) {
      const int32_t first_tin = tin[queries[order[next]].first];
      const size_t at = std::upper_bound(path_tin.begin(), path_tin.end(), first_tin) - path_tin.begin();
      answer[order[next]] = path[at - 1];  // path_tin[0] == 0 <= first_tin, so at >= 1
    }
  }
  return answer;
}

}  // namespace

SharingPlan PrefixTree::group_single_level(int block_size, int64_t min_prefix_tokens) const {
  check_block_size(block_size, min_prefix_tokens);
  const Impl& t = *impl_;
  const detail::TreeTopology topo = t.topology();
  const size_t n = t.nodes.size();
  const std::vector<int32_t> head = first_level_heads(t.nodes, topo);

  std::vector<int32_t> tin(n);
  for (size_t k = 0; k < n; ++k) tin[topo.preorder[k]] = static_cast<int32_t>(k);
  // Per group (keyed by head node): readers, shortest prompt, first and last end node in preorder.
  std::vector<int64_t> members(n, 0), min_length(n, kNone);
  std::vector<int32_t> first_end(n, -1), last_end(n, -1);
  for (int32_t v : t.request_node) {
    const int32_t h = head[v];
    if (h < 0) continue;  // empty prompt
    ++members[h];
    min_length[h] = std::min(min_length[h], t.nodes[v].depth);
    if (first_end[h] < 0 || tin[v] < tin[first_end[h]]) first_end[h] = v;
    if (last_end[h] < 0 || tin[v] > tin[last_end[h]]) last_end[h] = v;
  }
  // The group's prefix is its readers' longest common prefix: the depth of their ends' LCA, which
  // can lie below the head when the items that stayed all come from one branch.
  std::vector<std::pair<int32_t, int32_t>> queries;
  std::vector<int32_t> query_head;
  for (size_t h = 0; h < n; ++h) {
    if (members[h] < 2) continue;
    queries.emplace_back(first_end[h], last_end[h]);
    query_head.push_back(static_cast<int32_t>(h));
  }
  const std::vector<int32_t> lca = lowest_common_ancestors(t.nodes, topo, tin, queries);
  const int64_t shortest = std::max<int64_t>(block_size, min_prefix_tokens);
  std::vector<int64_t> prefix_end(n, 0);
  for (size_t q = 0; q < queries.size(); ++q) {
    const int32_t h = query_head[q];
    const int64_t end = round_down(std::min(t.nodes[lca[q]].depth, min_length[h] - 1), block_size);
    if (end >= shortest) prefix_end[h] = end;
  }

  SharingPlan plan;
  plan.request_prefix.assign(t.request_node.size(), -1);
  std::vector<int32_t> index(n, -1);
  for (size_t r = 0; r < t.request_node.size(); ++r) {  // groups in order of their first request
    const int32_t h = head[t.request_node[r]];
    if (h < 0 || prefix_end[h] == 0) continue;
    if (index[h] < 0) {
      index[h] = static_cast<int32_t>(plan.prefixes.size());
      SharedPrefix p;
      p.end = prefix_end[h];
      p.requests.reserve(static_cast<size_t>(members[h]));
      plan.prefixes.push_back(std::move(p));
    }
    plan.prefixes[index[h]].requests.push_back(static_cast<int64_t>(r));
    plan.request_prefix[r] = index[h];
  }
  return plan;
}

SharingPlan PrefixTree::group_multi_level(int block_size, int max_depth, int64_t min_prefix_tokens) const {
  check_block_size(block_size, min_prefix_tokens);
  if (max_depth < 1) throw std::invalid_argument("max_depth must be >= 1, got " + std::to_string(max_depth));
  const Impl& t = *impl_;
  const detail::TreeTopology topo = t.topology();
  const int64_t shortest = std::max<int64_t>(block_size, min_prefix_tokens);
  SharingPlan plan;
  // Every node two or more prompts pass through is a candidate level; top-down, a candidate becomes
  // a level when it adds at least `shortest` tokens to the enclosing one and depth allows.
  std::vector<int32_t> node_prefix(t.nodes.size(), -1);
  for (size_t k = 1; k < topo.preorder.size(); ++k) {
    const int32_t v = topo.preorder[k];
    const int32_t enclosing = node_prefix[t.nodes[v].parent];
    node_prefix[v] = enclosing;
    if (topo.subtree_requests[v] < 2) continue;
    const int32_t level = enclosing < 0 ? 0 : plan.prefixes[enclosing].depth + 1;
    if (level >= max_depth) continue;
    const int64_t begin = enclosing < 0 ? 0 : plan.prefixes[enclosing].end;
    const int64_t end = round_down(std::min(t.nodes[v].depth, topo.min_length[v] - 1), block_size);
    if (end - begin < shortest) continue;
    SharedPrefix p;
    p.parent = enclosing;
    p.depth = level;
    p.begin = begin;
    p.end = end;
    p.requests.reserve(static_cast<size_t>(topo.subtree_requests[v]));
    node_prefix[v] = static_cast<int32_t>(plan.prefixes.size());
    plan.prefixes.push_back(std::move(p));
  }
  plan.request_prefix.assign(t.request_node.size(), -1);
  for (size_t r = 0; r < t.request_node.size(); ++r) {
    const int32_t deepest = node_prefix[t.request_node[r]];
    plan.request_prefix[r] = deepest;
    for (int32_t p = deepest; p >= 0; p = plan.prefixes[p].parent)
      plan.prefixes[p].requests.push_back(static_cast<int64_t>(r));
  }
  return plan;
}

}  // namespace batchllm
