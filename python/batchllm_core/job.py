"""The Python-side state of one generation job: requests -> scheduler arrays, sampled rows -> outputs.

The native scheduler owns what runs and when; a :class:`Job` owns what only Python can do: sampling
parameters as tensors, logprobs, stop strings on detokenized text, and assembling
:class:`~batchllm_core.outputs.RequestOutput` objects as requests complete.

Indices: *input index* is a request's position in the caller's list; *scheduler index* is its
position among the runnable requests handed to the scheduler (requests that fail validation are
never scheduled).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .outputs import CompletionOutput, RequestOutput
from .sampling import RequestSamplingTable, SamplerOutput, SamplingParams
from .stop_screen import StopScreen
from .tokenizer import IncrementalDetokenizer, find_stop_string

__all__ = ["PreparedRequest", "StepRows", "Job"]


@dataclass
class PreparedRequest:
    """One validated input: prompt tokens, params and the resolved output limit (or why it cannot run)."""

    prompt: Optional[str]
    prompt_token_ids: Union[np.ndarray, List]  # int64 array; the raw value when it was not one (error set)
    params: SamplingParams
    max_tokens: int = 0
    error: Optional[str] = None


@dataclass
class StepRows:
    """Copies of a plan's sample-row arrays (the plan's views die at ``commit``); each [R]."""

    requests: np.ndarray        # int64 scheduler index
    sample_indices: np.ndarray  # int32
    output_lens: np.ndarray     # int32 tokens generated before this row's token
    seq_ids: np.ndarray         # int64

    def __len__(self) -> int:
        return len(self.requests)

    def subset(self, keep: np.ndarray) -> "StepRows":
        """The rows where ``keep`` (bool [R]) is set."""
        return StepRows(self.requests[keep], self.sample_indices[keep], self.output_lens[keep], self.seq_ids[keep])


@dataclass
class _StopState:
    """A completion's text as far as its stop strings were checked (made at its first check)."""

    detokenizer: IncrementalDetokenizer
    fed: int = 0                     # generated tokens given to the detokenizer
    boundary: Optional[int] = None   # text length before the min_tokens-th token (matches end past it)
    checked: int = 0                 # text length at the last check (later matches end past it)
    stop_match: Optional[Tuple[int, str]] = None  # (text index, stop string)


class _TrackedRows:
    """The tokens (and logprobs) of running completions that have stop strings or logprobs, filed
    by the whole step at once: one slot (a row of these arrays) per completion, at column = its
    output position. Python objects are made only for the rows a stop string check needs, and
    the logprobs' dicts at the end (their own cost: ~1 us a token)."""

    def __init__(self, num_samples: int, top: Optional[int]):
        self.slot = np.full(num_samples, -1, np.int64)
        self._free: List[int] = []
        self._used = 0  # slots ever taken
        self._top = top  # the widest logprobs asked (None: no request wants logprobs)
        self.tokens = np.zeros((0, 16), np.int64)
        if top is not None:
            self.logprobs = np.zeros((0, 16), np.float32)
            self.top_ids = np.zeros((0, 16, top), np.int64)
            self.top_logprobs = np.zeros((0, 16, top), np.float32)

    def file(self, samples: np.ndarray, positions: np.ndarray, sampled: SamplerOutput, rows: np.ndarray) -> np.ndarray:
        """Files rows ``rows`` of ``sampled`` (completions ``samples``, output ``positions``);
        returns their slots."""
        slots = self.slot[samples]
        new = np.nonzero(slots < 0)[0]
        if len(new):
            for i in new:
                slots[i] = self._take()
            self.slot[samples[new]] = slots[new]
        self._fit(self._used, int(positions.max()) + 1)
        self.tokens[slots, positions] = sampled.token_ids[rows]
        if self._top is not None:
            self.logprobs[slots, positions] = sampled.logprobs[rows]
            width = min(self._top, sampled.top_token_ids.shape[1]) if len(sampled.top_token_ids) else 0
            if width:
                self.top_ids[slots, positions, :width] = sampled.top_token_ids[rows, :width]
                self.top_logprobs[slots, positions, :width] = sampled.top_logprobs[rows, :width]
        return slots

    def logprob_dicts(self, sample: int, length: int, k: int) -> List[Dict[int, float]]:
        """Per output token of a completion: token id -> logprob for the top ``k`` and the sampled one."""
        slot = self.slot[sample]
        if slot < 0:
            return []
        tokens, sampled = self.tokens[slot, :length].tolist(), self.logprobs[slot, :length].tolist()
        if not k:
            return [{token: value} for token, value in zip(tokens, sampled)]
        out = []
        for ids, values, token, value in zip(self.top_ids[slot, :length, :k].tolist(),
                                             self.top_logprobs[slot, :length, :k].tolist(), tokens, sampled):
            top = dict(zip(ids, values))
            top[token] = value
            out.append(top)
        return out

    def release(self, sample: int) -> None:
        slot = int(self.slot[sample])
        if slot >= 0:
            self.slot[sample] = -1
            self._free.append(slot)

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        self._used += 1
        return self._used - 1

    def _fit(self, slots: int, positions: int) -> None:
        """Grows the arrays (doubling) to hold ``slots`` slots of ``positions`` tokens."""
        have_slots, have_positions = self.tokens.shape
        if slots <= have_slots and positions <= have_positions:
            return
        shape = (max(slots, 2 * have_slots if slots > have_slots else have_slots),
                 max(positions, 2 * have_positions if positions > have_positions else have_positions))
        names = ["tokens"] + (["logprobs", "top_ids", "top_logprobs"] if self._top is not None else [])
        for name in names:
            old = getattr(self, name)
            grown = np.zeros(shape + old.shape[2:], old.dtype)
            grown[:old.shape[0], :old.shape[1]] = old
            setattr(self, name, grown)


