"""Where an end-to-end job's time goes: per-step host and device time, the device's kernels, the
host's Python functions.

bench/e2e.py says how far a job is from its floor; this says why. One workload (W1 by default) runs
three times on one LLM after a warm-up:

1. **steps**: every phase of the engine loop timed on the host (schedule, execute, sample, commit)
   and on the device (CUDA events around execute and sample), per step kind (prefill / mixed /
   decode, graph replay or eager). Device busy over wall time says whether the GPU or the host sets
   the pace.
2. **kernels**: torch.profiler over the job; the device kernels by total time and the host ops by
   self time.
3. **python**: cProfile over the job; the functions by own time.

Prints tables and one JSON line per run (``--json-out`` appends it).

    PYTHONPATH=python python bench/profile_e2e.py --workload W1 --scale 0.25 --model llama-1b
    PYTHONPATH=python .venv/bin/python bench/profile_e2e.py --model tiny --device cpu --parts steps,python
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import commit, device_name, gpu_state  # noqa: E402
from workloads import WORKLOAD_IDS, make_workload  # noqa: E402


class _Timed:
    """Wraps a callable: host seconds per call and, on CUDA, events around it."""

    def __init__(self, fn, cuda: bool, log: list, kind_of=None):
        self.fn, self.cuda, self.log, self.kind_of = fn, cuda, log, kind_of

    def __call__(self, *args, **kwargs):
        start_event = end_event = None
        if self.cuda:
            start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start_event.record()
        t0 = time.perf_counter()
        result = self.fn(*args, **kwargs)
        host = time.perf_counter() - t0
        if self.cuda:
            end_event.record()
        self.log.append({"kind": self.kind_of(*args) if self.kind_of else None, "host_s": host,
                         "events": (start_event, end_event)})
        return result


class _SchedulerProxy:
    """The native scheduler with next_step timed (pybind objects take no new attributes)."""

    def __init__(self, scheduler, log: list):
        self._scheduler, self._log = scheduler, log

    def next_step(self, *args, **kwargs):
        t0 = time.perf_counter()
        plan = self._scheduler.next_step(*args, **kwargs)
        self._log.append({"host_s": time.perf_counter() - t0})
        return plan

    def __getattr__(self, name):
        return getattr(self._scheduler, name)


def step_kind(llm):
    def kind(plan, *rest):
        rows = len(plan.input_ids)
        decode = int(plan.num_decode_seqs)
        if rows == decode:
            return "decode"
        return "prefill" if decode == 0 else "mixed"
    return kind


def profile_steps(llm, prompts, params) -> dict:
    """Run the job once with every engine phase timed; a summary dict."""
    cuda = llm.device.type == "cuda"
    logs = {"execute": [], "sample": [], "schedule": [], "commit": []}
    runner, sampler = llm.runner, llm.sampler
    graphs = getattr(runner, "decode_graphs", None)
    replays_before = [graphs.replays if graphs else 0]
    replay_steps = []

    execute_timed = _Timed(runner.execute, cuda, logs["execute"], step_kind(llm))

    mixed = getattr(runner, "mixed_graphs", None)  # piecewise graphs of prefill and mixed steps

    def counts():
        return tuple(getattr(g, name, 0) for g in (graphs, mixed) for name in ("replays", "captures"))

    def execute(plan, *rest):
        before = counts()
        out = execute_timed(plan, *rest)
        grown = [a > b for a, b in zip(counts(), before)]
        replay_steps.append("+graph" if grown[0] else "+capture" if grown[1] else
                            "+pieces" if grown[2] else "+capture" if grown[3] else "")
        return out

    runner.execute = execute
    sampler.sample_async = _Timed(sampler.sample_async, cuda, logs["sample"])
    commit_fn = llm._commit

    def commit_timed(*args, **kwargs):
        t0 = time.perf_counter()
        yield from commit_fn(*args, **kwargs)
        logs["commit"].append({"host_s": time.perf_counter() - t0})

    llm._commit = commit_timed
    new_scheduler = llm._new_scheduler
    llm._new_scheduler = lambda: _SchedulerProxy(new_scheduler(), logs["schedule"])
    try:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    finally:
        for name in ("execute", "_commit", "_new_scheduler"):
            llm.__dict__.pop(name, None)
        runner.__dict__.pop("execute", None)
        sampler.__dict__.pop("sample_async", None)
    del replays_before

    def device_s(entry):
        a, b = entry["events"]
        return a.elapsed_time(b) / 1e3 if a is not None else 0.0

    by_kind = defaultdict(lambda: {"steps": 0, "execute_host_s": 0.0, "execute_device_s": 0.0,
                                   "sample_host_s": 0.0, "sample_device_s": 0.0})
    for entry, sample, replayed in zip(logs["execute"], logs["sample"], replay_steps):
        key = entry["kind"] + replayed
        row = by_kind[key]
        row["steps"] += 1
        row["execute_host_s"] += entry["host_s"]
        row["execute_device_s"] += device_s(entry)
        row["sample_host_s"] += sample["host_s"]
        row["sample_device_s"] += device_s(sample)
    totals = {
        "wall_s": wall,
        "schedule_host_s": sum(e["host_s"] for e in logs["schedule"]),
        "commit_host_s": sum(e["host_s"] for e in logs["commit"]),
        "execute_host_s": sum(e["host_s"] for e in logs["execute"]),
        "sample_host_s": sum(e["host_s"] for e in logs["sample"]),
        "execute_device_s": sum(device_s(e) for e in logs["execute"]),
        "sample_device_s": sum(device_s(e) for e in logs["sample"]),
    }
    totals["device_busy_fraction"] = (totals["execute_device_s"] + totals["sample_device_s"]) / wall
    return {"totals": totals, "by_kind": dict(by_kind)}


def print_steps(summary: dict) -> None:
    t = summary["totals"]
    print(f"wall {t['wall_s']:.3f} s; device busy {t['device_busy_fraction']:.0%} "
          f"(execute {t['execute_device_s']:.3f} s + sample {t['sample_device_s']:.3f} s on the device); host: "
          f"schedule {t['schedule_host_s']:.3f} s, execute {t['execute_host_s']:.3f} s, "
          f"sample {t['sample_host_s']:.3f} s, commit (waits for the samples) {t['commit_host_s']:.3f} s")
    print(f"{'step kind':>16} {'steps':>6} | {'exec host':>10} {'exec dev':>10} {'ms/step dev':>11} | "
          f"{'smpl host':>10} {'smpl dev':>10}   (s)")
    for kind, r in sorted(summary["by_kind"].items()):
        print(f"{kind:>16} {r['steps']:>6} | {r['execute_host_s']:>10.3f} {r['execute_device_s']:>10.3f} "
              f"{1e3 * r['execute_device_s'] / max(r['steps'], 1):>11.3f} | "
              f"{r['sample_host_s']:>10.3f} {r['sample_device_s']:>10.3f}")


def profile_kernels(llm, prompts, params, rows: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if llm.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        llm.generate(prompts, params, use_tqdm=False)
        if llm.device.type == "cuda":
            torch.cuda.synchronize()
    averages = prof.key_averages()
    device_key = "device_time_total" if hasattr(averages[0], "device_time_total") else "cuda_time_total"
    if llm.device.type == "cuda":
        print(averages.table(sort_by=device_key, row_limit=rows, max_name_column_width=70))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70))
    top = sorted(averages, key=lambda e: getattr(e, device_key, 0), reverse=True)[:rows]
    return {"device_top": [{"name": e.key, "calls": e.count, "device_us": getattr(e, device_key, 0)} for e in top]}


def profile_python(llm, prompts, params, rows: int) -> dict:
    profiler = cProfile.Profile()
    profiler.enable()
    llm.generate(prompts, params, use_tqdm=False)
    if llm.device.type == "cuda":
        torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).sort_stats("tottime")
    stats.print_stats(rows)
    print(text.getvalue())
    top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:rows]
    return {"python_top": [{"function": f"{os.path.basename(k[0])}:{k[1]}({k[2]})", "calls": v[1],
                            "own_s": round(v[2], 4), "cumulative_s": round(v[3], 4)} for k, v in top]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="W1", choices=WORKLOAD_IDS)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--policy", default="batchllm")
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="default: the engine's (on for a CUDA device)")
    parser.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                        help="default: the engine's (on for a CUDA device)")
    parser.add_argument("--parts", default="steps,kernels,python", help="comma list of steps, kernels, python")
    parser.add_argument("--rows", type=int, default=25, help="rows of each profiler table")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)

    from batchllm_core import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, device=args.device, policy=args.policy,
              max_num_batched_tokens=args.max_num_batched_tokens,
              cuda_graphs=args.cuda_graphs, overlap=args.overlap)
    workload = make_workload(args.workload, vocab=llm.config.vocab_size, seed=0, scale=args.scale)
    prompts = [{"prompt_token_ids": r.prompt_token_ids.tolist()} for r in workload.requests]
    params = [SamplingParams(n=r.n, temperature=r.temperature, max_tokens=args.max_tokens or r.max_tokens,
                             ignore_eos=True) for r in workload.requests]
    llm.generate(prompts[:2], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)  # warm-up
    result = {"bench": "profile_e2e", "workload": args.workload, "model": args.model, "policy": args.policy,
              "scale": args.scale, "cuda_graphs": hasattr(llm.runner, "decode_graphs"), "overlap": bool(llm.overlap),
              "device_name": device_name(llm.device), "commit": commit(),
              "kernel_env": {k: v for k, v in os.environ.items() if k.startswith("BATCHLLM_")}}
    parts = args.parts.split(",")
    print(f"== {args.workload} x{args.scale} {args.model} {args.policy} graphs={result['cuda_graphs']} "
          f"overlap={result['overlap']} on {result['device_name']}", flush=True)
    result["gpu_before"] = gpu_state(llm.device)  # clocks, temperature, power (None off CUDA)
    if "steps" in parts:
        result["steps"] = profile_steps(llm, prompts, params)
        print_steps(result["steps"])
        result["steps_again"] = profile_steps(llm, prompts, params)["totals"]  # graphs captured: steady state
        print(f"again: wall {result['steps_again']['wall_s']:.3f} s, "
              f"device busy {result['steps_again']['device_busy_fraction']:.0%}", flush=True)
    if "kernels" in parts:
        result.update(profile_kernels(llm, prompts, params, args.rows))
    if "python" in parts:
        result.update(profile_python(llm, prompts, params, args.rows))
    result["gpu_after"] = gpu_state(llm.device)
    if result["gpu_before"] is not None:
        print(f"card before / after: {result['gpu_before']} / {result['gpu_after']}", flush=True)
    line = json.dumps(result)
    print("JSON " + line)
    if args.json_out:
        with open(args.json_out, "a") as out:
            out.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
