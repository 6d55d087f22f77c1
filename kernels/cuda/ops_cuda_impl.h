/* Private to the CUDA backend: the backend object, its scratch buffers, and the C-ABI
 * launchers of the kernels in the .cu files of kernels/cuda (FlashMLA shape: plain C structs and
 * functions here, CUDA C++ behind them). Every launcher only enqueues work on `st` and
 * returns the launch status (cudaGetLastError); none synchronises. */
#ifndef EPIC_KERNELS_CUDA_OPS_CUDA_IMPL_H
#define EPIC_KERNELS_CUDA_OPS_CUDA_IMPL_H

#include <stddef.h>
#include <stdint.h>

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "../ops.h"
#include "ops_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------ backend object */

/* A device buffer grown on demand (cudaFree + cudaMalloc, so never while a graph is
 * being captured: callers warm up first). Contents not preserved across growth. */
typedef struct epic_cuda_buf {
  void *p;
  size_t cap;
} epic_cuda_buf;

/* One cached cuBLASLt FP8 plan (descriptors + chosen algorithm) for a shape. */
typedef struct epic_cuda_lt_plan {
  int used;
  int64_t n, k, m, ldd; /* weight rows, cols, tokens, output ld */
  int out_bf16;         /* 1: D is bf16 */
  int no_ws;            /* 1: chosen without workspace (no split-K; grouped_lanes) */
  int ok;               /* 0: cuBLASLt refused this shape (negative cache) */
  cublasLtMatmulDesc_t desc;
  cublasLtMatrixLayout_t a, b, c;
  cublasLtMatmulAlgo_t algo;
} epic_cuda_lt_plan;

/* lt_plans: EPIC_CUDA_LT_PLANS / EPIC_CUDA_LT_WAYS sets picked by a hash of the shape, each
 * replaced round-robin: a prefill step's expert groups bring a few dozen token counts per
 * weight shape, which must not evict each other every step (a plan costs a heuristic
 * query). */
enum { EPIC_CUDA_LT_PLANS = 512, EPIC_CUDA_LT_WAYS = 8 };
enum { EPIC_CUDA_MLA_MAX_SPLIT = 128, EPIC_CUDA_GROUP_TABS = 1024 };
/* Splits of a query at most in the fixed-chunk mode (epic_cuk_mla_params.split_keys): it
 * bounds the partials, n_q x 16 x heads x lora floats, whatever the context. */
enum { EPIC_CUDA_MLA_FIXED_SPLITS = 16 };
/* upload_async's pinned staging: slots used round-robin, each reused once the copy out
 * of it has run (its event); larger uploads take the synchronous path. */
enum { EPIC_CUDA_STAGE_SLOTS = 8, EPIC_CUDA_STAGE_BYTES = 4 << 20 };

