/* OpenAI request parsing and error objects (coordinator/openai.h). */
#define _GNU_SOURCE
#include "coordinator/openai.h"

#include "common/log.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void epic_oai_error_set(epic_oai_error *err, int http_status, const char *type, const char *param,
                        const char *code, const char *fmt, ...) {
  va_list ap;
  err->http_status = http_status;
  snprintf(err->type, sizeof err->type, "%s", type ? type : "invalid_request_error");
  snprintf(err->param, sizeof err->param, "%s", param ? param : "");
  snprintf(err->code, sizeof err->code, "%s", code ? code : "");
  va_start(ap, fmt);
  vsnprintf(err->message, sizeof err->message, fmt, ap);
  va_end(ap);
}

char *epic_oai_error_json(const epic_oai_error *err) {
  cJSON *root = cJSON_CreateObject(), *e = cJSON_CreateObject();
  char *s = NULL;
  if (root && e) {
    cJSON_AddItemToObject(root, "error", e);
    e = NULL;
    cJSON *o = cJSON_GetObjectItemCaseSensitive(root, "error");
    cJSON_AddStringToObject(o, "message", err->message);
    cJSON_AddStringToObject(o, "type", err->type);
    if (err->param[0])
      cJSON_AddStringToObject(o, "param", err->param);
    else
      cJSON_AddNullToObject(o, "param");
    if (err->code[0])
      cJSON_AddStringToObject(o, "code", err->code);
    else
      cJSON_AddNullToObject(o, "code");
    s = cJSON_PrintUnformatted(root);
  }
  cJSON_Delete(e);
  cJSON_Delete(root);
  return s;
}

