/* epic_ops: the compute seam. Every numeric op the model needs, behind a small
 * vtable so that CPU and CUDA backends are interchangeable (STYLE rule 6).
 *
 * Conventions
 * - Activations are fp32, row-major, in memory owned by the backend's device
 *   (host memory for the CPU backend). Pointers passed to ops are borrowed.
 * - Weights are described by epic_weight: the checkpoint's own storage (BF16,
 *   F32, F16 or FP8 e4m3 with 128x128 block scales), never converted by the
 *   caller. Every linear layer is y = x . W^T with W of shape [rows, cols].
 * - Ops are synchronous on the CPU backend and stream-ordered on CUDA.
 * - Thread contract: thread-compatible; one thread drives one epic_ops at a time.
 *   The CPU backend parallelises internally with OpenMP. */
#ifndef EPIC_KERNELS_OPS_H
#define EPIC_KERNELS_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "../common/status.h"
#include "draw.h"

/* 2: mla_absorbed_batch appended (batched decode attention over several sequences).
 * 3: host_visible, copy_rows, zero, moe_combine, kv_store_batch, grouped_matmul, sync appended (what the model
 *    needs to keep a whole forward in backend memory).
 * 4: row_pick appended.
 * 5: the latent KV cache has an element type (epic_kv_dtype: the dtype field of epic_kv_view
 *    and epic_kv_batch, whose pool became void *); kv_dtype appended (the type a backend wants
 *    for caches created now: BF16 halves the bytes a decode step streams).
 * 6: moe_plan and grouped_matmul_dev appended (an MoE layer's expert plan built and used in
 *    backend memory, without the host round trip for the routing ids).
 * 7: graph_begin, graph_end, graph_launch, graph_free and graph_epoch appended (a decode
 *    step recorded once and replayed as one launch).
 * 8: grouped_matmul_rows appended (the experts' input rows read from the token rows
 *    through the plan, without a gathered copy); upload_async and queue appended (an
 *    expert-parallel exchange ordered against the backend's ops without the host
 *    waiting).
 * 9: grouped_invariant appended (whether an expert's rows keep their results whatever
 *    group they land in: what expert re-placement needs, apart from MTP's whole-forward
 *    invariance).
 * 10: head_dtype and head_gemm_bf16 appended (the MLA absorption's per-head weights in bf16
 *    where the backend wants them: half the bytes a decode step reads for them).
 * 11: grouped_matmul_rows takes n_src, the rows src has (a backend that quantises its
 *    input may then quantise each source row once, not once per group row).
 * 12: rows_invariant appended (a device backend whose current settings compute every row
 *    alike whatever the row count: what lets MTP drafting be on by default there).
 * 13: row_draw appended (seeded temperature / top-k / top-p draws where the logits are). */
#define EPIC_OPS_ABI_VERSION 13

typedef enum {
  EPIC_DT_F32 = 0,
  EPIC_DT_BF16 = 1,
  EPIC_DT_F16 = 2,
  EPIC_DT_F8E4M3 = 3,
  EPIC_DT_I32 = 4,
  EPIC_DT_I64 = 5,
  EPIC_DT_U8 = 6,
  EPIC_DT_OTHER = 7 /* any other safetensors dtype: never usable as a weight */
} epic_dtype;

/* Bytes per element (0 for EPIC_DT_OTHER). */
size_t epic_dtype_size(epic_dtype dt);
/* "F32", "BF16", "F16", "F8_E4M3", ... (safetensors spelling). */
const char *epic_dtype_name(epic_dtype dt);

/* Scalar conversions used by every backend's reference path. */
float epic_bf16_to_f32(uint16_t v);
uint16_t epic_f32_to_bf16(float f); /* round to nearest even */
float epic_f16_to_f32(uint16_t v);
float epic_fp8e4m3_to_f32(uint8_t v); /* e4m3fn: bias 7, no inf, 0x7f/0xff NaN */
uint8_t epic_f32_to_fp8e4m3(float f); /* round to nearest even, saturating to +-448 */

/* A weight matrix [rows, cols] as stored in the checkpoint. Borrowed view:
 * data (and scale_inv) stay owned by whoever mapped or allocated them. */
