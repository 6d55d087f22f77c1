/* UCX backend: host memory, ucp tagged send/recv over endpoints wired up through the MPI
 * bootstrap (RECIPES §5).
 *
 * Tags: the high 32 bits carry the operation's sequence number and the low 32 bits the
 * source rank, so concurrent operations never match each other's messages and a receive
 * names exactly one peer. Receives are posted before sends.
 *
 * Progress: nothing moves unless ucp_worker_progress runs, on *both* sides (wireup and
 * rendezvous need the target to progress). Every wait loop here progresses the worker, and
 * the generic control-plane code in comm.c calls epic_ucx_progress while it waits on MPI,
 * so a rank in a barrier still serves a peer that finishes a transfer to it.
 *
 * Failure: endpoints use UCP_ERR_HANDLING_MODE_PEER; the error callback records the failed
 * rank and the next test/wait returns EPIC_ERR_COMM naming it. A transfer that makes no
 * progress for timeout_ms returns EPIC_ERR_TIMEOUT naming the ranks still pending. After
 * either, the communicator is marked broken. */
#include "comm/comm_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ucp/api/ucp.h>

typedef struct epic_ucx_comm epic_ucx_comm;

typedef struct {
  epic_ucx_comm *comm;
  int rank;
} epic_ucx_peer;

struct epic_ucx_comm {
  struct epic_comm base;
  ucp_context_h ctx;
  ucp_worker_h worker;
  ucp_ep_h *eps;           /* [nranks]; NULL for self */
  epic_ucx_peer *peers;    /* error-callback arguments */
  ucs_status_t *ep_status; /* UCS_OK or the error reported for that peer */
  int broken;
};

typedef struct {
  void *op;  /* ucp request, NULL once complete */
  int peer;
  int recv;
} epic_ucx_op;

typedef struct {
  struct epic_comm_req base;
  int n, pending;
  int done;
  epic_status st;
  double last_ms; /* time of the last completion (timeout reference) */
  epic_ucx_op *ops;
} epic_ucx_req;

