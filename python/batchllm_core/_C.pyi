"""Type stub of the private native module batchllm_core._C (one section per binding area)."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import numpy.typing as npt

# ---- block manager (csrc/bindings/bind_block_manager.cpp) ----------------------------------------

class BlockTable:
    """A sequence's KV blocks in token order; token t lives in slot blocks[t // bs] * bs + t % bs."""
    blocks: list[int]
    num_tokens: int
    def __init__(self) -> None: ...

class BlockManager:
    """Fixed pool of refcounted KV blocks. Out of blocks is an answer (-1 / None), never an exception;
    bad block ids, free blocks and hand-edited inconsistent tables raise ValueError."""
    def __init__(self, num_blocks: int, block_size: int) -> None: ...
    @property
    def block_size(self) -> int: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def num_free_blocks(self) -> int: ...
    @property
    def num_used_blocks(self) -> int: ...
    def blocks_for_tokens(self, n: int) -> int: ...
    def can_allocate(self, num_blocks: int) -> bool: ...
    def allocate_block(self) -> int: ...
    def allocate(self, n: int) -> Optional[list[int]]: ...
    def share(self, block: int) -> None: ...
    def release(self, block: int) -> None: ...
    def refcount(self, block: int) -> int: ...
    def blocks_needed_to_append(self, table: BlockTable, n: int) -> int: ...
    def append_slot(self, table: BlockTable) -> tuple[int, int, int]:
        """(slot, cow_src, cow_dst); slot -1 when no block is free; cow_* -1 when nothing to copy."""
    def fork(self, table: BlockTable) -> BlockTable: ...
    def free(self, table: BlockTable) -> None: ...
    def check_integrity(self, expected_refs: Optional[list[int]] = None) -> str: ...

# ---- end block manager ----------------------------------------------------------------------------

# ---- kernels (csrc/bindings/bind_kernels.cpp) -----------------------------------------------------
# Views are (data_ptr, dtype name, shape, strides in elements, device index or -1 for CPU) tuples,
# built by batchllm_core.ops; call the ops, not these. Bad arguments raise ValueError
# "<kernel>: argument '<name>' ..." before anything runs; a CUDA launch error raises RuntimeError.

View = tuple[int, str, tuple[int, ...], tuple[int, ...], int]

def store_kv(k: View, v: View, k_cache: View, v_cache: View, slot_mapping: View, stream: int,
             check_indices: bool) -> None: ...
def prefill_attention(q: View, k_cache: View, v_cache: View, block_tables: View, query_start: View,
                      context_lens: View, o: View, scale: float, max_q_len: int, stream: int,
                      check_indices: bool) -> None: ...
def cascade_decode_attention(q: View, k_cache: View, v_cache: View, levels: tuple[View, ...],
                             hints: list[int], o: View, lse: Optional[View], workspace: Optional[View],
                             scale: float, stream: int, check_indices: bool) -> None:
    """levels: (prefix_kv_indptr, prefix_kv_blocks, prefix_kv_lens, prefix_q_range,
    suffix_block_tables, suffix_kv_lens[, suffix_split or None[, prefix_split or None]]);
    hints: [max_prefix_kv_len, max_prefix_rows, max_suffix_kv_len]."""
def merge_states(o_a: View, lse_a: View, o_b: View, lse_b: View, o: View, lse: Optional[View],
                 stream: int) -> None: ...
def cuda_kernel_head_dims() -> list[int]:
    """Head dims the CUDA attention kernels are built for (empty without CUDA)."""
def cascade_workspace_floats(num_rows: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                             num_prefixes: int, max_prefix_kv_len: int, max_prefix_rows: int,
                             max_suffix_kv_len: int, device_suffix_split: bool = False,
                             device_prefix_split: bool = False) -> int:
    """float32 scratch elements the CUDA cascade kernel needs on the current device (0 without CUDA);
    device_*_split: the levels will carry that split array."""
