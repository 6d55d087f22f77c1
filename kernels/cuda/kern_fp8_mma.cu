// Decode-sized FP8 matmul on tensor cores: y[t][r] = x[t] . W[r] for an e4m3 weight with
// block scales and up to 64 tokens per weight in a CTA (a dense matmul, or every expert
// of a grouped one in one launch, larger groups in tiles of 64 rows). At these sizes the
// time is reading W once, so each warp streams 16 weight rows with 16-byte loads (several
// steps in flight), converts the e4m3 bytes exactly to bf16 and multiplies them against
// the tokens, rounded to bf16 (RNE) by the caller (reading fp32 tokens here instead costs
// up to 2x at 10+ tokens per expert: each warp re-reads them), with `mma.m16n8k16` (fp32
// accumulation), one 8-token tile per mma.
//
// Exact conversion: cvt.f16x2.e4m3x2 gives the values as normal f16 numbers (e4m3's
// smallest subnormal, 2^-9, is above f16's 2^-14) with three mantissa bits; reading the
// f16 exponent field with bf16's bias instead of f16's (a shift and a mask) gives the
// same values times 2^-112 as normal bf16 numbers. The factor is put back in fp32 with the block scale,
// applied in fp32 to each 128-column block's partial sum, as the official fp8_gemm does.
//
// Row invariance (what MTP verification and expert re-placement need): an output is a
// function of its token row and its weight row only. Its k range is cut into S contiguous
// runs of scale blocks, S a function of the block count alone; each run is summed block
// by block (each block: 8 chained mma steps from zero, then one FMA with its scale) and
// the runs are added left to right. How many tokens share a launch, which 8-token tile
// and column a token lands in, how many warps share a row group and how many groups a
// launch holds change only which SM does the work, never the operations on a value.
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "kern_mla_common.cuh"

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kStep = 64;   // columns per warp step: 4 lanes x 16 bytes of each row
constexpr int kMaxSplit = 8; // k runs per output (see row invariance above)
constexpr int kTileRows = 64; // the most token rows one CTA takes (8 tiles of 8)
static_assert(kTileRows == EPIC_CUK_MMA_MAX_ROWS, "one CTA's rows are the dense bound");

// f16 pair -> bf16 pair of the same values times 2^-112 (see the top of the file).
__device__ __forceinline__ uint32_t f16x2_to_bf16x2_scaled(uint32_t h) {
  return ((h >> 3) & 0x0fff0fffu) | (h & 0x80008000u);
}

__device__ __forceinline__ uint32_t e4m3x2_to_bf16x2(uint32_t two) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)two, __NV_E4M3);
  return f16x2_to_bf16x2_scaled((uint32_t)h.x | ((uint32_t)h.y << 16));
}

// 16 e4m3 bytes (columns c .. c + 15) -> r[j] = bf16 pair of columns c + 2j, c + 2j + 1.
__device__ __forceinline__ void w16_to_bf16(const uint4 v, uint32_t (&r)[8]) {
  const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; i++) {
    r[2 * i] = e4m3x2_to_bf16x2(u[i] & 0xffffu);
    r[2 * i + 1] = e4m3x2_to_bf16x2(u[i] >> 16);
  }
}

struct Args {
  const uint16_t *x; // bf16 tokens, row stride ldx (a multiple of 8), 16-byte aligned
  int64_t ldx;
  const int32_t *off;           // grouped: device offsets [n_groups + 1]; NULL: dense
  const epic_cuk_group_w *tab;  // grouped: each group's weight storage
  const uint8_t *w;             // dense weight
  const float *sc;              // dense weight's block scales
  int m;                        // dense token count
  int min_rows, max_rows;       // grouped: the groups of this launch (others: other launches)
  int n_groups;                 // grouped: entries of off (plus one) and tab
  int *err;                     // grouped, optional: a group above `bound` rows is flagged
  int bound;
  int n, k, br, bc, nbc;        // weight rows, cols, block rows / cols, scale row stride
  int split;                    // S: k runs per output
  int wpg;                      // warps per row group (divides S): execution only
  float *y;
  int64_t ldy;
};