typedef struct epic_weight {
  epic_dtype dtype;      /* F32, BF16, F16 or F8E4M3 */
  int64_t rows, cols;    /* logical shape; data is rows*cols elements, row-major */
  const void *data;
  /* FP8 only: fp32 multipliers, shape [ceil(rows/block_rows), ceil(cols/block_cols)];
   * W[r][c] = fp8(data[r][c]) * scale_inv[r/block_rows][c/block_cols]. Edge blocks may
   * be partial. NULL for other dtypes. */
  const float *scale_inv;
  int64_t block_rows, block_cols; /* 128, 128 for DeepSeek-V3 */
} epic_weight;

/* Dequantise rows [r0, r0+n) of w into out[n][w->cols] (fp32). Reference helper
 * shared by backends and tests. */
void epic_weight_rows_f32(const epic_weight *w, int64_t r0, int64_t n, float *out);

/* Element type of a latent KV cache pool. F32 is 0, so a zero-initialised view is fp32.
 * BF16 rows are written rounded to nearest even (epic_f32_to_bf16) and read back widened
 * exactly; ops take and return fp32 activations either way. */
typedef enum {
  EPIC_KV_F32 = 0,
  EPIC_KV_BF16 = 1,
} epic_kv_dtype;

/* Bytes per cache element (4 or 2; 0 for an unknown type). */
static inline size_t epic_kv_dtype_size(epic_kv_dtype t) {
  return t == EPIC_KV_F32 ? 4 : t == EPIC_KV_BF16 ? 2 : 0;
}

/* Paged latent KV cache view for one layer (MLA, DESIGN §3): a pool of pages,
 * each page holds page_size token rows of `width` elements of type `dtype`
 * (kv_lora_rank latent followed by qk_rope_head_dim roped key). A sequence's token t
 * lives in page block_table[t / page_size], row t % page_size. A backend refuses a dtype
 * it does not implement (EPIC_ERR_UNSUPPORTED). */
typedef struct epic_kv_view {
  void *pool;                  /* this layer's pool: n_pages * page_size * width elements */
  int64_t page_size;
  int64_t width;               /* kv_lora_rank + qk_rope_head_dim */
  int64_t lora;                /* kv_lora_rank: first `lora` elements of a row are the latent */
  const int32_t *block_table;  /* page ids of the sequence, in order */
  int64_t n_ctx;               /* tokens currently valid for the sequence (keys 0..n_ctx-1) */
  epic_kv_dtype dtype;         /* element type of pool (ABI 5) */
} epic_kv_view;

/* The paged latent caches of several sequences of one layer (one pool), for batched
 * decode. Sequence s uses block_tables[s * table_stride ...] and holds n_ctx[s] >= 1
 * valid tokens. block_tables and n_ctx live in backend memory (device memory for
 * CUDA), so a captured decode step can change lengths without host round trips;
 * max_ctx is a host-side upper bound of every n_ctx[s] (it sizes the work split). */
typedef struct epic_kv_batch {
  void *pool;                   /* elements of type dtype, as in epic_kv_view */
  int64_t page_size;
  int64_t width;                /* kv_lora_rank + qk_rope_head_dim */
  int64_t lora;                 /* kv_lora_rank */
  const int32_t *block_tables;  /* [n_seq][table_stride] page ids */
  int64_t table_stride;
  const int32_t *n_ctx;         /* [n_seq] */
  int64_t max_ctx;
  epic_kv_dtype dtype;          /* element type of pool (ABI 5) */
} epic_kv_batch;

typedef struct epic_ops epic_ops;
/* A recorded sequence of ops (ABI 7), owned by the caller, freed with graph_free. */
typedef struct epic_ops_graph epic_ops_graph;

/* Router settings of one MoE layer (DeepSeek-V3 noaux_tc routing). */
typedef struct epic_router_params {
  int64_t n_experts;
  int64_t top_k;
  int64_t n_group;        /* experts split into n_group contiguous groups; 1 = no grouping */
  int64_t topk_group;     /* groups kept */
  int scoring;            /* 0 = sigmoid, 1 = softmax */
  int norm_topk_prob;     /* renormalise the chosen weights to sum 1 */
  float routed_scaling_factor;
  const float *bias;      /* e_score_correction_bias [n_experts] (selection only) or NULL */
} epic_router_params;

