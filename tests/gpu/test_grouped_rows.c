/* Row invariance of the CUDA backend's grouped_matmul and matmul (kernels/cuda/
 * ops_cuda_matmul.c, "Row invariance"), the property expert re-placement (EPLB) and MTP
 * verification need for outputs not to change: the same 128 rows of one expert split
 * into groups in different ways (with empty groups of other ranks' experts between them,
 * and groups alone in their call) must give every row bit for bit the same result
 *  - fast precision, FP8 weight, the default (every group on kern_fp8_wgmma.cu): the
 *    splits below, host- and device-planned, and lone groups (epic_ops_experts_invariant),
 *    and a prefill-sized call (15,104 rows read through grouped_matmul_rows, whose
 *    quantiser takes several column blocks per warp);
 *  - fast precision, FP8 weight, MMA kind with bound 128 (kern_fp8_mma.cu): groups of any
 *    size 1..128 (one group of 128, 1 + 127, 40 single rows + 88, ...; above 64 rows the
 *    kernel's row tiles), each group alone in a call, and also the dense matmul of the
 *    rows 8 and 4 at a time (the dense calls
 *    this weight sends to the kernel: EPIC_CUDA_FP8_MMA_DENSE_MAX_M at most, more than
 *    EPIC_CUDA_FP8_SKINNY_MAX_M), which must equal the grouped results. The splits reach the kernel's
 *    8-token tile counts 1, 2, 4 and 8 and different launch shapes (warps per row
 *    group), and the shape has a column tail (K % 64 = 16, 9 scale blocks: uneven k
 *    runs) and a partial last row group (N % 16 = 8);
 *  - fast precision, FP8 weight, FP32 kind (epic_ops_cuda_set_fp8_small): every group
 *    of at most 16 rows (the fp32 per-row kernel: one grouped launch, or skinny
 *    launches for a lone group);
 *  - exact precision, FP8 and BF16 weights, groups of any size (fixed-shape SGEMMs).
 * Each result is also checked against the CPU backend: relative error 1e-5 on the same
 * activations for the fp32 paths; for the MMA kind 1e-5 against the CPU on the
 * bf16-rounded activations (what the kernel multiplies) and 1e-2 against the raw ones.
 * The FP32 kind's groups of more than 16 rows (cuBLASLt, e4m3 activations) are not
 * row-invariant: their difference is printed, not checked.
 * Exits 77 (CTest skip) without a GPU. EPIC_TEST_SEED=<n> replays a run. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kernels/cuda/ops_cuda.h"
#include "kernels/ops.h"
#include "tests/common/test_rng.h"

enum { ROWS = 128, N = 1000, K = 1040, MAX_GROUPS = 56, MAX_LISTS = 128 };

static epic_ops *g_cpu, *g_gpu;

/* Weight lists handed to grouped_matmul: the backend caches a device table per list
 * address, so every call gets a list of its own that lives as long as the backend. */
static epic_weight g_lists[MAX_LISTS][MAX_GROUPS];
static int g_n_lists;
static epic_weight *new_list(void) {
  assert_true(g_n_lists < MAX_LISTS);
  return g_lists[g_n_lists++];
}

static int setup(void **state) {
  (void)state;
  if (epic_ops_cpu_create(0, &g_cpu) != EPIC_OK || epic_ops_cuda_create(0, &g_gpu) != EPIC_OK)
    return -1;
  printf("# device: %s, %d SMs\n", epic_ops_cuda_device_name(g_gpu), epic_ops_cuda_sm_count(g_gpu));
  return 0;
}
static int teardown(void **state) {
  (void)state;
  epic_ops_destroy(g_gpu);
  epic_ops_destroy(g_cpu);
  return 0;
}

static void *xmalloc(size_t n) {
  void *p = malloc(n ? n : 1);
  assert_non_null(p);
  return p;
}

static void *dup_dev(const void *h, size_t bytes) {
  void *d = NULL;
  assert_int_equal(g_gpu->vt->alloc(g_gpu, bytes, &d), EPIC_OK);
  assert_int_equal(g_gpu->vt->upload(g_gpu, d, h, bytes), EPIC_OK);
  return d;
}

/* A device buffer of `bytes` with all bits set (NaN floats): an unwritten output fails
 * every comparison. */
