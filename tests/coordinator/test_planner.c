/* Planner: exact checkpoint bytes, expert placement invariants, redundancy, fit checks.
 * argv[1] = the 671B config directory (bench/configs/deepseek-v3-671b). */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "common/log.h"
#include "coordinator/planner.h"
#include "tests/common/test_util.h"
#include "worker/config.h"

static const char *g_671b_dir;

static void load_671b(epic_model_config *c) {
  assert_non_null(g_671b_dir);
  assert_int_equal(epic_config_load_dir(g_671b_dir, c), EPIC_OK);
}

static void load_fixture(const char *name, epic_model_config *c) {
  char dir[4096];
  epic_test_path(dir, sizeof dir, name);
  assert_int_equal(epic_config_load_dir(dir, c), EPIC_OK);
}

static epic_plan *make_plan(const epic_model_config *c, int n, uint64_t mem, int mtp, int red,
                            const char *stats) {
  epic_plan_params p = {.size = sizeof p,
                        .cfg = c,
                        .n_ranks = n,
                        .gpu_mem_bytes = mem,
                        .include_mtp = mtp,
                        .n_redundant = red,
                        .load_stats_path = stats};
  epic_plan *pl = NULL;
  assert_int_equal(epic_plan_create(&p, &pl), EPIC_OK);
  assert_non_null(pl);
  return pl;
}

/* ---- bytes ---- */

static void test_total_bytes_671b(void **state) {
  (void)state;
  epic_model_config c;
  epic_weight_bytes w;
  load_671b(&c);
  assert_int_equal(epic_weight_bytes_compute(&c, 1, &w), EPIC_OK);
  assert_true(w.total == 688574839360ull); /* ARCHITECTURE §1.3 */
  assert_int_equal(w.n_tensors, 91991);
  assert_true(w.expert == 44050944ull); /* 3 x 2048x7168 FP8 + 3 x 16x56 F32 scales */
  assert_true(w.routed_experts == 59ull * 256 * w.expert);
  assert_true(w.embedding == 129280ull * 7168 * 2);
  assert_true(w.mtp_copies == 2 * w.embedding);
  /* Without MTP: the MTP layer's 1558 block tensors and 6 extras are left out. */
  epic_weight_bytes wn;
  assert_int_equal(epic_weight_bytes_compute(&c, 0, &wn), EPIC_OK);
  assert_int_equal(w.n_tensors - wn.n_tensors, 1558 + 6);
  assert_true(wn.mtp_copies == 0 && wn.mtp_extra == 0);
  assert_true(wn.routed_experts == 58ull * 256 * w.expert);
  assert_int_equal(epic_weight_bytes_compute(NULL, 1, &w), EPIC_ERR_INVALID);
}

/* metadata.total_size and the tensor count of a fixture's index. */
static void fixture_index(const char *name, uint64_t *total, int64_t *n_tensors) {
  char path[4096], rel[256];
  snprintf(rel, sizeof rel, "%s/model.safetensors.index.json", name);
  epic_test_path(path, sizeof path, rel);
  size_t len = 0;
  char *text = epic_test_read_file(path, &len);
  assert_non_null(text);
  cJSON *root = cJSON_ParseWithLength(text, len);
  assert_non_null(root);
  const cJSON *md = cJSON_GetObjectItemCaseSensitive(root, "metadata");
  const cJSON *ts = cJSON_GetObjectItemCaseSensitive(md, "total_size");
  assert_true(cJSON_IsNumber(ts));
  *total = (uint64_t)ts->valuedouble;
  *n_tensors = cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(root, "weight_map"));
  cJSON_Delete(root);
  free(text);
}

static void check_fixture_bytes(const char *name) {
  epic_model_config c;
  epic_weight_bytes w;
  uint64_t total = 0;
  int64_t n = 0;
  load_fixture(name, &c);
  fixture_index(name, &total, &n);
  assert_int_equal(epic_weight_bytes_compute(&c, 1, &w), EPIC_OK);
  assert_true(w.total == total);
  assert_int_equal(w.n_tensors, n);
}

static void test_total_bytes_tiny(void **state) {
  (void)state;
  check_fixture_bytes("tiny-bf16");
  check_fixture_bytes("tiny-fp8");
}

/* ---- fit ---- */