def cascade_suffix_split(rows: int, padded_rows: int, num_q_heads: int, num_kv_heads: int,
                         max_suffix_kv_len: int) -> tuple[int, int, int]:
    """(splits, chunk_keys, rows covered) of a decode step launched as padded_rows rows; unsplit without CUDA."""
def cascade_prefix_split(num_prefixes: int, max_rows: int, max_len: int, bucket_prefixes: int, bucket_rows: int,
                         bucket_len: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                         dtype: str) -> tuple[int, int, int]:
    """(splits, chunk_keys, state_rows) of a step's prefixes under a graph bucket's hints; unsplit without CUDA."""

# ---- end kernels ----------------------------------------------------------------------------------

# ---- prefix tree (csrc/bindings/bind_prefix_tree.cpp) -------------------------------------------

class SharingPlan:
    """Shared prefixes, parents before children: prefix i is tokens [begin[i], end[i]) of each reader.
    Every field is a fresh numpy copy."""
    @property
    def num_prefixes(self) -> int: ...
    def __len__(self) -> int: ...
    @property
    def parent(self) -> npt.NDArray[np.int32]: ...          # [P], -1 at top
    @property
    def depth(self) -> npt.NDArray[np.int32]: ...           # [P], 0 at top
    @property
    def begin(self) -> npt.NDArray[np.int64]: ...           # [P], the parent's end
    @property
    def end(self) -> npt.NDArray[np.int64]: ...             # [P], a multiple of the block size
    @property
    def request_indptr(self) -> npt.NDArray[np.int64]: ...  # [P+1] into `requests`
    @property
    def requests(self) -> npt.NDArray[np.int64]: ...        # readers of every prefix, concatenated
    def prefix_requests(self, prefix: int) -> npt.NDArray[np.int64]: ...
    @property
    def request_prefix(self) -> npt.NDArray[np.int32]: ...  # [N], deepest prefix or -1

class PrefixTree:
    """Compact radix tree over a job's prompts. Bad input raises ValueError naming the argument."""
    def __init__(self) -> None: ...
    def insert(self, tokens: npt.NDArray[np.int32], offsets: npt.NDArray[np.int64]) -> None:
        """Prompt i = tokens[offsets[i]:offsets[i+1]]; appends to what is there; zero-copy read."""
    def insert_list(self, prompts: Any) -> None:
        """A list of token-id lists or 1-D integer arrays."""
    def group_single_level(self, block_size: int, min_prefix_tokens: int = 0) -> SharingPlan: ...
    def group_multi_level(self, block_size: int, max_depth: int = 8, min_prefix_tokens: int = 0) -> SharingPlan: ...
    def stats(self, plan: SharingPlan) -> dict[str, int]:
        """requests, prompt_tokens, prefill_tokens, shared_tokens, groups, nodes, memory_bytes."""
    @property
    def num_requests(self) -> int: ...
    def __len__(self) -> int: ...
    def prompt_length(self, request: int) -> int: ...

# ---- end prefix tree ------------------------------------------------------------------------------

# ---- scheduler (csrc/bindings/bind_scheduler.cpp) -------------------------------------------------

