/* bench_gemm: y = x . W^T through the CPU epic_ops backend (checkpoint-format W:
 * BF16, FP8 e4m3 with 128x128 block scales) against OpenBLAS cblas_sgemm on the
 * same weight pre-dequantised to fp32, with OpenBLAS given the same thread count.
 * DeepSeek-V3 shapes; prints one JSON object on stdout.
 * m == 1 is memory-bound: it also reports weight bytes/s against a measured
 * multi-threaded memcpy bandwidth. Machines with a large last-level cache would
 * keep a weight resident between repetitions, so m == 1 cycles through enough
 * copies of the weight (quantised and fp32 alike) to exceed COLD_BYTES. */
#define _POSIX_C_SOURCE 200809L
#include <cblas.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/clock.h"
#include "kernels/ops.h"

static uint64_t rs = 88172645463325252ull;
static uint64_t rnd(void) {
  rs ^= rs << 13;
  rs ^= rs >> 7;
  rs ^= rs << 17;
  return rs;
}
static float rndf(void) { return (float)((double)(rnd() >> 11) * 0x1p-53 * 2.0 - 1.0); }

typedef struct {
  double best, total;
  int reps;
} timing;

/* Run fn until min_s has passed (at least once, at most max_reps); keep the best. */
#define TIME_IT(res, min_s, max_reps, stmt)                                                        \
  do {                                                                                             \
    (res).best = 1e30;                                                                             \
    (res).total = 0;                                                                               \
    (res).reps = 0;                                                                                \
    while ((res).reps < 1 || ((res).total < (min_s) && (res).reps < (max_reps))) {                 \
      double t0_ = epic_now_seconds();                                                                          \
      stmt;                                                                                        \
      double dt_ = epic_now_seconds() - t0_;                                                                    \
      (res).best = dt_ < (res).best ? dt_ : (res).best;                                            \
      (res).total += dt_;                                                                          \
      (res).reps++;                                                                                \
    }                                                                                              \
  } while (0)

static void par_memcpy(char *b, const char *a, size_t bytes, int threads) {
#pragma omp parallel num_threads(threads)
  {
    const int n = omp_get_num_threads(), id = omp_get_thread_num();
    const size_t chunk = (bytes / (size_t)n + 63) & ~(size_t)63;
    const size_t lo = (size_t)id * chunk, hi = lo + chunk < bytes ? lo + chunk : bytes;
    if (lo < hi) memcpy(b + lo, a + lo, hi - lo);
  }
}

/* Multi-threaded memcpy bandwidth (bytes read per second), best of a few. */
static double memcpy_bw(int threads, size_t bytes) {
  char *a = malloc(bytes), *b = malloc(bytes);
  if (!a || !b) {
    free(a);
    free(b);
    return 0;
  }
  memset(a, 1, bytes);
  memset(b, 2, bytes);
  timing t;
  TIME_IT(t, 0.5, 10, par_memcpy(b, a, bytes, threads));
  free(a);
  free(b);
  return (double)bytes / t.best;
}

#define COLD_BYTES ((size_t)256 << 20)
#define MAX_COPIES 32

/* copies[0] = src plus copies of it carved from pool (COLD_BYTES, allocated once so
 * page faults are paid once) until the set totals >= COLD_BYTES. Returns the count. */
static int make_copies(void *src, size_t bytes, char *pool, void **copies) {
  int n = 1;
  copies[0] = src;
  for (size_t off = 0;
       pool && n < MAX_COPIES && (size_t)n * bytes < COLD_BYTES && off + bytes <= COLD_BYTES;
       off += bytes) {
    memcpy(pool + off, src, bytes);
    copies[n++] = pool + off;
  }
  return n;
}

typedef struct {
  const char *name;
  int64_t rows, cols;
} shape;

