// Hash-of-block prefix cache with LRU eviction: the fcfs-lru policy's emulation of vLLM's automatic
// prefix caching (internal to the scheduler).
#pragma once

#include <cstdint>
#include <list>
#include <unordered_map>
#include <vector>

#include "batchllm/block_manager.h"

namespace batchllm {

/// Hash of one full block given its parent's hash (0 for the first block): keys the whole prefix.
uint64_t hash_block(uint64_t parent_hash, const int32_t* tokens, int block_size);

/// Full, computed KV blocks keyed by hash(parent hash, block tokens). The cache holds one reference on
/// every block it knows; a block whose only reference is the cache's sits in an LRU queue and is
/// evicted (returned to the pool) when allocation needs room. Only computed blocks are ever inserted,
/// so a hit is always reusable as is. Tokens are kept and compared, so a hash collision is a miss.
class PrefixCache {
 public:
  PrefixCache(BlockManager& blocks, int block_size) : blocks_(blocks), block_size_(block_size) {}

  /// The cached block holding exactly these tokens after this parent hash, or -1.
  int32_t lookup(uint64_t hash, const int32_t* tokens) const;
  /// A table starts reading a cached block: takes a reference and leaves the LRU queue. Mutates.
  void acquire(int32_t block);
  /// Registers a just-computed full block (no-op when that hash is cached already). Mutates.
  void insert(uint64_t hash, const int32_t* tokens, int32_t block);
  /// Call after a table dropped its reference on `block`: an idle cached block joins the LRU queue.
  void on_released(int32_t block);
  /// Evicts least-recently-used idle blocks until `n` blocks are free in the pool (or none is idle).
  void make_free(int64_t n);
  /// Drops every cached block (job end). Blocks still read by tables stay with their tables.
  void clear();

  int64_t num_cached() const { return static_cast<int64_t>(entries_.size()); }
  int64_t num_evictable() const { return static_cast<int64_t>(lru_.size()); }
  bool contains(int32_t block) const { return by_block_.count(block) != 0; }
  /// Adds the cache's references (one per cached block) to `refs` (indexed by block).
  void add_references(std::vector<int32_t>& refs) const;

 private:
  struct Entry {
    int32_t block;
    std::vector<int32_t> tokens;
  };
  void evict_one();

  BlockManager& blocks_;
  int block_size_;
  std::unordered_map<uint64_t, Entry> entries_;
  std::unordered_map<int32_t, uint64_t> by_block_;
  std::list<int32_t> lru_;  // front = least recently used
  std::unordered_map<int32_t, std::list<int32_t>::iterator> lru_pos_;
};

}  // namespace batchllm
