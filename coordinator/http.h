/* epic_http: the OpenAI-compatible HTTP front door of `epic serve` and
 * `epic gateway` (libmicrohttpd), next to their gRPC servers.
 *
 * Endpoints: POST /v1/chat/completions and /v1/completions (JSON, or
 * server-sent events with "stream": true, ended by "data: [DONE]"),
 * GET /v1/models, GET /health (200 {"status":"ok"}, 503 while draining or not
 * ready), GET /metrics (Prometheus text, coordinator/metrics.h). A malformed
 * request gets a 4xx with an OpenAI error object naming the field
 * (coordinator/openai.h); an unknown path 404, a wrong method 405, a body
 * above max_request_bytes 413, a full queue 429, draining 503.
 *
 * Security (issue #12; the same flags as gRPC, coordinator/cli_security.h):
 * with security->tls_cert the listener is HTTPS only (GnuTLS through
 * libmicrohttpd); with tls_client_ca every client must present a certificate
 * that CA signed: the handshake requires one and verifies it, and each request
 * is checked again (403 otherwise). Without TLS a non-loopback address needs
 * security->plaintext. With security->auth every request but GET /health
 * (load balancers probe it without a key) is admitted once by epic_auth_admit
 * with its `Authorization: Bearer KEY` header: 401 (with WWW-Authenticate)
 * for a missing, wrong or revoked key, 429 with Retry-After (seconds) and
 * retry-after-ms for a rate or concurrency limit; a completion request (one
 * per HTTP request, whatever n) holds a stream slot until it ends and is
 * charged its completion tokens. Keys are never logged (the principal is).
 * Request limits: coordinator/http_limits.h.
 *
 * One HTTP/OpenAI layer works over a small backend vtable: the in-process
 * engine for serve (epic_http_engine_backend), gRPC Generate calls for the
 * gateway (epic_http_upstream_backend). A request with n choices starts n
 * generations (choice i with seed + i) and merges them by index. R1
 * reasoning: when the backend says the rendered prompt left a <think> block
 * open (or the output opens one), the text up to </think> is returned as
 * reasoning_content (coordinator/reasoning.h), unless reasoning is off.
 *
 * Threads: libmicrohttpd runs one thread per connection; a connection's
 * thread parses, starts the generations, then waits on the request's
 * condition variable for the events that the backend's threads (the engine
 * thread, gRPC reader threads) post through the epic_http_sink functions, and
 * formats and writes them. A client that disconnects has its generations
 * cancelled (noticed within 50 ms even while no token arrives).
 *
 * Ownership: epic_http_create copies params; backend and drain_requests are
 * borrowed and must outlive the front. epic_http_destroy stops listening,
 * cancels what is still running, waits for every connection thread, and must
 * run before the backend (and the engine behind it) is destroyed. */
#ifndef EPIC_COORDINATOR_HTTP_H
#define EPIC_COORDINATOR_HTTP_H

#include <cjson/cJSON.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "coordinator/gateway.h"
#include "coordinator/metrics.h"

typedef struct epic_http epic_http;
typedef struct epic_http_sink epic_http_sink; /* one choice of one request */

/* What one generation runs. Borrowed for the start call. */
typedef struct epic_http_gen {
  const cJSON *messages;     /* chat: OpenAI messages (validated), else NULL */
  const char *chat_template; /* "auto", "v3", "r1" */
  const char *prompt_text;   /* completions: text (BOS is added), or NULL */
  size_t prompt_len;
  const int32_t *prompt_ids; /* completions: token ids, or NULL */
  int64_t n_prompt_ids;
  int64_t max_tokens; /* 0 = the backend's default */
  float temperature, top_p;
  uint64_t seed;
  const char *const *stops; /* stop strings (the text ends before the first) */
  const size_t *stop_lens;
  int n_stops;
  int logprobs, top_logprobs, ignore_eos;
  /* The client's Authorization header (NULL = none), for a backend that
   * forwards it to its upstream (the gateway's). */
  const char *authorization;
  size_t authorization_len;
} epic_http_gen;

/* One generated token as the sink takes it. */
typedef struct epic_http_token {
  int32_t id;
  float logprob;
  int n_top;
  int32_t top_ids[20];
  float top_lps[20];
} epic_http_token;

/* Finish reasons. */
enum { EPIC_HTTP_FINISH_LENGTH, EPIC_HTTP_FINISH_STOP, EPIC_HTTP_FINISH_ERROR };

/* Backend -> front, from any thread, until finish (exactly once per started
 * generation; nothing after it). text is complete UTF-8 already cut at stop
 * strings; toks are the tokens that produced it (may be 0 of either). */
epic_status epic_http_sink_output(epic_http_sink *s, const char *text, size_t n,
                                  const epic_http_token *toks, int n_toks);
/* finish: EPIC_HTTP_FINISH_*; on ERROR, http_status (500, 503, ...) and msg
 * say why. Token counts are the request's usage. */
void epic_http_sink_finish(epic_http_sink *s, int finish, int64_t prompt_tokens,
                           int64_t completion_tokens, int http_status, const char *msg);

