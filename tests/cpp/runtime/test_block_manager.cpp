// BlockManager: allocation, sharing, copy-on-write, exhaustion and integrity checks.
#include "batchllm/block_manager.h"

#include <gtest/gtest.h>

#include <random>
#include <stdexcept>
#include <vector>

namespace batchllm {
namespace {

// Refcounts implied by the tables a caller holds: what check_integrity(expected) compares against.
std::vector<int32_t> refs_held(const std::vector<BlockTable>& tables, int64_t num_blocks) {
  std::vector<int32_t> refs(static_cast<size_t>(num_blocks), 0);
  for (const auto& t : tables)
    for (int32_t b : t.blocks) ++refs[b];
  return refs;
}

TEST(BlockManager, StartsAllFree) {
  BlockManager bm(8, 16);
  EXPECT_EQ(bm.num_blocks(), 8);
  EXPECT_EQ(bm.num_free_blocks(), 8);
  EXPECT_EQ(bm.num_used_blocks(), 0);
  EXPECT_EQ(bm.block_size(), 16);
  EXPECT_EQ(bm.blocks_for_tokens(0), 0);
  EXPECT_EQ(bm.blocks_for_tokens(16), 1);
  EXPECT_EQ(bm.blocks_for_tokens(17), 2);
  EXPECT_EQ(bm.check_integrity(), "");
}

TEST(BlockManager, RejectsBadConstruction) {
  EXPECT_THROW(BlockManager(4, 0), std::invalid_argument);
  EXPECT_THROW(BlockManager(-1, 16), std::invalid_argument);
}

TEST(BlockManager, AllocateAllOrNothing) {
  BlockManager bm(4, 16);
  std::vector<int32_t> out;
  EXPECT_TRUE(bm.allocate(3, out));
  EXPECT_EQ(out.size(), 3u);
  EXPECT_FALSE(bm.can_allocate(2));
  EXPECT_FALSE(bm.allocate(2, out));
  EXPECT_EQ(out.size(), 3u);  // nothing taken on failure
  EXPECT_EQ(bm.num_free_blocks(), 1);
  EXPECT_NE(bm.allocate_block(), -1);
  EXPECT_EQ(bm.allocate_block(), -1);  // exhaustion is an answer, not a crash
  EXPECT_EQ(bm.check_integrity(), "");
}

TEST(BlockManager, ShareAndReleaseRefcounts) {
  BlockManager bm(2, 4);
  int32_t b = bm.allocate_block();
  bm.share(b);
  EXPECT_EQ(bm.refcount(b), 2);
  bm.release(b);
  EXPECT_EQ(bm.num_free_blocks(), 1);
  bm.release(b);
  EXPECT_EQ(bm.refcount(b), 0);
  EXPECT_EQ(bm.num_free_blocks(), 2);
  EXPECT_THROW(bm.release(b), std::invalid_argument);
  EXPECT_THROW(bm.share(b), std::invalid_argument);
  EXPECT_THROW(bm.refcount(7), std::invalid_argument);
  EXPECT_EQ(bm.check_integrity(), "");
}

TEST(BlockManager, AppendSlotFillsBlocksInOrder) {
  BlockManager bm(4, 4);
  BlockTable t;
  std::vector<int64_t> slots;
  for (int i = 0; i < 6; ++i) slots.push_back(bm.append_slot(t));
  ASSERT_EQ(t.blocks.size(), 2u);
  EXPECT_EQ(t.num_tokens, 6);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(slots[i], t.blocks[i / 4] * 4 + i % 4);
  EXPECT_EQ(bm.check_integrity(refs_held({t}, 4)), "");
}

TEST(BlockManager, ForkSharesThenCopyOnWriteOnPartialBlock) {
  BlockManager bm(8, 4);
  BlockTable parent;
  for (int i = 0; i < 6; ++i) bm.append_slot(parent);  // one full block + 2 tokens
  BlockTable child = bm.fork(parent);
  EXPECT_EQ(bm.refcount(parent.blocks[0]), 2);
  EXPECT_EQ(bm.refcount(parent.blocks[1]), 2);
  EXPECT_EQ(bm.blocks_needed_to_append(child, 1), 1);  // the copy
  EXPECT_EQ(bm.blocks_needed_to_append(child, 3), 2);  // the copy + a fresh block
  int32_t src = 0, dst = 0;
  int64_t slot = bm.append_slot(child, &src, &dst);
  EXPECT_EQ(src, parent.blocks[1]);
  EXPECT_NE(dst, src);
  EXPECT_EQ(child.blocks[1], dst);
  EXPECT_EQ(slot, dst * 4 + 2);
  EXPECT_EQ(child.blocks[0], parent.blocks[0]);  // the full block stays shared
  EXPECT_EQ(bm.refcount(parent.blocks[1]), 1);
  // The parent is now the sole reader of its partial block: it grows in place.
  slot = bm.append_slot(parent, &src, &dst);
  EXPECT_EQ(src, -1);
  EXPECT_EQ(dst, -1);
  EXPECT_EQ(slot, parent.blocks[1] * 4 + 2);
  EXPECT_EQ(bm.check_integrity(refs_held({parent, child}, 8)), "");
  bm.free(parent);
  bm.free(child);
  EXPECT_EQ(bm.num_free_blocks(), 8);
  EXPECT_EQ(bm.check_integrity(), "");
}

TEST(BlockManager, ForkOfFullBlocksNeedsNoCopy) {
  BlockManager bm(4, 4);
  BlockTable parent;
  for (int i = 0; i < 4; ++i) bm.append_slot(parent);
  BlockTable child = bm.fork(parent);
  int32_t src = 0, dst = 0;
  int64_t slot = bm.append_slot(child, &src, &dst);
  EXPECT_EQ(src, -1);
  EXPECT_EQ(child.blocks.size(), 2u);
  EXPECT_EQ(slot, child.blocks[1] * 4);
  EXPECT_EQ(bm.refcount(parent.blocks[0]), 2);
}

TEST(BlockManager, AppendWithoutFreeBlockLeavesTableUnchanged) {
  BlockManager bm(2, 2);
  BlockTable a;
  for (int i = 0; i < 3; ++i) ASSERT_GE(bm.append_slot(a), 0);
  BlockTable b = bm.fork(a);  // shares the partial block; the pool is empty
  ASSERT_EQ(bm.num_free_blocks(), 0);
  BlockTable before = b;
  EXPECT_EQ(bm.append_slot(b), -1);  // the copy-on-write needs a block
  EXPECT_EQ(b.blocks, before.blocks);
  EXPECT_EQ(b.num_tokens, before.num_tokens);
  EXPECT_EQ(bm.append_slot(a), -1);
  EXPECT_EQ(bm.check_integrity(refs_held({a, b}, 2)), "");
}

TEST(BlockManager, CheckIntegrityReportsWrongExpectations) {
  BlockManager bm(3, 4);
  BlockTable t;
  bm.append_slot(t);
  std::vector<int32_t> wrong(3, 0);
  EXPECT_NE(bm.check_integrity(wrong), "");
  EXPECT_NE(bm.check_integrity(std::vector<int32_t>(2, 0)), "");
  EXPECT_EQ(bm.check_integrity(refs_held({t}, 3)), "");
}

TEST(BlockManager, RandomOperationsKeepIntegrity) {
  const int64_t num_blocks = 24;
  BlockManager bm(num_blocks, 3);
  std::vector<BlockTable> tables;
  std::mt19937 rng(1234);
  for (int step = 0; step < 4000; ++step) {
    int op = static_cast<int>(rng() % 4);
    if (op == 0 || tables.empty()) {
      tables.emplace_back();
    } else if (op == 1) {
      BlockTable& t = tables[rng() % tables.size()];
      int64_t need = bm.blocks_needed_to_append(t, 1);
      int64_t free_before = bm.num_free_blocks();
      int64_t slot = bm.append_slot(t);
      EXPECT_EQ(slot < 0, need > free_before);
      if (slot >= 0) EXPECT_EQ(bm.num_free_blocks(), free_before - need);
    } else if (op == 2) {
      tables.push_back(bm.fork(tables[rng() % tables.size()]));
    } else {
      size_t i = rng() % tables.size();
      bm.free(tables[i]);
      tables.erase(tables.begin() + static_cast<std::ptrdiff_t>(i));
    }
    ASSERT_EQ(bm.check_integrity(refs_held(tables, num_blocks)), "") << "step " << step;
  }
}

}  // namespace
}  // namespace batchllm
