"""R1 (shared/WORKLOADS.md): plan a whole job: radix tree build + BatchLLM grouping.

100,000 prompts of 1,024 tokens: 1,000 groups x 100 requests, a 512-token shared prefix and a
512-token unique suffix each (token ids uniform in [10, 32000), seeded). Timed: tree build from the
flat numpy arrays + single-level grouping, not the making of the input. The plain-Python reference
runs the same shape at 1/100 of the size for a tokens/s ratio. Prints a table, then one JSON line.

    PYTHONPATH=python python bench/bench_plan.py [--groups 1000] [--members 100] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

from batchllm_core import _C
from batchllm_core.prefix_tree import plan_to_lists
from batchllm_core.reference import ReferencePrefixTree

VOCAB_LOW, VOCAB_HIGH = 10, 32000


def make_job(groups: int, members: int, prefix_len: int, suffix_len: int, seed: int = 0):
    """Flat int32 tokens [N * L] and int64 offsets [N + 1]; prompt i belongs to group i % groups."""
    rng = np.random.default_rng(seed)
    n = groups * members
    prefixes = rng.integers(VOCAB_LOW, VOCAB_HIGH, (groups, prefix_len), dtype=np.int32)
    prompts = np.empty((n, prefix_len + suffix_len), dtype=np.int32)
    prompts[:, :prefix_len] = prefixes[np.arange(n) % groups]  # interleaved: no help from input order
    prompts[:, prefix_len:] = rng.integers(VOCAB_LOW, VOCAB_HIGH, (n, suffix_len), dtype=np.int32)
    offsets = np.arange(n + 1, dtype=np.int64) * (prefix_len + suffix_len)
    return prompts.reshape(-1), offsets


def time_native(tokens, offsets, block_size: int):
    """Seconds for (build, single-level grouping, multi-level grouping); the tree is dropped after."""
    start = time.perf_counter()
    tree = _C.PrefixTree()
    tree.insert(tokens, offsets)
    built = time.perf_counter()
    tree.group_single_level(block_size)
    grouped = time.perf_counter()
    tree.group_multi_level(block_size)
    multi_done = time.perf_counter()
    return built - start, grouped - built, multi_done - grouped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--prefix", type=int, default=512)
    parser.add_argument("--suffix", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--machine", default="2-core dev CPU")
    args = parser.parse_args()

    tokens, offsets = make_job(args.groups, args.members, args.prefix, args.suffix)
    prompts = len(offsets) - 1
    runs = [time_native(tokens, offsets, args.block_size) for _ in range(args.repeats)]
    build_s = statistics.median(r[0] for r in runs)
    group_s = statistics.median(r[1] for r in runs)
    multi_s = statistics.median(r[2] for r in runs)
    seconds = statistics.median(r[0] + r[1] for r in runs)
    best = min(r[0] + r[1] for r in runs)
    tree = _C.PrefixTree()
    tree.insert(tokens, offsets)
    plan = tree.group_single_level(args.block_size)
    multi = tree.group_multi_level(args.block_size)
    stats = tree.stats(plan)
    assert stats["groups"] == args.groups, stats  # the planted groups, found exactly

    # The reference at 1/100 of the size (same prompt shape, 1/100 of the groups).
    ref_groups = max(1, args.groups // 100)
    ref_tokens, ref_offsets = make_job(ref_groups, args.members, args.prefix, args.suffix, seed=1)
    ref_prompts = [ref_tokens[ref_offsets[i]:ref_offsets[i + 1]].tolist() for i in range(len(ref_offsets) - 1)]
    start = time.perf_counter()
    ref = ReferencePrefixTree()
    ref.insert_list(ref_prompts)
    ref_plan = ref.group_single_level(args.block_size)
    ref_s = time.perf_counter() - start
    native_small = _C.PrefixTree()
    native_small.insert(ref_tokens, ref_offsets)
    assert plan_to_lists(native_small.group_single_level(args.block_size)) == ref_plan.__dict__

    tokens_per_s = len(tokens) / seconds
    ref_tokens_per_s = len(ref_tokens) / ref_s
    rows = [
        ("native build (insert)", build_s, len(tokens) / build_s),
        ("native single-level grouping", group_s, len(tokens) / group_s),
        ("native build + single-level (R1)", seconds, tokens_per_s),
        ("  best of the runs", best, len(tokens) / best),
        ("native multi-level grouping", multi_s, len(tokens) / multi_s),
        (f"python reference, {len(ref_prompts):,} prompts", ref_s, ref_tokens_per_s),
    ]
    print(f"R1 plan: {prompts:,} prompts x {args.prefix + args.suffix} tokens "
          f"({args.groups} groups x {args.members}), block {args.block_size}, {args.machine}")
    print(f"median of {args.repeats} runs")
    print(f"{'step':<36}{'seconds':>10}{'Mtokens/s':>12}")
    for name, secs, rate in rows:
        print(f"{name:<36}{secs:>10.3f}{rate / 1e6:>12.1f}")
    print(f"groups {stats['groups']}, tree nodes {stats['nodes']:,}, tree memory {stats['memory_bytes'] / 2**20:.0f} MiB, "
          f"prefill tokens {stats['prefill_tokens']:,} of {stats['prompt_tokens']:,} "
          f"({100 * stats['shared_tokens'] / stats['prompt_tokens']:.1f}% shared); multi-level prefixes {len(multi)}")
    print(json.dumps({
        "bench": "R1",
        "machine": args.machine,
        "python": platform.python_version(),
        "prompts": prompts,
        "tokens": int(len(tokens)),
        "seconds": round(seconds, 4),
        "best_seconds": round(best, 4),
        "repeats": args.repeats,
        "tokens_per_s": round(tokens_per_s),
        "build_seconds": round(build_s, 4),
        "group_seconds": round(group_s, 4),
        "multi_level_seconds": round(multi_s, 4),
        "python_ref_prompts": len(ref_prompts),
        "python_ref_seconds": round(ref_s, 4),
        "python_ref_tokens_per_s": round(ref_tokens_per_s),
        "python_ref_speedup": round(tokens_per_s / ref_tokens_per_s, 1),
        "groups": stats["groups"],
        "nodes": stats["nodes"],
        "memory_bytes": stats["memory_bytes"],
        "shared_tokens": stats["shared_tokens"],
        "prefill_tokens": stats["prefill_tokens"],
    }))


if __name__ == "__main__":
    main()
