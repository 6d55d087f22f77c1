// Flash-decoding MLA (absorbed form) over a paged BF16 latent cache, on BF16 tensor cores.
//
// The fast-mode counterpart of kern_mla.cu for the DeepSeek-V3 row (576 = 512 latent + 64
// rope bf16 elements). One CTA = one query token x 64 heads x one split of the context,
// 8 warps (two warpgroups), one CTA per SM for the shared memory:
//   Q   [64 heads][576] bf16, staged once: queries rounded to bf16 unscaled, the softmax
//       scale * log2(e) multiplies the fp32 scores in the exponent                   72 KB
//   KV  2 x [64 keys][576] bf16 tiles, cp.async double buffer (zero-filled past the
//       split, so masked keys meet V rows of zeros, never garbage)                 144 KB
//   P   [64 heads][64 keys] bf16 probabilities                                         8 KB
// Per 64-key tile:
//   S = Q . K^T (64 x 64, K = 576) on warpgroup 0: 36 wgmma m64n64k16 reading Q and the
//       tile straight from shared memory (each byte once per tile), or, in the mma.sync
//       variant, ldmatrix + mma.m16n8k16 with 16 heads per warp;
//   online softmax in base 2 on warpgroup 0's fp32 accumulators: a head row lives in the
//       four lanes of one warp, so the row max and sum need two shuffles and no shared
//       memory; P is rounded to bf16 for P . V (as FlashMLA does) while the running sum l
//       adds the fp32 values;
//   O += P . V (V = the tile's first 512 columns) on both warpgroups: each 64 heads x 256
//       columns as 4 wgmma m64n256k16 with V read N-major (transposed) from the same tile,
//       or (variant) ldmatrix.trans + mma.m16n8k16 with 64 columns per warp.
//   Accumulators are fp32 throughout; reductions run in a fixed order (no atomics).
// Shared layout: a panel (Q, a KV tile or P) is split in 64-column blocks, each 64 rows of
// 128 bytes with the 16-byte chunks XOR-swizzled by row % 8. That is wgmma's 128-byte
// swizzle atom (8 rows x 128 B at a 1024-byte boundary), and it keeps the ldmatrix reads
// and the cp.async writes (8 threads per row) free of bank conflicts.
// Splits write partials in kern_mla.cu's format and are merged by its combine kernel.
// k_mla_bf16_seesaw below is the same computation on FlashMLA's two-tile schedule (long
// splits; see there).
#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>

#include "kern_mla_common.cuh"

namespace {

constexpr int kHG = 64; // heads per CTA
constexpr int kTK = 64; // keys per tile
constexpr int kW = 576; // row width (elements)
constexpr int kL = 512; // latent part
constexpr int kRope = kW - kL;
constexpr int kThreads = 256;
constexpr int kBlk = kTK * 128; // one 64-column block of a 64-row panel (bytes)
constexpr int kPanel = kW / 64 * kBlk;
constexpr int kOffKV = kPanel; // Q at 0, then two KV tiles, then P
constexpr int kOffP = kOffKV + 2 * kPanel;
constexpr int kOffCorr = kOffP + kBlk;
constexpr int kOffML = kOffCorr + kHG * 4;
constexpr int kSmemBytes = kOffML + 2 * kHG * 4 + 1024; // + slack for the 1024-byte alignment
static_assert(kHG == kTK && kW % 64 == 0, "Q, KV tiles and P share the panel geometry");

// d[128] (+)= A . B, one 64 x 256 x 16 step, A K-major, B N-major (imm-trans-b = 1).
__device__ __forceinline__ void wgmma_o(float (&d)[128], uint64_t da, uint64_t db, int scale_d) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " EPIC_WG_D128_REGS
               ", %128, %129, p, 1, 1, 0, 1;\n}\n"
               : EPIC_WG_D128_OUT(d)
               : "l"(da), "l"(db), "r"(scale_d));
#else
  __trap();
#endif
}
// Two adjacent outputs (a caller's ctx slice need not be 8-byte aligned).
__device__ __forceinline__ void store_pair(float *o, float v0, float v1) {
  if (((uintptr_t)o & 7u) == 0) {
    *reinterpret_cast<float2 *>(o) = make_float2(v0, v1);
  } else {
    o[0] = v0;
    o[1] = v1;
  }
}

// Sum over the four lanes of a row (lane % 4), in a fixed order.
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// The online softmax of one 64-key tile on a warpgroup's score accumulators, in pieces:
// s[4 j + e] = row r0 (+8 for e >= 2), key 8 j + 2 t + (e & 1), r0 = 16 * (warp % 4) + g.
// Raw scores: the scale (> 0) is applied to the row max and fused into the exponent's FFMA,
// in base 2. A row lives in the four lanes of one warp, so its max and sum take two
// shuffles each.
// The rows' max of raw scores, keys from kend on masked to -inf (the split's last tile).
__device__ __forceinline__ void tile_rowmax(float (&s)[32], int k0, int kend, int t, float &mx0,
                                            float &mx1) {
  if (k0 + kTK > kend) {
#pragma unroll
    for (int j = 0; j < 8; j++) {
      const int key = k0 + 8 * j + 2 * t;
      if (key >= kend)
        s[4 * j] = s[4 * j + 2] = -INFINITY;
      if (key + 1 >= kend)
        s[4 * j + 1] = s[4 * j + 3] = -INFINITY;
    }
  }
  mx0 = mx1 = -INFINITY;
#pragma unroll
  for (int j = 0; j < 8; j++) {
    mx0 = fmaxf(mx0, fmaxf(s[4 * j], s[4 * j + 1]));
    mx1 = fmaxf(mx1, fmaxf(s[4 * j + 2], s[4 * j + 3]));
  }
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
}

