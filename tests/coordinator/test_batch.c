/* Batch job lines (coordinator/batch.h): parsing valid and malformed lines,
 * prompt encoding against limits, stop strings, record formatting (read back
 * with cJSON), the string index and the resume scan of an output file. */
#define _GNU_SOURCE

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "common/log.h"
#include "coordinator/batch.h"
#include "coordinator/tokenizer/chat.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "tests/common/test_util.h"

static epic_tokenizer *g_tok;

static int setup(void **state) {
  (void)state;
  char p[1024];
  epic_log_init(EPIC_LOG_LEVEL_ERROR, -1);
  return epic_tokenizer_load_dir(epic_test_path(p, sizeof p, "tiny-bf16"), &g_tok) == EPIC_OK ? 0
                                                                                              : -1;
}

static int teardown(void **state) {
  (void)state;
  epic_tokenizer_destroy(g_tok);
  return 0;
}

static epic_batch_request *parse_ok(const char *line, int64_t no) {
  epic_batch_request *r = NULL;
  epic_status st = epic_batch_parse_line(line, strlen(line), no, &r);
  if (st != EPIC_OK)
    fprintf(stderr, "  unexpected error: %s\n", r ? r->error : "(none)");
  assert_int_equal(st, EPIC_OK);
  assert_non_null(r);
  assert_string_equal(r->error, "");
  return r;
}

static void test_parse_chat(void **state) {
  (void)state;
  const char *line = "{\"custom_id\":\"req-1\",\"method\":\"POST\",\"url\":\"/v1/chat/"
                     "completions\",\"body\":{\"model\":\"m\","
                     "\"messages\":[{\"role\":\"system\",\"content\":\"Be "
                     "brief.\"},{\"role\":\"user\",\"content\":\"Hi\"}],"
                     "\"max_tokens\":7,\"temperature\":0,\"top_p\":0.5,\"seed\":-3,\"stop\":["
                     "\"\\n\",\"END\"],\"top_k\":5}}";
  epic_batch_request *r = parse_ok(line, 4);
  assert_string_equal(r->custom_id, "req-1");
  assert_int_equal(r->endpoint, EPIC_BATCH_CHAT);
  assert_string_equal(r->model, "m");
  assert_int_equal(epic_chat_messages_count(r->messages), 2);
  assert_int_equal(epic_chat_messages_items(r->messages)[1].role, EPIC_ROLE_USER);
  assert_string_equal(epic_chat_messages_items(r->messages)[1].content, "Hi");
  assert_int_equal(r->max_tokens, 7);
  assert_string_equal(r->max_tokens_field, "body.max_tokens");
  assert_true(r->temperature == 0.0f);
  assert_true(r->top_p == 0.5f);
  assert_int_equal(r->top_k, 5);
  assert_true(r->seed == (uint64_t)-3);
  assert_int_equal(r->n_stop, 2);
  assert_string_equal(r->stop[0], "\n");
  assert_string_equal(r->stop[1], "END");
  assert_int_equal(r->line, 4);
  assert_int_equal(strncmp(r->id, "batch_req_", 10), 0);
  assert_int_equal(strlen(r->id), 26);
  /* same line and number: same id; another line number: another id */
  epic_batch_request *r2 = parse_ok(line, 4), *r3 = parse_ok(line, 5);
  assert_string_equal(r->id, r2->id);
  assert_string_not_equal(r->id, r3->id);
  epic_batch_request_free(r);
  epic_batch_request_free(r2);
  epic_batch_request_free(r3);
}

