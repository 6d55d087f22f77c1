/* epic_oai: the OpenAI-compatible request schema of EPIC's HTTP front
 * (POST /v1/chat/completions and /v1/completions), parsed with cJSON.
 *
 * Fields read: model, messages (chat) / prompt (completions: a string, token
 * ids, or a one-element array of either), max_tokens / max_completion_tokens,
 * temperature, top_p, seed, stop (string or array), n, stream,
 * stream_options.include_usage, logprobs (chat: bool; completions: 0..5),
 * top_logprobs (chat: 0..20), plus the extensions ignore_eos (bool) and
 * epic_chat_template ("auto", "v3", "r1"). Unknown fields are ignored; null
 * means "not set"; a field of the wrong type or out of range is an error
 * naming it, which the front answers with HTTP 400 and an OpenAI error object.
 *
 * Thread contract: pure functions; a request is owned by its caller.
 * Ownership: epic_oai_parse fills *out (release with epic_oai_request_clear,
 * also after an error). */
#ifndef EPIC_COORDINATOR_OPENAI_H
#define EPIC_COORDINATOR_OPENAI_H

#include <cjson/cJSON.h>
#include <stddef.h>
#include <stdint.h>

#include "common/status.h"

/* What the parser accepts at all: the largest values the server's limit flags
 * allow (coordinator/cli_security.h: --max-n, --max-stop-strings,
 * --max-stop-len); the limits in force are checked afterwards
 * (coordinator/http_limits.h), so that a refusal names its flag. */
#define EPIC_OAI_MAX_N 128
#define EPIC_OAI_MAX_STOPS 1024
#define EPIC_OAI_MAX_STOP_LEN 65536
#define EPIC_OAI_MAX_TOP_LOGPROBS 20

typedef struct epic_oai_error {
  int http_status;   /* 400, 404, 413, ... */
  char type[48];     /* "invalid_request_error" */
  char param[64];    /* the offending field, "" for none */
  char code[48];     /* "" or e.g. "model_not_found" */
  char message[512]; /* starts with the field */
} epic_oai_error;

typedef struct epic_oai_request {
  int chat;                /* 1: /v1/chat/completions, 0: /v1/completions */
  cJSON *root;             /* the parsed body (owned); messages points into it */
  const char *model;       /* into root */
  const cJSON *messages;   /* chat */
  const char *prompt_text; /* completions: into root, or NULL */
  size_t prompt_len;
  int32_t *prompt_ids; /* completions: malloc'd, or NULL */
  int64_t n_prompt_ids;
  int64_t max_tokens; /* 0 = not set */
  float temperature;  /* default 1 (as OpenAI's) */
  float top_p;        /* default 1 */
  int has_seed;
  uint64_t seed;
  const char **stops; /* malloc'd array of pointers into root, or NULL */
  size_t *stop_lens;  /* malloc'd, n_stops entries */
  int n_stops;
  int n; /* choices, 1..EPIC_OAI_MAX_N */
  int stream, include_usage;
  int logprobs;     /* report the sampled tokens' logprobs */
  int top_logprobs; /* alternatives per token (0..20) */
  int ignore_eos;
  const char *chat_template; /* "auto" unless set */
} epic_oai_request;

/* Parses body[0..n) for the chat (chat = 1) or completions endpoint. On
 * EPIC_ERR_INVALID err says what and which field; EPIC_ERR_NOMEM. */
epic_status epic_oai_parse(const char *body, size_t n, int chat, epic_oai_request *out,
                           epic_oai_error *err);
void epic_oai_request_clear(epic_oai_request *r);

/* Sets err (status, param, printf-style message). */
void epic_oai_error_set(epic_oai_error *err, int http_status, const char *type, const char *param,
                        const char *code, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
/* {"error": {...}} as malloc'd JSON text (free()), or NULL. */
char *epic_oai_error_json(const epic_oai_error *err);

/* A JSON string value for bytes that may not be valid UTF-8 (a token can end
 * inside a character): invalid sequences become U+FFFD. NULL on NOMEM. */
cJSON *epic_oai_string(const char *p, size_t n);

#endif
