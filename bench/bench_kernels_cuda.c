/* bench_kernels_cuda: the CUDA backend of epic_ops against this GPU's own measured
 * limits, in one run. Prints one JSON object on stdout (a summary table on stderr).
 *
 * Peaks, measured first: device-to-device copy bandwidth (bytes read + written; the faster
 * of a direct cudaMemcpyAsync and the backend's copy_rows kernel over 1 GiB), dense
 * BF16 GEMM 8192^3 through cublasGemmEx and dense FP8 e4m3 GEMM 8192^3 through cuBLASLt
 * with one scale per tensor (the library's best FP8 case), both on random data.
 * Then per kernel, through the epic_ops API exactly as the model calls it: time per call,
 * TFLOP/s and GB/s (each input read once, each output written once) and their fractions
 * of the peaks. matmul: BF16 and FP8 (128x128 block scales) weights at DeepSeek-V3
 * shapes for m = 1..4096 tokens, activation conversion / quantisation included; FP8 rows
 * of m <= 64 are timed under both choices of epic_ops_cuda_set_fp8_small ("kernel": "mma",
 * the tensor-core kernel, or "fp32", the older CUDA-core / cuBLASLt paths; null where the
 * switch does not apply). grouped: the MoE case, grouped_matmul over 256 FP8 experts
 * (each its own allocation; gate/up as one 4096 x 7168 weight, as worker/model.c loads
 * it, and down 7168 x 2048) for T tokens x top-8 distinct experts drawn uniformly, both
 * kernel choices (bytes: every expert with rows read once, fp32 rows in and out); where
 * groups exceed the small-group kernels' bound also timed without a graph: on the
 * default large-group kernel (wgmma, kern_fp8_wgmma.cu; the run stops if it did not
 * run; also from the T token rows through the plan, grouped_matmul_rows, as prefill's
 * gate/up reads them), on cuBLASLt GEMMs on grouped_matmul's lanes (4, and 2 and 8) and one after
 * another (epic_ops_cuda_set_grouped_large / _lanes). mla_absorbed_batch decode over fp32 and bf16
 * caches (bytes: cached 576-element rows read once per sequence at their element size,
 * plus fp32 queries and outputs); mla_prefill: mla_naive at DeepSeek-V3 heads for a
 * chunk after a context (TFLOP/s over the causal pairs, fraction of the BF16 peak; fast
 * precision with the flash kernel on wgmma and on mma.sync, and exact precision);
 * head: the absorbed attention's two per-head products (fp32 weights; bf16 weights in the
 * fast precision, in the invariant one on its mma kernel and on cuBLAS chunks);
 * rmsnorm, route, silu_mul, rope.
 * Timing: CUDA events around a CUDA graph of `reps` calls (launch gaps removed), median
 * of 7 replays. Inputs that would fit in L2 rotate among copies whose total exceeds it.
 * Usage: bench_kernels_cuda [--quick] [--device N] [--only matmul|grouped|mla|prefill|memory|head]
 *                           [--mla BATCH CTX] (one decode shape, e.g. under a profiler)
 *                           [--grouped TOKENS] (the grouped section at one token count)
 *                           [--mla-split S,S,...] (bf16 MLA decode also at these key splits)
 *                           [--skinny-split R,R,...] (FP8 m <= 4 also at these column runs)
 *                           [--mla-kinds MASK] (MLA rows: bits 0-3, 5 and 6 the bf16
 *                           kernel variants 0-5, bit 4 the fp32 cache; default 0x79)
 *                           [--no-peaks] (skip the peak measurements; fractions print 0) */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "kernels/cuda/ops_cuda.h"
#include "kernels/ops.h"

