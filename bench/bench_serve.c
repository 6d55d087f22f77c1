/* In-process engine throughput: the baseline of bench/bench_serve.py, which
 * runs the same workload over gRPC (`epic serve`, `epic gateway`) and reports
 * the serving overhead as a ratio against these numbers.
 *
 * Workload: `requests` requests of prompt_len deterministic token ids (the
 * same ids bench_serve.py sends) and exactly max_tokens new tokens each
 * (ignore_eos, greedy), with `concurrency` requests kept in flight: a request
 * that finishes submits the next one from its on_finish callback. The engine
 * runs on its own thread (epic_engine_run), as in `epic serve`. The workload
 * runs twice and the second pass is reported (the server is warm too).
 * Prints one JSON object: per concurrency, requests/s, tokens/s, TTFT and TPOT
 * p50/p99 (ms). `bench_serve --help` for options. */
#define _GNU_SOURCE
#include <getopt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/log.h"
#include "coordinator/engine.h"
#include "kernels/ops.h"
#include "worker/model.h"

typedef struct run {
  epic_engine *e;
  int64_t vocab, prompt_len, max_tokens, total, next, done, failed;
  int32_t *prompt; /* scratch for submit (copied by the engine) */
  double *ttft, *tpot;
  pthread_mutex_t mu;
  pthread_cond_t cv;
} run;

