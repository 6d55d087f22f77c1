#include "kvcache.h"

#include <stdlib.h>
#include <string.h>

#include "../common/log.h"

struct epic_kvcache {
  epic_ops *ops;
  epic_kvcache_params p;
  int64_t width;
  float **pools;     /* [n_layers] */
  int32_t *free_ids; /* stack of free page ids */
  int64_t n_free;
};

size_t epic_kvcache_bytes(const epic_kvcache_params *p) {
  return (size_t)p->n_layers * (size_t)p->n_pages * (size_t)p->page_size *
         (size_t)(p->lora + p->rope) * sizeof(float);
}

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
  kc->pools = calloc((size_t)p->n_layers, sizeof *kc->pools);
  kc->free_ids = malloc((size_t)p->n_pages * sizeof *kc->free_ids);
  if (!kc->pools || !kc->free_ids) goto fail;
  for (int64_t l = 0; l < p->n_layers; l++) {
    size_t bytes = (size_t)p->n_pages * (size_t)p->page_size * (size_t)kc->width * sizeof(float);
    EPIC_CHECK_GOTO(ops->vt->alloc(ops, bytes, (void **)&kc->pools[l]), st, fail);
  }
  /* Stack ordered so that page 0 is handed out first (deterministic layouts). */
  for (int64_t i = 0; i < p->n_pages; i++) kc->free_ids[i] = (int32_t)(p->n_pages - 1 - i);
  kc->n_free = p->n_pages;
  *out = kc;
  return EPIC_OK;
fail:
  EPIC_LOG_ERROR("kv cache: cannot allocate %zu bytes", epic_kvcache_bytes(p));
  epic_kvcache_destroy(kc);
  return st;
}

void epic_kvcache_destroy(epic_kvcache *kc) {
  if (!kc) return;
  if (kc->pools)
    for (int64_t l = 0; l < kc->p.n_layers; l++) kc->ops->vt->free(kc->ops, kc->pools[l]);
  free(kc->pools);
  free(kc->free_ids);
  free(kc);
}

int64_t epic_kvcache_pages_for(const epic_kvcache *kc, int64_t n_tokens) {
  return (n_tokens + kc->p.page_size - 1) / kc->p.page_size;
}

int64_t epic_kvcache_free_pages(const epic_kvcache *kc) { return kc->n_free; }
int64_t epic_kvcache_total_pages(const epic_kvcache *kc) { return kc->p.n_pages; }

epic_status epic_kvcache_seq_reserve(epic_kvcache *kc, epic_kv_seq *s, int64_t n_tokens) {
  int64_t need = epic_kvcache_pages_for(kc, n_tokens);
  if (need <= s->n_pages) return EPIC_OK;
  if (need - s->n_pages > kc->n_free) return EPIC_ERR_NOMEM;
  if (need > s->cap) {
    int64_t cap = s->cap ? s->cap : 8;
    while (cap < need) cap *= 2;
    int32_t *np = realloc(s->pages, (size_t)cap * sizeof *np);
    if (!np) return EPIC_ERR_NOMEM;
    s->pages = np;
    s->cap = cap;
  }
  while (s->n_pages < need) s->pages[s->n_pages++] = kc->free_ids[--kc->n_free];
  return EPIC_OK;
}

void epic_kvcache_seq_truncate(epic_kvcache *kc, epic_kv_seq *s, int64_t n) {
  int64_t keep = epic_kvcache_pages_for(kc, n);
  if (n < s->n_tokens) s->n_tokens = n;
  while (s->n_pages > keep) kc->free_ids[kc->n_free++] = s->pages[--s->n_pages];
}

void epic_kvcache_seq_release(epic_kvcache *kc, epic_kv_seq *s) {
  if (!s) return;
  epic_kvcache_seq_truncate(kc, s, 0);
  free(s->pages);
  memset(s, 0, sizeof *s);
}

epic_kv_view epic_kvcache_view(const epic_kvcache *kc, int64_t layer, const epic_kv_seq *s,
                               int64_t n_ctx) {
  epic_kv_view v = {.pool = kc->pools[layer],
                    .page_size = kc->p.page_size,
                    .width = kc->width,
                    .lora = kc->p.lora,
                    .block_table = s->pages,
                    .n_ctx = n_ctx};
  return v;
}
