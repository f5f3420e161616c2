"""What ``LLM()`` settles before its first job: the device, the model, the default KV pool.

The device is chosen from the model's config before any weight is loaded, so that "auto" never puts
a model on a GPU whose CUDA kernels cannot run it.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

__all__ = ["resolve_device", "pick_device", "load", "default_cpu_kv_bytes"]

_NOISE_WARNING = ("LLM(): no model given, using the embedded tiny model with random weights; "
                  "it proves the machinery, its text is noise")
_warned_noise = False

# Default KV pool on CPU: a share of RAM, capped (a pool much larger than the job only costs
# allocation time). On CUDA it is profiled (kv_sizing.py).
_CPU_KV_SHARE = 0.10
_CPU_KV_CAP_BYTES = 1 << 30


def resolve_device(device) -> torch.device:
    """"auto": CUDA when batchllm has CUDA kernels and torch sees a device, else CPU."""
    from . import cuda_available

    usable = cuda_available() and torch.cuda.is_available()
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if usable else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from err
    if resolved.type == "cuda" and not usable:
        raise ValueError(f"device {device!r}: batchllm was built without CUDA kernels or no CUDA device "
                         "is usable (use device='cpu' or 'auto')")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return resolved


def pick_device(model: Optional[str], dtype, device) -> torch.device:
    """The device to load on, decided from the config before any weight is loaded.

    "auto" picks CUDA only when the CUDA kernels can run the model (head dim built, float16 or
    bfloat16); otherwise it warns and runs on the CPU (the embedded tiny model, head dim 16, always
    does). An explicit CUDA device the kernels cannot serve is an error naming why.
    """
    from .model_runner import ModelRunner

    resolved = resolve_device(device)
    if resolved.type != "cuda":
        return resolved
    config = _config_of(model)
    if config is None:  # not a model we know how to read: the loader reports it
        return resolved
    from .loader import resolve_dtype

    reason = ModelRunner.unsupported_reason(config, resolved, resolve_dtype(dtype, resolved))
    if reason is None:
        return resolved
    if isinstance(device, str) and device == "auto":
        if model is not None:  # the tiny model always runs on the CPU; no news there
            warnings.warn(f"LLM(device='auto'): {reason}; running on the CPU", UserWarning, stacklevel=3)
        return torch.device("cpu")
    raise ValueError(f"device {device!r}: {reason}")


def _config_of(model: Optional[str]):
    """The ModelConfig that ``model`` names, read without loading weights (None if unreadable)."""
    from pathlib import Path

    from .models.config import NAMED_SHAPES, ModelConfig
    from .models.tiny import tiny_config

    if model is None or model == "tiny":
        return tiny_config()
    if str(model) in NAMED_SHAPES:
        return ModelConfig.from_name(str(model))
    config_file = Path(model) / "config.json"
    if config_file.is_file():
        try:
            return ModelConfig.from_hf_file(config_file)
        except (ValueError, KeyError, OSError):
            return None
    return None


def default_cpu_kv_bytes() -> int:
    total_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(total_bytes * _CPU_KV_SHARE, _CPU_KV_CAP_BYTES))


def load(model: Optional[str], dtype, device: torch.device):
    """(model, config, tokenizer or None, eos token ids, torch dtype) through the loader."""
    global _warned_noise
    from .loader import load_model

    if model is None and not _warned_noise:
        warnings.warn(_NOISE_WARNING, UserWarning, stacklevel=3)
        _warned_noise = True
    loaded = load_model(model, dtype=dtype, device=device)
    eos = set(loaded.eos_token_ids)
    return loaded.model, loaded.config, loaded.tokenizer, sorted(eos), loaded.dtype
