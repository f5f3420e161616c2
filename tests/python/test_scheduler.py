"""Property and behaviour tests of the native scheduler (batchllm_core._C.Scheduler).

Every run goes through test_scheduler_harness.run_job, which checks each StepPlan against a
simulated KV cache, integrity after every step and commit, and that every block is free at the end.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchllm_core import _C
from test_scheduler_harness import Job, run_job, sampled_token

POLICIES = ["batchllm", "fcfs-lru", "no-share"]


def blocks_for(tokens: int, bs: int) -> int:
    return -(-tokens // bs)


@st.composite
def jobs(draw):
    """Random jobs: groups with a shared prefix (sometimes nested), duplicates, n > 1, tiny suffixes."""
    rng_tokens = st.integers(10, 60)  # a small vocabulary makes accidental sharing happen too
    prompts, max_tokens, num_samples = [], [], []
    for _ in range(draw(st.integers(1, 4))):
        prefix = draw(st.lists(rng_tokens, min_size=0, max_size=48))
        subs = [draw(st.lists(rng_tokens, min_size=0, max_size=24)) for _ in range(draw(st.integers(1, 2)))]
        for _ in range(draw(st.integers(1, 5))):
            sub = subs[draw(st.integers(0, len(subs) - 1))]
            suffix = draw(st.lists(rng_tokens, min_size=0 if prefix or sub else 1, max_size=12))
            prompts.append(prefix + sub + suffix)
            max_tokens.append(draw(st.integers(1, 12)))
            num_samples.append(draw(st.sampled_from([1, 1, 2, 3])))
    if draw(st.booleans()) and prompts:
        i = draw(st.integers(0, len(prompts) - 1))
        prompts.append(list(prompts[i]))  # an exact duplicate prompt
        max_tokens.append(draw(st.integers(1, 12)))
        num_samples.append(1)
    order = draw(st.permutations(range(len(prompts))))
    return Job([prompts[i] for i in order], [max_tokens[i] for i in order], [num_samples[i] for i in order])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(job=jobs(), policy=st.sampled_from(POLICIES), block_size=st.sampled_from([2, 4, 16]),
       capacity=st.floats(0.0, 1.0), budget=st.sampled_from([8, 16, 48, 256]), data=st.data())
def test_random_jobs_complete_exactly_once(job, policy, block_size, capacity, budget, data):
    """Each request finishes exactly once with exactly max_tokens (ignore_eos), or fails exactly when one
    of its sequences cannot fit in the whole cache alone; integrity and KV contents hold every step."""
    need = [blocks_for(len(p) + m - 1, block_size) for p, m in zip(job.prompts, job.max_tokens)]
    footprint = sum(n * s for n, s in zip(need, job.num_samples))
    smallest = min(need)
    # From barely the smallest sequence up to the whole no-sharing footprint.
    num_blocks = max(1, int(smallest + capacity * (footprint - smallest)))
    if data.draw(st.booleans()):
        num_blocks = max(need)  # barely one (the largest) sequence
    sched = _C.Scheduler(num_blocks=num_blocks, block_size=block_size, token_budget=budget, policy=policy,
                         tile_tokens=8, max_num_seqs=data.draw(st.sampled_from([2, 64])),
                         admission_horizon=data.draw(st.sampled_from([0, 2, 128])))
    finished, failed, _ = run_job(sched, job, num_blocks, block_size, overlap=data.draw(st.booleans()))
    for r, prompt in enumerate(job.prompts):
        impossible = blocks_for(len(prompt) + job.max_tokens[r] - 1, block_size) > num_blocks
        if impossible:
            assert r in failed and "KV blocks" in failed[r]
            continue
        assert r not in failed, failed.get(r)
        for s in range(job.num_samples[r]):
            tokens, reason = finished[(r, s)]
            assert reason == "length"
            assert tokens == [sampled_token(r, s, k) for k in range(job.max_tokens[r])]
    assert len(finished) == sum(job.num_samples[r] for r in range(len(job.prompts)) if r not in failed)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(job=jobs(), policy=st.sampled_from(POLICIES), block_size=st.sampled_from([2, 4, 16]),
       capacity=st.floats(0.0, 1.0), budget=st.sampled_from([8, 16, 48]), data=st.data())
def test_overlapped_steps_give_the_same_completions_as_serial_ones(job, policy, block_size, capacity, budget, data):
    """next_step(overlap=True) plans step i+1 before step i's samples are committed. With samples that
    stop sequences early (eos, stop ids, min_tokens), every completion and failure is the same as in
    the serial loop; rows of sequences that stopped meanwhile are discarded, never committed."""
    n = len(job.prompts)
    job.ignore_eos = [data.draw(st.booleans()) for _ in range(n)]
    job.min_tokens = [data.draw(st.integers(0, m)) for m in job.max_tokens]
    job.stop_token_ids = [data.draw(st.lists(st.integers(10, 20), max_size=2)) for _ in range(n)]
    salt = data.draw(st.integers(0, 1000))

    def token_fn(request, sample, k):  # eos (2) now and then, otherwise tokens 10..40 (some stop ids)
        h = (request * 7919 + sample * 104729 + k * 31 + salt) % 97
        return 2 if h < 9 else 10 + h % 31

    need = [blocks_for(len(p) + m - 1, block_size) for p, m in zip(job.prompts, job.max_tokens)]
    footprint = sum(k * s for k, s in zip(need, job.num_samples))
    num_blocks = max(1, int(min(need) + capacity * (footprint - min(need))))
    horizon = data.draw(st.sampled_from([0, 2, 128]))
    runs = []
    for overlap in (False, True):
        sched = _C.Scheduler(num_blocks=num_blocks, block_size=block_size, token_budget=budget, policy=policy,
                             tile_tokens=8, max_num_seqs=8, admission_horizon=horizon)
        finished, failed, _ = run_job(sched, job, num_blocks, block_size, token_fn=token_fn, overlap=overlap)
        runs.append((finished, set(failed), sched.stats()))
    assert runs[1][0] == runs[0][0] and runs[1][1] == runs[0][1]
    assert runs[0][2]["discarded_rows"] == 0


def test_overlap_discards_the_row_of_a_sequence_its_last_sample_stopped():
    job = Job([[10, 11, 12], [10, 11, 13]], [8, 8], [1, 1], ignore_eos=[False, False], eos_token_ids=[2])
    sched = _C.Scheduler(num_blocks=16, block_size=4, token_budget=16, tile_tokens=4)
    sched.add_requests(**job.arrays())
    plan = sched.next_step()
    assert list(plan.sample_seq_ids) == [0, 1]
    first = np.array([40, 41], np.int32)
    with pytest.raises(ValueError, match="commit"):
        sched.next_step()  # serial: the step must be committed first
    plan = sched.next_step(overlap=True)
    assert list(plan.input_ids) == [-1, -1]  # both wait for their first sample, fed on the device
    with pytest.raises(ValueError, match="uncommitted sample"):
        sched.finish_sequence(0, "stop")
    with pytest.raises(ValueError, match="two steps"):
        sched.next_step(overlap=True)
    sched.commit(first)
    assert len(sched.last_discarded_rows()) == 0
    sched.commit(np.array([2, 42], np.int32))  # sequence 0 stops on eos
    assert sched.pop_finished() == [(0, 0, [40, 2], "stop")]
    plan = sched.next_step(overlap=True)
    assert list(plan.sample_seq_ids) == [1]  # nothing was pending: a serial plan
    assert list(plan.input_ids) == [42]
    plan2 = sched.next_step(overlap=True)
    assert list(plan2.input_ids) == [-1]
    sched.commit(np.array([2], np.int32))  # sequence 1 stops: its row in plan2 is discarded
    sched.commit(np.array([43], np.int32))
    assert list(sched.last_discarded_rows()) == [0]
    assert sched.pop_finished() == [(1, 0, [41, 42, 2], "stop")]
    assert sched.next_step(overlap=True) is None and sched.done
    assert sched.stats()["discarded_rows"] == 1 and sched.num_free_blocks == 16


def fewshot_job(groups=3, per_group=6, prefix=40, suffix=5, out=6, n=1, seed=0):
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(groups):
        shared = rng.integers(10, 1000, prefix).tolist()
        prompts += [shared + rng.integers(10, 1000, suffix).tolist() for _ in range(per_group)]
    k = len(prompts)
    return Job(prompts, [out] * k, [n] * k)


def test_batchllm_computes_each_shared_prefix_once():
    job = fewshot_job(groups=3, per_group=6, prefix=64, suffix=5)
    sched = _C.Scheduler(num_blocks=400, block_size=16, token_budget=64, tile_tokens=16)
    run_job(sched, job, 400, 16)
    stats = sched.stats()
    assert stats["prefix_nodes"] == 3
    assert stats["prefill_tokens"] == 3 * 64 + 18 * 5 == stats["planned_prefill_tokens"]
    assert stats["decode_tokens"] == 18 * 5 and stats["preemptions"] == 0


def test_fcfs_lru_reuses_only_computed_blocks_and_no_share_reuses_nothing():
    job = fewshot_job(groups=2, per_group=4, prefix=64, suffix=5)
    total_prompt = sum(len(p) for p in job.prompts)
    stats = {}
    for policy in ["fcfs-lru", "no-share"]:
        sched = _C.Scheduler(num_blocks=400, block_size=16, token_budget=32, tile_tokens=16, policy=policy)
        run_job(sched, job, 400, 16)
        stats[policy] = sched.stats()
    assert stats["no-share"]["prefill_tokens"] == total_prompt
    assert stats["no-share"]["cached_prefix_tokens"] == 0
    lru = stats["fcfs-lru"]
    assert lru["cached_prefix_tokens"] > 0
    assert lru["prefill_tokens"] + lru["cached_prefix_tokens"] == total_prompt


def test_decode_levels_group_readers_of_nested_prefixes():
    rng = np.random.default_rng(1)
    system = rng.integers(10, 1000, 32).tolist()
    prompts = []
    for _ in range(2):
        shots = rng.integers(10, 1000, 32).tolist()
        prompts += [system + shots + rng.integers(10, 1000, 3).tolist() for _ in range(3)]
    job = Job(prompts, [4] * 6, [1] * 6)
    sched = _C.Scheduler(num_blocks=200, block_size=16, token_budget=512, tile_tokens=16)
    sched.add_requests(**job.arrays())
    plan = sched.next_step()  # all prefill
    sched.commit(np.full(plan.num_sample_rows, 11, np.int32))
    plan = sched.next_step()  # all decode
    assert plan.num_decode_seqs == 6 and plan.num_prefill_tokens == 0
    # one level for the system prompt read by all six rows, one per shot set read by three
    assert sorted(map(tuple, plan.prefix_q_range.tolist())) == [(0, 3), (0, 6), (3, 6)]
    assert sorted(plan.prefix_kv_lens.tolist()) == [32, 32, 32]
    assert plan.decode_kv_tokens_read < plan.decode_kv_tokens_unshared


def test_n_samples_share_the_prompt_and_copy_on_write_the_last_block():
    prompt = list(range(10, 10 + 40))  # 2.5 blocks of 16
    job = Job([prompt], [5], [4])
    sched = _C.Scheduler(num_blocks=64, block_size=16, token_budget=128, tile_tokens=16)
    sched.add_requests(**job.arrays())
    plan = sched.next_step()
    assert plan.num_tokens == 40 and plan.num_sample_rows == 4
    assert len(set(plan.sample_rows.tolist())) == 1 and sorted(plan.sample_indices.tolist()) == [0, 1, 2, 3]
    sched.commit(np.array([11, 12, 13, 14], np.int32))
    plan = sched.next_step()
    assert plan.num_decode_seqs == 4 and len(plan.cow_src) == 3  # three samples copy the shared tail
    assert plan.prefix_q_range.tolist() == [[0, 4]] and plan.prefix_kv_lens.tolist() == [32]
    sched.commit(np.full(4, 11, np.int32))
    assert sched.check_integrity() == ""
    assert sched.stats()["prefill_tokens"] == 40


def test_stop_tokens_min_tokens_and_eos():
    prompts = [[10, 11, 12], [10, 11, 13], [10, 11, 14]]
    job = Job(prompts, [10, 10, 10], [1, 1, 1], min_tokens=[0, 3, 0], ignore_eos=[False, False, True],
              stop_token_ids=[[99], [99], []], eos_token_ids=[2])
    # request 0 stops on 99 at output 1; request 1 ignores 99 until min_tokens 3; request 2 ignores eos
    script = {0: [50, 99], 1: [99, 99, 99, 7], 2: [2, 2, 2, 2, 2, 2, 2, 2, 2, 2]}

    def token_fn(request, sample, k):
        seq = script[request]
        return seq[k] if k < len(seq) else 33

    sched = _C.Scheduler(num_blocks=32, block_size=4, token_budget=16, tile_tokens=4)
    finished, failed, _ = run_job(sched, job, 32, 4, token_fn=token_fn)
    assert not failed
    assert finished[(0, 0)] == ([50, 99], "stop")
    assert finished[(1, 0)] == ([99, 99, 99], "stop")
    assert finished[(2, 0)] == ([2] * 10, "length")


def test_eos_stops_unless_ignored():
    job = Job([[10, 11]], [5], [1], ignore_eos=[False], eos_token_ids=[2])
    sched = _C.Scheduler(num_blocks=8, block_size=4, token_budget=8, tile_tokens=4)
    finished, _, _ = run_job(sched, job, 8, 4, token_fn=lambda r, s, k: 2 if k == 1 else 40)
    assert finished[(0, 0)] == ([40, 2], "stop")


def test_finish_sequence_frees_blocks_now():
    job = fewshot_job(groups=1, per_group=2, prefix=32, suffix=3, out=50)
    sched = _C.Scheduler(num_blocks=64, block_size=16, token_budget=128, tile_tokens=16)
    sched.add_requests(**job.arrays())
    plan = sched.next_step()
    seq = int(plan.sample_seq_ids[0])
    sched.commit(np.full(plan.num_sample_rows, 11, np.int32))
    with pytest.raises(ValueError, match="seq_id"):
        sched.finish_sequence(10_000, "stop")
    free_before = sched.num_free_blocks
    sched.finish_sequence(seq, "stop string")
    assert sched.check_integrity() == ""
    assert sched.num_free_blocks > free_before
    done = sched.pop_finished()
    assert len(done) == 1 and done[0][3] == "stop string" and done[0][2] == [11]


def test_prompt_larger_than_the_cache_fails_alone():
    job = Job([[10] * 10, list(range(10, 200)), [11] * 9], [4, 4, 4], [1, 2, 1])
    for policy in POLICIES:
        sched = _C.Scheduler(num_blocks=6, block_size=4, token_budget=32, tile_tokens=8, policy=policy)
        finished, failed, _ = run_job(sched, job, 6, 4)
        assert list(failed) == [1] and "needs" in failed[1] and "KV blocks" in failed[1]
        assert set(finished) == {(0, 0), (2, 0)}


def test_tight_memory_preempts_and_still_completes():
    job = fewshot_job(groups=4, per_group=8, prefix=32, suffix=8, out=24, seed=3)
    for policy in POLICIES:
        # one sequence needs (32 + 8 + 23) / 4 = 16 blocks: 24 blocks hold barely one and a half
        sched = _C.Scheduler(num_blocks=24, block_size=4, token_budget=64, tile_tokens=8, policy=policy)
        finished, failed, _ = run_job(sched, job, 24, 4)
        assert not failed and len(finished) == 32
        if policy != "batchllm":
            assert sched.stats()["preemptions"] > 0


def test_bad_arguments_raise_value_errors_naming_them():
    with pytest.raises(ValueError, match="policy"):
        _C.Scheduler(num_blocks=8, policy="lifo")
    with pytest.raises(ValueError, match="num_blocks"):
        _C.Scheduler(num_blocks=0)
    sched = _C.Scheduler(num_blocks=8, block_size=4)
    good = Job([[10, 11]], [2], [1]).arrays()
    with pytest.raises(ValueError, match="max_tokens"):
        sched.add_requests(**{**good, "max_tokens": np.array([0], np.int32)})
    with pytest.raises(ValueError, match="offsets"):
        sched.add_requests(**{**good, "offsets": np.array([0, 5], np.int64)})
    with pytest.raises(ValueError, match="tokens"):
        sched.add_requests(**{**good, "tokens": np.array([1.5, 2.5])})
    sched.add_requests(**good)
    with pytest.raises(ValueError, match="commit"):
        sched.commit(np.zeros(1, np.int32))
    plan = sched.next_step()
    with pytest.raises(ValueError, match="expected 1"):
        sched.commit(np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="commit"):
        sched.next_step()
    assert plan.num_sample_rows == 1