// s <- p = 2^(s * qscale - mn) for the rows' new max mn0 / mn1 (finite: every tile of a
// split holds a key, and so does the running max); sum0 / sum1 this thread's part of the
// rows' sums of the fp32 values.
__device__ __forceinline__ void tile_exp(float (&s)[32], float qscale, float mn0, float mn1,
                                         float &sum0, float &sum1) {
  sum0 = sum1 = 0.0f;
#pragma unroll
  for (int j = 0; j < 8; j++) {
    s[4 * j] = exp2f(fmaf(s[4 * j], qscale, -mn0));
    s[4 * j + 1] = exp2f(fmaf(s[4 * j + 1], qscale, -mn0));
    s[4 * j + 2] = exp2f(fmaf(s[4 * j + 2], qscale, -mn1));
    s[4 * j + 3] = exp2f(fmaf(s[4 * j + 3], qscale, -mn1));
    sum0 += s[4 * j] + s[4 * j + 1];
    sum1 += s[4 * j + 2] + s[4 * j + 3];
  }
}

// p (as tile_exp leaves it) rounded to bf16 into the 64 x 64 panel row at prow (= panel +
// r0 * 128 + 4 t; row r0 + 8 has the same swizzle, r % 8 = g), as P . V reads it (FlashMLA
// rounds P the same way; the running sums keep the fp32 values).
__device__ __forceinline__ void store_p(const float (&s)[32], uint32_t prow, int g) {
#pragma unroll
  for (int j = 0; j < 8; j++) {
    const uint32_t a = prow + ((j ^ g) << 4);
    st_shared_u32(a, pack_bf16(s[4 * j], s[4 * j + 1]));
    st_shared_u32(a + 8 * 128, pack_bf16(s[4 * j + 2], s[4 * j + 3]));
  }
}

// Rows r0 and r0 + 8 of a wgmma accumulator (x[4 j + 0..1] and x[4 j + 2..3], for the
// scores and for P . V alike) times f0 and f1.
template <int N> __device__ __forceinline__ void scale_rows(float (&x)[N], float f0, float f1) {
#pragma unroll
  for (int j = 0; j < N / 4; j++) {
    x[4 * j] *= f0;
    x[4 * j + 1] *= f0;
    x[4 * j + 2] *= f1;
    x[4 * j + 3] *= f1;
  }
}

// The whole step for one warpgroup: P to the panel at prow, the running max and sum
// updated, the rescale factors of the rows' earlier sums and outputs returned.
__device__ __forceinline__ void softmax_tile(float (&s)[32], int k0, int kend, int t, int g,
                                             float qscale, float (&m_run)[2], float (&l_run)[2],
                                             float &c0, float &c1, uint32_t prow) {
  float mx0, mx1, sum0, sum1;
  tile_rowmax(s, k0, kend, t, mx0, mx1);
  const float mn0 = fmaxf(m_run[0], mx0 * qscale), mn1 = fmaxf(m_run[1], mx1 * qscale);
  c0 = exp2f(m_run[0] - mn0);
  c1 = exp2f(m_run[1] - mn1);
  m_run[0] = mn0;
  m_run[1] = mn1;
  tile_exp(s, qscale, mn0, mn1, sum0, sum1);
  store_p(s, prow, g);
  l_run[0] = l_run[0] * c0 + sum0;
  l_run[1] = l_run[1] * c1 + sum1;
}

// The P . V accumulators times the rows' rescale factors; once the running max settles
// they are exactly 1 and the multiplies are skipped.
__device__ __forceinline__ void rescale_rows(float (&acc)[128], float c0, float c1) {
  if (__any_sync(0xffffffffu, c0 != 1.0f || c1 != 1.0f))
    scale_rows(acc, c0, c1);
}

// acc += P . V for one tile on a warpgroup's wgmma: dp the P panel (K-major, one block),
// dv its 256 V columns as N-major: 64-column blocks kBlk apart (leading offset), 8-key
// groups 1024 bytes apart (stride offset).
__device__ __forceinline__ void pv_tile(float (&acc)[128], uint64_t dp, uint64_t dv) {
  wg_fence();
#pragma unroll
  for (int ks = 0; ks < kTK / 16; ks++)
    wgmma_o(acc, dp + (uint64_t)((ks * 32) >> 4), dv + (uint64_t)((ks * 16 * 128) >> 4), 1);
  wg_commit();
  wg_wait_all();
  reg_fence(acc);
}

// Where head h of query b writes its 512 outputs: ctx when the split is the whole context,
// else this split's unnormalised partial.
__device__ __forceinline__ float *out_row(const epic_cuk_mla_params &p, int64_t b, int split,
                                          int64_t h) {
  return p.n_split == 1 ? p.ctx + (b * p.n_heads + h) * kL
                        : p.part_acc + ((b * p.n_split + split) * p.n_heads + h) * kL;
}

