"""CPU reference kernels (batchllm_core.ops on CPU tensors) against float64 torch references.

Outputs are NaN-poisoned before every run so that an unwritten row fails.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from batchllm_core import ops
from batchllm_core.models.config import ModelConfig
from ops_reference import (sample_rows_reference, TOLERANCE, PagedKV, attention64, cascade_reference, make_cascade_case,
                           make_prefill_case, poisoned, prefill_reference, rel_err)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEADS = [(4, 4), (4, 2), (8, 1)]  # (Hq, Hkv): MHA, GQA 2, MQA


# ---- store_kv ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 5])
def test_store_kv_writes_slots_and_skips_negative(dtype, block_size):
    num_blocks, num_kv_heads, head_dim, num_tokens = 6, 2, 16, 11
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn((num_blocks, block_size, num_kv_heads, head_dim), generator=gen).to(dtype)
    v_cache = torch.randn_like(k_cache)
    k = torch.randn((num_tokens, num_kv_heads, head_dim), generator=gen).to(dtype)
    v = torch.randn_like(k)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[3] = -1
    before_k, before_v = k_cache.clone(), v_cache.clone()
    ops.store_kv(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    written = slots >= 0
    assert torch.equal(flat_k[slots[written]], k[written])
    assert torch.equal(flat_v[slots[written]], v[written])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[written]] = False
    assert torch.equal(flat_k[untouched], before_k.flatten(0, 1)[untouched])
    assert torch.equal(flat_v[untouched], before_v.flatten(0, 1)[untouched])


def test_store_kv_accepts_strided_rows():
    # k, v as views into a fused qkv projection: row stride larger than Hkv * D.
    qkv = torch.randn(5, 3, 2, 8)
    k, v = qkv[:, 1], qkv[:, 2]
    k_cache = torch.zeros(2, 4, 2, 8)
    v_cache = torch.zeros(2, 4, 2, 8)
    ops.store_kv(k, v, k_cache, v_cache, torch.arange(5, dtype=torch.int64))
    assert torch.equal(k_cache.flatten(0, 1)[:5], k)
    assert torch.equal(v_cache.flatten(0, 1)[:5], v)


# ---- prefill_attention ------------------------------------------------------------------------------

PREFILL_SEQS = {
    "decode_rows": [(1, 1), (1, 17), (1, 32), (1, 5)],
    "whole_prompts": [(7, 7), (16, 16), (33, 33)],
    "chunks_over_cache": [(5, 40), (16, 16), (9, 25), (1, 48)],
    "single_long": [(70, 100)],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("seqs_name", list(PREFILL_SEQS))
def test_prefill_attention_matches_float64(dtype, heads, head_dim, seqs_name):
    num_q_heads, num_kv_heads = heads
    seqs = PREFILL_SEQS[seqs_name]
    kv = PagedKV(64, 16, num_kv_heads, head_dim, dtype)
    case = make_prefill_case(kv, seqs, num_q_heads, head_dim, dtype)
    scale = 1.0 / math.sqrt(head_dim)
    out = poisoned(case.q.shape, dtype)
    result = ops.prefill_attention(case.q, kv.k, kv.v, case.block_tables, case.query_start, case.context_lens,
                                   out=out)
    assert result is out
    ref = prefill_reference(kv, case, seqs, scale)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < TOLERANCE[dtype]


def test_prefill_attention_block_size_not_16_and_custom_scale():
    kv = PagedKV(40, 7, 2, 24, torch.float32)
    seqs = [(10, 30), (3, 3), (1, 14)]
    case = make_prefill_case(kv, seqs, 6, 24, torch.float32)
    out = ops.prefill_attention(case.q, kv.k, kv.v, case.block_tables, case.query_start, case.context_lens, scale=0.3)
    assert rel_err(out, prefill_reference(kv, case, seqs, 0.3)) < 1e-5


def test_prefill_attention_long_prefix_tiny_model_shape():
    # The CPU engine's hot path: a 1024-token prefix prefilled in one chunk on the tiny model (4/2 heads, d 16).
    kv = PagedKV(70, 16, 2, 16, torch.float32)
    seqs = [(1024, 1024)]
    case = make_prefill_case(kv, seqs, 4, 16, torch.float32)
    out = ops.prefill_attention(case.q, kv.k, kv.v, case.block_tables, case.query_start, case.context_lens)
    assert rel_err(out, prefill_reference(kv, case, seqs, 0.25)) < 1e-5


def test_prefill_attention_empty_sequences_in_batch():
    kv = PagedKV(16, 16, 2, 16, torch.float32)
    seqs = [(0, 10), (4, 20), (0, 0)]
    case = make_prefill_case(kv, seqs, 4, 16, torch.float32)
    out = ops.prefill_attention(case.q, kv.k, kv.v, case.block_tables, case.query_start, case.context_lens)
    k, v = kv.gather(case.tables[1], 20)
    ref, _ = attention64(case.q, k, v, 0.25, causal_offset=16)
    assert rel_err(out, ref) < 1e-5


# ---- cascade_decode_attention -----------------------------------------------------------------------

CASCADE_SHAPES = {
    # name: (rows, level fanouts, prefix length per level (by prefix index), suffix length by row)
    "one_level": (12, [2], [lambda i: 32], lambda r: 5 + r),
    "one_level_odd_lengths": (9, [3], [lambda i: 17 + 3 * i], lambda r: (r * 7) % 20),
    "zero_suffix": (8, [2], [lambda i: 23], lambda r: 0),
    "zero_prefix": (6, [2], [lambda i: 0], lambda r: 1 + r),
    "two_levels": (16, [2, 2], [lambda i: 16, lambda i: 9 + i], lambda r: r % 5),
    "three_levels": (17, [2, 2, 2], [lambda i: 20, lambda i: 16, lambda i: 3 + i], lambda r: (3 * r) % 11),
    "no_prefix": (5, [], [], lambda r: 1 + 4 * r),
}


def run_cascade_case(name, dtype, heads, head_dim, device="cpu", check_indices=None):
    num_q_heads, num_kv_heads = heads
    rows, fanouts, prefix_lens, suffix_len = CASCADE_SHAPES[name]
    kv = PagedKV(96, 16, num_kv_heads, head_dim, dtype, device=device)
    case = make_cascade_case(kv, rows, fanouts, prefix_lens, [suffix_len(r) for r in range(rows)], num_q_heads,
                             head_dim, dtype, device=device)
    out = poisoned(case.q.shape, dtype, device)
    lse = poisoned(case.q.shape[:2], torch.float32, device)
    o, lse_result = ops.cascade_decode_attention(case.q, kv.k, kv.v, case.levels, return_lse=True, out=out,
                                                 lse_out=lse, check_indices=check_indices)
    ref_o, ref_lse = cascade_reference(kv, case, 1.0 / math.sqrt(head_dim))
    return o, lse_result, ref_o, ref_lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("name", list(CASCADE_SHAPES))
def test_cascade_decode_attention_matches_float64(dtype, heads, head_dim, name):
    o, lse, ref_o, ref_lse = run_cascade_case(name, dtype, heads, head_dim)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert rel_err(o, ref_o) < TOLERANCE[dtype]
    assert torch.allclose(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)


def test_cascade_row_without_any_keys_gives_zero_and_minus_inf():
    kv = PagedKV(8, 16, 1, 16, torch.float32)
    case = make_cascade_case(kv, 3, [], [], [0, 4, 0], 2, 16, torch.float32)
    o, lse = ops.cascade_decode_attention(case.q, kv.k, kv.v, case.levels, return_lse=True,
                                          out=poisoned(case.q.shape, torch.float32))
    assert torch.equal(o[0], torch.zeros_like(o[0])) and torch.equal(o[2], torch.zeros_like(o[2]))
    assert torch.isinf(lse[0]).all() and (lse[0] < 0).all()
    assert torch.isfinite(lse[1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cascade_equals_prefill_over_full_block_table(dtype):
    # The contract: cascade == prefill_attention with q_len 1 over the concatenated table.
    kv = PagedKV(64, 16, 2, 16, dtype)
    rows = 6
    case = make_cascade_case(kv, rows, [1, 2], [lambda i: 32, lambda i: 16], [3, 0, 9, 16, 1, 5], 4, 16, dtype)
    tables, lens = [], []
    for segments in case.row_keys:
        tables.append([b for blocks, _ in segments for b in blocks])
        lens.append(sum(n for _, n in segments))
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)
    cascade = ops.cascade_decode_attention(case.q, kv.k, kv.v, case.levels)
    prefill = ops.prefill_attention(case.q, kv.k, kv.v, block_tables, torch.arange(rows + 1, dtype=torch.int32),
                                    torch.tensor(lens, dtype=torch.int32))
    assert rel_err(cascade, prefill) < TOLERANCE[dtype]


# ---- merge_states -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_states_matches_attention_over_union(dtype):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(5, 4, 16, generator=gen)
    k = torch.randn(30, 2, 16, generator=gen).double()
    v = torch.randn(30, 2, 16, generator=gen).double()
    o_a, lse_a = attention64(q, k[:12], v[:12], 0.25)
    o_b, lse_b = attention64(q, k[12:], v[12:], 0.25)
    ref_o, ref_lse = attention64(q, k, v, 0.25)
    o, lse = ops.merge_states(o_a.to(dtype), lse_a.float(), o_b.to(dtype), lse_b.float(),
                              out=poisoned(o_a.shape, dtype))
    assert rel_err(o, ref_o) < TOLERANCE[dtype] + 4e-3 * (dtype != torch.float32)
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5)


def test_merge_states_minus_inf_edges():
    o_a = torch.tensor([[[1.0, 2.0]], [[float("nan"), float("nan")]], [[5.0, 6.0]]])
    o_b = torch.tensor([[[float("nan"), 7.0]], [[3.0, 4.0]], [[8.0, 9.0]]])
    inf = float("inf")
    lse_a = torch.tensor([[0.5], [-inf], [-inf]])
    lse_b = torch.tensor([[-inf], [1.5], [-inf]])
    o, lse = ops.merge_states(o_a, lse_a, o_b, lse_b)
    assert torch.equal(o[0], o_a[0]) and lse[0, 0] == 0.5      # b empty: a unchanged, NaN in o_b ignored
    assert torch.equal(o[1], o_b[1]) and lse[1, 0] == 1.5      # a empty
    assert torch.equal(o[2], torch.zeros(1, 2)) and lse[2, 0] == -inf  # both empty


def test_merge_states_in_place_into_a():
    o_a, lse_a = torch.randn(3, 2, 8), torch.randn(3, 2)
    o_b, lse_b = torch.randn(3, 2, 8), torch.randn(3, 2)
    expected_o, expected_lse = ops.merge_states(o_a, lse_a, o_b, lse_b)
    ops.merge_states(o_a, lse_a, o_b, lse_b, out=o_a, lse_out=lse_a)
    assert torch.allclose(o_a, expected_o) and torch.allclose(lse_a, expected_lse)


# ---- bad arguments: ValueError naming the kernel and the argument -----------------------------------

def _prefill_args(dtype=torch.float32):
    kv = PagedKV(8, 16, 2, 16, dtype)
    case = make_prefill_case(kv, [(3, 20)], 4, 16, dtype)
    return dict(q=case.q, k_cache=kv.k, v_cache=kv.v, block_tables=case.block_tables,
                query_start=case.query_start, context_lens=case.context_lens)


def test_bad_dtype_names_kernel_and_argument():
    args = _prefill_args()
    args["q"] = args["q"].double()
    with pytest.raises(ValueError, match=r"prefill_attention: argument 'q' has dtype float64"):
        ops.prefill_attention(**args)


def test_cache_dtype_mismatch():
    args = _prefill_args()
    args["k_cache"] = args["k_cache"].half()
    with pytest.raises(ValueError, match=r"prefill_attention: argument 'k_cache'"):
        ops.prefill_attention(**args)


def test_non_contiguous_last_dim():
    args = _prefill_args()
    args["q"] = args["q"].transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(ValueError, match=r"prefill_attention: argument 'q' must have a contiguous last dimension"):
        ops.prefill_attention(**args)


def test_block_table_entry_out_of_range():
    args = _prefill_args()
    args["block_tables"] = args["block_tables"].clone()
    args["block_tables"][0, 1] = 8
    with pytest.raises(ValueError, match=r"prefill_attention: argument 'block_tables\[0\]' entry 1 = 8 is out of range"):
        ops.prefill_attention(**args)


def test_block_tables_wrong_index_dtype():
    args = _prefill_args()
    args["block_tables"] = args["block_tables"].long()
    with pytest.raises(ValueError, match=r"prefill_attention: argument 'block_tables' must be int32"):
        ops.prefill_attention(**args)


def test_context_shorter_than_queries():
    args = _prefill_args()
    args["context_lens"] = torch.tensor([2], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"prefill_attention: argument 'context_lens'"):
        ops.prefill_attention(**args)


def test_gqa_ratio_must_divide():
    kv = PagedKV(8, 16, 3, 16, torch.float32)
    case = make_prefill_case(kv, [(2, 2)], 4, 16, torch.float32)
    with pytest.raises(ValueError, match=r"prefill_attention: argument 'k_cache' KV heads \(3\) must divide"):
        ops.prefill_attention(case.q, kv.k, kv.v, case.block_tables, case.query_start, case.context_lens)


@pytest.mark.parametrize("scale", [0.0, -0.125, float("nan"), float("inf")])
def test_attention_scale_must_be_positive(scale):
    # The kernels take the row max of the raw scores and fold the scale into the exponent: a
    # non-positive scale would pick the wrong max, so both attention ops refuse it by name.
    args = _prefill_args()
    with pytest.raises(ValueError, match=r"prefill_attention: argument 'scale' must be positive and finite"):
        ops.prefill_attention(**args, scale=scale)
    kv = PagedKV(32, 16, 2, 16, torch.float32)
    case = make_cascade_case(kv, 4, [2], [lambda i: 20], [1, 2, 3, 4], 4, 16, torch.float32)
    with pytest.raises(ValueError, match=r"cascade_decode_attention: argument 'scale' must be positive and finite"):
        ops.cascade_decode_attention(case.q, kv.k, kv.v, case.levels, scale=scale)


def test_store_kv_slot_out_of_range():
    k = torch.randn(2, 1, 8)
    cache = torch.zeros(2, 4, 1, 8)
    with pytest.raises(ValueError, match=r"store_kv: argument 'slot_mapping' entry 1 = 8 is out of range"):
        ops.store_kv(k, k, cache, cache.clone(), torch.tensor([0, 8]))
    with pytest.raises(ValueError, match=r"store_kv: argument 'slot_mapping' must be int64"):
        ops.store_kv(k, k, cache, cache.clone(), torch.tensor([0, 1], dtype=torch.int32))


def test_cascade_bad_levels():
    kv = PagedKV(32, 16, 2, 16, torch.float32)
    case = make_cascade_case(kv, 4, [2], [lambda i: 20], [1, 2, 3, 4], 4, 16, torch.float32)
    levels = case.levels
    bad_range = ops.DecodeLevels(**{**levels.__dict__, "prefix_q_range": torch.tensor([[0, 2], [2, 5]],
                                                                                     dtype=torch.int32)})
    with pytest.raises(ValueError, match=r"cascade_decode_attention: argument 'prefix_q_range' entry 1"):
        ops.cascade_decode_attention(case.q, kv.k, kv.v, bad_range)
    bad_blocks = ops.DecodeLevels(**{**levels.__dict__, "prefix_kv_blocks": levels.prefix_kv_blocks + 100})
    with pytest.raises(ValueError, match=r"cascade_decode_attention: argument 'prefix_kv_blocks \(prefix 0\)'"):
        ops.cascade_decode_attention(case.q, kv.k, kv.v, bad_blocks)
    short_table = ops.DecodeLevels(**{**levels.__dict__, "suffix_kv_lens": torch.tensor([1, 2, 3, 40],
                                                                                       dtype=torch.int32)})
    with pytest.raises(ValueError, match=r"cascade_decode_attention: argument 'suffix_block_tables\[3\]'"):
        ops.cascade_decode_attention(case.q, kv.k, kv.v, short_table)


def test_merge_states_shape_mismatch():
    with pytest.raises(ValueError, match=r"merge_states: argument 'o_b' must have o_a's shape"):
        ops.merge_states(torch.zeros(2, 2, 4), torch.zeros(2, 2), torch.zeros(2, 2, 5), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"merge_states: argument 'lse_a' must be float32"):
        ops.merge_states(torch.zeros(2, 2, 4), torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, 2, 4),
                         torch.zeros(2, 2))


def test_empty_index_arrays_with_zero_strides_are_accepted():
    # numpy/torch give empty views strides like (0, 0); an empty array has nothing to address.
    kv = PagedKV(8, 16, 2, 16, torch.float32)
    case = make_cascade_case(kv, 3, [], [], [4, 1, 7], 4, 16, torch.float32)
    levels = case.levels
    empty_range = torch.zeros(0, dtype=torch.int32).as_strided((0, 2), (0, 0))
    levels = ops.DecodeLevels(**{**levels.__dict__, "prefix_q_range": empty_range})
    expected = ops.cascade_decode_attention(case.q, kv.k, kv.v, case.levels)
    assert torch.equal(ops.cascade_decode_attention(case.q, kv.k, kv.v, levels), expected)


def sample_rows_case(rows: int, vocab: int, dtype: torch.dtype, device="cpu", seed: int = 0):
    """Logits with a repeated maximum in row 0 (greedy ties go to the lowest id) and -inf entries in
    row 1, a temperature of 0 on every third row, keys from the sampler's hash."""
    from batchllm_core.sampling import _hash32
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype)
    if vocab > 3:
        logits[0, 1] = logits[0, 3] = logits[0].float().max() + 1
        logits[1, ::2] = -math.inf
    temperature = torch.where(torch.arange(rows) % 3 == 0, 0.0, 0.5 + torch.arange(rows) / rows).float()
    keys = _hash32(torch.arange(rows, dtype=torch.int64) * 7919 + seed)
    return logits.to(device), temperature.to(device), keys.to(device)


