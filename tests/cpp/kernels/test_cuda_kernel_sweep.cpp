// The CUDA launchers against the CPU references over a sweep of shapes: dtypes, head dims, GQA ratios,
// page sizes, lengths of 0 and non-multiples of the page size, tiles and key steps beyond 64, split-KV
// prefixes, 1-3 prefix levels. Outputs are poisoned (NaN) before every launch so that an unwritten
// row fails. Two builds of this file (tests/cpp/cuda_emulation/CMakeLists.txt):
//   test_cuda_kernel_sweep           real CUDA; skipped when the build has no CUDA or there is no device;
//   test_cuda_kernel_sweep_emulated  the same kernel sources compiled for the CPU emulation (CI), each
//                                    case under a different thread order between barriers.
#include <gtest/gtest.h>

#ifdef BATCHLLM_WITH_CUDA

#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "batchllm/kernels.h"
#include "batchllm/kernels/cuda.h"
#include "kernels/cpu/cpu_common.h"
#include "tensor_views.h"

#ifdef BATCHLLM_CUDA_EMULATION_ACTIVE
#include "cuda_emulation.h"
#include "kernels/cuda/cuda_common.cuh"
#endif

namespace bk = batchllm::kernels;
using bk::DType;

namespace {

/// Host vector mirrored in device memory.
template <typename T>
struct Mirror {
  std::vector<T> host;
  T* device = nullptr;

  explicit Mirror(std::vector<T> values) : host(std::move(values)) {
    EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&device), std::max<size_t>(host.size(), 1) * sizeof(T)), cudaSuccess);
    upload();
  }
  Mirror(const Mirror&) = delete;
  Mirror& operator=(const Mirror&) = delete;
  ~Mirror() { cudaFree(device); }
  void upload() {
    EXPECT_EQ(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  std::vector<T> download() const {
    std::vector<T> out(host.size());
    EXPECT_EQ(cudaMemcpy(out.data(), device, out.size() * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return out;
  }
};

uint16_t to_bits(float x, DType dtype) {
  return dtype == DType::kFloat16 ? bk::cpu::float_to_half(x) : bk::cpu::float_to_bf16(x);
}
float from_bits(uint16_t x, DType dtype) {
  return dtype == DType::kFloat16 ? bk::cpu::half_to_float(x) : bk::cpu::bf16_to_float(x);
}

std::vector<uint16_t> random_bits(size_t n, DType dtype, std::mt19937& gen) {
  std::normal_distribution<float> dist;
  std::vector<uint16_t> out(n);
  for (auto& x : out) x = to_bits(dist(gen), dtype);
  return out;
}

std::vector<uint16_t> poison(size_t n, DType dtype) { return std::vector<uint16_t>(n, to_bits(NAN, dtype)); }

bk::TensorView view(void* data, DType dtype, std::vector<int64_t> shape) {
  return bk::testing::contiguous_view(data, dtype, shape);
}

/// max |got - want| / max |want|; infinite when got has a NaN.
double rel_err(const std::vector<uint16_t>& got, const std::vector<uint16_t>& want, DType dtype) {
  double worst = 0, scale = 1e-6;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = from_bits(got[i], dtype), w = from_bits(want[i], dtype);
    if (std::isnan(g)) return INFINITY;
    worst = std::max(worst, std::fabs(g - w));
    scale = std::max(scale, std::fabs(w));
  }
  return worst / scale;
}

double tolerance(DType dtype) { return dtype == DType::kFloat16 ? 2e-3 : 1e-2; }

const char* name(DType dtype) { return bk::dtype_name(dtype); }

/// Before each case: the emulation's thread order rotates (forward, reverse, shuffled).
void begin_case(int index) {
#ifdef BATCHLLM_CUDA_EMULATION_ACTIVE
  using batchllm_emulation::Order;
  const Order orders[] = {Order::kForward, Order::kReverse, Order::kShuffled};
  batchllm_emulation::set_order(orders[index % 3], static_cast<unsigned>(index));
#else
  (void)index;
#endif
}

class CudaSweep : public ::testing::Test {
 protected:
  void SetUp() override {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
      cudaGetLastError();
      GTEST_SKIP() << "no CUDA device";
    }
  }
};

/// A paged KV cache with shuffled block ids, filled with random values.
struct Cache {
  int64_t num_blocks, block_size, kv_heads, head_dim;
  DType dtype;
  Mirror<uint16_t> k, v;
  std::vector<int32_t> free_blocks;

  Cache(int64_t blocks, int64_t bs, int64_t heads, int64_t dim, DType dt, std::mt19937& gen)
      : num_blocks(blocks), block_size(bs), kv_heads(heads), head_dim(dim), dtype(dt),
        k(random_bits(blocks * bs * heads * dim, dt, gen)), v(random_bits(blocks * bs * heads * dim, dt, gen)),
        free_blocks(blocks) {
    std::iota(free_blocks.begin(), free_blocks.end(), 0);
    std::shuffle(free_blocks.begin(), free_blocks.end(), gen);
  }
  /// Blocks for `tokens` tokens, taken from the free list.
  std::vector<int32_t> take(int64_t tokens) {
    const int64_t n = (tokens + block_size - 1) / block_size;
    EXPECT_LE(n, static_cast<int64_t>(free_blocks.size())) << "test cache too small";
    std::vector<int32_t> out(free_blocks.end() - n, free_blocks.end());
    free_blocks.resize(free_blocks.size() - n);
    return out;
  }
  bk::TensorView k_view(bool device) {
    return view(device ? k.device : k.host.data(), dtype, {num_blocks, block_size, kv_heads, head_dim});
  }
  bk::TensorView v_view(bool device) {
    return view(device ? v.device : v.host.data(), dtype, {num_blocks, block_size, kv_heads, head_dim});
  }
};

// ---- store_kv --------------------------------------------------------------------------------------------

TEST_F(CudaSweep, StoreKv) {
  int index = 0;
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    for (int64_t head_dim : {64, 128}) {
      for (int64_t kv_heads : {1, 3}) {
        SCOPED_TRACE(std::string(name(dtype)) + " d=" + std::to_string(head_dim) + " hkv=" + std::to_string(kv_heads));
        begin_case(index++);
        std::mt19937 gen(static_cast<uint32_t>(index));
        Cache cache(7, 16, kv_heads, head_dim, dtype, gen);
        const int64_t tokens = 37;
        std::vector<int64_t> slots(7 * 16);
        std::iota(slots.begin(), slots.end(), 0);
        std::shuffle(slots.begin(), slots.end(), gen);
        slots.resize(tokens);
        slots[5] = slots[20] = -1;  // padding rows
        Mirror<uint16_t> k(random_bits(tokens * kv_heads * head_dim, dtype, gen));
        Mirror<uint16_t> v(random_bits(tokens * kv_heads * head_dim, dtype, gen));
        Mirror<int64_t> slot_mapping(slots);
        bk::StoreKvParams p;
        p.k = view(k.host.data(), dtype, {tokens, kv_heads, head_dim});
        p.v = view(v.host.data(), dtype, {tokens, kv_heads, head_dim});
        p.k_cache = cache.k_view(false);
        p.v_cache = cache.v_view(false);
        p.slot_mapping = slots.data();
        ASSERT_EQ(bk::store_kv_cpu(p), bk::Status::kOk);
        bk::StoreKvParams d = p;
        d.k.data = k.device;
        d.v.data = v.device;
        d.k_cache = cache.k_view(true);
        d.v_cache = cache.v_view(true);
        d.slot_mapping = slot_mapping.device;
        ASSERT_EQ(bk::store_kv_cuda(d, nullptr), cudaSuccess);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        EXPECT_EQ(cache.k.download(), cache.k.host);
        EXPECT_EQ(cache.v.download(), cache.v.host);
      }
    }
  }
}

