/* Every configurable request limit of the gateway (epic_gw_request_limits,
 * issue #12) refuses a request just over it with INVALID_ARGUMENT naming the
 * field and the flag, and accepts one at the limit. */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/gateway_impl.h"

static epic_tokenizer *tok;

static int setup(void **state) {
  (void)state;
  const char *fx = getenv("EPIC_FIXTURES");
  char dir[4096];
  snprintf(dir, sizeof dir, "%s/tiny-bf16", fx ? fx : "../shared/fixtures");
  return epic_tokenizer_load_dir(dir, &tok) == EPIC_OK ? 0 : -1;
}

static int teardown(void **state) {
  (void)state;
  epic_tokenizer_destroy(tok);
  return 0;
}

static epic_gw_limits limits(void) {
  return (epic_gw_limits){.tok = tok,
                          .vocab_size = 1280,
                          .max_context = 1000,
                          .default_max_tokens = 100,
                          .req = {.max_prompt_tokens = 4,
                                  .max_tokens = 20,
                                  .max_stop_strings = 2,
                                  .max_stop_len = 5,
                                  .max_stop_token_ids = 3,
                                  .max_n = 2,
                                  .max_top_logprobs = 5}};
}

typedef struct req {
  Epic__V1__GenerateRequest rq;
  Epic__V1__Prompt prompt;
  Epic__V1__TokenIds ids;
  Epic__V1__SamplingParams sp;
  int32_t id_buf[16];
} req;

static void req_ids(req *r, size_t n) {
  Epic__V1__GenerateRequest rq = EPIC__V1__GENERATE_REQUEST__INIT;
  Epic__V1__Prompt p = EPIC__V1__PROMPT__INIT;
  Epic__V1__TokenIds t = EPIC__V1__TOKEN_IDS__INIT;
  Epic__V1__SamplingParams sp = EPIC__V1__SAMPLING_PARAMS__INIT;
  r->rq = rq;
  r->prompt = p;
  r->ids = t;
  r->sp = sp;
  for (size_t i = 0; i < n; i++)
    r->id_buf[i] = (int32_t)(10 + i);
  r->ids.n_ids = n;
  r->ids.ids = r->id_buf;
  r->prompt.kind_case = EPIC__V1__PROMPT__KIND_TOKEN_IDS;
  r->prompt.token_ids = &r->ids;
  r->rq.prompt = &r->prompt;
  r->rq.sampling = &r->sp;
}

static void expect(req *r, const epic_gw_limits *lim, const char *want) {
  char err[EPIC_GW_ERR_LEN];
  epic_gw_job job;
  epic_status st = epic_gw_prepare(&r->rq, lim, &job, err);
  epic_gw_job_clear(&job);
  if (!want) {
    if (st != EPIC_OK)
      fail_msg("expected OK, got '%s'", err);
    return;
  }
  if (st != EPIC_ERR_INVALID || !strstr(err, want))
    fail_msg("expected '%s', got status %d '%s'", want, (int)st, err);
}

static void prompt_tokens(void **state) {
  (void)state;
  epic_gw_limits lim = limits();
  req r;
  req_ids(&r, 4);
  expect(&r, &lim, NULL);
  req_ids(&r, 5);
  expect(&r, &lim, "prompt.token_ids.ids: 5 tokens exceed --max-prompt-tokens 4");
  /* A text prompt is counted after encoding. */
  req_ids(&r, 1);
  r.prompt.kind_case = EPIC__V1__PROMPT__KIND_TEXT;
  r.prompt.text = "Hello world, this is a longer prompt of many tokens";
  expect(&r, &lim, "prompt: ");
  expect(&r, &lim, "tokens exceed --max-prompt-tokens 4");
}

static void max_tokens(void **state) {
  (void)state;
  epic_gw_limits lim = limits();
  req r;
  req_ids(&r, 2);
  r.sp.max_tokens_present_case = EPIC__V1__SAMPLING_PARAMS__MAX_TOKENS_PRESENT_MAX_TOKENS;
  r.sp.max_tokens = 20;
  expect(&r, &lim, NULL);
  r.sp.max_tokens = 21;
  expect(&r, &lim, "sampling.max_tokens: 21 exceeds --max-tokens-limit 20");
  /* The default is clamped to the limit, not refused. */
  r.sp.max_tokens_present_case = EPIC__V1__SAMPLING_PARAMS__MAX_TOKENS_PRESENT__NOT_SET;
  char err[EPIC_GW_ERR_LEN];
  epic_gw_job job;
  assert_int_equal(epic_gw_prepare(&r.rq, &lim, &job, err), EPIC_OK);
  assert_int_equal(job.max_tokens, 20);
  epic_gw_job_clear(&job);
}

