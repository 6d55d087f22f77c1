#include "kvpages.h"

#include <stdlib.h>
#include <string.h>

#include "../common/log.h"

#define ROOT_KEY 0x9e3779b97f4a7c15ull

struct epic_kvpages {
  int64_t n, ps, budget;
  int32_t *free_ids; /* stack; top = next page handed out */
  int64_t n_free;
  int32_t *ref, *parent;
  uint8_t *cached;
  uint64_t *key;
  int32_t *tok; /* [n][ps] token ids of cached pages (only with a budget) */
  /* Index: chained hash of cached pages by key. */
  int32_t *head, *hnext;
  size_t hmask;
  /* LRU of idle cached pages: lru_head = most recent, lru_tail = next to go. */
  int32_t *lprev, *lnext;
  int32_t lru_head, lru_tail;
  int64_t n_idle, n_cached, evictions;
};

static uint64_t mix(uint64_t x) { /* splitmix64 finaliser */
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

static uint64_t page_key(uint64_t parent_key, const int32_t *tok, int64_t ps) {
  uint64_t h = mix(parent_key ^ 0x51ed270b27a6c5d1ull);
  for (int64_t i = 0; i < ps; i++)
    h = mix(h ^ ((uint64_t)(uint32_t)tok[i] + 0x632be59bd9b4e019ull * (uint64_t)(i + 1)));
  return h;
}

static void free_arrays(epic_kvpages *pg) {
  free(pg->tok);
  free(pg->head);
  free(pg->hnext);
  free(pg->lprev);
  free(pg->lnext);
  pg->tok = NULL;
  pg->head = pg->hnext = pg->lprev = pg->lnext = NULL;
}

/* Index and LRU arrays, only when the cache is on. */
static epic_status cache_arrays(epic_kvpages *pg) {
  size_t cap = 16;
  while (cap < 2 * (size_t)pg->n)
    cap *= 2;
  pg->tok = malloc((size_t)pg->n * (size_t)pg->ps * sizeof *pg->tok);
  pg->head = malloc(cap * sizeof *pg->head);
  pg->hnext = malloc((size_t)pg->n * sizeof *pg->hnext);
  pg->lprev = malloc((size_t)pg->n * sizeof *pg->lprev);
  pg->lnext = malloc((size_t)pg->n * sizeof *pg->lnext);
  if (!pg->tok || !pg->head || !pg->hnext || !pg->lprev || !pg->lnext) {
    free_arrays(pg);
    return EPIC_ERR_NOMEM;
  }
  memset(pg->head, 0xff, cap * sizeof *pg->head); /* -1 */
  pg->hmask = cap - 1;
  pg->lru_head = pg->lru_tail = -1;
  return EPIC_OK;
}

epic_status epic_kvpages_create(const epic_kvpages_params *p, epic_kvpages **out) {
  epic_kvpages *pg;
  *out = NULL;
  if (!p || p->size != sizeof *p || p->n_pages < 1 || p->n_pages > INT32_MAX || p->page_size < 1 ||
      p->page_size > (1 << 24)) {
    EPIC_LOG_ERROR("kv pages: invalid parameters (n_pages, page_size)");
    return EPIC_ERR_INVALID;
  }
  pg = calloc(1, sizeof *pg);
  if (!pg)
    return EPIC_ERR_NOMEM;
  pg->n = p->n_pages;
  pg->ps = p->page_size;
  pg->free_ids = malloc((size_t)pg->n * sizeof *pg->free_ids);
  pg->ref = calloc((size_t)pg->n, sizeof *pg->ref);
  pg->parent = malloc((size_t)pg->n * sizeof *pg->parent);
  pg->cached = calloc((size_t)pg->n, 1);
  pg->key = calloc((size_t)pg->n, sizeof *pg->key);
  if (!pg->free_ids || !pg->ref || !pg->parent || !pg->cached || !pg->key) {
    epic_kvpages_destroy(pg);
    return EPIC_ERR_NOMEM;
  }
  /* Stack ordered so that page 0 is handed out first (deterministic layouts). */
  for (int64_t i = 0; i < pg->n; i++)
    pg->free_ids[i] = (int32_t)(pg->n - 1 - i);
  pg->n_free = pg->n;
  if (epic_kvpages_set_cache(pg, p->cache_pages) != EPIC_OK) {
    epic_kvpages_destroy(pg);
    return EPIC_ERR_NOMEM;
  }
  *out = pg;
  return EPIC_OK;
}

void epic_kvpages_destroy(epic_kvpages *pg) {
  if (!pg)
    return;
  free_arrays(pg);
  free(pg->free_ids);
  free(pg->ref);
  free(pg->parent);
  free(pg->cached);
  free(pg->key);
  free(pg);
}

epic_status epic_kvpages_set_cache(epic_kvpages *pg, int64_t cache_pages) {
  if (pg->n_free != pg->n) {
    EPIC_LOG_ERROR("kv pages: the prefix cache budget changes only while no page is in use");
    return EPIC_ERR_INVALID;
  }
  if (cache_pages < 0)
    cache_pages = 0;
  if (cache_pages > pg->n)
    cache_pages = pg->n;
  if (cache_pages > 0 && !pg->head)
    EPIC_CHECK(cache_arrays(pg));
  if (cache_pages == 0)
    free_arrays(pg);
  pg->budget = cache_pages;
  return EPIC_OK;
}

int64_t epic_kvpages_total(const epic_kvpages *pg) { return pg->n; }
int64_t epic_kvpages_page_size(const epic_kvpages *pg) { return pg->ps; }
int64_t epic_kvpages_budget(const epic_kvpages *pg) { return pg->budget; }
int64_t epic_kvpages_available(const epic_kvpages *pg) { return pg->n_free + pg->n_idle; }
int64_t epic_kvpages_idle(const epic_kvpages *pg) { return pg->n_idle; }
int64_t epic_kvpages_cached(const epic_kvpages *pg) { return pg->n_cached; }
int64_t epic_kvpages_evictions(const epic_kvpages *pg) { return pg->evictions; }
int32_t epic_kvpages_refs(const epic_kvpages *pg, int32_t page) {
  return page >= 0 && page < pg->n ? pg->ref[page] : 0;
}
int epic_kvpages_is_cached(const epic_kvpages *pg, int32_t page) {
  return page >= 0 && page < pg->n && pg->cached[page];
}
uint64_t epic_kvpages_key(const epic_kvpages *pg, int32_t page) {
  return epic_kvpages_is_cached(pg, page) ? pg->key[page] : 0;
}

static void lru_unlink(epic_kvpages *pg, int32_t p) {
  if (pg->lprev[p] >= 0)
    pg->lnext[pg->lprev[p]] = pg->lnext[p];
  else
    pg->lru_head = pg->lnext[p];
  if (pg->lnext[p] >= 0)
    pg->lprev[pg->lnext[p]] = pg->lprev[p];
  else
    pg->lru_tail = pg->lprev[p];
  pg->n_idle--;
}

static void lru_push_head(epic_kvpages *pg, int32_t p) {
  pg->lprev[p] = -1;
  pg->lnext[p] = pg->lru_head;
  if (pg->lru_head >= 0)
    pg->lprev[pg->lru_head] = p;
  else
    pg->lru_tail = p;
  pg->lru_head = p;
  pg->n_idle++;
}

static int32_t find_key(const epic_kvpages *pg, uint64_t key) {
  int32_t p = pg->head[mix(key) & pg->hmask];
  while (p >= 0 && pg->key[p] != key)
    p = pg->hnext[p];
  return p;
}

static void unindex(epic_kvpages *pg, int32_t p) {
  int32_t *link = &pg->head[mix(pg->key[p]) & pg->hmask];
  while (*link != p)
    link = &pg->hnext[*link];
  *link = pg->hnext[p];
  pg->cached[p] = 0;
  pg->key[p] = 0;
  pg->n_cached--;
}

/* The least recently used idle page leaves the cache for the free list. */
static void evict_one(epic_kvpages *pg) {
  int32_t p = pg->lru_tail;
  lru_unlink(pg, p);
  unindex(pg, p);
  pg->free_ids[pg->n_free++] = p;
  pg->evictions++;
}

epic_status epic_kvpages_alloc(epic_kvpages *pg, int64_t n, int32_t *out) {
  if (n < 0 || n > pg->n_free + pg->n_idle)
    return EPIC_ERR_NOMEM;
  for (int64_t i = 0; i < n; i++) {
    if (pg->n_free == 0)
      evict_one(pg);
    int32_t p = pg->free_ids[--pg->n_free];
    pg->ref[p] = 1;
    out[i] = p;
  }
  return EPIC_OK;
}

void epic_kvpages_ref(epic_kvpages *pg, int32_t page) {
  if (pg->ref[page]++ == 0 && pg->cached[page])
    lru_unlink(pg, page);
}

void epic_kvpages_unref(epic_kvpages *pg, int32_t page) {
  if (pg->ref[page] <= 0 || --pg->ref[page] > 0)
    return;
  if (!pg->cached[page]) {
    pg->free_ids[pg->n_free++] = page;
    return;
  }
  lru_push_head(pg, page);
  while (pg->n_idle > pg->budget)
    evict_one(pg);
}

int epic_kvpages_publish(epic_kvpages *pg, int32_t page, int32_t parent, const int32_t *tokens) {
  if (pg->budget == 0 || page < 0 || page >= pg->n || pg->cached[page] || pg->ref[page] < 1 ||
      (parent >= 0 && (parent >= pg->n || !pg->cached[parent])))
    return 0;
  uint64_t key = page_key(parent >= 0 ? pg->key[parent] : ROOT_KEY, tokens, pg->ps);
  if (find_key(pg, key) >= 0)
    return 0;
  size_t b = mix(key) & pg->hmask;
  pg->key[page] = key;
  pg->parent[page] = parent;
  pg->cached[page] = 1;
  memcpy(pg->tok + (size_t)page * (size_t)pg->ps, tokens, (size_t)pg->ps * sizeof *tokens);
  pg->hnext[page] = pg->head[b];
  pg->head[b] = page;
  pg->n_cached++;
  return 1;
}

int64_t epic_kvpages_match(const epic_kvpages *pg, const int32_t *tokens, int64_t max_pages,
                           int32_t *out) {
  uint64_t key = ROOT_KEY;
  int32_t prev = -1;
  int64_t k = 0;
  if (pg->budget == 0)
    return 0;
  for (; k < max_pages; k++) {
    const int32_t *t = tokens + k * pg->ps;
    key = page_key(key, t, pg->ps);
    int32_t p = find_key(pg, key);
    if (p < 0 || pg->parent[p] != prev ||
        memcmp(pg->tok + (size_t)p * (size_t)pg->ps, t, (size_t)pg->ps * sizeof *t) != 0)
      break;
    if (out)
      out[k] = p;
    prev = p;
  }
  return k;
}

epic_status epic_kvpages_chain(const epic_kvpages *pg, int32_t last, uint64_t key, int64_t n,
                               int32_t *out) {
  int32_t p = last;
  if (n < 1 || !epic_kvpages_is_cached(pg, last) || pg->key[last] != key)
    goto bad;
  for (int64_t i = n - 1; i >= 0; i--) { /* check before writing: out is untouched on error */
    if (p < 0 || !pg->cached[p])
      goto bad;
    p = pg->parent[p];
  }
  if (p != -1)
    goto bad;
  p = last;
  for (int64_t i = n - 1; i >= 0; i--) {
    out[i] = p;
    p = pg->parent[p];
  }
  return EPIC_OK;
bad:
  EPIC_LOG_ERROR("kv pages: no cached prefix of %lld pages ends at page %d (key %016llx)",
                 (long long)n, (int)last, (unsigned long long)key);
  return EPIC_ERR_INVALID;
}
