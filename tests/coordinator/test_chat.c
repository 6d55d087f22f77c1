/* Chat template tests: every golden chat of both fixture tokenizers (text and
 * ids), template detection, R1 behaviour on constructed cases, JSON parsing. */
#define _POSIX_C_SOURCE 200809L

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <cjson/cJSON.h>

#include "common/log.h"
#include "coordinator/tokenizer/chat.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "tests/common/test_util.h"

static epic_tokenizer *g_tok[2];
static cJSON *g_golden[2];
static const char *g_dirs[2] = {"tokenizer", "tiny-tokenizer"};
#define TINY 1

static int setup(void **state) {
  (void)state;
  epic_log_init(EPIC_LOG_LEVEL_ERROR, -1);
  for (int i = 0; i < 2; i++) {
    char p[1024], rel[256];
    snprintf(rel, sizeof rel, "%s", g_dirs[i]);
    if (epic_tokenizer_load_dir(epic_test_path(p, sizeof p, rel), &g_tok[i]) != EPIC_OK) return -1;
    snprintf(rel, sizeof rel, "%s/golden.json", g_dirs[i]);
    char *txt = epic_test_read_file(epic_test_path(p, sizeof p, rel), NULL);
    if (!txt) return -1;
    g_golden[i] = cJSON_Parse(txt);
    free(txt);
    if (!g_golden[i]) return -1;
  }
  return 0;
}

static int teardown(void **state) {
  (void)state;
  for (int i = 0; i < 2; i++) {
    epic_tokenizer_destroy(g_tok[i]);
    cJSON_Delete(g_golden[i]);
  }
  return 0;
}

static void check_golden_chats(int which) {
  const cJSON *chats = cJSON_GetObjectItem(g_golden[which], "chat"), *c;
  int fails = 0, count = 0;
  epic_tokenizer *tok = g_tok[which];
  assert_true(cJSON_GetArraySize(chats) > 0);
  assert_int_equal(epic_chat_resolve(tok, EPIC_CHAT_AUTO), EPIC_CHAT_V3);
  cJSON_ArrayForEach(c, chats) {
    epic_chat_messages *m = NULL;
    count++;
    assert_int_equal(epic_chat_messages_from_json(cJSON_GetObjectItem(c, "messages"), &m), EPIC_OK);
    int gen = cJSON_IsTrue(cJSON_GetObjectItem(c, "add_generation_prompt"));
    const char *want = cJSON_GetObjectItem(c, "text")->valuestring;
    for (int t = 0; t < 2; t++) { /* AUTO and explicit V3 */
      int32_t *ids = NULL;
      size_t n = 0, tl = 0;
      char *text = NULL;
      assert_int_equal(epic_chat_encode(tok, t ? EPIC_CHAT_V3 : EPIC_CHAT_AUTO, epic_chat_messages_items(m),
                                        epic_chat_messages_count(m), gen, &ids, &n, &text, &tl),
                       EPIC_OK);
      if (strcmp(text, want) != 0 || tl != strlen(want)) {
        fprintf(stderr, "  [%s] chat %d text mismatch:\n    want %s\n    got  %s\n", g_dirs[which], count, want,
                text);
        fails++;
      }
      const cJSON *wids = cJSON_GetObjectItem(c, "ids"), *it;
      size_t k = 0;
      int same = (size_t)cJSON_GetArraySize(wids) == n;
      cJSON_ArrayForEach(it, wids) {
        if (k < n && ids[k] != (int32_t)it->valuedouble) same = 0;
        k++;
      }
      if (!same) {
        fprintf(stderr, "  [%s] chat %d ids mismatch (%zu ids, want %zu)\n", g_dirs[which], count, n, k);
        fails++;
      }
      /* BOS exactly once, first */
      int bos = 0;
      for (size_t i = 0; i < n; i++) bos += ids[i] == epic_tokenizer_bos_id(tok);
      assert_int_equal(bos, 1);
      assert_int_equal(ids[0], epic_tokenizer_bos_id(tok));
      epic_tokenizer_ids_free(ids);
      epic_tokenizer_text_free(text);
    }
    epic_chat_messages_free(m);
  }
  fprintf(stderr, "  [%s] %d golden chats, %d failures\n", g_dirs[which], count, fails);
  assert_int_equal(fails, 0);
}

static void test_golden_chat_real(void **state) {
  (void)state;
  check_golden_chats(0);
}

static void test_golden_chat_tiny(void **state) {
  (void)state;
  check_golden_chats(1);
}

