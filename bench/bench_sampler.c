/* Host sampling cost per draw on a vocabulary-wide logits row (default DeepSeek-V3's
 * 129,280 ids), against the whole-row sort the sampler used before (the baseline, timed
 * in the same run): temperature / top-p / top-k settings of common serving defaults on
 * two row shapes. Prints one JSON object on stdout.
 * Usage: bench_sampler [--vocab N] [--draws N] */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "worker/sampler.h"

/* Row shapes: "wide" (normal logits, sd 3: a flat tail, the nucleus runs deep) and
 * "peaked" (sd 1 with a few clear leaders, as a confident model's rows). */
static void fill(float *l, int64_t n, int peaked, unsigned *seed) {
  for (int64_t i = 0; i < n; i++) {
    const double u = (rand_r(seed) + 1.0) / ((double)RAND_MAX + 2.0);
    const double g = sqrt(-2 * log(u)) * cos(6.283185307179586 * rand_r(seed) / RAND_MAX);
    l[i] = (float)(peaked ? g : 3 * g);
  }
  if (peaked)
    for (int j = 0; j < 4; j++)
      l[(int64_t)rand_r(seed) % n] = 9.0f - (float)j;
}

/* The baseline: sort the whole row, then the same cuts and inverse CDF. */
static const float *g_keys;
static int desc(const void *a, const void *b) {
  const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
  if (g_keys[x] != g_keys[y])
    return g_keys[x] > g_keys[y] ? -1 : 1;
  return (x > y) - (x < y);
}
static int32_t sort_draw(const float *l, int64_t n, const epic_sampling_params *p, double u,
                         int32_t *idx, float *w) {
  int64_t k = p->top_k > 0 && p->top_k < n ? p->top_k : n;
  double total = 0, acc = 0;
  for (int64_t i = 0; i < n; i++)
    idx[i] = (int32_t)i;
  g_keys = l;
  qsort(idx, (size_t)n, sizeof *idx, desc);
  for (int64_t i = 0; i < k; i++)
    total += w[i] = (float)exp((l[idx[i]] - l[idx[0]]) / p->temperature);
  if (p->top_p < 1.0f) {
    double mass = 0;
    int64_t keep = 0;
    while (keep < k && (keep == 0 || mass < p->top_p * total))
      mass += w[keep++];
    k = keep;
    total = mass;
  }
  for (int64_t i = 0; i < k; i++)
    if (u * total < (acc += w[i]))
      return idx[i];
  return idx[k - 1];
}

int main(int argc, char **argv) {
  int64_t vocab = 129280, draws = 20;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
      printf("usage: bench_sampler [--vocab N] [--draws N]\n"
             "Host sampling ms per draw (with the token's logprob) against a whole-row sort\n"
             "in the same run; one JSON object on stdout.\n");
      return 0;
    }
    if (i + 1 < argc && !strcmp(argv[i], "--vocab"))
      vocab = atoll(argv[++i]);
    else if (i + 1 < argc && !strcmp(argv[i], "--draws"))
      draws = atoll(argv[++i]);
    else {
      fprintf(stderr, "bench_sampler: unknown or incomplete option '%s' (see --help)\n", argv[i]);
      return 2;
    }
  }
  if (vocab < 2 || draws < 1) {
    fprintf(stderr, "bench_sampler: --vocab must be >= 2 and --draws >= 1\n");
    return 2;
  }
  const struct {
    float t, p;
    int64_t k;
  } cfg[] = {{0.6f, 0.95f, 0}, {1.0f, 1.0f, 0}, {0.7f, 0.9f, 50}, {1.0f, 1.0f, 40}};
  const int n_cfg = (int)(sizeof cfg / sizeof *cfg);
  float *l = malloc((size_t)vocab * sizeof *l), *w = malloc((size_t)vocab * sizeof *w);
  int32_t *idx = malloc((size_t)vocab * sizeof *idx);
  if (!l || !w || !idx) {
    fprintf(stderr, "bench_sampler: out of memory\n");
    return 1;
  }
  unsigned seed = 3;
  printf("{\"bench\": \"sampler\", \"vocab\": %lld, \"draws\": %lld, \"runs\": [", (long long)vocab,
         (long long)draws);
  for (int shape = 0; shape < 2; shape++) {
    fill(l, vocab, shape, &seed);
    for (int c = 0; c < n_cfg; c++) {
      const epic_sampling_params p = {.size = sizeof p,
                                      .temperature = cfg[c].t,
                                      .top_p = cfg[c].p,
                                      .top_k = cfg[c].k,
                                      .seed = 1};
      epic_sampler *s = NULL;
      if (epic_sampler_create(&p, &s) != EPIC_OK)
        return 1;
      int64_t check = 0;
      float lp = 0;
      double t0 = epic_now_seconds();
      for (int64_t d = 0; d < draws; d++)
        check += epic_sampler_sample(s, l, vocab, &lp);
      const double ms = (epic_now_seconds() - t0) * 1e3 / (double)draws;
      t0 = epic_now_seconds();
      for (int64_t d = 0; d < draws; d++) {
        check += sort_draw(l, vocab, &p, (double)d / (double)draws, idx, w);
        lp = (float)epic_logprob_at(l, vocab, (int32_t)(check % vocab));
      }
      const double base = (epic_now_seconds() - t0) * 1e3 / (double)draws;
      printf("%s{\"shape\": \"%s\", \"temperature\": %g, \"top_p\": %g, \"top_k\": %lld, "
             "\"ms_per_draw\": %.4f, \"sort_baseline_ms\": %.4f, \"speedup\": %.2f, "
             "\"check\": %lld}",
             shape || c ? ", " : "", shape ? "peaked" : "wide", (double)p.temperature,
             (double)p.top_p, (long long)p.top_k, ms, base, base / ms,
             (long long)(check + (lp < 0)));
      epic_sampler_destroy(s);
    }
  }
  printf("]}\n");
  free(l);
  free(w);
  free(idx);
  return 0;
}
