"""The LLM API end to end on CPU: prompt forms, input order, batch invariance under every policy
(also under preemption), stop strings, stop token ids, min_tokens, n > 1, logprobs, seeds,
num_cached_tokens and requests that fail alone."""
import random
import warnings

import numpy as np
import pytest
import torch

import batchllm_core.engine_setup as engine_setup
from batchllm_core import LLM, CompletionOutput, RequestOutput, SamplingParams
from hf_checkpoints import build_checkpoint

POLICIES = ("batchllm", "fcfs-lru", "no-share")
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _kv_bytes(llm_or_config, blocks, block_size=16):
    config = getattr(llm_or_config, "config", llm_or_config)
    return config.kv_bytes_per_token(torch.float32) * block_size * blocks


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run faster on one thread, and much faster on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LLM(kv_cache_memory=_kv_bytes(_tiny_config(), 512))


def _tiny_config():
    from batchllm_core.models.tiny import tiny_config
    return tiny_config()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("engine_llama")
    build_checkpoint("llama", directory, seed=7)
    return str(directory)


@pytest.fixture(scope="module")
def llama(llama_dir):
    return LLM(model=llama_dir, kv_cache_memory=1 << 22)


def _shared_prefix_prompts(count=100, seed=0, bos=256):
    """Token-id prompts in a two-level prefix tree (4 x 2 shared prefixes) with unique suffixes."""
    rng = random.Random(seed)
    letters = lambda n: [rng.randrange(32, 127) for _ in range(n)]  # noqa: E731 - printable bytes
    roots = [[bos] + letters(31) for _ in range(4)]
    branches = [[root + letters(16) for _ in range(2)] for root in roots]
    prompts = []
    for i in range(count):
        prefix = branches[i % 4][(i // 4) % 2]
        prompts.append({"prompt_token_ids": prefix + letters(rng.randrange(1, 12))})
    rng.shuffle(prompts)
    return prompts


# ------------------------------------------------------------------------------------ API basics
def test_embedded_model_warns_once(monkeypatch):
    monkeypatch.setattr(engine_setup, "_warned_noise", False)
    with pytest.warns(UserWarning, match="noise"):
        LLM(kv_cache_memory=_kv_bytes(_tiny_config(), 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LLM(kv_cache_memory=_kv_bytes(_tiny_config(), 8))


def test_prompt_forms_and_input_order(tiny):
    assert isinstance(tiny.generate("hello", GREEDY, use_tqdm=False)[0], RequestOutput)
    prompts = ["abc", {"prompt_token_ids": [256, 120, 121]}, "a much longer prompt " * 5, "z"]
    outs = tiny.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.request_id for o in outs] == ["0", "1", "2", "3"]
    assert outs[0].prompt == "abc" and outs[0].prompt_token_ids == tiny.get_tokenizer().encode("abc")
    assert outs[1].prompt is None and outs[1].prompt_token_ids == [256, 120, 121]
    for out, prompt in zip(outs, prompts):
        single = tiny.generate(prompt, GREEDY, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == single.outputs[0].token_ids
        assert isinstance(out.outputs[0], CompletionOutput) and len(out.outputs[0].token_ids) == 8
        assert out.outputs[0].finish_reason == "length" and out.finished


def test_params_per_prompt(tiny):
    outs = tiny.generate(["a", "b"], [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                                      SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 5]
    with pytest.raises(ValueError, match="sampling_params"):
        tiny.generate(["a", "b"], [GREEDY], use_tqdm=False)
    with pytest.raises(ValueError, match="prompts"):
        tiny.generate([3], GREEDY, use_tqdm=False)


def test_generate_stream_yields_every_index(tiny):
    prompts = [f"prompt {i}" for i in range(7)]
    seen = dict(tiny.generate_stream(prompts, GREEDY))
    assert sorted(seen) == list(range(7))
    assert all(seen[i].prompt == prompts[i] for i in range(7))


def test_chat_applies_the_template(tiny):
    conversation = [{"role": "user", "content": "hi there"}]
    out = tiny.chat(conversation, GREEDY, use_tqdm=False)[0]
    tokenizer = tiny.get_tokenizer()
    assert out.prompt == tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
    assert out.prompt_token_ids == tokenizer.encode(out.prompt, add_special_tokens=False)
    assert len(tiny.chat([conversation, conversation], GREEDY, use_tqdm=False)) == 2


def test_progress_bar(tiny, capsys):
    tiny.generate(["a", "b", "c"], GREEDY, use_tqdm=True)
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "3/3" in err and "toks/s" in err


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_invalid_constructor_arguments():
    with pytest.raises(ValueError, match="policy"):
        LLM(policy="lru")
    with pytest.raises(ValueError, match="block_size"):
        LLM(block_size=0)
    with pytest.raises(ValueError, match="kv_cache_memory"):
        LLM(kv_cache_memory=1)
    with pytest.raises(ValueError, match="device"):
        LLM(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            LLM(device="cuda")


# ------------------------------------------------------------------------------------ exactness
@pytest.fixture(scope="module")
def invariance_job(llama_dir):
    """100 prompts sharing prefixes (greedy or seeded), and the outputs of a sample of them run alone.

    On the random Llama checkpoint: its logits are peaked (the tiny model's are nearly flat, so its
    greedy choices are near-ties that the last float bit of a differently blocked matmul can flip;
    that would test BLAS, not the engine).
    """
    prompts = _shared_prefix_prompts(bos=0)
    # Odd prompts sample with their own seed: their draws must not depend on the batch either.
    params = [GREEDY if i % 2 == 0 else SamplingParams(temperature=0.9, top_k=50, seed=1000 + i, max_tokens=8,
                                                       ignore_eos=True) for i in range(len(prompts))]
    sample = list(range(0, 100, 9))
    llm = LLM(model=llama_dir, kv_cache_memory=1 << 20, policy="no-share")
    alone = {i: llm.generate(prompts[i], params[i], use_tqdm=False)[0].outputs[0].token_ids for i in sample}
    return llama_dir, _kv_bytes(llm, 1), prompts, params, alone, {}


@pytest.mark.parametrize("policy", POLICIES)
def test_batch_invariance_under_every_policy_and_preemption(policy, invariance_job):
    model_dir, bytes_per_block, prompts, params, alone, batch_results = invariance_job
    # 256 blocks hold the whole job at once; 12 blocks (192 tokens) about three requests.
    for blocks in (256, 12):
        llm = LLM(model=model_dir, kv_cache_memory=bytes_per_block * blocks, policy=policy)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        for i, expected in alone.items():
            assert got[i] == expected, f"{policy}, {blocks} blocks: prompt {i} differs from its run alone"
        # Every policy and capacity gives every prompt the same tokens.
        reference = batch_results.setdefault("tokens", got)
        assert got == reference, f"{policy}, {blocks} blocks: outputs differ from the first batch run"
        stats = llm.last_stats
        assert stats["peak_kv_blocks"] <= blocks
        if blocks == 12 and policy != "batchllm":
            # Streaming-style admission overcommits a small pool: sequences are preempted and recomputed.
            # (batchllm admits by projected memory and should not need to.)
            assert stats["preemptions"] > 0, stats


def test_num_cached_tokens_counts_shared_prefix(tiny):
    shared = [256] + [65 + i % 26 for i in range(63)]
    prompts = [{"prompt_token_ids": shared + [48 + i, 49, 50]} for i in range(6)]
    outs = tiny.generate(prompts, GREEDY, use_tqdm=False)
    # The 64-token shared prefix is 4 full blocks, computed once for the whole group.
    assert all(o.num_cached_tokens == 64 for o in outs), [o.num_cached_tokens for o in outs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        no_share = LLM(kv_cache_memory=_kv_bytes(_tiny_config(), 64), policy="no-share")
    assert all(o.num_cached_tokens == 0 for o in no_share.generate(prompts, GREEDY, use_tqdm=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lru = LLM(kv_cache_memory=_kv_bytes(_tiny_config(), 64), policy="fcfs-lru")
    cached = [o.num_cached_tokens for o in lru.generate(prompts, GREEDY, use_tqdm=False)]
    # The first request fills the LRU prefix cache; the scheduler counts the same hits.
    assert cached[0] == 0 and sum(cached) == lru.last_stats["cached_prefix_tokens"] > 0


# ------------------------------------------------------------------------------------ stopping
def test_stop_token_ids(llama):
    prompt = "Question: what is"
    free = llama.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    ids = free.outputs[0].token_ids
    stop_id = ids[4]
    first = ids.index(stop_id)
    out = llama.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_stop_strings_truncate_text(llama):
    prompt = "Once upon a time"
    free = llama.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0]
    text = free.text
    # A two-character stop string from the middle of the output, made of whole characters.
    start = next(i for i in range(len(text) // 3, len(text) - 1) if "\ufffd" not in text[i:i + 2])
    stop = text[start:start + 2]
    out = llama.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=["@@@", stop]),
                         use_tqdm=False)[0].outputs[0]
    assert out.text == text[:text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == free.token_ids[:len(out.token_ids)] and len(out.token_ids) < 16


def test_min_tokens_masks_stop_ids(llama):
    prompt = "Question: what is"
    free = llama.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    stop_id = free.outputs[0].token_ids[0]
    out = llama.generate(prompt, SamplingParams(temperature=0, max_tokens=8, min_tokens=5, ignore_eos=True,
                                                stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 5 and stop_id not in out.token_ids[:5]
    assert stop_id not in out.token_ids[:-1]
    assert out.finish_reason == ("stop" if out.token_ids[-1] == stop_id else "length")


def test_eos_stops_unless_ignored(tiny):
    eos = tiny.eos_token_ids
    params = SamplingParams(temperature=1.5, max_tokens=64, seed=3)
    outs = tiny.generate([f"x{i}" for i in range(30)], params, use_tqdm=False)
    for out in outs:
        c = out.outputs[0]
        ended_on_eos = c.token_ids[-1] in eos
        assert c.finish_reason == ("stop" if ended_on_eos else "length")
        assert not any(t in eos for t in c.token_ids[:-1])


# ------------------------------------------------------------------------------------ sampling
def test_n_samples(tiny):
    out = tiny.generate("abc", SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=1, ignore_eos=True),
                        use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    greedy = tiny.generate("abc", SamplingParams(n=3, temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in greedy.outputs}) == 1
    assert greedy.outputs[0].token_ids == tiny.generate("abc", SamplingParams(temperature=0, max_tokens=6,
                                                        ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids


def test_logprobs_and_cumulative_logprob(tiny):
    out = tiny.generate("hello", SamplingParams(temperature=0.8, max_tokens=6, logprobs=3, seed=2, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 6
    total = 0.0
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and 3 <= len(entry) <= 4
        assert all(v <= 0 for v in entry.values())
        total += entry[token]
    assert out.cumulative_logprob == pytest.approx(total, rel=1e-5)
    greedy = tiny.generate("hello", SamplingParams(temperature=0, max_tokens=4, logprobs=2), use_tqdm=False)[0]
    for token, entry in zip(greedy.outputs[0].token_ids, greedy.outputs[0].logprobs):
        assert entry[token] == max(entry.values())
    assert tiny.generate("hello", GREEDY, use_tqdm=False)[0].outputs[0].logprobs is None
    only_sampled = tiny.generate("hello", SamplingParams(max_tokens=3, logprobs=0), use_tqdm=False)[0].outputs[0]
    assert [list(entry) for entry in only_sampled.logprobs] == [[t] for t in only_sampled.token_ids]


def test_seeded_request_is_batch_independent(tiny):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    alone = tiny.generate("seeded prompt", seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.2, max_tokens=7, ignore_eos=True)] * 12
    prompts = [f"other {i}" for i in range(12)]
    outs = tiny.generate(prompts[:5] + ["seeded prompt"] + prompts[5:], others[:5] + [seeded] + others[5:],
                         use_tqdm=False)
    assert outs[5].outputs[0].token_ids == alone
    different = tiny.generate("seeded prompt", SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=99,
                                                              ignore_eos=True), use_tqdm=False)[0]
    assert different.outputs[0].token_ids != alone


def test_unseeded_requests_follow_the_llm_seed():
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = [LLM(kv_cache_memory=_kv_bytes(_tiny_config(), 64), seed=s).generate(["a", "b"], params, use_tqdm=False)
                for s in (5, 5, 6)]
    tokens = [[o.outputs[0].token_ids for o in run] for run in runs]
    assert tokens[0] == tokens[1] and tokens[0] != tokens[2]


# ------------------------------------------------------------------------------------ failures
def test_requests_fail_alone(tiny):
    too_long = SamplingParams(temperature=0, max_tokens=tiny.max_model_len)
    outs = tiny.generate(["ok", "too long", {"prompt_token_ids": []}, {"prompt_token_ids": [999999]}, "fine"],
                         [GREEDY, too_long, GREEDY, GREEDY, GREEDY], use_tqdm=False)
    assert outs[0].error is None and len(outs[0].outputs[0].token_ids) == 8
    assert outs[4].error is None and len(outs[4].outputs[0].token_ids) == 8
    assert "context length" in outs[1].error
    assert "empty" in outs[2].error
    assert "token ids" in outs[3].error
    for out in outs[1:4]:
        assert [c.finish_reason for c in out.outputs] == ["error"] and out.outputs[0].token_ids == []


def test_prompt_token_ids_as_arrays_and_malformed_ones(tiny):
    """Token ids may come as a numpy array (any integer dtype); ids that are not a flat list of
    integers (floats, bools, nesting) fail that request alone, named; outputs hold Python ints."""
    ids = [256, 120, 121]
    outs = tiny.generate([{"prompt_token_ids": np.array(ids, np.int16)}, {"prompt_token_ids": [1.5, 2.0]},
                          {"prompt_token_ids": [[1, 2], [3]]}, {"prompt_token_ids": [True, False]},
                          {"prompt_token_ids": ids}], GREEDY, use_tqdm=False)
    assert outs[0].error is None and outs[0].prompt_token_ids == ids
    assert type(outs[0].prompt_token_ids[0]) is int and type(outs[4].prompt_token_ids[0]) is int
    assert outs[0].outputs[0].token_ids == outs[4].outputs[0].token_ids
    for out in outs[1:4]:
        assert "prompt_token_ids must be a flat list of integers" in out.error
        assert [c.finish_reason for c in out.outputs] == ["error"]


def test_request_larger_than_kv_capacity_fails_alone():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llm = LLM(kv_cache_memory=_kv_bytes(_tiny_config(), 4))
    outs = llm.generate([{"prompt_token_ids": [65] * 100}, "small"], GREEDY, use_tqdm=False)
    assert "KV cache" in outs[0].error and outs[0].outputs[0].finish_reason == "error"
    assert outs[1].error is None and len(outs[1].outputs[0].token_ids) == 8


def test_max_tokens_none_fills_the_context():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llm = LLM(kv_cache_memory=_kv_bytes(_tiny_config(), 16), max_model_len=40)
    out = llm.generate("abc", SamplingParams(temperature=0, max_tokens=None, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 40
    assert out.outputs[0].finish_reason == "length"


def test_request_outgrowing_the_kv_cache_fails_alone_mid_run():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llm = LLM(kv_cache_memory=_kv_bytes(_tiny_config(), 4))
    unbounded = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    outs = llm.generate(["grows until the cache is full", "small"], [unbounded, GREEDY], use_tqdm=False)
    assert "KV blocks" in outs[0].error and outs[0].outputs[0].finish_reason == "error"
    assert outs[1].error is None and len(outs[1].outputs[0].token_ids) == 8


@pytest.mark.parametrize("policy", POLICIES)
def test_n_samples_outgrowing_the_cache_fail_together(policy):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llm = LLM(kv_cache_memory=_kv_bytes(_tiny_config(), 6), policy=policy)
    grows = SamplingParams(n=3, max_tokens=None, ignore_eos=True, seed=1)
    outs = llm.generate(["grows", "small"], [grows, GREEDY], use_tqdm=False)
    assert outs[0] is not None and "KV blocks" in outs[0].error
    assert [c.finish_reason for c in outs[0].outputs] == ["error"] * 3
    assert outs[1].error is None and len(outs[1].outputs[0].token_ids) == 8


def test_default_kv_pool_is_capped_by_what_the_job_can_use():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llm = LLM(max_num_seqs=2, max_model_len=64)
    # Two sequences of at most 64 tokens never need more than 2 * 4 blocks of 16.
    assert llm.num_kv_blocks == 8
    assert len(llm.generate("abc", GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 8


def test_steps_never_exceed_max_num_batched_tokens():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llm = LLM(kv_cache_memory=_kv_bytes(_tiny_config(), 64), max_num_batched_tokens=24)
    prompts = [{"prompt_token_ids": [256] + [70 + i] * 50} for i in range(3)]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
    assert llm.last_stats["max_step_tokens"] == 24  # the prompts were chunked to exactly the budget


def test_sampled_first_tokens_follow_the_model_distribution(llama):
    draws, temperature = 600, 0.25
    vocab = llama.config.vocab_size
    out = llama.generate("Question: what is", SamplingParams(n=draws, temperature=temperature, max_tokens=1,
                                                             logprobs=vocab, seed=11), use_tqdm=False)[0]
    tokens = [c.token_ids[0] for c in out.outputs]
    raw = out.outputs[0].logprobs[0]  # every token's raw logprob
    assert len(raw) == vocab
    ids = np.array(sorted(raw))
    tempered = np.exp(np.array([raw[t] for t in ids]) / temperature)
    tempered /= tempered.sum()
    assert tempered.max() > 0.1  # a distribution with real mass to check
    for token, p in zip(ids, tempered):
        if p > 0.02:
            freq = tokens.count(int(token)) / draws
            assert abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / draws) + 1e-3, (int(token), freq, p)


# ---------------------------------------------------------------- device choice (GPU machine, simulated)
def test_auto_device_runs_models_the_cuda_kernels_cannot_serve_on_the_cpu(monkeypatch):
    """On a GPU machine "auto" must not hand the tiny model (head dim 16) to the CUDA kernels: the
    choice is made from the config before loading, CPU with a warning for a real model, and an
    explicit "cuda" is an error naming the head dim."""
    from batchllm_core import _C

    monkeypatch.setattr(engine_setup, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(_C, "cuda_kernel_head_dims", lambda: [64, 128], raising=False)
    assert engine_setup.pick_device(None, "auto", "auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="head dim 16"):
        engine_setup.pick_device(None, "auto", "cuda")
    assert engine_setup.pick_device("llama-1b", "auto", "auto") == torch.device("cuda")
    with pytest.warns(UserWarning, match="float16 or bfloat16"):
        assert engine_setup.pick_device("llama-1b", "float32", "auto") == torch.device("cpu")


# ---------------------------------------------------------------- overlapped step loop
@pytest.mark.parametrize("policy", ["batchllm", "fcfs-lru", "no-share"])
@pytest.mark.parametrize("kv_blocks", [512, 15])  # 15: preemption and discarded rows under pressure
def test_overlapped_loop_gives_the_serial_loops_completions(policy, kv_blocks):
    """LLM(overlap=True) plans step i+1 before step i's samples reach the host: same tokens, finish
    reasons and logprob entries as the serial loop, with n > 1, stop ids, min_tokens and seeds."""
    rng = np.random.default_rng(0)
    prefix = rng.integers(10, 250, 40).tolist()
    prompts = [{"prompt_token_ids": prefix[:rng.integers(0, 40)] + rng.integers(10, 250, rng.integers(1, 20)).tolist()}
               for _ in range(30)]
    params = [SamplingParams(n=1 + i % 3, temperature=0 if i % 2 else 0.8, seed=i, max_tokens=int(rng.integers(2, 20)),
                             stop_token_ids=[int(rng.integers(10, 250))] if i % 4 == 0 else None,
                             logprobs=2 if i % 5 == 0 else None, min_tokens=2 if i % 7 == 0 else 0)
              for i in range(30)]
    results, stats = [], []
    for overlap in (False, True):
        llm = LLM(kv_cache_memory=kv_blocks * 16 * 512, policy=policy, overlap=overlap)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        results.append([[(c.token_ids, c.finish_reason, c.logprobs and [sorted(d) for d in c.logprobs])
                         for c in o.outputs] for o in outputs])
        stats.append(llm.last_stats)
    assert results[1] == results[0]
    assert stats[0]["discarded_rows"] == 0 and stats[1]["discarded_rows"] > 0  # stop ids ended some early


def test_kv_cache_usage_follows_the_running_job():
    llm = LLM(kv_cache_memory=64 * 8192, overlap=False)  # 64 blocks of the tiny model
    assert llm.num_kv_blocks == 64 and llm.kv_cache_usage() is None
    prompts = [{"prompt_token_ids": list(range(10, 60)) + [100 + i]} for i in range(6)]
    seen = []
    params = [SamplingParams(temperature=0, max_tokens=5 + 5 * i, ignore_eos=True) for i in range(6)]
    for _ in llm.generate_stream(prompts, params):
        seen.append(llm.kv_cache_usage())
    # While the longest ones run they hold the shared 48-token prefix (3 blocks) and their own
    # blocks; everything is freed by the end.
    assert all(u is not None and 0 <= u <= 1 for u in seen) and seen[0] >= 4 / 64 and seen[-1] == 0
    assert llm.kv_cache_usage() is None
