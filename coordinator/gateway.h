/* epic_gateway: the gRPC front doors of EPIC (DESIGN §2, §6; API in
 * proto/epic/v1/inference.proto and the standard grpc.health.v1.Health).
 *
 * Two servers live here:
 *
 * - epic_gw_server (`epic serve`): the gateway inside rank 0 of a cluster. It
 *   accepts Generate / Tokenize / ModelInfo / Health calls, validates them
 *   (INVALID_ARGUMENT naming the field), applies the chat template and
 *   tokenizes, submits sequences to the engine (continuous batching: a new
 *   request joins the running batch at the next step), and streams the sampled
 *   tokens back with incrementally detokenized text, stop strings checked on the
 *   text. A full engine queue answers RESOURCE_EXHAUSTED. A client that cancels
 *   or whose deadline passes has its sequence cancelled at once (KV pages and
 *   batch slot are freed in the next step). A drain signal (SIGTERM) stops
 *   admission (new Generate calls get UNAVAILABLE, Health turns NOT_SERVING),
 *   lets running streams finish for drain_timeout seconds, cancels what is left
 *   (UNAVAILABLE), then shuts the server down.
 *
 *   Two threads (STYLE §10): the calling thread runs the gRPC completion queue
 *   and owns every grpc_call; a second thread, started by run, drives the
 *   engine (epic_engine_run), so compute and network I/O overlap. The engine's
 *   callbacks run on the engine thread: they detokenize, check stop strings and
 *   append the new tokens and text to the call's output under the server's
 *   mutex, then wake the completion-queue thread (a call on a lame channel,
 *   whose completion lands in the queue at once). That thread sends each
 *   stream's pending output as one SEND_MESSAGE; output that arrives while a
 *   stream's previous message is still being sent is coalesced into the next.
 *
 * - epic_gw_router (`epic gateway`): a stateless router in front of several
 *   serving clusters. Generate / Tokenize / ModelInfo are forwarded byte for
 *   byte to the healthy upstream with the fewest outstanding requests (ties go
 *   round-robin); the client's deadline and cancellation propagate to the
 *   upstream call. Upstreams are health-checked (grpc.health.v1 Check) every
 *   health_interval seconds; a failed check or an UNAVAILABLE call marks an
 *   upstream unhealthy until a check succeeds. A call that failed with
 *   UNAVAILABLE or RESOURCE_EXHAUSTED before any response message reached the
 *   client is retried on the other healthy upstreams. Health answers SERVING
 *   while any upstream is healthy. One thread runs the completion queue.
 *
 * Signals. Neither server installs handlers (a library must not): the caller's
 * SIGTERM/SIGINT handler increments a counter that params->drain_requests
 * points to, and the serving loop looks at it between completion-queue polls
 * (at least every 50 ms). The first increment starts the drain, a second one
 * skips the grace period.
 *
 * Ownership: *_create allocates and binds the listening port; *_destroy
 * (NULL-safe) releases everything. Borrowed pointers in params must outlive the
 * server. Thread contract: create, run and destroy on one thread; run blocks
 * until the server has drained and shut down. */
#ifndef EPIC_COORDINATOR_GATEWAY_H
#define EPIC_COORDINATOR_GATEWAY_H

#include <signal.h>
#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "coordinator/auth.h"
#include "coordinator/engine.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "worker/config.h"

typedef struct epic_gw_server epic_gw_server;
typedef struct epic_gw_router epic_gw_router;

/* Transport security and access control of one front door (issue #12).
 * TLS: tls_cert + tls_key (PEM files) make the listener TLS-only; with
 * tls_client_ca every client must present a certificate signed by that CA
 * (mutual TLS), else the handshake fails. Without TLS the listener must be a
 * loopback/unix address unless plaintext is set (then a warning is printed):
 * epic_listen_check_plaintext. auth (borrowed, may be NULL) checks the
 * `authorization: Bearer KEY` metadata of every call but Health (load
 * balancers and gateways probe it without a key) and applies the per-key rate
 * limits; refusals are UNAUTHENTICATED, or RESOURCE_EXHAUSTED with trailing
 * metadata `retry-after-ms`. The router forwards the client's authorization
 * metadata to the upstream, and connects to upstreams with upstream_ca
 * (TLS; NULL = plaintext) and upstream_cert/upstream_key (its client
 * certificate for mutual TLS); upstream_name overrides the name checked in
 * the upstream's certificate. internal_listen (the gateway with --http): a
 * "unix:PATH" address in a private directory that is served too, without TLS,
 * for this process's own HTTP front; a call there or anywhere that carries
 * the auth's internal token (epic_auth_make_internal) as `x-epic-internal`
 * metadata is admitted without keys or limits, because the HTTP front has
 * admitted its client already. All strings borrowed. */
