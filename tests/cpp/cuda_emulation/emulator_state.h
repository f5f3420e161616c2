// The emulated device's state, shared by the launch scheduler (cuda_emulation.cpp) and the warp
// instructions (warp_instructions.cpp). Internal to the emulation.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <random>
#include <vector>

#include "cuda_emulation.h"
#include "fiber.h"

namespace batchllm_emulation {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kDefaultSmemLimit = 48 * 1024;
constexpr size_t kOptInSmemLimit = 232448;  // sm_90: 227 KB per block

enum class State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct AsyncCopy {
  void* dst;
  unsigned char bytes[16];
};

/// One lane's part of an issued wgmma.mma_async (A from registers): the warp's 16 rows of A, read at
/// the issue, and where the lane's accumulators live. B is read from shared memory at the wait.
struct WgmmaOp {
  float a[16][16];     // the warp's 16 rows of A: from its registers at the issue, or (a_in_smem) at the wait
  bool a_in_smem = false;
  uint64_t desc_a = 0;  // a_in_smem: the warpgroup's 64 x 16 K-major A
  int a_row0 = 0;       // a_in_smem: the warp's first row of the 64
  uint64_t desc_b;
  int n;
  bool trans_b;
  bool bf16;
  float* d;  // n / 2 floats
};

struct Fiber {
  std::vector<std::vector<AsyncCopy>> async_groups;  // committed, oldest first
  std::vector<AsyncCopy> async_open;                 // issued, not committed yet
  Context context;
  State state = State::kRunnable;
  unsigned shuffle_round = 0;
  unsigned mma_round = 0;
  std::vector<WgmmaOp> wgmma_open;                  // issued, not committed yet
  std::vector<std::vector<WgmmaOp>> wgmma_groups;   // committed, oldest first
};

/// Memory with a PROT_NONE page right after its last byte (and the mapping's bookkeeping).
struct Guarded {
  void* base = nullptr;
  size_t mapped = 0;
  unsigned char* user = nullptr;
};

/// `bytes` (rounded up to `alignment`) ending right before a PROT_NONE page; {} when mmap fails.
Guarded map_guarded(size_t bytes, size_t alignment);

struct Emulator {
  cudaError_t last_error = cudaSuccess;
  cudaError_t sticky_error = cudaSuccess;
  Order order = Order::kForward;
  std::mt19937 rng{0};
  int multiprocessors = 132;
  int occupancy = 0;  // CTAs an SM the occupancy query reports; 0: from threads and shared memory
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

/// The process's one emulated device.
Emulator& emu();

}  // namespace batchllm_emulation
