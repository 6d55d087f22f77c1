/* Private to comm/: the epic_comm base struct and the backend vtable (SQLite VFS / ggml
 * backend shape, MCA-style query + priority). Backends embed `struct epic_comm` first in
 * their own struct and `struct epic_comm_req` first in their request struct.
 * Thread contract: as comm.h (one thread at a time per epic_comm). */
#ifndef EPIC_COMM_IMPL_H
#define EPIC_COMM_IMPL_H

#include <mpi.h>

#include "comm/comm.h"
#include "common/log.h"

#define EPIC_COMM_ABI_VERSION 1

typedef struct epic_comm_ops {
  int abi_version; /* EPIC_COMM_ABI_VERSION */
  const char *name;
  size_t comm_bytes;  /* sizeof the backend's struct (embeds struct epic_comm first) */
  int device_buffers; /* data-plane buffers are device memory */
  /* MCA-style: EPIC_OK + *priority (higher wins) when usable here, else
   * EPIC_ERR_UNSUPPORTED (with a DEBUG line saying why). Not collective. */
  epic_status (*query)(const epic_comm_params *p, int *priority);
  /* c is zeroed memory of comm_bytes with the base fields filled in. Collective. */
  epic_status (*init)(epic_comm *c, const epic_comm_params *p);
  void (*fini)(epic_comm *c); /* collective; frees backend resources, not c itself */
  /* Data plane. start allocates a request (embedding struct epic_comm_req first). */
  epic_status (*a2a_start)(epic_comm *c, const epic_a2a_args *a, epic_comm_req **req);
  /* Progress without blocking; *done = 1 when finished (status = result). Does not free. */
  epic_status (*req_test)(epic_comm_req *req, int *done);
  /* Block until finished (backend applies its timeout). Does not free. */
  epic_status (*req_wait)(epic_comm_req *req);
  /* Free (cancelling if still running). */
  void (*req_free)(epic_comm_req *req);
  /* Optional: one round of backend progress, called while the generic control-plane code
   * waits on non-blocking MPI (RECIPES §5 pitfall: peers must keep progressing). */
  void (*progress)(epic_comm *c);
  /* Optional control-plane overrides; NULL -> generic MPI implementation in comm.c. */
  epic_status (*barrier)(epic_comm *c);
  /* Optional (device-buffer backends): see epic_comm_req_queue_wait. */
  epic_status (*req_queue_wait)(epic_comm_req *req, void *queue);
} epic_comm_ops;

struct epic_comm {
  const epic_comm_ops *ops;
  int rank, nranks, local_rank;
  MPI_Comm boot;   /* private duplicate of the bootstrap communicator (MPI_ERRORS_RETURN) */
  int timeout_ms;  /* < 0: no timeout */
  int device;      /* nccl */
  void *stream;    /* nccl default stream */
  uint32_t seq;    /* next data-plane sequence number (same on all ranks) */
  int outstanding; /* live requests */
  int failed;      /* a wait timed out or a peer failed: no collective teardown */
};

struct epic_comm_req {
  epic_comm *comm;
  uint32_t seq;
};

/* Map an MPI error code to epic_status, logging MPI's message and `what`. */
epic_status epic_comm_mpi_error(int rc, const char *what, const char *file, int line);
#define EPIC_CHECK_MPI(call)                                                           \
  do {                                                                                 \
    int mrc_ = (call);                                                                 \
    if (mrc_ != MPI_SUCCESS) return epic_comm_mpi_error(mrc_, #call, __FILE__, __LINE__); \
  } while (0)

/* Wait on a non-blocking MPI request while progressing the backend (generic paths). */
epic_status epic_comm_mpi_wait_progress(epic_comm *c, MPI_Request *r, const char *what);

/* Sanity-check the per-peer arrays of an a2a (non-NULL, self counts match). */
epic_status epic_comm_check_a2a(const epic_comm *c, const epic_a2a_args *a);

/* Milliseconds from a monotonic clock. */
double epic_comm_now_ms(void);

extern const epic_comm_ops epic_comm_mpi_ops;
#ifdef EPIC_HAVE_UCX
extern const epic_comm_ops epic_comm_ucx_ops;
#endif
#ifdef EPIC_HAVE_NCCL
extern const epic_comm_ops epic_comm_nccl_ops;
#endif

#endif
