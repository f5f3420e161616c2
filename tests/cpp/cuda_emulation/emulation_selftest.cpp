// The CPU emulation of CUDA itself: what it must run like the device, and what it must refuse or catch.
// (Named so that the tests/cpp/test_*.cpp glob, which builds against the real toolkit, skips it.)
#include <gtest/gtest.h>

#include <cuda_runtime.h>
#include <mma.h>

#include <vector>

#include "cuda_emulation.h"
#include "kernels/cuda/cuda_common.cuh"  // BATCHLLM_LAUNCH, BATCHLLM_DYNAMIC_SHARED_MEMORY
#include "kernels/cuda/mma_sync.cuh"
#include "kernels/cuda/wgmma.cuh"

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

__global__ void fill_kernel(float* out, float value) { out[threadIdx.x] = value; }

TEST(CudaEmulation, SideStreamWorkRunsOnlyAtItsJoin) {
  // A created stream's launches wait in its queue until another stream waits on an event recorded
  // after them (or a synchronize): a launcher that forgets the join reads results not there yet.
  cudaStream_t side = nullptr;
  cudaEvent_t first = nullptr, second = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking), cudaSuccess);
  ASSERT_EQ(cudaEventCreateWithFlags(&first, cudaEventDisableTiming), cudaSuccess);
  ASSERT_EQ(cudaEventCreateWithFlags(&second, cudaEventDisableTiming), cudaSuccess);
  std::vector<float> out(32, 0.0f);
  BATCHLLM_LAUNCH(1, 32, 0, side, fill_kernel)(out.data(), 1.0f);
  ASSERT_EQ(cudaEventRecord(first, side), cudaSuccess);
  BATCHLLM_LAUNCH(1, 32, 0, side, fill_kernel)(out.data(), 2.0f);
  ASSERT_EQ(cudaEventRecord(second, side), cudaSuccess);
  EXPECT_EQ(out[0], 0.0f);  // nothing has waited yet
  ASSERT_EQ(cudaStreamWaitEvent(nullptr, first, 0), cudaSuccess);
  EXPECT_EQ(out[0], 1.0f);  // the work before `first`, not the work after it
  BATCHLLM_LAUNCH(1, 32, 0, nullptr, fill_kernel)(out.data(), 3.0f);  // the default stream runs at once
  EXPECT_EQ(out[31], 3.0f);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(out[0], 2.0f);  // the rest at the synchronize
  EXPECT_EQ(cudaEventDestroy(first), cudaSuccess);
  EXPECT_EQ(cudaEventDestroy(second), cudaSuccess);
  EXPECT_EQ(cudaStreamDestroy(side), cudaSuccess);
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

TEST(CudaEmulation, OccupancyQueryCountsThreadsAndSharedMemoryOrWhatATestSets) {
  int ctas = -1;
  // 2,048 threads and 228 KB an SM (1 KB of it reserved a CTA): 256 threads and 64 KB -> 3 CTAs.
  ASSERT_EQ(cudaFuncSetAttribute(noop_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024), cudaSuccess);
  ASSERT_EQ(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, noop_kernel, 256, 64 * 1024), cudaSuccess);
  EXPECT_EQ(ctas, 3);
  ASSERT_EQ(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, noop_kernel, 1024, 0), cudaSuccess);
  EXPECT_EQ(ctas, 2);
  // Above the kernel's shared memory attribute: no CTA fits (the launch would fail).
  ASSERT_EQ(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, noop_kernel, 128, 120 * 1024), cudaSuccess);
  EXPECT_EQ(ctas, 0);
  batchllm_emulation::set_occupancy(1);  // what a kernel's registers would allow on a device
  ASSERT_EQ(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, noop_kernel, 256, 64 * 1024), cudaSuccess);
  EXPECT_EQ(ctas, 1);
  batchllm_emulation::set_occupancy(0);
  EXPECT_EQ(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, noop_kernel, 0, 0), cudaErrorInvalidValue);
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