static void test_parse_defaults_and_nulls(void **state) {
  (void)state;
  /* null means absent for optional fields; method may be left out; OpenAI's defaults apply */
  epic_batch_request *r = parse_ok("{\"custom_id\":\"a\",\"url\":\"/v1/chat/"
                                   "completions\",\"body\":{\"messages\":[{\"role\":\"user\","
                                   "\"content\":[{\"type\":\"text\",\"text\":\"x\"},{\"type\":"
                                   "\"text\",\"text\":\"y\"}]}],\"max_tokens\":null,"
                                   "\"temperature\":null,\"stop\":null,\"n\":1,\"stream\":false,"
                                   "\"presence_penalty\":0,\"model\":null,"
                                   "\"max_completion_tokens\":3,\"frequency_penalty\":null}}",
                                   1);
  assert_int_equal(r->max_tokens, 3);
  assert_string_equal(r->max_tokens_field, "body.max_completion_tokens");
  assert_true(r->temperature == 1.0f);
  assert_true(r->top_p == 1.0f);
  assert_int_equal(r->n_stop, 0);
  assert_null(r->model);
  assert_true(r->seed == r->hash); /* no seed: derived from the line */
  assert_string_equal(epic_chat_messages_items(r->messages)[0].content, "x\ny");
  epic_batch_request_free(r);
  r = parse_ok("{\"custom_id\":\"b\",\"method\":\"POST\",\"url\":\"/v1/"
               "completions\",\"body\":{\"prompt\":\"Once\","
               "\"stop\":\"zz\",\"ignore_eos\":true,\"logprobs\":0}}",
               2);
  assert_int_equal(r->endpoint, EPIC_BATCH_COMPLETIONS);
  assert_string_equal(r->prompt, "Once");
  assert_int_equal(r->n_stop, 1);
  assert_int_equal(r->ignore_eos, 1);
  assert_int_equal(r->max_tokens, 0);
  epic_batch_request_free(r);
  r = parse_ok("{\"custom_id\":\"c\",\"url\":\"/v1/completions\",\"body\":{\"prompt\":[0,17,5]}}",
               3);
  assert_null(r->prompt);
  assert_int_equal(r->n_prompt_ids, 3);
  assert_int_equal(r->prompt_ids[1], 17);
  epic_batch_request_free(r);
}

typedef struct bad_case {
  const char *line;
  const char *want;      /* substring of the error message */
  const char *custom_id; /* expected custom_id kept for the record, or NULL */
} bad_case;

#define CHAT(body)                                                                                 \
  "{\"custom_id\":\"x\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":" body "}"
#define MSGS "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]"

