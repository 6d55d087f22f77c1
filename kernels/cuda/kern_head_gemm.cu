// Per-head products of the MLA absorption at decode sizes, with bf16 weights: for every
// head h and token t of at most EPIC_CUK_HEAD_MAX_M tokens,
//   trans 0: y[t][h][j] = sum_i x[t][h][i] * A_h[i][j]   (A_h [k][n], W_UK: q_nope -> latent)
//   trans 1: y[t][h][r] = sum_i x[t][h][i] * A_h[r][i]   (A_h [n][k], W_UV: latent -> v)
// At a few tokens the work is reading A once (V3: 128 heads x 128 x 512 bf16, 16.8 MB per
// product, where cuBLAS's fp32 batched GEMM read twice the bytes at about 1.2 TB/s). x
// stays fp32 (staged in shared memory), each weight element is widened exactly and the
// products are summed in fp32 in an order fixed by the shape: a token's result does not
// depend on how many tokens share the call (the fast precision's form, k_head_nt / _tn).
// The invariant precision's form (k_head_rows, below) serves every token count
// with one arithmetic on tensor cores: x rounded to bf16, mma.sync with fp32 sums.
#include <stdint.h>

#include "kern_mla_common.cuh"

namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr size_t kSmemMax = 48 * 1024; // dynamic shared memory without an opt-in
constexpr int kCols = 256; // trans 0: output columns per CTA (8 per lane)
constexpr int kRows = 64;  // trans 1: output rows per CTA

__device__ __forceinline__ void widen8(uint4 v, float *o) {
  const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; i++) {
    o[2 * i] = __uint_as_float(u[i] << 16);
    o[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
  }
}

// x[t][h][0..k) of the m tokens into xs[M][k]; rows m..M-1 zero.
template <int M>
__device__ __forceinline__ void stage_x(float *xs, const float *x, int64_t ld_tok, int64_t ld_head,
                                        int h, int m, int k) {
  for (int i = threadIdx.x; i < M * k; i += kThreads) {
    const int t = i / k, c = i - t * k;
    xs[i] = t < m ? x[t * ld_tok + h * ld_head + c] : 0.0f;
  }
}

// trans 0. CTA (column slab, head): lane l owns columns j0 + 8l .. +7, warp w the rows
// i = w, w + 8, ... of A_h; the 8 warps' sums are added in warp order.
template <int M>
__global__ void __launch_bounds__(kThreads)
    k_head_nt(const float *x, int64_t ld_x_tok, int64_t ld_x_head, int m, const uint16_t *a,
              int64_t ld_a_head, int k, int n, float *y, int64_t ld_y_tok, int64_t ld_y_head) {
  extern __shared__ __align__(16) float xs[]; // [M][k], then the reduction [kWarps][kCols]
  float *red = xs + M * k;
  const int h = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int j = blockIdx.x * kCols + lane * 8;
  stage_x<M>(xs, x, ld_x_tok, ld_x_head, h, m, k);
  __syncthreads();
  float acc[M][8];
#pragma unroll
  for (int t = 0; t < M; t++)
#pragma unroll
    for (int e = 0; e < 8; e++)
      acc[t][e] = 0.0f;
  if (j < n) {
    const uint16_t *ah = a + h * ld_a_head + j;
    int i = warp;
    // Eight rows' loads in flight per lane before any is used.
    for (; i + 7 * kWarps < k; i += 8 * kWarps) {
      uint4 v[8];
#pragma unroll
      for (int u = 0; u < 8; u++)
        v[u] = __ldg(reinterpret_cast<const uint4 *>(ah + (int64_t)(i + u * kWarps) * n));
#pragma unroll
      for (int u = 0; u < 8; u++) {
        float w[8];
        widen8(v[u], w);
#pragma unroll
        for (int t = 0; t < M; t++) {
          const float xv = xs[t * k + i + u * kWarps];
#pragma unroll
          for (int e = 0; e < 8; e++)
            acc[t][e] = fmaf(xv, w[e], acc[t][e]);
        }
      }
    }
    for (; i < k; i += kWarps) {
      float w[8];
      widen8(__ldg(reinterpret_cast<const uint4 *>(ah + (int64_t)i * n)), w);
#pragma unroll
      for (int t = 0; t < M; t++) {
        const float xv = xs[t * k + i];
#pragma unroll
        for (int e = 0; e < 8; e++)
          acc[t][e] = fmaf(xv, w[e], acc[t][e]);
      }
    }
  }
  for (int t = 0; t < m && t < M; t++) {
#pragma unroll
    for (int e = 0; e < 8; e++)
      red[warp * kCols + lane * 8 + e] = acc[t][e];
    __syncthreads();
    const int c = threadIdx.x, jc = blockIdx.x * kCols + c;
    if (jc < n) {
      float s = red[c];
#pragma unroll
      for (int w = 1; w < kWarps; w++)
        s += red[w * kCols + c];
      y[t * ld_y_tok + h * ld_y_head + jc] = s;
    }
    __syncthreads();
  }
}