class StepPlan:
    """One engine step as flat arrays: read-only numpy views of the scheduler's buffers, valid until
    the next ``next_step``/``commit``. Rows: decode rows first (one per decoding sequence), then prefill
    chunks. A sequence id < 0 is a shared-prefix prefill chunk (prefix node ``-id - 1``, no sample row)."""
    input_ids: npt.NDArray[np.int32]           # [T]
    positions: npt.NDArray[np.int32]           # [T]
    slot_mapping: npt.NDArray[np.int64]        # [T]
    seq_ids: npt.NDArray[np.int64]             # [S]
    query_start: npt.NDArray[np.int32]         # [S+1]
    context_lens: npt.NDArray[np.int32]        # [S]
    block_tables: npt.NDArray[np.int32]        # [S, max_blocks], -1 padded
    max_blocks: int
    num_decode_seqs: int
    prefix_kv_indptr: npt.NDArray[np.int32]    # [P+1]
    prefix_kv_blocks: npt.NDArray[np.int32]    # [sum of prefix blocks]
    prefix_kv_lens: npt.NDArray[np.int32]      # [P]
    prefix_q_range: npt.NDArray[np.int32]      # [P, 2] decode rows [begin, end) reading prefix p
    suffix_block_tables: npt.NDArray[np.int32] # [num_decode_seqs, max_suffix_blocks], -1 padded
    max_suffix_blocks: int
    suffix_kv_lens: npt.NDArray[np.int32]      # [num_decode_seqs]
    sample_rows: npt.NDArray[np.int32]         # [R]
    sample_seq_ids: npt.NDArray[np.int64]      # [R]
    sample_requests: npt.NDArray[np.int64]     # [R]
    sample_indices: npt.NDArray[np.int32]      # [R]
    sample_output_lens: npt.NDArray[np.int32]  # [R]
    cow_src: npt.NDArray[np.int32]             # [C] copy block cow_src[i] -> cow_dst[i] before the step
    cow_dst: npt.NDArray[np.int32]             # [C]
    nano_batch_offsets: npt.NDArray[np.int32]  # [K+1], [0, T] for now
    num_prefill_tokens: int
    decode_kv_tokens_read: int                 # KV tokens decode attention reads (shared prefixes once)
    decode_kv_tokens_unshared: int             # the same if every row read its whole context
    @property
    def num_tokens(self) -> int: ...
    @property
    def num_seqs(self) -> int: ...
    @property
    def num_sample_rows(self) -> int: ...
    @property
    def num_prefixes(self) -> int: ...

class Scheduler:
    """Global prefix-sharing scheduler. policy: "batchllm" | "fcfs-lru" | "no-share".
    Bad arguments raise ValueError naming the argument."""
    def __init__(self, num_blocks: int, block_size: int = 16, token_budget: int = 2048,
                 policy: str = "batchllm", max_num_seqs: int = 1024, tile_tokens: int = 128,
                 max_prefix_depth: int = 8, watermark: float = 0.01, admission_horizon: int = 128) -> None: ...
    def add_requests(self, tokens: npt.ArrayLike, offsets: npt.ArrayLike, max_tokens: npt.ArrayLike,
                     num_samples: npt.ArrayLike, min_tokens: npt.ArrayLike, ignore_eos: npt.ArrayLike,
                     stop_token_ids: npt.ArrayLike, stop_token_offsets: npt.ArrayLike,
                     eos_token_ids: list[int] = ...) -> None: ...
    def next_step(self, overlap: bool = False) -> Optional[StepPlan]:
        """The next step, or None when the job is done. ``overlap=True`` plans it while the last
        step is uncommitted: decode rows whose input is that step's sample carry -1 (feed it on the
        device); None then may also mean "commit first" (``done`` tells which)."""
    def commit(self, sampled: npt.ArrayLike) -> None:
        """One token per sample row of the oldest uncommitted plan, in row order (int32 [num_sample_rows])."""
    def last_discarded_rows(self) -> npt.NDArray[np.int32]:
        """Sample rows the last commit discarded (their sequence finished or failed after planning)."""
    def finish_sequence(self, seq_id: int, reason: str = "stop") -> None: ...
    def pop_finished(self) -> list[tuple[int, int, list[int], str]]:
        """(request, sample_index, output token ids, finish_reason) of sequences finished since the last call."""
    def pop_failed(self) -> list[tuple[int, str]]:
        """(request, message) of requests that cannot run (e.g. larger than the whole KV cache)."""
    def stats(self) -> dict[str, Any]: ...
    def step_token_counts(self) -> npt.NDArray[np.int32]: ...
    def check_integrity(self) -> str: ...
    @property
    def num_free_blocks(self) -> int: ...
    @property
    def num_running(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def done(self) -> bool: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def policy(self) -> str: ...

# ---- end scheduler --------------------------------------------------------------------------------
