/* Unit tests of the gateway's pure parts (coordinator/gateway_impl.h): request
 * validation naming each bad field, prompt encoding with the fixture tokenizer,
 * stop-string hold-back on streamed text, and text packing that keeps NULs. */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/gateway_impl.h"

static epic_gw_limits limits(const epic_tokenizer *tok) {
  return (epic_gw_limits){.tok = tok,
                          .vocab_size = 1280,
                          .max_context = 50,
                          .default_max_tokens = 10,
                          .kv_tokens = 40,
                          .page_size = 8};
}

/* A GenerateRequest over token ids; the caller sets sampling fields. */
typedef struct req {
  Epic__V1__GenerateRequest rq;
  Epic__V1__Prompt prompt;
  Epic__V1__TokenIds ids;
  Epic__V1__SamplingParams sp;
  int32_t id_buf[8];
} req;

static void req_init(req *r, const int32_t *ids, size_t n) {
  Epic__V1__GenerateRequest rq = EPIC__V1__GENERATE_REQUEST__INIT;
  Epic__V1__Prompt p = EPIC__V1__PROMPT__INIT;
  Epic__V1__TokenIds t = EPIC__V1__TOKEN_IDS__INIT;
  Epic__V1__SamplingParams sp = EPIC__V1__SAMPLING_PARAMS__INIT;
  r->rq = rq;
  r->prompt = p;
  r->ids = t;
  r->sp = sp;
  memcpy(r->id_buf, ids, n * sizeof *ids);
  r->ids.n_ids = n;
  r->ids.ids = r->id_buf;
  r->prompt.kind_case = EPIC__V1__PROMPT__KIND_TOKEN_IDS;
  r->prompt.token_ids = &r->ids;
  r->rq.prompt = &r->prompt;
  r->rq.sampling = &r->sp;
}

/* prepare must fail with EPIC_ERR_INVALID and a message starting with field. */
static void expect_invalid(req *r, const epic_gw_limits *lim, const char *field) {
  char err[EPIC_GW_ERR_LEN];
  epic_gw_job job;
  epic_status st = epic_gw_prepare(&r->rq, lim, &job, err);
  epic_gw_job_clear(&job);
  if (st != EPIC_ERR_INVALID || strncmp(err, field, strlen(field)) != 0)
    fail_msg("want INVALID naming '%s', got %d '%s'", field, (int)st, err);
}

static void test_valid_ids(void **state) {
  (void)state;
  req r;
  const int32_t ids[] = {0, 5, 1279};
  req_init(&r, ids, 3);
  epic_gw_limits lim = limits(NULL);
  epic_gw_job job;
  char err[EPIC_GW_ERR_LEN];
  assert_int_equal(epic_gw_prepare(&r.rq, &lim, &job, err), EPIC_OK);
  assert_int_equal(job.n_prompt, 3);
  assert_memory_equal(job.prompt, ids, sizeof ids);
  assert_int_equal(job.max_tokens, 10); /* the default */
  assert_true(job.sampling.top_p == 1.0f && job.sampling.temperature == 0.0f);
  assert_int_equal(job.skip_special, 1);
  epic_gw_job_clear(&job);
  /* Explicit values pass through; the default shrinks to what the context leaves. */
  r.sp.max_tokens_present_case = EPIC__V1__SAMPLING_PARAMS__MAX_TOKENS_PRESENT_MAX_TOKENS;
  r.sp.max_tokens = 37;
  r.sp.top_p_present_case = EPIC__V1__SAMPLING_PARAMS__TOP_P_PRESENT_TOP_P;
  r.sp.top_p = 0.5f;
  r.sp.top_k = 3;
  r.sp.seed = 9;
  assert_int_equal(epic_gw_prepare(&r.rq, &lim, &job, err), EPIC_OK);
  assert_int_equal(job.max_tokens, 37);
  assert_true(job.sampling.top_p == 0.5f && job.sampling.top_k == 3 && job.sampling.seed == 9);
  epic_gw_job_clear(&job);
  lim.max_context = 8;
  lim.kv_tokens = 0;
  r.sp.max_tokens_present_case = EPIC__V1__SAMPLING_PARAMS__MAX_TOKENS_PRESENT__NOT_SET;
  assert_int_equal(epic_gw_prepare(&r.rq, &lim, &job, err), EPIC_OK);
  assert_int_equal(job.max_tokens, 5);
  epic_gw_job_clear(&job);
}

