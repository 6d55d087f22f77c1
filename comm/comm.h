/* epic_comm: communication between EPIC workers (DESIGN §2-§4).
 *
 * One interface, several backends chosen at run time (Open MPI MCA style: every
 * compiled-in backend is queried, the highest priority wins, the user can override):
 *   "mpi"  always built; host memory; the default when no GPU/NCCL is available.
 *   "ucx"  built with UCX (EPIC_HAVE_UCX); host memory; tagged ucp send/recv, with
 *          timeouts and peer-failure detection. Only chosen when named explicitly.
 *   "nccl" built with CUDA + NCCL (EPIC_HAVE_NCCL); data-plane buffers are *device*
 *          memory and operations are enqueued on a CUDA stream. Default when a GPU is present.
 *
 * Bootstrap. MPI is always the bootstrap: the caller initialises MPI (preferably through
 * epic_comm_mpi_init) before epic_comm_create and finalises it after epic_comm_destroy.
 *
 * Data plane vs control plane.
 *   - epic_comm_alltoallv / epic_comm_alltoallv_start (the MoE dispatch/combine) use the
 *     backend's transport; buffers live where epic_comm_device_buffers() says.
 *   - Everything else (counts exchange, allgather(v), bcast, gather, barrier, allreduce) is
 *     control plane: always *host* memory, run over the backend or, where a backend has no
 *     own implementation, over the MPI bootstrap communicator (while progressing the backend,
 *     so that no rank can starve a peer that waits on it).
 *
 * Failure behaviour.
 *   - mpi: a rank that dies makes mpirun (Open MPI's ORTE) terminate the whole job with a
 *     message naming the rank ("mpirun detected that one or more processes exited with
 *     non-zero status ... Process name: [[j,1],R]"). EPIC does not install handlers that
 *     could mask this; MPI errors that *are* returned (MPI_ERRORS_RETURN, set by
 *     epic_comm_mpi_init) become EPIC_ERR_COMM with MPI's message logged.
 *   - ucx: endpoints use peer error handling; a broken peer gives EPIC_ERR_COMM naming the
 *     rank. A wait that makes no progress for timeout_ms gives EPIC_ERR_TIMEOUT naming the
 *     ranks still pending. After any error the communicator is broken: destroy it.
 *
 * Thread contract: thread-compatible. One thread at a time may use an epic_comm and the
 * requests it created (MPI is initialised with MPI_THREAD_MULTIPLE so different epic_comm
 * objects may be used from different threads).
 *
 * Errors: every function returns epic_status and logs one EPIC_LOG_ERROR line a user can act
 * on (with the foreign library's own message) before returning an error. */
#ifndef EPIC_COMM_H
#define EPIC_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct epic_comm epic_comm;         /* opaque; see comm_impl.h */
typedef struct epic_comm_req epic_comm_req; /* an outstanding asynchronous operation */

/* ---- MPI bootstrap helpers -------------------------------------------------------- */

/* MPI_Init_thread requesting MPI_THREAD_MULTIPLE (a warning is logged when less is
 * provided), then MPI_ERRORS_RETURN on MPI_COMM_WORLD. rank/size may be NULL.
 * If MPI is already initialised it only reads rank and size. Blocks (collective). */
epic_status epic_comm_mpi_init(int *argc, char ***argv, int *rank, int *size);
/* MPI_Finalize if MPI is initialised and not yet finalised. Collective. */
epic_status epic_comm_mpi_finalize(void);

/* ---- creation ---------------------------------------------------------------------- */

#define EPIC_COMM_DEFAULT_TIMEOUT_MS 60000