/* Length of the valid UTF-8 sequence at p (1..4), or 0. */
static size_t utf8_len(const unsigned char *p, size_t n) {
  unsigned c = p[0];
  size_t len;
  unsigned min;
  if (c < 0x80)
    return 1;
  if (c >= 0xC2 && c <= 0xDF)
    len = 2, min = 0x80;
  else if (c >= 0xE0 && c <= 0xEF)
    len = 3, min = 0x800;
  else if (c >= 0xF0 && c <= 0xF4)
    len = 4, min = 0x10000;
  else
    return 0;
  if (n < len)
    return 0;
  unsigned cp = c & (0x7F >> len);
  for (size_t i = 1; i < len; i++) {
    if ((p[i] & 0xC0) != 0x80)
      return 0;
    cp = (cp << 6) | (p[i] & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
    return 0;
  return len;
}

cJSON *epic_oai_string(const char *p, size_t n) {
  char *s = malloc(3 * n + 1);
  if (!s)
    return NULL;
  size_t o = 0;
  for (size_t i = 0; i < n;) {
    size_t l = utf8_len((const unsigned char *)p + i, n - i);
    if (l == 0) {
      memcpy(s + o, "\xEF\xBF\xBD", 3);
      o += 3;
      i++;
    } else if (l == 1 && p[i] == '\0') {
      i++; /* cJSON strings end at NUL: drop it rather than cut the string */
    } else {
      memcpy(s + o, p + i, l);
      o += l;
      i += l;
    }
  }
  s[o] = '\0';
  cJSON *j = cJSON_CreateString(s);
  free(s);
  return j;
}

void epic_oai_request_clear(epic_oai_request *r) {
  cJSON_Delete(r->root);
  free(r->prompt_ids);
  free(r->stops);
  free(r->stop_lens);
  memset(r, 0, sizeof *r);
}

static int is_null(const cJSON *j) {
  return !j || cJSON_IsNull(j);
}

#define BAD(field, ...)                                                                            \
  do {                                                                                             \
    epic_oai_error_set(err, 400, "invalid_request_error", field, NULL, __VA_ARGS__);               \
    return EPIC_ERR_INVALID;                                                                       \
  } while (0)

/* An integer-valued JSON number in [lo, hi]. */
static epic_status get_int(const cJSON *j, const char *field, int64_t lo, int64_t hi, int64_t *out,
                           epic_oai_error *err) {
  if (!cJSON_IsNumber(j) || !isfinite(j->valuedouble) || j->valuedouble != floor(j->valuedouble))
    BAD(field, "%s: expected an integer", field);
  if (j->valuedouble < (double)lo || j->valuedouble > (double)hi)
    BAD(field, "%s: %.17g is outside [%lld, %lld]", field, j->valuedouble, (long long)lo,
        (long long)hi);
  *out = (int64_t)j->valuedouble;
  return EPIC_OK;
}

static epic_status get_bool(const cJSON *j, const char *field, int *out, epic_oai_error *err) {
  if (!cJSON_IsBool(j))
    BAD(field, "%s: expected a boolean", field);
  *out = cJSON_IsTrue(j);
  return EPIC_OK;
}

static epic_status get_prompt_ids(const cJSON *arr, const char *field, epic_oai_request *r,
                                  epic_oai_error *err) {
  int n = cJSON_GetArraySize(arr);
  if (n < 1)
    BAD(field, "%s: empty token id array", field);
  r->prompt_ids = malloc((size_t)n * sizeof *r->prompt_ids);
  if (!r->prompt_ids)
    return EPIC_ERR_NOMEM;
  const cJSON *it;
  int i = 0;
  cJSON_ArrayForEach(it, arr) {
    int64_t v;
    char f[96];
    snprintf(f, sizeof f, "%s[%d]", field, i);
    if (get_int(it, f, 0, INT32_MAX, &v, err) != EPIC_OK)
      return EPIC_ERR_INVALID;
    r->prompt_ids[i++] = (int32_t)v;
  }
  r->n_prompt_ids = n;
  return EPIC_OK;
}

static epic_status parse_prompt(const cJSON *p, epic_oai_request *r, epic_oai_error *err) {
  if (is_null(p))
    BAD("prompt", "prompt: required");
  if (cJSON_IsString(p)) {
    r->prompt_text = p->valuestring;
    r->prompt_len = strlen(p->valuestring);
    return EPIC_OK;
  }
  if (!cJSON_IsArray(p))
    BAD("prompt", "prompt: expected a string, an array of token ids, or an array of one of these");
  const cJSON *first = p->child;
  if (!first)
    BAD("prompt", "prompt: empty array");
  if (cJSON_IsNumber(first))
    return get_prompt_ids(p, "prompt", r, err);
  if (cJSON_GetArraySize(p) > 1)
    BAD("prompt", "prompt: several prompts in one request are not supported (send one request per "
                  "prompt; use n for several completions)");
  if (cJSON_IsString(first)) {
    r->prompt_text = first->valuestring;
    r->prompt_len = strlen(first->valuestring);
    return EPIC_OK;
  }
  if (cJSON_IsArray(first))
    return get_prompt_ids(first, "prompt[0]", r, err);
  BAD("prompt[0]", "prompt[0]: expected a string or an array of token ids");
}

static epic_status parse_messages(cJSON *m, epic_oai_request *r, epic_oai_error *err) {
  static const char *roles[] = {"system", "user", "assistant", "tool", "developer"};
  if (is_null(m))
    BAD("messages", "messages: required");
  if (!cJSON_IsArray(m))
    BAD("messages", "messages: expected an array of message objects");
  if (cJSON_GetArraySize(m) < 1)
    BAD("messages", "messages: at least one message is required");
  int i = 0;
  const cJSON *it;
  char f[64];
  cJSON_ArrayForEach(it, m) {
    if (!cJSON_IsObject(it)) {
      snprintf(f, sizeof f, "messages[%d]", i);
      BAD(f, "%s: expected an object", f);
    }
    cJSON *role = cJSON_GetObjectItemCaseSensitive(it, "role");
    snprintf(f, sizeof f, "messages[%d].role", i);
    if (!cJSON_IsString(role))
      BAD(f, "%s: expected a string", f);
    size_t k = 0;
    while (k < sizeof roles / sizeof *roles && strcmp(roles[k], role->valuestring) != 0)
      k++;
    if (k == sizeof roles / sizeof *roles)
      BAD(f, "%s: unknown role '%.40s' (system, user, assistant, tool)", f, role->valuestring);
    const cJSON *content = cJSON_GetObjectItemCaseSensitive(it, "content");
    snprintf(f, sizeof f, "messages[%d].content", i);
    if (cJSON_IsArray(content)) {
      const cJSON *part;
      int j = 0;
      cJSON_ArrayForEach(part, content) {
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(part, "type");
        const cJSON *text = cJSON_GetObjectItemCaseSensitive(part, "text");
        if (!cJSON_IsObject(part) || !cJSON_IsString(type) || strcmp(type->valuestring, "text") ||
            !cJSON_IsString(text)) {
          snprintf(f, sizeof f, "messages[%d].content[%d]", i, j);
          BAD(f, "%s: only {\"type\": \"text\", \"text\": string} parts are supported", f);
        }
        j++;
      }
    } else if (!cJSON_IsString(content) &&
               !(is_null(content) && strcmp(role->valuestring, "assistant") == 0)) {
      BAD(f, "%s: expected a string or an array of text parts", f);
    }
    /* The chat renderer knows "system" only; "developer" is OpenAI's new name for it. */
    if (k == 4)
      cJSON_SetValuestring(role, "system");
    i++;
  }
  r->messages = m;
  return EPIC_OK;
}

epic_status epic_oai_parse(const char *body, size_t n, int chat, epic_oai_request *r,
                           epic_oai_error *err) {
  memset(r, 0, sizeof *r);
  r->chat = chat;
  r->n = 1;
  r->temperature = 1.0f;
  r->top_p = 1.0f;
  r->chat_template = "auto";
  const char *end = NULL;
  r->root = cJSON_ParseWithLengthOpts(body, n, &end, 0);
  if (!r->root) {
    size_t at = end && end >= body ? (size_t)(end - body) : 0;
    BAD("", "request body: malformed JSON near byte %zu", at);
  }
  if (!cJSON_IsObject(r->root))
    BAD("", "request body: expected a JSON object");
  const cJSON *root = r->root, *j;
  int64_t v;
  j = cJSON_GetObjectItemCaseSensitive(root, "model");
  if (is_null(j))
    BAD("model", "model: required");
  if (!cJSON_IsString(j))
    BAD("model", "model: expected a string");
  r->model = j->valuestring;
  if (chat)
    EPIC_CHECK(parse_messages(cJSON_GetObjectItemCaseSensitive(root, "messages"), r, err));
  else
    EPIC_CHECK(parse_prompt(cJSON_GetObjectItemCaseSensitive(root, "prompt"), r, err));
  static const char *maxes[] = {"max_completion_tokens", "max_tokens"};
  for (int k = chat ? 0 : 1; k < 2 && !r->max_tokens; k++) {
    j = cJSON_GetObjectItemCaseSensitive(root, maxes[k]);
    if (!is_null(j)) {
      EPIC_CHECK(get_int(j, maxes[k], 1, INT32_MAX, &v, err));
      r->max_tokens = v;
    }
  }
  j = cJSON_GetObjectItemCaseSensitive(root, "temperature");
  if (!is_null(j)) {
    if (!cJSON_IsNumber(j))
      BAD("temperature", "temperature: expected a number");
    if (!(j->valuedouble >= 0 && j->valuedouble <= 2))
      BAD("temperature", "temperature: %g is outside [0, 2]", j->valuedouble);
    r->temperature = (float)j->valuedouble;
  }
  j = cJSON_GetObjectItemCaseSensitive(root, "top_p");
  if (!is_null(j)) {
    if (!cJSON_IsNumber(j))
      BAD("top_p", "top_p: expected a number");
    if (!(j->valuedouble > 0 && j->valuedouble <= 1))
      BAD("top_p", "top_p: %g is outside (0, 1]", j->valuedouble);
    r->top_p = (float)j->valuedouble;
  }
  j = cJSON_GetObjectItemCaseSensitive(root, "seed");
  if (!is_null(j)) {
    EPIC_CHECK(get_int(j, "seed", -((int64_t)1 << 53), (int64_t)1 << 53, &v, err));
    r->has_seed = 1;
    r->seed = (uint64_t)v;
  }
  j = cJSON_GetObjectItemCaseSensitive(root, "n");
  if (!is_null(j)) {
    EPIC_CHECK(get_int(j, "n", 1, EPIC_OAI_MAX_N, &v, err));
    r->n = (int)v;
  }
  j = cJSON_GetObjectItemCaseSensitive(root, "stop");
  if (cJSON_IsString(j) || cJSON_IsArray(j)) {
    const int n_stop = cJSON_IsString(j) ? 1 : cJSON_GetArraySize(j);
    if (n_stop > EPIC_OAI_MAX_STOPS)
      BAD("stop", "stop: %d stop strings, more than any server allows (%d)", n_stop,
          EPIC_OAI_MAX_STOPS);
    r->stops = malloc((size_t)(n_stop ? n_stop : 1) * sizeof *r->stops);
    r->stop_lens = malloc((size_t)(n_stop ? n_stop : 1) * sizeof *r->stop_lens);
    if (!r->stops || !r->stop_lens)
      return EPIC_ERR_NOMEM;
    const cJSON *it = cJSON_IsString(j) ? j : j->child;
    for (; it; it = cJSON_IsString(j) ? NULL : it->next) {
      char f[32];
      if (cJSON_IsString(j))
        snprintf(f, sizeof f, "stop");
      else
        snprintf(f, sizeof f, "stop[%d]", r->n_stops);
      if (!cJSON_IsString(it) || !it->valuestring[0])
        BAD(f, "%s: expected a non-empty string", f);
      const size_t len = strlen(it->valuestring);
      if (len > EPIC_OAI_MAX_STOP_LEN)
        BAD(f, "%s: %zu bytes, more than any server allows (%d)", f, len, EPIC_OAI_MAX_STOP_LEN);
      r->stop_lens[r->n_stops] = len;
      r->stops[r->n_stops++] = it->valuestring;
    }
  } else if (!is_null(j)) {
    BAD("stop", "stop: expected a string or an array of strings");
  }
  j = cJSON_GetObjectItemCaseSensitive(root, "stream");
  if (!is_null(j))
    EPIC_CHECK(get_bool(j, "stream", &r->stream, err));
  j = cJSON_GetObjectItemCaseSensitive(root, "stream_options");
  if (!is_null(j)) {
    if (!cJSON_IsObject(j))
      BAD("stream_options", "stream_options: expected an object");
    const cJSON *u = cJSON_GetObjectItemCaseSensitive(j, "include_usage");
    if (!is_null(u))
      EPIC_CHECK(get_bool(u, "stream_options.include_usage", &r->include_usage, err));
  }
  j = cJSON_GetObjectItemCaseSensitive(root, "logprobs");
  if (chat) {
    if (!is_null(j))
      EPIC_CHECK(get_bool(j, "logprobs", &r->logprobs, err));
    j = cJSON_GetObjectItemCaseSensitive(root, "top_logprobs");
    if (!is_null(j)) {
      EPIC_CHECK(get_int(j, "top_logprobs", 0, EPIC_OAI_MAX_TOP_LOGPROBS, &v, err));
      if (v > 0 && !r->logprobs)
        BAD("top_logprobs", "top_logprobs: requires logprobs to be true");
      r->top_logprobs = (int)v;
    }
  } else if (!is_null(j)) {
    if (cJSON_IsBool(j))
      BAD("logprobs", "logprobs: expected an integer (0..5) for /v1/completions");
    EPIC_CHECK(get_int(j, "logprobs", 0, 5, &v, err));
    r->logprobs = 1;
    r->top_logprobs = (int)v;
  }
  j = cJSON_GetObjectItemCaseSensitive(root, "ignore_eos");
  if (!is_null(j))
    EPIC_CHECK(get_bool(j, "ignore_eos", &r->ignore_eos, err));
  j = cJSON_GetObjectItemCaseSensitive(root, "epic_chat_template");
  if (!is_null(j)) {
    if (!cJSON_IsString(j) || (strcmp(j->valuestring, "auto") && strcmp(j->valuestring, "v3") &&
                               strcmp(j->valuestring, "r1")))
      BAD("epic_chat_template", "epic_chat_template: expected \"auto\", \"v3\" or \"r1\"");
    r->chat_template = j->valuestring;
  }
  return EPIC_OK;
}
