"""_C.PrefixTree against the plain-Python reference, planted structures, invariants and bad input."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchllm_core import _C
from batchllm_core.prefix_tree import build_prefix_tree, plan_to_lists
from batchllm_core.reference import ReferencePrefixTree


def native_tree(prompts):
    tree = _C.PrefixTree()
    tree.insert_list(prompts)
    return tree


def reference_tree(prompts):
    tree = ReferencePrefixTree()
    tree.insert_list(prompts)
    return tree


def check_invariants(prompts, plan: dict, block_size: int, min_prefix_tokens: int):
    """What every plan must satisfy, whatever rule chose it."""
    shortest = max(block_size, min_prefix_tokens)
    n = len(plan["end"])
    deepest_seen = [-1] * len(prompts)
    for p in range(n):
        begin, end, parent, readers = plan["begin"][p], plan["end"][p], plan["parent"][p], plan["requests"][p]
        assert parent < p  # parents before children
        assert begin == (plan["end"][parent] if parent >= 0 else 0)
        assert plan["depth"][p] == (plan["depth"][parent] + 1 if parent >= 0 else 0)
        assert end % block_size == 0 and end - begin >= shortest
        assert len(readers) >= 2 and readers == sorted(set(readers))
        if parent >= 0:
            assert set(readers) <= set(plan["requests"][parent])
        first = prompts[readers[0]]
        for r in readers:
            assert end <= len(prompts[r]) - 1  # the last prompt token is always computed
            assert list(prompts[r][:end]) == list(first[:end])
            deepest_seen[r] = p  # children come later, so the last one written is the deepest
    assert plan["request_prefix"] == deepest_seen


# ---- random jobs: shared stems, nesting, duplicates, prefixes of other prompts, empty prompts -------

@st.composite
def jobs(draw):
    vocab = draw(st.integers(min_value=2, max_value=6))  # small vocabularies make accidental sharing
    tokens = st.integers(min_value=0, max_value=vocab - 1)
    pool = [[]]
    prompts = []
    for _ in range(draw(st.integers(min_value=1, max_value=40))):
        base = pool[draw(st.integers(min_value=0, max_value=len(pool) - 1))]
        action = draw(st.sampled_from(["extend", "extend", "extend", "duplicate", "truncate"]))
        if action == "extend":
            prompt = base + draw(st.lists(tokens, min_size=1, max_size=24))
        elif action == "duplicate":
            prompt = list(base)
        else:
            prompt = base[: draw(st.integers(min_value=0, max_value=len(base)))]
        prompts.append(prompt)
        pool.append(prompt)
    return prompts


@settings(max_examples=200, deadline=None)
@given(prompts=jobs(), block_size=st.sampled_from([1, 2, 4]), min_prefix=st.sampled_from([0, 3, 8]))
def test_single_level_matches_reference(prompts, block_size, min_prefix):
    native = native_tree(prompts)
    ref = reference_tree(prompts)
    plan = native.group_single_level(block_size, min_prefix_tokens=min_prefix)
    expected = ref.group_single_level(block_size, min_prefix_tokens=min_prefix)
    got = plan_to_lists(plan)
    assert got == expected.__dict__
    check_invariants(prompts, got, block_size, min_prefix)
    stats = native.stats(plan)
    assert stats.pop("memory_bytes") > 0
    assert stats == ref.stats(expected)


@settings(max_examples=200, deadline=None)
@given(prompts=jobs(), block_size=st.sampled_from([1, 2, 4]), min_prefix=st.sampled_from([0, 3, 8]),
       max_depth=st.integers(min_value=1, max_value=4))
def test_multi_level_matches_reference(prompts, block_size, min_prefix, max_depth):
    native = native_tree(prompts)
    ref = reference_tree(prompts)
    plan = native.group_multi_level(block_size, max_depth=max_depth, min_prefix_tokens=min_prefix)
    expected = ref.group_multi_level(block_size, max_depth=max_depth, min_prefix_tokens=min_prefix)
    got = plan_to_lists(plan)
    assert got == expected.__dict__
    check_invariants(prompts, got, block_size, min_prefix)
    assert max(got["depth"], default=-1) < max_depth
    stats = native.stats(plan)
    stats.pop("memory_bytes")
    assert stats == ref.stats(expected)


@settings(max_examples=50, deadline=None)
@given(prompts=jobs(), split=st.integers(min_value=0, max_value=40))
def test_numpy_and_list_inputs_and_appends_agree(prompts, split):
    tokens = np.array([t for p in prompts for t in p], dtype=np.int32)
    offsets = np.zeros(len(prompts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(p) for p in prompts])
    from_numpy = _C.PrefixTree()
    from_numpy.insert(tokens, offsets)
    in_two_calls = _C.PrefixTree()  # appends: the second call's requests number on from the first's
    cut = min(split, len(prompts))
    in_two_calls.insert_list(prompts[:cut])
    in_two_calls.insert_list([np.asarray(p, dtype=np.int64) for p in prompts[cut:]])
    want = plan_to_lists(native_tree(prompts).group_multi_level(2))
    assert plan_to_lists(from_numpy.group_multi_level(2)) == want
    assert plan_to_lists(in_two_calls.group_multi_level(2)) == want
    assert [from_numpy.prompt_length(i) for i in range(len(prompts))] == [len(p) for p in prompts]


def test_insert_reads_numpy_without_copying():
    import tracemalloc

    tokens = (np.arange(2_000_000) % 1000).astype(np.int32)  # 8 MB
    offsets = np.arange(0, 2_000_001, 1000, dtype=np.int64)
    tracemalloc.start()  # numpy reports its buffers to tracemalloc; the tree's own storage is C++'s
    try:
        _C.PrefixTree().insert(tokens, offsets)
        contiguous_peak = tracemalloc.get_traced_memory()[1]
        strided = np.repeat(tokens, 2)[::2]
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        _C.PrefixTree().insert(strided, offsets)  # a strided view is copied once, then read
        strided_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert contiguous_peak < 1_000_000
    assert strided_peak >= tokens.nbytes


# ---- planted structures ------------------------------------------------------------------------------

def test_planted_groups_are_found_exactly():
    rng = np.random.default_rng(0)
    groups, members, block = 20, 10, 16
    prompts, want = [], []
    for g in range(groups):
        prefix = rng.integers(10, 32000, 64).tolist()
        for _ in range(members):
            prompts.append(prefix + rng.integers(10, 32000, 64).tolist())
        want.append(list(range(g * members, (g + 1) * members)))
    order = rng.permutation(len(prompts))  # interleaved input order
    shuffled = [prompts[i] for i in order]
    tree = build_prefix_tree(shuffled)
    plan = tree.group_single_level(block)
    assert len(plan) == groups and set(plan.end.tolist()) == {64}
    found = sorted(sorted(order[plan.prefix_requests(p)].tolist()) for p in range(len(plan)))
    assert found == want
    stats = tree.stats(plan)
    assert stats["shared_tokens"] == groups * (members - 1) * 64
    assert stats["prefill_tokens"] == stats["prompt_tokens"] - stats["shared_tokens"]


def test_multi_level_tree_shape():
    # 2 system prompts x 3 shot sets x 4 questions: system 32 tokens, shots 48, question 8 (block 16).
    rng = np.random.default_rng(1)
    prompts = []
    for _ in range(2):
        system = rng.integers(10, 1000, 32).tolist()
        for _ in range(3):
            shots = rng.integers(10, 1000, 48).tolist()
            for _ in range(4):
                prompts.append(system + shots + rng.integers(10, 1000, 8).tolist())
    tree = build_prefix_tree(prompts)
    plan = tree.group_multi_level(16)
    assert plan.depth.tolist() == [0, 1, 1, 1, 0, 1, 1, 1]
    assert plan.begin.tolist() == [0, 32, 32, 32, 0, 32, 32, 32]
    assert plan.end.tolist() == [32, 80, 80, 80, 32, 80, 80, 80]
    assert plan.parent.tolist() == [-1, 0, 0, 0, -1, 4, 4, 4]
    assert plan.prefix_requests(0).tolist() == list(range(12))
    assert plan.prefix_requests(2).tolist() == [4, 5, 6, 7]
    assert plan.request_prefix.tolist() == [1] * 4 + [2] * 4 + [3] * 4 + [5] * 4 + [6] * 4 + [7] * 4
    # max_depth 1 keeps only the system prompts.
    assert tree.group_multi_level(16, max_depth=1).end.tolist() == [32, 32]
    # Single level: each shot set's gain beats duplicating the system prompt: 6 groups of 80 tokens.
    single = tree.group_single_level(16)
    assert single.end.tolist() == [80] * 6


def test_group_prefix_is_the_members_common_prefix():
    # c (1000 tokens) -> b (20 tokens, 100 readers: promoted) and a (5 tokens) -> g (10 tokens, 2 readers:
    # promoted out of a, not out of c) and h (1 reader). What stays with c all runs through a, so the
    # group shares c + a (1005 tokens), deeper than the node the enlargement left it at.
    rng = np.random.default_rng(4)
    c, b, a, g = (rng.integers(10, 1000, n).tolist() for n in (1000, 20, 5, 10))
    prompts = [c + b + rng.integers(10, 1000, 3).tolist() for _ in range(100)]
    prompts += [c + a + g + [1, 2], c + a + g + [3, 4], c + a + [5, 6, 7]]
    tree = build_prefix_tree(prompts)
    plan = plan_to_lists(tree.group_single_level(1))
    assert plan == reference_tree(prompts).group_single_level(1).__dict__
    assert plan["end"] == [1020, 1005]
    assert plan["requests"][1] == [100, 101, 102]


def test_edge_cases():
    empty = _C.PrefixTree()
    plan = empty.group_single_level(16)
    assert len(plan) == 0 and empty.stats(plan)["requests"] == 0
    one = build_prefix_tree([[1, 2, 3]])
    assert len(one.group_single_level(1)) == 0 and len(one.group_multi_level(1)) == 0
    # Identical prompts share all but their last token (rounded down to the block).
    same = build_prefix_tree([[5] * 40] * 3)
    plan = same.group_single_level(16)
    assert plan.end.tolist() == [32] and plan.requests.tolist() == [0, 1, 2]
    # A prompt that is another's prefix: the shared part stops short of the shorter prompt's end.
    nested = build_prefix_tree([list(range(32)), list(range(40))])
    assert nested.group_single_level(16).end.tolist() == [16]
    assert nested.group_single_level(1).end.tolist() == [31]
    # Empty prompts share nothing and do not disturb others.
    with_empty = build_prefix_tree([[], [1] * 20, [], [1] * 20])
    plan = with_empty.group_single_level(4)
    assert plan.request_prefix.tolist() == [-1, 0, -1, 0]
    assert with_empty.stats(plan)["prompt_tokens"] == 40


def test_hundred_thousand_prompts():
    rng = np.random.default_rng(2)
    n, groups = 100_000, 500
    prefixes = rng.integers(10, 32000, (groups, 16), dtype=np.int32)
    suffixes = rng.integers(10, 32000, (n, 4), dtype=np.int32)
    tokens = np.concatenate([prefixes[np.arange(n) % groups], suffixes], axis=1).reshape(-1)
    tree = build_prefix_tree(tokens=tokens, offsets=np.arange(n + 1, dtype=np.int64) * 20)
    plan = tree.group_single_level(16)
    assert len(plan) == groups
    assert plan.prefix_requests(0).tolist() == list(range(0, n, groups))
    assert tree.stats(plan)["shared_tokens"] == (n - groups) * 16


# ---- bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "tokens, offsets, match",
    [
        (np.array([1, -2, 3], np.int32), np.array([0, 3], np.int64), "prompt 0 holds -2 at position 1"),
        (np.array([1, 2, 3], np.int64), np.array([0, 3], np.int64), "tokens must be a numpy int32"),
        (np.array([1.0, 2.0], np.float32), np.array([0, 2], np.int64), "tokens must be a numpy int32"),
        ([1, 2, 3], np.array([0, 3], np.int64), "tokens must be a numpy int32"),
        (np.array([1, 2, 3], np.int32), np.array([0, 3], np.int32), "offsets must be a numpy int64"),
        (np.array([1, 2, 3], np.int32), np.array([0, 4], np.int64), "exceeds len\\(tokens\\)"),
        (np.array([1, 2, 3], np.int32), np.array([-1, 3], np.int64), "offsets\\[0\\]"),
        (np.array([1, 2, 3], np.int32), np.array([0, 2, 1, 3], np.int64), "non-decreasing"),
        (np.array([1, 2, 3], np.int32), np.array([], np.int64), "at least 1"),
        (np.array([[1, 2]], np.int32), np.array([0, 2], np.int64), "1-D"),
    ],
)
def test_insert_rejects_bad_arrays(tokens, offsets, match):
    tree = _C.PrefixTree()
    with pytest.raises(ValueError, match=match):
        tree.insert(tokens, offsets)
    assert tree.num_requests == 0  # validated before anything is inserted


def test_rejected_insert_leaves_the_tree_as_it_was():
    rng = np.random.default_rng(3)
    first = [rng.integers(0, 4, rng.integers(0, 30)).tolist() for _ in range(30)]
    second = [rng.integers(0, 4, rng.integers(0, 30)).tolist() for _ in range(30)]
    second[17] = [1, 2, 3, 0, 1, -7, 2]
    tokens = np.array([t for p in second for t in p], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in second])]).astype(np.int64)
    tree = build_prefix_tree(first)
    with pytest.raises(ValueError, match="prompt 17 holds -7 at position 5"):
        tree.insert(tokens, offsets)  # prompts 0..16 went in before the bad one was seen
    clean = build_prefix_tree(first)
    assert tree.num_requests == len(first)
    for group in (lambda t: t.group_multi_level(1), lambda t: t.group_single_level(2)):
        assert plan_to_lists(group(tree)) == plan_to_lists(group(clean))
        stats, want = tree.stats(group(tree)), clean.stats(group(clean))
        assert stats.pop("memory_bytes") > 0 and want.pop("memory_bytes") > 0
        assert stats == want


@pytest.mark.parametrize(
    "prompts, match",
    [
        ([[1, 2], [3, -1]], "prompts\\[1\\]"),
        ([[1, 2.5]], "must be ints"),
        (["abc"], "prompts\\[0\\]"),
        ([np.array([1.0, 2.0])], "integer array"),
        ([[1, 2**40]], "outside"),
        ("abc", "list of token-id lists"),
    ],
)
def test_insert_list_rejects_bad_prompts(prompts, match):
    with pytest.raises(ValueError, match=match):
        _C.PrefixTree().insert_list(prompts)


def test_grouping_and_stats_reject_bad_arguments():
    tree = build_prefix_tree([[1, 2, 3], [1, 2, 4]])
    with pytest.raises(ValueError, match="block_size"):
        tree.group_single_level(0)
    with pytest.raises(ValueError, match="min_prefix_tokens"):
        tree.group_single_level(1, min_prefix_tokens=-1)
    with pytest.raises(ValueError, match="max_depth"):
        tree.group_multi_level(1, max_depth=0)
    other = build_prefix_tree([[1, 2, 3]] * 3)
    with pytest.raises(ValueError, match="requests"):
        tree.stats(other.group_single_level(1))
    with pytest.raises(ValueError, match="request"):
        tree.prompt_length(2)
    with pytest.raises(ValueError, match="prefix"):
        tree.group_single_level(1).prefix_requests(5)
