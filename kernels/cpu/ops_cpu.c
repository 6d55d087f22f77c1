/* CPU backend of epic_ops: object lifetime, memory, and the element-wise ops.
 * This backend is the correctness reference for every other backend, so the
 * reductions that decide accuracy (rmsnorm statistics, rope angles) run in double. */
#include <cblas.h>
#include <math.h>
#include <stdint.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "../../common/log.h"
#include "ops_cpu_impl.h"

static float *scratch_grow(epic_cpu_scratch *s, size_t n) {
  if (s->cap >= n && s->p) return s->p;
  size_t bytes = (n * sizeof(float) + 63) & ~(size_t)63;
  float *p = aligned_alloc(64, bytes ? bytes : 64);
  if (!p) return NULL;
  free(s->p);
  s->p = p;
  s->cap = n;
  return p;
}

float *epic_cpu_scratch_get(epic_cpu_ops *c, int tid, size_t n) {
  if (tid < 0 || tid >= c->n_threads) return NULL;
  return scratch_grow(&c->scratch[tid], n);
}

float *epic_cpu_shared_get(epic_cpu_ops *c, size_t n) { return scratch_grow(&c->shared, n); }

/* Rows are independent; only split across threads when there is enough work to
 * pay for the fork. */
static int epic_cpu_par(int64_t m, int64_t work) { return m > 1 && work >= 32768; }

static epic_status cpu_rmsnorm(epic_ops *o, const float *x, int64_t ldx, int64_t m, int64_t n,
                               const float *w, float eps, float *y, int64_t ldy) {
  if (m < 0 || n <= 0 || !x || !w || !y) return m == 0 ? EPIC_OK : EPIC_ERR_INVALID;
  epic_cpu_ops *c = epic_cpu_of(o);
#pragma omp parallel for num_threads(c->n_threads) schedule(static) if (epic_cpu_par(m, m * n))
  for (int64_t i = 0; i < m; i++) {
    const float *xi = x + i * ldx;
    float *yi = y + i * ldy;
    double ss = 0.0;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < n; j++)
      ss += (double)xi[j] * (double)xi[j];
    const double r = 1.0 / sqrt(ss / (double)n + (double)eps);
    for (int64_t j = 0; j < n; j++)
      yi[j] = (float)((double)w[j] * ((double)xi[j] * r));
  }
  return EPIC_OK;
}

static epic_status cpu_rope(epic_ops *o, float *x, int64_t m, int64_t n_heads, int64_t ld_tok,
                            int64_t ld_head, int64_t rope_dim, const int32_t *pos,
                            const double *inv_freq) {
  if (m == 0 || n_heads == 0 || rope_dim == 0) return EPIC_OK;
  if (m < 0 || n_heads < 0 || rope_dim < 0 || (rope_dim & 1) || !x || !pos || !inv_freq)
    return EPIC_ERR_INVALID;
  epic_cpu_ops *c = epic_cpu_of(o);
#pragma omp parallel for num_threads(c->n_threads)                                                 \
    schedule(static) if (epic_cpu_par(m, m * n_heads * rope_dim * 8))
  for (int64_t t = 0; t < m; t++) {
    for (int64_t j = 0; j < rope_dim / 2; j++) {
      const double ang = (double)pos[t] * inv_freq[j];
      const double cs = cos(ang), sn = sin(ang);
      for (int64_t h = 0; h < n_heads; h++) {
        float *p = x + t * ld_tok + h * ld_head + 2 * j;
        const double a = p[0], b = p[1];
        p[0] = (float)(a * cs - b * sn);
        p[1] = (float)(a * sn + b * cs);
      }
    }
  }
  return EPIC_OK;
}

static epic_status cpu_silu_mul(epic_ops *o, const float *g, int64_t ldg, const float *u,
                                int64_t ldu, int64_t m, int64_t n, float *y, int64_t ldy) {
  if (m == 0 || n == 0) return EPIC_OK;
  if (m < 0 || n < 0 || !g || !u || !y) return EPIC_ERR_INVALID;
  epic_cpu_ops *c = epic_cpu_of(o);
#pragma omp parallel for num_threads(c->n_threads) schedule(static) if (epic_cpu_par(m, m * n))
  for (int64_t i = 0; i < m; i++) {
    const float *gi = g + i * ldg, *ui = u + i * ldu;
    float *yi = y + i * ldy;
    for (int64_t j = 0; j < n; j++) {
      const float z = gi[j];
      yi[j] = z / (1.0f + expf(-z)) * ui[j];
    }
  }
  return EPIC_OK;
}

