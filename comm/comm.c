/* epic_comm front end: backend selection (query + priority, EPIC_COMM override), dispatch
 * to the backend vtables, and the generic control-plane collectives over the MPI bootstrap
 * communicator. */
#define _POSIX_C_SOURCE 200809L
#include "common/clock.h"
#include "comm/comm_impl.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

/* Every backend EPIC knows of, compiled in or not, so that "nccl" on a CPU build is
 * "unsupported here" rather than "unknown". */
static const char *const known_backends[] = {"mpi", "ucx", "nccl"};

static const epic_comm_ops *const compiled_backends[] = {
    &epic_comm_mpi_ops,
#ifdef EPIC_HAVE_UCX
    &epic_comm_ucx_ops,
#endif
#ifdef EPIC_HAVE_NCCL
    &epic_comm_nccl_ops,
#endif
};
#define N_COMPILED ((int)(sizeof compiled_backends / sizeof compiled_backends[0]))

const char *epic_comm_backends(void) {
  return "mpi"
#ifdef EPIC_HAVE_UCX
         ",ucx"
#endif
#ifdef EPIC_HAVE_NCCL
         ",nccl"
#endif
      ;
}

double epic_comm_now_ms(void) { return epic_now_seconds() * 1e3; }

epic_status epic_comm_mpi_error(int rc, const char *what, const char *file, int line) {
  char msg[MPI_MAX_ERROR_STRING] = "";
  int len = 0, cls = 0;
  if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS) snprintf(msg, sizeof msg, "MPI error %d", rc);
  MPI_Error_class(rc, &cls);
  EPIC_LOG_ERROR("comm: %s failed: %s (%s:%d)", what, msg, file, line);
  switch (cls) {
  case MPI_ERR_ARG:
  case MPI_ERR_COUNT:
  case MPI_ERR_BUFFER:
  case MPI_ERR_RANK:
  case MPI_ERR_ROOT:
  case MPI_ERR_TRUNCATE: return EPIC_ERR_INVALID;
  case MPI_ERR_NO_MEM: return EPIC_ERR_NOMEM;
  default: return EPIC_ERR_COMM;
  }
}

/* ---- MPI bootstrap helpers ------------------------------------------------------------ */

epic_status epic_comm_mpi_init(int *argc, char ***argv, int *rank, int *size) {
  int inited = 0, provided = 0;
  MPI_Initialized(&inited);
  if (!inited) {
    int rc = MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided);
    if (rc != MPI_SUCCESS) {
      EPIC_LOG_ERROR("comm: MPI_Init_thread failed (rc %d)", rc);
      return EPIC_ERR_COMM;
    }
    if (provided < MPI_THREAD_MULTIPLE)
      EPIC_LOG_WARN("comm: MPI provides thread level %d < MPI_THREAD_MULTIPLE; use one thread "
                    "for all communication",
                    provided);
  }
  /* Errors on the world communicator come back as codes (turned into epic_status) instead
   * of aborting the job. A dead rank still ends the job through mpirun. */
  EPIC_CHECK_MPI(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  if (rank) EPIC_CHECK_MPI(MPI_Comm_rank(MPI_COMM_WORLD, rank));
  if (size) EPIC_CHECK_MPI(MPI_Comm_size(MPI_COMM_WORLD, size));
  return EPIC_OK;
}

epic_status epic_comm_mpi_finalize(void) {
  int inited = 0, finalized = 0;
  MPI_Initialized(&inited);
  MPI_Finalized(&finalized);
  if (inited && !finalized) EPIC_CHECK_MPI(MPI_Finalize());
  return EPIC_OK;
}

/* ---- selection -------------------------------------------------------------------------- */

static const epic_comm_ops *find_compiled(const char *name) {
  for (int i = 0; i < N_COMPILED; i++)
    if (strcasecmp(compiled_backends[i]->name, name) == 0) return compiled_backends[i];
  return NULL;
}

static int backend_index(const epic_comm_ops *ops) {
  for (int i = 0; i < N_COMPILED; i++)
    if (compiled_backends[i] == ops) return i;
  return -1;
}

