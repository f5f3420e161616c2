"""Parsing and validation of OpenAI-batch input lines (batch_requests): no engine needed."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from batchllm_core.batch_requests import (
    CHAT_URL,
    COMPLETIONS_URL,
    BatchRequest,
    LineError,
    answer_key,
    parse_line,
    parse_lines,
)


def line(custom_id="r1", url=CHAT_URL, body=None, method="POST", **extra):
    obj = {"custom_id": custom_id, "method": method, "url": url}
    if body is None:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]} if url == CHAT_URL else {"prompt": "hi"}
    obj["body"] = body
    obj.update(extra)
    return json.dumps(obj)


def test_chat_line_maps_every_sampling_field():
    body = {"model": "gpt-x", "messages": [{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                        {"type": "text", "text": "b"}]}],
            "max_completion_tokens": 7, "max_tokens": 99, "temperature": 0, "top_p": 0.5, "n": 3,
            "stop": "\n", "seed": 11, "logprobs": True, "top_logprobs": 2}
    req = parse_line(4, line(body=body))
    assert isinstance(req, BatchRequest)
    assert req.line == 4 and req.custom_id == "r1" and req.is_chat and req.model == "gpt-x"
    assert req.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]
    assert req.top_logprobs == 2
    assert req.sampling == {"max_tokens": 7, "temperature": 0.0, "top_p": 0.5, "n": 3, "seed": 11,
                            "stop": ["\n"], "logprobs": 2}


def test_chat_defaults_leave_max_tokens_to_the_context_and_no_logprobs():
    req = parse_line(1, line())
    assert req.sampling == {"max_tokens": None}
    assert req.top_logprobs is None
    req = parse_line(1, line(body={"messages": [{"role": "user", "content": "x"}], "logprobs": True}))
    assert req.top_logprobs == 0 and req.sampling["logprobs"] == 0


@pytest.mark.parametrize("prompt, text, ids", [
    ("hello", "hello", None),
    (["hello"], "hello", None),
    ([5, 6, 7], None, [5, 6, 7]),
    ("", "", None),
])
def test_completion_prompt_forms(prompt, text, ids):
    req = parse_line(2, line(url=COMPLETIONS_URL, body={"prompt": prompt, "logprobs": 3, "max_tokens": 5}))
    assert isinstance(req, BatchRequest) and not req.is_chat
    assert req.prompt == text and req.prompt_token_ids == ids
    assert req.top_logprobs == 3 and req.sampling == {"max_tokens": 5, "logprobs": 3}


def test_completion_default_max_tokens_is_openais_16():
    assert parse_line(1, line(url=COMPLETIONS_URL)).sampling["max_tokens"] == 16


def test_vllm_extras_are_mapped():
    body = {"prompt": "x", "top_k": 5, "min_p": 0.1, "min_tokens": 2, "stop_token_ids": [3], "ignore_eos": True}
    req = parse_line(1, line(url=COMPLETIONS_URL, body=body))
    assert req.sampling == {"max_tokens": 16, "top_k": 5, "min_p": 0.1, "min_tokens": 2,
                            "stop_token_ids": [3], "ignore_eos": True}


@pytest.mark.parametrize("text, code, fragment", [
    ("{not json", "invalid_json", "not valid JSON"),
    ("[1, 2]", "invalid_request", "JSON object"),
    (json.dumps({"method": "POST", "url": CHAT_URL, "body": {}}), "missing_field", "'custom_id'"),
    (json.dumps({"custom_id": 7, "method": "POST", "url": CHAT_URL, "body": {}}), "invalid_type", "custom_id"),
])
def test_lines_without_a_custom_id(text, code, fragment):
    err = parse_line(9, text)
    assert isinstance(err, LineError)
    assert err.custom_id is None and err.code == code and err.line == 9
    assert fragment in err.message and err.message.startswith("line 9 (no custom_id)")
    assert err.key == ("line", 9)


@pytest.mark.parametrize("obj_changes, code, fragment", [
    ({"url": "/v1/embeddings"}, "unsupported_url", "/v1/embeddings"),
    ({"method": "GET"}, "invalid_value", "method"),
    ({"body": "text"}, "invalid_type", "'body' must be an object"),
    ({"body": {"model": "m"}}, "missing_field", "body.messages"),
    ({"body": {"messages": []}}, "invalid_type", "non-empty list"),
    ({"body": {"messages": [{"role": "robot", "content": "x"}]}}, "invalid_value", "role"),
    ({"body": {"messages": [{"role": "user", "content": 5}]}}, "invalid_type", "content"),
    ({"body": {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}}, "invalid_value", "image_url"),
    ({"body": {"messages": [{"role": "user", "content": "x"}], "temperature": -1}}, "invalid_value", "temperature"),
    ({"body": {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}}, "invalid_type", "temperature"),
    ({"body": {"messages": [{"role": "user", "content": "x"}], "top_p": 0}}, "invalid_value", "top_p"),
    ({"body": {"messages": [{"role": "user", "content": "x"}], "n": 0}}, "invalid_value", "'body.n'"),
    ({"body": {"messages": [{"role": "user", "content": "x"}], "n": 1.5}}, "invalid_type", "'body.n'"),
    ({"body": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}}, "invalid_value", "max_tokens"),
    ({"body": {"messages": [{"role": "user", "content": "x"}], "max_tokens": True}}, "invalid_type", "max_tokens"),
    ({"body": {"messages": [{"role": "user", "content": "x"}], "seed": "1"}}, "invalid_type", "seed"),
    ({"body": {"messages": [{"role": "user", "content": "x"}], "stop": [""]}}, "invalid_type", "stop"),
    ({"body": {"messages": [{"role": "user", "content": "x"}], "logprobs": 2}}, "invalid_type", "logprobs"),
    ({"body": {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}}, "invalid_value", "top_logprobs"),
    ({"body": {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}},
     "invalid_value", "top_logprobs"),
    ({"body": {"messages": [{"role": "user", "content": "x"}], "stream": True}}, "invalid_value", "stream"),
    ({"body": {"messages": [{"role": "user", "content": "x"}], "min_tokens": 9, "max_tokens": 2}},
     "invalid_value", "min_tokens"),
    ({"body": {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 0.5}},
     "unsupported_field", "presence_penalty"),
    ({"body": {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 10}}}, "unsupported_field", "logit_bias"),
    ({"body": {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}},
     "unsupported_field", "tools"),
    ({"url": COMPLETIONS_URL, "body": {"prompt": "a", "echo": True}}, "unsupported_field", "echo"),
    ({"url": COMPLETIONS_URL, "body": {"prompt": "a", "best_of": 3}}, "unsupported_field", "best_of"),
    ({"url": COMPLETIONS_URL, "body": {"max_tokens": 3}}, "missing_field", "body.prompt"),
    ({"url": COMPLETIONS_URL, "body": {"prompt": ["a", "b"]}}, "invalid_value", "several prompts"),
    ({"url": COMPLETIONS_URL, "body": {"prompt": [1, -2]}}, "invalid_value", ">= 0"),
    ({"url": COMPLETIONS_URL, "body": {"prompt": {"text": "a"}}}, "invalid_type", "prompt"),
    ({"url": COMPLETIONS_URL, "body": {"prompt": "a", "logprobs": True}}, "invalid_type", "logprobs"),
])
def test_invalid_lines_name_the_problem_the_line_and_the_custom_id(obj_changes, code, fragment):
    obj = json.loads(line(custom_id="abc"))
    obj.update(obj_changes)
    err = parse_line(12, json.dumps(obj))
    assert isinstance(err, LineError), err
    assert err.code == code and err.custom_id == "abc" and err.status_code == 400
    assert fragment in err.message
    assert err.message.startswith("line 12 (custom_id 'abc'): ")
    assert err.key == ("id", "abc")


def test_harmless_values_of_unsupported_fields_are_accepted():
    body = {"prompt": "a", "presence_penalty": 0, "frequency_penalty": 0.0, "echo": False, "logit_bias": {},
            "best_of": 2, "n": 2, "user": "someone", "response_format": {"type": "text"}}
    assert isinstance(parse_line(1, line(url=COMPLETIONS_URL, body=body)), BatchRequest)


def test_missing_method_url_body_are_missing_fields():
    for name in ("method", "url", "body"):
        obj = json.loads(line())
        del obj[name]
        err = parse_line(1, json.dumps(obj))
        assert err.code == "missing_field" and f"'{name}'" in err.message


def test_duplicates_blank_lines_and_order():
    lines = [(1, line("a")), (2, ""), (3, line("b")), (4, line("a")), (5, "   "), (6, "oops"),
             (7, line("b", body={"messages": "bad"})), (8, line("c"))]
    items = list(parse_lines(lines))
    assert [item.line for item in items] == [1, 3, 4, 6, 7, 8]
    dup = items[2]
    assert isinstance(dup, LineError) and dup.code == "duplicate_custom_id" and "line 1" in dup.message
    assert dup.custom_id == "a" and dup.key == ("line", 4)
    assert isinstance(items[4], LineError) and items[4].code == "duplicate_custom_id"
    assert isinstance(items[0], BatchRequest) and isinstance(items[5], BatchRequest)


def test_an_invalid_first_line_still_owns_its_custom_id():
    items = list(parse_lines([(1, line("a", url="/v1/x")), (2, line("a"))]))
    assert items[0].code == "unsupported_url" and items[1].code == "duplicate_custom_id"


def test_answer_keys():
    assert answer_key(3, "x", None) == ("id", "x")
    assert answer_key(3, "x", "invalid_value") == ("id", "x")
    assert answer_key(3, "x", "duplicate_custom_id") == ("line", 3)
    assert answer_key(3, None, "invalid_json") == ("line", 3)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(body=st.dictionaries(st.sampled_from(["messages", "prompt", "max_tokens", "temperature", "top_p", "n",
                                            "stop", "seed", "logprobs", "top_logprobs", "model"]), json_values),
       url=st.sampled_from([CHAT_URL, COMPLETIONS_URL, "/v1/other"]))
def test_any_body_gives_a_request_or_a_line_error_never_an_exception(body, url):
    item = parse_line(1, json.dumps({"custom_id": "q", "method": "POST", "url": url, "body": body}))
    assert isinstance(item, (BatchRequest, LineError))
    if isinstance(item, LineError):
        assert item.custom_id == "q" and "line 1" in item.message


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40))
def test_any_text_gives_a_request_or_a_line_error(text):
    assert isinstance(parse_line(1, text), (BatchRequest, LineError))
