/* `epic serve`: load a model (one process, or every rank under mpirun/srun) and
 * serve it over gRPC from rank 0 (coordinator/gateway.h). Ranks other than 0
 * follow rank 0's engine steps until it shuts down. */
#define _GNU_SOURCE
#include "cmd_serve.h"

#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli_engine.h"
#include "cli_util.h"
#include "cmd_plan.h"
#include "common/log.h"

#ifdef EPIC_HAVE_GRPC
#include "cluster.h"
#include "coordinator/engine.h"
#include "coordinator/gateway.h"
#include "coordinator/cli_security.h"
#include "coordinator/http_cli.h"
#include "coordinator/tokenizer/tokenizer.h"

static const char *USAGE_HEAD =
    "usage: epic serve --model DIR [--listen HOST:PORT] [options]\n"
    "\n"
    "Serves the model over gRPC (epic.v1.Inference: Generate, Tokenize, ModelInfo;\n"
    "grpc.health.v1.Health). Under mpirun/srun every rank loads its share of the\n"
    "experts and rank 0 serves. SIGTERM (or Ctrl-C) drains: no new requests, running\n"
    "streams finish within --drain-timeout, then the process exits 0.\n"
    "\n";

static const epic_cli_engine_help_line HELP_OWN[] = {
    {EPIC_CLI_ENGINE_MAX_QUEUE, NULL, "waiting requests; beyond: RESOURCE_EXHAUSTED (default 1024)"}};

static void usage(const epic_cli_engine_opts *e) {
  const unsigned model = EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_MODEL);
  const size_t n_own = sizeof HELP_OWN / sizeof HELP_OWN[0];
  fputs(USAGE_HEAD, stdout);
  epic_cli_engine_help(stdout, e, model, 27, HELP_OWN, n_own);
  fputs("  --listen HOST:PORT       address to serve on (default 0.0.0.0:50051; port 0 = any)\n"
        "scheduling:\n",
        stdout);
  epic_cli_engine_help(stdout, e, EPIC_CLI_ENGINE_SCHED_ALL, 27, HELP_OWN, n_own);
  fputs("requests:\n"
        "  --default-max-tokens N   max_tokens of a request that sets none (default 128)\n"
        "  --max-request-bytes SIZE larger requests get INVALID_ARGUMENT (default 4MiB)\n"
        "  --drain-timeout SECONDS  grace period for running streams after SIGTERM (default 30)\n"
        "  --http HOST:PORT         also serve the OpenAI-compatible HTTP API there (/v1/chat/\n"
        "                           completions, /v1/completions, /v1/models, /health, /metrics);\n"
        "                           the security options below apply to it too\n"
        "  --reasoning-parser NAME  deepseek_r1 (default: <think> text -> reasoning_content) or none\n"
        "engine:\n",
        stdout);
  epic_cli_engine_help(stdout, e, EPIC_CLI_ENGINE_LOAD_ALL & ~model, 27, HELP_OWN, n_own);
  epic_cli_security_help(stdout, EPIC_CLI_SEC_SERVE);
  fputs("  -v, --verbose            log every request on stderr\n"
        "  -h, --help               this help\n",
        stdout);
}

typedef struct serve_opts {
  epic_cli_engine_opts e; /* model loading and engine scheduling */
  const char *listen;
  const char *http; /* NULL = no HTTP front */
  int reasoning;
  int verbose;
  int64_t default_max_tokens;
  uint64_t max_request_bytes;
  float drain_timeout;
} serve_opts;

