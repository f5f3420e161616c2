"""Decode-step CUDA graphs (batchllm_core.cuda_graphs) and their static step buffers (step_upload).

On CPU the graph runner runs its padded static path eagerly (``capture=False``): every test here
compares it, step by step, with the plain ModelRunner on the plans of a real scheduled job. The GPU
test does the same with graphs captured and replayed.
"""
from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch

from conftest import gpu

from batchllm_core import LLM, SamplingParams
from batchllm_core.cuda_graphs import DecodeGraphs, GraphKey, GraphModelRunner, batch_bucket, pad_decode_step
from batchllm_core.step_upload import PackedLayout, StaticUpload


def test_batch_buckets_bound_rows_with_little_padding():
    for rows in range(1, 1100):
        bucket = batch_bucket(rows)
        assert bucket >= rows
        assert bucket - rows < max(rows, 16) if rows <= 16 else bucket - rows < (16 if rows <= 256 else 64)
    assert [batch_bucket(r) for r in (1, 3, 9, 17, 250, 257, 1000)] == [1, 4, 16, 32, 256, 320, 1024]


def test_static_upload_keeps_addresses_and_checks_shapes():
    layout = PackedLayout([("a", np.int32, (3,)), ("b", np.int64, (2, 2)), ("c", np.int32, (0,))])
    assert all(spec.offset % 16 == 0 for spec in layout.fields.values())
    upload = StaticUpload(layout, torch.device("cpu"))
    first = upload.upload({"a": [1, 2, 3], "b": np.arange(4).reshape(2, 2), "c": np.zeros(0, np.int32)})
    pointers = {name: t.data_ptr() for name, t in first.items()}
    second = upload.upload({"a": [7, 8, 9], "b": -np.arange(4).reshape(2, 2), "c": np.zeros(0, np.int32)})
    assert {name: t.data_ptr() for name, t in second.items()} == pointers
    assert second["a"].tolist() == [7, 8, 9] and second["b"].tolist() == [[0, -1], [-2, -3]]
    assert second["b"].dtype == torch.int64 and second["b"].is_contiguous()
    with pytest.raises(ValueError, match="field 'a' has shape"):
        upload.upload({"a": [1, 2], "b": np.zeros((2, 2)), "c": np.zeros(0, np.int32)})


def test_padding_keeps_real_rows_and_neutralizes_the_rest():
    host = {"input_ids": np.array([5, 6, 7], np.int32), "positions": np.array([10, 11, 12], np.int32),
            "slot_mapping": np.array([40, 41, 42], np.int64)}
    levels = {"prefix_kv_indptr": np.array([0, 2], np.int32), "prefix_kv_blocks": np.array([3, 4], np.int32),
              "prefix_kv_lens": np.array([20], np.int32), "prefix_q_range": np.array([[0, 3]], np.int32),
              "suffix_block_tables": np.array([[1], [2], [5]], np.int32),
              "suffix_kv_lens": np.array([1, 2, 3], np.int32)}
    key = GraphKey.of(levels, 3, block_size=16)
    assert (key.rows, key.prefixes, key.prefix_rows, key.prefix_keys) == (4, 1, 4, 64)
    padded = pad_decode_step(host, levels, key)
    assert padded["slot_mapping"].tolist() == [40, 41, 42, -1]
    assert padded["suffix_kv_lens"].tolist() == [1, 2, 3, 1]
    assert padded["suffix_block_tables"][:, 0].tolist() == [1, 2, 5, 0]
    assert padded["prefix_q_range"].tolist() == [[0, 3]]
    assert padded["suffix_split"].tolist() == [1, 1 << 30, 4]  # unsplit: every row, padded ones too
    for name, spec in key.layout().fields.items():
        assert padded[name].shape == spec.shape, name
    assert padded["prefix_split"].tolist() == [1, 64, 4]  # one chunk of the key's keys, its rows
    # The step's own splits (ops.cascade_suffix_split, cascade_prefix_split); the suffix split, the
    # real rows only.
    own = pad_decode_step(host, levels, key, (4, 256, 3), (2, 64, 3))
    assert own["suffix_split"].tolist() == [4, 256, 3] and own["prefix_split"].tolist() == [2, 64, 3]


