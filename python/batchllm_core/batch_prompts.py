"""Turn validated batch requests into prompt token ids, and reject the ones the model cannot take.

Shared by ``run-batch`` (which then runs the ids) and ``plan`` (which only builds the prefix tree),
so both see exactly the same prompts. Text is encoded in one batched call per kind (the Rust
tokenizer parallelizes it); chat messages are rendered with the model's chat template and encoded
without adding special tokens (the template writes them), as ``LLM.chat`` does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .batch_requests import BatchRequest, LineError

__all__ = ["TokenizedRequest", "tokenize_requests"]


@dataclass
class TokenizedRequest:
    """A request with its prompt as token ids (and the prompt text when it came as text)."""

    request: BatchRequest
    prompt_token_ids: List[int]
    prompt_text: Optional[str]


def tokenize_requests(requests: Sequence[BatchRequest], tokenizer, max_model_len: int,
                      vocab_size: Optional[int] = None) -> Tuple[List[TokenizedRequest], List[LineError]]:
    """Tokenize every request; requests that cannot run become LineErrors (input order kept in each list).

    Parameters
    ----------
    requests : sequence of BatchRequest
    tokenizer : batchllm_core.tokenizer.Tokenizer or ByteTokenizer or None
        None (a model that runs on token ids only): text prompts and chat lines are errors.
    max_model_len : int
        Context length: prompt + max_tokens must fit (OpenAI's and vLLM's rule); a prompt that
        leaves no room for one output token is rejected even when max_tokens was left open.
    vocab_size : int or None
        Token-id prompts must use ids below it.
    """
    texts: List[Optional[str]] = [None] * len(requests)
    errors: List[Optional[LineError]] = [None] * len(requests)
    for i, request in enumerate(requests):
        if request.prompt_token_ids is not None:
            continue
        if tokenizer is None:
            errors[i] = _error(request, "unsupported_prompt", "the model has no tokenizer: give the prompt as token ids")
        elif request.is_chat:
            texts[i] = _render_chat(tokenizer, request, errors, i)
        else:
            texts[i] = request.prompt
    ids = _encode(tokenizer, requests, texts, errors)
    tokenized: List[TokenizedRequest] = []
    failed: List[LineError] = []
    for i, request in enumerate(requests):
        error = errors[i] or _check_length(request, ids[i], max_model_len, vocab_size)
        if error is not None:
            failed.append(error)
        else:
            tokenized.append(TokenizedRequest(request, ids[i], texts[i]))
    return tokenized, failed


def _error(request: BatchRequest, code: str, problem: str) -> LineError:
    return LineError(request.line, request.custom_id, code, problem)


def _render_chat(tokenizer, request: BatchRequest, errors: List[Optional[LineError]], i: int) -> Optional[str]:
    try:
        return tokenizer.apply_chat_template(request.messages, add_generation_prompt=True)
    except Exception as exc:  # jinja2 TemplateError, or a template that rejects the roles given
        errors[i] = _error(request, "invalid_messages", f"the model's chat template rejected the messages: {exc}")
        return None


def _encode(tokenizer, requests: Sequence[BatchRequest], texts: List[Optional[str]],
            errors: List[Optional[LineError]]) -> List[List[int]]:
    ids: List[List[int]] = [list(r.prompt_token_ids or []) for r in requests]
    for is_chat in (False, True):
        # Completion text gets the tokenizer's special tokens (BOS); rendered chat already has them.
        batch = [i for i, r in enumerate(requests) if texts[i] is not None and errors[i] is None and r.is_chat == is_chat]
        if batch:
            encoded = tokenizer.encode_batch([texts[i] for i in batch], add_special_tokens=not is_chat)
            for i, token_ids in zip(batch, encoded):
                ids[i] = list(token_ids)
    return ids


def _check_length(request: BatchRequest, token_ids: List[int], max_model_len: int,
                  vocab_size: Optional[int]) -> Optional[LineError]:
    prompt_len = len(token_ids)
    if prompt_len == 0:
        return _error(request, "empty_prompt", "the prompt is empty (it has no tokens)")
    if vocab_size is not None and request.prompt_token_ids is not None:
        bad = [t for t in token_ids if t >= vocab_size]
        if bad:
            return _error(request, "invalid_value", f"token id {bad[0]} is outside the model's vocabulary ({vocab_size} ids)")
    max_tokens = request.sampling.get("max_tokens")
    if prompt_len >= max_model_len:
        return _error(request, "context_length_exceeded",
                      f"the prompt has {prompt_len} tokens, more than the model's context length allows "
                      f"({max_model_len} tokens, prompt + output)")
    if max_tokens is not None and prompt_len + max_tokens > max_model_len:
        return _error(request, "context_length_exceeded",
                      f"the prompt ({prompt_len} tokens) + max tokens ({max_tokens}) exceeds the model's "
                      f"context length ({max_model_len} tokens)")
    return None
