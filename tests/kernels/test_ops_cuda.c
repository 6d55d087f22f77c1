/* CUDA backend of epic_ops against the CPU backend (the correctness reference), op by
 * op, on fresh random inputs at small odd shapes and at DeepSeek-V3 shapes (hidden
 * 7168, kv_lora 512, rope 64, 128 heads, partial FP8 edge blocks, paged caches with
 * 64-row pages and shuffled block tables). Device outputs are poisoned (all bits set:
 * NaN floats, -1 ints) before every call, so an unwritten element fails the check.
 * Errors are relative Frobenius norms ||gpu - cpu|| / ||cpu|| with per-precision limits:
 * fp32 ops 1e-5 (also the fp32 FP8 kernels, which keep fp32 activations),
 * bf16 GEMM 1e-2, the tensor-core FP8 kernel 1e-2 against the exact product and 1e-5
 * against the product of the same bf16-rounded activations (FP8_MMA_*), FP8 cuBLASLt
 * GEMM 5e-2 against the exact product (the e4m3 activation rounding alone is about
 * 2.5e-2) and 2e-3 against the product of the same quantised activations (which
 * isolates the GEMM and its scale layouts), TF32 attention 5e-3, the bf16-cache decode
 * kernel 3e-3 against the same bf16 rows and bf16-rounded queries (BF16_MLA_TOL). FP8
 * matmuls run under both epic_cuda_fp8_small kinds (the tensor-core kernel, which must
 * also give a row alone the same bits, and the fp32 kernels); subnormal e4m3 codes must
 * give exact sums. The exact and invariant precisions must give a row alone the bits it has
 * among the other rows of a call (test_exact_rows, test_invariant_rows). Exits 77 (CTest
 * skip) when no GPU is present.
 * The seed is printed; EPIC_TEST_SEED=<n> replays a run. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kernels/cuda/ops_cuda.h"
#include "kernels/ops.h"
#include "tests/common/test_rng.h"

/* ---------------------------------------------------------------- helpers */

static void fill(float *p, size_t n, float amp) {
  for (size_t i = 0; i < n; i++)
    p[i] = amp * rng_f();
}

static epic_ops *g_cpu, *g_gpu;

static int setup(void **state) {
  (void)state;
  if (epic_ops_cpu_create(0, &g_cpu) != EPIC_OK)
    return -1;
  if (epic_ops_cuda_create(0, &g_gpu) != EPIC_OK)
    return -1;
  printf("# device: %s, %d SMs\n", epic_ops_cuda_device_name(g_gpu), epic_ops_cuda_sm_count(g_gpu));
  return 0;
}
static int teardown(void **state) {
  (void)state;
  epic_ops_destroy(g_gpu);
  epic_ops_destroy(g_cpu);
  return 0;
}

static void *xmalloc(size_t n) {
  void *p = malloc(n ? n : 1);
  assert_non_null(p);
  return p;
}

static void *dalloc(size_t bytes) {
  void *p = NULL;
  assert_int_equal(g_gpu->vt->alloc(g_gpu, bytes, &p), EPIC_OK);
  return p;
}
static void *dup_dev(const void *h, size_t bytes) {
  void *d = dalloc(bytes);
  assert_int_equal(g_gpu->vt->upload(g_gpu, d, h, bytes), EPIC_OK);
  return d;
}
static void dfree(void *p) {
  g_gpu->vt->free(g_gpu, p);
}
static void poison(void *d, size_t bytes) {
  unsigned char *h = xmalloc(bytes);
  memset(h, 0xff, bytes);
  assert_int_equal(g_gpu->vt->upload(g_gpu, d, h, bytes), EPIC_OK);
  free(h);
}
static void fetch(void *h, const void *d, size_t bytes) {
  assert_int_equal(g_gpu->vt->download(g_gpu, h, d, bytes), EPIC_OK);
}

/* x rounded to bf16 (nearest even, as the GPU's conversions round) and widened back:
 * what a bf16 cache row holds and what the tensor-core FP8 kernel multiplies. */
static float bf16_round(float x) {
  return epic_bf16_to_f32(epic_f32_to_bf16(x));
}

/* Round n floats of x to bf16 and widen them back, into a new array. */
static float *rounded_copy(const float *x, size_t n) {
  float *y = xmalloc(n ? n * 4 : 4);
  for (size_t i = 0; i < n; i++)
    y[i] = bf16_round(x[i]);
  return y;
}

/* ||got - ref|| / ||ref|| over rows x cols of two strided arrays; non-finite got fails. */
static double rel_err2d(const float *got, int64_t ldg, const float *ref, int64_t ldr, int64_t rows,
                        int64_t cols) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < rows; i++)
    for (int64_t j = 0; j < cols; j++) {
      const double g = got[i * ldg + j], r = ref[i * ldr + j];
      if (!isfinite(g))
        return INFINITY;
      num += (g - r) * (g - r);
      den += r * r;
    }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

static void check_err(const char *what, double err, double tol) {
  printf("#   %-58s rel err %.3e (limit %.0e)\n", what, err, tol);
  if (!(err <= tol))
    fail_msg("%s: relative error %.3e above %.0e", what, err, tol);
}

/* A host weight plus its device copy. */
typedef struct {
  epic_weight h, d;
  void *data, *ddata;
  float *scale, *dscale;
} tw;

static tw tw_make(epic_dtype dt, int64_t rows, int64_t cols, int64_t br, int64_t bc) {
  tw t;
  memset(&t, 0, sizeof t);
  const size_t n = (size_t)(rows * cols);
  t.h.dtype = dt;
  t.h.rows = rows;
  t.h.cols = cols;
  size_t bytes = n * epic_dtype_size(dt);
  t.data = xmalloc(bytes);
  switch (dt) {
  case EPIC_DT_F32: fill(t.data, n, 1.0f); break;
  case EPIC_DT_BF16:
    for (size_t i = 0; i < n; i++)
      ((uint16_t *)t.data)[i] = epic_f32_to_bf16(rng_f());
    break;
  case EPIC_DT_F16:
    for (size_t i = 0; i < n; i++) { /* exponents 8..16 with the occasional subnormal */
      const uint64_t r = rng_u64();
      const uint16_t e = (r & 31) == 0 ? 0 : (uint16_t)(8 + (r >> 8) % 9);
      ((uint16_t *)t.data)[i] = (uint16_t)(((r >> 20) & 1) << 15 | e << 10 | ((r >> 30) & 0x3ff));
    }
    break;
  case EPIC_DT_F8E4M3: {
    uint8_t *p = t.data;
    for (size_t i = 0; i < n; i++) {
      uint8_t c;
      do
        c = (uint8_t)rng_u64();
      while ((c & 0x7f) == 0x7f);
      p[i] = c;
    }
    const int64_t nbr = (rows + br - 1) / br, nbc = (cols + bc - 1) / bc;
    t.scale = xmalloc((size_t)(nbr * nbc) * 4);
    for (int64_t i = 0; i < nbr * nbc; i++)
      t.scale[i] = (1.5f + rng_f()) * 1e-3f;
    t.h.scale_inv = t.scale;
    t.h.block_rows = br;
    t.h.block_cols = bc;
    t.dscale = dup_dev(t.scale, (size_t)(nbr * nbc) * 4);
    break;
  }
  default: break;
  }
  t.h.data = t.data;
  t.ddata = dup_dev(t.data, bytes);
  t.d = t.h;
  t.d.data = t.ddata;
  t.d.scale_inv = t.dscale;
  return t;
}

static void tw_free(tw *t) {
  free(t->data);
  free(t->scale);
  dfree(t->ddata);
  dfree(t->dscale);
}

/* ------------------------------------------------------------------ memory */

static void test_memory(void **state) {
  (void)state;
  assert_int_equal(g_gpu->vt->abi_version, EPIC_OPS_ABI_VERSION);
  assert_string_equal(g_gpu->vt->name, "cuda");
  /* device backend: the engine's default step budget is 8192 tokens */
  assert_int_equal(epic_ops_step_tokens(g_gpu), 8192);
  unsigned char *p = dalloc(1000), back[1000];
  assert_int_equal((uintptr_t)p % 64, 0);
  fetch(back, p, sizeof back);
  for (int i = 0; i < 1000; i++)
    assert_int_equal(back[i], 0);
  unsigned char src[1000];
  for (int i = 0; i < 1000; i++)
    src[i] = (unsigned char)(rng_u64() | 1);
  assert_int_equal(g_gpu->vt->upload(g_gpu, p, src, sizeof src), EPIC_OK);
  fetch(back, p, sizeof back);
  assert_memory_equal(src, back, sizeof src);
  dfree(p);
  g_gpu->vt->free(g_gpu, NULL);
  assert_int_equal(epic_ops_cuda_sync(g_gpu), EPIC_OK);
  /* upload_async: the source is reused at once (staged), more uploads than staging slots
   * (slots reused), and one above a slot's size (the synchronous path); a kernel queued
   * after each upload sees its bytes. */
  assert_non_null(epic_ops_queue(g_gpu));
  enum { N_UP = 20, SMALL = 3000 };
  const size_t big = (4u << 20) + 64;
  float *dsmall = dalloc((size_t)N_UP * SMALL * 4), *dcopy = dalloc((size_t)N_UP * SMALL * 4);
  float *hsmall = xmalloc((size_t)SMALL * 4), *hback = xmalloc((size_t)N_UP * SMALL * 4);
  for (int u = 0; u < N_UP; u++) {
    for (int i = 0; i < SMALL; i++)
      hsmall[i] = (float)(u * SMALL + i);
    assert_int_equal(g_gpu->vt->upload_async(g_gpu, dsmall + u * SMALL, hsmall, SMALL * 4),
                     EPIC_OK);
    memset(hsmall, 0xff, SMALL * 4); /* reused at once */
    assert_int_equal(g_gpu->vt->copy_rows(g_gpu, 1, SMALL, dsmall + u * SMALL, SMALL, NULL,
                                          dcopy + u * SMALL, SMALL, NULL),
                     EPIC_OK);
  }
  fetch(hback, dcopy, (size_t)N_UP * SMALL * 4);
  for (int i = 0; i < N_UP * SMALL; i++)
    assert_true(hback[i] == (float)i);
  unsigned char *hbig = xmalloc(big), *bback = xmalloc(big), *dbig = dalloc(big);
  for (size_t i = 0; i < big; i++)
    hbig[i] = (unsigned char)(i * 7 + 3);
  assert_int_equal(g_gpu->vt->upload_async(g_gpu, dbig, hbig, big), EPIC_OK);
  fetch(bback, dbig, big);
  assert_memory_equal(hbig, bback, big);
  dfree(dsmall);
  dfree(dcopy);
  dfree(dbig);
  free(hsmall);
  free(hback);
  free(hbig);
  free(bback);
}

/* ------------------------------------------------------------------ matmul */

/* The activations the FP8 path feeds the GEMM: per token and 128-column block,
 * e4m3(x * 448 / amax) * (amax / 448), computed with the kernel's fp32 operations. */
static void quantise_like_gpu(const float *x, int64_t ldx, int64_t m, int64_t k, float *xq) {
  for (int64_t i = 0; i < m; i++)
    for (int64_t c0 = 0; c0 < k; c0 += 128) {
      const int64_t c1 = c0 + 128 < k ? c0 + 128 : k;
      float amax = 0.0f;
      for (int64_t c = c0; c < c1; c++)
        amax = fabsf(x[i * ldx + c]) > amax ? fabsf(x[i * ldx + c]) : amax;
      const float s = amax > 0.0f ? amax / 448.0f : 1.0f;
      const float inv = amax > 0.0f ? 448.0f / amax : 1.0f;
      for (int64_t c = c0; c < c1; c++)
        xq[i * k + c] = epic_fp8e4m3_to_f32(epic_f32_to_fp8e4m3(x[i * ldx + c] * inv)) * s;
    }
}

/* The FP8 kernel choices of epic_ops_cuda_set_fp8_small: every FP8 matmul case runs under
 * both on the same data (MMA, the default, first) and the default is set back after. */
static const epic_cuda_fp8_small fp8_kinds[2] = {EPIC_CUDA_FP8_SMALL_MMA,
                                                 EPIC_CUDA_FP8_SMALL_FP32};
static const char *const fp8_kind_names[2] = {"mma", "fp32"};

static void set_fp8_kind(int kind) {
  assert_int_equal(epic_ops_cuda_set_fp8_small(g_gpu, fp8_kinds[kind]), EPIC_OK);
}

/* Whether the MMA kind must send this FP8 matmul to the tensor-core kernel: m <=
 * EPIC_CUDA_FP8_MMA_DENSE_MAX_M rows
 * and a shape kern_fp8_mma.cu takes (cols and block rows multiples of 16, block columns
 * multiples of 64; the test's device weights are 16-byte aligned). */
static int mma_expected(const epic_weight *w, int64_t m) {
  /* the smallest calls on small weights stay on the fp32 skinny kernel (ops_cuda.h),
   * which takes m tokens of cols fp32 values in 160 KB of shared memory */
  const int skinny = m <= EPIC_CUDA_FP8_SKINNY_MAX_M &&
                     w->rows * w->cols < EPIC_CUDA_FP8_SKINNY_MAX_BYTES &&
                     m * w->cols * 4 <= 160 * 1024;
  return w->dtype == EPIC_DT_F8E4M3 && m >= 1 && m <= EPIC_CUDA_FP8_MMA_DENSE_MAX_M &&
         !skinny && w->cols % 16 == 0 && w->block_cols % 64 == 0 && w->block_rows % 16 == 0;
}

/* Limits of the tensor-core FP8 kernel: against raw activations their rounding to bf16
 * (2^-9 relative each, about 1e-3 on the sums); against the CPU on the same bf16-rounded
 * activations only fp32 summation order (e4m3 weights convert exactly, block scales are
 * applied in fp32). */
#define FP8_MMA_TOL 1e-2
#define FP8_MMA_ROUNDED_TOL 1e-5

/* Row invariance of the tensor-core kernel: x's last row in the smallest call the
 * kernel takes for w (alone, or with the rows before it) must give that row of the
 * m-row call (y, stride ldy) bit for bit. */
static void check_last_row_alone(const float *dx, int64_t ldx, int64_t m, const epic_weight *w,
                                 const float *y, int64_t ldy) {
  const int64_t n = w->rows;
  const int64_t m1 = mma_expected(w, 1) ? 1 : EPIC_CUDA_FP8_SKINNY_MAX_M + 1;
  if (m1 >= m)
    return;
  float *d1 = dalloc((size_t)(m1 * n) * 4), *y1 = xmalloc((size_t)(m1 * n) * 4);
  poison(d1, (size_t)(m1 * n) * 4);
  assert_int_equal(epic_ops_cuda_matmul_path(g_gpu, w, m1, n), EPIC_CUDA_MM_FP8_MMA);
  assert_int_equal(g_gpu->vt->matmul(g_gpu, dx + (m - m1) * ldx, ldx, m1, w, d1, n), EPIC_OK);
  fetch(y1, d1, (size_t)(m1 * n) * 4);
  const float *last = y1 + (m1 - 1) * n;
  for (int64_t r = 0; r < n; r++)
    if (memcmp(&last[r], &y[(m - 1) * ldy + r], 4))
      fail_msg("fp8_mma: row %lld of %lld in a call of %lld differs at output %lld: %.9g, in "
               "the call %.9g",
               (long long)(m - 1), (long long)m, (long long)m1, (long long)r, last[r],
               y[(m - 1) * ldy + r]);
  printf("#     last row in a call of m=%lld: bit-identical\n", (long long)m1);
  dfree(d1);
  free(y1);
}

static void check_matmul(epic_dtype dt, int64_t rows, int64_t cols, int64_t m, int64_t br,
                         int64_t bc, int64_t pad) {
  tw t = tw_make(dt, rows, cols, br, bc);
  const int64_t ldx = cols + pad, ldy = rows + pad;
  float *x = xmalloc((size_t)(m * ldx) * 4), *y = xmalloc((size_t)(m * ldy) * 4);
  float *ref = xmalloc((size_t)(m * rows) * 4);
  float *rref = NULL; /* the CPU's product of the bf16-rounded x, made when a path needs it */
  fill(x, (size_t)(m * ldx), 2.0f);
  float *dx = dup_dev(x, (size_t)(m * ldx) * 4), *dy = dalloc((size_t)(m * ldy) * 4);
  assert_int_equal(g_cpu->vt->matmul(g_cpu, x, ldx, m, &t.h, ref, rows), EPIC_OK);
  const int n_kinds = dt == EPIC_DT_F8E4M3 ? 2 : 1;
  for (int kind = 0; kind < n_kinds; kind++) {
    set_fp8_kind(kind);
    poison(dy, (size_t)(m * ldy) * 4);
    const epic_cuda_mm_path path = epic_ops_cuda_matmul_path(g_gpu, &t.d, m, ldy);
    char what[160];
    snprintf(what, sizeof what, "matmul %s [%lld x %lld] m=%lld pad=%lld (%s%s%s)",
             epic_dtype_name(dt), (long long)rows, (long long)cols, (long long)m, (long long)pad,
             epic_cuda_mm_path_name(path), n_kinds > 1 ? ", kind " : "",
             n_kinds > 1 ? fp8_kind_names[kind] : "");
    const int want_mma = kind == 0 && mma_expected(&t.d, m);
    if ((path == EPIC_CUDA_MM_FP8_MMA) != want_mma)
      fail_msg("%s: the tensor-core kernel was %sexpected", what, want_mma ? "" : "not ");
    assert_int_equal(g_gpu->vt->matmul(g_gpu, dx, ldx, m, &t.d, dy, ldy), EPIC_OK);
    fetch(y, dy, (size_t)(m * ldy) * 4);
    const int lt = path == EPIC_CUDA_MM_FP8_LT || path == EPIC_CUDA_MM_FP8_LT_BF16;
    double tol = 1e-5;
    if (path == EPIC_CUDA_MM_BF16 || path == EPIC_CUDA_MM_DEQUANT_BF16)
      tol = 1e-2;
    if (path == EPIC_CUDA_MM_FP8_MMA)
      tol = FP8_MMA_TOL;
    if (lt)
      tol = 5e-2;
    check_err(what, rel_err2d(y, ldy, ref, rows, m, rows), tol);
    if (lt) {
      float *xq = xmalloc((size_t)(m * cols) * 4), *qref = xmalloc((size_t)(m * rows) * 4);
      quantise_like_gpu(x, ldx, m, cols, xq);
      assert_int_equal(g_cpu->vt->matmul(g_cpu, xq, cols, m, &t.h, qref, rows), EPIC_OK);
      check_err("  same vs quantised activations", rel_err2d(y, ldy, qref, rows, m, rows),
                path == EPIC_CUDA_MM_FP8_LT ? 2e-3 : 6e-3);
      free(xq);
      free(qref);
    }
    if (path == EPIC_CUDA_MM_FP8_MMA) {
      if (!rref) {
        float *xr = rounded_copy(x, (size_t)(m * ldx));
        rref = xmalloc((size_t)(m * rows) * 4);
        assert_int_equal(g_cpu->vt->matmul(g_cpu, xr, ldx, m, &t.h, rref, rows), EPIC_OK);
        free(xr);
      }
      check_err("  same vs bf16-rounded activations", rel_err2d(y, ldy, rref, rows, m, rows),
                FP8_MMA_ROUNDED_TOL);
      if (m > 1)
        check_last_row_alone(dx, ldx, m, &t.d, y, ldy);
    }
    for (int64_t i = 0; i < m; i++) /* the padding between rows stays untouched */
      for (int64_t r = rows; r < ldy; r++)
        assert_true(isnan(y[i * ldy + r]));
  }
  set_fp8_kind(0);
  dfree(dx);
  dfree(dy);
  free(x);
  free(y);
  free(ref);
  free(rref);
  tw_free(&t);
}

/* The skinny kernel with each pair's columns in 1, 2, 4 and 8 runs of warps (the choice
 * by shape is exercised above): every count within the fp32 tolerance of the CPU, with an
 * odd row count, 3 tokens and a column count that ends mid-stripe. */
static void test_skinny_split(void **state) {
  (void)state;
  static const int runs[] = {1, 2, 4, 8};
  for (int m = 1; m <= 3; m += 2)
    for (size_t i = 0; i < 4; i++) {
      assert_int_equal(epic_ops_cuda_set_skinny_split(g_gpu, runs[i]), EPIC_OK);
      check_matmul(EPIC_DT_F8E4M3, 301, 5136, m, 128, 128, 1);
    }
  assert_int_equal(epic_ops_cuda_set_skinny_split(g_gpu, 3), EPIC_ERR_INVALID);
  assert_int_equal(epic_ops_cuda_set_skinny_split(g_gpu, 0), EPIC_OK);
}

