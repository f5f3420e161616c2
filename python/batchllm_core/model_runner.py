"""ModelRunner: owns the paged KV cache and runs one StepPlan through the model.

The runner makes no scheduling decision: the StepPlan (from the native scheduler) says which tokens
run, where their K/V go and how decode attention is levelled. Per step the runner moves the plan's
arrays to the device once (one pinned host-to-device copy on CUDA), does the plan's copy-on-write
block copies, installs the attention context (batchllm_core.context), runs the model over the flat
ragged batch and returns the logits of the sampled rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .context import AttentionContext, reset_context, set_context
from .models.config import ModelConfig
from .models.llama import LlamaModel
from .step_upload import to_device_async

# The level arrays of a StepPlan, in ops.DecodeLevels field order.
_DEVICE_FIELDS = ("input_ids", "positions", "slot_mapping", "sample_rows", "paged_query_start",
                  "paged_context_lens", "paged_block_tables")
_ROW_INPUTS = ("input_ids", "positions", "slot_mapping")  # per token row: the model's inputs, the KV slots
_LEVEL_FIELDS = ("prefix_kv_indptr", "prefix_kv_blocks", "prefix_kv_lens", "prefix_q_range",
                 "suffix_block_tables", "suffix_kv_lens")


class ModelRunner:
    """Run StepPlans through a model over a paged KV cache it owns.

    Parameters
    ----------
    model : LlamaModel
        On ``device`` in ``dtype``, eval mode.
    config : ModelConfig
    num_kv_blocks, block_size : int
        KV pool geometry; block ids in plans index ``[0, num_kv_blocks)``.
    device : torch.device or str
    dtype : torch.dtype
        KV cache dtype (the model's).
    use_cascade : bool
        Run decode rows with shared-prefix attention by levels when the plan carries levels
        (default). False sends every row through paged prefill attention (same result; for A/B).

    Attributes
    ----------
    kv_cache : torch.Tensor
        ``[num_layers, 2, num_kv_blocks, block_size, num_kv_heads, head_dim]``; layer ``l`` reads
        ``kv_cache[l, 0]`` (K) and ``kv_cache[l, 1]`` (V).
    """

    def __init__(self, model: LlamaModel, config: ModelConfig, num_kv_blocks: int, block_size: int,
                 device: torch.device | str, dtype: torch.dtype, use_cascade: bool = True) -> None:
        if num_kv_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_kv_blocks ({num_kv_blocks}) and block_size ({block_size}) must be positive")
        reason = self.unsupported_reason(config, torch.device(device), dtype)
        if reason:
            raise ValueError(f"ModelRunner: {reason}")
        self.model, self.config = model, config
        self.num_kv_blocks, self.block_size = int(num_kv_blocks), int(block_size)
        self.device, self.dtype = torch.device(device), dtype
        self.use_cascade = use_cascade
        self.kv_cache = torch.zeros(config.num_layers, 2, self.num_kv_blocks, self.block_size,
                                    config.num_kv_heads, config.head_dim, dtype=dtype, device=self.device)
        for layer, attention in enumerate(model.attention_layers):
            attention.k_cache, attention.v_cache = self.kv_cache[layer, 0], self.kv_cache[layer, 1]
        self._staging = _HostToDevice(self.device)

    def attach_workspace(self, levels: Any) -> Any:
        """``levels`` (ops.DecodeLevels) with one kernel workspace for every layer of the step,
        sized once, here: no size query and no allocation per layer."""
        return levels.with_workspace(self.config.num_heads, self.config.num_kv_heads, self.config.head_dim,
                                     self.device)

    @staticmethod
    def unsupported_reason(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why the attention kernels cannot run this model on ``device`` in ``dtype``, or None.

        The CPU reference kernels run every shape and dtype; the CUDA kernels only the head dims
        they were built for, in float16/bfloat16 (the tiny model, head dim 16, runs on the CPU).
        """
        if device.type != "cuda":
            return None
        from . import _C

        head_dims = list(_C.cuda_kernel_head_dims())
        if config.head_dim not in head_dims:
            return (f"head dim {config.head_dim} has no CUDA attention kernel (built: {head_dims or 'none'}); "
                    "run this model on the CPU")
        if dtype not in (torch.float16, torch.bfloat16):
            return f"CUDA attention kernels need float16 or bfloat16, not {dtype}"
        return None

    @staticmethod
    def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one KV block takes over all layers (K and V): for sizing the pool."""
        return block_size * config.kv_bytes_per_token(dtype)

    @torch.inference_mode()
    def copy_blocks(self, src: Any, dst: Any) -> None:
        """Copy KV blocks ``src[i] -> dst[i]`` in every layer (copy-on-write forks).

        All sources are read before any destination is written. ``src``, ``dst``: int arrays [C].
        """
        src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
        if src.shape != dst.shape or src.ndim != 1:
            raise ValueError(f"copy_blocks: src {src.shape} and dst {dst.shape} must be 1-D of one length")
        if src.size == 0:
            return
        for ids in (src, dst):  # checked on the host: no device sync
            if ids.min() < 0 or ids.max() >= self.num_kv_blocks:
                raise ValueError(f"copy_blocks: block id out of [0, {self.num_kv_blocks})")
        src_t, dst_t = to_device_async(np.stack([src, dst]), self.device)
        # [L, 2, blocks, ...]: one gather + one scatter over all layers at once.
        self.kv_cache.index_copy_(2, dst_t, self.kv_cache.index_select(2, src_t))

    @torch.inference_mode()
    def execute(self, plan: Any, token_feed: "TokenFeed | None" = None) -> torch.Tensor:
        """Run one step; return the logits of its sampled rows.

        Parameters
        ----------
        plan : StepPlan (``_C.StepPlan`` or any object with its fields)
            Read here (numpy arrays, docs/architecture.md "StepPlan"): ``input_ids``, ``positions``,
            ``slot_mapping`` [T]; ``query_start`` [S+1], ``context_lens`` [S], ``block_tables``
            [S, max_blocks] (or flat, with ``max_blocks``); ``num_decode_seqs``; ``sample_rows`` [R];
            ``cow_src``/``cow_dst`` [C]; and the decode levels ``prefix_kv_indptr`` [P+1],
            ``prefix_kv_blocks``, ``prefix_kv_lens`` [P], ``prefix_q_range`` [P, 2] (or flat),
            ``suffix_block_tables`` [B, max_suffix_blocks] (or flat, with ``max_suffix_blocks``),
            ``suffix_kv_lens`` [B]. Without level fields (absent, None or an empty
            ``prefix_kv_indptr``), decode rows use paged prefill attention.
        token_feed : TokenFeed or None
            Overlapped steps: input ids still on the device (the last step's samples) for the rows
            whose ``input_ids`` is -1 (``_C.Scheduler.next_step(overlap=True)``).

        Returns
        -------
        torch.Tensor
            ``[R, vocab_size]`` in the model's dtype on the runner's device: row ``i`` holds the
            logits of token row ``plan.sample_rows[i]`` (a row repeated in sample_rows is repeated
            here).

        Notes
        -----
        Effects, in order: the plan's cow block copies; the K/V of every row with
        ``slot_mapping >= 0`` written to the cache; nothing else is kept between steps. The plan's
        arrays are not retained, so the scheduler may reuse them after this returns.
        """
        cow_src, cow_dst = _array(plan, "cow_src"), _array(plan, "cow_dst")
        if cow_src is not None and len(cow_src):
            self.copy_blocks(cow_src, cow_dst)
        if len(plan.input_ids) == 0:
            return torch.empty(0, self.config.vocab_size, dtype=torch.float32, device=self.device)
        step = self.prepare_step(plan, token_feed)
        set_context(step.context)
        try:
            hidden = self.model(step.device["input_ids"], step.device["positions"])
        finally:
            reset_context()
        return self.sampled_logits(hidden, step)

    def prepare_step(self, plan: Any, token_feed: "TokenFeed | None" = None,
                     extra: dict[str, np.ndarray] | None = None, row_inputs: bool = True) -> "PreparedStep":
        """A non-empty plan's arrays on the device (one copy) and its attention context.

        ``extra``: more int arrays to carry in the same copy (``PreparedStep.device`` holds them
        under their names). Rows with input id -1 take ``token_feed``'s ids. ``row_inputs=False``:
        the rows' ids, positions and KV slots stay out of the copy (a caller with buffers of its own
        for them, which fills them, feeds them and sets the context's ``slot_mapping``).
        """
        host = _host_arrays(plan)
        num_decode = int(plan.num_decode_seqs)
        levels_host = _levels(plan, num_decode) if self.use_cascade and num_decode > 0 else None
        if levels_host is None:
            num_decode = 0
        elif host["query_start"][num_decode] != num_decode:
            raise ValueError("StepPlan: each of the num_decode_seqs first sequences must have one row")
        host.update(_paged_part(host, num_decode))
        fed = {"token_src": token_feed.src} if token_feed is not None else {}
        fields = _DEVICE_FIELDS if row_inputs else tuple(f for f in _DEVICE_FIELDS if f not in _ROW_INPUTS)
        dev = self._staging.to_device({**{name: host[name] for name in fields},
                                       **(levels_host or {}), **fed, **(extra or {})})
        if token_feed is not None and row_inputs:
            token_feed.apply(dev["input_ids"], dev["token_src"])
        context = AttentionContext(
            slot_mapping=dev.get("slot_mapping"), num_decode_rows=num_decode,
            query_start=dev["paged_query_start"], context_lens=dev["paged_context_lens"],
            block_tables=dev["paged_block_tables"], max_q_len=host["paged_max_q_len"],
            decode_levels=self.attach_workspace(_decode_levels(dev, levels_host)) if levels_host else None)
        return PreparedStep(host, dev, context)

    def sampled_logits(self, hidden: torch.Tensor, step: "PreparedStep") -> torch.Tensor:
        """The logits of the step's sampled rows of ``hidden`` (the model's final hidden states)."""
        # In the model's dtype: the sampler reads them once as they are (a float32 copy of a step's
        # logits would be R x vocab x 4 bytes more traffic, 0.5 GB for 1,024 rows of 128k tokens).
        return self.model.compute_logits(hidden[step.device["sample_rows"].long()])


@dataclass
class PreparedStep:
    """A step's arrays on the host and on the device (ModelRunner.prepare_step) and its attention
    context."""

    host: dict[str, Any]
    device: dict[str, torch.Tensor]
    context: AttentionContext


class TokenFeed:
    """Input ids an overlapped step takes from the previous step's samples, on the device.

    ``src[row]`` is the previous step's sample row whose id is ``row``'s input, or -1 where the
    plan's own ``input_ids`` holds (rows of sequences whose last token is known on the host).
    """

    def __init__(self, src: np.ndarray, sampled: torch.Tensor):
        self.src = np.ascontiguousarray(src, dtype=np.int64)
        self.sampled = sampled

    @classmethod
    def for_plan(cls, plan: Any, prev_seq_ids: np.ndarray, sampled: torch.Tensor) -> "TokenFeed | None":
        """The feed of ``plan``'s pending rows (input id -1) from the previous step's sample rows
        (``prev_seq_ids``: the sequence of each, ``sampled``: its id on the device); None if none."""
        input_ids = np.asarray(plan.input_ids)
        pending = np.nonzero(input_ids < 0)[0]
        if len(pending) == 0:
            return None
        num_decode = int(plan.num_decode_seqs)
        if pending[-1] >= num_decode:
            raise ValueError("StepPlan: only decode rows may wait for the previous step's sample")
        seq_ids = np.asarray(plan.seq_ids)[pending]
        prev_seq_ids = np.asarray(prev_seq_ids, np.int64)
        order = np.argsort(prev_seq_ids, kind="stable")
        pos = np.minimum(np.searchsorted(prev_seq_ids[order], seq_ids), max(len(order) - 1, 0))
        if len(order) == 0 or not (prev_seq_ids[order][pos] == seq_ids).all():
            raise ValueError("StepPlan: a pending decode row has no sample in the previous step")
        src = np.full(len(input_ids), -1, np.int64)
        src[pending] = order[pos]
        return cls(src, sampled)

    def apply(self, input_ids: torch.Tensor, src: torch.Tensor | None = None) -> None:
        """Write the fed ids into ``input_ids`` (device, [T] or its first rows) in place; ``src``:
        :attr:`src` already on the device (else copied there now)."""
        if src is None:
            src = to_device_async(self.src, input_ids.device)
        rows = src.numel()
        fed = self.sampled.index_select(0, src.clamp(min=0)).to(input_ids.dtype)
        input_ids[:rows] = torch.where(src >= 0, fed, input_ids[:rows])


def _array(plan: Any, name: str) -> np.ndarray | None:
    value = getattr(plan, name, None)
    return None if value is None else np.asarray(value)


def _host_arrays(plan: Any) -> dict[str, np.ndarray]:
    """The per-row and per-sequence arrays of the plan, validated for consistent lengths."""
    host = {name: np.asarray(getattr(plan, name), dtype=dtype) for name, dtype in (
        ("input_ids", np.int32), ("positions", np.int32), ("slot_mapping", np.int64),
        ("query_start", np.int32), ("context_lens", np.int32), ("sample_rows", np.int32))}
    num_rows, num_seqs = len(host["input_ids"]), len(host["context_lens"])
    for name in ("positions", "slot_mapping"):
        if len(host[name]) != num_rows:
            raise ValueError(f"StepPlan.{name} has {len(host[name])} rows, input_ids {num_rows}")
    query_start = host["query_start"]
    if len(query_start) != num_seqs + 1 or (num_rows and (query_start[0] != 0 or query_start[-1] != num_rows)):
        raise ValueError(f"StepPlan.query_start must be [S+1] = [{num_seqs + 1}] from 0 to T = {num_rows}")
    rows = host["sample_rows"]
    if len(rows) and (rows.min() < 0 or rows.max() >= num_rows):
        raise ValueError(f"StepPlan.sample_rows must lie in [0, {num_rows})")
    host["block_tables"] = _matrix(getattr(plan, "block_tables"), num_seqs,
                                   getattr(plan, "max_blocks", None), "block_tables")
    return host


def _paged_part(host: dict[str, np.ndarray], num_decode: int) -> dict[str, Any]:
    """Metadata of the rows after the first ``num_decode`` (those paged prefill attention runs),
    rebased so that their first row is row 0."""
    query_start = host["query_start"][num_decode:] - host["query_start"][num_decode]
    q_lens = np.diff(query_start)
    return {"paged_query_start": np.ascontiguousarray(query_start, dtype=np.int32),
            "paged_context_lens": np.ascontiguousarray(host["context_lens"][num_decode:]),
            "paged_block_tables": np.ascontiguousarray(host["block_tables"][num_decode:]),
            "paged_max_q_len": int(q_lens.max()) if len(q_lens) else 0}


def _levels(plan: Any, num_decode: int) -> dict[str, np.ndarray] | None:
    """The plan's decode levels as int32 arrays of DecodeLevels shapes, or None if it has none."""
    indptr = _array(plan, "prefix_kv_indptr")
    if indptr is None or len(indptr) == 0:
        return None
    levels = {name: np.ascontiguousarray(np.asarray(getattr(plan, name)), dtype=np.int32)
              for name in _LEVEL_FIELDS}
    num_prefixes = len(indptr) - 1
    levels["prefix_q_range"] = levels["prefix_q_range"].reshape(num_prefixes, 2)
    levels["suffix_block_tables"] = _matrix(levels["suffix_block_tables"], num_decode,
                                            getattr(plan, "max_suffix_blocks", None), "suffix_block_tables")
    if len(levels["suffix_kv_lens"]) != num_decode:
        raise ValueError(f"StepPlan.suffix_kv_lens has {len(levels['suffix_kv_lens'])} entries, "
                         f"num_decode_seqs is {num_decode}")
    return levels


def _decode_levels(dev: dict[str, torch.Tensor], host: dict[str, np.ndarray]):
    from .ops import DecodeLevels

    q_range = host["prefix_q_range"]
    # Size hints from the host arrays: the CUDA kernel then needs no device-to-host sync.
    return DecodeLevels(*(dev[name] for name in _LEVEL_FIELDS),
                        max_prefix_kv_len=_max(host["prefix_kv_lens"]),
                        max_prefix_rows=_max(q_range[:, 1] - q_range[:, 0]),
                        max_suffix_kv_len=_max(host["suffix_kv_lens"]))


def _max(values: np.ndarray) -> int:
    return int(values.max()) if len(values) else 0


def _matrix(values: Any, num_rows: int, width: int | None, name: str) -> np.ndarray:
    """An int32 [num_rows, width] table from a 2-D array or a flat row-major one."""
    values = np.asarray(values, dtype=np.int32)
    if values.ndim == 2:
        if values.shape[0] != num_rows:
            raise ValueError(f"StepPlan.{name} has {values.shape[0]} rows, expected {num_rows}")
        return values
    width = int(width) if width is not None else (len(values) // num_rows if num_rows else 0)
    if len(values) != num_rows * width:
        raise ValueError(f"StepPlan.{name} has {len(values)} entries, expected {num_rows} x {width}")
    return values.reshape(num_rows, width)


class _HostToDevice:
    """Moves a step's int arrays to the device: zero-copy views on CPU; on CUDA one pinned staging
    buffer and one asynchronous copy for all of them. Two buffers take turns (grown when needed):
    with overlapped steps, step i's copy may still be queued behind step i-1 when step i+1 is staged."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned: list[torch.Tensor | None] = [None, None]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def to_device(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        if self.device.type != "cuda":
            return {name: _cpu_tensor(values) for name, values in arrays.items()}
        offsets, total = staging_layout(arrays)
        turn = self._turn
        self._turn ^= 1
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()  # the copy two steps back may still read this buffer
        if self._pinned[turn] is None or self._pinned[turn].numel() < total:
            self._pinned[turn] = torch.empty(max(total, 1 << 16), dtype=torch.uint8, pin_memory=True)
        pinned = self._pinned[turn]
        write_staging(pinned, arrays, offsets)
        device_bytes = pinned[:max(total, 1)].to(self.device, non_blocking=True)
        self._copied[turn] = torch.cuda.Event()
        self._copied[turn].record()
        return read_staging(device_bytes, arrays, offsets)


_STAGING_ALIGN = 16  # bytes: every array starts aligned for any int dtype


def staging_layout(arrays: dict[str, np.ndarray]) -> tuple[dict[str, int], int]:
    """Byte offset of each array in one packed buffer, and the buffer's size."""
    offsets, total = {}, 0
    for name, values in arrays.items():
        offsets[name] = total
        total += -(-values.nbytes // _STAGING_ALIGN) * _STAGING_ALIGN
    return offsets, total


def write_staging(buffer: torch.Tensor, arrays: dict[str, np.ndarray], offsets: dict[str, int]) -> None:
    """Copy the arrays into a CPU uint8 buffer at their offsets."""
    staging = buffer.numpy()
    for name, values in arrays.items():
        staging[offsets[name]:offsets[name] + values.nbytes] = values.reshape(-1).view(np.uint8)


def read_staging(buffer: torch.Tensor, arrays: dict[str, np.ndarray],
                 offsets: dict[str, int]) -> dict[str, torch.Tensor]:
    """Typed, shaped views of a packed uint8 buffer (on any device), one per array."""
    return {name: buffer[offsets[name]:offsets[name] + values.nbytes]
            .view(_TORCH_DTYPES[values.dtype.str]).view(values.shape)
            for name, values in arrays.items()}


def _cpu_tensor(values: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing the array's memory when it can (read-only views, e.g. the scheduler's,
    are copied). Empty arrays get fresh tensors: numpy gives them zero strides, which kernels'
    contiguity checks reject."""
    if values.size == 0:
        return torch.empty(values.shape, dtype=_TORCH_DTYPES[values.dtype.str])
    if not (values.flags.writeable and values.flags.c_contiguous):
        values = values.copy()
    return torch.from_numpy(values)


_TORCH_DTYPES = {np.dtype(np.int32).str: torch.int32, np.dtype(np.int64).str: torch.int64}