static epic_status ucs_error(ucs_status_t s, const char *what, const char *file, int line) {
  EPIC_LOG_ERROR("comm: ucx: %s failed: %s (%s:%d)", what, ucs_status_string(s), file, line);
  switch (s) {
  case UCS_ERR_NO_MEMORY: return EPIC_ERR_NOMEM;
  case UCS_ERR_INVALID_PARAM: return EPIC_ERR_INVALID;
  case UCS_ERR_TIMED_OUT:
  case UCS_ERR_ENDPOINT_TIMEOUT: return EPIC_ERR_TIMEOUT;
  case UCS_ERR_UNSUPPORTED: return EPIC_ERR_UNSUPPORTED;
  default: return EPIC_ERR_COMM;
  }
}
#define EPIC_CHECK_UCS(call)                                                           \
  do {                                                                                 \
    ucs_status_t us_ = (call);                                                         \
    if (us_ != UCS_OK) return ucs_error(us_, #call, __FILE__, __LINE__);              \
  } while (0)

static inline uint64_t make_tag(uint32_t seq, int src) {
  return ((uint64_t)seq << 32) | (uint32_t)src;
}

static epic_status epic_ucx_query(const epic_comm_params *p, int *priority) {
  (void)p;
  /* Usable wherever it is compiled in, but only chosen when asked for: MPI (itself often
   * running over UCX) is the better-tested default for host memory. */
  *priority = 10;
  return EPIC_OK;
}

static void epic_ucx_err_cb(void *arg, ucp_ep_h ep, ucs_status_t status) {
  epic_ucx_peer *peer = arg;
  (void)ep;
  if (peer->comm->ep_status[peer->rank] == UCS_OK) {
    peer->comm->ep_status[peer->rank] = status;
    EPIC_LOG_ERROR("comm: ucx: connection to rank %d failed: %s", peer->rank,
                   ucs_status_string(status));
  }
  peer->comm->broken = 1;
}

static void epic_ucx_progress(epic_comm *c) {
  epic_ucx_comm *u = (epic_ucx_comm *)c;
  while (ucp_worker_progress(u->worker)) {
  }
}

/* Barrier over MPI that keeps UCX progressing (RECIPES §5 pitfall). */
static epic_status progress_barrier(epic_comm *c) {
  MPI_Request r;
  EPIC_CHECK_MPI(MPI_Ibarrier(c->boot, &r));
  return epic_comm_mpi_wait_progress(c, &r, "MPI_Ibarrier");
}

static void close_eps(epic_ucx_comm *u) {
  if (!u->eps) return;
  ucp_request_param_t prm = {.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS,
                             .flags = UCP_EP_CLOSE_FLAG_FORCE};
  for (int p = 0; p < u->base.nranks; p++) {
    if (!u->eps[p]) continue;
    void *r = ucp_ep_close_nbx(u->eps[p], &prm);
    if (UCS_PTR_IS_PTR(r)) {
      while (ucp_request_check_status(r) == UCS_INPROGRESS) ucp_worker_progress(u->worker);
      ucp_request_free(r);
    }
    u->eps[p] = NULL;
  }
}

static void epic_ucx_fini(epic_comm *c) {
  epic_ucx_comm *u = (epic_ucx_comm *)c;
  /* Peers may still need us to progress to finish their last receives from us. A broken
   * communicator skips this: a dead peer would never arrive. */
  if (u->worker && u->eps && !u->broken) progress_barrier(c);
  if (u->worker) {
    close_eps(u);
    ucp_worker_destroy(u->worker);
  }
  if (u->ctx) ucp_cleanup(u->ctx);
  free(u->eps);
  free(u->peers);
  free(u->ep_status);
}

static epic_status epic_ucx_init(epic_comm *c, const epic_comm_params *p) {
  epic_ucx_comm *u = (epic_ucx_comm *)c;
  epic_status st = EPIC_OK;
  ucp_address_t *addr = NULL;
  size_t addr_len = 0;
  int *lens = NULL, *displs = NULL;
  char *all = NULL;
  (void)p;
  int n = c->nranks;

  ucp_params_t cp = {.field_mask = UCP_PARAM_FIELD_FEATURES, .features = UCP_FEATURE_TAG};
  ucs_status_t us = ucp_init(&cp, NULL, &u->ctx);
  if (us != UCS_OK) {
    u->ctx = NULL;
    st = ucs_error(us, "ucp_init", __FILE__, __LINE__);
    goto fail_collective;
  }
  ucp_worker_params_t wp = {.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE,
                            .thread_mode = UCS_THREAD_MODE_SINGLE};
  us = ucp_worker_create(u->ctx, &wp, &u->worker);
  if (us != UCS_OK) {
    u->worker = NULL;
    st = ucs_error(us, "ucp_worker_create", __FILE__, __LINE__);
    goto fail_collective;
  }
  us = ucp_worker_get_address(u->worker, &addr, &addr_len);
  if (us != UCS_OK) {
    addr = NULL;
    st = ucs_error(us, "ucp_worker_get_address", __FILE__, __LINE__);
    goto fail_collective;
  }
fail_collective:;
  /* Setup errors on one rank must not leave the others in the address exchange. */
  int ok = st == EPIC_OK, all_ok = 0;
  int mrc = MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, c->boot);
  if (mrc != MPI_SUCCESS) st = epic_comm_mpi_error(mrc, "MPI_Allreduce", __FILE__, __LINE__);
  if (st == EPIC_OK && !all_ok) {
    EPIC_LOG_ERROR("comm: ucx: setup failed on another rank");
    st = EPIC_ERR_COMM;
  }
  if (st != EPIC_OK) goto fail;

  lens = malloc(2 * (size_t)n * sizeof(int));
  u->eps = calloc((size_t)n, sizeof *u->eps);
  u->peers = calloc((size_t)n, sizeof *u->peers);
  u->ep_status = calloc((size_t)n, sizeof *u->ep_status);
  if (!lens || !u->eps || !u->peers || !u->ep_status) {
    st = EPIC_ERR_NOMEM; /* collective from here on: peers would hang; MPI error ends the job */
    goto fail;
  }
  displs = lens + n;
  int mylen = (int)addr_len;
  mrc = MPI_Allgather(&mylen, 1, MPI_INT, lens, 1, MPI_INT, c->boot);
  if (mrc != MPI_SUCCESS) {
    st = epic_comm_mpi_error(mrc, "MPI_Allgather(address lengths)", __FILE__, __LINE__);
    goto fail;
  }
  size_t total = 0;
  for (int q = 0; q < n; q++) {
    displs[q] = (int)total;
    total += (size_t)lens[q];
  }
  all = malloc(total);
  if (!all) {
    st = EPIC_ERR_NOMEM;
    goto fail;
  }
  mrc = MPI_Allgatherv(addr, mylen, MPI_BYTE, all, lens, displs, MPI_BYTE, c->boot);
  if (mrc != MPI_SUCCESS) {
    st = epic_comm_mpi_error(mrc, "MPI_Allgatherv(worker addresses)", __FILE__, __LINE__);
    goto fail;
  }
  for (int q = 0; q < n; q++) {
    u->ep_status[q] = UCS_OK;
    if (q == c->rank) continue; /* self-sends are memcpy */
    u->peers[q] = (epic_ucx_peer){.comm = u, .rank = q};
    ucp_ep_params_t ep = {.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS |
                                        UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                                        UCP_EP_PARAM_FIELD_ERR_HANDLER,
                          .address = (const ucp_address_t *)(all + displs[q]),
                          .err_mode = UCP_ERR_HANDLING_MODE_PEER,
                          .err_handler = {.cb = epic_ucx_err_cb, .arg = &u->peers[q]}};
    us = ucp_ep_create(u->worker, &ep, &u->eps[q]);
    if (us != UCS_OK) {
      u->eps[q] = NULL;
      EPIC_LOG_ERROR("comm: ucx: cannot create an endpoint to rank %d", q);
      st = ucs_error(us, "ucp_ep_create", __FILE__, __LINE__);
      goto fail;
    }
  }
  free(all);
  free(lens);
  ucp_worker_release_address(u->worker, addr);
  return EPIC_OK;

fail:
  free(all);
  free(lens);
  if (addr) ucp_worker_release_address(u->worker, addr);
  u->broken = 1;
  epic_ucx_fini(c);
  return st;
}

