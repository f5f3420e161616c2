"""CUDA attention kernels against float64 references.

Same sweeps as test_ops.py on CUDA tensors: fp16 and bf16, head dims 64 and 128, GQA ratios,
prefix/suffix lengths including 0 and non-multiples of the page size, levels 0-3. Outputs are
NaN-poisoned before every run; rel err < 2e-3 (fp16) / 1e-2 (bf16); index checks on.

Where there is no GPU, the same tests run the CUDA kernels compiled for the CPU emulation through
the real bindings and ops.py's CUDA branch (cuda_emulation.py), on CPU tensors presented as device 0;
without the emulation module they skip with a reason.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import cuda_emulation
from batchllm_core import ops
from conftest import GPU_AVAILABLE, requires_gpu
from ops_reference import (sample_rows_reference, TOLERANCE, PagedKV, attention64, cascade_reference, make_cascade_case,
                           make_prefill_case, poisoned, prefill_reference, rel_err)
from test_ops import CASCADE_SHAPES, PREFILL_SEQS, sample_rows_case

EMULATED = not GPU_AVAILABLE and cuda_emulation.module() is not None
pytestmark = [pytest.mark.gpu] if EMULATED else requires_gpu

DTYPES = [torch.float16, torch.bfloat16]
HEADS = [(4, 4), (8, 2), (32, 8), (8, 1)]
HEAD_DIMS = [64, 128]
DEVICE = "cpu" if EMULATED else "cuda"


@pytest.fixture(autouse=True)
def _emulation(monkeypatch):
    if EMULATED:
        cuda_emulation.activate(monkeypatch)


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()
# The tile kernels of prefill and cascade prefixes (BATCHLLM_ATTENTION_TILES), all until a GPU run
# picks one: WMMA with O in shared memory (attention_tile.cuh), mma.sync with O in registers
# (attention_mma.cuh) in 64-row (4 warps) and 128-row (8 warps) tiles, and the 128-row tiles on
# Hopper's wgmma, plain and pipelined (attention_wgmma.cuh; mma128 runs where the device or build has
# no wgmma), and the pipelined one in 64-row tiles of one warpgroup (wgmma64; else mma) or on 128-key
# tiles with Q in shared memory (wgmma-k128; else mma128).
TILE_KERNELS = ["wmma", "mma", "mma128", "wgmma", "wgmma-pipe", "wgmma64", "wgmma-k128"]
# Cascade decode variants, "<suffix level>+<prefix tiles>": the suffix on decode_rows (default), on
# the old tile kernel (BATCHLLM_CASCADE_SUFFIX=tile), decode_rows and the prefix tiles in one fused
# launch (BATCHLLM_CASCADE_LAUNCH=fused), decode_rows merging the prefix states in its epilogue
# (=merge), or decode_rows on a side stream beside the prefix tiles (=streams); "staged": decode_rows
# with its staged key loop (BATCHLLM_DECODE_ROWS=staged: K/V tiles in shared memory by cp.async);
# "owned": one launch whose CTAs take tiles of rows through every level (=owned; its prefix loop is
# the mma tile's whatever the tiles setting).
CASCADE_KERNELS = ["decode+wmma", "tile+wmma", "decode+mma", "decode+mma128", "decode+wgmma", "fused+wmma",
                   "fused+mma", "merge+wmma", "merge+mma128", "merge+wgmma", "merge+wgmma-pipe", "streams+wmma",
                   "decode+wgmma-pipe", "decode+wgmma64", "merge+wgmma64", "fused+wgmma64", "staged+wgmma-pipe",
                   "staged+mma", "decode+wgmma-k128", "staged+wgmma-k128", "owned+mma"]


def use_cascade_kernels(kernels: str, monkeypatch) -> None:
    suffix, tiles = kernels.split("+")
    monkeypatch.setenv("BATCHLLM_CASCADE_SUFFIX", "tile" if suffix == "tile" else "decode")
    monkeypatch.setenv("BATCHLLM_CASCADE_LAUNCH",
                       suffix if suffix in ("fused", "merge", "streams", "owned") else "separate")
    monkeypatch.setenv("BATCHLLM_DECODE_ROWS", "staged" if suffix == "staged" else "unrolled")
    monkeypatch.setenv("BATCHLLM_ATTENTION_TILES", tiles)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_store_kv_cuda(dtype, head_dim):
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn((6, 16, 2, head_dim), generator=gen).to(dtype).to(DEVICE)
    v_cache = torch.randn_like(k_cache)
    k = torch.randn((11, 2, head_dim), generator=gen).to(dtype).to(DEVICE)
    v = torch.randn_like(k)
    slots = torch.randperm(96, generator=gen)[:11]
    slots[4] = -1
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    written = slots >= 0
    expected_k.view(-1, 2, head_dim)[slots[written].to(DEVICE)] = k[written.to(DEVICE)]
    expected_v.view(-1, 2, head_dim)[slots[written].to(DEVICE)] = v[written.to(DEVICE)]
    ops.store_kv(k, v, k_cache, v_cache, slots.to(DEVICE), check_indices=True)
    synchronize()
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def default_and_bf16_variants(variants: list) -> list:
    """(dtype, variant) pairs: the default kernels (first) in both dtypes, the A/B variants in bf16."""
    return [(dtype, v) for v in variants for dtype in DTYPES if v == variants[0] or dtype == torch.bfloat16]


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seqs_name", list(PREFILL_SEQS))
@pytest.mark.parametrize("dtype,tiles", default_and_bf16_variants(TILE_KERNELS))
def test_prefill_attention_cuda(dtype, heads, head_dim, seqs_name, tiles, monkeypatch):
    monkeypatch.setenv("BATCHLLM_ATTENTION_TILES", tiles)
    num_q_heads, num_kv_heads = heads
    seqs = PREFILL_SEQS[seqs_name]
    kv = PagedKV(64, 16, num_kv_heads, head_dim, dtype, device=DEVICE)
    case = make_prefill_case(kv, seqs, num_q_heads, head_dim, dtype, device=DEVICE)
    out = poisoned(case.q.shape, dtype, DEVICE)
    ops.prefill_attention(case.q, kv.k, kv.v, case.block_tables, case.query_start, case.context_lens, out=out,
                          check_indices=True)
    synchronize()
    ref = prefill_reference(kv, case, seqs, 1.0 / math.sqrt(head_dim))
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiles", TILE_KERNELS)
def test_prefill_attention_cuda_long_chunk_over_cache(dtype, tiles, monkeypatch):
    monkeypatch.setenv("BATCHLLM_ATTENTION_TILES", tiles)
    # A 300-token chunk over a 1000-token context: many key tiles, causal masking inside tiles
    # (a third of it, 8 q heads, on the CPU emulation, whose cost is per tile).
    kv = PagedKV(80, 16, 8, 128, dtype, device=DEVICE)
    seqs = [(100, 330), (1, 77)] if EMULATED else [(300, 1000), (1, 77)]
    case = make_prefill_case(kv, seqs, 8 if EMULATED else 32, 128, dtype, device=DEVICE)
    out = ops.prefill_attention(case.q, kv.k, kv.v, case.block_tables, case.query_start, case.context_lens,
                                out=poisoned(case.q.shape, dtype, DEVICE), check_indices=True)
    assert rel_err(out, prefill_reference(kv, case, seqs, 1.0 / math.sqrt(128))) < TOLERANCE[dtype]


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("name", list(CASCADE_SHAPES))
@pytest.mark.parametrize("dtype,kernels", default_and_bf16_variants(CASCADE_KERNELS))
def test_cascade_decode_attention_cuda(dtype, heads, head_dim, name, kernels, monkeypatch):
    from test_ops import run_cascade_case
    use_cascade_kernels(kernels, monkeypatch)
    o, lse, ref_o, ref_lse = run_cascade_case(name, dtype, heads, head_dim, device=DEVICE, check_indices=True)
    synchronize()
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert rel_err(o, ref_o) < TOLERANCE[dtype]
    assert torch.allclose(lse.double().cpu(), ref_lse, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("kernels", ["decode+wgmma-pipe", "decode+mma", "merge+wgmma-pipe", "decode+wmma", "owned+mma"])
@pytest.mark.parametrize("name", ["two_levels", "one_level_odd_lengths"])
def test_cascade_cuda_qwen_gqa_of_7(name, kernels, monkeypatch):
    # Qwen2.5-7B's heads (W6): 28 q heads over 4 KV heads, a GQA ratio of 7 that no power-of-two
    # tiling divides (decode_rows' head chunks of 4, tile rows = readers x 7).
    use_cascade_kernels(kernels, monkeypatch)
    from test_ops import run_cascade_case
    o, lse, ref_o, ref_lse = run_cascade_case(name, torch.bfloat16, (28, 4), 128, device=DEVICE, check_indices=True)
    synchronize()
    assert not torch.isnan(o).any()
    assert rel_err(o, ref_o) < TOLERANCE[torch.bfloat16]
    assert torch.allclose(lse.double().cpu(), ref_lse, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("tiles", ["wgmma-pipe", "mma", "wmma"])
def test_prefill_attention_cuda_qwen_gqa_of_7(tiles, monkeypatch):
    monkeypatch.setenv("BATCHLLM_ATTENTION_TILES", tiles)
    kv = PagedKV(64, 16, 4, 128, torch.bfloat16, device=DEVICE)
    seqs = PREFILL_SEQS["chunks_over_cache"]
    case = make_prefill_case(kv, seqs, 28, 128, torch.bfloat16, device=DEVICE)
    out = ops.prefill_attention(case.q, kv.k, kv.v, case.block_tables, case.query_start, case.context_lens,
                                out=poisoned(case.q.shape, torch.bfloat16, DEVICE), check_indices=True)
    synchronize()
    assert rel_err(out, prefill_reference(kv, case, seqs, 1.0 / math.sqrt(128))) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiles", TILE_KERNELS)
def test_cascade_cuda_many_readers_one_long_prefix(dtype, tiles, monkeypatch):
    monkeypatch.setenv("BATCHLLM_ATTENTION_TILES", tiles)
    # Kernel-grid shape in miniature: 96 rows read one 1000-token prefix (several 64-row tiles; 400
    # tokens on the CPU emulation).
    kv = PagedKV(300, 16, 8, 128, dtype, device=DEVICE)
    rows = 96
    prefix = 400 if EMULATED else 1000
    case = make_cascade_case(kv, rows, [1], [lambda i: prefix], [(7 * r) % 40 for r in range(rows)], 32, 128, dtype,
                             device=DEVICE)
    o = ops.cascade_decode_attention(case.q, kv.k, kv.v, case.levels, out=poisoned(case.q.shape, dtype, DEVICE),
                                     check_indices=True)
    ref_o, _ = cascade_reference(kv, case, 1.0 / math.sqrt(128))
    assert rel_err(o, ref_o) < TOLERANCE[dtype]


def assert_cascade_matches_reference(kv, case, levels, dtype):
    """The case's cascade decode (head dim 128) through ops with `levels`, against float64."""
    o, lse = ops.cascade_decode_attention(case.q, kv.k, kv.v, levels, return_lse=True,
                                          out=poisoned(case.q.shape, dtype, DEVICE), check_indices=True)
    ref_o, ref_lse = cascade_reference(kv, case, 1.0 / math.sqrt(128))
    assert rel_err(o, ref_o) < TOLERANCE[dtype]
    assert torch.allclose(lse.double().cpu(), ref_lse, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernels", ["decode+wmma", "decode+mma128", "decode+wgmma", "decode+wgmma-pipe",
                                     "fused+mma", "merge+mma", "streams+mma", "owned+mma"])
