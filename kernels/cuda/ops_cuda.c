/* CUDA backend of epic_ops: object lifetime, memory, the element-wise ops, routing and
 * the KV cache. Host-side validation mirrors the CPU backend, so both reject the same
 * calls with the same status; the kernels behind the launchers are in *.cu. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../common/log.h"
#include "ops_cuda_impl.h"

enum { EPIC_CUDA_BLAS_WS = 32 << 20, EPIC_CUDA_LT_WS = 64 << 20 };

epic_status epic_cuda_check(cudaError_t e, const char *what) {
  if (e == cudaSuccess)
    return EPIC_OK;
  EPIC_LOG_ERROR("cuda: %s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
  return e == cudaErrorMemoryAllocation ? EPIC_ERR_NOMEM : EPIC_ERR_CUDA;
}

epic_status epic_cublas_check(cublasStatus_t s, const char *what) {
  if (s == CUBLAS_STATUS_SUCCESS)
    return EPIC_OK;
  EPIC_LOG_ERROR("cublas: %s: %s (%d)", what, cublasGetStatusString(s), (int)s);
  return s == CUBLAS_STATUS_ALLOC_FAILED ? EPIC_ERR_NOMEM : EPIC_ERR_CUDA;
}

epic_status epic_cuda_not_recording(const epic_cuda_ops *c, const char *what) {
  if (!c->recording)
    return EPIC_OK;
  /* Expected on a shape's first recording after growth: the caller runs eagerly instead. */
  EPIC_LOG_DEBUG("cuda: %s is not allowed while a graph is recorded", what);
  return EPIC_ERR_UNSUPPORTED;
}

epic_status epic_cuda_buf_reserve(epic_cuda_ops *c, epic_cuda_buf *b, size_t bytes) {
  if (b->cap >= bytes && b->p)
    return EPIC_OK;
  EPIC_CHECK(epic_cuda_not_recording(c, "growing a scratch buffer"));
  c->epoch++;
  size_t cap = b->cap ? b->cap : (1u << 20);
  while (cap < bytes)
    cap *= 2;
  /* cudaFree waits for the device, so work still reading the old buffer finishes first. */
  EPIC_CHECK_CUDA(cudaFree(b->p), "free scratch");
  b->p = NULL;
  b->cap = 0;
  EPIC_CHECK_CUDA(cudaMalloc(&b->p, cap), "allocate scratch");
  b->cap = cap;
  return EPIC_OK;
}

/* After a launch: the launcher's status plus any error the context already holds. */
static epic_status launched(cudaError_t e, const char *op) {
  return epic_cuda_check(e, op);
}

int epic_cuda_device_count(void) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError(); /* clear the sticky "no driver" status */
    return 0;
  }
  return n;
}

void *epic_ops_cuda_stream(epic_ops *o) {
  return o ? (void *)epic_cuda_of(o)->stream : NULL;
}

const char *epic_ops_cuda_device_name(epic_ops *o) {
  return epic_cuda_of(o)->name;
}
int epic_ops_cuda_sm_count(epic_ops *o) {
  return epic_cuda_of(o)->sm_count;
}

epic_status epic_ops_cuda_set_mla_precision(epic_ops *o, epic_cuda_mla_precision p) {
  if (!o || (p != EPIC_CUDA_MLA_TF32 && p != EPIC_CUDA_MLA_EXACT))
    return EPIC_ERR_INVALID;
  epic_cuda_of(o)->mla_prec = p;
  return EPIC_OK;
}

epic_status epic_ops_cuda_set_mla_bf16_kernel(epic_ops *o, epic_cuda_mla_bf16_kernel k) {
  if (!o || (int)k < 0 || (int)k > EPIC_CUDA_MLA_BF16_AUTO)
    return EPIC_ERR_INVALID;
  epic_cuda_of(o)->mla_bf16_variant = (int)k;
  return EPIC_OK;
}

epic_status epic_ops_cuda_set_mla_split(epic_ops *o, int splits) {
  if (!o || splits < 0 || splits > EPIC_CUDA_MLA_MAX_SPLIT)
    return EPIC_ERR_INVALID;
  epic_cuda_of(o)->mla_split = splits;
  return EPIC_OK;
}

epic_status epic_ops_cuda_set_skinny_split(epic_ops *o, int runs) {
  if (!o || (runs != 0 && runs != 1 && runs != 2 && runs != 4 && runs != 8))
    return EPIC_ERR_INVALID;
  epic_cuda_of(o)->skinny_split = runs;
  return EPIC_OK;
}

epic_status epic_ops_cuda_set_mla_prefill_kernel(epic_ops *o, epic_cuda_mla_prefill_kernel k) {
  if (!o || (k != EPIC_CUDA_MLA_PREFILL_MMA && k != EPIC_CUDA_MLA_PREFILL_WGMMA))
    return EPIC_ERR_INVALID;
  epic_cuda_of(o)->mla_prefill_wgmma = k == EPIC_CUDA_MLA_PREFILL_WGMMA;
  return EPIC_OK;
}

epic_status epic_ops_cuda_set_fp8_small(epic_ops *o, epic_cuda_fp8_small k) {
  if (!o || (k != EPIC_CUDA_FP8_SMALL_MMA && k != EPIC_CUDA_FP8_SMALL_FP32))
    return EPIC_ERR_INVALID;
  epic_cuda_of(o)->fp8_small = (int)k;
  return EPIC_OK;
}

