"""The attention kernels' launches for Nsight Compute: why a kernel takes the time it takes.

bench_attention says how long each kernel variant takes; this script gives `ncu` a few launches of
the default kernels to read the hardware counters of (throughput against the ceilings, occupancy,
and the warp stall reasons). Each case runs once to warm up, then once between cudaProfilerStart and
cudaProfilerStop, so that `ncu --profile-from-start off` sees only the measured launches:

- `w1_decode`: cascade decode of one W1 group as e2e runs it (llama-1b: 32 q / 8 KV heads, d = 64;
  64 readers of a 1,024-token prefix, 128-token suffixes);
- `w1_decode_staged`: the same with decode_rows' staged key loop (BATCHLLM_DECODE_ROWS=staged);
- `w1_step_owned`: W1 1/4's whole decode step (4 groups of 64) in owned tiles
  (BATCHLLM_CASCADE_LAUNCH=owned: one kernel, 128 CTAs of 16 readers; its prefix loop on mma.sync,
  then each warp's suffix ring), where its achieved bandwidth and stall reasons show which half binds;
- `grid_decode`: the kernel grid's (256, 8192, 128) shape at d = 128;
- `prefill`: one 4,096-token causal chunk at d = 128 (mma128 tiles by default);
- `prefill64`: one 2,048-token causal chunk at d = 64, a llama-1b mixed step's (wgmma-pipe by
  default: run 5 found mma128 much slower there end to end, with no kernel row to say why).

    ncu --clock-control none --profile-from-start off --set detailed -o report python bench/ncu_kernels.py
    PYTHONPATH=python .venv/bin/python bench/ncu_kernels.py --device cpu   # the cases' set-up, no GPU
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import KV_HEADS, PAGE, Q_HEADS, DecodeInputs, kernel_env  # noqa: E402


def prefill_case(tokens: int, head_dim: int, device: str, dtype: torch.dtype):
    """One causal chunk of `tokens` over paged KV holding exactly those tokens."""
    from batchllm_core import ops

    gen = torch.Generator(device=device).manual_seed(3)
    blocks = math.ceil(tokens / PAGE)
    k_cache = torch.randn((blocks, PAGE, KV_HEADS, head_dim), generator=gen, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn((tokens, Q_HEADS, head_dim), generator=gen, device=device, dtype=dtype)
    i32 = dict(dtype=torch.int32, device=device)
    tables = torch.arange(blocks, **i32).view(1, -1)
    query_start = torch.tensor([0, tokens], **i32)
    context_lens = torch.tensor([tokens], **i32)
    out = torch.empty_like(q)
    return lambda: ops.prefill_attention(q, k_cache, v_cache, tables, query_start, context_lens,
                                         max_q_len=tokens, out=out)


def cases(device: str, small: bool):
    """(name, callable) of each profiled case; `small`: tiny shapes (the CPU check of the set-up)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    scale = 16 if small else 1
    w1 = DecodeInputs(64 // scale, 1024 // scale, 128 // scale, with_dense=False, seed=0, device=device,
                      dtype=dtype, head_dim=64)
    grid = DecodeInputs(256 // scale, 8192 // scale, 128 // scale, with_dense=False, seed=1, device=device,
                        dtype=dtype, head_dim=128)
    w1_step = DecodeInputs(256 // scale, 1024 // scale, 128 // scale, with_dense=False, seed=2, device=device,
                           dtype=dtype, head_dim=64, groups=4)

    def staged():  # decode_rows' staged key loop (BATCHLLM_DECODE_ROWS=staged), read at the launch
        with kernel_env({"BATCHLLM_DECODE_ROWS": "staged"}):
            return w1.ours()

    def owned():  # one launch of owned tiles (BATCHLLM_CASCADE_LAUNCH=owned), read at the launch
        with kernel_env({"BATCHLLM_CASCADE_LAUNCH": "owned"}):
            return w1_step.ours()

    return [("w1_decode", w1.ours), ("w1_decode_staged", staged), ("w1_step_owned", owned), ("grid_decode", grid.ours),
            ("prefill", prefill_case(4096 // scale, 128, device, dtype)),
            ("prefill64", prefill_case(2048 // scale, 64, device, dtype))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    on_cuda = args.device == "cuda"
    todo = cases(args.device, small=not on_cuda)
    for _, run in todo:  # warm-up: module load, workspace sizes, first-launch costs
        run()
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
    for name, run in todo:
        if on_cuda:
            torch.cuda.nvtx.range_push(name)
        run()
        if on_cuda:
            torch.cuda.nvtx.range_pop()
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    print("ran " + ", ".join(name for name, _ in todo) + f" on {args.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
