"""The host's work per engine step, with the model's device work taken out.

On a GPU the engine overlaps step i+1's host work (schedule, plan arrays, graph key and padding,
staging, sampling calls, commit, bookkeeping) with step i's kernels, so a step costs
max(host, device). W1's floor on an H100 is 3.5 ms a step at 1,024 rows: host work near that size
caps the job whatever the kernels do. This bench measures that host work on the CPU: the engine
runs a whole workload through the CUDA-graph runner's padded static path (``capture=False``) and
the overlapped loop, with the model replaced by a stub that returns zero hidden states and logits
over the tiny model's 261 tokens (what stays is the host's share: on a GPU the model and the sampler's pass
over the logits are kernels the host only queues).

Prints the host's ms per step (all steps, and by kind; the sampler's pass, a kernel on a GPU,
reported apart and left out), the top functions by own time (cProfile, optional)
and one JSON line.

    PYTHONPATH=python .venv/bin/python bench/bench_host.py --workload W1 --scale 1
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import WORKLOAD_IDS, make_workload  # noqa: E402


class StubModel(torch.nn.Module):
    """Zero hidden states, and logits over ``vocab`` tokens peaked at one token per row (row r draws
    ``tokens[r % len(tokens)]`` each step, so detokenized outputs grow as text does): the model's
    device work, gone."""

    def __init__(self, hidden: int, vocab: int, tokens=None):
        super().__init__()
        self.hidden, self.vocab = hidden, vocab
        self.tokens = torch.tensor(tokens if tokens else [0])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._zeros(len(input_ids), self.hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._zeros(len(hidden), self.vocab)

    def _zeros(self, rows: int, width: int) -> torch.Tensor:
        """Zeros made once per shape: filling them anew is the model's device work on a GPU (a
        kernel the host only queues), not host work (it was ~1 ms a W1 step here)."""
        cache = self.__dict__.setdefault("_cache", {})
        if (rows, width) not in cache:
            values = torch.zeros(rows, width)
            if width == self.vocab:
                values[torch.arange(rows), self.tokens[torch.arange(rows) % len(self.tokens)]] = 1.0
            cache[(rows, width)] = values
        return cache[(rows, width)]


def build_llm(args):
    from batchllm_core import LLM
    from batchllm_core.cuda_graphs import GraphModelRunner

    llm = LLM(device="cpu", kv_cache_memory=args.kv_cache_memory, max_num_batched_tokens=args.max_num_batched_tokens,
              max_num_seqs=args.max_num_seqs, policy=args.policy, overlap=True, cuda_graphs=False)
    runner = GraphModelRunner(llm.model, llm.config, llm.num_kv_blocks, llm.block_size, llm.device, llm.dtype,
                              graph_max_rows=llm.max_num_seqs, capture=False)
    # Every forward stubbed, the eager (mixed, prefill) steps' too: their host work on a GPU is a
    # Python pass over the layers queueing kernels, which the CPU cannot time apart from running
    # the reference kernels (bench/profile_e2e.py times it on the GPU).
    if args.bpe_tokenizer:
        llm.tokenizer = bpe_tokenizer()
    # Rows draw tokens of plain text (no piece of a multi-byte character, no special token), each
    # row its own, from the ids the tiny model's logits cover.
    tokenizer, vocab = llm.tokenizer, llm.config.vocab_size
    texts = tokenizer.token_texts()[:vocab] if hasattr(tokenizer, "token_texts") else \
        [tokenizer.decode([i]) for i in range(vocab)]  # a tree before token_texts, for an A/B
    plain = [i for i, t in enumerate(texts) if t and t.isprintable() and not set(t) & {"@", "\ufffd"}]
    runner.model = StubModel(llm.config.hidden_size, llm.config.vocab_size, plain)  # the tiny model's 261 tokens
    llm.runner = runner
    return llm


def bpe_tokenizer():
    """A byte-level BPE tokenizer (the Rust library's, as Llama 3's and Qwen's are) trained on a few
    lines: what an HF checkpoint's detokenization costs, in place of the tiny model's Python
    ByteTokenizer. The stub's logits cover ids below 261, which decode to 1-3 bytes each."""
    import tempfile

    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from batchllm_core.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["The quick brown fox jumps over the lazy dog. " * 20,
                                 "Question: what is the capital of France? Answer: Paris."], trainer)
    with tempfile.TemporaryDirectory() as directory:
        backend.save(os.path.join(directory, "tokenizer.json"))
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
        return Tokenizer.from_pretrained(directory)


