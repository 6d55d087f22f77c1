/* Security options of `epic serve` / `epic gateway` (coordinator/cli_security.h). */
#define _GNU_SOURCE
#include "coordinator/cli_security.h"

#include <openssl/pem.h>
#include <openssl/x509.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/cli_util.h"

enum {
  S_TLS_CERT,
  S_TLS_KEY,
  S_TLS_CLIENT_CA,
  S_PLAINTEXT,
  S_API_KEYS,
  S_RPS,
  S_BURST,
  S_TPM,
  S_STREAMS,
  S_MAX_PROMPT,
  S_MAX_TOKENS,
  S_MAX_STOPS,
  S_MAX_STOP_LEN,
  S_MAX_STOP_IDS,
  S_MAX_N,
  S_MAX_TOP_LP,
  S_UP_CA,
  S_UP_CERT,
  S_UP_KEY,
  S_UP_NAME,
};

#define BOTH (EPIC_CLI_SEC_SERVE | EPIC_CLI_SEC_GATEWAY)

static const struct opt {
  const char *name;
  int id, has_arg, modes;
  const char *help;
} OPTS[] = {
    {"tls-cert", S_TLS_CERT, 1, BOTH, "PEM certificate chain: serve TLS only (gRPC and --http)"},
    {"tls-key", S_TLS_KEY, 1, BOTH, "PEM private key of --tls-cert"},
    {"tls-client-ca", S_TLS_CLIENT_CA, 1, BOTH,
     "PEM CA: clients must present a certificate it signed (mutual TLS)"},
    {"plaintext", S_PLAINTEXT, 0, BOTH,
     "allow plaintext on a non-loopback --listen / --http (warns); loopback needs no flag"},
    {"api-keys", S_API_KEYS, 1, BOTH,
     "keys file: KEY | sha256:HEX | revoked ... per line; calls need 'authorization: Bearer KEY'\n"
     "                                 (gRPC but Health; HTTP /v1/* and /metrics, not /health)"},
    {"rate-limit-rps", S_RPS, 1, BOTH, "requests per second per key (0 = unlimited)"},
    {"rate-limit-burst", S_BURST, 1, BOTH, "request bucket size (default max(1, rps))"},
    {"rate-limit-tokens-per-min", S_TPM, 1, BOTH,
     "generated tokens per minute per key (0 = unlimited)"},
    {"max-streams-per-key", S_STREAMS, 1, BOTH,
     "concurrent Generate streams / HTTP completions per key (0 = unlimited)"},
    {"max-prompt-tokens", S_MAX_PROMPT, 1, EPIC_CLI_SEC_SERVE,
     "prompt tokens of a request (default: the context length)"},
    {"max-tokens-limit", S_MAX_TOKENS, 1, EPIC_CLI_SEC_SERVE,
     "largest sampling.max_tokens (default: the context length)"},
    {"max-stop-strings", S_MAX_STOPS, 1, EPIC_CLI_SEC_SERVE,
     "stop strings per request (default 16)"},
    {"max-stop-len", S_MAX_STOP_LEN, 1, EPIC_CLI_SEC_SERVE, "bytes per stop string (default 256)"},
    {"max-stop-token-ids", S_MAX_STOP_IDS, 1, EPIC_CLI_SEC_SERVE, "stop token ids (default 64)"},
    {"max-n", S_MAX_N, 1, BOTH, "choices per request, HTTP API `n` (default 16)"},
    {"max-top-logprobs", S_MAX_TOP_LP, 1, EPIC_CLI_SEC_SERVE,
     "alternatives per token, HTTP API `top_logprobs` (0..20, default 20; only\n"
     "requests that ask compute them)"},
    {"upstream-tls-ca", S_UP_CA, 1, EPIC_CLI_SEC_GATEWAY,
     "PEM CA of the upstreams' certificates: connect with TLS"},
    {"upstream-cert", S_UP_CERT, 1, EPIC_CLI_SEC_GATEWAY,
     "PEM client certificate for the upstreams (mutual TLS)"},
    {"upstream-key", S_UP_KEY, 1, EPIC_CLI_SEC_GATEWAY, "PEM private key of --upstream-cert"},
    {"upstream-tls-name", S_UP_NAME, 1, EPIC_CLI_SEC_GATEWAY,
     "name expected in the upstreams' certificates (default: the host of --upstream)"},
};
#define N_OPTS (sizeof OPTS / sizeof OPTS[0])

static int set_i64(const char *cmd, const char *flag, const char *v, int64_t min, int64_t max,
                   int64_t *out) {
  return epic_cli_i64(cmd, flag, v, min, max, out);
}

static int set_f(const char *cmd, const char *flag, const char *v, double max, double *out) {
  float f;
  if (epic_cli_f32(cmd, flag, v, 0, max, &f))
    return -1;
  *out = f;
  return 0;
}

