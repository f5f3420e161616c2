"""Test harness for the native scheduler: runs a job with deterministic "sampled" tokens and checks
every StepPlan against a simulated KV cache.

The simulated cache stores, per slot, a chained hash of the token prefix whose K/V the slot would
hold: a row at position p writes H(content at p-1, token). A row reads position p-1 through its own
block table (or the previous row of its chunk), so a wrong block table, a missed copy-on-write, a
prefix freed too early or a cached block reused wrongly all show up as a content mismatch. At the
last row of a sequence chunk every position of its context is compared with the true prefix hash.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MOD = (1 << 61) - 1
EMPTY = -1


def chain(prev: int, token: int) -> int:
    return (prev * 1_000_003 + token + 1) % MOD


def sampled_token(request: int, sample: int, k: int) -> int:
    """The token the fake sampler draws for output k of (request, sample): deterministic, >= 10."""
    return 10 + (request * 131 + sample * 31 + k * 7) % 500


@dataclass
class Job:
    prompts: list
    max_tokens: list
    num_samples: list
    min_tokens: list = None
    ignore_eos: list = None
    stop_token_ids: list = None
    eos_token_ids: list = field(default_factory=lambda: [2])

    def arrays(self) -> dict:
        n = len(self.prompts)
        stops = self.stop_token_ids or [[] for _ in range(n)]
        return dict(
            tokens=np.array([t for p in self.prompts for t in p], np.int32),
            offsets=np.concatenate([[0], np.cumsum([len(p) for p in self.prompts])]).astype(np.int64),
            max_tokens=np.array(self.max_tokens, np.int32),
            num_samples=np.array(self.num_samples, np.int32),
            min_tokens=np.array(self.min_tokens or [0] * n, np.int32),
            ignore_eos=np.array(self.ignore_eos if self.ignore_eos is not None else [True] * n, bool),
            stop_token_ids=np.array([t for s in stops for t in s], np.int32),
            stop_token_offsets=np.concatenate([[0], np.cumsum([len(s) for s in stops])]).astype(np.int64),
            eos_token_ids=list(self.eos_token_ids),
        )


class PlanChecker:
    """Checks each plan of one scheduler run against the simulated KV cache."""

    def __init__(self, job: Job, num_blocks: int, block_size: int, token_fn=sampled_token):
        self.job = job
        self.bs = block_size
        self.cache = np.full(num_blocks * block_size, EMPTY, dtype=np.int64)
        self.outputs: dict = {}  # (request, sample) -> generated tokens so far
        self.seq_key: dict = {}  # seq id -> (request, sample)
        self.token_fn = token_fn
        self.truth: dict = {}

    def true_hashes(self, request: int, sample: int) -> list:
        """Prefix hashes of the (request, sample) tokens so far (prompt + outputs), kept incrementally."""
        key = (request, sample)
        hashes = self.truth.get(key)
        if hashes is None:
            hashes, h = [], 0
            for t in self.job.prompts[request]:
                h = chain(h, int(t))
                hashes.append(h)
            self.truth[key] = hashes
        out = self.outputs.get(key, [])
        while len(hashes) < len(self.job.prompts[request]) + len(out):
            hashes.append(chain(hashes[-1], out[len(hashes) - len(self.job.prompts[request])]))
        return hashes

    def slot(self, table: np.ndarray, pos: int) -> int:
        block = int(table[pos // self.bs])
        assert block >= 0, f"position {pos} has no block"
        return block * self.bs + pos % self.bs

    def check(self, plan, overlap: bool = False) -> np.ndarray:
        """Validates `plan`, applies it to the simulated cache, returns the sampled tokens.

        overlap: the plan was made before the previous one was committed; its decode rows may carry
        -1 (the previous sample, fed on the device): the checker substitutes that sample."""
        bs = self.bs
        T = plan.num_tokens
        input_ids, positions, slots = plan.input_ids, plan.positions, plan.slot_mapping
        qs, ctx, tables, seq_ids = plan.query_start, plan.context_lens, plan.block_tables, plan.seq_ids
        S = len(seq_ids)
        assert len(input_ids) == len(positions) == len(slots) == T > 0
        assert qs[0] == 0 and qs[-1] == T and np.all(np.diff(qs) > 0)
        assert list(plan.nano_batch_offsets) == [0, T]
        assert tables.shape == (S, plan.max_blocks)
        for src, dst in zip(plan.cow_src, plan.cow_dst):
            self.cache[dst * bs:(dst + 1) * bs] = self.cache[src * bs:(src + 1) * bs]
        for s in range(S):
            lo, hi = int(qs[s]), int(qs[s + 1])
            q_len = hi - lo
            if s < plan.num_decode_seqs:
                assert q_len == 1 and seq_ids[s] >= 0
            table = tables[s]
            n_ctx = int(ctx[s])
            assert np.all(table[: -(-n_ctx // bs)] >= 0) and np.all(table[-(-n_ctx // bs):] == -1)
            for j in range(q_len):
                row = lo + j
                pos = int(positions[row])
                assert pos == n_ctx - q_len + j
                assert int(slots[row]) == self.slot(table, pos)
                prev = 0 if pos == 0 else int(self.cache[self.slot(table, pos - 1)])
                assert prev != EMPTY, f"seq {seq_ids[s]} reads unwritten position {pos - 1}"
                token = int(input_ids[row])
                if token < 0:  # pending: the sequence's last sample, not committed when planned
                    assert overlap and s < plan.num_decode_seqs, f"row {row}: input -1 outside an overlapped decode"
                    token = self.outputs[self.seq_key[int(seq_ids[s])]][-1]
                self.cache[slots[row]] = chain(prev, token)
            if seq_ids[s] >= 0:
                key = self.seq_key.get(int(seq_ids[s]))
                if key is not None:
                    truth = np.array(self.true_hashes(*key)[:n_ctx], np.int64)
                    pos = np.arange(n_ctx)
                    got = self.cache[table[pos // bs].astype(np.int64) * bs + pos % bs]
                    assert len(truth) == n_ctx and np.array_equal(got, truth), \
                        f"seq {seq_ids[s]} {key}: KV content differs from its tokens"
        self.check_levels(plan)
        sampled = []
        for i in range(plan.num_sample_rows):
            seq, req, smp = int(plan.sample_seq_ids[i]), int(plan.sample_requests[i]), int(plan.sample_indices[i])
            assert self.seq_key.setdefault(seq, (req, smp)) == (req, smp)
            out = self.outputs.setdefault((req, smp), [])
            assert int(plan.sample_output_lens[i]) == len(out)
            row = int(plan.sample_rows[i])
            s = int(np.searchsorted(qs, row, side="right") - 1)
            assert row == qs[s + 1] - 1, "a sample row is the last row of its sequence"
            if seq_ids[s] == seq:  # the sequence's own row: its context is its whole token list
                assert int(ctx[s]) == len(self.job.prompts[req]) + len(out)
            else:  # n > 1: a sample drawing from its leader's prompt row
                assert int(ctx[s]) == len(self.job.prompts[req]) and len(out) == 0
            sampled.append(self.token_fn(req, smp, len(out)))
        for i, tok in enumerate(sampled):
            key = (int(plan.sample_requests[i]), int(plan.sample_indices[i]))
            self.outputs[key].append(tok)
        return np.array(sampled, np.int32)

    def check_levels(self, plan) -> None:
        B = plan.num_decode_seqs
        indptr, kv_blocks, kv_lens = plan.prefix_kv_indptr, plan.prefix_kv_blocks, plan.prefix_kv_lens
        ranges = plan.prefix_q_range
        assert len(indptr) == len(kv_lens) + 1 and ranges.shape == (len(kv_lens), 2)
        assert plan.suffix_block_tables.shape == (B, plan.max_suffix_blocks)
        for i in range(B):
            blocks, n = [], 0
            for p in range(len(kv_lens)):
                if ranges[p, 0] <= i < ranges[p, 1]:
                    blocks += list(kv_blocks[indptr[p]:indptr[p + 1]])
                    assert kv_lens[p] % self.bs == 0 and len(kv_blocks[indptr[p]:indptr[p + 1]]) * self.bs == kv_lens[p]
                    n += int(kv_lens[p])
            suffix_len = int(plan.suffix_kv_lens[i])
            suffix = plan.suffix_block_tables[i]
            blocks += list(suffix[: -(-suffix_len // self.bs)])
            assert np.all(suffix[-(-suffix_len // self.bs):] == -1)
            assert n + suffix_len == plan.context_lens[i]
            table = plan.block_tables[i]
            assert blocks == list(table[: len(blocks)]) and len(blocks) == -(-int(plan.context_lens[i]) // self.bs)


def run_job(sched, job: Job, num_blocks: int, block_size: int, max_steps: int = 100_000, token_fn=sampled_token,
            overlap: bool = False):
    """Runs `job` to the end, checking every plan and integrity after every step and commit.
    Returns (finished {(request, sample): (tokens, reason)}, failed {request: message}, checker).

    overlap: plan step i+1 before committing step i (``next_step(overlap=True)``), as the engine's
    overlapped loop does."""
    sched.add_requests(**job.arrays())
    checker = PlanChecker(job, num_blocks, block_size, token_fn)
    finished, failed = {}, {}

    def collect():
        for req, smp, toks, reason in sched.pop_finished():
            assert (req, smp) not in finished, f"request {req} sample {smp} finished twice"
            finished[(req, smp)] = (list(toks), reason)
        for req, msg in sched.pop_failed():
            assert req not in failed, f"request {req} failed twice"
            failed[req] = msg

    collect()
    pending = None
    for _ in range(max_steps):
        plan = sched.next_step(overlap=overlap and pending is not None)
        sampled = None
        if plan is not None:
            assert sched.check_integrity() == ""
            sampled = checker.check(plan, overlap)
        if pending is not None:
            sched.commit(pending)
            assert sched.check_integrity() == ""
            collect()
        elif plan is None:
            break
        if not overlap:
            sched.commit(sampled)
            assert sched.check_integrity() == ""
            collect()
        else:
            pending = sampled
    else:
        raise AssertionError("job did not finish")
    collect()
    assert sched.done
    assert sched.num_free_blocks == num_blocks, "blocks left allocated at the end"
    return finished, failed, checker