// A warpgroup's P . V accumulators out (layout as scale_rows, columns col0 + 8 j (+1) of
// the 512): head h0 (+8) of query b, divided by the rows' sums l0 (l1) when the split is
// the whole context, else unnormalised into this split's partial.
__device__ __forceinline__ void store_rows(const epic_cuk_mla_params &p, int64_t b, int split,
                                           int64_t h0, int col0, const float (&acc)[128], float l0,
                                           float l1) {
#pragma unroll
  for (int half = 0; half < 2; half++) {
    const int64_t h = h0 + 8 * half;
    if (h < p.n_heads) {
      const float inv = p.n_split == 1 ? 1.0f / (half ? l1 : l0) : 1.0f;
      float *o = out_row(p, b, split, h) + col0;
#pragma unroll
      for (int j = 0; j < 32; j++)
        store_pair(o + 8 * j, acc[4 * j + 2 * half] * inv, acc[4 * j + 2 * half + 1] * inv);
    }
  }
}

// The pool row of query b's cached key `key` (through its block table).
__device__ __forceinline__ int64_t cache_row(const epic_cuk_mla_params &p, int64_t b, int key) {
  const int32_t *table = p.tables + b * p.table_stride;
  const int page_size = (int)p.page_size;
  int page, row;
  if (p.page_shift >= 0) {
    page = table[key >> p.page_shift];
    row = key & (page_size - 1);
  } else {
    const int pi = key / page_size;
    page = table[pi];
    row = key - pi * page_size;
  }
  return (int64_t)page * page_size + row;
}

// The 16-byte chunk cg of cached row `key` of query b, or NULL for keys past the split's
// end (kend), which are zero-filled and not read.
__device__ __forceinline__ const uint16_t *row_src(const epic_cuk_mla_params &p, int64_t b, int key,
                                                   int kend, int cg) {
  if (key >= kend)
    return nullptr;
  return static_cast<const uint16_t *>(p.pool) + cache_row(p, b, key) * kW + cg * 8;
}

// Stages query b's 64 rows of head group hg0 as bf16 (rows past n_heads are zero) into the
// Q panel at sQ with kThr threads: 8 per row, thread tid % 8 taking 16-byte chunk tid % 8 of
// each column block (the panel's swizzle, as the tile loads). Returns qscale: the kernels
// scale raw scores by qscale > 0; a negative softmax scale flips the sign of the staged
// queries instead (exact), a zero one becomes a tiny positive one (uniform probabilities
// either way, and -inf * 0 never makes a NaN).
template <int kThr>
__device__ __forceinline__ float stage_q(const epic_cuk_mla_params &p, int64_t b, int hg0, int tid,
                                         uint32_t sQ) {
  const float qsign = p.qscale < 0.0f ? -1.0f : 1.0f;
  const int lr = tid >> 3, cg = tid & 7;
  const uint32_t ld_off = sw128_off(lr, cg);
  const bool qa_vec = ((uintptr_t)p.q_abs & 15u) == 0, qp_vec = ((uintptr_t)p.q_pe & 15u) == 0;
#pragma unroll
  for (int pass = 0; pass < kHG / (kThr / 8); pass++) {
    const int r = lr + kThr / 8 * pass;
    const int64_t h = hg0 + r;
    const bool valid = h < p.n_heads;
    const float *qa = p.q_abs + (b * p.n_heads + (valid ? h : 0)) * kL + cg * 8;
    const float *qp = p.q_pe + (b * p.n_heads + (valid ? h : 0)) * kRope + cg * 8;
#pragma unroll
    for (int j = 0; j < kW / 64; j++) {
      const float *src = j < kL / 64 ? qa + j * 64 : qp;
      float v[8];
#pragma unroll
      for (int e = 0; e < 8; e++)
        v[e] = 0.0f;
      if (valid)
        ld_f32x8(src, j < kL / 64 ? qa_vec : qp_vec, v);
#pragma unroll
      for (int e = 0; e < 8; e++)
        v[e] *= qsign;
      st_shared_v4(sQ + pass * (kThr / 8) * 128 + ld_off + j * kBlk, pack_bf16(v[0], v[1]),
                   pack_bf16(v[2], v[3]), pack_bf16(v[4], v[5]), pack_bf16(v[6], v[7]));
    }
  }
  return fmaxf(fabsf(p.qscale), 1e-30f);
}

// Descriptor offset of k-step ks of a panel: column block ks / 4, 32 bytes further per
// step inside the block.
__device__ __forceinline__ uint64_t kstep_off(int ks) {
  return (uint64_t)(((ks >> 2) * kBlk + (ks & 3) * 32) >> 4);
}

// S = Q . K^T for one tile on a warpgroup's wgmma (36 steps m64n64k16, Q and the tile
// straight from their panels), into s (layout as softmax_tile).
__device__ __forceinline__ void scores_tile(float (&s)[32], uint32_t sQ, uint32_t kv) {
  const uint64_t dq = sw128_desc(sQ, 16, 1024), dk = sw128_desc(kv, 16, 1024);
  wg_fence();
#pragma unroll
  for (int ks = 0; ks < kW / 16; ks++)
    wgmma_s(s, dq + kstep_off(ks), dk + kstep_off(ks), ks);
  wg_commit();
  wg_wait_all();
  reg_fence(s);
}

