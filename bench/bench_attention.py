"""Attention kernel benchmark: the decode kernel grid of ../shared/WORKLOADS.md plus paged prefill.

Decode (one query per sequence, 32 q heads, 8 KV heads, head dim 128, bf16, page 16), per shape
(B sequences, P shared prefix tokens, S unique suffix tokens):
  ours       batchllm_core.ops.cascade_decode_attention (prefix read once for all B readers) with
             the default kernels: the suffix level by the CUDA-core decode kernel, prefix tiles on
             mma.sync (4 warps, 64 rows, O in registers: the d = 128 default; d = 64 runs
             wgmma-pipe), separate launches; and for the A/B the variants of DECODE_VARIANTS:
             (wmma) prefix tiles on WMMA, (tile-sfx) the suffix by the tensor-core tile kernel,
             (wgmma-pipe) 128-row tiles on Hopper's warpgroup MMA with one key tile's products
             overlapping the next one's softmax (run 3's default; mma128 where there is no sm_90a
             code), (mma128) mma.sync in 128-row tiles of 8 warps, (wgmma) the 128-row wgmma tiles
             without the overlap (mma128 where there is no sm_90a code: `wgmma_runs_as` in the JSON),
             (fused) suffix and prefix steps in one launch, (merge) the suffix kernel merging the
             prefix states itself (no combine launch), (streams) the suffix on a side stream beside the
             prefix tiles, (wgmma64) the pipelined wgmma tiles in 64 rows of one warpgroup, (wgmma-k128)
             the pipelined wgmma tiles on 128-key steps with Q in shared memory; best/floor: the
             fastest over the floor; (pdl) programmatic dependent launch (BATCHLLM_PDL=1)
  sdpa       torch SDPA over per-sequence KV (every sequence reads its own copy of the prefix)
  hydragen   torch composition of Hydragen: all queries of a KV head stacked against the prefix via
             aten._scaled_dot_product_flash_attention (for the LSE), suffix attention, LSE merge
  floor      (P + B*S) * KV bytes per token / measured device copy bandwidth
Prefill (causal, one 4096-token chunk per sequence over paged KV, head dims 128 and 64): ours (the
default tiles: mma.sync in 128-row tiles of 8 warps at d = 128, wgmma-pipe at d = 64), mma.sync tiles
of 64 and 128 rows, pipelined and plain wgmma tiles, 64-row pipelined wgmma tiles, 128-key pipelined
wgmma tiles and WMMA tiles, vs SDPA flash on the same dense shapes. Prefix scan: the prefix tiles
alone at d = 64 and 128, default (wgmma-pipe at d = 64, mma at d = 128), wgmma-pipe, plain wgmma
(2 CTAs an SM at d = 64) and wgmma-k128. Graph
tail: a job's last few rows of long suffixes replayed in a graph of a larger batch bucket, with the
bucket's key split and with the step's own split read on the device.

Timing: CUDA graphs of each variant (launch gaps out), CUDA events, median of many replays after
warm-up, input sets rotated so that the bytes touched exceed 3x L2. Prints a table, then one JSON
line per shape (prefix "JSON ").

Usage: python bench/bench_attention.py [--quick] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import torch

DECODE_SHAPES = [(64, 2048, 256), (256, 2048, 256), (256, 8192, 128), (32, 4096, 1024), (512, 1024, 64)]
# (sequences, tokens per chunk, head dim): d = 64 is llama-1b's (run 5 found its best tiles apart from
# d = 128's end to end, with no prefill row at d = 64 to show it).
PREFILL_SHAPES = [(1, 4096, 128), (4, 4096, 128), (4, 4096, 64)]
Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
DTYPE = torch.bfloat16
KV_BYTES_PER_TOKEN = KV_HEADS * HEAD_DIM * 2 * 2  # K and V, 2 bytes each (one layer)


def commit() -> str:
    """The checkout's commit (``BATCHLLM_COMMIT`` overrides: device_check marks a tree that differs
    from its git metadata as ``-dirty``)."""
    if os.environ.get("BATCHLLM_COMMIT"):
        return os.environ["BATCHLLM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def time_graphs(fns, warmup: int = 5, reps: int = 50) -> float:
    """Median ms of one call, rotating over `fns` (one per input set), each captured as a CUDA graph."""
    graphs = []
    for fn in fns:
        for _ in range(2):
            fn()  # warm-up outside capture: lazy init, cudaFuncSetAttribute, allocator
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graphs.append(graph)
    for i in range(warmup):
        graphs[i % len(graphs)].replay()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graphs[i % len(graphs)].replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


@contextlib.contextmanager
def kernel_env(settings):
    """Kernel choices read from the environment at launch (so at graph capture): set, then restored."""
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def time_with_env(settings, fns, reps):
    with kernel_env(settings):
        return time_graphs(fns, reps=reps)


def copy_bandwidth_bytes_per_s() -> float:
    """Device-to-device copy of 1 GiB, counting bytes read plus written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_graphs([lambda: dst.copy_(src)], reps=20)
    return 2 * (1 << 30) / (ms * 1e-3)


def num_input_sets(bytes_per_set: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(8, math.ceil(3 * l2 / max(bytes_per_set, 1))))


def merge_torch(o1, lse1, o2, lse2):
    m = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    return (o1 * w1[..., None] + o2 * w2[..., None]) / (w1 + w2)[..., None]


SDPA_BACKEND = {"name": "flash"}


def sdpa_backend():
    """Flash only (the baseline the targets were set against), unless flash refused these inputs once."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if SDPA_BACKEND["name"] == "flash":
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def check_sdpa_backend(fn):
    """Runs fn once; if flash refuses, falls back to torch's default choice and says so."""
    try:
        fn()
    except RuntimeError as err:
        print(f"note: SDPA flash refused ({str(err).splitlines()[0]}); timing torch's default backend", flush=True)
        SDPA_BACKEND["name"] = "default"
        fn()


def flash_with_lse(q, k, v, scale):
    if not q.is_cuda:  # --cpu-smoke only
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)[:2]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    return out, lse


