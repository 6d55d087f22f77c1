/* The engine in one process on the tiny fixtures: many concurrent sequences of
 * different lengths (the fixture cases and continuations of them), with a small
 * step budget and prefill chunk so that prefill chunks and decode tokens share
 * steps and admission waits for KV pages, must produce the fixtures' greedy
 * reference continuations and exactly what each request produces alone (also
 * with seeded sampling). Plus the request life cycle: stop ids, on_token stop
 * and cancel, epic_engine_cancel, validation, queue limits, shutdown. The batching
 * and prefix-cache checks run a second time through the GPU backends' host-side paths
 * (tests/common/dev_ops.h). */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <cmocka.h>

#include "common/log.h"
#include "coordinator/engine.h"
#include "kernels/ops.h"
#include "tests/common/dev_ops.h"
#include "tests/common/test_util.h"
#include "worker/model.h"
#include "worker/sampler.h"

#define MAX_PROMPT 256
#define MAX_OUT 64
#define MAX_REQ 64

typedef struct rq {
  int32_t prompt[MAX_PROMPT];
  int64_t n_prompt, max_new;
  epic_sampling_params sp;
  int32_t expect[MAX_OUT]; /* reference continuation (greedy requests) */
  int n_expect;
  int32_t stop_id;  /* >= 0: a stop id */
  int stop_after;   /* > 0: on_token returns 1 after this many tokens */
  int cancel_after; /* > 0: on_token returns -1 after this many tokens */
  int32_t out[MAX_OUT];
  int n_out;
  int finishes; /* on_finish calls */
  int bad;      /* a callback saw something impossible */
  int sampled;  /* sampling instead of greedy */
  epic_engine_result res;
} rq;

typedef struct fixture {
  epic_ops *ops;
  epic_test_dev_ops dev; /* the device-paths group's backend (the model is on dev.ops) */
  epic_model *m;
  rq cases[8]; /* the fixture cases: prompt + 16 greedy ids */
  int n_cases;
} fixture;

/* Callbacks may run on the engine's thread: they record, the test thread asserts. */
static int on_token(void *user, int32_t id, float logprob) {
  rq *r = user;
  if (!(logprob <= 0) || r->n_out == MAX_OUT || r->finishes) {
    r->bad = 1;
    return -1;
  }
  r->out[r->n_out++] = id;
  if (r->cancel_after && r->n_out == r->cancel_after)
    return -1;
  if (r->stop_after && r->n_out == r->stop_after)
    return 1;
  return 0;
}

static void on_finish(void *user, const epic_engine_result *res) {
  rq *r = user;
  r->finishes++;
  r->res = *res;
}

static epic_status submit(epic_engine *e, rq *r, uint64_t *id) {
  epic_engine_request q = {.size = sizeof q,
                           .prompt = r->prompt,
                           .n_prompt = r->n_prompt,
                           .max_new_tokens = r->max_new,
                           .sampling = r->sp,
                           .ignore_eos = 1,
                           .stop_ids = r->stop_id >= 0 ? &r->stop_id : NULL,
                           .n_stop_ids = r->stop_id >= 0 ? 1 : 0,
                           .on_token = on_token,
                           .on_finish = on_finish,
                           .user = r};
  return epic_engine_submit(e, &q, id);
}

static epic_sampling_params greedy(void) {
  return (epic_sampling_params){.size = sizeof(epic_sampling_params), .top_p = 1};
}

static int teardown(void **state);

/* On failure the partly built fixture is released here (teardown then sees NULL). */
static int setup(void **state, const char *model, int device) {
  fixture *f = calloc(1, sizeof *f);
  char dir[1024];
  epic_model_params mp = {.size = sizeof mp};
  epic_log_init(EPIC_LOG_LEVEL_WARN, -1);
  *state = f;
  if (!f)
    return -1;
  mp.dir = epic_test_path(dir, sizeof dir, model);
  const epic_status st =
      device ? epic_test_dev_ops_open(&f->dev) : epic_ops_cpu_create(0, &f->ops);
  if (st != EPIC_OK || epic_model_load(device ? f->dev.ops : f->ops, &mp, &f->m) != EPIC_OK) {
    teardown(state);
    return -1;
  }
  epic_test_case tc[8];
  const int n = epic_test_load_cases(model, tc, 8);
  for (int i = 0; i < n; i++) {
    rq *c = &f->cases[f->n_cases++];
    memset(c, 0, sizeof *c);
    c->stop_id = -1;
    c->sp = greedy();
    c->n_prompt = tc[i].n_prompt;
    c->n_expect = tc[i].n_gen;
    c->max_new = c->n_expect;
    const int fits =
        c->n_expect == 16 && epic_test_case_copy(&tc[i], c->prompt, MAX_PROMPT - 16, c->expect, 16);
    epic_test_free_cases(&tc[i], 1);
    if (!fits) {
      epic_test_free_cases(&tc[i + 1], n - i - 1);
      teardown(state);
      return -1;
    }
  }
  if (f->n_cases != 5) {
    teardown(state);
    return -1;
  }
  return 0;
}
static int setup_bf16(void **state) {
  return setup(state, "tiny-bf16", 0);
}
static int setup_bf16_device(void **state) {
  return setup(state, "tiny-bf16", 1);
}

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

