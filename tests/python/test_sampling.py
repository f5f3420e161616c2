"""SamplingParams validation and the Sampler's filters, determinism and distribution."""
import numpy as np
import pytest
import torch

from batchllm_core.sampling import RequestSamplingTable, Sampler, SamplingParams
from conftest import gpu


# --------------------------------------------------------------------------------- SamplingParams
def test_defaults_follow_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, -1, 0.0)
    assert (p.seed, p.max_tokens, p.min_tokens, p.ignore_eos, p.logprobs) == (None, 16, 0, False, None)
    assert p.stop == [] and p.stop_token_ids == []


def test_stop_string_is_normalized_to_a_list():
    assert SamplingParams(stop="\n").stop == ["\n"]
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", 1.5), ("n", True),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_k", -2), ("top_k", 2.0),
    ("min_p", -0.1), ("min_p", 1.5), ("seed", 1.0), ("seed", "7"),
    ("max_tokens", 0), ("max_tokens", -3), ("min_tokens", -1),
    ("stop", ""), ("stop", ["ok", ""]), ("stop", 3), ("stop_token_ids", [-1]), ("stop_token_ids", 5),
    ("stop_token_ids", [1.0]), ("ignore_eos", 1), ("logprobs", -1), ("logprobs", 2.0),
])
def test_invalid_value_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_large_and_negative_seeds_are_accepted():
    table = RequestSamplingTable.build([SamplingParams(), SamplingParams()], [2**70 + 3, -5], "cpu")
    assert table.seeds.dtype == torch.int64


# --------------------------------------------------------------------------------- Sampler helpers
def _sample(logits, params, seeds=None, sample_indices=None, positions=None, **sampler_kwargs):
    rows = logits.shape[0]
    seeds = list(range(rows)) if seeds is None else seeds
    table = RequestSamplingTable.build(params, seeds, "cpu")
    sampler = Sampler(logits.shape[1], "cpu", **sampler_kwargs)
    return sampler.sample(logits, table, np.arange(rows),
                          np.zeros(rows) if sample_indices is None else np.asarray(sample_indices),
                          np.zeros(rows) if positions is None else np.asarray(positions))


def _random_logits(rows, vocab, seed=0, scale=3.0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# --------------------------------------------------------------------------------- Sampler
def test_greedy_is_argmax_with_ties_to_lowest_id():
    logits = _random_logits(8, 50)
    logits[0, 7] = logits[0, 30] = 100.0  # a tie: torch.argmax and HF greedy pick the lower id
    out = _sample(logits, [SamplingParams(temperature=0, top_k=3, top_p=0.5)] * 8)
    assert out.token_ids.dtype == np.int32
    np.testing.assert_array_equal(out.token_ids, torch.argmax(logits, -1).numpy())
    assert out.token_ids[0] == 7


def test_seeded_draw_does_not_depend_on_the_rest_of_the_batch():
    vocab = 64
    target = _random_logits(1, vocab, seed=1, scale=1.0)
    params = SamplingParams(temperature=0.9, seed=1234)
    alone = [int(_sample(target, [params], seeds=[1234], positions=[p]).token_ids[0]) for p in range(40)]
    # Same request inside a batch of 30 others, at a different row, with chunking forcing 4-row pieces.
    others = _random_logits(30, vocab, seed=2)
    batch = torch.cat([others[:17], target, others[17:]])
    batch_params = [SamplingParams(temperature=1.3, top_k=5)] * 17 + [params] + [SamplingParams()] * 13
    seeds = list(range(100, 117)) + [1234] + list(range(200, 213))
    in_batch = []
    for p in range(40):
        out = _sample(batch, batch_params, seeds=seeds, positions=[3] * 17 + [p] + [9] * 13,
                      max_noise_elements=4 * vocab)
        in_batch.append(int(out.token_ids[17]))
    assert alone == in_batch
    assert len(set(alone)) > 5  # the draws do vary with the output position


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sampler", ["", "torch"])
def test_one_pass_and_torch_draws_agree(dtype, sampler, monkeypatch):
    # Rows without filters go through ops.sample_rows, rows with one through the torch path: a filter
    # that keeps every token (top_k = vocab) must leave the same draw, logprob and logsumexp, so that
    # a request draws the same tokens whichever way its batch sends it. Model-dtype logits too; and
    # the same with BATCHLLM_SAMPLER=torch (every row by the torch formulas).
    vocab, rows = 300, 24
    logits = _random_logits(rows, vocab, seed=4, scale=2.0).to(dtype)
    plain = [SamplingParams(temperature=0.5 + i / rows, logprobs=2) if i % 4 else SamplingParams(logprobs=2)
             for i in range(rows)]
    filtered = [SamplingParams(temperature=p.temperature, top_k=vocab, logprobs=2) for p in plain]
    positions = list(range(rows))
    monkeypatch.setenv("BATCHLLM_SAMPLER", sampler)  # "torch": every row by the torch formulas
    a = _sample(logits, plain, positions=positions)
    b = _sample(logits, filtered, positions=positions)
    np.testing.assert_array_equal(a.token_ids, b.token_ids)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    np.testing.assert_allclose(a.top_logprobs, b.top_logprobs, atol=1e-5)
    assert len(set(a.token_ids.tolist())) > 10


def test_filtered_rows_are_drawn_in_the_one_pass(monkeypatch):
    # Top-k, top-p and min-p rows go through ops.sample_rows (its tries: no sort, no host sync);
    # only rows with stop ids masked before min_tokens take the torch way.
    from batchllm_core.sampling import Sampler as SamplerClass
    redrawn = []
    original = SamplerClass._redraw
    monkeypatch.setattr(SamplerClass, "_redraw",
                        lambda self, *a, **k: (redrawn.append(list(a[5])), original(self, *a, **k))[1])
    logits = _random_logits(7, 300, seed=2)
    params = [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=1.0, top_k=20),
              SamplingParams(temperature=0.7, min_p=0.1), SamplingParams(temperature=1.0, top_k=20, top_p=0.9),
              SamplingParams(temperature=0, top_k=20, top_p=0.9), SamplingParams(temperature=0.9),
              SamplingParams(temperature=0.9, min_tokens=2, stop_token_ids=[5])]
    _sample(logits, params)
    assert redrawn == [[6]]


