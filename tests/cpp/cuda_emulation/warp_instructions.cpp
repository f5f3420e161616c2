// Warp-level instructions of the CUDA emulation: shuffles' exchange slots, mma.sync m16n8k16,
// ldmatrix, cp.async and wgmma (A in registers), each lane by lane as the PTX ISA specifies
// (csrc/kernels/cuda/mma_sync.cuh, wgmma.cuh).
#include <unistd.h>

#include <cstring>

#include "emulator_state.h"

namespace batchllm_emulation {

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

namespace {

/// The 16-bit element (k, n) of the B operand a no-swizzle descriptor describes (PTX ISA, "Shared
/// Memory Matrix Layout", canonical layouts with T = 8 elements of 16 bytes): K-major
/// ((8,m),(T,2k)):((T,SBO),(1,LBO)) over (n, k); N-major ((T,1,m),(8,k)):((1,T,SBO),(T,LBO)) over (n, k).
/// Core matrices of 8 x 16 bytes; LBO steps along K between them, SBO along N. A K-major A operand
/// is read the same way, its M in place of N.
float wgmma_b_element(uint64_t desc, int k, int n, bool trans_b, bool bf16) {
  const size_t start = (desc & 0x3fffu) << 4, lbo = ((desc >> 16) & 0x3fffu) << 4, sbo = ((desc >> 32) & 0x3fffu) << 4;
  if ((desc >> 62) != 0) device_fault("wgmma: only the no-swizzle descriptor mode is emulated");
  const size_t offset = trans_b ? start + (n % 8) * 2 + (n / 8) * sbo + (k % 8) * 16 + (k / 8) * lbo
                                : start + (n % 8) * 16 + (n / 8) * sbo + (k % 8) * 2 + (k / 8) * lbo;
  const Emulator& e = emu();
  const unsigned char* guard = static_cast<const unsigned char*>(e.smem.base) + e.smem.mapped -
                               static_cast<size_t>(sysconf(_SC_PAGESIZE));
  if (offset + 2 > static_cast<size_t>(guard - e.smem.user)) {
    device_fault("wgmma: descriptor reads past the dynamic shared memory");
  }
  uint16_t bits;
  std::memcpy(&bits, e.smem.user + offset, 2);
  return bf16 ? batchllm::kernels::cpu::bf16_to_float(bits) : batchllm::kernels::cpu::half_to_float(bits);
}

}  // namespace

void wgmma_m64k16(float* d, int n, const uint32_t (&a)[4], uint64_t desc_b, bool trans_b, bool bf16) {
  Emulator& e = emu();
  Fiber& self = e.fibers[e.current];
  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  if (n % 8 != 0 || n < 8 || n > 256) device_fault("wgmma: n must be a multiple of 8 in [8, 256]");
  uint32_t* posts = e.mma_buffers.data() + (static_cast<size_t>(warp) * 2 + self.mma_round % 2) * 32 * 6;
  ++self.mma_round;
  for (int i = 0; i < 4; ++i) posts[lane * 6 + i] = a[i];
  warp_barrier();
  WgmmaOp op;
  op.desc_b = desc_b;
  op.n = n;
  op.trans_b = trans_b;
  op.bf16 = bf16;
  op.d = d;
  auto element = [&](uint32_t reg, int half) {
    const uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
    return bf16 ? batchllm::kernels::cpu::bf16_to_float(bits) : batchllm::kernels::cpu::half_to_float(bits);
  };
  for (int l = 0; l < 32; ++l) {  // the A layout of mma.m16n8k16, the warp's 16 rows of the 64
    const int g = l / 4, t = l % 4;
    const uint32_t* r = posts + l * 6;
    for (int h = 0; h < 2; ++h) {
      op.a[g][2 * t + h] = element(r[0], h);
      op.a[g + 8][2 * t + h] = element(r[1], h);
      op.a[g][2 * t + 8 + h] = element(r[2], h);
      op.a[g + 8][2 * t + 8 + h] = element(r[3], h);
    }
  }
  self.wgmma_open.push_back(op);
}

void wgmma_m64k16_ss(float* d, int n, uint64_t desc_a, uint64_t desc_b, bool trans_b, bool bf16) {
  Emulator& e = emu();
  Fiber& self = e.fibers[e.current];
  if (n % 8 != 0 || n < 8 || n > 256) device_fault("wgmma: n must be a multiple of 8 in [8, 256]");
  warp_barrier();  // warp-collective, as the register form
  WgmmaOp op;
  op.a_in_smem = true;
  op.desc_a = desc_a;
  op.a_row0 = 16 * static_cast<int>((threadIdx.x / 32) % 4);
  op.desc_b = desc_b;
  op.n = n;
  op.trans_b = trans_b;
  op.bf16 = bf16;
  op.d = d;
  self.wgmma_open.push_back(op);
}

void wgmma_commit() {
  Fiber& self = emu().fibers[emu().current];
  self.wgmma_groups.push_back(std::move(self.wgmma_open));
  self.wgmma_open.clear();
}

void wgmma_wait(int pending_groups_allowed) {
  Fiber& self = emu().fibers[emu().current];
  const int lane = static_cast<int>(threadIdx.x % 32), g = lane / 4, t = lane % 4;
  while (static_cast<int>(self.wgmma_groups.size()) > pending_groups_allowed) {
    for (WgmmaOp& op : self.wgmma_groups.front()) {
      if (op.a_in_smem) {  // the async proxy reads A now, as it reads B
        for (int r = 0; r < 16; ++r) {
          for (int k = 0; k < 16; ++k) op.a[r][k] = wgmma_b_element(op.desc_a, k, op.a_row0 + r, false, op.bf16);
        }
      }
      // Accumulator layout: n-block i of 8 columns in d[4i .. 4i + 3] = rows (g, g, g + 8, g + 8),
      // columns (8i + 2t, 8i + 2t + 1, 8i + 2t, 8i + 2t + 1) of the warp's 16 rows.
      for (int i = 0; i < op.n / 8; ++i) {
        for (int j = 0; j < 4; ++j) {
          const int row = j < 2 ? g : g + 8, col = 8 * i + 2 * t + j % 2;
          float sum = op.d[4 * i + j];
          for (int k = 0; k < 16; ++k) sum += op.a[row][k] * wgmma_b_element(op.desc_b, k, col, op.trans_b, op.bf16);
          op.d[4 * i + j] = sum;
        }
      }
    }
    self.wgmma_groups.erase(self.wgmma_groups.begin());
  }
}

}  // namespace batchllm_emulation
