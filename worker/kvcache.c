#include "kvcache.h"

#include <stdlib.h>
#include <string.h>

#include "../common/log.h"

struct epic_kvcache {
  epic_ops *ops;
  epic_kvcache_params p;
  int64_t width;
  epic_kv_dtype dtype;
  void **pools; /* [n_layers] */
  epic_kvpages *pg;
};

size_t epic_kvcache_bytes(const epic_kvcache_params *p, epic_kv_dtype dt) {
  return (size_t)p->n_layers * (size_t)p->n_pages * (size_t)p->page_size *
         (size_t)(p->lora + p->rope) * epic_kv_dtype_size(dt);
}

epic_kv_dtype epic_kvcache_dtype(const epic_kvcache *kc) { return kc->dtype; }

epic_status epic_kvcache_create(epic_ops *ops, const epic_kvcache_params *p, epic_kvcache **out) {
  epic_kvcache *kc;
  epic_status st = EPIC_ERR_NOMEM;
  *out = NULL;
  if (!p || p->size != sizeof *p || p->n_layers < 1 || p->lora < 1 || p->rope < 0 ||
      p->page_size < 1 || p->n_pages < 1 || p->n_pages > INT32_MAX) {
    EPIC_LOG_ERROR("kv cache: invalid parameters");
    return EPIC_ERR_INVALID;
  }
  kc = calloc(1, sizeof *kc);
  if (!kc) return EPIC_ERR_NOMEM;
  kc->ops = ops;
  kc->p = *p;
  kc->width = p->lora + p->rope;
  kc->dtype = epic_ops_kv_dtype(ops);
  if (epic_kv_dtype_size(kc->dtype) == 0) {
    EPIC_LOG_ERROR("kv cache: backend %s asks for unknown element type %d", ops->vt->name,
                   (int)kc->dtype);
    free(kc);
    return EPIC_ERR_UNSUPPORTED;
  }
  kc->pools = calloc((size_t)p->n_layers, sizeof *kc->pools);
  if (!kc->pools) goto fail;
  {
    epic_kvpages_params pp = {.size = sizeof pp, .n_pages = p->n_pages, .page_size = p->page_size};
    EPIC_CHECK_GOTO(epic_kvpages_create(&pp, &kc->pg), st, fail);
  }
  for (int64_t l = 0; l < p->n_layers; l++) {
    size_t bytes = (size_t)p->n_pages * (size_t)p->page_size * (size_t)kc->width *
                   epic_kv_dtype_size(kc->dtype);
    EPIC_CHECK_GOTO(ops->vt->alloc(ops, bytes, &kc->pools[l]), st, fail);
  }
  *out = kc;
  return EPIC_OK;
fail:
  EPIC_LOG_ERROR("kv cache: cannot allocate %zu bytes", epic_kvcache_bytes(p, kc->dtype));
  epic_kvcache_destroy(kc);
  return st;
}

void epic_kvcache_destroy(epic_kvcache *kc) {
  if (!kc) return;
  if (kc->pools)
    for (int64_t l = 0; l < kc->p.n_layers; l++) kc->ops->vt->free(kc->ops, kc->pools[l]);
  free(kc->pools);
  epic_kvpages_destroy(kc->pg);
  free(kc);
}

int64_t epic_kvcache_pages_for(const epic_kvcache *kc, int64_t n_tokens) {
  return (n_tokens + kc->p.page_size - 1) / kc->p.page_size;
}

int64_t epic_kvcache_free_pages(const epic_kvcache *kc) { return epic_kvpages_available(kc->pg); }
int64_t epic_kvcache_total_pages(const epic_kvcache *kc) { return kc->p.n_pages; }
const epic_kvpages *epic_kvcache_pages(const epic_kvcache *kc) { return kc->pg; }

epic_status epic_kvcache_set_prefix_cache(epic_kvcache *kc, int64_t cache_pages) {
  return epic_kvpages_set_cache(kc->pg, cache_pages);
}

static epic_status grow_table(epic_kv_seq *s, int64_t need) {
  if (need > s->cap) {
    int64_t cap = s->cap ? s->cap : 8;
    while (cap < need) cap *= 2;
    int32_t *np = realloc(s->pages, (size_t)cap * sizeof *np);
    if (!np) return EPIC_ERR_NOMEM;
    s->pages = np;
    s->cap = cap;
  }
  return EPIC_OK;
}