/* Greedy request r: case src continued after k of its reference tokens (prompt +
 * gen[:k] must continue with gen[k:]). */
static void continuation(const rq *src, int k, rq *r) {
  memset(r, 0, sizeof *r);
  r->stop_id = -1;
  r->sp = greedy();
  memcpy(r->prompt, src->prompt, (size_t)src->n_prompt * sizeof *r->prompt);
  memcpy(r->prompt + src->n_prompt, src->expect, (size_t)k * sizeof *r->prompt);
  r->n_prompt = src->n_prompt + k;
  r->n_expect = src->n_expect - k;
  memcpy(r->expect, src->expect + k, (size_t)r->n_expect * sizeof *r->expect);
  r->max_new = r->n_expect;
}

/* The request set: every case, and continuations of it after k of its reference
 * tokens (prompt + gen[:k] must continue with gen[k:]), prompts of 1..156 tokens. */
static int make_requests(const fixture *f, rq *rs) {
  static const int ks[] = {0, 6};
  int n = 0;
  for (int c = 0; c < f->n_cases; c++)
    for (size_t j = 0; j < sizeof ks / sizeof *ks; j++) {
      continuation(&f->cases[c], ks[j], &rs[n++]);
    }
  return n;
}

/* Small pages, a KV cache that holds only some requests at once, a budget of
 * 24 tokens per step and chunks of 7: prefill and decode mix in most steps. */
/* sampler_threads: 4 (the top-logprob threads; test_alone_equals_together compares this
 * engine's batched draws with one request at a time on 1). */
static epic_engine *tight_engine(fixture *f) {
  epic_engine_params p = {.size = sizeof p,
                          .model = f->m,
                          .page_size = 4,
                          .kv_pages = 160,
                          .max_batch = 7,
                          .step_tokens = 24,
                          .prefill_chunk = 7,
                          .sampler_threads = 4};
  epic_engine *e = NULL;
  assert_int_equal(epic_engine_create(&p, &e), EPIC_OK);
  return e;
}

typedef struct driver {
  epic_engine *e;
  epic_status st;
} driver;

static void *drive(void *arg) {
  driver *d = arg;
  d->st = epic_engine_run(d->e);
  return NULL;
}

static void check_reference(rq *rs, int n) {
  for (int i = 0; i < n; i++) {
    assert_false(rs[i].bad);
    assert_int_equal(rs[i].finishes, 1);
    assert_int_equal(rs[i].res.finish, EPIC_ENGINE_FINISH_LENGTH);
    assert_int_equal(rs[i].res.completion_tokens, rs[i].n_expect);
    assert_int_equal(rs[i].res.prompt_tokens, rs[i].n_prompt);
    assert_int_equal(rs[i].n_out, rs[i].n_expect);
    assert_memory_equal(rs[i].out, rs[i].expect, (size_t)rs[i].n_expect * sizeof(int32_t));
    assert_true(rs[i].res.total_seconds >= rs[i].res.ttft_seconds);
    assert_true(rs[i].res.ttft_seconds >= rs[i].res.queue_seconds);
  }
}

/* All requests submitted from another thread while the engine runs (it starts
 * idle and must wake up), then a draining shutdown. */