// The lane's 16 token columns at col of each tile (zeros past k and past the group).
template <int NT>
__device__ __forceinline__ void load_tokens(const uint16_t *const (&xt)[NT], int col, bool in_k,
                                            uint4 (&x)[NT][2]) {
#pragma unroll
  for (int t = 0; t < NT; t++) {
    x[t][0] = x[t][1] = make_uint4(0, 0, 0, 0);
    if (xt[t] && in_k) {
      x[t][0] = __ldg(reinterpret_cast<const uint4 *>(xt[t] + col));
      x[t][1] = __ldg(reinterpret_cast<const uint4 *>(xt[t] + col + 8));
    }
  }
}

// One 64-column step of this warp's 16 rows (wa: row g, wb: row g + 8 of the step's
// columns) against NT tiles of 8 tokens (x, from load_tokens), into tmp.
template <int NT>
__device__ __forceinline__ void step(const uint4 wa, const uint4 wb, const uint4 (&x)[NT][2],
                                     float (&tmp)[NT][4]) {
  uint32_t ra[8], rb[8]; // rows g and g + 8 as bf16 pairs
  w16_to_bf16(wa, ra);
  w16_to_bf16(wb, rb);
#pragma unroll
  for (int t = 0; t < NT; t++) {
    const uint4 lo = x[t][0], hi = x[t][1];
    const uint32_t T[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    // mma i takes columns 4i .. 4i + 3 of each lane's 16: the same permutation of k for
    // the weights (A) and the tokens (B), so the products pair up.
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const uint32_t a[4] = {ra[2 * i], rb[2 * i], ra[2 * i + 1], rb[2 * i + 1]};
      mma_bf16(tmp[t][0], tmp[t][1], tmp[t][2], tmp[t][3], a, T[2 * i], T[2 * i + 1]);
    }
  }
}