static void test_matmul(void **state) {
  (void)state;
  static const epic_dtype dts[] = {EPIC_DT_F32, EPIC_DT_BF16, EPIC_DT_F16, EPIC_DT_F8E4M3};
  static const int64_t small[][3] = {{80, 64, 1}, {130, 200, 9}, {300, 129, 17}, {7, 300, 2}};
  for (size_t d = 0; d < 4; d++)
    for (size_t s = 0; s < 4; s++)
      check_matmul(dts[d], small[s][0], small[s][1], small[s][2], 128, 128, (int64_t)(s % 2) * 3);
  /* FP8 that cuBLASLt cannot take: odd blocks, cols % 16 != 0 */
  check_matmul(EPIC_DT_F8E4M3, 80, 256, 3, 48, 40, 0);
  check_matmul(EPIC_DT_F8E4M3, 300, 200, 20, 128, 128, 0);
  check_matmul(EPIC_DT_F8E4M3, 100, 256, 6, 40, 128, 1); /* block rows % 16 != 0: no MMA */
  /* Around the dense tensor-core kernel's range (3..8 tokens, and 1..2 on weights of
   * EPIC_CUDA_FP8_SKINNY_MAX_BYTES or more; the grouped test below takes it to 64):
   * 8 tokens, then 16, 33, 64 and 65 on cuBLASLt, columns that end 16 past a 64-column step (208, 272,
   * 1040, 1552), row counts that are not multiples of 16 (a partial last row group),
   * padded x and y, 64-column and 16-row scale blocks, 5 and 9 column blocks (uneven
   * k runs). */
  check_matmul(EPIC_DT_F8E4M3, 256, 208, 8, 128, 128, 3);
  check_matmul(EPIC_DT_F8E4M3, 1000, 1552, 16, 128, 128, 0);
  check_matmul(EPIC_DT_F8E4M3, 300, 640, 33, 128, 128, 3);
  check_matmul(EPIC_DT_F8E4M3, 576, 7168, 64, 128, 128, 0);
  check_matmul(EPIC_DT_F8E4M3, 520, 1040, 64, 128, 128, 5);
  check_matmul(EPIC_DT_F8E4M3, 512, 1024, 65, 128, 128, 1);
  check_matmul(EPIC_DT_F8E4M3, 200, 320, 5, 64, 64, 2);
  check_matmul(EPIC_DT_F8E4M3, 40, 272, 3, 16, 128, 0);
  /* FP8 at DeepSeek-V3 shapes (the MMA kind: the tensor-core kernel up to 8 tokens; the
   * FP32 kind: the skinny kernel up to 4, cuBLASLt beyond), with partial edge blocks */
  check_matmul(EPIC_DT_F8E4M3, 1536, 7168, 1, 128, 128, 0); /* q_a_proj, decode */
  check_matmul(EPIC_DT_F8E4M3, 1536, 7168, 33, 128, 128, 0);
  check_matmul(EPIC_DT_F8E4M3, 576, 7168, 5, 128, 128, 0);    /* kv_a: 4.5 row blocks */
  check_matmul(EPIC_DT_F8E4M3, 7168, 2048, 3, 128, 128, 0);   /* expert down */
  check_matmul(EPIC_DT_F8E4M3, 2048, 7168, 128, 128, 128, 0); /* expert gate/up */
  check_matmul(EPIC_DT_F8E4M3, 1000, 1552, 7, 128, 128, 0);   /* partial last column block */
  check_matmul(EPIC_DT_F8E4M3, 384, 640, 6, 128, 128, 3);     /* 5 column blocks, strided y */
  check_matmul(EPIC_DT_F8E4M3, 384, 640, 2, 128, 128, 3);
  check_matmul(EPIC_DT_F8E4M3, 7168, 16384, 2, 128, 128, 0); /* o_proj, decode */
  check_matmul(EPIC_DT_F8E4M3, 2049, 7168, 4, 128, 128, 1);  /* odd row count, 4 tokens */
  check_matmul(EPIC_DT_BF16, 1536, 7168, 4, 128, 128, 0);
  check_matmul(EPIC_DT_BF16, 7168, 2048, 33, 128, 128, 1);
  /* bad arguments are rejected on the host */
  tw t = tw_make(EPIC_DT_F32, 4, 4, 0, 0);
  float *d = dalloc(64 * 4);
  assert_int_equal(g_gpu->vt->matmul(g_gpu, d, 3, 1, &t.d, d, 4), EPIC_ERR_INVALID);
  assert_int_equal(g_gpu->vt->matmul(g_gpu, d, 4, 0, &t.d, d, 4), EPIC_OK);
  assert_int_equal(epic_ops_cuda_set_fp8_small(g_gpu, (epic_cuda_fp8_small)2), EPIC_ERR_INVALID);
  assert_int_equal(epic_ops_cuda_set_fp8_small(NULL, EPIC_CUDA_FP8_SMALL_MMA), EPIC_ERR_INVALID);
  dfree(d);
  tw_free(&t);
}

/* The exact value of an e4m3 code (NaN codes excluded), decoded independently of the
 * library: exponent field 0 is subnormal, mantissa * 2^-9. */
static double e4m3_value(uint8_t c) {
  const int e = (c >> 3) & 15, mant = c & 7;
  const double v = e ? ldexp(8 + mant, e - 10) : ldexp(mant, -9);
  return c & 0x80 ? -v : v;
}

/* FP8 weights whose codes are mostly e4m3 subnormals (exponent field 0: 0x01..0x07 and
 * 0x81..0x87, every one of them in row 0) mixed with zeros and small normal codes
 * (exponent fields 1..4), power-of-two block scales and small integer activations (exact
 * in bf16): every product and partial sum is a multiple of 2^-10 below 2^10 in
 * magnitude, exact in fp32 whatever the order, so the dense and the grouped op must
 * equal an exact host sum bit for bit under both FP8 kinds (the tensor-core kernel, and
 * the fp32 skinny kernel at m = 3), and so must the CPU reference. A conversion that lost
 * or misread subnormal codes (the tensor-core kernel converts e4m3 through f16 exponents)
 * shows up here as a nonzero difference. */
static void test_fp8_subnormal_exact(void **state) {
  (void)state;
  enum { R = 256, C = 256, M = 3 };
  tw t = tw_make(EPIC_DT_F8E4M3, R, C, 128, 128);
  uint8_t *wb = t.data;
  for (size_t i = 0; i < (size_t)R * C; i++) {
    const uint64_t r = rng_u64();
    const uint8_t sign = (uint8_t)(((r >> 8) & 1) << 7);
    const unsigned pick = (unsigned)((r >> 12) % 10);
    if (pick < 5)
      wb[i] = sign | (uint8_t)(1 + (r >> 20) % 7); /* subnormal */
    else if (pick == 5)
      wb[i] = sign; /* +-0 */
    else
      wb[i] = sign | (uint8_t)((1 + (r >> 20) % 4) << 3) | (uint8_t)((r >> 28) % 8);
  }
  for (int j = 0; j < 14; j++)
    wb[j] = (uint8_t)(j < 7 ? 0x01 + j : 0x81 + (j - 7));
  static const float scales[4] = {1.0f, 2.0f, 0.5f, 1.0f}; /* [2 row blocks][2 col blocks] */
  memcpy(t.scale, scales, sizeof scales);
  assert_int_equal(g_gpu->vt->upload(g_gpu, t.ddata, t.data, (size_t)R * C), EPIC_OK);
  assert_int_equal(g_gpu->vt->upload(g_gpu, t.dscale, t.scale, sizeof scales), EPIC_OK);
  float x[M * C], exact[M * R], y[M * R];
  for (int i = 0; i < M * C; i++)
    x[i] = (float)((int)(rng_u64() % 17) - 8);
  for (int i = 0; i < M; i++)
    for (int r = 0; r < R; r++) {
      double s = 0;
      for (int c = 0; c < C; c++)
        s += (double)x[i * C + c] * e4m3_value(wb[r * C + c]) * scales[(r / 128) * 2 + c / 128];
      exact[i * R + r] = (float)s;
      assert_true((double)exact[i * R + r] == s); /* the premise: exact in fp32 */
    }
  assert_int_equal(g_cpu->vt->matmul(g_cpu, x, C, M, &t.h, y, R), EPIC_OK);
  for (int i = 0; i < M * R; i++)
    if (y[i] != exact[i])
      fail_msg("CPU matmul, subnormal FP8 codes: output %d is %.9g, exact %.9g", i, y[i],
               exact[i]);
  float *dx = dup_dev(x, sizeof x), *dy = dalloc(sizeof y);
  const int64_t off[2] = {0, M};
  const int32_t off32[2] = {0, M};
  int32_t *doff = dup_dev(off32, sizeof off32);
  static epic_weight list[1]; /* the backend caches a device table per list address */
  list[0] = t.d;
  /* the grouped op's group on the tensor-core kernel too (by default it takes wgmma) */
  assert_int_equal(epic_ops_cuda_set_mma_group_rows(g_gpu, EPIC_CUDA_FP8_MMA_GROUP_MAX_ROWS),
                   EPIC_OK);
  for (int kind = 0; kind < 2; kind++) {
    set_fp8_kind(kind);
    const epic_cuda_mm_path path = epic_ops_cuda_matmul_path(g_gpu, &t.d, M, R);
    assert_int_equal(path, kind == 0 ? EPIC_CUDA_MM_FP8_MMA : EPIC_CUDA_MM_FP8_SKINNY);
    for (int op = 0; op < 2; op++) {
      poison(dy, sizeof y);
      if (op == 0)
        assert_int_equal(g_gpu->vt->matmul(g_gpu, dx, C, M, &t.d, dy, R), EPIC_OK);
      else
        assert_int_equal(g_gpu->vt->grouped_matmul(g_gpu, dx, C, off, doff, 1, list, 1, dy, R),
                         EPIC_OK);
      fetch(y, dy, sizeof y);
      double maxd = 0;
      for (int i = 0; i < M * R; i++) {
        const double dd = fabs((double)y[i] - exact[i]);
        if (!(dd <= maxd)) /* NaN included */
          maxd = isnan(dd) ? INFINITY : dd;
      }
      printf("#   %s FP8 subnormal codes [%d x %d] m=%d (%s, kind %s): max abs diff %g\n",
             op ? "grouped_matmul" : "matmul", R, C, M, epic_cuda_mm_path_name(path),
             fp8_kind_names[kind], maxd);
      if (maxd != 0)
        fail_msg("%s, subnormal FP8 codes, kind %s: max abs difference %g from the exact sum",
                 op ? "grouped_matmul" : "matmul", fp8_kind_names[kind], maxd);
    }
  }
  set_fp8_kind(0);
  assert_int_equal(epic_ops_cuda_set_mma_group_rows(g_gpu, EPIC_CUDA_FP8_MMA_GROUP_ROWS_DEFAULT),
                   EPIC_OK);
  dfree(dx);
  dfree(dy);
  dfree(doff);
  tw_free(&t);
}

/* Activations of about 2^-20 (1e-6) through the tensor-core kernel. It forms products at
 * 2^-112 times their value (the factor of its exact e4m3 conversion, given back with the
 * block scale), which puts most of these below fp32's normal range (2^-126) inside the
 * tensor cores' accumulation: the result must still match the CPU on the same
 * bf16-rounded activations to FP8_MMA_ROUNDED_TOL (gradual underflow keeps such sums;
 * flushing them to zero would lose most of the result). */
static void test_fp8_mma_small_activations(void **state) {
  (void)state;
  const int64_t rows = 384, cols = 1024, m = 4;
  tw t = tw_make(EPIC_DT_F8E4M3, rows, cols, 128, 128);
  float *x = xmalloc((size_t)(m * cols) * 4), *y = xmalloc((size_t)(m * rows) * 4);
  fill(x, (size_t)(m * cols), 0x1p-20f);
  float *xr = rounded_copy(x, (size_t)(m * cols)), *ref = xmalloc((size_t)(m * rows) * 4);
  assert_int_equal(g_cpu->vt->matmul(g_cpu, xr, cols, m, &t.h, ref, rows), EPIC_OK);
  float *dx = dup_dev(x, (size_t)(m * cols) * 4), *dy = dalloc((size_t)(m * rows) * 4);
  poison(dy, (size_t)(m * rows) * 4);
  assert_int_equal(epic_ops_cuda_matmul_path(g_gpu, &t.d, m, rows), EPIC_CUDA_MM_FP8_MMA);
  assert_int_equal(g_gpu->vt->matmul(g_gpu, dx, cols, m, &t.d, dy, rows), EPIC_OK);
  fetch(y, dy, (size_t)(m * rows) * 4);
  check_err("matmul FP8 [384 x 1024] m=4, activations ~2^-20 (fp8_mma) vs bf16-rounded",
            rel_err2d(y, rows, ref, rows, m, rows), FP8_MMA_ROUNDED_TOL);
  dfree(dx);
  dfree(dy);
  free(x);
  free(xr);
  free(y);
  free(ref);
  tw_free(&t);
}

/* grouped_matmul: one launch over many experts against the CPU's per-group matmul, on
 * the same data under both FP8 kinds, two calls each (the second reuses the cached weight
 * table). MMA kind, default bound (0): every group on the wgmma kernel (activation
 * quantisation: 5e-2; y's odd stride takes its single-column stores). MMA kind, bound
 * 128: groups of 1..128 rows take the tensor-core grouped kernel, in 64-row tiles above
 * 64 (FP8_MMA_TOL against raw activations, FP8_MMA_ROUNDED_TOL against bf16-rounded
 * ones), larger ones the wgmma kernel. FP32: groups of at most 16 rows take the fp32
 * grouped kernel (fp32 products: 1e-5), larger ones cuBLASLt (5e-2). Empty groups have
 * no weight; x and y have padded row strides, whose padding stays unwritten. */
static void test_grouped_matmul(void **state) {
  (void)state;
  enum { G = 16 };
  const int64_t rows[G] = {1, 0, 2, 3, 4, 5, 16, 0, 1, 24, 7, 64, 70, 1, 128, 140}, n = 2048,
                k = 1024;
  int64_t off[G + 1] = {0};
  int32_t off32[G + 1] = {0};
  tw w[G];
  /* static: the backend caches a device table per weight list address */
  static epic_weight hw[G], dw[G];
  memset(hw, 0, sizeof hw);
  memset(dw, 0, sizeof dw);
  for (int g = 0; g < G; g++) {
    off[g + 1] = off[g] + rows[g];
    off32[g + 1] = (int32_t)off[g + 1];
    if (rows[g] == 0)
      continue; /* another rank's expert: no weight at all */
    w[g] = tw_make(EPIC_DT_F8E4M3, n, k, 128, 128);
    hw[g] = w[g].h;
    dw[g] = w[g].d;
  }
  const int64_t m = off[G], ldx = k + 5, ldy = n + 3;
  float *x = xmalloc((size_t)(m * ldx) * 4), *y = xmalloc((size_t)(m * ldy) * 4);
  float *ref = xmalloc((size_t)(m * ldy) * 4), *rref = xmalloc((size_t)(m * ldy) * 4);
  fill(x, (size_t)(m * ldx), 1.0f);
  float *xr = rounded_copy(x, (size_t)(m * ldx));
  assert_int_equal(g_cpu->vt->grouped_matmul(g_cpu, x, ldx, off, NULL, G, hw, 1, ref, ldy),
                   EPIC_OK);
  assert_int_equal(g_cpu->vt->grouped_matmul(g_cpu, xr, ldx, off, NULL, G, hw, 1, rref, ldy),
                   EPIC_OK);
  float *dx = dup_dev(x, (size_t)(m * ldx) * 4), *dy = dalloc((size_t)(m * ldy) * 4);
  int32_t *doff = dup_dev(off32, sizeof off32);
  for (int v = 0; v < 3; v++) {
    const int kind = v == 2;
    set_fp8_kind(kind);
    assert_int_equal(epic_ops_cuda_set_mma_group_rows(g_gpu, v == 1
                                                                 ? EPIC_CUDA_FP8_MMA_GROUP_MAX_ROWS
                                                                 : EPIC_CUDA_FP8_MMA_GROUP_ROWS_DEFAULT),
                     EPIC_OK);
    const int64_t launches = epic_ops_cuda_wgmma_launches(g_gpu);
    for (int rep = 0; rep < 2; rep++) { /* the second call reuses the cached weight table */
      poison(dy, (size_t)(m * ldy) * 4);
      assert_int_equal(g_gpu->vt->grouped_matmul(g_gpu, dx, ldx, off, doff, G, dw, 1, dy, ldy),
                       EPIC_OK);
    }
    /* the default runs every group on the wgmma kernel, despite y's odd stride */
    assert_true(v != 0 || epic_ops_cuda_wgmma_launches(g_gpu) > launches);
    fetch(y, dy, (size_t)(m * ldy) * 4);
    for (int g = 0; g < G; g++) {
      if (rows[g] == 0)
        continue;
      const int mma = kind == 0 && rows[g] <= epic_ops_cuda_mma_group_rows(g_gpu);
      char what[96];
      snprintf(what, sizeof what, "grouped_matmul group %d (%lld rows, kind %s: %s)", g,
               (long long)rows[g], fp8_kind_names[kind],
               mma                           ? "fp8_mma"
               : kind == 1 && rows[g] <= 16 ? "fp32 kernel"
               : kind == 0                  ? "wgmma"
                                            : "cuBLASLt");
      const float *yg = y + off[g] * ldy;
      double tol = 5e-2;
      if (mma)
        tol = FP8_MMA_TOL;
      else if (kind == 1 && rows[g] <= 16)
        tol = 1e-5;
      check_err(what, rel_err2d(yg, ldy, ref + off[g] * ldy, ldy, rows[g], n), tol);
      if (mma)
        check_err("  same vs bf16-rounded activations",
                  rel_err2d(yg, ldy, rref + off[g] * ldy, ldy, rows[g], n), FP8_MMA_ROUNDED_TOL);
    }
    for (int64_t i = 0; i < m; i++)
      for (int64_t r = n; r < ldy; r++)
        assert_true(isnan(y[i * ldy + r]));
  }
  set_fp8_kind(0);
  assert_int_equal(epic_ops_cuda_set_mma_group_rows(g_gpu, EPIC_CUDA_FP8_MMA_GROUP_ROWS_DEFAULT),
                   EPIC_OK);
  for (int g = 0; g < G; g++)
    if (rows[g])
      tw_free(&w[g]);
  dfree(dx);
  dfree(dy);
  dfree(doff);
  free(x);
  free(xr);
  free(y);
  free(ref);
  free(rref);
}

/* G expert groups of rows[g] rows each (0: an empty group, no weight), every weight an
 * n x k FP8 matrix with 128 x 128 blocks: host and device offsets, weights and lists (hw
 * may be NULL). Returns the rows in all. free_groups releases the weights. */
static int64_t make_groups(int G, const int64_t *rows, int64_t n, int64_t k, int64_t *off,
                           int32_t *off32, tw *w, epic_weight *hw, epic_weight *dw) {
  off[0] = 0;
  off32[0] = 0;
  for (int g = 0; g < G; g++) {
    off[g + 1] = off[g] + rows[g];
    off32[g + 1] = (int32_t)off[g + 1];
    if (hw)
      memset(&hw[g], 0, sizeof hw[g]);
    memset(&dw[g], 0, sizeof dw[g]);
    if (rows[g] == 0)
      continue;
    w[g] = tw_make(EPIC_DT_F8E4M3, n, k, 128, 128);
    if (hw)
      hw[g] = w[g].h;
    dw[g] = w[g].d;
  }
  return off[G];
}
static void free_groups(int G, const int64_t *rows, tw *w) {
  for (int g = 0; g < G; g++)
    if (rows[g])
      tw_free(&w[g]);
}

/* grouped_matmul with many groups above the small-group kernels' bound: their cuBLASLt
 * GEMMs run side by side on the lanes of ops_cuda_matmul.c (grouped_lanes) after one
 * quantisation launch. Each group must equal a plain matmul of its rows on the GPU (the
 * same e4m3 activations; the algorithm may differ, hence 1e-5) and the CPU reference
 * (5e-2). Runs: both FP8 kinds at the default lane count, then 1 and the most lanes;
 * two output strides: ldy % 4 == 0, where a group's pad rows run straight into the next
 * group's rows when those are written later (a short next group or the end of y forces
 * staging), and ldy % 4 != 0, where every group is staged. The small groups in between
 * (their rows converted alone, most rows being in large groups) are checked against the
 * CPU too (the MMA kind with bound 16 here: the tensor-core launches). Padding columns
 * stay unwritten. */
