// Per-head products of the MLA absorption at decode sizes, with bf16 weights: for every
// head h and token t of at most EPIC_CUK_HEAD_MAX_M tokens,
//   trans 0: y[t][h][j] = sum_i x[t][h][i] * A_h[i][j]   (A_h [k][n], W_UK: q_nope -> latent)
//   trans 1: y[t][h][r] = sum_i x[t][h][i] * A_h[r][i]   (A_h [n][k], W_UV: latent -> v)
// At a few tokens the work is reading A once (V3: 128 heads x 128 x 512 bf16, 16.8 MB per
// product, where cuBLAS's fp32 batched GEMM read twice the bytes at about 1.2 TB/s). x
// stays fp32 (staged in shared memory), each weight element is widened exactly and the
// products are summed in fp32 in an order fixed by the shape: a token's result does not
// depend on how many tokens share the call.
#include <stdint.h>

#include "ops_cuda_impl.h"

namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32;
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

} // namespace

extern "C" {

int epic_cuk_head_bf16_ok(int64_t m, int64_t n_heads, const void *a, int64_t ld_a_head, int64_t k,
                          int64_t n, int trans) {
  // 16-byte weight loads: every row of every head starts 16-byte aligned.
  const int64_t row = trans ? k : n;
  return m >= 1 && m <= EPIC_CUK_HEAD_MAX_M && n_heads >= 1 && n_heads <= 65535 && k >= 1 &&
         n >= 1 && k <= INT32_MAX && n <= INT32_MAX && row % 8 == 0 && ld_a_head % 8 == 0 &&
         ((uintptr_t)a & 15u) == 0 && smem_of<EPIC_CUK_HEAD_MAX_M>((int)k, trans) <= 48 * 1024;
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

} // extern "C"
