// Prefix tree build, topology and stats. Grouping lives in prefix_tree_grouping.cpp.
#include "batchllm/prefix_tree.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "runtime/prefix_tree_impl.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace batchllm {
namespace detail {

void TokenArena::FreeChunk::operator()(int32_t* p) const { std::free(p); }

int32_t* TokenArena::new_chunk(int64_t tokens) {
  constexpr size_t kHugePage = size_t{2} << 20;
  size_t bytes = static_cast<size_t>(tokens) * sizeof(int32_t);
  void* p;
  if (bytes >= kHugePage) {
    bytes = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    p = std::aligned_alloc(kHugePage, bytes);
#ifdef MADV_HUGEPAGE
    if (p != nullptr) madvise(p, bytes, MADV_HUGEPAGE);  // advice only: failure just means 4 KiB pages
#endif
  } else {
    p = std::malloc(bytes);
  }
  if (p == nullptr) throw std::bad_alloc();
  chunks_.emplace_back(static_cast<int32_t*>(p));
  capacity_tokens_ += static_cast<int64_t>(bytes / sizeof(int32_t));
  return chunks_.back().get();
}

const int32_t* TokenArena::store(const int32_t* src, int64_t n) {
  int32_t* out;
  if (n >= kChunkTokens) {  // a very long run gets a chunk of its own; the current chunk stays open
    out = new_chunk(n);
  } else {
    if (n > left_) {  // abandons < n tokens at the end of the chunk: bounded waste
      // Chunks double from 16K tokens up to kChunkTokens: small jobs stay small, big ones allocate rarely.
      const int64_t size = std::min(kChunkTokens, std::max<int64_t>(int64_t{1} << 14, capacity_tokens_));
      const int64_t chunk = std::max(size, n);
      cursor_ = new_chunk(chunk);
      left_ = chunk;
    }
    out = cursor_;
    cursor_ += n;
    left_ -= n;
  }
  std::memcpy(out, src, static_cast<size_t>(n) * sizeof(int32_t));
  return out;
}

ChildIndex::ChildIndex() : slots_(1024, Slot{0, -1}), mask_(1023) {}

size_t ChildIndex::probe(uint64_t key) const {
  size_t i = static_cast<size_t>(hash(key)) & mask_;
  while (slots_[i].child >= 0 && slots_[i].key != key) i = (i + 1) & mask_;
  return i;
}

int32_t ChildIndex::find(int32_t parent, int32_t token) const {
  return slots_[probe(make_key(parent, token))].child;
}

void ChildIndex::insert(int32_t parent, int32_t token, int32_t child) {
  if ((size_ + 1) * 2 > slots_.size()) grow();  // load <= 1/2 keeps probe chains short
  const uint64_t key = make_key(parent, token);
  slots_[probe(key)] = Slot{key, child};
  ++size_;
}

void ChildIndex::reassign(int32_t parent, int32_t token, int32_t child) {
  slots_[probe(make_key(parent, token))].child = child;
}

void ChildIndex::grow() {
  std::vector<Slot> old(slots_.size() * 2, Slot{0, -1});
  old.swap(slots_);
  mask_ = slots_.size() - 1;
  for (const Slot& s : old) {
    if (s.child >= 0) slots_[probe(s.key)] = s;
  }
}

namespace {

/// Length of the common prefix of a[0:n) and b[0:n). memcmp on 64-token blocks runs at memory speed
/// on the long shared runs this tree exists for; the scalar tail finds the exact mismatch.
int64_t common_prefix(const int32_t* a, const int32_t* b, int64_t n) {
  constexpr int64_t kBlock = 64;
  int64_t i = 0;
  while (i + kBlock <= n && std::memcmp(a + i, b + i, kBlock * sizeof(int32_t)) == 0) i += kBlock;
  while (i < n && a[i] == b[i]) ++i;
  return i;
}

}  // namespace
}  // namespace detail

int32_t PrefixTree::Impl::split(int32_t node, int64_t length) {
  if (nodes.size() >= static_cast<size_t>(std::numeric_limits<int32_t>::max()))
    throw std::length_error("PrefixTree: more than 2^31 - 1 nodes");
  detail::TreeNode middle;
  middle.edge = nodes[node].edge;
  middle.depth = nodes[nodes[node].parent].depth + length;
  middle.parent = nodes[node].parent;
  const int32_t id = static_cast<int32_t>(nodes.size());
  nodes.push_back(middle);
  detail::TreeNode& lower = nodes[node];
  children.reassign(lower.parent, lower.edge[0], id);
  lower.edge += length;
  lower.parent = id;
  children.insert(id, lower.edge[0], node);
  return id;
}

