"""``SamplingParams``: how to sample one request's completions (vLLM's offline API), validated.

No torch here: the batch-file reader checks request bodies with the same rules before any model loads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Union

import numpy as np

__all__ = ["SamplingParams", "is_int", "is_number"]


def is_int(value) -> bool:
    # bool is an int subclass; SamplingParams(n=True) is a bug, not n=1.
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


@dataclass
class SamplingParams:
    """How to sample the completions of one request (vLLM's offline ``SamplingParams``).

    Parameters
    ----------
    n : int
        Completions per request (>= 1). They share the prompt's KV (prefilled once).
    temperature : float
        >= 0. 0 is greedy (argmax of the raw logits); otherwise logits are divided by it.
    top_p : float
        In (0, 1]: keep the smallest set of most likely tokens whose probability reaches top_p.
    top_k : int
        -1 or 0: all tokens; k >= 1: the k most likely.
    min_p : float
        In [0, 1]: drop tokens whose probability is below min_p times the most likely one's.
    seed : int or None
        Makes the request's draws independent of the rest of the batch.
    max_tokens : int or None
        Output tokens per completion (>= 1); None: as many as the context length leaves.
    min_tokens : int
        EOS and stop token ids are ignored until this many tokens were generated (<= max_tokens).
    stop : str or list of str or None
        Stop strings; the output text is cut before the first one found (finish_reason "stop").
        Matched on the text as decoded (special tokens skipped), before a tokenizer's clean-up of
        spaces (``clean_up_tokenization_spaces``, as vLLM matches), and only in text of the
        min_tokens-th token or later.
    stop_token_ids : list of int or None
        Token ids that stop a completion (the stop token is kept in token_ids, as vLLM).
    ignore_eos : bool
        Keep generating after EOS (benchmarks).
    logprobs : int or None
        Return per generated token the logprobs of the top ``logprobs`` tokens plus the sampled one.

    Examples
    --------
    >>> SamplingParams(temperature=0, max_tokens=8).temperature
    0.0
    >>> SamplingParams(top_p=0)
    Traceback (most recent call last):
    ...
    ValueError: top_p must be in (0, 1], got 0
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: Optional[int] = None
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[int]] = None
    ignore_eos: bool = False
    logprobs: Optional[int] = None

    def __post_init__(self) -> None:
        if not is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if not is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        self.temperature = float(self.temperature)
        if not is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        self.top_p = float(self.top_p)
        if not is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (all tokens) or an int >= 1, got {self.top_k!r}")
        self.top_k = int(self.top_k)
        if not is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        self.min_p = float(self.min_p)
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an int >= 1 or None, got {self.max_tokens!r}")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an int >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        self.stop = self._check_stop(self.stop)
        self.stop_token_ids = self._check_stop_token_ids(self.stop_token_ids)
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.logprobs is not None and (not is_int(self.logprobs) or self.logprobs < 0):
            raise ValueError(f"logprobs must be an int >= 0 or None, got {self.logprobs!r}")

    @staticmethod
    def _check_stop(stop) -> List[str]:
        if stop is None:
            return []
        strings = [stop] if isinstance(stop, str) else stop
        if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) and s for s in strings):
            raise ValueError(f"stop must be a non-empty str or a list of non-empty str, got {stop!r}")
        return list(strings)

    @staticmethod
    def _check_stop_token_ids(ids) -> List[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)) or not all(is_int(t) and t >= 0 for t in ids):
            raise ValueError(f"stop_token_ids must be a list of ints >= 0, got {ids!r}")
        return [int(t) for t in ids]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# ---------------------------------------------------------------------------------------------------
# Counter-based noise. Values are kept as int64 holding uint32 bit patterns: multiplication may wrap
# in int64 but the low 32 bits (all we keep) are exact, and shifts only ever see non-negative values.
