# CUDA backend of epic_ops. Included from kernels/CMakeLists.txt when EPIC_CUDA_ENABLED.
# Host code (kernels/cuda/*.c) joins epic_kernels and gets the project's C flags and
# sanitizers; the kernels (*.cu) build as a separate static library, for Hopper only
# (sm_90a for wgmma-class code, plus plain sm_90), without the C-only warning and
# sanitizer flags that nvcc does not understand. No relocatable device code, so no
# device link step: consumers in other directories link with the C linker and get the
# CUDA runtime and cuBLAS from the targets below.
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

file(GLOB EPIC_CUDA_KERNEL_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/cuda/*.cu)
file(GLOB EPIC_CUDA_HOST_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/cuda/*.c)
add_library(epic_kernels_cuda_dev STATIC ${EPIC_CUDA_KERNEL_SOURCES})
set_property(TARGET epic_kernels_cuda_dev PROPERTY COMPILE_OPTIONS "")
set_target_properties(epic_kernels_cuda_dev PROPERTIES
  CUDA_ARCHITECTURES OFF
  CUDA_STANDARD 17
  CUDA_STANDARD_REQUIRED ON
  CUDA_RUNTIME_LIBRARY Shared
  POSITION_INDEPENDENT_CODE ON)
target_include_directories(epic_kernels_cuda_dev PRIVATE ${CMAKE_SOURCE_DIR})
target_compile_options(epic_kernels_cuda_dev PRIVATE
  -gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_90,code=sm_90
  -lineinfo -Xcompiler=-Wall,-Wextra,-Wno-unused-parameter)
if(EPIC_WERROR)
  target_compile_options(epic_kernels_cuda_dev PRIVATE -Werror=all-warnings)
endif()
# nvcc host code (kernel launch stubs) needs the C++ runtime; C executables link it here.
target_link_libraries(epic_kernels_cuda_dev PUBLIC CUDA::cudart stdc++)

target_sources(epic_kernels PRIVATE ${EPIC_CUDA_HOST_SOURCES})
# epic_kernels compiles no CUDA itself but sits in this CUDA-enabled directory.
set_property(TARGET epic_kernels PROPERTY CUDA_ARCHITECTURES OFF)
target_compile_definitions(epic_kernels PUBLIC EPIC_HAVE_CUDA)
target_link_libraries(epic_kernels PUBLIC epic_kernels_cuda_dev CUDA::cudart CUDA::cublas
                      CUDA::cublasLt)
