/* Expert placement with redundant copies (EPLB) in the model, single process and
 * under mpirun:
 * - the CPU matmul is row-independent in calls of up to 8 rows (the chunks the
 *   model runs expert groups in): a row's result is bitwise the same whatever
 *   other rows share the call, so an expert copy that sees a subset of an expert's
 *   rows gives the same result as one that sees them all;
 * - epic_model_set_placement rejects malformed tables (naming the row/expert);
 * - rebalancing between forwards while sequences are running: a model whose
 *   placement changes every few steps (experts copied, moved, given up) gives
 *   bitwise the same logits as one that keeps the plain placement, with one and
 *   two micro-batches, and the MTP layer too; with argv[1] = "device" also through the
 *   GPU backends' host-side paths (tests/common/dev_ops.h: new expert lists installed
 *   between steps, the old ones retired).
 * A failed comparison is recorded, not asserted on the spot, so that every rank
 * still runs the same collectives; the verdict is agreed at the end. */
#define _GNU_SOURCE
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "comm/comm.h"
#include "common/log.h"
#include "tests/common/dev_ops.h"
#include "tests/common/test_util.h"
#include "tests/worker/twin_workload.h"
#include "worker/model.h"
#include "worker/sampler.h"

#define CHUNK TWIN_CHUNK
#define MAX_SEQS TWIN_MAX_SEQS

static epic_comm *g_comm;
static int g_rank, g_size;
static int g_device; /* argv[1] "device": the models on the CPU posing as a device backend */

/* ---- row independence of the CPU matmul ---- */

/* Calls of up to EPIC_OPS_CPU_FIXED_ORDER_ROWS rows (kernels/ops.h), the size the
 * model splits expert groups into on host-memory backends. */
#define EPIC_EP_ROW_CHUNK EPIC_OPS_CPU_FIXED_ORDER_ROWS
static void check_rows(epic_ops *o, const epic_weight *w, const char *what) {
  const int64_t K = w->cols, N = w->rows, ms[] = {1, 2, 3, 4, 5, 6, 7, EPIC_EP_ROW_CHUNK};
  const int64_t MAXM = 64;
  float *x = malloc((size_t)(MAXM * K) * sizeof(float));
  float *y = malloc((size_t)(MAXM * N) * sizeof(float));
  float *y1 = malloc((size_t)(MAXM * N) * sizeof(float));
  assert_non_null(x);
  assert_non_null(y);
  assert_non_null(y1);
  for (int64_t i = 0; i < MAXM * K; i++)
    x[i] = (float)((double)(twin_mix((uint64_t)i) % 20001) / 10000.0 - 1.0);
  /* Reference: each row alone. */
  for (int64_t r = 0; r < MAXM; r++)
    assert_int_equal(o->vt->matmul(o, x + r * K, K, 1, w, y1 + r * N, N), EPIC_OK);
  for (size_t k = 0; k < sizeof ms / sizeof ms[0]; k++) {
    const int64_t m = ms[k];
    for (int64_t r0 = 0; r0 + m <= MAXM; r0 += 13) {
      assert_int_equal(o->vt->matmul(o, x + r0 * K, K, m, w, y, N), EPIC_OK);
      if (memcmp(y, y1 + r0 * N, (size_t)(m * N) * sizeof(float)) != 0)
        fail_msg("%s: rows %lld..%lld computed together differ from the same rows alone (m %lld)",
                 what, (long long)r0, (long long)(r0 + m - 1), (long long)m);
    }
  }
  free(x);
  free(y);
  free(y1);
}

