/* The model against the fixtures' float64 references (tiny-bf16, tiny-fp8):
 * every prompt logit, greedy continuations with their logits, MTP logits; plus
 * the engine invariants: incremental decode == full recompute, one batch of
 * several sequences (mixed prefill chunks and decode, small pages) == each alone. */
#define _GNU_SOURCE
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "common/log.h"
#include "common/npy.h"
#include "tests/common/dev_ops.h"
#include "tests/common/test_util.h"
#include "worker/generate.h"
#include "worker/model.h"
#include "worker/sampler.h"

#define TOL 1e-3 /* fixtures README §5: fp32 engine, every logit */
#define MAX_CASES 16

typedef struct tcase {
  char name[64];
  int32_t *prompt, *gen;
  int64_t n_prompt, n_gen;
  float *prompt_logits, *gen_logits, *mtp_logits; /* mtp_logits may be NULL */
} tcase;

typedef struct fixture {
  const char *model;
  epic_ops *ops;
  epic_model *m;
  tcase cases[MAX_CASES];
  int n_cases;
  int64_t V;
} fixture;

static float *load_npy(const char *model, const char *file, int64_t rows, int64_t cols) {
  char rel[512], path[1024];
  float *d;
  int64_t r, c;
  snprintf(rel, sizeof rel, "%s/cases/%s", model, file);
  assert_int_equal(epic_npy_read_f32(epic_test_path(path, sizeof path, rel), &d, &r, &c), EPIC_OK);
  assert_int_equal(r, rows);
  assert_int_equal(c, cols);
  return d;
}

static int setup(void **state, const char *model) {
  fixture *f = calloc(1, sizeof *f);
  char dir[1024];
  epic_model_params mp = {.size = sizeof mp, .load_mtp = 1};
  epic_log_init(EPIC_LOG_LEVEL_WARN, -1);
  f->model = model;
  epic_test_path(dir, sizeof dir, model);
  mp.dir = dir;
  if (epic_ops_cpu_create(0, &f->ops) != EPIC_OK) return -1;
  if (epic_model_load(f->ops, &mp, &f->m) != EPIC_OK) return -1;
  f->V = epic_model_get_config(f->m)->vocab_size;
  epic_test_case tc[MAX_CASES];
  const int n = epic_test_load_cases(model, tc, MAX_CASES);
  if (n < 0) return -1;
  for (int i = 0; i < n; i++) {
    tcase *c = &f->cases[f->n_cases++];
    memcpy(c->name, tc[i].name, sizeof c->name); /* both char[64] */
    c->prompt = tc[i].prompt; /* owned by the case now (freed in teardown) */
    c->n_prompt = tc[i].n_prompt;
    c->gen = tc[i].gen;
    c->n_gen = tc[i].n_gen;
    c->prompt_logits = load_npy(model, tc[i].prompt_logits, c->n_prompt, f->V);
    c->gen_logits = load_npy(model, tc[i].gen_logits, c->n_gen, f->V);
    if (tc[i].mtp_logits[0]) c->mtp_logits = load_npy(model, tc[i].mtp_logits, c->n_prompt - 1, f->V);
  }
  *state = f;
  return 0;
}

static int setup_bf16(void **state) { return setup(state, "tiny-bf16"); }
static int setup_fp8(void **state) { return setup(state, "tiny-fp8"); }

static int teardown(void **state) {
  fixture *f = *state;
  for (int i = 0; i < f->n_cases; i++) {
    tcase *c = &f->cases[i];
    free(c->prompt);
    free(c->gen);
    free(c->prompt_logits);
    free(c->gen_logits);
    free(c->mtp_logits);
  }
  epic_model_destroy(f->m);
  epic_ops_destroy(f->ops);
  free(f);
  return 0;
}

static double max_abs_diff(const float *a, const float *b, int64_t n) {
  double m = 0;
  for (int64_t i = 0; i < n; i++) {
    double d = fabs((double)a[i] - (double)b[i]);
    if (!(d <= m)) m = d; /* NaN propagates as a failure */
  }
  return m;
}

/* Reference logits row for position p of case c (prompt rows, then generated). */
static const float *ref_row(const fixture *f, const tcase *c, int64_t p) {
  if (p < c->n_prompt) return c->prompt_logits + p * f->V;
  return c->gen_logits + (p - c->n_prompt + 1) * f->V;
}

/* Prompt logits, greedy ids and generated logits via epic_generate (one sequence). */
static void test_cases_match_reference(void **state) {
  fixture *f = *state;
  double worst = 0;
  for (int i = 0; i < f->n_cases; i++) {
    tcase *c = &f->cases[i];
    char path[] = "/tmp/epic-test-logits-XXXXXX";
    int fd = mkstemp(path);
    epic_npy_writer *w;
    epic_kvcache *kc;
    epic_generate_result r;
    float *rows;
    int64_t nr, nc;
    assert_true(fd >= 0);
    assert_int_equal(epic_npy_writer_open(path, f->V, &w), EPIC_OK);
    assert_int_equal(epic_model_kvcache_create(f->m, 0, 16, 64, &kc), EPIC_OK);
    epic_generate_params gp = {.size = sizeof gp,
                               .prompt = c->prompt,
                               .n_prompt = c->n_prompt,
                               .max_new_tokens = c->n_gen,
                               .sampling = {.size = sizeof(epic_sampling_params), .top_p = 1},
                               .ignore_eos = 1,
                               .dump_logits = w};
    assert_int_equal(epic_generate(f->m, kc, NULL, &gp, &r), EPIC_OK);
    assert_int_equal(epic_npy_writer_close(w), EPIC_OK);
    assert_int_equal(r.n_ids, c->n_gen);
    assert_memory_equal(r.ids, c->gen, (size_t)c->n_gen * sizeof(int32_t));
    assert_int_equal(epic_npy_read_f32(path, &rows, &nr, &nc), EPIC_OK);
    assert_int_equal(nr, c->n_prompt + c->n_gen - 1);
    for (int64_t p = 0; p < nr; p++) {
      double d = max_abs_diff(rows + p * f->V, ref_row(f, c, p), f->V);
      if (d > TOL) fail_msg("%s %s: row %lld: max |dlogit| %g", f->model, c->name, (long long)p, d);
      if (d > worst) worst = d;
    }
    print_message("%s %s: ok\n", f->model, c->name);
    free(rows);
    free(r.ids);
    close(fd);
    unlink(path);
    epic_kvcache_destroy(kc);
  }
  print_message("%s: max |dlogit| over all cases %.3g\n", f->model, worst);
}

/* Every case's MTP logits over its prompt (from the main model's post-norm hidden states)
 * against the reference, all cases in one MTP forward of m (on a device backend their
 * hidden rows go up as one gathered upload). Returns the worst |dlogit|; *checked: cases. */
