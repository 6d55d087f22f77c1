/* Native DeepSeek-V3 / R1 chat templates. See chat.h for the rules. */
#define _POSIX_C_SOURCE 200809L

#include "coordinator/tokenizer/chat.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/log.h"

/* Literal strings of the templates (they are not tokenizer-configurable there). */
#define T_USER "<｜User｜>"
#define T_ASSISTANT "<｜Assistant｜>"
#define T_EOS "<｜end▁of▁sentence｜>"
#define T_CALLS_BEGIN "<｜tool▁calls▁begin｜>"
#define T_CALLS_END "<｜tool▁calls▁end｜>"
#define T_CALL_BEGIN "<｜tool▁call▁begin｜>"
#define T_CALL_END "<｜tool▁call▁end｜>"
#define T_SEP "<｜tool▁sep｜>"
#define T_OUTPUTS_BEGIN "<｜tool▁outputs▁begin｜>"
#define T_OUTPUTS_END "<｜tool▁outputs▁end｜>"
#define T_OUTPUT_BEGIN "<｜tool▁output▁begin｜>"
#define T_OUTPUT_END "<｜tool▁output▁end｜>"
#define T_THINK_END "</think>"

static const char *k_roles[] = {"system", "user", "assistant", "tool"};

epic_status epic_chat_template_parse(const char *name, epic_chat_template *out) {
  if (!name || !out) return EPIC_ERR_INVALID;
  if (strcasecmp(name, "auto") == 0)
    *out = EPIC_CHAT_AUTO;
  else if (strcasecmp(name, "v3") == 0)
    *out = EPIC_CHAT_V3;
  else if (strcasecmp(name, "r1") == 0)
    *out = EPIC_CHAT_R1;
  else
    return EPIC_ERR_INVALID;
  return EPIC_OK;
}

const char *epic_chat_template_name(epic_chat_template t) {
  return t == EPIC_CHAT_V3 ? "v3" : t == EPIC_CHAT_R1 ? "r1" : "auto";
}

epic_chat_template epic_chat_detect(const char *chat_template) {
  /* R1's template is V3's plus content.split('</think>')[-1] for assistant
   * history and "<think>\n" in the generation prompt; V3's never names </think>. */
  if (chat_template && strstr(chat_template, T_THINK_END)) return EPIC_CHAT_R1;
  return EPIC_CHAT_V3;
}

epic_chat_template epic_chat_resolve(const epic_tokenizer *tok, epic_chat_template want) {
  if (want == EPIC_CHAT_V3 || want == EPIC_CHAT_R1) return want;
  return epic_chat_detect(tok ? epic_tokenizer_chat_template(tok) : NULL);
}

typedef struct {
  char *p;
  size_t n, cap;
  int oom;
} strb;

static void sb_add(strb *b, const char *s) {
  size_t l = strlen(s);
  if (b->oom) return;
  if (b->n + l + 1 > b->cap) {
    size_t c = b->cap ? b->cap : 256;
    while (c < b->n + l + 1) c *= 2;
    char *q = realloc(b->p, c);
    if (!q) {
      b->oom = 1;
      return;
    }
    b->p = q;
    b->cap = c;
  }
  memcpy(b->p + b->n, s, l + 1);
  b->n += l;
}

static const char *after_last_think(const char *s) {
  const char *r = s, *q;
  while ((q = strstr(r, T_THINK_END)) != NULL) r = q + strlen(T_THINK_END);
  return r;
}

static epic_status need_content(const epic_chat_message *m, size_t i) {
  if (m->content) return EPIC_OK;
  EPIC_LOG_ERROR("chat: message %zu (%s) has no content", i,
                 (unsigned)m->role < 4 ? k_roles[m->role] : "?");
  return EPIC_ERR_INVALID;
}

static void add_call(strb *b, const epic_chat_tool_call *c) {
  sb_add(b, c->type);
  sb_add(b, T_SEP);
  sb_add(b, c->name);
  sb_add(b, "\n```json\n");
  sb_add(b, c->arguments);
  sb_add(b, "\n```" T_CALL_END);
}

