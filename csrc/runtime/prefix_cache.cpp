// Hash-of-block LRU prefix cache (fcfs-lru policy). See prefix_cache.h.
#include "runtime/prefix_cache.h"

#include <algorithm>

namespace batchllm {

uint64_t hash_block(uint64_t parent_hash, const int32_t* tokens, int block_size) {
  // FNV-1a over the parent hash and the tokens, then a splitmix finalizer for avalanche.
  uint64_t h = 1469598103934665603ull ^ parent_hash;
  h *= 1099511628211ull;
  for (int i = 0; i < block_size; ++i) {
    h ^= static_cast<uint32_t>(tokens[i]);
    h *= 1099511628211ull;
  }
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebull;
  h ^= h >> 31;
  return h;
}

int32_t PrefixCache::lookup(uint64_t hash, const int32_t* tokens) const {
  auto it = entries_.find(hash);
  if (it == entries_.end()) return -1;
  if (!std::equal(it->second.tokens.begin(), it->second.tokens.end(), tokens)) return -1;
  return it->second.block;
}

void PrefixCache::acquire(int32_t block) {
  auto pos = lru_pos_.find(block);
  if (pos != lru_pos_.end()) {
    lru_.erase(pos->second);
    lru_pos_.erase(pos);
  }
  blocks_.share(block);
}

void PrefixCache::insert(uint64_t hash, const int32_t* tokens, int32_t block) {
  if (entries_.count(hash) || by_block_.count(block)) return;
  blocks_.share(block);
  entries_.emplace(hash, Entry{block, std::vector<int32_t>(tokens, tokens + block_size_)});
  by_block_.emplace(block, hash);
}

void PrefixCache::on_released(int32_t block) {
  if (!by_block_.count(block) || blocks_.refcount(block) != 1 || lru_pos_.count(block)) return;
  lru_pos_.emplace(block, lru_.insert(lru_.end(), block));
}

void PrefixCache::evict_one() {
  const int32_t block = lru_.front();
  lru_.pop_front();
  lru_pos_.erase(block);
  auto hash = by_block_.find(block);
  entries_.erase(hash->second);
  by_block_.erase(hash);
  blocks_.release(block);
}

void PrefixCache::make_free(int64_t n) {
  while (blocks_.num_free_blocks() < n && !lru_.empty()) evict_one();
}

void PrefixCache::clear() {
  while (!lru_.empty()) evict_one();
  for (const auto& [block, hash] : by_block_) blocks_.release(block);
  entries_.clear();
  by_block_.clear();
}

void PrefixCache::add_references(std::vector<int32_t>& refs) const {
  for (const auto& [block, hash] : by_block_) ++refs[block];
}

}  // namespace batchllm
