// CUDA on the CPU, for testing the project's CUDA kernels where there is no GPU (CI).
//
// The kernel sources (csrc/kernels/cuda/*.cu) compile unchanged as C++ against this header, which the
// fake <cuda_runtime.h>, <cuda_fp16.h>, <cuda_bf16.h> and <mma.h> beside it pull in. A launch runs
// every CTA of the grid, one after the other; the threads of a CTA are fibers on one OS thread that
// switch only at __syncthreads, __syncwarp and warp shuffles. So the emulation is deterministic, and
// it checks what a real launch would reject or corrupt silently:
//   - launch configuration: block size, grid y/z limits, dynamic shared memory above 48 KB without
//     cudaFuncSetAttribute, above the device's opt-in maximum (227 KB) -> the launch's error;
//   - a barrier some threads of the CTA (or warp) never reach -> cudaErrorLaunchFailure, not a hang;
//   - WMMA pointers not 32-byte aligned, leading dimensions not a multiple of 16 bytes -> failure;
//   - reads or writes past the end of cudaMalloc'd memory or of the dynamic shared memory hit a guard
//     page (the test process dies with SIGSEGV: a memcheck of sorts);
//   - missing barriers: Order::kReverse / kShuffled run the threads between two barriers in another
//     order, so a thread that reads what another writes without a barrier between sees stale data;
//   - CTAs that write the same output (a race on the device): the CTAs run in the same order
//     (forward, reverse, shuffled), so the wrong write lands last in some order.
// What it does not model: timing, memory ordering between CTAs, warp divergence rules, tensor-core
// rounding (fragments are float math on the 16-bit inputs, which is what the hardware computes up to
// accumulation order).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#include "kernels/cpu/cpu_common.h"

#define BATCHLLM_CUDA_EMULATION_ACTIVE 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __restrict__
// Static shared arrays: one variable for all the threads of the CTA, which is right because CTAs run
// one at a time. (Unlike dynamic shared memory they are not poisoned between CTAs.)
#define __shared__ static

// ---- vector and index types ---------------------------------------------------------------------------
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// The running thread's coordinates: the scheduler sets them before it resumes a fiber.
extern dim3 threadIdx, blockIdx, blockDim, gridDim;

template <typename A, typename B>
inline auto min(A a, B b) -> std::common_type_t<A, B> {
  return a < b ? a : b;
}
template <typename A, typename B>
inline auto max(A a, B b) -> std::common_type_t<A, B> {
  return a < b ? b : a;
}

// ---- 16-bit float types (bit patterns; conversions round to nearest even, as the device's _rn) -------
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half x) { return batchllm::kernels::cpu::half_to_float(x.bits); }
inline __half __float2half_rn(float x) { return {batchllm::kernels::cpu::float_to_half(x)}; }
inline float __bfloat162float(__nv_bfloat16 x) { return batchllm::kernels::cpu::bf16_to_float(x.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return {batchllm::kernels::cpu::float_to_bf16(x)}; }

// ---- runtime API (the subset the kernels, launchers and tests use; values as in CUDA) ------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNoDevice = 100,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
struct CUevent_st;
typedef CUevent_st* cudaEvent_t;
constexpr unsigned cudaStreamNonBlocking = 1;
constexpr unsigned cudaEventDisableTiming = 2;
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1 };
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaMalloc(void** ptr, size_t bytes);
cudaError_t cudaFree(void* ptr);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemset(void* ptr, int value, size_t bytes);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
// Streams (streams.cpp). Work on the default stream and on streams this API did not create (a torch
// stream handle) runs at once; work on a created stream is queued and runs only when another stream
// waits on an event recorded after it, or at a synchronize: so a launcher that forgets to join a side
// stream reads results that are not there yet, as it could on a device.
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t event);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream = nullptr);
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned flags = 0);