static void test_fit_671b(void **state) {
  (void)state;
  epic_model_config c;
  load_671b(&c);
  const uint64_t GB = 1000000000ull, GiB = 1ull << 30;
  struct {
    int n;
    uint64_t mem;
    int fits;
  } cases[] = {{8, 141 * GB, 1}, {8, 80 * GB, 0},   {16, 80 * GB, 1},
               {8, 80 * GiB, 0}, {16, 80 * GiB, 1}, {1, 141 * GB, 0}};
  for (int mtp = 0; mtp <= 1; mtp++)
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
      epic_plan *pl = make_plan(&c, cases[i].n, cases[i].mem, mtp, 0, NULL);
      assert_int_equal(epic_plan_fits(pl), cases[i].fits);
      epic_rank_memory m;
      for (int r = 0; r < cases[i].n; r++) {
        assert_int_equal(epic_plan_rank_memory(pl, r, &m), EPIC_OK);
        assert_int_equal(m.fits, cases[i].fits);
        assert_true(m.weight_bytes == m.replicated_bytes + m.expert_bytes);
        assert_true(m.kv_budget_bytes ==
                    (int64_t)cases[i].mem - (int64_t)m.weight_bytes - (int64_t)m.reserve_bytes);
        if (cases[i].fits)
          assert_true(m.kv_tokens == m.kv_budget_bytes / (int64_t)epic_plan_kv_bytes_per_token(pl));
      }
      /* 576 values x 2 B per token per attention layer. */
      assert_true(epic_plan_kv_bytes_per_token(pl) == 1152ull * (mtp ? 62 : 61));
      epic_plan_destroy(pl);
    }
  /* DESIGN §7: 8 ranks hold 32 experts x 58 layers (~82 GB) plus ~19 GB replicated. */
  epic_plan *pl = make_plan(&c, 8, 141 * GB, 0, 0, NULL);
  epic_rank_memory m;
  assert_int_equal(epic_plan_rank_memory(pl, 0, &m), EPIC_OK);
  assert_int_equal(m.expert_slots, 32 * 58);
  assert_true(m.expert_bytes > 81 * GB && m.expert_bytes < 83 * GB);
  assert_true(m.replicated_bytes > 18 * GB && m.replicated_bytes < 20 * GB);
  epic_plan_destroy(pl);
  /* No memory given: no fit check. */
  pl = make_plan(&c, 1, 0, 1, 0, NULL);
  assert_int_equal(epic_plan_fits(pl), 1);
  assert_int_equal(epic_plan_rank_memory(pl, 0, &m), EPIC_OK);
  assert_int_equal(m.kv_tokens, 0);
  epic_plan_destroy(pl);
}

/* ---- placement ---- */

/* Every expert held exactly once (no redundancy), ascending ids, per-layer counts differ by
 * at most one, owners agree with rank lists, memory per rank differs by at most one expert. */
static void check_plain_placement(const epic_model_config *c, int N, int mtp) {
  epic_plan *pl = make_plan(c, N, 0, mtp, 0, NULL);
  const int E = epic_plan_n_experts(pl), L = epic_plan_n_layers(pl);
  assert_int_equal(L, c->num_hidden_layers + (mtp ? c->num_nextn_predict_layers : 0));
  int *seen = calloc((size_t)E, sizeof(int));
  assert_non_null(seen);
  for (int l = 0; l < L; l++) {
    const int32_t *ids, *ranks;
    int n, no;
    if (!epic_plan_is_moe_layer(pl, l)) {
      assert_int_equal(epic_plan_rank_experts(pl, l, 0, &ids, &n), EPIC_OK);
      assert_int_equal(n, 0);
      assert_int_equal(epic_plan_expert_owners(pl, l, 0, &ranks, &no), EPIC_ERR_INVALID);
      continue;
    }
    memset(seen, 0, sizeof(int) * (size_t)E);
    int lo = E + 1, hi = -1;
    for (int r = 0; r < N; r++) {
      assert_int_equal(epic_plan_rank_experts(pl, l, r, &ids, &n), EPIC_OK);
      if (n < lo)
        lo = n;
      if (n > hi)
        hi = n;
      for (int i = 0; i < n; i++) {
        assert_true(ids[i] >= 0 && ids[i] < E);
        if (i)
          assert_true(ids[i] == ids[i - 1] + 1); /* contiguous */
        seen[ids[i]]++;
        assert_int_equal(epic_plan_expert_owners(pl, l, ids[i], &ranks, &no), EPIC_OK);
        assert_int_equal(no, 1);
        assert_int_equal(ranks[0], r);
      }
    }
    assert_true(hi - lo <= 1);
    assert_int_equal(lo, E / N);
    for (int e = 0; e < E; e++)
      assert_int_equal(seen[e], 1);
  }
  int64_t smin = -1, smax = -1;
  for (int r = 0; r < N; r++) {
    epic_rank_memory m;
    assert_int_equal(epic_plan_rank_memory(pl, r, &m), EPIC_OK);
    if (smin < 0 || m.expert_slots < smin)
      smin = m.expert_slots;
    if (m.expert_slots > smax)
      smax = m.expert_slots;
  }
  assert_true(smax - smin <= 1);
  free(seen);
  epic_plan_destroy(pl);
}

