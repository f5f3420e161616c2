"""R3: whole-job scheduler simulation with no model, a roofline cost model per step instead.

Runs the real native scheduler (batchllm_core._C.Scheduler) over the workloads W1-W6 for every
policy at a given KV capacity. "Sampling" feeds dummy token ids (distinct per sequence and position,
so no policy gets accidental sharing of generated blocks) with ignore_eos, so every sequence runs to
max_tokens. Each step is priced by the performance model of DESIGN.md:

    compute_s = (2 * P * T + prefill attention FLOPs) / flops
    memory_s  = (weight bytes + KV bytes read by decode attention) / hbm_bytes_per_s
    step_s    = max(compute_s, memory_s)

T is the step's token rows; decode attention reads each shared prefix once per step under
batchllm (its cascade levels) and each sequence's whole context under fcfs-lru / no-share.
Prefill attention FLOPs are 4 * layers * heads * head_dim * (sum over prefill rows of the keys they
attend to). Bandwidth: 2.9e12 B/s is the H100's measured device-copy rate counting bytes read plus
written, i.e. the memory system's sustained traffic; decode attention and weight reads are pure
reads, so that figure is used as the read bandwidth (not halved).

Prints a table, then one JSON line per run, then one summary JSON line (fcfs-lru / batchllm ratios).

    PYTHONPATH=python .venv/bin/python bench/simulate.py --kv-fraction 0.25
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import WORKLOAD_IDS, make_workload  # noqa: E402

from batchllm_core import _C  # noqa: E402

MODELS = {  # WORKLOADS.md model shapes
    "llama-1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, intermediate=8192, vocab=32000),
    "qwen2.5-7b-shape": dict(hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, intermediate=18944,
                             vocab=152064),
}
POLICIES = ["batchllm", "fcfs-lru", "no-share"]


@dataclass
class CostModel:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    flops: float = 746e12
    hbm_bytes_per_s: float = 2.9e12
    dtype_bytes: int = 2

    @property
    def params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate + 2 * h
        return self.layers * per_layer + 2 * self.vocab * h + h  # untied embedding and lm head

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    def step_seconds(self, tokens: int, attended_keys: int, decode_kv_tokens: int) -> float:
        compute = (2.0 * self.params * tokens
                   + 4.0 * self.layers * self.heads * self.head_dim * attended_keys) / self.flops
        memory = (self.params * self.dtype_bytes + decode_kv_tokens * self.kv_bytes_per_token) / self.hbm_bytes_per_s
        return max(compute, memory)


def simulate(workload, policy: str, num_blocks: int, cost: CostModel, args) -> dict:
    sched = _C.Scheduler(num_blocks=num_blocks, block_size=args.block_size, token_budget=args.token_budget,
                         policy=policy, max_num_seqs=args.max_num_seqs, tile_tokens=args.tile_tokens,
                         admission_horizon=args.admission_horizon)
    sched.add_requests(**workload.arrays())
    predicted = 0.0
    start = time.perf_counter()
    while (plan := sched.next_step()) is not None:
        num_decode = plan.num_decode_seqs
        prefill_positions = plan.positions[num_decode:]
        attended = int(prefill_positions.sum()) + len(prefill_positions)
        predicted += cost.step_seconds(plan.num_tokens, attended, plan.decode_kv_tokens_read)
        # dummy tokens, distinct per (sequence, position): generated blocks never look shared by chance
        sampled = (10 + (plan.sample_seq_ids * 7919 + plan.sample_output_lens) % (cost.vocab - 10)).astype(np.int32)
        sched.commit(sampled)
        if args.check_integrity:
            problem = sched.check_integrity()
            if problem:
                raise RuntimeError(f"{workload.id} {policy}: {problem}")
    wall = time.perf_counter() - start
    failed = sched.pop_failed()
    finished = sched.pop_finished()
    stats = sched.stats()
    return {
        "workload": workload.id, "policy": policy, "kv_blocks": num_blocks,
        "prefill_tokens": stats["prefill_tokens"], "decode_tokens": stats["decode_tokens"],
        "peak_kv_blocks": stats["peak_kv_blocks"], "steps": stats["steps"], "preemptions": stats["preemptions"],
        "cached_prefix_tokens": stats["cached_prefix_tokens"], "predicted_s": round(predicted, 4),
        "finished_sequences": len(finished), "failed_requests": len(failed),
        "output_tokens_per_s": round(workload.output_tokens / predicted, 1) if predicted > 0 else 0.0,
        "sim_wall_s": round(wall, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(WORKLOAD_IDS))
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--kv-fraction", type=float, default=0.25,
                        help="KV capacity as a fraction of the no-sharing footprint of --kv-of")
    parser.add_argument("--kv-of", default="W1",
                        help="workload whose no-sharing footprint sets the capacity ('self': each its own)")
    parser.add_argument("--kv-blocks", type=int, default=None, help="absolute KV capacity (overrides --kv-fraction)")
    parser.add_argument("--scale", type=float, default=1.0, help="workload size multiplier (groups / prompts)")
    parser.add_argument("--order", choices=["shuffled", "grouped"], default="shuffled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--token-budget", type=int, default=2048)
    parser.add_argument("--tile-tokens", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--admission-horizon", type=int, default=128,
                        help="batchllm: steps of projected KV growth admission must fit (0: all)")
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-1b")
    for name in MODELS["llama-1b"]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"override the model's {name}")
    parser.add_argument("--flops", type=float, default=746e12, help="peak matmul FLOP/s (H100 bf16 measured)")
    parser.add_argument("--hbm-bytes-per-s", type=float, default=2.9e12, help="HBM read bandwidth (H100 measured)")
    parser.add_argument("--check-integrity", action="store_true", help="check the block pool after every step")
    args = parser.parse_args()

    shape = dict(MODELS[args.model])
    for name in shape:
        value = getattr(args, name)
        if value is not None:
            shape[name] = value
    cost = CostModel(**shape, flops=args.flops, hbm_bytes_per_s=args.hbm_bytes_per_s)
    results = []
    header = (f"{'wl':3} {'policy':9} {'kv blocks':>9} {'prefill tok':>11} {'decode tok':>10} {'peak kv':>8} "
              f"{'steps':>6} {'preempt':>7} {'pred s':>8} {'sim s':>6}")
    print(f"model {args.model}: {cost.params / 1e9:.2f}B params, {cost.kv_bytes_per_token} KV bytes/token; "
          f"{args.flops:.3g} FLOP/s, {args.hbm_bytes_per_s:.3g} B/s; order {args.order}")
    print(header)
    reference = None
    if args.kv_of != "self":
        reference = make_workload(args.kv_of, vocab=cost.vocab, seed=args.seed, scale=args.scale)
    for wid in args.workloads.split(","):
        workload = make_workload(wid, vocab=cost.vocab, seed=args.seed, scale=args.scale, order=args.order)
        footprint = (reference or workload).no_sharing_footprint_blocks(args.block_size)
        blocks = args.kv_blocks or max(1, int(args.kv_fraction * footprint))
        for policy in args.policies.split(","):
            r = simulate(workload, policy, blocks, cost, args)
            results.append(r)
            print(f"{wid:3} {policy:9} {blocks:9d} {r['prefill_tokens']:11d} {r['decode_tokens']:10d} "
                  f"{r['peak_kv_blocks']:8d} {r['steps']:6d} {r['preemptions']:7d} {r['predicted_s']:8.3f} "
                  f"{r['sim_wall_s']:6.2f}", flush=True)
    for r in results:
        print(json.dumps({**r, "model": args.model, "kv_fraction": args.kv_fraction, "kv_of": args.kv_of,
                          "order": args.order}))
    ratios = {}
    by_key = {(r["workload"], r["policy"]): r for r in results}
    for wid in args.workloads.split(","):
        ours, lru = by_key.get((wid, "batchllm")), by_key.get((wid, "fcfs-lru"))
        if ours and lru and ours["predicted_s"] > 0 and ours["steps"] > 0:
            ratios[wid] = {"steps_fcfs_over_batchllm": round(lru["steps"] / ours["steps"], 3),
                           "time_fcfs_over_batchllm": round(lru["predicted_s"] / ours["predicted_s"], 3)}
    print(json.dumps({"bench": "R3", "kv_fraction": args.kv_fraction, "kv_of": args.kv_of, "order": args.order,
                      "ratios": ratios}))


if __name__ == "__main__":
    main()
