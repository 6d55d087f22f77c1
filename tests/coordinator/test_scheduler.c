/* The scheduler's policy without a model: admission by KV pages and batch
 * slots, per-worker token budget, chunked prefill mixed with decode, placement
 * balance, queue limits, cancellation and releases, and a long randomised run
 * whose invariants are checked at every step. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "common/log.h"
#include "coordinator/scheduler.h"
#include "worker/step_plan.h"

static epic_sched *make(int nranks, int64_t page, int64_t pages, int64_t batch, int64_t queue,
                        int64_t budget, int64_t chunk) {
  epic_sched_params p = {.size = sizeof p,
                         .nranks = nranks,
                         .page_size = page,
                         .kv_pages = pages,
                         .max_batch = batch,
                         .max_queue = queue,
                         .step_tokens = budget,
                         .prefill_chunk = chunk};
  epic_sched *s = NULL;
  assert_int_equal(epic_sched_create(&p, &s), EPIC_OK);
  return s;
}

static const epic_sched_entry *find(const epic_sched_step *st, uint64_t id) {
  for (int64_t i = 0; i < st->n_entries; i++)
    if (st->entries[i].id == id)
      return &st->entries[i];
  return NULL;
}

static void test_params(void **state) {
  (void)state;
  epic_sched_params p = {.size = sizeof p,
                         .nranks = 1,
                         .page_size = 4,
                         .kv_pages = 8,
                         .max_batch = 4,
                         .max_queue = 4,
                         .step_tokens = 16,
                         .prefill_chunk = 8};
  epic_sched *s = NULL;
  epic_sched_params q = p;
  q.kv_pages = 0;
  assert_int_equal(epic_sched_create(&q, &s), EPIC_ERR_INVALID);
  q = p;
  q.nranks = 0;
  assert_int_equal(epic_sched_create(&q, &s), EPIC_ERR_INVALID);
  q = p;
  q.size = 3;
  assert_int_equal(epic_sched_create(&q, &s), EPIC_ERR_INVALID);
  assert_null(s);
  assert_int_equal(epic_sched_create(&p, &s), EPIC_OK);
  assert_int_equal(epic_sched_pages_for(s, 5, 4), 3); /* 9 tokens in pages of 4 */
  assert_int_equal(epic_sched_pages_for(s, 4, 4), 2);
  epic_sched_destroy(s);
}

static void test_queue_limits(void **state) {
  (void)state;
  epic_sched *s = make(1, 4, 8, 4, 2, 16, 8);
  int tag;
  /* 33 tokens need 9 pages of 4 and a worker has 8: never admissible. */
  assert_int_equal(epic_sched_submit(s, 1, 30, 3, &tag), EPIC_ERR_INVALID);
  assert_int_equal(epic_sched_submit(s, 1, 0, 3, &tag), EPIC_ERR_INVALID);
  assert_int_equal(epic_sched_submit(s, 1, 3, 0, &tag), EPIC_ERR_INVALID);
  assert_int_equal(epic_sched_submit(s, 1, 28, 4, &tag), EPIC_OK); /* exactly 8 pages */
  assert_int_equal(epic_sched_submit(s, 2, 4, 4, &tag), EPIC_OK);
  assert_int_equal(epic_sched_submit(s, 3, 4, 4, &tag), EPIC_ERR_BUSY);
  epic_sched_stats ss;
  epic_sched_get_stats(s, &ss);
  assert_int_equal(ss.queued, 2);
  /* Forming a step admits the head and makes room in the queue. */
  epic_sched_step st;
  assert_int_equal(epic_sched_form(s, &st), EPIC_OK);
  assert_int_equal(st.n_admitted, 1); /* the second does not fit next to the first */
  assert_int_equal(epic_sched_submit(s, 3, 4, 4, &tag), EPIC_OK);
  assert_int_equal(epic_sched_submit(s, 4, 4, 4, &tag), EPIC_ERR_BUSY);
  epic_sched_destroy(s);
}

