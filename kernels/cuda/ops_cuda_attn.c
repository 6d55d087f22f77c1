/* CUDA MLA attention and the per-head GEMM of the absorption.
 * Decode (a few query tokens, or one per sequence in a batch) runs a flash-decoding
 * kernel over the paged cache: kern_mla_bf16.cu for bf16 rows of the DeepSeek-V3 shape,
 * kern_mla.cu (TF32 / 3xTF32) for fp32 rows. Prefill (mla_naive) at the DeepSeek-V3 head
 * shape in the fast precision runs the flash kernel of kern_mla_prefill.cu (bf16
 * operands). Everything else (exact precision, other shapes) runs as cuBLAS strided-batched GEMMs over the heads
 * (TF32 tensor cores in fast precision, fp32 in exact) with an fp32 causal softmax
 * between them, in query chunks that bound the score buffer. Column-major bookkeeping as in ops_cuda_matmul.c: a row-major [r][c]
 * array with row stride ld is the column-major c x r matrix with leading dimension ld. */
#include <limits.h>
#include <stdlib.h>

#include "../../common/log.h"
#include "ops_cuda_impl.h"

enum { EPIC_CUDA_DECODE_MAX_Q = 8, EPIC_CUDA_SPLIT_MIN_KEYS = 128, EPIC_CUDA_GRID_Z = 65535 };
/* Keys per split of the exact precision's decode (a multiple of both kernels' tiles). */
enum { EPIC_CUDA_EXACT_SPLIT_KEYS = 256 };
#define EPIC_CUDA_SCORE_BYTES ((size_t)256 << 20)

/* Strided-batched GEMM over the heads on fp32 arrays, in full fp32, or with tf32 set on
 * the TF32 tensor cores (fp32 accumulation). */
static epic_status gemm_sb(epic_cuda_ops *c, int tf32, cublasOperation_t ta, int64_t m, int64_t n,
                           int64_t k, float alpha, const float *a, int64_t lda, int64_t sa,
                           const float *b, int64_t ldb, int64_t sb, float beta, float *y,
                           int64_t ldc, int64_t sc, int64_t batch) {
  const cublasComputeType_t ct = tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  EPIC_CHECK_CUBLAS(cublasGemmStridedBatchedEx(c->blas, ta, CUBLAS_OP_N, (int)m, (int)n, (int)k,
                                               &alpha, a, CUDA_R_32F, (int)lda, sa, b, CUDA_R_32F,
                                               (int)ldb, sb, &beta, y, CUDA_R_32F, (int)ldc, sc,
                                               (int)batch, ct, CUBLAS_GEMM_DEFAULT),
                    "strided batched GEMM (fp32 arrays)");
  return EPIC_OK;
}

/* The attention GEMMs (scores and probabilities x values): TF32 in the fast precision,
 * the same precision class as the TF32 / BF16 decode kernels and several times the
 * fp32 SIMT rate that bounded prefill attention; EPIC_CUDA_PRECISION=exact keeps fp32. */
static epic_status sgemm_sb(epic_cuda_ops *c, cublasOperation_t ta, int64_t m, int64_t n, int64_t k,
                            float alpha, const float *a, int64_t lda, int64_t sa, const float *b,
                            int64_t ldb, int64_t sb, float beta, float *y, int64_t ldc, int64_t sc,
                            int64_t batch) {
  return gemm_sb(c, c->mla_prec != EPIC_CUDA_MLA_EXACT, ta, m, n, k, alpha, a, lda, sa, b, ldb, sb,
                 beta, y, ldc, sc, batch);
}

/* Query rows per chunk so that n_heads * rows * n_keys scores fit the score budget. */
static int64_t query_chunk(int64_t m, int64_t n_heads, int64_t n_keys) {
  int64_t mc = (int64_t)(EPIC_CUDA_SCORE_BYTES / sizeof(float)) / (n_heads * n_keys);
  if (mc < 1)
    mc = 1;
  return mc < m ? mc : m;
}