epic_status epic_ops_cuda_set_grouped_lanes(epic_ops *o, int lanes) {
  if (!o || lanes < 0 || lanes > EPIC_CUDA_LT_LANES_MAX)
    return EPIC_ERR_INVALID;
  epic_cuda_of(o)->n_lanes = lanes;
  return EPIC_OK;
}

epic_status epic_ops_cuda_set_grouped_large(epic_ops *o, epic_cuda_grouped_large k) {
  if (!o || (k != EPIC_CUDA_GROUPED_LARGE_WGMMA && k != EPIC_CUDA_GROUPED_LARGE_LANES))
    return EPIC_ERR_INVALID;
  epic_cuda_of(o)->grouped_large = (int)k;
  return EPIC_OK;
}

epic_status epic_ops_cuda_set_mma_group_rows(epic_ops *o, int64_t rows) {
  if (!o || rows < 0 || rows > EPIC_CUDA_FP8_MMA_GROUP_MAX_ROWS)
    return EPIC_ERR_INVALID;
  epic_cuda_of(o)->mma_group_rows = rows;
  return EPIC_OK;
}

int64_t epic_ops_cuda_mma_group_rows(epic_ops *o) {
  return o ? epic_cuda_of(o)->mma_group_rows : 0;
}

int64_t epic_ops_cuda_wgmma_launches(epic_ops *o) {
  return o ? epic_cuda_of(o)->wgmma_launches : 0;
}

epic_status epic_ops_cuda_set_wgmma_form(epic_ops *o, epic_cuda_wgmma_form f) {
  if (!o || f < EPIC_CUDA_WGMMA_AUTO || f > EPIC_CUDA_WGMMA_WHOLE)
    return EPIC_ERR_INVALID;
  epic_cuda_of(o)->wgmma_form = (int)f;
  return EPIC_OK;
}

epic_status epic_ops_cuda_set_wgmma_thin(epic_ops *o, int on) {
  if (!o || (on != 0 && on != 1))
    return EPIC_ERR_INVALID;
  epic_cuda_of(o)->wgmma_thin = on;
  return EPIC_OK;
}

epic_status epic_ops_cuda_set_head_rows(epic_ops *o, int on) {
  if (!o || (on != 0 && on != 1))
    return EPIC_ERR_INVALID;
  epic_cuda_of(o)->head_rows = on;
  return EPIC_OK;
}

int64_t epic_ops_cuda_wgmma_thin_launches(epic_ops *o) {
  return o ? epic_cuda_of(o)->wgmma_thin_launches : 0;
}

epic_status epic_ops_cuda_set_precision(epic_ops *o, epic_cuda_precision p) {
  if (!o || p < EPIC_CUDA_PREC_FAST || p > EPIC_CUDA_PREC_INVARIANT)
    return EPIC_ERR_INVALID;
  epic_cuda_of(o)->exact_matmul = p == EPIC_CUDA_PREC_EXACT;
  epic_cuda_of(o)->invariant = p == EPIC_CUDA_PREC_INVARIANT;
  epic_cuda_of(o)->mla_prec = p == EPIC_CUDA_PREC_EXACT ? EPIC_CUDA_MLA_EXACT : EPIC_CUDA_MLA_TF32;
  return EPIC_OK;
}

epic_cuda_precision epic_ops_cuda_get_precision(epic_ops *o) {
  const epic_cuda_ops *c = epic_cuda_of(o);
  return c->exact_matmul ? EPIC_CUDA_PREC_EXACT
         : c->invariant  ? EPIC_CUDA_PREC_INVARIANT
                         : EPIC_CUDA_PREC_FAST;
}

static epic_status cuda_moe_plan(epic_ops *o, const int32_t *idx, int64_t n, int64_t n_experts,
                                 int64_t div, int32_t *plan, int64_t *counts) {
  epic_cuda_ops *c = epic_cuda_of(o);
  if (n < 0 || n_experts <= 0 || n_experts >= 12 * 1024 || div <= 0 || (n > 0 && !idx) || !plan ||
      2 * n + n_experts >= INT32_MAX) {
    EPIC_LOG_ERROR("moe_plan: invalid arguments (n %lld, n_experts %lld, div %lld)", (long long)n,
                   (long long)n_experts, (long long)div);
    return EPIC_ERR_INVALID;
  }
  EPIC_CHECK_CUDA(epic_cuk_moe_plan(idx, n, n_experts, div, plan, counts, c->err_flag, c->stream),
                  "moe_plan");
  return EPIC_OK;
}

/* Synchronise and report device-detected faults (then clear them). */
static epic_status sync_and_report(epic_cuda_ops *c) {
  int flag = 0;
  EPIC_CHECK_CUDA(
      cudaMemcpyAsync(&flag, c->err_flag, sizeof flag, cudaMemcpyDeviceToHost, c->stream),
      "read the device error flag");
  EPIC_CHECK_CUDA(cudaStreamSynchronize(c->stream), "synchronize");
  if (flag) {
    EPIC_CHECK_CUDA(cudaMemsetAsync(c->err_flag, 0, sizeof(int), c->stream), "clear error flag");
    if (flag & EPIC_CUK_ERR_EMBED_ID)
      EPIC_LOG_ERROR("cuda: embed saw a token id outside the table (rows set to NaN)");
    if (flag & EPIC_CUK_ERR_EXPERT_ID)
      EPIC_LOG_ERROR("cuda: moe_plan saw an expert id outside [0, n_experts) (items left out)");
    if (flag & EPIC_CUK_ERR_GROUP_ROWS)
      EPIC_LOG_ERROR("cuda: grouped_matmul_dev saw a group above its max_rows bound (rows left "
                     "uncomputed)");
    return EPIC_ERR_INVALID;
  }
  return EPIC_OK;
}