static double mtp_cases(const fixture *f, epic_model *m, int *checked) {
  const int64_t D = epic_model_get_config(m)->hidden_size;
  epic_kvcache *kc, *km;
  epic_kv_seq s[MAX_CASES] = {{0}}, sm[MAX_CASES] = {{0}};
  epic_seq_batch bm[MAX_CASES];
  float *hid[MAX_CASES];
  const tcase *cs[MAX_CASES];
  int64_t rows = 0;
  int n = 0;
  double worst = 0;
  assert_int_equal(epic_model_kvcache_create(m, 0, 8, 64 * f->n_cases, &kc), EPIC_OK);
  assert_int_equal(epic_model_kvcache_create(m, 1, 8, 64 * f->n_cases, &km), EPIC_OK);
  for (int i = 0; i < f->n_cases; i++) {
    const tcase *c = &f->cases[i];
    if (!c->mtp_logits || c->n_prompt < 2)
      continue;
    float *lg = malloc((size_t)(c->n_prompt * f->V) * 4);
    hid[n] = malloc((size_t)(c->n_prompt * D) * 4);
    assert_non_null(lg);
    assert_non_null(hid[n]);
    epic_seq_batch b = {.tokens = c->prompt, .n_tokens = c->n_prompt, .kv = &s[n], .all_logits = 1};
    assert_int_equal(epic_model_forward(m, kc, &b, 1, lg, hid[n]), EPIC_OK);
    free(lg);
    bm[n] = (epic_seq_batch){.tokens = c->prompt + 1,
                             .n_tokens = c->n_prompt - 1,
                             .kv = &sm[n],
                             .all_logits = 1,
                             .hidden = hid[n]};
    cs[n++] = c;
    rows += c->n_prompt - 1;
  }
  float *mlog = malloc((size_t)(rows * f->V) * 4 + 4);
  assert_non_null(mlog);
  if (n > 0)
    assert_int_equal(epic_model_mtp_forward(m, km, bm, n, mlog), EPIC_OK);
  for (int j = 0, r = 0; j < n; r += (int)bm[j++].n_tokens) {
    const double d =
        max_abs_diff(mlog + (int64_t)r * f->V, cs[j]->mtp_logits, bm[j].n_tokens * f->V);
    print_message("%s %s: mtp max |dlogit| %.3g\n", f->model, cs[j]->name, d);
    worst = d > worst ? d : worst;
    epic_kvcache_seq_release(kc, &s[j]);
    epic_kvcache_seq_release(km, &sm[j]);
    free(hid[j]);
  }
  free(mlog);
  epic_kvcache_destroy(kc);
  epic_kvcache_destroy(km);
  *checked = n;
  return worst;
}

/* MTP head over the prompt, from the post-norm hidden states. */
static void test_mtp_logits(void **state) {
  fixture *f = *state;
  int checked;
  assert_true(epic_model_has_mtp(f->m));
  assert_true(mtp_cases(f, f->m, &checked) <= TOL);
  assert_true(checked > 0);
}

/* all_hidden (an MTP prefill's rows): every token's hidden row comes back as with
 * all_logits, while the LM head runs on the last row only, beside a sequence with
 * all_logits and one with neither: hidden rows bit for bit, the LM-head rows' logits and
 * picks at their output rows as in the all_logits forward. */
static void test_all_hidden(void **state) {
  fixture *f = *state;
  const int n = f->n_cases < 3 ? f->n_cases : 3;
  const int64_t D = epic_model_get_config(f->m)->hidden_size;
  epic_kvcache *kc[2];
  epic_kv_seq sq[2][3] = {{{0}}};
  epic_seq_batch b[2][3];
  int64_t rows = 0, last[3];
  for (int i = 0; i < n; i++)
    rows += f->cases[i].n_prompt;
  float *lg[2], *hid[2];
  epic_row_pick *pk = malloc((size_t)rows * sizeof *pk);
  for (int k = 0; k < 2; k++) {
    assert_int_equal(epic_model_kvcache_create(f->m, 0, 8, 256, &kc[k]), EPIC_OK);
    lg[k] = malloc((size_t)(rows * f->V) * 4);
    hid[k] = malloc((size_t)(rows * D) * 4);
  }
  for (int i = 0, r = 0; i < n; r += (int)f->cases[i].n_prompt, i++) {
    const tcase *c = &f->cases[i];
    b[0][i] = (epic_seq_batch){
        .tokens = c->prompt, .n_tokens = c->n_prompt, .kv = &sq[0][i], .all_logits = 1};
    b[1][i] = b[0][i];
    b[1][i].kv = &sq[1][i];
    b[1][i].all_logits = i == 1;
    b[1][i].all_hidden = i != 2; /* the third: neither, one output row */
    last[i] = r + c->n_prompt - 1;
  }
  uint8_t need[4096];
  assert_true(rows <= 4096);
  memset(need, 1, sizeof need);
  assert_int_equal(epic_model_forward(f->m, kc[0], b[0], n, lg[0], hid[0]), EPIC_OK);
  assert_int_equal(epic_model_forward_pick(f->m, kc[1], b[1], n, lg[1], need, pk, hid[1]), EPIC_OK);
  const int64_t out = epic_batch_out_rows(b[1], n);
  /* b[1]'s output rows: all of the first two sequences' tokens, then the third's last */
  assert_int_equal(out, rows - (n > 2 ? f->cases[2].n_prompt - 1 : 0));
  assert_memory_equal(hid[1], hid[0],
                      (size_t)((n > 2 ? last[2] - f->cases[2].n_prompt + 1 : rows) * D) * 4);
  if (n > 2)
    assert_memory_equal(hid[1] + (out - 1) * D, hid[0] + last[2] * D, (size_t)D * 4);
  double worst = 0;
  for (int64_t r = 0, o = 0; r < rows; r++) {
    const int seq = r <= last[0] ? 0 : (n > 1 && r <= last[1]) ? 1 : 2;
    if (seq == 2 && r != last[2])
      continue; /* not an output row of b[1] */
    const float *g = lg[1] + o * f->V, *ref = lg[0] + r * f->V;
    if (seq == 1 || r == last[seq]) { /* an LM-head row */
      const double d = max_abs_diff(g, ref, f->V);
      worst = d > worst ? d : worst;
      assert_int_equal(pk[o].id, epic_argmax(g, f->V));
    }
    o++;
  }
  print_message("%s all_hidden: %lld output rows, LM-head rows within %.3g of all_logits\n",
                f->model, (long long)out, worst);
  assert_true(worst <= 1e-4);
  for (int k = 0; k < 2; k++) {
    for (int i = 0; i < n; i++)
      epic_kvcache_seq_release(kc[k], &sq[k][i]);
    epic_kvcache_destroy(kc[k]);
    free(lg[k]);
    free(hid[k]);
  }
  free(pk);
}

/* Feeding the prompt one token at a time (absorbed attention over the paged
 * cache) gives the same logits as one full prefill (naive attention). */
static void test_incremental_equals_full(void **state) {
  fixture *f = *state;
  tcase *c = &f->cases[3 < f->n_cases ? 3 : f->n_cases - 1];
  epic_kvcache *kc;
  epic_kv_seq s1 = {0}, s2 = {0};
  float *full = malloc((size_t)(c->n_prompt * f->V) * 4), *one = malloc((size_t)f->V * 4);
  double worst = 0;
  assert_int_equal(epic_model_kvcache_create(f->m, 0, 5, 64, &kc), EPIC_OK);
  epic_seq_batch b = {.tokens = c->prompt, .n_tokens = c->n_prompt, .kv = &s1, .all_logits = 1};
  assert_int_equal(epic_model_forward(f->m, kc, &b, 1, full, NULL), EPIC_OK);
  for (int64_t t = 0; t < c->n_prompt; t++) {
    epic_seq_batch bt = {.tokens = c->prompt + t, .n_tokens = 1, .start = t, .kv = &s2};
    assert_int_equal(epic_model_forward(f->m, kc, &bt, 1, one, NULL), EPIC_OK);
    double d = max_abs_diff(one, full + t * f->V, f->V);
    if (d > worst) worst = d;
  }
  print_message("%s %s: incremental vs full max |d| %.3g\n", f->model, c->name, worst);
  assert_true(worst <= 1e-4);
  epic_kvcache_seq_release(kc, &s1);
  epic_kvcache_seq_release(kc, &s2);
  epic_kvcache_destroy(kc);
  free(full);
  free(one);
}

/* A short chunk after a cached prefix (an MTP verify step, a short continuation) takes
 * the absorbed attention row by row, as decoding does (worker/model.c, absorbed()): on
 * the CPU, whose rows are computed alike whatever the batch, its logits equal feeding
 * the same tokens one at a time bit for bit, across page boundaries (pages of 5) and
 * with a decode sequence beside it in the batch. A chunk from position 0 stays on the
 * naive form (checked against the reference elsewhere). */
