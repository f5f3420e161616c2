// Fibers for the CUDA emulation (fiber.h).
#include "fiber.h"

#include <cstdint>
#include <cstring>

namespace batchllm_emulation {

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

void Context::start(char* base, size_t size, void (*entry)()) {
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

void switch_context(Context& from, Context& to) { batchllm_emulation_switch(&from.sp, to.sp); }
#else
void Context::start(char* base, size_t size, void (*entry)()) {
  getcontext(&uc);
  uc.uc_stack.ss_sp = base;
  uc.uc_stack.ss_size = size;
  uc.uc_link = nullptr;
  makecontext(&uc, entry, 0);
}

void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

}  // namespace batchllm_emulation
