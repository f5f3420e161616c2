"""The embedded default model: a tiny Llama-architecture decoder with seeded random weights.

Shape `tiny` of WORKLOADS.md (hidden 64, 2 layers, 4 heads, 2 KV heads, head dim 16,
intermediate 128) over the byte-level vocabulary of :class:`batchllm_core.tokenizer.ByteTokenizer`.
It exercises every part of the engine on a CPU in milliseconds; its text is noise.
"""
from __future__ import annotations

import torch

from ..tokenizer import ByteTokenizer
from .config import ModelConfig
from .llama import LlamaModel, init_random_weights_

TINY_SEED = 0


def tiny_config() -> ModelConfig:
    """Config of the embedded model (its vocab is the byte tokenizer's, its context 32768)."""
    config = ModelConfig.from_name("tiny")
    tokenizer = ByteTokenizer()
    assert config.vocab_size == tokenizer.vocab_size, "tiny shape and byte tokenizer disagree"
    return config.replace(bos_token_id=tokenizer.bos_token_id, eos_token_ids=tokenizer.eos_token_ids)


def build_tiny_model(seed: int = TINY_SEED, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[LlamaModel, ByteTokenizer]:
    """The embedded model (eval mode, weights seeded by ``seed``) and its tokenizer.

    Examples
    --------
    >>> model, tokenizer = build_tiny_model()
    >>> model.config.vocab_size == tokenizer.vocab_size
    True
    """
    model = LlamaModel(tiny_config())
    init_random_weights_(model, seed)
    return model.to(device=device, dtype=dtype).eval(), ByteTokenizer()
