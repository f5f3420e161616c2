"""R2: scheduler overhead per step (next_step + commit) in steady decode.

1,024 running sequences in 64 groups of 16 (shared prefix 1024 tokens, 64 unique, long outputs):
the job is warmed up until every sequence decodes, then `--steps` steps of next_step + commit are
timed with a preallocated token array (no Python in the loop but the two calls); wall time (best of
--repeats) and thread CPU time (meaningful on a loaded machine) are reported. Prints a table, then
one JSON line: {"bench": "R2", "us_per_step", ...}. Target: < 50 us per step.

    PYTHONPATH=python .venv/bin/python bench/bench_step.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # idle BLAS threads spinning would be timed too
import numpy as np  # noqa: E402

from batchllm_core import _C  # noqa: E402


def build_job(groups: int, per_group: int, prefix: int, suffix: int, max_tokens: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(groups):
        shared = rng.integers(10, 32000, prefix, dtype=np.int64).astype(np.int32)
        prompts += [np.concatenate([shared, rng.integers(10, 32000, suffix).astype(np.int32)]) for _ in range(per_group)]
    n = len(prompts)
    return dict(tokens=np.concatenate(prompts), offsets=np.concatenate([[0], np.cumsum([len(p) for p in prompts])]).astype(np.int64),
                max_tokens=np.full(n, max_tokens, np.int32), num_samples=np.ones(n, np.int32),
                min_tokens=np.zeros(n, np.int32), ignore_eos=np.ones(n, bool), stop_token_ids=np.zeros(0, np.int32),
                stop_token_offsets=np.zeros(n + 1, np.int64), eos_token_ids=[2])


def run(policy: str, args) -> dict:
    seqs = args.groups * args.per_group
    blocks_per_seq = -(-(args.prefix + args.suffix + args.max_tokens) // args.block_size)
    sched = _C.Scheduler(num_blocks=seqs * blocks_per_seq + 1024, block_size=args.block_size, token_budget=2048,
                         policy=policy, max_num_seqs=seqs)
    sched.add_requests(**build_job(args.groups, args.per_group, args.prefix, args.suffix, args.max_tokens))
    tokens = np.full(seqs, 11, np.int32)
    warm = 0
    while True:  # warm up until every sequence decodes
        plan = sched.next_step()
        steady = plan.num_decode_seqs == seqs and plan.num_tokens == seqs
        sched.commit(tokens[: plan.num_sample_rows])
        warm += 1
        if steady:
            break
    for _ in range(args.warmup):
        sched.next_step()
        sched.commit(tokens)
    next_step, commit = sched.next_step, sched.commit
    best, best_cpu = float("inf"), float("inf")
    for _ in range(args.repeats):
        start, start_cpu = time.perf_counter(), time.thread_time()
        for _ in range(args.steps):
            next_step()
            commit(tokens)
        best = min(best, (time.perf_counter() - start) / args.steps)
        best_cpu = min(best_cpu, (time.thread_time() - start_cpu) / args.steps)
    plan = sched.next_step()
    result = {"policy": policy, "seqs": seqs, "groups": args.groups, "us_per_step": round(best * 1e6, 2),
              "cpu_us_per_step": round(best_cpu * 1e6, 2),
              "levels": plan.num_prefixes, "block_table_width": plan.max_blocks, "warmup_steps": warm}
    sched.commit(tokens)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--per-group", type=int, default=16)
    parser.add_argument("--prefix", type=int, default=1024)
    parser.add_argument("--suffix", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--policies", default="batchllm,fcfs-lru")
    args = parser.parse_args()
    results = [run(p, args) for p in args.policies.split(",")]
    print(f"{'policy':9} {'seqs':>5} {'groups':>6} {'levels':>6} {'table w':>7} {'us/step':>8} {'cpu us':>8}")
    for r in results:
        print(f"{r['policy']:9} {r['seqs']:5d} {r['groups']:6d} {r['levels']:6d} {r['block_table_width']:7d} "
              f"{r['us_per_step']:8.2f} {r['cpu_us_per_step']:8.2f}")
    main_result = results[0]
    print(json.dumps({"bench": "R2", "us_per_step": main_result["us_per_step"],
                      "cpu_us_per_step": main_result["cpu_us_per_step"], "policy": main_result["policy"],
                      "seqs": main_result["seqs"], "groups": main_result["groups"], "target_us": 50,
                      "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                      "all": results}))


if __name__ == "__main__":
    main()
