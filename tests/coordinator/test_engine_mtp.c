/* MTP speculative decoding in the serving engine (one process, tiny-bf16 with its
 * MTP layer, 4-token KV pages so accepted and rejected runs cross pages):
 *  - greedy: every request's tokens with mtp_draft 1, 2, 3 and auto equal plain
 *    decoding's (and the fixture's reference continuations), for sequences of
 *    different lengths that join mid-run; drafts are verified and counted;
 *  - auto on the untrained MTP layer stops drafting for every sequence;
 *  - sampled at temperature 5 (nearly flat: many drafts accepted): a stop id
 *    or a max_new_tokens inside an accepted run cuts the output exactly there
 *    (the same tokens as the uncut run, up to the stop).
 * The greedy checks run a second time through the GPU backends' host-side paths
 * (tests/common/dev_ops.h), where auto does not draft: that backend does not report
 * itself row-invariant. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "common/log.h"
#include "coordinator/engine.h"
#include "kernels/ops.h"
#include "tests/common/dev_ops.h"
#include "tests/common/test_util.h"
#include "worker/model.h"

#define MAX_PROMPT 256
#define MAX_OUT 64
#define N_REQ 8

typedef struct rq {
  int32_t prompt[MAX_PROMPT];
  int64_t n_prompt, max_new;
  epic_sampling_params sp;
  int32_t expect[MAX_OUT];
  int n_expect;
  int32_t stop_id;
  int32_t out[MAX_OUT];
  int n_out, finishes;
  epic_engine_result res;
} rq;

typedef struct fixture {
  epic_ops *ops;
  epic_test_dev_ops dev; /* device: the model is on dev.ops */
  int device;
  epic_model *m;
  rq cases[8];
  int n_cases;
} fixture;

static int on_token(void *user, int32_t id, float logprob) {
  rq *r = user;
  if (!(logprob <= 0) || r->n_out == MAX_OUT)
    return -1;
  r->out[r->n_out++] = id;
  return 0;
}

static void on_finish(void *user, const epic_engine_result *res) {
  rq *r = user;
  r->finishes++;
  r->res = *res;
}

static int teardown(void **state);

/* On failure the partly built fixture is released here (teardown then sees NULL). */
static int setup_on(void **state, int device) {
  fixture *f = calloc(1, sizeof *f);
  char dir[1024];
  epic_model_params mp = {.size = sizeof mp, .load_mtp = 1};
  epic_log_init(EPIC_LOG_LEVEL_WARN, -1);
  *state = f;
  if (!f)
    return -1;
  f->device = device;
  mp.dir = epic_test_path(dir, sizeof dir, "tiny-bf16");
  const epic_status st =
      device ? epic_test_dev_ops_open(&f->dev) : epic_ops_cpu_create(0, &f->ops);
  if (st != EPIC_OK || epic_model_load(device ? f->dev.ops : f->ops, &mp, &f->m) != EPIC_OK) {
    teardown(state);
    return -1;
  }
  epic_test_case tc[8];
  const int n = epic_test_load_cases("tiny-bf16", tc, 8);
  for (int i = 0; i < n; i++) {
    rq *c = &f->cases[f->n_cases++];
    memset(c, 0, sizeof *c);
    c->n_prompt = tc[i].n_prompt;
    c->n_expect = tc[i].n_gen;
    const int fits = epic_test_case_copy(&tc[i], c->prompt, MAX_PROMPT - 32, c->expect, MAX_OUT);
    epic_test_free_cases(&tc[i], 1);
    if (!fits) {
      epic_test_free_cases(&tc[i + 1], n - i - 1);
      teardown(state);
      return -1;
    }
  }
  if (f->n_cases < 3) {
    teardown(state);
    return -1;
  }
  return 0;
}

static int setup(void **state) { return setup_on(state, 0); }
static int setup_device(void **state) { return setup_on(state, 1); }

static int teardown(void **state) {
  fixture *f = *state;
  *state = NULL;
  if (!f)
    return 0;
  epic_model_destroy(f->m);
  epic_ops_destroy(f->ops);
  epic_test_dev_ops_close(&f->dev);
  free(f);
  return 0;
}

