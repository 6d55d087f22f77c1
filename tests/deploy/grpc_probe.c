/* epic-grpc-probe: the smallest gRPC client of `epic serve` (gRPC C core + the project's
 * protobuf-c messages): grpc.health.v1.Health/Check, then one greedy Generate of token
 * ids, printed as one JSON line {"health":"SERVING","output_ids":[...],"finish_reason":
 * "length"|"stop","text":"..."}. deploy/bundle.sh ships it in the offline bundle so that a
 * GPU node with no gRPC installed can check the bundled server (deploy/bundle_smoke.sh);
 * the deploy tests use it to check a server through the bundle's own gRPC libraries.
 *
 * usage: epic-grpc-probe HOST:PORT [--prompt-ids 0,17,5] [--max-tokens N] [--timeout S]
 *                                  [--health-only]
 * Exit 0 when the server is SERVING and (unless --health-only) the stream finished; else
 * 1 with one line on stderr naming the address, the method and gRPC's status. */
#include <errno.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/status.h"
#include "epic/v1/inference.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"

#define PROBE_MAX_IDS 4096

typedef struct probe_opts {
  const char *target;
  int32_t ids[PROBE_MAX_IDS];
  size_t n_ids;
  int32_t max_tokens;
  double timeout_s;
  int health_only;
} probe_opts;

/* What a Generate stream delivered. Owned by the caller; free with result_free. */
typedef struct probe_result {
  int32_t *ids;
  size_t n_ids, cap_ids;
  char *text;
  size_t n_text, cap_text;
  Epic__V1__FinishReason finish;
} probe_result;

typedef epic_status (*on_message_fn)(void *user, const uint8_t *data, size_t len);

static void result_free(probe_result *r) {
  free(r->ids);
  free(r->text);
}

static epic_status parse_ids(const char *s, probe_opts *o) {
  const char *p = s;
  while (*p) {
    char *end = NULL;
    errno = 0;
    long v = strtol(p, &end, 10);
    if (end == p || errno || v < 0 || v > INT32_MAX || (*end && *end != ',')) {
      EPIC_LOG_ERROR("epic-grpc-probe: --prompt-ids: item %zu of '%s' is not a token id", o->n_ids + 1, s);
      return EPIC_ERR_INVALID;
    }
    if (o->n_ids == PROBE_MAX_IDS) {
      EPIC_LOG_ERROR("epic-grpc-probe: --prompt-ids: more than %d ids", PROBE_MAX_IDS);
      return EPIC_ERR_INVALID;
    }
    o->ids[o->n_ids++] = (int32_t)v;
    p = *end ? end + 1 : end;
  }
  if (o->n_ids == 0) {
    EPIC_LOG_ERROR("epic-grpc-probe: --prompt-ids: empty list");
    return EPIC_ERR_INVALID;
  }
  return EPIC_OK;
}

static epic_status parse(int argc, char **argv, probe_opts *o) {
  memset(o, 0, sizeof *o);
  o->max_tokens = 8;
  o->timeout_s = 60;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    const int has_val = i + 1 < argc;
    if (strcmp(a, "--prompt-ids") == 0 && has_val) {
      EPIC_CHECK(parse_ids(argv[++i], o));
    } else if (strcmp(a, "--max-tokens") == 0 && has_val) {
      char *end = NULL;
      long v = strtol(argv[++i], &end, 10);
      if (*end || v < 1 || v > INT32_MAX) {
        EPIC_LOG_ERROR("epic-grpc-probe: --max-tokens: expected a positive integer, got '%s'", argv[i]);
        return EPIC_ERR_INVALID;
      }
      o->max_tokens = (int32_t)v;
    } else if (strcmp(a, "--timeout") == 0 && has_val) {
      char *end = NULL;
      o->timeout_s = strtod(argv[++i], &end);
      if (*end || !(o->timeout_s > 0)) {
        EPIC_LOG_ERROR("epic-grpc-probe: --timeout: expected seconds > 0, got '%s'", argv[i]);
        return EPIC_ERR_INVALID;
      }
    } else if (strcmp(a, "--health-only") == 0) {
      o->health_only = 1;
    } else if (a[0] != '-' && !o->target) {
      o->target = a;
    } else {
      EPIC_LOG_ERROR("epic-grpc-probe: unexpected argument '%s' (usage: epic-grpc-probe HOST:PORT "
                     "[--prompt-ids IDS] [--max-tokens N] [--timeout S] [--health-only])", a);
      return EPIC_ERR_INVALID;
    }
  }
  if (!o->target) {
    EPIC_LOG_ERROR("epic-grpc-probe: HOST:PORT is required");
    return EPIC_ERR_INVALID;
  }
  if (o->n_ids == 0) { /* the fixture models' BOS and two ordinary ids */
    o->ids[0] = 0;
    o->ids[1] = 10;
    o->ids[2] = 20;
    o->n_ids = 3;
  }
  return EPIC_OK;
}