static void test_admission_pages_and_release(void **state) {
  (void)state;
  /* One worker with 10 pages of 4 tokens; each request needs 6 pages. */
  epic_sched *s = make(1, 4, 10, 8, 8, 64, 64);
  int a, b;
  epic_sched_step st;
  assert_int_equal(epic_sched_submit(s, 1, 20, 4, &a), EPIC_OK);
  assert_int_equal(epic_sched_submit(s, 2, 20, 4, &b), EPIC_OK);
  assert_int_equal(epic_sched_form(s, &st), EPIC_OK);
  assert_int_equal(st.n_admitted, 1);
  assert_int_equal(st.n_entries, 1);
  assert_int_equal(st.entries[0].id, 1);
  assert_ptr_equal(st.entries[0].user, &a);
  assert_int_equal(st.entries[0].flags, EPIC_STEP_NEW | EPIC_STEP_SAMPLE);
  assert_int_equal(st.entries[0].n_tokens, 20);
  assert_int_equal(epic_sched_rank_free_pages(s, 0), 4);
  epic_sched_commit(s, &st);
  /* Request 1 decodes; 2 still waits for pages. */
  assert_int_equal(epic_sched_form(s, &st), EPIC_OK);
  assert_int_equal(st.n_admitted, 0);
  assert_int_equal(st.n_entries, 1);
  assert_int_equal(st.entries[0].flags, EPIC_STEP_SAMPLE);
  assert_int_equal(st.entries[0].start, 20);
  assert_int_equal(st.entries[0].n_tokens, 1);
  epic_sched_commit(s, &st);
  /* Finishing 1 frees its pages at once: 2 is admitted in the very next step,
   * after the release entry that frees them on the worker. */
  void *u = NULL;
  assert_int_equal(epic_sched_remove(s, 1, &u), 1);
  assert_ptr_equal(u, &a);
  assert_int_equal(epic_sched_remove(s, 1, &u), 0);
  assert_int_equal(epic_sched_rank_free_pages(s, 0), 10);
  assert_true(epic_sched_has_work(s));
  assert_int_equal(epic_sched_form(s, &st), EPIC_OK);
  assert_int_equal(st.n_entries, 2);
  assert_int_equal(st.entries[0].id, 1);
  assert_int_equal(st.entries[0].flags, EPIC_STEP_RELEASE);
  assert_int_equal(st.entries[0].n_tokens, 0);
  assert_int_equal(st.entries[0].rank, 0);
  assert_int_equal(st.entries[1].id, 2);
  assert_true(st.entries[1].flags & EPIC_STEP_NEW);
  epic_sched_commit(s, &st);
  assert_int_equal(epic_sched_remove(s, 2, NULL), 1);
  assert_int_equal(epic_sched_form(s, &st), EPIC_OK); /* the release of 2 */
  assert_int_equal(st.n_entries, 1);
  assert_int_equal(st.n_tokens, 0);
  assert_false(epic_sched_has_work(s));
  assert_int_equal(epic_sched_form(s, &st), EPIC_OK);
  assert_int_equal(st.n_entries, 0);
  epic_sched_destroy(s);
}

static void test_max_batch(void **state) {
  (void)state;
  epic_sched *s = make(2, 4, 100, 3, 16, 64, 64);
  epic_sched_step st;
  for (uint64_t i = 1; i <= 5; i++)
    assert_int_equal(epic_sched_submit(s, i, 3, 2, NULL), EPIC_OK);
  assert_int_equal(epic_sched_form(s, &st), EPIC_OK);
  assert_int_equal(st.n_admitted, 3);
  epic_sched_stats ss;
  epic_sched_get_stats(s, &ss);
  assert_int_equal(ss.running, 3);
  assert_int_equal(ss.queued, 2);
  assert_int_equal(ss.pages_used, 6);
  assert_int_equal(ss.pages_total, 200);
  epic_sched_commit(s, &st);
  assert_int_equal(epic_sched_remove(s, 2, NULL), 1);
  assert_int_equal(epic_sched_form(s, &st), EPIC_OK);
  assert_int_equal(st.n_admitted, 1); /* one slot came free */
  assert_non_null(find(&st, 4));
  assert_null(find(&st, 5));
  epic_sched_destroy(s);
}