epic_status epic_ops_cuda_sync(epic_ops *o) {
  if (!o)
    return EPIC_ERR_INVALID;
  EPIC_CHECK(epic_cuda_not_recording(epic_cuda_of(o), "sync"));
  return sync_and_report(epic_cuda_of(o));
}

/* ------------------------------------------------------------------ memory */

static epic_status cuda_alloc(epic_ops *o, size_t bytes, void **out) {
  if (!out)
    return EPIC_ERR_INVALID;
  *out = NULL;
  epic_cuda_ops *c = epic_cuda_of(o);
  EPIC_CHECK(epic_cuda_not_recording(c, "alloc"));
  const size_t n = bytes ? bytes : 64;
  void *p = NULL;
  cudaError_t e = cudaMalloc(&p, n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    EPIC_LOG_ERROR("cuda: alloc of %zu bytes failed: %s", bytes, cudaGetErrorString(e));
    return EPIC_ERR_NOMEM;
  }
  epic_status st = epic_cuda_check(cudaMemsetAsync(p, 0, n, c->stream), "zero new allocation");
  if (st == EPIC_OK)
    st = epic_cuda_check(cudaStreamSynchronize(c->stream), "zero new allocation");
  if (st != EPIC_OK) {
    cudaFree(p);
    return st;
  }
  *out = p;
  return EPIC_OK;
}

static void cuda_free(epic_ops *o, void *p) {
  if (p) {
    epic_cuda_of(o)->epoch++;
    cudaFree(p);
  }
}

static epic_status cuda_upload(epic_ops *o, void *dst, const void *src, size_t bytes) {
  if (bytes == 0)
    return EPIC_OK;
  if (!dst || !src)
    return EPIC_ERR_INVALID;
  epic_cuda_ops *c = epic_cuda_of(o);
  EPIC_CHECK(epic_cuda_not_recording(c, "upload"));
  EPIC_CHECK_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->stream), "upload");
  EPIC_CHECK_CUDA(cudaStreamSynchronize(c->stream), "upload");
  return EPIC_OK;
}

/* Staged through a pinned slot, so the copy is queued and the host does not wait (the
 * plans of the expert-parallel exchange, whose data the queue waits for). */
static epic_status cuda_upload_async(epic_ops *o, void *dst, const void *src, size_t bytes) {
  epic_cuda_ops *c = epic_cuda_of(o);
  if (bytes > EPIC_CUDA_STAGE_BYTES)
    return cuda_upload(o, dst, src, bytes);
  if (bytes == 0)
    return EPIC_OK;
  if (!dst || !src)
    return EPIC_ERR_INVALID;
  EPIC_CHECK(epic_cuda_not_recording(c, "upload"));
  struct epic_cuda_stage *sl = &c->stage[c->stage_next];
  if (!sl->host) {
    EPIC_CHECK_CUDA(cudaMallocHost(&sl->host, EPIC_CUDA_STAGE_BYTES), "upload staging");
    cudaError_t e = cudaEventCreateWithFlags(&sl->ev, cudaEventDisableTiming);
    if (e != cudaSuccess) {
      cudaFreeHost(sl->host);
      sl->host = NULL;
      return epic_cuda_check(e, "upload staging event");
    }
  }
  if (sl->pending) /* the copy out of this slot, EPIC_CUDA_STAGE_SLOTS uploads ago */
    EPIC_CHECK_CUDA(cudaEventSynchronize(sl->ev), "upload staging");
  sl->pending = 0;
  memcpy(sl->host, src, bytes);
  EPIC_CHECK_CUDA(cudaMemcpyAsync(dst, sl->host, bytes, cudaMemcpyHostToDevice, c->stream),
                  "upload");
  EPIC_CHECK_CUDA(cudaEventRecord(sl->ev, c->stream), "upload");
  sl->pending = 1;
  c->stage_next = (c->stage_next + 1) % EPIC_CUDA_STAGE_SLOTS;
  return EPIC_OK;
}

static void *cuda_queue(epic_ops *o) {
  return epic_cuda_of(o)->stream;
}

static epic_status cuda_download(epic_ops *o, void *dst, const void *src, size_t bytes) {
  if (bytes == 0)
    return EPIC_OK;
  if (!dst || !src)
    return EPIC_ERR_INVALID;
  epic_cuda_ops *c = epic_cuda_of(o);
  EPIC_CHECK(epic_cuda_not_recording(c, "download"));
  EPIC_CHECK_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->stream), "download");
  return sync_and_report(c);
}

/* ---------------------------------------------------------- element-wise ops */