// trans 1. CTA (row slab, head): warp w takes kRowsPass rows at a time (rows r0 .. r0 + 3,
// r0 = w * kRowsPass, then 32 further), so that each x value read from shared memory serves
// all of them; lane l reads columns 8l + 256q .. +7 of each; the lanes' sums meet in a
// shuffle tree.
constexpr int kRowsPass = 4;
template <int M>
__global__ void __launch_bounds__(kThreads)
    k_head_tn(const float *x, int64_t ld_x_tok, int64_t ld_x_head, int m, const uint16_t *a,
              int64_t ld_a_head, int k, int n, float *y, int64_t ld_y_tok, int64_t ld_y_head) {
  extern __shared__ __align__(16) float xs[]; // [M][k]
  const int h = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  stage_x<M>(xs, x, ld_x_tok, ld_x_head, h, m, k);
  __syncthreads();
  const int r_end = min(n, (int)(blockIdx.x + 1) * kRows);
  for (int r0 = blockIdx.x * kRows + warp * kRowsPass; r0 < r_end; r0 += kWarps * kRowsPass) {
    const uint16_t *ar[kRowsPass];
#pragma unroll
    for (int e = 0; e < kRowsPass; e++) // rows past the slab re-read r0 and are not stored
      ar[e] = a + h * ld_a_head + (int64_t)(r0 + e < r_end ? r0 + e : r0) * k;
    float s[kRowsPass][M];
#pragma unroll
    for (int e = 0; e < kRowsPass; e++)
#pragma unroll
      for (int t = 0; t < M; t++)
        s[e][t] = 0.0f;
    for (int c0 = 0; c0 < k; c0 += 2 * kCols) {
      uint4 v[kRowsPass][2];
#pragma unroll
      for (int e = 0; e < kRowsPass; e++)
#pragma unroll
        for (int q = 0; q < 2; q++) {
          const int c = c0 + q * kCols + lane * 8;
          v[e][q] =
              c < k ? __ldg(reinterpret_cast<const uint4 *>(ar[e] + c)) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
      for (int q = 0; q < 2; q++) {
        const int c = c0 + q * kCols + lane * 8;
        if (c >= k)
          continue;
        float w[kRowsPass][8];
#pragma unroll
        for (int e = 0; e < kRowsPass; e++)
          widen8(v[e][q], w[e]);
#pragma unroll
        for (int t = 0; t < M; t++) {
          const float4 xa = *reinterpret_cast<const float4 *>(xs + t * k + c);
          const float4 xb = *reinterpret_cast<const float4 *>(xs + t * k + c + 4);
          const float xv[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
#pragma unroll
          for (int e = 0; e < kRowsPass; e++)
#pragma unroll
            for (int i = 0; i < 8; i++)
              s[e][t] = fmaf(xv[i], w[e][i], s[e][t]);
        }
      }
    }
#pragma unroll
    for (int e = 0; e < kRowsPass; e++)
#pragma unroll
      for (int t = 0; t < M; t++)
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
          s[e][t] += __shfl_xor_sync(0xffffffffu, s[e][t], o);
    if (lane == 0)
      for (int t = 0; t < m && t < M; t++)
#pragma unroll
        for (int e = 0; e < kRowsPass; e++)
          if (r0 + e < r_end)
            y[t * ld_y_tok + h * ld_y_head + r0 + e] = s[e][t];
  }
}

template <int M> size_t smem_of(int k, int trans) {
  return (size_t)M * k * sizeof(float) + (trans ? 0 : (size_t)kWarps * kCols * sizeof(float));
}

template <int M>
cudaError_t launch(const float *x, int64_t ld_x_tok, int64_t ld_x_head, int m, int n_heads,
                   const uint16_t *a, int64_t ld_a_head, int k, int n, int trans, float *y,
                   int64_t ld_y_tok, int64_t ld_y_head, cudaStream_t st) {
  const size_t smem = smem_of<M>(k, trans);
  if (trans) {
    const dim3 grid((unsigned)((n + kRows - 1) / kRows), (unsigned)n_heads);
    k_head_tn<M><<<grid, kThreads, smem, st>>>(x, ld_x_tok, ld_x_head, m, a, ld_a_head, k, n, y,
                                               ld_y_tok, ld_y_head);
  } else {
    const dim3 grid((unsigned)((n + kCols - 1) / kCols), (unsigned)n_heads);
    k_head_nt<M><<<grid, kThreads, smem, st>>>(x, ld_x_tok, ld_x_head, m, a, ld_a_head, k, n, y,
                                               ld_y_tok, ld_y_head);
  }
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------
// The row-invariant form on tensor cores (the invariant precision, any token count): x
// rounded to bf16 (nearest even), each output summed by chained mma.m16n8k16 (fp32
// accumulators, from zero) over k in ascending 32-column chunks, two 16-column steps per
// chunk. Within a chunk, lane quad q's eight columns 8q .. 8q + 7 feed step 0 with their
// first four (as the steps' columns 2q, 2q + 1 and 2q + 8, 2q + 9) and step 1 with the
// rest, in the weights and in x alike: so each lane's operands are one 16-byte weight load
// per row and one 16-byte read of x. An output is a function of its token row and its
// weight row (or column) only: how many tokens a call has, which CTA, token tile or warp
// takes it, never changes the operations on its values.

// The CTA's tokens t0 .. t0 + 8 * TT - 1 of head h as bf16 in fragment order: for token
// tile i, chunk c and lane l = 4 * (token % 8) + quad, the 16 bytes xs[(i * nch + c) * 32 +
// l] hold columns 32c + 8 * quad .. + 7. Columns past k and tokens past m are zero.
template <int TT>
__device__ __forceinline__ void stage_frag(uint4 *xs, const float *x, int64_t ld_tok,
                                           int64_t ld_head, int h, int t0, int m, int k,
                                           int nch) {
  const int groups = nch * 4; // 8-column groups per token
  const bool vec = ((uintptr_t)x & 15u) == 0 && ld_tok % 4 == 0 && ld_head % 4 == 0;
  for (int i = threadIdx.x; i < TT * 8 * groups; i += kThreads) {
    const int t = i / groups, c8 = i - t * groups;
    float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (t0 + t < m && c8 * 8 < k) // k % 8 == 0: a group is wholly in or out
      ld_f32x8(x + (int64_t)(t0 + t) * ld_tok + (int64_t)h * ld_head + c8 * 8, vec, v);
    xs[((t / 8) * nch + c8 / 4) * 32 + (t % 8) * 4 + c8 % 4] =
        make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]), pack_bf16(v[4], v[5]),
                   pack_bf16(v[6], v[7]));
  }
}