// ---- layer ops: rms_norm (+ residual), silu_and_mul, rotary_embedding --------------------------------------

// Widths of 16-byte multiples run rms_norm and silu_and_mul on 16-byte vectors, others element by element;
// a head dim of 272 takes rotary's cos/sin table in two parts (kRopeTable = 128 frequencies).
TEST_F(CudaSweep, LayerOps) {
  int index = 0;
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    for (const auto& [hidden, width, head_dim] : {std::array<int64_t, 3>{300, 70, 64}, {320, 88, 272}}) {
      SCOPED_TRACE(std::string(name(dtype)) + " hidden " + std::to_string(hidden) + " width " + std::to_string(width) +
                   " head dim " + std::to_string(head_dim));
      begin_case(index++);
      std::mt19937 gen(static_cast<uint32_t>(100 + index));
      const int64_t rows = 19, heads = 7, kv_heads = 1;
      // rms_norm with a residual, out over x (in place): the residual sums and the outputs agree.
      Mirror<uint16_t> x(random_bits(rows * hidden, dtype, gen)), residual(random_bits(rows * hidden, dtype, gen));
      Mirror<uint16_t> weight(random_bits(hidden, dtype, gen));
      bk::RmsNormParams norm;
      norm.x = norm.out = view(x.host.data(), dtype, {rows, hidden});
      norm.residual = view(residual.host.data(), dtype, {rows, hidden});
      norm.weight = view(weight.host.data(), dtype, {hidden});
      norm.eps = 1e-5f;
      bk::RmsNormParams d_norm = norm;
      d_norm.x.data = d_norm.out.data = x.device;
      d_norm.residual.data = residual.device;
      d_norm.weight.data = weight.device;
      ASSERT_EQ(bk::rms_norm_cpu(norm), bk::Status::kOk);
      ASSERT_EQ(bk::rms_norm_cuda(d_norm, nullptr), cudaSuccess);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      EXPECT_EQ(residual.download(), residual.host);
      EXPECT_LT(rel_err(x.download(), x.host, dtype), tolerance(dtype));
      // silu_and_mul.
      Mirror<uint16_t> gate_up(random_bits(rows * 2 * width, dtype, gen)), act(poison(rows * width, dtype));
      bk::SiluAndMulParams silu;
      silu.gate_up = view(gate_up.host.data(), dtype, {rows, 2 * width});
      silu.out = view(act.host.data(), dtype, {rows, width});
      bk::SiluAndMulParams d_silu = silu;
      d_silu.gate_up.data = gate_up.device;
      d_silu.out.data = act.device;
      ASSERT_EQ(bk::silu_and_mul_cpu(silu), bk::Status::kOk);
      ASSERT_EQ(bk::silu_and_mul_cuda(d_silu, nullptr), cudaSuccess);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      EXPECT_LT(rel_err(act.download(), act.host, dtype), tolerance(dtype));
      // rotary_embedding on q and k at positions up to 40,000 (GQA 7, as Qwen2.5-7B).
      Mirror<uint16_t> q(random_bits(rows * heads * head_dim, dtype, gen));
      Mirror<uint16_t> k(random_bits(rows * kv_heads * head_dim, dtype, gen));
      std::vector<int32_t> positions(rows);
      std::uniform_int_distribution<int32_t> position(0, 40000);
      for (auto& pos : positions) pos = position(gen);
      std::vector<float> inv_freq(head_dim / 2);
      for (int64_t i = 0; i < head_dim / 2; ++i) inv_freq[i] = std::pow(10000.0f, -2.0f * i / head_dim);
      Mirror<int32_t> d_positions(positions);
      Mirror<float> d_inv_freq(inv_freq);
      bk::RotaryParams rope;
      rope.q = view(q.host.data(), dtype, {rows, heads, head_dim});
      rope.k = view(k.host.data(), dtype, {rows, kv_heads, head_dim});
      rope.positions = positions.data();
      rope.inv_freq = inv_freq.data();
      bk::RotaryParams d_rope = rope;
      d_rope.q.data = q.device;
      d_rope.k.data = k.device;
      d_rope.positions = d_positions.device;
      d_rope.inv_freq = d_inv_freq.device;
      ASSERT_EQ(bk::rotary_embedding_cpu(rope), bk::Status::kOk);
      ASSERT_EQ(bk::rotary_embedding_cuda(d_rope, nullptr), cudaSuccess);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      EXPECT_LT(rel_err(q.download(), q.host, dtype), tolerance(dtype));
      EXPECT_LT(rel_err(k.download(), k.host, dtype), tolerance(dtype));
      // The same rotation with store_kv fused in (a slot mapping; row 4 a padding row, slot -1): on each
      // backend the q, k and cache it leaves are those of rotary then store_kv, bit for bit.
      const auto q_bits = random_bits(rows * heads * head_dim, dtype, gen);
      const auto k_bits = random_bits(rows * kv_heads * head_dim, dtype, gen);
      const auto v_bits = random_bits(rows * kv_heads * head_dim, dtype, gen);
      std::vector<int64_t> slots(rows);
      std::iota(slots.begin(), slots.end(), 5);
      slots[4] = -1;
      Mirror<int64_t> d_slots(slots);
      const auto seed = static_cast<uint32_t>(gen());
      for (bool device : {false, true}) {
        std::vector<std::vector<uint16_t>> results[2];  // q, k, k cache, v cache: fused, then separate
        for (bool fused : {true, false}) {
          std::mt19937 cache_gen(seed);
          Cache cache(4, 8, kv_heads, head_dim, dtype, cache_gen);
          Mirror<uint16_t> fq(q_bits), fk(k_bits), fv(v_bits);
          bk::RotaryParams r = device ? d_rope : rope;
          r.q = view(device ? fq.device : fq.host.data(), dtype, {rows, heads, head_dim});
          r.k = view(device ? fk.device : fk.host.data(), dtype, {rows, kv_heads, head_dim});
          bk::StoreKvParams store;
          store.k = r.k;
          store.v = view(device ? fv.device : fv.host.data(), dtype, {rows, kv_heads, head_dim});
          store.k_cache = cache.k_view(device);
          store.v_cache = cache.v_view(device);
          store.slot_mapping = device ? d_slots.device : slots.data();
          if (fused) {
            r.v = store.v;
            r.k_cache = store.k_cache;
            r.v_cache = store.v_cache;
            r.slot_mapping = store.slot_mapping;
          }
          if (device) {
            ASSERT_EQ(bk::rotary_embedding_cuda(r, nullptr), cudaSuccess);
            if (!fused) ASSERT_EQ(bk::store_kv_cuda(store, nullptr), cudaSuccess);
            ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
            results[fused ? 0 : 1] = {fq.download(), fk.download(), cache.k.download(), cache.v.download()};
          } else {
            ASSERT_EQ(bk::rotary_embedding_cpu(r), bk::Status::kOk);
            if (!fused) ASSERT_EQ(bk::store_kv_cpu(store), bk::Status::kOk);
            results[fused ? 0 : 1] = {fq.host, fk.host, cache.k.host, cache.v.host};
          }
        }
        SCOPED_TRACE(device ? "fused store on the device" : "fused store on the CPU");
        for (size_t i = 0; i < 4; ++i) EXPECT_EQ(results[0][i], results[1][i]) << "array " << i;
      }
    }
  }
}