static void test_invalid_fields(void **state) {
  (void)state;
  const int32_t ids[] = {0, 5, 6};
  epic_gw_limits lim = limits(NULL);
  req r;
#define CASE(setup, field)                                                                         \
  do {                                                                                             \
    req_init(&r, ids, 3);                                                                          \
    setup;                                                                                         \
    expect_invalid(&r, &lim, field);                                                               \
  } while (0)
  CASE(r.rq.prompt = NULL, "prompt: missing");
  CASE(r.prompt.kind_case = EPIC__V1__PROMPT__KIND__NOT_SET, "prompt: missing");
  CASE(r.ids.n_ids = 0, "prompt.token_ids.ids: empty");
  CASE(r.id_buf[2] = 1280, "prompt.token_ids.ids[2]: 1280 is not a token id");
  CASE(r.id_buf[0] = -4, "prompt.token_ids.ids[0]");
  CASE((r.prompt.kind_case = EPIC__V1__PROMPT__KIND_TEXT, r.prompt.text = "hi"),
       "prompt.text: this model has no");
  CASE(r.sp.temperature = -1, "sampling.temperature");
  CASE(r.sp.temperature = NAN, "sampling.temperature");
  CASE((r.sp.top_p_present_case = EPIC__V1__SAMPLING_PARAMS__TOP_P_PRESENT_TOP_P, r.sp.top_p = 0),
       "sampling.top_p");
  CASE((r.sp.top_p_present_case = EPIC__V1__SAMPLING_PARAMS__TOP_P_PRESENT_TOP_P,
        r.sp.top_p = 1.01f),
       "sampling.top_p");
  CASE(r.sp.top_k = -2, "sampling.top_k");
  CASE((r.sp.max_tokens_present_case = EPIC__V1__SAMPLING_PARAMS__MAX_TOKENS_PRESENT_MAX_TOKENS,
        r.sp.max_tokens = 0),
       "sampling.max_tokens: 0 must be >= 1");
  CASE((r.sp.max_tokens_present_case = EPIC__V1__SAMPLING_PARAMS__MAX_TOKENS_PRESENT_MAX_TOKENS,
        r.sp.max_tokens = 48),
       "sampling.max_tokens: prompt (3 tokens) + max_tokens (48) exceeds the context length 50");
  /* 3 + 38 = 41 tokens round up to 48 > 40 tokens of KV cache. */
  CASE((r.sp.max_tokens_present_case = EPIC__V1__SAMPLING_PARAMS__MAX_TOKENS_PRESENT_MAX_TOKENS,
        r.sp.max_tokens = 38),
       "sampling.max_tokens: prompt (3 tokens) + max_tokens (38) needs 48 tokens of KV cache");
  int32_t stop_ids[] = {3, 2000};
  CASE((r.sp.n_stop_token_ids = 2, r.sp.stop_token_ids = stop_ids), "sampling.stop_token_ids[1]");
  char *stops[] = {"ok", "x"};
  CASE((r.sp.n_stop = 2, r.sp.stop = stops), "sampling.stop: this model has no tokenizer");
#undef CASE
  /* Context: a prompt that fills it leaves nothing to generate. */
  lim.max_context = 3;
  req_init(&r, ids, 3);
  expect_invalid(&r, &lim, "prompt: 3 tokens leave no room");
}

static epic_tokenizer *fixture_tokenizer(void) {
  const char *fx = getenv("EPIC_FIXTURES");
  char dir[4096];
  snprintf(dir, sizeof dir, "%s/tiny-bf16", fx ? fx : "../shared/fixtures");
  epic_tokenizer *tok = NULL;
  if (epic_tokenizer_load_dir(dir, &tok) != EPIC_OK)
    return NULL;
  return tok;
}