/// C = A B (16 x 16 times 16 x 8) through mma_m16n8k16 with fragments built from the layout that
/// mma_sync.cuh documents: A from registers, B through ldmatrix.trans of B stored k-major in shared
/// memory (as the attention kernel stores V).
__global__ void mma_layout_kernel(const __half* a, const __half* b, float* c) {
  using namespace batchllm::kernels::cuda;
  BATCHLLM_DYNAMIC_SHARED_MEMORY(smem);
  __half* b_smem = reinterpret_cast<__half*>(smem);  // [16 k][8 n], rows of 8 elements (16 bytes)
  for (int i = threadIdx.x; i < 128; i += 32) b_smem[i] = b[i];
  __syncwarp();
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const uint32_t frag_a[4] = {pack2(a + g * 16 + 2 * t, a + g * 16 + 2 * t + 1),
                              pack2(a + (g + 8) * 16 + 2 * t, a + (g + 8) * 16 + 2 * t + 1),
                              pack2(a + g * 16 + 2 * t + 8, a + g * 16 + 2 * t + 9),
                              pack2(a + (g + 8) * 16 + 2 * t + 8, a + (g + 8) * 16 + 2 * t + 9)};
  uint32_t r[4];
  ldmatrix_x4<true>(r, b_smem + (lane % 16) * 8);  // matrices 2, 3 repeat 0, 1
  const uint32_t frag_b[2] = {r[0], r[1]};
  float d[4] = {0, 0, 0, 0};
  mma_m16n8k16<__half>(d, frag_a, frag_b);
  c[g * 8 + 2 * t] = d[0];
  c[g * 8 + 2 * t + 1] = d[1];
  c[(g + 8) * 8 + 2 * t] = d[2];
  c[(g + 8) * 8 + 2 * t + 1] = d[3];
}

TEST(CudaEmulation, MmaFragmentsFollowThePtxLayout) {
  std::vector<__half> a(256), b(128);
  std::vector<float> c(128, NAN);
  for (int i = 0; i < 256; ++i) a[i] = __float2half_rn(static_cast<float>((i * 7) % 13 - 6) / 4);
  for (int i = 0; i < 128; ++i) b[i] = __float2half_rn(static_cast<float>((i * 5) % 11 - 5) / 4);
  BATCHLLM_LAUNCH(1, 32, 256, nullptr, mma_layout_kernel)(a.data(), b.data(), c.data());
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 8; ++j) {
      float want = 0;
      for (int k = 0; k < 16; ++k) want += __half2float(a[i * 16 + k]) * __half2float(b[k * 8 + j]);
      EXPECT_FLOAT_EQ(c[i * 8 + j], want) << i << "," << j;
    }
  }
}

/// Writes a warp's m64n64 accumulators (its 16 rows, the mma.m16n8k16 C layout per 8 columns) into
/// the row-major 64 x 64 `c`.
void store_accumulators(const float (&d)[8][4], float* c) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int r0 = 16 * warp + g, r1 = r0 + 8;
  for (int i = 0; i < 8; ++i) {
    c[r0 * 64 + 8 * i + 2 * t] = d[i][0];
    c[r0 * 64 + 8 * i + 2 * t + 1] = d[i][1];
    c[r1 * 64 + 8 * i + 2 * t] = d[i][2];
    c[r1 * 64 + 8 * i + 2 * t + 1] = d[i][3];
  }
}

/// c = a (64 x 16) b (16 x 64), and no accumulator changed before the wait (`before`).
void expect_product(const std::vector<__half>& a, const std::vector<__half>& b, const std::vector<float>& c,
                    const std::vector<float>& before) {
  for (int i = 0; i < 128; ++i) EXPECT_EQ(before[i], 0.0f);
  for (int i = 0; i < 64; ++i) {
    for (int j = 0; j < 64; ++j) {
      float want = 0;
      for (int k = 0; k < 16; ++k) want += __half2float(a[i * 16 + k]) * __half2float(b[k * 64 + j]);
      EXPECT_FLOAT_EQ(c[i * 64 + j], want) << i << "," << j;
    }
  }
}