// kWgS: scores on wgmma (else mma.sync); kWgO: P . V on wgmma (else mma.sync). The
// accumulator acc[128] holds, per thread, with g = lane / 4, t = lane % 4:
//   kWgO:  rows 16 * (warp % 4) + g (+8), columns 256 * (warp / 4) + 8 j + 2 t (+1):
//          acc[4 j + 2 half + e];
//   !kWgO: rows 16 mt + g (+8), columns 64 * warp + 8 nt + 2 t (+1):
//          acc[32 mt + 4 nt + 2 half + e].
template <bool kWgS0, bool kWgO0>
__global__ void __launch_bounds__(kThreads, 1) k_mla_bf16(epic_cuk_mla_params p) {
  constexpr bool kWgS = kWgS0 && kHaveWgmma, kWgO = kWgO0 && kHaveWgmma;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw = epic_smem_u32(smem_raw);
  const uint32_t s0 = (raw + 1023u) & ~1023u; // swizzle atoms start at 1024-byte boundaries
  unsigned char *sgen = smem_raw + (s0 - raw);
  const uint32_t sQ = s0, sKV = s0 + kOffKV, sP = s0 + kOffP;
  float *corr_s = reinterpret_cast<float *>(sgen + kOffCorr); // this tile's rescale per head
  float *ml_s = reinterpret_cast<float *>(sgen + kOffML);     // final max [64], sum [64]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int64_t b = blockIdx.z, n_heads = p.n_heads;
  const int hg0 = blockIdx.y * kHG, split = blockIdx.x, n_split = p.n_split;
  const epic_mla_split keys = epic_mla_split_keys<kTK>(p, b, split);
  const int kbeg = keys.kbeg, kend = keys.kend, n_tiles = keys.n_tiles;

  // Loader geometry (KV tiles and Q): 8 threads per row, thread cg taking 16-byte chunk cg
  // of each of the 9 column blocks, rows lr and lr + 32. Each row's 8 threads read 128
  // contiguous bytes per instruction; the swizzled destination is the same for both rows.
  const int lr = tid >> 3, cg = tid & 7;
  const uint32_t ld_off = sw128_off(lr, cg);

  auto load_tile = [&](int tile, int buf) {
    const uint32_t dst = sKV + buf * kPanel + ld_off;
    const int k0 = kbeg + tile * kTK;
#pragma unroll
    for (int pass = 0; pass < 2; pass++) {
      const uint16_t *src = row_src(p, b, k0 + lr + 32 * pass, kend, cg);
      const int step = src ? 64 : 0, bytes = src ? 16 : 0; // zero-filled past the split
      src = src ? src : static_cast<const uint16_t *>(p.pool);
#pragma unroll
      for (int j = 0; j < kW / 64; j++)
        epic_cp_async16(dst + pass * 32 * 128 + j * kBlk, src + j * step, bytes);
    }
    epic_cp_async_commit();
  };

  if (n_tiles > 0)
    load_tile(0, 0);
  const float qscale = stage_q<kThreads>(p, b, hg0, tid, sQ);

  float acc[128];
#pragma unroll
  for (int i = 0; i < 128; i++)
    acc[i] = 0.0f;
  // Warpgroup 0: running max (log2 domain) and this thread's part of the running sum of
  // rows r0 = 16 * warp + g and r0 + 8 (its key columns 8 j + 2 t, +1 only).
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
  const int x7 = lane & 7; // row % 8 of every ldmatrix row address below

  for (int tile = 0; tile < n_tiles; tile++) {
    const int buf = tile & 1;
    epic_cp_async_wait_all();
    fence_proxy_async();
    __syncthreads(); // tile (and Q) landed; the last tile's P . V no longer reads buf ^ 1 or P
    if (tile + 1 < n_tiles)
      load_tile(tile + 1, buf ^ 1);
    const uint32_t kv = sKV + buf * kPanel;

    if (warp < 4) {
      float s[32];
#pragma unroll
      for (int i = 0; i < 32; i++)
        s[i] = 0.0f;
      if constexpr (kWgS) {
        scores_tile(s, sQ, kv);
      } else { // warp w: heads 16 w..16 w + 15, all 64 keys
        const uint32_t a_row = sQ + (16 * warp + (lane & 15)) * 128;
        const uint32_t b_row = kv + ((lane & 7) + ((lane >> 4) << 3)) * 128;
        uint32_t a_sw[4], b_sw[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
          a_sw[j] = (uint32_t)(((2 * j + (lane >> 4)) ^ x7) << 4);
          b_sw[j] = (uint32_t)(((2 * j + ((lane >> 3) & 1)) ^ x7) << 4);
        }
#pragma unroll
        for (int ks = 0; ks < kW / 16; ks++) {
          const uint32_t blk = (uint32_t)((ks >> 2) * kBlk);
          uint32_t a[4];
          ldsm4(a_row + blk + a_sw[ks & 3], a);
#pragma unroll
          for (int np = 0; np < 4; np++) {
            uint32_t bb[4];
            ldsm4(b_row + np * 16 * 128 + blk + b_sw[ks & 3], bb);
            mma_bf16(s[8 * np], s[8 * np + 1], s[8 * np + 2], s[8 * np + 3], a, bb[0], bb[1]);
            mma_bf16(s[8 * np + 4], s[8 * np + 5], s[8 * np + 6], s[8 * np + 7], a, bb[2], bb[3]);
          }
        }
      }

      float c0, c1;
      const int r0 = 16 * warp + g;
      softmax_tile(s, kbeg + tile * kTK, kend, t, g, qscale, m_run, l_run, c0, c1,
                   sP + r0 * 128 + 4 * t);
      if (t == 0) {
        corr_s[r0] = c0;
        corr_s[r0 + 8] = c1;
      }
      if constexpr (kWgO)
        fence_proxy_async(); // P is read by wgmma next
    }
    __syncthreads(); // P and the rescale factors are ready

    if constexpr (kWgO) {
      const int r0 = 16 * (warp & 3) + g;
      rescale_rows(acc, corr_s[r0], corr_s[r0 + 8]);
      // A = P; B = V columns 256 * (warp / 4)..
      pv_tile(acc, sw128_desc(sP, 16, 1024), sw128_desc(kv + (warp >> 2) * 4 * kBlk, kBlk, 1024));
    } else {
      float c[8];
#pragma unroll
      for (int mt = 0; mt < 4; mt++) {
        c[2 * mt] = corr_s[16 * mt + g];
        c[2 * mt + 1] = corr_s[16 * mt + g + 8];
      }
      bool rescale = false;
#pragma unroll
      for (int i = 0; i < 8; i++)
        rescale |= c[i] != 1.0f;
      if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
        for (int mt = 0; mt < 4; mt++)
#pragma unroll
          for (int nt = 0; nt < 8; nt++) {
            acc[32 * mt + 4 * nt] *= c[2 * mt];
            acc[32 * mt + 4 * nt + 1] *= c[2 * mt];
            acc[32 * mt + 4 * nt + 2] *= c[2 * mt + 1];
            acc[32 * mt + 4 * nt + 3] *= c[2 * mt + 1];
          }
      }
      // A: P rows 16 mt + (lane & 15), keys 16 ks + 8 (lane >> 4). B: V keys
      // 16 ks + (lane & 7) + 8 ((lane >> 3) & 1) of column block `warp`, column chunk
      // 2 np + (lane >> 4), transposed by ldmatrix.
      const uint32_t pa = sP + (lane & 15) * 128;
      const uint32_t vb = kv + warp * kBlk + ((lane & 7) + ((lane >> 3) & 1) * 8) * 128;
#pragma unroll
      for (int ks = 0; ks < kTK / 16; ks++) {
        uint32_t a[4][4];
#pragma unroll
        for (int mt = 0; mt < 4; mt++)
          ldsm4(pa + mt * 16 * 128 + (((2 * ks + (lane >> 4)) ^ x7) << 4), a[mt]);
#pragma unroll
        for (int np = 0; np < 4; np++) {
          uint32_t bb[4];
          ldsm4t(vb + ks * 16 * 128 + (((2 * np + (lane >> 4)) ^ x7) << 4), bb);
#pragma unroll
          for (int mt = 0; mt < 4; mt++) {
            float *d0 = acc + 32 * mt + 8 * np;
            mma_bf16(d0[0], d0[1], d0[2], d0[3], a[mt], bb[0], bb[1]);
            mma_bf16(d0[4], d0[5], d0[6], d0[7], a[mt], bb[2], bb[3]);
          }
        }
      }
    }
  }

  // Row max and sum of warpgroup 0 to shared memory (the sum over the four lanes of a row
  // in a fixed order), then the final ctx (one split) or this split's unnormalised
  // partial with its max and sum.
  if (warp < 4) {
    const float l0 = quad_sum(l_run[0]), l1 = quad_sum(l_run[1]);
    if (t == 0) {
      const int r0 = 16 * warp + g;
      ml_s[r0] = m_run[0];
      ml_s[r0 + 8] = m_run[1];
      ml_s[kHG + r0] = l0;
      ml_s[kHG + r0 + 8] = l1;
    }
  }
  __syncthreads();
  if constexpr (kWgO) {
    const int r0 = 16 * (warp & 3) + g;
    store_rows(p, b, split, hg0 + r0, 256 * (warp >> 2) + 2 * t, acc, ml_s[kHG + r0],
               ml_s[kHG + r0 + 8]);
  } else {
#pragma unroll
    for (int half = 0; half < 2; half++)
#pragma unroll
      for (int mt = 0; mt < 4; mt++) {
        const int row = 16 * mt + g + 8 * half;
        const int64_t h = hg0 + row;
        if (h < n_heads) {
          const float inv = n_split == 1 ? 1.0f / ml_s[kHG + row] : 1.0f;
          float *o = out_row(p, b, split, h) + 64 * warp + 2 * t;
#pragma unroll
          for (int nt = 0; nt < 8; nt++)
            store_pair(o + 8 * nt, acc[32 * mt + 4 * nt + 2 * half] * inv,
                       acc[32 * mt + 4 * nt + 2 * half + 1] * inv);
        }
      }
  }
  if (n_split > 1 && tid < kHG && hg0 + tid < n_heads) {
    float *ml = p.part_ml + ((b * n_split + split) * n_heads + hg0 + tid) * 2;
    ml[0] = ml_s[tid];
    ml[1] = ml_s[kHG + tid];
  }
}

