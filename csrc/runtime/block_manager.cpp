// KV block pool: refcounts, a free stack, copy-on-write on append. See include/batchllm/block_manager.h.
#include "batchllm/block_manager.h"

#include <algorithm>
#include <limits>
#include <sstream>
#include <stdexcept>

namespace batchllm {

BlockManager::BlockManager(int64_t num_blocks, int block_size) : block_size_(block_size) {
  if (block_size < 1) throw std::invalid_argument("block_size must be >= 1");
  if (num_blocks < 0 || num_blocks > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("num_blocks must be in [0, 2^31)");
  refcounts_.assign(static_cast<size_t>(num_blocks), 0);
  free_list_.resize(static_cast<size_t>(num_blocks));
  // Stack with block 0 on top: allocation hands out low ids first, which keeps plans readable.
  for (int64_t i = 0; i < num_blocks; ++i) free_list_[i] = static_cast<int32_t>(num_blocks - 1 - i);
}

int64_t BlockManager::num_blocks() const { return static_cast<int64_t>(refcounts_.size()); }

int64_t BlockManager::num_free_blocks() const { return static_cast<int64_t>(free_list_.size()); }

void BlockManager::check_block(int32_t block) const {
  if (block < 0 || block >= static_cast<int64_t>(refcounts_.size())) {
    throw std::invalid_argument("block id " + std::to_string(block) + " out of range [0, " +
                                std::to_string(refcounts_.size()) + ")");
  }
}

int32_t BlockManager::allocate_block() {
  if (free_list_.empty()) return -1;
  int32_t block = free_list_.back();
  free_list_.pop_back();
  refcounts_[block] = 1;
  return block;
}

bool BlockManager::allocate(int64_t n, std::vector<int32_t>& out) {
  if (n < 0) throw std::invalid_argument("allocate: n must be >= 0");
  if (!can_allocate(n)) return false;
  out.reserve(out.size() + static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out.push_back(allocate_block());
  return true;
}

void BlockManager::share(int32_t block) {
  check_block(block);
  if (refcounts_[block] == 0)
    throw std::invalid_argument("share: block " + std::to_string(block) + " is free");
  ++refcounts_[block];
}

void BlockManager::release(int32_t block) {
  check_block(block);
  if (refcounts_[block] == 0)
    throw std::invalid_argument("release: block " + std::to_string(block) + " is already free");
  if (--refcounts_[block] == 0) free_list_.push_back(block);
}

int32_t BlockManager::refcount(int32_t block) const {
  check_block(block);
  return refcounts_[block];
}

int64_t BlockManager::blocks_needed_to_append(const BlockTable& table, int64_t n) const {
  if (n <= 0) return 0;
  const int64_t first = table.num_tokens / block_size_;            // block the next token lands in
  const int64_t last = (table.num_tokens + n - 1) / block_size_;   // block the last new token lands in
  const int64_t have = static_cast<int64_t>(table.blocks.size());
  int64_t needed = std::max<int64_t>(0, last + 1 - have);
  // Every existing block we would write into that someone else also reads must be copied first.
  for (int64_t b = first; b <= last && b < have; ++b) {
    if (refcounts_[table.blocks[b]] > 1) ++needed;
  }
  return needed;
}

int64_t BlockManager::append_slot(BlockTable& table, int32_t* cow_src, int32_t* cow_dst) {
  if (cow_src) *cow_src = -1;
  if (cow_dst) *cow_dst = -1;
  const int64_t index = table.num_tokens / block_size_;
  const int64_t offset = table.num_tokens % block_size_;
  const int64_t have = static_cast<int64_t>(table.blocks.size());
  if (index > have || table.num_tokens < 0) {
    throw std::invalid_argument("append_slot: table has " + std::to_string(table.num_tokens) +
                                " tokens but only " + std::to_string(have) + " blocks");
  }
  int32_t block;
  if (index == have) {  // last block full (or no block yet): take a fresh one
    block = allocate_block();
    if (block < 0) return -1;
    table.blocks.push_back(block);
  } else {
    block = table.blocks[index];
    if (refcounts_[block] > 1) {  // shared: the other readers must keep seeing the old contents
      int32_t copy = allocate_block();
      if (copy < 0) return -1;
      release(block);
      table.blocks[index] = copy;
      if (cow_src) *cow_src = block;
      if (cow_dst) *cow_dst = copy;
      block = copy;
    }
  }
  ++table.num_tokens;
  return static_cast<int64_t>(block) * block_size_ + offset;
}

BlockTable BlockManager::fork(const BlockTable& table) {
  // Validate everything first so a bad table leaves the pool untouched.
  for (int32_t block : table.blocks) {
    check_block(block);
    if (refcounts_[block] == 0)
      throw std::invalid_argument("fork: table reads free block " + std::to_string(block));
  }
  for (int32_t block : table.blocks) ++refcounts_[block];
  return table;
}

void BlockManager::free(BlockTable& table) {
  for (int32_t block : table.blocks) release(block);
  table.blocks.clear();
  table.num_tokens = 0;
}

std::string BlockManager::check_integrity() const {
  std::ostringstream err;
  const size_t total = refcounts_.size();
  std::vector<char> on_free_list(total, 0);
  for (int32_t block : free_list_) {
    if (block < 0 || static_cast<size_t>(block) >= total) {
      err << "free list holds out-of-range block " << block << "; ";
      continue;
    }
    if (on_free_list[block]) err << "block " << block << " is on the free list twice; ";
    on_free_list[block] = 1;
    if (refcounts_[block] != 0)
      err << "free block " << block << " has refcount " << refcounts_[block] << "; ";
  }
  size_t used = 0;
  for (size_t b = 0; b < total; ++b) {
    if (refcounts_[b] < 0) err << "block " << b << " has negative refcount " << refcounts_[b] << "; ";
    if (refcounts_[b] > 0) ++used;
    if (refcounts_[b] == 0 && !on_free_list[b]) err << "block " << b << " is unreferenced but not free; ";
  }
  if (used + free_list_.size() != total)
    err << "free (" << free_list_.size() << ") + used (" << used << ") != total (" << total << "); ";
  return err.str();
}

std::string BlockManager::check_integrity(const std::vector<int32_t>& expected_refs) const {
  std::string internal = check_integrity();
  std::ostringstream err;
  err << internal;
  if (expected_refs.size() != refcounts_.size()) {
    err << "expected_refs has " << expected_refs.size() << " entries for " << refcounts_.size()
        << " blocks; ";
    return err.str();
  }
  for (size_t b = 0; b < refcounts_.size(); ++b) {
    if (refcounts_[b] != expected_refs[b])
      err << "block " << b << " refcount " << refcounts_[b] << " != references held "
          << expected_refs[b] << "; ";
  }
  return err.str();
}

}  // namespace batchllm
