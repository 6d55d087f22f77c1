// Flash-style MLA prefill attention, the naive form mla_naive computes: per head, queries
// [q_nope | q_pe] (192) against keys [k_nope | k_pe] (k_nope decompressed by kv_b, k_pe
// shared by the heads) and values v (128), causal (query i sees keys 0 .. start + i).
// One CTA = one head x 128 queries, two warpgroups of 64 query rows (8 warps of 16) that
// share every key tile (half the L2 reads per query of a 64-query CTA). The fp32 queries
// are rounded to bf16 into shared memory once; key tiles of 64 rows (keys and values as
// bf16 copies made by the caller) stream through three shared-memory stages by cp.async,
// one barrier per tile, with a fixed chunk per thread so that the copies cost few
// instructions (issue slots, not the tensor cores, were the limit). Every panel (Q, a
// tile's K and V) is stored as 64-column blocks of 128-byte rows with the 16-byte chunks
// XOR-swizzled by row % 8: wgmma's 128-byte swizzle atom, and conflict-free for ldmatrix
// and the cp.async writes alike.
// Per tile and warpgroup, on the sm_90a build (kWg):
//   S = Q . K^T: 12 wgmma m64n64k16, both operands K-major in shared memory, issued for
//   tile j + 1 before the softmax of tile j so that they overlap;
//   online softmax on the fp32 accumulators (a query row lives in the four lanes of one
//   warp: two shuffles per row maximum), the scale fused into the exponent's FMA;
//   O += P . V: 4 wgmma m64n128k16 with P rounded to bf16 straight from the score
//   accumulators into A register fragments (the accumulator layout of m64nNk16 is the
//   A fragment layout) and V read N-major (transposed) from shared memory.
// The mma.sync variant (plain sm_90 code, and selectable for cross-checks) does the same
// products with ldmatrix + mma.m16n8k16 on the same shared layout; both give each thread
// the same accumulator elements, so the softmax and the epilogue are shared. No score
// matrix touches memory, and the query tiles of a head run as neighbouring CTAs (last,
// longest tiles first), so a head's keys and values are read from HBM about once.
// DeepSeek-V3 head shape only (nope 128, rope 64, v 128).
#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>

#include "kern_mla_common.cuh"

namespace {

constexpr int kNope = 128, kRope = 64, kV = 128, kDq = kNope + kRope, kDkv = kNope + kV;
constexpr int kTQ = 128, kTK = 64, kThreads = 256, kStages = 3;
constexpr int kQC = kDq / 8, kVC = kV / 8; // 16-byte chunks per Q/K row and per V row
constexpr int kBlk = kTK * 128;            // one 64-column block of a key panel (bytes)
constexpr int kQBlk = kTQ * 128;           // the same of the query panel
constexpr int kQBytes = kQC / 8 * kQBlk, kKBytes = kQC / 8 * kBlk, kVBytes = kVC / 8 * kBlk;
constexpr int kStage = kKBytes + kVBytes;
constexpr int kSmem = kQBytes + kStages * kStage + 1024; // + slack for the 1024-byte alignment
static_assert(kTQ == 2 * 64 && kThreads == 2 * 128, "two warpgroups of 64 query rows");
static_assert(kRope == 64, "k_pe is one 64-column block of a key row");

struct Params {
  const float *q;      // [m][H][192]
  const uint16_t *kv;  // [n_keys][H][256]: k_nope, v
  const uint16_t *kpe; // [n_keys][64]
  float *out;          // [m][H][128]
  int m, start, H;
  float scale_log2; // softmax scale * log2(e)
};

// Byte offset of 16-byte chunk c of row r of a panel whose 64-column blocks are blk bytes.
__device__ __forceinline__ uint32_t pswz(int r, int c, int blk = kBlk) {
  return (uint32_t)((c >> 3) * blk) + sw128_off(r, c & 7);
}

// o[64] (+)= P . V, one 64 x 128 x 16 step: A (P) from registers in the m16n8k16 A
// fragment layout, B (V) N-major in shared memory (imm-trans-b = 1).
__device__ __forceinline__ void wgmma_pv(float (&d)[64], const uint32_t (&a)[4], uint64_t db) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
               "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
               "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
               "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
                 "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),
                 "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),
                 "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
                 "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
                 "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),
                 "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),
                 "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
                 "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]),
                 "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]),
                 "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
#else
  __trap();
#endif
}

