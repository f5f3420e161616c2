"""``LLM``: vLLM's offline API on top of the global prefix-sharing scheduler.

One job per ``generate`` call: every prompt is tokenized and handed to the native scheduler at once
(it plans prefix groups over the whole job), then the loop runs schedule -> run -> commit until the
scheduler has nothing left. Python adds what needs text or tensors: sampling, logprobs, stop strings.
"""
from __future__ import annotations

import time
import warnings
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _C
from .engine_setup import default_cpu_kv_bytes, load, pick_device
from .job import Job, PreparedRequest
from .outputs import RequestOutput
from .sampling import Sampler, SamplingParams

__all__ = ["LLM"]

PromptType = Union[str, dict]
ParamsType = Union[None, SamplingParams, Sequence[SamplingParams]]


_TILE_TOKENS = 128  # token-budget alignment (matmul tiles); the scheduler's default


class LLM:
    """An offline batch engine for one model (vLLM's ``LLM``).

    Parameters
    ----------
    model : str or None
        A local Hugging Face model directory; None: the embedded tiny model (random weights, noise text).
    dtype : str or torch.dtype
        "auto" (the checkpoint's dtype on CUDA, float32 on CPU), "float32", "bfloat16", "float16".
    device : str or torch.device
        "auto" (CUDA when usable, else CPU), "cpu", "cuda", "cuda:1".
    block_size : int
        Tokens per KV block.
    kv_cache_memory : int or None
        Bytes for the KV pool; None: a default share of the device's free memory.
    policy : str
        Scheduling policy: "batchllm" (global prefix groups), "fcfs-lru" (vLLM-like prefix cache)
        or "no-share".
    seed : int
        Seeds the stream that unseeded requests draw their sampling seeds from.
    max_num_batched_tokens : int
        Token rows per step (the scheduler's token budget).
    max_num_seqs : int
        Sequences running at once at most.
    max_model_len : int or None
        Context length (prompt + output) allowed; None: the model's.
    cuda_graphs : bool or None
        On CUDA, replay captured CUDA graphs: whole-step graphs for decode-only steps
        (``batchllm_core.cuda_graphs``), piecewise graphs around the attention for prefill and mixed
        steps (``batchllm_core.piecewise_graphs``; ``BATCHLLM_MIXED_GRAPHS=0`` runs those eagerly);
        a failed capture warns and runs that shape eagerly. None (default): on for a CUDA device
        (an H100 ran W1 in 0.67x the eager time, 2026-11-27), off on the CPU; True on the CPU warns
        and runs eagerly.
    overlap : bool or None
        Plan and queue step i+1 before waiting for step i's samples (the scheduler assumes each
        sampled sequence goes on; the step's decode rows take their input ids from step i's samples
        on the device; a row of a sequence that step i stopped is discarded). Hides the host's
        per-step work behind the GPU's. Same outputs as without. None (default): on for a CUDA
        device (W1 with graphs: 0.95x the time), off on the CPU, where it only adds the discarded
        rows.

    Attributes
    ----------
    max_model_len : int
        Context length: prompt + output tokens of a request must fit.
    num_kv_blocks : int
        KV pool size in blocks of ``block_size`` tokens.
    last_stats : dict
        The scheduler's statistics of the last finished job (steps, prefill_tokens, decode_tokens,
        peak_kv_blocks, preemptions, ...) plus ``max_step_tokens``, the largest step's token rows.

    Examples
    --------
    >>> llm = LLM(kv_cache_memory=1 << 22)                      # doctest: +SKIP
    >>> llm.generate("Hello", SamplingParams(temperature=0))[0].outputs[0].token_ids  # doctest: +SKIP
    """

    def __init__(self, model: Optional[str] = None, dtype="auto", device="auto", block_size: int = 16,
                 kv_cache_memory: Optional[int] = None, policy: str = "batchllm", seed: int = 0,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 1024,
                 max_model_len: Optional[int] = None, cuda_graphs: Optional[bool] = None,
                 overlap: Optional[bool] = None):
        from .model_runner import ModelRunner

        _check_positive_int("block_size", block_size)
        _check_positive_int("max_num_batched_tokens", max_num_batched_tokens)
        _check_positive_int("max_num_seqs", max_num_seqs)
        if policy not in ("batchllm", "fcfs-lru", "no-share"):
            raise ValueError(f"policy must be 'batchllm', 'fcfs-lru' or 'no-share', got {policy!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.device = pick_device(model, dtype, device)
        self.model, self.config, self.tokenizer, self.eos_token_ids, self.dtype = load(model, dtype, self.device)
        self.max_model_len = int(self.config.max_position_embeddings)
        if max_model_len is not None:
            _check_positive_int("max_model_len", max_model_len)
            self.max_model_len = min(self.max_model_len, int(max_model_len))
        self.block_size = int(block_size)
        self.policy = policy
        self.max_num_batched_tokens = int(max_num_batched_tokens)
        self.max_num_seqs = int(max_num_seqs)
        bytes_per_block = ModelRunner.kv_bytes_per_block(self.config, self.block_size, self.dtype)
        on_cuda = self.device.type == "cuda"
        self._graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs)
        self.num_kv_blocks = self._num_kv_blocks(kv_cache_memory, bytes_per_block)
        self.runner = self._new_runner(self._graphs)
        self.overlap = on_cuda if overlap is None else bool(overlap)
        self.sampler = Sampler(self.config.vocab_size, self.device)
        self._seed_stream = np.random.default_rng(int(seed))
        self.last_stats: dict = {}
        self._kv_blocks_used: Optional[int] = None  # of the running job, after its last step

    # ------------------------------------------------------------------ public API
    def kv_cache_usage(self) -> Optional[float]:
        """Fraction of the KV pool that the running job holds (after its last step), or None when no
        job runs. Safe to call from another thread (a progress reporter)."""
        used = self._kv_blocks_used
        return None if used is None else used / self.num_kv_blocks

    def get_tokenizer(self):
        """The tokenizer (``batchllm_core.tokenizer``): encode/decode, eos ids, chat template."""
        return self.tokenizer

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]], sampling_params: ParamsType = None,
                 use_tqdm: bool = True) -> List[RequestOutput]:
        """Generate completions for every prompt; outputs in input order.

        Parameters
        ----------
        prompts : str, dict, or a list of those
            Text, or ``{"prompt_token_ids": [...]}`` (optionally with "prompt": its text).
        sampling_params : SamplingParams or list of SamplingParams or None
            One for all prompts or one per prompt; None: ``SamplingParams()``.
        use_tqdm : bool
            Show a progress bar (requests done, output tokens/s).
        """
        outputs: List[Optional[RequestOutput]] = [None] * len(_as_prompt_list(prompts))
        for index, output in self.generate_stream(prompts, sampling_params, use_tqdm=use_tqdm):
            outputs[index] = output
        missing = [i for i, output in enumerate(outputs) if output is None]
        if missing:  # the scheduler ended without finishing or failing them: an engine bug
            raise RuntimeError(f"generate: no output for requests {missing[:10]} (of {len(missing)})")
        return outputs  # type: ignore[return-value]

    def chat(self, conversations, sampling_params: ParamsType = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> List[RequestOutput]:
        """Generate replies to conversations (a list of {"role", "content"} messages, or a list of them)
        rendered with the model's chat template."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template and this model has none")
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = []
        for messages in conversations:
            text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt)
            # The template already writes BOS and the other special tokens.
            prompts.append({"prompt": text,
                            "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def generate_stream(self, prompts: Union[PromptType, Sequence[PromptType]],
                        sampling_params: ParamsType = None,
                        use_tqdm: bool = False) -> Iterator[Tuple[int, RequestOutput]]:
        """Like :meth:`generate`, but yields ``(input index, output)`` as each request completes."""
        job = self._new_job(prompts, sampling_params)
        with _Progress(len(job.requests), use_tqdm) as progress:
            for item in job.initial_failures():
                progress.request_done(job.num_output_tokens)
                yield item
            if len(job.input_index) == 0:
                return
            scheduler = self._new_scheduler()
            scheduler.add_requests(**job.scheduler_arrays())
            graphs = getattr(self.runner, "decode_graphs", None)
            if graphs is not None:  # decode rows grow by up to this many blocks of output in this job
                graphs.suffix_headroom_blocks = -(-job.max_output_tokens // self.block_size)
            try:
                yield from self._collect(scheduler, job, progress)
                yield from self._run_steps(scheduler, job, progress)
                # The last next_step() may itself have failed requests (one that cannot fit even alone).
                yield from self._collect(scheduler, job, progress)
            finally:
                self._kv_blocks_used = None
            self.last_stats = dict(scheduler.stats())
            self.last_stats["max_step_tokens"] = int(max(scheduler.step_token_counts(), default=0))

    def _run_steps(self, scheduler, job: Job, progress: "_Progress") -> Iterator[Tuple[int, RequestOutput]]:
        """schedule -> run -> commit until the scheduler has nothing left.

        With ``overlap``, step i+1 is scheduled and queued (its pending input ids fed from step i's
        samples on the device) before the host waits for step i's samples and commits them; rows of
        sequences that step i stopped are discarded at step i+1's commit.
        """
        in_flight = None  # (rows, PendingSample) of the step queued and not committed
        while True:
            plan = scheduler.next_step(overlap=in_flight is not None)          # schedule
            launched = None if plan is None else self._launch(plan, job, in_flight)   # run (queued)
            if in_flight is not None:
                yield from self._commit(scheduler, job, progress, *in_flight)  # commit the step before
            elif plan is None:
                return
            in_flight = launched
            if not self.overlap and in_flight is not None:
                yield from self._commit(scheduler, job, progress, *in_flight)  # commit this step
                in_flight = None

    def _launch(self, plan, job: Job, in_flight):
        from .model_runner import TokenFeed

        rows = job.step_rows(plan)
        feed = None if in_flight is None else TokenFeed.for_plan(plan, in_flight[0].seq_ids, in_flight[1].token_ids)
        # A runner that never overlaps needs no feed argument (the runner contract is execute(plan)).
        logits = self.runner.execute(plan) if feed is None else self.runner.execute(plan, feed)
        return rows, self.sampler.sample_async(logits, job.table, rows.requests, rows.sample_indices,
                                               rows.output_lens)

    def _commit(self, scheduler, job: Job, progress: "_Progress", rows, pending) -> Iterator[Tuple[int, RequestOutput]]:
        sampled = pending.result()
        scheduler.commit(sampled.token_ids)
        discarded = scheduler.last_discarded_rows()
        if len(discarded):
            keep = np.ones(len(rows), bool)
            keep[discarded] = False
            rows, sampled = rows.subset(keep), sampled.subset(keep)
        for seq_id in job.record(rows, sampled):
            scheduler.finish_sequence(seq_id, "stop")
        self._kv_blocks_used = self.num_kv_blocks - scheduler.num_free_blocks
        yield from self._collect(scheduler, job, progress)

    # ------------------------------------------------------------------ job setup
    def _new_job(self, prompts, sampling_params) -> Job:
        prompt_list = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompt_list))
        texts, token_ids = self._tokenize(prompt_list)
        requests = [self._prepare(text, ids, p) for text, ids, p in zip(texts, token_ids, params)]
        # Unseeded requests take seeds from the LLM's stream: a whole job is reproducible from LLM(seed).
        seeds = [p.seed if p.seed is not None else int(self._seed_stream.integers(0, 2**63 - 1))
                 for p in params]
        return Job(requests, self.tokenizer, self.eos_token_ids, seeds, self.device)

    def _tokenize(self, prompts: List[PromptType]) -> Tuple[List[Optional[str]], list]:
        """Prompt texts and token ids (int64 arrays; for a dict prompt whose ids are not a flat list
        of integers, the raw value, which fails that request alone); text prompts are encoded in one
        batch."""
        texts = [p if isinstance(p, str) else p.get("prompt") for p in prompts]
        token_ids = [None if isinstance(p, str) else _token_array(p["prompt_token_ids"]) for p in prompts]
        to_encode = [i for i, p in enumerate(prompts) if isinstance(p, str)]
        if to_encode:
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: give prompts as {'prompt_token_ids': [...]}")
            for i, ids in zip(to_encode, self.tokenizer.encode_batch([prompts[i] for i in to_encode])):
                token_ids[i] = np.asarray(ids, dtype=np.int64)
        return texts, token_ids

    def _prepare(self, text: Optional[str], token_ids, params: SamplingParams) -> PreparedRequest:
        if not isinstance(token_ids, np.ndarray):
            return PreparedRequest(text, list(token_ids), params,
                                   error="prompt_token_ids must be a flat list of integers")
        request = PreparedRequest(text, token_ids, params)
        request.error = self._check_request(token_ids, params)
        if request.error is None:
            request.max_tokens = params.max_tokens or (self.max_model_len - len(token_ids))
        return request

    def _check_request(self, token_ids: np.ndarray, params: SamplingParams) -> Optional[str]:
        """Why the request cannot run, or None. These fail alone; the rest of the job runs."""
        prompt_len = len(token_ids)
        if params.stop and self.tokenizer is None:
            return "stop strings need a tokenizer and this model has none (use stop_token_ids)"
        if prompt_len == 0:
            return "the prompt is empty"
        vocab = self.config.vocab_size
        low, high = int(token_ids.min()), int(token_ids.max())
        if low < 0 or high >= vocab:
            return f"prompt token ids must be in [0, {vocab}), got {low}..{high}"
        max_tokens = params.max_tokens if params.max_tokens is not None else 1
        if prompt_len + max_tokens > self.max_model_len:
            return (f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
                    f"length ({self.max_model_len} tokens)")
        # max_tokens=None may stop at EOS long before the context is full: only its prompt (and first
        # token) must fit now; the scheduler fails it later if it outgrows the whole cache.
        total = prompt_len + max_tokens
        blocks = -(-total // self.block_size)
        if blocks > self.num_kv_blocks:
            return (f"prompt + max_tokens ({total} tokens, {blocks} KV blocks) exceeds the KV cache capacity "
                    f"({self.num_kv_blocks} blocks of {self.block_size} tokens); raise kv_cache_memory")
        return None

    def _new_scheduler(self):
        # The scheduler rounds its budget to whole tiles but never below one tile: a budget under the
        # default tile gets a tile of its own size, so a step never exceeds max_num_batched_tokens
        # (the KV pool was sized for that step's activations).
        return _C.Scheduler(num_blocks=self.num_kv_blocks, block_size=self.block_size,
                            token_budget=self.max_num_batched_tokens, policy=self.policy,
                            max_num_seqs=self.max_num_seqs,
                            tile_tokens=min(_TILE_TOKENS, self.max_num_batched_tokens))

    def _collect(self, scheduler, job: Job, progress: "_Progress") -> Iterator[Tuple[int, RequestOutput]]:
        for request, message in scheduler.pop_failed():
            progress.request_done(job.num_output_tokens)
            yield job.fail(int(request), str(message))
        for request, sample, token_ids, reason in scheduler.pop_finished():
            done = job.finish(int(request), int(sample), token_ids, str(reason))
            if done is not None:
                progress.request_done(job.num_output_tokens)
                yield done

    def _new_runner(self, cuda_graphs: bool):
        from .model_runner import ModelRunner

        if cuda_graphs and self.device.type != "cuda":
            warnings.warn("LLM(cuda_graphs=True) needs a CUDA device; running eagerly on the CPU",
                          UserWarning, stacklevel=3)
            cuda_graphs = False
        if not cuda_graphs:
            return ModelRunner(self.model, self.config, self.num_kv_blocks, self.block_size, self.device, self.dtype)
        from .cuda_graphs import GraphModelRunner

        return GraphModelRunner(self.model, self.config, self.num_kv_blocks, self.block_size, self.device,
                                self.dtype, graph_max_rows=self.max_num_seqs,
                                mixed_max_tokens=max(self.max_num_batched_tokens, self.max_num_seqs))

    def _default_kv_bytes(self) -> int:
        if self.device.type != "cuda":
            return default_cpu_kv_bytes()
        from .kv_sizing import kv_cache_bytes_from_profile

        # What the device has left after the weights and the activations of a worst-case step.
        return kv_cache_bytes_from_profile(self.model, self.config, self.block_size, self.dtype, self.device,
                                           self.max_num_batched_tokens, self.max_num_seqs, graphs=self._graphs)

    def _num_kv_blocks(self, kv_cache_memory: Optional[int], bytes_per_block: int) -> int:
        if kv_cache_memory is None:
            kv_cache_memory = self._default_kv_bytes()
        elif isinstance(kv_cache_memory, bool) or not isinstance(kv_cache_memory, (int, np.integer)) \
                or kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {kv_cache_memory!r}")
        num_blocks = int(kv_cache_memory) // bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory ({kv_cache_memory} bytes) holds no KV block "
                             f"({bytes_per_block} bytes each); on CUDA, the weights and a full step "
                             "may leave no room: lower max_num_batched_tokens or use a smaller model")
        # More blocks than every sequence at full context length could use only waste memory.
        return min(num_blocks, self.max_num_seqs * -(-self.max_model_len // self.block_size))


# ---------------------------------------------------------------------- helpers
class _Progress:
    """tqdm bar of requests done with the output token rate; a no-op when disabled."""

    def __init__(self, total: int, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
        self._start = time.perf_counter()

    def request_done(self, output_tokens: int) -> None:
        if self._bar is not None:
            rate = output_tokens / max(time.perf_counter() - self._start, 1e-9)
            self._bar.set_postfix_str(f"output: {rate:.1f} toks/s", refresh=False)
            self._bar.update(1)

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()


def _as_prompt_list(prompts) -> List[PromptType]:
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a str, a dict with 'prompt_token_ids', or a list of those, "
                         f"got {type(prompts).__name__}")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, dict):
            ids = prompt.get("prompt_token_ids")
            if not isinstance(ids, (list, tuple, np.ndarray)):
                raise ValueError(f"prompts[{i}]: a dict prompt needs 'prompt_token_ids' (a list of ints)")
        elif not isinstance(prompt, str):
            raise ValueError(f"prompts[{i}] must be a str or a dict, got {type(prompt).__name__}")
    return list(prompts)


def _token_array(ids):
    """``ids`` as an int64 array when it is a flat sequence of integers, else ``ids`` unchanged."""
    try:
        array = np.asarray(ids)
    except (ValueError, TypeError):  # ragged nesting
        return ids
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        return ids
    return array.astype(np.int64, copy=False)


def _as_params_list(sampling_params: ParamsType, count: int) -> List[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * count
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    params = list(sampling_params)
    if len(params) != count:
        raise ValueError(f"sampling_params: got {len(params)} for {count} prompts (give one, or one per prompt)")
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise ValueError(f"sampling_params[{i}] must be a SamplingParams, got {type(p).__name__}")
    return params


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
