// The CUDA launchers through the C++ API (no Python), against the CPU references on the same fp16
// inputs. Skipped when the build has no CUDA or the machine has no device.
#include <gtest/gtest.h>

#ifdef BATCHLLM_WITH_CUDA

#include <cuda_runtime_api.h>

#include <cmath>
#include <random>
#include <vector>

#include "batchllm/build_info.h"
#include "batchllm/kernels.h"
#include "batchllm/kernels/cuda.h"
#include "kernels/cpu/cpu_common.h"

namespace bk = batchllm::kernels;

namespace {

/// fp16 buffer mirrored on host and device.
struct HalfBuffer {
  std::vector<uint16_t> host;
  void* device = nullptr;
  explicit HalfBuffer(size_t n, uint32_t seed = 0, bool random = true) : host(n) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> dist;
    for (auto& x : host) x = bk::cpu::float_to_half(random ? dist(gen) : NAN);
    EXPECT_EQ(cudaMalloc(&device, n * 2), cudaSuccess);
    upload();
  }
  ~HalfBuffer() { cudaFree(device); }
  void upload() { EXPECT_EQ(cudaMemcpy(device, host.data(), host.size() * 2, cudaMemcpyHostToDevice), cudaSuccess); }
  std::vector<uint16_t> download() const {
    std::vector<uint16_t> out(host.size());
    EXPECT_EQ(cudaMemcpy(out.data(), device, out.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
    return out;
  }
};

template <typename T>
T* to_device(const std::vector<T>& host) {
  void* ptr = nullptr;
  EXPECT_EQ(cudaMalloc(&ptr, host.size() * sizeof(T) + 1), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  return static_cast<T*>(ptr);
}

bk::TensorView half_view(void* data, std::vector<int64_t> shape) {
  bk::TensorView v;
  v.data = data;
  v.dtype = bk::DType::kFloat16;
  v.ndim = static_cast<int32_t>(shape.size());
  int64_t stride = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.shape[d] = shape[d];
    v.stride[d] = stride;
    stride *= shape[d];
  }
  return v;
}

double max_abs_diff(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double diff = std::fabs(double(bk::cpu::half_to_float(a[i])) - bk::cpu::half_to_float(b[i]));
    worst = std::isnan(diff) ? INFINITY : std::max(worst, diff);
  }
  return worst;
}

class CudaKernels : public ::testing::Test {
 protected:
  void SetUp() override {
    if (batchllm::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

constexpr int64_t kBlocks = 16, kBlockSize = 16, kHq = 8, kHkv = 2, kD = 64;

}  // namespace

TEST_F(CudaKernels, PrefillMatchesCpuReference) {
  HalfBuffer k_cache(kBlocks * kBlockSize * kHkv * kD, 1), v_cache(kBlocks * kBlockSize * kHkv * kD, 2);
  const std::vector<int32_t> tables = {3, 9, 0, -1, 5, 12, 7, 1};  // [2, 4]
  const std::vector<int32_t> query_start = {0, 20, 21}, context_lens = {40, 60};
  const int64_t rows = 21;
  HalfBuffer q(rows * kHq * kD, 3), o_gpu(rows * kHq * kD, 0, false);
  std::vector<uint16_t> o_cpu(rows * kHq * kD);
  bk::PrefillParams p;
  p.k_cache = half_view(k_cache.host.data(), {kBlocks, kBlockSize, kHkv, kD});
  p.v_cache = half_view(v_cache.host.data(), {kBlocks, kBlockSize, kHkv, kD});
  p.q = half_view(q.host.data(), {rows, kHq, kD});
  p.o = half_view(o_cpu.data(), {rows, kHq, kD});
  p.block_tables = tables.data();
  p.max_blocks_per_seq = 4;
  p.query_start = query_start.data();
  p.context_lens = context_lens.data();
  p.num_seqs = 2;
  p.scale = 0.125f;
  p.max_q_len = 20;
  ASSERT_EQ(bk::prefill_attention_cpu(p), bk::Status::kOk);

  bk::PrefillParams d = p;
  d.k_cache.data = k_cache.device;
  d.v_cache.data = v_cache.device;
  d.q.data = q.device;
  d.o.data = o_gpu.device;
  d.block_tables = to_device(tables);
  d.query_start = to_device(query_start);
  d.context_lens = to_device(context_lens);
  ASSERT_EQ(bk::prefill_attention_cuda(d, nullptr), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_LT(max_abs_diff(o_gpu.download(), o_cpu), 2e-2);
}

TEST_F(CudaKernels, CascadeMatchesCpuReference) {
  HalfBuffer k_cache(kBlocks * kBlockSize * kHkv * kD, 4), v_cache(kBlocks * kBlockSize * kHkv * kD, 5);
  const int64_t rows = 5;
  // Prefix 0 (40 tokens, blocks 2, 6, 11) read by rows 0..3; prefix 1 (7 tokens, block 4) by rows 1..2.
  const std::vector<int32_t> indptr = {0, 3, 4}, blocks = {2, 6, 11, 4}, lens = {40, 7}, ranges = {0, 4, 1, 3};
  const std::vector<int32_t> suffix_tables = {0, 1, 3, 5, 8}, suffix_lens = {5, 0, 16, 1, 9};
  HalfBuffer q(rows * kHq * kD, 6), o_gpu(rows * kHq * kD, 0, false);
  std::vector<uint16_t> o_cpu(rows * kHq * kD);
  std::vector<float> lse_cpu(rows * kHq);
  bk::CascadeDecodeParams p;
  p.k_cache = half_view(k_cache.host.data(), {kBlocks, kBlockSize, kHkv, kD});
  p.v_cache = half_view(v_cache.host.data(), {kBlocks, kBlockSize, kHkv, kD});
  p.q = half_view(q.host.data(), {rows, kHq, kD});
  p.o = half_view(o_cpu.data(), {rows, kHq, kD});
  p.lse = lse_cpu.data();
  p.scale = 0.125f;
  p.levels = {2, indptr.data(), blocks.data(), lens.data(), ranges.data(), suffix_tables.data(), 1,
              suffix_lens.data(), 40, 4, 16};
  ASSERT_EQ(bk::cascade_decode_attention_cpu(p), bk::Status::kOk);

  bk::CascadeDecodeParams d = p;
  d.k_cache.data = k_cache.device;
  d.v_cache.data = v_cache.device;
  d.q.data = q.device;
  d.o.data = o_gpu.device;
  d.levels.prefix_kv_indptr = to_device(indptr);
  d.levels.prefix_kv_blocks = to_device(blocks);
  d.levels.prefix_kv_lens = to_device(lens);
  d.levels.prefix_q_range = to_device(ranges);
  d.levels.suffix_block_tables = to_device(suffix_tables);
  d.levels.suffix_kv_lens = to_device(suffix_lens);
  std::vector<float> lse_gpu(rows * kHq, NAN);
  d.lse = to_device(lse_gpu);
  d.workspace = to_device(std::vector<float>(bk::cascade_workspace_floats(rows, kHq, kHkv, kD, p.levels), NAN));
  ASSERT_EQ(bk::cascade_decode_attention_cuda(d, nullptr), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_LT(max_abs_diff(o_gpu.download(), o_cpu), 2e-2);
  ASSERT_EQ(cudaMemcpy(lse_gpu.data(), d.lse, lse_gpu.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  for (size_t i = 0; i < lse_gpu.size(); ++i) EXPECT_NEAR(lse_gpu[i], lse_cpu[i], 1e-2) << "state " << i;
}

#else

TEST(CudaKernels, NotBuilt) { GTEST_SKIP() << "built without CUDA"; }

#endif  // BATCHLLM_WITH_CUDA
