/* MTP speculative decoding (worker/spec.h) on the fixtures:
 *  - the rejection rule reproduces the target distribution (quadrature over the
 *    two uniforms, synthetic p and q), and epic_spec_probs is the sampler's;
 *  - greedy output with k = 1, 2 equals plain greedy for every case of both
 *    fixtures with pages of 3 and 64 tokens and chunked prefill, the caches end
 *    with the same rows, and every page is returned;
 *  - commits of any prefix (rollback across page boundaries) leave the main
 *    cache equal to a full recompute and the MTP cache giving the drafts a
 *    from-scratch MTP pass gives (acceptance counts predicted exactly);
 *  - sampled (t1, t2) pairs with speculation follow the model's distribution;
 *  - drafts 2..k are the MTP layer applied to its own block output: the spec's
 *    drafts equal a manual recursion through epic_model_mtp_forward, whose
 *    mtp_out is the state that shared_head.norm and the head turn into the MTP
 *    logits (bit for bit on the CPU backend). */
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

#include "common/log.h"
#include "tests/common/dev_ops.h"
#include "tests/common/test_util.h"
#include "worker/checkpoint.h"
#include "worker/generate.h"
#include "worker/model.h"
#include "worker/sampler.h"
#include "worker/spec.h"

#define MAX_CASES 16

/* "quick" (sanitizer builds): fewer sampling seeds, no EOS variant, page size 3 and
 * prompts of at most 64 tokens in the greedy comparison. */
static int g_quick;

typedef struct tcase {
  char name[64];
  int32_t *prompt;
  int64_t n_prompt, n_gen;
} tcase;

typedef struct fixture {
  const char *model;
  epic_ops *ops;
  epic_model *m;
  tcase cases[MAX_CASES];
  int n_cases;
  int64_t V, D;
} fixture;

static int setup(void **state, const char *model) {
  fixture *f = calloc(1, sizeof *f);
  char dir[1024];
  epic_model_params mp = {.size = sizeof mp, .load_mtp = 1};
  epic_log_init(EPIC_LOG_LEVEL_WARN, -1);
  f->model = model;
  mp.dir = epic_test_path(dir, sizeof dir, model);
  if (epic_ops_cpu_create(0, &f->ops) != EPIC_OK) return -1;
  if (epic_model_load(f->ops, &mp, &f->m) != EPIC_OK) return -1;
  f->V = epic_model_get_config(f->m)->vocab_size;
  f->D = epic_model_get_config(f->m)->hidden_size;
  epic_test_case tc[MAX_CASES];
  const int n = epic_test_load_cases(model, tc, MAX_CASES);
  if (n < 0) return -1;
  for (int i = 0; i < n; i++) {
    tcase *c = &f->cases[f->n_cases++];
    memcpy(c->name, tc[i].name, sizeof c->name); /* both char[64] */
    c->prompt = tc[i].prompt; /* owned by the case now (freed in teardown) */
    c->n_prompt = tc[i].n_prompt;
    c->n_gen = tc[i].n_gen;
    free(tc[i].gen);
  }
  *state = f;
  return 0;
}

static int setup_bf16(void **state) { return setup(state, "tiny-bf16"); }
static int setup_fp8(void **state) { return setup(state, "tiny-fp8"); }

static int teardown(void **state) {
  fixture *f = *state;
  for (int i = 0; i < f->n_cases; i++) free(f->cases[i].prompt);
  epic_model_destroy(f->m);
  epic_ops_destroy(f->ops);
  free(f);
  return 0;
}

/* ------------------------------------------------------------ rule and probs */

/* P(output = x) of the rule, integrated over (u_accept, u_resample) on an
 * n_grid^2 midpoint grid and over d ~ q; must equal p up to the grid's O(1/n_grid). */
static void check_rule(const float *p, const float *q, int64_t n) {
  enum { G = 300 };
  double got[8] = {0};
  for (int32_t d = 0; d < n; d++) {
    if (q[d] <= 0) continue;
    for (int a = 0; a < G; a++)
      for (int b = 0; b < G; b++) {
        int acc;
        int32_t x = epic_spec_accept(p, q, n, d, (a + 0.5) / G, (b + 0.5) / G, &acc);
        assert_true(x >= 0 && x < n);
        if (acc) assert_int_equal(x, d);
        got[x] += (double)q[d] / ((double)G * G);
      }
  }
  for (int64_t x = 0; x < n; x++) {
    if (fabs(got[x] - p[x]) > 4.0 / G) fail_msg("token %lld: rule gives %.5f, target %.5f", (long long)x, got[x], (double)p[x]);
    if (p[x] == 0) assert_true(got[x] == 0);
  }
}

