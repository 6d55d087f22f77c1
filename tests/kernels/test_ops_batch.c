/* mla_absorbed_batch (ABI 2) on the CPU backend: each sequence's result equals the
 * single-sequence mla_absorbed decode of that sequence (the contract every backend's
 * batched kernel is tested against), and malformed batches are rejected. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kernels/ops.h"

static uint64_t rng_state = 0x2545f4914f6cdd1dull;
static float rng_f(void) {
  uint64_t x = rng_state;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  rng_state = x;
  return (float)((double)(x >> 11) * 0x1p-53 * 2.0 - 1.0);
}

static void test_batch_matches_single(void **state) {
  (void)state;
  epic_ops *o = NULL;
  assert_int_equal(epic_ops_cpu_create(2, &o), EPIC_OK);
  enum { NS = 4, PAGE = 4, STRIDE = 6, H = 3, LORA = 16, ROPE = 8, W = LORA + ROPE };
  const int32_t lens[NS] = {1, 5, 23, 9};
  int32_t tables[NS * STRIDE];
  for (int i = 0; i < NS * STRIDE; i++) /* pages interleaved across sequences */
    tables[i] = (int32_t)((i % NS) * STRIDE + i / NS);
  const size_t pool_n = (size_t)NS * STRIDE * PAGE * W;
  float *pool = malloc(pool_n * sizeof(float));
  float qa[NS * H * LORA], qp[NS * H * ROPE], got[NS * H * LORA], want[H * LORA];
  for (size_t i = 0; i < pool_n; i++)
    pool[i] = rng_f();
  for (int i = 0; i < NS * H * LORA; i++)
    qa[i] = rng_f();
  for (int i = 0; i < NS * H * ROPE; i++)
    qp[i] = rng_f();
  const epic_kv_batch kb = {.pool = pool,
                            .page_size = PAGE,
                            .width = W,
                            .lora = LORA,
                            .block_tables = tables,
                            .table_stride = STRIDE,
                            .n_ctx = lens,
                            .max_ctx = 23};
  assert_int_equal(o->vt->mla_absorbed_batch(o, &kb, NS, qa, qp, H, 0.3f, got), EPIC_OK);
  for (int s = 0; s < NS; s++) {
    const epic_kv_view v = {.pool = pool,
                            .page_size = PAGE,
                            .width = W,
                            .lora = LORA,
                            .block_table = tables + s * STRIDE,
                            .n_ctx = lens[s]};
    assert_int_equal(o->vt->mla_absorbed(o, &v, qa + s * H * LORA, qp + s * H * ROPE, 1,
                                         lens[s] - 1, H, 0.3f, want),
                     EPIC_OK);
    assert_memory_equal(got + s * H * LORA, want, sizeof want);
  }
  /* a length beyond max_ctx, or beyond the table, or zero is an error */
  epic_kv_batch bad = kb;
  bad.max_ctx = 22;
  assert_int_equal(o->vt->mla_absorbed_batch(o, &bad, NS, qa, qp, H, 0.3f, got), EPIC_ERR_INVALID);
  const int32_t long_lens[NS] = {1, 5, STRIDE * PAGE + 1, 9};
  bad = kb;
  bad.n_ctx = long_lens;
  bad.max_ctx = 100;
  assert_int_equal(o->vt->mla_absorbed_batch(o, &bad, NS, qa, qp, H, 0.3f, got), EPIC_ERR_INVALID);
  const int32_t zero_lens[NS] = {1, 0, 3, 9};
  bad.n_ctx = zero_lens;
  assert_int_equal(o->vt->mla_absorbed_batch(o, &bad, NS, qa, qp, H, 0.3f, got), EPIC_ERR_INVALID);
  assert_int_equal(o->vt->mla_absorbed_batch(o, &kb, 0, qa, qp, H, 0.3f, got), EPIC_OK);
  free(pool);
  epic_ops_destroy(o);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_batch_matches_single)};
  return cmocka_run_group_tests_name("ops_batch", tests, NULL, NULL);
}
