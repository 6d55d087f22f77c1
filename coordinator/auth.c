/* API keys, rate limits and stream caps of the front doors (coordinator/auth.h). */
#define _GNU_SOURCE
#include "coordinator/auth.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/clock.h"
#include "common/log.h"

typedef struct principal {
  unsigned char hash[32];
  int line; /* 0 = anonymous */
  int revoked;
  double req_level, tok_level, t_last;
  int64_t streams;
} principal;

struct epic_auth {
  epic_auth_params p;
  char *keys_file;
  principal *pr; /* keys, or one anonymous principal */
  int n, n_active, keys;
  int has_internal;
  unsigned char internal[32]; /* SHA-256 of the internal token */
  pthread_mutex_t mu;
};

static double now_of(const epic_auth *a) {
  return a->p.clock ? a->p.clock(a->p.clock_user) : epic_now_seconds();
}

static int sha256(const void *data, size_t n, unsigned char out[32]) {
  unsigned int len = 0;
  return EVP_Digest(data, n, out, &len, EVP_sha256(), NULL) == 1 && len == 32 ? 0 : -1;
}

static int hexval(int c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  c = tolower(c);
  return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* A key as a client may send it: printable ASCII without spaces (what fits a
 * Bearer token and an HTTP header). */
static int key_chars_ok(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++)
    if ((unsigned char)s[i] <= 0x20 || (unsigned char)s[i] >= 0x7f)
      return 0;
  return 1;
}

/* One line of the keys file into *e. Errors name the line, never its text. */
static epic_status parse_line(const char *file, int line_no, char *s, principal *e, int *skip) {
  *skip = 0;
  size_t n = strlen(s);
  while (n && isspace((unsigned char)s[n - 1]))
    s[--n] = '\0';
  while (*s && isspace((unsigned char)*s))
    s++, n--;
  if (n == 0 || s[0] == '#') {
    *skip = 1;
    return EPIC_OK;
  }
  memset(e, 0, sizeof *e);
  e->line = line_no;
  if (strncmp(s, "revoked", 7) == 0 && isspace((unsigned char)s[7])) {
    e->revoked = 1;
    s += 7;
    while (*s && isspace((unsigned char)*s))
      s++;
    n = strlen(s);
  }
  if (strncmp(s, "sha256:", 7) == 0) {
    const char *h = s + 7;
    if (strlen(h) != 64) {
      EPIC_LOG_ERROR("auth: %s:%d: sha256: expected 64 hex digits", file, line_no);
      return EPIC_ERR_INVALID;
    }
    for (int i = 0; i < 32; i++) {
      int hi = hexval(h[2 * i]), lo = hexval(h[2 * i + 1]);
      if (hi < 0 || lo < 0) {
        EPIC_LOG_ERROR("auth: %s:%d: sha256: not a hex digit", file, line_no);
        return EPIC_ERR_INVALID;
      }
      e->hash[i] = (unsigned char)(hi << 4 | lo);
    }
    return EPIC_OK;
  }
  if (n < EPIC_AUTH_MIN_KEY || n > EPIC_AUTH_MAX_KEY) {
    EPIC_LOG_ERROR("auth: %s:%d: a key must have %d to %d characters (this one has %zu)", file,
                   line_no, EPIC_AUTH_MIN_KEY, EPIC_AUTH_MAX_KEY, n);
    return EPIC_ERR_INVALID;
  }
  if (!key_chars_ok(s, n)) {
    EPIC_LOG_ERROR("auth: %s:%d: a key may hold printable ASCII only, no spaces", file, line_no);
    return EPIC_ERR_INVALID;
  }
  if (sha256(s, n, e->hash) != 0)
    return EPIC_ERR_INVALID;
  return EPIC_OK;
}

