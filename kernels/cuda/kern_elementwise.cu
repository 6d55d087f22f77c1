// Element-wise and row-wise kernels of the CUDA backend: dtype conversions and FP8
// activation quantisation for matmul, RMSNorm, RoPE, SwiGLU, axpy, embedding rows,
// the paged KV cache, and the causal softmax of the GEMM attention path.
// Numerics mirror the CPU reference (kernels/cpu): reductions that decide accuracy run
// in double, conversions are exact or round to nearest even.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <math.h>
#include <stdint.h>

#include "kern_mla_common.cuh"
#include "ops_cuda_impl.h"

namespace {

constexpr int kThreads = 256;
constexpr int kMaxGridY = 65535;

__device__ __forceinline__ float bf16_bits_to_f32(uint16_t v) {
  return __uint_as_float((uint32_t)v << 16);
}

__device__ __forceinline__ uint16_t f32_to_bf16_bits(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

__device__ __forceinline__ float fp8_to_f32(uint8_t v) {
  __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)v, __NV_E4M3);
  return __half2float(__half(h));
}

// A weight as plain values, so kernels take it by value.
struct WeightArgs {
  int dtype;
  int64_t rows, cols, br, bc;
  const void *data;
  const float *scale;
};

WeightArgs weight_args(const epic_weight *w) {
  WeightArgs a;
  a.dtype = (int)w->dtype;
  a.rows = w->rows;
  a.cols = w->cols;
  a.br = w->block_rows > 0 ? w->block_rows : 1;
  a.bc = w->block_cols > 0 ? w->block_cols : 1;
  a.data = w->data;
  a.scale = w->scale_inv;
  return a;
}

// W[r][c] dequantised exactly as epic_weight_rows_f32 does (fp8 * scale rounded once).
__device__ __forceinline__ float weight_elem(const WeightArgs &w, int64_t r, int64_t c) {
  const int64_t i = r * w.cols + c;
  switch (w.dtype) {
  case EPIC_DT_F32: return ((const float *)w.data)[i];
  case EPIC_DT_BF16: return bf16_bits_to_f32(((const uint16_t *)w.data)[i]);
  case EPIC_DT_F16: return __half2float(__ushort_as_half(((const uint16_t *)w.data)[i]));
  case EPIC_DT_F8E4M3: {
    const int64_t nbc = (w.cols + w.bc - 1) / w.bc;
    return fp8_to_f32(((const uint8_t *)w.data)[i]) * w.scale[(r / w.br) * nbc + c / w.bc];
  }
  default: return 0.0f;
  }
}

int grid_rows(int64_t m) {
  return (int)(m < kMaxGridY ? m : kMaxGridY);
}

int grid_cols(int64_t n, int per_block) {
  int64_t g = (n + per_block - 1) / per_block;
  return (int)(g < 1 ? 1 : (g > 65535 ? 65535 : g));
}

// ----------------------------------------------------------------- conversions

// Rows of n floats at stride ld from p can be read as float4.
__host__ __device__ inline int rows_vec4(const void *p, int64_t ld, int64_t n) {
  return ld % 4 == 0 && n % 4 == 0 && ((uintptr_t)p & 15u) == 0;
}

// Four columns per thread with 16-byte loads when rows are 16-byte aligned. Row i comes
// from row xidx[i] of x when xidx is given.
__global__ void k_f32_to_bf16(const float *x, int64_t ldx, const int32_t *xidx, int64_t m,
                              int64_t n, uint16_t *y) {
  const int vec = rows_vec4(x, ldx, n);
  for (int64_t i = blockIdx.y; i < m; i += gridDim.y) {
    const float *xr = x + (xidx ? (int64_t)xidx[i] : i) * ldx;
    if (vec) {
      for (int64_t j = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 4; j < n;
           j += (int64_t)gridDim.x * blockDim.x * 4) {
        const float4 f = *(const float4 *)(xr + j);
        const uint2 o =
            make_uint2((uint32_t)f32_to_bf16_bits(f.x) | (uint32_t)f32_to_bf16_bits(f.y) << 16,
                       (uint32_t)f32_to_bf16_bits(f.z) | (uint32_t)f32_to_bf16_bits(f.w) << 16);
        *(uint2 *)(y + i * n + j) = o;
      }
    } else {
      for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < n;
           j += (int64_t)gridDim.x * blockDim.x)
        y[i * n + j] = f32_to_bf16_bits(xr[j]);
    }
  }
}

__global__ void k_bf16_to_f32(const uint16_t *x, int64_t ldx, int64_t m, int64_t n, float *y,
                              int64_t ldy) {
  for (int64_t i = blockIdx.y; i < m; i += gridDim.y)
    for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < n;
         j += (int64_t)gridDim.x * blockDim.x)
      y[i * ldy + j] = bf16_bits_to_f32(x[i * ldx + j]);
}

