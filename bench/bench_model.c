/* Model throughput on the CPU or CUDA backend: prefill and decode tokens/s for a
 * batch of sequences at a given context, step-latency percentiles, and the decode
 * step's effective weight bandwidth against the copy bandwidth measured in the same
 * run (host memcpy for the CPU, the backend's own row copy in GPU memory for CUDA;
 * decode is memory-bound: every step streams the active weights once).
 * Prints one JSON object. `bench_model --help` for options. */
#define _GNU_SOURCE
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/clock.h"
#include "common/log.h"
#include "kernels/ops.h"
#include "worker/model.h"
#ifdef EPIC_HAVE_CUDA
#include "kernels/cuda/ops_cuda.h"
#endif

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

/* Bytes of weights one decode step of B sequences touches: everything except the
 * unchosen experts and all but B embedding rows. The experts a step reads are the
 * distinct ones its B x top_k choices hit: E (1 - (1 - k/E)^B) per MoE layer under
 * uniform routing (what random weights give; trained routers are less uniform, so
 * this is the figure for a balanced load). */
static double active_weight_bytes(const epic_model_config *c, double B, int head_bf16) {
  const double wb = c->quant.fp8 ? 1.0 : 2.0, D = (double)c->hidden_size;
  const double H = (double)c->num_attention_heads, L = (double)c->kv_lora_rank;
  const double R = (double)c->qk_rope_head_dim, nope = (double)c->qk_nope_head_dim;
  const double V = (double)c->v_head_dim;
  double attn = (c->q_lora_rank > 0 ? D * c->q_lora_rank + c->q_lora_rank * H * (nope + R)
                                    : D * H * (nope + R)) +
                D * (L + R) + H * (nope + V) * L * (head_bf16 ? 2.0 : 4.0) / wb /* kv_b copy */ +
                H * V * D;
  double total = 2.0 * D * c->vocab_size; /* lm_head (bf16) */
  for (int64_t l = 0; l < c->num_hidden_layers; l++) {
    total += attn * wb;
    if (epic_config_is_moe_layer(c, l))
    {
      const double E = (double)c->n_routed_experts, k = (double)c->num_experts_per_tok;
      const double used = E > 0 ? E * (1.0 - pow(1.0 - k / E, B)) : 0.0;
      total += 2.0 * D * E + /* bf16 router */
               wb * 3.0 * D * c->moe_intermediate_size * (used + (double)c->n_shared_experts);
    }
    else
      total += wb * 3.0 * D * c->intermediate_size;
  }
  return total;
}

/* Copy bandwidth of the backend's memory through its copy_rows op (bytes read +
 * written per second, best of 5 over 1 GiB), for GPU backends. */
static double ops_copy_gbs(epic_ops *o) {
  const int64_t cols = 1 << 16, rows = 2048; /* 512 MiB each way */
  const size_t bytes = (size_t)(rows * cols) * 4;
  void *a = NULL, *b = NULL;
  double best = 0;
  if (o->vt->alloc(o, bytes, &a) != EPIC_OK || o->vt->alloc(o, bytes, &b) != EPIC_OK) goto done;
  for (int r = 0; r < 6; r++) {
    double t = epic_now_seconds();
    if (o->vt->copy_rows(o, rows, cols, a, cols, NULL, b, cols, NULL) != EPIC_OK ||
        o->vt->sync(o) != EPIC_OK)
      goto done;
    t = epic_now_seconds() - t;
    if (r > 0 && 2.0 * (double)bytes / t / 1e9 > best) best = 2.0 * (double)bytes / t / 1e9;
  }
done:
  o->vt->free(o, a);
  o->vt->free(o, b);
  return best;
}

static const char *USAGE =
    "usage: bench_model --model DIR [--load-format dummy] [options]\n"
    "  --num-layers N --num-experts N   shrink the config (dummy weights)\n"
    "  --device D         cpu or cuda (default cpu)\n"
    "  --batch B          sequences per step (default 1)\n"
    "  --prompt-len P     prompt tokens per sequence = decode context (default 64)\n"
    "  --decode-steps N   decode steps (default 16)\n"
    "  --step-rows R      rows per sequence in each decode step (default 1): R > 1 times\n"
    "                     MTP verify-shaped steps (the last token and R - 1 drafts, the\n"
    "                     LM head and a greedy pick on every row; all rows kept;\n"
    "                     decode tokens/s counts one token per sequence and step)\n"
    "  --prefill-chunk C  prompt tokens of one sequence per prefill step (default: the step\n"
    "                     budget, --step-tokens)\n"
    "  --step-tokens T    tokens of one prefill step (default 8192)\n"
    "  --threads N        CPU compute threads (default all)\n"
    "  --micro-batches N  1 or 2 (default 1; see epic_model_set_micro_batches)\n"
    "  --cuda-graphs on|off  decode steps as recorded graphs where the backend records\n"
    "                     them (default on; see epic_model_set_step_graphs)\n"
    "  --join-weights auto|on|off  q_a with kv_a and gate with up as one weight each\n"
    "                     (default auto: on GPUs; see epic_model_params.join_weights)\n"
    "  --head-bf16 auto|on|off  the absorbed attention's kv_b slices in bf16 (default\n"
    "                     auto: CUDA's fast precision; see epic_model_params.head_bf16)\n";