static float *poisoned_dev(size_t bytes) {
  unsigned char *h = xmalloc(bytes);
  memset(h, 0xff, bytes);
  float *d = dup_dev(h, bytes);
  free(h);
  return d;
}

/* One expert weight [N][K] on host and device. */
typedef struct {
  epic_weight h, d;
  void *data;
  float *scale;
} wpair;

static wpair make_weight(epic_dtype dt) {
  wpair w;
  memset(&w, 0, sizeof w);
  const size_t n = (size_t)N * K;
  w.h.dtype = dt;
  w.h.rows = N;
  w.h.cols = K;
  w.data = xmalloc(n * epic_dtype_size(dt));
  const size_t nb = (size_t)((N + 127) / 128) * (size_t)((K + 127) / 128);
  if (dt == EPIC_DT_F8E4M3) {
    uint8_t *p = w.data;
    for (size_t i = 0; i < n; i++) {
      uint8_t c;
      do
        c = (uint8_t)rng_u64();
      while ((c & 0x7f) == 0x7f); /* no NaN codes */
      p[i] = c;
    }
    w.scale = xmalloc(nb * sizeof(float));
    for (size_t i = 0; i < nb; i++)
      w.scale[i] = (1.5f + rng_f()) * 1e-3f;
    w.h.scale_inv = w.scale;
    w.h.block_rows = w.h.block_cols = 128;
  } else {
    for (size_t i = 0; i < n; i++)
      ((uint16_t *)w.data)[i] = epic_f32_to_bf16(rng_f() * 0.05f);
  }
  w.h.data = w.data;
  w.d = w.h;
  w.d.data = dup_dev(w.data, n * epic_dtype_size(dt));
  if (w.scale)
    w.d.scale_inv = dup_dev(w.scale, nb * sizeof(float));
  return w;
}

static void free_weight(wpair *w) {
  g_gpu->vt->free(g_gpu, (void *)(uintptr_t)w->d.data);
  g_gpu->vt->free(g_gpu, (void *)(uintptr_t)w->d.scale_inv);
  free(w->data);
  free(w->scale);
}

/* The ROWS rows split as sizes[0..n) (0 = an empty group of another rank's expert, with
 * no weight): y [ROWS][N] holds every row's result in row order. Each call gets its
 * own weight list (the backend caches device tables by list). */
static void run_split_as(const wpair *w, const float *dx, const int64_t *sizes, int n, int dev,
                         float *y) {
  int64_t off[MAX_GROUPS + 1] = {0};
  int32_t off32[MAX_GROUPS + 1] = {0};
  epic_weight *list = new_list();
  assert_true(n <= MAX_GROUPS);
  for (int g = 0; g < n; g++) {
    off[g + 1] = off[g] + sizes[g];
    off32[g + 1] = (int32_t)off[g + 1];
    if (sizes[g] > 0)
      list[g] = w->d;
  }
  assert_int_equal(off[n], ROWS);
  int32_t *doff = dup_dev(off32, sizeof off32);
  float *dy = poisoned_dev((size_t)ROWS * N * sizeof(float));
  if (dev) { /* the plan in device memory only, as a decode step's */
    assert_int_equal(g_gpu->vt->grouped_matmul_dev(g_gpu, dx, K, ROWS, ROWS, doff, n, list, 1, dy,
                                                   N),
                     EPIC_OK);
  } else {
    assert_int_equal(g_gpu->vt->grouped_matmul(g_gpu, dx, K, off, doff, n, list, 1, dy, N),
                     EPIC_OK);
  }
  assert_int_equal(g_gpu->vt->download(g_gpu, y, dy, (size_t)ROWS * N * sizeof(float)), EPIC_OK);
  g_gpu->vt->free(g_gpu, dy);
  g_gpu->vt->free(g_gpu, doff);
}
static void run_split(const wpair *w, const float *dx, const int64_t *sizes, int n, float *y) {
  run_split_as(w, dx, sizes, n, 0, y);
}

/* The same groups, each alone in a grouped_matmul call of one group (its rows at the
 * start of x and y of the call), into y [ROWS][N] in row order. */