static void test_short_chunk_equals_decode(void **state) {
  fixture *f = *state;
  tcase *c = &f->cases[3 < f->n_cases ? 3 : f->n_cases - 1];
  enum { P = 3, N = 4 }; /* prefix, then one chunk of N (positions 3..6: pages 0 and 1) */
  assert_true(c->n_prompt >= P + N);
  epic_kvcache *kc;
  epic_kv_seq s1 = {0}, s2 = {0}, s3 = {0};
  float *chunk = malloc((size_t)((N + 1) * f->V) * 4), *one = malloc((size_t)(2 * f->V) * 4);
  assert_int_equal(epic_model_kvcache_create(f->m, 0, 5, 64, &kc), EPIC_OK);
  epic_seq_batch p1 = {.tokens = c->prompt, .n_tokens = P, .kv = &s1};
  epic_seq_batch p2 = {.tokens = c->prompt, .n_tokens = P, .kv = &s2};
  epic_seq_batch p3 = {.tokens = c->prompt, .n_tokens = 2, .kv = &s3};
  assert_int_equal(epic_model_forward(f->m, kc, &p1, 1, one, NULL), EPIC_OK);
  assert_int_equal(epic_model_forward(f->m, kc, &p2, 1, one, NULL), EPIC_OK);
  assert_int_equal(epic_model_forward(f->m, kc, &p3, 1, one, NULL), EPIC_OK);
  /* s1: the chunk, with s3 decoding one token beside it */
  epic_seq_batch both[2] = {
      {.tokens = c->prompt + P, .n_tokens = N, .start = P, .kv = &s1, .all_logits = 1},
      {.tokens = c->prompt + 2, .n_tokens = 1, .start = 2, .kv = &s3}};
  assert_int_equal(epic_model_forward(f->m, kc, both, 2, chunk, NULL), EPIC_OK);
  /* s2: the same tokens one at a time */
  for (int64_t t = 0; t < N; t++) {
    epic_seq_batch bt = {.tokens = c->prompt + P + t, .n_tokens = 1, .start = P + t, .kv = &s2};
    assert_int_equal(epic_model_forward(f->m, kc, &bt, 1, one, NULL), EPIC_OK);
    if (memcmp(one, chunk + t * f->V, (size_t)f->V * 4))
      fail_msg("%s %s: chunk row %lld differs from decoding it (max |d| %.3g)", f->model, c->name,
               (long long)t, max_abs_diff(one, chunk + t * f->V, f->V));
  }
  print_message("%s %s: a %d-token chunk after %d cached tokens equals decoding bit for bit\n",
                f->model, c->name, (int)N, (int)P);
  epic_kvcache_seq_release(kc, &s1);
  epic_kvcache_seq_release(kc, &s2);
  epic_kvcache_seq_release(kc, &s3);
  epic_kvcache_destroy(kc);
  free(chunk);
  free(one);
}

/* Joined projections (epic_model_params.join_weights: q_a with kv_a, gate with up as one
 * weight each; the default on GPUs) compute every output as the separate weights do: bit
 * for bit where the matmul sums in a fixed order whatever the weight's height (here the
 * CPU's calls of up to EPIC_OPS_CPU_FIXED_ORDER_ROWS rows: the prompts go in chunks of that
 * many, then decode steps). On the CPU joining copies those weights, so the joined model's
 * weight bytes grow. */
static void test_joined_weights(void **state) {
  fixture *f = *state;
  enum { CH = EPIC_OPS_CPU_FIXED_ORDER_ROWS, DECODE = 4 };
  char dir[1024];
  epic_test_path(dir, sizeof dir, f->model);
  epic_model_params mp = {.size = sizeof mp, .dir = dir, .load_mtp = 1, .join_weights = 1};
  epic_model *j = NULL;
  assert_int_equal(epic_model_load(f->ops, &mp, &j), EPIC_OK);
  assert_true(epic_model_weight_bytes(j) > epic_model_weight_bytes(f->m));
  epic_kvcache *ka, *kb;
  assert_int_equal(epic_model_kvcache_create(f->m, 0, 4, 256, &ka), EPIC_OK);
  assert_int_equal(epic_model_kvcache_create(j, 0, 4, 256, &kb), EPIC_OK);
  float *la = malloc((size_t)(CH * f->V) * 4), *lb = malloc((size_t)(CH * f->V) * 4);
  assert_non_null(la);
  assert_non_null(lb);
  for (int i = 0; i < f->n_cases; i++) {
    tcase *c = &f->cases[i];
    epic_kv_seq sa = {0}, sb = {0};
    int32_t next = 0;
    for (int64_t pos = 0; pos < c->n_prompt + DECODE;) {
      const int prompt = pos < c->n_prompt;
      const int64_t n = prompt ? (c->n_prompt - pos < CH ? c->n_prompt - pos : CH) : 1;
      epic_seq_batch a = {.tokens = prompt ? c->prompt + pos : &next, .n_tokens = n,
                          .start = pos, .kv = &sa, .all_logits = 1};
      epic_seq_batch b = a;
      b.kv = &sb;
      assert_int_equal(epic_model_forward(f->m, ka, &a, 1, la, NULL), EPIC_OK);
      assert_int_equal(epic_model_forward(j, kb, &b, 1, lb, NULL), EPIC_OK);
      if (memcmp(la, lb, (size_t)(n * f->V) * 4))
        fail_msg("%s %s, positions from %lld: joined weights change the logits (max |d| %.3g)",
                 f->model, c->name, (long long)pos, max_abs_diff(la, lb, n * f->V));
      next = epic_argmax(la + (n - 1) * f->V, f->V);
      pos += n;
    }
    epic_kvcache_seq_release(ka, &sa);
    epic_kvcache_seq_release(kb, &sb);
  }
  print_message("%s: joined q_a/kv_a and gate/up weights give the same logits bit for bit "
                "(%zu more weight bytes on the CPU)\n",
                f->model, epic_model_weight_bytes(j) - epic_model_weight_bytes(f->m));
  epic_kvcache_destroy(ka);
  epic_kvcache_destroy(kb);
  epic_model_destroy(j);
  free(la);
  free(lb);
}

/* The absorbed attention's kv_b slices in bf16 (epic_model_params.head_bf16, CUDA's fast
 * default) through the CPU's bf16 head_gemm: each case's prompt, then its continuation
 * teacher-forced in steps of 1 and 3 tokens (the absorbed form, which reads those slices),
 * every logit within HEAD_BF16_TOL of the float64 reference (the weights' rounding, 2^-9
 * relative, is the only change: none on tiny-bf16, whose kv_b is bf16 already, a few 1e-2
 * on tiny-fp8's block-scaled one) and the same top-1 wherever the reference's top-1/top-2
 * margin exceeds twice that; and the bf16 copies take half the bytes of the fp32 ones (so
 * the model did keep them). */
