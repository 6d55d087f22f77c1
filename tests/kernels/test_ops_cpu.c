/* CPU backend of epic_ops vs naive float64 references written here, plus the
 * dtype helpers of kernels/ops.c. Random inputs come from a fixed-seed generator. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kernels/ops.h"
#include "tests/common/test_rng.h"

/* ---------------------------------------------------------------- helpers */

static void fill(float *p, size_t n) {
  for (size_t i = 0; i < n; i++)
    p[i] = rng_f();
}

static epic_ops *g_ops;

static int setup(void **state) {
  if (epic_ops_cpu_create(0, &g_ops) != EPIC_OK) return -1;
  return 0;
}
static int teardown(void **state) {
  epic_ops_destroy(g_ops);
  return 0;
}

/* |got - ref| <= tol * scale_ref + 1e-30, failing with a readable message. */
static void expect_close(const char *what, size_t i, double got, double ref, double scale,
                         double tol) {
  if (!(fabs(got - ref) <= tol * scale + 1e-30)) {
    fail_msg("%s[%zu]: got %.9g want %.9g (scale %.3g, tol %.3g)", what, i, got, ref, scale, tol);
  }
}

/* A test weight: owns its storage. */
typedef struct {
  epic_weight w;
  void *data;
  float *scale;
} tw;

static void tw_free(tw *t) {
  free(t->data);
  free(t->scale);
}

static tw tw_make(epic_dtype dt, int64_t rows, int64_t cols, int64_t br, int64_t bc) {
  tw t = {0};
  const size_t n = (size_t)(rows * cols);
  t.w.dtype = dt;
  t.w.rows = rows;
  t.w.cols = cols;
  switch (dt) {
  case EPIC_DT_F32: {
    float *p = malloc(n * 4);
    fill(p, n);
    t.data = p;
    break;
  }
  case EPIC_DT_BF16: {
    uint16_t *p = malloc(n * 2);
    for (size_t i = 0; i < n; i++)
      p[i] = epic_f32_to_bf16(rng_f());
    t.data = p;
    break;
  }
  case EPIC_DT_F16: {
    uint16_t *p = malloc(n * 2);
    /* exponents 8..16 (|v| in [2^-7, 4)) with the occasional subnormal */
    for (size_t i = 0; i < n; i++) {
      uint64_t r = rng_u64();
      uint16_t e = (r & 31) == 0 ? 0 : (uint16_t)(8 + (r >> 8) % 9);
      p[i] = (uint16_t)(((r >> 20) & 1) << 15 | e << 10 | ((r >> 30) & 0x3ff));
    }
    t.data = p;
    break;
  }
  case EPIC_DT_F8E4M3: {
    uint8_t *p = malloc(n);
    for (size_t i = 0; i < n; i++) {
      uint8_t c;
      do
        c = (uint8_t)rng_u64();
      while ((c & 0x7f) == 0x7f);
      p[i] = c;
    }
    t.data = p;
    const int64_t nbr = (rows + br - 1) / br, nbc = (cols + bc - 1) / bc;
    t.scale = malloc((size_t)(nbr * nbc) * 4);
    for (int64_t i = 0; i < nbr * nbc; i++)
      t.scale[i] = (1.5f + rng_f()) * 1e-3f;
    t.w.scale_inv = t.scale;
    t.w.block_rows = br;
    t.w.block_cols = bc;
    break;
  }
  default: break;
  }
  t.w.data = t.data;
  return t;
}

/* ------------------------------------------------------------ dtype helpers */

static void test_fp8_codes(void **state) {
  for (int c = 0; c < 256; c++) {
    float f = epic_fp8e4m3_to_f32((uint8_t)c);
    if ((c & 0x7f) == 0x7f) {
      assert_true(isnan(f));
      continue;
    }
    assert_int_equal(epic_f32_to_fp8e4m3(f), c);
  }
  assert_true(epic_fp8e4m3_to_f32(0x7e) == 448.0f);
  assert_true(epic_fp8e4m3_to_f32(0x38) == 1.0f);
  assert_true(epic_fp8e4m3_to_f32(0x01) == 0x1p-9f);
  assert_true(epic_fp8e4m3_to_f32(0x08) == 0x1p-6f);
  assert_true(epic_fp8e4m3_to_f32(0xb8) == -1.0f);
  assert_int_equal(epic_f32_to_fp8e4m3(1000.0f), 0x7e);
  assert_int_equal(epic_f32_to_fp8e4m3(-1000.0f), 0xfe);
  /* ties to even: 1.0625 is halfway between 1.0 (0x38) and 1.125 (0x39) */
  assert_int_equal(epic_f32_to_fp8e4m3(1.0625f), 0x38);
  assert_int_equal(epic_f32_to_fp8e4m3(1.1875f), 0x3a);
}

static void test_bf16_f16(void **state) {
  for (uint32_t c = 0; c < 65536; c++) {
    float f = epic_bf16_to_f32((uint16_t)c);
    if (isnan(f)) continue;
    assert_int_equal(epic_f32_to_bf16(f), c);
  }
  /* round to nearest even on the dropped 16 bits */
  assert_int_equal(epic_f32_to_bf16(1.0f + 0x1p-8f), 0x3f80);            /* tie -> even */
  assert_int_equal(epic_f32_to_bf16(1.0f + 0x1p-8f + 0x1p-20f), 0x3f81); /* above tie */
  assert_int_equal(epic_f32_to_bf16(1.0f + 0x1p-7f + 0x1p-8f), 0x3f82);  /* tie -> even */
  assert_true(isnan(epic_bf16_to_f32(epic_f32_to_bf16(NAN))));
  assert_true(epic_f16_to_f32(0x3c00) == 1.0f);
  assert_true(epic_f16_to_f32(0x7bff) == 65504.0f);
  assert_true(epic_f16_to_f32(0x0001) == 0x1p-24f);
  assert_true(epic_f16_to_f32(0x8400) == -0x1p-14f);
  assert_true(isinf(epic_f16_to_f32(0xfc00)) && epic_f16_to_f32(0xfc00) < 0);
  assert_true(isnan(epic_f16_to_f32(0x7e00)));
}

/* embed goes through the backend's fast dequantiser: it must agree bit for bit
 * with the reference epic_weight_rows_f32 on every code. */