static epic_status load_keys(epic_auth *a, const char *file) {
  FILE *f = fopen(file, "r");
  if (!f) {
    EPIC_LOG_ERROR("auth: --api-keys %s: %s", file, strerror(errno));
    return EPIC_ERR_IO;
  }
  char *line = NULL;
  size_t cap = 0;
  int line_no = 0, cap_pr = 0;
  epic_status st = EPIC_OK;
  while (getline(&line, &cap, f) >= 0) {
    line_no++;
    principal e;
    int skip;
    st = parse_line(file, line_no, line, &e, &skip);
    /* The buffer held a key: do not leave it in freed memory. */
    OPENSSL_cleanse(line, cap);
    if (st != EPIC_OK)
      break;
    if (skip)
      continue;
    for (int i = 0; i < a->n; i++)
      if (memcmp(a->pr[i].hash, e.hash, 32) == 0) {
        EPIC_LOG_ERROR("auth: %s:%d: the same key as line %d", file, line_no, a->pr[i].line);
        st = EPIC_ERR_INVALID;
        goto done;
      }
    if (a->n == cap_pr) {
      cap_pr = cap_pr ? 2 * cap_pr : 16;
      principal *p = realloc(a->pr, (size_t)cap_pr * sizeof *p);
      if (!p) {
        st = EPIC_ERR_NOMEM;
        goto done;
      }
      a->pr = p;
    }
    a->pr[a->n++] = e;
    a->n_active += !e.revoked;
  }
  if (st == EPIC_OK && a->n_active == 0) {
    EPIC_LOG_ERROR("auth: --api-keys %s: no active key in the file", file);
    st = EPIC_ERR_INVALID;
  }
done:
  free(line);
  fclose(f);
  return st;
}

epic_status epic_auth_create(const epic_auth_params *p, epic_auth **out) {
  *out = NULL;
  if (!p || p->size != sizeof *p) {
    EPIC_LOG_ERROR("auth: epic_auth_params.size: unknown size");
    return EPIC_ERR_INVALID;
  }
  if (!(p->requests_per_s >= 0) || !(p->request_burst >= 0) || !(p->tokens_per_min >= 0) ||
      p->max_streams < 0) {
    EPIC_LOG_ERROR("auth: rate limits must be >= 0");
    return EPIC_ERR_INVALID;
  }
  epic_auth *a = calloc(1, sizeof *a);
  if (!a)
    return EPIC_ERR_NOMEM;
  a->p = *p;
  if (a->p.request_burst <= 0)
    a->p.request_burst = a->p.requests_per_s > 1 ? a->p.requests_per_s : 1;
  epic_status st = EPIC_OK;
  if (pthread_mutex_init(&a->mu, NULL) != 0) {
    free(a);
    return EPIC_ERR_NOMEM;
  }
  if (p->keys_file) {
    a->keys = 1;
    a->keys_file = strdup(p->keys_file);
    a->p.keys_file = a->keys_file;
    EPIC_CHECK_GOTO(a->keys_file ? load_keys(a, p->keys_file) : EPIC_ERR_NOMEM, st, fail);
  } else {
    a->pr = calloc(1, sizeof *a->pr);
    if (!a->pr) {
      st = EPIC_ERR_NOMEM;
      goto fail;
    }
    a->n = a->n_active = 1;
  }
  double t = now_of(a);
  for (int i = 0; i < a->n; i++) {
    a->pr[i].req_level = a->p.request_burst;
    a->pr[i].tok_level = a->p.tokens_per_min;
    a->pr[i].t_last = t;
  }
  *out = a;
  return EPIC_OK;
fail:
  epic_auth_destroy(a);
  return st;
}

void epic_auth_destroy(epic_auth *a) {
  if (!a)
    return;
  if (a->pr)
    OPENSSL_cleanse(a->pr, (size_t)a->n * sizeof *a->pr);
  free(a->pr);
  free(a->keys_file);
  pthread_mutex_destroy(&a->mu);
  free(a);
}