namespace batchllm_emulation {

/// In which order the threads of a CTA run between two barriers.
enum class Order { kForward, kReverse, kShuffled };
void set_order(Order order, unsigned seed = 0);
/// The multiprocessor count cudaDeviceGetAttribute reports (132, an H100 SXM, unless set).
void set_multiprocessor_count(int count);
/// The CTAs an SM that cudaOccupancyMaxActiveBlocksPerMultiprocessor reports for every kernel (the
/// emulation knows no register counts); 0 (default): from the threads and dynamic shared memory alone.
void set_occupancy(int ctas);
/// Clears a launch failure (sticky on the device until the context is reset, and so here).
void reset_device();
/// Launches run so far (a test can check that a launcher launched what it should).
int64_t launch_count();

cudaError_t set_function_attribute(const void* kernel, cudaFuncAttribute attr, int value);
cudaError_t occupancy(const void* kernel, int block_size, size_t dynamic_smem, int* ctas);
/// Runs `body` as every thread of every CTA of the grid; returns the launch's error.
cudaError_t run_kernel(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem,
                       const std::function<void()>& body);
unsigned char* dynamic_shared_memory();
void block_barrier();
void warp_barrier();
/// Reports a device-side fault (bad WMMA pointer...): the launch fails with cudaErrorLaunchFailure.
[[noreturn]] void device_fault(const char* what);
/// The calling lane's slot of its warp's shuffle buffer of this round, and the buffer itself.
uint64_t* shuffle_slots();
/// mma.sync.aligned.m16n8k16.row.col.f32.{bf16|f16}: warp-collective, d += a * b with the PTX ISA's
/// fragment layout (csrc/kernels/cuda/mma_sync.cuh); each lane's registers, like the device's.
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16);
/// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16 (csrc/kernels/cuda/mma_sync.cuh), warp-collective.
void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans);
/// cp.async.cg.shared.global of 16 bytes (zero-filled when !valid), commit_group and wait_group.
/// In forward and shuffled order the bytes land only when the issuing thread waits for their group
/// (a read before the wait, or before the barrier after it, sees the old contents); in reverse order
/// they land at the issue (a copy into a buffer another warp still reads corrupts it).
void cp_async_16(void* smem_dst, const void* global_src, bool valid);
void cp_async_commit();
void cp_async_wait(int pending_groups_allowed);

/// wgmma.mma_async.sync.aligned.m64nNk16.f32.{bf16|f16} with A in registers and B in shared memory
/// (csrc/kernels/cuda/wgmma.cuh), no swizzle: each warp's 16 rows depend only on its own A rows, so
/// the call is warp-collective here (the device's warpgroup only adds that all four warps issue it).
/// Asynchronous as on the device: the product is added to `d` (n / 2 floats, the accumulator layout)
/// only at wgmma_wait, from the shared memory as it is then: an accumulator read before the wait, or
/// a B tile overwritten before it, shows. A descriptor with a swizzle mode or pointing past the
/// dynamic shared memory faults.
void wgmma_m64k16(float* d, int n, const uint32_t (&a)[4], uint64_t desc_b, bool trans_b, bool bf16);
/// The same with A (64 x 16, K-major, no swizzle) in shared memory too, through `desc_a` (LBO along K,
/// SBO along M); warp w of the warpgroup takes rows 16 (w % 4) .. + 15, read at the wait as B is.
void wgmma_m64k16_ss(float* d, int n, uint64_t desc_a, uint64_t desc_b, bool trans_b, bool bf16);
void wgmma_commit();
void wgmma_wait(int pending_groups_allowed);

/// Queues `work` when `stream` is one that cudaStreamCreateWithFlags made (streams.cpp); false: run it now.
bool defer_to_stream(cudaStream_t stream, std::function<void()> work);
/// Runs every queued launch of every created stream (a device synchronize).
void flush_streams();

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;

  // The parameter space every architecture takes (Hopper with CUDA 12.1+ takes 32 KB; 4 KB is the rule
  // that keeps a kernel portable). A kernel over it fails to compile here as it would for sm_80.
  static_assert((sizeof(std::decay_t<P>) + ... + 0) <= 4096, "kernel parameters over 4 KB");

  template <typename... A>
  void operator()(A&&... args) const {
    auto params = std::make_shared<std::tuple<std::decay_t<P>...>>(std::forward<A>(args)...);
    auto run = [kernel = kernel, grid = grid, block = block, smem = smem, params] {
      run_kernel(reinterpret_cast<const void*>(kernel), grid, block, smem, [&] { std::apply(kernel, *params); });
    };
    if (!defer_to_stream(stream, run)) run();
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream) {
  return {kernel, grid, block, smem, stream};
}

}  // namespace batchllm_emulation

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  return batchllm_emulation::set_function_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}

template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* ctas, Kernel* kernel, int block_size,
                                                          size_t dynamic_smem) {
  return batchllm_emulation::occupancy(reinterpret_cast<const void*>(kernel), block_size, dynamic_smem, ctas);
}