static void test_accept_rule(void **state) {
  (void)state;
  const float p1[6] = {0.4f, 0.3f, 0.2f, 0.1f, 0, 0}, q1[6] = {0.1f, 0.1f, 0.2f, 0.3f, 0.3f, 0};
  const float p2[6] = {0, 0, 0.5f, 0.5f, 0, 0}, q2[6] = {0.25f, 0.25f, 0.25f, 0.25f, 0, 0};
  const float p3[6] = {0.2f, 0.2f, 0.2f, 0.2f, 0.2f, 0}, q3[6] = {0, 0, 0, 0, 0, 1};
  const float p4[6] = {0.5f, 0.25f, 0.125f, 0.125f, 0, 0};
  check_rule(p1, q1, 6);
  check_rule(p2, q2, 6);
  check_rule(p3, q3, 6); /* draft never right: always the residual, which is p */
  check_rule(p4, p4, 6); /* draft == target: always accepted */
  for (int a = 0; a < 50; a++) {
    int acc = 0;
    assert_int_equal(epic_spec_accept(p4, p4, 6, 2, (a + 0.5) / 50, 0.5, &acc), 2);
    assert_int_equal(acc, 1);
  }
}

/* epic_spec_probs against the sampler's own draws (4000 of one seeded sampler). */
static void test_probs_match_sampler(void **state) {
  (void)state;
  enum { N = 40, DRAWS = 4000 };
  float logits[N], probs[N];
  int32_t idx[N];
  const epic_sampling_params sps[3] = {
      {.size = sizeof(epic_sampling_params), .temperature = 0.7f, .top_p = 1.0f, .top_k = 0, .seed = 3},
      {.size = sizeof(epic_sampling_params), .temperature = 1.3f, .top_p = 1.0f, .top_k = 5, .seed = 4},
      {.size = sizeof(epic_sampling_params), .temperature = 0.9f, .top_p = 0.8f, .top_k = 12, .seed = 5}};
  uint64_t x = 99;
  for (int i = 0; i < N; i++) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    logits[i] = (float)((x >> 40) % 1000) / 250.0f;
  }
  logits[7] = logits[8]; /* a tie */
  for (int s = 0; s < 3; s++) {
    epic_sampler *smp;
    int cnt[N] = {0};
    double tot = 0;
    epic_spec_probs(logits, N, &sps[s], idx, probs);
    for (int i = 0; i < N; i++) tot += probs[i];
    assert_true(fabs(tot - 1) < 1e-5);
    assert_int_equal(epic_sampler_create(&sps[s], &smp), EPIC_OK);
    for (int d = 0; d < DRAWS; d++) cnt[epic_sampler_sample(smp, logits, N, NULL)]++;
    epic_sampler_destroy(smp);
    for (int i = 0; i < N; i++) {
      double f = (double)cnt[i] / DRAWS, pr = probs[i];
      if (pr == 0) {
        if (cnt[i]) fail_msg("params %d: token %d drawn by the sampler but has probability 0", s, i);
        continue;
      }
      if (fabs(f - pr) > 5 * sqrt(pr * (1 - pr) / DRAWS) + 1e-3)
        fail_msg("params %d: token %d: sampler %.4f, spec probs %.4f", s, i, f, pr);
    }
  }
}

/* ------------------------------------------------------------------ greedy */

static void run_gen(fixture *f, const tcase *c, int64_t page, int64_t chunk, int64_t k, int ignore_eos,
                    epic_generate_result *r) {
  epic_kvcache *kc, *km;
  const int64_t pages = (c->n_prompt + c->n_gen + page - 1) / page + 1;
  assert_int_equal(epic_model_kvcache_create(f->m, 0, page, pages, &kc), EPIC_OK);
  assert_int_equal(epic_model_kvcache_create(f->m, 1, page, pages, &km), EPIC_OK);
  epic_generate_params gp = {.size = sizeof gp,
                             .prompt = c->prompt,
                             .n_prompt = c->n_prompt,
                             .max_new_tokens = c->n_gen,
                             .sampling = {.size = sizeof(epic_sampling_params), .top_p = 1},
                             .ignore_eos = ignore_eos,
                             .prefill_chunk = chunk,
                             .mtp_draft = k};
  assert_int_equal(epic_generate(f->m, kc, km, &gp, r), EPIC_OK);
  /* Every page is back: nothing leaked by the rollbacks. */
  assert_int_equal(epic_kvcache_free_pages(kc), epic_kvcache_total_pages(kc));
  assert_int_equal(epic_kvcache_free_pages(km), epic_kvcache_total_pages(km));
  epic_kvcache_destroy(kc);
  epic_kvcache_destroy(km);
}