epic_status epic_chat_render(epic_chat_template tmpl, const char *bos_token, const epic_chat_message *msgs,
                             size_t n, int add_generation_prompt, char **text, size_t *len) {
  strb b = {0};
  epic_status st = EPIC_OK;
  if (!text || (!msgs && n)) return EPIC_ERR_INVALID;
  *text = NULL;
  if (len) *len = 0;
  if (tmpl != EPIC_CHAT_V3 && tmpl != EPIC_CHAT_R1) {
    EPIC_LOG_ERROR("chat: render needs a concrete template (v3 or r1), got %s", epic_chat_template_name(tmpl));
    return EPIC_ERR_INVALID;
  }
  for (size_t i = 0; i < n; i++) {
    const epic_chat_message *m = &msgs[i];
    if ((unsigned)m->role > EPIC_ROLE_TOOL) {
      EPIC_LOG_ERROR("chat: message %zu has an invalid role %d", i, (int)m->role);
      return EPIC_ERR_INVALID;
    }
    if (m->role != EPIC_ROLE_ASSISTANT) EPIC_CHECK(need_content(m, i));
    if (m->role == EPIC_ROLE_ASSISTANT && !m->content) {
      for (size_t k = 0; k < m->n_tool_calls; k++) {
        const epic_chat_tool_call *c = &m->tool_calls[k];
        if (!c->type || !c->name || !c->arguments) {
          EPIC_LOG_ERROR("chat: message %zu tool call %zu lacks type, name or arguments", i, k);
          return EPIC_ERR_INVALID;
        }
      }
    }
  }

  sb_add(&b, bos_token ? bos_token : "");
  /* System prompt first, wherever the system messages are. */
  int first_sp = 1;
  for (size_t i = 0; i < n; i++) {
    if (msgs[i].role != EPIC_ROLE_SYSTEM) continue;
    if (tmpl == EPIC_CHAT_R1) continue; /* last one, below */
    if (!first_sp) sb_add(&b, "\n\n");
    sb_add(&b, msgs[i].content);
    first_sp = 0;
  }
  if (tmpl == EPIC_CHAT_R1) {
    for (size_t i = n; i-- > 0;) {
      if (msgs[i].role == EPIC_ROLE_SYSTEM) {
        sb_add(&b, msgs[i].content);
        break;
      }
    }
  }

  int is_first = 0, is_tool = 0, is_output_first = 1;
  for (size_t i = 0; i < n; i++) {
    const epic_chat_message *m = &msgs[i];
    switch (m->role) {
    case EPIC_ROLE_SYSTEM:
      break;
    case EPIC_ROLE_USER:
      is_tool = 0;
      sb_add(&b, T_USER);
      sb_add(&b, m->content);
      break;
    case EPIC_ROLE_ASSISTANT:
      if (!m->content) {
        is_tool = 0;
        for (size_t k = 0; k < m->n_tool_calls; k++) {
          if (!is_first) {
            sb_add(&b, T_ASSISTANT T_CALLS_BEGIN T_CALL_BEGIN);
            add_call(&b, &m->tool_calls[k]);
            is_first = 1;
          } else {
            sb_add(&b, "\n" T_CALL_BEGIN);
            add_call(&b, &m->tool_calls[k]);
            sb_add(&b, T_CALLS_END T_EOS);
          }
        }
      } else if (is_tool) {
        sb_add(&b, T_OUTPUTS_END);
        sb_add(&b, m->content);
        sb_add(&b, T_EOS);
        is_tool = 0;
      } else {
        sb_add(&b, T_ASSISTANT);
        sb_add(&b, tmpl == EPIC_CHAT_R1 ? after_last_think(m->content) : m->content);
        sb_add(&b, T_EOS);
      }
      break;
    case EPIC_ROLE_TOOL:
      is_tool = 1;
      if (is_output_first) {
        sb_add(&b, T_OUTPUTS_BEGIN T_OUTPUT_BEGIN);
        is_output_first = 0;
      } else {
        sb_add(&b, "\n" T_OUTPUT_BEGIN);
      }
      sb_add(&b, m->content);
      sb_add(&b, T_OUTPUT_END);
      break;
    }
  }
  if (is_tool) sb_add(&b, T_OUTPUTS_END);
  if (add_generation_prompt && !is_tool) sb_add(&b, tmpl == EPIC_CHAT_R1 ? T_ASSISTANT "<think>\n" : T_ASSISTANT);
  if (b.oom) {
    st = EPIC_ERR_NOMEM;
    goto fail;
  }
  *text = b.p;
  if (len) *len = b.n;
  return EPIC_OK;
fail:
  free(b.p);
  return st;
}