static epic_engine *make(fixture *f, int64_t mtp_draft) {
  epic_engine *e = NULL;
  epic_engine_params ep = {.size = sizeof ep,
                           .model = f->m,
                           .page_size = 4,
                           .kv_pages = 400,
                           .step_tokens = 24,
                           .prefill_chunk = 6,
                           .mtp_draft = mtp_draft};
  assert_int_equal(epic_engine_create(&ep, &e), EPIC_OK);
  return e;
}

static void submit(epic_engine *e, rq *r) {
  r->n_out = 0;
  r->finishes = 0;
  epic_engine_request q = {.size = sizeof q,
                           .prompt = r->prompt,
                           .n_prompt = r->n_prompt,
                           .max_new_tokens = r->max_new,
                           .sampling = r->sp,
                           .ignore_eos = 1,
                           .stop_ids = r->stop_id >= 0 ? &r->stop_id : NULL,
                           .n_stop_ids = r->stop_id >= 0,
                           .on_token = on_token,
                           .on_finish = on_finish,
                           .user = r};
  assert_int_equal(epic_engine_submit(e, &q, NULL), EPIC_OK);
}

static void drain(epic_engine *e) {
  for (int idle = 0; !idle;)
    assert_int_equal(epic_engine_step(e, &idle), EPIC_OK);
}

/* Requests: the fixture cases (prompt + reference) and continuations of them
 * (prompt + its first ids) with other budgets; half join after a few steps. */
static void requests(fixture *f, rq *r) {
  for (int i = 0; i < N_REQ; i++) {
    const rq *c = &f->cases[i % f->n_cases];
    rq *q = &r[i];
    memset(q, 0, sizeof *q);
    q->stop_id = -1;
    q->sp = (epic_sampling_params){.size = sizeof q->sp, .top_p = 1};
    memcpy(q->prompt, c->prompt, (size_t)c->n_prompt * sizeof *q->prompt);
    q->n_prompt = c->n_prompt;
    const int extra = i < f->n_cases ? 0 : 1 + i % 3;
    memcpy(q->prompt + q->n_prompt, c->expect, (size_t)extra * sizeof(int32_t));
    q->n_prompt += extra;
    q->n_expect = c->n_expect - extra;
    memcpy(q->expect, c->expect + extra, (size_t)q->n_expect * sizeof(int32_t));
    q->max_new = q->n_expect - i % 4;
  }
}

static void run_batch(fixture *f, int64_t mtp, rq *r, epic_engine_stats *st) {
  epic_engine *e = make(f, mtp);
  for (int i = 0; i < N_REQ / 2; i++)
    submit(e, &r[i]);
  for (int s = 0; s < 5; s++) {
    int idle;
    assert_int_equal(epic_engine_step(e, &idle), EPIC_OK);
  }
  for (int i = N_REQ / 2; i < N_REQ; i++) /* join mid-run */
    submit(e, &r[i]);
  drain(e);
  epic_engine_get_stats(e, st);
  epic_engine_destroy(e);
}

