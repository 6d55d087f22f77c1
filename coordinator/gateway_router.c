/* `epic gateway`: a gRPC router in front of several `epic serve` clusters
 * (coordinator/gateway.h). One thread runs the completion queue, which carries
 * both the downstream (server) calls and the upstream (client) calls. */
#define _GNU_SOURCE
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/log.h"
#include "coordinator/gateway.h"
#include "coordinator/gateway_impl.h"

enum { TAG_DCLOSE = EPIC_GW_TAG_USER, TAG_DSEND, TAG_USTART, TAG_URECV, TAG_USTATUS, TAG_HEALTH };

#define MAX_UPSTREAMS 64
#define TICK_S 0.05

typedef struct upstream {
  char *addr;
  grpc_channel *ch;
  int healthy;         /* routable: last check passed (or none yet) and no call failed since */
  int checked;         /* at least one check completed */
  int64_t outstanding; /* forwarded calls not yet finished */
  int64_t routed;
  double next_check;
  /* the health check in flight */
  int hc_busy;
  grpc_call *hc_call;
  epic_gw_tag hc_tag;
  grpc_metadata_array hc_md, hc_trail;
  grpc_byte_buffer *hc_send, *hc_recv;
  grpc_status_code hc_status;
  grpc_slice hc_details;
} upstream;

typedef struct fwd fwd;

/* One try of a forwarded call on one upstream. */
typedef struct attempt {
  fwd *f;
  upstream *up;
  grpc_call *call;
  epic_gw_tag t_start, t_recv, t_status;
  int pending, recv_busy, ended, status_done;
  grpc_metadata_array md, trail;
  grpc_byte_buffer *send_bb, *recv_bb;
  grpc_status_code status;
  grpc_slice details;
} attempt;

struct fwd {
  fwd *prev, *next;
  epic_gw_router *r;
  epic_gw_down d; /* the client's call */
  int method;
  grpc_byte_buffer *req;  /* kept for retries */
  grpc_byte_buffer *held; /* received, waiting for the downstream send */
  int forwarded;          /* messages that reached the downstream send */
  attempt *cur;
  int live_attempts;
  uint64_t tried;
  grpc_status_code last_status;
  char last_details[256];
  epic_gw_authz authz;   /* the client's authorization, forwarded upstream */
  epic_auth_grant grant; /* held with r->auth until the call is freed */
};

struct epic_gw_router {
  epic_gw_router_params p;
  epic_auth *auth; /* p.security->auth or NULL */
  sig_atomic_t drain_seen;
  upstream ups[MAX_UPSTREAMS];
  int n_ups, rr;
  epic_gw_front fr;
  fwd *fwds;
  int draining;
  double drain_deadline;
};

/* ---- upstream choice and health ----------------------------------------------------- */

static void set_health(upstream *u, int healthy, const char *why) {
  if (u->healthy && !healthy)
    EPIC_LOG_WARN("gateway: upstream %s is unhealthy: %s", u->addr, why);
  else if (!u->healthy && healthy)
    EPIC_LOG_WARN("gateway: upstream %s is healthy", u->addr);
  u->healthy = healthy;
}

/* The healthy upstream with the fewest outstanding calls that this call has
 * not tried yet; ties go round-robin. */
static upstream *pick(epic_gw_router *r, uint64_t tried) {
  upstream *best = NULL;
  for (int k = 0; k < r->n_ups; k++) {
    int i = (r->rr + k) % r->n_ups;
    upstream *u = &r->ups[i];
    if (!u->healthy || (tried >> i & 1))
      continue;
    if (!best || u->outstanding < best->outstanding)
      best = u;
  }
  if (best)
    r->rr = (int)(best - r->ups + 1) % r->n_ups;
  return best;
}

static int any_healthy(const epic_gw_router *r) {
  for (int i = 0; i < r->n_ups; i++)
    if (r->ups[i].healthy)
      return 1;
  return 0;
}

/* The ops of a unary request to an upstream: the request, then its initial
 * metadata back (ops[0..3]); and the op that receives its status. */
