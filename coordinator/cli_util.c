#define _POSIX_C_SOURCE 200809L
#include "cli_util.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

int epic_cli_i64(const char *cmd, const char *flag, const char *val, int64_t min, int64_t max,
                 int64_t *out) {
  char *end;
  long long v;
  errno = 0;
  v = strtoll(val, &end, 10);
  if (!*val || *end || errno) {
    fprintf(stderr, "epic %s: %s: expected an integer, got '%s'\n", cmd, flag, val);
    return -1;
  }
  if (v < min || v > max) {
    fprintf(stderr, "epic %s: %s: %lld is out of range [%lld, %lld]\n", cmd, flag, v,
            (long long)min, (long long)max);
    return -1;
  }
  *out = v;
  return 0;
}

int epic_cli_u64(const char *cmd, const char *flag, const char *val, uint64_t *out) {
  char *end;
  unsigned long long v;
  errno = 0;
  v = strtoull(val, &end, 10);
  if (!*val || *end || errno || val[0] == '-') {
    fprintf(stderr, "epic %s: %s: expected a non-negative integer, got '%s'\n", cmd, flag, val);
    return -1;
  }
  *out = v;
  return 0;
}

int epic_cli_f32(const char *cmd, const char *flag, const char *val, double min, double max,
                 float *out) {
  char *end;
  double v;
  errno = 0;
  v = strtod(val, &end);
  if (!*val || *end || errno || !isfinite(v)) {
    fprintf(stderr, "epic %s: %s: expected a number, got '%s'\n", cmd, flag, val);
    return -1;
  }
  if (v < min || v > max) {
    fprintf(stderr, "epic %s: %s: %g is out of range [%g, %g]\n", cmd, flag, v, min, max);
    return -1;
  }
  *out = (float)v;
  return 0;
}

int epic_cli_ids(const char *cmd, const char *flag, const char *val, int64_t max_id, int32_t **ids,
                 int64_t *n) {
  size_t cap = 1;
  const char *p = val;
  int64_t k = 0;
  for (const char *q = val; *q; q++) cap += *q == ',';
  *ids = malloc(cap * sizeof **ids);
  if (!*ids) return -1;
  while (1) {
    char *end;
    long long v;
    errno = 0;
    v = strtoll(p, &end, 10);
    if (end == p || errno || (*end && *end != ',') || v < 0 || v >= max_id) {
      fprintf(stderr, "epic %s: %s: item %lld ('%.*s') is not a token id in [0, %lld)\n", cmd, flag,
              (long long)k + 1, (int)strcspn(p, ","), p, (long long)max_id);
      free(*ids);
      *ids = NULL;
      return -1;
    }
    (*ids)[k++] = (int32_t)v;
    if (!*end) break;
    p = end + 1;
  }
  *n = k;
  return 0;
}

void epic_cli_json_string(FILE *f, const char *s, size_t n) {
  fputc('"', f);
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    switch (c) {
    case '"': fputs("\\\"", f); break;
    case '\\': fputs("\\\\", f); break;
    case '\n': fputs("\\n", f); break;
    case '\r': fputs("\\r", f); break;
    case '\t': fputs("\\t", f); break;
    default:
      if (c < 0x20)
        fprintf(f, "\\u%04x", c);
      else
        fputc(c, f);
    }
  }
  fputc('"', f);
}

void epic_cli_json_ids(FILE *f, const int32_t *ids, int64_t n) {
  fputc('[', f);
  for (int64_t i = 0; i < n; i++) fprintf(f, i ? ",%d" : "%d", ids[i]);
  fputc(']', f);
}

static volatile sig_atomic_t g_drain_requests;

static void on_drain_signal(int sig) {
  (void)sig;
  g_drain_requests = g_drain_requests + 1;
}

volatile sig_atomic_t *epic_cli_drain_signals(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_drain_signal;
  sigemptyset(&sa.sa_mask);
  sigaddset(&sa.sa_mask, SIGTERM);
  sigaddset(&sa.sa_mask, SIGINT);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  return &g_drain_requests;
}