typedef struct epic_cuda_ops {
  epic_ops base; /* first: epic_ops * <-> epic_cuda_ops * */
  int device;
  int sm_count;
  int max_smem_optin;
  char name[256];
  cudaStream_t stream;
  cublasHandle_t blas;
  cublasLtHandle_t lt;
  void *blas_ws, *lt_ws; /* cuBLAS / cuBLASLt workspaces (separate: both are stream-ordered) */
  size_t blas_ws_bytes, lt_ws_bytes;
  int *err_flag; /* device int: set by kernels on faults only the device sees */
  epic_cuda_mla_precision mla_prec;
  int mla_bf16_variant;  /* BF16 decode kernel: an epic_cuda_mla_bf16_kernel */
  int mla_prefill_wgmma; /* flash prefill kernel: products on wgmma (1) or mma.sync (0) */
  int mla_split;    /* bf16 decode kernel's key splits, 0 = cost model (..._set_mla_split) */
  int skinny_split; /* skinny FP8 kernel's column runs, 0 = by shape (..._set_skinny_split) */
  int exact_matmul; /* 1: BF16/FP8 weights dequantised to fp32 and multiplied by SGEMM */
  int invariant;    /* 1: the invariant precision's row-invariant fast paths (ops_cuda.h) */
  int fp8_small;    /* epic_cuda_fp8_small */
  int grouped_large; /* epic_cuda_grouped_large */
  int64_t mma_group_rows; /* host-planned groups up to this many rows on the MMA kernel */
  int64_t wgmma_launches; /* launches of the grouped wgmma kernel (epic_ops_cuda_wgmma_launches) */
  int wgmma_form;         /* epic_cuda_wgmma_form (epic_ops_cuda_set_wgmma_form) */
  int wgmma_thin; /* the thin form for few rows (epic_ops_cuda_set_wgmma_thin) */
  int head_rows;  /* the invariant head_gemm_bf16 on kern_head_gemm.cu's mma form */
  int64_t wgmma_thin_launches;
  int lt_next[EPIC_CUDA_LT_PLANS / EPIC_CUDA_LT_WAYS]; /* round-robin victim per set */
  /* Graph recording (ops.h ABI 7): 1 between graph_begin and graph_end. epoch counts the
   * frees and moves of device memory a recorded graph may point at. */
  int recording;
  uint64_t epoch;
  epic_cuda_lt_plan lt_plans[EPIC_CUDA_LT_PLANS];
  /* Lanes of grouped_lanes (ops_cuda_matmul.c), n_lanes of them in use
   * (epic_ops_cuda_set_grouped_lanes), each created on first use (never while
   * recording): a stream and its completion event. fork: recorded on `stream` when
   * lanes start. */
  struct epic_cuda_lane {
    cudaStream_t stream;
    cudaEvent_t done;
  } lanes[EPIC_CUDA_LT_LANES_MAX];
  cudaEvent_t fork;
  int n_lanes;
  /* Device tables of the expert weights of grouped_matmul, built on first use,
   * keyed by the host list (a list's address never comes back with other weights:
   * worker/model.c keeps replaced lists); when full, replaced round-robin. */
  struct epic_cuda_group_tab {
    const epic_weight *key;
    int64_t stride, n;
    uint64_t sig; /* the storage it was built from (ops_cuda_matmul.c list_sig) */
    void *dev;    /* epic_cuk_group_w[n] */
    void *wmaps; /* epic_cuk_tmap[2n] of the wgmma kernel (wide boxes, then narrow ones) */
  } group_tabs[EPIC_CUDA_GROUP_TABS];
  int n_group_tabs, group_next;
  /* scratch */
  epic_cuda_buf act;   /* converted / quantised activations */
  epic_cuda_buf act_s; /* activation scales */
  epic_cuda_buf wdq;   /* dequantised weight chunk, padded weight scales */
  epic_cuda_buf outb;  /* staged matmul output */
  epic_cuda_buf keys;  /* gathered cache rows (GEMM attention path) */
  epic_cuda_buf att;   /* scores / probabilities, split-K partials */
  epic_cuda_buf pick;  /* row_pick's per-chunk partials */
  epic_cuda_buf gath;  /* gathered input rows (grouped_matmul_rows, paths reading x whole) */
  epic_cuda_buf tiles; /* the host-planned wgmma launches' tile counter */
  struct epic_cuda_stage {
    void *host;     /* pinned, EPIC_CUDA_STAGE_BYTES (allocated on first use) */
    cudaEvent_t ev; /* recorded after the copy out of it */
    int pending;    /* ev recorded and not yet waited for */
  } stage[EPIC_CUDA_STAGE_SLOTS];
  int stage_next;
} epic_cuda_ops;

static inline epic_cuda_ops *epic_cuda_of(epic_ops *o) {
  return (epic_cuda_ops *)o;
}

/* Map a CUDA / cuBLAS status to epic_status, logging `what` with the library message. */
epic_status epic_cuda_check(cudaError_t e, const char *what);
epic_status epic_cublas_check(cublasStatus_t s, const char *what);
#define EPIC_CHECK_CUDA(e, what) EPIC_CHECK(epic_cuda_check((e), (what)))
#define EPIC_CHECK_CUBLAS(s, what) EPIC_CHECK(epic_cublas_check((s), (what)))

/* EPIC_OK for fp32 and bf16 caches; EPIC_ERR_UNSUPPORTED (logged, naming op) otherwise. */
epic_status epic_cuda_kv_dtype_ok(epic_kv_dtype dt, const char *op);

/* EPIC_OK, or EPIC_ERR_UNSUPPORTED (a debug line naming what) while a graph is being
 * recorded: for every step that waits for the host or allocates/frees memory. */
epic_status epic_cuda_not_recording(const epic_cuda_ops *c, const char *what);

/* Whether every FP8 expert group, of any size, runs on the wgmma kernel (the defaults:
 * the MMA kind, mma_group_rows 0, large groups on wgmma): what makes a row's result
 * independent of its group and lets device-planned calls take any bound. */
