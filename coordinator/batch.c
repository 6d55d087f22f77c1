/* Batch job lines: parsing, prompt encoding, record formatting, resume index. */
#define _GNU_SOURCE /* memmem */
#include "batch.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

/* ---- small string builder ------------------------------------------------------ */

typedef struct sbuf {
  char *p;
  size_t n, cap;
  int oom;
} sbuf;

static void sb_put(sbuf *b, const char *s, size_t n) {
  if (b->oom)
    return;
  if (b->n + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + n + 1)
      cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
      b->oom = 1;
      return;
    }
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->n, s, n);
  b->n += n;
  b->p[b->n] = 0;
}

static void sb_str(sbuf *b, const char *s) {
  sb_put(b, s, strlen(s));
}

static void sb_fmt(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_fmt(sbuf *b, const char *fmt, ...) {
  char tmp[128];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
  va_end(ap);
  if (n < 0 || (size_t)n >= sizeof tmp) {
    b->oom = 1; /* only short numeric fields are formatted this way */
    return;
  }
  sb_put(b, tmp, (size_t)n);
}

/* Length of the valid UTF-8 sequence at s[0..n) (1-4), or 0 when invalid
 * (overlong forms, surrogates and code points above U+10FFFF are invalid). */
static size_t utf8_seq(const unsigned char *s, size_t n) {
  unsigned c = s[0];
  if (c < 0x80)
    return 1;
  size_t len;
  unsigned lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF)
    len = 2;
  else if (c >= 0xE0 && c <= 0xEF) {
    len = 3;
    if (c == 0xE0)
      lo = 0xA0;
    if (c == 0xED)
      hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4;
    if (c == 0xF0)
      lo = 0x90;
    if (c == 0xF4)
      hi = 0x8F;
  } else
    return 0;
  if (n < len)
    return 0;
  if (s[1] < lo || s[1] > hi)
    return 0;
  for (size_t i = 2; i < len; i++)
    if (s[i] < 0x80 || s[i] > 0xBF)
      return 0;
  return len;
}

/* A JSON string literal; invalid UTF-8 becomes U+FFFD so every line parses. */
static void sb_json(sbuf *b, const char *s, size_t n) {
  const unsigned char *u = (const unsigned char *)s;
  sb_put(b, "\"", 1);
  size_t run = 0; /* start of the pending run of bytes copied verbatim */
  for (size_t i = 0; i < n;) {
    unsigned c = u[i];
    const char *esc = NULL;
    char tmp[8];
    size_t adv = 1;
    if (c == '"')
      esc = "\\\"";
    else if (c == '\\')
      esc = "\\\\";
    else if (c == '\n')
      esc = "\\n";
    else if (c == '\r')
      esc = "\\r";
    else if (c == '\t')
      esc = "\\t";
    else if (c < 0x20) {
      snprintf(tmp, sizeof tmp, "\\u%04x", c);
      esc = tmp;
    } else if (c >= 0x80) {
      adv = utf8_seq(u + i, n - i);
      if (!adv) {
        esc = "\xEF\xBF\xBD";
        adv = 1;
      }
    }
    if (esc) {
      sb_put(b, s + run, i - run);
      sb_str(b, esc);
      run = i + adv;
    }
    i += adv;
  }
  sb_put(b, s + run, n - run);
  sb_put(b, "\"", 1);
}

static void sb_json_or_null(sbuf *b, const char *s) {
  if (s)
    sb_json(b, s, strlen(s));
  else
    sb_str(b, "null");
}

/* ---- parsing ---------------------------------------------------------------------- */