static epic_status select_backend(const epic_comm_params *p, const epic_comm_ops **out) {
  const char *name = p->backend;
  const char *src = "params.backend";
  if (!name || !*name || strcasecmp(name, "auto") == 0) {
    const char *env = getenv("EPIC_COMM");
    name = NULL;
    if (env && *env && strcasecmp(env, "auto") != 0) {
      name = env;
      src = "EPIC_COMM";
    }
  }
  if (name) {
    int known = 0;
    for (size_t i = 0; i < sizeof known_backends / sizeof known_backends[0]; i++)
      known |= strcasecmp(known_backends[i], name) == 0;
    if (!known) {
      EPIC_LOG_ERROR("comm: unknown backend '%s' (from %s); compiled-in backends: %s", name, src,
                     epic_comm_backends());
      return EPIC_ERR_INVALID;
    }
    const epic_comm_ops *ops = find_compiled(name);
    if (!ops) {
      EPIC_LOG_ERROR("comm: backend '%s' (from %s) is not compiled into this build; "
                     "compiled-in backends: %s",
                     name, src, epic_comm_backends());
      return EPIC_ERR_UNSUPPORTED;
    }
    int prio = 0;
    if (ops->query(p, &prio) != EPIC_OK) {
      EPIC_LOG_ERROR("comm: backend '%s' (from %s) is compiled in but not usable on this "
                     "machine (EPIC_LOG_LEVEL=debug says why); compiled-in backends: %s",
                     name, src, epic_comm_backends());
      return EPIC_ERR_UNSUPPORTED;
    }
    *out = ops;
    return EPIC_OK;
  }
  const epic_comm_ops *best = NULL;
  int best_prio = INT_MIN;
  for (int i = 0; i < N_COMPILED; i++) {
    int prio = 0;
    if (compiled_backends[i]->query(p, &prio) != EPIC_OK) continue;
    EPIC_LOG_DEBUG("comm: backend %s priority %d", compiled_backends[i]->name, prio);
    if (prio > best_prio) {
      best = compiled_backends[i];
      best_prio = prio;
    }
  }
  if (!best) {
    EPIC_LOG_ERROR("comm: no usable backend; compiled-in backends: %s", epic_comm_backends());
    return EPIC_ERR_UNSUPPORTED;
  }
  *out = best;
  return EPIC_OK;
}

static int timeout_from(const epic_comm_params *p) {
  if (p->timeout_ms != 0) return p->timeout_ms;
  const char *env = getenv("EPIC_COMM_TIMEOUT_MS");
  if (env && *env) {
    char *end = NULL;
    long v = strtol(env, &end, 10);
    if (end && *end == '\0' && v >= INT_MIN && v <= INT_MAX && v != 0) return (int)v;
    EPIC_LOG_WARN("comm: ignoring EPIC_COMM_TIMEOUT_MS='%s' (want a non-zero integer)", env);
  }
  return EPIC_COMM_DEFAULT_TIMEOUT_MS;
}