epic_status epic_cuda_mla_naive(epic_ops *o, const float *q, const float *kvb, const float *kpe,
                                int64_t m, int64_t start, int64_t n_heads, int64_t nope,
                                int64_t rope, int64_t v, float scale, float *out) {
  if (m == 0 || n_heads == 0)
    return EPIC_OK;
  if (m < 0 || start < 0 || n_heads < 0 || nope < 0 || rope < 0 || v <= 0 || nope + rope <= 0 ||
      !q || !kvb || (rope && !kpe) || !out)
    return EPIC_ERR_INVALID;
  epic_cuda_ops *c = epic_cuda_of(o);
  const int64_t dq = nope + rope, dkv = nope + v, n_keys = start + m;
  if (c->mla_prec != EPIC_CUDA_MLA_EXACT &&
      epic_cuk_mla_prefill_ok(nope, rope, v, m, start, n_heads, q)) {
    /* The flash kernel on bf16 copies of the decompressed keys and values and of k_pe
     * (one pass each; a head's keys are re-read by every query tile, so they are worth
     * halving); it rounds the queries itself. Row lengths are multiples of 8, so each
     * copy starts 16-byte aligned. */
    const size_t nkv = (size_t)(n_keys * n_heads * dkv);
    EPIC_CHECK(epic_cuda_buf_reserve(c, &c->att, (nkv + (size_t)(n_keys * rope)) * 2));
    uint16_t *kv16 = (uint16_t *)c->att.p, *kpe16 = kv16 + nkv;
    EPIC_CHECK_CUDA(
        epic_cuk_f32_to_bf16(kvb, n_heads * dkv, NULL, n_keys, n_heads * dkv, kv16, c->stream),
        "mla_naive: keys and values to bf16");
    EPIC_CHECK_CUDA(epic_cuk_f32_to_bf16(kpe, rope, NULL, n_keys, rope, kpe16, c->stream),
                    "mla_naive: k_pe to bf16");
    EPIC_CHECK_CUDA(epic_cuk_mla_prefill(q, kv16, kpe16, m, start, n_heads, scale, out,
                                         c->mla_prefill_wgmma, c->stream),
                    "mla_naive: flash prefill kernel");
    return EPIC_OK;
  }
  if (n_heads * dkv > INT_MAX || n_keys > INT_MAX)
    return EPIC_ERR_UNSUPPORTED;
  const int64_t mc = query_chunk(m, n_heads, n_keys);
  EPIC_CHECK(epic_cuda_buf_reserve(c, &c->att, (size_t)(n_heads * mc * n_keys) * sizeof(float)));
  float *s = (float *)c->att.p;
  for (int64_t i0 = 0; i0 < m; i0 += mc) {
    const int64_t mi = m - i0 < mc ? m - i0 : mc, nk = start + i0 + mi;
    const float *qc = q + i0 * n_heads * dq;
    if (nope)
      EPIC_CHECK(sgemm_sb(c, CUBLAS_OP_T, nk, mi, nope, scale, kvb, n_heads * dkv, dkv, qc,
                          n_heads * dq, dq, 0.0f, s, nk, mi * nk, n_heads));
    if (rope)
      EPIC_CHECK(sgemm_sb(c, CUBLAS_OP_T, nk, mi, rope, scale, kpe, rope, 0, qc + nope,
                          n_heads * dq, dq, nope ? 1.0f : 0.0f, s, nk, mi * nk, n_heads));
    EPIC_CHECK_CUDA(epic_cuk_softmax_causal(s, n_heads * mi, mi, nk, start + i0 + 1, c->stream),
                    "mla_naive: softmax");
    EPIC_CHECK(sgemm_sb(c, CUBLAS_OP_N, v, mi, nk, 1.0f, kvb + nope, n_heads * dkv, dkv, s, nk,
                        mi * nk, 0.0f, out + i0 * n_heads * v, n_heads * v, v, n_heads));
  }
  return EPIC_OK;
}

