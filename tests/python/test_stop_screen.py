"""Stop strings checked only on the rows whose token can complete one (StopScreen), against checking
every row every step, on the tokenizer kinds that decode differently: byte-level BPE (Llama 3, Qwen),
SentencePiece-style Metaspace with byte fallback (Llama 2, Mistral), word-level (a decoder that puts
spaces between tokens), transformers' space clean-up, and the tiny model's byte tokenizer."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from batchllm_core.job import Job, PreparedRequest, StepRows
from batchllm_core.sampling import SamplerOutput, SamplingParams
from batchllm_core.stop_screen import StopScreen
from batchllm_core.tokenizer import ByteTokenizer, IncrementalDetokenizer, Tokenizer, find_stop_string
from hf_checkpoints import build_tokenizer
from model_fixtures import hf_checkpoint


def _metaspace_tokenizer(directory):
    """Llama 2's decoder (▁ -> space, <0xNN> byte fallback, fuse, strip the first space) on a small
    hand-made vocabulary."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    pieces = ["▁", "a", "b", "e", "h", "t", ".", "\n", "▁a", "▁t", "th", "▁th", "▁the", "he", "ab", "é",
              "▁é"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    vocab.update({p: 259 + i for i, p in enumerate(pieces)})
    merges = [("▁", "a"), ("▁", "t"), ("t", "h"), ("▁t", "h"), ("▁th", "e")]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return Tokenizer.from_pretrained(directory)