class _Compare:
    """Runs every plan through the eager runner (whose logits the engine samples) and the graph
    runner (its own model copy and KV cache), and checks that their logits agree."""

    def __init__(self, reference, graphs: GraphModelRunner, rtol: float):
        self.reference, self.graphs, self.rtol = reference, graphs, rtol
        self.graph_steps = 0

    def execute(self, plan):
        graph_path = self.graphs.decode_graphs.can_run(plan)
        expected = self.reference.execute(plan)
        got = self.graphs.execute(plan)
        assert got.shape == expected.shape and bool(torch.isfinite(got).all())
        if expected.numel() == 0:  # a step that samples nothing (a prefill chunk mid-prompt)
            return expected
        error = (got - expected).abs().max().item()
        assert error <= self.rtol * expected.abs().max().item(), f"logits differ by {error}"
        self.graph_steps += graph_path
        return expected


def _shared_prefix_prompts(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    prompts = []
    for group in range(3):  # 3 groups of different sizes and prefix lengths, a tree under group 0
        prefix = rng.integers(10, vocab, 40 + 30 * group).tolist()
        for member in range(2 + 3 * group):
            prompts.append({"prompt_token_ids": prefix + rng.integers(10, vocab, 5 + member).tolist()})
    return prompts


def _run_compared(model, device: str, capture, rtol: float):
    from batchllm_core import LLM, SamplingParams

    # The engine's own runner is the eager reference, and steps are not overlapped (the comparing
    # runner takes plans alone): both are on by default on a CUDA device.
    llm = LLM(model=model, device=device, kv_cache_memory=64 << 20, max_num_batched_tokens=64, cuda_graphs=False,
              overlap=False)
    model = copy.deepcopy(llm.model)
    graphs = GraphModelRunner(model, llm.config, llm.num_kv_blocks, llm.block_size, llm.device, llm.dtype,
                              max_graphs=4, capture=capture)
    graphs.decode_graphs.suffix_headroom_blocks = 1  # widened keys (as LLM sets per job): 12 tokens, block 16
    compare = _Compare(llm.runner, graphs, rtol)
    llm.runner = compare
    prompts = _shared_prefix_prompts(llm.config.vocab_size)
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * (len(prompts) - 1)
    params.append(SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True))  # cow forks
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(c.token_ids) == 12 for o in outputs for c in o.outputs)
    return compare, graphs


def test_padded_static_decode_path_matches_eager_runner_on_cpu():
    compare, graphs = _run_compared(None, "cpu", capture=False, rtol=1e-5)
    assert compare.graph_steps >= 5 and graphs.decode_graphs.steps == compare.graph_steps
    assert graphs.decode_graphs.dominated >= 1  # steps padded to a larger key's buffers agree too
    assert len(graphs.decode_graphs._entries) <= 4  # LRU bound held


def test_can_run_rejects_mixed_and_levelless_steps():
    class Plan:
        input_ids = np.zeros(3, np.int32)
        num_decode_seqs = 2
        prefix_kv_indptr = np.zeros(1, np.int32)
        sample_rows = np.arange(3, dtype=np.int32)

    class FakeRunner:
        device = torch.device("cpu")
        use_cascade = True

    graphs = DecodeGraphs(FakeRunner(), capture=False)
    assert not graphs.can_run(Plan())  # a prefill row
    Plan.num_decode_seqs = 3
    assert graphs.can_run(Plan())
    Plan.sample_rows = np.array([0, 0, 1, 2], np.int32)  # n > 1 draws from one row
    assert not graphs.can_run(Plan())
    Plan.sample_rows = np.arange(3, dtype=np.int32)
    Plan.prefix_kv_indptr = np.zeros(0, np.int32)
    assert not graphs.can_run(Plan())


class _FakeRunner:
    device = torch.device("cpu")
    use_cascade = True


def _key(rows, prefixes=1, suffix_width=16):
    return GraphKey(rows=rows, prefixes=prefixes, prefix_rows=min(rows, 64), prefix_keys=1024,
                    prefix_blocks=64, suffix_width=suffix_width)


