"""Model loading: a local Hugging Face directory, a named random-weight shape, or the embedded tiny
model.

A Hugging Face directory holds ``config.json``, ``model.safetensors`` or shards listed in
``model.safetensors.index.json``, ``tokenizer.json`` (+ ``tokenizer_config.json``,
``generation_config.json``). Separate q/k/v and gate/up tensors are copied into the model's fused
``wqkv`` and ``w13`` here. Errors name the file and the tensor.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .models.config import NAMED_SHAPES, ModelConfig
from .models.llama import LlamaModel, init_random_weights_
from .models.tiny import TINY_SEED, build_tiny_model
from .tokenizer import ByteTokenizer, Tokenizer

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "half": torch.float16,
           "fp16": torch.float16}
# Tensors of some checkpoints that carry nothing we need (recomputed or absent here).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that does not fit its config: missing, unexpected or mis-shaped tensors."""


@dataclass
class LoadedModel:
    """A model ready to run, with what the engine needs around it.

    Attributes
    ----------
    model : LlamaModel
        In eval mode, on ``device`` in ``dtype``.
    config : ModelConfig
    tokenizer : Tokenizer, ByteTokenizer or None
        None for random-weight shapes other than ``tiny`` (they run on token ids).
    eos_token_ids : tuple of int
        Token ids that end generation (generation_config.json, else config.json, else tokenizer).
    name : str
        The directory, or the shape name.
    """

    model: LlamaModel
    config: ModelConfig
    tokenizer: Tokenizer | ByteTokenizer | None
    eos_token_ids: tuple[int, ...]
    name: str

    @property
    def max_model_len(self) -> int:
        return self.config.max_position_embeddings

    @property
    def device(self) -> torch.device:
        return self.model.output.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.output.weight.dtype


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda when a CUDA device is usable, else cpu."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on cuda, float32 on cpu; names such as "bfloat16" or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def load(model: str | Path | None = None, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "auto", seed: int = TINY_SEED) -> LoadedModel:
    """Load what ``LLM(model=...)`` names.

    Parameters
    ----------
    model : str, Path or None
        None: the embedded tiny model; a directory: a Hugging Face checkpoint; a name of
        ``NAMED_SHAPES`` ("tiny", "llama-1b", "qwen2.5-7b-shape"): random weights seeded by ``seed``.
    dtype, device : see :func:`resolve_dtype`, :func:`resolve_device`.
    """
    if model is None:
        return build_random_model("tiny", seed, dtype, device)
    path = Path(model)
    if path.is_dir():
        return load_pretrained(path, dtype, device)
    if str(model) in NAMED_SHAPES:
        return build_random_model(str(model), seed, dtype, device)
    raise FileNotFoundError(f"{model}: not a model directory and not a named shape "
                            f"({', '.join(NAMED_SHAPES)})")


load_model = load


def build_random_model(shape: str | ModelConfig, seed: int = 0, dtype: str | torch.dtype = "auto",
                       device: str | torch.device = "auto") -> LoadedModel:
    """A named shape of WORKLOADS.md (or any ModelConfig) with seeded random weights, for benchmarks.

    ``tiny`` comes with the byte-level tokenizer and is seeded on the CPU (identical weights on
    every device); other shapes are filled on ``device`` directly (fast for 7B on a GPU; same
    weights for the same seed, device and dtype) and have no tokenizer: they run on token ids.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if shape == "tiny":
        model, tokenizer = build_tiny_model(seed, device, dtype)
        return LoadedModel(model, model.config, tokenizer, tokenizer.eos_token_ids, shape)
    config = shape if isinstance(shape, ModelConfig) else ModelConfig.from_name(shape)
    model = _empty_model(config, device, dtype)
    init_random_weights_(model, seed)
    name = shape if isinstance(shape, str) else f"random {config.architecture}"
    return LoadedModel(model.eval(), config, None, config.eos_token_ids, name)


def load_pretrained(path: str | Path, dtype: str | torch.dtype = "auto",
                    device: str | torch.device = "auto") -> LoadedModel:
    """Load a local Hugging Face directory (config, safetensors, tokenizer)."""
    path = Path(path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    config = ModelConfig.from_hf_file(path / "config.json")
    files = checkpoint_files(path)
    model = _empty_model(config, device, dtype)
    load_weights(model, files)
    tokenizer = Tokenizer.from_pretrained(path)
    eos = tokenizer.eos_token_ids or config.eos_token_ids
    return LoadedModel(model.eval(), config, tokenizer, tuple(eos), str(path))


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a directory: the shards of the index, or ``model.safetensors``."""
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index_file}: no valid 'weight_map' ({err})") from err
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                tensors = [t for t, f in weight_map.items() if path / f == file]
                raise FileNotFoundError(f"{file}: shard listed in {index_file.name} is missing "
                                        f"(holds {tensors[0]}{' and others' if len(tensors) > 1 else ''})")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                            "(only safetensors checkpoints are supported)")