static int apply(const char *cmd, epic_cli_security *o, const struct opt *op, const char *v) {
  char flag[64];
  snprintf(flag, sizeof flag, "--%s", op->name);
  epic_gw_request_limits *l = &o->limits;
  switch (op->id) {
  case S_TLS_CERT: o->gw.tls_cert = v; return 0;
  case S_TLS_KEY: o->gw.tls_key = v; return 0;
  case S_TLS_CLIENT_CA: o->gw.tls_client_ca = v; return 0;
  case S_PLAINTEXT: o->gw.plaintext = 1; return 0;
  case S_API_KEYS: o->auth.keys_file = v; return 0;
  case S_RPS: return set_f(cmd, flag, v, 1e6, &o->auth.requests_per_s);
  case S_BURST: return set_f(cmd, flag, v, 1e6, &o->auth.request_burst);
  case S_TPM: return set_f(cmd, flag, v, 1e12, &o->auth.tokens_per_min);
  case S_STREAMS: return set_i64(cmd, flag, v, 0, INT32_MAX, &o->auth.max_streams);
  case S_MAX_PROMPT: return set_i64(cmd, flag, v, 1, INT32_MAX, &l->max_prompt_tokens);
  case S_MAX_TOKENS: return set_i64(cmd, flag, v, 1, INT32_MAX, &l->max_tokens);
  case S_MAX_STOPS: return set_i64(cmd, flag, v, 1, 1024, &l->max_stop_strings);
  case S_MAX_STOP_LEN: return set_i64(cmd, flag, v, 1, 65536, &l->max_stop_len);
  case S_MAX_STOP_IDS: return set_i64(cmd, flag, v, 1, 65536, &l->max_stop_token_ids);
  case S_MAX_N: return set_i64(cmd, flag, v, 1, 128, &l->max_n);
  case S_MAX_TOP_LP: {
    const int bad = set_i64(cmd, flag, v, 0, 20, &l->max_top_logprobs);
    if (!bad && l->max_top_logprobs == 0)
      l->max_top_logprobs = -1; /* none (0 in the limits means the default) */
    return bad;
  }
  case S_UP_CA: o->gw.upstream_ca = v; return 0;
  case S_UP_CERT: o->gw.upstream_cert = v; return 0;
  case S_UP_KEY: o->gw.upstream_key = v; return 0;
  case S_UP_NAME: o->gw.upstream_name = v; return 0;
  }
  return -1;
}

int epic_cli_security_take(const char *cmd, int mode, int *argc, char **argv,
                           epic_cli_security *o) {
  memset(o, 0, sizeof *o);
  o->mode = mode;
  o->auth.size = sizeof o->auth;
  int out = 1;
  for (int i = 1; i < *argc; i++) {
    const char *a = argv[i];
    if (strcmp(a, "--") == 0) {
      while (i < *argc)
        argv[out++] = argv[i++];
      break;
    }
    const struct opt *op = NULL;
    const char *val = NULL;
    if (strncmp(a, "--", 2) == 0) {
      const char *eq = strchr(a + 2, '=');
      size_t n = eq ? (size_t)(eq - a - 2) : strlen(a + 2);
      for (size_t k = 0; k < N_OPTS; k++)
        if ((OPTS[k].modes & mode) && strlen(OPTS[k].name) == n &&
            strncmp(OPTS[k].name, a + 2, n) == 0)
          op = &OPTS[k];
      if (op && eq)
        val = eq + 1;
    }
    if (!op) {
      argv[out++] = argv[i];
      continue;
    }
    if (!op->has_arg && val) {
      fprintf(stderr, "epic %s: --%s takes no value\n", cmd, op->name);
      return -1;
    }
    if (op->has_arg && !val) {
      if (i + 1 >= *argc) {
        fprintf(stderr, "epic %s: --%s needs a value\n", cmd, op->name);
        return -1;
      }
      val = argv[++i];
    }
    if (apply(cmd, o, op, val))
      return -1;
  }
  for (int i = out; i < *argc; i++)
    argv[i] = NULL;
  *argc = out;
  return 0;
}

/* PEM checks with libcrypto, so that a wrong file is named at start-up, not as
 * a failed handshake later. */
static X509 *read_cert(const char *cmd, const char *flag, const char *path) {
  FILE *f = fopen(path, "r");
  if (!f) {
    fprintf(stderr, "epic %s: %s %s: cannot open\n", cmd, flag, path);
    return NULL;
  }
  X509 *x = PEM_read_X509(f, NULL, NULL, NULL);
  fclose(f);
  if (!x)
    fprintf(stderr, "epic %s: %s %s: no PEM certificate in it\n", cmd, flag, path);
  return x;
}

