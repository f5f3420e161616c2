"""Tiny random-weight Hugging Face checkpoints (transformers, float32) for parity tests.

Each checkpoint is built once per test process (cached) into a temporary directory removed at exit:
config.json, model.safetensors (or shards), a word-level ``tokenizers`` tokenizer trained here,
tokenizer_config.json with a chat template, generation_config.json.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a shared prefix is computed once for every prompt of the group",
    "batch jobs plan globally and decode many sequences together",
    "hello world how are you today ?",
]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
                 "{{ eos_token }} {% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")

_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=128,
               max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
               pad_token_id=3)

# name -> (transformers class name, config overrides). Between them: llama3 rope scaling, linear
# scaling, qkv bias, o/mlp bias, q/k norm, tied and untied embeddings, head dims other than
# hidden/heads, GQA ratios 1, 2 and 4.
CHECKPOINTS: dict[str, tuple[str, dict]] = {
    "llama3": ("LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))),
    "llama-tied-bias": ("LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=4, head_dim=32, tie_word_embeddings=True,
        attention_bias=True, mlp_bias=True,
        rope_scaling=dict(rope_type="linear", factor=2.0))),
    "mistral": ("MistralForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False, sliding_window=4096)),
    "qwen2": ("Qwen2ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": ("Qwen3ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)),
}

_ROOT = Path(tempfile.mkdtemp(prefix="batchllm-models-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def hf_checkpoint(name: str, max_shard_size: str | None = None) -> Path:
    """Directory of checkpoint ``name`` (of CHECKPOINTS), saved sharded if ``max_shard_size``."""
    path = _ROOT / (name + ("-sharded" if max_shard_size else ""))
    model = hf_model(name)
    if max_shard_size:
        model.save_pretrained(path, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(path)
    hf_tokenizer().save_pretrained(path)
    return path


@functools.lru_cache(maxsize=None)
def hf_model(name: str):
    """The transformers model of checkpoint ``name``, float32, eval mode, seeded weights."""
    import transformers

    class_name, overrides = CHECKPOINTS[name]
    model_class = getattr(transformers, class_name)
    config = model_class.config_class(**_COMMON, **overrides)
    torch.manual_seed(1234)
    model = model_class(config).eval()
    with torch.no_grad():  # default init leaves norms at 1 and biases at 0: randomize to test them
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:  # weights and biases
                param.normal_(0.0, 0.1)
    return model


@functools.lru_cache(maxsize=None)
def hf_tokenizer():
    """A word-level tokenizer trained on SENTENCES, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    backend.train_from_iterator(SENTENCES + [CHAT_TEMPLATE], trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
