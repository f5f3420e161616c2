"""The benchmark workloads W1-W6 of WORKLOADS.md as deterministic request lists.

Token ids are drawn uniformly from [10, vocab) with a seeded generator, so every run of a workload
is the same job; outputs are forced to full length (``ignore_eos``). The scheduler simulator
(bench/simulate.py) and the end-to-end benchmark both build their jobs here.

Example
-------
>>> from workloads import make_workload
>>> w = make_workload("W1", scale=1/16)          # one group of 64 instead of 16
>>> len(w.requests), w.requests[0].max_tokens
(64, 128)
>>> sorted(w.arrays())[:3]
['eos_token_ids', 'ignore_eos', 'max_tokens']
"""
from __future__ import annotations

import argparse
import json
import zlib
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np

WORKLOAD_IDS = ["W1", "W2", "W3", "W4", "W5", "W6"]


@dataclass
class WorkloadRequest:
    """One request: prompt token ids (int32 [L]), output length and sample count."""
    prompt_token_ids: np.ndarray
    max_tokens: int
    n: int = 1
    temperature: float = 0.0
    ignore_eos: bool = True


@dataclass
class Workload:
    id: str
    name: str
    description: str
    model: str                      # model shape the workload is specified for (WORKLOADS.md)
    requests: List[WorkloadRequest] = field(default_factory=list)

    @property
    def num_sequences(self) -> int:
        return sum(r.n for r in self.requests)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(r.n * r.max_tokens for r in self.requests)

    def no_sharing_footprint_blocks(self, block_size: int) -> int:
        """KV blocks every sequence would hold at its full length if nothing were shared."""
        return sum(r.n * -(-(len(r.prompt_token_ids) + r.max_tokens) // block_size) for r in self.requests)

    def arrays(self, eos_token_ids=(2,)) -> Dict[str, object]:
        """Keyword arguments of ``_C.Scheduler.add_requests`` for this job (input order kept)."""
        lengths = np.array([len(r.prompt_token_ids) for r in self.requests], np.int64)
        n = len(self.requests)
        return dict(
            tokens=np.concatenate([r.prompt_token_ids for r in self.requests]).astype(np.int32),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            max_tokens=np.array([r.max_tokens for r in self.requests], np.int32),
            num_samples=np.array([r.n for r in self.requests], np.int32),
            min_tokens=np.zeros(n, np.int32),
            ignore_eos=np.array([r.ignore_eos for r in self.requests], bool),
            stop_token_ids=np.zeros(0, np.int32),
            stop_token_offsets=np.zeros(n + 1, np.int64),
            eos_token_ids=list(eos_token_ids),
        )


class _Tokens:
    """Seeded uniform token ids in [10, vocab)."""

    def __init__(self, workload_id: str, seed: int, vocab: int):
        if vocab <= 10:
            raise ValueError(f"vocab must be > 10, got {vocab}")
        self.rng = np.random.default_rng([seed, zlib.crc32(workload_id.encode())])
        self.vocab = vocab

    def __call__(self, n: int) -> np.ndarray:
        return self.rng.integers(10, self.vocab, size=n, dtype=np.int64).astype(np.int32)


def _count(base: int, scale: float) -> int:
    return max(1, int(round(base * scale)))


def _grouped(tok: _Tokens, groups: int, per_group: int, prefix: int, suffix: int, out: int) -> List[WorkloadRequest]:
    requests = []
    for _ in range(groups):
        shared = tok(prefix)
        requests += [WorkloadRequest(np.concatenate([shared, tok(suffix)]), out) for _ in range(per_group)]
    return requests


def _w1(tok, scale):
    return _grouped(tok, _count(16, scale), 64, 1024, 64, 128)


def _w2(tok, scale):
    return _grouped(tok, _count(8, scale), 32, 8192, 32, 64)


def _w3(tok, scale):
    requests = []
    for _ in range(_count(4, scale)):
        system = tok(512)
        for _ in range(8):
            shots = np.concatenate([system, tok(1024)])
            requests += [WorkloadRequest(np.concatenate([shots, tok(64)]), 128) for _ in range(32)]
    return requests


def _w4(tok, scale):
    return [WorkloadRequest(tok(512), 256, n=8, temperature=1.0) for _ in range(_count(256, scale))]


def _w5(tok, scale):
    requests = []
    for _ in range(_count(1024, scale)):
        prompt_len = int(tok.rng.integers(256, 1025))
        out = int(tok.rng.integers(16, 257))
        requests.append(WorkloadRequest(tok(prompt_len), out))
    return requests


def _w6(tok, scale):
    # BatchLLM's microbenchmark: 400 groups x 16; WORKLOADS.md runs it at 1/10 scale (scale=1 -> 40 groups).
    return _grouped(tok, _count(40, scale), 16, 2000, 200, 100)


_SPECS: Dict[str, tuple] = {
    "W1": ("fewshot", "16 groups x 64, 1024 shared + 64 unique, 128 out", "llama-1b", _w1),
    "W2": ("longdoc", "8 docs x 32 questions, 8192 shared + 32 unique, 64 out", "llama-1b", _w2),
    "W3": ("tree", "4 system x 8 shot-sets x 32, 512 + 1024 shared + 64 unique, 128 out", "llama-1b", _w3),
    "W4": ("nsample", "256 prompts of 512, n = 8, 256 out", "llama-1b", _w4),
    "W5": ("noshare", "1024 independent, 256-1024 prompt, 16-256 out", "llama-1b", _w5),
    "W6": ("batchllm-micro", "40 groups x 16 (1/10 of BatchLLM's 400), 2000 shared + 200 unique, 100 out",
           "qwen2.5-7b-shape", _w6),
}


def make_workload(workload_id: str, vocab: int = 32000, seed: int = 0, scale: float = 1.0,
                  order: str = "shuffled") -> Workload:
    """Builds workload `workload_id` ("W1".."W6").

    Parameters
    ----------
    vocab : token ids are uniform in [10, vocab)
    seed : the same seed gives the same job
    scale : multiplies the number of groups (W1-W3, W6) or prompts (W4, W5); at least one
    order : "shuffled" (input order is a seeded permutation, as a batch file that is not sorted by
        prefix) or "grouped" (requests of one prefix group are adjacent)
    """
    if workload_id not in _SPECS:
        raise ValueError(f"workload must be one of {WORKLOAD_IDS}, got {workload_id!r}")
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if order not in ("shuffled", "grouped"):
        raise ValueError(f"order must be 'shuffled' or 'grouped', got {order!r}")
    name, description, model, build = _SPECS[workload_id]
    tok = _Tokens(workload_id, seed, vocab)
    requests = build(tok, scale)
    if order == "shuffled":
        perm = np.random.default_rng([seed, 1 + zlib.crc32(workload_id.encode())]).permutation(len(requests))
        requests = [requests[i] for i in perm]
    return Workload(workload_id, name, description, model, requests)


def main() -> None:
    parser = argparse.ArgumentParser(description="Print the shape of the benchmark workloads")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    print(f"{'id':4} {'name':15} {'requests':>8} {'seqs':>6} {'prompt tok':>11} {'output tok':>11} {'no-share blocks':>15}")
    for wid in WORKLOAD_IDS:
        w = make_workload(wid, scale=args.scale)
        print(f"{wid:4} {w.name:15} {len(w.requests):8d} {w.num_sequences:6d} {w.prompt_tokens:11d} "
              f"{w.output_tokens:11d} {w.no_sharing_footprint_blocks(args.block_size):15d}")
        print(json.dumps({"workload": wid, "requests": len(w.requests), "sequences": w.num_sequences,
                          "prompt_tokens": w.prompt_tokens, "output_tokens": w.output_tokens}))


if __name__ == "__main__":
    main()
