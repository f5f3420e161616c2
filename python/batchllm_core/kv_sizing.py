"""KV pool size from the GPU memory left after the weights and a worst-case step.

Sizing by "free memory now" (what the engine does without this module) forgets the activations of a
full step (a ``max_num_batched_tokens`` prefill: MLP intermediates, attention workspace) and the
float32 logits of every sampled row with the sampler's temporaries. Here one such step is run
first, on a throw-away KV cache just large enough for it, and torch's peak allocation is measured:

    kv_bytes = total * utilization - (memory used outside torch) - (peak torch allocation) - reserve

The reserve covers what the profile does not see (CUDA graph pools, allocator fragmentation); with
CUDA graphs it also holds one more worst-case step's activations (the piecewise graphs' pool).
A pool sized this way cannot run out during the job: the scheduler admits work by KV blocks, and
every step's activations are at most the profiled step's. ``kv_cache_memory`` given by the user
skips all of this.

Integration (engine.py ``LLM.__init__``, CUDA only): replace ``_default_kv_bytes(self.device)`` by
``kv_cache_bytes_from_profile(self.model, self.config, self.block_size, self.dtype, self.device,
self.max_num_batched_tokens, self.max_num_seqs)``.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

__all__ = ["worst_case_plan", "profile_step", "kv_budget_bytes", "kv_cache_bytes_from_profile"]

DEFAULT_UTILIZATION = 0.90
DEFAULT_RESERVE_BYTES = 512 << 20


def worst_case_plan(num_tokens: int, num_sample_rows: int, block_size: int) -> SimpleNamespace:
    """A StepPlan-shaped step: one sequence prefilling ``num_tokens`` tokens into blocks
    ``0..ceil(num_tokens / block_size)-1`` with ``num_sample_rows`` sampled rows (rows repeat when
    there are more samples than tokens, as n > 1 samples of one row do)."""
    if num_tokens < 1 or num_sample_rows < 1:
        raise ValueError(f"worst_case_plan: need num_tokens ({num_tokens}) and num_sample_rows "
                         f"({num_sample_rows}) >= 1")
    num_blocks = -(-num_tokens // block_size)
    empty32 = np.zeros(0, np.int32)
    return SimpleNamespace(
        input_ids=np.full(num_tokens, 10, np.int32), positions=np.arange(num_tokens, dtype=np.int32),
        slot_mapping=np.arange(num_tokens, dtype=np.int64), seq_ids=np.zeros(1, np.int64),
        query_start=np.array([0, num_tokens], np.int32), context_lens=np.array([num_tokens], np.int32),
        block_tables=np.arange(num_blocks, dtype=np.int32).reshape(1, num_blocks), max_blocks=num_blocks,
        num_decode_seqs=0, sample_rows=(np.arange(num_sample_rows) % num_tokens).astype(np.int32),
        cow_src=empty32, cow_dst=empty32, prefix_kv_indptr=empty32)


@torch.inference_mode()
def profile_step(model, config, block_size: int, dtype: torch.dtype, device: torch.device,
                 num_tokens: int, num_sample_rows: int) -> torch.Tensor:
    """Run the worst-case step (forward, logits, sampling) on a throw-away KV cache; returns the
    sampled token ids (int32 [num_sample_rows]). The model's layers keep pointing at the throw-away
    cache until the real ModelRunner is built (which re-assigns them)."""
    from .model_runner import ModelRunner
    from .sampling import RequestSamplingTable, Sampler, SamplingParams

    plan = worst_case_plan(num_tokens, num_sample_rows, block_size)
    runner = ModelRunner(model, config, plan.max_blocks, block_size, device, dtype)
    logits = runner.execute(plan)
    table = RequestSamplingTable.build([SamplingParams(temperature=1.0)], [0], device)
    zeros = np.zeros(num_sample_rows, np.int64)
    sampled = Sampler(config.vocab_size, device).sample(logits, table, zeros, zeros.astype(np.int32),
                                                        np.arange(num_sample_rows, dtype=np.int32))
    del runner, logits
    return torch.from_numpy(sampled.token_ids)


def kv_budget_bytes(total_bytes: int, free_bytes: int, torch_reserved_bytes: int, torch_peak_bytes: int,
                    utilization: float = DEFAULT_UTILIZATION, reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> int:
    """Bytes left for the KV pool (0 if none).

    Parameters
    ----------
    total_bytes, free_bytes : the device's memory (``torch.cuda.mem_get_info``)
    torch_reserved_bytes : what torch's caching allocator holds now
    torch_peak_bytes : torch's peak allocation over the weights and the profiled step
    """
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")
    outside_torch = max(total_bytes - free_bytes - torch_reserved_bytes, 0)  # CUDA context, other processes
    return max(int(total_bytes * utilization) - outside_torch - torch_peak_bytes - reserve_bytes, 0)


def kv_cache_bytes_from_profile(model, config, block_size: int, dtype: torch.dtype, device: torch.device,
                                max_num_batched_tokens: int, max_num_seqs: int,
                                utilization: float = DEFAULT_UTILIZATION,
                                reserve_bytes: int = DEFAULT_RESERVE_BYTES, graphs: bool = False) -> int:
    """KV pool bytes on a CUDA device after profiling the worst-case step (see the module docstring).

    ``graphs``: the engine replays CUDA graphs, whose pool holds a full step's activations of its
    own (the piecewise graphs of a ``max_num_batched_tokens`` step) beside the caching allocator's:
    the reserve grows by the profiled step's activations.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError("kv_cache_bytes_from_profile measures CUDA memory; give kv_cache_memory on other devices")
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    rows = max(1, max_num_seqs)  # a decode step samples up to one row per running sequence
    profile_step(model, config, block_size, dtype, device, max_num_batched_tokens, rows)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    if graphs:
        reserve_bytes += max(peak - before, 0)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return kv_budget_bytes(total, free, torch.cuda.memory_reserved(device), peak, utilization, reserve_bytes)
