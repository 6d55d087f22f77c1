/* Sampler: greedy ties, parameter validation, seeded determinism, top-k/top-p
 * truncation, and that sampled frequencies follow softmax(logits / T). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "common/log.h"
#include "worker/sampler.h"

static epic_sampler *mk(float t, float p, int64_t k, uint64_t seed) {
  epic_sampling_params sp = {.size = sizeof sp, .temperature = t, .top_p = p, .top_k = k, .seed = seed};
  epic_sampler *s = NULL;
  assert_int_equal(epic_sampler_create(&sp, &s), EPIC_OK);
  return s;
}

static void test_greedy(void **state) {
  (void)state;
  float l[5] = {0.5f, 2.0f, -1.0f, 2.0f, 1.0f};
  epic_sampler *s = mk(0, 1, 0, 0);
  float lp;
  assert_int_equal(epic_argmax(l, 5), 1); /* tie: lowest id */
  assert_int_equal(epic_sampler_sample(s, l, 5, &lp), 1);
  double z = exp(0.5) + 2 * exp(2.0) + exp(-1.0) + exp(1.0);
  assert_true(fabs(lp - (2.0 - log(z))) < 1e-5);
  epic_sampler_destroy(s);
}

static void test_invalid_params(void **state) {
  (void)state;
  epic_sampler *s;
  epic_sampling_params bad_t = {.size = sizeof bad_t, .temperature = -1, .top_p = 1};
  epic_sampling_params bad_p = {.size = sizeof bad_p, .temperature = 1, .top_p = 0};
  epic_sampling_params bad_k = {.size = sizeof bad_k, .temperature = 1, .top_p = 1, .top_k = -2};
  epic_log_init(EPIC_LOG_LEVEL_ERROR, -1);
  assert_int_equal(epic_sampler_create(&bad_t, &s), EPIC_ERR_INVALID);
  assert_int_equal(epic_sampler_create(&bad_p, &s), EPIC_ERR_INVALID);
  assert_int_equal(epic_sampler_create(&bad_k, &s), EPIC_ERR_INVALID);
}

static void test_seeded_and_truncated(void **state) {
  (void)state;
  enum { V = 50, N = 200 };
  float l[V];
  for (int i = 0; i < V; i++) l[i] = (float)((i * 37) % 11) * 0.3f;
  epic_sampler *a = mk(1.0f, 1, 0, 42), *b = mk(1.0f, 1, 0, 42), *c = mk(1.0f, 1, 0, 43);
  int same_ab = 1, same_ac = 1;
  for (int i = 0; i < N; i++) {
    int32_t x = epic_sampler_sample(a, l, V, NULL), y = epic_sampler_sample(b, l, V, NULL);
    int32_t z = epic_sampler_sample(c, l, V, NULL);
    same_ab &= x == y;
    same_ac &= x == z;
  }
  assert_true(same_ab);
  assert_false(same_ac);
  /* top_k = 3 only ever yields the 3 best ids; tiny top_p only the best. */
  epic_sampler *k3 = mk(2.0f, 1, 3, 1), *p0 = mk(2.0f, 1e-6f, 0, 1);
  int32_t best = epic_argmax(l, V);
  for (int i = 0; i < N; i++) {
    int32_t t = epic_sampler_sample(k3, l, V, NULL);
    int rank = 0;
    for (int j = 0; j < V; j++) rank += l[j] > l[t] || (l[j] == l[t] && j < t);
    assert_true(rank < 3);
    assert_int_equal(epic_sampler_sample(p0, l, V, NULL), best);
  }
  epic_sampler_destroy(a);
  epic_sampler_destroy(b);
  epic_sampler_destroy(c);
  epic_sampler_destroy(k3);
  epic_sampler_destroy(p0);
}

static void test_distribution(void **state) {
  (void)state;
  enum { V = 4, N = 200000 };
  float l[V] = {0.0f, 1.0f, 2.0f, -1.0f};
  const float T = 0.7f;
  int counts[V] = {0};
  double z = 0, p[V];
  epic_sampler *s = mk(T, 1, 0, 7);
  for (int i = 0; i < V; i++) z += exp(l[i] / T);
  for (int i = 0; i < V; i++) p[i] = exp(l[i] / T) / z;
  for (int i = 0; i < N; i++) counts[epic_sampler_sample(s, l, V, NULL)]++;
  for (int i = 0; i < V; i++) {
    double sd = sqrt(N * p[i] * (1 - p[i]));
    /* 6 sigma: a fixed seed makes this deterministic, the bound makes it meaningful */
    assert_true(fabs(counts[i] - N * p[i]) < 6 * sd + 1);
  }
  epic_sampler_destroy(s);
}

/* Candidate order (descending logit, lower id first): the order test_distribution_wide
 * checks frequencies in. */
static const float *g_keys;
static int by_logit(const void *a, const void *b) {
  const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
  if (g_keys[x] != g_keys[y])
    return g_keys[x] > g_keys[y] ? -1 : 1;
  return (x > y) - (x < y);
}

