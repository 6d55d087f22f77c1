/* Batch jobs in the OpenAI batch file format (DESIGN §6): everything of
 * `epic batch` that needs no engine, so that it can be tested on its own.
 *
 * Input: one JSON object per line,
 *   {"custom_id": "...", "method": "POST", "url": "/v1/chat/completions",
 *    "body": {"model": ..., "messages": [...], "max_tokens" | "max_completion_tokens": N,
 *             "temperature": T, "top_p": P, "seed": S, "stop": "..." | [...]}}
 * or url "/v1/completions" with body "prompt" (a string, or an array of token
 * ids). Extensions as in vLLM: "top_k" and "ignore_eos". Optional fields may be
 * null (= absent); unknown body fields are ignored, but fields whose
 * non-default value would change the result and are not implemented (n != 1,
 * stream, logprobs, penalties, logit_bias, echo, best_of, suffix) are errors.
 *
 * Output: one record per input line,
 *   {"id": "batch_req_<hex>", "custom_id": ..., "response": {"status_code": 200,
 *    "request_id": "req_<hex>", "body": <chat.completion or text_completion>}, "error": null}
 * or for a malformed line
 *   {"id": ..., "custom_id": ... | null, "response": null,
 *    "error": {"code": "invalid_request", "message": "line N: <field>: ..."}}.
 * The record id is a hash of the line number and the line's bytes, so a rerun
 * over the same input gives every line the same id (and, without "seed", the
 * same sampling seed).
 *
 * Resume (epic_batch_scan_output): a line is finished when the output holds a
 * record with its custom_id, or, for a line without a usable custom_id
 * (missing, or repeating an earlier line's, whose record then has custom_id
 * null), a record with its id.
 *
 * Thread contract: no shared state; a request or index is used by one thread at
 * a time. Ownership: every object comes from the create/parse function and
 * goes back through its _free/_destroy (NULL-safe); formatted lines are
 * malloc'd and released with free(). */
#ifndef EPIC_COORDINATOR_BATCH_H
#define EPIC_COORDINATOR_BATCH_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "coordinator/tokenizer/chat.h"
#include "coordinator/tokenizer/tokenizer.h"

#define EPIC_BATCH_MAX_STOP 4    /* stop strings per request, as OpenAI */
#define EPIC_BATCH_ERROR_CAP 512 /* bytes of an error message */

typedef enum { EPIC_BATCH_CHAT = 0, EPIC_BATCH_COMPLETIONS = 1 } epic_batch_endpoint;

typedef struct epic_batch_request {
  int64_t line;    /* 1-based input line number */
  char id[32];     /* "batch_req_<16 hex>" */
  uint64_t hash;   /* the hash behind id (default seed) */
  char *custom_id; /* NULL when missing, not a string or repeated */
  epic_batch_endpoint endpoint;
  char *model;                  /* body.model or NULL */
  epic_chat_messages *messages; /* chat: the conversation */
  char *prompt;                 /* completions: text prompt (prompt_len bytes), or NULL */
  size_t prompt_len;
  int32_t *prompt_ids; /* completions: token-id prompt (n_prompt_ids >= 1), or NULL */
  int64_t n_prompt_ids;
  int64_t max_tokens;           /* 0 = not given */
  const char *max_tokens_field; /* "body.max_tokens" or "body.max_completion_tokens" */
  float temperature, top_p;     /* defaults 1 and 1, as OpenAI */
  int64_t top_k;                /* 0 = off */
  uint64_t seed;                /* body.seed, else hash */
  int ignore_eos;
  char *stop[EPIC_BATCH_MAX_STOP];
  size_t stop_len[EPIC_BATCH_MAX_STOP];
  int n_stop;
  char error[EPIC_BATCH_ERROR_CAP]; /* "line N: <field>: ..." when invalid, else "" */
} epic_batch_request;

/* Parses one input line (len bytes, without its newline; need not be
 * NUL-terminated). Returns EPIC_OK for a valid request, EPIC_ERR_INVALID for a
 * malformed line: then *out is still set, with error, id and (when the line
 * has one) custom_id filled in for the error record. EPIC_ERR_NOMEM: *out NULL.
 * Nothing is logged. */
epic_status epic_batch_parse_line(const char *line, size_t len, int64_t line_no,
                                  epic_batch_request **out);
