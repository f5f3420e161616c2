"""run-batch and plan with ``--model DIR``: a Hugging Face checkpoint directory (tiny, random weights,
BPE tokenizer, context length 256) instead of the embedded default."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchllm_core.cli import main
from hf_checkpoints import build_checkpoint

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant:{% endif %}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "tiny-llama"
    build_checkpoint("llama", directory)
    (directory / "chat_template.jinja").write_text(TEMPLATE)
    return directory


def line(custom_id, url="/v1/completions", **body):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def test_run_batch_with_a_model_directory(model_dir, tmp_path, capsys):
    from batchllm_core.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(model_dir)
    preamble = "Question: what is the capital of France? Answer: Paris. " * 2
    lines = [line(f"q{i}", prompt=preamble + f"Question {i}?", max_tokens=5, temperature=0) for i in range(4)]
    lines += [line("chat", "/v1/chat/completions", messages=[{"role": "user", "content": "two plus two?"}],
                   max_tokens=3, temperature=0),
              line("long", prompt="The quick brown fox jumps. " * 60, max_tokens=1),
              line("over", prompt="hello", max_tokens=300),
              line("oov", prompt=[1, 2, 10_000])]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out.jsonl"
    assert main(["run-batch", "-i", str(source), "-o", str(output), "--model", str(model_dir)]) == 0
    answers = {a["custom_id"]: a for a in map(json.loads, output.read_text().splitlines())}
    assert len(answers) == 8
    for i in range(4):
        body = answers[f"q{i}"]["response"]["body"]
        assert body["model"] == "tiny-llama"
        assert body["usage"]["prompt_tokens"] == len(tokenizer.encode(preamble + f"Question {i}?"))
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16
    chat = answers["chat"]["response"]["body"]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "two plus two?"}], add_generation_prompt=True)
    assert chat["usage"]["prompt_tokens"] == len(tokenizer.encode(rendered, add_special_tokens=False))
    assert answers["long"]["error"]["code"] == "context_length_exceeded"
    assert "context length allows (256 tokens" in answers["long"]["error"]["message"]
    assert answers["over"]["error"]["code"] == "context_length_exceeded"
    assert "vocabulary" in answers["oov"]["error"]["message"]
    assert "5 ok, 3 failed" in capsys.readouterr().out


def test_plan_uses_the_model_tokenizer(model_dir, tmp_path, capsys):
    from batchllm_core.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(model_dir)
    prompts = ["Translate to German: good morning -> guten Morgen; thank you -> danke. " * 2 + w
               for w in ("house", "tree", "river")]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(line(f"t{i}", prompt=p, max_tokens=4) for i, p in enumerate(prompts)) + "\n")
    assert main(["plan", "-i", str(source), "--model", str(model_dir), "--json", "--block-size", "4"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["prompt_tokens"] == sum(len(tokenizer.encode(p)) for p in prompts)
    assert plan["top_level_groups"] == 1 and plan["shared_tokens"] > 0
    # 2 layers x K,V x 2 KV heads x head_dim 16 x bfloat16
    assert plan["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2
