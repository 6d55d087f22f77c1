/* NCCL backend: data-plane buffers in device memory, operations enqueued on a CUDA stream
 * (RECIPES §6). Bootstrap: rank 0's ncclUniqueId is broadcast over the MPI bootstrap
 * communicator; each rank binds the GPU of its node-local rank.
 *
 * alltoallv = one ncclGroupStart/End of ncclSend/ncclRecv per peer with a non-zero count
 * (ncclInt8 elements, size_t counts, so no INT_MAX limit), the self part a
 * cudaMemcpyAsync. The request records a CUDA event after the group; test polls it, wait
 * polls it with the communicator's timeout while checking ncclCommGetAsyncError (a dead
 * peer otherwise leaves the kernels spinning forever), and aborts the NCCL communicator on
 * timeout or error. A producer stream (args.after) is waited for through the same event
 * before the group; a consumer stream waits on it after (req_queue_wait). */
#define _POSIX_C_SOURCE 200809L
#include "comm/comm_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>
#include <nccl.h>

typedef struct {
  struct epic_comm base;
  ncclComm_t nccl;
  int broken;
} epic_nccl_comm;

typedef struct {
  struct epic_comm_req base;
  cudaEvent_t ev;
  int done;
  epic_status st;
  double start_ms;
} epic_nccl_req;

