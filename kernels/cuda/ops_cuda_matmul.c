/* CUDA matmul y = x . W^T for checkpoint-format weights (see ops_cuda.h, Precision).
 * cuBLAS is column-major: row-major y [m][rows] (ld ldy) is the column-major
 * rows x m matrix Y^T = W . X^T, with W row-major [rows][cols] read as the transposed
 * column-major cols x rows matrix (op T) and X row-major [m][cols] as the column-major
 * cols x m matrix (op N). That "TN" form is also the one cuBLASLt's FP8 kernels take.
 *
 * FP8 block scales for cuBLASLt: the weight (operand A) uses BLK128x128_32F, whose
 * layout is the checkpoint's own [ceil(rows/128)][ceil(cols/128)] row-major array with
 * its row stride rounded up to 4 floats (16 bytes), so it is used in place unless
 * ceil(cols/128) % 4 != 0, when a padded copy is made per call. The activations
 * (operand B) use VEC128_32F: one fp32 per token and 128-column block, token-major
 * inside a block column. */
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../common/log.h"
#include "ops_cuda_impl.h"

enum { EPIC_CUDA_DQ_CHUNK_BYTES = 64 << 20 };
/* The largest output chunk of a whole-weight GEMM in grouped_chunks. */
enum { EPIC_CUDA_WHOLE_OUT_BYTES = 256 << 20 };

static int aligned16(const void *p) {
  return ((uintptr_t)p & 15u) == 0;
}

/* FP8 weights cuBLASLt's block-scaled GEMM can take as they are. */
static int lt_candidate(const epic_weight *w) {
  return w->dtype == EPIC_DT_F8E4M3 && w->block_rows == 128 && w->block_cols == 128 &&
         w->cols % 16 == 0 && aligned16(w->data) && aligned16(w->scale_inv);
}

static void lt_plan_release(epic_cuda_lt_plan *pl) {
  if (pl->desc)
    cublasLtMatmulDescDestroy(pl->desc);
  if (pl->a)
    cublasLtMatrixLayoutDestroy(pl->a);
  if (pl->b)
    cublasLtMatrixLayoutDestroy(pl->b);
  if (pl->c)
    cublasLtMatrixLayoutDestroy(pl->c);
  memset(pl, 0, sizeof *pl);
}

/* Build descriptors and ask the heuristic for one algorithm; pl->ok = 0 when cuBLASLt
 * has none (or refuses the combination), which the caller treats as "use another path". */
static void lt_plan_build(epic_cuda_ops *c, epic_cuda_lt_plan *pl) {
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  const int32_t a_mode = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
  const int32_t b_mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
  const cudaDataType_t dt = pl->out_bf16 ? CUDA_R_16BF : CUDA_R_32F;
  const size_t ws_max = pl->no_ws ? 0 : c->lt_ws_bytes;
  const void *placeholder = c->lt_ws; /* real scale pointers are set per call */
  cublasLtMatmulPreference_t pref = NULL;
  cublasLtMatmulHeuristicResult_t res;
  int n_res = 0;
  pl->ok = 0;
  if (cublasLtMatmulDescCreate(&pl->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) != CUBLAS_STATUS_SUCCESS)
    return;
  if (cublasLtMatmulDescSetAttribute(pl->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta) ||
      cublasLtMatmulDescSetAttribute(pl->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb) ||
      cublasLtMatmulDescSetAttribute(pl->desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &a_mode,
                                     sizeof a_mode) ||
      cublasLtMatmulDescSetAttribute(pl->desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &b_mode,
                                     sizeof b_mode) ||
      cublasLtMatmulDescSetAttribute(pl->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &placeholder,
                                     sizeof placeholder) ||
      cublasLtMatmulDescSetAttribute(pl->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &placeholder,
                                     sizeof placeholder))
    return;
  if (cublasLtMatrixLayoutCreate(&pl->a, CUDA_R_8F_E4M3, (uint64_t)pl->k, (uint64_t)pl->n, pl->k) ||
      cublasLtMatrixLayoutCreate(&pl->b, CUDA_R_8F_E4M3, (uint64_t)pl->k, (uint64_t)pl->m, pl->k) ||
      cublasLtMatrixLayoutCreate(&pl->c, dt, (uint64_t)pl->n, (uint64_t)pl->m, pl->ldd))
    return;
  if (cublasLtMatmulPreferenceCreate(&pref))
    return;
  if (cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                           &ws_max, sizeof ws_max) == 0 &&
      cublasLtMatmulAlgoGetHeuristic(c->lt, pl->desc, pl->a, pl->b, pl->c, pl->c, pref, 1, &res,
                                     &n_res) == CUBLAS_STATUS_SUCCESS &&
      n_res > 0) {
    pl->algo = res.algo;
    pl->ok = 1;
  }
  cublasLtMatmulPreferenceDestroy(pref);
}

static epic_cuda_lt_plan *lt_plan(epic_cuda_ops *c, int64_t n, int64_t k, int64_t m, int64_t ldd,
                                  int out_bf16, int no_ws) {
  uint64_t h = 0x9e3779b97f4a7c15ull;
  const int64_t key[] = {n, k, m, ldd, out_bf16, no_ws};
  for (size_t i = 0; i < sizeof key / sizeof key[0]; i++)
    h = (h ^ (uint64_t)key[i]) * 0x100000001b3ull;
  const int set = (int)((h >> 29) % (EPIC_CUDA_LT_PLANS / EPIC_CUDA_LT_WAYS));
  epic_cuda_lt_plan *ways = &c->lt_plans[set * EPIC_CUDA_LT_WAYS];
  for (int i = 0; i < EPIC_CUDA_LT_WAYS; i++) {
    epic_cuda_lt_plan *pl = &ways[i];
    if (pl->used && pl->n == n && pl->k == k && pl->m == m && pl->ldd == ldd &&
        pl->out_bf16 == out_bf16 && pl->no_ws == no_ws)
      return pl;
  }
  epic_cuda_lt_plan *pl = &ways[c->lt_next[set]];
  c->lt_next[set] = (c->lt_next[set] + 1) % EPIC_CUDA_LT_WAYS;
  lt_plan_release(pl);
  pl->used = 1;
  pl->n = n;
  pl->k = k;
  pl->m = m;
  pl->ldd = ldd;
  pl->out_bf16 = out_bf16;
  pl->no_ws = no_ws;
  lt_plan_build(c, pl);
  if (!pl->ok)
    EPIC_LOG_DEBUG("cuda: cuBLASLt has no block-scaled FP8 kernel for [%lld x %lld] m=%lld (%s "
                   "out)",
                   (long long)n, (long long)k, (long long)m, out_bf16 ? "bf16" : "fp32");
  return pl;
}

static int64_t round_up(int64_t a, int64_t b) {
  return (a + b - 1) / b * b;
}

/* Output ld used by the fp32 cuBLASLt path: the caller's when it is 16-byte aligned. */
static int64_t lt_ldd_f32(int64_t rows, int64_t ldy, const float *y) {
  return (ldy % 4 == 0 && (!y || aligned16(y))) ? ldy : round_up(rows, 4);
}

static epic_cuda_mm_path choose_path(epic_cuda_ops *c, const epic_weight *w, int64_t m, int64_t ldy,
                                     const float *y, epic_cuda_lt_plan **plan) {
  *plan = NULL;
  const int any = w->dtype == EPIC_DT_BF16 || w->dtype == EPIC_DT_F8E4M3 ||
                  w->dtype == EPIC_DT_F16 || w->dtype == EPIC_DT_F32;
  if (c->exact_matmul && any)
    return EPIC_CUDA_MM_EXACT_ROWS;
  if (c->invariant && any)
    return w->dtype == EPIC_DT_F8E4M3 && epic_cuk_fp8_wgmma_ok(w) ? EPIC_CUDA_MM_FP8_WGMMA
                                                                  : EPIC_CUDA_MM_FAST_ROWS;
  switch (w->dtype) {
  case EPIC_DT_F32: return EPIC_CUDA_MM_SGEMM;
  case EPIC_DT_BF16: return EPIC_CUDA_MM_BF16;
  case EPIC_DT_F16: return EPIC_CUDA_MM_DEQUANT_F32;
  case EPIC_DT_F8E4M3: break;
  default: return EPIC_CUDA_MM_INVALID;
  }
  const int skinny_first = m <= EPIC_CUDA_FP8_SKINNY_MAX_M &&
                           w->rows * w->cols < EPIC_CUDA_FP8_SKINNY_MAX_BYTES &&
                           epic_cuk_fp8_skinny_ok(w, m);
  if (c->fp8_small == EPIC_CUDA_FP8_SMALL_MMA && m <= EPIC_CUDA_FP8_MMA_DENSE_MAX_M &&
      !skinny_first && epic_cuk_fp8_mma_ok(w))
    return EPIC_CUDA_MM_FP8_MMA;
  if (epic_cuk_fp8_skinny_ok(w, m))
    return EPIC_CUDA_MM_FP8_SKINNY;
  if (!lt_candidate(w))
    return EPIC_CUDA_MM_DEQUANT_BF16;
  /* cuBLASLt's block-scaled kernels want the token count (and so the stride of the
   * activation scales) 16-byte aligned: pad it, staging the output when padded. */
  static const int64_t pads[] = {4, 16};
  for (int i = 0; i < 2; i++) {
    const int64_t mp = round_up(m, pads[i]);
    epic_cuda_lt_plan *pl = lt_plan(
        c, w->rows, w->cols, mp, mp == m ? lt_ldd_f32(w->rows, ldy, y) : round_up(w->rows, 4), 0, 0);
    if (pl->ok) {
      *plan = pl;
      return EPIC_CUDA_MM_FP8_LT;
    }
    pl = lt_plan(c, w->rows, w->cols, mp, round_up(w->rows, 8), 1, 0);
    if (pl->ok) {
      *plan = pl;
      return EPIC_CUDA_MM_FP8_LT_BF16;
    }
  }
  return EPIC_CUDA_MM_DEQUANT_BF16;
}

epic_cuda_mm_path epic_ops_cuda_matmul_path(epic_ops *o, const epic_weight *w, int64_t m,
                                            int64_t ldy) {
  if (!o || !epic_cuda_weight_ok(w) || m <= 0)
    return EPIC_CUDA_MM_INVALID;
  epic_cuda_lt_plan *pl;
  return choose_path(epic_cuda_of(o), w, m, ldy, NULL, &pl);
}