static void test_placement_plain(void **state) {
  (void)state;
  epic_model_config c, tiny;
  load_671b(&c);
  load_fixture("tiny-fp8", &tiny);
  const int ns[] = {1, 3, 5, 7, 16, 300};
  for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++) {
    check_plain_placement(&c, ns[i], 1);
    check_plain_placement(&c, ns[i], 0);
    check_plain_placement(&tiny, ns[i], 1);
  }
  /* 300 ranks, 256 experts: some ranks hold none in a layer; the accessors still work. */
  epic_plan *pl = make_plan(&c, 300, 0, 1, 0, NULL);
  const int32_t *ids;
  int n, empty = 0;
  for (int r = 0; r < 300; r++) {
    assert_int_equal(epic_plan_rank_experts(pl, 3, r, &ids, &n), EPIC_OK);
    empty += n == 0;
  }
  assert_int_equal(empty, 300 - 256);
  /* MTP layer 61 is a MoE layer when planned, absent otherwise. */
  assert_true(epic_plan_is_moe_layer(pl, 61));
  assert_int_equal(epic_plan_rank_experts(pl, 62, 0, &ids, &n), EPIC_ERR_INVALID);
  assert_int_equal(epic_plan_rank_experts(pl, 3, 300, &ids, &n), EPIC_ERR_INVALID);
  assert_int_equal(epic_plan_rank_experts(pl, -1, 0, &ids, &n), EPIC_ERR_INVALID);
  assert_int_equal(epic_plan_expert_owners(pl, 3, 256, &ids, &n), EPIC_ERR_INVALID);
  epic_plan_destroy(pl);
  pl = make_plan(&c, 8, 0, 0, 0, NULL);
  assert_int_equal(epic_plan_n_layers(pl), 61);
  assert_int_equal(epic_plan_rank_experts(pl, 61, 0, &ids, &n), EPIC_ERR_INVALID);
  assert_int_equal(epic_plan_rank_experts(pl, 60, 7, &ids, &n), EPIC_OK);
  assert_int_equal(n, 32);
  assert_int_equal(ids[0], 224);
  epic_plan_destroy(pl);
}

/* ---- redundancy ---- */

static char *write_stats(const char *json) {
  char *path = strdup("/tmp/epic-plan-stats-XXXXXX");
  assert_non_null(path);
  int fd = mkstemp(path);
  assert_true(fd >= 0);
  FILE *f = fdopen(fd, "w");
  assert_non_null(f);
  fputs(json, f);
  fclose(f);
  return path;
}

/* {"layers": {"<l>": [...]}} for the given MoE layers, counts from a fixed pseudo-random
 * skewed distribution (Zipf-like with a shuffled ranking). */
static char *skewed_stats(const epic_model_config *c, int first, int last, unsigned seed) {
  const int E = (int)c->n_routed_experts;
  size_t cap = 64 + (size_t)(last - first + 1) * ((size_t)E * 16 + 32), n = 0;
  char *s = malloc(cap);
  assert_non_null(s);
  n += (size_t)snprintf(s + n, cap - n, "{\"layers\": {");
  for (int l = first; l <= last; l++) {
    n += (size_t)snprintf(s + n, cap - n, "%s\"%d\": [", l > first ? ", " : "", l);
    for (int e = 0; e < E; e++) {
      seed = seed * 1103515245u + 12345u;
      const unsigned rank = (seed >> 8) % (unsigned)E;
      const long count = 100000L / (long)(rank + 1) + (long)((seed >> 4) % 7);
      n += (size_t)snprintf(s + n, cap - n, "%s%ld", e ? "," : "", count);
    }
    n += (size_t)snprintf(s + n, cap - n, "]");
  }
  snprintf(s + n, cap - n, "}}");
  return s;
}

/* Invariants of any placement: every expert >= 1 owner, no duplicate on a rank, slots per
 * rank <= cap, owners consistent, total slots = E + R in layers with statistics. */
static void check_redundant_placement(const epic_plan *pl, int R, int stats_first, int stats_last) {
  const int N = epic_plan_n_ranks(pl), E = epic_plan_n_experts(pl);
  const int cap = (E + R + N - 1) / N;
  int *count = calloc((size_t)E, sizeof(int));
  assert_non_null(count);
  for (int l = 0; l < epic_plan_n_layers(pl); l++) {
    if (!epic_plan_is_moe_layer(pl, l))
      continue;
    const int with_stats = l >= stats_first && l <= stats_last;
    memset(count, 0, sizeof(int) * (size_t)E);
    int total = 0;
    for (int r = 0; r < N; r++) {
      const int32_t *ids;
      int n;
      assert_int_equal(epic_plan_rank_experts(pl, l, r, &ids, &n), EPIC_OK);
      assert_true(n <= cap);
      for (int i = 0; i < n; i++) {
        if (i)
          assert_true(ids[i] > ids[i - 1]); /* ascending, so no duplicates */
        count[ids[i]]++;
      }
      total += n;
    }
    assert_int_equal(total, E + (with_stats ? R : 0));
    for (int e = 0; e < E; e++) {
      const int32_t *ranks;
      int no;
      assert_true(count[e] >= 1);
      assert_int_equal(epic_plan_expert_owners(pl, l, e, &ranks, &no), EPIC_OK);
      assert_int_equal(no, count[e]);
      for (int i = 0; i < no; i++) {
        const int32_t *ids;
        int n, found = 0;
        if (i)
          assert_true(ranks[i] > ranks[i - 1]);
        assert_int_equal(epic_plan_rank_experts(pl, l, ranks[i], &ids, &n), EPIC_OK);
        for (int j = 0; j < n; j++)
          found |= ids[j] == e;
        assert_true(found);
      }
    }
  }
  free(count);
}