/// C = A B (64 x 16 times 16 x 64) by one warpgroup through wgmma_m64k16, B placed in shared memory
/// straight from the PTX ISA's canonical no-swizzle layouts, with gaps between the core matrices so
/// that LBO and SBO both matter: K-major, core matrix (n / 8, k / 8) at (n / 8) SBO + (k / 8) LBO
/// holding row n % 8 at 16 (n % 8) bytes; N-major, core matrix (k / 8, n / 8) at (k / 8) LBO +
/// (n / 8) SBO holding row k % 8 at 16 (k % 8) bytes. `before`: an accumulator read before the wait.
template <bool kTransB>
__global__ void wgmma_layout_kernel(const __half* a, const __half* b, float* c, float* before) {
  using namespace batchllm::kernels::cuda;
  BATCHLLM_DYNAMIC_SHARED_MEMORY(smem);
  const uint32_t lbo = kTransB ? 8 * 128 + 64 : 128, sbo = kTransB ? 128 : 2 * 128 + 64;
  for (int i = threadIdx.x; i < 16 * 64; i += blockDim.x) {
    const int k = i / 64, n = i % 64;
    const size_t offset = kTransB ? (k / 8) * lbo + (n / 8) * sbo + (k % 8) * 16 + (n % 8) * 2
                                  : (n / 8) * sbo + (k / 8) * lbo + (n % 8) * 16 + (k % 8) * 2;
    std::memcpy(smem + offset, &b[i], 2);
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int r0 = 16 * warp + g, r1 = r0 + 8;
  const uint32_t frag_a[4] = {pack2(a + r0 * 16 + 2 * t, a + r0 * 16 + 2 * t + 1),
                              pack2(a + r1 * 16 + 2 * t, a + r1 * 16 + 2 * t + 1),
                              pack2(a + r0 * 16 + 2 * t + 8, a + r0 * 16 + 2 * t + 9),
                              pack2(a + r1 * 16 + 2 * t + 8, a + r1 * 16 + 2 * t + 9)};
  float d[8][4] = {};
  wgmma_fence();
  wgmma_m64k16<__half, 64, kTransB>(d, frag_a, wgmma_descriptor(smem, lbo, sbo));
  wgmma_commit();
  before[threadIdx.x] = d[0][0];
  wgmma_wait<0>();
  store_accumulators(d, c);
}

TEST(CudaEmulation, WgmmaReadsTheCanonicalLayoutsAndLandsAtTheWait) {
  std::vector<__half> a(64 * 16), b(16 * 64);
  for (int i = 0; i < 64 * 16; ++i) a[i] = __float2half_rn(static_cast<float>((i * 7) % 13 - 6) / 4);
  for (int i = 0; i < 16 * 64; ++i) b[i] = __float2half_rn(static_cast<float>((i * 5) % 11 - 5) / 4);
  for (bool trans : {false, true}) {
    SCOPED_TRACE(trans ? "N-major B" : "K-major B");
    std::vector<float> c(64 * 64, NAN), before(128, NAN);
    if (trans) {
      BATCHLLM_LAUNCH(1, 128, 4096, nullptr, wgmma_layout_kernel<true>)(a.data(), b.data(), c.data(), before.data());
    } else {
      BATCHLLM_LAUNCH(1, 128, 4096, nullptr, wgmma_layout_kernel<false>)(a.data(), b.data(), c.data(), before.data());
    }
    ASSERT_EQ(cudaGetLastError(), cudaSuccess);
    expect_product(a, b, c, before);
  }
}

/// C = A B as above with A in shared memory too (wgmma_m64k16_ss): K-major, core matrix (m / 8, k / 8)
/// at (m / 8) SBO + (k / 8) LBO with gaps, B K-major after it. Warp w computes rows 16 w .. + 15.
__global__ void wgmma_ss_layout_kernel(const __half* a, const __half* b, float* c, float* before) {
  using namespace batchllm::kernels::cuda;
  BATCHLLM_DYNAMIC_SHARED_MEMORY(smem);
  const uint32_t a_lbo = 8 * 128 + 32, a_sbo = 128 + 16, b_lbo = 128, b_sbo = 2 * 128 + 64;
  unsigned char* b_smem = smem + 8192;
  for (int i = threadIdx.x; i < 64 * 16; i += blockDim.x) {
    const int m = i / 16, k = i % 16;
    std::memcpy(smem + (m / 8) * a_sbo + (k / 8) * a_lbo + (m % 8) * 16 + (k % 8) * 2, &a[i], 2);
  }
  for (int i = threadIdx.x; i < 16 * 64; i += blockDim.x) {
    const int k = i / 64, n = i % 64;
    std::memcpy(b_smem + (n / 8) * b_sbo + (k / 8) * b_lbo + (n % 8) * 16 + (k % 8) * 2, &b[i], 2);
  }
  __syncthreads();
  float d[8][4] = {};
  wgmma_fence();
  wgmma_m64k16_ss<__half, 64, false>(d, wgmma_descriptor(smem, a_lbo, a_sbo), wgmma_descriptor(b_smem, b_lbo, b_sbo));
  wgmma_commit();
  before[threadIdx.x] = d[0][0];
  wgmma_wait<0>();
  store_accumulators(d, c);
}

TEST(CudaEmulation, WgmmaWithAInSharedMemoryReadsItsDescriptorAtTheWait) {
  std::vector<__half> a(64 * 16), b(16 * 64);
  for (int i = 0; i < 64 * 16; ++i) a[i] = __float2half_rn(static_cast<float>((i * 7) % 13 - 6) / 4);
  for (int i = 0; i < 16 * 64; ++i) b[i] = __float2half_rn(static_cast<float>((i * 5) % 11 - 5) / 4);
  std::vector<float> c(64 * 64, NAN), before(128, NAN);
  BATCHLLM_LAUNCH(1, 128, 16384, nullptr, wgmma_ss_layout_kernel)(a.data(), b.data(), c.data(), before.data());
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  expect_product(a, b, c, before);
}

/// Each thread copies 16 bytes by cp.async and reads them back before and after waiting.
__global__ void cp_async_kernel(const uint4* src, unsigned* before, unsigned* after) {
  BATCHLLM_DYNAMIC_SHARED_MEMORY(smem);
  uint4* dst = reinterpret_cast<uint4*>(smem);
  dst[threadIdx.x] = make_uint4(0, 0, 0, 0);
  batchllm::kernels::cuda::cp_async_16(&dst[threadIdx.x], &src[threadIdx.x], true);
  batchllm::kernels::cuda::cp_async_commit();
  before[threadIdx.x] = dst[threadIdx.x].x;
  batchllm::kernels::cuda::cp_async_wait<0>();
  after[threadIdx.x] = dst[threadIdx.x].x;
}

TEST(CudaEmulation, AsyncCopiesLandAtTheWaitOrAtOnceByOrder) {
  std::vector<uint4> src(32);
  for (unsigned i = 0; i < 32; ++i) src[i] = make_uint4(i + 1, 0, 0, 0);
  for (Order order : {Order::kForward, Order::kReverse}) {
    batchllm_emulation::set_order(order);
    std::vector<unsigned> before(32), after(32);
    BATCHLLM_LAUNCH(1, 32, 512, nullptr, cp_async_kernel)(src.data(), before.data(), after.data());
    ASSERT_EQ(cudaGetLastError(), cudaSuccess);
    for (unsigned i = 0; i < 32; ++i) {
      EXPECT_EQ(after[i], i + 1);
      EXPECT_EQ(before[i], order == Order::kForward ? 0u : i + 1);  // lazy vs eager landing
    }
  }
  batchllm_emulation::set_order(Order::kForward);
}

}  // namespace
