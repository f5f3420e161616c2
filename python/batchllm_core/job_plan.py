"""``batchllm plan``: explain how a batch job will share prefixes, without running a model.

It tokenizes the job exactly as ``run-batch`` would (``batch_prompts``), builds the radix tree over
every prompt (``_C.PrefixTree``), asks for the multi-level sharing plan the scheduler uses
(prefixes cut to whole KV blocks, at least one block long) and reports:

- the prefix groups (top-level prefixes with the levels nested under them), tree depth and nodes;
- prompt tokens, tokens to prefill after sharing, shared tokens;
- predicted KV peak: if every request were resident at once, with and without sharing, and for the
  largest group alone (the smallest KV pool that still runs every group together);
- predicted speedup over no sharing, under the compute-bound model "time is proportional to tokens
  computed": (prompt + output tokens) / (prefill after sharing + output tokens). Output tokens count
  ``n * max_tokens``; a request without max_tokens is assumed to write ``ASSUMED_OUTPUT_TOKENS``.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, TextIO

import numpy as np

from . import _C
from .batch_io import read_input_lines
from .batch_prompts import TokenizedRequest, tokenize_requests
from .batch_requests import BatchRequest, LineError, parse_lines

__all__ = ["ASSUMED_OUTPUT_TOKENS", "plan_job", "run_plan", "format_plan"]

ASSUMED_OUTPUT_TOKENS = 256
MAX_DEPTH = 8              # the scheduler's level limit
KV_DTYPE_BYTES = 2         # KV bytes are predicted for bfloat16, the GPU default


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class _Model:
    tokenizer: object
    config: object
    name: str


def _load_tokenizer(model: Optional[str]) -> _Model:
    """The model's tokenizer and config only (no weights)."""
    from pathlib import Path

    from .models.config import NAMED_SHAPES, ModelConfig
    from .tokenizer import ByteTokenizer, Tokenizer

    if model is None:
        return _Model(ByteTokenizer(), ModelConfig.from_name("tiny"), "embedded tiny model")
    path = Path(model)
    if path.is_dir():
        return _Model(Tokenizer.from_pretrained(path), ModelConfig.from_hf_file(path / "config.json"), str(path))
    if model in NAMED_SHAPES:
        tokenizer = ByteTokenizer() if model == "tiny" else None
        return _Model(tokenizer, ModelConfig.from_name(model), model)
    raise FileNotFoundError(f"{model}: not a model directory and not a named shape ({', '.join(NAMED_SHAPES)})")