static void test_redundancy_skewed(void **state) {
  (void)state;
  epic_model_config c;
  load_671b(&c);
  char *json = skewed_stats(&c, 3, 61, 7);
  char *path = write_stats(json);
  const int ns[] = {8, 16, 7};
  for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++) {
    const int N = ns[i], R = 32;
    epic_plan *pl = make_plan(&c, N, 141000000000ull, 1, R, path);
    check_redundant_placement(pl, R, 3, 61);
    epic_plan_balance b;
    assert_int_equal(epic_plan_load_balance(pl, -1, &b), EPIC_OK);
    assert_int_equal(b.n_layers, 59);
    assert_true(b.ratio_before > 1.2);           /* skewed */
    assert_true(b.ratio_after < b.ratio_before); /* and better after */
    assert_true(b.ratio_after < 1.1);
    assert_true(b.mean_after > 0 && b.mean_after == b.mean_before);
    for (int l = 0; l < 62; l++) {
      epic_plan_balance bl;
      assert_int_equal(epic_plan_load_balance(pl, l, &bl), EPIC_OK);
      assert_int_equal(bl.n_layers, l >= 3);
    }
    /* Redundant copies cost memory. */
    epic_rank_memory m;
    int64_t slots = 0;
    for (int r = 0; r < N; r++) {
      assert_int_equal(epic_plan_rank_memory(pl, r, &m), EPIC_OK);
      slots += m.expert_slots;
    }
    assert_int_equal(slots, 59 * (256 + R));
    epic_plan_destroy(pl);
  }
  /* Statistics without redundancy: default placement, balance reported. */
  epic_plan *pl = make_plan(&c, 8, 0, 1, 0, path);
  const int32_t *ids;
  int n;
  assert_int_equal(epic_plan_rank_experts(pl, 61, 1, &ids, &n), EPIC_OK);
  assert_int_equal(n, 32);
  assert_int_equal(ids[0], 32);
  epic_plan_balance b;
  assert_int_equal(epic_plan_load_balance(pl, -1, &b), EPIC_OK);
  assert_true(b.ratio_after == b.ratio_before);
  epic_plan_destroy(pl);
  /* Without MTP, the layer-61 statistics are ignored. */
  pl = make_plan(&c, 8, 0, 0, 4, path);
  assert_int_equal(epic_plan_load_balance(pl, -1, &b), EPIC_OK);
  assert_int_equal(b.n_layers, 58);
  epic_plan_destroy(pl);
  unlink(path);
  free(path);
  free(json);
  /* Only some layers with statistics: the others keep the default placement. */
  json = skewed_stats(&c, 10, 12, 3);
  path = write_stats(json);
  pl = make_plan(&c, 8, 0, 1, 8, path);
  check_redundant_placement(pl, 8, 10, 12);
  assert_int_equal(epic_plan_load_balance(pl, -1, &b), EPIC_OK);
  assert_int_equal(b.n_layers, 3);
  epic_plan_destroy(pl);
  unlink(path);
  free(path);
  free(json);
}

/* Small sizes, every redundancy level up to full replication: invariants always hold
 * (exercises the LPT repair step). */
static void test_redundancy_small_sweep(void **state) {
  (void)state;
  epic_model_config base;
  load_fixture("tiny-fp8", &base);
  for (int E = 1; E <= 9; E++) {
    epic_model_config c = base;
    assert_int_equal(epic_config_override(&c, 0, E), EPIC_OK);
    for (int N = 1; N <= 6; N++) {
      for (unsigned seed = 1; seed <= 3; seed++) {
        char *json = skewed_stats(&c, 1, 3, seed);
        char *path = write_stats(json);
        for (int R = 0; R <= E * (N - 1); R++) {
          epic_plan *pl = make_plan(&c, N, 0, 1, R, path);
          check_redundant_placement(pl, R, 1, 3);
          epic_plan_balance b;
          assert_int_equal(epic_plan_load_balance(pl, -1, &b), EPIC_OK);
          assert_int_equal(b.n_layers, 3);
          epic_plan_destroy(pl);
        }
        unlink(path);
        free(path);
        free(json);
      }
    }
  }
}

/* In-memory statistics (a running engine's), both policies, on skewed counts:
 * the max/mean rank load drops, every expert keeps a copy, no rank exceeds its
 * slots; hierarchical keeps every group on one node with n_group / nodes groups per
 * node, and the copies of an expert on its group's node. */