class DecodeInputs:
    """One input set of a decode shape: paged cache + levels for ours, dense tensors for the baselines."""

    def __init__(self, batch, prefix, suffix, with_dense, seed, device="cuda", dtype=DTYPE, head_dim=HEAD_DIM,
                 groups=1):
        """``groups`` > 1: that many prefixes of ``prefix`` tokens, each read by ``batch / groups``
        consecutive rows (W1's decode step: 4 or 16 groups of 64); the parts and flat only."""
        from batchllm_core import ops
        if groups < 1 or batch % groups:
            raise ValueError(f"DecodeInputs: {batch} rows do not split into {groups} groups")
        gen = torch.Generator(device=device).manual_seed(seed)
        g = Q_HEADS // KV_HEADS
        prefix_blocks, suffix_blocks = math.ceil(prefix / PAGE), math.ceil(suffix / PAGE)
        num_blocks = groups * prefix_blocks + batch * suffix_blocks
        shape = (num_blocks, PAGE, KV_HEADS, head_dim)
        self.k_cache = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        self.v_cache = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        self.q = torch.randn((batch, Q_HEADS, head_dim), generator=gen, device=device, dtype=dtype)
        self.out = torch.empty_like(self.q)
        i32 = dict(dtype=torch.int32, device=device)
        suffix_tables = (groups * prefix_blocks + torch.arange(batch * suffix_blocks, **i32)).view(
            batch, max(suffix_blocks, 0))
        if suffix_blocks == 0:
            suffix_tables = torch.full((batch, 1), -1, **i32)
        readers = batch // groups
        self.levels = ops.DecodeLevels(
            prefix_kv_indptr=torch.arange(groups + 1, **i32) * prefix_blocks,
            prefix_kv_blocks=torch.arange(groups * prefix_blocks, **i32),
            prefix_kv_lens=torch.full((groups,), prefix, **i32),
            prefix_q_range=torch.stack([torch.arange(groups, **i32) * readers,
                                        torch.arange(1, groups + 1, **i32) * readers], dim=1),
            suffix_block_tables=suffix_tables,
            suffix_kv_lens=torch.full((batch,), suffix, **i32),
            max_prefix_kv_len=prefix, max_prefix_rows=readers, max_suffix_kv_len=suffix)
        if head_dim != HEAD_DIM or groups > 1:  # the parts, prefix scans and flat only: no torch baselines
            return
        # Dense views for the torch baselines: [Hkv, tokens, D] prefix, [B, Hkv, S, D] suffixes.
        flat_k = self.k_cache.flatten(0, 1)
        flat_v = self.v_cache.flatten(0, 1)
        self.prefix_k = flat_k[:prefix].permute(1, 0, 2).unsqueeze(0).contiguous()  # [1, Hkv, P, D]
        self.prefix_v = flat_v[:prefix].permute(1, 0, 2).unsqueeze(0).contiguous()
        start = prefix_blocks * PAGE
        self.suffix_k = flat_k[start:start + batch * suffix_blocks * PAGE].view(batch, -1, KV_HEADS, HEAD_DIM)[:, :suffix]
        self.suffix_k = self.suffix_k.permute(0, 2, 1, 3).contiguous()  # [B, Hkv, S, D]
        self.suffix_v = flat_v[start:start + batch * suffix_blocks * PAGE].view(batch, -1, KV_HEADS, HEAD_DIM)[:, :suffix]
        self.suffix_v = self.suffix_v.permute(0, 2, 1, 3).contiguous()
        self.q_stacked = self.q.view(batch, KV_HEADS, g, HEAD_DIM).permute(1, 0, 2, 3).reshape(1, KV_HEADS, batch * g,
                                                                                                HEAD_DIM)
        self.q_grouped = self.q.view(batch, KV_HEADS, g, HEAD_DIM)  # [B, Hkv, g, D]
        if with_dense:  # per-sequence copies of the whole KV (no sharing): [B, Hkv, P + S, D]
            self.dense_k = torch.cat([self.prefix_k.expand(batch, -1, -1, -1), self.suffix_k], dim=2)
            self.dense_v = torch.cat([self.prefix_v.expand(batch, -1, -1, -1), self.suffix_v], dim=2)
        self.scale = 1.0 / math.sqrt(HEAD_DIM)

    def ours(self):
        from batchllm_core import ops
        return ops.cascade_decode_attention(self.q, self.k_cache, self.v_cache, self.levels, out=self.out)

    def prefix_part(self, return_lse: bool = False):
        """Ours with every suffix empty: the prefix tiles (+ the suffix launch on no keys, the combine)."""
        from batchllm_core import ops
        if not hasattr(self, "_prefix_levels"):
            self._prefix_levels = dataclasses.replace(self.levels, suffix_kv_lens=torch.zeros_like(
                self.levels.suffix_kv_lens), max_suffix_kv_len=0)
        return ops.cascade_decode_attention(self.q, self.k_cache, self.v_cache, self._prefix_levels, out=self.out,
                                            return_lse=return_lse)

    def suffix_part(self, return_lse: bool = False):
        """Ours with no prefix level: the suffix kernel (+ the combine)."""
        from batchllm_core import ops
        if not hasattr(self, "_suffix_levels"):
            i32 = dict(dtype=torch.int32, device=self.q.device)
            self._suffix_levels = dataclasses.replace(
                self.levels, prefix_kv_indptr=torch.zeros(1, **i32), prefix_kv_blocks=torch.zeros(0, **i32),
                prefix_kv_lens=torch.zeros(0, **i32), prefix_q_range=torch.zeros((0, 2), **i32),
                max_prefix_kv_len=0, max_prefix_rows=0)
        return ops.cascade_decode_attention(self.q, self.k_cache, self.v_cache, self._suffix_levels, out=self.out,
                                            return_lse=return_lse)

    def flat(self):
        """What fcfs-lru runs (vLLM's prefix caching alike): no prefix level, every row's block table
        the shared prefix's blocks then its own, so each row reads the prefix (from L2 where it fits)
        on the same kernels. Needs a prefix of whole pages (the suffix starts a block)."""
        from batchllm_core import ops
        if not hasattr(self, "_flat_levels"):
            batch = self.q.shape[0]
            prefix, suffix = int(self.levels.prefix_kv_lens[0]), int(self.levels.suffix_kv_lens[0])
            if prefix % PAGE:
                raise ValueError(f"flat: a prefix of {prefix} tokens is not whole pages of {PAGE}")
            i32 = dict(dtype=torch.int32, device=self.q.device)
            own = self.levels.suffix_block_tables if suffix else self.levels.suffix_block_tables[:, :0]
            groups = int(self.levels.prefix_kv_lens.numel())
            prefixes = self.levels.prefix_kv_blocks.view(groups, -1)  # the rows of a group read its prefix
            tables = torch.cat([prefixes.repeat_interleave(batch // groups, dim=0), own], dim=1).contiguous()
            self._flat_levels = dataclasses.replace(
                self.levels, prefix_kv_indptr=torch.zeros(1, **i32), prefix_kv_blocks=torch.zeros(0, **i32),
                prefix_kv_lens=torch.zeros(0, **i32), prefix_q_range=torch.zeros((0, 2), **i32),
                suffix_block_tables=tables, suffix_kv_lens=torch.full((batch,), prefix + suffix, **i32),
                max_prefix_kv_len=0, max_prefix_rows=0, max_suffix_kv_len=prefix + suffix)
        return ops.cascade_decode_attention(self.q, self.k_cache, self.v_cache, self._flat_levels, out=self.out)

    def sdpa(self):
        q = self.q.unsqueeze(2)  # [B, Hq, 1, D]
        with sdpa_backend():
            return torch.nn.functional.scaled_dot_product_attention(q, self.dense_k, self.dense_v, scale=self.scale,
                                                                    enable_gqa=True)

    def hydragen(self):
        batch = self.q.shape[0]
        g = Q_HEADS // KV_HEADS
        o_p, lse_p = flash_with_lse(self.q_stacked, self.prefix_k, self.prefix_v, self.scale)  # [1, Hkv, B*g, ...]
        o_p = o_p.view(KV_HEADS, batch, g, HEAD_DIM).permute(1, 0, 2, 3)
        lse_p = lse_p.view(KV_HEADS, batch, g).permute(1, 0, 2)
        o_s, lse_s = flash_with_lse(self.q_grouped, self.suffix_k, self.suffix_v, self.scale)  # [B, Hkv, g, ...]
        return merge_torch(o_p.float(), lse_p, o_s.float(), lse_s).to(self.q.dtype).reshape(batch, Q_HEADS, HEAD_DIM)


# The cascade kernel variants timed beside the default ("ours"), as the environment that selects them
# (read at each launch, so at graph capture): the A/B that sets the defaults.
DECODE_VARIANTS = {
    # "ours" is the default: mma prefix tiles (d = 128), separate launches, the suffix on decode_rows.
    # Each variant names what it changes from that.
    # owned: one launch whose CTAs take 16 readers' rows through the prefix and their suffixes, writing
    # the outputs (no states in memory, no combine, no key splits; cascade_owned.cuh).
    "owned": {"BATCHLLM_CASCADE_LAUNCH": "owned"},
    "auto": {"BATCHLLM_CASCADE_LAUNCH": "auto"},  # owned where owned_pays() says so, else separate
    "wmma": {"BATCHLLM_ATTENTION_TILES": "wmma"},
    "tile-sfx": {"BATCHLLM_CASCADE_SUFFIX": "tile"},
    "wgmma-pipe": {"BATCHLLM_ATTENTION_TILES": "wgmma-pipe"},
    "mma128": {"BATCHLLM_ATTENTION_TILES": "mma128"},
    "wgmma": {"BATCHLLM_ATTENTION_TILES": "wgmma"},
    "fused": {"BATCHLLM_CASCADE_LAUNCH": "fused", "BATCHLLM_ATTENTION_TILES": "wmma"},
    "fused+mma": {"BATCHLLM_CASCADE_LAUNCH": "fused", "BATCHLLM_ATTENTION_TILES": "mma"},
    "merge": {"BATCHLLM_CASCADE_LAUNCH": "merge"},
    "merge+mma128": {"BATCHLLM_CASCADE_LAUNCH": "merge", "BATCHLLM_ATTENTION_TILES": "mma128"},
    "merge+wgmma": {"BATCHLLM_CASCADE_LAUNCH": "merge", "BATCHLLM_ATTENTION_TILES": "wgmma"},
    "streams": {"BATCHLLM_CASCADE_LAUNCH": "streams"},
    "wgmma64": {"BATCHLLM_ATTENTION_TILES": "wgmma64"},
    "wgmma-k128": {"BATCHLLM_ATTENTION_TILES": "wgmma-k128"},  # 128-key steps, Q in shared memory
    "staged": {"BATCHLLM_DECODE_ROWS": "staged"},  # decode_rows' K/V tiles in shared memory by cp.async
    "pdl": {"BATCHLLM_PDL": "1"},  # programmatic dependent launch: no gap between the cascade's launches
}


def tile_kernel_that_runs(tiles: str, use: str = "prefix", head_dim: int = HEAD_DIM) -> str:
    """The tile kernel BATCHLLM_ATTENTION_TILES=tiles runs on this device for cascade prefixes or
    prefill (`use`) of head_dim ("wgmma" without sm_90a code or a compute 9.0 device runs mma128)."""
    from batchllm_core import ops
    with kernel_env({"BATCHLLM_ATTENTION_TILES": tiles}):
        return ops._C.cuda_tile_kernel(use, head_dim)


class ContextLost(RuntimeError):
    """A variant's failure left the CUDA context unusable (a fault is sticky): nothing more can run in
    this process. main() records it and exits with 3; rerun with --resume --skip-variants NAME."""

    def __init__(self, variant: str, error: str):
        super().__init__(f"CUDA context lost in variant {variant}: {error}")
        self.variant, self.error = variant, error


def cuda_context_alive() -> bool:
    """Whether the device still runs work after a failure (an illegal address or a trap kills it)."""
    try:
        torch.cuda.synchronize()
        return torch.ones(1, device="cuda").add_(1).item() == 2.0
    except RuntimeError:
        return False


def variant_failed(name: str, err: Exception) -> str:
    """The failure's text; raises ContextLost when the device cannot go on."""
    error = f"{type(err).__name__}: {err}"
    if not cuda_context_alive():
        raise ContextLost(name, error) from err
    return error


def bench_decode(shape, bandwidth, reps, device_name):
    batch, prefix, suffix = shape
    kv_bytes = (prefix + batch * suffix) * KV_BYTES_PER_TOKEN
    sets = num_input_sets(kv_bytes)
    inputs = [DecodeInputs(batch, prefix, suffix, with_dense=(i == 0), seed=i) for i in range(sets)]
    reference = inputs[0].hydragen().float()

    def rel_err_of(x: DecodeInputs, settings) -> float:
        with kernel_env(settings):
            return float((x.ours().float() - reference).norm() / reference.norm())

    rel_err = rel_err_of(inputs[0], {})
    ours_ms = time_graphs([x.ours for x in inputs], reps=reps)
    variant_ms = {"ours": ours_ms}
    variant_rel_err = {"ours": rel_err}
    errors = {}
    for name, settings in DECODE_VARIANTS.items():
        try:  # a variant that fails (on its first GPU) is reported, and the others still run
            variant_ms[name] = time_with_env(settings, [x.ours for x in inputs], reps)
            variant_rel_err[name] = rel_err_of(inputs[0], settings)
        except Exception as err:  # noqa: BLE001 (any failure of one variant)
            errors[name] = variant_failed(name, err)
            variant_ms[name] = variant_rel_err[name] = math.nan
    best = min((n for n in variant_ms if not math.isnan(variant_ms[n])), key=variant_ms.get)
    # Where ours spends it: the same call with every suffix empty, and with no prefix level.
    parts_ms = {"prefix": time_graphs([x.prefix_part for x in inputs], reps=reps),
                "suffix": time_graphs([x.suffix_part for x in inputs], reps=reps)}
    # What fcfs-lru runs on the same kernels: the prefix read by every row (shared blocks, no level).
    flat_ms = flat_rel_err = math.nan
    if prefix % PAGE == 0:
        flat_rel_err = float((inputs[0].flat().float() - reference).norm() / reference.norm())
        flat_ms = time_graphs([x.flat for x in inputs], reps=reps)
    hydragen_ms = time_graphs([x.hydragen for x in inputs], reps=reps)
    check_sdpa_backend(inputs[0].sdpa)
    sdpa_ms = time_graphs([inputs[0].sdpa], reps=reps)  # per-sequence KV is far beyond L2 already
    floor_ms = kv_bytes / bandwidth * 1e3
    del inputs
    torch.cuda.empty_cache()
    return {"bench": "decode_attention", "device": device_name, "commit": commit(), "B": batch, "P": prefix,
            "S": suffix, "q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16",
            "page": PAGE, "input_sets": sets, "ours_ms": ours_ms, "variant_ms": variant_ms, "parts_ms": parts_ms,
            "flat_ms": flat_ms, "flat_over_ours": flat_ms / ours_ms, "rel_err_flat_vs_hydragen": flat_rel_err,
            "wgmma_runs_as": tile_kernel_that_runs("wgmma"),
            "variant_rel_err_vs_hydragen": variant_rel_err, "variant_errors": errors, "variant_env": DECODE_VARIANTS,
            "best_variant": best,
            "best_ms": variant_ms[best], "best_over_floor": variant_ms[best] / floor_ms, "sdpa_ms": sdpa_ms,
            "hydragen_ms": hydragen_ms, "floor_ms": floor_ms, "sdpa_backend": SDPA_BACKEND["name"],
            "ours_over_floor": ours_ms / floor_ms, "hydragen_over_ours": hydragen_ms / ours_ms,
            "hydragen_over_best": hydragen_ms / variant_ms[best], "rel_err_vs_hydragen": rel_err}


PREFIX_SCAN = [(64, 1024), (64, 4096), (256, 1024), (256, 4096)]  # (readers, prefix keys)


SCAN_VARIANTS = ["wgmma-pipe", "wgmma", "wgmma-k128"]  # prefix tiles timed beside the default in the prefix scan


def bench_prefix_scan(reps, device_name) -> dict:
    """The prefix tiles alone (ours with empty suffixes) over readers x prefix keys at head dims 64
    (llama-1b, as e2e runs them) and 128: how their time grows with keys (per 1,024 keys) and with
    rows tells a latency-bound key loop from a throughput-bound one. Beside the default (mma at
    d = 128, wgmma-pipe at d = 64), wgmma-pipe and plain wgmma (128 rows at 128 registers, 2 CTAs an
    SM at d = 64: one's softmax beside the other's products)."""
    times = {}
    variant_times = {name: {} for name in SCAN_VARIANTS}
    for head_dim in (64, 128):
        for batch, prefix in PREFIX_SCAN:
            inputs = [DecodeInputs(batch, prefix, 16, with_dense=False, seed=i, head_dim=head_dim) for i in range(2)]
            times[f"d{head_dim} B{batch} P{prefix}"] = time_graphs([x.prefix_part for x in inputs], reps=reps)
            for name in SCAN_VARIANTS:
                try:  # a variant failing on its first GPU is reported
                    variant_times[name][f"d{head_dim} B{batch} P{prefix}"] = time_with_env(
                        {"BATCHLLM_ATTENTION_TILES": name}, [x.prefix_part for x in inputs], reps)
                except Exception as err:  # noqa: BLE001
                    variant_times[name][f"d{head_dim} B{batch} P{prefix}"] = math.nan
                    variant_failed(name, err)
            del inputs
    slopes = {}
    for head_dim in (64, 128):
        for batch in sorted({b for b, _ in PREFIX_SCAN}):
            lengths = sorted(p for b, p in PREFIX_SCAN if b == batch)
            short, long = (times[f"d{head_dim} B{batch} P{p}"] for p in (lengths[0], lengths[-1]))
            if lengths[-1] > lengths[0]:  # ms per 1,024 more keys
                slopes[f"d{head_dim} B{batch}"] = (long - short) * 1024 / (lengths[-1] - lengths[0])
    torch.cuda.empty_cache()
    return {"bench": "prefix_scan", "device": device_name, "commit": commit(), "q_heads": Q_HEADS,
            "kv_heads": KV_HEADS,
            "tiles": {f"d{d}": tile_kernel_that_runs(os.environ.get("BATCHLLM_ATTENTION_TILES", ""), head_dim=d)
                      for d in (64, 128)},
            "ms": times, "ms_per_1024_keys": slopes,
            **{f"{name}_runs_as": tile_kernel_that_runs(name) for name in SCAN_VARIANTS},
            **{f"ms_{name}": variant_times[name] for name in SCAN_VARIANTS}}


# Decode at llama-1b's d = 64 with W1's group shape (readers of a 1,024-token prefix, 128-token suffixes),
# ours against flat (what fcfs-lru runs): run 4 had batchllm only 1.29x fcfs-lru on W1 end to end.
# (groups, rows, prefix, suffix): one group of 64 or 256 readers, then W1 1/4's and W1 full's decode
# step (4 and 16 groups of 64 readers), then W2 full's mid-job decode step (8 docs of 8,192 tokens,
# 32 readers each, ~64 suffix keys): there the prefixes (134 MB a layer) outgrow the L2, so flat
# (fcfs-lru's reads: every row its doc's 8,192 keys, ~4.3 GB a layer) runs at HBM bandwidth.
FLAT_D64 = [(1, 64, 1024, 128), (1, 256, 1024, 128), (4, 256, 1024, 128), (16, 1024, 1024, 128),
            (8, 256, 8192, 64)]
# The launch variants timed at those shapes too: run 4's W1 decode layer spent 44 us in decode_rows,
# 25 in the prefix tiles and 10 in the combine, one after the other; streams overlaps the first two,
# merge drops the combine. mma: the 64-row tiles at d = 64 (the default there is wgmma-pipe). staged:
# decode_rows' staged key loop (its K/V by cp.async into shared memory, 3 tiles ahead). owned: all
# three in one launch, each CTA a tile of 16 readers through the prefix and their suffixes (session 15).
FLAT_D64_VARIANTS = {"owned": {"BATCHLLM_CASCADE_LAUNCH": "owned"},
                     "auto": {"BATCHLLM_CASCADE_LAUNCH": "auto"},
                     "streams": {"BATCHLLM_CASCADE_LAUNCH": "streams"},
                     "merge": {"BATCHLLM_CASCADE_LAUNCH": "merge"},
                     "mma": {"BATCHLLM_ATTENTION_TILES": "mma"},
                     "wgmma-k128": {"BATCHLLM_ATTENTION_TILES": "wgmma-k128"},
                     "staged": {"BATCHLLM_DECODE_ROWS": "staged"},
                     "staged+streams": {"BATCHLLM_DECODE_ROWS": "staged", "BATCHLLM_CASCADE_LAUNCH": "streams"},
                     "staged+merge": {"BATCHLLM_DECODE_ROWS": "staged", "BATCHLLM_CASCADE_LAUNCH": "merge"},
                     "pdl": {"BATCHLLM_PDL": "1"}}


def _rel_err(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((x - reference).norm() / reference.norm())


def bench_flat_d64(reps, device_name) -> dict:
    """Ours against flat (every row reading its prefix's blocks, fcfs-lru's way) at d = 64, W1's
    group shapes: whether the cascade pays at d = 64 when the prefixes fit L2 (2 MB each a layer),
    and W2 full's, where they do not; and the launch variants there (each checked against ours:
    ``rel_err_vs_ours``)."""
    ms, errors = {}, {}
    for groups, batch, prefix, suffix in FLAT_D64:
        inputs = [DecodeInputs(batch, prefix, suffix, with_dense=False, seed=i, head_dim=64, groups=groups)
                  for i in range(2)]
        key = f"G{groups} B{batch} P{prefix} S{suffix}"
        row = {"ours": time_graphs([x.ours for x in inputs], reps=reps),
               "flat": time_graphs([x.flat for x in inputs], reps=reps)}
        reference = inputs[0].ours().float().clone()
        errors[key] = {"flat": _rel_err(inputs[0].flat().float(), reference)}
        for name, env in FLAT_D64_VARIANTS.items():
            with kernel_env(env):
                row[name] = time_graphs([x.ours for x in inputs], reps=reps)
                errors[key][name] = _rel_err(inputs[0].ours().float(), reference)
        ms[key] = row
        del inputs
    torch.cuda.empty_cache()
    return {"bench": "flat_d64", "device": device_name, "commit": commit(), "q_heads": Q_HEADS,
            "kv_heads": KV_HEADS, "head_dim": 64, "ms": ms, "rel_err_vs_ours": errors}


GRAPH_TAIL = [1, 4, 16]  # real rows of a job's tail step, each with GRAPH_TAIL_KEYS suffix keys
GRAPH_TAIL_ROWS, GRAPH_TAIL_KEYS = 128, 2048  # the captured graph's batch bucket and suffix bound
GRAPH_TAIL_PREFIXES = 16  # the captured graph's prefix bucket (the prefix-tail case)
GRAPH_TAIL_DEVICE = "cuda"


def graph_tail_inputs(real_rows: int, padded_rows: int, keys: int, head_dim: int, device_split: bool, seed: int,
                      prefix_keys: int = 16, padded_prefixes: int = 1):
    """(q, k_cache, v_cache, levels) of a decode step of `real_rows` rows of `keys` suffix keys under
    one prefix of `prefix_keys`, padded to `padded_rows` rows and `padded_prefixes` prefixes as a
    CUDA graph replays it (cuda_graphs.py: padded rows read one key, padded prefixes none, the hints
    are the bucket's), with or without the step's own suffix split on the device
    (DecodeLevels.suffix_split, prefix_split). The real rows' K, V and q depend on the seed alone."""
    from batchllm_core import ops
    device = GRAPH_TAIL_DEVICE
    gen = torch.Generator().manual_seed(seed)
    per_row, prefix_blocks = math.ceil(keys / PAGE), math.ceil(prefix_keys / PAGE)
    num_blocks = prefix_blocks + real_rows * per_row + 1
    shape = (num_blocks, PAGE, KV_HEADS, head_dim)
    k_cache = torch.randn(shape, generator=gen, dtype=DTYPE).to(device)
    v_cache = torch.randn(shape, generator=gen, dtype=DTYPE).to(device)
    q = torch.zeros((padded_rows, Q_HEADS, head_dim), dtype=DTYPE)
    q[:real_rows] = torch.randn((real_rows, Q_HEADS, head_dim), generator=torch.Generator().manual_seed(seed + 99),
                                dtype=DTYPE)
    i32 = dict(dtype=torch.int32)
    tables = torch.full((padded_rows, per_row), -1, **i32)
    tables[:real_rows] = prefix_blocks + torch.arange(real_rows * per_row, **i32).view(real_rows, per_row)
    tables[real_rows:, 0] = num_blocks - 1
    lens = torch.ones(padded_rows, **i32)
    lens[:real_rows] = keys
    indptr = torch.full((padded_prefixes + 1,), prefix_blocks, **i32)
    indptr[0] = 0
    prefix_lens = torch.zeros(padded_prefixes, **i32)
    prefix_lens[0] = prefix_keys
    q_range = torch.zeros((padded_prefixes, 2), **i32)
    q_range[0, 1] = real_rows
    split = prefix_split = None
    if device_split:
        split = torch.tensor(ops.cascade_suffix_split(real_rows, padded_rows, Q_HEADS, KV_HEADS, keys, device), **i32)
        prefix_split = torch.tensor(ops.cascade_prefix_split(
            1, real_rows, prefix_keys, padded_prefixes, padded_rows, prefix_keys, Q_HEADS, KV_HEADS, head_dim, DTYPE,
            device), **i32)
    levels = ops.DecodeLevels(
        prefix_kv_indptr=indptr, prefix_kv_blocks=torch.arange(prefix_blocks, **i32), prefix_kv_lens=prefix_lens,
        prefix_q_range=q_range, suffix_block_tables=tables, suffix_kv_lens=lens, max_prefix_kv_len=prefix_keys,
        max_prefix_rows=padded_rows, max_suffix_kv_len=keys, suffix_split=split, prefix_split=prefix_split).to(device)
    return q.to(device), k_cache, v_cache, levels.with_workspace(Q_HEADS, KV_HEADS, head_dim, device)


def bench_graph_tail(bandwidth, reps, device_name) -> dict:
    """A job's tail in a CUDA graph: few rows replayed in a graph captured for a GRAPH_TAIL_ROWS-row
    bucket. Cases "rows<r>": r rows of GRAPH_TAIL_KEYS suffix keys; "prefix rows2": 2 rows reading a
    prefix of GRAPH_TAIL_KEYS keys (16 suffix keys each) in a graph of GRAPH_TAIL_PREFIXES prefixes.
    'own' launches the rows at their own size (splits planned on the host), 'padded' replays them
    padded with the bucket's plan (what graphs ran before the splits moved to the device), 'device
    split' padded with the step's own suffix and prefix splits read on the device (the prefix split
    at most what the bucket plan's grid holds: 4 chunks in the prefix case, 8 in its own launch).
    floor: the real rows' KV bytes at the copy bandwidth. rel_err: the padded runs' real rows against
    'own'."""
    from batchllm_core import ops
    cases = [(f"rows{rows}", rows, GRAPH_TAIL_KEYS, 16, 1) for rows in GRAPH_TAIL]
    cases.append(("prefix rows2", 2, 16, GRAPH_TAIL_KEYS, GRAPH_TAIL_PREFIXES))
    times, errors = {}, {}
    for head_dim in (64, 128):
        for label, rows, keys, prefix_keys, prefixes in cases:
            out, results = {}, {}
            for name, padded, device_split in (("own", rows, False), ("padded", GRAPH_TAIL_ROWS, False),
                                               ("device split", GRAPH_TAIL_ROWS, True)):
                sets = [graph_tail_inputs(rows, padded, keys, head_dim, device_split, seed=i, prefix_keys=prefix_keys,
                                          padded_prefixes=1 if name == "own" else prefixes) for i in range(2)]
                fns = [lambda s=s: ops.cascade_decode_attention(s[0], s[1], s[2], s[3]) for s in sets]
                results[name] = fns[0]()[:rows].float().cpu()
                out[name] = time_graphs(fns, reps=reps)
                del sets, fns
            case = f"d{head_dim} {label}"
            floor = (rows * keys + prefix_keys) * KV_HEADS * head_dim * 2 * 2 / bandwidth * 1e3
            times[case] = {**out, "floor": floor}
            own = results["own"]
            errors[case] = max(float((results[n] - own).norm() / own.norm()) for n in ("padded", "device split"))
    torch.cuda.empty_cache()
    return {"bench": "graph_tail", "device": device_name, "commit": commit(), "padded_rows": GRAPH_TAIL_ROWS,
            "padded_prefixes": GRAPH_TAIL_PREFIXES, "keys": GRAPH_TAIL_KEYS, "q_heads": Q_HEADS,
            "kv_heads": KV_HEADS, "ms": times, "rel_err_vs_own": errors}


def variant_summary(decode_rows: list) -> dict:
    """Each variant's geometric mean of time / ours over the decode shapes: the default to pick."""
    names = list(dict.fromkeys(n for r in decode_rows for n in r["variant_ms"]))
    # A variant that failed on any shape (NaN), or was skipped on some (rows of a resumed run), gets
    # NaN, and is never the fastest.
    geomean = {n: math.exp(sum(math.log(r["variant_ms"].get(n, math.nan) / r["ours_ms"]) for r in decode_rows)
                           / len(decode_rows)) for n in names}
    valid = [n for n in names if not math.isnan(geomean[n])]
    return {"bench": "decode_attention_summary", "device": decode_rows[0]["device"], "commit": decode_rows[0]["commit"],
            "shapes": [[r["B"], r["P"], r["S"]] for r in decode_rows], "geomean_vs_ours": geomean,
            "fastest": min(valid, key=geomean.get), "variant_env": DECODE_VARIANTS}


def bench_prefill(shape, reps, device_name, device="cuda", skip=()):
    from batchllm_core import ops
    seqs, tokens, head_dim = shape
    gen = torch.Generator(device=device).manual_seed(7)
    blocks = seqs * math.ceil(tokens / PAGE)
    k_cache = torch.randn((blocks, PAGE, KV_HEADS, head_dim), generator=gen, device=device, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn((seqs * tokens, Q_HEADS, head_dim), generator=gen, device=device, dtype=DTYPE)
    i32 = dict(dtype=torch.int32, device=device)
    tables = torch.arange(blocks, **i32).view(seqs, -1)
    query_start = torch.arange(seqs + 1, **i32) * tokens
    context_lens = torch.full((seqs,), tokens, **i32)
    out = torch.empty_like(q)
    # Dense equals for SDPA: [S, H, T, D]
    qd = q.view(seqs, tokens, Q_HEADS, head_dim).transpose(1, 2).contiguous()
    kd = k_cache.view(seqs, -1, KV_HEADS, head_dim)[:, :tokens].transpose(1, 2).contiguous()
    vd = v_cache.view(seqs, -1, KV_HEADS, head_dim)[:, :tokens].transpose(1, 2).contiguous()

    def ours():
        ops.prefill_attention(q, k_cache, v_cache, tables, query_start, context_lens, max_q_len=tokens, out=out)

    def sdpa():
        with sdpa_backend():
            return torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)

    ours()
    check_sdpa_backend(sdpa)
    reference = sdpa().transpose(1, 2).reshape(seqs * tokens, Q_HEADS, head_dim).float()
    rel_err = float((out.float() - reference).norm() / reference.norm())
    ours_ms = time_graphs([ours], reps=reps)

    def variant(tiles: str):
        """(ms, rel err) of the prefill on another tile kernel; NaNs and the error if it fails."""
        try:
            ms = time_with_env({"BATCHLLM_ATTENTION_TILES": tiles}, [ours], reps)
            with kernel_env({"BATCHLLM_ATTENTION_TILES": tiles}):
                ours()
                return ms, float((out.float() - reference).norm() / reference.norm()), None
        except Exception as err:  # noqa: BLE001 (a variant failing on its first GPU is reported)
            return math.nan, math.nan, variant_failed("prefill:" + tiles, err)

    def unless_skipped(tiles: str):
        if "prefill:" + tiles in skip:
            return math.nan, math.nan, "skipped (--skip-variants)"
        return variant(tiles)

    mma_ms, mma_rel_err, mma_error = unless_skipped("mma")
    mma128_ms, mma128_rel_err, mma128_error = unless_skipped("mma128")
    pipe_ms, pipe_rel_err, pipe_error = unless_skipped("wgmma-pipe")
    wgmma_ms, wgmma_rel_err, wgmma_error = unless_skipped("wgmma")
    wgmma64_ms, wgmma64_rel_err, wgmma64_error = unless_skipped("wgmma64")
    k128_ms, k128_rel_err, k128_error = unless_skipped("wgmma-k128")
    wmma_ms, wmma_rel_err, wmma_error = unless_skipped("wmma")
    errors = {name: e for name, e in (("mma", mma_error), ("mma128", mma128_error), ("wgmma-pipe", pipe_error),
                                      ("wgmma", wgmma_error), ("wgmma64", wgmma64_error),
                                      ("wgmma-k128", k128_error), ("wmma", wmma_error)) if e is not None}
    sdpa_ms = time_graphs([sdpa], reps=reps)
    flops = seqs * 4 * (tokens * (tokens + 1) / 2) * Q_HEADS * head_dim
    return {"bench": "prefill_attention", "device": device_name, "commit": commit(), "seqs": seqs, "tokens": tokens,
            "q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": head_dim, "dtype": "bfloat16", "ours_ms": ours_ms,
            "tiles": tile_kernel_that_runs(os.environ.get("BATCHLLM_ATTENTION_TILES", ""), "prefill", head_dim),
            "ours_mma_ms": mma_ms, "rel_err_mma_vs_sdpa": mma_rel_err, "ours_mma128_ms": mma128_ms,
            "rel_err_mma128_vs_sdpa": mma128_rel_err, "ours_wgmma_pipe_ms": pipe_ms,
            "rel_err_wgmma_pipe_vs_sdpa": pipe_rel_err, "ours_wgmma_ms": wgmma_ms, "rel_err_wgmma_vs_sdpa": wgmma_rel_err,
            "ours_wmma_ms": wmma_ms, "rel_err_wmma_vs_sdpa": wmma_rel_err, "ours_wgmma64_ms": wgmma64_ms,
            "rel_err_wgmma64_vs_sdpa": wgmma64_rel_err, "ours_wgmma_k128_ms": k128_ms,
            "rel_err_wgmma_k128_vs_sdpa": k128_rel_err,
            "wgmma_runs_as": tile_kernel_that_runs("wgmma"), "variant_errors": errors, "sdpa_ms": sdpa_ms, "sdpa_backend": SDPA_BACKEND["name"], "ours_over_sdpa": ours_ms / sdpa_ms, "ours_tflops": flops / (ours_ms * 1e-3) / 1e12,
            "sdpa_tflops": flops / (sdpa_ms * 1e-3) / 1e12, "rel_err_vs_sdpa": rel_err}


def cpu_smoke() -> int:
    """Ours (CPU reference), the Hydragen composition and per-sequence SDPA must agree on CPU."""
    worst = 0.0
    for batch, prefix, suffix in [(3, 40, 20), (5, 16, 16)]:
        x = DecodeInputs(batch, prefix, suffix, with_dense=True, seed=0, device="cpu", dtype=torch.float32)
        ours = x.ours().float().clone()  # x.out is reused by the parts below
        for name, other in [("hydragen", x.hydragen()), ("sdpa", x.sdpa().squeeze(2))]:
            err = float((ours - other.float()).norm() / other.float().norm())
            print(f"cpu smoke B={batch} P={prefix} S={suffix}: ours vs {name} rel err {err:.1e}")
            worst = max(worst, err)
        # The parts the GPU run times apart: prefix-only and suffix-only states merge back into ours.
        o_p, lse_p = (t.clone() for t in x.prefix_part(return_lse=True))
        o_s, lse_s = x.suffix_part(return_lse=True)
        err = float((merge_torch(o_p, lse_p, o_s.float(), lse_s) - ours).norm() / ours.norm())
        print(f"cpu smoke B={batch} P={prefix} S={suffix}: prefix part + suffix part vs ours rel err {err:.1e}")
        worst = max(worst, err)
    return 0 if worst < 1e-4 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer replays (a smoke run)")
    parser.add_argument("--json-out", help="also append the JSON lines to this file, each as its shape finishes")
    parser.add_argument("--no-prefill", action="store_true")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="check the baselines' layouts against our CPU op on a tiny shape (no timing)")
    parser.add_argument("--skip-variants", default="",
                        help="comma-separated variants not to run: decode names of DECODE_VARIANTS, "
                             "prefill ones as prefill:mma|mma128|wgmma-pipe|wgmma|wgmma64|wgmma-k128|wmma (after one lost the CUDA "
                             "context)")
    parser.add_argument("--resume", action="store_true",
                        help="with --json-out: keep the shapes already in the file and run only the others")
    args = parser.parse_args()
    if args.cpu_smoke:
        return cpu_smoke()
    import batchllm_core
    if not torch.cuda.is_available() or not batchllm_core.cuda_available():
        print("bench_attention: needs a CUDA GPU, a CUDA build of torch and a CUDA build of batchllm "
              f"(torch.cuda.is_available()={torch.cuda.is_available()}, "
              f"batchllm cuda={batchllm_core.build_info()['cuda']}); nothing measured.", file=sys.stderr)
        return 2
    reps = 20 if args.quick else 100
    device_name = torch.cuda.get_device_name(0)
    bandwidth = copy_bandwidth_bytes_per_s()
    print(f"device {device_name}; copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); torch {torch.__version__}; "
          f"BATCHLLM_ATTENTION_TILES=wgmma runs {tile_kernel_that_runs('wgmma')}; tiles here at d = {HEAD_DIM}: prefix "
          f"{tile_kernel_that_runs(os.environ.get('BATCHLLM_ATTENTION_TILES', ''))}, prefill "
          f"{tile_kernel_that_runs(os.environ.get('BATCHLLM_ATTENTION_TILES', ''), 'prefill')}")
    skip = {name for name in args.skip_variants.split(",") if name}
    global DECODE_VARIANTS
    DECODE_VARIANTS = {name: env for name, env in DECODE_VARIANTS.items() if name not in skip}
    rows = []
    if args.resume and args.json_out and os.path.exists(args.json_out):
        with open(args.json_out) as f:
            rows = [r for r in map(json.loads, filter(str.strip, f))
                    if r.get("bench") in ("decode_attention", "prefill_attention", "prefix_scan", "flat_d64",
                                          "graph_tail")]
    done = {(r["B"], r["P"], r["S"]) if r["bench"] == "decode_attention" else (r["seqs"], r["tokens"], r["head_dim"])
            for r in rows if r["bench"] in ("decode_attention", "prefill_attention")}
    if done:
        print(f"resumed: {len(done)} shape(s) already in {args.json_out}; skipped variants: {sorted(skip)}")

    def record(row: dict) -> None:
        """Keeps a finished row; with --json-out it is on disk at once (a time limit keeps what ran)."""
        rows.append(row)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps(row) + "\n")

    try:
        run_tables(args, reps, device_name, bandwidth, rows, record, done, skip)
    except ContextLost as lost:
        record({"bench": "context_lost", "device": device_name, "commit": commit(), "variant": lost.variant,
                "error": lost.error})
        print(f"bench_attention: {lost}; nothing more can run in this process. Rerun with --resume "
              f"--skip-variants {','.join(sorted(skip | {lost.variant}))}", flush=True)
        return 3
    for r in rows:
        print("JSON " + json.dumps(r))
    return 0


def run_tables(args, reps, device_name, bandwidth, rows, record, done, skip) -> None:
    """The decode table with its summary, then the prefill table (shapes in `done` are not run again)."""
    names = ["ours", *DECODE_VARIANTS]
    print(f"{'B':>5} {'P':>6} {'S':>5} | " + " ".join(f"{n:>12}" for n in names) + f" {'sdpa':>8} {'hydragen':>8} "
          f"{'floor':>8} | {'ours/floor':>10} {'best/floor':>10} {'hydra/best':>10} {'max rel err':>11}   (ms)")
    for shape in DECODE_SHAPES:
        if tuple(shape) in done:
            continue
        t0 = time.time()
        r = bench_decode(shape, bandwidth, reps, device_name)
        r["copy_tb_s"] = bandwidth / 1e12
        record(r)
        print(f"{r['B']:>5} {r['P']:>6} {r['S']:>5} | " + " ".join(f"{r['variant_ms'][n]:>12.4f}" for n in names) +
              f" {r['sdpa_ms']:>8.3f} {r['hydragen_ms']:>8.3f} {r['floor_ms']:>8.4f} | {r['ours_over_floor']:>10.2f} "
              f"{r['best_over_floor']:>10.2f} {r['hydragen_over_best']:>10.2f} "
              f"{max(r['variant_rel_err_vs_hydragen'].values()):>11.1e}   best {r['best_variant']} "
              f"({time.time() - t0:.0f} s)", flush=True)
        print(f"      parts of ours: prefix only {r['parts_ms']['prefix']:.4f} ms, suffix only "
              f"{r['parts_ms']['suffix']:.4f} ms; flat (fcfs-lru's: no level, each row reads the prefix's "
              f"blocks) {r['flat_ms']:.4f} ms = {r['flat_over_ours']:.2f}x ours", flush=True)
        for name, error in r["variant_errors"].items():
            print(f"      variant {name} FAILED: {error}", flush=True)
    decode_rows = [r for r in rows if r["bench"] == "decode_attention"]
    if decode_rows:
        summary = variant_summary(decode_rows)
        record(summary)
        print("variants over the grid (geometric mean of time / ours; < 1 is faster): " +
              ", ".join(f"{n} {v:.3f}" for n, v in summary["geomean_vs_ours"].items()) +
              f"; fastest overall: {summary['fastest']}")
    if not any(r["bench"] == "prefix_scan" for r in rows):
        scan = bench_prefix_scan(reps, device_name)
        record(scan)
        print(f"prefix tiles alone ({', '.join(f'{d} {t}' for d, t in scan['tiles'].items())}), ms: " +
              ", ".join(f"{k} {v:.4f}" for k, v in scan["ms"].items()), flush=True)
        print("  ms per 1,024 more prefix keys: " +
              ", ".join(f"{k} {v:.4f}" for k, v in scan["ms_per_1024_keys"].items()), flush=True)
        for name in SCAN_VARIANTS:
            print(f"  the same on {scan[name + '_runs_as']} (BATCHLLM_ATTENTION_TILES={name}), ms: " +
                  ", ".join(f"{k} {v:.4f}" for k, v in scan["ms_" + name].items()), flush=True)
    if not any(r["bench"] == "flat_d64" for r in rows):
        flat = bench_flat_d64(reps, device_name)
        record(flat)
        print("d = 64, W1's and W2's groups, ours / flat (fcfs-lru's) / " + " / ".join(FLAT_D64_VARIANTS) + " ms: " +
              ", ".join(f"{k} " + " / ".join(f"{t:.4f}" for t in v.values()) for k, v in flat["ms"].items()),
              flush=True)
    if not any(r["bench"] == "graph_tail" for r in rows):
        tail = bench_graph_tail(bandwidth, reps, device_name)
        record(tail)
        print(f"graph tail: rows of {tail['keys']} suffix keys (or 2 rows under a prefix of as many) replayed in a "
              f"{tail['padded_rows']}-row graph, ms (own size / padded, bucket's plan / padded, step's own suffix "
              "and prefix splits on the device / floor):", flush=True)
        for case, ms in tail["ms"].items():
            print(f"  {case:>12}: {ms['own']:.4f} / {ms['padded']:.4f} / {ms['device split']:.4f} / "
                  f"{ms['floor']:.4f}", flush=True)
    if not args.no_prefill:
        print(f"{'seqs':>5} {'tokens':>6} {'d':>4} {'ours':>8} | {'ours ms':>8} {'mma ms':>8} {'mma128':>8} {'wgmma-p':>8} "
              f"{'wgmma':>8} {'wgmma64':>8} {'k128':>8} "
              f"{'wmma':>8} "
              f"{'sdpa ms':>8} | "
              f"{'ours/sdpa':>9} {'ours TF/s':>9} "
              f"{'sdpa TF/s':>9} {'rel err':>8}")
        for shape in PREFILL_SHAPES:
            if tuple(shape) in done:
                continue
            r = bench_prefill(shape, reps, device_name, skip=skip)
            record(r)
            print(f"{r['seqs']:>5} {r['tokens']:>6} {r['head_dim']:>4} {r['tiles']:>8} | {r['ours_ms']:>8.3f} "
                  f"{r['ours_mma_ms']:>8.3f} {r['ours_mma128_ms']:>8.3f} {r['ours_wgmma_pipe_ms']:>8.3f} "
                  f"{r['ours_wgmma_ms']:>8.3f} {r['ours_wgmma64_ms']:>8.3f} {r['ours_wgmma_k128_ms']:>8.3f} "
                  f"{r['ours_wmma_ms']:>8.3f} "
                  f"{r['sdpa_ms']:>8.3f} | "
                  f"{r['ours_over_sdpa']:>9.2f} {r['ours_tflops']:>9.1f} {r['sdpa_tflops']:>9.1f} "
                  f"{r['rel_err_vs_sdpa']:>8.1e}", flush=True)
            for name, error in r["variant_errors"].items():
                print(f"      variant {name} FAILED: {error}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
