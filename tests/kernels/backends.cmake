# Backend-level kernel tests: the batched decode op on the CPU backend (always), and the
# CUDA backend against the CPU backend (label gpu; exits 77 = skipped where no GPU is).
epic_test(NAME test_ops_batch SOURCES test_ops_batch.c LIBS epic_kernels)
if(EPIC_CUDA_ENABLED)
  epic_test(NAME test_ops_cuda SOURCES test_ops_cuda.c LIBS epic_kernels LABELS gpu TIMEOUT 1200)
  set_tests_properties(test_ops_cuda PROPERTIES SKIP_RETURN_CODE 77)
endif()