static void test_fast_dequant_exhaustive(void **state) {
  const int64_t rows = 256, cols = 256;
  uint16_t *h = malloc(65536 * 2);
  for (uint32_t c = 0; c < 65536; c++)
    h[c] = (uint16_t)c;
  uint8_t *b = malloc(65536);
  for (uint32_t c = 0; c < 65536; c++)
    b[c] = (uint8_t)(c * 7 + c / 256);
  float scales[4 * 5];
  for (int i = 0; i < 20; i++)
    scales[i] = 0.001f * (float)(i + 1);
  epic_weight ws[3] = {
      {.dtype = EPIC_DT_BF16, .rows = rows, .cols = cols, .data = h},
      {.dtype = EPIC_DT_F16, .rows = rows, .cols = cols, .data = h},
      {.dtype = EPIC_DT_F8E4M3,
       .rows = rows,
       .cols = cols,
       .data = b,
       .scale_inv = scales,
       .block_rows = 64,
       .block_cols = 60}, /* 60: partial vectors at every block edge */
  };
  int32_t *ids = malloc(rows * sizeof(int32_t));
  for (int i = 0; i < rows; i++)
    ids[i] = (int32_t)((i * 37) % rows);
  float *got = malloc((size_t)(rows * cols) * 4), *ref = malloc((size_t)cols * 4);
  for (int k = 0; k < 3; k++) {
    assert_int_equal(g_ops->vt->embed(g_ops, &ws[k], ids, rows, got), EPIC_OK);
    for (int64_t i = 0; i < rows; i++) {
      epic_weight_rows_f32(&ws[k], ids[i], 1, ref);
      for (int64_t c = 0; c < cols; c++) {
        float g = got[i * cols + c], r = ref[c];
        if (isnan(r)) {
          assert_true(isnan(g));
        } else if (memcmp(&g, &r, 4) != 0) {
          fail_msg("%s row %lld col %lld: %a vs %a", epic_dtype_name(ws[k].dtype),
                   (long long)ids[i], (long long)c, g, r);
        }
      }
    }
  }
  int32_t bad = (int32_t)rows;
  assert_int_equal(g_ops->vt->embed(g_ops, &ws[0], &bad, 1, got), EPIC_ERR_INVALID);
  free(h);
  free(b);
  free(ids);
  free(got);
  free(ref);
}

/* ------------------------------------------------------------------ matmul */

static void check_matmul(epic_dtype dt, int64_t rows, int64_t cols, int64_t m, int64_t br,
                         int64_t bc, int64_t pad) {
  tw t = tw_make(dt, rows, cols, br, bc);
  const int64_t ldx = cols + pad, ldy = rows + pad;
  float *x = malloc((size_t)(m * ldx) * 4), *y = malloc((size_t)(m * ldy) * 4);
  float *wf = malloc((size_t)(rows * cols) * 4);
  fill(x, (size_t)(m * ldx));
  for (int64_t i = 0; i < m * ldy; i++)
    y[i] = 12345.0f;
  epic_weight_rows_f32(&t.w, 0, rows, wf);
  assert_int_equal(g_ops->vt->matmul(g_ops, x, ldx, m, &t.w, y, ldy), EPIC_OK);
  for (int64_t i = 0; i < m; i++) {
    for (int64_t r = 0; r < rows; r++) {
      double acc = 0, mag = 0;
      for (int64_t c = 0; c < cols; c++) {
        acc += (double)x[i * ldx + c] * wf[r * cols + c];
        mag += fabs((double)x[i * ldx + c] * wf[r * cols + c]);
      }
      char what[96];
      snprintf(what, sizeof what, "matmul %s [%lld,%lld] m=%lld", epic_dtype_name(dt),
               (long long)rows, (long long)cols, (long long)m);
      expect_close(what, (size_t)(i * rows + r), y[i * ldy + r], acc, mag, 2e-6);
    }
    for (int64_t r = rows; r < ldy; r++)
      assert_true(y[i * ldy + r] == 12345.0f);
  }
  free(x);
  free(y);
  free(wf);
  tw_free(&t);
}

static void test_matmul(void **state) {
  static const int64_t shapes[][2] = {{80, 64},   {80, 256}, {192, 192}, {256, 64}, {7, 300},
                                      {130, 200}, {1, 1},    {300, 129}, {17, 1000}};
  static const int64_t ms[] = {1, 2, 3, 5, 8, 9, 17, 40};
  static const epic_dtype dts[] = {EPIC_DT_F32, EPIC_DT_BF16, EPIC_DT_F16, EPIC_DT_F8E4M3};
  rng_seed(1);
  for (size_t d = 0; d < 4; d++)
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
      for (size_t k = 0; k < sizeof ms / sizeof ms[0]; k++)
        check_matmul(dts[d], shapes[s][0], shapes[s][1], ms[k], 128, 128, (int64_t)(k % 2) * 3);
  /* many tokens: large tiles with a partial last tile */
  check_matmul(EPIC_DT_BF16, 2100, 40, 260, 128, 128, 0);
  check_matmul(EPIC_DT_F8E4M3, 2100, 40, 257, 128, 128, 2);
  check_matmul(EPIC_DT_F32, 1100, 33, 300, 128, 128, 1);
  /* small, odd FP8 blocks: many partial edge blocks in both directions */
  check_matmul(EPIC_DT_F8E4M3, 80, 256, 3, 48, 40, 0);
  check_matmul(EPIC_DT_F8E4M3, 150, 70, 17, 32, 16, 1);
  check_matmul(EPIC_DT_F8E4M3, 300, 200, 1, 7, 9, 0);
  check_matmul(EPIC_DT_F8E4M3, 300, 200, 20, 7, 9, 0);
  /* m == 0 and bad arguments */
  tw t = tw_make(EPIC_DT_F32, 4, 4, 0, 0);
  float x[16] = {0}, y[16];
  assert_int_equal(g_ops->vt->matmul(g_ops, x, 4, 0, &t.w, y, 4), EPIC_OK);
  assert_int_equal(g_ops->vt->matmul(g_ops, x, 3, 1, &t.w, y, 4), EPIC_ERR_INVALID);
  t.w.dtype = EPIC_DT_I32;
  assert_int_equal(g_ops->vt->matmul(g_ops, x, 4, 1, &t.w, y, 4), EPIC_ERR_INVALID);
  tw_free(&t);
}

/* ---------------------------------------------------------- element-wise */

static void test_rmsnorm(void **state) {
  rng_seed(2);
  static const int64_t ns[] = {1, 7, 64, 512, 1536, 7168};
  for (size_t k = 0; k < sizeof ns / sizeof ns[0]; k++) {
    const int64_t n = ns[k], m = 5, ld = n + 3;
    float *x = malloc((size_t)(m * ld) * 4), *y = malloc((size_t)(m * ld) * 4),
          *w = malloc((size_t)n * 4);
    fill(x, (size_t)(m * ld));
    fill(w, (size_t)n);
    for (int64_t j = 0; j < n; j++)
      x[j] *= 100.0f; /* one row of large values */
    assert_int_equal(g_ops->vt->rmsnorm(g_ops, x, ld, m, n, w, 1e-6f, y, ld), EPIC_OK);
    for (int64_t i = 0; i < m; i++) {
      double ss = 0;
      for (int64_t j = 0; j < n; j++)
        ss += (double)x[i * ld + j] * x[i * ld + j];
      const double r = 1.0 / sqrt(ss / (double)n + 1e-6);
      for (int64_t j = 0; j < n; j++) {
        const double ref = (double)w[j] * x[i * ld + j] * r;
        expect_close("rmsnorm", (size_t)j, y[i * ld + j], ref, fabs(ref), 1e-6);
      }
    }
    /* in place */
    memcpy(y, x, (size_t)(m * ld) * 4);
    float *z = malloc((size_t)(m * ld) * 4);
    assert_int_equal(g_ops->vt->rmsnorm(g_ops, x, ld, m, n, w, 1e-6f, z, ld), EPIC_OK);
    assert_int_equal(g_ops->vt->rmsnorm(g_ops, y, ld, m, n, w, 1e-6f, y, ld), EPIC_OK);
    for (int64_t i = 0; i < m; i++)
      assert_memory_equal(y + i * ld, z + i * ld, (size_t)n * 4);
    free(x);
    free(y);
    free(z);
    free(w);
  }
}