static epic_status cpu_axpy(epic_ops *o, int64_t n, float a, const float *x, float *y) {
  if (n == 0) return EPIC_OK;
  if (n < 0 || !x || !y) return EPIC_ERR_INVALID;
  for (int64_t i = 0; i < n; i++)
    y[i] += a * x[i];
  return EPIC_OK;
}

static epic_status cpu_embed(epic_ops *o, const epic_weight *table, const int32_t *ids, int64_t m,
                             float *y) {
  if (m == 0) return EPIC_OK;
  if (m < 0 || !table || !ids || !y) return EPIC_ERR_INVALID;
  for (int64_t i = 0; i < m; i++)
    if (ids[i] < 0 || ids[i] >= table->rows) {
      EPIC_LOG_ERROR("embed: token id %d outside [0, %lld)", ids[i], (long long)table->rows);
      return EPIC_ERR_INVALID;
    }
  for (int64_t i = 0; i < m; i++)
    epic_cpu_dequant_rows(table, ids[i], 1, y + i * table->cols);
  return EPIC_OK;
}

epic_status epic_cpu_kv_dtype_ok(epic_kv_dtype dt, const char *op) {
  if (dt == EPIC_KV_F32) return EPIC_OK;
  EPIC_LOG_ERROR("%s: the CPU backend keeps fp32 KV caches only (view dtype %d)", op, (int)dt);
  return EPIC_ERR_UNSUPPORTED;
}

static epic_kv_dtype cpu_kv_dtype(epic_ops *o) { return EPIC_KV_F32; }

static epic_status cpu_kv_store(epic_ops *o, const epic_kv_view *kv, int64_t start, int64_t m,
                                const float *latent, int64_t ld_latent, const float *kpe,
                                int64_t ld_kpe) {
  if (m == 0) return EPIC_OK;
  if (!kv || m < 0 || start < 0 || !latent || !kpe || kv->lora < 0 || kv->lora > kv->width ||
      kv->page_size <= 0)
    return EPIC_ERR_INVALID;
  EPIC_CHECK(epic_cpu_kv_dtype_ok(kv->dtype, "kv_store"));
  const size_t nl = (size_t)kv->lora, nr = (size_t)(kv->width - kv->lora);
  for (int64_t t = 0; t < m; t++) {
    float *row = epic_cpu_kv_row(kv, start + t);
    memcpy(row, latent + t * ld_latent, nl * sizeof(float));
    memcpy(row + nl, kpe + t * ld_kpe, nr * sizeof(float));
  }
  return EPIC_OK;
}

static epic_status cpu_kv_gather(epic_ops *o, const epic_kv_view *kv, int64_t n, float *latent,
                                 float *kpe) {
  if (n == 0) return EPIC_OK;
  if (!kv || n < 0 || !latent || !kpe || kv->lora < 0 || kv->lora > kv->width || kv->page_size <= 0)
    return EPIC_ERR_INVALID;
  EPIC_CHECK(epic_cpu_kv_dtype_ok(kv->dtype, "kv_gather"));
  const size_t nl = (size_t)kv->lora, nr = (size_t)(kv->width - kv->lora);
  for (int64_t t = 0; t < n; t++) {
    const float *row = epic_cpu_kv_row(kv, t);
    memcpy(latent + (size_t)t * nl, row, nl * sizeof(float));
    memcpy(kpe + (size_t)t * nr, row + nl, nr * sizeof(float));
  }
  return EPIC_OK;
}

/* Zeroed, 64-byte aligned memory through calloc, which hands large blocks
 * straight from fresh (already zero) pages without touching them: a multi-GiB
 * KV cache costs nothing until it is used. The block's start is kept just below
 * the aligned pointer for cpu_free. */
static epic_status cpu_alloc(epic_ops *o, size_t bytes, void **out) {
  if (!out) return EPIC_ERR_INVALID;
  *out = NULL;
  const size_t extra = 64 + sizeof(void *);
  if (bytes > SIZE_MAX - extra) return EPIC_ERR_NOMEM;
  char *base = calloc(1, bytes + extra);
  if (!base) return EPIC_ERR_NOMEM;
  uintptr_t a = ((uintptr_t)base + sizeof(void *) + 63) & ~(uintptr_t)63;
  ((void **)a)[-1] = base;
  *out = (void *)a;
  return EPIC_OK;
}