def test_cascade_cuda_split_kv_with_unequal_prefixes(dtype, kernels, monkeypatch):
    use_cascade_kernels(kernels, monkeypatch)
    # Few row tiles -> the prefix keys are split into chunks; the 90-token prefix has empty chunks
    # (lse -inf, o 0) that the combine step must merge as no-ops.
    kv = PagedKV(200, 16, 8, 128, dtype, device=DEVICE)
    rows = 64
    case = make_cascade_case(kv, rows, [2], [lambda i: 1000 if i == 0 else 90], [(5 * r) % 33 for r in range(rows)],
                             32, 128, dtype, device=DEVICE)
    assert_cascade_matches_reference(kv, case, case.levels, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_cascade_cuda_owned_tiles_across_prefix_boundaries(dtype, head_dim, monkeypatch):
    use_cascade_kernels("owned+mma", monkeypatch)
    # Owned tiles hold 16 readers of a GQA group of 4; these prefixes' reader ranges (3 x 13 rows, then
    # 2 x 6 within each, row 39 under the first level only) end inside tiles, and every prefix is
    # longer than a 64-key tile: a tile must mask the rows a prefix does not cover on its unmasked key
    # tiles too, not only on the last, partial one.
    kv = PagedKV(200, 16, 8, head_dim, dtype, device=DEVICE)
    rows = 40
    case = make_cascade_case(kv, rows, [3, 2], [lambda i: 100 + 17 * i, lambda i: 70 + 9 * i],
                             [(3 * r) % 21 for r in range(rows)], 32, head_dim, dtype, device=DEVICE)
    o, lse = ops.cascade_decode_attention(case.q, kv.k, kv.v, case.levels, return_lse=True,
                                          out=poisoned(case.q.shape, dtype, DEVICE), check_indices=True)
    synchronize()
    ref_o, ref_lse = cascade_reference(kv, case, 1.0 / math.sqrt(head_dim))
    assert not torch.isnan(o).any()
    assert rel_err(o, ref_o) < TOLERANCE[dtype]
    assert torch.allclose(lse.double().cpu(), ref_lse, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernels", ["decode+wmma", "decode+mma128", "fused+mma", "merge+mma", "merge+wgmma",
                                     "merge+wgmma-pipe", "streams+mma", "owned+mma"])
