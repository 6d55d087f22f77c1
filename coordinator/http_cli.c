/* `--http` of `epic serve` and `epic gateway` (coordinator/http_cli.h). */
#define _GNU_SOURCE
#include "coordinator/http_cli.h"

#include <stdlib.h>
#include <unistd.h>

#include "common/log.h"
#include "coordinator/http.h"

struct epic_http_cli {
  epic_http *h;
  void *backend;
  int upstream; /* which backend destroy applies */
};

static void print_addr(const char *cmd, const char *listen, int port, const epic_gw_security *sec) {
  const char *colon = strrchr(listen, ':');
  printf("epic %s: %s (OpenAI API) on %.*s:%d\n", cmd, sec && sec->tls_cert ? "HTTPS" : "HTTP",
         (int)(colon - listen), listen, port);
  fflush(stdout);
}

epic_status epic_http_cli_serve(const char *listen, const epic_gw_server_params *sp,
                                const epic_engine_params *ep, int reasoning, epic_http_cli **out) {
  *out = NULL;
  epic_http_cli *c = calloc(1, sizeof *c);
  if (!c)
    return EPIC_ERR_NOMEM;
  epic_http_engine_params bp = {.size = sizeof bp,
                                .engine = sp->engine,
                                .tokenizer = sp->tokenizer,
                                .config = sp->config,
                                .max_context = sp->max_context,
                                .default_max_tokens = sp->default_max_tokens,
                                .kv_tokens = sp->kv_tokens_per_worker,
                                .page_size = sp->page_size,
                                .top_logprobs = ep->top_logprobs,
                                .comm_name = sp->comm_name,
                                .max_prompt_tokens = sp->limits.max_prompt_tokens,
                                .max_tokens_limit = sp->limits.max_tokens};
  epic_status st = epic_http_engine_backend_create(&bp, &c->backend);
  if (st == EPIC_OK) {
    epic_http_params hp = {.size = sizeof hp,
                           .listen = listen,
                           .ops = &epic_http_engine_ops,
                           .backend = c->backend,
                           .model_name = sp->model_name,
                           .log = "serve",
                           .reasoning = reasoning,
                           .max_request_bytes = sp->max_request_bytes,
                           .drain_timeout = sp->drain_timeout,
                           .drain_requests = sp->drain_requests,
                           .security = sp->security,
                           .limits = sp->limits,
                           .full_limits = 1};
    st = epic_http_create(&hp, &c->h);
  }
  if (st != EPIC_OK) {
    fprintf(stderr, "epic serve: --http %s: cannot serve HTTP (%s)\n", listen, epic_status_str(st));
    epic_http_cli_stop(c);
    return st;
  }
  print_addr("serve", listen, epic_http_port(c->h), sp->security);
  *out = c;
  return EPIC_OK;
}

epic_status epic_http_cli_gateway(const char *listen, const epic_http_cli_internal *in,
                                  const epic_gw_security *sec, const epic_gw_request_limits *limits,
                                  int reasoning, double drain_timeout, int64_t max_request_bytes,
                                  const volatile sig_atomic_t *drain_requests,
                                  epic_http_cli **out) {
  *out = NULL;
  epic_http_cli *c = calloc(1, sizeof *c);
  if (!c)
    return EPIC_ERR_NOMEM;
  c->upstream = 1;
  /* The router's private unix socket: reachable whatever --listen names and
   * whether or not it serves TLS, and by this user only. */
  const char *target = in->listen;
  epic_status st =
      epic_http_upstream_backend_create(target, in->token[0] ? in->token : NULL, &c->backend);
  if (st == EPIC_OK) {
    epic_http_params hp = {.size = sizeof hp,
                           .listen = listen,
                           .ops = &epic_http_upstream_ops,
                           .backend = c->backend,
                           .model_name = NULL,
                           .log = "gateway",
                           .reasoning = reasoning,
                           .max_request_bytes = max_request_bytes,
                           .drain_timeout = drain_timeout,
                           .drain_requests = drain_requests,
                           .security = sec,
                           .limits = limits ? *limits : (epic_gw_request_limits){0},
                           .full_limits = 0};
    st = epic_http_create(&hp, &c->h);
  }
  if (st != EPIC_OK) {
    fprintf(stderr, "epic gateway: --http %s: cannot serve HTTP (%s)\n", listen,
            epic_status_str(st));
    epic_http_cli_stop(c);
    return st;
  }
  print_addr("gateway", listen, epic_http_port(c->h), sec);
  *out = c;
  return EPIC_OK;
}

void epic_http_cli_stop(epic_http_cli *c) {
  if (!c)
    return;
  epic_http_destroy(c->h);
  if (c->upstream)
    epic_http_upstream_backend_destroy(c->backend);
  else
    epic_http_engine_backend_destroy(c->backend);
  free(c);
}

epic_status epic_http_cli_internal_open(epic_http_cli_internal *in, epic_gw_security *sec) {
  memset(in, 0, sizeof *in);
  const char *tmp = getenv("TMPDIR");
  snprintf(in->dir, sizeof in->dir, "%s/epic-gw-XXXXXX", tmp && tmp[0] ? tmp : "/tmp");
  if (strlen(in->dir) > 80 || !mkdtemp(in->dir)) { /* a unix socket path has ~107 bytes */
    fprintf(stderr,
            "epic gateway: --http: cannot make a private directory %s for the router's "
            "internal socket (set TMPDIR to a short writable path)\n",
            in->dir);
    in->dir[0] = '\0';
    return EPIC_ERR_IO;
  }
  snprintf(in->listen, sizeof in->listen, "unix:%s/router.sock", in->dir);
  sec->internal_listen = in->listen;
  if (sec->auth && epic_auth_make_internal(sec->auth, in->token, sizeof in->token) != EPIC_OK) {
    epic_http_cli_internal_close(in);
    sec->internal_listen = NULL;
    return EPIC_ERR_IO;
  }
  return EPIC_OK;
}

void epic_http_cli_internal_close(epic_http_cli_internal *in) {
  if (!in || !in->dir[0])
    return;
  char path[300];
  snprintf(path, sizeof path, "%s/router.sock", in->dir);
  unlink(path);
  rmdir(in->dir);
  memset(in->token, 0, sizeof in->token);
  in->dir[0] = '\0';
}
