"""Loading Hugging Face directories (single and sharded), its errors, dtypes and random models."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from batchllm_core.loader import (CheckpointError, build_random_model, load, resolve_device,
                                  resolve_dtype)
from batchllm_core.models import ModelConfig, UnsupportedModelError
from batchllm_core.tokenizer import ByteTokenizer, Tokenizer
from model_fixtures import hf_checkpoint, hf_model

TOKENS = torch.tensor([1, 8, 9, 10, 50, 127, 3, 4, 5, 6])


def logits(loaded, tokens=TOKENS):
    with torch.no_grad():
        return loaded.model.compute_logits(loaded.model(tokens, torch.arange(len(tokens))))


def copy_checkpoint(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(hf_checkpoint(name), target)
    return target


def test_loads_weights_tokenizer_and_eos(tmp_path):
    loaded = load(hf_checkpoint("llama3"), device="cpu")
    assert isinstance(loaded.tokenizer, Tokenizer)
    assert loaded.eos_token_ids == (2,)
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert loaded.max_model_len == 512
    reference = hf_model("llama3").state_dict()
    q_rows = 4 * 16
    wqkv = loaded.model.layers[1].attention.wqkv.weight
    assert torch.equal(wqkv[q_rows:q_rows + 32], reference["model.layers.1.self_attn.k_proj.weight"])
    w13 = loaded.model.layers[0].feed_forward.w13.weight
    assert torch.equal(w13[96:], reference["model.layers.0.mlp.up_proj.weight"])


def test_tied_embeddings_share_one_tensor():
    model = load(hf_checkpoint("qwen2"), device="cpu").model
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    untied = load(hf_checkpoint("qwen3"), device="cpu").model
    assert untied.output.weight.data_ptr() != untied.tok_embeddings.weight.data_ptr()


def test_sharded_checkpoint_loads_the_same_weights():
    sharded = hf_checkpoint("qwen3", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    torch.testing.assert_close(logits(load(sharded, device="cpu")),
                               logits(load(hf_checkpoint("qwen3"), device="cpu")), rtol=0, atol=0)


def test_missing_shard_names_the_file(tmp_path):
    path = tmp_path / "sharded"
    shutil.copytree(hf_checkpoint("qwen3", max_shard_size="100KB"), path)
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load(path, device="cpu")


def test_missing_tensor_names_tensor_and_file(tmp_path):
    path = copy_checkpoint("llama3", tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight.*model\.safetensors"):
        load(path, device="cpu")


def test_mismatched_shape_names_tensor_file_and_shapes(tmp_path):
    path = copy_checkpoint("llama3", tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 95)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        load(path, device="cpu")
    message = str(info.value)
    assert "model.layers.0.mlp.down_proj.weight" in message and "model.safetensors" in message
    assert "(64, 95)" in message and "(64, 96)" in message


def test_unexpected_tensor_is_an_error(tmp_path):
    path = copy_checkpoint("llama3", tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="self_attn.extra.weight"):
        load(path, device="cpu")


def test_tied_checkpoint_may_still_store_lm_head(tmp_path):
    path = copy_checkpoint("qwen2", tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path / "model.safetensors")
    torch.testing.assert_close(logits(load(path, device="cpu")),
                               logits(load(hf_checkpoint("qwen2"), device="cpu")), rtol=0, atol=0)


def test_unsupported_architecture_names_config_file(tmp_path):
    path = copy_checkpoint("llama3", tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"], config["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"config\.json.*GPT2LMHeadModel"):
        load(path, device="cpu")


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_files_are_named(tmp_path, missing):
    path = copy_checkpoint("llama3", tmp_path)
    (path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        load(path, device="cpu")


def test_unknown_model_name():
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load("/no/such/model")


def test_bfloat16_load_converts_weights():
    loaded = load(hf_checkpoint("qwen3"), dtype="bfloat16", device="cpu")
    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    ours = logits(loaded).float()
    reference = logits(load(hf_checkpoint("qwen3"), device="cpu"))
    assert (ours - reference).abs().max() < 0.05 * reference.abs().max()


def test_dtype_and_device_resolution():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    assert resolve_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", torch.device("cpu"))
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_default_model_is_the_tiny_one():
    loaded = load(None, device="cpu")
    assert isinstance(loaded.tokenizer, ByteTokenizer)
    assert loaded.config.vocab_size == loaded.tokenizer.vocab_size
    assert loaded.eos_token_ids == loaded.tokenizer.eos_token_ids
    assert loaded.name == "tiny" and loaded.dtype == torch.float32


def test_random_models_are_seeded():
    config = ModelConfig.from_name("llama-1b").replace(hidden_size=64, num_layers=2, num_heads=4,
                                                       num_kv_heads=2, head_dim=16,
                                                       intermediate_size=96, vocab_size=500)
    first = build_random_model(config, seed=3, device="cpu")
    again = build_random_model(config, seed=3, device="cpu")
    other = build_random_model(config, seed=4, device="cpu")
    assert first.tokenizer is None and first.eos_token_ids == (2,)
    assert torch.equal(logits(first), logits(again))
    assert not torch.equal(logits(first), logits(other))
    assert torch.isfinite(logits(first)).all()