#define HEAD_BF16_TOL 0.1
static void test_head_bf16(void **state) {
  fixture *f = *state;
  char dir[1024];
  epic_test_path(dir, sizeof dir, f->model);
  epic_model_params mp = {.size = sizeof mp, .dir = dir, .load_mtp = 1, .head_bf16 = 1};
  epic_model *hb = NULL;
  assert_int_equal(epic_model_load(f->ops, &mp, &hb), EPIC_OK);
  const epic_model_config *cfg = epic_model_get_config(f->m);
  const size_t kv_b = (size_t)(cfg->num_attention_heads *
                               (cfg->qk_nope_head_dim + cfg->v_head_dim) * cfg->kv_lora_rank);
  const size_t layers = (size_t)cfg->num_hidden_layers + (epic_model_has_mtp(f->m) ? 1 : 0);
  assert_int_equal(epic_model_weight_bytes(f->m) - epic_model_weight_bytes(hb), layers * kv_b * 2);
  double worst = 0;
  for (int i = 0; i < f->n_cases; i++) {
    tcase *c = &f->cases[i];
    const int64_t n = c->n_prompt + c->n_gen - 1;
    int32_t *toks = malloc((size_t)n * sizeof *toks);
    float *lg = malloc((size_t)(n * f->V) * 4);
    assert_non_null(toks);
    assert_non_null(lg);
    memcpy(toks, c->prompt, (size_t)c->n_prompt * sizeof *toks);
    memcpy(toks + c->n_prompt, c->gen, (size_t)(c->n_gen - 1) * sizeof *toks);
    epic_kvcache *kc;
    assert_int_equal(epic_model_kvcache_create(hb, 0, 16, 64, &kc), EPIC_OK);
    epic_kv_seq sq = {0};
    for (int64_t pos = 0, step = 0; pos < n; step++) {
      int64_t len = pos == 0 ? c->n_prompt : (step % 2 ? 1 : 3);
      len = len < n - pos ? len : n - pos;
      epic_seq_batch b = {
          .tokens = toks + pos, .n_tokens = len, .start = pos, .kv = &sq, .all_logits = 1};
      assert_int_equal(epic_model_forward(hb, kc, &b, 1, lg + pos * f->V, NULL), EPIC_OK);
      pos += len;
    }
    for (int64_t p = 0; p < n; p++) {
      const double d = max_abs_diff(lg + p * f->V, ref_row(f, c, p), f->V);
      if (!(d <= HEAD_BF16_TOL))
        fail_msg("%s %s: bf16 kv_b: row %lld: max |dlogit| %g", f->model, c->name, (long long)p, d);
      const float *ref = ref_row(f, c, p);
      const int32_t top = epic_argmax(ref, f->V);
      float second = -INFINITY;
      for (int64_t v = 0; v < f->V; v++)
        if (v != top && ref[v] > second) second = ref[v];
      if (ref[top] - second > 2 * HEAD_BF16_TOL)
        assert_int_equal(epic_argmax(lg + p * f->V, f->V), top);
      worst = d > worst ? d : worst;
    }
    epic_kvcache_seq_release(kc, &sq);
    epic_kvcache_destroy(kc);
    free(toks);
    free(lg);
  }
  print_message("%s: kv_b in bf16: max |dlogit| %.3g against the reference\n", f->model, worst);
  epic_model_destroy(hb);
}

/* The fixture's model (with its MTP layer) on the CPU backend posing as a device backend
 * (tests/common/dev_ops.h), opened into *dev. */
static epic_model *dev_model(const fixture *f, epic_test_dev_ops *dev) {
  char dir[1024];
  epic_test_path(dir, sizeof dir, f->model);
  assert_int_equal(epic_test_dev_ops_open(dev), EPIC_OK);
  epic_model_params mp = {.size = sizeof mp, .dir = dir, .load_mtp = 1};
  epic_model *dm = NULL;
  assert_int_equal(epic_model_load(dev->ops, &mp, &dm), EPIC_OK);
  return dm;
}

/* The device backends' host-side paths on the CPU (tests/common/dev_ops.h; the expert
 * counts kept in backend memory too): CI has no GPU to run those paths otherwise. One or two
 * micro-batches (all cases in one batch then, so that both hold rows). Each case's
 * prompt, then its continuation teacher-forced in steps of 1 and 3 tokens: every logit
 * within TOL of the float64 reference. Returns the per-layer expert token counts
 * (epic_model_expert_layer_tokens; caller frees). */
static int64_t *device_paths(const fixture *f, int micro, double *worst) {
  epic_test_dev_ops dev = {0};
  epic_model *dm = dev_model(f, &dev);
  const epic_model_config *cfg = epic_model_get_config(dm);
  assert_int_equal(epic_model_set_micro_batches(dm, micro), EPIC_OK);
  *worst = 0;
  const int nc = f->n_cases;
  int32_t *toks[MAX_CASES];
  float *lg[MAX_CASES];
  int64_t n[MAX_CASES], pos[MAX_CASES] = {0};
  epic_kv_seq sq[MAX_CASES] = {0};
  epic_kvcache *kc;
  assert_int_equal(epic_model_kvcache_create(dm, 0, 16, 64 * nc, &kc), EPIC_OK);
  for (int i = 0; i < nc; i++) {
    const tcase *c = &f->cases[i];
    n[i] = c->n_prompt + c->n_gen - 1;
    toks[i] = malloc((size_t)n[i] * sizeof *toks[i]);
    lg[i] = malloc((size_t)(n[i] * f->V) * 4);
    assert_non_null(toks[i]);
    assert_non_null(lg[i]);
    memcpy(toks[i], c->prompt, (size_t)c->n_prompt * sizeof *toks[i]);
    memcpy(toks[i] + c->n_prompt, c->gen, (size_t)(c->n_gen - 1) * sizeof *toks[i]);
  }
  /* one case at a time with one micro-batch, all together with two */
  for (int first = 0; first<nc; first += micro> 1 ? nc : 1) {
    const int last = micro > 1 ? nc : first + 1;
    for (int step = 0;; step++) {
      epic_seq_batch b[MAX_CASES];
      float *out[MAX_CASES];
      int nb = 0;
      for (int i = first; i < last; i++) {
        if (pos[i] >= n[i])
          continue;
        int64_t len = pos[i] == 0 ? f->cases[i].n_prompt : (step % 2 ? 1 : 3);
        len = len < n[i] - pos[i] ? len : n[i] - pos[i];
        b[nb] = (epic_seq_batch){.tokens = toks[i] + pos[i],
                                 .n_tokens = len,
                                 .start = pos[i],
                                 .kv = &sq[i],
                                 .all_logits = 1};
        out[nb++] = lg[i] + pos[i] * f->V;
        pos[i] += len;
      }
      if (nb == 0)
        break;
      /* the batch's logits rows come back packed: copy them to each case's rows */
      int64_t rows = 0;
      for (int j = 0; j < nb; j++)
        rows += b[j].n_tokens;
      float *all = malloc((size_t)(rows * f->V) * 4);
      assert_non_null(all);
      assert_int_equal(epic_model_forward(dm, kc, b, nb, all, NULL), EPIC_OK);
      for (int j = 0, r = 0; j < nb; r += (int)b[j].n_tokens, j++)
        memcpy(out[j], all + (int64_t)r * f->V, (size_t)(b[j].n_tokens * f->V) * 4);
      free(all);
    }
  }
  for (int i = 0; i < nc; i++) {
    for (int64_t p = 0; p < n[i]; p++) {
      const double d = max_abs_diff(lg[i] + p * f->V, ref_row(f, &f->cases[i], p), f->V);
      if (!(d <= TOL))
        fail_msg("%s %s: device paths (%d micro-batches): row %lld: max |dlogit| %g", f->model,
                 f->cases[i].name, micro, (long long)p, d);
      *worst = d > *worst ? d : *worst;
    }
    epic_kvcache_seq_release(kc, &sq[i]);
    free(toks[i]);
    free(lg[i]);
  }
  epic_kvcache_destroy(kc);
  const int64_t n_counts = (cfg->num_hidden_layers + 1) * cfg->n_routed_experts;
  int64_t *counts = malloc((size_t)n_counts * sizeof *counts);
  assert_non_null(counts);
  assert_int_equal(epic_model_expert_layer_tokens(dm, counts), EPIC_OK);
  epic_model_destroy(dm);
  epic_test_dev_ops_close(&dev);
  return counts;
}

/* The MTP forward on the device backends' host-side paths (tests/common/dev_ops.h): the
 * cases' hidden rows gathered into one upload, their logits within TOL of the reference. */
static void test_device_paths_mtp(void **state) {
  const fixture *f = *state;
  epic_test_dev_ops dev = {0};
  epic_model *dm = dev_model(f, &dev);
  int checked;
  assert_true(mtp_cases(f, dm, &checked) <= TOL);
  assert_true(checked > 1); /* more than one sequence: the gathered upload */
  epic_model_destroy(dm);
  epic_test_dev_ops_close(&dev);
}

/* device_paths in one and in two micro-batches: both within TOL of the reference, the
 * same expert token counts, every routed (token, expert) pair counted once. */