/* Absorbed attention through GEMMs: gather the cache rows, then as mla_naive. */
static epic_status absorbed_gemm(epic_cuda_ops *c, const epic_kv_view *kv, const float *q_abs,
                                 const float *q_pe, int64_t m, int64_t start, int64_t n_heads,
                                 float scale, float *ctx) {
  const int64_t lora = kv->lora, rope = kv->width - kv->lora, width = kv->width;
  const int64_t n_keys = start + m;
  if (n_heads * width > INT_MAX || n_keys > INT_MAX)
    return EPIC_ERR_UNSUPPORTED;
  EPIC_CHECK(epic_cuda_buf_reserve(c, &c->keys, (size_t)(n_keys * width) * sizeof(float)));
  float *keys = (float *)c->keys.p; /* fp32 whatever the cache's element type */
  EPIC_CHECK_CUDA(epic_cuk_kv_gather(kv, n_keys, keys, NULL, c->stream), "mla: gather cache rows");
  const int64_t mc = query_chunk(m, n_heads, n_keys);
  EPIC_CHECK(epic_cuda_buf_reserve(c, &c->att, (size_t)(n_heads * mc * n_keys) * sizeof(float)));
  float *s = (float *)c->att.p;
  for (int64_t i0 = 0; i0 < m; i0 += mc) {
    const int64_t mi = m - i0 < mc ? m - i0 : mc, nk = start + i0 + mi;
    EPIC_CHECK(sgemm_sb(c, CUBLAS_OP_T, nk, mi, lora, scale, keys, width, 0,
                        q_abs + i0 * n_heads * lora, n_heads * lora, lora, 0.0f, s, nk, mi * nk,
                        n_heads));
    if (rope)
      EPIC_CHECK(sgemm_sb(c, CUBLAS_OP_T, nk, mi, rope, scale, keys + lora, width, 0,
                          q_pe + i0 * n_heads * rope, n_heads * rope, rope, 1.0f, s, nk, mi * nk,
                          n_heads));
    EPIC_CHECK_CUDA(epic_cuk_softmax_causal(s, n_heads * mi, mi, nk, start + i0 + 1, c->stream),
                    "mla_absorbed: softmax");
    EPIC_CHECK(sgemm_sb(c, CUBLAS_OP_N, lora, mi, nk, 1.0f, keys, width, 0, s, nk, mi * nk, 0.0f,
                        ctx + i0 * n_heads * lora, n_heads * lora, lora, n_heads));
  }
  return EPIC_OK;
}

/* Splits of the context per query so that the grid covers the GPU about once, with
 * enough keys per split that the partial outputs stay small next to the rows read
 * (fp32 kernel). */
static int choose_split(const epic_cuda_ops *c, int64_t n_q, int64_t n_heads, int64_t max_keys) {
  const int64_t ctas = n_q * ((n_heads + 63) / 64);
  if (ctas >= c->sm_count)
    return 1;
  int64_t s = (c->sm_count + ctas - 1) / ctas;
  const int64_t by_len = (max_keys + EPIC_CUDA_SPLIT_MIN_KEYS - 1) / EPIC_CUDA_SPLIT_MIN_KEYS;
  if (s > by_len)
    s = by_len;
  if (s > EPIC_CUDA_MLA_MAX_SPLIT)
    s = EPIC_CUDA_MLA_MAX_SPLIT;
  return s < 1 ? 1 : (int)s;
}

/* Splits for the BF16 kernel (one CTA per SM, 64-key tiles): the count that minimises a
 * time model in tile units, waves * (fixed + tiles per split) + the partials' traffic
 * (written and read back: 4 KB per split, token and head against 72 KB per tile and
 * head group), smallest on ties. fixed ~ staging 64 fp32 query rows and writing the
 * output, about four tiles' bytes. Balances the waves where the grid is a little over
 * one (32 x 8k: 2 splits = one wave, where the fp32 rule's 3 made 1.5). */
static int choose_split_bf16(const epic_cuda_ops *c, int64_t n_q, int64_t n_heads,
                             int64_t max_keys) {
  const int64_t groups = (n_heads + 63) / 64, ctas = n_q * groups, tiles = (max_keys + 63) / 64;
  int64_t s_max = tiles < EPIC_CUDA_MLA_MAX_SPLIT ? tiles : EPIC_CUDA_MLA_MAX_SPLIT;
  if (s_max < 1)
    s_max = 1;
  if (c->mla_split > 0) /* epic_ops_cuda_set_mla_split */
    return (int)(c->mla_split < s_max ? c->mla_split : s_max);
  int best = 1;
  double best_t = 0.0;
  for (int64_t s = 1; s <= s_max; s++) {
    const int64_t waves = (ctas * s + c->sm_count - 1) / c->sm_count;
    const double partials =
        s > 1 ? (double)(n_q * s * n_heads) * 4096.0 / (72.0 * 1024.0 * (double)c->sm_count) : 0.0;
    const double t = (double)waves * (4.0 + (double)((tiles + s - 1) / s)) + partials;
    if (s == 1 || t < best_t * 0.999) {
      best = (int)s;
      best_t = t;
    }
  }
  return best;
}

/* The bf16 kernel's form for a launch: EPIC_CUDA_MLA_BF16_AUTO takes the seesaw form where
 * its longer prologue pays (bench_kernels_cuda on H200s: 0.84-0.92x the wgmma form's time at
 * 128 x 8k and 32 x 8k, 64-128 tiles per split; even at 16 (128 x 1k); 1.06-1.07x at 8, 32 x
 * 1k and 1 x 8k), and keeps the invariant precision on one form (its results must not depend
 * on the batch). */