static void cpu_free(epic_ops *o, void *p) {
  if (p) free(((void **)p)[-1]);
}

static epic_status cpu_copy(epic_ops *o, void *dst, const void *src, size_t bytes) {
  if (bytes == 0) return EPIC_OK;
  if (!dst || !src) return EPIC_ERR_INVALID;
  memcpy(dst, src, bytes);
  return EPIC_OK;
}

static void cpu_destroy(epic_ops *o) {
  if (!o) return;
  epic_cpu_ops *c = epic_cpu_of(o);
  if (c->scratch)
    for (int t = 0; t < c->n_threads; t++)
      free(c->scratch[t].p);
  free(c->scratch);
  free(c->shared.p);
  free(c);
}

/* ---- ABI 3: the ops that keep a forward in backend memory ---- */

static epic_status cpu_copy_rows(epic_ops *o, int64_t n, int64_t cols, const float *src,
                                 int64_t ld_src, const int32_t *src_idx, float *dst,
                                 int64_t ld_dst, const int32_t *dst_idx) {
  if (n == 0 || cols == 0) return EPIC_OK;
  if (n < 0 || cols < 0 || !src || !dst) return EPIC_ERR_INVALID;
  for (int64_t i = 0; i < n; i++) {
    const int64_t r = src_idx ? src_idx[i] : i, w = dst_idx ? dst_idx[i] : i;
    if (r < 0 || w < 0) {
      EPIC_LOG_ERROR("copy_rows: negative row index at item %lld", (long long)i);
      return EPIC_ERR_INVALID;
    }
    /* memcpy keeps int32 bit patterns (expert tags) exactly. */
    memcpy(dst + w * ld_dst, src + r * ld_src, (size_t)cols * sizeof(float));
  }
  return EPIC_OK;
}

static epic_status cpu_zero(epic_ops *o, void *p, size_t bytes) {
  if (bytes == 0) return EPIC_OK;
  if (!p) return EPIC_ERR_INVALID;
  memset(p, 0, bytes);
  return EPIC_OK;
}

/* The same loops as worker/sampler.c's epic_argmax and log-softmax (sequential sum),
 * so a greedy pick here equals the sampler's bit for bit. */
static epic_status cpu_row_pick(epic_ops *o, const float *x, int64_t m, int64_t n, int32_t *ids,
                                float *logprob) {
  epic_cpu_ops *c = (epic_cpu_ops *)o;
  if (m == 0) return EPIC_OK;
  if (m < 0 || n <= 0 || !x || !ids || !logprob) return EPIC_ERR_INVALID;
#pragma omp parallel for num_threads(c->n_threads) schedule(static) if (epic_cpu_par(m, m * n))
  for (int64_t i = 0; i < m; i++) {
    const float *xi = x + i * n;
    int64_t best = 0;
    for (int64_t j = 1; j < n; j++)
      if (xi[j] > xi[best]) best = j;
    const double mx = xi[best];
    double sum = 0;
    for (int64_t j = 0; j < n; j++) sum += exp((double)xi[j] - mx);
    ids[i] = (int32_t)best;
    logprob[i] = (float)((double)xi[best] - mx - log(sum));
  }
  return EPIC_OK;
}

static epic_status cpu_row_draw(epic_ops *o, const float *x, int64_t m, int64_t n,
                                const epic_draw_params *p, int32_t *ids, float *logprob) {
  epic_cpu_ops *c = (epic_cpu_ops *)o;
  int failed = 0;
  if (m == 0) return EPIC_OK;
  if (m < 0 || n <= 0 || !x || !p || !ids || !logprob) return EPIC_ERR_INVALID;
  /* scratch in floats: epic_draw_scratch_bytes(n), 8-byte aligned (the allocator's) */
  const size_t words = (epic_draw_scratch_bytes(n) + sizeof(float) - 1) / sizeof(float);
#pragma omp parallel for num_threads(c->n_threads) schedule(dynamic, 1) if (m > 1)
  for (int64_t i = 0; i < m; i++) {
    if (!(p[i].temperature > 0.0f)) continue;
    float *scratch = epic_cpu_scratch_get(c, omp_get_thread_num(), words);
    if (!scratch) {
#pragma omp atomic write
      failed = 1;
      continue;
    }
    const float *xi = x + i * n;
    const double lse = (double)xi[ids[i]] - (double)logprob[i];
    ids[i] = epic_draw_row(xi, n, &p[i], scratch);
    logprob[i] = (float)((double)xi[ids[i]] - lse);
  }
  return failed ? EPIC_ERR_NOMEM : EPIC_OK;
}

