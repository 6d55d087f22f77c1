/* Helper for test_comm_fail.sh: all ranks run alltoallv rounds; in round 3 rank 2, after
 * starting the exchange, either dies with _exit(1) (mode "die", the default) or stops
 * taking part without exiting (mode "hang": only the UCX timeout can save the others).
 * Usage: test_comm_fail_prog BACKEND [die|hang] */
#define _POSIX_C_SOURCE 200809L
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "comm/comm.h"
#include "common/log.h"

int main(int argc, char **argv) {
  int rank = 0, size = 0;
  if (epic_comm_mpi_init(&argc, &argv, &rank, &size) != EPIC_OK) return 2;
  epic_log_init(EPIC_LOG_LEVEL_WARN, rank);
  epic_comm *c = NULL;
  epic_comm_params p = {.size = sizeof p, .backend = argc > 1 ? argv[1] : "mpi",
                        .timeout_ms = 5000};
  if (epic_comm_create(&p, &c) != EPIC_OK) return 3;
  const size_t n = 1 << 16;
  size_t *cnt = calloc(2 * (size_t)size, sizeof(size_t)), *dsp = cnt + size;
  for (int q = 0; q < size; q++) {
    cnt[q] = n;
    dsp[q] = (size_t)q * n;
  }
  char *s = calloc((size_t)size, n), *r = calloc((size_t)size, n);
  epic_a2a_args a = {.send = s, .send_counts = cnt, .send_displs = dsp, .recv = r,
                     .recv_counts = cnt, .recv_displs = dsp};
  epic_status st = EPIC_OK;
  for (int round = 0; round < 10 && st == EPIC_OK; round++) {
    epic_comm_req *req = NULL;
    st = epic_comm_alltoallv_start(c, &a, &req);
    if (st != EPIC_OK) break;
    if (round == 3 && rank == 2 && argc > 2 && strcmp(argv[2], "hang") == 0) {
      fprintf(stderr, "pid %d: simulated hang in round %d\n", (int)getpid(), round);
      fflush(stderr);
      for (;;) pause(); /* killed by mpirun once a survivor exits non-zero */
    }
    if (round == 3 && rank == 2) {
      fprintf(stderr, "pid %d: simulated crash in round %d\n", (int)getpid(), round);
      fflush(stderr);
      _exit(1);
    }
    st = epic_comm_wait(&req);
  }
  if (st != EPIC_OK) {
    EPIC_LOG_ERROR("rank %d: alltoallv failed: %s", rank, epic_status_str(st));
    /* A survivor that knows a peer is gone must not wait in MPI_Finalize for it. */
    fflush(stderr);
    _exit(4);
  }
  epic_comm_destroy(c);
  free(s);
  free(r);
  free(cnt);
  epic_comm_mpi_finalize();
  return 0;
}
