/* The OpenAI-compatible HTTP front (coordinator/http.h): libmicrohttpd with a
 * thread per connection; each generation request is an exchange that the
 * backend's threads post events to and the connection thread formats. */
#define _GNU_SOURCE
#include "coordinator/http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <gnutls/gnutls.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "common/clock.h"
#include "common/log.h"
#include "coordinator/auth.h"
#include "coordinator/gateway_impl.h"
#include "coordinator/http_limits.h"
#include "coordinator/openai.h"
#include "coordinator/reasoning.h"

#define WAIT_TICK_MS 50

typedef struct buf {
  char *p;
  size_t n, cap;
} buf;

static epic_status buf_put(buf *b, const char *p, size_t n) {
  if (b->n + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + n + 1)
      cap *= 2;
    char *q = realloc(b->p, cap);
    if (!q)
      return EPIC_ERR_NOMEM;
    b->p = q;
    b->cap = cap;
  }
  if (n)
    memcpy(b->p + b->n, p, n);
  b->n += n;
  b->p[b->n] = '\0';
  return EPIC_OK;
}

typedef struct exch exch;

struct epic_http_sink {
  exch *x;
  int index;
  void *handle;
  int started, reasoning_on;
  epic_reasoning rp;
  /* Under x->mu: posted by the backend. */
  buf text;
  epic_http_token *toks;
  int n_toks, cap_toks;
  int finished, finish, err_status;
  int64_t prompt_tokens, completion_tokens;
  char err[256];
  /* Connection thread only. */
  int done;                  /* its finish was formatted */
  epic_reasoning_out rs, ct; /* non-streaming: the whole answer */
  cJSON *lp;                 /* non-streaming logprobs: chat content[] / completions object */
  int64_t text_offset;
};

struct exch {
  epic_http *h;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  epic_oai_request rq;
  int n;
  epic_http_sink *ch;
  char id[64];
  long long created;
  int fd;
  int refs;                /* under h->mu: the connection context and the stream response */
  int gone;                /* the client went away */
  int cancelled;           /* cancel sent to every choice */
  double t_start, t_first; /* received; first output (connection thread) */
  /* Moved from the connection (armed, under mu, once it is here), then charged and released
   * once (settled, under mu) when every choice finished, or at the end. */
  epic_auth_grant grant;
  int armed, settled;
  /* streaming (connection thread) */
  buf out;
  size_t out_off;
  int tail_done; /* usage and [DONE] written */
};

typedef struct conn_ctx {
  int endpoint;
  int too_large;
  buf body;
  exch *x;
  /* Admission, decided on the request's first call (before its body). */
  int refuse; /* 0, or the HTTP status (401, 403, 429) */
  int64_t retry_after_ms;
  char refuse_msg[EPIC_AUTH_MSG_LEN];
  epic_auth_grant grant; /* held until the request ends */
  char *authz;           /* the Authorization header (copied), or NULL */
} conn_ctx;

struct epic_http {
  epic_http_params p;
  char *model_name, *log;
  struct MHD_Daemon *d;
  int port;
  double start_time;
  pthread_mutex_t mu;
  uint64_t next_id;
  int64_t counts[EPIC_METRICS_EP_COUNT][EPIC_METRICS_CODE_COUNT];
  int64_t active;
  epic_hist ttft, tpot, e2e; /* gateway: the front's own timings */
  int64_t prompt_tokens, completion_tokens, finished;
  double drain_since;                /* 0 = not draining */
  char name_buf[256];                /* the backend's model name, once known (under mu) */
  epic_auth *auth;                   /* borrowed from params.security, or NULL */
  int mtls;                          /* client certificates required */
  char *tls_cert, *tls_key, *tls_ca; /* PEM text; libmicrohttpd keeps pointers */
};

/* The model id: the configured one, else the backend's once it answers
 * (asked with the client's authorization, authz may be NULL). */
static const char *model_id_as(epic_http *h, const char *authz) {
  if (h->model_name)
    return h->model_name;
  pthread_mutex_lock(&h->mu);
  int known = h->name_buf[0] != '\0';
  pthread_mutex_unlock(&h->mu);
  if (!known && h->p.ops->model_name) {
    const char *n = h->p.ops->model_name(h->p.backend, authz, authz ? strlen(authz) : 0);
    pthread_mutex_lock(&h->mu);
    if (n && !h->name_buf[0])
      snprintf(h->name_buf, sizeof h->name_buf, "%s", n);
    pthread_mutex_unlock(&h->mu);
  }
  return h->name_buf[0] ? h->name_buf : "epic";
}

static const char *model_id(epic_http *h) {
  return model_id_as(h, NULL);
}

/* ---- draining and counters ----------------------------------------------------------- */

static int draining(epic_http *h, double *since) {
  int d = h->p.drain_requests && *h->p.drain_requests;
  pthread_mutex_lock(&h->mu);
  if (d && h->drain_since == 0)
    h->drain_since = epic_now_seconds();
  if (since)
    *since = h->drain_since;
  pthread_mutex_unlock(&h->mu);
  return d;
}

static void count(epic_http *h, int endpoint, int status) {
  int c = status >= 500   ? EPIC_METRICS_CODE_5XX
          : status >= 400 ? EPIC_METRICS_CODE_4XX
                          : EPIC_METRICS_CODE_2XX;
  pthread_mutex_lock(&h->mu);
  h->counts[endpoint][c]++;
  pthread_mutex_unlock(&h->mu);
}

/* ---- plain responses ----------------------------------------------------------------- */

static enum MHD_Result respond(epic_http *h, struct MHD_Connection *c, int endpoint, int status,
                               const char *type, const char *body, size_t n) {
  struct MHD_Response *r = MHD_create_response_from_buffer(n, (void *)body, MHD_RESPMEM_MUST_COPY);
  if (!r)
    return MHD_NO;
  MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
  enum MHD_Result ok = MHD_queue_response(c, (unsigned)status, r);
  MHD_destroy_response(r);
  count(h, endpoint, status);
  return ok;
}

static enum MHD_Result respond_json(epic_http *h, struct MHD_Connection *c, int endpoint,
                                    int status, cJSON *j) {
  char *s = j ? cJSON_PrintUnformatted(j) : NULL;
  cJSON_Delete(j);
  if (!s)
    return respond(h, c, endpoint, 500, "text/plain", "out of memory\n", 14);
  enum MHD_Result ok = respond(h, c, endpoint, status, "application/json", s, strlen(s));
  free(s);
  return ok;
}

static enum MHD_Result respond_error(epic_http *h, struct MHD_Connection *c, int endpoint,
                                     const epic_oai_error *e) {
  char *s = epic_oai_error_json(e);
  if (!s)
    return respond(h, c, endpoint, 500, "text/plain", "out of memory\n", 14);
  EPIC_LOG_INFO("%s: http %d: %s", h->log, e->http_status, e->message);
  enum MHD_Result ok = respond(h, c, endpoint, e->http_status, "application/json", s, strlen(s));
  free(s);
  return ok;
}