// Up to two token tiles keep their loads in a ring (RING): each slot is refilled, weights
// and tokens, as soon as its step is done, so D steps are always in flight and the tokens
// arrive with the weights (a token load per step, issued at its use, was the kernel's
// main stall at decode sizes). More tiles double-buffer the weights and load tokens at
// use: their token registers would not fit beside a ring.
template <int NT, int D>
__global__ void __launch_bounds__(kThreads, NT <= 2 ? 2 : 1) k_fp8_mma(const Args a) {
  constexpr bool RING = NT <= 2;
  extern __shared__ float red[]; // [row group][run - 1][NT * 4][32] partial sums
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  int tok0 = 0, cnt = a.m;
  const uint8_t *w = a.w;
  const float *sc = a.sc;
  if (a.tab) { // block-uniform: every warp finds the same group
    // blockIdx.y is the rank of this CTA's group among those with min_rows..max_rows
    // rows, so the grid holds no CTAs for the (at decode, many) groups without rows.
    int rem = blockIdx.y, gi = -1;
    for (int base = 0; base < a.n_groups && gi < 0; base += 32) {
      const int gl = base + lane;
      const int c = gl < a.n_groups ? a.off[gl + 1] - a.off[gl] : 0;
      unsigned bal = __ballot_sync(0xffffffffu, c >= a.min_rows && c <= a.max_rows);
      // only a caller's bound (grouped_matmul_dev) can be exceeded: report, once per launch
      if (a.err && c > a.bound && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 &&
          threadIdx.x < 32)
        atomicOr(a.err, EPIC_CUK_ERR_GROUP_ROWS);
      const int have = __popc(bal);
      if (rem < have) {
        for (int i = 0; i < rem; i++)
          bal &= bal - 1;
        gi = base + __ffs(bal) - 1;
      }
      rem -= have;
    }
    if (gi < 0)
      return;
    // blockIdx.z: which NT * 8 rows of a group larger than one CTA's tiles (the launch's
    // groups above kTileRows rows); a row's operations do not depend on its tile
    tok0 = a.off[gi] + (int)blockIdx.z * NT * 8;
    cnt = min(a.off[gi + 1] - tok0, NT * 8);
    if (cnt <= 0)
      return;
    w = a.tab[gi].data;
    sc = a.tab[gi].scale;
  }
  const int groups = kWarps / a.wpg; // row groups of 16 rows per CTA
  const int rg = warp / a.wpg, wi = warp % a.wpg;
  const int row0 = (blockIdx.x * groups + rg) * 16;
  const int runs = a.split / a.wpg; // runs this warp sums, one after another
  const int nkb = (a.k + a.bc - 1) / a.bc, spb = a.bc / kStep;
  const int n_steps = (a.k + kStep - 1) / kStep;
  // 2^112 split in two factors, so that no block scale below 2^72 overflows
  const float unbias = __int_as_float((56 + 127) << 23); // 2^56

  const uint16_t *xt[NT];
#pragma unroll
  for (int t = 0; t < NT; t++) {
    const int tok = t * 8 + g;
    xt[t] = tok < cnt ? a.x + (int64_t)(tok0 + tok) * a.ldx + q * 16 : nullptr;
  }
  const int ra = row0 + g < a.n ? row0 + g : a.n - 1, rb = row0 + g + 8 < a.n ? row0 + g + 8 : a.n - 1;
  const uint8_t *wa = w + (int64_t)ra * a.k + q * 16, *wb = w + (int64_t)rb * a.k + q * 16;
  const float *srow = sc + (int64_t)(row0 / a.br) * a.nbc;

  float acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; t++)
    acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;

  // This warp's runs are contiguous in k: one stream of steps, loads running ahead across
  // block and run ends; a block's end scales its partial sum, a run's end folds it.
  const int run_first = wi * runs;
  const int s_begin = run_first * nkb / a.split * spb;
  const int s_end = min((run_first + runs) * nkb / a.split * spb, n_steps);
  if (row0 < a.n) { // warp-uniform
    int run = run_first, run_end_kb = (run + 1) * nkb / a.split;
    float part[NT][4], tmp[NT][4];
#pragma unroll
    for (int t = 0; t < NT; t++)
#pragma unroll
      for (int j = 0; j < 4; j++)
        part[t][j] = tmp[t][j] = 0.0f;
    // Step sn's weights (and, in the ring, its tokens) into slot d of w.
    uint4 cur[D][2], xr[RING ? D : 1][NT][2];
    auto fetch = [&](int d, int sn, uint4 (&w)[D][2]) {
      const bool ok = sn < s_end && sn * kStep + q * 16 < a.k;
      w[d][0] = ok ? ld_stream(wa + sn * kStep) : make_uint4(0, 0, 0, 0);
      w[d][1] = ok ? ld_stream(wb + sn * kStep) : make_uint4(0, 0, 0, 0);
      if constexpr (RING)
        load_tokens<NT>(xt, sn * kStep, ok, xr[d]);
    };
#pragma unroll
    for (int d = 0; d < D; d++)
      fetch(d, s_begin + d, cur);
    for (int s = s_begin; s < s_end; s += D) {
      uint4 nxt[D][2]; // double buffer (not RING)
      if constexpr (!RING) {
#pragma unroll
        for (int d = 0; d < D; d++) // the next D steps' loads go out before this D's math
          fetch(d, s + D + d, nxt);
      }
#pragma unroll
      for (int d = 0; d < D; d++) {
        const int sd = s + d;
        if (sd >= s_end) // warp-uniform
          break;
        const int col = sd * kStep;
        if constexpr (RING) { // the slot's data in use, then the slot refilled D steps ahead
          step<NT>(cur[d][0], cur[d][1], xr[d], tmp);
          fetch(d, sd + D, cur);
        } else {
          uint4 x[NT][2];
          load_tokens<NT>(xt, col, col + q * 16 < a.k, x);
          step<NT>(cur[d][0], cur[d][1], x, tmp);
        }
        if (sd + 1 < s_end && (sd + 1) % spb != 0)
          continue;
        // the end of a scale block
        const int kb = sd / spb;
        const float bs = __ldg(srow + kb) * unbias;
#pragma unroll
        for (int t = 0; t < NT; t++)
#pragma unroll
          for (int j = 0; j < 4; j++) {
            part[t][j] = fmaf(tmp[t][j] * unbias, bs, part[t][j]);
            tmp[t][j] = 0.0f;
          }
        if (kb + 1 < run_end_kb && sd + 1 < s_end)
          continue;
        // the end of a run: the first runs fold straight into the result, left to right
        if (wi == 0) {
#pragma unroll
          for (int t = 0; t < NT; t++)
#pragma unroll
            for (int j = 0; j < 4; j++)
              acc[t][j] = run == 0 ? part[t][j] : acc[t][j] + part[t][j];
        } else {
          float *dst = red + ((int64_t)(rg * (a.split - runs) + run - runs) * NT * 4) * 32;
#pragma unroll
          for (int t = 0; t < NT; t++)
#pragma unroll
            for (int j = 0; j < 4; j++)
              dst[(t * 4 + j) * 32 + lane] = part[t][j];
        }
#pragma unroll
        for (int t = 0; t < NT; t++)
#pragma unroll
          for (int j = 0; j < 4; j++)
            part[t][j] = 0.0f;
        run++;
        run_end_kb = (run + 1) * nkb / a.split;
      }
      if constexpr (!RING) {
#pragma unroll
        for (int d = 0; d < D; d++) {
          cur[d][0] = nxt[d][0];
          cur[d][1] = nxt[d][1];
        }
      }
    }
  }
  if (a.wpg > 1) { // CTA-uniform
    __syncthreads();
    if (wi == 0 && row0 < a.n)
      for (int run = runs; run < a.split; run++) {
        const float *src = red + ((int64_t)(rg * (a.split - runs) + run - runs) * NT * 4) * 32;
#pragma unroll
        for (int t = 0; t < NT; t++)
#pragma unroll
          for (int j = 0; j < 4; j++)
            acc[t][j] += src[(t * 4 + j) * 32 + lane];
      }
  }
  if (wi != 0 || row0 >= a.n)
    return;