typedef struct epic_ops_vt {
  int abi_version;
  const char *name;

  /* y[m][w->rows] = x[m][w->cols] . W^T (fp32 accumulation). ldx/ldy are row strides
   * in floats (>= cols / rows). */
  epic_status (*matmul)(epic_ops *o, const float *x, int64_t ldx, int64_t m,
                        const epic_weight *w, float *y, int64_t ldy);

  /* y[i] = w * x[i] / sqrt(mean(x[i]^2) + eps) for m rows of n values; w is fp32 [n].
   * In-place (x == y) allowed. ldx/ldy are row strides in floats. */
  epic_status (*rmsnorm)(epic_ops *o, const float *x, int64_t ldx, int64_t m, int64_t n,
                         const float *w, float eps, float *y, int64_t ldy);

  /* In-place interleaved (GPT-J) rotary embedding on rope_dim values of each of
   * n_heads heads of m tokens: x[t*ld_tok + h*ld_head + (0..rope_dim-1)], pairs
   * (2j, 2j+1) rotated by angle pos[t] * inv_freq[j] (computed in double). */
  epic_status (*rope)(epic_ops *o, float *x, int64_t m, int64_t n_heads, int64_t ld_tok,
                      int64_t ld_head, int64_t rope_dim, const int32_t *pos,
                      const double *inv_freq);

  /* y[i][j] = silu(g[i][j]) * u[i][j] for m rows of n values (row strides ldg/ldu/ldy). */
  epic_status (*silu_mul)(epic_ops *o, const float *g, int64_t ldg, const float *u,
                          int64_t ldu, int64_t m, int64_t n, float *y, int64_t ldy);

  /* y[i] += a * x[i], n values. */
  epic_status (*axpy)(epic_ops *o, int64_t n, float a, const float *x, float *y);

  /* y[i][:] = table[ids[i]][:] (dequantised to fp32) for m ids. */
  epic_status (*embed)(epic_ops *o, const epic_weight *table, const int32_t *ids, int64_t m,
                       float *y);

  /* Router: from logits[m][n_experts] (x . gate^T), select top_k experts per token
   * with group-limited top-k on the (biased) scores; write the chosen expert ids
   * ascending in idx[m][top_k] and their weights (unbiased scores, renormalised
   * if asked, times routed_scaling_factor) in weight[m][top_k]. Ties: lowest index. */
  epic_status (*route)(epic_ops *o, const float *logits, int64_t m,
                       const epic_router_params *p, int32_t *idx, float *weight);

  /* Write token rows into the paged cache: for t in [0,m) row (start+t) of the
   * sequence gets latent[t][0..lora) and kpe[t][0..width-lora). */
  epic_status (*kv_store)(epic_ops *o, const epic_kv_view *kv, int64_t start, int64_t m,
                          const float *latent, int64_t ld_latent, const float *kpe,
                          int64_t ld_kpe);

  /* Copy cached rows [0, n) of a sequence into latent[n][lora] and kpe[n][width-lora]. */
  epic_status (*kv_gather)(epic_ops *o, const epic_kv_view *kv, int64_t n, float *latent,
                           float *kpe);

  /* MLA, naive (decompressed) form, for m query tokens at positions
   * start..start+m-1 against keys 0..start+m-1 (causal):
   *   q   [m][n_heads][nope+rope]   (q_nope then roped q_pe, per head)
   *   kvb [n_keys][n_heads][nope+v] (k_nope then v per head, kv_b_proj output)
   *   kpe [n_keys][rope]            (roped shared key)
   *   out [m][n_heads][v]
   * score = scale * (q_nope.k_nope + q_pe.k_pe); fp32 softmax over keys. */
  epic_status (*mla_naive)(epic_ops *o, const float *q, const float *kvb, const float *kpe,
                           int64_t m, int64_t start, int64_t n_heads, int64_t nope,
                           int64_t rope, int64_t v, float scale, float *out);

  /* MLA, absorbed form over the paged latent cache, for m query tokens at positions
   * start..start+m-1 of one sequence (keys 0..start+m-1 already in kv):
   *   q_abs [m][n_heads][lora]  (q_nope absorbed through W_UK)
   *   q_pe  [m][n_heads][rope]
   *   ctx   [m][n_heads][lora]  (softmax-weighted sum of cached latents)
   * score = scale * (q_abs.latent + q_pe.kpe). */
  epic_status (*mla_absorbed)(epic_ops *o, const epic_kv_view *kv, const float *q_abs,
                              const float *q_pe, int64_t m, int64_t start, int64_t n_heads,
                              float scale, float *ctx);

  /* Batched per-head small GEMM: for h in [0,n_heads), t in [0,m):
   *   y[t][h][0..n) = x[t][h][0..k) . A_h        (trans == 0, A_h is [k][n] row-major)
   *   y[t][h][0..n) = x[t][h][0..k) . A_h^T      (trans == 1, A_h is [n][k] row-major)
   * with x[t][h] at x + t*ld_x_tok + h*ld_x_head, y[t][h] at y + t*ld_y_tok + h*ld_y_head
   * and A_h at a + h*ld_a_head. Used for the MLA absorption of W_UK (query side) and
   * W_UV (output side). */
  epic_status (*head_gemm)(epic_ops *o, const float *x, int64_t ld_x_tok, int64_t ld_x_head,
                           int64_t m, int64_t n_heads, const float *a, int64_t ld_a_head,
                           int64_t k, int64_t n, int trans, float *y, int64_t ld_y_tok,
                           int64_t ld_y_head);

  /* Device memory for activations and derived weights. alloc returns zeroed,
   * 64-byte aligned memory; free is NULL-safe. upload/download copy host<->device
   * (plain memcpy on the CPU backend). */
  epic_status (*alloc)(epic_ops *o, size_t bytes, void **out);
  void (*free)(epic_ops *o, void *p);
  epic_status (*upload)(epic_ops *o, void *dst, const void *src, size_t bytes);
  epic_status (*download)(epic_ops *o, void *dst, const void *src, size_t bytes);

  void (*destroy)(epic_ops *o);

  /* ABI 2. Absorbed MLA decode for n_seq sequences at once, one query token each at
   * position n_ctx[s] - 1 (keys 0..n_ctx[s]-1 already in the cache):
   *   q_abs [n_seq][n_heads][lora], q_pe [n_seq][n_heads][rope], ctx [n_seq][n_heads][lora]
   * Same result as mla_absorbed(m = 1, start = n_ctx[s] - 1) on each sequence; exists so a
   * GPU backend runs a whole decode batch in one launch instead of n_seq small ones. */
  epic_status (*mla_absorbed_batch)(epic_ops *o, const epic_kv_batch *kv, int64_t n_seq,
                                    const float *q_abs, const float *q_pe, int64_t n_heads,
                                    float scale, float *ctx);

  /* ABI 3. 1 when backend memory is host memory the caller may read and write
   * directly (CPU); 0 when it is only reachable through upload/download (CUDA). */
  int host_visible;

  /* Row copy of n rows of `cols` 32-bit words (floats, or int32 bit patterns, which
   * are copied unchanged):
   *   dst[(dst_idx ? dst_idx[i] : i) * ld_dst + j] = src[(src_idx ? src_idx[i] : i) * ld_src + j]
   * for i in [0, n), j in [0, cols). Index arrays live in backend memory. Destination
   * rows must not repeat; source and destination must not overlap. Gathers rows for the
   * experts, packs and unpacks the expert-parallel exchange and picks the LM-head rows. */
  epic_status (*copy_rows)(epic_ops *o, int64_t n, int64_t cols, const float *src,
                           int64_t ld_src, const int32_t *src_idx, float *dst, int64_t ld_dst,
                           const int32_t *dst_idx);

  /* Set `bytes` bytes of backend memory at p to zero. */
  epic_status (*zero)(epic_ops *o, void *p, size_t bytes);

  /* MoE combine: for t in [0, m), k = 0, 1, ..., top_k - 1 in this order,
   *   y[t][:] += w[t * top_k + k] * rows[(slot ? slot[t * top_k + k] : t * top_k + k)][:]
   * (n values per row; rows and y have row stride n). The fixed k order makes the sum
   * independent of where the expert results were computed. slot/w live in backend memory. */
  epic_status (*moe_combine)(epic_ops *o, int64_t m, int64_t top_k, int64_t n, const float *rows,
                             const int32_t *slot, const float *w, float *y);

  /* kv_store for decode batches: sequence s of kv gets row n_ctx[s] - 1 set to
   * latent[s][0..lora) and kpe[s][0..width-lora). */
  epic_status (*kv_store_batch)(epic_ops *o, const epic_kv_batch *kv, int64_t n_seq,
                                const float *latent, int64_t ld_latent, const float *kpe,
                                int64_t ld_kpe);

  /* Grouped (per-expert) matmul: for g in [0, n_groups) the rows [off[g], off[g+1]) of x
   * times weight w[g * w_stride]: y[r] = x[r] . W_g^T (ld ldx / ldy as in matmul).
   * off_host and off_dev hold the same n_groups + 1 ascending offsets, in host and in
   * backend memory (a GPU backend launches one kernel over all groups from off_dev and
   * plans with off_host). Groups without rows may have an unset weight. Results equal
   * matmul on each group's rows. */
  epic_status (*grouped_matmul)(epic_ops *o, const float *x, int64_t ldx, const int64_t *off_host,
                                const int32_t *off_dev, int64_t n_groups, const epic_weight *w,
                                int64_t w_stride, float *y, int64_t ldy);

  /* Wait until every queued op has finished (a no-op on synchronous backends), e.g.
   * before another engine (an NCCL stream) reads what the ops wrote. Reports faults
   * that only the device could see. */
  epic_status (*sync)(epic_ops *o);

  /* ABI 4. Greedy pick of each row of x [m][n] (row stride n):
   *   ids[i] = the first j with x[i][j] maximal (lowest id on ties, like epic_argmax),
   *   logprob[i] = x[i][ids[i]] - log(sum_j exp(x[i][j])) (the sum taken in double).
   * ids and logprob live in backend memory. Lets a GPU backend return 8 bytes per
   * greedy row instead of the row's vocabulary-wide logits. */
  epic_status (*row_pick)(epic_ops *o, const float *x, int64_t m, int64_t n, int32_t *ids,
                          float *logprob);

  /* ABI 5. Element type this backend wants for latent KV caches created now (the cache
   * asks once, at creation; ops read whatever type a view names). CPU: F32 only. CUDA:
   * BF16 in its fast precision mode, F32 in exact mode (kernels/cuda/ops_cuda.h). */
  epic_kv_dtype (*kv_dtype)(epic_ops *o);

  /* ABI 6. The expert plan of n routed items, built where the ids are: idx[i] in
   * [0, n_experts) is item i's expert (backend memory, as route writes it). plan
   * (backend memory, int32 [2n + n_experts + 1]) gets, with order = the items in
   * ascending expert order, item order kept within an expert:
   *   plan[j] = order[j] / div, plan[n + j] = order[j] (j < n);
   *   plan[2n + e] = the position of expert e's first item, plan[2n + n_experts] = n.
   * counts (backend memory, int64 [n_experts], or NULL): counts[e] += items of e. An id
   * outside [0, n_experts) is an error (a device backend reports it at its next sync). */
  epic_status (*moe_plan)(epic_ops *o, const int32_t *idx, int64_t n, int64_t n_experts,
                          int64_t div, int32_t *plan, int64_t *counts);

  /* ABI 6. grouped_matmul with the group offsets only in backend memory (off: n_groups + 1
   * ascending entries, e.g. from moe_plan): rows = off[n_groups] and max_rows bounds every
   * group's rows (a group above the bound is an error, reported at the next sync on a
   * device backend). Results equal grouped_matmul's. */
  epic_status (*grouped_matmul_dev)(epic_ops *o, const float *x, int64_t ldx, int64_t rows,
                                    int64_t max_rows, const int32_t *off, int64_t n_groups,
                                    const epic_weight *w, int64_t w_stride, float *y,
                                    int64_t ldy);

  /* ABI 7, optional (NULL on backends that cannot record: the CPU). Between graph_begin
   * and graph_end the ops are recorded, not run: graph_end returns them as a graph that
   * graph_launch queues again as one unit, with the same arguments (pointers, sizes,
   * host-side scalars) and reading whatever backend memory holds at launch. While
   * recording, anything that needs the host to wait or memory to move (upload, download,
   * sync, alloc, a scratch buffer that must grow, a first-use table) refuses with
   * EPIC_ERR_UNSUPPORTED and spoils the recording: graph_end then fails with that status
   * and leaves the backend as before graph_begin. A caller replays a graph only while
   * graph_epoch returns the value it had at graph_end: the epoch changes whenever memory a
   * recorded graph may point at is freed or moved (free, scratch growth). */
  epic_status (*graph_begin)(epic_ops *o);
  epic_status (*graph_end)(epic_ops *o, epic_ops_graph **out);
  epic_status (*graph_launch)(epic_ops *o, epic_ops_graph *g);
  void (*graph_free)(epic_ops *o, epic_ops_graph *g);
  uint64_t (*graph_epoch)(epic_ops *o);

  /* ABI 8, optional (NULL: the caller gathers with copy_rows and calls grouped_matmul;
   * n_src since ABI 11). grouped_matmul of the rows x_i = src[rows[i]] (src: n_src rows;
   * rows: backend memory, off[n_groups] entries, each in [0, n_src)), with the same
   * results bit for bit: a backend that converts or quantises its input rows does so
   * straight from src, without writing the gathered rows first. */
  epic_status (*grouped_matmul_rows)(epic_ops *o, const float *src, int64_t ld_src, int64_t n_src,
                                     const int32_t *rows, const int64_t *off,
                                     const int32_t *off_dev, int64_t n_groups, const epic_weight *w,
                                     int64_t w_stride, float *y, int64_t ldy);

  /* ABI 8, optional (NULL: use upload). upload without waiting: the bytes are staged
   * before the call returns (src may be reused at once) and land in dst before any op
   * queued later runs. Refused while recording, like upload. */
  epic_status (*upload_async)(epic_ops *o, void *dst, const void *src, size_t bytes);

  /* ABI 8, optional (NULL: the host orders the backend's ops and an exchange by waiting).
   * The backend's queue in the form a device-buffer comm backend takes (CUDA: its
   * cudaStream_t), so that an exchange can start after the ops queued so far and later ops
   * can wait for the exchange, both without the host waiting. */
  void *(*queue)(epic_ops *o);

  /* ABI 9, optional (NULL: only where the backend is rows-invariant as a whole). 1 when
   * grouped_matmul, grouped_matmul_rows and grouped_matmul_dev over weights of w's layout
   * (dtype, shape and block sizes; the data is not read) compute a row alike whatever
   * group, call or launch it lands in, at the backend's current settings. */
  int (*grouped_invariant)(epic_ops *o, const epic_weight *w);

  /* ABI 10, optional (NULL: fp32). The element type this backend wants head_gemm's
   * weights in, for weights stored now: EPIC_DT_BF16 (then head_gemm_bf16 exists) or
   * EPIC_DT_F32. */
  epic_dtype (*head_dtype)(epic_ops *o);
  /* ABI 10, optional. head_gemm with A_h in bf16 (a: bf16 bits, ld_a_head in elements):
   * fp32 x times the bf16 weights, summed in fp32. A backend may round x to bf16 too where
   * it runs a call on bf16 tensor cores (CUDA: more than a few tokens; ops_cuda.h). */
  epic_status (*head_gemm_bf16)(epic_ops *o, const float *x, int64_t ld_x_tok,
                                int64_t ld_x_head, int64_t m, int64_t n_heads,
                                const uint16_t *a, int64_t ld_a_head, int64_t k, int64_t n,
                                int trans, float *y, int64_t ld_y_tok, int64_t ld_y_head);

  /* ABI 12, optional (NULL: only a backend in host memory is). 1 when, at the backend's
   * current settings and for KV caches created now, every op computes a row (token, query,
   * group row) the same way bit for bit whatever other rows share its call: matmul,
   * grouped_matmul*, head_gemm and the absorbed MLA decode included. */
  int (*rows_invariant)(epic_ops *o);

  /* ABI 13. Seeded draws in place of greedy picks: for each row i of x [m][n] (row stride
   * n) whose p[i].temperature > 0, ids[i] = the token epic_draw_row draws from the row
   * with p[i] (kernels/draw.h: every backend draws the same token from the same row bits)
   * and logprob[i] = x[i][ids[i]] - lse_i in double, lse_i = x[i][id] - logprob[i] from
   * the row's greedy pick, which ids / logprob hold on entry (row_pick ran on x first);
   * rows with temperature 0 keep their pick. p (checked by the caller), ids and logprob
   * live in backend memory. A GPU backend then samples without downloading the row. */
  epic_status (*row_draw)(epic_ops *o, const float *x, int64_t m, int64_t n,
                          const epic_draw_params *p, int32_t *ids, float *logprob);
} epic_ops_vt;