static epic_status cpu_moe_combine(epic_ops *o, int64_t m, int64_t top_k, int64_t n,
                                   const float *rows, const int32_t *slot, const float *w,
                                   float *y) {
  epic_cpu_ops *c = (epic_cpu_ops *)o;
  if (m == 0 || top_k == 0 || n == 0) return EPIC_OK;
  if (m < 0 || top_k < 0 || n < 0 || !rows || !w || !y) return EPIC_ERR_INVALID;
  /* Tokens are independent; inside a token k runs in order, as the contract says. */
#pragma omp parallel for num_threads(c->n_threads) schedule(static) if (m * n > 65536)
  for (int64_t t = 0; t < m; t++)
    for (int64_t k = 0; k < top_k; k++) {
      const int64_t i = t * top_k + k;
      const float a = w[i], *x = rows + (slot ? (int64_t)slot[i] : i) * n;
      float *yt = y + t * n;
      for (int64_t j = 0; j < n; j++) yt[j] += a * x[j];
    }
  return EPIC_OK;
}

static epic_status cpu_kv_store_batch(epic_ops *o, const epic_kv_batch *kv, int64_t n_seq,
                                      const float *latent, int64_t ld_latent, const float *kpe,
                                      int64_t ld_kpe) {
  if (n_seq == 0) return EPIC_OK;
  if (!kv || n_seq < 0 || !kv->n_ctx || !kv->block_tables) return EPIC_ERR_INVALID;
  EPIC_CHECK(epic_cpu_kv_dtype_ok(kv->dtype, "kv_store_batch"));
  for (int64_t s = 0; s < n_seq; s++) {
    const epic_kv_view v = {.pool = kv->pool, .page_size = kv->page_size, .width = kv->width,
                            .lora = kv->lora, .block_table = kv->block_tables + s * kv->table_stride,
                            .n_ctx = kv->n_ctx[s], .dtype = kv->dtype};
    if (kv->n_ctx[s] < 1) return EPIC_ERR_INVALID;
    EPIC_CHECK(cpu_kv_store(o, &v, kv->n_ctx[s] - 1, 1, latent + s * ld_latent, ld_latent,
                            kpe + s * ld_kpe, ld_kpe));
  }
  return EPIC_OK;
}

static epic_status cpu_grouped_matmul(epic_ops *o, const float *x, int64_t ldx,
                                      const int64_t *off_host, const int32_t *off_dev,
                                      int64_t n_groups, const epic_weight *w, int64_t w_stride,
                                      float *y, int64_t ldy) {
  if (n_groups < 0 || !off_host || (n_groups > 0 && !w)) return EPIC_ERR_INVALID;
  for (int64_t g = 0; g < n_groups; g++) {
    const int64_t rows = off_host[g + 1] - off_host[g];
    if (rows < 0) return EPIC_ERR_INVALID;
    if (rows > 0)
      EPIC_CHECK(epic_cpu_matmul(o, x + off_host[g] * ldx, ldx, rows, &w[g * w_stride],
                                 y + off_host[g] * ldy, ldy));
  }
  return EPIC_OK;
}

/* Counting sort by expert, stable in item order. */
static epic_status cpu_moe_plan(epic_ops *o, const int32_t *idx, int64_t n, int64_t n_experts,
                                int64_t div, int32_t *plan, int64_t *counts) {
  (void)o;
  if (n < 0 || n_experts <= 0 || div <= 0 || (n > 0 && !idx) || !plan ||
      2 * n + n_experts >= INT32_MAX) {
    EPIC_LOG_ERROR("moe_plan: invalid arguments (n %lld, n_experts %lld, div %lld)", (long long)n,
                   (long long)n_experts, (long long)div);
    return EPIC_ERR_INVALID;
  }
  int32_t *off = plan + 2 * n;
  int32_t *cursor = malloc((size_t)n_experts * sizeof *cursor);
  if (!cursor) return EPIC_ERR_NOMEM;
  memset(off, 0, (size_t)(n_experts + 1) * sizeof *off);
  for (int64_t i = 0; i < n; i++) {
    if (idx[i] < 0 || idx[i] >= n_experts) {
      EPIC_LOG_ERROR("moe_plan: item %lld is routed to expert %d, outside [0, %lld)", (long long)i,
                     idx[i], (long long)n_experts);
      free(cursor);
      return EPIC_ERR_INVALID;
    }
    off[idx[i] + 1]++;
  }
  for (int64_t e = 0; e < n_experts; e++) {
    if (counts) counts[e] += off[e + 1];
    off[e + 1] += off[e];
    cursor[e] = off[e];
  }
  for (int64_t i = 0; i < n; i++) {
    const int32_t pos = cursor[idx[i]]++;
    plan[pos] = (int32_t)(i / div);
    plan[n + pos] = (int32_t)i;
  }
  free(cursor);
  return EPIC_OK;
}

