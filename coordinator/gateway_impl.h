/* Internals shared by the gateway's server and router (coordinator/gateway.h):
 * request validation and prompt encoding, stop-string matching on streamed
 * text, and small gRPC / protobuf-c helpers. Not a public interface.
 *
 * The request and stop-string parts are pure (no gRPC, no engine) so that unit
 * tests can reach every INVALID_ARGUMENT case and the stop-string hold-back.
 * Thread contract: thread-compatible (one thread per object); the functions
 * keep no state of their own. */
#ifndef EPIC_COORDINATOR_GATEWAY_IMPL_H
#define EPIC_COORDINATOR_GATEWAY_IMPL_H

#include <grpc/grpc.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "coordinator/gateway.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "epic/v1/inference.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"
#include "worker/sampler.h"

#define EPIC_GW_ERR_LEN 512
#define EPIC_GW_MAX_STOPS 16
#define EPIC_GW_DEFAULT_MAX_N 16
#define EPIC_GW_DEFAULT_MAX_TOP_LOGPROBS 20
#define EPIC_GW_MAX_STOP_LEN 256
#define EPIC_GW_MAX_STOP_IDS 64

/* Method paths, as gRPC writes them on the wire. */
#define EPIC_GW_PATH_GENERATE "/epic.v1.Inference/Generate"
#define EPIC_GW_PATH_TOKENIZE "/epic.v1.Inference/Tokenize"
#define EPIC_GW_PATH_MODELINFO "/epic.v1.Inference/ModelInfo"
#define EPIC_GW_PATH_HEALTH "/grpc.health.v1.Health/Check"
#define EPIC_GW_SERVICE "epic.v1.Inference"

/* ---- growable byte buffer ------------------------------------------------------ */

typedef struct epic_gw_buf {
  char *p;
  size_t n, cap;
} epic_gw_buf;

epic_status epic_gw_buf_append(epic_gw_buf *b, const void *data, size_t n);
void epic_gw_buf_free(epic_gw_buf *b);

/* ---- request validation ---------------------------------------------------------- */

/* What a request is checked against. */
typedef struct epic_gw_limits {
  const epic_tokenizer *tok;  /* NULL: text and chat prompts are refused */
  int64_t vocab_size;         /* the model's */
  int64_t max_context;        /* prompt + max_tokens */
  int64_t default_max_tokens; /* when sampling.max_tokens is absent */
  int64_t kv_tokens;          /* KV capacity of one worker in tokens; 0 = unchecked */
  int64_t page_size;          /* its page size (capacity is counted in whole pages) */
  epic_gw_request_limits req; /* client-controlled sizes (gateway.h; 0 = default) */
} epic_gw_limits;

/* The limits in force: req with every 0 replaced by its default. */
epic_gw_request_limits epic_gw_limits_effective(const epic_gw_request_limits *req);
/* For front doors whose API has them (HTTP/OpenAI `n`, `top_logprobs`):
 * EPIC_ERR_INVALID with err naming the field and the flag when n or
 * top_logprobs exceeds the limit (n_field/lp_field: the names in that API). */
epic_status epic_gw_check_choices(int64_t n, const char *n_field, int64_t top_logprobs,
                                  const char *lp_field, const epic_gw_limits *lim,
                                  char err[EPIC_GW_ERR_LEN]);

/* Stop strings copied out of a request. */
typedef struct epic_gw_stops {
  char **s;
  size_t *len;
  int n;
} epic_gw_stops;

/* A validated Generate request, owning its arrays. */
typedef struct epic_gw_job {
  int32_t *prompt;
  int64_t n_prompt;
  int64_t max_tokens;
  epic_sampling_params sampling;
  int ignore_eos, logprobs, skip_special;
  int32_t *stop_ids;
  int n_stop_ids;
  epic_gw_stops stops;
} epic_gw_job;

