// The CPU emulation of CUDA launches (see cuda_emulation.h): a fiber per thread of the running CTA,
// switched at barriers; device memory is host memory with a guard page behind every allocation.
#include "cuda_emulation.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <vector>

dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace batchllm_emulation {
namespace {

// ---- fibers: a stack pointer per thread; x86-64 switches in a few instructions, others use ucontext
#if defined(__x86_64__) && defined(__linux__)
extern "C" void batchllm_emulation_switch(void** save_sp, void* load_sp);
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores the
// stack pointer in *save_sp, and resumes the context whose stack pointer is load_sp.
asm(R"(
  .text
  .globl batchllm_emulation_switch
  .type batchllm_emulation_switch, @function
batchllm_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size batchllm_emulation_switch, .-batchllm_emulation_switch
  .section .note.GNU-stack, "", @progbits
  .text
)");

struct Context {
  void* sp = nullptr;
  /// Prepares a context that starts `entry` (which never returns) on the stack [base, base + size).
  void start(char* base, size_t size, void (*entry)()) {
    auto top = reinterpret_cast<uintptr_t>(base + size) & ~uintptr_t{15};
    auto* slots = reinterpret_cast<uint64_t*>(top - 16);  // entry's return-address slot, 16-aligned
    slots[0] = reinterpret_cast<uint64_t>(entry);
    slots[1] = 0;
    uint64_t* frame = slots - 7;                          // control words + 6 callee-saved registers
    std::memset(frame, 0, 7 * sizeof(uint64_t));
    const uint32_t mxcsr = 0x1f80;
    const uint16_t fpu_control = 0x037f;
    std::memcpy(frame, &mxcsr, 4);
    std::memcpy(reinterpret_cast<char*>(frame) + 4, &fpu_control, 2);
    sp = frame;
  }
};
inline void switch_context(Context& from, Context& to) { batchllm_emulation_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
  void start(char* base, size_t size, void (*entry)()) {
    getcontext(&uc);
    uc.uc_stack.ss_sp = base;
    uc.uc_stack.ss_size = size;
    uc.uc_link = nullptr;
    makecontext(&uc, entry, 0);
  }
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kDefaultSmemLimit = 48 * 1024;
constexpr size_t kOptInSmemLimit = 232448;  // sm_90: 227 KB per block

enum class State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct AsyncCopy {
  void* dst;
  unsigned char bytes[16];
};

struct Fiber {
  std::vector<std::vector<AsyncCopy>> async_groups;  // committed, oldest first
  std::vector<AsyncCopy> async_open;                 // issued, not committed yet
  Context context;
  State state = State::kRunnable;
  unsigned shuffle_round = 0;
  unsigned mma_round = 0;
};

/// Memory with a PROT_NONE page right after its last byte (and the mapping's bookkeeping).
struct Guarded {
  void* base = nullptr;
  size_t mapped = 0;
  unsigned char* user = nullptr;
};

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

struct Emulator {
  cudaError_t last_error = cudaSuccess;
  cudaError_t sticky_error = cudaSuccess;
  Order order = Order::kForward;
  std::mt19937 rng{0};
  int multiprocessors = 132;
  int64_t launches = 0;
  std::map<const void*, int> max_dynamic_smem;
  std::map<void*, Guarded> allocations;

  // The running CTA.
  std::vector<Fiber> fibers;
  std::vector<std::vector<char>> stacks;
  std::vector<uint64_t> shuffle_buffers;  // [warp][2 rounds][32 lanes]
  std::vector<uint32_t> mma_buffers;      // [warp][2 rounds][32 lanes][6 registers]
  Context scheduler;
  int current = -1;
  const std::function<void()>* body = nullptr;
  Guarded smem;
  bool faulted = false;
  const char* fault = nullptr;

  void set_error(cudaError_t error) {
    if (last_error == cudaSuccess) last_error = error;
  }
};

Emulator& emu() {
  static Emulator instance;
  return instance;
}

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

/// Runs one CTA to completion; false when it deadlocked or faulted.
bool run_block(int num_threads) {
  Emulator& e = emu();
  const int num_warps = (num_threads + 31) / 32;
  e.fibers.assign(num_threads, Fiber{});
  if (static_cast<int>(e.stacks.size()) < num_threads) e.stacks.resize(num_threads);
  e.shuffle_buffers.assign(static_cast<size_t>(num_warps) * 64, 0);
  e.mma_buffers.assign(static_cast<size_t>(num_warps) * 2 * 32 * 6, 0);
  for (int t = 0; t < num_threads; ++t) {
    if (e.stacks[t].empty()) e.stacks[t].resize(kStackBytes);
    Fiber& f = e.fibers[t];
    f.context.start(e.stacks[t].data(), kStackBytes, fiber_entry);
  }
  // Warps run one at a time, each as far as it can: its lanes run until all of them wait, a warp barrier
  // they all reached releases them at once and the same warp goes on, until it waits at the CTA
  // barrier (or is done). So a warp races ahead of the others exactly as far as the barriers allow,
  // and a missing __syncthreads shows as one warp reading what another has not written yet.
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
      const int first = w * 32, end = std::min(num_threads, first + 32);
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
        if (!any_at_warp_barrier || any_at_block_barrier) break;  // waits at the CTA barrier (or deadlocks)
        for (int t = first; t < end; ++t) {
          if (e.fibers[t].state == State::kAtWarpBarrier) e.fibers[t].state = State::kRunnable;
        }
      }
    }
    bool all_done = true, block_ready = true;
    for (const Fiber& f : e.fibers) {
      all_done &= f.state == State::kDone;
      block_ready &= f.state == State::kDone || f.state == State::kAtBlockBarrier;
    }
    if (all_done) return true;
    if (block_ready) {
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

void set_order(Order order, unsigned seed) {
  emu().order = order;
  emu().rng.seed(seed);
}

void reset_device() {
  emu().sticky_error = cudaSuccess;
  emu().last_error = cudaSuccess;
}

void set_multiprocessor_count(int count) { emu().multiprocessors = count; }

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

uint64_t* shuffle_slots() {
  Emulator& e = emu();
  Fiber& self = e.fibers[e.current];
  const unsigned warp = threadIdx.x / 32;
  uint64_t* slots = e.shuffle_buffers.data() + (static_cast<size_t>(warp) * 2 + self.shuffle_round % 2) * 32;
  ++self.shuffle_round;
  return slots;
}

void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16) {
  Emulator& e = emu();
  Fiber& self = e.fibers[e.current];
  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  // Every lane posts its registers, then each computes its own accumulators from the whole warp's.
  // Two buffers by round, so a lane's next post never overwrites what a slower lane still reads.
  uint32_t* posts = e.mma_buffers.data() + (static_cast<size_t>(warp) * 2 + self.mma_round % 2) * 32 * 6;
  ++self.mma_round;
  for (int i = 0; i < 4; ++i) posts[lane * 6 + i] = a[i];
  for (int i = 0; i < 2; ++i) posts[lane * 6 + 4 + i] = b[i];
  warp_barrier();
  auto element = [&](uint32_t reg, int half) {
    const uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
    return bf16 ? batchllm::kernels::cpu::bf16_to_float(bits) : batchllm::kernels::cpu::half_to_float(bits);
  };
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const uint32_t* r = posts + l * 6;
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = element(r[0], h);
      A[g + 8][2 * t + h] = element(r[1], h);
      A[g][2 * t + 8 + h] = element(r[2], h);
      A[g + 8][2 * t + 8 + h] = element(r[3], h);
      B[2 * t + h][g] = element(r[4], h);
      B[2 * t + 8 + h][g] = element(r[5], h);
    }
  }
  const int g = lane / 4, t = lane % 4;
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  for (int i = 0; i < 4; ++i) {
    float sum = d[i];
    for (int k = 0; k < 16; ++k) sum += A[rows[i]][k] * B[k][cols[i]];
    d[i] = sum;
  }
}

