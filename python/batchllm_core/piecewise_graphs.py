"""Piecewise CUDA graphs for the steps the decode graphs do not take: prefill and mixed steps.

A mixed step's attention changes shape every step (which rows prefill, how long their chunks and
contexts are), but everything between two attentions (the projections, norms, rope, K/V store and
MLP) depends on the step's token count only. So the forward (LlamaModel.forward_staged) is captured
as L + 1 graphs per padded token count, a *bucket*: piece 0 from the embedding to layer 0's K/V
store, piece i from layer i-1's attention output to layer i's K/V store, the last piece to the final
norm. A step copies its ids, positions and KV slots into the bucket's static inputs, replays piece
0, runs layer 0's attention eagerly (ops' kernels, launched from the step's own metadata), replays
piece 1, and so on: a layer costs the host one graph launch and the attention calls instead of about
ten kernel launches and twenty torch calls (vLLM's piecewise CUDA graphs do the same).

Why: on an H100 (run 4, 2026-11-27) W1's and W5's eager mixed steps took 16.1 and 13.7 ms of host
time each, and their device time (measured from an event recorded as the host starts the step) was
as long to within 2 us a step: the GPU waited for the host's launches.

Padding: rows ``[T, bucket)`` take token 0 at position 0 and KV slot -1 (nothing stored); attention
computes the rows the step's metadata names, its own T, so the padded rows' attention output keeps
whatever an earlier step left there (finite), and their hidden states are never sampled.

Memory: the pieces of every bucket share one graph pool with the decode graphs. A bucket keeps its
static inputs, the attention output ``[bucket, Hq, D]``, one q/k/v projection buffer every layer
writes (``forward_staged``'s ``qkv_out``: one, not one a layer), the running residual and the final
hidden states; the rest (the MLP's activations) is freed inside each piece and reused.

On a CPU device (``capture=False``) the same static, padded, piecewise path runs without graphs:
that is how the tests check it without a GPU.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .context import AttentionContext, reset_context, set_context

__all__ = ["MixedGraphs", "token_bucket"]

_MIN_BUCKET = 16
_STEP = 256


def token_bucket(tokens: int) -> int:
    """Padded token count of a piecewise step: powers of two from 16 to 256, then multiples of 256.

    A prefill or mixed step is compute-bound above a few hundred tokens, so padding costs GEMM rows:
    at most 1/2 below 256 tokens, under 256 rows (12.5% at 2,048) above.
    """
    tokens = max(int(tokens), 1)
    if tokens <= _STEP:
        return max(_MIN_BUCKET, 1 << (tokens - 1).bit_length())
    return -(-tokens // _STEP) * _STEP


class _Bucket:
    """One token count's static inputs (ids, positions, KV slots: int64 ``[3, tokens]``), attention
    output, q/k/v buffer, and after capture its L + 1 graphs and the tensors they leave behind."""

    def __init__(self, tokens: int, runner: Any):
        config, device = runner.config, runner.device
        self.tokens = tokens
        self.inputs = torch.zeros(3, tokens, dtype=torch.int64, device=device)
        self.attn_out = torch.zeros(tokens, config.num_heads, config.head_dim, dtype=runner.dtype, device=device)
        width = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        self.qkv = torch.zeros(tokens, width, dtype=runner.dtype, device=device)
        self.graphs: List[torch.cuda.CUDAGraph] = []
        self.stops: List[tuple] = []  # per layer, what its piece yielded: (layer, q, k, v)
        self.hidden: Optional[torch.Tensor] = None


class MixedGraphs:
    """Prefill and mixed steps of one ModelRunner through per-bucket piecewise CUDA graphs.

    Parameters
    ----------
    runner : ModelRunner
        Its model must run the layer-op kernels (``LlamaModel.uses_layer_kernels``): the staged
        forward is that path.
    max_tokens : int
        Larger steps run eagerly (the engine sets the step token budget).
    max_graphs : int
        Buckets kept at once (least recently used dropped first, with its graphs).
    capture : bool or None
        Capture and replay; None: on a CUDA runner unless kernel index checks
        (``BATCHLLM_CHECK_INDICES=1``, which synchronise) are on. False runs the same static piecewise path without graphs (tests; A/B timing).
    min_uses : int
        A bucket's steps run eagerly until its min_uses-th, which captures it: a capture costs
        about two eager steps of host time (the step itself as the warm-up, then the recording),
        so a token count seen once (a job's last partial step) is not captured.
    pool : optional
        The graph memory pool to share (the decode graphs'); default: a new one.
    """

    def __init__(self, runner: Any, max_tokens: int, max_graphs: int = 4, capture: Optional[bool] = None,
                 min_uses: int = 2, pool: Any = None):
        self.runner = runner
        self.max_tokens = int(max_tokens)
        self.max_graphs = max(1, int(max_graphs))
        if capture is None:
            capture = runner.device.type == "cuda" and os.environ.get("BATCHLLM_CHECK_INDICES", "0") != "1"
        self.capture = bool(capture)
        if self.capture and runner.device.type != "cuda":
            raise ValueError("MixedGraphs: capture needs a CUDA runner")
        self.min_uses = max(1, int(min_uses))
        self._pool = (pool if pool is not None else torch.cuda.graph_pool_handle()) if self.capture else None
        self._stream: Optional[torch.cuda.Stream] = None  # the captures' (cuda_graphs.capture_stream)
        self._buckets: "OrderedDict[int, _Bucket]" = OrderedDict()
        self._uses: Dict[int, int] = {}
        self.steps = 0      # steps run through the static piecewise path
        self.captures = 0   # a capture step returns its warm-up's result: not a replay
        self.capture_s = 0.0
        self.replays = 0

    def can_run(self, plan: Any) -> bool:
        """Whether ``plan`` fits a bucket and the model runs the staged (layer-op kernel) forward."""
        rows = len(plan.input_ids)
        model = self.runner.model
        if not 0 < rows <= self.max_tokens or not hasattr(model, "forward_staged"):  # e.g. a stub
            return False
        return len(model.layers) > 0 and model.uses_layer_kernels(self.runner.device)

    def run_bucket(self, plan: Any) -> Optional[int]:
        """The bucket that runs ``plan`` (:meth:`can_run` accepted it), or None for the eager path: its
        own bucket once captured (without capture: at once), or at its ``min_uses``-th step."""
        bucket = token_bucket(len(plan.input_ids))
        entry = self._buckets.get(bucket)
        if entry is not None and (entry.graphs or not self.capture):
            return bucket
        if len(self._uses) > 1024:
            self._uses.clear()
        self._uses[bucket] = uses = self._uses.get(bucket, 0) + 1
        return bucket if not self.capture or uses >= self.min_uses else None

    @torch.inference_mode()
    def execute(self, plan: Any, token_feed=None, bucket: Optional[int] = None) -> torch.Tensor:
        """Run a plan :meth:`can_run` accepted (cow copies already done) padded to ``bucket``
        (default: its own); logits of its sampled rows in the model's dtype."""
        rows = len(plan.input_ids)
        bucket = bucket or token_bucket(rows)
        if bucket < rows:
            raise ValueError(f"MixedGraphs: a step of {rows} tokens does not fit bucket {bucket}")
        entry = self._entry(bucket)
        padded = np.zeros((3, bucket), np.int64)
        padded[0, :rows] = np.asarray(plan.input_ids)  # -1 for rows the token feed fills
        padded[1, :rows] = np.asarray(plan.positions)
        padded[2, :] = -1
        padded[2, :rows] = np.asarray(plan.slot_mapping)
        step = self.runner.prepare_step(plan, token_feed, extra={"static_inputs": padded}, row_inputs=False)
        entry.inputs.copy_(step.device["static_inputs"])  # one device-side copy: the graphs read these
        if token_feed is not None:
            token_feed.apply(entry.inputs[0], step.device["token_src"])
        context = step.context
        context.slot_mapping = entry.inputs[2]
        self.steps += 1
        if self.capture and not entry.graphs:
            hidden = self._try_capture(entry, context)
        elif entry.graphs:
            hidden = self._replay(entry, context)
        else:
            hidden = self._forward(entry, context)
        return self.runner.sampled_logits(hidden, step)

    def _entry(self, bucket: int) -> _Bucket:
        entry = self._buckets.pop(bucket, None)
        if entry is None:
            while len(self._buckets) >= self.max_graphs:
                _, dropped = self._buckets.popitem(last=False)
                for graph in dropped.graphs:
                    graph.reset()
            entry = _Bucket(bucket, self.runner)
        self._buckets[bucket] = entry
        return entry

    def _stages(self, entry: _Bucket):
        return self.runner.model.forward_staged(entry.inputs[0], entry.inputs[1], qkv_out=entry.qkv)

    def _attend(self, entry: _Bucket, stop: tuple) -> torch.Tensor:
        layer, q, k, v = stop
        return self.runner.model.layers[layer].attention.attend_stored(q, k, v, out=entry.attn_out)

    def _forward(self, entry: _Bucket, context: AttentionContext) -> torch.Tensor:
        """The staged forward over the static inputs, each attention run eagerly where it stops; the
        final hidden states of every padded row."""
        set_context(context)
        try:
            stages = self._stages(entry)
            try:
                stop = next(stages)
                while True:
                    stop = stages.send(self._attend(entry, stop))
            except StopIteration as done:
                return done.value
        finally:
            reset_context()

    def _replay(self, entry: _Bucket, context: AttentionContext) -> torch.Tensor:
        set_context(context)
        try:
            for graph, stop in zip(entry.graphs, entry.stops):
                graph.replay()
                self._attend(entry, stop)
            entry.graphs[-1].replay()
        finally:
            reset_context()
        self.replays += 1
        return entry.hidden

    def _try_capture(self, entry: _Bucket, context: AttentionContext) -> torch.Tensor:
        """Capture ``entry``'s pieces; the step's hidden states (the warm-up's). If capture fails,
        warn once and stop capturing (later steps run eagerly: same results, host cost back)."""
        from .cuda_graphs import capture_or_fall_back

        def forget():
            entry.graphs, entry.stops, entry.hidden = [], [], None

        return capture_or_fall_back(self, lambda: self._capture(entry, context), lambda: self._forward(entry, context),
                                    forget, "prefill and mixed steps")

    def _capture(self, entry: _Bucket, context: AttentionContext) -> torch.Tensor:
        from .cuda_graphs import record, warm_up_for_capture  # on the decode graphs' stream: their pool is shared

        # The warm-up is the step itself, for real (the capture records work and runs none), so its
        # hidden states are the step's result.
        self._stream, hidden = warm_up_for_capture(self.runner, lambda: self._forward(entry, context))
        graphs, stops = [], []
        set_context(context)  # the pieces' K/V stores read its slot mapping (the static inputs')
        try:
            with torch.cuda.stream(self._stream):
                stages = self._stages(entry)
                out = None  # no attention while capturing: the replay runs it between the pieces
                while True:
                    # As the decode graphs (cuda_graphs.record: capture_begin/end; torch.cuda.graph
                    # would empty the caching allocators at every piece).
                    graph = torch.cuda.CUDAGraph()
                    stop = record(graph, self._pool, lambda: _advance(stages, out))
                    graphs.append(graph)
                    if stop[0] == "done":
                        entry.hidden = stop[1]
                        break
                    stops.append(stop[1])
                    out = entry.attn_out
        finally:
            reset_context()
        entry.graphs, entry.stops = graphs, stops
        self.captures += 1
        return hidden


def _advance(stages, out: Optional[torch.Tensor]) -> tuple:
    """The staged forward to its next stop: ("stop", (layer, q, k, v)) or, at its end, ("done",
    hidden states). ``out``: the attention output to send (None: the first piece)."""
    try:
        return "stop", (next(stages) if out is None else stages.send(out))
    except StopIteration as done:
        return "done", done.value
