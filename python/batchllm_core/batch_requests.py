"""Parse and validate OpenAI-batch input lines into engine-ready requests.

One input line is ``{"custom_id", "method": "POST", "url", "body"}``. Every problem with a line
becomes a :class:`LineError` (a message naming the problem, the line number and the custom_id) so the
job can answer that line with an error and go on; nothing here raises for bad input.

Body fields understood (OpenAI names, plus the vLLM extras the engine supports):

============================  ==========================================================
model                         echoed in the response, not used to pick a model
messages (chat)               list of {role, content}; content a str or a list of text parts
prompt (completions)          a str, a list of token ids, or a list holding one str
max_completion_tokens,        output tokens per choice; chat default: what the context
max_tokens                    leaves, completions default: 16 (OpenAI's)
temperature, top_p, n, seed   as OpenAI
stop                          a str or a list of str
logprobs, top_logprobs        chat: logprobs bool + top_logprobs int; completions: logprobs int
top_k, min_p, min_tokens,     vLLM extras
stop_token_ids, ignore_eos
============================  ==========================================================
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from .sampling_params import is_int, is_number

__all__ = [
    "CHAT_URL",
    "COMPLETIONS_URL",
    "MAX_LOGPROBS",
    "BatchRequest",
    "LineError",
    "parse_line",
    "parse_lines",
    "answer_key",
]

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
SUPPORTED_URLS = (CHAT_URL, COMPLETIONS_URL)
MAX_LOGPROBS = 20  # vLLM's default max_logprobs; OpenAI allows 20 top_logprobs for chat
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class BatchRequest:
    """A valid input line, ready to tokenize and run.

    Exactly one of ``messages`` (chat), ``prompt`` (completions text) and ``prompt_token_ids``
    (completions given as token ids) is set. ``sampling`` holds ``SamplingParams`` keyword arguments.
    ``top_logprobs`` is None when the line asked for no logprobs, else how many alternatives to report.
    """

    line: int
    custom_id: str
    url: str
    model: Optional[str]
    sampling: Dict[str, Any]
    messages: Optional[List[Dict[str, str]]] = None
    prompt: Optional[str] = None
    prompt_token_ids: Optional[List[int]] = None
    top_logprobs: Optional[int] = None

    @property
    def is_chat(self) -> bool:
        return self.url == CHAT_URL

    @property
    def key(self) -> Tuple[str, Union[str, int]]:
        return answer_key(self.line, self.custom_id, None)


@dataclass
class LineError:
    """An input line that cannot run: answered with ``error`` set and no response body.

    ``status_code`` is 400 for problems with the input, 500 for requests the engine failed.
    """

    line: int
    custom_id: Optional[str]
    code: str
    problem: str
    status_code: int = 400

    @property
    def message(self) -> str:
        who = f"custom_id {self.custom_id!r}" if self.custom_id is not None else "no custom_id"
        return f"line {self.line} ({who}): {self.problem}"

    @property
    def key(self) -> Tuple[str, Union[str, int]]:
        return answer_key(self.line, self.custom_id, self.code)


DUPLICATE_CODE = "duplicate_custom_id"


def answer_key(line: int, custom_id: Optional[str], error_code: Optional[str]) -> Tuple[str, Union[str, int]]:
    """The identity of one answer, for ``--resume``.

    A line is answered once per custom_id, except lines that own no custom_id: a line without a usable
    custom_id, and a duplicate (its custom_id belongs to the earlier line). Those are keyed by their
    line number, so a resumed job neither repeats them nor mistakes them for the first line's answer.
    """
    if custom_id is None or error_code == DUPLICATE_CODE:
        return ("line", int(line))
    return ("id", custom_id)


class _Invalid(Exception):
    """A validation failure inside this module (turned into a LineError at the line boundary)."""

    def __init__(self, code: str, problem: str) -> None:
        super().__init__(problem)
        self.code = code
        self.problem = problem


def _show(value: Any, limit: int = 60) -> str:
    """A JSON rendering of a bad value for an error message, cut to ``limit`` characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_lines(lines: Iterable[Tuple[int, str]]) -> Iterator[Union[BatchRequest, LineError]]:
    """Parse numbered lines in order; blank lines are skipped (they are not requests).

    The first line that uses a custom_id owns it; a later line with the same custom_id is answered
    with a ``duplicate_custom_id`` error (even when the first line itself was invalid).
    """
    seen: Dict[str, int] = {}
    for line_no, text in lines:
        if not text.strip():
            continue
        item = parse_line(line_no, text)
        if item.custom_id is not None:
            first = seen.setdefault(item.custom_id, line_no)
            if first != line_no:
                item = LineError(line_no, item.custom_id, DUPLICATE_CODE,
                                 f"duplicate custom_id: line {first} already uses it")
        yield item


