"""End-to-end benchmark: a whole workload of WORKLOADS.md through the public ``LLM`` API.

Random weights of a named shape (``tiny``, ``llama-1b``, ``qwen2.5-7b-shape``; the loader seeds
them) or a local checkpoint directory; the workload's prompts from bench/workloads.py as token ids;
every output forced to full length (``ignore_eos``). Per policy it reports seconds, output and total
tokens/s, prefill tokens computed, peak KV, and time over the floor of DESIGN.md's performance model
(bench/e2e_floor.py; ceilings default to the H100's measured ones). ``--hf`` adds transformers
``generate`` on the same weights and prompts in batches of 64 sequences. Prints a table, then one JSON
line per run (also appended to ``--json-out``).

    PYTHONPATH=python .venv/bin/python bench/e2e.py --workload W1 --model tiny --device cpu --policy all
    PYTHONPATH=python python bench/e2e.py --workload W1,W2,W5 --model llama-1b --device cuda --hf --hf-batches 2
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_floor import H100_BYTES_PER_S, H100_FLOPS, Ceilings, ModelCost, StepFloor, job_floor  # noqa: E402
from workloads import WORKLOAD_IDS, make_workload  # noqa: E402

POLICIES = ["batchllm", "fcfs-lru", "no-share"]


def main(argv=None) -> list:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    workloads = WORKLOAD_IDS if args.workload == "all" else args.workload.split(",")
    policies = {"all": POLICIES, "none": []}.get(args.policy, args.policy.split(","))
    ceilings = Ceilings(args.flops, args.bytes_per_s)
    results = []
    _print_header()
    engines = 0
    for workload_id in workloads:
        for policy in policies:
            engines += 1
            results.append(run_engine(workload_id, policy, args, ceilings, position=engines))
            _print_row(results[-1])
        if args.hf:
            results.append(run_hf(workload_id, args, ceilings))
            _print_row(results[-1])
    for result in results:
        line = json.dumps(result)
        print(line)
        if args.json_out:
            with open(args.json_out, "a") as out:
                out.write(line + "\n")
    return results


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="W1", help=f"{', '.join(WORKLOAD_IDS)}, a comma list, or 'all'")
    parser.add_argument("--model", default="tiny", help="tiny | llama-1b | qwen2.5-7b-shape | a checkpoint directory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--policy", default="batchllm",
                        help=f"{', '.join(POLICIES)}, a comma list, 'all', or 'none' (with --hf: the baseline only)")
    parser.add_argument("--hf", action="store_true", help="also run transformers generate (batches of 64)")
    parser.add_argument("--hf-batches", type=int, default=None,
                        help="time only the first N transformers batches (throughput from those)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the workload's groups / prompts")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="override every request's output length (quick smoke runs; recorded in the JSON)")
    parser.add_argument("--temperature", type=float, default=None, help="every request's (default: the workload's)")
    parser.add_argument("--top-p", type=float, default=1.0, help="every request's top_p (1: none)")
    parser.add_argument("--order", choices=["shuffled", "grouped"], default="shuffled")
    parser.add_argument("--seed", type=int, default=0, help="workload token ids (weights: the loader's seed)")
    parser.add_argument("--kv-cache-memory", type=int, default=None, help="KV pool bytes (default: the engine's)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--attention", choices=["cascade", "paged"], default="cascade",
                        help="decode attention: shared-prefix levels (cascade) or paged per sequence (A/B)")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="replay CUDA graphs for decode-only steps (batchllm_core.cuda_graphs; default: the "
                             "engine's, on for a CUDA device)")
    parser.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                        help="plan and queue step i+1 before step i's samples reach the host (default: the "
                             "engine's, on for a CUDA device)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy host)")
    parser.add_argument("--flops", type=float, default=H100_FLOPS, help="matmul ceiling, FLOP/s (H100 measured)")
    parser.add_argument("--bytes-per-s", type=float, default=H100_BYTES_PER_S,
                        help="device memory ceiling, bytes/s (H100 measured copy)")
    parser.add_argument("--no-warmup", action="store_true", help="time the first run cold")
    parser.add_argument("--repeat", type=int, default=1,
                        help="time the job this many times on the same engine (seconds: the first; "
                             "seconds_runs, seconds_best: all). A policy may be listed twice: "
                             "--policy batchllm,fcfs-lru,batchllm shows an order effect")
    parser.add_argument("--json-out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    for name in (args.workload.split(",") if args.workload != "all" else []):
        if name not in WORKLOAD_IDS:
            parser.error(f"--workload: {name!r} is not one of {WORKLOAD_IDS}")
    for name in (args.policy.split(",") if args.policy not in ("all", "none") else []):
        if name not in POLICIES:
            parser.error(f"--policy: {name!r} is not one of {POLICIES}")
    return args


# ---------------------------------------------------------------------------------------------------
def run_engine(workload_id: str, policy: str, args, ceilings: Ceilings, position: int = 1) -> dict:
    """One workload under one policy through ``LLM.generate``; the result row (a JSON-able dict).
    ``seconds`` is the first timed run (the job as a user runs it, graphs captured on the way);
    ``--repeat`` adds runs of the same job on the same engine (``seconds_runs``, ``seconds_best``)."""
    from batchllm_core import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, device=args.device, block_size=args.block_size,
              kv_cache_memory=args.kv_cache_memory, policy=policy, seed=args.seed,
              max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
              cuda_graphs=None if args.cuda_graphs is None else bool(args.cuda_graphs) and args.device != "cpu",
              overlap=args.overlap)
    workload = _workload(workload_id, llm.config.vocab_size, args)
    prompts = [{"prompt_token_ids": r.prompt_token_ids.tolist()} for r in workload.requests]
    params = [SamplingParams(n=r.n, temperature=r.temperature if args.temperature is None else args.temperature,
                             top_p=args.top_p, max_tokens=r.max_tokens, ignore_eos=True)
              for r in workload.requests]
    llm.runner.use_cascade = args.attention == "cascade"
    cost = ModelCost.of(llm.config, torch.empty((), dtype=llm.dtype).element_size())
    step_floor = StepFloor(cost, ceilings)
    _record_steps(llm, step_floor)
    if not args.no_warmup:  # kernels loaded, allocator warm: not part of the job's time
        llm.generate(_warmup_prompts(workload, args.max_num_batched_tokens),
                     SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
        step_floor.reset()
    runs = []
    gpu_before = gpu_state(llm.device)
    counters_before = _graph_counters(llm)  # the warm-up's captures are not the job's
    for repeat in range(args.repeat):
        if repeat:
            step_floor.reset()  # every run prices the same steps: the last run's floor stays
        _synchronize(llm.device)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        _synchronize(llm.device)
        runs.append(time.perf_counter() - start)
        if repeat == 0:  # the row's counters are the first run's (a graph runner's counts add up)
            stats = dict(llm.last_stats)
            graphs = _counters_since(_graph_counters(llm), counters_before)
    seconds = runs[0]
    generated = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    failed = [o.error for o in outputs if o.error]
    if failed:
        raise RuntimeError(f"{workload_id} {policy}: {len(failed)} requests failed, first: {failed[0]}")
    if generated != workload.output_tokens:
        raise RuntimeError(f"{workload_id} {policy}: generated {generated} tokens, expected {workload.output_tokens}")
    bytes_per_block = llm.runner.kv_bytes_per_block(llm.config, llm.block_size, llm.dtype)
    result = _common(workload, args, llm.device, llm.dtype, policy, seconds, cost, ceilings)
    result.update(cuda_graphs=hasattr(llm.runner, "decode_graphs"), overlap=bool(llm.overlap))
    result.update(
        prefill_tokens=int(stats["prefill_tokens"]), decode_tokens=int(stats["decode_tokens"]),
        steps=int(stats["steps"]), preemptions=int(stats["preemptions"]),
        peak_kv_blocks=int(stats["peak_kv_blocks"]), peak_kv_bytes=int(stats["peak_kv_blocks"]) * bytes_per_block,
        kv_capacity_blocks=int(llm.num_kv_blocks), step_floor_s=_sig(step_floor.seconds),
        **graphs,
        time_over_step_floor=round(seconds / step_floor.seconds, 3) if step_floor.seconds > 0 else None)
    # Repeats on the same engine: its graphs captured and every kernel loaded, what a long job's
    # later hours run at. `position` is this engine's place among the process's engines (an order
    # effect between policies shows as a difference that follows the position, not the policy).
    result.update(position=position, seconds_runs=[round(r, 4) for r in runs], seconds_best=round(min(runs), 4),
                  output_tokens_per_s_best=round(result["output_tokens"] / min(runs), 1),
                  gpu_before=gpu_before, gpu_after=gpu_state(llm.device))
    del llm, outputs
    _release_memory()
    return result


def _workload(workload_id: str, vocab_size: int, args):
    workload = make_workload(workload_id, vocab=vocab_size, seed=args.seed, scale=args.scale, order=args.order)
    if args.max_tokens is not None:
        for request in workload.requests:
            request.max_tokens = args.max_tokens
    return workload


def _graph_counters(llm) -> dict:
    """The CUDA-graph runner's counters since the engine started (None where the runner has no
    graphs): a row reports their growth over its first timed run (``_counters_since``)."""
    graphs = getattr(llm.runner, "decode_graphs", None)
    mixed = getattr(llm.runner, "mixed_graphs", None)  # piecewise graphs of prefill and mixed steps
    return {"graph_steps": getattr(graphs, "steps", None), "graph_replays": getattr(graphs, "replays", None),
            "graph_captures": getattr(graphs, "captures", None),
            "graph_capture_s": _sig(getattr(graphs, "capture_s", 0.0)),
            "graph_steps_padded_to_larger": getattr(graphs, "dominated", None),
            "mixed_graph_steps": getattr(mixed, "steps", None), "mixed_graph_replays": getattr(mixed, "replays", None),
            "mixed_graph_captures": getattr(mixed, "captures", None),
            "mixed_graph_capture_s": _sig(getattr(mixed, "capture_s", 0.0))}


def _counters_since(after: dict, before: dict) -> dict:
    """The counters' growth from ``before`` to ``after`` (None stays None: a runner without graphs)."""
    return {name: None if value is None else _sig(value - before[name]) if isinstance(value, float)
            else value - before[name] for name, value in after.items()}


