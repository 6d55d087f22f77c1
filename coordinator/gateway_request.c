/* Gateway request validation, prompt encoding and stop strings (gateway_impl.h). */
#define _GNU_SOURCE
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "coordinator/gateway_impl.h"
#include "coordinator/tokenizer/chat.h"

epic_status epic_gw_buf_append(epic_gw_buf *b, const void *data, size_t n) {
  if (n == 0)
    return EPIC_OK;
  if (b->n + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->n + n + 1)
      cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p)
      return EPIC_ERR_NOMEM;
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->n, data, n);
  b->n += n;
  b->p[b->n] = '\0';
  return EPIC_OK;
}

void epic_gw_buf_free(epic_gw_buf *b) {
  free(b->p);
  memset(b, 0, sizeof *b);
}

static epic_status fail(char err[EPIC_GW_ERR_LEN], const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static epic_status fail(char err[EPIC_GW_ERR_LEN], const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, EPIC_GW_ERR_LEN, fmt, ap);
  va_end(ap);
  return EPIC_ERR_INVALID;
}

static int parse_role(const char *s, epic_chat_role *out) {
  static const struct {
    const char *name;
    epic_chat_role role;
  } roles[] = {{"system", EPIC_ROLE_SYSTEM},
               {"user", EPIC_ROLE_USER},
               {"assistant", EPIC_ROLE_ASSISTANT},
               {"tool", EPIC_ROLE_TOOL}};
  for (size_t i = 0; i < sizeof roles / sizeof roles[0]; i++)
    if (strcmp(s, roles[i].name) == 0) {
      *out = roles[i].role;
      return 0;
    }
  return -1;
}

/* The ids an encoding produced must be ids the model has (a tokenizer larger
 * than the model's vocabulary would otherwise feed it garbage rows). */
static epic_status check_ids(const int32_t *ids, int64_t n, int64_t vocab, const char *field,
                             char err[EPIC_GW_ERR_LEN]) {
  for (int64_t i = 0; i < n; i++)
    if (ids[i] < 0 || ids[i] >= vocab)
      return fail(err, "%s[%lld]: %d is not a token id of this model (vocabulary %lld)", field,
                  (long long)i, ids[i], (long long)vocab);
  return EPIC_OK;
}

static epic_status encode_chat(const Epic__V1__Chat *c, const epic_gw_limits *lim, int32_t **ids,
                               size_t *n, char **rendered, size_t *rendered_len,
                               char err[EPIC_GW_ERR_LEN]) {
  epic_chat_template tmpl = EPIC_CHAT_AUTO;
  if (c->n_messages == 0)
    return fail(err, "prompt.chat.messages: empty");
  if (c->template_name && c->template_name[0] &&
      epic_chat_template_parse(c->template_name, &tmpl) != EPIC_OK)
    return fail(err, "prompt.chat.template_name: '%.64s' is not auto, v3 or r1", c->template_name);
  epic_chat_message *msgs = calloc(c->n_messages, sizeof *msgs);
  if (!msgs)
    return EPIC_ERR_NOMEM;
  epic_status st = EPIC_OK;
  for (size_t i = 0; i < c->n_messages; i++) {
    const Epic__V1__ChatMessage *m = c->messages[i];
    if (parse_role(m->role, &msgs[i].role) != 0) {
      st = fail(err,
                "prompt.chat.messages[%zu].role: '%.64s' is not system, user, assistant or tool", i,
                m->role);
      goto done;
    }
    msgs[i].content = m->content;
  }
  if (epic_chat_encode(lim->tok, tmpl, msgs, c->n_messages, !c->no_generation_prompt, ids, n,
                       rendered, rendered_len) != EPIC_OK)
    st = fail(err, "prompt.chat: the chat template could not render these messages");
done:
  free(msgs);
  return st;
}