static void test_in_memory_policies(void **state) {
  (void)state;
  epic_model_config c;
  load_671b(&c);
  const int E = (int)c.n_routed_experts, L = (int)c.num_hidden_layers + 1;
  double *counts = calloc((size_t)(L * E), sizeof(double));
  assert_non_null(counts);
  for (int l = 3; l < L; l++)
    for (int e = 0; e < E; e++) /* Zipf-like over a per-layer order */
      counts[l * E + e] = 1e5 / (1 + ((e * 37 + l * 11) % E));
  const struct {
    int N, R, rpn;
    epic_eplb_policy pol;
  } cases[] = {{16, 32, 0, EPIC_EPLB_GLOBAL}, {16, 32, 8, EPIC_EPLB_HIERARCHICAL},
               {32, 32, 8, EPIC_EPLB_HIERARCHICAL}, {8, 7, 4, EPIC_EPLB_HIERARCHICAL},
               {16, 0, 8, EPIC_EPLB_HIERARCHICAL}};
  for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
    const int N = cases[k].N, R = cases[k].R, rpn = cases[k].rpn;
    epic_plan_params p = {.size = sizeof p, .cfg = &c, .n_ranks = N, .include_mtp = 1,
                          .n_redundant = R, .load_counts = counts, .n_load_layers = L,
                          .policy = cases[k].pol, .ranks_per_node = rpn};
    epic_plan *pl = NULL;
    assert_int_equal(epic_plan_create(&p, &pl), EPIC_OK);
    if (cases[k].pol == EPIC_EPLB_GLOBAL) {
      check_redundant_placement(pl, R, 3, 61);
    } else {
      const int nn = N / rpn, G = (int)c.n_group, gs = E / G;
      const int cap = (E / nn + (R + nn - 1) / nn + rpn - 1) / rpn;
      for (int l = 3; l < L; l++) {
        int total = 0;
        for (int r = 0; r < N; r++) {
          const int32_t *ids;
          int n;
          assert_int_equal(epic_plan_rank_experts(pl, l, r, &ids, &n), EPIC_OK);
          assert_true(n <= cap);
          total += n;
        }
        assert_int_equal(total, E + R);
        int *per_node = calloc((size_t)nn, sizeof(int));
        for (int g = 0; g < G; g++) {
          int node = -1;
          for (int e = g * gs; e < (g + 1) * gs; e++) {
            const int32_t *ranks;
            int no;
            assert_int_equal(epic_plan_expert_owners(pl, l, e, &ranks, &no), EPIC_OK);
            assert_true(no >= 1);
            for (int i = 0; i < no; i++) {
              if (node < 0)
                node = ranks[i] / rpn;
              assert_int_equal(ranks[i] / rpn, node); /* the group stays on one node */
            }
          }
          per_node[node]++;
        }
        for (int n = 0; n < nn; n++)
          assert_int_equal(per_node[n], G / nn);
        free(per_node);
      }
    }
    epic_plan_balance b;
    assert_int_equal(epic_plan_load_balance(pl, -1, &b), EPIC_OK);
    assert_int_equal(b.n_layers, 59);
    assert_true(b.ratio_before > 1.2);
    assert_true(b.ratio_after < b.ratio_before);
    print_message("%s N %d R %d ranks/node %d: max/mean %.3f -> %.3f\n",
                  epic_eplb_policy_name(cases[k].pol), N, R, rpn, b.ratio_before, b.ratio_after);
    if (R >= N && cases[k].pol == EPIC_EPLB_GLOBAL)
      assert_true(b.ratio_after < 1.1);
    /* The same numbers from the replica lists (epic_eplb_load). */
    {
      const int l = 10;
      int32_t *off = calloc((size_t)E + 1, sizeof(int32_t)), *rk = calloc((size_t)(E * N), sizeof(int32_t));
      for (int e = 0; e < E; e++) {
        const int32_t *ranks;
        int no;
        assert_int_equal(epic_plan_expert_owners(pl, l, e, &ranks, &no), EPIC_OK);
        memcpy(rk + off[e], ranks, sizeof(int32_t) * (size_t)no);
        off[e + 1] = off[e] + no;
      }
      double mx, mn;
      epic_plan_balance bl;
      assert_int_equal(epic_eplb_load(N, E, counts + l * E, off, rk, &mx, &mn), EPIC_OK);
      assert_int_equal(epic_plan_load_balance(pl, l, &bl), EPIC_OK);
      assert_true(fabs(mx - bl.max_after) <= 1e-9 * mx && fabs(mn - bl.mean_after) <= 1e-9 * mn);
      off[1] = 0; /* expert 0 without a copy */
      assert_int_equal(epic_eplb_load(N, E, counts + l * E, off, rk, &mx, &mn), EPIC_ERR_INVALID);
      free(off);
      free(rk);
    }
    epic_plan_destroy(pl);
  }
  /* Bad hierarchical shapes and inputs. */
  epic_plan_params p = {.size = sizeof p, .cfg = &c, .n_ranks = 16, .n_redundant = 16,
                        .load_counts = counts, .n_load_layers = L,
                        .policy = EPIC_EPLB_HIERARCHICAL, .ranks_per_node = 3};
  epic_plan *pl = (epic_plan *)(uintptr_t)1;
  assert_int_equal(epic_plan_create(&p, &pl), EPIC_ERR_INVALID); /* 3 does not divide 16 */
  assert_null(pl);
  p.n_ranks = 48; /* 16 nodes: 8 groups do not split */
  assert_int_equal(epic_plan_create(&p, &pl), EPIC_ERR_INVALID);
  p.n_ranks = 16;
  p.ranks_per_node = 8;
  p.load_stats_path = "/nonexistent";
  assert_int_equal(epic_plan_create(&p, &pl), EPIC_ERR_INVALID); /* file and memory */
  p.load_stats_path = NULL;
  counts[5 * E + 3] = -1;
  assert_int_equal(epic_plan_create(&p, &pl), EPIC_ERR_INVALID);
  epic_eplb_policy pol;
  assert_int_equal(epic_eplb_policy_parse("hierarchical", &pol), EPIC_OK);
  assert_int_equal(pol, EPIC_EPLB_HIERARCHICAL);
  assert_int_equal(epic_eplb_policy_parse("lpt", &pol), EPIC_ERR_INVALID);
  free(counts);
}

