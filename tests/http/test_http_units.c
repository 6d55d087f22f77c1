/* Pure parts of the HTTP front: the R1 reasoning split on text streams cut at
 * every byte boundary, OpenAI request validation (every error names its
 * field), and the Prometheus exposition of a metrics snapshot. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "coordinator/metrics.h"
#include "coordinator/openai.h"
#include "coordinator/reasoning.h"

/* Runs text through the parser in pieces of `step` bytes. */
static void split(const char *text, int open, size_t step, char *rs, char *ct) {
  epic_reasoning r;
  epic_reasoning_out a = {0}, b = {0};
  epic_reasoning_init(&r, open);
  size_t n = strlen(text);
  for (size_t i = 0; i < n; i += step)
    assert_int_equal(epic_reasoning_push(&r, text + i, i + step > n ? n - i : step, &a, &b), 0);
  assert_int_equal(epic_reasoning_finish(&r, &a, &b), 0);
  snprintf(rs, 256, "%s", a.p ? a.p : "");
  snprintf(ct, 256, "%s", b.p ? b.p : "");
  epic_reasoning_out_free(&a);
  epic_reasoning_out_free(&b);
}

static void test_reasoning(void **state) {
  (void)state;
  static const struct {
    const char *text;
    int open;
    const char *rs, *ct;
  } cases[] = {
      {"I think so.</think>\n\nYes.", 1, "I think so.", "\n\nYes."},
      {"<think>plan</think>answer", 0, "plan", "answer"},
      {"\n <think>plan</think>answer", 0, "plan", "answer"},
      {"no tags at all", 0, "", "no tags at all"},
      {"no tags, open", 1, "no tags, open", ""},
      {"a </thin b</think>c</think>d", 1, "a </thin b", "c</think>d"},
      {"<thin>x", 0, "", "<thin>x"},
      {"x<think>y", 0, "", "x<think>y"},
      {"ends in a partial </thi", 1, "ends in a partial </thi", ""},
      {"<<</think>", 1, "<<", ""},
      {"", 1, "", ""},
      {"\xe4\xb8\xad</think>\xe6\x96\x87", 1, "\xe4\xb8\xad", "\xe6\x96\x87"},
  };
  char rs[256], ct[256];
  for (size_t c = 0; c < sizeof cases / sizeof *cases; c++)
    for (size_t step = 1; step <= strlen(cases[c].text) + 1; step++) {
      split(cases[c].text, cases[c].open, step, rs, ct);
      if (strcmp(rs, cases[c].rs) || strcmp(ct, cases[c].ct))
        fail_msg("case %zu step %zu: got [%s][%s], want [%s][%s]", c, step, rs, ct, cases[c].rs,
                 cases[c].ct);
    }
  const char *r1 = "<\xef\xbd\x9c" "Assistant\xef\xbd\x9c><think>\n";
  assert_true(epic_reasoning_prompt_opens(r1, strlen(r1)));
  assert_false(epic_reasoning_prompt_opens("<｜Assistant｜>", strlen("<｜Assistant｜>")));
  assert_false(epic_reasoning_prompt_opens("<think>x</think>", 16));
}

static void expect_error(int chat, const char *body, int status, const char *param) {
  epic_oai_request r;
  epic_oai_error e;
  memset(&e, 0, sizeof e);
  epic_status st = epic_oai_parse(body, strlen(body), chat, &r, &e);
  if (st != EPIC_ERR_INVALID || e.http_status != status || strcmp(e.param, param) ||
      strncmp(e.message, param, strlen(param)))
    fail_msg("%s: got status %d param '%s' message '%s', want %d '%s'", body, e.http_status,
             e.param, e.message, status, param);
  char *j = epic_oai_error_json(&e);
  assert_non_null(j);
  assert_non_null(strstr(j, "\"error\""));
  free(j);
  epic_oai_request_clear(&r);
}

