"""Piecewise graphs for prefill and mixed steps (batchllm_core.piecewise_graphs).

On the CPU the static piecewise path runs without graphs (``capture=False``): every test here runs
a real scheduled job and compares, step by step, that path's logits with the plain ModelRunner's on
its own model copy and KV cache. The GPU test captures and replays the pieces.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import gpu

from batchllm_core import LLM, SamplingParams
from batchllm_core.cuda_graphs import GraphModelRunner
from batchllm_core.piecewise_graphs import MixedGraphs, token_bucket


def test_token_buckets_bound_steps_with_little_padding():
    for tokens in range(1, 5000):
        bucket = token_bucket(tokens)
        assert bucket >= tokens and bucket >= 16
        assert bucket - tokens < (max(tokens, 16) if tokens <= 256 else 256)
    assert [token_bucket(t) for t in (1, 17, 200, 256, 257, 2048, 2049)] == [16, 32, 256, 256, 512, 2048, 2304]


class _Compare:
    """Every plan through the engine's eager runner (whose logits are sampled) and the graph runner."""

    def __init__(self, reference, graphs: GraphModelRunner, rtol: float):
        self.reference, self.graphs, self.rtol = reference, graphs, rtol
        self.padded_steps = 0

    def execute(self, plan):
        mixed = self.graphs.mixed_graphs
        before = mixed.steps
        expected = self.reference.execute(plan)
        got = self.graphs.execute(plan)
        assert got.shape == expected.shape and bool(torch.isfinite(got).all())
        if mixed.steps > before and token_bucket(len(plan.input_ids)) > len(plan.input_ids):
            self.padded_steps += 1
        if expected.numel():
            error = (got - expected).abs().max().item()
            assert error <= self.rtol * expected.abs().max().item(), f"logits differ by {error}"
        return expected


def _prompts(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    prompts = []
    for group in range(3):  # shared prefixes of different lengths, so that steps mix prefill and decode
        prefix = rng.integers(10, vocab, 30 + 25 * group).tolist()
        prompts += [{"prompt_token_ids": prefix + rng.integers(10, vocab, 3 + 4 * m).tolist()}
                    for m in range(2 + 2 * group)]
    return prompts


def _run_compared(model, device: str, capture, rtol: float, budget: int = 48):
    llm = LLM(model=model, device=device, kv_cache_memory=64 << 20, max_num_batched_tokens=budget,
              cuda_graphs=False, overlap=False)
    llm.model.layer_ops = "kernels"  # the staged forward (on the CPU: the kernels' CPU references)
    graph_model = copy.deepcopy(llm.model)
    graphs = GraphModelRunner(graph_model, llm.config, llm.num_kv_blocks, llm.block_size, llm.device, llm.dtype,
                              max_graphs=4, capture=capture, mixed_max_tokens=budget)
    compare = _Compare(llm.runner, graphs, rtol)
    llm.runner = compare
    prompts = _prompts(llm.config.vocab_size)
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)] * (len(prompts) - 1)
    params.append(SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True))  # cow forks
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(c.token_ids) == 10 for o in outputs for c in o.outputs)
    return compare, graphs


def test_piecewise_static_path_matches_eager_runner_on_cpu():
    compare, graphs = _run_compared(None, "cpu", capture=False, rtol=1e-5)
    mixed = graphs.mixed_graphs
    assert not mixed.capture and mixed.steps >= 5
    assert compare.padded_steps >= 2  # steps padded to their bucket agree too
    assert graphs.decode_graphs.steps >= 3  # decode-only steps still take the decode graphs
    assert len(mixed._buckets) <= mixed.max_graphs


def test_padded_rows_store_nothing_and_real_rows_attend_alone():
    # A bucket's padded rows must not write KV (slot -1) nor change the real rows: run one 5-token
    # prefill padded to 16 and compare the cache and logits with the eager runner's.
    llm = LLM(device="cpu", kv_cache_memory=8 << 20, cuda_graphs=False, overlap=False)
    llm.model.layer_ops = "kernels"
    graphs = GraphModelRunner(copy.deepcopy(llm.model), llm.config, llm.num_kv_blocks, llm.block_size,
                              llm.device, llm.dtype, capture=False)

    expected = llm.runner.execute(_prefill_plan())
    got = graphs.execute(_prefill_plan())
    assert graphs.mixed_graphs.steps == 1 and 16 in graphs.mixed_graphs._buckets
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(graphs.kv_cache, llm.runner.kv_cache, rtol=1e-5, atol=1e-6)
    assert graphs.kv_cache[:, :, 0].abs().sum() == 0  # block 0: where a padded row's slot 0 would go


