/* libFuzzer target: an HTTP request body of the OpenAI front as the server
 * gets it (coordinator/openai.h, coordinator/http_limits.h). Byte 0 picks the
 * endpoint (bit 0: chat / completions), the limit check (bit 1: serve's full
 * check / the gateway's) and one of four limit sets (bits 2-3); the rest is
 * the JSON body. Parsing, validation, the limit check and what the engine
 * backend does next with an accepted request (chat rendering + tokenization,
 * the UTF-8 repair of returned strings, error JSON) must neither crash nor
 * leak, and an accepted request must respect the limits in force. */
#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/gateway_impl.h"
#include "coordinator/http_limits.h"
#include "coordinator/openai.h"
#include "coordinator/tokenizer/chat.h"
#include "fuzz_util.h"

static void check_error(const epic_oai_error *e) {
  if (e->http_status < 400 || e->http_status > 499 || !e->message[0])
    abort();
  char *j = epic_oai_error_json(e);
  cJSON *back = j ? cJSON_Parse(j) : NULL;
  if (!back) /* the error object must be valid JSON whatever the message holds */
    abort();
  cJSON_Delete(back);
  free(j);
}

/* A returned string (prompt echo, stop, chat content) must always print. */
static void check_string(const char *p, size_t n) {
  cJSON *s = epic_oai_string(p, n);
  char *out = s ? cJSON_PrintUnformatted(s) : NULL;
  if (s && !out)
    abort();
  free(out);
  cJSON_Delete(s);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  static const epic_gw_request_limits sets[4] = {
      {0}, /* the defaults */
      {.max_prompt_tokens = 8,
       .max_tokens = 16,
       .max_stop_strings = 2,
       .max_stop_len = 4,
       .max_n = 2,
       .max_top_logprobs = 1},
      {.max_n = 128, .max_top_logprobs = 20, .max_stop_strings = 1024, .max_stop_len = 65536},
      {.max_prompt_tokens = 1, .max_tokens = 1, .max_stop_strings = 1, .max_stop_len = 1}};
  const int chat = data[0] & 1, full = (data[0] >> 1) & 1;
  const epic_gw_request_limits *lim = &sets[(data[0] >> 2) & 3];
  epic_oai_request rq;
  epic_oai_error err;
  memset(&err, 0, sizeof err);
  epic_status st = epic_oai_parse((const char *)data + 1, size - 1, chat, &rq, &err);
  if (st == EPIC_ERR_INVALID)
    check_error(&err);
  if (st == EPIC_OK) {
    if (rq.n < 1 || rq.n > EPIC_OAI_MAX_N || rq.n_stops > EPIC_OAI_MAX_STOPS || !rq.model ||
        (chat && !rq.messages) || (!chat && !rq.prompt_text && !rq.prompt_ids))
      abort();
    st = epic_http_check_limits(&rq, lim, full, &err);
    if (st == EPIC_ERR_INVALID) {
      check_error(&err);
    } else if (st == EPIC_OK) {
      const epic_gw_request_limits rl = epic_gw_limits_effective(lim);
      if (rq.n > rl.max_n || (full && rq.top_logprobs > rl.max_top_logprobs))
        abort();
      if (full && (rq.n_stops > rl.max_stop_strings ||
                   (rl.max_tokens > 0 && rq.max_tokens > rl.max_tokens) ||
                   (rl.max_prompt_tokens > 0 && rq.n_prompt_ids > rl.max_prompt_tokens)))
        abort();
      for (int i = 0; i < rq.n_stops; i++) {
        if (full && (int64_t)rq.stop_lens[i] > rl.max_stop_len)
          abort();
        check_string(rq.stops[i], rq.stop_lens[i]);
      }
      const epic_tokenizer *tok = epic_fuzz_tokenizer();
      if (rq.messages) { /* what the engine backend does next (http_engine.c) */
        epic_chat_messages *msgs = NULL;
        epic_chat_template t = EPIC_CHAT_AUTO;
        if (epic_chat_template_parse(rq.chat_template, &t) != EPIC_OK)
          abort(); /* the parser accepts only known names */
        if (epic_chat_messages_from_json(rq.messages, &msgs) == EPIC_OK) {
          int32_t *ids = NULL;
          char *text = NULL;
          size_t n = 0, len = 0;
          if (epic_chat_encode(tok, t, epic_chat_messages_items(msgs),
                               epic_chat_messages_count(msgs), 1, &ids, &n, &text, &len) == EPIC_OK)
            check_string(text, len);
          epic_tokenizer_text_free(text);
          epic_tokenizer_ids_free(ids);
        }
        epic_chat_messages_free(msgs);
      } else if (rq.prompt_text) {
        int32_t *ids = NULL;
        size_t n = 0;
        if (epic_tokenizer_encode(tok, rq.prompt_text, rq.prompt_len, 1, &ids, &n) == EPIC_OK)
          epic_tokenizer_ids_free(ids);
        check_string(rq.prompt_text, rq.prompt_len);
      }
    }
  }
  epic_oai_request_clear(&rq);
  return 0;
}