static int bf16_variant(const epic_cuda_ops *c, const epic_cuk_mla_params *q, int64_t max_keys) {
  if (c->mla_bf16_variant != EPIC_CUDA_MLA_BF16_AUTO)
    return c->mla_bf16_variant;
  const int64_t tiles = (max_keys + 63) / 64, per_split = (tiles + q->n_split - 1) / q->n_split;
  return !c->invariant && per_split >= EPIC_CUDA_MLA_SEESAW_MIN_TILES ? EPIC_CUDA_MLA_BF16_SEESAW
                                                                      : EPIC_CUDA_MLA_BF16_WGMMA;
}

/* Run the decode kernel (bf16: the BF16-cache kernel, else the fp32 one) on queries
 * [0, n_q) described by p (p->n_q ignored). */
static epic_status decode(epic_cuda_ops *c, epic_cuk_mla_params p, int64_t n_q, int64_t max_keys,
                          int bf16) {
  for (int64_t b0 = 0; b0 < n_q; b0 += EPIC_CUDA_GRID_Z) {
    const int64_t nb = n_q - b0 < EPIC_CUDA_GRID_Z ? n_q - b0 : EPIC_CUDA_GRID_Z;
    epic_cuk_mla_params q = p;
    const int64_t rope = p.width - p.lora;
    q.n_q = nb;
    q.q_abs = p.q_abs + b0 * p.n_heads * p.lora;
    q.q_pe = rope ? p.q_pe + b0 * p.n_heads * rope : NULL;
    q.ctx = p.ctx + b0 * p.n_heads * p.lora;
    q.tables = p.tables + b0 * p.table_stride;
    if (p.n_ctx)
      q.n_ctx = p.n_ctx + b0;
    else
      q.start = p.start + b0;
    if ((!bf16 && c->mla_prec == EPIC_CUDA_MLA_EXACT) || c->invariant) {
      /* Exact and invariant precisions: chunks of EPIC_CUDA_EXACT_SPLIT_KEYS keys (a
       * sixteenth of the context beyond 16 of them) whatever the other queries: a query's
       * sums do not depend on how many queries or how long a context share its call (row
       * invariance, ops_cuda.h), and no query sums a long context in one run. The
       * invariant one always merges (at least two splits), so that a query's result never
       * takes the kernel's direct single-split form in one call and the merge in another. */
      const int64_t n = (max_keys + EPIC_CUDA_EXACT_SPLIT_KEYS - 1) / EPIC_CUDA_EXACT_SPLIT_KEYS;
      const int64_t lo = c->invariant ? 2 : 1;
      q.split_keys = EPIC_CUDA_EXACT_SPLIT_KEYS;
      q.n_split = (int)(n < lo                           ? lo
                        : n < EPIC_CUDA_MLA_FIXED_SPLITS ? n
                                                         : EPIC_CUDA_MLA_FIXED_SPLITS);
    } else {
      q.split_keys = 0;
      q.n_split = bf16 ? choose_split_bf16(c, nb, p.n_heads, max_keys)
                       : choose_split(c, nb, p.n_heads, max_keys);
    }
    if (q.n_split > 1) {
      const size_t acc = (size_t)(nb * q.n_split * p.n_heads * p.lora);
      const size_t ml = (size_t)(nb * q.n_split * p.n_heads * 2);
      EPIC_CHECK(epic_cuda_buf_reserve(c, &c->att, (acc + ml) * sizeof(float)));
      q.part_acc = (float *)c->att.p;
      q.part_ml = q.part_acc + acc;
    }
    if (bf16)
      EPIC_CHECK_CUDA(epic_cuk_mla_bf16_decode(&q, bf16_variant(c, &q, max_keys), c->stream),
                      "mla decode kernel (bf16 cache)");
    else
      EPIC_CHECK_CUDA(epic_cuk_mla_decode(&q, c->mla_prec == EPIC_CUDA_MLA_EXACT, c->stream),
                      "mla decode kernel");
  }
  return EPIC_OK;
}

/* 1: the BF16 kernel takes this cache; 0: the fp32 kernel does; -1: neither (GEMM path). */
static int decode_kind(epic_kv_dtype dt, int64_t width, int64_t lora, const void *pool) {
  if (dt == EPIC_KV_BF16)
    return epic_cuk_mla_bf16_ok(width, lora, pool) ? 1 : -1;
  return epic_cuk_mla_decode_ok(width, lora, pool) ? 0 : -1;
}

