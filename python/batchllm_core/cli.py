"""The ``batchllm`` command line: ``run-batch`` (run an OpenAI-batch JSONL job) and ``plan`` (explain one).

Examples
--------
::

    batchllm run-batch -i requests.jsonl -o results.jsonl [--model DIR] [--resume]
    batchllm plan -i requests.jsonl [--json]

Exit codes: 0 the job ran (lines that failed have ``error`` set in the output), 1 the job could not
run (unreadable input, unwritable output, bad model), 2 bad command line, 130 / 143 interrupted by
Ctrl-C / SIGTERM after flushing what was done.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import List, Optional

__all__ = ["main", "parse_size", "build_parser"]

_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
               "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12,
               "tib": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``2GiB``, ``512MB``, ``1.5g`` or ``1048576``.

    KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB and the bare K/M/G/T powers of 1024.

    >>> parse_size("2GiB"), parse_size("512MB"), parse_size("64k")
    (2147483648, 512000000, 65536)
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 2GiB, 512MB, 1073741824)")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _version() -> str:
    from . import __version__, build_info

    return f"{__version__} ({'CUDA ' + build_info()['cuda_version'] if build_info()['cuda'] else 'CPU only'})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchllm",
        description="Offline LLM batch jobs that plan the whole job and compute every shared prefix once.")
    parser.add_argument("--version", action="version", version=f"batchllm {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run-batch", help="run an OpenAI-batch JSONL file, writing vLLM run-batch answers",
                              description="Run every request of an OpenAI-batch JSONL file. Answers are "
                              "appended durably as requests finish; --resume continues an interrupted job.")
    run.add_argument("-i", "--input", required=True, metavar="INPUT.jsonl", help="OpenAI batch input file")
    run.add_argument("-o", "--output", required=True, metavar="OUTPUT.jsonl", help="answers (one line per input line)")
    run.add_argument("--model", default=None, metavar="DIR",
                     help="local Hugging Face model directory (default: the embedded tiny model, noise text)")
    run.add_argument("--resume", action="store_true",
                     help="keep OUTPUT's answers and run only the requests it does not answer yet")
    run.add_argument("--policy", default="batchllm", choices=["batchllm", "fcfs-lru", "no-share"],
                     help="scheduling policy (default: batchllm, global prefix groups)")
    run.add_argument("--kv-cache-memory", type=parse_size, default=None, metavar="SIZE",
                     help="KV cache pool size, e.g. 2GiB or 512MB (default: a share of free memory)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    run.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
    run.add_argument("--seed", type=int, default=0, help="seed of unseeded requests' sampling (default: 0)")
    run.add_argument("--max-num-batched-tokens", type=_positive_int, default=2048, metavar="N",
                     help="token rows per step (default: 2048)")
    run.add_argument("--max-num-seqs", type=_positive_int, default=1024, metavar="N",
                     help="sequences running at once at most (default: 1024)")
    run.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                     help="replay CUDA graphs for decode-only steps (default: on for a CUDA device)")
    run.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                     help="plan step i+1 while the device runs step i, same answers (default: on for a CUDA device)")
    run.add_argument("--progress-interval", type=float, default=5.0, metavar="SECONDS",
                     help="seconds between progress lines when not on a terminal (default: 5)")

    plan = commands.add_parser("plan", help="explain a job's prefix sharing without running a model",
                               description="Tokenize a batch file, build its prefix tree and print the "
                               "prefix groups, tokens to prefill after sharing and the predicted speedup.")
    plan.add_argument("-i", "--input", required=True, metavar="INPUT.jsonl", help="OpenAI batch input file")
    plan.add_argument("--model", default=None, metavar="DIR",
                      help="model directory whose tokenizer to use (default: the tiny model's byte tokenizer)")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of a report")
    plan.add_argument("--block-size", type=_positive_int, default=16, help="KV block size in tokens (default: 16)")
    plan.add_argument("--max-groups", type=_positive_int, default=20,
                      help="groups listed in the report (default: 20; --json lists all)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``batchllm`` console script and ``python -m batchllm_core``."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run-batch":
            return _run_batch(args)
        return _plan(args)
    except KeyboardInterrupt:  # before the job's own handling is in place (e.g. while loading the model)
        sys.stderr.write("batchllm: interrupted\n")
        return 130


def _run_batch(args: argparse.Namespace) -> int:
    from .run_batch import RunOptions, run_batch

    options = RunOptions(input_path=args.input, output_path=args.output, model=args.model, resume=args.resume,
                         policy=args.policy, kv_cache_memory=args.kv_cache_memory, device=args.device,
                         dtype=args.dtype, seed=args.seed, max_num_batched_tokens=args.max_num_batched_tokens,
                         max_num_seqs=args.max_num_seqs, cuda_graphs=args.cuda_graphs, overlap=args.overlap,
                         progress_interval_s=args.progress_interval)
    try:
        return run_batch(options)
    except (OSError, ValueError) as exc:  # the model directory or device cannot be used
        sys.stderr.write(f"batchllm run-batch: error: {exc}\n")
        return 1


def _plan(args: argparse.Namespace) -> int:
    from .job_plan import run_plan

    try:
        return run_plan(args.input, model=args.model, block_size=args.block_size, as_json=args.json,
                        max_groups=args.max_groups)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"batchllm plan: error: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