static void test_greedy_identical(void **state) {
  fixture *f = *state;
  static const int64_t pages[2] = {3, 64};
  int64_t drafted = 0, accepted = 0;
  for (int i = 0; i < f->n_cases; i++) {
    const tcase *c = &f->cases[i];
    for (int pi = 0; pi < 2; pi++) {
      for (int eos = 0; eos < 2; eos++) {
        const int ignore_eos = !eos;
        const int64_t chunk = pi == 0 ? 5 : 0; /* small pages with chunked prefill */
        epic_generate_result plain, spec;
        if (eos && (pi == 0 || g_quick)) continue;
        /* Sanitizer builds: the page-boundary variant and the shorter prompts only. */
        if (g_quick && (pi == 1 || c->n_prompt > 64)) continue;
        run_gen(f, c, pages[pi], chunk, 0, ignore_eos, &plain);
        for (int64_t k = 1; k <= 2; k++) {
          run_gen(f, c, pages[pi], chunk, k, ignore_eos, &spec);
          if (spec.n_ids != plain.n_ids || memcmp(spec.ids, plain.ids, (size_t)plain.n_ids * sizeof(int32_t)))
            fail_msg("%s %s page %lld k %lld: speculative output differs from plain", f->model, c->name,
                     (long long)pages[pi], (long long)k);
          assert_int_equal(spec.finish, plain.finish);
          assert_int_equal(spec.kv_tokens, plain.kv_tokens);
          assert_int_equal(plain.kv_tokens, c->n_prompt + plain.n_ids - (plain.n_ids > 0));
          assert_true(spec.mtp_kv_tokens <= spec.kv_tokens);
          assert_true(spec.mtp_accepted <= spec.mtp_drafted);
          assert_true(spec.mtp_drafted <= k * spec.mtp_rounds);
          drafted += spec.mtp_drafted;
          accepted += spec.mtp_accepted;
          free(spec.ids);
        }
        free(plain.ids);
      }
    }
    print_message("%s %s: greedy output identical with k = 1, 2\n", f->model, c->name);
  }
  print_message("%s: %lld of %lld drafts accepted\n", f->model, (long long)accepted, (long long)drafted);
}

/* The same on a model that takes the device backends' host-side paths
 * (tests/common/dev_ops.h): verify steps of k + 1 rows planned on the backend, hidden
 * rows read back for the MTP layer, rollbacks; small pages and chunked prefill. */
static void test_greedy_identical_device_paths(void **state) {
  fixture *f = *state;
  char dir[1024];
  epic_test_dev_ops dev = {0};
  assert_int_equal(epic_test_dev_ops_open(&dev), EPIC_OK);
  epic_model_params mp = {.size = sizeof mp, .load_mtp = 1};
  mp.dir = epic_test_path(dir, sizeof dir, f->model);
  epic_model *cpu = f->m, *dm = NULL;
  assert_int_equal(epic_model_load(dev.ops, &mp, &dm), EPIC_OK);
  f->m = dm; /* run_gen's model */
  for (int i = 0; i < f->n_cases; i++) {
    const tcase *c = &f->cases[i];
    if (g_quick && c->n_prompt > 64) continue;
    epic_generate_result plain, spec;
    run_gen(f, c, 3, 5, 0, 1, &plain);
    for (int64_t k = 1; k <= 2; k++) {
      run_gen(f, c, 3, 5, k, 1, &spec);
      if (spec.n_ids != plain.n_ids ||
          memcmp(spec.ids, plain.ids, (size_t)plain.n_ids * sizeof(int32_t)))
        fail_msg("%s %s k %lld (device paths): speculative output differs from plain", f->model,
                 c->name, (long long)k);
      assert_int_equal(spec.kv_tokens, plain.kv_tokens);
      assert_true(spec.mtp_rounds > 0);
      free(spec.ids);
    }
    free(plain.ids);
  }
  f->m = cpu;
  epic_model_destroy(dm);
  epic_test_dev_ops_close(&dev);
  print_message("%s: device paths: greedy output identical with k = 1, 2\n", f->model);
}

