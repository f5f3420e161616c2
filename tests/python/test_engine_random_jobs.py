"""Random small jobs through the whole engine (hypothesis): every request answered once, in order,
within its limits, and every greedy request's tokens equal to a run with ample memory and no sharing.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchllm_core import LLM, SamplingParams
from batchllm_core.models.config import ModelConfig
from hf_checkpoints import build_checkpoint

BOS, EOS = 0, {1}  # the byte-level BPE tokenizer of hf_checkpoints: <s>, </s>


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random Llama with peaked logits: greedy choices are no float near-ties (see test_engine)."""
    directory = tmp_path_factory.mktemp("random_jobs_llama")
    build_checkpoint("llama", directory, seed=7)
    return str(directory)


def _llm(model_dir, blocks, policy, max_num_seqs=1024, max_num_batched_tokens=2048, overlap=False):
    bytes_per_block = 16 * ModelConfig.from_hf_file(f"{model_dir}/config.json").kv_bytes_per_token(torch.float32)
    return LLM(model=model_dir, kv_cache_memory=bytes_per_block * blocks, policy=policy,
               max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, overlap=overlap)


@pytest.fixture(scope="module")
def reference_llm(model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _llm(model_dir, 512, "no-share")
    torch.set_num_threads(threads)


_prefixes = st.lists(st.integers(32, 126), min_size=0, max_size=40)
_params = st.builds(
    SamplingParams,
    n=st.integers(1, 3),
    temperature=st.sampled_from([0.0, 0.0, 0.7, 1.2]),
    top_k=st.sampled_from([-1, 5]),
    top_p=st.sampled_from([1.0, 0.8]),
    seed=st.one_of(st.none(), st.integers(0, 2**40)),
    max_tokens=st.integers(1, 12),
    min_tokens=st.integers(0, 1),
    stop_token_ids=st.sampled_from([None, [101], [97, 98]]),
    stop=st.sampled_from([None, ["e"], ["ab", "x"]]),
    ignore_eos=st.booleans(),
    logprobs=st.sampled_from([None, 0, 2]),
)


@st.composite
def _jobs(draw):
    prefixes = draw(st.lists(_prefixes, min_size=1, max_size=3))
    requests = []
    for _ in range(draw(st.integers(1, 12))):
        prefix = prefixes[draw(st.integers(0, len(prefixes) - 1))]
        suffix = draw(st.lists(st.integers(32, 126), min_size=1, max_size=10))
        requests.append(({"prompt_token_ids": [BOS] + prefix + suffix}, draw(_params)))
    return requests


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(job=_jobs(), policy=st.sampled_from(["batchllm", "fcfs-lru", "no-share"]), blocks=st.integers(6, 40),
       max_num_seqs=st.integers(1, 16), budget=st.sampled_from([16, 64, 2048]), overlap=st.booleans())
def test_random_jobs(model_dir, reference_llm, job, policy, blocks, max_num_seqs, budget, overlap):
    """Serial and overlapped step loops (step i+1 planned before step i's samples are committed)."""
    prompts, params = [p for p, _ in job], [s for _, s in job]
    llm = _llm(model_dir, blocks, policy, max_num_seqs, budget, overlap)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    assert [o.request_id for o in outputs] == [str(i) for i in range(len(job))]
    for prompt, p, out in zip(prompts, params, outputs):
        assert out.prompt_token_ids == prompt["prompt_token_ids"] and len(out.outputs) == p.n
        if out.error is not None:  # only what cannot fit the pool may fail
            assert "KV" in out.error, out.error
            continue
        for c in out.outputs:
            ids = c.token_ids
            assert 1 <= len(ids) <= p.max_tokens
            stoppers = set(p.stop_token_ids) | (set() if p.ignore_eos else EOS)
            assert not stoppers & set(ids[:max(p.min_tokens, len(ids) - 1)]), "a stopper before the end"
            full_text = tokenizer.decode(ids)
            if isinstance(c.stop_reason, str):  # cut before the first stop string, found on the last token
                assert c.finish_reason == "stop" and full_text.startswith(c.text)
                assert full_text[len(c.text):].startswith(c.stop_reason)
                assert not any(stop in tokenizer.decode(ids[:-1]) for stop in p.stop)
            elif c.finish_reason == "length":
                assert len(ids) == p.max_tokens and c.text == full_text
            else:
                assert c.finish_reason == "stop" and ids[-1] in stoppers and c.text == full_text
            if p.logprobs is not None:
                assert len(c.logprobs) == len(ids) and all(t in e for t, e in zip(ids, c.logprobs))
        if p.temperature == 0 or p.seed is not None:
            # Greedy and seeded requests do not depend on the batch, the policy or the pool size.
            alone = reference_llm.generate(prompt, p, use_tqdm=False)[0]
            assert [c.token_ids for c in out.outputs] == [c.token_ids for c in alone.outputs]