/* Rows of a few shapes: wide and peaked, ties (logits on a 1/4 grid), masked tokens. */
static void fill_row(float *l, int64_t n, int shape, unsigned *seed) {
  for (int64_t i = 0; i < n; i++) {
    const double u = (rand_r(seed) + 1.0) / ((double)RAND_MAX + 2.0);
    const double g = sqrt(-2 * log(u)) * cos(6.283185307179586 * rand_r(seed) / RAND_MAX);
    l[i] = shape == 0 ? (float)(3 * g) : shape == 1 ? (float)(floor(4 * g) / 4) : (float)g;
  }
  if (shape == 2) { /* a peaked row with masked tokens */
    for (int64_t i = 0; i < n; i += 7)
      l[i] = -INFINITY;
    l[n / 3] = 12.0f;
    l[n / 2] = 11.5f;
  }
}

/* The sampler is kernels/draw.h's distribution (tested against its definition in
 * tests/kernels/test_draw.c): its weights are the draw's kept masses, and its tokens are
 * the draws a backend's row_draw makes with the parameters epic_sampler_draw hands out
 * from a sampler of the same seed. */
static void test_same_as_draw(void **state) {
  (void)state;
  enum { V = 5000 };
  static float l[V], w[V];
  static int32_t idx[V], ids[V];
  static uint64_t mass[V];
  void *scratch = malloc(epic_draw_scratch_bytes(V));
  const float temps[] = {0.3f, 1.0f, 2.5f}, tops[] = {1.0f, 0.95f, 0.5f, 1e-6f};
  const int64_t ks[] = {0, 1, 7, 300, V};
  unsigned seed = 11;
  for (int shape = 0; shape < 3; shape++) {
    fill_row(l, V, shape, &seed);
    for (size_t a = 0; a < sizeof temps / sizeof *temps; a++)
      for (size_t b = 0; b < sizeof tops / sizeof *tops; b++)
        for (size_t c = 0; c < sizeof ks / sizeof *ks; c++) {
          epic_sampler *s1 = mk(temps[a], tops[b], ks[c], 40 + c);
          epic_sampler *s2 = mk(temps[a], tops[b], ks[c], 40 + c); /* the same stream */
          const epic_sampling_params p = {
              .size = sizeof p, .temperature = temps[a], .top_p = tops[b], .top_k = ks[c]};
          const epic_draw_params d0 = {
              .temperature = temps[a], .top_p = tops[b], .top_k = (int32_t)ks[c]};
          double sum;
          uint64_t total;
          int shift;
          const int64_t k = epic_sampling_weights(l, V, &p, idx, w, &sum);
          assert_int_equal(k, epic_draw_kept(l, V, &d0, scratch, ids, mass, &total, &shift));
          assert_true(sum == ldexp((double)total, -shift));
          for (int64_t i = 0; i < k; i++) {
            assert_int_equal(idx[i], ids[i]);
            assert_true(w[i] == (float)ldexp((double)mass[i], -shift));
          }
          for (int t = 0; t < 5; t++) {
            epic_draw_params d;
            if (!epic_sampler_draw(s1, &d)) { /* top_k 1: greedy, nothing drawn */
              assert_int_equal(ks[c], 1);
              assert_int_equal(epic_sampler_sample(s2, l, V, NULL), epic_argmax(l, V));
              continue;
            }
            assert_true(d.temperature == temps[a] && d.top_p == tops[b] && d.top_k == ks[c]);
            assert_int_equal(epic_sampler_sample(s2, l, V, NULL), epic_draw_row(l, V, &d, scratch));
          }
          epic_sampler_destroy(s1);
          epic_sampler_destroy(s2);
        }
  }
  free(scratch);
}

/* Draws that reach deep into a flat, wide row at a high temperature follow the
 * distribution over the whole row. */
static void test_distribution_wide(void **state) {
  (void)state;
  enum { V = 1000, N = 20000, TOP = 16 };
  static float l[V];
  static int counts[V];
  unsigned seed = 5;
  const float T = 1.5f;
  double z = 0, mx = -INFINITY;
  fill_row(l, V, 0, &seed);
  for (int i = 0; i < V; i++)
    mx = l[i] > mx ? l[i] : mx;
  for (int i = 0; i < V; i++)
    z += exp((l[i] - mx) / T);
  epic_sampler *s = mk(T, 1, 0, 9);
  for (int i = 0; i < N; i++)
    counts[epic_sampler_sample(s, l, V, NULL)]++;
  /* the TOP most likely ids one by one, and the rest together */
  int32_t order[V];
  for (int i = 0; i < V; i++)
    order[i] = i;
  g_keys = l;
  qsort(order, V, sizeof *order, by_logit);
  double rest_p = 1;
  int rest_n = N;
  for (int j = 0; j < TOP; j++) {
    const double p = exp((l[order[j]] - mx) / T) / z, sd = sqrt(N * p * (1 - p));
    assert_true(fabs(counts[order[j]] - N * p) < 6 * sd + 1);
    rest_p -= p;
    rest_n -= counts[order[j]];
  }
  assert_true(rest_p > 0.3); /* the draws reach deep into the row */
  assert_true(fabs(rest_n - N * rest_p) < 6 * sqrt(N * rest_p * (1 - rest_p)) + 1);
  epic_sampler_destroy(s);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_greedy),
      cmocka_unit_test(test_invalid_params),
      cmocka_unit_test(test_seeded_and_truncated),
      cmocka_unit_test(test_distribution),
      cmocka_unit_test(test_same_as_draw),
      cmocka_unit_test(test_distribution_wide),
  };
  return cmocka_run_group_tests_name("sampler", tests, NULL, NULL);
}