static enum MHD_Result error_simple(epic_http *h, struct MHD_Connection *c, int endpoint,
                                    int status, const char *type, const char *param,
                                    const char *msg) {
  epic_oai_error e;
  epic_oai_error_set(&e, status, type, param, NULL, "%s", msg);
  return respond_error(h, c, endpoint, &e);
}

/* ---- sink (backend threads) ----------------------------------------------------------- */

epic_status epic_http_sink_output(epic_http_sink *s, const char *text, size_t n,
                                  const epic_http_token *toks, int n_toks) {
  exch *x = s->x;
  epic_status st = EPIC_OK;
  pthread_mutex_lock(&x->mu);
  if (n)
    st = buf_put(&s->text, text, n);
  if (st == EPIC_OK && n_toks > 0) {
    if (s->n_toks + n_toks > s->cap_toks) {
      int cap = s->cap_toks ? s->cap_toks : 16;
      while (cap < s->n_toks + n_toks)
        cap *= 2;
      epic_http_token *t = realloc(s->toks, (size_t)cap * sizeof *t);
      if (t) {
        s->toks = t;
        s->cap_toks = cap;
      } else {
        st = EPIC_ERR_NOMEM;
      }
    }
    if (st == EPIC_OK) {
      memcpy(s->toks + s->n_toks, toks, (size_t)n_toks * sizeof *toks);
      s->n_toks += n_toks;
    }
  }
  pthread_cond_broadcast(&x->cv);
  pthread_mutex_unlock(&x->mu);
  return st;
}

/* The exchange's key grant charged with the tokens its choices generated and its stream
 * slot given back, once (x->mu held). */
static void grant_settle_locked(exch *x) {
  epic_http *h = x->h;
  if (x->settled)
    return;
  x->settled = 1;
  if (!h->auth)
    return;
  int64_t generated = 0;
  for (int i = 0; i < x->n; i++)
    generated += x->ch[i].completion_tokens;
  epic_auth_charge(h->auth, &x->grant, generated);
  epic_auth_release(h->auth, &x->grant);
}

/* Settle the grant as soon as the exchange holds it and every choice has finished (x->mu
 * held): before the response's last bytes go out, so that a client that sends its next
 * request the moment it has them is not refused for a stream that is over. */
static void grant_settle_done_locked(exch *x) {
  if (!x->armed)
    return;
  for (int i = 0; i < x->n; i++)
    if (!x->ch[i].started || !x->ch[i].finished)
      return;
  grant_settle_locked(x);
}

void epic_http_sink_finish(epic_http_sink *s, int finish, int64_t prompt_tokens,
                           int64_t completion_tokens, int http_status, const char *msg) {
  exch *x = s->x;
  pthread_mutex_lock(&x->mu);
  s->finished = 1;
  s->finish = finish;
  s->prompt_tokens = prompt_tokens;
  s->completion_tokens = completion_tokens;
  s->err_status = http_status;
  snprintf(s->err, sizeof s->err, "%s", msg ? msg : "");
  grant_settle_done_locked(x);
  pthread_cond_broadcast(&x->cv);
  pthread_mutex_unlock(&x->mu);
}

/* ---- exchanges ------------------------------------------------------------------------ */

static void cancel_all(exch *x) {
  if (x->cancelled)
    return;
  x->cancelled = 1;
  for (int i = 0; i < x->n; i++) {
    pthread_mutex_lock(&x->mu);
    int live = x->ch[i].started && !x->ch[i].finished;
    pthread_mutex_unlock(&x->mu);
    if (live)
      x->h->p.ops->cancel(x->h->p.backend, x->ch[i].handle);
  }
}

static void exch_free(exch *x) {
  epic_http *h = x->h;
  cancel_all(x);
  pthread_mutex_lock(&x->mu);
  for (int i = 0; i < x->n; i++)
    while (x->ch[i].started && !x->ch[i].finished)
      pthread_cond_wait(&x->cv, &x->mu);
  grant_settle_locked(x); /* a choice that never started: not settled yet */
  pthread_mutex_unlock(&x->mu);
  /* Without an engine to count them (the gateway), the front counts itself. */
  int64_t prompt = 0, completion = 0;
  int ok = x->n > 0;
  for (int i = 0; i < x->n; i++) {
    ok &= x->ch[i].started && x->ch[i].finish != EPIC_HTTP_FINISH_ERROR;
    prompt = x->ch[i].prompt_tokens > prompt ? x->ch[i].prompt_tokens : prompt;
    completion += x->ch[i].completion_tokens;
  }
  if (ok && !h->p.ops->metrics) {
    const double now = epic_now_seconds();
    pthread_mutex_lock(&h->mu);
    h->finished++;
    h->prompt_tokens += prompt;
    h->completion_tokens += completion;
    if (x->t_first > 0) {
      epic_hist_observe(&h->ttft, x->t_first - x->t_start);
      if (completion > x->n)
        epic_hist_observe(&h->tpot,
                          (now - x->t_first) /
                              (double)(completion / x->n - 1 > 0 ? completion / x->n - 1 : 1));
    }
    epic_hist_observe(&h->e2e, now - x->t_start);
    pthread_mutex_unlock(&h->mu);
  }
  for (int i = 0; i < x->n; i++) {
    epic_http_sink *s = &x->ch[i];
    if (s->started)
      h->p.ops->release(h->p.backend, s->handle);
    free(s->text.p);
    free(s->toks);
    epic_reasoning_out_free(&s->rs);
    epic_reasoning_out_free(&s->ct);
    cJSON_Delete(s->lp);
  }
  free(x->ch);
  free(x->out.p);
  epic_oai_request_clear(&x->rq);
  pthread_cond_destroy(&x->cv);
  pthread_mutex_destroy(&x->mu);
  pthread_mutex_lock(&h->mu);
  h->active--;
  pthread_mutex_unlock(&h->mu);
  free(x);
}

static void exch_unref(exch *x) {
  epic_http *h = x->h;
  pthread_mutex_lock(&h->mu);
  int last = --x->refs == 0;
  pthread_mutex_unlock(&h->mu);
  if (last)
    exch_free(x);
}