/* -------------------------------------------------------------- rollback */

/* Drives the spec API with commits of pseudo-random prefixes on 3-token pages;
 * the main cache must then equal a full recompute of the kept sequence. Greedy:
 * the kept tokens are the greedy continuation. Sampling at temperature 5
 * (nearly flat distributions): many drafts are accepted, so multi-token rounds
 * are cut at every offset. The verify logits rows of the kept tokens
 * (epic_spec_verify_logits) must be the recompute's rows for their positions.
 * Returns accepted drafts. */
static int64_t partial_commits(fixture *f, const tcase *c, int64_t N, float temperature, int32_t *all,
                               float *logits, float *hidden) {
  const int64_t T = c->n_prompt, V = f->V;
  epic_kvcache *kc, *km;
  epic_kv_seq seq = {0}, full = {0};
  epic_spec *sp;
  epic_spec_stats st;
  int32_t out[8];
  float *one = malloc((size_t)V * sizeof(float));
  float *vrows = malloc((size_t)(N * V) * sizeof(float)); /* row q - T: position q's logits */
  int64_t g, n_out;
  uint64_t x = 12345;
  assert_int_equal(epic_model_kvcache_create(f->m, 0, 3, 64, &kc), EPIC_OK);
  assert_int_equal(epic_model_kvcache_create(f->m, 1, 3, 64, &km), EPIC_OK);
  epic_spec_params spp = {.size = sizeof spp,
                          .n_draft = 3,
                          .sampling = {.size = sizeof(epic_sampling_params), .temperature = temperature,
                                       .top_p = 1, .seed = 77}};
  assert_int_equal(epic_spec_create(f->m, kc, km, &spp, &sp), EPIC_OK);
  memcpy(all, c->prompt, (size_t)T * sizeof *all);
  epic_seq_batch b = {.tokens = all, .n_tokens = T, .kv = &seq, .all_logits = 1};
  assert_int_equal(epic_model_forward(f->m, kc, &b, 1, logits, hidden), EPIC_OK);
  assert_int_equal(epic_spec_observe(sp, hidden, T, all + 1, T - 1), EPIC_OK);
  all[T] = epic_argmax(logits + (T - 1) * V, V);
  g = 1;
  while (g < N) {
    assert_int_equal(epic_spec_draft_verify(sp, &seq, all[T + g - 1], N - g, out, NULL, &n_out), EPIC_OK);
    assert_true(n_out >= 1 && n_out <= 4);
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    int64_t keep = 1 + (int64_t)((x >> 33) % (uint64_t)n_out);
    memcpy(all + T + g, out, (size_t)keep * sizeof *out);
    /* verify row j fed position T + g - 1 + j */
    memcpy(vrows + (g - 1) * V, epic_spec_verify_logits(sp), (size_t)(keep * V) * sizeof(float));
    g += keep;
    assert_int_equal(epic_spec_commit(sp, &seq, keep), EPIC_OK);
    assert_int_equal(seq.n_tokens, T + g - 1);
    assert_true(epic_spec_mtp_tokens(sp) <= seq.n_tokens);
  }
  epic_seq_batch b1 = {.tokens = all + T + N - 1, .n_tokens = 1, .start = seq.n_tokens, .kv = &seq};
  assert_int_equal(epic_model_forward(f->m, kc, &b1, 1, one, NULL), EPIC_OK);
  epic_seq_batch bf = {.tokens = all, .n_tokens = T + N, .kv = &full, .all_logits = 1};
  assert_int_equal(epic_model_forward(f->m, kc, &bf, 1, logits, hidden), EPIC_OK);
  if (temperature == 0)
    for (int64_t p = T - 1; p < T + N - 1; p++) assert_int_equal(all[p + 1], epic_argmax(logits + p * V, V));
  double d = 0, dv = 0;
  for (int64_t v = 0; v < V; v++) d = fmax(d, fabs((double)one[v] - logits[(T + N - 1) * V + v]));
  for (int64_t q = T; q < T + N - 1; q++)
    for (int64_t v = 0; v < V; v++)
      dv = fmax(dv, fabs((double)vrows[(q - T) * V + v] - logits[q * V + v]));
  epic_spec_get_stats(sp, &st);
  print_message("%s T=%g: after partial commits (%lld of %lld drafts accepted), next-token logits vs "
                "recompute max |d| %.3g, kept verify rows vs recompute %.3g\n", f->model,
                (double)temperature, (long long)st.accepted, (long long)st.drafted, d, dv);
  assert_true(d < 1e-3);
  assert_true(dv < 1e-3);
  epic_spec_destroy(sp);
  epic_kvcache_seq_release(kc, &seq);
  epic_kvcache_seq_release(kc, &full);
  epic_kvcache_destroy(kc);
  epic_kvcache_destroy(km);
  free(one);
  free(vrows);
  return st.accepted;
}

