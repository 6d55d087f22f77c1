/* bench_a2a: MoE dispatch all-to-all latency and bandwidth per epic_comm backend at
 * DeepSeek-V3 message sizes. Run under mpirun; rank 0 prints one JSON object on stdout.
 *
 *   mpirun -np 4 bench_a2a [--backend mpi|ucx|nccl|auto] [--quick] [--iters N]
 *
 * Each rank holds T tokens (T = 1, 2, 4, ... 4096); every token picks k = 8 of 256
 * experts (seeded pseudo-random, distinct), expert e lives on rank e % nranks, and a
 * token is sent once to every rank that owns at least one of its experts (the self part
 * is a local copy). A row is 7168 values: BF16 = 14336 bytes, FP8 = 7168 bytes + 56 fp32
 * block scales (1 per 128 values) = 7392 bytes. Per size: p50/p99 over iterations of the
 * slowest rank's time, algorithmic bandwidth = bytes a rank sends to other ranks (mean
 * over ranks) / p50, and its ratio to a memcpy bandwidth measured in the same run. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <mpi.h>

#include "common/clock.h"
#include "comm/comm.h"
#include "common/log.h"

#ifdef EPIC_HAVE_NCCL
#include <cuda_runtime.h>
#endif

#define HIDDEN 7168
#define TOPK 8
#define NEXPERTS 256

static void usage(FILE *f) {
  fprintf(f, "usage: mpirun -np N bench_a2a [--backend auto|mpi|ucx|nccl] [--quick] [--iters N]\n"
             "  MoE dispatch all-to-all at DeepSeek-V3 sizes (7168-value rows, BF16 and FP8+scales,\n"
             "  1..4096 tokens per rank, top-8 of 256 experts spread over the ranks).\n"
             "  --quick   tokens per rank 1, 16, 256 only and fewer iterations\n"
             "  --iters   timed iterations per size (default: adaptive, 5..50)\n"
             "Rank 0 prints one JSON object on stdout.\n");
}

static uint64_t rng_next(uint64_t *s) {
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s;
}

static int cmp_d(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static void *buf_alloc(int dev, size_t n) {
#ifdef EPIC_HAVE_NCCL
  if (dev) {
    void *p = NULL;
    return cudaMalloc(&p, n ? n : 1) == cudaSuccess ? p : NULL;
  }
#endif
  (void)dev;
  void *p = malloc(n ? n : 1);
  if (p) memset(p, 1, n); /* touch the pages outside the timed region */
  return p;
}
static void buf_free(int dev, void *p) {
#ifdef EPIC_HAVE_NCCL
  if (dev) {
    cudaFree(p);
    return;
  }
#endif
  (void)dev;
  free(p);
}

/* Host memcpy bandwidth (GB/s, read+write counted once as in "bytes copied / s"). */
static double memcpy_gbps(size_t bytes) {
  char *a = malloc(bytes), *b = malloc(bytes);
  if (!a || !b) {
    free(a);
    free(b);
    return 0;
  }
  memset(a, 3, bytes);
  memset(b, 0, bytes);
  double best = 1e30;
  for (int i = 0; i < 5; i++) {
    double t = epic_now_seconds();
    memcpy(b, a, bytes);
    t = epic_now_seconds() - t;
    if (t < best) best = t;
  }
  volatile char sink = b[bytes / 2];
  (void)sink;
  free(a);
  free(b);
  return (double)bytes / best / 1e9;
}