/* Whether the client closed its side (checked while waiting for tokens). */
static int client_gone(int fd) {
  if (fd < 0)
    return 0;
  struct pollfd p = {.fd = fd, .events = POLLRDHUP};
  if (poll(&p, 1, 0) <= 0)
    return 0;
  return (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

/* Blocks until some choice has output or a finish to format, the client is
 * gone, or the drain timeout passed (then everything is cancelled and the
 * finishes follow). Returns with nothing held. */
static void wait_events(exch *x) {
  for (;;) {
    pthread_mutex_lock(&x->mu);
    for (int i = 0; i < x->n; i++) {
      epic_http_sink *s = &x->ch[i];
      if (!s->done && (s->text.n || s->n_toks || s->finished)) {
        pthread_mutex_unlock(&x->mu);
        return;
      }
    }
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_nsec += WAIT_TICK_MS * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
      until.tv_sec++;
      until.tv_nsec -= 1000000000L;
    }
    int rc = pthread_cond_timedwait(&x->cv, &x->mu, &until);
    pthread_mutex_unlock(&x->mu);
    if (rc == ETIMEDOUT) {
      double since;
      if (!x->gone && client_gone(x->fd)) {
        x->gone = 1;
        EPIC_LOG_INFO("%s: %s: client went away, cancelling", x->h->log, x->id);
        cancel_all(x);
      }
      if (draining(x->h, &since) && epic_now_seconds() > since + x->h->p.drain_timeout &&
          !x->cancelled) {
        EPIC_LOG_WARN("%s: %s: drain timeout, cancelling", x->h->log, x->id);
        cancel_all(x);
      }
    }
  }
}

/* The token's text for logprobs. */
static cJSON *tok_string(epic_http *h, int32_t id, cJSON **bytes) {
  size_t n = 0;
  const char *t = h->p.ops->token_bytes ? h->p.ops->token_bytes(h->p.backend, id, &n) : NULL;
  char tmp[32];
  if (!t) {
    snprintf(tmp, sizeof tmp, "token_id:%d", (int)id);
    t = tmp;
    n = strlen(tmp);
  }
  if (bytes) {
    *bytes = cJSON_CreateArray();
    for (size_t i = 0; *bytes && i < n; i++)
      cJSON_AddItemToArray(*bytes, cJSON_CreateNumber((unsigned char)t[i]));
  }
  return epic_oai_string(t, n);
}

/* Appends toks as logprobs: chat {"content":[...]} entries to arr, or
 * completions' parallel arrays to obj. */
static void add_logprobs(exch *x, epic_http_sink *s, cJSON *lp, const epic_http_token *toks,
                         int n) {
  epic_http *h = x->h;
  if (x->rq.chat) {
    cJSON *content = cJSON_GetObjectItemCaseSensitive(lp, "content");
    for (int i = 0; i < n; i++) {
      cJSON *e = cJSON_CreateObject(), *bytes = NULL;
      cJSON_AddItemToObject(e, "token", tok_string(h, toks[i].id, &bytes));
      cJSON_AddNumberToObject(e, "logprob", toks[i].logprob);
      cJSON_AddItemToObject(e, "bytes", bytes);
      cJSON *top = cJSON_AddArrayToObject(e, "top_logprobs");
      for (int k = 0; k < toks[i].n_top && k < x->rq.top_logprobs; k++) {
        cJSON *t = cJSON_CreateObject(), *tb = NULL;
        cJSON_AddItemToObject(t, "token", tok_string(h, toks[i].top_ids[k], &tb));
        cJSON_AddNumberToObject(t, "logprob", toks[i].top_lps[k]);
        cJSON_AddItemToObject(t, "bytes", tb);
        cJSON_AddItemToArray(top, t);
      }
      cJSON_AddItemToArray(content, e);
    }
    return;
  }
  cJSON *tokens = cJSON_GetObjectItemCaseSensitive(lp, "tokens");
  cJSON *tlp = cJSON_GetObjectItemCaseSensitive(lp, "token_logprobs");
  cJSON *top = cJSON_GetObjectItemCaseSensitive(lp, "top_logprobs");
  cJSON *off = cJSON_GetObjectItemCaseSensitive(lp, "text_offset");
  for (int i = 0; i < n; i++) {
    size_t len = 0;
    const char *b =
        h->p.ops->token_bytes ? h->p.ops->token_bytes(h->p.backend, toks[i].id, &len) : NULL;
    cJSON_AddItemToArray(tokens, tok_string(h, toks[i].id, NULL));
    cJSON_AddItemToArray(tlp, cJSON_CreateNumber(toks[i].logprob));
    cJSON_AddItemToArray(off, cJSON_CreateNumber((double)s->text_offset));
    s->text_offset += b ? (int64_t)len : 0;
    cJSON *m = cJSON_CreateObject();
    for (int k = 0; k < toks[i].n_top && k < x->rq.top_logprobs; k++) {
      cJSON *ts = tok_string(h, toks[i].top_ids[k], NULL);
      if (ts && cJSON_IsString(ts) && !cJSON_GetObjectItemCaseSensitive(m, ts->valuestring))
        cJSON_AddNumberToObject(m, ts->valuestring, toks[i].top_lps[k]);
      cJSON_Delete(ts);
    }
    cJSON_AddItemToArray(top, m);
  }
}

static cJSON *new_logprobs(const exch *x) {
  cJSON *lp = cJSON_CreateObject();
  if (x->rq.chat) {
    cJSON_AddArrayToObject(lp, "content");
  } else {
    cJSON_AddArrayToObject(lp, "tokens");
    cJSON_AddArrayToObject(lp, "token_logprobs");
    cJSON_AddArrayToObject(lp, "top_logprobs");
    cJSON_AddArrayToObject(lp, "text_offset");
  }
  return lp;
}

static const char *finish_name(int f) {
  return f == EPIC_HTTP_FINISH_LENGTH ? "length" : "stop";
}

static cJSON *chunk_head(const exch *x) {
  cJSON *j = cJSON_CreateObject();
  cJSON_AddStringToObject(j, "id", x->id);
  cJSON_AddStringToObject(j, "object", x->rq.chat ? "chat.completion.chunk" : "text_completion");
  cJSON_AddNumberToObject(j, "created", (double)x->created);
  cJSON_AddStringToObject(j, "model", model_id(x->h));
  return j;
}

static cJSON *usage_json(const exch *x) {
  int64_t prompt = 0, completion = 0;
  for (int i = 0; i < x->n; i++) {
    if (x->ch[i].prompt_tokens > prompt)
      prompt = x->ch[i].prompt_tokens; /* every choice has the same prompt */
    completion += x->ch[i].completion_tokens;
  }
  cJSON *u = cJSON_CreateObject();
  cJSON_AddNumberToObject(u, "prompt_tokens", (double)prompt);
  cJSON_AddNumberToObject(u, "completion_tokens", (double)completion);
  cJSON_AddNumberToObject(u, "total_tokens", (double)(prompt + completion));
  return u;
}

static void emit(exch *x, cJSON *j) {
  char *s = cJSON_PrintUnformatted(j);
  cJSON_Delete(j);
  if (!s)
    return;
  buf_put(&x->out, "data: ", 6);
  buf_put(&x->out, s, strlen(s));
  buf_put(&x->out, "\n\n", 2);
  free(s);
}

/* One streamed chunk for choice s: reasoning / content text, logprobs, and
 * the finish reason when fin. */
static void emit_choice(exch *x, epic_http_sink *s, const char *rs, size_t n_rs, const char *ct,
                        size_t n_ct, const epic_http_token *toks, int n_toks, int fin) {
  cJSON *j = chunk_head(x), *choices = cJSON_AddArrayToObject(j, "choices");
  cJSON *c = cJSON_CreateObject();
  cJSON_AddNumberToObject(c, "index", s->index);
  if (x->rq.chat) {
    cJSON *d = cJSON_AddObjectToObject(c, "delta");
    if (n_rs)
      cJSON_AddItemToObject(d, "reasoning_content", epic_oai_string(rs, n_rs));
    if (n_ct)
      cJSON_AddItemToObject(d, "content", epic_oai_string(ct, n_ct));
  } else {
    cJSON_AddItemToObject(c, "text", epic_oai_string(ct, n_ct));
  }
  if (x->rq.logprobs && n_toks > 0) {
    cJSON *lp = new_logprobs(x);
    add_logprobs(x, s, lp, toks, n_toks);
    cJSON_AddItemToObject(c, "logprobs", lp);
  } else {
    cJSON_AddNullToObject(c, "logprobs");
  }
  if (fin)
    cJSON_AddStringToObject(c, "finish_reason", finish_name(s->finish));
  else
    cJSON_AddNullToObject(c, "finish_reason");
  cJSON_AddItemToArray(choices, c);
  if (x->rq.include_usage)
    cJSON_AddNullToObject(j, "usage");
  emit(x, j);
}

/* The OpenAI error type of a status a backend reported (an upstream's refusal
 * keeps its meaning: 400, 401, 429). */
static const char *error_type(int status) {
  switch (status) {
  case 400: return "invalid_request_error";
  case 401: return "authentication_error";
  case 403: return "permission_error";
  case 429: return "rate_limit_exceeded";
  case 503: return "service_unavailable";
  default: return "server_error";
  }
}

static void emit_error(exch *x, int status, const char *msg) {
  epic_oai_error e;
  epic_oai_error_set(&e, status, error_type(status), NULL, NULL, "%s", msg);
  char *s = epic_oai_error_json(&e);
  if (s) {
    buf_put(&x->out, "data: ", 6);
    buf_put(&x->out, s, strlen(s));
    buf_put(&x->out, "\n\n", 2);
    free(s);
  }
}

/* Takes every choice's pending events and formats them: SSE chunks into
 * x->out when streaming, the accumulators otherwise. */
static void process(exch *x) {
  for (int i = 0; i < x->n; i++) {
    epic_http_sink *s = &x->ch[i];
    if (s->done)
      continue;
    pthread_mutex_lock(&x->mu);
    buf text = s->text;
    epic_http_token *toks = s->toks;
    int n_toks = s->n_toks, fin = s->finished;
    s->text = (buf){0};
    s->toks = NULL;
    s->n_toks = s->cap_toks = 0;
    pthread_mutex_unlock(&x->mu);
    if (x->t_first == 0 && (text.n || n_toks))
      x->t_first = epic_now_seconds();
    epic_reasoning_out rs = {0}, ct = {0};
    epic_reasoning_out *prs = x->rq.stream ? &rs : &s->rs, *pct = x->rq.stream ? &ct : &s->ct;
    if (s->reasoning_on) {
      epic_reasoning_push(&s->rp, text.p, text.n, prs, pct);
      if (fin)
        epic_reasoning_finish(&s->rp, prs, pct);
    } else if (text.n) {
      buf b = {.p = pct->p, .n = pct->n, .cap = pct->cap}; /* the same layout */
      buf_put(&b, text.p, text.n);
      pct->p = b.p;
      pct->n = b.n;
      pct->cap = b.cap;
    }
    if (x->rq.stream) {
      if (rs.n || ct.n || (x->rq.logprobs && n_toks) || (!x->rq.chat && text.n))
        emit_choice(x, s, rs.p, rs.n, ct.p, ct.n, toks, n_toks, 0);
      if (fin) {
        if (s->finish == EPIC_HTTP_FINISH_ERROR)
          emit_error(x, s->err_status, s->err);
        else
          emit_choice(x, s, NULL, 0, NULL, 0, NULL, 0, 1);
      }
    } else if (x->rq.logprobs && n_toks) {
      if (!s->lp)
        s->lp = new_logprobs(x);
      add_logprobs(x, s, s->lp, toks, n_toks);
    }
    if (fin)
      s->done = 1;
    epic_reasoning_out_free(&rs);
    epic_reasoning_out_free(&ct);
    free(text.p);
    free(toks);
  }
}

static int all_done(const exch *x) {
  for (int i = 0; i < x->n; i++)
    if (!x->ch[i].done)
      return 0;
  return 1;
}

/* ---- starting a generation request ------------------------------------------------------ */

static uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* Parses and starts; on failure fills err and returns NULL. */
static exch *start_exchange(epic_http *h, struct MHD_Connection *c, conn_ctx *ctx,
                            epic_oai_error *err) {
  const char *authz = ctx->authz;
  exch *x = calloc(1, sizeof *x);
  if (!x) {
    epic_oai_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
    return NULL;
  }
  x->h = h;
  x->refs = 1;
  x->fd = -1;
  x->t_start = epic_now_seconds();
  pthread_mutex_init(&x->mu, NULL);
  pthread_cond_init(&x->cv, NULL);
  pthread_mutex_lock(&h->mu);
  h->active++;
  uint64_t seq = ++h->next_id;
  pthread_mutex_unlock(&h->mu);
  const int chat = ctx->endpoint == EPIC_METRICS_EP_CHAT;
  if (epic_oai_parse(ctx->body.p ? ctx->body.p : "", ctx->body.n, chat, &x->rq, err) != EPIC_OK)
    goto fail;
  if (strcmp(x->rq.model, model_id_as(h, authz)) != 0) {
    epic_oai_error_set(err, 404, "invalid_request_error", "model", "model_not_found",
                       "model: '%.200s' is not served here (GET /v1/models lists '%.200s')",
                       x->rq.model, model_id(h));
    goto fail;
  }
  if (epic_http_check_limits(&x->rq, &h->p.limits, h->p.full_limits, err) != EPIC_OK)
    goto fail;
  if (x->rq.top_logprobs > h->p.ops->max_top_logprobs) {
    epic_oai_error_set(err, 400, "invalid_request_error", chat ? "top_logprobs" : "logprobs", NULL,
                       "%s: %d alternatives per token exceed this server's limit of %d",
                       chat ? "top_logprobs" : "logprobs", x->rq.top_logprobs,
                       h->p.ops->max_top_logprobs);
    goto fail;
  }
  const union MHD_ConnectionInfo *ci =
      MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
  x->fd = ci ? ci->connect_fd : -1;
  x->created = (long long)time(NULL);
  snprintf(x->id, sizeof x->id, "%s-%llx%06llx", chat ? "chatcmpl" : "cmpl",
           (unsigned long long)x->created, (unsigned long long)seq);
  x->n = x->rq.n;
  x->ch = calloc((size_t)x->n, sizeof *x->ch);
  if (!x->ch) {
    epic_oai_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
    goto fail;
  }
  uint64_t seed =
      x->rq.has_seed ? x->rq.seed : mix64((uint64_t)epic_now_seconds() * 1000003u ^ seq);
  for (int i = 0; i < x->n; i++) {
    epic_http_sink *s = &x->ch[i];
    s->x = x;
    s->index = i;
    epic_http_gen g = {.messages = x->rq.messages,
                       .chat_template = x->rq.chat_template,
                       .prompt_text = x->rq.prompt_text,
                       .prompt_len = x->rq.prompt_len,
                       .prompt_ids = x->rq.prompt_ids,
                       .n_prompt_ids = x->rq.n_prompt_ids,
                       .max_tokens = x->rq.max_tokens,
                       .temperature = x->rq.temperature,
                       .top_p = x->rq.top_p,
                       .seed = seed + (uint64_t)i,
                       .stops = x->rq.stops,
                       .stop_lens = x->rq.stop_lens,
                       .n_stops = x->rq.n_stops,
                       .logprobs = x->rq.logprobs,
                       .top_logprobs = x->rq.top_logprobs,
                       .ignore_eos = x->rq.ignore_eos,
                       .authorization = authz,
                       .authorization_len = authz ? strlen(authz) : 0};
    char msg[400], param[64] = "";
    int open = 0;
    msg[0] = '\0';
    int st = h->p.ops->start(h->p.backend, &g, s, &s->handle, &open, msg, sizeof msg, param,
                             sizeof param);
    if (st != 0) {
      epic_oai_error_set(err, st,
                         st == 429   ? "rate_limit_exceeded"
                         : st == 503 ? "service_unavailable"
                         : st >= 500 ? "server_error"
                                     : "invalid_request_error",
                         param[0] ? param : NULL, NULL, "%s", msg[0] ? msg : "request failed");
      goto fail;
    }
    s->started = 1;
    s->reasoning_on = chat && h->p.reasoning;
    epic_reasoning_init(&s->rp, open);
  }
  return x;
fail:
  exch_unref(x); /* cancels and waits for what started */
  return NULL;
}

/* ---- streaming ------------------------------------------------------------------------- */

static ssize_t stream_read(void *cls, uint64_t pos, char *out, size_t max) {
  exch *x = cls;
  (void)pos;
  for (;;) {
    if (x->out_off < x->out.n) {
      size_t k = x->out.n - x->out_off < max ? x->out.n - x->out_off : max;
      memcpy(out, x->out.p + x->out_off, k);
      x->out_off += k;
      return (ssize_t)k;
    }
    x->out.n = x->out_off = 0;
    if (x->tail_done)
      return MHD_CONTENT_READER_END_OF_STREAM;
    if (x->gone)
      return MHD_CONTENT_READER_END_WITH_ERROR;
    if (all_done(x)) {
      if (x->rq.include_usage) {
        cJSON *j = chunk_head(x);
        cJSON_AddArrayToObject(j, "choices");
        cJSON_AddItemToObject(j, "usage", usage_json(x));
        emit(x, j);
      }
      buf_put(&x->out, "data: [DONE]\n\n", 14);
      x->tail_done = 1;
      continue;
    }
    wait_events(x);
    process(x);
  }
}

static void stream_free(void *cls) {
  exch_unref(cls);
}

static enum MHD_Result serve_generation(epic_http *h, struct MHD_Connection *c, conn_ctx *ctx) {
  epic_oai_error err;
  if (ctx->too_large) {
    epic_oai_error_set(&err, 413, "invalid_request_error", NULL, NULL,
                       "request body: larger than --max-request-bytes %lld",
                       (long long)h->p.max_request_bytes);
    return respond_error(h, c, ctx->endpoint, &err);
  }
  if (draining(h, NULL) || (h->p.ops->ready && !h->p.ops->ready(h->p.backend)))
    return error_simple(h, c, ctx->endpoint, 503, "service_unavailable", NULL,
                        "server is draining (shutting down) or not ready: not accepting new "
                        "requests");
  exch *x = start_exchange(h, c, ctx, &err);
  if (!x)
    return respond_error(h, c, ctx->endpoint, &err);
  ctx->x = x;
  pthread_mutex_lock(&x->mu);
  x->grant = ctx->grant; /* the exchange charges and releases it (grant_settle_locked) */
  x->armed = 1;
  grant_settle_done_locked(x); /* every choice may have finished already */
  pthread_mutex_unlock(&x->mu);
  memset(&ctx->grant, 0, sizeof ctx->grant);
  if (x->rq.stream) {
    if (x->rq.chat)
      for (int i = 0; i < x->n; i++) {
        /* The first chunk of each choice carries the role, as OpenAI's do. */
        cJSON *j = chunk_head(x), *choices = cJSON_AddArrayToObject(j, "choices");
        cJSON *ch = cJSON_CreateObject();
        cJSON_AddNumberToObject(ch, "index", i);
        cJSON *d = cJSON_AddObjectToObject(ch, "delta");
        cJSON_AddStringToObject(d, "role", "assistant");
        cJSON_AddStringToObject(d, "content", "");
        cJSON_AddNullToObject(ch, "logprobs");
        cJSON_AddNullToObject(ch, "finish_reason");
        cJSON_AddItemToArray(choices, ch);
        if (x->rq.include_usage)
          cJSON_AddNullToObject(j, "usage");
        emit(x, j);
      }
    struct MHD_Response *r =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, stream_read, x, stream_free);
    if (!r)
      return MHD_NO;
    pthread_mutex_lock(&h->mu);
    x->refs++;
    pthread_mutex_unlock(&h->mu);
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    enum MHD_Result ok = MHD_queue_response(c, MHD_HTTP_OK, r);
    MHD_destroy_response(r);
    count(h, ctx->endpoint, 200);
    return ok;
  }
  while (!all_done(x) && !x->gone) {
    wait_events(x);
    process(x);
  }
  if (x->gone) {
    count(h, ctx->endpoint, 400); /* the client closed: counted as a 4xx */
    return MHD_NO;
  }
  for (int i = 0; i < x->n; i++)
    if (x->ch[i].finish == EPIC_HTTP_FINISH_ERROR)
      return error_simple(h, c, ctx->endpoint, x->ch[i].err_status ? x->ch[i].err_status : 500,
                          error_type(x->ch[i].err_status), NULL, x->ch[i].err);
  cJSON *j = chunk_head(x), *choices = cJSON_AddArrayToObject(j, "choices");
  cJSON_ReplaceItemInObject(j, "object",
                            cJSON_CreateString(x->rq.chat ? "chat.completion" : "text_completion"));
  for (int i = 0; i < x->n; i++) {
    epic_http_sink *s = &x->ch[i];
    cJSON *ch = cJSON_CreateObject();
    cJSON_AddNumberToObject(ch, "index", i);
    if (x->rq.chat) {
      cJSON *m = cJSON_AddObjectToObject(ch, "message");
      cJSON_AddStringToObject(m, "role", "assistant");
      cJSON_AddItemToObject(m, "content", epic_oai_string(s->ct.p ? s->ct.p : "", s->ct.n));
      if (s->rs.n)
        cJSON_AddItemToObject(m, "reasoning_content", epic_oai_string(s->rs.p, s->rs.n));
    } else {
      cJSON_AddItemToObject(ch, "text", epic_oai_string(s->ct.p ? s->ct.p : "", s->ct.n));
    }
    if (x->rq.logprobs) {
      cJSON_AddItemToObject(ch, "logprobs", s->lp ? s->lp : new_logprobs(x));
      s->lp = NULL;
    } else {
      cJSON_AddNullToObject(ch, "logprobs");
    }
    cJSON_AddStringToObject(ch, "finish_reason", finish_name(s->finish));
    cJSON_AddItemToArray(choices, ch);
  }
  cJSON_AddItemToObject(j, "usage", usage_json(x));
  return respond_json(h, c, ctx->endpoint, 200, j);
}