epic_status epic_gw_encode_prompt(const Epic__V1__Prompt *p, const epic_gw_limits *lim,
                                  int32_t **ids, int64_t *n, char **rendered, size_t *rendered_len,
                                  char err[EPIC_GW_ERR_LEN]) {
  int32_t *tok_ids = NULL;
  size_t nn = 0;
  *ids = NULL;
  *n = 0;
  if (!p || p->kind_case == EPIC__V1__PROMPT__KIND__NOT_SET)
    return fail(err, "prompt: missing (set prompt.text, prompt.chat or prompt.token_ids)");
  switch (p->kind_case) {
  case EPIC__V1__PROMPT__KIND_TOKEN_IDS: {
    const Epic__V1__TokenIds *t = p->token_ids;
    if (t->n_ids == 0)
      return fail(err, "prompt.token_ids.ids: empty");
    EPIC_CHECK(check_ids(t->ids, (int64_t)t->n_ids, lim->vocab_size, "prompt.token_ids.ids", err));
    *ids = malloc(t->n_ids * sizeof **ids);
    if (!*ids)
      return EPIC_ERR_NOMEM;
    memcpy(*ids, t->ids, t->n_ids * sizeof **ids);
    *n = (int64_t)t->n_ids;
    return EPIC_OK;
  }
  case EPIC__V1__PROMPT__KIND_TEXT: {
    if (!p->text || !p->text[0])
      return fail(err, "prompt.text: empty");
    if (!lim->tok)
      return fail(err, "prompt.text: this model has no tokenizer.json; send prompt.token_ids");
    int bos = !p->no_bos && epic_tokenizer_bos_id(lim->tok) >= 0;
    if (epic_tokenizer_encode(lim->tok, p->text, strlen(p->text), bos, &tok_ids, &nn) != EPIC_OK)
      return fail(err, "prompt.text: the tokenizer could not encode it");
    break;
  }
  case EPIC__V1__PROMPT__KIND_CHAT:
    if (!lim->tok)
      return fail(err, "prompt.chat: this model has no tokenizer.json; send prompt.token_ids");
    EPIC_CHECK(encode_chat(p->chat, lim, &tok_ids, &nn, rendered, rendered_len, err));
    break;
  default: return fail(err, "prompt: unknown kind %d", (int)p->kind_case);
  }
  const char *field = p->kind_case == EPIC__V1__PROMPT__KIND_TEXT ? "prompt.text" : "prompt.chat";
  epic_status st = EPIC_OK;
  if (nn == 0)
    st = fail(err, "%s: encodes to no tokens", field);
  else {
    char what[64];
    snprintf(what, sizeof what, "%s: token", field);
    st = check_ids(tok_ids, (int64_t)nn, lim->vocab_size, what, err);
  }
  if (st != EPIC_OK) {
    epic_tokenizer_ids_free(tok_ids);
    if (rendered && *rendered) {
      epic_tokenizer_text_free(*rendered);
      *rendered = NULL;
    }
    return st;
  }
  /* Hand out plain malloc'd memory whatever the tokenizer's allocator is. */
  *ids = malloc(nn * sizeof **ids);
  if (!*ids) {
    epic_tokenizer_ids_free(tok_ids);
    return EPIC_ERR_NOMEM;
  }
  memcpy(*ids, tok_ids, nn * sizeof **ids);
  epic_tokenizer_ids_free(tok_ids);
  *n = (int64_t)nn;
  return EPIC_OK;
}

/* Strict UTF-8 (no overlongs, surrogates or values past U+10FFFF). Stop strings
 * must be: the text is cut where one starts, and that cut has to fall between
 * characters for the streamed text to stay valid UTF-8. */