# (top_k, top_p, min_p) of the filtered cases' rows, in turn: each filter alone, top-k or top-p with
# min-p, the extremes (top_k 1, a nucleus of one token, min_p 1), no filter, and top-k with top-p
# (Qwen2.5's recommended 20 and 0.8; top_p over the top-k's mass).
FILTERS = [(1, 1.0, 0.0), (5, 1.0, 0.0), (50, 1.0, 0.0), (0, 0.1, 0.0), (0, 0.5, 0.0), (0, 0.9, 0.0),
           (0, 0.99, 0.0), (0, 1e-6, 0.0), (0, 1.0, 0.05), (0, 1.0, 0.3), (0, 1.0, 1.0), (5, 1.0, 0.2),
           (0, 0.8, 0.1), (0, 1.0, 0.0), (10**9, 1.0, 0.0), (20, 0.8, 0.0), (3, 0.5, 0.0), (50, 0.95, 0.05),
           (10**9, 0.9, 0.0)]


def filtered_sample_case(rows: int, vocab: int, dtype: torch.dtype, device="cpu", seed: int = 0):
    """sample_rows_case with each row's filters from FILTERS (greedy rows ignore theirs)."""
    logits, temperature, keys = sample_rows_case(rows, vocab, dtype, device, seed)
    picked = [FILTERS[(r + seed) % len(FILTERS)] for r in range(rows)]
    filters = (torch.tensor([f[0] for f in picked], dtype=torch.int64, device=device),
               torch.tensor([f[1] for f in picked], dtype=torch.float32, device=device),
               torch.tensor([f[2] for f in picked], dtype=torch.float32, device=device))
    return logits, temperature, keys, filters


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 7, 1000, 4104])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sample_rows_filters_match_the_sorted_formulas(dtype, vocab, seed):
    # The kept tokens by a sort of each row (ops_reference), against the CPU reference's tries; bf16
    # rows have many equal logits (ties go to the lower id in the order as in the draw).
    logits, temperature, keys, filters = filtered_sample_case(30, vocab, dtype, seed=seed)
    ids, lse, logprobs = ops.sample_rows(logits, temperature, keys, filters)
    ref_ids, ref_lse, ref_logprobs = sample_rows_reference(logits, temperature, keys, filters)
    assert torch.equal(ids, ref_ids)
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert torch.allclose(logprobs.double(), ref_logprobs, atol=1e-4, rtol=1e-5)
    if vocab >= 1000:  # the filters do cut: the unfiltered draws differ on some rows
        plain_ids, _, _ = ops.sample_rows(logits, temperature, keys)
        assert not torch.equal(ids, plain_ids)