#pragma unroll
  for (int t = 0; t < NT; t++)
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int tok = t * 8 + 2 * q + (j & 1), row = row0 + g + (j >> 1) * 8;
      if (tok < cnt && row < a.n)
        a.y[(int64_t)(tok0 + tok) * a.ldy + row] = acc[t][j];
    }
}

// S: a function of the weight's column blocks only (row invariance).
int split_of(int nkb) {
  int s = 1;
  while (s * 2 <= kMaxSplit && s * 2 <= nkb)
    s *= 2;
  return s;
}

size_t smem_of(int nt, int split, int wpg) {
  const int groups = kWarps / wpg, runs = split / wpg;
  return (size_t)groups * (size_t)(split - runs) * (size_t)nt * 4 * 32 * sizeof(float);
}

template <int NT, int D> cudaError_t set_smem() {
  size_t most = 0;
  for (int wpg = 1; wpg <= kMaxSplit; wpg *= 2)
    most = smem_of(NT, kMaxSplit, wpg) > most ? smem_of(NT, kMaxSplit, wpg) : most;
  return cudaFuncSetAttribute(k_fp8_mma<NT, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              (int)most);
}

template <int NT, int D> void launch(const Args &a, dim3 grid, size_t smem, cudaStream_t st) {
  k_fp8_mma<NT, D><<<grid, kThreads, smem, st>>>(a);
}

} // namespace