static void run_lone_groups(const wpair *w, const float *dx, const int64_t *sizes, int n,
                            float *y) {
  int64_t r0 = 0;
  for (int g = 0; g < n; g++) {
    const int64_t rows = sizes[g], off[2] = {0, rows};
    if (rows == 0)
      continue;
    int32_t off32[2] = {0, (int32_t)rows};
    int32_t *doff = dup_dev(off32, sizeof off32);
    float *dy = poisoned_dev((size_t)rows * N * sizeof(float));
    epic_weight *list = new_list();
    list[0] = w->d;
    assert_int_equal(
        g_gpu->vt->grouped_matmul(g_gpu, dx + r0 * K, K, off, doff, 1, list, 1, dy, N), EPIC_OK);
    assert_int_equal(g_gpu->vt->download(g_gpu, y + r0 * N, dy, (size_t)rows * N * sizeof(float)),
                     EPIC_OK);
    g_gpu->vt->free(g_gpu, dy);
    g_gpu->vt->free(g_gpu, doff);
    r0 += rows;
  }
  assert_int_equal(r0, ROWS);
}

/* The dense matmul of the ROWS rows in calls of m rows each (m divides ROWS). */
static void run_dense(const wpair *w, const float *dx, int64_t m, float *y) {
  float *dy = poisoned_dev((size_t)ROWS * N * sizeof(float));
  for (int64_t r0 = 0; r0 < ROWS; r0 += m)
    assert_int_equal(g_gpu->vt->matmul(g_gpu, dx + r0 * K, K, m, &w->d, dy + r0 * N, N), EPIC_OK);
  assert_int_equal(g_gpu->vt->download(g_gpu, y, dy, (size_t)ROWS * N * sizeof(float)), EPIC_OK);
  g_gpu->vt->free(g_gpu, dy);
}

static double rel_err(const float *a, const float *ref, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    if (!isfinite(a[i]))
      return INFINITY;
    num += ((double)a[i] - ref[i]) * ((double)a[i] - ref[i]);
    den += (double)ref[i] * ref[i];
  }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* Every row of got equals the same row of want bit for bit. */
static void same_rows(const char *what, const float *got, const float *want) {
  for (int r = 0; r < ROWS; r++)
    if (memcmp(got + (size_t)r * N, want + (size_t)r * N, N * sizeof(float)))
      fail_msg("%s: row %d differs", what, r);
}

static void check_cpu(const char *what, const float *y, const float *ref, double tol) {
  const double err = rel_err(y, ref, (size_t)ROWS * N);
  printf("#   %s: rel err vs CPU %.3e (limit %.0e)\n", what, err, tol);
  if (!(err <= tol))
    fail_msg("%s: relative error %.3e vs the CPU above %.0e", what, err, tol);
}

/* ROWS x K random activations on host (x) and device (returned). */
static float *random_rows(float *x) {
  for (size_t i = 0; i < (size_t)ROWS * K; i++)
    x[i] = rng_f();
  return dup_dev(x, (size_t)ROWS * K * sizeof(float));
}

/* The CPU's product of the ROWS rows (one group) into ref [ROWS][N]. */
static void cpu_ref(const wpair *w, const float *x, float *ref) {
  const int64_t one[2] = {0, ROWS};
  assert_int_equal(g_cpu->vt->grouped_matmul(g_cpu, x, K, one, NULL, 1, &w->h, 1, ref, N), EPIC_OK);
}

/* Every split's rows equal the first split's bit for bit, and the CPU's to 1e-5. */
static void check_splits(const char *what, const wpair *w, const int64_t (*splits)[MAX_GROUPS],
                         const int *n_groups, int n_splits) {
  float *x = xmalloc((size_t)ROWS * K * sizeof(float)),
        *ref = xmalloc((size_t)ROWS * N * sizeof(float));
  float *first = xmalloc((size_t)ROWS * N * sizeof(float)),
        *y = xmalloc((size_t)ROWS * N * sizeof(float));
  float *dx = random_rows(x);
  cpu_ref(w, x, ref);
  for (int s = 0; s < n_splits; s++) {
    char msg[128];
    run_split(w, dx, splits[s], n_groups[s], s ? y : first);
    snprintf(msg, sizeof msg, "%s, split %d", what, s);
    check_cpu(msg, s ? y : first, ref, 1e-5);
    if (s) {
      snprintf(msg, sizeof msg, "%s: split %d vs split 0", what, s);
      same_rows(msg, y, first);
    }
  }
  g_gpu->vt->free(g_gpu, dx);
  free(x);
  free(ref);
  free(first);
  free(y);
}