static void test_rope(void **state) {
  rng_seed(3);
  const int64_t m = 6, H = 3, rd = 64, ld_head = 96, ld_tok = H * ld_head + 5;
  double inv_freq[32];
  for (int j = 0; j < 32; j++)
    inv_freq[j] = pow(10000.0, -2.0 * j / 64.0) / (j > 20 ? 40.0 : 1.0);
  const int32_t pos[6] = {0, 1, 17, 4095, 100000, 163839};
  float *x = malloc((size_t)(m * ld_tok) * 4), *x0 = malloc((size_t)(m * ld_tok) * 4);
  fill(x, (size_t)(m * ld_tok));
  memcpy(x0, x, (size_t)(m * ld_tok) * 4);
  assert_int_equal(g_ops->vt->rope(g_ops, x, m, H, ld_tok, ld_head, rd, pos, inv_freq), EPIC_OK);
  for (int64_t t = 0; t < m; t++)
    for (int64_t h = 0; h < H; h++) {
      const int64_t off = t * ld_tok + h * ld_head;
      for (int64_t j = 0; j < rd / 2; j++) {
        const double th = (double)pos[t] * inv_freq[j], a = x0[off + 2 * j],
                     b = x0[off + 2 * j + 1];
        expect_close("rope re", (size_t)j, x[off + 2 * j], a * cos(th) - b * sin(th), 1, 1e-6);
        expect_close("rope im", (size_t)j, x[off + 2 * j + 1], a * sin(th) + b * cos(th), 1, 1e-6);
      }
      for (int64_t j = rd; j < ld_head && off + j < m * ld_tok; j++)
        assert_true(x[off + j] == x0[off + j]); /* outside the rope dims untouched */
    }
  free(x);
  free(x0);
}

static void test_silu_axpy(void **state) {
  rng_seed(4);
  const int64_t m = 3, n = 1000, ld = 1003;
  float *g = malloc((size_t)(m * ld) * 4), *u = malloc((size_t)(m * ld) * 4),
        *y = malloc((size_t)(m * ld) * 4);
  fill(g, (size_t)(m * ld));
  fill(u, (size_t)(m * ld));
  for (int64_t i = 0; i < m * ld; i++)
    g[i] *= 20.0f;
  assert_int_equal(g_ops->vt->silu_mul(g_ops, g, ld, u, ld, m, n, y, ld), EPIC_OK);
  for (int64_t i = 0; i < m; i++)
    for (int64_t j = 0; j < n; j++) {
      const double z = g[i * ld + j], ref = z / (1.0 + exp(-z)) * u[i * ld + j];
      expect_close("silu_mul", (size_t)j, y[i * ld + j], ref, fabs(ref), 1e-6);
    }
  float *a = malloc((size_t)n * 4), *b = malloc((size_t)n * 4), *b0 = malloc((size_t)n * 4);
  fill(a, (size_t)n);
  fill(b, (size_t)n);
  memcpy(b0, b, (size_t)n * 4);
  assert_int_equal(g_ops->vt->axpy(g_ops, n, 0.37f, a, b), EPIC_OK);
  for (int64_t j = 0; j < n; j++)
    expect_close("axpy", (size_t)j, b[j], b0[j] + 0.37 * a[j], 1, 1e-6);
  free(g);
  free(u);
  free(y);
  free(a);
  free(b);
  free(b0);
}

/* ------------------------------------------------------------------ router */

/* Reference written independently: sort-based selection. */
static int64_t top_idx(const double *v, int64_t n, int64_t k, int64_t *out) {
  /* selection by repeated scan with explicit tie rule */
  unsigned char used[4096] = {0};
  for (int64_t j = 0; j < k; j++) {
    int64_t best = -1;
    for (int64_t i = 0; i < n; i++) {
      if (used[i]) continue;
      if (best < 0 || v[i] > v[best]) best = i;
    }
    if (best < 0) best = 0; /* only when k > n, which no caller asks; keeps gcc 13's bounds check quiet */
    used[best] = 1;
    out[j] = best;
  }
  return k;
}

static void ref_route(const float *lg, const epic_router_params *p, int32_t *idx, float *wt) {
  const int64_t ne = p->n_experts;
  double s[4096], b[4096], gsc[64];
  if (p->scoring == 1) {
    double mx = -INFINITY, sum = 0;
    for (int64_t e = 0; e < ne; e++)
      mx = fmax(mx, lg[e]);
    for (int64_t e = 0; e < ne; e++)
      sum += exp(lg[e] - mx);
    for (int64_t e = 0; e < ne; e++)
      s[e] = exp(lg[e] - mx) / sum;
  } else {
    for (int64_t e = 0; e < ne; e++)
      s[e] = 1.0 / (1.0 + exp(-(double)lg[e]));
  }
  /* selection sees the fp32-rounded scores, like any fp32 implementation */
  for (int64_t e = 0; e < ne; e++)
    b[e] = (float)((float)s[e] + (p->bias ? p->bias[e] : 0.0f));
  if (p->n_group > 1) {
    const int64_t gs = ne / p->n_group;
    for (int64_t g = 0; g < p->n_group; g++) {
      int64_t t[2];
      if (p->bias) {
        top_idx(b + g * gs, gs, 2, t);
        gsc[g] = (float)((float)b[g * gs + t[0]] + (float)b[g * gs + t[1]]);
      } else {
        top_idx(b + g * gs, gs, 1, t);
        gsc[g] = b[g * gs + t[0]];
      }
    }
    int64_t keep[64];
    top_idx(gsc, p->n_group, p->topk_group, keep);
    for (int64_t g = 0; g < p->n_group; g++) {
      int kept = 0;
      for (int64_t j = 0; j < p->topk_group; j++)
        kept |= keep[j] == g;
      if (!kept)
        for (int64_t e = 0; e < gs; e++)
          b[g * gs + e] = -INFINITY;
    }
  }
  int64_t sel[64];
  top_idx(b, ne, p->top_k, sel);
  /* ascending ids */
  for (int64_t i = 0; i < p->top_k; i++)
    for (int64_t j = i + 1; j < p->top_k; j++)
      if (sel[j] < sel[i]) {
        int64_t tmp = sel[i];
        sel[i] = sel[j];
        sel[j] = tmp;
      }
  double sum = 0;
  for (int64_t i = 0; i < p->top_k; i++)
    sum += (float)s[sel[i]];
  for (int64_t i = 0; i < p->top_k; i++) {
    idx[i] = (int32_t)sel[i];
    double w = (float)s[sel[i]];
    if (p->norm_topk_prob) w /= sum + 1e-20;
    wt[i] = (float)(w * p->routed_scaling_factor);
  }
}