/* Rollback: partial commits greedy and sampled; then the MTP cache through the
 * acceptance counts a from-scratch MTP pass predicts. */
static void test_rollback(void **state) {
  fixture *f = *state;
  const tcase *c = &f->cases[2 < f->n_cases ? 2 : 0]; /* 17-token prompt */
  const int64_t N = 24, T = c->n_prompt, V = f->V, D = f->D;
  epic_kvcache *km;
  epic_kv_seq sm = {0};
  int32_t *all = malloc((size_t)(T + N) * sizeof *all);
  float *logits = malloc((size_t)((T + N) * V) * sizeof(float));
  float *hidden = malloc((size_t)((T + N) * D) * sizeof(float));
  int64_t g, exp_rounds = 0, exp_acc = 0;
  assert_true(partial_commits(f, c, N, 5.0f, all, logits, hidden) > 0);
  partial_commits(f, c, N, 0.0f, all, logits, hidden); /* leaves the greedy sequence's hidden rows */

  /* MTP cache: with k = 1 and whole commits, round r accepts exactly when the
   * from-scratch MTP row at the position before `last` predicts the next token. */
  epic_generate_result r;
  assert_int_equal(epic_model_kvcache_create(f->m, 1, 3, 64, &km), EPIC_OK);
  float *mlog = malloc((size_t)((T + N) * V) * sizeof(float));
  epic_seq_batch bm = {.tokens = all + 1, .n_tokens = T + N - 1, .kv = &sm, .all_logits = 1, .hidden = hidden};
  assert_int_equal(epic_model_mtp_forward(f->m, km, &bm, 1, mlog), EPIC_OK);
  epic_kvcache_seq_release(km, &sm);
  for (g = 1; g < N;) {
    const int64_t n = T + g - 1; /* position of `last` */
    if (N - g < 2) {             /* no room for a draft: a plain step */
      g++;
      continue;
    }
    exp_rounds++;
    if (epic_argmax(mlog + (n - 1) * V, V) == all[n + 1]) {
      exp_acc++;
      g += 2;
    } else {
      g += 1;
    }
  }
  tcase cc = *c;
  cc.n_gen = N;
  for (int pi = 0; pi < 2; pi++) {
    run_gen(f, &cc, pi ? 64 : 3, pi ? 0 : 4, 1, 1, &r);
    assert_memory_equal(r.ids, all + T, (size_t)N * sizeof(int32_t));
    print_message("%s: k = 1: %lld rounds, %lld accepted (predicted %lld, %lld)\n", f->model,
                  (long long)r.mtp_rounds, (long long)r.mtp_accepted, (long long)exp_rounds, (long long)exp_acc);
    assert_int_equal(r.mtp_rounds, exp_rounds);
    assert_int_equal(r.mtp_accepted, exp_acc);
    free(r.ids);
  }
  free(mlog);
  epic_kvcache_destroy(km);
  free(all);
  free(logits);
  free(hidden);
}

/* ------------------------------------------------------------ recursion */

/* The MTP logits from a block output z [D]: shared_head.norm and shared_head.head
 * of the checkpoint, through the same backend calls as the model's final step. */