static void test_concurrent_reference(void **state) {
  fixture *f = *state;
  rq rs[MAX_REQ];
  int n = make_requests(f, rs);
  epic_engine *e = tight_engine(f);
  driver d = {.e = e, .st = EPIC_ERR_INVALID};
  pthread_t th;
  epic_engine_stats s;
  int64_t gen = 0, prompt = 0;
  assert_int_equal(pthread_create(&th, NULL, drive, &d), 0);
  for (int i = 0; i < n; i++) {
    assert_int_equal(submit(e, &rs[i], NULL), EPIC_OK);
    gen += rs[i].max_new;
    prompt += rs[i].n_prompt;
  }
  epic_engine_shutdown(e, 1);
  assert_int_equal(pthread_join(th, NULL), 0);
  assert_int_equal(d.st, EPIC_OK);
  check_reference(rs, n);
  epic_engine_get_stats(e, &s);
  assert_int_equal(s.finished, n);
  assert_int_equal(s.cancelled, 0);
  assert_int_equal(s.generated_tokens, gen);
  assert_int_equal(s.prompt_tokens, prompt);
  assert_int_equal(s.queued, 0);
  assert_int_equal(s.running, 0);
  assert_int_equal(s.kv_pages_used, 0);
  assert_int_equal(s.kv_pages_total, 160);
  assert_int_equal(s.nranks, 1);
  /* Fewer steps than tokens: sequences really shared steps. */
  assert_true(s.steps < gen);
  epic_engine_destroy(e);
}

/* Steps with the input open (epic_engine_set_input_open): requests arriving one by one
 * while the engine runs give the steps of the same requests all queued before it started
 * (the same step count, and the references): what makes a batch job's steps, and so its
 * outputs in the GPUs' fast precision, the same run after run. */
static void test_input_open_steps(void **state) {
  fixture *f = *state;
  rq all[MAX_REQ], trickled[MAX_REQ];
  const int n = make_requests(f, all);
  make_requests(f, trickled);
  epic_engine_stats sa, st;
  epic_engine *e = tight_engine(f);
  for (int i = 0; i < n; i++)
    assert_int_equal(submit(e, &all[i], NULL), EPIC_OK);
  epic_engine_shutdown(e, 1);
  assert_int_equal(epic_engine_run(e), EPIC_OK);
  epic_engine_get_stats(e, &sa);
  epic_engine_destroy(e);
  check_reference(all, n);

  e = tight_engine(f);
  epic_engine_set_input_open(e, 1);
  driver d = {.e = e, .st = EPIC_ERR_INVALID};
  pthread_t th;
  assert_int_equal(pthread_create(&th, NULL, drive, &d), 0);
  for (int i = 0; i < n; i++) {
    const struct timespec pause = {0, 3 * 1000 * 1000}; /* longer than a step here */
    nanosleep(&pause, NULL);
    assert_int_equal(submit(e, &trickled[i], NULL), EPIC_OK);
  }
  epic_engine_set_input_open(e, 0);
  epic_engine_shutdown(e, 1);
  assert_int_equal(pthread_join(th, NULL), 0);
  assert_int_equal(d.st, EPIC_OK);
  epic_engine_get_stats(e, &st);
  epic_engine_destroy(e);
  check_reference(trickled, n);
  print_message("input open: %lld steps, all queued first: %lld\n", (long long)st.steps,
                (long long)sa.steps);
  assert_int_equal(st.steps, sa.steps);
}

/* Each request alone (default engine) equals the concurrent run, also with
 * seeded sampling: a sequence's tokens do not depend on its batch. */
static void test_alone_equals_together(void **state) {
  fixture *f = *state;
  rq together[MAX_REQ], alone[MAX_REQ];
  int n = make_requests(f, together);
  epic_engine *e;
  int idle;
  for (int i = 1; i < n; i += 3) { /* every third request samples */
    together[i].sp = (epic_sampling_params){.size = sizeof(epic_sampling_params),
                                            .temperature = 0.9f,
                                            .top_p = 0.95f,
                                            .top_k = i % 2 ? 0 : 50,
                                            .seed = 1000u + (uint64_t)i};
    together[i].sampled = 1;
  }
  memcpy(alone, together, (size_t)n * sizeof *together); /* the n requests in use */
  e = tight_engine(f);
  for (int i = 0; i < n; i++)
    assert_int_equal(submit(e, &together[i], NULL), EPIC_OK);
  do
    assert_int_equal(epic_engine_step(e, &idle), EPIC_OK);
  while (!idle);
  epic_engine_destroy(e);

  epic_engine_params p = {.size = sizeof p, .model = f->m, .kv_pages = 16, .sampler_threads = 1};
  assert_int_equal(epic_engine_create(&p, &e), EPIC_OK);
  for (int i = 0; i < n; i++) {
    assert_int_equal(submit(e, &alone[i], NULL), EPIC_OK);
    do
      assert_int_equal(epic_engine_step(e, &idle), EPIC_OK);
    while (!idle);
    assert_int_equal(alone[i].finishes, 1);
  }
  epic_engine_destroy(e);
  int sampled_differs = 0;
  for (int i = 0; i < n; i++) {
    const size_t bytes = (size_t)together[i].n_expect * sizeof(int32_t);
    assert_false(together[i].bad || alone[i].bad);
    assert_int_equal(together[i].finishes, 1);
    assert_int_equal(together[i].n_out, alone[i].n_out);
    assert_int_equal(together[i].n_out, together[i].max_new);
    assert_memory_equal(together[i].out, alone[i].out, (size_t)alone[i].n_out * sizeof(int32_t));
    if (!together[i].sampled)
      assert_memory_equal(together[i].out, together[i].expect, bytes);
    else
      sampled_differs += memcmp(together[i].out, together[i].expect, bytes) != 0;
  }
  assert_true(sampled_differs > 0); /* sampling really sampled */
}

