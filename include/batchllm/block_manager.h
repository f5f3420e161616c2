// The only owner of KV-cache blocks: a fixed pool of refcounted blocks of block_size token slots.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace batchllm {

/// A sequence's view of its KV: the blocks it reads, in order, and how many token slots it has filled.
/// Token t of the sequence lives in slot blocks[t / block_size] * block_size + t % block_size.
struct BlockTable {
  std::vector<int32_t> blocks;
  int64_t num_tokens = 0;
};

/// Fixed pool of `num_blocks` blocks of `block_size` token slots. Blocks are refcounted so a shared
/// prefix's blocks are read by every member of its group; a shared block is read-only, and a
/// shared, partially filled block is copied (copy-on-write) before it grows.
/// Running out of blocks is a normal answer (can_allocate false / -1 / false), never a crash.
/// Misuse (a block id out of range, sharing or releasing a free block) throws std::invalid_argument:
/// it is a caller bug that would otherwise corrupt the pool silently.
/// Not thread-safe: one owner (the scheduler) drives it.
class BlockManager {
 public:
  /// \param num_blocks pool size (>= 0, < 2^31)   \param block_size token slots per block (>= 1)
  BlockManager(int64_t num_blocks, int block_size);

  int block_size() const { return block_size_; }
  int64_t num_blocks() const;
  int64_t num_free_blocks() const;
  int64_t num_used_blocks() const { return num_blocks() - num_free_blocks(); }
  /// Blocks needed to hold n tokens.
  int64_t blocks_for_tokens(int64_t n) const { return (n + block_size_ - 1) / block_size_; }
  bool can_allocate(int64_t num_blocks) const { return num_blocks <= num_free_blocks(); }

  /// Takes one free block with refcount 1; -1 when none is free. Mutates.
  int32_t allocate_block();
  /// Takes n blocks or none: false (and nothing taken) when fewer than n are free. Appends to out. Mutates.
  bool allocate(int64_t n, std::vector<int32_t>& out);
  /// Adds a reference to a used block (a new reader). Mutates.
  void share(int32_t block);
  /// Drops one reference; the block returns to the pool at zero. Mutates.
  void release(int32_t block);
  /// References held on `block` (0 when free).
  int32_t refcount(int32_t block) const;

  /// Table-level helpers (each mutates the table and the pool):
  /// Free blocks that appending n tokens to `table` would take (new blocks plus a copy-on-write of a
  /// shared, partially filled last block). Does not mutate.
  int64_t blocks_needed_to_append(const BlockTable& table, int64_t n) const;
  /// Gives `table` a slot for one more token; allocates a block when the last one is full and
  /// copies-on-write when the last block is shared and partially filled. Returns the slot
  /// (block * block_size + offset), or -1 when a needed block is not available (table unchanged).
  /// When a copy happens, *cow_src / *cow_dst name the blocks whose slots [0, filled) must be copied;
  /// otherwise both are set to -1.
  int64_t append_slot(BlockTable& table, int32_t* cow_src = nullptr, int32_t* cow_dst = nullptr);
  /// A new table reading the same blocks (every block's refcount +1).
  BlockTable fork(const BlockTable& table);
  /// Releases every block of the table and empties it.
  void free(BlockTable& table);

  /// Verifies refcounts equal `expected_refs` (block -> references held by the caller's tables)
  /// and that free + used == total. Returns an empty string when sound, else what is wrong.
  std::string check_integrity(const std::vector<int32_t>& expected_refs) const;
  /// Verifies internal consistency only (free list vs refcounts, totals).
  std::string check_integrity() const;

 private:
  void check_block(int32_t block) const;

  int block_size_;
  std::vector<int32_t> refcounts_;
  std::vector<int32_t> free_list_;  // a stack: the most recently released block is reused first
};

}  // namespace batchllm
