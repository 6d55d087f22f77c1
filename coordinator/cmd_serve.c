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

#include "cli_util.h"
#include "cmd_plan.h"
#include "common/log.h"

#ifdef EPIC_HAVE_GRPC
#include "cluster.h"
#include "coordinator/engine.h"
#include "coordinator/gateway.h"
#include "coordinator/tokenizer/tokenizer.h"

/* The one piece of process-wide state a signal handler needs: how many drain
 * signals came (a second one cuts the grace period short). */
static volatile sig_atomic_t g_drain_requests;
static void on_drain_signal(int sig) {
  (void)sig;
  g_drain_requests = g_drain_requests + 1;
}

static void install_drain_handler(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_drain_signal;
  sigemptyset(&sa.sa_mask);
  sigaddset(&sa.sa_mask, SIGTERM);
  sigaddset(&sa.sa_mask, SIGINT);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
}

static const char *USAGE =
    "usage: epic serve --model DIR [--listen HOST:PORT] [options]\n"
    "\n"
    "Serves the model over gRPC (epic.v1.Inference: Generate, Tokenize, ModelInfo;\n"
    "grpc.health.v1.Health). Under mpirun/srun every rank loads its share of the\n"
    "experts and rank 0 serves. SIGTERM (or Ctrl-C) drains: no new requests, running\n"
    "streams finish within --drain-timeout, then the process exits 0.\n"
    "\n"
    "  --model DIR              checkpoint directory (config.json, safetensors, tokenizer)\n"
    "  --listen HOST:PORT       address to serve on (default 0.0.0.0:50051; port 0 = any)\n"
    "scheduling:\n"
    "  --max-batch N            running sequences in the cluster (default 256)\n"
    "  --max-queue N            waiting requests; beyond: RESOURCE_EXHAUSTED (default 1024)\n"
    "  --kv-cache SIZE          KV cache per worker, e.g. 4GiB (default 1GiB)\n"
    "  --kv-pages N             KV cache pages per worker (overrides --kv-cache)\n"
    "  --page-size N            tokens per KV page (default 64)\n"
    "  --max-context N          prompt + max_tokens of a request (default: the model's)\n"
    "  --step-tokens N          per-worker token budget of one step (default 2048)\n"
    "  --prefill-chunk N        prompt tokens of one sequence per step (default 512)\n"
    "  --micro-batches N        1, or 2 for two-micro-batch pipelining (default 1)\n"
    "requests:\n"
    "  --default-max-tokens N   max_tokens of a request that sets none (default 128)\n"
    "  --max-request-bytes SIZE larger requests get INVALID_ARGUMENT (default 4MiB)\n"
    "  --drain-timeout SECONDS  grace period for running streams after SIGTERM (default 30)\n"
    "engine:\n"
    "  --comm NAME              expert-parallel backend under mpirun: auto, mpi, ucx or nccl\n"
    "  --mem-per-rank SIZE      memory a rank may use (e.g. 141GB): the plan must fit, checked before loading\n"
    "  --load-format F          auto (safetensors) or dummy (random weights from config.json)\n"
    "  --num-layers N           use only N layers (benchmarks, with dummy weights)\n"
    "  --num-experts N          use only N routed experts (likewise)\n"
    "  --weight-seed S          seed of dummy weights (default 0)\n"
    "  --threads N              compute threads (default: all cores)\n"
    "  -v, --verbose            log every request on stderr\n"
    "  -h, --help               this help\n";

typedef struct serve_opts {
  uint64_t mem_per_rank; /* --mem-per-rank, 0 = no fit check */
  const char *model, *listen, *comm;
  int dummy, verbose;
  int64_t max_batch, max_queue, kv_pages, page_size, max_context, step_tokens, prefill_chunk,
      micro_batches;
  int64_t default_max_tokens, num_layers, num_experts, threads;
  uint64_t kv_bytes, max_request_bytes, weight_seed;
  float drain_timeout;
} serve_opts;