static void test_grouped_lanes(void **state) {
  (void)state;
  enum { G = 17 };
  const int64_t rows[G] = {130, 3, 131, 0, 129, 1, 2, 133, 200, 140,
                           64, 257, 132, 129, 129, 5, 135},
                n = 512, k = 1024;
  int64_t off[G + 1];
  int32_t off32[G + 1];
  tw w[G];
  static epic_weight hw[G], dw[G]; /* static: the backend caches a table per list */
  const int64_t m = make_groups(G, rows, n, k, off, off32, w, hw, dw), ldx = k, ldy_max = n + 4;
  float *x = xmalloc((size_t)(m * ldx) * 4), *y = xmalloc((size_t)(m * ldy_max) * 4);
  float *one = xmalloc((size_t)(m * ldy_max) * 4), *ref = xmalloc((size_t)(m * ldy_max) * 4);
  fill(x, (size_t)(m * ldx), 1.0f);
  float *dx = dup_dev(x, (size_t)(m * ldx) * 4), *dy = dalloc((size_t)(m * ldy_max) * 4);
  float *dy1 = dalloc((size_t)(m * ldy_max) * 4);
  int32_t *doff = dup_dev(off32, sizeof off32);
  assert_int_equal(epic_ops_cuda_set_grouped_large(g_gpu, EPIC_CUDA_GROUPED_LARGE_LANES), EPIC_OK);
  assert_int_equal(epic_ops_cuda_set_mma_group_rows(g_gpu, 16), EPIC_OK);
  for (int pass = 0; pass < 2; pass++) {
    const int64_t ldy = pass ? n + 3 : n + 4;
    assert_int_equal(g_cpu->vt->grouped_matmul(g_cpu, x, ldx, off, NULL, G, hw, 1, ref, ldy),
                     EPIC_OK);
    for (int run = 0; run < 4; run++) {
      /* the default lane count under both kinds, then one and the most lanes */
      static const int lanes[4] = {EPIC_CUDA_LT_LANES_DEFAULT, EPIC_CUDA_LT_LANES_DEFAULT, 1,
                                   EPIC_CUDA_LT_LANES_MAX};
      const int kind = run == 1;
      set_fp8_kind(kind);
      assert_int_equal(epic_ops_cuda_set_grouped_lanes(g_gpu, lanes[run]), EPIC_OK);
      const int64_t lim = kind == 0 ? epic_ops_cuda_mma_group_rows(g_gpu) : 16;
      poison(dy, (size_t)(m * ldy) * 4);
      for (int rep = 0; rep < 2; rep++)
        assert_int_equal(g_gpu->vt->grouped_matmul(g_gpu, dx, ldx, off, doff, G, dw, 1, dy, ldy),
                         EPIC_OK);
      assert_int_equal(epic_ops_cuda_set_grouped_lanes(g_gpu, 0), EPIC_OK);
      poison(dy1, (size_t)(m * ldy) * 4);
      for (int g = 0; g < G; g++)
        if (rows[g] > lim)
          assert_int_equal(g_gpu->vt->matmul(g_gpu, dx + off[g] * ldx, ldx, rows[g], &dw[g],
                                             dy1 + off[g] * ldy, ldy),
                           EPIC_OK);
      fetch(y, dy, (size_t)(m * ldy) * 4);
      fetch(one, dy1, (size_t)(m * ldy) * 4);
      for (int g = 0; g < G; g++) {
        if (rows[g] == 0)
          continue;
        char what[128];
        snprintf(what, sizeof what, "grouped lanes: group %d (%lld rows, %s, %d lanes, ld %lld)",
                 g, (long long)rows[g], fp8_kind_names[kind], lanes[run], (long long)ldy);
        const float *yg = y + off[g] * ldy;
        check_err(what, rel_err2d(yg, ldy, ref + off[g] * ldy, ldy, rows[g], n), 5e-2);
        if (rows[g] > lim)
          check_err("  same vs a matmul of its rows",
                    rel_err2d(yg, ldy, one + off[g] * ldy, ldy, rows[g], n), 1e-5);
      }
      for (int64_t i = 0; i < m; i++)
        for (int64_t r = n; r < ldy; r++)
          assert_true(isnan(y[i * ldy + r]));
    }
  }
  set_fp8_kind(0);
  assert_int_equal(epic_ops_cuda_set_mma_group_rows(g_gpu, EPIC_CUDA_FP8_MMA_GROUP_ROWS_DEFAULT),
                   EPIC_OK);
  assert_int_equal(epic_ops_cuda_set_grouped_large(g_gpu, EPIC_CUDA_GROUPED_LARGE_WGMMA), EPIC_OK);
  assert_int_equal(epic_ops_cuda_set_grouped_lanes(g_gpu, EPIC_CUDA_LT_LANES_DEFAULT), EPIC_OK);
  assert_int_equal(epic_ops_cuda_set_grouped_lanes(g_gpu, EPIC_CUDA_LT_LANES_MAX + 1),
                   EPIC_ERR_INVALID);
  free_groups(G, rows, w);
  dfree(dx);
  dfree(dy);
  dfree(dy1);
  dfree(doff);
  free(x);
  free(y);
  free(one);
  free(ref);
}

/* Every group on the wgmma kernel (kern_fp8_wgmma.cu, the default): groups across the
 * 128-row tiles and more of them than one launch takes (128, so two launches), n and k
 * off the 128 blocks (partial weight tiles and blocks come in as zeros), small groups of
 * 1-50 rows between them. The kernel must have run (its launch count); each group must
 * match the CPU on the same e4m3 activations (2e-3, as cuBLASLt must) and, above
 * EPIC_CUDA_FP8_MMA_DENSE_MAX_M rows, cuBLASLt's GEMMs of its rows (1e-3; k's 9 scale
 * blocks keep the lanes out, so per group: smaller ones are the tensor-core kernel's); a
 * group given alone (one launch of one group) must give its rows bit for bit (row
 * invariance); padding columns stay unwritten. An odd output stride (single-column
 * stores) gives every row the same bits. */
static void test_grouped_wgmma(void **state) {
  (void)state;
  enum { G = 150 }; /* 149 groups with rows: a launch takes 128 */
  const int64_t n = 448, k = 1088, ldy = n + 2;
  int64_t rows[G], off[G + 1];
  int32_t off32[G + 1];
  static tw w[G];
  static epic_weight hw[G], dw[G]; /* static: the backend caches a table per list */
  int n_large = 0;
  for (int g = 0; g < G; g++) { /* mostly 129-160 rows; some small, one empty, one of 300 */
    rows[g] = g == 5 ? 0 : g % 9 == 4 ? 1 + g % 50 : g == 7 ? 300 : 129 + (g * 7) % 32;
    n_large += rows[g] > epic_ops_cuda_mma_group_rows(g_gpu);
  }
  assert_true(n_large > 128);
  const int64_t m = make_groups(G, rows, n, k, off, off32, w, hw, dw);
  float *x = xmalloc((size_t)(m * k) * 4), *xq = xmalloc((size_t)(m * k) * 4);
  float *y = xmalloc((size_t)(m * ldy) * 4), *lanes = xmalloc((size_t)(m * ldy) * 4);
  float *ref = xmalloc((size_t)(m * n) * 4), *one = xmalloc((size_t)(m * ldy) * 4);
  fill(x, (size_t)(m * k), 1.0f);
  quantise_like_gpu(x, k, m, k, xq);
  assert_int_equal(g_cpu->vt->grouped_matmul(g_cpu, xq, k, off, NULL, G, hw, 1, ref, n), EPIC_OK);
  float *dx = dup_dev(x, (size_t)(m * k) * 4), *dy = dalloc((size_t)(m * ldy) * 4);
  int32_t *doff = dup_dev(off32, sizeof off32);
  for (int run = 0; run < 2; run++) {
    assert_int_equal(epic_ops_cuda_set_grouped_large(g_gpu, run ? EPIC_CUDA_GROUPED_LARGE_LANES
                                                                : EPIC_CUDA_GROUPED_LARGE_WGMMA),
                     EPIC_OK);
    poison(dy, (size_t)(m * ldy) * 4);
    const int64_t launches = epic_ops_cuda_wgmma_launches(g_gpu);
    assert_int_equal(g_gpu->vt->grouped_matmul(g_gpu, dx, k, off, doff, G, dw, 1, dy, ldy),
                     EPIC_OK);
    /* one launch per 128 large groups, none for the lanes */
    assert_int_equal(epic_ops_cuda_wgmma_launches(g_gpu) - launches,
                     run ? 0 : (n_large + 127) / 128);
    fetch(run ? lanes : y, dy, (size_t)(m * ldy) * 4);
  }
  assert_int_equal(epic_ops_cuda_set_grouped_large(g_gpu, EPIC_CUDA_GROUPED_LARGE_WGMMA), EPIC_OK);
  double worst = 0, worst_lanes = 0;
  int alone = 0;
  const int64_t before_alone = epic_ops_cuda_wgmma_launches(g_gpu);
  for (int g = 0; g < G; g++) {
    if (rows[g] <= epic_ops_cuda_mma_group_rows(g_gpu))
      continue;
    const double e = rel_err2d(y + off[g] * ldy, ldy, ref + off[g] * n, n, rows[g], n);
    const double el = rows[g] <= EPIC_CUDA_FP8_MMA_DENSE_MAX_M
                          ? 0
                          : rel_err2d(y + off[g] * ldy, ldy, lanes + off[g] * ldy, ldy, rows[g], n);
    worst = e > worst ? e : worst;
    worst_lanes = el > worst_lanes ? el : worst_lanes;
    if (g % 16 != 7)
      continue;
    /* the group alone: offsets of one group over its own rows */
    const int64_t o1[2] = {0, rows[g]};
    const int32_t o1_32[2] = {0, (int32_t)rows[g]};
    int32_t *do1 = dup_dev(o1_32, sizeof o1_32);
    poison(dy, (size_t)(rows[g] * ldy) * 4);
    assert_int_equal(g_gpu->vt->grouped_matmul(g_gpu, dx + off[g] * k, k, o1, do1, 1, &dw[g], 1,
                                               dy, ldy),
                     EPIC_OK);
    assert_int_equal(epic_ops_cuda_wgmma_launches(g_gpu), before_alone + alone + 1);
    fetch(one, dy, (size_t)(rows[g] * ldy) * 4);
    for (int64_t i = 0; i < rows[g]; i++)
      if (memcmp(one + i * ldy, y + (off[g] + i) * ldy, (size_t)n * 4))
        fail_msg("grouped wgmma: group %d row %lld differs when the group is alone", g,
                 (long long)i);
    dfree(do1);
    alone++;
  }
  check_err("grouped wgmma: large groups vs CPU on e4m3 activations", worst, 2e-3);
  check_err("grouped wgmma: large groups vs cuBLASLt", worst_lanes, 1e-3);
  printf("#   %d groups alone gave their rows bit for bit\n", alone);
  for (int64_t i = 0; i < m; i++)
    for (int64_t r = n; r < ldy; r++)
      assert_true(isnan(y[i * ldy + r]));
  /* odd stride: the kernel's single-column stores, the same bits */
  poison(dy, (size_t)(m * (n + 1)) * 4);
  const int64_t before_odd = epic_ops_cuda_wgmma_launches(g_gpu);
  assert_int_equal(g_gpu->vt->grouped_matmul(g_gpu, dx, k, off, doff, G, dw, 1, dy, n + 1),
                   EPIC_OK);
  assert_int_equal(epic_ops_cuda_wgmma_launches(g_gpu), before_odd + (n_large + 127) / 128);
  fetch(one, dy, (size_t)(m * (n + 1)) * 4);
  for (int64_t i = 0; i < m; i++)
    if (memcmp(one + i * (n + 1), y + i * ldy, (size_t)n * 4))
      fail_msg("grouped wgmma: row %lld differs with an odd output stride", (long long)i);
  assert_int_equal(epic_ops_cuda_set_grouped_large(g_gpu, (epic_cuda_grouped_large)7),
                   EPIC_ERR_INVALID);
  free_groups(G, rows, w);
  dfree(dx);
  dfree(dy);
  dfree(doff);
  free(x);
  free(xq);
  free(y);
  free(lanes);
  free(ref);
  free(one);
}

/* The wgmma kernel's host-planned forms (epic_ops_cuda_set_wgmma_form: half tiles in a
 * dynamic order, whole tiles in a static order, and the automatic choice) give every row
 * the same bits, and the CPU's product on the same e4m3 activations (2e-3). Groups of 1
 * to 513 rows make last row tiles of at most 64 rows (half tiles) and more, one or several
 * row tiles; two weight heights end the last of three column tiles within its first
 * (n = 600) or its second 128-column half (n = 700), a third makes four column tiles, the
 * last one partial (n = 1000); an empty group sits between them. */
static void test_wgmma_forms(void **state) {
  (void)state;
  enum { G = 15 };
  const int64_t rows[G] = {1, 64, 65, 128, 129, 200, 0, 255, 256, 257, 300, 384, 385, 513, 40};
  const int64_t k = 1088;
  static const epic_cuda_wgmma_form forms[2] = {EPIC_CUDA_WGMMA_WHOLE, EPIC_CUDA_WGMMA_AUTO};
  static const char *const form_names[2] = {"whole", "auto"};
  static const int64_t heights[3] = {700, 600, 1000};
  for (int shape = 0; shape < 3; shape++) {
    const int64_t n = heights[shape], ldy = n + 2;
    int64_t off[G + 1];
    int32_t off32[G + 1];
    static tw w[G];
    static epic_weight hw[3][G], dw[3][G]; /* static: the backend caches a table per list */
    const int64_t m = make_groups(G, rows, n, k, off, off32, w, hw[shape], dw[shape]);
    float *x = xmalloc((size_t)(m * k) * 4), *xq = xmalloc((size_t)(m * k) * 4);
    float *first = xmalloc((size_t)(m * ldy) * 4), *y = xmalloc((size_t)(m * ldy) * 4);
    float *ref = xmalloc((size_t)(m * n) * 4);
    fill(x, (size_t)(m * k), 1.0f);
    quantise_like_gpu(x, k, m, k, xq);
    assert_int_equal(g_cpu->vt->grouped_matmul(g_cpu, xq, k, off, NULL, G, hw[shape], 1, ref, n),
                     EPIC_OK);
    float *dx = dup_dev(x, (size_t)(m * k) * 4), *dy = dalloc((size_t)(m * ldy) * 4);
    int32_t *doff = dup_dev(off32, sizeof off32);
    assert_int_equal(epic_ops_cuda_set_wgmma_form(g_gpu, EPIC_CUDA_WGMMA_HALF), EPIC_OK);
    assert_int_equal(g_gpu->vt->grouped_matmul(g_gpu, dx, k, off, doff, G, dw[shape], 1, dy, ldy),
                     EPIC_OK);
    fetch(first, dy, (size_t)(m * ldy) * 4);
    char what[96];
    snprintf(what, sizeof what, "wgmma forms (n %lld): half tiles vs CPU on e4m3 activations",
             (long long)n);
    check_err(what, rel_err2d(first, ldy, ref, n, m, n), 2e-3);
    for (int f = 0; f < 2; f++) {
      assert_int_equal(epic_ops_cuda_set_wgmma_form(g_gpu, forms[f]), EPIC_OK);
      poison(dy, (size_t)(m * ldy) * 4);
      const int64_t launches = epic_ops_cuda_wgmma_launches(g_gpu);
      assert_int_equal(g_gpu->vt->grouped_matmul(g_gpu, dx, k, off, doff, G, dw[shape], 1, dy, ldy),
                       EPIC_OK);
      assert_int_equal(epic_ops_cuda_wgmma_launches(g_gpu), launches + 1);
      fetch(y, dy, (size_t)(m * ldy) * 4);
      for (int64_t i = 0; i < m; i++)
        if (memcmp(y + i * ldy, first + i * ldy, (size_t)n * 4))
          fail_msg("wgmma forms (n %lld): row %lld differs between half tiles and %s", (long long)n,
                   (long long)i, form_names[f]);
      for (int64_t i = 0; i < m; i++)
        for (int64_t r = n; r < ldy; r++)
          assert_true(isnan(y[i * ldy + r]));
    }
    printf("#   n %lld: whole tiles and the automatic choice equal half tiles bit for bit\n",
           (long long)n);
    free_groups(G, rows, w);
    dfree(dx);
    dfree(dy);
    dfree(doff);
    free(x);
    free(xq);
    free(first);
    free(y);
    free(ref);
  }
  assert_int_equal(epic_ops_cuda_set_wgmma_form(g_gpu, (epic_cuda_wgmma_form)9), EPIC_ERR_INVALID);
  assert_int_equal(epic_ops_cuda_set_wgmma_form(g_gpu, EPIC_CUDA_WGMMA_AUTO), EPIC_OK);
}

/* grouped_matmul_rows (ABI 8, n_src since 11) equals copy_rows + grouped_matmul bit for
 * bit: rows read through a map that repeats and skips token rows (src with a row stride
 * above k), groups large and small and empty, under the default kind (the wgmma kernel
 * copies each group row's codes from the source rows, quantised once), with the lanes
 * (their quantiser reads every group row through the map), with no lanes (large groups
 * per group, from a gathered copy), the FP32 kind and the exact precision (both gather
 * first). A NULL map and a negative source count are refused. */
static void test_grouped_rows_gather(void **state) {
  (void)state;
  enum { G = 9, T = 300 };
  const int64_t rows[G] = {130, 3, 0, 200, 1, 17, 140, 64, 5}, n = 384, k = 1024, lds = k + 8;
  int64_t off[G + 1];
  int32_t off32[G + 1];
  tw w[G];
  static epic_weight dw[G]; /* static: the backend caches a table per list */
  const int64_t m = make_groups(G, rows, n, k, off, off32, w, NULL, dw);
  int32_t *map = xmalloc((size_t)m * sizeof *map);
  for (int64_t i = 0; i < m; i++)
    map[i] = (int32_t)(rng_u64() % (T - 20)); /* repeats; the last 20 tokens never read */
  float *src = xmalloc((size_t)(T * lds) * 4), *a = xmalloc((size_t)(m * n) * 4);
  float *b = xmalloc((size_t)(m * n) * 4);
  fill(src, (size_t)(T * lds), 1.0f);
  float *dsrc = dup_dev(src, (size_t)(T * lds) * 4), *dx = dalloc((size_t)(m * k) * 4);
  float *dy = dalloc((size_t)(m * n) * 4);
  int32_t *dmap = dup_dev(map, (size_t)m * sizeof *map), *doff = dup_dev(off32, sizeof off32);
  assert_int_equal(g_gpu->vt->copy_rows(g_gpu, m, k, dsrc, lds, dmap, dx, k, NULL), EPIC_OK);
  static const char *const names[5] = {"default", "lanes", "no lanes", "fp32 kind", "exact"};
  for (int run = 0; run < 5; run++) {
    set_fp8_kind(run == 3);
    const int lanes = run == 2 ? 0 : EPIC_CUDA_LT_LANES_DEFAULT;
    assert_int_equal(epic_ops_cuda_set_grouped_lanes(g_gpu, lanes), EPIC_OK);
    assert_int_equal(epic_ops_cuda_set_grouped_large(g_gpu, run == 1
                                                                ? EPIC_CUDA_GROUPED_LARGE_LANES
                                                                : EPIC_CUDA_GROUPED_LARGE_WGMMA),
                     EPIC_OK);
    assert_int_equal(
        epic_ops_cuda_set_precision(g_gpu, run == 4 ? EPIC_CUDA_PREC_EXACT : EPIC_CUDA_PREC_FAST),
        EPIC_OK);
    poison(dy, (size_t)(m * n) * 4);
    assert_int_equal(g_gpu->vt->grouped_matmul(g_gpu, dx, k, off, doff, G, dw, 1, dy, n), EPIC_OK);
    fetch(a, dy, (size_t)(m * n) * 4);
    poison(dy, (size_t)(m * n) * 4);
    const int64_t launches = epic_ops_cuda_wgmma_launches(g_gpu);
    assert_int_equal(
        g_gpu->vt->grouped_matmul_rows(g_gpu, dsrc, lds, T, dmap, off, doff, G, dw, 1, dy, n),
        EPIC_OK);
    if (run == 0) /* the wgmma kernel ran */
      assert_true(epic_ops_cuda_wgmma_launches(g_gpu) > launches);
    fetch(b, dy, (size_t)(m * n) * 4);
    for (int64_t i = 0; i < m * n; i++)
      if (memcmp(&a[i], &b[i], sizeof a[i]))
        fail_msg("grouped_matmul_rows (%s): row %lld col %lld: %.9g, gathered %.9g", names[run],
                 (long long)(i / n), (long long)(i % n), (double)b[i], (double)a[i]);
    printf("#   grouped_matmul_rows (%s) equals copy_rows + grouped_matmul bit for bit\n",
           names[run]);
  }
  set_fp8_kind(0);
  assert_int_equal(epic_ops_cuda_set_grouped_lanes(g_gpu, EPIC_CUDA_LT_LANES_DEFAULT), EPIC_OK);
  assert_int_equal(epic_ops_cuda_set_precision(g_gpu, EPIC_CUDA_PREC_FAST), EPIC_OK);
  assert_int_equal(
      g_gpu->vt->grouped_matmul_rows(g_gpu, dsrc, lds, T, NULL, off, doff, G, dw, 1, dy, n),
      EPIC_ERR_INVALID);
  assert_int_equal(
      g_gpu->vt->grouped_matmul_rows(g_gpu, dsrc, lds, -1, dmap, off, doff, G, dw, 1, dy, n),
      EPIC_ERR_INVALID);
  free_groups(G, rows, w);
  dfree(dsrc);
  dfree(dx);
  dfree(dy);
  dfree(dmap);
  dfree(doff);
  free(map);
  free(src);
  free(a);
  free(b);
}

