"""Answer lines in vLLM's ``run-batch`` shape (itself OpenAI's batch output format).

A success::

    {"id": "batch_req_...", "custom_id": "...", "error": null,
     "response": {"status_code": 200, "request_id": "...", "body": {chat.completion | text_completion}}}

A failure: ``response.body`` is null, ``status_code`` 400 (bad input) or 500 (the engine could not run
it), and ``error`` is ``{"code", "message", "line"}`` (``line``: the input line number, which
``--resume`` uses for lines that own no custom_id).
"""
from __future__ import annotations

import functools
import math
import time
import uuid
from typing import Any, Callable, Dict, List, Optional

from .batch_requests import BatchRequest, LineError

__all__ = ["error_answer", "success_answer", "usage_of"]

# OpenAI reports impossible tokens with this logprob rather than -inf (which JSON cannot hold).
_MIN_LOGPROB = -9999.0


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def error_answer(error: LineError) -> Dict[str, Any]:
    """The answer line of a request that did not run."""
    return {
        "id": _new_id("batch_req_"),
        "custom_id": error.custom_id,
        "response": {"status_code": error.status_code, "request_id": _new_id("batchllm-batch-"), "body": None},
        "error": {"code": error.code, "message": error.message, "line": error.line},
    }


def usage_of(output) -> Dict[str, Any]:
    """OpenAI usage of a RequestOutput; cached_tokens = prompt tokens served from a shared prefix."""
    prompt_tokens = len(output.prompt_token_ids)
    completion_tokens = sum(len(c.token_ids) for c in output.outputs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": int(output.num_cached_tokens)},
    }


def success_answer(request: BatchRequest, output, decode_token: Callable[[int], str],
                   model_name: str, created: Optional[int] = None) -> Dict[str, Any]:
    """The answer line of a finished request.

    Parameters
    ----------
    request : BatchRequest
    output : RequestOutput
        Its result (``error`` None).
    decode_token : callable
        Token id -> its text, for logprobs.
    model_name : str
        Echoed when the request named no model.
    """
    created = int(time.time()) if created is None else created
    model = request.model or model_name
    if request.is_chat:
        choices = [_chat_choice(c, request.top_logprobs, decode_token) for c in output.outputs]
        body = {"id": _new_id("chatcmpl-"), "object": "chat.completion", "created": created, "model": model,
                "choices": choices, "usage": usage_of(output)}
    else:
        choices = [_completion_choice(c, request.top_logprobs, decode_token) for c in output.outputs]
        body = {"id": _new_id("cmpl-"), "object": "text_completion", "created": created, "model": model,
                "choices": choices, "usage": usage_of(output)}
    return {
        "id": _new_id("batch_req_"),
        "custom_id": request.custom_id,
        "response": {"status_code": 200, "request_id": _new_id("batchllm-batch-"), "body": body},
        "error": None,
    }


def _finish_reason(completion) -> str:
    return completion.finish_reason or "length"


def _stop_reason(completion):
    """vLLM's stop_reason: the stop string or stop token id that ended the choice, None for EOS/length."""
    reason = getattr(completion, "stop_reason", None)
    return reason if isinstance(reason, (str, int)) and not isinstance(reason, bool) else None


def _chat_choice(completion, top_logprobs: Optional[int], decode_token) -> Dict[str, Any]:
    choice = {
        "index": completion.index,
        "message": {"role": "assistant", "content": completion.text},
        "logprobs": None,
        "finish_reason": _finish_reason(completion),
        "stop_reason": _stop_reason(completion),
    }
    if top_logprobs is not None and completion.logprobs is not None:
        content = []
        for token_id, ranked in _ranked_logprobs(completion):
            token = decode_token(token_id)
            entry = _chat_token(token, ranked.get(token_id, _MIN_LOGPROB))
            entry["top_logprobs"] = [_chat_token(decode_token(t), lp) for t, lp in list(ranked.items())[:top_logprobs]]
            content.append(entry)
        choice["logprobs"] = {"content": content}
    return choice


def _chat_token(token: str, logprob: float) -> Dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": _utf8(token)}


@functools.lru_cache(maxsize=1 << 16)
def _utf8(token: str) -> List[int]:
    """The token's UTF-8 bytes (one list per distinct token: answers only serialize it)."""
    return list(token.encode("utf-8"))


def _completion_choice(completion, top_logprobs: Optional[int], decode_token) -> Dict[str, Any]:
    choice = {"index": completion.index, "text": completion.text, "logprobs": None,
              "finish_reason": _finish_reason(completion), "stop_reason": _stop_reason(completion)}
    if top_logprobs is not None and completion.logprobs is not None:
        tokens: List[str] = []
        token_logprobs: List[float] = []
        top: List[Dict[str, float]] = []
        offsets: List[int] = []
        offset = 0
        for token_id, ranked in _ranked_logprobs(completion):
            token = decode_token(token_id)
            tokens.append(token)
            token_logprobs.append(ranked.get(token_id, _MIN_LOGPROB))
            top.append({decode_token(t): lp for t, lp in list(ranked.items())[:top_logprobs]})
            offsets.append(offset)
            offset += len(token)
        choice["logprobs"] = {"tokens": tokens, "token_logprobs": token_logprobs,
                              "top_logprobs": top, "text_offset": offsets}
    return choice


def _ranked_logprobs(completion):
    """Per generated token: (token_id, {token_id: logprob} most likely first, finite)."""
    for token_id, logprobs in zip(completion.token_ids, completion.logprobs):
        ranked = sorted(((int(t), _finite(lp)) for t, lp in logprobs.items()), key=lambda item: -item[1])
        yield int(token_id), dict(ranked)


def _finite(logprob: float) -> float:
    value = float(logprob)
    return value if math.isfinite(value) else _MIN_LOGPROB