// 128-column blocks one warp quantises per work item in long quantisations: their loads
// are all issued before the first reduction, so a warp keeps 8 x 512 bytes in flight. One
// block per warp, with the group lookup and gather index before each, left the quantiser
// latency-bound: 0.82 ms (1.4 TB/s) per launch of 32,768 rows x 7,168 columns (an
// 8192-token prefill's gate/up takes two), H200; four blocks per warp at four CTAs per SM:
// 0.42 ms; eight at three CTAs of 80 registers: 0.37 ms (3.2 TB/s). Short quantisations
// (decode's rows) keep one block per warp: there a warp doing eight blocks one after
// another only lengthens a latency-bound kernel (decode at batch 128 was 1% slower).
constexpr int kQChunk = 8;

// One warp quantises blocks kb0 .. kb0 + nb - 1 (nb <= CH) of one token row: xr is
// the row in x, qr its row of codes (dense, 4 columns per lane and block). Per block:
// amax by shuffles, s = amax / 448 (1 when amax == 0), codes e4m3(x * (448 / amax)), stored
// as one 4-byte word per lane. Lane b < nb gets block kb0 + b's scale back.
template <int CH>
__device__ __forceinline__ float quant_blocks(const float *xr, int64_t k, int vec, uint8_t *qr,
                                              int64_t kb0, int nb, int lane) {
  float v[CH][4];
#pragma unroll
  for (int b = 0; b < CH; b++) {
    const int64_t col = (kb0 + b) * 128 + lane * 4;
#pragma unroll
    for (int j = 0; j < 4; j++)
      v[b][j] = 0.0f;
    if (b < nb) {
      if (vec && col < k) {
        const float4 f = *(const float4 *)(xr + col);
        v[b][0] = f.x;
        v[b][1] = f.y;
        v[b][2] = f.z;
        v[b][3] = f.w;
      } else {
#pragma unroll
        for (int j = 0; j < 4; j++)
          if (col + j < k)
            v[b][j] = xr[col + j];
      }
    }
  }
  float a[CH];
#pragma unroll
  for (int b = 0; b < CH; b++)
    a[b] = fmaxf(fmaxf(fabsf(v[b][0]), fabsf(v[b][1])), fmaxf(fabsf(v[b][2]), fabsf(v[b][3])));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
#pragma unroll
    for (int b = 0; b < CH; b++)
      a[b] = fmaxf(a[b], __shfl_xor_sync(0xffffffffu, a[b], o));
  float mine = 0.0f;
#pragma unroll
  for (int b = 0; b < CH; b++) {
    if (b >= nb)
      break;
    // The test's host mirror computes the same two IEEE divisions and one product.
    const float s = a[b] > 0.0f ? a[b] / 448.0f : 1.0f;
    const float inv = a[b] > 0.0f ? 448.0f / a[b] : 1.0f;
    uint32_t word = 0;
#pragma unroll
    for (int j = 0; j < 4; j++)
      word |= (uint32_t)__nv_cvt_float_to_fp8(v[b][j] * inv, __NV_SATFINITE, __NV_E4M3) << (8 * j);
    const int64_t col = (kb0 + b) * 128 + lane * 4;
    uint8_t *dst = qr + col;
    if (col + 4 <= k && ((uintptr_t)dst & 3u) == 0)
      *(uint32_t *)dst = word;
    else
      for (int j = 0; j < 4 && col + j < k; j++)
        dst[j] = (uint8_t)(word >> (8 * j));
    if (lane == b)
      mine = s;
  }
  return mine;
}

// Work items of the quantisers: (row, run of CH column blocks), one warp each. How many
// blocks a warp takes changes only how the work is split, not a result.
__host__ __device__ inline int64_t quant_chunks(int64_t k, int chunk) {
  return ((k + 127) / 128 + chunk - 1) / chunk;
}
// Item `item` of rows of `nch` chunks: its row, first block and block count.
struct quant_item {
  int64_t row, kb0;
  int nb;
};
__device__ __forceinline__ quant_item quant_at(int64_t item, int64_t nch, int64_t k, int chunk) {
  quant_item it;
  it.row = item / nch;
  it.kb0 = (item - it.row * nch) * chunk;
  const int64_t left = (k + 127) / 128 - it.kb0;
  it.nb = (int)(left < chunk ? left : chunk);
  return it;
}

// Blocks per warp for `rows` rows: kQChunk from 2^17 blocks (2,341 rows of 7,168 columns:
// prefill), else one.
inline int quant_chunk_for(int64_t rows, int64_t k) {
  return rows * ((k + 127) / 128) >= ((int64_t)1 << 17) ? kQChunk : 1;
}

// Thread blocks for `items` quantiser work items (one warp each), capped: the kernels
// stride over the rest.
inline int64_t quant_blocks_for(int64_t items) {
  const int64_t b = (items + kThreads / 32 - 1) / (kThreads / 32);
  return b > 8192 ? 8192 : b;
}

