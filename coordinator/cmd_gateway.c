/* `epic gateway`: a standalone gRPC router in front of several `epic serve`
 * clusters (coordinator/gateway.h). */
#define _GNU_SOURCE
#include "cmd_gateway.h"

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
#include "coordinator/gateway.h"
#include "coordinator/http_cli.h"
#include "coordinator/cli_security.h"

static const char *USAGE =
    "usage: epic gateway --upstream HOST:PORT[,HOST:PORT...] [--listen HOST:PORT] [options]\n"
    "\n"
    "Routes epic.v1.Inference calls (Generate, Tokenize, ModelInfo) to the healthy\n"
    "upstream `epic serve` with the fewest outstanding requests. Upstreams are\n"
    "health-checked (grpc.health.v1); a failed check or an UNAVAILABLE call marks\n"
    "one unhealthy until a check passes again, and a call that failed before any\n"
    "token reached the client is retried on another upstream. Health answers\n"
    "SERVING while any upstream is healthy. SIGTERM drains, then exits 0.\n"
    "\n"
    "  --upstream LIST          comma-separated upstream addresses (required)\n"
    "  --listen HOST:PORT       address to serve on (default 0.0.0.0:50050; port 0 = any)\n"
    "  --health-interval SECS   seconds between health checks of an upstream (default 1)\n"
    "  --health-timeout SECS    deadline of one health check (default 1)\n"
    "  --drain-timeout SECS     grace period for running calls after SIGTERM (default 30)\n"
    "  --max-request-bytes SIZE largest request accepted (default 64MiB)\n"
    "  --http HOST:PORT         also serve the OpenAI-compatible HTTP API there (through the\n"
    "                           router: same upstream choice, health checks and retries; the\n"
    "                           security options below apply to it too)\n"
    "  --reasoning-parser NAME  deepseek_r1 (default) or none\n"
    "  -v, --verbose            log upstream state changes and more on stderr\n"
    "  -h, --help               this help\n";

typedef struct gateway_opts {
  const char *listen;
  const char *http; /* NULL = no HTTP front */
  int reasoning;
  char *upstream_list;
  int verbose;
  float health_interval, health_timeout, drain_timeout;
  uint64_t max_request_bytes;
} gateway_opts;

static int parse(int argc, char **argv, gateway_opts *o) {
  enum { O_UPSTREAM = 256, O_LISTEN, O_HINT, O_HTIMEOUT, O_DRAIN, O_MAXREQ, O_HTTP, O_REASONING };
  static const struct option longopts[] = {{"upstream", required_argument, 0, O_UPSTREAM},
                                           {"listen", required_argument, 0, O_LISTEN},
                                           {"health-interval", required_argument, 0, O_HINT},
                                           {"health-timeout", required_argument, 0, O_HTIMEOUT},
                                           {"drain-timeout", required_argument, 0, O_DRAIN},
                                           {"max-request-bytes", required_argument, 0, O_MAXREQ},
                                           {"http", required_argument, 0, O_HTTP},
                                           {"reasoning-parser", required_argument, 0, O_REASONING},
                                           {"verbose", no_argument, 0, 'v'},
                                           {"help", no_argument, 0, 'h'},
                                           {0, 0, 0, 0}};
  const char *cmd = "gateway";
  int c;
  memset(o, 0, sizeof *o);
  o->listen = "0.0.0.0:50050";
  o->health_interval = 1;
  o->health_timeout = 1;
  o->drain_timeout = 30;
  o->max_request_bytes = (uint64_t)64 << 20;
  o->reasoning = 1;
  optind = 1;
  while ((c = getopt_long(argc, argv, "vh", longopts, NULL)) != -1) {
    int bad = 0;
    switch (c) {
    case O_UPSTREAM: o->upstream_list = optarg; break;
    case O_LISTEN: o->listen = optarg; break;
    case O_HINT:
      bad = epic_cli_f32(cmd, "--health-interval", optarg, 0.01, 3600, &o->health_interval);
      break;
    case O_HTIMEOUT:
      bad = epic_cli_f32(cmd, "--health-timeout", optarg, 0.01, 3600, &o->health_timeout);
      break;
    case O_DRAIN:
      bad = epic_cli_f32(cmd, "--drain-timeout", optarg, 0, 86400, &o->drain_timeout);
      break;
    case O_MAXREQ:
      bad = epic_plan_cli_size(cmd, "--max-request-bytes", optarg, &o->max_request_bytes);
      break;
    case O_HTTP: o->http = optarg; break;
    case O_REASONING: bad = epic_http_cli_reasoning(cmd, optarg, &o->reasoning); break;
    case 'v': o->verbose = 1; break;
    case 'h':
      fputs(USAGE, stdout);
      epic_cli_security_help(stdout, EPIC_CLI_SEC_GATEWAY);
      return 1;
    default: fputs("epic gateway: see --help\n", stderr); return -1;
    }
    if (bad)
      return -1;
  }
  if (optind < argc) {
    fprintf(stderr, "epic gateway: unexpected argument '%s' (see --help)\n", argv[optind]);
    return -1;
  }
  if (!o->upstream_list) {
    fputs("epic gateway: --upstream HOST:PORT[,...] is required (see --help)\n", stderr);
    return -1;
  }
  if (!strchr(o->listen, ':')) {
    fprintf(stderr, "epic gateway: --listen: expected HOST:PORT, got '%s'\n", o->listen);
    return -1;
  }
  if (o->max_request_bytes < 64 || o->max_request_bytes > ((uint64_t)1 << 30)) {
    fputs("epic gateway: --max-request-bytes: must be between 64 bytes and 1GiB\n", stderr);
    return -1;
  }
  return 0;
}

