// The CPU emulation of CUDA itself: what it must run like the device, and what it must refuse or catch.
// (Named so that the tests/cpp/test_*.cpp glob, which builds against the real toolkit, skips it.)
#include <gtest/gtest.h>

#include <cuda_runtime.h>
#include <mma.h>

#include <vector>

#include "cuda_emulation.h"
#include "kernels/cuda/cuda_common.cuh"  // BATCHLLM_LAUNCH, BATCHLLM_DYNAMIC_SHARED_MEMORY

namespace {

using batchllm_emulation::Order;

__global__ void xor_sum_kernel(const float* in, float* out) {
  float v = in[threadIdx.x];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  out[threadIdx.x] = v;
}

TEST(CudaEmulation, WarpShuffleReducesWithinEachWarp) {
  std::vector<float> in(64), out(64, -1);
  for (int i = 0; i < 64; ++i) in[i] = static_cast<float>(i);
  BATCHLLM_LAUNCH(1, 64, 0, nullptr, xor_sum_kernel)(in.data(), out.data());
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  for (int i = 0; i < 32; ++i) EXPECT_EQ(out[i], 496.0f);          // 0 + ... + 31
  for (int i = 32; i < 64; ++i) EXPECT_EQ(out[i], 496.0f + 1024);  // 32 + ... + 63
}

/// Thread t writes slot t, then (with or without a barrier) reads the slot of the thread 32 ahead.
template <bool kBarrier>
__global__ void neighbour_kernel(float* out) {
  BATCHLLM_DYNAMIC_SHARED_MEMORY(smem);
  float* slots = reinterpret_cast<float*>(smem);
  slots[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (kBarrier) __syncthreads();
  out[threadIdx.x] = slots[(threadIdx.x + 32) % blockDim.x];
}

TEST(CudaEmulation, MissingBarrierReadsStaleSharedMemory) {
  for (Order order : {Order::kForward, Order::kReverse}) {
    batchllm_emulation::set_order(order);
    std::vector<float> with(128), without(128);
    BATCHLLM_LAUNCH(1, 128, 512, nullptr, neighbour_kernel<true>)(with.data());
    BATCHLLM_LAUNCH(1, 128, 512, nullptr, neighbour_kernel<false>)(without.data());
    ASSERT_EQ(cudaGetLastError(), cudaSuccess);
    int stale = 0;
    for (int t = 0; t < 128; ++t) {
      EXPECT_EQ(with[t], static_cast<float>((t + 32) % 128));
      stale += without[t] != static_cast<float>((t + 32) % 128);
    }
    EXPECT_GT(stale, 0) << "a warp ran ahead of a missing barrier and still read the right values";
  }
  batchllm_emulation::set_order(Order::kForward);
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncwarp();
  }
  out[threadIdx.x] = 1;
}

__global__ void noop_kernel(int* out) { out[blockIdx.y] = 1; }

TEST(CudaEmulation, RejectsWhatTheDeviceRejects) {
  std::vector<int> out(128);
  // Lanes of one warp at different barriers: a launch failure, reported, never a hang.
  BATCHLLM_LAUNCH(1, 64, 0, nullptr, divergent_barrier_kernel)(out.data());
  EXPECT_EQ(cudaGetLastError(), cudaErrorLaunchFailure);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaErrorLaunchFailure);  // sticky, as on the device
  batchllm_emulation::reset_device();
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  // Configuration errors: not sticky.
  BATCHLLM_LAUNCH(dim3(1, 70000), 32, 0, nullptr, noop_kernel)(out.data());
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  BATCHLLM_LAUNCH(1, 2048, 0, nullptr, noop_kernel)(out.data());
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  // Dynamic shared memory above 48 KB needs the kernel's attribute first, and at most 227 KB.
  BATCHLLM_LAUNCH(1, 32, 64 * 1024, nullptr, noop_kernel)(out.data());
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  EXPECT_EQ(cudaFuncSetAttribute(noop_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 300 * 1024),
            cudaErrorInvalidValue);
  ASSERT_EQ(cudaFuncSetAttribute(noop_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024), cudaSuccess);
  BATCHLLM_LAUNCH(1, 32, 64 * 1024, nullptr, noop_kernel)(out.data());
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(out[0], 1);
}

/// One warp: C = A B for 16x16 tiles through WMMA, A row-major, B column-major.
__global__ void wmma_kernel(const __half* a, const __half* b, float* c, bool misaligned) {
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a_frag;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b_frag;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c_frag;
  wmma::fill_fragment(c_frag, 1.0f);
  wmma::load_matrix_sync(a_frag, a + (misaligned ? 8 : 0), 16);
  wmma::load_matrix_sync(b_frag, b, 16);
  wmma::mma_sync(c_frag, a_frag, b_frag, c_frag);
  wmma::store_matrix_sync(c, c_frag, 16, wmma::mem_row_major);
}

TEST(CudaEmulation, WmmaComputesTheTileProductAndChecksAlignment) {
  __half* a = nullptr;
  __half* b = nullptr;
  float* c = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&a), 2 * 256 * sizeof(__half)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&b), 256 * sizeof(__half)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&c), 256 * sizeof(float)), cudaSuccess);
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      a[i * 16 + j] = __float2half_rn(static_cast<float>(i - j) / 8);
      b[i + j * 16] = __float2half_rn(static_cast<float>(i + 2 * j) / 16);  // B(i, j), column-major
    }
  }
  BATCHLLM_LAUNCH(1, 32, 0, nullptr, wmma_kernel)(a, b, c, false);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      float want = 1.0f;
      for (int k = 0; k < 16; ++k) want += (static_cast<float>(i - k) / 8) * (static_cast<float>(k + 2 * j) / 16);
      EXPECT_NEAR(c[i * 16 + j], want, 1e-4) << i << "," << j;
    }
  }
  BATCHLLM_LAUNCH(1, 32, 0, nullptr, wmma_kernel)(a, b, c, true);  // 16-byte offset: not 32-byte aligned
  EXPECT_EQ(cudaGetLastError(), cudaErrorLaunchFailure);
  batchllm_emulation::reset_device();
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
}

}  // namespace