static inline int epic_cuda_groups_all_wgmma(const epic_cuda_ops *c) {
  return c->fp8_small == EPIC_CUDA_FP8_SMALL_MMA && c->mma_group_rows == 0 &&
         c->grouped_large == EPIC_CUDA_GROUPED_LARGE_WGMMA;
}

/* A weight the CUDA ops can use: known dtype, data, FP8 with its block scales. */
int epic_cuda_weight_ok(const epic_weight *w);
/* Grow b to at least `bytes` (refused while recording a graph; growth moves the epoch). */
epic_status epic_cuda_buf_reserve(epic_cuda_ops *c, epic_cuda_buf *b, size_t bytes);

/* Release the cuBLASLt plans and the grouped-GEMM lanes (ops_cuda_matmul.c); destroy. */
void epic_cuda_matmul_release(epic_cuda_ops *c);

/* Ops implemented in the other host files. */
epic_status epic_cuda_matmul(epic_ops *o, const float *x, int64_t ldx, int64_t m,
                             const epic_weight *w, float *y, int64_t ldy);
epic_status epic_cuda_mla_naive(epic_ops *o, const float *q, const float *kvb, const float *kpe,
                                int64_t m, int64_t start, int64_t n_heads, int64_t nope,
                                int64_t rope, int64_t v, float scale, float *out);
epic_status epic_cuda_mla_absorbed(epic_ops *o, const epic_kv_view *kv, const float *q_abs,
                                   const float *q_pe, int64_t m, int64_t start, int64_t n_heads,
                                   float scale, float *ctx);
epic_status epic_cuda_mla_absorbed_batch(epic_ops *o, const epic_kv_batch *kv, int64_t n_seq,
                                         const float *q_abs, const float *q_pe, int64_t n_heads,
                                         float scale, float *ctx);
epic_status epic_cuda_grouped_matmul(epic_ops *o, const float *x, int64_t ldx,
                                     const int64_t *off_host, const int32_t *off_dev,
                                     int64_t n_groups, const epic_weight *w, int64_t w_stride,
                                     float *y, int64_t ldy);
epic_status epic_cuda_grouped_matmul_rows(epic_ops *o, const float *src, int64_t ld_src,
                                          int64_t n_src, const int32_t *rows, const int64_t *off,
                                          const int32_t *off_dev, int64_t n_groups,
                                          const epic_weight *w, int64_t w_stride, float *y,
                                          int64_t ldy);
epic_status epic_cuda_grouped_matmul_dev(epic_ops *o, const float *x, int64_t ldx, int64_t rows,
                                         int64_t max_rows, const int32_t *off, int64_t n_groups,
                                         const epic_weight *w, int64_t w_stride, float *y,
                                         int64_t ldy);
epic_status epic_cuda_head_gemm(epic_ops *o, const float *x, int64_t ld_x_tok, int64_t ld_x_head,
                                int64_t m, int64_t n_heads, const float *a, int64_t ld_a_head,
                                int64_t k, int64_t n, int trans, float *y, int64_t ld_y_tok,
                                int64_t ld_y_head);
epic_status epic_cuda_head_gemm_bf16(epic_ops *o, const float *x, int64_t ld_x_tok,
                                     int64_t ld_x_head, int64_t m, int64_t n_heads,
                                     const uint16_t *a, int64_t ld_a_head, int64_t k, int64_t n,
                                     int trans, float *y, int64_t ld_y_tok, int64_t ld_y_head);

/* ------------------------------------------------------------------ launchers */

/* y[i][0..n) = bf16(x[r][0..n)), r = xidx ? xidx[i] : i (xidx: device memory), y dense
 * [m][n]. */
cudaError_t epic_cuk_f32_to_bf16(const float *x, int64_t ldx, const int32_t *xidx, int64_t m,
                                 int64_t n, uint16_t *y, cudaStream_t st);
/* y[i][j] (ld ldy) = float(x[i][j]) for bf16 x [m][n] with row stride ldx. */
cudaError_t epic_cuk_bf16_to_f32(const uint16_t *x, int64_t ldx, int64_t m, int64_t n, float *y,
                                 int64_t ldy, cudaStream_t st);
/* Per token and 128-column block: s = amax / 448 (1 when amax == 0), q = e4m3(x * (448 /
 * amax)); q dense [m][k], scale[kb * lds + i] (token-major inside each column block, the
 * layout of cuBLASLt's VEC128_32F for the N-side operand; lds >= m). */
cudaError_t epic_cuk_quant_fp8_1x128(const float *x, int64_t ldx, int64_t m, int64_t k, uint8_t *q,
                                     float *scale, int64_t lds, cudaStream_t st);