/* All 128 rows in one group or in 1 + 127 (two 64-row tiles), or the first 40 rows in
 * groups whose largest has 16, 33, 23, 32, 15, 4 and 1 rows (8-token tiles 2, 8, 4, 4,
 * 2, 1, 1) and the other 88 in one group (two row tiles); 1 to 41 groups with rows
 * (different launch shapes and size classes). The last: 40 single rows with an empty group
 * after every fifth, then 88 (filled by any_splits). */
enum { N_SPLITS = 9 };
static int64_t g_splits[N_SPLITS][MAX_GROUPS] = {
    {128},
    {1, 127},
    {7, 3, 16, 14, 88},
    {0, 7, 0, 33, 88},
    {17, 23, 88},
    {3, 5, 32, 88},
    {3, 0, 13, 1, 0, 15, 8, 88},
    {4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 88},
    {0},
};
static const int g_n_groups[N_SPLITS] = {1, 2, 5, 5, 3, 4, 8, 11, 49};
static void any_splits(void) {
  for (int g = 0; g < 48; g++)
    g_splits[N_SPLITS - 1][g] = g % 6 == 5 ? 0 : 1;
  g_splits[N_SPLITS - 1][48] = ROWS - 40;
}

static void test_fast_mma_any_groups(void **state) {
  (void)state;
  assert_int_equal(epic_ops_cuda_set_precision(g_gpu, EPIC_CUDA_PREC_FAST), EPIC_OK);
  assert_int_equal(epic_ops_cuda_set_fp8_small(g_gpu, EPIC_CUDA_FP8_SMALL_MMA), EPIC_OK);
  /* the kernel's whole range (host-planned groups above the bound take the large-group
   * kernel, with e4m3 activations) */
  assert_int_equal(epic_ops_cuda_set_mma_group_rows(g_gpu, EPIC_CUDA_FP8_MMA_GROUP_MAX_ROWS),
                   EPIC_OK);
  wpair w = make_weight(EPIC_DT_F8E4M3);
  assert_false(epic_ops_experts_invariant(g_gpu, &w.d)); /* groups above 128 rows change */
  any_splits();
  int64_t(*splits)[MAX_GROUPS] = g_splits;
  const int *n_groups = g_n_groups;

  float *x = xmalloc((size_t)ROWS * K * sizeof(float));
  float *xr = xmalloc((size_t)ROWS * K * sizeof(float));
  float *ref = xmalloc((size_t)ROWS * N * sizeof(float));
  float *rref = xmalloc((size_t)ROWS * N * sizeof(float));
  float *first = xmalloc((size_t)ROWS * N * sizeof(float));
  float *y = xmalloc((size_t)ROWS * N * sizeof(float));
  float *dx = random_rows(x);
  for (size_t i = 0; i < (size_t)ROWS * K; i++) /* what the kernel multiplies */
    xr[i] = epic_bf16_to_f32(epic_f32_to_bf16(x[i]));
  cpu_ref(&w, x, ref);
  cpu_ref(&w, xr, rref);

  char msg[128];
  for (int s = 0; s < N_SPLITS; s++) {
    run_split(&w, dx, splits[s], n_groups[s], s ? y : first);
    snprintf(msg, sizeof msg, "fast FP8 mma, split %d, raw activations", s);
    check_cpu(msg, s ? y : first, ref, 1e-2);
    snprintf(msg, sizeof msg, "fast FP8 mma, split %d, bf16-rounded activations", s);
    check_cpu(msg, s ? y : first, rref, 1e-5);
    if (s) {
      snprintf(msg, sizeof msg, "fast FP8 mma: split %d vs split 0", s);
      same_rows(msg, y, first);
    }
  }
  printf("#   fast FP8 mma: %d splits (groups of 1..128 rows) bit-identical\n", N_SPLITS);
  /* Groups alone in their call (the grouped launch of one group). */
  for (int s = 1; s <= 3; s++) {
    run_lone_groups(&w, dx, splits[s], n_groups[s], y);
    snprintf(msg, sizeof msg, "fast FP8 mma: split %d's groups each alone vs split 0", s);
    same_rows(msg, y, first);
  }
  printf("#   fast FP8 mma: lone groups of 1, 127, 7, 3, 16, 14, 88, 7, 33 rows bit-identical\n");
  /* The dense matmul in calls of the largest and the smallest m it sends to the kernel
   * for this (small) weight: the smallest calls on small weights take the fp32 skinny
   * kernel (ops_cuda.h). */
  enum { DM = EPIC_CUDA_FP8_MMA_DENSE_MAX_M, DS = 4 };
  _Static_assert(ROWS % DM == 0 && ROWS % DS == 0 && (int)DS > (int)EPIC_CUDA_FP8_SKINNY_MAX_M,
                 "the dense calls cover the rows on the kernel");
  assert_int_equal(epic_ops_cuda_matmul_path(g_gpu, &w.d, DM, N), EPIC_CUDA_MM_FP8_MMA);
  assert_int_equal(epic_ops_cuda_matmul_path(g_gpu, &w.d, DS, N), EPIC_CUDA_MM_FP8_MMA);
  run_dense(&w, dx, DM, y);
  same_rows("fast FP8 mma: dense matmul m=8 vs grouped", y, first);
  run_dense(&w, dx, DS, y);
  same_rows("fast FP8 mma: dense matmul m=4 vs grouped", y, first);
  printf("#   fast FP8 mma: dense matmuls of m=%d and m=%d equal the grouped op\n", (int)DM,
         (int)DS);

  g_gpu->vt->free(g_gpu, dx);
  free(x);
  free(xr);
  free(ref);
  free(rref);
  free(first);
  free(y);
  free_weight(&w);
  assert_int_equal(epic_ops_cuda_set_mma_group_rows(g_gpu, EPIC_CUDA_FP8_MMA_GROUP_ROWS_DEFAULT),
                   EPIC_OK);
}