static void test_parse_malformed(void **state) {
  (void)state;
  static const bad_case cases[] = {
      {"{\"custom_id\":\"x\",", "line 9: not valid JSON", NULL},
      {"not json at all", "line 9: not valid JSON", NULL},
      {"{\"custom_id\":\"x\"} trailing", "text after the object", NULL},
      {"[1,2,3]", "expected a JSON object, got an array", NULL},
      {"{\"url\":\"/v1/chat/completions\",\"body\":{" MSGS "}}", "line 9: custom_id: missing",
       NULL},
      {"{\"custom_id\":7,\"url\":\"/v1/chat/completions\",\"body\":{" MSGS "}}",
       "custom_id: expected a string, got a number", NULL},
      {"{\"custom_id\":\"\",\"url\":\"/v1/chat/completions\",\"body\":{" MSGS "}}",
       "custom_id: empty", NULL},
      {"{\"custom_id\":\"x\",\"method\":\"GET\",\"url\":\"/v1/chat/completions\",\"body\":{" MSGS
       "}}",
       "method: expected \"POST\"", "x"},
      {"{\"custom_id\":\"x\",\"url\":\"/v1/embeddings\",\"body\":{" MSGS "}}",
       "url: unsupported endpoint", "x"},
      {"{\"custom_id\":\"x\",\"body\":{" MSGS "}}", "url: missing", "x"},
      {"{\"custom_id\":\"x\",\"url\":\"/v1/chat/completions\"}", "body: missing", "x"},
      {"{\"custom_id\":\"x\",\"url\":\"/v1/chat/completions\",\"body\":[]}",
       "body: expected an object, got an array", "x"},
      {CHAT("{}"), "body.messages: missing", "x"},
      {CHAT("{\"messages\":{}}"), "body.messages: expected an array", "x"},
      {CHAT("{\"messages\":[]}"), "body.messages: empty", "x"},
      {CHAT("{\"messages\":[\"hi\"]}"), "body.messages[0]: expected an object, got a string", "x"},
      {CHAT("{\"messages\":[{\"content\":\"hi\"}]}"), "body.messages[0].role: missing", "x"},
      {CHAT("{\"messages\":[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"robot\",\"content\":"
            "\"hi\"}]}"),
       "body.messages[1].role: expected system, user, assistant or tool", "x"},
      {CHAT("{\"messages\":[{\"role\":\"user\"}]}"), "body.messages[0].content: missing", "x"},
      {CHAT("{\"messages\":[{\"role\":\"user\",\"content\":5}]}"),
       "body.messages[0].content: expected a string or an array", "x"},
      {CHAT("{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\",\"image_url\":{"
            "}}]}]}"),
       "body.messages[0].content[0]: only", "x"},
      {CHAT("{\"messages\":[{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"function\":"
            "{\"name\":\"f\"}}]}]}"),
       "body.messages[0].tool_calls[0].function: needs name and arguments", "x"},
      {CHAT("{" MSGS ",\"max_tokens\":0}"), "body.max_tokens: expected an integer >= 1", "x"},
      {CHAT("{" MSGS ",\"max_tokens\":2.5}"), "body.max_tokens: expected an integer >= 1", "x"},
      {CHAT("{" MSGS ",\"max_tokens\":\"9\"}"), "body.max_tokens: expected an integer >= 1", "x"},
      {CHAT("{" MSGS ",\"max_completion_tokens\":-1}"),
       "body.max_completion_tokens: expected an integer", "x"},
      {CHAT("{" MSGS ",\"max_tokens\":4,\"max_completion_tokens\":4}"),
       "give only one of max_tokens and max_completion_tokens", "x"},
      {CHAT("{" MSGS ",\"temperature\":-0.5}"), "body.temperature: expected a number in [0, 2]",
       "x"},
      {CHAT("{" MSGS ",\"temperature\":3}"), "body.temperature: expected a number in [0, 2]", "x"},
      {CHAT("{" MSGS ",\"temperature\":\"hot\"}"), "body.temperature: expected a number", "x"},
      {CHAT("{" MSGS ",\"top_p\":0}"), "body.top_p: expected a number in (0, 1]", "x"},
      {CHAT("{" MSGS ",\"top_p\":1.5}"), "body.top_p: expected a number in (0, 1]", "x"},
      {CHAT("{" MSGS ",\"top_k\":-2}"), "body.top_k: expected an integer", "x"},
      {CHAT("{" MSGS ",\"seed\":1.5}"), "body.seed: expected an integer", "x"},
      {CHAT("{" MSGS ",\"seed\":1e30}"), "body.seed: expected an integer", "x"},
      {CHAT("{" MSGS ",\"stop\":5}"), "body.stop: expected a string or an array of strings", "x"},
      {CHAT("{" MSGS ",\"stop\":\"\"}"), "body.stop: empty string", "x"},
      {CHAT("{" MSGS ",\"stop\":[\"a\",7]}"), "body.stop[1]: expected a non-empty string", "x"},
      {CHAT("{" MSGS ",\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}"), "body.stop: at most 4", "x"},
      {CHAT("{" MSGS ",\"ignore_eos\":1}"), "body.ignore_eos: expected a boolean", "x"},
      {CHAT("{" MSGS ",\"n\":2}"), "body.n: only 1", "x"},
      {CHAT("{" MSGS ",\"stream\":true}"), "body.stream: not supported", "x"},
      {CHAT("{" MSGS ",\"logprobs\":true}"), "body.logprobs: not supported", "x"},
      {CHAT("{" MSGS ",\"top_logprobs\":3}"), "body.top_logprobs: not supported", "x"},
      {CHAT("{" MSGS ",\"presence_penalty\":0.5}"), "body.presence_penalty: not supported", "x"},
      {CHAT("{" MSGS ",\"logit_bias\":{\"5\":1}}"), "body.logit_bias: not supported", "x"},
      {CHAT("{" MSGS ",\"model\":3}"), "body.model: expected a string", "x"},
      {"{\"custom_id\":\"x\",\"url\":\"/v1/completions\",\"body\":{}}", "body.prompt: missing",
       "x"},
      {"{\"custom_id\":\"x\",\"url\":\"/v1/completions\",\"body\":{\"prompt\":[]}}",
       "body.prompt: empty", "x"},
      {"{\"custom_id\":\"x\",\"url\":\"/v1/completions\",\"body\":{\"prompt\":[\"a\",\"b\"]}}",
       "body.prompt: one prompt per line", "x"},
      {"{\"custom_id\":\"x\",\"url\":\"/v1/completions\",\"body\":{\"prompt\":[1,-2]}}",
       "body.prompt[1]: expected a token id", "x"},
      {"{\"custom_id\":\"x\",\"url\":\"/v1/completions\",\"body\":{\"prompt\":{}}}",
       "body.prompt: expected a string or an array of token ids", "x"},
      {"{\"custom_id\":\"x\",\"url\":\"/v1/"
       "completions\",\"body\":{\"prompt\":\"a\",\"echo\":true}}",
       "body.echo: not supported", "x"},
      {"{\"custom_id\":\"\xff\xfe\"}", "line 9: not valid UTF-8 text (byte 15)", NULL},
      {"{\"custom_id\":\"\xed\xa0\x80\"}", "not valid UTF-8", NULL}, /* an encoded surrogate */
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    epic_batch_request *r = NULL;
    epic_status st = epic_batch_parse_line(cases[i].line, strlen(cases[i].line), 9, &r);
    if (st != EPIC_ERR_INVALID || !r || !strstr(r->error, cases[i].want) ||
        strncmp(r->error, "line 9: ", 8) != 0) {
      fprintf(stderr, "  case %zu: %s\n    want error containing '%s', got status %d '%s'\n", i,
              cases[i].line, cases[i].want, st, r ? r->error : "");
      fail();
    }
    if (cases[i].custom_id)
      assert_string_equal(r->custom_id, cases[i].custom_id);
    else
      assert_null(r->custom_id);
    assert_int_equal(strncmp(r->id, "batch_req_", 10), 0);
    epic_batch_request_free(r);
  }
  /* a NUL byte inside the line */
  const char nul[] = "{\"custom_id\":\"a\0b\"}";
  epic_batch_request *r = NULL;
  assert_int_equal(epic_batch_parse_line(nul, sizeof nul - 1, 2, &r), EPIC_ERR_INVALID);
  assert_non_null(strstr(r->error, "not valid UTF-8 text (byte 16)"));
  epic_batch_request_free(r);
}