static void check_route(const epic_router_params *p, int64_t m, int ties) {
  const int64_t ne = p->n_experts, k = p->top_k;
  float *lg = malloc((size_t)(m * ne) * 4), *w = malloc((size_t)(m * k) * 4),
        *rw = malloc((size_t)k * 4);
  int32_t *idx = malloc((size_t)(m * k) * 4), *ridx = malloc((size_t)k * 4);
  for (int64_t i = 0; i < m * ne; i++)
    lg[i] = ties ? (float)(rng_u64() % 3) - 1.0f : 4.0f * rng_f();
  if (ties && m > 1)
    for (int64_t e = 0; e < ne; e++)
      lg[e] = 0.5f; /* all equal: ids 0..k-1 (no grouping) */
  assert_int_equal(g_ops->vt->route(g_ops, lg, m, p, idx, w), EPIC_OK);
  for (int64_t t = 0; t < m; t++) {
    ref_route(lg + t * ne, p, ridx, rw);
    for (int64_t j = 0; j < k; j++) {
      if (idx[t * k + j] != ridx[j])
        fail_msg("route token %lld slot %lld: expert %d want %d (groups %lld, bias %d, ties %d)",
                 (long long)t, (long long)j, idx[t * k + j], ridx[j], (long long)p->n_group,
                 p->bias != NULL, ties);
      expect_close("route weight", (size_t)j, w[t * k + j], rw[j], fabs(rw[j]), 1e-6);
      if (j) assert_true(idx[t * k + j] > idx[t * k + j - 1]);
    }
  }
  free(lg);
  free(w);
  free(rw);
  free(idx);
  free(ridx);
}

static void test_route(void **state) {
  rng_seed(5);
  float bias[256];
  for (int e = 0; e < 256; e++)
    bias[e] = 0.5f * rng_f();
  float tie_bias[256];
  for (int e = 0; e < 256; e++)
    tie_bias[e] = (float)(e % 4) * 0.25f - 0.5f;
  for (int ties = 0; ties < 2; ties++)
    for (int scoring = 0; scoring < 2; scoring++)
      for (int nb = 0; nb < 3; nb++) {
        const float *bp = nb == 0 ? NULL : nb == 1 ? bias : tie_bias;
        epic_router_params v3 = {.n_experts = 256,
                                 .top_k = 8,
                                 .n_group = 8,
                                 .topk_group = 4,
                                 .scoring = scoring,
                                 .norm_topk_prob = 1,
                                 .routed_scaling_factor = 2.5f,
                                 .bias = bp};
        check_route(&v3, 37, ties);
        epic_router_params flat = {.n_experts = 64,
                                   .top_k = 6,
                                   .n_group = 1,
                                   .topk_group = 1,
                                   .scoring = scoring,
                                   .norm_topk_prob = 0,
                                   .routed_scaling_factor = 1.0f,
                                   .bias = bp};
        check_route(&flat, 5, ties);
        epic_router_params small = {.n_experts = 16,
                                    .top_k = 3,
                                    .n_group = 4,
                                    .topk_group = 2,
                                    .scoring = scoring,
                                    .norm_topk_prob = 1,
                                    .routed_scaling_factor = 1.5f,
                                    .bias = bp};
        check_route(&small, 20, ties);
      }
  /* explicit tie: all logits equal, no grouping -> experts 0..k-1, equal weights */
  float lg[8] = {0};
  int32_t idx[3];
  float w[3];
  epic_router_params p = {.n_experts = 8,
                          .top_k = 3,
                          .n_group = 1,
                          .topk_group = 1,
                          .scoring = 0,
                          .norm_topk_prob = 1,
                          .routed_scaling_factor = 3.0f};
  assert_int_equal(g_ops->vt->route(g_ops, lg, 1, &p, idx, w), EPIC_OK);
  for (int j = 0; j < 3; j++) {
    assert_int_equal(idx[j], j);
    expect_close("tie weight", (size_t)j, w[j], 1.0, 1, 1e-6);
  }
  /* bias wins selection but not the weight */
  float b8[8] = {0, 0, 0, 0, 0, 0, 0, 10};
  p.bias = b8;
  p.top_k = 1;
  p.norm_topk_prob = 0;
  p.routed_scaling_factor = 1;
  lg[7] = -2;
  assert_int_equal(g_ops->vt->route(g_ops, lg, 1, &p, idx, w), EPIC_OK);
  assert_int_equal(idx[0], 7);
  expect_close("biased pick weight", 0, w[0], 1.0 / (1.0 + exp(2.0)), 1, 1e-7);
  p.n_group = 3; /* 8 experts do not split into 3 groups */
  p.topk_group = 1;
  assert_int_equal(g_ops->vt->route(g_ops, lg, 1, &p, idx, w), EPIC_ERR_INVALID);
}

/* -------------------------------------------------------------- kv cache */

typedef struct {
  epic_kv_view kv;
  int32_t *table;
} tcache;

static tcache cache_make(int64_t n_tok, int64_t page, int64_t lora, int64_t rope) {
  tcache c = {0};
  const int64_t n_pages = (n_tok + page - 1) / page + 3;
  c.table = malloc((size_t)n_pages * 4);
  for (int64_t i = 0; i < n_pages; i++)
    c.table[i] = (int32_t)i;
  for (int64_t i = n_pages - 1; i > 0; i--) { /* shuffle */
    int64_t j = (int64_t)(rng_u64() % (uint64_t)(i + 1));
    int32_t t = c.table[i];
    c.table[i] = c.table[j];
    c.table[j] = t;
  }
  c.kv.pool = calloc((size_t)(n_pages * page * (lora + rope)), 4);
  c.kv.page_size = page;
  c.kv.width = lora + rope;
  c.kv.lora = lora;
  c.kv.block_table = c.table;
  c.kv.n_ctx = n_tok;
  return c;
}

static void cache_free(tcache *c) {
  free(c->kv.pool);
  free(c->table);
}

