#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Set once by epic_log_init before threads start (STYLE rule 9), read-only after. */
static epic_log_level g_level = EPIC_LOG_LEVEL_WARN;
static int g_rank = -1;

void epic_log_init(epic_log_level level, int rank) {
  static const char *names[] = {"error", "warn", "info", "debug", "trace"};
  const char *env = getenv("EPIC_LOG_LEVEL");
  g_level = level;
  g_rank = rank;
  if (env) {
    for (int i = 0; i < 5; i++)
      if (strcasecmp(env, names[i]) == 0) g_level = (epic_log_level)i;
  }
}

void epic_log_set_rank(int rank) { g_rank = rank; }

int epic_log_enabled(epic_log_level level) { return level <= g_level; }

void epic_log_write(epic_log_level level, const char *fmt, ...) {
  static const char *tags[] = {"error", "warning", "info", "debug", "trace"};
  char line[2048];
  int n;
  va_list ap;
  if (level > g_level) return;
  if (g_rank >= 0)
    n = snprintf(line, sizeof line, "epic[%d]: %s: ", g_rank, tags[level]);
  else
    n = snprintf(line, sizeof line, "epic: %s: ", tags[level]);
  va_start(ap, fmt);
  vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
  va_end(ap);
  /* One fprintf per line keeps lines from different threads whole. */
  fprintf(stderr, "%s\n", line);
}