/* The same for the rows of up to EPIC_CUK_QGROUPS_MAX groups of one grouped matmul: group
 * g is rows [row0, row0 + rows) of x, its codes go to the same rows of q (dense, ld k),
 * its scales to its own block [nbc][mp] at scale + sbase (mp = rows rounded up to 4,
 * cuBLASLt's token count). Its pad rows rows..mp get scale 0, and the first zpad of them
 * zero codes (rows no group of the call quantises). item0: prefix sums of the mp, n + 1
 * entries. Passed by value (kernel parameters: no upload, capturable). With xidx (device
 * memory) row i of the groups is read from row xidx[i] of x (codes still go to row i).
 * With qsrc (k % 16 == 0, rows 16-byte aligned) the source rows are quantised already
 * (epic_cuk_quant_fp8_1x128: codes [*][k], scales ssrc[kb * lds_src + row]): their codes
 * and scales are copied (the same bits: quantisation is per row), x is not read. */
enum { EPIC_CUK_QGROUPS_MAX = 128 };
typedef struct epic_cuk_qgroups {
  const uint8_t *qsrc;
  const float *ssrc;
  int64_t lds_src;
  int32_t n;
  int32_t row0[EPIC_CUK_QGROUPS_MAX], rows[EPIC_CUK_QGROUPS_MAX], zpad[EPIC_CUK_QGROUPS_MAX];
  int32_t sbase[EPIC_CUK_QGROUPS_MAX], item0[EPIC_CUK_QGROUPS_MAX + 1];
} epic_cuk_qgroups;
cudaError_t epic_cuk_quant_fp8_groups(const float *x, int64_t ldx, const int32_t *xidx, int64_t k,
                                      uint8_t *q, float *scale, const epic_cuk_qgroups *t,
                                      cudaStream_t st);
/* FP8 (block-scaled) weight times m <= 4 fp32 tokens staged in shared memory: W is read
 * once with 16-byte loads, products in fp32 (no activation rounding). */
enum { EPIC_CUK_SKINNY_MAX_M = 4 };
/* head_gemm_bf16 at up to EPIC_CUK_HEAD_MAX_M tokens (kern_head_gemm.cu): the weights read
 * once, fp32 x, fp32 sums in an order fixed by the shape. _ok: the shape and alignment it
 * takes (every head's rows 16-byte aligned; x of one head in 48 KB of shared memory). */
enum { EPIC_CUK_HEAD_MAX_M = EPIC_CUDA_HEAD_KERNEL_MAX_M };
int epic_cuk_head_bf16_ok(int64_t m, int64_t n_heads, const void *a, int64_t ld_a_head, int64_t k,
                          int64_t n, int trans);
cudaError_t epic_cuk_head_bf16(const float *x, int64_t ld_x_tok, int64_t ld_x_head, int64_t m,
                               int64_t n_heads, const uint16_t *a, int64_t ld_a_head, int64_t k,
                               int64_t n, int trans, float *y, int64_t ld_y_tok, int64_t ld_y_head,
                               cudaStream_t st);
/* The invariant precision's head_gemm_bf16 at any token count (kern_head_gemm.cu): x
 * rounded to bf16, bf16 mma.sync with fp32 sums chained in k order, an output a function
 * of its token and weight rows only. _ok: the shapes it takes, which do not depend on the
 * token count (k and n multiples of 8, 16-byte aligned head rows, k <= 3072). */
int epic_cuk_head_rows_ok(int64_t n_heads, const void *a, int64_t ld_a_head, int64_t k, int64_t n);
cudaError_t epic_cuk_head_rows(const float *x, int64_t ld_x_tok, int64_t ld_x_head, int64_t m,
                               int64_t n_heads, const uint16_t *a, int64_t ld_a_head, int64_t k,
                               int64_t n, int trans, float *y, int64_t ld_y_tok, int64_t ld_y_head,
                               cudaStream_t st);
int epic_cuk_fp8_skinny_ok(const epic_weight *w, int64_t m);
cudaError_t epic_cuk_fp8_skinny_prepare(void);
/* split: column runs per row pair (1, 2, 4 or 8), 0 = chosen from the weight's shape (runs
 * of at least four 512-column stripes: long rows are read by several warps at once). */
cudaError_t epic_cuk_fp8_skinny(const float *x, int64_t ldx, int64_t m, const epic_weight *w,
                                float *y, int64_t ldy, int sm_count, int split, cudaStream_t st);