/* The offsets are host memory here: check them against the contract, then the host path
 * (through the op table, so that a wrapper of grouped_matmul serves both: the device-path
 * tests' tests/common/dev_ops.h). */
static epic_status cpu_grouped_matmul_dev(epic_ops *o, const float *x, int64_t ldx, int64_t rows,
                                          int64_t max_rows, const int32_t *off, int64_t n_groups,
                                          const epic_weight *w, int64_t w_stride, float *y,
                                          int64_t ldy) {
  if (n_groups < 0 || !off || rows < 0 || max_rows < 0) return EPIC_ERR_INVALID;
  int64_t *oh = malloc((size_t)(n_groups + 1) * sizeof *oh);
  if (!oh) return EPIC_ERR_NOMEM;
  epic_status st = epic_ops_group_offsets(off, n_groups, rows, max_rows, oh);
  if (st == EPIC_OK) st = o->vt->grouped_matmul(o, x, ldx, oh, off, n_groups, w, w_stride, y, ldy);
  free(oh);
  return st;
}

static epic_status cpu_sync(epic_ops *o) { return EPIC_OK; }

static const epic_ops_vt epic_cpu_vt = {
    .abi_version = EPIC_OPS_ABI_VERSION,
    .name = "cpu",
    .matmul = epic_cpu_matmul,
    .rmsnorm = cpu_rmsnorm,
    .rope = cpu_rope,
    .silu_mul = cpu_silu_mul,
    .axpy = cpu_axpy,
    .embed = cpu_embed,
    .route = epic_cpu_route,
    .kv_store = cpu_kv_store,
    .kv_gather = cpu_kv_gather,
    .mla_naive = epic_cpu_mla_naive,
    .mla_absorbed = epic_cpu_mla_absorbed,
    .head_gemm = epic_cpu_head_gemm,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .destroy = cpu_destroy,
    .mla_absorbed_batch = epic_cpu_mla_absorbed_batch,
    .host_visible = 1,
    .copy_rows = cpu_copy_rows,
    .zero = cpu_zero,
    .moe_combine = cpu_moe_combine,
    .kv_store_batch = cpu_kv_store_batch,
    .grouped_matmul = cpu_grouped_matmul,
    .sync = cpu_sync,
    .row_pick = cpu_row_pick,
    .kv_dtype = cpu_kv_dtype,
    .moe_plan = cpu_moe_plan,
    .grouped_matmul_dev = cpu_grouped_matmul_dev,
    /* no head_dtype: fp32 weights unless a caller asks for bf16 (tests) */
    .head_gemm_bf16 = epic_cpu_head_gemm_bf16,
    .row_draw = cpu_row_draw,
};

epic_status epic_ops_cpu_create(int n_threads, epic_ops **out) {
  if (!out) return EPIC_ERR_INVALID;
  *out = NULL;
  epic_cpu_ops *c = calloc(1, sizeof *c);
  if (!c) return EPIC_ERR_NOMEM;
  c->base.vt = &epic_cpu_vt;
  c->n_threads = n_threads > 0 ? n_threads : omp_get_max_threads();
  if (c->n_threads < 1) c->n_threads = 1;
  c->scratch = calloc((size_t)c->n_threads, sizeof *c->scratch);
  if (!c->scratch) {
    free(c);
    return EPIC_ERR_NOMEM;
  }
  /* Parallelism comes from our OpenMP tiles; OpenBLAS must not fork inside them. */
  openblas_set_num_threads(1);
  *out = &c->base;
  return EPIC_OK;
}