/* ---- other endpoints -------------------------------------------------------------------- */

static enum MHD_Result serve_models(epic_http *h, struct MHD_Connection *c, const char *authz) {
  cJSON *j = cJSON_CreateObject();
  cJSON_AddStringToObject(j, "object", "list");
  cJSON *data = cJSON_AddArrayToObject(j, "data"), *m = cJSON_CreateObject();
  cJSON_AddStringToObject(m, "id", model_id_as(h, authz));
  cJSON_AddStringToObject(m, "object", "model");
  cJSON_AddNumberToObject(m, "created", (double)(long long)h->start_time);
  cJSON_AddStringToObject(m, "owned_by", "epic");
  cJSON_AddItemToArray(data, m);
  return respond_json(h, c, EPIC_METRICS_EP_MODELS, 200, j);
}

static enum MHD_Result serve_metrics(epic_http *h, struct MHD_Connection *c) {
  epic_metrics_snapshot s;
  memset(&s, 0, sizeof s);
  s.model_name = model_id(h);
  s.process_start_time = h->start_time;
  if (h->p.ops->metrics)
    h->p.ops->metrics(h->p.backend, &s);
  pthread_mutex_lock(&h->mu);
  memcpy(s.http_requests, h->counts, sizeof s.http_requests);
  s.http_streams_active = h->active;
  if (!h->p.ops->metrics) {
    s.requests_running = h->active;
    s.prompt_tokens_total = h->prompt_tokens;
    s.generation_tokens_total = h->completion_tokens;
    s.requests_finished_total = h->finished;
    s.ttft = h->ttft;
    s.tpot = h->tpot;
    s.e2e = h->e2e;
  }
  pthread_mutex_unlock(&h->mu);
  epic_metrics_buf b = {0};
  epic_status st = epic_metrics_render(&s, &b);
  /* The scrape itself is counted in the next one. */
  enum MHD_Result ok = st == EPIC_OK ? respond(h, c, EPIC_METRICS_EP_METRICS, 200,
                                               "text/plain; version=0.0.4; charset=utf-8", b.p, b.n)
                                     : respond(h, c, EPIC_METRICS_EP_METRICS, 500, "text/plain",
                                               "out of memory\n", 14);
  epic_metrics_buf_free(&b);
  free(s.expert_tokens);
  return ok;
}