/* "a,b,c" -> items (pointers into the strdup'd copy *buf). -1 after a message. */
static int split_upstreams(const char *list, char **buf, const char **items, int max, int *n) {
  *n = 0;
  *buf = strdup(list);
  if (!*buf)
    return -1;
  char *save = NULL;
  int item = 0;
  for (char *p = *buf;; p = NULL) {
    char *tok = strtok_r(p, ",", &save);
    if (!tok)
      break;
    item++;
    if (!strchr(tok, ':')) {
      fprintf(stderr, "epic gateway: --upstream: item %d ('%s') is not HOST:PORT\n", item, tok);
      return -1;
    }
    if (*n == max) {
      fprintf(stderr, "epic gateway: --upstream: at most %d upstreams\n", max);
      return -1;
    }
    items[(*n)++] = tok;
  }
  if (*n == 0) {
    fputs("epic gateway: --upstream: no address given\n", stderr);
    return -1;
  }
  return 0;
}

int epic_cmd_gateway(int argc, char **argv) {
  gateway_opts o;
  epic_cli_security sec;
  if (epic_cli_security_take("gateway", EPIC_CLI_SEC_GATEWAY, &argc, argv, &sec))
    return 2;
  int pr = parse(argc, argv, &o);
  if (pr)
    return pr > 0 ? 0 : 2;
  if (epic_cli_security_open("gateway", &sec, o.listen))
    return 2;
  if (o.http && epic_listen_check_plaintext("gateway", "--http", o.http, sec.gw.tls_cert != NULL,
                                            sec.gw.plaintext) != EPIC_OK) {
    epic_cli_security_close(&sec);
    return 2;
  }
  /* The HTTP front reaches the router over a private socket (http_cli.h). */
  epic_http_cli_internal internal;
  memset(&internal, 0, sizeof internal);
  if (o.http && epic_http_cli_internal_open(&internal, &sec.gw) != EPIC_OK) {
    epic_cli_security_close(&sec);
    return 1;
  }
  epic_log_init(o.verbose ? EPIC_LOG_LEVEL_INFO : EPIC_LOG_LEVEL_WARN, -1);
  char *buf = NULL;
  const char *ups[64];
  int n_ups = 0, rc = 1;
  epic_gw_router *r = NULL;
  if (split_upstreams(o.upstream_list, &buf, ups, 64, &n_ups) != 0) {
    free(buf);
    epic_http_cli_internal_close(&internal);
    epic_cli_security_close(&sec);
    return 2;
  }
  volatile sig_atomic_t *drain_requests = epic_cli_drain_signals();
  epic_gw_router_params rp = {.size = sizeof rp,
                              .listen = o.listen,
                              .upstreams = ups,
                              .n_upstreams = n_ups,
                              .health_interval = o.health_interval,
                              .health_timeout = o.health_timeout,
                              .drain_timeout = o.drain_timeout,
                              .max_request_bytes = (int64_t)o.max_request_bytes,
                              .drain_requests = drain_requests,
                              .security = &sec.gw};
  if (epic_gw_router_create(&rp, &r) == EPIC_OK) {
    char addr[512];
    epic_gw_router_address(r, addr, sizeof addr);
    printf("epic gateway: %d upstream%s (%s), health checks every %.2fs\n", n_ups,
           n_ups > 1 ? "s" : "", o.upstream_list, (double)o.health_interval);
    epic_cli_security_print(stdout, "gateway", &sec);
    epic_http_cli *http = NULL;
    if (o.http &&
        epic_http_cli_gateway(o.http, &internal, &sec.gw, &sec.limits, o.reasoning, o.drain_timeout,
                              (int64_t)o.max_request_bytes, drain_requests, &http) != EPIC_OK) {
      epic_gw_router_destroy(r);
      epic_http_cli_internal_close(&internal);
      epic_cli_security_close(&sec);
      free(buf);
      return 1;
    }
    printf("epic gateway: listening on %s (pid %d)\n", addr, (int)getpid());
    fflush(stdout);
    rc = epic_gw_router_run(r) == EPIC_OK ? 0 : 1;
    epic_http_cli_stop(http);
    printf("epic gateway: drained, exiting\n");
    fflush(stdout);
  }
  epic_gw_router_destroy(r);
  epic_http_cli_internal_close(&internal);
  epic_cli_security_close(&sec);
  free(buf);
  return rc;
}

#else /* !EPIC_HAVE_GRPC */

int epic_cmd_gateway(int argc, char **argv) {
  (void)argc;
  (void)argv;
  fputs(
      "epic gateway: this epic was built without gRPC (install libgrpc-dev, libprotobuf-c-dev and "
      "protobuf-c-compiler, then rebuild)\n",
      stderr);
  return 2;
}

#endif