// Stores a warp's accumulator tile: output rows o0 (c0, c1) and o1 (c2, c3) for tokens
// t, t + 1 (t = t0 + 8i + 2 * quad).
template <int TT>
__device__ __forceinline__ void store_tile(const float (&acc)[TT][4], float *y, int64_t ld_tok,
                                           int64_t ld_head, int h, int t0, int m, int o0,
                                           int o1, int n) {
  const int q = threadIdx.x % 4;
#pragma unroll
  for (int i = 0; i < TT; i++) {
    const int t = t0 + 8 * i + 2 * q;
    float *yh = y + (int64_t)h * ld_head;
#pragma unroll
    for (int u = 0; u < 2; u++)
      if (t + u < m) {
        if (o0 < n)
          yh[(int64_t)(t + u) * ld_tok + o0] = acc[i][u];
        if (o1 < n)
          yh[(int64_t)(t + u) * ld_tok + o1] = acc[i][2 + u];
      }
  }
}

// trans 1 (A_h [n][k]): warp w of the CTA takes output rows r0 = 16 * (8 blockIdx.x + w)
// .. + 15: lane (g, q) loads rows r0 + g and r0 + g + 8, columns 32c + 8q .. + 7 of each
// chunk c, kChunksTn chunks ahead.
constexpr int kChunksTn = 8;
template <int TT>
__device__ __forceinline__ void rows_tn(const uint4 *xf, int nch, const uint16_t *ah, int k,
                                        int n, float *y, int64_t ld_y_tok, int64_t ld_y_head,
                                        int h, int t0, int m) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const int r0 = (blockIdx.x * kWarps + warp) * 16;
  if (r0 >= n)
    return;
  const bool va = r0 + g < n, vb = r0 + g + 8 < n;
  const uint16_t *pa = ah + (int64_t)(r0 + g) * k + 8 * q;
  const uint16_t *pb = pa + (int64_t)8 * k;
  float acc[TT][4] = {};
  for (int c0 = 0; c0 < nch; c0 += kChunksTn) {
    uint4 la[kChunksTn], lb[kChunksTn];
#pragma unroll
    for (int u = 0; u < kChunksTn; u++) {
      const bool in = 32 * (c0 + u) + 8 * q < k;
      la[u] = in && va ? ld_stream(pa + 32 * (c0 + u)) : make_uint4(0, 0, 0, 0);
      lb[u] = in && vb ? ld_stream(pb + 32 * (c0 + u)) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kChunksTn; u++) {
      if (c0 + u >= nch)
        break;
      uint4 b[TT];
#pragma unroll
      for (int i = 0; i < TT; i++)
        b[i] = xf[(i * nch + c0 + u) * 32 + lane];
      const uint32_t a0[4] = {la[u].x, lb[u].x, la[u].y, lb[u].y};
      const uint32_t a1[4] = {la[u].z, lb[u].z, la[u].w, lb[u].w};
#pragma unroll
      for (int i = 0; i < TT; i++)
        mma_bf16(acc[i][0], acc[i][1], acc[i][2], acc[i][3], a0, b[i].x, b[i].y);
#pragma unroll
      for (int i = 0; i < TT; i++)
        mma_bf16(acc[i][0], acc[i][1], acc[i][2], acc[i][3], a1, b[i].z, b[i].w);
    }
  }
  store_tile<TT>(acc, y, ld_y_tok, ld_y_head, h, t0, m, r0 + g, r0 + g + 8, n);
}

