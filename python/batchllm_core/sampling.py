"""The batched sampler (and ``SamplingParams``, from sampling_params.py, re-exported).

``Sampler`` turns the logits of a step's sample rows into one token per row, vectorized over the
whole step (thousands of rows in one pass).

Randomness is *counter-based*: the noise of a draw is a hash of (request seed, sample index, output
position, token id), never a shared generator's state. A seeded request therefore draws the same
tokens whatever else is in the batch, in whatever order the scheduler runs it, and after a
preemption that recomputes it. Unseeded requests get a seed from the LLM's own seed stream when they
are added, which makes a whole job reproducible from ``LLM(seed=...)``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from . import ops
from .sampling_params import SamplingParams
from .step_upload import to_device_async

__all__ = ["SamplingParams", "Sampler", "SamplerOutput", "RequestSamplingTable"]


_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (murmur3 fmix32) of int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def _row_keys(seeds: torch.Tensor, sample_indices: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per draw from (64-bit seed, sample index, output position); int64 [R]."""
    lo = seeds & _MASK32
    hi = (seeds >> 32) & _MASK32
    key = _hash32(lo ^ _hash32(hi ^ 0x9E3779B9))
    key = _hash32(key ^ _hash32((sample_indices & _MASK32) ^ 0x7F4A7C15))
    return _hash32(key ^ _hash32((positions & _MASK32) ^ 0x94D049BB))


def _gumbel_noise(keys: torch.Tensor, token_hashes: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise, float32 [R, V], a pure function of each row's key and the token id."""
    bits = _hash32(keys[:, None] ^ token_hashes[None, :])
    # 23 bits k -> u = (k + 1/2) / 2^23, exact in float32 and in [2^-24, 1 - 2^-24]: the logs are
    # finite (batchllm/kernels/sampling.h, gumbel_noise: 24 bits let k + 1/2 round up to u = 1).
    u = ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))
    return -torch.log(-torch.log(u))