epic_status epic_comm_create(const epic_comm_params *p, epic_comm **out) {
  epic_status st = EPIC_OK;
  const epic_comm_ops *ops = NULL;
  epic_comm *c = NULL;
  MPI_Comm boot = MPI_COMM_NULL, node = MPI_COMM_NULL;
  int inited = 0, initialised_backend = 0;

  if (!out) return EPIC_ERR_INVALID;
  *out = NULL;
  if (!p || p->size != sizeof(epic_comm_params)) {
    EPIC_LOG_ERROR("comm: epic_comm_params.size is %zu, this build expects %zu",
                   p ? p->size : (size_t)0, sizeof(epic_comm_params));
    return EPIC_ERR_INVALID;
  }
  MPI_Initialized(&inited);
  if (!inited) {
    EPIC_LOG_ERROR("comm: MPI is not initialised; call epic_comm_mpi_init first");
    return EPIC_ERR_INVALID;
  }
  /* Every rank selects locally; a rank-dependent choice (e.g. a GPU missing on one node)
   * must not give a silent mismatch, so agree on it below. */
  epic_status sel = select_backend(p, &ops);
  MPI_Comm world = p->bootstrap ? *(const MPI_Comm *)p->bootstrap : MPI_COMM_WORLD;
  int mine[2] = {sel == EPIC_OK ? backend_index(ops) : -1, 0};
  mine[1] = -mine[0];
  int agg[2];
  EPIC_CHECK_MPI(MPI_Allreduce(mine, agg, 2, MPI_INT, MPI_MIN, world));
  if (sel != EPIC_OK) return sel;
  if (agg[0] < 0) {
    EPIC_LOG_ERROR("comm: backend selection failed on another rank");
    return EPIC_ERR_UNSUPPORTED;
  }
  if (agg[0] != -agg[1]) {
    EPIC_LOG_ERROR("comm: ranks selected different backends (this rank: %s); set EPIC_COMM "
                   "or params.backend explicitly",
                   ops->name);
    return EPIC_ERR_UNSUPPORTED;
  }

  EPIC_CHECK_MPI(MPI_Comm_dup(world, &boot));
  if (MPI_Comm_set_errhandler(boot, MPI_ERRORS_RETURN) != MPI_SUCCESS) {
    st = EPIC_ERR_COMM;
    goto fail;
  }
  c = calloc(1, ops->comm_bytes);
  if (!c) {
    st = EPIC_ERR_NOMEM;
    goto fail;
  }
  c->ops = ops;
  c->boot = boot;
  c->timeout_ms = timeout_from(p);
  c->device = p->device;
  c->stream = p->stream;
  MPI_Comm_rank(boot, &c->rank);
  MPI_Comm_size(boot, &c->nranks);
  int mrc = MPI_Comm_split_type(boot, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL, &node);
  if (mrc != MPI_SUCCESS) {
    st = epic_comm_mpi_error(mrc, "MPI_Comm_split_type", __FILE__, __LINE__);
    goto fail;
  }
  MPI_Comm_rank(node, &c->local_rank);
  MPI_Comm_free(&node);

  EPIC_CHECK_GOTO(ops->init(c, p), st, fail);
  initialised_backend = 1;
  EPIC_LOG_DEBUG("comm: backend %s, rank %d of %d (local %d), timeout %d ms", ops->name, c->rank,
                 c->nranks, c->local_rank, c->timeout_ms);
  *out = c;
  return EPIC_OK;

fail:
  (void)initialised_backend;
  free(c);
  if (boot != MPI_COMM_NULL) MPI_Comm_free(&boot);
  return st;
}

void epic_comm_destroy(epic_comm *c) {
  if (!c) return;
  if (c->outstanding)
    EPIC_LOG_WARN("comm: destroying a communicator with %d outstanding request(s)", c->outstanding);
  c->ops->fini(c);
  MPI_Comm_free(&c->boot);
  free(c);
}

int epic_comm_rank(const epic_comm *c) { return c->rank; }
int epic_comm_size(const epic_comm *c) { return c->nranks; }
int epic_comm_local_rank(const epic_comm *c) { return c->local_rank; }
int epic_comm_failed(const epic_comm *c) { return c && c->failed; }

void epic_comm_abort(epic_comm *c, int code) {
  fflush(stdout);
  fflush(stderr);
  MPI_Abort(c ? c->boot : MPI_COMM_WORLD, code);
  _exit(code); /* MPI_Abort does not return; this is for an MPI that does */
}

int epic_comm_timeout_ms(const epic_comm *c) { return c->ops->progress ? c->timeout_ms : -1; }
const char *epic_comm_backend_name(const epic_comm *c) { return c->ops->name; }
int epic_comm_device_buffers(const epic_comm *c) { return c->ops->device_buffers; }

/* ---- data plane ------------------------------------------------------------------------- */