/* An auto|on|off option as 0 / 1 / -1; -2 (named on stderr) for anything else. */
static int tri_opt(const char *flag, const char *arg) {
  if (strcmp(arg, "auto") && strcmp(arg, "on") && strcmp(arg, "off")) {
    fprintf(stderr, "bench_model: --%s: expected auto, on or off, got '%s'\n", flag, arg);
    return -2;
  }
  return strcmp(arg, "on") == 0 ? 1 : strcmp(arg, "off") == 0 ? -1 : 0;
}

static const char *tri_name(int v) { return v > 0 ? "on" : v < 0 ? "off" : "auto"; }

int main(int argc, char **argv) {
  static const struct option lo[] = {{"model", 1, 0, 'm'},      {"load-format", 1, 0, 'f'},
                                     {"num-layers", 1, 0, 'l'}, {"num-experts", 1, 0, 'e'},
                                     {"batch", 1, 0, 'b'},      {"prompt-len", 1, 0, 'p'},
                                     {"decode-steps", 1, 0, 'n'}, {"threads", 1, 0, 't'},
                                     {"micro-batches", 1, 0, 'u'}, {"device", 1, 0, 'd'},
                                     {"prefill-chunk", 1, 0, 'c'}, {"step-tokens", 1, 0, 's'},
                                     {"cuda-graphs", 1, 0, 'g'}, {"join-weights", 1, 0, 'j'},
                                     {"head-bf16", 1, 0, 'k'},  {"step-rows", 1, 0, 'r'},
                                     {"help", 0, 0, 'h'},       {0, 0, 0, 0}};
  const char *dir = NULL, *device = "cpu";
  int dummy = 0, graphs = 1, join = 0, head_bf16 = 0, c;
  long layers = 0, experts = 0, B = 1, P = 64, N = 16, R = 1, threads = 0, micro = 1, chunk = 0,
       budget = 8192;
  while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
    switch (c) {
    case 'm': dir = optarg; break;
    case 'f': dummy = strcmp(optarg, "dummy") == 0; break;
    case 'l': layers = atol(optarg); break;
    case 'e': experts = atol(optarg); break;
    case 'b': B = atol(optarg); break;
    case 'p': P = atol(optarg); break;
    case 'n': N = atol(optarg); break;
    case 'r': R = atol(optarg); break;
    case 't': threads = atol(optarg); break;
    case 'u': micro = atol(optarg); break;
    case 'd': device = optarg; break;
    case 'c': chunk = atol(optarg); break;
    case 's': budget = atol(optarg); break;
    case 'g':
      if (strcmp(optarg, "on") != 0 && strcmp(optarg, "off") != 0) {
        fprintf(stderr, "bench_model: --cuda-graphs: expected on or off, got '%s'\n", optarg);
        return 2;
      }
      graphs = strcmp(optarg, "on") == 0;
      break;
    case 'j':
      if ((join = tri_opt("join-weights", optarg)) == -2) return 2;
      break;
    case 'k':
      if ((head_bf16 = tri_opt("head-bf16", optarg)) == -2) return 2;
      break;
    case 'h': fputs(USAGE, stdout); return 0;
    default: fputs(USAGE, stderr); return 2;
    }
  }
  if (chunk == 0)
    chunk = budget; /* the engine's default */
  if (!dir || B < 1 || P < 1 || N < 1 || R < 1 || R > 17 || chunk < 1 || budget < 1) {
    fputs(USAGE, stderr);
    return 2;
  }
  epic_log_init(EPIC_LOG_LEVEL_WARN, -1);
  epic_ops *ops = NULL;
  epic_model *m;
  epic_kvcache *kc;
  epic_model_params mp = {.size = sizeof mp, .dir = dir, .load_format = dummy ? EPIC_LOAD_DUMMY : EPIC_LOAD_AUTO,
                          .num_layers = layers, .num_experts = experts, .seed = 1,
                          .step_graphs = graphs ? 0 : -1, .join_weights = join,
                          .head_bf16 = head_bf16};
  const char *dev_name = "cpu";
  if (strcmp(device, "cpu") == 0) {
    if (epic_ops_cpu_create((int)threads, &ops) != EPIC_OK) return 1;
  } else if (strcmp(device, "cuda") == 0) {
#ifdef EPIC_HAVE_CUDA
    if (epic_ops_cuda_create(0, &ops) != EPIC_OK) return 1;
    dev_name = epic_ops_cuda_device_name(ops);
#else
    fprintf(stderr, "bench_model: --device cuda: this build has no CUDA backend\n");
    return 2;
#endif
  } else {
    fprintf(stderr, "bench_model: --device: expected cpu or cuda, got '%s'\n", device);
    return 2;
  }
  double t_load = epic_now_seconds();
  if (epic_model_load(ops, &mp, &m) != EPIC_OK) return 1;
  t_load = epic_now_seconds() - t_load;
  if (epic_model_set_micro_batches(m, (int)micro) != EPIC_OK) return 2;
  const epic_model_config *cfg = epic_model_get_config(m);
  const int64_t V = cfg->vocab_size, page = 64;
  /* Warm-up sequences: the first prefill step's shape once, untimed, so the timed run
   * pays no one-time costs (GEMM plans, buffer growth); they get their own pages. */
  const long n_warm = budget / (P < chunk ? P : chunk) < B ? budget / (P < chunk ? P : chunk) : B;
  const int64_t warm_pages = (n_warm > 0 ? n_warm : 1) * (((P < chunk ? P : chunk) + page - 1) / page + 1);
  const int64_t seq_pages = (P + N * R + page - 1) / page + 1; /* prompt + decode rows */
  if (epic_model_kvcache_create(m, 0, page, B * seq_pages + warm_pages, &kc) != EPIC_OK)
    return 1;

  epic_kv_seq *seqs = calloc((size_t)B, sizeof *seqs);
  epic_seq_batch *b = calloc((size_t)B, sizeof *b);
  int32_t *prompt = malloc((size_t)(B * P) * sizeof *prompt);
  int32_t *next = malloc((size_t)(B * R) * sizeof *next); /* [B][R]: a step's rows */
  int64_t *done_tok = calloc((size_t)B, sizeof *done_tok);
  float *logits = malloc((size_t)(B * R * V) * sizeof(float));
  /* Greedy decoding as the engine runs it: picks made on the backend, no logits row
   * downloaded (need all zero), timed as part of the step. */
  epic_row_pick *picks = malloc((size_t)(B * R) * sizeof *picks);
  uint8_t *need = calloc((size_t)(B * R), 1);
  double *step = malloc((size_t)N * sizeof *step);
  uint64_t x = 12345;
  int64_t prefill_steps = 0;
  if (!seqs || !b || !prompt || !next || !done_tok || !logits || !step || !picks || !need) return 1;
  for (long i = 0; i < B * P; i++) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    prompt[i] = (int32_t)((x >> 33) % (uint64_t)V);
  }
  {
    const long n = n_warm > 0 ? n_warm : 1;
    epic_kv_seq *ws = calloc((size_t)n, sizeof *ws);
    if (!ws) return 1;
    for (long i = 0; i < n; i++)
      b[i] = (epic_seq_batch){.tokens = prompt + i * P, .n_tokens = P < chunk ? P : chunk,
                              .start = 0, .kv = &ws[i]};
    if (epic_model_forward(m, kc, b, (int)n, logits, NULL) != EPIC_OK) return 1;
    for (long i = 0; i < n; i++) epic_kvcache_seq_release(kc, &ws[i]);
    free(ws);
  }
  /* Prefill as a serving engine runs it: chunks of at most `chunk` tokens of a
   * sequence, packed into steps of at most `budget` tokens. */
  double t_pre = epic_now_seconds();
  for (;;) {
    int n = 0;
    int64_t tok = 0;
    for (long i = 0; i < B; i++) {
      int64_t take = P - done_tok[i];
      if (take <= 0) continue;
      if (take > chunk) take = chunk;
      if (n > 0 && tok + take > budget) break;
      b[n++] = (epic_seq_batch){.tokens = prompt + i * P + done_tok[i], .n_tokens = take,
                                .start = done_tok[i], .kv = &seqs[i]};
      tok += take;
    }
    if (n == 0) break;
    if (epic_model_forward_pick(m, kc, b, n, logits, need, picks, NULL) != EPIC_OK) return 1;
    prefill_steps++;
    for (int k = 0; k < n; k++) {
      const long i = (long)(b[k].kv - seqs);
      done_tok[i] += b[k].n_tokens;
      if (done_tok[i] == P)
        for (long r = 0; r < R; r++) next[i * R + r] = picks[k].id;
    }
  }
  t_pre = epic_now_seconds() - t_pre;
  /* Decode: R rows per sequence per step (one token; or a verify step's last token and
   * R - 1 drafts, every row picked, all kept: the next step's rows are this one's picks). */
  double t_dec = 0;
  for (long s = 0; s < N; s++) {
    for (long i = 0; i < B; i++)
      b[i] = (epic_seq_batch){.tokens = &next[i * R], .n_tokens = R, .start = P + s * R,
                              .kv = &seqs[i], .all_logits = R > 1};
    double t = epic_now_seconds();
    if (epic_model_forward_pick(m, kc, b, (int)B, logits, need, picks, NULL) != EPIC_OK) return 1;
    for (long i = 0; i < B * R; i++) next[i] = picks[i].id;
    step[s] = epic_now_seconds() - t;
    t_dec += step[s];
  }
  qsort(step, (size_t)N, sizeof *step, cmp_d);
  const double bw = ops->vt->host_visible ? memcpy_gbs() : ops_copy_gbs(ops);
  const double wbytes = active_weight_bytes(cfg, (double)B, epic_model_head_bf16(m));
  /* The latent cache rows every decode step reads once, at the backend's element size. */
  const double kv_bytes = (double)B * (double)(P + N / 2) * (double)(cfg->kv_lora_rank + cfg->qk_rope_head_dim) *
                          (double)epic_kv_dtype_size(epic_ops_kv_dtype(ops)) *
                          (double)cfg->num_hidden_layers;
  const double med = pct(step, (int)N, 0.5);
  epic_model_stats ms;
  epic_model_get_stats(m, &ms);
  printf("{\"bench\":\"model\",\"model\":\"%s\",\"device\":\"%s\",\"load_format\":\"%s\","
         "\"layers\":%lld,"
         "\"experts\":%lld,\"fp8\":%s,\"threads\":%ld,\"micro_batches\":%ld,\"batch\":%ld,"
         "\"prompt_len\":%ld,\"prefill_chunk\":%ld,\"step_tokens\":%ld,\"prefill_steps\":%lld,"
         "\"decode_steps\":%ld,\"step_rows\":%ld,\"load_seconds\":%.3f,\"weight_bytes\":%zu,"
         "\"prefill_tokens_per_s\":%.2f,\"decode_tokens_per_s\":%.2f,"
         "\"decode_step_ms\":{\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"max\":%.3f},"
         "\"decode_ms_per_layer\":%.4f,\"decode_step_ms_61_layers_linear\":%.3f,"
         "\"decode_active_weight_bytes\":%.0f,\"decode_kv_bytes\":%.0f,"
         "\"decode_effective_GBps\":%.3f,"
         "\"copy_GBps\":%.3f,\"decode_bw_ratio\":%.4f,\"cuda_graphs\":%s,"
         "\"join_weights\":\"%s\",\"head_bf16\":\"%s (%s)\",\"graph_captures\":%lld,"
         "\"graph_replays\":%lld,"
         "\"graph_record_ms\":%.3f}\n",
         dir, dev_name, dummy ? "dummy" : "safetensors", (long long)cfg->num_hidden_layers,
         (long long)cfg->n_routed_experts, cfg->quant.fp8 ? "true" : "false", threads, micro, B, P,
         chunk, budget, (long long)prefill_steps, N, R,
         t_load, epic_model_weight_bytes(m), (double)(B * P) / t_pre, (double)(B * N) / t_dec,
         1e3 * med, 1e3 * pct(step, (int)N, 0.9), 1e3 * pct(step, (int)N, 0.99),
         1e3 * step[N - 1], 1e3 * med / (double)cfg->num_hidden_layers,
         1e3 * med * 61.0 / (double)cfg->num_hidden_layers, wbytes, kv_bytes,
         (wbytes + kv_bytes) / med / 1e9, bw, bw > 0 ? (wbytes + kv_bytes) / med / 1e9 / bw : 0.0,
         graphs && epic_ops_has_graphs(ops) ? "true" : "false",
         tri_name(join), tri_name(head_bf16), epic_model_head_bf16(m) ? "bf16" : "fp32",
         (long long)ms.graph_captures,
         (long long)ms.graph_replays, 1e3 * ms.graph_record_s);
  for (long i = 0; i < B; i++) epic_kvcache_seq_release(kc, &seqs[i]);
  epic_kvcache_destroy(kc);
  epic_model_destroy(m);
  epic_ops_destroy(ops);
  free(seqs);
  free(b);
  free(prompt);
  free(next);
  free(done_tok);
  free(logits);
  free(picks);
  free(need);
  free(step);
  return 0;
}
