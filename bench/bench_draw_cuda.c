/* Sampled tokens on the GPU (ops row_draw after row_pick) against the host path the engine
 * took before it (every sampled row downloaded, then drawn by the C reference on 8 host
 * threads), both timed in the same run on DeepSeek-V3's vocabulary: time per step of B
 * rows, and whether both made the same tokens. Prints one JSON object on stdout.
 * Usage: bench_draw_cuda [--vocab N] [--reps N] [--device N] */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "kernels/draw.h"
#include "kernels/ops.h"

#define CK(x)                                                                                      \
  do {                                                                                             \
    const epic_status st_ = (x);                                                                   \
    if (st_ != EPIC_OK) {                                                                          \
      fprintf(stderr, "bench_draw_cuda: %s failed (%d)\n", #x, (int)st_);                          \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

/* Rows: "wide" (normal logits, sd 3: the nucleus runs deep) or "peaked" (sd 1 and a few
 * clear leaders, as a confident model's rows). */
static void fill(float *l, int64_t n, int peaked, uint64_t *s) {
  for (int64_t i = 0; i < n; i++) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    const double u1 = ((double)(*s >> 11) + 0.5) * 0x1p-53;
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    const double u2 = (double)(*s >> 11) * 0x1p-53;
    const double g = sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2);
    l[i] = (float)(peaked ? g : 3 * g);
  }
  if (peaked)
    for (int j = 0; j < 4; j++)
      l[(int64_t)((*s >> 20) % (uint64_t)n + (uint64_t)j * 997) % n] = 9.0f - (float)j;
}

int main(int argc, char **argv) {
  int64_t V = 129280;
  int reps = 20, device = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--vocab") && i + 1 < argc)
      V = atoll(argv[++i]);
    else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
      reps = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--device") && i + 1 < argc)
      device = atoi(argv[++i]);
    else {
      fprintf(stderr, "usage: %s [--vocab N] [--reps N] [--device N]\n", argv[0]);
      return 2;
    }
  }
  if (V < 1 || reps < 1) {
    fprintf(stderr, "bench_draw_cuda: --vocab and --reps must be positive\n");
    return 2;
  }
  epic_ops *o = NULL;
  if (epic_ops_cuda_create(device, &o) != EPIC_OK) {
    printf("{\"bench\": \"draw_cuda\", \"skipped\": \"no CUDA device\"}\n");
    return 0;
  }
  static const int64_t batches[] = {1, 32, 128, 512};
  static const struct {
    const char *name;
    float t, p;
    int32_t k;
  } settings[] = {{"t0.6_p0.95", 0.6f, 0.95f, 0}, {"t1.0_k50", 1.0f, 1.0f, 50}};
  const int64_t B = 512, threads = 8;
  float *x = malloc((size_t)(B * V) * sizeof *x), *host = malloc((size_t)(B * V) * sizeof *host);
  void *scratch = malloc((size_t)threads * epic_draw_scratch_bytes(V));
  epic_draw_params *p = malloc((size_t)B * sizeof *p);
  int32_t *ids = malloc((size_t)B * 2 * sizeof *ids), *hid = malloc((size_t)B * sizeof *hid);
  void *dx, *dp, *dout;
  if (!x || !host || !scratch || !p || !ids || !hid)
    return 1;
  CK(o->vt->alloc(o, (size_t)(B * V) * sizeof(float), &dx));
  CK(o->vt->alloc(o, (size_t)B * sizeof *p, &dp));
  CK(o->vt->alloc(o, (size_t)B * 8, &dout));
  uint64_t seed = 12345;
  printf("{\n  \"bench\": \"draw_cuda\",\n  \"vocab\": %lld,\n  \"host_threads\": %lld,\n"
         "  \"runs\": [",
         (long long)V, (long long)threads);
  int first = 1;
  for (int peaked = 0; peaked < 2; peaked++) {
    for (int64_t i = 0; i < B; i++)
      fill(x + i * V, V, peaked, &seed);
    CK(o->vt->upload(o, dx, x, (size_t)(B * V) * sizeof(float)));
    for (size_t s = 0; s < sizeof settings / sizeof *settings; s++)
      for (size_t bi = 0; bi < sizeof batches / sizeof *batches; bi++) {
        const int64_t b = batches[bi];
        int32_t *dids = dout;
        float *dlp = (float *)(dids + b);
        double t_pick = 0, t_draw = 0, t_down = 0, t_host = 0;
        int same = 1;
        for (int r = 0; r <= reps; r++) { /* r == 0: warm-up */
          for (int64_t i = 0; i < b; i++)
            p[i] = (epic_draw_params){.temperature = settings[s].t,
                                      .top_p = settings[s].p,
                                      .top_k = settings[s].k,
                                      .u = (seed = seed * 6364136223846793005ull + 1)};
          CK(o->vt->upload(o, dp, p, (size_t)b * sizeof *p));
          double t0 = epic_now_seconds();
          CK(o->vt->row_pick(o, dx, b, V, dids, dlp));
          CK(o->vt->sync(o));
          double t1 = epic_now_seconds();
          CK(o->vt->row_draw(o, dx, b, V, dp, dids, dlp));
          CK(o->vt->download(o, ids, dids, (size_t)b * sizeof *ids));
          double t2 = epic_now_seconds();
          /* the host path: the rows down, then the draws on the host's threads */
          CK(o->vt->download(o, host, dx, (size_t)(b * V) * sizeof(float)));
          double t3 = epic_now_seconds();
#pragma omp parallel for num_threads((int)threads) schedule(dynamic, 1)
          for (int64_t i = 0; i < b; i++)
            hid[i] =
                epic_draw_row(host + i * V, V, &p[i],
                              (char *)scratch + omp_get_thread_num() * epic_draw_scratch_bytes(V));
          double t4 = epic_now_seconds();
          for (int64_t i = 0; i < b; i++)
            same &= hid[i] == ids[i];
          if (r > 0) {
            t_pick += t1 - t0;
            t_draw += t2 - t1;
            t_down += t3 - t2;
            t_host += t4 - t3;
          }
        }
        const double us = 1e6 / reps;
        printf("%s\n    {\"rows\": \"%s\", \"setting\": \"%s\", \"batch\": %lld, "
               "\"pick_us\": %.1f, \"device_draw_us\": %.1f, \"host_download_us\": %.1f, "
               "\"host_draw_us\": %.1f, \"host_over_device\": %.2f, \"same_tokens\": %s}",
               first ? "" : ",", peaked ? "peaked" : "wide", settings[s].name, (long long)b,
               t_pick * us, t_draw * us, t_down * us, t_host * us, (t_down + t_host) / t_draw,
               same ? "true" : "false");
        first = 0;
        fflush(stdout);
      }
  }
  printf("\n  ]\n}\n");
  o->vt->free(o, dx);
  o->vt->free(o, dp);
  o->vt->free(o, dout);
  epic_ops_destroy(o);
  free(x), free(host), free(scratch), free(p), free(ids), free(hid);
  return 0;
}