static void head_of(fixture *f, epic_checkpoint *ck, const float *z, float *logits) {
  const epic_model_config *c = epic_model_get_config(f->m);
  const int64_t L = c->num_hidden_layers, D = f->D, V = f->V;
  char name[128];
  float *w = malloc((size_t)D * sizeof *w), *zn = malloc((size_t)D * sizeof *zn);
  epic_weight head;
  snprintf(name, sizeof name, "model.layers.%lld.shared_head.norm.weight", (long long)L);
  assert_int_equal(epic_checkpoint_vector(ck, name, D, w), EPIC_OK);
  snprintf(name, sizeof name, "model.layers.%lld.shared_head.head.weight", (long long)L);
  assert_int_equal(epic_checkpoint_weight(ck, name, V, D, &head), EPIC_OK);
  assert_int_equal(f->ops->vt->rmsnorm(f->ops, z, D, 1, D, w, (float)c->rms_norm_eps, zn, D), EPIC_OK);
  assert_int_equal(f->ops->vt->matmul(f->ops, zn, D, 1, &head, logits, V), EPIC_OK);
  free(w);
  free(zn);
}

/* k = 3 greedy drafts after a prompt, through the phase API, against the
 * recursion done by hand: pair (h_{T-1}, last) -> z_1, d_1; (z_1, d_1) -> z_2,
 * d_2; (z_2, d_2) -> d_3, on a fresh MTP cache fed the same chunks. */
static void test_draft_recursion(void **state) {
  fixture *f = *state;
  enum { K = 3 };
  const tcase *c = &f->cases[2 < f->n_cases ? 2 : 0];
  const int64_t T = c->n_prompt, V = f->V, D = f->D;
  char dir[1024];
  epic_checkpoint *ck;
  epic_kvcache *kc, *km, *km2;
  epic_kv_seq seq = {0}, sm = {0};
  epic_spec *sp;
  float *logits = malloc((size_t)(T * V) * sizeof(float)), *hidden = malloc((size_t)(T * D) * sizeof(float));
  float *ml = malloc((size_t)V * sizeof(float)), *hl = malloc((size_t)V * sizeof(float));
  float *z = malloc((size_t)(K * D) * sizeof(float)), *sl = malloc((size_t)(K * V) * sizeof(float));
  int32_t *toks = malloc((size_t)(T + K) * sizeof(int32_t)), d[K];
  int64_t nd = 0;
  assert_int_equal(epic_checkpoint_open(epic_test_path(dir, sizeof dir, f->model), &ck), EPIC_OK);
  assert_int_equal(epic_model_kvcache_create(f->m, 0, 4, 64, &kc), EPIC_OK);
  assert_int_equal(epic_model_kvcache_create(f->m, 1, 4, 64, &km), EPIC_OK);
  assert_int_equal(epic_model_kvcache_create(f->m, 1, 4, 64, &km2), EPIC_OK);
  memcpy(toks, c->prompt, (size_t)T * sizeof *toks);
  epic_seq_batch b = {.tokens = toks, .n_tokens = T, .kv = &seq, .all_logits = 1};
  assert_int_equal(epic_model_forward(f->m, kc, &b, 1, logits, hidden), EPIC_OK);
  toks[T] = epic_argmax(logits + (T - 1) * V, V); /* `last` */

  /* The spec: prompt pairs at observe (MTP call on T - 1 pairs), then a round's
   * MTP calls with the last pair and K drafts. */
  epic_spec_params spp = {.size = sizeof spp, .n_draft = K,
                          .sampling = {.size = sizeof(epic_sampling_params), .top_p = 1}};
  assert_int_equal(epic_spec_create(f->m, kc, km, &spp, &sp), EPIC_OK);
  assert_int_equal(epic_spec_observe(sp, hidden, T, toks + 1, T - 1), EPIC_OK);
  assert_int_equal(epic_spec_feed_next(sp, toks[T]), EPIC_OK);
  assert_int_equal(epic_spec_set_drafts(sp, K), EPIC_OK);
  for (int64_t call = 0; call < K; call++) {
    epic_seq_batch mb;
    assert_int_equal(epic_spec_mtp_input(sp, call, &mb), 1);
    assert_true((mb.mtp_out != NULL) == (call + 1 < K)); /* the last call's output is not needed */
    assert_int_equal(epic_model_mtp_forward(f->m, km, &mb, 1, sl + call * V), EPIC_OK);
    epic_spec_mtp_output(sp, call, sl + call * V);
  }
  const int32_t *sd = epic_spec_drafts(sp, &nd);
  assert_int_equal(nd, K);

  /* By hand, same chunks on a fresh MTP cache. */
  epic_seq_batch m0 = {.tokens = toks + 1, .n_tokens = T - 1, .kv = &sm, .hidden = hidden};
  assert_int_equal(epic_model_mtp_forward(f->m, km2, &m0, 1, ml), EPIC_OK);
  for (int j = 0; j < K; j++) {
    /* j = 0: (h_{T-1}, last) at position T - 1; j > 0: (z_j, d_j) at T - 1 + j. */
    epic_seq_batch mj = {.tokens = j ? &d[j - 1] : &toks[T], .n_tokens = 1, .start = sm.n_tokens,
                         .kv = &sm, .hidden = j ? z + (j - 1) * D : hidden + (T - 1) * D,
                         .mtp_out = z + j * D};
    assert_int_equal(epic_model_mtp_forward(f->m, km2, &mj, 1, ml), EPIC_OK);
    d[j] = epic_argmax(ml, V);
    assert_memory_equal(sl + j * V, ml, (size_t)V * sizeof(float)); /* the spec's call j */
    /* mtp_out is the block output before shared_head.norm: norm + head give the logits. */
    head_of(f, ck, z + j * D, hl);
    assert_memory_equal(hl, ml, (size_t)V * sizeof(float));
    if (j == 1) {
      /* Pairing d_1 with the main model's state instead (the pre-recursion rule)
       * gives other logits: the recursion is what the drafts see. */
      epic_kv_seq alt = {0};
      float *al = malloc((size_t)V * sizeof(float));
      epic_kvcache *ka;
      double dmax = 0;
      assert_int_equal(epic_model_kvcache_create(f->m, 1, 4, 64, &ka), EPIC_OK);
      epic_seq_batch a0 = {.tokens = toks + 1, .n_tokens = T, .kv = &alt, .hidden = hidden};
      assert_int_equal(epic_model_mtp_forward(f->m, ka, &a0, 1, al), EPIC_OK);
      epic_seq_batch a1 = {.tokens = &d[0], .n_tokens = 1, .start = T, .kv = &alt,
                           .hidden = hidden + (T - 1) * D};
      assert_int_equal(epic_model_mtp_forward(f->m, ka, &a1, 1, al), EPIC_OK);
      for (int64_t v = 0; v < V; v++) dmax = fmax(dmax, fabs((double)al[v] - ml[v]));
      assert_true(dmax > 1e-3);
      epic_kvcache_seq_release(ka, &alt);
      epic_kvcache_destroy(ka);
      free(al);
    }
  }
  assert_memory_equal(sd, d, sizeof d);
  print_message("%s: drafts %d %d %d = the MTP recursion\n", f->model, (int)d[0], (int)d[1], (int)d[2]);
  epic_spec_destroy(sp);
  epic_kvcache_seq_release(kc, &seq);
  epic_kvcache_seq_release(km2, &sm);
  epic_kvcache_destroy(kc);
  epic_kvcache_destroy(km);
  epic_kvcache_destroy(km2);
  epic_checkpoint_close(ck);
  free(logits);
  free(hidden);
  free(ml);
  free(hl);
  free(z);
  free(sl);
  free(toks);
}

