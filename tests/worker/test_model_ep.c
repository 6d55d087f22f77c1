/* The expert-parallel model under mpirun (one backend per run, argv[1]: mpi or
 * ucx): every rank serves many concurrent sequences of different lengths
 * (different counts per rank, some ranks with none, staggered admission,
 * chunked prefill beside decode) while its routed experts serve every rank's
 * tokens; with one and with two micro-batches each sequence's logits must
 * match a single-process reference model loaded in the same program (within
 * 1e-4) and its greedy ids must be the same. The MTP layer, whose experts are
 * spread too, is checked the same way.
 *
 * With argv[2] = "device" the expert-parallel model takes the GPU backends' host-side
 * paths (tests/common/dev_ops.h: work arrays and exchange buffers in backend memory,
 * staged through host memory for a host-memory comm backend).
 *
 * A failed comparison is recorded, not asserted on the spot, so that every
 * rank still runs the same collectives; the verdict is agreed at the end. */
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

#define TOL 1e-4
#define CHUNK TWIN_CHUNK
#define MAX_SEQS TWIN_MAX_SEQS

static epic_comm *g_comm;
static int g_rank, g_size;
static const char *g_backend = "mpi";
static int g_device; /* the EP model on the CPU posing as a device backend */

typedef struct ctx {
  const char *model;
  epic_ops *ops;
  epic_test_dev_ops dev; /* g_device: the EP model's backend */
  epic_model *ep, *ref; /* expert parallel over g_comm; all experts in this process */
  int32_t *owner;       /* NULL: contiguous blocks */
  int64_t V, D, n_moe;  /* n_moe: MoE layers of the main model */
  int failures;         /* this rank's failed comparisons */
  double worst;
} ctx;

/* kv_a: the EP model's cache, kv_b: the reference's (twin_workload.h). */
typedef twin_seq wseq;

static void fail_row(ctx *c, const char *what, double d) {
  if (c->failures++ < 5)
    print_error("rank %d %s %s: %s (max |dlogit| %g)\n", g_rank, c->model, g_backend, what, d);
}

/* Compare rows of EP and reference logits; argmax must agree. */
static void compare(ctx *c, const float *ep, const float *ref, int64_t rows, const char *what) {
  for (int64_t r = 0; r < rows; r++) {
    double d = 0;
    for (int64_t v = 0; v < c->V; v++) {
      double x = fabs((double)ep[r * c->V + v] - (double)ref[r * c->V + v]);
      if (!(x <= d)) d = x; /* NaN propagates as a failure */
    }
    if (!(d <= c->worst)) c->worst = d;
    if (!(d <= TOL)) fail_row(c, what, d);
    if (epic_argmax(ep + r * c->V, c->V) != epic_argmax(ref + r * c->V, c->V))
      fail_row(c, "greedy id differs", d);
  }
}

static int load(ctx *c, const char *model, int scattered) {
  char dir[1024];
  epic_model_params mp = {.size = sizeof mp, .load_mtp = 1};
  memset(c, 0, sizeof *c);
  c->model = model;
  mp.dir = epic_test_path(dir, sizeof dir, model);
  if (epic_ops_cpu_create(1, &c->ops) != EPIC_OK) return -1;
  if (epic_model_load(c->ops, &mp, &c->ref) != EPIC_OK) return -1;
  const epic_model_config *cfg = epic_model_get_config(c->ref);
  const int64_t E = cfg->n_routed_experts, rows = cfg->num_hidden_layers + 1;
  if (scattered) {
    /* Uneven, interleaved placement; with 4 ranks the last owns no expert at all. */
    const int holders = g_size > 3 ? g_size - 1 : g_size;
    c->owner = malloc((size_t)(rows * E) * sizeof *c->owner);
    for (int64_t l = 0; l < rows; l++)
      for (int64_t e = 0; e < E; e++) c->owner[l * E + e] = (int32_t)((e * 5 + l * 3) % holders);
  }
  mp.comm = g_comm;
  mp.expert_owner = c->owner;
  if (g_device && epic_test_dev_ops_open(&c->dev) != EPIC_OK) return -1;
  if (epic_model_load(g_device ? c->dev.ops : c->ops, &mp, &c->ep) != EPIC_OK) return -1;
  c->V = cfg->vocab_size;
  c->D = cfg->hidden_size;
  for (int64_t l = 0; l < cfg->num_hidden_layers; l++) c->n_moe += epic_config_is_moe_layer(cfg, l);
  return 0;
}

static void unload(ctx *c) {
  epic_model_destroy(c->ep);
  epic_model_destroy(c->ref);
  epic_ops_destroy(c->ops);
  epic_test_dev_ops_close(&c->dev);
  free(c->owner);
}

static int setup_bf16(void **state) {
  ctx *c = calloc(1, sizeof *c);
  *state = c;
  return load(c, "tiny-bf16", 0);
}
static int setup_fp8(void **state) {
  ctx *c = calloc(1, sizeof *c);
  *state = c;
  return load(c, "tiny-fp8", 1);
}
static int teardown(void **state) {
  unload(*state);
  free(*state);
  return 0;
}