class Job:
    """Per-job state between the engine loop and the outputs.

    Parameters
    ----------
    requests : list of PreparedRequest
        In input order; those with ``error`` set fail at once (:meth:`initial_failures`).
    tokenizer : batchllm_core.tokenizer.Tokenizer or ByteTokenizer or None
        Decodes outputs (special tokens skipped); None (random-weight shapes): texts stay empty.
    eos_token_ids : sequence of int
        Stop every request that does not ignore EOS.
    seeds : sequence of int
        One per input request: its seed or one drawn from the LLM's seed stream.
    device : torch.device
        Where the sampler runs.
    screen_stops : bool
        Check stop strings only on rows whose token can complete one (:class:`StopScreen`); False
        checks every row of a request with stop strings every step (the same outputs, slower).
    """

    def __init__(self, requests: Sequence[PreparedRequest], tokenizer, eos_token_ids: Sequence[int],
                 seeds: Sequence[int], device, screen_stops: bool = True):
        self.requests = list(requests)
        self._tokenizer = tokenizer
        self._eos_token_ids = sorted({int(t) for t in eos_token_ids})
        self.input_index = np.array([i for i, r in enumerate(self.requests) if r.error is None], np.int64)
        params = [self.requests[i].params for i in self.input_index]
        self.params = params
        self.table = RequestSamplingTable.build(params, [seeds[i] for i in self.input_index], device,
                                                self._eos_token_ids)
        self._max_tokens = np.array([self.requests[i].max_tokens for i in self.input_index], np.int64)
        num_samples = np.array([p.n for p in params], np.int64)
        self._sample_base = np.concatenate([[0], np.cumsum(num_samples)]).astype(np.int64)
        self._cumulative_logprob = np.zeros(int(self._sample_base[-1]), np.float64)
        self._tracked = np.array([bool(p.stop) or p.logprobs is not None for p in params], bool)
        self._min_tokens = np.array([p.min_tokens for p in params], np.int64)
        wants = [p.logprobs for p in params if p.logprobs is not None]
        self._rows = _TrackedRows(int(self._sample_base[-1]), max(wants) if wants else None)
        self._stops: Dict[int, _StopState] = {}  # by completion (flat sample index)
        self._stop_screen = None
        if any(p.stop for p in params) and tokenizer is not None:
            self._stop_screen = StopScreen(tokenizer.token_texts() if screen_stops else [],
                                           [p.stop for p in params])
        self._completions: List[List[Optional[CompletionOutput]]] = [[None] * p.n for p in params]
        self._remaining = num_samples.copy()
        self._cached_tokens = np.zeros(len(params), np.int64)
        self._first_prefill_position: Dict[int, int] = {}
        self.num_output_tokens = 0

    @property
    def max_output_tokens(self) -> int:
        """The largest max_tokens of the runnable requests (0 if none)."""
        return int(self._max_tokens.max()) if len(self._max_tokens) else 0

    # ------------------------------------------------------------------ scheduler input
    def scheduler_arrays(self) -> dict:
        """Keyword arguments of ``Scheduler.add_requests`` for the runnable requests."""
        runnable = [self.requests[i] for i in self.input_index]
        stop_ids = [r.params.stop_token_ids for r in runnable]
        return dict(
            tokens=np.concatenate([r.prompt_token_ids for r in runnable]).astype(np.int32),  # ids < vocab
            offsets=np.concatenate([[0], np.cumsum([len(r.prompt_token_ids) for r in runnable])]).astype(np.int64),
            max_tokens=np.array([r.max_tokens for r in runnable], np.int32),
            num_samples=np.array([r.params.n for r in runnable], np.int32),
            min_tokens=np.array([r.params.min_tokens for r in runnable], np.int32),
            ignore_eos=np.array([r.params.ignore_eos for r in runnable], bool),
            stop_token_ids=np.array([t for ids in stop_ids for t in ids], np.int32),
            stop_token_offsets=np.concatenate([[0], np.cumsum([len(s) for s in stop_ids], dtype=np.int64)])
            .astype(np.int64),
            eos_token_ids=list(self._eos_token_ids),
        )

    # ------------------------------------------------------------------ per step
    def step_rows(self, plan) -> StepRows:
        """Copy the plan's sample rows (and note where prompts started computing, for
        ``num_cached_tokens``) before ``commit`` invalidates the plan."""
        rows = StepRows(np.array(plan.sample_requests, np.int64), np.array(plan.sample_indices, np.int32),
                        np.array(plan.sample_output_lens, np.int32), np.array(plan.sample_seq_ids, np.int64))
        self._note_cached_tokens(plan, rows)
        return rows

    def _note_cached_tokens(self, plan, rows: StepRows) -> None:
        # A prompt's own prefill starts where the KV it could reuse (a shared prefix computed once
        # for its group, or an LRU-cached prefix) ends: that first computed position is the number
        # of cached prompt tokens. Shared-prefix chunks (seq id < 0) belong to no single request.
        num_decode = int(plan.num_decode_seqs)
        query_start = np.asarray(plan.query_start)
        seq_ids = np.asarray(plan.seq_ids)
        positions = np.asarray(plan.positions)
        for s in range(num_decode, len(seq_ids)):
            if seq_ids[s] >= 0:
                self._first_prefill_position.setdefault(int(seq_ids[s]), int(positions[query_start[s]]))
        first_tokens = np.nonzero(rows.output_lens == 0)[0]
        if len(first_tokens) == 0:
            return
        sample_rows = np.asarray(plan.sample_rows)
        owners = np.searchsorted(query_start, sample_rows[first_tokens], side="right") - 1
        for row, owner in zip(first_tokens, owners):
            position = self._first_prefill_position.pop(int(seq_ids[owner]), None)
            if position is not None and owner >= num_decode:
                self._cached_tokens[rows.requests[row]] = position

    def record(self, rows: StepRows, sampled: SamplerOutput) -> List[int]:
        """Account the step's sampled tokens; returns the sequence ids a stop string just finished."""
        flat = self._sample_base[rows.requests] + rows.sample_indices
        np.add.at(self._cumulative_logprob, flat, sampled.logprobs)
        self.num_output_tokens += len(rows)
        tracked = np.nonzero(self._tracked[rows.requests])[0]
        if not len(tracked):
            return []
        requests, samples, positions = rows.requests[tracked], flat[tracked], rows.output_lens[tracked]
        slots = self._rows.file(samples, positions, sampled, tracked)
        if self._stop_screen is None:
            return []
        tokens = sampled.token_ids[tracked]
        # As vLLM: stop strings are not checked before min_tokens tokens exist.
        check = self._stop_screen.flags(requests, tokens) & (positions + 1 >= self._min_tokens[requests])
        stopped = []
        for i in np.nonzero(check)[0]:
            request, sample = int(requests[i]), int(samples[i])
            match = self._check_stops(request, sample, int(slots[i]), int(positions[i]) + 1)
            if match and not self._ends_in_commit(request, int(tokens[i]), positions[i]):
                stopped.append(int(rows.seq_ids[tracked[i]]))
        return stopped

    def _check_stops(self, request: int, sample: int, slot: int, generated: int) -> bool:
        """Detokenizes a completion's tokens up to ``generated`` and looks for a stop string ending
        in the text added since its last check; True when one matched (now or before)."""
        state = self._stops.get(sample)
        if state is None:
            state = self._stops[sample] = _StopState(IncrementalDetokenizer(self._tokenizer))
        if state.stop_match is not None:
            return True
        tokens = self._rows.tokens[slot]
        if state.boundary is None:
            # The text of the tokens before the min_tokens-th, less an incomplete last character
            # (what the text was when that token was added, had it been checked token by token).
            before = tokens[:max(0, int(self._min_tokens[request]) - 1)].tolist()
            text = self._tokenizer.decode(before, clean_up_tokenization_spaces=False) if before else ""
            state.boundary = len(text.rstrip("\ufffd"))
        state.detokenizer.append(tokens[state.fed:generated])
        state.fed = generated
        text = state.detokenizer.text
        state.stop_match = find_stop_string(text, self.params[request].stop, max(state.boundary, state.checked))
        state.checked = len(text)
        return state.stop_match is not None

    def _ends_in_commit(self, request: int, token: int, output_len: int) -> bool:
        """Whether ``commit`` already finished the sequence with this token (length, EOS or stop id),
        so that only sequences still running are finished for a stop string."""
        params = self.params[request]
        generated = output_len + 1
        if generated >= self._max_tokens[request]:
            return True
        if generated < params.min_tokens:
            return False
        return token in params.stop_token_ids or (not params.ignore_eos and token in self._eos_token_ids)

    # ------------------------------------------------------------------ completion
    def finish(self, request: int, sample: int, token_ids: Sequence[int],
               reason: str) -> Optional[Tuple[int, RequestOutput]]:
        """One completion is done; returns (input index, output) when it was its request's last."""
        if self._completions[request] is None:
            return None  # the request already failed (a sibling outgrew the cache): its output is out
        params = self.params[request]
        token_ids = [int(t) for t in token_ids]
        flat = int(self._sample_base[request]) + sample
        state = self._stops.pop(flat, None)
        stop_reason = None
        if state is not None and state.stop_match is not None:
            text = self._tokenizer.clean_up(state.detokenizer.text[:state.stop_match[0]])
            stop_reason, reason = state.stop_match[1], "stop"
        else:
            text = "" if self._tokenizer is None else self._tokenizer.decode(token_ids, skip_special_tokens=True)
            if reason == "stop" and token_ids and token_ids[-1] in params.stop_token_ids:
                stop_reason = token_ids[-1]
        logprobs = None
        if params.logprobs is not None:
            logprobs = self._rows.logprob_dicts(flat, len(token_ids), params.logprobs)
        self._rows.release(flat)
        cumulative = float(self._cumulative_logprob[flat])
        self._completions[request][sample] = CompletionOutput(
            sample, text, token_ids, reason, logprobs, cumulative, stop_reason)
        self._remaining[request] -= 1
        if self._remaining[request] > 0:
            return None
        completions, self._completions[request] = self._completions[request], None  # free as we go
        return self._output(request, completions, error=None)

    def fail(self, request: int, message: str) -> Tuple[int, RequestOutput]:
        """The scheduler gave up on a request: it fails alone, with every completion marked "error"."""
        params = self.params[request]
        self._remaining[request] = 0
        self._completions[request] = None
        for sample in range(params.n):
            flat = int(self._sample_base[request]) + sample
            self._stops.pop(flat, None)
            self._rows.release(flat)
        return self._output(request, _error_completions(params.n), error=message)

    def initial_failures(self) -> List[Tuple[int, RequestOutput]]:
        """Outputs of the requests that failed validation (never scheduled)."""
        failed = []
        for index, r in enumerate(self.requests):
            if r.error is not None:
                failed.append((index, RequestOutput(str(index), r.prompt, _id_list(r.prompt_token_ids),
                                                    _error_completions(r.params.n), 0, r.error)))
        return failed

    def _output(self, request: int, completions, error: Optional[str]) -> Tuple[int, RequestOutput]:
        index = int(self.input_index[request])
        r = self.requests[index]
        cached = 0 if error is not None else int(self._cached_tokens[request])
        return index, RequestOutput(str(index), r.prompt, _id_list(r.prompt_token_ids), list(completions),
                                    cached, error)


def _id_list(ids) -> list:
    """Token ids as a list of Python ints (RequestOutput's type)."""
    return ids.tolist() if isinstance(ids, np.ndarray) else list(ids)


def _error_completions(n: int) -> List[CompletionOutput]:
    return [CompletionOutput(i, "", [], "error") for i in range(n)]