/* ---- errors ---- */

static epic_status try_plan(const epic_model_config *c, int n, int red, const char *stats) {
  epic_plan_params p = {.size = sizeof p,
                        .cfg = c,
                        .n_ranks = n,
                        .include_mtp = 1,
                        .n_redundant = red,
                        .load_stats_path = stats};
  epic_plan *pl = (epic_plan *)(uintptr_t)1; /* create must reset it to NULL on failure */
  epic_status st = epic_plan_create(&p, &pl);
  if (st == EPIC_OK) {
    epic_plan_destroy(pl);
  } else {
    assert_null(pl);
  }
  return st;
}

static void test_bad_inputs(void **state) {
  (void)state;
  epic_model_config c;
  load_fixture("tiny-fp8", &c); /* 16 experts, MoE layers 1, 2 and MTP layer 3 */
  assert_int_equal(try_plan(&c, 0, 0, NULL), EPIC_ERR_INVALID);
  assert_int_equal(try_plan(&c, -3, 0, NULL), EPIC_ERR_INVALID);
  assert_int_equal(try_plan(NULL, 4, 0, NULL), EPIC_ERR_INVALID);
  assert_int_equal(try_plan(&c, 4, -1, NULL), EPIC_ERR_INVALID);
  assert_int_equal(try_plan(&c, 4, 2, NULL), EPIC_ERR_INVALID); /* redundancy without stats */
  assert_int_equal(try_plan(&c, 4, 0, "/nonexistent/stats.json"), EPIC_ERR_IO);
  {
    epic_plan_params p = {.size = sizeof p - 1, .cfg = &c, .n_ranks = 2};
    epic_plan *pl = NULL;
    assert_int_equal(epic_plan_create(&p, &pl), EPIC_ERR_INVALID);
    assert_null(pl);
  }
  const char *bad[] = {
      "not json",
      "[1, 2, 3]",
      "{}",
      "{\"layers\": [1, 2]}",
      "{\"layers\": {\"1\": [1, 2, 3]}}",                         /* length */
      "{\"layers\": {\"0\": [1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]}}", /* dense */
      "{\"layers\": {\"4\": [1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]}}", /* range */
      "{\"layers\": {\"x\": [1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]}}",
      "{\"layers\": {\"1\": [1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,-1]}}", /* negative */
      "{\"layers\": {\"1\": [1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,\"a\"]}}",
      "{\"layers\": {\"1\": [1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1], "
      "\"1\": [1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]}}", /* twice */
      "",
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    char *path = write_stats(bad[i]);
    assert_int_equal(try_plan(&c, 4, 2, path), EPIC_ERR_INVALID);
    assert_int_equal(try_plan(&c, 4, 0, path), EPIC_ERR_INVALID);
    unlink(path);
    free(path);
  }
  char *good = write_stats("{\"layers\": {\"2\": [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,160.5]}}");
  assert_int_equal(try_plan(&c, 4, 2, good), EPIC_OK);
  assert_int_equal(try_plan(&c, 4, 16 * 3, good), EPIC_OK);              /* full replication */
  assert_int_equal(try_plan(&c, 4, 16 * 3 + 1, good), EPIC_ERR_INVALID); /* more than that */
  assert_int_equal(try_plan(&c, 1, 1, good), EPIC_ERR_INVALID);
  unlink(good);
  free(good);
  epic_plan_destroy(NULL);
}

/* ---- run-time EPLB reserve ---- */

/* Per rank: every placement the engine's EPLB can choose with R copies (a plan from
 * load counts, as coordinator/eplb.c makes it), plus one layer's worth while
 * re-placing, fits in the default placement's experts plus the reserve. */