static epic_status nccl_error(ncclResult_t r, const char *what, const char *file, int line) {
  EPIC_LOG_ERROR("comm: nccl: %s failed: %s (%s:%d)", what, ncclGetErrorString(r), file, line);
  switch (r) {
  case ncclInvalidArgument:
  case ncclInvalidUsage: return EPIC_ERR_INVALID;
  case ncclUnhandledCudaError: return EPIC_ERR_CUDA;
  default: return EPIC_ERR_COMM;
  }
}
static epic_status cuda_error(cudaError_t e, const char *what, const char *file, int line) {
  EPIC_LOG_ERROR("comm: nccl: %s failed: %s (%s:%d)", what, cudaGetErrorString(e), file, line);
  return e == cudaErrorMemoryAllocation ? EPIC_ERR_NOMEM : EPIC_ERR_CUDA;
}
#define EPIC_CHECK_NCCL(call)                                                          \
  do {                                                                                 \
    ncclResult_t nr_ = (call);                                                         \
    if (nr_ != ncclSuccess) return nccl_error(nr_, #call, __FILE__, __LINE__);         \
  } while (0)
#define EPIC_CHECK_CUDA(call)                                                          \
  do {                                                                                 \
    cudaError_t ce_ = (call);                                                          \
    if (ce_ != cudaSuccess) return cuda_error(ce_, #call, __FILE__, __LINE__);         \
  } while (0)

/* Usable when every rank sees a GPU and, with automatic device choice, a node
 * has no more ranks than GPUs (two ranks on one GPU make NCCL fail with
 * "Duplicate GPU detected"). Collective over the bootstrap communicator, and the
 * ranks agree, so that all of them pick the same backend. */
static epic_status epic_nccl_query(const epic_comm_params *p, int *priority) {
  MPI_Comm boot = p->bootstrap ? *(const MPI_Comm *)p->bootstrap : MPI_COMM_WORLD, node;
  int n = 0, local = 1, ok;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (MPI_Comm_split_type(boot, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) == MPI_SUCCESS) {
    MPI_Comm_size(node, &local);
    MPI_Comm_free(&node);
  }
  ok = e == cudaSuccess && n > 0 && (p->device >= 0 || local <= n);
  if (MPI_Allreduce(MPI_IN_PLACE, &ok, 1, MPI_INT, MPI_MIN, boot) != MPI_SUCCESS) ok = 0;
  if (!ok) {
    if (e != cudaSuccess || n == 0)
      EPIC_LOG_DEBUG("comm: nccl not usable: %s", e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device");
    else if (p->device < 0 && local > n)
      EPIC_LOG_DEBUG("comm: nccl not usable: %d ranks on this node but %d GPUs", local, n);
    else
      EPIC_LOG_DEBUG("comm: nccl not usable on another rank");
    return EPIC_ERR_UNSUPPORTED;
  }
  *priority = 100;
  return EPIC_OK;
}

static epic_status epic_nccl_init(epic_comm *c, const epic_comm_params *p) {
  epic_nccl_comm *n = (epic_nccl_comm *)c;
  epic_status st = EPIC_OK;
  ncclUniqueId id;
  int ndev = 0, dev = 0;
  (void)p;
  /* NVLink SHARP (multicast) is off unless the user asked for it (KINDS.md). */
  setenv("NCCL_NVLS_ENABLE", "0", 0);

  cudaError_t e = cudaGetDeviceCount(&ndev);
  if (e != cudaSuccess || ndev == 0) {
    st = e != cudaSuccess ? cuda_error(e, "cudaGetDeviceCount", __FILE__, __LINE__)
                          : EPIC_ERR_UNSUPPORTED;
  } else {
    dev = c->device >= 0 ? c->device : c->local_rank % ndev;
    c->device = dev;
    e = cudaSetDevice(dev);
    if (e != cudaSuccess) st = cuda_error(e, "cudaSetDevice", __FILE__, __LINE__);
  }
  memset(&id, 0, sizeof id);
  if (st == EPIC_OK && c->rank == 0) {
    ncclResult_t r = ncclGetUniqueId(&id);
    if (r != ncclSuccess) st = nccl_error(r, "ncclGetUniqueId", __FILE__, __LINE__);
  }
  /* Agree before ncclCommInitRank: a rank that failed above would leave the others
   * waiting in NCCL's bootstrap forever. */
  int ok = st == EPIC_OK, all_ok = 0;
  EPIC_CHECK_MPI(MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, c->boot));
  if (!all_ok) {
    if (st == EPIC_OK) EPIC_LOG_ERROR("comm: nccl: setup failed on another rank");
    return st == EPIC_OK ? EPIC_ERR_COMM : st;
  }
  EPIC_CHECK_MPI(MPI_Bcast(&id, (int)sizeof id, MPI_BYTE, 0, c->boot));
  EPIC_CHECK_NCCL(ncclCommInitRank(&n->nccl, c->nranks, id, c->rank));
  EPIC_LOG_DEBUG("comm: nccl rank %d on device %d", c->rank, dev);
  return EPIC_OK;
}

static void epic_nccl_fini(epic_comm *c) {
  epic_nccl_comm *n = (epic_nccl_comm *)c;
  if (!n->nccl) return;
  if (n->broken) {
    ncclCommAbort(n->nccl);
  } else {
    ncclCommFinalize(n->nccl);
    ncclCommDestroy(n->nccl);
  }
  n->nccl = NULL;
}

static epic_status epic_nccl_a2a_start(epic_comm *c, const epic_a2a_args *a, epic_comm_req **out) {
  epic_nccl_comm *n = (epic_nccl_comm *)c;
  epic_status st = EPIC_OK;
  if (n->broken) {
    EPIC_LOG_ERROR("comm: nccl: communicator is broken by an earlier failure; destroy it");
    return EPIC_ERR_COMM;
  }
  cudaStream_t s = (cudaStream_t)(a->stream ? a->stream : c->stream);
  epic_nccl_req *r = calloc(1, sizeof *r);
  if (!r) return EPIC_ERR_NOMEM;
  r->base.seq = c->seq++;
  r->start_ms = epic_comm_now_ms();
  cudaError_t e = cudaEventCreateWithFlags(&r->ev, cudaEventDisableTiming);
  if (e != cudaSuccess) {
    free(r);
    return cuda_error(e, "cudaEventCreateWithFlags", __FILE__, __LINE__);
  }
  const char *sb = a->send;
  char *rb = a->recv;
  if (a->after) { /* the producer's queued work first, on the device (the event is reused) */
    e = cudaEventRecord(r->ev, (cudaStream_t)a->after);
    if (e == cudaSuccess) e = cudaStreamWaitEvent(s, r->ev, 0);
    if (e != cudaSuccess) {
      st = cuda_error(e, "ordering after the producer's stream", __FILE__, __LINE__);
      goto fail;
    }
  }
  ncclResult_t nr = ncclGroupStart();
  if (nr != ncclSuccess) {
    st = nccl_error(nr, "ncclGroupStart", __FILE__, __LINE__);
    goto fail;
  }
  for (int k = 1; k < c->nranks; k++) {
    int p = (c->rank + k) % c->nranks;
    if (a->send_counts[p]) {
      nr = ncclSend(sb + a->send_displs[p], a->send_counts[p], ncclInt8, p, n->nccl, s);
      if (nr != ncclSuccess) break;
    }
    if (a->recv_counts[p]) {
      nr = ncclRecv(rb + a->recv_displs[p], a->recv_counts[p], ncclInt8, p, n->nccl, s);
      if (nr != ncclSuccess) break;
    }
  }
  ncclResult_t ge = ncclGroupEnd();
  if (nr == ncclSuccess) nr = ge;
  if (nr != ncclSuccess) {
    n->broken = 1;
    st = nccl_error(nr, "ncclSend/ncclRecv group", __FILE__, __LINE__);
    goto fail;
  }
  if (a->send_counts[c->rank]) {
    e = cudaMemcpyAsync(rb + a->recv_displs[c->rank], sb + a->send_displs[c->rank],
                        a->send_counts[c->rank], cudaMemcpyDeviceToDevice, s);
    if (e != cudaSuccess) {
      st = cuda_error(e, "cudaMemcpyAsync(self)", __FILE__, __LINE__);
      goto fail;
    }
  }
  e = cudaEventRecord(r->ev, s);
  if (e != cudaSuccess) {
    st = cuda_error(e, "cudaEventRecord", __FILE__, __LINE__);
    goto fail;
  }
  *out = &r->base;
  return EPIC_OK;
fail:
  cudaEventDestroy(r->ev);
  free(r);
  return st;
}

static epic_status epic_nccl_req_test(epic_comm_req *req, int *done) {
  epic_nccl_req *r = (epic_nccl_req *)req;
  epic_nccl_comm *n = (epic_nccl_comm *)req->comm;
  *done = 0;
  if (r->done) {
    *done = 1;
    return r->st;
  }
  cudaError_t e = cudaEventQuery(r->ev);
  if (e == cudaSuccess) {
    r->done = *done = 1;
    return r->st = EPIC_OK;
  }
  if (e != cudaErrorNotReady) {
    r->st = cuda_error(e, "cudaEventQuery", __FILE__, __LINE__);
  } else {
    ncclResult_t async = ncclSuccess;
    ncclCommGetAsyncError(n->nccl, &async);
    if (async != ncclSuccess && async != ncclInProgress) {
      r->st = nccl_error(async, "alltoallv (asynchronous error: peer lost?)", __FILE__, __LINE__);
    } else if (req->comm->timeout_ms >= 0 &&
               epic_comm_now_ms() - r->start_ms > (double)req->comm->timeout_ms) {
      EPIC_LOG_ERROR("comm: nccl: alltoallv #%u not finished after %d ms; aborting the NCCL "
                     "communicator (a peer is dead or stuck)",
                     req->seq, req->comm->timeout_ms);
      r->st = EPIC_ERR_TIMEOUT;
    }
  }
  if (r->st != EPIC_OK) {
    n->broken = 1;
    r->done = *done = 1;
  }
  return r->st;
}

static epic_status epic_nccl_req_wait(epic_comm_req *req) {
  int done = 0;
  epic_status st;
  do st = epic_nccl_req_test(req, &done);
  while (!done);
  return st;
}

static epic_status epic_nccl_req_queue_wait(epic_comm_req *req, void *queue) {
  epic_nccl_req *r = (epic_nccl_req *)req;
  EPIC_CHECK_CUDA(cudaStreamWaitEvent((cudaStream_t)queue, r->ev, 0));
  return EPIC_OK;
}

static void epic_nccl_req_free(epic_comm_req *req) {
  epic_nccl_req *r = (epic_nccl_req *)req;
  if (!r->done) ((epic_nccl_comm *)req->comm)->broken = 1;
  cudaEventDestroy(r->ev);
  free(r);
}

const epic_comm_ops epic_comm_nccl_ops = {
    .abi_version = EPIC_COMM_ABI_VERSION,
    .name = "nccl",
    .comm_bytes = sizeof(epic_nccl_comm),
    .device_buffers = 1,
    .query = epic_nccl_query,
    .init = epic_nccl_init,
    .fini = epic_nccl_fini,
    .a2a_start = epic_nccl_a2a_start,
    .req_test = epic_nccl_req_test,
    .req_wait = epic_nccl_req_wait,
    .req_free = epic_nccl_req_free,
    .progress = NULL,
    .barrier = NULL,
    .req_queue_wait = epic_nccl_req_queue_wait,
};