// ---- merge_states ------------------------------------------------------------------------------------------

TEST_F(CudaSweep, MergeStates) {
  int index = 0;
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (bool alias : {false, true}) {
      SCOPED_TRACE(std::string(name(dtype)) + (alias ? " o aliases o_a" : ""));
      begin_case(index++);
      std::mt19937 gen(static_cast<uint32_t>(100 + index));
      std::normal_distribution<float> dist;
      const int64_t n = 13, h = 3, d = 80;  // 80: lanes past the head dim on the second pass
      const size_t elems = n * h * d, elem_bytes = dtype == DType::kFloat32 ? 4 : 2;
      auto random_bytes = [&](size_t count) {
        std::vector<uint8_t> out(count * elem_bytes);
        for (size_t i = 0; i < count; ++i) bk::cpu::store_float(out.data(), dtype, i, dist(gen));
        return out;
      };
      std::vector<float> lse_a(n * h), lse_b(n * h);
      for (size_t i = 0; i < lse_a.size(); ++i) {
        lse_a[i] = i % 5 == 1 ? -INFINITY : 3 * dist(gen);
        lse_b[i] = i % 7 == 2 || i % 5 == 1 ? -INFINITY : 3 * dist(gen);  // both sides empty sometimes
      }
      Mirror<uint8_t> o_a(random_bytes(elems)), o_b(random_bytes(elems));
      Mirror<uint8_t> o(std::vector<uint8_t>(elems * elem_bytes, 0xff));
      Mirror<float> la(lse_a), lb(lse_b), lse(std::vector<float>(n * h, NAN));
      std::vector<uint8_t> want(elems * elem_bytes);
      std::vector<float> want_lse(n * h);
      bk::MergeStatesParams p;
      p.o_a = view(o_a.host.data(), dtype, {n, h, d});
      p.o_b = view(o_b.host.data(), dtype, {n, h, d});
      p.o = view(want.data(), dtype, {n, h, d});
      p.lse_a = lse_a.data();
      p.lse_b = lse_b.data();
      p.lse = want_lse.data();
      ASSERT_EQ(bk::merge_states_cpu(p), bk::Status::kOk);
      bk::MergeStatesParams q = p;
      q.o_a.data = o_a.device;
      q.o_b.data = o_b.device;
      q.o.data = alias ? o_a.device : o.device;
      q.lse_a = la.device;
      q.lse_b = lb.device;
      q.lse = alias ? la.device : lse.device;
      ASSERT_EQ(bk::merge_states_cuda(q, nullptr), cudaSuccess);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const std::vector<uint8_t> got = alias ? o_a.download() : o.download();
      const std::vector<float> got_lse = alias ? la.download() : lse.download();
      for (size_t i = 0; i < elems; ++i) {
        const float g = bk::cpu::load_float(got.data(), dtype, i), w = bk::cpu::load_float(want.data(), dtype, i);
        ASSERT_FALSE(std::isnan(g)) << "element " << i;
        ASSERT_NEAR(g, w, 1e-5 + 1e-5 * std::fabs(w)) << "element " << i;
      }
      for (size_t i = 0; i < want_lse.size(); ++i) {
        if (std::isinf(want_lse[i])) {
          EXPECT_EQ(got_lse[i], want_lse[i]) << "state " << i;
        } else {
          EXPECT_NEAR(got_lse[i], want_lse[i], 1e-5) << "state " << i;
        }
      }
    }
  }
}