/* Prompt -> token ids. text: encoded (BOS unless no_bos); chat: rendered with
 * the template and encoded (*rendered receives the text when not NULL); token_ids:
 * copied after checking every id against the vocabulary. *ids is malloc'd (free()).
 * EPIC_ERR_INVALID with err ("prompt.text: empty", ...) for a bad prompt;
 * EPIC_ERR_NOMEM. */
epic_status epic_gw_encode_prompt(const Epic__V1__Prompt *p, const epic_gw_limits *lim,
                                  int32_t **ids, int64_t *n, char **rendered, size_t *rendered_len,
                                  char err[EPIC_GW_ERR_LEN]);
/* Validates a whole GenerateRequest (prompt, every sampling field, context and
 * KV capacity) into *job (zeroed first; release with epic_gw_job_clear also on
 * error). EPIC_ERR_INVALID with err naming the field; EPIC_ERR_NOMEM. */
epic_status epic_gw_prepare(const Epic__V1__GenerateRequest *rq, const epic_gw_limits *lim,
                            epic_gw_job *job, char err[EPIC_GW_ERR_LEN]);
void epic_gw_job_clear(epic_gw_job *job);

/* ---- stop strings on streamed text -------------------------------------------- */

/* Holds back the tail of the text that could still become a stop string, and
 * cuts the text before the first stop string that completes. The text passed in
 * is whole UTF-8 characters (as epic_detok hands out), so what is released is
 * too. */
typedef struct epic_gw_stopper {
  const epic_gw_stops *stops; /* borrowed; NULL or n == 0: everything passes */
  epic_gw_buf held;
  int matched; /* index of the stop string found, or -1 */
} epic_gw_stopper;

void epic_gw_stopper_init(epic_gw_stopper *st, const epic_gw_stops *stops);
/* Appends text; moves to out what can no longer be part of a stop string. Once
 * a stop string matched (st->matched >= 0), out ends right before it and later
 * input is dropped. */
epic_status epic_gw_stopper_push(epic_gw_stopper *st, const char *text, size_t n, epic_gw_buf *out);
/* End of text: releases the held tail (nothing after a match). */
epic_status epic_gw_stopper_finish(epic_gw_stopper *st, epic_gw_buf *out);
void epic_gw_stopper_free(epic_gw_stopper *st);

/* ---- gRPC / protobuf-c helpers -------------------------------------------------- */

/* A tag handed to grpc_call_start_batch: the completion queue gives it back, and
 * kind says what completed. Tags are embedded in objects that outlive the op. */
typedef struct epic_gw_tag {
  int kind;
  void *obj;
} epic_gw_tag;

/* Packs a message into a new byte buffer (grpc_byte_buffer_destroy it), or NULL. */
grpc_byte_buffer *epic_gw_pack(const ProtobufCMessage *m);
/* Like epic_gw_pack, plus the string field `field` (left empty in m) set to the
 * n bytes of text: protobuf-c packs strings up to their first NUL, generated
 * text may contain U+0000, and a field appended after the others is the same
 * message on the wire. */
grpc_byte_buffer *epic_gw_pack_text(const ProtobufCMessage *m, uint32_t field, const char *text,
                                    size_t n);
/* Unpacks a byte buffer (not consumed); NULL for malformed bytes. */
ProtobufCMessage *epic_gw_unpack(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *bb);
/* A byte buffer holding a copy of bb's bytes (bb is left as it was). */
grpc_byte_buffer *epic_gw_copy(grpc_byte_buffer *bb);
/* Host part of "host:port" + ":" + port (for the start-up line). */
void epic_gw_format_addr(const char *listen, int port, char *out, size_t n);
/* gpr deadline `seconds` from now on the realtime clock. */
gpr_timespec epic_gw_deadline(double seconds);

/* ---- the gRPC server side of `epic serve` and `epic gateway` ---------------------- */