// Keys and values of key tile j into a stage (sK, sV); rows past n_keys are zeros (their
// scores are masked; zero values keep 0 * v finite). Thread t copies 16-byte chunk t % 8
// of every 64-column block of rows t / 8 and t / 8 + 32: a row's 8 threads read 128
// contiguous bytes per instruction, and the swizzled offset is the same for both rows and
// every block (row % 8 is), so the address work per tile is a few multiply-adds.
static_assert(kThreads == 8 * kTK / 2, "8 threads per row, two passes over the tile");
__device__ __forceinline__ void load_kv(const Params &p, int h, int j, int n_keys, uint32_t sK,
                                        uint32_t sV) {
  const int lr = threadIdx.x >> 3, cg = threadIdx.x & 7;
  const uint32_t off = sw128_off(lr, cg);
#pragma unroll
  for (int pass = 0; pass < 2; pass++) {
    const int key = j * kTK + lr + 32 * pass;
    const bool ok = key < n_keys;
    const int bytes = ok ? 16 : 0; // rows past the end: zero-filled, source not read
    const uint16_t *row = ok ? p.kv + ((int64_t)key * p.H + h) * kDkv + cg * 8 : p.kv;
    const uint16_t *pe = ok ? p.kpe + (int64_t)key * kRope + cg * 8 : p.kpe;
    const uint32_t o = off + pass * 32 * 128;
#pragma unroll
    for (int b = 0; b < kNope / 64; b++)
      epic_cp_async16(sK + o + b * kBlk, row + b * 64, bytes);
    epic_cp_async16(sK + o + (kNope / 64) * kBlk, pe, bytes);
#pragma unroll
    for (int b = 0; b < kV / 64; b++)
      epic_cp_async16(sV + o + b * kBlk, row + kNope + b * 64, bytes);
  }
}

// The query tile as bf16 (rows past m are zeros); q rows are 16-byte aligned (host check).
__device__ __forceinline__ void stage_q(const Params &p, int h, int q0, uint32_t sQ) {
  for (int i = threadIdx.x; i < kTQ * kQC; i += kThreads) {
    const int r = i / kQC, c = i % kQC, row = q0 + r;
    float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f), y = x;
    if (row < p.m) {
      const float4 *src =
          reinterpret_cast<const float4 *>(p.q + ((int64_t)row * p.H + h) * kDq + c * 8);
      x = src[0];
      y = src[1];
    }
    st_shared_v4(sQ + pswz(r, c, kQBlk), pack_bf16(x.x, x.y), pack_bf16(x.z, x.w),
                 pack_bf16(y.x, y.y), pack_bf16(y.z, y.w));
  }
}