static void set_msg(epic_auth_result *r, epic_auth_verdict v, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_msg(epic_auth_result *r, epic_auth_verdict v, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(r->message, sizeof r->message, fmt, ap);
  va_end(ap);
  r->verdict = v;
}

/* Index of the principal that key (n bytes) names, or -1. Every entry is
 * compared, whatever matched, in constant time per entry. */
static int find_key(const epic_auth *a, const char *key, size_t n) {
  unsigned char h[32];
  if (sha256(key, n, h) != 0)
    return -1;
  int found = -1;
  for (int i = 0; i < a->n; i++) {
    int eq = CRYPTO_memcmp(h, a->pr[i].hash, 32) == 0;
    /* Branch-free select: the loop does the same work whichever entry matches. */
    found = eq ? i : found;
  }
  OPENSSL_cleanse(h, sizeof h);
  return found;
}

static void refill(const epic_auth *a, principal *pr, double t) {
  double dt = t - pr->t_last;
  if (dt <= 0)
    return;
  pr->t_last = t;
  if (a->p.requests_per_s > 0) {
    pr->req_level += dt * a->p.requests_per_s;
    if (pr->req_level > a->p.request_burst)
      pr->req_level = a->p.request_burst;
  }
  if (a->p.tokens_per_min > 0) {
    pr->tok_level += dt * a->p.tokens_per_min / 60.0;
    if (pr->tok_level > a->p.tokens_per_min)
      pr->tok_level = a->p.tokens_per_min;
  }
}

static int64_t ms_ceil(double s) {
  double ms = ceil(s * 1000.0);
  return ms < 1 ? 1 : ms > 3.6e6 ? 3600000 : (int64_t)ms;
}

epic_auth_verdict epic_auth_admit(epic_auth *a, const char *authorization, size_t len, int stream,
                                  epic_auth_grant *g, epic_auth_result *r) {
  memset(r, 0, sizeof *r);
  memset(g, 0, sizeof *g);
  snprintf(r->principal, sizeof r->principal, "-");
  int idx = 0;
  if (a->keys) {
    if (!authorization || len == 0) {
      set_msg(r, EPIC_AUTH_DENIED,
              "authorization: missing API key (send 'authorization: Bearer <key>')");
      return r->verdict;
    }
    const char *k = authorization;
    size_t n = len;
    if (n < 7 || strncasecmp(k, "Bearer ", 7) != 0) {
      set_msg(r, EPIC_AUTH_DENIED, "authorization: expected 'Bearer <key>'");
      return r->verdict;
    }
    k += 7, n -= 7;
    while (n && *k == ' ')
      k++, n--;
    if (n == 0 || n > EPIC_AUTH_MAX_KEY) {
      set_msg(r, EPIC_AUTH_DENIED, "authorization: invalid API key");
      return r->verdict;
    }
    idx = find_key(a, k, n);
    if (idx < 0) {
      set_msg(r, EPIC_AUTH_DENIED, "authorization: invalid API key");
      return r->verdict;
    }
  }
  pthread_mutex_lock(&a->mu);
  principal *pr = &a->pr[idx];
  if (pr->line)
    snprintf(r->principal, sizeof r->principal, "key@%d", pr->line);
  else
    snprintf(r->principal, sizeof r->principal, "anonymous");
  if (pr->revoked) {
    pthread_mutex_unlock(&a->mu);
    set_msg(r, EPIC_AUTH_DENIED, "authorization: API key revoked");
    return r->verdict;
  }
  refill(a, pr, now_of(a));
  if (stream && a->p.max_streams > 0 && pr->streams >= a->p.max_streams) {
    set_msg(r, EPIC_AUTH_LIMITED,
            "concurrent streams: %lld open for %s, the cap of --max-streams-per-key %lld; retry "
            "when one ends",
            (long long)pr->streams, r->principal, (long long)a->p.max_streams);
    r->retry_after_ms = 1000; /* a stream's end cannot be foreseen: a polite guess */
  } else if (a->p.requests_per_s > 0 && pr->req_level < 1.0) {
    r->retry_after_ms = ms_ceil((1.0 - pr->req_level) / a->p.requests_per_s);
    set_msg(r, EPIC_AUTH_LIMITED,
            "rate limit: %s exceeded --rate-limit-rps %g (burst %g); retry after %lld ms",
            r->principal, a->p.requests_per_s, a->p.request_burst, (long long)r->retry_after_ms);
  } else if (stream && a->p.tokens_per_min > 0 && pr->tok_level <= 0) {
    r->retry_after_ms = ms_ceil((1.0 - pr->tok_level) * 60.0 / a->p.tokens_per_min);
    set_msg(r, EPIC_AUTH_LIMITED,
            "token rate limit: %s used its --rate-limit-tokens-per-min %g; retry after %lld ms",
            r->principal, a->p.tokens_per_min, (long long)r->retry_after_ms);
  } else {
    if (a->p.requests_per_s > 0)
      pr->req_level -= 1.0;
    if (stream) {
      pr->streams++;
      g->stream = 1;
    }
    g->principal = idx + 1;
    r->verdict = EPIC_AUTH_OK;
  }
  pthread_mutex_unlock(&a->mu);
  return r->verdict;
}

void epic_auth_charge(epic_auth *a, const epic_auth_grant *g, int64_t tokens) {
  if (!a || !g || g->principal <= 0 || a->p.tokens_per_min <= 0 || tokens <= 0)
    return;
  pthread_mutex_lock(&a->mu);
  principal *pr = &a->pr[g->principal - 1];
  refill(a, pr, now_of(a));
  pr->tok_level -= (double)tokens;
  pthread_mutex_unlock(&a->mu);
}

void epic_auth_release(epic_auth *a, epic_auth_grant *g) {
  if (!a || !g || !g->stream || g->principal <= 0)
    return;
  pthread_mutex_lock(&a->mu);
  a->pr[g->principal - 1].streams--;
  g->stream = 0;
  pthread_mutex_unlock(&a->mu);
}

epic_status epic_auth_make_internal(epic_auth *a, char *out, size_t n) {
  unsigned char raw[32];
  if (!a || n < 65)
    return EPIC_ERR_INVALID;
  if (RAND_bytes(raw, sizeof raw) != 1) {
    EPIC_LOG_ERROR("auth: no randomness for the internal token");
    return EPIC_ERR_IO;
  }
  static const char hex[] = "0123456789abcdef";
  for (int i = 0; i < 32; i++) {
    out[2 * i] = hex[raw[i] >> 4];
    out[2 * i + 1] = hex[raw[i] & 15];
  }
  out[64] = '\0';
  OPENSSL_cleanse(raw, sizeof raw);
  if (sha256(out, 64, a->internal) != 0)
    return EPIC_ERR_IO;
  a->has_internal = 1;
  return EPIC_OK;
}

int epic_auth_is_internal(epic_auth *a, const char *tok, size_t n) {
  unsigned char h[32];
  if (!a || !a->has_internal || !tok || n != 64 || sha256(tok, n, h) != 0)
    return 0;
  int eq = CRYPTO_memcmp(h, a->internal, 32) == 0;
  OPENSSL_cleanse(h, sizeof h);
  return eq;
}

int epic_auth_keys_required(const epic_auth *a) {
  return a ? a->keys : 0;
}

int epic_auth_n_keys(const epic_auth *a) {
  return a && a->keys ? a->n_active : 0;
}

int epic_auth_counts_tokens(const epic_auth *a) {
  return a && a->p.tokens_per_min > 0;
}

void epic_auth_get_params(const epic_auth *a, epic_auth_params *out) {
  memset(out, 0, sizeof *out);
  out->size = sizeof *out;
  if (a)
    *out = a->p;
}

/* ---- plaintext policy ----------------------------------------------------------- */

int epic_listen_is_local(const char *listen) {
  if (!listen)
    return 0;
  if (strncmp(listen, "unix:", 5) == 0 || strncmp(listen, "unix-abstract:", 14) == 0)
    return 1;
  char host[256];
  const char *colon = strrchr(listen, ':');
  size_t n = colon ? (size_t)(colon - listen) : strlen(listen);
  if (n >= sizeof host)
    return 0;
  memcpy(host, listen, n);
  host[n] = '\0';
  if (n >= 2 && host[0] == '[' && host[n - 1] == ']') {
    memmove(host, host + 1, n - 2);
    host[n - 2] = '\0';
  }
  if (strcmp(host, "localhost") == 0 || strcmp(host, "::1") == 0)
    return 1;
  /* 127.0.0.0/8, written as dotted decimal. */
  unsigned b[4];
  char end;
  return sscanf(host, "%u.%u.%u.%u%c", &b[0], &b[1], &b[2], &b[3], &end) == 4 && b[0] == 127 &&
         b[1] < 256 && b[2] < 256 && b[3] < 256;
}

epic_status epic_listen_check_plaintext(const char *who, const char *flag, const char *listen,
                                        int tls, int plaintext) {
  if (tls || epic_listen_is_local(listen))
    return EPIC_OK;
  if (!plaintext) {
    fprintf(stderr,
            "epic %s: %s %s is not a loopback address: serve TLS there (--tls-cert and "
            "--tls-key) or pass --plaintext to allow unencrypted traffic explicitly\n",
            who, flag, listen);
    return EPIC_ERR_INVALID;
  }
  fprintf(stderr,
          "epic %s: WARNING: --plaintext: %s %s is reachable from other machines without TLS; "
          "API keys, prompts and outputs cross the network unencrypted\n",
          who, flag, listen);
  return EPIC_OK;
}
