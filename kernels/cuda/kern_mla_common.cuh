// Device helpers shared by the CUDA kernels (the MLA kernels: kern_mla.cu for fp32 rows,
// kern_mla_bf16.cu for bf16 rows, kern_mla_prefill.cu; the FP8 matmuls, kern_fp8_mma.cu and
// kern_fp8_wgmma.cu; the head products of kern_head_gemm.cu; the grouped quantisers of
// kern_elementwise.cu; the router and the expert plan): a warp's prefix sum, the group of
// an item, cp.async streaming into shared memory, streaming weight loads, ldmatrix and
// bf16 mma fragments, Hopper wgmma (descriptors, fences, the 64 x 64 score tile, the
// 128-register accumulator's operands), mbarriers, TMA box loads, named barriers and
// register budgets for warp-specialised kernels, and the keys of one flash-decoding split.
// Device code only: included from .cu files.
#ifndef EPIC_KERN_MLA_COMMON_CUH
#define EPIC_KERN_MLA_COMMON_CUH

#include <cuda_bf16.h>
#include <stdint.h>

#include "ops_cuda_impl.h"

// Inclusive prefix sum of v over the lanes of a full warp (lane = threadIdx.x & 31).
static __device__ __forceinline__ int epic_warp_incl_sum(int v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o)
      v += y;
  }
  return v;
}

// Groups laid end to end, group g from starts[g] (ascending, starts[0] <= x, n >= 1): the
// last g with starts[g] <= x, the group that holds item x (empty groups share the next
// one's start and are passed over).
template <typename T>
static __device__ __forceinline__ int64_t epic_group_of(const T *starts, int64_t n, int64_t x) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (starts[mid] <= x)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

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

// Up to `pending` of the most recently committed cp.async groups may still be in flight.
template <int pending> static __device__ __forceinline__ void epic_cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
}

// 16 bytes of a weight read once (ld_stream): kept out of L1, which holds what the warps
// re-read (tokens, fragments).
static __device__ __forceinline__ uint4 ld_stream(const void *p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Eight consecutive floats from src into v: two 16-byte loads where vec (src 16-byte
// aligned), else eight scalar ones.
static __device__ __forceinline__ void ld_f32x8(const float *src, bool vec, float (&v)[8]) {
  if (vec) {
    const float4 x = *reinterpret_cast<const float4 *>(src);
    const float4 y = *reinterpret_cast<const float4 *>(src + 4);
    v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
    v[4] = y.x, v[5] = y.y, v[6] = y.z, v[7] = y.w;
  } else {
#pragma unroll
    for (int e = 0; e < 8; e++)
      v[e] = src[e];
  }
}

// Four 8x8 b16 matrices from shared memory (lane l gives the address of row l % 8 of
// matrix l / 8); .trans hands each thread a column pair instead of a row pair.
static __device__ __forceinline__ void ldsm4(uint32_t a, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
static __device__ __forceinline__ void ldsm4t(uint32_t a, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// Two floats as a bf16x2 word, rounded to nearest even; lo at the lower address.
static __device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return (uint32_t)__bfloat16_as_ushort(v.x) | (uint32_t)__bfloat16_as_ushort(v.y) << 16;
}

// d += A . B for one m16n8k16 bf16 tile (fp32 accumulators).
static __device__ __forceinline__ void mma_bf16(float &d0, float &d1, float &d2, float &d3,
                                                const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A 64 x 256 fp32 wgmma accumulator (128 registers per thread) in inline asm: the register
// list for the instruction text and the matching in/out operands %0..%127 of float d[128].
#define EPIC_WG_D128_REGS                                                                          \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "         \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "          \
  "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "          \
  "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, "          \
  "%70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, "          \
  "%87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, "            \
  "%103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, "           \
  "%117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}"
#define EPIC_WG_D128_OUT(d)                                                                        \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),     \
      "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),   \
      "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),   \
      "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),   \
      "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),   \
      "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),   \
      "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),   \
      "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),   \
      "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]),   \
      "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]),   \
      "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]),   \
      "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]),   \
      "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]),   \
      "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]),           \
      "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]),          \
      "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]),          \
      "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]),          \
      "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])

// wgmma exists in the sm_90a code only; the plain sm_90 code (built beside it) runs the
// mma.sync paths (the kernels check kHaveWgmma at compile time).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
static constexpr bool kHaveWgmma = true;
#else
static constexpr bool kHaveWgmma = false;
#endif