/* Grouped FP8 skinny GEMM (one launch per MoE layer projection): group g's rows
 * [off[g], off[g+1]) of x times the weight whose storage tab[g] names (every group's
 * weight has shape's rows, cols and blocks); groups with more than max_rows rows are
 * left to the caller. off and tab are device memory. */
typedef struct epic_cuk_group_w {
  const uint8_t *data;
  const float *scale;
} epic_cuk_group_w;
int epic_cuk_fp8_grouped_ok(const epic_weight *w);
cudaError_t epic_cuk_fp8_grouped(const float *x, int64_t ldx, const int32_t *off, int64_t n_groups,
                                 const epic_cuk_group_w *tab, const epic_weight *shape,
                                 int max_rows, float *y, int64_t ldy, cudaStream_t st);
/* Tensor-core FP8 matmul of bf16 token rows (kern_fp8_mma.cu): dense (off == NULL: rows
 * [0, rows_max) of x times w, rows_max <= EPIC_CUK_MMA_MAX_ROWS) or grouped (group g's
 * rows [off[g], off[g+1]) times the weight tab[g] names, each of w's layout; groups of
 * more than rows_max rows are left to the caller; groups above EPIC_CUK_MMA_MAX_ROWS rows
 * are cut into tiles of that many, which give the same bits). x: row stride ldx a
 * multiple of 8, 16-byte aligned. active_groups must be at least the number of groups
 * with rows_min to rows_max rows (one grid row each; extra rows exit at once). */
enum { EPIC_CUK_MMA_MAX_ROWS = 64 };
typedef struct epic_cuk_fp8_mma_args {
  const uint16_t *x;
  int64_t ldx;
  const epic_weight *w;
  const int32_t *off;
  const epic_cuk_group_w *tab;
  int64_t n_groups, active_groups;
  int64_t rows_min, rows_max; /* grouped: the groups this launch takes (rows_min 0 = 1) */
  float *y;
  int64_t ldy;
  int *err;           /* grouped, optional: gets EPIC_CUK_ERR_GROUP_ROWS ...        */
  int64_t rows_bound; /* ... if a group has more rows than this (>= rows_max) */
} epic_cuk_fp8_mma_args;
int epic_cuk_fp8_mma_ok(const epic_weight *w);
cudaError_t epic_cuk_fp8_mma_prepare(void);
cudaError_t epic_cuk_fp8_mma(const epic_cuk_fp8_mma_args *p, int sm_count, cudaStream_t st);
/* Grouped FP8 GEMM on wgmma (kern_fp8_wgmma.cu) for groups above the tensor-core
 * kernel's bound: group g is rows [row0[g], row0[g] + rows[g]) of the e4m3 codes amap
 * describes ([rows][k], 1x128 scales at as + sbase[g], layout [nbk][mp[g]], the lanes'
 * quantiser's) times the weight of index widx[g] (its tensor map wmaps[widx], its block
 * scales tab[widx].scale; every weight n x k), into the same rows of y (fp32, ldy even, 8-byte
 * aligned). tile0: prefix sums of epic_cuk_fp8_wgmma_tiles(rows[g], n, narrow). Passed by value
 * (kernel parameters). A tensor map (CUtensorMap, 128 bytes, 64-byte aligned) is built on the
 * host by epic_cuk_tmap_fp8 for a row-major [rows][cols] byte matrix (cols % 16 == 0), boxes
 * of box_rows x 128 bytes (EPIC_CUK_WG_TILE_COLS for weights, EPIC_CUK_WG_TILE_ROWS and
 * EPIC_CUK_WG_BOX_ROWS for activations). */
