// Prefix tree over every prompt of a job: the heart of global prefix sharing (BatchLLM).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace batchllm {

/// Sizes of a built tree and what sharing saves.
struct PrefixTreeStats {
  int64_t requests = 0;             ///< prompts inserted
  int64_t prompt_tokens = 0;        ///< sum of prompt lengths
  int64_t prefill_tokens = 0;       ///< tokens to prefill after sharing under the grouping asked for
  int64_t shared_tokens = 0;        ///< prompt_tokens - prefill_tokens
  int64_t groups = 0;               ///< shared prefixes (nodes of the sharing plan)
  int64_t nodes = 0;                ///< radix tree nodes
  int64_t memory_bytes = 0;         ///< memory the tree holds
};

/// One shared prefix: tokens [begin, end) of every request in `requests` (at least two).
/// Levels nest: a child's begin is its parent's end. begin and end are multiples of the block size,
/// and end <= prompt_length - 1 for every reader: a request's last prompt token is never shared, so
/// the scheduler always computes it (its logits start the output).
struct SharedPrefix {
  int32_t parent = -1;              ///< index of the enclosing SharedPrefix in SharingPlan::prefixes, -1 at top
  int32_t depth = 0;                ///< 0 for a top-level prefix
  int64_t begin = 0;                ///< first token of this level (parent's end, 0 at top)
  int64_t end = 0;                  ///< one past the last token of this level
  std::vector<int64_t> requests;    ///< input indices of every request reading it, ascending
};

/// How a job shares: prefixes ordered parents before children (depth-first; siblings in input order of
/// their first reader), and each request's deepest prefix.
struct SharingPlan {
  std::vector<SharedPrefix> prefixes;
  std::vector<int32_t> request_prefix;  ///< per request: deepest SharedPrefix index, or -1 (no sharing)
};

/// A compact radix tree (edges hold token runs; a partial match splits a node) over a job's prompts.
/// Not copyable; movable. Build once, then query; queries do not mutate.
class PrefixTree {
 public:
  PrefixTree();
  ~PrefixTree();
  PrefixTree(const PrefixTree&) = delete;
  PrefixTree& operator=(const PrefixTree&) = delete;
  PrefixTree(PrefixTree&&) noexcept;
  PrefixTree& operator=(PrefixTree&&) noexcept;

  /// Inserts `num_prompts` prompts: prompt i is tokens[offsets[i], offsets[i+1]). Appends to what is there;
  /// request indices continue from num_requests(). The caller guarantees offsets lie within the token
  /// array. All or nothing: a negative token id or decreasing offsets throw std::invalid_argument and
  /// leave the tree as it was. Token ids are checked as they are stored (no separate pass).
  void insert(const int32_t* tokens, const int64_t* offsets, int64_t num_prompts);

  /// BatchLLM single-level groups: first-level prefixes enlarged by the gain rule
  /// ((leaves(g)-1)*|g| - |c| > 0 promotes grandchild g under c), cut to a multiple of block_size;
  /// groups of one request or with a prefix shorter than max(block_size, min_prefix_tokens) are
  /// flattened (their requests share nothing). A group's prefix is its readers' longest common
  /// prefix, capped at (shortest reader prompt - 1), rounded down. Groups in order of first reader.
  /// Throws std::invalid_argument for block_size < 1 or min_prefix_tokens < 0. O(nodes + requests).
  SharingPlan group_single_level(int block_size, int64_t min_prefix_tokens = 0) const;

  /// The full multi-level structure (tree-shaped sharing: system prompt -> few-shot set -> question):
  /// every tree node that two or more prompts pass through is a candidate level ending at its depth
  /// (capped at the shortest prompt below it - 1, rounded down to block_size); top-down, a candidate
  /// becomes a level when it adds at least max(block_size, min_prefix_tokens) tokens to the enclosing
  /// level and the level is < max_depth deep. Throws std::invalid_argument for bad arguments.
  SharingPlan group_multi_level(int block_size, int max_depth = 8, int64_t min_prefix_tokens = 0) const;

  /// Stats of the tree; prefill/shared/groups describe `plan` (pass the plan the job will run):
  /// shared_tokens = sum over prefixes of (end - begin) * (readers - 1). Throws std::invalid_argument
  /// when the plan names unknown requests or a prefix longer than a reader's prompt.
  PrefixTreeStats stats(const SharingPlan& plan) const;

  int64_t num_requests() const;
  int64_t prompt_length(int64_t request) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace batchllm