epic_status epic_comm_check_a2a(const epic_comm *c, const epic_a2a_args *a) {
  if (!a || !a->send_counts || !a->send_displs || !a->recv_counts || !a->recv_displs) {
    EPIC_LOG_ERROR("comm: alltoallv: NULL argument (counts and displacements are required)");
    return EPIC_ERR_INVALID;
  }
  if (a->send_counts[c->rank] != a->recv_counts[c->rank]) {
    EPIC_LOG_ERROR("comm: alltoallv: rank %d sends %zu bytes to itself but expects %zu", c->rank,
                   a->send_counts[c->rank], a->recv_counts[c->rank]);
    return EPIC_ERR_INVALID;
  }
  for (int p = 0; p < c->nranks; p++) {
    if ((a->send_counts[p] && !a->send) || (a->recv_counts[p] && !a->recv)) {
      EPIC_LOG_ERROR("comm: alltoallv: NULL buffer with non-zero count for peer %d", p);
      return EPIC_ERR_INVALID;
    }
  }
  return EPIC_OK;
}

epic_status epic_comm_alltoallv_start(epic_comm *c, const epic_a2a_args *a, epic_comm_req **req) {
  if (!c || !req) return EPIC_ERR_INVALID;
  *req = NULL;
  EPIC_CHECK(epic_comm_check_a2a(c, a));
  epic_comm_req *r = NULL;
  EPIC_CHECK(c->ops->a2a_start(c, a, &r));
  r->comm = c;
  c->outstanding++;
  *req = r;
  return EPIC_OK;
}

static void release(epic_comm_req **req) {
  epic_comm_req *r = *req;
  r->comm->outstanding--;
  r->comm->ops->req_free(r);
  *req = NULL;
}

/* Timeouts and peer failures leave the job unable to go on together. */
static epic_status note_failure(epic_comm *c, epic_status st) {
  if (st == EPIC_ERR_TIMEOUT || st == EPIC_ERR_COMM) c->failed = 1;
  return st;
}

epic_status epic_comm_wait(epic_comm_req **req) {
  if (!req || !*req) return EPIC_OK;
  epic_comm *c = (*req)->comm;
  epic_status st = (*req)->comm->ops->req_wait(*req);
  release(req);
  return note_failure(c, st);
}

epic_status epic_comm_test(epic_comm_req **req, int *done) {
  if (!req || !done) return EPIC_ERR_INVALID;
  *done = 1;
  if (!*req) return EPIC_OK;
  *done = 0;
  epic_status st = (*req)->comm->ops->req_test(*req, done);
  if (st < 0) *done = 1;
  if (*done) release(req);
  return st < 0 ? st : EPIC_OK;
}

void epic_comm_req_free(epic_comm_req *req) {
  if (req) release(&req);
}

epic_status epic_comm_req_queue_wait(epic_comm_req *req, void *queue) {
  if (!req || !queue) return EPIC_ERR_INVALID;
  if (!req->comm->ops->req_queue_wait) return EPIC_ERR_UNSUPPORTED;
  return req->comm->ops->req_queue_wait(req, queue);
}

epic_status epic_comm_alltoallv(epic_comm *c, const epic_a2a_args *a) {
  epic_comm_req *r = NULL;
  EPIC_CHECK(epic_comm_alltoallv_start(c, a, &r));
  EPIC_CHECK(epic_comm_wait(&r));
  return EPIC_OK;
}

/* ---- control plane: generic MPI implementations ------------------------------------------ */

epic_status epic_comm_mpi_wait_progress(epic_comm *c, MPI_Request *r, const char *what) {
  int rc;
  if (!c->ops->progress) {
    rc = MPI_Wait(r, MPI_STATUS_IGNORE);
  } else {
    /* A backend with its own progress (ucx) can tell a stopped or unreachable
     * peer from a slow one only by time. Twice its data-plane timeout: a rank
     * blocked in the data plane (which names the silent peer) reports first. */
    const double t0 = epic_now_seconds(), limit = c->timeout_ms > 0 ? 2 * c->timeout_ms / 1e3 : -1;
    int done = 0;
    do {
      c->ops->progress(c);
      rc = MPI_Test(r, &done, MPI_STATUS_IGNORE);
      if (rc == MPI_SUCCESS && !done && limit > 0 && epic_now_seconds() - t0 > limit) {
        EPIC_LOG_ERROR("comm: %s: rank %d waited %d ms without progress: a peer is stopped or "
                       "unreachable (the job cannot continue)",
                       what, c->rank, 2 * c->timeout_ms);
        c->failed = 1;
        return EPIC_ERR_TIMEOUT;
      }
    } while (rc == MPI_SUCCESS && !done);
  }
  if (rc != MPI_SUCCESS) return note_failure(c, epic_comm_mpi_error(rc, what, __FILE__, __LINE__));
  return EPIC_OK;
}