static void request_ops(grpc_op ops[4], grpc_byte_buffer *send, grpc_metadata_array *md,
                        grpc_metadata *send_md) {
  memset(ops, 0, 4 * sizeof *ops);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[0].data.send_initial_metadata.count = send_md ? 1 : 0;
  ops[0].data.send_initial_metadata.metadata = send_md;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = send;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[3].data.recv_initial_metadata.recv_initial_metadata = md;
}

static void status_op(grpc_op *op, grpc_metadata_array *trail, grpc_status_code *status,
                      grpc_slice *details) {
  memset(op, 0, sizeof *op);
  op->op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  op->data.recv_status_on_client.trailing_metadata = trail;
  op->data.recv_status_on_client.status = status;
  op->data.recv_status_on_client.status_details = details;
}

static void start_check(epic_gw_router *r, upstream *u) {
  Grpc__Health__V1__HealthCheckRequest rq = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
  u->hc_call = grpc_channel_create_call(u->ch, NULL, GRPC_PROPAGATE_DEFAULTS, r->fr.cq,
                                        grpc_slice_from_static_string(EPIC_GW_PATH_HEALTH), NULL,
                                        epic_gw_deadline(r->p.health_timeout), NULL);
  grpc_metadata_array_init(&u->hc_md);
  grpc_metadata_array_init(&u->hc_trail);
  u->hc_send = epic_gw_pack(&rq.base);
  u->hc_recv = NULL;
  u->hc_details = grpc_empty_slice();
  grpc_op ops[6];
  request_ops(ops, u->hc_send, &u->hc_md, NULL);
  memset(&ops[4], 0, sizeof ops[4]);
  ops[4].op = GRPC_OP_RECV_MESSAGE;
  ops[4].data.recv_message.recv_message = &u->hc_recv;
  status_op(&ops[5], &u->hc_trail, &u->hc_status, &u->hc_details);
  if (grpc_call_start_batch(u->hc_call, ops, 6, &u->hc_tag, NULL) != GRPC_CALL_OK) {
    EPIC_LOG_ERROR("gateway: cannot start a health check of %s", u->addr);
    grpc_call_unref(u->hc_call);
    grpc_byte_buffer_destroy(u->hc_send);
    grpc_metadata_array_destroy(&u->hc_md);
    grpc_metadata_array_destroy(&u->hc_trail);
    u->next_check = epic_now_seconds() + r->p.health_interval;
    return;
  }
  u->hc_busy = 1;
}

static void on_check(epic_gw_router *r, upstream *u, int ok) {
  char why[300];
  int serving = 0;
  if (ok && u->hc_status == GRPC_STATUS_OK && u->hc_recv) {
    Grpc__Health__V1__HealthCheckResponse *rs =
        (Grpc__Health__V1__HealthCheckResponse *)epic_gw_unpack(
            &grpc__health__v1__health_check_response__descriptor, u->hc_recv);
    serving = rs && rs->status == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
    snprintf(why, sizeof why, "health check says %s", serving ? "SERVING" : "NOT_SERVING");
    if (rs)
      grpc__health__v1__health_check_response__free_unpacked(rs, NULL);
  } else {
    snprintf(why, sizeof why, "health check failed (status %d: %.*s)", (int)u->hc_status,
             (int)GRPC_SLICE_LENGTH(u->hc_details),
             (const char *)GRPC_SLICE_START_PTR(u->hc_details));
  }
  set_health(u, serving, why);
  u->checked = 1;
  u->hc_busy = 0;
  grpc_call_unref(u->hc_call);
  u->hc_call = NULL;
  grpc_byte_buffer_destroy(u->hc_send);
  if (u->hc_recv)
    grpc_byte_buffer_destroy(u->hc_recv);
  grpc_slice_unref(u->hc_details);
  grpc_metadata_array_destroy(&u->hc_md);
  grpc_metadata_array_destroy(&u->hc_trail);
  u->next_check = epic_now_seconds() + r->p.health_interval;
}

/* ---- forwarding --------------------------------------------------------------------- */

static void fwd_maybe_free(fwd *f) {
  if (!f->d.closed || f->d.pending || f->live_attempts)
    return;
  epic_gw_router *r = f->r;
  if (f->prev)
    f->prev->next = f->next;
  else
    r->fwds = f->next;
  if (f->next)
    f->next->prev = f->prev;
  if (f->req)
    grpc_byte_buffer_destroy(f->req);
  if (f->held)
    grpc_byte_buffer_destroy(f->held);
  if (f->d.send_bb)
    grpc_byte_buffer_destroy(f->d.send_bb);
  grpc_call_unref(f->d.call);
  epic_auth_release(r->auth, &f->grant);
  memset(&f->authz, 0, sizeof f->authz); /* it held a key */
  free(f);
}