@torch.no_grad()
def load_weights(model: LlamaModel, files: list[Path]) -> None:
    """Copy the tensors of Hugging Face safetensors files into ``model`` (fusing q/k/v, gate/up).

    Raises
    ------
    CheckpointError
        A tensor with the wrong shape or an unexpected name (naming tensor and file), or a
        tensor the model needs that no file holds.
    """
    from safetensors import safe_open

    targets = hf_weight_targets(model.config)
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            for name in reader.keys():
                if name not in targets:
                    if _is_ignorable(name, model.config):
                        continue
                    raise CheckpointError(f"{file}: unexpected tensor {name!r} "
                                          f"(not part of a {model.config.architecture})")
                param_name, row_begin, row_end = targets[name]
                destination = params[param_name][row_begin:row_end]
                tensor = reader.get_tensor(name)
                if tuple(tensor.shape) != tuple(destination.shape):
                    raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                          f"config.json implies {tuple(destination.shape)}")
                destination.copy_(tensor)
                filled.add(name)
    missing = [name for name in targets if name not in filled]
    if missing:
        where = ", ".join(f.name for f in files)
        raise CheckpointError(f"tensor {missing[0]!r} not found in {where}"
                              + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""))


def hf_weight_targets(config: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """Hugging Face tensor name -> (our parameter name, first row, end row) it fills."""
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    inter, hidden = config.intermediate_size, config.hidden_size
    targets = {"model.embed_tokens.weight": ("tok_embeddings.weight", 0, config.vocab_size),
               "model.norm.weight": ("norm.weight", 0, hidden)}
    if not config.tie_word_embeddings:
        targets["lm_head.weight"] = ("output.weight", 0, config.vocab_size)
    kinds = ["weight", "bias"]
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        targets[hf + "input_layernorm.weight"] = (ours + "attention_norm.weight", 0, hidden)
        targets[hf + "post_attention_layernorm.weight"] = (ours + "ffn_norm.weight", 0, hidden)
        for kind in kinds[:1 + config.qkv_bias]:
            wqkv = ours + "attention.wqkv." + kind
            targets[hf + "self_attn.q_proj." + kind] = (wqkv, 0, q_rows)
            targets[hf + "self_attn.k_proj." + kind] = (wqkv, q_rows, q_rows + kv_rows)
            targets[hf + "self_attn.v_proj." + kind] = (wqkv, q_rows + kv_rows, q_rows + 2 * kv_rows)
        for kind in kinds[:1 + config.o_bias]:
            targets[hf + "self_attn.o_proj." + kind] = (ours + "attention.wo." + kind, 0, hidden)
        if config.qk_norm:
            targets[hf + "self_attn.q_norm.weight"] = (ours + "attention.q_norm.weight", 0, config.head_dim)
            targets[hf + "self_attn.k_norm.weight"] = (ours + "attention.k_norm.weight", 0, config.head_dim)
        for kind in kinds[:1 + config.mlp_bias]:
            w13 = ours + "feed_forward.w13." + kind
            targets[hf + "mlp.gate_proj." + kind] = (w13, 0, inter)
            targets[hf + "mlp.up_proj." + kind] = (w13, inter, 2 * inter)
            targets[hf + "mlp.down_proj." + kind] = (ours + "feed_forward.w2." + kind, 0, hidden)
    return targets


def _is_ignorable(name: str, config: ModelConfig) -> bool:
    # Tied checkpoints sometimes store lm_head anyway (a copy of the embedding).
    return name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_word_embeddings)


def _empty_model(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> LlamaModel:
    """Uninitialized model on ``device`` in ``dtype``, without ever running the default init
    (built on the meta device: a 7B model would otherwise spend minutes in kaiming init)."""
    with torch.device("meta"):
        model = LlamaModel(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    return model