// One tile's scores s (this thread's query rows qi0: elements 0, 1 and qi1: 2, 3 of each
// 8-column group; key 8 n + 2 qd + (e & 1) after k0) through the causal mask and the
// online softmax: running max m (log2 domain) and partial sum l per row, o rescaled when
// the max moves, and P rounded to bf16 into pa, the A fragments of P . V (keys 16 kk ..).
struct RowState {
  float m[2], l[2];
};
__device__ __forceinline__ void softmax_tile(float (&s)[kTK / 2], float (&o)[kV / 2], RowState &rs,
                                             uint32_t (&pa)[kTK / 16][4], int k0, int warp_row0,
                                             int qi0, int qd, int start, float scale_log2) {
  if (k0 + kTK - 1 > start + warp_row0) { // the tile reaches past the diagonal
#pragma unroll
    for (int n = 0; n < kTK / 8; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int key = k0 + n * 8 + 2 * qd + (e & 1), qi = qi0 + (e < 2 ? 0 : 8);
        if (key > start + qi)
          s[4 * n + e] = -INFINITY;
      }
  }
#pragma unroll
  for (int r = 0; r < 2; r++) {
    float mx = -INFINITY;
#pragma unroll
    for (int n = 0; n < kTK / 8; n++)
      mx = fmaxf(mx, fmaxf(s[4 * n + 2 * r], s[4 * n + 2 * r + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    // every row has key 0 in tile 0, so the maximum is finite from the first tile on
    const float m_new = fmaxf(rs.m[r], mx * scale_log2);
    const float corr = exp2f(rs.m[r] - m_new);
    rs.m[r] = m_new;
    float sum = 0.0f;
#pragma unroll
    for (int n = 0; n < kTK / 8; n++) {
      float *e = s + 4 * n + 2 * r;
      e[0] = exp2f(fmaf(e[0], scale_log2, -m_new));
      e[1] = exp2f(fmaf(e[1], scale_log2, -m_new));
      sum += e[0] + e[1];
    }
    rs.l[r] = fmaf(rs.l[r], corr, sum);
    if (corr != 1.0f) { // once a row's max settles the factor is exactly 1
#pragma unroll
      for (int n = 0; n < kV / 8; n++) {
        o[4 * n + 2 * r] *= corr;
        o[4 * n + 2 * r + 1] *= corr;
      }
    }
  }
#pragma unroll
  for (int kk = 0; kk < kTK / 16; kk++) {
    pa[kk][0] = pack_bf16(s[8 * kk], s[8 * kk + 1]);
    pa[kk][1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
    pa[kk][2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
    pa[kk][3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
  }
}

// S = Q . K^T of one tile for this warpgroup's 64 rows, issued and committed, not waited
// for: 12 wgmma m64n64k16, both operands K-major in shared memory. (This and issue_pv are
// unreferenced in the plain sm_90 pass.)
[[maybe_unused]] __device__ __forceinline__ void issue_scores(float (&s)[kTK / 2], uint32_t sQwg,
                                                              uint32_t sK) {
#pragma unroll
  for (int i = 0; i < kTK / 2; i++)
    s[i] = 0.0f;
  const uint64_t dq = sw128_desc(sQwg, 16, 1024), dk = sw128_desc(sK, 16, 1024);
  wg_fence();
#pragma unroll
  for (int ks = 0; ks < kDq / 16; ks++) {
    // k-step ks: column block ks / 4, 32 bytes further per step inside the block
    const int in_blk = (ks & 3) * 32;
    wgmma_s(s, dq + (uint64_t)(((ks >> 2) * kQBlk + in_blk) >> 4),
            dk + (uint64_t)(((ks >> 2) * kBlk + in_blk) >> 4), ks);
  }
  wg_commit();
}

// O += P . V of one tile, issued and committed: 4 wgmma m64n128k16, B = V as N-major (its
// two 64-column blocks kBlk apart, 8-key groups 1024 bytes apart; 2048 bytes per k-step).
[[maybe_unused]] __device__ __forceinline__ void
issue_pv(float (&o)[kV / 2], const uint32_t (&pa)[kTK / 16][4], uint32_t sV) {
  const uint64_t dv = sw128_desc(sV, kBlk, 1024);
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < kTK / 16; kk++)
    wgmma_pv(o, pa[kk], dv + (uint64_t)((kk * 16 * 128) >> 4));
  wg_commit();
}

template <bool kWg0> __global__ void __launch_bounds__(kThreads, 1) k_mla_prefill(const Params p) {
  constexpr bool kWg = kWg0 && kHaveWgmma;
  extern __shared__ __align__(16) uint8_t smem_raw[];
  const uint32_t sQ =
      (epic_smem_u32(smem_raw) + 1023u) & ~1023u; // swizzle atoms: 1024-byte aligned
  const uint32_t sS0 = sQ + kQBytes;
  const int qt = (int)(gridDim.x - 1 - blockIdx.x); // the longest (last) query tiles first
  const int h = (int)blockIdx.y, q0 = qt * kTQ;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, qd = lane & 3;
  const int wg = warp >> 2, wq0 = q0 + 64 * wg; // this warpgroup's first query row
  const int n_keys = p.start + p.m;
  const int q_last = (q0 + kTQ < p.m ? q0 + kTQ : p.m) - 1;
  const int n_tiles = (p.start + q_last + 1 + kTK - 1) / kTK;
  // Key tiles this warpgroup's rows see; none when its rows are all past m.
  const int wg_tiles = wq0 < p.m ? (p.start + (wq0 + 63 < p.m ? wq0 + 63 : p.m - 1)) / kTK + 1 : 0;
  auto stage = [&](int j) { return sS0 + (uint32_t)((j % kStages) * kStage); };

  // Tiles 0 and 1 in flight (one cp.async group each, empty past the last tile), then Q.
  for (int j = 0; j < kStages - 1; j++) {
    if (j < n_tiles)
      load_kv(p, h, j, n_keys, stage(j), stage(j) + kKBytes);
    epic_cp_async_commit();
  }
  stage_q(p, h, q0, sQ);

  float o[kV / 2];
#pragma unroll
  for (int i = 0; i < kV / 2; i++)
    o[i] = 0.0f;
  RowState rs = {{-INFINITY, -INFINITY}, {0.0f, 0.0f}};
  // Accumulator element 4 n + e of either variant: query row qi0 (e < 2) or qi0 + 8,
  // column 8 n + 2 qd + (e & 1) (key of S, value dimension of O).
  const int warp_row0 = q0 + warp * 16, qi0 = warp_row0 + g;
  float s[kTK / 2];
  uint32_t pa[kTK / 16][4];

  if constexpr (kWg) {
    // Scores of tile j + 1 run on the tensor cores while this warpgroup does tile j's
    // softmax; P . V of tile j follows them. Tile j + 2 loads while tile j + 1 is
    // computed: the stage it takes held tile j - 1, finished by every warp before the
    // barrier (each iteration ends waiting for its wgmma).
    epic_cp_async_wait<kStages - 2>();
    fence_proxy_async(); // the cp.async and st.shared data are read by wgmma
    __syncthreads();     // tile 0 and Q
    if (wg_tiles > 0) {
      issue_scores(s, sQ + wg * 64 * 128, stage(0));
      wg_wait_all();
      reg_fence(s);
    }
    for (int j = 0; j < n_tiles; j++) {
      float sn[kTK / 2];
      if (j + 1 < n_tiles) {
        epic_cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads(); // tile j + 1 visible; tile j - 1's stage free
        if (j + kStages - 1 < n_tiles)
          load_kv(p, h, j + kStages - 1, n_keys, stage(j + 2), stage(j + 2) + kKBytes);
        epic_cp_async_commit();
        if (j + 1 < wg_tiles)
          issue_scores(sn, sQ + wg * 64 * 128, stage(j + 1));
      }
      if (j < wg_tiles) { // uniform over the warpgroup: else the tile is past all its rows
        softmax_tile(s, o, rs, pa, j * kTK, warp_row0, qi0, qd, p.start, p.scale_log2);
        issue_pv(o, pa, stage(j) + kKBytes);
      }
      wg_wait_all();
      reg_fence(o);
      if (j + 1 < wg_tiles) {
        reg_fence(sn);
#pragma unroll
        for (int i = 0; i < kTK / 2; i++)
          s[i] = sn[i];
      }
    }
  } else {
    uint32_t qf[kDq / 16][4]; // this warp's 16 query rows as A fragments
    for (int j = 0; j < n_tiles; j++) {
      const uint32_t sK = stage(j), sV = sK + kKBytes;
      epic_cp_async_wait<kStages - 2>(); // tile j landed; later tiles may still be in flight
      // Tile j and Q are visible to all; every warp is done with tile j - 1, whose stage
      // tile j + 2 now reuses.
      __syncthreads();
      if (j + kStages - 1 < n_tiles)
        load_kv(p, h, j + kStages - 1, n_keys, stage(j + 2), stage(j + 2) + kKBytes);
      epic_cp_async_commit();
      if (j >= wg_tiles)
        continue;
      if (j == 0) {
#pragma unroll
        for (int kk = 0; kk < kDq / 16; kk++)
          ldsm4(sQ + pswz(warp * 16 + (lane & 15), kk * 2 + (lane >> 4), kQBlk), qf[kk]);
      }
#pragma unroll
      for (int i = 0; i < kTK / 2; i++)
        s[i] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < kDq / 16; kk++)
#pragma unroll
        for (int np = 0; np < kTK / 16; np++) {
          uint32_t b[4];
          ldsm4(sK + pswz(np * 16 + (lane & 7) + (lane >> 4) * 8, kk * 2 + ((lane >> 3) & 1)), b);
          float *d = s + 8 * np;
          mma_bf16(d[0], d[1], d[2], d[3], qf[kk], b[0], b[1]);
          mma_bf16(d[4], d[5], d[6], d[7], qf[kk], b[2], b[3]);
        }
      softmax_tile(s, o, rs, pa, j * kTK, warp_row0, qi0, qd, p.start, p.scale_log2);
#pragma unroll
      for (int kk = 0; kk < kTK / 16; kk++)
#pragma unroll
        for (int dp = 0; dp < kV / 16; dp++) {
          uint32_t b[4];
          ldsm4t(sV + pswz(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dp * 2 + (lane >> 4)), b);
          float *d = o + 8 * dp;
          mma_bf16(d[0], d[1], d[2], d[3], pa[kk], b[0], b[1]);
          mma_bf16(d[4], d[5], d[6], d[7], pa[kk], b[2], b[3]);
        }
    }
  }
#pragma unroll
  for (int r = 0; r < 2; r++) {
    float l = rs.l[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int qi = qi0 + 8 * r;
    if (qi >= p.m)
      continue;
    const float inv = 1.0f / l;
    float *dst = p.out + ((int64_t)qi * p.H + h) * kV + 2 * qd;
#pragma unroll
    for (int n = 0; n < kV / 8; n++)
      *reinterpret_cast<float2 *>(dst + n * 8) =
          make_float2(o[4 * n + 2 * r] * inv, o[4 * n + 2 * r + 1] * inv);
  }
}

} // namespace

extern "C" {

int epic_cuk_mla_prefill_ok(int64_t nope, int64_t rope, int64_t v, int64_t m, int64_t start,
                            int64_t n_heads, const float *q) {
  return nope == kNope && rope == kRope && v == kV && m > 0 && start >= 0 && n_heads > 0 &&
         n_heads <= 65535 && start + m < INT32_MAX / 2 &&
         (m + start) * n_heads * kDkv < ((int64_t)1 << 40) && ((uintptr_t)q & 15u) == 0;
}

cudaError_t epic_cuk_mla_prefill_prepare(void) {
  cudaError_t e =
      cudaFuncSetAttribute(k_mla_prefill<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(k_mla_prefill<false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             kSmem);
  return e;
}

cudaError_t epic_cuk_mla_prefill(const float *q, const uint16_t *kv, const uint16_t *kpe, int64_t m,
                                 int64_t start, int64_t n_heads, float scale, float *out, int wgmma,
                                 cudaStream_t st) {
  Params p;
  p.q = q;
  p.kv = kv;
  p.kpe = kpe;
  p.out = out;
  p.m = (int)m;
  p.start = (int)start;
  p.H = (int)n_heads;
  p.scale_log2 = scale * 1.4426950408889634f;
  const dim3 grid((unsigned)((m + kTQ - 1) / kTQ), (unsigned)n_heads);
  if (wgmma)
    k_mla_prefill<true><<<grid, kThreads, kSmem, st>>>(p);
  else
    k_mla_prefill<false><<<grid, kThreads, kSmem, st>>>(p);
  return cudaGetLastError();
}

} // extern "C"
