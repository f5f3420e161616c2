"""Tiny random-weight Hugging Face checkpoints (float32) with a trained byte-level BPE tokenizer.

Used by the engine and parity tests: each architecture of the Llama family is written to a directory
in the HF layout (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json) exactly as ``save_pretrained`` writes it, so loading it exercises the same
path as a real downloaded model.
"""
from __future__ import annotations

from pathlib import Path

import torch

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Question: what is the capital of France? Answer: Paris.",
    "Question: what is two plus two? Answer: four.",
    "Translate to German: good morning -> guten Morgen; thank you -> danke.",
    "def add(a, b):\n    return a + b\n",
    "Once upon a time there was a small model that only produced noise.",
]


def build_tokenizer(directory: Path):
    """Train a byte-level BPE (about 300 tokens) and save it with <s>/</s> as BOS/EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS, trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(str(directory))
    return fast


def _config(arch: str, vocab_size: int, bos: int, eos: int):
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=False)
    if arch == "llama":
        return transformers.LlamaConfig(**common, rope_theta=10000.0)
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None, rope_theta=10000.0)
    if arch == "qwen2":
        # Tied embeddings, as the small Qwen2 checkpoints ship.
        return transformers.Qwen2Config(**{**common, "tie_word_embeddings": True}, rope_theta=10000.0)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=32, rope_theta=10000.0)
    raise ValueError(f"unknown architecture {arch!r}")


def build_checkpoint(arch: str, directory: Path, seed: int = 0):
    """Write a random float32 ``arch`` checkpoint and tokenizer into ``directory``; returns the HF model."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    config = _config(arch, vocab_size=len(tokenizer) + 4, bos=tokenizer.bos_token_id,
                     eos=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Larger-than-init weights make the logits peaked enough that greedy ties and near-ties
    # (which float reordering could flip) are vanishingly unlikely.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.mul_(4.0)
    model.save_pretrained(str(directory))
    model.generation_config.save_pretrained(str(directory))
    return model, tokenizer