static epic_status check_int_bytes(size_t bytes, const char *what) {
  if (bytes > (size_t)INT_MAX) {
    EPIC_LOG_ERROR("comm: %s of %zu bytes per rank exceeds the control-plane limit of %d bytes; "
                   "use epic_comm_alltoallv for bulk data",
                   what, bytes, INT_MAX);
    return EPIC_ERR_UNSUPPORTED;
  }
  return EPIC_OK;
}

epic_status epic_comm_alltoall_counts_n(epic_comm *c, const int64_t *send, int64_t *recv,
                                        int64_t n) {
  MPI_Request r;
  if (!c || !send || !recv || n < 1 || n > INT_MAX / (int64_t)sizeof(int64_t))
    return EPIC_ERR_INVALID;
  if (c->ops->progress && !epic_comm_device_buffers(c)) {
    /* Over the backend's own transport (ucx): a peer that stops answering is
     * then named by the data plane's timeout ("pending with rank(s) ..."), which
     * an MPI collective cannot say. This exchange precedes every MoE dispatch,
     * where a stuck rank is most likely to be noticed. */
    const size_t np = (size_t)c->nranks, blk = (size_t)n * sizeof(int64_t);
    size_t *b = malloc(2 * np * sizeof *b);
    if (!b) return EPIC_ERR_NOMEM;
    for (size_t p = 0; p < np; p++) {
      b[p] = blk;
      b[np + p] = p * blk;
    }
    epic_a2a_args a = {.send = send, .send_counts = b, .send_displs = b + np, .recv = recv,
                       .recv_counts = b, .recv_displs = b + np};
    epic_status st = epic_comm_alltoallv(c, &a);
    free(b);
    return st;
  }
  EPIC_CHECK_MPI(
      MPI_Ialltoall(send, (int)n, MPI_INT64_T, recv, (int)n, MPI_INT64_T, c->boot, &r));
  return epic_comm_mpi_wait_progress(c, &r, "MPI_Ialltoall(counts)");
}

epic_status epic_comm_alltoall_counts(epic_comm *c, const int64_t *send, int64_t *recv) {
  return epic_comm_alltoall_counts_n(c, send, recv, 1);
}

epic_status epic_comm_allgather(epic_comm *c, const void *send, void *recv, size_t bytes) {
  MPI_Request r;
  if (!c || (bytes && (!send || !recv))) return EPIC_ERR_INVALID;
  EPIC_CHECK(check_int_bytes(bytes, "allgather"));
  EPIC_CHECK_MPI(
      MPI_Iallgather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, c->boot, &r));
  return epic_comm_mpi_wait_progress(c, &r, "MPI_Iallgather");
}