def _warmup_prompts(workload, token_budget: int) -> list:
    """The warm-up's prompts: the workload's first ones, enough for one full-budget prefill step (so
    that the first timed step does not meet the GEMM shape of a full step for the first time), at
    least 2 and at most 64."""
    chosen, tokens = [], 0
    for request in workload.requests[:64]:
        if len(chosen) >= 2 and tokens >= token_budget:
            break
        chosen.append({"prompt_token_ids": request.prompt_token_ids.tolist()})
        tokens += len(request.prompt_token_ids)
    return chosen


def _record_steps(llm, step_floor: StepFloor) -> None:
    """Price every plan the runner executes (the plan's views are read before it runs)."""
    execute = llm.runner.execute

    def priced_execute(plan, token_feed=None):
        step_floor.add(plan)
        return execute(plan, token_feed)

    llm.runner.execute = priced_execute


def run_hf(workload_id: str, args, ceilings: Ceilings) -> dict:
    """The same job through transformers ``generate`` in batches of 64 sequences."""
    from batchllm_core.loader import resolve_device, resolve_dtype
    from hf_baseline import HFRequest, load_hf_model, run_baseline

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    hf = load_hf_model(args.model, device, dtype)
    config = _model_config(args.model)
    workload = _workload(workload_id, hf.config.vocab_size, args)
    requests = [HFRequest(r.prompt_token_ids, r.max_tokens, r.n, r.temperature) for r in workload.requests]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = run_baseline(hf, requests, device, args.hf_batches)
    cost = ModelCost.of(config, torch.empty((), dtype=dtype).element_size())
    result = _common(workload, args, device, dtype, "hf", run["seconds"], cost, ceilings,
                     output_tokens=run["output_tokens"], prompt_tokens=run["prompt_tokens"],
                     fraction=run["batches_run"] / run["batches_total"])
    result.update(prefill_tokens=run["prefill_tokens"], hf_batches_run=run["batches_run"],
                  hf_batches_total=run["batches_total"],
                  seconds_extrapolated=round(run["seconds"] * run["batches_total"] / run["batches_run"], 4),
                  peak_memory_bytes=int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None)
    del hf
    _release_memory()
    return result