static void test_budget_and_chunks(void **state) {
  (void)state;
  /* Budget 10 per worker, chunks of at most 4. */
  epic_sched *s = make(1, 4, 100, 8, 8, 10, 4);
  epic_sched_step st;
  assert_int_equal(epic_sched_submit(s, 1, 10, 3, NULL), EPIC_OK);
  assert_int_equal(epic_sched_submit(s, 2, 10, 3, NULL), EPIC_OK);
  assert_int_equal(epic_sched_submit(s, 3, 10, 3, NULL), EPIC_OK);
  /* Step 1: chunks 4 + 4 + 2 (budget 10). */
  assert_int_equal(epic_sched_form(s, &st), EPIC_OK);
  assert_int_equal(st.n_tokens, 10);
  assert_int_equal(find(&st, 1)->n_tokens, 4);
  assert_int_equal(find(&st, 2)->n_tokens, 4);
  assert_int_equal(find(&st, 3)->n_tokens, 2);
  for (int64_t i = 0; i < st.n_entries; i++) {
    assert_int_equal(st.entries[i].flags, EPIC_STEP_NEW);
    assert_int_equal(st.entries[i].start, 0);
  }
  epic_sched_commit(s, &st);
  /* Step 2: 4 + 4 + 2 again; 3 was behind, keeps its place. */
  assert_int_equal(epic_sched_form(s, &st), EPIC_OK);
  assert_int_equal(find(&st, 1)->start, 4);
  assert_int_equal(find(&st, 1)->flags, 0);
  assert_int_equal(find(&st, 3)->start, 2);
  assert_int_equal(st.n_tokens, 10);
  epic_sched_commit(s, &st);
  /* Step 3: 1 and 2 end their prompts (2 tokens each, SAMPLE), 3 gets 4 more. */
  assert_int_equal(epic_sched_form(s, &st), EPIC_OK);
  assert_int_equal(find(&st, 1)->n_tokens, 2);
  assert_int_equal(find(&st, 1)->flags, EPIC_STEP_SAMPLE);
  assert_int_equal(find(&st, 2)->flags, EPIC_STEP_SAMPLE);
  assert_int_equal(find(&st, 3)->n_tokens, 4);
  assert_int_equal(find(&st, 3)->flags, 0);
  epic_sched_commit(s, &st);
  /* Step 4: decode for 1 and 2 comes first, prefill of 3 gets the rest (2 left of 4). */
  assert_int_equal(epic_sched_form(s, &st), EPIC_OK);
  assert_int_equal(find(&st, 1)->n_tokens, 1);
  assert_int_equal(find(&st, 1)->start, 10);
  assert_int_equal(find(&st, 2)->n_tokens, 1);
  assert_int_equal(find(&st, 3)->n_tokens, 2);
  assert_int_equal(find(&st, 3)->flags, EPIC_STEP_SAMPLE);
  assert_int_equal(st.n_tokens, 4);
  epic_sched_commit(s, &st);
  /* A sequence that produced max_new tokens is never scheduled again. */
  for (int k = 0; k < 4; k++) {
    assert_int_equal(epic_sched_form(s, &st), EPIC_OK);
    epic_sched_commit(s, &st);
  }
  assert_int_equal(epic_sched_form(s, &st), EPIC_OK);
  assert_int_equal(st.n_entries, 0);
  assert_true(epic_sched_has_work(s)); /* the caller still has to remove them */
  epic_sched_destroy(s);
}