def test_a_bucket_is_captured_at_its_min_uses_th_step_and_lru_bounded():
    class Runner:
        device = torch.device("cpu")

    class Plan:
        def __init__(self, rows):
            self.input_ids = np.zeros(rows, np.int32)

    mixed = MixedGraphs(Runner(), max_tokens=2048, max_graphs=2, capture=False)
    assert mixed.run_bucket(Plan(100)) == 128  # without capture: the static path at once
    mixed.capture, mixed.min_uses = True, 2  # the rule with capture, buckets without graphs yet
    assert [mixed.run_bucket(Plan(1500)) for _ in range(3)] == [None, 1536, 1536]
    with pytest.raises(ValueError, match="does not fit bucket"):
        MixedGraphs(Runner(), max_tokens=64, capture=False).execute(Plan(40), bucket=32)


def test_can_run_needs_the_staged_forward_and_the_token_limit():
    llm = LLM(device="cpu", kv_cache_memory=8 << 20, cuda_graphs=False, overlap=False)

    class Plan:
        def __init__(self, rows):
            self.input_ids = np.zeros(rows, np.int32)

    mixed = MixedGraphs(llm.runner, max_tokens=64, capture=False)
    assert not mixed.can_run(Plan(8))  # the CPU's torch layer ops: no staged forward
    llm.model.layer_ops = "kernels"
    assert mixed.can_run(Plan(8)) and mixed.can_run(Plan(64))
    assert not mixed.can_run(Plan(65)) and not mixed.can_run(Plan(0))


@gpu
def test_piecewise_graphs_match_eager_runner_on_gpu():
    # llama-1b (head dim 64, the kernels' smallest); bf16 and padded GEMM shapes: a bf16 tolerance.
    compare, graphs = _run_compared("llama-1b", "cuda", capture=None, rtol=0.05)
    mixed = graphs.mixed_graphs
    assert mixed.capture and mixed.captures >= 1 and mixed.replays >= 2
    # Every step the piecewise path took was its bucket's capture (the warm-up's result) or a replay.
    assert mixed.steps == mixed.captures + mixed.replays and mixed.capture_s > 0


def test_environment_switch_runs_mixed_steps_eagerly(monkeypatch):
    llm = LLM(device="cpu", kv_cache_memory=8 << 20, cuda_graphs=False, overlap=False)
    make = lambda: GraphModelRunner(llm.model, llm.config, llm.num_kv_blocks, llm.block_size, llm.device,  # noqa: E731
                                    llm.dtype, capture=False)
    assert make().mixed_graphs is not None
    monkeypatch.setenv("BATCHLLM_MIXED_GRAPHS", "0")  # the A/B switch of bench/device_check.sh
    assert make().mixed_graphs is None


@pytest.mark.parametrize("options", [{}, {"qkv_bias": True}, {"qk_norm": True, "o_bias": True}],
                         ids=["llama", "qkv-bias", "qk-norm"])
def test_staged_forward_into_one_qkv_buffer_matches_the_forward(options):
    # The pieces compute every layer's q/k/v projection into one buffer (torch.mm / addmm with out=):
    # outside a step (dense attention) that forward equals the model's, bias and q/k norms included.
    from batchllm_core.loader import build_random_model
    from batchllm_core.models.config import ModelConfig

    config = ModelConfig.from_name("tiny").replace(**options)
    model = build_random_model(config, seed=1, dtype=torch.float32, device="cpu").model
    model.layer_ops = "kernels"
    for name, param in model.named_parameters():  # biases are zero-initialised: make them count
        if name.endswith(".bias"):
            param.data.uniform_(-0.5, 0.5)
    ids, positions = torch.tensor([5, 9, 17, 3, 11]), torch.arange(5)
    with torch.inference_mode():  # as the runner (mm with out= takes no autograd)
        _check_staged_forward(model, config, ids, positions)


def _check_staged_forward(model, config, ids, positions):
    expected = model(ids, positions)
    qkv = torch.full((5, (config.num_heads + 2 * config.num_kv_heads) * config.head_dim), float("nan"))
    stages = model.forward_staged(ids, positions, qkv_out=qkv)
    try:
        layer, q, k, v = next(stages)
        while True:
            # the layer's q/k/v are views of the shared buffer (q and k normed into new tensors by q/k norms)
            assert v.untyped_storage().data_ptr() == qkv.data_ptr()
            assert config.qk_norm or q.data_ptr() == qkv.data_ptr()
            layer, q, k, v = stages.send(model.layers[layer].attention.attend_stored(q, k, v))
    except StopIteration as done:
        torch.testing.assert_close(done.value, expected, rtol=1e-5, atol=1e-5)


