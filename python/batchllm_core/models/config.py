"""Model configuration: one dataclass for every supported Llama-family decoder.

Built either from a Hugging Face ``config.json`` (:meth:`ModelConfig.from_hf`) or from a named shape
of WORKLOADS.md (:meth:`ModelConfig.from_name`, random-weight benchmark models).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented here."""


# Hugging Face architecture name -> the options that differ between the variants.
#   qkv_bias: bias on q/k/v projections (Qwen2 always; Llama/Qwen3 through `attention_bias`)
#   qk_norm:  RMSNorm over head_dim on q and k before rope (Qwen3)
_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"qkv_bias": None, "qk_norm": False},
    "MistralForCausalLM": {"qkv_bias": False, "qk_norm": False},
    "Qwen2ForCausalLM": {"qkv_bias": True, "qk_norm": False},
    "Qwen3ForCausalLM": {"qkv_bias": None, "qk_norm": True},
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_ROPE_TYPES = ("default", "linear", "llama3")

# The named shapes of WORKLOADS.md (random weights, for benchmarks). Vocab of `tiny` is the byte-level
# tokenizer's (see batchllm_core.tokenizer.ByteTokenizer).
NAMED_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(architecture="LlamaForCausalLM", vocab_size=261, hidden_size=64, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                 max_position_embeddings=32768, bos_token_id=256, eos_token_ids=(257, 260)),
    "llama-1b": dict(architecture="LlamaForCausalLM", vocab_size=32000, hidden_size=2048,
                     num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                     intermediate_size=8192, max_position_embeddings=32768,
                     bos_token_id=1, eos_token_ids=(2,)),
    "qwen2.5-7b-shape": dict(architecture="Qwen2ForCausalLM", vocab_size=152064, hidden_size=3584,
                             num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                             intermediate_size=18944, max_position_embeddings=32768,
                             rope_theta=1_000_000.0, rms_norm_eps=1e-6, qkv_bias=True,
                             eos_token_ids=(151643,)),
}


@dataclass(frozen=True)
class ModelConfig:
    """Shape and options of a Llama-family decoder (Llama 2/3/3.x, Mistral, Qwen2, Qwen3).

    Rope: ``rope_type`` "default" (plain), "linear" (positions / factor) or "llama3" (Llama 3.1
    frequency-dependent scaling with ``rope_factor``, ``rope_low_freq_factor``,
    ``rope_high_freq_factor``, ``rope_original_max_position``).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"ModelConfig.head_dim must be even for rope, got {self.head_dim}")
        if self.rope_type not in _ROPE_TYPES:
            raise UnsupportedModelError(f"rope type {self.rope_type!r} is not supported "
                                        f"(supported: {', '.join(_ROPE_TYPES)})")

    @property
    def num_params(self) -> int:
        """Number of parameters (tied embeddings counted once)."""
        h, d, i = self.hidden_size, self.head_dim, self.intermediate_size
        qkv = h * (self.num_heads + 2 * self.num_kv_heads) * d
        qkv += (self.num_heads + 2 * self.num_kv_heads) * d if self.qkv_bias else 0
        attn = qkv + self.num_heads * d * h + (h if self.o_bias else 0)
        attn += 2 * d if self.qk_norm else 0
        mlp = 3 * h * i + ((2 * i + h) if self.mlp_bias else 0)
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * h) + h + embed

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """KV cache bytes one token occupies over all layers (K and V)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * itemsize

    def rope_inv_freq(self) -> torch.Tensor:
        """Rope inverse frequencies, float32 ``[head_dim // 2]``, as Hugging Face computes them."""
        # Explicit CPU: also right while a model is being built under a meta-device context.
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device="cpu").float()
        exponents = exponents / self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** exponents)
        if self.rope_type == "linear":
            return inv_freq / self.rope_factor
        if self.rope_type == "llama3":
            return _llama3_scaled(inv_freq, self.rope_factor, self.rope_low_freq_factor,
                                  self.rope_high_freq_factor, self.rope_original_max_position)
        return inv_freq

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """The named shape of WORKLOADS.md: "tiny", "llama-1b" or "qwen2.5-7b-shape"."""
        if name not in NAMED_SHAPES:
            raise ValueError(f"unknown model shape {name!r}; known: {', '.join(NAMED_SHAPES)}")
        return cls(**{**NAMED_SHAPES[name], **overrides})

    @classmethod
    def from_hf_file(cls, path: str | Path) -> ModelConfig:
        """Read a Hugging Face ``config.json``; errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: model config not found")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        return cls.from_hf(hf, source=str(path))

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face config dict (transformers 4.x or 5.x field names)."""
        architecture = _architecture(hf, source)
        options = _ARCHITECTURES[architecture]
        try:
            hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
            fields: dict[str, Any] = dict(
                architecture=architecture, vocab_size=int(hf["vocab_size"]), hidden_size=hidden,
                num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                intermediate_size=int(hf["intermediate_size"]),
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                mlp_bias=bool(hf.get("mlp_bias", False)),
            )
        except KeyError as err:
            raise ValueError(f"{source}: missing field {err.args[0]!r}") from err
        attention_bias = bool(hf.get("attention_bias", False))
        fields["qkv_bias"] = attention_bias if options["qkv_bias"] is None else options["qkv_bias"]
        # Qwen2's biases are on q/k/v only; Llama's and Qwen3's `attention_bias` covers o_proj too.
        fields["o_bias"] = attention_bias and architecture != "Qwen2ForCausalLM"
        fields["qk_norm"] = options["qk_norm"]
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported "
                                        "(only silu)")
        fields.update(_rope_fields(hf, source))
        fields["max_position_embeddings"] = _attention_window(hf, fields["max_position_embeddings"])
        bos = hf.get("bos_token_id")
        fields["bos_token_id"] = int(bos) if isinstance(bos, int) else None
        fields["eos_token_ids"] = _int_tuple(hf.get("eos_token_id"))
        try:
            return cls(**fields)
        except UnsupportedModelError as err:
            raise UnsupportedModelError(f"{source}: {err}") from err
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err


