"""The Python-side state of one generation job: requests -> scheduler arrays, sampled rows -> outputs.

The native scheduler owns what runs and when; a :class:`Job` owns what only Python can do: sampling
parameters as tensors, logprobs, stop strings on detokenized text, and assembling
:class:`~batchllm_core.outputs.RequestOutput` objects as requests complete.

Indices: *input index* is a request's position in the caller's list; *scheduler index* is its
position among the runnable requests handed to the scheduler (requests that fail validation are
never scheduled).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .outputs import CompletionOutput, RequestOutput
from .sampling import RequestSamplingTable, SamplerOutput, SamplingParams
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
class _SampleState:
    """What a tracked completion accumulates token by token (stop strings and/or logprobs)."""

    detokenizer: IncrementalDetokenizer
    logprobs: List[Dict[int, float]] = field(default_factory=list)
    stop_match: Optional[Tuple[int, str]] = None  # (text index, stop string)


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
    """

    def __init__(self, requests: Sequence[PreparedRequest], tokenizer, eos_token_ids: Sequence[int],
                 seeds: Sequence[int], device):
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
        self._states: Dict[Tuple[int, int], _SampleState] = {}
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
        stopped = []
        for row in np.nonzero(self._tracked[rows.requests])[0]:
            request, sample = int(rows.requests[row]), int(rows.sample_indices[row])
            params = self.params[request]
            state = self._states.get((request, sample))
            if state is None:
                prompt = self.requests[self.input_index[request]].prompt_token_ids
                state = self._states[(request, sample)] = _SampleState(IncrementalDetokenizer(self._tokenizer, prompt))
            token = int(sampled.token_ids[row])
            if params.logprobs is not None:
                state.logprobs.append(self._logprob_dict(sampled, row, token, params.logprobs))
            if params.stop and state.stop_match is None:
                new_text = state.detokenizer.append([token])
                # As vLLM: stop strings are not checked before min_tokens tokens exist.
                if rows.output_lens[row] + 1 >= params.min_tokens:
                    text = state.detokenizer.text
                    state.stop_match = find_stop_string(text, params.stop, len(text) - len(new_text))
                    if state.stop_match is not None and not self._ends_in_commit(request, token, rows.output_lens[row]):
                        stopped.append(int(rows.seq_ids[row]))
        return stopped

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

    @staticmethod
    def _logprob_dict(sampled: SamplerOutput, row: int, token: int, k: int) -> Dict[int, float]:
        top = {}
        if k > 0:  # logprobs=0: only the sampled token (the step may have no top arrays at all)
            top = {int(t): float(v) for t, v in zip(sampled.top_token_ids[row, :k], sampled.top_logprobs[row, :k])}
        top[token] = float(sampled.logprobs[row])
        return top

    # ------------------------------------------------------------------ completion
    def finish(self, request: int, sample: int, token_ids: Sequence[int],
               reason: str) -> Optional[Tuple[int, RequestOutput]]:
        """One completion is done; returns (input index, output) when it was its request's last."""
        if self._completions[request] is None:
            return None  # the request already failed (a sibling outgrew the cache): its output is out
        params = self.params[request]
        token_ids = [int(t) for t in token_ids]
        state = self._states.pop((request, sample), None)
        stop_reason = None
        if state is not None and state.stop_match is not None:
            text, stop_reason, reason = state.detokenizer.text[:state.stop_match[0]], state.stop_match[1], "stop"
        else:
            text = "" if self._tokenizer is None else self._tokenizer.decode(token_ids, skip_special_tokens=True)
            if reason == "stop" and token_ids and token_ids[-1] in params.stop_token_ids:
                stop_reason = token_ids[-1]
        logprobs = None
        if params.logprobs is not None:
            logprobs = state.logprobs[:len(token_ids)] if state is not None else []
        cumulative = float(self._cumulative_logprob[self._sample_base[request] + sample])
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
            self._states.pop((request, sample), None)
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