static void test_device_paths(void **state) {
  const fixture *f = *state;
  const epic_model_config *cfg = epic_model_get_config(f->m);
  double one, two;
  int64_t *a = device_paths(f, 1, &one), *b = device_paths(f, 2, &two);
  int64_t routed = 0, tokens = 0;
  const int64_t n = (cfg->num_hidden_layers + 1) * cfg->n_routed_experts;
  for (int64_t i = 0; i < n; i++)
    routed += a[i];
  for (int i = 0; i < f->n_cases; i++)
    tokens += f->cases[i].n_prompt + f->cases[i].n_gen - 1;
  assert_memory_equal(a, b, (size_t)n * sizeof *a);
  int64_t moe_layers = 0;
  for (int64_t l = 0; l < cfg->num_hidden_layers; l++)
    moe_layers += epic_config_is_moe_layer(cfg, l);
  assert_int_equal(routed, tokens * cfg->num_experts_per_tok * moe_layers);
  print_message("%s: device paths on the CPU: max |dlogit| %.3g (one micro-batch), %.3g (two) "
                "against the reference\n",
                f->model, one, two);
  free(a);
  free(b);
}

/* Every case's prompt in one batch, most with a draw (epic_seq_batch.draw; one greedy, one
 * with every row's logits and one with every hidden row, so that LM-head rows and output
 * rows differ): each sequence's last pick is epic_draw_row on its returned row, with the
 * row's log-softmax; the other rows keep their greedy picks. Then the bad calls. */
static void draws_on(const fixture *f, epic_model *m) {
  const int nc = f->n_cases;
  epic_kvcache *kc;
  epic_kv_seq sq[MAX_CASES] = {0};
  epic_seq_batch b[MAX_CASES];
  epic_draw_params d[MAX_CASES];
  int64_t rows = 0;
  assert_int_equal(epic_model_kvcache_create(m, 0, 16, 64 * nc, &kc), EPIC_OK);
  for (int i = 0; i < nc; i++) {
    d[i] = (epic_draw_params){.temperature = 0.4f + 0.5f * (float)(i % 3),
                              .top_p = i % 2 ? 0.9f : 1.0f,
                              .top_k = i % 4 == 3 ? 5 : 0,
                              .u = 0x9e3779b97f4a7c15ull * (uint64_t)(i + 1)};
    b[i] = (epic_seq_batch){.tokens = f->cases[i].prompt,
                            .n_tokens = f->cases[i].n_prompt,
                            .kv = &sq[i],
                            .all_logits = i == 1,
                            .all_hidden = i == 2,
                            .draw = i == 0 ? NULL : &d[i]};
    rows += epic_seq_out_rows(&b[i]);
  }
  float *lg = malloc((size_t)(rows * f->V) * sizeof *lg);
  epic_row_pick *pk = malloc((size_t)rows * sizeof *pk);
  void *scratch = malloc(epic_draw_scratch_bytes(f->V));
  assert_true(lg && pk && scratch);
  assert_int_equal(epic_model_forward_pick(m, kc, b, nc, lg, NULL, pk, NULL), EPIC_OK);
  int drawn = 0;
  for (int i = 0, r = 0; i < nc; r += (int)epic_seq_out_rows(&b[i]), i++) {
    const int64_t last = r + epic_seq_out_rows(&b[i]) - 1;
    for (int64_t j = b[i].all_logits ? r : last; j <= last; j++) {
      const float *l = lg + j * f->V;
      const int32_t want = j == last && b[i].draw ? epic_draw_row(l, f->V, &d[i], scratch)
                                                  : epic_argmax(l, f->V);
      assert_int_equal(pk[j].id, want);
      assert_true(fabs(pk[j].logprob - epic_logprob_at(l, f->V, want)) < 1e-5);
      drawn += j == last && b[i].draw && want != epic_argmax(l, f->V);
    }
  }
  assert_true(drawn > 0); /* some draw left the argmax: not the greedy picks */
  /* a draw needs picks, and parameters in range */
  epic_kv_seq extra = {0};
  epic_draw_params bad = d[1];
  epic_seq_batch one = {.tokens = f->cases[0].prompt, .n_tokens = 2, .kv = &extra, .draw = &bad};
  assert_int_equal(epic_model_forward(m, kc, &one, 1, lg, NULL), EPIC_ERR_INVALID);
  bad.temperature = 0.0f;
  assert_int_equal(epic_model_forward_pick(m, kc, &one, 1, lg, NULL, pk, NULL), EPIC_ERR_INVALID);
  bad = d[1];
  bad.top_p = 1.5f;
  assert_int_equal(epic_model_forward_pick(m, kc, &one, 1, lg, NULL, pk, NULL), EPIC_ERR_INVALID);
  assert_int_equal(extra.n_tokens, 0);
  for (int i = 0; i < nc; i++)
    epic_kvcache_seq_release(kc, &sq[i]);
  epic_kvcache_destroy(kc);
  free(lg);
  free(pk);
  free(scratch);
}

/* draws_on the CPU backend and on the device backends' host-side paths. */
static void test_draws(void **state) {
  const fixture *f = *state;
  epic_test_dev_ops dev = {0};
  assert_true(f->n_cases >= 3);
  draws_on(f, f->m);
  epic_model *dm = dev_model(f, &dev);
  draws_on(f, dm);
  epic_model_destroy(dm);
  epic_test_dev_ops_close(&dev);
}

/* All cases in one batch: chunked prefill (chunks of 7) running beside other
 * sequences' decode steps, with tiny pages, then greedy decoding together;
 * every row must match the reference as when run alone. */
static void test_batched_mixed(void **state) {
  fixture *f = *state;
  const int n = f->n_cases;
  const int64_t chunk = 7;
  epic_kvcache *kc;
  epic_kv_seq seqs[MAX_CASES] = {{0}};
  int64_t fed[MAX_CASES] = {0}; /* tokens fed so far */
  int32_t next[MAX_CASES];
  int64_t gen_done[MAX_CASES] = {0};
  float *logits = malloc((size_t)(n * chunk * f->V) * 4);
  epic_row_pick *picks = malloc((size_t)(n * chunk) * sizeof *picks);
  double worst = 0;
  int active = n;
  assert_int_equal(epic_model_kvcache_create(f->m, 0, 3, 512, &kc), EPIC_OK);
  while (active > 0) {
    epic_seq_batch b[MAX_CASES];
    int map[MAX_CASES], nb = 0;
    for (int i = 0; i < n; i++) {
      tcase *c = &f->cases[i];
      if (gen_done[i] >= c->n_gen) continue;
      if (fed[i] < c->n_prompt) {
        int64_t take = c->n_prompt - fed[i] < chunk ? c->n_prompt - fed[i] : chunk;
        b[nb] = (epic_seq_batch){.tokens = c->prompt + fed[i], .n_tokens = take, .start = fed[i],
                                 .kv = &seqs[i], .all_logits = 1};
      } else {
        b[nb] = (epic_seq_batch){.tokens = &next[i], .n_tokens = 1, .start = fed[i], .kv = &seqs[i],
                                 .all_logits = 1};
      }
      map[nb++] = i;
    }
    /* The backend's greedy picks must be the sampler's: argmax and its logprob. */
    assert_int_equal(epic_model_forward_pick(f->m, kc, b, nb, logits, NULL, picks, NULL), EPIC_OK);
    int64_t row = 0;
    for (int j = 0; j < nb; j++) {
      int i = map[j];
      tcase *c = &f->cases[i];
      for (int64_t t = 0; t < b[j].n_tokens; t++, row++) {
        const int32_t best = epic_argmax(logits + row * f->V, f->V);
        assert_int_equal(picks[row].id, best);
        assert_true(picks[row].logprob == (float)epic_logprob_at(logits + row * f->V, f->V, best));
        double d = max_abs_diff(logits + row * f->V, ref_row(f, c, fed[i] + t), f->V);
        if (d > worst) worst = d;
        if (d > TOL) fail_msg("%s batched: row %lld of %s: %g", f->model, (long long)(fed[i] + t), c->name, d);
      }
      fed[i] += b[j].n_tokens;
      if (fed[i] >= c->n_prompt) {
        next[i] = epic_argmax(logits + (row - 1) * f->V, f->V);
        assert_int_equal(next[i], c->gen[gen_done[i]]);
        if (++gen_done[i] >= c->n_gen) {
          active--;
          epic_kvcache_seq_release(kc, &seqs[i]);
        }
      }
    }
  }
  print_message("%s batched: max |dlogit| %.3g\n", f->model, worst);
  assert_int_equal(epic_kvcache_free_pages(kc), epic_kvcache_total_pages(kc));
  epic_kvcache_destroy(kc);
  free(logits);
  free(picks);
}