static epic_status cuda_rmsnorm(epic_ops *o, const float *x, int64_t ldx, int64_t m, int64_t n,
                                const float *w, float eps, float *y, int64_t ldy) {
  if (m < 0 || n <= 0 || !x || !w || !y)
    return m == 0 ? EPIC_OK : EPIC_ERR_INVALID;
  if (m == 0)
    return EPIC_OK;
  if (ldx < n || ldy < n)
    return EPIC_ERR_INVALID;
  return launched(epic_cuk_rmsnorm(x, ldx, m, n, w, eps, y, ldy, epic_cuda_of(o)->stream),
                  "rmsnorm");
}

static epic_status cuda_rope(epic_ops *o, float *x, int64_t m, int64_t n_heads, int64_t ld_tok,
                             int64_t ld_head, int64_t rope_dim, const int32_t *pos,
                             const double *inv_freq) {
  if (m == 0 || n_heads == 0 || rope_dim == 0)
    return EPIC_OK;
  if (m < 0 || n_heads < 0 || rope_dim < 0 || (rope_dim & 1) || !x || !pos || !inv_freq)
    return EPIC_ERR_INVALID;
  if (rope_dim / 2 > EPIC_CUK_ROPE_MAX_PAIRS) {
    EPIC_LOG_ERROR("rope: rope_dim %lld above the CUDA backend's %d", (long long)rope_dim,
                   2 * EPIC_CUK_ROPE_MAX_PAIRS);
    return EPIC_ERR_UNSUPPORTED;
  }
  epic_cuk_rope_freq f;
  memset(&f, 0, sizeof f);
  memcpy(f.f, inv_freq, (size_t)(rope_dim / 2) * sizeof(double));
  return launched(
      epic_cuk_rope(x, m, n_heads, ld_tok, ld_head, rope_dim, pos, &f, epic_cuda_of(o)->stream),
      "rope");
}

static epic_status cuda_silu_mul(epic_ops *o, const float *g, int64_t ldg, const float *u,
                                 int64_t ldu, int64_t m, int64_t n, float *y, int64_t ldy) {
  if (m == 0 || n == 0)
    return EPIC_OK;
  if (m < 0 || n < 0 || !g || !u || !y)
    return EPIC_ERR_INVALID;
  return launched(epic_cuk_silu_mul(g, ldg, u, ldu, m, n, y, ldy, epic_cuda_of(o)->stream),
                  "silu_mul");
}

static epic_status cuda_axpy(epic_ops *o, int64_t n, float a, const float *x, float *y) {
  if (n == 0)
    return EPIC_OK;
  if (n < 0 || !x || !y)
    return EPIC_ERR_INVALID;
  return launched(epic_cuk_axpy(n, a, x, y, epic_cuda_of(o)->stream), "axpy");
}

int epic_cuda_weight_ok(const epic_weight *w) {
  if (!w || !w->data || w->rows < 0 || w->cols <= 0)
    return 0;
  switch (w->dtype) {
  case EPIC_DT_F32:
  case EPIC_DT_BF16:
  case EPIC_DT_F16: return 1;
  case EPIC_DT_F8E4M3: return w->scale_inv && w->block_rows > 0 && w->block_cols > 0;
  default: return 0;
  }
}

static epic_status cuda_embed(epic_ops *o, const epic_weight *table, const int32_t *ids, int64_t m,
                              float *y) {
  if (m == 0)
    return EPIC_OK;
  if (m < 0 || !epic_cuda_weight_ok(table) || !ids || !y)
    return EPIC_ERR_INVALID;
  epic_cuda_ops *c = epic_cuda_of(o);
  return launched(epic_cuk_embed(table, ids, m, y, c->err_flag, c->stream), "embed");
}

static epic_status cuda_route(epic_ops *o, const float *logits, int64_t m,
                              const epic_router_params *p, int32_t *idx, float *weight) {
  if (m == 0)
    return EPIC_OK;
  if (m < 0 || !logits || !idx || !weight || !epic_router_params_ok(p))
    return EPIC_ERR_INVALID;
  const int64_t ng = p->n_group > 1 ? p->n_group : 1;
  if (epic_cuk_route_smem(p->n_experts, ng) > 48 * 1024) {
    EPIC_LOG_ERROR("route: %lld experts exceed the CUDA router's shared memory",
                   (long long)p->n_experts);
    return EPIC_ERR_UNSUPPORTED;
  }
  return launched(epic_cuk_route(logits, m, p, idx, weight, epic_cuda_of(o)->stream), "route");
}

static int kv_ok(const epic_kv_view *kv) {
  return kv && kv->pool && kv->block_table && kv->lora >= 0 && kv->lora <= kv->width &&
         kv->page_size > 0;
}

epic_status epic_cuda_kv_dtype_ok(epic_kv_dtype dt, const char *op) {
  if (dt == EPIC_KV_F32 || dt == EPIC_KV_BF16)
    return EPIC_OK;
  EPIC_LOG_ERROR("%s: unknown KV cache element type %d", op, (int)dt);
  return EPIC_ERR_UNSUPPORTED;
}

/* ABI 9 (ops.h). Exact precision: grouped_chunks' fixed-shape GEMMs, any weight. Invariant
 * precision: any weight (grouped_invariant in ops_cuda_matmul.c). Fast: FP8
 * weights the wgmma kernel takes, with every group on it (mma_group_rows 0, the default,
 * and the large groups on wgmma; ops_cuda_matmul.c, "Row invariance"). */
