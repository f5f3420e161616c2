"""Llama-family decoder models (Llama 2/3/3.x, Mistral, Qwen2, Qwen3) and their configuration."""
from .config import NAMED_SHAPES, ModelConfig, UnsupportedModelError
from .llama import LlamaModel, init_random_weights_

__all__ = ["NAMED_SHAPES", "LlamaModel", "ModelConfig", "UnsupportedModelError",
           "init_random_weights_"]