/* Waits for one batch; the tag is the batch's own address, so plucking it is exact. */
static epic_status run_batch(grpc_call *call, grpc_completion_queue *cq, const grpc_op *ops, size_t n,
                             gpr_timespec deadline, const char *what) {
  void *tag = (void *)ops;
  grpc_call_error e = grpc_call_start_batch(call, ops, n, tag, NULL);
  if (e != GRPC_CALL_OK) {
    EPIC_LOG_ERROR("epic-grpc-probe: %s: grpc_call_start_batch failed (%d)", what, (int)e);
    return EPIC_ERR_COMM;
  }
  grpc_event ev = grpc_completion_queue_pluck(cq, tag, deadline, NULL);
  if (ev.type != GRPC_OP_COMPLETE) {
    EPIC_LOG_ERROR("epic-grpc-probe: %s: no answer before the deadline", what);
    grpc_call_cancel(call, NULL);
    /* The batch still owns the call's buffers until it completes. */
    grpc_completion_queue_pluck(cq, tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    return EPIC_ERR_TIMEOUT;
  }
  return EPIC_OK;
}

/* One call of `method` with one request message; every response message goes to
 * on_message in order. Errors name the target, the method and gRPC's status. */
static epic_status call_method(grpc_channel *ch, grpc_completion_queue *cq, const char *target, const char *method,
                               const uint8_t *req, size_t req_len, double timeout_s, on_message_fn on_message,
                               void *user) {
  gpr_timespec deadline =
      gpr_time_add(gpr_now(GPR_CLOCK_REALTIME), gpr_time_from_millis((int64_t)(timeout_s * 1000), GPR_TIMESPAN));
  grpc_slice mslice = grpc_slice_from_static_string(method);
  grpc_call *call = grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, mslice, NULL, deadline, NULL);
  grpc_slice_unref(mslice);
  if (!call) {
    EPIC_LOG_ERROR("epic-grpc-probe: %s %s: cannot create the call", target, method);
    return EPIC_ERR_COMM;
  }
  epic_status st = EPIC_OK;
  grpc_metadata_array initial_md, trailing_md;
  grpc_metadata_array_init(&initial_md);
  grpc_metadata_array_init(&trailing_md);
  grpc_slice s = grpc_slice_from_copied_buffer((const char *)req, req_len);
  grpc_byte_buffer *send_bb = grpc_raw_byte_buffer_create(&s, 1);
  grpc_slice_unref(s);
  grpc_byte_buffer *recv_bb = NULL;
  grpc_status_code code = GRPC_STATUS_UNKNOWN;
  grpc_slice details = grpc_empty_slice();

  grpc_op ops[4];
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = send_bb;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[3].data.recv_initial_metadata.recv_initial_metadata = &initial_md;
  EPIC_CHECK_GOTO(run_batch(call, cq, ops, 4, deadline, method), st, done);

  for (;;) {
    grpc_op rop;
    memset(&rop, 0, sizeof rop);
    rop.op = GRPC_OP_RECV_MESSAGE;
    rop.data.recv_message.recv_message = &recv_bb;
    EPIC_CHECK_GOTO(run_batch(call, cq, &rop, 1, deadline, method), st, done);
    if (!recv_bb) break; /* end of the stream */
    grpc_byte_buffer_reader reader;
    if (!grpc_byte_buffer_reader_init(&reader, recv_bb)) {
      EPIC_LOG_ERROR("epic-grpc-probe: %s %s: unreadable response message", target, method);
      st = EPIC_ERR_IO;
      goto done;
    }
    grpc_slice all = grpc_byte_buffer_reader_readall(&reader);
    grpc_byte_buffer_reader_destroy(&reader);
    grpc_byte_buffer_destroy(recv_bb);
    recv_bb = NULL;
    st = on_message(user, GRPC_SLICE_START_PTR(all), GRPC_SLICE_LENGTH(all));
    grpc_slice_unref(all);
    if (st < 0) goto done;
  }

  grpc_op sop;
  memset(&sop, 0, sizeof sop);
  sop.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  sop.data.recv_status_on_client.trailing_metadata = &trailing_md;
  sop.data.recv_status_on_client.status = &code;
  sop.data.recv_status_on_client.status_details = &details;
  EPIC_CHECK_GOTO(run_batch(call, cq, &sop, 1, deadline, method), st, done);
  if (code != GRPC_STATUS_OK) {
    char *msg = grpc_slice_to_c_string(details);
    EPIC_LOG_ERROR("epic-grpc-probe: %s %s: gRPC status %d: %s", target, method, (int)code, msg);
    gpr_free(msg);
    st = EPIC_ERR_COMM;
  }

done:
  if (recv_bb) grpc_byte_buffer_destroy(recv_bb);
  grpc_byte_buffer_destroy(send_bb);
  grpc_slice_unref(details);
  grpc_metadata_array_destroy(&initial_md);
  grpc_metadata_array_destroy(&trailing_md);
  grpc_call_unref(call);
  return st;
}