static int cuda_grouped_invariant(epic_ops *o, const epic_weight *w) {
  epic_cuda_ops *c = epic_cuda_of(o);
  if (c->exact_matmul || c->invariant)
    return 1;
  return epic_cuda_groups_all_wgmma(c) && epic_cuk_fp8_wgmma_layout_ok(w);
}

/* ABI 12 (ops.h). Exact precision: fixed-shape chunks in every matmul (grouped_chunks,
 * head_chunks) and fixed key chunks per query in the fp32-cache MLA decode. Invariant
 * precision: the expert kernel for FP8 weights, fixed-shape chunks for the others
 * (grouped_invariant in ops_cuda_matmul.c), fixed key chunks in the BF16-cache decode
 * (ops_cuda.h). */
static int cuda_rows_invariant(epic_ops *o) {
  const epic_cuda_ops *c = epic_cuda_of(o);
  return c->invariant || (c->exact_matmul && c->mla_prec == EPIC_CUDA_MLA_EXACT);
}

/* bf16 absorption weights in fast mode (half the bytes a decode step reads for them; the
 * MLA kernels round q_abs and P to bf16 there anyway), fp32 in exact mode. */
static epic_dtype cuda_head_dtype(epic_ops *o) {
  return epic_cuda_of(o)->exact_matmul ? EPIC_DT_F32 : EPIC_DT_BF16;
}

/* bf16 rows in fast mode (half the bytes every decode step streams), fp32 in exact mode
 * (the cache then keeps what the fp32 reference keeps). */
static epic_kv_dtype cuda_kv_dtype(epic_ops *o) {
  return epic_cuda_of(o)->mla_prec == EPIC_CUDA_MLA_EXACT ? EPIC_KV_F32 : EPIC_KV_BF16;
}

static epic_status cuda_kv_store(epic_ops *o, const epic_kv_view *kv, int64_t start, int64_t m,
                                 const float *latent, int64_t ld_latent, const float *kpe,
                                 int64_t ld_kpe) {
  if (m == 0)
    return EPIC_OK;
  if (!kv_ok(kv) || m < 0 || start < 0 || !latent || !kpe)
    return EPIC_ERR_INVALID;
  EPIC_CHECK(epic_cuda_kv_dtype_ok(kv->dtype, "kv_store"));
  return launched(
      epic_cuk_kv_store(kv, start, m, latent, ld_latent, kpe, ld_kpe, epic_cuda_of(o)->stream),
      "kv_store");
}

static epic_status cuda_kv_gather(epic_ops *o, const epic_kv_view *kv, int64_t n, float *latent,
                                  float *kpe) {
  if (n == 0)
    return EPIC_OK;
  if (!kv_ok(kv) || n < 0 || !latent || !kpe)
    return EPIC_ERR_INVALID;
  EPIC_CHECK(epic_cuda_kv_dtype_ok(kv->dtype, "kv_gather"));
  return launched(epic_cuk_kv_gather(kv, n, latent, kpe, epic_cuda_of(o)->stream), "kv_gather");
}

/* ---------------------------------------------------------------- ABI 3 */

static epic_status cuda_copy_rows(epic_ops *o, int64_t n, int64_t cols, const float *src,
                                  int64_t ld_src, const int32_t *src_idx, float *dst,
                                  int64_t ld_dst, const int32_t *dst_idx) {
  if (n == 0 || cols == 0)
    return EPIC_OK;
  if (n < 0 || cols < 0 || !src || !dst || ld_src < 0 || ld_dst < 0)
    return EPIC_ERR_INVALID;
  return launched(epic_cuk_copy_rows(n, cols, src, ld_src, src_idx, dst, ld_dst, dst_idx,
                                     epic_cuda_of(o)->stream),
                  "copy_rows");
}

static epic_status cuda_zero(epic_ops *o, void *p, size_t bytes) {
  if (bytes == 0)
    return EPIC_OK;
  if (!p)
    return EPIC_ERR_INVALID;
  return epic_cuda_check(cudaMemsetAsync(p, 0, bytes, epic_cuda_of(o)->stream), "zero");
}

static epic_status cuda_row_pick(epic_ops *o, const float *x, int64_t m, int64_t n, int32_t *ids,
                                 float *logprob) {
  if (m == 0)
    return EPIC_OK;
  if (m < 0 || m > INT32_MAX || n <= 0 || !x || !ids || !logprob)
    return EPIC_ERR_INVALID;
  epic_cuda_ops *c = epic_cuda_of(o);
  EPIC_CHECK(epic_cuda_buf_reserve(c, &c->pick, epic_cuk_row_pick_scratch(m, n)));
  return launched(epic_cuk_row_pick(x, m, n, ids, logprob, c->pick.p, c->stream), "row_pick");
}

static epic_status cuda_row_draw(epic_ops *o, const float *x, int64_t m, int64_t n,
                                 const epic_draw_params *p, int32_t *ids, float *logprob) {
  if (m == 0)
    return EPIC_OK;
  if (m < 0 || m > INT32_MAX || n <= 0 || !x || !p || !ids || !logprob)
    return EPIC_ERR_INVALID;
  return launched(epic_cuk_row_draw(x, m, n, p, ids, logprob, epic_cuda_of(o)->stream),
                  "row_draw");
}