static int parse(int argc, char **argv, serve_opts *o) {
  enum { O_LISTEN = 256, O_DEFMAX, O_MAXREQ, O_DRAIN, O_HTTP, O_REASONING };
  static const struct option own[] = {{"listen", required_argument, 0, O_LISTEN},
                                      {"default-max-tokens", required_argument, 0, O_DEFMAX},
                                      {"max-request-bytes", required_argument, 0, O_MAXREQ},
                                      {"drain-timeout", required_argument, 0, O_DRAIN},
                                      {"http", required_argument, 0, O_HTTP},
                                      {"reasoning-parser", required_argument, 0, O_REASONING},
                                      {"verbose", no_argument, 0, 'v'},
                                      {"help", no_argument, 0, 'h'},
                                      {0, 0, 0, 0}};
  struct option longopts[64];
  const char *cmd = "serve";
  int c;
  memset(o, 0, sizeof *o);
  epic_cli_engine_init(&o->e, cmd, EPIC_CLI_ENGINE_LOAD_ALL | EPIC_CLI_ENGINE_SCHED_ALL);
  o->e.max_batch = 256;
  o->e.max_queue = 1024;
  o->e.kv_bytes = (uint64_t)1 << 30;
  o->listen = "0.0.0.0:50051";
  o->default_max_tokens = 128;
  o->max_request_bytes = (uint64_t)4 << 20;
  o->drain_timeout = 30;
  o->reasoning = 1;
  if (epic_cli_engine_longopts(&o->e, own, longopts, sizeof longopts / sizeof longopts[0]))
    return -1;
  optind = 1;
  while ((c = getopt_long(argc, argv, "vh", longopts, NULL)) != -1) {
    int bad = epic_cli_engine_parse(&o->e, c, optarg);
    if (bad)
      bad = bad < 0;
    else
      switch (c) {
      case O_LISTEN: o->listen = optarg; break;
      case O_DEFMAX:
        bad = epic_cli_i64(cmd, "--default-max-tokens", optarg, 1, INT32_MAX,
                           &o->default_max_tokens);
        break;
      case O_MAXREQ:
        bad = epic_plan_cli_size(cmd, "--max-request-bytes", optarg, &o->max_request_bytes);
        break;
      case O_DRAIN:
        bad = epic_cli_f32(cmd, "--drain-timeout", optarg, 0, 86400, &o->drain_timeout);
        break;
      case O_HTTP: o->http = optarg; break;
      case O_REASONING: bad = epic_http_cli_reasoning(cmd, optarg, &o->reasoning); break;
      case 'v': o->verbose = 1; break;
      case 'h': usage(&o->e); return 1;
      default: fputs("epic serve: see --help\n", stderr); return -1;
      }
    if (bad)
      return -1;
  }
  if (epic_cli_engine_check(&o->e, argc, argv))
    return -1;
  if (!strchr(o->listen, ':')) {
    fprintf(stderr, "epic serve: --listen: expected HOST:PORT, got '%s'\n", o->listen);
    return -1;
  }
  if (o->max_request_bytes < 64 || o->max_request_bytes > ((uint64_t)1 << 30)) {
    fputs("epic serve: --max-request-bytes: must be between 64 bytes and 1GiB\n", stderr);
    return -1;
  }
  return 0;
}

static const char *base_name(const char *dir, char *buf, size_t n) {
  size_t len = strlen(dir);
  while (len > 1 && dir[len - 1] == '/')
    len--;
  size_t start = len;
  while (start > 0 && dir[start - 1] != '/')
    start--;
  snprintf(buf, n, "%.*s", (int)(len - start), dir + start);
  return buf;
}