const char *epic_cuda_mm_path_name(epic_cuda_mm_path p) {
  switch (p) {
  case EPIC_CUDA_MM_SGEMM: return "sgemm";
  case EPIC_CUDA_MM_BF16: return "bf16";
  case EPIC_CUDA_MM_FP8_LT: return "fp8_cublaslt";
  case EPIC_CUDA_MM_FP8_LT_BF16: return "fp8_cublaslt_bf16out";
  case EPIC_CUDA_MM_DEQUANT_BF16: return "dequant_bf16";
  case EPIC_CUDA_MM_DEQUANT_F32: return "dequant_f32";
  case EPIC_CUDA_MM_FP8_SKINNY: return "fp8_skinny";
  case EPIC_CUDA_MM_FP8_MMA: return "fp8_mma";
  case EPIC_CUDA_MM_EXACT_ROWS: return "exact_rows";
  case EPIC_CUDA_MM_FP8_WGMMA: return "fp8_wgmma";
  case EPIC_CUDA_MM_FAST_ROWS: return "fast_rows";
  default: return "invalid";
  }
}

/* The m rows of x (row i at xidx[i] when given) as dense bf16 rows in the act buffer. */
static epic_status to_bf16(epic_cuda_ops *c, const float *x, int64_t ldx, const int32_t *xidx,
                           int64_t m, int64_t k, uint16_t **out) {
  EPIC_CHECK(epic_cuda_buf_reserve(c, &c->act, (size_t)(m * k) * 2));
  *out = (uint16_t *)c->act.p;
  EPIC_CHECK_CUDA(epic_cuk_f32_to_bf16(x, ldx, xidx, m, k, *out, c->stream),
                  "matmul: convert to bf16");
  return EPIC_OK;
}

static epic_status gemm_bf16(epic_cuda_ops *c, const void *w, int64_t rows, int64_t k,
                             const uint16_t *xb, int64_t m, float *y, int64_t ldy) {
  const float one = 1.0f, zero = 0.0f;
  EPIC_CHECK_CUBLAS(cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)rows, (int)m, (int)k, &one,
                                 w, CUDA_R_16BF, (int)k, xb, CUDA_R_16BF, (int)k, &zero, y,
                                 CUDA_R_32F, (int)ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                    "bf16 GEMM");
  return EPIC_OK;
}

/* True when the plan writes y directly (fp32 output, caller's stride, no token padding). */
static int lt_direct(const epic_cuda_lt_plan *pl, int64_t m, const float *y, int64_t ldy) {
  return !pl->out_bf16 && pl->m == m && pl->ldd == ldy && aligned16(y);
}

static epic_status mm_fp8_lt(epic_cuda_ops *c, const float *x, int64_t ldx, int64_t m,
                             const epic_weight *w, float *y, int64_t ldy, epic_cuda_lt_plan *pl) {
  const int64_t n = w->rows, k = w->cols, nbc = (k + 127) / 128, nbr = (n + 127) / 128;
  const int64_t mp = pl->m; /* padded token count */
  const size_t q_bytes = (size_t)round_up(mp * k, 16);
  EPIC_CHECK(epic_cuda_buf_reserve(c, &c->act, q_bytes + (size_t)(nbc * mp) * sizeof(float)));
  uint8_t *xq = (uint8_t *)c->act.p;
  float *xs = (float *)(xq + q_bytes);
  if (mp > m) { /* zero padding tokens: codes 0 with scale 0 */
    EPIC_CHECK_CUDA(cudaMemsetAsync(xq + m * k, 0, (size_t)((mp - m) * k), c->stream),
                    "matmul: pad activations");
    EPIC_CHECK_CUDA(cudaMemset2DAsync(xs + m, (size_t)mp * sizeof(float), 0,
                                      (size_t)(mp - m) * sizeof(float), (size_t)nbc, c->stream),
                    "matmul: pad activation scales");
  }
  EPIC_CHECK_CUDA(epic_cuk_quant_fp8_1x128(x, ldx, m, k, xq, xs, mp, c->stream),
                  "matmul: quantise activations");
  const float *ws = w->scale_inv;
  if (nbc % 4 != 0) {
    const int64_t ldp = round_up(nbc, 4);
    EPIC_CHECK(epic_cuda_buf_reserve(c, &c->wdq, (size_t)(nbr * ldp) * sizeof(float)));
    EPIC_CHECK_CUDA(
        epic_cuk_pad_rows_f32(w->scale_inv, nbr, nbc, ldp, (float *)c->wdq.p, c->stream),
        "matmul: pad weight scales");
    ws = (const float *)c->wdq.p;
  }
  EPIC_CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(pl->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                                                   &ws, sizeof ws),
                    "FP8 weight scales");
  const float *xs_c = xs;
  EPIC_CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(pl->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                                                   &xs_c, sizeof xs_c),
                    "FP8 activation scales");
  void *d = y;
  if (!lt_direct(pl, m, y, ldy)) {
    const size_t esz = pl->out_bf16 ? 2 : 4;
    EPIC_CHECK(epic_cuda_buf_reserve(c, &c->outb, (size_t)(mp * pl->ldd) * esz));
    d = c->outb.p;
  }
  const float one = 1.0f, zero = 0.0f;
  EPIC_CHECK_CUBLAS(cublasLtMatmul(c->lt, pl->desc, &one, w->data, pl->a, xq, pl->b, &zero, d,
                                   pl->c, d, pl->c, &pl->algo, c->lt_ws, c->lt_ws_bytes, c->stream),
                    "FP8 block-scaled GEMM");
  return EPIC_OK; /* a staged output is moved into y by the caller */
}

/* m <= EPIC_CUK_MMA_MAX_ROWS rows of x, rounded to bf16, times an FP8 weight on the
 * tensor-core kernel. */
static epic_status mm_fp8_mma(epic_cuda_ops *c, const float *x, int64_t ldx, int64_t m,
                              const epic_weight *w, float *y, int64_t ldy) {
  epic_cuk_fp8_mma_args a = {
      .ldx = w->cols, .w = w, .n_groups = 1, .active_groups = 1, .rows_max = m, .y = y, .ldy = ldy};
  uint16_t *xb;
  EPIC_CHECK(to_bf16(c, x, ldx, NULL, m, w->cols, &xb));
  a.x = xb;
  EPIC_CHECK_CUDA(epic_cuk_fp8_mma(&a, c->sm_count, c->stream), "matmul: FP8 tensor-core kernel");
  return EPIC_OK;
}

static epic_status grouped_chunks(epic_cuda_ops *c, int fast, const float *x, int64_t ldx,
                                  const int64_t *off, int64_t n_groups, const epic_weight *w,
                                  int64_t w_stride, const uint8_t *done, float *y, int64_t ldy);
static epic_status grouped_invariant(epic_cuda_ops *c, const float *x, int64_t ldx,
                                     const int32_t *xidx, int64_t n_src, const int64_t *off,
                                     int64_t n_groups, const epic_weight *w, int64_t w_stride,
                                     float *y, int64_t ldy);

epic_status epic_cuda_matmul(epic_ops *o, const float *x, int64_t ldx, int64_t m,
                             const epic_weight *w, float *y, int64_t ldy) {
  if (!epic_cuda_weight_ok(w) || !x || !y || m < 0 || ldx < w->cols || ldy < w->rows) {
    EPIC_LOG_ERROR("matmul: invalid arguments (dtype %s, W [%lld, %lld], m %lld)",
                   w ? epic_dtype_name(w->dtype) : "?", w ? (long long)w->rows : -1LL,
                   w ? (long long)w->cols : -1LL, (long long)m);
    return EPIC_ERR_INVALID;
  }
  if (m == 0 || w->rows == 0)
    return EPIC_OK;
  if (w->rows > INT_MAX || w->cols > INT_MAX || m > INT_MAX || ldx > INT_MAX || ldy > INT_MAX) {
    EPIC_LOG_ERROR("matmul: dimensions beyond cuBLAS's int range");
    return EPIC_ERR_UNSUPPORTED;
  }
  epic_cuda_ops *c = epic_cuda_of(o);
  const int64_t rows = w->rows, k = w->cols;
  epic_cuda_lt_plan *pl = NULL;
  const epic_cuda_mm_path path = choose_path(c, w, m, ldy, y, &pl);
  switch (path) {
  case EPIC_CUDA_MM_SGEMM: {
    const float one = 1.0f, zero = 0.0f;
    EPIC_CHECK_CUBLAS(cublasSgemm(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)rows, (int)m, (int)k,
                                  &one, (const float *)w->data, (int)k, x, (int)ldx, &zero, y,
                                  (int)ldy),
                      "fp32 GEMM");
    return EPIC_OK;
  }
  case EPIC_CUDA_MM_BF16: {
    uint16_t *xb;
    EPIC_CHECK(to_bf16(c, x, ldx, NULL, m, k, &xb));
    return gemm_bf16(c, w->data, rows, k, xb, m, y, ldy);
  }
  case EPIC_CUDA_MM_FP8_LT:
  case EPIC_CUDA_MM_FP8_LT_BF16: {
    EPIC_CHECK(mm_fp8_lt(c, x, ldx, m, w, y, ldy, pl));
    if (path == EPIC_CUDA_MM_FP8_LT && !lt_direct(pl, m, y, ldy)) /* staged output */
      EPIC_CHECK_CUDA(cudaMemcpy2DAsync(y, (size_t)ldy * 4, c->outb.p, (size_t)pl->ldd * 4,
                                        (size_t)rows * 4, (size_t)m, cudaMemcpyDeviceToDevice,
                                        c->stream),
                      "matmul: copy staged output");
    if (path == EPIC_CUDA_MM_FP8_LT_BF16)
      EPIC_CHECK_CUDA(
          epic_cuk_bf16_to_f32((const uint16_t *)c->outb.p, pl->ldd, m, rows, y, ldy, c->stream),
          "matmul: widen bf16 output");
    return EPIC_OK;
  }
  case EPIC_CUDA_MM_FP8_SKINNY:
    EPIC_CHECK_CUDA(
        epic_cuk_fp8_skinny(x, ldx, m, w, y, ldy, c->sm_count, c->skinny_split, c->stream),
        "matmul: FP8 skinny kernel");
    return EPIC_OK;
  case EPIC_CUDA_MM_FP8_MMA: return mm_fp8_mma(c, x, ldx, m, w, y, ldy);
  case EPIC_CUDA_MM_EXACT_ROWS: {
    /* the exact grouped path's chunks, as one group: row-invariant (grouped_chunks) */
    const int64_t off[2] = {0, m};
    return grouped_chunks(c, 0, x, ldx, off, 1, w, 1, NULL, y, ldy);
  }
  case EPIC_CUDA_MM_FP8_WGMMA:
  case EPIC_CUDA_MM_FAST_ROWS: {
    /* the invariant precision's grouped path, as one group (grouped_invariant) */
    const int64_t off[2] = {0, m};
    return grouped_invariant(c, x, ldx, NULL, 0, off, 1, w, 1, y, ldy);
  }
  case EPIC_CUDA_MM_DEQUANT_BF16:
  case EPIC_CUDA_MM_DEQUANT_F32: {
    const int bf = path == EPIC_CUDA_MM_DEQUANT_BF16;
    const size_t esz = bf ? 2 : 4;
    int64_t chunk = EPIC_CUDA_DQ_CHUNK_BYTES / (int64_t)(k * (int64_t)esz);
    chunk = chunk < 128 ? 128 : chunk / 128 * 128;
    if (chunk > rows)
      chunk = rows;
    uint16_t *xb = NULL;
    if (bf)
      EPIC_CHECK(to_bf16(c, x, ldx, NULL, m, k, &xb));
    EPIC_CHECK(epic_cuda_buf_reserve(c, &c->wdq, (size_t)(chunk * k) * esz));
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
      const int64_t nr = rows - r0 < chunk ? rows - r0 : chunk;
      EPIC_CHECK_CUDA(epic_cuk_dequant_rows(w, r0, nr, c->wdq.p, bf, c->stream),
                      "matmul: dequantise weight rows");
      if (bf) {
        EPIC_CHECK(gemm_bf16(c, c->wdq.p, nr, k, xb, m, y + r0, ldy));
      } else {
        const float one = 1.0f, zero = 0.0f;
        EPIC_CHECK_CUBLAS(cublasSgemm(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)nr, (int)m, (int)k,
                                      &one, (const float *)c->wdq.p, (int)k, x, (int)ldx, &zero,
                                      y + r0, (int)ldy),
                          "fp32 GEMM on dequantised rows");
      }
    }
    return EPIC_OK;
  }
  default: return EPIC_ERR_INVALID;
  }
}