def top_k_with_top_p_case(device="cpu"):
    """Rows where top_p must weigh the mass of what top_k keeps, not the row's: 64 rows of 4,104 equal
    logits (the order is by id; top_k 3, top_p 0.6: 0.6 x 3 keeps ids 0 and 1, where 0.6 x 4104
    would keep all 3), then 64 rows of logits 5, 4, 3, ... (top_k 2, top_p 0.7: only id 0, where
    the row's mass would keep 0 and 1). Each row its own key; temperature 1. Returns the case and
    the ids each half may draw."""
    from batchllm_core.sampling import _hash32
    flat = torch.zeros(64, 4104)
    steps = (5.0 - torch.arange(4104, dtype=torch.float32)).clamp(min=-50).repeat(64, 1)
    logits = torch.cat([flat, steps]).to(device)
    rows = logits.shape[0]
    keys = _hash32(torch.arange(rows, dtype=torch.int64) * 104729 + 1).to(device)
    filters = (torch.tensor([3] * 64 + [2] * 64, dtype=torch.int64, device=device),
               torch.tensor([0.6] * 64 + [0.7] * 64, dtype=torch.float32, device=device),
               torch.zeros(rows, dtype=torch.float32, device=device))
    return (logits, torch.ones(rows, device=device), keys, filters), ({0, 1}, {0})


