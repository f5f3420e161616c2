"""``batchllm run-batch`` end to end on the real engine with the embedded tiny model.

In-process runs share one LLM (loading is the slow part); the command line itself, signals and
SIGKILL-and-resume run as subprocesses.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest

from batchllm_core.cli import main, parse_size
from batchllm_core.run_batch import RunOptions, run_batch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "fewshot_batch.jsonl"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def request(custom_id, url=COMPLETIONS, **body):
    if url == COMPLETIONS:
        body.setdefault("prompt", f"Shared few-shot preamble for the whole group. Q: {custom_id}? A:")
    else:
        body.setdefault("messages", [{"role": "system", "content": "Answer briefly, in one word."},
                                     {"role": "user", "content": f"What is {custom_id}?"}])
    body.setdefault("max_tokens", 4)
    body.setdefault("temperature", 0)
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read_answers(path: Path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def llm():
    from batchllm_core import LLM

    with warnings.catch_warnings():  # "the tiny model's text is noise" (warned once per process)
        warnings.simplefilter("ignore")
        return LLM()


def run(llm, tmp_path, lines, resume=False, output=None, **options):
    input_path = write_lines(tmp_path / "in.jsonl", lines) if lines is not None else tmp_path / "in.jsonl"
    output = output or tmp_path / "out.jsonl"
    stdout, stderr = io.StringIO(), io.StringIO()
    code = run_batch(RunOptions(str(input_path), str(output), resume=resume, **options), stdout, stderr,
                     llm_factory=lambda _: llm)
    return code, stdout.getvalue(), stderr.getvalue(), output


def test_a_mixed_job_answers_every_line_once_and_bad_lines_fail_alone(llm, tmp_path):
    lines = [
        request("c1", CHAT, logprobs=True, top_logprobs=2),
        request("p1", logprobs=1, n=2, temperature=0.7, seed=3),
        "{this is not json",
        json.dumps({"custom_id": "nourl", "method": "POST", "body": {}}),
        request("emb", url="/v1/embeddings"),
        request("hot", temperature=-0.5),
        request("c1"),                                    # duplicate: the later line fails
        request("toolong", prompt=[65] * 40000),          # longer than the context (32768)
        request("wantsmore", max_tokens=40000),           # prompt + max_tokens over the context
        request("ids", prompt=[256, 72, 105]),
        "",
        request("stop", max_tokens=12, stop=["\n", "."]),
    ]
    code, stdout, stderr, output = run(llm, tmp_path, lines)
    assert code == 0
    answers = read_answers(output)
    assert len(answers) == 11                             # the blank line is not a request
    by_id = Counter(a["custom_id"] for a in answers)
    assert by_id["c1"] == 2 and by_id[None] == 1

    errors = {(a["error"]["line"]): a for a in answers if a["error"] is not None}
    assert sorted(errors) == [3, 4, 5, 6, 7, 8, 9]
    assert errors[3]["error"]["code"] == "invalid_json" and "line 3 (no custom_id)" in errors[3]["error"]["message"]
    assert "'url'" in errors[4]["error"]["message"] and "custom_id 'nourl'" in errors[4]["error"]["message"]
    assert errors[5]["error"]["code"] == "unsupported_url"
    assert "temperature" in errors[6]["error"]["message"]
    assert errors[7]["error"]["code"] == "duplicate_custom_id" and "line 1" in errors[7]["error"]["message"]
    assert errors[8]["error"]["code"] == "context_length_exceeded" and "line 8 (custom_id 'toolong')" in errors[8]["error"]["message"]
    assert errors[9]["error"]["code"] == "context_length_exceeded"
    for answer in errors.values():
        assert answer["response"]["status_code"] == 400 and answer["response"]["body"] is None

    ok = {a["custom_id"]: a["response"]["body"] for a in answers if a["error"] is None}
    assert set(ok) == {"c1", "p1", "ids", "stop"}
    chat = ok["c1"]
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    assert len(chat["choices"][0]["logprobs"]["content"]) == chat["usage"]["completion_tokens"]
    assert all(len(t["top_logprobs"]) <= 2 for t in chat["choices"][0]["logprobs"]["content"])
    completion = ok["p1"]
    assert completion["object"] == "text_completion" and [c["index"] for c in completion["choices"]] == [0, 1]
    assert completion["usage"]["completion_tokens"] == sum(
        len(c["logprobs"]["tokens"]) for c in completion["choices"])
    assert ok["ids"]["usage"]["prompt_tokens"] == 3
    for body in ok.values():
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]
    stop_choice = ok["stop"]["choices"][0]
    assert "\n" not in stop_choice["text"] and "." not in stop_choice["text"]
    assert stop_choice["stop_reason"] in ("\n", ".", None)
    if stop_choice["finish_reason"] == "length":
        assert stop_choice["stop_reason"] is None
    assert "4 ok, 7 failed" in stdout and "batchllm: read 11 requests" in stderr


def test_shared_prefixes_are_reported_as_cached_tokens(llm, tmp_path):
    preamble = "You label reviews. " * 8
    lines = [request(f"r{i}", prompt=preamble + f"Review number {i}: fine. Label:") for i in range(6)]
    code, stdout, _, output = run(llm, tmp_path, lines)
    assert code == 0
    cached = [a["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"] for a in read_answers(output)]
    assert len(cached) == 6 and min(cached) >= 128       # the 152-byte preamble: at least 8 shared blocks
    assert len(set(cached)) == 1                          # one group, one prefix
    # Every member is served the prefix; it is computed once, so 5 of the 6 copies are saved.
    saved = int(re.search(r"prefill tokens saved: ([\d,]+)", stdout).group(1).replace(",", ""))
    assert saved == 5 * cached[0]


def test_resume_skips_answered_lines_and_cuts_a_torn_last_line(llm, tmp_path):
    lines = [request(f"r{i}") for i in range(8)] + ["not json", request("r0")]
    code, _, _, output = run(llm, tmp_path, lines)
    full = output.read_text().splitlines()
    assert code == 0 and len(full) == 10
    # An interrupted run: 4 complete answers (including both error lines), then half a line.
    kept = [line for line in full if json.loads(line)["error"] is not None]
    kept += [line for line in full if json.loads(line)["custom_id"] in ("r3", "r5")]
    output.write_text("\n".join(kept) + "\n" + full[-1][: len(full[-1]) // 2])
    code, stdout, stderr, _ = run(llm, tmp_path, lines, resume=True)
    assert code == 0
    answers = read_answers(output)
    assert len(answers) == 10
    keys = Counter((a["custom_id"], (a["error"] or {}).get("line")) for a in answers)
    assert all(count == 1 for count in keys.values())
    assert {a["custom_id"] for a in answers} == {None, *(f"r{i}" for i in range(8))}
    assert "cut a partial last line" in stderr and "4 already answered" in stderr
    assert "4 requests were already answered" in stdout
    # Resuming a finished job does nothing and loads no model.
    code, stdout, _, _ = run(None, tmp_path, lines, resume=True)
    assert code == 0 and len(read_answers(output)) == 10 and "0 of 0 requests" in stdout


def test_empty_input_gives_an_empty_output_and_a_zero_summary(tmp_path):
    (tmp_path / "out.jsonl").write_text("stale\n")
    code, stdout, _, output = run(None, tmp_path, [])      # llm None: the model must not load
    assert code == 0 and output.read_text() == ""
    assert "0 of 0 requests answered (0 ok, 0 failed)" in stdout and "output tokens: 0" in stdout


def test_unreadable_paths_are_clear_errors(tmp_path):
    stderr = io.StringIO()
    code = run_batch(RunOptions(str(tmp_path / "missing.jsonl"), str(tmp_path / "out.jsonl")), io.StringIO(), stderr,
                     llm_factory=lambda _: pytest.fail("no model for a missing input"))
    assert code == 1 and "cannot read input" in stderr.getvalue() and "missing.jsonl" in stderr.getvalue()
    write_lines(tmp_path / "in.jsonl", [request("a")])
    stderr = io.StringIO()
    code = run_batch(RunOptions(str(tmp_path / "in.jsonl"), str(tmp_path / "no" / "out.jsonl")), io.StringIO(), stderr,
                     llm_factory=lambda _: pytest.fail("no model for an unwritable output"))
    assert code == 1 and "does not exist" in stderr.getvalue()
    (tmp_path / "out.jsonl").write_text("garbage\n")
    stderr = io.StringIO()
    code = run_batch(RunOptions(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), resume=True),
                     io.StringIO(), stderr, llm_factory=lambda _: pytest.fail("no model"))
    assert code == 1 and "line 1 is not an answer line" in stderr.getvalue()


def test_parse_size():
    assert parse_size("2GiB") == 2 << 30 and parse_size("512MB") == 512 * 10**6
    assert parse_size("1.5k") == 1536 and parse_size("4096") == 4096
    for bad in ("", "-1", "2 parsecs", "0"):
        with pytest.raises(Exception):
            parse_size(bad)


def test_command_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run-batch", "-i", "x.jsonl"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["run-batch", "-i", "x", "-o", "y", "--kv-cache-memory", "lots"])
    assert exc.value.code == 2 and "not a size" in capsys.readouterr().err
    assert main(["run-batch", "-i", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o.jsonl")]) == 1
    assert "cannot read input" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ subprocesses
def _env():
    """The test's own batchllm_core for the child: the source tree (make dev) or the installed one (make test)."""
    import batchllm_core

    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(batchllm_core.__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "batchllm_core", *map(str, args)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _slow_job(path: Path, groups=6, per_group=16, max_tokens=16):
    """A job that writes answers in waves when the KV pool is small (groups run one after another)."""
    lines = []
    for g in range(groups):
        for i in range(per_group):
            lines.append(request(f"g{g}-r{i}", prompt=f"Group {g} shared instructions. " * 6 + f"question {i}?",
                                 max_tokens=max_tokens, ignore_eos=True))
    return write_lines(path, lines)


def _wait_for_lines(path: Path, count: int, proc, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        if proc.poll() is not None:
            pytest.fail(f"the job ended before writing {count} lines: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no {count} answer lines after {timeout_s} s")


def _check_exactly_once(input_path: Path, output_path: Path):
    wanted = [json.loads(line)["custom_id"] for line in input_path.read_text().splitlines()]
    answers = read_answers(output_path)
    assert sorted(a["custom_id"] for a in answers) == sorted(wanted)
    assert all(a["error"] is None for a in answers)


@pytest.mark.slow
def test_sigkill_part_way_then_resume_answers_every_line_exactly_once(tmp_path):
    input_path = _slow_job(tmp_path / "in.jsonl")
    output = tmp_path / "out.jsonl"
    proc = _start(["run-batch", "-i", input_path, "-o", output, "--kv-cache-memory", "512KiB"])
    _wait_for_lines(output, 10, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = output.read_bytes().count(b"\n")
    assert 10 <= done < 96, "the job should have been killed part-way"
    with open(output, "ab") as f:  # what a write torn by a crash of the machine would leave
        f.write(b'{"id": "batch_req_torn", "custom_id": "g9')
    proc = _start(["run-batch", "-i", input_path, "-o", output, "--resume"])
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert f"{done} already answered" in stderr and "cut a partial last line" in stderr
    _check_exactly_once(input_path, output)


@pytest.mark.slow
@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_stops_cleanly_after_flushing_and_resume_finishes(tmp_path, signum, exit_code):
    input_path = _slow_job(tmp_path / "in.jsonl")
    output = tmp_path / "out.jsonl"
    proc = _start(["run-batch", "-i", input_path, "-o", output, "--kv-cache-memory", "512KiB"])
    _wait_for_lines(output, 5, proc)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == exit_code, stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stdout and "--resume" in stdout
    data = output.read_bytes()
    assert data.endswith(b"\n")  # flushed whole lines only
    answered = len(read_answers(output))
    assert 5 <= answered < 96
    proc = _start(["run-batch", "-i", input_path, "-o", output, "--resume"])
    proc.communicate(timeout=300)
    assert proc.returncode == 0
    _check_exactly_once(input_path, output)


def test_console_entry_on_the_example_job(tmp_path):
    output = tmp_path / "out.jsonl"
    proc = _start(["run-batch", "-i", EXAMPLE, "-o", output, "--progress-interval", "0.5"])
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    answers = read_answers(output)
    assert len(answers) == len(EXAMPLE.read_text().splitlines()) and all(a["error"] is None for a in answers)
    assert "done: 52 of 52 requests answered (52 ok, 0 failed)" in stdout
    assert "warning: LLM(): no model given" in stderr and "Traceback" not in stderr
    cached = sum(a["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers)
    prompt = sum(a["response"]["body"]["usage"]["prompt_tokens"] for a in answers)
    assert cached > prompt / 2  # the example's groups share most of their prompts


def test_requests_the_engine_cannot_run_fail_alone_with_status_500(tmp_path):
    from batchllm_core import LLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = LLM(kv_cache_memory=2 * 16 * 512)      # two KV blocks of 16 float32 tokens
    lines = [request("fits", prompt="hi", max_tokens=2), request("huge", prompt="x" * 60, max_tokens=4)]
    code, stdout, _, output = run(small, tmp_path, lines)
    assert code == 0
    answers = {a["custom_id"]: a for a in read_answers(output)}
    assert answers["fits"]["error"] is None
    assert answers["huge"]["response"]["status_code"] == 500
    assert answers["huge"]["error"]["code"] == "engine_error" and "KV cache" in answers["huge"]["error"]["message"]
    assert "line 2 (custom_id 'huge')" in answers["huge"]["error"]["message"]
    assert "1 ok, 1 failed" in stdout


def test_progress_lines_when_not_a_terminal():
    from batchllm_core.batch_progress import JobCounters, ProgressReporter, format_summary

    now = [0.0]
    stream = io.StringIO()
    counters = JobCounters(total=10, ok=3, failed=1, prompt_tokens=100, cached_tokens=80, output_tokens=50)
    progress = ProgressReporter(counters, stream, interval_s=5.0, kv_usage=lambda: 0.25, clock=lambda: now[0])
    now[0] = 1.0
    progress.update()
    assert stream.getvalue() == ""                      # not yet: one line per interval
    now[0] = 10.0
    progress.update()
    line = stream.getvalue()
    assert line.endswith("\n") and "\r" not in line
    assert "4/10 requests" in line and "5.0 output tok/s" in line and "80.0% prompt tokens" in line
    assert "KV 25% used" in line and "1 failed" in line
    counters.seconds, counters.interrupted = 2.0, True
    summary = format_summary(counters, "out.jsonl")
    assert "interrupted: 4 of 10 requests answered (3 ok, 1 failed) in 2.00 s" in summary
    assert "25.0 tokens/s" in summary and "served from shared prefixes: 80 (80.0%)" in summary
    assert "--resume" in summary and "prefill tokens saved" not in summary   # unknown: the run did not complete
    counters.prefilled_tokens = 40
    assert "prefill tokens saved: 60 (60.0% of the prompt tokens; 40 computed" in format_summary(counters, "o")
    assert counters.as_dict()["prefill_tokens_saved"] == 60


def test_progress_shows_the_live_kv_use_of_the_running_job(llm, tmp_path):
    lines = [request(f"r{i}", max_tokens=6) for i in range(12)]
    code, _, stderr, _ = run(llm, tmp_path, lines, progress_interval_s=0.0)
    assert code == 0
    used = [float(m) for m in re.findall(r"KV (\d+)% used", stderr)]
    assert used and all(0 <= u <= 100 for u in used), stderr
    assert llm.kv_cache_usage() is None  # no job runs now


class _FailsAfterFirstAnswer:
    """The real engine, except that it breaks down after its first completed request."""

    def __init__(self, llm):
        self._llm = llm

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def generate_stream(self, *args, **kwargs):
        stream = self._llm.generate_stream(*args, **kwargs)
        yield next(stream)
        stream.close()
        raise RuntimeError("device lost")


def test_an_engine_failure_keeps_the_answers_written_and_resume_finishes(llm, tmp_path):
    lines = [request(f"r{i}", prompt=f"Prompt number {i} " * (i + 1)) for i in range(5)] + ["bad line"]
    code, stdout, stderr, output = run(_FailsAfterFirstAnswer(llm), tmp_path, lines)
    assert code == 1
    assert "unexpected engine error" in stderr and "device lost" in stderr
    assert "interrupted" in stdout and "--resume" in stdout
    assert len(read_answers(output)) == 2                 # the bad line's error and one completion
    code, _, _, output = run(llm, tmp_path, lines, resume=True)
    assert code == 0
    answers = read_answers(output)
    assert len(answers) == 6 and len({a["custom_id"] for a in answers}) == 6


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_one_line_on_a_terminal():
    from batchllm_core.batch_progress import JobCounters, ProgressReporter

    now = [0.0]
    stream = _Terminal()
    counters = JobCounters(total=4)
    progress = ProgressReporter(counters, stream, interval_s=60.0, clock=lambda: now[0])
    assert progress.interval_s == ProgressReporter.TTY_REFRESH_S
    for done in (1, 2):
        counters.ok = done
        now[0] += 1.0
        progress.update()
    progress.stage("finishing")
    progress.close()
    text = stream.getvalue()
    assert text.count("\r\x1b[2K") == 2 and "2/4 requests" in text
    assert text.endswith("\nbatchllm: finishing\n")   # the status line is ended before a stage line


def test_progress_ticker_reports_while_nothing_finishes():
    from batchllm_core.batch_progress import JobCounters, ProgressReporter

    stream = io.StringIO()
    progress = ProgressReporter(JobCounters(total=3), stream, interval_s=0.02)
    progress.start_ticker()
    deadline = time.monotonic() + 5
    while stream.getvalue().count("\n") < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    progress.close()
    assert stream.getvalue().count("0/3 requests") >= 2


def test_the_output_may_not_be_the_input(tmp_path):
    source = write_lines(tmp_path / "in.jsonl", [request("a")])
    stderr = io.StringIO()
    code = run_batch(RunOptions(str(source), str(tmp_path / "." / "in.jsonl")), io.StringIO(), stderr,
                     llm_factory=lambda _: pytest.fail("no model"))
    assert code == 1 and "is the input file" in stderr.getvalue()
    assert source.read_text().strip() == request("a")


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("batchllm 0.1")


def test_a_model_that_cannot_load_stops_the_job_before_writing(tmp_path):
    source = write_lines(tmp_path / "in.jsonl", [request("a")])
    output = tmp_path / "out.jsonl"
    output.write_text("kept\n")

    def broken(_):
        raise RuntimeError("Torch not compiled with CUDA enabled")

    stderr = io.StringIO()
    code = run_batch(RunOptions(str(source), str(output), device="cuda"), io.StringIO(), stderr, llm_factory=broken)
    assert code == 1 and "cannot load the model" in stderr.getvalue() and "'cuda'" in stderr.getvalue()
    assert output.read_text() == "kept\n"
    assert main(["run-batch", "-i", str(source), "-o", str(output), "--model", str(tmp_path)]) == 1


def test_logprobs_without_alternatives(llm, tmp_path):
    lines = [request("chat", CHAT, logprobs=True, max_tokens=3), request("text", logprobs=0, max_tokens=3)]
    code, _, _, output = run(llm, tmp_path, lines)
    assert code == 0
    answers = {a["custom_id"]: a["response"]["body"]["choices"][0]["logprobs"] for a in read_answers(output)}
    assert all(t["top_logprobs"] == [] for t in answers["chat"]["content"]) and answers["chat"]["content"]
    assert all(top == {} for top in answers["text"]["top_logprobs"]) and answers["text"]["token_logprobs"]


def test_plan_predicts_the_prefill_the_engine_does_on_the_example(llm, tmp_path, capsys):
    assert main(["plan", "-i", str(EXAMPLE), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    code, stdout, _, _ = run(llm, tmp_path, EXAMPLE.read_text().splitlines())
    assert code == 0
    computed = int(re.search(r"; ([\d,]+) computed", stdout).group(1).replace(",", ""))
    saved = int(re.search(r"prefill tokens saved: ([\d,]+)", stdout).group(1).replace(",", ""))
    assert computed == plan["prefill_tokens"] and saved == plan["shared_tokens"]


def test_engine_flags_reach_the_llm(tmp_path, monkeypatch):
    """--max-num-batched-tokens, --max-num-seqs, --cuda-graphs and --overlap go to LLM(...)."""
    from batchllm_core import cli, run_batch as run_batch_module

    seen = {}
    monkeypatch.setattr(run_batch_module, "run_batch", lambda options: seen.update(options=options) or 0)
    code = cli.main(["run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                     "--max-num-batched-tokens", "512", "--max-num-seqs", "8", "--overlap"])
    assert code == 0
    options = seen["options"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny model's "noise" warning comes once per process
        llm = run_batch_module._load_llm(options)
    assert (llm.max_num_batched_tokens, llm.max_num_seqs, llm.overlap) == (512, 8, True)
    options.cuda_graphs = True
    with pytest.warns(UserWarning, match="cuda_graphs"):  # no CUDA here: warned, eager
        run_batch_module._load_llm(options)
    # Unset, both are the engine's default (on for a CUDA device); --no-overlap turns it off.
    cli.main(["run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl")])
    assert (seen["options"].cuda_graphs, seen["options"].overlap) == (None, None)
    cli.main(["run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), "--no-overlap",
              "--no-cuda-graphs"])
    assert (seen["options"].cuda_graphs, seen["options"].overlap) == (False, False)