/* Every expert of every MoE layer lives on exactly one rank. */
static void test_experts_spread(void **state) {
  ctx *c = *state;
  const epic_model_config *cfg = epic_model_get_config(c->ep);
  for (int64_t l = 0; l <= cfg->num_hidden_layers; l++) {
    int64_t mine = epic_model_local_experts(c->ep, l), all = 0;
    assert_int_equal(epic_comm_allreduce_i64(g_comm, &mine, &all, 1, EPIC_COMM_SUM), EPIC_OK);
    assert_int_equal(all, epic_config_is_moe_layer(cfg, l) ? cfg->n_routed_experts : 0);
  }
}

/* This rank's sequences (twin_make): 2..4 generated tokens each. */
static int make_workload(ctx *c, wseq *w) { return twin_make(g_rank, g_size, c->V, 2, 3, w); }

/* The workload in lock-step with the other ranks, on the EP model with n_mb
 * micro-batches, each step checked against the reference model. */
static void run_workload(ctx *c, int n_mb) {
  wseq w[MAX_SEQS];
  const int n = make_workload(c, w);
  epic_kvcache *kc_ep, *kc_ref;
  float *l_ep = malloc((size_t)(MAX_SEQS * CHUNK * c->V) * sizeof(float));
  float *l_ref = malloc((size_t)(MAX_SEQS * CHUNK * c->V) * sizeof(float));
  int steps = 0;
  assert_int_equal(epic_model_set_micro_batches(c->ep, n_mb), EPIC_OK);
  assert_int_equal(epic_model_kvcache_create(c->ep, 0, 4, 256, &kc_ep), EPIC_OK);
  assert_int_equal(epic_model_kvcache_create(c->ref, 0, 4, 256, &kc_ref), EPIC_OK);
  epic_model_reset_stats(c->ep);
  for (int step = 0;; step++) {
    epic_seq_batch be[MAX_SEQS], br[MAX_SEQS];
    int map[MAX_SEQS];
    const int left = twin_left(g_comm, w, n);
    assert_true(left >= 0);
    if (!left) break;
    const int nb = twin_batches(w, n, step, be, br, map);
    assert_int_equal(epic_model_forward(c->ep, kc_ep, be, nb, l_ep, NULL), EPIC_OK);
    steps++;
    if (nb == 0) continue;
    assert_int_equal(epic_model_forward(c->ref, kc_ref, br, nb, l_ref, NULL), EPIC_OK);
    compare(c, l_ep, l_ref, epic_batch_out_rows(be, nb), "logits differ from the reference");
    /* Both models go on with the reference's choice, so they stay comparable. */
    twin_advance(w, map, br, nb, l_ref, c->V);
  }
  {
    /* Two all-to-alls (dispatch, combine) per micro-batch and MoE layer, whatever the tokens. */
    epic_model_stats st;
    epic_model_get_stats(c->ep, &st);
    assert_int_equal(st.forwards, steps);
    assert_int_equal(st.a2a_calls, (int64_t)steps * 2 * n_mb * c->n_moe);
    assert_true(st.total_s >= st.attention_s + st.dense_s + st.experts_s - 1e-9);
    assert_true(st.dispatch_wait_s > 0 && st.combine_wait_s >= 0 && st.other_s > -1e-9);
    if (g_size > 1 && st.tokens > 0) assert_true(st.dispatch_bytes > 0 && st.combine_bytes > 0);
  }
  for (int j = 0; j < n; j++) {
    epic_kvcache_seq_release(kc_ep, &w[j].kv_a);
    epic_kvcache_seq_release(kc_ref, &w[j].kv_b);
  }
  epic_kvcache_destroy(kc_ep);
  epic_kvcache_destroy(kc_ref);
  free(l_ep);
  free(l_ref);
}

