/* Logger: the only process-wide mutable state in EPIC.
 * Call epic_log_init() once before threads start; every EPIC_LOG_* call is then
 * thread-safe (each line is written with one fprintf to stderr).
 * Levels: ERROR (always shown; one line a user can act on), WARN, INFO, DEBUG, TRACE
 * (TRACE gets the EPIC_CHECK hop lines). The level is also read from the
 * EPIC_LOG_LEVEL environment variable (error|warn|info|debug|trace) by epic_log_init. */
#ifndef EPIC_LOG_H
#define EPIC_LOG_H

#include "status.h"

typedef enum {
  EPIC_LOG_LEVEL_ERROR = 0,
  EPIC_LOG_LEVEL_WARN = 1,
  EPIC_LOG_LEVEL_INFO = 2,
  EPIC_LOG_LEVEL_DEBUG = 3,
  EPIC_LOG_LEVEL_TRACE = 4
} epic_log_level;

/* rank < 0: single process, no rank prefix. An EPIC_LOG_LEVEL variable overrides level. */
void epic_log_init(epic_log_level level, int rank);
/* Tag every later line with this MPI rank (keeps the level). Call right after
 * MPI is initialised, before threads start, so that even loading messages say
 * which rank wrote them. */
void epic_log_set_rank(int rank);
int epic_log_enabled(epic_log_level level);
void epic_log_write(epic_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#define EPIC_LOG_ERROR(...) epic_log_write(EPIC_LOG_LEVEL_ERROR, __VA_ARGS__)
#define EPIC_LOG_WARN(...) epic_log_write(EPIC_LOG_LEVEL_WARN, __VA_ARGS__)
#define EPIC_LOG_INFO(...) epic_log_write(EPIC_LOG_LEVEL_INFO, __VA_ARGS__)
#define EPIC_LOG_DEBUG(...) epic_log_write(EPIC_LOG_LEVEL_DEBUG, __VA_ARGS__)
#define EPIC_LOG_TRACE(...) epic_log_write(EPIC_LOG_LEVEL_TRACE, __VA_ARGS__)

/* NCCL-style check macros: every hop of a failure leaves a trace line. */
#define EPIC_CHECK(x)                                                                  \
  do {                                                                                 \
    epic_status s_ = (x);                                                              \
    if (s_ < 0) {                                                                      \
      EPIC_LOG_TRACE("%s:%d -> %s", __FILE__, __LINE__, epic_status_str(s_));          \
      return s_;                                                                       \
    }                                                                                  \
  } while (0)
#define EPIC_CHECK_GOTO(x, st, label)                                                  \
  do {                                                                                 \
    (st) = (x);                                                                        \
    if ((st) < 0) {                                                                    \
      EPIC_LOG_TRACE("%s:%d -> %s", __FILE__, __LINE__, epic_status_str(st));          \
      goto label;                                                                      \
    }                                                                                  \
  } while (0)

#endif
