/* `epic bench`: end-to-end engine throughput on this machine or cluster
 * (DESIGN §1). It drives the same engine `epic serve` and `epic batch` run, with
 * synthetic prompts, in two phases per micro-batch setting:
 *   prefill: B requests of P prompt tokens and one output token each: prompt
 *            tokens/s over the phase's wall time;
 *   decode:  B requests of P prompt tokens and N output tokens each: output
 *            tokens/s over the window in which every sequence is decoding
 *            (from the last first token to the last token), time per output
 *            token percentiles, time to first token.
 * After each phase every rank reports where its forward time went (model
 * stats: attention, dense, experts, all-to-all waits) and rank 0 prints one JSON
 * object with all of it, the all-to-all share of step time, how much of it two
 * micro-batches hide, and the decode step's weight-streaming bandwidth against
 * this machine's measured memcpy bandwidth (decode is memory-bound).
 *
 * With --shared-prefix S the workload is instead the prefix cache's: per
 * setting (cache off, then on), a fresh engine first runs one request of the
 * S-token shared prefix plus its own P tokens to the end (a system prompt seen
 * before), then B requests of the same prefix plus P tokens of their own arrive
 * at once; their time to first token is the measure. */
#define _GNU_SOURCE
#include "cmd_bench.h"

#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli_engine.h"
#include "cli_util.h"
#include "cluster.h"
#include "comm/comm.h"
#include "common/clock.h"
#include "common/log.h"
#include "coordinator/engine.h"
#include "worker/model.h"

static const char *USAGE_HEAD =
    "usage: [mpirun -np N] epic bench --model DIR [options]\n"
    "\n"
    "Engine throughput with synthetic prompts: a prefill phase (B prompts of P\n"
    "tokens, 1 output token each) and a decode phase (B prompts of P tokens, N\n"
    "output tokens each), per micro-batch setting. Rank 0 prints one JSON object.\n"
    "\n"
    "workload:\n"
    "  --batch B               concurrent sequences in the cluster (default 8)\n"
    "  --prompt-len P          prompt tokens per sequence (default 128)\n"
    "  --gen N                 output tokens per sequence in the decode phase (default 32)\n"
    "  --micro-batches LIST    1, 2 or 1,2 (default 1,2): settings to measure\n"
    "  --seed S                prompt token seed (default 1)\n"
    "  --shared-prefix S       measure the prefix cache instead: after one request with an\n"
    "                          S-token prefix has run, B requests of that prefix + P tokens\n"
    "                          arrive at once; time to first token without and with the cache\n"
    "engine:\n";


typedef struct bench_opts {
  epic_cli_engine_opts e; /* model loading and engine scheduling */
  int mb[2], n_mb;
  int64_t batch, prompt_len, gen, shared_prefix;
  uint64_t seed;
} bench_opts;

static int parse_mb(const char *v, bench_opts *o) {
  if (strcmp(v, "1") == 0 || strcmp(v, "2") == 0) {
    o->mb[0] = v[0] - '0';
    o->n_mb = 1;
  } else if (strcmp(v, "1,2") == 0 || strcmp(v, "2,1") == 0) {
    o->mb[0] = v[0] - '0';
    o->mb[1] = v[2] - '0';
    o->n_mb = 2;
  } else {
    fprintf(stderr, "epic bench: --micro-batches: expected 1, 2 or 1,2, got '%s'\n", v);
    return -1;
  }
  return 0;
}

static const epic_cli_engine_help_line HELP_OWN[] = {
    {EPIC_CLI_ENGINE_MODEL, NULL, "checkpoint directory (config.json [+ safetensors])"},
    {EPIC_CLI_ENGINE_THREADS, NULL, "compute threads per rank (default: cores / ranks per node)"}};