static void test_matmul_row_independent(void **state) {
  (void)state;
  epic_ops *o;
  const int64_t N = 64, K = 256; /* an expert's gate/up of the tiny fixtures */
  assert_int_equal(epic_ops_cpu_create(2, &o), EPIC_OK);
  float *wf = malloc((size_t)(N * K) * sizeof(float));
  uint16_t *wb = malloc((size_t)(N * K) * sizeof(uint16_t));
  uint8_t *w8 = malloc((size_t)(N * K));
  float sc[1 * 2] = {0.5f, 0.25f};
  for (int64_t i = 0; i < N * K; i++) {
    wf[i] = (float)((double)(twin_mix((uint64_t)i + 7) % 2001) / 1000.0 - 1.0);
    uint32_t u;
    memcpy(&u, &wf[i], 4);
    wb[i] = (uint16_t)(u >> 16);
    w8[i] = (uint8_t)((twin_mix((uint64_t)i + 99) & 0x80u) | ((4u + (twin_mix((uint64_t)i) & 3u)) << 3) |
                      (twin_mix((uint64_t)i + 5) & 7u));
  }
  epic_weight f32 = {.dtype = EPIC_DT_F32, .rows = N, .cols = K, .data = wf};
  epic_weight bf16 = {.dtype = EPIC_DT_BF16, .rows = N, .cols = K, .data = wb};
  epic_weight fp8 = {.dtype = EPIC_DT_F8E4M3, .rows = N, .cols = K, .data = w8, .scale_inv = sc,
                     .block_rows = 128, .block_cols = 128};
  epic_weight down = {.dtype = EPIC_DT_BF16, .rows = K, .cols = N, .data = wb}; /* [256 x 64] */
  check_rows(o, &f32, "f32");
  check_rows(o, &bf16, "bf16");
  check_rows(o, &fp8, "fp8");
  check_rows(o, &down, "bf16 down");
  free(wf);
  free(wb);
  free(w8);
  epic_ops_destroy(o);
}

/* ---- placement tables ---- */

typedef struct table {
  int64_t rows, E;
  int32_t *off, *ranks;
} table;

static void table_free(table *t) {
  free(t->off);
  free(t->ranks);
}

/* A pseudo-random placement for `salt`: every expert gets 1..min(3, P) copies on
 * distinct ranks, so experts are copied, moved and given up between salts. */
static void table_make(table *t, int64_t rows, int64_t E, int P, uint64_t salt) {
  t->rows = rows;
  t->E = E;
  t->off = malloc((size_t)(rows * E + 1) * sizeof *t->off);
  t->ranks = malloc((size_t)(rows * E * P + 1) * sizeof *t->ranks);
  assert_non_null(t->off);
  assert_non_null(t->ranks);
  int32_t n = 0;
  t->off[0] = 0;
  for (int64_t i = 0; i < rows * E; i++) {
    const uint64_t h = twin_mix(salt * 1000003u + (uint64_t)i);
    const int max = P < 3 ? P : 3, copies = 1 + (int)(h % (uint64_t)max);
    int first = (int)((h >> 8) % (uint64_t)P);
    /* copies consecutive ranks from `first`, written ascending */
    unsigned char use[64] = {0};
    for (int c = 0; c < copies; c++) use[(first + c) % P] = 1;
    for (int r = 0; r < P; r++)
      if (use[r]) t->ranks[n++] = r;
    t->off[i + 1] = n;
  }
}

static epic_expert_placement table_view(const table *t) {
  return (epic_expert_placement){
      .size = sizeof(epic_expert_placement), .n_rows = t->rows, .n_experts = t->E,
      .off = t->off, .ranks = t->ranks};
}

