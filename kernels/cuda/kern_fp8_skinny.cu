// Decode-sized FP8 matmul: y[m][n] = x[m][k] . W^T for an e4m3 weight with block
// scales and m <= 4 tokens. At these sizes the work is reading W once, so each warp
// streams two weight rows with 16-byte loads (four stripes of 512 columns in flight),
// converts e4m3 -> fp32 exactly, dots 16 columns at a time against the fp32 tokens held
// in shared memory, and applies the block scale per 16-column piece (a piece never
// crosses a scale block: block_cols % 16 == 0). No activation quantisation: the
// result is the fp32 product up to summation order. A persistent grid keeps the
// token staging (m * k * 4 bytes per CTA, from L2) small next to the weight bytes.
// Long rows are cut into column runs of at least four stripes, one warp per run, so that
// a pair of rows is read by several warps at once: one H100, m = 1, o_proj (7,168 x
// 16,384) 63.0 -> 49.9 us (8 runs), q_a 9.5 -> 8.4 us, an expert's gate 10.2 -> 9.5 us
// (2 runs); kernels/cuda/NOTES.md.
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "ops_cuda_impl.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr size_t kMaxSmem = 160 * 1024;

__device__ __forceinline__ void fp8x4(uint32_t u, float *o) {
  const __half2_raw h0 = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(u & 0xffffu), __NV_E4M3);
  const __half2_raw h1 = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(u >> 16), __NV_E4M3);
  const float2 f0 = __half22float2(__half2(h0)), f1 = __half22float2(__half2(h1));
  o[0] = f0.x;
  o[1] = f0.y;
  o[2] = f1.x;
  o[3] = f1.y;
}

__device__ __forceinline__ void fp8x16(uint4 v, float *o) {
  fp8x4(v.x, o);
  fp8x4(v.y, o + 4);
  fp8x4(v.z, o + 8);
  fp8x4(v.w, o + 12);
}

// Staged tokens: each token's k columns padded to whole 512-column stripes (kp floats),
// and inside a stripe the float4 that lane l reads in its quarter j (columns l * 16 + 4j ..
// + 3) stored at (j * 32 + l) * 4, so that the 32 lanes of a warp read 32 consecutive
// float4s: conflict-free, where the plain layout (lanes 64 bytes apart) made every
// shared-memory read four-way conflicted and bounded the kernel below HBM speed on H200.
__host__ __device__ __forceinline__ int stripes_of(int k) { return (k + 511) / 512 * 512; }

__device__ __forceinline__ int perm_col(int c) {
  const int o = c & 511;
  return (c & ~511) + ((((o & 15) >> 2) * 32 + (o >> 4)) << 2) + (c & 3);
}

// The 16 staged columns of token row xt at column c (c = stripe + lane * 16).
__device__ __forceinline__ void load_x16(const float *xt, int c, float *xv) {
  const float *b = xt + (c & ~511) + (((c & 511) >> 4) << 2);
#pragma unroll
  for (int j = 0; j < 4; j++) {
    const float4 v = *(const float4 *)(b + j * 128);
    xv[4 * j] = v.x;
    xv[4 * j + 1] = v.y;
    xv[4 * j + 2] = v.z;
    xv[4 * j + 3] = v.w;
  }
}

__device__ __forceinline__ float dot16(const float *wv, const float *xv) {
  float d = 0.0f;
#pragma unroll
  for (int q = 0; q < 4; q++)
    d += wv[4 * q] * xv[4 * q] + wv[4 * q + 1] * xv[4 * q + 1] + wv[4 * q + 2] * xv[4 * q + 2] +
         wv[4 * q + 3] * xv[4 * q + 3];
  return d;
}

// 16 weights of each of two rows (w0, w1) against 16 columns of each token, the token's
// columns read once for both rows; adds scale * dot.
template <int M>
__device__ __forceinline__ void dot16x2(const float *w0, const float *w1, const float *xs, int kp,
                                        int c, float s0, float s1, float (&acc0)[M],
                                        float (&acc1)[M]) {
#pragma unroll
  for (int t = 0; t < M; t++) {
    float xv[16];
    load_x16(xs + t * kp, c, xv);
    acc0[t] += dot16(w0, xv) * s0;
    acc1[t] += dot16(w1, xv) * s1;
  }
}

