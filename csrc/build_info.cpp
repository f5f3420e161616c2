#include "batchllm/build_info.h"

#ifdef BATCHLLM_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace batchllm {

namespace {
std::string compiler_id() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#else
  return "unknown";
#endif
}
}  // namespace

BuildInfo build_info() {
  BuildInfo info;
  info.version = BATCHLLM_VERSION;
  info.compiler = compiler_id();
#ifdef BATCHLLM_WITH_CUDA
  info.cuda = true;
  info.cuda_version = BATCHLLM_CUDA_VERSION;
  info.cuda_architectures = BATCHLLM_CUDA_ARCHITECTURES;
#endif
  return info;
}

int cuda_device_count() {
#ifdef BATCHLLM_WITH_CUDA
  int count = 0;
  // With no driver this returns cudaErrorInsufficientDriver / cudaErrorNoDevice: answer 0.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return count;
#else
  return 0;
#endif
}

}  // namespace batchllm