// Grid-stride over all (token, chunk) items.
template <int CH>
__global__ void __launch_bounds__(kThreads, 3)
    k_quant_fp8(const float *x, int64_t ldx, int64_t m, int64_t k, uint8_t *q, float *scale,
                int64_t lds) {
  const int lane = threadIdx.x & 31;
  const int64_t nch = quant_chunks(k, CH), n = m * nch;
  const int vec = rows_vec4(x, ldx, k);
  for (int64_t item = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32; item < n;
       item += (int64_t)gridDim.x * blockDim.x / 32) {
    const quant_item it = quant_at(item, nch, k, CH);
    const int64_t i = it.row;
    const float s = quant_blocks<CH>(x + i * ldx, k, vec, q + i * k, it.kb0, it.nb, lane);
    if (lane < it.nb)
      scale[(it.kb0 + lane) * lds + i] = s;
  }
}

// The groups of t, row space: group g's round_up(rows, 4) padded rows, from t.item0[g]. A
// real row is quantised with its scales in the group's own region; a pad row gets scale
// 0, and zero codes for the first t.zpad[g] of them (rows that no group of the call
// quantises). Row i is read from row xidx[i] of x when xidx is given.
template <int CH>
__global__ void __launch_bounds__(kThreads, 3)
    k_quant_fp8_groups(const float *x, int64_t ldx, const int32_t *xidx, int64_t k, uint8_t *q,
                       float *scale, epic_cuk_qgroups t) {
  const int lane = threadIdx.x & 31;
  const int64_t nch = quant_chunks(k, CH), n = (int64_t)t.item0[t.n] * nch;
  const int vec = rows_vec4(x, ldx, k);
  for (int64_t item = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32; item < n;
       item += (int64_t)gridDim.x * blockDim.x / 32) {
    const quant_item it = quant_at(item, nch, k, CH);
    const int lo = (int)epic_group_of(t.item0, t.n, it.row);
    const int64_t j = it.row - t.item0[lo], rows = t.rows[lo];
    const int64_t mp = (rows + 3) / 4 * 4, i = t.row0[lo] + j;
    float s = 0.0f;
    if (j < rows) {
      const int64_t xi = xidx ? (int64_t)xidx[i] : i;
      if (t.qsrc) { // codes and scales of the quantised source row
        const int64_t c0 = it.kb0 * 128, c1 = c0 + it.nb * 128 < k ? c0 + it.nb * 128 : k;
        for (int64_t c = c0 + 16 * lane; c < c1; c += 16 * 32)
          *reinterpret_cast<uint4 *>(q + i * k + c) =
              *reinterpret_cast<const uint4 *>(t.qsrc + xi * k + c);
        if (lane < it.nb)
          s = t.ssrc[(it.kb0 + lane) * t.lds_src + xi];
      } else {
        s = quant_blocks<CH>(x + xi * ldx, k, vec, q + i * k, it.kb0, it.nb, lane);
      }
    } else if (j < rows + t.zpad[lo]) {
      for (int b = 0; b < it.nb; b++) {
        const int64_t col = (it.kb0 + b) * 128 + lane * 4;
        for (int c = 0; c < 4 && col + c < k; c++)
          q[i * k + col + c] = 0;
      }
    }
    if (lane < it.nb)
      scale[t.sbase[lo] + (it.kb0 + lane) * mp + j] = s;
  }
}

// The rows of the groups above min_rows rows (off: device offsets), for the wgmma
// kernel's device-planned form: scale of group g's row j at round_up(off[g], 4) + 4 g + j.
template <int CH>
__global__ void __launch_bounds__(kThreads, 3)
    k_quant_fp8_dev(const float *x, int64_t ldx, int64_t rows, int64_t k, const int32_t *off,
                    int64_t n_groups, int64_t min_rows, uint8_t *q, float *scale, int64_t lds) {
  const int lane = threadIdx.x & 31;
  const int64_t nch = quant_chunks(k, CH), n = rows * nch;
  const int vec = rows_vec4(x, ldx, k);
  for (int64_t item = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32; item < n;
       item += (int64_t)gridDim.x * blockDim.x / 32) {
    const quant_item it = quant_at(item, nch, k, CH);
    const int64_t i = it.row, lo = epic_group_of(off, n_groups, i);
    if (off[lo + 1] - off[lo] <= min_rows)
      continue; // a small group: the tensor-core kernel's rows
    const float s = quant_blocks<CH>(x + i * ldx, k, vec, q + i * k, it.kb0, it.nb, lane);
    if (lane < it.nb)
      scale[(it.kb0 + lane) * lds + ((off[lo] + 3) / 4 * 4 + 4 * lo) + (i - off[lo])] = s;
  }
}

__global__ void k_dequant_rows(WeightArgs w, int64_t r0, int64_t nr, void *out, int out_bf16) {
  for (int64_t i = blockIdx.y; i < nr; i += gridDim.y)
    for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < w.cols;
         c += (int64_t)gridDim.x * blockDim.x) {
      const float v = weight_elem(w, r0 + i, c);
      if (out_bf16)
        ((uint16_t *)out)[i * w.cols + c] = f32_to_bf16_bits(v);
      else
        ((float *)out)[i * w.cols + c] = v;
    }
}

__global__ void k_pad_rows(const float *s, int64_t nbr, int64_t nbc, int64_t ldp, float *out) {
  const int64_t n = nbr * ldp;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / ldp, c = i % ldp;
    out[i] = c < nbc ? s[r * nbc + c] : 0.0f;
  }
}