# A draw key whose noise for token 0 comes from the largest hash (0xFFFFFFFF: murmur3's fmix32
# inverted): with 24 hash bits that noise was +inf, and token 0 won whatever its logit.
LARGEST_HASH_KEY = 2948243707


def largest_hash_case(device="cpu"):
    logits = torch.randn(2, 4104, generator=torch.Generator().manual_seed(5))
    logits[:, 0] = -30.0  # token 0: no chance
    keys = torch.tensor([LARGEST_HASH_KEY, LARGEST_HASH_KEY], dtype=torch.int64)
    return logits.to(device), torch.ones(2, device=device), keys.to(device)


def test_gumbel_noise_is_finite_at_the_largest_hash():
    from batchllm_core.sampling import _gumbel_noise, _hash32
    token_hashes = _hash32(torch.arange(3, dtype=torch.int64) ^ 0x2545F491)
    noise = _gumbel_noise(torch.tensor([LARGEST_HASH_KEY]), token_hashes)
    assert torch.isfinite(noise).all() and 16.0 < noise[0, 0].item() < 16.7
    ids, _, _ = ops.sample_rows(*largest_hash_case())
    assert 0 not in ids.tolist()
    assert torch.equal(ids, sample_rows_reference(*largest_hash_case())[0])


def peaked_sample_case(rows: int, temperature: float):
    """A trained model's rows: a few likely tokens far above the rest (8 of 4,104 up to 25 higher);
    and filters for every third row (top_p 0.9, top_k 5, min_p 0.05). CPU tensors."""
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(rows, 4104, generator=gen) * 3
    logits[:, :8] += 25 * torch.rand(rows, 8, generator=gen)
    keys = torch.arange(rows, dtype=torch.int64) * 2654435761 % (1 << 32)
    thirds = rows // 3
    filters = (torch.tensor([0, 5, 0] * thirds), torch.tensor([0.9, 1.0, 1.0] * thirds),
               torch.tensor([0.0, 0.0, 0.05] * thirds))
    return logits, torch.full((rows,), temperature), keys, filters


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_sample_rows_on_peaked_logits_equals_scoring_every_token(temperature):
    # The draw skips the noise of tokens more than its largest value below the best score; the
    # tokens drawn are those of scoring every token (ops_reference), filters or not.
    logits, temps, keys, filters = peaked_sample_case(48, temperature)
    ids, _, _ = ops.sample_rows(logits, temps, keys)
    assert torch.equal(ids, sample_rows_reference(logits, temps, keys)[0])
    ids, _, _ = ops.sample_rows(logits, temps, keys, filters)
    assert torch.equal(ids, sample_rows_reference(logits, temps, keys, filters)[0])
    assert len(set(ids.tolist())) > 3