void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  Emulator& e = emu();
  Fiber& self = e.fibers[e.current];
  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) device_fault("ldmatrix row address not 16-byte aligned");
  uint64_t* posts = e.shuffle_buffers.data() + (static_cast<size_t>(warp) * 2 + self.shuffle_round % 2) * 32;
  ++self.shuffle_round;
  posts[lane] = reinterpret_cast<uintptr_t>(row);
  warp_barrier();
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {  // row g, columns 2t and 2t + 1 of matrix i
      const auto* m_row = reinterpret_cast<const uint16_t*>(posts[8 * i + g]);
      lo = m_row[2 * t];
      hi = m_row[2 * t + 1];
    } else {       // rows 2t and 2t + 1, column g of matrix i
      lo = reinterpret_cast<const uint16_t*>(posts[8 * i + 2 * t])[g];
      hi = reinterpret_cast<const uint16_t*>(posts[8 * i + 2 * t + 1])[g];
    }
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
}

void cp_async_16(void* smem_dst, const void* global_src, bool valid) {
  Emulator& e = emu();
  if (reinterpret_cast<uintptr_t>(smem_dst) % 16 != 0 || (valid && reinterpret_cast<uintptr_t>(global_src) % 16 != 0)) {
    device_fault("cp.async of 16 bytes needs 16-byte aligned addresses");
  }
  AsyncCopy copy{smem_dst, {}};
  if (valid) std::memcpy(copy.bytes, global_src, 16);
  // The device lands a copy anywhere between the issue and the wait: at the wait in forward and
  // shuffled order (a read before the wait sees old bytes), at once in reverse order (a copy into a
  // buffer that another warp still reads corrupts what it reads).
  if (e.order == Order::kReverse) {
    std::memcpy(smem_dst, copy.bytes, 16);
    return;
  }
  e.fibers[e.current].async_open.push_back(copy);
}

void cp_async_commit() {
  Fiber& self = emu().fibers[emu().current];
  self.async_groups.push_back(std::move(self.async_open));
  self.async_open.clear();
}

void cp_async_wait(int pending_groups_allowed) {
  Fiber& self = emu().fibers[emu().current];
  while (static_cast<int>(self.async_groups.size()) > pending_groups_allowed) {
    for (const AsyncCopy& copy : self.async_groups.front()) std::memcpy(copy.dst, copy.bytes, 16);
    self.async_groups.erase(self.async_groups.begin());
  }
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

cudaError_t cudaDeviceSynchronize() { return emu().sticky_error; }

cudaError_t cudaStreamSynchronize(cudaStream_t) { return emu().sticky_error; }

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
