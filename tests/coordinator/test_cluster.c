/* epic_cluster: plan-driven expert placement, fit check before loading, bad
 * backend names, and (under mpirun) every rank holding exactly the experts the
 * plan gives it. Run directly for the single-process cases and under
 * `mpirun -np N` for the placement case. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

#include <cmocka.h>

#include "comm/comm.h"
#include "coordinator/cluster.h"
#include "coordinator/planner.h"
#include "tests/common/test_util.h"

static char g_model[1024];

static epic_cluster_params params(void) {
  epic_cluster_params p = {.size = sizeof p, .cmd = "test", .model_dir = g_model, .threads = 1};
  return p;
}

/* Every rank holds exactly the experts the plan lists for it, in every MoE layer. */
static void test_placement_follows_plan(void **state) {
  (void)state;
  epic_cluster_params p = params();
  epic_cluster *c = NULL;
  assert_int_equal(epic_cluster_open(&p, &c), EPIC_OK);
  const epic_plan *plan = epic_cluster_plan(c);
  const epic_model_config *cfg = epic_model_get_config(epic_cluster_model(c));
  assert_int_equal(epic_plan_n_ranks(plan), epic_cluster_size(c));
  for (int l = 0; l < (int)cfg->num_hidden_layers; l++) {
    const int32_t *ids;
    int n = 0;
    if (!epic_plan_is_moe_layer(plan, l)) continue;
    assert_int_equal(epic_plan_rank_experts(plan, l, epic_cluster_rank(c), &ids, &n), EPIC_OK);
    assert_int_equal(epic_model_local_experts(epic_cluster_model(c), l),
                     epic_cluster_size(c) > 1 ? n : cfg->n_routed_experts);
  }
  epic_cluster_close(c);
}

/* A memory limit that cannot hold the weights fails before the model is loaded. */
static void test_misfit_is_an_error(void **state) {
  (void)state;
  epic_cluster_params p = params();
  epic_cluster *c = (epic_cluster *)&p; /* must be reset to NULL */
  p.mem_per_rank = 1 << 20;
  assert_int_equal(epic_cluster_open(&p, &c), EPIC_ERR_INVALID);
  assert_null(c);
}

static void test_bad_backend_is_an_error(void **state) {
  (void)state;
  epic_cluster_params p = params();
  epic_cluster *c = NULL;
  p.comm = "carrier-pigeon";
  assert_int_not_equal(epic_cluster_open(&p, &c), EPIC_OK);
  assert_null(c);
}

/* The GPUs' default precision: invariant (2) exactly where auto MTP drafting has an MTP
 * layer to draft with, else fast (0); --precision's names parse to the same numbers and
 * back. */
static void test_default_precision(void **state) {
  (void)state;
  assert_int_equal(epic_cluster_default_precision(1, 1), 2);
  assert_int_equal(epic_cluster_default_precision(1, 0), 0);
  assert_int_equal(epic_cluster_default_precision(0, 1), 0);
  assert_int_equal(epic_cluster_default_precision(0, 0), 0);
  int fast = -1, inv = -1;
  assert_int_equal(epic_cluster_parse_precision("fast", &fast), EPIC_OK);
  assert_int_equal(epic_cluster_parse_precision("invariant", &inv), EPIC_OK);
  assert_int_equal(fast, epic_cluster_default_precision(0, 1));
  assert_int_equal(inv, epic_cluster_default_precision(1, 1));
  assert_string_equal(epic_cluster_precision_name(fast), "fast");
  assert_string_equal(epic_cluster_precision_name(inv), "invariant");
  assert_string_equal(epic_cluster_precision_name(3), "?");
}

int main(int argc, char **argv) {
  epic_test_path(g_model, sizeof g_model, "tiny-fp8");
  if (epic_cluster_under_launcher()) {
    /* Multi-rank: only the placement case (every rank must take part). */
    const struct CMUnitTest mpi_tests[] = {cmocka_unit_test(test_placement_follows_plan)};
    (void)argc;
    (void)argv;
    return cmocka_run_group_tests(mpi_tests, NULL, NULL);
  }
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_placement_follows_plan),
      cmocka_unit_test(test_misfit_is_an_error),
      cmocka_unit_test(test_bad_backend_is_an_error),
      cmocka_unit_test(test_default_precision),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