def test_cascade_cuda_few_rows_long_suffixes(dtype, kernels, monkeypatch):
    use_cascade_kernels(kernels, monkeypatch)
    # 3 rows x 2 KV heads leave the SMs idle: each row's suffix keys are split too, which needs more
    # workspace (ops.py sizes it from the suffix hint; a short size would be refused by the binding).
    kv = PagedKV(120, 16, 2, 128, dtype, device=DEVICE)
    case = make_cascade_case(kv, 3, [1], [lambda i: 40], [900, 300, 0], 8, 128, dtype, device=DEVICE)
    assert_cascade_matches_reference(kv, case, case.levels, dtype)


def case_levels_on_host(case) -> dict:
    """A cascade case's level arrays as the numpy dict cuda_graphs pads."""
    return {name: getattr(case.levels, name).cpu().numpy() for name in (
        "prefix_kv_indptr", "prefix_kv_blocks", "prefix_kv_lens", "prefix_q_range", "suffix_block_tables",
        "suffix_kv_lens")}


def graph_step_levels(levels: dict, rows: int, key, *splits):
    """The levels a CUDA graph of `key` runs for a step of `rows` rows (cuda_graphs.pad_decode_step,
    then static_levels): the key's hints, the step's own split arrays (`splits`, else unsplit)."""
    from batchllm_core.cuda_graphs import pad_decode_step, static_levels

    host = {"input_ids": [0] * rows, "positions": [0] * rows, "slot_mapping": [0] * rows}
    views = {name: torch.from_numpy(a).to(DEVICE) for name, a in pad_decode_step(host, levels, key, *splits).items()}
    return static_levels(views, key, 16)


@pytest.mark.skipif(not EMULATED, reason="pins the split on the emulation's 132 SMs (a GPU has its own count)")
def test_cascade_suffix_split_is_the_steps_own_eager_split():
    # decode_rows runs 4 CTAs an SM (528 on 132 SMs): a step's suffix keys are split while its CTAs
    # (rows x KV heads) fill under half of them, into at most 16 chunks of at least 256 keys.
    assert ops.cascade_suffix_split(2, 16, 32, 8, 2000, DEVICE) == (8, 256, 2)  # 16 CTAs: split 8 ways
    assert ops.cascade_suffix_split(2, 16, 32, 8, 300, DEVICE) == (2, 192, 2)  # 300 keys: 2 chunks
    assert ops.cascade_suffix_split(128, 128, 32, 8, 2000, DEVICE) == (1, 1 << 30, 128)  # 1,024 CTAs
    assert ops.cascade_suffix_split(64, 128, 32, 8, 300, DEVICE) == (1, 1 << 30, 128)  # 512: unsplit, all rows
    assert ops.cascade_suffix_split(1, 1, 28, 4, 5000, DEVICE) == (16, 320, 1)  # GQA 7: two CTAs an item
    with pytest.raises(ValueError, match="padded_rows"):
        ops.cascade_suffix_split(5, 4, 32, 8, 100, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernels", ["decode+wgmma-pipe", "decode+mma", "fused+mma", "merge+mma", "streams+mma",
                                     "tile+mma", "owned+mma"])
