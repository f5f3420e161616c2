"""Tensor-level attention ops: torch tensors in, native kernels (``batchllm_core._C``) underneath.

Every op passes its tensors to the native core as raw views (data pointer, dtype, shape, strides,
device) and dispatches by device: CPU tensors run the C++ reference kernels, CUDA tensors the CUDA
kernels on ``torch.cuda.current_stream()``. The native binding validates every argument and raises
``ValueError`` naming the kernel and the argument before anything runs. Accumulation is float32;
``scale`` defaults to ``1 / sqrt(head_dim)``. Shapes follow docs/architecture.md ("Ops"):

- KV caches ``k_cache``, ``v_cache``: ``[num_blocks, block_size, Hkv, D]``; slot = block * block_size + offset.
- GQA: query head ``h`` reads KV head ``h // (Hq // Hkv)``.
- LSE: float32, natural log, ``-inf`` for a row that saw no keys.

Index checks (block ids, slots, lengths) read the index arrays; for CUDA arrays that costs a
device-to-host copy and a synchronisation, so on CUDA they run only with ``check_indices=True``
or the environment variable ``BATCHLLM_CHECK_INDICES=1``. On CPU they always run.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch

from . import _C

__all__ = ["DecodeLevels", "store_kv", "prefill_attention", "cascade_decode_attention", "cascade_workspace_floats",
           "cascade_suffix_split", "cascade_prefix_split", "merge_states", "sample_rows", "rms_norm", "silu_and_mul", "rotary_embedding"]


# Tests only (tests/python/cuda_emulation.py): CPU tensors go to the CUDA path of the bindings as
# device 0, whose kernels are the CUDA sources compiled for the CPU emulation.
_emulated_cuda = False


def _is_cuda(t: torch.Tensor) -> bool:
    """Whether t takes the CUDA path: on a CUDA device, or on the CPU under the test emulation."""
    return t.is_cuda or _emulated_cuda


def _view(t: torch.Tensor) -> tuple:
    """(data_ptr, dtype name, shape, strides in elements, device index or -1 for CPU)."""
    device = t.get_device() if t.is_cuda else (0 if _emulated_cuda else -1)
    return (t.data_ptr(), str(t.dtype).replace("torch.", ""), tuple(t.shape), tuple(t.stride()), device)


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _check_indices(t: torch.Tensor, requested: Optional[bool]) -> bool:
    if requested is not None:
        return requested
    return (not _is_cuda(t)) or os.environ.get("BATCHLLM_CHECK_INDICES", "0") == "1"


def _scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])


def _max_or_zero(t: torch.Tensor) -> int:
    return int(t.max().item()) if t.numel() > 0 else 0


@dataclass
class DecodeLevels:
    """The levels of a decode step: shared prefixes read by contiguous query rows, then suffixes.

    Attributes
    ----------
    prefix_kv_indptr : torch.Tensor
        int32 ``[P + 1]``: prefix ``p`` reads ``prefix_kv_blocks[prefix_kv_indptr[p]:prefix_kv_indptr[p + 1]]``.
    prefix_kv_blocks : torch.Tensor
        int32 ``[prefix_kv_indptr[P]]``: KV block ids of every prefix, concatenated.
    prefix_kv_lens : torch.Tensor
        int32 ``[P]``: tokens of each prefix.
    prefix_q_range : torch.Tensor
        int32 ``[P, 2]``: query rows ``[begin, end)`` reading prefix ``p`` (ranges nest across levels).
    suffix_block_tables : torch.Tensor
        int32 ``[B, max_suffix_blocks]``: each row's own KV blocks after its deepest prefix (-1 padded).
    suffix_kv_lens : torch.Tensor
        int32 ``[B]``: tokens of each row's suffix (0 allowed).
    max_prefix_kv_len, max_prefix_rows, max_suffix_kv_len : int, optional
        Host-side upper bounds that size the CUDA grid. Left None they are computed from the tensors
        (a synchronisation on CUDA); :meth:`with_hints` fills them once per step.
    suffix_split : torch.Tensor, optional
        CUDA only: int32 ``[3]`` ``{splits, chunk_keys, rows}``, the suffix level's key split for this
        step (:func:`cascade_suffix_split`), read by the kernels on the device instead of planned on the
        host from the hints: a CUDA graph captured for a batch bucket then still splits the long
        suffixes of a step of few rows. The CPU reference ignores it.
    prefix_split : torch.Tensor, optional
        CUDA only: int32 ``[3]`` ``{splits, chunk_keys, state_rows}``, the prefix level's key split for
        this step (:func:`cascade_prefix_split`), read on the device instead of planned from the hints
        (which still size the grid and the workspace); the CPU reference ignores it.
    workspace : torch.Tensor, optional
        float32 scratch of the CUDA kernels (split-KV and level states), at least
        :func:`cascade_workspace_floats` long. Left None, every call allocates its own;
        :meth:`with_workspace` makes one that every layer of a step shares (the layers run in
        stream order, so one buffer serves them all: no allocation and no size query per layer).

    Examples
    --------
    One prefix of 20 tokens (blocks 0, 1) read by rows 0..2; row 2 also has a 5-token suffix in block 2:

    >>> import torch
    >>> i32 = lambda *x: torch.tensor(x, dtype=torch.int32)
    >>> levels = DecodeLevels(i32(0, 2), i32(0, 1), i32(20), i32(0, 3).view(1, 2),
    ...                       i32(-1, -1, 2).view(3, 1), i32(0, 0, 5))
    >>> levels.with_hints().max_prefix_rows
    3
    """

    prefix_kv_indptr: torch.Tensor
    prefix_kv_blocks: torch.Tensor
    prefix_kv_lens: torch.Tensor
    prefix_q_range: torch.Tensor
    suffix_block_tables: torch.Tensor
    suffix_kv_lens: torch.Tensor
    max_prefix_kv_len: Optional[int] = None
    max_prefix_rows: Optional[int] = None
    max_suffix_kv_len: Optional[int] = None
    suffix_split: Optional[torch.Tensor] = None
    prefix_split: Optional[torch.Tensor] = None
    workspace: Optional[torch.Tensor] = None

    @property
    def num_prefixes(self) -> int:
        return int(self.prefix_kv_lens.shape[0])

    def arrays(self) -> tuple:
        return (self.prefix_kv_indptr, self.prefix_kv_blocks, self.prefix_kv_lens, self.prefix_q_range,
                self.suffix_block_tables, self.suffix_kv_lens)

    def with_hints(self) -> "DecodeLevels":
        """A copy with every missing size hint computed from the tensors (one sync on CUDA)."""
        rows = self.prefix_q_range[:, 1] - self.prefix_q_range[:, 0] if self.num_prefixes else self.prefix_kv_lens
        return replace(
            self,
            max_prefix_kv_len=self.max_prefix_kv_len if self.max_prefix_kv_len is not None
            else _max_or_zero(self.prefix_kv_lens),
            max_prefix_rows=self.max_prefix_rows if self.max_prefix_rows is not None else _max_or_zero(rows),
            max_suffix_kv_len=self.max_suffix_kv_len if self.max_suffix_kv_len is not None
            else _max_or_zero(self.suffix_kv_lens),
        )

    def with_workspace(self, num_q_heads: int, num_kv_heads: int, head_dim: int,
                       device: torch.device | str) -> "DecodeLevels":
        """A copy carrying a workspace for ``len(suffix_kv_lens)`` rows of ``num_q_heads`` x
        ``head_dim`` queries over ``num_kv_heads`` KV heads on ``device`` (none on a CPU device:
        the CPU kernels need none). Hints are computed first when missing."""
        device = torch.device(device)
        hinted = self.with_hints()
        if device.type != "cuda" and not _emulated_cuda:
            return hinted
        floats = cascade_workspace_floats(int(self.suffix_kv_lens.shape[0]), num_q_heads, num_kv_heads,
                                          head_dim, hinted, device)
        return replace(hinted, workspace=torch.empty(max(floats, 1), dtype=torch.float32, device=device))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "DecodeLevels":
        """The same levels on ``device``; hints are computed first (cheap while the arrays are on the host)."""
        hinted = self.with_hints()
        moved = [t.to(device, non_blocking=non_blocking) for t in hinted.arrays()]
        splits = {name: None if t is None else t.to(device, non_blocking=non_blocking)
                  for name, t in (("suffix_split", self.suffix_split), ("prefix_split", self.prefix_split))}
        return replace(hinted, workspace=None, **splits, **dict(zip(
            ["prefix_kv_indptr", "prefix_kv_blocks", "prefix_kv_lens", "prefix_q_range",
             "suffix_block_tables", "suffix_kv_lens"], moved)))


def cascade_workspace_floats(num_rows: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                             levels: DecodeLevels, device: torch.device | str,
                             device_suffix_split: Optional[bool] = None,
                             device_prefix_split: Optional[bool] = None) -> int:
    """float32 elements of workspace :func:`cascade_decode_attention` needs on ``device`` for
    ``levels`` (with hints): the split-KV plan follows the device's SM count. ``device_suffix_split``,
    ``device_prefix_split`` (default: whether ``levels`` carries ``suffix_split`` / ``prefix_split``):
    room for any split such an array asks for."""
    device = torch.device(device)
    if device_suffix_split is None:
        device_suffix_split = levels.suffix_split is not None
    if device_prefix_split is None:
        device_prefix_split = levels.prefix_split is not None
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return int(_C.cascade_workspace_floats(num_rows, num_q_heads, num_kv_heads, head_dim, levels.num_prefixes,
                                               levels.max_prefix_kv_len, levels.max_prefix_rows,
                                               levels.max_suffix_kv_len, bool(device_suffix_split),
                                               bool(device_prefix_split)))


def cascade_suffix_split(rows: int, padded_rows: int, num_q_heads: int, num_kv_heads: int,
                         max_suffix_kv_len: int, device: torch.device | str) -> Tuple[int, int, int]:
    """The suffix key split ``(splits, chunk_keys, rows covered)`` of a decode step of ``rows`` rows
    (the longest suffix ``max_suffix_kv_len`` keys) launched as ``padded_rows`` rows: the contents
    of :attr:`DecodeLevels.suffix_split`. It is the split the step would get launched at its own
    size, on ``device`` (the split follows the SM count); unsplit on a CPU device.

    >>> cascade_suffix_split(4, 8, 32, 8, 100, "cpu")
    (1, 1073741824, 8)
    """
    device = torch.device(device)
    if device.type != "cuda" and not _emulated_cuda:
        if not 0 <= rows <= padded_rows:
            raise ValueError("cascade_suffix_split: needs 0 <= rows <= padded_rows")
        return (1, 1 << 30, int(padded_rows))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return tuple(int(v) for v in _C.cascade_suffix_split(rows, padded_rows, num_q_heads, num_kv_heads,
                                                             max_suffix_kv_len))


def cascade_prefix_split(num_prefixes: int, max_rows: int, max_len: int, bucket_prefixes: int, bucket_rows: int,
                         bucket_len: int, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                         device: torch.device | str) -> Tuple[int, int, int]:
    """The prefix key split ``(splits, chunk_keys, state_rows)`` of a decode step whose prefixes
    (``num_prefixes``, at most ``max_rows`` readers and ``max_len`` keys each) run with the hints of a
    CUDA graph's bucket (``bucket_*``): the contents of :attr:`DecodeLevels.prefix_split`. It is the
    split the step would get launched at its own size (on ``device``, by its SM count and the tile
    kernel's occupancy), at most what the bucket's grid holds; unsplit on a CPU device.

    >>> cascade_prefix_split(1, 2, 1000, 16, 128, 1024, 32, 8, 128, torch.bfloat16, "cpu")
    (1, 1024, 2)
    """
    device = torch.device(device)
    dtype_name = str(dtype).replace("torch.", "")
    if device.type != "cuda" and not _emulated_cuda:
        if not (0 <= num_prefixes <= bucket_prefixes and 0 <= max_rows <= bucket_rows and 0 <= max_len <= bucket_len):
            raise ValueError("cascade_prefix_split: the step's sizes must be >= 0 and within the bucket's")
        return (1, max(64, -(-max_len // 64) * 64), int(max_rows))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return tuple(int(v) for v in _C.cascade_prefix_split(num_prefixes, max_rows, max_len, bucket_prefixes,
                                                             bucket_rows, bucket_len, num_q_heads, num_kv_heads,
                                                             head_dim, dtype_name))


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, check_indices: Optional[bool] = None) -> None:
    """Write the step's new K/V rows into their paged slots (in place).

    Parameters
    ----------
    k, v : torch.Tensor
        ``[T, Hkv, D]``, the caches' dtype.
    k_cache, v_cache : torch.Tensor
        ``[num_blocks, block_size, Hkv, D]``.
    slot_mapping : torch.Tensor
        int64 ``[T]``: row ``t`` goes to slot ``slot_mapping[t]``; a slot < 0 is skipped.
    """
    _C.store_kv(_view(k), _view(v), _view(k_cache), _view(v_cache), _view(slot_mapping), _stream(k),
                _check_indices(k, check_indices))


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      query_start: torch.Tensor, context_lens: torch.Tensor, scale: Optional[float] = None,
                      max_q_len: Optional[int] = None, out: Optional[torch.Tensor] = None,
                      check_indices: Optional[bool] = None) -> torch.Tensor:
    """Ragged causal attention of a step's query rows over their paged context.

    Parameters
    ----------
    q : torch.Tensor
        ``[T, Hq, D]``. Sequence ``s`` owns rows ``query_start[s]:query_start[s + 1]``.
    k_cache, v_cache : torch.Tensor
        ``[num_blocks, block_size, Hkv, D]``, q's dtype, already holding this step's K/V.
    block_tables : torch.Tensor
        int32 ``[S, max_blocks]``.
    query_start : torch.Tensor
        int32 ``[S + 1]``.
    context_lens : torch.Tensor
        int32 ``[S]``: KV length of each sequence after this step. Query ``j`` of ``q_len`` rows sits at
        position ``context_lens[s] - q_len + j`` and attends to positions ``0..position``.
    max_q_len : int, optional
        Upper bound of the rows per sequence (sizes the CUDA grid); computed (a sync) when None on CUDA.
    out : torch.Tensor, optional
        ``[T, Hq, D]`` output buffer (q's dtype).

    Returns
    -------
    torch.Tensor
        ``[T, Hq, D]``, q's dtype.
    """
    o = torch.empty_like(q) if out is None else out
    if max_q_len is None:
        max_q_len = _max_or_zero(query_start[1:] - query_start[:-1]) if _is_cuda(q) else 0
    _C.prefill_attention(_view(q), _view(k_cache), _view(v_cache), _view(block_tables), _view(query_start),
                         _view(context_lens), _view(o), _scale(q, scale), int(max_q_len), _stream(q),
                         _check_indices(q, check_indices))
    return o


def cascade_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, levels: DecodeLevels,
                             scale: Optional[float] = None, return_lse: bool = False,
                             out: Optional[torch.Tensor] = None, lse_out: Optional[torch.Tensor] = None,
                             check_indices: Optional[bool] = None):
    """Decode attention (one query row per sequence) by shared-prefix levels, merged by log-sum-exp.

    Exact attention of each row over the concatenation of the prefixes covering it and its suffix:
    the same result as :func:`prefill_attention` with ``q_len == 1`` over the full block table, but
    each shared prefix's KV is read once for all its readers.

    Parameters
    ----------
    q : torch.Tensor
        ``[B, Hq, D]``.
    levels : DecodeLevels
        On q's device.
    return_lse : bool
        Also return the float32 ``[B, Hq]`` log-sum-exp (``-inf`` for a row with no keys at all).
    out, lse_out : torch.Tensor, optional
        Output buffers ``[B, Hq, D]`` (q's dtype) and ``[B, Hq]`` float32.

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)
        ``o`` ``[B, Hq, D]``, and ``lse`` when ``return_lse``.
    """
    o = torch.empty_like(q) if out is None else out
    lse = lse_out
    if lse is None and return_lse:
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    workspace = None
    if _is_cuda(q):
        levels = levels.with_hints() if None in (levels.max_prefix_kv_len, levels.max_prefix_rows,
                                                 levels.max_suffix_kv_len) else levels
        workspace = levels.workspace  # the binding refuses one that is too short, naming it
        if workspace is None:
            floats = cascade_workspace_floats(q.shape[0], q.shape[1], k_cache.shape[2], q.shape[2], levels, q.device)
            workspace = torch.empty(max(floats, 1), dtype=torch.float32, device=q.device)
    hints = [levels.max_prefix_kv_len or 0, levels.max_prefix_rows or 0, levels.max_suffix_kv_len or 0]
    arrays = tuple(_view(t) for t in levels.arrays())
    if levels.suffix_split is not None or levels.prefix_split is not None:
        arrays += tuple(None if t is None else _view(t) for t in (levels.suffix_split, levels.prefix_split))
    _C.cascade_decode_attention(_view(q), _view(k_cache), _view(v_cache), arrays,
                                hints, _view(o), None if lse is None else _view(lse),
                                None if workspace is None else _view(workspace), _scale(q, scale), _stream(q),
                                _check_indices(q, check_indices))
    return (o, lse) if return_lse else o


def merge_states(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor,
                 out: Optional[torch.Tensor] = None,
                 lse_out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention states of the same rows by log-sum-exp.

    ``o = w_a * o_a + w_b * o_b`` with ``w_x = exp(lse_x - lse)``, ``lse = log(exp(lse_a) + exp(lse_b))``.
    ``lse = -inf`` means "no keys": that side has weight 0 and the other is taken unchanged.

    Parameters
    ----------
    o_a, o_b : torch.Tensor
        ``[N, H, D]``, one dtype.
    lse_a, lse_b : torch.Tensor
        float32 ``[N, H]``.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``o`` ``[N, H, D]`` (o_a's dtype) and ``lse`` float32 ``[N, H]``.

    Examples
    --------
    >>> import torch
    >>> o, lse = merge_states(torch.ones(1, 1, 2), torch.zeros(1, 1), torch.zeros(1, 1, 2), torch.zeros(1, 1))
    >>> o.tolist(), round(lse.item(), 4)
    ([[[0.5, 0.5]]], 0.6931)
    """
    o = torch.empty_like(o_a) if out is None else out
    lse = torch.empty(o_a.shape[:2], dtype=torch.float32, device=o_a.device) if lse_out is None else lse_out
    _C.merge_states(_view(o_a), _view(lse_a), _view(o_b), _view(lse_b), _view(o), _view(lse), _stream(o_a))
    return o, lse


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor,
                filters: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token per row of ``logits``, read once in their own dtype: the argmax where the row's
    temperature is 0 (ties to the lowest id), else the Gumbel-max draw of the row's key
    (``batchllm/kernels/sampling.h``; the sampler's counter-based noise) over the tokens the row's
    ``filters`` keep. No masks: :class:`batchllm_core.sampling.Sampler` sends rows with masked
    tokens its torch way.

    Parameters
    ----------
    logits : torch.Tensor
        ``[R, V]`` float32, float16 or bfloat16, last dim contiguous.
    temperature : torch.Tensor
        float32 ``[R]``.
    keys : torch.Tensor
        int64 ``[R]``: each draw's 32-bit key (``sampling._row_keys``); ignored where temperature is 0.
    filters : (torch.Tensor, torch.Tensor, torch.Tensor) or None
        int64 top_k (0: none), float32 top_p (1: none) and float32 min_p (0: none), ``[R]`` each, for
        rows with temperature > 0 (``DrawFilters`` in batchllm/kernels/sampling.h: the kept tokens are
        a prefix of the row's order by tempered logit, ties to the lower id; top_p weighs the mass
        of what top_k keeps). A filtered row costs a pass over its logits per candidate the filters
        drop, and five more with both top_k and top_p (the k-th logit by a radix select); no sort,
        no host sync.

    Returns
    -------
    (torch.Tensor, torch.Tensor, torch.Tensor)
        int64 token ids ``[R]``, float32 logsumexp of each row ``[R]`` and float32 log-probability of
        each drawn token under the raw logits ``[R]``.

    Examples
    --------
    >>> import torch
    >>> logits, greedy, keys = torch.tensor([[0.0, 2.0, 2.0]]), torch.zeros(1), torch.zeros(1, dtype=torch.int64)
    >>> ids, lse, logprobs = sample_rows(logits, greedy, keys)
    >>> ids.tolist(), round(lse.item(), 4), round(logprobs.item(), 4)
    ([1], 2.7586, -0.7586)
    """
    rows = logits.shape[0]
    token_ids = torch.empty(rows, dtype=torch.int64, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _C.sample_rows(_view(logits), _view(temperature), _view(keys), _view(token_ids), _view(lse), _view(logprobs),
                   None if filters is None else tuple(_view(f) for f in filters), _stream(logits))
    return token_ids, lse, logprobs


# ---------------------------------------------------------------------------------------------------
# Layer ops: the element-wise work between a decoder layer's GEMMs, one kernel each (the model uses
# them on CUDA; models/llama.py keeps the torch formulas, which these equal, for the CPU).

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RMSNorm of the rows of ``x`` as Hugging Face Llama computes it (float32 math, the normalised
    row rounded to x's dtype, then times ``weight``). With ``residual``, first ``residual += x``
    (rounded, in place) and the sum is what gets normalised: a pre-norm layer's skip connection.

    Parameters
    ----------
    x : torch.Tensor
        ``[T, H]``, last dim contiguous.
    weight : torch.Tensor
        ``[H]``, x's dtype.
    eps : float
    residual : torch.Tensor, optional
        ``[T, H]``, x's dtype; updated in place.
    out : torch.Tensor, optional
        ``[T, H]``; may be ``x`` itself.

    Examples
    --------
    >>> import torch
    >>> rms_norm(torch.tensor([[3.0, 4.0]]), torch.ones(2), 0.0)
    tensor([[0.8485, 1.1314]])
    """
    out = torch.empty_like(x) if out is None else out
    _C.rms_norm(_view(x), None if residual is None else _view(residual), _view(weight), _view(out), float(eps),
                _stream(x))
    return out


def silu_and_mul(gate_up: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` ``[T, 2I]`` -> ``[T, I]`` (SwiGLU), each
    product rounded to the dtype as torch's two ops round it.

    Examples
    --------
    >>> import torch
    >>> silu_and_mul(torch.tensor([[0.0, 2.0, 5.0, 3.0]]))
    tensor([[0.0000, 5.2848]])
    """
    if out is None:
        out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype, device=gate_up.device)
    _C.silu_and_mul(_view(gate_up), _view(out), _stream(gate_up))
    return out


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                     store: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = None,
                     check_indices: Optional[bool] = None) -> None:
    """Rotate-half rope of ``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hk, D]`` in place (they may be views
    of one fused qkv row), at ``positions`` (int32 ``[T]``) with ``inv_freq`` (float32 ``[D/2]``,
    rope scaling applied): the values of models.llama.apply_rope with cos and sin in x's dtype.

    ``store``: ``(v, k_cache, v_cache, slot_mapping)`` fuses the step's :func:`store_kv` in: the
    rotated k rows and v's rows then go to their paged slots, one launch for both ops.
    """
    views = None if store is None else tuple(_view(t) for t in store)
    _C.rotary_embedding(_view(q), _view(k), _view(positions), _view(inv_freq), views, _stream(q),
                        _check_indices(k, check_indices))