static int parse(int argc, char **argv, serve_opts *o) {
  enum {
    O_MODEL = 256,
    O_LISTEN,
    O_MAXBATCH,
    O_MAXQUEUE,
    O_KVCACHE,
    O_KVPAGES,
    O_PAGE,
    O_MAXCTX,
    O_STEP,
    O_CHUNK,
    O_MICRO,
    O_DEFMAX,
    O_MAXREQ,
    O_DRAIN,
    O_MEMRANK,
    O_COMM,
    O_LOADFMT,
    O_NLAYERS,
    O_NEXPERTS,
    O_WSEED,
    O_THREADS
  };
  static const struct option longopts[] = {{"model", required_argument, 0, O_MODEL},
                                           {"listen", required_argument, 0, O_LISTEN},
                                           {"max-batch", required_argument, 0, O_MAXBATCH},
                                           {"max-queue", required_argument, 0, O_MAXQUEUE},
                                           {"kv-cache", required_argument, 0, O_KVCACHE},
                                           {"kv-pages", required_argument, 0, O_KVPAGES},
                                           {"page-size", required_argument, 0, O_PAGE},
                                           {"max-context", required_argument, 0, O_MAXCTX},
                                           {"step-tokens", required_argument, 0, O_STEP},
                                           {"prefill-chunk", required_argument, 0, O_CHUNK},
                                           {"micro-batches", required_argument, 0, O_MICRO},
                                           {"default-max-tokens", required_argument, 0, O_DEFMAX},
                                           {"max-request-bytes", required_argument, 0, O_MAXREQ},
                                           {"drain-timeout", required_argument, 0, O_DRAIN},
                                           {"comm", required_argument, 0, O_COMM},
                                           {"mem-per-rank", required_argument, 0, O_MEMRANK},
                                           {"load-format", required_argument, 0, O_LOADFMT},
                                           {"num-layers", required_argument, 0, O_NLAYERS},
                                           {"num-experts", required_argument, 0, O_NEXPERTS},
                                           {"weight-seed", required_argument, 0, O_WSEED},
                                           {"threads", required_argument, 0, O_THREADS},
                                           {"verbose", no_argument, 0, 'v'},
                                           {"help", no_argument, 0, 'h'},
                                           {0, 0, 0, 0}};
  const char *cmd = "serve";
  int c;
  memset(o, 0, sizeof *o);
  o->listen = "0.0.0.0:50051";
  o->max_batch = 256;
  o->max_queue = 1024;
  o->page_size = 64;
  o->step_tokens = 2048;
  o->prefill_chunk = 512;
  o->micro_batches = 1;
  o->default_max_tokens = 128;
  o->kv_bytes = (uint64_t)1 << 30;
  o->max_request_bytes = (uint64_t)4 << 20;
  o->drain_timeout = 30;
  optind = 1;
  while ((c = getopt_long(argc, argv, "vh", longopts, NULL)) != -1) {
    int bad = 0;
    switch (c) {
    case O_MODEL: o->model = optarg; break;
    case O_LISTEN: o->listen = optarg; break;
    case O_MAXBATCH:
      bad = epic_cli_i64(cmd, "--max-batch", optarg, 1, 1 << 24, &o->max_batch);
      break;
    case O_MAXQUEUE:
      bad = epic_cli_i64(cmd, "--max-queue", optarg, 1, 1 << 24, &o->max_queue);
      break;
    case O_KVCACHE: bad = epic_plan_cli_size(cmd, "--kv-cache", optarg, &o->kv_bytes); break;
    case O_KVPAGES:
      bad = epic_cli_i64(cmd, "--kv-pages", optarg, 1, INT32_MAX, &o->kv_pages);
      break;
    case O_PAGE: bad = epic_cli_i64(cmd, "--page-size", optarg, 1, 1 << 20, &o->page_size); break;
    case O_MAXCTX:
      bad = epic_cli_i64(cmd, "--max-context", optarg, 2, INT32_MAX, &o->max_context);
      break;
    case O_STEP:
      bad = epic_cli_i64(cmd, "--step-tokens", optarg, 1, INT32_MAX, &o->step_tokens);
      break;
    case O_CHUNK:
      bad = epic_cli_i64(cmd, "--prefill-chunk", optarg, 1, INT32_MAX, &o->prefill_chunk);
      break;
    case O_MICRO:
      bad = epic_cli_i64(cmd, "--micro-batches", optarg, 1, 2, &o->micro_batches);
      break;
    case O_DEFMAX:
      bad = epic_cli_i64(cmd, "--default-max-tokens", optarg, 1, INT32_MAX, &o->default_max_tokens);
      break;
    case O_MAXREQ:
      bad = epic_plan_cli_size(cmd, "--max-request-bytes", optarg, &o->max_request_bytes);
      break;
    case O_DRAIN:
      bad = epic_cli_f32(cmd, "--drain-timeout", optarg, 0, 86400, &o->drain_timeout);
      break;
    case O_MEMRANK: bad = epic_plan_cli_size(cmd, "--mem-per-rank", optarg, &o->mem_per_rank); break;
    case O_COMM: o->comm = optarg; break;
    case O_LOADFMT:
      if (strcmp(optarg, "dummy") == 0)
        o->dummy = 1;
      else if (strcmp(optarg, "auto") != 0 && strcmp(optarg, "safetensors") != 0) {
        fprintf(stderr, "epic serve: --load-format: expected auto or dummy, got '%s'\n", optarg);
        bad = -1;
      }
      break;
    case O_NLAYERS:
      bad = epic_cli_i64(cmd, "--num-layers", optarg, 1, 1 << 20, &o->num_layers);
      break;
    case O_NEXPERTS:
      bad = epic_cli_i64(cmd, "--num-experts", optarg, 1, 1 << 20, &o->num_experts);
      break;
    case O_WSEED: bad = epic_cli_u64(cmd, "--weight-seed", optarg, &o->weight_seed); break;
    case O_THREADS: bad = epic_cli_i64(cmd, "--threads", optarg, 1, 4096, &o->threads); break;
    case 'v': o->verbose = 1; break;
    case 'h': fputs(USAGE, stdout); return 1;
    default: fputs("epic serve: see --help\n", stderr); return -1;
    }
    if (bad)
      return -1;
  }
  if (optind < argc) {
    fprintf(stderr, "epic serve: unexpected argument '%s' (see --help)\n", argv[optind]);
    return -1;
  }
  if (!o->model) {
    fputs("epic serve: --model DIR is required (see --help)\n", stderr);
    return -1;
  }
  if (!strchr(o->listen, ':')) {
    fprintf(stderr, "epic serve: --listen: expected HOST:PORT, got '%s'\n", o->listen);
    return -1;
  }
  if (o->max_request_bytes < 64 || o->max_request_bytes > ((uint64_t)1 << 30)) {
    fputs("epic serve: --max-request-bytes: must be between 64 bytes and 1GiB\n", stderr);
    return -1;
  }
  if (o->kv_bytes == 0) {
    fputs("epic serve: --kv-cache: must be > 0\n", stderr);
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
  int pr = parse(argc, argv, &o);
  if (pr)
    return pr > 0 ? 0 : 2;
  epic_log_init(o.verbose ? EPIC_LOG_LEVEL_INFO : EPIC_LOG_LEVEL_WARN, -1);

  /* SIGTERM/SIGINT start a drain (gateway.h); installed before the long load,
   * which then ends early if one arrives. */
  install_drain_handler();
  epic_cluster *cl = NULL;
  epic_engine *e = NULL;
  epic_tokenizer *tok = NULL;
  epic_gw_server *srv = NULL;
  int rc = 1, rank = 0;
  char name[256], path[4096];
  epic_cluster_params cp = {.size = sizeof cp,
                            .cmd = "serve",
                            .model_dir = o.model,
                            .comm = o.comm,
                            .dummy = o.dummy,
                            .weight_seed = o.weight_seed,
                            .num_layers = o.num_layers,
                            .num_experts = o.num_experts,
                            .threads = o.threads,
                            .mem_per_rank = o.mem_per_rank,
                            .max_batch_tokens = o.step_tokens,
                            .progress = 1};
  if (epic_cluster_open(&cp, &cl) != EPIC_OK)
    goto done;
  rank = epic_cluster_rank(cl);
  const int nranks = epic_cluster_size(cl);
  if (nranks > 1)
    epic_log_init(o.verbose ? EPIC_LOG_LEVEL_INFO : EPIC_LOG_LEVEL_WARN, rank);
  epic_model *model = epic_cluster_model(cl);
  const epic_model_config *cfg = epic_model_get_config(model);
  epic_engine_params ep = {.size = sizeof ep,
                           .model = model,
                           .comm = epic_cluster_comm(cl),
                           .page_size = o.page_size,
                           .kv_pages = o.kv_pages,
                           .kv_bytes = (size_t)o.kv_bytes,
                           .max_batch = o.max_batch,
                           .max_queue = o.max_queue,
                           .step_tokens = o.step_tokens,
                           .prefill_chunk = o.prefill_chunk,
                           .max_context = o.max_context,
                           .micro_batches = (int)o.micro_batches};
  if (epic_engine_create(&ep, &e) != EPIC_OK)
    goto done;
  if (rank != 0) {
    rc = epic_engine_run(e) == EPIC_OK ? 0 : 1;
    goto done;
  }

  snprintf(path, sizeof path, "%s/tokenizer.json", o.model);
  if (access(path, R_OK) == 0) {
    if (epic_tokenizer_load_dir(o.model, &tok) != EPIC_OK)
      goto stop_engine;
  } else {
    fprintf(stderr,
            "epic serve: %s not found: only prompt.token_ids requests are served, without text\n",
            path);
  }
  epic_engine_stats es;
  epic_engine_get_stats(e, &es);
  const int64_t kv_pages = es.nranks > 0 ? es.kv_pages_total / es.nranks : es.kv_pages_total;
  const int64_t max_context = o.max_context ? o.max_context : cfg->max_position_embeddings;
  epic_gw_server_params sp = {.size = sizeof sp,
                              .engine = e,
                              .engine_params = &ep,
                              .config = cfg,
                              .tokenizer = tok,
                              .model_name = base_name(o.model, name, sizeof name),
                              .listen = o.listen,
                              .comm_name = nranks > 1 ? (o.comm ? o.comm : "auto") : NULL,
                              .nranks = nranks,
                              .max_context = max_context,
                              .kv_tokens_per_worker = kv_pages * o.page_size,
                              .page_size = o.page_size,
                              .default_max_tokens = o.default_max_tokens,
                              .max_request_bytes = (int64_t)o.max_request_bytes,
                              .drain_timeout = o.drain_timeout,
                              .drain_requests = &g_drain_requests};
  if (g_drain_requests) {
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
      (long long)o.max_batch, (long long)o.max_queue, (long long)kv_pages, (long long)o.page_size,
      (long long)(kv_pages * o.page_size), (long long)max_context, (long long)o.step_tokens,
      (long long)o.prefill_chunk, (long long)o.micro_batches);
  printf("epic serve: default_max_tokens %lld, max_request_bytes %llu, drain_timeout %.1fs\n",
         (long long)o.default_max_tokens, (unsigned long long)o.max_request_bytes,
         (double)o.drain_timeout);
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
  epic_engine_destroy(e); /* delivers any on_finish still due: before the server goes */
  epic_gw_server_destroy(srv);
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
