"""Host/device overlap pieces (batchllm_core.step_overlap), on CPU and against real scheduled plans."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import gpu

from batchllm_core.step_overlap import DecodeTokenFeed, SampledTokenCopy


def test_sampled_token_copy_round_trip_and_misuse():
    copy = SampledTokenCopy(torch.device("cpu"), capacity=2)
    copy.start(torch.tensor([5, 6, 7], dtype=torch.int64))  # grows past its capacity
    with pytest.raises(RuntimeError, match="never waited"):
        copy.start(torch.tensor([1]))
    first = copy.wait()
    assert first.tolist() == [5, 6, 7] and first.dtype == np.int32
    copy.start(torch.tensor([9], dtype=torch.int32))
    assert copy.wait().tolist() == [9] and first.tolist() == [5, 6, 7]
    with pytest.raises(RuntimeError, match="nothing was started"):
        copy.wait()


def test_feed_gathers_by_sequence_id_and_keeps_unknown_rows():
    feed = DecodeTokenFeed()
    feed.remember(np.array([40, 10, 30]), torch.tensor([400, 100, 300], dtype=torch.int32))
    index = feed.gather_index(np.array([10, 20, 30, 50, 40]))
    assert index.tolist() == [1, -1, 2, -1, 0]
    input_ids = torch.tensor([-1, 22, -1, 55, -1, 99], dtype=torch.int32)  # last row: a prefill row
    feed.fill(input_ids, torch.from_numpy(index))
    assert input_ids.tolist() == [100, 22, 300, 55, 400, 99]
    assert DecodeTokenFeed().gather_index(np.array([1, 2])).tolist() == [-1, -1]


def _check_feed_against_engine(model, device: str):
    """Every decode row of every step must be fed exactly the id sampled for its sequence one step
    earlier, when that step sampled it: the invariant overlapped scheduling relies on."""
    from batchllm_core import LLM, SamplingParams

    llm = LLM(model=model, device=device, kv_cache_memory=64 << 20, max_num_batched_tokens=48)
    feed, checked = DecodeTokenFeed(), [0]
    execute, sample = llm.runner.execute, llm.sampler.sample
    last_seq_ids = []

    def checking_execute(plan):
        num_decode = int(plan.num_decode_seqs)
        index = feed.gather_index(np.asarray(plan.seq_ids)[:num_decode])
        fed = torch.from_numpy(np.asarray(plan.input_ids)[:num_decode].copy()).to(device)
        poisoned = torch.full_like(fed, -7)
        feed.fill(poisoned, torch.from_numpy(index).to(device))
        known = torch.from_numpy(index >= 0).to(device)
        assert torch.equal(poisoned[known], fed[known])
        checked[0] += int(known.sum())
        last_seq_ids[:] = [np.array(plan.sample_seq_ids, np.int64)]
        return execute(plan)

    def remembering_sample(logits, *args, **kwargs):
        out = sample(logits, *args, **kwargs)
        feed.remember(last_seq_ids[0], torch.from_numpy(out.token_ids).to(device))
        return out

    llm.runner.execute, llm.sampler.sample = checking_execute, remembering_sample
    rng = np.random.default_rng(0)
    prefix = rng.integers(10, 250, 60).tolist()
    prompts = [{"prompt_token_ids": prefix + rng.integers(10, 250, 3 + i).tolist()} for i in range(6)]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=6 + i, ignore_eos=True) for i in range(5)]
    params.append(SamplingParams(n=2, temperature=1.0, seed=9, max_tokens=5, ignore_eos=True))
    llm.generate(prompts, params, use_tqdm=False)
    assert checked[0] >= 30


def test_feed_reproduces_the_schedulers_decode_inputs_on_cpu():
    _check_feed_against_engine(None, "cpu")


@gpu
def test_feed_and_async_copy_on_gpu():
    _check_feed_against_engine("llama-1b", "cuda")  # head dim 64: has CUDA kernels
    copy = SampledTokenCopy(torch.device("cuda"))
    ids = torch.arange(5000, device="cuda", dtype=torch.int64) * 3
    copy.start(ids)
    assert (copy.wait() == np.arange(5000) * 3).all()