/* The default fast path (mma_group_rows 0): every group, host- or device-planned, takes
 * the wgmma kernel. The splits of test_fast_mma_any_groups, those splits' groups each
 * alone, and device-planned calls of the splits all give every row the same bits; 5e-2
 * against the CPU on the raw activations (e4m3 rounding). epic_ops_experts_invariant says
 * so for this weight, not for a BF16 one (cuBLAS per group) or with a bound above 0. */
/* Prefill-sized calls quantise their rows several column blocks per warp (from 2^17
 * blocks, kern_elementwise.cu quant_chunk_for), small ones one block per warp: a row must
 * come out the same. LONG_ROWS rows, row i from row i % ROWS of the ROWS test rows, in
 * four groups of one expert: read through grouped_matmul_rows (the source rows quantised
 * once, each group row's codes copied from its source row) and, gathered first, through
 * grouped_matmul (every row quantised, chunked): every row equals the small call's result
 * for its source row (want, [ROWS][N]). */
enum { LONG_ROWS = 15104 }; /* x 9 column blocks of K: above 2^17 */
static void long_call_rows(const wpair *w, const float *dx, const float *want) {
  const int64_t sizes[4] = {4000, 3500, 4104, 3500};
  int64_t off[5] = {0};
  int32_t off32[5] = {0};
  epic_weight *list = new_list();
  for (int g = 0; g < 4; g++) {
    off[g + 1] = off[g] + sizes[g];
    off32[g + 1] = (int32_t)off[g + 1];
    list[g] = w->d;
  }
  assert_int_equal(off[4], LONG_ROWS);
  int32_t *src = xmalloc(LONG_ROWS * sizeof(int32_t));
  for (int i = 0; i < LONG_ROWS; i++)
    src[i] = i % ROWS;
  int32_t *dsrc = dup_dev(src, LONG_ROWS * sizeof(int32_t));
  int32_t *doff = dup_dev(off32, sizeof off32);
  const size_t ybytes = (size_t)LONG_ROWS * N * sizeof(float);
  float *dy = poisoned_dev(ybytes), *y = xmalloc(ybytes);
  float *dlong = poisoned_dev((size_t)LONG_ROWS * K * sizeof(float));
  assert_int_equal(g_gpu->vt->copy_rows(g_gpu, LONG_ROWS, K, dx, K, dsrc, dlong, K, NULL), EPIC_OK);
  for (int gathered = 0; gathered < 2; gathered++) {
    assert_int_equal(g_gpu->vt->zero(g_gpu, dy, ybytes), EPIC_OK);
    if (gathered)
      assert_int_equal(g_gpu->vt->grouped_matmul(g_gpu, dlong, K, off, doff, 4, list, 1, dy, N),
                       EPIC_OK);
    else
      assert_int_equal(
          g_gpu->vt->grouped_matmul_rows(g_gpu, dx, K, ROWS, dsrc, off, doff, 4, list, 1, dy, N),
          EPIC_OK);
    assert_int_equal(g_gpu->vt->download(g_gpu, y, dy, ybytes), EPIC_OK);
    for (int i = 0; i < LONG_ROWS; i++)
      if (memcmp(y + (size_t)i * N, want + (size_t)(i % ROWS) * N, N * sizeof(float)))
        fail_msg("long call (%s): row %d differs from the small call's row %d",
                 gathered ? "gathered" : "through the map", i, i % ROWS);
  }
  printf("#   fast FP8 default: %d rows in one call (through the map; gathered: chunked "
         "quantiser) equal the small call's\n",
         LONG_ROWS);
  g_gpu->vt->free(g_gpu, dlong);
  g_gpu->vt->free(g_gpu, dy);
  g_gpu->vt->free(g_gpu, doff);
  g_gpu->vt->free(g_gpu, dsrc);
  free(y);
  free(src);
}