#define CK(x)                                                                                      \
  do {                                                                                             \
    cudaError_t e_ = (x);                                                                          \
    if (e_ != cudaSuccess) {                                                                       \
      fprintf(stderr, "bench: %s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e_));           \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)
#define CKB(x)                                                                                     \
  do {                                                                                             \
    cublasStatus_t s_ = (x);                                                                       \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                                             \
      fprintf(stderr, "bench: %s:%d: cublas status %d\n", __FILE__, __LINE__, (int)s_);            \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)
#define CKE(x)                                                                                     \
  do {                                                                                             \
    epic_status s_ = (x);                                                                          \
    if (s_ != EPIC_OK) {                                                                           \
      fprintf(stderr, "bench: %s:%d: %s\n", __FILE__, __LINE__, epic_status_str(s_));              \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

static epic_ops *g_ops;
static cudaStream_t g_st;
static int g_quick;
/* MLA rows to time (--mla-kinds): bit k < 4 the bf16-cache kernel variant k
 * (epic_cuda_mla_bf16_kernel), bits 5 and 6 its variants 4 (seesaw) and 5 (auto, the
 * default), bit 4 the fp32 cache under TF32 and 3xTF32. Default: the fp32 rows, the bf16
 * kernel's auto, seesaw, wgmma and all-mma.sync variants. */
static unsigned g_mla_kinds = 0x79;
static unsigned mla_kind_bit(int bf16_variant) {
  return 1u << (bf16_variant < 4 ? bf16_variant : bf16_variant + 1);
}
static int g_mla_splits[8], g_n_mla_splits; /* --mla-split: bf16 rows at these split counts too */
static int g_skinny_splits[4], g_n_skinny_splits; /* --skinny-split: FP8 m <= 4 at these runs too */
#define L2_ROTATE_BYTES ((size_t)160 << 20)

/* ------------------------------------------------------------ random data */

static uint64_t rs = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void) {
  rs ^= rs << 13;
  rs ^= rs >> 7;
  rs ^= rs << 17;
  return rs;
}
static float rndf(void) {
  return (float)((double)(rnd() >> 11) * 0x1p-53 * 2.0 - 1.0);
}

/* A rate as a fraction of a measured peak (0 where the peak was not measured). */
static double frac_of(double rate, double peak) {
  return peak > 0 ? rate / peak : 0.0;
}

static void *xmalloc(size_t bytes) {
  void *p = malloc(bytes ? bytes : 1);
  if (!p) {
    fprintf(stderr, "bench: out of host memory (%zu bytes)\n", bytes);
    exit(1);
  }
  return p;
}

#define TILE_BYTES ((size_t)32 << 20)
static unsigned char *tile_f32, *tile_bf16, *tile_fp8, *tile_scale;

static void make_tiles(void) {
  tile_f32 = xmalloc(TILE_BYTES);
  tile_bf16 = xmalloc(TILE_BYTES);
  tile_fp8 = xmalloc(TILE_BYTES);
  tile_scale = xmalloc(TILE_BYTES);
  for (size_t i = 0; i < TILE_BYTES / 4; i++) {
    ((float *)tile_f32)[i] = rndf();
    ((float *)tile_scale)[i] = (1.5f + rndf()) * 1e-3f;
  }
  for (size_t i = 0; i < TILE_BYTES / 2; i++)
    ((uint16_t *)tile_bf16)[i] = epic_f32_to_bf16(rndf());
  for (size_t i = 0; i < TILE_BYTES; i++) {
    uint8_t c;
    do
      c = (uint8_t)rnd();
    while ((c & 0x7f) == 0x7f);
    tile_fp8[i] = c;
  }
}

/* Device buffer of `bytes` filled with repeats of a random host tile. */
static void *dev_random(size_t bytes, const unsigned char *tile) {
  void *d = NULL;
  CKE(g_ops->vt->alloc(g_ops, bytes, &d));
  for (size_t off = 0; off < bytes; off += TILE_BYTES) {
    const size_t n = bytes - off < TILE_BYTES ? bytes - off : TILE_BYTES;
    CKE(g_ops->vt->upload(g_ops, (char *)d + off, tile, n));
  }
  return d;
}

/* ------------------------------------------------------------------ timing */

typedef void (*run_fn)(void *ctx, int rep);

static int cmp_d(const void *a, const void *b) {
  const double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* Seconds per call of fn issued directly (no graph: the host's launch work counts, as
 * in a step that is not recorded), over 5 calls after 2 warm-up calls, median of 3. */
static double time_eager(run_fn fn, void *ctx) {
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  fn(ctx, 0);
  fn(ctx, 1);
  CKE(epic_ops_cuda_sync(g_ops));
  double t[3];
  for (int k = 0; k < 3; k++) {
    CK(cudaEventRecord(e0, g_st));
    for (int r = 0; r < 5; r++)
      fn(ctx, r);
    CK(cudaEventRecord(e1, g_st));
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    t[k] = ms * 1e-3 / 5;
  }
  qsort(t, 3, sizeof t[0], cmp_d);
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  return t[1];
}

/* Seconds per call of fn: graph of `reps` calls replayed 7 times, median. */
static double time_calls(run_fn fn, void *ctx) {
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  fn(ctx, 0); /* warm-up: plans, scratch, module load */
  fn(ctx, 1);
  CKE(epic_ops_cuda_sync(g_ops));
  CK(cudaEventRecord(e0, g_st));
  fn(ctx, 0);
  CK(cudaEventRecord(e1, g_st));
  CK(cudaEventSynchronize(e1));
  float ms1 = 0;
  CK(cudaEventElapsedTime(&ms1, e0, e1));
  int reps = (int)ceil((g_quick ? 5.0 : 20.0) / (ms1 > 1e-3 ? ms1 : 1e-3));
  reps = reps < 2 ? 2 : (reps > 200 ? 200 : reps);
  cudaGraph_t graph = NULL;
  cudaGraphExec_t exec = NULL;
  int graphed = cudaStreamBeginCapture(g_st, cudaStreamCaptureModeThreadLocal) == cudaSuccess;
  if (graphed) {
    for (int r = 0; r < reps; r++)
      fn(ctx, r);
    graphed = cudaStreamEndCapture(g_st, &graph) == cudaSuccess && graph &&
              cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess;
  }
  if (!graphed) {
    (void)cudaGetLastError();
    fprintf(stderr, "bench: graph capture failed, timing plain launches\n");
  }
  double t[7];
  for (int k = 0; k < 7; k++) {
    CK(cudaEventRecord(e0, g_st));
    if (graphed)
      CK(cudaGraphLaunch(exec, g_st));
    else
      for (int r = 0; r < reps; r++)
        fn(ctx, r);
    CK(cudaEventRecord(e1, g_st));
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    t[k] = ms * 1e-3 / reps;
  }
  CKE(epic_ops_cuda_sync(g_ops));
  if (exec)
    cudaGraphExecDestroy(exec);
  if (graph)
    cudaGraphDestroy(graph);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  qsort(t, 7, sizeof t[0], cmp_d);
  return t[3];
}

/* ------------------------------------------------------------------- peaks */

typedef struct {
  void *src, *dst;
  size_t bytes;
} copy_ctx;
static void run_copy(void *p, int rep) {
  copy_ctx *c = p;
  (void)rep;
  CK(cudaMemcpyAsync(c->dst, c->src, c->bytes, cudaMemcpyDeviceToDevice, g_st));
}

/* The same bytes as rows of 64k floats through the backend's copy_rows kernel. */
static void run_copy_rows(void *p, int rep) {
  copy_ctx *c = p;
  const int64_t cols = 1 << 16, rows = (int64_t)(c->bytes / 4) / cols;
  (void)rep;
  CKE(g_ops->vt->copy_rows(g_ops, rows, cols, c->src, cols, NULL, c->dst, cols, NULL));
}

typedef struct {
  cublasHandle_t h;
  float *x, *res;
  int64_t n;
} read_ctx;
static void run_read(void *p, int rep) {
  read_ctx *c = p;
  (void)rep;
  CKB(cublasSasum(c->h, (int)c->n, c->x, 1, c->res));
}

typedef struct {
  cublasHandle_t h;
  void *a, *b, *c;
  int n;
} gemm_ctx;
static void run_bf16_gemm(void *p, int rep) {
  gemm_ctx *g = p;
  const float one = 1.0f, zero = 0.0f;
  (void)rep;
  CKB(cublasGemmEx(g->h, CUBLAS_OP_T, CUBLAS_OP_N, g->n, g->n, g->n, &one, g->a, CUDA_R_16BF, g->n,
                   g->b, CUDA_R_16BF, g->n, &zero, g->c, CUDA_R_16BF, g->n, CUBLAS_COMPUTE_32F,
                   CUBLAS_GEMM_DEFAULT));
}

typedef struct {
  cublasLtHandle_t lt;
  cublasLtMatmulDesc_t desc;
  cublasLtMatrixLayout_t la, lb, lc;
  cublasLtMatmulAlgo_t algo;
  void *a, *b, *c, *ws;
  size_t ws_bytes;
} lt_ctx;
static void run_fp8_gemm(void *p, int rep) {
  lt_ctx *g = p;
  const float one = 1.0f, zero = 0.0f;
  (void)rep;
  CKB(cublasLtMatmul(g->lt, g->desc, &one, g->a, g->la, g->b, g->lb, &zero, g->c, g->lc, g->c,
                     g->lc, &g->algo, g->ws, g->ws_bytes, g_st));
}

/* Dense FP8 8192^3 with per-tensor scales (1.0): TFLOP/s, or 0 if cuBLASLt has no kernel. */
static double fp8_peak(int n) {
  lt_ctx g;
  memset(&g, 0, sizeof g);
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  g.ws_bytes = 64 << 20;
  g.a = dev_random((size_t)n * n, tile_fp8);
  g.b = dev_random((size_t)n * n, tile_fp8);
  CKE(g_ops->vt->alloc(g_ops, (size_t)n * n * 2, &g.c));
  CKE(g_ops->vt->alloc(g_ops, g.ws_bytes, &g.ws));
  cublasLtMatmulPreference_t pref = NULL;
  cublasLtMatmulHeuristicResult_t res;
  int nres = 0;
  double tf = 0;
  if (cublasLtCreate(&g.lt) == 0 &&
      cublasLtMatmulDescCreate(&g.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == 0 &&
      cublasLtMatmulDescSetAttribute(g.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta) == 0 &&
      cublasLtMatmulDescSetAttribute(g.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb) == 0 &&
      cublasLtMatrixLayoutCreate(&g.la, CUDA_R_8F_E4M3, n, n, n) == 0 &&
      cublasLtMatrixLayoutCreate(&g.lb, CUDA_R_8F_E4M3, n, n, n) == 0 &&
      cublasLtMatrixLayoutCreate(&g.lc, CUDA_R_16BF, n, n, n) == 0 &&
      cublasLtMatmulPreferenceCreate(&pref) == 0 &&
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                           &g.ws_bytes, sizeof g.ws_bytes) == 0 &&
      cublasLtMatmulAlgoGetHeuristic(g.lt, g.desc, g.la, g.lb, g.lc, g.lc, pref, 1, &res, &nres) ==
          0 &&
      nres > 0) {
    g.algo = res.algo;
    const double s = time_calls(run_fp8_gemm, &g);
    tf = 2.0 * n * (double)n * n / s * 1e-12;
  } else {
    fprintf(stderr, "bench: cuBLASLt has no dense FP8 kernel here\n");
  }
  if (pref)
    cublasLtMatmulPreferenceDestroy(pref);
  if (g.la)
    cublasLtMatrixLayoutDestroy(g.la);
  if (g.lb)
    cublasLtMatrixLayoutDestroy(g.lb);
  if (g.lc)
    cublasLtMatrixLayoutDestroy(g.lc);
  if (g.desc)
    cublasLtMatmulDescDestroy(g.desc);
  if (g.lt)
    cublasLtDestroy(g.lt);
  g_ops->vt->free(g_ops, g.a);
  g_ops->vt->free(g_ops, g.b);
  g_ops->vt->free(g_ops, g.c);
  g_ops->vt->free(g_ops, g.ws);
  return tf;
}

/* ------------------------------------------------------------------ matmul */

enum { MAX_COPIES = 8 };
typedef struct {
  epic_weight w[MAX_COPIES];
  int copies;
  float *x, *y;
  int64_t m;
} mm_ctx;
static void run_matmul(void *p, int rep) {
  mm_ctx *c = p;
  const epic_weight *w = &c->w[rep % c->copies];
  CKE(g_ops->vt->matmul(g_ops, c->x, w->cols, c->m, w, c->y, w->rows));
}

typedef struct {
  const char *name;
  int64_t rows, cols;
} shape;

static double g_copy_gbps = INFINITY, g_read_gbps = INFINITY, g_bf16_tflops, g_fp8_tflops;
static double g_copy_memcpy_gbps, g_copy_rows_gbps; /* the two copies g_copy_gbps is the best of */

static void bench_matmul(FILE *js, epic_dtype dt, const shape *s, const int64_t *ms, int n_ms,
                         int *first) {
  const size_t esz = epic_dtype_size(dt);
  const size_t wbytes = (size_t)(s->rows * s->cols) * esz;
  int copies = (int)((L2_ROTATE_BYTES + wbytes - 1) / wbytes);
  copies = copies < 1 ? 1 : (copies > MAX_COPIES ? MAX_COPIES : copies);
  mm_ctx c;
  memset(&c, 0, sizeof c);
  c.copies = copies;
  const int64_t nbr = (s->rows + 127) / 128, nbc = (s->cols + 127) / 128;
  for (int k = 0; k < copies; k++) {
    epic_weight *w = &c.w[k];
    w->dtype = dt;
    w->rows = s->rows;
    w->cols = s->cols;
    w->data = dev_random(wbytes, dt == EPIC_DT_BF16 ? tile_bf16 : tile_fp8);
    if (dt == EPIC_DT_F8E4M3) {
      w->scale_inv = dev_random((size_t)(nbr * nbc) * 4, tile_scale);
      w->block_rows = w->block_cols = 128;
    }
  }
  int64_t max_m = 0;
  for (int i = 0; i < n_ms; i++)
    max_m = ms[i] > max_m ? ms[i] : max_m;
  c.x = dev_random((size_t)(max_m * s->cols) * 4, tile_f32);
  CKE(g_ops->vt->alloc(g_ops, (size_t)(max_m * s->rows) * 4, (void **)&c.y));
  for (int i = 0; i < n_ms; i++) {
    c.m = ms[i];
    /* FP8 decode-sized rows: the tensor-core kernel and the kernels it replaced */
    const int n_kinds = dt == EPIC_DT_F8E4M3 && c.m <= 64 ? 2 : 1;
    for (int kind = 0; kind < n_kinds; kind++) {
      const char *kname = n_kinds == 1 ? NULL : kind ? "fp32" : "mma";
      CKE(epic_ops_cuda_set_fp8_small(g_ops,
                                      kind ? EPIC_CUDA_FP8_SMALL_FP32 : EPIC_CUDA_FP8_SMALL_MMA));
      const epic_cuda_mm_path pth = epic_ops_cuda_matmul_path(g_ops, &c.w[0], c.m, s->rows);
      const char *path = epic_cuda_mm_path_name(pth);
      /* the skinny kernel's own choice of column runs, then any forced counts */
      const int n_split = pth == EPIC_CUDA_MM_FP8_SKINNY && kind == 0 ? g_n_skinny_splits : 0;
      for (int si = 0; si <= n_split; si++) {
        const int split = si ? g_skinny_splits[si - 1] : 0;
        CKE(epic_ops_cuda_set_skinny_split(g_ops, split));
        /* every copy once outside the capture: the invariant precision's FP8 path builds a
         * weight's device table on its first call (not allowed while capturing) */
        for (int k = 0; k < copies; k++)
          run_matmul(&c, k);
        const int64_t thin0 = epic_ops_cuda_wgmma_thin_launches(g_ops);
        const double sec = time_calls(run_matmul, &c);
        const int thin = epic_ops_cuda_wgmma_thin_launches(g_ops) > thin0; /* its thin form */
        const double flop = 2.0 * (double)c.m * s->rows * s->cols;
        const double bytes = (double)wbytes + (double)c.m * s->cols * 4 + (double)c.m * s->rows * 4;
        const double tf = flop / sec * 1e-12, gbps = bytes / sec * 1e-9;
        const double peak = dt == EPIC_DT_BF16 ? g_bf16_tflops : g_fp8_tflops;
        char kjson[16] = "null";
        if (kname)
          snprintf(kjson, sizeof kjson, "\"%s\"", kname);
        fprintf(js,
                "%s\n    {\"dtype\": \"%s\", \"shape\": \"%s\", \"rows\": %lld, \"cols\": %lld, "
                "\"m\": %lld, \"kernel\": %s, \"path\": \"%s\", \"thin\": %s, \"split\": %d, "
                "\"us\": %.2f, "
                "\"tflops\": %.2f, \"gbps\": %.1f, \"frac_flops_peak\": %.3f, "
                "\"frac_copy_bw\": %.3f, \"frac_read_bw\": %.3f}",
                *first ? "" : ",", epic_dtype_name(dt), s->name, (long long)s->rows,
                (long long)s->cols, (long long)c.m, kjson, path, thin ? "true" : "false", split,
                sec * 1e6, tf, gbps, frac_of(tf, peak), gbps / g_copy_gbps, gbps / g_read_gbps);
        fprintf(stderr,
                "matmul %-7s %-12s m=%-5lld %-4s %-22s %9.1f us %7.1f TF/s (%.2f) %7.0f GB/s "
                "(copy %.2f, read %.2f)%s%s%.0d\n",
                epic_dtype_name(dt), s->name, (long long)c.m, kname ? kname : "-", path, sec * 1e6,
                tf, frac_of(tf, peak), gbps, gbps / g_copy_gbps, gbps / g_read_gbps,
                thin ? " thin" : "", split ? " split " : "", split);
        *first = 0;
      }
      CKE(epic_ops_cuda_set_skinny_split(g_ops, 0));
    }
    CKE(epic_ops_cuda_set_fp8_small(g_ops, EPIC_CUDA_FP8_SMALL_MMA));
  }
  for (int k = 0; k < copies; k++) {
    g_ops->vt->free(g_ops, (void *)c.w[k].data);
    g_ops->vt->free(g_ops, (void *)c.w[k].scale_inv);
  }
  g_ops->vt->free(g_ops, c.x);
  g_ops->vt->free(g_ops, c.y);
}

/* ------------------------------------------------------ grouped (MoE decode) */

enum { N_EXPERTS = 256, TOP_K = 8, MAX_GROUPED_TOKENS = 1 << 20 };

/* grouped_matmul caches the device table of a weight list by the list's host address.
 * Each shape therefore keeps its own list for the life of the process: a list malloc'd
 * after another was freed could get the same address and hit the table of freed
 * weights. */
static epic_weight g_expert_w[2][N_EXPERTS];

typedef struct {
  const epic_weight *w;
  const float *x;
  float *y;
  const int64_t *off_host;
  const int32_t *off_dev, *map; /* map: grouped_matmul_rows' source rows (t of x) */
  int64_t k, n, t;
} grp_ctx;
static void run_grouped(void *p, int rep) {
  grp_ctx *c = p;
  (void)rep;
  CKE(g_ops->vt->grouped_matmul(g_ops, c->x, c->k, c->off_host, c->off_dev, N_EXPERTS, c->w, 1,
                                c->y, c->n));
}
static void run_grouped_rows(void *p, int rep) {
  grp_ctx *c = p;
  (void)rep;
  CKE(g_ops->vt->grouped_matmul_rows(g_ops, c->x, c->k, c->t, c->map, c->off_host, c->off_dev,
                                     N_EXPERTS, c->w, 1, c->y, c->n));
}

/* Rows per expert when each of t tokens picks TOP_K distinct experts uniformly at
 * random, and (map, t x TOP_K entries) each group row's token in expert order, tokens
 * ascending inside an expert (the model's plan). The generator is reseeded from t (and
 * the shared state put back after), so both shapes see the same routing whichever
 * sections run before. */
static void route_counts(int64_t t, int64_t *cnt, int32_t *map) {
  if (t < 1 || t > MAX_GROUPED_TOKENS) {
    fprintf(stderr, "bench: %lld grouped tokens (1 to %d)\n", (long long)t, MAX_GROUPED_TOKENS);
    exit(2);
  }
  const uint64_t saved = rs;
  rs = 0x243f6a8885a308d3ull ^ ((uint64_t)t * 0x9e3779b97f4a7c15ull);
  if (!rs)
    rs = 1; /* xorshift's one fixed point */
  memset(cnt, 0, N_EXPERTS * sizeof *cnt);
  int32_t *picks = xmalloc((size_t)(t * TOP_K) * sizeof *picks);
  for (int64_t i = 0; i < t; i++) {
    int32_t *picked = picks + i * TOP_K;
    for (int j = 0; j < TOP_K; j++) {
      int e, dup;
      do {
        e = (int)(rnd() % N_EXPERTS);
        dup = 0;
        for (int q = 0; q < j; q++)
          dup |= picked[q] == e;
      } while (dup);
      picked[j] = e;
      cnt[e]++;
    }
  }
  int64_t next[N_EXPERTS];
  for (int e = 0, sum = 0; e < N_EXPERTS; sum += (int)cnt[e], e++)
    next[e] = sum;
  for (int64_t i = 0; i < t * TOP_K; i++)
    map[next[picks[i]]++] = (int32_t)(i / TOP_K);
  free(picks);
  rs = saved;
}

/* The MoE decode case: one projection of all N_EXPERTS experts (FP8, 128x128 block
 * scales, each expert its own allocation as a loaded checkpoint has them), t tokens x
 * TOP_K rows grouped by expert, under both choices of epic_ops_cuda_set_fp8_small.
 * Bytes: every expert with rows read once (codes and scales), fp32 rows in and out.
 * The active experts' weights (>= 8 x 14.7 MB at the shapes benchmarked) exceed L2
 * even at t = 1, so nothing rotates. time_calls' two warm-up calls run before its
 * capture under the kind being timed: they build the cached device weight table
 * (cudaMalloc + a synchronous copy), the cuBLASLt plans of the fp32 choice's larger
 * groups and grow the scratch buffers, none of which a graph capture may do. */
static void bench_grouped(FILE *js, int si, const shape *s, const int64_t *ts, int n_ts,
                          int *first) {
  const int64_t n = s->rows, k = s->cols;
  const int64_t nbr = (n + 127) / 128, nbc = (k + 127) / 128;
  const size_t wbytes = (size_t)(n * k), sbytes = (size_t)(nbr * nbc) * 4;
  epic_weight *wl = g_expert_w[si];
  for (int e = 0; e < N_EXPERTS; e++) {
    wl[e] = (epic_weight){
        .dtype = EPIC_DT_F8E4M3, .rows = n, .cols = k, .block_rows = 128, .block_cols = 128};
    wl[e].data = dev_random(wbytes, tile_fp8);
    wl[e].scale_inv = dev_random(sbytes, tile_scale);
  }
  int64_t max_t = 1;
  for (int i = 0; i < n_ts; i++)
    max_t = ts[i] > max_t ? ts[i] : max_t;
  if (max_t > MAX_GROUPED_TOKENS)
    max_t = MAX_GROUPED_TOKENS; /* route_counts refuses more */
  grp_ctx c = {.w = wl, .k = k, .n = n};
  float *x = dev_random((size_t)(max_t * TOP_K * k) * 4, tile_f32), *y = NULL;
  int32_t *off_dev = NULL, *map_dev = NULL;
  int32_t *map = xmalloc((size_t)(max_t * TOP_K) * sizeof *map);
  CKE(g_ops->vt->alloc(g_ops, (size_t)(max_t * TOP_K * n) * 4, (void **)&y));
  CKE(g_ops->vt->alloc(g_ops, (N_EXPERTS + 1) * sizeof(int32_t), (void **)&off_dev));
  CKE(g_ops->vt->alloc(g_ops, (size_t)(max_t * TOP_K) * sizeof *map, (void **)&map_dev));
  c.x = x;
  c.y = y;
  c.off_dev = off_dev;
  c.map = map_dev;
  int64_t cnt[N_EXPERTS], off[N_EXPERTS + 1];
  int32_t off32[N_EXPERTS + 1];
  c.off_host = off;
  for (int i = 0; i < n_ts; i++) {
    const int64_t t = ts[i], rows = t * TOP_K;
    route_counts(t, cnt, map);
    c.t = t;
    CKE(g_ops->vt->upload(g_ops, map_dev, map, (size_t)rows * sizeof *map));
    int64_t active = 0, max_rows = 0;
    off[0] = 0;
    off32[0] = 0;
    for (int e = 0; e < N_EXPERTS; e++) {
      off[e + 1] = off[e] + cnt[e];
      off32[e + 1] = (int32_t)off[e + 1];
      active += cnt[e] > 0;
      max_rows = cnt[e] > max_rows ? cnt[e] : max_rows;
    }
    /* synchronous, and the previous row's time_calls ended with a sync: no replay of
     * an earlier graph still reads the offsets */
    CKE(g_ops->vt->upload(g_ops, off_dev, off32, sizeof off32));
    const double bytes =
        (double)active * (double)(wbytes + sbytes) + (double)rows * (double)(k + n) * 4;
    const double flop = 2.0 * (double)rows * n * k;
    double sec_kind[2];
    for (int kind = 0; kind < 2; kind++) {
      const char *kname = kind ? "fp32" : "mma";
      CKE(epic_ops_cuda_set_fp8_small(g_ops,
                                      kind ? EPIC_CUDA_FP8_SMALL_FP32 : EPIC_CUDA_FP8_SMALL_MMA));
      const double sec = time_calls(run_grouped, &c);
      sec_kind[kind] = sec;
      const double gbps = bytes / sec * 1e-9, tf = flop / sec * 1e-12;
      /* groups above the kind's small-group bound take cuBLASLt GEMMs: timed also as
       * issued in a step that is not recorded, on the lanes and one after another */
      const int64_t lim = kind ? 16 : epic_ops_cuda_mma_group_rows(g_ops);
      static const int lane_counts[] = {2, 4, 8};
      double eager = 0, serial = 0, by_lanes[3] = {0}, lanes_eager = 0, rows_eager = 0;
      if (max_rows > lim) {
        const int64_t launches = epic_ops_cuda_wgmma_launches(g_ops);
        eager = time_eager(run_grouped, &c); /* the default: the wgmma kernel */
        /* as prefill's gate/up runs: the t token rows read through the plan */
        rows_eager = time_eager(run_grouped_rows, &c);
        if (epic_ops_cuda_wgmma_launches(g_ops) == launches) {
          fprintf(stderr, "bench: the grouped wgmma kernel did not run\n");
          exit(1);
        }
        CKE(epic_ops_cuda_set_grouped_large(g_ops, EPIC_CUDA_GROUPED_LARGE_LANES));
        CKE(epic_ops_cuda_set_grouped_lanes(g_ops, EPIC_CUDA_LT_LANES_DEFAULT));
        lanes_eager = time_eager(run_grouped, &c);
        for (int j = 0; j < 3; j++) {
          CKE(epic_ops_cuda_set_grouped_lanes(g_ops, lane_counts[j]));
          by_lanes[j] = time_eager(run_grouped, &c);
        }
        CKE(epic_ops_cuda_set_grouped_lanes(g_ops, 0));
        serial = time_eager(run_grouped, &c);
        CKE(epic_ops_cuda_set_grouped_lanes(g_ops, EPIC_CUDA_LT_LANES_DEFAULT));
        CKE(epic_ops_cuda_set_grouped_large(g_ops, EPIC_CUDA_GROUPED_LARGE_WGMMA));
      }
      fprintf(js,
              "%s\n    {\"shape\": \"%s\", \"rows\": %lld, \"cols\": %lld, \"experts\": %d, "
              "\"top_k\": %d, \"tokens\": %lld, \"token_rows\": %lld, \"active_experts\": %lld, "
              "\"max_rows\": %lld, \"kernel\": \"%s\", \"us\": %.2f, \"gbps\": %.1f, "
              "\"frac_copy_bw\": %.3f, \"frac_read_bw\": %.3f, \"tflops\": %.2f, "
              "\"frac_fp8_peak\": %.3f",
              *first ? "" : ",", s->name, (long long)n, (long long)k, N_EXPERTS, TOP_K,
              (long long)t, (long long)rows, (long long)active, (long long)max_rows, kname,
              sec * 1e6, gbps, gbps / g_copy_gbps, gbps / g_read_gbps, tf,
              frac_of(tf, g_fp8_tflops));
      if (max_rows > lim)
        fprintf(js,
                ", \"large_kernel\": \"wgmma\", \"us_eager\": %.2f, \"tflops_eager\": %.2f, "
                "\"frac_fp8_peak_eager\": %.3f, \"lanes\": %d, \"us_eager_lanes\": %.2f, "
                "\"tflops_eager_lanes\": %.2f, \"speedup_vs_lanes\": %.3f, "
                "\"us_eager_serial\": %.2f, \"tflops_eager_serial\": %.2f, "
                "\"us_eager_by_lanes\": {\"2\": %.2f, \"4\": %.2f, \"8\": %.2f}, "
                "\"us_eager_rows\": %.2f, \"tflops_eager_rows\": %.2f, "
                "\"frac_fp8_peak_eager_rows\": %.3f}",
                eager * 1e6, flop / eager * 1e-12, frac_of(flop / eager * 1e-12, g_fp8_tflops),
                EPIC_CUDA_LT_LANES_DEFAULT, lanes_eager * 1e6, flop / lanes_eager * 1e-12,
                lanes_eager / eager, serial * 1e6, flop / serial * 1e-12, by_lanes[0] * 1e6,
                by_lanes[1] * 1e6, by_lanes[2] * 1e6, rows_eager * 1e6, flop / rows_eager * 1e-12,
                frac_of(flop / rows_eager * 1e-12, g_fp8_tflops));
      else
        fprintf(js, ", \"us_eager\": null, \"us_eager_serial\": null}");
      if (max_rows > lim)
        fprintf(stderr,
                "grouped %-14s T=%-4lld %-4s large groups, not recorded: wgmma %.1f us (%.1f "
                "TF/s, %.2f of peak; from the %lld token rows through the plan %.1f us, %.2f) "
                "vs %d lanes %.1f us (%.2fx), one after another %.1f us; "
                "2/4/8 lanes %.1f/%.1f/%.1f us\n",
                s->name, (long long)t, kname, eager * 1e6, flop / eager * 1e-12,
                frac_of(flop / eager * 1e-12, g_fp8_tflops), (long long)t, rows_eager * 1e6,
                frac_of(flop / rows_eager * 1e-12, g_fp8_tflops), EPIC_CUDA_LT_LANES_DEFAULT,
                lanes_eager * 1e6, lanes_eager / eager, serial * 1e6, by_lanes[0] * 1e6,
                by_lanes[1] * 1e6, by_lanes[2] * 1e6);
      fprintf(stderr,
              "grouped %-14s T=%-4lld experts=%-3lld max_rows=%-3lld %-4s %9.1f us %7.0f GB/s "
              "(copy %.2f, read %.2f) %6.1f TF/s\n",
              s->name, (long long)t, (long long)active, (long long)max_rows, kname, sec * 1e6, gbps,
              gbps / g_copy_gbps, gbps / g_read_gbps, tf);
      *first = 0;
    }
    CKE(epic_ops_cuda_set_fp8_small(g_ops, EPIC_CUDA_FP8_SMALL_MMA));
    fprintf(stderr,
            "grouped %-14s T=%-4lld summary: mma %.1f us vs fp32 %.1f us (%.2fx), %.0f MB "
            "moved, mma at %.2f of copy bandwidth\n",
            s->name, (long long)t, sec_kind[0] * 1e6, sec_kind[1] * 1e6, sec_kind[1] / sec_kind[0],
            bytes * 1e-6, bytes / sec_kind[0] * 1e-9 / g_copy_gbps);
  }
  for (int e = 0; e < N_EXPERTS; e++) {
    g_ops->vt->free(g_ops, (void *)wl[e].data);
    g_ops->vt->free(g_ops, (void *)wl[e].scale_inv);
  }
  g_ops->vt->free(g_ops, x);
  g_ops->vt->free(g_ops, y);
  g_ops->vt->free(g_ops, off_dev);
  g_ops->vt->free(g_ops, map_dev);
  free(map);
}

/* -------------------------------------------------------------- MLA decode */

typedef struct {
  epic_kv_batch kv[16];
  int copies;
  int64_t n_seq, H;
  float *qa, *qp, *ctx;
} mla_ctx;
static void run_mla(void *p, int rep) {
  mla_ctx *c = p;
  CKE(g_ops->vt->mla_absorbed_batch(g_ops, &c->kv[rep % c->copies], c->n_seq, c->qa, c->qp, c->H,
                                    0.0721f, c->ctx));
}

/* Decode attention at batch n_seq x ctx_len over a cache of element type dt: fp32 rows
 * under TF32 and 3xTF32, bf16 rows under each implementation of the bf16 kernel. Bytes:
 * the cached rows read once per sequence (576 elements of dt each) plus fp32 queries
 * and outputs. */
static void bench_mla(FILE *js, int64_t n_seq, int64_t ctx_len, epic_kv_dtype dt, int *first) {
  static const char *const bf16_names[6] = {"bf16-mma",   "bf16-wgmma-s", "bf16-wgmma-o",
                                            "bf16-wgmma", "bf16-seesaw",  "bf16-auto"};
  static const int bf16_order[6] = {5, 4, 3, 0, 1, 2}; /* the default first */
  if (!(g_mla_kinds & (dt == EPIC_KV_BF16 ? 0x6fu : 0x10u)))
    return;
  const int64_t H = 128, lora = 512, rope = 64, width = 576, page = 64;
  const size_t esz = epic_kv_dtype_size(dt);
  const int64_t pages_per_seq = (ctx_len + page - 1) / page;
  const size_t seq_bytes = (size_t)(n_seq * ctx_len * width) * esz;
  int copies = (int)((L2_ROTATE_BYTES + seq_bytes - 1) / seq_bytes);
  copies = copies < 1 ? 1 : (copies > 16 ? 16 : copies);
  const int64_t n_pages = pages_per_seq * n_seq * copies;
  void *pool = dev_random((size_t)(n_pages * page * width) * esz,
                          dt == EPIC_KV_BF16 ? tile_bf16 : tile_f32);
  /* every copy gets its own shuffled share of the pool's pages */
  int32_t *perm = malloc((size_t)n_pages * 4);
  for (int64_t i = 0; i < n_pages; i++)
    perm[i] = (int32_t)i;
  for (int64_t i = n_pages - 1; i > 0; i--) {
    const int64_t j = (int64_t)(rnd() % (uint64_t)(i + 1));
    const int32_t t = perm[i];
    perm[i] = perm[j];
    perm[j] = t;
  }
  int32_t *lens = malloc((size_t)n_seq * 4);
  for (int64_t s = 0; s < n_seq; s++)
    lens[s] = (int32_t)ctx_len;
  mla_ctx c;
  memset(&c, 0, sizeof c);
  c.copies = copies;
  c.n_seq = n_seq;
  c.H = H;
  void *dlens = NULL;
  CKE(g_ops->vt->alloc(g_ops, (size_t)n_seq * 4, &dlens));
  CKE(g_ops->vt->upload(g_ops, dlens, lens, (size_t)n_seq * 4));
  void *dtables[16];
  for (int k = 0; k < copies; k++) {
    const size_t tb = (size_t)(n_seq * pages_per_seq) * 4;
    CKE(g_ops->vt->alloc(g_ops, tb, &dtables[k]));
    CKE(g_ops->vt->upload(g_ops, dtables[k], perm + (size_t)k * n_seq * pages_per_seq, tb));
    c.kv[k] = (epic_kv_batch){.pool = pool,
                              .page_size = page,
                              .width = width,
                              .lora = lora,
                              .block_tables = dtables[k],
                              .table_stride = pages_per_seq,
                              .n_ctx = dlens,
                              .max_ctx = ctx_len,
                              .dtype = dt};
  }
  c.qa = dev_random((size_t)(n_seq * H * lora) * 4, tile_f32);
  c.qp = dev_random((size_t)(n_seq * H * rope) * 4, tile_f32);
  CKE(g_ops->vt->alloc(g_ops, (size_t)(n_seq * H * lora) * 4, (void **)&c.ctx));
  const int n_modes = dt == EPIC_KV_BF16 ? 6 : 2;
  for (int mode = 0; mode < n_modes; mode++) {
    const char *name;
    if (dt == EPIC_KV_BF16 && !(g_mla_kinds & mla_kind_bit(bf16_order[mode])))
      continue;
    if (dt == EPIC_KV_BF16) {
      CKE(epic_ops_cuda_set_mla_bf16_kernel(g_ops, (epic_cuda_mla_bf16_kernel)bf16_order[mode]));
      name = bf16_names[bf16_order[mode]];
    } else {
      CKE(epic_ops_cuda_set_mla_precision(g_ops, (epic_cuda_mla_precision)mode));
      name = mode ? "3xtf32" : "tf32";
    }
    /* the default (split count from the cost model), then any forced counts */
    for (int si = 0; si <= (dt == EPIC_KV_BF16 && mode == 0 ? g_n_mla_splits : 0); si++) {
      const int split = si ? g_mla_splits[si - 1] : 0;
      char sname[16] = "auto";
      if (split)
        snprintf(sname, sizeof sname, "%d", split);
      CKE(epic_ops_cuda_set_mla_split(g_ops, split));
      const double sec = time_calls(run_mla, &c);
      const double bytes = (double)seq_bytes + (double)(n_seq * H * (width + lora)) * 4;
      const double flop = 2.0 * (double)n_seq * ctx_len * H * (width + lora);
      const double gbps = bytes / sec * 1e-9;
      fprintf(
          js,
          "%s\n    {\"batch\": %lld, \"ctx\": %lld, \"kv_dtype\": \"%s\", \"precision\": \"%s\", "
          "\"split\": %d, \"us\": %.2f, \"gbps\": %.1f, \"frac_copy_bw\": %.3f, "
          "\"frac_read_bw\": %.3f, \"tflops\": %.2f}",
          *first ? "" : ",", (long long)n_seq, (long long)ctx_len,
          dt == EPIC_KV_BF16 ? "bf16" : "f32", name, split, sec * 1e6, gbps, gbps / g_copy_gbps,
          gbps / g_read_gbps, flop / sec * 1e-12);
      fprintf(stderr,
              "mla_decode batch=%-4lld ctx=%-5lld %-12s split %-4s %9.1f us %7.0f GB/s (copy %.2f, "
              "read %.2f) %6.1f TF/s\n",
              (long long)n_seq, (long long)ctx_len, name, sname, sec * 1e6, gbps,
              gbps / g_copy_gbps, gbps / g_read_gbps, flop / sec * 1e-12);
      *first = 0;
    }
  }
  CKE(epic_ops_cuda_set_mla_split(g_ops, 0));
  CKE(epic_ops_cuda_set_mla_precision(g_ops, EPIC_CUDA_MLA_TF32));
  CKE(epic_ops_cuda_set_mla_bf16_kernel(g_ops, EPIC_CUDA_MLA_BF16_DEFAULT));
  for (int k = 0; k < copies; k++)
    g_ops->vt->free(g_ops, dtables[k]);
  g_ops->vt->free(g_ops, dlens);
  g_ops->vt->free(g_ops, pool);
  g_ops->vt->free(g_ops, c.qa);
  g_ops->vt->free(g_ops, c.qp);
  g_ops->vt->free(g_ops, c.ctx);
  free(perm);
  free(lens);
}

/* ------------------------------------------------------------ MLA prefill */

typedef struct {
  int64_t m, start;
  float *q, *kvb, *kpe, *out;
} pre_ctx;
static void run_prefill(void *p, int rep) {
  pre_ctx *c = p;
  (void)rep;
  CKE(g_ops->vt->mla_naive(g_ops, c->q, c->kvb, c->kpe, c->m, c->start, 128, 128, 64, 128,
                           0.0721f, c->out));
}

/* mla_naive (prefill attention over decompressed keys) at DeepSeek-V3 heads: a chunk of m
 * queries after `start` cached keys, as the model calls it, bf16 conversions of the
 * inputs included. FLOPs: the causal pairs only, 2 * 128 heads * (192 + 128) per
 * (query, visible key); the limit is the BF16 GEMM peak. */
static void bench_prefill(FILE *js, int64_t m, int64_t start, int *first) {
  const int64_t H = 128, n = start + m;
  pre_ctx c = {.m = m, .start = start};
  c.q = dev_random((size_t)(m * H * 192) * 4, tile_f32);
  c.kvb = dev_random((size_t)(n * H * 256) * 4, tile_f32);
  c.kpe = dev_random((size_t)(n * 64) * 4, tile_f32);
  CKE(g_ops->vt->alloc(g_ops, (size_t)(m * H * 128) * 4, (void **)&c.out));
  /* The two fast variants' outputs, compared element by element: both round the same
   * bf16 operands and share the softmax, so any difference comes from how wgmma and
   * mma.sync sum a product chain (what a row-invariant mix of the two would need). */
  const size_t n_out = (size_t)(m * H * 128);
  float *outs[2] = {malloc(n_out * 4), malloc(n_out * 4)};
  if (!outs[0] || !outs[1]) {
    fprintf(stderr, "bench: out of host memory\n");
    exit(1);
  }
  /* runs: the fast flash kernel on wgmma (the default) and on mma.sync, then exact */
  for (int run = 0; run < 3; run++) {
    const int prec = run == 2;
    CKE(epic_ops_cuda_set_mla_precision(g_ops, (epic_cuda_mla_precision)prec));
    CKE(epic_ops_cuda_set_mla_prefill_kernel(g_ops, run == 1 ? EPIC_CUDA_MLA_PREFILL_MMA
                                                             : EPIC_CUDA_MLA_PREFILL_WGMMA));
    const double sec = time_calls(run_prefill, &c);
    const double pairs = (double)m * (double)start + (double)m * (double)(m + 1) / 2.0;
    const double tf = 2.0 * (double)H * 320.0 * pairs / sec * 1e-12;
    static const char *const names[] = {"fast", "fast-mma-sync", "exact-fp32-gemm"};
    const char *name = names[run];
    char cmp[160] = "";
    if (run < 2)
      CKE(g_ops->vt->download(g_ops, outs[run], c.out, n_out * 4));
    if (run == 1) {
      size_t differ = 0;
      double most = 0.0;
      for (size_t i = 0; i < n_out; i++)
        if (memcmp(&outs[0][i], &outs[1][i], 4)) {
          differ++;
          const double d = fabs((double)outs[0][i] - outs[1][i]);
          most = d > most ? d : most;
        }
      snprintf(cmp, sizeof cmp,
               ", \"vs_wgmma_elements_differing\": %zu, \"vs_wgmma_max_abs\": %.3g", differ,
               most);
      fprintf(stderr,
              "mla_prefill m=%-5lld start=%-5lld mma.sync vs wgmma: %zu of %zu outputs differ, "
              "max |difference| %.3g\n",
              (long long)m, (long long)start, differ, n_out, most);
    }
    fprintf(js,
            "%s\n    {\"m\": %lld, \"start\": %lld, \"heads\": %lld, \"precision\": \"%s\", "
            "\"us\": %.1f, \"tflops\": %.1f, \"frac_bf16_peak\": %.3f%s}",
            *first ? "" : ",", (long long)m, (long long)start, (long long)H, name, sec * 1e6, tf,
            frac_of(tf, g_bf16_tflops), cmp);
    fprintf(stderr, "mla_prefill m=%-5lld start=%-5lld %-18s %9.1f us %7.1f TF/s (%.2f of bf16)\n",
            (long long)m, (long long)start, name, sec * 1e6, tf, frac_of(tf, g_bf16_tflops));
    *first = 0;
  }
  CKE(epic_ops_cuda_set_mla_precision(g_ops, EPIC_CUDA_MLA_TF32));
  free(outs[0]);
  free(outs[1]);
  g_ops->vt->free(g_ops, c.q);
  g_ops->vt->free(g_ops, c.kvb);
  g_ops->vt->free(g_ops, c.kpe);
  g_ops->vt->free(g_ops, c.out);
}

/* ------------------------------------------------- MLA absorption (head_gemm) */

/* One decode step's two per-head products of the DeepSeek-V3 shape (128 heads: q_nope
 * [128] through W_UK [128][512], ctx [512] through W_UV^T [128][512]) over kv_b's slices in
 * fp32 (head_gemm) or bf16 (head_gemm_bf16), weight copies rotated past L2. Bytes: the
 * weights read once plus x and y. */
enum { HEAD_H = 128, HEAD_NOPE = 128, HEAD_L = 512, HEAD_V = 128 };
typedef struct {
  int bf16;
  int64_t m;
  void *a[MAX_COPIES];
  int copies;
  float *q, *ctx, *q_abs, *out;
} head_ctx;
static void run_head(void *p, int rep) {
  head_ctx *c = p;
  const int64_t lda = (HEAD_NOPE + HEAD_V) * HEAD_L, at = HEAD_NOPE * HEAD_L;
  void *a = c->a[rep % c->copies];
  if (c->bf16) {
    const uint16_t *w = a;
    CKE(g_ops->vt->head_gemm_bf16(g_ops, c->q, HEAD_H * 192, 192, c->m, HEAD_H, w, lda, HEAD_NOPE,
                                  HEAD_L, 0, c->q_abs, HEAD_H * HEAD_L, HEAD_L));
    CKE(g_ops->vt->head_gemm_bf16(g_ops, c->ctx, HEAD_H * HEAD_L, HEAD_L, c->m, HEAD_H, w + at, lda,
                                  HEAD_L, HEAD_V, 1, c->out, HEAD_H * HEAD_V, HEAD_V));
  } else {
    const float *w = a;
    CKE(g_ops->vt->head_gemm(g_ops, c->q, HEAD_H * 192, 192, c->m, HEAD_H, w, lda, HEAD_NOPE,
                             HEAD_L, 0, c->q_abs, HEAD_H * HEAD_L, HEAD_L));
    CKE(g_ops->vt->head_gemm(g_ops, c->ctx, HEAD_H * HEAD_L, HEAD_L, c->m, HEAD_H, w + at, lda,
                             HEAD_L, HEAD_V, 1, c->out, HEAD_H * HEAD_V, HEAD_V));
  }
}

/* variant (bf16 only): 0 the fast precision; 1 the invariant precision's mma kernel; 2 the
 * invariant precision's cuBLAS chunks (epic_ops_cuda_set_head_rows off). */
static void bench_head(FILE *js, int64_t m, int bf16, int variant, int *first) {
  static const char *const vnames[] = {"fast", "invariant", "invariant_chunks"};
  head_ctx c = {.bf16 = bf16, .m = m};
  const epic_cuda_precision prev = epic_ops_cuda_get_precision(g_ops);
  CKE(epic_ops_cuda_set_precision(g_ops, variant ? EPIC_CUDA_PREC_INVARIANT : EPIC_CUDA_PREC_FAST));
  CKE(epic_ops_cuda_set_head_rows(g_ops, variant != 2));
  const size_t esz = bf16 ? 2 : 4, wbytes = (size_t)HEAD_H * (HEAD_NOPE + HEAD_V) * HEAD_L * esz;
  c.copies = (int)((L2_ROTATE_BYTES + wbytes - 1) / wbytes);
  c.copies = c.copies < 1 ? 1 : (c.copies > MAX_COPIES ? MAX_COPIES : c.copies);
  for (int k = 0; k < c.copies; k++)
    c.a[k] = dev_random(wbytes, bf16 ? tile_bf16 : tile_f32);
  c.q = dev_random((size_t)(m * HEAD_H * 192) * 4, tile_f32);
  c.ctx = dev_random((size_t)(m * HEAD_H * HEAD_L) * 4, tile_f32);
  CKE(g_ops->vt->alloc(g_ops, (size_t)(m * HEAD_H * HEAD_L) * 4, (void **)&c.q_abs));
  CKE(g_ops->vt->alloc(g_ops, (size_t)(m * HEAD_H * HEAD_V) * 4, (void **)&c.out));
  const double sec = time_calls(run_head, &c);
  const double io = (double)(m * HEAD_H) * (HEAD_NOPE + 2.0 * HEAD_L + HEAD_V) * 4;
  const double gbps = ((double)wbytes + io) / sec * 1e-9;
  fprintf(js,
          "%s\n    {\"op\": \"head_gemm_pair\", \"weights\": \"%s\", \"precision\": "
          "\"%s\", \"m\": %lld, \"us\": %.2f, \"gbps\": %.1f, \"frac_read_bw\": %.3f}",
          *first ? "" : ",", bf16 ? "bf16" : "fp32", vnames[variant], (long long)m, sec * 1e6, gbps,
          frac_of(gbps, g_read_gbps));
  fprintf(stderr, "head_gemm pair %-4s %-16s m=%-4lld %9.2f us %7.0f GB/s (%.2f of read)\n",
          bf16 ? "bf16" : "fp32", vnames[variant], (long long)m, sec * 1e6, gbps,
          frac_of(gbps, g_read_gbps));
  *first = 0;
  CKE(epic_ops_cuda_set_precision(g_ops, prev));
  CKE(epic_ops_cuda_set_head_rows(g_ops, 1));
  for (int k = 0; k < c.copies; k++)
    g_ops->vt->free(g_ops, c.a[k]);
  g_ops->vt->free(g_ops, c.q);
  g_ops->vt->free(g_ops, c.ctx);
  g_ops->vt->free(g_ops, c.q_abs);
  g_ops->vt->free(g_ops, c.out);
}

/* ------------------------------------------------------- small memory ops */

typedef struct {
  int op; /* 0 rmsnorm, 1 route, 2 silu_mul, 3 rope */
  int64_t m, n;
  float *a[MAX_COPIES], *b, *w, *y;
  int copies;
  int32_t *idx, *pos;
  epic_router_params rp;
  double inv_freq[32];
} small_ctx;
static void run_small(void *p, int rep) {
  small_ctx *c = p;
  float *a = c->a[rep % c->copies];
  switch (c->op) {
  case 0: CKE(g_ops->vt->rmsnorm(g_ops, a, c->n, c->m, c->n, c->w, 1e-6f, c->y, c->n)); break;
  case 1: CKE(g_ops->vt->route(g_ops, a, c->m, &c->rp, c->idx, c->y)); break;
  case 2: CKE(g_ops->vt->silu_mul(g_ops, a, c->n, c->b, c->n, c->m, c->n, c->y, c->n)); break;
  case 3: CKE(g_ops->vt->rope(g_ops, a, c->m, 128, 128 * 64, 64, 64, c->pos, c->inv_freq)); break;
  default: CKE(g_ops->vt->moe_combine(g_ops, c->m, 8, c->n, c->b, c->idx, c->w, a)); break;
  }
}

static void bench_small(FILE *js, int op, int64_t m, int *first) {
  /* moe_combine: a token's 8 expert result rows (b, [8m][n], read through a permutation
   * as a prefill step's slots) weighted into its row of a */
  static const char *names[] = {"rmsnorm", "route", "silu_mul", "rope", "moe_combine"};
  small_ctx c;
  memset(&c, 0, sizeof c);
  c.op = op;
  c.m = m;
  c.n = op == 0 || op == 4 ? 7168 : op == 1 ? 256 : op == 2 ? 2048 : 128 * 64;
  const size_t abytes = (size_t)(m * c.n) * 4;
  c.copies = (int)((L2_ROTATE_BYTES + abytes - 1) / abytes);
  c.copies = c.copies < 1 ? 1 : (c.copies > MAX_COPIES ? MAX_COPIES : c.copies);
  for (int k = 0; k < c.copies; k++)
    c.a[k] = dev_random(abytes, tile_f32);
  c.b = dev_random(op == 4 ? 8 * abytes : abytes, tile_f32);
  c.w = dev_random((size_t)(op == 4 ? 8 * m : c.n) * 4, tile_f32);
  CKE(g_ops->vt->alloc(g_ops, abytes, (void **)&c.y));
  CKE(g_ops->vt->alloc(g_ops, (size_t)m * 8 * 4, (void **)&c.idx));
  if (op == 4) { /* slots: a permutation of the 8m rows */
    int32_t *slot = malloc((size_t)m * 8 * 4);
    if (!slot) {
      fprintf(stderr, "bench: out of memory\n");
      exit(1);
    }
    for (int64_t i = 0; i < 8 * m; i++)
      slot[i] = (int32_t)((i * 7919) % (8 * m));
    CKE(g_ops->vt->upload(g_ops, c.idx, slot, (size_t)m * 8 * 4));
    free(slot);
  }
  int32_t *pos = malloc((size_t)m * 4);
  for (int64_t i = 0; i < m; i++)
    pos[i] = (int32_t)(i * 37 % 8192);
  CKE(g_ops->vt->alloc(g_ops, (size_t)m * 4, (void **)&c.pos));
  CKE(g_ops->vt->upload(g_ops, c.pos, pos, (size_t)m * 4));
  free(pos);
  for (int j = 0; j < 32; j++)
    c.inv_freq[j] = pow(10000.0, -2.0 * j / 64.0);
  float *bias = NULL;
  if (op == 1) {
    bias = dev_random(256 * 4, tile_f32);
    c.rp = (epic_router_params){.n_experts = 256,
                                .top_k = 8,
                                .n_group = 8,
                                .topk_group = 4,
                                .scoring = 0,
                                .norm_topk_prob = 1,
                                .routed_scaling_factor = 2.5f,
                                .bias = bias};
  }
  const double sec = time_calls(run_small, &c);
  double bytes;
  switch (op) {
  case 0: bytes = 2.0 * (double)abytes + (double)c.n * 4; break;
  case 1: bytes = (double)abytes + (double)m * 8 * 8; break;
  case 2: bytes = 3.0 * (double)abytes; break;
  case 3: bytes = 2.0 * (double)abytes + (double)m * 4; break;
  default: bytes = 10.0 * (double)abytes + (double)m * 8 * 8; break;
  }
  const double gbps = bytes / sec * 1e-9;
  fprintf(js,
          "%s\n    {\"op\": \"%s\", \"m\": %lld, \"n\": %lld, \"us\": %.2f, \"gbps\": %.1f, "
          "\"frac_copy_bw\": %.3f}",
          *first ? "" : ",", names[op], (long long)m, (long long)c.n, sec * 1e6, gbps,
          gbps / g_copy_gbps);
  fprintf(stderr, "%-9s m=%-5lld n=%-5lld %9.2f us %7.0f GB/s (%.2f of copy)\n", names[op],
          (long long)m, (long long)c.n, sec * 1e6, gbps, gbps / g_copy_gbps);
  *first = 0;
  for (int k = 0; k < c.copies; k++)
    g_ops->vt->free(g_ops, c.a[k]);
  g_ops->vt->free(g_ops, c.b);
  g_ops->vt->free(g_ops, c.w);
  g_ops->vt->free(g_ops, c.y);
  g_ops->vt->free(g_ops, c.idx);
  g_ops->vt->free(g_ops, c.pos);
  g_ops->vt->free(g_ops, bias);
}

/* A comma-separated list of counts ("1,2,4") into out (at most cap); returns how many. */
static int int_list(char *arg, int *out, int cap) {
  int n = 0;
  for (char *t = strtok(arg, ","); t && n < cap; t = strtok(NULL, ","))
    out[n++] = atoi(t);
  return n;
}

int main(int argc, char **argv) {
  int device = 0;
  const char *only = NULL;
  int64_t one_batch = 0, one_ctx = 0, one_tokens = 0;
  int no_peaks = 0;
  int grouped_shape = -1; /* --grouped-shape: one of expert_shapes (below), -1 both */
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--quick"))
      g_quick = 1;
    else if (!strcmp(argv[i], "--device") && i + 1 < argc)
      device = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--only") && i + 1 < argc)
      only = argv[++i];
    else if (!strcmp(argv[i], "--no-peaks"))
      no_peaks = 1;
    else if (!strcmp(argv[i], "--mla-split") && i + 1 < argc) {
      g_n_mla_splits = int_list(argv[++i], g_mla_splits, 8);
    } else if (!strcmp(argv[i], "--skinny-split") && i + 1 < argc) {
      g_n_skinny_splits = int_list(argv[++i], g_skinny_splits, 4);
    } else if (!strcmp(argv[i], "--mla-kinds") && i + 1 < argc)
      g_mla_kinds = (unsigned)strtoul(argv[++i], NULL, 0);
    else if (!strcmp(argv[i], "--mla") && i + 2 < argc) {
      only = "mla";
      one_batch = atoll(argv[++i]);
      one_ctx = atoll(argv[++i]);
    } else if (!strcmp(argv[i], "--grouped") && i + 1 < argc) {
      only = "grouped";
      one_tokens = atoll(argv[++i]);
      if (one_tokens < 1 || one_tokens > MAX_GROUPED_TOKENS) {
        fprintf(stderr, "bench_kernels_cuda: --grouped: expected 1 to %d tokens, got '%s'\n",
                MAX_GROUPED_TOKENS, argv[i]);
        return 2;
      }
    } else if (!strcmp(argv[i], "--grouped-shape") && i + 1 < argc) {
      /* one projection alone, e.g. for a profiler that should see only its launches */
      ++i;
      grouped_shape = !strcmp(argv[i], "gate_up") ? 0 : !strcmp(argv[i], "down") ? 1 : -2;
      if (grouped_shape == -2) {
        fprintf(stderr, "bench_kernels_cuda: --grouped-shape: expected gate_up or down, got '%s'\n",
                argv[i]);
        return 2;
      }
    } else {
      fprintf(stderr,
              "usage: %s [--quick] [--device N] [--only matmul|grouped|mla|prefill|memory|head] "
              "[--mla B CTX] [--grouped TOKENS] [--grouped-shape gate_up|down] "
              "[--mla-kinds MASK] [--mla-split S,S,...] [--skinny-split R,R,...] [--no-peaks]\n",
              argv[0]);
      return 2;
    }
  }
  const int do_mm = !only || !strcmp(only, "matmul"), do_mla = !only || !strcmp(only, "mla");
  const int do_mem = !only || !strcmp(only, "memory"), do_grp = !only || !strcmp(only, "grouped");
  const int do_pre = !only || !strcmp(only, "prefill"), do_head = !only || !strcmp(only, "head");
  if (only && !do_mm && !do_mla && !do_mem && !do_grp && !do_pre && !do_head) {
    fprintf(stderr, "bench: --only %s: not one of matmul, grouped, mla, prefill, memory, head\n",
            only);
    return 2;
  }
  if (epic_cuda_device_count() <= 0) {
    printf("{\"skipped\": \"no CUDA device\"}\n");
    return 0;
  }
  CKE(epic_ops_cuda_create(device, &g_ops));
  g_st = (cudaStream_t)epic_ops_cuda_stream(g_ops);
  make_tiles();
  FILE *js = stdout;
  fprintf(js, "{\n  \"bench\": \"kernels_cuda\",\n  \"device\": \"%s\",\n  \"sm_count\": %d,\n",
          epic_ops_cuda_device_name(g_ops), epic_ops_cuda_sm_count(g_ops));

  /* peaks */
  if (no_peaks)
    goto peaks_done;
  copy_ctx cc = {.bytes = (size_t)1 << 30};
  cc.src = dev_random(cc.bytes, tile_f32);
  CKE(g_ops->vt->alloc(g_ops, cc.bytes, &cc.dst));
  /* The copy peak: the faster of cudaMemcpyAsync issued directly and the backend's
   * copy_rows kernel (graph-timed like the kernels) over the same bytes, each counted as
   * bytes read plus bytes written. Not the memcpy recorded in a graph: there it ran on a
   * copy engine, 2.71 TB/s on an H200, where the same call issued directly moved 4.2 TB/s
   * and copy_rows 3.97. */
  g_copy_memcpy_gbps = 2.0 * (double)cc.bytes / time_eager(run_copy, &cc) * 1e-9;
  g_copy_rows_gbps = 2.0 * (double)cc.bytes / time_calls(run_copy_rows, &cc) * 1e-9;
  g_copy_gbps = fmax(g_copy_memcpy_gbps, g_copy_rows_gbps);
  g_ops->vt->free(g_ops, cc.src);
  g_ops->vt->free(g_ops, cc.dst);
  read_ctx rc = {.n = (int64_t)1 << 28};
  CKB(cublasCreate(&rc.h));
  CKB(cublasSetStream(rc.h, g_st));
  CKB(cublasSetPointerMode(rc.h, CUBLAS_POINTER_MODE_DEVICE));
  rc.x = dev_random((size_t)rc.n * 4, tile_f32);
  CKE(g_ops->vt->alloc(g_ops, 64, (void **)&rc.res));
  g_read_gbps = (double)rc.n * 4 / time_calls(run_read, &rc) * 1e-9;
  g_ops->vt->free(g_ops, rc.x);
  g_ops->vt->free(g_ops, rc.res);
  cublasDestroy(rc.h);
  gemm_ctx gc = {.n = 8192};
  CKB(cublasCreate(&gc.h));
  CKB(cublasSetStream(gc.h, g_st));
  gc.a = dev_random((size_t)gc.n * gc.n * 2, tile_bf16);
  gc.b = dev_random((size_t)gc.n * gc.n * 2, tile_bf16);
  CKE(g_ops->vt->alloc(g_ops, (size_t)gc.n * gc.n * 2, &gc.c));
  g_bf16_tflops = 2.0 * gc.n * (double)gc.n * gc.n / time_calls(run_bf16_gemm, &gc) * 1e-12;
  g_ops->vt->free(g_ops, gc.a);
  g_ops->vt->free(g_ops, gc.b);
  g_ops->vt->free(g_ops, gc.c);
  cublasDestroy(gc.h);
  g_fp8_tflops = fp8_peak(8192);
peaks_done:
  fprintf(
      js,
      "  \"peaks\": {\"copy_gbps\": %.1f, \"copy_memcpy_gbps\": %.1f, \"copy_rows_gbps\": %.1f, "
      "\"read_gbps\": %.1f, \"bf16_gemm_8192_tflops\": %.1f, "
      "\"fp8_gemm_8192_tensorwise_tflops\": %.1f},\n",
      isfinite(g_copy_gbps) ? g_copy_gbps : 0.0, g_copy_memcpy_gbps, g_copy_rows_gbps,
      isfinite(g_read_gbps) ? g_read_gbps : 0.0, g_bf16_tflops, g_fp8_tflops);
  fprintf(stderr,
          "peaks: copy %.0f GB/s (cudaMemcpy %.0f, copy_rows %.0f), read (sasum) %.0f GB/s, bf16 "
          "GEMM %.0f TF/s, fp8 GEMM %.0f TF/s\n",
          g_copy_gbps, g_copy_memcpy_gbps, g_copy_rows_gbps, g_read_gbps, g_bf16_tflops,
          g_fp8_tflops);
  fflush(js);

  static const shape shapes[] = {{"q_a", 1536, 7168},       {"o_proj", 7168, 16384},
                                 {"expert_up", 2048, 7168}, {"expert_down", 7168, 2048},
                                 {"lm_head", 129280, 7168}, {"square8192", 8192, 8192}};
  static const int64_t ms[] = {1, 4, 16, 32, 64, 128, 512, 4096};
  static const int64_t ms_quick[] = {1, 32, 4096};
  const int n_ms =
      g_quick ? (int)(sizeof ms_quick / sizeof ms_quick[0]) : (int)(sizeof ms / sizeof ms[0]);
  fprintf(js, "  \"matmul\": [");
  int first = 1;
  for (int d = 0; d < 2 && do_mm; d++)
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
      const int64_t m8192 = 8192;
      if (!strcmp(shapes[s].name, "square8192"))
        bench_matmul(js, d ? EPIC_DT_F8E4M3 : EPIC_DT_BF16, &shapes[s], &m8192, 1, &first);
      else
        bench_matmul(js, d ? EPIC_DT_F8E4M3 : EPIC_DT_BF16, &shapes[s], g_quick ? ms_quick : ms,
                     n_ms, &first);
      fflush(js);
    }
  fprintf(js, "\n  ],\n  \"grouped\": [");
  first = 1;
  static const shape expert_shapes[2] = {{"expert_gate_up", 4096, 7168},
                                         {"expert_down", 7168, 2048}};
  static const int64_t ts[] = {1, 32, 128, 512, 2048, 8192}, ts_quick[] = {1, 128};
  for (int si = 0; si < 2 && do_grp; si++) {
    if (grouped_shape >= 0 && si != grouped_shape)
      continue;
    if (one_tokens > 0)
      bench_grouped(js, si, &expert_shapes[si], &one_tokens, 1, &first);
    else if (g_quick)
      bench_grouped(js, si, &expert_shapes[si], ts_quick, 2, &first);
    else
      bench_grouped(js, si, &expert_shapes[si], ts, 6, &first);
    fflush(js);
  }
  fprintf(js, "\n  ],\n  \"mla_decode\": [");
  first = 1;
  static const int64_t batches[] = {1, 32, 128}, ctxs[] = {1024, 8192};
  for (int d = 0; d < 2 && one_batch > 0; d++)
    bench_mla(js, one_batch, one_ctx, d ? EPIC_KV_BF16 : EPIC_KV_F32, &first);
  for (int b = 0; b < 3 && do_mla && one_batch <= 0; b++)
    for (int k = 0; k < 2; k++)
      for (int d = 0; d < 2; d++) {
        bench_mla(js, batches[b], ctxs[k], d ? EPIC_KV_BF16 : EPIC_KV_F32, &first);
        fflush(js);
      }
  fprintf(js, "\n  ],\n  \"mla_prefill\": [");
  first = 1;
  static const int64_t pre_pts[][2] = {{1024, 0}, {512, 3584}, {2048, 6144}};
  for (int k = 0; k < 3 && do_pre; k++)
    bench_prefill(js, pre_pts[k][0], pre_pts[k][1], &first);
  fprintf(js, "\n  ],\n  \"mla_absorption\": [");
  first = 1;
  static const int64_t head_m[] = {1, 4, 8, 32, 128, 512};
  for (int k = 0; k < 6 && do_head; k++)
    for (int v = 0; v < 4; v++) /* fp32; bf16 fast, invariant, invariant chunks */
      bench_head(js, head_m[k], v > 0, v > 0 ? v - 1 : 0, &first);
  fprintf(js, "\n  ],\n  \"memory_ops\": [");
  first = 1;
  static const int64_t sm_m[] = {1, 128, 4096}, combine_m[] = {32, 128, 8192};
  for (int op = 0; op < 5 && do_mem; op++)
    for (int k = 0; k < 3; k++) {
      if (op == 1 && k == 0)
        continue;
      bench_small(js, op, op == 4 ? combine_m[k] : sm_m[k], &first);
    }
  fprintf(js, "\n  ]\n}\n");
  epic_ops_destroy(g_ops);
  return 0;
}
