"""ModelRunner over hand-built StepPlans: chunked multi-sequence prefill with a shared prefix, decodes
with and without shared-prefix levels (two nested levels), mixed steps and copy-on-write forks.
Logits of the sampled rows must match transformers' forward over the full sequences."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import batchllm_core
from batchllm_core import ops
from batchllm_core.loader import build_random_model, load
from batchllm_core.model_runner import ModelRunner, read_staging, staging_layout, write_staging
from batchllm_core.models import LlamaModel, ModelConfig
import cuda_emulation
from conftest import gpu
from model_fixtures import hf_checkpoint, hf_model

BLOCK_SIZE = 8
NUM_BLOCKS = 64


@dataclass
class Plan:
    """The StepPlan fields of docs/architecture.md (level fields None: no levels)."""

    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    seq_ids: np.ndarray
    query_start: np.ndarray
    context_lens: np.ndarray
    block_tables: np.ndarray
    num_decode_seqs: int
    sample_rows: np.ndarray
    cow_src: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    cow_dst: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    prefix_kv_indptr: np.ndarray | None = None
    prefix_kv_blocks: np.ndarray | None = None
    prefix_kv_lens: np.ndarray | None = None
    prefix_q_range: np.ndarray | None = None
    suffix_block_tables: np.ndarray | None = None
    suffix_kv_lens: np.ndarray | None = None


@dataclass
class Seq:
    tokens: list[int]      # the whole sequence this test will have run by the end
    blocks: list[int]      # KV blocks, shared ones first
    done: int = 0          # tokens whose KV is in the cache


class Harness:
    """Builds plans the way the scheduler would, and checks logits against transformers."""

    def __init__(self, name: str | None, use_cascade: bool = True, runner: ModelRunner | None = None):
        self.name = name  # the checkpoint whose transformers model is the reference
        if runner is None:
            loaded = load(hf_checkpoint(name), device="cpu")
            runner = ModelRunner(loaded.model, loaded.config, NUM_BLOCKS, BLOCK_SIZE, "cpu",
                                 torch.float32, use_cascade=use_cascade)
        self.runner = runner
        self.next_block = 0
        self.reference: dict[int, torch.Tensor] = {}

    def new_blocks(self, count: int) -> list[int]:
        self.next_block += count
        return list(range(self.next_block - count, self.next_block))

    def sequence(self, tokens: list[int], shared: Seq | None = None, shared_blocks: int = 0) -> Seq:
        """A sequence whose first ``shared_blocks`` blocks are ``shared``'s (already computed)."""
        blocks = (shared.blocks[:shared_blocks] if shared else [])
        blocks = blocks + self.new_blocks(-(-len(tokens) // BLOCK_SIZE) - len(blocks))
        return Seq(tokens, blocks, done=shared_blocks * BLOCK_SIZE)

    def step(self, work: list[tuple[Seq, int]], num_decode: int, levels: dict | None = None,
             sample: list[Seq] | None = None, cow: tuple[list[int], list[int]] | None = None) -> Plan:
        """A plan running ``count`` next tokens of each (seq, count), decodes first; samples the
        last row of every sequence in ``sample`` (default: all)."""
        ids, positions, slots, query_start, context_lens, tables, sample_rows = [], [], [], [0], [], [], []
        width = max(len(s.blocks) for s, _ in work)
        for seq, count in work:
            for pos in range(seq.done, seq.done + count):
                ids.append(seq.tokens[pos])
                positions.append(pos)
                slots.append(seq.blocks[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
            seq.done += count
            query_start.append(len(ids))
            context_lens.append(seq.done)
            tables.append(seq.blocks + [-1] * (width - len(seq.blocks)))
            if sample is None or any(seq is s for s in sample):
                sample_rows.append(len(ids) - 1)
        i32 = lambda x: np.asarray(x, dtype=np.int32)  # noqa: E731
        plan = Plan(i32(ids), i32(positions), np.asarray(slots, np.int64), np.arange(len(work)),
                    i32(query_start), i32(context_lens), i32(tables), num_decode, i32(sample_rows))
        if cow:
            plan.cow_src, plan.cow_dst = i32(cow[0]), i32(cow[1])
        for key, value in (levels or {}).items():
            setattr(plan, key, i32(value))
        return plan

    def check(self, plan: Plan, seqs: list[Seq]) -> None:
        """Run the plan; compare each sampled row with transformers at that token's position."""
        logits = self.runner.execute(plan)
        assert logits.dtype == torch.float32
        assert logits.shape == (len(plan.sample_rows), self.runner.config.vocab_size)
        sampled = [seq for seq, row in zip(seqs, range(len(seqs)))
                   if plan.query_start[row + 1] - 1 in set(plan.sample_rows.tolist())]
        for out_row, seq in zip(logits, sampled):
            expected = self.reference_logits(seq)[seq.done - 1]
            err = (out_row - expected).abs().max().item()
            assert err <= 1e-4 * expected.abs().max().item(), f"{self.name}: error {err}"

    def reference_logits(self, seq: Seq) -> torch.Tensor:
        key = id(seq)
        if key not in self.reference:
            with torch.no_grad():
                self.reference[key] = hf_model(self.name)(torch.tensor([seq.tokens])).logits[0]
        return self.reference[key]


def random_tokens(rng: np.random.Generator, count: int) -> list[int]:
    return rng.integers(4, 128, size=count).tolist()


def suffix_levels(seqs: list[Seq], prefixes: list[tuple[list[int], int, int]], depth: list[int]) -> dict:
    """Level arrays: prefixes (blocks, first row, end row); row r's suffix starts at block depth[r]."""
    indptr = np.cumsum([0] + [len(blocks) for blocks, _, _ in prefixes])
    width = max(len(s.blocks) - d for s, d in zip(seqs, depth))
    return dict(
        prefix_kv_indptr=indptr,
        prefix_kv_blocks=[b for blocks, _, _ in prefixes for b in blocks],
        prefix_kv_lens=[len(blocks) * BLOCK_SIZE for blocks, _, _ in prefixes],
        prefix_q_range=[[begin, end] for _, begin, end in prefixes],
        suffix_block_tables=[s.blocks[d:] + [-1] * (width - len(s.blocks) + d) for s, d in zip(seqs, depth)],
        suffix_kv_lens=[s.done + 1 - d * BLOCK_SIZE for s, d in zip(seqs, depth)])


@pytest.mark.parametrize("name", ["llama3", "qwen3", "mistral", "llama-tied-bias"])
@pytest.mark.parametrize("use_levels", [True, False], ids=["levels", "no-levels"])
def test_chunked_prefill_then_decodes_match_transformers(name, use_levels):
    rng = np.random.default_rng(7)
    h = Harness(name)
    shared = random_tokens(rng, 16)
    decodes = 3
    a = h.sequence(shared + random_tokens(rng, 5 + decodes))
    d = h.sequence(random_tokens(rng, 13 + decodes))
    # Step 1: A's first 16 tokens (the prefix every later sharer reads) and a chunk of D.
    h.check(h.step([(a, 16), (d, 6)], 0, sample=[]), [a, d])
    b = h.sequence(shared + random_tokens(rng, 11 + decodes), shared=a, shared_blocks=2)
    c = h.sequence(shared[:8] + random_tokens(rng, 10 + decodes), shared=a, shared_blocks=1)
    # Step 2: the rest of every prompt, B and C prefilled on top of A's prefix blocks.
    h.check(h.step([(a, 5), (b, 11), (c, 10), (d, 7)], 0), [a, b, c, d])
    e = h.sequence(random_tokens(rng, 9 + decodes - 1))
    for step in range(decodes):
        seqs = [a, b, c, d] + ([e] if step > 0 else [])
        levels = None
        if use_levels:  # level 0: block 0 read by A, B, C; level 1: block 1 read by A, B
            levels = suffix_levels(seqs, [(a.blocks[:1], 0, 3), (a.blocks[1:2], 0, 2)],
                                   [2, 2, 1, 0] + ([0] if step > 0 else []))
        work = [(s, 1) for s in seqs]
        if step == 0:  # a mixed step: decodes plus E's whole prompt as a prefill chunk
            work.append((e, 9))
        plan = h.step(work, num_decode=len(seqs), levels=levels)
        h.check(plan, [s for s, _ in work])


def test_copy_on_write_fork_for_parallel_samples():
    rng = np.random.default_rng(3)
    h = Harness("qwen2")
    prompt = random_tokens(rng, 12)  # block 0 full, block 1 partial
    first = h.sequence(prompt + random_tokens(rng, 1))
    h.check(h.step([(first, 12)], 0), [first])
    # The second sample shares block 0 and gets a copy of the partial block 1 before it writes.
    second = Seq(prompt + random_tokens(rng, 1), [first.blocks[0]] + h.new_blocks(1), done=12)
    levels = suffix_levels([first, second], [(first.blocks[:1], 0, 2)], [1, 1])
    plan = h.step([(first, 1), (second, 1)], 2, levels=levels, cow=([first.blocks[1]], [second.blocks[1]]))
    h.check(plan, [first, second])
    torch.testing.assert_close(h.runner.kv_cache[:, :, second.blocks[1], :4],
                               h.runner.kv_cache[:, :, first.blocks[1], :4], rtol=0, atol=0)


def test_repeated_sample_rows_and_prefix_only_steps():
    rng = np.random.default_rng(5)
    h = Harness("llama3")
    seq = h.sequence(random_tokens(rng, 10))
    plan = h.step([(seq, 10)], 0)
    plan.sample_rows = np.array([9, 9, 9], dtype=np.int32)  # n = 3 samples of one prompt
    logits = h.runner.execute(plan)
    assert logits.shape == (3, 128) and torch.equal(logits[0], logits[2])
    empty = h.step([(h.sequence(random_tokens(rng, 8)), 8)], 0, sample=[])
    assert h.runner.execute(empty).shape == (0, 128)


def test_decode_levels_without_shared_prefixes():
    """No prefix at all (P = 0): every decode row reads only its own suffix."""
    rng = np.random.default_rng(4)
    h = Harness("mistral")
    seqs = [h.sequence(random_tokens(rng, n)) for n in (9, 17)]
    h.check(h.step([(s, len(s.tokens) - 1) for s in seqs], 0), seqs)
    levels = suffix_levels(seqs, [], [0, 0])
    levels["prefix_q_range"] = np.zeros((0, 2), dtype=np.int32)
    h.check(h.step([(s, 1) for s in seqs], 2, levels=levels), seqs)


def test_cascade_and_paged_decode_agree():
    outputs = []
    for use_cascade in (True, False):
        h = Harness("qwen3", use_cascade=use_cascade)
        a = h.sequence(random_tokens(np.random.default_rng(1), 20))
        b = h.sequence(a.tokens[:16] + [5, 6, 7, 8, 9], shared=a, shared_blocks=2)
        h.runner.execute(h.step([(a, 19), (b, 4)], 0))
        levels = suffix_levels([a, b], [(a.blocks[:2], 0, 2)], [2, 2])
        outputs.append(h.runner.execute(h.step([(a, 1), (b, 1)], 2, levels=levels)))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_flat_block_tables_are_accepted():
    rng = np.random.default_rng(2)
    h = Harness("llama3")
    seq = h.sequence(random_tokens(rng, 12))
    plan = h.step([(seq, 12)], 0)
    expected = h.runner.execute(plan)
    seq.done = 0
    plan = h.step([(seq, 12)], 0)
    plan.max_blocks = plan.block_tables.shape[1]
    plan.block_tables = plan.block_tables.reshape(-1)
    torch.testing.assert_close(h.runner.execute(plan), expected, rtol=0, atol=0)


def test_kv_cache_geometry_and_bytes():
    h = Harness("qwen3")
    config = h.runner.config
    assert h.runner.kv_cache.shape == (2, 2, NUM_BLOCKS, BLOCK_SIZE, 2, 32)
    assert h.runner.model.layers[1].attention.k_cache.data_ptr() == h.runner.kv_cache[1, 0].data_ptr()
    assert ModelRunner.kv_bytes_per_block(config, 16, torch.bfloat16) == 2 * 2 * 16 * 2 * 32 * 2


def test_staging_buffer_round_trips_every_array():
    """The packing the CUDA path uses for its single host-to-device copy, checked on the CPU."""
    arrays = {"ids": np.arange(7, dtype=np.int32), "slots": np.arange(3, dtype=np.int64) * 10**10,
              "table": np.arange(12, dtype=np.int32).reshape(3, 4)[:, 1:],  # not contiguous
              "empty": np.zeros((0, 2), dtype=np.int32), "after": np.array([5], dtype=np.int32)}
    offsets, total = staging_layout(arrays)
    assert all(offset % 16 == 0 for offset in offsets.values())
    buffer = torch.zeros(total, dtype=torch.uint8)
    write_staging(buffer, arrays, offsets)
    tensors = read_staging(buffer, arrays, offsets)
    for name, values in arrays.items():
        assert tensors[name].is_contiguous() and tensors[name].dtype == torch.from_numpy(values).dtype
        assert tensors[name].tolist() == values.tolist(), name


def test_unsupported_device_combinations_are_explained():
    tiny = ModelConfig.from_name("tiny")
    assert ModelRunner.unsupported_reason(tiny, torch.device("cpu"), torch.float32) is None
    assert "head dim 16" in ModelRunner.unsupported_reason(tiny, torch.device("cuda"), torch.bfloat16)
    if 64 in batchllm_core._C.cuda_kernel_head_dims():
        reason = ModelRunner.unsupported_reason(small_gpu_shape(), torch.device("cuda"), torch.float32)
        assert "bfloat16" in reason
        assert ModelRunner.unsupported_reason(small_gpu_shape(), torch.device("cuda"), torch.bfloat16) is None


def test_copy_blocks_validates_ids():
    h = Harness("llama3")
    h.runner.kv_cache[:, :, 3].fill_(1.5)
    h.runner.copy_blocks([3], [4])
    assert (h.runner.kv_cache[:, :, 4] == 1.5).all()
    with pytest.raises(ValueError, match="block id"):
        h.runner.copy_blocks([3], [NUM_BLOCKS])
    with pytest.raises(ValueError, match="one length"):
        h.runner.copy_blocks([1, 2], [3])


def test_inconsistent_plans_are_rejected():
    rng = np.random.default_rng(1)
    h = Harness("llama3")
    plan = h.step([(h.sequence(random_tokens(rng, 5)), 5)], 0)
    plan.positions = plan.positions[:-1]
    with pytest.raises(ValueError, match="positions"):
        h.runner.execute(plan)
    plan = h.step([(h.sequence(random_tokens(rng, 5)), 5)], 0)
    plan.sample_rows = np.array([5], dtype=np.int32)
    with pytest.raises(ValueError, match="sample_rows"):
        h.runner.execute(plan)


def scenario_logits(runner: ModelRunner) -> list[torch.Tensor]:
    """Prefill with a shared prefix, a mixed step, decodes with levels and a CoW fork; the logits
    of every step, on the CPU."""
    rng = np.random.default_rng(9)
    vocab = runner.config.vocab_size
    h = Harness(None, runner=runner)
    tokens = lambda n: rng.integers(4, vocab, size=n).tolist()  # noqa: E731
    a = h.sequence(tokens(40))
    b = h.sequence(a.tokens[:32] + tokens(10), shared=a, shared_blocks=4)
    out = [runner.execute(h.step([(a, 37)], 0))]
    out.append(runner.execute(h.step([(b, 7)], 0)))
    c = Seq(b.tokens[:39] + tokens(3), b.blocks[:4] + h.new_blocks(2), done=39)
    levels = suffix_levels([a, b, c], [(a.blocks[:4], 0, 3)], [4, 4, 4])
    out.append(runner.execute(h.step([(a, 1), (b, 1), (c, 1)], 3, levels=levels,
                                     cow=([b.blocks[4]], [c.blocks[4]]))))
    d = h.sequence(tokens(20))
    levels = suffix_levels([a, b, c], [(a.blocks[:4], 0, 3)], [4, 4, 4])
    out.append(runner.execute(h.step([(a, 1), (b, 1), (c, 1), (d, 20)], 3, levels=levels)))
    return [o.cpu() for o in out]


def small_gpu_shape() -> ModelConfig:
    """A shape the CUDA kernels are built for (head dim 64)."""
    return ModelConfig.from_name("llama-1b").replace(hidden_size=256, num_layers=2, num_heads=4,
                                                     num_kv_heads=2, head_dim=64,
                                                     intermediate_size=512, vocab_size=1000)


def float32_copy(model: LlamaModel) -> LlamaModel:
    reference = LlamaModel(model.config)
    reference.load_state_dict({k: v.float().cpu() for k, v in model.state_dict().items()})
    return reference.eval()


def assert_scenarios_close(ours: list[torch.Tensor], reference: list[torch.Tensor], rtol: float) -> None:
    for step, (o, r) in enumerate(zip(ours, reference)):
        assert o.shape == r.shape, step
        err = (o - r).abs().max().item()
        assert err <= rtol * r.abs().max().item(), f"step {step}: error {err}"


def test_layer_op_kernels_runner_matches_the_torch_formulas():
    # The layer-op kernel path (the staged forward: rope with the K/V store fused in, rms_norm with
    # the residual, silu_and_mul; the CPU references here) against the torch formulas, float32, on the
    # scenario's steps: a K/V row not stored, or stored before its rotation, changes later steps.
    config = small_gpu_shape()
    model = build_random_model(config, seed=0, dtype=torch.float32, device="cpu").model
    reference = scenario_logits(ModelRunner(model, config, NUM_BLOCKS, BLOCK_SIZE, "cpu", torch.float32))
    model.layer_ops = "kernels"
    ours = scenario_logits(ModelRunner(model, config, NUM_BLOCKS, BLOCK_SIZE, "cpu", torch.float32))
    model.layer_ops = "auto"
    assert_scenarios_close(ours, reference, rtol=1e-4)


def test_bfloat16_runner_matches_float32():
    config = small_gpu_shape()
    model = build_random_model(config, seed=0, dtype=torch.bfloat16, device="cpu").model
    ours = scenario_logits(ModelRunner(model, config, NUM_BLOCKS, BLOCK_SIZE, "cpu", torch.bfloat16))
    reference = scenario_logits(ModelRunner(float32_copy(model), config, NUM_BLOCKS, BLOCK_SIZE, "cpu",
                                            torch.float32))
    assert_scenarios_close(ours, reference, rtol=0.05)


@pytest.mark.skipif(cuda_emulation.module() is None, reason="no CUDA emulation module (BATCHLLM_CUDA_EMULATION_DIR)")
@pytest.mark.parametrize("kernels", [{"BATCHLLM_LAYER_OPS": "kernels"},
                                     {"BATCHLLM_ATTENTION_TILES": "mma128", "BATCHLLM_CASCADE_LAUNCH": "merge"},
                                     {"BATCHLLM_ATTENTION_TILES": "mma", "BATCHLLM_CASCADE_LAUNCH": "fused"},
                                     {"BATCHLLM_CASCADE_LAUNCH": "streams"},
                                     {"BATCHLLM_ATTENTION_TILES": "wgmma"},
                                     {"BATCHLLM_ATTENTION_TILES": "wgmma-pipe", "BATCHLLM_CASCADE_LAUNCH": "merge"},
                                     {"BATCHLLM_CASCADE_LAUNCH": "owned"}],
                         ids=["default", "mma128+merge", "mma+fused", "streams", "wgmma", "wgmma-pipe+merge", "owned"])
def test_runner_on_the_emulated_cuda_kernels_matches_float32(kernels, monkeypatch):
    # The CUDA runner's attention path without a GPU: every op call of the bf16 runner goes to the
    # CUDA kernels (store_kv, paged prefill, cascade decode) compiled for the CPU emulation, fed by
    # the runner's own plans, levels and hints; the default kernels (with the layer-op kernels, as a
    # CUDA model runs them: their tensors are CPU tensors here, so BATCHLLM_LAYER_OPS asks for them)
    # and the variants a GPU run may make the default.
    for name, value in kernels.items():
        monkeypatch.setenv(name, value)
    config = small_gpu_shape()
    model = build_random_model(config, seed=0, dtype=torch.bfloat16, device="cpu").model
    reference = scenario_logits(ModelRunner(float32_copy(model), config, NUM_BLOCKS, BLOCK_SIZE, "cpu",
                                            torch.float32))
    cuda_emulation.activate(monkeypatch)
    # The step sizes one kernel workspace that both layers share: one size query per step with
    # decode levels (2 of the scenario's 4 steps), not one per layer and step.
    queries = []
    monkeypatch.setattr(ops, "cascade_workspace_floats",
                        lambda *args, real=ops.cascade_workspace_floats, **kwargs: queries.append(1) or real(*args, **kwargs))
    launches = cuda_emulation.module().launch_count()
    ours = scenario_logits(ModelRunner(model, config, NUM_BLOCKS, BLOCK_SIZE, "cpu", torch.bfloat16))
    assert cuda_emulation.module().launch_count() > launches  # the kernels did run
    assert_scenarios_close(ours, reference, rtol=0.05)
    assert config.num_layers == 2 and len(queries) == 2


@gpu
def test_cuda_runner_matches_cpu_float32():
    config = small_gpu_shape()
    model = build_random_model(config, seed=0, dtype=torch.bfloat16, device="cuda").model
    ours = scenario_logits(ModelRunner(model, config, NUM_BLOCKS, BLOCK_SIZE, "cuda", torch.bfloat16))
    reference = scenario_logits(ModelRunner(float32_copy(model), config, NUM_BLOCKS, BLOCK_SIZE, "cpu",
                                            torch.float32))
    assert_scenarios_close(ours, reference, rtol=0.05)


class EmulatedGraphRun:
    """The graph runner's padded path (capture off) on the CUDA kernels compiled for the CPU
    emulation, beside the float32 eager runner: plans from ``harness``, run on both by ``check``;
    ``splits`` records the suffix split of every graph step (DecodeGraphs._suffix_split)."""

    def __init__(self, monkeypatch, seed: int):
        from batchllm_core.cuda_graphs import DecodeGraphs, GraphModelRunner

        self.config = small_gpu_shape()
        model = build_random_model(self.config, seed=0, dtype=torch.bfloat16, device="cpu").model
        blocks = 256
        self.reference = ModelRunner(float32_copy(model), self.config, blocks, BLOCK_SIZE, "cpu", torch.float32)
        cuda_emulation.activate(monkeypatch)
        self.graphs = GraphModelRunner(model, self.config, blocks, BLOCK_SIZE, "cpu", torch.bfloat16, capture=False)
        self.splits = []
        own_split = DecodeGraphs._suffix_split
        monkeypatch.setattr(DecodeGraphs, "_suffix_split",
                            lambda graphs, *args: self.splits.append(own_split(graphs, *args)) or self.splits[-1])
        self.rng = np.random.default_rng(seed)
        self.harness = Harness(None, runner=self.reference)

    def tokens(self, n: int) -> list[int]:
        return self.rng.integers(4, self.config.vocab_size, size=n).tolist()

    def check(self, plans: list) -> None:
        """Every plan's logits on the graph runner within 5% of the float32 runner's."""
        for plan in plans:
            with cuda_emulation.suspended():  # the float32 reference on the CPU kernels
                expected = self.reference.execute(plan)
            got = self.graphs.execute(plan)
            if expected.numel():
                err = (got.float() - expected).abs().max().item()
                assert err <= 0.05 * expected.abs().max().item(), f"error {err}"


@pytest.mark.skipif(cuda_emulation.module() is None, reason="no CUDA emulation module (BATCHLLM_CUDA_EMULATION_DIR)")
def test_graph_runner_tail_on_the_emulated_kernels_keeps_its_own_splits(monkeypatch):
    # A job's tail through the graph runner's padded path (capture off) on the CUDA kernels compiled
    # for the CPU emulation: after a 6-row decode step, two rows with 536 and 300 suffix tokens under
    # a shared 64-token prefix decode in that step's 8-row buffers, with their own suffix key split
    # (3 chunks on 132 SMs; the 8-row bucket's plan would not split) and prefix split, read on the
    # device. Their logits match the float32 eager runner's.
    run = EmulatedGraphRun(monkeypatch, seed=3)
    h = run.harness
    a = h.sequence(run.tokens(602))
    b = h.sequence(a.tokens[:64] + run.tokens(302), shared=a, shared_blocks=8)
    shorts = [h.sequence(run.tokens(22)) for _ in range(4)]
    plans = [h.step([(a, 600)], 0, sample=[]), h.step([(b, 300)], 0, sample=[])]
    plans += [h.step([(s, 20)], 0, sample=[]) for s in shorts]
    rows = [a, b] + shorts
    plans.append(h.step([(s, 1) for s in rows], len(rows),
                        levels=suffix_levels(rows, [(a.blocks[:8], 0, 2)], [8, 8, 0, 0, 0, 0])))
    plans.append(h.step([(a, 1), (b, 1)], 2, levels=suffix_levels([a, b], [(a.blocks[:8], 0, 2)], [8, 8])))
    run.check(plans)
    assert run.graphs.decode_graphs.steps == 2 and run.graphs.decode_graphs.dominated == 1  # the tail ran padded
    assert run.splits[-1][0] > 1 and run.splits[-1][2] == 2  # its suffix keys split, over its own 2 rows


@pytest.mark.skipif(cuda_emulation.module() is None, reason="no CUDA emulation module (BATCHLLM_CUDA_EMULATION_DIR)")
def test_graph_runner_without_prefixes_on_the_emulated_kernels(monkeypatch):
    # A job without sharing (W5, any fcfs-lru job) through the graph runner's padded path (capture
    # off) on the emulated CUDA kernels: its keys have no prefix level at all (not one empty padded
    # prefix), so decode_rows writes unsplit rows' outputs itself (SuffixSplit::direct): a 6-row step
    # of short rows (an 8-row key: two padded rows); then two long rows (a wider key), whose keys the
    # combine merges from their chunks. Logits match the float32 eager runner's.
    run = EmulatedGraphRun(monkeypatch, seed=5)
    h = run.harness
    longs = [h.sequence(run.tokens(602)), h.sequence(run.tokens(302))]
    shorts = [h.sequence(run.tokens(22)) for _ in range(6)]
    plans = [h.step([(s, len(s.tokens) - 2)], 0, sample=[]) for s in longs + shorts]

    def no_prefix_levels(seqs):
        levels = suffix_levels(seqs, [], [0] * len(seqs))
        levels["prefix_q_range"] = np.zeros((0, 2), dtype=np.int32)
        return levels

    plans.append(h.step([(s, 1) for s in shorts], len(shorts), levels=no_prefix_levels(shorts)))
    plans.append(h.step([(s, 1) for s in longs], 2, levels=no_prefix_levels(longs)))
    run.check(plans)
    assert run.graphs.decode_graphs.steps == 2
    assert [key.prefixes for key in run.graphs.decode_graphs._entries] == [0, 0]  # no padded empty prefix
    assert run.splits[0][0] == 1 and run.splits[-1][0] > 1 and run.splits[-1][2] == 2  # unsplit, then 2 rows split


@pytest.mark.skipif(cuda_emulation.module() is None, reason="no CUDA emulation module (BATCHLLM_CUDA_EMULATION_DIR)")
def test_piecewise_path_on_the_emulated_kernels_matches_float32(monkeypatch):
    # Prefill and mixed steps through the piecewise static path (piecewise_graphs, capture off) on
    # the CUDA kernels compiled for the CPU emulation: the staged forward's layer-op kernels, the K/V
    # store over the bucket's padded slots and, between the pieces, cascade decode (a shared prefix)
    # and paged prefill over the step's own rows. Logits match the float32 eager runner's.
    monkeypatch.setenv("BATCHLLM_LAYER_OPS", "kernels")
    run = EmulatedGraphRun(monkeypatch, seed=4)
    h = run.harness
    a = h.sequence(run.tokens(72))
    b = h.sequence(a.tokens[:32] + run.tokens(23), shared=a, shared_blocks=2)
    c = h.sequence(run.tokens(45))
    plans = [h.step([(a, 69)], 0), h.step([(b, 20)], 0)]  # prefill: 69 tokens (bucket 128), 20 (32)
    plans.append(h.step([(a, 1), (b, 1), (c, 30)], 2,  # decode a, b under their prefix; prefill c
                        levels=suffix_levels([a, b], [(a.blocks[:2], 0, 2)], [2, 2])))
    plans.append(h.step([(a, 1), (b, 1), (c, 14)], 2, levels=suffix_levels([a, b], [(a.blocks[:2], 0, 2)], [2, 2])))
    run.check(plans)
    mixed = run.graphs.mixed_graphs
    assert mixed.steps == 4 and sorted(mixed._buckets) == [16, 32, 128]  # 2 + 14 tokens: bucket 16
