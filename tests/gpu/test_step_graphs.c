/* Decode-step graphs (worker/model.h, epic_model_set_step_graphs) on the CUDA backend:
 * a replayed step must give the bits the same step gives when its ops run directly.
 *
 * The model is a dummy-weight DeepSeek-V3 layout with the real attention head shape
 * (the shape the BF16 decode kernel takes) and FP8 block-scaled weights, small enough
 * to load in a second. 320 sequences of different prompt lengths are prefilled; the
 * first 12 are decoded for 48 steps while the batch changes (12, 8, 5, 1 sequences ...), so steps
 * replay graphs, record new buckets when the batch or the context bound changes, and
 * grow block tables into new pages. Every step's greedy picks (ids and log-probs) and,
 * every 8th step, every row's logits are compared bit for bit between a run with graphs
 * off and one with graphs on; the second must have recorded and replayed graphs. A second
 * schedule runs every batch size from 1 to 40 for three steps each: more buckets than the
 * model keeps graphs (EPIC_MODEL_STEP_GRAPHS), so recorded graphs are evicted and
 * buckets recorded again, with the same bits. A third decodes batches of 320, 200, 129
 * and 72 sequences: above 128 tokens the expert plan stayed on the host (no graph) until
 * the device plan took decode batches up to 512 (worker/model.c DEV_PLAN_MAX_TOKENS). A
 * fourth runs MTP verify steps: two rows per sequence (the last token and a draft),
 * the draft kept or rolled back, the first schedule's batch sizes; and again in the
 * invariant precision (EPIC_CUDA_PRECISION=invariant).
 * The exact precision (EPIC_CUDA_PRECISION=exact), whose expert matmuls read their
 * group sizes back to the host, cannot be recorded: the same run there must record
 * nothing and still give the direct run's bits.
 * Exits 77 (CTest skip) without a GPU. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "kernels/cuda/ops_cuda.h"
#include "kernels/ops.h"
#include "worker/model.h"

enum { N_SEQ = 320, STEPS_MAX = 120, PAGE = 16, LOGIT_EVERY = 8 };

static const char CONFIG[] =
    "{\"architectures\": [\"DeepseekV3ForCausalLM\"], \"model_type\": \"deepseek_v3\",\n"
    " \"hidden_size\": 1024, \"intermediate_size\": 1536, \"moe_intermediate_size\": 256,\n"
    " \"num_hidden_layers\": 3, \"first_k_dense_replace\": 1, \"moe_layer_freq\": 1,\n"
    " \"num_attention_heads\": 16, \"num_key_value_heads\": 16, \"q_lora_rank\": 384,\n"
    " \"kv_lora_rank\": 512, \"qk_nope_head_dim\": 128, \"qk_rope_head_dim\": 64,\n"
    " \"v_head_dim\": 128, \"n_routed_experts\": 32, \"num_experts_per_tok\": 4,\n"
    " \"n_group\": 4, \"topk_group\": 2, \"n_shared_experts\": 1, \"norm_topk_prob\": true,\n"
    " \"routed_scaling_factor\": 2.5, \"scoring_func\": \"sigmoid\", \"topk_method\": "
    "\"noaux_tc\",\n"
    " \"vocab_size\": 2048, \"max_position_embeddings\": 4096, \"rms_norm_eps\": 1e-06,\n"
    " \"rope_theta\": 10000, \"rope_scaling\": {\"type\": \"yarn\", \"factor\": 40,\n"
    "  \"beta_fast\": 32, \"beta_slow\": 1, \"mscale\": 1.0, \"mscale_all_dim\": 1.0,\n"
    "  \"original_max_position_embeddings\": 4096},\n"
    " \"num_nextn_predict_layers\": 0, \"tie_word_embeddings\": false,\n"
    " \"quantization_config\": {\"activation_scheme\": \"dynamic\", \"fmt\": \"e4m3\",\n"
    "  \"quant_method\": \"fp8\", \"weight_block_size\": [128, 128]}}\n";

static char g_dir[64];

/* Sequences in the batch at decode step s of a schedule. shrink: the batch shrinks and
 * grows back (48 steps); sizes: every size from 1 to 40, three steps each (120 steps);
 * large: 320, 200, 129 and 72 sequences, four steps each (16 steps); verify: the shrink
 * schedule with two rows per sequence (rows_of); draws: the shrink schedule with seeded
 * draws (epic_seq_batch.draw) on every other sequence. */
