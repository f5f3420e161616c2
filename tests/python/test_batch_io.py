"""Batch files on real disk: input reading, durable writing, crash recovery for --resume, answer lines."""
from __future__ import annotations

import json
import os
import signal

import pytest

from batchllm_core.batch_io import BatchFileError, check_output_path, read_input_lines, recover_output
from batchllm_core.batch_requests import LineError, parse_line
from batchllm_core.batch_responses import error_answer, success_answer
from batchllm_core.batch_writer import DeferredSignals, DurableWriter
from batchllm_core.outputs import CompletionOutput, RequestOutput


def test_read_input_lines_numbers_from_one_and_keeps_odd_characters(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes('\ufeff{"a": 1}\r\n\n{"b": "x\u2028y"}'.encode("utf-8"))
    assert read_input_lines(str(path)) == [(1, '{"a": 1}'), (2, ""), (3, '{"b": "x\u2028y"}')]


def test_read_input_lines_empty_file(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"")
    assert read_input_lines(str(path)) == []


def test_read_input_errors_are_clear(tmp_path):
    with pytest.raises(BatchFileError, match="cannot read input .*missing.jsonl"):
        read_input_lines(str(tmp_path / "missing.jsonl"))
    with pytest.raises(BatchFileError, match="directory"):
        read_input_lines(str(tmp_path))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"a": 1}\n\xff\xfe\n')
    with pytest.raises(BatchFileError, match="not UTF-8 text \\(line 2"):
        read_input_lines(str(bad))


def test_check_output_path(tmp_path):
    check_output_path(str(tmp_path / "out.jsonl"))
    with pytest.raises(BatchFileError, match="does not exist"):
        check_output_path(str(tmp_path / "nope" / "out.jsonl"))
    with pytest.raises(BatchFileError, match="is a directory"):
        check_output_path(str(tmp_path))


def test_writer_writes_whole_lines_and_fsyncs_on_interval(tmp_path):
    now = [0.0]
    path = tmp_path / "out.jsonl"
    writer = DurableWriter(str(path), append=False, fsync_interval_s=1.0, clock=lambda: now[0])
    writer.write({"custom_id": "a", "text": "é"})
    assert writer.fsyncs == 0
    now[0] = 1.5
    writer.write({"custom_id": "b"})
    assert writer.fsyncs == 1
    writer.write({"custom_id": "c"})
    writer.close()
    writer.close()
    assert writer.fsyncs == 2 and writer.lines_written == 3
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(l)["custom_id"] for l in lines] == ["a", "b", "c"]
    assert "é" in lines[0]
    with pytest.raises(ValueError):
        writer.write({"x": 1})


def test_writer_truncates_unless_appending(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"custom_id": "old"}\n')
    with DurableWriter(str(path), append=True, fsync_interval_s=0) as writer:
        writer.write({"custom_id": "new"})
        assert writer.fsyncs == 1
    assert len(path.read_text().splitlines()) == 2
    with DurableWriter(str(path), append=False) as writer:
        writer.write({"custom_id": "fresh"})
    assert [json.loads(l)["custom_id"] for l in path.read_text().splitlines()] == ["fresh"]


def test_recover_output_cuts_a_partial_trailing_line(tmp_path):
    path = tmp_path / "out.jsonl"
    dup = LineError(7, "a", "duplicate_custom_id", "duplicate")
    nameless = LineError(9, None, "invalid_json", "not JSON")
    content = (json.dumps({"custom_id": "a", "error": None}) + "\n" + json.dumps(error_answer(dup)) + "\n"
               + json.dumps(error_answer(nameless)) + "\n"
               + json.dumps(error_answer(LineError(3, "b", "invalid_value", "bad"))) + "\n")
    path.write_text(content + '{"custom_id": "c", "resp')
    recovered = recover_output(str(path))
    assert recovered.truncated_bytes == len('{"custom_id": "c", "resp')
    assert recovered.lines == 4
    assert recovered.keys == {("id", "a"), ("line", 7), ("line", 9), ("id", "b")}
    assert path.read_text() == content
    again = recover_output(str(path))
    assert again.truncated_bytes == 0 and again.keys == recovered.keys


def test_recover_output_of_a_missing_or_foreign_file(tmp_path):
    assert recover_output(str(tmp_path / "none.jsonl")).keys == set()
    path = tmp_path / "out.jsonl"
    path.write_text('{"custom_id": "a"}\nhello world\n')
    with pytest.raises(BatchFileError, match="line 2 is not an answer line"):
        recover_output(str(path))


def test_deferred_signals_hold_an_interrupt_until_the_line_is_written():
    with DeferredSignals() as signals:
        with pytest.raises(KeyboardInterrupt):
            with signals.critical():
                os.kill(os.getpid(), signal.SIGINT)
                reached_end_of_critical_section = True
        assert reached_end_of_critical_section
        with pytest.raises(SystemExit) as exc:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
        assert exc.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _output(token_ids, logprobs=None, finish="stop", text="ab", cached=4):
    comp = CompletionOutput(index=0, text=text, token_ids=token_ids, finish_reason=finish, logprobs=logprobs)
    return RequestOutput(request_id="0", prompt=None, prompt_token_ids=[1] * 10, outputs=[comp],
                         num_cached_tokens=cached)