int main(int argc, char **argv) {
  const char *backend = "auto";
  int quick = 0, iters_opt = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
      usage(stdout);
      return 0;
    } else if (!strcmp(argv[i], "--quick")) {
      quick = 1;
    } else if (!strcmp(argv[i], "--backend") && i + 1 < argc) {
      backend = argv[++i];
    } else if (!strcmp(argv[i], "--iters") && i + 1 < argc) {
      iters_opt = atoi(argv[++i]);
      if (iters_opt < 1) {
        fprintf(stderr, "bench_a2a: --iters wants a positive integer\n");
        return 2;
      }
    } else {
      fprintf(stderr, "bench_a2a: unknown argument '%s'\n", argv[i]);
      usage(stderr);
      return 2;
    }
  }
  int rank = 0, size = 1;
  if (epic_comm_mpi_init(&argc, &argv, &rank, &size) != EPIC_OK) return 1;
  epic_log_init(EPIC_LOG_LEVEL_WARN, rank);
  epic_comm *c = NULL;
  epic_comm_params prm = {.size = sizeof prm, .backend = backend, .device = -1};
  if (epic_comm_create(&prm, &c) != EPIC_OK) {
    epic_comm_mpi_finalize();
    return 1;
  }
  int dev = epic_comm_device_buffers(c);

  static const int all_tokens[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096};
  static const int quick_tokens[] = {1, 16, 256};
  const int *tok = quick ? quick_tokens : all_tokens;
  int ntok = quick ? 3 : (int)(sizeof all_tokens / sizeof all_tokens[0]);
  const struct {
    const char *name;
    size_t row;
  } dtypes[2] = {{"bf16", HIDDEN * 2}, {"fp8", HIDDEN + HIDDEN / 128 * 4}};

  double mbw = 0;
  if (rank == 0) mbw = memcpy_gbps((size_t)256 << 20);
  epic_comm_bcast(c, &mbw, sizeof mbw, 0);

  size_t *cnt = calloc(4 * (size_t)size, sizeof(size_t));
  int64_t *rows_s = calloc(2 * (size_t)size, sizeof(int64_t)), *rows_r = rows_s + size;
  size_t *sc = cnt, *sd = cnt + size, *rc = cnt + 2 * size, *rd = cnt + 3 * size;
  if (rank == 0)
    printf("{\"bench\":\"a2a\",\"backend\":\"%s\",\"nranks\":%d,\"device_buffers\":%d,"
           "\"hidden\":%d,\"top_k\":%d,\"n_experts\":%d,\"memcpy_GBps\":%.2f,\"results\":[",
           epic_comm_backend_name(c), size, dev, HIDDEN, TOPK, NEXPERTS, mbw);
  int first = 1;
  for (int d = 0; d < 2; d++) {
    for (int ti = 0; ti < ntok; ti++) {
      int T = tok[ti];
      /* Routing: rows per destination rank, deduplicated per token. */
      uint64_t seed = 0x9E3779B97F4A7C15ull ^ (uint64_t)(rank * 1000003 + T);
      memset(rows_s, 0, (size_t)size * sizeof(int64_t));
      for (int t = 0; t < T; t++) {
        unsigned char hit[NEXPERTS] = {0};
        char dest[4096] = {0};
        for (int k = 0; k < TOPK;) {
          int e = (int)(rng_next(&seed) % NEXPERTS);
          if (hit[e]) continue;
          hit[e] = 1;
          k++;
          int p = e % size;
          if (p < (int)sizeof dest && !dest[p]) {
            dest[p] = 1;
            rows_s[p]++;
          }
        }
      }
      epic_comm_alltoall_counts(c, rows_s, rows_r);
      size_t sb = 0, rb = 0, remote = 0;
      for (int p = 0; p < size; p++) {
        sc[p] = (size_t)rows_s[p] * dtypes[d].row;
        rc[p] = (size_t)rows_r[p] * dtypes[d].row;
        sd[p] = sb;
        rd[p] = rb;
        sb += sc[p];
        rb += rc[p];
        if (p != rank) remote += sc[p];
      }
      void *sbuf = buf_alloc(dev, sb), *rbuf = buf_alloc(dev, rb);
      int ok = sbuf && rbuf, all_ok = 0;
      MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
      if (!all_ok) {
        if (rank == 0) fprintf(stderr, "bench_a2a: out of memory at %d tokens/rank\n", T);
        buf_free(dev, sbuf);
        buf_free(dev, rbuf);
        continue;
      }
      epic_a2a_args a = {.send = sbuf, .send_counts = sc, .send_displs = sd, .recv = rbuf,
                         .recv_counts = rc, .recv_displs = rd};
      int iters = iters_opt;
      if (!iters) {
        double per = (double)remote / 1e9 + 1e-5; /* ~s at 1 GB/s */
        iters = (int)(quick ? 0.3 / per : 1.0 / per);
        iters = iters < 5 ? 5 : iters > (quick ? 20 : 50) ? (quick ? 20 : 50) : iters;
      }
      double *ts = calloc((size_t)iters, sizeof(double)), *tmax = calloc((size_t)iters, sizeof(double));
      epic_status st = EPIC_OK;
      for (int w = 0; w < 2 && st == EPIC_OK; w++) st = epic_comm_alltoallv(c, &a);
      for (int i = 0; i < iters && st == EPIC_OK; i++) {
        epic_comm_barrier(c);
        double t0 = epic_now_seconds();
        st = epic_comm_alltoallv(c, &a);
        ts[i] = epic_now_seconds() - t0;
      }
      MPI_Allreduce(ts, tmax, iters, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
      double remote_mean = 0, rem = (double)remote;
      MPI_Allreduce(&rem, &remote_mean, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
      remote_mean /= size;
      qsort(tmax, (size_t)iters, sizeof(double), cmp_d);
      double p50 = tmax[iters / 2], p99 = tmax[(int)ceil(0.99 * iters) - 1];
      double bw = p50 > 0 ? remote_mean / p50 / 1e9 : 0;
      if (rank == 0)
        printf("%s\n {\"dtype\":\"%s\",\"row_bytes\":%zu,\"tokens_per_rank\":%d,"
               "\"send_bytes_per_rank\":%.0f,\"iters\":%d,\"status\":\"%s\",\"p50_us\":%.1f,"
               "\"p99_us\":%.1f,\"algbw_GBps\":%.3f,\"ratio_to_memcpy\":%.4f}",
               first ? "" : ",", dtypes[d].name, dtypes[d].row, T, remote_mean, iters,
               epic_status_str(st), p50 * 1e6, p99 * 1e6, bw, mbw > 0 ? bw / mbw : 0);
      first = 0;
      free(ts);
      free(tmax);
      buf_free(dev, sbuf);
      buf_free(dev, rbuf);
    }
  }
  if (rank == 0) printf("\n]}\n");
  fflush(stdout);
  free(cnt);
  free(rows_s);
  epic_comm_destroy(c);
  epic_comm_mpi_finalize();
  return 0;
}