// d[128] (+)= A . B, one 64 x 256 x 16 step, A from registers (mma.m16n8k16's A layout
// per warp, warp w of the warpgroup holding rows 16 w..16 w + 15), B N-major in shared
// memory (imm-trans-b = 1).
__device__ __forceinline__ void wgmma_o_rs(float (&d)[128], const uint32_t (&a)[4], uint64_t db) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " EPIC_WG_D128_REGS
               ", {%128, %129, %130, %131}, %132, p, 1, 1, 1;\n}\n"
               : EPIC_WG_D128_OUT(d)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
#else
  __trap();
#endif
}

// scores_tile in two halves around a wait: the k-steps of column blocks 4 half..4 half + 3
// first, then (once wait_rest() returns: the rest of the tile has landed) the others, so
// that the tensor cores start on the part of a tile that was refilled first.
template <typename F>
__device__ __forceinline__ void scores_tile_split(float (&s)[32], uint32_t sQ, uint32_t kv,
                                                  int half, F &&wait_rest) {
  const uint64_t dq = sw128_desc(sQ, 16, 1024), dk = sw128_desc(kv, 16, 1024);
  wg_fence();
#pragma unroll
  for (int ks = 0; ks < 16; ks++)
    wgmma_s(s, dq + kstep_off(16 * half + ks), dk + kstep_off(16 * half + ks), ks);
  wait_rest();
#pragma unroll
  for (int ks = 0; ks < kW / 16 - 16; ks++) {
    const int k = ks < 16 ? 16 * (1 - half) + ks : ks + 16;
    wgmma_s(s, dq + kstep_off(k), dk + kstep_off(k), 1);
  }
  wg_commit();
  wg_wait_all();
  reg_fence(s);
}

