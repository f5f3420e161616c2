"""Results of a generation job, shaped like vLLM's offline outputs so users can switch engines."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

__all__ = ["CompletionOutput", "RequestOutput"]


@dataclass
class CompletionOutput:
    """One completion (one of the ``n`` samples) of a request.

    Attributes
    ----------
    index : int
        Sample index in [0, n).
    text : str
        Detokenized output, cut before the first stop string when one matched.
    token_ids : list of int
        Generated token ids (an EOS or stop token id that finished the completion is included,
        as in vLLM; tokens after a matched stop string are dropped).
    finish_reason : str or None
        "stop" (EOS, stop token id or stop string), "length" (max_tokens or the context length)
        or "error" (the request failed; see ``RequestOutput.error``).
    logprobs : list of dict or None
        When ``SamplingParams.logprobs = k``: per generated token, token_id -> logprob for the top k
        tokens plus the sampled one (log_softmax of the raw logits). None otherwise.
    cumulative_logprob : float or None
        Sum of the sampled tokens' logprobs.
    stop_reason : int or str or None
        The stop token id or stop string that finished the completion, None for EOS or length.
    """

    index: int
    text: str
    token_ids: List[int]
    finish_reason: Optional[str]
    logprobs: Optional[List[Dict[int, float]]] = None
    cumulative_logprob: Optional[float] = None
    stop_reason: Optional[object] = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """Everything generated for one input prompt.

    Attributes
    ----------
    request_id : str
        The request's id ("0", "1", ... in input order unless the caller named them).
    prompt : str or None
        The prompt text (None when the request came as token ids).
    prompt_token_ids : list of int
    outputs : list of CompletionOutput
        The ``n`` completions, by sample index.
    num_cached_tokens : int
        Prompt tokens whose KV came from a shared prefix that another request computed (or that
        this request's group computed once for all of its members) instead of being prefilled again.
    error : str or None
        Why the request failed (every completion then has finish_reason "error"); the rest of the job
        is unaffected.
    """

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    outputs: List[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0
    error: Optional[str] = None

    @property
    def finished(self) -> bool:
        return self.error is not None or (bool(self.outputs) and all(o.finished() for o in self.outputs))