// ---- prefill_attention --------------------------------------------------------------------------------------

/// (q_len, context_len) of each sequence: context includes the chunk; context > q_len is a cached
/// prefix (or earlier chunks) before it.
const std::vector<std::vector<std::pair<int, int>>> kPrefillSeqs = {
    {{1, 1}},                               // one token
    {{17, 17}, {5, 40}},                    // a chunk over a cached prefix, lengths off the page size
    {{70, 70}, {1, 130}, {33, 33}},         // > 64 rows, > 64 keys, a decode-like row
    {{100, 229}},                           // several key steps with the diagonal inside a step
};

TEST_F(CudaSweep, PrefillAttention) {
  int index = 0;
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    for (int64_t head_dim : {64, 128}) {
      for (auto heads : {std::pair<int64_t, int64_t>{4, 4}, {8, 2}, {12, 4}, {7, 1}}) {
        for (int64_t block_size : {16, 8, 12}) {  // 12: FastDivisor off powers of two
          for (size_t s = 0; s < kPrefillSeqs.size(); ++s) {
            // Keep the sweep's cost down on the emulation: the big shapes once per dtype/head dim.
            if (s >= 2 && (heads.first != 8 || block_size != 16)) continue;
            const auto& seqs = kPrefillSeqs[s];
            const auto [hq, hkv] = heads;
            SCOPED_TRACE(std::string(name(dtype)) + " d=" + std::to_string(head_dim) + " hq/hkv=" +
                         std::to_string(hq) + "/" + std::to_string(hkv) + " page=" + std::to_string(block_size) +
                         " seqs#" + std::to_string(s));
            begin_case(index++);
            std::mt19937 gen(static_cast<uint32_t>(1000 + index));
            Cache cache(48, block_size, hkv, head_dim, dtype, gen);
            int64_t max_blocks = 0, rows = 0;
            int32_t max_q = 0;
            for (auto [q_len, ctx] : seqs) {
              max_blocks = std::max<int64_t>(max_blocks, (ctx + block_size - 1) / block_size);
              rows += q_len;
              max_q = std::max(max_q, q_len);
            }
            std::vector<int32_t> tables(seqs.size() * max_blocks, -1), query_start = {0}, context_lens;
            for (size_t i = 0; i < seqs.size(); ++i) {
              const std::vector<int32_t> blocks = cache.take(seqs[i].second);
              std::copy(blocks.begin(), blocks.end(), tables.begin() + i * max_blocks);
              query_start.push_back(query_start.back() + seqs[i].first);
              context_lens.push_back(seqs[i].second);
            }
            Mirror<uint16_t> q(random_bits(rows * hq * head_dim, dtype, gen)), o(poison(rows * hq * head_dim, dtype));
            Mirror<int32_t> d_tables(tables), d_start(query_start), d_context(context_lens);
            std::vector<uint16_t> want(rows * hq * head_dim);
            bk::PrefillParams p;
            p.q = view(q.host.data(), dtype, {rows, hq, head_dim});
            p.o = view(want.data(), dtype, {rows, hq, head_dim});
            p.k_cache = cache.k_view(false);
            p.v_cache = cache.v_view(false);
            p.block_tables = tables.data();
            p.max_blocks_per_seq = max_blocks;
            p.query_start = query_start.data();
            p.context_lens = context_lens.data();
            p.num_seqs = static_cast<int64_t>(seqs.size());
            p.scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
            p.max_q_len = max_q;
            ASSERT_EQ(bk::prefill_attention_cpu(p), bk::Status::kOk);
            bk::PrefillParams d = p;
            d.q.data = q.device;
            d.o.data = o.device;
            d.k_cache = cache.k_view(true);
            d.v_cache = cache.v_view(true);
            d.block_tables = d_tables.device;
            d.query_start = d_start.device;
            d.context_lens = d_context.device;
            // Every tile kernel: WMMA (attention_tile.cuh), mma.sync with 4 and 8 warps (attention_mma.cuh),
            // wgmma with 8 warps, plain and pipelined, and pipelined with 4 or on 128-key tiles
            // (attention_wgmma.cuh; mma128 or mma on a device or build without it).
            for (const char* tiles : {"wmma", "mma", "mma128", "wgmma", "wgmma-pipe", "wgmma64", "wgmma-k128"}) {
              SCOPED_TRACE(std::string("tiles ") + tiles);
              o.upload();  // poisoned again
              setenv("BATCHLLM_ATTENTION_TILES", tiles, 1);
              const cudaError_t launched = bk::prefill_attention_cuda(d, nullptr);
              unsetenv("BATCHLLM_ATTENTION_TILES");
              ASSERT_EQ(launched, cudaSuccess);
              ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
              EXPECT_LT(rel_err(o.download(), want, dtype), tolerance(dtype));
            }
          }
        }
      }
    }
  }
}