/* moe_plan on the device equals the CPU's (plan and accumulated counts, bit for bit);
 * grouped_matmul_dev on its offsets equals grouped_matmul in both precisions (the fast
 * FP8 tensor-core and wgmma paths read the offsets on the device, exact reads them back,
 * both fast bounds); an expert
 * id outside the table and a group above the bound are reported at the next sync. */
static void test_moe_plan(void **state) {
  (void)state;
  enum { T = 117, TOPK = 8, N = T * TOPK, E = 16, NW = 384, K = 1024 };
  int32_t idx[N], plan_c[2 * N + E + 1], plan_g[2 * N + E + 1];
  int64_t cnt_c[E], cnt_g[E];
  /* TOPK distinct experts per token: 0, 1 and 2 for every token (117-row groups: the
   * kernel's row tiles), the others spread over 3 .. E-1 in a random order */
  const int shift = (int)(rng_u64() % (E - 3));
  for (int t = 0; t < T; t++)
    for (int k = 0; k < TOPK; k++)
      idx[t * TOPK + k] = (int32_t)(k < 3 ? k : 3 + (t + shift + k * 5) % (E - 3));
  for (int e = 0; e < E; e++)
    cnt_c[e] = cnt_g[e] = 100 + e;
  int32_t *didx = dup_dev(idx, sizeof idx), *dplan = dalloc(sizeof plan_g);
  int64_t *dcnt = dup_dev(cnt_g, sizeof cnt_g);
  assert_int_equal(g_cpu->vt->moe_plan(g_cpu, idx, N, E, TOPK, plan_c, cnt_c), EPIC_OK);
  for (int rep = 0; rep < 2; rep++) /* counts accumulate */
    assert_int_equal(g_gpu->vt->moe_plan(g_gpu, didx, N, E, TOPK, dplan, dcnt), EPIC_OK);
  fetch(plan_g, dplan, sizeof plan_g);
  fetch(cnt_g, dcnt, sizeof cnt_g);
  assert_memory_equal(plan_g, plan_c, sizeof plan_c);
  for (int e = 0; e < E; e++)
    assert_int_equal(cnt_g[e], cnt_c[e] + (plan_c[2 * N + e + 1] - plan_c[2 * N + e]));
  printf("#   moe_plan: %d items over %d experts equal the CPU's\n", N, E);

  /* the planned groups through both grouped ops */
  const int32_t *off = plan_c + 2 * N;
  int64_t off64[E + 1], max_rows = 0;
  for (int e = 0; e <= E; e++) {
    off64[e] = off[e];
    if (e < E && off[e + 1] - off[e] > max_rows)
      max_rows = off[e + 1] - off[e];
  }
  static tw w[E];
  static epic_weight dw[E];
  for (int e = 0; e < E; e++) {
    w[e] = tw_make(EPIC_DT_F8E4M3, NW, K, 128, 128);
    dw[e] = w[e].d;
  }
  float *x = xmalloc((size_t)N * K * 4), *ya = xmalloc((size_t)N * NW * 4);
  float *yb = xmalloc((size_t)N * NW * 4);
  fill(x, (size_t)N * K, 1.0f);
  float *dx = dup_dev(x, (size_t)N * K * 4), *dy = dalloc((size_t)N * NW * 4);
  const int32_t *doff = dplan + 2 * N;
  /* Fast precision with every group on the tensor-core kernel (bound 128), then with the
   * bound 16 (groups above it on the wgmma kernel on both paths: the device-planned form
   * must have run), then the default (every group on the wgmma kernel), then exact. */
  static const char *const pass_names[4] = {"fast, mma up to 128 rows", "fast, mma up to 16",
                                            "fast, default: every group on wgmma", "exact"};
  static const int64_t bounds[4] = {EPIC_CUDA_FP8_MMA_GROUP_MAX_ROWS, 16,
                                    EPIC_CUDA_FP8_MMA_GROUP_ROWS_DEFAULT,
                                    EPIC_CUDA_FP8_MMA_GROUP_ROWS_DEFAULT};
  for (int pass = 0; pass < 4; pass++) {
    assert_int_equal(epic_ops_cuda_set_precision(g_gpu, pass == 3 ? EPIC_CUDA_PREC_EXACT
                                                                  : EPIC_CUDA_PREC_FAST),
                     EPIC_OK);
    assert_int_equal(epic_ops_cuda_set_mma_group_rows(g_gpu, bounds[pass]), EPIC_OK);
    poison(dy, (size_t)N * NW * 4);
    assert_int_equal(g_gpu->vt->grouped_matmul(g_gpu, dx, K, off64, doff, E, dw, 1, dy, NW), EPIC_OK);
    fetch(ya, dy, (size_t)N * NW * 4);
    poison(dy, (size_t)N * NW * 4);
    const int64_t launches = epic_ops_cuda_wgmma_launches(g_gpu);
    assert_int_equal(
        g_gpu->vt->grouped_matmul_dev(g_gpu, dx, K, N, max_rows, doff, E, dw, 1, dy, NW), EPIC_OK);
    assert_int_equal(epic_ops_cuda_wgmma_launches(g_gpu) - launches, pass == 1 || pass == 2);
    fetch(yb, dy, (size_t)N * NW * 4);
    assert_memory_equal(ya, yb, (size_t)N * NW * 4);
    assert_int_equal(g_gpu->vt->sync(g_gpu), EPIC_OK);
    printf("#   grouped_matmul_dev (%s, largest group %lld rows) equals grouped_matmul\n",
           pass_names[pass], (long long)max_rows);
  }
  assert_int_equal(epic_ops_cuda_set_mma_group_rows(g_gpu, EPIC_CUDA_FP8_MMA_GROUP_MAX_ROWS + 1),
                   EPIC_ERR_INVALID);
  assert_int_equal(epic_ops_cuda_set_precision(g_gpu, EPIC_CUDA_PREC_FAST), EPIC_OK);
  /* a bound below the largest group: reported at the next sync, then cleared */
  assert_int_equal(
      g_gpu->vt->grouped_matmul_dev(g_gpu, dx, K, N, max_rows - 1, doff, E, dw, 1, dy, NW), EPIC_OK);
  assert_int_equal(g_gpu->vt->sync(g_gpu), EPIC_ERR_INVALID);
  assert_int_equal(g_gpu->vt->sync(g_gpu), EPIC_OK);
  /* an expert id outside the table */
  idx[5] = E;
  int32_t *dbad = dup_dev(idx, sizeof idx);
  assert_int_equal(g_gpu->vt->moe_plan(g_gpu, dbad, N, E, TOPK, dplan, NULL), EPIC_OK);
  assert_int_equal(g_gpu->vt->sync(g_gpu), EPIC_ERR_INVALID);
  assert_int_equal(g_gpu->vt->sync(g_gpu), EPIC_OK);
  assert_int_equal(g_gpu->vt->moe_plan(g_gpu, didx, N, E, 0, dplan, NULL), EPIC_ERR_INVALID);
  for (int e = 0; e < E; e++)
    tw_free(&w[e]);
  dfree(didx);
  dfree(dbad);
  dfree(dplan);
  dfree(dcnt);
  dfree(dx);
  dfree(dy);
  free(x);
  free(ya);
  free(yb);
}

/* moe_plan at other expert counts: DeepSeek-V3's 256 (one scan chunk of the 1024-thread
 * CTA), 1500 (two chunks: the scan's carry) and 5; random picks, repeats included, against
 * the CPU bit for bit. */
static void test_moe_plan_sizes(void **state) {
  (void)state;
  static const int experts[] = {256, 1500, 5};
  enum { N = 32 * 8 };
  for (size_t i = 0; i < sizeof experts / sizeof experts[0]; i++) {
    const int E = experts[i];
    int32_t idx[N];
    for (int j = 0; j < N; j++)
      idx[j] = (int32_t)(rng_u64() % (uint64_t)E);
    const size_t pbytes = (size_t)(2 * N + E + 1) * sizeof(int32_t);
    int32_t *plan_c = xmalloc(pbytes), *plan_g = xmalloc(pbytes);
    int32_t *didx = dup_dev(idx, sizeof idx), *dplan = dalloc(pbytes);
    assert_int_equal(g_cpu->vt->moe_plan(g_cpu, idx, N, E, 8, plan_c, NULL), EPIC_OK);
    assert_int_equal(g_gpu->vt->moe_plan(g_gpu, didx, N, E, 8, dplan, NULL), EPIC_OK);
    assert_int_equal(g_gpu->vt->sync(g_gpu), EPIC_OK);
    fetch(plan_g, dplan, pbytes);
    assert_memory_equal(plan_g, plan_c, pbytes);
    printf("#   moe_plan: %d items over %d experts equal the CPU's\n", N, E);
    free(plan_c);
    free(plan_g);
    dfree(didx);
    dfree(dplan);
  }
}

/* ----------------------------------------------------------- element-wise */

static void test_rmsnorm(void **state) {
  (void)state;
  /* 256 threads per row up to 2048 columns, 1024 beyond (one round to 8192, then more) */
  static const int64_t ns[] = {7, 512, 1536, 2048, 2049, 7168, 20000};
  for (size_t k = 0; k < sizeof ns / sizeof ns[0]; k++) {
    const int64_t n = ns[k], m = 5, ld = n + 3;
    const size_t sz = (size_t)(m * ld) * 4;
    float *x = xmalloc(sz), *y = xmalloc(sz), *ref = xmalloc(sz), *w = xmalloc((size_t)n * 4);
    fill(x, (size_t)(m * ld), 1.0f);
    fill(w, (size_t)n, 1.0f);
    for (int64_t j = 0; j < n; j++)
      x[j] *= 100.0f;
    float *dx = dup_dev(x, sz), *dw = dup_dev(w, (size_t)n * 4), *dy = dalloc(sz);
    poison(dy, sz);
    assert_int_equal(g_gpu->vt->rmsnorm(g_gpu, dx, ld, m, n, dw, 1e-6f, dy, ld), EPIC_OK);
    fetch(y, dy, sz);
    assert_int_equal(g_cpu->vt->rmsnorm(g_cpu, x, ld, m, n, w, 1e-6f, ref, ld), EPIC_OK);
    char what[64];
    snprintf(what, sizeof what, "rmsnorm n=%lld", (long long)n);
    check_err(what, rel_err2d(y, ld, ref, ld, m, n), 1e-5);
    /* a row alone (a decode step) as among others, bit for bit */
    float *one = xmalloc((size_t)n * 4);
    poison(dy, sz);
    assert_int_equal(g_gpu->vt->rmsnorm(g_gpu, dx + 2 * ld, ld, 1, n, dw, 1e-6f, dy, ld), EPIC_OK);
    fetch(one, dy, (size_t)n * 4);
    assert_memory_equal(one, y + 2 * ld, (size_t)n * 4);
    free(one);
    /* in place */
    assert_int_equal(g_gpu->vt->rmsnorm(g_gpu, dx, ld, m, n, dw, 1e-6f, dx, ld), EPIC_OK);
    fetch(y, dx, sz);
    check_err("  in place", rel_err2d(y, ld, ref, ld, m, n), 1e-5);
    dfree(dx);
    dfree(dw);
    dfree(dy);
    free(x);
    free(y);
    free(ref);
    free(w);
  }
  /* Many wide rows run fewer real threads per row (ops_cuda: each stands in for several of
   * the one-row kernel's), with the same sums: any row equals it computed alone. */
  const int64_t m = 300, n = 7168;
  const size_t sz = (size_t)(m * n) * 4;
  float *x = xmalloc(sz), *y = xmalloc(sz), *w = xmalloc((size_t)n * 4), *one = xmalloc(n * 4);
  fill(x, (size_t)(m * n), 3.0f);
  fill(w, (size_t)n, 1.0f);
  float *dx = dup_dev(x, sz), *dw = dup_dev(w, (size_t)n * 4), *dy = dalloc(sz);
  assert_int_equal(g_gpu->vt->rmsnorm(g_gpu, dx, n, m, n, dw, 1e-6f, dy, n), EPIC_OK);
  fetch(y, dy, sz);
  for (int64_t r = 0; r < m; r += 37) {
    assert_int_equal(g_gpu->vt->rmsnorm(g_gpu, dx + r * n, n, 1, n, dw, 1e-6f, dy, n), EPIC_OK);
    fetch(one, dy, (size_t)n * 4);
    assert_memory_equal(one, y + r * n, (size_t)n * 4);
  }
  dfree(dx);
  dfree(dw);
  dfree(dy);
  free(x);
  free(y);
  free(w);
  free(one);
}

static void test_rope(void **state) {
  (void)state;
  /* V3 q_pe inside q rows: 128 heads of 192 (128 nope + 64 rope), rope at offset 128 */
  const int64_t m = 6, H = 128, rd = 64, ld_head = 192, ld_tok = H * ld_head + 5;
  double inv_freq[32];
  for (int j = 0; j < 32; j++)
    inv_freq[j] = pow(10000.0, -2.0 * j / 64.0) / (j > 20 ? 40.0 : 1.0);
  const int32_t pos[6] = {0, 1, 17, 4095, 100000, 163839};
  const size_t sz = (size_t)(m * ld_tok) * 4;
  float *x = xmalloc(sz), *got = xmalloc(sz);
  fill(x, (size_t)(m * ld_tok), 1.0f);
  float *dx = dup_dev(x, sz);
  int32_t *dpos = dup_dev(pos, sizeof pos);
  assert_int_equal(g_gpu->vt->rope(g_gpu, dx + 128, m, H, ld_tok, ld_head, rd, dpos, inv_freq),
                   EPIC_OK);
  fetch(got, dx, sz);
  assert_int_equal(g_cpu->vt->rope(g_cpu, x + 128, m, H, ld_tok, ld_head, rd, pos, inv_freq),
                   EPIC_OK);
  check_err("rope V3 (128 heads, 64 dims, positions to 163839)",
            rel_err2d(got, 1, x, 1, 1, m * ld_tok), 1e-5);
  dfree(dx);
  dfree(dpos);
  free(x);
  free(got);
}

static void test_silu_axpy(void **state) {
  (void)state;
  /* row strides: 2051 (scalar path), 2052 (16-byte rows: the float4 path) */
  const int64_t m = 7, n = 2048, ld_max = 2052;
  const size_t sz = (size_t)(m * ld_max) * 4;
  float *g = xmalloc(sz), *u = xmalloc(sz), *y = xmalloc(sz), *ref = xmalloc(sz);
  fill(g, (size_t)(m * ld_max), 20.0f);
  fill(u, (size_t)(m * ld_max), 1.0f);
  float *dg = dup_dev(g, sz), *du = dup_dev(u, sz), *dy = dalloc(sz);
  for (int64_t ld = ld_max - 1; ld <= ld_max; ld++) {
    poison(dy, sz);
    assert_int_equal(g_gpu->vt->silu_mul(g_gpu, dg, ld, du, ld, m, n, dy, ld), EPIC_OK);
    fetch(y, dy, sz);
    assert_int_equal(g_cpu->vt->silu_mul(g_cpu, g, ld, u, ld, m, n, ref, ld), EPIC_OK);
    check_err(ld % 4 ? "silu_mul (scalar rows)" : "silu_mul (float4 rows)",
              rel_err2d(y, ld, ref, ld, m, n), 1e-5);
    for (int64_t i = 0; i < m; i++)
      for (int64_t j = n; j < ld; j++)
        assert_true(isnan(y[i * ld + j]));
  }
  const int64_t na = 7168 * 3 + 1;
  float *a = xmalloc((size_t)na * 4), *b = xmalloc((size_t)na * 4), *bg = xmalloc((size_t)na * 4);
  fill(a, (size_t)na, 1.0f);
  fill(b, (size_t)na, 1.0f);
  float *da = dup_dev(a, (size_t)na * 4), *db = dup_dev(b, (size_t)na * 4);
  assert_int_equal(g_gpu->vt->axpy(g_gpu, na, 0.37f, da, db), EPIC_OK);
  fetch(bg, db, (size_t)na * 4);
  assert_int_equal(g_cpu->vt->axpy(g_cpu, na, 0.37f, a, b), EPIC_OK);
  check_err("axpy", rel_err2d(bg, 1, b, 1, 1, na), 1e-6);
  dfree(dg);
  dfree(du);
  dfree(dy);
  dfree(da);
  dfree(db);
  free(g);
  free(u);
  free(y);
  free(ref);
  free(a);
  free(b);
  free(bg);
}

/* ABI 3 row ops: copy_rows (bit-exact, int32 patterns included), zero, moe_combine and
 * kv_store_batch against the CPU backend. */