/* ---------------------------------------------------------------- grouped */

/* Groups with at most this many rows go through the grouped fp32 kernel (each pass
 * of four rows re-reads the weight tile, mostly from L2); larger ones are GEMMs.
 * Applies to the FP32 choice of epic_cuda_fp8_small; the MMA one takes groups of up to
 * mma_group_rows rows in tensor-core launches (mma_classes). */
enum { EPIC_CUDA_GROUPED_MAX_ROWS = 16 };

/* Rows per GEMM of the exact-precision grouped path: every group is multiplied in
 * chunks of exactly this many rows (the last one zero-padded), see grouped_chunks. */
enum { EPIC_CUDA_EXACT_GROUP_ROWS = 16 };

/* Row invariance of grouped_matmul (what expert re-placement, EPLB, relies on: an
 * expert's rows split over its copies land in smaller groups on other ranks; also
 * batch composition). A row's result depends only on the row and the weight when
 * every path a row can take computes it alone, the same way:
 * - FP8, fast precision, the default (mma_group_rows 0): every group, host- or
 *   device-planned, of any size, takes the wgmma kernel (kern_fp8_wgmma.cu), e4m3
 *   activations quantised per row and the block-scaled sum in a fixed order:
 *   row-invariant (epic_ops_experts_invariant holds; test_grouped_rows_cuda).
 * - FP8, fast precision, MMA kind with mma_group_rows > 0: groups of 1..mma_group_rows
 *   rows go through kern_fp8_mma.cu, in a grouped launch or as dense matmuls of its rows,
 *   whose per-output operations do not depend on the other rows (see that file; dense
 *   matmuls of m <= EPIC_CUDA_FP8_MMA_DENSE_MAX_M rows take the same kernel, except the
 *   smallest, see ops_cuda.h), with bf16-rounded activations; larger groups take the
 *   wgmma kernel, with e4m3 ones: a row whose group crosses mma_group_rows (expert
 *   copies split a group) changes.
 * - FP8, fast precision, FP32 kernels: groups of 1..16 rows take the fp32 per-row
 *   kernel of kern_fp8_skinny.cu (one grouped launch, or skinny launches of at most
 *   four rows, which run the same per-token code).
 * - Exact precision: grouped_chunks below runs one GEMM shape for every chunk of every
 *   group (m = 16 staged rows, the same strides and buffers), so cuBLAS picks the
 *   same kernel each time; its tile covers the 16 rows in one column block, and a
 *   GEMM kernel sums each output in an order fixed by its tile and k loop, not by the
 *   values or the number of other rows. Dense matmuls take the same path as one group
 *   (EPIC_CUDA_MM_EXACT_ROWS), and so does head_gemm with its own chunks
 *   (ops_cuda_attn.c): the exact precision is row-invariant as a whole.
 * - Invariant precision: FP8 groups the wgmma kernel takes go there at any size (as in
 *   the fast default), the others through grouped_chunks' fixed shapes with the fast
 *   numerics (chunks of EPIC_CUDA_INVARIANT_ROWS); dense matmuls take the same paths as
 *   one group (EPIC_CUDA_MM_FP8_WGMMA, EPIC_CUDA_MM_FAST_ROWS): grouped_invariant.
 * - Fast precision, larger FP8 groups on the lanes and BF16 / F16 weights: one cuBLAS /
 *   cuBLASLt GEMM per group whose algorithm, and for FP8 even the numerics (e4m3
 *   activations), depend on the group's row count: a row's result can change with its
 *   group's size there. */

static int same_layout(const epic_weight *a, const epic_weight *b) {
  return a->dtype == b->dtype && a->rows == b->rows && a->cols == b->cols &&
         a->block_rows == b->block_rows && a->block_cols == b->block_cols;
}

static const epic_cuk_tmap *group_wmaps(struct epic_cuda_group_tab *t, const epic_weight *w,
                                        epic_status *st);

/* A device copy of the host table h (freed here), or NULL with *st set; e: the status of
 * building h (an error skips the copy). */
static void *upload_table(void *h, size_t bytes, cudaError_t e, const char *what,
                          epic_status *st) {
  void *d = NULL;
  if (e == cudaSuccess)
    e = cudaMalloc(&d, bytes);
  if (e == cudaSuccess)
    e = cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice);
  free(h);
  if (e != cudaSuccess) {
    cudaFree(d);
    *st = epic_cuda_check(e, what);
    return NULL;
  }
  return d;
}

/* What a list's device table and tensor maps were built from: the storage and layout of
 * its n groups, hashed (FNV-1a over the fields). */
static uint64_t list_sig(const epic_weight *w, int64_t stride, int64_t n) {
  uint64_t h = 1469598103934665603ull;
  for (int64_t g = 0; g < n; g++) {
    const epic_weight *wg = &w[g * stride];
    const uint64_t f[7] = {(uint64_t)(uintptr_t)wg->data,
                           (uint64_t)(uintptr_t)wg->scale_inv,
                           (uint64_t)wg->rows,
                           (uint64_t)wg->cols,
                           (uint64_t)wg->block_rows,
                           (uint64_t)wg->block_cols,
                           (uint64_t)wg->dtype};
    for (int i = 0; i < 7; i++)
      h = (h ^ f[i]) * 1099511628211ull;
  }
  return h;
}

/* The cache entry of list w (n groups, stride) with its device table, built once; NULL
 * when the loaded weights differ in layout from shape (then the caller multiplies group
 * by group). An entry whose list now names other storage (a struct reused for another
 * weight: the invariant precision's dense weights, a test's stack) is rebuilt in place. */
static struct epic_cuda_group_tab *group_entry(epic_cuda_ops *c, const epic_weight *w,
                                               int64_t stride, int64_t n,
                                               const epic_weight *shape, epic_status *st) {
  *st = EPIC_OK;
  const uint64_t sig = list_sig(w, stride, n);
  int slot = -1;
  for (int i = 0; i < c->n_group_tabs && slot < 0; i++) {
    struct epic_cuda_group_tab *t = &c->group_tabs[i];
    if (t->key == w && t->stride == stride && t->n == n) {
      if (t->sig == sig)
        return t;
      slot = i;
    }
  }
  if ((*st = epic_cuda_not_recording(c, "a new expert weight table")) != EPIC_OK)
    return NULL;
  epic_cuk_group_w *h = calloc((size_t)n, sizeof *h);
  if (!h) {
    *st = EPIC_ERR_NOMEM;
    return NULL;
  }
  for (int64_t g = 0; g < n; g++) {
    const epic_weight *wg = &w[g * stride];
    if (!wg->data)
      continue; /* another rank's expert: never given rows here */
    /* the caller checked the shape against its kernel; each storage must match it */
    if (!same_layout(wg, shape) || !aligned16(wg->data) || !wg->scale_inv) {
      free(h);
      return NULL;
    }
    h[g].data = wg->data;
    h[g].scale = wg->scale_inv;
  }
  void *d = upload_table(h, (size_t)n * sizeof *h, cudaSuccess, "grouped matmul: weight table",
                         st);
  if (!d)
    return NULL;
  /* A stale entry is replaced; a full cache gives way round-robin (lists replaced by
   * expert re-placement are never used again); cudaFree waits for kernels still reading
   * the table, and the epoch tells recorded graphs that named it. */
  if (slot < 0 && c->n_group_tabs == EPIC_CUDA_GROUP_TABS) {
    slot = c->group_next;
    c->group_next = (slot + 1) % EPIC_CUDA_GROUP_TABS;
  }
  if (slot >= 0) {
    c->epoch++;
    cudaFree(c->group_tabs[slot].dev);
    cudaFree(c->group_tabs[slot].wmaps);
  } else {
    slot = c->n_group_tabs++;
  }
  c->group_tabs[slot] =
      (struct epic_cuda_group_tab){.key = w, .stride = stride, .n = n, .sig = sig, .dev = d};
  /* the wgmma kernel's tensor maps now, while no graph is being recorded: a decode step
   * recorded later may be the first to need them */
  if (epic_cuk_fp8_wgmma_ok(shape) && !group_wmaps(&c->group_tabs[slot], w, st))
    return NULL;
  /* and the host-planned launches' tile counter (a graph may not allocate it later) */
  if (epic_cuk_fp8_wgmma_ok(shape) &&
      (*st = epic_cuda_buf_reserve(c, &c->tiles, sizeof(int32_t))) != EPIC_OK)
    return NULL;
  return &c->group_tabs[slot];
}