/* The MTP layer over every sequence's whole prompt in one batch. */
static void run_mtp(ctx *c, int n_mb) {
  wseq w[MAX_SEQS];
  const int n = make_workload(c, w);
  epic_kvcache *kc, *km_ep, *km_ref;
  epic_seq_batch be[MAX_SEQS], br[MAX_SEQS];
  float *hid[MAX_SEQS] = {0}, *l_ep, *l_ref;
  int64_t rows = 0;
  int nb = 0;
  assert_int_equal(epic_model_set_micro_batches(c->ep, n_mb), EPIC_OK);
  assert_int_equal(epic_model_kvcache_create(c->ref, 0, 4, 256, &kc), EPIC_OK);
  assert_int_equal(epic_model_kvcache_create(c->ep, 1, 4, 256, &km_ep), EPIC_OK);
  assert_int_equal(epic_model_kvcache_create(c->ref, 1, 4, 256, &km_ref), EPIC_OK);
  for (int j = 0; j < n; j++) {
    wseq *s = &w[j];
    float *lg = malloc((size_t)(s->n_prompt * c->V) * sizeof(float));
    epic_seq_batch b = {.tokens = s->prompt, .n_tokens = s->n_prompt, .kv = &s->kv_b,
                        .all_logits = 1};
    if (s->n_prompt < 2) {
      free(lg);
      continue;
    }
    hid[nb] = malloc((size_t)(s->n_prompt * c->D) * sizeof(float));
    assert_int_equal(epic_model_forward(c->ref, kc, &b, 1, lg, hid[nb]), EPIC_OK);
    free(lg);
    be[nb] = (epic_seq_batch){.tokens = s->prompt + 1, .n_tokens = s->n_prompt - 1, .kv = &s->kv_a,
                              .all_logits = 1, .hidden = hid[nb]};
    br[nb] = be[nb];
    br[nb].kv = &s->kv_b; /* the main cache is done with: reuse the struct for the MTP one */
    epic_kvcache_seq_release(kc, &s->kv_b);
    rows += s->n_prompt - 1;
    nb++;
  }
  l_ep = malloc((size_t)(rows + 1) * (size_t)c->V * sizeof(float));
  l_ref = malloc((size_t)(rows + 1) * (size_t)c->V * sizeof(float));
  assert_int_equal(epic_model_mtp_forward(c->ep, km_ep, be, nb, l_ep), EPIC_OK);
  if (nb > 0) {
    assert_int_equal(epic_model_mtp_forward(c->ref, km_ref, br, nb, l_ref), EPIC_OK);
    compare(c, l_ep, l_ref, rows, "MTP logits differ from the reference");
  }
  for (int j = 0; j < n; j++) {
    epic_kvcache_seq_release(km_ep, &w[j].kv_a);
    epic_kvcache_seq_release(km_ref, &w[j].kv_b);
  }
  for (int j = 0; j < nb; j++) free(hid[j]);
  epic_kvcache_destroy(kc);
  epic_kvcache_destroy(km_ep);
  epic_kvcache_destroy(km_ref);
  free(l_ep);
  free(l_ref);
}

/* Every rank's verdict: all ranks pass or the test fails everywhere. */
static void agree(ctx *c, const char *what) {
  int64_t mine = c->failures, all = 0;
  double worst = 0;
  assert_int_equal(epic_comm_allreduce_i64(g_comm, &mine, &all, 1, EPIC_COMM_SUM), EPIC_OK);
  assert_int_equal(epic_comm_allreduce_f64(g_comm, &c->worst, &worst, 1, EPIC_COMM_MAX), EPIC_OK);
  if (g_rank == 0)
    print_message("%s %s np %d, %s: max |dlogit| vs single process %.3g, %lld failed checks\n",
                  c->model, g_backend, g_size, what, worst, (long long)all);
  assert_int_equal(all, 0);
  c->failures = 0;
  c->worst = 0;
}

static void test_one_micro_batch(void **state) {
  run_workload(*state, 1);
  agree(*state, "1 micro-batch");
}
static void test_two_micro_batches(void **state) {
  run_workload(*state, 2);
  agree(*state, "2 micro-batches");
}
static void test_mtp(void **state) {
  run_mtp(*state, 1);
  run_mtp(*state, 2);
  agree(*state, "MTP, 1 and 2 micro-batches");
}

int main(int argc, char **argv) {
  if (epic_comm_mpi_init(&argc, &argv, &g_rank, &g_size) != EPIC_OK) return 2;
  epic_log_init(EPIC_LOG_LEVEL_WARN, g_rank);
  if (argc > 1) g_backend = argv[1];
  g_device = argc > 2 && strcmp(argv[2], "device") == 0;
  epic_comm_params p = {.size = sizeof p, .backend = g_backend};
  epic_status st = epic_comm_create(&p, &g_comm);
  if (st != EPIC_OK) {
    fprintf(stderr, "[rank %d] cannot create backend %s: %s\n", g_rank, g_backend,
            epic_status_str(st));
    epic_comm_mpi_finalize();
    return st == EPIC_ERR_UNSUPPORTED ? 77 : 1;
  }
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_experts_spread),
      cmocka_unit_test(test_one_micro_batch),
      cmocka_unit_test(test_two_micro_batches),
      cmocka_unit_test(test_mtp),
  };
  char g1[96], g2[96];
  const char *paths = g_device ? ", device paths" : "";
  snprintf(g1, sizeof g1, "model_ep tiny-bf16 %s%s rank %d", g_backend, paths, g_rank);
  snprintf(g2, sizeof g2, "model_ep tiny-fp8 (scattered experts) %s%s rank %d", g_backend, paths,
           g_rank);
  int failed = cmocka_run_group_tests_name(g1, tests, setup_bf16, teardown);
  failed += cmocka_run_group_tests_name(g2, tests, setup_fp8, teardown);
  int64_t mine = failed, any = 0;
  epic_comm_allreduce_i64(g_comm, &mine, &any, 1, EPIC_COMM_MAX);
  epic_comm_destroy(g_comm);
  epic_comm_mpi_finalize();
  return any ? 1 : 0;
}