/* Stop ids, on_token stop and cancel, epic_engine_cancel of queued and running requests. */
static void test_stops_and_cancel(void **state) {
  fixture *f = *state;
  rq r[6];
  uint64_t ids[6];
  int idle;
  epic_engine_params p = {
      .size = sizeof p, .model = f->m, .page_size = 4, .kv_pages = 64, .max_batch = 3};
  epic_engine *e;
  for (int i = 0; i < 6; i++)
    r[i] = f->cases[i % f->n_cases];
  r[0].stop_id = r[0].expect[5]; /* ends at its first occurrence */
  r[1].stop_after = 3;           /* on_token: 1 */
  r[2].cancel_after = 4;         /* on_token: -1 */
  assert_int_equal(epic_engine_create(&p, &e), EPIC_OK);
  for (int i = 0; i < 6; i++)
    assert_int_equal(submit(e, &r[i], &ids[i]), EPIC_OK);
  epic_engine_cancel(e, ids[5]); /* queued (max_batch 3) */
  epic_engine_cancel(e, 12345);  /* unknown: ignored */
  assert_int_equal(epic_engine_step(e, &idle), EPIC_OK);
  assert_false(idle);
  assert_int_equal(r[5].finishes, 1);
  assert_int_equal(r[5].res.finish, EPIC_ENGINE_FINISH_CANCELLED);
  assert_int_equal(r[5].n_out, 0);
  for (int k = 0; k < 6; k++)
    assert_int_equal(epic_engine_step(e, &idle), EPIC_OK);
  epic_engine_cancel(e, ids[4]); /* running by now */
  do
    assert_int_equal(epic_engine_step(e, &idle), EPIC_OK);
  while (!idle);
  epic_engine_cancel(e, ids[0]); /* finished: ignored */
  assert_int_equal(epic_engine_step(e, &idle), EPIC_OK);
  assert_true(idle);

  int first = 0;
  while (r[0].expect[first] != r[0].stop_id)
    first++;
  assert_int_equal(r[0].res.finish, EPIC_ENGINE_FINISH_STOP);
  assert_int_equal(r[0].n_out, first + 1);
  assert_memory_equal(r[0].out, r[0].expect, (size_t)(first + 1) * sizeof(int32_t));
  assert_int_equal(r[1].res.finish, EPIC_ENGINE_FINISH_STOP);
  assert_int_equal(r[1].n_out, 3);
  assert_int_equal(r[2].res.finish, EPIC_ENGINE_FINISH_CANCELLED);
  assert_int_equal(r[2].n_out, 4);
  assert_int_equal(r[3].res.finish, EPIC_ENGINE_FINISH_LENGTH);
  assert_memory_equal(r[3].out, r[3].expect, 16 * sizeof(int32_t));
  assert_int_equal(r[4].res.finish, EPIC_ENGINE_FINISH_CANCELLED);
  assert_true(r[4].n_out < 16);
  assert_memory_equal(r[4].out, r[4].expect, (size_t)r[4].n_out * sizeof(int32_t));
  for (int i = 0; i < 6; i++)
    assert_int_equal(r[i].finishes, 1);
  epic_engine_stats s;
  epic_engine_get_stats(e, &s);
  assert_int_equal(s.cancelled, 3);
  assert_int_equal(s.finished, 3);
  assert_int_equal(s.kv_pages_used, 0);
  epic_engine_destroy(e);
}

/* Bad requests are refused without a callback; a full queue answers BUSY; a
 * request that can never fit in the KV cache is invalid. */
