"""The benchmark workloads (bench/workloads.py) and the scheduler simulator (bench/simulate.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import batchllm_core

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from workloads import WORKLOAD_IDS, make_workload  # noqa: E402


def test_workloads_are_deterministic_and_shaped_as_specified():
    a, b = make_workload("W1", scale=1 / 16), make_workload("W1", scale=1 / 16)
    for key, value in a.arrays().items():
        assert np.array_equal(np.asarray(value), np.asarray(b.arrays()[key])), key
    assert not np.array_equal(make_workload("W1", seed=1, scale=1 / 16).arrays()["tokens"], a.arrays()["tokens"])
    assert len(a.requests) == 64 and all(len(r.prompt_token_ids) == 1088 and r.max_tokens == 128 for r in a.requests)
    tokens = a.arrays()["tokens"]
    assert tokens.min() >= 10 and tokens.max() < 32000
    w4 = make_workload("W4", scale=1 / 64)
    assert [r.n for r in w4.requests] == [8] * 4 and w4.num_sequences == 32
    w3 = make_workload("W3", scale=1 / 4, order="grouped")
    p0, p40 = w3.requests[0].prompt_token_ids, w3.requests[40].prompt_token_ids
    assert np.array_equal(p0[:512], p40[:512]) and not np.array_equal(p0[512:1536], p40[512:1536])
    w5 = make_workload("W5", scale=1 / 32)
    assert all(256 <= len(r.prompt_token_ids) <= 1024 and 16 <= r.max_tokens <= 256 for r in w5.requests)
    assert sorted(WORKLOAD_IDS) == ["W1", "W2", "W3", "W4", "W5", "W6"]
    with pytest.raises(ValueError, match="workload"):
        make_workload("W9")


def test_simulator_runs_every_policy_and_prints_json():
    # The package this test imported (the installed one under `make test`, python/ in a dev build).
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(batchllm_core.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_parent, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "simulate.py"), "--workloads", "W1,W4",
                          "--scale", "0.05", "--kv-of", "self", "--check-integrity"],
                         capture_output=True, text=True, env=env, timeout=300, check=True).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    runs = [r for r in lines if "policy" in r]
    assert {(r["workload"], r["policy"]) for r in runs} == {(w, p) for w in ("W1", "W4")
                                                            for p in ("batchllm", "fcfs-lru", "no-share")}
    for r in runs:
        for key in ("prefill_tokens", "decode_tokens", "peak_kv_blocks", "steps", "predicted_s"):
            assert r[key] > 0, (r, key)
        assert r["failed_requests"] == 0
    w1 = {r["policy"]: r for r in runs if r["workload"] == "W1"}
    assert w1["batchllm"]["prefill_tokens"] == 1024 + 64 * 64  # one group at scale 0.05
    assert w1["batchllm"]["predicted_s"] < w1["fcfs-lru"]["predicted_s"] < w1["no-share"]["predicted_s"]
    assert lines[-1]["bench"] == "R3" and "W1" in lines[-1]["ratios"]