static const epic_cuk_group_w *group_table(epic_cuda_ops *c, const epic_weight *w, int64_t stride,
                                           int64_t n, const epic_weight *shape, epic_status *st) {
  const struct epic_cuda_group_tab *t = group_entry(c, w, stride, n, shape, st);
  return t ? t->dev : NULL;
}

/* The wgmma kernel's tensor maps of the entry's weights (list w) into t->wmaps, the wide
 * tiles' boxes for [0, n) and the narrow tiles' for [n, 2n); group_entry builds them with
 * the table (not while recording), the launches read t->wmaps. */
static const epic_cuk_tmap *group_wmaps(struct epic_cuda_group_tab *t, const epic_weight *w,
                                        epic_status *st) {
  epic_cuk_tmap *h = calloc((size_t)(2 * t->n), sizeof *h);
  if (!h) {
    *st = EPIC_ERR_NOMEM;
    return NULL;
  }
  cudaError_t e = cudaSuccess;
  for (int64_t g = 0; g < t->n && e == cudaSuccess; g++) {
    const epic_weight *wg = &w[g * t->stride];
    if (wg->data)
      e = epic_cuk_tmap_fp8(&h[g], wg->data, wg->rows, wg->cols, EPIC_CUK_WG_TILE_COLS);
    if (wg->data && e == cudaSuccess)
      e = epic_cuk_tmap_fp8(&h[t->n + g], wg->data, wg->rows, wg->cols, EPIC_CUK_WG_NARROW_COLS);
  }
  t->wmaps = upload_table(h, (size_t)(2 * t->n) * sizeof *h, e,
                          "grouped matmul: weight tensor maps", st);
  return t->wmaps;
}

/* The rows of group g that start at x_g / y_g, m of them, through the fp32 per-row
 * kernel in passes of at most four rows (the grouped kernel's passes). */
static epic_status skinny_rows(epic_cuda_ops *c, const float *x, int64_t ldx, int64_t m,
                               const epic_weight *w, float *y, int64_t ldy) {
  for (int64_t t = 0; t < m; t += EPIC_CUK_SKINNY_MAX_M) {
    const int64_t mc = m - t < EPIC_CUK_SKINNY_MAX_M ? m - t : EPIC_CUK_SKINNY_MAX_M;
    EPIC_CHECK_CUDA(
        epic_cuk_fp8_skinny(x + t * ldx, ldx, mc, w, y + t * ldy, ldy, c->sm_count,
                            c->skinny_split, c->stream),
        "grouped matmul: FP8 skinny kernel");
  }
  return EPIC_OK;
}

/* The row chunks of the exact and invariant precisions (see "Row invariance" above): each
 * group's rows staged C at a time into a zero-padded buffer, one GEMM of the same shape,
 * strides and buffers per chunk (and per chunk of weight rows), the chunk's rows copied
 * out. Exact (fast 0, C = EPIC_CUDA_EXACT_GROUP_ROWS): weights dequantised to fp32 (F32
 * read as is), SGEMM on the fp32 rows. Invariant (fast 1, C = EPIC_CUDA_INVARIANT_ROWS):
 * BF16 weights as they are and FP8 ones dequantised to bf16, cuBLAS's bf16 GEMM on the
 * rows rounded to bf16 (the fast BF16 path's numerics); F32 as is and F16 dequantised to
 * fp32, SGEMM. Groups with done[g] set (done may be NULL) are skipped. */
static epic_status grouped_chunks(epic_cuda_ops *c, int fast, const float *x, int64_t ldx,
                                  const int64_t *off, int64_t n_groups, const epic_weight *w,
                                  int64_t w_stride, const uint8_t *done, float *y, int64_t ldy) {
  const int64_t C = fast ? EPIC_CUDA_INVARIANT_ROWS : EPIC_CUDA_EXACT_GROUP_ROWS;
  const float one = 1.0f, zero = 0.0f;
  for (int64_t g = 0; g < n_groups; g++) {
    const int64_t rows = off[g + 1] - off[g];
    const epic_weight *wg = &w[g * w_stride];
    if (rows == 0 || (done && done[g]))
      continue;
    if (!epic_cuda_weight_ok(wg) || ldx < wg->cols || ldy < wg->rows) {
      EPIC_LOG_ERROR("grouped matmul: invalid weight or strides for group %lld", (long long)g);
      return EPIC_ERR_INVALID;
    }
    const int64_t n = wg->rows, k = wg->cols;
    if (n == 0)
      continue;
    if (n > INT_MAX || k > INT_MAX) {
      EPIC_LOG_ERROR("grouped matmul: dimensions beyond cuBLAS's int range");
      return EPIC_ERR_UNSUPPORTED;
    }
    const int bf = fast && (wg->dtype == EPIC_DT_BF16 || wg->dtype == EPIC_DT_F8E4M3);
    const int as_is = wg->dtype == (bf ? EPIC_DT_BF16 : EPIC_DT_F32);
    const int64_t esz = bf ? 2 : 4;
    /* Weight rows per chunk: a BF16 weight as it is in one GEMM per token chunk (the LM head
     * of FP8 checkpoints: in 4,608-row parts it took 28 GEMMs, each staging the rows again),
     * where its output chunk fits EPIC_CUDA_WHOLE_OUT_BYTES; others as the dense
     * dequantising path sizes them. */
    int64_t wr = EPIC_CUDA_DQ_CHUNK_BYTES / (k * esz);
    wr = wr < 128 ? 128 : wr / 128 * 128;
    if (wr > n || (bf && as_is && n <= EPIC_CUDA_WHOLE_OUT_BYTES / (C * (int64_t)sizeof(float))))
      wr = n;
    EPIC_CHECK(epic_cuda_buf_reserve(c, &c->act, (size_t)(C * k * esz)));
    EPIC_CHECK(epic_cuda_buf_reserve(c, &c->outb, (size_t)(C * wr) * sizeof(float)));
    if (!as_is)
      EPIC_CHECK(epic_cuda_buf_reserve(c, &c->wdq, (size_t)(wr * k * esz)));
    uint8_t *xs = (uint8_t *)c->act.p;
    float *ys = (float *)c->outb.p;
    const float *xg = x + off[g] * ldx;
    float *yg = y + off[g] * ldy;
    for (int64_t r0 = 0; r0 < n; r0 += wr) {
      const int64_t nr = n - r0 < wr ? n - r0 : wr;
      const void *a = (const uint8_t *)wg->data + r0 * k * esz;
      if (!as_is) {
        EPIC_CHECK_CUDA(epic_cuk_dequant_rows(wg, r0, nr, c->wdq.p, bf, c->stream),
                        "grouped matmul: dequantise weight rows");
        a = c->wdq.p;
      }
      for (int64_t t = 0; t < rows; t += C) {
        const int64_t mc = rows - t < C ? rows - t : C;
        if (mc < C)
          EPIC_CHECK_CUDA(
              cudaMemsetAsync(xs + mc * k * esz, 0, (size_t)((C - mc) * k * esz), c->stream),
              "grouped matmul: pad rows");
        if (bf)
          EPIC_CHECK_CUDA(
              epic_cuk_f32_to_bf16(xg + t * ldx, ldx, NULL, mc, k, (uint16_t *)xs, c->stream),
              "grouped matmul: stage rows as bf16");
        else
          EPIC_CHECK_CUDA(cudaMemcpy2DAsync(xs, (size_t)k * sizeof(float), xg + t * ldx,
                                            (size_t)ldx * sizeof(float), (size_t)k * sizeof(float),
                                            (size_t)mc, cudaMemcpyDeviceToDevice, c->stream),
                          "grouped matmul: stage rows");
        /* ys [C][wr] (column-major wr x C): the same strides for every chunk, also
         * for a weight's last, shorter row chunk. */
        if (bf)
          EPIC_CHECK(gemm_bf16(c, a, nr, k, (const uint16_t *)xs, C, ys, wr));
        else
          EPIC_CHECK_CUBLAS(cublasSgemm(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)nr, (int)C, (int)k,
                                        &one, (const float *)a, (int)k, (const float *)xs, (int)k,
                                        &zero, ys, (int)wr),
                            "grouped matmul: fp32 GEMM of a row chunk");
        EPIC_CHECK_CUDA(cudaMemcpy2DAsync(yg + t * ldy + r0, (size_t)ldy * sizeof(float), ys,
                                          (size_t)wr * sizeof(float), (size_t)nr * sizeof(float),
                                          (size_t)mc, cudaMemcpyDeviceToDevice, c->stream),
                        "grouped matmul: copy a row chunk out");
      }
    }
  }
  return EPIC_OK;
}

/* The first group's weight with storage: the layout every group of a list shares (groups
 * of other ranks' experts have none). NULL when no group has one. */
static const epic_weight *list_shape(const epic_weight *w, int64_t w_stride, int64_t n_groups) {
  for (int64_t g = 0; g < n_groups; g++)
    if (w[g * w_stride].data)
      return &w[g * w_stride];
  return NULL;
}

/* The device weight table for one grouped launch of `mma` (tensor-core) or fp32 kernel
 * over rows x / y rows of the list's layout `shape`, or NULL (st EPIC_OK) when the
 * launch cannot take these arguments or the loaded weights differ in layout. */
static const epic_cuk_group_w *launch_table(epic_cuda_ops *c, int mma, const epic_weight *w,
                                            int64_t w_stride, int64_t n_groups, int64_t rows,
                                            const epic_weight *shape, int64_t ldx, int64_t ldy,
                                            epic_status *st) {
  *st = EPIC_OK;
  if (!shape || ldx < shape->cols || ldy < shape->rows || n_groups > 65535 || rows > INT32_MAX ||
      !(mma ? epic_cuk_fp8_mma_ok(shape) : epic_cuk_fp8_grouped_ok(shape)))
    return NULL;
  return group_table(c, w, w_stride, n_groups, shape, st);
}

/* The tensor-core launches of a grouped matmul, one per size class of groups (1-8,
 * 9-16, 17-32, 33-64 and 65-128 rows: the kernel's token tiles, the last class in row
 * tiles), up to max_rows. A class's grid has a row per group of that class: counted
 * exactly from host offsets (off_host), else bounded by rows / (the class's smallest
 * size). A row's result is the same in every class (kern_fp8_mma.cu, row invariance).
 * Groups above max_rows are left to the caller. err / bound (>= max_rows): flag groups
 * above bound rows (device offsets only). xidx (device, or NULL): row i of the groups
 * is row xidx[i] of x. */