static void test_validation_and_limits(void **state) {
  fixture *f = *state;
  epic_engine_params p = {
      .size = sizeof p, .model = f->m, .page_size = 4, .kv_pages = 8, .max_queue = 2};
  epic_engine *e;
  rq r = f->cases[1], ok[3];
  assert_int_equal(epic_engine_create(&p, &e), EPIC_OK);
  r.prompt[2] = 1 << 20;
  assert_int_equal(submit(e, &r, NULL), EPIC_ERR_INVALID);
  r = f->cases[1];
  r.max_new = 0;
  assert_int_equal(submit(e, &r, NULL), EPIC_ERR_INVALID);
  r.max_new = 163840;
  assert_int_equal(submit(e, &r, NULL), EPIC_ERR_INVALID); /* beyond the context */
  r.max_new = 40;
  assert_int_equal(submit(e, &r, NULL), EPIC_ERR_INVALID); /* 45 tokens > 8 pages of 4 */
  r = f->cases[1];
  r.sp.top_p = 0;
  assert_int_equal(submit(e, &r, NULL), EPIC_ERR_INVALID);
  r = f->cases[1];
  r.sp.temperature = -1;
  assert_int_equal(submit(e, &r, NULL), EPIC_ERR_INVALID);
  r = f->cases[1];
  r.n_prompt = 0;
  assert_int_equal(submit(e, &r, NULL), EPIC_ERR_INVALID);
  assert_int_equal(r.finishes, 0);
  for (int i = 0; i < 3; i++)
    ok[i] = f->cases[1];
  assert_int_equal(submit(e, &ok[0], NULL), EPIC_OK);
  assert_int_equal(submit(e, &ok[1], NULL), EPIC_OK);
  assert_int_equal(submit(e, &ok[2], NULL), EPIC_ERR_BUSY);
  epic_engine_stats s;
  epic_engine_get_stats(e, &s);
  assert_int_equal(s.queued, 2);
  /* Destroying with live requests cancels them (exactly one on_finish each). */
  epic_engine_destroy(e);
  assert_int_equal(ok[0].finishes, 1);
  assert_int_equal(ok[0].res.finish, EPIC_ENGINE_FINISH_CANCELLED);
  assert_int_equal(ok[1].finishes, 1);
  assert_int_equal(ok[2].finishes, 0);

  /* Bad engine parameters name the field. */
  epic_engine_params bad = p;
  bad.micro_batches = 3;
  assert_int_equal(epic_engine_create(&bad, &e), EPIC_ERR_INVALID);
  bad = p;
  bad.max_context = 1 << 30;
  assert_int_equal(epic_engine_create(&bad, &e), EPIC_ERR_INVALID);
  bad = p;
  bad.size = 8;
  assert_int_equal(epic_engine_create(&bad, &e), EPIC_ERR_INVALID);
}

/* A non-draining shutdown cancels queued and running requests; submit then refuses. */
static void test_shutdown_cancels(void **state) {
  fixture *f = *state;
  rq r[4];
  int idle;
  epic_engine *e = tight_engine(f);
  for (int i = 0; i < 4; i++) {
    r[i] = f->cases[i];
    assert_int_equal(submit(e, &r[i], NULL), EPIC_OK);
  }
  for (int k = 0; k < 3; k++)
    assert_int_equal(epic_engine_step(e, &idle), EPIC_OK);
  epic_engine_shutdown(e, 0);
  assert_int_equal(submit(e, &r[0], NULL), EPIC_ERR_CANCELLED);
  assert_int_equal(epic_engine_run(e), EPIC_OK);
  for (int i = 0; i < 4; i++) {
    assert_int_equal(r[i].finishes, 1);
    assert_int_equal(r[i].res.finish, EPIC_ENGINE_FINISH_CANCELLED);
  }
  epic_engine_stats s;
  epic_engine_get_stats(e, &s);
  assert_int_equal(s.kv_pages_used, 0);
  assert_int_equal(s.running + s.queued, 0);
  epic_engine_destroy(e);
}