// ---------------------------------------------------------------- reductions

template <typename T> __device__ T block_sum(T v, T *red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0)
    red[warp] = v;
  __syncthreads();
  T r = 0;
  for (int i = 0; i < nw; i++)
    r += red[i];
  return r;
}

__device__ float block_max(float v, float *red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0)
    red[warp] = v;
  __syncthreads();
  float r = -INFINITY;
  for (int i = 0; i < nw; i++)
    r = fmaxf(r, red[i]);
  return r;
}

// RMSNorm, one CTA per row. A row's sum of squares is defined by VIRT "virtual threads":
// virtual thread v adds the squares of columns v, v + VIRT, v + 2 VIRT, ... in that order,
// each virtual warp's 32 partial sums meet in a shuffle tree, then the VIRT / 32 warp sums
// are added in warp order. Rows up to 8 x kThreads columns use VIRT = kThreads; wider ones
// VIRT = kNormWide, so that a decode row (7,168 columns for V3's hidden size) is read in
// one round of eight loads per thread instead of four dependent ones. VIRT depends on the
// width alone; TPB, the real threads, on the row count too: many rows run 256 threads, each
// standing in for VIRT / TPB virtual ones (virtual warps w, w + TPB / 32, ...), one row
// 1024. Both give the same bits, so a row's result never depends on the rows beside it.
constexpr int kNormWide = 1024;
constexpr int64_t kNormFewRows = 256; // up to this many wide rows: 1024 real threads

template <int TPB, int VIRT>
__global__ void __launch_bounds__(TPB) k_rmsnorm(const float *x, int64_t ldx, int64_t m, int64_t n,
                                                 const float *w, float eps, float *y, int64_t ldy) {
  constexpr int VPT = VIRT / TPB, NW = TPB / 32;
  __shared__ double red[VIRT / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t i = blockIdx.x; i < m; i += gridDim.x) {
    const float *xi = x + i * ldx;
    double ss[VPT];
#pragma unroll
    for (int q = 0; q < VPT; q++) {
      ss[q] = 0.0;
      // Eight loads in flight, then added in column order: a decode row is one CTA, which
      // would otherwise wait one memory latency per column.
      for (int64_t j0 = (warp + NW * q) * 32 + lane; j0 < n; j0 += 8 * (int64_t)VIRT) {
        float xv[8];
#pragma unroll
        for (int u = 0; u < 8; u++) {
          const int64_t j = j0 + u * (int64_t)VIRT;
          xv[u] = j < n ? xi[j] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < 8; u++)
          if (j0 + u * (int64_t)VIRT < n)
            ss[q] += (double)xv[u] * (double)xv[u];
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1)
        ss[q] += __shfl_xor_sync(0xffffffffu, ss[q], o);
    }
    __syncthreads(); // the previous row is done with red
    if (lane == 0)
#pragma unroll
      for (int q = 0; q < VPT; q++)
        red[warp + NW * q] = ss[q];
    __syncthreads();
    double tot = 0.0;
    for (int k = 0; k < VIRT / 32; k++)
      tot += red[k];
    const double r = 1.0 / sqrt(tot / (double)n + (double)eps);
    float *yi = y + i * ldy; // may alias xi: every read of the row happened before the sync
    // Eight loads before eight stores: y may alias x, so the compiler cannot hoist a later
    // load above an earlier store by itself, which would serialise one row on latency.
    for (int64_t j0 = threadIdx.x; j0 < n; j0 += 8 * (int64_t)TPB) {
      float xv[8], wv[8];
#pragma unroll
      for (int u = 0; u < 8; u++) {
        const int64_t j = j0 + u * (int64_t)TPB;
        xv[u] = j < n ? xi[j] : 0.0f;
        wv[u] = j < n ? w[j] : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < 8; u++) {
        const int64_t j = j0 + u * (int64_t)TPB;
        if (j < n)
          yi[j] = (float)((double)wv[u] * ((double)xv[u] * r));
      }
    }
  }
}