// ---- synchronisation and warp primitives ----------------------------------------------------------------
inline void __syncthreads() { batchllm_emulation::block_barrier(); }
inline void __syncwarp(unsigned /*mask*/ = 0xffffffffu) { batchllm_emulation::warp_barrier(); }

namespace batchllm_emulation {
/// A warp shuffle: every lane posts `value`, then reads the value of lane source(lane).
template <typename T, typename Source>
T shuffle(T value, Source source) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shuffle of a register value");
  uint64_t* slots = shuffle_slots();
  const int lane = static_cast<int>(threadIdx.x % 32);
  uint64_t mine = 0;
  std::memcpy(&mine, &value, sizeof(T));
  slots[lane] = mine;
  warp_barrier();
  T out;
  std::memcpy(&out, &slots[source(lane)], sizeof(T));
  return out;
}
}  // namespace batchllm_emulation

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask, int width = 32) {
  return batchllm_emulation::shuffle(value, [=](int lane) { return (lane ^ lane_mask) < width ? lane ^ lane_mask : lane; });
}

template <typename T>
T __shfl_sync(unsigned /*mask*/, T value, int source_lane, int width = 32) {
  return batchllm_emulation::shuffle(value, [=](int lane) { return (lane / width) * width + source_lane % width; });
}

/// The high 32 bits of the 64-bit product of two unsigned 32-bit values.
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}

/// Threads of a CTA run one at a time, so an atomic is a plain read-modify-write.
inline int atomicAdd(int* address, int value) {
  const int old = *address;
  *address = old + value;
  return old;
}

// ---- WMMA ------------------------------------------------------------------------------------------------
// A fragment stores the whole tile in every lane, but a lane owns only the accumulator elements
// e % 32 == lane, as on the device each lane holds its share: mma_sync computes, and store_matrix_sync
// writes, only the calling lane's elements, so a warp does one tile's work and a lane that reads
// what another lane stored needs the __syncwarp the device needs. (Which elements a lane owns differs
// from the hardware's layout; the kernels never depend on it.) Loads and stores are warp-collective
// on the device, so each starts with a warp barrier: no lane overwrites a tile before every lane has
// loaded it.
namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int kRows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int kCols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = kRows * kCols;
  float x[num_elements];  // 16-bit inputs converted once, at load
};

namespace detail {
template <typename T>
float as_float(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}
template <typename T>
void begin_collective(const T* ptr, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) batchllm_emulation::device_fault("WMMA pointer not 32-byte aligned");
  if ((ldm * sizeof(T)) % 16 != 0) batchllm_emulation::device_fault("WMMA ldm not a multiple of 16 bytes");
  batchllm_emulation::warp_barrier();
}
inline int lane() { return static_cast<int>(threadIdx.x % 32); }
}  // namespace detail

template <typename Frag, typename T>
void fill_fragment(Frag& frag, T value) {
  for (auto& x : frag.x) x = value;
}

/// matrix_a / matrix_b: the fragment's layout decides how memory is read.
template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& frag, const T* ptr, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  detail::begin_collective(ptr, ldm);
  for (int i = 0; i < F::kRows; ++i)
    for (int j = 0; j < F::kCols; ++j)
      frag.x[i * F::kCols + j] = detail::as_float(std::is_same_v<Layout, col_major> ? ptr[i + j * ldm] : ptr[i * ldm + j]);
}

/// accumulator: the memory layout is an argument; the lane's own elements.
template <int M, int N, int K, typename T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& frag, const T* ptr, unsigned ldm, layout_t layout) {
  detail::begin_collective(ptr, ldm);
  for (int e = detail::lane(); e < M * N; e += 32) {
    const int i = e / N, j = e % N;
    frag.x[e] = layout == mem_col_major ? ptr[i + j * ldm] : ptr[i * ldm + j];
  }
}

template <int M, int N, int K, typename T>
void store_matrix_sync(T* ptr, const fragment<accumulator, M, N, K, T>& frag, unsigned ldm, layout_t layout) {
  detail::begin_collective(ptr, ldm);
  for (int e = detail::lane(); e < M * N; e += 32) {
    const int i = e / N, j = e % N;
    (layout == mem_col_major ? ptr[i + j * ldm] : ptr[i * ldm + j]) = frag.x[e];
  }
}

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  for (int e = detail::lane(); e < M * N; e += 32) {
    const int i = e / N, j = e % N;
    float sum = c.x[e];
    for (int k = 0; k < K; ++k) sum += a.x[i * K + k] * b.x[k * N + j];
    d.x[e] = sum;
  }
}

}  // namespace nvcuda::wmma
