# bench_gemm: epic_ops matmul (CPU backend) vs OpenBLAS sgemm on pre-dequantised weights.
add_executable(bench_gemm ${CMAKE_CURRENT_SOURCE_DIR}/bench_gemm.c)
target_link_libraries(bench_gemm PRIVATE epic_kernels)