def timed_steps(llm):
    """Wraps the engine's launch and commit: host seconds per step, by kind."""
    times = defaultdict(list)
    launch, commit = llm._launch, llm._commit

    def kind(plan):
        rows, decode = len(plan.input_ids), int(plan.num_decode_seqs)
        return "decode" if rows == decode else "prefill" if decode == 0 else "mixed"

    def launch_timed(plan, job, in_flight):
        t0 = time.perf_counter()
        out = launch(plan, job, in_flight)
        times[kind(plan) + " launch"].append(time.perf_counter() - t0)
        return out

    def commit_timed(*a, **k):
        t0 = time.perf_counter()
        yield from commit(*a, **k)
        times["commit"].append(time.perf_counter() - t0)

    llm._launch, llm._commit = launch_timed, commit_timed
    return times


def time_device_work(times):
    """Times ops.sample_rows: the sampler's pass over the logits, a kernel on a GPU (the host only
    queues it) but its C++ reference here; it is reported apart and left out of the host's share."""
    from batchllm_core import ops

    sample_rows = ops.sample_rows

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = sample_rows(*args, **kwargs)
        times["sample_rows (GPU kernel)"].append(time.perf_counter() - t0)
        return out

    ops.sample_rows = timed


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="W1", choices=WORKLOAD_IDS)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--policy", default="batchllm")
    parser.add_argument("--kv-cache-memory", type=int, default=1 << 30)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--stop", default=None,
                        help="a stop string on every request ('@@' never matches: the stub's tokens have no '@')")
    parser.add_argument("--logprobs", type=int, default=None, help="logprobs on every request")
    parser.add_argument("--bpe-tokenizer", action="store_true",
                        help="detokenize with a byte-level BPE of the Rust library, as an HF checkpoint does")
    parser.add_argument("--profile", type=int, default=0, help="print the top N functions by own time")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)

    from batchllm_core import SamplingParams

    llm = build_llm(args)
    workload = make_workload(args.workload, vocab=llm.config.vocab_size, scale=args.scale)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in workload.requests]
    params = [SamplingParams(n=r.n, temperature=r.temperature, max_tokens=r.max_tokens, ignore_eos=True,
                             stop=args.stop, logprobs=args.logprobs)
              for r in workload.requests]
    llm.generate(prompts[:2], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)  # warm-up
    times = timed_steps(llm)
    time_device_work(times)
    profiler = cProfile.Profile() if args.profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    llm.generate(prompts, params, use_tqdm=False)
    if profiler:
        profiler.disable()
    wall = time.perf_counter() - start
    steps = int(llm.last_stats["steps"])
    host = wall - sum(times["sample_rows (GPU kernel)"])
    result_tokenizer = "bpe" if args.bpe_tokenizer else type(llm.tokenizer).__name__
    print(f"{args.workload} x{args.scale} {args.policy} stop={args.stop!r} logprobs={args.logprobs} "
          f"tokenizer={result_tokenizer}: {steps} steps, {wall:.3f} s on the host, of which "
          f"{host:.3f} s are the host's share on a GPU: {1e3 * host / steps:.3f} ms a step "
          f"({platform.processor() or platform.machine()})")
    per_kind = {}
    for name, values in sorted(times.items()):
        per_kind[name] = {"count": len(values), "ms": round(1e3 * sum(values) / len(values), 3)}
        print(f"  {name:>15}: {len(values):5d} x {per_kind[name]['ms']:7.3f} ms")
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.profile)
        print(text.getvalue())
    result = {"bench": "host_step", "workload": args.workload, "scale": args.scale, "policy": args.policy,
              "stop": args.stop, "logprobs": args.logprobs,
              "tokenizer": result_tokenizer,
              "steps": steps, "wall_s": round(wall, 4), "host_s": round(host, 4),
              "host_ms_per_step": round(1e3 * host / steps, 3),
              "per_kind": per_kind, "graph_steps": llm.runner.decode_graphs.steps, "profiled": bool(profiler)}
    print("JSON " + json.dumps(result))
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)  # the stub's zeros and the CPU sampler: threads would only contend
    main()
