"""bench/e2e.py smoke test on CPU with the tiny model, and the performance model it reports against.

The e2e run is the smallest W6 (one group of 16 requests sharing a 2000-token prefix, 100 output
tokens each, cut to 8): big enough that prefix sharing shows in the prefill token count, small enough for CI.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from e2e_floor import Ceilings, ModelCost, distinct_prompt_tokens, job_floor  # noqa: E402

_ROW_FIELDS = {"bench", "workload", "model", "policy", "device", "device_name", "commit", "seconds",
               "output_tokens_per_s", "total_tokens_per_s", "prefill_tokens", "floor_s", "time_over_floor",
               "flops", "bytes_per_s", "output_tokens", "prompt_tokens"}
_ENGINE_FIELDS = {"peak_kv_blocks", "peak_kv_bytes", "decode_tokens", "steps", "step_floor_s",
                  "time_over_step_floor", "kv_capacity_blocks"}


@pytest.fixture(scope="module")
def e2e_rows(tmp_path_factory):
    import e2e

    json_out = tmp_path_factory.mktemp("e2e") / "rows.jsonl"
    base = ["--workload", "W6", "--model", "tiny", "--device", "cpu", "--scale", str(1 / 40), "--threads", "1",
            "--max-tokens", "8", "--kv-cache-memory", str(64 << 20), "--json-out", str(json_out)]
    rows = e2e.main(base + ["--policy", "batchllm", "--hf"])
    # The overlapped loop too, with a kernel variant chosen by the environment (recorded, not used on a CPU).
    saved = os.environ.get("BATCHLLM_CASCADE_LAUNCH")
    os.environ["BATCHLLM_CASCADE_LAUNCH"] = "merge"
    try:
        rows += e2e.main(base + ["--policy", "no-share", "--no-warmup", "--overlap", "--repeat", "2"])
    finally:
        if saved is None:
            os.environ.pop("BATCHLLM_CASCADE_LAUNCH")
        else:
            os.environ["BATCHLLM_CASCADE_LAUNCH"] = saved
    return rows, json_out


def test_rows_have_every_field_and_consistent_rates(e2e_rows):
    rows, json_out = e2e_rows
    written = [json.loads(line) for line in json_out.read_text().splitlines()]
    assert written == rows
    assert [r["policy"] for r in rows] == ["batchllm", "hf", "no-share"]
    assert [r["overlap"] for r in rows] == [False, False, True]
    assert [r["kernel_env"] for r in rows] == [{}, {}, {"BATCHLLM_CASCADE_LAUNCH": "merge"}]
    for row in rows:
        assert _ROW_FIELDS <= set(row), _ROW_FIELDS - set(row)
        assert row["workload"] == "W6" and row["device"] == "cpu" and row["requests"] == 16
        assert row["output_tokens"] == 16 * 8 and row["max_tokens"] == 8
        assert row["max_num_batched_tokens"] == (None if row["policy"] == "hf" else 2048)
        assert row["output_tokens_per_s"] == pytest.approx(row["output_tokens"] / row["seconds"], rel=1e-2)
        assert row["time_over_floor"] == pytest.approx(row["seconds"] / row["floor_s"], rel=1e-2)
        assert row["time_over_floor"] > 1.0  # nothing beats the floor
    for row in (rows[0], rows[2]):
        assert _ENGINE_FIELDS <= set(row), _ENGINE_FIELDS - set(row)
        assert row["peak_kv_blocks"] > 0 and row["seconds"] >= row["step_floor_s"] > 0


def test_repeats_time_the_same_job_and_keep_the_first_runs_counters(e2e_rows):
    rows, _ = e2e_rows
    once, twice = rows[0], rows[2]
    assert once["position"] == 1 and twice["position"] == 1  # each its process's (main call's) first engine
    assert len(once["seconds_runs"]) == 1 and once["seconds_best"] == once["seconds"]
    assert len(twice["seconds_runs"]) == 2 and twice["seconds"] == twice["seconds_runs"][0]
    assert twice["seconds_best"] == min(twice["seconds_runs"])
    assert twice["output_tokens_per_s_best"] == pytest.approx(twice["output_tokens"] / twice["seconds_best"], rel=1e-2)
    # The counters are one job's, not the sum of the repeats.
    assert twice["decode_tokens"] == 16 * (8 - 1) and twice["prefill_tokens"] >= 16 * 2200
    assert twice["seconds"] >= twice["step_floor_s"]


def test_graph_counters_are_the_first_runs_not_the_warmups():
    # Run 4 reported 2 captures on W1 1/4 and W5 1/8 where the host simulation predicted 1: the
    # warm-up's decode step captured the other. A row's counters are their growth over its first run.
    import e2e

    before = {"graph_steps": 1, "graph_replays": 0, "graph_captures": 1, "graph_capture_s": 0.021,
              "graph_steps_padded_to_larger": 0}
    after = {"graph_steps": 129, "graph_replays": 127, "graph_captures": 2, "graph_capture_s": 0.043,
             "graph_steps_padded_to_larger": 62}
    assert e2e._counters_since(after, before) == {"graph_steps": 128, "graph_replays": 127, "graph_captures": 1,
                                                  "graph_capture_s": 0.022, "graph_steps_padded_to_larger": 62}
    none = dict.fromkeys(after)  # a runner without graphs
    assert e2e._counters_since(none, none) == none


def test_warmup_fills_one_full_budget_step():
    import e2e
    from workloads import make_workload

    workload = make_workload("W5", vocab=261, seed=0, scale=1 / 64)
    lengths = [len(r.prompt_token_ids) for r in workload.requests]
    chosen = e2e._warmup_prompts(workload, 2048)
    assert 2 <= len(chosen) <= 64
    assert sum(len(p["prompt_token_ids"]) for p in chosen) >= min(2048, sum(lengths[:64]))
    assert sum(lengths[:len(chosen) - 1]) < 2048 or len(chosen) == 2  # no more than it needs
    assert [p["prompt_token_ids"] for p in chosen] == [r.prompt_token_ids.tolist()
                                                      for r in workload.requests[:len(chosen)]]
    assert len(e2e._warmup_prompts(workload, 1)) == 2


def test_sharing_computes_fewer_prefill_tokens(e2e_rows):
    rows, _ = e2e_rows
    ours, no_share, hf = rows[0], rows[2], rows[1]
    # One 2000-token prefix + 16 suffixes of 200, block rounding aside, against 16 x 2200.
    assert ours["prefill_tokens"] < no_share["prefill_tokens"]
    assert ours["prefill_tokens"] <= 2000 + 16 * 200 + 16 * 16
    assert no_share["prefill_tokens"] >= 16 * 2200
    assert hf["prefill_tokens"] >= 16 * 2200
    assert ours["peak_kv_blocks"] < no_share["peak_kv_blocks"]


def test_plot_throughput_draws_the_rows(e2e_rows, tmp_path):
    import plot_throughput

    _, json_out = e2e_rows
    log = tmp_path / "log.txt"
    log.write_text("a table line\n" + json_out.read_text() + "{not json\n")
    rows = plot_throughput.read_rows([log])
    assert [r["policy"] for r in rows] == ["batchllm", "hf", "no-share"]
    assert [r["overlap"] for r in rows] == [False, False, True]
    assert plot_throughput.bar_order(plot_throughput.latest_by_key(rows)) == ["batchllm", "hf", "no-share+overlap+merge"]
    path = plot_throughput.main([str(log), "-o", str(tmp_path / "throughput.png")])
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="several model/device"):
        plot_throughput.latest_by_key(rows + [{**rows[0], "model": "llama-1b"}])
    # A run with its own sampling is a bar of its own, not the workload's default run.
    sampled = {**rows[0], "temperature": 1.0, "top_p": 0.9}
    assert plot_throughput.label(sampled) == "batchllm+t1+top_p0.9"
    assert plot_throughput.latest_by_key(rows + [sampled])[(plot_throughput.group(rows[0]), "batchllm")] == rows[0]


# ---------------------------------------------------------------------------------------------------
def _cost():
    return ModelCost(num_params=1_000_000_000, weight_bytes=2_000_000_000, kv_bytes_per_token=1000)


def test_distinct_prompt_tokens_counts_a_radix_tree():
    prompts = [np.array([1, 2, 3, 4]), np.array([1, 2, 3, 5]), np.array([1, 2]), np.array([7, 8]),
               np.array([1, 2, 3, 4])]
    # tree: 1-2-3-{4,5}, 7-8 -> 7 tokens
    assert distinct_prompt_tokens(prompts) == 7


def test_job_floor_matches_design_formula():
    ceilings = Ceilings(flops=1e12, bytes_per_s=1e12)
    prompts = [np.arange(10, 20), np.arange(10, 20)]  # identical: 10 distinct tokens
    floor = job_floor(prompts, [3, 3], [1, 1], _cost(), ceilings)
    assert floor["prefill_s"] == pytest.approx(2 * 1e9 * 10 / 1e12)
    # steps 1 and 2 run both sequences: memory = (2e9 + (10 + 2 * step) * 1000) / 1e12, compute 4e-3
    expected = sum(max(2 * 1e9 * 2 / 1e12, (2e9 + (10 + 2 * step) * 1000) / 1e12) for step in (1, 2))
    assert floor["decode_s"] == pytest.approx(expected)


def test_job_floor_counts_only_active_sequences_prompts():
    ceilings = Ceilings(flops=1e30, bytes_per_s=1.0)  # memory bound: the floor counts KV bytes
    cost = ModelCost(num_params=1, weight_bytes=0, kv_bytes_per_token=1)
    prompts = [np.arange(100), np.arange(50) + 1000]
    floor = job_floor(prompts, [2, 4], [1, 2], cost, ceilings)
    # step 1: both (100 + 50 prompt tokens, 3 sequences x 1); steps 2, 3: the second only (50 + 2 x step)
    assert floor["decode_s"] == pytest.approx((150 + 3) + (50 + 4) + (50 + 6))


def test_w1_floor_is_the_issue_figure():
    from batchllm_core.models.config import ModelConfig
    from workloads import make_workload

    config = ModelConfig.from_name("llama-1b")
    workload = make_workload("W1", vocab=config.vocab_size)
    floor = job_floor([r.prompt_token_ids for r in workload.requests], [r.max_tokens for r in workload.requests],
                      [r.n for r in workload.requests], ModelCost.of(config, 2), Ceilings())
    assert floor["floor_s"] == pytest.approx(0.63, abs=0.01)  # issue 6: "about 0.63 s" on an H100


@pytest.mark.parametrize("shape", ["tiny", "qwen2-small"])
def test_hf_baseline_model_holds_our_weights(shape):
    import torch

    from batchllm_core.loader import build_random_model
    from batchllm_core.models.config import ModelConfig
    from hf_baseline import to_hf_model

    if shape == "qwen2-small":  # the qwen2.5-7b-shape options (q/k/v bias, rope theta) at a small size
        shape = ModelConfig.from_name("qwen2.5-7b-shape").replace(
            hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=96,
            vocab_size=300)
    loaded = build_random_model(shape, seed=3, dtype=torch.float32, device="cpu")
    hf = to_hf_model(loaded.model, torch.device("cpu"), torch.float32)
    ids = torch.randint(10, loaded.config.vocab_size, (24,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = loaded.model.compute_logits(loaded.model(ids, torch.arange(24)))
        theirs = hf(ids[None]).logits[0]
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_hf_batches_hold_64_sequences_of_one_sample_count():
    from hf_baseline import HFRequest, batches

    requests = [HFRequest(np.arange(4), 2) for _ in range(70)] + [HFRequest(np.arange(4), 2, n=8) for _ in range(9)]
    sizes = [(len(b), sum(r.n for r in b)) for b in batches(requests)]
    assert sizes == [(64, 64), (6, 6), (8, 64), (1, 8)]


def test_bench_host_runs_a_workload_through_the_graph_path_with_a_stub_model(tmp_path):
    # bench/bench_host.py: the host's share of a step, the model stubbed and the sampler's pass
    # (a kernel on a GPU) timed apart; its numbers are the bench's business, not this test's.
    import bench_host

    log = tmp_path / "host.jsonl"
    result = bench_host.main(["--workload", "W1", "--scale", "0.02", "--json-out", str(log)])
    assert result["steps"] > 100 and result["graph_steps"] > 100  # decode steps took the graph path
    assert 0 < result["host_s"] <= result["wall_s"]
    assert result["per_kind"]["sample_rows (GPU kernel)"]["count"] == result["steps"]
    assert json.loads(log.read_text())["host_ms_per_step"] == result["host_ms_per_step"]
    # With a stop string that never matches and logprobs, detokenized by a Rust BPE tokenizer.
    result = bench_host.main(["--workload", "W1", "--scale", "0.02", "--stop", "@@", "--logprobs", "2",
                              "--bpe-tokenizer"])
    assert (result["stop"], result["logprobs"], result["tokenizer"]) == ("@@", 2, "bpe")
    assert result["steps"] > 100


def test_gpu_state_reads_nvidia_smi_and_drops_a_field_the_driver_lacks(tmp_path, monkeypatch):
    import torch

    import e2e

    fake = tmp_path / "nvidia-smi"
    # An older driver: the clock event reasons field is unknown (nvidia-smi fails the whole query).
    fake.write_text("#!/bin/sh\n"
                    "case \"$*\" in *clocks_event_reasons*) echo 'Field is not a valid field' >&2; exit 2;; esac\n"
                    "echo '1980, 2619, 45, 350.25'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert e2e.gpu_state(torch.device("cuda", 0)) == {"sm_mhz": 1980.0, "mem_mhz": 2619.0, "temperature_c": 45.0,
                                                     "power_w": 350.25}
    fake.write_text("#!/bin/sh\necho '1755, 2619, 71, [N/A], 0x0000000000000004'\n")
    assert e2e.gpu_state(torch.device("cuda", 0)) == {"sm_mhz": 1755.0, "mem_mhz": 2619.0, "temperature_c": 71.0,
                                                     "power_w": "[N/A]", "clock_event_reasons": "0x0000000000000004"}
    assert e2e.gpu_state(torch.device("cpu")) is None
    fake.write_text("#!/bin/sh\nexit 9\n")
    assert e2e.gpu_state(torch.device("cuda", 0)) is None