static void test_kv_roundtrip(void **state) {
  rng_seed(6);
  const int64_t n = 23, lora = 10, rope = 4;
  tcache c = cache_make(n, 3, lora, rope);
  float *lat = malloc((size_t)(n * (lora + 2)) * 4), *kpe = malloc((size_t)(n * (rope + 1)) * 4);
  fill(lat, (size_t)(n * (lora + 2)));
  fill(kpe, (size_t)(n * (rope + 1)));
  /* in two chunks, with strided sources */
  assert_int_equal(g_ops->vt->kv_store(g_ops, &c.kv, 0, 8, lat, lora + 2, kpe, rope + 1), EPIC_OK);
  assert_int_equal(g_ops->vt->kv_store(g_ops, &c.kv, 8, n - 8, lat + 8 * (lora + 2), lora + 2,
                                       kpe + 8 * (rope + 1), rope + 1),
                   EPIC_OK);
  float *gl = malloc((size_t)(n * lora) * 4), *gk = malloc((size_t)(n * rope) * 4);
  assert_int_equal(g_ops->vt->kv_gather(g_ops, &c.kv, n, gl, gk), EPIC_OK);
  for (int64_t t = 0; t < n; t++) {
    assert_memory_equal(gl + t * lora, lat + t * (lora + 2), (size_t)lora * 4);
    assert_memory_equal(gk + t * rope, kpe + t * (rope + 1), (size_t)rope * 4);
    /* and physically where the block table says */
    const float *row = (const float *)c.kv.pool + (c.table[t / 3] * 3 + t % 3) * (lora + rope);
    assert_memory_equal(row, lat + t * (lora + 2), (size_t)lora * 4);
  }
  free(lat);
  free(kpe);
  free(gl);
  free(gk);
  cache_free(&c);
}

/* The CPU backend keeps fp32 caches (kv_dtype, and zero-initialised views are fp32) and
 * refuses every op on a bf16 view without touching the pool or the outputs. */
static void test_kv_dtype(void **state) {
  rng_seed(11);
  assert_int_equal(g_ops->vt->kv_dtype(g_ops), EPIC_KV_F32);
  const epic_kv_view zero = {0};
  assert_int_equal(zero.dtype, EPIC_KV_F32);
  assert_int_equal(epic_kv_dtype_size(EPIC_KV_F32), 4);
  assert_int_equal(epic_kv_dtype_size(EPIC_KV_BF16), 2);
  assert_int_equal(epic_kv_dtype_size((epic_kv_dtype)9), 0);
  const int64_t n = 5, lora = 8, rope = 4, H = 2;
  tcache c = cache_make(n, 2, lora, rope);
  const int64_t pool_n = ((n + 1) / 2 + 3) * 2 * (lora + rope); /* cache_make's pages */
  c.kv.dtype = EPIC_KV_BF16;
  float lat[5 * 8], kpe[5 * 4], qa[2 * 8], qp[2 * 4], out[5 * 8], keep[5 * 8];
  fill(lat, 5 * 8);
  fill(kpe, 5 * 4);
  fill(qa, 2 * 8);
  fill(qp, 2 * 4);
  fill(out, 5 * 8);
  memcpy(keep, out, sizeof out);
  assert_int_equal(g_ops->vt->kv_store(g_ops, &c.kv, 0, n, lat, lora, kpe, rope),
                   EPIC_ERR_UNSUPPORTED);
  const float *pool = c.kv.pool;
  for (int64_t i = 0; i < pool_n; i++)
    assert_true(pool[i] == 0.0f);
  assert_int_equal(g_ops->vt->kv_gather(g_ops, &c.kv, n, out, kpe), EPIC_ERR_UNSUPPORTED);
  assert_memory_equal(out, keep, sizeof out);
  assert_int_equal(g_ops->vt->mla_absorbed(g_ops, &c.kv, qa, qp, 1, n - 1, H, 0.5f, out),
                   EPIC_ERR_UNSUPPORTED);
  const int32_t len[1] = {5};
  const epic_kv_batch kb = {.pool = c.kv.pool, .page_size = 2, .width = lora + rope, .lora = lora,
                            .block_tables = c.table, .table_stride = 6, .n_ctx = len,
                            .max_ctx = 5, .dtype = EPIC_KV_BF16};
  assert_int_equal(g_ops->vt->mla_absorbed_batch(g_ops, &kb, 1, qa, qp, H, 0.5f, out),
                   EPIC_ERR_UNSUPPORTED);
  assert_int_equal(g_ops->vt->kv_store_batch(g_ops, &kb, 1, lat, lora, kpe, rope),
                   EPIC_ERR_UNSUPPORTED);
  assert_memory_equal(out, keep, sizeof out);
  for (int64_t i = 0; i < pool_n; i++)
    assert_true(pool[i] == 0.0f);
  c.kv.dtype = EPIC_KV_F32; /* the same view as fp32 works */
  assert_int_equal(g_ops->vt->kv_store(g_ops, &c.kv, 0, n, lat, lora, kpe, rope), EPIC_OK);
  cache_free(&c);
}

/* --------------------------------------------------------------- attention */

static void ref_mla(const float *q, const float *kvb, const float *kpe, int64_t m, int64_t start,
                    int64_t H, int64_t nope, int64_t rope, int64_t v, double scale, double *out) {
  const int64_t n = start + m;
  double *s = malloc((size_t)n * 8);
  for (int64_t i = 0; i < m; i++)
    for (int64_t h = 0; h < H; h++) {
      const float *qh = q + (i * H + h) * (nope + rope);
      const int64_t nk = start + i + 1;
      double mx = -INFINITY, sum = 0;
      for (int64_t t = 0; t < nk; t++) {
        const float *kh = kvb + (t * H + h) * (nope + v);
        double d = 0;
        for (int64_t j = 0; j < nope; j++)
          d += (double)qh[j] * kh[j];
        for (int64_t j = 0; j < rope; j++)
          d += (double)qh[nope + j] * kpe[t * rope + j];
        s[t] = scale * d;
        mx = fmax(mx, s[t]);
      }
      for (int64_t t = 0; t < nk; t++)
        sum += (s[t] = exp(s[t] - mx));
      for (int64_t j = 0; j < v; j++) {
        double acc = 0;
        for (int64_t t = 0; t < nk; t++)
          acc += s[t] / sum * kvb[(t * H + h) * (nope + v) + nope + j];
        out[(i * H + h) * v + j] = acc;
      }
    }
  free(s);
}