static void usage(void) {
  fprintf(stderr,
          "usage: bench_gemm [--threads N] [--quick] [--help]\n"
          "  Times epic_ops (CPU) matmul against OpenBLAS sgemm on the pre-dequantised fp32\n"
          "  weight for DeepSeek-V3 shapes, m in {1,16,128,512}, BF16 and FP8 weights.\n"
          "  --threads N  threads for both (default: OpenMP default)\n"
          "  --quick      fewer shapes and sizes (a few seconds)\n"
          "  Prints one JSON object on stdout.\n");
}

int main(int argc, char **argv) {
  int threads = 0, quick = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
      threads = atoi(argv[++i]);
    } else if (!strcmp(argv[i], "--quick")) {
      quick = 1;
    } else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
      usage();
      return 0;
    } else {
      usage();
      return 2;
    }
  }
  if (threads <= 0) threads = omp_get_max_threads();

  static const shape full_shapes[] = {{"expert_up", 2048, 7168},
                                      {"expert_down", 7168, 2048},
                                      {"q_a_proj", 1536, 7168},
                                      {"lm_head_slice", 16384, 7168}};
  static const shape quick_shapes[] = {{"expert_up", 2048, 7168}, {"expert_down", 7168, 2048}};
  static const int64_t full_ms[] = {1, 16, 128, 512}, quick_ms[] = {1, 128};
  const shape *shapes = quick ? quick_shapes : full_shapes;
  const int n_shapes = quick ? 2 : 4;
  const int64_t *ms = quick ? quick_ms : full_ms;
  const int n_ms = quick ? 2 : 4;
  const double min_s = quick ? 0.05 : 0.1;

  epic_ops *ops = NULL;
  if (epic_ops_cpu_create(threads, &ops) != EPIC_OK) {
    fprintf(stderr, "bench_gemm: cannot create the CPU backend\n");
    return 1;
  }
  const double bw = memcpy_bw(threads, COLD_BYTES);

  int64_t max_m = 0, max_rc = 0, max_cols = 0;
  for (int k = 0; k < n_ms; k++)
    max_m = ms[k] > max_m ? ms[k] : max_m;
  for (int s = 0; s < n_shapes; s++) {
    max_rc = shapes[s].rows * shapes[s].cols > max_rc ? shapes[s].rows * shapes[s].cols : max_rc;
    max_cols = shapes[s].cols > max_cols ? shapes[s].cols : max_cols;
  }
  float *x = malloc((size_t)(max_m * max_cols) * 4), *y = malloc((size_t)(max_m * 16384) * 4);
  float *wf = malloc((size_t)max_rc * 4);
  void *wq = malloc((size_t)max_rc * 2);
  float *scales = malloc((size_t)(max_rc / (128 * 128) + 256) * 4);
  char *qpool = malloc(COLD_BYTES), *fpool = malloc(COLD_BYTES); /* NULL: no cold copies */
  if (!x || !y || !wf || !wq || !scales) {
    fprintf(stderr, "bench_gemm: out of memory\n");
    return 1;
  }
  for (int64_t i = 0; i < max_m * max_cols; i++)
    x[i] = rndf();

  printf("{\"bench\":\"gemm\",\"machine\":{\"threads\":%d,\"omp_max_threads\":%d,"
         "\"openblas\":\"%s\",\"memcpy_GBps\":%.2f,\"notes\":\"memcpy_GBps counts bytes copied "
         "(read+write traffic is twice that); m=1 cycles weight copies totalling >= %d MiB so "
         "weights come from memory; times are the best of the repetitions\"},\"results\":[",
         threads, omp_get_max_threads(), openblas_get_config(), bw * 1e-9, (int)(COLD_BYTES >> 20));
  int first = 1;
  for (int d = 0; d < 2; d++) {
    const epic_dtype dt = d == 0 ? EPIC_DT_BF16 : EPIC_DT_F8E4M3;
    for (int s = 0; s < n_shapes; s++) {
      const int64_t rows = shapes[s].rows, cols = shapes[s].cols, n = rows * cols;
      epic_weight w = {.dtype = dt, .rows = rows, .cols = cols, .data = wq};
      if (dt == EPIC_DT_BF16) {
        uint16_t *p = wq;
        for (int64_t i = 0; i < n; i++)
          p[i] = epic_f32_to_bf16(rndf() * 0.05f);
      } else {
        uint8_t *p = wq;
        for (int64_t i = 0; i < n; i++) {
          uint8_t c = (uint8_t)rnd();
          p[i] = (c & 0x7f) == 0x7f ? 0x3f : c;
        }
        const int64_t nb = ((rows + 127) / 128) * ((cols + 127) / 128);
        for (int64_t i = 0; i < nb; i++)
          scales[i] = 1e-4f * (1.5f + rndf());
        w.scale_inv = scales;
        w.block_rows = 128;
        w.block_cols = 128;
      }
      epic_weight_rows_f32(&w, 0, rows, wf);
      for (int k = 0; k < n_ms; k++) {
        const int64_t m = ms[k];
        const double flops = 2.0 * (double)m * (double)n;
        timing te, tb;
        void *qc[MAX_COPIES], *fc[MAX_COPIES];
        int nq = 1, nf = 1, iq = 0, jf = 0;
        qc[0] = wq;
        fc[0] = wf;
        if (m == 1) {
          nq = make_copies(wq, (size_t)n * epic_dtype_size(dt), qpool, qc);
          nf = make_copies(wf, (size_t)n * 4, fpool, fc);
        }
        /* One untimed call each (scratch growth, OpenBLAS buffers, first touch of y).
         * OpenBLAS's worker threads keep spinning for a while after a threaded call
         * and would steal the cores from the backend's OpenMP threads: let them idle
         * before timing the backend. */
        openblas_set_num_threads(threads);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, (int)rows, (int)cols, 1.0f, x,
                    (int)cols, wf, (int)cols, 0.0f, y, (int)rows);
        openblas_set_num_threads(1); /* what the backend runs under */
        nanosleep(&(struct timespec){.tv_sec = 0, .tv_nsec = 100000000}, NULL);
        ops->vt->matmul(ops, x, cols, m, &w, y, rows);
        TIME_IT(te, min_s, 50, {
          w.data = qc[iq++ % nq];
          ops->vt->matmul(ops, x, cols, m, &w, y, rows);
        });
        openblas_set_num_threads(threads);
        TIME_IT(tb, min_s, 50,
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, (int)rows, (int)cols,
                            1.0f, x, (int)cols, (const float *)fc[jf++ % nf], (int)cols, 0.0f, y,
                            (int)rows));
        w.data = wq;
        const double ge = flops / te.best * 1e-9, gb = flops / tb.best * 1e-9;
        printf(
            "%s{\"shape\":\"%s\",\"dtype\":\"%s\",\"m\":%lld,\"rows\":%lld,\"cols\":%lld,"
            "\"epic_ms\":%.3f,\"blas_f32_ms\":%.3f,\"epic_GFLOPs\":%.2f,\"blas_f32_GFLOPs\":%.2f,"
            "\"ratio_epic_over_blas\":%.3f",
            first ? "" : ",", shapes[s].name, epic_dtype_name(dt), (long long)m, (long long)rows,
            (long long)cols, te.best * 1e3, tb.best * 1e3, ge, gb, ge / gb);
        if (m == 1) {
          const double wbytes = (double)n * (double)epic_dtype_size(dt);
          const double f32bytes = (double)n * 4.0;
          printf(",\"epic_weight_GBps\":%.2f,\"epic_bw_fraction_of_memcpy\":%.3f,"
                 "\"blas_f32_weight_GBps\":%.2f",
                 wbytes / te.best * 1e-9, wbytes / te.best / bw, f32bytes / tb.best * 1e-9);
        }
        printf("}");
        fflush(stdout);
        first = 0;
      }
    }
  }
  printf("]}\n");
  epic_ops_destroy(ops);
  free(x);
  free(y);
  free(wf);
  free(wq);
  free(scales);
  free(qpool);
  free(fpool);
  return 0;
}