def plan_job(tokenized: List[TokenizedRequest], block_size: int, max_model_len: int,
             kv_bytes_per_token: int) -> Dict[str, object]:
    """The plan of a tokenized job as a JSON-ready dict (see the module docstring for the fields)."""
    tree = _C.PrefixTree()
    lengths = np.array([len(t.prompt_token_ids) for t in tokenized], dtype=np.int64)
    offsets = np.zeros(len(tokenized) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = (np.concatenate([np.asarray(t.prompt_token_ids, dtype=np.int32) for t in tokenized])
              if tokenized else np.zeros(0, dtype=np.int32))
    tree.insert(tokens, offsets)
    sharing = tree.group_multi_level(block_size, MAX_DEPTH, block_size)
    stats = dict(tree.stats(sharing))

    parent, depth = sharing.parent.tolist(), sharing.depth.tolist()
    begin, end = sharing.begin.tolist(), sharing.end.tolist()
    request_prefix = sharing.request_prefix.tolist()
    samples = [int(t.request.sampling.get("n", 1)) for t in tokenized]
    outputs, assumed = _output_tokens(tokenized, lengths.tolist(), max_model_len)

    prefixes = []
    for p in range(len(sharing)):
        readers = sharing.prefix_requests(p).tolist()
        prefixes.append({"index": p, "parent": parent[p], "depth": depth[p], "begin": begin[p], "end": end[p],
                         "tokens": end[p] - begin[p], "num_requests": len(readers),
                         "saved_tokens": (len(readers) - 1) * (end[p] - begin[p]),
                         "custom_ids_sample": [tokenized[r].request.custom_id for r in readers[:5]]})

    # KV blocks per request beyond its shared prefixes: the first sample holds its own prompt part and
    # output; each further sample forks the full prompt blocks and holds a copy of the partial one.
    own_blocks, solo_blocks = [], []
    for r, prompt_len in enumerate(lengths.tolist()):
        shared = end[request_prefix[r]] if request_prefix[r] >= 0 else 0
        own_blocks.append(_sample_blocks(prompt_len - shared, outputs[r], samples[r], block_size))
        solo_blocks.append(_sample_blocks(prompt_len, outputs[r], samples[r], block_size))
    prefix_blocks = [(end[p] - begin[p]) // block_size for p in range(len(prefixes))]
    block_bytes = block_size * kv_bytes_per_token

    decode_tokens = sum(n * out for n, out in zip(samples, outputs))
    prompt_tokens, prefill_tokens = int(stats["prompt_tokens"]), int(stats["prefill_tokens"])
    return {
        "requests": len(tokenized),
        "prompt_tokens": prompt_tokens,
        "prefill_tokens": prefill_tokens,
        "shared_tokens": int(stats["shared_tokens"]),
        "groups": int(stats["groups"]),
        "top_level_groups": sum(1 for p in parent if p < 0),
        "tree_depth": (max(depth) + 1) if depth else 0,
        "tree_nodes": int(stats["nodes"]),
        "block_size": block_size,
        "output_tokens": decode_tokens,
        "requests_assumed_output": assumed,
        "kv_bytes_per_token": kv_bytes_per_token,
        "kv_peak_bytes": (sum(prefix_blocks) + sum(own_blocks)) * block_bytes,
        "kv_peak_bytes_no_sharing": sum(solo_blocks) * block_bytes,
        "kv_largest_group_bytes": _largest_group_blocks(parent, request_prefix, prefix_blocks, own_blocks) * block_bytes,
        "prefill_speedup": prompt_tokens / prefill_tokens if prefill_tokens else 1.0,
        "predicted_speedup": ((prompt_tokens + decode_tokens) / (prefill_tokens + decode_tokens)
                              if prefill_tokens + decode_tokens else 1.0),
        "prefixes": prefixes,
    }


def _output_tokens(tokenized: List[TokenizedRequest], lengths: List[int], max_model_len: int):
    outputs, assumed = [], 0
    for t, prompt_len in zip(tokenized, lengths):
        max_tokens = t.request.sampling.get("max_tokens")
        if max_tokens is None:
            assumed += 1
            max_tokens = min(ASSUMED_OUTPUT_TOKENS, max_model_len - prompt_len)
        outputs.append(int(max_tokens))
    return outputs, assumed


def _sample_blocks(own_tokens: int, output_tokens: int, n: int, block_size: int) -> int:
    first = _ceil_div(own_tokens + output_tokens, block_size)
    forked = _ceil_div(own_tokens % block_size + output_tokens, block_size)
    return first + (n - 1) * forked


def _largest_group_blocks(parent: List[int], request_prefix: List[int], prefix_blocks: List[int],
                          own_blocks: List[int]) -> int:
    """KV blocks of the largest top-level group (its prefix levels + its members), or of the largest
    lone request when nothing is shared."""
    def root(p: int) -> int:
        while parent[p] >= 0:
            p = parent[p]
        return p

    group_blocks: Dict[int, int] = {}
    for p, blocks in enumerate(prefix_blocks):
        group_blocks[root(p)] = group_blocks.get(root(p), 0) + blocks
    lone = 0
    for r, p in enumerate(request_prefix):
        if p >= 0:
            group_blocks[root(p)] += own_blocks[r]
        else:
            lone = max(lone, own_blocks[r])
    return max([lone, *group_blocks.values()])


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def format_plan(plan: Dict[str, object], invalid: List[LineError], model_name: str, max_groups: int) -> str:
    """The human-readable report of ``plan``."""
    p = plan
    lines = [f"batchllm plan ({model_name}, KV blocks of {p['block_size']} tokens)",
             f"  requests:        {p['requests']:,} ({len(invalid)} invalid lines not planned)",
             f"  prompt tokens:   {p['prompt_tokens']:,}",
             f"  to prefill:      {p['prefill_tokens']:,} after sharing ({p['shared_tokens']:,} shared tokens "
             f"computed once)",
             f"  prefix groups:   {p['top_level_groups']:,} top-level, {p['groups']:,} shared prefixes in all, "
             f"tree depth {p['tree_depth']} ({p['tree_nodes']:,} radix nodes)",
             f"  output tokens:   {p['output_tokens']:,} at most"
             + (f" ({p['requests_assumed_output']} requests without max_tokens assumed to write "
                f"{ASSUMED_OUTPUT_TOKENS})" if p['requests_assumed_output'] else ""),
             f"  KV peak:         {_fmt_bytes(p['kv_peak_bytes'])} if every request ran at once "
             f"({_fmt_bytes(p['kv_peak_bytes_no_sharing'])} without sharing); largest group alone "
             f"{_fmt_bytes(p['kv_largest_group_bytes'])} (bfloat16)",
             f"  speedup:         {p['prefill_speedup']:.2f}x less prefill, {p['predicted_speedup']:.2f}x predicted "
             f"overall over no sharing (time ~ tokens computed)"]
    top = sorted((x for x in p["prefixes"] if x["parent"] < 0), key=lambda x: -x["saved_tokens"])
    if top:
        lines.append(f"  groups (by tokens saved{', first %d' % max_groups if len(top) > max_groups else ''}):")
    children: Dict[int, List[dict]] = {}
    for x in p["prefixes"]:
        children.setdefault(x["parent"], []).append(x)
    for group in top[:max_groups]:
        _describe(group, children, lines, indent=4)
    for error in invalid[:10]:
        lines.append(f"  invalid: {error.message}")
    if len(invalid) > 10:
        lines.append(f"  ... and {len(invalid) - 10} more invalid lines")
    return "\n".join(lines)


def _describe(prefix: dict, children: Dict[int, List[dict]], lines: List[str], indent: int) -> None:
    ids = ", ".join(prefix["custom_ids_sample"])
    more = ", ..." if prefix["num_requests"] > len(prefix["custom_ids_sample"]) else ""
    lines.append(f"{' ' * indent}{prefix['num_requests']} requests share tokens [{prefix['begin']}, {prefix['end']}) "
                 f"({prefix['tokens']} tokens, saves {prefix['saved_tokens']:,}): {ids}{more}")
    for child in children.get(prefix["index"], []):
        _describe(child, children, lines, indent + 2)


def run_plan(input_path: str, model: Optional[str] = None, block_size: int = 16, as_json: bool = False,
             max_groups: int = 20, stdout: Optional[TextIO] = None, stderr: Optional[TextIO] = None) -> int:
    """``batchllm plan``: prints the report (or one JSON object); returns the exit code."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    from .batch_io import BatchFileError

    try:
        items = list(parse_lines(read_input_lines(input_path)))
    except BatchFileError as exc:
        stderr.write(f"batchllm plan: error: {exc}\n")
        return 1
    loaded = _load_tokenizer(model)
    requests = [item for item in items if isinstance(item, BatchRequest)]
    invalid = [item for item in items if isinstance(item, LineError)]
    tokenized, rejected = tokenize_requests(requests, loaded.tokenizer, loaded.config.max_position_embeddings,
                                            loaded.config.vocab_size)
    invalid = sorted(invalid + rejected, key=lambda e: e.line)
    kv_bytes_per_token = 2 * loaded.config.num_layers * loaded.config.num_kv_heads * loaded.config.head_dim * KV_DTYPE_BYTES
    plan = plan_job(tokenized, block_size, loaded.config.max_position_embeddings, kv_bytes_per_token)
    if as_json:
        plan["invalid"] = [{"line": e.line, "custom_id": e.custom_id, "code": e.code, "message": e.message}
                           for e in invalid]
        stdout.write(json.dumps(plan) + "\n")
    else:
        stdout.write(format_plan(plan, invalid, loaded.name, max_groups) + "\n")
    return 0