static void test_bad_placements(void **state) {
  (void)state;
  char dir[1024];
  epic_ops *o;
  epic_model *m;
  epic_model_params mp = {.size = sizeof mp, .load_mtp = 1,
                          .dir = epic_test_path(dir, sizeof dir, "tiny-bf16")};
  assert_int_equal(epic_ops_cpu_create(1, &o), EPIC_OK);
  /* Single process: checked, every expert stays local. */
  assert_int_equal(epic_model_load(o, &mp, &m), EPIC_OK);
  const epic_model_config *c = epic_model_get_config(m);
  const int64_t rows = c->num_hidden_layers + 1, E = c->n_routed_experts;
  table t;
  table_make(&t, rows, E, 1, 1);
  epic_expert_placement p = table_view(&t);
  assert_int_equal(epic_model_set_placement(m, &p), EPIC_OK);
  assert_int_equal(epic_model_local_experts(m, 1), E);
  p.n_rows = rows - 1;
  assert_int_equal(epic_model_set_placement(m, &p), EPIC_ERR_INVALID);
  p = table_view(&t);
  p.size = 0;
  assert_int_equal(epic_model_set_placement(m, &p), EPIC_ERR_INVALID);
  p = table_view(&t);
  t.ranks[3] = 1; /* a rank that does not exist */
  assert_int_equal(epic_model_set_placement(m, &p), EPIC_ERR_INVALID);
  t.ranks[3] = 0;
  t.off[5] = t.off[4]; /* expert 4 of row 0 without a copy */
  assert_int_equal(epic_model_set_placement(m, &p), EPIC_ERR_INVALID);
  assert_int_equal(epic_model_get_placement(m, &p), EPIC_ERR_INVALID); /* no comm */
  epic_model_destroy(m);
  table_free(&t);
  /* Over the world: duplicate ranks of one expert and too many copies are refused,
   * and a bad table leaves the placement in force. */
  mp.comm = g_comm;
  assert_int_equal(epic_model_load(o, &mp, &m), EPIC_OK);
  c = epic_model_get_config(m);
  table_make(&t, rows, E, g_size, 2);
  p = table_view(&t);
  assert_int_equal(epic_model_set_placement(m, &p), EPIC_OK);
  epic_expert_placement got;
  assert_int_equal(epic_model_get_placement(m, &got), EPIC_OK);
  assert_int_equal(got.off[rows * E], t.off[rows * E]);
  assert_memory_equal(got.ranks, t.ranks, (size_t)t.off[rows * E] * sizeof(int32_t));
  if (g_size > 1) {
    int64_t i = 0;
    while (t.off[i + 1] - t.off[i] < 2) i++;
    const int32_t keep = t.ranks[t.off[i] + 1];
    t.ranks[t.off[i] + 1] = t.ranks[t.off[i]];
    assert_int_equal(epic_model_set_placement(m, &p), EPIC_ERR_INVALID);
    t.ranks[t.off[i] + 1] = keep;
  }
  assert_int_equal(epic_model_get_placement(m, &got), EPIC_OK);
  assert_memory_equal(got.ranks, t.ranks, (size_t)t.off[rows * E] * sizeof(int32_t));
  /* Held experts follow the table. */
  for (int64_t l = 0; l < rows; l++) {
    int64_t mine = 0;
    for (int64_t e = 0; e < E; e++)
      for (int32_t j = t.off[l * E + e]; j < t.off[l * E + e + 1]; j++) mine += t.ranks[j] == g_rank;
    assert_int_equal(epic_model_local_experts(m, l), epic_config_is_moe_layer(c, l) ? mine : 0);
  }
  epic_model_destroy(m);
  table_free(&t);
  epic_ops_destroy(o);
}

/* ---- rebalancing while sequences run ---- */

typedef struct ctx {
  const char *model;
  epic_ops *ops;
  epic_test_dev_ops dev;      /* g_device: the models' backend */
  epic_model *plain, *moved; /* both expert parallel over g_comm */
  int64_t V, rows, E;
  int failures;
} ctx;

/* kv_a: the plain placement's cache, kv_b: the re-placed model's (twin_workload.h). */
typedef twin_seq wseq;

static int load(ctx *c, const char *model) {
  char dir[1024];
  epic_model_params mp = {.size = sizeof mp, .load_mtp = 1, .comm = g_comm};
  memset(c, 0, sizeof *c);
  c->model = model;
  mp.dir = epic_test_path(dir, sizeof dir, model);
  if (g_device ? epic_test_dev_ops_open(&c->dev) != EPIC_OK
               : epic_ops_cpu_create(1, &c->ops) != EPIC_OK)
    return -1;
  epic_ops *o = g_device ? c->dev.ops : c->ops;
  if (epic_model_load(o, &mp, &c->plain) != EPIC_OK) return -1;
  if (epic_model_load(o, &mp, &c->moved) != EPIC_OK) return -1;
  const epic_model_config *cfg = epic_model_get_config(c->plain);
  c->V = cfg->vocab_size;
  c->rows = cfg->num_hidden_layers + 1;
  c->E = cfg->n_routed_experts;
  return 0;
}

static int setup_bf16(void **state) {
  ctx *c = calloc(1, sizeof *c);
  *state = c;
  return load(c, "tiny-bf16");
}
static int setup_fp8(void **state) {
  ctx *c = calloc(1, sizeof *c);
  *state = c;
  return load(c, "tiny-fp8");
}
static int teardown(void **state) {
  ctx *c = *state;
  epic_model_destroy(c->plain);
  epic_model_destroy(c->moved);
  epic_ops_destroy(c->ops);
  epic_test_dev_ops_close(&c->dev);
  free(c);
  return 0;
}