/* ------------------------------------------------------------- sampling */

/* (t1, t2) with speculation (k = 1 and 2) over many seeds against the model's
 * exact distribution p(t1) p(t2 | t1) under temperature 1, top-k 3. */
static void test_sampling_distribution(void **state) {
  fixture *f = *state;
  enum { K = 3 };
  const int SEEDS = g_quick ? 40 : 200;
  if (g_quick && strcmp(f->model, "tiny-fp8") == 0) skip(); /* same code path as tiny-bf16 */
  const tcase *c = &f->cases[1 < f->n_cases ? 1 : 0];
  const int64_t T = c->n_prompt, V = f->V;
  const epic_sampling_params sps = {.size = sizeof sps, .temperature = 1.0f, .top_p = 1.0f, .top_k = K};
  float *logits = malloc((size_t)V * sizeof(float)), *p1 = malloc((size_t)V * sizeof(float));
  float *p2 = malloc((size_t)V * sizeof(float));
  int32_t *idx = malloc((size_t)V * sizeof(int32_t)), *ids = malloc((size_t)(T + 1) * sizeof(int32_t));
  double *joint = calloc((size_t)(V * V), sizeof(double));
  epic_kvcache *kc;
  assert_int_equal(epic_model_kvcache_create(f->m, 0, 16, 16, &kc), EPIC_OK);
  memcpy(ids, c->prompt, (size_t)T * sizeof *ids);
  {
    epic_kv_seq s = {0};
    epic_seq_batch b = {.tokens = ids, .n_tokens = T, .kv = &s};
    assert_int_equal(epic_model_forward(f->m, kc, &b, 1, logits, NULL), EPIC_OK);
    epic_kvcache_seq_release(kc, &s);
    epic_spec_probs(logits, V, &sps, idx, p1);
  }
  for (int64_t t1 = 0; t1 < V; t1++) {
    if (p1[t1] == 0) continue;
    epic_kv_seq s = {0};
    ids[T] = (int32_t)t1;
    epic_seq_batch b = {.tokens = ids, .n_tokens = T + 1, .kv = &s};
    assert_int_equal(epic_model_forward(f->m, kc, &b, 1, logits, NULL), EPIC_OK);
    epic_kvcache_seq_release(kc, &s);
    epic_spec_probs(logits, V, &sps, idx, p2);
    for (int64_t t2 = 0; t2 < V; t2++) joint[t1 * V + t2] = (double)p1[t1] * p2[t2];
  }
  epic_kvcache_destroy(kc);
  for (int64_t k = 1; k <= 2; k++) {
    int *cnt = calloc((size_t)(V * V), sizeof(int));
    int64_t drafted = 0, accepted = 0;
    for (int seed = 0; seed < SEEDS; seed++) {
      epic_kvcache *k0, *k1;
      epic_generate_result r;
      assert_int_equal(epic_model_kvcache_create(f->m, 0, 4, 8, &k0), EPIC_OK);
      assert_int_equal(epic_model_kvcache_create(f->m, 1, 4, 8, &k1), EPIC_OK);
      epic_generate_params gp = {.size = sizeof gp, .prompt = c->prompt, .n_prompt = T, .max_new_tokens = 2 + k,
                                 .sampling = sps, .ignore_eos = 1, .mtp_draft = k};
      gp.sampling.seed = (uint64_t)seed * 7919u + 1;
      assert_int_equal(epic_generate(f->m, k0, k1, &gp, &r), EPIC_OK);
      assert_int_equal(r.n_ids, 2 + k);
      cnt[r.ids[0] * V + r.ids[1]]++;
      drafted += r.mtp_drafted;
      accepted += r.mtp_accepted;
      free(r.ids);
      epic_kvcache_destroy(k0);
      epic_kvcache_destroy(k1);
    }
    for (int64_t i = 0; i < V * V; i++) {
      const double pr = joint[i], fr = (double)cnt[i] / SEEDS;
      if (pr == 0 && cnt[i]) fail_msg("k %lld: pair (%lld, %lld) has probability 0", (long long)k,
                                      (long long)(i / V), (long long)(i % V));
      if (fabs(fr - pr) > 5 * sqrt(pr * (1 - pr) / SEEDS) + 2.0 / SEEDS)
        fail_msg("k %lld: pair (%lld, %lld): frequency %.3f, probability %.3f", (long long)k,
                 (long long)(i / V), (long long)(i % V), fr, pr);
    }
    print_message("%s k = %lld: %d seeds follow p(t1) p(t2|t1); %lld of %lld drafts accepted\n", f->model,
                  (long long)k, SEEDS, (long long)accepted, (long long)drafted);
    free(cnt);
  }
  free(logits);
  free(p1);
  free(p2);
  free(idx);
  free(ids);
  free(joint);
}

int main(int argc, char **argv) {
  g_quick = argc > 1 && strcmp(argv[1], "quick") == 0;
  /* EPIC_TEST_FILTER=pattern runs matching tests only (while debugging). */
  if (getenv("EPIC_TEST_FILTER")) cmocka_set_test_filter(getenv("EPIC_TEST_FILTER"));
  const struct CMUnitTest units[] = {
      cmocka_unit_test(test_accept_rule),
      cmocka_unit_test(test_probs_match_sampler),
  };
  const struct CMUnitTest model_tests[] = {
      cmocka_unit_test(test_greedy_identical),
      cmocka_unit_test(test_greedy_identical_device_paths),
      cmocka_unit_test(test_rollback),
      cmocka_unit_test(test_draft_recursion),
      cmocka_unit_test(test_sampling_distribution),
  };
  int rc = cmocka_run_group_tests_name("spec units", units, NULL, NULL);
  rc |= cmocka_run_group_tests_name("spec tiny-bf16", model_tests, setup_bf16, teardown);
  rc |= cmocka_run_group_tests_name("spec tiny-fp8", model_tests, setup_fp8, teardown);
  return rc;
}