bool PrefixTree::Impl::insert_one(const int32_t* prompt, int64_t length) {
  // Walk down without changing anything; the tree changes only at the end (one split and/or one new
  // leaf), after the new run's token ids were checked.
  int32_t node = 0;
  int64_t pos = 0;
  int32_t split_child = -1;  // the edge the prompt leaves (or ends) inside, split at split_at tokens
  int64_t split_at = 0;
  while (pos < length) {
    const int32_t child = children.find(node, prompt[pos]);
    if (child < 0) break;
    const int64_t edge = edge_length(child);
    const int64_t matched =
        detail::common_prefix(nodes[child].edge, prompt + pos, std::min(edge, length - pos));
    pos += matched;
    if (matched < edge) {
      split_child = child;
      split_at = matched;
      break;
    }
    node = child;
  }
  if (pos < length) {
    int32_t smallest = 0;
    for (int64_t i = pos; i < length; ++i) smallest = std::min(smallest, prompt[i]);
    if (smallest < 0) return false;
  }
  const size_t new_nodes = (split_child >= 0 ? 1 : 0) + (pos < length ? 1 : 0);
  if (nodes.size() + new_nodes > static_cast<size_t>(std::numeric_limits<int32_t>::max()))
    throw std::length_error("PrefixTree: more than 2^31 - 1 nodes");
  if (split_child >= 0) node = split(split_child, split_at);
  if (pos < length) {  // nothing shares the rest: one new leaf holds it
    detail::TreeNode leaf;
    leaf.edge = arena.store(prompt + pos, length - pos);
    leaf.depth = nodes[node].depth + (length - pos);
    leaf.parent = node;
    const int32_t id = static_cast<int32_t>(nodes.size());
    nodes.push_back(leaf);
    children.insert(node, prompt[pos], id);
    node = id;
  }
  ++nodes[node].num_ends;
  request_node.push_back(node);
  prompt_tokens += length;
  return true;
}

std::vector<int32_t> PrefixTree::Impl::prompt(int64_t request) const {
  const int32_t end = request_node[request];
  std::vector<int32_t> out(static_cast<size_t>(nodes[end].depth));
  for (int32_t v = end; v > 0; v = nodes[v].parent) {
    const int64_t begin = nodes[nodes[v].parent].depth;
    std::copy(nodes[v].edge, nodes[v].edge + (nodes[v].depth - begin), out.begin() + begin);
  }
  return out;
}

detail::TreeTopology PrefixTree::Impl::topology() const {
  const size_t n = nodes.size();
  detail::TreeTopology topo;
  topo.child_begin.assign(n + 1, 0);
  for (size_t i = 1; i < n; ++i) ++topo.child_begin[nodes[i].parent + 1];
  for (size_t i = 0; i < n; ++i) topo.child_begin[i + 1] += topo.child_begin[i];
  topo.child_list.resize(n > 0 ? n - 1 : 0);
  {
    std::vector<int32_t> fill(topo.child_begin.begin(), topo.child_begin.end() - 1);
    for (size_t i = 1; i < n; ++i) topo.child_list[fill[nodes[i].parent]++] = static_cast<int32_t>(i);
  }
  auto make_preorder = [&] {
    topo.preorder.clear();
    topo.preorder.reserve(n);
    std::vector<int32_t> stack{0};
    while (!stack.empty()) {
      const int32_t v = stack.back();
      stack.pop_back();
      topo.preorder.push_back(v);
      for (int32_t k = topo.child_begin[v + 1] - 1; k >= topo.child_begin[v]; --k)
        stack.push_back(topo.child_list[k]);
    }
  };
  make_preorder();

  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  topo.subtree_requests.assign(n, 0);
  topo.min_request.assign(n, kNone);
  topo.min_length.assign(n, kNone);
  for (size_t r = 0; r < request_node.size(); ++r) {
    const int32_t v = request_node[r];
    if (topo.min_request[v] == kNone) topo.min_request[v] = static_cast<int64_t>(r);
  }
  for (size_t i = 0; i < n; ++i) {
    topo.subtree_requests[i] = nodes[i].num_ends;
    if (nodes[i].num_ends > 0) topo.min_length[i] = nodes[i].depth;
  }
  for (size_t k = n; k-- > 1;) {  // reverse preorder: children before parents
    const int32_t v = topo.preorder[k];
    const int32_t p = nodes[v].parent;
    topo.subtree_requests[p] += topo.subtree_requests[v];
    topo.min_request[p] = std::min(topo.min_request[p], topo.min_request[v]);
    topo.min_length[p] = std::min(topo.min_length[p], topo.min_length[v]);
  }
  // Canonical child order (input order of the first request below each child), then the final preorder.
  for (size_t v = 0; v < n; ++v) {
    std::sort(topo.child_list.begin() + topo.child_begin[v], topo.child_list.begin() + topo.child_begin[v + 1],
              [&](int32_t a, int32_t b) { return topo.min_request[a] < topo.min_request[b]; });
  }
  make_preorder();
  return topo;
}