/* A full cache is an error that leaves every sequence as it was. */
static void test_cache_full_is_clean(void **state) {
  fixture *f = *state;
  tcase *c = &f->cases[f->n_cases - 1];
  epic_kvcache *kc;
  epic_kv_seq s = {0};
  float *logits = malloc((size_t)f->V * 4);
  int32_t bad = (int32_t)f->V;
  assert_int_equal(epic_model_kvcache_create(f->m, 0, 4, 2, &kc), EPIC_OK);
  epic_seq_batch b = {.tokens = c->prompt, .n_tokens = c->n_prompt, .kv = &s};
  assert_true(c->n_prompt > 8);
  assert_int_equal(epic_model_forward(f->m, kc, &b, 1, logits, NULL), EPIC_ERR_NOMEM);
  assert_int_equal(s.n_tokens, 0);
  assert_int_equal(epic_kvcache_free_pages(kc), 2);
  epic_seq_batch bb = {.tokens = &bad, .n_tokens = 1, .kv = &s};
  assert_int_equal(epic_model_forward(f->m, kc, &bb, 1, logits, NULL), EPIC_ERR_INVALID);
  epic_seq_batch bs = {.tokens = c->prompt, .n_tokens = 1, .start = 3, .kv = &s};
  assert_int_equal(epic_model_forward(f->m, kc, &bs, 1, logits, NULL), EPIC_ERR_INVALID);
  epic_kvcache_seq_release(kc, &s);
  epic_kvcache_destroy(kc);
  free(logits);
}


/* ------------------------------------------------------------------------
 * Two micro-batches give the same logits (up to fp32 reassociation) and greedy
 * ids as one. Each test runs every step twice, on two caches: once with
 * micro_batches 1 and once with 2. */
#define MB_TOL 1e-4

/* b1 runs with one micro-batch on kc[0], b2 (the same tokens on the second
 * cache's sequences) with two on kc[1]; rows compared, the worst |d| returned. */
static double forward_mb12(fixture *f, epic_kvcache *kc[2], const epic_seq_batch *b1,
                           const epic_seq_batch *b2, int nb, float *l1, float *l2) {
  const int64_t rows = epic_batch_out_rows(b1, nb);
  assert_int_equal(epic_model_set_micro_batches(f->m, 1), EPIC_OK);
  assert_int_equal(epic_model_forward(f->m, kc[0], b1, nb, l1, NULL), EPIC_OK);
  assert_int_equal(epic_model_set_micro_batches(f->m, 2), EPIC_OK);
  assert_int_equal(epic_model_forward(f->m, kc[1], b2, nb, l2, NULL), EPIC_OK);
  assert_int_equal(epic_model_set_micro_batches(f->m, 1), EPIC_OK);
  for (int64_t r = 0; r < rows; r++)
    assert_int_equal(epic_argmax(l1 + r * f->V, f->V), epic_argmax(l2 + r * f->V, f->V));
  return max_abs_diff(l1, l2, rows * f->V);
}

/* Sequences admitted one per step, prefilled in chunks of 11 beside the others'
 * decode steps, then 4 greedy tokens each: micro-batches of mixed shapes. */
static void test_micro_batches_mixed(void **state) {
  fixture *f = *state;
  const int n = f->n_cases;
  const int64_t chunk = 11, n_gen = 4;
  epic_kvcache *kc[2];
  epic_kv_seq seqs[2][MAX_CASES] = {{{0}}};
  int64_t fed[MAX_CASES] = {0}, gen_done[MAX_CASES] = {0};
  int32_t next[MAX_CASES];
  float *l1 = malloc((size_t)(n * chunk * f->V) * 4), *l2 = malloc((size_t)(n * chunk * f->V) * 4);
  double worst = 0;
  int active = n, steps = 0;
  for (int k = 0; k < 2; k++)
    assert_int_equal(epic_model_kvcache_create(f->m, 0, 4, 512, &kc[k]), EPIC_OK);
  for (int step = 0; active > 0; step++) {
    epic_seq_batch b1[MAX_CASES], b2[MAX_CASES];
    int map[MAX_CASES], nb = 0;
    for (int i = 0; i < n && i <= step; i++) {
      tcase *c = &f->cases[i];
      if (gen_done[i] >= n_gen) continue;
      if (fed[i] < c->n_prompt) {
        int64_t take = c->n_prompt - fed[i] < chunk ? c->n_prompt - fed[i] : chunk;
        b1[nb] = (epic_seq_batch){.tokens = c->prompt + fed[i], .n_tokens = take, .start = fed[i],
                                  .all_logits = i % 2};
      } else {
        b1[nb] = (epic_seq_batch){.tokens = &next[i], .n_tokens = 1, .start = fed[i]};
      }
      b1[nb].kv = &seqs[0][i];
      b2[nb] = b1[nb];
      b2[nb].kv = &seqs[1][i];
      map[nb++] = i;
    }
    if (nb == 0) continue;
    double d = forward_mb12(f, kc, b1, b2, nb, l1, l2);
    if (d > worst) worst = d;
    steps++;
    int64_t row = 0;
    for (int j = 0; j < nb; j++) {
      const int i = map[j];
      tcase *c = &f->cases[i];
      row += b1[j].all_logits ? b1[j].n_tokens : 1;
      fed[i] += b1[j].n_tokens;
      if (fed[i] < c->n_prompt) continue;
      next[i] = epic_argmax(l1 + (row - 1) * f->V, f->V);
      assert_int_equal(next[i], c->gen[gen_done[i]]);
      if (++gen_done[i] >= n_gen) active--;
    }
  }
  print_message("%s micro-batches 2 vs 1, %d mixed steps: max |dlogit| %.3g\n", f->model, steps,
                worst);
  assert_true(worst <= MB_TOL);
  for (int k = 0; k < 2; k++) {
    for (int i = 0; i < n; i++) epic_kvcache_seq_release(kc[k], &seqs[k][i]);
    epic_kvcache_destroy(kc[k]);
  }
  free(l1);
  free(l2);
}

/* One sequence: the second micro-batch is empty (prefill, then decode steps). */
static void test_micro_batches_single(void **state) {
  fixture *f = *state;
  tcase *c = &f->cases[f->n_cases > 1 ? 1 : 0];
  epic_kvcache *kc[2];
  epic_kv_seq s[2] = {{0}};
  float *l1 = malloc((size_t)(c->n_prompt * f->V) * 4);
  float *l2 = malloc((size_t)(c->n_prompt * f->V) * 4);
  double worst;
  int32_t next;
  for (int k = 0; k < 2; k++)
    assert_int_equal(epic_model_kvcache_create(f->m, 0, 4, 64, &kc[k]), EPIC_OK);
  epic_seq_batch b1 = {.tokens = c->prompt, .n_tokens = c->n_prompt, .kv = &s[0], .all_logits = 1};
  epic_seq_batch b2 = b1;
  b2.kv = &s[1];
  worst = forward_mb12(f, kc, &b1, &b2, 1, l1, l2);
  next = epic_argmax(l1 + (c->n_prompt - 1) * f->V, f->V);
  for (int64_t t = 0; t < 3 && t < c->n_gen; t++) {
    assert_int_equal(next, c->gen[t]);
    b1 = (epic_seq_batch){.tokens = &next, .n_tokens = 1, .start = c->n_prompt + t, .kv = &s[0]};
    b2 = b1;
    b2.kv = &s[1];
    double d = forward_mb12(f, kc, &b1, &b2, 1, l1, l2);
    if (d > worst) worst = d;
    next = epic_argmax(l1, f->V);
  }
  print_message("%s micro-batches 2 vs 1, one sequence: max |dlogit| %.3g\n", f->model, worst);
  assert_true(worst <= MB_TOL);
  for (int k = 0; k < 2; k++) {
    epic_kvcache_seq_release(kc[k], &s[k]);
    epic_kvcache_destroy(kc[k]);
  }
  free(l1);
  free(l2);
}

