"""The Llama-family decoder against transformers, its config parsing and the embedded tiny model."""
from __future__ import annotations

import pytest
import torch

from batchllm_core.loader import load
from batchllm_core.models import NAMED_SHAPES, LlamaModel, ModelConfig, UnsupportedModelError
from batchllm_core.models.tiny import build_tiny_model, tiny_config
from batchllm_core.tokenizer import ByteTokenizer
from model_fixtures import CHECKPOINTS, hf_checkpoint, hf_model

TOKENS = torch.tensor([1, 5, 9, 13, 20, 7, 7, 30, 100, 127, 4, 66, 90, 3, 17, 18, 19, 120] * 4)


def assert_close_relative(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    """Max abs difference within rtol of the reference's largest magnitude."""
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= rtol * ref.abs().max().item(), f"max abs error {err} vs scale {ref.abs().max().item()}"


@pytest.mark.parametrize("layer_ops", ["torch", "kernels"])
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_prompt_logits_match_transformers(name, layer_ops):
    # "kernels": the layer-op kernels' CPU references (rms_norm with the residual add, rotary_embedding,
    # silu_and_mul), which the model runs on CUDA.
    loaded = load(hf_checkpoint(name), device="cpu")
    loaded.model.layer_ops = layer_ops
    with torch.no_grad():
        ref = hf_model(name)(TOKENS[None]).logits[0]
        ours = loaded.model.compute_logits(loaded.model(TOKENS, torch.arange(len(TOKENS))))
    assert ours.dtype == torch.float32
    assert_close_relative(ours, ref)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_layer_op_kernels_equal_the_torch_formulas_in_bfloat16(name):
    # Same roundings as the torch path; what differs is the order of rms_norm's float32 sums, and
    # torch's CPU attention may pick another kernel for the strided q/k views the in-place rope leaves
    # (bf16 ulps that the layers carry on).
    model = load(hf_checkpoint(name), device="cpu").model.to(torch.bfloat16)
    with torch.no_grad():
        model.layer_ops = "torch"
        ref = model(TOKENS, torch.arange(len(TOKENS)))
        model.layer_ops = "kernels"
        ours = model(TOKENS, torch.arange(len(TOKENS)))
    assert (ours.float() - ref.float()).abs().max().item() <= 3e-2 * ref.float().abs().max().item()


def test_layer_ops_choice_is_checked(monkeypatch):
    model, _ = build_tiny_model(seed=0)
    monkeypatch.setenv("BATCHLLM_LAYER_OPS", "fused")
    with pytest.raises(ValueError, match="layer ops must be 'auto', 'kernels' or 'torch', got 'fused'"):
        model(TOKENS[:4], torch.arange(4))


def test_checkpoint_set_covers_every_variant():
    configs = [load(hf_checkpoint(name), device="cpu").config for name in CHECKPOINTS]
    assert {c.architecture for c in configs} == {"LlamaForCausalLM", "MistralForCausalLM",
                                                 "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
    assert {c.rope_type for c in configs} >= {"default", "linear", "llama3"}
    assert {c.tie_word_embeddings for c in configs} == {True, False}
    assert any(c.qk_norm for c in configs) and any(c.qkv_bias and not c.o_bias for c in configs)
    assert any(c.head_dim * c.num_heads != c.hidden_size for c in configs)
    assert {c.num_heads // c.num_kv_heads for c in configs} >= {1, 2, 4}


def test_llama3_rope_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    hf = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_theta=500000.0, rope_scaling=scaling)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ours = ModelConfig.from_hf(hf.to_dict())
    assert ours.rope_type == "llama3"
    torch.testing.assert_close(ours.rope_inv_freq(), expected, rtol=0, atol=0)
    # The scaling changes the low frequencies (a no-op would pass the parity tests on short inputs).
    assert not torch.equal(ours.replace(rope_type="default").rope_inv_freq(), expected)


def test_config_from_transformers4_fields():
    hf = dict(architectures=["LlamaForCausalLM"], hidden_size=64, num_attention_heads=4,
              num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128, vocab_size=300,
              rope_theta=500000.0, max_position_embeddings=2048, eos_token_id=[5, 6],
              rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=1024))
    config = ModelConfig.from_hf(hf)
    assert (config.head_dim, config.rope_theta, config.rope_type) == (16, 500000.0, "llama3")
    assert config.rope_original_max_position == 1024 and config.eos_token_ids == (5, 6)


def test_mistral_sliding_window_caps_context():
    hf = dict(architectures=["MistralForCausalLM"], hidden_size=64, num_attention_heads=4,
              num_hidden_layers=1, intermediate_size=64, vocab_size=100,
              max_position_embeddings=32768, sliding_window=4096)
    assert ModelConfig.from_hf(hf).max_position_embeddings == 4096
    qwen = dict(hf, architectures=["Qwen2ForCausalLM"], use_sliding_window=False)
    assert ModelConfig.from_hf(qwen).max_position_embeddings == 32768


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["GPT2LMHeadModel"]), "unsupported architecture"),
    (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4)), "rope type 'yarn'"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(num_key_value_heads=3), "multiple of num_kv_heads"),
])
def test_unsupported_configs_are_named(change, message):
    hf = dict(architectures=["LlamaForCausalLM"], hidden_size=64, num_attention_heads=4,
              num_hidden_layers=1, intermediate_size=64, vocab_size=100)
    with pytest.raises(ValueError, match=message) as info:
        ModelConfig.from_hf({**hf, **change}, source="/m/config.json")
    assert "/m/config.json" in str(info.value)