static epic_status mma_classes(epic_cuda_ops *c, const float *x, int64_t ldx,
                               const int32_t *xidx, int64_t rows, const int64_t *off_host,
                               const int32_t *off_dev,
                               const epic_cuk_group_w *tab, int64_t n_groups, int64_t max_rows,
                               int64_t bound, const epic_weight *shape, int *err, float *y,
                               int64_t ldy) {
  uint16_t *xb;
  int64_t small_rows = 0;
  for (int64_t g = 0; off_host && g < n_groups; g++)
    small_rows += off_host[g + 1] - off_host[g] <= max_rows ? off_host[g + 1] - off_host[g] : 0;
  if (off_host && small_rows < rows / 2) {
    /* Most rows are in larger groups, which other paths take (a prefill step): only the
     * runs of this launch's groups are converted, in place in the full-size buffer the
     * kernel indexes by the offsets. */
    const int64_t k = shape->cols;
    EPIC_CHECK(epic_cuda_buf_reserve(c, &c->act, (size_t)(rows * k) * 2));
    xb = (uint16_t *)c->act.p;
    for (int64_t g = 0; g < n_groups;) {
      int64_t e = g;
      while (e < n_groups && off_host[e + 1] - off_host[e] <= max_rows)
        e++;
      if (off_host[e] > off_host[g])
        EPIC_CHECK_CUDA(epic_cuk_f32_to_bf16(xidx ? x : x + off_host[g] * ldx, ldx,
                                             xidx ? xidx + off_host[g] : NULL,
                                             off_host[e] - off_host[g], k, xb + off_host[g] * k,
                                             c->stream),
                        "grouped matmul: convert to bf16");
      g = e + 1;
    }
  } else {
    EPIC_CHECK(to_bf16(c, x, ldx, xidx, rows, shape->cols, &xb));
  }
  for (int64_t lo = 1, hi = 8; lo <= max_rows; lo = hi + 1, hi *= 2) {
    const int last = hi >= max_rows;
    int64_t most = rows / lo < n_groups ? rows / lo : n_groups;
    if (off_host) {
      most = 0;
      for (int64_t g = 0; g < n_groups; g++) {
        const int64_t r = off_host[g + 1] - off_host[g];
        most += r >= lo && r <= hi;
      }
    }
    if (most == 0)
      continue;
    const epic_cuk_fp8_mma_args a = {.x = xb,
                                     .ldx = shape->cols,
                                     .w = shape,
                                     .off = off_dev,
                                     .tab = tab,
                                     .n_groups = n_groups,
                                     .active_groups = most,
                                     .rows_min = lo,
                                     .rows_max = last ? max_rows : hi,
                                     .y = y,
                                     .ldy = ldy,
                                     .err = last ? err : NULL,
                                     .rows_bound = bound};
    EPIC_CHECK_CUDA(epic_cuk_fp8_mma(&a, c->sm_count, c->stream),
                    "grouped matmul: FP8 tensor-core kernel");
  }
  return EPIC_OK;
}

/* -------------------------------------------------- large groups on lanes */

void epic_cuda_matmul_release(epic_cuda_ops *c) {
  for (int i = 0; i < EPIC_CUDA_LT_PLANS; i++)
    if (c->lt_plans[i].used)
      lt_plan_release(&c->lt_plans[i]);
  for (int l = 0; l < EPIC_CUDA_LT_LANES_MAX; l++) {
    struct epic_cuda_lane *ln = &c->lanes[l];
    if (ln->stream)
      cudaStreamSynchronize(ln->stream);
    if (ln->done)
      cudaEventDestroy(ln->done);
    if (ln->stream)
      cudaStreamDestroy(ln->stream);
    memset(ln, 0, sizeof *ln);
  }
  if (c->fork)
    cudaEventDestroy(c->fork);
  c->fork = NULL;
}

/* The first `lanes` lanes (created on first need; never while recording). */
static epic_status lanes_reserve(epic_cuda_ops *c, int lanes) {
  if (!c->fork) {
    EPIC_CHECK(epic_cuda_not_recording(c, "creating the grouped-GEMM lanes"));
    EPIC_CHECK_CUDA(cudaEventCreateWithFlags(&c->fork, cudaEventDisableTiming), "lane fork event");
  }
  for (int l = 0; l < lanes; l++) {
    struct epic_cuda_lane *ln = &c->lanes[l];
    if (ln->stream)
      continue;
    EPIC_CHECK(epic_cuda_not_recording(c, "creating the grouped-GEMM lanes"));
    EPIC_CHECK_CUDA(cudaStreamCreateWithFlags(&ln->stream, cudaStreamNonBlocking), "lane stream");
    EPIC_CHECK_CUDA(cudaEventCreateWithFlags(&ln->done, cudaEventDisableTiming), "lane event");
  }
  return EPIC_OK;
}

/* One group of grouped_lanes: rows [row0, row0 + rows) of x and y, its GEMM's token count
 * mp (rows rounded up to 4), the offset of its activation scales, its lane, whether its
 * output goes straight into y (else staged at stage_off floats into outb), and how many
 * of its pad rows' codes must be zeroed. */
typedef struct {
  int64_t g, row0, rows, mp, sbase, stage_off;
  int lane, direct, zpad;
} lane_group;

/* The groups of a grouped matmul above lim rows, not yet done, whose weight `fit` takes, sharing the
 * first such weight's shape, in order, with the quantiser's layout of their scales
 * (blocks [ceil(k / 128)][mp] one after another). lg is NULL when nb is 0. */
typedef struct {
  lane_group *lg;
  int64_t nb, total, scales;
  const epic_weight *w0;
} large_set;
static epic_status large_groups(const int64_t *off, int64_t n_groups, const epic_weight *w,
                                int64_t w_stride, int64_t lim, int64_t ldx, int64_t ldy,
                                int (*fit)(const epic_weight *), const uint8_t *done,
                                large_set *ls) {
  memset(ls, 0, sizeof *ls);
  if (n_groups < 1 || off[n_groups] + 4 > INT32_MAX)
    return EPIC_OK;
  ls->lg = calloc((size_t)n_groups, sizeof *ls->lg);
  if (!ls->lg)
    return EPIC_ERR_NOMEM;
  for (int64_t g = 0; g < n_groups; g++) {
    const epic_weight *wg = &w[g * w_stride];
    const int64_t rows = off[g + 1] - off[g];
    if (rows <= lim || done[g] || !epic_cuda_weight_ok(wg) || !fit(wg) || ldx < wg->cols ||
        ldy < wg->rows || (ls->w0 && !same_layout(wg, ls->w0)))
      continue;
    if (!ls->w0)
      ls->w0 = wg;
    lane_group *q = &ls->lg[ls->nb++];
    *q = (lane_group){.g = g, .row0 = off[g], .rows = rows, .mp = round_up(rows, 4)};
    q->sbase = ls->scales;
    ls->scales += (wg->cols + 127) / 128 * q->mp; /* the quantiser's blocks, the last partial */
    ls->total += rows;
  }
  if (ls->nb < 1 || ls->scales >= INT32_MAX) {
    free(ls->lg);
    memset(ls, 0, sizeof *ls);
  }
  return EPIC_OK;
}

/* What cuBLASLt's lanes take: its block-scaled layout with the weight scales in place. */
static int lanes_fit(const epic_weight *w) {
  return lt_candidate(w) && ((w->cols + 127) / 128) % 4 == 0;
}

/* One quantisation launch per EPIC_CUK_QGROUPS_MAX of the nb groups lg: codes into the
 * groups' rows of xq (ld k), scales at xs + sbase. With src (optional: x's rows quantised
 * already) they are copied from there. */
typedef struct {
  const uint8_t *q;
  const float *s;
  int64_t lds;
} quantised_rows;
static epic_status quantise_groups(epic_cuda_ops *c, const float *x, int64_t ldx,
                                   const int32_t *xidx, int64_t k, const lane_group *lg, int64_t nb,
                                   const quantised_rows *src, uint8_t *xq, float *xs) {
  for (int64_t b0 = 0; b0 < nb; b0 += EPIC_CUK_QGROUPS_MAX) {
    epic_cuk_qgroups t;
    t.qsrc = src ? src->q : NULL;
    t.ssrc = src ? src->s : NULL;
    t.lds_src = src ? src->lds : 0;
    t.n = (int32_t)(nb - b0 < EPIC_CUK_QGROUPS_MAX ? nb - b0 : EPIC_CUK_QGROUPS_MAX);
    t.item0[0] = 0;
    for (int j = 0; j < t.n; j++) {
      const lane_group *q = &lg[b0 + j];
      t.row0[j] = (int32_t)q->row0;
      t.rows[j] = (int32_t)q->rows;
      t.zpad[j] = q->zpad;
      t.sbase[j] = (int32_t)q->sbase;
      t.item0[j + 1] = t.item0[j] + (int32_t)q->mp;
    }
    EPIC_CHECK_CUDA(epic_cuk_quant_fp8_groups(x, ldx, xidx, k, xq, xs, &t, c->stream),
                    "grouped matmul: quantise activations");
  }
  return EPIC_OK;
}

/* The wgmma kernel's arguments common to both forms: the codes in c->act ([rows][k]) and
 * scales in c->act_s, entry t's weights (shape's layout), the output. NULL with *st set
 * when the activations' tensor map cannot be built. */
static epic_cuk_fp8_wgmma_args *wgmma_args(epic_cuda_ops *c, const struct epic_cuda_group_tab *t,
                                           int64_t rows, const epic_weight *shape, float *y,
                                           int64_t ldy, epic_status *st) {
  epic_cuk_fp8_wgmma_args *a = calloc(1, sizeof *a);
  if (!a) {
    *st = EPIC_ERR_NOMEM;
    return NULL;
  }
  cudaError_t e = epic_cuk_tmap_fp8(&a->amap, c->act.p, rows, shape->cols, EPIC_CUK_WG_TILE_ROWS);
  if (e == cudaSuccess)
    e = epic_cuk_tmap_fp8(&a->amap16, c->act.p, rows, shape->cols, EPIC_CUK_WG_BOX_ROWS);
  *st = epic_cuda_check(e, "grouped matmul: activation tensor maps");
  if (*st != EPIC_OK) {
    free(a);
    return NULL;
  }
  a->wmaps = t->wmaps;
  a->tab = t->dev;
  a->as = c->act_s.p;
  a->y = y;
  a->ldy = ldy;
  a->n = (int32_t)shape->rows;
  a->k = (int32_t)shape->cols;
  return a;
}