static void test_row_ops(void **state) {
  (void)state;
  const int64_t n = 1000, cols = 7168, ld_s = 7169, ld_d = 7172, K = 8, D = 7168;
  const size_t ss = (size_t)(n * ld_s) * 4, ds = (size_t)(n * ld_d) * 4;
  float *src = xmalloc(ss), *dst = xmalloc(ds), *ref = xmalloc(ds);
  int32_t *sidx = xmalloc((size_t)n * 4), *didx = xmalloc((size_t)n * 4);
  fill(src, (size_t)(n * ld_s), 1.0f);
  for (int64_t i = 0; i < n; i++) {
    const uint32_t bits = 0x7fa00000u + (uint32_t)i; /* NaN patterns must pass unchanged */
    memcpy(&src[i * ld_s], &bits, 4);
    sidx[i] = (int32_t)((i * 7919) % n);
    didx[i] = (int32_t)((i * 104729) % n);
  }
  memset(ref, 0, ds);
  float *dsrc = dup_dev(src, ss), *ddst = dalloc(ds);
  int32_t *dsidx = dup_dev(sidx, (size_t)n * 4), *ddidx = dup_dev(didx, (size_t)n * 4);
  assert_int_equal(g_gpu->vt->zero(g_gpu, ddst, ds), EPIC_OK);
  assert_int_equal(g_gpu->vt->copy_rows(g_gpu, n, cols, dsrc, ld_s, dsidx, ddst, ld_d, ddidx),
                   EPIC_OK);
  fetch(dst, ddst, ds);
  assert_int_equal(g_cpu->vt->copy_rows(g_cpu, n, cols, src, ld_s, sidx, ref, ld_d, didx), EPIC_OK);
  assert_memory_equal(dst, ref, ds);
  /* The vectorised path (aligned rows, no index on one side). */
  assert_int_equal(g_gpu->vt->copy_rows(g_gpu, n, 1024, dsrc, 0, NULL, ddst, 1024, ddidx), EPIC_OK);
  fetch(dst, ddst, (size_t)(n * 1024) * 4);
  for (int64_t i = 0; i < n; i++) assert_memory_equal(&dst[didx[i] * 1024], src, 1024 * 4);

  const int64_t m = 97;
  const size_t rs = (size_t)(m * K * D) * 4, ys = (size_t)(m * D) * 4;
  float *rows = xmalloc(rs), *w = xmalloc((size_t)(m * K) * 4), *y = xmalloc(ys), *yg = xmalloc(ys);
  int32_t *slot = xmalloc((size_t)(m * K) * 4);
  fill(rows, (size_t)(m * K * D), 1.0f);
  fill(w, (size_t)(m * K), 1.0f);
  fill(y, (size_t)(m * D), 1.0f);
  for (int64_t i = 0; i < m * K; i++) slot[i] = (int32_t)((i * 31) % (m * K));
  float *drows = dup_dev(rows, rs), *dw = dup_dev(w, (size_t)(m * K) * 4), *dy = dup_dev(y, ys);
  int32_t *dslot = dup_dev(slot, (size_t)(m * K) * 4);
  assert_int_equal(g_gpu->vt->moe_combine(g_gpu, m, K, D, drows, dslot, dw, dy), EPIC_OK);
  assert_int_equal(g_gpu->vt->moe_combine(g_gpu, m, K, D, drows, NULL, dw, dy), EPIC_OK);
  fetch(yg, dy, ys);
  assert_int_equal(g_cpu->vt->moe_combine(g_cpu, m, K, D, rows, slot, w, y), EPIC_OK);
  assert_int_equal(g_cpu->vt->moe_combine(g_cpu, m, K, D, rows, NULL, w, y), EPIC_OK);
  check_err("moe_combine", rel_err2d(yg, D, y, D, m, D), 1e-6);
  /* The four-column kernel (above: D % 4 == 0, aligned) equals the scalar one (y one float
   * off 16-byte alignment) bit for bit, with top-k counts below, at and above its batch of
   * loads (8): tokens of kk rows each from the same rows. */
  static const int64_t kks[3] = {3, 8, 12};
  float *dy1 = dalloc(ys + 4), *yv = xmalloc(ys), *y1 = xmalloc(ys);
  for (int i = 0; i < 3; i++) {
    const int64_t kk = kks[i], mk = m * K / kk < m ? m * K / kk : m;
    assert_int_equal(g_gpu->vt->upload(g_gpu, dy, y, ys), EPIC_OK);
    assert_int_equal(g_gpu->vt->upload(g_gpu, dy1 + 1, y, ys), EPIC_OK);
    assert_int_equal(g_gpu->vt->moe_combine(g_gpu, mk, kk, D, drows, dslot, dw, dy), EPIC_OK);
    assert_int_equal(g_gpu->vt->moe_combine(g_gpu, mk, kk, D, drows, dslot, dw, dy1 + 1), EPIC_OK);
    fetch(yv, dy, ys);
    fetch(y1, dy1 + 1, ys);
    assert_memory_equal(yv, y1, (size_t)(mk * D) * 4);
  }
  dfree(dy1);
  free(yv);
  free(y1);

  /* kv_store_batch on a 576-wide paged cache. */
  const int64_t ps = 64, width = 576, lora = 512, ns = 40, stride = 4, pages = ns * stride;
  const size_t ps_bytes = (size_t)(pages * ps * width) * 4;
  float *pool = xmalloc(ps_bytes), *poolg = xmalloc(ps_bytes);
  float *lat = xmalloc((size_t)(ns * 600) * 4), *kpe = xmalloc((size_t)(ns * 70) * 4);
  int32_t *tables = xmalloc((size_t)(ns * stride) * 4), *nctx = xmalloc((size_t)ns * 4);
  fill(pool, (size_t)(pages * ps * width), 1.0f);
  fill(lat, (size_t)(ns * 600), 1.0f);
  fill(kpe, (size_t)(ns * 70), 1.0f);
  for (int64_t s = 0; s < ns; s++) {
    /* A permutation of the pages: no two sequences share a row, so store order cannot matter. */
    for (int64_t p = 0; p < stride; p++) tables[s * stride + p] = (int32_t)(((s * stride + p) * 7) % pages);
    nctx[s] = (int32_t)(1 + (s * 37) % (stride * ps));
  }
  float *dpool = dup_dev(pool, ps_bytes), *dlat = dup_dev(lat, (size_t)(ns * 600) * 4);
  float *dkpe = dup_dev(kpe, (size_t)(ns * 70) * 4);
  int32_t *dtab = dup_dev(tables, (size_t)(ns * stride) * 4), *dnctx = dup_dev(nctx, (size_t)ns * 4);
  epic_kv_batch kb = {.pool = dpool, .page_size = ps, .width = width, .lora = lora,
                      .block_tables = dtab, .table_stride = stride, .n_ctx = dnctx,
                      .max_ctx = stride * ps};
  assert_int_equal(g_gpu->vt->kv_store_batch(g_gpu, &kb, ns, dlat, 600, dkpe, 70),
                   EPIC_OK);
  fetch(poolg, dpool, ps_bytes);
  kb.pool = pool;
  kb.block_tables = tables;
  kb.n_ctx = nctx;
  assert_int_equal(g_cpu->vt->kv_store_batch(g_cpu, &kb, ns, lat, 600, kpe, 70), EPIC_OK);
  assert_memory_equal(poolg, pool, ps_bytes);
  dfree(dsrc), dfree(ddst), dfree(dsidx), dfree(ddidx), dfree(drows), dfree(dw), dfree(dy);
  dfree(dslot), dfree(dpool), dfree(dlat), dfree(dkpe), dfree(dtab), dfree(dnctx);
  free(src), free(dst), free(ref), free(sidx), free(didx), free(rows), free(w), free(y), free(yg);
  free(slot), free(pool), free(poolg), free(lat), free(kpe), free(tables), free(nctx);
}

/* row_pick at the LM-head shape (vocabulary 129280) against the CPU backend: the
 * same ids (ties included), logprobs within 1e-6. */
static void test_row_pick(void **state) {
  (void)state;
  const int64_t m = 37, n = 129280;
  const size_t bytes = (size_t)(m * n) * 4;
  float *x = xmalloc(bytes), lp[37], lp_ref[37];
  int32_t ids[37], ids_ref[37];
  fill(x, (size_t)(m * n), 8.0f);
  x[0 * n + 5] = x[0 * n + 90000] = 20.0f; /* a tie across threads of one block */
  x[1 * n + 1025] = x[1 * n + 1] = 20.0f;   /* a tie inside one thread's stride */
  x[2 * n + n - 1] = 20.0f;
  float *dx = dup_dev(x, bytes);
  int32_t *dout = dalloc((size_t)m * 8);
  poison(dout, (size_t)m * 8);
  assert_int_equal(g_gpu->vt->row_pick(g_gpu, dx, m, n, dout, (float *)(dout + m)), EPIC_OK);
  fetch(ids, dout, (size_t)m * 4);
  fetch(lp, dout + m, (size_t)m * 4);
  assert_int_equal(g_cpu->vt->row_pick(g_cpu, x, m, n, ids_ref, lp_ref), EPIC_OK);
  assert_int_equal(ids[0], 5);
  assert_int_equal(ids[1], 1);
  assert_int_equal(ids[2], n - 1);
  double worst = 0;
  for (int64_t i = 0; i < m; i++) {
    assert_int_equal(ids[i], ids_ref[i]);
    const double d = fabs((double)lp[i] - (double)lp_ref[i]);
    assert_true(isfinite(lp[i]));
    if (d > worst)
      worst = d;
  }
  check_err("row_pick 37 x 129280 logprob abs err", worst, 1e-6);
  dfree(dx);
  dfree(dout);
  free(x);
}

/* row_draw against the CPU backend's (the C reference), bit for bit: rows at the LM-head
 * width and a short odd one, flat, tied (a 1/4 grid), masked and peaked, every kind of
 * cut, three random values per row, batches of 40 and of 5 rows (the kernel's two forms);
 * rows with temperature 0 keep the pick. */
static void test_row_draw(void **state) {
  (void)state;
  enum { M = 40, ROUNDS = 3 };
  const int64_t widths[] = {129280, 999};
  const float temps[] = {0.0f, 0.6f, 1.0f, 1.7f, 0.05f};
  const float tops[] = {1.0f, 0.95f, 0.5f, 1e-6f};
  const int32_t ks[] = {0, 1, 50, 1000, 129280, 0, 7};
  int64_t moved = 0, drawn = 0;
  for (size_t w = 0; w < sizeof widths / sizeof *widths; w++) {
    const int64_t n = widths[w];
    const size_t bytes = (size_t)(M * n) * 4;
    float *x = xmalloc(bytes), lp[M], lp_ref[M];
    int32_t ids[M], ids_ref[M], pick[M];
    epic_draw_params p[M];
    fill(x, (size_t)(M * n), 8.0f);
    for (int r = 0; r < M; r++) {
      float *xr = x + r * n;
      if (r % 4 == 1)
        for (int64_t j = 0; j < n; j++) xr[j] = floorf(xr[j]) / 4; /* ties */
      if (r % 4 == 2) {
        for (int64_t j = 0; j < n; j += 5) xr[j] = -INFINITY;
        xr[n / 3] = 30.0f;
        xr[n / 2] = 29.0f;
      }
    }
    float *dx = dup_dev(x, bytes);
    int32_t *dout = dalloc((size_t)M * 8);
    epic_draw_params *dp = dalloc(sizeof p);
    /* rounds of all M rows (a CTA per row), then of 5 (a cluster of CTAs per row) */
    for (int round = 0; round < 2 * ROUNDS; round++) {
      const int m = round < ROUNDS ? M : 5;
      for (int r = 0; r < m; r++)
        p[r] = (epic_draw_params){.temperature = temps[(r + round) % 5],
                                  .top_p = tops[(r / 5 + round) % 4],
                                  .top_k = ks[(r + 3 * round) % 7],
                                  .u = rng_u64()};
      assert_int_equal(g_gpu->vt->upload(g_gpu, dp, p, sizeof p), EPIC_OK);
      assert_int_equal(g_gpu->vt->row_pick(g_gpu, dx, m, n, dout, (float *)(dout + m)), EPIC_OK);
      fetch(pick, dout, (size_t)m * 4);
      assert_int_equal(g_gpu->vt->row_draw(g_gpu, dx, m, n, dp, dout, (float *)(dout + m)),
                       EPIC_OK);
      fetch(ids, dout, (size_t)m * 4);
      fetch(lp, dout + m, (size_t)m * 4);
      assert_int_equal(g_cpu->vt->row_pick(g_cpu, x, m, n, ids_ref, lp_ref), EPIC_OK);
      assert_int_equal(g_cpu->vt->row_draw(g_cpu, x, m, n, p, ids_ref, lp_ref), EPIC_OK);
      for (int r = 0; r < m; r++) {
        if (ids[r] != ids_ref[r])
          fail_msg("row_draw n %lld of %d rows, row %d round %d (t %g, top_p %g, top_k %d): "
                   "GPU %d, CPU %d",
                   (long long)n, m, r, round, (double)p[r].temperature, (double)p[r].top_p,
                   p[r].top_k, ids[r], ids_ref[r]);
        assert_true(fabsf(lp[r] - lp_ref[r]) <= 1e-6f * fmaxf(1.0f, fabsf(lp_ref[r])));
        if (p[r].temperature == 0.0f)
          assert_int_equal(ids[r], pick[r]);
        else
          drawn++;
        moved += ids[r] != pick[r];
      }
    }
    dfree(dx);
    dfree(dout);
    dfree(dp);
    free(x);
  }
  assert_true(moved > drawn / 4); /* the draws are not the greedy picks */
}

static void test_embed(void **state) {
  (void)state;
  static const epic_dtype dts[] = {EPIC_DT_BF16, EPIC_DT_F8E4M3, EPIC_DT_F32, EPIC_DT_F16};
  const int64_t rows = 1000, cols = 7168, m = 9;
  int32_t ids[9];
  for (int i = 0; i < 9; i++)
    ids[i] = (int32_t)(rng_u64() % (uint64_t)rows);
  ids[3] = (int32_t)(rows - 1);
  int32_t *dids = dup_dev(ids, sizeof ids);
  const size_t sz = (size_t)(m * cols) * 4;
  float *y = xmalloc(sz), *ref = xmalloc(sz), *dy = dalloc(sz);
  for (int k = 0; k < 4; k++) {
    tw t = tw_make(dts[k], rows, cols, 128, 128);
    poison(dy, sz);
    assert_int_equal(g_gpu->vt->embed(g_gpu, &t.d, dids, m, dy), EPIC_OK);
    fetch(y, dy, sz);
    assert_int_equal(g_cpu->vt->embed(g_cpu, &t.h, ids, m, ref), EPIC_OK);
    /* dequantisation is exact on both sides: bit-identical rows */
    if (memcmp(y, ref, sz) != 0)
      fail_msg("embed %s: rows differ from the CPU backend", epic_dtype_name(dts[k]));
    printf("#   embed %-8s bit-identical\n", epic_dtype_name(dts[k]));
    if (k == 0) { /* an id outside the table: NaN rows, reported at the next download */
      int32_t bad[2] = {5, (int32_t)rows};
      int32_t *dbad = dup_dev(bad, sizeof bad);
      assert_int_equal(g_gpu->vt->embed(g_gpu, &t.d, dbad, 2, dy), EPIC_OK);
      assert_int_equal(g_gpu->vt->download(g_gpu, y, dy, (size_t)(2 * cols) * 4), EPIC_ERR_INVALID);
      assert_true(isnan(y[cols]) && !isnan(y[0]));
      assert_int_equal(epic_ops_cuda_sync(g_gpu), EPIC_OK); /* reported once */
      dfree(dbad);
    }
    tw_free(&t);
  }
  dfree(dids);
  dfree(dy);
  free(y);
  free(ref);
}

/* ------------------------------------------------------------------ router */

static void check_route(const epic_router_params *p, int64_t m, int ties, const char *what) {
  const int64_t ne = p->n_experts, k = p->top_k;
  float *lg = xmalloc((size_t)(m * ne) * 4), *w = xmalloc((size_t)(m * k) * 4);
  float *rw = xmalloc((size_t)(m * k) * 4);
  int32_t *idx = xmalloc((size_t)(m * k) * 4), *ridx = xmalloc((size_t)(m * k) * 4);
  for (int64_t i = 0; i < m * ne; i++)
    lg[i] = ties ? (float)(rng_u64() % 3) - 1.0f : 4.0f * rng_f();
  if (ties)
    for (int64_t e = 0; e < ne; e++)
      lg[e] = 0.5f;
  epic_router_params dp = *p;
  float *dbias = p->bias ? dup_dev(p->bias, (size_t)ne * 4) : NULL;
  dp.bias = dbias;
  float *dlg = dup_dev(lg, (size_t)(m * ne) * 4), *dw = dalloc((size_t)(m * k) * 4);
  int32_t *didx = dalloc((size_t)(m * k) * 4);
  poison(dw, (size_t)(m * k) * 4);
  poison(didx, (size_t)(m * k) * 4);
  assert_int_equal(g_gpu->vt->route(g_gpu, dlg, m, &dp, didx, dw), EPIC_OK);
  fetch(idx, didx, (size_t)(m * k) * 4);
  fetch(w, dw, (size_t)(m * k) * 4);
  assert_int_equal(g_cpu->vt->route(g_cpu, lg, m, p, ridx, rw), EPIC_OK);
  for (int64_t i = 0; i < m * k; i++)
    if (idx[i] != ridx[i])
      fail_msg("%s: token %lld slot %lld: expert %d, CPU %d", what, (long long)(i / k),
               (long long)(i % k), idx[i], ridx[i]);
  check_err(what, rel_err2d(w, 1, rw, 1, 1, m * k), 1e-6);
  if (dbias)
    dfree(dbias);
  dfree(dlg);
  dfree(dw);
  dfree(didx);
  free(lg);
  free(w);
  free(rw);
  free(idx);
  free(ridx);
}

static void test_route(void **state) {
  (void)state;
  float bias[256], tie_bias[256];
  for (int e = 0; e < 256; e++) {
    bias[e] = 0.5f * rng_f();
    tie_bias[e] = (float)(e % 4) * 0.25f - 0.5f;
  }
  for (int ties = 0; ties < 2; ties++)
    for (int scoring = 0; scoring < 2; scoring++)
      for (int nb = 0; nb < 3; nb++) {
        const float *bp = nb == 0 ? NULL : nb == 1 ? bias : tie_bias;
        char what[96];
        snprintf(what, sizeof what, "route V3 (%s, bias %d, ties %d)",
                 scoring ? "softmax" : "sigmoid", nb, ties);
        const epic_router_params v3 = {.n_experts = 256,
                                       .top_k = 8,
                                       .n_group = 8,
                                       .topk_group = 4,
                                       .scoring = scoring,
                                       .norm_topk_prob = 1,
                                       .routed_scaling_factor = 2.5f,
                                       .bias = bp};
        check_route(&v3, 301, ties, what);
        const epic_router_params flat = {.n_experts = 64,
                                         .top_k = 6,
                                         .n_group = 1,
                                         .topk_group = 1,
                                         .scoring = scoring,
                                         .norm_topk_prob = 0,
                                         .routed_scaling_factor = 1.0f,
                                         .bias = bp};
        check_route(&flat, 5, ties, "  flat 64 experts");
      }
  const epic_router_params bad = {.n_experts = 8, .top_k = 1, .n_group = 3, .topk_group = 1};
  float *d = dalloc(64);
  assert_int_equal(g_gpu->vt->route(g_gpu, d, 1, &bad, (int32_t *)d, d), EPIC_ERR_INVALID);
  dfree(d);
}

/* -------------------------------------------------------------- kv cache */

typedef struct {
  epic_kv_view h, d; /* host cache (CPU reference) and device copy, same block table */
  int32_t *table;
  int64_t n_pages;
} tcache;

/* A random permutation of the page ids 0..n-1. */
static int32_t *shuffled_pages(int64_t n) {
  int32_t *table = xmalloc((size_t)n * 4);
  for (int64_t i = 0; i < n; i++)
    table[i] = (int32_t)i;
  for (int64_t i = n - 1; i > 0; i--) {
    const int64_t j = (int64_t)(rng_u64() % (uint64_t)(i + 1));
    const int32_t t = table[i];
    table[i] = table[j];
    table[j] = t;
  }
  return table;
}

/* A cache with n_pages pages of random rows (so unwritten garbage is not zero) and a
 * shuffled block table over all of them. */
static tcache cache_make(int64_t n_tok, int64_t page, int64_t lora, int64_t rope,
                         int64_t extra_pages) {
  tcache c;
  memset(&c, 0, sizeof c);
  const int64_t width = lora + rope;
  c.n_pages = (n_tok + page - 1) / page + extra_pages;
  c.table = shuffled_pages(c.n_pages);
  const size_t pool = (size_t)(c.n_pages * page * width);
  c.h.pool = xmalloc(pool * 4);
  fill(c.h.pool, pool, 1.0f);
  c.h.page_size = page;
  c.h.width = width;
  c.h.lora = lora;
  c.h.block_table = c.table;
  c.h.n_ctx = n_tok;
  c.d = c.h;
  c.d.pool = dup_dev(c.h.pool, pool * 4);
  c.d.block_table = dup_dev(c.table, (size_t)c.n_pages * 4);
  return c;
}

static void cache_free(tcache *c) {
  free(c->h.pool);
  free(c->table);
  dfree(c->d.pool);
  dfree((void *)c->d.block_table);
}

/* kv_gather of rows [0, n) of view d into fresh (poisoned) device buffers dl / dk, and
 * their host copies hl [n][lora] / hk [n][rope]. */
typedef struct gathered {
  float *dl, *dk, *hl, *hk;
} gathered;

static gathered gather_rows(const epic_kv_view *d, int64_t n, int64_t lora, int64_t rope) {
  const size_t bl = (size_t)(n * lora) * 4, bk = (size_t)(n * rope) * 4;
  gathered g = {.dl = dalloc(bl), .dk = dalloc(bk), .hl = xmalloc(bl), .hk = xmalloc(bk)};
  poison(g.dl, bl);
  poison(g.dk, bk);
  assert_int_equal(g_gpu->vt->kv_gather(g_gpu, d, n, g.dl, g.dk), EPIC_OK);
  fetch(g.hl, g.dl, bl);
  fetch(g.hk, g.dk, bk);
  return g;
}

static void gathered_free(gathered *g) {
  dfree(g->dl);
  dfree(g->dk);
  free(g->hl);
  free(g->hk);
}