def _architecture(hf: dict[str, Any], source: str) -> str:
    names = list(hf.get("architectures") or [])
    if not names and hf.get("model_type") in _MODEL_TYPES:
        names = [_MODEL_TYPES[hf["model_type"]]]
    for name in names:
        if name in _ARCHITECTURES:
            return name
    raise UnsupportedModelError(
        f"{source}: unsupported architecture {names or hf.get('model_type')!r}; "
        f"supported: {', '.join(_ARCHITECTURES)}")


def _rope_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    # transformers 5 writes `rope_parameters` (with rope_theta inside); 4.x wrote `rope_theta` and
    # `rope_scaling` at the top level.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise UnsupportedModelError(f"{source}: rope type {rope_type!r} is not supported "
                                    f"(supported: {', '.join(_ROPE_TYPES)})")
    fields: dict[str, Any] = dict(rope_theta=float(theta), rope_type=rope_type)
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError(f"{source}: partial_rotary_factor is not supported")
    if rope_type in ("linear", "llama3"):
        fields["rope_factor"] = float(rope["factor"])
    if rope_type == "llama3":
        fields.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                      rope_high_freq_factor=float(rope["high_freq_factor"]),
                      rope_original_max_position=int(rope["original_max_position_embeddings"]))
    return fields


def _attention_window(hf: dict[str, Any], max_positions: int) -> int:
    """Context length we can serve exactly: full attention equals sliding-window attention only
    while a sequence fits in the window, so a sliding window caps the context."""
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", True)  # Qwen2/3 configs carry a flag; Mistral does not
    if window and uses_window:
        return min(max_positions, int(window))
    return max_positions


def _int_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _llama3_scaled(inv_freq: torch.Tensor, factor: float, low_freq_factor: float,
                   high_freq_factor: float, original_max_position: int) -> torch.Tensor:
    """Llama 3.1 rope scaling: long wavelengths divided by `factor`, short ones kept, the band
    between interpolated smoothly (same arithmetic as transformers' `_compute_llama3_parameters`)."""
    low_freq_wavelen = original_max_position / low_freq_factor
    high_freq_wavelen = original_max_position / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)