// One block per token: the angles of its pairs in double (shared), then every head.
// blockIdx.x takes heads [kRopeHeads * blockIdx.x, ...) so that a decode token's 128
// heads are spread over CTAs; each CTA computes its token's angles itself.
constexpr int kRopeHeads = 8;
__global__ void k_rope(float *x, int64_t m, int64_t n_heads, int64_t ld_tok, int64_t ld_head,
                       int64_t half, const int32_t *pos, epic_cuk_rope_freq f) {
  __shared__ double cs[EPIC_CUK_ROPE_MAX_PAIRS], sn[EPIC_CUK_ROPE_MAX_PAIRS];
  const int64_t h0 = (int64_t)blockIdx.x * kRopeHeads;
  const int64_t nh = n_heads - h0 < kRopeHeads ? n_heads - h0 : kRopeHeads;
  x += h0 * ld_head;
  n_heads = nh;
  for (int64_t t = blockIdx.y; t < m; t += gridDim.y) {
    for (int64_t j = threadIdx.x; j < half; j += blockDim.x) {
      const double ang = (double)pos[t] * f.f[j];
      cs[j] = cos(ang);
      sn[j] = sin(ang);
    }
    __syncthreads();
    // Four pairs loaded before any is stored (in-place update: see k_rmsnorm).
    for (int64_t i0 = threadIdx.x; i0 < n_heads * half; i0 += 4 * (int64_t)blockDim.x) {
      float a[4], b[4];
      float *pp[4];
#pragma unroll
      for (int u = 0; u < 4; u++) {
        const int64_t i = i0 + u * (int64_t)blockDim.x;
        pp[u] = nullptr;
        if (i < n_heads * half) {
          const int64_t h = i / half, j = i % half;
          pp[u] = x + t * ld_tok + h * ld_head + 2 * j;
          a[u] = pp[u][0];
          b[u] = pp[u][1];
        }
      }
#pragma unroll
      for (int u = 0; u < 4; u++) {
        const int64_t i = i0 + u * (int64_t)blockDim.x;
        if (pp[u]) {
          const int64_t j = i % half;
          const double da = a[u], db = b[u];
          pp[u][0] = (float)(da * cs[j] - db * sn[j]);
          pp[u][1] = (float)(da * sn[j] + db * cs[j]);
        }
      }
    }
    __syncthreads();
  }
}

__device__ __forceinline__ float silu_times(float z, float v) {
  return z / (1.0f + expf(-z)) * v;
}

// vec: every row of g, u and y is float4-aligned (a memory-bound pass: 16-byte accesses,
// four columns per thread; the launcher sizes the grid for it).
__global__ void k_silu_mul(const float *g, int64_t ldg, const float *u, int64_t ldu, int64_t m,
                           int64_t n, float *y, int64_t ldy, int vec) {
  const int per = vec ? 4 : 1;
  for (int64_t i = blockIdx.y; i < m; i += gridDim.y)
    for (int64_t j = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * per; j < n;
         j += (int64_t)gridDim.x * blockDim.x * per) {
      if (vec) {
        const float4 a = *(const float4 *)(g + i * ldg + j), b = *(const float4 *)(u + i * ldu + j);
        *(float4 *)(y + i * ldy + j) = make_float4(silu_times(a.x, b.x), silu_times(a.y, b.y),
                                                   silu_times(a.z, b.z), silu_times(a.w, b.w));
      } else {
        y[i * ldy + j] = silu_times(g[i * ldg + j], u[i * ldu + j]);
      }
    }
}

__global__ void k_axpy(int64_t n, float a, const float *x, float *y) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    y[i] += a * x[i];
}

__global__ void k_embed(WeightArgs w, const int32_t *ids, int64_t m, float *y, int *err) {
  for (int64_t i = blockIdx.y; i < m; i += gridDim.y) {
    const int64_t id = ids[i];
    const int bad = id < 0 || id >= w.rows;
    if (bad && threadIdx.x == 0 && blockIdx.x == 0)
      atomicOr(err, EPIC_CUK_ERR_EMBED_ID);
    for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < w.cols;
         c += (int64_t)gridDim.x * blockDim.x)
      y[i * w.cols + c] = bad ? __int_as_float(0x7fc00000) : weight_elem(w, id, c);
  }
}

// ------------------------------------------------------------------ KV cache

// Cache elements are fp32 or bf16 (epic_kv_dtype): bf16 rows are rounded to nearest even
// when stored and widened exactly when read.
__device__ __forceinline__ void kv_put(float *p, float v) { *p = v; }
__device__ __forceinline__ void kv_put(uint16_t *p, float v) { *p = f32_to_bf16_bits(v); }
__device__ __forceinline__ float kv_get(const float *p) { return *p; }
__device__ __forceinline__ float kv_get(const uint16_t *p) { return bf16_bits_to_f32(*p); }

template <typename T>
__device__ __forceinline__ T *kv_row(T *pool, const int32_t *table, int64_t ps, int64_t width,
                                     int64_t t) {
  return pool + ((int64_t)table[t / ps] * ps + t % ps) * width;
}

template <typename T>
__global__ void k_kv_store(T *pool, const int32_t *table, int64_t ps, int64_t width,
                           int64_t lora, int64_t start, int64_t m, const float *lat, int64_t ldl,
                           const float *kpe, int64_t ldk) {
  for (int64_t t = blockIdx.x; t < m; t += gridDim.x) {
    T *row = kv_row(pool, table, ps, width, start + t);
    for (int64_t j = threadIdx.x; j < width; j += blockDim.x)
      kv_put(row + j, j < lora ? lat[t * ldl + j] : kpe[t * ldk + j - lora]);
  }
}

template <typename T>
__global__ void k_kv_gather(const T *pool, const int32_t *table, int64_t ps, int64_t width,
                            int64_t lora, int64_t n, float *lat, float *kpe) {
  for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
    const T *row = kv_row(pool, table, ps, width, t);
    for (int64_t j = threadIdx.x; j < width; j += blockDim.x) {
      const float v = kv_get(row + j);
      if (!kpe)
        lat[t * width + j] = v;
      else if (j < lora)
        lat[t * lora + j] = v;
      else
        kpe[t * (width - lora) + j - lora] = v;
    }
  }
}