static void test_kv(void **state) {
  (void)state;
  const int64_t n = 300, lora = 512, rope = 64, width = lora + rope;
  tcache c = cache_make(n, 64, lora, rope, 2);
  const int64_t ldl = lora + 8, ldk = rope + 3;
  float *lat = xmalloc((size_t)(n * ldl) * 4), *kpe = xmalloc((size_t)(n * ldk) * 4);
  fill(lat, (size_t)(n * ldl), 1.0f);
  fill(kpe, (size_t)(n * ldk), 1.0f);
  float *dlat = dup_dev(lat, (size_t)(n * ldl) * 4), *dkpe = dup_dev(kpe, (size_t)(n * ldk) * 4);
  /* two chunks, strided sources */
  assert_int_equal(g_gpu->vt->kv_store(g_gpu, &c.d, 0, 100, dlat, ldl, dkpe, ldk), EPIC_OK);
  assert_int_equal(
      g_gpu->vt->kv_store(g_gpu, &c.d, 100, n - 100, dlat + 100 * ldl, ldl, dkpe + 100 * ldk, ldk),
      EPIC_OK);
  assert_int_equal(g_cpu->vt->kv_store(g_cpu, &c.h, 0, n, lat, ldl, kpe, ldk), EPIC_OK);
  const size_t pool = (size_t)(c.n_pages * 64 * width);
  float *got = xmalloc(pool * 4);
  fetch(got, c.d.pool, pool * 4);
  assert_memory_equal(got, c.h.pool, pool * 4); /* rows where the table says, rest untouched */
  gathered gr = gather_rows(&c.d, n, lora, rope);
  for (int64_t t = 0; t < n; t++) {
    assert_memory_equal(gr.hl + t * lora, lat + t * ldl, (size_t)lora * 4);
    assert_memory_equal(gr.hk + t * rope, kpe + t * ldk, (size_t)rope * 4);
  }
  printf("#   kv_store / kv_gather V3 rows, 64-row pages, shuffled table: exact\n");
  dfree(dlat);
  dfree(dkpe);
  gathered_free(&gr);
  free(lat);
  free(kpe);
  free(got);
  cache_free(&c);
}

/* --------------------------------------------------------------- attention */

/* The flash prefill kernel's operands are bf16 (2^-9 relative each) and so is P. */
#define MLA_PREFILL_BF16_TOL 1e-2

static void check_mla_naive(int64_t m, int64_t start, int64_t H, int64_t nope, int64_t rope,
                            int64_t v) {
  const int64_t n = start + m, dq = nope + rope, dkv = nope + v;
  const float scale = 1.7f / sqrtf((float)dq);
  const size_t sq = (size_t)(m * H * dq), skv = (size_t)(n * H * dkv), sk = (size_t)(n * rope);
  const size_t so = (size_t)(m * H * v);
  float *q = xmalloc(sq * 4), *kvb = xmalloc(skv * 4), *kpe = xmalloc(sk * 4);
  float *out = xmalloc(so * 4), *ref = xmalloc(so * 4);
  fill(q, sq, 2.0f);
  fill(kvb, skv, 1.0f);
  fill(kpe, sk, 1.0f);
  float *dq_ = dup_dev(q, sq * 4), *dkvb = dup_dev(kvb, skv * 4), *dkpe = dup_dev(kpe, sk * 4);
  float *dout = dalloc(so * 4);
  assert_int_equal(g_cpu->vt->mla_naive(g_cpu, q, kvb, kpe, m, start, H, nope, rope, v, scale, ref),
                   EPIC_OK);
  /* exact: fp32 GEMMs; fast: TF32 tensor cores (10-bit mantissa operands), or at the
   * DeepSeek-V3 head shape the flash kernel (kern_mla_prefill.cu: bf16 queries, keys,
   * values and probabilities, fp32 accumulation) */
  const int flash = nope == 128 && rope == 64 && v == 128;
  /* runs: exact; then fast, on the flash kernel's wgmma and mma.sync variants in turn */
  for (int run = 0; run < (flash ? 3 : 2); run++) {
    const int prec = run == 0;
    assert_int_equal(epic_ops_cuda_set_mla_precision(g_gpu, (epic_cuda_mla_precision)prec),
                     EPIC_OK);
    assert_int_equal(epic_ops_cuda_set_mla_prefill_kernel(
                         g_gpu, run == 2 ? EPIC_CUDA_MLA_PREFILL_MMA : EPIC_CUDA_MLA_PREFILL_WGMMA),
                     EPIC_OK);
    poison(dout, so * 4);
    assert_int_equal(
        g_gpu->vt->mla_naive(g_gpu, dq_, dkvb, dkpe, m, start, H, nope, rope, v, scale, dout),
        EPIC_OK);
    fetch(out, dout, so * 4);
    char what[128];
    snprintf(what, sizeof what, "mla_naive %s m=%lld start=%lld H=%lld nope=%lld rope=%lld v=%lld",
             prec ? "exact" : !flash ? "tf32" : run == 1 ? "flash-wgmma" : "flash-mma",
             (long long)m, (long long)start, (long long)H, (long long)nope, (long long)rope,
             (long long)v);
    check_err(what, rel_err2d(out, 1, ref, 1, 1, (int64_t)so),
              prec ? 1e-5 : flash ? MLA_PREFILL_BF16_TOL : 5e-3);
  }
  assert_int_equal(epic_ops_cuda_set_mla_prefill_kernel(g_gpu, EPIC_CUDA_MLA_PREFILL_WGMMA),
                   EPIC_OK);
  dfree(dq_);
  dfree(dkvb);
  dfree(dkpe);
  dfree(dout);
  free(q);
  free(kvb);
  free(kpe);
  free(out);
  free(ref);
}

/* off: ctx written at an offset of `off` floats (callers' slices need not be aligned). */
static void check_mla_absorbed(int64_t m, int64_t start, int64_t H, int64_t lora, int64_t rope,
                               int64_t page, int64_t off) {
  const int64_t n = start + m;
  const float scale = 1.0f / sqrtf(192.0f);
  tcache c = cache_make(n, page, lora, rope, 1);
  const size_t sa = (size_t)(m * H * lora), sp = (size_t)(m * H * rope);
  float *qa = xmalloc(sa * 4), *qp = xmalloc(sp ? sp * 4 : 4), *ctx = xmalloc(sa * 4);
  float *ref = xmalloc(sa * 4);
  fill(qa, sa, 1.0f);
  fill(qp, sp, 1.0f);
  float *dqa = dup_dev(qa, sa * 4), *dqp = sp ? dup_dev(qp, sp * 4) : NULL;
  float *dbuf = dalloc((sa + (size_t)off) * 4), *dctx = dbuf + off;
  assert_int_equal(
      g_cpu->vt->mla_absorbed(g_cpu, &c.h, qa, sp ? qp : NULL, m, start, H, scale, ref), EPIC_OK);
  for (int prec = 1; prec >= 0; prec--) {
    assert_int_equal(epic_ops_cuda_set_mla_precision(g_gpu, (epic_cuda_mla_precision)prec),
                     EPIC_OK);
    poison(dctx, sa * 4);
    assert_int_equal(g_gpu->vt->mla_absorbed(g_gpu, &c.d, dqa, dqp, m, start, H, scale, dctx),
                     EPIC_OK);
    fetch(ctx, dctx, sa * 4);
    char what[128];
    snprintf(what, sizeof what, "mla_absorbed %s m=%lld start=%lld H=%lld lora=%lld rope=%lld%s",
             prec ? "exact" : "tf32", (long long)m, (long long)start, (long long)H, (long long)lora,
             (long long)rope, off ? " ctx+1" : "");
    /* TF32 in the fast mode: the decode kernel, and the GEMMs beyond its run */
    check_err(what, rel_err2d(ctx, 1, ref, 1, 1, (int64_t)sa), prec ? 1e-5 : 5e-3);
  }
  c.d.n_ctx = n - 1;
  assert_int_equal(g_gpu->vt->mla_absorbed(g_gpu, &c.d, dqa, dqp, m, start, H, scale, dctx),
                   EPIC_ERR_INVALID);
  dfree(dqa);
  if (dqp)
    dfree(dqp);
  dfree(dbuf);
  free(qa);
  free(qp);
  free(ctx);
  free(ref);
  cache_free(&c);
}

static void check_mla_batch(int64_t n_seq, const int32_t *lens, int64_t H, int64_t lora,
                            int64_t rope, int64_t page, int64_t off) {
  const int64_t width = lora + rope;
  int64_t max_len = 0;
  for (int64_t s = 0; s < n_seq; s++)
    max_len = lens[s] > max_len ? lens[s] : max_len;
  const int64_t stride = (max_len + page - 1) / page + 1;
  /* one pool, every sequence's pages scattered through it */
  const int64_t n_pages = n_seq * stride;
  tcache c = cache_make(n_pages * page, page, lora, rope, 0);
  int32_t *tables = xmalloc((size_t)(n_seq * stride) * 4);
  for (int64_t i = 0; i < n_seq * stride; i++)
    tables[i] = c.table[i]; /* the shuffled permutation, cut into per-sequence rows */
  epic_kv_batch hb = {.pool = c.h.pool,
                      .page_size = page,
                      .width = width,
                      .lora = lora,
                      .block_tables = tables,
                      .table_stride = stride,
                      .n_ctx = lens,
                      .max_ctx = max_len};
  epic_kv_batch db = hb;
  db.pool = c.d.pool;
  db.block_tables = dup_dev(tables, (size_t)(n_seq * stride) * 4);
  db.n_ctx = dup_dev(lens, (size_t)n_seq * 4);
  const size_t sa = (size_t)(n_seq * H * lora), sp = (size_t)(n_seq * H * rope);
  float *qa = xmalloc(sa * 4), *qp = xmalloc(sp * 4), *ctx = xmalloc(sa * 4),
        *ref = xmalloc(sa * 4);
  fill(qa, sa, 1.0f);
  fill(qp, sp, 1.0f);
  float *dqa = dup_dev(qa, sa * 4), *dqp = dup_dev(qp, sp * 4);
  float *dbuf = dalloc((sa + (size_t)off) * 4), *dctx = dbuf + off;
  const float scale = 1.0f / sqrtf(192.0f);
  assert_int_equal(g_cpu->vt->mla_absorbed_batch(g_cpu, &hb, n_seq, qa, qp, H, scale, ref),
                   EPIC_OK);
  for (int prec = 1; prec >= 0; prec--) {
    assert_int_equal(epic_ops_cuda_set_mla_precision(g_gpu, (epic_cuda_mla_precision)prec),
                     EPIC_OK);
    poison(dctx, sa * 4);
    assert_int_equal(g_gpu->vt->mla_absorbed_batch(g_gpu, &db, n_seq, dqa, dqp, H, scale, dctx),
                     EPIC_OK);
    fetch(ctx, dctx, sa * 4);
    char what[128];
    snprintf(what, sizeof what, "mla_absorbed_batch %s n_seq=%lld max_len=%lld H=%lld%s",
             prec ? "exact" : "tf32", (long long)n_seq, (long long)max_len, (long long)H,
             off ? " ctx+1" : "");
    check_err(what, rel_err2d(ctx, 1, ref, 1, 1, (int64_t)sa), prec ? 1e-5 : 5e-3);
  }
  dfree((void *)db.block_tables);
  dfree((void *)db.n_ctx);
  dfree(dqa);
  dfree(dqp);
  dfree(dbuf);
  free(tables);
  free(qa);
  free(qp);
  free(ctx);
  free(ref);
  cache_free(&c);
}

static void test_mla(void **state) {
  (void)state;
  check_mla_naive(5, 0, 4, 16, 8, 12);
  check_mla_naive(7, 9, 4, 16, 8, 12);
  check_mla_naive(1, 20, 4, 16, 8, 12);
  check_mla_naive(70, 100, 3, 24, 8, 20);
  check_mla_naive(33, 300, 128, 128, 64, 128); /* V3 heads, prefill chunk with context */
  /* V3 heads on the flash kernel: whole tiles, ragged tiles over a context, one query
   * over many key tiles, a context that is not a tile multiple */
  check_mla_naive(128, 0, 16, 128, 64, 128);
  check_mla_naive(100, 37, 8, 128, 64, 128);
  check_mla_naive(1, 700, 4, 128, 64, 128);
  check_mla_naive(70, 64, 3, 128, 64, 128);
  check_mla_naive(300, 200, 2, 128, 64, 128); /* many tiles before and across the diagonal */
  check_mla_absorbed(5, 0, 4, 32, 8, 3, 0);
  check_mla_absorbed(1, 20, 4, 32, 8, 3, 0);
  check_mla_absorbed(1, 0, 3, 16, 4, 3, 0);
  check_mla_absorbed(40, 3, 2, 24, 8, 5, 0);
  check_mla_absorbed(1, 999, 128, 512, 64, 64, 0);  /* V3 decode, 1000 keys */
  check_mla_absorbed(1, 4095, 128, 512, 64, 64, 1); /* V3 decode, split context, odd ctx */
  check_mla_absorbed(5, 700, 128, 512, 64, 64, 0);  /* several query tokens, decode kernel */
  check_mla_absorbed(12, 200, 128, 512, 64, 64, 0); /* GEMM path */
  check_mla_absorbed(3, 50, 70, 512, 64, 64, 0);    /* head count not a multiple of 64 */
  check_mla_absorbed(1, 300, 128, 512, 64, 16, 0);  /* V3 rows, page = tile */
  check_mla_absorbed(2, 100, 128, 512, 64, 3, 0);   /* V3 rows, pages that split tiles */
  const int32_t lens[6] = {1, 64, 65, 700, 1500, 3001};
  check_mla_batch(6, lens, 128, 512, 64, 64, 0);
  const int32_t lens2[3] = {5, 17, 2};
  check_mla_batch(3, lens2, 4, 32, 8, 3, 0);
  int32_t lens3[70]; /* enough sequences for one split each, odd ctx */
  for (int i = 0; i < 70; i++)
    lens3[i] = 1 + (int32_t)(rng_u64() % 300);
  check_mla_batch(70, lens3, 128, 512, 64, 64, 1);
}

/* ------------------------------------------------------- bf16 latent cache */

/* bf16 cache rows: the device pool (BF16 view) and, for the CPU reference, the same rows
 * widened to fp32 (F32 view); random rows, shuffled table over all pages. */
typedef struct {
  epic_kv_view h, d;
  uint16_t *h16;
  int32_t *table;
  int64_t n_pages;
  size_t n; /* pool elements */
} bcache;

static bcache bcache_make(int64_t n_tok, int64_t page, int64_t lora, int64_t rope,
                          int64_t extra_pages) {
  bcache c;
  memset(&c, 0, sizeof c);
  const int64_t width = lora + rope;
  c.n_pages = (n_tok + page - 1) / page + extra_pages;
  c.table = shuffled_pages(c.n_pages);
  c.n = (size_t)(c.n_pages * page * width);
  c.h16 = xmalloc(c.n * 2);
  float *wide = xmalloc(c.n * 4);
  for (size_t i = 0; i < c.n; i++) {
    c.h16[i] = epic_f32_to_bf16(rng_f());
    wide[i] = epic_bf16_to_f32(c.h16[i]);
  }
  c.h = (epic_kv_view){.pool = wide,
                       .page_size = page,
                       .width = width,
                       .lora = lora,
                       .block_table = c.table,
                       .n_ctx = n_tok,
                       .dtype = EPIC_KV_F32};
  c.d = c.h;
  c.d.pool = dup_dev(c.h16, c.n * 2);
  c.d.block_table = dup_dev(c.table, (size_t)c.n_pages * 4);
  c.d.dtype = EPIC_KV_BF16;
  return c;
}

static void bcache_free(bcache *c) {
  free(c->h.pool);
  free(c->h16);
  free(c->table);
  dfree(c->d.pool);
  dfree((void *)c->d.block_table);
}

/* kv_dtype follows the MLA precision; bf16 kv_store / kv_store_batch write exactly
 * epic_f32_to_bf16 of each value where the table says and nothing else, kv_gather
 * returns exactly the widened values; pages of 64 and 5 rows; unknown types refused. */
static void test_kv_bf16(void **state) {
  (void)state;
  assert_int_equal(epic_ops_cuda_set_mla_precision(g_gpu, EPIC_CUDA_MLA_EXACT), EPIC_OK);
  assert_int_equal(g_gpu->vt->kv_dtype(g_gpu), EPIC_KV_F32);
  assert_int_equal(epic_ops_cuda_set_mla_precision(g_gpu, EPIC_CUDA_MLA_TF32), EPIC_OK);
  assert_int_equal(g_gpu->vt->kv_dtype(g_gpu), EPIC_KV_BF16);
  const int64_t n = 300, lora = 512, rope = 64, width = lora + rope, ldl = lora + 8,
                ldk = rope + 3;
  const int64_t pages[2] = {64, 5};
  for (int pi = 0; pi < 2; pi++) {
    const int64_t page = pages[pi];
    bcache c = bcache_make(n, page, lora, rope, 2);
    float *lat = xmalloc((size_t)(n * ldl) * 4), *kpe = xmalloc((size_t)(n * ldk) * 4);
    fill(lat, (size_t)(n * ldl), 3.0f);
    fill(kpe, (size_t)(n * ldk), 3.0f);
    float *dlat = dup_dev(lat, (size_t)(n * ldl) * 4), *dkpe = dup_dev(kpe, (size_t)(n * ldk) * 4);
    assert_int_equal(g_gpu->vt->kv_store(g_gpu, &c.d, 0, 100, dlat, ldl, dkpe, ldk), EPIC_OK);
    assert_int_equal(g_gpu->vt->kv_store(g_gpu, &c.d, 100, n - 100, dlat + 100 * ldl, ldl,
                                         dkpe + 100 * ldk, ldk),
                     EPIC_OK);
    for (int64_t t = 0; t < n; t++) { /* the expected pool: written rows, the rest untouched */
      uint16_t *row = c.h16 + (c.table[t / page] * page + t % page) * width;
      for (int64_t j = 0; j < width; j++)
        row[j] = epic_f32_to_bf16(j < lora ? lat[t * ldl + j] : kpe[t * ldk + j - lora]);
    }
    uint16_t *got = xmalloc(c.n * 2);
    fetch(got, c.d.pool, c.n * 2);
    assert_memory_equal(got, c.h16, c.n * 2);
    gathered gr = gather_rows(&c.d, n, lora, rope);
    for (int64_t t = 0; t < n; t++) {
      for (int64_t j = 0; j < lora; j++)
        if (gr.hl[t * lora + j] != bf16_round(lat[t * ldl + j]))
          fail_msg("kv_gather bf16: token %lld latent %lld: %g, want %g", (long long)t,
                   (long long)j, gr.hl[t * lora + j], bf16_round(lat[t * ldl + j]));
      for (int64_t j = 0; j < rope; j++)
        if (gr.hk[t * rope + j] != bf16_round(kpe[t * ldk + j]))
          fail_msg("kv_gather bf16: token %lld kpe %lld", (long long)t, (long long)j);
    }
    printf("#   kv_store / kv_gather bf16 V3 rows, %lld-row pages, shuffled table: exact\n",
           (long long)page);
    epic_kv_view bad = c.d;
    bad.dtype = (epic_kv_dtype)7;
    assert_int_equal(g_gpu->vt->kv_store(g_gpu, &bad, 0, 1, dlat, ldl, dkpe, ldk),
                     EPIC_ERR_UNSUPPORTED);
    assert_int_equal(g_gpu->vt->kv_gather(g_gpu, &bad, 1, gr.dl, gr.dk), EPIC_ERR_UNSUPPORTED);
    dfree(dlat), dfree(dkpe);
    gathered_free(&gr);
    free(lat), free(kpe), free(got);
    bcache_free(&c);
  }

  /* kv_store_batch: one row per sequence at n_ctx - 1 (distinct rows: a page permutation). */
  const int64_t ps = 64, ns = 40, stride = 4, npg = ns * stride;
  const size_t pool_n = (size_t)(npg * ps * width);
  uint16_t *pool = xmalloc(pool_n * 2), *poolg = xmalloc(pool_n * 2);
  for (size_t i = 0; i < pool_n; i++)
    pool[i] = epic_f32_to_bf16(rng_f());
  float *lat = xmalloc((size_t)(ns * 600) * 4), *kpe = xmalloc((size_t)(ns * 70) * 4);
  int32_t *tables = xmalloc((size_t)(ns * stride) * 4), *nctx = xmalloc((size_t)ns * 4);
  fill(lat, (size_t)(ns * 600), 1.0f);
  fill(kpe, (size_t)(ns * 70), 1.0f);
  for (int64_t s = 0; s < ns; s++) {
    for (int64_t p = 0; p < stride; p++)
      tables[s * stride + p] = (int32_t)(((s * stride + p) * 7) % npg);
    nctx[s] = (int32_t)(1 + (s * 37) % (stride * ps));
  }
  uint16_t *dpool = dup_dev(pool, pool_n * 2);
  float *dlat = dup_dev(lat, (size_t)(ns * 600) * 4), *dkpe = dup_dev(kpe, (size_t)(ns * 70) * 4);
  int32_t *dtab = dup_dev(tables, (size_t)(ns * stride) * 4), *dnctx = dup_dev(nctx, (size_t)ns * 4);
  epic_kv_batch kb = {.pool = dpool, .page_size = ps, .width = width, .lora = lora,
                      .block_tables = dtab, .table_stride = stride, .n_ctx = dnctx,
                      .max_ctx = stride * ps, .dtype = EPIC_KV_BF16};
  assert_int_equal(g_gpu->vt->kv_store_batch(g_gpu, &kb, ns, dlat, 600, dkpe, 70), EPIC_OK);
  fetch(poolg, dpool, pool_n * 2);
  for (int64_t s = 0; s < ns; s++) {
    const int64_t t = nctx[s] - 1;
    uint16_t *row = pool + (tables[s * stride + t / ps] * ps + t % ps) * width;
    for (int64_t j = 0; j < width; j++)
      row[j] = epic_f32_to_bf16(j < lora ? lat[s * 600 + j] : kpe[s * 70 + j - lora]);
  }
  assert_memory_equal(poolg, pool, pool_n * 2);
  printf("#   kv_store_batch bf16 V3 rows, 40 sequences: exact\n");
  kb.dtype = (epic_kv_dtype)7;
  assert_int_equal(g_gpu->vt->kv_store_batch(g_gpu, &kb, ns, dlat, 600, dkpe, 70),
                   EPIC_ERR_UNSUPPORTED);
  dfree(dpool), dfree(dlat), dfree(dkpe), dfree(dtab), dfree(dnctx);
  free(pool), free(poolg), free(lat), free(kpe), free(tables), free(nctx);
}

