// Flash-decoding MLA (absorbed form) over the paged latent cache, on TF32 tensor cores.
//
// One CTA = one query token x 64 heads x one split of the context. The token's 64
// query rows [q_abs | q_pe] (scaled by softmax_scale * log2 e) stay in shared memory;
// the cache is streamed in tiles of 16 rows (each row: 512 latent + 64 rope floats)
// with cp.async, two tiles in flight, and every row is read once for all 64 heads.
// Per tile:
//   scores S[64 x 16] = Q . L^T  (K = 576): warp w takes heads (w&1)*32..+32 and one
//                                 K quarter (w>>1); the four partial tiles are summed
//                                 in a fixed order through shared memory
//                                 ((q0 + q2) + (q1 + q3)), so results are reproducible;
//   online softmax in base 2 (running max / sum per head), P = exp2(S - max), 4 threads
//                                 per head row;
//   ctx[64 x 512] += P . L[:, :512]: warp w owns heads (w&1)*32..+32 and latent
//                                 columns (w>>1)*128..+128, accumulators in registers.
// Several splits of one token are merged by k_mla_combine (log-sum-exp weights).
//
// mma.m16n8k8.tf32 operands: thread (g = lane/4, t = lane%4) holds A rows g, g+8 at
// k = t, t+4 and B rows k = t, t+4 at column n = g. The K order inside a pair of k-steps
// is permuted (lane t takes physical columns 4t..4t+3: 4t, 4t+1 for the first step,
// 4t+2, 4t+3 for the second), the same permutation for A and B, so each operand is one
// 16-byte shared load. Shared rows are swizzled by 16-byte chunk (chunk ^= f(row),
// f = 0, 4, 2, 6 for row % 4 = 0..3) so that these loads and the column-wise loads of
// the P . L step are free of bank conflicts (queries use their own paired-row layout,
// see qidx). fp32 operands become TF32 by adding half a TF32 ulp to the bit pattern
// (round to nearest; the tensor core ignores the low 13 bits), one integer add instead
// of a cvt; in TF32 mode the queries are rounded once when staged, P per use, and the
// streamed cache rows are passed as raw bits (truncated); 3xTF32 splits x = hi + lo.
#include <math.h>
#include <stdint.h>

#include "kern_mla_common.cuh"