def test_sample_rows_top_p_weighs_what_top_k_keeps():
    case, (flat_ids, step_ids) = top_k_with_top_p_case()
    ids, _, _ = ops.sample_rows(*case)
    assert set(ids[:64].tolist()) == flat_ids and set(ids[64:].tolist()) == step_ids
    assert torch.equal(ids, sample_rows_reference(*case[:3], case[3])[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 7, 1000, 4104])
def test_sample_rows_matches_the_sampler_formulas(dtype, vocab):
    logits, temperature, keys = sample_rows_case(12, vocab, dtype)
    ids, lse, logprobs = ops.sample_rows(logits, temperature, keys)
    ref_ids, ref_lse, ref_logprobs = sample_rows_reference(logits, temperature, keys)
    assert torch.equal(ids, ref_ids)
    if vocab > 3:
        assert ids[0].item() == 1  # greedy tie: the lowest id
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert torch.allclose(logprobs.double(), ref_logprobs, atol=1e-4, rtol=1e-5)


def test_sample_rows_strided_rows_and_errors():
    wide, temperature, keys = sample_rows_case(5, 40, torch.float32)
    logits = wide[:, 3:36]  # rows of 33 columns, 40 apart
    ids, lse, _ = ops.sample_rows(logits, temperature, keys)
    ref_ids, ref_lse, _ = sample_rows_reference(logits, temperature, keys)
    assert torch.equal(ids, ref_ids) and torch.allclose(lse.double(), ref_lse, atol=1e-5)
    with pytest.raises(ValueError, match="sample_rows: argument 'keys' must be int64"):
        ops.sample_rows(logits, temperature, keys.int())
    with pytest.raises(ValueError, match="sample_rows: argument 'temperature' has size 4"):
        ops.sample_rows(logits, temperature[:4], keys)
    with pytest.raises(ValueError, match="sample_rows: argument 'logits' must have a contiguous last dimension"):
        ops.sample_rows(wide.t(), temperature[:1].expand(40).contiguous(), keys[:1].expand(40).contiguous())