def test_masked_rows_with_top_p_are_drawn_without_a_host_sync(monkeypatch):
    # A row before its min_tokens (its stop id masked) takes the torch way; its top-p by a sort of
    # the row, not the candidates' way, whose torch.nonzero waits for the device every step.
    logits = _random_logits(8, 3000, seed=3)  # past the 1,024 candidates
    logits[:, 5] = 50.0  # the stop id would win every draw
    params = [SamplingParams(temperature=1.0, top_p=0.9, min_tokens=3, stop_token_ids=[5])] * 8

    def no_sync(*args, **kwargs):
        raise AssertionError("torch.nonzero: a host sync in the sampler's default path")

    monkeypatch.setattr(torch, "nonzero", no_sync)
    out = _sample(logits, params, positions=[0] * 8)
    assert 5 not in out.token_ids.tolist()


@gpu
def test_sample_async_queues_every_kind_of_row_without_a_host_sync():
    # The overlapped loop queues step i+1 before it waits for step i's draws: sample_async must not
    # wait for the device (torch's sync debug mode raises on a synchronizing call). Greedy, random,
    # top-k, top-p, both, min-p, logprobs and a masked row (before min_tokens) in one step.
    vocab = 3000
    logits = _random_logits(9, vocab, seed=6).to(torch.bfloat16).cuda()
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.8, top_k=20), SamplingParams(temperature=0.8, top_p=0.9),
              SamplingParams(temperature=0.7, top_k=20, top_p=0.8), SamplingParams(temperature=1.0, min_p=0.1),
              SamplingParams(temperature=1.0, top_p=0.9, min_tokens=4, stop_token_ids=[5]),
              SamplingParams(temperature=0.5, logprobs=5), SamplingParams(temperature=1.2, top_p=0.5)]
    table = RequestSamplingTable.build(params, list(range(9)), "cuda")
    sampler = Sampler(vocab, "cuda")
    rows = np.arange(9)
    sampler.sample_async(logits, table, rows, np.zeros(9), np.zeros(9)).result()  # warm-up: first uses
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = sampler.sample_async(logits, table, rows, np.zeros(9), np.zeros(9))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    out = pending.result()
    assert out.token_ids[6] != 5 and len(out.top_token_ids) == 9


@pytest.mark.parametrize("filters", [dict(top_p=0.9), dict(top_p=0.5), dict(top_k=7), dict(min_p=0.2),
                                     dict(top_p=0.95, min_p=0.05), dict(top_k=40, min_p=0.1),
                                     dict(top_k=20, top_p=0.8), dict(top_k=100, top_p=0.5, min_p=0.02)])