extern "C" {

int epic_cuk_fp8_mma_ok(const epic_weight *w) {
  return w->dtype == EPIC_DT_F8E4M3 && w->cols % 16 == 0 && w->block_cols > 0 &&
         w->block_cols % kStep == 0 && w->block_rows > 0 && w->block_rows % 16 == 0 &&
         w->rows > 0 && w->rows < INT32_MAX && w->cols < INT32_MAX / 2 &&
         ((uintptr_t)w->data & 15u) == 0 && w->scale_inv;
}

cudaError_t epic_cuk_fp8_mma_prepare(void) {
  cudaError_t e = set_smem<1, 4>();
  if (e == cudaSuccess)
    e = set_smem<2, 2>();
  if (e == cudaSuccess)
    e = set_smem<4, 2>();
  if (e == cudaSuccess)
    e = set_smem<8, 2>();
  return e;
}

cudaError_t epic_cuk_fp8_mma(const epic_cuk_fp8_mma_args *p, int sm_count, cudaStream_t st) {
  const epic_weight *w = p->w;
  // a dense matmul takes one CTA's rows; larger groups are cut into row tiles (grid z)
  const int64_t most_rows = p->off ? (int64_t)kTileRows * 65535 : kTileRows;
  if (p->rows_max < 1 || p->rows_max > most_rows || ((uintptr_t)p->x & 15u) ||
      p->rows_min > p->rows_max || (p->err && p->rows_bound < p->rows_max) ||
      p->ldx % 8 != 0 ||
      (p->off && (p->n_groups < 1 || p->n_groups > INT32_MAX - 1 || p->active_groups < 1 ||
                  p->active_groups > p->n_groups || p->active_groups > 65535)))
    return cudaErrorInvalidValue;
  Args a;
  a.x = p->x;
  a.ldx = p->ldx;
  a.off = p->off;
  a.tab = p->off ? p->tab : nullptr;
  a.w = static_cast<const uint8_t *>(w->data);
  a.sc = w->scale_inv;
  a.m = (int)p->rows_max;
  a.max_rows = (int)p->rows_max;
  a.min_rows = p->rows_min > 1 ? (int)p->rows_min : 1;
  a.n_groups = (int)p->n_groups;
  a.err = p->err;
  a.bound = (int)p->rows_bound;
  a.n = (int)w->rows;
  a.k = (int)w->cols;
  a.br = (int)w->block_rows;
  a.bc = (int)w->block_cols;
  a.nbc = (int)((w->cols + w->block_cols - 1) / w->block_cols);
  a.split = split_of(a.nbc);
  a.y = p->y;
  a.ldy = p->ldy;
  // Execution shape: the fewest warps per row group (tokens shared through L1 by more
  // rows) that still gives every SM two CTAs.
  const int64_t tiles = (p->rows_max + kTileRows - 1) / kTileRows;
  const int64_t row_groups = (w->rows + 15) / 16, busy = p->off ? p->active_groups * tiles : 1;
  a.wpg = 1;
  while (a.wpg < a.split && (row_groups * a.wpg + kWarps - 1) / kWarps * busy < 2 * sm_count)
    a.wpg *= 2;
  const int groups = kWarps / a.wpg;
  const dim3 grid((unsigned)((row_groups + groups - 1) / groups),
                  p->off ? (unsigned)p->active_groups : 1u, (unsigned)tiles);
  const int nt = (int)((p->rows_max + 7) / 8);
  if (nt <= 1) {
    launch<1, 4>(a, grid, smem_of(1, a.split, a.wpg), st);
  } else if (nt <= 2) {
    launch<2, 2>(a, grid, smem_of(2, a.split, a.wpg), st);
  } else if (nt <= 4) {
    launch<4, 2>(a, grid, smem_of(4, a.split, a.wpg), st);
  } else {
    launch<8, 2>(a, grid, smem_of(8, a.split, a.wpg), st);
  }
  return cudaGetLastError();
}

} // extern "C"
