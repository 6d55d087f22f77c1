/* The gRPC backend of the HTTP front (coordinator/http.h) for `epic gateway`:
 * every generation is an epic.v1.Inference/Generate call to the gateway's own
 * gRPC port, so the router's upstream choice, health checks and retries apply
 * unchanged. One thread per generation reads the stream (blocking pluck
 * queue of its own) and posts to the sink; cancel is grpc_call_cancel, which
 * gRPC allows from any thread. */
#define _GNU_SOURCE
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "coordinator/gateway_impl.h"
#include "coordinator/http.h"
#include "coordinator/reasoning.h"

typedef struct ub {
  char *target;
  char *internal; /* x-epic-internal token, or NULL */
  grpc_channel *ch;
  pthread_mutex_t mu;
  char model[256]; /* from ModelInfo, once known */
} ub;

typedef struct ug {
  ub *b;
  epic_http_sink *sink;
  grpc_completion_queue *cq;
  grpc_call *call;
  pthread_t th;
  int th_started, logprobs;
  grpc_byte_buffer *send_bb;
  grpc_metadata_array md, trail;
} ug;

static grpc_event pluck(grpc_completion_queue *cq, void *tag) {
  return grpc_completion_queue_pluck(cq, tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
}

/* A blocking unary call (Tokenize, ModelInfo) with a deadline; the response
 * message or NULL. */
/* The metadata of a call: the internal token and the client's authorization
 * (slices referring to b and authz: valid while both are). Returns the count. */
static size_t call_md(const ub *b, const char *authz, size_t authz_len, grpc_metadata md[2]) {
  size_t n = 0;
  memset(md, 0, 2 * sizeof *md);
  if (b->internal) {
    md[n].key = grpc_slice_from_static_string("x-epic-internal");
    md[n++].value = grpc_slice_from_static_string(b->internal);
  }
  if (authz && authz_len) {
    md[n].key = grpc_slice_from_static_string("authorization");
    md[n++].value = grpc_slice_from_copied_buffer(authz, authz_len);
  }
  return n;
}

static void call_md_free(grpc_metadata *md, size_t n) {
  for (size_t i = 0; i < n; i++)
    grpc_slice_unref(md[i].value);
}

static ProtobufCMessage *unary(ub *b, const char *path, const ProtobufCMessage *rq,
                               const ProtobufCMessageDescriptor *rd, double seconds,
                               const char *authz, size_t authz_len) {
  grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
  grpc_call *call = grpc_channel_create_call(b->ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq,
                                             grpc_slice_from_static_string(path), NULL,
                                             epic_gw_deadline(seconds), NULL);
  grpc_byte_buffer *send = epic_gw_pack(rq), *recv = NULL;
  grpc_metadata_array md, trail;
  grpc_metadata_array_init(&md);
  grpc_metadata_array_init(&trail);
  grpc_status_code status = GRPC_STATUS_UNKNOWN;
  grpc_slice details = grpc_empty_slice();
  grpc_op ops[6];
  memset(ops, 0, sizeof ops);
  grpc_metadata cmd[2];
  size_t n_cmd = call_md(b, authz, authz_len, cmd);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[0].data.send_initial_metadata.count = n_cmd;
  ops[0].data.send_initial_metadata.metadata = n_cmd ? cmd : NULL;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = send;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[3].data.recv_initial_metadata.recv_initial_metadata = &md;
  ops[4].op = GRPC_OP_RECV_MESSAGE;
  ops[4].data.recv_message.recv_message = &recv;
  ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  ops[5].data.recv_status_on_client.trailing_metadata = &trail;
  ops[5].data.recv_status_on_client.status = &status;
  ops[5].data.recv_status_on_client.status_details = &details;
  ProtobufCMessage *out = NULL;
  int tag;
  if (call && send && grpc_call_start_batch(call, ops, 6, &tag, NULL) == GRPC_CALL_OK) {
    grpc_event ev = pluck(cq, &tag);
    if (ev.success && status == GRPC_STATUS_OK && recv)
      out = epic_gw_unpack(rd, recv);
  }
  call_md_free(cmd, n_cmd);
  if (recv)
    grpc_byte_buffer_destroy(recv);
  if (send)
    grpc_byte_buffer_destroy(send);
  grpc_slice_unref(details);
  grpc_metadata_array_destroy(&md);
  grpc_metadata_array_destroy(&trail);
  if (call)
    grpc_call_unref(call);
  grpc_completion_queue_shutdown(cq);
  while (grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
         GRPC_QUEUE_SHUTDOWN)
    ;
  grpc_completion_queue_destroy(cq);
  return out;
}

/* Builds the Prompt of q into p (pointers into q and the malloc'd arrays *msgs). */
static int build_prompt(const epic_http_gen *q, Epic__V1__Prompt *p, Epic__V1__Chat *chat,
                        Epic__V1__ChatMessage **msgs, Epic__V1__ChatMessage *items, char **joined,
                        int n_items, Epic__V1__TokenIds *ids) {
  if (q->messages) {
    int i = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, q->messages) {
      if (i == n_items)
        return -1;
      epic__v1__chat_message__init(&items[i]);
      const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
      const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
      items[i].role = role->valuestring;
      if (cJSON_IsString(content)) {
        items[i].content = content->valuestring;
      } else if (cJSON_IsArray(content)) {
        /* Text parts joined with "\n", as the in-process renderer does. */
        size_t len = 1;
        const cJSON *part;
        cJSON_ArrayForEach(part, content) len +=
            strlen(cJSON_GetObjectItemCaseSensitive(part, "text")->valuestring) + 1;
        joined[i] = calloc(len, 1);
        if (!joined[i])
          return -1;
        int first = 1;
        cJSON_ArrayForEach(part, content) {
          if (!first)
            strcat(joined[i], "\n");
          strcat(joined[i], cJSON_GetObjectItemCaseSensitive(part, "text")->valuestring);
          first = 0;
        }
        items[i].content = joined[i];
      }
      msgs[i] = &items[i];
      i++;
    }
    chat->n_messages = (size_t)i;
    chat->messages = msgs;
    chat->template_name = (char *)q->chat_template;
    p->kind_case = EPIC__V1__PROMPT__KIND_CHAT;
    p->chat = chat;
  } else if (q->prompt_text) {
    p->kind_case = EPIC__V1__PROMPT__KIND_TEXT;
    p->text = (char *)q->prompt_text;
  } else {
    ids->n_ids = (size_t)q->n_prompt_ids;
    ids->ids = (int32_t *)q->prompt_ids;
    p->kind_case = EPIC__V1__PROMPT__KIND_TOKEN_IDS;
    p->token_ids = ids;
  }
  return 0;
}

