/* `epic serve`'s gRPC server (coordinator/gateway.h): the completion-queue
 * thread owns every grpc_call; the engine thread runs epic_engine_run and
 * hands each stream's output over under the server's mutex. */
#define _GNU_SOURCE
#include <grpc/grpc.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/log.h"
#include "coordinator/gateway.h"
#include "coordinator/gateway_impl.h"

#ifndef EPIC_VERSION
#define EPIC_VERSION "unknown"
#endif

enum { TAG_CLOSE = EPIC_GW_TAG_USER, TAG_SEND, TAG_WAKE };

/* The completion-queue thread wakes at least this often to look at drain
 * requests and deadlines. */
#define TICK_S 0.05
/* After the last stream of a drain, calls still open get this long. */
#define SHUTDOWN_GRACE_S 2.0

/* A wake-up: a call on the lame channel, which fails at once and so puts its
 * tag in the completion queue from whatever thread started it. */
typedef struct wake {
  epic_gw_tag tag;
  grpc_call *call;
  grpc_metadata_array trail;
  grpc_status_code status;
  grpc_slice details;
} wake;

typedef struct gw_call gw_call;
struct gw_call {
  gw_call *prev, *next;
  epic_gw_server *s;
  int method;
  /* Completion-queue thread only. */
  epic_gw_down d; /* the client's call */
  uint64_t engine_id;
  double t_received;
  char request_id[48];
  char principal[32];     /* who called (auth.h), for log lines */
  epic_auth_grant grant;  /* request/stream slot held with s->p.security->auth */
  /* Set before submit, read-only after: both threads. */
  epic_gw_job job;
  /* Engine thread only (its callbacks). */
  epic_detok *detok;
  epic_gw_stopper stopper;
  epic_gw_buf scratch;
  int64_t n_tokens;
  double t_first;
  /* Under s->mu. */
  int in_engine; /* submitted, on_finish not yet called */
  int abandoned; /* the client is gone: on_token cancels */
  int finished, drain_cancelled, stop_matched;
  int in_dirty;
  gw_call *dirty_next;
  gw_call *wake_next; /* completion-queue thread: the list being flushed */
  int32_t *out_ids;
  float *out_lp;
  size_t n_out, cap_out;
  epic_gw_buf out_text;
  epic_engine_result result;
  double ttft, t_finished;
};

struct epic_gw_server {
  epic_gw_server_params p;
  epic_auth *auth; /* p.security->auth or NULL */
  char *model_name, *comm_name;
  epic_engine_params eparams;
  epic_model_config cfg;
  epic_gw_limits lim;
  sig_atomic_t drain_seen; /* drain requests already acted on */
  epic_gw_front fr;
  grpc_channel *lame; /* wake-ups */
  gw_call *calls;     /* every live call (completion-queue thread) */
  pthread_t engine_thread;
  int engine_started, engine_joined, engine_stop_sent;
  int draining, drain_cancel_done;
  double drain_deadline;
  double shutdown_deadline;
  /* Under mu. */
  pthread_mutex_t mu;
  int mu_ok;
  gw_call *dirty;         /* calls with output to send */
  int wake_pending;       /* a wake-up is in the queue */
  int64_t active_streams; /* Generate calls held by the engine */
  int engine_done;
  epic_status engine_status;
};

/* ---- wake-ups -------------------------------------------------------------------- */