static void test_greedy_identical(void **state) {
  fixture *f = *state;
  static const int64_t modes[] = {-1, 1, 2, 3, 0};
  rq plain[N_REQ], r[N_REQ];
  epic_engine_stats st;
  requests(f, plain);
  run_batch(f, -1, plain, &st);
  assert_int_equal(st.mtp_drafted, 0);
  for (int i = 0; i < N_REQ; i++) {
    assert_int_equal(plain[i].finishes, 1);
    assert_int_equal(plain[i].n_out, plain[i].max_new);
    assert_memory_equal(plain[i].out, plain[i].expect, (size_t)plain[i].n_out * sizeof(int32_t));
  }
  for (size_t m = 1; m < sizeof modes / sizeof *modes; m++) {
    requests(f, r);
    run_batch(f, modes[m], r, &st);
    for (int i = 0; i < N_REQ; i++) {
      assert_int_equal(r[i].finishes, 1);
      assert_int_equal(r[i].res.finish, EPIC_ENGINE_FINISH_LENGTH);
      assert_int_equal(r[i].n_out, plain[i].n_out);
      if (memcmp(r[i].out, plain[i].out, (size_t)plain[i].n_out * sizeof(int32_t)))
        fail_msg("mtp_draft %lld: request %d differs from plain decoding", (long long)modes[m], i);
    }
    if (modes[m] == 0 && f->device) { /* not row-invariant: auto stays off */
      assert_int_equal(st.mtp_auto, 0);
      assert_int_equal(st.mtp_drafted, 0);
      continue;
    }
    const int64_t k = modes[m] ? modes[m] : 1;
    assert_int_equal(st.mtp_draft, k);
    assert_int_equal(st.mtp_auto, modes[m] == 0);
    assert_true(st.mtp_verify_steps > 0 && st.mtp_drafted == k * st.mtp_verify_steps);
    assert_true(st.mtp_accepted >= 0 && st.mtp_accepted <= st.mtp_drafted);
    assert_int_equal(st.mtp_running, 0);
    if (modes[m] == 0) /* the fixture's MTP layer is untrained */
      assert_int_equal(st.mtp_stopped, N_REQ);
    print_message("mtp_draft %lld: %lld of %lld drafts accepted in %lld verify steps\n",
                  (long long)modes[m], (long long)st.mtp_accepted, (long long)st.mtp_drafted,
                  (long long)st.mtp_verify_steps);
  }
}

/* One request alone (its batch is fixed), sampled nearly flat. */
static void run_one(fixture *f, rq *q, epic_engine_stats *st) {
  epic_engine *e = make(f, 3);
  submit(e, q);
  drain(e);
  epic_engine_get_stats(e, st);
  epic_engine_destroy(e);
  assert_int_equal(q->finishes, 1);
}

static void test_cut_inside_accepted_run(void **state) {
  fixture *f = *state;
  rq full, cut;
  epic_engine_stats st;
  memset(&full, 0, sizeof full);
  full.stop_id = -1;
  full.sp = (epic_sampling_params){.size = sizeof full.sp, .temperature = 5, .top_p = 1, .seed = 9};
  memcpy(full.prompt, f->cases[1].prompt, (size_t)f->cases[1].n_prompt * sizeof(int32_t));
  full.n_prompt = f->cases[1].n_prompt;
  full.max_new = 30;
  run_one(f, &full, &st);
  assert_int_equal(full.n_out, 30);
  assert_true(st.mtp_accepted > 0); /* runs of several tokens were produced */
  for (int j = 1; j < 30; j++) {
    /* A stop id: the output ends at its first occurrence. */
    int first = 0;
    while (full.out[first] != full.out[j])
      first++;
    cut = full;
    cut.stop_id = full.out[j];
    run_one(f, &cut, &st);
    assert_int_equal(cut.res.finish, EPIC_ENGINE_FINISH_STOP);
    assert_int_equal(cut.n_out, first + 1);
    assert_memory_equal(cut.out, full.out, (size_t)cut.n_out * sizeof(int32_t));
    /* max_new_tokens: a prefix of the same tokens (drafts do not depend on it). */
    if (j % 4 == 0) {
      cut = full;
      cut.max_new = j;
      run_one(f, &cut, &st);
      assert_int_equal(cut.res.finish, EPIC_ENGINE_FINISH_LENGTH);
      assert_int_equal(cut.n_out, j);
      assert_memory_equal(cut.out, full.out, (size_t)j * sizeof(int32_t));
    }
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_greedy_identical),
      cmocka_unit_test(test_cut_inside_accepted_run),
  };
  const struct CMUnitTest device[] = {cmocka_unit_test(test_greedy_identical)};
  int rc = cmocka_run_group_tests_name("engine mtp", tests, setup, teardown);
  rc |= cmocka_run_group_tests_name("engine mtp, device paths", device, setup_device, teardown);
  return rc;
}