epic_status epic_kvcache_seq_reserve(epic_kvcache *kc, epic_kv_seq *s, int64_t n_tokens) {
  int64_t need = epic_kvcache_pages_for(kc, n_tokens);
  if (need <= s->n_pages) return EPIC_OK;
  if (need - s->n_pages > epic_kvpages_available(kc->pg)) return EPIC_ERR_NOMEM;
  EPIC_CHECK(grow_table(s, need));
  EPIC_CHECK(epic_kvpages_alloc(kc->pg, need - s->n_pages, s->pages + s->n_pages));
  s->n_pages = need;
  return EPIC_OK;
}

epic_status epic_kvcache_seq_attach(epic_kvcache *kc, epic_kv_seq *s, int32_t last, uint64_t key,
                                    int64_t n_pages) {
  if (s->n_pages != 0 || s->n_tokens != 0) {
    EPIC_LOG_ERROR("kv cache: a cached prefix can only start an empty sequence");
    return EPIC_ERR_INVALID;
  }
  EPIC_CHECK(grow_table(s, n_pages));
  EPIC_CHECK(epic_kvpages_chain(kc->pg, last, key, n_pages, s->pages));
  for (int64_t i = 0; i < n_pages; i++) epic_kvpages_ref(kc->pg, s->pages[i]);
  s->n_pages = n_pages;
  s->n_tokens = n_pages * kc->p.page_size;
  s->n_chain = n_pages;
  return EPIC_OK;
}

epic_status epic_kvcache_seq_publish(epic_kvcache *kc, epic_kv_seq *s, int64_t start,
                                     const int32_t *tokens, int64_t n) {
  const int64_t ps = kc->p.page_size;
  if (s->chain_end || epic_kvpages_budget(kc->pg) == 0) return EPIC_OK;
  /* Chunks arrive in order right after the chain's cached pages. */
  if (start != s->n_chain * ps + s->n_partial) {
    s->chain_end = 1;
    return EPIC_OK;
  }
  if (!s->partial && !(s->partial = malloc((size_t)ps * sizeof *s->partial))) return EPIC_ERR_NOMEM;
  while (n > 0) {
    int64_t take = ps - s->n_partial < n ? ps - s->n_partial : n;
    memcpy(s->partial + s->n_partial, tokens, (size_t)take * sizeof *tokens);
    s->n_partial += take;
    tokens += take;
    n -= take;
    if (s->n_partial < ps) break;
    if (s->n_chain >= s->n_pages ||
        !epic_kvpages_publish(kc->pg, s->pages[s->n_chain],
                              s->n_chain ? s->pages[s->n_chain - 1] : -1, s->partial)) {
      s->chain_end = 1;
      break;
    }
    s->n_chain++;
    s->n_partial = 0;
  }
  return EPIC_OK;
}

void epic_kvcache_seq_truncate(epic_kvcache *kc, epic_kv_seq *s, int64_t n) {
  int64_t keep = epic_kvcache_pages_for(kc, n);
  if (n < s->n_tokens) s->n_tokens = n;
  /* From the end: a chain's later pages become idle before its earlier ones,
   * so the LRU order evicts a chain from its end (kvpages.h). */
  while (s->n_pages > keep) epic_kvpages_unref(kc->pg, s->pages[--s->n_pages]);
  if (s->n_chain > s->n_pages) {
    s->n_chain = s->n_pages;
    s->chain_end = 1;
  }
}

void epic_kvcache_seq_release(epic_kvcache *kc, epic_kv_seq *s) {
  if (!s) return;
  epic_kvcache_seq_truncate(kc, s, 0);
  free(s->pages);
  free(s->partial);
  memset(s, 0, sizeof *s);
}

epic_kv_view epic_kvcache_view(const epic_kvcache *kc, int64_t layer, const epic_kv_seq *s,
                               int64_t n_ctx) {
  epic_kv_view v = {.pool = kc->pools[layer],
                    .page_size = kc->p.page_size,
                    .width = kc->width,
                    .lora = kc->p.lora,
                    .block_table = s->pages,
                    .n_ctx = n_ctx,
                    .dtype = kc->dtype};
  return v;
}