def _bpe_tokenizer(directory, clean_up=False):
    build_tokenizer(directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": clean_up}))
    return Tokenizer.from_pretrained(directory)


TOKENIZERS = ["byte", "bpe", "bpe-clean-up", "metaspace", "word-level"]


@pytest.fixture(scope="module", params=TOKENIZERS)
def tokenizer(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    if request.param == "byte":
        return ByteTokenizer()
    if request.param == "metaspace":
        return _metaspace_tokenizer(directory)
    if request.param == "word-level":
        return Tokenizer.from_pretrained(hf_checkpoint("llama3"))
    return _bpe_tokenizer(directory, clean_up=request.param == "bpe-clean-up")


def _random_ids(tokenizer, rng, length):
    """Token ids biased toward what makes stop strings and multi-byte characters: the tokens of the
    stop pool, a multi-byte character's pieces, and anything else in the vocabulary."""
    favourites = [i for text in ("\n", "ab", "é", " the", ".", "a b", "he", "don't", "x .")
                  for i in tokenizer.encode(text, add_special_tokens=False)]
    if isinstance(tokenizer, ByteTokenizer):
        favourites += [0xC3, 0xA9, 0xE2, 0x82, 0xAC]
    return [rng.choice(favourites) if rng.random() < 0.6 else rng.randrange(tokenizer.vocab_size)
            for _ in range(length)]


STOP_POOL = ["\n", "ab", "é", " the", ".", "a b", "he", "t", "€", "n't", "x."]


def test_a_token_adds_only_characters_of_its_text(tokenizer):
    """What the screen assumes: the text a token adds to a sequence's decoding is made of the
    characters ``token_texts`` gives it (and U+FFFD), unless it has none (None) or is a piece of a
    multi-byte character (U+FFFD)."""
    texts = tokenizer.token_texts()
    assert len(texts) == tokenizer.vocab_size
    rng = random.Random(0)
    for _ in range(300):
        ids = _random_ids(tokenizer, rng, rng.randint(1, 12))
        detok = IncrementalDetokenizer(tokenizer)
        for token in ids:
            delta = detok.append([token])
            text = texts[token]
            if text is None or "\ufffd" in text:
                continue
            # An invalid byte sequence before it shows as U+FFFD once this token ends it.
            assert set(delta) - {"\ufffd"} <= set(text), (ids, token, delta, text)


def test_screen_flags_tokens_with_a_final_character_of_their_requests_stops():
    texts = ["a", "b\n", "\ufffd", None, "xy", ""]
    screen = StopScreen(texts, [["\n"], None, ["zy", "b"], []])
    requests = np.array([0, 0, 0, 0, 0, 1, 2, 2, 2, 3, 0])
    tokens = np.array([0, 1, 2, 3, 5, 1, 4, 1, 0, 1, 9])  # 9: past the vocabulary
    assert screen.flags(requests, tokens).tolist() == [False, True, True, True, False, False, True, True,
                                                       False, False, True]
    many = StopScreen(texts, [[chr(0x4E00 + i) for i in range(100)], None])  # too many characters: all rows
    assert many.flags(np.array([0, 0, 1]), np.array([0, 4, 0])).tolist() == [True, True, False]
    # U+FFFD, which a token's text gains from an invalid byte before it: all rows.
    odd = StopScreen(texts, [["x\ufffd"], None])
    assert odd.flags(np.array([0, 0, 1]), np.array([0, 4, 0])).tolist() == [True, True, False]


def _oracle(tokenizer, params, tokens):
    """Every row checked every step, one token at a time (the engine before the screen)."""
    detok = IncrementalDetokenizer(tokenizer)
    for j, token in enumerate(tokens):
        new = detok.append([token])
        if j + 1 >= params.min_tokens:
            text = detok.text
            match = find_stop_string(text, params.stop, len(text) - len(new))
            if match is not None:
                return tokens[:j + 1], tokenizer.clean_up(text[:match[0]]), "stop", match[1]
    return tokens, tokenizer.decode(tokens), "length", None


def _decodes_by_prefix(tokenizer, tokens):
    """Whether each prefix's text (less an incomplete last character) begins the next one's: not so
    where byte fallback turns a valid byte into U+FFFD once an invalid one follows it (Llama 2's
    decoder), and there text depends on how many tokens a check sees at once."""
    texts = [tokenizer.decode(tokens[:j], clean_up_tokenization_spaces=False).rstrip("\ufffd")
             for j in range(len(tokens) + 1)]
    return all(b.startswith(a) for a, b in zip(texts, texts[1:]))


def _run_job(tokenizer, params, planned, screen, rng_seed):
    """Drives a Job as the engine does: every running completion gets a row a step, in shuffled
    order; a completion ends by a stop string (``record``) or at its last planned token. Returns the
    completions by (request, sample) and the logprob dicts each row was given."""
    requests = [PreparedRequest(None, np.array([1, 2, 3], np.int64), p, max_tokens=p.max_tokens) for p in params]
    job = Job(requests, tokenizer, [], [0] * len(params), "cpu", screen_stops=screen)
    rng = np.random.default_rng(rng_seed)
    running = [(r, s) for r, p in enumerate(params) for s in range(p.n)]
    base = np.concatenate([[0], np.cumsum([p.n for p in params])])
    generated = {key: [] for key in running}
    given = {key: [] for key in running}
    completions = {}
    top_width = max([p.logprobs or 0 for p in params] + [0])
    while running:
        keys = [running[i] for i in rng.permutation(len(running))]
        rows = StepRows(np.array([r for r, _ in keys], np.int64), np.array([s for _, s in keys], np.int32),
                        np.array([len(generated[k]) for k in keys], np.int32),
                        np.array([base[r] + s for r, s in keys], np.int64))
        tokens = np.array([planned[k][len(generated[k])] for k in keys], np.int32)
        sampled = SamplerOutput(tokens, rng.normal(size=len(keys)).astype(np.float32),
                                rng.integers(0, 50, (len(keys), top_width)),
                                rng.normal(size=(len(keys), top_width)).astype(np.float32))
        for i, (k, token) in enumerate(zip(keys, tokens)):
            generated[k].append(int(token))
            top = {int(sampled.top_token_ids[i, j]): float(sampled.top_logprobs[i, j])
                   for j in range(params[k[0]].logprobs or 0)}
            top[int(token)] = float(sampled.logprobs[i])
            given[k].append(top)
        stopped = set(job.record(rows, sampled))
        for r, s in keys:
            if base[r] + s in stopped:
                reason = "stop"
            elif len(generated[(r, s)]) == params[r].max_tokens:
                reason = "length"
            else:
                continue
            running.remove((r, s))
            done = job.finish(r, s, generated[(r, s)], reason)
            if done is not None:
                completions.update({(r, c.index): c for c in done[1].outputs})
    return completions, given


@pytest.mark.parametrize("seed", range(6))
def test_screened_stops_equal_checking_every_row(tokenizer, seed):
    """Random jobs (stop strings, min_tokens, n, logprobs) through the Job with the screen and
    without: the same completions, and each equal to one-token-at-a-time checking."""
    rng = random.Random(seed)
    params, planned = [], {}
    for r in range(12):
        stops = rng.sample(STOP_POOL, rng.randint(1, 3)) if rng.random() < 0.85 else None
        n, max_tokens = rng.randint(1, 2), rng.randint(1, 24)
        min_tokens = min(max_tokens, rng.choice([0, 0, 1, 3, max_tokens]))
        params.append(SamplingParams(n=n, max_tokens=max_tokens, min_tokens=min_tokens, stop=stops,
                                     logprobs=rng.choice([None, None, 0, 2])))
        for s in range(n):
            planned[(r, s)] = _random_ids(tokenizer, rng, max_tokens)
    screened, given = _run_job(tokenizer, params, planned, True, seed)
    unscreened, _ = _run_job(tokenizer, params, planned, False, seed)
    assert len(screened) == len(unscreened) == len(planned)
    compared = 0
    for (r, s), got in screened.items():
        tokens = planned[(r, s)]
        assert got.token_ids == tokens[:len(got.token_ids)] and got.finish_reason in ("stop", "length")
        if params[r].logprobs is None:
            assert got.logprobs is None
        else:
            assert got.logprobs == given[(r, s)][:len(got.token_ids)]
        if not _decodes_by_prefix(tokenizer, tokens):
            continue
        compared += 1
        expected = _oracle(tokenizer, params[r], tokens)
        assert unscreened[(r, s)] == got
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == expected, (params[r], tokens)
    assert compared >= len(screened) // 3


def test_min_tokens_boundary_holds_back_an_incomplete_character():
    """min_tokens = 3 and 'é' split over tokens 2 and 3 (bytes C3 A9): the stop string ends in the
    third token's text, so it counts, as it did checking token by token; with 'a' before, the
    text at the boundary is 'a' (the half character is not text yet)."""
    tokenizer = ByteTokenizer()
    params = SamplingParams(max_tokens=4, min_tokens=3, stop=["é"])
    tokens = [ord("a"), 0xC3, 0xA9, ord("b")]
    for screen in (True, False):
        got, _ = _run_job(tokenizer, [params], {(0, 0): tokens}, screen, 0)
        assert (got[(0, 0)].token_ids, got[(0, 0)].text, got[(0, 0)].stop_reason) == (tokens[:3], "a", "é")
    assert _oracle(tokenizer, params, tokens)[:2] == (tokens[:3], "a")


def test_stop_strings_match_the_text_before_the_clean_up_of_spaces(tmp_path):
    """A tokenizer that cleans up spaces (Llama 3's tokenizer_config): the stop string is found in
    the text as decoded, and the text kept before it is cleaned up as ``decode`` cleans it."""
    tokenizer = _bpe_tokenizer(tmp_path, clean_up=True)
    tokens = tokenizer.encode("we do n't know . STOP here", add_special_tokens=False)
    params = SamplingParams(max_tokens=len(tokens), stop=[" STOP"])
    got, _ = _run_job(tokenizer, [params], {(0, 0): tokens}, True, 0)
    assert got[(0, 0)].text == "we don't know." == tokenizer.decode(tokenizer.encode("we do n't know .", False))
    assert got[(0, 0)].finish_reason == "stop"