namespace {

constexpr int kHG = 64;    // heads per CTA
constexpr int kTK = 16;    // cache rows per tile
constexpr int kWMax = 576; // widest row the shared layout holds
constexpr int kLoraMax = 512;
constexpr int kThreads = 256;
constexpr int kSLd = 20; // row stride of the score / probability tiles

__host__ __device__ constexpr int row_floats(int width) {
  return (width + 31) / 32 * 32;
}

__host__ __device__ constexpr size_t smem_bytes(int ws) {
  return (size_t)(kHG * ws + 2 * kTK * ws + 2 * kHG * kSLd + 3 * kHG) * sizeof(float);
}

__device__ __forceinline__ int swz(int row, int col, int ws) {
  return row * ws + ((((col >> 2) ^ (((row & 1) << 2) | (row & 2)))) << 2) + (col & 3);
}

// TF32 operand bits of x, rounded to nearest (the tensor core drops the low 13 bits).
__device__ __forceinline__ uint32_t tf32_bits(float x) {
  return __float_as_uint(x) + 0x1000u;
}

// hi / lo TF32 parts of x: hi = x rounded to TF32, lo = x - hi rounded to TF32.
template <bool kExact>
__device__ __forceinline__ void tf32_split(float x, uint32_t &hi, uint32_t &lo) {
  hi = tf32_bits(x);
  if (kExact) {
    hi &= 0xffffe000u;
    lo = tf32_bits(x - __uint_as_float(hi));
  }
}

// Operands of the streamed cache rows: 3xTF32 split in exact mode; in TF32 mode the raw
// bits (the tensor core truncates them to TF32: at most one TF32 ulp, saving an add per
// element on the hottest loads).
template <bool kExact>
__device__ __forceinline__ void tf32_row_operand(float x, uint32_t &hi, uint32_t &lo) {
  if (kExact)
    tf32_split<true>(x, hi, lo);
  else
    hi = __float_as_uint(x);
}

// Query layout: rows r and r + 8 of each 16-row MMA tile are interleaved column by column
// ("paired rows", pr = 8 * (r / 16) + r % 8), so one 16-byte load gives a whole A
// fragment {Q[g][c], Q[g+8][c], Q[g][c+1], Q[g+8][c+1]}; 16-byte chunks are swizzled
// with the parity of the paired row, which keeps those loads free of bank conflicts.
__device__ __forceinline__ int qidx(int r, int c, int ws) {
  const int pr = (r >> 4) * 8 + (r & 7), pos = 2 * c + ((r >> 3) & 1);
  return pr * 2 * ws + (((pos >> 2) ^ (pr & 1)) << 2) + (pos & 3);
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// d += A . B from split operands: hi*hi, plus hi*lo + lo*hi in exact mode (3xTF32,
// about 21 mantissa bits).
template <bool kExact>
__device__ __forceinline__ void mma3(float (&d)[4], const uint32_t (&ah)[4],
                                     const uint32_t (&al)[4], const uint32_t (&bh)[2],
                                     const uint32_t (&bl)[2]) {
  if (kExact) {
    mma_tf32(d, al[0], al[1], al[2], al[3], bh[0], bh[1]);
    mma_tf32(d, ah[0], ah[1], ah[2], ah[3], bl[0], bl[1]);
  }
  mma_tf32(d, ah[0], ah[1], ah[2], ah[3], bh[0], bh[1]);
}

__device__ __forceinline__ void cp_async16(float *dst, const float *src, int bytes) {
  epic_cp_async16(epic_smem_u32(dst), src, bytes);
}

// Score-tile fragment element c of tile (mt, nt) of a warp whose heads start at h0.
__device__ __forceinline__ int frag_idx(int h0, int mt, int nt, int c, int g, int t) {
  return (h0 + mt * 16 + g + ((c >> 1) << 3)) * kSLd + nt * 8 + 2 * t + (c & 1);
}

// kFull: the DeepSeek-V3 shape (576-float rows, 512 latent, pages of a power-of-two
// size >= 16 so a 16-row tile never straddles a page). Every shared address is then a
// per-thread base plus a compile-time offset and the P . L loop has no predicates;
// the generic instantiation handles any width % 4 == 0, lora % 8 == 0, page size.
template <bool kExact, bool kFull>
__global__ void __launch_bounds__(kThreads, 1) k_mla_decode(epic_cuk_mla_params p, int ws_arg) {
  extern __shared__ __align__(16) float sm[];
  const int ws = kFull ? kWMax : ws_arg;
  float *qs = sm;                 // [kHG][ws]
  float *ls = qs + kHG * ws;      // [2][kTK][ws]
  float *ss = ls + 2 * kTK * ws;  // [kHG][kSLd] partial scores
  float *ps = ss + kHG * kSLd;    // [kHG][kSLd] partial scores, then probabilities
  float *m_run = ps + kHG * kSLd; // running max (log2 domain)
  float *l_run = m_run + kHG;     // running sum
  float *corr = l_run + kHG;      // rescale factor of the current tile

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int64_t b = blockIdx.z, n_heads = p.n_heads;
  const int64_t lora = kFull ? kLoraMax : p.lora, width = kFull ? kWMax : p.width;
  const int64_t rope = width - lora;
  const int hg0 = blockIdx.y * kHG, split = blockIdx.x, n_split = p.n_split;
  const int32_t *table = p.tables + b * p.table_stride;
  const epic_mla_split keys = epic_mla_split_keys<kTK>(p, b, split);
  const int kbeg = keys.kbeg, kend = keys.kend, n_tiles = keys.n_tiles;
  const int c4 = ws >> 2; // 16-byte chunks per shared row
  const int page_size = (int)p.page_size, page_shift = p.page_shift;
  const float *pool = static_cast<const float *>(p.pool); // fp32 rows (bf16: kern_mla_bf16.cu)

  // This thread's chunks of a tile: i = tid + j * kThreads, walked without divisions.
  const int r_first = tid / c4, c_first = tid - r_first * c4;
  const int dr = kThreads / c4, dc = kThreads - dr * c4;
  auto load_tile = [&](int tile, int buf) {
    float *dst = ls + buf * kTK * ws;
    const int k0 = kbeg + tile * kTK;
    int r = r_first, cc = c_first;
    if constexpr (kFull) { // the whole tile lies in one page
      const int64_t page = table[k0 >> page_shift];
      const float *tb = pool + (page * page_size + (k0 & (page_size - 1))) * kWMax;
#pragma unroll
      for (int j = 0; j < kTK * (kWMax / 4) / kThreads; j++) {
        cp_async16(dst + swz(r, cc * 4, kWMax), tb + r * kWMax + cc * 4, k0 + r < kend ? 16 : 0);
        cc += dc;
        r += dr;
        if (cc >= c4) {
          cc -= c4;
          r++;
        }
      }
    } else {
      for (int i = tid; i < kTK * c4; i += kThreads) {
        const int key = k0 + r, col = cc * 4;
        const float *src = pool;
        int bytes = 0; // zero-fill rows past the split and columns past the row
        if (key < kend && col < width) {
          int page, row;
          if (page_shift >= 0) {
            page = table[key >> page_shift];
            row = key & (page_size - 1);
          } else {
            const int pi = key / page_size;
            page = table[pi];
            row = key - pi * page_size;
          }
          src = pool + ((int64_t)page * page_size + row) * width + col;
          bytes = 16;
        }
        cp_async16(dst + swz(r, col, ws), src, bytes);
        cc += dc;
        r += dr;
        if (cc >= c4) {
          cc -= c4;
          r++;
        }
      }
    }
    epic_cp_async_commit();
  };

  if (n_tiles > 0)
    load_tile(0, 0);
  // Stage the 64 query rows: 16-byte loads (lora % 8 == 0, so no chunk straddles q_abs /
  // q_pe), scaled, rounded once for TF32 mode, scattered into the paired-row layout.
  const int qa_vec = ((uintptr_t)p.q_abs & 15u) == 0;
  const int qp_vec = !p.q_pe || ((uintptr_t)p.q_pe & 15u) == 0;
  for (int i = tid; i < kHG * c4; i += kThreads) {
    const int r = i / c4, c = (i - r * c4) * 4;
    const int64_t h = hg0 + r;
    float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (h < n_heads && c < width) {
      const float *src = c < lora ? p.q_abs + (b * n_heads + h) * lora + c
                                  : p.q_pe + (b * n_heads + h) * rope + (c - lora);
      if (c < lora ? qa_vec : qp_vec) {
        const float4 f = *(const float4 *)src;
        v[0] = f.x;
        v[1] = f.y;
        v[2] = f.z;
        v[3] = f.w;
      } else {
#pragma unroll
        for (int j = 0; j < 4; j++)
          v[j] = src[j];
      }
    }
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const float x = v[j] * p.qscale;
      // Single TF32 pass: store the rounded operand once instead of rounding per use.
      qs[qidx(r, c + j, ws)] = kExact ? x : __uint_as_float(tf32_bits(x));
    }
  }
  if (tid < kHG) {
    m_run[tid] = -INFINITY;
    l_run[tid] = 0.0f;
  }

  const int hsel = warp & 1;     // head half of both phases
  const int quarter = warp >> 1; // K quarter (scores) / latent column quarter (P . L)
  const int h0 = hsel * 32;
  const int npairs = ws / 16;
  const int p0 = quarter * npairs / 4, p1 = (quarter + 1) * npairs / 4;

  // kFull address bases (see the swizzle note at the top). Score loads: rows h0 + g
  // (+8, +16, +24) of qs and g (+8) of the tile share f = f(g); logical chunk 4pp + t
  // sits at 4 * (pp ^ (f >> 2)) + (t ^ (f & 3)).
  const int f_g = ((g & 1) << 2) | (g & 2);
  const int lt_g = 4 * (t ^ (f_g & 3));
  const int odd_shift = 16 * (f_g >> 2); // +16 floats for even pp, -16 for odd pp
  const int par0 = (p0 & 1) ? -odd_shift : odd_shift, par1 = -par0;
  const int lb_base = g * kWMax + lt_g + 16 * p0;
  // A fragments: paired row (h0 / 16) * 8 + g; the chunk of step s is 8pp + 2t + s, stored
  // at chunk ^ (g & 1).
  const int qa_row = ((h0 >> 4) * 8 + g) * 2 * ws + 8 * t;
  const int qa_s0 = qa_row + 4 * (g & 1), qa_s1 = qa_row + 4 * (1 - (g & 1));
  // P . L loads: rows ks*8 + t (+4) share f = f(t); column quarter*128 + nt*8 + g sits at
  // chunk quarter*32 + ((2nt) ^ f) + (g >> 2).
  const int f_t = ((t & 1) << 2) | (t & 2);
  int pl_base[4];
#pragma unroll
  for (int i = 0; i < 4; i++)
    pl_base[i] = t * kWMax + 4 * (quarter * 32 + ((2 * i) ^ f_t) + (g >> 2)) + (g & 3);

  float acc[2][16][4];
#pragma unroll
  for (int mt = 0; mt < 2; mt++)
#pragma unroll
    for (int nt = 0; nt < 16; nt++)
#pragma unroll
      for (int c = 0; c < 4; c++)
        acc[mt][nt][c] = 0.0f;

  for (int tile = 0; tile < n_tiles; tile++) {
    const int buf = tile & 1;
    epic_cp_async_wait_all();
    __syncthreads(); // tile landed; the previous P . L no longer reads the other buffer
    if (tile + 1 < n_tiles)
      load_tile(tile + 1, buf ^ 1);
    const float *lt = ls + buf * kTK * ws;

    // Scores of this warp's K quarter for its 32 heads x 16 keys.
    float s[2][2][4], s2[2][2][4]; // two accumulator chains (k-step 0 / 1 of each pair)
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
      for (int nt = 0; nt < 2; nt++)
#pragma unroll
        for (int c = 0; c < 4; c++)
          s[mt][nt][c] = s2[mt][nt][c] = 0.0f;
    auto score_pair = [&](const float4(&q)[2][2], const float4(&l)[2]) { // q[mt][step]
      uint32_t ah[2][2][4], al[2][2][4], bh[2][2][2], bl[2][2][2];       // [tile][step][reg]
#pragma unroll
      for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int step = 0; step < 2; step++) {
          const float4 a = q[mt][step];
          if (kExact) {
            tf32_split<true>(a.x, ah[mt][step][0], al[mt][step][0]);
            tf32_split<true>(a.y, ah[mt][step][1], al[mt][step][1]);
            tf32_split<true>(a.z, ah[mt][step][2], al[mt][step][2]);
            tf32_split<true>(a.w, ah[mt][step][3], al[mt][step][3]);
          } else { // already rounded in shared memory
            ah[mt][step][0] = __float_as_uint(a.x);
            ah[mt][step][1] = __float_as_uint(a.y);
            ah[mt][step][2] = __float_as_uint(a.z);
            ah[mt][step][3] = __float_as_uint(a.w);
          }
        }
#pragma unroll
      for (int nt = 0; nt < 2; nt++) {
        tf32_row_operand<kExact>(l[nt].x, bh[nt][0][0], bl[nt][0][0]);
        tf32_row_operand<kExact>(l[nt].y, bh[nt][0][1], bl[nt][0][1]);
        tf32_row_operand<kExact>(l[nt].z, bh[nt][1][0], bl[nt][1][0]);
        tf32_row_operand<kExact>(l[nt].w, bh[nt][1][1], bl[nt][1][1]);
      }
#pragma unroll
      for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
          mma3<kExact>(s[mt][nt], ah[mt][0], al[mt][0], bh[nt][0], bl[nt][0]);
          mma3<kExact>(s2[mt][nt], ah[mt][1], al[mt][1], bh[nt][1], bl[nt][1]);
        }
    };
    if constexpr (kFull) {
      static_assert(kWMax / 16 % 4 == 0, "quarters of whole pairs");
#pragma unroll
      for (int i = 0; i < kWMax / 16 / 4; i++) {
        const int par = (i & 1) ? par1 : par0;
        const float *lb = lt + lb_base + par + 16 * i;
        const int qo = 32 * (p0 + i);
        float4 q[2][2], l[2];
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
          q[mt][0] = *(const float4 *)(qs + qa_s0 + qo + mt * 8 * 2 * kWMax);
          q[mt][1] = *(const float4 *)(qs + qa_s1 + qo + mt * 8 * 2 * kWMax);
        }
        l[0] = *(const float4 *)lb;
        l[1] = *(const float4 *)(lb + 8 * kWMax);
        score_pair(q, l);
      }
    } else {
      for (int pp = p0; pp < p1; pp++) {
        const int col = pp * 16 + t * 4;
        float4 q[2][2], l[2];
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
          q[mt][0] = *(const float4 *)(qs + qa_s0 + 32 * pp + mt * 16 * ws);
          q[mt][1] = *(const float4 *)(qs + qa_s1 + 32 * pp + mt * 16 * ws);
        }
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
          l[nt] = *(const float4 *)(lt + swz(nt * 8 + g, col, ws));
        score_pair(q, l);
      }
    }