PrefixTree::PrefixTree() : impl_(std::make_unique<Impl>()) {}
PrefixTree::~PrefixTree() = default;
PrefixTree::PrefixTree(PrefixTree&&) noexcept = default;
PrefixTree& PrefixTree::operator=(PrefixTree&&) noexcept = default;

void PrefixTree::insert(const int32_t* tokens, const int64_t* offsets, int64_t num_prompts) {
  if (num_prompts < 0) throw std::invalid_argument("num_prompts must be >= 0");
  for (int64_t i = 0; i < num_prompts; ++i) {
    if (offsets[i] < 0 || offsets[i + 1] < offsets[i])
      throw std::invalid_argument("offsets must be >= 0 and non-decreasing (at prompt " + std::to_string(i) + ")");
  }
  const int64_t before = num_requests();
  impl_->request_node.reserve(impl_->request_node.size() + static_cast<size_t>(num_prompts));
  for (int64_t i = 0; i < num_prompts; ++i) {
    const int32_t* prompt = tokens + offsets[i];
    const int64_t length = offsets[i + 1] - offsets[i];
    if (impl_->insert_one(prompt, length)) continue;
    // All or nothing: rebuild the tree as it was before this call (rare path, O(tree tokens)).
    if (num_requests() > before) {
      auto kept = std::make_unique<Impl>();
      for (int64_t r = 0; r < before; ++r) {
        const std::vector<int32_t> p = impl_->prompt(r);
        kept->insert_one(p.data(), static_cast<int64_t>(p.size()));
      }
      impl_ = std::move(kept);
    }
    const int64_t bad = std::find_if(prompt, prompt + length, [](int32_t t) { return t < 0; }) - prompt;
    throw std::invalid_argument("token ids must be >= 0: prompt " + std::to_string(i) + " holds " +
                                std::to_string(prompt[bad]) + " at position " + std::to_string(bad));
  }
}

int64_t PrefixTree::num_requests() const { return static_cast<int64_t>(impl_->request_node.size()); }

int64_t PrefixTree::prompt_length(int64_t request) const {
  if (request < 0 || request >= num_requests())
    throw std::out_of_range("request " + std::to_string(request) + " out of range");
  return impl_->nodes[impl_->request_node[request]].depth;
}

PrefixTreeStats PrefixTree::stats(const SharingPlan& plan) const {
  const Impl& t = *impl_;
  PrefixTreeStats s;
  s.requests = num_requests();
  s.prompt_tokens = t.prompt_tokens;
  s.nodes = static_cast<int64_t>(t.nodes.size());
  s.groups = static_cast<int64_t>(plan.prefixes.size());
  for (size_t i = 0; i < plan.prefixes.size(); ++i) {
    const SharedPrefix& p = plan.prefixes[i];
    if (p.begin < 0 || p.end < p.begin)
      throw std::invalid_argument("stats: prefix " + std::to_string(i) + " has begin > end");
    for (int64_t r : p.requests) {
      if (r < 0 || r >= s.requests)
        throw std::invalid_argument("stats: prefix " + std::to_string(i) + " names unknown request " +
                                    std::to_string(r));
      if (p.end > prompt_length(r))
        throw std::invalid_argument("stats: prefix " + std::to_string(i) + " is longer than request " +
                                    std::to_string(r) + "'s prompt");
    }
    // Computed once instead of once per reader.
    if (!p.requests.empty())
      s.shared_tokens += (p.end - p.begin) * static_cast<int64_t>(p.requests.size() - 1);
  }
  s.prefill_tokens = s.prompt_tokens - s.shared_tokens;
  s.memory_bytes = static_cast<int64_t>(t.nodes.capacity() * sizeof(detail::TreeNode) +
                                        t.request_node.capacity() * sizeof(int32_t)) +
                   t.arena.memory_bytes() + t.children.memory_bytes();
  return s;
}

}  // namespace batchllm