/* epic_top_logprobs against a brute-force sort of a row with ties. */
static void test_top_logprobs_row(void **state) {
  (void)state;
  enum { N = 300 };
  float l[N];
  for (int i = 0; i < N; i++)
    l[i] = (float)((i * 37) % 101) * 0.05f - 2.0f; /* values repeat: ties by id */
  double mx = -1e30, sum = 0;
  for (int i = 0; i < N; i++)
    mx = l[i] > mx ? l[i] : mx;
  for (int i = 0; i < N; i++)
    sum += exp((double)l[i] - mx);
  int32_t ids[20];
  float lps[20];
  assert_int_equal(epic_top_logprobs(l, N, 20, ids, lps), 20);
  int used[N] = {0};
  for (int j = 0; j < 20; j++) {
    int best = -1; /* the j-th by (logit desc, id asc) */
    for (int i = 0; i < N; i++)
      if (!used[i] && (best < 0 || l[i] > l[best]))
        best = i;
    used[best] = 1;
    assert_int_equal(ids[j], best);
    assert_true(fabs((double)lps[j] - ((double)l[best] - mx - log(sum))) < 1e-5);
  }
  assert_int_equal(epic_top_logprobs(l, 3, 20, ids, lps), 3);
  assert_int_equal(epic_top_logprobs(l, N, 0, ids, lps), 0);
  /* with the normaliser given (the executor's form, from a greedy pick): the same ids and
   * values to float rounding */
  int32_t ids2[20];
  float lps2[20];
  assert_int_equal(epic_top_logprobs(l, N, 20, ids, lps), 20);
  assert_int_equal(epic_top_logprobs_lse(l, N, 20, mx + log(sum), ids2, lps2), 20);
  assert_memory_equal(ids, ids2, sizeof ids);
  for (int j = 0; j < 20; j++)
    assert_true(fabsf(lps[j] - lps2[j]) <= 1e-6f);
  assert_int_equal(epic_top_logprobs_lse(l, 3, 20, 0.0, ids2, lps2), 3);
  assert_int_equal(epic_top_logprobs_lse(l, N, 0, 0.0, ids2, lps2), 0);
}

typedef struct toprq {
  rq r;
  int n_top;
  int32_t top_ids[MAX_OUT][EPIC_ENGINE_MAX_TOP_LOGPROBS];
  float top_lp[MAX_OUT][EPIC_ENGINE_MAX_TOP_LOGPROBS];
  float lp[MAX_OUT];
  int got_top[MAX_OUT];
} toprq;

static int on_token_top(void *user, const epic_engine_token *t) {
  toprq *q = user;
  int k = q->r.n_out;
  if (k < MAX_OUT) {
    q->got_top[k] = t->n_top;
    q->lp[k] = t->logprob;
    for (int j = 0; j < t->n_top && j < EPIC_ENGINE_MAX_TOP_LOGPROBS; j++) {
      q->top_ids[k][j] = t->top_ids[j];
      q->top_lp[k][j] = t->top_logprobs[j];
    }
  }
  return on_token(&q->r, t->id, t->logprob);
}

/* Top logprobs come from the same logits row as the sampled token: greedy
 * output is unchanged and equals the top-1 id with the same logprob; sampled
 * tokens in the list carry the list's logprob, others rank below its last. */