// trans 0 (A_h [k][n]): warp w of the CTA takes output columns j0 .. j0 + 63, j0 = 64 * (8
// blockIdx.x + w); lane (g, q) loads columns j0 + 8g .. + 7 of rows 32c + 8q .. + 7 of each
// chunk c and pairs the rows' values per column (byte permutes): mma tile T's rows g and
// g + 8 are columns j0 + 8g + 2T and that + 1.
constexpr int kChunksNt = 2;
__device__ __forceinline__ uint32_t word(const uint4 &v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}
template <int TT>
__device__ __forceinline__ void rows_nt(const uint4 *xf, int nch, const uint16_t *ah, int k,
                                        int n, float *y, int64_t ld_y_tok, int64_t ld_y_head,
                                        int h, int t0, int m) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const int j0 = (blockIdx.x * kWarps + warp) * 64;
  if (j0 >= n)
    return;
  const int jl = j0 + 8 * g;
  const bool vj = jl < n; // n % 8 == 0: a lane's columns are wholly in or out
  const uint16_t *p = ah + (int64_t)(8 * q) * n + jl;
  float acc[4][TT][4] = {};
  for (int c0 = 0; c0 < nch; c0 += kChunksNt) {
    uint4 l[kChunksNt][8];
#pragma unroll
    for (int u = 0; u < kChunksNt; u++)
#pragma unroll
      for (int e = 0; e < 8; e++) {
        const int i = 32 * (c0 + u) + 8 * q + e;
        l[u][e] = vj && i < k ? ld_stream(p + (int64_t)(32 * (c0 + u) + e) * n)
                              : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
    for (int u = 0; u < kChunksNt; u++) {
      if (c0 + u >= nch)
        break;
      uint4 b[TT];
#pragma unroll
      for (int i = 0; i < TT; i++)
        b[i] = xf[(i * nch + c0 + u) * 32 + lane];
#pragma unroll
      for (int s = 0; s < 2; s++) {
        const uint4 &r0 = l[u][4 * s], &r1 = l[u][4 * s + 1];
        const uint4 &r2 = l[u][4 * s + 2], &r3 = l[u][4 * s + 3];
#pragma unroll
        for (int T = 0; T < 4; T++) {
          const uint32_t af[4] = {__byte_perm(word(r0, T), word(r1, T), 0x5410),
                                  __byte_perm(word(r0, T), word(r1, T), 0x7632),
                                  __byte_perm(word(r2, T), word(r3, T), 0x5410),
                                  __byte_perm(word(r2, T), word(r3, T), 0x7632)};
#pragma unroll
          for (int i = 0; i < TT; i++)
            mma_bf16(acc[T][i][0], acc[T][i][1], acc[T][i][2], acc[T][i][3], af,
                     s ? b[i].z : b[i].x, s ? b[i].w : b[i].y);
        }
      }
    }
  }
#pragma unroll
  for (int T = 0; T < 4; T++)
    store_tile<TT>(acc[T], y, ld_y_tok, ld_y_head, h, t0, m, jl + 2 * T, jl + 2 * T + 1, n);
}