static epic_status post(epic_ucx_req *r, void *op, int peer, int recv, const char *what) {
  if (UCS_PTR_IS_ERR(op)) {
    EPIC_LOG_ERROR("comm: ucx: %s with rank %d could not be posted", what, peer);
    return ucs_error(UCS_PTR_STATUS(op), what, __FILE__, __LINE__);
  }
  if (op) {
    r->ops[r->n++] = (epic_ucx_op){.op = op, .peer = peer, .recv = recv};
    r->pending++;
  }
  return EPIC_OK;
}

static void epic_ucx_req_free(epic_comm_req *req);

static epic_status epic_ucx_a2a_start(epic_comm *c, const epic_a2a_args *a, epic_comm_req **out) {
  epic_ucx_comm *u = (epic_ucx_comm *)c;
  epic_status st = EPIC_OK;
  if (u->broken) {
    EPIC_LOG_ERROR("comm: ucx: communicator is broken by an earlier failure; destroy it");
    return EPIC_ERR_COMM;
  }
  epic_ucx_req *r = calloc(1, sizeof *r);
  if (!r) return EPIC_ERR_NOMEM;
  r->ops = calloc(2 * (size_t)c->nranks, sizeof *r->ops);
  if (!r->ops) {
    free(r);
    return EPIC_ERR_NOMEM;
  }
  r->base.comm = c;
  r->base.seq = c->seq++;
  r->last_ms = epic_comm_now_ms();
  char *rbuf = a->recv;
  const char *sbuf = a->send;
  ucp_request_param_t prm = {.op_attr_mask = 0};

  for (int k = 1; k < c->nranks; k++) {
    int p = (c->rank + c->nranks - k) % c->nranks;
    if (!a->recv_counts[p]) continue;
    void *op = ucp_tag_recv_nbx(u->worker, rbuf + a->recv_displs[p], a->recv_counts[p],
                                make_tag(r->base.seq, p), UINT64_MAX, &prm);
    EPIC_CHECK_GOTO(post(r, op, p, 1, "ucp_tag_recv_nbx"), st, fail);
  }
  for (int k = 1; k < c->nranks; k++) {
    int p = (c->rank + k) % c->nranks;
    if (!a->send_counts[p]) continue;
    void *op = ucp_tag_send_nbx(u->eps[p], sbuf + a->send_displs[p], a->send_counts[p],
                                make_tag(r->base.seq, c->rank), &prm);
    EPIC_CHECK_GOTO(post(r, op, p, 0, "ucp_tag_send_nbx"), st, fail);
  }
  if (a->send_counts[c->rank])
    memmove(rbuf + a->recv_displs[c->rank], sbuf + a->send_displs[c->rank],
            a->send_counts[c->rank]);
  *out = &r->base;
  return EPIC_OK;
fail:
  u->broken = 1;
  epic_ucx_req_free(&r->base);
  return st;
}

