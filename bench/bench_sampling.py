"""Sampling benchmark: one decode step's draws from its logits, the fused pass against the torch path.

Per shape (R rows of V-token logits, bf16 as the model returns them) and mode (greedy; temperature 1):
  fused      batchllm_core.ops.sample_rows: one read of the logits (argmax or Gumbel-max, logsumexp,
             the drawn token's logprob), what the Sampler runs for rows without filters
  torch      the sampler's torch formulas (its path before the fused pass, and still the path of
             filtered rows): float32 copy of the logits, argmax, Gumbel noise chunk by chunk,
             logsumexp, gather
  sampler    Sampler.sample (fused pass + host copy of the draws), wall time
  floor      the logits' bytes read once / measured copy bandwidth

The shapes are W1's decode batch on llama-1b (1,024 x 128,256), W4's (2,048 sequences: 256 prompts x
8 samples, temperature 1) and W6's on the qwen2.5-7b shape (640 x 152,064): ../shared/WORKLOADS.md.
Filtered draws (session 16; W1's shape, temperature 1, every row top_p 0.9, top_k 50 or min_p 0.05):
  fused      ops.sample_rows with the rows' filters: a pass per candidate the filters drop
  sampler    Sampler.sample's wall time, as above; torch_sampler: the same with BATCHLLM_SAMPLER=torch
             (the torch formulas: 1,024 candidates by torch.topk, a sort of the rows past them, a host
             sync to find those rows: what filtered rows ran before session 16)
Random logits (3 x N(0, 1)) are flatter than a model's: top_k 50 there takes ~log2(V / 50) tries.
Temperature 1 also on peaked logits ("pk": 16 tokens 25 above the rest, as a trained model's): the draw
skips the noise of tokens more than its largest value (16.6) below the best score (session 16).
Timing: CUDA graphs and events (bench_attention.time_graphs) for fused and torch, median of replays;
the sampler's wall time by perf_counter around synchronised calls. Prints a table, then one JSON line
per row (prefix "JSON ").

Usage: python bench/bench_sampling.py [--quick] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import commit, copy_bandwidth_bytes_per_s, time_graphs  # noqa: E402

SHAPES = [("W1 llama-1b", 1024, 128256), ("W4 llama-1b", 2048, 128256), ("W6 qwen2.5-7b", 640, 152064)]


def torch_path(logits: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor, chunk_rows: int, random: bool):
    """The sampler's torch formulas over a whole step: (ids, lse, logprobs). `random`: the rows have a
    temperature (known on the host, as the sampler knows it: no sync, so the path can be captured)."""
    from batchllm_core.sampling import _gumbel_noise, _hash32
    raw = logits.float()
    ids = torch.argmax(raw, dim=-1)
    token_hashes = _hash32(torch.arange(raw.shape[1], dtype=torch.int64, device=raw.device) ^ 0x2545F491)
    if random:
        for start in range(0, raw.shape[0], chunk_rows):
            part = slice(start, start + chunk_rows)
            ids[part] = torch.argmax(raw[part] / temperature[part, None] + _gumbel_noise(keys[part], token_hashes),
                                     dim=-1)
    lse = torch.logsumexp(raw, dim=-1)
    return ids, lse, raw.gather(1, ids[:, None])[:, 0] - lse


def step_inputs(rows: int, vocab: int, temperature: float, device: str, seed: int = 0, peaked: bool = False):
    """bf16 logits 3 x N(0, 1) (flat: every token within the noise's reach of the best score), or
    peaked as a trained model's (16 tokens 25 higher: the draw skips the noise of the rest)."""
    from batchllm_core.sampling import _hash32
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen, device=device) * 3
    if peaked:
        logits[:, :16] += 25
    logits = logits.to(torch.bfloat16)
    temps = torch.full((rows,), temperature, dtype=torch.float32, device=device)
    keys = _hash32(torch.arange(rows, dtype=torch.int64, device=device) * 7919 + seed)
    return logits, temps, keys