/* The MTP layer over a batch of every case that has one, and over a lone one. */
static void test_micro_batches_mtp(void **state) {
  fixture *f = *state;
  const int64_t D = epic_model_get_config(f->m)->hidden_size;
  epic_kvcache *kc, *km[2];
  epic_kv_seq s[MAX_CASES] = {{0}}, sm[2][MAX_CASES] = {{{0}}};
  epic_seq_batch bm[2][MAX_CASES];
  float *hid[MAX_CASES] = {0}, *l1, *l2;
  int64_t rows = 0;
  int nb = 0;
  double worst = 0;
  assert_int_equal(epic_model_kvcache_create(f->m, 0, 8, 256, &kc), EPIC_OK);
  for (int k = 0; k < 2; k++)
    assert_int_equal(epic_model_kvcache_create(f->m, 1, 8, 256, &km[k]), EPIC_OK);
  for (int i = 0; i < f->n_cases; i++) {
    tcase *c = &f->cases[i];
    float *lg;
    if (c->n_prompt < 2) continue; /* nothing for the MTP layer to predict */
    lg = malloc((size_t)(c->n_prompt * f->V) * 4);
    hid[nb] = malloc((size_t)(c->n_prompt * D) * 4);
    epic_seq_batch b = {.tokens = c->prompt, .n_tokens = c->n_prompt, .kv = &s[i], .all_logits = 1};
    assert_int_equal(epic_model_forward(f->m, kc, &b, 1, lg, hid[nb]), EPIC_OK);
    free(lg);
    for (int k = 0; k < 2; k++)
      bm[k][nb] = (epic_seq_batch){.tokens = c->prompt + 1, .n_tokens = c->n_prompt - 1,
                                   .kv = &sm[k][nb], .all_logits = 1, .hidden = hid[nb]};
    rows += c->n_prompt - 1;
    nb++;
  }
  l1 = malloc((size_t)(rows * f->V) * 4);
  l2 = malloc((size_t)(rows * f->V) * 4);
  /* every case at once, then the first case's MTP cache alone for one more token */
  for (int round = 0; round < 2; round++) {
    const int n = round == 0 ? nb : 1;
    if (round == 1)
      for (int k = 0; k < 2; k++) {
        epic_kvcache_seq_truncate(km[k], &sm[k][0], 0);
        bm[k][0].n_tokens = 1;
        bm[k][0].all_logits = 0;
      }
    const int64_t r = epic_batch_out_rows(bm[0], n);
    assert_int_equal(epic_model_set_micro_batches(f->m, 1), EPIC_OK);
    assert_int_equal(epic_model_mtp_forward(f->m, km[0], bm[0], n, l1), EPIC_OK);
    assert_int_equal(epic_model_set_micro_batches(f->m, 2), EPIC_OK);
    assert_int_equal(epic_model_mtp_forward(f->m, km[1], bm[1], n, l2), EPIC_OK);
    assert_int_equal(epic_model_set_micro_batches(f->m, 1), EPIC_OK);
    for (int64_t j = 0; j < r; j++)
      assert_int_equal(epic_argmax(l1 + j * f->V, f->V), epic_argmax(l2 + j * f->V, f->V));
    double d = max_abs_diff(l1, l2, r * f->V);
    if (d > worst) worst = d;
  }
  print_message("%s micro-batches 2 vs 1, MTP: max |dlogit| %.3g\n", f->model, worst);
  assert_true(worst <= MB_TOL);
  for (int i = 0; i < f->n_cases; i++) {
    epic_kvcache_seq_release(kc, &s[i]);
    for (int k = 0; k < 2; k++) epic_kvcache_seq_release(km[k], &sm[k][i]);
    free(hid[i]);
  }
  epic_kvcache_destroy(kc);
  for (int k = 0; k < 2; k++) epic_kvcache_destroy(km[k]);
  free(l1);
  free(l2);
}

/* The time breakdown of a single process: every part accounted, no exchange. */
static void test_stats(void **state) {
  fixture *f = *state;
  tcase *c = &f->cases[f->n_cases - 1];
  epic_kvcache *kc;
  epic_kv_seq s = {0};
  epic_model_stats st;
  float *logits = malloc((size_t)f->V * 4);
  assert_int_equal(epic_model_set_micro_batches(f->m, 0), EPIC_ERR_INVALID);
  assert_int_equal(epic_model_set_micro_batches(f->m, 3), EPIC_ERR_INVALID);
  assert_int_equal(epic_model_kvcache_create(f->m, 0, 8, 64, &kc), EPIC_OK);
  const epic_model_config *cfg = epic_model_get_config(f->m);
  const int64_t E = cfg->n_routed_experts;
  int64_t *cnt0 = calloc((size_t)E, sizeof *cnt0), *cnt1 = calloc((size_t)E, sizeof *cnt1);
  int64_t moe_layers = 0, routed = 0;
  assert_int_equal(epic_model_expert_tokens(f->m, cnt0), EPIC_OK);
  for (int64_t l = 0; l < cfg->num_hidden_layers; l++) moe_layers += epic_config_is_moe_layer(cfg, l);
  epic_model_reset_stats(f->m);
  epic_model_get_stats(f->m, &st);
  assert_int_equal(st.forwards, 0);
  assert_true(st.total_s == 0);
  assert_true(c->n_prompt >= 8);
  for (int mb = 1; mb <= 2; mb++) {
    epic_seq_batch b = {.tokens = c->prompt + (mb - 1) * 4, .n_tokens = 4, .start = (mb - 1) * 4,
                        .kv = &s};
    assert_int_equal(epic_model_set_micro_batches(f->m, mb), EPIC_OK);
    assert_int_equal(epic_model_forward(f->m, kc, &b, 1, logits, NULL), EPIC_OK);
  }
  epic_model_set_micro_batches(f->m, 1);
  /* Routing statistics: every (token, expert) pair of every MoE layer, once. */
  assert_int_equal(epic_model_expert_tokens(f->m, cnt1), EPIC_OK);
  for (int64_t e = 0; e < E; e++) {
    assert_true(cnt1[e] >= cnt0[e]);
    routed += cnt1[e] - cnt0[e];
  }
  assert_int_equal(routed, 8 * cfg->num_experts_per_tok * moe_layers);
  free(cnt0);
  free(cnt1);
  epic_model_get_stats(f->m, &st);
  assert_int_equal(st.forwards, 2);
  assert_int_equal(st.tokens, 8);
  assert_true(st.total_s > 0 && st.attention_s > 0 && st.dense_s > 0 && st.experts_s > 0);
  assert_true(st.other_s > -1e-9);
  assert_true(st.dispatch_wait_s == 0 && st.combine_wait_s == 0);
  assert_true(fabs(st.attention_s + st.dense_s + st.experts_s + st.other_s - st.total_s) < 1e-9);
  assert_int_equal(st.a2a_calls, 0);
  assert_int_equal(st.dispatch_bytes + st.combine_bytes, 0);
  epic_model_reset_stats(f->m);
  epic_model_get_stats(f->m, &st);
  assert_int_equal(st.forwards + st.tokens, 0);
  epic_kvcache_seq_release(kc, &s);
  epic_kvcache_destroy(kc);
  free(logits);
}


/* ------------------------------------------------------------------------
 * Other DeepSeek-V3-style configs (no q_lora_rank, n_group 1, no YaRN, other
 * head sizes and expert counts, softmax routing without bias, several shared
 * experts, MTP): dummy weights, checked for the engine invariants. */
