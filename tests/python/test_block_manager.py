"""_C.BlockManager: a plain-Python model of the pool checked after every random operation."""
from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from batchllm_core import _C


def refs_held(tables, num_blocks):
    refs = [0] * num_blocks
    for t in tables:
        for b in t.blocks:
            refs[b] += 1
    return refs


def test_basic_allocate_share_release():
    bm = _C.BlockManager(num_blocks=4, block_size=16)
    assert (bm.num_blocks, bm.num_free_blocks, bm.block_size) == (4, 4, 16)
    blocks = bm.allocate(3)
    assert len(blocks) == 3 and len(set(blocks)) == 3
    assert bm.allocate(2) is None  # all or nothing
    assert bm.num_free_blocks == 1 and not bm.can_allocate(2)
    bm.share(blocks[0])
    assert bm.refcount(blocks[0]) == 2
    for b in blocks:
        bm.release(b)
    assert bm.num_free_blocks == 3
    assert bm.check_integrity() == ""


def test_copy_on_write_reports_source_and_destination():
    bm = _C.BlockManager(8, 4)
    parent = _C.BlockTable()
    for _ in range(6):
        bm.append_slot(parent)
    child = bm.fork(parent)
    assert bm.blocks_needed_to_append(child, 1) == 1
    slot, src, dst = bm.append_slot(child)
    assert src == parent.blocks[1] and dst == child.blocks[1] and src != dst
    assert slot == dst * 4 + 2
    assert child.blocks[0] == parent.blocks[0]
    assert bm.check_integrity(refs_held([parent, child], 8)) == ""


def test_exhaustion_is_an_answer():
    bm = _C.BlockManager(1, 2)
    t = _C.BlockTable()
    assert bm.append_slot(t)[0] >= 0
    assert bm.append_slot(t)[0] >= 0
    assert bm.append_slot(t) == (-1, -1, -1)
    assert t.num_tokens == 2 and len(t.blocks) == 1
    assert bm.allocate_block() == -1


@pytest.mark.parametrize(
    "call",
    [
        lambda: _C.BlockManager(-1, 16),
        lambda: _C.BlockManager(4, 0),
        lambda: _C.BlockManager(4, 4).share(9),
        lambda: _C.BlockManager(4, 4).release(0),  # free block
        lambda: _C.BlockManager(4, 4).refcount(-1),
        lambda: _C.BlockManager(4, 4).allocate(-2),
    ],
)
def test_invalid_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_hand_edited_table_is_rejected():
    bm = _C.BlockManager(4, 4)
    t = _C.BlockTable()
    t.blocks = [2]  # never allocated
    t.num_tokens = 1
    with pytest.raises(ValueError, match="free"):
        bm.append_slot(t)
    t = _C.BlockTable()
    bm.append_slot(t)
    t.num_tokens = 9  # more than one block holds
    with pytest.raises(ValueError, match="num_tokens"):
        bm.fork(t)
    assert bm.check_integrity() == ""


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate/fork/append/free; refcounts must always equal the references the tables hold."""

    NUM_BLOCKS = 12
    BLOCK_SIZE = 3

    def __init__(self):
        super().__init__()
        self.bm = _C.BlockManager(self.NUM_BLOCKS, self.BLOCK_SIZE)
        self.tables: list = []
        self.contents: list[list[int]] = []  # per table: the value each of its tokens wrote
        self.loose: list[int] = []  # blocks taken with allocate(), held outside tables
        self.kv: dict[int, int] = {}  # slot -> value: a model of the KV cache memory
        self.next_value = 0

    @rule()
    def new_table(self):
        self.tables.append(_C.BlockTable())
        self.contents.append([])

    @precondition(lambda self: self.tables)
    @rule(i=st.integers(min_value=0), n=st.integers(min_value=1, max_value=5))
    def append(self, i, n):
        t = self.tables[i % len(self.tables)]
        values = self.contents[i % len(self.tables)]
        need_all = self.bm.blocks_needed_to_append(t, n)
        free_at_start = self.bm.num_free_blocks
        for _ in range(n):
            need = self.bm.blocks_needed_to_append(t, 1)
            free_before = self.bm.num_free_blocks
            before = (list(t.blocks), t.num_tokens)
            slot, src, dst = self.bm.append_slot(t)
            if need > free_before:
                assert slot == -1 and (list(t.blocks), t.num_tokens) == before
                assert need_all > free_at_start  # the up-front answer said it would not fit
                return
            assert slot == t.blocks[(t.num_tokens - 1) // self.BLOCK_SIZE] * self.BLOCK_SIZE + (
                (t.num_tokens - 1) % self.BLOCK_SIZE
            )
            assert self.bm.num_free_blocks == free_before - need
            assert (src == -1) == (dst == -1)
            if src != -1:
                assert self.bm.refcount(dst) == 1 and t.blocks[-1] == dst
                filled = (t.num_tokens - 1) % self.BLOCK_SIZE
                for j in range(filled):  # what the engine does with cow_src/cow_dst before the step
                    self.kv[dst * self.BLOCK_SIZE + j] = self.kv[src * self.BLOCK_SIZE + j]
            self.kv[slot] = self.next_value
            values.append(self.next_value)
            self.next_value += 1
        # All n appends went through: they took exactly what blocks_needed_to_append(n) promised.
        assert self.bm.num_free_blocks == free_at_start - need_all

    @precondition(lambda self: self.tables)
    @rule(i=st.integers(min_value=0))
    def fork(self, i):
        k = i % len(self.tables)
        child = self.bm.fork(self.tables[k])
        assert list(child.blocks) == list(self.tables[k].blocks)
        assert child.num_tokens == self.tables[k].num_tokens
        self.tables.append(child)
        self.contents.append(list(self.contents[k]))

    @precondition(lambda self: self.tables)
    @rule(i=st.integers(min_value=0))
    def free(self, i):
        k = i % len(self.tables)
        t = self.tables.pop(k)
        self.contents.pop(k)
        self.bm.free(t)
        assert t.blocks == [] and t.num_tokens == 0

    @rule(n=st.integers(min_value=0, max_value=4))
    def allocate_loose(self, n):
        free_before = self.bm.num_free_blocks
        got = self.bm.allocate(n)
        if n > free_before:
            assert got is None and self.bm.num_free_blocks == free_before
        else:
            assert len(got) == n and all(self.bm.refcount(b) == 1 for b in got)
            self.loose.extend(got)

    @precondition(lambda self: self.loose)
    @rule(i=st.integers(min_value=0))
    def release_loose(self, i):
        self.bm.release(self.loose.pop(i % len(self.loose)))

    @invariant()
    def integrity(self):
        refs = refs_held(self.tables, self.NUM_BLOCKS)
        for b in self.loose:
            refs[b] += 1
        assert self.bm.check_integrity(refs) == ""
        assert self.bm.num_free_blocks == sum(1 for r in refs if r == 0)

    @invariant()
    def every_table_reads_what_it_wrote(self):
        # Sharing must never let one sequence's append overwrite a token another sequence reads.
        for t, values in zip(self.tables, self.contents):
            assert t.num_tokens == len(values)
            for pos, value in enumerate(values):
                slot = t.blocks[pos // self.BLOCK_SIZE] * self.BLOCK_SIZE + pos % self.BLOCK_SIZE
                assert self.kv[slot] == value


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