// ------------------------------------------------------------------- softmax

// One block per row: argmax (lowest index on ties) then a double log-sum-exp, the
// rule of the CPU backend's row_pick.
// Greedy pick in two kernels: the vocabulary row is cut into chunks, one CTA each (the
// double-precision exps of a 129k row are too many for one SM), and one warp per row
// merges the chunks' (max, first index of the max, sum of exp(x - max)) partials.
constexpr int kPickThreads = 256;
constexpr int64_t kPickChunk = 4096;

// Warp-wide maximum and the lowest index holding it; every lane gets the result.
__device__ __forceinline__ void warp_argmax(float &bv, int64_t &bi) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > bv || (ov == bv && oi < bi)) {
      bv = ov;
      bi = oi;
    }
  }
}

struct PickPart {
  double sum; // sum over the chunk of exp(x - mx), in double
  float mx;
  int32_t idx; // first column holding mx (n: the chunk had no number above -inf)
};

__global__ void __launch_bounds__(kPickThreads)
    k_row_pick_part(const float *x, int64_t n, int64_t chunk, PickPart *part) {
  __shared__ float sv[kPickThreads / 32];
  __shared__ int64_t si[kPickThreads / 32];
  __shared__ double ss[kPickThreads / 32];
  const int64_t row = blockIdx.y, c0 = (int64_t)blockIdx.x * chunk;
  const int64_t c1 = c0 + chunk < n ? c0 + chunk : n;
  const float *xr = x + row * n;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  float bv = -INFINITY;
  int64_t bi = n; // "none yet": loses every tie
  for (int64_t j = c0 + threadIdx.x; j < c1; j += blockDim.x) {
    const float v = xr[j];
    if (v > bv || (bi == n && !(v < bv))) {
      bv = v;
      bi = j;
    }
  }
  warp_argmax(bv, bi);
  if (lane == 0) {
    sv[warp] = bv;
    si[warp] = bi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < nw; w++)
      if (sv[w] > sv[0] || (sv[w] == sv[0] && si[w] < si[0])) {
        sv[0] = sv[w];
        si[0] = si[w];
      }
  }
  __syncthreads();
  const double mx = (double)sv[0];
  double sum = 0;
  for (int64_t j = c0 + threadIdx.x; j < c1; j += blockDim.x)
    sum += exp((double)xr[j] - mx);
  for (int o = 16; o > 0; o >>= 1)
    sum += __shfl_down_sync(0xffffffffu, sum, o);
  if (lane == 0)
    ss[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0;
    for (int w = 0; w < nw; w++)
      t += ss[w];
    part[row * gridDim.x + blockIdx.x] = PickPart{t, sv[0], (int32_t)si[0]};
  }
}

// One warp per row: the first index of the row's maximum (lowest chunk on ties, and the
// chunk kept its first), and log-softmax there from the rescaled chunk sums.
__global__ void k_row_pick_merge(const float *x, int64_t n, int n_chunks, const PickPart *part,
                                 int32_t *ids, float *logprob) {
  const int64_t row = blockIdx.x;
  const PickPart *p = part + row * n_chunks;
  const int lane = threadIdx.x;
  float bv = -INFINITY;
  int64_t bi = n;
  for (int c = lane; c < n_chunks; c += 32)
    if (p[c].mx > bv || (p[c].mx == bv && p[c].idx < bi)) {
      bv = p[c].mx;
      bi = p[c].idx;
    }
  warp_argmax(bv, bi);
  const double mx = (double)bv;
  double t = 0;
  for (int c = lane; c < n_chunks; c += 32)
    if (p[c].sum > 0)
      t += p[c].sum * exp((double)p[c].mx - mx);
  for (int o = 16; o > 0; o >>= 1)
    t += __shfl_xor_sync(0xffffffffu, t, o);
  if (lane == 0) {
    const int64_t b = bi < n ? bi : 0;
    ids[row] = (int32_t)b;
    logprob[row] = (float)((double)x[row * n + b] - mx - log(t));
  }
}

__global__ void k_softmax_causal(float *s, int64_t rows, int64_t mc, int64_t ld,
                                 int64_t first_valid) {
  __shared__ float redf[kThreads / 32];
  __shared__ double redd[kThreads / 32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    float *row = s + r * ld;
    int64_t valid = first_valid + r % mc;
    if (valid > ld)
      valid = ld;
    float mx = -INFINITY;
    for (int64_t j = threadIdx.x; j < valid; j += blockDim.x)
      mx = fmaxf(mx, row[j]);
    mx = block_max(mx, redf);
    double sum = 0.0;
    for (int64_t j = threadIdx.x; j < valid; j += blockDim.x) {
      const float e = expf(row[j] - mx);
      row[j] = e;
      sum += e;
    }
    sum = block_sum(sum, redd);
    const float inv = (float)(1.0 / sum);
    for (int64_t j = threadIdx.x; j < ld; j += blockDim.x)
      row[j] = j < valid ? row[j] * inv : 0.0f;
    __syncthreads();
  }
}

} // namespace