// m token rows of x (row stride ldx) into xs [m][kp] in the staged layout, 16-byte copies
// when aligned; every thread of the block takes part.
__device__ __forceinline__ void stage_tokens(float *xs, const float *x, int64_t ldx, int m, int k) {
  const int nt = (int)blockDim.x, kp = stripes_of(k);
  if (ldx % 4 == 0 && ((uintptr_t)x & 15u) == 0) {
    for (int t = 0; t < m; t++)
      for (int c = threadIdx.x * 4; c < k; c += nt * 4)
        *(float4 *)(xs + t * kp + perm_col(c)) = *(const float4 *)(x + t * ldx + c);
  } else {
    for (int t = 0; t < m; t++)
      for (int c = threadIdx.x; c < k; c += nt)
        xs[t * kp + perm_col(c)] = x[t * ldx + c];
  }
}

// Asks L2 for the 4 x 512-byte stripes at column c of a weight row (this lane's 16 bytes
// of each), so that the next round of loads finds them there instead of in HBM: a warp
// keeps only one round of loads in flight, and at decode sizes the time is otherwise
// one HBM latency per round.
__device__ __forceinline__ void prefetch_round(const uint8_t *row, int c, int k) {
#pragma unroll
  for (int q = 0; q < 4; q++)
    if (c + q * 512 < k)
      asm volatile("prefetch.global.L2 [%0];" ::"l"(row + c + q * 512));
}

// Weight rows r0 and r1 (r1 may equal r0) over columns [cb, ce) (cb a multiple of 512, the
// staged stripes) against the M tokens staged in xs: each lane's sums, then the warp's
// (every lane holds them after the shuffle tree).
template <int M>
__device__ __forceinline__ void pair_dot(const float *xs, int k, const uint8_t *w, const float *sc,
                                         int r0, int r1, int cb, int ce, int br, int bc, int nbc,
                                         float (&acc0)[M], float (&acc1)[M]) {
  const int lane = threadIdx.x & 31, kp = stripes_of(k);
  const uint8_t *w0 = w + (int64_t)r0 * k, *w1 = w + (int64_t)r1 * k;
  const float *s0 = sc + (int64_t)(r0 / br) * nbc, *s1 = sc + (int64_t)(r1 / br) * nbc;
#pragma unroll
  for (int t = 0; t < M; t++)
    acc0[t] = acc1[t] = 0.0f;
  int c = cb + lane * 16;
  for (; c + 3 * 512 < ce; c += 4 * 512) {
    prefetch_round(w0, c + 4 * 512, ce);
    prefetch_round(w1, c + 4 * 512, ce);
    uint4 v0[4], v1[4];
#pragma unroll
    for (int q = 0; q < 4; q++) {
      v0[q] = __ldg((const uint4 *)(w0 + c + q * 512));
      v1[q] = __ldg((const uint4 *)(w1 + c + q * 512));
    }
#pragma unroll
    for (int q = 0; q < 4; q++) {
      const int cq = c + q * 512;
      float a0[16], a1[16];
      fp8x16(v0[q], a0);
      fp8x16(v1[q], a1);
      dot16x2<M>(a0, a1, xs, kp, cq, s0[cq / bc], s1[cq / bc], acc0, acc1);
    }
  }
  for (; c < ce; c += 512) {
    const uint4 v0 = __ldg((const uint4 *)(w0 + c)), v1 = __ldg((const uint4 *)(w1 + c));
    float a0[16], a1[16];
    fp8x16(v0, a0);
    fp8x16(v1, a1);
    dot16x2<M>(a0, a1, xs, kp, c, s0[c / bc], s1[c / bc], acc0, acc1);
  }
#pragma unroll
  for (int t = 0; t < M; t++) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      acc0[t] += __shfl_xor_sync(0xffffffffu, acc0[t], o);
      acc1[t] += __shfl_xor_sync(0xffffffffu, acc1[t], o);
    }
  }
}