// Shared memory written by this thread's ordinary stores / cp.async becomes visible to the
// tensor cores' (async proxy) reads after this fence and a barrier.
static __device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
static __device__ __forceinline__ void st_shared_u32(uint32_t a, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(a), "r"(v) : "memory");
}
static __device__ __forceinline__ void st_shared_v4(uint32_t a, uint32_t x, uint32_t y, uint32_t z,
                                                    uint32_t w) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(a), "r"(x), "r"(y), "r"(z), "r"(w)
               : "memory");
}
// Byte offset of 16-byte chunk c (< 8) of row r in a panel of 128-byte rows written with the
// 128-byte swizzle (wgmma's atom: 8 rows x 128 bytes at a 1024-byte boundary, the chunks
// XOR-ed by row % 8), which also keeps 8 threads per row free of bank conflicts.
static __device__ __forceinline__ uint32_t sw128_off(int r, int c) {
  return (uint32_t)(r * 128 + ((c ^ (r & 7)) << 4));
}
// wgmma shared-memory matrix descriptor, 128-byte swizzle: start address, leading and
// stride byte offsets, each >> 4 (K-major operands ignore the leading offset).
static __device__ __forceinline__ uint64_t sw128_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((saddr & 0x3FFFFu) >> 4) | (uint64_t)((lbo & 0x3FFFFu) >> 4) << 16 |
         (uint64_t)((sbo & 0x3FFFFu) >> 4) << 32 | (uint64_t)1 << 62;
}
static __device__ __forceinline__ void wg_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
static __device__ __forceinline__ void wg_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
static __device__ __forceinline__ void wg_wait_all() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}
// Keeps the compiler from touching accumulators across the asynchronous wgmma window.
template <int N> static __device__ __forceinline__ void reg_fence(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; i++)
    asm volatile("" : "+f"(d[i])::"memory");
}

// d[32] (+)= A . B, one 64 x 64 x 16 step, A and B K-major in shared memory; scale_d == 0
// overwrites d.
static __device__ __forceinline__ void wgmma_s(float (&d)[32], uint64_t da, uint64_t db,
                                               int scale_d) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
               "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
                 "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),
                 "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),
                 "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
                 "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
                 "+f"(d[31])
               : "l"(da), "l"(db), "r"(scale_d));
#else
  __trap();
#endif
}
// mbarriers (shared::cta): init with the expected arrival count, arrive (optionally with
// a transaction byte count), and wait for the completion of the phase of the given parity.
static __device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
static __device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
static __device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
static __device__ __forceinline__ uint32_t mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
               "selp.u32 %0, 1, 0, p;\n}\n"
               : "=r"(done)
               : "r"(bar), "r"(parity)
               : "memory");
  return done;
}
static __device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}
// The same, the warp's lanes spinning together: between two wgmma batches a divergent loop
// makes ptxas serialise them (C7520).
static __device__ __forceinline__ void mbar_wait_warp(uint32_t bar, uint32_t parity) {
  while (!__all_sync(0xffffffffu, mbar_try_wait(bar, parity))) {
  }
}
// Box (c0 = column in bytes, c1 = row) of the tensor `map` describes into shared memory at
// dst; completion is counted in bytes on bar.
static __device__ __forceinline__ void tma_load(uint32_t dst, const epic_cuk_tmap *map, int c0,
                                                int c1, uint32_t bar) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
               " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
               "l"(map), "r"(c0), "r"(c1), "r"(bar)
               : "memory");
}

// bar gets one arrival (counted in its expected count) once every cp.async this thread
// issued before has landed: the thread goes on without waiting for its copies.
static __device__ __forceinline__ void epic_cp_async_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Named CTA barriers for producer / consumer hand-offs between warpgroups: `n` threads in
// all take part; arrive does not wait, sync waits for all n.
static __device__ __forceinline__ void named_sync(int id, int n) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
static __device__ __forceinline__ void named_arrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
// Warpgroup register budgets (warp-specialised kernels hand registers from one role to
// another; the plain sm_90 build has no setmaxnreg and runs no such kernel).
template <int N> static __device__ __forceinline__ void set_maxnreg_inc() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N> static __device__ __forceinline__ void set_maxnreg_dec() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

// Keys [kbeg, kend) of split `split` of query b, in n_tiles tiles of kTile rows: the
// context is cut into n_split chunks (or chunks of about split_keys keys, see
// epic_cuk_mla_params) rounded up to whole tiles (a split past the end gets none;
// k_mla_combine gives it weight 0, and an empty split's zero partial adds exact zeros).
struct epic_mla_split {
  int kbeg, kend, n_tiles;
};
template <int kTile>
static __device__ __forceinline__ epic_mla_split epic_mla_split_keys(const epic_cuk_mla_params &p,
                                                                     int64_t b, int split) {
  const int n_keys = p.n_ctx ? p.n_ctx[b] : (int)(p.start + b + 1);
  int chunk = (n_keys + p.n_split - 1) / p.n_split;
  if (p.split_keys > 0) {
    chunk = (n_keys + EPIC_CUDA_MLA_FIXED_SPLITS - 1) / EPIC_CUDA_MLA_FIXED_SPLITS;
    chunk = chunk > p.split_keys ? chunk : p.split_keys;
  }
  chunk = (chunk + kTile - 1) / kTile * kTile;
  epic_mla_split r;
  r.kbeg = split * chunk;
  r.kend = r.kbeg + chunk < n_keys ? r.kbeg + chunk : n_keys;
  r.n_tiles = r.kend > r.kbeg ? (r.kend - r.kbeg + kTile - 1) / kTile : 0;
  return r;
}

#endif