static void test_detect(void **state) {
  (void)state;
  const char *v3 = epic_tokenizer_chat_template(g_tok[0]);
  assert_non_null(v3);
  assert_int_equal(epic_chat_detect(v3), EPIC_CHAT_V3);
  assert_int_equal(epic_chat_detect(NULL), EPIC_CHAT_V3);
  /* R1's template = V3's + the </think> stripping; build one from the fixture */
  const char *anchor = "{%- else %}{{'<｜Assistant｜>' + message['content']";
  const char *at = strstr(v3, anchor);
  assert_non_null(at);
  size_t pre = (size_t)(at - v3);
  const char *r1_mid = "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
                       "{% set content = content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content";
  char *r1 = malloc(strlen(v3) + strlen(r1_mid) + 1);
  memcpy(r1, v3, pre);
  strcpy(r1 + pre, r1_mid);
  strcat(r1, at + strlen(anchor));
  assert_int_equal(epic_chat_detect(r1), EPIC_CHAT_R1);
  free(r1);
  assert_int_equal(epic_chat_resolve(g_tok[0], EPIC_CHAT_R1), EPIC_CHAT_R1);
  epic_chat_template t;
  assert_int_equal(epic_chat_template_parse("R1", &t), EPIC_OK);
  assert_int_equal(t, EPIC_CHAT_R1);
  assert_int_equal(epic_chat_template_parse("v2", &t), EPIC_ERR_INVALID);
}

/* Renders msgs with R1 on the tiny tokenizer, checks the text, and checks that
 * the ids are the concatenation of the encodings of the given parts. */
static void r1_case(const char *json, int gen, const char *want) {
  epic_chat_messages *m = NULL;
  assert_int_equal(epic_chat_messages_parse(json, strlen(json), &m), EPIC_OK);
  int32_t *ids = NULL;
  size_t n = 0;
  char *text = NULL;
  assert_int_equal(epic_chat_encode(g_tok[TINY], EPIC_CHAT_R1, epic_chat_messages_items(m),
                                    epic_chat_messages_count(m), gen, &ids, &n, &text, NULL),
                   EPIC_OK);
  if (strcmp(text, want) != 0) fprintf(stderr, "  want %s\n  got  %s\n", want, text);
  assert_string_equal(text, want);
  /* the encoding of the rendered text, no extra BOS */
  int32_t *ref = NULL;
  size_t rn = 0;
  assert_int_equal(epic_tokenizer_encode(g_tok[TINY], want, strlen(want), 0, &ref, &rn), EPIC_OK);
  assert_int_equal(n, rn);
  assert_memory_equal(ids, ref, n * sizeof *ids);
  epic_tokenizer_ids_free(ref);
  epic_tokenizer_ids_free(ids);
  epic_tokenizer_text_free(text);
  epic_chat_messages_free(m);
}

