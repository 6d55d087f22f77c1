/* The seeded draw (kernels/draw.h) against its definition computed the slow way: the
 * whole row sorted into candidate order, masses summed one by one. Also its arithmetic
 * (the exponential, the 64-bit scaling) and the CPU backend's row_draw. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kernels/draw.h"
#include "kernels/draw_impl.h"
#include "kernels/ops.h"
#include "tests/common/test_rng.h"

/* Uniform in [0, 1). */
static double unit(void) {
  return (double)(rng_u64() >> 11) * 0x1p-53;
}

/* Rows of a few shapes: wide, ties (logits on a 1/4 grid), peaked with masked tokens, and
 * flat with a few NaN. */
static void fill_row(float *l, int64_t n, int shape) {
  for (int64_t i = 0; i < n; i++) {
    const double g = sqrt(-2 * log(1 - unit())) * cos(6.283185307179586 * unit());
    l[i] = shape == 0 ? (float)(3 * g) : shape == 1 ? (float)(floor(4 * g) / 4) : (float)g;
  }
  if (shape == 2) {
    for (int64_t i = 0; i < n; i += 7)
      l[i] = -INFINITY;
    l[n / 3] = 12.0f;
    l[n / 2] = 11.5f;
  }
  if (shape == 3)
    for (int64_t i = 5; i < n; i += 97)
      l[i] = NAN;
}

/* The definition: candidates sorted by key, descending, lower id first. */
static const float *g_row;
static int by_candidate(const void *a, const void *b) {
  const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
  const uint32_t kx = epic_draw_key(g_row[x]), ky = epic_draw_key(g_row[y]);
  if (kx != ky)
    return kx > ky ? -1 : 1;
  return (x > y) - (x < y);
}

/* Sorted candidates in ord[], their masses in q[] (by position); returns how many are kept
 * and their mass in *kept. */
static int64_t oracle_kept(const float *l, int64_t n, const epic_draw_params *p, int32_t *ord,
                           uint64_t *q, uint64_t *kept) {
  const int shift = epic_draw_shift(n);
  for (int64_t i = 0; i < n; i++)
    ord[i] = (int32_t)i;
  g_row = l;
  qsort(ord, (size_t)n, sizeof *ord, by_candidate);
  const float mx = l[ord[0]];
  int64_t k = p->top_k > 0 && p->top_k < n ? p->top_k : n;
  uint64_t mk = 0;
  for (int64_t i = 0; i < n; i++)
    q[i] = epic_draw_mass(l[ord[i]], mx, epic_draw_inv_t(p->temperature), shift);
  for (int64_t i = 0; i < k; i++)
    mk += q[i];
  if (p->top_p < 1.0f) {
    const uint64_t want = epic_draw_top_p_mass(p->top_p, mk);
    uint64_t m = 0;
    int64_t c = 0;
    while (c < k && (c == 0 || m < want))
      m += q[c++];
    k = c;
    mk = m;
  }
  *kept = mk;
  return k;
}

enum { V = 3000 };

/* Every (shape, temperature, top_p, top_k) and many random values: the same token and the
 * same kept set as the definition. */
static void test_matches_definition(void **state) {
  (void)state;
  static float l[V];
  static int32_t ord[V], ids[V];
  static uint64_t q[V], mass[V];
  void *scratch = malloc(epic_draw_scratch_bytes(V));
  const float temps[] = {0.05f, 0.6f, 1.0f, 2.5f}, tops[] = {1.0f, 0.95f, 0.5f, 1e-6f};
  const int32_t ks[] = {0, 1, 7, 300, V};
  for (int shape = 0; shape < 4; shape++) {
    fill_row(l, V, shape);
    for (size_t a = 0; a < sizeof temps / sizeof *temps; a++)
      for (size_t b = 0; b < sizeof tops / sizeof *tops; b++)
        for (size_t c = 0; c < sizeof ks / sizeof *ks; c++) {
          epic_draw_params p = {.temperature = temps[a], .top_p = tops[b], .top_k = ks[c]};
          uint64_t kept, total;
          int shift;
          const int64_t k = oracle_kept(l, V, &p, ord, q, &kept);
          /* kept set: the sorted run's ids, ascending */
          const int64_t got = epic_draw_kept(l, V, &p, scratch, ids, mass, &total, &shift);
          assert_int_equal(got, k);
          assert_true(total == kept);
          assert_int_equal(shift, epic_draw_shift(V));
          static uint64_t by_id[V];
          static unsigned char in[V];
          memset(in, 0, sizeof in);
          for (int64_t i = 0; i < k; i++) {
            in[ord[i]] = 1;
            by_id[ord[i]] = q[i];
          }
          for (int64_t i = 0; i < got; i++) {
            assert_true(in[ids[i]]);
            assert_true(mass[i] == by_id[ids[i]]);
            assert_true(i == 0 || ids[i] > ids[i - 1]);
          }
          /* draws: the first candidate whose running mass exceeds floor(u * kept / 2^64),
           * with u at the extremes too */
          for (int d = 0; d < 40; d++) {
            p.u = d == 0 ? 0 : d == 1 ? UINT64_MAX : rng_u64();
            const uint64_t x = epic_draw_scale(p.u, kept);
            uint64_t run = 0;
            int64_t j = 0;
            while ((run += q[j]) <= x)
              j++;
            assert_true(j < k);
            assert_int_equal(epic_draw_row(l, V, &p, scratch), ord[j]);
          }
        }
  }
  free(scratch);
}