/* Collect finished ucp requests; returns the first error seen. */
static void reap(epic_ucx_req *r) {
  epic_ucx_comm *u = (epic_ucx_comm *)r->base.comm;
  for (int i = 0; i < r->n; i++) {
    epic_ucx_op *o = &r->ops[i];
    if (!o->op) continue;
    ucs_status_t s = ucp_request_check_status(o->op);
    if (s == UCS_INPROGRESS) continue;
    ucp_request_free(o->op);
    o->op = NULL;
    r->pending--;
    r->last_ms = epic_comm_now_ms();
    if (s != UCS_OK && r->st == EPIC_OK) {
      EPIC_LOG_ERROR("comm: ucx: %s rank %d failed: %s", o->recv ? "receive from" : "send to",
                     o->peer, ucs_status_string(s));
      r->st = EPIC_ERR_COMM;
      u->broken = 1;
    }
  }
  /* A peer whose endpoint failed will never deliver what we still wait for. */
  if (r->st == EPIC_OK && u->broken) {
    for (int i = 0; i < r->n; i++) {
      if (r->ops[i].op && u->ep_status[r->ops[i].peer] != UCS_OK) {
        EPIC_LOG_ERROR("comm: ucx: alltoallv #%u aborted: rank %d is unreachable (%s)",
                       r->base.seq, r->ops[i].peer,
                       ucs_status_string(u->ep_status[r->ops[i].peer]));
        r->st = EPIC_ERR_COMM;
        break;
      }
    }
  }
}

static void report_timeout(epic_ucx_req *r, double waited) {
  epic_comm *c = r->base.comm;
  char list[512];
  size_t len = 0;
  list[0] = '\0';
  char *seen = calloc((size_t)c->nranks, 1);
  for (int i = 0; i < r->n && seen; i++) {
    int p = r->ops[i].peer;
    if (!r->ops[i].op || seen[p]) continue;
    seen[p] = 1;
    if (len + 16 < sizeof list)
      len += (size_t)snprintf(list + len, sizeof list - len, "%s%d", len ? ", " : "", p);
  }
  free(seen);
  EPIC_LOG_ERROR("comm: ucx: alltoallv #%u timed out after %.0f ms without progress; still "
                 "pending with rank(s) %s (dead or stuck peer? raise EPIC_COMM_TIMEOUT_MS if "
                 "the step is just slow)",
                 r->base.seq, waited, list);
}

static epic_status epic_ucx_req_test(epic_comm_req *req, int *done) {
  epic_ucx_req *r = (epic_ucx_req *)req;
  epic_ucx_comm *u = (epic_ucx_comm *)req->comm;
  *done = 0;
  if (r->done) {
    *done = 1;
    return r->st;
  }
  epic_ucx_progress(req->comm);
  reap(r);
  if (r->st == EPIC_OK && r->pending > 0 && req->comm->timeout_ms >= 0) {
    double waited = epic_comm_now_ms() - r->last_ms;
    if (waited > (double)req->comm->timeout_ms) {
      report_timeout(r, waited);
      r->st = EPIC_ERR_TIMEOUT;
      u->broken = 1;
    }
  }
  if (r->pending == 0 || r->st != EPIC_OK) {
    r->done = 1;
    *done = 1;
  }
  return r->st;
}

static epic_status epic_ucx_req_wait(epic_comm_req *req) {
  int done = 0;
  epic_status st;
  do st = epic_ucx_req_test(req, &done);
  while (!done);
  return st;
}

static void epic_ucx_req_free(epic_comm_req *req) {
  epic_ucx_req *r = (epic_ucx_req *)req;
  epic_ucx_comm *u = (epic_ucx_comm *)req->comm;
  for (int i = 0; i < r->n; i++) {
    if (!r->ops[i].op) continue;
    /* Receives can be cancelled; unfinished sends are released to UCX, which completes
     * them when the endpoint is closed (epic_comm_destroy). */
    if (r->ops[i].recv) ucp_request_cancel(u->worker, r->ops[i].op);
    ucp_request_free(r->ops[i].op);
    r->ops[i].op = NULL;
    u->broken = 1;
  }
  free(r->ops);
  free(r);
}

const epic_comm_ops epic_comm_ucx_ops = {
    .abi_version = EPIC_COMM_ABI_VERSION,
    .name = "ucx",
    .comm_bytes = sizeof(epic_ucx_comm),
    .device_buffers = 0,
    .query = epic_ucx_query,
    .init = epic_ucx_init,
    .fini = epic_ucx_fini,
    .a2a_start = epic_ucx_a2a_start,
    .req_test = epic_ucx_req_test,
    .req_wait = epic_ucx_req_wait,
    .req_free = epic_ucx_req_free,
    .progress = epic_ucx_progress,
    .barrier = NULL,
};