static void check_eplb_reserve(const epic_model_config *c, int N, int R, epic_eplb_policy pol,
                               int rpn) {
  const int E = (int)c->n_routed_experts, L = (int)c->num_hidden_layers + 1;
  const uint64_t mem = 141000000000ull;
  double *counts = calloc((size_t)(L * E), sizeof(double));
  assert_non_null(counts);
  for (int l = 0; l < L; l++) /* hot experts differ per layer, some groups hot */
    for (int e = 0; e < E; e++) counts[l * E + e] = 1e6 / (1 + ((e * 29 + l * 7) % E) * ((e % 5) + 1));
  epic_plan_params p = {.size = sizeof p, .cfg = c, .n_ranks = N, .include_mtp = 1,
                        .gpu_mem_bytes = mem, .policy = pol, .ranks_per_node = rpn};
  epic_plan *base = NULL, *res = NULL, *run = NULL;
  assert_int_equal(epic_plan_create(&p, &base), EPIC_OK);
  p.eplb_redundant = R;
  assert_int_equal(epic_plan_create(&p, &res), EPIC_OK);
  p.eplb_redundant = 0;
  p.n_redundant = R;
  p.load_counts = counts;
  p.n_load_layers = L;
  assert_int_equal(epic_plan_create(&p, &run), EPIC_OK);
  assert_int_equal(epic_plan_eplb_redundant(res), R);
  assert_int_equal(epic_plan_eplb_redundant(base), 0);
  assert_int_equal(epic_plan_eplb_layer_slots(base), 0);
  const int S = epic_plan_eplb_layer_slots(res);
  assert_true(S >= (E + R + N - 1) / N);
  for (int r = 0; r < N; r++) {
    epic_rank_memory mb, mr;
    int64_t held = 0, widest = 0;
    assert_int_equal(epic_plan_rank_memory(base, r, &mb), EPIC_OK);
    assert_int_equal(epic_plan_rank_memory(res, r, &mr), EPIC_OK);
    for (int l = 0; l < epic_plan_n_layers(run); l++) {
      const int32_t *ids;
      int n;
      assert_int_equal(epic_plan_rank_experts(run, l, r, &ids, &n), EPIC_OK);
      assert_true(n <= S);
      held += n;
      widest = n > widest ? n : widest;
    }
    assert_true(held + widest <= mr.expert_slots + mr.eplb_slots);
    /* The reserve comes out of the KV budget, nothing else changes. */
    assert_true(mb.eplb_slots == 0 && mb.eplb_bytes == 0);
    assert_true(mr.eplb_bytes == (uint64_t)mr.eplb_slots * epic_plan_weights(res)->expert);
    assert_true(mr.weight_bytes == mb.weight_bytes && mr.reserve_bytes == mb.reserve_bytes);
    assert_true(mr.kv_budget_bytes == mb.kv_budget_bytes - (int64_t)mr.eplb_bytes);
    assert_true(mr.eplb_slots > 0);
  }
  epic_plan_destroy(base);
  epic_plan_destroy(res);
  epic_plan_destroy(run);
  free(counts);
}