static void test_text_and_chat(void **state) {
  (void)state;
  epic_tokenizer *tok = fixture_tokenizer();
  if (!tok)
    skip();
  epic_gw_limits lim = limits(tok);
  char err[EPIC_GW_ERR_LEN];
  int32_t *ids = NULL, *want = NULL;
  int64_t n = 0;
  size_t nw = 0;
  Epic__V1__Prompt p = EPIC__V1__PROMPT__INIT;
  p.kind_case = EPIC__V1__PROMPT__KIND_TEXT;
  p.text = "Hello world";
  assert_int_equal(epic_gw_encode_prompt(&p, &lim, &ids, &n, NULL, NULL, err), EPIC_OK);
  assert_int_equal(epic_tokenizer_encode(tok, "Hello world", 11, 1, &want, &nw), EPIC_OK);
  assert_int_equal(n, (int64_t)nw);
  assert_memory_equal(ids, want, nw * sizeof *ids);
  assert_int_equal(ids[0], epic_tokenizer_bos_id(tok));
  free(ids);
  p.no_bos = 1;
  assert_int_equal(epic_gw_encode_prompt(&p, &lim, &ids, &n, NULL, NULL, err), EPIC_OK);
  assert_int_equal(n, (int64_t)nw - 1);
  assert_memory_equal(ids, want + 1, (nw - 1) * sizeof *ids);
  free(ids);
  epic_tokenizer_ids_free(want);
  p.text = "";
  assert_int_equal(epic_gw_encode_prompt(&p, &lim, &ids, &n, NULL, NULL, err), EPIC_ERR_INVALID);
  assert_string_equal(err, "prompt.text: empty");

  Epic__V1__ChatMessage m0 = EPIC__V1__CHAT_MESSAGE__INIT, m1 = EPIC__V1__CHAT_MESSAGE__INIT;
  Epic__V1__ChatMessage *msgs[2] = {&m0, &m1};
  Epic__V1__Chat chat = EPIC__V1__CHAT__INIT;
  m0.role = "system";
  m0.content = "Be brief";
  m1.role = "user";
  m1.content = "Hi";
  chat.n_messages = 2;
  chat.messages = msgs;
  p.kind_case = EPIC__V1__PROMPT__KIND_CHAT;
  p.chat = &chat;
  char *text = NULL;
  size_t text_len = 0;
  assert_int_equal(epic_gw_encode_prompt(&p, &lim, &ids, &n, &text, &text_len, err), EPIC_OK);
  assert_non_null(strstr(text, "Be brief"));
  assert_non_null(strstr(text, "Hi"));
  assert_true(n > 3);
  free(ids);
  epic_tokenizer_text_free(text);
  m1.role = "robot";
  assert_int_equal(epic_gw_encode_prompt(&p, &lim, &ids, &n, NULL, NULL, err), EPIC_ERR_INVALID);
  assert_non_null(strstr(err, "prompt.chat.messages[1].role: 'robot'"));
  m1.role = "user";
  chat.template_name = "v7";
  assert_int_equal(epic_gw_encode_prompt(&p, &lim, &ids, &n, NULL, NULL, err), EPIC_ERR_INVALID);
  assert_non_null(strstr(err, "prompt.chat.template_name"));
  chat.n_messages = 0;
  assert_int_equal(epic_gw_encode_prompt(&p, &lim, &ids, &n, NULL, NULL, err), EPIC_ERR_INVALID);
  assert_string_equal(err, "prompt.chat.messages: empty");

  /* Stop strings with a tokenizer: bounded, non-empty, valid UTF-8. */
  req r;
  const int32_t pid[] = {0, 5};
  char *bad_utf8[] = {"ok", "\xff"};
  char *empty[] = {""};
  char *many[EPIC_GW_MAX_STOPS + 1];
  char long_stop[EPIC_GW_MAX_STOP_LEN + 2];
  memset(long_stop, 'a', sizeof long_stop - 1);
  long_stop[sizeof long_stop - 1] = '\0';
  char *too_long[] = {long_stop};
  for (int i = 0; i <= EPIC_GW_MAX_STOPS; i++)
    many[i] = "s";
  req_init(&r, pid, 2);
  r.sp.n_stop = 2;
  r.sp.stop = bad_utf8;
  expect_invalid(&r, &lim, "sampling.stop[1]: not valid UTF-8");
  r.sp.n_stop = 1;
  r.sp.stop = empty;
  expect_invalid(&r, &lim, "sampling.stop[0]: empty");
  r.sp.n_stop = EPIC_GW_MAX_STOPS + 1;
  r.sp.stop = many;
  expect_invalid(&r, &lim, "sampling.stop: 17 stop strings");
  r.sp.n_stop = 1;
  r.sp.stop = too_long;
  expect_invalid(&r, &lim, "sampling.stop[0]: 257 bytes");
  char *fine[] = {"\xc3\xa9!", "ab"};
  r.sp.n_stop = 2;
  r.sp.stop = fine;
  epic_gw_job job;
  assert_int_equal(epic_gw_prepare(&r.rq, &lim, &job, err), EPIC_OK);
  assert_int_equal(job.stops.n, 2);
  assert_int_equal(job.stops.len[0], 3);
  assert_string_equal(job.stops.s[1], "ab");
  epic_gw_job_clear(&job);
  epic_tokenizer_destroy(tok);
}