static void test_openai_parse(void **state) {
  (void)state;
  const char *ok = "{\"model\":\"m\",\"messages\":[{\"role\":\"developer\",\"content\":\"s\"},"
                   "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"hi\"}]}],"
                   "\"max_completion_tokens\":7,\"temperature\":0,\"top_p\":0.5,\"seed\":3,"
                   "\"stop\":[\"a\",\"bc\"],\"n\":2,\"stream\":true,\"stream_options\":"
                   "{\"include_usage\":true},\"logprobs\":true,\"top_logprobs\":4,"
                   "\"unknown_field\":{\"x\":[1]},\"user\":\"u\"}";
  epic_oai_request r;
  epic_oai_error e;
  assert_int_equal(epic_oai_parse(ok, strlen(ok), 1, &r, &e), EPIC_OK);
  assert_int_equal(r.max_tokens, 7);
  assert_true(r.temperature == 0 && r.top_p == 0.5f && r.has_seed && r.seed == 3);
  assert_int_equal(r.n_stops, 2);
  assert_int_equal(r.stop_lens[1], 2);
  assert_true(r.n == 2 && r.stream && r.include_usage && r.logprobs && r.top_logprobs == 4);
  epic_oai_request_clear(&r);
  const char *ids = "{\"model\":\"m\",\"prompt\":[[1,2,3]],\"logprobs\":2,\"max_tokens\":null}";
  assert_int_equal(epic_oai_parse(ids, strlen(ids), 0, &r, &e), EPIC_OK);
  assert_int_equal(r.n_prompt_ids, 3);
  assert_true(r.logprobs && r.top_logprobs == 2 && r.max_tokens == 0 && r.temperature == 1);
  epic_oai_request_clear(&r);

  expect_error(1, "{", 400, "");
  expect_error(1, "[1]", 400, "");
  expect_error(1, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", 400, "model");
  expect_error(1, "{\"model\":1,\"messages\":[]}", 400, "model");
  expect_error(1, "{\"model\":\"m\"}", 400, "messages");
  expect_error(1, "{\"model\":\"m\",\"messages\":[]}", 400, "messages");
  expect_error(1, "{\"model\":\"m\",\"messages\":[3]}", 400, "messages[0]");
  expect_error(1, "{\"model\":\"m\",\"messages\":[{\"role\":\"robot\",\"content\":\"x\"}]}", 400,
               "messages[0].role");
  expect_error(1, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":5}]}", 400,
               "messages[0].content");
  expect_error(1, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
                  "\"image_url\"}]}]}", 400, "messages[0].content[0]");
#define CHAT(extra) "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]," extra "}"
  expect_error(1, CHAT("\"max_tokens\":\"5\""), 400, "max_tokens");
  expect_error(1, CHAT("\"max_completion_tokens\":0"), 400, "max_completion_tokens");
  expect_error(1, CHAT("\"max_tokens\":1.5"), 400, "max_tokens");
  expect_error(1, CHAT("\"temperature\":\"hot\""), 400, "temperature");
  expect_error(1, CHAT("\"temperature\":3"), 400, "temperature");
  expect_error(1, CHAT("\"top_p\":0"), 400, "top_p");
  expect_error(1, CHAT("\"seed\":\"x\""), 400, "seed");
  expect_error(1, CHAT("\"n\":0"), 400, "n");
  expect_error(1, CHAT("\"n\":129"), 400, "n"); /* above any --max-n */
  expect_error(1, CHAT("\"stop\":5"), 400, "stop");
  expect_error(1, CHAT("\"stop\":[\"a\",7]"), 400, "stop[1]");
  expect_error(1, CHAT("\"stream\":\"yes\""), 400, "stream");
  expect_error(1, CHAT("\"stream_options\":{\"include_usage\":1}"), 400,
               "stream_options.include_usage");
  expect_error(1, CHAT("\"logprobs\":1"), 400, "logprobs");
  expect_error(1, CHAT("\"top_logprobs\":3"), 400, "top_logprobs");
  expect_error(1, CHAT("\"logprobs\":true,\"top_logprobs\":21"), 400, "top_logprobs");
  expect_error(1, CHAT("\"epic_chat_template\":\"v9\""), 400, "epic_chat_template");
  expect_error(0, "{\"model\":\"m\"}", 400, "prompt");
  expect_error(0, "{\"model\":\"m\",\"prompt\":{}}", 400, "prompt");
  expect_error(0, "{\"model\":\"m\",\"prompt\":[\"a\",\"b\"]}", 400, "prompt");
  expect_error(0, "{\"model\":\"m\",\"prompt\":[1,-2]}", 400, "prompt[1]");
  expect_error(0, "{\"model\":\"m\",\"prompt\":\"x\",\"logprobs\":true}", 400, "logprobs");
  expect_error(0, "{\"model\":\"m\",\"prompt\":\"x\",\"logprobs\":6}", 400, "logprobs");
  cJSON *s = epic_oai_string("a\xff" "b\xe4\xb8", 5);
  assert_string_equal(s->valuestring, "a\xef\xbf\xbd" "b\xef\xbf\xbd\xef\xbf\xbd");
  cJSON_Delete(s);
}

static void test_metrics_render(void **state) {
  (void)state;
  epic_metrics_snapshot s;
  memset(&s, 0, sizeof s);
  s.model_name = "m\"x";
  s.process_start_time = 1700000000;
  s.requests_running = 3;
  s.has_engine = 1;
  s.kv_pages_used = 1;
  s.kv_pages_total = 4;
  s.graph_captures_total = 2;
  s.graph_replays_total = 30;
  s.has_prefix_cache = 1;
  s.prefix_hit_tokens_total = 640;
  s.prefix_cached_pages = 9;
  s.has_mtp = 1;
  s.mtp_draft_tokens_total = 50;
  s.mtp_accepted_tokens_total = 41;
  s.has_eplb = 1;
  s.eplb_rebalances_total = 3;
  s.eplb_imbalance = 1.25;
  s.has_a2a = 1;
  s.a2a_backend = "nccl";
  s.a2a_dispatch_bytes = 123;
  int64_t experts[2] = {5, 7};
  s.expert_tokens = experts;
  s.n_experts = 2;
  epic_hist_observe(&s.ttft, 0.003);
  epic_hist_observe(&s.ttft, 1000);
  s.http_requests[EPIC_METRICS_EP_CHAT][EPIC_METRICS_CODE_4XX] = 2;
  epic_metrics_buf b = {0};
  assert_int_equal(epic_metrics_render(&s, &b), EPIC_OK);
  const char *want[] = {
      "# TYPE epic_requests_running gauge\nepic_requests_running 3\n",
      "epic_model_info{model=\"m\\\"x\"} 1\n",
      "epic_time_to_first_token_seconds_bucket{le=\"0.0025\"} 0\n",
      "epic_time_to_first_token_seconds_bucket{le=\"0.005\"} 1\n",
      "epic_time_to_first_token_seconds_bucket{le=\"300\"} 1\n",
      "epic_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2\n",
      "epic_time_to_first_token_seconds_count 2\n",
      "epic_kv_cache_usage_ratio 0.250000\n",
      "# TYPE epic_step_graph_captures_total counter\nepic_step_graph_captures_total 2\n",
      "# TYPE epic_step_graph_replays_total counter\nepic_step_graph_replays_total 30\n",
      "# TYPE epic_prefix_cache_hit_tokens_total counter\nepic_prefix_cache_hit_tokens_total 640\n",
      "# TYPE epic_prefix_cache_pages gauge\nepic_prefix_cache_pages 9\n",
      "# TYPE epic_mtp_draft_tokens_total counter\nepic_mtp_draft_tokens_total 50\n",
      "# TYPE epic_mtp_accepted_tokens_total counter\nepic_mtp_accepted_tokens_total 41\n",
      "# TYPE epic_eplb_rebalances_total counter\nepic_eplb_rebalances_total 3\n",
      "# TYPE epic_eplb_imbalance gauge\nepic_eplb_imbalance 1.250000\n",
      "epic_a2a_bytes_total{backend=\"nccl\",phase=\"dispatch\"} 123\n",
      "epic_expert_tokens_total{expert=\"1\"} 7\n",
      "epic_http_requests_total{endpoint=\"/v1/chat/completions\",code=\"4xx\"} 2\n",
      "epic_process_start_time_seconds 1700000000.000\n"};
  for (size_t i = 0; i < sizeof want / sizeof *want; i++)
    if (!strstr(b.p, want[i]))
      fail_msg("missing: %s", want[i]);
  epic_metrics_buf_free(&b);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_reasoning),
                                     cmocka_unit_test(test_openai_parse),
                                     cmocka_unit_test(test_metrics_render)};
  return cmocka_run_group_tests_name("http_units", tests, NULL, NULL);
}
