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
  assert_int_equal(epic_kvcache_bytes(&p), 2 * 5 * 4 * 12 * sizeof(float));
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
  assert_ptr_equal(v.block_table, a.pages);
  epic_kvcache_seq_release(kc, &a);
  epic_kvcache_seq_release(kc, &b);
  assert_int_equal(epic_kvcache_free_pages(kc), 5);
  epic_kvcache_destroy(kc);
  p.page_size = 0;
  assert_int_equal(epic_kvcache_create(ops, &p, &kc), EPIC_ERR_INVALID);
  epic_ops_destroy(ops);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_pages)};
  return cmocka_run_group_tests_name("kvcache", tests, NULL, NULL);
}