int epic_cmd_serve(int argc, char **argv) {
  serve_opts o;
  epic_cli_security sec;
  if (epic_cli_security_take("serve", EPIC_CLI_SEC_SERVE, &argc, argv, &sec))
    return 2;
  int pr = parse(argc, argv, &o);
  if (pr)
    return pr > 0 ? 0 : 2;
  if (epic_cli_security_open("serve", &sec, o.listen))
    return 2;
  /* The HTTP front has the same plaintext policy, checked before the long load. */
  if (o.http && epic_listen_check_plaintext("serve", "--http", o.http, sec.gw.tls_cert != NULL,
                                            sec.gw.plaintext) != EPIC_OK) {
    epic_cli_security_close(&sec);
    return 2;
  }
  epic_log_init(o.verbose ? EPIC_LOG_LEVEL_INFO : EPIC_LOG_LEVEL_WARN, -1);

  /* SIGTERM/SIGINT start a drain (gateway.h); installed before the long load,
   * which then ends early if one arrives. */
  volatile sig_atomic_t *drain_requests = epic_cli_drain_signals();
  epic_cluster *cl = NULL;
  epic_engine *e = NULL;
  epic_tokenizer *tok = NULL;
  epic_gw_server *srv = NULL;
  epic_http_cli *http = NULL;
  int rc = 1, rank = 0;
  char name[256], path[4096];
  epic_cluster_params cp;
  epic_cli_engine_cluster_params(&o.e, &cp);
  if (epic_cluster_open(&cp, &cl) != EPIC_OK)
    goto done;
  rank = epic_cluster_rank(cl);
  const int nranks = epic_cluster_size(cl);
  if (nranks > 1)
    epic_log_init(o.verbose ? EPIC_LOG_LEVEL_INFO : EPIC_LOG_LEVEL_WARN, rank);
  epic_model *model = epic_cluster_model(cl);
  const epic_model_config *cfg = epic_model_get_config(model);
  epic_engine_params ep;
  epic_cli_engine_engine_params(&o.e, model, epic_cluster_comm(cl), &ep);
  if (o.http) /* every rank parses the same flags: the engines agree */
    ep.top_logprobs = EPIC_HTTP_CLI_TOP_LOGPROBS;
  if (epic_engine_create(&ep, &e) != EPIC_OK)
    goto done;
  if (rank != 0) {
    rc = epic_engine_run(e) == EPIC_OK ? 0 : 1;
    goto done;
  }

  snprintf(path, sizeof path, "%s/tokenizer.json", o.e.model);
  if (access(path, R_OK) == 0) {
    if (epic_tokenizer_load_dir(o.e.model, &tok) != EPIC_OK)
      goto stop_engine;
  } else {
    fprintf(stderr,
            "epic serve: %s not found: only prompt.token_ids requests are served, without text\n",
            path);
  }
  epic_engine_stats es;
  epic_engine_get_stats(e, &es);
  const int64_t kv_pages = es.nranks > 0 ? es.kv_pages_total / es.nranks : es.kv_pages_total;
  const int64_t max_context = o.e.max_context ? o.e.max_context : cfg->max_position_embeddings;
  epic_gw_server_params sp = {.size = sizeof sp,
                              .engine = e,
                              .engine_params = &ep,
                              .config = cfg,
                              .tokenizer = tok,
                              .model_name = base_name(o.e.model, name, sizeof name),
                              .listen = o.listen,
                              .comm_name = nranks > 1 ? (o.e.comm ? o.e.comm : "auto") : NULL,
                              .nranks = nranks,
                              .max_context = max_context,
                              .kv_tokens_per_worker = kv_pages * o.e.page_size,
                              .page_size = o.e.page_size,
                              .default_max_tokens = o.default_max_tokens,
                              .max_request_bytes = (int64_t)o.max_request_bytes,
                              .drain_timeout = o.drain_timeout,
                              .drain_requests = drain_requests,
                              .security = &sec.gw,
                              .limits = sec.limits};
  if (*drain_requests) {
    fputs("epic serve: interrupted while loading\n", stderr);
    goto stop_engine;
  }
  if (epic_gw_server_create(&sp, &srv) != EPIC_OK)
    goto stop_engine;
  char addr[512];
  epic_gw_server_address(srv, addr, sizeof addr);
  printf(
      "epic serve: model %s (%s, %lld layers, %lld routed experts, vocab %lld%s), %d rank%s%s%s\n",
      name, cfg->model_type, (long long)cfg->num_hidden_layers, (long long)cfg->n_routed_experts,
      (long long)cfg->vocab_size, tok ? "" : ", no tokenizer", nranks, nranks > 1 ? "s" : "",
      nranks > 1 ? ", comm " : "", nranks > 1 ? sp.comm_name : "");
  printf(
      "epic serve: max_batch %lld, max_queue %lld, KV cache %lld pages x %lld tokens per worker "
      "(%lld tokens), max_context %lld, step_tokens %lld, prefill_chunk %lld, micro_batches %lld\n",
      (long long)o.e.max_batch, (long long)o.e.max_queue, (long long)kv_pages, (long long)o.e.page_size,
      (long long)(kv_pages * o.e.page_size), (long long)max_context, (long long)ep.step_tokens,
      (long long)(ep.prefill_chunk ? ep.prefill_chunk : ep.step_tokens),
      (long long)o.e.micro_batches);
  printf("epic serve: default_max_tokens %lld, max_request_bytes %llu, drain_timeout %.1fs\n",
         (long long)o.default_max_tokens, (unsigned long long)o.max_request_bytes,
         (double)o.drain_timeout);
  epic_cli_security_print(stdout, "serve", &sec);
  if (o.http && epic_http_cli_serve(o.http, &sp, &ep, o.reasoning, &http) != EPIC_OK)
    goto stop_engine;
  printf("epic serve: listening on %s (pid %d)\n", addr, (int)getpid());
  fflush(stdout);
  /* The engine runs (and releases the other ranks) inside the server's run. */
  epic_status st = epic_gw_server_run(srv);
  rc = st == EPIC_OK ? 0 : 1;
  if (st == EPIC_OK) {
    printf("epic serve: drained, exiting\n");
    fflush(stdout);
  }
  goto done;
stop_engine:
  /* Serving never started: release the other ranks. */
  epic_engine_shutdown(e, 0);
  epic_engine_run(e);
done:
  epic_http_cli_stop(http); /* its connections may still call the engine */
  epic_engine_destroy(e); /* delivers any on_finish still due: before the server goes */
  epic_gw_server_destroy(srv);
  epic_cli_security_close(&sec);
  epic_tokenizer_destroy(tok);
  epic_cluster_close(cl);
  fflush(stdout);
  return rc;
}

#else /* !EPIC_HAVE_GRPC */

int epic_cmd_serve(int argc, char **argv) {
  (void)argc;
  (void)argv;
  fputs("epic serve: this epic was built without gRPC (install libgrpc-dev, libprotobuf-c-dev and "
        "protobuf-c-compiler, then rebuild)\n",
        stderr);
  return 2;
}

#endif