/* Limit for the bf16 decode kernel against the CPU reference on the same bf16 rows and
 * bf16-rounded queries: what remains is the probabilities' rounding to bf16 for P.V
 * (relative 2^-9 each, about 1e-3 on a sum of many) and fp32 summation order. */
#define BF16_MLA_TOL 3e-3

static const char *const bf16_kernel_names[6] = {"mma",   "wgmma-s", "wgmma-o",
                                                 "wgmma", "seesaw",  "auto"};

/* mla_absorbed_batch over a bf16 cache, every kernel variant, against the CPU reference
 * on the widened rows with rounded queries; the default variant twice, bit for bit. */
static void check_mla_bf16_batch(int64_t n_seq, const int32_t *lens, int64_t H, int64_t page,
                                 int64_t off) {
  const int64_t lora = 512, rope = 64, width = lora + rope;
  int64_t max_len = 0;
  for (int64_t s = 0; s < n_seq; s++)
    max_len = lens[s] > max_len ? lens[s] : max_len;
  const int64_t stride = (max_len + page - 1) / page + 1;
  bcache c = bcache_make(n_seq * stride * page, page, lora, rope, 0);
  epic_kv_batch hb = {.pool = c.h.pool,
                      .page_size = page,
                      .width = width,
                      .lora = lora,
                      .block_tables = c.table, /* the permutation cut into rows of stride */
                      .table_stride = stride,
                      .n_ctx = lens,
                      .max_ctx = max_len,
                      .dtype = EPIC_KV_F32};
  epic_kv_batch db = hb;
  db.pool = c.d.pool;
  db.block_tables = c.d.block_table;
  db.n_ctx = dup_dev(lens, (size_t)n_seq * 4);
  db.dtype = EPIC_KV_BF16;
  const size_t sa = (size_t)(n_seq * H * lora), sp = (size_t)(n_seq * H * rope);
  float *qa = xmalloc(sa * 4), *qp = xmalloc(sp * 4), *ctx = xmalloc(sa * 4),
        *ctx2 = xmalloc(sa * 4), *ctxd = xmalloc(sa * 4), *ref = xmalloc(sa * 4);
  fill(qa, sa, 1.0f);
  fill(qp, sp, 1.0f);
  float *qar = rounded_copy(qa, sa), *qpr = rounded_copy(qp, sp);
  float *dqa = dup_dev(qa, sa * 4), *dqp = dup_dev(qp, sp * 4);
  float *dbuf = dalloc((sa + (size_t)off) * 4), *dctx = dbuf + off;
  const float scale = 1.0f / sqrtf(192.0f);
  assert_int_equal(g_cpu->vt->mla_absorbed_batch(g_cpu, &hb, n_seq, qar, qpr, H, scale, ref),
                   EPIC_OK);
  int bad = 0;
  for (int k = 0; k <= EPIC_CUDA_MLA_BF16_AUTO; k++) {
    assert_int_equal(epic_ops_cuda_set_mla_bf16_kernel(g_gpu, (epic_cuda_mla_bf16_kernel)k),
                     EPIC_OK);
    poison(dctx, sa * 4);
    assert_int_equal(g_gpu->vt->mla_absorbed_batch(g_gpu, &db, n_seq, dqa, dqp, H, scale, dctx),
                     EPIC_OK);
    fetch(ctx, dctx, sa * 4);
    if (k == EPIC_CUDA_MLA_BF16_DEFAULT)
      memcpy(ctxd, ctx, sa * 4);
    const double err = rel_err2d(ctx, 1, ref, 1, 1, (int64_t)sa);
    printf("#   mla_absorbed_batch bf16 %-7s n_seq=%lld max_len=%lld H=%lld page=%lld%s rel err "
           "%.3e (limit %.0e)\n",
           bf16_kernel_names[k], (long long)n_seq, (long long)max_len, (long long)H,
           (long long)page, off ? " ctx+1" : "", err, BF16_MLA_TOL);
    bad += !(err <= BF16_MLA_TOL);
  }
  if (bad)
    fail_msg("mla_absorbed_batch bf16: %d kernel variant(s) above %.0e", bad, BF16_MLA_TOL);
  assert_int_equal(epic_ops_cuda_set_mla_bf16_kernel(g_gpu, EPIC_CUDA_MLA_BF16_DEFAULT), EPIC_OK);
  assert_int_equal(g_gpu->vt->mla_absorbed_batch(g_gpu, &db, n_seq, dqa, dqp, H, scale, dctx),
                   EPIC_OK);
  fetch(ctx2, dctx, sa * 4);
  assert_memory_equal(ctx2, ctxd, sa * 4); /* deterministic: same bits on a second run */
  dfree((void *)db.n_ctx), dfree(dqa), dfree(dqp), dfree(dbuf);
  free(qa), free(qp), free(qar), free(qpr), free(ctx), free(ctx2), free(ctxd), free(ref);
  bcache_free(&c);
}

/* mla_absorbed (m query tokens of one sequence) over a bf16 cache: the decode kernel for
 * m <= 8 V3 rows (every variant; reference with rounded queries), the TF32 GEMM path on
 * gathered rows otherwise (reference with the queries as they are, 5e-3). */
static void check_mla_bf16_absorbed(int64_t m, int64_t start, int64_t H, int64_t lora,
                                    int64_t rope, int64_t page, float scale) {
  const int64_t n = start + m;
  const int kernel = m <= 8 && lora == 512 && rope == 64;
  bcache c = bcache_make(n, page, lora, rope, 1);
  const size_t sa = (size_t)(m * H * lora), sp = (size_t)(m * H * rope);
  float *qa = xmalloc(sa * 4), *qp = xmalloc(sp ? sp * 4 : 4), *ctx = xmalloc(sa * 4);
  float *ref = xmalloc(sa * 4);
  fill(qa, sa, 1.0f);
  fill(qp, sp, 1.0f);
  float *qar = kernel ? rounded_copy(qa, sa) : qa, *qpr = kernel ? rounded_copy(qp, sp) : qp;
  float *dqa = dup_dev(qa, sa * 4), *dqp = sp ? dup_dev(qp, sp * 4) : NULL, *dctx = dalloc(sa * 4);
  assert_int_equal(
      g_cpu->vt->mla_absorbed(g_cpu, &c.h, qar, sp ? qpr : NULL, m, start, H, scale, ref), EPIC_OK);
  const double tol = kernel ? BF16_MLA_TOL : 5e-3; /* the GEMM path: TF32 in the fast mode */
  int bad = 0;
  for (int k = kernel ? 0 : 3; k <= (kernel ? EPIC_CUDA_MLA_BF16_AUTO : 3); k++) {
    assert_int_equal(epic_ops_cuda_set_mla_bf16_kernel(g_gpu, (epic_cuda_mla_bf16_kernel)k),
                     EPIC_OK);
    poison(dctx, sa * 4);
    assert_int_equal(g_gpu->vt->mla_absorbed(g_gpu, &c.d, dqa, dqp, m, start, H, scale, dctx),
                     EPIC_OK);
    fetch(ctx, dctx, sa * 4);
    const double err = rel_err2d(ctx, 1, ref, 1, 1, (int64_t)sa);
    printf("#   mla_absorbed bf16 %-7s m=%lld start=%lld H=%lld lora=%lld page=%lld scale=%.3f rel "
           "err %.3e (limit %.0e)\n",
           kernel ? bf16_kernel_names[k] : "gemm", (long long)m, (long long)start, (long long)H,
           (long long)lora, (long long)page, scale, err, tol);
    bad += !(err <= tol);
  }
  assert_int_equal(epic_ops_cuda_set_mla_bf16_kernel(g_gpu, EPIC_CUDA_MLA_BF16_DEFAULT), EPIC_OK);
  if (bad)
    fail_msg("mla_absorbed bf16: %d kernel variant(s) above %.0e", bad, tol);
  dfree(dqa), dfree(dctx);
  if (dqp)
    dfree(dqp);
  if (kernel)
    free(qar), free(qpr);
  free(qa), free(qp), free(ctx), free(ref);
  bcache_free(&c);
}

static void test_mla_bf16(void **state) {
  (void)state;
  const int32_t lens[6] = {1, 64, 65, 700, 1500, 3001}; /* one key; few CTAs: several splits */
  check_mla_bf16_batch(6, lens, 128, 64, 0);
  const int32_t lens2[5] = {5, 17, 2, 333, 130}; /* pages of 5 rows: tiles straddle pages */
  check_mla_bf16_batch(5, lens2, 70, 5, 1);      /* 70 heads: a partial head group */
  const int32_t lens3[4] = {129, 1, 63, 1000};
  check_mla_bf16_batch(4, lens3, 16, 3, 0); /* 3-row pages, 16 heads */
  check_mla_bf16_batch(4, lens3, 128, 16, 0);
  check_mla_bf16_batch(4, lens3, 128, 100, 1); /* pages larger than a tile, not a power of 2 */
  int32_t lens4[80]; /* one split per sequence, odd lengths */
  for (int i = 0; i < 80; i++)
    lens4[i] = 1 + 2 * (int32_t)(rng_u64() % 400);
  check_mla_bf16_batch(80, lens4, 128, 64, 0);
  const float sc = 1.0f / sqrtf(192.0f);
  check_mla_bf16_absorbed(1, 999, 128, 512, 64, 64, sc);
  check_mla_bf16_absorbed(1, 4094, 128, 512, 64, 64, sc); /* split context, odd length */
  check_mla_bf16_absorbed(5, 700, 128, 512, 64, 7, sc);   /* several query tokens, kernel */
  check_mla_bf16_absorbed(3, 50, 70, 512, 64, 64, sc);
  check_mla_bf16_absorbed(2, 130, 128, 512, 64, 64, -sc);  /* the scale's sign is honoured */
  check_mla_bf16_absorbed(1, 70, 128, 512, 64, 64, 0.0f);  /* uniform weights, no NaN */
  check_mla_bf16_absorbed(12, 200, 128, 512, 64, 64, sc); /* GEMM path on gathered rows */
  check_mla_bf16_absorbed(2, 40, 4, 32, 8, 3, sc);        /* other widths: GEMM path */
  /* fp32 views still take the TF32 kernel after the switch (cache types are per view). */
  check_mla_absorbed(1, 300, 128, 512, 64, 64, 0);
}

/* Relative L2 error of head_gemm outputs y against ref ([m][H][n] at strides ldyt, ldyh;
 * a non-finite output counts as infinite). */
/* ----------------------------------------------------- exact row invariance */

/* Rows [r0, r0 + n) of an m-row call, run alone (a call of n rows from row r0), equal the
 * whole call's bit for bit. run(r0, n, out) writes the n rows' results to out at the same
 * row offsets and strides as the whole call's. */
typedef void (*rows_run)(void *ctx, int64_t r0, int64_t n, float *dy);
static void check_rows_alone(const char *what, void *ctx, rows_run run, int64_t m, float *dy,
                             size_t row_bytes, size_t row_floats, const float *whole) {
  const int64_t parts[][2] = {{0, 1}, {m / 2, 1}, {m - 1, 1}, {1, m - 1 > 20 ? 20 : m - 1}};
  float *got = xmalloc((size_t)m * row_bytes);
  for (int p = 0; p < 4; p++) {
    const int64_t r0 = parts[p][0], n = parts[p][1];
    poison(dy, (size_t)m * row_bytes);
    run(ctx, r0, n, dy);
    fetch(got, dy, (size_t)m * row_bytes);
    for (int64_t r = r0; r < r0 + n; r++)
      if (memcmp(got + (size_t)r * row_floats, whole + (size_t)r * row_floats, row_bytes))
        fail_msg("%s: row %lld differs run with %lld rows from row %lld", what, (long long)r,
                 (long long)n, (long long)r0);
  }
  printf("#   %s: rows alone and in part equal the whole call bit for bit\n", what);
  free(got);
}

typedef struct {
  const float *dx;
  int64_t ldx, ldy;
  const epic_weight *w;
} mm_ctx;
static void mm_run(void *ctx, int64_t r0, int64_t n, float *dy) {
  const mm_ctx *c = ctx;
  assert_int_equal(
      g_gpu->vt->matmul(g_gpu, c->dx + r0 * c->ldx, c->ldx, n, c->w, dy + r0 * c->ldy, c->ldy),
      EPIC_OK);
}

/* head_gemm (da fp32) or head_gemm_bf16 (bf16 set: da bf16) of tokens [r0, r0 + n). */
typedef struct {
  const float *dx;
  const void *da;
  int64_t ldxt, ldxh, H, lda, k, n, ldyt, ldyh;
  int trans, bf16;
} hg_ctx;
static void hg_run(void *ctx, int64_t r0, int64_t n, float *dy) {
  const hg_ctx *c = ctx;
  const float *x = c->dx + r0 * c->ldxt;
  float *y = dy + r0 * c->ldyt;
  if (c->bf16)
    assert_int_equal(g_gpu->vt->head_gemm_bf16(g_gpu, x, c->ldxt, c->ldxh, n, c->H, c->da, c->lda,
                                               c->k, c->n, c->trans, y, c->ldyt, c->ldyh),
                     EPIC_OK);
  else
    assert_int_equal(g_gpu->vt->head_gemm(g_gpu, x, c->ldxt, c->ldxh, n, c->H, c->da, c->lda, c->k,
                                          c->n, c->trans, y, c->ldyt, c->ldyh),
                     EPIC_OK);
}

typedef struct {
  epic_kv_batch db;
  const int32_t *lens;
  const float *dqa, *dqp;
  int64_t H, lora, rope;
} mla_ctx;
static void mla_run(void *ctx, int64_t r0, int64_t n, float *dy) {
  const mla_ctx *c = ctx;
  epic_kv_batch b = c->db;
  b.block_tables += r0 * b.table_stride;
  b.n_ctx += r0;
  b.max_ctx = 0;
  for (int64_t s = r0; s < r0 + n; s++)
    b.max_ctx = c->lens[s] > b.max_ctx ? c->lens[s] : b.max_ctx;
  assert_int_equal(g_gpu->vt->mla_absorbed_batch(g_gpu, &b, n, c->dqa + r0 * c->H * c->lora,
                                                 c->dqp + r0 * c->H * c->rope, c->H,
                                                 1.0f / sqrtf(192.0f), dy + r0 * c->H * c->lora),
                   EPIC_OK);
}

static double head_err(const float *y, const float *ref, int64_t m, int64_t H, int64_t n,
                       int64_t ldyt, int64_t ldyh) {
  double num = 0, den = 0;
  for (int64_t t = 0; t < m; t++)
    for (int64_t h = 0; h < H; h++)
      for (int64_t j = 0; j < n; j++) {
        const double g = y[t * ldyt + h * ldyh + j], r = ref[t * ldyt + h * ldyh + j];
        num += isfinite(g) ? (g - r) * (g - r) : INFINITY;
        den += r * r;
      }
  return sqrt(num / den);
}

/* head_gemm of m tokens against the CPU's (1e-5), strides as given; bf16: head_gemm_bf16
 * with the weights rounded to bf16, against the CPU's on the same weights (4e-3: x is
 * rounded to bf16 on cuBLAS's path); alone: also each token alone and in part equals the
 * whole call bit for bit (check_rows_alone). */
static void check_head_gemm(int64_t m, int64_t H, int64_t k, int64_t n, int trans, int64_t ldxh,
                            int64_t ldxt, int64_t ldyh, int64_t ldyt, int64_t lda,
                            const char *label, int alone, int bf16) {
  const size_t sx = (size_t)(m * ldxt), sa = (size_t)(H * lda), sy = (size_t)(m * ldyt);
  float *x = xmalloc(sx * 4), *a = xmalloc(sa * 4), *y = xmalloc(sy * 4), *ref = xmalloc(sy * 4);
  uint16_t *ab = xmalloc(sa * 2);
  fill(x, sx, 1.0f);
  fill(a, sa, 1.0f);
  for (size_t j = 0; j < sa; j++)
    ab[j] = epic_f32_to_bf16(a[j]);
  memset(ref, 0, sy * 4);
  float *dx = dup_dev(x, sx * 4), *dy = dalloc(sy * 4);
  void *da = bf16 ? dup_dev(ab, sa * 2) : dup_dev(a, sa * 4);
  hg_ctx c = {dx, da, ldxt, ldxh, H, lda, k, n, ldyt, ldyh, trans, bf16};
  poison(dy, sy * 4);
  hg_run(&c, 0, m, dy);
  fetch(y, dy, sy * 4);
  if (bf16)
    assert_int_equal(g_cpu->vt->head_gemm_bf16(g_cpu, x, ldxt, ldxh, m, H, ab, lda, k, n, trans,
                                               ref, ldyt, ldyh),
                     EPIC_OK);
  else
    assert_int_equal(
        g_cpu->vt->head_gemm(g_cpu, x, ldxt, ldxh, m, H, a, lda, k, n, trans, ref, ldyt, ldyh),
        EPIC_OK);
  char what[128];
  snprintf(what, sizeof what, "%shead_gemm%s m=%lld H=%lld k=%lld n=%lld trans=%d", label,
           bf16 ? "_bf16" : "", (long long)m, (long long)H, (long long)k, (long long)n, trans);
  check_err(what, head_err(y, ref, m, H, n, ldyt, ldyh), bf16 ? 4e-3 : 1e-5);
  if (alone)
    check_rows_alone(what, &c, hg_run, m, dy, (size_t)ldyt * 4, (size_t)ldyt, y);
  dfree(dx);
  dfree(da);
  dfree(dy);
  free(x);
  free(a);
  free(ab);
  free(y);
  free(ref);
}

static void test_head_gemm(void **state) {
  (void)state;
  static const int64_t shapes[][4] = {
      {3, 4, 7, 5}, {1, 5, 9, 3}, {4, 128, 128, 512}, {4, 128, 512, 128}};
  for (int s = 0; s < 4; s++)
    for (int trans = 0; trans < 2; trans++) {
      const int64_t m = shapes[s][0], H = shapes[s][1], k = shapes[s][2], n = shapes[s][3];
      check_head_gemm(m, H, k, n, trans, k + 2, H * (k + 2) + 1, n + 1, H * (n + 1) + 3, k * n + 5,
                      "", 0, 0);
    }
}

/* A matmul of m rows of a rows x cols weight of type dt (128 x 128 blocks) in the current
 * precision: takes `path`, within tol of the CPU, and row-invariant (check_rows_alone). */