#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
      for (int nt = 0; nt < 2; nt++)
#pragma unroll
        for (int c = 0; c < 4; c++)
          s[mt][nt][c] += s2[mt][nt][c];
    // Sum the quarters in a fixed order, (q0 + q2) in ss and (q1 + q3) in ps; every thread
    // of a pair of warps touches only its own fragment positions.
    if (quarter >= 2) {
      float *dst = quarter == 2 ? ss : ps;
#pragma unroll
      for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
          for (int c = 0; c < 4; c++)
            dst[frag_idx(h0, mt, nt, c, g, t)] = s[mt][nt][c];
    }
    __syncthreads();
    if (quarter <= 1) {
      float *dst = quarter == 0 ? ss : ps;
#pragma unroll
      for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
          for (int c = 0; c < 4; c++) {
            const int i = frag_idx(h0, mt, nt, c, g, t);
            dst[i] = s[mt][nt][c] + dst[i];
          }
    }
    __syncthreads();
    { // online softmax on all threads: 4 per head row, 4 keys each; P replaces ps in place
      const int row = tid >> 2, q4 = (tid & 3) * 4;
      const int k0 = kbeg + tile * kTK;
      const float4 a4 = *(const float4 *)(ss + row * kSLd + q4);
      const float4 b4 = *(const float4 *)(ps + row * kSLd + q4);
      float v[4] = {a4.x + b4.x, a4.y + b4.y, a4.z + b4.z, a4.w + b4.w};
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < 4; j++) {
        if (k0 + q4 + j >= kend)
          v[j] = -INFINITY;
        mx = fmaxf(mx, v[j]);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_old = m_run[row];
      const float m_new = fmaxf(m_old, mx); // finite: every tile holds a valid key
      const float cr = exp2f(m_old - m_new);
      float pj[4], sum = 0.0f;
#pragma unroll
      for (int j = 0; j < 4; j++) {
        pj[j] = exp2f(v[j] - m_new);
        sum += pj[j];
      }
      *(float4 *)(ps + row * kSLd + q4) = make_float4(pj[0], pj[1], pj[2], pj[3]);
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      __syncwarp(); // the row's four readers of m_run / l_run before its one writer
      if ((tid & 3) == 0) {
        m_run[row] = m_new;
        l_run[row] = l_run[row] * cr + sum;
        corr[row] = cr;
      }
    }
    __syncthreads();

    { // ctx += P . L over this warp's 32 heads x 128 latent columns
#pragma unroll
      for (int mt = 0; mt < 2; mt++) {
        const float c0 = corr[h0 + mt * 16 + g], c1 = corr[h0 + mt * 16 + g + 8];
        // Once the running max settles the factors are exactly 1: skip the multiplies.
        if (__any_sync(0xffffffffu, c0 != 1.0f || c1 != 1.0f)) {
#pragma unroll
          for (int nt = 0; nt < 16; nt++) {
            acc[mt][nt][0] *= c0;
            acc[mt][nt][1] *= c0;
            acc[mt][nt][2] *= c1;
            acc[mt][nt][3] *= c1;
          }
        }
      }
#pragma unroll
      for (int ks = 0; ks < 2; ks++) {
        uint32_t ah[2][4], al[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
          const float *pr = ps + (h0 + mt * 16 + g) * kSLd + ks * 8 + t;
          tf32_split<kExact>(pr[0], ah[mt][0], al[mt][0]);
          tf32_split<kExact>(pr[8 * kSLd], ah[mt][1], al[mt][1]);
          tf32_split<kExact>(pr[4], ah[mt][2], al[mt][2]);
          tf32_split<kExact>(pr[8 * kSLd + 4], ah[mt][3], al[mt][3]);
        }
#pragma unroll
        for (int nt = 0; nt < 16; nt++) {
          uint32_t bh[2], bl[2];
          if constexpr (kFull) {
            const float *lp = lt + pl_base[nt & 3] + ks * 8 * kWMax + 32 * (nt >> 2);
            tf32_row_operand<kExact>(lp[0], bh[0], bl[0]);
            tf32_row_operand<kExact>(lp[4 * kWMax], bh[1], bl[1]);
          } else {
            const int d = quarter * 128 + nt * 8;
            if (d >= lora)
              continue;
            tf32_row_operand<kExact>(lt[swz(ks * 8 + t, d + g, ws)], bh[0], bl[0]);
            tf32_row_operand<kExact>(lt[swz(ks * 8 + t + 4, d + g, ws)], bh[1], bl[1]);
          }
#pragma unroll
          for (int mt = 0; mt < 2; mt++)
            mma3<kExact>(acc[mt][nt], ah[mt], al[mt], bh, bl);
        }
      }
    }
  }

  // Final ctx (one split) or this split's unnormalised partial with its max and sum.
  // m_run / l_run were last written before the last barrier of the loop.
  if (n_tiles == 0)
    __syncthreads();