typedef struct epic_comm_params {
  size_t size;          /* = sizeof(epic_comm_params); unknown sizes are rejected */
  const char *backend;  /* "auto" or NULL (then env EPIC_COMM, then priority), "mpi", "ucx", "nccl" */
  const void *bootstrap; /* pointer to an MPI_Comm (borrowed; duplicated inside);
                            NULL = MPI_COMM_WORLD */
  int timeout_ms;       /* ucx wait timeout; 0 = env EPIC_COMM_TIMEOUT_MS or 60000; <0 = none */
  int device;           /* nccl: CUDA device; -1 = node-local rank (mod device count) */
  void *stream;         /* nccl: default cudaStream_t for data-plane ops (NULL = stream 0) */
} epic_comm_params;

/* Create a communicator over the bootstrap group. Collective over the bootstrap
 * communicator: every rank must call it with the same backend. Blocks.
 * Errors: EPIC_ERR_INVALID (bad params, unknown backend name: the error line lists the
 * compiled-in backends), EPIC_ERR_UNSUPPORTED (backend known but not compiled in or not
 * usable here, e.g. nccl without a GPU), EPIC_ERR_COMM/EPIC_ERR_CUDA (transport setup).
 * On success *out is owned by the caller; release it with epic_comm_destroy. */
epic_status epic_comm_create(const epic_comm_params *p, epic_comm **out);
/* Collective (every rank must call it); NULL-safe. All requests must have been
 * completed (wait/test returned done) or freed first. */
void epic_comm_destroy(epic_comm *c);

int epic_comm_rank(const epic_comm *c);
int epic_comm_size(const epic_comm *c);
int epic_comm_local_rank(const epic_comm *c); /* rank among the ranks on this node */
/* The wait timeout in effect (ms; < 0 = none). With ucx twice this also bounds
 * the control-plane waits, so a caller that may sit idle in a collective for
 * longer (a follower waiting for the next step) must keep it alive. */
int epic_comm_timeout_ms(const epic_comm *c);
/* 1 once a wait timed out or a peer failed (EPIC_ERR_TIMEOUT / EPIC_ERR_COMM):
 * the ranks can no longer agree on anything, so a collective teardown
 * (destroy, MPI_Finalize) could wait forever for a stopped peer. */
int epic_comm_failed(const epic_comm *c);
/* End the whole job now (MPI_Abort: the launcher kills every rank, a stopped
 * one too). Does not return. For a process whose communicator failed. */
void epic_comm_abort(epic_comm *c, int code);
const char *epic_comm_backend_name(const epic_comm *c); /* static string */
/* 1 when data-plane buffers must be device memory (nccl), 0 for host memory. */
int epic_comm_device_buffers(const epic_comm *c);
/* Comma-separated compiled-in backend names, e.g. "mpi,ucx" (static string). */
const char *epic_comm_backends(void);

/* ---- data plane: all-to-all ------------------------------------------------------- */

/* Byte counts and displacements, one per peer (arrays of epic_comm_size entries, borrowed
 * for the duration of the call: the start function copies what it needs).
 * send_counts[p] bytes at send + send_displs[p] go to rank p, and recv_counts[p] bytes from
 * rank p land at recv + recv_displs[p]. Counts must agree pairwise
 * (my send_counts[p] == p's recv_counts[me]); use epic_comm_alltoall_counts to learn them.
 * Counts may be 0 and may exceed INT_MAX. Send and receive regions must not overlap. */
typedef struct epic_a2a_args {
  const void *send;
  const size_t *send_counts;
  const size_t *send_displs;
  void *recv;
  const size_t *recv_counts;
  const size_t *recv_displs;
  void *stream; /* nccl: cudaStream_t to enqueue on (NULL = params.stream); others ignore */
  void *after;  /* nccl: a cudaStream_t whose work queued so far (e.g. what wrote the send
                   rows) the operation waits for on the device, so the caller need not
                   synchronise; NULL: none. Others ignore it. */
} epic_a2a_args;

/* Blocking all-to-all-v. Collective. For nccl "blocking" means enqueued and the stream
 * synchronised. */
epic_status epic_comm_alltoallv(epic_comm *c, const epic_a2a_args *a);

