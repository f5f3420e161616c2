"""One decoder for the Llama family: Llama 2/3/3.x, Mistral, Qwen2, Qwen3 (gpt-fast style).

Differences between the variants are options of :class:`ModelConfig`: q/k/v (and o) biases, Qwen3's
q/k RMSNorm, rope scaling, tied embeddings, head dim and GQA ratio. q/k/v projections are fused into
``wqkv`` and gate/up into ``w13``; the loader fills them from the separate Hugging Face tensors.

The model runs a flat ragged batch: ``forward(input_ids [T], positions [T]) -> hidden [T, hidden]``.
Which rows belong to which sequence, and where their KV lives, reaches attention through the step
context (batchllm_core.context), never through ``forward``. Logits are a separate call so that a
step computes them only for the rows it samples.
"""
from __future__ import annotations

import functools
import os
from typing import Generator

import torch
import torch.nn.functional as F
from torch import nn

from ..context import get_context
from .attention import attend, attend_stored, store_step_kv
from .config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled in the input dtype (as Hugging Face Llama does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rope. x ``[T, H, D]``; cos, sin ``[T, D]`` (halves repeated)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Attention(nn.Module):
    """Self-attention with fused q/k/v; ``k_cache``/``v_cache`` are assigned by the ModelRunner."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim ** -0.5
        self.wqkv = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.wo = nn.Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, rope: "Rope") -> torch.Tensor:
        q, k, v = self.project(x, rope)
        out = attend(q, k, v, self.k_cache, self.v_cache, self.scale)
        return self.wo(out.reshape(x.shape[0], self.q_size))

    def project(self, x: torch.Tensor, rope: "Rope",
                qkv_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[T, Hq, D]``, k and v ``[T, Hkv, D]`` of ``x`` (rope applied to q and k). ``qkv_out``:
        ``[T, q_size + 2 kv_size]`` to compute the fused projection into (default: a new tensor)."""
        q, k, v = self._unrotated_qkv(x, qkv_out)
        return (*rope.apply(q, k), v)

    def project_and_store(self, x: torch.Tensor, rope: "Rope",
                          qkv_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`project`, then :meth:`store` of k and v; on the rotary kernel inside a step, one
        launch for both (ops.rotary_embedding's fused store)."""
        context = get_context()
        if rope.kernels and context is not None and self.k_cache is not None and self.v_cache is not None:
            q, k, v = self._unrotated_qkv(x, qkv_out)
            rope.apply(q, k, store=(v, self.k_cache, self.v_cache, context.slot_mapping))
            return q, k, v
        q, k, v = self.project(x, rope, qkv_out)
        self.store(k, v)
        return q, k, v

    def _unrotated_qkv(self, x: torch.Tensor, qkv_out: torch.Tensor | None):
        num_tokens = x.shape[0]
        qkv = self.wqkv(x) if qkv_out is None else _linear_into(x, self.wqkv, qkv_out)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Inside a step, write the rows' K/V to this layer's cache (attention.store_step_kv)."""
        store_step_kv(k, v, self.k_cache, self.v_cache)

    def attend_stored(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        """This layer's attention once :meth:`store` ran (attention.attend_stored)."""
        return attend_stored(q, k, v, self.k_cache, self.v_cache, self.scale, out=out)


def _linear_into(x: torch.Tensor, linear: nn.Linear, out: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` written into ``out`` (``[T, out_features]``): the same GEMM as F.linear."""
    if linear.bias is None:
        return torch.mm(x, linear.weight.t(), out=out)
    return torch.addmm(linear.bias, x, linear.weight.t(), out=out)


class FeedForward(nn.Module):
    """SwiGLU MLP with fused gate/up (``w13``) and down (``w2``) projections."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w13 = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, kernels: bool = False) -> torch.Tensor:
        gate_up = self.w13(x)
        if kernels:
            from .. import ops
            return self.w2(ops.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    """Pre-norm decoder layer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, rope: "Rope") -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope)
        return h + self.feed_forward(self.ffn_norm(h))

    def finish_fused(self, out: torch.Tensor, residual: torch.Tensor, next_norm: RMSNorm) -> torch.Tensor:
        """The layer after its attention, on the layer-op kernels. ``out``: the attention output
        ``[T, Hq, D]``; ``residual``: the running sum of the skip connections, updated in place;
        returns next_norm of the new sum."""
        from .. import ops

        a = self.attention.wo(out.reshape(out.shape[0], self.attention.q_size))
        h = ops.rms_norm(a, self.ffn_norm.weight, self.ffn_norm.eps, residual=residual, out=a)
        f = self.feed_forward(h, kernels=True)
        return ops.rms_norm(f, next_norm.weight, next_norm.eps, residual=residual, out=f)


@functools.lru_cache(maxsize=None)
def _native_cuda() -> bool:
    """Whether the native core was built with CUDA kernels."""
    from .. import build_info
    return bool(build_info()["cuda"])


class Rope:
    """The rope of one forward pass: cos/sin tables for the torch formulas, or the positions and
    inverse frequencies for the rotary_embedding kernel (in place on q and k)."""

    def __init__(self, positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, kernels: bool):
        self.kernels = kernels
        if kernels:
            self.positions = positions if positions.dtype == torch.int32 else positions.int()
            self.inv_freq = inv_freq
        else:
            freqs = positions.float()[:, None] * inv_freq[None, :]
            angles = torch.cat((freqs, freqs), dim=-1)
            self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)

    def apply(self, q: torch.Tensor, k: torch.Tensor, store: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k rotated (in place on the kernel). ``store``: ``(v, k_cache, v_cache, slot_mapping)``,
        the kernel's fused K/V store (ops.rotary_embedding); the kernel path only."""
        if self.kernels:
            from .. import ops
            ops.rotary_embedding(q, k, self.positions, self.inv_freq, store=store)
            return q, k
        if store is not None:
            raise ValueError("Rope.apply: the fused K/V store needs the rotary kernel (kernels=True)")
        return apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin)


class LlamaModel(nn.Module):
    """Decoder-only transformer over a flat ragged token batch.

    Examples
    --------
    >>> model = LlamaModel(ModelConfig.from_name("tiny"))
    >>> hidden = model(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]))   # one sequence, no cache
    >>> model.compute_logits(hidden[-1:]).shape
    torch.Size([1, 261])
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        # Not a buffer: recomputed exactly on any device, unaffected by meta-device construction.
        self._inv_freq = config.rope_inv_freq()
        # "auto": the layer-op kernels on CUDA, the torch formulas elsewhere; "kernels" or "torch"
        # forces one (the CPU kernels are the CUDA kernels' references). BATCHLLM_LAYER_OPS overrides.
        self.layer_ops = "auto"

    def tie_weights(self) -> None:
        """Share the output projection with the embedding when the config ties them (again after
        anything that may have replaced the parameters, e.g. ``to_empty``)."""
        if self.config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @property
    def attention_layers(self) -> list[Attention]:
        """The attention module of each layer, in order (the ModelRunner gives each its cache)."""
        return [layer.attention for layer in self.layers]

    def rope(self, positions: torch.Tensor, dtype: torch.dtype, kernels: bool = False) -> Rope:
        """The pass's rope at int ``positions`` ``[T]`` (tables computed in float32, then cast)."""
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        return Rope(positions, self._inv_freq, dtype, kernels)

    def uses_layer_kernels(self, device: torch.device) -> bool:
        """Whether a forward pass on ``device`` runs the layer-op kernels ("auto": on a CUDA device
        when batchllm_core was built with CUDA; a CPU-only build runs the torch formulas there)."""
        choice = os.environ.get("BATCHLLM_LAYER_OPS") or self.layer_ops
        if choice not in ("auto", "kernels", "torch"):
            raise ValueError(f"layer ops must be 'auto', 'kernels' or 'torch', got {choice!r}")
        if choice == "auto":
            return device.type == "cuda" and _native_cuda()
        return choice == "kernels"

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states.

        Parameters
        ----------
        input_ids : torch.Tensor
            int32/int64 ``[T]`` token ids of the step, flat.
        positions : torch.Tensor
            int ``[T]`` position of each token in its sequence.

        Returns
        -------
        torch.Tensor
            ``[T, hidden_size]`` in the model dtype.
        """
        if self.uses_layer_kernels(input_ids.device) and len(self.layers) > 0:
            return self._forward_fused(input_ids, positions)
        x = self.tok_embeddings(input_ids)
        rope = self.rope(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rope)
        return self.norm(x)

    def _forward_fused(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_staged`, each layer's attention run where it stops."""
        stages = self.forward_staged(input_ids, positions)
        try:
            layer, q, k, v = next(stages)
            while True:
                layer, q, k, v = stages.send(self.layers[layer].attention.attend_stored(q, k, v))
        except StopIteration as done:
            return done.value

    def forward_staged(self, input_ids: torch.Tensor, positions: torch.Tensor,
                       qkv_out: torch.Tensor | None = None) -> Generator[tuple, torch.Tensor, torch.Tensor]:
        """The forward on the layer-op kernels, stopped at every attention: a generator.

        Before layer ``i``'s attention it stores the layer's K/V (inside a step) and yields
        ``(i, q, k, v)``; the caller sends back the attention output ``[T, Hq, D]``. Its return value
        (``StopIteration.value``) is the final-norm hidden states ``[T, hidden_size]``. Each residual
        add is fused into the next norm. ``qkv_out``: one ``[T, q_size + 2 kv_size]`` buffer every
        layer's q/k/v projection writes (default: a new tensor a layer). The stretches between two
        stops depend on the token count only: piecewise_graphs.py captures them as CUDA graphs.
        """
        from .. import ops

        residual = self.tok_embeddings(input_ids)  # the running sum of the skips, updated in place
        rope = self.rope(positions, residual.dtype, kernels=True)
        first = self.layers[0].attention_norm
        h = ops.rms_norm(residual, first.weight, first.eps)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.attention.project_and_store(h, rope, qkv_out)
            out = yield i, q, k, v
            next_norm = self.layers[i + 1].attention_norm if i + 1 < len(self.layers) else self.norm
            h = layer.finish_fused(out, residual, next_norm)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[R, hidden_size]`` -> ``[R, vocab_size]`` logits in the model dtype."""
        return self.output(hidden)


@torch.no_grad()
def init_random_weights_(model: LlamaModel, seed: int, std: float = 0.02) -> LlamaModel:
    """Fill every parameter deterministically (seeded, in place): matrices and embeddings
    ~ N(0, std), biases 0, norm weights 1. Same seed, device and dtype give the same weights."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():  # tied weights are yielded once
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            noise = torch.empty(param.shape, dtype=torch.float32, device=param.device)
            param.copy_(noise.normal_(0.0, std, generator=generator))
    return model