epic_status epic_chat_encode(const epic_tokenizer *tok, epic_chat_template tmpl, const epic_chat_message *msgs,
                             size_t n, int add_generation_prompt, int32_t **ids, size_t *n_ids, char **text,
                             size_t *text_len) {
  epic_status st;
  char *s = NULL;
  size_t sl = 0;
  if (!tok || !ids || !n_ids) return EPIC_ERR_INVALID;
  *ids = NULL;
  *n_ids = 0;
  if (text) *text = NULL;
  int32_t bos = epic_tokenizer_bos_id(tok);
  if (bos < 0) {
    EPIC_LOG_ERROR("chat: the tokenizer has no bos_token (tokenizer_config.json missing?)");
    return EPIC_ERR_INVALID;
  }
  EPIC_CHECK(epic_chat_render(epic_chat_resolve(tok, tmpl), epic_tokenizer_id_to_token(tok, bos), msgs, n,
                              add_generation_prompt, &s, &sl));
  /* The template wrote BOS as text; added-token matching turns it into the id. */
  EPIC_CHECK_GOTO(epic_tokenizer_encode(tok, s, sl, 0, ids, n_ids), st, fail);
  if (text) {
    *text = s;
    if (text_len) *text_len = sl;
  } else {
    free(s);
  }
  return EPIC_OK;
fail:
  free(s);
  return st;
}

/* ------------------------------------------------------------------ JSON */

struct epic_chat_messages {
  epic_chat_message *items;
  size_t n;
  /* every string and tool-call array is owned through these lists */
  char **strs;
  size_t n_strs, cap_strs;
  epic_chat_tool_call **calls;
  size_t n_calls;
};

static char *own(epic_chat_messages *m, char *s) {
  if (!s) return NULL;
  if (m->n_strs == m->cap_strs) {
    size_t c = m->cap_strs ? m->cap_strs * 2 : 16;
    char **q = realloc(m->strs, c * sizeof *q);
    if (!q) {
      free(s);
      return NULL;
    }
    m->strs = q;
    m->cap_strs = c;
  }
  m->strs[m->n_strs++] = s;
  return s;
}

/* content: string, null, or an array of parts whose text parts are joined. */
static epic_status parse_content(epic_chat_messages *m, const cJSON *c, size_t idx, const char **out) {
  *out = NULL;
  if (!c || cJSON_IsNull(c)) return EPIC_OK;
  if (cJSON_IsString(c)) {
    *out = own(m, strdup(c->valuestring));
    return *out ? EPIC_OK : EPIC_ERR_NOMEM;
  }
  if (cJSON_IsArray(c)) {
    strb b = {0};
    const cJSON *part;
    int first = 1;
    sb_add(&b, "");
    cJSON_ArrayForEach(part, c) {
      const cJSON *ty = cJSON_GetObjectItemCaseSensitive(part, "type");
      const cJSON *tx = cJSON_GetObjectItemCaseSensitive(part, "text");
      if (!cJSON_IsString(ty) || strcmp(ty->valuestring, "text") != 0 || !cJSON_IsString(tx)) {
        EPIC_LOG_ERROR("chat: message %zu: only text content parts are supported (got type %s)", idx,
                       cJSON_IsString(ty) ? ty->valuestring : "?");
        free(b.p);
        return EPIC_ERR_INVALID;
      }
      if (!first) sb_add(&b, "\n");
      sb_add(&b, tx->valuestring);
      first = 0;
    }
    if (b.oom) {
      free(b.p);
      return EPIC_ERR_NOMEM;
    }
    *out = own(m, b.p);
    return *out ? EPIC_OK : EPIC_ERR_NOMEM;
  }
  EPIC_LOG_ERROR("chat: message %zu: content must be a string, null or an array of text parts", idx);
  return EPIC_ERR_INVALID;
}

