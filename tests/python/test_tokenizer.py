"""Tokenizers against transformers, the byte-level tokenizer, chat templates, incremental detokenization."""
from __future__ import annotations

import json
import shutil

import pytest

from batchllm_core.tokenizer import (ByteTokenizer, IncrementalDetokenizer, Tokenizer,
                                     find_stop_string, render_chat_template)
from model_fixtures import CHAT_TEMPLATE, hf_checkpoint

TEXTS = ["the quick brown fox jumps", "hello world how are you today ?", "unknown words here", ""]
CONVERSATION = [{"role": "user", "content": "hello world"},
                {"role": "assistant", "content": "the fox"},
                {"role": "user", "content": "how are you"}]


@pytest.fixture(scope="module")
def tokenizers():
    from transformers import AutoTokenizer

    path = hf_checkpoint("llama3")
    return Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(tokenizers, add_special_tokens):
    ours, hf = tokenizers
    expected = [hf(t, add_special_tokens=add_special_tokens).input_ids for t in TEXTS]
    assert [ours.encode(t, add_special_tokens) for t in TEXTS] == expected
    assert ours.encode_batch(TEXTS, add_special_tokens) == expected


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(tokenizers, skip_special_tokens):
    ours, hf = tokenizers
    for text in TEXTS:
        ids = hf(text).input_ids + [hf.eos_token_id]
        assert ours.decode(ids, skip_special_tokens) == hf.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tokenizers, add_generation_prompt):
    ours, hf = tokenizers
    text = ours.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(CONVERSATION, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
    assert text.startswith("<s>") and text.endswith("assistant : ") == add_generation_prompt
    ids = ours.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt, tokenize=True)
    expected = hf.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=add_generation_prompt)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert ids == list(expected)
    assert ids.count(ours.bos_token_id) == 1  # the template writes bos; encoding adds no second one


def test_special_ids_and_eos(tokenizers):
    ours, hf = tokenizers
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert ours.vocab_size == len(hf)
    assert ours.all_special_ids == sorted(hf.all_special_ids)
    assert ours.eos_token_ids == (2,)


def test_generation_config_eos_ids_win(tmp_path):
    path = tmp_path / "model"
    shutil.copytree(hf_checkpoint("llama3"), path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert Tokenizer.from_pretrained(path).eos_token_ids == (2, 7)
    (path / "generation_config.json").unlink()
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "eos_token_id": 9}))
    assert Tokenizer.from_pretrained(path).eos_token_ids == (9,)


def test_add_bos_token_when_the_post_processor_does_not(tmp_path):
    """Llama-style tokenizer_config: the config asks for bos, tokenizer.json does not add it."""
    path = tmp_path / "model"
    shutil.copytree(hf_checkpoint("llama3"), path)
    data = json.loads((path / "tokenizer.json").read_text())
    data["post_processor"] = None
    (path / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    tokenizer = Tokenizer.from_pretrained(path)
    assert tokenizer.encode("hello world") == [1, *tokenizer.encode("hello world", add_special_tokens=False)]
    assert tokenizer.encode_batch(["hello"])[0][0] == 1


def test_chat_template_from_tokenizer_config_and_named_list(tmp_path):
    path = tmp_path / "model"
    shutil.copytree(hf_checkpoint("llama3"), path)
    (path / "chat_template.jinja").unlink()
    config = json.loads((path / "tokenizer_config.json").read_text())
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHAT_TEMPLATE}]
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named}))
    assert Tokenizer.from_pretrained(path).apply_chat_template(CONVERSATION[:1]) == \
        "<s>user : hello world </s> assistant : "
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_pretrained(path).apply_chat_template(CONVERSATION)


def test_missing_tokenizer_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_template_helpers_and_errors():
    template = ("{% for m in messages %}{{ m | tojson }}{% endfor %}"
                "{% if add_generation_prompt %}{{ raise_exception('no generation') }}{% endif %}")
    assert render_chat_template(template, [{"role": "user", "content": "é"}], False) == \
        '{"role": "user", "content": "é"}'
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="no generation"):
        render_chat_template(template, [], True)
    with pytest.raises(jinja2.exceptions.SecurityError):  # templates from the Hub are untrusted
        render_chat_template("{{ messages.__class__.__mro__ }}", [], False)


def test_byte_tokenizer_round_trips_utf8():
    tokenizer = ByteTokenizer()
    text = "héllo wörld ✓ 🎉 \n\t"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id and all(0 <= i < 256 for i in ids[1:])
    assert ids[1:] == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch([text, "a"], add_special_tokens=False) == [ids[1:], [97]]


def test_byte_tokenizer_specials():
    tokenizer = ByteTokenizer()
    assert tokenizer.vocab_size == 261
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (256, 257, 258)
    assert tokenizer.all_special_ids == [256, 257, 258, 259, 260]
    ids = tokenizer.encode("a<|eos|>b<|im_start|>", add_special_tokens=False)
    assert ids == [97, 257, 98, 259]
    assert tokenizer.decode(ids) == "ab"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "a<|eos|>b<|im_start|>"
    assert tokenizer.decode([97, 1000, 98]) == "ab"  # ids past the vocabulary decode to nothing
    assert set(tokenizer.eos_token_ids) == {257, 260}


def test_byte_tokenizer_chat_template():
    tokenizer = ByteTokenizer()
    text = tokenizer.apply_chat_template(CONVERSATION[:1])
    assert text == "<|bos|><|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=True)
    assert ids[:2] == [256, 259] and ids.count(256) == 1 and 260 in ids


def test_incremental_detokenizer_holds_back_partial_characters():
    tokenizer = ByteTokenizer()
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("prompt"))
    target = "aé🎉b"
    deltas = [detok.append([byte]) for byte in target.encode("utf-8")]
    assert "".join(deltas) == detok.text == target
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[1] == "" and deltas[2] == "é"


def test_incremental_detokenizer_matches_full_decode(tokenizers):
    ours, _ = tokenizers
    prompt = ours.encode("hello world")
    generated = ours.encode("the quick brown fox jumps over the lazy dog ?", add_special_tokens=False)
    generated.insert(3, ours.eos_token_id)  # a special token in the middle is skipped
    detok = IncrementalDetokenizer(ours, prompt)
    for token in generated:
        detok.append([token])
    assert detok.text == ours.decode(generated)


def test_find_stop_string():
    assert find_stop_string("hello world", ["wor", "lo"]) == (3, "lo")
    assert find_stop_string("hello world", ["xyz"]) is None
    # A stop string that straddles the previous text and the new delta is found...
    assert find_stop_string("abcdef", ["cde"], search_from=4) == (2, "cde")
    # ...one that ended before the new delta was already checked and is not reported again.
    assert find_stop_string("abcdef", ["ab"], search_from=4) is None
    assert find_stop_string("abc", [""]) is None


@pytest.mark.parametrize("clean_up", [True, False])
def test_clean_up_tokenization_spaces_as_transformers(tmp_path, clean_up):
    from transformers import AutoTokenizer

    path = tmp_path / "model"
    shutil.copytree(hf_checkpoint("llama3"), path)
    data = json.loads((path / "tokenizer.json").read_text())
    data["decoder"] = {"type": "WordPiece", "prefix": "##", "cleanup": False}  # leaves " ?" alone
    (path / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": clean_up}))
    hf, ours = AutoTokenizer.from_pretrained(path), Tokenizer.from_pretrained(path)
    ids = hf("hello world ? the fox").input_ids
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ("world?" in ours.decode(ids)) == clean_up
