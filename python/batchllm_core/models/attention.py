"""Attention of one layer over the step's flat ragged batch.

Inside a ModelRunner step (a context is set) K/V go to the paged cache and attention runs through
``batchllm_core.ops``. Outside a step (no context) the tokens are one causal sequence attended
densely in torch: the self-contained path used to check the model against other implementations
and to score a single sequence without a KV cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..context import get_context


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor | None,
           v_cache: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention output of this step's rows: :func:`store_step_kv`, then :func:`attend_stored`.

    Parameters
    ----------
    q : torch.Tensor
        ``[T, Hq, D]`` queries (rope applied).
    k, v : torch.Tensor
        ``[T, Hkv, D]`` keys (rope applied) and values of this step's tokens.
    k_cache, v_cache : torch.Tensor or None
        This layer's paged cache ``[num_blocks, block_size, Hkv, D]``; required inside a step.
    scale : float
        Softmax scale.

    Returns
    -------
    torch.Tensor
        ``[T, Hq, D]``.
    """
    store_step_kv(k, v, k_cache, v_cache)
    return attend_stored(q, k, v, k_cache, v_cache, scale)


def store_step_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor | None,
                  v_cache: torch.Tensor | None) -> None:
    """Inside a step, write the rows' K/V to their paged slots (the context's ``slot_mapping``);
    outside one, nothing."""
    context = get_context()
    if context is None:
        return
    if k_cache is None or v_cache is None:
        raise RuntimeError("attention context is set but this layer has no KV cache "
                           "(the ModelRunner assigns k_cache/v_cache)")
    from .. import ops  # imported here: the model is usable without the native kernels

    ops.store_kv(k, v, k_cache, v_cache, context.slot_mapping)


def attend_stored(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor | None,
                  v_cache: torch.Tensor | None, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the step's rows once their K/V are in the cache (:func:`store_step_kv`).

    Inside a step, the rows the context describes attend (decode rows by levels, then the paged
    sequences' rows; rows past those, a padded step's, are left as they are in ``out``); outside
    one, dense causal attention of the rows as one sequence. ``out``: ``[T, Hq, D]`` to write into
    (default: a new tensor).
    """
    context = get_context()
    if context is None:
        return dense_causal_attention(q, k, v, scale)
    if k_cache is None or v_cache is None:
        raise RuntimeError("attention context is set but this layer has no KV cache "
                           "(the ModelRunner assigns k_cache/v_cache)")
    from .. import ops

    num_decode = context.num_decode_rows
    out = torch.empty_like(q) if out is None else out  # both parts write their rows in place
    if num_decode > 0:
        ops.cascade_decode_attention(q[:num_decode], k_cache, v_cache, context.decode_levels,
                                     scale=scale, out=out[:num_decode])
    if context.num_paged_sequences > 0:
        ops.prefill_attention(q[num_decode:], k_cache, v_cache, context.block_tables,
                              context.query_start, context.context_lens, scale=scale,
                              max_q_len=context.max_q_len, out=out[num_decode:])
    return out


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """Causal attention of the rows as one sequence, ``[T, Hq, D]`` -> ``[T, Hq, D]``."""
    group = q.shape[1] // k.shape[1]
    # [T, H, D] -> [H, T, D]; GQA by repeating each KV head for its group of query heads.
    qh = q.transpose(0, 1)
    kh = k.repeat_interleave(group, dim=1).transpose(0, 1)
    vh = v.repeat_interleave(group, dim=1).transpose(0, 1)
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    return out.transpose(0, 1)