static epic_status parse_calls(epic_chat_messages *m, const cJSON *tc, size_t idx, epic_chat_message *msg) {
  if (!tc || cJSON_IsNull(tc)) return EPIC_OK;
  if (!cJSON_IsArray(tc)) {
    EPIC_LOG_ERROR("chat: message %zu: tool_calls must be an array", idx);
    return EPIC_ERR_INVALID;
  }
  size_t k = (size_t)cJSON_GetArraySize(tc);
  if (k == 0) return EPIC_OK;
  epic_chat_tool_call *calls = calloc(k, sizeof *calls);
  if (!calls) return EPIC_ERR_NOMEM;
  m->calls[m->n_calls++] = calls;
  msg->tool_calls = calls;
  msg->n_tool_calls = k;
  const cJSON *it;
  size_t j = 0;
  cJSON_ArrayForEach(it, tc) {
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(it, "type");
    const cJSON *fn = cJSON_GetObjectItemCaseSensitive(it, "function");
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(fn, "name");
    const cJSON *args = cJSON_GetObjectItemCaseSensitive(fn, "arguments");
    if (!cJSON_IsString(name) || !args || cJSON_IsNull(args)) {
      EPIC_LOG_ERROR("chat: message %zu tool call %zu needs function.name and function.arguments", idx, j);
      return EPIC_ERR_INVALID;
    }
    if (ty && !cJSON_IsString(ty)) {
      EPIC_LOG_ERROR("chat: message %zu tool call %zu: type must be a string", idx, j);
      return EPIC_ERR_INVALID;
    }
    calls[j].type = own(m, strdup(ty ? ty->valuestring : "function"));
    calls[j].name = own(m, strdup(name->valuestring));
    calls[j].arguments =
        own(m, cJSON_IsString(args) ? strdup(args->valuestring) : cJSON_PrintUnformatted(args));
    if (!calls[j].type || !calls[j].name || !calls[j].arguments) return EPIC_ERR_NOMEM;
    j++;
  }
  return EPIC_OK;
}

epic_status epic_chat_messages_from_json(const cJSON *array, epic_chat_messages **out) {
  epic_status st = EPIC_OK;
  if (!out) return EPIC_ERR_INVALID;
  *out = NULL;
  if (!cJSON_IsArray(array)) {
    EPIC_LOG_ERROR("chat: messages must be a JSON array");
    return EPIC_ERR_INVALID;
  }
  size_t n = (size_t)cJSON_GetArraySize(array);
  epic_chat_messages *m = calloc(1, sizeof *m);
  if (!m) return EPIC_ERR_NOMEM;
  m->items = calloc(n ? n : 1, sizeof *m->items);
  m->calls = calloc(n ? n : 1, sizeof *m->calls);
  if (!m->items || !m->calls) {
    st = EPIC_ERR_NOMEM;
    goto fail;
  }
  const cJSON *it;
  size_t i = 0;
  cJSON_ArrayForEach(it, array) {
    epic_chat_message *msg = &m->items[i];
    const cJSON *role = cJSON_GetObjectItemCaseSensitive(it, "role");
    int r = -1;
    for (int k = 0; k < 4 && cJSON_IsString(role); k++)
      if (strcmp(role->valuestring, k_roles[k]) == 0) r = k;
    if (r < 0) {
      EPIC_LOG_ERROR("chat: message %zu: role must be system, user, assistant or tool (got %s)", i,
                     cJSON_IsString(role) ? role->valuestring : "none");
      st = EPIC_ERR_INVALID;
      goto fail;
    }
    msg->role = (epic_chat_role)r;
    EPIC_CHECK_GOTO(parse_content(m, cJSON_GetObjectItemCaseSensitive(it, "content"), i, &msg->content), st,
                    fail);
    if (r == EPIC_ROLE_ASSISTANT)
      EPIC_CHECK_GOTO(parse_calls(m, cJSON_GetObjectItemCaseSensitive(it, "tool_calls"), i, msg), st, fail);
    if (r != EPIC_ROLE_ASSISTANT && !msg->content) {
      EPIC_LOG_ERROR("chat: message %zu (%s) needs a content string", i, k_roles[r]);
      st = EPIC_ERR_INVALID;
      goto fail;
    }
    i++;
  }
  m->n = i;
  *out = m;
  return EPIC_OK;
fail:
  epic_chat_messages_free(m);
  return st;
}

epic_status epic_chat_messages_parse(const char *json, size_t len, epic_chat_messages **out) {
  if (!json || !out) return EPIC_ERR_INVALID;
  *out = NULL;
  cJSON *j = cJSON_ParseWithLength(json, len);
  if (!j) {
    EPIC_LOG_ERROR("chat: messages are not valid JSON");
    return EPIC_ERR_INVALID;
  }
  epic_status st = epic_chat_messages_from_json(j, out);
  cJSON_Delete(j);
  return st;
}

const epic_chat_message *epic_chat_messages_items(const epic_chat_messages *m) { return m ? m->items : NULL; }
size_t epic_chat_messages_count(const epic_chat_messages *m) { return m ? m->n : 0; }

void epic_chat_messages_free(epic_chat_messages *m) {
  if (!m) return;
  for (size_t i = 0; i < m->n_strs; i++) free(m->strs[i]);
  for (size_t i = 0; i < m->n_calls; i++) free(m->calls[i]);
  free(m->strs);
  free(m->calls);
  free(m->items);
  free(m);
}