static void test_top_logprobs_engine(void **state) {
  fixture *f = *state;
  enum { TOP = 5 };
  static toprq q[4];
  epic_engine_params p = {.size = sizeof p, .model = f->m, .page_size = 4, .kv_pages = 160,
                          .top_logprobs = TOP};
  epic_engine *e = NULL;
  assert_int_equal(epic_engine_create(&p, &e), EPIC_OK);
  for (int i = 0; i < 4; i++) {
    memset(&q[i], 0, sizeof q[i]);
    q[i].r = f->cases[i % f->n_cases];
    q[i].n_top = i == 3 ? 0 : TOP - i; /* 5, 4, 3 and none */
    if (i == 1) {
      q[i].r.sp.temperature = 1.0f;
      q[i].r.sp.seed = 7;
      q[i].r.sampled = 1;
    }
    epic_engine_request er = {.size = sizeof er,
                              .prompt = q[i].r.prompt,
                              .n_prompt = q[i].r.n_prompt,
                              .max_new_tokens = q[i].r.max_new,
                              .sampling = q[i].r.sp,
                              .ignore_eos = 1,
                              .on_token_top = on_token_top,
                              .top_logprobs = q[i].n_top,
                              .on_finish = on_finish,
                              .user = &q[i]};
    assert_int_equal(epic_engine_submit(e, &er, NULL), EPIC_OK);
  }
  epic_engine_request over = {.size = sizeof over, .prompt = q[0].r.prompt, .n_prompt = 1,
                              .max_new_tokens = 1, .sampling = greedy(),
                              .top_logprobs = TOP + 1};
  assert_int_equal(epic_engine_submit(e, &over, NULL), EPIC_ERR_INVALID);
  epic_engine_shutdown(e, 1);
  assert_int_equal(epic_engine_run(e), EPIC_OK);
  for (int i = 0; i < 4; i++) {
    rq *r = &q[i].r;
    assert_int_equal(r->bad, 0);
    assert_int_equal(r->finishes, 1);
    assert_int_equal(r->n_out, r->max_new);
    if (!r->sampled)
      assert_memory_equal(r->out, r->expect, (size_t)r->n_expect * sizeof *r->out);
    for (int k = 0; k < r->n_out; k++) {
      assert_int_equal(q[i].got_top[k], q[i].n_top);
      for (int j = 1; j < q[i].n_top; j++)
        assert_true(q[i].top_lp[k][j] <= q[i].top_lp[k][j - 1]);
      if (q[i].n_top == 0)
        continue;
      if (!r->sampled) {
        assert_int_equal(q[i].top_ids[k][0], r->out[k]);
        assert_true(q[i].top_lp[k][0] == q[i].lp[k]);
      }
      int found = 0;
      for (int j = 0; j < q[i].n_top; j++)
        if (q[i].top_ids[k][j] == r->out[k]) {
          found = 1;
          assert_true(q[i].top_lp[k][j] == q[i].lp[k]);
        }
      if (!found)
        assert_true(q[i].lp[k] <= q[i].top_lp[k][q[i].n_top - 1]);
    }
  }
  epic_engine_stats s;
  epic_engine_get_stats(e, &s);
  assert_int_equal(s.ttft.count, 4);
  assert_int_equal(s.e2e.count, 4);
  assert_int_equal(s.tpot.count, 4);
  int64_t in_buckets = 0;
  for (int b = 0; b <= EPIC_HIST_BOUNDS; b++)
    in_buckets += s.e2e.bucket[b];
  assert_int_equal(in_buckets, 4);
  assert_true(s.e2e.sum >= s.ttft.sum && s.ttft.sum > 0);
  epic_engine_destroy(e);
  /* An engine without top_logprobs refuses requests that ask for them. */
  p.top_logprobs = 0;
  assert_int_equal(epic_engine_create(&p, &e), EPIC_OK);
  over.top_logprobs = 1;
  assert_int_equal(epic_engine_submit(e, &over, NULL), EPIC_ERR_INVALID);
  epic_engine_destroy(e);
  p.top_logprobs = EPIC_ENGINE_MAX_TOP_LOGPROBS + 1;
  assert_int_equal(epic_engine_create(&p, &e), EPIC_ERR_INVALID);
}

/* Requests sharing prompt prefixes: each case, then continuations of it by k
 * of its reference tokens (k = 3, 4, 8: prefixes that are and are not page
 * multiples with pages of 4) and the case again (a prefix equal to the whole
 * prompt). Greedy references hold with the prefix cache on and off. */
static int make_prefix_requests(const fixture *f, rq *rs) {
  static const int ks[] = {0, 3, 4, 0, 8};
  int n = 0;
  for (int c = 0; c < f->n_cases && c < 3; c++)
    for (size_t j = 0; j < sizeof ks / sizeof *ks; j++) {
      continuation(&f->cases[c], ks[j], &rs[n++]);
    }
  return n;
}

static void run_one_by_one(epic_engine *e, rq *rs, int n) {
  int idle;
  for (int i = 0; i < n; i++) {
    assert_int_equal(submit(e, &rs[i], NULL), EPIC_OK);
    do
      assert_int_equal(epic_engine_step(e, &idle), EPIC_OK);
    while (!idle);
  }
}

/* Same greedy outputs with and without the prefix cache, one request at a time
 * (hits on every later request of a case) and all at once; hits are counted and
 * the prompt-token count still covers the cached part. */
