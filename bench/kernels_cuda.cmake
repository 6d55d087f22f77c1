# bench_kernels_cuda: the CUDA epic_ops backend against measured copy / GEMM peaks.
if(EPIC_CUDA_ENABLED)
  find_package(CUDAToolkit REQUIRED)
  add_executable(bench_kernels_cuda ${CMAKE_CURRENT_SOURCE_DIR}/bench_kernels_cuda.c)
  target_link_libraries(bench_kernels_cuda PRIVATE epic_kernels CUDA::cudart CUDA::cublas
                        CUDA::cublasLt m)
  # bench_draw_cuda: seeded draws on the GPU against the host path, same run.
  add_executable(bench_draw_cuda ${CMAKE_CURRENT_SOURCE_DIR}/bench_draw_cuda.c)
  target_link_libraries(bench_draw_cuda PRIVATE epic_kernels m)
endif()
