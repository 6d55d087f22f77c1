/* Paged KV cache bookkeeping: reserve, truncate (rollback), release, full cache. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "worker/kvcache.h"

static void test_pages(void **state) {
  (void)state;
  epic_ops *ops;
  epic_kvcache *kc;
  epic_kvcache_params p = {.size = sizeof p, .n_layers = 2, .lora = 8, .rope = 4, .page_size = 4,
                           .n_pages = 5};
  epic_kv_seq a = {0}, b = {0};
  assert_int_equal(epic_ops_cpu_create(1, &ops), EPIC_OK);
  assert_int_equal(epic_kvcache_create(ops, &p, &kc), EPIC_OK);
  assert_int_equal(epic_kvcache_bytes(&p, EPIC_KV_F32), 2 * 5 * 4 * 12 * sizeof(float));
  assert_int_equal(epic_kvcache_bytes(&p, EPIC_KV_BF16), 2 * 5 * 4 * 12 * 2);
  /* the element type is the backend's choice, and every view carries it */
  assert_int_equal(epic_kvcache_dtype(kc), ops->vt->kv_dtype(ops));
  assert_int_equal(epic_kvcache_dtype(kc), EPIC_KV_F32);
  assert_int_equal(epic_kvcache_seq_reserve(kc, &a, 9), EPIC_OK); /* 3 pages */
  assert_int_equal(a.n_pages, 3);
  assert_int_equal(epic_kvcache_free_pages(kc), 2);
  assert_int_equal(epic_kvcache_seq_reserve(kc, &b, 12), EPIC_ERR_NOMEM); /* needs 3 */
  assert_int_equal(b.n_pages, 0);
  assert_int_equal(epic_kvcache_free_pages(kc), 2);
  assert_int_equal(epic_kvcache_seq_reserve(kc, &b, 8), EPIC_OK);
  a.n_tokens = 9;
  epic_kvcache_seq_truncate(kc, &a, 4); /* rollback to one page */
  assert_int_equal(a.n_tokens, 4);
  assert_int_equal(a.n_pages, 1);
  assert_int_equal(epic_kvcache_free_pages(kc), 2);
  epic_kv_view v = epic_kvcache_view(kc, 1, &a, 4);
  assert_int_equal(v.width, 12);
  assert_int_equal(v.lora, 8);
  assert_int_equal(v.dtype, epic_kvcache_dtype(kc));
  assert_ptr_equal(v.block_table, a.pages);
  epic_kvcache_seq_release(kc, &a);
  epic_kvcache_seq_release(kc, &b);
  assert_int_equal(epic_kvcache_free_pages(kc), 5);
  epic_kvcache_destroy(kc);
  p.page_size = 0;
  assert_int_equal(epic_kvcache_create(ops, &p, &kc), EPIC_ERR_INVALID);
  epic_ops_destroy(ops);
}

/* Prefix cache: publish, match (token-verified), shared pages refcounted, LRU
 * order and the budget, eviction when allocation needs the pages. */