// The seesaw form (EPIC_CUDA_MLA_BF16_SEESAW), after FlashMLA's schedule: two tiles per
// step, one per warpgroup, each warpgroup holding half of O (columns 256 wg..). Per step,
// tiles 2j (buffer 0, WG0) and 2j + 1 (buffer 1, WG1), m the running max of both:
//   WG0: S0 = Q.K0^T; m0 = max(m, rowmax S0); P0 = exp(S0 - m0); O_L = O_L e^(m - m0) + P0.V0_L
//   WG1: S1 = Q.K1^T (beside S0); m1 = max(m0, rowmax S1); P1 = exp(S1 - m1);
//        O_R = O_R e^(m - m1) + P1.V1_R
//   WG0: P0' = P0 e^(m0 - m1) for WG1; O_L = O_L e^(m0 - m1) + P1.V1_L
//   WG1: O_R += P0'.V0_R;  m = m1.
// (exp in base 2 on raw scores as k_mla_bf16; row sums likewise, WG0's and WG1's added at
// the end.)
// So the tensor cores run one warpgroup's products while the other computes its softmax,
// and each product's own P comes from registers (wgmma's register-A form). A column block
// is refilled by the warpgroup that read it last, right after that read: WG0 buffer 0's
// blocks 0-3 after P0.V0_L (mid-step) and buffer 1's blocks 0-3 and rope block after
// P1.V1_L; WG1 buffer 1's blocks 4-7 after P1.V1_R and buffer 0's blocks 4-7 and rope
// block after P0'.V0_R. The other's P goes through the rope block of its tile's buffer
// (read by that tile's S alone). Hand-offs: named barriers (maxima and factors each way,
// P each way; each strictly alternates within a step) and an mbarrier per buffer part
// (its TMA bytes, parity = step & 1). Prologue and hand-offs make it slower than
// k_mla_bf16 on short splits; EPIC_CUDA_MLA_BF16_AUTO picks by split length.
constexpr int kSeeThreads = 256;
constexpr int kSOffKV = kPanel;                  // Q at 0, then buffers 0 and 1,
constexpr int kSOffRow = kSOffKV + 2 * kPanel;   // per-row m0, e^(m - m0), m1, e^(m0 - m1),
constexpr int kSOffBar = kSOffRow + 6 * kHG * 4; // the two sums; mbarriers [buffer][part]
constexpr int kSeeSmemBytes = kSOffBar + 4 * 8 + 1024;
constexpr int kBarS0 = 1, kBarS1 = 2, kBarP0 = 3, kBarP1 = 4; // named barriers
static_assert(kSeeSmemBytes <= 227 * 1024, "shared memory per CTA");

// The four words of wgmma's register A operand for k-step ks (keys 16 ks..) from a
// warpgroup's 64 x 64 probabilities in the score accumulator layout (softmax_tile's).
__device__ __forceinline__ void p_frag(const float (&s)[32], int ks, uint32_t (&a)[4]) {
  a[0] = pack_bf16(s[8 * ks], s[8 * ks + 1]);
  a[1] = pack_bf16(s[8 * ks + 2], s[8 * ks + 3]);
  a[2] = pack_bf16(s[8 * ks + 4], s[8 * ks + 5]);
  a[3] = pack_bf16(s[8 * ks + 6], s[8 * ks + 7]);
}

// acc += P . V for one tile with P from registers (the fragments of p_frag), dv as pv_tile.
__device__ __forceinline__ void pv_tile_rs(float (&acc)[128], const float (&s)[32], uint64_t dv) {
  uint32_t a[kTK / 16][4];
#pragma unroll
  for (int ks = 0; ks < kTK / 16; ks++)
    p_frag(s, ks, a[ks]);
  wg_fence();
#pragma unroll
  for (int ks = 0; ks < kTK / 16; ks++)
    wgmma_o_rs(acc, a[ks], dv + (uint64_t)((ks * 16 * 128) >> 4));
  wg_commit();
  wg_wait_all();
  reg_fence(acc);
}