static void attempt_maybe_free(attempt *a) {
  if (a->pending || !a->status_done)
    return;
  fwd *f = a->f;
  if (f->cur == a)
    f->cur = NULL;
  f->live_attempts--;
  grpc_call_unref(a->call);
  if (a->send_bb)
    grpc_byte_buffer_destroy(a->send_bb);
  if (a->recv_bb)
    grpc_byte_buffer_destroy(a->recv_bb);
  grpc_metadata_array_destroy(&a->md);
  grpc_metadata_array_destroy(&a->trail);
  grpc_slice_unref(a->details);
  free(a);
  fwd_maybe_free(f);
}

/* ModelInfo answers say which upstream answered. */
static grpc_byte_buffer *annotate(fwd *f, grpc_byte_buffer *bb, const char *addr) {
  if (f->method != EPIC_GW_M_MODELINFO)
    return bb;
  Epic__V1__ModelInfoResponse *m =
      (Epic__V1__ModelInfoResponse *)epic_gw_unpack(&epic__v1__model_info_response__descriptor, bb);
  if (!m)
    return bb;
  char *old = m->served_by;
  m->served_by = (char *)addr;
  grpc_byte_buffer *out = epic_gw_pack(&m->base);
  m->served_by = old;
  epic__v1__model_info_response__free_unpacked(m, NULL);
  grpc_byte_buffer_destroy(bb);
  return out;
}

static void up_recv(attempt *a);

static void down_send(fwd *f, grpc_byte_buffer *bb) {
  f->forwarded++;
  if (epic_gw_down_send(&f->d, bb) != 0 && f->cur)
    grpc_call_cancel(f->cur->call, NULL);
}

static void try_upstream(fwd *f);

/* Send the client its final status (and message). The key's stream slot goes back first:
 * the client may open its next stream the moment it has this status. */
static void fwd_finish(fwd *f, grpc_status_code code, const char *details, grpc_byte_buffer *msg) {
  epic_auth_release(f->r->auth, &f->grant);
  epic_gw_down_finish(&f->d, code, details, msg);
}

/* The upstream call ended: retry elsewhere when nothing reached the client
 * yet and the failure says the upstream could not take the call; otherwise
 * pass the status on once every message went out. */
static void settle(fwd *f) {
  attempt *a = f->cur;
  if (!a)
    return;
  if (f->d.closed || f->d.status_started) {
    attempt_maybe_free(a);
    return;
  }
  /* Every message must have been received (the last receive said end of
   * stream) and sent on before the status may follow. */
  if (!a->status_done || !a->ended || a->recv_busy || f->d.send_busy || f->held)
    return;
  int retry = f->forwarded == 0 &&
              (a->status == GRPC_STATUS_UNAVAILABLE || a->status == GRPC_STATUS_RESOURCE_EXHAUSTED);
  f->last_status = a->status;
  snprintf(f->last_details, sizeof f->last_details, "%.*s", (int)GRPC_SLICE_LENGTH(a->details),
           (const char *)GRPC_SLICE_START_PTR(a->details));
  if (retry) {
    f->cur = NULL;
    attempt_maybe_free(a);
    try_upstream(f);
    return;
  }
  char details[300];
  snprintf(details, sizeof details, "%s", f->last_details);
  f->cur = NULL;
  attempt_maybe_free(a);
  fwd_finish(f, f->last_status, details, NULL);
}

