"""Exactness against transformers: greedy generation of random-weight Llama-family checkpoints.

For each architecture a float32 checkpoint and tokenizer are saved to a temporary directory, loaded
with ``LLM(model=dir)``, and prompts that share prefixes are generated greedily in one batch: the
tokens must equal transformers' ``generate`` token for token, and the logprobs of the first output
token (the prompt's last logits through the whole paged/shared-prefix path) must match transformers'.
"""
import numpy as np
import pytest
import torch

from batchllm_core import LLM, SamplingParams
from hf_checkpoints import ARCHITECTURES, build_checkpoint

MAX_TOKENS = 10
SHARED = "Question: what is the capital of France? Answer: Paris. Question: what is two plus two? "
PROMPTS = [
    SHARED + "Answer: four. Question: what",
    SHARED + "Answer: four. Translate to German:",
    SHARED + "Once upon a time",
    SHARED,
    "Translate to German: good morning ->",
    "def add(a, b):\n    return",
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run faster on one thread, and much faster on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Weight seeds whose greedy paths over PROMPTS have top-1/top-2 logit gaps of at least 1e-3: exact
# parity then tests the engine, not which float32 summation order wins a near-tie (diffs ~1e-6).
WEIGHT_SEEDS = {"llama": 0, "mistral": 14, "qwen2": 2, "qwen3": 3}


@pytest.fixture(scope="session", params=ARCHITECTURES)
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"ckpt_{request.param}")
    model, tokenizer = build_checkpoint(request.param, directory, seed=WEIGHT_SEEDS[request.param])
    return request.param, directory, model, tokenizer


def _hf_greedy(model, prompt_ids, max_new_tokens):
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=model.config.eos_token_id)
    return out[0, len(prompt_ids):].tolist()


def test_greedy_tokens_match_transformers(checkpoint):
    arch, directory, hf_model, hf_tokenizer = checkpoint
    llm = LLM(model=str(directory), kv_cache_memory=1 << 22, seed=0)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=5), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outputs):
        hf_ids = hf_tokenizer(prompt).input_ids
        assert out.prompt_token_ids == hf_ids, f"{arch}: tokenization differs for {prompt!r}"
        expected = _hf_greedy(hf_model, hf_ids, MAX_TOKENS)
        got = out.outputs[0].token_ids
        assert got == expected, f"{arch}: {prompt!r}: batchllm {got} != transformers {expected}"
        assert out.outputs[0].finish_reason == ("stop" if expected[-1] == hf_model.config.eos_token_id else "length")
        assert out.outputs[0].text == hf_tokenizer.decode(expected, skip_special_tokens=True)


def test_first_token_logprobs_match_transformers(checkpoint):
    arch, directory, hf_model, hf_tokenizer = checkpoint
    llm = LLM(model=str(directory), kv_cache_memory=1 << 22)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outputs):
        ids = hf_tokenizer(prompt).input_ids
        with torch.no_grad():
            reference = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, -1].float(), -1)
        got = out.outputs[0].logprobs[0]
        top_values, top_ids = torch.topk(reference, 5)
        assert set(top_ids.tolist()) <= set(got), f"{arch}: top-5 ids differ"
        np.testing.assert_allclose([got[t] for t in top_ids.tolist()], top_values.numpy(), rtol=1e-4, atol=1e-5)


# The model engineer's checkpoints (tests/python/model_fixtures.py) add llama3 and linear rope
# scaling, attention and MLP biases, tied embeddings, head_dim != hidden / heads and GQA ratio 4.
FIXTURE_PROMPTS = [
    "the quick brown fox jumps over the lazy dog a shared prefix is computed once",
    "the quick brown fox jumps over the lazy dog hello world how are you",
    "the quick brown fox jumps over the lazy dog",
    "batch jobs plan globally and decode many sequences together",
]


@pytest.mark.parametrize("name", ["llama3", "llama-tied-bias", "mistral"])
def test_greedy_tokens_match_transformers_on_model_fixtures(name):
    from model_fixtures import hf_checkpoint, hf_model, hf_tokenizer

    hf = hf_model(name)
    llm = LLM(model=str(hf_checkpoint(name)), kv_cache_memory=1 << 22)
    outputs = llm.generate(FIXTURE_PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    for prompt, out in zip(FIXTURE_PROMPTS, outputs):
        ids = hf_tokenizer()(prompt).input_ids
        assert out.prompt_token_ids == ids
        expected = _hf_greedy(hf, ids, MAX_TOKENS)
        assert out.outputs[0].token_ids == expected, f"{name}: {prompt!r}"