/* Methods served; gRPC registers all but EPIC_GW_M_UNKNOWN, which catches the rest. */
enum {
  EPIC_GW_M_GENERATE,
  EPIC_GW_M_TOKENIZE,
  EPIC_GW_M_MODELINFO,
  EPIC_GW_M_HEALTH,
  EPIC_GW_M_UNKNOWN,
  EPIC_GW_M_COUNT
};
/* Wire paths of the registered methods, by EPIC_GW_M_*. */
extern const char *const epic_gw_method_paths[EPIC_GW_M_UNKNOWN];
/* The wire path of method, or unknown_path for EPIC_GW_M_UNKNOWN. */
const char *epic_gw_method_name(int method, const char *unknown_path);

/* Tag kinds of the front's own completions; a user numbers its kinds from
 * EPIC_GW_TAG_USER on, so one handler can switch over all of them. */
enum { EPIC_GW_TAG_NEW = 1, EPIC_GW_TAG_SHUTDOWN, EPIC_GW_TAG_USER };

/* Calls of one method that gRPC may hand over at once; more wait in the core. */
#define EPIC_GW_LISTENERS 8

/* A request for the next call of one method (tag kind EPIC_GW_TAG_NEW, obj = it). */
typedef struct epic_gw_listener {
  epic_gw_tag tag;
  int method, armed;
  grpc_call *call;
  gpr_timespec deadline;
  grpc_metadata_array md;
  grpc_byte_buffer *payload;
  grpc_call_details details; /* EPIC_GW_M_UNKNOWN only */
} epic_gw_listener;

/* The `authorization` metadata of an accepted call (the value, copied). */
typedef struct epic_gw_authz {
  char value[EPIC_AUTH_MAX_KEY + 64];
  size_t len;  /* 0: none sent */
  int present; /* sent (possibly too long: then len == 0 and too_long) */
  int too_long;
  char internal[72]; /* `x-epic-internal` (auth.h: epic_auth_make_internal), never forwarded */
  size_t internal_len;
} epic_gw_authz;

/* The listening side: server, completion queue and listeners. Owned and
 * driven by the completion-queue thread of its user; log ("serve",
 * "gateway") leads every message. */
typedef struct epic_gw_front {
  const char *log;
  grpc_server *srv;
  grpc_completion_queue *cq;
  int port, started;
  void *methods[EPIC_GW_M_UNKNOWN];
  epic_gw_listener listeners[EPIC_GW_M_COUNT][EPIC_GW_LISTENERS];
  epic_gw_tag t_shutdown; /* kind EPIC_GW_TAG_SHUTDOWN, obj = the front */
  int shutdown_started, shutdown_done, cancel_all_done;
} epic_gw_front;

/* Handles one completed event (ev.type == GRPC_OP_COMPLETE) for its user. */
typedef void (*epic_gw_handler)(void *user, grpc_event ev);
/* Whether the user still has calls that gRPC must complete. */
typedef int (*epic_gw_busy_fn)(const void *user);

/* Zeroes fr and creates its completion queue (after grpc_init). */
void epic_gw_front_init(epic_gw_front *fr, const char *log);
/* Creates the server with gRPC's receive cap set to recv_cap bytes (clamped
 * to INT_MAX), registers the methods, listens on `listen` (TLS per sec, which
 * may be NULL: plaintext), starts and arms every listener. EPIC_ERR_INVALID
 * for plaintext on a non-local address without sec->plaintext or an
 * unreadable PEM file; EPIC_ERR_IO (logged) when the address cannot be bound;
 * the user then tears down as usual (srv possibly set, started 0). */
epic_status epic_gw_front_listen(epic_gw_front *fr, const char *listen, int64_t recv_cap,
                                 const epic_gw_security *sec);
/* Client credentials for upstream channels per sec (NULL or no upstream_ca:
 * insecure); NULL after a logged error. Release with grpc_channel_credentials_release. */
grpc_channel_credentials *epic_gw_upstream_credentials(const epic_gw_security *sec);
/* Reads a whole file (PEM) into a NUL-terminated malloc'd string; NULL after
 * logging "<flag> FILE: why". */