static void test_balance(void **state) {
  (void)state;
  epic_sched *s = make(3, 4, 60, 64, 64, 1000, 1000);
  epic_sched_step st;
  for (uint64_t i = 1; i <= 9; i++)
    assert_int_equal(epic_sched_submit(s, i, 8, 8, NULL), EPIC_OK);
  assert_int_equal(epic_sched_form(s, &st), EPIC_OK);
  assert_int_equal(st.n_admitted, 9);
  for (int r = 0; r < 3; r++) {
    assert_int_equal(epic_sched_rank_running(s, r), 3);
    assert_int_equal(epic_sched_rank_free_pages(s, r), 60 - 3 * 4);
  }
  /* Different sizes: the worker with the most free pages takes each request. */
  assert_int_equal(epic_sched_submit(s, 10, 60, 4, NULL), EPIC_OK); /* 16 pages */
  assert_int_equal(epic_sched_submit(s, 11, 4, 4, NULL), EPIC_OK);  /* 2 pages */
  assert_int_equal(epic_sched_submit(s, 12, 4, 4, NULL), EPIC_OK);
  assert_int_equal(epic_sched_form(s, &st), EPIC_OK);
  assert_int_equal(find(&st, 10)->rank, 0);
  assert_int_equal(find(&st, 11)->rank, 1);
  assert_int_equal(find(&st, 12)->rank, 2);
  epic_sched_destroy(s);
}

static void test_cancel(void **state) {
  (void)state;
  /* Budget 4, chunk 4: the second admitted sequence gets no tokens in step 1. */
  epic_sched *s = make(1, 4, 100, 8, 8, 4, 4);
  epic_sched_step st;
  int a, b, c;
  void *u;
  assert_int_equal(epic_sched_submit(s, 1, 8, 2, &a), EPIC_OK);
  assert_int_equal(epic_sched_submit(s, 2, 8, 2, &b), EPIC_OK);
  assert_int_equal(epic_sched_form(s, &st), EPIC_OK);
  assert_int_equal(st.n_admitted, 2);
  assert_int_equal(st.n_entries, 1);
  epic_sched_commit(s, &st);
  assert_int_equal(epic_sched_submit(s, 3, 8, 2, &c), EPIC_OK);
  /* Queued: gone at once, nothing to release. */
  assert_int_equal(epic_sched_remove(s, 3, &u), 1);
  assert_ptr_equal(u, &c);
  /* Admitted but never sent to a worker: nothing to release either. */
  assert_int_equal(epic_sched_remove(s, 2, &u), 1);
  assert_ptr_equal(u, &b);
  /* Running on a worker: released in the next step. */
  assert_int_equal(epic_sched_remove(s, 1, &u), 1);
  assert_ptr_equal(u, &a);
  assert_int_equal(epic_sched_remove(s, 99, &u), 0);
  assert_int_equal(epic_sched_form(s, &st), EPIC_OK);
  assert_int_equal(st.n_entries, 1);
  assert_int_equal(st.entries[0].id, 1);
  assert_int_equal(st.entries[0].flags, EPIC_STEP_RELEASE);
  assert_int_equal(epic_sched_rank_free_pages(s, 0), 100);
  /* pop_any drains queued requests first. */
  assert_int_equal(epic_sched_submit(s, 4, 8, 2, &a), EPIC_OK);
  assert_int_equal(epic_sched_form(s, &st), EPIC_OK);
  assert_int_equal(epic_sched_submit(s, 5, 8, 2, &b), EPIC_OK);
  uint64_t id;
  assert_int_equal(epic_sched_pop_any(s, &id, &u), 1);
  assert_int_equal(id, 5);
  assert_int_equal(epic_sched_pop_any(s, &id, &u), 1);
  assert_int_equal(id, 4);
  assert_int_equal(epic_sched_pop_any(s, &id, &u), 0);
  epic_sched_destroy(s);
}

