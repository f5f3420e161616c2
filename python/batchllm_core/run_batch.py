"""``batchllm run-batch``: an OpenAI-batch JSONL job, run crash-safe and resumable.

The job, in order:

1. read and validate every line (``batch_requests``); with ``--resume`` drop the lines the output
   already answers (``batch_io.recover_output``, which also cuts a partial trailing line);
2. load the model only if something is left to run, then tokenize (``batch_prompts``);
3. write the error answers at once, then stream the engine's completions
   (``LLM.generate_stream``) to the output as they finish (``batch_writer.DurableWriter``);
4. print a summary. Ctrl-C / SIGTERM stop after the line being written is complete (exit 130 / 143).

Answers are written in completion order, not input order: ``custom_id`` is the key, as in OpenAI's
batch API, and writing as soon as a request finishes is what makes the job resumable.
"""
from __future__ import annotations

import os
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, TextIO

from .batch_io import BatchFileError, check_output_path, read_input_lines, recover_output
from .batch_progress import JobCounters, ProgressReporter, format_summary
from .batch_prompts import TokenizedRequest, tokenize_requests
from .batch_requests import BatchRequest, LineError, parse_lines
from .batch_responses import error_answer, success_answer
from .batch_writer import DeferredSignals, DurableWriter

__all__ = ["RunOptions", "run_batch", "EXIT_OK", "EXIT_FAILURE", "EXIT_INTERRUPTED"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 128 + signal.SIGINT


class ModelLoadError(Exception):
    """The model cannot be loaded (directory, dtype, device): the job stops before writing anything."""


@dataclass
class RunOptions:
    """What ``batchllm run-batch`` was asked to do (see ``cli.py`` for the flags)."""

    input_path: str
    output_path: str
    model: Optional[str] = None
    resume: bool = False
    policy: str = "batchllm"
    kv_cache_memory: Optional[int] = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 1024
    cuda_graphs: Optional[bool] = None  # None: the engine's default (on for a CUDA device)
    overlap: Optional[bool] = None
    progress_interval_s: float = 5.0
    fsync_interval_s: float = 0.1


def _load_llm(options: RunOptions):
    from .engine import LLM  # torch and the model layer load only when something runs

    return LLM(model=options.model, dtype=options.dtype, device=options.device,
               kv_cache_memory=options.kv_cache_memory, policy=options.policy, seed=options.seed,
               max_num_batched_tokens=options.max_num_batched_tokens, max_num_seqs=options.max_num_seqs,
               cuda_graphs=options.cuda_graphs, overlap=options.overlap)


def run_batch(options: RunOptions, stdout: Optional[TextIO] = None, stderr: Optional[TextIO] = None,
              llm_factory: Callable[[RunOptions], Any] = _load_llm) -> int:
    """Run the job; returns the process exit code. Problems with single lines never stop the job.

    Progress goes to ``stderr``, the summary to ``stdout`` (default: the process's, looked up at call time).
    """
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    counters = JobCounters()
    job_started = time.monotonic()
    progress = ProgressReporter(counters, stderr, interval_s=options.progress_interval_s)
    try:
        items, counters.skipped = _read_job(options, progress)
        errors = [item for item in items if isinstance(item, LineError)]
        requests = [item for item in items if isinstance(item, BatchRequest)]
        counters.total = len(items)
        llm = None
        if requests:
            progress.stage(f"loading model {options.model or '(embedded tiny default)'} ...")
            llm = _load_quietly(llm_factory, options, progress)
            progress.kv_usage = getattr(llm, "kv_cache_usage", None)
    except (BatchFileError, ModelLoadError) as exc:
        stderr.write(f"batchllm run-batch: error: {exc}\n")
        return EXIT_FAILURE
    with DeferredSignals() as signals:
        writer = DurableWriter(options.output_path, append=options.resume,
                               fsync_interval_s=options.fsync_interval_s, signals=signals)
        exit_code = EXIT_OK
        try:
            _run(llm, options, requests, errors, writer, counters, progress)
        except KeyboardInterrupt:
            counters.interrupted, exit_code = True, EXIT_INTERRUPTED
        except SystemExit as exc:  # SIGTERM, raised by DeferredSignals
            counters.interrupted, exit_code = True, int(exc.code or EXIT_FAILURE)
        except Exception:  # the engine failed as a whole: keep what was written, say how to go on
            stderr.write("batchllm run-batch: error: the job stopped on an unexpected engine error:\n"
                         + traceback.format_exc())
            counters.interrupted, exit_code = True, EXIT_FAILURE
        finally:
            writer.close()
            progress.close()
        counters.seconds = progress.elapsed_s()
        counters.wall_seconds = time.monotonic() - job_started
    stdout.write(format_summary(counters, options.output_path) + "\n")
    stdout.flush()
    return exit_code


def _load_quietly(llm_factory, options: RunOptions, progress: ProgressReporter):
    """Load the model; its warnings (e.g. "the tiny model's text is noise") become plain stage lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            llm = llm_factory(options)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a bad directory, dtype or device: nothing has been written yet
            raise ModelLoadError(f"cannot load the model {options.model or '(embedded tiny default)'} "
                                 f"on device {options.device!r}: {exc}") from exc
    for warning in caught:
        progress.stage(f"warning: {warning.message}")
    return llm


def _read_job(options: RunOptions, progress: ProgressReporter):
    """Every input line to answer in this run, and how many an earlier run already answered."""
    lines = read_input_lines(options.input_path)
    check_output_path(options.output_path, options.input_path)
    items = list(parse_lines(lines))
    invalid = sum(isinstance(item, LineError) for item in items)
    progress.stage(f"read {len(items)} requests from {options.input_path} ({invalid} invalid)")
    skipped = 0
    if options.resume:
        recovered = recover_output(options.output_path)
        if recovered.truncated_bytes:
            progress.stage(f"cut a partial last line ({recovered.truncated_bytes} bytes) left by an interrupted run")
        remaining = [item for item in items if item.key not in recovered.keys]
        skipped = len(items) - len(remaining)
        progress.stage(f"resuming: {skipped} already answered in {options.output_path}, {len(remaining)} to go")
        items = remaining
    return items, skipped


def _run(llm, options: RunOptions, requests: List[BatchRequest], errors: List[LineError],
         writer: DurableWriter, counters: JobCounters, progress: ProgressReporter) -> None:
    for error in errors:
        _write_error(writer, counters, error)
    if not requests:
        return
    tokenizer = llm.get_tokenizer()
    started = time.perf_counter()
    tokenized, rejected = tokenize_requests(requests, tokenizer, llm.max_model_len, llm.config.vocab_size)
    progress.stage(f"tokenized {len(requests)} prompts in {time.perf_counter() - started:.2f} s: {len(tokenized)} fit "
                   f"the model ({sum(len(t.prompt_token_ids) for t in tokenized):,} tokens), {len(rejected)} rejected")
    for error in rejected:
        _write_error(writer, counters, error)
    runnable, params = _sampling_params(tokenized, writer, counters)
    if not runnable:
        return
    model_name = _model_name(options.model)
    decode_token = _token_decoder(tokenizer)
    progress.stage(f"planning and running {len(runnable)} requests (policy {options.policy})")
    progress.restart_clock()
    progress.start_ticker()
    prompts = [{"prompt_token_ids": t.prompt_token_ids, "prompt": t.prompt_text} for t in runnable]
    stream = llm.generate_stream(prompts, params, use_tqdm=False)
    try:
        for index, output in stream:
            request = runnable[index].request
            if output.error is not None:
                _write_error(writer, counters, LineError(request.line, request.custom_id, "engine_error",
                                                         output.error, status_code=500))
            else:
                writer.write(success_answer(request, output, decode_token, model_name))
                counters.ok += 1
                counters.prompt_tokens += len(output.prompt_token_ids)
                counters.cached_tokens += int(output.num_cached_tokens)
                counters.output_tokens += sum(len(c.token_ids) for c in output.outputs)
            progress.update()
    finally:
        stream.close()  # an interrupt leaves the engine's generator suspended; end it now
    stats = getattr(llm, "last_stats", None) or {}  # the engine's counters of the run that just completed
    if stats.get("prefill_tokens") is not None:
        counters.prefilled_tokens = int(stats["prefill_tokens"])
    if stats.get("peak_kv_blocks") is not None and getattr(llm, "num_kv_blocks", 0):
        counters.kv_peak_fraction = stats["peak_kv_blocks"] / llm.num_kv_blocks
    progress.update(force=True)


def _sampling_params(tokenized: List[TokenizedRequest], writer: DurableWriter, counters: JobCounters):
    from .sampling_params import SamplingParams

    runnable, params = [], []
    for item in tokenized:
        try:
            params.append(SamplingParams(**item.request.sampling))
        except ValueError as exc:  # the engine's own checks, beyond what batch_requests validates
            _write_error(writer, counters, LineError(item.request.line, item.request.custom_id, "invalid_value", str(exc)))
            continue
        runnable.append(item)
    return runnable, params


def _write_error(writer: DurableWriter, counters: JobCounters, error: LineError) -> None:
    writer.write(error_answer(error))
    counters.failed += 1


def _model_name(model: Optional[str]) -> str:
    if model is None:
        return "batchllm-tiny"
    return os.path.basename(os.path.normpath(model)) or str(model)


def _token_decoder(tokenizer) -> Callable[[int], str]:
    """Each token id's own text for logprobs answers, decoded once per id (a top-20 logprobs answer
    names 21 tokens per generated token: ~2 us of decode each, most of them ids seen before)."""
    if tokenizer is None:
        return lambda token_id: f"<{token_id}>"
    texts: dict = {}

    def decode(token_id: int) -> str:
        text = texts.get(token_id)
        if text is None:
            text = texts[token_id] = tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    return decode