def test_a_key_is_captured_at_its_min_uses_th_step_or_runs_padded_to_a_larger_graph():
    # A capture costs a warm-up forward (the step's result), the recording and the instantiation. A
    # key is captured at its min_uses-th step (2 here: the first runs eagerly), unless a captured key
    # dominates it (every dimension at least as large): then it replays that graph padded until the
    # padding has lost what a capture costs. A small ridge here, so that padding costs.
    key = _key
    graphs = DecodeGraphs(_FakeRunner(), capture=False, ridge_rows=8, capture_cost_steps=4, min_uses=2)
    assert graphs.run_key(key(16)) == key(16)  # no capture: the padded path at once (what CPU tests check)
    graphs.capture = True
    assert [graphs.run_key(key(32)) for _ in range(3)] == [None, key(32), key(32)]
    graphs._entries[key(32)] = types.SimpleNamespace(graph=object())  # captured
    assert graphs.run_key(key(32)) == key(32)
    # 24 rows padded to 32 lose 8 a step; a capture costs 4 x 24 = 96: the 12th step captures it.
    assert [graphs.run_key(key(24)) for _ in range(12)] == [key(32)] * 11 + [key(24)]
    # 6 rows cost as much as the ridge's 8: they lose 24 a step against a capture of 32 (2nd step).
    assert [graphs.run_key(key(6)) for _ in range(2)] == [key(32), key(6)]
    # ...but never before the min_uses-th step, whatever the loss.
    patient = DecodeGraphs(_FakeRunner(), capture=False, ridge_rows=1, capture_cost_steps=0, min_uses=3)
    patient.capture = True
    patient._entries[key(64)] = types.SimpleNamespace(graph=object())
    assert [patient.run_key(key(2)) for _ in range(3)] == [key(64), key(64), key(2)]
    # Not dominated: a wider suffix table, or more prefixes.
    assert graphs.run_key(key(16, suffix_width=32)) is None
    assert graphs.run_key(key(16, prefixes=2)) is None
    # The smallest dominating graph wins.
    graphs._entries[key(64)] = types.SimpleNamespace(graph=object())
    assert graphs.run_key(key(30)) == key(32)
    once = DecodeGraphs(_FakeRunner(), capture=False)  # the default: captured at the first step
    once.capture = True
    assert once.run_key(key(32)) == key(32)


def test_steps_below_the_ridge_replay_one_graph_padded_for_good():
    # W5's decode batch shrinks from 128 rows to 1 as sequences finish: below the ridge (the rows at
    # which the step's GEMMs stop being bound by reading the weights) padding to the 128-row graph
    # costs nothing, so no smaller key is ever captured (a halving rule captured 8 keys there).
    graphs = DecodeGraphs(_FakeRunner(), capture=False)  # the default ridge: 256 rows
    graphs.capture = True
    graphs._entries[_key(128)] = types.SimpleNamespace(graph=object())
    for rows in (96, 64, 32, 8, 1):
        assert [graphs.run_key(_key(rows)) for _ in range(100)] == [_key(128)] * 100, rows
    # Above the ridge the loss counts: 1,024 rows for a 384-row step lose 640 a step, a capture
    # of the 384-row key costs 4 x 384: the 3rd step captures it.
    graphs._entries[_key(1024)] = types.SimpleNamespace(graph=object())
    assert [graphs.run_key(_key(384)) for _ in range(3)] == [_key(1024)] * 2 + [_key(384)]


@gpu
@pytest.mark.parametrize("launch", ["separate", "owned"])
def test_captured_graphs_match_eager_runner_on_gpu(launch, monkeypatch):
    # llama-1b: the smallest named shape the CUDA kernels are built for (head dim 64); bf16, and
    # padded rows change the GEMM shapes, hence a bf16-sized tolerance. Under the default cascade
    # launches and the owned tiles (BATCHLLM_CASCADE_LAUNCH=owned: a graph's padded rows and device
    # split plans reach that kernel too).
    monkeypatch.setenv("BATCHLLM_CASCADE_LAUNCH", launch)
    compare, graphs = _run_compared("llama-1b", "cuda", capture=None, rtol=0.05)
    decode = graphs.decode_graphs
    assert compare.graph_steps >= 5 and decode.captures >= 1
    # Every decode step took the graph path (a key is captured at its first step): each replays, but
    # the capture's own (it returns its warm-up's result).
    assert decode.replays + decode.captures == decode.steps == compare.graph_steps and decode.capture_s > 0