/* Many random requests to completion; every step checked against the policy. */
static void test_random_run(void **state) {
  (void)state;
  enum { N = 200, R = 3 };
  const int64_t budget = 24, chunk = 7, page = 4, pages = 40, batch = 12;
  epic_sched *s = make(R, page, pages, batch, N, budget, chunk);
  int64_t n_prompt[N + 1], max_new[N + 1], cached[N + 1], gen[N + 1];
  int rank[N + 1], done[N + 1], held[N + 1];
  uint32_t rng = 12345;
  int64_t finished = 0, steps = 0;
  epic_sched_step st;
  for (int i = 1; i <= N; i++) {
    rng = rng * 1103515245u + 12345u;
    n_prompt[i] = 1 + (rng >> 16) % 60;
    rng = rng * 1103515245u + 12345u;
    max_new[i] = 1 + (rng >> 16) % 30;
    cached[i] = gen[i] = 0;
    rank[i] = -1;
    done[i] = held[i] = 0;
    assert_int_equal(epic_sched_submit(s, (uint64_t)i, n_prompt[i], max_new[i], NULL), EPIC_OK);
  }
  while (finished < N) {
    int64_t used[R] = {0};
    assert_int_equal(epic_sched_form(s, &st), EPIC_OK);
    assert_true(++steps < 100000);
    epic_sched_stats ss;
    epic_sched_get_stats(s, &ss);
    assert_true(ss.running <= batch);
    for (int r = 0; r < R; r++)
      assert_true(epic_sched_rank_free_pages(s, r) >= 0);
    for (int64_t i = 0; i < st.n_entries; i++) {
      const epic_sched_entry *e = &st.entries[i];
      int id = (int)e->id;
      assert_in_range(e->rank, 0, R - 1);
      if (e->flags & EPIC_STEP_RELEASE) {
        assert_true(done[id] && held[id]);
        assert_int_equal(e->rank, rank[id]);
        held[id] = 0;
        continue;
      }
      assert_false(done[id]);
      for (int64_t j = i + 1; j < st.n_entries; j++)
        assert_int_not_equal(st.entries[j].id, e->id);
      if (e->flags & EPIC_STEP_NEW) {
        assert_int_equal(cached[id], 0);
        assert_false(held[id]);
        rank[id] = e->rank;
        held[id] = 1;
      }
      assert_true(held[id]);
      assert_int_equal(e->rank, rank[id]);
      assert_int_equal(e->start, cached[id]);
      used[e->rank] += e->n_tokens;
      if (cached[id] < n_prompt[id]) {
        assert_true(e->n_tokens <= chunk);
        assert_true(cached[id] + e->n_tokens <= n_prompt[id]);
        assert_int_equal(!!(e->flags & EPIC_STEP_SAMPLE), cached[id] + e->n_tokens == n_prompt[id]);
      } else {
        assert_int_equal(e->n_tokens, 1);
        assert_true(e->flags & EPIC_STEP_SAMPLE);
      }
    }
    for (int r = 0; r < R; r++)
      assert_true(used[r] <= budget);
    /* Decode never waits: every sequence past its prompt gets its token. */
    for (int i = 1; i <= N; i++)
      if (!done[i] && held[i] && cached[i] >= n_prompt[i])
        assert_non_null(find(&st, (uint64_t)i));
    epic_sched_commit(s, &st);
    for (int64_t i = 0; i < st.n_entries; i++) {
      const epic_sched_entry *e = &st.entries[i];
      int id = (int)e->id;
      if (e->flags & EPIC_STEP_RELEASE)
        continue;
      cached[id] += e->n_tokens;
      if (e->flags & EPIC_STEP_SAMPLE)
        gen[id]++;
      /* Finish some sequences early (as EOS would), the rest at max_new. */
      if (gen[id] == max_new[id] || (gen[id] > 0 && id % 7 == 0)) {
        assert_int_equal(epic_sched_remove(s, e->id, NULL), 1);
        done[id] = 1;
        finished++;
      }
    }
  }
  assert_int_equal(epic_sched_form(s, &st), EPIC_OK); /* the last releases */
  for (int64_t i = 0; i < st.n_entries; i++)
    held[st.entries[i].id] = 0;
  for (int i = 1; i <= N; i++)
    assert_false(held[i]);
  assert_false(epic_sched_has_work(s));
  for (int r = 0; r < R; r++)
    assert_int_equal(epic_sched_rank_free_pages(s, r), pages);
  epic_sched_destroy(s);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_params),
      cmocka_unit_test(test_queue_limits),
      cmocka_unit_test(test_admission_pages_and_release),
      cmocka_unit_test(test_max_batch),
      cmocka_unit_test(test_budget_and_chunks),
      cmocka_unit_test(test_balance),
      cmocka_unit_test(test_cancel),
      cmocka_unit_test(test_random_run),
  };
  epic_log_init(EPIC_LOG_LEVEL_ERROR, -1);
  return cmocka_run_group_tests_name("scheduler", tests, NULL, NULL);
}