static void test_fast_default_any_groups(void **state) {
  (void)state;
  assert_int_equal(epic_ops_cuda_set_precision(g_gpu, EPIC_CUDA_PREC_FAST), EPIC_OK);
  assert_int_equal(epic_ops_cuda_set_fp8_small(g_gpu, EPIC_CUDA_FP8_SMALL_MMA), EPIC_OK);
  assert_int_equal(epic_ops_cuda_mma_group_rows(g_gpu), 0);
  wpair w = make_weight(EPIC_DT_F8E4M3), wb = make_weight(EPIC_DT_BF16);
  assert_true(epic_ops_experts_invariant(g_gpu, &w.d));
  assert_false(epic_ops_experts_invariant(g_gpu, &wb.d));
  any_splits();
  float *x = xmalloc((size_t)ROWS * K * sizeof(float));
  float *ref = xmalloc((size_t)ROWS * N * sizeof(float));
  float *first = xmalloc((size_t)ROWS * N * sizeof(float));
  float *y = xmalloc((size_t)ROWS * N * sizeof(float));
  float *dx = random_rows(x);
  cpu_ref(&w, x, ref);
  char msg[128];
  const int64_t launches = epic_ops_cuda_wgmma_launches(g_gpu);
  for (int s = 0; s < N_SPLITS; s++) {
    for (int dev = 0; dev < 2; dev++) {
      float *out = s || dev ? y : first;
      run_split_as(&w, dx, g_splits[s], g_n_groups[s], dev, out);
      snprintf(msg, sizeof msg, "fast FP8 default, split %d%s", s, dev ? ", device-planned" : "");
      check_cpu(msg, out, ref, 5e-2);
      if (out == y) {
        snprintf(msg, sizeof msg, "fast FP8 default: split %d%s vs split 0", s,
                 dev ? " (device-planned)" : "");
        same_rows(msg, y, first);
      }
    }
  }
  assert_int_equal(epic_ops_cuda_wgmma_launches(g_gpu) - launches, 2 * N_SPLITS);
  for (int s = 1; s <= 3; s++) {
    run_lone_groups(&w, dx, g_splits[s], g_n_groups[s], y);
    snprintf(msg, sizeof msg, "fast FP8 default: split %d's groups each alone vs split 0", s);
    same_rows(msg, y, first);
  }
  printf("#   fast FP8 default: %d splits (groups of 1..128 rows), host- and device-planned, and "
         "lone groups bit-identical\n",
         N_SPLITS);
  long_call_rows(&w, dx, first);
  assert_int_equal(epic_ops_cuda_set_mma_group_rows(g_gpu, 16), EPIC_OK);
  assert_false(epic_ops_experts_invariant(g_gpu, &w.d));
  assert_int_equal(epic_ops_cuda_set_precision(g_gpu, EPIC_CUDA_PREC_EXACT), EPIC_OK);
  assert_true(epic_ops_experts_invariant(g_gpu, &wb.d));
  assert_int_equal(epic_ops_cuda_set_precision(g_gpu, EPIC_CUDA_PREC_FAST), EPIC_OK);
  assert_int_equal(epic_ops_cuda_set_mma_group_rows(g_gpu, EPIC_CUDA_FP8_MMA_GROUP_ROWS_DEFAULT),
                   EPIC_OK);
  g_gpu->vt->free(g_gpu, dx);
  free(x);
  free(ref);
  free(first);
  free(y);
  free_weight(&w);
  free_weight(&wb);
}