static enum MHD_Result serve_health(epic_http *h, struct MHD_Connection *c) {
  if (draining(h, NULL))
    return respond(h, c, EPIC_METRICS_EP_HEALTH, 503, "application/json",
                   "{\"status\":\"draining\"}", 20);
  if (h->p.ops->ready && !h->p.ops->ready(h->p.backend))
    return respond(h, c, EPIC_METRICS_EP_HEALTH, 503, "application/json",
                   "{\"status\":\"unavailable\"}", 24);
  return respond(h, c, EPIC_METRICS_EP_HEALTH, 200, "application/json", "{\"status\":\"ok\"}", 15);
}

/* ---- libmicrohttpd callbacks ------------------------------------------------------------ */

static int classify(const char *url) {
  static const char *paths[] = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
                                "/metrics"};
  size_t n = strcspn(url, "?");
  while (n > 1 && url[n - 1] == '/')
    n--;
  for (int i = 0; i < EPIC_METRICS_EP_OTHER; i++)
    if (strlen(paths[i]) == n && strncmp(url, paths[i], n) == 0)
      return i;
  return EPIC_METRICS_EP_OTHER;
}

/* ---- admission (TLS client certificates, API keys, rate limits) ---------------------------- */

/* Whether the connection's client presented a certificate that the
 * --tls-client-ca trust list verifies (the handshake already required one:
 * on_connection; this guards every request again). */