// CTA (slab blockIdx.x of outputs, head blockIdx.y, tokens 8 TT blockIdx.z ..): x staged,
// then each warp's outputs (rows_tn / rows_nt).
template <int TT, bool kTrans>
__global__ void __launch_bounds__(kThreads)
    k_head_rows(const float *x, int64_t ld_x_tok, int64_t ld_x_head, int m, const uint16_t *a,
                int64_t ld_a_head, int k, int n, float *y, int64_t ld_y_tok, int64_t ld_y_head) {
  extern __shared__ uint4 xf[]; // x in fragment order (stage_frag)
  const int h = blockIdx.y, t0 = blockIdx.z * 8 * TT, nch = (k + 31) / 32;
  stage_frag<TT>(xf, x, ld_x_tok, ld_x_head, h, t0, m, k, nch);
  __syncthreads();
  if (kTrans)
    rows_tn<TT>(xf, nch, a + h * ld_a_head, k, n, y, ld_y_tok, ld_y_head, h, t0, m);
  else
    rows_nt<TT>(xf, nch, a + h * ld_a_head, k, n, y, ld_y_tok, ld_y_head, h, t0, m);
}

template <int TT> size_t rows_smem(int k) { return (size_t)TT * ((k + 31) / 32) * 512; }

template <int TT>
cudaError_t launch_rows(const float *x, int64_t ld_x_tok, int64_t ld_x_head, int m, int n_heads,
                        const uint16_t *a, int64_t ld_a_head, int k, int n, int trans, float *y,
                        int64_t ld_y_tok, int64_t ld_y_head, cudaStream_t st) {
  const size_t smem = rows_smem<TT>(k);
  const int per_cta = kWarps * (trans ? 16 : 64);
  const dim3 grid((unsigned)((n + per_cta - 1) / per_cta), (unsigned)n_heads,
                  (unsigned)((m + 8 * TT - 1) / (8 * TT)));
  if (trans)
    k_head_rows<TT, true><<<grid, kThreads, smem, st>>>(x, ld_x_tok, ld_x_head, m, a, ld_a_head,
                                                        k, n, y, ld_y_tok, ld_y_head);
  else
    k_head_rows<TT, false><<<grid, kThreads, smem, st>>>(x, ld_x_tok, ld_x_head, m, a, ld_a_head,
                                                         k, n, y, ld_y_tok, ld_y_head);
  return cudaGetLastError();
}

} // namespace

