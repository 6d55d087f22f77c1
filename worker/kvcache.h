/* Paged latent KV cache (MLA, DESIGN §3): per layer, a pool of fixed-size pages;
 * each token row holds the kv_a_layernorm'd latent (kv_lora_rank values) and the
 * roped shared key (qk_rope_head_dim values), as elements of the type the backend's
 * kv_dtype names when the cache is created (fp32 on the CPU and in CUDA's exact mode,
 * bf16 in CUDA's fast mode: half the bytes). Every view handed out carries that type,
 * and so must any epic_kv_batch built from one. A sequence owns a list of page ids
 * that is the same for every layer of the cache, so one allocation serves all
 * layers. The memory lives on the epic_ops device that created the cache.
 * Page ids come from an epic_kvpages table (worker/kvpages.h), which also holds
 * the prefix cache: full prompt pages published by sequences and shared, never
 * written again, by later sequences with the same prompt prefix.
 * Thread contract: thread-compatible; one thread (the step executor) uses it. */
#ifndef EPIC_WORKER_KVCACHE_H
#define EPIC_WORKER_KVCACHE_H

#include <stddef.h>
#include <stdint.h>

#include "../common/status.h"
#include "../kernels/ops.h"
#include "kvpages.h"

typedef struct epic_kvcache epic_kvcache;

/* A sequence's pages. Zero-initialise before first use ({0}); release with
 * epic_kvcache_seq_release. n_tokens counts rows holding valid keys. The rest
 * is the prefix cache's state of the sequence (epic_kvcache_seq_publish). */
typedef struct epic_kv_seq {
  int32_t *pages;
  int64_t n_pages, cap;
  int64_t n_tokens;
  int32_t *partial;  /* prompt tokens of the page being filled (page_size) */
  int64_t n_chain;   /* leading pages that are cached (shared or published) */
  int64_t n_partial; /* tokens in partial */
  int chain_end;     /* a page could not be published: publish no more */
} epic_kv_seq;

typedef struct epic_kvcache_params {
  size_t size;         /* sizeof(epic_kvcache_params) */
  int64_t n_layers;    /* pools (one per attention layer this cache serves) */
  int64_t lora;        /* kv_lora_rank */
  int64_t rope;        /* qk_rope_head_dim */
  int64_t page_size;   /* tokens per page (>= 1) */
  int64_t n_pages;     /* pages per layer */
} epic_kvcache_params;

/* ops is borrowed and must outlive the cache; its kv_dtype picks the element type.
 * EPIC_ERR_NOMEM if the pools do not fit, EPIC_ERR_UNSUPPORTED if the backend names an
 * unknown element type. */
epic_status epic_kvcache_create(epic_ops *ops, const epic_kvcache_params *p, epic_kvcache **out);
void epic_kvcache_destroy(epic_kvcache *kc); /* NULL-safe; sequences must be released first */

/* Pages per layer needed to hold n tokens; bytes of the whole cache for params p with
 * elements of type dt (epic_kvcache_dtype of a created cache, or the backend's kv_dtype). */
int64_t epic_kvcache_pages_for(const epic_kvcache *kc, int64_t n_tokens);
size_t epic_kvcache_bytes(const epic_kvcache_params *p, epic_kv_dtype dt);
/* Element type of the pools (fixed at create). */
epic_kv_dtype epic_kvcache_dtype(const epic_kvcache *kc);
/* Pages an allocation can take (free + idle cached ones). */
int64_t epic_kvcache_free_pages(const epic_kvcache *kc);
int64_t epic_kvcache_total_pages(const epic_kvcache *kc);
/* The page table (borrowed; for statistics and tests). */
const epic_kvpages *epic_kvcache_pages(const epic_kvcache *kc);
/* Turn the prefix cache on with a budget of cache_pages idle pages (0 = off).
 * Only while no sequence holds pages (EPIC_ERR_INVALID otherwise). */
epic_status epic_kvcache_set_prefix_cache(epic_kvcache *kc, int64_t cache_pages);

/* Make room for n_tokens rows in total (allocating pages); EPIC_ERR_NOMEM when the
 * cache is full (nothing allocated then). Does not change s->n_tokens. */
epic_status epic_kvcache_seq_reserve(epic_kvcache *kc, epic_kv_seq *s, int64_t n_tokens);
/* Start empty sequence s with the n_pages cached pages of the chain ending at
 * page `last` with key `key` (epic_kvpages_chain; one reference each): rows
 * [0, n_pages * page_size) are valid at once. EPIC_ERR_INVALID (logged) when
 * the chain is not there, EPIC_ERR_NOMEM; s is unchanged on error. */
epic_status epic_kvcache_seq_attach(epic_kvcache *kc, epic_kv_seq *s, int32_t last, uint64_t key,
                                    int64_t n_pages);
/* Prompt tokens tokens[0..n) were just written at rows [start, start + n):
 * publish every page they complete to the prefix cache (while the sequence's
 * earlier pages are all cached). Call with the prompt's chunks in order and
 * never with generated tokens. EPIC_ERR_NOMEM. */
epic_status epic_kvcache_seq_publish(epic_kvcache *kc, epic_kv_seq *s, int64_t start,
                                     const int32_t *tokens, int64_t n);
/* Forget rows >= n (speculative-decoding rollback); frees pages no longer needed. */
void epic_kvcache_seq_truncate(epic_kvcache *kc, epic_kv_seq *s, int64_t n);
/* Return every page and reset s to empty. NULL-safe on s. */
void epic_kvcache_seq_release(epic_kvcache *kc, epic_kv_seq *s);

/* View of layer `layer` for sequence s with n_ctx valid rows (for epic_ops). */
epic_kv_view epic_kvcache_view(const epic_kvcache *kc, int64_t layer, const epic_kv_seq *s,
                               int64_t n_ctx);

#endif