typedef enum { SHRINK, SIZES, LARGE, VERIFY, DRAWS } schedule;
static int active(schedule sc, int s) {
  static const int pattern[] = {12, 12, 12, 8, 8, 8, 8, 5, 5, 5, 1, 1, 1, 12, 12, 12};
  static const int large[] = {320, 200, 129, 72};
  if (sc == SIZES) return 1 + s / 3;
  if (sc == LARGE) return large[s / 4];
  return pattern[s % (int)(sizeof pattern / sizeof pattern[0])];
}
static int steps_of(schedule sc) { return sc == SIZES ? 120 : sc == LARGE ? 16 : 48; }
/* Rows per sequence and step: MTP verify steps (VERIFY, the SHRINK pattern) carry the
 * last token and one draft; the draft is kept every third step and rolled back
 * otherwise, so the caches grow by one or two rows a step. */
static int rows_of(schedule sc) { return sc == VERIFY ? 2 : 1; }

typedef struct run_out {
  epic_row_pick picks[STEPS_MAX][N_SEQ]; /* [step][row] */
  float *logits; /* [STEPS_MAX / LOGIT_EVERY][N_SEQ][V] */
  epic_model_stats stats;
} run_out;

/* Prefill, then the schedule's decode steps; fills out. */
static void run(epic_model *m, int graphs, schedule sc, run_out *out) {
  const epic_model_config *c = epic_model_get_config(m);
  const int64_t V = c->vocab_size;
  epic_kvcache *kc = NULL;
  epic_kv_seq seqs[N_SEQ];
  epic_seq_batch b[N_SEQ];
  int32_t prompt[640], next[N_SEQ], rows[N_SEQ][2];
  float *logits = malloc((size_t)(N_SEQ * V) * sizeof *logits);
  uint8_t need[N_SEQ] = {0};
  epic_row_pick picks[N_SEQ];
  epic_draw_params dp[N_SEQ];
  const int per = rows_of(sc);
  void *scratch = malloc(epic_draw_scratch_bytes(V));
  assert_non_null(scratch);
  assert_non_null(logits);
  memset(seqs, 0, sizeof seqs);
  epic_model_set_step_graphs(m, graphs);
  epic_model_reset_stats(m);
  assert_int_equal(
      epic_model_kvcache_create(m, 0, PAGE, N_SEQ * ((512 + STEPS_MAX) / PAGE + 2), &kc), EPIC_OK);
  uint64_t x = 7;
  for (int i = 0; i < 640; i++) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    prompt[i] = (int32_t)((x >> 33) % (uint64_t)V);
  }
  /* Prompts of 37 to 494 tokens: contexts in several octaves, so the context bound
   * (and the attention split) differs between buckets. */
  for (int i = 0; i < N_SEQ; i++) {
    const int64_t len = 37 + 30 * (i % 12) + i % 128; /* prompt + i % 128 + len <= 640 */
    b[0] = (epic_seq_batch){
        .tokens = prompt + i % 128, .n_tokens = len, .start = 0, .kv = &seqs[i]};
    assert_int_equal(epic_model_forward_pick(m, kc, b, 1, logits, need, picks, NULL), EPIC_OK);
    next[i] = picks[0].id;
  }
  for (int s = 0; s < steps_of(sc); s++) {
    const int n = active(sc, s);
    const int want_logits = s % LOGIT_EVERY == LOGIT_EVERY - 1;
    for (int i = 0; i < n; i++) {
      rows[i][0] = next[i];
      rows[i][1] = (int32_t)((next[i] * 7 + s) % V); /* a draft */
      b[i] = (epic_seq_batch){.tokens = rows[i], .n_tokens = per, .start = seqs[i].n_tokens,
                              .kv = &seqs[i], .all_logits = per > 1};
      if (sc == DRAWS && i % 2) { /* a new random value every step, as a sampler's */
        uint64_t z = (uint64_t)(s * 1000 + i) * 0x9e3779b97f4a7c15ull;
        z = (z ^ (z >> 31)) * 0xbf58476d1ce4e5b9ull;
        dp[i] = (epic_draw_params){.temperature = 0.7f + 0.1f * (float)(i % 4),
                                   .top_p = i % 4 == 1 ? 0.9f : 1.0f,
                                   .top_k = i % 8 == 3 ? 20 : 0,
                                   .u = z ^ (z >> 29)};
        b[i].draw = &dp[i];
      }
    }
    assert_int_equal(epic_model_forward_pick(m, kc, b, n, logits, want_logits ? NULL : need,
                                             picks, NULL),
                     EPIC_OK);
    memset(out->picks[s], 0, sizeof out->picks[s]);
    for (int i = 0; i < n * per; i++) out->picks[s][i] = picks[i];
    for (int i = 0; i < n && want_logits && sc == DRAWS; i++) /* the draws are draw.h's */
      if (b[i].draw && picks[i].id != epic_draw_row(logits + (int64_t)i * V, V, &dp[i], scratch))
        fail_msg("step %d sequence %d (graphs %d): drawn %d, the reference draws %d", s, i,
                 graphs, picks[i].id, epic_draw_row(logits + (int64_t)i * V, V, &dp[i], scratch));
    for (int i = 0; i < n; i++) {
      const int keep = per > 1 && s % 3 == 0 ? 2 : 1; /* rows of this step the cache keeps */
      if (keep < per) epic_kvcache_seq_truncate(kc, &seqs[i], seqs[i].n_tokens - (per - keep));
      next[i] = picks[i * per + keep - 1].id;
    }
    if (want_logits)
      memcpy(out->logits + (int64_t)(s / LOGIT_EVERY) * N_SEQ * V, logits,
             (size_t)(n * per * V) * sizeof *logits);
  }
  epic_model_get_stats(m, &out->stats);
  for (int i = 0; i < N_SEQ; i++) epic_kvcache_seq_release(kc, &seqs[i]);
  epic_kvcache_destroy(kc);
  free(logits);
  free(scratch);
}