static void check_mla(int64_t m, int64_t start, int64_t H, int64_t nope, int64_t rope, int64_t v,
                      int64_t lora, int64_t page) {
  const int64_t n = start + m, dq = nope + rope, dkv = nope + v;
  const float scale = 1.0f / sqrtf((float)dq) * 1.7f;
  float *wkvb = malloc((size_t)(H * dkv * lora) * 4), *lat = malloc((size_t)(n * lora) * 4);
  float *kpe = malloc((size_t)(n * rope) * 4), *q = malloc((size_t)(m * H * dq) * 4);
  float *kvb = malloc((size_t)(n * H * dkv) * 4);
  fill(wkvb, (size_t)(H * dkv * lora));
  fill(lat, (size_t)(n * lora));
  fill(kpe, (size_t)(n * rope));
  fill(q, (size_t)(m * H * dq));
  for (int64_t i = 0; i < m * H * dq; i++)
    q[i] *= 2.0f; /* peaky softmax */
  epic_weight w = {.dtype = EPIC_DT_F32, .rows = H * dkv, .cols = lora, .data = wkvb};
  assert_int_equal(g_ops->vt->matmul(g_ops, lat, lora, n, &w, kvb, H * dkv), EPIC_OK);

  /* naive vs float64 */
  float *out = malloc((size_t)(m * H * v) * 4);
  double *ref = malloc((size_t)(m * H * v) * 8);
  assert_int_equal(g_ops->vt->mla_naive(g_ops, q, kvb, kpe, m, start, H, nope, rope, v, scale, out),
                   EPIC_OK);
  ref_mla(q, kvb, kpe, m, start, H, nope, rope, v, scale, ref);
  double mag = 0;
  for (int64_t i = 0; i < m * H * v; i++)
    mag = fmax(mag, fabs(ref[i]));
  for (int64_t i = 0; i < m * H * v; i++)
    expect_close("mla_naive", (size_t)i, out[i], ref[i], mag, 1e-5);

  /* absorbed: q_abs = q_nope . W_UK[h]; ctx over the paged cache; out = ctx . W_UV[h]^T */
  tcache c = cache_make(n, page, lora, rope);
  assert_int_equal(g_ops->vt->kv_store(g_ops, &c.kv, 0, n, lat, lora, kpe, rope), EPIC_OK);
  float *qabs = malloc((size_t)(m * H * lora) * 4), *qpe = malloc((size_t)(m * H * rope) * 4);
  float *ctx = malloc((size_t)(m * H * lora) * 4), *out2 = malloc((size_t)(m * H * v) * 4);
  for (int64_t i = 0; i < m * H; i++)
    memcpy(qpe + i * rope, q + i * dq + nope, (size_t)rope * 4);
  assert_int_equal(g_ops->vt->head_gemm(g_ops, q, H * dq, dq, m, H, wkvb, dkv * lora, nope, lora, 0,
                                        qabs, H * lora, lora),
                   EPIC_OK);
  assert_int_equal(g_ops->vt->mla_absorbed(g_ops, &c.kv, qabs, qpe, m, start, H, scale, ctx),
                   EPIC_OK);
  assert_int_equal(g_ops->vt->head_gemm(g_ops, ctx, H * lora, lora, m, H, wkvb + nope * lora,
                                        dkv * lora, lora, v, 1, out2, H * v, v),
                   EPIC_OK);
  for (int64_t i = 0; i < m * H * v; i++)
    expect_close("mla_absorbed", (size_t)i, out2[i], ref[i], mag, 1e-5);
  /* a cache that does not yet hold the queried positions is an error */
  c.kv.n_ctx = n - 1;
  assert_int_equal(g_ops->vt->mla_absorbed(g_ops, &c.kv, qabs, qpe, m, start, H, scale, ctx),
                   EPIC_ERR_INVALID);
  cache_free(&c);
  free(wkvb);
  free(lat);
  free(kpe);
  free(q);
  free(kvb);
  free(out);
  free(ref);
  free(qabs);
  free(qpe);
  free(ctx);
  free(out2);
}

static void test_mla(void **state) {
  rng_seed(7);
  check_mla(5, 0, 4, 16, 8, 12, 32, 3);  /* prefill */
  check_mla(7, 9, 4, 16, 8, 12, 32, 3);  /* chunked prefill with context */
  check_mla(1, 20, 4, 16, 8, 12, 32, 3); /* decode */
  check_mla(1, 0, 3, 8, 4, 8, 16, 3);    /* first token */
  check_mla(40, 3, 2, 16, 8, 16, 24, 5); /* crosses the query tile */
  check_mla(70, 100, 3, 24, 8, 20, 40, 16);
  check_mla(3, 2, 5, 128, 64, 128, 64, 3); /* DeepSeek-V3 head dims, small latent */
}

/* head_gemm's outputs y against the double sums over the weights a (widened to float). */
static void check_head(const char *what, const float *x, const float *a, const float *y,
                       int64_t m, int64_t H, int64_t k, int64_t n, int trans, int64_t ldxt,
                       int64_t ldxh, int64_t lda, int64_t ldyt, int64_t ldyh) {
  for (int64_t t = 0; t < m; t++)
    for (int64_t h = 0; h < H; h++)
      for (int64_t j = 0; j < n; j++) {
        double acc = 0;
        for (int64_t i = 0; i < k; i++)
          acc += (double)x[t * ldxt + h * ldxh + i] * a[h * lda + (trans ? j * k + i : i * n + j)];
        expect_close(what, (size_t)j, y[t * ldyt + h * ldyh + j], acc, 8, 1e-6);
      }
}

static void test_head_gemm(void **state) {
  rng_seed(8);
  const int64_t m = 3, H = 4, k = 7, n = 5;
  const int64_t ldxt = H * 9 + 2, ldxh = 9, ldyt = H * 6 + 1, ldyh = 6, lda = k * n + 3;
  float *x = malloc((size_t)(m * ldxt) * 4), *a = malloc((size_t)(H * lda) * 4),
        *y = malloc((size_t)(m * ldyt) * 4), *aw = malloc((size_t)(H * lda) * 4);
  uint16_t *ab = malloc((size_t)(H * lda) * 2);
  fill(x, (size_t)(m * ldxt));
  fill(a, (size_t)(H * lda));
  /* bf16 weights: the same sums over the weights' exact fp32 values */
  for (int64_t i = 0; i < H * lda; i++) {
    ab[i] = epic_f32_to_bf16(a[i]);
    aw[i] = epic_bf16_to_f32(ab[i]);
  }
  for (int trans = 0; trans < 2; trans++) {
    assert_int_equal(
        g_ops->vt->head_gemm(g_ops, x, ldxt, ldxh, m, H, a, lda, k, n, trans, y, ldyt, ldyh),
        EPIC_OK);
    check_head("head_gemm", x, a, y, m, H, k, n, trans, ldxt, ldxh, lda, ldyt, ldyh);
    assert_int_equal(g_ops->vt->head_gemm_bf16(g_ops, x, ldxt, ldxh, m, H, ab, lda, k, n, trans, y,
                                               ldyt, ldyh),
                     EPIC_OK);
    check_head("head_gemm_bf16", x, aw, y, m, H, k, n, trans, ldxt, ldxh, lda, ldyt, ldyh);
  }
  assert_int_equal(g_ops->vt->head_gemm_bf16(g_ops, x, ldxt, ldxh, m, H, NULL, lda, k, n, 0, y,
                                             ldyt, ldyh),
                   EPIC_ERR_INVALID);
  free(ab);
  free(aw);
  free(x);
  free(a);
  free(y);
}