static void test_encode(void **state) {
  (void)state;
  epic_batch_limits lim = {.vocab_size = epic_tokenizer_vocab_size(g_tok),
                           .max_context = 64,
                           .default_max_tokens = 1000};
  int32_t *ids = NULL;
  int64_t n = 0, max_new = 0;
  /* chat: exactly the chat template's ids with the generation prompt */
  epic_batch_request *r =
      parse_ok(CHAT("{\"messages\":[{\"role\":\"system\",\"content\":\"S\"},"
                    "{\"role\":\"user\",\"content\":\"Hello world\"}],\"max_tokens\":5}"),
               1);
  assert_int_equal(epic_batch_encode(r, g_tok, EPIC_CHAT_AUTO, &lim, &ids, &n, &max_new), EPIC_OK);
  int32_t *want = NULL;
  size_t nw = 0;
  epic_chat_message msgs[2] = {{.role = EPIC_ROLE_SYSTEM, .content = "S"},
                               {.role = EPIC_ROLE_USER, .content = "Hello world"}};
  assert_int_equal(epic_chat_encode(g_tok, EPIC_CHAT_AUTO, msgs, 2, 1, &want, &nw, NULL, NULL),
                   EPIC_OK);
  assert_int_equal(n, (int64_t)nw);
  assert_memory_equal(ids, want, nw * sizeof *ids);
  assert_int_equal(max_new, 5);
  epic_tokenizer_ids_free(want);
  free(ids);
  /* default max_tokens clamped to the context */
  r->max_tokens = 0;
  assert_int_equal(epic_batch_encode(r, g_tok, EPIC_CHAT_AUTO, &lim, &ids, &n, &max_new), EPIC_OK);
  assert_int_equal(max_new, 64 - n);
  free(ids);
  /* too long for the context: names the field that was given */
  r->max_tokens = 64;
  assert_int_equal(epic_batch_encode(r, g_tok, EPIC_CHAT_AUTO, &lim, &ids, &n, &max_new),
                   EPIC_ERR_INVALID);
  assert_non_null(strstr(r->error, "line 1: body.max_tokens: prompt ("));
  assert_non_null(strstr(r->error, "exceed the context length (64 tokens)"));
  assert_null(ids);
  /* the KV cache of one worker binds first */
  epic_batch_limits kv = lim;
  kv.max_seq_tokens = 20;
  r->max_tokens = 15;
  assert_int_equal(epic_batch_encode(r, g_tok, EPIC_CHAT_AUTO, &kv, &ids, &n, &max_new),
                   EPIC_ERR_INVALID);
  assert_non_null(strstr(r->error, "the KV cache of one worker (20 tokens)"));
  epic_batch_request_free(r);

  /* completions text: BOS + text, like epic generate --prompt */
  r = parse_ok(
      "{\"custom_id\":\"t\",\"url\":\"/v1/completions\",\"body\":{\"prompt\":\"Hello world\"}}", 2);
  assert_int_equal(epic_batch_encode(r, g_tok, EPIC_CHAT_AUTO, &lim, &ids, &n, &max_new), EPIC_OK);
  assert_int_equal(epic_tokenizer_encode(g_tok, "Hello world", 11, 1, &want, &nw), EPIC_OK);
  assert_int_equal(n, (int64_t)nw);
  assert_memory_equal(ids, want, nw * sizeof *ids);
  assert_int_equal(ids[0], epic_tokenizer_bos_id(g_tok));
  epic_tokenizer_ids_free(want);
  free(ids);
  epic_batch_request_free(r);

  /* token ids: checked against the vocabulary */
  r = parse_ok("{\"custom_id\":\"t\",\"url\":\"/v1/completions\",\"body\":{\"prompt\":[3,99999]}}",
               3);
  assert_int_equal(epic_batch_encode(r, g_tok, EPIC_CHAT_AUTO, &lim, &ids, &n, &max_new),
                   EPIC_ERR_INVALID);
  assert_non_null(
      strstr(r->error, "line 3: body.prompt: token 1 (id 99999) is outside the vocabulary"));
  epic_batch_request_free(r);
  r = parse_ok("{\"custom_id\":\"t\",\"url\":\"/v1/"
               "completions\",\"body\":{\"prompt\":[3,4],\"max_tokens\":62}}",
               3);
  assert_int_equal(epic_batch_encode(r, g_tok, EPIC_CHAT_AUTO, &lim, &ids, &n, &max_new), EPIC_OK);
  assert_int_equal(n, 2);
  assert_int_equal(max_new, 62);
  free(ids);
  /* a prompt that fills the context leaves no room for the default */
  lim.max_context = 2;
  r->max_tokens = 0;
  assert_int_equal(epic_batch_encode(r, g_tok, EPIC_CHAT_AUTO, &lim, &ids, &n, &max_new),
                   EPIC_ERR_INVALID);
  assert_non_null(strstr(r->error, "body.prompt: the prompt (2 tokens) leaves no room"));
  epic_batch_request_free(r);
}