def _model_config(model_spec: str):
    from pathlib import Path

    from batchllm_core.models.config import ModelConfig

    if Path(model_spec).is_dir():
        return ModelConfig.from_hf_file(Path(model_spec) / "config.json")
    return ModelConfig.from_name(model_spec)


def _common(workload, args, device, dtype, policy, seconds, cost, ceilings, output_tokens=None,
            prompt_tokens=None, fraction=1.0) -> dict:
    """Fields every row has. ``fraction``: the share of the job that ran (the floor scales with it)."""
    output_tokens = workload.output_tokens if output_tokens is None else output_tokens
    prompt_tokens = workload.prompt_tokens if prompt_tokens is None else prompt_tokens
    floor = job_floor([r.prompt_token_ids for r in workload.requests], [r.max_tokens for r in workload.requests],
                      [r.n for r in workload.requests], cost, ceilings)
    floor_s = floor["floor_s"] * fraction
    return {
        "bench": "e2e", "workload": workload.id, "model": args.model, "policy": policy,
        "attention": args.attention if policy != "hf" else "sdpa",
        "cuda_graphs": bool(args.cuda_graphs) and policy != "hf",
        "overlap": bool(args.overlap) and policy != "hf",
        "device": str(device), "device_name": device_name(device), "dtype": str(dtype).replace("torch.", ""),
        "commit": commit(), "scale": args.scale, "max_tokens": args.max_tokens,
        "max_num_batched_tokens": args.max_num_batched_tokens if policy != "hf" else None,
        "temperature": args.temperature, "top_p": args.top_p,
        "requests": len(workload.requests),
        "sequences": workload.num_sequences, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "seconds": round(seconds, 4),
        "output_tokens_per_s": round(output_tokens / seconds, 1),
        "total_tokens_per_s": round((output_tokens + prompt_tokens) / seconds, 1),
        "floor_s": _sig(floor_s), "prefill_floor_s": _sig(floor["prefill_s"] * fraction),
        "decode_floor_s": _sig(floor["decode_s"] * fraction),
        "floor_output_tokens_per_s": round(output_tokens / floor_s, 1) if floor_s > 0 else None,
        "time_over_floor": round(seconds / floor_s, 3) if floor_s > 0 else None,
        "distinct_prompt_tokens": floor["distinct_prompt_tokens"],
        "flops": ceilings.flops, "bytes_per_s": ceilings.bytes_per_s,
        "kernel_env": kernel_env() if policy != "hf" else {},
    }


