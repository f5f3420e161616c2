# Install the library, its public headers and a CMake package for C++ programs that embed batchllm.
# Skipped inside a wheel build: the wheel carries only the Python module.
if(NOT SKBUILD)
  include(GNUInstallDirs)
  include(CMakePackageConfigHelpers)
  install(TARGETS batchllm_core EXPORT batchllmTargets
          ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
          LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
  install(DIRECTORY include/batchllm DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
  install(EXPORT batchllmTargets NAMESPACE batchllm:: FILE batchllmTargets.cmake
          DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/batchllm)
  set_target_properties(batchllm_core PROPERTIES EXPORT_NAME core)
  configure_package_config_file(${CMAKE_CURRENT_SOURCE_DIR}/cmake/batchllmConfig.cmake.in
    ${CMAKE_CURRENT_BINARY_DIR}/batchllmConfig.cmake
    INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/batchllm)
  write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/batchllmConfigVersion.cmake
    COMPATIBILITY SameMinorVersion)
  install(FILES ${CMAKE_CURRENT_BINARY_DIR}/batchllmConfig.cmake
                ${CMAKE_CURRENT_BINARY_DIR}/batchllmConfigVersion.cmake
          DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/batchllm)
endif()