#pragma unroll
  for (int mt = 0; mt < 2; mt++)
#pragma unroll
    for (int half = 0; half < 2; half++) {
      const int row = h0 + mt * 16 + g + half * 8;
      const int64_t h = hg0 + row;
      if (h >= n_heads)
        continue;
      const float inv = n_split == 1 ? 1.0f / l_run[row] : 1.0f;
      float *out = n_split == 1 ? p.ctx + (b * n_heads + h) * lora
                                : p.part_acc + ((b * n_split + split) * n_heads + h) * lora;
#pragma unroll
      for (int nt = 0; nt < 16; nt++) {
        const int d = quarter * 128 + nt * 8 + 2 * t;
        if (d < lora) {
          const float v0 = acc[mt][nt][half * 2] * inv, v1 = acc[mt][nt][half * 2 + 1] * inv;
          if (((uintptr_t)(out + d) & 7u) == 0) {
            *(float2 *)(out + d) = make_float2(v0, v1);
          } else { // a caller's ctx slice need not be 8-byte aligned
            out[d] = v0;
            out[d + 1] = v1;
          }
        }
      }
    }
  if (n_split > 1 && tid < kHG && hg0 + tid < n_heads) {
    float *ml = p.part_ml + ((b * n_split + split) * n_heads + hg0 + tid) * 2;
    ml[0] = m_run[tid];
    ml[1] = l_run[tid];
  }
}