def parse_line(line_no: int, text: str) -> Union[BatchRequest, LineError]:
    """Parse one input line (without its newline) into a BatchRequest or a LineError."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        problem = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        return LineError(line_no, None, "invalid_json", f"not valid JSON: {problem}")
    if not isinstance(obj, dict):
        return LineError(line_no, None, "invalid_request", f"a line must be a JSON object, got {type(obj).__name__}")
    custom_id = obj.get("custom_id")
    if "custom_id" not in obj:
        return LineError(line_no, None, "missing_field", "missing field 'custom_id'")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(line_no, None, "invalid_type",
                         f"'custom_id' must be a non-empty string, got {_show(custom_id)}")
    try:
        return _parse_request(line_no, custom_id, obj)
    except _Invalid as exc:
        return LineError(line_no, custom_id, exc.code, exc.problem)


def _parse_request(line_no: int, custom_id: str, obj: Dict[str, Any]) -> BatchRequest:
    for name in ("method", "url", "body"):
        if name not in obj:
            raise _Invalid("missing_field", f"missing field '{name}'")
    if obj["method"] != "POST":
        raise _Invalid("invalid_value", f"'method' must be \"POST\", got {_show(obj['method'])}")
    url = obj["url"]
    if url not in SUPPORTED_URLS:
        raise _Invalid("unsupported_url",
                       f"unsupported url {_show(url)}: use {CHAT_URL!r} or {COMPLETIONS_URL!r}")
    body = obj["body"]
    if not isinstance(body, dict):
        raise _Invalid("invalid_type", f"'body' must be an object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _Invalid("invalid_type", "'body.model' must be a string")
    if body.get("stream"):
        raise _Invalid("invalid_value", "'body.stream' is not supported in a batch job")
    _reject_unsupported(body)
    request = BatchRequest(line=line_no, custom_id=custom_id, url=url, model=model, sampling={})
    if url == CHAT_URL:
        request.messages = _parse_messages(body)
        request.top_logprobs = _parse_chat_logprobs(body)
    else:
        request.prompt, request.prompt_token_ids = _parse_prompt(body)
        request.top_logprobs = _parse_completion_logprobs(body)
    request.sampling = _parse_sampling(body, chat=url == CHAT_URL, top_logprobs=request.top_logprobs)
    return request


# Fields that would change the result if they were silently ignored, with the value that is harmless.
_UNSUPPORTED_UNLESS = {
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "repetition_penalty": (1, 1.0),
    "logit_bias": ({},), "echo": (False,), "suffix": ("",), "tools": ([],), "functions": ([],),
    "response_format": ({"type": "text"},), "guided_json": (), "guided_regex": (), "guided_choice": (),
}


def _reject_unsupported(body: Dict[str, Any]) -> None:
    for name, harmless in _UNSUPPORTED_UNLESS.items():
        value = body.get(name)
        if value is not None and not any(value == ok and type(value) is type(ok) for ok in harmless):
            raise _Invalid("unsupported_field", f"'body.{name}' is not supported (got {_show(value)})")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise _Invalid("unsupported_field", f"'body.best_of' is not supported (got {_show(best_of)}); use n")


def _parse_messages(body: Dict[str, Any]) -> List[Dict[str, str]]:
    if "messages" not in body:
        raise _Invalid("missing_field", "missing field 'body.messages' (required by /v1/chat/completions)")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise _Invalid("invalid_type", "'body.messages' must be a non-empty list")
    parsed = []
    for i, message in enumerate(messages):
        where = f"'body.messages[{i}]'"
        if not isinstance(message, dict):
            raise _Invalid("invalid_type", f"{where} must be an object")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise _Invalid("invalid_value", f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {_show(role)}")
        parsed.append({"role": role, "content": _message_text(message.get("content"), where)})
    return parsed


def _message_text(content: Any, where: str) -> str:
    """A message's content as one string: a str, or a list of text parts joined by newlines (as vLLM)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _Invalid("invalid_value", f"{where}.content: only text parts are supported, got {_show(kind)}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise _Invalid("invalid_type", f"{where}.content must be a string or a list of text parts")


