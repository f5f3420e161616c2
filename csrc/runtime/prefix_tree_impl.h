// Internal layout of PrefixTree (not part of the embedding surface): nodes, token arena, child index.
//
// Memory layout, chosen for 100,000 prompts x 1,024 tokens in well under a second:
// - nodes live in one vector (24 bytes each), addressed by int32 index; node 0 is the root;
// - edge tokens live in a chunked arena that never moves, so a node points straight at its run and a
//   split is pointer arithmetic; only the part of a prompt that opens a new edge is ever copied;
// - child lookup is one open-addressing hash table keyed by (parent, first token of the edge), so the
//   build makes no per-node allocation; child lists for traversals are built on demand (CSR).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "batchllm/prefix_tree.h"

namespace batchllm {
namespace detail {

/// One radix tree node: the edge from its parent ends here.
struct TreeNode {
  const int32_t* edge = nullptr;  ///< the edge's token run in the arena; nullptr for the root
  int64_t depth = 0;              ///< tokens from the root to the end of this edge
  int32_t parent = -1;            ///< -1 for the root
  int32_t num_ends = 0;           ///< prompts that end exactly here (identical prompts count each)
};

/// Append-only token storage in fixed chunks: stored runs never move.
class TokenArena {
 public:
  /// Copies tokens [src, src + n) and returns where they now live (valid for the arena's lifetime).
  const int32_t* store(const int32_t* src, int64_t n);
  int64_t memory_bytes() const { return capacity_tokens_ * static_cast<int64_t>(sizeof(int32_t)); }

 private:
  struct FreeChunk {
    void operator()(int32_t* p) const;
  };
  /// A chunk of at least `tokens` slots; big chunks are 2 MiB aligned and asked to use huge pages
  /// (a 200 MiB arena otherwise spends a third of the build in 4 KiB page faults).
  int32_t* new_chunk(int64_t tokens);

  static constexpr int64_t kChunkTokens = int64_t{1} << 20;  // 4 MiB: waste per chunk < one prompt
  std::vector<std::unique_ptr<int32_t[], FreeChunk>> chunks_;
  int32_t* cursor_ = nullptr;
  int64_t left_ = 0;
  int64_t capacity_tokens_ = 0;
};

/// (parent node, first token of the edge) -> child node; open addressing, linear probing.
class ChildIndex {
 public:
  ChildIndex();
  /// The child of `parent` whose edge starts with `token`, or -1.
  int32_t find(int32_t parent, int32_t token) const;
  /// Adds a key that is not present.
  void insert(int32_t parent, int32_t token, int32_t child);
  /// Points an existing key at another child (a split puts the new middle node in the old one's place).
  void reassign(int32_t parent, int32_t token, int32_t child);
  int64_t memory_bytes() const { return static_cast<int64_t>(slots_.size() * sizeof(Slot)); }

 private:
  struct Slot {
    uint64_t key;
    int32_t child;  // -1: empty
  };
  static uint64_t make_key(int32_t parent, int32_t token) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(parent)) << 32) | static_cast<uint32_t>(token);
  }
  static uint64_t hash(uint64_t key) {  // splitmix64 finalizer: parents and tokens are both dense ints
    key ^= key >> 30;
    key *= 0xbf58476d1ce4e5b9ULL;
    key ^= key >> 27;
    key *= 0x94d049bb133111ebULL;
    return key ^ (key >> 31);
  }
  size_t probe(uint64_t key) const;  // slot holding key, or the empty slot where it would go
  void grow();

  std::vector<Slot> slots_;
  size_t mask_ = 0;
  size_t size_ = 0;
};

/// Child lists in CSR form, ordered by the smallest request index below each child, and the
/// subtree aggregates every grouping needs. Built on demand from the node array (O(nodes)).
struct TreeTopology {
  std::vector<int32_t> child_begin;     ///< (nodes + 1): children of n are child_list[begin[n]:begin[n+1]]
  std::vector<int32_t> child_list;      ///< (nodes - 1)
  std::vector<int32_t> preorder;        ///< (nodes): parents before children, children in list order
  std::vector<int64_t> subtree_requests;///< (nodes): prompts ending in the subtree
  std::vector<int64_t> min_request;     ///< (nodes): smallest request index in the subtree (INT64_MAX if none)
  std::vector<int64_t> min_length;      ///< (nodes): shortest prompt in the subtree (INT64_MAX if none)
};

}  // namespace detail

struct PrefixTree::Impl {
  std::vector<detail::TreeNode> nodes;
  detail::TokenArena arena;
  detail::ChildIndex children;
  std::vector<int32_t> request_node;  ///< per request: the node its prompt ends at (root: empty prompt)
  int64_t prompt_tokens = 0;

  Impl() { nodes.emplace_back(); }
  int64_t edge_length(int32_t n) const { return nodes[n].depth - nodes[nodes[n].parent].depth; }
  /// Makes a node at `length` tokens into `node`'s edge, in its place under its parent; returns it.
  int32_t split(int32_t node, int64_t length);
  /// Inserts one prompt. Returns false, changing nothing, when it holds a negative token id (only
  /// tokens that open a new edge need the check: a matched token equals an already stored one).
  bool insert_one(const int32_t* prompt, int64_t length);
  /// Prompt of `request` read back from the tree.
  std::vector<int32_t> prompt(int64_t request) const;
  detail::TreeTopology topology() const;
};

}  // namespace batchllm