def test_llm_cuda_graphs_option_warns_and_runs_eagerly_on_cpu():
    with pytest.warns(UserWarning, match=r"cuda_graphs=True\) needs a CUDA device"):
        llm = LLM(device="cpu", kv_cache_memory=1 << 22, cuda_graphs=True)
    assert not isinstance(llm.runner, GraphModelRunner)
    out = llm.generate("hello", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


@gpu
def test_llm_cuda_graphs_option_replays_decode_steps_on_gpu():
    llm = LLM(model="llama-1b", device="cuda", cuda_graphs=True, kv_cache_memory=1 << 30)
    assert isinstance(llm.runner, GraphModelRunner)
    prompts = _shared_prefix_prompts(llm.config.vocab_size)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 16 for o in outputs)
    assert llm.runner.decode_graphs.replays >= 10


def test_a_captured_key_is_widened_for_the_rows_growth():
    # W1's decode rows own 5 blocks at their first decode step (table width 8) and 12 at their last:
    # with 8 blocks of headroom (max_tokens 128), the key captured at width 8 is 16 wide, and the
    # steps past 8 blocks replay it instead of capturing a second graph.
    graphs = DecodeGraphs(_FakeRunner(), capture=False)
    graphs.capture = True
    graphs.suffix_headroom_blocks = 8
    narrow = _key(256, suffix_width=8)
    assert graphs.run_key(narrow, width=8) == _key(256, suffix_width=16)
    graphs._entries[_key(256, suffix_width=16)] = types.SimpleNamespace(graph=object())
    assert graphs.run_key(_key(256, suffix_width=16), width=12) == _key(256, suffix_width=16)
    assert graphs.run_key(narrow, width=8) == _key(256, suffix_width=16)  # dominated: padded
    # At most twice the key's own bucket, whatever the headroom; none without a width or headroom.
    graphs.suffix_headroom_blocks = 1000
    assert graphs.grown(_key(64, suffix_width=32), 20) == _key(64, suffix_width=64)
    assert graphs.grown(_key(64, suffix_width=32), None) == _key(64, suffix_width=32)
    graphs.suffix_headroom_blocks = 0
    assert graphs.grown(_key(64, suffix_width=32), 20) == _key(64, suffix_width=32)


def test_llm_gives_the_graphs_each_jobs_output_headroom():
    llm = LLM(device="cpu", kv_cache_memory=1 << 22, max_num_batched_tokens=64, cuda_graphs=False, overlap=False)
    graphs = GraphModelRunner(llm.model, llm.config, llm.num_kv_blocks, llm.block_size, llm.device, llm.dtype,
                              capture=False)
    llm.runner = graphs
    prompts = [{"prompt_token_ids": [5 + i] * (20 + i)} for i in range(4)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (3, 40, 7, 33)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [3, 40, 7, 33]
    assert graphs.decode_graphs.suffix_headroom_blocks == -(-40 // llm.block_size)
    assert graphs.decode_graphs.steps > 0


@gpu
def test_programmatic_dependent_launch_gives_the_same_tokens_on_gpu(monkeypatch):
    # BATCHLLM_PDL=1 (cuda_common.cuh): each of our kernels may start while the one before it
    # finishes, and waits for it before reading what it wrote. A read before that wait (a race)
    # would show as other greedy tokens than plain launches give: in the decode graphs (captured
    # with the attribute) and in the mixed steps' pieces and eager attention. Seeded random weights:
    # both LLMs have the same model.
    prompts = _shared_prefix_prompts(32000)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    tokens = {}
    for pdl in ("0", "1"):
        monkeypatch.setenv("BATCHLLM_PDL", pdl)
        llm = LLM(model="llama-1b", device="cuda", cuda_graphs=True, kv_cache_memory=1 << 30)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        tokens[pdl] = [list(o.outputs[0].token_ids) for o in outputs]
        assert llm.runner.decode_graphs.replays >= 10
        del llm
        torch.cuda.empty_cache()
    assert tokens["1"] == tokens["0"]
