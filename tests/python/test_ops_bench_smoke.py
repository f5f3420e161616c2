"""Keeps bench/bench_attention.py honest without a GPU: its torch baselines (Hydragen composition,
per-sequence SDPA) must compute the same attention as our op on CPU, so the GPU run times equal work."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def test_bench_attention_baselines_agree_with_ops_on_cpu(capsys):
    path = Path(__file__).resolve().parents[2] / "bench" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.cpu_smoke() == 0, capsys.readouterr().out