static epic_cuk_mla_params decode_params(const void *pool, int64_t page_size, int64_t width,
                                         int64_t lora, const float *q_abs, const float *q_pe,
                                         int64_t n_heads, float scale, float *ctx) {
  epic_cuk_mla_params p = {0};
  p.pool = pool;
  p.page_size = page_size;
  p.page_shift = -1;
  for (int sh = 0; sh < 31; sh++)
    if ((int64_t)1 << sh == page_size)
      p.page_shift = sh;
  p.width = width;
  p.lora = lora;
  p.q_abs = q_abs;
  p.q_pe = q_pe;
  p.n_heads = n_heads;
  p.qscale = scale * 1.4426950408889634f; /* log2(e): the kernel works in exp2 */
  p.ctx = ctx;
  return p;
}

epic_status epic_cuda_mla_absorbed(epic_ops *o, const epic_kv_view *kv, const float *q_abs,
                                   const float *q_pe, int64_t m, int64_t start, int64_t n_heads,
                                   float scale, float *ctx) {
  if (m == 0 || n_heads == 0)
    return EPIC_OK;
  if (!kv || !kv->pool || !kv->block_table || kv->page_size <= 0 || kv->lora <= 0 ||
      kv->lora > kv->width || m < 0 || start < 0 || n_heads < 0 || !q_abs || !ctx ||
      (kv->width > kv->lora && !q_pe))
    return EPIC_ERR_INVALID;
  if (start + m > kv->n_ctx) {
    EPIC_LOG_ERROR("mla_absorbed: queries up to position %lld but cache holds %lld tokens",
                   (long long)(start + m - 1), (long long)kv->n_ctx);
    return EPIC_ERR_INVALID;
  }
  EPIC_CHECK(epic_cuda_kv_dtype_ok(kv->dtype, "mla_absorbed"));
  epic_cuda_ops *c = epic_cuda_of(o);
  const int kind = decode_kind(kv->dtype, kv->width, kv->lora, kv->pool);
  if (m <= EPIC_CUDA_DECODE_MAX_Q && start + m < INT32_MAX && kind >= 0) {
    epic_cuk_mla_params p = decode_params(kv->pool, kv->page_size, kv->width, kv->lora, q_abs, q_pe,
                                          n_heads, scale, ctx);
    p.tables = kv->block_table;
    p.table_stride = 0;
    p.n_ctx = NULL;
    p.start = start;
    return decode(c, p, m, start + m, kind);
  }
  return absorbed_gemm(c, kv, q_abs, q_pe, m, start, n_heads, scale, ctx);
}

epic_status epic_cuda_mla_absorbed_batch(epic_ops *o, const epic_kv_batch *kv, int64_t n_seq,
                                         const float *q_abs, const float *q_pe, int64_t n_heads,
                                         float scale, float *ctx) {
  if (n_seq == 0 || n_heads == 0)
    return EPIC_OK;
  if (!kv || !kv->pool || !kv->block_tables || !kv->n_ctx || n_seq < 0 || n_heads < 0 ||
      kv->page_size <= 0 || kv->lora <= 0 || kv->lora > kv->width || kv->table_stride <= 0 ||
      kv->max_ctx <= 0 || !q_abs || !ctx || (kv->width > kv->lora && !q_pe)) {
    EPIC_LOG_ERROR("mla_absorbed_batch: invalid arguments (n_seq %lld)", (long long)n_seq);
    return EPIC_ERR_INVALID;
  }
  EPIC_CHECK(epic_cuda_kv_dtype_ok(kv->dtype, "mla_absorbed_batch"));
  epic_cuda_ops *c = epic_cuda_of(o);
  const int64_t lora = kv->lora, rope = kv->width - kv->lora;
  const int kind = decode_kind(kv->dtype, kv->width, kv->lora, kv->pool);
  if (kv->max_ctx < INT32_MAX && kind >= 0) {
    epic_cuk_mla_params p =
        decode_params(kv->pool, kv->page_size, kv->width, lora, q_abs, q_pe, n_heads, scale, ctx);
    p.tables = kv->block_tables;
    p.table_stride = kv->table_stride;
    p.n_ctx = kv->n_ctx;
    return decode(c, p, n_seq, kv->max_ctx, kind);
  }
  /* Shapes the kernel does not take: one GEMM pass per sequence (lengths read back). */
  EPIC_CHECK(epic_cuda_not_recording(c, "mla_absorbed_batch on a shape without a kernel"));
  int32_t *len = malloc((size_t)n_seq * sizeof *len);
  if (!len)
    return EPIC_ERR_NOMEM;
  epic_status st = epic_cuda_check(cudaMemcpyAsync(len, kv->n_ctx, (size_t)n_seq * sizeof *len,
                                                   cudaMemcpyDeviceToHost, c->stream),
                                   "mla_absorbed_batch: read lengths");
  if (st == EPIC_OK)
    st = epic_cuda_check(cudaStreamSynchronize(c->stream), "mla_absorbed_batch: read lengths");
  for (int64_t s = 0; st == EPIC_OK && s < n_seq; s++) {
    if (len[s] < 1 || len[s] > kv->max_ctx) {
      EPIC_LOG_ERROR("mla_absorbed_batch: sequence %lld holds %d tokens (max_ctx %lld)",
                     (long long)s, len[s], (long long)kv->max_ctx);
      st = EPIC_ERR_INVALID;
      break;
    }
    const epic_kv_view v = {.pool = kv->pool,
                            .page_size = kv->page_size,
                            .width = kv->width,
                            .lora = lora,
                            .block_table = kv->block_tables + s * kv->table_stride,
                            .n_ctx = len[s],
                            .dtype = kv->dtype};
    st = absorbed_gemm(c, &v, q_abs + s * n_heads * lora, rope ? q_pe + s * n_heads * rope : NULL,
                       1, len[s] - 1, n_heads, scale, ctx + s * n_heads * lora);
  }
  free(len);
  return st;
}