static void test_r1(void **state) {
  (void)state;
  /* generation prompt opens a think block, which encodes to the <think> token */
  r1_case("[{\"role\":\"user\",\"content\":\"Hi\"}]", 1, "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜><think>\n");
  {
    int32_t *ids = NULL;
    size_t n = 0;
    epic_chat_message msg = {.role = EPIC_ROLE_USER, .content = "Hi"};
    assert_int_equal(epic_chat_encode(g_tok[TINY], EPIC_CHAT_R1, &msg, 1, 1, &ids, &n, NULL, NULL), EPIC_OK);
    int32_t think = epic_tokenizer_token_to_id(g_tok[TINY], "<think>");
    int32_t asst = epic_tokenizer_token_to_id(g_tok[TINY], "<｜Assistant｜>");
    int32_t *nl = NULL;
    size_t nn = 0;
    assert_int_equal(epic_tokenizer_encode(g_tok[TINY], "\n", 1, 0, &nl, &nn), EPIC_OK);
    assert_true(think >= 0 && asst >= 0 && nn == 1 && n >= 3);
    assert_int_equal(ids[n - 3], asst);
    assert_int_equal(ids[n - 2], think);
    assert_int_equal(ids[n - 1], nl[0]);
    epic_tokenizer_ids_free(nl);
    epic_tokenizer_ids_free(ids);
  }
  /* reasoning stripped from assistant history: text after the LAST </think> */
  r1_case("[{\"role\":\"user\",\"content\":\"What is 2+2?\"},"
          "{\"role\":\"assistant\",\"content\":\"<think>\\nadd</think>draft</think>\\n\\n2+2 = 4.\"},"
          "{\"role\":\"user\",\"content\":\"And 3+3?\"}]",
          1,
          "<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜>\n\n2+2 = 4.<｜end▁of▁sentence｜>"
          "<｜User｜>And 3+3?<｜Assistant｜><think>\n");
  /* no </think>: kept whole; no generation prompt */
  r1_case("[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"assistant\",\"content\":\"b <think> c\"}]", 0,
          "<｜begin▁of▁sentence｜><｜User｜>a<｜Assistant｜>b <think> c<｜end▁of▁sentence｜>");
  /* only the last system message */
  r1_case("[{\"role\":\"system\",\"content\":\"Rule one.\"},{\"role\":\"system\",\"content\":\"Rule two.\"},"
          "{\"role\":\"user\",\"content\":\"Go\"}]",
          1, "<｜begin▁of▁sentence｜>Rule two.<｜User｜>Go<｜Assistant｜><think>\n");
  /* after tool output the answer is written verbatim (R1's template strips only
   * in the plain-assistant branch), and no generation prompt after tool output */
  r1_case("[{\"role\":\"user\",\"content\":\"w?\"},{\"role\":\"assistant\",\"content\":null,\"tool_calls\":"
          "[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":{\"x\":1}}}]},"
          "{\"role\":\"tool\",\"content\":\"ok\"},{\"role\":\"assistant\",\"content\":\"<think>r</think>done\"},"
          "{\"role\":\"tool\",\"content\":\"late\"}]",
          1,
          "<｜begin▁of▁sentence｜><｜User｜>w?<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function"
          "<｜tool▁sep｜>f\n```json\n{\"x\":1}\n```<｜tool▁call▁end｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>"
          "ok<｜tool▁output▁end｜><｜tool▁outputs▁end｜><think>r</think>done<｜end▁of▁sentence｜>\n"
          "<｜tool▁output▁begin｜>late<｜tool▁output▁end｜><｜tool▁outputs▁end｜>");
}

static void test_v3_quirks(void **state) {
  (void)state;
  /* V3 keeps reasoning; the "first call" flag persists across messages, so a
   * second tool-calling message renders as a continuation and closes the block */
  const char *json = "[{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"type\":\"function\","
                     "\"function\":{\"name\":\"a\",\"arguments\":\"{}\"}}]},"
                     "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"type\":\"function\","
                     "\"function\":{\"name\":\"b\",\"arguments\":\"[]\"}}]},"
                     "{\"role\":\"assistant\",\"content\":\"<think>x</think>y\"},"
                     "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"p1\"},{\"type\":\"text\","
                     "\"text\":\"p2\"}]}]";
  epic_chat_messages *m = NULL;
  assert_int_equal(epic_chat_messages_parse(json, strlen(json), &m), EPIC_OK);
  char *text = NULL;
  assert_int_equal(epic_chat_render(EPIC_CHAT_V3, "<B>", epic_chat_messages_items(m), epic_chat_messages_count(m),
                                    1, &text, NULL),
                   EPIC_OK);
  assert_string_equal(text, "<B><｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>a\n"
                            "```json\n{}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>b\n"
                            "```json\n[]\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>"
                            "<｜Assistant｜><think>x</think>y<｜end▁of▁sentence｜><｜User｜>p1\np2<｜Assistant｜>");
  epic_tokenizer_text_free(text);
  epic_chat_messages_free(m);
}

static void test_errors(void **state) {
  (void)state;
  epic_chat_messages *m = (epic_chat_messages *)1;
  const char *bad[] = {
      "{\"role\":\"user\"}",                                       /* not an array */
      "[{\"role\":\"developer\",\"content\":\"x\"}]",              /* unknown role */
      "[{\"role\":\"user\",\"content\":null}]",                    /* user without content */
      "[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\"}]}]", /* non-text part */
      "[{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"function\":{\"name\":\"f\"}}]}]",
      "[{\"role\":\"user\",\"content\":\"x\"",                     /* bad JSON */
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    assert_int_equal(epic_chat_messages_parse(bad[i], strlen(bad[i]), &m), EPIC_ERR_INVALID);
    assert_null(m);
  }
  epic_chat_message msg = {.role = EPIC_ROLE_TOOL, .content = NULL};
  char *text = NULL;
  assert_int_equal(epic_chat_render(EPIC_CHAT_V3, "", &msg, 1, 1, &text, NULL), EPIC_ERR_INVALID);
  msg.content = "x";
  assert_int_equal(epic_chat_render(EPIC_CHAT_AUTO, "", &msg, 1, 1, &text, NULL), EPIC_ERR_INVALID);
  epic_chat_messages_free(NULL);
  /* empty conversation: just BOS (+ prompt) */
  assert_int_equal(epic_chat_render(EPIC_CHAT_V3, "<B>", NULL, 0, 1, &text, NULL), EPIC_OK);
  assert_string_equal(text, "<B><｜Assistant｜>");
  epic_tokenizer_text_free(text);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_golden_chat_real), cmocka_unit_test(test_golden_chat_tiny),
      cmocka_unit_test(test_detect),           cmocka_unit_test(test_r1),
      cmocka_unit_test(test_v3_quirks),        cmocka_unit_test(test_errors),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
