"""GEMM benchmark: the model's projections at decode and prefill row counts, cuBLAS against cuBLASLt
(and cuBLAS on the weights stored transposed).

Run 4's W1 decode layer (llama-1b, 256 rows) spent ~82 us in its four GEMMs against ~42 us of
weight reads: the small ones (q/k/v, o) at 2-3x their floor. torch picks the BLAS library per call
(``torch.backends.cuda.preferred_blas_library``, or ``TORCH_BLAS_PREFER_CUBLASLT=1`` at start-up);
this bench times each shape under both, so a GPU run says whether the engine should prefer one.

Per (model, projection, rows M): ``x [M, K] @ W^T`` with W ``[N, K]`` bf16 as ``F.linear`` runs it, the
weights rotated over copies that overflow the L2 cache (a decode step reads each weight once, from
HBM), timed with CUDA graphs and events (bench_attention.time_graphs, median of replays). The floor
is max(2 M N K / FLOP/s, bytes / bytes/s) with the H100 ceilings (746 TFLOP/s, 2.9 TB/s) and bytes the
weights, input and output once. Prints a table, then one JSON line per row (prefix "JSON ").

Usage: python bench/bench_gemm.py [--quick] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import commit, time_graphs  # noqa: E402
from e2e_floor import H100_BYTES_PER_S, H100_FLOPS  # noqa: E402

# (model, projection, K, N) of one layer (q/k/v and gate/up fused, as the model runs them) and the
# output head; rows: a decode step's (W2 1/4: 64, W1 1/4: 256, W1: 1,024, W6: 640) and a prefill step's.
PROJECTIONS = {
    "llama-1b": [("qkv", 2048, 3072), ("o", 2048, 2048), ("gate_up", 2048, 16384), ("down", 8192, 2048),
                 ("lm_head", 2048, 32000)],
    "qwen2.5-7b-shape": [("qkv", 3584, 4608), ("o", 3584, 3584), ("gate_up", 3584, 37888), ("down", 18944, 3584)],
}
ROWS = {"llama-1b": [64, 256, 1024, 2048], "qwen2.5-7b-shape": [640, 2048]}
BACKENDS = ("cublas", "cublaslt")
VARIANTS = BACKENDS + ("cublas_kn",)  # the backends on [N, K] weights (F.linear), then cuBLAS on [K, N] ones
L2_OVERFLOW_BYTES = 128 << 20  # weight copies to rotate over: more than the H100's 50 MB of L2, twice


def floor_ms(rows: int, k: int, n: int, element_bytes: int = 2, flops: float = H100_FLOPS,
             bytes_per_s: float = H100_BYTES_PER_S) -> float:
    """The roofline floor of ``[rows, k] @ [k, n]``: compute or one pass over its operands, in ms."""
    compute = 2.0 * rows * n * k / flops
    memory = (rows * k + k * n + rows * n) * element_bytes / bytes_per_s
    return max(compute, memory) * 1e3


def weight_copies(k: int, n: int, element_bytes: int = 2) -> int:
    """Copies of a [n, k] weight whose rotation overflows L2 (2 to 64: the models' smallest
    projection, 8 MB, takes 16)."""
    return min(64, max(2, math.ceil(L2_OVERFLOW_BYTES / (k * n * element_bytes))))


def bench_shape(model: str, name: str, rows: int, k: int, n: int, reps: int, device_name: str,
                device: str = "cuda", timer=None) -> dict:
    """One projection's row: its time under each of VARIANTS (median of ``timer``'s replays, CUDA
    graphs by default) and each variant's error against cuBLAS's output. On a CPU device (the smoke
    test) the library is not switched (torch has no cuBLASLt there): the cublaslt row is NaN."""
    timer = timer or time_graphs
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, k, generator=gen, device=device, dtype=torch.bfloat16)
    weights = [torch.randn(n, k, generator=gen, device=device, dtype=torch.bfloat16) * 0.02
               for _ in range(weight_copies(k, n))]
    ms, reference = {}, None
    saved = torch.backends.cuda.preferred_blas_library()
    try:
        for backend in BACKENDS:
            if device != "cuda" and backend != "cublas":
                ms[backend] = ms[backend + "_rel_err"] = math.nan
                continue
            if device == "cuda":
                torch.backends.cuda.preferred_blas_library(backend)
            ms[backend] = timer([lambda w=w: torch.nn.functional.linear(x, w) for w in weights], reps=reps)
            result = torch.nn.functional.linear(x, weights[0]).float()
            if reference is None:
                reference = result
            ms[backend + "_rel_err"] = float((result - reference).norm() / reference.norm())
    finally:
        if device == "cuda":
            torch.backends.cuda.preferred_blas_library(saved)
    # The weights stored transposed ([K, N], x @ W^T as a plain NN product): another layout the
    # loader could keep, for which cuBLAS picks its kernels separately.
    transposed = [w.t().contiguous() for w in weights]
    del weights
    ms["cublas_kn"] = timer([lambda w=w: torch.mm(x, w) for w in transposed], reps=reps)
    ms["cublas_kn_rel_err"] = float((torch.mm(x, transposed[0]).float() - reference).norm() / reference.norm())
    del transposed
    floor = floor_ms(rows, k, n)
    best = min((b for b in VARIANTS if not math.isnan(ms[b])), key=lambda b: ms[b])
    return {"bench": "gemm", "device": device_name, "commit": commit(), "model": model, "projection": name,
            "rows": rows, "k": k, "n": n, "dtype": "bfloat16", "weight_copies": weight_copies(k, n),
            **{f"{b}_ms": ms[b] for b in VARIANTS}, "floor_ms": floor,
            **{f"{b}_over_floor": ms[b] / floor for b in VARIANTS},
            **{f"{b}_rel_err_vs_cublas": ms[f"{b}_rel_err"] for b in VARIANTS if b != "cublas"}, "fastest": best,
            "tflops_best": 2.0 * rows * n * k / (ms[best] * 1e-3) / 1e12}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer replays, llama-1b only")
    parser.add_argument("--json-out", help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gemm: needs a CUDA GPU; nothing measured.", file=sys.stderr)
        return 2
    reps = 20 if args.quick else 50
    device_name = torch.cuda.get_device_name(0)
    print(f"device {device_name}; floors from {H100_FLOPS / 1e12:.0f} TFLOP/s and {H100_BYTES_PER_S / 1e12:.1f} TB/s")
    print(f"{'model':>17} {'proj':>8} {'rows':>5} {'K':>6} {'N':>7} | {'cublas ms':>9} {'lt ms':>9} {'[K,N] ms':>9} "
          f"{'floor':>8} | {'cublas/fl':>9} {'lt/fl':>6} {'KN/fl':>6} {'TFLOP/s':>7}")
    rows_out = []
    models = ["llama-1b"] if args.quick else list(PROJECTIONS)
    for model in models:
        for num_rows in ROWS[model]:
            for name, k, n in PROJECTIONS[model]:
                r = bench_shape(model, name, num_rows, k, n, reps, device_name)
                rows_out.append(r)
                if args.json_out:
                    with open(args.json_out, "a") as f:
                        f.write(json.dumps(r) + "\n")
                print(f"{model:>17} {name:>8} {num_rows:>5} {k:>6} {n:>7} | {r['cublas_ms']:>9.4f} "
                      f"{r['cublaslt_ms']:>9.4f} {r['cublas_kn_ms']:>9.4f} {r['floor_ms']:>8.4f} | "
                      f"{r['cublas_over_floor']:>9.2f} {r['cublaslt_over_floor']:>6.2f} "
                      f"{r['cublas_kn_over_floor']:>6.2f} {r['tflops_best']:>7.0f}", flush=True)
                torch.cuda.empty_cache()
    # Per model and rows: a layer's four projections summed (the decode layer's GEMM time).
    for model in models:
        for num_rows in ROWS[model]:
            layer = [r for r in rows_out if r["model"] == model and r["rows"] == num_rows and r["projection"] != "lm_head"]
            sums = {b: sum(r[f"{b}_ms"] for r in layer) for b in VARIANTS}
            floor = sum(r["floor_ms"] for r in layer)
            print(f"{model} {num_rows} rows, a layer's GEMMs: " +
                  ", ".join(f"{b} {sums[b] * 1e3:.1f} us ({sums[b] / floor:.2f}x floor)" for b in VARIANTS) +
                  f", floor {floor * 1e3:.1f} us")
    for r in rows_out:
        print("JSON " + json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
