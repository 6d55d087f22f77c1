/* Glue between `epic serve` / `epic gateway` and the HTTP front
 * (coordinator/http.h): flag parsing, start-up (with its log line) and stop.
 * Without libmicrohttpd (EPIC_HAVE_HTTP undefined) --http says so and fails.
 * Thread contract: the command's main thread only. */
#ifndef EPIC_COORDINATOR_HTTP_CLI_H
#define EPIC_COORDINATOR_HTTP_CLI_H

#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "common/status.h"
#include "coordinator/engine.h"
#include "coordinator/gateway.h"

/* Top logprobs the engine computes per token when --http is on (OpenAI's max). */
#define EPIC_HTTP_CLI_TOP_LOGPROBS EPIC_ENGINE_MAX_TOP_LOGPROBS

typedef struct epic_http_cli epic_http_cli;

/* The gateway's private channel from its HTTP front to its router. */
typedef struct epic_http_cli_internal {
  char dir[256];    /* "" = none made */
  char listen[300]; /* "unix:DIR/router.sock" */
  char token[65];   /* "" = the router has no auth */
} epic_http_cli_internal;

/* --reasoning-parser: "deepseek_r1" (or "r1") -> 1, "none" -> 0; else a
 * message and nonzero. */
static inline int epic_http_cli_reasoning(const char *cmd, const char *arg, int *on) {
  if (strcmp(arg, "deepseek_r1") == 0 || strcmp(arg, "r1") == 0) {
    *on = 1;
    return 0;
  }
  if (strcmp(arg, "none") == 0) {
    *on = 0;
    return 0;
  }
  fprintf(stderr, "epic %s: --reasoning-parser: expected deepseek_r1 or none, got '%s'\n", cmd,
          arg);
  return 1;
}

#ifdef EPIC_HAVE_HTTP
/* Serves HTTP on listen over the engine of sp (ep: its parameters). Prints
 * the listening line. Stop with epic_http_cli_stop before destroying the engine. */
epic_status epic_http_cli_serve(const char *listen, const epic_gw_server_params *sp,
                                const epic_engine_params *ep, int reasoning, epic_http_cli **out);
/* Serves HTTP on listen by calling the gateway's router through its private
 * socket (in: epic_http_cli_internal_open before the router was created).
 * sec: TLS, plaintext policy, keys and rate limits (as the router's);
 * limits: its --max-n (the upstream `epic serve` checks the other limits). */
epic_status epic_http_cli_gateway(const char *listen, const epic_http_cli_internal *in,
                                  const epic_gw_security *sec, const epic_gw_request_limits *limits,
                                  int reasoning, double drain_timeout, int64_t max_request_bytes,
                                  const volatile sig_atomic_t *drain_requests, epic_http_cli **out);
/* The gateway's internal channel (coordinator/gateway.h, internal_listen):
 * makes a private (0700) directory for the router's unix socket and sets
 * sec->internal_listen to it, and, when sec->auth, the internal token. Call
 * before creating the router; close removes the socket and the directory. */
epic_status epic_http_cli_internal_open(epic_http_cli_internal *in, epic_gw_security *sec);
void epic_http_cli_internal_close(epic_http_cli_internal *in);
/* NULL-safe: stops listening, waits for every connection, frees. */
void epic_http_cli_stop(epic_http_cli *c);
#else
static inline epic_status epic_http_cli_missing(void) {
  fputs("epic: --http: this epic was built without libmicrohttpd (apt install "
        "libmicrohttpd-dev, then rebuild)\n",
        stderr);
  return EPIC_ERR_UNSUPPORTED;
}
static inline epic_status epic_http_cli_serve(const char *listen, const epic_gw_server_params *sp,
                                              const epic_engine_params *ep, int reasoning,
                                              epic_http_cli **out) {
  (void)listen, (void)sp, (void)ep, (void)reasoning, (void)out;
  return epic_http_cli_missing();
}
static inline epic_status
epic_http_cli_gateway(const char *listen, const epic_http_cli_internal *in,
                      const epic_gw_security *sec, const epic_gw_request_limits *limits,
                      int reasoning, double drain_timeout, int64_t max_request_bytes,
                      const volatile sig_atomic_t *drain_requests, epic_http_cli **out) {
  (void)listen, (void)in, (void)sec, (void)limits, (void)reasoning, (void)drain_timeout,
      (void)max_request_bytes, (void)drain_requests, (void)out;
  return epic_http_cli_missing();
}
static inline epic_status epic_http_cli_internal_open(epic_http_cli_internal *in,
                                                      epic_gw_security *sec) {
  (void)sec;
  memset(in, 0, sizeof *in);
  return epic_http_cli_missing();
}
static inline void epic_http_cli_internal_close(epic_http_cli_internal *in) {
  (void)in;
}
static inline void epic_http_cli_stop(epic_http_cli *c) {
  (void)c;
}
#endif

#endif
