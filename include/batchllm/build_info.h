// What this build of batchllm contains, and whether a CUDA device can be used now.
#pragma once

#include <string>
#include <vector>

namespace batchllm {

struct BuildInfo {
  std::string version;                   ///< package version, e.g. "0.1.0"
  bool cuda = false;                     ///< true when the CUDA kernels were compiled in
  std::string cuda_version;              ///< nvcc version used, empty without CUDA
  std::string cuda_architectures;        ///< CMAKE_CUDA_ARCHITECTURES, e.g. "80;90"
  std::string compiler;                  ///< host C++ compiler id and version
};

/// Facts fixed at build time.
BuildInfo build_info();

/// Number of CUDA devices usable now: 0 without CUDA support, without a driver or without a device.
/// Never throws and never aborts, so it is safe on a machine with no GPU.
int cuda_device_count();

}  // namespace batchllm