def test_cascade_cuda_device_split_of_a_graph_padded_step(dtype, kernels, monkeypatch):
    # A CUDA graph step (cuda_graphs.pad_decode_step): 3 real rows, two of long suffixes, replayed in
    # the graph of a 16-row key whose hints are its buckets. The step's own suffix split
    # (ops.cascade_suffix_split, what the 3 rows get launched eagerly) reaches the kernels on the
    # device: the real rows match the reference; the padded rows, left out once the keys are split,
    # give zeros and lse -inf (the tile suffix takes no splits: it attends them, one key each).
    from batchllm_core.cuda_graphs import GraphKey

    use_cascade_kernels(kernels, monkeypatch)
    kv = PagedKV(200, 16, 2, 128, dtype, device=DEVICE)
    case = make_cascade_case(kv, 3, [1], [lambda i: 40], [900, 300, 0], 8, 128, dtype, device=DEVICE)
    levels = case_levels_on_host(case)
    key = dataclasses.replace(GraphKey.of(levels, 3, 16), rows=16, prefix_keys=2048, suffix_width=128)
    split = ops.cascade_suffix_split(3, key.rows, 8, 2, 900, DEVICE)
    assert split[0] > 1 and split[0] * split[1] >= 900 and split[2] == 3  # split, the real rows only
    padded_levels = graph_step_levels(levels, 3, key, split)
    q = torch.cat([case.q, torch.randn((13, 8, 128)).to(dtype).to(DEVICE)])
    o, lse = ops.cascade_decode_attention(q, kv.k, kv.v, padded_levels, return_lse=True,
                                          out=poisoned(q.shape, dtype, DEVICE), check_indices=True)
    synchronize()
    ref_o, ref_lse = cascade_reference(kv, case, 1.0 / math.sqrt(128))
    assert rel_err(o[:3], ref_o) < TOLERANCE[dtype]
    assert torch.allclose(lse[:3].double().cpu(), ref_lse, atol=2e-3, rtol=1e-3)
    if kernels.startswith("tile"):
        assert torch.isfinite(o[3:]).all() and torch.isfinite(lse[3:]).all()
    else:
        assert torch.equal(o[3:].cpu(), torch.zeros_like(o[3:].cpu())) and (lse[3:] == -math.inf).all()
    # An array that would drop keys, or leave out a row with keys, is refused (index checks on).
    for bad, words in [((split[0], 64, 3), "below row 0"), ((1, 1 << 30, 1), "leaves out row 1"),
                       ((0, 64, 3), "splits >= 1")]:
        wrong = dataclasses.replace(padded_levels, suffix_split=torch.tensor(bad, dtype=torch.int32).to(DEVICE))
        with pytest.raises(ValueError, match=f"suffix_split.*{words}"):
            ops.cascade_decode_attention(q, kv.k, kv.v, wrong, check_indices=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernels", ["decode+wgmma-pipe", "fused+mma", "merge+mma", "streams+mma", "tile+mma",
                                     "owned+mma"])
def test_cascade_cuda_graph_step_without_prefixes_split_or_written_directly(dtype, kernels, monkeypatch):
    # A step without prefix levels (no sharing: W5, fcfs-lru): unsplit, decode_rows writes each row's
    # output itself and the combine leaves it alone (SuffixSplit::direct); split, the combine merges
    # the chunks. One padded graph launch (a 16-row key) replays both arrays: long rows split, then
    # short rows unsplit (every launch row written, the padded ones finite), then long rows again.
    from batchllm_core.cuda_graphs import GraphKey

    use_cascade_kernels(kernels, monkeypatch)
    kv = PagedKV(200, 16, 2, 128, dtype, device=DEVICE)
    scale = 1.0 / math.sqrt(128)
    for suffix_lens in ([900, 300, 0], [20, 7, 0], [900, 300, 0]):
        case = make_cascade_case(kv, 3, [], [], suffix_lens, 8, 128, dtype, device=DEVICE)
        levels = case_levels_on_host(case)
        assert len(levels["prefix_kv_indptr"]) <= 1  # no prefix level
        key = dataclasses.replace(GraphKey.of(levels, 3, 16), rows=16, prefix_keys=0, suffix_width=128)
        split = ops.cascade_suffix_split(3, key.rows, 8, 2, max(suffix_lens), DEVICE)
        assert (split[0] > 1) == (max(suffix_lens) == 900)
        q = torch.cat([case.q, torch.randn((13, 8, 128)).to(dtype).to(DEVICE)])
        o, lse = ops.cascade_decode_attention(q, kv.k, kv.v, graph_step_levels(levels, 3, key, split),
                                              return_lse=True, out=poisoned(q.shape, dtype, DEVICE),
                                              check_indices=True)
        synchronize()
        ref_o, ref_lse = cascade_reference(kv, case, scale)
        assert rel_err(o[:3], ref_o) < TOLERANCE[dtype], suffix_lens
        assert torch.allclose(lse[:3].double().cpu(), ref_lse, atol=2e-3, rtol=1e-3), suffix_lens
        if split[0] > 1 and not kernels.startswith("tile"):  # left out of the split: empty rows
            assert torch.equal(o[3:].cpu(), torch.zeros_like(o[3:].cpu())) and (lse[3:] == -math.inf).all()
        else:  # every launch row written (a padded row attends its one key)
            assert torch.isfinite(o[3:]).all() and torch.isfinite(lse[3:]).all()


