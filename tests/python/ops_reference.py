"""float64 torch references and random case builders for the attention-op tests (CPU and CUDA).

Everything here is plain torch, written for clarity, not speed: gather each sequence's KV through
its block table, run dense attention in float64, compare.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from batchllm_core.ops import DecodeLevels


def poisoned(shape, dtype, device="cpu") -> torch.Tensor:
    """An output buffer full of NaN: a row the kernel forgets to write fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN when out holds NaN)."""
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


class PagedKV:
    """A KV cache [num_blocks, block_size, Hkv, D] whose blocks are handed out in shuffled order, so
    block tables are never the identity."""

    def __init__(self, num_blocks, block_size, num_kv_heads, head_dim, dtype, device="cpu", seed=0):
        gen = torch.Generator().manual_seed(seed)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.randn(shape, generator=gen).to(dtype).to(device)
        self.v = torch.randn(shape, generator=gen).to(dtype).to(device)
        self.block_size = block_size
        self._free = torch.randperm(num_blocks, generator=gen).tolist()

    def allocate(self, num_tokens: int) -> list[int]:
        n = -(-num_tokens // self.block_size)
        blocks, self._free = self._free[:n], self._free[n:]
        assert len(blocks) == n, "test case needs more KV blocks"
        return blocks

    def gather(self, blocks: list[int], num_tokens: int):
        """(k, v) float64 [num_tokens, Hkv, D] of the tokens held in `blocks`."""
        if num_tokens == 0:
            empty = self.k.new_zeros((0,) + tuple(self.k.shape[2:]), dtype=torch.float64).cpu()
            return empty, empty.clone()
        idx = torch.tensor(blocks, dtype=torch.long, device=self.k.device)
        k = self.k.index_select(0, idx).flatten(0, 1)[:num_tokens]
        v = self.v.index_select(0, idx).flatten(0, 1)[:num_tokens]
        return k.double().cpu(), v.double().cpu()


def attention64(q, k, v, scale, causal_offset=None):
    """Dense float64 attention of q [n, Hq, D] over k, v [t, Hkv, D] with GQA.

    causal_offset: query i sees keys 0..causal_offset + i (None: all keys). Returns (o, lse)."""
    q = q.double().cpu()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,thd->hnt", q, k) * scale
    if causal_offset is not None:
        n, t = q.shape[0], k.shape[0]
        allowed = torch.arange(t)[None, :] <= (causal_offset + torch.arange(n))[:, None]
        scores = scores.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, n]
    o = torch.einsum("hnt,thd->nhd", torch.softmax(scores, dim=-1), v)
    return o, lse.transpose(0, 1).contiguous()


@dataclass
class PrefillCase:
    q: torch.Tensor
    block_tables: torch.Tensor
    query_start: torch.Tensor
    context_lens: torch.Tensor
    tables: list  # python lists of blocks per sequence


def make_prefill_case(kv: PagedKV, seqs, num_q_heads, head_dim, dtype, device="cpu", seed=1) -> PrefillCase:
    """seqs: list of (q_len, context_len) with q_len <= context_len."""
    gen = torch.Generator().manual_seed(seed)
    tables = [kv.allocate(ctx) for _, ctx in seqs]
    max_blocks = max([len(t) for t in tables] + [1])
    block_tables = torch.full((len(seqs), max_blocks), -1, dtype=torch.int32)
    for s, table in enumerate(tables):
        block_tables[s, : len(table)] = torch.tensor(table, dtype=torch.int32)
    starts = [0]
    for q_len, _ in seqs:
        starts.append(starts[-1] + q_len)
    q = torch.randn((starts[-1], num_q_heads, head_dim), generator=gen).to(dtype)
    return PrefillCase(q.to(device), block_tables.to(device), torch.tensor(starts, dtype=torch.int32, device=device),
                       torch.tensor([c for _, c in seqs], dtype=torch.int32, device=device), tables)


def prefill_reference(kv: PagedKV, case: PrefillCase, seqs, scale):
    outs = []
    for s, (q_len, ctx) in enumerate(seqs):
        k, v = kv.gather(case.tables[s], ctx)
        begin = int(case.query_start[s])
        o, _ = attention64(case.q[begin:begin + q_len], k, v, scale, causal_offset=ctx - q_len)
        outs.append(o)
    return torch.cat(outs) if outs else torch.zeros(0)


@dataclass
class CascadeCase:
    q: torch.Tensor
    levels: DecodeLevels
    row_keys: list  # per row: list of (blocks, num_tokens) segments it attends to


def make_cascade_case(kv: PagedKV, num_rows, level_fanouts, prefix_lens, suffix_lens, num_q_heads, head_dim,
                      dtype, device="cpu", seed=2) -> CascadeCase:
    """Tree-shaped levels: level l splits each group of level l-1 into level_fanouts[l] contiguous
    groups (the first level splits all rows); prefix_lens[l] is the prefix length of every group of
    level l (a callable (group index) -> length for variety). Rows beyond an even split stay unshared
    at that level. suffix_lens: list of num_rows suffix lengths."""
    gen = torch.Generator().manual_seed(seed)
    prefixes = []  # (blocks, length, begin, end)
    row_keys = [[] for _ in range(num_rows)]
    groups = [(0, num_rows)]
    for level, fanout in enumerate(level_fanouts):
        next_groups = []
        for begin, end in groups:
            size = (end - begin) // fanout
            if size == 0:
                continue
            for g in range(fanout):
                g_begin = begin + g * size
                g_end = g_begin + size
                length = prefix_lens[level](len(prefixes))
                blocks = kv.allocate(length)
                prefixes.append((blocks, length, g_begin, g_end))
                for row in range(g_begin, g_end):
                    row_keys[row].append((blocks, length))
                next_groups.append((g_begin, g_end))
        groups = next_groups
    suffix_tables = []
    for row in range(num_rows):
        blocks = kv.allocate(suffix_lens[row])
        suffix_tables.append(blocks)
        row_keys[row].append((blocks, suffix_lens[row]))
    max_suffix_blocks = max([len(t) for t in suffix_tables] + [1])
    suffix_block_tables = torch.full((num_rows, max_suffix_blocks), -1, dtype=torch.int32)
    for row, table in enumerate(suffix_tables):
        suffix_block_tables[row, : len(table)] = torch.tensor(table, dtype=torch.int32)
    indptr = [0]
    for blocks, _, _, _ in prefixes:
        indptr.append(indptr[-1] + len(blocks))
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    levels = DecodeLevels(
        prefix_kv_indptr=i32(indptr),
        prefix_kv_blocks=i32([b for blocks, _, _, _ in prefixes for b in blocks]),
        prefix_kv_lens=i32([length for _, length, _, _ in prefixes]),
        prefix_q_range=i32([[b, e] for _, _, b, e in prefixes]).view(-1, 2),
        suffix_block_tables=suffix_block_tables,
        suffix_kv_lens=i32(list(suffix_lens)),
    )
    q = torch.randn((num_rows, num_q_heads, head_dim), generator=gen).to(dtype)
    return CascadeCase(q.to(device), levels.to(device), row_keys)


def cascade_reference(kv: PagedKV, case: CascadeCase, scale):
    """(o, lse) float64: each row over the concatenation of all its segments."""
    outs, lses = [], []
    for row, segments in enumerate(case.row_keys):
        parts = [kv.gather(blocks, n) for blocks, n in segments]
        k = torch.cat([p[0] for p in parts])
        v = torch.cat([p[1] for p in parts])
        o, lse = attention64(case.q[row:row + 1], k, v, scale)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def sample_rows_reference(logits: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor, filters=None):
    """ops.sample_rows by the sampler's torch formulas (sampling.py): (ids, lse float64, logprobs float64).
    ``filters`` (top_k, top_p, min_p): DrawFilters of batchllm/kernels/sampling.h written out with a
    sort (order: tempered logit descending, ties to the lower id; masses in float64)."""
    from batchllm_core.sampling import _gumbel_noise, _hash32

    raw = logits.float().cpu()
    temperature, keys = temperature.cpu(), keys.cpu()
    token_hashes = _hash32(torch.arange(raw.shape[1], dtype=torch.int64) ^ 0x2545F491)
    noisy = raw / temperature.clamp(min=1e-30)[:, None] + _gumbel_noise(keys, token_hashes)
    scores = torch.where(temperature[:, None] > 0, noisy, raw)
    if filters is not None:
        top_k, top_p, min_p = (f.cpu() for f in filters)
        for r in range(raw.shape[0]):
            if temperature[r] <= 0 or not (top_k[r] > 0 or top_p[r] < 1 or min_p[r] > 0):
                continue
            s = raw[r] / temperature[r]
            order = sorted(range(len(s)), key=lambda i: (-s[i].item(), i))
            s_max = s.max().double()
            probs = torch.exp(s.double() - s_max)
            # top_p weighs the mass of what top_k keeps
            mass = probs[order[:top_k[r]]].sum() if top_k[r] > 0 else probs.sum()
            before, kept = 0.0, torch.zeros(len(s), dtype=torch.bool)
            for rank, i in enumerate(order):
                keep = (top_k[r] <= 0 or rank < top_k[r]) and (top_p[r] >= 1 or before < top_p[r].double() * mass) \
                    and (min_p[r] <= 0 or probs[i] >= min_p[r].double())
                if not keep:
                    break  # the kept tokens are a prefix of the order
                kept[i] = True
                before += probs[i].item()
            scores[r] = torch.where(kept, scores[r], torch.tensor(-math.inf))
    ids = torch.argmax(scores, dim=-1)
    lse = torch.logsumexp(raw.double(), dim=-1)
    return ids, lse, raw.double().gather(1, ids[:, None])[:, 0] - lse