# The CUDA kernel variants chosen by the environment (bench/NOTES_attention.md): recorded with each
# run so that a figure says which kernels made it.
KERNEL_ENV_VARS = ("BATCHLLM_ATTENTION_TILES", "BATCHLLM_CASCADE_SUFFIX", "BATCHLLM_CASCADE_LAUNCH", "BATCHLLM_SAMPLER",
                   "BATCHLLM_LAYER_OPS", "BATCHLLM_MIXED_GRAPHS", "TORCH_BLAS_PREFER_CUBLASLT",
                   "BATCHLLM_DECODE_ROWS", "BATCHLLM_PDL")


def kernel_env() -> dict:
    return {name: os.environ[name] for name in KERNEL_ENV_VARS if os.environ.get(name)}


# ---------------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


_GPU_STATE_FIELDS = (("sm_mhz", "clocks.sm"), ("mem_mhz", "clocks.mem"), ("temperature_c", "temperature.gpu"),
                     ("power_w", "power.draw"), ("clock_event_reasons", "clocks_event_reasons.active"))


def gpu_state(device: torch.device) -> dict | None:
    """The card's SM and memory clocks (MHz), temperature (C), power (W) and active clock event
    (throttle) reasons (nvidia-smi's bit mask) now, or None off CUDA or without nvidia-smi: a run
    slower than its twin for no reason in its schedule may have run at lower clocks. A driver that
    does not know a field gets the query without it."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    # nvidia-smi numbers every card of the machine; torch only the visible ones (CUDA_VISIBLE_DEVICES):
    # the card's UUID names the same one for both.
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None) if torch.cuda.is_available() else None
    card = index if uuid is None else (str(uuid) if str(uuid).startswith("GPU-") else f"GPU-{uuid}")
    for fields in (_GPU_STATE_FIELDS, _GPU_STATE_FIELDS[:-1]):
        try:
            line = subprocess.run(["nvidia-smi", f"--id={card}", "--format=csv,noheader,nounits",
                                   "--query-gpu=" + ",".join(query for _, query in fields)],
                                  capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        values = [v.strip() for v in line.split(",")]
        if len(values) != len(fields):
            continue
        state = {}
        for (name, _), value in zip(fields, values):
            try:
                state[name] = value if name == "clock_event_reasons" else float(value)
            except ValueError:
                state[name] = value
        return state
    return None


@functools.lru_cache(maxsize=None)
def commit() -> str:
    """The checkout's commit (once per process; ``BATCHLLM_COMMIT`` overrides, e.g. with no git)."""
    if os.environ.get("BATCHLLM_COMMIT"):
        return os.environ["BATCHLLM_COMMIT"]
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _sig(value: float) -> float:
    """``value`` to 6 significant digits (floors of tiny models are microseconds)."""
    return float(f"{value:.6g}")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_COLUMNS = [("workload", "wl", 3), ("policy", "policy", 9), ("seconds", "seconds", 9),
            ("output_tokens_per_s", "out tok/s", 11), ("total_tokens_per_s", "total tok/s", 12),
            ("prefill_tokens", "prefill tok", 11), ("peak_kv_blocks", "peak KV blk", 11),
            ("floor_s", "floor s", 9), ("time_over_floor", "t/floor", 8)]


def _print_header() -> None:
    print(" ".join(f"{title:>{width}}" for _, title, width in _COLUMNS), flush=True)


def _print_row(result: dict) -> None:
    cells = []
    for key, _, width in _COLUMNS:
        value = result.get(key)
        text = "-" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))
        cells.append(f"{text:>{width}}")
    print(" ".join(cells), flush=True)


if __name__ == "__main__":
    main()