static void check_mm_rows(const char *prec, epic_dtype dt, int64_t rows, int64_t cols, int64_t m,
                          epic_cuda_mm_path path, double tol) {
  const int64_t ldx = cols + 3, ldy = rows + 1;
  tw t = tw_make(dt, rows, cols, 128, 128);
  float *x = xmalloc((size_t)(m * ldx) * 4), *y = xmalloc((size_t)(m * ldy) * 4);
  float *ref = xmalloc((size_t)(m * rows) * 4);
  fill(x, (size_t)(m * ldx), 2.0f);
  float *dx = dup_dev(x, (size_t)(m * ldx) * 4), *dy = dalloc((size_t)(m * ldy) * 4);
  assert_int_equal(epic_ops_cuda_matmul_path(g_gpu, &t.d, m, ldy), path);
  poison(dy, (size_t)(m * ldy) * 4);
  mm_ctx c = {dx, ldx, ldy, &t.d};
  mm_run(&c, 0, m, dy);
  fetch(y, dy, (size_t)(m * ldy) * 4);
  assert_int_equal(g_cpu->vt->matmul(g_cpu, x, ldx, m, &t.h, ref, rows), EPIC_OK);
  char what[112];
  snprintf(what, sizeof what, "%s matmul %s [%lld x %lld] m=%lld (%s)", prec, epic_dtype_name(dt),
           (long long)rows, (long long)cols, (long long)m, epic_cuda_mm_path_name(path));
  check_err(what, rel_err2d(y, ldy, ref, rows, m, rows), tol);
  check_rows_alone(what, &c, mm_run, m, dy, (size_t)ldy * 4, (size_t)ldy, y);
  dfree(dx);
  dfree(dy);
  free(x);
  free(y);
  free(ref);
  tw_free(&t);
}

/* mla_absorbed_batch in the current precision over six sequences of 1 to 5000 keys: within
 * tol of the CPU and row-invariant (check_rows_alone). bf16: a BF16 cache (the fast
 * kernel; the reference on the same rows with bf16-rounded queries), else fp32 rows. */
static void check_mla_rows(const char *prec, int bf16) {
  enum { S = 6 };
  static const int32_t lens[S] = {1, 64, 700, 5000, 130, 2};
  const int64_t H = 128, lora = 512, rope = 64, page = 64, width = lora + rope;
  const int64_t stride = (5000 + page - 1) / page + 1;
  tcache c = {0};
  bcache bc = {0};
  if (bf16)
    bc = bcache_make(S * stride * page, page, lora, rope, 0);
  else
    c = cache_make(S * stride * page, page, lora, rope, 0);
  const epic_kv_view *hv = bf16 ? &bc.h : &c.h, *dv = bf16 ? &bc.d : &c.d;
  epic_kv_batch hb = {.pool = hv->pool,
                      .page_size = page,
                      .width = width,
                      .lora = lora,
                      .block_tables = bf16 ? bc.table : c.table,
                      .table_stride = stride,
                      .n_ctx = lens,
                      .max_ctx = 5000,
                      .dtype = EPIC_KV_F32};
  mla_ctx mc = {.db = hb, .lens = lens, .H = H, .lora = lora, .rope = rope};
  mc.db.pool = dv->pool;
  mc.db.block_tables = dv->block_table;
  mc.db.n_ctx = dup_dev(lens, sizeof lens);
  mc.db.dtype = dv->dtype;
  const size_t sa = (size_t)(S * H * lora), sp = (size_t)(S * H * rope);
  float *qa = xmalloc(sa * 4), *qp = xmalloc(sp * 4), *ctx = xmalloc(sa * 4),
        *ref = xmalloc(sa * 4);
  fill(qa, sa, 1.0f);
  fill(qp, sp, 1.0f);
  float *qar = bf16 ? rounded_copy(qa, sa) : qa, *qpr = bf16 ? rounded_copy(qp, sp) : qp;
  mc.dqa = dup_dev(qa, sa * 4);
  mc.dqp = dup_dev(qp, sp * 4);
  float *dctx = dalloc(sa * 4);
  poison(dctx, sa * 4);
  mla_run(&mc, 0, S, dctx);
  fetch(ctx, dctx, sa * 4);
  assert_int_equal(
      g_cpu->vt->mla_absorbed_batch(g_cpu, &hb, S, qar, qpr, H, 1.0f / sqrtf(192.0f), ref),
      EPIC_OK);
  char what[96];
  snprintf(what, sizeof what, "%s mla_absorbed_batch (%s cache)", prec, bf16 ? "bf16" : "fp32");
  check_err(what, rel_err2d(ctx, 1, ref, 1, 1, (int64_t)sa), bf16 ? BF16_MLA_TOL : 1e-5);
  check_rows_alone(what, &mc, mla_run, S, dctx, (size_t)(H * lora) * 4, (size_t)(H * lora), ctx);
  dfree((void *)mc.db.n_ctx);
  dfree((void *)mc.dqa);
  dfree((void *)mc.dqp);
  dfree(dctx);
  if (bf16) {
    free(qar);
    free(qpr);
    bcache_free(&bc);
  } else {
    cache_free(&c);
  }
  free(qa);
  free(qp);
  free(ctx);
  free(ref);
}

/* The exact precision is row-invariant (what MTP's default on GPUs rests on): matmuls of
 * F32, BF16 and block-scaled FP8 weights (partial blocks), head_gemm with evenly spaced
 * and with padded head strides, and the fp32-cache MLA decode over sequences of 1 to 5000
 * keys give a row alone or in a smaller call the bits it has in the whole call, within
 * fp32 rounding of the CPU; epic_ops_rows_invariant follows the precision. */
static void test_exact_rows(void **state) {
  (void)state;
  assert_int_equal(epic_ops_rows_invariant(g_gpu), 0);
  assert_int_equal(epic_ops_cuda_get_precision(g_gpu), EPIC_CUDA_PREC_FAST);
  assert_int_equal(epic_ops_cuda_set_precision(g_gpu, EPIC_CUDA_PREC_EXACT), EPIC_OK);
  assert_int_equal(epic_ops_cuda_get_precision(g_gpu), EPIC_CUDA_PREC_EXACT);
  assert_int_equal(epic_ops_rows_invariant(g_gpu), 1);
  static const epic_dtype dts[3] = {EPIC_DT_F32, EPIC_DT_BF16, EPIC_DT_F8E4M3};
  for (int d = 0; d < 3; d++)
    check_mm_rows("exact", dts[d], 300, 1100, 37, EPIC_CUDA_MM_EXACT_ROWS, 1e-5);
  /* {heads, k, n, trans, padded strides}: small, and V3's W_UK / W_UV products */
  static const int64_t hshapes[6][5] = {{6, 40, 64, 0, 0},     {6, 64, 40, 1, 0},
                                        {6, 40, 64, 0, 1},     {6, 64, 40, 1, 1},
                                        {128, 128, 512, 0, 0}, {128, 512, 128, 1, 0}};
  for (int hs = 0; hs < 6; hs++) {
    const int64_t H = hshapes[hs][0], k = hshapes[hs][1], n = hshapes[hs][2], pad = hshapes[hs][4];
    check_head_gemm(37, H, k, n, (int)hshapes[hs][3], k + pad, H * (k + pad) + pad, n + pad,
                    H * (n + pad) + pad, k * n + 3, pad ? "exact, padded strides: " : "exact: ", 1,
                    0);
  }
  check_mla_rows("exact", 0);
  assert_int_equal(epic_ops_cuda_set_precision(g_gpu, EPIC_CUDA_PREC_FAST), EPIC_OK);
  assert_int_equal(epic_ops_rows_invariant(g_gpu), 0);
}

/* The invariant precision (ops_cuda.h) is row-invariant: matmuls of F32, BF16 and FP8
 * weights on each of its paths (the expert kernel for FP8 it takes, also at V3's dense
 * shapes, in wide and in narrow tiles, 128-row chunks otherwise: 300 rows make three),
 * head_gemm_bf16 on its mma kernel and in token chunks (small and V3 shapes, padded
 * strides) and the BF16-cache
 * decode over 1 to 5000 keys give a row alone or in a smaller call the bits it has in the
 * whole call, within the fast numerics' error of the CPU; epic_ops_rows_invariant follows
 * the precision. */
static void test_invariant_rows(void **state) {
  (void)state;
  assert_int_equal(epic_ops_rows_invariant(g_gpu), 0);
  assert_int_equal(epic_ops_cuda_set_precision(g_gpu, EPIC_CUDA_PREC_INVARIANT), EPIC_OK);
  assert_int_equal(epic_ops_cuda_get_precision(g_gpu), EPIC_CUDA_PREC_INVARIANT);
  assert_int_equal(epic_ops_rows_invariant(g_gpu), 1);
  check_mm_rows("invariant", EPIC_DT_F32, 300, 1100, 300, EPIC_CUDA_MM_FAST_ROWS, 1e-5);
  check_mm_rows("invariant", EPIC_DT_BF16, 300, 1100, 300, EPIC_CUDA_MM_FAST_ROWS, 1e-2);
  check_mm_rows("invariant", EPIC_DT_F8E4M3, 300, 1104, 300, EPIC_CUDA_MM_FP8_WGMMA, 5e-2);
  check_mm_rows("invariant", EPIC_DT_F8E4M3, 300, 1104, 3, EPIC_CUDA_MM_FP8_WGMMA, 5e-2);
  /* V3's kv_a, q_a and a shared expert's down projection */
  check_mm_rows("invariant", EPIC_DT_F8E4M3, 576, 7168, 37, EPIC_CUDA_MM_FP8_WGMMA, 5e-2);
  check_mm_rows("invariant", EPIC_DT_F8E4M3, 1536, 7168, 5, EPIC_CUDA_MM_FP8_WGMMA, 5e-2);
  check_mm_rows("invariant", EPIC_DT_F8E4M3, 7168, 2048, 5, EPIC_CUDA_MM_FP8_WGMMA, 5e-2);
  /* 300 rows of it take wide tiles (84 of them), a row alone narrow ones (56 of 128 columns) */
  check_mm_rows("invariant", EPIC_DT_F8E4M3, 7168, 2048, 300, EPIC_CUDA_MM_FP8_WGMMA, 5e-2);
  check_mm_rows("invariant", EPIC_DT_F8E4M3, 300, 1100, 300, EPIC_CUDA_MM_FAST_ROWS, 1e-2);
  /* {tokens, heads, k, n, trans, padded strides}: the mma kernel at 1, 2 and 4 token tiles
   * per CTA (5, 12, 37 and 300 tokens; a row alone takes one), columns and rows past a
   * warp's (n = 40), k past a chunk (40); k = 12 goes to the cuBLAS chunks; the last shape
   * again with the kernel off (chunks). */
  static const int64_t hs[8][6] = {{300, 6, 40, 64, 0, 1},    {300, 6, 64, 40, 1, 0},
                                   {37, 128, 128, 512, 0, 0}, {37, 128, 512, 128, 1, 0},
                                   {5, 128, 128, 512, 0, 1},  {12, 128, 512, 128, 1, 1},
                                   {37, 4, 12, 20, 1, 1},     {37, 128, 512, 128, 1, 0}};
  for (int i = 0; i < 8; i++) {
    const int64_t m = hs[i][0], H = hs[i][1], k = hs[i][2], n = hs[i][3], pad = hs[i][5];
    const int64_t ldxh = k + pad, ldyh = n + pad;
    if (i == 7)
      assert_int_equal(epic_ops_cuda_set_head_rows(g_gpu, 0), EPIC_OK);
    check_head_gemm(m, H, k, n, (int)hs[i][4], ldxh, H * ldxh + pad, ldyh, H * ldyh + pad,
                    k * n + 8,
                    i == 7 ? "invariant, chunks: "
                    : pad  ? "invariant, padded strides: "
                           : "invariant: ",
                    1, 1);
  }
  assert_int_equal(epic_ops_cuda_set_head_rows(g_gpu, 1), EPIC_OK);
  check_mla_rows("invariant", 1);
  assert_int_equal(epic_ops_cuda_set_precision(g_gpu, EPIC_CUDA_PREC_FAST), EPIC_OK);
  assert_int_equal(epic_ops_rows_invariant(g_gpu), 0);
}

/* The thin form (epic_ops_cuda_set_wgmma_thin) keeps the tiled forms' bits: the invariant
 * precision's dense FP8 matmuls of 1 to 16 rows run thin by default and equal the same
 * calls on tiles (thin off) and the CPU within the FP8 tolerance; 17 rows, and a weight of
 * more narrow tiles than the GPU has SMs (Hopper parts have 114 to 132), run tiled. Shapes: V3's
 * q_a + kv_a and kv_a (a thin CTA's columns past n), a shared expert's gate/up and down, a partial
 * last k-block (k = 1104), and n = 1000 (half a thin CTA past n); 16,900 rows at k = 256 (133
 * narrow tiles). */
static void test_wgmma_thin(void **state) {
  (void)state;
  assert_int_equal(epic_ops_cuda_set_precision(g_gpu, EPIC_CUDA_PREC_INVARIANT), EPIC_OK);
  static const int64_t shapes[7][2] = {{2112, 7168}, {576, 7168},  {4096, 7168}, {1536, 1104},
                                       {7168, 2048}, {1000, 1024}, {16900, 256}};
  static const int64_t ms[6] = {1, 3, 8, 9, 16, 17};
  for (int s = 0; s < 7; s++) {
    const int64_t rows = shapes[s][0], cols = shapes[s][1], ldx = cols + 4, ldy = rows + 2;
    tw t = tw_make(EPIC_DT_F8E4M3, rows, cols, 128, 128);
    for (int i = 0; i < 6; i++) {
      const int64_t m = ms[i], thin = m <= 16 && rows < 16900;
      float *x = xmalloc((size_t)(m * ldx) * 4), *ref = xmalloc((size_t)(m * rows) * 4);
      float *y[2]; /* default (thin), thin off (tiles) */
      fill(x, (size_t)(m * ldx), 2.0f);
      float *dx = dup_dev(x, (size_t)(m * ldx) * 4), *dy = dalloc((size_t)(m * ldy) * 4);
      mm_ctx c = {dx, ldx, ldy, &t.d};
      for (int run = 0; run < 2; run++) {
        const int64_t thin0 = epic_ops_cuda_wgmma_thin_launches(g_gpu);
        assert_int_equal(epic_ops_cuda_set_wgmma_thin(g_gpu, run == 0), EPIC_OK);
        y[run] = xmalloc((size_t)(m * ldy) * 4);
        poison(dy, (size_t)(m * ldy) * 4);
        mm_run(&c, 0, m, dy);
        fetch(y[run], dy, (size_t)(m * ldy) * 4);
        assert_int_equal(epic_ops_cuda_wgmma_thin_launches(g_gpu), thin0 + (run == 0 && thin));
      }
      assert_int_equal(epic_ops_cuda_set_wgmma_thin(g_gpu, 1), EPIC_OK);
      for (int64_t r = 0; r < m; r++)
        if (memcmp(y[0] + r * ldy, y[1] + r * ldy, (size_t)rows * 4))
          fail_msg("thin [%lld x %lld] m=%lld: row %lld differs from the tiled form",
                   (long long)rows, (long long)cols, (long long)m, (long long)r);
      assert_int_equal(g_cpu->vt->matmul(g_cpu, x, ldx, m, &t.h, ref, rows), EPIC_OK);
      char what[96];
      snprintf(what, sizeof what, "thin [%lld x %lld] m=%lld", (long long)rows, (long long)cols,
               (long long)m);
      check_err(what, rel_err2d(y[0], ldy, ref, rows, m, rows), 5e-2);
      dfree(dx);
      dfree(dy);
      free(x);
      free(y[0]);
      free(y[1]);
      free(ref);
    }
    tw_free(&t);
  }
  assert_int_equal(epic_ops_cuda_set_wgmma_thin(g_gpu, 2), EPIC_ERR_INVALID);
  assert_int_equal(epic_ops_cuda_set_precision(g_gpu, EPIC_CUDA_PREC_FAST), EPIC_OK);
}

/* head_gemm_bf16 against the CPU's on the same bf16 weights: up to
 * EPIC_CUDA_HEAD_KERNEL_MAX_M tokens with 16-byte weight rows on the decode kernel (fp32 x,
 * so the sums differ by order only), else on cuBLAS with x rounded to bf16; on the kernel
 * each token's result alone equals it among the call's others, bit for bit. */
static void test_head_gemm_bf16(void **state) {
  (void)state;
  static const int64_t shapes[][4] = {{1, 128, 128, 512}, {3, 128, 512, 128}, {8, 16, 128, 512},
                                      {5, 7, 40, 24},     {20, 128, 128, 512}, {2, 5, 9, 3}};
  for (int s = 0; s < 6; s++)
    for (int trans = 0; trans < 2; trans++) {
      const int64_t m = shapes[s][0], H = shapes[s][1], k = shapes[s][2], n = shapes[s][3];
      const int64_t ldxh = k + 2, ldxt = H * ldxh + 1, ldyh = n + 1, ldyt = H * ldyh + 3;
      const int64_t lda = k * n + 8;
      const size_t sx = (size_t)(m * ldxt), sa = (size_t)(H * lda), sy = (size_t)(m * ldyt);
      float *x = xmalloc(sx * 4), *af = xmalloc(sa * 4), *y = xmalloc(sy * 4),
            *ref = xmalloc(sy * 4), *one = xmalloc(sy * 4);
      uint16_t *a = xmalloc(sa * 2);
      fill(x, sx, 1.0f);
      fill(af, sa, 1.0f);
      for (size_t i = 0; i < sa; i++)
        a[i] = epic_f32_to_bf16(af[i]);
      memset(ref, 0, sy * 4);
      float *dx = dup_dev(x, sx * 4), *dy = dalloc(sy * 4);
      uint16_t *da = dup_dev(a, sa * 2);
      poison(dy, sy * 4);
      assert_int_equal(g_gpu->vt->head_gemm_bf16(g_gpu, dx, ldxt, ldxh, m, H, da, lda, k, n, trans,
                                                 dy, ldyt, ldyh),
                       EPIC_OK);
      fetch(y, dy, sy * 4);
      assert_int_equal(g_cpu->vt->head_gemm_bf16(g_cpu, x, ldxt, ldxh, m, H, a, lda, k, n, trans,
                                                 ref, ldyt, ldyh),
                       EPIC_OK);
      const int kernel = m <= EPIC_CUDA_HEAD_KERNEL_MAX_M && (trans ? k : n) % 8 == 0;
      char what[112];
      snprintf(what, sizeof what, "head_gemm_bf16 m=%lld H=%lld k=%lld n=%lld trans=%d (%s)",
               (long long)m, (long long)H, (long long)k, (long long)n, trans,
               kernel ? "kernel" : "cuBLAS");
      check_err(what, head_err(y, ref, m, H, n, ldyt, ldyh), kernel ? 1e-6 : 4e-3);
      for (int64_t t = 0; kernel && t < m; t++) {
        poison(dy, sy * 4);
        assert_int_equal(g_gpu->vt->head_gemm_bf16(g_gpu, dx + t * ldxt, ldxt, ldxh, 1, H, da, lda,
                                                   k, n, trans, dy, ldyt, ldyh),
                         EPIC_OK);
        fetch(one, dy, (size_t)ldyt * 4);
        for (int64_t h = 0; h < H; h++)
          assert_memory_equal(one + h * ldyh, y + t * ldyt + h * ldyh, (size_t)n * 4);
      }
      dfree(dx);
      dfree(da);
      dfree(dy);
      free(x);
      free(af);
      free(a);
      free(y);
      free(ref);
      free(one);
    }
}

int main(void) {
  if (epic_cuda_device_count() <= 0) {
    printf("SKIP: no CUDA device\n");
    return 77;
  }
  rng_seed_from_env();
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_memory),
      cmocka_unit_test(test_matmul),
      cmocka_unit_test(test_skinny_split),
      cmocka_unit_test(test_fp8_subnormal_exact),
      cmocka_unit_test(test_fp8_mma_small_activations),
      cmocka_unit_test(test_rmsnorm),
      cmocka_unit_test(test_rope),
      cmocka_unit_test(test_silu_axpy),
      cmocka_unit_test(test_embed),
      cmocka_unit_test(test_route),
      cmocka_unit_test(test_kv),
      cmocka_unit_test(test_row_ops),
      cmocka_unit_test(test_grouped_matmul),
      cmocka_unit_test(test_grouped_lanes),
      cmocka_unit_test(test_grouped_wgmma),
      cmocka_unit_test(test_wgmma_forms),
      cmocka_unit_test(test_grouped_rows_gather),
      cmocka_unit_test(test_moe_plan),
      cmocka_unit_test(test_moe_plan_sizes),
      cmocka_unit_test(test_row_pick),
      cmocka_unit_test(test_row_draw),
      cmocka_unit_test(test_head_gemm),
      cmocka_unit_test(test_head_gemm_bf16),
      cmocka_unit_test(test_exact_rows),
      cmocka_unit_test(test_invariant_rows),
      cmocka_unit_test(test_wgmma_thin),
      cmocka_unit_test(test_mla),
      cmocka_unit_test(test_kv_bf16),
      cmocka_unit_test(test_mla_bf16),
  };
  return cmocka_run_group_tests_name("ops_cuda", tests, setup, teardown);
}