extern "C" {

int epic_cuk_head_bf16_ok(int64_t m, int64_t n_heads, const void *a, int64_t ld_a_head, int64_t k,
                          int64_t n, int trans) {
  // 16-byte weight loads: every row of every head starts 16-byte aligned.
  const int64_t row = trans ? k : n;
  return m >= 1 && m <= EPIC_CUK_HEAD_MAX_M && n_heads >= 1 && n_heads <= 65535 && k >= 1 &&
         n >= 1 && k <= INT32_MAX && n <= INT32_MAX && row % 8 == 0 && ld_a_head % 8 == 0 &&
         ((uintptr_t)a & 15u) == 0 && smem_of<EPIC_CUK_HEAD_MAX_M>((int)k, trans) <= kSmemMax;
}

cudaError_t epic_cuk_head_bf16(const float *x, int64_t ld_x_tok, int64_t ld_x_head, int64_t m,
                               int64_t n_heads, const uint16_t *a, int64_t ld_a_head, int64_t k,
                               int64_t n, int trans, float *y, int64_t ld_y_tok, int64_t ld_y_head,
                               cudaStream_t st) {
  const int mi = (int)m, hi = (int)n_heads, ki = (int)k, ni = (int)n;
  if (m <= 1)
    return launch<1>(x, ld_x_tok, ld_x_head, mi, hi, a, ld_a_head, ki, ni, trans, y, ld_y_tok,
                     ld_y_head, st);
  if (m <= 2)
    return launch<2>(x, ld_x_tok, ld_x_head, mi, hi, a, ld_a_head, ki, ni, trans, y, ld_y_tok,
                     ld_y_head, st);
  if (m <= 4)
    return launch<4>(x, ld_x_tok, ld_x_head, mi, hi, a, ld_a_head, ki, ni, trans, y, ld_y_tok,
                     ld_y_head, st);
  return launch<8>(x, ld_x_tok, ld_x_head, mi, hi, a, ld_a_head, ki, ni, trans, y, ld_y_tok,
                   ld_y_head, st);
}

int epic_cuk_head_rows_ok(int64_t n_heads, const void *a, int64_t ld_a_head, int64_t k, int64_t n) {
  // Both layouts: rows of k ([n][k]) or n ([k][n]) elements, multiples of 8.
  return n_heads >= 1 && n_heads <= 65535 && k >= 8 && n >= 8 && k % 8 == 0 && n % 8 == 0 &&
         k <= INT32_MAX && n <= INT32_MAX && ld_a_head % 8 == 0 && ((uintptr_t)a & 15u) == 0 &&
         rows_smem<1>((int)k) <= kSmemMax;
}

cudaError_t epic_cuk_head_rows(const float *x, int64_t ld_x_tok, int64_t ld_x_head, int64_t m,
                               int64_t n_heads, const uint16_t *a, int64_t ld_a_head, int64_t k,
                               int64_t n, int trans, float *y, int64_t ld_y_tok, int64_t ld_y_head,
                               cudaStream_t st) {
  const int hi = (int)n_heads, ki = (int)k, ni = (int)n;
  // Token blocks go on the grid's z axis (at most 65535); more tokens in several launches.
  const int64_t per_launch = (int64_t)65535 * 8;
  for (int64_t t0 = 0; t0 < m; t0 += per_launch) {
    const int mi = (int)(m - t0 < per_launch ? m - t0 : per_launch);
    const float *xt = x + t0 * ld_x_tok;
    float *yt = y + t0 * ld_y_tok;
    // Token tiles per CTA: as many as the tokens fill, in kSmemMax of shared memory.
    const int tt = mi > 16 && rows_smem<4>(ki) <= kSmemMax   ? 4
                   : mi > 8 && rows_smem<2>(ki) <= kSmemMax ? 2
                                                              : 1;
    const cudaError_t e =
        tt == 4   ? launch_rows<4>(xt, ld_x_tok, ld_x_head, mi, hi, a, ld_a_head, ki, ni, trans, yt,
                                 ld_y_tok, ld_y_head, st)
        : tt == 2 ? launch_rows<2>(xt, ld_x_tok, ld_x_head, mi, hi, a, ld_a_head, ki, ni, trans, yt,
                                   ld_y_tok, ld_y_head, st)
                  : launch_rows<1>(xt, ld_x_tok, ld_x_head, mi, hi, a, ld_a_head, ki, ni, trans, yt,
                                   ld_y_tok, ld_y_head, st);
    if (e != cudaSuccess)
      return e;
  }
  return cudaSuccess;
}

} // extern "C"