static void stops(void **state) {
  (void)state;
  epic_gw_limits lim = limits();
  req r;
  req_ids(&r, 2);
  char *two[] = {"ab", "cdefg"}, *three[] = {"a", "b", "c"}, *longer[] = {"abcdef"};
  r.sp.n_stop = 2;
  r.sp.stop = two;
  expect(&r, &lim, NULL);
  r.sp.n_stop = 3;
  r.sp.stop = three;
  expect(&r, &lim, "sampling.stop: 3 stop strings exceed --max-stop-strings 2");
  r.sp.n_stop = 1;
  r.sp.stop = longer;
  expect(&r, &lim, "sampling.stop[0]: 6 bytes exceed --max-stop-len 5");
  r.sp.n_stop = 0;
  int32_t ids[4] = {1, 2, 3, 4};
  r.sp.stop_token_ids = ids;
  r.sp.n_stop_token_ids = 3;
  expect(&r, &lim, NULL);
  r.sp.n_stop_token_ids = 4;
  expect(&r, &lim, "sampling.stop_token_ids: 4 ids exceed --max-stop-token-ids 3");
}

static void choices(void **state) {
  (void)state;
  epic_gw_limits lim = limits();
  char err[EPIC_GW_ERR_LEN];
  assert_int_equal(epic_gw_check_choices(2, "n", 5, "top_logprobs", &lim, err), EPIC_OK);
  assert_int_equal(epic_gw_check_choices(3, "n", 0, "top_logprobs", &lim, err), EPIC_ERR_INVALID);
  assert_string_equal(err, "n: 3 exceeds --max-n 2");
  assert_int_equal(epic_gw_check_choices(1, "n", 6, "top_logprobs", &lim, err), EPIC_ERR_INVALID);
  assert_string_equal(err, "top_logprobs: 6 exceeds --max-top-logprobs 5");
  assert_int_equal(epic_gw_check_choices(0, "n", 0, "top_logprobs", &lim, err), EPIC_ERR_INVALID);
  /* Defaults: what OpenAI clients send (n up to 16, 20 alternatives); -1 = none. */
  epic_gw_request_limits d = epic_gw_limits_effective(NULL);
  assert_int_equal(d.max_n, EPIC_GW_DEFAULT_MAX_N);
  assert_int_equal(d.max_top_logprobs, EPIC_GW_DEFAULT_MAX_TOP_LOGPROBS);
  epic_gw_request_limits none = {.max_top_logprobs = -1};
  assert_int_equal(epic_gw_limits_effective(&none).max_top_logprobs, 0);
  lim.req.max_top_logprobs = -1;
  assert_int_equal(epic_gw_check_choices(1, "n", 1, "top_logprobs", &lim, err), EPIC_ERR_INVALID);
  assert_string_equal(err, "top_logprobs: 1 exceeds --max-top-logprobs 0");
  assert_int_equal(d.max_stop_strings, EPIC_GW_MAX_STOPS);
  assert_int_equal(d.max_stop_len, EPIC_GW_MAX_STOP_LEN);
  assert_int_equal(d.max_stop_token_ids, EPIC_GW_MAX_STOP_IDS);
  assert_int_equal(d.max_prompt_tokens, 0);
  assert_int_equal(d.max_tokens, 0);
}

/* Regression (fuzz_gw_request): pushing no text before any text was held
 * passed a NULL buffer to memmem / pointer arithmetic (UBSan). */
static void stopper_empty_push(void **state) {
  (void)state;
  char *s[] = {"wor"};
  size_t len[] = {3};
  epic_gw_stops stops = {.s = s, .len = len, .n = 1};
  epic_gw_stopper st;
  epic_gw_buf out = {0};
  epic_gw_stopper_init(&st, &stops);
  assert_int_equal(epic_gw_stopper_push(&st, "", 0, &out), EPIC_OK);
  assert_int_equal(epic_gw_stopper_push(&st, "hello w", 7, &out), EPIC_OK);
  assert_int_equal(epic_gw_stopper_push(&st, "", 0, &out), EPIC_OK);
  assert_int_equal(epic_gw_stopper_push(&st, "orld", 4, &out), EPIC_OK);
  assert_int_equal(st.matched, 0);
  assert_int_equal(out.n, 6);
  assert_memory_equal(out.p, "hello ", 6);
  epic_gw_stopper_free(&st);
  epic_gw_buf_free(&out);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(prompt_tokens), cmocka_unit_test(max_tokens),
                                     cmocka_unit_test(stops), cmocka_unit_test(choices),
                                     cmocka_unit_test(stopper_empty_push)};
  return cmocka_run_group_tests_name("gateway_limits", tests, setup, teardown);
}