def _seed_to_int64(seed: int) -> int:
    """Any Python int -> a signed int64 with the same low 64 bits (so torch can hold it)."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


# ---------------------------------------------------------------------------------------------------
@dataclass
class RequestSamplingTable:
    """Per-request sampling parameters of one job as tensors on the sampler's device, indexed by request.

    Built once per job; the sampler gathers per-row values with the plan's ``sample_requests``.
    """

    temperature: torch.Tensor  # float32 [N]
    temperature_host: np.ndarray  # float32 [N], the same on the host (which rows are greedy, no sync)
    top_k: torch.Tensor        # int64 [N]; 0 = all tokens
    top_p: torch.Tensor        # float32 [N]
    min_p: torch.Tensor        # float32 [N]
    seeds: torch.Tensor        # int64 [N]: the request's seed, or one drawn from the LLM's seed stream
    num_logprobs: np.ndarray   # int64 [N]; -1 = no logprobs (host side: only used to slice results)
    # Host copies of which requests need the top-k/top-p and min-p filters: the sampler decides
    # per step without reading the device tensors (no device-to-host sync before the draw).
    filters_kp_host: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # bool [N]
    filters_min_p_host: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # bool [N]
    top_k_host: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # int64 [N]: top_k on the host
    # min_tokens (host side): before it, the request's stop token ids and EOS ids are masked out
    # (as vLLM), so a completion cannot end early. Stopper ids of request i are
    # stopper_ids[stopper_offsets[i]:stopper_offsets[i+1]].
    min_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))       # int64 [N]
    stopper_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))      # int64 [M]
    stopper_offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))  # int64 [N+1]

    @classmethod
    def build(cls, params: Sequence[SamplingParams], seeds: Sequence[int], device,
              eos_token_ids: Sequence[int] = ()) -> "RequestSamplingTable":
        """Tensors for ``params[i]`` drawing with ``seeds[i]`` (any Python ints); ``eos_token_ids``
        end every request that does not ignore EOS (masked before its min_tokens)."""
        if len(params) != len(seeds):
            raise ValueError(f"got {len(params)} SamplingParams but {len(seeds)} seeds")
        stoppers = [sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids)))
                    if p.min_tokens > 0 else [] for p in params]

        def as_tensor(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            temperature=as_tensor([p.temperature for p in params], torch.float32),
            temperature_host=np.array([p.temperature for p in params], dtype=np.float32),
            top_k=as_tensor([max(p.top_k, 0) for p in params], torch.int64),
            top_p=as_tensor([p.top_p for p in params], torch.float32),
            min_p=as_tensor([p.min_p for p in params], torch.float32),
            seeds=as_tensor([_seed_to_int64(int(s)) for s in seeds], torch.int64),
            num_logprobs=np.array([-1 if p.logprobs is None else p.logprobs for p in params], dtype=np.int64),
            filters_kp_host=np.array([p.top_k > 0 or p.top_p < 1.0 for p in params], dtype=bool),
            filters_min_p_host=np.array([p.min_p > 0 for p in params], dtype=bool),
            top_k_host=np.array([max(p.top_k, 0) for p in params], dtype=np.int64),
            min_tokens=np.array([p.min_tokens for p in params], dtype=np.int64),
            stopper_ids=np.array([t for ids in stoppers for t in ids], dtype=np.int64),
            stopper_offsets=np.concatenate([[0], np.cumsum([len(ids) for ids in stoppers])]).astype(np.int64),
        )

    def min_tokens_mask(self, requests: np.ndarray, output_positions: np.ndarray, vocab_size: int):
        """(rows, token ids) to mask to -inf in a step's logits: the stoppers of rows before min_tokens.

        Returns None when no row needs a mask (the common case after the first few tokens).
        """
        if len(self.stopper_ids) == 0:
            return None
        early = np.nonzero(output_positions < self.min_tokens[requests])[0]
        if len(early) == 0:
            return None
        begins, ends = self.stopper_offsets[requests[early]], self.stopper_offsets[requests[early] + 1]
        rows = np.repeat(early, ends - begins)
        tokens = np.concatenate([self.stopper_ids[b:e] for b, e in zip(begins, ends)])
        keep = tokens < vocab_size
        return rows[keep], tokens[keep]


@dataclass
class SamplerOutput:
    """One step's draws, on the host.

    token_ids: int32 [R] (ready for ``Scheduler.commit``); logprobs: float32 [R], the sampled token's
    log_softmax of the raw logits; top_token_ids / top_logprobs: [R, K] with K the largest
    ``logprobs`` asked for in this step (row r's first ``num_logprobs[r]`` columns are meaningful).
    """

    token_ids: np.ndarray
    logprobs: np.ndarray
    top_token_ids: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    top_logprobs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))

    def subset(self, keep: np.ndarray) -> "SamplerOutput":
        """The rows where ``keep`` (bool [R]) is set."""
        top = len(self.top_token_ids) > 0
        return SamplerOutput(self.token_ids[keep], self.logprobs[keep],
                             self.top_token_ids[keep] if top else self.top_token_ids,
                             self.top_logprobs[keep] if top else self.top_logprobs)


class Sampler:
    """Draws one token per sample row from logits ``[R, vocab]``, vectorized over rows.

    Rows without masked tokens (all but a sequence's first min_tokens draws) are drawn by
    ``ops.sample_rows`` (a CUDA kernel on the GPU, its C++ reference on the CPU): one pass over the
    logits, and for top-k / top-p / min-p rows a pass per candidate the filters drop (no sort, no
    host sync), with the same noise and arithmetic as the torch path that draws the other rows.

    Order of the filters (as vLLM): stop/EOS ids masked before min_tokens, temperature, top-k, top-p, min-p; then a Gumbel-max draw, which
    samples exactly from the softmax of the filtered, tempered logits. Greedy rows (temperature 0)
    take the argmax of the logits, with ties going to the lowest token id (as ``torch.argmax`` and
    transformers' greedy search). Reported logprobs are log_softmax of the *raw* logits (vLLM's
    default), whatever filters the draw used.

    Parameters
    ----------
    vocab_size : int
        Logits width the sampler will be called with.
    device : torch.device
        Where the logits live; the per-token hash table is built there once.
    max_noise_elements : int
        Rows are processed in chunks of at most this many ``rows * vocab`` elements to bound the
        temporary memory of the noise (int64 hashes) for very large steps.
    """

    def __init__(self, vocab_size: int, device, max_noise_elements: int = 1 << 24):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.device = torch.device(device)
        self.max_noise_elements = int(max_noise_elements)
        # Hash of each token id, shared by every draw: noise[r, v] = hash(key[r] ^ token_hash[v]).
        self._token_hashes = _hash32(torch.arange(self.vocab_size, dtype=torch.int64, device=self.device)
                                     ^ 0x2545F491)

    def sample(self, logits: torch.Tensor, table: RequestSamplingTable, requests: np.ndarray,
               sample_indices: np.ndarray, output_positions: np.ndarray) -> SamplerOutput:
        """Draw one token for each row of ``logits`` and bring the draws to the host (see
        :meth:`sample_async` for the parameters)."""
        return self.sample_async(logits, table, requests, sample_indices, output_positions).result()

    @torch.no_grad()
    def sample_async(self, logits: torch.Tensor, table: RequestSamplingTable, requests: np.ndarray,
                     sample_indices: np.ndarray, output_positions: np.ndarray) -> "PendingSample":
        """Draw one token for each row of ``logits``; the draws stay on the device, their copy to
        the host is queued (``result()`` waits for it).

        Parameters
        ----------
        logits : torch.Tensor
            [R, vocab] on the sampler's device, float32 or the model's 16-bit dtype (read once as
            they are: no float32 copy of the whole step); not modified.
        table : RequestSamplingTable
            The job's per-request parameters.
        requests, sample_indices, output_positions : np.ndarray
            int [R] each: the request of each row, its sample index (0..n-1) and the number of
            tokens its sequence generated before this one (the plan's ``sample_requests``,
            ``sample_indices``, ``sample_output_lens``).

        Returns
        -------
        PendingSample
            ``token_ids`` (int64 [R], on the device) right away; ``result()`` -> SamplerOutput.
        """
        num_rows = logits.shape[0]
        if logits.dim() != 2 or logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits must be [R, {self.vocab_size}], got {tuple(logits.shape)}")
        if not (len(requests) == len(sample_indices) == len(output_positions) == num_rows):
            raise ValueError(f"{num_rows} logit rows but {len(requests)} requests, "
                             f"{len(sample_indices)} sample indices, {len(output_positions)} positions")
        if num_rows == 0:
            return PendingSample.ready(SamplerOutput(np.zeros(0, np.int32), np.zeros(0, np.float32)), self.device)
        requests = np.asarray(requests, dtype=np.int64)
        positions = np.asarray(output_positions, dtype=np.int64)
        filters = None
        if (table.temperature_host[requests] > 0).any():
            # One upload of each row's request, sample index and output position; every row's key.
            columns = to_device_async(np.stack([requests, np.asarray(sample_indices, np.int64), positions]),
                                      self.device)
            keys = _row_keys(table.seeds[columns[0]], columns[1], columns[2])
            temperature = table.temperature[columns[0]]
            if _any(table.filters_kp_host, requests) or _any(table.filters_min_p_host, requests):
                filters = (table.top_k[columns[0]], table.top_p[columns[0]], table.min_p[columns[0]])
        else:  # an all-greedy step (the common case) needs neither keys nor temperatures
            keys = torch.zeros(num_rows, dtype=torch.int64, device=self.device)
            temperature = torch.zeros(num_rows, dtype=torch.float32, device=self.device)
        if os.environ.get("BATCHLLM_SAMPLER", "") != "torch":
            # Every row in one pass over the logits, in their own dtype (ops.sample_rows: greedy argmax
            # or Gumbel-max with this noise over what the row's filters keep, and each row's
            # logsumexp); then the rows it does not cover.
            token_ids, log_norm, sampled_logprobs = ops.sample_rows(logits, temperature, keys, filters)
            special = self._rows_for_torch(table, requests, positions)
            # The few masked rows' filters by a sort of each (no host sync; the candidates' way syncs
            # to find the rows whose nucleus reaches past them).
            candidates = False
        else:  # BATCHLLM_SAMPLER=torch: every row by the torch formulas (an A/B, and a way around the kernel)
            log_norm = torch.logsumexp(logits.float(), dim=-1)
            token_ids = torch.empty(num_rows, dtype=torch.int64, device=self.device)
            sampled_logprobs = torch.empty(num_rows, dtype=torch.float32, device=self.device)
            special = np.arange(num_rows)
            candidates = True
        if len(special):
            self._redraw(logits, token_ids, log_norm, sampled_logprobs, keys, special, table, requests, positions,
                         candidates)
        return self._with_logprobs(logits, token_ids, sampled_logprobs, log_norm, table.num_logprobs[requests])

    def _rows_for_torch(self, table, requests: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Rows ops.sample_rows does not draw right (host arrays only: no device sync): rows with
        stop ids masked before their min_tokens."""
        mask = table.min_tokens_mask(requests, positions, self.vocab_size)
        return np.zeros(0, np.int64) if mask is None else np.unique(mask[0])

    def _redraw(self, logits, token_ids, log_norm, sampled_logprobs, keys, rows: np.ndarray, table,
                requests: np.ndarray, positions: np.ndarray, candidates: bool = True) -> None:
        """Draws `rows` again in torch with their masks and filters, in place in the step's outputs.
        ``candidates``: top-k / top-p from each row's 1,024 largest logits (a host sync to find the
        rows whose nucleus reaches past them), else from a sort of each row (no sync)."""
        rows_dev = to_device_async(rows.astype(np.int64), self.device)
        raw = logits[rows_dev].float()
        sub_requests, sub_positions = requests[rows], positions[rows]
        masked = self._mask_before_min_tokens(raw, table, sub_requests, sub_positions)
        drawn = torch.argmax(masked, dim=-1)  # greedy rows; the others are overwritten below
        random = np.nonzero(table.temperature_host[sub_requests] > 0)[0]
        chunk = max(1, self.max_noise_elements // self.vocab_size)
        req_dev = to_device_async(sub_requests, self.device)
        for start in range(0, len(random), chunk):
            part = random[start:start + chunk]
            part_dev = to_device_async(part.astype(np.int64), self.device)
            req = req_dev[part_dev]
            bound = None  # a sort of each row
            if candidates and len(table.top_k_host):
                bound = int(table.top_k_host[sub_requests[part]].max())
            drawn[part_dev] = self._draw(masked[part_dev], table.temperature[req], table.top_k[req],
                                         table.top_p[req], table.min_p[req], keys[rows_dev[part_dev]],
                                         _any(table.filters_kp_host, sub_requests[part]),
                                         _any(table.filters_min_p_host, sub_requests[part]), bound)
        token_ids[rows_dev] = drawn
        sampled_logprobs[rows_dev] = raw.gather(1, drawn[:, None])[:, 0] - log_norm[rows_dev]

    def _mask_before_min_tokens(self, logits, table, requests, output_positions) -> torch.Tensor:
        mask = table.min_tokens_mask(requests, output_positions, self.vocab_size)
        if mask is None:
            return logits
        rows_tokens = to_device_async(np.stack(mask).astype(np.int64), self.device)
        masked = logits.clone()  # a copy: the raw logits still give the reported logprobs
        masked[rows_tokens[0], rows_tokens[1]] = float("-inf")
        return masked

    def _draw(self, logits, temperature, top_k, top_p, min_p, keys, filter_kp: Optional[bool] = None,
              filter_min_p: Optional[bool] = None, top_k_bound: Optional[int] = None) -> torch.Tensor:
        """Gumbel-max draw for rows with temperature > 0; [rows, V] -> int64 [rows]. ``filter_*``:
        whether any row needs that filter, known on the host (None: look on the device, a sync);
        ``top_k_bound``: the rows' largest top_k (0: none), known on the host."""
        scaled = logits / temperature[:, None]
        if filter_kp is not False:
            scaled = _apply_top_k_top_p(scaled, top_k, top_p, needed=filter_kp, top_k_bound=top_k_bound)
        if filter_min_p is not False:
            scaled = _apply_min_p(scaled, min_p, needed=filter_min_p)
        return torch.argmax(scaled + _gumbel_noise(keys, self._token_hashes), dim=-1)

    def _with_logprobs(self, logits, token_ids, sampled_logprobs, log_norm,
                       num_logprobs: np.ndarray) -> "PendingSample":
        # One device-to-host copy for both: ids and the logprobs' float32 bits side by side.
        packed = torch.stack([token_ids.to(torch.int32), sampled_logprobs.float().view(torch.int32)])
        top = None
        max_k = int(min(num_logprobs.max(), self.vocab_size))
        if max_k > 0:
            # In the logits' own dtype (the selection is the same: the float32 conversion is exact
            # and keeps the order); a float32 copy of the step's logits first was ~2 GB of traffic
            # at W1's 1,024 x 128,256.
            top_values, top_ids = torch.topk(logits, max_k, dim=-1)
            top = (top_ids, (top_values.float() - log_norm[:, None]).float())
        return PendingSample(token_ids, packed, top)


class PendingSample:
    """One step's draws: ``token_ids`` on the device now, the host copy queued at construction.

    On CUDA the copy goes to pinned memory behind an event, so the host can queue the next step
    before it waits (:meth:`result`); on the CPU everything is ready at once.
    """

    def __init__(self, token_ids: torch.Tensor, packed: torch.Tensor,
                 top: Optional[tuple] = None, output: Optional[SamplerOutput] = None):
        self.token_ids = token_ids  # int64 [R] on the device
        self._output = output
        self._event = None
        if output is not None:
            return
        cuda = packed.device.type == "cuda"
        tensors = (packed,) + (top or ())
        self._host = [t.to("cpu", non_blocking=True) if not cuda else
                      torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                      for t in tensors]
        if cuda:
            self._event = torch.cuda.Event()
            self._event.record()

    @classmethod
    def ready(cls, output: SamplerOutput, device) -> "PendingSample":
        ids = torch.as_tensor(output.token_ids, dtype=torch.int64).to(device)
        return cls(ids, None, output=output)

    def result(self) -> SamplerOutput:
        """The draws on the host (waits for the copy once)."""
        if self._output is None:
            if self._event is not None:
                self._event.synchronize()
            packed = self._host[0].numpy()
            out = SamplerOutput(token_ids=packed[0].copy(), logprobs=packed[1].view(np.float32).copy())
            if len(self._host) == 3:
                out.top_token_ids = self._host[1].numpy()
                out.top_logprobs = self._host[2].numpy().astype(np.float32)
            self._output, self._host = out, []
        return self._output


def _any(flags: np.ndarray, requests: np.ndarray) -> Optional[bool]:
    """Whether any of ``requests`` has its flag set; None when the table has no host flags."""
    return bool(flags[requests].any()) if len(flags) else None


# Top-k / top-p look at a row's most likely tokens first: its NUCLEUS_CANDIDATES largest logits
# (torch.topk, a partial selection) rather than a sort of the whole vocabulary (1,024 rows of 128k
# tokens: milliseconds per step); rows whose nucleus reaches past them are sorted in full.
NUCLEUS_CANDIDATES = 1024


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                       needed: Optional[bool] = None, top_k_bound: Optional[int] = None) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top_k (0 = all) and top_p nucleus; [R, V] -> [R, V].
    ``needed``: whether some row filters, when the caller knows (None: look, a device sync);
    ``top_k_bound``: the rows' largest top_k, when the caller knows (None: every row sorted in full).

    Semantics (those of a full descending sort): keep the first top_k tokens, then, with the
    probabilities of the softmax over what top_k kept, keep a token while the mass strictly before
    it is below top_p; the top token always stays. Rows with neither filter are returned as they are.
    """
    vocab = logits.shape[1]
    needs_k = (top_k > 0) & (top_k < vocab)
    needs_p = top_p < 1.0
    if needed is None:
        needed = bool((needs_k | needs_p).any())
    if not needed:
        return logits  # no selection at all in the common case
    cap = vocab if top_k_bound is None else min(vocab, max(NUCLEUS_CANDIDATES, int(top_k_bound)))
    if cap >= vocab:
        return torch.where((needs_k | needs_p)[:, None], _top_k_top_p_sorted(logits, needs_k, top_k, top_p), logits)
    values, order = torch.topk(logits, cap, dim=-1)  # the candidates, descending
    kept, mass = _top_k_top_p_kept(values, needs_k, top_k, top_p, vocab,
                                   row_lse=torch.logsumexp(logits, dim=-1))
    out = torch.full_like(logits, float("-inf")).scatter_(1, order, kept)
    # Rows top-k does not cut whose candidates hold less than top_p of the mass: the nucleus may
    # reach past them (a flat distribution). Those are sorted in full (a sync to find them).
    spill = torch.nonzero(needs_p & ~needs_k & (mass < top_p))[:, 0]
    if len(spill):
        out[spill] = _top_k_top_p_sorted(logits[spill], needs_k[spill], top_k[spill], top_p[spill])
    return torch.where((needs_k | needs_p)[:, None], out, logits)


def _top_k_top_p_kept(values: torch.Tensor, needs_k: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                      vocab: int, row_lse: Optional[torch.Tensor] = None):
    """The filters on a row's largest logits in descending order ([R, C], C <= V): (the values with
    dropped ones at -inf, the kept-by-top-k probability mass of the C). Probabilities are those of the
    softmax over what top_k keeps: over the C values where top_k cuts (top_k <= C), else over the row,
    whose logsumexp is ``row_lse`` (None: the C values are the whole row)."""
    ranks = torch.arange(values.shape[1], device=values.device)[None, :]
    k = torch.where(needs_k, top_k, torch.full_like(top_k, vocab))
    values = values.masked_fill(ranks >= k[:, None], float("-inf"))
    norm = torch.logsumexp(values, dim=-1)
    if row_lse is not None:
        norm = torch.where(needs_k, norm, row_lse)
    probs = torch.exp(values - norm[:, None])
    # Keep a token while the mass strictly before it is below top_p; the top token always stays.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop = (mass_before >= top_p[:, None]) & (ranks > 0)
    return values.masked_fill(drop, float("-inf")), probs.sum(dim=-1)


def _top_k_top_p_sorted(logits: torch.Tensor, needs_k: torch.Tensor, top_k: torch.Tensor,
                        top_p: torch.Tensor) -> torch.Tensor:
    """The filters by a full sort of each row."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    kept, _ = _top_k_top_p_kept(sorted_logits, needs_k, top_k, top_p, logits.shape[1])
    return torch.empty_like(logits).scatter_(1, order, kept)


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor, needed: Optional[bool] = None) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times the row's largest; [R, V] -> [R, V].
    ``needed``: whether some row has min_p > 0, when the caller knows (None: look, a device sync)."""
    if needed is None:
        needed = bool((min_p > 0).any())
    if not needed:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))
