// cp.async helpers shared by the kernels that stream global memory into shared memory
// (kern_mla.cu, kern_mla_bf16.cu). Device code only: included from .cu files.
#ifndef EPIC_KERN_ASYNC_CUH
#define EPIC_KERN_ASYNC_CUH

#include <stdint.h>

// Shared-memory address of a generic pointer into shared memory (the form cp.async,
// ldmatrix and wgmma descriptors take).
static __device__ __forceinline__ uint32_t epic_smem_u32(const void *p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}

// 16-byte global -> shared copy; the first `bytes` (0 or 16) come from src, the rest is
// zero-filled (bytes = 0 reads nothing: rows past the end of a split or a page).
static __device__ __forceinline__ void epic_cp_async16(uint32_t dst, const void *src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes)
               : "memory");
}
static __device__ __forceinline__ void epic_cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
static __device__ __forceinline__ void epic_cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

#endif