// Weight rows r_first, r_first + step, ... below r_end, two at a time per warp (each
// warp passes its own r_first), against the M tokens staged in xs [M][k]: y[t][r].
template <int M>
__device__ __forceinline__ void row_pairs(const float *xs, int k, const uint8_t *w,
                                          const float *sc, int r_first, int r_end, int step,
                                          int br, int bc, int nbc, float *y, int64_t ldy) {
  const int lane = threadIdx.x & 31;
  for (int r0 = r_first; r0 < r_end; r0 += step) {
    const int r1 = r0 + 1 < r_end ? r0 + 1 : r0;
    float acc0[M], acc1[M];
    pair_dot<M>(xs, k, w, sc, r0, r1, 0, k, br, bc, nbc, acc0, acc1);
    if (r0 + step < r_end) { // the next pair's first round, while this one is stored
      const int n0 = r0 + step, n1 = n0 + 1 < r_end ? n0 + 1 : n0;
      prefetch_round(w + (int64_t)n0 * k, lane * 16, k);
      prefetch_round(w + (int64_t)n1 * k, lane * 16, k);
    }
    if (lane == 0) {
#pragma unroll
      for (int t = 0; t < M; t++) {
        y[t * ldy + r0] = acc0[t];
        if (r1 != r0)
          y[t * ldy + r1] = acc1[t];
      }
    }
  }
}

// split == 1: warp-sized work items of a row pair over all columns (row_pairs). split > 1
// (long rows: one warp per pair would walk many rounds of loads in a row): the CTA's warps
// take kWarps / split pairs at a time, each pair's columns in `split` runs of whole stripes,
// one run per warp; the runs' sums meet in shared memory and are added in run order. The
// run count depends on the weight's shape only, so a row's result does not depend on m.
template <int M>
__global__ void __launch_bounds__(kThreads)
    k_fp8_skinny(const float *x, int64_t ldx, const uint8_t *w, const float *sc, int n, int k,
                 int br, int bc, int nbc, float *y, int64_t ldy, int split) {
  extern __shared__ __align__(16) float xs[]; // [M][stripes_of(k)], staged layout; partials
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int ppc = kWarps / split, pi = warp / split, si = warp - pi * split;
  const int ks = (stripes_of(k) / 512 + split - 1) / split * 512;
  const int cb = si * ks, ce = cb + ks < k ? cb + ks : k;
  const int gp = blockIdx.x * ppc + pi; // this warp's first pair
  // Start the first weight rows towards L2 while the tokens are staged.
  if (2 * gp < n)
    for (int c = cb + lane * 16; c < ce && c < cb + 4 * 512; c += 512)
      for (int r = 2 * gp; r < 2 * gp + 2 && r < n; r++)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(w + (int64_t)r * k + c));
  stage_tokens(xs, x, ldx, M, k);
  __syncthreads();
  if (split == 1) {
    row_pairs<M>(xs, k, w, sc, 2 * gp, n, 2 * gridDim.x * ppc, br, bc, nbc, y, ldy);
    return;
  }
  float *part = xs + M * stripes_of(k); // [kWarps][2][M]
  for (int base = 2 * blockIdx.x * ppc; base < n; base += 2 * gridDim.x * ppc) {
    const int r0 = base + 2 * pi;
    float acc0[M], acc1[M];
    if (r0 < n)
      pair_dot<M>(xs, k, w, sc, r0, r0 + 1 < n ? r0 + 1 : r0, cb, ce, br, bc, nbc, acc0, acc1);
    if (lane == 0 && r0 < n)
#pragma unroll
      for (int t = 0; t < M; t++) {
        part[(warp * 2) * M + t] = acc0[t];
        part[(warp * 2 + 1) * M + t] = acc1[t];
      }
    __syncthreads();
    for (int i = threadIdx.x; i < ppc * 2 * M; i += kThreads) {
      const int p = i / (2 * M), j = i / M % 2, t = i % M, r = base + 2 * p + j;
      if (r < n) {
        float sum = 0.0f;
        for (int q = 0; q < split; q++)
          sum += part[((p * split + q) * 2 + j) * M + t];
        y[t * ldy + r] = sum;
      }
    }
    __syncthreads();
  }
}

