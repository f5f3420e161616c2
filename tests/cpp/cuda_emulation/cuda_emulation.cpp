// The CPU emulation of CUDA launches (see cuda_emulation.h): a fiber per thread of the running CTA,
// switched at barriers; device memory is host memory with a guard page behind every allocation.
#include "cuda_emulation.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "emulator_state.h"

dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace batchllm_emulation {
namespace {

void fiber_entry() {
  Emulator& e = emu();
  (*e.body)();
  e.fibers[e.current].state = State::kDone;
  switch_context(e.fibers[e.current].context, e.scheduler);
  std::abort();  // a finished fiber is never resumed
}

void yield_to_scheduler(State state) {
  Emulator& e = emu();
  Fiber& self = e.fibers[e.current];
  self.state = state;
  switch_context(self.context, e.scheduler);
}

void resume(int index) {
  Emulator& e = emu();
  e.current = index;
  const unsigned threads_x = blockDim.x, threads_y = blockDim.y;
  threadIdx = dim3(index % threads_x, (index / threads_x) % threads_y, index / (threads_x * threads_y));
  switch_context(e.scheduler, e.fibers[index].context);
}

/// Runs the lanes [first, end) of one warp as far as they go: until every lane waits at the CTA
/// barrier or is done (a warp barrier that all its live lanes reached releases them and the warp goes
/// on). Sets `progress` when a lane ran; false on a device fault.
bool run_warp(int first, int end, const std::vector<int>& lane_order, bool& progress) {
  Emulator& e = emu();
  while (true) {
    for (const int l : lane_order) {
      const int t = first + l;
      if (t >= end || e.fibers[t].state != State::kRunnable) continue;
      resume(t);
      progress = true;
      if (e.faulted) return false;
    }
    bool any_at_warp_barrier = false, any_at_block_barrier = false;
    for (int t = first; t < end; ++t) {
      any_at_warp_barrier |= e.fibers[t].state == State::kAtWarpBarrier;
      any_at_block_barrier |= e.fibers[t].state == State::kAtBlockBarrier;
    }
    if (!any_at_warp_barrier || any_at_block_barrier) return true;  // at the CTA barrier (or deadlocked)
    for (int t = first; t < end; ++t) {
      if (e.fibers[t].state == State::kAtWarpBarrier) e.fibers[t].state = State::kRunnable;
    }
  }
}

/// Fresh fibers (and warp buffers) for a CTA of `num_threads`.
void start_block(int num_threads) {
  Emulator& e = emu();
  const int num_warps = (num_threads + 31) / 32;
  e.fibers.assign(num_threads, Fiber{});
  if (static_cast<int>(e.stacks.size()) < num_threads) e.stacks.resize(num_threads);
  e.shuffle_buffers.assign(static_cast<size_t>(num_warps) * 64, 0);
  e.mma_buffers.assign(static_cast<size_t>(num_warps) * 2 * 32 * 6, 0);
  for (int t = 0; t < num_threads; ++t) {
    if (e.stacks[t].empty()) e.stacks[t].resize(kStackBytes);
    e.fibers[t].context.start(e.stacks[t].data(), kStackBytes, fiber_entry);
  }
}

/// Runs one CTA to completion; false when it deadlocked or faulted. Warps run one at a time, each as
/// far as it can (run_warp), so a warp races ahead of the others exactly as far as the barriers
/// allow, and a missing __syncthreads shows as one warp reading what another has not written yet.
bool run_block(int num_threads) {
  Emulator& e = emu();
  start_block(num_threads);
  const int num_warps = (num_threads + 31) / 32;
  std::vector<int> warp_order(num_warps), lane_order(32);
  for (int w = 0; w < num_warps; ++w) warp_order[w] = w;
  for (int l = 0; l < 32; ++l) lane_order[l] = l;
  if (e.order == Order::kReverse) {
    std::reverse(warp_order.begin(), warp_order.end());
    std::reverse(lane_order.begin(), lane_order.end());
  }
  while (true) {
    if (e.order == Order::kShuffled) {
      std::shuffle(warp_order.begin(), warp_order.end(), e.rng);
      std::shuffle(lane_order.begin(), lane_order.end(), e.rng);
    }
    bool progress = false;
    for (const int w : warp_order) {
      if (!run_warp(w * 32, std::min(num_threads, w * 32 + 32), lane_order, progress)) return false;
    }
    bool all_done = true, block_ready = true;
    for (const Fiber& f : e.fibers) {
      all_done &= f.state == State::kDone;
      block_ready &= f.state == State::kDone || f.state == State::kAtBlockBarrier;
    }
    if (all_done) return true;
    if (block_ready) {  // every live thread waits at __syncthreads: release it
      for (Fiber& f : e.fibers) {
        if (f.state == State::kAtBlockBarrier) f.state = State::kRunnable;
      }
      continue;
    }
    if (!progress) {
      e.fault = "deadlock: lanes of a warp wait at different barriers";
      return false;
    }
  }
}

}  // namespace

Guarded map_guarded(size_t bytes, size_t alignment) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t rounded = (std::max<size_t>(bytes, 1) + alignment - 1) / alignment * alignment;
  const size_t data_pages = (rounded + page - 1) / page;
  Guarded g;
  g.mapped = (data_pages + 1) * page;
  g.base = mmap(nullptr, g.mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (g.base == MAP_FAILED) return {};
  unsigned char* guard = static_cast<unsigned char*>(g.base) + data_pages * page;
  mprotect(guard, page, PROT_NONE);
  g.user = guard - rounded;
  return g;
}

Emulator& emu() {
  static Emulator instance;
  return instance;
}


void set_order(Order order, unsigned seed) {
  emu().order = order;
  emu().rng.seed(seed);
}

void reset_device() {
  emu().sticky_error = cudaSuccess;
  emu().last_error = cudaSuccess;
}

void set_multiprocessor_count(int count) { emu().multiprocessors = count; }

void set_occupancy(int ctas) { emu().occupancy = ctas; }

cudaError_t occupancy(const void* kernel, int block_size, size_t dynamic_smem, int* ctas) {
  Emulator& e = emu();
  if (ctas == nullptr || block_size <= 0 || block_size > 1024) return cudaErrorInvalidValue;
  size_t smem_limit = kDefaultSmemLimit;
  const auto attribute = e.max_dynamic_smem.find(kernel);
  if (attribute != e.max_dynamic_smem.end()) smem_limit = std::max<size_t>(smem_limit, attribute->second);
  if (dynamic_smem > smem_limit) {
    *ctas = 0;  // as the device: a launch of this size would fail
    return cudaSuccess;
  }
  if (e.occupancy > 0) {
    *ctas = e.occupancy;
    return cudaSuccess;
  }
  // An H100's SM: 2,048 threads, 32 CTAs, 228 KB of shared memory (1 KB of it reserved per CTA).
  constexpr size_t kSmemPerSm = 228 * 1024, kReservedPerCta = 1024;
  *ctas = static_cast<int>(std::min<size_t>({2048 / static_cast<size_t>(block_size), 32,
                                              kSmemPerSm / (dynamic_smem + kReservedPerCta)}));
  return cudaSuccess;
}

int64_t launch_count() { return emu().launches; }

cudaError_t set_function_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || static_cast<size_t>(value) > kOptInSmemLimit) {
    return cudaErrorInvalidValue;
  }
  emu().max_dynamic_smem[kernel] = value;
  return cudaSuccess;
}