static uint64_t fnv1a(const void *p, size_t n, uint64_t h) {
  const unsigned char *s = p;
  for (size_t i = 0; i < n; i++) {
    h ^= s[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

static uint64_t mix64(uint64_t x) { /* splitmix64 finaliser */
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

epic_status epic_batch_request_fail(epic_batch_request *r, const char *fmt, ...) {
  int n = snprintf(r->error, sizeof r->error, "line %lld: ", (long long)r->line);
  if (n < 0 || (size_t)n >= sizeof r->error)
    n = 0;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(r->error + n, sizeof r->error - (size_t)n, fmt, ap);
  va_end(ap);
  return EPIC_ERR_INVALID;
}

/* JSON null counts as absent for every optional field (OpenAI clients send it). */
static const cJSON *opt_item(const cJSON *obj, const char *key) {
  const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, key);
  return cJSON_IsNull(it) ? NULL : it;
}

/* Integral JSON number in [lo, hi] (cJSON keeps doubles: exact up to 2^53). */
static int json_int(const cJSON *it, double lo, double hi, int64_t *out) {
  if (!cJSON_IsNumber(it))
    return 0;
  double v = it->valuedouble;
  if (!isfinite(v) || v != floor(v) || v < lo || v > hi)
    return 0;
  *out = (int64_t)v;
  return 1;
}

static const char *type_name(const cJSON *it) {
  if (cJSON_IsString(it))
    return "a string";
  if (cJSON_IsNumber(it))
    return "a number";
  if (cJSON_IsBool(it))
    return "a boolean";
  if (cJSON_IsArray(it))
    return "an array";
  if (cJSON_IsObject(it))
    return "an object";
  return "null";
}

/* Same rules as epic_chat_messages_from_json, checked first so that a bad
 * message gets a record naming it instead of a log line. */
static epic_status check_messages(epic_batch_request *r, const cJSON *msgs) {
  static const char *roles[] = {"system", "user", "assistant", "tool"};
  if (!msgs)
    return epic_batch_request_fail(r, "body.messages: missing");
  if (!cJSON_IsArray(msgs))
    return epic_batch_request_fail(r, "body.messages: expected an array, got %s", type_name(msgs));
  if (cJSON_GetArraySize(msgs) == 0)
    return epic_batch_request_fail(r, "body.messages: empty");
  const cJSON *m;
  int i = 0;
  cJSON_ArrayForEach(m, msgs) {
    if (!cJSON_IsObject(m))
      return epic_batch_request_fail(r, "body.messages[%d]: expected an object, got %s", i,
                                     type_name(m));
    const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
    int ri = -1;
    for (int k = 0; k < 4 && cJSON_IsString(role); k++)
      if (strcmp(role->valuestring, roles[k]) == 0)
        ri = k;
    if (!role)
      return epic_batch_request_fail(r, "body.messages[%d].role: missing", i);
    if (ri < 0)
      return epic_batch_request_fail(
          r, "body.messages[%d].role: expected system, user, assistant or tool", i);
    const cJSON *c = opt_item(m, "content");
    if (!c && ri != 2)
      return epic_batch_request_fail(
          r, "body.messages[%d].content: missing (a %s message needs text)", i, roles[ri]);
    if (c && cJSON_IsArray(c)) {
      const cJSON *part;
      int j = 0;
      cJSON_ArrayForEach(part, c) {
        const cJSON *ty = cJSON_GetObjectItemCaseSensitive(part, "type");
        const cJSON *tx = cJSON_GetObjectItemCaseSensitive(part, "text");
        if (!cJSON_IsString(ty) || strcmp(ty->valuestring, "text") != 0 || !cJSON_IsString(tx))
          return epic_batch_request_fail(r,
                                         "body.messages[%d].content[%d]: only {\"type\": \"text\", "
                                         "\"text\": ...} parts are supported",
                                         i, j);
        j++;
      }
    } else if (c && !cJSON_IsString(c))
      return epic_batch_request_fail(
          r, "body.messages[%d].content: expected a string or an array of text parts, got %s", i,
          type_name(c));
    const cJSON *tc = opt_item(m, "tool_calls");
    if (tc && ri == 2) {
      if (!cJSON_IsArray(tc))
        return epic_batch_request_fail(r, "body.messages[%d].tool_calls: expected an array", i);
      const cJSON *call;
      int j = 0;
      cJSON_ArrayForEach(call, tc) {
        const cJSON *ty = cJSON_GetObjectItemCaseSensitive(call, "type");
        const cJSON *fn = cJSON_GetObjectItemCaseSensitive(call, "function");
        const cJSON *args = cJSON_GetObjectItemCaseSensitive(fn, "arguments");
        if (!cJSON_IsString(cJSON_GetObjectItemCaseSensitive(fn, "name")) || !args ||
            cJSON_IsNull(args))
          return epic_batch_request_fail(
              r, "body.messages[%d].tool_calls[%d].function: needs name and arguments", i, j);
        if (ty && !cJSON_IsString(ty))
          return epic_batch_request_fail(
              r, "body.messages[%d].tool_calls[%d].type: expected a string", i, j);
        j++;
      }
    }
    i++;
  }
  return EPIC_OK;
}

static epic_status parse_prompt(epic_batch_request *r, const cJSON *p) {
  if (!p)
    return epic_batch_request_fail(r, "body.prompt: missing");
  if (cJSON_IsString(p)) {
    r->prompt = strdup(p->valuestring);
    if (!r->prompt)
      return EPIC_ERR_NOMEM;
    r->prompt_len = strlen(r->prompt);
    return EPIC_OK;
  }
  if (!cJSON_IsArray(p))
    return epic_batch_request_fail(
        r, "body.prompt: expected a string or an array of token ids, got %s", type_name(p));
  int n = cJSON_GetArraySize(p);
  if (n == 0)
    return epic_batch_request_fail(r, "body.prompt: empty");
  if (cJSON_IsString(cJSON_GetArrayItem(p, 0)))
    return epic_batch_request_fail(
        r, "body.prompt: one prompt per line (an array of strings is several requests)");
  r->prompt_ids = malloc((size_t)n * sizeof *r->prompt_ids);
  if (!r->prompt_ids)
    return EPIC_ERR_NOMEM;
  const cJSON *it;
  int i = 0;
  cJSON_ArrayForEach(it, p) {
    int64_t v;
    if (!json_int(it, 0, INT32_MAX, &v))
      return epic_batch_request_fail(r, "body.prompt[%d]: expected a token id (an integer >= 0)",
                                     i);
    r->prompt_ids[i++] = (int32_t)v;
  }
  r->n_prompt_ids = n;
  return EPIC_OK;
}

static epic_status parse_stop(epic_batch_request *r, const cJSON *s) {
  if (!s)
    return EPIC_OK;
  const cJSON *it;
  if (cJSON_IsString(s)) {
    if (!s->valuestring[0])
      return epic_batch_request_fail(r, "body.stop: empty string");
    r->stop[0] = strdup(s->valuestring);
    if (!r->stop[0])
      return EPIC_ERR_NOMEM;
    r->stop_len[0] = strlen(r->stop[0]);
    r->n_stop = 1;
    return EPIC_OK;
  }
  if (!cJSON_IsArray(s))
    return epic_batch_request_fail(r, "body.stop: expected a string or an array of strings, got %s",
                                   type_name(s));
  if (cJSON_GetArraySize(s) > EPIC_BATCH_MAX_STOP)
    return epic_batch_request_fail(r, "body.stop: at most %d stop strings", EPIC_BATCH_MAX_STOP);
  int i = 0;
  cJSON_ArrayForEach(it, s) {
    if (!cJSON_IsString(it) || !it->valuestring[0])
      return epic_batch_request_fail(r, "body.stop[%d]: expected a non-empty string", i);
    r->stop[i] = strdup(it->valuestring);
    if (!r->stop[i])
      return EPIC_ERR_NOMEM;
    r->stop_len[i] = strlen(r->stop[i]);
    r->n_stop = ++i;
  }
  return EPIC_OK;
}

/* Fields whose non-default values would change the result and are not
 * implemented: rejected rather than silently ignored. */
static epic_status check_unsupported(epic_batch_request *r, const cJSON *body) {
  const cJSON *it;
  int64_t v;
  if ((it = opt_item(body, "n")) && !(json_int(it, 1, 1, &v)))
    return epic_batch_request_fail(r, "body.n: only 1 completion per request is supported");
  if ((it = opt_item(body, "best_of")) && !(json_int(it, 1, 1, &v)))
    return epic_batch_request_fail(r, "body.best_of: only 1 is supported");
  static const char *bools[] = {"stream", "logprobs", "echo"};
  for (int i = 0; i < 3; i++)
    if ((it = opt_item(body, bools[i])) && !cJSON_IsFalse(it)) {
      /* /v1/completions spells logprobs as a count: 0 is "off" there */
      if (i == 1 && json_int(it, 0, 0, &v))
        continue;
      return epic_batch_request_fail(r, "body.%s: not supported by epic batch (only false)",
                                     bools[i]);
    }
  if ((it = opt_item(body, "top_logprobs")) && !json_int(it, 0, 0, &v))
    return epic_batch_request_fail(r, "body.top_logprobs: not supported by epic batch (only 0)");
  static const char *zeros[] = {"presence_penalty", "frequency_penalty"};
  for (int i = 0; i < 2; i++)
    if ((it = opt_item(body, zeros[i])) && !(cJSON_IsNumber(it) && it->valuedouble == 0))
      return epic_batch_request_fail(r, "body.%s: not supported by epic batch (only 0)", zeros[i]);
  if ((it = opt_item(body, "logit_bias")) && !(cJSON_IsObject(it) && !it->child))
    return epic_batch_request_fail(r, "body.logit_bias: not supported by epic batch");
  if ((it = opt_item(body, "suffix")) && !(cJSON_IsString(it) && !it->valuestring[0]))
    return epic_batch_request_fail(r, "body.suffix: not supported by epic batch");
  return EPIC_OK;
}

static epic_status parse_sampling(epic_batch_request *r, const cJSON *body) {
  const cJSON *it;
  const cJSON *mt = opt_item(body, "max_tokens"), *mct = opt_item(body, "max_completion_tokens");
  if (mt && mct)
    return epic_batch_request_fail(
        r, "body.max_completion_tokens: give only one of max_tokens and max_completion_tokens");
  if (mt || mct) {
    r->max_tokens_field = mt ? "body.max_tokens" : "body.max_completion_tokens";
    if (!json_int(mt ? mt : mct, 1, INT32_MAX, &r->max_tokens))
      return epic_batch_request_fail(r, "%s: expected an integer >= 1", r->max_tokens_field);
  }
  if ((it = opt_item(body, "temperature"))) {
    if (!cJSON_IsNumber(it) || !(it->valuedouble >= 0 && it->valuedouble <= 2))
      return epic_batch_request_fail(r, "body.temperature: expected a number in [0, 2]");
    r->temperature = (float)it->valuedouble;
  }
  if ((it = opt_item(body, "top_p"))) {
    if (!cJSON_IsNumber(it) || !(it->valuedouble > 0 && it->valuedouble <= 1))
      return epic_batch_request_fail(r, "body.top_p: expected a number in (0, 1]");
    r->top_p = (float)it->valuedouble;
  }
  if ((it = opt_item(body, "top_k"))) {
    if (!json_int(it, -1, INT32_MAX, &r->top_k))
      return epic_batch_request_fail(r, "body.top_k: expected an integer >= 0 (or -1 for all)");
    if (r->top_k < 0)
      r->top_k = 0;
  }
  if ((it = opt_item(body, "seed"))) {
    int64_t s;
    /* 2^53: beyond it a JSON number no longer holds every integer */
    if (!json_int(it, -9007199254740992.0, 9007199254740992.0, &s))
      return epic_batch_request_fail(r, "body.seed: expected an integer of magnitude <= 2^53");
    r->seed = (uint64_t)s;
  }
  if ((it = opt_item(body, "ignore_eos"))) {
    if (!cJSON_IsBool(it))
      return epic_batch_request_fail(r, "body.ignore_eos: expected a boolean");
    r->ignore_eos = cJSON_IsTrue(it);
  }
  return parse_stop(r, opt_item(body, "stop"));
}

/* Byte offset of the first invalid UTF-8 sequence or NUL byte, or -1. */
static int64_t utf8_check(const char *s, size_t n) {
  const unsigned char *u = (const unsigned char *)s;
  for (size_t i = 0; i < n;) {
    size_t k = u[i] ? utf8_seq(u + i, n - i) : 0;
    if (!k)
      return (int64_t)i;
    i += k;
  }
  return -1;
}

static epic_status parse_json(epic_batch_request *r, const char *line, size_t len) {
  epic_status st = EPIC_OK;
  int64_t bad = utf8_check(line, len);
  if (bad >= 0)
    return epic_batch_request_fail(r, "not valid UTF-8 text (byte %lld)", (long long)bad + 1);
  const char *end = NULL;
  cJSON *j = cJSON_ParseWithLengthOpts(line, len, &end, 0);
  if (!j) {
    size_t at = end && end >= line && end <= line + len ? (size_t)(end - line) : 0;
    return epic_batch_request_fail(r, "not valid JSON (at byte %zu)", at + 1);
  }
  for (const char *e = end; e && e < line + len; e++)
    if (*e != ' ' && *e != '\t' && *e != '\r' && *e != '\n') {
      st = epic_batch_request_fail(r, "not valid JSON (text after the object at byte %zu)",
                                   (size_t)(e - line) + 1);
      goto done;
    }
  if (!cJSON_IsObject(j)) {
    st = epic_batch_request_fail(r, "expected a JSON object, got %s", type_name(j));
    goto done;
  }
  const cJSON *cid = cJSON_GetObjectItemCaseSensitive(j, "custom_id");
  if (!cid) {
    st = epic_batch_request_fail(r, "custom_id: missing");
    goto done;
  }
  if (!cJSON_IsString(cid)) {
    st = epic_batch_request_fail(r, "custom_id: expected a string, got %s", type_name(cid));
    goto done;
  }
  if (!cid->valuestring[0]) {
    st = epic_batch_request_fail(r, "custom_id: empty");
    goto done;
  }
  r->custom_id = strdup(cid->valuestring);
  if (!r->custom_id) {
    st = EPIC_ERR_NOMEM;
    goto done;
  }
  const cJSON *method = opt_item(j, "method");
  if (method && !(cJSON_IsString(method) && strcmp(method->valuestring, "POST") == 0)) {
    st = epic_batch_request_fail(r, "method: expected \"POST\"");
    goto done;
  }
  const cJSON *url = cJSON_GetObjectItemCaseSensitive(j, "url");
  if (!cJSON_IsString(url)) {
    st = epic_batch_request_fail(r, url ? "url: expected a string" : "url: missing");
    goto done;
  }
  if (strcmp(url->valuestring, "/v1/chat/completions") == 0)
    r->endpoint = EPIC_BATCH_CHAT;
  else if (strcmp(url->valuestring, "/v1/completions") == 0)
    r->endpoint = EPIC_BATCH_COMPLETIONS;
  else {
    st = epic_batch_request_fail(
        r, "url: unsupported endpoint (expected /v1/chat/completions or /v1/completions)");
    goto done;
  }
  const cJSON *body = cJSON_GetObjectItemCaseSensitive(j, "body");
  if (!body) {
    st = epic_batch_request_fail(r, "body: missing");
    goto done;
  }
  if (!cJSON_IsObject(body)) {
    st = epic_batch_request_fail(r, "body: expected an object, got %s", type_name(body));
    goto done;
  }
  const cJSON *model = opt_item(body, "model");
  if (model && !cJSON_IsString(model)) {
    st = epic_batch_request_fail(r, "body.model: expected a string");
    goto done;
  }
  if (model && !(r->model = strdup(model->valuestring))) {
    st = EPIC_ERR_NOMEM;
    goto done;
  }
  if (r->endpoint == EPIC_BATCH_CHAT) {
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(body, "messages");
    EPIC_CHECK_GOTO(check_messages(r, msgs), st, done);
    st = epic_chat_messages_from_json(msgs, &r->messages);
    if (st == EPIC_ERR_INVALID)
      st = epic_batch_request_fail(r, "body.messages: not a valid conversation");
    if (st != EPIC_OK)
      goto done;
  } else {
    EPIC_CHECK_GOTO(parse_prompt(r, opt_item(body, "prompt")), st, done);
  }
  EPIC_CHECK_GOTO(check_unsupported(r, body), st, done);
  EPIC_CHECK_GOTO(parse_sampling(r, body), st, done);
done:
  cJSON_Delete(j);
  return st;
}

epic_status epic_batch_parse_line(const char *line, size_t len, int64_t line_no,
                                  epic_batch_request **out) {
  if (!out)
    return EPIC_ERR_INVALID;
  *out = NULL;
  epic_batch_request *r = calloc(1, sizeof *r);
  if (!r)
    return EPIC_ERR_NOMEM;
  r->line = line_no;
  r->hash = mix64(fnv1a(line, len, 0xcbf29ce484222325ull) ^ mix64((uint64_t)line_no));
  snprintf(r->id, sizeof r->id, "batch_req_%016llx", (unsigned long long)r->hash);
  r->temperature = 1.0f;
  r->top_p = 1.0f;
  r->seed = r->hash;
  epic_status st = parse_json(r, line, len);
  if (st == EPIC_ERR_NOMEM) {
    epic_batch_request_free(r);
    return st;
  }
  *out = r;
  return st;
}

void epic_batch_request_free(epic_batch_request *r) {
  if (!r)
    return;
  free(r->custom_id);
  free(r->model);
  epic_chat_messages_free(r->messages);
  free(r->prompt);
  free(r->prompt_ids);
  for (int i = 0; i < r->n_stop; i++)
    free(r->stop[i]);
  free(r);
}

/* ---- prompt encoding ------------------------------------------------------------ */

epic_status epic_batch_encode(epic_batch_request *r, const epic_tokenizer *tok,
                              epic_chat_template tmpl, const epic_batch_limits *lim, int32_t **ids,
                              int64_t *n_ids, int64_t *max_new) {
  size_t n = 0;
  int32_t *own = NULL;
  epic_status st = EPIC_OK;
  const char *field = r->endpoint == EPIC_BATCH_CHAT ? "body.messages" : "body.prompt";
  *ids = NULL;
  *n_ids = *max_new = 0;
  if (r->prompt_ids) {
    n = (size_t)r->n_prompt_ids;
    own = malloc(n * sizeof *own);
    if (!own)
      return EPIC_ERR_NOMEM;
    memcpy(own, r->prompt_ids, n * sizeof *own);
  } else {
    int32_t *t = NULL;
    if (r->endpoint == EPIC_BATCH_CHAT) {
      st = epic_chat_encode(tok, tmpl, epic_chat_messages_items(r->messages),
                            epic_chat_messages_count(r->messages), 1, &t, &n, NULL, NULL);
      if (st == EPIC_ERR_INVALID)
        return epic_batch_request_fail(r, "body.messages: the chat template cannot render them");
    } else {
      st = epic_tokenizer_encode(tok, r->prompt, r->prompt_len, epic_tokenizer_bos_id(tok) >= 0, &t,
                                 &n);
    }
    if (st != EPIC_OK) {
      epic_tokenizer_ids_free(t);
      return st;
    }
    /* the tokenizer's buffer goes back through its own free: hand out a plain malloc'd copy */
    own = malloc((n ? n : 1) * sizeof *own);
    if (own && n)
      memcpy(own, t, n * sizeof *own);
    epic_tokenizer_ids_free(t);
    if (!own)
      return EPIC_ERR_NOMEM;
  }
  int64_t np = (int64_t)n;
  if (np == 0) {
    st = epic_batch_request_fail(r, "%s: encodes to no tokens", field);
    goto fail;
  }
  for (int64_t i = 0; i < np; i++)
    if (own[i] < 0 || own[i] >= lim->vocab_size) {
      st = epic_batch_request_fail(r, "%s: token %lld (id %d) is outside the vocabulary (%lld)",
                                   field, (long long)i, own[i], (long long)lim->vocab_size);
      goto fail;
    }
  /* the tightest of the context and one worker's KV cache */
  int64_t cap = lim->max_context;
  int kv_bound = lim->max_seq_tokens > 0 && lim->max_seq_tokens < cap;
  if (kv_bound)
    cap = lim->max_seq_tokens;
  const char *what = kv_bound ? "the KV cache of one worker" : "the context length";
  if (r->max_tokens > 0) {
    if (np + r->max_tokens > cap) {
      st = epic_batch_request_fail(
          r, "%s: prompt (%lld tokens) + %lld new tokens exceed %s (%lld tokens)",
          r->max_tokens_field, (long long)np, (long long)r->max_tokens, what, (long long)cap);
      goto fail;
    }
    *max_new = r->max_tokens;
  } else {
    if (np >= cap) {
      st = epic_batch_request_fail(
          r, "%s: the prompt (%lld tokens) leaves no room in %s (%lld tokens)", field,
          (long long)np, what, (long long)cap);
      goto fail;
    }
    *max_new = lim->default_max_tokens < cap - np ? lim->default_max_tokens : cap - np;
  }
  *ids = own;
  *n_ids = np;
  return EPIC_OK;
fail:
  free(own);
  return st;
}

int64_t epic_batch_find_stop(const epic_batch_request *r, const char *text, size_t len,
                             size_t from) {
  int64_t best = -1;
  for (int i = 0; i < r->n_stop; i++) {
    size_t sl = r->stop_len[i];
    if (sl > len)
      continue;
    size_t start = from + 1 > sl ? from + 1 - sl : 0; /* the match must end after `from` */
    if (start > len - sl)
      continue;
    const char *hit = memmem(text + start, len - start, r->stop[i], sl);
    if (hit && (best < 0 || hit - text < best))
      best = hit - text;
  }
  return best;
}

/* ---- records ------------------------------------------------------------------- */

static char *sb_done(sbuf *b, size_t *len) {
  sb_put(b, "\n", 1);
  if (b->oom) {
    free(b->p);
    return NULL;
  }
  if (len)
    *len = b->n;
  return b->p;
}

char *epic_batch_format_result(const epic_batch_request *r, const epic_batch_output *o,
                               size_t *len) {
  sbuf b = {0};
  const char *hex = r->id + strlen("batch_req_");
  int chat = r->endpoint == EPIC_BATCH_CHAT;
  sb_str(&b, "{\"id\":");
  sb_json_or_null(&b, r->id);
  sb_str(&b, ",\"custom_id\":");
  sb_json_or_null(&b, r->custom_id);
  sb_fmt(&b,
         ",\"response\":{\"status_code\":200,\"request_id\":\"req_%s\",\"body\":{\"id\":\"%s%s\"",
         hex, chat ? "chatcmpl-" : "cmpl-", hex);
  sb_fmt(&b, ",\"object\":\"%s\",\"created\":%lld,\"model\":",
         chat ? "chat.completion" : "text_completion", (long long)o->created);
  sb_json_or_null(&b, o->model);
  sb_str(&b, ",\"choices\":[{\"index\":0,");
  if (chat) {
    sb_str(&b, "\"message\":{\"role\":\"assistant\",\"content\":");
    sb_json(&b, o->text ? o->text : "", o->text ? o->text_len : 0);
    sb_str(&b, "}");
  } else {
    sb_str(&b, "\"text\":");
    sb_json(&b, o->text ? o->text : "", o->text ? o->text_len : 0);
  }
  sb_fmt(&b, ",\"logprobs\":null,\"finish_reason\":\"%s\"}]", o->finish_stop ? "stop" : "length");
  sb_fmt(&b, ",\"usage\":{\"prompt_tokens\":%lld,\"completion_tokens\":%lld,",
         (long long)o->prompt_tokens, (long long)o->completion_tokens);
  sb_fmt(&b, "\"total_tokens\":%lld}}},\"error\":null}",
         (long long)(o->prompt_tokens + o->completion_tokens));
  return sb_done(&b, len);
}

char *epic_batch_format_error(const char *id, const char *custom_id, const char *code,
                              const char *message, size_t *len) {
  sbuf b = {0};
  sb_str(&b, "{\"id\":");
  sb_json_or_null(&b, id);
  sb_str(&b, ",\"custom_id\":");
  sb_json_or_null(&b, custom_id);
  sb_str(&b, ",\"response\":null,\"error\":{\"code\":");
  sb_json_or_null(&b, code);
  sb_str(&b, ",\"message\":");
  sb_json_or_null(&b, message);
  sb_str(&b, "}}");
  return sb_done(&b, len);
}

/* ---- index: open addressing, linear probing ------------------------------------- */

struct epic_batch_index {
  char **keys;
  int64_t *vals;
  size_t cap, n; /* cap is a power of two, kept at most half full */
};

epic_status epic_batch_index_create(epic_batch_index **out) {
  epic_batch_index *x = calloc(1, sizeof *x);
  if (!x)
    return EPIC_ERR_NOMEM;
  x->cap = 64;
  x->keys = calloc(x->cap, sizeof *x->keys);
  x->vals = calloc(x->cap, sizeof *x->vals);
  if (!x->keys || !x->vals) {
    epic_batch_index_destroy(x);
    return EPIC_ERR_NOMEM;
  }
  *out = x;
  return EPIC_OK;
}

void epic_batch_index_destroy(epic_batch_index *x) {
  if (!x)
    return;
  for (size_t i = 0; x->keys && i < x->cap; i++)
    free(x->keys[i]);
  free(x->keys);
  free(x->vals);
  free(x);
}

static size_t slot(char *const *keys, size_t cap, const char *key) {
  size_t i = (size_t)mix64(fnv1a(key, strlen(key), 0xcbf29ce484222325ull)) & (cap - 1);
  while (keys[i] && strcmp(keys[i], key) != 0)
    i = (i + 1) & (cap - 1);
  return i;
}

int epic_batch_index_put(epic_batch_index *x, const char *key, int64_t value, int64_t *old) {
  size_t i = slot(x->keys, x->cap, key);
  if (x->keys[i]) {
    if (old)
      *old = x->vals[i];
    return 0;
  }
  if (2 * (x->n + 1) > x->cap) {
    size_t cap = x->cap * 2;
    char **keys = calloc(cap, sizeof *keys);
    int64_t *vals = calloc(cap, sizeof *vals);
    if (!keys || !vals) {
      free(keys);
      free(vals);
      return EPIC_ERR_NOMEM;
    }
    for (size_t k = 0; k < x->cap; k++)
      if (x->keys[k]) {
        size_t j = slot(keys, cap, x->keys[k]);
        keys[j] = x->keys[k];
        vals[j] = x->vals[k];
      }
    free(x->keys);
    free(x->vals);
    x->keys = keys;
    x->vals = vals;
    x->cap = cap;
    i = slot(x->keys, x->cap, key);
  }
  x->keys[i] = strdup(key);
  if (!x->keys[i])
    return EPIC_ERR_NOMEM;
  x->vals[i] = value;
  x->n++;
  return 1;
}

int epic_batch_index_get(const epic_batch_index *x, const char *key, int64_t *value) {
  size_t i = slot(x->keys, x->cap, key);
  if (!x->keys[i])
    return 0;
  if (value)
    *value = x->vals[i];
  return 1;
}

size_t epic_batch_index_count(const epic_batch_index *x) {
  return x ? x->n : 0;
}

/* ---- resume scan ------------------------------------------------------------------ */

void epic_batch_resume_free(epic_batch_resume *r) {
  if (!r)
    return;
  epic_batch_index_destroy(r->custom_ids);
  epic_batch_index_destroy(r->ids);
  memset(r, 0, sizeof *r);
}

epic_status epic_batch_scan_output(const char *path, epic_batch_resume *out) {
  epic_status st = EPIC_OK;
  memset(out, 0, sizeof *out);
  EPIC_CHECK(epic_batch_index_create(&out->custom_ids));
  EPIC_CHECK_GOTO(epic_batch_index_create(&out->ids), st, fail);
  FILE *f = fopen(path, "rb");
  if (!f) {
    if (errno == ENOENT)
      return EPIC_OK;
    EPIC_LOG_ERROR("batch: %s: cannot read the existing output: %s", path, strerror(errno));
    st = EPIC_ERR_IO;
    goto fail;
  }
  char *line = NULL;
  size_t cap = 0;
  ssize_t n;
  int64_t line_no = 0;
  while ((n = getline(&line, &cap, f)) > 0) {
    if (line[n - 1] != '\n') { /* cut off by a kill: rewritten by this run */
      out->dropped_bytes = n;
      break;
    }
    line_no++;
    ssize_t k = 0;
    while (k < n && (line[k] == ' ' || line[k] == '\t' || line[k] == '\r' || line[k] == '\n'))
      k++;
    if (k == n) { /* a blank line (added by hand): harmless */
      out->keep_bytes += n;
      continue;
    }
    cJSON *j = cJSON_ParseWithLength(line, (size_t)n);
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(j, "id");
    const cJSON *cid = cJSON_GetObjectItemCaseSensitive(j, "custom_id");
    const cJSON *err = cJSON_GetObjectItemCaseSensitive(j, "error");
    if (!cJSON_IsObject(j) || !cJSON_IsString(id) ||
        (cid && !cJSON_IsString(cid) && !cJSON_IsNull(cid))) {
      EPIC_LOG_ERROR("batch: %s:%lld is not a batch result record; refusing to append to this file "
                     "(use another --output)",
                     path, (long long)line_no);
      cJSON_Delete(j);
      st = EPIC_ERR_INVALID;
      break;
    }
    int a = epic_batch_index_put(out->ids, id->valuestring, line_no, NULL);
    int b = cJSON_IsString(cid)
                ? epic_batch_index_put(out->custom_ids, cid->valuestring, line_no, NULL)
                : 1;
    cJSON_Delete(j);
    if (a < 0 || b < 0) {
      st = EPIC_ERR_NOMEM;
      break;
    }
    out->records++;
    if (err && !cJSON_IsNull(err))
      out->errors++;
    out->keep_bytes += n;
  }
  if (st == EPIC_OK && ferror(f)) {
    EPIC_LOG_ERROR("batch: %s: read error", path);
    st = EPIC_ERR_IO;
  }
  free(line);
  fclose(f);
  if (st != EPIC_OK)
    goto fail;
  return EPIC_OK;
fail:
  epic_batch_resume_free(out);
  return st;
}