/* Graphs off, then on, in the precision the environment selects; returns the stats of
 * the run with graphs. */
static epic_model_stats off_vs_on(schedule sc) {
  epic_ops *ops = NULL;
  epic_model *m = NULL;
  assert_int_equal(epic_ops_cuda_create(0, &ops), EPIC_OK);
  assert_true(epic_ops_has_graphs(ops));
  const epic_model_params mp = {.size = sizeof mp, .dir = g_dir, .load_format = EPIC_LOAD_DUMMY,
                                .seed = 3};
  assert_int_equal(epic_model_load(ops, &mp, &m), EPIC_OK);
  const int64_t V = epic_model_get_config(m)->vocab_size;
  const int steps = steps_of(sc);
  const size_t n_logits = (size_t)(STEPS_MAX / LOGIT_EVERY * N_SEQ * V);
  run_out *a = calloc(1, sizeof *a), *g = calloc(1, sizeof *g);
  assert_non_null(a);
  assert_non_null(g);
  a->logits = calloc(n_logits, sizeof(float));
  g->logits = calloc(n_logits, sizeof(float));
  assert_non_null(a->logits);
  assert_non_null(g->logits);
  run(m, 0, sc, a);
  run(m, 1, sc, g);
  assert_int_equal(a->stats.graph_captures + a->stats.graph_replays, 0);
  for (int s = 0; s < steps; s++)
    for (int i = 0; i < active(sc, s) * rows_of(sc); i++) {
      if (a->picks[s][i].id != g->picks[s][i].id ||
          memcmp(&a->picks[s][i].logprob, &g->picks[s][i].logprob, sizeof(float)) != 0)
        fail_msg("step %d sequence %d: direct pick %d (%.9g), with graphs %d (%.9g)", s, i,
                 a->picks[s][i].id, (double)a->picks[s][i].logprob, g->picks[s][i].id,
                 (double)g->picks[s][i].logprob);
    }
  for (size_t k = 0; k < n_logits; k++)
    if (memcmp(&a->logits[k], &g->logits[k], sizeof(float)) != 0)
      fail_msg("logits element %zu: direct %.9g, with graphs %.9g", k, (double)a->logits[k],
               (double)g->logits[k]);
  const epic_model_stats st = g->stats;
  printf("graphs: %lld recorded, %lld of %d decode steps replayed\n",
         (long long)st.graph_captures, (long long)st.graph_replays, steps);
  free(a->logits);
  free(g->logits);
  free(a);
  free(g);
  epic_model_destroy(m);
  epic_ops_destroy(ops);
  return st;
}