extern "C" {

cudaError_t epic_cuk_f32_to_bf16(const float *x, int64_t ldx, const int32_t *xidx, int64_t m,
                                 int64_t n, uint16_t *y, cudaStream_t st) {
  const int per = rows_vec4(x, ldx, n) ? 4 : 1;
  k_f32_to_bf16<<<dim3(grid_cols((n + per - 1) / per, kThreads), grid_rows(m)), kThreads, 0, st>>>(
      x, ldx, xidx, m, n, y);
  return cudaGetLastError();
}

cudaError_t epic_cuk_bf16_to_f32(const uint16_t *x, int64_t ldx, int64_t m, int64_t n, float *y,
                                 int64_t ldy, cudaStream_t st) {
  k_bf16_to_f32<<<dim3(grid_cols(n, kThreads), grid_rows(m)), kThreads, 0, st>>>(x, ldx, m, n, y,
                                                                                 ldy);
  return cudaGetLastError();
}

cudaError_t epic_cuk_quant_fp8_1x128(const float *x, int64_t ldx, int64_t m, int64_t k, uint8_t *q,
                                     float *scale, int64_t lds, cudaStream_t st) {
  const int chunk = quant_chunk_for(m, k);
  const int64_t blocks = quant_blocks_for(m * quant_chunks(k, chunk));
  if (chunk == kQChunk)
    k_quant_fp8<kQChunk><<<(unsigned)blocks, kThreads, 0, st>>>(x, ldx, m, k, q, scale, lds);
  else
    k_quant_fp8<1><<<(unsigned)blocks, kThreads, 0, st>>>(x, ldx, m, k, q, scale, lds);
  return cudaGetLastError();
}

cudaError_t epic_cuk_quant_fp8_groups(const float *x, int64_t ldx, const int32_t *xidx, int64_t k,
                                      uint8_t *q, float *scale, const epic_cuk_qgroups *t,
                                      cudaStream_t st) {
  if (t->n <= 0)
    return cudaSuccess;
  const int chunk = quant_chunk_for(t->item0[t->n], k);
  const int64_t blocks = quant_blocks_for((int64_t)t->item0[t->n] * quant_chunks(k, chunk));
  if (chunk == kQChunk)
    k_quant_fp8_groups<kQChunk>
        <<<(unsigned)blocks, kThreads, 0, st>>>(x, ldx, xidx, k, q, scale, *t);
  else
    k_quant_fp8_groups<1><<<(unsigned)blocks, kThreads, 0, st>>>(x, ldx, xidx, k, q, scale, *t);
  return cudaGetLastError();
}

cudaError_t epic_cuk_quant_fp8_dev(const float *x, int64_t ldx, int64_t rows, int64_t k,
                                   const int32_t *off, int64_t n_groups, int64_t min_rows,
                                   uint8_t *q, float *scale, int64_t lds, cudaStream_t st) {
  const int chunk = quant_chunk_for(rows, k);
  const int64_t blocks = quant_blocks_for(rows * quant_chunks(k, chunk));
  if (blocks < 1 || n_groups < 1)
    return cudaSuccess;
  if (chunk == kQChunk)
    k_quant_fp8_dev<kQChunk><<<(unsigned)blocks, kThreads, 0, st>>>(x, ldx, rows, k, off, n_groups,
                                                                    min_rows, q, scale, lds);
  else
    k_quant_fp8_dev<1><<<(unsigned)blocks, kThreads, 0, st>>>(x, ldx, rows, k, off, n_groups,
                                                              min_rows, q, scale, lds);
  return cudaGetLastError();
}

cudaError_t epic_cuk_dequant_rows(const epic_weight *w, int64_t r0, int64_t nr, void *out,
                                  int out_bf16, cudaStream_t st) {
  k_dequant_rows<<<dim3(grid_cols(w->cols, kThreads), grid_rows(nr)), kThreads, 0, st>>>(
      weight_args(w), r0, nr, out, out_bf16);
  return cudaGetLastError();
}

cudaError_t epic_cuk_pad_rows_f32(const float *s, int64_t nbr, int64_t nbc, int64_t ldp, float *out,
                                  cudaStream_t st) {
  k_pad_rows<<<grid_cols(nbr * ldp, kThreads), kThreads, 0, st>>>(s, nbr, nbc, ldp, out);
  return cudaGetLastError();
}

cudaError_t epic_cuk_rmsnorm(const float *x, int64_t ldx, int64_t m, int64_t n, const float *w,
                             float eps, float *y, int64_t ldy, cudaStream_t st) {
  if (n <= 8 * kThreads)
    k_rmsnorm<kThreads, kThreads><<<grid_rows(m), kThreads, 0, st>>>(x, ldx, m, n, w, eps, y, ldy);
  else if (m <= kNormFewRows)
    k_rmsnorm<kNormWide, kNormWide>
        <<<grid_rows(m), kNormWide, 0, st>>>(x, ldx, m, n, w, eps, y, ldy);
  else
    k_rmsnorm<kThreads, kNormWide><<<grid_rows(m), kThreads, 0, st>>>(x, ldx, m, n, w, eps, y, ldy);
  return cudaGetLastError();
}

cudaError_t epic_cuk_rope(float *x, int64_t m, int64_t n_heads, int64_t ld_tok, int64_t ld_head,
                          int64_t rope_dim, const int32_t *pos, const epic_cuk_rope_freq *freq,
                          cudaStream_t st) {
  const dim3 grid((unsigned)((n_heads + kRopeHeads - 1) / kRopeHeads), (unsigned)grid_rows(m));
  k_rope<<<grid, 128, 0, st>>>(x, m, n_heads, ld_tok, ld_head, rope_dim / 2, pos, *freq);
  return cudaGetLastError();
}

cudaError_t epic_cuk_silu_mul(const float *g, int64_t ldg, const float *u, int64_t ldu, int64_t m,
                              int64_t n, float *y, int64_t ldy, cudaStream_t st) {
  const int vec = rows_vec4(g, ldg, n) && rows_vec4(u, ldu, n) && rows_vec4(y, ldy, n);
  const int per = vec ? 4 : 1;
  k_silu_mul<<<dim3(grid_cols((n + per - 1) / per, kThreads), grid_rows(m)), kThreads, 0, st>>>(
      g, ldg, u, ldu, m, n, y, ldy, vec);
  return cudaGetLastError();
}

cudaError_t epic_cuk_axpy(int64_t n, float a, const float *x, float *y, cudaStream_t st) {
  k_axpy<<<grid_cols(n, kThreads), kThreads, 0, st>>>(n, a, x, y);
  return cudaGetLastError();
}

cudaError_t epic_cuk_embed(const epic_weight *table, const int32_t *ids, int64_t m, float *y,
                           int *err, cudaStream_t st) {
  k_embed<<<dim3(grid_cols(table->cols, kThreads), grid_rows(m)), kThreads, 0, st>>>(
      weight_args(table), ids, m, y, err);
  return cudaGetLastError();
}

cudaError_t epic_cuk_kv_store(const epic_kv_view *kv, int64_t start, int64_t m, const float *latent,
                              int64_t ld_latent, const float *kpe, int64_t ld_kpe,
                              cudaStream_t st) {
  if (kv->dtype == EPIC_KV_BF16)
    k_kv_store<<<grid_rows(m), 128, 0, st>>>(static_cast<uint16_t *>(kv->pool), kv->block_table,
                                             kv->page_size, kv->width, kv->lora, start, m, latent,
                                             ld_latent, kpe, ld_kpe);
  else
    k_kv_store<<<grid_rows(m), 128, 0, st>>>(static_cast<float *>(kv->pool), kv->block_table,
                                             kv->page_size, kv->width, kv->lora, start, m, latent,
                                             ld_latent, kpe, ld_kpe);
  return cudaGetLastError();
}

cudaError_t epic_cuk_kv_gather(const epic_kv_view *kv, int64_t n, float *latent, float *kpe,
                               cudaStream_t st) {
  if (kv->dtype == EPIC_KV_BF16)
    k_kv_gather<<<grid_rows(n), 128, 0, st>>>(static_cast<const uint16_t *>(kv->pool),
                                              kv->block_table, kv->page_size, kv->width, kv->lora,
                                              n, latent, kpe);
  else
    k_kv_gather<<<grid_rows(n), 128, 0, st>>>(static_cast<const float *>(kv->pool),
                                              kv->block_table, kv->page_size, kv->width, kv->lora,
                                              n, latent, kpe);
  return cudaGetLastError();
}

cudaError_t epic_cuk_softmax_causal(float *s, int64_t rows, int64_t mc, int64_t ld,
                                    int64_t first_valid, cudaStream_t st) {
  k_softmax_causal<<<grid_rows(rows), kThreads, 0, st>>>(s, rows, mc, ld, first_valid);
  return cudaGetLastError();
}

size_t epic_cuk_row_pick_scratch(int64_t m, int64_t n) {
  return (size_t)(m * ((n + kPickChunk - 1) / kPickChunk)) * sizeof(PickPart);
}

cudaError_t epic_cuk_row_pick(const float *x, int64_t m, int64_t n, int32_t *ids, float *logprob,
                              void *scratch, cudaStream_t st) {
  if (m <= 0)
    return cudaSuccess;
  const int64_t n_chunks = (n + kPickChunk - 1) / kPickChunk;
  PickPart *part = static_cast<PickPart *>(scratch);
  for (int64_t r0 = 0; r0 < m; r0 += kMaxGridY) {
    const int64_t mr = m - r0 < kMaxGridY ? m - r0 : kMaxGridY;
    k_row_pick_part<<<dim3((unsigned)n_chunks, (unsigned)mr), kPickThreads, 0, st>>>(
        x + r0 * n, n, kPickChunk, part + r0 * n_chunks);
  }
  k_row_pick_merge<<<(unsigned)m, 32, 0, st>>>(x, n, (int)n_chunks, part, ids, logprob);
  return cudaGetLastError();
}

} // extern "C"