epic_status epic_comm_allgatherv(epic_comm *c, const void *send, size_t send_bytes, void *recv,
                                 const size_t *counts, const size_t *displs) {
  epic_status st = EPIC_OK;
  MPI_Request r;
  if (!c || !counts || !displs || !recv) return EPIC_ERR_INVALID;
  if (send_bytes != counts[c->rank]) {
    EPIC_LOG_ERROR("comm: allgatherv: rank %d sends %zu bytes but counts[%d] = %zu", c->rank,
                   send_bytes, c->rank, counts[c->rank]);
    return EPIC_ERR_INVALID;
  }
  int *ic = malloc(2 * (size_t)c->nranks * sizeof(int));
  if (!ic) return EPIC_ERR_NOMEM;
  int *id = ic + c->nranks;
  for (int p = 0; p < c->nranks; p++) {
    EPIC_CHECK_GOTO(check_int_bytes(counts[p], "allgatherv"), st, out);
    EPIC_CHECK_GOTO(check_int_bytes(displs[p], "allgatherv displacement"), st, out);
    ic[p] = (int)counts[p];
    id[p] = (int)displs[p];
  }
  int rc = MPI_Iallgatherv(send, (int)send_bytes, MPI_BYTE, recv, ic, id, MPI_BYTE, c->boot, &r);
  if (rc != MPI_SUCCESS) {
    st = epic_comm_mpi_error(rc, "MPI_Iallgatherv", __FILE__, __LINE__);
    goto out;
  }
  st = epic_comm_mpi_wait_progress(c, &r, "MPI_Iallgatherv");
out:
  free(ic);
  return st;
}

static epic_status check_root(const epic_comm *c, int root, const char *what) {
  if (root < 0 || root >= c->nranks) {
    EPIC_LOG_ERROR("comm: %s: root %d out of range [0, %d)", what, root, c->nranks);
    return EPIC_ERR_INVALID;
  }
  return EPIC_OK;
}

epic_status epic_comm_bcast(epic_comm *c, void *buf, size_t bytes, int root) {
  MPI_Request r;
  if (!c || (bytes && !buf)) return EPIC_ERR_INVALID;
  EPIC_CHECK(check_root(c, root, "bcast"));
  EPIC_CHECK(check_int_bytes(bytes, "bcast"));
  EPIC_CHECK_MPI(MPI_Ibcast(buf, (int)bytes, MPI_BYTE, root, c->boot, &r));
  return epic_comm_mpi_wait_progress(c, &r, "MPI_Ibcast");
}

epic_status epic_comm_gather(epic_comm *c, const void *send, void *recv, size_t bytes, int root) {
  MPI_Request r;
  if (!c || (bytes && !send) || (bytes && c->rank == root && !recv)) return EPIC_ERR_INVALID;
  EPIC_CHECK(check_root(c, root, "gather"));
  EPIC_CHECK(check_int_bytes(bytes, "gather"));
  EPIC_CHECK_MPI(
      MPI_Igather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, root, c->boot, &r));
  return epic_comm_mpi_wait_progress(c, &r, "MPI_Igather");
}

epic_status epic_comm_barrier(epic_comm *c) {
  MPI_Request r;
  if (!c) return EPIC_ERR_INVALID;
  if (c->ops->barrier) return c->ops->barrier(c);
  EPIC_CHECK_MPI(MPI_Ibarrier(c->boot, &r));
  return epic_comm_mpi_wait_progress(c, &r, "MPI_Ibarrier");
}

static MPI_Op mpi_op(epic_comm_op op) {
  switch (op) {
  case EPIC_COMM_MAX: return MPI_MAX;
  case EPIC_COMM_MIN: return MPI_MIN;
  default: return MPI_SUM;
  }
}

static epic_status allreduce(epic_comm *c, const void *in, void *out, size_t n, MPI_Datatype t,
                             epic_comm_op op) {
  MPI_Request r;
  if (!c || (n && (!in || !out)) || (int)op < 0 || op > EPIC_COMM_MIN) return EPIC_ERR_INVALID;
  if (n > (size_t)INT_MAX) return check_int_bytes(n, "allreduce");
  EPIC_CHECK_MPI(MPI_Iallreduce(in == out ? MPI_IN_PLACE : in, out, (int)n, t, mpi_op(op), c->boot,
                                &r));
  return epic_comm_mpi_wait_progress(c, &r, "MPI_Iallreduce");
}

epic_status epic_comm_allreduce_f64(epic_comm *c, const double *in, double *out, size_t n,
                                    epic_comm_op op) {
  return allreduce(c, in, out, n, MPI_DOUBLE, op);
}

epic_status epic_comm_allreduce_i64(epic_comm *c, const int64_t *in, int64_t *out, size_t n,
                                    epic_comm_op op) {
  return allreduce(c, in, out, n, MPI_INT64_T, op);
}