static void test_fast_replay_equals_direct(void **state) {
  (void)state;
  unsetenv("EPIC_CUDA_PRECISION");
  const epic_model_stats st = off_vs_on(SHRINK);
  assert_true(st.graph_captures > 0);
  /* A bucket costs one direct and one recorded step; the rest replay. */
  assert_true(st.graph_replays >= steps_of(SHRINK) / 4);
}

/* Draws recorded into the step graphs: the same tokens as direct steps (a new random
 * value every step through the plan), and where the step's logits came back, the C
 * reference's draw on them. */
static void test_draw_replay_equals_direct(void **state) {
  (void)state;
  unsetenv("EPIC_CUDA_PRECISION");
  const epic_model_stats st = off_vs_on(DRAWS);
  assert_true(st.graph_replays >= steps_of(DRAWS) / 4);
}

static void test_buckets_beyond_the_cache(void **state) {
  (void)state;
  unsetenv("EPIC_CUDA_PRECISION");
  const epic_model_stats st = off_vs_on(SIZES);
  /* Every size is a bucket (direct, recorded, replayed) but where its longest context
   * crosses a bound during its three steps: more recorded than the cache keeps. */
  assert_true(st.graph_captures > EPIC_MODEL_STEP_GRAPHS);
  assert_true(st.graph_replays > EPIC_MODEL_STEP_GRAPHS);
}

static void test_large_batches(void **state) {
  (void)state;
  unsetenv("EPIC_CUDA_PRECISION");
  const epic_model_stats st = off_vs_on(LARGE);
  assert_true(st.graph_captures >= 4);
  assert_true(st.graph_replays >= steps_of(LARGE) / 4);
}

/* MTP verify steps (two rows per sequence, drafts kept or rolled back) are recorded and
 * replayed like decode steps, with the same bits. */
static void test_verify_steps(void **state) {
  (void)state;
  unsetenv("EPIC_CUDA_PRECISION");
  const epic_model_stats st = off_vs_on(VERIFY);
  assert_true(st.graph_captures > 0);
  assert_true(st.graph_replays >= steps_of(VERIFY) / 4);
}

/* The same in the invariant precision (EPIC_CUDA_PRECISION=invariant, the one where MTP
 * drafts by default on GPUs): its fixed-shape chunks and dense FP8 matmuls on the expert
 * kernel record and replay alike. */
static void test_invariant_verify_steps(void **state) {
  (void)state;
  setenv("EPIC_CUDA_PRECISION", "invariant", 1);
  const epic_model_stats st = off_vs_on(VERIFY);
  unsetenv("EPIC_CUDA_PRECISION");
  assert_true(st.graph_captures > 0);
  assert_true(st.graph_replays >= steps_of(VERIFY) / 4);
}

static void test_exact_is_not_recorded(void **state) {
  (void)state;
  setenv("EPIC_CUDA_PRECISION", "exact", 1);
  const epic_model_stats st = off_vs_on(SHRINK);
  unsetenv("EPIC_CUDA_PRECISION");
  assert_int_equal(st.graph_captures, 0);
  assert_int_equal(st.graph_replays, 0);
}

static int setup(void **state) {
  (void)state;
  snprintf(g_dir, sizeof g_dir, "/tmp/epic-graphs-XXXXXX");
  if (!mkdtemp(g_dir)) return -1;
  char path[128];
  snprintf(path, sizeof path, "%s/config.json", g_dir);
  FILE *f = fopen(path, "w");
  if (!f) return -1;
  const int ok = fputs(CONFIG, f) >= 0;
  return fclose(f) == 0 && ok ? 0 : -1;
}

static int teardown(void **state) {
  (void)state;
  char path[128];
  snprintf(path, sizeof path, "%s/config.json", g_dir);
  unlink(path);
  rmdir(g_dir);
  return 0;
}

int main(void) {
  if (epic_cuda_device_count() <= 0) {
    printf("SKIP: no CUDA device\n");
    return 77;
  }
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_fast_replay_equals_direct),
      cmocka_unit_test(test_draw_replay_equals_direct),
      cmocka_unit_test(test_buckets_beyond_the_cache),
      cmocka_unit_test(test_large_batches),
      cmocka_unit_test(test_verify_steps),
      cmocka_unit_test(test_invariant_verify_steps),
      cmocka_unit_test(test_exact_is_not_recorded),
  };
  return cmocka_run_group_tests_name("step_graphs_cuda", tests, setup, teardown);
}