typedef struct epic_gw_security {
  const char *tls_cert, *tls_key, *tls_client_ca;
  int plaintext;
  epic_auth *auth;
  const char *upstream_ca, *upstream_cert, *upstream_key, *upstream_name;
  const char *internal_listen;
} epic_gw_security;

/* What a client controls, bounded (0 = the default named; reported by ModelInfo). */
typedef struct epic_gw_request_limits {
  int64_t max_prompt_tokens;   /* 0 = bounded by the context length only */
  int64_t max_tokens;          /* sampling.max_tokens ceiling; 0 = context length only */
  int64_t max_stop_strings;    /* default 16 */
  int64_t max_stop_len;        /* bytes per stop string; default 256 */
  int64_t max_stop_token_ids;  /* default 64 */
  int64_t max_n;               /* choices per request (HTTP `n`); default 16 */
  int64_t max_top_logprobs;    /* alternatives per token (HTTP `top_logprobs`); default 20, -1 = 0 */
} epic_gw_request_limits;

typedef struct epic_gw_server_params {
  size_t size;                             /* sizeof(epic_gw_server_params) */
  epic_engine *engine;                     /* borrowed; rank 0's engine, driven by run */
  const epic_engine_params *engine_params; /* borrowed; shown by ModelInfo */
  const epic_model_config *config;         /* borrowed; the served model's config */
  const epic_tokenizer *tokenizer;         /* borrowed; NULL = token-id prompts only */
  const char *model_name;                  /* shown by ModelInfo */
  const char *listen;                      /* "host:port"; port 0 picks a free port */
  const char *comm_name;                   /* shown by ModelInfo; NULL = single process */
  int nranks;                              /* workers in the cluster */
  int64_t max_context;                     /* prompt + max_tokens limit (> 0) */
  int64_t kv_tokens_per_worker;            /* KV capacity of one worker in tokens; 0 = unchecked */
  int64_t page_size;          /* KV page size (for the capacity check); 0 = unchecked */
  int64_t default_max_tokens; /* when a request sets none (default 128) */
  int64_t max_request_bytes;  /* larger requests: INVALID_ARGUMENT (default 4 MiB) */
  double drain_timeout;       /* seconds running streams may take after a drain signal */
  const volatile sig_atomic_t *drain_requests; /* borrowed; NULL = drain only on engine failure */
  const epic_gw_security *security;            /* borrowed; NULL = loopback plaintext, no keys */
  epic_gw_request_limits limits;
} epic_gw_server_params;

/* Starts gRPC, binds params->listen and starts listening (calls queue until run).
 * EPIC_ERR_INVALID names a bad field; EPIC_ERR_IO when the address cannot be bound. */
epic_status epic_gw_server_create(const epic_gw_server_params *p, epic_gw_server **out);
/* The bound port (the chosen one when params->listen asked for port 0), and
 * "host:port" with that port. */
int epic_gw_server_port(const epic_gw_server *s);
void epic_gw_server_address(const epic_gw_server *s, char *out, size_t n);
/* Serves until drained (see above). Runs epic_engine_run on a thread of its
 * own and returns after it returned (the other ranks are released by then).
 * Returns EPIC_OK after a drain, or the engine's step error (every stream was
 * ended with UNAVAILABLE/INTERNAL first). Call at most once. */
epic_status epic_gw_server_run(epic_gw_server *s);
/* After run returned and after epic_engine_destroy: the engine's callbacks
 * point into the server until the engine delivered its last on_finish (destroy
 * delivers those still due), and destroy itself never calls the engine. */
void epic_gw_server_destroy(epic_gw_server *s);

typedef struct epic_gw_router_params {
  size_t size;                  /* sizeof(epic_gw_router_params) */
  const char *listen;           /* "host:port"; port 0 picks a free port */
  const char *const *upstreams; /* borrowed; n_upstreams "host:port" targets */
  int n_upstreams;              /* 1..64 */
  double health_interval;       /* seconds between checks of one upstream (default 1) */
  double health_timeout;        /* deadline of one check (default 1) */
  double drain_timeout;         /* seconds forwarded calls may take after a drain signal */
  int64_t max_request_bytes;    /* gRPC receive limit (default 64 MiB) */
  const volatile sig_atomic_t *drain_requests; /* borrowed; NULL = never drains */
  const epic_gw_security *security;            /* borrowed; NULL = loopback plaintext, no keys */
} epic_gw_router_params;

epic_status epic_gw_router_create(const epic_gw_router_params *p, epic_gw_router **out);
int epic_gw_router_port(const epic_gw_router *r);
void epic_gw_router_address(const epic_gw_router *r, char *out, size_t n);
/* Routes until drained. EPIC_OK after a drain. */
epic_status epic_gw_router_run(epic_gw_router *r);
void epic_gw_router_destroy(epic_gw_router *r);

#endif
