"""The baseline users run today: transformers ``generate`` on the same weights and prompts.

A named random-weight shape is rebuilt with the loader's seed (same weights as ``LLM(model=name)``)
and copied into the matching transformers model (un-fusing ``wqkv``/``w13`` through the loader's
tensor-name table); a checkpoint directory is loaded by transformers itself. Prompts run in batches
of 64 sequences, left-padded, every sequence forced to the batch's longest ``max_tokens`` (EOS
disabled); only the tokens each request asked for count as output.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch

HF_BATCH_SEQUENCES = 64
PAD_TOKEN_ID = 0


def hf_config(config):
    """transformers config with the shape and options of a batchllm ``ModelConfig``."""
    import transformers

    if config.rope_type != "default":
        raise ValueError(f"rope type {config.rope_type!r}: load the checkpoint directory instead")
    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                  num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                  head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
                  rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
                  tie_word_embeddings=config.tie_word_embeddings, bos_token_id=config.bos_token_id,
                  eos_token_id=None, pad_token_id=PAD_TOKEN_ID)
    arch = config.architecture
    if arch in ("LlamaForCausalLM", "MistralForCausalLM"):
        if config.qkv_bias != config.o_bias:
            raise ValueError("Llama with q/k/v bias but no o bias has no transformers equivalent")
        return transformers.LlamaConfig(**common, attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    if arch == "Qwen2ForCausalLM":
        return transformers.Qwen2Config(**common)
    if arch == "Qwen3ForCausalLM":
        return transformers.Qwen3Config(**common, attention_bias=config.qkv_bias)
    raise ValueError(f"no transformers baseline for architecture {arch!r}")


@torch.no_grad()
def to_hf_model(model, device: torch.device, dtype: torch.dtype):
    """A transformers model holding ``model``'s weights (a batchllm ``LlamaModel``)."""
    import transformers

    from batchllm_core.loader import hf_weight_targets

    config = model.config
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config(config), dtype=dtype,
                                                           attn_implementation="sdpa")
    ours = dict(model.named_parameters(remove_duplicate=False))
    state = {hf_name: ours[name][begin:end] for hf_name, (name, begin, end) in hf_weight_targets(config).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [name for name in missing if not (config.tie_word_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto transformers: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()


def load_hf_model(model_spec: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The transformers model for ``model_spec`` (a named shape or a checkpoint directory)."""
    import transformers

    if Path(model_spec).is_dir():
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_spec, dtype=dtype, attn_implementation="sdpa")
        return hf.to(device).eval()
    from batchllm_core.loader import build_random_model

    loaded = build_random_model(model_spec, seed, dtype, device)
    hf = to_hf_model(loaded.model, device, dtype)
    del loaded
    return hf


@dataclass
class HFRequest:
    prompt_token_ids: np.ndarray
    max_tokens: int
    n: int = 1
    temperature: float = 0.0


def batches(requests: Sequence[HFRequest], sequences_per_batch: int = HF_BATCH_SEQUENCES) -> List[List[HFRequest]]:
    """Requests in input order, cut into batches of at most ``sequences_per_batch`` sequences
    (one sample count and temperature per batch: ``generate`` takes them per call)."""
    out: List[List[HFRequest]] = []
    for request in requests:
        last = out[-1] if out else None
        if (last is None or sum(r.n for r in last) + request.n > sequences_per_batch
                or (last[0].n, last[0].temperature) != (request.n, request.temperature)):
            out.append([request])
        else:
            last.append(request)
    return out


@torch.no_grad()
def generate_batch(hf, batch: Sequence[HFRequest], device: torch.device) -> dict:
    """Run one batch through ``generate``; returns its padded prefill tokens and useful output tokens."""
    import transformers

    longest = max(len(r.prompt_token_ids) for r in batch)
    input_ids = torch.full((len(batch), longest), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, request in enumerate(batch):  # left padding, as generate expects for decoder-only models
        length = len(request.prompt_token_ids)
        input_ids[row, longest - length:] = torch.as_tensor(request.prompt_token_ids, dtype=torch.long)
        attention_mask[row, longest - length:] = 1
    new_tokens = max(r.max_tokens for r in batch)
    sampling = batch[0].temperature > 0
    config = transformers.GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=None, do_sample=sampling,
        # Plain temperature sampling, as the engine's workloads ask (top_k 0 disables transformers'
        # default top-k of 50).
        temperature=batch[0].temperature if sampling else None, top_k=0 if sampling else None,
        top_p=1.0 if sampling else None,
        num_return_sequences=batch[0].n, eos_token_id=None, pad_token_id=PAD_TOKEN_ID, use_cache=True)
    out = hf.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                      generation_config=config)
    generated = out.shape[1] - longest
    if generated != new_tokens:
        raise RuntimeError(f"transformers generated {generated} tokens, asked for {new_tokens}")
    return {"prefill_tokens": len(batch) * longest,
            "output_tokens": sum(r.n * r.max_tokens for r in batch)}


def run_baseline(hf, requests: Sequence[HFRequest], device: torch.device, max_batches: int | None = None) -> dict:
    """Time ``generate`` over the batches (the first ``max_batches`` of them when given).

    Returns seconds, output tokens, padded prefill tokens and how many batches ran of how many.
    """
    all_batches = batches(requests)
    to_run = all_batches[:max_batches] if max_batches else all_batches
    generate_batch(hf, [HFRequest(np.asarray(requests[0].prompt_token_ids[:16]), 2)], device)  # warm-up
    _synchronize(device)
    totals = {"prefill_tokens": 0, "output_tokens": 0, "prompt_tokens": 0}
    start = time.perf_counter()
    for batch in to_run:
        result = generate_batch(hf, batch, device)
        totals["prefill_tokens"] += result["prefill_tokens"]
        totals["output_tokens"] += result["output_tokens"]
        totals["prompt_tokens"] += sum(len(r.prompt_token_ids) for r in batch)
    _synchronize(device)
    return {**totals, "seconds": time.perf_counter() - start, "batches_run": len(to_run),
            "batches_total": len(all_batches)}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