__global__ void __launch_bounds__(kSeeThreads, 1)
    k_mla_bf16_seesaw(const __grid_constant__ epic_cuk_mla_params p,
                      const __grid_constant__ epic_cuk_tmap pool_map) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw = epic_smem_u32(smem_raw);
  const uint32_t s0 = (raw + 1023u) & ~1023u;
  unsigned char *sgen = smem_raw + (s0 - raw);
  const uint32_t sQ = s0, sKV = s0 + kSOffKV, bar_full = s0 + kSOffBar;
  float *m0_s = reinterpret_cast<float *>(sgen + kSOffRow), *c0_s = m0_s + kHG;
  float *m1_s = c0_s + kHG, *c1_s = m1_s + kHG, *sum_s = c1_s + kHG; // sums [2][64]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;
  const int g = lane >> 2, t = lane & 3, lt = tid & 127;
  const int64_t b = blockIdx.z;
  const int hg0 = blockIdx.y * kHG, split = blockIdx.x;
  const epic_mla_split keys = epic_mla_split_keys<kTK>(p, b, split);
  const int kbeg = keys.kbeg, kend = keys.kend, n_steps = (keys.n_tiles + 1) / 2;
  const int r0 = 16 * (warp & 3) + g; // this thread's rows r0 and r0 + 8

  // Part `part` (0: column blocks 0-3, 1: blocks 4-7) of a tile into buffer buf, plus the
  // rope block where this warpgroup refills it (WG0 buffer 1, WG1 buffer 0): TMA boxes of
  // 64 rows x 128 bytes from the pool viewed as rows of 1,152 bytes, issued by one thread
  // and counted in bytes on the part's mbarrier. A tile lies in one page (pages are whole
  // tiles here); tile_row() is its first pool row, -1 for a tile past the split (nothing
  // loaded, and the products with it skipped). Rows of the split's last tile past kend are
  // the page's other rows: finite (zeroed at allocation, or written), and masked.
  const int part = wg;
  auto tile_row = [&](int tile) -> int64_t {
    const int key = kbeg + tile * kTK;
    return key < kend ? cache_row(p, b, key) : -1;
  };
  auto load = [&](int64_t row, int buf) {
    if (lt != 0)
      return;
    const uint32_t bar = bar_full + 8 * (2 * buf + part), dst = sKV + buf * kPanel;
    if (row < 0) {
      mbar_arrive(bar);
      return;
    }
    const bool rope = buf != wg;
    mbar_expect_tx(bar, (uint32_t)((rope ? 5 : 4) * kBlk));
#pragma unroll
    for (int j = 4 * part; j < 4 * part + 4; j++)
      tma_load(dst + j * kBlk, &pool_map, 128 * j, (int)row, bar);
    if (rope)
      tma_load(dst + 8 * kBlk, &pool_map, 128 * 8, (int)row, bar);
  };

  if (tid == 0) {
    for (int i = 0; i < 4; i++)
      mbar_init(bar_full + 8 * i, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (n_steps > 0) {
    load(tile_row(0), 0);
    load(tile_row(1), 1);
  }
  const float qscale = stage_q<kSeeThreads>(p, b, hg0, tid, sQ);
  fence_proxy_async(); // Q is read by wgmma
  __syncthreads();

  float acc[128];
#pragma unroll
  for (int i = 0; i < 128; i++)
    acc[i] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
  const uint32_t mine = sKV + wg * kPanel, other = sKV + (wg ^ 1) * kPanel;
  for (int step = 0; step < n_steps; step++) {
    const uint32_t par = (uint32_t)step & 1u;
    const bool more = step + 1 < n_steps;
    const int tile = 2 * step + wg;
    // The last step of an odd tile count has no tile 1: its scores are all masked and its
    // P zero, and both P . V products with it are skipped (its buffer may hold anything).
    const bool have1 = 2 * step + 1 < keys.n_tiles;
    int64_t next_mine = -1, next_other = -1; // the next step's refills, looked up early
    if (more && lt == 0) {
      next_mine = tile_row(tile + 2);
      next_other = tile_row(2 * (step + 1) + (wg ^ 1));
    }
    // My buffer: the half refilled mid-step (WG0 blocks 0-3, WG1 blocks 4-7) first.
    mbar_wait(bar_full + 8 * (2 * wg + wg), par); // (TMA writes: no proxy fence needed)
    float s[32];
    scores_tile_split(s, sQ, mine, wg,
                      [&] { mbar_wait_warp(bar_full + 8 * (2 * wg + (wg ^ 1)), par); });
    float mx0, mx1;
    tile_rowmax(s, kbeg + tile * kTK, kend, t, mx0, mx1);
    float m_in[2], c_in[2], c_prev[2]; // the max this tile starts from, O's factor for it;
                                       // WG1: WG0's factor e^(m - m0)
    if (wg == 0) {
      m_in[0] = m_run[0];
      m_in[1] = m_run[1];
    } else { // read now: WG0 rewrites them once this step's kBarS1 has passed
      named_sync(kBarS0, kSeeThreads);
      m_in[0] = m0_s[r0];
      m_in[1] = m0_s[r0 + 8];
      c_prev[0] = c0_s[r0];
      c_prev[1] = c0_s[r0 + 8];
    }
    const float mn0 = fmaxf(m_in[0], mx0 * qscale), mn1 = fmaxf(m_in[1], mx1 * qscale);
    c_in[0] = exp2f(m_in[0] - mn0);
    c_in[1] = exp2f(m_in[1] - mn1);
    float sum0, sum1;
    tile_exp(s, qscale, mn0, mn1, sum0, sum1);
    if (t == 0) { // the new max and its factor to the other warpgroup
      (wg ? m1_s : m0_s)[r0] = mn0;
      (wg ? m1_s : m0_s)[r0 + 8] = mn1;
      (wg ? c1_s : c0_s)[r0] = c_in[0];
      (wg ? c1_s : c0_s)[r0 + 8] = c_in[1];
    }
    named_arrive(wg ? kBarS1 : kBarS0, kSeeThreads);
    if (wg == 1) { // O_R and its sum were relative to m: e^(m - m1) = e^(m - m0) e^(m0 - m1)
      c_in[0] *= c_prev[0];
      c_in[1] *= c_prev[1];
    }
    rescale_rows(acc, c_in[0], c_in[1]);
    l_run[0] = l_run[0] * c_in[0] + sum0;
    l_run[1] = l_run[1] * c_in[1] + sum1;
    if (wg == 1) { // P1 for WG0, over K1's rope block
      store_p(s, mine + 8 * kBlk + r0 * 128 + 4 * t, g);
      fence_proxy_async();
      named_arrive(kBarP1, kSeeThreads);
    }
    // This tile's own half: P from registers, V columns 256 wg.. of its buffer.
    if (wg == 0 || have1)
      pv_tile_rs(acc, s, sw128_desc(mine + wg * 4 * kBlk, kBlk, 1024));
    if (more)
      load(next_mine, wg); // this buffer's blocks of my half
    if (wg == 0) {
      named_sync(kBarS1, kSeeThreads); // WG1's max m1 and e^(m0 - m1)
      const float c1a = c1_s[r0], c1b = c1_s[r0 + 8];
      m_run[0] = m1_s[r0];
      m_run[1] = m1_s[r0 + 8];
      scale_rows(s, c1a, c1b); // P0' = P0 e^(m0 - m1), for WG1, over K0's rope block
      store_p(s, mine + 8 * kBlk + r0 * 128 + 4 * t, g);
      fence_proxy_async();
      named_arrive(kBarP0, kSeeThreads);
      rescale_rows(acc, c1a, c1b);
      l_run[0] *= c1a;
      l_run[1] *= c1b;
      named_sync(kBarP1, kSeeThreads);
    } else {
      m_run[0] = mn0;
      m_run[1] = mn1;
      named_sync(kBarP0, kSeeThreads);
    }
    // The other tile's P (its rope block) times my half of its V.
    mbar_wait(bar_full + 8 * (2 * (wg ^ 1) + wg), par);
    if (wg == 1 || have1)
      pv_tile(acc, sw128_desc(other + 8 * kBlk, 16, 1024),
              sw128_desc(other + wg * 4 * kBlk, kBlk, 1024));
    if (more)
      load(next_other, wg ^ 1); // my half of the other buffer, and its rope
  }

  // Row sums: each warpgroup's four lanes in a fixed order, then WG0's + WG1's.
  const float la = quad_sum(l_run[0]), lb = quad_sum(l_run[1]);
  if (t == 0) {
    sum_s[wg * kHG + r0] = la;
    sum_s[wg * kHG + r0 + 8] = lb;
  }
  __syncthreads();
  const float l0 = sum_s[r0] + sum_s[kHG + r0], l1 = sum_s[r0 + 8] + sum_s[kHG + r0 + 8];
  if (wg == 0 && t == 0 && p.n_split > 1)
    for (int half = 0; half < 2; half++) {
      const int64_t h = hg0 + r0 + 8 * half;
      if (h < p.n_heads) {
        float *ml = p.part_ml + ((b * p.n_split + split) * p.n_heads + h) * 2;
        ml[0] = m_run[half];
        ml[1] = half ? l1 : l0;
      }
    }
  store_rows(p, b, split, hg0 + r0, 256 * wg + 2 * t, acc, l0, l1);
}

template <bool kWgS, bool kWgO> cudaError_t set_smem() {
  return cudaFuncSetAttribute(k_mla_bf16<kWgS, kWgO>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              kSmemBytes);
}

} // namespace