def test_one_pass_filters_draw_as_the_torch_way(filters, monkeypatch):
    # The same keys give the same tokens by the kernel's tries as by the torch formulas (a sort's
    # nucleus; float32 logits have no ties, and no row's nucleus edge lies within rounding of top_p).
    vocab, rows = 500, 64
    logits = _random_logits(rows, vocab, seed=9, scale=2.5)
    params = [SamplingParams(temperature=0.6 + i / rows, **filters) for i in range(rows)]
    fused = _sample(logits, params, positions=range(rows))
    monkeypatch.setenv("BATCHLLM_SAMPLER", "torch")
    torch_way = _sample(logits, params, positions=range(rows))
    np.testing.assert_array_equal(fused.token_ids, torch_way.token_ids)
    np.testing.assert_allclose(fused.logprobs, torch_way.logprobs, atol=1e-5)


def test_samples_of_one_request_differ_by_sample_index():
    logits = _random_logits(1, 200, scale=0.1).repeat(16, 1)
    out = _sample(logits, [SamplingParams(seed=5)] * 16, seeds=[5] * 16, sample_indices=range(16))
    assert len(set(out.token_ids.tolist())) > 8


def test_different_seeds_give_different_draws():
    logits = _random_logits(1, 500, scale=0.1).repeat(32, 1)
    out = _sample(logits, [SamplingParams()] * 32, seeds=list(range(32)))
    assert len(set(out.token_ids.tolist())) > 20


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_draws_follow_the_tempered_softmax(temperature):
    vocab, draws = 6, 12000
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    out = _sample(logits.repeat(draws, 1), [SamplingParams(temperature=temperature)] * draws,
                  seeds=[42] * draws, positions=range(draws))
    freq = np.bincount(out.token_ids, minlength=vocab) / draws
    expected = torch.softmax(logits[0] / temperature, -1).numpy()
    # 5 sigma of a binomial proportion at 12000 draws.
    assert np.all(np.abs(freq - expected) <= 5 * np.sqrt(expected * (1 - expected) / draws) + 1e-3)


def test_top_k_keeps_only_the_k_most_likely():
    draws = 3000
    logits = _random_logits(1, 40, scale=0.5)
    out = _sample(logits.repeat(draws, 1), [SamplingParams(temperature=1.0, top_k=3)] * draws,
                  seeds=[0] * draws, positions=range(draws))
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    assert set(out.token_ids.tolist()) == allowed


def test_top_p_keeps_the_nucleus_and_renormalizes():
    draws = 8000
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    logits = probs.log()[None, :]
    out = _sample(logits.repeat(draws, 1), [SamplingParams(top_p=0.85)] * draws,
                  seeds=[3] * draws, positions=range(draws))
    freq = np.bincount(out.token_ids, minlength=5) / draws
    # Mass before token 2 is 0.8 < 0.85, so the nucleus is {0, 1, 2}, renormalized by 0.9.
    assert freq[3] == 0 and freq[4] == 0
    np.testing.assert_allclose(freq[:3], [0.5 / 0.9, 0.3 / 0.9, 0.1 / 0.9], atol=0.025)


def test_top_p_always_keeps_the_most_likely_token():
    logits = torch.tensor([[5.0, 0.0, 0.0]])
    out = _sample(logits.repeat(200, 1), [SamplingParams(top_p=0.01)] * 200, positions=range(200))
    assert set(out.token_ids.tolist()) == {0}


def test_nucleus_from_candidates_equals_the_full_sort(monkeypatch):
    # Top-k / top-p look at each row's largest logits (sampling.NUCLEUS_CANDIDATES, 64 here) instead of
    # sorting the vocabulary; rows whose nucleus reaches past them (flat rows) fall back to the sort.
    # Either way the kept tokens must be those of the full sort.
    from batchllm_core import sampling
    vocab, rows = 3000, 24
    gen = torch.Generator().manual_seed(11)
    scales = torch.tensor([0.05 if r % 3 == 0 else 6.0 for r in range(rows)])  # flat rows spill
    logits = torch.randn(rows, vocab, generator=gen) * scales[:, None]
    top_k = torch.tensor([[0, 5, 50, 0][r % 4] for r in range(rows)])
    top_p = torch.tensor([[0.9, 1.0, 0.5, 0.99, 1.0, 0.7][r % 6] for r in range(rows)])
    full = sampling._apply_top_k_top_p(logits, top_k, top_p, needed=True)  # no bound: the sort
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", 64)
    fast = sampling._apply_top_k_top_p(logits, top_k, top_p, needed=True, top_k_bound=50)
    assert torch.equal(torch.isinf(fast), torch.isinf(full))
    assert torch.equal(fast[torch.isfinite(fast)], full[torch.isfinite(full)])
    kept = torch.isfinite(fast).sum(dim=-1)
    filtered = (top_k > 0) | (top_p < 1.0)
    assert (filtered & (scales < 1) & (kept > 64)).any()  # a flat row spilled past the candidates
    assert (filtered & (scales > 1) & (kept <= 64)).any()  # a peaked row kept to them
    unfiltered = (top_k == 0) & (top_p == 1.0)
    assert torch.equal(fast[unfiltered], logits[unfiltered])


