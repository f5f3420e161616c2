"""The attention context of one model step (nano-vllm ``utils/context.py`` style).

The model runner builds one :class:`AttentionContext` per step from the StepPlan and installs it
with :func:`set_context`; every attention layer reads it with :func:`get_context`. Batch metadata
therefore never travels through the ``forward`` signatures, and the model never sees a request.

Row layout of a step (T rows, flat, no padding): rows ``[0, num_decode_rows)`` are decode rows
(one per decoding sequence), the rest are prefill chunks.

- With ``decode_levels`` set, decode rows use shared-prefix (cascade) attention by levels and rows
  ``[num_decode_rows, T)`` use paged prefill attention described by ``query_start`` /
  ``context_lens`` / ``block_tables`` (rebased: those arrays cover only the prefill sequences).
- Without ``decode_levels``, ``num_decode_rows`` is 0 for attention purposes: every row, decode or
  prefill, goes through paged prefill attention (decode rows are its q_len == 1 case).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class AttentionContext:
    """Per-step attention metadata, tensors on the model's device.

    Attributes
    ----------
    slot_mapping : torch.Tensor
        int64 ``[T]``: KV slot (``block * block_size + offset``) of each row's K/V; < 0 skips.
    num_decode_rows : int
        Rows ``[0, num_decode_rows)`` use ``decode_levels``; 0 when there are no levels.
    query_start : torch.Tensor
        int32 ``[S + 1]``: rows of the paged sequences, relative to row ``num_decode_rows``.
    context_lens : torch.Tensor
        int32 ``[S]``: KV length of each paged sequence after this step.
    block_tables : torch.Tensor
        int32 ``[S, max_blocks]``: KV blocks of each paged sequence (padded with -1).
    decode_levels : Any
        ``ops.DecodeLevels`` for the decode rows, or None.
    max_q_len : int or None
        Most rows of one paged sequence (known on the host: spares the CUDA kernel a sync).
    """

    slot_mapping: torch.Tensor
    num_decode_rows: int
    query_start: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    decode_levels: Any = None
    max_q_len: int | None = None

    @property
    def num_paged_sequences(self) -> int:
        """Sequences whose rows go through paged prefill attention."""
        return int(self.context_lens.shape[0])


_CONTEXT: AttentionContext | None = None


def get_context() -> AttentionContext | None:
    """The context of the step now running, or None outside a ModelRunner step."""
    return _CONTEXT


def set_context(context: AttentionContext | None) -> None:
    """Install the context for the next forward (None clears it)."""
    global _CONTEXT
    _CONTEXT = context


def reset_context() -> None:
    """Clear the context (the runner does this after every step, also on errors)."""
    set_context(None)