def test_unsupported_architecture_is_its_own_error():
    with pytest.raises(UnsupportedModelError):
        ModelConfig.from_hf(dict(model_type="gpt2", hidden_size=8))


@pytest.mark.parametrize("name, billions", [("llama-1b", 1.10), ("qwen2.5-7b-shape", 7.6)])
def test_named_shapes_have_the_documented_size(name, billions):
    config = ModelConfig.from_name(name)
    assert abs(config.num_params / 1e9 - billions) < 0.05
    assert config.head_dim * config.num_heads == config.hidden_size


def test_llama_1b_kv_bytes_per_token():
    assert ModelConfig.from_name("llama-1b").kv_bytes_per_token(torch.bfloat16) == 32 * 1024


def test_num_params_counts_the_module():
    config = ModelConfig.from_name("tiny").replace(qkv_bias=True, o_bias=True, mlp_bias=True,
                                                   qk_norm=True, tie_word_embeddings=True)
    model = LlamaModel(config)
    assert config.num_params == sum(p.numel() for p in model.parameters())


def test_tiny_model_matches_its_shape_and_tokenizer():
    config = tiny_config()
    shape = NAMED_SHAPES["tiny"]
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads,
            config.head_dim, config.intermediate_size) == (64, 2, 4, 2, 16, 128)
    assert config.vocab_size == ByteTokenizer().vocab_size == shape["vocab_size"]
    assert config.max_position_embeddings >= 4096


def test_tiny_model_is_seeded():
    first, _ = build_tiny_model(seed=0)
    again, _ = build_tiny_model(seed=0)
    other, _ = build_tiny_model(seed=1)
    for (name, a), b, c in zip(first.state_dict().items(), again.state_dict().values(),
                               other.state_dict().values()):
        assert torch.equal(a, b), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(a, c), name


def test_tiny_model_forward_shapes():
    model, tokenizer = build_tiny_model()
    ids = torch.tensor(tokenizer.encode("hello tiny model"))
    with torch.no_grad():
        hidden = model(ids, torch.arange(len(ids)))
        logits = model.compute_logits(hidden[-2:])
    assert hidden.shape == (len(ids), 64) and logits.shape == (2, tokenizer.vocab_size)
    assert torch.isfinite(logits).all()