static int client_cert_ok(struct MHD_Connection *c) {
  const union MHD_ConnectionInfo *ci =
      MHD_get_connection_info(c, MHD_CONNECTION_INFO_GNUTLS_SESSION);
  if (!ci || !ci->tls_session)
    return 0;
  gnutls_session_t s = (gnutls_session_t)ci->tls_session;
  unsigned n = 0, status = 0;
  if (!gnutls_certificate_get_peers(s, &n) || n == 0)
    return 0;
  return gnutls_certificate_verify_peers2(s, &status) == GNUTLS_E_SUCCESS && status == 0;
}

/* libmicrohttpd only requests a client certificate when given a trust list:
 * make the handshake require and verify one, as the gRPC listener does. */
static void on_connection(void *cls, struct MHD_Connection *c, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe) {
  epic_http *h = cls;
  (void)socket_context;
  if (toe != MHD_CONNECTION_NOTIFY_STARTED || !h->mtls)
    return;
  const union MHD_ConnectionInfo *ci =
      MHD_get_connection_info(c, MHD_CONNECTION_INFO_GNUTLS_SESSION);
  if (!ci || !ci->tls_session)
    return; /* then every request is refused by client_cert_ok */
  gnutls_session_t s = (gnutls_session_t)ci->tls_session;
  gnutls_certificate_server_set_request(s, GNUTLS_CERT_REQUIRE);
  gnutls_session_set_verify_cert(s, NULL, 0);
}