static int parse(int argc, char **argv, bench_opts *o) {
  enum { O_BATCH = 256, O_PLEN, O_GEN, O_MB, O_SEED, O_PREFIX };
  static const struct option own[] = {
      {"batch", 1, 0, O_BATCH}, {"prompt-len", 1, 0, O_PLEN}, {"gen", 1, 0, O_GEN},
      {"micro-batches", 1, 0, O_MB}, {"seed", 1, 0, O_SEED}, {"shared-prefix", 1, 0, O_PREFIX},
      {"help", 0, 0, 'h'}, {0, 0, 0, 0}};
  struct option lo[32];
  const char *cmd = "bench";
  int c;
  memset(o, 0, sizeof *o);
  /* The workload sets batch, queue and KV pages; --micro-batches is a list of
   * settings to measure (below), and the weights' seed is fixed. */
  epic_cli_engine_init(&o->e, cmd,
                       EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_MODEL) |
                           EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_LOAD_FORMAT) |
                           EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_NUM_LAYERS) |
                           EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_NUM_EXPERTS) |
                           EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_THREADS) |
                           EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_COMM) |
                           EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_DEVICE) |
                           EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_CUDA_GRAPHS) |
                           EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_PRECISION) |
                           EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_MEM_PER_RANK) |
                           EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_STEP_TOKENS) |
                           EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_PREFILL_CHUNK) |
                           EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_PAGE_SIZE) |
                           EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_PREFIX_CACHE));
  o->e.weight_seed = 1;
  o->batch = 8;
  o->prompt_len = 128;
  o->gen = 32;
  o->mb[0] = 1;
  o->mb[1] = 2;
  o->n_mb = 2;
  o->seed = 1;
  if (epic_cli_engine_longopts(&o->e, own, lo, sizeof lo / sizeof lo[0])) return -1;
  optind = 1;
  while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
    int bad = epic_cli_engine_parse(&o->e, c, optarg);
    if (bad) {
      bad = bad < 0;
    } else {
      switch (c) {
      case O_BATCH: bad = epic_cli_i64(cmd, "--batch", optarg, 1, 1 << 20, &o->batch); break;
      case O_PLEN: bad = epic_cli_i64(cmd, "--prompt-len", optarg, 1, 1 << 24, &o->prompt_len); break;
      case O_GEN: bad = epic_cli_i64(cmd, "--gen", optarg, 2, 1 << 24, &o->gen); break;
      case O_MB: bad = parse_mb(optarg, o); break;
      case O_SEED: bad = epic_cli_u64(cmd, "--seed", optarg, &o->seed); break;
      case O_PREFIX:
        bad = epic_cli_i64(cmd, "--shared-prefix", optarg, 1, 1 << 24, &o->shared_prefix);
        break;
      case 'h':
        fputs(USAGE_HEAD, stdout);
        epic_cli_engine_help(stdout, &o->e, ~0u, 26, HELP_OWN, sizeof HELP_OWN / sizeof HELP_OWN[0]);
        fputs("  -h, --help              this help\n", stdout);
        return 1;
      default: fputs("epic bench: see --help\n", stderr); return -1;
      }
    }
    if (bad) return -1;
  }
  if (epic_cli_engine_check(&o->e, argc, argv)) return -1;
  if (o->shared_prefix && o->e.prefix_cache_pages < 0) {
    fputs("epic bench: --shared-prefix compares runs without and with the prefix cache; "
          "--prefix-cache off leaves nothing to compare\n", stderr);
    return -1;
  }
  return 0;
}

/* Per-request token timestamps, filled on the engine's driving thread. */
typedef struct req_track {
  double t_submit, t_first, t_last;
  int64_t n_tokens;
  double *gaps; /* inter-token gaps, n_tokens - 1 of them */
  int finished, failed;
} req_track;

static int on_token(void *user, int32_t id, float logprob) {
  req_track *r = user;
  const double now = epic_now_seconds();
  (void)id;
  (void)logprob;
  if (r->n_tokens == 0)
    r->t_first = now;
  else
    r->gaps[r->n_tokens - 1] = now - r->t_last;
  r->t_last = now;
  r->n_tokens++;
  return 0;
}