static epic_status on_health(void *user, const uint8_t *data, size_t len) {
  int *serving = user;
  Grpc__Health__V1__HealthCheckResponse *r = grpc__health__v1__health_check_response__unpack(NULL, len, data);
  if (!r) {
    EPIC_LOG_ERROR("epic-grpc-probe: Health/Check: malformed HealthCheckResponse (%zu bytes)", len);
    return EPIC_ERR_IO;
  }
  *serving = r->status == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
  grpc__health__v1__health_check_response__free_unpacked(r, NULL);
  return EPIC_OK;
}

static epic_status grow(void **p, size_t *cap, size_t need, size_t elem) {
  if (need <= *cap) return EPIC_OK;
  size_t c = *cap ? *cap : 64;
  while (c < need) c *= 2;
  void *q = realloc(*p, c * elem);
  if (!q) return EPIC_ERR_NOMEM;
  *p = q;
  *cap = c;
  return EPIC_OK;
}

static epic_status on_generate(void *user, const uint8_t *data, size_t len) {
  probe_result *res = user;
  epic_status st = EPIC_OK;
  Epic__V1__GenerateResponse *r = epic__v1__generate_response__unpack(NULL, len, data);
  if (!r) {
    EPIC_LOG_ERROR("epic-grpc-probe: Generate: malformed GenerateResponse (%zu bytes)", len);
    return EPIC_ERR_IO;
  }
  size_t tl = r->text ? strlen(r->text) : 0;
  EPIC_CHECK_GOTO(grow((void **)&res->ids, &res->cap_ids, res->n_ids + r->n_token_ids, sizeof *res->ids), st, out);
  EPIC_CHECK_GOTO(grow((void **)&res->text, &res->cap_text, res->n_text + tl + 1, 1), st, out);
  if (r->n_token_ids) memcpy(res->ids + res->n_ids, r->token_ids, r->n_token_ids * sizeof *res->ids);
  res->n_ids += r->n_token_ids;
  if (tl) memcpy(res->text + res->n_text, r->text, tl);
  res->n_text += tl;
  res->text[res->n_text] = '\0';
  if (r->finish_reason != EPIC__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED) res->finish = r->finish_reason;
out:
  if (st == EPIC_ERR_NOMEM) EPIC_LOG_ERROR("epic-grpc-probe: Generate: out of memory");
  epic__v1__generate_response__free_unpacked(r, NULL);
  return st;
}

/* JSON string body: quotes, backslashes and control bytes escaped, UTF-8 passed through. */
static void print_json_string(const char *s, size_t n) {
  putchar('"');
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '"' || c == '\\') printf("\\%c", c);
    else if (c == '\n') fputs("\\n", stdout);
    else if (c < 0x20) printf("\\u%04x", c);
    else putchar(c);
  }
  putchar('"');
}