static const char *CONFIG_A =
    "{\"model_type\":\"deepseek_v3\",\"vocab_size\":300,\"hidden_size\":64,\"intermediate_size\":96,"
    "\"moe_intermediate_size\":24,\"num_hidden_layers\":2,\"num_nextn_predict_layers\":1,"
    "\"num_attention_heads\":2,\"num_key_value_heads\":2,\"q_lora_rank\":null,\"kv_lora_rank\":32,"
    "\"qk_nope_head_dim\":16,\"qk_rope_head_dim\":8,\"v_head_dim\":24,\"n_routed_experts\":6,"
    "\"n_shared_experts\":2,\"num_experts_per_tok\":2,\"n_group\":1,\"topk_group\":1,"
    "\"topk_method\":\"noaux_tc\",\"scoring_func\":\"sigmoid\",\"norm_topk_prob\":true,"
    "\"routed_scaling_factor\":1.5,\"first_k_dense_replace\":0,\"moe_layer_freq\":1,"
    "\"hidden_act\":\"silu\",\"rms_norm_eps\":1e-6,\"rope_theta\":10000,\"rope_scaling\":null,"
    "\"max_position_embeddings\":4096,\"tie_word_embeddings\":false,\"bos_token_id\":0,"
    "\"eos_token_id\":1}";
static const char *CONFIG_B =
    "{\"model_type\":\"deepseek_v3\",\"vocab_size\":257,\"hidden_size\":96,\"intermediate_size\":80,"
    "\"moe_intermediate_size\":40,\"num_hidden_layers\":3,\"num_nextn_predict_layers\":0,"
    "\"num_attention_heads\":3,\"num_key_value_heads\":3,\"q_lora_rank\":48,\"kv_lora_rank\":40,"
    "\"qk_nope_head_dim\":8,\"qk_rope_head_dim\":32,\"v_head_dim\":8,\"n_routed_experts\":8,"
    "\"n_shared_experts\":0,\"num_experts_per_tok\":3,\"n_group\":2,\"topk_group\":1,"
    "\"topk_method\":\"greedy\",\"scoring_func\":\"softmax\",\"norm_topk_prob\":false,"
    "\"routed_scaling_factor\":1.0,\"first_k_dense_replace\":1,\"moe_layer_freq\":1,"
    "\"hidden_act\":\"silu\",\"rms_norm_eps\":1e-5,\"rope_theta\":50000,"
    "\"rope_scaling\":{\"type\":\"yarn\",\"factor\":4,\"original_max_position_embeddings\":512,"
    "\"beta_fast\":16,\"beta_slow\":2,\"mscale\":0.707,\"mscale_all_dim\":0.707},"
    "\"max_position_embeddings\":2048,\"tie_word_embeddings\":true,\"bos_token_id\":0,"
    "\"eos_token_id\":[1,2],\"quantization_config\":{\"quant_method\":\"fp8\",\"fmt\":\"e4m3\","
    "\"activation_scheme\":\"dynamic\",\"weight_block_size\":[32,32]}}";

static void check_config(const char *json, int expect_mtp) {
  char dir[] = "/tmp/epic-cfg-XXXXXX", path[256];
  epic_ops *ops;
  epic_model *m;
  epic_kvcache *kc;
  epic_kv_seq s1 = {0}, s2 = {0}, s3 = {0};
  FILE *fp;
  assert_non_null(mkdtemp(dir));
  snprintf(path, sizeof path, "%s/config.json", dir);
  fp = fopen(path, "w");
  fputs(json, fp);
  fclose(fp);
  epic_model_params mp = {.size = sizeof mp, .dir = dir, .load_format = EPIC_LOAD_DUMMY, .seed = 3,
                          .load_mtp = 1};
  assert_int_equal(epic_ops_cpu_create(0, &ops), EPIC_OK);
  assert_int_equal(epic_model_load(ops, &mp, &m), EPIC_OK);
  assert_int_equal(epic_model_has_mtp(m), expect_mtp);
  const epic_model_config *c = epic_model_get_config(m);
  const int64_t V = c->vocab_size, T = 23, D = c->hidden_size;
  int32_t toks[23], other[9];
  for (int i = 0; i < T; i++) toks[i] = (int32_t)((i * 97 + 5) % V);
  for (int i = 0; i < 9; i++) other[i] = (int32_t)((i * 31 + 2) % V);
  float *full = malloc((size_t)(T * V) * 4), *one = malloc((size_t)(2 * 9 * V) * 4);
  float *hid = malloc((size_t)(T * D) * 4);
  assert_int_equal(epic_model_kvcache_create(m, 0, 4, 64, &kc), EPIC_OK);
  epic_seq_batch b = {.tokens = toks, .n_tokens = T, .kv = &s1, .all_logits = 1};
  assert_int_equal(epic_model_forward(m, kc, &b, 1, full, hid), EPIC_OK);
  for (int64_t i = 0; i < T * V; i++) assert_true(isfinite(full[i]));
  double worst = 0;
  /* incremental, batched beside another sequence's prefill chunk */
  for (int64_t t = 0; t < T; t++) {
    epic_seq_batch bb[2] = {{.tokens = toks + t, .n_tokens = 1, .start = t, .kv = &s2},
                            {.tokens = other, .n_tokens = 9, .start = s3.n_tokens, .kv = &s3}};
    int nb = s3.n_tokens + 9 <= 40 ? 2 : 1;
    assert_int_equal(epic_model_forward(m, kc, bb, nb, one, NULL), EPIC_OK);
    double d = max_abs_diff(one, full + t * V, V);
    if (d > worst) worst = d;
  }
  print_message("config (vocab %lld): incremental+batched vs full max |d| %.3g\n", (long long)V, worst);
  assert_true(worst <= 1e-4);
  if (expect_mtp) {
    epic_kvcache *km;
    epic_kv_seq sm = {0};
    float *ml = malloc((size_t)(T * V) * 4);
    assert_int_equal(epic_model_kvcache_create(m, 1, 4, 16, &km), EPIC_OK);
    epic_seq_batch bm = {.tokens = toks + 1, .n_tokens = T - 1, .kv = &sm, .all_logits = 1, .hidden = hid};
    assert_int_equal(epic_model_mtp_forward(m, km, &bm, 1, ml), EPIC_OK);
    for (int64_t i = 0; i < (T - 1) * V; i++) assert_true(isfinite(ml[i]));
    epic_kvcache_seq_release(km, &sm);
    epic_kvcache_destroy(km);
    free(ml);
  }
  epic_kvcache_seq_release(kc, &s1);
  epic_kvcache_seq_release(kc, &s2);
  epic_kvcache_seq_release(kc, &s3);
  epic_kvcache_destroy(kc);
  epic_model_destroy(m);
  epic_ops_destroy(ops);
  free(full);
  free(one);
  free(hid);
  unlink(path);
  rmdir(dir);
}

static void test_other_configs(void **state) {
  (void)state;
  check_config(CONFIG_A, 1);
  check_config(CONFIG_B, 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_cases_match_reference),
      cmocka_unit_test(test_mtp_logits),
      cmocka_unit_test(test_device_paths_mtp),
      cmocka_unit_test(test_all_hidden),
      cmocka_unit_test(test_incremental_equals_full),
      cmocka_unit_test(test_short_chunk_equals_decode),
      cmocka_unit_test(test_joined_weights),
      cmocka_unit_test(test_head_bf16),
      cmocka_unit_test(test_device_paths),
      cmocka_unit_test(test_draws),
      cmocka_unit_test(test_batched_mixed),
      cmocka_unit_test(test_cache_full_is_clean),
      cmocka_unit_test(test_micro_batches_mixed),
      cmocka_unit_test(test_micro_batches_single),
      cmocka_unit_test(test_micro_batches_mtp),
      cmocka_unit_test(test_stats),
  };
  int fails = cmocka_run_group_tests_name("model tiny-bf16", tests, setup_bf16, teardown);
  fails += cmocka_run_group_tests_name("model tiny-fp8", tests, setup_fp8, teardown);
  const struct CMUnitTest other[] = {cmocka_unit_test(test_other_configs)};
  fails += cmocka_run_group_tests_name("model other configs", other, NULL, NULL);
  return fails;
}
