"""The performance model of DESIGN.md applied to a whole job and to the steps an engine ran.

For P parameters of ``w`` bytes and ``k`` KV bytes per token, with ceilings F (matmul FLOP/s) and
B (device bytes/s):

- prefill floor  = 2 * P * (prefill tokens) / F
- decode step    = max(2 * P * batch / F, (P * w + KV bytes read) / B)

:func:`job_floor` prices the best any engine could do on the job: every distinct prompt token (the
nodes of a radix tree over all prompts) computed once, then all sequences decoding together, each
step reading the weights once, every shared prompt token once and each sequence's generated tokens.
It ignores KV capacity and attention FLOPs, so it is a true lower bound.

:class:`StepFloor` prices the steps an engine actually ran (same formula per step, from the
StepPlan): ``seconds / step_floor`` says how far the kernels are from the hardware,
``step_floor / job_floor`` how much the schedule itself costs (recomputed prefixes, small batches).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

H100_FLOPS = 746e12        # bf16 matmul, measured (../shared/ANCHORS.md)
H100_BYTES_PER_S = 2.9e12  # device copy, bytes read + written, measured


@dataclass(frozen=True)
class Ceilings:
    """The two measured ceilings of the card the floor is for."""

    flops: float = H100_FLOPS
    bytes_per_s: float = H100_BYTES_PER_S


@dataclass(frozen=True)
class ModelCost:
    """What the performance model needs of a model: parameters, weight and KV bytes."""

    num_params: int
    weight_bytes: int
    kv_bytes_per_token: int

    @classmethod
    def of(cls, config, dtype_bytes: int) -> "ModelCost":
        """From a ``batchllm_core.models.config.ModelConfig`` and the weight/KV element size."""
        params = int(config.num_params)
        kv = config.num_layers * 2 * config.num_kv_heads * config.head_dim * dtype_bytes
        return cls(params, params * dtype_bytes, kv)

    def step_seconds(self, token_rows: int, decode_rows: int, decode_kv_tokens: int,
                     ceilings: Ceilings) -> float:
        """Floor of one step of ``token_rows`` rows whose decode rows read ``decode_kv_tokens`` KV tokens."""
        if token_rows == 0:
            return 0.0
        compute = 2.0 * self.num_params * token_rows / ceilings.flops
        if decode_rows == 0:
            return compute  # a prefill-only step of any useful size is compute bound
        memory = (self.weight_bytes + decode_kv_tokens * self.kv_bytes_per_token) / ceilings.bytes_per_s
        return max(compute, memory)


def distinct_prompt_tokens(prompts: Sequence[np.ndarray]) -> int:
    """Tokens of a radix tree over ``prompts`` (shared prefixes counted once).

    Sorted lexicographically, each prompt adds its length minus its longest common prefix with the
    one before it.
    """
    return int(_new_tokens_in_sorted_order(prompts)[0].sum())


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def _new_tokens_in_sorted_order(prompts: Sequence[np.ndarray]):
    """(new tokens of each prompt in sorted order, lcp with its predecessor, sort order)."""
    keyed = [tuple(np.asarray(p).tolist()) for p in prompts]
    order = sorted(range(len(keyed)), key=keyed.__getitem__)
    lcps = np.zeros(len(order), np.int64)
    for i in range(1, len(order)):
        lcps[i] = _lcp(np.asarray(prompts[order[i]]), np.asarray(prompts[order[i - 1]]))
    lengths = np.array([len(prompts[i]) for i in order], np.int64)
    return lengths - lcps, lcps, np.array(order, np.int64)


def job_floor(prompts: Sequence[np.ndarray], output_lens: Sequence[int], num_samples: Sequence[int],
              cost: ModelCost, ceilings: Ceilings) -> dict:
    """Floor of a job (seconds): distinct prompt tokens once, then ideal batched decoding.

    Parameters
    ----------
    prompts : sequence of int arrays [L_i]
    output_lens : output tokens per sequence of request i (max_tokens with ignore_eos)
    num_samples : sequences per request (n)

    Returns
    -------
    dict
        ``prefill_s``, ``decode_s``, ``floor_s``, ``distinct_prompt_tokens``.
    """
    new_tokens, lcps, order = _new_tokens_in_sorted_order(prompts)
    prefill_s = 2.0 * cost.num_params * float(new_tokens.sum()) / ceilings.flops
    lengths = np.array([len(prompts[i]) for i in order], np.int64)
    outputs = np.asarray(output_lens, np.int64)[order]
    samples = np.asarray(num_samples, np.int64)[order]
    # The first output token comes from the prefill; decode step j (1-based) runs every sequence
    # with more than j output tokens.
    decode_s = 0.0
    last_step = int(outputs.max()) - 1 if len(outputs) else 0
    num_active, batch, shared = -1, 0, 0
    for step in range(1, last_step + 1):
        active = outputs > step
        if int(active.sum()) != num_active:  # the active set only shrinks: recount when it does
            num_active = int(active.sum())
            batch = int(samples[active].sum())
            shared = _distinct_tokens_of_subset(lengths, lcps, active)
        kv_tokens = shared + batch * step
        decode_s += cost.step_seconds(batch, batch, kv_tokens, ceilings)
    return {"prefill_s": prefill_s, "decode_s": decode_s, "floor_s": prefill_s + decode_s,
            "distinct_prompt_tokens": int(new_tokens.sum())}


def _distinct_tokens_of_subset(lengths: np.ndarray, lcps: np.ndarray, active: np.ndarray) -> int:
    """Radix-tree tokens of the active prompts (in sorted order): the lcp of two prompts is the
    minimum adjacent lcp between them."""
    total, running_lcp, seen = 0, 0, False
    for length, lcp, is_active in zip(lengths.tolist(), lcps.tolist(), active.tolist()):
        running_lcp = min(running_lcp, lcp) if seen else 0
        if is_active:
            total += length - (running_lcp if seen else 0)
            seen, running_lcp = True, length
    return total


class StepFloor:
    """Sums the per-step floor of the plans an engine runs (call :meth:`add` with each StepPlan
    before it is executed)."""

    def __init__(self, cost: ModelCost, ceilings: Ceilings):
        self.cost, self.ceilings = cost, ceilings
        self.reset()

    def reset(self) -> None:
        """Forget the steps priced so far."""
        self.seconds = 0.0
        self.steps = 0
        self.decode_kv_tokens = 0

    def add(self, plan) -> None:
        rows = int(len(plan.input_ids))
        decode_rows = int(plan.num_decode_seqs)
        kv_tokens = int(getattr(plan, "decode_kv_tokens_read", 0))
        self.seconds += self.cost.step_seconds(rows, decode_rows, kv_tokens, self.ceilings)
        self.steps += 1
        self.decode_kv_tokens += kv_tokens