/* Decides on the first call of a request (headers only) whether it may go on:
 * sets ctx->refuse, or holds the grant and the Authorization copy. */
static void admit(epic_http *h, struct MHD_Connection *c, conn_ctx *ctx) {
  if (h->mtls && !client_cert_ok(c)) {
    ctx->refuse = 403;
    snprintf(ctx->refuse_msg, sizeof ctx->refuse_msg,
             "client certificate: none presented or not signed by --tls-client-ca");
    return;
  }
  const char *az = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
  if (az && !(ctx->authz = strdup(az))) {
    ctx->refuse = 500;
    snprintf(ctx->refuse_msg, sizeof ctx->refuse_msg, "out of memory");
    return;
  }
  /* Health stays open (as gRPC Health); an unknown path gets its 404. */
  if (!h->auth || ctx->endpoint == EPIC_METRICS_EP_HEALTH || ctx->endpoint == EPIC_METRICS_EP_OTHER)
    return;
  const int gen =
      ctx->endpoint == EPIC_METRICS_EP_CHAT || ctx->endpoint == EPIC_METRICS_EP_COMPLETIONS;
  epic_auth_result r;
  epic_auth_verdict v = epic_auth_admit(h->auth, az, az ? strlen(az) : 0, gen, &ctx->grant, &r);
  if (v == EPIC_AUTH_OK)
    return;
  ctx->refuse = v == EPIC_AUTH_DENIED ? 401 : 429;
  ctx->retry_after_ms = r.retry_after_ms;
  snprintf(ctx->refuse_msg, sizeof ctx->refuse_msg, "%s", r.message);
  EPIC_LOG_INFO("%s: http request from %s refused: %s", h->log, r.principal, r.message);
}

static enum MHD_Result refuse(epic_http *h, struct MHD_Connection *c, conn_ctx *ctx) {
  epic_oai_error e;
  const int st = ctx->refuse;
  epic_oai_error_set(&e, st,
                     st == 401   ? "authentication_error"
                     : st == 403 ? "permission_error"
                     : st == 429 ? "rate_limit_exceeded"
                                 : "server_error",
                     NULL,
                     st == 401   ? "invalid_api_key"
                     : st == 429 ? "rate_limit_exceeded"
                                 : NULL,
                     "%s", ctx->refuse_msg);
  char *s = epic_oai_error_json(&e);
  struct MHD_Response *r =
      s ? MHD_create_response_from_buffer(strlen(s), s, MHD_RESPMEM_MUST_FREE) : NULL;
  if (!r) {
    free(s);
    return MHD_NO;
  }
  MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
  if (st == 401)
    MHD_add_response_header(r, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
  if (st == 429) {
    char v[32];
    snprintf(v, sizeof v, "%lld", (long long)((ctx->retry_after_ms + 999) / 1000));
    MHD_add_response_header(r, MHD_HTTP_HEADER_RETRY_AFTER, v);
    snprintf(v, sizeof v, "%lld", (long long)ctx->retry_after_ms);
    MHD_add_response_header(r, "retry-after-ms", v);
  }
  enum MHD_Result ok = MHD_queue_response(c, (unsigned)st, r);
  MHD_destroy_response(r);
  count(h, ctx->endpoint, st);
  return ok;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls) {
  epic_http *h = cls;
  conn_ctx *ctx = *con_cls;
  (void)version;
  if (!ctx) {
    ctx = calloc(1, sizeof *ctx);
    if (!ctx)
      return MHD_NO;
    ctx->endpoint = classify(url);
    *con_cls = ctx;
    admit(h, c, ctx);
    return MHD_YES;
  }
  const int post = strcmp(method, MHD_HTTP_METHOD_POST) == 0;
  if (*upload_size && ctx->refuse) {
    *upload_size = 0; /* a refused request's body is read and dropped */
    return MHD_YES;
  }
  if (ctx->refuse)
    return refuse(h, c, ctx);
  if (*upload_size) {
    if (!ctx->too_large && ctx->body.n + *upload_size > (size_t)h->p.max_request_bytes) {
      ctx->too_large = 1;
      free(ctx->body.p);
      ctx->body = (buf){0};
    }
    if (!ctx->too_large && buf_put(&ctx->body, upload, *upload_size) != EPIC_OK)
      ctx->too_large = 1;
    *upload_size = 0;
    return MHD_YES;
  }
  const int gen =
      ctx->endpoint == EPIC_METRICS_EP_CHAT || ctx->endpoint == EPIC_METRICS_EP_COMPLETIONS;
  if (ctx->endpoint == EPIC_METRICS_EP_OTHER) {
    char msg[300];
    snprintf(msg, sizeof msg, "%s %.200s: no such endpoint", method, url);
    return error_simple(h, c, ctx->endpoint, 404, "invalid_request_error", NULL, msg);
  }
  if (gen != post || (!post && strcmp(method, MHD_HTTP_METHOD_GET) != 0)) {
    char msg[300];
    snprintf(msg, sizeof msg, "%s %.200s: method not allowed (use %s)", method, url,
             gen ? "POST" : "GET");
    return error_simple(h, c, ctx->endpoint, 405, "invalid_request_error", NULL, msg);
  }
  switch (ctx->endpoint) {
  case EPIC_METRICS_EP_MODELS: return serve_models(h, c, ctx->authz);
  case EPIC_METRICS_EP_HEALTH: return serve_health(h, c);
  case EPIC_METRICS_EP_METRICS: return serve_metrics(h, c);
  default: return serve_generation(h, c, ctx);
  }
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode why) {
  conn_ctx *ctx = *con_cls;
  (void)c;
  if (!ctx)
    return;
  if (ctx->x) {
    if (why != MHD_REQUEST_TERMINATED_COMPLETED_OK)
      ctx->x->gone = 1;
    exch_unref(ctx->x);
  }
  epic_auth_release(((epic_http *)cls)->auth, &ctx->grant);
  free(ctx->authz);
  free(ctx->body.p);
  free(ctx);
  *con_cls = NULL;
}

static void on_mhd_log(void *cls, const char *fmt, va_list ap) {
  epic_http *h = cls;
  char msg[512];
  vsnprintf(msg, sizeof msg, fmt, ap);
  size_t n = strlen(msg);
  while (n && msg[n - 1] == '\n')
    msg[--n] = '\0';
  EPIC_LOG_WARN("%s: http: %s", h->log, msg);
}

/* ---- lifecycle -------------------------------------------------------------------------- */

/* "host:port" -> a socket address. The host is numeric (IPv4 or IPv6), or
 * "localhost"; "0.0.0.0" / "" / "*" bind every IPv4 interface. */
static int parse_listen(const char *listen, struct sockaddr_storage *ss, socklen_t *len) {
  const char *colon = strrchr(listen, ':');
  if (!colon)
    return -1;
  char host[256];
  snprintf(host, sizeof host, "%.*s", (int)(colon - listen), listen);
  char *end;
  long port = strtol(colon + 1, &end, 10);
  if (*end || port < 0 || port > 65535 || end == colon + 1)
    return -1;
  memset(ss, 0, sizeof *ss);
  size_t hl = strlen(host);
  if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') {
    struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
    host[hl - 1] = '\0';
    a->sin6_family = AF_INET6;
    a->sin6_port = htons((uint16_t)port);
    if (inet_pton(AF_INET6, host + 1, &a->sin6_addr) != 1)
      return -1;
    *len = sizeof *a;
    return 0;
  }
  struct sockaddr_in *a = (struct sockaddr_in *)ss;
  a->sin_family = AF_INET;
  a->sin_port = htons((uint16_t)port);
  if (!host[0] || strcmp(host, "*") == 0 || strcmp(host, "0.0.0.0") == 0)
    a->sin_addr.s_addr = htonl(INADDR_ANY);
  else if (strcmp(host, "localhost") == 0)
    a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  else if (inet_pton(AF_INET, host, &a->sin_addr) != 1)
    return -1;
  *len = sizeof *a;
  return 0;
}