@pytest.mark.parametrize("kernels", ["decode+wgmma-pipe", "decode+mma", "fused+mma", "merge+mma", "tile+wgmma64"])
def test_cascade_cuda_device_prefix_split_of_a_graph_padded_step(kernels, monkeypatch):
    # A job's tail under a shared prefix: 2 real rows read a 700-key prefix, replayed in the graph
    # of a 16-row key of 4 prefixes, then of 1, whose hints (2,048 keys) plan 8 chunks of 256 keys.
    # The step's own split (ops.cascade_prefix_split: 3 chunks of 256 on 132 SMs) runs instead, on
    # the device, in the grid the key's plan sized; the real rows match the reference.
    from batchllm_core.cuda_graphs import GraphKey

    use_cascade_kernels(kernels, monkeypatch)
    dtype = torch.bfloat16
    kv = PagedKV(200, 16, 2, 128, dtype, device=DEVICE)
    case = make_cascade_case(kv, 2, [1], [lambda i: 700], [30, 5], 8, 128, dtype, device=DEVICE)
    levels = case_levels_on_host(case)
    ref_o, ref_lse = cascade_reference(kv, case, 1.0 / math.sqrt(128))
    splits = []
    for prefixes in (4, 1):
        key = dataclasses.replace(GraphKey.of(levels, 2, 16), rows=16, prefixes=prefixes, prefix_rows=16,
                                  prefix_keys=2048)
        prefix_split = ops.cascade_prefix_split(1, 2, 700, key.prefixes, key.prefix_rows, key.prefix_keys, 8, 2, 128,
                                                dtype, DEVICE)
        assert prefix_split[0] * prefix_split[1] >= 700 and prefix_split[2] == 2
        splits.append(prefix_split[0])
        suffix_split = ops.cascade_suffix_split(2, key.rows, 8, 2, 30, DEVICE)
        step = graph_step_levels(levels, 2, key, suffix_split, prefix_split)
        q = torch.cat([case.q, torch.randn((14, 8, 128)).to(dtype).to(DEVICE)])
        o, lse = ops.cascade_decode_attention(q, kv.k, kv.v, step, return_lse=True,
                                              out=poisoned(q.shape, dtype, DEVICE), check_indices=True)
        synchronize()
        assert rel_err(o[:2], ref_o) < TOLERANCE[dtype], prefixes
        assert torch.allclose(lse[:2].double().cpu(), ref_lse, atol=2e-3, rtol=1e-3), prefixes
    if EMULATED:  # 132 SMs: the 2 rows' 2 KV-head tiles split 3 ways (at most one chunk a 256 keys)
        assert splits == [3, 3]
    # Arrays that would drop keys or readers are refused (index checks on).
    for bad, words in [((1, 64, 2), "below prefix 0's length"), ((3, 256, 1), "below prefix 0's readers"),
                       ((0, 256, 2), "splits >= 1")]:
        wrong = dataclasses.replace(step, prefix_split=torch.tensor(bad, dtype=torch.int32).to(DEVICE))
        with pytest.raises(ValueError, match=f"prefix_split.*{words}"):
            ops.cascade_decode_attention(q, kv.k, kv.v, wrong, check_indices=True)


@pytest.mark.parametrize("kernels", ["decode+wgmma-pipe", "streams+mma"])
def test_cascade_cuda_one_graph_replays_every_suffix_split(kernels, monkeypatch):
    # What a captured decode graph relies on: one launch configuration (the bucket's hints, one
    # workspace) runs whatever split the step's suffix_split array holds, unsplit over every row or
    # split over the real rows only, and whatever prefix split its prefix_split array holds (state
    # rows the readers' or the bucket's). On a GPU the launch is captured once and replayed per split; on
    # the emulation (no graphs) the same levels object is called again per split.
    from batchllm_core.cuda_graphs import GraphKey

    use_cascade_kernels(kernels, monkeypatch)
    dtype = torch.bfloat16
    kv = PagedKV(200, 16, 2, 128, dtype, device=DEVICE)
    case = make_cascade_case(kv, 3, [1], [lambda i: 40], [700, 300, 20], 8, 128, dtype, device=DEVICE)
    levels = case_levels_on_host(case)
    key = dataclasses.replace(GraphKey.of(levels, 3, 16), rows=16, suffix_width=64)
    step = graph_step_levels(levels, 3, key).with_workspace(8, 2, 128, DEVICE)
    q = torch.cat([case.q, torch.randn((13, 8, 128)).to(dtype).to(DEVICE)])
    out, lse = poisoned(q.shape, dtype, DEVICE), torch.empty(q.shape[:2], dtype=torch.float32, device=DEVICE)

    def launch():
        ops.cascade_decode_attention(q, kv.k, kv.v, step, out=out, lse_out=lse)

    graph = None
    if DEVICE == "cuda":
        launch()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            launch()
    ref_o, ref_lse = cascade_reference(kv, case, 1.0 / math.sqrt(128))
    own = ops.cascade_suffix_split(3, 16, 8, 2, 700, DEVICE)
    prefix_own = ops.cascade_prefix_split(1, 3, 40, key.prefixes, key.prefix_rows, key.prefix_keys, 8, 2, 128, dtype,
                                          DEVICE)
    for split, prefix_split in [((1, 1 << 30, 16), (1, 64, 3)), ((3, 256, 3), prefix_own), ((2, 384, 3), (1, 64, 16)),
                                (own, prefix_own), ((1, 1 << 30, 16), (1, 64, 3))]:
        step.suffix_split.copy_(torch.tensor(split, dtype=torch.int32))
        step.prefix_split.copy_(torch.tensor(prefix_split, dtype=torch.int32))
        out.fill_(math.nan)
        graph.replay() if graph is not None else launch()
        synchronize()
        assert rel_err(out[:3], ref_o) < TOLERANCE[dtype], split
        assert torch.allclose(lse[:3].double().cpu(), ref_lse, atol=2e-3, rtol=1e-3), split
        assert torch.isfinite(out[3:]).all(), split  # padded rows: zeros when split, else their one key