int main(int argc, char **argv) {
  probe_opts o;
  probe_result res;
  memset(&res, 0, sizeof res);
  epic_log_init(EPIC_LOG_LEVEL_WARN, -1);
  if (parse(argc, argv, &o) != EPIC_OK) return 2;

  grpc_init();
  epic_status st = EPIC_OK;
  grpc_channel_credentials *creds = grpc_insecure_credentials_create();
  grpc_channel *ch = grpc_channel_create(o.target, creds, NULL);
  grpc_channel_credentials_release(creds);
  grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
  uint8_t *req = NULL;

  int serving = 0;
  Grpc__Health__V1__HealthCheckRequest hreq = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
  size_t hlen = grpc__health__v1__health_check_request__get_packed_size(&hreq);
  uint8_t hbuf[64];
  if (hlen > sizeof hbuf) {
    st = EPIC_ERR_INVALID;
    goto out;
  }
  grpc__health__v1__health_check_request__pack(&hreq, hbuf);
  EPIC_CHECK_GOTO(call_method(ch, cq, o.target, "/grpc.health.v1.Health/Check", hbuf, hlen, o.timeout_s, on_health,
                              &serving),
                  st, out);
  if (!serving) {
    EPIC_LOG_ERROR("epic-grpc-probe: %s: Health/Check answered, but not SERVING", o.target);
    st = EPIC_ERR_COMM;
    goto out;
  }
  if (!o.health_only) {
    Epic__V1__TokenIds tids = EPIC__V1__TOKEN_IDS__INIT;
    tids.n_ids = o.n_ids;
    tids.ids = o.ids;
    Epic__V1__Prompt prompt = EPIC__V1__PROMPT__INIT;
    prompt.kind_case = EPIC__V1__PROMPT__KIND_TOKEN_IDS;
    prompt.token_ids = &tids;
    Epic__V1__SamplingParams sp = EPIC__V1__SAMPLING_PARAMS__INIT;
    sp.max_tokens_present_case = EPIC__V1__SAMPLING_PARAMS__MAX_TOKENS_PRESENT_MAX_TOKENS;
    sp.max_tokens = o.max_tokens;
    sp.ignore_eos = 1;
    Epic__V1__GenerateRequest greq = EPIC__V1__GENERATE_REQUEST__INIT;
    greq.prompt = &prompt;
    greq.sampling = &sp;
    greq.request_id = "epic-grpc-probe";
    size_t glen = epic__v1__generate_request__get_packed_size(&greq);
    req = malloc(glen ? glen : 1);
    if (!req) {
      st = EPIC_ERR_NOMEM;
      goto out;
    }
    epic__v1__generate_request__pack(&greq, req);
    EPIC_CHECK_GOTO(call_method(ch, cq, o.target, "/epic.v1.Inference/Generate", req, glen, o.timeout_s,
                                on_generate, &res),
                    st, out);
    if (res.finish == EPIC__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED) {
      EPIC_LOG_ERROR("epic-grpc-probe: %s: the Generate stream ended without a finish_reason", o.target);
      st = EPIC_ERR_IO;
      goto out;
    }
  }

  printf("{\"target\":");
  print_json_string(o.target, strlen(o.target));
  printf(",\"health\":\"SERVING\"");
  if (!o.health_only) {
    printf(",\"output_ids\":[");
    for (size_t i = 0; i < res.n_ids; i++) printf("%s%d", i ? "," : "", (int)res.ids[i]);
    printf("],\"finish_reason\":\"%s\",\"text\":",
           res.finish == EPIC__V1__FINISH_REASON__FINISH_REASON_LENGTH ? "length" : "stop");
    print_json_string(res.text ? res.text : "", res.n_text);
  }
  printf("}\n");

out:
  free(req);
  result_free(&res);
  grpc_completion_queue_shutdown(cq);
  while (grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type != GRPC_QUEUE_SHUTDOWN) {
  }
  grpc_completion_queue_destroy(cq);
  grpc_channel_destroy(ch);
  grpc_shutdown();
  return st == EPIC_OK ? 0 : 1;
}