/* Rows without a finite largest logit give their greedy pick; one-id rows their id. */
static void test_degenerate_rows(void **state) {
  (void)state;
  float l[5] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
  uint64_t scratch[16];
  epic_draw_params p = {.temperature = 1.0f, .top_p = 0.9f, .u = 123456789};
  assert_int_equal(epic_draw_row(l, 5, &p, scratch), 0);
  l[3] = INFINITY;
  assert_int_equal(epic_draw_row(l, 5, &p, scratch), 3);
  l[3] = 2.0f;
  l[1] = 2.0f; /* two equal largest: the draw may take either, never a masked id */
  for (int d = 0; d < 50; d++) {
    p.u = rng_u64();
    const int32_t t = epic_draw_row(l, 5, &p, scratch);
    assert_true(t == 1 || t == 3);
  }
  p.top_k = 1; /* the first candidate: the lower id of the tie */
  assert_int_equal(epic_draw_row(l, 5, &p, scratch), 1);
  assert_int_equal(epic_draw_row(l + 3, 1, &p, scratch), 0);
  /* top_p reached exactly: ten equal masses, half of them asked for, half kept (the first
   * five ids), and draws only among them */
  float flat[10] = {0};
  int32_t ids[10];
  uint64_t mass[10], total;
  int shift;
  p = (epic_draw_params){.temperature = 1.0f, .top_p = 0.5f};
  uint64_t big[40];
  assert_int_equal(epic_draw_kept(flat, 10, &p, big, ids, mass, &total, &shift), 5);
  assert_int_equal(ids[4], 4);
  assert_true(total == 5 * mass[0]);
  for (int d = 0; d < 50; d++) {
    p.u = rng_u64();
    assert_true(epic_draw_row(flat, 10, &p, big) < 5);
  }
}

/* The spelled-out exponential stays within 2 ulp of exp over the range that has masses. */
static void test_exp_accuracy(void **state) {
  (void)state;
  for (int i = 0; i <= 200000; i++) {
    const float x = (float)(-80.0 * i / 200000);
    const double want = exp((double)x), got = epic_draw_exp(x);
    const double ulp = ldexp(1.0, ilogb(want) - 23);
    assert_true(fabs(got - want) <= 2 * ulp);
  }
  assert_true(epic_draw_exp(0.0f) == 1.0f);
  assert_true(epic_draw_exp(-81.0f) == 0.0f);
  assert_true(epic_draw_exp(NAN) == 0.0f);
}

/* floor(u * m / 2^64) against 128-bit arithmetic. */
static void test_scale(void **state) {
  (void)state;
  for (int i = 0; i < 100000; i++) {
    const uint64_t u = rng_u64(), m = rng_u64() >> (i % 64);
    const unsigned __int128 want = ((unsigned __int128)u * m) >> 64;
    assert_true(epic_draw_scale(u, m) == (uint64_t)want);
  }
  assert_true(epic_draw_scale(UINT64_MAX, UINT64_MAX) == UINT64_MAX - 1);
}

/* row_draw on the CPU backend: drawn rows get epic_draw_row's token and the log-softmax
 * there from the pick's normaliser; rows with temperature 0 keep their pick. */
static void test_cpu_row_draw(void **state) {
  (void)state;
  enum { M = 6, N = 2000 };
  static float x[M * N];
  int32_t ids[M];
  float lp[M];
  epic_draw_params p[M];
  void *scratch = malloc(epic_draw_scratch_bytes(N));
  epic_ops *o = NULL;
  assert_int_equal(epic_ops_cpu_create(3, &o), EPIC_OK);
  assert_true(epic_ops_has_row_draw(o));
  for (int r = 0; r < M; r++) {
    fill_row(x + r * N, N, r % 3); /* no NaN: the pick's normaliser would be NaN */
    p[r] = (epic_draw_params){.temperature = r == 2 ? 0.0f : 0.3f * (float)(r + 1),
                              .top_p = r == 4 ? 0.8f : 1.0f,
                              .top_k = r == 5 ? 40 : 0,
                              .u = rng_u64()};
  }
  assert_int_equal(o->vt->row_pick(o, x, M, N, ids, lp), EPIC_OK);
  int32_t pick[M];
  float pick_lp[M];
  memcpy(pick, ids, sizeof pick);
  memcpy(pick_lp, lp, sizeof pick_lp);
  assert_int_equal(o->vt->row_draw(o, x, M, N, p, ids, lp), EPIC_OK);
  int moved = 0;
  for (int r = 0; r < M; r++) {
    const float *xr = x + r * N;
    if (r == 2) {
      assert_int_equal(ids[r], pick[r]);
      assert_true(lp[r] == pick_lp[r]);
      continue;
    }
    assert_int_equal(ids[r], epic_draw_row(xr, N, &p[r], scratch));
    double mx = -INFINITY, s = 0;
    for (int j = 0; j < N; j++)
      mx = xr[j] > mx ? xr[j] : mx;
    for (int j = 0; j < N; j++)
      s += xr[j] == xr[j] ? exp((double)xr[j] - mx) : 0;
    assert_true(fabs(lp[r] - ((double)xr[ids[r]] - mx - log(s))) < 1e-4);
    moved += ids[r] != pick[r];
  }
  assert_true(moved > 0);
  epic_ops_destroy(o);
  free(scratch);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_matches_definition), cmocka_unit_test(test_degenerate_rows),
      cmocka_unit_test(test_exp_accuracy),       cmocka_unit_test(test_scale),
      cmocka_unit_test(test_cpu_row_draw),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