# ---- layer ops (rms_norm, silu_and_mul, rotary_embedding) against the model's torch formulas ----------

def check_layer_ops(dtype: torch.dtype, device="cpu", seed: int = 0) -> None:
    """The three layer ops on ``device`` equal models.llama's torch formulas (computed on the CPU).

    Shapes of a real step: rows of 2 x 96 hidden, qkv views of one fused row (strided q and k, 4:1
    GQA, head dim 32), positions up to 40,000, llama3-scaled inverse frequencies.
    """
    import torch.nn.functional as F

    from batchllm_core.models.llama import Rope, RMSNorm

    gen = torch.Generator().manual_seed(seed)
    rows, hidden = 37, 192
    x = (torch.randn(rows, hidden, generator=gen) * 3).to(dtype)
    residual = torch.randn(rows, hidden, generator=gen).to(dtype)
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    norm = RMSNorm(hidden, 1e-5).to(dtype)
    norm.weight.data = weight.clone()
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]

    def close(ours, ref):
        ours = ours.cpu().float()
        assert not torch.isnan(ours).any()
        assert (ours - ref.float()).abs().max().item() <= tol * ref.float().abs().max().item()

    with torch.no_grad():
        close(ops.rms_norm(x.to(device), weight.to(device), 1e-5), norm(x))
        res = residual.to(device, copy=True)
        summed = ops.rms_norm(x.to(device), weight.to(device), 1e-5, residual=res)
        close(res, x + residual)
        close(summed, norm(x + residual))
        in_place = x.to(device, copy=True)
        assert ops.rms_norm(in_place, weight.to(device), 1e-5, out=in_place).data_ptr() == in_place.data_ptr()
        close(in_place, norm(x))

        gate_up = (torch.randn(rows, 2 * 80, generator=gen) * 2).to(dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        close(ops.silu_and_mul(gate_up.to(device)), F.silu(gate) * up)

        heads, kv_heads, head_dim = 8, 2, 32
        qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
        positions = torch.randint(0, 40_000, (rows,), generator=gen, dtype=torch.int32)
        config = dataclasses.replace(ModelConfig.from_name("tiny"), head_dim=head_dim, rope_type="llama3",
                                     rope_factor=8.0)
        inv_freq = config.rope_inv_freq()
        q = qkv[:, :heads * head_dim].view(rows, heads, head_dim)
        k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(rows, kv_heads, head_dim)
        ref_q, ref_k = Rope(positions, inv_freq, dtype, kernels=False).apply(q, k)
        on_device = qkv.to(device, copy=True)
        dq = on_device[:, :heads * head_dim].view(rows, heads, head_dim)
        dk = on_device[:, heads * head_dim:(heads + kv_heads) * head_dim].view(rows, kv_heads, head_dim)
        ops.rotary_embedding(dq, dk, positions.to(device), inv_freq.to(device))
        close(dq, ref_q)
        close(dk, ref_k)
        close(on_device[:, (heads + kv_heads) * head_dim:], qkv[:, (heads + kv_heads) * head_dim:])  # v untouched

        # The fused store: the same rotation, then the rotated k and v rows in their slots (row 3 a
        # padding row, slot -1), as ops.store_kv leaves the cache after the plain rotation.
        fused = qkv.to(device, copy=True)
        fq = fused[:, :heads * head_dim].view(rows, heads, head_dim)
        fk = fused[:, heads * head_dim:(heads + kv_heads) * head_dim].view(rows, kv_heads, head_dim)
        fv = fused[:, (heads + kv_heads) * head_dim:].view(rows, kv_heads, head_dim)
        slots = torch.randperm(48, generator=gen)[:rows].to(device)
        slots[3] = -1
        caches = [torch.randn(3, 16, kv_heads, head_dim, generator=gen).to(dtype).to(device) for _ in range(2)]
        expected = [c.clone() for c in caches]
        ops.store_kv(dk, on_device[:, (heads + kv_heads) * head_dim:].view(rows, kv_heads, head_dim), *expected, slots)
        ops.rotary_embedding(fq, fk, positions.to(device), inv_freq.to(device), store=(fv, *caches, slots))
        assert torch.equal(fq, dq) and torch.equal(fk, dk)
        assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
        assert not torch.equal(caches[0], expected[0].new_zeros(expected[0].shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_layer_ops_match_the_model_formulas(dtype):
    check_layer_ops(dtype)


def test_layer_ops_bad_arguments_are_named():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"rms_norm: argument 'weight' must be \[8\] in x's dtype"):
        ops.rms_norm(x, torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="rms_norm: argument 'residual' must have x's shape"):
        ops.rms_norm(x, torch.ones(8), 1e-5, residual=torch.zeros(3, 8))
    with pytest.raises(ValueError, match="silu_and_mul: argument 'gate_up' must have an even last dim"):
        ops.silu_and_mul(torch.randn(4, 7))
    q, k = torch.randn(4, 2, 8), torch.randn(4, 1, 8)
    with pytest.raises(ValueError, match="rotary_embedding: argument 'positions' must be int32, got int64"):
        ops.rotary_embedding(q, k, torch.arange(4), torch.ones(4))
    with pytest.raises(ValueError, match="rotary_embedding: argument 'inv_freq' has size 3"):
        ops.rotary_embedding(q, k, torch.arange(4, dtype=torch.int32), torch.ones(3))
    positions, inv_freq = torch.arange(4, dtype=torch.int32), torch.ones(4)
    cache = torch.zeros(2, 4, 1, 8)
    with pytest.raises(ValueError, match="rotary_embedding: argument 'v' must have k's shape"):
        ops.rotary_embedding(q, k, positions, inv_freq, store=(torch.zeros(4, 2, 8), cache, cache, torch.zeros(4, dtype=torch.int64)))
    with pytest.raises(ValueError, match="rotary_embedding: argument 'slot_mapping' entry 1 = 8 is out of range"):
        ops.rotary_embedding(q, k, positions, inv_freq, store=(torch.zeros(4, 1, 8), cache, cache, torch.tensor([0, 8, 1, 2])))