cudaError_t run_kernel(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem,
                       const std::function<void()>& body) {
  Emulator& e = emu();
  ++e.launches;
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u) {
    e.set_error(cudaErrorInvalidConfiguration);
    return cudaErrorInvalidConfiguration;
  }
  size_t smem_limit = kDefaultSmemLimit;
  const auto attribute = e.max_dynamic_smem.find(kernel);
  if (attribute != e.max_dynamic_smem.end()) smem_limit = std::max<size_t>(smem_limit, attribute->second);
  if (dynamic_smem > smem_limit) {
    e.set_error(cudaErrorInvalidValue);
    return cudaErrorInvalidValue;
  }
  if (e.sticky_error != cudaSuccess) return e.sticky_error;

  e.smem = map_guarded(dynamic_smem, 128);
  e.body = &body;
  blockDim = block;
  gridDim = grid;
  // CTAs run one at a time, in the order of the thread schedule: forward, reverse or shuffled, so that
  // two CTAs writing the same output (a race on the device) leave a wrong value in some order.
  std::vector<dim3> blocks;
  blocks.reserve(static_cast<size_t>(grid.x) * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.emplace_back(x, y, z);
  if (e.order == Order::kReverse) std::reverse(blocks.begin(), blocks.end());
  if (e.order == Order::kShuffled) std::shuffle(blocks.begin(), blocks.end(), e.rng);
  bool ok = true;
  for (size_t i = 0; i < blocks.size() && ok; ++i) {
    blockIdx = blocks[i];
    // Shared memory starts as garbage on the device: poison it so that a read before a write shows.
    std::memset(e.smem.user, 0xff, dynamic_smem);
    ok = run_block(static_cast<int>(threads));
  }
  munmap(e.smem.base, e.smem.mapped);
  e.smem = {};
  if (!ok) {
    std::fprintf(stderr, "cuda emulation: launch failed at block (%u, %u, %u): %s\n", blockIdx.x, blockIdx.y,
                 blockIdx.z, e.fault ? e.fault : "device fault");
    e.faulted = false;
    e.fault = nullptr;
    e.sticky_error = cudaErrorLaunchFailure;
    e.set_error(cudaErrorLaunchFailure);
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

unsigned char* dynamic_shared_memory() { return emu().smem.user; }

void block_barrier() { yield_to_scheduler(State::kAtBlockBarrier); }

void warp_barrier() { yield_to_scheduler(State::kAtWarpBarrier); }

void device_fault(const char* what) {
  Emulator& e = emu();
  e.faulted = true;
  e.fault = what;
  // Never resumed: the launch is abandoned and the fiber's stack reused by the next one.
  switch_context(e.fibers[e.current].context, e.scheduler);
  std::abort();
}

}  // namespace batchllm_emulation

using batchllm_emulation::emu;

cudaError_t cudaGetLastError() {
  const cudaError_t error = emu().last_error != cudaSuccess ? emu().last_error : emu().sticky_error;
  emu().last_error = cudaSuccess;
  return error;
}

cudaError_t cudaPeekAtLastError() {
  return emu().last_error != cudaSuccess ? emu().last_error : emu().sticky_error;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  const batchllm_emulation::Guarded g = batchllm_emulation::map_guarded(bytes, 256);
  if (g.user == nullptr) return cudaErrorMemoryAllocation;
  emu().allocations[g.user] = g;
  *ptr = g.user;
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  if (ptr == nullptr) return cudaSuccess;
  const auto it = emu().allocations.find(ptr);
  if (it == emu().allocations.end()) return cudaErrorInvalidValue;
  munmap(it->second.base, it->second.mapped);
  emu().allocations.erase(it);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind /*kind*/) {
  if (emu().sticky_error != cudaSuccess) return emu().sticky_error;
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemset(void* ptr, int value, size_t bytes) {
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() {
  batchllm_emulation::flush_streams();
  return emu().sticky_error;
}

cudaError_t cudaStreamSynchronize(cudaStream_t) {
  batchllm_emulation::flush_streams();  // more than the one stream: harmless, nothing waits less
  return emu().sticky_error;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidValue; }

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = emu().multiprocessors;
  return cudaSuccess;
}