static void test_find_stop(void **state) {
  (void)state;
  epic_batch_request *r = parse_ok(CHAT("{" MSGS ",\"stop\":[\"END\",\"\\n\\n\",\"x\"]}"), 1);
  const char *t = "abc\n\nEND";
  assert_int_equal(epic_batch_find_stop(r, t, strlen(t), 0), 3);
  /* a match that straddles the previously searched part is found */
  assert_int_equal(epic_batch_find_stop(r, "aaEN", 4, 0), -1);
  assert_int_equal(epic_batch_find_stop(r, "aaEND", 5, 4), 2);
  /* earliest of several */
  assert_int_equal(epic_batch_find_stop(r, "qqxEND", 6, 2), 2);
  assert_int_equal(epic_batch_find_stop(r, "", 0, 0), -1);
  assert_int_equal(epic_batch_find_stop(r, "hello", 5, 3), -1);
  epic_batch_request_free(r);
  r = parse_ok(CHAT("{" MSGS "}"), 1);
  assert_int_equal(epic_batch_find_stop(r, "END", 3, 0), -1);
  epic_batch_request_free(r);
}

static cJSON *parse_record(const char *line, size_t len) {
  assert_true(len > 0);
  assert_int_equal(line[len - 1], '\n');
  assert_null(memchr(line, '\n', len - 1)); /* one line */
  cJSON *j = cJSON_ParseWithLength(line, len);
  assert_non_null(j);
  return j;
}