static epic_status cuda_moe_combine(epic_ops *o, int64_t m, int64_t top_k, int64_t n,
                                    const float *rows, const int32_t *slot, const float *w,
                                    float *y) {
  if (m == 0 || top_k == 0 || n == 0)
    return EPIC_OK;
  if (m < 0 || top_k < 0 || n < 0 || !rows || !w || !y)
    return EPIC_ERR_INVALID;
  return launched(epic_cuk_moe_combine(m, top_k, n, rows, slot, w, y, epic_cuda_of(o)->stream),
                  "moe_combine");
}

static epic_status cuda_kv_store_batch(epic_ops *o, const epic_kv_batch *kv, int64_t n_seq,
                                       const float *latent, int64_t ld_latent, const float *kpe,
                                       int64_t ld_kpe) {
  if (n_seq == 0)
    return EPIC_OK;
  if (!kv || n_seq < 0 || !kv->pool || !kv->block_tables || !kv->n_ctx || kv->page_size <= 0 ||
      kv->lora < 0 || kv->lora > kv->width || !latent || !kpe)
    return EPIC_ERR_INVALID;
  EPIC_CHECK(epic_cuda_kv_dtype_ok(kv->dtype, "kv_store_batch"));
  return launched(epic_cuk_kv_store_batch(kv, n_seq, latent, ld_latent, kpe, ld_kpe,
                                          epic_cuda_of(o)->stream),
                  "kv_store_batch");
}

/* ------------------------------------------------------------------ graphs */

struct epic_ops_graph {
  cudaGraphExec_t exec;
};

static epic_status cuda_graph_begin(epic_ops *o) {
  epic_cuda_ops *c = epic_cuda_of(o);
  if (c->recording)
    return EPIC_ERR_INVALID;
  /* Thread-local: another thread's CUDA calls (an NCCL proxy, a second model) neither
   * spoil this recording nor are refused because of it. */
  EPIC_CHECK_CUDA(cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal),
                  "begin graph capture");
  c->recording = 1;
  return EPIC_OK;
}

static epic_status cuda_graph_end(epic_ops *o, epic_ops_graph **out) {
  epic_cuda_ops *c = epic_cuda_of(o);
  cudaGraph_t graph = NULL;
  *out = NULL;
  if (!c->recording)
    return EPIC_ERR_INVALID;
  c->recording = 0;
  cudaError_t e = cudaStreamEndCapture(c->stream, &graph);
  if (e != cudaSuccess) {
    /* A refused op or launch invalidated the capture: not an error of the device, and
     * the stream is usable again once the status is cleared. */
    (void)cudaGetLastError();
    if (graph)
      cudaGraphDestroy(graph);
    EPIC_LOG_DEBUG("cuda: graph capture ended unusable: %s", cudaGetErrorString(e));
    return EPIC_ERR_UNSUPPORTED;
  }
  epic_ops_graph *g = calloc(1, sizeof *g);
  if (!g) {
    cudaGraphDestroy(graph);
    return EPIC_ERR_NOMEM;
  }
  e = cudaGraphInstantiate(&g->exec, graph, 0);
  cudaGraphDestroy(graph);
  if (e != cudaSuccess) {
    free(g);
    return epic_cuda_check(e, "instantiate graph");
  }
  *out = g;
  return EPIC_OK;
}

static epic_status cuda_graph_launch(epic_ops *o, epic_ops_graph *g) {
  epic_cuda_ops *c = epic_cuda_of(o);
  if (!g || c->recording)
    return EPIC_ERR_INVALID;
  return epic_cuda_check(cudaGraphLaunch(g->exec, c->stream), "launch graph");
}

static void cuda_graph_free(epic_ops *o, epic_ops_graph *g) {
  (void)o;
  if (!g)
    return;
  cudaGraphExecDestroy(g->exec);
  free(g);
}

static uint64_t cuda_graph_epoch(epic_ops *o) {
  return epic_cuda_of(o)->epoch;
}

/* ---------------------------------------------------------------- lifetime */

static void cuda_destroy(epic_ops *o) {
  if (!o)
    return;
  epic_cuda_ops *c = epic_cuda_of(o);
  if (c->stream)
    cudaStreamSynchronize(c->stream);
  for (int i = 0; i < c->n_group_tabs; i++) {
    cudaFree(c->group_tabs[i].dev);
    cudaFree(c->group_tabs[i].wmaps);
  }
  epic_cuda_matmul_release(c);
  epic_cuda_buf *bufs[] = {&c->act, &c->act_s, &c->wdq,  &c->outb, &c->keys,
                           &c->att, &c->pick,  &c->gath, &c->tiles};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
    cudaFree(bufs[i]->p);
  for (int i = 0; i < EPIC_CUDA_STAGE_SLOTS; i++)
    if (c->stage[i].host) {
      cudaEventDestroy(c->stage[i].ev);
      cudaFreeHost(c->stage[i].host);
    }
  if (c->lt)
    cublasLtDestroy(c->lt);
  if (c->blas)
    cublasDestroy(c->blas);
  cudaFree(c->blas_ws);
  cudaFree(c->lt_ws);
  cudaFree(c->err_flag);
  if (c->stream)
    cudaStreamDestroy(c->stream);
  free(c);
}

