/* CPU MLA attention (naive and absorbed forms) and the per-head GEMM used for the
 * absorption. Work items are (head, query tile) pairs; each computes its score
 * block with sgemm, applies the causal mask and an fp32 softmax, and multiplies
 * by the values with a second sgemm. OpenBLAS is single-threaded inside items. */
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "../../common/log.h"
#include "ops_cpu_impl.h"

enum { EPIC_CPU_QTILE = 32 };

/* Row i of s[mi][ld] keeps columns [0, valid): softmax over them, zero the rest. */
static void softmax_causal(float *s, int64_t mi, int64_t ld, int64_t first_valid) {
  for (int64_t i = 0; i < mi; i++) {
    float *r = s + i * ld;
    const int64_t valid = first_valid + i;
    float mx = -INFINITY;
    for (int64_t j = 0; j < valid; j++)
      mx = r[j] > mx ? r[j] : mx;
    double sum = 0.0;
    for (int64_t j = 0; j < valid; j++) {
      r[j] = expf(r[j] - mx);
      sum += r[j];
    }
    const float inv = (float)(1.0 / sum);
    for (int64_t j = 0; j < valid; j++)
      r[j] *= inv;
    for (int64_t j = valid; j < ld; j++)
      r[j] = 0.0f;
  }
}

epic_status epic_cpu_mla_naive(epic_ops *o, const float *q, const float *kvb, const float *kpe,
                               int64_t m, int64_t start, int64_t n_heads, int64_t nope,
                               int64_t rope, int64_t v, float scale, float *out) {
  if (m == 0 || n_heads == 0) return EPIC_OK;
  if (m < 0 || start < 0 || n_heads < 0 || nope < 0 || rope < 0 || v <= 0 || nope + rope <= 0 ||
      !q || !kvb || (rope && !kpe) || !out)
    return EPIC_ERR_INVALID;
  epic_cpu_ops *c = epic_cpu_of(o);
  const int64_t ldq = n_heads * (nope + rope), ldk = n_heads * (nope + v), ldo = n_heads * v;
  const int64_t n_qt = (m + EPIC_CPU_QTILE - 1) / EPIC_CPU_QTILE, n_items = n_heads * n_qt;
  const int64_t qt = m < EPIC_CPU_QTILE ? m : EPIC_CPU_QTILE;
  atomic_int failed = 0;
#pragma omp parallel num_threads(c->n_threads)
  {
    float *s = epic_cpu_scratch_get(c, omp_get_thread_num(), (size_t)(qt * (start + m)));
    if (!s) atomic_store(&failed, 1);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; it++) {
      if (!s) continue;
      const int64_t h = it % n_heads, i0 = (it / n_heads) * EPIC_CPU_QTILE;
      const int64_t mi = m - i0 < EPIC_CPU_QTILE ? m - i0 : EPIC_CPU_QTILE, nk = start + i0 + mi;
      const float *qh = q + i0 * ldq + h * (nope + rope);
      const float *kh = kvb + h * (nope + v);
      if (nope)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)mi, (int)nk, (int)nope, scale, qh,
                    (int)ldq, kh, (int)ldk, 0.0f, s, (int)nk);
      if (rope)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)mi, (int)nk, (int)rope, scale,
                    qh + nope, (int)ldq, kpe, (int)rope, nope ? 1.0f : 0.0f, s, (int)nk);
      softmax_causal(s, mi, nk, start + i0 + 1);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)mi, (int)v, (int)nk, 1.0f, s,
                  (int)nk, kh + nope, (int)ldk, 0.0f, out + i0 * ldo + h * v, (int)ldo);
    }
  }
  return atomic_load(&failed) ? EPIC_ERR_NOMEM : EPIC_OK;
}