/* Whether the host-planned launch for m rows in nb groups takes half tiles (the same
 * results either way): where groups average at most 1.5 tiles of rows (prefill steps of
 * up to about 6k tokens over 256 experts); with larger groups whole tiles in the static
 * order were faster for gate/up (kernels/cuda/NOTES.md). epic_ops_cuda_set_wgmma_form
 * overrides it. */
static int wgmma_half(const epic_cuda_ops *c, int64_t m, int64_t nb) {
  if (c->wgmma_form != EPIC_CUDA_WGMMA_AUTO)
    return c->wgmma_form == EPIC_CUDA_WGMMA_HALF;
  return m <= nb * (EPIC_CUK_WG_TILE_ROWS * 3 / 2);
}

/* Whether the host-planned launch of the groups ls (n weight rows) takes narrow tiles (the
 * same results): where the wide tiles would not fill half the SMs, e.g. a dense projection
 * at decode sizes in the invariant precision (q_a + kv_a: 9 wide tiles, o_proj 28, a shared
 * expert's gate/up 16), or a decode step's few experts on one rank of many. */
static int wgmma_narrow(const epic_cuda_ops *c, const large_set *ls, int64_t n) {
  int64_t wide = 0;
  for (int64_t i = 0; i < ls->nb; i++)
    wide += epic_cuk_fp8_wgmma_tiles(ls->lg[i].rows, n, 0);
  return 2 * wide <= c->sm_count;
}

/* One launch of the wgmma kernel, counted (epic_ops_cuda_wgmma_launches and, thin,
 * epic_ops_cuda_wgmma_thin_launches). */
static epic_status wgmma_launch(epic_cuda_ops *c, const epic_cuk_fp8_wgmma_args *a) {
  const epic_status st = epic_cuda_check(epic_cuk_fp8_wgmma(a, c->sm_count, c->stream),
                                         "grouped matmul: FP8 wgmma kernel");
  c->wgmma_launches += st == EPIC_OK;
  c->wgmma_thin_launches += st == EPIC_OK && a->thin;
  return st;
}

/* The large FP8 groups (rows > lim) on the wgmma kernel: one quantisation launch and one
 * GEMM launch per EPIC_CUK_WG_GROUPS_MAX groups, on the backend's stream. Sets done[g]
 * for the groups it ran; leaves everything to the lanes (done untouched) when no group
 * qualifies or the list's weights differ in layout. Numerics: the lanes' e4m3
 * activations, the block-scaled sum in the kernel's fixed order (row-invariant). */
static epic_status grouped_wgmma(epic_cuda_ops *c, const float *x, int64_t ldx, const int32_t *xidx,
                                 int64_t n_src, const int64_t *off, int64_t n_groups,
                                 const epic_weight *w, int64_t w_stride, int64_t lim, float *y,
                                 int64_t ldy, uint8_t *done) {
  large_set ls;
  EPIC_CHECK(large_groups(off, n_groups, w, w_stride, lim, ldx, ldy, epic_cuk_fp8_wgmma_ok, done,
                          &ls));
  if (ls.nb < 1)
    return EPIC_OK;
  epic_status st;
  const struct epic_cuda_group_tab *t = group_entry(c, w, w_stride, n_groups, ls.w0, &st);
  const int64_t m = off[n_groups], n = ls.w0->rows, k = ls.w0->cols;
  /* Rows read through xidx from fewer source rows (prefill's gate/up: each token row is
   * 8 group rows): the source rows are quantised once into the gath buffer and the group
   * rows copy their codes and scales (the same bits), instead of quantising every group
   * row from fp32. */
  quantised_rows src = {0};
  const int once = xidx && n_src > 0 && n_src < m && k % 16 == 0;
  epic_cuk_fp8_wgmma_args *a = NULL;
  if (t && t->wmaps) {
    st = epic_cuda_buf_reserve(c, &c->act, (size_t)round_up((m + 4) * k, 16));
    if (st == EPIC_OK)
      st = epic_cuda_buf_reserve(c, &c->act_s, (size_t)ls.scales * sizeof(float));
    if (st == EPIC_OK && once) {
      const size_t qbytes = (size_t)round_up(n_src * k, 16);
      src.lds = round_up(n_src, 4);
      st = epic_cuda_buf_reserve(c, &c->gath, qbytes + (size_t)((k + 127) / 128 * src.lds) * 4);
      src.q = (const uint8_t *)c->gath.p;
      src.s = (const float *)((const uint8_t *)c->gath.p + qbytes);
      if (st == EPIC_OK)
        st = epic_cuda_check(epic_cuk_quant_fp8_1x128(x, ldx, n_src, k, (uint8_t *)src.q,
                                                      (float *)src.s, src.lds, c->stream),
                             "grouped matmul: quantise source rows");
    }
    if (st == EPIC_OK)
      st = quantise_groups(c, x, ldx, xidx, k, ls.lg, ls.nb, once ? &src : NULL, c->act.p,
                           c->act_s.p);
    if (st == EPIC_OK)
      a = wgmma_args(c, t, m, ls.w0, y, ldy, &st);
    if (a) {
      /* A few rows on a weight whose narrow tiles leave SMs idle take the thin form (one
       * H200, one row: q_a 17.1 -> 13.5 us, o_proj 53.9 -> 48.3; a weight of more tiles,
       * e.g. a 129,280-row LM head, is faster tiled). */
      a->thin = c->wgmma_thin && ls.nb == 1 && ls.lg[0].rows <= EPIC_CUK_WG_THIN_ROWS &&
                epic_cuk_fp8_wgmma_tiles(ls.lg[0].rows, n, 1) < c->sm_count;
      a->aq = c->act.p;
      a->half = !a->thin && wgmma_half(c, m, ls.nb);
      a->next_tile = c->tiles.p;
      a->narrow = !a->thin && wgmma_narrow(c, &ls, n);
      if (a->narrow)
        a->wmaps += t->n; /* the narrow boxes' maps */
    }
  }
  for (int64_t b0 = 0; a && st == EPIC_OK && b0 < ls.nb; b0 += EPIC_CUK_WG_GROUPS_MAX) {
    a->n_groups = (int32_t)(ls.nb - b0 < EPIC_CUK_WG_GROUPS_MAX ? ls.nb - b0
                                                                  : EPIC_CUK_WG_GROUPS_MAX);
    int64_t tiles = 0;
    for (int j = 0; j < a->n_groups; j++) {
      const lane_group *q = &ls.lg[b0 + j];
      a->widx[j] = (int32_t)q->g;
      a->row0[j] = (int32_t)q->row0;
      a->rows[j] = (int32_t)q->rows;
      a->sbase[j] = (int32_t)q->sbase;
      a->mp[j] = (int32_t)q->mp;
      a->tile0[j] = (int32_t)tiles;
      tiles += epic_cuk_fp8_wgmma_tiles(q->rows, n, a->narrow);
    }
    a->tile0[a->n_groups] = (int32_t)tiles;
    st = tiles > INT32_MAX ? EPIC_ERR_UNSUPPORTED : wgmma_launch(c, a);
  }
  if (st == EPIC_OK && a)
    for (int64_t i = 0; i < ls.nb; i++)
      done[ls.lg[i].g] = 1;
  free(a);
  free(ls.lg);
  return st;
}

/* The cuBLASLt GEMMs of the large FP8 groups (rows > lim), side by side.
 *
 * Why: one GEMM of a few hundred rows by a 2048 x 7168 expert fills a fraction of the
 * SMs, and a prefill step has 256 of them per projection; one after another on one
 * stream they leave most of the GPU idle, each behind its own quantisation launch.
 * Here one launch per EPIC_CUK_QGROUPS_MAX groups quantises all their rows (codes in x's
 * row order, each group's scales in the block its GEMM reads), then the GEMMs run on
 * n_lanes streams forked from and joined back into the backend's stream by events (so a
 * graph capture records them too), each lane a contiguous run of groups with about the
 * same number of rows. Their plans are chosen without workspace: no split-K, whose
 * reduce kernel behind each small GEMM cost more than the parallelism it adds once the
 * lanes fill the GPU (gate/up at 8192 tokens 4.56 -> 3.79 ms, H200), and no lane needs
 * a workspace of its own.
 *
 * Pad rows (token counts rounded up to 4): their codes are the following rows' (zeroed
 * where those are no listed group's), their scales 0. A group writes its output
 * straight into y, pad rows included, when the rows after it are rewritten later in
 * stream order: by the next group of the same lane, or after the join by the other
 * paths of grouped_matmul; otherwise (the last group of a lane, the end of y, a short
 * next group) it is staged and its real rows copied.
 *
 * Sets done[g] for the groups it ran; leaves everything to the per-group path (done
 * untouched) when no group qualifies or cuBLASLt has no fp32-output plan for one of
 * them. A lone large group takes this path too, so that a group's algorithm does not
 * depend on how many large groups share its call (expert parallelism splits them over
 * ranks). Numerics: the per-group path's e4m3 activations; the algorithm (chosen
 * without workspace) may sum in another order. xidx (device, or NULL): the quantiser
 * reads row i of the groups from row xidx[i] of x. */
