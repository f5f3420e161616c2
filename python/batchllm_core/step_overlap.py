"""Pieces for preparing step i+1 on the host while the GPU runs step i.

Today's loop is strictly serial: the GPU finishes step i, its sampled ids come to the host, the
scheduler commits them and only then plans step i+1, whose decode rows need exactly those ids as
input tokens. Two pieces remove the host from that critical path:

- :class:`SampledTokenCopy`: the sampled ids go to a pinned host buffer by one asynchronous copy
  with an event; the host waits on the event only when it needs the values (to commit), after it
  has already queued step i+1.
- :class:`DecodeTokenFeed`: step i+1's decode rows take their input token from step i's sampled ids
  *on the device* (a gather by sequence id), so step i+1 can be planned and queued before those ids
  reach the host. The gather index is host metadata (sequence ids only), computed while the GPU runs.

The loop they make possible (the scheduler must accept planning step i+1 before commit(i); see the
e2e report for the exact API)::

    plan = scheduler.next_step()
    sampled = run_and_sample(plan)                      # queued on the GPU, ids stay on the device
    copy.start(sampled); feed.remember(plan.sample_seq_ids, sampled)
    while plan is not None:
        next_plan = scheduler.next_step_pending()       # decode rows of running sequences: token pending
        if next_plan is not None:
            next_sampled = run_and_sample(next_plan, feed)   # feed.fill() patches the pending tokens
        scheduler.commit(copy.wait())                    # step i's ids; a sequence that stops here
        ...                                              #   drops its row of step i+1 (wasted, discarded)
        plan, sampled = next_plan, next_sampled
        copy.start(sampled); feed.remember(plan.sample_seq_ids, sampled)
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

__all__ = ["SampledTokenCopy", "DecodeTokenFeed"]


class SampledTokenCopy:
    """One step's sampled ids, device -> host, without blocking the host until they are needed.

    Parameters
    ----------
    device : torch.device
    capacity : int
        Initial staging size in ids (grown when a step samples more).
    """

    def __init__(self, device: torch.device, capacity: int = 4096):
        self.device = torch.device(device)
        self._host = self._new_host(capacity)
        self._count = 0
        self._done: Optional[torch.cuda.Event] = None
        self._pending = False

    def _new_host(self, capacity: int) -> torch.Tensor:
        return torch.empty(capacity, dtype=torch.int32, pin_memory=self.device.type == "cuda")

    def start(self, token_ids: torch.Tensor) -> None:
        """Queue the copy of ``token_ids`` (int32/int64 ``[R]`` on the device) after the work that makes them."""
        if self._pending:
            raise RuntimeError("SampledTokenCopy.start: the previous copy was never waited for")
        ids = token_ids.to(torch.int32)
        if ids.numel() > self._host.numel():
            self._host = self._new_host(2 * ids.numel())
        self._count = ids.numel()
        self._host[:self._count].copy_(ids, non_blocking=self.device.type == "cuda")
        if self.device.type == "cuda":
            self._done = torch.cuda.Event()
            self._done.record()
        self._pending = True

    def wait(self) -> np.ndarray:
        """The ids as int32 ``[R]`` (a copy: the staging buffer is reused by the next ``start``)."""
        if not self._pending:
            raise RuntimeError("SampledTokenCopy.wait: nothing was started")
        if self._done is not None:
            self._done.synchronize()
        self._pending = False
        return self._host[:self._count].numpy().copy()


class DecodeTokenFeed:
    """Gives the decode rows of the next step the ids sampled for their sequences in the last step,
    on the device.

    ``remember`` after each step's sampling; ``fill`` on the next step's input ids.
    """

    def __init__(self):
        self._seq_ids_sorted = np.zeros(0, np.int64)
        self._order = np.zeros(0, np.int64)
        self._sampled: Optional[torch.Tensor] = None

    def remember(self, sample_seq_ids: np.ndarray, sampled: torch.Tensor) -> None:
        """Step i's sampled ids (device ``[R]``) and the sequence of each (host int64 ``[R]``)."""
        seq_ids = np.asarray(sample_seq_ids, np.int64)
        if len(seq_ids) != sampled.shape[0]:
            raise ValueError(f"DecodeTokenFeed.remember: {len(seq_ids)} sequence ids for {sampled.shape[0]} ids")
        self._order = np.argsort(seq_ids, kind="stable")
        self._seq_ids_sorted = seq_ids[self._order]
        self._sampled = sampled

    def gather_index(self, decode_seq_ids: np.ndarray) -> np.ndarray:
        """int64 ``[B]``: for each decode row, the index of its sequence's id in the remembered step,
        or -1 when that step sampled nothing for it (its token is already known on the host)."""
        decode_seq_ids = np.asarray(decode_seq_ids, np.int64)
        if len(self._seq_ids_sorted) == 0:
            return np.full(len(decode_seq_ids), -1, np.int64)
        pos = np.searchsorted(self._seq_ids_sorted, decode_seq_ids)
        pos_clipped = np.minimum(pos, len(self._seq_ids_sorted) - 1)
        found = self._seq_ids_sorted[pos_clipped] == decode_seq_ids
        return np.where(found, self._order[pos_clipped], -1)

    def fill(self, input_ids: torch.Tensor, gather_index: torch.Tensor) -> None:
        """Overwrite ``input_ids[:B]`` (device) where ``gather_index`` (device ``[B]``, from
        :meth:`gather_index`, uploaded with the step's metadata) is >= 0. No host synchronisation."""
        if self._sampled is None or gather_index.numel() == 0:
            return
        rows = gather_index.numel()
        take = gather_index >= 0
        fed = self._sampled[gather_index.clamp(min=0)].to(input_ids.dtype)
        input_ids[:rows] = torch.where(take, fed, input_ids[:rows])