/* head_gemm's argument checks: EPIC_OK, EPIC_ERR_INVALID, or EPIC_ERR_UNSUPPORTED where
 * cuBLAS's int dimensions cannot hold the call. */
static epic_status head_gemm_args(int64_t m, int64_t n_heads, int64_t k, int64_t n,
                                  const void *x, const void *a, const void *y, int64_t ldx,
                                  int64_t ldy) {
  if (m < 0 || n_heads < 0 || k <= 0 || n < 0 || !x || !a || !y)
    return EPIC_ERR_INVALID;
  if (ldx > INT_MAX || ldy > INT_MAX || m > INT_MAX || k > INT_MAX || n > INT_MAX ||
      n_heads > INT_MAX)
    return EPIC_ERR_UNSUPPORTED;
  return EPIC_OK;
}

/* Tokens per batched GEMM of the exact precision's head_gemm (head_chunks). */
enum { EPIC_CUDA_EXACT_HEAD_ROWS = 16 };

/* mc tokens of [tokens][heads][width] arrays from src to dst, each with its own token and
 * head strides (one side is the dense staging buffer): one 2D copy where both sides' heads
 * are evenly spaced rows, else one per token. */
static epic_status head_rows_copy(epic_cuda_ops *c, float *dst, int64_t dst_tok, int64_t dst_head,
                                  const float *src, int64_t src_tok, int64_t src_head, int64_t mc,
                                  int64_t heads, int64_t width) {
  const int flat = dst_tok == heads * dst_head && src_tok == heads * src_head;
  for (int64_t t = 0; t < (flat ? 1 : mc); t++)
    EPIC_CHECK_CUDA(cudaMemcpy2DAsync(dst + t * dst_tok, (size_t)dst_head * 4, src + t * src_tok,
                                      (size_t)src_head * 4, (size_t)width * 4,
                                      (size_t)(flat ? mc * heads : heads), cudaMemcpyDeviceToDevice,
                                      c->stream),
                    "head_gemm: stage rows");
  return EPIC_OK;
}

/* m tokens of x ([tokens][heads][k] at its strides) rounded to bf16 into the dense
 * [m][n_heads][k] rows at xb. */
static epic_status head_round_x(epic_cuda_ops *c, const float *x, int64_t ld_x_tok,
                                int64_t ld_x_head, int64_t m, int64_t n_heads, int64_t k,
                                uint16_t *xb) {
  if (ld_x_tok == n_heads * ld_x_head) /* every (token, head) row at one stride */
    EPIC_CHECK_CUDA(epic_cuk_f32_to_bf16(x, ld_x_head, NULL, m * n_heads, k, xb, c->stream),
                    "head_gemm_bf16: round x");
  else
    for (int64_t t = 0; t < m; t++)
      EPIC_CHECK_CUDA(epic_cuk_f32_to_bf16(x + t * ld_x_tok, ld_x_head, NULL, n_heads, k,
                                           xb + t * n_heads * k, c->stream),
                      "head_gemm_bf16: round x");
  return EPIC_OK;
}