static const epic_ops_vt epic_cuda_vt = {
    .abi_version = EPIC_OPS_ABI_VERSION,
    .name = "cuda",
    .matmul = epic_cuda_matmul,
    .rmsnorm = cuda_rmsnorm,
    .rope = cuda_rope,
    .silu_mul = cuda_silu_mul,
    .axpy = cuda_axpy,
    .embed = cuda_embed,
    .route = cuda_route,
    .kv_store = cuda_kv_store,
    .kv_gather = cuda_kv_gather,
    .mla_naive = epic_cuda_mla_naive,
    .mla_absorbed = epic_cuda_mla_absorbed,
    .head_gemm = epic_cuda_head_gemm,
    .alloc = cuda_alloc,
    .free = cuda_free,
    .upload = cuda_upload,
    .download = cuda_download,
    .destroy = cuda_destroy,
    .mla_absorbed_batch = epic_cuda_mla_absorbed_batch,
    .host_visible = 0,
    .copy_rows = cuda_copy_rows,
    .zero = cuda_zero,
    .moe_combine = cuda_moe_combine,
    .kv_store_batch = cuda_kv_store_batch,
    .grouped_matmul = epic_cuda_grouped_matmul,
    .sync = epic_ops_cuda_sync,
    .row_pick = cuda_row_pick,
    .kv_dtype = cuda_kv_dtype,
    .moe_plan = cuda_moe_plan,
    .grouped_matmul_dev = epic_cuda_grouped_matmul_dev,
    .graph_begin = cuda_graph_begin,
    .graph_end = cuda_graph_end,
    .graph_launch = cuda_graph_launch,
    .graph_free = cuda_graph_free,
    .graph_epoch = cuda_graph_epoch,
    .grouped_matmul_rows = epic_cuda_grouped_matmul_rows,
    .upload_async = cuda_upload_async,
    .queue = cuda_queue,
    .grouped_invariant = cuda_grouped_invariant,
    .head_dtype = cuda_head_dtype,
    .head_gemm_bf16 = epic_cuda_head_gemm_bf16,
    .rows_invariant = cuda_rows_invariant,
    .row_draw = cuda_row_draw,
};

/* An environment setting among n named values: the index of the one `name` holds, 0 when
 * it is unset or empty; anything else is named in a warning and taken as the first. */
static int env_choice(const char *name, const char *const *values, int n) {
  const char *v = getenv(name);
  if (!v || !*v)
    return 0;
  for (int i = 0; i < n; i++)
    if (strcmp(v, values[i]) == 0)
      return i;
  char list[128] = "";
  for (int i = 0; i < n; i++)
    snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", i ? ", " : "", values[i]);
  EPIC_LOG_WARN("cuda: %s=%s is none of %s; using %s", name, v, list, values[0]);
  return 0;
}

/* A switch between two values: 1 when `name` is `second` (env_choice). */
static int env_pick(const char *name, const char *first, const char *second) {
  const char *const values[2] = {first, second};
  return env_choice(name, values, 2);
}

/* An integer environment setting in [lo, hi]; unset or empty gives dflt, anything else is
 * named in a warning and dflt taken. */
static long env_range(const char *name, long lo, long hi, long dflt) {
  const char *v = getenv(name);
  if (!v || !*v)
    return dflt;
  char *end = NULL;
  const long x = strtol(v, &end, 10);
  if (*end || x < lo || x > hi) {
    EPIC_LOG_WARN("cuda: %s=%s is not %ld..%ld; using %ld", name, v, lo, hi, dflt);
    return dflt;
  }
  return x;
}