static void test_fast_fp32_small_groups(void **state) {
  (void)state;
  assert_int_equal(epic_ops_cuda_set_precision(g_gpu, EPIC_CUDA_PREC_FAST), EPIC_OK);
  assert_int_equal(epic_ops_cuda_set_fp8_small(g_gpu, EPIC_CUDA_FP8_SMALL_FP32), EPIC_OK);
  wpair w = make_weight(EPIC_DT_F8E4M3);
  /* Groups of at most 16 rows, several per call: one grouped launch each (the last 88
   * rows in eight groups of 11). */
#define ELEVENS 11, 11, 11, 11, 11, 11, 11, 11
  const int64_t splits[][MAX_GROUPS] = {
      {16, 16, 8, ELEVENS},
      {3, 0, 13, 1, 0, 15, 8, ELEVENS},
      {1, 2, 3, 4, 5, 6, 7, 8, 4, ELEVENS},
      {0, 10, 10, 10, 10, 0, ELEVENS},
  };
  const int n_groups[] = {11, 15, 17, 14};
  check_splits("fast FP8 fp32 kind, groups <= 16 rows", &w, splits, n_groups, 4);
  /* Lone groups: rows [0, 7) alone, then [7, 10) alone, ... against a grouped call. */
  {
    float *x = xmalloc((size_t)ROWS * K * sizeof(float)),
          *a = xmalloc((size_t)ROWS * N * sizeof(float));
    float *b = xmalloc((size_t)ROWS * N * sizeof(float));
    float *dx = random_rows(x);
    const int64_t grouped[MAX_GROUPS] = {7, 3, 16, 14, ELEVENS};
    run_split(&w, dx, grouped, 12, a);
    /* The same groups each alone in a call (skinny launches of at most 4 rows). */
    run_lone_groups(&w, dx, grouped, 12, b);
    same_rows("fast FP8 fp32 kind: lone groups vs the grouped launch", b, a);
    printf("#   fast FP8 fp32 kind: lone groups of 7, 3, 16, 14 and 11 rows equal the grouped "
           "launch bit for bit\n");
    /* Not claimed: a group of more than 16 rows (cuBLASLt, e4m3 activations). */
    const int64_t big[MAX_GROUPS] = {ROWS};
    run_split(&w, dx, big, 1, b);
    printf("#   fast FP8 fp32 kind: one group of 128 rows vs groups <= 16: rel diff %.3e "
           "(not row-invariant)\n",
           rel_err(b, a, (size_t)ROWS * N));
    g_gpu->vt->free(g_gpu, dx);
    free(x);
    free(a);
    free(b);
  }
  free_weight(&w);
  assert_int_equal(epic_ops_cuda_set_fp8_small(g_gpu, EPIC_CUDA_FP8_SMALL_MMA), EPIC_OK);
#undef ELEVENS
}

static void test_exact_any_groups(void **state) {
  (void)state;
  assert_int_equal(epic_ops_cuda_set_precision(g_gpu, EPIC_CUDA_PREC_EXACT), EPIC_OK);
  const int64_t splits[][MAX_GROUPS] = {
      {128}, {16, 16, 8, 88}, {1, 127}, {0, 7, 0, 33, 88}, {17, 23, 88}, {3, 5, 32, 88},
  };
  const int n_groups[] = {1, 4, 2, 5, 3, 4};
  const epic_dtype dts[2] = {EPIC_DT_F8E4M3, EPIC_DT_BF16};
  for (int i = 0; i < 2; i++) {
    wpair w = make_weight(dts[i]);
    check_splits(i ? "exact BF16, any groups" : "exact FP8, any groups", &w, splits, n_groups, 6);
    free_weight(&w);
  }
  assert_int_equal(epic_ops_cuda_set_precision(g_gpu, EPIC_CUDA_PREC_FAST), EPIC_OK);
}

int main(void) {
  if (epic_cuda_device_count() <= 0) {
    printf("SKIP: no CUDA device\n");
    return 77;
  }
  rng_seed_from_env();
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_fast_mma_any_groups),
      cmocka_unit_test(test_fast_default_any_groups),
      cmocka_unit_test(test_fast_fp32_small_groups),
      cmocka_unit_test(test_exact_any_groups),
  };
  return cmocka_run_group_tests_name("grouped_rows_cuda", tests, setup, teardown);
}