/* cuBLAS's bf16 batched GEMM over the heads with fp32 sums, as head_gemm: y_h^T (n x m) =
 * op(A_h) (n x k) . x_h^T (k x m), x_h^T the dense bf16 rows xb (columns n_heads * k
 * apart). */
static epic_status head_gemm_bf16_sb(epic_cuda_ops *c, const uint16_t *xb, int64_t m,
                                     int64_t n_heads, const uint16_t *a, int64_t ld_a_head,
                                     int64_t k, int64_t n, int trans, float *y, int64_t ldy,
                                     int64_t ld_y_head) {
  const float one = 1.0f, zero = 0.0f;
  EPIC_CHECK_CUBLAS(cublasGemmStridedBatchedEx(
                        c->blas, trans ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, (int)n, (int)m,
                        (int)k, &one, a, CUDA_R_16BF, (int)(trans ? k : n), ld_a_head, xb,
                        CUDA_R_16BF, (int)(n_heads * k), k, &zero, y, CUDA_R_32F, (int)ldy,
                        ld_y_head, (int)n_heads, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                    "strided batched GEMM (bf16 head weights)");
  return EPIC_OK;
}

/* The exact and the invariant precisions' head_gemm: the tokens go a fixed number at a
 * time (the last chunk zero-padded) through one batched GEMM shape, strides and buffers, so
 * that cuBLAS picks the same kernel for every chunk and a token's result does not depend on
 * the other tokens of the call (the argument of ops_cuda_matmul.c's grouped_chunks). bf16
 * 0: fp32 x and weights a, EPIC_CUDA_EXACT_HEAD_ROWS tokens per chunk (exact; the
 * invariant precision's fp32 head weights too); 1: x rounded to bf16, bf16 weights,
 * EPIC_CUDA_INVARIANT_ROWS tokens (the invariant precision's head_gemm_bf16). */
static epic_status head_chunks(epic_cuda_ops *c, int bf16, const float *x, int64_t ld_x_tok,
                               int64_t ld_x_head, int64_t m, int64_t n_heads, const void *a,
                               int64_t ld_a_head, int64_t k, int64_t n, int trans, float *y,
                               int64_t ld_y_tok, int64_t ld_y_head) {
  const int64_t C = bf16 ? EPIC_CUDA_INVARIANT_ROWS : EPIC_CUDA_EXACT_HEAD_ROWS;
  const int64_t hk = n_heads * k, hn = n_heads * n;
  const size_t esz = bf16 ? 2 : 4;
  EPIC_CHECK(head_gemm_args(C, n_heads, k, n, x, a, y, hk, hn));
  EPIC_CHECK(epic_cuda_buf_reserve(c, &c->act, (size_t)(C * hk) * esz));
  EPIC_CHECK(epic_cuda_buf_reserve(c, &c->outb, (size_t)(C * hn) * sizeof(float)));
  uint8_t *xs = c->act.p;
  float *ys = (float *)c->outb.p;
  for (int64_t t0 = 0; t0 < m; t0 += C) {
    const int64_t mc = m - t0 < C ? m - t0 : C;
    if (mc < C)
      EPIC_CHECK_CUDA(cudaMemsetAsync(xs + (size_t)(mc * hk) * esz, 0,
                                      (size_t)((C - mc) * hk) * esz, c->stream),
                      "head_gemm: pad rows");
    const float *xt = x + t0 * ld_x_tok;
    if (bf16) {
      EPIC_CHECK(head_round_x(c, xt, ld_x_tok, ld_x_head, mc, n_heads, k, (uint16_t *)xs));
      EPIC_CHECK(head_gemm_bf16_sb(c, (const uint16_t *)xs, C, n_heads, a, ld_a_head, k, n, trans,
                                   ys, hn, n));
    } else {
      EPIC_CHECK(head_rows_copy(c, (float *)xs, hk, k, xt, ld_x_tok, ld_x_head, mc, n_heads, k));
      EPIC_CHECK(gemm_sb(c, 0, trans ? CUBLAS_OP_T : CUBLAS_OP_N, n, C, k, 1.0f, a, trans ? k : n,
                         ld_a_head, (const float *)xs, hk, k, 0.0f, ys, hn, n, n_heads));
    }
    EPIC_CHECK(
        head_rows_copy(c, y + t0 * ld_y_tok, ld_y_tok, ld_y_head, ys, hn, n, mc, n_heads, n));
  }
  return EPIC_OK;
}

epic_status epic_cuda_head_gemm(epic_ops *o, const float *x, int64_t ld_x_tok, int64_t ld_x_head,
                                int64_t m, int64_t n_heads, const float *a, int64_t ld_a_head,
                                int64_t k, int64_t n, int trans, float *y, int64_t ld_y_tok,
                                int64_t ld_y_head) {
  if (m == 0 || n_heads == 0 || n == 0)
    return EPIC_OK;
  if (epic_cuda_of(o)->exact_matmul || epic_cuda_of(o)->invariant)
    return head_chunks(epic_cuda_of(o), 0, x, ld_x_tok, ld_x_head, m, n_heads, a, ld_a_head, k, n,
                       trans, y, ld_y_tok, ld_y_head);
  /* cuBLAS rejects leading dimensions below the row length even when m == 1. */
  const int64_t ldx = m > 1 ? ld_x_tok : k, ldy = m > 1 ? ld_y_tok : n;
  EPIC_CHECK(head_gemm_args(m, n_heads, k, n, x, a, y, ldx, ldy));
  /* y_h^T (n x m) = op(A_h) (n x k) . x_h^T (k x m); A_h row-major [k][n] is the
   * column-major n x k matrix (op N), row-major [n][k] the column-major k x n (op T). */
  /* Full fp32: decode-sized (a few rows per head), where TF32 would buy little. */
  return gemm_sb(epic_cuda_of(o), 0, trans ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k, 1.0f, a,
                 trans ? k : n, ld_a_head, x, ldx, ld_x_head, 0.0f, y, ldy, ld_y_head, n_heads);
}

/* Invariant precision: kern_head_gemm.cu's row-invariant mma form at every token count
 * (head_chunks where it does not take the shape, or with head_rows off). Fast: up to
 * EPIC_CUK_HEAD_MAX_M tokens (decode of small batches) kern_head_gemm.cu reads the bf16
 * weights once with fp32 x; more tokens: x rounded to bf16 into act (dense
 * [m][n_heads][k]) and cuBLAS's bf16 batched GEMM with fp32 sums, where the weights are
 * read once per tile of tokens anyway. */
epic_status epic_cuda_head_gemm_bf16(epic_ops *o, const float *x, int64_t ld_x_tok,
                                     int64_t ld_x_head, int64_t m, int64_t n_heads,
                                     const uint16_t *a, int64_t ld_a_head, int64_t k, int64_t n,
                                     int trans, float *y, int64_t ld_y_tok, int64_t ld_y_head) {
  if (m == 0 || n_heads == 0 || n == 0)
    return EPIC_OK;
  const int64_t ldb = n_heads * k, ldy = m > 1 ? ld_y_tok : n;
  EPIC_CHECK(head_gemm_args(m, n_heads, k, n, x, a, y, ldb, ldy));
  epic_cuda_ops *c = epic_cuda_of(o);
  if (c->invariant && c->head_rows && epic_cuk_head_rows_ok(n_heads, a, ld_a_head, k, n))
    return epic_cuda_check(epic_cuk_head_rows(x, ld_x_tok, ld_x_head, m, n_heads, a, ld_a_head, k,
                                              n, trans, y, ld_y_tok, ld_y_head, c->stream),
                           "head_gemm_bf16 (row-invariant kernel)");
  if (c->invariant)
    return head_chunks(c, 1, x, ld_x_tok, ld_x_head, m, n_heads, a, ld_a_head, k, n, trans, y,
                       ld_y_tok, ld_y_head);
  if (epic_cuk_head_bf16_ok(m, n_heads, a, ld_a_head, k, n, trans))
    return epic_cuda_check(epic_cuk_head_bf16(x, ld_x_tok, ld_x_head, m, n_heads, a, ld_a_head, k,
                                              n, trans, y, ld_y_tok, ld_y_head, c->stream),
                           "head_gemm_bf16");
  EPIC_CHECK(epic_cuda_buf_reserve(c, &c->act, (size_t)(m * ldb) * 2));
  uint16_t *xb = c->act.p;
  EPIC_CHECK(head_round_x(c, x, ld_x_tok, ld_x_head, m, n_heads, k, xb));
  return head_gemm_bf16_sb(c, xb, m, n_heads, a, ld_a_head, k, n, trans, y, ldy, ld_y_head);
}