static int http_status_of(grpc_status_code c) {
  switch (c) {
  case GRPC_STATUS_INVALID_ARGUMENT: return 400;
  case GRPC_STATUS_UNAUTHENTICATED: return 401; /* the upstream refused the forwarded key */
  case GRPC_STATUS_PERMISSION_DENIED: return 403;
  case GRPC_STATUS_RESOURCE_EXHAUSTED: return 429;
  case GRPC_STATUS_UNAVAILABLE:
  case GRPC_STATUS_CANCELLED: return 503;
  case GRPC_STATUS_DEADLINE_EXCEEDED: return 504;
  default: return 500;
  }
}

static void *reader(void *arg) {
  ug *g = arg;
  int finish = EPIC_HTTP_FINISH_STOP, tag;
  int64_t prompt_tokens = 0, completion_tokens = 0;
  epic_http_token *toks = NULL;
  size_t cap = 0;
  for (;;) {
    grpc_byte_buffer *bb = NULL;
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &bb;
    if (grpc_call_start_batch(g->call, &op, 1, &tag, NULL) != GRPC_CALL_OK)
      break;
    grpc_event ev = pluck(g->cq, &tag);
    if (!ev.success || !bb)
      break;
    Epic__V1__GenerateResponse *r =
        (Epic__V1__GenerateResponse *)epic_gw_unpack(&epic__v1__generate_response__descriptor, bb);
    grpc_byte_buffer_destroy(bb);
    if (!r)
      break;
    int n = g->logprobs ? (int)r->n_token_ids : 0;
    if ((size_t)n > cap) {
      epic_http_token *t = realloc(toks, (size_t)n * sizeof *t);
      if (t) {
        toks = t;
        cap = (size_t)n;
      } else {
        n = 0;
      }
    }
    for (int i = 0; i < n; i++)
      toks[i] = (epic_http_token){.id = r->token_ids[i],
                                  .logprob = (size_t)i < r->n_logprobs ? r->logprobs[i] : 0};
    epic_http_sink_output(g->sink, r->text, r->text ? strlen(r->text) : 0, toks, n);
    if (r->finish_reason == EPIC__V1__FINISH_REASON__FINISH_REASON_LENGTH)
      finish = EPIC_HTTP_FINISH_LENGTH;
    if (r->usage) {
      prompt_tokens = r->usage->prompt_tokens;
      completion_tokens = r->usage->completion_tokens;
    }
    epic__v1__generate_response__free_unpacked(r, NULL);
  }
  free(toks);
  grpc_status_code status = GRPC_STATUS_UNKNOWN;
  grpc_slice details = grpc_empty_slice();
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  op.data.recv_status_on_client.trailing_metadata = &g->trail;
  op.data.recv_status_on_client.status = &status;
  op.data.recv_status_on_client.status_details = &details;
  if (grpc_call_start_batch(g->call, &op, 1, &tag, NULL) == GRPC_CALL_OK)
    pluck(g->cq, &tag);
  char msg[300];
  snprintf(msg, sizeof msg, "upstream: %.*s", (int)GRPC_SLICE_LENGTH(details),
           (const char *)GRPC_SLICE_START_PTR(details));
  grpc_slice_unref(details);
  if (status != GRPC_STATUS_OK)
    epic_http_sink_finish(g->sink, EPIC_HTTP_FINISH_ERROR, prompt_tokens, completion_tokens,
                          http_status_of(status), msg);
  else
    epic_http_sink_finish(g->sink, finish, prompt_tokens, completion_tokens, 0, NULL);
  return NULL;
}