static void record(ctx *c, const char *what, int step) {
  if (c->failures++ < 5)
    print_error("rank %d %s step %d: %s\n", g_rank, c->model, step, what);
}

/* This rank's sequences (twin_make): 3..6 generated tokens each. */
static int make_workload(ctx *c, wseq *w) { return twin_make(g_rank, g_size, c->V, 3, 4, w); }

static void run(ctx *c, int n_mb, uint64_t salt) {
  wseq w[MAX_SEQS];
  const int n = make_workload(c, w);
  epic_kvcache *ka, *kb;
  float *la = malloc((size_t)(MAX_SEQS * CHUNK * c->V) * sizeof(float));
  float *lb = malloc((size_t)(MAX_SEQS * CHUNK * c->V) * sizeof(float));
  assert_int_equal(epic_model_set_micro_batches(c->plain, n_mb), EPIC_OK);
  assert_int_equal(epic_model_set_micro_batches(c->moved, n_mb), EPIC_OK);
  assert_int_equal(epic_model_kvcache_create(c->plain, 0, 4, 256, &ka), EPIC_OK);
  assert_int_equal(epic_model_kvcache_create(c->moved, 0, 4, 256, &kb), EPIC_OK);
  for (int step = 0;; step++) {
    epic_seq_batch ba[MAX_SEQS], bb[MAX_SEQS];
    int map[MAX_SEQS];
    const int left = twin_left(g_comm, w, n);
    assert_true(left >= 0);
    if (!left) break;
    if (step % 2 == 1) { /* a new placement between forwards, sequences mid-flight */
      table t;
      table_make(&t, c->rows, c->E, g_size, salt + (uint64_t)step);
      epic_expert_placement p = table_view(&t);
      assert_int_equal(epic_model_set_placement(c->moved, &p), EPIC_OK);
      table_free(&t);
    }
    const int nb = twin_batches(w, n, step, ba, bb, map);
    assert_int_equal(epic_model_forward(c->plain, ka, ba, nb, la, NULL), EPIC_OK);
    assert_int_equal(epic_model_forward(c->moved, kb, bb, nb, lb, NULL), EPIC_OK);
    const int64_t out = epic_batch_out_rows(ba, nb);
    if (memcmp(la, lb, (size_t)(out * c->V) * sizeof(float)) != 0)
      record(c, "logits after rebalancing differ (bitwise) from the plain placement", step);
    twin_advance(w, map, ba, nb, la, c->V);
  }
  for (int j = 0; j < n; j++) {
    epic_kvcache_seq_release(ka, &w[j].kv_a);
    epic_kvcache_seq_release(kb, &w[j].kv_b);
  }
  /* MTP over the prompts, after yet another placement. */
  {
    const int64_t D = epic_model_get_config(c->plain)->hidden_size;
    table t;
    table_make(&t, c->rows, c->E, g_size, salt + 777);
    epic_expert_placement p = table_view(&t);
    assert_int_equal(epic_model_set_placement(c->moved, &p), EPIC_OK);
    table_free(&t);
    epic_kvcache *ma, *mb;
    epic_seq_batch xa[MAX_SEQS], xb[MAX_SEQS];
    float *hid = calloc((size_t)(MAX_SEQS * 24 * D), sizeof(float));
    int nb = 0;
    assert_int_equal(epic_model_kvcache_create(c->plain, 1, 4, 256, &ma), EPIC_OK);
    assert_int_equal(epic_model_kvcache_create(c->moved, 1, 4, 256, &mb), EPIC_OK);
    for (int j = 0; j < n; j++) {
      if (w[j].n_prompt < 2) continue;
      memset(&w[j].kv_a, 0, sizeof w[j].kv_a);
      memset(&w[j].kv_b, 0, sizeof w[j].kv_b);
      for (int64_t i = 0; i < 24 * D; i++)
        hid[(size_t)(nb * 24 * D + i)] =
            (float)((double)(twin_mix((uint64_t)(j * 7919 + i)) % 2001) / 1000.0 - 1.0);
      xa[nb] = (epic_seq_batch){.tokens = w[j].prompt + 1, .n_tokens = w[j].n_prompt - 1,
                                .kv = &w[j].kv_a, .all_logits = 1,
                                .hidden = hid + (size_t)(nb * 24 * D)};
      xb[nb] = xa[nb];
      xb[nb].kv = &w[j].kv_b;
      nb++;
    }
    const int64_t out = epic_batch_out_rows(xa, nb);
    float *ya = malloc((size_t)((out + 1) * c->V) * sizeof(float));
    float *yb = malloc((size_t)((out + 1) * c->V) * sizeof(float));
    assert_int_equal(epic_model_mtp_forward(c->plain, ma, xa, nb, ya), EPIC_OK);
    assert_int_equal(epic_model_mtp_forward(c->moved, mb, xb, nb, yb), EPIC_OK);
    if (memcmp(ya, yb, (size_t)(out * c->V) * sizeof(float)) != 0)
      record(c, "MTP logits after rebalancing differ (bitwise)", -1);
    for (int k = 0; k < nb; k++) {
      epic_kvcache_seq_release(ma, xa[k].kv);
      epic_kvcache_seq_release(mb, xb[k].kv);
    }
    epic_kvcache_destroy(ma);
    epic_kvcache_destroy(mb);
    free(ya);
    free(yb);
    free(hid);
  }
  epic_kvcache_destroy(ka);
  epic_kvcache_destroy(kb);
  free(la);
  free(lb);
}

