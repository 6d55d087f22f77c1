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
#include "coordinator/tokenizer/tokenizer.h"
#include "epic/v1/inference.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"
#include "worker/sampler.h"

#define EPIC_GW_ERR_LEN 512
#define EPIC_GW_MAX_STOPS 16
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
} epic_gw_limits;

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

#endif