/* Pushes pieces through a stopper; returns the released text (static buffer). */
static const char *feed(epic_gw_stopper *st, epic_gw_buf *out, const char *piece) {
  assert_int_equal(epic_gw_stopper_push(st, piece, strlen(piece), out), EPIC_OK);
  return out->n ? out->p : "";
}

static void test_stopper(void **state) {
  (void)state;
  char *s1[] = {"abc", "xyz"};
  size_t l1[] = {3, 3};
  epic_gw_stops stops = {.s = s1, .len = l1, .n = 2};
  epic_gw_stopper st;
  epic_gw_buf out = {0};
  epic_gw_stopper_init(&st, &stops);
  assert_string_equal(feed(&st, &out, "12a"), "12"); /* "a" may start "abc" */
  assert_string_equal(feed(&st, &out, "b"), "12");
  assert_string_equal(feed(&st, &out, "d"), "12abd");
  assert_string_equal(feed(&st, &out, "zzx"), "12abdzz");
  assert_string_equal(feed(&st, &out, "yq"), "12abdzzxyq");
  assert_int_equal(st.matched, -1);
  assert_string_equal(feed(&st, &out, "--ab"), "12abdzzxyq--");
  assert_string_equal(feed(&st, &out, "c tail"), "12abdzzxyq--");
  assert_int_equal(st.matched, 0);
  assert_string_equal(feed(&st, &out, "more"), "12abdzzxyq--"); /* after a match: nothing */
  assert_int_equal(epic_gw_stopper_finish(&st, &out), EPIC_OK);
  assert_int_equal(out.n, strlen("12abdzzxyq--"));
  epic_gw_stopper_free(&st);
  epic_gw_buf_free(&out);

  /* The earliest occurrence wins, whatever the order of the stop strings. */
  char *s2[] = {"bc", "abcd"};
  size_t l2[] = {2, 4};
  epic_gw_stops stops2 = {.s = s2, .len = l2, .n = 2};
  epic_gw_stopper_init(&st, &stops2);
  assert_string_equal(feed(&st, &out, "xabcd"), "x");
  assert_int_equal(st.matched, 1);
  epic_gw_stopper_free(&st);
  epic_gw_buf_free(&out);

  /* Overlap with itself: "aab" in "aaab" starts at 1. */
  char *s3[] = {"aab"};
  size_t l3[] = {3};
  epic_gw_stops stops3 = {.s = s3, .len = l3, .n = 1};
  epic_gw_stopper_init(&st, &stops3);
  assert_string_equal(feed(&st, &out, "aa"), "");
  assert_string_equal(feed(&st, &out, "ab"), "a");
  assert_int_equal(st.matched, 0);
  epic_gw_stopper_free(&st);
  epic_gw_buf_free(&out);

  /* A held multi-byte character is released whole once it cannot match. */
  char *s4[] = {"\xc3\xa9!"};
  size_t l4[] = {3};
  epic_gw_stops stops4 = {.s = s4, .len = l4, .n = 1};
  epic_gw_stopper_init(&st, &stops4);
  assert_string_equal(feed(&st, &out, "caf\xc3\xa9"), "caf");
  assert_string_equal(feed(&st, &out, "?"), "caf\xc3\xa9?");
  assert_string_equal(feed(&st, &out, "\xc3\xa9"), "caf\xc3\xa9?");
  assert_int_equal(epic_gw_stopper_finish(&st, &out), EPIC_OK); /* end of text: the tail goes out */
  assert_string_equal(out.p, "caf\xc3\xa9?\xc3\xa9");
  epic_gw_stopper_free(&st);
  epic_gw_buf_free(&out);

  /* No stop strings: everything passes at once. */
  epic_gw_stopper_init(&st, NULL);
  assert_string_equal(feed(&st, &out, "abc"), "abc");
  epic_gw_stopper_free(&st);
  epic_gw_buf_free(&out);
}