// ---- cascade_decode_attention --------------------------------------------------------------------------------

/// A decode batch: prefixes (tokens, reader rows [begin, end)) in tree order, suffix length per row.
struct CascadeShape {
  std::string name;
  std::vector<std::tuple<int, int, int>> prefixes;  // (tokens, begin, end)
  std::vector<int> suffix_lens;
  int multiprocessors = 132;  // fewer: the split-KV heuristic splits long prefixes
  bool once = false;          // costly on the emulation: one dtype, head dim and GQA ratio only
  int padded = 0;             // the last rows are a CUDA graph's padding (one suffix key, no prefix):
                              // the suffix split is decided per step on the device for the rest
};

std::vector<CascadeShape> cascade_shapes() {
  std::vector<CascadeShape> shapes;
  shapes.push_back({"no prefix", {}, {5, 0, 16, 33}});
  shapes.push_back({"one level", {{40, 0, 4}}, {5, 0, 16, 1, 9}});
  shapes.push_back({"two levels", {{40, 0, 5}, {7, 1, 3}}, {5, 0, 16, 1, 9}});
  shapes.push_back({"three levels, empty suffixes", {{64, 0, 6}, {17, 0, 4}, {1, 2, 4}}, {0, 0, 3, 0, 70, 2}});
  shapes.push_back({"many readers (> 64 rows per tile)", {{23, 0, 70}}, std::vector<int>(70, 2)});
  shapes.push_back({"split-KV prefix", {{600, 0, 3}, {130, 1, 3}}, {4, 17, 0}, 8});
  shapes.push_back({"empty prefix", {{0, 0, 2}, {20, 0, 3}}, {3, 1, 0}});
  // Few rows, long suffixes, few SMs: the suffix keys are split too (one row's last chunks empty).
  shapes.push_back({"split-KV suffix", {{40, 0, 2}}, {700, 300}, 8});
  // More prefixes than the combine step's threads (each row still covered by a few).
  CascadeShape many{"131 prefixes", {{16, 0, 65}}, std::vector<int>(65, 1)};
  for (int r = 0; r < 65; ++r) many.prefixes.push_back({3, r, r + 1});
  for (int r = 0; r < 65; ++r) many.prefixes.push_back({2, r, r + 1});
  many.once = true;
  shapes.push_back(many);
  // Rows covered by more prefixes than the combine step lists: its fallback scans them all.
  shapes.push_back({"34 prefixes over the same rows", std::vector<std::tuple<int, int, int>>(34, {1, 0, 2}), {2, 3},
                    132, true});
  // A graph step of two long rows padded to eight: the device split splits the two (the padded rows
  // get no suffix state: zeros), as their own launch would, in a grid sized for eight.
  shapes.push_back({"graph-padded rows, split suffix", {{40, 0, 2}}, {700, 300, 1, 1, 1, 1, 1, 1}, 8, false, 6});
  // Short suffixes: unsplit, and the padded rows attend their one key as every row does.
  shapes.push_back({"graph-padded rows, unsplit suffix", {{40, 0, 3}}, {5, 100, 16, 1, 1, 1, 1, 1}, 132, false, 5});
  // A tail under a long prefix in a graph of more prefixes (padded: no keys, no readers): the prefix
  // split is the step's own, within the bucket plan's grid.
  shapes.push_back({"graph-padded prefix tail", {{600, 0, 2}, {0, 0, 0}, {0, 0, 0}}, {5, 9, 1, 1, 1, 1}, 8, false, 4});
  return shapes;
}

