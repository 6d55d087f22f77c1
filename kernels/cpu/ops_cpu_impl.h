/* Private to the CPU backend of epic_ops: the backend object, its per-thread
 * scratch, and the op entry points split across the kernels/cpu/ops_cpu_*.c files.
 * Thread contract: one thread drives an epic_cpu_ops at a time; each op fans out
 * internally with OpenMP (num_threads = n_threads) and OpenBLAS runs
 * single-threaded inside each OpenMP thread. */
#ifndef EPIC_KERNELS_CPU_OPS_CPU_IMPL_H
#define EPIC_KERNELS_CPU_OPS_CPU_IMPL_H

#include <stddef.h>
#include <stdint.h>

#include "../ops.h"

typedef struct epic_cpu_scratch {
  float *p;
  size_t cap;                                      /* floats */
  char pad[64 - sizeof(float *) - sizeof(size_t)]; /* one cache line per thread */
} epic_cpu_scratch;

typedef struct epic_cpu_ops {
  epic_ops base; /* first: epic_ops * <-> epic_cpu_ops * */
  int n_threads;
  epic_cpu_scratch *scratch; /* [n_threads], slot t touched only by OpenMP thread t */
  epic_cpu_scratch shared;   /* used by the driving thread outside parallel regions */
} epic_cpu_ops;

static inline epic_cpu_ops *epic_cpu_of(epic_ops *o) { return (epic_cpu_ops *)o; }

/* Thread-local scratch of at least n floats for OpenMP thread `tid` (grown, never
 * shrunk; contents not preserved). NULL on allocation failure. */
float *epic_cpu_scratch_get(epic_cpu_ops *c, int tid, size_t n);

/* Scratch shared by all threads of one op (filled before a parallel region). */
float *epic_cpu_shared_get(epic_cpu_ops *c, size_t n);

/* Dequantise rows [r0, r0+n) of w into out[n][w->cols]: the fast path, bit-identical
 * to epic_weight_rows_f32 for finite inputs. */
void epic_cpu_dequant_rows(const epic_weight *w, int64_t r0, int64_t n, float *out);

epic_status epic_cpu_matmul(epic_ops *o, const float *x, int64_t ldx, int64_t m,
                            const epic_weight *w, float *y, int64_t ldy);
epic_status epic_cpu_mla_naive(epic_ops *o, const float *q, const float *kvb, const float *kpe,
                               int64_t m, int64_t start, int64_t n_heads, int64_t nope,
                               int64_t rope, int64_t v, float scale, float *out);
epic_status epic_cpu_mla_absorbed(epic_ops *o, const epic_kv_view *kv, const float *q_abs,
                                  const float *q_pe, int64_t m, int64_t start, int64_t n_heads,
                                  float scale, float *ctx);
epic_status epic_cpu_mla_absorbed_batch(epic_ops *o, const epic_kv_batch *kv, int64_t n_seq,
                                        const float *q_abs, const float *q_pe, int64_t n_heads,
                                        float scale, float *ctx);
epic_status epic_cpu_head_gemm(epic_ops *o, const float *x, int64_t ld_x_tok, int64_t ld_x_head,
                               int64_t m, int64_t n_heads, const float *a, int64_t ld_a_head,
                               int64_t k, int64_t n, int trans, float *y, int64_t ld_y_tok,
                               int64_t ld_y_head);
epic_status epic_cpu_head_gemm_bf16(epic_ops *o, const float *x, int64_t ld_x_tok,
                                    int64_t ld_x_head, int64_t m, int64_t n_heads,
                                    const uint16_t *a, int64_t ld_a_head, int64_t k, int64_t n,
                                    int trans, float *y, int64_t ld_y_tok, int64_t ld_y_head);
epic_status epic_cpu_route(epic_ops *o, const float *logits, int64_t m, const epic_router_params *p,
                           int32_t *idx, float *weight);

/* Pointer to row t of a sequence in a paged fp32 cache (callers check the dtype first). */
static inline float *epic_cpu_kv_row(const epic_kv_view *kv, int64_t t) {
  int64_t page = kv->block_table[t / kv->page_size];
  return (float *)kv->pool + (page * kv->page_size + t % kv->page_size) * kv->width;
}

/* EPIC_OK for an fp32 cache; EPIC_ERR_UNSUPPORTED (logged, naming op) for any other
 * element type: this backend keeps fp32 caches only (its kv_dtype says F32). */
epic_status epic_cpu_kv_dtype_ok(epic_kv_dtype dt, const char *op);

#endif
