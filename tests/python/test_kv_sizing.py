"""KV pool sizing from a profiled worst-case step (batchllm_core.kv_sizing)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import gpu

from batchllm_core.kv_sizing import kv_budget_bytes, kv_cache_bytes_from_profile, profile_step, worst_case_plan

GiB = 1 << 30


def test_budget_subtracts_everything_outside_the_pool():
    # 80 GiB card, 10 GiB free, torch holds 68 GiB (so 2 GiB are outside torch), peak 20 GiB
    budget = kv_budget_bytes(80 * GiB, 10 * GiB, 68 * GiB, 20 * GiB, utilization=0.9, reserve_bytes=GiB)
    assert budget == int(80 * GiB * 0.9) - 2 * GiB - 20 * GiB - GiB
    assert kv_budget_bytes(8 * GiB, 0, 8 * GiB, 9 * GiB) == 0
    with pytest.raises(ValueError, match="utilization"):
        kv_budget_bytes(GiB, GiB, 0, 0, utilization=1.5)


def test_worst_case_plan_is_one_prefill_over_fresh_blocks():
    plan = worst_case_plan(40, 70, block_size=16)
    assert plan.block_tables.tolist() == [[0, 1, 2]] and plan.query_start.tolist() == [0, 40]
    assert plan.sample_rows.max() == 39 and len(plan.sample_rows) == 70
    assert (plan.slot_mapping == np.arange(40)).all() and plan.num_decode_seqs == 0


def test_profile_step_runs_forward_logits_and_sampler_on_cpu():
    from batchllm_core.loader import build_random_model

    loaded = build_random_model("tiny", 0, torch.float32, "cpu")
    sampled = profile_step(loaded.model, loaded.config, 16, torch.float32, torch.device("cpu"), 100, 130)
    assert sampled.shape == (130,) and int(sampled.min()) >= 0 and int(sampled.max()) < loaded.config.vocab_size


def test_profile_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        kv_cache_bytes_from_profile(None, None, 16, torch.float32, torch.device("cpu"), 64, 8)


@gpu
def test_profiled_pool_fits_in_free_memory_after_the_step():
    from batchllm_core.loader import build_random_model
    from batchllm_core.model_runner import ModelRunner

    from batchllm_core.models.config import ModelConfig

    config = ModelConfig.from_name("llama-1b").replace(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                                                       head_dim=64, intermediate_size=512, vocab_size=1000)
    loaded = build_random_model(config, 0, torch.bfloat16, "cuda")  # head dim 64: has CUDA kernels
    budget = kv_cache_bytes_from_profile(loaded.model, loaded.config, 16, torch.bfloat16, torch.device("cuda"),
                                         2048, 1024)
    free, total = torch.cuda.mem_get_info()
    assert 0 < budget < free
    # With CUDA graphs the reserve also holds a step's activations (the piecewise graphs' pool).
    assert kv_cache_bytes_from_profile(loaded.model, loaded.config, 16, torch.bfloat16, torch.device("cuda"),
                                       2048, 1024, graphs=True) < budget
    blocks = budget // ModelRunner.kv_bytes_per_block(loaded.config, 16, torch.bfloat16)
    runner = ModelRunner(loaded.model, loaded.config, int(min(blocks, 1 << 16)), 16, "cuda", torch.bfloat16)
    assert runner.kv_cache.is_cuda