def test_min_p_drops_unlikely_tokens():
    draws = 3000
    probs = torch.tensor([0.4, 0.3, 0.2, 0.05, 0.05])
    out = _sample(probs.log()[None, :].repeat(draws, 1), [SamplingParams(min_p=0.4)] * draws,
                  seeds=[9] * draws, positions=range(draws))
    # Threshold 0.4 * 0.4 = 0.16: tokens 3 and 4 are dropped.
    assert set(out.token_ids.tolist()) == {0, 1, 2}


def test_mixed_rows_apply_their_own_filters():
    logits = _random_logits(1, 30, scale=0.2).repeat(3, 1)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams()]
    for position in range(20):
        out = _sample(logits, params, positions=[position] * 3)
        top = int(torch.argmax(logits[0]))
        assert out.token_ids[0] == top and out.token_ids[1] == top


def test_logprobs_are_log_softmax_of_raw_logits():
    logits = _random_logits(4, 25)
    params = [SamplingParams(temperature=0.5, logprobs=3), SamplingParams(temperature=0),
              SamplingParams(logprobs=0), SamplingParams(temperature=0, logprobs=5)]
    out = _sample(logits, params)
    reference = torch.log_softmax(logits, -1)
    expected = reference.gather(1, torch.as_tensor(out.token_ids, dtype=torch.int64)[:, None])[:, 0]
    np.testing.assert_allclose(out.logprobs, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert out.top_token_ids.shape == (4, 5)
    values, ids = torch.topk(reference, 5, -1)
    np.testing.assert_array_equal(out.top_token_ids, ids.numpy())
    np.testing.assert_allclose(out.top_logprobs, values.numpy(), rtol=1e-5, atol=1e-6)


def test_without_logprobs_no_top_arrays():
    out = _sample(_random_logits(2, 10), [SamplingParams()] * 2)
    assert out.top_token_ids.size == 0 and out.logprobs.shape == (2,)


def test_masked_logits_never_sampled():
    logits = _random_logits(64, 20)
    logits[:, 5:] = float("-inf")
    out = _sample(logits, [SamplingParams(temperature=1.5)] * 64, positions=range(64))
    assert out.token_ids.max() < 5


def test_rejects_wrong_shapes():
    sampler = Sampler(10, "cpu")
    table = RequestSamplingTable.build([SamplingParams()], [0], "cpu")
    with pytest.raises(ValueError, match="logits"):
        sampler.sample(torch.zeros(1, 11), table, np.zeros(1), np.zeros(1), np.zeros(1))
    with pytest.raises(ValueError, match="rows"):
        sampler.sample(torch.zeros(2, 10), table, np.zeros(1), np.zeros(1), np.zeros(1))


def test_empty_step():
    out = _sample(torch.zeros(0, 10), [])
    assert out.token_ids.shape == (0,)


def test_thousands_of_rows_in_one_call():
    rows, vocab = 2048, 512
    logits = _random_logits(rows, vocab)
    params = [SamplingParams(top_k=50, top_p=0.9, min_p=0.01, logprobs=2)] * rows
    out = _sample(logits, params, positions=range(rows))
    assert out.token_ids.shape == (rows,) and 0 <= out.token_ids.min() and out.token_ids.max() < vocab


def test_stop_and_eos_ids_are_masked_before_min_tokens():
    logits = torch.zeros(4, 10)
    logits[:, 3] = 50.0  # token 3 (EOS) would always win
    logits[:, 5] = 40.0  # token 5 (a stop token id) next
    params = [SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[5]),
              SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[5]),
              SamplingParams(temperature=0.7, min_tokens=2, ignore_eos=True),
              SamplingParams(temperature=0, logprobs=1)]
    table = RequestSamplingTable.build(params, [0, 1, 2, 3], "cpu", eos_token_ids=[3])
    out = Sampler(10, "cpu").sample(logits, table, np.arange(4), np.zeros(4), np.array([0, 2, 1, 0]))
    assert out.token_ids[0] not in (3, 5)  # before min_tokens: both masked
    assert out.token_ids[1] == 3           # min_tokens reached
    assert out.token_ids[2] == 3           # ignore_eos: EOS is not a stopper, so not masked
    assert out.token_ids[3] == 3           # no min_tokens
    # Logprobs still come from the raw logits.
    np.testing.assert_allclose(out.logprobs[0], torch.log_softmax(logits[0], -1)[out.token_ids[0]].item(), rtol=1e-5)