static epic_status grouped_lanes(epic_cuda_ops *c, const float *x, int64_t ldx,
                                 const int32_t *xidx, const int64_t *off, int64_t n_groups,
                                 const epic_weight *w, int64_t w_stride, int64_t lim, float *y,
                                 int64_t ldy, uint8_t *done) {
  if (c->n_lanes < 1)
    return EPIC_OK;
  large_set ls;
  EPIC_CHECK(large_groups(off, n_groups, w, w_stride, lim, ldx, ldy, lanes_fit, done, &ls));
  if (ls.nb < 1)
    return EPIC_OK;
  lane_group *lg = ls.lg;
  const int64_t nb = ls.nb, total = ls.total, scales = ls.scales;
  const int64_t n = ls.w0->rows, k = ls.w0->cols, ld_stage = round_up(n, 4);
  int64_t i;
  /* every plan first: nothing is enqueued unless all groups have one */
  const int direct_ok = ldy % 4 == 0 && aligned16(y);
  const int lanes = nb < c->n_lanes ? (int)nb : c->n_lanes;
  int64_t acc = 0, staged = 0;
  for (i = 0; i < nb; i++) {
    lane_group *q = &lg[i];
    q->lane = (int)(acc * lanes / total);
    acc += q->rows;
  }
  for (i = 0; i < nb; i++) {
    lane_group *q = &lg[i];
    const int64_t pad = q->mp - q->rows, end = q->row0 + q->rows;
    /* the next group with rows, and the next listed one */
    int64_t next = q->g + 1;
    while (next < n_groups && off[next + 1] == off[next])
      next++;
    const int64_t next_listed = i + 1 < nb ? lg[i + 1].row0 : off[n_groups] + 4;
    q->zpad = (int)(pad < next_listed - end ? pad : next_listed - end);
    if (!direct_ok) {
      q->direct = 0;
    } else if (pad == 0) {
      q->direct = 1;
    } else if (next >= n_groups || off[next + 1] - off[next] < pad) {
      q->direct = 0;
    } else { /* the next group is listed (then on the same lane) or runs after the join */
      q->direct = !(i + 1 < nb && lg[i + 1].g == next) || lg[i + 1].lane == q->lane;
    }
    if (!q->direct) {
      q->stage_off = staged;
      staged += q->mp * ld_stage;
    }
    const epic_cuda_lt_plan *pl = lt_plan(c, n, k, q->mp, q->direct ? ldy : ld_stage, 0, 1);
    if (!pl->ok) {
      free(lg);
      return EPIC_OK;
    }
  }
  const int64_t m = off[n_groups];
  epic_status st = lanes_reserve(c, lanes);
  if (st == EPIC_OK)
    st = epic_cuda_buf_reserve(c, &c->act, (size_t)round_up((m + 4) * k, 16));
  if (st == EPIC_OK)
    st = epic_cuda_buf_reserve(c, &c->act_s, (size_t)scales * sizeof(float));
  if (st == EPIC_OK && staged)
    st = epic_cuda_buf_reserve(c, &c->outb, (size_t)staged * sizeof(float));
  uint8_t *xq = c->act.p;
  float *xs = c->act_s.p, *stage = c->outb.p;
  if (st == EPIC_OK)
    st = quantise_groups(c, x, ldx, xidx, k, lg, nb, NULL, xq, xs);
  /* fork; from here on every lane is joined back, whatever fails */
  int forked = 0;
  if (st == EPIC_OK)
    st = epic_cuda_check(cudaEventRecord(c->fork, c->stream), "grouped matmul: fork");
  for (int l = 0; st == EPIC_OK && l < lanes; l++) {
    st = epic_cuda_check(cudaStreamWaitEvent(c->lanes[l].stream, c->fork, 0),
                         "grouped matmul: fork");
    forked = l + 1;
  }
  /* issue the lanes' groups interleaved, so that every lane starts at once */
  int64_t first[EPIC_CUDA_LT_LANES_MAX + 1];
  for (int l = 0, j = 0; l <= lanes; l++) {
    while (j < nb && lg[j].lane < l)
      j++;
    first[l] = l == lanes ? nb : j;
  }
  const float one = 1.0f, zero = 0.0f;
  for (int64_t r = 0; st == EPIC_OK && r < nb; r++) {
    int issued = 0;
    for (int l = 0; st == EPIC_OK && l < lanes; l++) {
      if (first[l] + r >= first[l + 1])
        continue;
      issued = 1;
      const lane_group *q = &lg[first[l] + r];
      const epic_weight *wg = &w[q->g * w_stride];
      struct epic_cuda_lane *ln = &c->lanes[l];
      epic_cuda_lt_plan *pl = lt_plan(c, n, k, q->mp, q->direct ? ldy : ld_stage, 0, 1);
      float *d = q->direct ? y + q->row0 * ldy : stage + q->stage_off;
      const float *as = wg->scale_inv, *bs = xs + q->sbase;
      if (!pl->ok) {
        st = EPIC_ERR_CUDA;
        break;
      }
      st = epic_cublas_check(cublasLtMatmulDescSetAttribute(
                                 pl->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &as, sizeof as),
                             "FP8 weight scales");
      if (st == EPIC_OK)
        st = epic_cublas_check(cublasLtMatmulDescSetAttribute(
                                   pl->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &bs, sizeof bs),
                               "FP8 activation scales");
      if (st == EPIC_OK)
        st = epic_cublas_check(cublasLtMatmul(c->lt, pl->desc, &one, wg->data, pl->a,
                                              xq + q->row0 * k, pl->b, &zero, d, pl->c, d, pl->c,
                                              &pl->algo, NULL, 0, ln->stream),
                               "FP8 block-scaled GEMM (grouped lane)");
      if (st == EPIC_OK && !q->direct)
        st = epic_cuda_check(cudaMemcpy2DAsync(y + q->row0 * ldy, (size_t)ldy * 4, d,
                                               (size_t)ld_stage * 4, (size_t)n * 4,
                                               (size_t)q->rows, cudaMemcpyDeviceToDevice,
                                               ln->stream),
                             "grouped matmul: copy staged output");
    }
    if (!issued)
      break;
  }
  for (int l = 0; l < forked; l++) {
    epic_status sj = epic_cuda_check(cudaEventRecord(c->lanes[l].done, c->lanes[l].stream),
                                     "grouped matmul: join");
    if (sj == EPIC_OK)
      sj = epic_cuda_check(cudaStreamWaitEvent(c->stream, c->lanes[l].done, 0),
                           "grouped matmul: join");
    if (st == EPIC_OK)
      st = sj;
  }
  if (st == EPIC_OK)
    for (i = 0; i < nb; i++)
      done[lg[i].g] = 1;
  free(lg);
  return st;
}

/* The rows of x gathered through xidx (rows of them) into the gath buffer. */
static epic_status gather_rows(epic_cuda_ops *c, const float *x, int64_t ldx, const int32_t *xidx,
                               int64_t rows, int64_t k, const float **out) {
  EPIC_CHECK(epic_cuda_buf_reserve(c, &c->gath, (size_t)(rows * k) * sizeof(float)));
  EPIC_CHECK_CUDA(epic_cuk_copy_rows(rows, k, x, ldx, xidx, c->gath.p, k, NULL, c->stream),
                  "grouped matmul: gather rows");
  *out = c->gath.p;
  return EPIC_OK;
}

/* The invariant precision's grouped path (ops_cuda.h): FP8 groups the wgmma kernel takes,
 * of any size (lim 0), on it; the rest through grouped_chunks' fixed shapes, from a
 * gathered copy when the rows come through xidx (the wgmma quantiser reads them through
 * it). Each path computes a row alone, so a row's result depends on its weight alone. */
static epic_status grouped_invariant(epic_cuda_ops *c, const float *x, int64_t ldx,
                                     const int32_t *xidx, int64_t n_src, const int64_t *off,
                                     int64_t n_groups, const epic_weight *w, int64_t w_stride,
                                     float *y, int64_t ldy) {
  uint8_t *done = calloc((size_t)n_groups + 1, 1);
  if (!done)
    return EPIC_ERR_NOMEM;
  epic_status st =
      grouped_wgmma(c, x, ldx, xidx, n_src, off, n_groups, w, w_stride, 0, y, ldy, done);
  const epic_weight *left = NULL; /* the first group still to multiply */
  for (int64_t g = 0; g < n_groups && !left; g++)
    if (!done[g] && off[g + 1] > off[g])
      left = &w[g * w_stride];
  if (st == EPIC_OK && left && xidx) {
    st = gather_rows(c, x, ldx, xidx, off[n_groups], left->cols, &x);
    ldx = left->cols;
  }
  if (st == EPIC_OK && left)
    st = grouped_chunks(c, 1, x, ldx, off, n_groups, w, w_stride, done, y, ldy);
  free(done);
  return st;
}

/* grouped_matmul, with row i of the groups read from row xidx[i] of x when xidx (device
 * memory) is given. The default path takes the index where it converts or quantises
 * the rows (the tensor-core launches' bf16 conversion, the lanes' quantiser); the
 * others read x whole and get a gathered copy. */