/* Backends embed this struct first. */
struct epic_ops {
  const epic_ops_vt *vt;
};

/* The CPU backend's matmul sums each output row in one fixed order for calls of
 * up to this many rows (a fused kernel; larger calls go to sgemm, which orders
 * the sums differently): callers that need a row's result independent of the
 * rows beside it (worker/model.c's expert groups) split calls to this size. */
#define EPIC_OPS_CPU_FIXED_ORDER_ROWS 8

/* Create the CPU backend. n_threads <= 0: OpenMP default. */
epic_status epic_ops_cpu_create(int n_threads, epic_ops **out);
#ifdef EPIC_HAVE_CUDA
/* Create the CUDA backend on `device` (built when EPIC_CUDA is enabled; the CUDA-only
 * controls and its pointer conventions are in kernels/cuda/ops_cuda.h).
 * EPIC_ERR_UNSUPPORTED when no usable GPU is present, EPIC_ERR_CUDA on other failures. */
epic_status epic_ops_cuda_create(int device, epic_ops **out);
#endif
/* NULL-safe. */
void epic_ops_destroy(epic_ops *o);
/* The latent-cache element type o wants (its kv_dtype); backends before ABI 5 have no such
 * slot and keep fp32 rows. Callers sizing caches check epic_kv_dtype_size() != 0. */
