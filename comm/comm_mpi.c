/* MPI backend: host memory, point-to-point Isend/Irecv per peer on a private communicator.
 *
 * Why not MPI_Ialltoallv: its counts and displacements are int elements, so byte counts
 * above INT_MAX would need a common datatype unit for all peers. Point-to-point messages
 * are cut into chunks of at most EPIC_MPI_CHUNK bytes instead; MPI's non-overtaking rule
 * (same source, tag and communicator match in order) puts the chunks back in order. Each
 * asynchronous operation uses its own tag (its sequence number), so several can be in
 * flight and complete in any order. A dead peer is handled by mpirun, which terminates
 * the job (see comm.h). */
#include "comm/comm_impl.h"

#include <stdlib.h>
#include <string.h>

#define EPIC_MPI_CHUNK ((size_t)1 << 30)

typedef struct {
  struct epic_comm base;
  int tag_ub;
} epic_mpi_comm;

typedef struct {
  struct epic_comm_req base;
  int n;
  int done;
  MPI_Request *reqs;
} epic_mpi_req;

static epic_status epic_mpi_query(const epic_comm_params *p, int *priority) {
  (void)p;
  *priority = 50;
  return EPIC_OK;
}

static epic_status epic_mpi_init(epic_comm *c, const epic_comm_params *p) {
  epic_mpi_comm *m = (epic_mpi_comm *)c;
  int *ub = NULL, flag = 0;
  (void)p;
  EPIC_CHECK_MPI(MPI_Comm_get_attr(c->boot, MPI_TAG_UB, &ub, &flag));
  m->tag_ub = flag && ub ? *ub : 32767;
  return EPIC_OK;
}

static void epic_mpi_fini(epic_comm *c) { (void)c; }

static size_t nchunks(size_t bytes) { return bytes ? (bytes + EPIC_MPI_CHUNK - 1) / EPIC_MPI_CHUNK : 0; }

static epic_status epic_mpi_a2a_start(epic_comm *c, const epic_a2a_args *a, epic_comm_req **out) {
  epic_mpi_comm *m = (epic_mpi_comm *)c;
  epic_status st = EPIC_OK;
  size_t total = 0;
  for (int p = 0; p < c->nranks; p++) {
    if (p == c->rank) continue;
    total += nchunks(a->send_counts[p]) + nchunks(a->recv_counts[p]);
  }
  epic_mpi_req *r = calloc(1, sizeof *r);
  if (!r) return EPIC_ERR_NOMEM;
  r->reqs = calloc(total ? total : 1, sizeof(MPI_Request));
  if (!r->reqs) {
    free(r);
    return EPIC_ERR_NOMEM;
  }
  r->base.seq = c->seq++;
  int tag = (int)(r->base.seq % (uint32_t)m->tag_ub);
  char *rbuf = a->recv;
  const char *sbuf = a->send;

  /* Receives first so that eager data finds a posted buffer. Peers are visited starting
   * at rank+1 to spread the load instead of everyone hitting rank 0 first. */
  for (int k = 1; k < c->nranks; k++) {
    int p = (c->rank + c->nranks - k) % c->nranks;
    for (size_t off = 0; off < a->recv_counts[p]; off += EPIC_MPI_CHUNK) {
      size_t n = a->recv_counts[p] - off < EPIC_MPI_CHUNK ? a->recv_counts[p] - off : EPIC_MPI_CHUNK;
      int rc = MPI_Irecv(rbuf + a->recv_displs[p] + off, (int)n, MPI_BYTE, p, tag, c->boot,
                         &r->reqs[r->n]);
      if (rc != MPI_SUCCESS) {
        st = epic_comm_mpi_error(rc, "MPI_Irecv", __FILE__, __LINE__);
        goto fail;
      }
      r->n++;
    }
  }
  for (int k = 1; k < c->nranks; k++) {
    int p = (c->rank + k) % c->nranks;
    for (size_t off = 0; off < a->send_counts[p]; off += EPIC_MPI_CHUNK) {
      size_t n = a->send_counts[p] - off < EPIC_MPI_CHUNK ? a->send_counts[p] - off : EPIC_MPI_CHUNK;
      int rc = MPI_Isend(sbuf + a->send_displs[p] + off, (int)n, MPI_BYTE, p, tag, c->boot,
                         &r->reqs[r->n]);
      if (rc != MPI_SUCCESS) {
        st = epic_comm_mpi_error(rc, "MPI_Isend", __FILE__, __LINE__);
        goto fail;
      }
      r->n++;
    }
  }
  if (a->send_counts[c->rank])
    memmove(rbuf + a->recv_displs[c->rank], sbuf + a->send_displs[c->rank],
            a->send_counts[c->rank]);
  *out = &r->base;
  return EPIC_OK;
fail:
  for (int i = 0; i < r->n; i++) {
    MPI_Cancel(&r->reqs[i]);
    MPI_Request_free(&r->reqs[i]);
  }
  free(r->reqs);
  free(r);
  return st;
}