static void test_eplb_reserve(void **state) {
  (void)state;
  epic_model_config c, t;
  load_671b(&c);
  load_fixture("tiny-fp8", &t);
  check_eplb_reserve(&c, 8, 8, EPIC_EPLB_GLOBAL, 0);
  check_eplb_reserve(&c, 16, 16, EPIC_EPLB_GLOBAL, 0);
  check_eplb_reserve(&c, 16, 3, EPIC_EPLB_HIERARCHICAL, 8); /* 3 copies over 2 nodes */
  check_eplb_reserve(&c, 16, 32, EPIC_EPLB_HIERARCHICAL, 8);
  check_eplb_reserve(&t, 2, 2, EPIC_EPLB_GLOBAL, 0);
  check_eplb_reserve(&t, 3, 5, EPIC_EPLB_GLOBAL, 0); /* 16 experts do not split evenly */
  /* 8 ranks x 141 GB, 8 copies: 33 experts per layer at most, 60 layers' worth (58 MoE +
   * MTP + one while re-placing) against the 32 x 59 held: 92 experts of 44 MB. */
  epic_plan_params p = {.size = sizeof p, .cfg = &c, .n_ranks = 8, .include_mtp = 1,
                        .gpu_mem_bytes = 141000000000ull, .eplb_redundant = 8};
  epic_plan *pl = NULL;
  epic_rank_memory m;
  assert_int_equal(epic_plan_create(&p, &pl), EPIC_OK);
  assert_int_equal(epic_plan_eplb_layer_slots(pl), 33);
  assert_int_equal(epic_plan_rank_memory(pl, 0, &m), EPIC_OK);
  assert_int_equal(m.eplb_slots, 60 * 33 - 32 * 59);
  assert_true(epic_plan_fits(pl));
  /* A budget that fits without the copies and not with them. */
  const uint64_t need0 = m.weight_bytes + m.reserve_bytes +
                         (uint64_t)epic_plan_min_kv_tokens(pl) * epic_plan_kv_bytes_per_token(pl);
  epic_plan_destroy(pl);
  p.gpu_mem_bytes = need0 + m.eplb_bytes / 2;
  assert_int_equal(epic_plan_create(&p, &pl), EPIC_OK);
  assert_false(epic_plan_fits(pl));
  epic_plan_destroy(pl);
  p.eplb_redundant = 0;
  assert_int_equal(epic_plan_create(&p, &pl), EPIC_OK);
  assert_true(epic_plan_fits(pl));
  epic_plan_destroy(pl);
  /* Out of range: negative, more than E x (N - 1), any on one rank. */
  const int bad[][2] = {{8, -1}, {8, 256 * 7 + 1}, {1, 1}};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    epic_plan_params q = {.size = sizeof q, .cfg = &c, .n_ranks = bad[i][0],
                          .eplb_redundant = bad[i][1]};
    pl = (epic_plan *)(uintptr_t)1;
    assert_int_equal(epic_plan_create(&q, &pl), EPIC_ERR_INVALID);
    assert_null(pl);
  }
  /* The engine's copies: as asked, off, the default (CPU: one per rank; GPU: none). */
  assert_int_equal(epic_plan_eplb_copies(5, 256, 8, 0), 5);
  assert_int_equal(epic_plan_eplb_copies(-1, 256, 8, 1), 0);
  assert_int_equal(epic_plan_eplb_copies(0, 256, 8, 1), 8);
  assert_int_equal(epic_plan_eplb_copies(0, 256, 8, 0), 0);
  assert_int_equal(epic_plan_eplb_copies(0, 2, 8, 1), 8);
  assert_int_equal(epic_plan_eplb_copies(0, 1, 4, 1), 3); /* at most E x (N - 1) */
  assert_int_equal(epic_plan_eplb_copies(0, 256, 1, 1), 0);
  assert_int_equal(epic_plan_eplb_copies(4, 256, 1, 1), 0); /* one process: nothing to balance */
  assert_int_equal(epic_plan_eplb_copies(0, 0, 8, 1), 0);
}

/* ---- output ---- */

static void test_output(void **state) {
  (void)state;
  epic_model_config c;
  load_671b(&c);
  epic_plan *pl = make_plan(&c, 7, 141000000000ull, 1, 0, NULL);
  char *buf = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&buf, &len);
  assert_non_null(f);
  assert_int_equal(epic_plan_write_json(pl, f), EPIC_OK);
  fclose(f);
  cJSON *root = cJSON_ParseWithLength(buf, len);
  assert_non_null(root);
  const cJSON *w = cJSON_GetObjectItemCaseSensitive(root, "weights");
  assert_true(cJSON_GetObjectItemCaseSensitive(w, "total")->valuedouble == 688574839360.0);
  const cJSON *ranks = cJSON_GetObjectItemCaseSensitive(root, "ranks");
  assert_int_equal(cJSON_GetArraySize(ranks), 7);
  assert_true(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, "fits")));
  assert_int_equal(cJSON_GetObjectItemCaseSensitive(root, "eplb_redundant")->valueint, 0);
  assert_int_equal(
      cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(ranks, 0), "eplb_bytes")->valueint, 0);
  /* Placement groups cover the 59 MoE layers and, per group, every expert once. */
  const cJSON *groups = cJSON_GetObjectItemCaseSensitive(root, "placement"), *g;
  assert_true(cJSON_GetArraySize(groups) >= 1);
  cJSON_ArrayForEach(g, groups) {
    const cJSON *rr = cJSON_GetObjectItemCaseSensitive(g, "ranks");
    assert_int_equal(cJSON_GetArraySize(rr), 7);
    assert_true(cJSON_IsString(cJSON_GetObjectItemCaseSensitive(g, "layers")));
  }
  cJSON_Delete(root);
  free(buf);
  buf = NULL;
  f = open_memstream(&buf, &len);
  assert_non_null(f);
  assert_int_equal(epic_plan_write_table(pl, f), EPIC_OK);
  fclose(f);
  assert_non_null(strstr(buf, "FITS"));
  free(buf);
  epic_plan_destroy(pl);
}

int main(int argc, char **argv) {
  epic_log_init(EPIC_LOG_LEVEL_ERROR, -1);
  g_671b_dir = argc > 1 ? argv[1] : getenv("EPIC_PLAN_671B_DIR");
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_total_bytes_671b),  cmocka_unit_test(test_total_bytes_tiny),
      cmocka_unit_test(test_fit_671b),          cmocka_unit_test(test_placement_plain),
      cmocka_unit_test(test_redundancy_skewed), cmocka_unit_test(test_redundancy_small_sweep),
      cmocka_unit_test(test_bad_inputs),        cmocka_unit_test(test_output),
      cmocka_unit_test(test_in_memory_policies), cmocka_unit_test(test_eplb_reserve),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