// ---- grouped (per-expert) variant: one launch for every expert of an MoE layer.
// blockIdx.y is the group (expert), blockIdx.x a tile of kGroupedTile weight rows. The
// group's rows of x (contiguous, rows off[g] .. off[g+1]) are taken up to four at a
// time into shared memory; each pass streams the tile's weight rows once (a second
// pass mostly hits L2). Groups with more than max_rows rows are skipped here (the host
// runs them as ordinary GEMMs).
// The staged tokens take up to 4 * k * 4 bytes of shared memory (114 KB at k = 7168),
// which leaves room for one CTA per SM: the grouped kernel therefore runs 16 warps per
// CTA (twice the skinny kernel's), so that twice as many weight rows stream per SM.
constexpr int kGroupedThreads = 512;
constexpr int kGroupedWarps = kGroupedThreads / 32;
constexpr int kGroupedTile = 2 * kGroupedWarps * 4; // 128 rows: each warp does 4 row pairs

__global__ void __launch_bounds__(kGroupedThreads)
    k_fp8_grouped(const float *x, int64_t ldx, const int32_t *off, const epic_cuk_group_w *tab,
                  int n, int k, int br, int bc, int nbc, int max_rows, float *y, int64_t ldy) {
  extern __shared__ __align__(16) float xs[]; // [4][stripes_of(k)], staged layout
  const int g = blockIdx.y;
  const int row0 = off[g], cnt = off[g + 1] - row0;
  const int r_begin = blockIdx.x * kGroupedTile;
  const int r_end = r_begin + kGroupedTile < n ? r_begin + kGroupedTile : n;
  if (cnt <= 0 || cnt > max_rows || r_begin >= n)
    return;
  const uint8_t *w = tab[g].data;
  const float *sc = tab[g].scale;
  for (int t0 = 0; t0 < cnt; t0 += 4) {
    const int mc = cnt - t0 < 4 ? cnt - t0 : 4;
    const float *xt = x + (int64_t)(row0 + t0) * ldx;
    __syncthreads(); // the previous pass is done with xs
    stage_tokens(xs, xt, ldx, mc, k);
    __syncthreads();
    float *yt = y + (int64_t)(row0 + t0) * ldy;
    const int r0w = r_begin + 2 * (threadIdx.x >> 5), step = 2 * kGroupedWarps;
    switch (mc) {
    case 1: row_pairs<1>(xs, k, w, sc, r0w, r_end, step, br, bc, nbc, yt, ldy); break;
    case 2: row_pairs<2>(xs, k, w, sc, r0w, r_end, step, br, bc, nbc, yt, ldy); break;
    case 3: row_pairs<3>(xs, k, w, sc, r0w, r_end, step, br, bc, nbc, yt, ldy); break;
    default: row_pairs<4>(xs, k, w, sc, r0w, r_end, step, br, bc, nbc, yt, ldy); break;
    }
  }
}

template <int M> cudaError_t set_smem() {
  return cudaFuncSetAttribute(k_fp8_skinny<M>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              (int)kMaxSmem);
}

// Shared memory of a launch: the staged tokens, then the runs' partial sums.
template <int M> size_t smem_of(int k) {
  return ((size_t)M * stripes_of(k) + (size_t)kWarps * 2 * M) * sizeof(float);
}