/* ABI 3 row ops against their definitions written out naively. */
static void test_row_ops(void **state) {
  enum { N = 5, COLS = 7, LD = 9, K = 3, D = 6 };
  float src[N * LD], dst[N * LD], ref[N * LD];
  const int32_t sidx[N] = {4, 0, 3, 1, 2}, didx[N] = {2, 4, 0, 1, 3};
  fill(src, N * LD);
  /* An int32 bit pattern that is a NaN as a float must arrive unchanged. */
  const uint32_t nan_bits = 0x7fa00001u;
  memcpy(&src[3 * LD], &nan_bits, 4);
  memset(dst, 0, sizeof dst);
  memset(ref, 0, sizeof ref);
  assert_int_equal(g_ops->vt->copy_rows(g_ops, N, COLS, src, LD, sidx, dst, LD, didx), EPIC_OK);
  for (int i = 0; i < N; i++) memcpy(&ref[didx[i] * LD], &src[sidx[i] * LD], COLS * 4);
  assert_memory_equal(dst, ref, sizeof dst);
  uint32_t got_bits;
  for (int i = 0; i < N; i++)
    if (sidx[i] == 3) { /* item i carried src row 3 to dst row didx[i] */
      memcpy(&got_bits, &dst[didx[i] * LD], 4);
      assert_int_equal(got_bits, nan_bits);
    }
  assert_int_equal(g_ops->vt->zero(g_ops, dst, sizeof dst), EPIC_OK);
  for (int i = 0; i < N * LD; i++) assert_true(dst[i] == 0.0f);

  /* moe_combine: y[t] += w[t,k] * rows[slot[t,k]], k ascending, with and without slot. */
  float rows[N * K * D], w[N * K], y[N * D], yref[N * D];
  int32_t slot[N * K];
  fill(rows, N * K * D);
  fill(w, N * K);
  fill(y, N * D);
  memcpy(yref, y, sizeof y);
  for (int i = 0; i < N * K; i++) slot[i] = (int32_t)((i * 7) % (N * K));
  assert_int_equal(g_ops->vt->moe_combine(g_ops, N, K, D, rows, slot, w, y), EPIC_OK);
  for (int t = 0; t < N; t++)
    for (int k = 0; k < K; k++)
      for (int j = 0; j < D; j++) yref[t * D + j] += w[t * K + k] * rows[slot[t * K + k] * D + j];
  assert_memory_equal(y, yref, sizeof y);
  assert_int_equal(g_ops->vt->moe_combine(g_ops, N, K, D, rows, NULL, w, y), EPIC_OK);
  for (int t = 0; t < N; t++)
    for (int k = 0; k < K; k++)
      for (int j = 0; j < D; j++) yref[t * D + j] += w[t * K + k] * rows[(t * K + k) * D + j];
  assert_memory_equal(y, yref, sizeof y);
}

/* row_pick: argmax with the lowest id on ties, and the log-softmax at it. */
static void test_row_pick(void **state) {
  enum { M = 4, N = 1000 };
  float *x = malloc(sizeof(float) * M * N);
  int32_t ids[M];
  float lp[M];
  assert_non_null(x);
  fill(x, M * N);
  x[0 * N + 17] = 5.0f; /* row 0: a tie between ids 17 and 600 */
  x[0 * N + 600] = 5.0f;
  x[1 * N + N - 1] = 3.0f; /* row 1: the last id */
  for (int j = 0; j < N; j++) x[2 * N + j] = -1.0f; /* row 2: all equal: id 0, log(1/N) */
  assert_int_equal(g_ops->vt->row_pick(g_ops, x, M, N, ids, lp), EPIC_OK);
  assert_int_equal(ids[0], 17);
  assert_int_equal(ids[1], N - 1);
  assert_int_equal(ids[2], 0);
  assert_true(fabs(lp[2] + log((double)N)) < 1e-6);
  for (int i = 0; i < M; i++) {
    const float *r = x + (size_t)i * N;
    long double z = 0;
    for (int j = 0; j < N; j++) {
      assert_false(r[j] > r[ids[i]]);
      z += expl((long double)r[j] - (long double)r[ids[i]]);
    }
    assert_true(fabs((double)lp[i] + (double)logl(z)) < 1e-6);
  }
  assert_int_equal(g_ops->vt->row_pick(g_ops, x, 0, N, ids, lp), EPIC_OK);
  assert_int_equal(g_ops->vt->row_pick(g_ops, x, M, 0, ids, lp), EPIC_ERR_INVALID);
  free(x);
}

/* grouped_matmul equals matmul on each group's rows; empty groups need no weight. */
static void test_grouped_matmul(void **state) {
  enum { G = 4, N = 6, K = 8 };
  const int64_t off[G + 1] = {0, 2, 2, 5, 6};
  float wdata[G][N * K], x[6 * K], y[6 * N], ref[6 * N];
  epic_weight w[G];
  memset(w, 0, sizeof w);
  fill(x, 6 * K);
  for (int g = 0; g < G; g++) {
    if (g == 1) continue;
    fill(wdata[g], N * K);
    w[g] = (epic_weight){.dtype = EPIC_DT_F32, .rows = N, .cols = K, .data = wdata[g]};
  }
  assert_int_equal(g_ops->vt->grouped_matmul(g_ops, x, K, off, NULL, G, w, 1, y, N), EPIC_OK);
  for (int g = 0; g < G; g++)
    if (off[g + 1] > off[g])
      assert_int_equal(g_ops->vt->matmul(g_ops, x + off[g] * K, K, off[g + 1] - off[g], &w[g],
                                         ref + off[g] * N, N),
                       EPIC_OK);
  assert_memory_equal(y, ref, sizeof y);
  const int64_t bad[G + 1] = {0, 2, 1, 5, 6};
  assert_int_equal(g_ops->vt->grouped_matmul(g_ops, x, K, bad, NULL, G, w, 1, y, N), EPIC_ERR_INVALID);
}

/* moe_plan: the items in ascending expert order, item order kept within an expert
 * (checked against a direct count of the earlier items of the same expert), offsets,
 * source rows item / div, accumulated counts, and bad ids refused. grouped_matmul_dev
 * on the plan's offsets equals grouped_matmul; an offset list that breaks its bound or
 * does not end at rows is refused. */