def test_overlapped_loop_through_the_pieces_matches_the_serial_eager_loop_on_cpu():
    # Overlapped steps feed their decode rows' input ids from the previous step's samples on the
    # device; a mixed step on the piecewise path must write them into its bucket's static ids.
    rng = np.random.default_rng(2)
    prefix = rng.integers(10, 250, 50).tolist()
    prompts = [{"prompt_token_ids": prefix + rng.integers(10, 250, 4 + 3 * i).tolist()} for i in range(10)]
    params = [SamplingParams(temperature=0 if i % 2 else 1.0, seed=i, max_tokens=5 + i, ignore_eos=True)
              for i in range(10)]
    runs = []
    for overlap, pieces in ((False, False), (True, True)):
        llm = LLM(device="cpu", kv_cache_memory=64 << 20, max_num_batched_tokens=40, cuda_graphs=False,
                  overlap=overlap)
        llm.model.layer_ops = "kernels"
        if pieces:
            llm.runner = GraphModelRunner(llm.model, llm.config, llm.num_kv_blocks, llm.block_size, llm.device,
                                          llm.dtype, capture=False, mixed_max_tokens=40)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        runs.append([c.token_ids for o in outputs for c in o.outputs])
    assert runs[1] == runs[0]
    assert llm.runner.mixed_graphs.steps >= 5 and llm.runner.decode_graphs.steps >= 3


def test_a_failed_capture_warns_once_and_runs_the_step_without_graphs():
    # A capture can fail on a GPU (an operation capture refuses, out of memory): the step must still
    # come out right, from the same static path without graphs, and later steps too.
    llm = LLM(device="cpu", kv_cache_memory=8 << 20, cuda_graphs=False, overlap=False)
    llm.model.layer_ops = "kernels"
    graphs = GraphModelRunner(copy.deepcopy(llm.model), llm.config, llm.num_kv_blocks, llm.block_size,
                              llm.device, llm.dtype, capture=False)
    mixed = graphs.mixed_graphs
    mixed.capture = True  # as on a GPU, with a capture that fails

    def refuse(entry, context):
        raise RuntimeError("operation not permitted when stream is capturing")

    mixed._capture = refuse
    plan = _prefill_plan()
    expected = llm.runner.execute(plan)
    assert mixed.run_bucket(plan) is None  # its first step: eager (min_uses 2)
    with pytest.warns(RuntimeWarning, match="capture of prefill and mixed steps failed"):
        got = mixed.execute(plan, bucket=mixed.run_bucket(plan))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not mixed.capture and mixed.captures == 0 and mixed.capture_s > 0
    assert mixed.run_bucket(plan) == 16  # from now on the static path, without graphs


def test_capture_records_one_graph_a_piece_and_keeps_each_layers_stop(monkeypatch):
    # The capture's driving of the staged forward, without a GPU: recording and the side stream faked
    # (each piece runs once, eagerly), the warm-up the step itself. L + 1 graphs, L stops (layer i's
    # q, k, v: views of the bucket's one q/k/v buffer), the last piece's output kept as the hidden.
    import contextlib

    import batchllm_core.cuda_graphs as cuda_graphs

    recorded = []

    def fake_record(graph, pool, fn):
        recorded.append(graph)
        return fn()

    monkeypatch.setattr(cuda_graphs, "record", fake_record)
    monkeypatch.setattr(cuda_graphs, "warm_up_for_capture", lambda runner, forward: (None, forward()))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    llm = LLM(device="cpu", kv_cache_memory=8 << 20, cuda_graphs=False, overlap=False)
    llm.model.layer_ops = "kernels"
    graphs = GraphModelRunner(copy.deepcopy(llm.model), llm.config, llm.num_kv_blocks, llm.block_size,
                              llm.device, llm.dtype, capture=False)
    mixed = graphs.mixed_graphs
    mixed.capture = True
    plan = _prefill_plan()
    expected = llm.runner.execute(plan)
    got = mixed.execute(plan, bucket=16)  # the capture step: the warm-up's result
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    entry = mixed._buckets[16]
    layers = llm.config.num_layers
    assert len(recorded) == len(entry.graphs) == layers + 1 and mixed.captures == 1
    assert [stop[0] for stop in entry.stops] == list(range(layers))
    assert all(stop[3].untyped_storage().data_ptr() == entry.qkv.data_ptr() for stop in entry.stops)
    assert entry.hidden.shape == (16, llm.config.hidden_size)


def _prefill_plan():
    """One 5-token prefill into block 1 (slots 16-20), its last row sampled."""
    class Plan:
        input_ids = np.array([11, 12, 13, 14, 15], np.int32)
        positions = np.arange(5, dtype=np.int32)
        slot_mapping = np.arange(16, 21, dtype=np.int64)
        query_start = np.array([0, 5], np.int32)
        context_lens = np.array([5], np.int32)
        block_tables = np.array([[1]], np.int32)
        num_decode_seqs = 0
        sample_rows = np.array([4], np.int32)

    return Plan()