TEST_F(CudaSweep, CascadeDecodeAttention) {
  int index = 0;
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    for (int64_t head_dim : {64, 128}) {
      // GQA groups 1, 4, 3, 8, 7 and 16 (decode_rows: 4 or 8 heads per CTA, 16 takes two CTAs).
      for (auto heads : {std::pair<int64_t, int64_t>{4, 4}, {8, 2}, {12, 4}, {8, 1}, {14, 2}, {16, 1}}) {
        for (const CascadeShape& shape : cascade_shapes()) {
          for (bool with_lse : {true, false}) {
            // Every GQA ratio on one instantiation (fp16, d = 64); the other three get (8, 2).
            const bool first_instance = dtype == DType::kFloat16 && head_dim == 64;
            if (!first_instance && heads.first != 8) continue;
            if (!with_lse && heads.first != 8) continue;
            if (shape.once && !(first_instance && heads.first == 8 && with_lse)) continue;
            const auto [hq, hkv] = heads;
            SCOPED_TRACE(std::string(name(dtype)) + " d=" + std::to_string(head_dim) + " hq/hkv=" +
                         std::to_string(hq) + "/" + std::to_string(hkv) + " " + shape.name +
                         (with_lse ? " +lse" : ""));
            begin_case(index++);
#ifdef BATCHLLM_CUDA_EMULATION_ACTIVE
            batchllm_emulation::set_multiprocessor_count(shape.multiprocessors);
            // The prefix split plan counts the tile kernel's CTAs an SM (its occupancy): vary what the
            // occupancy query reports (0: from threads and shared memory) so that plans of 1-4 run.
            batchllm_emulation::set_occupancy(index % 4);
#else
            if (shape.multiprocessors != 132) continue;  // the real device decides its own splits
#endif
            std::mt19937 gen(static_cast<uint32_t>(5000 + index));
            const int64_t block_size = index % 2 == 0 ? 12 : 16;  // 12: FastDivisor off powers of two
            int64_t blocks_needed = 0;
            for (auto [tokens, begin, end] : shape.prefixes) blocks_needed += (tokens + block_size - 1) / block_size;
            for (int len : shape.suffix_lens) blocks_needed += (len + block_size - 1) / block_size;
            Cache cache(blocks_needed + 4, block_size, hkv, head_dim, dtype, gen);
            const int64_t rows = static_cast<int64_t>(shape.suffix_lens.size());
            std::vector<int32_t> indptr = {0}, blocks, lens, ranges;
            int32_t max_prefix_len = 0, max_prefix_rows = 0, max_suffix_len = 0;
            for (auto [tokens, begin, end] : shape.prefixes) {
              const std::vector<int32_t> b = cache.take(tokens);
              blocks.insert(blocks.end(), b.begin(), b.end());
              indptr.push_back(static_cast<int32_t>(blocks.size()));
              lens.push_back(tokens);
              ranges.push_back(begin);
              ranges.push_back(end);
              max_prefix_len = std::max(max_prefix_len, tokens);
              max_prefix_rows = std::max(max_prefix_rows, end - begin);
            }
            int64_t max_suffix_blocks = 1;
            for (int len : shape.suffix_lens) {
              max_suffix_blocks = std::max<int64_t>(max_suffix_blocks, (len + block_size - 1) / block_size);
              max_suffix_len = std::max(max_suffix_len, len);
            }
            std::vector<int32_t> suffix_tables(rows * max_suffix_blocks, -1);
            for (int64_t r = 0; r < rows; ++r) {
              const std::vector<int32_t> b = cache.take(shape.suffix_lens[r]);
              std::copy(b.begin(), b.end(), suffix_tables.begin() + r * max_suffix_blocks);
            }
            Mirror<uint16_t> q(random_bits(rows * hq * head_dim, dtype, gen)), o(poison(rows * hq * head_dim, dtype));
            Mirror<int32_t> d_indptr(indptr), d_blocks(blocks), d_lens(lens), d_ranges(ranges);
            Mirror<int32_t> d_suffix_tables(suffix_tables), d_suffix_lens(std::vector<int32_t>(
                                                                shape.suffix_lens.begin(), shape.suffix_lens.end()));
            std::vector<uint16_t> want(rows * hq * head_dim);
            std::vector<float> want_lse(rows * hq);
            bk::CascadeDecodeParams p;
            p.q = view(q.host.data(), dtype, {rows, hq, head_dim});
            p.o = view(want.data(), dtype, {rows, hq, head_dim});
            p.k_cache = cache.k_view(false);
            p.v_cache = cache.v_view(false);
            p.lse = want_lse.data();
            p.scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
            p.levels.num_prefixes = static_cast<int64_t>(shape.prefixes.size());
            p.levels.prefix_kv_indptr = indptr.data();
            p.levels.prefix_kv_blocks = blocks.data();
            p.levels.prefix_kv_lens = lens.data();
            p.levels.prefix_q_range = ranges.data();
            p.levels.suffix_block_tables = suffix_tables.data();
            p.levels.max_suffix_blocks = max_suffix_blocks;
            const std::vector<int32_t> suffix_lens(shape.suffix_lens.begin(), shape.suffix_lens.end());
            p.levels.suffix_kv_lens = suffix_lens.data();
            p.levels.max_prefix_kv_len = max_prefix_len;
            p.levels.max_prefix_rows = max_prefix_rows;
            p.levels.max_suffix_kv_len = max_suffix_len;
            ASSERT_EQ(bk::cascade_decode_attention_cpu(p), bk::Status::kOk);

            bk::CascadeDecodeParams d = p;
            d.q.data = q.device;
            d.o.data = o.device;
            d.k_cache = cache.k_view(true);
            d.v_cache = cache.v_view(true);
            d.levels.prefix_kv_indptr = d_indptr.device;
            d.levels.prefix_kv_blocks = d_blocks.device;
            d.levels.prefix_kv_lens = d_lens.device;
            d.levels.prefix_q_range = d_ranges.device;
            d.levels.suffix_block_tables = d_suffix_tables.device;
            d.levels.suffix_kv_lens = d_suffix_lens.device;
            Mirror<float> lse(std::vector<float>(rows * hq, NAN));
            d.lse = with_lse ? lse.device : nullptr;
            // The suffix split decided per step on the device (DecodeLevelsView::suffix_split) for the
            // graph-padded shapes and, by a hash of the case, for a third of the others.
            const bool device_split = shape.padded > 0 || ((static_cast<unsigned>(index) * 3266489917u) >> 29) % 3 == 0;
            const int64_t real_rows = rows - shape.padded;
            int32_t real_max_suffix = 0;
            for (int64_t r = 0; r < real_rows; ++r) real_max_suffix = std::max(real_max_suffix, suffix_lens[r]);
            const std::array<int32_t, 3> split =
                bk::cascade_suffix_split(real_rows, rows, hq, hkv, device_split ? real_max_suffix : 0);
            Mirror<int32_t> d_split(std::vector<int32_t>(split.begin(), split.end()));
            SCOPED_TRACE(device_split ? "device split " + std::to_string(split[0]) + " x " + std::to_string(split[1]) +
                                            " keys, " + std::to_string(split[2]) + " rows"
                                      : std::string("host split"));
            if (device_split) d.levels.suffix_split = d_split.device;
            // With a device split, the prefix level's too, under a graph bucket's hints (every row a
            // reader, twice the keys): the launch is sized by the hints, the split is the step's.
            const bool prefix_split = device_split && !shape.prefixes.empty();
            if (prefix_split) {
              d.levels.max_prefix_rows = static_cast<int32_t>(rows);
              d.levels.max_prefix_kv_len = 2 * max_prefix_len + 16;
            }
            // Kernel variants by a hash of the case (a plain index % n would tie them to shapes):
            // the suffix level on decode_rows (default) or the tile kernel, or decode_rows and the
            // prefix tiles fused in one launch; the prefix tiles on WMMA (default), mma.sync or wgmma.
            const unsigned variant = (static_cast<unsigned>(index) * 2654435761u) >> 28;
            // or decode_rows merging the prefix states itself (no combine launch), or decode_rows on a
            // side stream (the emulation runs it only at the join). (mma128 with fused runs separate
            // launches: the fused grid takes 4-warp tiles only; merge with suffix splits too.)
            // Or owned tiles: each CTA takes its rows through every level in one launch.
            const char* suffix_names[] = {"suffix tiles", "suffix decode_rows", "suffix decode_rows fused",
                                          "suffix decode_rows merging", "suffix decode_rows on a side stream",
                                          "owned tiles"};
            const char* launches[] = {nullptr, nullptr, "fused", "merge", "streams", "owned"};
            const char* tile_names[] = {"wmma", "mma", "mma128", "wgmma", "wgmma-pipe", "wgmma64", "wgmma-k128"};
            const unsigned suffix = variant % 6;
            // Rows past a device split's have no suffix state: the padded rows of a split step give
            // zeros (the tile suffix, which takes no splits, attends every row).
            for (int64_t r = split[2]; device_split && suffix != 0 && r < rows; ++r) {
              std::fill(want.begin() + r * hq * head_dim, want.begin() + (r + 1) * hq * head_dim, to_bits(0.0f, dtype));
              std::fill(want_lse.begin() + r * hq, want_lse.begin() + (r + 1) * hq, -INFINITY);
            }
            const unsigned tiles = ((static_cast<unsigned>(index) * 2246822519u) >> 27) % 7;
            // decode_rows' staged key loop (BATCHLLM_DECODE_ROWS=staged) for half of its separate,
            // merge and streams launches (the fused kernel keeps the unrolled loop).
            const bool staged = (suffix == 1 || suffix == 3 || suffix == 4) &&
                                ((static_cast<unsigned>(index) * 2166136261u) >> 30) % 2 == 0;
            if (staged) setenv("BATCHLLM_DECODE_ROWS", "staged", 1);
            if (suffix == 0) setenv("BATCHLLM_CASCADE_SUFFIX", "tile", 1);
            if (launches[suffix] != nullptr) setenv("BATCHLLM_CASCADE_LAUNCH", launches[suffix], 1);
            setenv("BATCHLLM_ATTENTION_TILES", tile_names[tiles], 1);
            // The prefix split follows the tile kernel (its rows and occupancy): after the choice.
            std::array<int32_t, 3> prefix_plan{};
            if (prefix_split) {
              prefix_plan = bk::cascade_prefix_split(p.levels.num_prefixes, max_prefix_rows, max_prefix_len,
                                                     d.levels.num_prefixes, d.levels.max_prefix_rows,
                                                     d.levels.max_prefix_kv_len, hq, hkv, head_dim, dtype);
            }
            Mirror<int32_t> d_prefix_split(std::vector<int32_t>(prefix_plan.begin(), prefix_plan.end()));
            if (prefix_split) d.levels.prefix_split = d_prefix_split.device;
            SCOPED_TRACE(prefix_split ? "device prefix split " + std::to_string(prefix_plan[0]) + " x " +
                                            std::to_string(prefix_plan[1]) + " keys, " +
                                            std::to_string(prefix_plan[2]) + " state rows"
                                      : std::string("host prefix split"));
            Mirror<float> workspace(std::vector<float>(
                bk::cascade_workspace_floats(rows, hq, hkv, head_dim, d.levels, device_split, prefix_split), NAN));
            d.workspace = workspace.device;
            SCOPED_TRACE(std::string(suffix_names[suffix]) + (staged ? " (staged)" : "") + ", prefix " +
                         tile_names[tiles]);
            const cudaError_t launched = bk::cascade_decode_attention_cuda(d, nullptr);
            unsetenv("BATCHLLM_DECODE_ROWS");
            unsetenv("BATCHLLM_CASCADE_SUFFIX");
            unsetenv("BATCHLLM_CASCADE_LAUNCH");
            unsetenv("BATCHLLM_ATTENTION_TILES");
            ASSERT_EQ(launched, cudaSuccess);
            ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
            EXPECT_LT(rel_err(o.download(), want, dtype), tolerance(dtype));
            if (with_lse) {
              const std::vector<float> got_lse = lse.download();
              for (size_t i = 0; i < got_lse.size(); ++i) {
                if (std::isinf(want_lse[i])) {
                  EXPECT_EQ(got_lse[i], want_lse[i]) << "state " << i;
                } else {
                  EXPECT_NEAR(got_lse[i], want_lse[i], 2e-3 * (1 + std::fabs(want_lse[i]))) << "state " << i;
                }
              }
            }
          }
        }
      }
    }
  }