static void test_format(void **state) {
  (void)state;
  epic_batch_request *r = parse_ok(CHAT("{" MSGS "}"), 12);
  /* quotes, newlines, a control character, a NUL and invalid UTF-8 */
  const char text[] = "he said \"hi\"\n\tand\x01 left\0!\xff \xc3\xa9";
  epic_batch_output o = {.text = text,
                         .text_len = sizeof text - 1,
                         .finish_stop = 1,
                         .prompt_tokens = 10,
                         .completion_tokens = 4,
                         .created = 1700000000,
                         .model = "tiny"};
  size_t len = 0;
  char *line = epic_batch_format_result(r, &o, &len);
  assert_non_null(line);
  assert_int_equal(strlen(line), len);
  cJSON *j = parse_record(line, len);
  assert_string_equal(cJSON_GetObjectItem(j, "id")->valuestring, r->id);
  assert_string_equal(cJSON_GetObjectItem(j, "custom_id")->valuestring, "x");
  assert_true(cJSON_IsNull(cJSON_GetObjectItem(j, "error")));
  cJSON *resp = cJSON_GetObjectItem(j, "response");
  assert_int_equal(cJSON_GetObjectItem(resp, "status_code")->valueint, 200);
  assert_true(cJSON_IsString(cJSON_GetObjectItem(resp, "request_id")));
  cJSON *body = cJSON_GetObjectItem(resp, "body");
  assert_string_equal(cJSON_GetObjectItem(body, "object")->valuestring, "chat.completion");
  assert_int_equal(strncmp(cJSON_GetObjectItem(body, "id")->valuestring, "chatcmpl-", 9), 0);
  assert_string_equal(cJSON_GetObjectItem(body, "model")->valuestring, "tiny");
  assert_true(cJSON_GetObjectItem(body, "created")->valuedouble == 1700000000.0);
  cJSON *ch = cJSON_GetArrayItem(cJSON_GetObjectItem(body, "choices"), 0);
  assert_int_equal(cJSON_GetObjectItem(ch, "index")->valueint, 0);
  assert_string_equal(cJSON_GetObjectItem(ch, "finish_reason")->valuestring, "stop");
  cJSON *msg = cJSON_GetObjectItem(ch, "message");
  assert_string_equal(cJSON_GetObjectItem(msg, "role")->valuestring, "assistant");
  /* cJSON stops a string at \u0000, so compare up to the NUL, and the escape itself */
  assert_string_equal(cJSON_GetObjectItem(msg, "content")->valuestring,
                      "he said \"hi\"\n\tand\x01 left");
  assert_non_null(strstr(line, "left\\u0000!\xef\xbf\xbd \xc3\xa9\""));
  cJSON *usage = cJSON_GetObjectItem(body, "usage");
  assert_int_equal(cJSON_GetObjectItem(usage, "prompt_tokens")->valueint, 10);
  assert_int_equal(cJSON_GetObjectItem(usage, "completion_tokens")->valueint, 4);
  assert_int_equal(cJSON_GetObjectItem(usage, "total_tokens")->valueint, 14);
  cJSON_Delete(j);
  free(line);
  epic_batch_request_free(r);

  r = parse_ok("{\"custom_id\":\"c\\\"q\",\"url\":\"/v1/completions\",\"body\":{\"prompt\":\"p\"}}",
               1);
  o = (epic_batch_output){
      .text = "", .finish_stop = 0, .prompt_tokens = 2, .completion_tokens = 0, .model = "m"};
  line = epic_batch_format_result(r, &o, &len);
  j = parse_record(line, len);
  assert_string_equal(cJSON_GetObjectItem(j, "custom_id")->valuestring, "c\"q");
  body = cJSON_GetObjectItem(cJSON_GetObjectItem(j, "response"), "body");
  assert_string_equal(cJSON_GetObjectItem(body, "object")->valuestring, "text_completion");
  ch = cJSON_GetArrayItem(cJSON_GetObjectItem(body, "choices"), 0);
  assert_string_equal(cJSON_GetObjectItem(ch, "text")->valuestring, "");
  assert_string_equal(cJSON_GetObjectItem(ch, "finish_reason")->valuestring, "length");
  cJSON_Delete(j);
  free(line);
  epic_batch_request_free(r);

  line =
      epic_batch_format_error("batch_req_1", NULL, "invalid_request", "line 3: url: missing", &len);
  j = parse_record(line, len);
  assert_true(cJSON_IsNull(cJSON_GetObjectItem(j, "custom_id")));
  assert_true(cJSON_IsNull(cJSON_GetObjectItem(j, "response")));
  cJSON *err = cJSON_GetObjectItem(j, "error");
  assert_string_equal(cJSON_GetObjectItem(err, "code")->valuestring, "invalid_request");
  assert_string_equal(cJSON_GetObjectItem(err, "message")->valuestring, "line 3: url: missing");
  cJSON_Delete(j);
  free(line);
}