static epic_status grouped_core(epic_cuda_ops *c, const float *x, int64_t ldx, const int32_t *xidx,
                                int64_t n_src, const int64_t *off_host, const int32_t *off_dev,
                                int64_t n_groups, const epic_weight *w, int64_t w_stride, float *y,
                                int64_t ldy) {
  epic_ops *o = &c->base;
  const epic_cuk_group_w *tab = NULL;
  const int mma = c->fp8_small == EPIC_CUDA_FP8_SMALL_MMA;
  const int64_t lim = mma ? c->mma_group_rows : EPIC_CUDA_GROUPED_MAX_ROWS;
  int64_t small = 0, small_max = 0;
  if (n_groups < 0 || !off_host || (n_groups > 0 && !w))
    return EPIC_ERR_INVALID;
  for (int64_t g = 0; g < n_groups; g++) {
    const int64_t rows = off_host[g + 1] - off_host[g];
    if (rows < 0)
      return EPIC_ERR_INVALID;
    if (rows > 0 && !w[g * w_stride].data) { /* the launches' table has no entry for it */
      EPIC_LOG_ERROR("grouped matmul: group %lld has %lld rows but no weight", (long long)g,
                     (long long)rows);
      return EPIC_ERR_INVALID;
    }
    if (rows > 0 && rows <= lim) {
      small++;
      small_max = rows > small_max ? rows : small_max;
    }
  }
  const epic_weight *shape = list_shape(w, w_stride, n_groups);
  if (xidx && (c->exact_matmul || !mma) && shape && off_host[n_groups] > 0) {
    EPIC_CHECK(gather_rows(c, x, ldx, xidx, off_host[n_groups], shape->cols, &x));
    ldx = shape->cols;
    xidx = NULL;
  }
  if (c->exact_matmul)
    return grouped_chunks(c, 0, x, ldx, off_host, n_groups, w, w_stride, NULL, y, ldy);
  if (c->invariant)
    return grouped_invariant(c, x, ldx, xidx, n_src, off_host, n_groups, w, w_stride, y, ldy);
  /* the large groups first: their pad rows may run into the next group's rows, which
   * the launches below then write */
  uint8_t *done = calloc((size_t)n_groups + 1, 1);
  if (!done)
    return EPIC_ERR_NOMEM;
  epic_status st = EPIC_OK;
  if (c->grouped_large == EPIC_CUDA_GROUPED_LARGE_WGMMA)
    st = grouped_wgmma(c, x, ldx, xidx, n_src, off_host, n_groups, w, w_stride, lim, y, ldy, done);
  if (st == EPIC_OK)
    st = grouped_lanes(c, x, ldx, xidx, off_host, n_groups, w, w_stride, lim, y, ldy, done);
  /* One launch (per size class) for the small groups. The fp32 kernel leaves a lone small
   * group to the skinny launches below, which compute its rows alike; the tensor-core
   * kernel's dense form is the same code, so it takes any number. */
  if (st == EPIC_OK && small > (mma ? 0 : 1) && off_dev)
    tab = launch_table(c, mma, w, w_stride, n_groups, off_host[n_groups], shape, ldx, ldy, &st);
  if (st == EPIC_OK && tab && mma) {
    st = mma_classes(c, x, ldx, xidx, off_host[n_groups], off_host, off_dev, tab, n_groups,
                     small_max, small_max, shape, NULL, y, ldy);
  } else if (st == EPIC_OK && tab) {
    st = epic_cuda_check(epic_cuk_fp8_grouped(x, ldx, off_dev, n_groups, tab, shape,
                                              EPIC_CUDA_GROUPED_MAX_ROWS, y, ldy, c->stream),
                         "grouped FP8 kernel");
  }
  for (int64_t g = 0; st == EPIC_OK && g < n_groups; g++) {
    const int64_t rows = off_host[g + 1] - off_host[g];
    const epic_weight *wg = &w[g * w_stride];
    if (rows == 0 || done[g] || (tab && rows <= lim))
      continue;
    if (xidx) { /* the first group left to the paths below: they read x whole */
      st = gather_rows(c, x, ldx, xidx, off_host[n_groups], wg->cols, &x);
      if (st != EPIC_OK)
        break;
      ldx = wg->cols;
      xidx = NULL;
    }
    const int fits = epic_cuda_weight_ok(wg) && ldx >= wg->cols && ldy >= wg->rows;
    float *yg = y + off_host[g] * ldy;
    const float *xg = x + off_host[g] * ldx;
    if (!mma && rows <= EPIC_CUDA_GROUPED_MAX_ROWS && fits && wg->rows > 0 &&
        epic_cuk_fp8_skinny_ok(wg, EPIC_CUK_SKINNY_MAX_M)) {
      st = skinny_rows(c, xg, ldx, rows, wg, yg, ldy);
      continue;
    }
    /* a small group without the table stays on the tensor-core kernel's numerics, in
     * dense calls of at most one CTA's rows */
    if (mma && rows <= lim && fits && epic_cuk_fp8_mma_ok(wg)) {
      for (int64_t t = 0; st == EPIC_OK && t < rows; t += EPIC_CUK_MMA_MAX_ROWS) {
        const int64_t m = rows - t < EPIC_CUK_MMA_MAX_ROWS ? rows - t : EPIC_CUK_MMA_MAX_ROWS;
        st = mm_fp8_mma(c, xg + t * ldx, ldx, m, wg, yg + t * ldy, ldy);
      }
      continue;
    }
    st = epic_cuda_matmul(o, xg, ldx, rows, wg, yg, ldy);
  }
  free(done);
  return st;
}

epic_status epic_cuda_grouped_matmul(epic_ops *o, const float *x, int64_t ldx,
                                     const int64_t *off_host, const int32_t *off_dev,
                                     int64_t n_groups, const epic_weight *w, int64_t w_stride,
                                     float *y, int64_t ldy) {
  return grouped_core(epic_cuda_of(o), x, ldx, NULL, 0, off_host, off_dev, n_groups, w, w_stride, y,
                      ldy);
}

/* ABI 8: prefill's expert inputs quantised (or converted) straight from the token rows:
 * the gathered fp32 copy, a write and a read of every (token, expert) row, is not made. */
epic_status epic_cuda_grouped_matmul_rows(epic_ops *o, const float *src, int64_t ld_src,
                                          int64_t n_src, const int32_t *rows, const int64_t *off,
                                          const int32_t *off_dev, int64_t n_groups,
                                          const epic_weight *w, int64_t w_stride, float *y,
                                          int64_t ldy) {
  if (!rows || !src || n_src < 0)
    return EPIC_ERR_INVALID;
  return grouped_core(epic_cuda_of(o), src, ld_src, rows, n_src, off, off_dev, n_groups, w,
                      w_stride, y, ldy);
}

/* The device-planned groups above mma_group_rows rows on the wgmma kernel (tiles counted
 * on the device; the quantiser skips the other rows). *ran = 0, nothing enqueued, when the
 * kernel cannot take the call (layout, strides, group count). */
static epic_status wgmma_dev(epic_cuda_ops *c, const float *x, int64_t ldx, int64_t rows,
                             int64_t max_rows, const int32_t *off, int64_t n_groups,
                             const epic_weight *w, int64_t w_stride, const epic_weight *shape,
                             float *y, int64_t ldy, int *ran) {
  *ran = 0;
  if (!epic_cuk_fp8_wgmma_ok(shape) || n_groups > EPIC_CUK_WG_DEV_GROUPS_MAX ||
      rows + 4 * n_groups + 4 > INT32_MAX)
    return EPIC_OK;
  epic_status st;
  const struct epic_cuda_group_tab *t = group_entry(c, w, w_stride, n_groups, shape, &st);
  EPIC_CHECK(st);
  if (!t || !t->wmaps)
    return EPIC_OK;
  const int64_t k = shape->cols, nbk = (k + 127) / 128, lds = round_up(rows, 4) + 4 * n_groups;
  /* room for the tensor-core launches' bf16 rows too, so the buffer the graph's tensor
   * map names does not move within the call */
  EPIC_CHECK(epic_cuda_buf_reserve(c, &c->act, (size_t)round_up(rows * k * 2, 16)));
  EPIC_CHECK(epic_cuda_buf_reserve(c, &c->act_s, (size_t)(nbk * lds) * sizeof(float)));
  EPIC_CHECK_CUDA(epic_cuk_quant_fp8_dev(x, ldx, rows, k, off, n_groups, c->mma_group_rows,
                                         c->act.p, c->act_s.p, lds, c->stream),
                  "grouped matmul: quantise activations");
  epic_cuk_fp8_wgmma_args *a = wgmma_args(c, t, rows, shape, y, ldy, &st);
  if (!a)
    return st;
  a->n_groups = (int32_t)n_groups;
  a->off_dev = off;
  a->min_rows = (int32_t)c->mma_group_rows;
  a->lds = (int32_t)lds;
  a->bound = (int32_t)max_rows;
  a->err = c->err_flag;
  st = wgmma_launch(c, a);
  free(a);
  *ran = st == EPIC_OK;
  return st;
}

/* Offsets in backend memory only (ABI 6, after moe_plan). The wgmma and tensor-core kernels
 * find their groups on the device, so the fast FP8 case needs no host copy of them: any
 * bound when the wgmma kernel takes every group (mma_group_rows 0, the default), up to
 * EPIC_CUDA_FP8_MMA_GROUP_MAX_ROWS rows otherwise. Everything else (exact precision, the
 * FP32 kind, other weights, larger bounds) reads them back and takes the host-planned
 * path. */
epic_status epic_cuda_grouped_matmul_dev(epic_ops *o, const float *x, int64_t ldx, int64_t rows,
                                         int64_t max_rows, const int32_t *off, int64_t n_groups,
                                         const epic_weight *w, int64_t w_stride, float *y,
                                         int64_t ldy) {
  epic_cuda_ops *c = epic_cuda_of(o);
  if (n_groups < 0 || !off || rows < 0 || max_rows < 0 || (n_groups > 0 && !w) ||
      (rows > 0 && max_rows == 0))
    return EPIC_ERR_INVALID;
  if (rows == 0 || n_groups == 0)
    return EPIC_OK;
  /* The invariant precision plans on the device only where the wgmma kernel takes every
   * group (its host path's choice); anything else goes to the host path below. */
  if (!c->exact_matmul && epic_cuda_groups_all_wgmma(c) &&
      (c->invariant || max_rows > EPIC_CUDA_FP8_MMA_GROUP_MAX_ROWS)) {
    const epic_weight *shape = list_shape(w, w_stride, n_groups);
    int ran = 0;
    if (shape && ldx >= shape->cols && ldy >= shape->rows)
      EPIC_CHECK(
          wgmma_dev(c, x, ldx, rows, max_rows, off, n_groups, w, w_stride, shape, y, ldy, &ran));
    if (ran)
      return EPIC_OK;
  } else if (!c->exact_matmul && !c->invariant && c->fp8_small == EPIC_CUDA_FP8_SMALL_MMA) {
    const epic_weight *shape = list_shape(w, w_stride, n_groups);
    epic_status st;
    const epic_cuk_group_w *tab =
        launch_table(c, 1, w, w_stride, n_groups, rows, shape, ldx, ldy, &st);
    EPIC_CHECK(st);
    if (tab) {
      /* the groups above mma_group_rows on the wgmma kernel, as the host-planned path
       * takes them, so that both give a row the same result */
      int64_t mma_max = max_rows;
      if (max_rows > c->mma_group_rows && c->grouped_large == EPIC_CUDA_GROUPED_LARGE_WGMMA) {
        int ran = 0;
        EPIC_CHECK(
            wgmma_dev(c, x, ldx, rows, max_rows, off, n_groups, w, w_stride, shape, y, ldy, &ran));
        if (ran)
          mma_max = c->mma_group_rows;
        if (ran && mma_max == 0) /* every group was above the bound */
          return EPIC_OK;
      }
      return mma_classes(c, x, ldx, NULL, rows, NULL, off, tab, n_groups, mma_max, max_rows,
                         shape, c->err_flag, y, ldy);
    }
  }
  int32_t *h32 = malloc((size_t)(n_groups + 1) * sizeof *h32);
  int64_t *h64 = malloc((size_t)(n_groups + 1) * sizeof *h64);
  epic_status st = h32 && h64 ? EPIC_OK : EPIC_ERR_NOMEM;
  if (st == EPIC_OK)
    st = o->vt->download(o, h32, off, (size_t)(n_groups + 1) * sizeof *h32);
  if (st == EPIC_OK)
    st = epic_ops_group_offsets(h32, n_groups, rows, max_rows, h64);
  if (st == EPIC_OK)
    st = epic_cuda_grouped_matmul(o, x, ldx, h64, off, n_groups, w, w_stride, y, ldy);
  free(h32);
  free(h64);
  return st;
}