typedef struct epic_http_backend_ops {
  int abi_version; /* EPIC_HTTP_BACKEND_ABI */
  const char *name;
  /* Starts one generation whose events go to sink. On success *handle is the
   * backend's (released with release after the finish event) and
   * *reasoning_open says whether the rendered prompt left a <think> block
   * open. On failure returns the HTTP status (400, 429, 503, 500) with err
   * naming the field or cause, and no event ever comes. Blocks briefly. */
  int (*start)(void *be, const epic_http_gen *g, epic_http_sink *sink, void **handle,
               int *reasoning_open, char *err, size_t err_len, char *param, size_t param_len);
  /* Any thread, before release: ends the generation early (finish follows). */
  void (*cancel)(void *be, void *handle);
  void (*release)(void *be, void *handle);
  /* Token bytes of id for logprobs (borrowed), or NULL: shown as "token_id:N". */
  const char *(*token_bytes)(void *be, int32_t id, size_t *len);
  /* Fills the engine part of a metrics snapshot. */
  void (*metrics)(void *be, epic_metrics_snapshot *s);
  /* 1 while new generations can be served; NULL = always. */
  int (*ready)(void *be);
  /* The served model's name when params.model_name is NULL (borrowed, may
   * block briefly), or NULL while unknown; authorization (len bytes, may be
   * NULL) is the asking client's header, for an upstream that needs a key.
   * May be NULL. */
  const char *(*model_name)(void *be, const char *authorization, size_t len);
  int max_top_logprobs; /* top_logprobs above: 400 naming the field */
} epic_http_backend_ops;

#define EPIC_HTTP_BACKEND_ABI 2

typedef struct epic_http_params {
  size_t size;                      /* sizeof(epic_http_params) */
  const char *listen;               /* "host:port"; port 0 picks one */
  const epic_http_backend_ops *ops; /* borrowed */
  void *backend;                    /* borrowed */
  const char *model_name;    /* /v1/models id; requests must name it; NULL = ops->model_name */
  const char *log;           /* "serve" / "gateway": leads log lines */
  int reasoning;             /* 1: split R1 reasoning (default), 0: --reasoning-parser none */
  int64_t max_request_bytes; /* larger bodies: 413 (default 4 MiB) */
  double drain_timeout;      /* seconds generations may run after a drain signal */
  const volatile sig_atomic_t *drain_requests; /* borrowed; NULL = never drains */
  const epic_gw_security *security; /* borrowed; NULL = plaintext (loopback only), no keys */
  epic_gw_request_limits limits;    /* 0 fields: defaults (coordinator/http_limits.h) */
  int full_limits;                  /* 1: check every limit (serve); 0: n, top_logprobs (gateway) */
} epic_http_params;

/* Binds and starts serving at once. EPIC_ERR_INVALID names a bad field (also
 * plaintext on a non-loopback address without security->plaintext, an
 * unreadable PEM file, TLS without TLS support in libmicrohttpd); EPIC_ERR_IO
 * when the address cannot be bound (logged). */
epic_status epic_http_create(const epic_http_params *p, epic_http **out);
int epic_http_port(const epic_http *h);
/* NULL-safe; see the header comment for the order. */
void epic_http_destroy(epic_http *h);

/* ---- backends ---------------------------------------------------------------------- */

typedef struct epic_engine epic_engine;
typedef struct epic_tokenizer epic_tokenizer;
typedef struct epic_model_config epic_model_config;

typedef struct epic_http_engine_params {
  size_t size;                     /* sizeof(epic_http_engine_params) */
  epic_engine *engine;             /* borrowed; rank 0, driven by another thread */
  const epic_tokenizer *tokenizer; /* borrowed; NULL = token-id prompts only */
  const epic_model_config *config; /* borrowed */
  int64_t max_context, default_max_tokens;
  int64_t kv_tokens, page_size; /* KV rows of one worker and its page size; 0 = unchecked */
  int top_logprobs;             /* the engine's params.top_logprobs */
  const char *comm_name;        /* a2a backend label; NULL = one process */
  int64_t max_prompt_tokens;    /* --max-prompt-tokens; 0 = the context only */
  int64_t max_tokens_limit;     /* --max-tokens-limit: caps the default too; 0 = none */
} epic_http_engine_params;

/* The in-process engine backend of `epic serve`. */
extern const epic_http_backend_ops epic_http_engine_ops;
epic_status epic_http_engine_backend_create(const epic_http_engine_params *p, void **out);
void epic_http_engine_backend_destroy(void *be);

/* The gRPC backend of `epic gateway`: Generate calls to target (the
 * gateway's own gRPC address, so that its upstream choice, health checks and
 * retries apply), plaintext: target is the router's private unix socket
 * (epic_gw_security.internal_listen). internal_token (may be NULL: the router
 * has no auth) goes along as `x-epic-internal`, so that the router does not
 * admit and count the client a second time; the client's Authorization goes
 * along too, which the router forwards to the upstream `epic serve`. Both
 * strings are copied. */
extern const epic_http_backend_ops epic_http_upstream_ops;
epic_status epic_http_upstream_backend_create(const char *target, const char *internal_token,
                                              void **out);
void epic_http_upstream_backend_destroy(void *be);

#endif
