"""Keeps bench/bench_attention.py honest without a GPU: its torch baselines (Hydragen composition,
per-sequence SDPA) must compute the same attention as our op on CPU, so the GPU run times equal work;
and its decode table and prefill row run on the emulated CUDA kernels (timing faked)."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import batchllm_core
import cuda_emulation


def _load_bench():
    path = Path(__file__).resolve().parents[2] / "bench" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_attention_baselines_agree_with_ops_on_cpu(capsys):
    assert _load_bench().cpu_smoke() == 0, capsys.readouterr().out


@pytest.mark.skipif(cuda_emulation.module() is None, reason="no CUDA emulation module in this build")
def test_bench_attention_decode_variants_on_emulated_kernels(monkeypatch, tmp_path, capsys):
    # The GPU run's decode table, on the CUDA kernels compiled for the CPU emulation: every variant's
    # environment selects kernels that compute the baselines' attention, the table prints, and each
    # shape's JSON line is on disk. Only the timing is faked (one call, 1 ms).
    bench = _emulated_bench(monkeypatch)
    # A variant that fails (as one might on its first GPU) is reported; the others still run.
    monkeypatch.setattr(bench, "DECODE_VARIANTS", {**bench.DECODE_VARIANTS, "broken": {"BATCHLLM_TEST_BROKEN": "1"}})
    json_out = tmp_path / "bench.jsonl"
    monkeypatch.setattr(sys, "argv", ["bench_attention.py", "--no-prefill", "--json-out", str(json_out)])
    assert bench.main() == 0
    rows = [json.loads(line) for line in json_out.read_text().splitlines()]
    tail = rows.pop()  # a job's tail replayed in a larger graph: the padded runs' real rows are the own run's
    assert tail["bench"] == "graph_tail" and set(tail["ms"]) == {
        f"d{d} {case}" for d in (64, 128) for case in ("rows1", "rows2", "prefix rows2")}
    assert all(set(ms) == {"own", "padded", "device split", "floor"} for ms in tail["ms"].values())
    assert max(tail["rel_err_vs_own"].values()) < 1e-2, tail["rel_err_vs_own"]
    flat = rows.pop()  # ours against fcfs-lru's flat reads and the launch variants at d = 64
    assert flat["bench"] == "flat_d64" and set(flat["ms"]) == {"G1 B3 P32 S5", "G2 B4 P32 S5"}
    assert all(set(ms) == {"ours", "flat", *bench.FLAT_D64_VARIANTS} for ms in flat["ms"].values())
    # Two groups (W1's shape): each row's flat table is its own group's prefix, and every variant
    # computes ours' attention.
    assert max(e for errors in flat["rel_err_vs_ours"].values() for e in errors.values()) < 1e-2, flat
    assert set(flat["rel_err_vs_ours"]["G2 B4 P32 S5"]) == {"flat", *bench.FLAT_D64_VARIANTS}
    scan = rows.pop()
    assert scan["bench"] == "prefix_scan" and set(scan["ms_per_1024_keys"]) == {"d64 B3", "d128 B3"}
    assert scan["tiles"] == {"d64": "wgmma-pipe", "d128": "mma"}  # the defaults by head dim
    assert scan["wgmma-pipe_runs_as"] == "wgmma-pipe" and set(scan["ms_wgmma-pipe"]) == set(scan["ms"])
    assert scan["wgmma_runs_as"] == "wgmma" and set(scan["ms_wgmma"]) == set(scan["ms"])
    summary = rows.pop()
    assert summary["bench"] == "decode_attention_summary" and summary["fastest"] in summary["geomean_vs_ours"]
    assert summary["geomean_vs_ours"]["ours"] == 1.0
    assert [(r["B"], r["P"], r["S"]) for r in rows] == [(3, 40, 20), (70, 16, 5)]
    assert summary["fastest"] != "broken" and math.isnan(summary["geomean_vs_ours"]["broken"])
    for r in rows:
        assert set(r["variant_ms"]) == {"ours", *bench.DECODE_VARIANTS}
        assert set(r["parts_ms"]) == {"prefix", "suffix"}
        assert list(r["variant_errors"]) == ["broken"] and "illegal memory access" in r["variant_errors"]["broken"]
        worst = max(((n, e) for n, e in r["variant_rel_err_vs_hydragen"].items() if n != "broken"), key=lambda kv: kv[1])
        assert worst[1] < 1e-2, worst
    # Flat (every row's table the prefix's blocks then its own, no level) computes the same attention
    # where the prefix is whole pages; a prefix of 40 tokens is not, and is left out.
    assert math.isnan(rows[0]["flat_ms"]) and rows[1]["flat_ms"] == 1.0
    assert rows[1]["rel_err_flat_vs_hydragen"] < 1e-2, rows[1]["rel_err_flat_vs_hydragen"]
    out = capsys.readouterr().out
    assert "best ours" in out and "variant broken FAILED" in out


@pytest.mark.skipif(cuda_emulation.module() is None, reason="no CUDA emulation module in this build")
def test_bench_attention_resumes_without_a_variant_that_lost_the_context(monkeypatch, tmp_path, capsys):
    # A fault is sticky on a GPU: after it nothing runs in the process. The bench records what it had,
    # names the variant and exits with 3; rerun with --resume --skip-variants, it measures only the
    # shapes still missing, without that variant (bench/device_check.sh does this).
    bench = _emulated_bench(monkeypatch)
    variants = {**bench.DECODE_VARIANTS, "broken": {"BATCHLLM_TEST_BROKEN": "1"}}
    monkeypatch.setattr(bench, "DECODE_VARIANTS", variants)
    alive = iter([True, False])  # the first shape's failure leaves the device usable, the second's not
    monkeypatch.setattr(bench, "cuda_context_alive", lambda: next(alive))
    json_out = tmp_path / "bench.jsonl"
    monkeypatch.setattr(sys, "argv", ["bench_attention.py", "--no-prefill", "--json-out", str(json_out), "--resume"])
    assert bench.main() == 3
    rows = [json.loads(line) for line in json_out.read_text().splitlines()]
    assert [r["bench"] for r in rows] == ["decode_attention", "context_lost"] and rows[1]["variant"] == "broken"
    assert "--skip-variants broken" in capsys.readouterr().out
    monkeypatch.setattr(bench, "DECODE_VARIANTS", variants)  # a new process starts from the full list
    monkeypatch.setattr(sys, "argv", ["bench_attention.py", "--no-prefill", "--json-out", str(json_out), "--resume",
                                      "--skip-variants", "broken"])
    assert bench.main() == 0
    rows = [json.loads(line) for line in json_out.read_text().splitlines()]
    decode = [r for r in rows if r["bench"] == "decode_attention"]
    assert [(r["B"], r["P"], r["S"]) for r in decode] == [(3, 40, 20), (70, 16, 5)]  # each shape once
    assert "broken" not in decode[1]["variant_ms"]
    summary = rows[-4]  # then the prefix scan, flat at d = 64 and the graph tail
    assert [r["bench"] for r in rows[-3:]] == ["prefix_scan", "flat_d64", "graph_tail"]
    assert summary["bench"] == "decode_attention_summary" and summary["shapes"] == [[3, 40, 20], [70, 16, 5]]
    assert summary["fastest"] != "broken" and "broken" not in summary["variant_env"]


def _emulated_bench(monkeypatch):
    """bench_attention on the emulated kernels: CPU inputs, one input set, timing faked (one call,
    1 ms), the device faked; a variant whose environment has BATCHLLM_TEST_BROKEN fails as a GPU fault."""
    bench = _load_bench()
    cuda_emulation.activate(monkeypatch)
    init = bench.DecodeInputs.__init__

    def cpu_inputs(self, batch, prefix, suffix, with_dense, seed, device="cpu", dtype=torch.bfloat16, head_dim=128,
                   groups=1):
        init(self, batch, prefix, suffix, with_dense, seed, device="cpu", dtype=dtype, head_dim=head_dim,
             groups=groups)

    monkeypatch.setattr(bench.DecodeInputs, "__init__", cpu_inputs)
    monkeypatch.setattr(bench, "time_graphs", lambda fns, reps=1: (fns[0](), 1.0)[1])
    monkeypatch.setattr(bench, "check_sdpa_backend", lambda fn: None)
    monkeypatch.setattr(bench, "num_input_sets", lambda n: 1)
    monkeypatch.setattr(bench, "copy_bandwidth_bytes_per_s", lambda: 3e12)
    monkeypatch.setattr(bench, "DECODE_SHAPES", [(3, 40, 20), (70, 16, 5)])
    monkeypatch.setattr(bench, "PREFIX_SCAN", [(3, 16), (3, 48)])
    monkeypatch.setattr(bench, "FLAT_D64", [(1, 3, 32, 5), (2, 4, 32, 5)])
    monkeypatch.setattr(bench, "GRAPH_TAIL", [1, 2])
    monkeypatch.setattr(bench, "GRAPH_TAIL_ROWS", 6)
    monkeypatch.setattr(bench, "GRAPH_TAIL_KEYS", 300)  # 2 splits of 192 keys on the emulation's 132 SMs
    monkeypatch.setattr(bench, "GRAPH_TAIL_PREFIXES", 3)
    monkeypatch.setattr(bench, "GRAPH_TAIL_DEVICE", "cpu")
    time_with_env = bench.time_with_env

    def failing_time_with_env(settings, fns, reps):
        if "BATCHLLM_TEST_BROKEN" in settings:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return time_with_env(settings, fns, reps)

    monkeypatch.setattr(bench, "time_with_env", failing_time_with_env)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "emulated")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(batchllm_core, "cuda_available", lambda: True)
    monkeypatch.setattr(bench, "cuda_context_alive", lambda: True)
    return bench


@pytest.mark.skipif(cuda_emulation.module() is None, reason="no CUDA emulation module in this build")
@pytest.mark.parametrize("head_dim, default_tiles", [(128, "mma128"), (64, "wgmma-pipe")])
def test_bench_attention_prefill_row_on_emulated_kernels(monkeypatch, head_dim, default_tiles):
    # The prefill row (the default tiles of the head dim, mma, mma128, wgmma-pipe, wgmma, wgmma64,
    # wgmma-k128 and WMMA against SDPA) on the emulated kernels, timing faked.
    bench = _load_bench()
    cuda_emulation.activate(monkeypatch)
    monkeypatch.delenv("BATCHLLM_ATTENTION_TILES", raising=False)
    monkeypatch.setattr(bench, "time_graphs", lambda fns, reps=1: (fns[0](), 1.0)[1])
    monkeypatch.setattr(bench, "check_sdpa_backend", lambda fn: None)
    monkeypatch.setattr(bench, "sdpa_backend", contextlib.nullcontext)
    row = bench.bench_prefill((2, 40, head_dim), 1, "emulated", device="cpu")
    assert row["variant_errors"] == {}
    assert row["head_dim"] == head_dim and row["tiles"] == default_tiles
    assert row["wgmma_runs_as"] == "wgmma"  # the emulation has every architecture's instructions
    for key in ("rel_err_vs_sdpa", "rel_err_mma_vs_sdpa", "rel_err_mma128_vs_sdpa", "rel_err_wgmma_pipe_vs_sdpa",
                "rel_err_wgmma_vs_sdpa", "rel_err_wgmma64_vs_sdpa", "rel_err_wgmma_k128_vs_sdpa",
                "rel_err_wmma_vs_sdpa"):
        assert row[key] < 1e-2, (key, row[key])


def test_bench_sampling_paths_agree_on_cpu():
    # bench/bench_sampling.py times the fused pass against the sampler's torch formulas: both must
    # draw the same tokens (greedy and Gumbel-max) with the same logsumexp, or the comparison is moot.
    path = Path(__file__).resolve().parents[2] / "bench" / "bench_sampling.py"
    spec = importlib.util.spec_from_file_location("bench_sampling", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for temperature, peaked in ((0.0, False), (1.0, False), (1.0, True)):
        row = bench.bench_shape("tiny", 6, 3000, temperature, 1e11, 3, "cpu", device="cpu",
                                timer=lambda fns, reps=1: (fns[0](), 1.0)[1], peaked=peaked)
        assert row["draws_equal_fraction"] == 1.0 and row["lse_max_abs_err"] < 1e-3, row
        assert row["floor_ms"] > 0 and row["sampler_wall_ms"] > 0
    # Filtered draws: the one pass's tries and the torch formulas' sort agree (bf16 random logits have
    # ties, which the two orders may break apart: most rows, not all).
    for name, filters in bench.FILTERED:
        row = bench.bench_filtered("tiny", 16, 3000, name, filters, 1e11, 3, "cpu", device="cpu",
                                   timer=lambda fns, reps=1: (fns[0](), 1.0)[1])
        assert row["draws_equal_fraction"] >= 0.75 and row["fused_ms"] > 0, row


def test_bench_gemm_floors_and_weight_rotation():
    # bench/bench_gemm.py: a decode GEMM's floor is its weights' read, a prefill GEMM's its FLOPs; the
    # weight copies it rotates over overflow the L2 cache, so a replay reads them from HBM.
    path = Path(__file__).resolve().parents[2] / "bench" / "bench_gemm.py"
    spec = importlib.util.spec_from_file_location("bench_gemm", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    decode = bench.floor_ms(256, 2048, 16384)  # llama-1b gate/up at W1 1/4's decode rows
    assert decode == pytest.approx((256 * 2048 + 2048 * 16384 + 256 * 16384) * 2 / 2.9e12 * 1e3)
    prefill = bench.floor_ms(2048, 2048, 16384)
    assert prefill == pytest.approx(2 * 2048 * 2048 * 16384 / 746e12 * 1e3)
    for model, projections in bench.PROJECTIONS.items():
        for _, k, n in projections:
            assert bench.weight_copies(k, n) * k * n * 2 >= bench.L2_OVERFLOW_BYTES
    if not torch.cuda.is_available():
        assert bench.main([]) == 2  # says it measured nothing
    # A row on the CPU (one call timed as 1 ms): every layout computes F.linear's product.
    row = bench.bench_shape("tiny", "qkv", 4, 64, 96, reps=1, device_name="cpu", device="cpu",
                            timer=lambda fns, reps=1: (fns[0](), 1.0)[1])
    assert row["cublas_ms"] == row["cublas_kn_ms"] == 1.0 and math.isnan(row["cublaslt_ms"])
    assert row["cublas_kn_rel_err_vs_cublas"] < 1e-2 and row["fastest"] == "cublas"
    assert row["floor_ms"] == bench.floor_ms(4, 64, 96)
