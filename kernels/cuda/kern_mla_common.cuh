// Device helpers shared by the MLA decode kernels (kern_mla.cu for fp32 rows,
// kern_mla_bf16.cu for bf16 rows): cp.async streaming into shared memory and the keys of
// one flash-decoding split. Device code only: included from .cu files.
#ifndef EPIC_KERN_MLA_COMMON_CUH
#define EPIC_KERN_MLA_COMMON_CUH

#include <stdint.h>

#include "ops_cuda_impl.h"

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

// Keys [kbeg, kend) of split `split` of query b, in n_tiles tiles of kTile rows: the
// context is cut into n_split chunks rounded up to whole tiles (a split past the end
// gets none; k_mla_combine gives it weight 0).
struct epic_mla_split {
  int kbeg, kend, n_tiles;
};
template <int kTile>
static __device__ __forceinline__ epic_mla_split epic_mla_split_keys(const epic_cuk_mla_params &p,
                                                                     int64_t b, int split) {
  const int n_keys = p.n_ctx ? p.n_ctx[b] : (int)(p.start + b + 1);
  int chunk = (n_keys + p.n_split - 1) / p.n_split;
  chunk = (chunk + kTile - 1) / kTile * kTile;
  epic_mla_split r;
  r.kbeg = split * chunk;
  r.kend = r.kbeg + chunk < n_keys ? r.kbeg + chunk : n_keys;
  r.n_tiles = r.kend > r.kbeg ? (r.kend - r.kbeg + kTile - 1) / kTile : 0;
  return r;
}

#endif