/* Start an asynchronous all-to-all-v. Collective in order: every rank must start its
 * asynchronous operations in the same order. Several may be in flight at once (each gets
 * its own sequence number) and may be completed in any order. The buffers must stay
 * valid and untouched until the request completes. On success *req is owned by the caller
 * and is released by epic_comm_wait, by epic_comm_test when it reports done, or by
 * epic_comm_req_free. */
epic_status epic_comm_alltoallv_start(epic_comm *c, const epic_a2a_args *a,
                                      epic_comm_req **req);
/* Block until *req completes; frees it and sets *req = NULL (also on error). NULL *req is a
 * no-op returning EPIC_OK. ucx: gives EPIC_ERR_TIMEOUT after timeout_ms without completion. */
epic_status epic_comm_wait(epic_comm_req **req);
/* Progress *req without blocking. *done = 1 when complete: then *req is freed and set to
 * NULL and the return value is the operation's status. *done = 0: EPIC_OK, still running. */
epic_status epic_comm_test(epic_comm_req **req, int *done);
/* Abandon a request (cancels what can be cancelled; the communicator may be left unusable
 * if peers still take part). NULL-safe. Meant for error paths. */
void epic_comm_req_free(epic_comm_req *req);
/* Device-buffer backends (nccl): work queued on `queue` (a cudaStream_t) after this call
 * waits on the device for the operation to finish; the host does not wait. The request
 * stays the caller's, to wait for or test as usual, and before anything makes the host
 * wait on `queue`: a lost peer is noticed (and the operation aborted, releasing `queue`)
 * only by the request's wait. Other backends: EPIC_ERR_UNSUPPORTED. */
epic_status epic_comm_req_queue_wait(epic_comm_req *req, void *queue);

/* Exchange one int64 per peer: send[p] goes to rank p, recv[p] comes from rank p (both
 * epic_comm_size entries, host memory). The usual step before an alltoallv. Collective. */
epic_status epic_comm_alltoall_counts(epic_comm *c, const int64_t *send, int64_t *recv);
/* The same with n int64 per peer: send[p * n .. p * n + n) goes to rank p, recv[q * n ..
 * q * n + n) comes from rank q (n >= 1; the expert-parallel dispatch sends its per-expert
 * row counts so). Collective, every rank with the same n. */
epic_status epic_comm_alltoall_counts_n(epic_comm *c, const int64_t *send, int64_t *recv,
                                        int64_t n);

/* ---- control plane (host memory, collective, blocking) ------------------------------ */

/* Every rank contributes `bytes` bytes; recv gets size*bytes bytes in rank order. */
epic_status epic_comm_allgather(epic_comm *c, const void *send, void *recv, size_t bytes);
/* Rank r contributes counts[r] bytes, placed at recv + displs[r] on every rank. counts and
 * displs are size entries, identical on all ranks. */
epic_status epic_comm_allgatherv(epic_comm *c, const void *send, size_t send_bytes, void *recv,
                                 const size_t *counts, const size_t *displs);
/* root's buf (bytes bytes) is copied into every rank's buf. */
epic_status epic_comm_bcast(epic_comm *c, void *buf, size_t bytes, int root);
/* Every rank sends `bytes` bytes; root's recv gets size*bytes in rank order (recv is
 * ignored and may be NULL on the other ranks). */
epic_status epic_comm_gather(epic_comm *c, const void *send, void *recv, size_t bytes, int root);
epic_status epic_comm_barrier(epic_comm *c);

typedef enum { EPIC_COMM_SUM = 0, EPIC_COMM_MAX = 1, EPIC_COMM_MIN = 2 } epic_comm_op;
/* Element-wise reduction of n doubles / int64s over all ranks into out on every rank
 * (in == out allowed). */
epic_status epic_comm_allreduce_f64(epic_comm *c, const double *in, double *out, size_t n,
                                    epic_comm_op op);
epic_status epic_comm_allreduce_i64(epic_comm *c, const int64_t *in, int64_t *out, size_t n,
                                    epic_comm_op op);

#ifdef __cplusplus
}
#endif

#endif