def test_chat_answer_shape_usage_and_logprobs():
    req = parse_line(3, json.dumps({"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions",
                                    "body": {"messages": [{"role": "user", "content": "x"}],
                                             "logprobs": True, "top_logprobs": 1}}))
    logprobs = [{97: -0.1, 5: -3.0}, {98: -2.0, 7: -0.5}]
    answer = success_answer(req, _output([97, 98], logprobs), chr, "tiny", created=5)
    json.dumps(answer, allow_nan=False)
    assert answer["custom_id"] == "c1" and answer["error"] is None
    assert answer["response"]["status_code"] == 200
    body = answer["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "tiny" and body["created"] == 5
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
                             "prompt_tokens_details": {"cached_tokens": 4}}
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "ab"} and choice["finish_reason"] == "stop"
    assert choice["stop_reason"] is None
    content = choice["logprobs"]["content"]
    assert content[0]["token"] == "a" and content[0]["logprob"] == -0.1 and content[0]["bytes"] == [97]
    assert [t["token"] for t in content[1]["top_logprobs"]] == ["\x07"]
    assert content[1]["logprob"] == -2.0


def test_completion_answer_with_logprobs_and_infinite_values():
    req = parse_line(1, json.dumps({"custom_id": "p", "method": "POST", "url": "/v1/completions",
                                    "body": {"model": "asked", "prompt": "x", "logprobs": 2}}))
    answer = success_answer(req, _output([97, 98], [{97: -1.0}, {98: float("-inf"), 99: -0.2}], finish="length"),
                            chr, "tiny")
    json.dumps(answer, allow_nan=False)
    body = answer["response"]["body"]
    assert body["object"] == "text_completion" and body["model"] == "asked"
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["a", "b"] and logprobs["token_logprobs"] == [-1.0, -9999.0]
    assert logprobs["top_logprobs"][1] == {"c": -0.2, "b": -9999.0} and logprobs["text_offset"] == [0, 1]
    assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["stop_reason"] is None


def test_stop_reason_is_the_stop_string_or_token():
    req = parse_line(1, json.dumps({"custom_id": "p", "method": "POST", "url": "/v1/completions",
                                    "body": {"prompt": "x", "stop": "b"}}))
    output = _output([97], text="a")
    output.outputs[0].stop_reason = "b"
    assert success_answer(req, output, chr, "tiny")["response"]["body"]["choices"][0]["stop_reason"] == "b"
    output.outputs[0].stop_reason = 7
    assert success_answer(req, output, chr, "tiny")["response"]["body"]["choices"][0]["stop_reason"] == 7


def test_error_answer_shape():
    answer = error_answer(LineError(5, None, "invalid_json", "not valid JSON: x"))
    assert answer["custom_id"] is None and answer["response"]["body"] is None
    assert answer["response"]["status_code"] == 400
    assert answer["error"] == {"code": "invalid_json", "message": "line 5 (no custom_id): not valid JSON: x", "line": 5}


def test_recover_output_finds_the_last_newline_across_read_chunks(tmp_path):
    from batchllm_core.batch_io import _end_of_last_line

    path = tmp_path / "out.jsonl"
    path.write_bytes(b"a" * 10 + b"\n" + b"b" * 100)
    with open(path, "rb") as f:
        assert _end_of_last_line(f, 111, chunk_bytes=7) == 11
    path.write_bytes(b"x" * 50)
    with open(path, "rb") as f:
        assert _end_of_last_line(f, 50, chunk_bytes=8) == 0
    recovered = recover_output(str(path))
    assert recovered.truncated_bytes == 50 and recovered.lines == 0 and path.read_bytes() == b""


_LINE_KINDS = ["ok", "ok", "ok", "bad_json", "no_id", "bad_value", "blank"]


def _input_line(kind: str, custom_id: str) -> str:
    if kind == "bad_json":
        return "{nope"
    if kind == "no_id":
        return json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}})
    if kind == "blank":
        return ""
    body = {"prompt": "x", "temperature": -1 if kind == "bad_value" else 0}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body})


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(st.tuples(st.sampled_from(_LINE_KINDS), st.sampled_from("abcdef")), max_size=25),
       answered=st.lists(st.booleans(), min_size=25, max_size=25), torn=st.binary(max_size=30).filter(lambda b: b"\n" not in b))
def test_resume_answers_exactly_the_lines_not_answered_yet(tmp_path_factory, lines, answered, torn):
    """For any job (duplicates, lines without custom_id, invalid lines) and any subset of answers already
    written plus a torn last line, recovery leaves exactly the unanswered lines to run."""
    from batchllm_core.batch_requests import BatchRequest, parse_lines

    items = list(parse_lines((i + 1, _input_line(kind, cid)) for i, (kind, cid) in enumerate(lines)))
    done = [item for item, flag in zip(items, answered) if flag]
    path = tmp_path_factory.mktemp("resume") / "out.jsonl"
    with DurableWriter(str(path), append=False) as writer:
        for item in done:
            if isinstance(item, BatchRequest):
                writer.write({"id": "x", "custom_id": item.custom_id, "response": {"status_code": 200}, "error": None})
            else:
                writer.write(error_answer(item))
    with open(path, "ab") as f:
        f.write(torn)
    recovered = recover_output(str(path))
    remaining = [item for item in items if item.key not in recovered.keys]
    assert [item.line for item in remaining] == [item.line for item in items if item not in done]
    assert recovered.lines == len(done) and recovered.truncated_bytes == len(torn)
