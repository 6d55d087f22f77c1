/* KV page bookkeeping with a prefix cache: which pages of one worker's KV cache
 * are free, how many sequences use each, and which hold a cached prompt prefix.
 * No memory of its own beyond ids: epic_kvcache uses one for its pools, and the
 * coordinator keeps one mirror per worker (coordinator/scheduler.c). Both apply
 * the same calls in the same order (rank 0 derives them from the step plan it
 * issues, the worker from the plan it runs), so both always agree on every page
 * id without any message beyond the plan.
 *
 * Prefix cache. A page completely filled by prompt tokens can be published under
 * a key = hash(key of the previous page of the sequence, the page's token ids);
 * the first page chains from a fixed seed. A later sequence whose prompt starts
 * with the same tokens references those pages instead of computing them (their
 * rows are exactly what its own prefill would write: same positions, same
 * tokens). Cached pages are never written: a sequence that reuses k pages
 * starts computing at row k * page_size. Matching verifies the stored token ids
 * (a hash collision is a miss). A published page stays in the index while any
 * sequence references it; once unreferenced it joins an LRU list of idle pages
 * that allocation evicts from (least recently used first) when the free list is
 * empty, and that holds at most cache_pages pages (the memory budget). Since a
 * sequence that holds a page holds every page before it, a page's predecessor
 * leaves the LRU list after it: a chain is evicted from its end.
 *
 * Ownership: the table owns its arrays; page ids are plain ints.
 * Thread contract: thread-compatible (one thread per table). */
#ifndef EPIC_WORKER_KVPAGES_H
#define EPIC_WORKER_KVPAGES_H

#include <stddef.h>
#include <stdint.h>

#include "../common/status.h"

typedef struct epic_kvpages epic_kvpages;

typedef struct epic_kvpages_params {
  size_t size;         /* sizeof(epic_kvpages_params) */
  int64_t n_pages;     /* pages, 1 .. INT32_MAX */
  int64_t page_size;   /* tokens per page, >= 1 */
  int64_t cache_pages; /* most idle cached pages kept (the budget); 0 = no prefix cache */
} epic_kvpages_params;

/* EPIC_ERR_INVALID (logged) for bad params, EPIC_ERR_NOMEM. */
epic_status epic_kvpages_create(const epic_kvpages_params *p, epic_kvpages **out);
void epic_kvpages_destroy(epic_kvpages *pg); /* NULL-safe */
/* Change the budget; only while no page is referenced or cached (EPIC_ERR_INVALID
 * otherwise). cache_pages < 0 counts as 0. */
epic_status epic_kvpages_set_cache(epic_kvpages *pg, int64_t cache_pages);

int64_t epic_kvpages_total(const epic_kvpages *pg);
int64_t epic_kvpages_page_size(const epic_kvpages *pg);
int64_t epic_kvpages_budget(const epic_kvpages *pg); /* cache_pages */
/* Pages an allocation can take: free ones plus idle cached ones. */
int64_t epic_kvpages_available(const epic_kvpages *pg);
int64_t epic_kvpages_idle(const epic_kvpages *pg);   /* cached and unreferenced */
int64_t epic_kvpages_cached(const epic_kvpages *pg); /* in the index (referenced or not) */
int64_t epic_kvpages_evictions(const epic_kvpages *pg); /* idle pages reused or dropped so far */
int32_t epic_kvpages_refs(const epic_kvpages *pg, int32_t page);
int epic_kvpages_is_cached(const epic_kvpages *pg, int32_t page);

/* Take n pages (one reference each) into out[0..n): free pages first (page 0
 * first on a fresh table), then idle cached pages from the LRU end, which leave
 * the index. All or nothing: EPIC_ERR_NOMEM when fewer than n are available. */
epic_status epic_kvpages_alloc(epic_kvpages *pg, int64_t n, int32_t *out);
/* One more reference to a cached page (a prefix hit); it leaves the LRU list. */
void epic_kvpages_ref(epic_kvpages *pg, int32_t page);
/* Drop one reference. At zero a cached page becomes the most recently used idle
 * page (the least recent ones beyond the budget are dropped to the free list);
 * an uncached page goes back to the free list. */
void epic_kvpages_unref(epic_kvpages *pg, int32_t page);

/* Publish referenced page `page`, whose rows hold the page_size prompt tokens
 * `tokens`, following `parent` (the sequence's previous page, which must be
 * cached; -1 for a sequence's first page). Returns 1 when published, 0 when not
 * (cache off, page already cached, parent not cached, or another page holds the
 * key already: the caller's later pages then stay private). */
int epic_kvpages_publish(epic_kvpages *pg, int32_t page, int32_t parent, const int32_t *tokens);
/* Longest cached chain matching the full pages of tokens[0 .. max_pages * page_size):
 * its length, and its page ids in out[0..len) when out is not NULL. Takes no
 * reference. Token ids are compared, so a hash collision ends the match. */
int64_t epic_kvpages_match(const epic_kvpages *pg, const int32_t *tokens, int64_t max_pages,
                           int32_t *out);
/* The n pages of the cached chain that ends at `last`, first page first, into
 * out[0..n); its key must be `key`. EPIC_ERR_INVALID (logged) when last is not
 * a cached page with that key or its chain is not n pages long (the caller's
 * view of this table has diverged). Takes no reference. */
epic_status epic_kvpages_chain(const epic_kvpages *pg, int32_t last, uint64_t key, int64_t n,
                               int32_t *out);
uint64_t epic_kvpages_key(const epic_kvpages *pg, int32_t page); /* 0 when not cached */

#endif