/* The security of params: plaintext policy, the PEM files into h (kept: the
 * daemon holds pointers to them), the TLS options into opts (ended by
 * MHD_OPTION_END; empty without TLS). */
static epic_status tls_setup(epic_http *h, const epic_gw_security *sec,
                             struct MHD_OptionItem opts[4]) {
  int k = 0;
  h->auth = sec ? sec->auth : NULL;
  if (!sec || !sec->tls_cert) {
    opts[0] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};
    if (epic_listen_is_local(h->p.listen) || (sec && sec->plaintext))
      return EPIC_OK;
    EPIC_LOG_ERROR("%s: --http %s is not a loopback address: serve TLS there (--tls-cert and "
                   "--tls-key) or pass --plaintext",
                   h->log, h->p.listen);
    return EPIC_ERR_INVALID;
  }
  if (MHD_is_feature_supported(MHD_FEATURE_TLS) != MHD_YES) {
    EPIC_LOG_ERROR("%s: --http with --tls-cert: this libmicrohttpd has no TLS support", h->log);
    return EPIC_ERR_UNSUPPORTED;
  }
  h->tls_cert = epic_gw_read_pem("--tls-cert", sec->tls_cert);
  h->tls_key = h->tls_cert && sec->tls_key ? epic_gw_read_pem("--tls-key", sec->tls_key) : NULL;
  if (!h->tls_key)
    return EPIC_ERR_INVALID;
  opts[k++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_KEY, 0, h->tls_key};
  opts[k++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_CERT, 0, h->tls_cert};
  if (sec->tls_client_ca) {
    h->tls_ca = epic_gw_read_pem("--tls-client-ca", sec->tls_client_ca);
    if (!h->tls_ca)
      return EPIC_ERR_INVALID;
    opts[k++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_TRUST, 0, h->tls_ca};
    h->mtls = 1;
  }
  opts[k] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};
  return EPIC_OK;
}

epic_status epic_http_create(const epic_http_params *p, epic_http **out) {
  *out = NULL;
  if (!p || p->size != sizeof *p || !p->ops || p->ops->abi_version != EPIC_HTTP_BACKEND_ABI ||
      !p->ops->start || !p->ops->cancel || !p->ops->release || !p->listen) {
    EPIC_LOG_ERROR("http: epic_http_params: size, listen and a backend of ABI %d are required",
                   EPIC_HTTP_BACKEND_ABI);
    return EPIC_ERR_INVALID;
  }
  struct sockaddr_storage ss;
  socklen_t sl;
  if (parse_listen(p->listen, &ss, &sl) != 0) {
    EPIC_LOG_ERROR("http: listen: expected HOST:PORT with a numeric host, got '%s'", p->listen);
    return EPIC_ERR_INVALID;
  }
  epic_http *h = calloc(1, sizeof *h);
  if (!h)
    return EPIC_ERR_NOMEM;
  h->p = *p;
  if (h->p.max_request_bytes <= 0)
    h->p.max_request_bytes = 4 << 20;
  if (!(h->p.drain_timeout >= 0))
    h->p.drain_timeout = 30;
  h->model_name = p->model_name ? strdup(p->model_name) : NULL;
  h->log = strdup(p->log ? p->log : "http");
  h->start_time = (double)time(NULL);
  if ((p->model_name && !h->model_name) || !h->log || pthread_mutex_init(&h->mu, NULL) != 0) {
    free(h->model_name);
    free(h->log);
    free(h);
    return EPIC_ERR_NOMEM;
  }
  unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL |
                   MHD_USE_ERROR_LOG | MHD_USE_ITC;
  if (ss.ss_family == AF_INET6)
    flags |= MHD_USE_IPv6;
  struct MHD_OptionItem tls[4];
  if (tls_setup(h, p->security, tls) != EPIC_OK) {
    epic_http_destroy(h);
    return EPIC_ERR_INVALID;
  }
  if (h->tls_cert)
    flags |= MHD_USE_TLS;
  h->d = MHD_start_daemon(
      flags, 0, NULL, NULL, on_request, h, MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, h,
      MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss, MHD_OPTION_NOTIFY_COMPLETED, on_completed, h,
      MHD_OPTION_NOTIFY_CONNECTION, on_connection, h, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)600,
      MHD_OPTION_ARRAY, tls, MHD_OPTION_END);
  if (!h->d) {
    EPIC_LOG_ERROR("%s: http: cannot listen on %s: %s", h->log, p->listen, strerror(errno));
    epic_http_destroy(h);
    return EPIC_ERR_IO;
  }
  const union MHD_DaemonInfo *di = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
  h->port = di ? di->port : 0;
  *out = h;
  return EPIC_OK;
}

int epic_http_port(const epic_http *h) {
  return h ? h->port : 0;
}

void epic_http_destroy(epic_http *h) {
  if (!h)
    return;
  if (h->d)
    MHD_stop_daemon(h->d); /* joins every connection thread */
  pthread_mutex_destroy(&h->mu);
  if (h->tls_key) /* private key material: not left in freed memory */
    memset(h->tls_key, 0, strlen(h->tls_key));
  free(h->tls_key);
  free(h->tls_cert);
  free(h->tls_ca);
  free(h->model_name);
  free(h->log);
  free(h);
}
