// Fibers for the CUDA emulation: a thread of execution with its own stack, switched to and from
// explicitly. x86-64 Linux switches in a few instructions (callee-saved registers, MXCSR and the x87
// control word); elsewhere ucontext (a system call per switch).
#pragma once

#include <cstddef>
#if !(defined(__x86_64__) && defined(__linux__))
#include <ucontext.h>
#endif

namespace batchllm_emulation {

struct Context {
#if defined(__x86_64__) && defined(__linux__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  /// Prepares a context that starts `entry` (which never returns) on the stack [base, base + size).
  void start(char* base, size_t size, void (*entry)());
};

/// Saves the running context in `from` and resumes `to`.
void switch_context(Context& from, Context& to);

}  // namespace batchllm_emulation