epic_status epic_ops_cuda_create(int device, epic_ops **out) {
  if (!out)
    return EPIC_ERR_INVALID;
  *out = NULL;
  const int n_dev = epic_cuda_device_count();
  if (n_dev <= 0) {
    EPIC_LOG_ERROR("cuda: no CUDA device is usable here");
    return EPIC_ERR_UNSUPPORTED;
  }
  if (device < 0 || device >= n_dev) {
    EPIC_LOG_ERROR("cuda: device %d does not exist (%d devices)", device, n_dev);
    return EPIC_ERR_INVALID;
  }
  epic_cuda_ops *c = calloc(1, sizeof *c);
  if (!c)
    return EPIC_ERR_NOMEM;
  c->base.vt = &epic_cuda_vt;
  c->device = device;
  c->mla_prec = EPIC_CUDA_MLA_TF32;
  c->mla_bf16_variant = EPIC_CUDA_MLA_BF16_DEFAULT;
  c->fp8_small = EPIC_CUDA_FP8_SMALL_MMA;
  static const char *const precs[] = {"fast", "exact", "invariant"}; /* epic_cuda_precision */
  const int prec = env_choice("EPIC_CUDA_PRECISION", precs, 3);
  c->exact_matmul = prec == EPIC_CUDA_PREC_EXACT;
  c->invariant = prec == EPIC_CUDA_PREC_INVARIANT;
  if (c->exact_matmul)
    c->mla_prec = EPIC_CUDA_MLA_EXACT;
  if (env_pick("EPIC_CUDA_FP8_SMALL", "mma", "fp32"))
    c->fp8_small = EPIC_CUDA_FP8_SMALL_FP32;
  c->mla_prefill_wgmma = !env_pick("EPIC_CUDA_MLA_PREFILL", "wgmma", "mma");
  if (env_pick("EPIC_CUDA_GROUPED_LARGE", "wgmma", "lanes"))
    c->grouped_large = EPIC_CUDA_GROUPED_LARGE_LANES;
  c->mma_group_rows = env_range("EPIC_CUDA_FP8_MMA_GROUP_ROWS", 0, EPIC_CUDA_FP8_MMA_GROUP_MAX_ROWS,
                                EPIC_CUDA_FP8_MMA_GROUP_ROWS_DEFAULT);
  c->n_lanes = (int)env_range("EPIC_CUDA_GROUPED_LANES", 0, EPIC_CUDA_LT_LANES_MAX,
                              EPIC_CUDA_LT_LANES_DEFAULT);
  static const char *const forms[] = {"auto", "half", "whole"}; /* epic_cuda_wgmma_form */
  c->wgmma_form = env_choice("EPIC_CUDA_WGMMA_FORM", forms, 3);
  c->wgmma_thin = !env_pick("EPIC_CUDA_WGMMA_THIN", "on", "off");
  c->head_rows = !env_pick("EPIC_CUDA_HEAD_ROWS", "on", "off");
  epic_status st = EPIC_OK;
  struct cudaDeviceProp prop;
  EPIC_CHECK_GOTO(epic_cuda_check(cudaSetDevice(device), "set device"), st, fail);
  EPIC_CHECK_GOTO(epic_cuda_check(cudaGetDeviceProperties(&prop, device), "device properties"), st,
                  fail);
  snprintf(c->name, sizeof c->name, "%s", prop.name);
  c->sm_count = prop.multiProcessorCount;
  c->max_smem_optin = (int)prop.sharedMemPerBlockOptin;
  if (prop.major < 9) {
    /* The kernels are built for sm_90 only (FP8 GEMM and TF32 MMA need Hopper). */
    EPIC_LOG_ERROR("cuda: device %d (%s) is compute capability %d.%d; EPIC needs 9.0 (Hopper)",
                   device, prop.name, prop.major, prop.minor);
    st = EPIC_ERR_UNSUPPORTED;
    goto fail;
  }
  EPIC_CHECK_GOTO(
      epic_cuda_check(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking), "stream"), st,
      fail);
  EPIC_CHECK_GOTO(epic_cuda_check(cudaMalloc((void **)&c->err_flag, sizeof(int)), "error flag"), st,
                  fail);
  EPIC_CHECK_GOTO(
      epic_cuda_check(cudaMemsetAsync(c->err_flag, 0, sizeof(int), c->stream), "error flag"), st,
      fail);
  c->blas_ws_bytes = EPIC_CUDA_BLAS_WS;
  c->lt_ws_bytes = EPIC_CUDA_LT_WS;
  EPIC_CHECK_GOTO(epic_cuda_check(cudaMalloc(&c->blas_ws, c->blas_ws_bytes), "cuBLAS workspace"),
                  st, fail);
  EPIC_CHECK_GOTO(epic_cuda_check(cudaMalloc(&c->lt_ws, c->lt_ws_bytes), "cuBLASLt workspace"), st,
                  fail);
  EPIC_CHECK_GOTO(epic_cublas_check(cublasCreate(&c->blas), "create handle"), st, fail);
  EPIC_CHECK_GOTO(epic_cublas_check(cublasSetStream(c->blas, c->stream), "set stream"), st, fail);
  EPIC_CHECK_GOTO(
      epic_cublas_check(cublasSetWorkspace(c->blas, c->blas_ws, c->blas_ws_bytes), "set workspace"),
      st, fail);
  /* fp32 GEMMs stay fp32: no TF32 behind the caller's back. */
  EPIC_CHECK_GOTO(epic_cublas_check(cublasSetMathMode(c->blas, CUBLAS_DEFAULT_MATH), "math mode"),
                  st, fail);
  EPIC_CHECK_GOTO(epic_cublas_check(cublasLtCreate(&c->lt), "create Lt handle"), st, fail);
  EPIC_CHECK_GOTO(epic_cuda_check(epic_cuk_mla_decode_prepare(c->max_smem_optin), "MLA kernel"), st,
                  fail);
  EPIC_CHECK_GOTO(
      epic_cuda_check(epic_cuk_mla_bf16_prepare(c->max_smem_optin), "MLA kernel (bf16 cache)"), st,
      fail);
  EPIC_CHECK_GOTO(epic_cuda_check(epic_cuk_fp8_skinny_prepare(), "FP8 skinny kernel"), st, fail);
  EPIC_CHECK_GOTO(epic_cuda_check(epic_cuk_fp8_mma_prepare(), "FP8 tensor-core kernel"), st, fail);
  EPIC_CHECK_GOTO(epic_cuda_check(epic_cuk_mla_prefill_prepare(), "MLA prefill kernel"), st, fail);
  EPIC_CHECK_GOTO(epic_cuda_check(epic_cuk_fp8_wgmma_prepare(), "grouped FP8 wgmma kernel"), st,
                  fail);
  EPIC_CHECK_GOTO(epic_cuda_check(cudaStreamSynchronize(c->stream), "create"), st, fail);
  *out = &c->base;
  return EPIC_OK;
fail:
  cuda_destroy(&c->base);
  return st;
}