epic_kv_dtype epic_ops_kv_dtype(epic_ops *o);

/* Whether the backend has the ABI 10 head_gemm_bf16. */
int epic_ops_has_head_bf16(epic_ops *o);

/* The element type o wants head_gemm's weights in (ABI 10 head_dtype): EPIC_DT_BF16 only
 * where head_gemm_bf16 exists; EPIC_DT_F32 otherwise. */
epic_dtype epic_ops_head_dtype(epic_ops *o);

/* Whether the backend has the ABI 6 device-side expert plan (moe_plan and
 * grouped_matmul_dev). */
int epic_ops_has_moe_plan(epic_ops *o);

/* Whether the backend records graphs (ABI 7 graph_begin ... graph_epoch). */
int epic_ops_has_graphs(epic_ops *o);

/* Whether the backend draws sampled tokens itself (ABI 13 row_draw). */
int epic_ops_has_row_draw(epic_ops *o);

/* Whether the backend multiplies gathered rows itself (ABI 8 grouped_matmul_rows). */
int epic_ops_has_grouped_rows(epic_ops *o);

/* The backend's queue for device-buffer exchanges (ABI 8 queue, with upload_async), or
 * NULL where the host must wait instead. */
void *epic_ops_queue(epic_ops *o);

/* Whether p is a router route() can run (experts split evenly into at most 1024 groups,
 * enough experts in the kept groups for top_k); logs what is wrong otherwise. Both
 * backends check their arguments with it. */
