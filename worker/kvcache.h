/* Paged latent KV cache (MLA, DESIGN §3): per layer, a pool of fixed-size pages;
 * each token row holds the kv_a_layernorm'd latent (kv_lora_rank values) and the
 * roped shared key (qk_rope_head_dim values). A sequence owns a list of page ids
 * that is the same for every layer of the cache, so one allocation serves all
 * layers. The memory lives on the epic_ops device that created the cache.
 * Thread contract: thread-compatible; one thread (the step executor) uses it. */
#ifndef EPIC_WORKER_KVCACHE_H
#define EPIC_WORKER_KVCACHE_H

#include <stddef.h>
#include <stdint.h>

#include "../common/status.h"
#include "../kernels/ops.h"

typedef struct epic_kvcache epic_kvcache;

/* A sequence's pages. Zero-initialise before first use ({0}); release with
 * epic_kvcache_seq_release. n_tokens counts rows holding valid keys. */
typedef struct epic_kv_seq {
  int32_t *pages;
  int64_t n_pages, cap;
  int64_t n_tokens;
} epic_kv_seq;

typedef struct epic_kvcache_params {
  size_t size;         /* sizeof(epic_kvcache_params) */
  int64_t n_layers;    /* pools (one per attention layer this cache serves) */
  int64_t lora;        /* kv_lora_rank */
  int64_t rope;        /* qk_rope_head_dim */
  int64_t page_size;   /* tokens per page (>= 1) */
  int64_t n_pages;     /* pages per layer */
} epic_kvcache_params;

/* ops is borrowed and must outlive the cache. EPIC_ERR_NOMEM if the pools do not fit. */
epic_status epic_kvcache_create(epic_ops *ops, const epic_kvcache_params *p, epic_kvcache **out);
void epic_kvcache_destroy(epic_kvcache *kc); /* NULL-safe; sequences must be released first */

/* Pages per layer needed to hold n tokens; bytes of the whole cache for params p. */
int64_t epic_kvcache_pages_for(const epic_kvcache *kc, int64_t n_tokens);
size_t epic_kvcache_bytes(const epic_kvcache_params *p);
int64_t epic_kvcache_free_pages(const epic_kvcache *kc);
int64_t epic_kvcache_total_pages(const epic_kvcache *kc);

/* Make room for n_tokens rows in total (allocating pages); EPIC_ERR_NOMEM when the
 * cache is full (nothing allocated then). Does not change s->n_tokens. */
epic_status epic_kvcache_seq_reserve(epic_kvcache *kc, epic_kv_seq *s, int64_t n_tokens);
/* Forget rows >= n (speculative-decoding rollback); frees pages no longer needed. */
void epic_kvcache_seq_truncate(epic_kvcache *kc, epic_kv_seq *s, int64_t n);
/* Return every page and reset s to empty. NULL-safe on s. */
void epic_kvcache_seq_release(epic_kvcache *kc, epic_kv_seq *s);

/* View of layer `layer` for sequence s with n_ctx valid rows (for epic_ops). */
epic_kv_view epic_kvcache_view(const epic_kvcache *kc, int64_t layer, const epic_kv_seq *s,
                               int64_t n_ctx);

#endif