epic_status epic_cpu_mla_absorbed(epic_ops *o, const epic_kv_view *kv, const float *q_abs,
                                  const float *q_pe, int64_t m, int64_t start, int64_t n_heads,
                                  float scale, float *ctx) {
  if (m == 0 || n_heads == 0) return EPIC_OK;
  if (!kv || !kv->pool || !kv->block_table || kv->page_size <= 0 || kv->lora <= 0 ||
      kv->lora > kv->width || m < 0 || start < 0 || n_heads < 0 || !q_abs || !ctx ||
      (kv->width > kv->lora && !q_pe))
    return EPIC_ERR_INVALID;
  EPIC_CHECK(epic_cpu_kv_dtype_ok(kv->dtype, "mla_absorbed"));
  if (start + m > kv->n_ctx) {
    EPIC_LOG_ERROR("mla_absorbed: queries up to position %lld but cache holds %lld tokens",
                   (long long)(start + m - 1), (long long)kv->n_ctx);
    return EPIC_ERR_INVALID;
  }
  epic_cpu_ops *c = epic_cpu_of(o);
  const int64_t lora = kv->lora, rope = kv->width - kv->lora, width = kv->width;
  const int64_t n_keys = start + m;
  /* Pages are scattered; one contiguous copy of the keys lets every item use plain sgemm. */
  float *keys = epic_cpu_shared_get(c, (size_t)(n_keys * width));
  if (!keys) return EPIC_ERR_NOMEM;
#pragma omp parallel for num_threads(c->n_threads) schedule(static) if (n_keys * width > 65536)
  for (int64_t t = 0; t < n_keys; t++)
    memcpy(keys + t * width, epic_cpu_kv_row(kv, t), (size_t)width * sizeof(float));

  const int64_t ldq = n_heads * lora, ldp = n_heads * rope;
  const int64_t n_qt = (m + EPIC_CPU_QTILE - 1) / EPIC_CPU_QTILE, n_items = n_heads * n_qt;
  const int64_t qt = m < EPIC_CPU_QTILE ? m : EPIC_CPU_QTILE;
  atomic_int failed = 0;
#pragma omp parallel num_threads(c->n_threads)
  {
    float *s = epic_cpu_scratch_get(c, omp_get_thread_num(), (size_t)(qt * n_keys));
    if (!s) atomic_store(&failed, 1);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; it++) {
      if (!s) continue;
      const int64_t h = it % n_heads, i0 = (it / n_heads) * EPIC_CPU_QTILE;
      const int64_t mi = m - i0 < EPIC_CPU_QTILE ? m - i0 : EPIC_CPU_QTILE, nk = start + i0 + mi;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)mi, (int)nk, (int)lora, scale,
                  q_abs + i0 * ldq + h * lora, (int)ldq, keys, (int)width, 0.0f, s, (int)nk);
      if (rope)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)mi, (int)nk, (int)rope, scale,
                    q_pe + i0 * ldp + h * rope, (int)ldp, keys + lora, (int)width, 1.0f, s,
                    (int)nk);
      softmax_causal(s, mi, nk, start + i0 + 1);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)mi, (int)lora, (int)nk, 1.0f, s,
                  (int)nk, keys, (int)width, 0.0f, ctx + i0 * ldq + h * lora, (int)ldq);
    }
  }
  return atomic_load(&failed) ? EPIC_ERR_NOMEM : EPIC_OK;
}

static epic_status head_gemm_args(int64_t m, int64_t n_heads, int64_t k, int64_t n,
                                  const void *x, const void *a, const void *y) {
  if (m < 0 || n_heads < 0 || k <= 0 || n < 0 || !x || !a || !y) return EPIC_ERR_INVALID;
  return EPIC_OK;
}

epic_status epic_cpu_head_gemm(epic_ops *o, const float *x, int64_t ld_x_tok, int64_t ld_x_head,
                               int64_t m, int64_t n_heads, const float *a, int64_t ld_a_head,
                               int64_t k, int64_t n, int trans, float *y, int64_t ld_y_tok,
                               int64_t ld_y_head) {
  if (m == 0 || n_heads == 0 || n == 0) return EPIC_OK;
  EPIC_CHECK(head_gemm_args(m, n_heads, k, n, x, a, y));
  epic_cpu_ops *c = epic_cpu_of(o);
  /* One token at a time: BLAS may pick other kernels (other summation orders) for
   * other row counts, and a token's result must not depend on how many sequences
   * share its decode batch. */
#pragma omp parallel for num_threads(c->n_threads) schedule(dynamic, 1) collapse(2) if (n_heads * m > 1)
  for (int64_t t = 0; t < m; t++)
    for (int64_t h = 0; h < n_heads; h++)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, trans ? CblasTrans : CblasNoTrans, 1, (int)n,
                  (int)k, 1.0f, x + t * ld_x_tok + h * ld_x_head, (int)k, a + h * ld_a_head,
                  trans ? (int)k : (int)n, 0.0f, y + t * ld_y_tok + h * ld_y_head, (int)n);
  return EPIC_OK;
}

/* The bf16 weights of each head widened to fp32 once (exactly), then every token as
 * epic_cpu_head_gemm multiplies it: the same sums as the fp32 op on the widened weights. */
epic_status epic_cpu_head_gemm_bf16(epic_ops *o, const float *x, int64_t ld_x_tok,
                                    int64_t ld_x_head, int64_t m, int64_t n_heads,
                                    const uint16_t *a, int64_t ld_a_head, int64_t k, int64_t n,
                                    int trans, float *y, int64_t ld_y_tok, int64_t ld_y_head) {
  if (m == 0 || n_heads == 0 || n == 0) return EPIC_OK;
  EPIC_CHECK(head_gemm_args(m, n_heads, k, n, x, a, y));
  epic_cpu_ops *c = epic_cpu_of(o);
  atomic_int failed = 0;
#pragma omp parallel num_threads(c->n_threads) if (n_heads > 1)
  {
    float *wf = malloc((size_t)(k * n) * sizeof(float));
    if (!wf) atomic_store(&failed, 1);
#pragma omp for schedule(dynamic, 1)
    for (int64_t h = 0; h < n_heads; h++) {
      if (!wf) continue;
      const uint16_t *ah = a + h * ld_a_head;
      for (int64_t i = 0; i < k * n; i++) wf[i] = epic_bf16_to_f32(ah[i]);
      for (int64_t t = 0; t < m; t++)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, trans ? CblasTrans : CblasNoTrans, 1, (int)n,
                    (int)k, 1.0f, x + t * ld_x_tok + h * ld_x_head, (int)k, wf,
                    trans ? (int)k : (int)n, 0.0f, y + t * ld_y_tok + h * ld_y_head, (int)n);
    }
    free(wf);
  }
  return atomic_load(&failed) ? EPIC_ERR_NOMEM : EPIC_OK;
}