void epic_batch_request_free(epic_batch_request *r);
/* Marks r invalid with "line N: " + the formatted message (returns EPIC_ERR_INVALID). */
epic_status epic_batch_request_fail(epic_batch_request *r, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

typedef struct epic_batch_limits {
  int64_t vocab_size;  /* ids of a token-id prompt must be below it */
  int64_t max_context; /* prompt + completion tokens of one sequence */
  int64_t
      max_seq_tokens; /* tokens one worker's KV cache can hold for one sequence (0 = no limit) */
  int64_t
      default_max_tokens; /* completion tokens when the body gives none (clamped to what fits) */
} epic_batch_limits;

/* The prompt of a valid request as token ids: the chat template (tmpl, AUTO
 * allowed) with the generation prompt for chat requests, BOS (when the
 * tokenizer has one) + the text for a text prompt, the ids as given otherwise.
 * Checks the ids and the length against lim and picks max_new (the request's
 * max_tokens, or the default clamped to what fits). On success *ids is malloc'd
 * (free with free()). EPIC_ERR_INVALID: r->error names the field. */
epic_status epic_batch_encode(epic_batch_request *r, const epic_tokenizer *tok,
                              epic_chat_template tmpl, const epic_batch_limits *lim, int32_t **ids,
                              int64_t *n_ids, int64_t *max_new);

/* Start of the earliest stop string of r in text[0..len), looking only at
 * matches that end after byte `from` (text before it was searched already), or
 * -1 when there is none. */
int64_t epic_batch_find_stop(const epic_batch_request *r, const char *text, size_t len,
                             size_t from);

typedef struct epic_batch_output {
  const char *text; /* generated text (stop string removed), text_len bytes */
  size_t text_len;
  int finish_stop; /* 1: "stop" (EOS or a stop string), 0: "length" */
  int64_t prompt_tokens, completion_tokens;
  int64_t created;   /* Unix seconds */
  const char *model; /* the body's "model" */
} epic_batch_output;

/* One result record, newline-terminated (malloc'd), or NULL on NOMEM. Invalid
 * UTF-8 in any string is written as U+FFFD, so the line is always valid JSON. */
char *epic_batch_format_result(const epic_batch_request *r, const epic_batch_output *o,
                               size_t *len);
/* One error record: custom_id may be NULL (written as null); code e.g.
 * "invalid_request". Newline-terminated, malloc'd, NULL on NOMEM. */
char *epic_batch_format_error(const char *id, const char *custom_id, const char *code,
                              const char *message, size_t *len);

/* A set of strings with an int64 each (custom_id -> line, record ids). */
typedef struct epic_batch_index epic_batch_index;
epic_status epic_batch_index_create(epic_batch_index **out);
void epic_batch_index_destroy(epic_batch_index *x);
/* 1: added; 0: key already present (*old, may be NULL, gets its value; the
 * value is not changed); EPIC_ERR_NOMEM. */
int epic_batch_index_put(epic_batch_index *x, const char *key, int64_t value, int64_t *old);
/* 1 and *value (may be NULL) when present, else 0. */
int epic_batch_index_get(const epic_batch_index *x, const char *key, int64_t *value);
size_t epic_batch_index_count(const epic_batch_index *x);

typedef struct epic_batch_resume {
  epic_batch_index *custom_ids; /* custom_id of every complete record -> its output line */
  epic_batch_index *ids;        /* id of every complete record -> its output line */
  int64_t records;              /* complete records */
  int64_t errors;               /* of which error records */
  int64_t keep_bytes;    /* bytes up to the last newline: truncate to this before appending */
  int64_t dropped_bytes; /* an unterminated last line (cut off by a kill) */
} epic_batch_resume;

/* Reads an existing output file (a missing one is empty). Every complete line
 * must be a record (a JSON object with a string "id"): otherwise
 * EPIC_ERR_INVALID, logged with path:line, as appending to a file that is not
 * ours could bury data. EPIC_ERR_IO when the file cannot be read. On success
 * *out owns two indexes: release with epic_batch_resume_free. */
epic_status epic_batch_scan_output(const char *path, epic_batch_resume *out);
void epic_batch_resume_free(epic_batch_resume *r);

#endif
