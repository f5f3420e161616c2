"""CUDA graphs for decode-only steps: captured once per padded shape, replayed every step after.

A decode-only step (every row a decoding sequence, every row sampled once, shared-prefix levels
present) launches a few hundred small kernels; replaying them as one graph removes the launch gaps.
A graph fixes its tensors' addresses and every launch's grid, so each step is padded to a *shape
key*: batch rows, prefixes, rows per prefix, prefix keys, suffix block-table width and prefix block
count, each rounded up to a bucket. The step's metadata goes into the key's static device buffers
(step_upload.StaticUpload: one pinned copy), then the key's graph replays. A key is captured at its
first step (its ``min_uses``-th), unless a captured key dominates it (no smaller in any dimension):
then the step replays that graph, padded, for as long as the padding has cost less than a capture
would (:meth:`DecodeGraphs.run_key`).

Padding keeps real rows exact and padded rows harmless:

- padded rows: token 0 at position 0, KV slot -1 (not stored), a 1-token suffix in block 0 (a finite
  read), no prefix; their logits are dropped;
- padded prefixes: 0 keys, query range [0, 0) (no reader, no tile, nothing merged);
- the CUDA grid hints are the key's buckets, which bound the real sizes (the kernel reads the real
  lengths from the device arrays; chunks past a prefix's end are empty no-op merges);
- the suffix level's key split is the step's own (``suffix_split``, ops.cascade_suffix_split: the
  split its real rows would get launched eagerly), read on the device: a step of a few long rows
  replayed in a graph of many keeps splitting their keys over the SMs. Split, only the real rows
  attend (the padded rows' outputs are zeros, dropped). So is the prefix level's (``prefix_split``,
  ops.cascade_prefix_split), within what the key's grid holds: a few readers of a long prefix split
  its keys as an eager launch would.

On a CPU device (``capture=False``) the same padded static path runs eagerly: that is how the
padding is tested without a GPU.

Integration: :class:`GraphModelRunner` is a ``ModelRunner`` whose ``execute`` takes the graph path
when :meth:`DecodeGraphs.can_run` accepts the plan and the eager path otherwise.
"""
from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch

from .context import AttentionContext, reset_context, set_context
from .model_runner import ModelRunner
from .step_upload import PackedLayout, StaticUpload

__all__ = ["GraphKey", "DecodeGraphs", "GraphModelRunner", "batch_bucket", "capture_stream", "capture_or_fall_back",
           "record", "warm_up_for_capture"]


def _pow2(value: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(int(value) - 1, 0).bit_length())