static void try_upstream(fwd *f) {
  epic_gw_router *r = f->r;
  upstream *u = pick(r, f->tried);
  if (!u) {
    char msg[400];
    if (f->tried)
      snprintf(msg, sizeof msg, "%s (no other healthy upstream to try)", f->last_details);
    else
      snprintf(msg, sizeof msg, "no healthy upstream (%d configured)", r->n_ups);
    fwd_finish(f, f->tried ? f->last_status : GRPC_STATUS_UNAVAILABLE, msg, NULL);
    return;
  }
  attempt *a = calloc(1, sizeof *a);
  if (!a) {
    fwd_finish(f, GRPC_STATUS_RESOURCE_EXHAUSTED, "gateway out of memory", NULL);
    return;
  }
  f->tried |= (uint64_t)1 << (u - r->ups);
  a->f = f;
  a->up = u;
  a->t_start = (epic_gw_tag){TAG_USTART, a};
  a->t_recv = (epic_gw_tag){TAG_URECV, a};
  a->t_status = (epic_gw_tag){TAG_USTATUS, a};
  a->details = grpc_empty_slice();
  grpc_metadata_array_init(&a->md);
  grpc_metadata_array_init(&a->trail);
  /* The client's deadline and cancellation carry over to the upstream call. */
  a->call = grpc_channel_create_call(u->ch, f->d.call, GRPC_PROPAGATE_DEFAULTS, r->fr.cq,
                                     grpc_slice_from_static_string(epic_gw_method_paths[f->method]),
                                     NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
  f->cur = a;
  f->live_attempts++;
  u->outstanding++;
  u->routed++;
  a->send_bb = epic_gw_copy(f->req);
  grpc_op ops[4], st;
  /* The upstream checks the same key (gRPC takes its own refs of the slices). */
  grpc_metadata auth_md;
  memset(&auth_md, 0, sizeof auth_md);
  if (f->authz.len) {
    auth_md.key = grpc_slice_from_static_string("authorization");
    auth_md.value = grpc_slice_from_copied_buffer(f->authz.value, f->authz.len);
  }
  request_ops(ops, a->send_bb, &a->md, f->authz.len ? &auth_md : NULL);
  status_op(&st, &a->trail, &a->status, &a->details);
  int started = grpc_call_start_batch(a->call, ops, 4, &a->t_start, NULL) == GRPC_CALL_OK;
  if (f->authz.len)
    grpc_slice_unref(auth_md.value);
  if (started)
    a->pending++;
  if (!started || grpc_call_start_batch(a->call, &st, 1, &a->t_status, NULL) != GRPC_CALL_OK) {
    EPIC_LOG_ERROR("gateway: cannot start a call to %s", u->addr);
    grpc_call_cancel(a->call, NULL);
    /* What did start completes through the queue; the status never will. */
    a->status_done = 1;
    a->ended = 1;
    a->status = GRPC_STATUS_UNAVAILABLE;
    u->outstanding--;
    settle(f);
    return;
  }
  a->pending++;
  up_recv(a);
}

static void up_recv(attempt *a) {
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_RECV_MESSAGE;
  op.data.recv_message.recv_message = &a->recv_bb;
  a->recv_bb = NULL;
  if (grpc_call_start_batch(a->call, &op, 1, &a->t_recv, NULL) != GRPC_CALL_OK) {
    a->ended = 1; /* the status still comes (cancelled) and settles the call */
    grpc_call_cancel(a->call, NULL);
    return;
  }
  a->pending++;
  a->recv_busy = 1;
}

static void on_recv(attempt *a, int ok) {
  fwd *f = a->f;
  a->pending--;
  a->recv_busy = 0;
  grpc_byte_buffer *bb = a->recv_bb;
  a->recv_bb = NULL;
  if (!ok || !bb || f->cur != a || f->d.closed || f->d.status_started) {
    if (bb)
      grpc_byte_buffer_destroy(bb);
    a->ended = 1;
    if (f->cur == a)
      settle(f);
    else
      attempt_maybe_free(a);
    return;
  }
  bb = annotate(f, bb, a->up->addr);
  if (f->method == EPIC_GW_M_GENERATE && epic_auth_counts_tokens(f->r->auth)) {
    Epic__V1__GenerateResponse *m = (Epic__V1__GenerateResponse *)epic_gw_unpack(
        &epic__v1__generate_response__descriptor, bb);
    if (m) {
      epic_auth_charge(f->r->auth, &f->grant, (int64_t)m->n_token_ids);
      epic__v1__generate_response__free_unpacked(m, NULL);
    }
  }
  if (f->d.send_busy) {
    f->held = bb; /* the next receive starts when this one is sent */
    return;
  }
  down_send(f, bb);
  up_recv(a);
}

static void on_status(attempt *a) {
  fwd *f = a->f;
  a->pending--;
  a->status_done = 1;
  a->up->outstanding--;
  if (a->status == GRPC_STATUS_UNAVAILABLE && f->cur == a && !f->d.cancelled) {
    char why[300];
    snprintf(why, sizeof why, "a call failed with UNAVAILABLE: %.*s",
             (int)GRPC_SLICE_LENGTH(a->details), (const char *)GRPC_SLICE_START_PTR(a->details));
    set_health(a->up, 0, why);
    a->up->next_check = epic_now_seconds(); /* find out soon whether it comes back */
  }
  if (f->cur == a)
    settle(f);
  else
    attempt_maybe_free(a);
}

static void on_dsend(fwd *f, int ok) {
  epic_gw_down_on_send(&f->d);
  if (!ok) {
    if (f->cur)
      grpc_call_cancel(f->cur->call, NULL);
  } else if (f->held && !f->d.status_started) {
    grpc_byte_buffer *bb = f->held;
    f->held = NULL;
    down_send(f, bb);
    if (f->cur && !f->cur->ended && !f->cur->recv_busy)
      up_recv(f->cur);
  }
  if (f->held && (f->d.status_started || !ok)) {
    grpc_byte_buffer_destroy(f->held);
    f->held = NULL;
  }
  /* settle() may free f (attempt_maybe_free -> fwd_maybe_free): after the client's call
   * closed and the upstream's status came while this send was in flight. So f is freed
   * through settle while it has an attempt (live_attempts > 0 keeps it alive otherwise),
   * and directly only when it has none. */
  if (f->cur)
    settle(f);
  else
    fwd_maybe_free(f);
}

static void on_new_call(epic_gw_router *r, epic_gw_listener *l, int ok) {
  grpc_call *call;
  grpc_byte_buffer *payload;
  char method[128];
  epic_gw_authz authz;
  if (!epic_gw_front_accept(&r->fr, l, ok, &call, &payload, method, sizeof method, &authz))
    return;
  fwd *f = calloc(1, sizeof *f);
  if (!f) {
    grpc_call_cancel_with_status(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "gateway out of memory",
                                 NULL);
    grpc_call_unref(call);
    if (payload)
      grpc_byte_buffer_destroy(payload);
    return;
  }
  f->r = r;
  epic_gw_down_init(&f->d, call, "gateway: grpc_call_start_batch (downstream)", TAG_DCLOSE,
                    TAG_DSEND, f);
  f->method = l->method;
  f->req = payload;
  f->authz = authz;
  f->next = r->fwds;
  if (r->fwds)
    r->fwds->prev = f;
  r->fwds = f;
  if (epic_gw_down_recv_close(&f->d) != 0) {
    f->d.closed = 1;
    grpc_call_cancel(call, NULL);
    fwd_maybe_free(f);
    return;
  }
  if (f->method == EPIC_GW_M_HEALTH) {
    Grpc__Health__V1__HealthCheckRequest *rq =
        (Grpc__Health__V1__HealthCheckRequest *)epic_gw_unpack(
            &grpc__health__v1__health_check_request__descriptor, payload);
    if (!rq) {
      fwd_finish(f, GRPC_STATUS_INVALID_ARGUMENT, "request: malformed HealthCheckRequest protobuf",
                 NULL);
    } else if (rq->service[0] && strcmp(rq->service, EPIC_GW_SERVICE) != 0) {
      fwd_finish(f, GRPC_STATUS_NOT_FOUND, "service: unknown service", NULL);
    } else {
      Grpc__Health__V1__HealthCheckResponse rs = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
      rs.status = any_healthy(r) && !r->draining
                      ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
                      : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
      fwd_finish(f, GRPC_STATUS_OK, NULL, epic_gw_pack(&rs.base));
    }
    if (rq)
      grpc__health__v1__health_check_request__free_unpacked(rq, NULL);
    return;
  }
  if (f->method == EPIC_GW_M_UNKNOWN) {
    char msg[256];
    snprintf(msg, sizeof msg, "method %s is not served here", method);
    fwd_finish(f, GRPC_STATUS_UNIMPLEMENTED, msg, NULL);
    return;
  }
  epic_auth_result ar;
  if (epic_gw_admit(r->auth, &authz, f->method == EPIC_GW_M_GENERATE, &f->grant, &ar) !=
      EPIC_AUTH_OK) {
    EPIC_LOG_INFO("gateway: call %s from %s refused: %s", epic_gw_method_name(f->method, method),
                  ar.principal, ar.message);
    epic_gw_down_refuse(&f->d, &ar);
    return;
  }
  if (r->draining) {
    fwd_finish(f, GRPC_STATUS_UNAVAILABLE,
               "gateway is draining (shutting down): not accepting new requests", NULL);
    return;
  }
  if (!payload) {
    fwd_finish(f, GRPC_STATUS_INVALID_ARGUMENT, "request: no request message was sent", NULL);
    return;
  }
  try_upstream(f);
}

static void handle(void *user, grpc_event ev) {
  epic_gw_router *r = user;
  epic_gw_tag *t = ev.tag;
  switch (t->kind) {
  case EPIC_GW_TAG_NEW: on_new_call(r, t->obj, ev.success); break;
  case TAG_DCLOSE: {
    fwd *f = t->obj;
    epic_gw_down_on_close(&f->d);
    if (f->d.cancelled && f->cur && !f->cur->status_done)
      grpc_call_cancel(f->cur->call, NULL);
    fwd_maybe_free(f);
    break;
  }
  case TAG_DSEND: on_dsend(t->obj, ev.success); break;
  case TAG_USTART: {
    attempt *a = t->obj;
    a->pending--;
    /* When the start completes last, the current attempt's status still has to reach
     * the client (settle frees the attempt after sending it). */
    if (a->f->cur == a)
      settle(a->f);
    else
      attempt_maybe_free(a);
    break;
  }
  case TAG_URECV: on_recv(t->obj, ev.success); break;
  case TAG_USTATUS: on_status(t->obj); break;
  case TAG_HEALTH: on_check(r, t->obj, ev.success); break;
  case EPIC_GW_TAG_SHUTDOWN: r->fr.shutdown_done = 1; break;
  default: EPIC_LOG_ERROR("gateway: unknown completion tag kind %d", t->kind);
  }
}

/* ---- lifecycle ------------------------------------------------------------------ */

epic_status epic_gw_router_create(const epic_gw_router_params *p, epic_gw_router **out) {
  *out = NULL;
  if (!p || p->size != sizeof *p) {
    EPIC_LOG_ERROR("gateway: epic_gw_router_params.size: unknown size");
    return EPIC_ERR_INVALID;
  }
  if (!p->listen || p->n_upstreams < 1 || p->n_upstreams > MAX_UPSTREAMS || !p->upstreams) {
    EPIC_LOG_ERROR("gateway: --upstream: between 1 and %d upstreams are needed", MAX_UPSTREAMS);
    return EPIC_ERR_INVALID;
  }
  epic_gw_router *r = calloc(1, sizeof *r);
  if (!r)
    return EPIC_ERR_NOMEM;
  r->p = *p;
  if (!(r->p.health_interval > 0))
    r->p.health_interval = 1.0;
  if (!(r->p.health_timeout > 0))
    r->p.health_timeout = 1.0;
  if (!(r->p.drain_timeout >= 0))
    r->p.drain_timeout = 30;
  if (r->p.max_request_bytes <= 0)
    r->p.max_request_bytes = 64 << 20;
  r->p.upstreams = NULL;
  r->auth = p->security ? p->security->auth : NULL;
  grpc_init();
  epic_gw_front_init(&r->fr, "gateway");
  /* A restarted upstream must be found again within a few health intervals,
   * not after gRPC's default reconnect back-off of up to two minutes. */
  grpc_arg cargs[5] = {
      {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, .value.integer = -1},
      {.type = GRPC_ARG_INTEGER,
       .key = GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS,
       .value.integer = 200},
      {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, .value.integer = 200},
      {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, .value.integer = 2000},
      {.type = GRPC_ARG_STRING, .key = GRPC_SSL_TARGET_NAME_OVERRIDE_ARG}};
  const char *name = p->security ? p->security->upstream_name : NULL;
  cargs[4].value.string = (char *)name;
  grpc_channel_args cca = {.num_args = name ? 5 : 4, .args = cargs};
  grpc_channel_credentials *cc = epic_gw_upstream_credentials(p->security);
  if (!cc) {
    epic_gw_router_destroy(r);
    return EPIC_ERR_INVALID;
  }
  double now = epic_now_seconds();
  for (int i = 0; i < p->n_upstreams; i++) {
    upstream *u = &r->ups[i];
    u->addr = strdup(p->upstreams[i]);
    if (!u->addr)
      break;
    u->ch = grpc_channel_create(u->addr, cc, &cca);
    u->healthy = 1; /* routable until a check or a call says otherwise */
    u->hc_tag = (epic_gw_tag){TAG_HEALTH, u};
    u->next_check = now;
    r->n_ups++;
  }
  grpc_channel_credentials_release(cc);
  if (r->n_ups != p->n_upstreams) {
    epic_gw_router_destroy(r);
    return EPIC_ERR_NOMEM;
  }
  epic_status lst = epic_gw_front_listen(&r->fr, p->listen, r->p.max_request_bytes, p->security);
  if (lst != EPIC_OK) {
    epic_gw_router_destroy(r);
    return lst;
  }
  *out = r;
  return EPIC_OK;
}

int epic_gw_router_port(const epic_gw_router *r) {
  return r ? r->fr.port : 0;
}

void epic_gw_router_address(const epic_gw_router *r, char *out, size_t n) {
  epic_gw_format_addr(r->p.listen, r->fr.port, out, n);
}

static int checks_busy(const epic_gw_router *r) {
  for (int i = 0; i < r->n_ups; i++)
    if (r->ups[i].hc_busy)
      return 1;
  return 0;
}

/* Forwarded calls or health checks that gRPC must still complete. */
static int busy(const void *user) {
  const epic_gw_router *r = user;
  return r->fwds || checks_busy(r);
}

epic_status epic_gw_router_run(epic_gw_router *r) {
  for (;;) {
    double now = epic_now_seconds();
    if (r->p.drain_requests && *r->p.drain_requests != r->drain_seen) {
      r->drain_seen = *r->p.drain_requests;
      if (!r->draining) {
        r->draining = 1;
        r->drain_deadline = now + r->p.drain_timeout;
        fprintf(stderr, "epic gateway: SIGTERM/SIGINT: draining (--drain-timeout %.1fs)\n",
                r->p.drain_timeout);
        epic_gw_front_shutdown(&r->fr);
      } else {
        r->drain_deadline = now;
      }
    }
    /* Shutdown waits for client connections to close: cut the idle ones as
     * soon as no forwarded call is left, the others at the deadline. */
    if (r->draining && (now >= r->drain_deadline || !r->fwds))
      epic_gw_front_cancel_all(&r->fr);
    if (r->fr.shutdown_done && !busy(r))
      break;
    double wake = now + TICK_S;
    if (!r->fr.shutdown_done)
      for (int i = 0; i < r->n_ups; i++) {
        upstream *u = &r->ups[i];
        if (!u->hc_busy && u->next_check <= now)
          start_check(r, u);
        if (!u->hc_busy && u->next_check < wake)
          wake = u->next_check;
      }
    epic_gw_front_poll(&r->fr, epic_gw_deadline(wake > now ? wake - now : 0), handle, r);
  }
  return EPIC_OK;
}

void epic_gw_router_destroy(epic_gw_router *r) {
  if (!r)
    return;
  if (r->fr.srv && r->fr.started) {
    epic_gw_front_shutdown(&r->fr);
    grpc_server_cancel_all_calls(r->fr.srv);
    for (fwd *f = r->fwds; f; f = f->next)
      if (f->cur)
        grpc_call_cancel(f->cur->call, NULL);
    epic_gw_front_wait(&r->fr, busy, handle, r);
  }
  for (int i = 0; i < r->n_ups; i++) {
    if (r->ups[i].ch)
      grpc_channel_destroy(r->ups[i].ch);
    free(r->ups[i].addr);
  }
  if (r->fr.srv)
    grpc_server_destroy(r->fr.srv);
  if (r->fr.cq) {
    epic_gw_front_drain_cq(&r->fr, handle, r);
    grpc_completion_queue_destroy(r->fr.cq);
  }
  grpc_shutdown();
  free(r);
}