/* Testall/Waitall report MPI_ERR_IN_STATUS; find the first failing peer's real error. */
static epic_status statuses_error(epic_mpi_req *r, int rc, MPI_Status *sts, const char *what) {
  if (rc == MPI_ERR_IN_STATUS) {
    for (int i = 0; i < r->n; i++) {
      if (sts[i].MPI_ERROR != MPI_SUCCESS && sts[i].MPI_ERROR != MPI_ERR_PENDING) {
        EPIC_LOG_ERROR("comm: mpi alltoallv: transfer with rank %d failed", sts[i].MPI_SOURCE);
        return epic_comm_mpi_error(sts[i].MPI_ERROR, what, __FILE__, __LINE__);
      }
    }
  }
  return epic_comm_mpi_error(rc, what, __FILE__, __LINE__);
}

static epic_status epic_mpi_req_test(epic_comm_req *req, int *done) {
  epic_mpi_req *r = (epic_mpi_req *)req;
  epic_status st = EPIC_OK;
  int flag = 0;
  if (r->done || r->n == 0) {
    *done = 1;
    return EPIC_OK;
  }
  MPI_Status *sts = malloc((size_t)r->n * sizeof *sts);
  if (!sts) return EPIC_ERR_NOMEM;
  int rc = MPI_Testall(r->n, r->reqs, &flag, sts);
  if (rc != MPI_SUCCESS) st = statuses_error(r, rc, sts, "MPI_Testall");
  free(sts);
  *done = flag || st < 0;
  r->done = *done;
  return st;
}

static epic_status epic_mpi_req_wait(epic_comm_req *req) {
  epic_mpi_req *r = (epic_mpi_req *)req;
  epic_status st = EPIC_OK;
  if (r->done || r->n == 0) return EPIC_OK;
  MPI_Status *sts = malloc((size_t)r->n * sizeof *sts);
  if (!sts) return EPIC_ERR_NOMEM;
  int rc = MPI_Waitall(r->n, r->reqs, sts);
  if (rc != MPI_SUCCESS) st = statuses_error(r, rc, sts, "MPI_Waitall");
  free(sts);
  r->done = 1;
  return st;
}

static void epic_mpi_req_free(epic_comm_req *req) {
  epic_mpi_req *r = (epic_mpi_req *)req;
  for (int i = 0; i < r->n; i++) {
    if (r->reqs[i] != MPI_REQUEST_NULL) {
      MPI_Cancel(&r->reqs[i]);
      MPI_Request_free(&r->reqs[i]);
    }
  }
  free(r->reqs);
  free(r);
}

const epic_comm_ops epic_comm_mpi_ops = {
    .abi_version = EPIC_COMM_ABI_VERSION,
    .name = "mpi",
    .comm_bytes = sizeof(epic_mpi_comm),
    .device_buffers = 0,
    .query = epic_mpi_query,
    .init = epic_mpi_init,
    .fini = epic_mpi_fini,
    .a2a_start = epic_mpi_a2a_start,
    .req_test = epic_mpi_req_test,
    .req_wait = epic_mpi_req_wait,
    .req_free = epic_mpi_req_free,
    .progress = NULL,
    .barrier = NULL,
};
