# One GoogleTest executable per test file, mirroring the source tree (tests/cpp/runtime/test_x.cpp).
find_package(GTest REQUIRED)
include(GoogleTest)
file(GLOB_RECURSE BATCHLLM_GTEST_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/tests/cpp/test_*.cpp)
foreach(test_source ${BATCHLLM_GTEST_SOURCES})
  get_filename_component(test_name ${test_source} NAME_WE)
  add_executable(${test_name} ${test_source})
  target_link_libraries(${test_name} PRIVATE batchllm_core GTest::gtest GTest::gtest_main)
  target_include_directories(${test_name} PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/csrc)
  gtest_discover_tests(${test_name} DISCOVERY_MODE PRE_TEST)
endforeach()

# The CUDA kernel sources compiled as C++ against the CPU emulation of CUDA (tests/cpp/cuda_emulation),
# so that CI, which has no GPU, runs the kernels themselves and not only their CPU references. The
# kernel sweep test is built a second time against them.
set(BATCHLLM_EMULATION_DIR ${CMAKE_CURRENT_SOURCE_DIR}/tests/cpp/cuda_emulation)
file(GLOB BATCHLLM_CUDA_KERNEL_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/csrc/kernels/cuda/*.cu)
set(BATCHLLM_EMULATED_SOURCES)
foreach(cuda_source ${BATCHLLM_CUDA_KERNEL_SOURCES})
  get_filename_component(kernel_name ${cuda_source} NAME_WE)
  set(wrapper ${CMAKE_CURRENT_BINARY_DIR}/cuda_emulation/${kernel_name}.cpp)
  file(CONFIGURE OUTPUT ${wrapper} CONTENT "#include \"${cuda_source}\"\n")
  list(APPEND BATCHLLM_EMULATED_SOURCES ${wrapper})
endforeach()
add_library(batchllm_cuda_emulated STATIC ${BATCHLLM_EMULATED_SOURCES} ${BATCHLLM_EMULATION_DIR}/cuda_emulation.cpp
            ${BATCHLLM_EMULATION_DIR}/fiber.cpp ${BATCHLLM_EMULATION_DIR}/warp_instructions.cpp
            ${BATCHLLM_EMULATION_DIR}/streams.cpp
            ${BATCHLLM_CPU_KERNEL_SOURCES})
# The stand-in CUDA headers come first: this target never sees the toolkit's.
target_include_directories(batchllm_cuda_emulated BEFORE PUBLIC ${BATCHLLM_EMULATION_DIR}/include
  ${BATCHLLM_EMULATION_DIR} ${CMAKE_CURRENT_SOURCE_DIR}/include ${CMAKE_CURRENT_SOURCE_DIR}/csrc)
target_compile_definitions(batchllm_cuda_emulated PUBLIC BATCHLLM_WITH_CUDA=1)
target_compile_options(batchllm_cuda_emulated PRIVATE -Wall -Wextra -Wno-unused-parameter -Wno-unknown-pragmas)
# Its cudaMalloc, cudaGetLastError... stay inside whatever links it (the Python module beside a real _C).
set_target_properties(batchllm_cuda_emulated PROPERTIES CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON)
add_executable(test_cuda_kernel_sweep_emulated ${CMAKE_CURRENT_SOURCE_DIR}/tests/cpp/kernels/test_cuda_kernel_sweep.cpp)
target_link_libraries(test_cuda_kernel_sweep_emulated PRIVATE batchllm_cuda_emulated GTest::gtest GTest::gtest_main)
gtest_discover_tests(test_cuda_kernel_sweep_emulated DISCOVERY_MODE PRE_TEST)
add_executable(test_cuda_emulation ${BATCHLLM_EMULATION_DIR}/emulation_selftest.cpp)
target_link_libraries(test_cuda_emulation PRIVATE batchllm_cuda_emulated GTest::gtest GTest::gtest_main)
gtest_discover_tests(test_cuda_emulation DISCOVERY_MODE PRE_TEST)

# The kernel bindings over the emulated kernels, as a Python module for tests/python/test_cuda_ops.py
# on machines with no GPU (found through BATCHLLM_CUDA_EMULATION_DIR, which `make test` sets).
if(BATCHLLM_BUILD_PYTHON)
  pybind11_add_module(_cuda_emulation MODULE ${BATCHLLM_EMULATION_DIR}/emulation_module.cpp
                      ${CMAKE_CURRENT_SOURCE_DIR}/csrc/bindings/bind_kernels.cpp)
  target_link_libraries(_cuda_emulation PRIVATE batchllm_cuda_emulated)
  set_target_properties(_cuda_emulation PROPERTIES LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/cuda_emulation)
endif()