/* Any thread, without s->mu held. */
static void post_wake(epic_gw_server *s) {
  wake *w = calloc(1, sizeof *w);
  if (w) {
    w->tag = (epic_gw_tag){TAG_WAKE, w};
    grpc_metadata_array_init(&w->trail);
    w->details = grpc_empty_slice();
    w->call = grpc_channel_create_call(s->lame, NULL, GRPC_PROPAGATE_DEFAULTS, s->fr.cq,
                                       grpc_slice_from_static_string("/epic.internal/Wake"), NULL,
                                       gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    op.data.recv_status_on_client.trailing_metadata = &w->trail;
    op.data.recv_status_on_client.status = &w->status;
    op.data.recv_status_on_client.status_details = &w->details;
    if (w->call && grpc_call_start_batch(w->call, &op, 1, &w->tag, NULL) == GRPC_CALL_OK)
      return;
    if (w->call)
      grpc_call_unref(w->call);
    grpc_metadata_array_destroy(&w->trail);
    free(w);
  }
  /* The completion-queue thread still looks every TICK_S (epic_gw_server_run): late, not
   * lost. */
  EPIC_LOG_WARN("serve: could not post a wake-up to the gRPC thread");
  pthread_mutex_lock(&s->mu);
  s->wake_pending = 0;
  pthread_mutex_unlock(&s->mu);
}

static void free_wake(wake *w) {
  grpc_call_unref(w->call);
  grpc_metadata_array_destroy(&w->trail);
  grpc_slice_unref(w->details);
  free(w);
}

/* s->mu held. Returns 1 when the caller must post a wake-up (after unlocking). */
static int mark_dirty_locked(epic_gw_server *s, gw_call *c) {
  if (!c->in_dirty) {
    c->in_dirty = 1;
    c->dirty_next = s->dirty;
    s->dirty = c;
  }
  if (s->wake_pending)
    return 0;
  s->wake_pending = 1;
  return 1;
}

/* ---- calls ---------------------------------------------------------------------- */

static void call_free(gw_call *c) {
  epic_gw_server *s = c->s;
  if (c->prev)
    c->prev->next = c->next;
  else
    s->calls = c->next;
  if (c->next)
    c->next->prev = c->prev;
  if (c->d.send_bb)
    grpc_byte_buffer_destroy(c->d.send_bb);
  if (c->d.call)
    grpc_call_unref(c->d.call);
  epic_auth_release(s->auth, &c->grant);
  epic_detok_destroy(c->detok);
  epic_gw_stopper_free(&c->stopper);
  epic_gw_buf_free(&c->scratch);
  epic_gw_job_clear(&c->job);
  free(c->out_ids);
  free(c->out_lp);
  epic_gw_buf_free(&c->out_text);
  free(c);
}

/* A call is freed once gRPC is done with it (RECV_CLOSE and every batch
 * completed), the engine no longer holds it as a callback argument, and no
 * wake-up list points at it. */
static void maybe_free(gw_call *c) {
  if (!c->d.closed || c->d.pending)
    return;
  pthread_mutex_lock(&c->s->mu);
  int busy = c->in_engine || c->in_dirty;
  pthread_mutex_unlock(&c->s->mu);
  if (!busy)
    call_free(c);
}

static void reply_error(gw_call *c, grpc_status_code code, const char *msg) {
  if (c->method == EPIC_GW_M_GENERATE)
    EPIC_LOG_INFO("serve: request %s (%s) rejected (%d): %s",
                  c->request_id[0] ? c->request_id : "-", c->principal, (int)code, msg);
  epic_gw_down_finish(&c->d, code, msg, NULL);
}

static void reply(gw_call *c, const ProtobufCMessage *m) {
  grpc_byte_buffer *bb = epic_gw_pack(m);
  epic_gw_down_finish(&c->d, GRPC_STATUS_OK, NULL, bb);
}

/* The request message of a call, or NULL after answering INVALID_ARGUMENT. */
static ProtobufCMessage *request(gw_call *c, grpc_byte_buffer *payload,
                                 const ProtobufCMessageDescriptor *d) {
  char err[EPIC_GW_ERR_LEN];
  if (!payload) {
    reply_error(c, GRPC_STATUS_INVALID_ARGUMENT, "request: no request message was sent");
    return NULL;
  }
  size_t len = grpc_byte_buffer_length(payload);
  if ((int64_t)len > c->s->p.max_request_bytes) {
    snprintf(
        err, sizeof err,
        "request: %s of %zu bytes exceeds the server's limit of %lld bytes (--max-request-bytes)",
        d->short_name, len, (long long)c->s->p.max_request_bytes);
    reply_error(c, GRPC_STATUS_INVALID_ARGUMENT, err);
    return NULL;
  }
  ProtobufCMessage *m = epic_gw_unpack(d, payload);
  if (!m) {
    snprintf(err, sizeof err, "request: malformed %s protobuf (%zu bytes)", d->short_name, len);
    reply_error(c, GRPC_STATUS_INVALID_ARGUMENT, err);
  }
  return m;
}

/* ---- Generate: engine thread ----------------------------------------------------- */

static int on_token(void *user, int32_t id, float logprob) {
  gw_call *c = user;
  epic_gw_server *s = c->s;
  int ret = 0, cancel = 0;
  if (c->n_tokens == 0)
    c->t_first = epic_now_seconds();
  c->n_tokens++;
  c->scratch.n = 0;
  if (c->detok) {
    char *text = NULL;
    size_t n = 0;
    if (epic_detok_push(c->detok, id, &text, &n) == EPIC_OK) {
      if (epic_gw_stopper_push(&c->stopper, text, n, &c->scratch) != EPIC_OK)
        cancel = 1;
      epic_tokenizer_text_free(text);
    } else {
      /* An id without a token (a hole in the vocabulary) has no text. */
      EPIC_LOG_WARN("serve: request %s: token %d has no text", c->request_id, id);
    }
    if (c->stopper.matched >= 0)
      ret = 1;
  }
  pthread_mutex_lock(&s->mu);
  if (c->abandoned) {
    pthread_mutex_unlock(&s->mu);
    return -1; /* the client is gone: stop at once */
  }
  if (c->n_out == c->cap_out) {
    size_t cap = c->cap_out ? 2 * c->cap_out : 16;
    int32_t *ids = realloc(c->out_ids, cap * sizeof *ids);
    if (ids)
      c->out_ids = ids;
    float *lp = ids ? realloc(c->out_lp, cap * sizeof *lp) : NULL;
    if (lp)
      c->out_lp = lp;
    if (ids && lp)
      c->cap_out = cap;
  }
  if (c->n_out < c->cap_out) {
    c->out_ids[c->n_out] = id;
    c->out_lp[c->n_out++] = logprob;
  } else {
    cancel = 1;
  }
  if (epic_gw_buf_append(&c->out_text, c->scratch.p, c->scratch.n) != EPIC_OK)
    cancel = 1;
  if (c->n_tokens == 1)
    c->ttft = c->t_first - c->t_received;
  if (ret)
    c->stop_matched = c->stopper.matched;
  int w = mark_dirty_locked(s, c);
  pthread_mutex_unlock(&s->mu);
  if (w)
    post_wake(s);
  if (cancel)
    EPIC_LOG_ERROR("serve: request %s: out of memory for its output, cancelling", c->request_id);
  return cancel ? -1 : ret;
}

static void on_finish(void *user, const epic_engine_result *r) {
  gw_call *c = user;
  epic_gw_server *s = c->s;
  c->scratch.n = 0;
  if (c->detok && c->stopper.matched < 0) {
    char *text = NULL;
    size_t n = 0;
    if (epic_detok_flush(c->detok, &text, &n) == EPIC_OK) {
      if (epic_gw_stopper_push(&c->stopper, text, n, &c->scratch) == EPIC_OK)
        epic_gw_stopper_finish(&c->stopper, &c->scratch);
      epic_tokenizer_text_free(text);
    }
  }
  double now = epic_now_seconds();
  EPIC_LOG_INFO(
      "serve: request %s finished (%d): %lld prompt + %lld new tokens, ttft %.3fs, total %.3fs",
      c->request_id, (int)r->finish, (long long)r->prompt_tokens, (long long)r->completion_tokens,
      c->n_tokens ? c->t_first - c->t_received : 0.0, now - c->t_received);
  epic_auth_charge(s->auth, &c->grant, r->completion_tokens);
  epic_auth_release(s->auth, &c->grant);
  pthread_mutex_lock(&s->mu);
  c->in_engine = 0;
  c->finished = 1;
  c->result = *r;
  c->t_finished = now;
  epic_gw_buf_append(&c->out_text, c->scratch.p, c->scratch.n);
  s->active_streams--;
  int w = mark_dirty_locked(s, c);
  pthread_mutex_unlock(&s->mu);
  if (w)
    post_wake(s);
}

static void *engine_main(void *arg) {
  epic_gw_server *s = arg;
  epic_status st = epic_engine_run(s->p.engine);
  if (st != EPIC_OK)
    EPIC_LOG_ERROR("serve: the engine stopped: %s", epic_status_str(st));
  pthread_mutex_lock(&s->mu);
  s->engine_done = 1;
  s->engine_status = st;
  int w = !s->wake_pending;
  s->wake_pending = 1;
  pthread_mutex_unlock(&s->mu);
  if (w)
    post_wake(s);
  return NULL;
}

/* ---- Generate: completion-queue thread ------------------------------------------- */

static void start_generate(gw_call *c, grpc_byte_buffer *payload) {
  epic_gw_server *s = c->s;
  char err[EPIC_GW_ERR_LEN];
  if (s->draining) {
    reply_error(c, GRPC_STATUS_UNAVAILABLE,
                "server is draining (shutting down): not accepting new requests");
    return;
  }
  Epic__V1__GenerateRequest *rq =
      (Epic__V1__GenerateRequest *)request(c, payload, &epic__v1__generate_request__descriptor);
  if (!rq)
    return;
  snprintf(c->request_id, sizeof c->request_id, "%s",
           rq->request_id && rq->request_id[0] ? rq->request_id : "-");
  epic_status st = epic_gw_prepare(rq, &s->lim, &c->job, err);
  epic__v1__generate_request__free_unpacked(rq, NULL);
  if (st != EPIC_OK) {
    reply_error(
        c, st == EPIC_ERR_INVALID ? GRPC_STATUS_INVALID_ARGUMENT : GRPC_STATUS_RESOURCE_EXHAUSTED,
        st == EPIC_ERR_INVALID ? err : "out of memory");
    return;
  }
  if (s->p.tokenizer &&
      epic_detok_create(s->p.tokenizer,
                        c->job.skip_special ? EPIC_DECODE_GENERATED : EPIC_DECODE_SKIP_UNKNOWN,
                        &c->detok) != EPIC_OK) {
    reply_error(c, GRPC_STATUS_INTERNAL, "cannot create the detokenizer");
    return;
  }
  epic_gw_stopper_init(&c->stopper, &c->job.stops);
  c->stop_matched = -1;
  epic_engine_request er = {.size = sizeof er,
                            .prompt = c->job.prompt,
                            .n_prompt = c->job.n_prompt,
                            .max_new_tokens = c->job.max_tokens,
                            .sampling = c->job.sampling,
                            .ignore_eos = c->job.ignore_eos,
                            .stop_ids = c->job.stop_ids,
                            .n_stop_ids = c->job.n_stop_ids,
                            .on_token = on_token,
                            .on_finish = on_finish,
                            .user = c};
  /* The engine thread may call back before submit returns. */
  pthread_mutex_lock(&s->mu);
  c->in_engine = 1;
  s->active_streams++;
  pthread_mutex_unlock(&s->mu);
  st = epic_engine_submit(s->p.engine, &er, &c->engine_id);
  if (st != EPIC_OK) {
    pthread_mutex_lock(&s->mu);
    c->in_engine = 0;
    s->active_streams--;
    pthread_mutex_unlock(&s->mu);
  }
  if (st == EPIC_ERR_BUSY) {
    epic_engine_stats es;
    epic_engine_get_stats(s->p.engine, &es);
    snprintf(err, sizeof err,
             "server busy: the request queue is full (%lld waiting, --max-queue %lld); retry later",
             (long long)es.queued, (long long)s->eparams.max_queue);
    reply_error(c, GRPC_STATUS_RESOURCE_EXHAUSTED, err);
    return;
  }
  if (st == EPIC_ERR_CANCELLED) {
    reply_error(c, GRPC_STATUS_UNAVAILABLE, "server is shutting down: not accepting new requests");
    return;
  }
  if (st != EPIC_OK) {
    reply_error(c, st == EPIC_ERR_INVALID ? GRPC_STATUS_INVALID_ARGUMENT : GRPC_STATUS_INTERNAL,
                st == EPIC_ERR_INVALID ? "request: rejected by the engine (see the server log)"
                                       : "request: the engine could not queue it");
    return;
  }
  EPIC_LOG_INFO("serve: request %s (%s): %lld prompt tokens, max_tokens %lld", c->request_id,
                c->principal, (long long)c->job.n_prompt, (long long)c->job.max_tokens);
}

static grpc_status_code finish_status(const gw_call *c, char *msg, size_t n) {
  msg[0] = '\0';
  switch (c->result.finish) {
  case EPIC_ENGINE_FINISH_LENGTH:
  case EPIC_ENGINE_FINISH_STOP: return GRPC_STATUS_OK;
  case EPIC_ENGINE_FINISH_CANCELLED:
    if (c->drain_cancelled) {
      snprintf(msg, n,
               "server shut down: the request was cancelled when the drain timeout expired");
      return GRPC_STATUS_UNAVAILABLE;
    }
    snprintf(msg, n, "request cancelled");
    return GRPC_STATUS_CANCELLED;
  case EPIC_ENGINE_FINISH_ERROR:
  default:
    snprintf(msg, n, "engine step failed: %s", epic_status_str(c->result.status));
    return c->result.status == EPIC_ERR_COMM || c->result.status == EPIC_ERR_TIMEOUT
               ? GRPC_STATUS_UNAVAILABLE
               : GRPC_STATUS_INTERNAL;
  }
}

/* Sends what a Generate stream has ready: new tokens and text as one message,
 * plus the final status once the sequence finished. One send at a time per
 * call; output that comes meanwhile waits for the next flush. */
static void flush_generate(gw_call *c) {
  epic_gw_server *s = c->s;
  if (c->d.closed || c->d.send_busy || c->d.status_started)
    return;
  char msg[EPIC_GW_ERR_LEN];
  grpc_status_code code = GRPC_STATUS_OK;
  grpc_byte_buffer *bb = NULL;
  pthread_mutex_lock(&s->mu);
  int finished = c->finished;
  if (c->n_out == 0 && c->out_text.n == 0 && !finished) {
    pthread_mutex_unlock(&s->mu);
    return;
  }
  if (finished)
    code = finish_status(c, msg, sizeof msg);
  Epic__V1__GenerateResponse r = EPIC__V1__GENERATE_RESPONSE__INIT;
  Epic__V1__Usage u = EPIC__V1__USAGE__INIT;
  r.n_token_ids = c->n_out;
  r.token_ids = c->out_ids;
  if (c->job.logprobs) {
    r.n_logprobs = c->n_out;
    r.logprobs = c->out_lp;
  }
  if (finished && code == GRPC_STATUS_OK) {
    r.finish_reason = c->result.finish == EPIC_ENGINE_FINISH_LENGTH
                          ? EPIC__V1__FINISH_REASON__FINISH_REASON_LENGTH
                          : EPIC__V1__FINISH_REASON__FINISH_REASON_STOP;
    if (c->stop_matched >= 0)
      r.stop = c->job.stops.s[c->stop_matched];
    u.prompt_tokens = (int32_t)c->result.prompt_tokens;
    u.completion_tokens = (int32_t)c->result.completion_tokens;
    u.queue_seconds = c->result.queue_seconds;
    u.ttft_seconds = c->ttft;
    u.total_seconds = c->t_finished - c->t_received;
    r.usage = &u;
  }
  if (c->n_out > 0 || c->out_text.n > 0 || (finished && code == GRPC_STATUS_OK))
    bb = epic_gw_pack_text(&r.base, 2, c->out_text.p, c->out_text.n);
  c->n_out = 0;
  c->out_text.n = 0;
  pthread_mutex_unlock(&s->mu);
  if (finished) {
    epic_gw_down_finish(&c->d, code, msg, bb);
    return;
  }
  epic_gw_down_send(&c->d, bb);
}

/* ---- unary methods -------------------------------------------------------------- */

static void do_tokenize(gw_call *c, grpc_byte_buffer *payload) {
  epic_gw_server *s = c->s;
  char err[EPIC_GW_ERR_LEN];
  Epic__V1__TokenizeRequest *rq =
      (Epic__V1__TokenizeRequest *)request(c, payload, &epic__v1__tokenize_request__descriptor);
  if (!rq)
    return;
  Epic__V1__TokenizeResponse r = EPIC__V1__TOKENIZE_RESPONSE__INIT;
  int32_t *ids = NULL;
  int64_t n = 0;
  char *text = NULL;
  size_t text_len = 0;
  char **tokens = NULL;
  epic_status st = EPIC_OK;
  if (!s->p.tokenizer) {
    reply_error(c, GRPC_STATUS_FAILED_PRECONDITION, "Tokenize: this model has no tokenizer.json");
    goto done;
  }
  st = epic_gw_encode_prompt(rq->prompt, &s->lim, &ids, &n, &text, &text_len, err);
  if (st != EPIC_OK) {
    reply_error(c, st == EPIC_ERR_INVALID ? GRPC_STATUS_INVALID_ARGUMENT : GRPC_STATUS_INTERNAL,
                st == EPIC_ERR_INVALID ? err : "out of memory");
    goto done;
  }
  if (rq->prompt->kind_case == EPIC__V1__PROMPT__KIND_TOKEN_IDS &&
      epic_tokenizer_decode(s->p.tokenizer, ids, (size_t)n, 0, &text, &text_len) != EPIC_OK) {
    reply_error(c, GRPC_STATUS_INVALID_ARGUMENT,
                "prompt.token_ids.ids: an id has no token in the tokenizer");
    goto done;
  }
  tokens = calloc((size_t)n + 1, sizeof *tokens);
  if (!tokens) {
    reply_error(c, GRPC_STATUS_INTERNAL, "out of memory");
    goto done;
  }
  for (int64_t i = 0; i < n; i++) {
    const char *t = epic_tokenizer_id_to_token(s->p.tokenizer, ids[i]);
    tokens[i] = (char *)(t ? t : "");
  }
  r.n_ids = (size_t)n;
  r.ids = ids;
  r.n_tokens = (size_t)n;
  r.tokens = tokens;
  epic_gw_down_finish(&c->d, GRPC_STATUS_OK, NULL,
                      epic_gw_pack_text(&r.base, 3, text, text ? text_len : 0));
done:
  free(tokens);
  free(ids);
  epic_tokenizer_text_free(text);
  epic__v1__tokenize_request__free_unpacked(rq, NULL);
}

static void do_modelinfo(gw_call *c, grpc_byte_buffer *payload) {
  epic_gw_server *s = c->s;
  ProtobufCMessage *rq = request(c, payload, &epic__v1__model_info_request__descriptor);
  if (!rq)
    return;
  protobuf_c_message_free_unpacked(rq, NULL);
  const epic_model_config *cfg = &s->cfg;
  const epic_engine_params *ep = &s->eparams;
  epic_engine_stats es;
  epic_engine_get_stats(s->p.engine, &es);
  Epic__V1__ModelConfig mc = EPIC__V1__MODEL_CONFIG__INIT;
  mc.model_type = (char *)cfg->model_type;
  mc.vocab_size = cfg->vocab_size;
  mc.hidden_size = cfg->hidden_size;
  mc.num_hidden_layers = cfg->num_hidden_layers;
  mc.first_k_dense_replace = cfg->first_k_dense_replace;
  mc.n_routed_experts = cfg->n_routed_experts;
  mc.num_experts_per_tok = cfg->num_experts_per_tok;
  mc.n_shared_experts = cfg->n_shared_experts;
  mc.num_attention_heads = cfg->num_attention_heads;
  mc.kv_lora_rank = cfg->kv_lora_rank;
  mc.max_position_embeddings = cfg->max_position_embeddings;
  mc.fp8 = cfg->quant.fp8 != 0;
  mc.mtp = cfg->num_nextn_predict_layers > 0;
  Epic__V1__ServingSettings ss = EPIC__V1__SERVING_SETTINGS__INIT;
  ss.max_batch = ep->max_batch;
  ss.max_queue = ep->max_queue;
  ss.max_context = s->p.max_context;
  ss.kv_pages = es.nranks > 0 ? es.kv_pages_total / es.nranks : es.kv_pages_total;
  ss.page_size = ep->page_size;
  ss.step_tokens = ep->step_tokens;
  ss.prefill_chunk = ep->prefill_chunk;
  ss.micro_batches = ep->micro_batches;
  ss.ranks = s->p.nranks;
  ss.comm = s->comm_name ? s->comm_name : (char *)"";
  ss.max_request_bytes = s->p.max_request_bytes;
  const epic_gw_request_limits rl = epic_gw_limits_effective(&s->lim.req);
  epic_auth_params ap;
  epic_auth_get_params(s->auth, &ap);
  const epic_gw_security *sec = s->p.security;
  Epic__V1__RequestLimits lm = EPIC__V1__REQUEST_LIMITS__INIT;
  lm.max_request_bytes = s->p.max_request_bytes;
  lm.max_prompt_tokens = rl.max_prompt_tokens;
  lm.max_tokens = rl.max_tokens;
  lm.max_stop_strings = rl.max_stop_strings;
  lm.max_stop_len = rl.max_stop_len;
  lm.max_stop_token_ids = rl.max_stop_token_ids;
  lm.max_n = rl.max_n;
  lm.max_top_logprobs = rl.max_top_logprobs;
  lm.max_streams_per_key = ap.max_streams;
  lm.rate_limit_rps = ap.requests_per_s;
  lm.rate_limit_burst = ap.requests_per_s > 0 ? ap.request_burst : 0;
  lm.rate_limit_tokens_per_min = ap.tokens_per_min;
  lm.api_keys_required = epic_auth_keys_required(s->auth) != 0;
  lm.tls = sec && sec->tls_cert;
  lm.mutual_tls = sec && sec->tls_cert && sec->tls_client_ca;
  Epic__V1__EngineStats st = EPIC__V1__ENGINE_STATS__INIT;
  st.queued = es.queued;
  st.running = es.running;
  st.kv_pages_used = es.kv_pages_used;
  st.kv_pages_total = es.kv_pages_total;
  st.steps = es.steps;
  st.prompt_tokens = es.prompt_tokens;
  st.generated_tokens = es.generated_tokens;
  st.finished = es.finished;
  st.cancelled = es.cancelled;
  pthread_mutex_lock(&s->mu);
  st.active_streams = s->active_streams;
  pthread_mutex_unlock(&s->mu);
  Epic__V1__ModelInfoResponse r = EPIC__V1__MODEL_INFO_RESPONSE__INIT;
  r.model = s->model_name;
  r.version = (char *)EPIC_VERSION;
  r.config = &mc;
  r.serving = &ss;
  r.stats = &st;
  r.draining = s->draining != 0;
  r.limits = &lm;
  reply(c, &r.base);
}

static void do_health(gw_call *c, grpc_byte_buffer *payload) {
  Grpc__Health__V1__HealthCheckRequest *rq = (Grpc__Health__V1__HealthCheckRequest *)request(
      c, payload, &grpc__health__v1__health_check_request__descriptor);
  if (!rq)
    return;
  if (rq->service[0] && strcmp(rq->service, EPIC_GW_SERVICE) != 0) {
    char err[EPIC_GW_ERR_LEN];
    snprintf(err, sizeof err, "service: unknown service '%.128s' (this server has '' and '%s')",
             rq->service, EPIC_GW_SERVICE);
    reply_error(c, GRPC_STATUS_NOT_FOUND, err);
  } else {
    Grpc__Health__V1__HealthCheckResponse r = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    r.status = c->s->draining ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING
                              : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
    reply(c, &r.base);
  }
  grpc__health__v1__health_check_request__free_unpacked(rq, NULL);
}

/* ---- events (completion-queue thread) --------------------------------------------- */

static void on_new_call(epic_gw_server *s, epic_gw_listener *l, int ok) {
  grpc_call *call;
  grpc_byte_buffer *payload;
  char method[128];
  epic_gw_authz authz;
  if (!epic_gw_front_accept(&s->fr, l, ok, &call, &payload, method, sizeof method, &authz))
    return;
  gw_call *c = calloc(1, sizeof *c);
  if (!c) {
    grpc_call_cancel_with_status(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory", NULL);
    grpc_call_unref(call);
    if (payload)
      grpc_byte_buffer_destroy(payload);
    return;
  }
  c->s = s;
  epic_gw_down_init(&c->d, call, "serve: grpc_call_start_batch", TAG_CLOSE, TAG_SEND, c);
  c->method = l->method;
  c->t_received = epic_now_seconds();
  c->stop_matched = -1;
  snprintf(c->request_id, sizeof c->request_id, "-");
  snprintf(c->principal, sizeof c->principal, "-");
  c->next = s->calls;
  if (s->calls)
    s->calls->prev = c;
  s->calls = c;
  /* RECV_CLOSE first: it is how a client's cancel or deadline reaches us. */
  if (epic_gw_down_recv_close(&c->d) != 0) {
    c->d.closed = 1;
    grpc_call_cancel(call, NULL);
    if (payload)
      grpc_byte_buffer_destroy(payload);
    maybe_free(c);
    return;
  }
  epic_auth_result ar;
  if (s->fr.shutdown_started) {
    /* Also keeps destroy from touching the engine, which may be gone by then. */
    reply_error(c, GRPC_STATUS_UNAVAILABLE, "server is shutting down");
  } else if (c->method != EPIC_GW_M_HEALTH &&
             epic_gw_admit(s->auth, &authz, c->method == EPIC_GW_M_GENERATE, &c->grant, &ar) !=
                 EPIC_AUTH_OK) {
    /* The message names the principal and the limit, never the key. */
    EPIC_LOG_INFO("serve: call %s from %s refused: %s", epic_gw_method_name(c->method, method),
                  ar.principal, ar.message);
    epic_gw_down_refuse(&c->d, &ar);
  } else {
    if (c->method != EPIC_GW_M_HEALTH)
      snprintf(c->principal, sizeof c->principal, "%s", ar.principal);
    switch (c->method) {
    case EPIC_GW_M_GENERATE: start_generate(c, payload); break;
    case EPIC_GW_M_TOKENIZE: do_tokenize(c, payload); break;
    case EPIC_GW_M_MODELINFO: do_modelinfo(c, payload); break;
    case EPIC_GW_M_HEALTH: do_health(c, payload); break;
    default: {
      char err[256];
      snprintf(err, sizeof err, "method %s is not served here", method);
      reply_error(c, GRPC_STATUS_UNIMPLEMENTED, err);
    }
    }
  }
  if (payload)
    grpc_byte_buffer_destroy(payload);
}

/* The wake-up list: flush every call the engine thread handed output to. */
static void on_wake(epic_gw_server *s) {
  pthread_mutex_lock(&s->mu);
  s->wake_pending = 0;
  gw_call *list = s->dirty;
  s->dirty = NULL;
  /* dirty_next may be rewritten by the engine thread as soon as in_dirty is
   * cleared: walk a copy of the links made under the lock. */
  for (gw_call *c = list; c; c = c->dirty_next) {
    c->in_dirty = 0;
    c->wake_next = c->dirty_next;
  }
  pthread_mutex_unlock(&s->mu);
  gw_call *next;
  for (gw_call *c = list; c; c = next) {
    next = c->wake_next;
    if (c->method == EPIC_GW_M_GENERATE)
      flush_generate(c);
    maybe_free(c);
  }
}

static void handle(void *user, grpc_event ev) {
  epic_gw_server *s = user;
  epic_gw_tag *t = ev.tag;
  switch (t->kind) {
  case EPIC_GW_TAG_NEW: on_new_call(s, t->obj, ev.success); break;
  case TAG_CLOSE: {
    gw_call *c = t->obj;
    epic_gw_down_on_close(&c->d);
    if (c->d.cancelled) {
      pthread_mutex_lock(&s->mu);
      c->abandoned = 1;
      int in_engine = c->in_engine;
      pthread_mutex_unlock(&s->mu);
      if (in_engine) {
        /* Client cancel or deadline: free the sequence's KV pages and batch slot now. */
        EPIC_LOG_INFO("serve: request %s: client cancelled or deadline passed", c->request_id);
        epic_engine_cancel(s->p.engine, c->engine_id);
      }
    }
    maybe_free(c);
    break;
  }
  case TAG_SEND: {
    gw_call *c = t->obj;
    epic_gw_down_on_send(&c->d);
    if (!ev.success) {
      pthread_mutex_lock(&s->mu);
      c->abandoned = 1;
      int in_engine = c->in_engine;
      pthread_mutex_unlock(&s->mu);
      if (in_engine)
        epic_engine_cancel(s->p.engine, c->engine_id);
    } else if (c->method == EPIC_GW_M_GENERATE) {
      flush_generate(c); /* output that came while this send was in flight */
    }
    maybe_free(c);
    break;
  }
  case TAG_WAKE:
    free_wake(t->obj);
    on_wake(s);
    break;
  case EPIC_GW_TAG_SHUTDOWN: s->fr.shutdown_done = 1; break;
  default: EPIC_LOG_ERROR("serve: unknown completion tag kind %d", t->kind);
  }
}

static void begin_drain(epic_gw_server *s, const char *why) {
  double now = epic_now_seconds();
  if (!s->draining) {
    s->draining = 1;
    s->drain_deadline = now + s->p.drain_timeout;
    pthread_mutex_lock(&s->mu);
    long long n = (long long)s->active_streams;
    pthread_mutex_unlock(&s->mu);
    fprintf(stderr, "epic serve: %s: draining %lld running streams (--drain-timeout %.1fs)\n", why,
            n, s->p.drain_timeout);
  } else if (s->drain_deadline > now) {
    s->drain_deadline = now; /* asked again: stop waiting */
  }
}

/* Calls that still need gRPC (open, or with batches in flight). */
static int grpc_busy(const void *user) {
  const epic_gw_server *s = user;
  for (const gw_call *c = s->calls; c; c = c->next)
    if (!c->d.closed || c->d.pending)
      return 1;
  return 0;
}

/* The drain, step by step: wait for the streams (cancel them at the deadline),
 * let the engine finish and release the other ranks, then shut gRPC down. */
static void drain_progress(epic_gw_server *s) {
  double now = epic_now_seconds();
  pthread_mutex_lock(&s->mu);
  int64_t active = s->active_streams;
  int engine_done = s->engine_done;
  pthread_mutex_unlock(&s->mu);
  if (!s->drain_cancel_done && active > 0 && now >= s->drain_deadline) {
    s->drain_cancel_done = 1;
    fprintf(stderr, "epic serve: drain timeout: cancelling %lld streams\n", (long long)active);
    for (gw_call *c = s->calls; c; c = c->next) {
      pthread_mutex_lock(&s->mu);
      int in_engine = c->in_engine;
      if (in_engine)
        c->drain_cancelled = 1;
      pthread_mutex_unlock(&s->mu);
      if (in_engine)
        epic_engine_cancel(s->p.engine, c->engine_id);
    }
  }
  if (!s->engine_stop_sent && active == 0) {
    s->engine_stop_sent = 1;
    epic_engine_shutdown(s->p.engine, 1);
  }
  if (!engine_done)
    return;
  if (!s->engine_joined && s->engine_started) {
    pthread_join(s->engine_thread, NULL);
    s->engine_joined = 1;
  }
  /* Final messages go out before the server stops taking calls. */
  for (gw_call *c = s->calls; c; c = c->next)
    if (c->method == EPIC_GW_M_GENERATE && !c->d.closed && !c->d.status_started) {
      pthread_mutex_lock(&s->mu);
      int due = c->finished || c->in_engine;
      pthread_mutex_unlock(&s->mu);
      if (due && now < s->drain_deadline + SHUTDOWN_GRACE_S)
        return;
    }
  if (!s->fr.shutdown_started) {
    s->shutdown_deadline = now + SHUTDOWN_GRACE_S;
    epic_gw_front_shutdown(&s->fr);
  }
  /* The shutdown tag waits for every client connection to close; once no call
   * needs gRPC any more, idle connections are cut instead of waited for. */
  if (now >= s->shutdown_deadline || !grpc_busy(s))
    epic_gw_front_cancel_all(&s->fr);
}

/* ---- lifecycle ------------------------------------------------------------------ */

epic_status epic_gw_server_create(const epic_gw_server_params *p, epic_gw_server **out) {
  *out = NULL;
  if (!p || p->size != sizeof *p) {
    EPIC_LOG_ERROR("serve: epic_gw_server_params.size: unknown size");
    return EPIC_ERR_INVALID;
  }
  if (!p->engine || !p->engine_params || !p->config || !p->listen || p->max_context <= 0) {
    EPIC_LOG_ERROR("serve: epic_gw_server_params: engine, engine_params, config, listen and "
                   "max_context are required");
    return EPIC_ERR_INVALID;
  }
  epic_gw_server *s = calloc(1, sizeof *s);
  if (!s)
    return EPIC_ERR_NOMEM;
  s->p = *p;
  if (s->p.default_max_tokens <= 0)
    s->p.default_max_tokens = 128;
  if (s->p.max_request_bytes <= 0)
    s->p.max_request_bytes = 4 << 20;
  if (!(s->p.drain_timeout >= 0))
    s->p.drain_timeout = 30;
  s->eparams = *p->engine_params;
  s->cfg = *p->config;
  s->model_name = strdup(p->model_name ? p->model_name : "");
  s->comm_name = p->comm_name ? strdup(p->comm_name) : NULL;
  s->lim = (epic_gw_limits){.tok = p->tokenizer,
                            .vocab_size = p->config->vocab_size,
                            .max_context = p->max_context,
                            .default_max_tokens = s->p.default_max_tokens,
                            .kv_tokens = p->kv_tokens_per_worker,
                            .page_size = p->page_size,
                            .req = p->limits};
  s->auth = p->security ? p->security->auth : NULL;
  if (!s->model_name || pthread_mutex_init(&s->mu, NULL) != 0) {
    free(s->model_name);
    free(s->comm_name);
    free(s);
    return EPIC_ERR_NOMEM;
  }
  s->mu_ok = 1;

  grpc_init();
  /* gRPC's own cap sits well above ours so that a request that is merely too
   * large gets INVALID_ARGUMENT naming the limit, not gRPC's RESOURCE_EXHAUSTED. */
  int64_t cap = 2 * s->p.max_request_bytes > (64 << 20) ? 2 * s->p.max_request_bytes : (64 << 20);
  epic_gw_front_init(&s->fr, "serve");
  s->lame = grpc_lame_client_channel_create("epic-wake", GRPC_STATUS_UNAVAILABLE, "wake-up");
  epic_status lst = epic_gw_front_listen(&s->fr, p->listen, cap, p->security);
  if (lst != EPIC_OK) {
    epic_gw_server_destroy(s);
    return lst;
  }
  *out = s;
  return EPIC_OK;
}

int epic_gw_server_port(const epic_gw_server *s) {
  return s ? s->fr.port : 0;
}

void epic_gw_server_address(const epic_gw_server *s, char *out, size_t n) {
  epic_gw_format_addr(s->p.listen, s->fr.port, out, n);
}

epic_status epic_gw_server_run(epic_gw_server *s) {
  if (s->engine_started)
    return EPIC_ERR_INVALID;
  if (pthread_create(&s->engine_thread, NULL, engine_main, s) != 0) {
    EPIC_LOG_ERROR("serve: cannot start the engine thread");
    return EPIC_ERR_NOMEM;
  }
  s->engine_started = 1;
  for (;;) {
    epic_gw_front_poll(&s->fr, epic_gw_deadline(TICK_S), handle, s);
    /* Calls marked dirty with no wake-up queued: post_wake failed. Flush them here, or
     * their tokens and status would wait for some later call's wake-up. */
    pthread_mutex_lock(&s->mu);
    const int lost_wake = s->dirty && !s->wake_pending;
    pthread_mutex_unlock(&s->mu);
    if (lost_wake)
      on_wake(s);
    if (s->p.drain_requests && *s->p.drain_requests != s->drain_seen) {
      s->drain_seen = *s->p.drain_requests;
      begin_drain(s, "SIGTERM/SIGINT");
    }
    pthread_mutex_lock(&s->mu);
    int engine_done = s->engine_done;
    pthread_mutex_unlock(&s->mu);
    if (engine_done && !s->draining)
      begin_drain(s, "engine stopped");
    if (s->draining)
      drain_progress(s);
    if (s->fr.shutdown_done && !grpc_busy(s))
      break;
  }
  return s->engine_status;
}

void epic_gw_server_destroy(epic_gw_server *s) {
  if (!s)
    return;
  if (s->engine_started && !s->engine_joined) {
    /* run did not finish its drain (it always does; belt and braces). */
    epic_engine_shutdown(s->p.engine, 0);
    pthread_join(s->engine_thread, NULL);
    s->engine_joined = 1;
  }
  if (s->fr.srv) {
    if (!s->fr.started)
      s->fr.shutdown_done = 1; /* nothing was ever accepted */
    if (s->fr.started) {
      epic_gw_front_shutdown(&s->fr);
      grpc_server_cancel_all_calls(s->fr.srv);
    }
    /* Complete every outstanding op (cancelled calls finish fast) so that no
     * tag is left pointing at freed memory. */
    epic_gw_front_wait(&s->fr, grpc_busy, handle, s);
    grpc_channel_destroy(s->lame);
    epic_gw_front_drain_cq(&s->fr, handle, s);
    /* What is left was held by an engine that never finished it. */
    while (s->calls)
      call_free(s->calls);
    grpc_server_destroy(s->fr.srv);
    grpc_completion_queue_destroy(s->fr.cq);
    grpc_shutdown();
  }
  if (s->mu_ok)
    pthread_mutex_destroy(&s->mu);
  free(s->model_name);
  free(s->comm_name);
  free(s);
}