static void test_moe_plan(void **state) {
  enum { N = 37, E = 5, DIV = 3, G = 4, R = 6, NW = 6, K = 8 };
  int32_t idx[N], plan[2 * N + E + 1];
  int64_t counts[E] = {1, 2, 3, 4, 5};
  for (int i = 0; i < N; i++) idx[i] = (int32_t)((i * 7 + i / 5) % E);
  idx[4] = idx[5] = idx[6] = 2; /* a run of one expert */
  assert_int_equal(g_ops->vt->moe_plan(g_ops, idx, N, E, DIV, plan, counts), EPIC_OK);
  const int32_t *off = plan + 2 * N;
  assert_int_equal(off[0], 0);
  assert_int_equal(off[E], N);
  for (int i = 0; i < N; i++) {
    int before = 0, of_e = 0;
    for (int j = 0; j < i; j++) before += idx[j] == idx[i];
    for (int j = 0; j < N; j++) of_e += idx[j] == idx[i];
    const int pos = off[idx[i]] + before;
    assert_int_equal(plan[N + pos], i);
    assert_int_equal(plan[pos], i / DIV);
    assert_int_equal(off[idx[i] + 1] - off[idx[i]], of_e);
  }
  for (int e = 0; e < E; e++) assert_int_equal(counts[e], e + 1 + off[e + 1] - off[e]);
  idx[9] = E;
  assert_int_equal(g_ops->vt->moe_plan(g_ops, idx, N, E, DIV, plan, NULL), EPIC_ERR_INVALID);
  idx[9] = -1;
  assert_int_equal(g_ops->vt->moe_plan(g_ops, idx, N, E, DIV, plan, NULL), EPIC_ERR_INVALID);
  assert_int_equal(g_ops->vt->moe_plan(g_ops, idx, N, E, 0, plan, NULL), EPIC_ERR_INVALID);

  const int32_t goff[G + 1] = {0, 2, 2, 5, 6};
  const int64_t goff64[G + 1] = {0, 2, 2, 5, 6};
  float wdata[G][NW * K], x[R * K], y[R * NW], ref[R * NW];
  epic_weight w[G];
  memset(w, 0, sizeof w);
  fill(x, R * K);
  for (int g = 0; g < G; g++) {
    if (g == 1) continue;
    fill(wdata[g], NW * K);
    w[g] = (epic_weight){.dtype = EPIC_DT_F32, .rows = NW, .cols = K, .data = wdata[g]};
  }
  assert_int_equal(g_ops->vt->grouped_matmul(g_ops, x, K, goff64, NULL, G, w, 1, ref, NW), EPIC_OK);
  assert_int_equal(g_ops->vt->grouped_matmul_dev(g_ops, x, K, R, 3, goff, G, w, 1, y, NW), EPIC_OK);
  assert_memory_equal(y, ref, sizeof y);
  assert_int_equal(g_ops->vt->grouped_matmul_dev(g_ops, x, K, R, 2, goff, G, w, 1, y, NW),
                   EPIC_ERR_INVALID); /* group 2 has 3 rows */
  assert_int_equal(g_ops->vt->grouped_matmul_dev(g_ops, x, K, R + 1, 3, goff, G, w, 1, y, NW),
                   EPIC_ERR_INVALID);
  assert_true(epic_ops_has_moe_plan(g_ops));
}

/* kv_store_batch writes what kv_store writes at each sequence's last position. */
static void test_kv_store_batch(void **state) {
  enum { PS = 3, W = 10, LORA = 6, PAGES = 12, NS = 3, STRIDE = 4 };
  float *pool_a = calloc(PAGES * PS * W, 4), *pool_b = calloc(PAGES * PS * W, 4);
  const int32_t tables[NS * STRIDE] = {5, 1, 0, 0, 7, 0, 0, 0, 2, 9, 11, 3};
  const int32_t n_ctx[NS] = {5, 1, 12};
  float lat[NS * 8], kpe[NS * 5];
  assert_non_null(pool_a);
  assert_non_null(pool_b);
  fill(lat, NS * 8);
  fill(kpe, NS * 5);
  const epic_kv_batch kb = {.pool = pool_a, .page_size = PS, .width = W, .lora = LORA,
                            .block_tables = tables, .table_stride = STRIDE, .n_ctx = n_ctx,
                            .max_ctx = 12};
  assert_int_equal(g_ops->vt->kv_store_batch(g_ops, &kb, NS, lat, 8, kpe, 5), EPIC_OK);
  for (int s = 0; s < NS; s++) {
    const epic_kv_view v = {.pool = pool_b, .page_size = PS, .width = W, .lora = LORA,
                            .block_table = tables + s * STRIDE, .n_ctx = n_ctx[s]};
    assert_int_equal(g_ops->vt->kv_store(g_ops, &v, n_ctx[s] - 1, 1, lat + s * 8, 8, kpe + s * 5, 5),
                     EPIC_OK);
  }
  assert_memory_equal(pool_a, pool_b, PAGES * PS * W * 4);
  free(pool_a);
  free(pool_b);
}

static void test_memory(void **state) {
  /* host backend: the engine's default step budget stays 2048 tokens */
  assert_int_equal(epic_ops_step_tokens(g_ops), 2048);
  /* its rows, expert rows included, are computed alike whatever the batch: MTP drafting
   * and EPLB copies are on by default, for any expert weights */
  assert_true(epic_ops_rows_invariant(g_ops));
  const epic_weight bf16 = {.dtype = EPIC_DT_BF16, .rows = 64, .cols = 48};
  const epic_weight fp8 = {.dtype = EPIC_DT_F8E4M3, .rows = 64, .cols = 48, .block_rows = 128,
                           .block_cols = 128};
  assert_true(epic_ops_experts_invariant(g_ops, &bf16));
  assert_true(epic_ops_experts_invariant(g_ops, &fp8));
  void *p = NULL;
  assert_int_equal(g_ops->vt->alloc(g_ops, 1000, &p), EPIC_OK);
  assert_non_null(p);
  assert_int_equal((uintptr_t)p % 64, 0);
  for (int i = 0; i < 1000; i++)
    assert_int_equal(((unsigned char *)p)[i], 0);
  char src[100], back[100];
  for (int i = 0; i < 100; i++)
    src[i] = (char)i;
  assert_int_equal(g_ops->vt->upload(g_ops, p, src, 100), EPIC_OK);
  assert_int_equal(g_ops->vt->download(g_ops, back, p, 100), EPIC_OK);
  assert_memory_equal(src, back, 100);
  g_ops->vt->free(g_ops, p);
  g_ops->vt->free(g_ops, NULL);
  assert_int_equal(g_ops->vt->abi_version, EPIC_OPS_ABI_VERSION);
  assert_string_equal(g_ops->vt->name, "cpu");
  /* host memory: the model gathers expert rows itself and the host orders exchanges */
  assert_false(epic_ops_has_grouped_rows(g_ops));
  assert_null(epic_ops_queue(g_ops));
  /* a second backend object with its own thread count coexists with the first */
  epic_ops *one = NULL;
  assert_int_equal(epic_ops_cpu_create(1, &one), EPIC_OK);
  float x[6] = {1, 2, 3, 4, 5, 6}, wv[6] = {1, 0, 0, 0, 1, 0}, y[4];
  epic_weight w = {.dtype = EPIC_DT_F32, .rows = 2, .cols = 3, .data = wv};
  assert_int_equal(one->vt->matmul(one, x, 3, 2, &w, y, 2), EPIC_OK);
  assert_true(y[0] == 1 && y[1] == 2 && y[2] == 4 && y[3] == 5);
  epic_ops_destroy(one);
  epic_ops_destroy(NULL);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_fp8_codes),
      cmocka_unit_test(test_bf16_f16),
      cmocka_unit_test(test_fast_dequant_exhaustive),
      cmocka_unit_test(test_matmul),
      cmocka_unit_test(test_rmsnorm),
      cmocka_unit_test(test_rope),
      cmocka_unit_test(test_silu_axpy),
      cmocka_unit_test(test_route),
      cmocka_unit_test(test_kv_roundtrip),
      cmocka_unit_test(test_kv_dtype),
      cmocka_unit_test(test_head_gemm),
      cmocka_unit_test(test_mla),
      cmocka_unit_test(test_memory),
      cmocka_unit_test(test_row_ops),
      cmocka_unit_test(test_row_pick),
      cmocka_unit_test(test_kv_store_batch),
      cmocka_unit_test(test_grouped_matmul),
      cmocka_unit_test(test_moe_plan),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