def batch_bucket(rows: int) -> int:
    """Padded batch size: powers of two to 16, then multiples of 16 to 256, then of 64.

    Compute-bound decode steps pay for padding in GEMM rows, so large batches get fine buckets.
    """
    if rows <= 16:
        return _pow2(rows)
    step = 16 if rows <= 256 else 64
    return -(-rows // step) * step


@dataclass(frozen=True)
class GraphKey:
    """The padded shape of a decode-only step."""

    rows: int              # B: decode rows
    prefixes: int          # P: shared prefixes (levels); 0 for a step without any (no empty padded one)
    prefix_rows: int       # most rows reading one prefix
    prefix_keys: int       # most keys of one prefix (the split-KV plan's bound)
    prefix_blocks: int     # total prefix KV block ids
    suffix_width: int      # suffix block-table width (blocks)

    @classmethod
    def of(cls, levels: Dict[str, np.ndarray], rows: int, block_size: int) -> "GraphKey":
        q_range = levels["prefix_q_range"].reshape(-1, 2)
        num_prefixes = len(levels["prefix_kv_lens"])
        most_rows = int((q_range[:, 1] - q_range[:, 0]).max()) if num_prefixes else 0
        most_keys = int(levels["prefix_kv_lens"].max()) if num_prefixes else 0
        width = levels["suffix_block_tables"].shape[1] if levels["suffix_block_tables"].ndim == 2 else 0
        padded_rows = batch_bucket(rows)
        return cls(rows=padded_rows, prefixes=_pow2(num_prefixes) if num_prefixes else 0,
                   prefix_rows=min(_pow2(most_rows), padded_rows),
                   prefix_keys=_pow2(most_keys, 4 * block_size),
                   prefix_blocks=_pow2(len(levels["prefix_kv_blocks"]), 16),
                   suffix_width=_pow2(max(width, 1)))

    def layout(self) -> PackedLayout:
        b, p = self.rows, self.prefixes
        return PackedLayout([
            ("input_ids", np.int32, (b,)), ("positions", np.int32, (b,)), ("slot_mapping", np.int64, (b,)),
            ("prefix_kv_indptr", np.int32, (p + 1,)), ("prefix_kv_blocks", np.int32, (self.prefix_blocks,)),
            ("prefix_kv_lens", np.int32, (p,)), ("prefix_q_range", np.int32, (p, 2)),
            ("suffix_block_tables", np.int32, (b, self.suffix_width)), ("suffix_kv_lens", np.int32, (b,)),
            ("paged_query_start", np.int32, (1,)), ("paged_context_lens", np.int32, (0,)),
            ("paged_block_tables", np.int32, (0, 1)), ("suffix_split", np.int32, (3,)),
            ("prefix_split", np.int32, (3,)),
        ])


def pad_decode_step(host: Dict[str, np.ndarray], levels: Dict[str, np.ndarray], key: GraphKey,
                    suffix_split: Any = (1, 1 << 30, None), prefix_split: Any = None) -> Dict[str, np.ndarray]:
    """The step's arrays padded to ``key`` (see the module docstring for what padding holds);
    ``suffix_split``: the step's (splits, chunk_keys, rows covered), rows None for all of key's;
    ``prefix_split``: its (splits, chunk_keys, state_rows), None for one split over the key's bounds."""
    rows, b, p = len(host["input_ids"]), key.rows, key.prefixes
    num_prefixes = len(levels["prefix_kv_lens"])

    def padded(values, length, fill, dtype):
        out = np.full(length, fill, dtype)
        out[:len(values)] = values
        return out

    indptr = levels["prefix_kv_indptr"]
    q_range = np.zeros((p, 2), np.int32)
    q_range[:num_prefixes] = levels["prefix_q_range"].reshape(-1, 2)
    suffix = np.full((b, key.suffix_width), -1, np.int32)
    real_suffix = levels["suffix_block_tables"].reshape(rows, -1)
    suffix[:rows, :real_suffix.shape[1]] = real_suffix
    suffix[rows:, 0] = 0  # padded rows read one key of block 0: finite, never stored, dropped
    return {
        "input_ids": padded(host["input_ids"], b, 0, np.int32),
        "positions": padded(host["positions"], b, 0, np.int32),
        "slot_mapping": padded(host["slot_mapping"], b, -1, np.int64),
        "prefix_kv_indptr": padded(indptr, p + 1, indptr[-1] if len(indptr) else 0, np.int32),
        "prefix_kv_blocks": padded(levels["prefix_kv_blocks"], key.prefix_blocks, 0, np.int32),
        "prefix_kv_lens": padded(levels["prefix_kv_lens"], p, 0, np.int32),
        "prefix_q_range": q_range,
        "suffix_block_tables": suffix,
        "suffix_kv_lens": padded(levels["suffix_kv_lens"], b, 1, np.int32),
        "paged_query_start": np.zeros(1, np.int32),
        "paged_context_lens": np.zeros(0, np.int32),
        "paged_block_tables": np.zeros((0, 1), np.int32),
        "suffix_split": np.array([suffix_split[0], suffix_split[1],
                                  b if suffix_split[2] is None else suffix_split[2]], np.int32),
        "prefix_split": np.array(prefix_split if prefix_split is not None else
                                 (1, max(key.prefix_keys, 1), key.prefix_rows), np.int32),
    }


def static_levels(views: Dict[str, torch.Tensor], key: GraphKey, block_size: int):
    """The ops.DecodeLevels of a step padded to ``key`` (its static views, on the device): hinted with
    the key's bounds, which size the kernels' grids, and carrying the step's own split arrays."""
    from .ops import DecodeLevels

    return DecodeLevels(views["prefix_kv_indptr"], views["prefix_kv_blocks"], views["prefix_kv_lens"],
                        views["prefix_q_range"], views["suffix_block_tables"], views["suffix_kv_lens"],
                        max_prefix_kv_len=key.prefix_keys, max_prefix_rows=key.prefix_rows,
                        max_suffix_kv_len=key.suffix_width * block_size, suffix_split=views["suffix_split"],
                        prefix_split=views["prefix_split"])


class _Entry:
    """One key's static buffers, its graph (None before capture or without capture) and output:
    the final hidden states (a few MB; logits, up to vocab x rows x 4 bytes, stay out of the graph
    so that dozens of graphs do not each pin their own)."""

    def __init__(self, key: GraphKey, device: torch.device):
        self.key = key
        self.upload = StaticUpload(key.layout(), device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.hidden: Optional[torch.Tensor] = None


class DecodeGraphs:
    """Decode-only steps of one ModelRunner through per-key static buffers and CUDA graphs.

    Parameters
    ----------
    runner : ModelRunner
        Its model and KV cache are used as they are.
    max_rows : int
        Larger decode steps run eagerly.
    max_graphs : int
        Keys kept at once (least recently used dropped first, with its graph).
    capture : bool or None
        Capture and replay CUDA graphs; None: when the runner's device is CUDA and kernel index
        checks (``BATCHLLM_CHECK_INDICES=1``, which synchronise) are off. False runs the same
        padded static path eagerly (for tests, and for A/B timing on a GPU).
    min_uses : int
        With capture, a key's steps run eagerly (the runner's own path) until its min_uses-th,
        which captures it. 1 (default): the capture step returns its warm-up forward's result, so
        capturing at once costs the recording more than an eager step, and the one-off keys (the
        tail of a job, as groups finish) replay a dominating graph instead.
    ridge_rows : int
        Decode rows up to which a step's GEMMs cost one read of the weights whatever the rows (the
        roofline's ridge for 2-byte weights: peak FLOP/s over bytes/s; H100 bf16 746 TFLOP/s over
        2.9 TB/s, about 257). Padding a step to a graph of at most this many rows costs ~nothing.
    capture_cost_steps : float
        What a capture costs (a warm-up forward, the recording, the instantiation), in steps of the
        captured key: a dominated key is captured once its padding has lost this much (run_key).
    """

    def __init__(self, runner: ModelRunner, max_rows: int = 1024, max_graphs: int = 32,
                 capture: Optional[bool] = None, min_uses: int = 1, ridge_rows: int = 256,
                 capture_cost_steps: float = 4.0):
        self.runner = runner
        self.max_rows = int(max_rows)
        self.max_graphs = int(max_graphs)
        if capture is None:
            capture = runner.device.type == "cuda" and os.environ.get("BATCHLLM_CHECK_INDICES", "0") != "1"
        self.capture = bool(capture)
        if self.capture and runner.device.type != "cuda":
            raise ValueError("DecodeGraphs: capture needs a CUDA runner")
        self._entries: "OrderedDict[GraphKey, _Entry]" = OrderedDict()
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        # A capture costs a warm-up forward (the step's own result), the recording and the
        # instantiation: a key is captured at its min_uses-th step; before, the step runs eagerly.
        self.min_uses = max(1, int(min_uses))
        self.ridge_rows = max(1, int(ridge_rows))
        self.capture_cost_steps = float(capture_cost_steps)
        self._uses: Dict[GraphKey, int] = {}
        self._padding_lost: Dict[GraphKey, float] = {}  # per dominated key: step cost lost to padding
        self._stream: Optional[torch.cuda.Stream] = None  # warm-ups and captures (one, for the pool)
        # Blocks a decode row's own KV may still grow by in this job (LLM sets it per job from the
        # largest max_tokens): a captured key's suffix table is that much wider (at most twice its
        # bucket), so the rows' growth replays it instead of capturing each wider bucket.
        self.suffix_headroom_blocks = 0
        self.steps = 0      # steps run through the padded static path
        self.captures = 0   # a capture step returns its warm-up forward's result: it is not a replay
        self.capture_s = 0.0  # host seconds in captures (warm-up forward, recording, instantiation)
        self.replays = 0
        self.dominated = 0  # steps run padded to a larger key than their own (run_key)

    def can_run(self, plan: Any) -> bool:
        """Whether ``plan`` is a decode-only step with levels that every row samples once, in order."""
        rows = len(plan.input_ids)
        num_decode = int(plan.num_decode_seqs)
        if rows == 0 or num_decode != rows or rows > self.max_rows or not self.runner.use_cascade:
            return False
        indptr = getattr(plan, "prefix_kv_indptr", None)
        if indptr is None or len(indptr) == 0:
            return False
        sample_rows = np.asarray(plan.sample_rows)
        return len(sample_rows) == rows and bool((sample_rows == np.arange(rows)).all())

    def key_of(self, plan: Any) -> GraphKey:
        """The shape key of a plan :meth:`can_run` accepted."""
        from .model_runner import _levels

        rows = len(plan.input_ids)
        return GraphKey.of(_levels(plan, rows), rows, self.runner.block_size)

    def run_key(self, key: GraphKey, width: Optional[int] = None) -> Optional[GraphKey]:
        """The key whose static path runs a step of ``key``, or None for the runner's eager path.
        ``width``: the step's suffix table width in blocks; given, a key about to be captured (or,
        without capture, given buffers) is widened by ``suffix_headroom_blocks`` (:meth:`grown`).

        - ``key`` itself once it has a graph (without capture: once it has buffers);
        - else a *dominating* key that has one (every dimension at least ``key``'s, the fewest rows):
          the step runs padded to it, which costs what the larger step costs. Below
          ``ridge_rows`` that is about nothing: a decode step's GEMMs read the weights once whatever
          the rows, and padded rows attend one key each, while an eager step costs the host tens of
          ms (H100, llama-1b: 31 ms eager against 5.7 ms replayed, 2026-11-27) and a capture more.
          Above it, each padded step loses ``cost(dominating) - cost(key)`` (cost: rows, at least
          ``ridge_rows``); ``key`` is captured itself once those losses reach the price of a
          capture, ``capture_cost_steps * cost(key)``, and not before its ``min_uses``-th step (the
          rent-or-buy rule: never more than twice the better of the two choices in hindsight). So
          a job whose batch shrinks below the ridge (the tail of W5: 128 rows down to 1) keeps one
          graph instead of one per halving;
        - else ``key`` at its ``min_uses``-th step, which captures it (always, without capture: the
          padded path is what the CPU tests check); before that None.
        """
        entry = self._entries.get(key)
        if entry is not None and (entry.graph is not None or not self.capture):
            return key
        if len(self._uses) > 4096:  # a long job's one-off keys: forget them
            self._uses.clear()
            self._padding_lost.clear()
        self._uses[key] = uses = self._uses.get(key, 0) + 1
        dominating = self._dominating(key)
        if dominating is not None:
            lost = self._padding_lost.get(key, 0.0) + self._step_cost(dominating) - self._step_cost(key)
            self._padding_lost[key] = lost
            if uses < self.min_uses or lost < self.capture_cost_steps * self._step_cost(key):
                return dominating
            return self.grown(key, width)
        if not self.capture or uses >= self.min_uses:
            return self.grown(key, width)
        return None

    def grown(self, key: GraphKey, width: Optional[int]) -> GraphKey:
        """``key`` with a suffix table wide enough for ``width`` blocks plus ``suffix_headroom_blocks``,
        at most twice ``key``'s own (W1: its rows start at 5 blocks, bucket 8, and end at 12: one
        graph of 16 instead of a capture at 8 and another at 16). A wider table costs its upload
        (rows x width x 4 bytes) and nothing in the kernels, which read the real lengths."""
        if width is None or self.suffix_headroom_blocks <= 0:
            return key
        wide = min(_pow2(int(width) + self.suffix_headroom_blocks), 2 * key.suffix_width)
        return dataclasses.replace(key, suffix_width=max(wide, key.suffix_width))

    def _step_cost(self, key: GraphKey) -> float:
        """A decode step's relative device time: its GEMM rows, at least ``ridge_rows`` (below the
        ridge the weights' bytes set the time)."""
        return float(max(key.rows, self.ridge_rows))

    def _dominating(self, key: GraphKey) -> Optional[GraphKey]:
        """The runnable key (with a graph; without capture, with buffers) whose every dimension is at
        least ``key``'s, with the fewest rows (then the least of the other sizes); None if none."""
        best = None
        for other, entry in self._entries.items():
            if other == key or (self.capture and entry.graph is None):
                continue
            if all(a >= b for a, b in zip(dataclasses.astuple(other), dataclasses.astuple(key))):
                if best is None or dataclasses.astuple(other) < dataclasses.astuple(best):
                    best = other
        return best

    @torch.inference_mode()
    def execute(self, plan: Any, token_feed=None, key: Optional[GraphKey] = None) -> torch.Tensor:
        """Run a plan :meth:`can_run` accepted (cow copies already done); logits ``[B, vocab]`` in the
        model's dtype. ``token_feed``: a model_runner.TokenFeed for overlapped steps; ``key``: the key
        to run it padded to (:meth:`run_key`; default: the plan's own :meth:`key_of`)."""
        from .model_runner import _host_arrays, _levels

        host = _host_arrays(plan)
        rows = len(host["input_ids"])
        levels = _levels(plan, rows)
        key = key or GraphKey.of(levels, rows, self.runner.block_size)
        entry = self._entry(key)
        views = entry.upload.upload(pad_decode_step(host, levels, key, self._suffix_split(levels, rows, key),
                                                    self._prefix_split(levels, key)))
        if token_feed is not None:  # before capture or replay: both read the static input ids
            token_feed.apply(views["input_ids"])
        self.steps += 1
        if self.capture and entry.graph is None:
            hidden = self._try_capture(entry, views)
        elif entry.graph is None:
            hidden = self._forward(entry, views)
        else:
            entry.graph.replay()
            self.replays += 1
            hidden = entry.hidden
        return self.runner.model.compute_logits(hidden[:rows])

    def _suffix_split(self, levels: Dict[str, np.ndarray], rows: int, key: GraphKey) -> tuple:
        """The suffix key split of the step's own ``rows`` rows, launched as ``key.rows``."""
        from .ops import cascade_suffix_split

        lens = levels["suffix_kv_lens"]
        config = self.runner.config
        return cascade_suffix_split(rows, key.rows, config.num_heads, config.num_kv_heads,
                                    int(lens.max()) if len(lens) else 0, self.runner.device)

    def _prefix_split(self, levels: Dict[str, np.ndarray], key: GraphKey) -> tuple:
        """The prefix key split of the step's own prefixes, within what ``key``'s grid holds."""
        from .ops import cascade_prefix_split

        lens = levels["prefix_kv_lens"]
        q_range = levels["prefix_q_range"].reshape(-1, 2)
        readers = int((q_range[:, 1] - q_range[:, 0]).max()) if len(lens) else 0
        config = self.runner.config
        return cascade_prefix_split(len(lens), readers, int(lens.max()) if len(lens) else 0, key.prefixes,
                                    key.prefix_rows, key.prefix_keys, config.num_heads, config.num_kv_heads,
                                    config.head_dim, self.runner.dtype, self.runner.device)

    def _entry(self, key: GraphKey) -> _Entry:
        entry = self._entries.pop(key, None)
        if entry is None:
            entry = _Entry(key, self.runner.device)
            while len(self._entries) >= self.max_graphs:
                _, dropped = self._entries.popitem(last=False)
                if dropped.graph is not None:
                    dropped.graph.reset()
        self._entries[key] = entry
        return entry

    def _forward(self, entry: _Entry, views: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The model over the static views: final hidden states of every padded row."""
        key = entry.key
        levels = self.runner.attach_workspace(static_levels(views, key, self.runner.block_size))  # one per step; inside a capture, one per graph
        set_context(AttentionContext(
            slot_mapping=views["slot_mapping"], num_decode_rows=key.rows, query_start=views["paged_query_start"],
            context_lens=views["paged_context_lens"], block_tables=views["paged_block_tables"], max_q_len=0,
            decode_levels=levels))
        try:
            return self.runner.model(views["input_ids"], views["positions"])
        finally:
            reset_context()

    def _try_capture(self, entry: _Entry, views: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Capture ``entry``'s graph; the step's hidden states (the warm-up forward's). If capture
        fails, warn once and stop capturing (every later step runs the padded path eagerly: same
        results, launch gaps back)."""
        def forget():
            entry.graph, entry.hidden = None, None

        return capture_or_fall_back(self, lambda: self._capture(entry, views), lambda: self._forward(entry, views),
                                    forget, "decode steps")

    def _capture(self, entry: _Entry, views: Dict[str, torch.Tensor]) -> torch.Tensor:
        # The warm-up runs this step for real, so its hidden states are the step's result: the step
        # replays nothing. The K/V it stores are the ones every replay stores (same slots).
        self._stream, hidden = warm_up_for_capture(self.runner, lambda: self._forward(entry, views))
        graph = torch.cuda.CUDAGraph()
        # capture_begin / capture_end rather than torch.cuda.graph, whose entry empties the caching
        # allocators (device and pinned host) for every capture: every later eager step would pay
        # cudaMalloc / cudaHostAlloc again for its activations. Captures share one stream and pool.
        # thread_local: a progress-bar thread touching CUDA must not invalidate the capture.
        with torch.cuda.stream(self._stream):
            entry.hidden = record(graph, self._pool, lambda: self._forward(entry, views))
        entry.graph = graph
        self.captures += 1
        return hidden


def record(graph: torch.cuda.CUDAGraph, pool: Any, fn):
    """``fn()`` recorded into ``graph`` (in ``pool``, on the current stream); its result. Ends the
    capture whatever ``fn`` raises (the forward's error is the one reported)."""
    graph.capture_begin(pool=pool, capture_error_mode="thread_local")
    try:
        result = fn()
    except BaseException:
        try:
            graph.capture_end()
        except RuntimeError:
            pass  # the capture is invalid already
        raise
    graph.capture_end()
    return result


def capture_or_fall_back(graphs: Any, capture, fall_back, forget, steps: str) -> torch.Tensor:
    """``capture()``'s result, timed into ``graphs.capture_s``; if it raises (a RuntimeError: an
    operation capture does not allow, out of memory), ``forget()`` the entry's partial state, stop
    ``graphs`` capturing, warn once, and return ``fall_back()`` (the same step without a graph)."""
    start = time.perf_counter()
    try:
        return capture()
    except RuntimeError as err:
        forget()
        graphs.capture = False
        if graphs.runner.device.type == "cuda":
            torch.cuda.synchronize(graphs.runner.device)
        warnings.warn(f"CUDA graph capture of {steps} failed, they run eagerly from now on: {err}",
                      RuntimeWarning, stacklevel=4)
        return fall_back()
    finally:
        graphs.capture_s += time.perf_counter() - start


def warm_up_for_capture(runner: Any, forward) -> tuple:
    """Runs ``forward()`` on the runner's capture stream (:func:`capture_stream`), as torch requires
    before a capture, ordered after the work queued on the current stream; returns the stream and
    the forward's result, readable on the current stream, with the device idle (capture may begin)."""
    device = runner.device
    current = torch.cuda.current_stream(device)
    stream = capture_stream(runner, device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        result = forward()
    current.wait_stream(stream)
    result.record_stream(current)
    torch.cuda.synchronize(device)
    return stream, result


def capture_stream(runner: Any, device: torch.device) -> torch.cuda.Stream:
    """The side stream every capture of ``runner``'s graphs (decode and piecewise) warms up and
    records on: one stream, so that the graphs' shared memory pool can reuse one capture's freed
    blocks in the next (the caching allocator reuses a block on the stream it was freed on)."""
    stream = getattr(runner, "_graph_capture_stream", None)
    if stream is None:
        stream = torch.cuda.Stream(device)
        runner._graph_capture_stream = stream
    return stream


class GraphModelRunner(ModelRunner):
    """A ModelRunner that replays CUDA graphs: whole-step graphs for decode-only steps (DecodeGraphs),
    piecewise graphs for prefill and mixed steps (piecewise_graphs.MixedGraphs), eager for the rest.

    Same constructor as :class:`ModelRunner` plus ``graph_max_rows``, ``max_graphs``, ``capture``,
    ``min_uses``, ``ridge_rows`` and ``capture_cost_steps`` (see :class:`DecodeGraphs`), and
    ``mixed_max_tokens`` (the largest step the piecewise graphs take; 0 or None, or the environment's
    ``BATCHLLM_MIXED_GRAPHS=0``: none, every such step eager). ``capture`` applies to both kinds.
    """

    def __init__(self, *args, graph_max_rows: int = 1024, max_graphs: int = 32, capture: Optional[bool] = None,
                 min_uses: int = 1, ridge_rows: int = 256, capture_cost_steps: float = 4.0,
                 mixed_max_tokens: Optional[int] = 2048, **kwargs):
        super().__init__(*args, **kwargs)
        self.decode_graphs = DecodeGraphs(self, graph_max_rows, max_graphs, capture, min_uses, ridge_rows,
                                          capture_cost_steps)
        self.mixed_graphs = None
        if mixed_max_tokens and os.environ.get("BATCHLLM_MIXED_GRAPHS", "1") != "0":
            from .piecewise_graphs import MixedGraphs

            mixed_capture = capture
            if capture is None and not self.decode_graphs.capture:
                mixed_capture = False  # the decode graphs' conditions (a CUDA device, no index checks)
            self.mixed_graphs = MixedGraphs(self, mixed_max_tokens, capture=mixed_capture,
                                            pool=self.decode_graphs._pool)

    def execute(self, plan: Any, token_feed=None) -> torch.Tensor:
        graphs = self.decode_graphs
        decode = graphs.can_run(plan)
        own = graphs.key_of(plan) if decode else None
        width = getattr(plan, "max_suffix_blocks", None)
        key = graphs.run_key(own, None if width is None else int(width)) if own is not None else None
        mixed = self.mixed_graphs
        bucket = None
        if key is None and not decode and mixed is not None and mixed.can_run(plan):
            bucket = mixed.run_bucket(plan)
        if key is None and bucket is None:
            return super().execute(plan, token_feed)
        graphs.dominated += key is not None and key != own
        cow_src, cow_dst = getattr(plan, "cow_src", None), getattr(plan, "cow_dst", None)
        if cow_src is not None and len(cow_src):
            self.copy_blocks(cow_src, cow_dst)
        if key is None:
            return mixed.execute(plan, token_feed, bucket)
        return graphs.execute(plan, token_feed, key)
