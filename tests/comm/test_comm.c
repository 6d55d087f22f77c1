/* Conformance suite for epic_comm, run against one backend per invocation under mpirun:
 *   mpirun -np N test_comm [mpi|ucx|nccl]      (or env EPIC_TEST_COMM_BACKEND)
 * Every rank runs the same tests in the same order. Checks inside a test never jump out
 * (that would leave peers blocked in a collective): CHECK records a failure and prints it,
 * and each test ends with agree(), an all-reduce of the pass flags followed by one
 * assert, so a failure on any rank fails the test on every rank. The process exit code is
 * non-zero when any test failed on any rank. */
#define _POSIX_C_SOURCE 200809L /* nanosleep */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <mpi.h>

#include "comm/comm.h"
#include "common/log.h"

#ifdef EPIC_HAVE_NCCL
#include <time.h>

#include <cuda_runtime.h>
#endif

static const char *g_backend = "mpi";
static epic_comm *g_comm;
static int g_rank, g_size;
static int g_ok; /* this rank's verdict for the running test */

#define CHECK(cond, ...)                                                                   \
  do {                                                                                     \
    if (!(cond)) {                                                                         \
      if (g_ok) {                                                                          \
        fprintf(stderr, "[rank %d] %s:%d: CHECK(%s) failed: ", g_rank, __FILE__, __LINE__, \
                #cond);                                                                    \
        fprintf(stderr, __VA_ARGS__);                                                      \
        fprintf(stderr, "\n");                                                             \
      }                                                                                    \
      g_ok = 0;                                                                            \
    }                                                                                      \
  } while (0)

static void begin(void) { g_ok = 1; }
static void agree(void) {
  int all = 0;
  MPI_Allreduce(&g_ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  assert_int_equal(all, 1);
}

/* ---- buffers where the backend wants them (device memory for nccl) ------------------ */

#ifdef EPIC_HAVE_NCCL
static int on_device(void) { return epic_comm_device_buffers(g_comm); }
#endif

static void *dbuf_alloc(size_t n) {
#ifdef EPIC_HAVE_NCCL
  if (on_device()) {
    void *p = NULL;
    if (cudaMalloc(&p, n ? n : 1) != cudaSuccess) return NULL;
    return p;
  }
#endif
  return malloc(n ? n : 1);
}
static void dbuf_free(void *p) {
#ifdef EPIC_HAVE_NCCL
  if (on_device()) {
    cudaFree(p);
    return;
  }
#endif
  free(p);
}
static void to_dev(void *d, const void *h, size_t n) {
#ifdef EPIC_HAVE_NCCL
  if (on_device()) {
    cudaMemcpy(d, h, n, cudaMemcpyHostToDevice);
    return;
  }
#endif
  memcpy(d, h, n);
}
static void from_dev(void *h, const void *d, size_t n) {
#ifdef EPIC_HAVE_NCCL
  if (on_device()) {
    cudaMemcpy(h, d, n, cudaMemcpyDeviceToHost);
    return;
  }
#endif
  memcpy(h, d, n);
}

/* ---- a2a patterns ------------------------------------------------------------------------ */

/* Bytes rank s sends to rank d in pattern `v`: irregular, with zeros (self included). */
static size_t pat_count(int s, int d, int v) {
  unsigned x = (unsigned)(s * 7 + d * 13 + v * 5);
  if ((s + d + v) % 3 == 0) return 0;
  return (size_t)(x % 11) * 37 + (size_t)v;
}
static unsigned char pat_byte(int s, int d, int v, size_t i) {
  return (unsigned char)(s * 31 + d * 17 + v * 101 + (int)(i * 7) + (int)(i >> 8));
}

#define GAP 8 /* bytes between receive regions; must stay untouched */
#define SENTINEL 0xEE

typedef struct {
  size_t *sc, *sd, *rc, *rd;
  size_t sbytes, rbytes;
  unsigned char *hs, *hr; /* host copies */
  void *ds, *dr;          /* backend buffers */
  epic_a2a_args args;
} a2a_case;

static void case_init(a2a_case *t, int v) {
  int n = g_size;
  t->sc = calloc(4 * (size_t)n, sizeof(size_t));
  t->sd = t->sc + n;
  t->rc = t->sd + n;
  t->rd = t->rc + n;
  t->sbytes = t->rbytes = 0;
  /* Send regions in reverse peer order, receive regions with gaps: displacements need
   * not be monotonic or dense. */
  for (int p = n - 1; p >= 0; p--) {
    t->sc[p] = pat_count(g_rank, p, v);
    t->sd[p] = t->sbytes;
    t->sbytes += t->sc[p];
  }
  for (int p = 0; p < n; p++) {
    t->rc[p] = pat_count(p, g_rank, v);
    t->rd[p] = t->rbytes + GAP;
    t->rbytes += t->rc[p] + GAP;
  }
  t->rbytes += GAP;
  t->hs = malloc(t->sbytes + 1);
  t->hr = malloc(t->rbytes);
  for (int p = 0; p < n; p++)
    for (size_t i = 0; i < t->sc[p]; i++) t->hs[t->sd[p] + i] = pat_byte(g_rank, p, v, i);
  memset(t->hr, SENTINEL, t->rbytes);
  t->ds = dbuf_alloc(t->sbytes);
  t->dr = dbuf_alloc(t->rbytes);
  to_dev(t->ds, t->hs, t->sbytes);
  to_dev(t->dr, t->hr, t->rbytes);
  t->args = (epic_a2a_args){.send = t->ds, .send_counts = t->sc, .send_displs = t->sd,
                            .recv = t->dr, .recv_counts = t->rc, .recv_displs = t->rd};
}

static void case_verify(a2a_case *t, int v) {
  from_dev(t->hr, t->dr, t->rbytes);
  size_t pos = 0;
  for (int p = 0; p < g_size; p++) {
    for (; pos < t->rd[p]; pos++)
      CHECK(t->hr[pos] == SENTINEL, "gap byte %zu overwritten (pattern %d)", pos, v);
    for (size_t i = 0; i < t->rc[p]; i++, pos++)
      CHECK(t->hr[pos] == pat_byte(p, g_rank, v, i), "pattern %d: byte %zu from rank %d: %u != %u",
            v, i, p, t->hr[pos], pat_byte(p, g_rank, v, i));
  }
  for (; pos < t->rbytes; pos++) CHECK(t->hr[pos] == SENTINEL, "tail byte %zu overwritten", pos);
}

static void case_fini(a2a_case *t) {
  dbuf_free(t->ds);
  dbuf_free(t->dr);
  free(t->hs);
  free(t->hr);
  free(t->sc);
}

/* ---- tests ---------------------------------------------------------------------------------- */

static void test_identity(void **state) {
  (void)state;
  begin();
  CHECK(epic_comm_rank(g_comm) == g_rank, "rank %d", epic_comm_rank(g_comm));
  CHECK(epic_comm_size(g_comm) == g_size, "size %d", epic_comm_size(g_comm));
  CHECK(strcmp(epic_comm_backend_name(g_comm), g_backend) == 0, "backend %s",
        epic_comm_backend_name(g_comm));
  CHECK(epic_comm_local_rank(g_comm) >= 0 && epic_comm_local_rank(g_comm) < g_size, "local rank");
  CHECK(strstr(epic_comm_backends(), "mpi") != NULL, "backends %s", epic_comm_backends());
  agree();
}

static void test_alltoallv_irregular(void **state) {
  (void)state;
  begin();
  for (int v = 0; v < 3; v++) {
    a2a_case t;
    case_init(&t, v);
    epic_status st = epic_comm_alltoallv(g_comm, &t.args);
    CHECK(st == EPIC_OK, "alltoallv: %s", epic_status_str(st));
    case_verify(&t, v);
    case_fini(&t);
  }
  agree();
}

static void test_alltoallv_all_zero(void **state) {
  (void)state;
  begin();
  size_t *z = calloc((size_t)g_size, sizeof(size_t));
  epic_a2a_args a = {.send = NULL, .send_counts = z, .send_displs = z, .recv = NULL,
                     .recv_counts = z, .recv_displs = z};
  epic_status st = epic_comm_alltoallv(g_comm, &a);
  CHECK(st == EPIC_OK, "%s", epic_status_str(st));
  free(z);
  agree();
}

static void test_alltoallv_bad_args(void **state) {
  (void)state;
  begin();
  size_t *c = calloc(2 * (size_t)g_size, sizeof(size_t));
  char b[4];
  c[g_rank] = 1; /* sends 1 byte to self but expects 0 back: rejected locally */
  epic_a2a_args a = {.send = b, .send_counts = c, .send_displs = c + g_size, .recv = b,
                     .recv_counts = c + g_size, .recv_displs = c + g_size};
  CHECK(epic_comm_alltoallv(g_comm, &a) == EPIC_ERR_INVALID, "self mismatch accepted");
  CHECK(epic_comm_alltoallv(g_comm, NULL) == EPIC_ERR_INVALID, "NULL args accepted");
  free(c);
  agree();
}

static void test_counts_exchange(void **state) {
  (void)state;
  begin();
  int64_t *s = malloc(2 * (size_t)g_size * sizeof(int64_t)), *r = s + g_size;
  for (int p = 0; p < g_size; p++) {
    s[p] = (int64_t)g_rank * 1000000007LL + p;
    r[p] = -1;
  }
  epic_status st = epic_comm_alltoall_counts(g_comm, s, r);
  CHECK(st == EPIC_OK, "%s", epic_status_str(st));
  for (int p = 0; p < g_size; p++)
    CHECK(r[p] == (int64_t)p * 1000000007LL + g_rank, "count from %d: %lld", p, (long long)r[p]);
  /* Counts learnt from the exchange drive a real alltoallv. */
  a2a_case t;
  case_init(&t, 1);
  for (int p = 0; p < g_size; p++) s[p] = (int64_t)t.sc[p];
  st = epic_comm_alltoall_counts(g_comm, s, r);
  for (int p = 0; p < g_size; p++) CHECK((size_t)r[p] == t.rc[p], "learnt count from %d", p);
  free(s);
  case_fini(&t);
  /* Several counts per peer (the dispatch's per-expert counts): block p to rank p. */
  enum { N = 3 };
  int64_t *sn = malloc(2 * N * (size_t)g_size * sizeof(int64_t)), *rn = sn + N * g_size;
  for (int p = 0; p < g_size; p++)
    for (int j = 0; j < N; j++) {
      sn[p * N + j] = (int64_t)g_rank * 1000003LL + p * 10 + j;
      rn[p * N + j] = -1;
    }
  st = epic_comm_alltoall_counts_n(g_comm, sn, rn, N);
  CHECK(st == EPIC_OK, "%s", epic_status_str(st));
  for (int p = 0; p < g_size; p++)
    for (int j = 0; j < N; j++)
      CHECK(rn[p * N + j] == (int64_t)p * 1000003LL + g_rank * 10 + j, "count %d from %d: %lld",
            j, p, (long long)rn[p * N + j]);
  CHECK(epic_comm_alltoall_counts_n(g_comm, sn, rn, 0) == EPIC_ERR_INVALID, "n = 0 refused");
  free(sn);
  agree();
}

#ifdef EPIC_HAVE_NCCL
/* Holds a stream back: queued work behind it runs 50 ms later. */
static void CUDART_CB hold_stream(void *arg) {
  (void)arg;
  const struct timespec ts = {0, 50 * 1000 * 1000};
  nanosleep(&ts, NULL);
}
#endif

/* Ordering on the device (nccl): an exchange started with args.after waits for what that
 * stream queued before it (the send rows' copy, held back 50 ms), and a stream made to
 * wait with epic_comm_req_queue_wait sees the received rows before the host waits for the
 * request. Without either, the rows sent or read would be the stale ones. Other backends
 * refuse the queue wait. */
static void test_queue_ordering(void **state) {
  (void)state;
  begin();
  a2a_case t;
  epic_comm_req *r = NULL;
  epic_status st;
  case_init(&t, 1);
#ifdef EPIC_HAVE_NCCL
  if (on_device()) {
    cudaStream_t prod = NULL, cons = NULL;
    unsigned char *pin = NULL;
    void *copy = dbuf_alloc(t.rbytes), *dr = t.dr;
    CHECK(cudaStreamCreateWithFlags(&prod, cudaStreamNonBlocking) == cudaSuccess, "stream");
    CHECK(cudaStreamCreateWithFlags(&cons, cudaStreamNonBlocking) == cudaSuccess, "stream");
    CHECK(cudaMallocHost((void **)&pin, t.sbytes + 1) == cudaSuccess, "pinned buffer");
    memcpy(pin, t.hs, t.sbytes);
    cudaMemset(t.ds, 0, t.sbytes); /* stale rows until the producer's copy */
    cudaDeviceSynchronize();
    cudaLaunchHostFunc(prod, hold_stream, NULL);
    cudaMemcpyAsync(t.ds, pin, t.sbytes, cudaMemcpyHostToDevice, prod);
    t.args.after = prod;
    st = epic_comm_alltoallv_start(g_comm, &t.args, &r);
    CHECK(st == EPIC_OK, "start: %s", epic_status_str(st));
    st = epic_comm_req_queue_wait(r, cons);
    CHECK(st == EPIC_OK, "queue wait: %s", epic_status_str(st));
    cudaMemcpyAsync(copy, t.dr, t.rbytes, cudaMemcpyDeviceToDevice, cons);
    CHECK(cudaStreamSynchronize(cons) == cudaSuccess, "consumer stream");
    t.dr = copy; /* what the consumer stream read */
    case_verify(&t, 1);
    t.dr = dr;
    st = epic_comm_wait(&r);
    CHECK(st == EPIC_OK, "wait: %s", epic_status_str(st));
    dbuf_free(copy);
    cudaFreeHost(pin);
    cudaStreamDestroy(prod);
    cudaStreamDestroy(cons);
    case_fini(&t);
    agree();
    return;
  }
#endif
  st = epic_comm_alltoallv_start(g_comm, &t.args, &r);
  CHECK(st == EPIC_OK, "start: %s", epic_status_str(st));
  CHECK(epic_comm_req_queue_wait(r, &t) == EPIC_ERR_UNSUPPORTED, "%s: queue wait refused",
        g_backend);
  CHECK(epic_comm_req_queue_wait(NULL, &t) == EPIC_ERR_INVALID, "no request");
  st = epic_comm_wait(&r);
  CHECK(st == EPIC_OK, "wait: %s", epic_status_str(st));
  case_verify(&t, 1);
  case_fini(&t);
  agree();
}

/* Two micro-batches in flight at once, completed in either order, with wait and test. */
static void test_async_overlap(void **state) {
  (void)state;
  begin();
  for (int order = 0; order < 3; order++) {
    a2a_case t0, t1;
    epic_comm_req *r0 = NULL, *r1 = NULL;
    case_init(&t0, 0);
    case_init(&t1, 2);
    epic_status st = epic_comm_alltoallv_start(g_comm, &t0.args, &r0);
    CHECK(st == EPIC_OK && r0, "start 0: %s", epic_status_str(st));
    st = epic_comm_alltoallv_start(g_comm, &t1.args, &r1);
    CHECK(st == EPIC_OK && r1, "start 1: %s", epic_status_str(st));
    if (order == 0) {
      CHECK(epic_comm_wait(&r1) == EPIC_OK, "wait 1");
      CHECK(epic_comm_wait(&r0) == EPIC_OK, "wait 0");
    } else if (order == 1) {
      CHECK(epic_comm_wait(&r0) == EPIC_OK, "wait 0");
      CHECK(epic_comm_wait(&r1) == EPIC_OK, "wait 1");
    } else {
      int d0 = 0, d1 = 0;
      while (!d0 || !d1) { /* poll both, as a pipelined step would between computations */
        if (!d1) CHECK(epic_comm_test(&r1, &d1) == EPIC_OK, "test 1");
        if (!d0) CHECK(epic_comm_test(&r0, &d0) == EPIC_OK, "test 0");
        if (!g_ok) break;
      }
    }
    CHECK(r0 == NULL && r1 == NULL, "requests not released");
    case_verify(&t0, 0);
    case_verify(&t1, 2);
    case_fini(&t0);
    case_fini(&t1);
  }
  int done = 0;
  epic_comm_req *none = NULL;
  CHECK(epic_comm_wait(&none) == EPIC_OK, "wait(NULL)");
  CHECK(epic_comm_test(&none, &done) == EPIC_OK && done == 1, "test(NULL)");
  agree();
}

static void test_allgather(void **state) {
  (void)state;
  begin();
  enum { B = 13 };
  unsigned char mine[B], *all = malloc((size_t)g_size * B);
  for (int i = 0; i < B; i++) mine[i] = (unsigned char)(g_rank * 40 + i);
  CHECK(epic_comm_allgather(g_comm, mine, all, B) == EPIC_OK, "allgather");
  for (int p = 0; p < g_size; p++)
    for (int i = 0; i < B; i++)
      CHECK(all[p * B + i] == (unsigned char)(p * 40 + i), "allgather byte %d from %d", i, p);
  free(all);

  size_t *cnt = malloc(2 * (size_t)g_size * sizeof(size_t)), *dsp = cnt + g_size, tot = 0;
  for (int p = 0; p < g_size; p++) {
    cnt[p] = (size_t)(p % 2 ? 0 : 5 + 3 * p);
    dsp[p] = tot;
    tot += cnt[p] + 1;
  }
  unsigned char *send = malloc(cnt[g_rank] + 1), *recv = malloc(tot + 1);
  memset(recv, SENTINEL, tot + 1);
  for (size_t i = 0; i < cnt[g_rank]; i++) send[i] = (unsigned char)(g_rank + 3 * i);
  CHECK(epic_comm_allgatherv(g_comm, send, cnt[g_rank], recv, cnt, dsp) == EPIC_OK, "allgatherv");
  for (int p = 0; p < g_size; p++) {
    for (size_t i = 0; i < cnt[p]; i++)
      CHECK(recv[dsp[p] + i] == (unsigned char)(p + 3 * i), "allgatherv byte %zu from %d", i, p);
    CHECK(recv[dsp[p] + cnt[p]] == SENTINEL, "allgatherv gap after %d", p);
  }
  free(send);
  free(recv);
  free(cnt);
  agree();
}

static void test_bcast_gather(void **state) {
  (void)state;
  begin();
  for (int root = 0; root < g_size; root += (g_size > 1 ? g_size - 1 : 1)) {
    char buf[64];
    if (g_rank == root)
      snprintf(buf, sizeof buf, "plan from %d", root);
    else
      memset(buf, 0, sizeof buf);
    CHECK(epic_comm_bcast(g_comm, buf, sizeof buf, root) == EPIC_OK, "bcast");
    char want[64];
    snprintf(want, sizeof want, "plan from %d", root);
    CHECK(strcmp(buf, want) == 0, "bcast got '%s'", buf);

    int32_t tok[3] = {g_rank, g_rank * 2, -g_rank}, *all = NULL;
    if (g_rank == root) all = calloc((size_t)g_size, sizeof tok);
    CHECK(epic_comm_gather(g_comm, tok, all, sizeof tok, root) == EPIC_OK, "gather");
    if (all) {
      for (int p = 0; p < g_size; p++)
        CHECK(all[3 * p] == p && all[3 * p + 1] == 2 * p && all[3 * p + 2] == -p, "gather %d", p);
      free(all);
    }
  }
  CHECK(epic_comm_bcast(g_comm, NULL, 0, g_size) == EPIC_ERR_INVALID, "bad root accepted");
  agree();
}

static void test_barrier_allreduce(void **state) {
  (void)state;
  begin();
  for (int i = 0; i < 5; i++) CHECK(epic_comm_barrier(g_comm) == EPIC_OK, "barrier %d", i);
  double in[2] = {g_rank + 0.5, -g_rank}, out[2];
  CHECK(epic_comm_allreduce_f64(g_comm, in, out, 2, EPIC_COMM_SUM) == EPIC_OK, "allreduce");
  double s = 0;
  for (int p = 0; p < g_size; p++) s += p + 0.5;
  CHECK(out[0] == s, "sum %f != %f", out[0], s);
  int64_t v = g_rank * 3, m = 0;
  CHECK(epic_comm_allreduce_i64(g_comm, &v, &m, 1, EPIC_COMM_MAX) == EPIC_OK, "max");
  CHECK(m == (int64_t)(g_size - 1) * 3, "max %lld", (long long)m);
  CHECK(epic_comm_allreduce_i64(g_comm, &v, &v, 1, EPIC_COMM_MIN) == EPIC_OK && v == 0, "min");
  agree();
}

/* 64 MiB from rank 0 to rank 1 (to itself with one rank), plus small messages around. */
static void test_large_message(void **state) {
  (void)state;
  begin();
  const size_t big = (size_t)64 << 20;
  int src = 0, dst = g_size > 1 ? 1 : 0;
  size_t *c = calloc(4 * (size_t)g_size, sizeof(size_t));
  size_t *sc = c, *sd = c + g_size, *rc = c + 2 * g_size, *rd = c + 3 * g_size;
  if (g_rank == src) sc[dst] = big;
  if (g_rank == dst) rc[src] = big;
  unsigned char *hs = NULL, *hr = NULL;
  void *ds = NULL, *dr = NULL;
  if (g_rank == src) {
    hs = malloc(big);
    for (size_t i = 0; i < big; i++) hs[i] = (unsigned char)(i * 2654435761u >> 13);
    ds = dbuf_alloc(big);
    to_dev(ds, hs, big);
  }
  if (g_rank == dst) {
    hr = malloc(big);
    dr = dbuf_alloc(big);
  }
  epic_a2a_args a = {.send = ds, .send_counts = sc, .send_displs = sd, .recv = dr,
                     .recv_counts = rc, .recv_displs = rd};
  epic_status st = epic_comm_alltoallv(g_comm, &a);
  CHECK(st == EPIC_OK, "large alltoallv: %s", epic_status_str(st));
  if (g_rank == dst) {
    from_dev(hr, dr, big);
    size_t bad = 0;
    for (size_t i = 0; i < big; i++) bad += hr[i] != (unsigned char)(i * 2654435761u >> 13);
    CHECK(bad == 0, "%zu bad bytes in the 64 MiB message", bad);
  }
  if (ds) dbuf_free(ds);
  if (dr) dbuf_free(dr);
  free(hs);
  free(hr);
  free(c);
  agree();
}

static void test_bad_backend(void **state) {
  (void)state;
  begin();
  epic_comm *c = (epic_comm *)(uintptr_t)1;
  epic_comm_params p = {.size = sizeof p, .backend = "carrier-pigeon"};
  CHECK(epic_comm_create(&p, &c) == EPIC_ERR_INVALID, "unknown backend accepted");
  CHECK(c == NULL, "out not cleared");
  p.size = sizeof p - 1;
  p.backend = "mpi";
  CHECK(epic_comm_create(&p, &c) == EPIC_ERR_INVALID, "bad params size accepted");
  CHECK(epic_comm_create(NULL, &c) == EPIC_ERR_INVALID, "NULL params accepted");
  epic_comm_destroy(NULL);
  agree();
}

/* A second communicator of the same backend alongside the first one. */
static void test_second_comm(void **state) {
  (void)state;
  begin();
  epic_comm *c2 = NULL;
  epic_comm_params p = {.size = sizeof p, .backend = g_backend, .device = -1};
  epic_status st = epic_comm_create(&p, &c2);
  CHECK(st == EPIC_OK, "second create: %s", epic_status_str(st));
  if (c2) {
    int64_t s = g_rank, r = 0;
    CHECK(epic_comm_allreduce_i64(c2, &s, &r, 1, EPIC_COMM_SUM) == EPIC_OK, "allreduce");
    CHECK(r == (int64_t)g_size * (g_size - 1) / 2, "sum");
  }
  epic_comm_destroy(c2);
  agree();
}

int main(int argc, char **argv) {
  if (epic_comm_mpi_init(&argc, &argv, &g_rank, &g_size) != EPIC_OK) return 2;
  epic_log_init(EPIC_LOG_LEVEL_WARN, g_rank);
  const char *env = getenv("EPIC_TEST_COMM_BACKEND");
  if (argc > 1)
    g_backend = argv[1];
  else if (env && *env)
    g_backend = env;
  epic_comm_params p = {.size = sizeof p, .backend = g_backend, .device = -1};
  epic_status st = epic_comm_create(&p, &g_comm);
  if (st != EPIC_OK) {
    fprintf(stderr, "[rank %d] cannot create backend %s: %s\n", g_rank, g_backend,
            epic_status_str(st));
    epic_comm_mpi_finalize();
    /* Compiled in but not usable here (nccl without a GPU): CTest SKIP_RETURN_CODE. */
    return st == EPIC_ERR_UNSUPPORTED ? 77 : 1;
  }
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_identity),          cmocka_unit_test(test_alltoallv_irregular),
      cmocka_unit_test(test_alltoallv_all_zero), cmocka_unit_test(test_alltoallv_bad_args),
      cmocka_unit_test(test_counts_exchange),   cmocka_unit_test(test_async_overlap),
      cmocka_unit_test(test_queue_ordering),
      cmocka_unit_test(test_allgather),         cmocka_unit_test(test_bcast_gather),
      cmocka_unit_test(test_barrier_allreduce), cmocka_unit_test(test_large_message),
      cmocka_unit_test(test_bad_backend),       cmocka_unit_test(test_second_comm),
  };
  char group[64];
  snprintf(group, sizeof group, "comm_%s_rank%d", g_backend, g_rank);
  int failed = cmocka_run_group_tests_name(group, tests, NULL, NULL);
  int any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  epic_comm_destroy(g_comm);
  epic_comm_mpi_finalize();
  return any ? 1 : 0;
}