char *epic_gw_read_pem(const char *flag, const char *path);
/* A listener's call arrived (ok = ev.success): takes the call and its request
 * message out of l (both owned by the caller then; payload may be NULL), puts
 * the method path of an unregistered call in method, and re-arms l unless
 * shutdown started. Returns 0 when there is no call to serve (nothing owned). */
int epic_gw_front_accept(epic_gw_front *fr, epic_gw_listener *l, int ok, grpc_call **call,
                         grpc_byte_buffer **payload, char *method, size_t method_len,
                         epic_gw_authz *authz);
/* The auth check of a call (any method but Health) with `authz`: EPIC_AUTH_OK
 * or the verdict, with r filled (a NULL auth admits everyone). */
epic_auth_verdict epic_gw_admit(epic_auth *auth, const epic_gw_authz *authz, int stream,
                                epic_auth_grant *g, epic_auth_result *r);
/* Starts the server shutdown once (its tag sets shutdown_done). */
void epic_gw_front_shutdown(epic_gw_front *fr);
/* Cancels every call and cuts client connections, once; after shutdown. */
void epic_gw_front_cancel_all(epic_gw_front *fr);
/* Waits up to `until` for an event, then handles events while any is ready. */
void epic_gw_front_poll(epic_gw_front *fr, gpr_timespec until, epic_gw_handler handle, void *user);
/* Handles events until the shutdown tag came and busy(user) is 0 (or the queue
 * shut down), logging every second of waiting. */
void epic_gw_front_wait(epic_gw_front *fr, epic_gw_busy_fn busy, epic_gw_handler handle,
                        void *user);
/* Shuts the completion queue down and handles what is left in it (the queue
 * is still to be destroyed, after the server). */
void epic_gw_front_drain_cq(epic_gw_front *fr, epic_gw_handler handle, void *user);

/* The server side of one call: what both the server and the router do with
 * the client's call. Completion-queue thread only. A call may be unref'd only
 * when closed and pending == 0 (RECIPES.md §1). */
typedef struct epic_gw_down {
  grpc_call *call;
  const char *log;     /* message lead for a failed batch */
  epic_gw_tag t_close; /* RECV_CLOSE_ON_SERVER */
  epic_gw_tag t_send;  /* every send batch */
  int pending;         /* batches started and not yet completed */
  int cancelled;       /* RECV_CLOSE_ON_SERVER out-param */
  int closed;          /* RECV_CLOSE completed: the call is over for gRPC */
  int md_sent, send_busy, status_started;
  grpc_byte_buffer *send_bb; /* the message in flight, destroyed when it completes */
} epic_gw_down;

void epic_gw_down_init(epic_gw_down *d, grpc_call *call, const char *log, int close_kind,
                       int send_kind, void *obj);
/* Starts RECV_CLOSE_ON_SERVER; -1 (logged) when gRPC refuses. */
int epic_gw_down_recv_close(epic_gw_down *d);
/* Sends bb (owned from here on), with the initial metadata the first time.
 * -1 when gRPC refuses: send_busy is cleared and the call cancelled. */
int epic_gw_down_send(epic_gw_down *d, grpc_byte_buffer *bb);
/* Sends an optional last message (owned from here on) and the final status in
 * one batch; on failure the call is cancelled. */
void epic_gw_down_finish(epic_gw_down *d, grpc_status_code code, const char *details,
                         grpc_byte_buffer *msg);
/* epic_gw_down_finish with trailing metadata (copied by gRPC). */
void epic_gw_down_finish_md(epic_gw_down *d, grpc_status_code code, const char *details,
                            grpc_byte_buffer *msg, const grpc_metadata *trail, size_t n_trail);
/* Ends a call refused by epic_gw_admit: UNAUTHENTICATED, or RESOURCE_EXHAUSTED
 * with trailing metadata retry-after-ms. */
void epic_gw_down_refuse(epic_gw_down *d, const epic_auth_result *r);
/* Bookkeeping of a completed t_close / t_send. */
void epic_gw_down_on_close(epic_gw_down *d);
void epic_gw_down_on_send(epic_gw_down *d);

#endif