static void agree(ctx *c, const char *what) {
  int64_t mine = c->failures, all = 0;
  assert_int_equal(epic_comm_allreduce_i64(g_comm, &mine, &all, 1, EPIC_COMM_SUM), EPIC_OK);
  if (g_rank == 0)
    print_message("%s np %d, %s: %lld failed checks\n", c->model, g_size, what, (long long)all);
  assert_int_equal(all, 0);
  c->failures = 0;
}

static void test_rebalance_one_micro_batch(void **state) {
  run(*state, 1, 11);
  agree(*state, "1 micro-batch");
}
static void test_rebalance_two_micro_batches(void **state) {
  run(*state, 2, 23);
  agree(*state, "2 micro-batches");
}

/* Per-layer counts add up to the per-expert totals. */
static void test_layer_counts(void **state) {
  ctx *c = *state;
  int64_t *lc = calloc((size_t)(c->rows * c->E), sizeof *lc), *tot = calloc((size_t)c->E, sizeof *tot);
  assert_int_equal(epic_model_expert_layer_tokens(c->moved, lc), EPIC_OK);
  assert_int_equal(epic_model_expert_tokens(c->moved, tot), EPIC_OK);
  for (int64_t e = 0; e < c->E; e++) {
    int64_t s = 0;
    for (int64_t l = 0; l < c->rows; l++) s += lc[l * c->E + e];
    assert_int_equal(s, tot[e]);
  }
  free(lc);
  free(tot);
}

int main(int argc, char **argv) {
  if (epic_comm_mpi_init(&argc, &argv, &g_rank, &g_size) != EPIC_OK) return 2;
  epic_log_init(EPIC_LOG_LEVEL_WARN, g_rank);
  g_device = argc > 1 && strcmp(argv[1], "device") == 0;
  epic_comm_params p = {.size = sizeof p, .backend = "mpi"};
  if (epic_comm_create(&p, &g_comm) != EPIC_OK) {
    epic_comm_mpi_finalize();
    return 1;
  }
  const struct CMUnitTest units[] = {
      cmocka_unit_test(test_matmul_row_independent),
      cmocka_unit_test(test_bad_placements),
  };
  const struct CMUnitTest runs[] = {
      cmocka_unit_test(test_rebalance_one_micro_batch),
      cmocka_unit_test(test_rebalance_two_micro_batches),
      cmocka_unit_test(test_layer_counts),
  };
  char g0[64], g1[64], g2[64];
  snprintf(g0, sizeof g0, "model_eplb units rank %d", g_rank);
  snprintf(g1, sizeof g1, "model_eplb tiny-bf16 rank %d", g_rank);
  snprintf(g2, sizeof g2, "model_eplb tiny-fp8 rank %d", g_rank);
  int fails = _cmocka_run_group_tests(g0, units, sizeof units / sizeof units[0], NULL, NULL);
  fails += _cmocka_run_group_tests(g1, runs, sizeof runs / sizeof runs[0], setup_bf16, teardown);
  fails += _cmocka_run_group_tests(g2, runs, sizeof runs / sizeof runs[0], setup_fp8, teardown);
  epic_comm_destroy(g_comm);
  epic_comm_mpi_finalize();
  return fails ? 1 : 0;
}