#ifdef __cplusplus
#define EPIC_CUK_ALIGN64 alignas(64)
#else
#define EPIC_CUK_ALIGN64 _Alignas(64)
#endif
typedef struct epic_cuk_tmap {
  EPIC_CUK_ALIGN64 unsigned char opaque[128];
} epic_cuk_tmap;
enum {
  EPIC_CUK_WG_GROUPS_MAX = 128,
  EPIC_CUK_WG_DEV_GROUPS_MAX = 1024,
  EPIC_CUK_WG_TILE_ROWS = 128,   /* rows of a tile: the activation box of amap */
  EPIC_CUK_WG_TILE_COLS = 256,   /* weight rows of a tile: the box of wmaps[0, n) */
  EPIC_CUK_WG_NARROW_COLS = 128, /* of a narrow tile: the box of wmaps[n, 2n) */
  EPIC_CUK_WG_BOX_ROWS = 16,     /* rows of amap16's box: tiles of at most 64 rows */
  EPIC_CUK_WG_THIN_ROWS = 16     /* most rows of a thin launch (thin) */
};
typedef struct epic_cuk_fp8_wgmma_args {
  epic_cuk_tmap amap, amap16; /* the same codes, boxes of 128 and of 16 rows */
  const epic_cuk_tmap *wmaps;
  const epic_cuk_group_w *tab;
  const float *as;
  float *y;
  int64_t ldy;
  int32_t n, k, n_groups;
  /* Device-planned form (off_dev != NULL; the arrays below unused): group g is rows
   * [off_dev[g], off_dev[g + 1]) with weight g, taken when it has more than min_rows rows;
   * its scales at as + round_up(off_dev[g], 4) + 4 g, stride lds (the layout of
   * epic_cuk_quant_fp8_dev); n_groups <= EPIC_CUK_WG_DEV_GROUPS_MAX. err (optional) gets
   * EPIC_CUK_ERR_GROUP_ROWS when a group has more than bound rows (the caller's promise). */
  const int32_t *off_dev;
  int32_t min_rows, lds, bound;
  int *err;
  /* Host-planned form: half tiles (a tile of at most 64 rows on both consumer warpgroups,
   * tiles taken in a dynamic order; else whole tiles in a static order: the same results)
   * and, with them, one int of device memory for the tile counter (zeroed by
   * epic_cuk_fp8_wgmma before the launch, on its stream). */
  int32_t half;
  int32_t *next_tile;
  /* Host-planned, optional: narrow tiles of EPIC_CUK_WG_NARROW_COLS weight rows (wmaps then
   * holds tensor maps with that box): twice the tiles of a weight, the same results. */
  int32_t narrow;
  /* Host-planned, optional: the thin form (thin != 0), for one group of at most
   * EPIC_CUK_WG_THIN_ROWS rows: CTAs of 16 weight rows over all of k reading the codes at aq
   * (the ones amap describes) by cp.async, the same bits as the tiled forms (a dense weight
   * at decode sizes; maps and narrow unused). */
  int32_t thin;
  const uint8_t *aq;
  int32_t widx[EPIC_CUK_WG_GROUPS_MAX], row0[EPIC_CUK_WG_GROUPS_MAX];
  int32_t rows[EPIC_CUK_WG_GROUPS_MAX], sbase[EPIC_CUK_WG_GROUPS_MAX];
  int32_t mp[EPIC_CUK_WG_GROUPS_MAX], tile0[EPIC_CUK_WG_GROUPS_MAX + 1];
} epic_cuk_fp8_wgmma_args;
/* Codes and scales of the rows of the groups above min_rows rows of a device-planned
 * grouped matmul (off: n_groups + 1 device offsets), in the layout of the wgmma kernel's
 * device-planned form: codes dense [rows][k], scales [nbk][lds] with group g's rows from
 * round_up(off[g], 4) + 4 g; lds >= round_up(rows, 4) + 4 n_groups. Other rows are skipped. */
cudaError_t epic_cuk_quant_fp8_dev(const float *x, int64_t ldx, int64_t rows, int64_t k,
                                   const int32_t *off, int64_t n_groups, int64_t min_rows,
                                   uint8_t *q, float *scale, int64_t lds, cudaStream_t st);
/* _layout_ok: the weight's dtype, shape and blocks suit the kernel (pointers not read);
 * _ok: also its storage (scales present, codes 16-byte aligned). */
int epic_cuk_fp8_wgmma_layout_ok(const epic_weight *w);
int epic_cuk_fp8_wgmma_ok(const epic_weight *w);
int epic_cuk_fp8_wgmma_tiles(int64_t rows, int64_t n, int narrow);
cudaError_t epic_cuk_tmap_fp8(epic_cuk_tmap *m, const void *base, int64_t rows, int64_t cols,
                              int box_rows);
cudaError_t epic_cuk_fp8_wgmma_prepare(void);
cudaError_t epic_cuk_fp8_wgmma(const epic_cuk_fp8_wgmma_args *a, int sm_count, cudaStream_t st);
/* Dequantise rows [r0, r0 + nr) of w into out [nr][w->cols], as bf16 (out_bf16) or fp32. */
cudaError_t epic_cuk_dequant_rows(const epic_weight *w, int64_t r0, int64_t nr, void *out,
                                  int out_bf16, cudaStream_t st);