template <int M>
cudaError_t launch(const float *x, int64_t ldx, const epic_weight *w, float *y, int64_t ldy,
                   int sm_count, int split, cudaStream_t st) {
  const int n = (int)w->rows, k = (int)w->cols;
  const size_t smem = smem_of<M>(k);
  int per_sm = 0;
  cudaError_t e =
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k_fp8_skinny<M>, kThreads, smem);
  if (e != cudaSuccess)
    return e;
  if (per_sm < 1)
    per_sm = 1;
  const int64_t pairs = (n + 1) / 2;
  if (split <= 0) { // runs of four stripes (one round of loads) or more: long rows split more
    split = 1;
    while (split < kWarps && stripes_of(k) / 512 >= 8 * split)
      split *= 2;
  }
  split = split > kWarps ? kWarps : split;
  while (kWarps % split) // a power of two up to kWarps
    split--;
  const int ppc = kWarps / split;
  int64_t blocks = (pairs + ppc - 1) / ppc;
  if (blocks > (int64_t)sm_count * per_sm)
    blocks = (int64_t)sm_count * per_sm;
  const int nbc = (int)((w->cols + w->block_cols - 1) / w->block_cols);
  k_fp8_skinny<M><<<(unsigned)blocks, kThreads, smem, st>>>(x, ldx, (const uint8_t *)w->data,
                                                            w->scale_inv, n, k, (int)w->block_rows,
                                                            (int)w->block_cols, nbc, y, ldy, split);
  return cudaGetLastError();
}

} // namespace

extern "C" {

int epic_cuk_fp8_skinny_ok(const epic_weight *w, int64_t m) {
  return w->dtype == EPIC_DT_F8E4M3 && m >= 1 && m <= EPIC_CUK_SKINNY_MAX_M && w->cols % 16 == 0 &&
         w->block_cols % 16 == 0 && w->block_rows > 0 && w->rows < INT32_MAX &&
         w->cols < INT32_MAX / 4 && ((uintptr_t)w->data & 15u) == 0 &&
         ((size_t)m * (size_t)stripes_of((int)w->cols) + (size_t)kWarps * 2 * m) * sizeof(float) <=
             kMaxSmem;
}

cudaError_t epic_cuk_fp8_skinny_prepare(void) {
  cudaError_t e = cudaFuncSetAttribute(k_fp8_grouped, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)kMaxSmem);
  if (e == cudaSuccess)
    e = set_smem<1>();
  if (e == cudaSuccess)
    e = set_smem<2>();
  if (e == cudaSuccess)
    e = set_smem<3>();
  if (e == cudaSuccess)
    e = set_smem<4>();
  return e;
}

cudaError_t epic_cuk_fp8_skinny(const float *x, int64_t ldx, int64_t m, const epic_weight *w,
                                float *y, int64_t ldy, int sm_count, int split, cudaStream_t st) {
  switch (m) {
  case 1: return launch<1>(x, ldx, w, y, ldy, sm_count, split, st);
  case 2: return launch<2>(x, ldx, w, y, ldy, sm_count, split, st);
  case 3: return launch<3>(x, ldx, w, y, ldy, sm_count, split, st);
  case 4: return launch<4>(x, ldx, w, y, ldy, sm_count, split, st);
  default: return cudaErrorInvalidValue;
  }
}

int epic_cuk_fp8_grouped_ok(const epic_weight *w) {
  return epic_cuk_fp8_skinny_ok(w, EPIC_CUK_SKINNY_MAX_M);
}

cudaError_t epic_cuk_fp8_grouped(const float *x, int64_t ldx, const int32_t *off, int64_t n_groups,
                                 const epic_cuk_group_w *tab, const epic_weight *shape,
                                 int max_rows, float *y, int64_t ldy, cudaStream_t st) {
  const int n = (int)shape->rows, k = (int)shape->cols;
  const size_t smem = (size_t)EPIC_CUK_SKINNY_MAX_M * stripes_of(k) * sizeof(float);
  const int nbc = (int)((shape->cols + shape->block_cols - 1) / shape->block_cols);
  if (n_groups <= 0 || n_groups > 65535)
    return n_groups == 0 ? cudaSuccess : cudaErrorInvalidValue;
  const dim3 grid((unsigned)((n + kGroupedTile - 1) / kGroupedTile), (unsigned)n_groups);
  k_fp8_grouped<<<grid, kGroupedThreads, smem, st>>>(x, ldx, off, tab, n, k, (int)shape->block_rows,
                                              (int)shape->block_cols, nbc, max_rows, y, ldy);
  return cudaGetLastError();
}

} // extern "C"