static void test_prefix_pages(void **state) {
  (void)state;
  epic_kvpages *pg;
  epic_kvpages_params p = {.size = sizeof p, .n_pages = 6, .page_size = 2, .cache_pages = 3};
  const int32_t a[] = {1, 2, 3, 4, 5, 6}, b[] = {1, 2, 3, 9, 5, 6};
  int32_t s1[3], s2[3], m[3], big[6];
  assert_int_equal(epic_kvpages_create(&p, &pg), EPIC_OK);
  assert_int_equal(epic_kvpages_alloc(pg, 3, s1), EPIC_OK);
  assert_int_equal(epic_kvpages_match(pg, a, 3, m), 0);
  assert_int_equal(epic_kvpages_publish(pg, s1[0], -1, a), 1);
  assert_int_equal(epic_kvpages_publish(pg, s1[1], s1[0], a + 2), 1);
  assert_int_equal(epic_kvpages_publish(pg, s1[2], s1[1], a + 4), 1);
  assert_int_equal(epic_kvpages_cached(pg), 3);
  assert_int_equal(epic_kvpages_match(pg, a, 3, m), 3);
  assert_memory_equal(m, s1, sizeof s1);
  assert_int_equal(epic_kvpages_match(pg, b, 3, m), 1); /* diverges in page 1 */
  assert_int_equal(epic_kvpages_match(pg, a, 2, NULL), 2);
  /* Another sequence shares the first two pages. */
  assert_int_equal(epic_kvpages_chain(pg, s1[1], epic_kvpages_key(pg, s1[1]), 2, s2), EPIC_OK);
  assert_memory_equal(s2, s1, 2 * sizeof *s2);
  assert_int_equal(epic_kvpages_chain(pg, s1[1], epic_kvpages_key(pg, s1[1]), 3, s2),
                   EPIC_ERR_INVALID);
  epic_kvpages_ref(pg, s2[0]);
  epic_kvpages_ref(pg, s2[1]);
  assert_int_equal(epic_kvpages_alloc(pg, 1, s2 + 2), EPIC_OK);
  assert_int_equal(epic_kvpages_refs(pg, s1[0]), 2);
  /* The same key twice is not published (the later page stays private). */
  assert_int_equal(epic_kvpages_publish(pg, s2[2], s2[1], a + 4), 0);
  assert_int_equal(epic_kvpages_publish(pg, s2[2], s2[1], (const int32_t[]){7, 7}), 1);
  /* The first sequence ends: its last page goes idle, the shared ones stay in use. */
  for (int i = 2; i >= 0; i--)
    epic_kvpages_unref(pg, s1[i]);
  assert_int_equal(epic_kvpages_idle(pg), 1);
  assert_int_equal(epic_kvpages_available(pg), 3);
  for (int i = 2; i >= 0; i--)
    epic_kvpages_unref(pg, s2[i]);
  /* Four idle pages exceed the budget of 3: the least recent one (s1[2],
   * idle first) was dropped; the chains' first pages stay. */
  assert_int_equal(epic_kvpages_idle(pg), 3);
  assert_int_equal(epic_kvpages_evictions(pg), 1);
  assert_false(epic_kvpages_is_cached(pg, s1[2]));
  assert_int_equal(epic_kvpages_match(pg, a, 3, NULL), 2);
  assert_int_equal(epic_kvpages_match(pg, b, 3, NULL), 1); /* b differs from page 1 on */
  assert_int_equal(epic_kvpages_available(pg), 6);
  /* Allocation under pressure takes free pages first, then evicts idle ones
   * from the LRU end: the chain loses its end first. */
  assert_int_equal(epic_kvpages_alloc(pg, 4, big), EPIC_OK);
  assert_int_equal(epic_kvpages_idle(pg), 2);
  assert_int_equal(epic_kvpages_match(pg, a, 3, NULL), 2);
  assert_int_equal(epic_kvpages_alloc(pg, 1, big + 4), EPIC_OK);
  assert_int_equal(epic_kvpages_match(pg, a, 3, NULL), 1);
  assert_int_equal(epic_kvpages_alloc(pg, 2, big + 5), EPIC_ERR_NOMEM); /* all or nothing */
  assert_int_equal(epic_kvpages_idle(pg), 1);
  assert_int_equal(epic_kvpages_set_cache(pg, 0), EPIC_ERR_INVALID); /* pages in use */
  for (int i = 0; i < 5; i++)
    epic_kvpages_unref(pg, big[i]);
  assert_int_equal(epic_kvpages_available(pg), 6);
  epic_kvpages_destroy(pg);
  /* Off: nothing is published or matched. */
  p.cache_pages = 0;
  assert_int_equal(epic_kvpages_create(&p, &pg), EPIC_OK);
  assert_int_equal(epic_kvpages_alloc(pg, 1, s1), EPIC_OK);
  assert_int_equal(epic_kvpages_publish(pg, s1[0], -1, a), 0);
  assert_int_equal(epic_kvpages_match(pg, a, 1, NULL), 0);
  epic_kvpages_unref(pg, s1[0]);
  epic_kvpages_destroy(pg);
}

/* A sequence publishes its prompt pages chunk by chunk; another attaches them. */
static void test_seq_prefix(void **state) {
  (void)state;
  epic_ops *ops;
  epic_kvcache *kc;
  epic_kvcache_params p = {.size = sizeof p, .n_layers = 1, .lora = 4, .rope = 2, .page_size = 4,
                           .n_pages = 8};
  const int32_t prompt[] = {5, 6, 7, 8, 9, 10, 11, 12, 13, 14};
  epic_kv_seq a = {0}, b = {0};
  int32_t m[2];
  assert_int_equal(epic_ops_cpu_create(1, &ops), EPIC_OK);
  assert_int_equal(epic_kvcache_create(ops, &p, &kc), EPIC_OK);
  assert_int_equal(epic_kvcache_set_prefix_cache(kc, 4), EPIC_OK);
  assert_int_equal(epic_kvcache_seq_reserve(kc, &a, 12), EPIC_OK);
  assert_int_equal(epic_kvcache_seq_publish(kc, &a, 0, prompt, 3), EPIC_OK);
  assert_int_equal(epic_kvpages_cached(epic_kvcache_pages(kc)), 0);
  assert_int_equal(epic_kvcache_seq_publish(kc, &a, 3, prompt + 3, 7), EPIC_OK);
  assert_int_equal(a.n_chain, 2);
  assert_int_equal(epic_kvpages_match(epic_kvcache_pages(kc), prompt, 2, m), 2);
  assert_int_equal(epic_kvcache_seq_attach(kc, &b, m[1], epic_kvpages_key(epic_kvcache_pages(kc), m[1]), 2),
                   EPIC_OK);
  assert_int_equal(b.n_tokens, 8);
  assert_int_equal(b.pages[0], a.pages[0]);
  assert_int_equal(epic_kvcache_seq_reserve(kc, &b, 10), EPIC_OK); /* one private page */
  assert_int_equal(epic_kvcache_free_pages(kc), 4);
  epic_kvcache_seq_release(kc, &a);
  assert_int_equal(epic_kvcache_free_pages(kc), 5); /* a's third page */
  epic_kvcache_seq_release(kc, &b);
  assert_int_equal(epic_kvcache_free_pages(kc), 8);
  assert_int_equal(epic_kvpages_idle(epic_kvcache_pages(kc)), 2);
  epic_kvcache_destroy(kc);
  epic_ops_destroy(ops);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_pages), cmocka_unit_test(test_prefix_pages),
                                     cmocka_unit_test(test_seq_prefix)};
  return cmocka_run_group_tests_name("kvcache", tests, NULL, NULL);
}