extern "C" {

int epic_cuk_mla_bf16_ok(int64_t width, int64_t lora, const void *pool) {
  return width == kW && lora == kL && ((uintptr_t)pool & 15u) == 0;
}

cudaError_t epic_cuk_mla_bf16_prepare(int max_smem_optin) {
  if (max_smem_optin < kSmemBytes || max_smem_optin < kSeeSmemBytes)
    return cudaErrorInvalidConfiguration;
  cudaError_t e = set_smem<true, true>();
  if (e == cudaSuccess)
    e = set_smem<true, false>();
  if (e == cudaSuccess)
    e = set_smem<false, true>();
  if (e == cudaSuccess)
    e = set_smem<false, false>();
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(k_mla_bf16_seesaw, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             kSeeSmemBytes);
  return e;
}

cudaError_t epic_cuk_mla_bf16_decode(const epic_cuk_mla_params *p, int variant, cudaStream_t st) {
  const dim3 grid((unsigned)p->n_split, (unsigned)((p->n_heads + kHG - 1) / kHG), (unsigned)p->n_q);
  switch (variant) {
  case 4: {
    // Pages of whole tiles only (a tile is then one page's rows); else the wgmma form.
    if (p->page_size % kTK != 0 || ((uintptr_t)p->pool & 15u) != 0) {
      k_mla_bf16<true, true><<<grid, kThreads, kSmemBytes, st>>>(*p);
      break;
    }
    // The pool as rows of 1,152 bytes; a bound past any page (the kernel reads only the
    // tiles its block tables name).
    epic_cuk_tmap map;
    const cudaError_t e = epic_cuk_tmap_fp8(&map, p->pool, (int64_t)1 << 30, kW * 2, kTK);
    if (e != cudaSuccess)
      return e;
    k_mla_bf16_seesaw<<<grid, kSeeThreads, kSeeSmemBytes, st>>>(*p, map);
    break;
  }
  case 3: k_mla_bf16<true, true><<<grid, kThreads, kSmemBytes, st>>>(*p); break;
  case 2: k_mla_bf16<false, true><<<grid, kThreads, kSmemBytes, st>>>(*p); break;
  case 1: k_mla_bf16<true, false><<<grid, kThreads, kSmemBytes, st>>>(*p); break;
  default: k_mla_bf16<false, false><<<grid, kThreads, kSmemBytes, st>>>(*p); break;
  }
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || p->n_split == 1)
    return e;
  return epic_cuk_mla_combine(p, st);
}

} // extern "C"