static int check_pair(const char *cmd, const char *cflag, const char *cert, const char *kflag,
                      const char *key) {
  X509 *x = read_cert(cmd, cflag, cert);
  if (!x)
    return -1;
  int rc = -1;
  FILE *f = fopen(key, "r");
  EVP_PKEY *k = f ? PEM_read_PrivateKey(f, NULL, NULL, NULL) : NULL;
  if (f)
    fclose(f);
  if (!k)
    fprintf(stderr, "epic %s: %s %s: %s\n", cmd, kflag, key,
            f ? "no (unencrypted) PEM private key in it" : "cannot open");
  else if (X509_check_private_key(x, k) != 1)
    fprintf(stderr, "epic %s: %s %s does not belong to the certificate of %s %s\n", cmd, kflag, key,
            cflag, cert);
  else
    rc = 0;
  EVP_PKEY_free(k);
  X509_free(x);
  return rc;
}

static int check_ca(const char *cmd, const char *flag, const char *path) {
  X509 *x = read_cert(cmd, flag, path);
  X509_free(x);
  return x ? 0 : -1;
}

int epic_cli_security_open(const char *cmd, epic_cli_security *o, const char *listen) {
  epic_gw_security *g = &o->gw;
  if (!g->tls_cert != !g->tls_key) {
    fprintf(stderr, "epic %s: --tls-cert and --tls-key go together\n", cmd);
    return -1;
  }
  if (g->tls_client_ca && !g->tls_cert) {
    fprintf(stderr, "epic %s: --tls-client-ca needs --tls-cert and --tls-key\n", cmd);
    return -1;
  }
  if (g->plaintext && g->tls_cert) {
    fprintf(stderr, "epic %s: --plaintext and --tls-cert contradict each other\n", cmd);
    return -1;
  }
  if (g->tls_cert && check_pair(cmd, "--tls-cert", g->tls_cert, "--tls-key", g->tls_key))
    return -1;
  if (g->tls_client_ca && check_ca(cmd, "--tls-client-ca", g->tls_client_ca))
    return -1;
  if ((g->upstream_cert || g->upstream_key || g->upstream_name) && !g->upstream_ca) {
    fprintf(stderr,
            "epic %s: --upstream-cert/--upstream-key/--upstream-tls-name need "
            "--upstream-tls-ca\n",
            cmd);
    return -1;
  }
  if (!g->upstream_cert != !g->upstream_key) {
    fprintf(stderr, "epic %s: --upstream-cert and --upstream-key go together\n", cmd);
    return -1;
  }
  if (g->upstream_ca && check_ca(cmd, "--upstream-tls-ca", g->upstream_ca))
    return -1;
  if (g->upstream_cert &&
      check_pair(cmd, "--upstream-cert", g->upstream_cert, "--upstream-key", g->upstream_key))
    return -1;
  /* Refuse before a long model load; the server prints the --plaintext warning. */
  if (!g->tls_cert && !g->plaintext && !epic_listen_is_local(listen) &&
      epic_listen_check_plaintext(cmd, "--listen", listen, 0, 0) != EPIC_OK)
    return -1;
  if (o->auth.keys_file || o->auth.requests_per_s > 0 || o->auth.tokens_per_min > 0 ||
      o->auth.max_streams > 0) {
    if (epic_auth_create(&o->auth, &g->auth) != EPIC_OK) {
      fprintf(stderr, "epic %s: cannot set up API keys / rate limits (see above)\n", cmd);
      return -1;
    }
  }
  return 0;
}

void epic_cli_security_close(epic_cli_security *o) {
  if (!o)
    return;
  epic_auth_destroy(o->gw.auth);
  o->gw.auth = NULL;
}

void epic_cli_security_help(FILE *f, int mode) {
  fputs("security:\n", f);
  for (size_t k = 0; k < N_OPTS; k++) {
    if (!(OPTS[k].modes & mode))
      continue;
    char left[64];
    snprintf(left, sizeof left, "--%s%s", OPTS[k].name, OPTS[k].has_arg ? " X" : "");
    fprintf(f, "  %-30s %s\n", left, OPTS[k].help);
  }
}

void epic_cli_security_print(FILE *f, const char *cmd, const epic_cli_security *o) {
  const epic_gw_security *g = &o->gw;
  epic_auth_params ap;
  epic_auth_get_params(g->auth, &ap);
  fprintf(f, "epic %s: %s, API keys %s", cmd,
          g->tls_cert ? (g->tls_client_ca ? "TLS with client certificates" : "TLS")
                      : "plaintext (no TLS)",
          epic_auth_keys_required(g->auth) ? "required" : "off");
  if (epic_auth_keys_required(g->auth))
    fprintf(f, " (%d active)", epic_auth_n_keys(g->auth));
  if (ap.requests_per_s > 0)
    fprintf(f, ", %g requests/s per key (burst %g)", ap.requests_per_s, ap.request_burst);
  if (ap.tokens_per_min > 0)
    fprintf(f, ", %g tokens/min per key", ap.tokens_per_min);
  if (ap.max_streams > 0)
    fprintf(f, ", %lld streams per key", (long long)ap.max_streams);
  if (o->mode & EPIC_CLI_SEC_GATEWAY)
    fprintf(f, ", upstreams over %s",
            g->upstream_ca ? (g->upstream_cert ? "mutual TLS" : "TLS") : "plaintext");
  fputc('\n', f);
}