static void test_prefix_cache_identical(void **state) {
  fixture *f = *state;
  static rq on[MAX_REQ], off[MAX_REQ], together[MAX_REQ];
  int n = make_prefix_requests(f, on);
  int64_t prompt = 0, hits = 0;
  memcpy(off, on, sizeof on);
  memcpy(together, on, sizeof on);
  for (int i = 0; i < n; i++) {
    prompt += on[i].n_prompt;
    /* Every later request of a case hits the case prompt's first page when
     * there is one and it may skip a page (its last token is always computed). */
    const int64_t first = on[i - i % 5].n_prompt;
    hits += i % 5 != 0 && first >= 4 && on[i].n_prompt > 4;
  }
  epic_engine_params p = {.size = sizeof p,
                          .model = f->m,
                          .page_size = 4,
                          .kv_pages = 160,
                          .step_tokens = 24,
                          .prefill_chunk = 7};
  epic_engine *e;
  epic_engine_stats s;
  assert_int_equal(epic_engine_create(&p, &e), EPIC_OK); /* cache on by default */
  run_one_by_one(e, on, n);
  epic_engine_get_stats(e, &s);
  check_reference(on, n);
  assert_true(s.prefix_hits >= hits); /* more: continuations publish pages too */
  assert_true(hits > 0);
  assert_true(s.prefix_hit_tokens >= 4 * s.prefix_hits);
  assert_int_equal(s.prompt_tokens, prompt);
  assert_int_equal(s.kv_pages_used, 0);
  assert_true(s.prefix_cached_pages > 0 && s.prefix_cached_pages <= s.prefix_cache_pages);
  epic_engine_destroy(e);

  p.prefix_cache_pages = -1;
  assert_int_equal(epic_engine_create(&p, &e), EPIC_OK);
  run_one_by_one(e, off, n);
  epic_engine_get_stats(e, &s);
  check_reference(off, n);
  assert_int_equal(s.prefix_hits, 0);
  assert_int_equal(s.prefix_cache_pages, 0);
  epic_engine_destroy(e);

  /* All at once with a few cached pages first: hits and fresh prefills share steps. */
  p.prefix_cache_pages = 0;
  p.max_batch = 7;
  assert_int_equal(epic_engine_create(&p, &e), EPIC_OK);
  run_one_by_one(e, together, 1);
  int idle;
  for (int i = 1; i < n; i++)
    assert_int_equal(submit(e, &together[i], NULL), EPIC_OK);
  do
    assert_int_equal(epic_engine_step(e, &idle), EPIC_OK);
  while (!idle);
  check_reference(together, n);
  epic_engine_get_stats(e, &s);
  assert_true(s.prefix_hits > 0);
  epic_engine_destroy(e);
}

/* A small KV cache and a budget of 6 pages: cached pages are evicted (LRU) as
 * new prompts need them, never more than the budget stay idle, outputs keep
 * matching the references, and a prompt whose pages were evicted recomputes. */
static void test_prefix_cache_eviction(void **state) {
  fixture *f = *state;
  static rq rs[MAX_REQ];
  int n = make_prefix_requests(f, rs);
  epic_engine_params p = {.size = sizeof p,
                          .model = f->m,
                          .page_size = 4,
                          .kv_pages = 48,
                          .prefix_cache_pages = 6,
                          .step_tokens = 24,
                          .prefill_chunk = 7};
  epic_engine *e;
  epic_engine_stats s;
  assert_int_equal(epic_engine_create(&p, &e), EPIC_OK);
  for (int round = 0; round < 2; round++) {
    rq batch[MAX_REQ];
    memcpy(batch, rs, sizeof batch);
    run_one_by_one(e, batch, n);
    check_reference(batch, n);
    epic_engine_get_stats(e, &s);
    assert_true(s.prefix_cached_pages <= 6);
    assert_int_equal(s.kv_pages_used, 0);
  }
  assert_true(s.prefix_evictions > 0);
  assert_true(s.prefix_hits > 0);
  epic_engine_destroy(e);
}

int main(void) {
  const struct CMUnitTest bf16[] = {
      cmocka_unit_test(test_top_logprobs_row),      cmocka_unit_test(test_top_logprobs_engine),
      cmocka_unit_test(test_concurrent_reference),  cmocka_unit_test(test_input_open_steps),
      cmocka_unit_test(test_alone_equals_together), cmocka_unit_test(test_stops_and_cancel),
      cmocka_unit_test(test_validation_and_limits), cmocka_unit_test(test_shutdown_cancels),
      cmocka_unit_test(test_prefix_cache_identical), cmocka_unit_test(test_prefix_cache_eviction),
  };
  const struct CMUnitTest device[] = {
      cmocka_unit_test(test_concurrent_reference), cmocka_unit_test(test_alone_equals_together),
      cmocka_unit_test(test_prefix_cache_identical), cmocka_unit_test(test_prefix_cache_eviction),
  };
  if (getenv("EPIC_TEST_FILTER")) /* run a subset: EPIC_TEST_FILTER=test_stops* */
    cmocka_set_test_filter(getenv("EPIC_TEST_FILTER"));
  int rc = cmocka_run_group_tests_name("engine tiny-bf16", bf16, setup_bf16, teardown);
  rc |= cmocka_run_group_tests_name("engine tiny-bf16, device paths", device, setup_bf16_device,
                                    teardown);
  return rc;
}