static void ug_free(ug *g) {
  if (!g)
    return;
  if (g->th_started)
    pthread_join(g->th, NULL);
  if (g->call)
    grpc_call_unref(g->call);
  if (g->send_bb)
    grpc_byte_buffer_destroy(g->send_bb);
  grpc_metadata_array_destroy(&g->md);
  grpc_metadata_array_destroy(&g->trail);
  if (g->cq) {
    grpc_completion_queue_shutdown(g->cq);
    while (
        grpc_completion_queue_pluck(g->cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
        GRPC_QUEUE_SHUTDOWN)
      ;
    grpc_completion_queue_destroy(g->cq);
  }
  free(g);
}

static int ub_start(void *be, const epic_http_gen *q, epic_http_sink *sink, void **handle,
                    int *reasoning_open, char *err, size_t err_len, char *param, size_t param_len) {
  ub *b = be;
  *handle = NULL;
  *reasoning_open = 0;
  int n_items = q->messages ? cJSON_GetArraySize(q->messages) : 0;
  Epic__V1__ChatMessage *items = calloc((size_t)n_items + 1, sizeof *items);
  Epic__V1__ChatMessage **msgs = calloc((size_t)n_items + 1, sizeof *msgs);
  char **joined = calloc((size_t)n_items + 1, sizeof *joined);
  char **stops = calloc((size_t)q->n_stops + 1, sizeof *stops);
  grpc_metadata cmd[2];
  size_t n_cmd = 0;
  ug *g = calloc(1, sizeof *g);
  int rc = 500;
  snprintf(err, err_len, "out of memory");
  param[0] = '\0';
  (void)param_len;
  if (!items || !msgs || !joined || !stops || !g)
    goto done;
  grpc_metadata_array_init(&g->md);
  grpc_metadata_array_init(&g->trail);
  g->b = b;
  g->sink = sink;
  g->logprobs = q->logprobs;
  Epic__V1__Prompt p = EPIC__V1__PROMPT__INIT;
  Epic__V1__Chat chat = EPIC__V1__CHAT__INIT;
  Epic__V1__TokenIds ids = EPIC__V1__TOKEN_IDS__INIT;
  if (build_prompt(q, &p, &chat, msgs, items, joined, n_items, &ids) != 0)
    goto done;
  if (q->messages) {
    /* The upstream renders the template: ask it for the rendered text to see
     * whether it leaves a <think> block open. */
    Epic__V1__TokenizeRequest tr = EPIC__V1__TOKENIZE_REQUEST__INIT;
    tr.prompt = &p;
    Epic__V1__TokenizeResponse *rs = (Epic__V1__TokenizeResponse *)unary(
        b, EPIC_GW_PATH_TOKENIZE, &tr.base, &epic__v1__tokenize_response__descriptor, 10,
        q->authorization, q->authorization_len);
    if (rs) {
      *reasoning_open = epic_reasoning_prompt_opens(rs->text, strlen(rs->text));
      epic__v1__tokenize_response__free_unpacked(rs, NULL);
    }
  }
  Epic__V1__SamplingParams sp = EPIC__V1__SAMPLING_PARAMS__INIT;
  if (q->max_tokens > 0) {
    sp.max_tokens_present_case = EPIC__V1__SAMPLING_PARAMS__MAX_TOKENS_PRESENT_MAX_TOKENS;
    sp.max_tokens = (int32_t)q->max_tokens;
  }
  sp.temperature = q->temperature;
  sp.top_p_present_case = EPIC__V1__SAMPLING_PARAMS__TOP_P_PRESENT_TOP_P;
  sp.top_p = q->top_p;
  sp.seed = q->seed;
  for (int i = 0; i < q->n_stops; i++)
    stops[i] = (char *)q->stops[i];
  sp.n_stop = (size_t)q->n_stops;
  sp.stop = stops;
  sp.logprobs = q->logprobs != 0;
  sp.ignore_eos = q->ignore_eos != 0;
  Epic__V1__GenerateRequest rq = EPIC__V1__GENERATE_REQUEST__INIT;
  rq.prompt = &p;
  rq.sampling = &sp;
  g->send_bb = epic_gw_pack(&rq.base);
  g->cq = grpc_completion_queue_create_for_pluck(NULL);
  g->call = grpc_channel_create_call(b->ch, NULL, GRPC_PROPAGATE_DEFAULTS, g->cq,
                                     grpc_slice_from_static_string(EPIC_GW_PATH_GENERATE), NULL,
                                     gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
  if (!g->send_bb || !g->call)
    goto done;
  grpc_op ops[4];
  memset(ops, 0, sizeof ops);
  n_cmd = call_md(b, q->authorization, q->authorization_len, cmd);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[0].data.send_initial_metadata.count = n_cmd;
  ops[0].data.send_initial_metadata.metadata = n_cmd ? cmd : NULL;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = g->send_bb;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[3].data.recv_initial_metadata.recv_initial_metadata = &g->md;
  int tag;
  if (grpc_call_start_batch(g->call, ops, 4, &tag, NULL) != GRPC_CALL_OK) {
    snprintf(err, err_len, "cannot start the upstream call");
    goto done;
  }
  pluck(g->cq, &tag); /* a failed call shows in its status, read by the thread */
  if (pthread_create(&g->th, NULL, reader, g) != 0) {
    grpc_call_cancel(g->call, NULL);
    snprintf(err, err_len, "cannot start a reader thread");
    goto done;
  }
  g->th_started = 1;
  *handle = g;
  g = NULL;
  rc = 0;
done:
  call_md_free(cmd, n_cmd);
  free(stops);
  for (int i = 0; joined && i < n_items; i++)
    free(joined[i]);
  free(joined);
  free(items);
  free(msgs);
  ug_free(g);
  return rc;
}

static void ub_cancel(void *be, void *handle) {
  (void)be;
  grpc_call_cancel(((ug *)handle)->call, NULL);
}

static void ub_release(void *be, void *handle) {
  (void)be;
  ug_free(handle);
}

static const char *ub_model_name(void *be, const char *authz, size_t authz_len) {
  ub *b = be;
  pthread_mutex_lock(&b->mu);
  int known = b->model[0] != '\0';
  pthread_mutex_unlock(&b->mu);
  if (!known) {
    Epic__V1__ModelInfoRequest rq = EPIC__V1__MODEL_INFO_REQUEST__INIT;
    Epic__V1__ModelInfoResponse *r = (Epic__V1__ModelInfoResponse *)unary(
        b, EPIC_GW_PATH_MODELINFO, &rq.base, &epic__v1__model_info_response__descriptor, 5, authz,
        authz_len);
    pthread_mutex_lock(&b->mu);
    if (r && r->model && r->model[0] && !b->model[0])
      snprintf(b->model, sizeof b->model, "%s", r->model);
    pthread_mutex_unlock(&b->mu);
    if (r)
      epic__v1__model_info_response__free_unpacked(r, NULL);
  }
  return b->model[0] ? b->model : NULL;
}

const epic_http_backend_ops epic_http_upstream_ops = {.abi_version = EPIC_HTTP_BACKEND_ABI,
                                                      .name = "upstream",
                                                      .start = ub_start,
                                                      .cancel = ub_cancel,
                                                      .release = ub_release,
                                                      .token_bytes = NULL,
                                                      .metrics = NULL,
                                                      .ready = NULL,
                                                      .model_name = ub_model_name,
                                                      /* the gRPC API carries only the
                                                       * sampled token's logprob */
                                                      .max_top_logprobs = 0};

epic_status epic_http_upstream_backend_create(const char *target, const char *internal_token,
                                              void **out) {
  *out = NULL;
  ub *b = calloc(1, sizeof *b);
  if (!b)
    return EPIC_ERR_NOMEM;
  grpc_init();
  b->target = strdup(target);
  b->internal = internal_token ? strdup(internal_token) : NULL;
  if (internal_token && !b->internal) {
    free(b->target);
    b->target = NULL; /* fails below as out of memory */
  }
  grpc_channel_credentials *cr = grpc_insecure_credentials_create();
  b->ch = b->target ? grpc_channel_create(b->target, cr, NULL) : NULL;
  grpc_channel_credentials_release(cr);
  if (!b->ch || pthread_mutex_init(&b->mu, NULL) != 0) {
    if (b->ch)
      grpc_channel_destroy(b->ch);
    free(b->target);
    free(b->internal);
    free(b);
    grpc_shutdown();
    return EPIC_ERR_NOMEM;
  }
  *out = b;
  return EPIC_OK;
}

void epic_http_upstream_backend_destroy(void *be) {
  ub *b = be;
  if (!b)
    return;
  grpc_channel_destroy(b->ch);
  pthread_mutex_destroy(&b->mu);
  free(b->target);
  free(b->internal);
  free(b);
  grpc_shutdown();
}