static void test_index(void **state) {
  (void)state;
  epic_batch_index *x = NULL;
  assert_int_equal(epic_batch_index_create(&x), EPIC_OK);
  char key[32];
  for (int i = 0; i < 5000; i++) {
    snprintf(key, sizeof key, "k%d", i);
    assert_int_equal(epic_batch_index_put(x, key, i, NULL), 1);
  }
  assert_int_equal(epic_batch_index_count(x), 5000);
  for (int i = 0; i < 5000; i++) {
    int64_t v = -1;
    snprintf(key, sizeof key, "k%d", i);
    assert_int_equal(epic_batch_index_get(x, key, &v), 1);
    assert_int_equal(v, i);
  }
  int64_t old = -1;
  assert_int_equal(epic_batch_index_put(x, "k17", 99, &old), 0);
  assert_int_equal(old, 17);
  assert_int_equal(epic_batch_index_get(x, "k17", &old), 1);
  assert_int_equal(old, 17); /* unchanged */
  assert_int_equal(epic_batch_index_get(x, "nope", NULL), 0);
  assert_int_equal(epic_batch_index_count(x), 5000);
  epic_batch_index_destroy(x);
  epic_batch_index_destroy(NULL);
}

static void write_file(const char *path, const char *s) {
  FILE *f = fopen(path, "wb");
  assert_non_null(f);
  fputs(s, f);
  fclose(f);
}

static void test_scan_output(void **state) {
  (void)state;
  char path[] = "/tmp/epic-test-batch-XXXXXX";
  int fd = mkstemp(path);
  assert_true(fd >= 0);
  close(fd);
  unlink(path);
  epic_batch_resume rs;
  /* a missing output is an empty one */
  assert_int_equal(epic_batch_scan_output(path, &rs), EPIC_OK);
  assert_int_equal(rs.records, 0);
  assert_int_equal(rs.keep_bytes, 0);
  epic_batch_resume_free(&rs);

  epic_batch_request *r = parse_ok(CHAT("{" MSGS "}"), 1);
  epic_batch_output o = {.text = "ok", .text_len = 2, .model = "m"};
  size_t l1, l2;
  char *a = epic_batch_format_result(r, &o, &l1);
  char *b = epic_batch_format_error("batch_req_2", NULL, "invalid_request",
                                    "line 2: custom_id: missing", &l2);
  char *all = malloc(l1 + l2 + 64);
  snprintf(all, l1 + l2 + 64, "%s\n%s{\"id\":\"batch_req_3\",\"custom_id\":\"cut", a, b);
  write_file(path, all);
  assert_int_equal(epic_batch_scan_output(path, &rs), EPIC_OK);
  assert_int_equal(rs.records, 2);
  assert_int_equal(rs.errors, 1);
  assert_int_equal(rs.keep_bytes, (int64_t)(l1 + 1 + l2)); /* a blank line between is kept */
  assert_int_equal(rs.dropped_bytes, (int64_t)strlen(all) - (int64_t)(l1 + 1 + l2));
  assert_int_equal(epic_batch_index_get(rs.custom_ids, "x", NULL), 1);
  assert_int_equal(epic_batch_index_get(rs.custom_ids, "cut", NULL), 0);
  assert_int_equal(epic_batch_index_count(rs.custom_ids), 1);
  assert_int_equal(epic_batch_index_get(rs.ids, r->id, NULL), 1);
  assert_int_equal(epic_batch_index_get(rs.ids, "batch_req_2", NULL), 1);
  assert_int_equal(epic_batch_index_get(rs.ids, "batch_req_3", NULL), 0);
  epic_batch_resume_free(&rs);

  /* a complete line that is not a record: refuse the file */
  snprintf(all, l1 + l2 + 64, "%shello\n", a);
  write_file(path, all);
  assert_int_equal(epic_batch_scan_output(path, &rs), EPIC_ERR_INVALID);
  assert_null(rs.ids);
  snprintf(all, l1 + l2 + 64, "%s{\"id\":5}\n", a);
  write_file(path, all);
  assert_int_equal(epic_batch_scan_output(path, &rs), EPIC_ERR_INVALID);
  /* a directory cannot be read */
  assert_int_equal(epic_batch_scan_output("/tmp", &rs), EPIC_ERR_IO);
  unlink(path);
  free(all);
  free(a);
  free(b);
  epic_batch_request_free(r);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_parse_chat),      cmocka_unit_test(test_parse_defaults_and_nulls),
      cmocka_unit_test(test_parse_malformed), cmocka_unit_test(test_encode),
      cmocka_unit_test(test_find_stop),       cmocka_unit_test(test_format),
      cmocka_unit_test(test_index),           cmocka_unit_test(test_scan_output),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