def _parse_prompt(body: Dict[str, Any]) -> Tuple[Optional[str], Optional[List[int]]]:
    if "prompt" not in body:
        raise _Invalid("missing_field", "missing field 'body.prompt' (required by /v1/completions)")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0], None
    if isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        if any(t < 0 for t in prompt):
            raise _Invalid("invalid_value", "'body.prompt' token ids must be >= 0")
        return None, list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise _Invalid("invalid_value", "'body.prompt' holds several prompts: put one prompt on each line")
    raise _Invalid("invalid_type", "'body.prompt' must be a string, a list of token ids, or a list of one string")


def _int_field(body: Dict[str, Any], name: str, minimum: int, maximum: Optional[int] = None) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if not is_int(value):
        raise _Invalid("invalid_type", f"'body.{name}' must be an integer, got {_show(value)}")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise _Invalid("invalid_value", f"'body.{name}' must be {bounds}, got {value}")
    return value


def _parse_chat_logprobs(body: Dict[str, Any]) -> Optional[int]:
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise _Invalid("invalid_type", f"'body.logprobs' must be a boolean for chat, got {_show(wanted)}")
    top = _int_field(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and top > 0 and not wanted:
        raise _Invalid("invalid_value", "'body.top_logprobs' needs 'body.logprobs': true")
    return (top or 0) if wanted else None


def _parse_completion_logprobs(body: Dict[str, Any]) -> Optional[int]:
    return _int_field(body, "logprobs", 0, MAX_LOGPROBS)


def _float_field(body: Dict[str, Any], name: str, low: float, high: float, low_open: bool = False) -> Optional[float]:
    value = body.get(name)
    if value is None:
        return None
    try:
        finite = is_number(value) and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise _Invalid("invalid_type", f"'body.{name}' must be a number, got {_show(value)}")
    if value < low or value > high or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise _Invalid("invalid_value", f"'body.{name}' must be in {bounds}, got {value}")
    return float(value)


def _parse_stop(body: Dict[str, Any]) -> Optional[List[str]]:
    stop = body.get("stop")
    if stop is None:
        return None
    strings = [stop] if isinstance(stop, str) else stop
    if not isinstance(strings, list) or not all(isinstance(s, str) and s for s in strings):
        raise _Invalid("invalid_type", "'body.stop' must be a non-empty string or a list of non-empty strings")
    return strings or None


def _parse_sampling(body: Dict[str, Any], chat: bool, top_logprobs: Optional[int]) -> Dict[str, Any]:
    """SamplingParams keyword arguments for the body (fields left out keep the engine's defaults)."""
    max_tokens = _int_field(body, "max_completion_tokens", 1) if chat else None
    if max_tokens is None:
        max_tokens = _int_field(body, "max_tokens", 1)
    if max_tokens is None and not chat:
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    sampling: Dict[str, Any] = {"max_tokens": max_tokens}  # None: as many as the context leaves
    sampling["temperature"] = _float_field(body, "temperature", 0.0, 2.0)
    sampling["top_p"] = _float_field(body, "top_p", 0.0, 1.0, low_open=True)
    sampling["min_p"] = _float_field(body, "min_p", 0.0, 1.0)
    sampling["n"] = _int_field(body, "n", 1, 128)
    sampling["top_k"] = _int_field(body, "top_k", -1)
    sampling["min_tokens"] = _int_field(body, "min_tokens", 0)
    if body.get("seed") is not None and not is_int(body["seed"]):
        raise _Invalid("invalid_type", f"'body.seed' must be an integer, got {_show(body['seed'])}")
    sampling["seed"] = body.get("seed")
    sampling["stop"] = _parse_stop(body)
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None and (not isinstance(stop_ids, list) or not all(is_int(t) and t >= 0 for t in stop_ids)):
        raise _Invalid("invalid_type", "'body.stop_token_ids' must be a list of token ids >= 0")
    sampling["stop_token_ids"] = stop_ids
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        raise _Invalid("invalid_type", "'body.ignore_eos' must be a boolean")
    sampling["ignore_eos"] = ignore_eos
    if sampling["min_tokens"] is not None and max_tokens is not None and sampling["min_tokens"] > max_tokens:
        raise _Invalid("invalid_value", f"'body.min_tokens' ({sampling['min_tokens']}) must be <= max tokens ({max_tokens})")
    sampling["logprobs"] = top_logprobs
    return {name: value for name, value in sampling.items() if value is not None or name == "max_tokens"}
