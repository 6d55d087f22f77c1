/* Model throughput on the CPU backend: prefill and decode tokens/s for a batch
 * of sequences, step-latency percentiles, and the decode step's effective
 * weight bandwidth against this machine's measured memcpy bandwidth (decode is
 * memory-bound: every step streams the active weights once).
 * Prints one JSON object. `bench_model --help` for options. */
#define _GNU_SOURCE
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/clock.h"
#include "common/log.h"
#include "kernels/ops.h"
#include "worker/model.h"
#include "worker/sampler.h"

static int cmp_d(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double pct(const double *sorted, int n, double p) {
  int i = (int)(p * (n - 1) + 0.5);
  return sorted[i < 0 ? 0 : (i >= n ? n - 1 : i)];
}

/* Best-of-3 single-thread-per-core memcpy bandwidth over a buffer far larger than cache. */
static double memcpy_gbs(void) {
  const size_t n = (size_t)256 << 20;
  char *a = malloc(n), *b = malloc(n);
  double best = 0;
  if (!a || !b) return 0;
  memset(a, 1, n);
  memset(b, 2, n);
  for (int r = 0; r < 3; r++) {
    double t = epic_now_seconds();
    memcpy(b, a, n);
    t = epic_now_seconds() - t;
    /* a copy reads and writes n bytes each */
    if (2.0 * n / t / 1e9 > best) best = 2.0 * n / t / 1e9;
  }
  free(a);
  free(b);
  return best;
}

/* Bytes of weights one decode token touches: everything except the unchosen experts
 * and all but one embedding row. */
static double active_weight_bytes(const epic_model_config *c) {
  const double wb = c->quant.fp8 ? 1.0 : 2.0, D = (double)c->hidden_size;
  const double H = (double)c->num_attention_heads, L = (double)c->kv_lora_rank;
  const double R = (double)c->qk_rope_head_dim, nope = (double)c->qk_nope_head_dim;
  const double V = (double)c->v_head_dim;
  double attn = (c->q_lora_rank > 0 ? D * c->q_lora_rank + c->q_lora_rank * H * (nope + R)
                                    : D * H * (nope + R)) +
                D * (L + R) + H * (nope + V) * L * 4.0 / wb /* fp32 kv_b copy */ + H * V * D;
  double total = 2.0 * D * c->vocab_size; /* lm_head (bf16) */
  for (int64_t l = 0; l < c->num_hidden_layers; l++) {
    total += attn * wb;
    if (epic_config_is_moe_layer(c, l))
      total += 2.0 * D * c->n_routed_experts + /* bf16 router */
               wb * 3.0 * D * c->moe_intermediate_size *
                   (double)(c->num_experts_per_tok + c->n_shared_experts);
    else
      total += wb * 3.0 * D * c->intermediate_size;
  }
  return total;
}

static const char *USAGE =
    "usage: bench_model --model DIR [--load-format dummy] [options]\n"
    "  --num-layers N --num-experts N   shrink the config (dummy weights)\n"
    "  --batch B          sequences per step (default 1)\n"
    "  --prompt-len P     prefill tokens per sequence (default 64)\n"
    "  --decode-steps N   decode steps (default 16)\n"
    "  --threads N        compute threads (default all)\n"
    "  --micro-batches N  1 or 2 (default 1; see epic_model_set_micro_batches)\n";

int main(int argc, char **argv) {
  static const struct option lo[] = {{"model", 1, 0, 'm'},      {"load-format", 1, 0, 'f'},
                                     {"num-layers", 1, 0, 'l'}, {"num-experts", 1, 0, 'e'},
                                     {"batch", 1, 0, 'b'},      {"prompt-len", 1, 0, 'p'},
                                     {"decode-steps", 1, 0, 'n'}, {"threads", 1, 0, 't'},
                                     {"micro-batches", 1, 0, 'u'}, {"help", 0, 0, 'h'},
                                     {0, 0, 0, 0}};
  const char *dir = NULL;
  int dummy = 0, c;
  long layers = 0, experts = 0, B = 1, P = 64, N = 16, threads = 0, micro = 1;
  while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
    switch (c) {
    case 'm': dir = optarg; break;
    case 'f': dummy = strcmp(optarg, "dummy") == 0; break;
    case 'l': layers = atol(optarg); break;
    case 'e': experts = atol(optarg); break;
    case 'b': B = atol(optarg); break;
    case 'p': P = atol(optarg); break;
    case 'n': N = atol(optarg); break;
    case 't': threads = atol(optarg); break;
    case 'u': micro = atol(optarg); break;
    case 'h': fputs(USAGE, stdout); return 0;
    default: fputs(USAGE, stderr); return 2;
    }
  }
  if (!dir || B < 1 || P < 1 || N < 1) {
    fputs(USAGE, stderr);
    return 2;
  }
  epic_log_init(EPIC_LOG_LEVEL_WARN, -1);
  epic_ops *ops;
  epic_model *m;
  epic_kvcache *kc;
  epic_model_params mp = {.size = sizeof mp, .dir = dir, .load_format = dummy ? EPIC_LOAD_DUMMY : EPIC_LOAD_AUTO,
                          .num_layers = layers, .num_experts = experts, .seed = 1};
  if (epic_ops_cpu_create((int)threads, &ops) != EPIC_OK) return 1;
  double t_load = epic_now_seconds();
  if (epic_model_load(ops, &mp, &m) != EPIC_OK) return 1;
  t_load = epic_now_seconds() - t_load;
  if (epic_model_set_micro_batches(m, (int)micro) != EPIC_OK) return 2;
  const epic_model_config *cfg = epic_model_get_config(m);
  const int64_t V = cfg->vocab_size, page = 64;
  if (epic_model_kvcache_create(m, 0, page, B * ((P + N + page - 1) / page + 1), &kc) != EPIC_OK) return 1;

  epic_kv_seq *seqs = calloc((size_t)B, sizeof *seqs);
  epic_seq_batch *b = calloc((size_t)B, sizeof *b);
  int32_t *prompt = malloc((size_t)(B * P) * sizeof *prompt), *next = malloc((size_t)B * sizeof *next);
  float *logits = malloc((size_t)(B * V) * sizeof(float));
  double *step = malloc((size_t)N * sizeof *step);
  uint64_t x = 12345;
  for (long i = 0; i < B * P; i++) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    prompt[i] = (int32_t)((x >> 33) % (uint64_t)V);
  }
  /* Prefill: every sequence's whole prompt in one batched step. */
  for (long i = 0; i < B; i++)
    b[i] = (epic_seq_batch){.tokens = prompt + i * P, .n_tokens = P, .start = 0, .kv = &seqs[i]};
  double t_pre = epic_now_seconds();
  if (epic_model_forward(m, kc, b, (int)B, logits, NULL) != EPIC_OK) return 1;
  t_pre = epic_now_seconds() - t_pre;
  for (long i = 0; i < B; i++) next[i] = epic_argmax(logits + i * V, V);
  /* Decode: one token per sequence per step. */
  double t_dec = 0;
  for (long s = 0; s < N; s++) {
    for (long i = 0; i < B; i++)
      b[i] = (epic_seq_batch){.tokens = &next[i], .n_tokens = 1, .start = P + s, .kv = &seqs[i]};
    double t = epic_now_seconds();
    if (epic_model_forward(m, kc, b, (int)B, logits, NULL) != EPIC_OK) return 1;
    step[s] = epic_now_seconds() - t;
    t_dec += step[s];
    for (long i = 0; i < B; i++) next[i] = epic_argmax(logits + i * V, V);
  }
  qsort(step, (size_t)N, sizeof *step, cmp_d);
  const double bw = memcpy_gbs(), wbytes = active_weight_bytes(cfg);
  const double med = pct(step, (int)N, 0.5);
  printf("{\"bench\":\"model\",\"model\":\"%s\",\"load_format\":\"%s\",\"layers\":%lld,"
         "\"experts\":%lld,\"fp8\":%s,\"threads\":%ld,\"micro_batches\":%ld,\"batch\":%ld,"
         "\"prompt_len\":%ld,"
         "\"decode_steps\":%ld,\"load_seconds\":%.3f,\"weight_bytes\":%zu,"
         "\"prefill_tokens_per_s\":%.2f,\"decode_tokens_per_s\":%.2f,"
         "\"decode_step_ms\":{\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"max\":%.3f},"
         "\"decode_active_weight_bytes\":%.0f,\"decode_effective_GBps\":%.3f,"
         "\"memcpy_GBps\":%.3f,\"decode_bw_ratio\":%.4f}\n",
         dir, dummy ? "dummy" : "safetensors", (long long)cfg->num_hidden_layers,
         (long long)cfg->n_routed_experts, cfg->quant.fp8 ? "true" : "false", threads, micro, B, P, N,
         t_load, epic_model_weight_bytes(m), (double)(B * P) / t_pre, (double)(B * N) / t_dec,
         1e3 * med, 1e3 * pct(step, (int)N, 0.9), 1e3 * pct(step, (int)N, 0.99),
         1e3 * step[N - 1], wbytes, wbytes / med / 1e9, bw, bw > 0 ? wbytes / med / 1e9 / bw : 0.0);
  for (long i = 0; i < B; i++) epic_kvcache_seq_release(kc, &seqs[i]);
  epic_kvcache_destroy(kc);
  epic_model_destroy(m);
  epic_ops_destroy(ops);
  free(seqs);
  free(b);
  free(prompt);
  free(next);
  free(logits);
  free(step);
  return 0;
}