static void on_finish(void *user, const epic_engine_result *res) {
  req_track *r = user;
  r->finished = 1;
  r->failed = res->finish == EPIC_ENGINE_FINISH_ERROR || res->finish == EPIC_ENGINE_FINISH_CANCELLED;
}

static int cmp_d(const void *a, const void *b) {
  const double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double pct(double *v, int64_t n, double p) {
  if (n <= 0) return 0;
  qsort(v, (size_t)n, sizeof *v, cmp_d);
  int64_t i = (int64_t)(p * (double)(n - 1) + 0.5);
  return v[i < 0 ? 0 : (i >= n ? n - 1 : i)];
}

/* Best of 3 copies of a buffer far larger than the caches: bytes read + written. */
static double memcpy_gbs(void) {
  const size_t n = (size_t)256 << 20;
  char *a = malloc(n), *b = malloc(n);
  double best = 0;
  if (a && b) {
    memset(a, 1, n);
    memset(b, 2, n);
    for (int r = 0; r < 3; r++) {
      double t = epic_now_seconds();
      memcpy(b, a, n);
      t = epic_now_seconds() - t;
      if (2.0 * (double)n / t / 1e9 > best) best = 2.0 * (double)n / t / 1e9;
    }
  }
  free(a);
  free(b);
  return best;
}

typedef struct phase_result {
  double seconds, tokens_per_s, ttft_p50, ttft_p99, tpot_p50, tpot_p99, decode_window_s;
  int64_t tokens, failed;
} phase_result;

/* The model stats fields gathered from every rank, as doubles. */
enum { ST_TOTAL, ST_ATTN, ST_DENSE, ST_EXPERTS, ST_DISPATCH, ST_COMBINE, ST_OTHER, ST_TOKENS,
       ST_FORWARDS, ST_BYTES, ST_GRAPH_CAPTURES, ST_GRAPH_REPLAYS, ST_N };
static const char *ST_NAMES[ST_N] = {"total_s", "attention_s", "dense_s", "experts_s",
                                     "dispatch_wait_s", "combine_wait_s", "other_s", "tokens",
                                     "forwards", "a2a_bytes_sent", "graph_captures",
                                     "graph_replays"};

static void stats_vec(const epic_model_stats *s, double *v) {
  v[ST_TOTAL] = s->total_s;
  v[ST_ATTN] = s->attention_s;
  v[ST_DENSE] = s->dense_s;
  v[ST_EXPERTS] = s->experts_s;
  v[ST_DISPATCH] = s->dispatch_wait_s;
  v[ST_COMBINE] = s->combine_wait_s;
  v[ST_OTHER] = s->other_s;
  v[ST_TOKENS] = (double)s->tokens;
  v[ST_FORWARDS] = (double)s->forwards;
  v[ST_BYTES] = (double)(s->dispatch_bytes + s->combine_bytes);
  v[ST_GRAPH_CAPTURES] = (double)s->graph_captures;
  v[ST_GRAPH_REPLAYS] = (double)s->graph_replays;
}

/* One phase on every rank: a fresh engine with micro-batch setting mb; rank 0
 * submits B requests of P random tokens and n_gen outputs and drives them to the
 * end. all_stats (rank 0, [nranks][ST_N]) gets every rank's forward breakdown. */
static epic_status run_phase(epic_cluster *cl, const bench_opts *o, int mb, int64_t n_gen,
                             phase_result *pr, double *all_stats) {
  epic_model *m = epic_cluster_model(cl);
  epic_comm *comm = epic_cluster_comm(cl);
  const int rank = epic_cluster_rank(cl);
  const epic_model_config *cfg = epic_model_get_config(m);
  const int64_t B = o->batch, P = o->prompt_len;
  const int64_t pages = ((P + n_gen + o->e.page_size - 1) / o->e.page_size + 1) * B;
  epic_engine_params ep;
  epic_cli_engine_engine_params(&o->e, m, comm, &ep);
  ep.kv_pages = pages;
  ep.max_batch = B;
  ep.max_queue = B;
  ep.micro_batches = mb;
  epic_engine *e = NULL;
  req_track *tr = NULL;
  int32_t *prompt = NULL;
  double *ttft = NULL, *gaps = NULL, mine[ST_N];
  epic_model_stats ms;
  epic_status st;
  memset(pr, 0, sizeof *pr);
  epic_model_reset_stats(m);
  EPIC_CHECK(epic_engine_create(&ep, &e));
  if (rank != 0) {
    st = epic_engine_run(e);
    goto gather;
  }
  tr = calloc((size_t)B, sizeof *tr);
  prompt = malloc((size_t)P * sizeof *prompt);
  ttft = malloc((size_t)B * sizeof *ttft);
  gaps = malloc((size_t)(B * n_gen) * sizeof *gaps);
  st = EPIC_ERR_NOMEM;
  if (!tr || !prompt || !ttft || !gaps) {
    epic_engine_shutdown(e, 0);
    epic_engine_run(e);
    goto gather;
  }
  {
    uint64_t x = o->seed * 0x9E3779B97F4A7C15ull + 1;
    const double t0 = epic_now_seconds();
    st = EPIC_OK;
    for (int64_t i = 0; i < B && st == EPIC_OK; i++) {
      for (int64_t t = 0; t < P; t++) { /* xorshift: distinct prompts, no EOS stops (ignore_eos) */
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        prompt[t] = (int32_t)(x % (uint64_t)cfg->vocab_size);
      }
      tr[i].gaps = gaps + i * n_gen;
      tr[i].t_submit = epic_now_seconds();
      epic_engine_request rq = {.size = sizeof rq,
                                .prompt = prompt,
                                .n_prompt = P,
                                .max_new_tokens = n_gen,
                                .sampling = {.size = sizeof(epic_sampling_params), .top_p = 1.0f},
                                .ignore_eos = 1,
                                .on_token = on_token,
                                .on_finish = on_finish,
                                .user = &tr[i]};
      st = epic_engine_submit(e, &rq, NULL);
    }
    epic_engine_shutdown(e, st == EPIC_OK); /* drain what was submitted, then return */
    epic_status st2 = epic_engine_run(e);
    if (st == EPIC_OK) st = st2;
    pr->seconds = epic_now_seconds() - t0;
    double last_first = 0, end = 0;
    int64_t n_gaps = 0, decode_tokens = 0;
    for (int64_t i = 0; i < B; i++) {
      pr->failed += !tr[i].finished || tr[i].failed;
      pr->tokens += tr[i].n_tokens;
      ttft[i] = tr[i].t_first - tr[i].t_submit;
      if (tr[i].t_first > last_first) last_first = tr[i].t_first;
      if (tr[i].t_last > end) end = tr[i].t_last;
      for (int64_t k = 0; k + 1 < tr[i].n_tokens; k++) gaps[n_gaps++] = tr[i].gaps[k];
    }
    /* Tokens produced after every sequence had its first token: the pure decode window. */
    for (int64_t i = 0; i < B; i++) {
      double t = tr[i].t_first;
      for (int64_t k = 0; k + 1 < tr[i].n_tokens; k++) {
        t += tr[i].gaps[k];
        decode_tokens += t > last_first;
      }
    }
    pr->decode_window_s = end - last_first;
    pr->tokens_per_s = n_gen == 1 ? (double)(B * P) / pr->seconds
                                  : (pr->decode_window_s > 0 ? (double)decode_tokens / pr->decode_window_s : 0);
    pr->ttft_p50 = pct(ttft, B, 0.5);
    pr->ttft_p99 = pct(ttft, B, 0.99);
    pr->tpot_p50 = pct(gaps, n_gaps, 0.5);
    pr->tpot_p99 = pct(gaps, n_gaps, 0.99);
  }
gather:
  epic_engine_destroy(e);
  epic_model_get_stats(m, &ms);
  stats_vec(&ms, mine);
  if (comm) {
    epic_status st2 = epic_comm_gather(comm, mine, all_stats, sizeof mine, 0);
    if (st == EPIC_OK) st = st2;
  } else {
    memcpy(all_stats, mine, sizeof mine);
  }
  free(tr);
  free(prompt);
  free(ttft);
  free(gaps);
  return st;
}

/* xorshift: distinct prompts, no EOS stops needed (requests ignore EOS) */
static void fill_tokens(uint64_t *x, int32_t *out, int64_t n, int64_t vocab) {
  for (int64_t t = 0; t < n; t++) {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    out[t] = (int32_t)(*x % (uint64_t)vocab);
  }
}

typedef struct prefix_result {
  double seconds, ttft_p50, ttft_p90, ttft_mean;
  int64_t failed, prompt_tokens, hits, hit_tokens, cached_pages, budget_pages;
} prefix_result;

/* One --shared-prefix setting on every rank (cache on or off): a fresh engine;
 * rank 0 runs the priming request to its end (stepping the engine itself),
 * then submits the B requests at once and drains them. Only those B count. */
static epic_status run_prefix_phase(epic_cluster *cl, const bench_opts *o, int cache_on,
                                    prefix_result *pr) {
  epic_model *m = epic_cluster_model(cl);
  const epic_model_config *cfg = epic_model_get_config(m);
  const int64_t B = o->batch, S = o->shared_prefix, P = o->prompt_len, n = S + P;
  epic_engine_params ep;
  epic_cli_engine_engine_params(&o->e, m, epic_cluster_comm(cl), &ep);
  /* Room for every request at once without sharing (the cache never decides
   * admission), plus the priming request's prefix pages, so that the default
   * budget (half of the pages) holds the whole prefix even for B = 1. */
  ep.kv_pages = ((n + o->gen + o->e.page_size - 1) / o->e.page_size + 1) * B +
                (S + o->e.page_size - 1) / o->e.page_size;
  ep.max_batch = B;
  ep.max_queue = B + 1;
  ep.micro_batches = o->mb[0];
  if (!cache_on) {
    ep.prefix_cache_pages = -1;
    ep.prefix_cache_bytes = 0;
  }
  epic_engine *e = NULL;
  req_track *tr = NULL;
  int32_t *prompts = NULL;
  double *ttft = NULL, *gaps = NULL;
  epic_engine_stats s0 = {0}, s1 = {0};
  epic_status st;
  memset(pr, 0, sizeof *pr);
  EPIC_CHECK(epic_engine_create(&ep, &e));
  if (epic_cluster_rank(cl) != 0) {
    st = epic_engine_run(e);
    epic_engine_destroy(e);
    return st;
  }
  tr = calloc((size_t)B + 1, sizeof *tr);
  prompts = malloc((size_t)((B + 1) * n) * sizeof *prompts);
  ttft = malloc((size_t)B * sizeof *ttft);
  gaps = malloc((size_t)((B + 1) * o->gen) * sizeof *gaps);
  st = EPIC_ERR_NOMEM;
  if (!tr || !prompts || !ttft || !gaps) goto stop;
  {
    uint64_t x = o->seed * 0x9E3779B97F4A7C15ull + 1;
    fill_tokens(&x, prompts, S, cfg->vocab_size);
    for (int64_t i = 0; i <= B; i++) {
      if (i) memcpy(prompts + i * n, prompts, (size_t)S * sizeof *prompts);
      fill_tokens(&x, prompts + i * n + S, P, cfg->vocab_size);
      tr[i].gaps = gaps + i * o->gen;
    }
  }
  st = EPIC_OK;
  for (int64_t i = 0; i <= B && st == EPIC_OK; i++) {
    epic_engine_request rq = {.size = sizeof rq,
                              .prompt = prompts + i * n,
                              .n_prompt = n,
                              .max_new_tokens = i ? o->gen : 1,
                              .sampling = {.size = sizeof(epic_sampling_params), .top_p = 1.0f},
                              .ignore_eos = 1,
                              .on_token = on_token,
                              .on_finish = on_finish,
                              .user = &tr[i]};
    tr[i].t_submit = epic_now_seconds();
    st = epic_engine_submit(e, &rq, NULL);
    while (i == 0 && st == EPIC_OK && !tr[0].finished) { /* the priming request, alone */
      int idle = 0;
      st = epic_engine_step(e, &idle);
      if (st == EPIC_OK && idle && !tr[0].finished) st = EPIC_ERR_CANCELLED;
    }
    if (i == 0) {
      if (st == EPIC_OK && tr[0].failed) st = EPIC_ERR_CANCELLED;
      epic_engine_get_stats(e, &s0);
      pr->seconds = epic_now_seconds();
    }
  }
stop:
  epic_engine_shutdown(e, st == EPIC_OK); /* drain what was submitted, then return */
  {
    epic_status st2 = epic_engine_run(e);
    if (st == EPIC_OK) st = st2;
  }
  if (st == EPIC_OK) {
    double sum = 0;
    pr->seconds = epic_now_seconds() - pr->seconds;
    epic_engine_get_stats(e, &s1);
    for (int64_t i = 0; i < B; i++) {
      const req_track *r = &tr[i + 1];
      pr->failed += !r->finished || r->failed || r->n_tokens == 0;
      ttft[i] = r->t_first - r->t_submit;
      sum += ttft[i];
    }
    pr->ttft_mean = sum / (double)B;
    pr->ttft_p50 = pct(ttft, B, 0.5);
    pr->ttft_p90 = pct(ttft, B, 0.9);
    pr->prompt_tokens = s1.prompt_tokens - s0.prompt_tokens;
    pr->hits = s1.prefix_hits - s0.prefix_hits;
    pr->hit_tokens = s1.prefix_hit_tokens - s0.prefix_hit_tokens;
    pr->cached_pages = s1.prefix_cached_pages;
    pr->budget_pages = s1.prefix_cache_pages;
  }
  epic_engine_destroy(e);
  free(tr);
  free(prompts);
  free(ttft);
  free(gaps);
  return st;
}

/* --shared-prefix: warm-up, then cache off and on; rank 0 prints the JSON. */
static int run_prefix_bench(epic_cluster *cl, const bench_opts *o) {
  prefix_result r[2];
  const int rank = epic_cluster_rank(cl);
  for (int w = 0; w < 2; w++) /* w = 0: untimed warm-up, as in the throughput phases */
    for (int on = 0; on < 2; on++)
      if (run_prefix_phase(cl, o, on, &r[on]) != EPIC_OK) {
        fprintf(stderr, "epic bench: the shared-prefix run with the prefix cache %s failed\n",
                on ? "on" : "off");
        return 1;
      }
  if (rank != 0) return 0;
  const epic_model_config *c = epic_model_get_config(epic_cluster_model(cl));
  printf("{\"bench\":\"prefix_cache\",\"model\":");
  epic_cli_json_string(stdout, o->e.model, strlen(o->e.model));
  printf(",\"ranks\":%d,\"layers\":%lld,\"routed_experts\":%lld,\"batch\":%lld,"
         "\"shared_prefix\":%lld,\"suffix_len\":%lld,\"gen\":%lld,\"page_size\":%lld,"
         "\"micro_batches\":%d,\"results\":[",
         epic_cluster_size(cl), (long long)c->num_hidden_layers, (long long)c->n_routed_experts,
         (long long)o->batch, (long long)o->shared_prefix, (long long)o->prompt_len,
         (long long)o->gen, (long long)o->e.page_size, o->mb[0]);
  for (int on = 0; on < 2; on++)
    printf("%s{\"prefix_cache\":\"%s\",\"seconds\":%.6f,\"ttft_ms_p50\":%.3f,"
           "\"ttft_ms_p90\":%.3f,\"ttft_ms_mean\":%.3f,\"prompt_tokens\":%lld,"
           "\"prefix_hits\":%lld,\"prefix_hit_tokens\":%lld,\"cached_pages_after\":%lld,"
           "\"cache_budget_pages\":%lld,\"failed_requests\":%lld}",
           on ? "," : "", on ? "on" : "off", r[on].seconds, r[on].ttft_p50 * 1e3,
           r[on].ttft_p90 * 1e3, r[on].ttft_mean * 1e3, (long long)r[on].prompt_tokens,
           (long long)r[on].hits, (long long)r[on].hit_tokens, (long long)r[on].cached_pages,
           (long long)r[on].budget_pages, (long long)r[on].failed);
  printf("],\"ttft_p50_speedup\":%.3f,\"ttft_p90_speedup\":%.3f}\n",
         r[1].ttft_p50 > 0 ? r[0].ttft_p50 / r[1].ttft_p50 : 0.0,
         r[1].ttft_p90 > 0 ? r[0].ttft_p90 / r[1].ttft_p90 : 0.0);
  return r[0].failed || r[1].failed;
}

static void print_phase(const char *name, const phase_result *pr, const double *all, int nranks,
                        double bytes_per_step_rank, double bw_gbs) {
  double wait = 0, total = 0, steps = 0;
  printf("\"%s\":{\"seconds\":%.6f,\"tokens_per_s\":%.3f,\"tokens_per_s_per_rank\":%.3f,"
         "\"ttft_ms_p50\":%.3f,\"ttft_ms_p99\":%.3f,\"tpot_ms_p50\":%.3f,\"tpot_ms_p99\":%.3f,"
         "\"output_tokens\":%lld,\"failed_requests\":%lld",
         name, pr->seconds, pr->tokens_per_s, pr->tokens_per_s / nranks, pr->ttft_p50 * 1e3,
         pr->ttft_p99 * 1e3, pr->tpot_p50 * 1e3, pr->tpot_p99 * 1e3, (long long)pr->tokens,
         (long long)pr->failed);
  printf(",\"ranks\":[");
  for (int r = 0; r < nranks; r++) {
    const double *v = all + r * ST_N;
    printf("%s{\"rank\":%d", r ? "," : "", r);
    for (int k = 0; k < ST_N; k++) printf(",\"%s\":%.6g", ST_NAMES[k], v[k]);
    printf(",\"a2a_wait_share\":%.4f}",
           v[ST_TOTAL] > 0 ? (v[ST_DISPATCH] + v[ST_COMBINE]) / v[ST_TOTAL] : 0.0);
    wait += v[ST_DISPATCH] + v[ST_COMBINE];
    total += v[ST_TOTAL];
    if (v[ST_FORWARDS] > steps) steps = v[ST_FORWARDS];
  }
  printf("],\"a2a_wait_share\":%.4f", total > 0 ? wait / total : 0.0);
  if (pr->tpot_p50 > 0 && bw_gbs > 0)
    /* Every decode step streams each rank's weights once: that rate over memcpy bandwidth. */
    printf(",\"weight_stream_gbs_per_rank\":%.3f,\"fraction_of_memcpy_bw\":%.4f",
           bytes_per_step_rank / pr->tpot_p50 / 1e9, bytes_per_step_rank / pr->tpot_p50 / 1e9 / bw_gbs);
  printf("}");
}

int epic_cmd_bench(int argc, char **argv) {
  bench_opts o;
  epic_cluster *cl = NULL;
  int rc = 1;
  const int pr_rc = parse(argc, argv, &o);
  double *stats[2][2] = {{NULL, NULL}, {NULL, NULL}};
  phase_result res[2][2];
  double *warm = NULL;
  if (pr_rc) return pr_rc > 0 ? 0 : 2;
  epic_log_init(EPIC_LOG_LEVEL_WARN, -1);
  epic_cluster_params cp;
  epic_cli_engine_cluster_params(&o.e, &cp);
  if (epic_cluster_open(&cp, &cl) != EPIC_OK) return 1;
  const int rank = epic_cluster_rank(cl), nranks = epic_cluster_size(cl);
  if (nranks > 1) epic_log_init(EPIC_LOG_LEVEL_WARN, rank);
  if (o.shared_prefix) {
    rc = run_prefix_bench(cl, &o);
    goto done;
  }
  const double bw = rank == 0 ? memcpy_gbs() : 0;
  warm = calloc((size_t)nranks * ST_N, sizeof(double));
  if (!warm) goto done;
  /* Warm-up: one untimed prefill phase, so that first-touch page faults, thread
   * pools and library handles stay out of the numbers. */
  if (run_phase(cl, &o, o.mb[0], 1, &res[0][0], warm) != EPIC_OK) {
    fputs("epic bench: the warm-up phase failed\n", stderr);
    goto done;
  }
  for (int i = 0; i < o.n_mb; i++)
    for (int ph = 0; ph < 2; ph++) {
      stats[i][ph] = calloc((size_t)nranks * ST_N, sizeof(double));
      if (!stats[i][ph]) goto done;
      if (run_phase(cl, &o, o.mb[i], ph == 0 ? 1 : o.gen, &res[i][ph], stats[i][ph]) != EPIC_OK) {
        fprintf(stderr, "epic bench: the %s phase with --micro-batches %d failed\n",
                ph == 0 ? "prefill" : "decode", o.mb[i]);
        goto done;
      }
    }
  if (rank == 0) {
    const epic_model_config *c = epic_model_get_config(epic_cluster_model(cl));
    const double wbytes = (double)epic_model_weight_bytes(epic_cluster_model(cl));
    printf("{\"bench\":\"engine\",\"model\":");
    epic_cli_json_string(stdout, o.e.model, strlen(o.e.model));
    printf(",\"ranks\":%d,\"layers\":%lld,\"routed_experts\":%lld,\"hidden\":%lld,\"batch\":%lld,"
           "\"prompt_len\":%lld,\"gen\":%lld,\"weight_bytes_rank0\":%.0f,\"memcpy_gbs\":%.3f,"
           "\"results\":[",
           nranks, (long long)c->num_hidden_layers, (long long)c->n_routed_experts,
           (long long)c->hidden_size, (long long)o.batch, (long long)o.prompt_len,
           (long long)o.gen, wbytes, bw);
    for (int i = 0; i < o.n_mb; i++) {
      printf("%s{\"micro_batches\":%d,", i ? "," : "", o.mb[i]);
      print_phase("prefill", &res[i][0], stats[i][0], nranks, wbytes, 0);
      putchar(',');
      print_phase("decode", &res[i][1], stats[i][1], nranks, wbytes, bw);
      putchar('}');
    }
    printf("]");
    if (o.n_mb == 2) {
      /* Communication left exposed with two micro-batches vs one, decode phase. */
      double w[2] = {0, 0};
      for (int i = 0; i < 2; i++)
        for (int r = 0; r < nranks; r++)
          w[o.mb[i] - 1] += stats[i][1][r * ST_N + ST_DISPATCH] + stats[i][1][r * ST_N + ST_COMBINE];
      printf(",\"decode_a2a_wait_s\":{\"mb1\":%.6f,\"mb2\":%.6f},\"comm_hidden_fraction\":%.4f",
             w[0], w[1], w[0] > 0 ? 1.0 - w[1] / w[0] : 0.0);
    }
    printf("}\n");
  }
  rc = 0;
done:
  for (int i = 0; i < 2; i++)
    for (int ph = 0; ph < 2; ph++) free(stats[i][ph]);
  epic_cluster_close(cl);
  fflush(stdout);
  return rc;
}