static void test_pack_text(void **state) {
  (void)state;
  Epic__V1__GenerateResponse r = EPIC__V1__GENERATE_RESPONSE__INIT;
  int32_t ids[] = {7, 300};
  r.n_token_ids = 2;
  r.token_ids = ids;
  r.finish_reason = EPIC__V1__FINISH_REASON__FINISH_REASON_STOP;
  const char text[] = "a\0b\xc3\xa9"; /* 5 bytes with a NUL inside */
  grpc_byte_buffer *bb = epic_gw_pack_text(&r.base, 2, text, 5);
  size_t base = protobuf_c_message_get_packed_size(&r.base);
  assert_int_equal(grpc_byte_buffer_length(bb), base + 2 + 5);
  grpc_byte_buffer_reader rd;
  assert_true(grpc_byte_buffer_reader_init(&rd, bb));
  grpc_slice all = grpc_byte_buffer_reader_readall(&rd);
  const uint8_t *p = GRPC_SLICE_START_PTR(all);
  assert_int_equal(p[base], 2 << 3 | 2); /* field 2, length-delimited */
  assert_int_equal(p[base + 1], 5);
  assert_memory_equal(p + base + 2, text, 5);
  Epic__V1__GenerateResponse *back =
      epic__v1__generate_response__unpack(NULL, GRPC_SLICE_LENGTH(all), GRPC_SLICE_START_PTR(all));
  assert_non_null(back);
  assert_int_equal(back->n_token_ids, 2);
  assert_int_equal(back->token_ids[1], 300);
  assert_int_equal(back->finish_reason, EPIC__V1__FINISH_REASON__FINISH_REASON_STOP);
  assert_string_equal(back->text, "a"); /* C strings stop at the NUL; the wire has all 5 bytes */
  epic__v1__generate_response__free_unpacked(back, NULL);
  grpc_slice_unref(all);
  grpc_byte_buffer_reader_destroy(&rd);
  grpc_byte_buffer_destroy(bb);
  /* Empty text: exactly the plain packing. */
  bb = epic_gw_pack_text(&r.base, 2, NULL, 0);
  assert_int_equal(grpc_byte_buffer_length(bb), base);
  grpc_byte_buffer_destroy(bb);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_valid_ids),     cmocka_unit_test(test_invalid_fields),
      cmocka_unit_test(test_text_and_chat), cmocka_unit_test(test_stopper),
      cmocka_unit_test(test_pack_text),
  };
  return cmocka_run_group_tests_name("gateway_request", tests, NULL, NULL);
}