@pytest.mark.parametrize("kernels", CASCADE_KERNELS)
def test_cascade_cuda_size_hints_above_the_sizes(kernels, monkeypatch):
    # CUDA graph replays pass their bucket's bounds as the size hints (cuda_graphs.py), above the
    # step's real sizes: the split plans and the workspace follow the hints, the kernels the arrays.
    use_cascade_kernels(kernels, monkeypatch)
    dtype = torch.bfloat16
    kv = PagedKV(120, 16, 2, 128, dtype, device=DEVICE)
    case = make_cascade_case(kv, 3, [1], [lambda i: 40], [300, 100, 0], 8, 128, dtype, device=DEVICE)
    levels = dataclasses.replace(case.levels.with_hints(), max_prefix_kv_len=4096, max_prefix_rows=64,
                                 max_suffix_kv_len=2048)
    assert_cascade_matches_reference(kv, case, levels, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cascade_cuda_owned_tile_meeting_more_prefixes_than_it_lists(dtype, monkeypatch):
    # MHA (group 1): an owned tile holds 64 readers; here 40 rows share a 90-token prefix and each
    # has one of its own (n = 1 sampling's shape, a level per row): the first tile meets 41 prefixes,
    # past the 32 its CTA lists (kMaxCovering), so it looks at every prefix in turn.
    use_cascade_kernels("owned+mma", monkeypatch)
    kv = PagedKV(200, 16, 4, 64, dtype, device=DEVICE)
    rows = 40
    case = make_cascade_case(kv, rows, [1, rows], [lambda i: 90, lambda i: 3 + i % 20],
                             [(3 * r) % 11 for r in range(rows)], 4, 64, dtype, device=DEVICE)
    o = ops.cascade_decode_attention(case.q, kv.k, kv.v, case.levels, out=poisoned(case.q.shape, dtype, DEVICE),
                                     check_indices=True)
    synchronize()
    ref_o, _ = cascade_reference(kv, case, 1.0 / math.sqrt(64))
    assert rel_err(o, ref_o) < TOLERANCE[dtype]


@pytest.mark.skipif(not EMULATED, reason="counts launches in the CPU emulation")
def test_cascade_auto_launch_owns_short_prefixes_of_many_readers(monkeypatch):
    # BATCHLLM_CASCADE_LAUNCH=auto: the owned launch (one kernel) where the prefixes are short and read
    # by 4 tiles' worth of rows and the tiles cover half the emulated H100's 132 SMs, else the
    # separate launches (suffix, prefix tiles, combine); the result is the reference's either way.
    monkeypatch.setenv("BATCHLLM_CASCADE_LAUNCH", "auto")
    dtype = torch.bfloat16
    kv = PagedKV(800, 16, 8, 64, dtype, device=DEVICE)  # three cases in one cache
    rows = 144  # 9 tiles of 16 readers x 8 KV heads = 72 CTAs
    module = cuda_emulation.module()
    # Prefixes of 72 readers (2 groups) or 48 (3, under the 64 of 4 tiles); the hint bounds every
    # prefix's keys.
    for groups, max_prefix, launches in [(2, 2048, 1), (2, 2049, 3), (3, 2048, 3)]:
        case = make_cascade_case(kv, rows, [groups], [lambda i: 70], [(5 * r) % 23 for r in range(rows)], 32, 64,
                                 dtype, device=DEVICE)
        levels = dataclasses.replace(case.levels.with_hints(), max_prefix_kv_len=max_prefix)
        before = module.launch_count()
        o = ops.cascade_decode_attention(case.q, kv.k, kv.v, levels, out=poisoned(case.q.shape, dtype, DEVICE),
                                         check_indices=True)
        assert module.launch_count() - before == launches, (groups, max_prefix)
        ref_o, _ = cascade_reference(kv, case, 1.0 / math.sqrt(64))
        assert rel_err(o, ref_o) < TOLERANCE[dtype]


@pytest.mark.parametrize("kernels", ["decode+wmma", "merge+mma128", "streams+mma"])
def test_cascade_cuda_one_workspace_for_many_calls(kernels, monkeypatch):
    # A step's layers share one workspace (DecodeLevels.with_workspace): the calls run in stream
    # order, so each layer's states overwrite the last layer's before they are read again.
    use_cascade_kernels(kernels, monkeypatch)
    dtype = torch.bfloat16
    kv = PagedKV(120, 16, 2, 128, dtype, device=DEVICE)
    cases = [make_cascade_case(kv, rows, [1], [lambda i: prefix], suffixes, 8, 128, dtype, device=DEVICE)
             for rows, prefix, suffixes in [(3, 40, [900, 300, 0]), (3, 200, [17, 0, 64])]]
    bounds = dict(max_prefix_kv_len=200, max_prefix_rows=3, max_suffix_kv_len=900)  # both cases' sizes
    shared = dataclasses.replace(cases[0].levels, **bounds).with_workspace(8, 2, 128, DEVICE)
    assert shared.workspace is not None and shared.workspace.numel() >= ops.cascade_workspace_floats(
        3, 8, 2, 128, shared, DEVICE)
    for case in cases + cases:
        levels = dataclasses.replace(case.levels, **bounds, workspace=shared.workspace)
        assert_cascade_matches_reference(kv, case, levels, dtype)
    short = dataclasses.replace(shared, workspace=shared.workspace[:1])
    with pytest.raises(ValueError, match="workspace"):
        ops.cascade_decode_attention(cases[0].q, kv.k, kv.v, short)


@pytest.mark.parametrize("case_name", ["tree", "many_splits", "deep_chain"])
def test_cascade_cuda_combine_merges_in_the_merge_epilogues_order(case_name, monkeypatch):
    # The combine kernel computes each (row, head)'s merge weights once and applies them to every
    # element; past 48 merge steps (many key splits) or 32 covering prefixes (a deep chain) it merges
    # element by element. Either way the order is decode_rows' merge epilogue's, so the separate and
    # the merge launches give the same bits (one suffix split: the merge launch's own case).
    dtype = torch.bfloat16
    kv = PagedKV(400, 16, 2, 128, dtype, device=DEVICE)
    if case_name == "deep_chain":  # 34 nested prefixes over every row: more than 32 cover each row
        case = make_cascade_case(kv, 4, [1] * 34, [lambda i: 3] * 34, [5, 0, 9, 2], 8, 128, dtype, device=DEVICE)
    else:
        case = make_cascade_case(kv, 9, [1, 2], [lambda i: 300, lambda i: 40 + 7 * i], [r % 6 for r in range(9)],
                                 8, 128, dtype, device=DEVICE)
    levels = case.levels
    if case_name == "many_splits":  # a key bound far above the prefixes: 44 key splits, 88 merge steps a row
        levels = dataclasses.replace(levels.with_hints(), max_prefix_kv_len=16384)
    outputs = []
    for launch in ("separate", "merge"):
        use_cascade_kernels(f"{'decode' if launch == 'separate' else 'merge'}+mma", monkeypatch)
        o, lse = ops.cascade_decode_attention(case.q, kv.k, kv.v, levels, return_lse=True,
                                              out=poisoned(case.q.shape, dtype, DEVICE), check_indices=True)
        synchronize()
        outputs.append((o.cpu(), lse.cpu()))
    ref_o, ref_lse = cascade_reference(kv, case, 1.0 / math.sqrt(128))
    assert rel_err(outputs[0][0], ref_o) < TOLERANCE[dtype]
    assert torch.allclose(outputs[0][1].double(), ref_lse, atol=2e-3, rtol=1e-3)
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cascade_cuda_matches_cpu_reference(dtype):
    kv = PagedKV(64, 16, 2, 64, dtype, device=DEVICE)
    case = make_cascade_case(kv, 10, [2, 2], [lambda i: 33, lambda i: 5 + i], [r % 7 for r in range(10)], 8, 64,
                             dtype, device=DEVICE)
    o_gpu, lse_gpu = ops.cascade_decode_attention(case.q, kv.k, kv.v, case.levels, return_lse=True)
    with cuda_emulation.suspended():  # the CPU reference, also where the "GPU" is the emulation
        o_cpu, lse_cpu = ops.cascade_decode_attention(case.q.cpu(), kv.k.cpu(), kv.v.cpu(), case.levels.to("cpu"),
                                                      return_lse=True)
    assert rel_err(o_gpu, o_cpu) < TOLERANCE[dtype]
    assert torch.allclose(lse_gpu.cpu(), lse_cpu, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_states_cuda(dtype):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(33, 8, 128, generator=gen)
    k = torch.randn(50, 2, 128, generator=gen).double()
    v = torch.randn(50, 2, 128, generator=gen).double()
    o_a, lse_a = attention64(q, k[:20], v[:20], 0.1)
    o_b, lse_b = attention64(q, k[20:], v[20:], 0.1)
    ref_o, ref_lse = attention64(q, k, v, 0.1)
    lse_a[0, 0] = -math.inf  # row 0 head 0: a is empty -> b unchanged
    o, lse = ops.merge_states(o_a.to(dtype).to(DEVICE), lse_a.float().to(DEVICE), o_b.to(dtype).to(DEVICE),
                              lse_b.float().to(DEVICE), out=poisoned(o_a.shape, dtype, DEVICE))
    synchronize()
    assert torch.equal(o[0, 0].cpu(), o_b[0, 0].to(dtype))
    o[0, 0] = ref_o[0, 0].to(dtype).to(DEVICE)
    assert rel_err(o[1:], ref_o[1:]) < TOLERANCE[dtype] + 4e-3 * (dtype != torch.float32)
    assert torch.allclose(lse[1:].double().cpu(), ref_lse[1:], atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [7, 1000, 4104])
def test_sample_rows_cuda(dtype, vocab):
    # 16-byte loads where the rows allow (vocab 1000, 4104 in 16-bit types), element loads otherwise.
    logits, temperature, keys = sample_rows_case(12, vocab, dtype, device=DEVICE)
    ids, lse, logprobs = ops.sample_rows(logits, temperature, keys)
    synchronize()
    ref_ids, ref_lse, ref_logprobs = sample_rows_reference(logits, temperature, keys)
    assert torch.equal(ids.cpu(), ref_ids) and ids[0].item() == 1
    assert torch.allclose(lse.double().cpu(), ref_lse, atol=1e-5, rtol=1e-5)
    assert torch.allclose(logprobs.double().cpu(), ref_logprobs, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [7, 4104])
@pytest.mark.parametrize("seed", [0, 1])
def test_sample_rows_filters_cuda(dtype, vocab, seed):
    # The filtered draws' tries (a pass each) against a sort of each row (ops_reference).
    from test_ops import filtered_sample_case
    logits, temperature, keys, filters = filtered_sample_case(30, vocab, dtype, device=DEVICE, seed=seed)
    ids, lse, logprobs = ops.sample_rows(logits, temperature, keys, filters)
    synchronize()
    ref_ids, ref_lse, _ = sample_rows_reference(logits, temperature, keys, filters)
    assert torch.equal(ids.cpu(), ref_ids)
    assert torch.allclose(lse.double().cpu(), ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.3, 1.0])
def test_sample_rows_on_peaked_logits_cuda(temperature):
    # The skipped noise of tokens far below the best score leaves the draws of scoring every token.
    from test_ops import peaked_sample_case
    logits, temps, keys, filters = peaked_sample_case(24, temperature)
    for f in (None, filters):
        ids, _, _ = ops.sample_rows(logits.to(torch.bfloat16).to(DEVICE), temps.to(DEVICE), keys.to(DEVICE),
                                    None if f is None else tuple(t.to(DEVICE) for t in f))
        synchronize()
        assert torch.equal(ids.cpu(), sample_rows_reference(logits.to(torch.bfloat16), temps, keys, f)[0])


def test_sample_rows_noise_is_finite_at_the_largest_hash_cuda():
    from test_ops import largest_hash_case
    ids, _, _ = ops.sample_rows(*largest_hash_case(device=DEVICE))
    synchronize()
    assert 0 not in ids.tolist()


def test_sample_rows_top_p_weighs_what_top_k_keeps_cuda():
    # The radix select of the k-th logit (ties at it: the lower ids) and the mass of the first k.
    from test_ops import top_k_with_top_p_case
    case, (flat_ids, step_ids) = top_k_with_top_p_case(device=DEVICE)
    ids, _, _ = ops.sample_rows(*case)
    synchronize()
    assert set(ids[:64].tolist()) == flat_ids and set(ids[64:].tolist()) == step_ids


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_ops_cuda(dtype):
    from test_ops import check_layer_ops
    check_layer_ops(dtype, device=DEVICE)
    synchronize()


def test_cuda_rejects_unbuilt_head_dim_and_float32():
    kv = PagedKV(8, 16, 2, 16, torch.float16, device=DEVICE)
    case = make_prefill_case(kv, [(2, 2)], 4, 16, torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match=r"prefill_attention: argument 'q' head dim 16 is not built for CUDA"):
        ops.prefill_attention(case.q, kv.k, kv.v, case.block_tables, case.query_start, case.context_lens)
    kv32 = PagedKV(8, 16, 2, 64, torch.float32, device=DEVICE)
    case32 = make_prefill_case(kv32, [(2, 2)], 4, 64, torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match=r"prefill_attention: argument 'q' must be float16 or bfloat16 on CUDA"):
        ops.prefill_attention(case32.q, kv32.k, kv32.v, case32.block_tables, case32.query_start, case32.context_lens)


def test_cuda_rejects_cache_strides_past_32_bit_bytes():
    # The key loops address blocks and slots with 32-bit byte strides: a cache view whose block stride
    # does not fit is refused by name before any launch. (One block, so the view needs no more storage.)
    kv = PagedKV(1, 16, 2, 64, torch.float16, device=DEVICE)
    case = make_prefill_case(kv, [(2, 2)], 4, 64, torch.float16, device=DEVICE)
    wide = torch.as_strided(kv.k, (1, 16, 2, 64), (2**31, 128, 64, 1))
    with pytest.raises(ValueError, match=r"prefill_attention: argument 'k_cache' stride 2147483648 of dim 0 is too "
                                         r"large for CUDA"):
        ops.prefill_attention(case.q, wide, kv.v, case.block_tables, case.query_start, case.context_lens)


def test_cuda_block_table_out_of_range_is_caught_before_launch():
    kv = PagedKV(8, 16, 2, 64, torch.float16, device=DEVICE)
    case = make_prefill_case(kv, [(3, 20)], 4, 64, torch.float16, device=DEVICE)
    tables = case.block_tables.clone()
    tables[0, 1] = 8
    with pytest.raises(ValueError, match=r"prefill_attention: argument 'block_tables\[0\]' entry 1 = 8"):
        ops.prefill_attention(case.q, kv.k, kv.v, tables, case.query_start, case.context_lens, check_indices=True)


@pytest.mark.skipif(EMULATED, reason="the emulation presents every CPU tensor as device 0")
def test_cuda_mixed_devices_rejected():
    kv = PagedKV(8, 16, 2, 64, torch.float16, device=DEVICE)
    case = make_prefill_case(kv, [(3, 20)], 4, 64, torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match=r"prefill_attention: argument 'block_tables' is on device -1"):
        ops.prefill_attention(case.q, kv.k, kv.v, case.block_tables.cpu(), case.query_start, case.context_lens)


def test_layer_ops_cuda_vector_and_element_paths():
    """rms_norm and silu_and_mul read rows in 16-byte vectors where base, row stride and width allow
    it, element by element otherwise (an odd width, a row view one element off): both equal the
    model's torch formulas."""
    import torch.nn.functional as F

    from batchllm_core.models.llama import RMSNorm

    gen = torch.Generator().manual_seed(3)
    for dtype in DTYPES:
        tol = {torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
        for width, offset in [(96, 0), (96, 1), (90, 0)]:  # vectors, misaligned base, odd width
            rows = 5
            base = torch.randn(rows, width + 8, generator=gen).to(dtype)
            x = base[:, offset:offset + width]
            weight = (torch.rand(width, generator=gen) + 0.5).to(dtype)
            norm = RMSNorm(width, 1e-5).to(dtype)
            norm.weight.data = weight.clone()
            with torch.no_grad():
                ours = ops.rms_norm(x.to(DEVICE), weight.to(DEVICE), 1e-5).cpu().float()
                ref = norm(x.contiguous()).float()
                assert (ours - ref).abs().max().item() <= tol * ref.abs().max().item(), (dtype, width, offset)
                gate_up = torch.randn(rows, 2 * width + 8, generator=gen).to(dtype)[:, offset:offset + 2 * width]
                gate, up = gate_up.chunk(2, dim=-1)
                ours = ops.silu_and_mul(gate_up.to(DEVICE)).cpu().float()
                ref = (F.silu(gate) * up).float()
                assert (ours - ref).abs().max().item() <= tol * ref.abs().max().item(), (dtype, width, offset)
    synchronize()


def test_tile_kernel_defaults(monkeypatch):
    """Unset, d = 128 runs prefill tiles on mma128 and cascade-prefix tiles on mma, d = 64 both on
    wgmma-pipe where wgmma runs, else mma (runs 4 and 5 on an H100); BATCHLLM_ATTENTION_TILES sets
    both uses at every head dim; an unknown use is named."""
    monkeypatch.setenv("BATCHLLM_ATTENTION_TILES", "wgmma")
    wgmma_runs = ops._C.cuda_tile_kernel() == "wgmma"
    monkeypatch.delenv("BATCHLLM_ATTENTION_TILES")
    assert ops._C.cuda_tile_kernel("prefill", 128) == "mma128"
    assert ops._C.cuda_tile_kernel("prefix", 128) == ops._C.cuda_tile_kernel() == "mma"
    for use in ("prefix", "prefill"):
        assert ops._C.cuda_tile_kernel(use, 64) == ("wgmma-pipe" if wgmma_runs else "mma")
    monkeypatch.setenv("BATCHLLM_ATTENTION_TILES", "wgmma-pipe")
    for use in ("prefix", "prefill"):
        for head_dim in (64, 128):
            assert ops._C.cuda_tile_kernel(use, head_dim) == ("wgmma-pipe" if wgmma_runs else "mma128")
    monkeypatch.setenv("BATCHLLM_ATTENTION_TILES", "wmma")
    assert ops._C.cuda_tile_kernel("prefill", 64) == ops._C.cuda_tile_kernel("prefix", 128) == "wmma"
    with pytest.raises(ValueError, match="cuda_tile_kernel: argument 'use' must be 'prefix' or 'prefill'"):
        ops._C.cuda_tile_kernel("decode")