#ifdef BATCHLLM_CUDA_EMULATION_ACTIVE
  batchllm_emulation::set_multiprocessor_count(132);
  batchllm_emulation::set_occupancy(0);
#endif
}

}  // namespace

#ifdef BATCHLLM_CUDA_EMULATION_ACTIVE
// The key loops' division by the block size (FastDivisor: multiply-high, add, shift), against `/` for
// every divisor up to 300 and dividends near 0, near multiples of the divisor and near 2^31.
TEST(CudaSweepHost, FastDivisorMatchesDivision) {
  std::mt19937 gen(7);
  for (uint32_t d = 1; d <= 300; ++d) {
    const auto f = batchllm::kernels::cuda::FastDivisor::make(d);
    std::vector<uint32_t> values = {0, 1, d - 1, d, d + 1, 2 * d - 1, 2 * d, 0x7fffffffu, 0x7fffffffu - d};
    for (int i = 0; i < 200; ++i) values.push_back(std::uniform_int_distribution<uint32_t>(0, 0x7fffffffu)(gen));
    for (uint32_t n : values) ASSERT_EQ(f.div(n), n / d) << n << " / " << d;
  }
}

// The attention launchers refuse, before any launch, what their key loops cannot address or their
// softmax cannot scale: a non-positive scale, a block stride of 2^32 bytes or more.
TEST(CudaSweepHost, AttentionLaunchersRejectUnaddressableArgs) {
  std::vector<uint16_t> q(4 * 64), o(4 * 64), cache(16 * 64);
  std::vector<int32_t> tables = {0}, query_start = {0, 1}, context_lens = {1};
  bk::PrefillParams p;
  p.q = view(q.data(), DType::kBFloat16, {1, 4, 64});
  p.o = view(o.data(), DType::kBFloat16, {1, 4, 64});
  p.k_cache = view(cache.data(), DType::kBFloat16, {1, 16, 1, 64});
  p.v_cache = p.k_cache;
  p.block_tables = tables.data();
  p.max_blocks_per_seq = 1;
  p.query_start = query_start.data();
  p.context_lens = context_lens.data();
  p.num_seqs = 1;
  p.max_q_len = 1;
  p.scale = 0.0f;
  EXPECT_EQ(bk::prefill_attention_cuda(p, nullptr), cudaErrorInvalidValue);
  p.scale = 0.125f;
  p.k_cache.stride[0] = int64_t{1} << 31;  // x 2 bytes: 2^32
  EXPECT_EQ(bk::prefill_attention_cuda(p, nullptr), cudaErrorInvalidValue);
}
#endif

#else

TEST(CudaSweep, NotBuilt) { GTEST_SKIP() << "built without CUDA"; }

#endif  // BATCHLLM_WITH_CUDA
