/* epic_auth: who may call the front doors, and how much (DESIGN §6; issue #12).
 *
 * API keys come from a file (--api-keys FILE), one per line:
 *     # a comment; blank lines are skipped
 *     KEY                    a key as clients send it (16..1024 printable bytes, no spaces)
 *     sha256:HEX             the SHA-256 of a key (64 hex digits): the file need not hold
 *                            the secret (`printf %s KEY | sha256sum`)
 *     revoked KEY | revoked sha256:HEX
 *                            a key that is refused with "API key revoked"
 * A client sends `authorization: Bearer KEY` (gRPC metadata or HTTP header). Every
 * key, plain or hashed, is kept only as its SHA-256; the presented key is hashed
 * and compared with every entry in constant time (CRYPTO_memcmp, no early exit),
 * so neither the time taken nor any log line tells anything about a key. Keys are
 * never logged: a key is named by its principal, "key@LINE" (its line in the file).
 * Without a keys file every caller is the one principal "anonymous" (the limits
 * below then apply to all callers together).
 *
 * Per principal: a request-rate token bucket (requests_per_s, burst), a
 * generated-token budget (tokens_per_min, refilled continuously; a request is
 * admitted while the budget is positive, and the tokens it generates are charged
 * afterwards, so one request may take it below zero), and a cap on concurrent
 * streams. A refused request gets EPIC_AUTH_LIMITED with retry_after_ms and a
 * message naming the limit and its flag.
 *
 * One call per request from any front door (gRPC, HTTP):
 *     epic_auth_grant g; epic_auth_result r;
 *     if (epic_auth_admit(a, authorization_value, len, is_stream, &g, &r) != EPIC_AUTH_OK)
 *       -> UNAUTHENTICATED / 401 (EPIC_AUTH_DENIED) or RESOURCE_EXHAUSTED / 429 with
 *          r.retry_after_ms (EPIC_AUTH_LIMITED), r.message as the status text
 *     ... then epic_auth_charge(a, &g, generated_tokens) and epic_auth_release(a, &g)
 *     when the request ends (release is idempotent and NULL-safe).
 *
 * Thread contract: thread-safe (one internal mutex); create and destroy on one
 * thread while no other uses the object. Ownership: params are borrowed for
 * create; destroy is NULL-safe. */
#ifndef EPIC_COORDINATOR_AUTH_H
#define EPIC_COORDINATOR_AUTH_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"

typedef struct epic_auth epic_auth;

typedef struct epic_auth_params {
  size_t size;                 /* sizeof(epic_auth_params) */
  const char *keys_file;       /* NULL: no keys required */
  double requests_per_s;       /* per principal; 0 = unlimited */
  double request_burst;        /* bucket size; 0 = max(1, requests_per_s) */
  double tokens_per_min;       /* generated tokens per principal and minute; 0 = unlimited */
  int64_t max_streams;         /* concurrent streams per principal; 0 = unlimited */
  double (*clock)(void *user); /* seconds; NULL = epic_now_seconds (tests pass their own) */
  void *clock_user;
} epic_auth_params;

typedef enum {
  EPIC_AUTH_OK = 0,
  EPIC_AUTH_DENIED = 1,  /* gRPC UNAUTHENTICATED, HTTP 401 */
  EPIC_AUTH_LIMITED = 2, /* gRPC RESOURCE_EXHAUSTED, HTTP 429 (+ retry_after_ms) */
} epic_auth_verdict;

#define EPIC_AUTH_MSG_LEN 256
#define EPIC_AUTH_MAX_KEY 1024
#define EPIC_AUTH_MIN_KEY 16

/* What an admitted request holds until release. Zero it (or let admit fill it). */
typedef struct epic_auth_grant {
  int principal; /* index + 1; 0 = nothing held */
  int stream;    /* holds a stream slot */
} epic_auth_grant;

typedef struct epic_auth_result {
  epic_auth_verdict verdict;
  int64_t retry_after_ms;          /* EPIC_AUTH_LIMITED: when a retry can succeed */
  char message[EPIC_AUTH_MSG_LEN]; /* for the client; never contains a key */
  char principal[32];              /* "key@LINE", "anonymous" or "-" (for logs) */
} epic_auth_result;

/* Loads the keys file (EPIC_ERR_IO: unreadable; EPIC_ERR_INVALID: a bad line,
 * logged as "FILE:LINE: ..." without the line's text). */
epic_status epic_auth_create(const epic_auth_params *p, epic_auth **out);
void epic_auth_destroy(epic_auth *a);

/* Checks the authorization value (len bytes, "Bearer KEY"; NULL = none sent)
 * and the principal's limits; on EPIC_AUTH_OK takes one request token and, when
 * stream, a stream slot (held in *g until epic_auth_release). r is filled in
 * every case. Never blocks (beyond the mutex). */
epic_auth_verdict epic_auth_admit(epic_auth *a, const char *authorization, size_t len, int stream,
                                  epic_auth_grant *g, epic_auth_result *r);
/* Charges generated tokens to the grant's principal (no-op without a token limit). */
void epic_auth_charge(epic_auth *a, const epic_auth_grant *g, int64_t tokens);
/* Gives the stream slot back; idempotent, NULL-safe for a and g. */
void epic_auth_release(epic_auth *a, epic_auth_grant *g);

/* The internal credential of one process (the gateway's HTTP front calls its
 * own router, which must not admit and count the same client twice): a random
 * 256-bit token, made once, that is_internal recognises in constant time.
 * The HTTP front sends it as `x-epic-internal` metadata over a private unix
 * socket; the router never forwards it. Writes 64 hex digits + NUL into out
 * (n >= 65). EPIC_ERR_IO when no randomness is available. Not thread-safe
 * against admit: call before serving starts. */
epic_status epic_auth_make_internal(epic_auth *a, char *out, size_t n);
/* 1 when tok (n bytes) is the token of epic_auth_make_internal. */
int epic_auth_is_internal(epic_auth *a, const char *tok, size_t n);

/* Settings, for ModelInfo and start-up lines (NULL a: all zero). */
int epic_auth_keys_required(const epic_auth *a);
int epic_auth_n_keys(const epic_auth *a); /* active (not revoked) keys */
int epic_auth_counts_tokens(const epic_auth *a);
void epic_auth_get_params(const epic_auth *a, epic_auth_params *out);

/* Plaintext policy of a listening address (any front door): 1 when `listen`
 * ("host:port", "[v6]:port", "unix:...") stays on this machine (loopback or a
 * unix socket). */
int epic_listen_is_local(const char *listen);
/* EPIC_ERR_INVALID (message "<who>: ..." on stderr) when listening without TLS
 * on a non-local address without `plaintext`; a warning when plaintext is
 * allowed there; EPIC_OK otherwise. flag names the listen option in messages. */
epic_status epic_listen_check_plaintext(const char *who, const char *flag, const char *listen,
                                        int tls, int plaintext);

#endif