/* out[r][0..ldp) = s[r][0..nbc) padded with zeros, r < nbr. */
cudaError_t epic_cuk_pad_rows_f32(const float *s, int64_t nbr, int64_t nbc, int64_t ldp, float *out,
                                  cudaStream_t st);

cudaError_t epic_cuk_rmsnorm(const float *x, int64_t ldx, int64_t m, int64_t n, const float *w,
                             float eps, float *y, int64_t ldy, cudaStream_t st);

enum { EPIC_CUK_ROPE_MAX_PAIRS = 128 };
typedef struct epic_cuk_rope_freq {
  double f[EPIC_CUK_ROPE_MAX_PAIRS];
} epic_cuk_rope_freq;
cudaError_t epic_cuk_rope(float *x, int64_t m, int64_t n_heads, int64_t ld_tok, int64_t ld_head,
                          int64_t rope_dim, const int32_t *pos, const epic_cuk_rope_freq *freq,
                          cudaStream_t st);
cudaError_t epic_cuk_silu_mul(const float *g, int64_t ldg, const float *u, int64_t ldu, int64_t m,
                              int64_t n, float *y, int64_t ldy, cudaStream_t st);
cudaError_t epic_cuk_axpy(int64_t n, float a, const float *x, float *y, cudaStream_t st);
/* Rows whose id is outside [0, rows) become NaN and set *err. */
cudaError_t epic_cuk_embed(const epic_weight *table, const int32_t *ids, int64_t m, float *y,
                           int *err, cudaStream_t st);

/* Per-token routing; shared memory per token is returned by epic_cuk_route_smem. */
size_t epic_cuk_route_smem(int64_t n_experts, int64_t n_group);
cudaError_t epic_cuk_route(const float *logits, int64_t m, const epic_router_params *p,
                           int32_t *idx, float *weight, cudaStream_t st);

cudaError_t epic_cuk_kv_store(const epic_kv_view *kv, int64_t start, int64_t m, const float *latent,
                              int64_t ld_latent, const float *kpe, int64_t ld_kpe, cudaStream_t st);
/* Rows [0, n) into latent [n][lora] and kpe [n][width - lora]; with kpe == NULL, whole
 * rows into latent [n][width] instead. */
cudaError_t epic_cuk_kv_gather(const epic_kv_view *kv, int64_t n, float *latent, float *kpe,
                               cudaStream_t st);

/* ABI 3 row movement (kern_moe.cu): see copy_rows, moe_combine and kv_store_batch in
 * kernels/ops.h. */
cudaError_t epic_cuk_copy_rows(int64_t n, int64_t cols, const float *src, int64_t ld_src,
                               const int32_t *src_idx, float *dst, int64_t ld_dst,
                               const int32_t *dst_idx, cudaStream_t st);
cudaError_t epic_cuk_moe_combine(int64_t m, int64_t top_k, int64_t n, const float *rows,
                                 const int32_t *slot, const float *w, float *y, cudaStream_t st);
/* Bits of the device error flag (epic_cuda_ops.err_flag), reported and cleared at sync. */
enum { EPIC_CUK_ERR_EMBED_ID = 1, EPIC_CUK_ERR_EXPERT_ID = 2, EPIC_CUK_ERR_GROUP_ROWS = 4 };
/* moe_plan (kernels/ops.h) in one block; n + n_experts below 2^31, n_experts below 12k
 * (its offsets live in shared memory). */
cudaError_t epic_cuk_moe_plan(const int32_t *idx, int64_t n, int64_t n_experts, int64_t div,
                              int32_t *plan, int64_t *counts, int *err, cudaStream_t st);
cudaError_t epic_cuk_kv_store_batch(const epic_kv_batch *kv, int64_t n_seq, const float *latent,
                                    int64_t ld_latent, const float *kpe, int64_t ld_kpe,
                                    cudaStream_t st);

/* Greedy pick per row of x [m][n]: see row_pick in kernels/ops.h (m < 2^31), with
 * epic_cuk_row_pick_scratch(m, n) bytes of device scratch for the chunks' partials. */
size_t epic_cuk_row_pick_scratch(int64_t m, int64_t n);
cudaError_t epic_cuk_row_pick(const float *x, int64_t m, int64_t n, int32_t *ids, float *logprob,
                              void *scratch, cudaStream_t st);