def bench_shape(label: str, rows: int, vocab: int, temperature: float, bandwidth: float, reps: int,
                device_name: str, device: str = "cuda", timer=None, peaked: bool = False) -> dict:
    from batchllm_core import ops
    from batchllm_core.sampling import RequestSamplingTable, Sampler, SamplingParams
    timer = timer or time_graphs
    logits, temps, keys = step_inputs(rows, vocab, temperature, device, peaked=peaked)
    chunk_rows = max(1, (1 << 24) // vocab)  # the Sampler's default max_noise_elements
    fused_ids, fused_lse, _ = ops.sample_rows(logits, temps, keys)
    torch_ids, torch_lse, _ = torch_path(logits, temps, keys, chunk_rows, temperature > 0)
    agree = float((fused_ids == torch_ids).float().mean())
    lse_err = float((fused_lse - torch_lse).abs().max())
    fused_ms = timer([lambda: ops.sample_rows(logits, temps, keys)], reps=reps)
    # The torch path scores every token whatever the logits: timed on the flat rows only.
    torch_ms = None if peaked else timer([lambda: torch_path(logits, temps, keys, chunk_rows, temperature > 0)],
                                         reps=reps)
    table = RequestSamplingTable.build([SamplingParams(temperature=temperature, max_tokens=1)], [1], device)
    sampler = Sampler(vocab, device)
    zeros = np.zeros(rows, np.int64)
    walls = []
    for _ in range(max(3, reps // 10)):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sampler.sample(logits, table, zeros, np.arange(rows), zeros)
        walls.append((time.perf_counter() - t0) * 1e3)
    floor_ms = logits.numel() * logits.element_size() / bandwidth * 1e3
    return {"bench": "sampling", "device": device_name, "commit": commit(), "workload": label, "rows": rows,
            "vocab": vocab, "temperature": temperature, "dtype": "bfloat16", "logits": "peaked" if peaked else "flat",
            "fused_ms": fused_ms,
            "torch_ms": torch_ms, "sampler_wall_ms": sorted(walls)[len(walls) // 2], "floor_ms": floor_ms,
            "fused_over_floor": fused_ms / floor_ms, "torch_over_fused": torch_ms and torch_ms / fused_ms,
            "draws_equal_fraction": agree, "lse_max_abs_err": lse_err}


FILTERED = [("top_p 0.9", dict(top_p=0.9)), ("top_k 50", dict(top_k=50)), ("min_p 0.05", dict(min_p=0.05))]


def bench_filtered(label: str, rows: int, vocab: int, name: str, filters: dict, bandwidth: float, reps: int,
                   device_name: str, device: str = "cuda", timer=None) -> dict:
    from batchllm_core import ops
    from batchllm_core.sampling import RequestSamplingTable, Sampler, SamplingParams
    timer = timer or time_graphs
    logits, temps, keys = step_inputs(rows, vocab, 1.0, device)
    table = RequestSamplingTable.build([SamplingParams(temperature=1.0, max_tokens=1, **filters)], [1], device)
    request = torch.zeros(rows, dtype=torch.int64, device=device)
    row_filters = (table.top_k[request], table.top_p[request], table.min_p[request])
    fused_ms = timer([lambda: ops.sample_rows(logits, temps, keys, row_filters)], reps=reps)
    sampler = Sampler(vocab, device)
    zeros = np.zeros(rows, np.int64)

    def wall(env: str) -> tuple:
        os.environ["BATCHLLM_SAMPLER"] = env
        walls, out = [], None
        for _ in range(max(3, reps // 10)):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = sampler.sample(logits, table, zeros, np.arange(rows), zeros)
            walls.append((time.perf_counter() - t0) * 1e3)
        os.environ.pop("BATCHLLM_SAMPLER", None)
        return sorted(walls)[len(walls) // 2], out.token_ids

    sampler_ms, ids = wall("")
    torch_sampler_ms, torch_ids = wall("torch")
    floor_ms = logits.numel() * logits.element_size() / bandwidth * 1e3
    return {"bench": "sampling_filtered", "device": device_name, "commit": commit(), "workload": label,
            "rows": rows, "vocab": vocab, "temperature": 1.0, "filters": name, "dtype": "bfloat16",
            "fused_ms": fused_ms, "sampler_wall_ms": sampler_ms, "torch_sampler_wall_ms": torch_sampler_ms,
            "floor_ms": floor_ms, "fused_over_floor": fused_ms / floor_ms,
            "torch_sampler_over_sampler": torch_sampler_ms / sampler_ms,
            "draws_equal_fraction": float((ids == torch_ids).mean())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer replays (a smoke run)")
    parser.add_argument("--json-out", help="also append the JSON lines to this file")
    args = parser.parse_args()
    import batchllm_core
    if not torch.cuda.is_available() or not batchllm_core.cuda_available():
        print("bench_sampling: needs a CUDA GPU and a CUDA build of batchllm; nothing measured.", file=sys.stderr)
        return 2
    reps = 10 if args.quick else 50
    device_name = torch.cuda.get_device_name(0)
    bandwidth = copy_bandwidth_bytes_per_s()
    print(f"device {device_name}; copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    print(f"{'workload':>14} {'rows':>5} {'vocab':>7} {'temp':>4} | {'fused ms':>8} {'torch ms':>8} {'sampler':>8} "
          f"{'floor':>7} | {'fused/floor':>11} {'torch/fused':>11} {'equal':>6}")
    rows = []

    def keep(r: dict) -> dict:
        rows.append(r)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps(r) + "\n")
        return r

    for label, num_rows, vocab in SHAPES:
        for temperature, peaked in ((0.0, False), (1.0, False), (1.0, True)):
            r = keep(bench_shape(label, num_rows, vocab, temperature, bandwidth, reps, device_name, peaked=peaked))
            name = label + (" pk" if peaked else "")
            print(f"{name:>14} {num_rows:>5} {vocab:>7} {temperature:>4.1f} | {r['fused_ms']:>8.3f} "
                  f"{r['torch_ms'] or float('nan'):>8.3f} {r['sampler_wall_ms']:>8.3f} {r['floor_ms']:>7.3f} | "
                  f"{r['fused_over_floor']:>11.2f} {r['torch_over_fused'] or float('nan'):>11.2f} "
                  f"{r['draws_equal_fraction']:>6.3f}",
                  flush=True)
            torch.cuda.empty_cache()
    label, num_rows, vocab = SHAPES[0]
    print(f"\nfiltered draws, {label} {num_rows} x {vocab}, temperature 1:")
    print(f"{'filters':>12} | {'fused ms':>8} {'sampler':>8} {'torch smp':>9} {'floor':>7} | {'fused/floor':>11} "
          f"{'torch/smp':>9} {'equal':>6}")
    for name, filters in FILTERED:
        r = keep(bench_filtered(label, num_rows, vocab, name, filters, bandwidth, reps, device_name))
        print(f"{name:>12} | {r['fused_ms']:>8.3f} {r['sampler_wall_ms']:>8.3f} {r['torch_sampler_wall_ms']:>9.3f} "
              f"{r['floor_ms']:>7.3f} | {r['fused_over_floor']:>11.2f} {r['torch_sampler_over_sampler']:>9.2f} "
              f"{r['draws_equal_fraction']:>6.3f}", flush=True)
        torch.cuda.empty_cache()
    for r in rows:
        print("JSON " + json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