static int valid_utf8(const unsigned char *s, size_t n) {
  size_t i = 0;
  while (i < n) {
    unsigned c = s[i];
    size_t len = c < 0x80           ? 1
                 : (c >> 5) == 0x6  ? 2
                 : (c >> 4) == 0xe  ? 3
                 : (c >> 3) == 0x1e ? 4
                                    : 0;
    if (len == 0 || i + len > n)
      return 0;
    unsigned cp = len == 1 ? c : len == 2 ? c & 0x1f : len == 3 ? c & 0x0f : c & 0x07;
    for (size_t k = 1; k < len; k++) {
      if ((s[i + k] & 0xc0) != 0x80)
        return 0;
      cp = (cp << 6) | (s[i + k] & 0x3f);
    }
    static const unsigned min[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
      return 0;
    i += len;
  }
  return 1;
}

static epic_status copy_stops(const Epic__V1__SamplingParams *sp, const epic_gw_limits *lim,
                              const epic_gw_request_limits *rl, epic_gw_stops *out,
                              char err[EPIC_GW_ERR_LEN]) {
  if (sp->n_stop == 0)
    return EPIC_OK;
  if ((int64_t)sp->n_stop > rl->max_stop_strings)
    return fail(err, "sampling.stop: %zu stop strings exceed --max-stop-strings %lld", sp->n_stop,
                (long long)rl->max_stop_strings);
  if (!lim->tok)
    return fail(err, "sampling.stop: this model has no tokenizer.json to match text against");
  for (size_t i = 0; i < sp->n_stop; i++) {
    size_t len = strlen(sp->stop[i]);
    if (len == 0)
      return fail(err, "sampling.stop[%zu]: empty", i);
    if ((int64_t)len > rl->max_stop_len)
      return fail(err, "sampling.stop[%zu]: %zu bytes exceed --max-stop-len %lld", i, len,
                  (long long)rl->max_stop_len);
    if (!valid_utf8((const unsigned char *)sp->stop[i], len))
      return fail(err, "sampling.stop[%zu]: not valid UTF-8", i);
  }
  out->s = calloc(sp->n_stop, sizeof *out->s);
  out->len = calloc(sp->n_stop, sizeof *out->len);
  if (!out->s || !out->len)
    return EPIC_ERR_NOMEM;
  for (size_t i = 0; i < sp->n_stop; i++) {
    out->len[i] = strlen(sp->stop[i]);
    out->s[i] = strdup(sp->stop[i]);
    if (!out->s[i])
      return EPIC_ERR_NOMEM;
    out->n = (int)i + 1;
  }
  return EPIC_OK;
}

epic_gw_request_limits epic_gw_limits_effective(const epic_gw_request_limits *req) {
  epic_gw_request_limits r = {0};
  if (req)
    r = *req;
  if (r.max_stop_strings <= 0)
    r.max_stop_strings = EPIC_GW_MAX_STOPS;
  if (r.max_stop_len <= 0)
    r.max_stop_len = EPIC_GW_MAX_STOP_LEN;
  if (r.max_stop_token_ids <= 0)
    r.max_stop_token_ids = EPIC_GW_MAX_STOP_IDS;
  /* OpenAI clients send n and top_logprobs (up to 20) as a matter of course;
   * only a request that asks for alternatives pays for them (the engine computes
   * them per sequence). */
  if (r.max_n <= 0)
    r.max_n = EPIC_GW_DEFAULT_MAX_N;
  if (r.max_top_logprobs == 0)
    r.max_top_logprobs = EPIC_GW_DEFAULT_MAX_TOP_LOGPROBS;
  else if (r.max_top_logprobs < 0)
    r.max_top_logprobs = 0;
  if (r.max_prompt_tokens < 0)
    r.max_prompt_tokens = 0;
  if (r.max_tokens < 0)
    r.max_tokens = 0;
  return r;
}

epic_status epic_gw_check_choices(int64_t n, const char *n_field, int64_t top_logprobs,
                                  const char *lp_field, const epic_gw_limits *lim,
                                  char err[EPIC_GW_ERR_LEN]) {
  epic_gw_request_limits rl = epic_gw_limits_effective(&lim->req);
  if (n < 1)
    return fail(err, "%s: %lld must be >= 1", n_field, (long long)n);
  if (n > rl.max_n)
    return fail(err, "%s: %lld exceeds --max-n %lld", n_field, (long long)n, (long long)rl.max_n);
  if (top_logprobs < 0)
    return fail(err, "%s: %lld must be >= 0", lp_field, (long long)top_logprobs);
  if (top_logprobs > rl.max_top_logprobs)
    return fail(err, "%s: %lld exceeds --max-top-logprobs %lld", lp_field, (long long)top_logprobs,
                (long long)rl.max_top_logprobs);
  return EPIC_OK;
}

epic_status epic_gw_prepare(const Epic__V1__GenerateRequest *rq, const epic_gw_limits *lim,
                            epic_gw_job *job, char err[EPIC_GW_ERR_LEN]) {
  static const Epic__V1__SamplingParams no_sampling = EPIC__V1__SAMPLING_PARAMS__INIT;
  const Epic__V1__SamplingParams *sp = rq->sampling ? rq->sampling : &no_sampling;
  const epic_gw_request_limits rl = epic_gw_limits_effective(&lim->req);
  memset(job, 0, sizeof *job);
  err[0] = '\0';

  /* Cheap field checks first, so that a bad parameter is named before any
   * tokenization work. */
  if (!isfinite(sp->temperature) || sp->temperature < 0)
    return fail(err, "sampling.temperature: %g must be >= 0 (0 = greedy)", (double)sp->temperature);
  float top_p = 1.0f;
  if (sp->top_p_present_case == EPIC__V1__SAMPLING_PARAMS__TOP_P_PRESENT_TOP_P) {
    top_p = sp->top_p;
    if (!(top_p > 0.0f && top_p <= 1.0f))
      return fail(err, "sampling.top_p: %g is outside (0, 1]", (double)top_p);
  }
  if (sp->top_k < 0)
    return fail(err, "sampling.top_k: %d must be >= 0 (0 = off)", sp->top_k);
  int has_max =
      sp->max_tokens_present_case == EPIC__V1__SAMPLING_PARAMS__MAX_TOKENS_PRESENT_MAX_TOKENS;
  if (has_max && sp->max_tokens <= 0)
    return fail(err, "sampling.max_tokens: %d must be >= 1", sp->max_tokens);
  if (has_max && rl.max_tokens > 0 && sp->max_tokens > rl.max_tokens)
    return fail(err, "sampling.max_tokens: %d exceeds --max-tokens-limit %lld", sp->max_tokens,
                (long long)rl.max_tokens);
  if ((int64_t)sp->n_stop_token_ids > rl.max_stop_token_ids)
    return fail(err, "sampling.stop_token_ids: %zu ids exceed --max-stop-token-ids %lld",
                sp->n_stop_token_ids, (long long)rl.max_stop_token_ids);
  /* A token-id prompt is counted before it is copied. */
  if (rl.max_prompt_tokens > 0 && rq->prompt &&
      rq->prompt->kind_case == EPIC__V1__PROMPT__KIND_TOKEN_IDS &&
      (int64_t)rq->prompt->token_ids->n_ids > rl.max_prompt_tokens)
    return fail(err, "prompt.token_ids.ids: %zu tokens exceed --max-prompt-tokens %lld",
                rq->prompt->token_ids->n_ids, (long long)rl.max_prompt_tokens);
  EPIC_CHECK(check_ids(sp->stop_token_ids, (int64_t)sp->n_stop_token_ids, lim->vocab_size,
                       "sampling.stop_token_ids", err));
  EPIC_CHECK(copy_stops(sp, lim, &rl, &job->stops, err));

  EPIC_CHECK(epic_gw_encode_prompt(rq->prompt, lim, &job->prompt, &job->n_prompt, NULL, NULL, err));
  if (rl.max_prompt_tokens > 0 && job->n_prompt > rl.max_prompt_tokens)
    return fail(err, "prompt: %lld tokens exceed --max-prompt-tokens %lld",
                (long long)job->n_prompt, (long long)rl.max_prompt_tokens);
  if (job->n_prompt >= lim->max_context)
    return fail(err, "prompt: %lld tokens leave no room to generate within the context length %lld",
                (long long)job->n_prompt, (long long)lim->max_context);
  int64_t room = lim->max_context - job->n_prompt;
  if (has_max) {
    if (sp->max_tokens > room)
      return fail(err,
                  "sampling.max_tokens: prompt (%lld tokens) + max_tokens (%d) exceeds the context "
                  "length %lld",
                  (long long)job->n_prompt, sp->max_tokens, (long long)lim->max_context);
    job->max_tokens = sp->max_tokens;
  } else {
    job->max_tokens = lim->default_max_tokens < room ? lim->default_max_tokens : room;
    if (rl.max_tokens > 0 && job->max_tokens > rl.max_tokens)
      job->max_tokens = rl.max_tokens;
  }
  if (lim->kv_tokens > 0 && lim->page_size > 0) {
    int64_t need =
        (job->n_prompt + job->max_tokens + lim->page_size - 1) / lim->page_size * lim->page_size;
    if (need > lim->kv_tokens)
      return fail(err,
                  "sampling.max_tokens: prompt (%lld tokens) + max_tokens (%lld) needs %lld tokens "
                  "of KV cache, "
                  "more than a worker has (%lld)",
                  (long long)job->n_prompt, (long long)job->max_tokens, (long long)need,
                  (long long)lim->kv_tokens);
  }
  job->sampling = (epic_sampling_params){.size = sizeof(epic_sampling_params),
                                         .temperature = sp->temperature,
                                         .top_p = top_p,
                                         .top_k = sp->top_k,
                                         .seed = sp->seed};
  job->ignore_eos = sp->ignore_eos;
  job->logprobs = sp->logprobs;
  job->skip_special = !sp->include_special_text;
  if (sp->n_stop_token_ids) {
    job->stop_ids = malloc(sp->n_stop_token_ids * sizeof *job->stop_ids);
    if (!job->stop_ids)
      return EPIC_ERR_NOMEM;
    memcpy(job->stop_ids, sp->stop_token_ids, sp->n_stop_token_ids * sizeof *job->stop_ids);
    job->n_stop_ids = (int)sp->n_stop_token_ids;
  }
  return EPIC_OK;
}

void epic_gw_job_clear(epic_gw_job *job) {
  if (!job)
    return;
  free(job->prompt);
  free(job->stop_ids);
  for (int i = 0; i < job->stops.n; i++)
    free(job->stops.s[i]);
  free(job->stops.s);
  free(job->stops.len);
  memset(job, 0, sizeof *job);
}

void epic_gw_stopper_init(epic_gw_stopper *st, const epic_gw_stops *stops) {
  memset(st, 0, sizeof *st);
  st->stops = stops;
  st->matched = -1;
}

/* Earliest stop string occurrence in the held text (ties: the longer stop). */
static void find_stop(const epic_gw_stopper *st, size_t *pos, int *which) {
  *which = -1;
  *pos = 0;
  for (int i = 0; i < st->stops->n; i++) {
    const char *hit = memmem(st->held.p, st->held.n, st->stops->s[i], st->stops->len[i]);
    if (!hit)
      continue;
    size_t at = (size_t)(hit - st->held.p);
    if (*which < 0 || at < *pos || (at == *pos && st->stops->len[i] > st->stops->len[*which])) {
      *pos = at;
      *which = i;
    }
  }
}

/* Length of the longest tail of the held text that is a proper prefix of a stop
 * string: that much must wait for more text. */
static size_t holdback(const epic_gw_stopper *st) {
  size_t best = 0;
  for (int i = 0; i < st->stops->n; i++) {
    size_t max = st->stops->len[i] - 1;
    if (max > st->held.n)
      max = st->held.n;
    for (size_t k = max; k > best; k--)
      if (memcmp(st->held.p + st->held.n - k, st->stops->s[i], k) == 0) {
        best = k;
        break;
      }
  }
  return best;
}

epic_status epic_gw_stopper_push(epic_gw_stopper *st, const char *text, size_t n,
                                 epic_gw_buf *out) {
  if (st->matched >= 0)
    return EPIC_OK;
  if (!st->stops || st->stops->n == 0)
    return epic_gw_buf_append(out, text, n);
  /* No new text changes nothing (and held.p may still be NULL: pointer
   * arithmetic on it is undefined). Found by fuzz_gw_request. */
  if (n == 0)
    return EPIC_OK;
  EPIC_CHECK(epic_gw_buf_append(&st->held, text, n));
  size_t pos;
  int which;
  find_stop(st, &pos, &which);
  if (which >= 0) {
    EPIC_CHECK(epic_gw_buf_append(out, st->held.p, pos));
    st->matched = which;
    st->held.n = 0;
    return EPIC_OK;
  }
  size_t keep = holdback(st);
  size_t emit = st->held.n - keep;
  EPIC_CHECK(epic_gw_buf_append(out, st->held.p, emit));
  memmove(st->held.p, st->held.p + emit, keep);
  st->held.n = keep;
  return EPIC_OK;
}

epic_status epic_gw_stopper_finish(epic_gw_stopper *st, epic_gw_buf *out) {
  if (st->matched >= 0 || st->held.n == 0)
    return EPIC_OK;
  EPIC_CHECK(epic_gw_buf_append(out, st->held.p, st->held.n));
  st->held.n = 0;
  return EPIC_OK;
}

void epic_gw_stopper_free(epic_gw_stopper *st) {
  epic_gw_buf_free(&st->held);
}