int epic_router_params_ok(const epic_router_params *p);

/* grouped_matmul_dev's offsets (host memory, n_groups + 1) as grouped_matmul's host
 * offsets in out, checked against its contract (ascending, ending at rows, no group above
 * max_rows; logged, naming the group). */
epic_status epic_ops_group_offsets(const int32_t *off, int64_t n_groups, int64_t rows,
                                   int64_t max_rows, int64_t *out);
/* 1 when o computes each row of a call the same way whatever other rows share it (the
 * batch shape, an expert's group): the CPU backend's fixed-order kernels, and a backend
 * whose ABI 12 rows_invariant says so (CUDA in its exact and invariant precisions).
 * CUDA's fast path switches kernels and rounding with the row count in its dense matmuls
 * and attention (kernels/cuda/ops_cuda.h). MTP drafting, which must keep greedy outputs
 * unchanged, is on by default only where it holds. */
int epic_ops_rows_invariant(epic_ops *o);

/* 1 when o's grouped matmuls over weights of w's layout compute a row alike whatever
 * group it lands in (ABI 9 grouped_invariant, or rows-invariant as a whole): then
 * splitting an expert's rows over copies on other ranks (EPLB) leaves every output as it
 * was, and EPLB copies are on by default. */
int epic_ops_experts_invariant(epic_ops *o, const epic_weight *w);

/* Tokens per forward step at which o runs near its best rate: the default step budget of
 * the engine (chunked prefill) and of the plan's activation reserve. Device backends:
 * 8192 (about 256 rows per expert in an MoE layer, where the expert GEMMs leave their
 * memory-bound regime; one H200, DeepSeek-V3 layers: prefill 1.8x the rate of 2048-token
 * steps, bench/README.md). Host backends: 2048, the budget the engine always had there.
 * Larger steps trade time per output token while prompts are prefilled (a decoding
 * sequence shares the step with up to that many prompt tokens) for throughput and time
 * to first token; --step-tokens sets it. */
int64_t epic_ops_step_tokens(epic_ops *o);
/* The device backends' value of epic_ops_step_tokens: what `epic plan` (which plans GPU
 * memory without a backend) reserves for by default. */
#define EPIC_OPS_DEVICE_STEP_TOKENS 8192

#endif