// ctx = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the splits of one (token, head).
// Warp 0 turns the split maxima into weights (shared), then each thread streams four
// latent columns of every split with 16-byte loads, several splits in flight.
__global__ void k_mla_combine(epic_cuk_mla_params p) {
  __shared__ float wsplit[EPIC_CUDA_MLA_MAX_SPLIT];
  __shared__ float inv_l;
  const int64_t h = blockIdx.x, b = blockIdx.y, H = p.n_heads, lora = p.lora;
  const int S = p.n_split, lane = threadIdx.x & 31;
  const float *ml = p.part_ml + (b * S * H + h) * 2; // split s at ml[s * H * 2]
  if (threadIdx.x < 32) {
    float mx = -INFINITY;
    for (int s = lane; s < S; s += 32)
      mx = fmaxf(mx, ml[(int64_t)s * H * 2]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float l = 0.0f;
    for (int s = lane; s < S; s += 32) {
      const float ms = ml[(int64_t)s * H * 2];
      const float w = ms == -INFINITY ? 0.0f : exp2f(ms - mx); // empty split: no keys
      wsplit[s] = w;
      l += w * ml[(int64_t)s * H * 2 + 1];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
      l += __shfl_xor_sync(0xffffffffu, l, o);
    if (lane == 0)
      inv_l = 1.0f / l;
  }
  __syncthreads();
  const float *acc = p.part_acc + (b * S * H + h) * lora; // split s at acc[s * H * lora]
  float *out = p.ctx + (b * H + h) * lora;
  for (int64_t d = threadIdx.x * 4; d < lora; d += blockDim.x * 4) {
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 8
    for (int s = 0; s < S; s++) {
      const float4 a = *(const float4 *)(acc + (int64_t)s * H * lora + d);
      const float w = wsplit[s];
      v.x += w * a.x;
      v.y += w * a.y;
      v.z += w * a.z;
      v.w += w * a.w;
    }
    if (((uintptr_t)(out + d) & 15u) == 0) {
      *(float4 *)(out + d) = make_float4(v.x * inv_l, v.y * inv_l, v.z * inv_l, v.w * inv_l);
    } else {
      out[d] = v.x * inv_l;
      out[d + 1] = v.y * inv_l;
      out[d + 2] = v.z * inv_l;
      out[d + 3] = v.w * inv_l;
    }
  }
}

} // namespace

extern "C" {

int epic_cuk_mla_decode_ok(int64_t width, int64_t lora, const void *pool) {
  return lora > 0 && lora % 8 == 0 && lora <= kLoraMax && width >= lora && width <= kWMax &&
         width % 4 == 0 && ((uintptr_t)pool & 15u) == 0;
}

size_t epic_cuk_mla_decode_smem(int64_t width) {
  return smem_bytes(row_floats((int)width));
}

cudaError_t epic_cuk_mla_decode_prepare(int max_smem_optin) {
  const size_t need = smem_bytes(row_floats(kWMax));
  if ((size_t)max_smem_optin < need)
    return cudaErrorInvalidConfiguration;
  const cudaFuncAttribute a = cudaFuncAttributeMaxDynamicSharedMemorySize;
  cudaError_t e = cudaFuncSetAttribute(k_mla_decode<false, false>, a, (int)need);
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(k_mla_decode<true, false>, a, (int)need);
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(k_mla_decode<false, true>, a, (int)need);
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(k_mla_decode<true, true>, a, (int)need);
  return e;
}

cudaError_t epic_cuk_mla_decode(const epic_cuk_mla_params *p, int exact, cudaStream_t st) {
  const int ws = row_floats((int)p->width);
  const dim3 grid((unsigned)p->n_split, (unsigned)((p->n_heads + kHG - 1) / kHG), (unsigned)p->n_q);
  const size_t smem = smem_bytes(ws);
  const int full = p->width == kWMax && p->lora == kLoraMax && p->page_shift >= 4;
  if (full && exact)
    k_mla_decode<true, true><<<grid, kThreads, smem, st>>>(*p, ws);
  else if (full)
    k_mla_decode<false, true><<<grid, kThreads, smem, st>>>(*p, ws);
  else if (exact)
    k_mla_decode<true, false><<<grid, kThreads, smem, st>>>(*p, ws);
  else
    k_mla_decode<false, false><<<grid, kThreads, smem, st>>>(*p, ws);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || p->n_split == 1)
    return e;
  return epic_cuk_mla_combine(p, st);
}

cudaError_t epic_cuk_mla_combine(const epic_cuk_mla_params *p, cudaStream_t st) {
  k_mla_combine<<<dim3((unsigned)p->n_heads, (unsigned)p->n_q), 128, 0, st>>>(*p);
  return cudaGetLastError();
}

} // extern "C"