static int cmp_d(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double pct(const double *sorted, int64_t n, double p) {
  if (n <= 0)
    return 0;
  int64_t i = (int64_t)(p * (double)(n - 1) + 0.5);
  return sorted[i < 0 ? 0 : (i >= n ? n - 1 : i)];
}

/* Request i's prompt: BOS-like 0, then ids spread over the vocabulary. */
static void make_prompt(int64_t i, int64_t len, int64_t vocab, int32_t *out) {
  out[0] = 0;
  for (int64_t k = 1; k < len; k++)
    out[k] = (int32_t)((i * 7 + k * 13) % (vocab - 2) + 2);
}

static void on_finish(void *user, const epic_engine_result *r);

/* mu held. */
static epic_status submit_next(run *R) {
  if (R->next >= R->total)
    return EPIC_OK;
  int64_t i = R->next++;
  make_prompt(i, R->prompt_len, R->vocab, R->prompt);
  epic_engine_request rq = {.size = sizeof rq,
                            .prompt = R->prompt,
                            .n_prompt = R->prompt_len,
                            .max_new_tokens = R->max_tokens,
                            .sampling = {.size = sizeof(epic_sampling_params), .top_p = 1.0f},
                            .ignore_eos = 1,
                            .on_finish = on_finish,
                            .user = R};
  return epic_engine_submit(R->e, &rq, NULL);
}

static void on_finish(void *user, const epic_engine_result *r) {
  run *R = user;
  pthread_mutex_lock(&R->mu);
  if (r->finish == EPIC_ENGINE_FINISH_LENGTH && r->completion_tokens == R->max_tokens) {
    R->ttft[R->done] = r->ttft_seconds;
    R->tpot[R->done] = r->completion_tokens > 1 ? (r->total_seconds - r->ttft_seconds) /
                                                      (double)(r->completion_tokens - 1)
                                                : 0;
    R->done++;
  } else {
    R->failed++;
  }
  if (submit_next(R) != EPIC_OK)
    R->failed++;
  pthread_cond_signal(&R->cv);
  pthread_mutex_unlock(&R->mu);
}

static void *engine_main(void *arg) {
  return (void *)(intptr_t)epic_engine_run(arg);
}

static const char *USAGE =
    "usage: bench_serve --model DIR [--concurrency 1,16,64] [--requests N] [--prompt-len N]\n"
    "                   [--max-tokens N] [--threads N] [--kv-cache-mib N] [--load-format dummy]\n"
    "In-process engine throughput for bench/bench_serve.py; prints one JSON object.\n";

int main(int argc, char **argv) {
  const char *model_dir = NULL, *conc_list = "1,16,64";
  int64_t requests = 64, prompt_len = 16, max_tokens = 32, threads = 0, kv_mib = 256;
  int dummy = 0;
  static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                       {"concurrency", required_argument, 0, 'c'},
                                       {"requests", required_argument, 0, 'n'},
                                       {"prompt-len", required_argument, 0, 'p'},
                                       {"max-tokens", required_argument, 0, 't'},
                                       {"threads", required_argument, 0, 'j'},
                                       {"kv-cache-mib", required_argument, 0, 'k'},
                                       {"load-format", required_argument, 0, 'l'},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
  int ch;
  while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
    switch (ch) {
    case 'm': model_dir = optarg; break;
    case 'c': conc_list = optarg; break;
    case 'n': requests = atoll(optarg); break;
    case 'p': prompt_len = atoll(optarg); break;
    case 't': max_tokens = atoll(optarg); break;
    case 'j': threads = atoll(optarg); break;
    case 'k': kv_mib = atoll(optarg); break;
    case 'l': dummy = strcmp(optarg, "dummy") == 0; break;
    case 'h': fputs(USAGE, stdout); return 0;
    default: fputs(USAGE, stderr); return 2;
    }
  }
  if (!model_dir || requests < 1 || prompt_len < 1 || max_tokens < 2 || kv_mib < 1) {
    fputs(USAGE, stderr);
    return 2;
  }
  epic_log_init(EPIC_LOG_LEVEL_WARN, -1);
  epic_ops *ops = NULL;
  epic_model *model = NULL;
  epic_engine *e = NULL;
  int rc = 1;
  if (epic_ops_cpu_create((int)threads, &ops) != EPIC_OK)
    goto done;
  epic_model_params mp = {
      .size = sizeof mp, .dir = model_dir, .load_format = dummy ? EPIC_LOAD_DUMMY : EPIC_LOAD_AUTO};
  if (epic_model_load(ops, &mp, &model) != EPIC_OK)
    goto done;
  const epic_model_config *cfg = epic_model_get_config(model);
  printf("{\"bench\":\"serve_engine\",\"model\":\"%s\",\"requests\":%lld,\"prompt_len\":%lld,\"max_"
         "tokens\":%lld,"
         "\"results\":[",
         model_dir, (long long)requests, (long long)prompt_len, (long long)max_tokens);
  char *list = strdup(conc_list), *save = NULL;
  int first = 1;
  for (char *tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
    int64_t conc = atoll(tok);
    if (conc < 1)
      continue;
    epic_engine_params ep = {.size = sizeof ep,
                             .model = model,
                             .kv_bytes = (size_t)kv_mib << 20,
                             .max_batch = conc,
                             .max_queue = conc + 1};
    if (epic_engine_create(&ep, &e) != EPIC_OK)
      break;
    run R = {.e = e,
             .vocab = cfg->vocab_size,
             .prompt_len = prompt_len,
             .max_tokens = max_tokens,
             .total = requests};
    R.prompt = malloc((size_t)prompt_len * sizeof *R.prompt);
    R.ttft = calloc((size_t)requests, sizeof *R.ttft);
    R.tpot = calloc((size_t)requests, sizeof *R.tpot);
    pthread_mutex_init(&R.mu, NULL);
    pthread_cond_init(&R.cv, NULL);
    pthread_t th;
    pthread_create(&th, NULL, engine_main, e);
    /* Pass 0 warms up (first touch of the KV cache pages, allocator, caches)
     * as the long-running server is warm; pass 1 is measured. */
    double wall = 0;
    for (int pass = 0; pass < 2; pass++) {
      pthread_mutex_lock(&R.mu);
      R.next = R.done = R.failed = 0;
      double t0 = epic_now_seconds();
      for (int64_t i = 0; i < conc && i < requests; i++)
        if (submit_next(&R) != EPIC_OK)
          R.failed++;
      while (R.done + R.failed < requests)
        pthread_cond_wait(&R.cv, &R.mu);
      pthread_mutex_unlock(&R.mu);
      wall = epic_now_seconds() - t0;
    }
    epic_engine_shutdown(e, 1);
    void *st;
    pthread_join(th, &st);
    qsort(R.ttft, (size_t)R.done, sizeof *R.ttft, cmp_d);
    qsort(R.tpot, (size_t)R.done, sizeof *R.tpot, cmp_d);
    printf("%s{\"concurrency\":%lld,\"completed\":%lld,\"failed\":%lld,\"wall_s\":%.4f,\"requests_"
           "per_s\":%.3f,"
           "\"tokens_per_s\":%.1f,\"ttft_ms_p50\":%.3f,\"ttft_ms_p99\":%.3f,\"tpot_ms_p50\":%.3f,"
           "\"tpot_ms_p99\":%.3f}",
           first ? "" : ",", (long long)conc, (long long)R.done, (long long)R.failed, wall,
           (double)R.done / wall, (double)(R.done * max_tokens) / wall,
           1e3 * pct(R.ttft, R.done, 0.5), 1e3 * pct(R.ttft, R.done, 0.99),
           1e3 * pct(R.tpot, R.done, 0.5), 1e3 * pct(R.tpot, R.done, 0.99));
    first = 0;
    fflush(stdout);
    if (R.failed)
      fprintf(stderr, "bench_serve: %lld requests failed at concurrency %lld\n",
              (long long)R.failed, (long long)conc);
    pthread_mutex_destroy(&R.mu);
    pthread_cond_destroy(&R.cv);
    free(R.prompt);
    free(R.ttft);
    free(R.tpot);
    epic_engine_destroy(e);
    e = NULL;
    if ((epic_status)(intptr_t)st != EPIC_OK)
      goto done_list;
  }
  printf("]}\n");
  rc = 0;
done_list:
  free(list);
done:
  epic_engine_destroy(e);
  epic_model_destroy(model);
  epic_ops_destroy(ops);
  return rc;
}