/* Seeded draws per row of x [m][n] in place of the picks in ids / logprob: see row_draw
 * in kernels/ops.h (m < 2^31; kern_draw.cu). */
cudaError_t epic_cuk_row_draw(const float *x, int64_t m, int64_t n, const epic_draw_params *p,
                              int32_t *ids, float *logprob, cudaStream_t st);

/* Row r = h * mc + i of s [rows][ld]: softmax over columns [0, first_valid + i), zeros
 * after (the causal mask of query i of a chunk). */
cudaError_t epic_cuk_softmax_causal(float *s, int64_t rows, int64_t mc, int64_t ld,
                                    int64_t first_valid, cudaStream_t st);

/* Flash-decoding MLA over a paged cache (fp32 rows: kern_mla.cu; bf16 rows:
 * kern_mla_bf16.cu). Query b (0 <= b < n_q) has n_keys(b) = n_ctx ? n_ctx[b] : start + b + 1
 * keys and block table tables + b * stride. */
typedef struct epic_cuk_mla_params {
  const void *pool; /* float or bf16 elements, by the launcher */
  int64_t page_size, width, lora;
  int page_shift; /* log2(page_size) when it is a power of two, else -1 */
  const int32_t *tables;
  int64_t table_stride;
  const int32_t *n_ctx;
  int64_t start;
  const float *q_abs, *q_pe; /* [n_q][n_heads][lora], [n_q][n_heads][width - lora] */
  int64_t n_heads, n_q;
  float qscale; /* softmax scale * log2(e) */
  int n_split;
  /* 0: each query's keys cut into n_split equal chunks. > 0: into chunks of
   * max(split_keys, n_keys / EPIC_CUDA_MLA_FIXED_SPLITS) keys (tile-rounded), which depend
   * on the query's own key count alone (the exact precision's row invariance); n_split
   * must cover every query's chunks, the splits past a query's end stay empty. */
  int split_keys;
  float *ctx;      /* [n_q][n_heads][lora] */
  float *part_acc; /* [n_q][n_split][n_heads][lora] when n_split > 1 */
  float *part_ml;  /* [n_q][n_split][n_heads][2] */
} epic_cuk_mla_params;
/* Whether the fp32 decode kernel takes these shapes (width % 4, lora % 8, sizes, pool
 * aligned; positions below 2^31). */
int epic_cuk_mla_decode_ok(int64_t width, int64_t lora, const void *pool);
size_t epic_cuk_mla_decode_smem(int64_t width);
cudaError_t epic_cuk_mla_decode_prepare(int max_smem_optin);
cudaError_t epic_cuk_mla_decode(const epic_cuk_mla_params *p, int exact, cudaStream_t st);
/* Merge of p->n_split > 1 partials (part_acc, part_ml) into ctx; both decode kernels. */
cudaError_t epic_cuk_mla_combine(const epic_cuk_mla_params *p, cudaStream_t st);
/* BF16 cache rows: the DeepSeek-V3 shape only (width 576, lora 512, pool 16-byte aligned);
 * keys per split are rounded to 64-row tiles. variant: see epic_cuda_ops.mla_bf16_variant. */
int epic_cuk_mla_bf16_ok(int64_t width, int64_t lora, const void *pool);
cudaError_t epic_cuk_mla_bf16_prepare(int max_smem_optin);
cudaError_t epic_cuk_mla_bf16_decode(const epic_cuk_mla_params *p, int variant, cudaStream_t st);

/* Flash MLA prefill (kern_mla_prefill.cu): the naive form of mla_naive on fp32 queries
 * q [m][H][nope + rope] (16-byte aligned; rounded to bf16 by the kernel) and bf16 copies of
 * kv [start + m][H][nope + v] and kpe [start + m][rope]; the DeepSeek-V3 head shape only
 * (nope 128, rope 64, v 128). out: fp32 [m][H][v]. wgmma: products on wgmma (else
 * mma.sync; see epic_cuda_ops.mla_prefill_wgmma). */
int epic_cuk_mla_prefill_ok(int64_t nope, int64_t rope, int64_t v, int64_t m, int64_t start,
                            int64_t n_heads, const float *q);
cudaError_t epic_cuk_mla_prefill_prepare(void);
cudaError_t epic_cuk_mla_prefill(const float *q, const uint16_t *kv, const uint16_t *kpe, int64_t m,
                                 int64_t start, int64_t n_heads, float scale, float *out,
                                 int wgmma, cudaStream_t st);

#ifdef __cplusplus
}
#endif

#endif
