/* Small helpers shared by the `epic` subcommands: strict number parsing with
 * error messages that name the flag, id lists, JSON string escaping.
 * Every parse function prints "epic <cmd>: <flag>: ..." on stderr and returns -1
 * on bad input, 0 on success. Thread-safe (no state). */
#ifndef EPIC_CLI_UTIL_H
#define EPIC_CLI_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <signal.h>
#include <stdio.h>

int epic_cli_i64(const char *cmd, const char *flag, const char *val, int64_t min, int64_t max,
                 int64_t *out);
int epic_cli_u64(const char *cmd, const char *flag, const char *val, uint64_t *out);
int epic_cli_f32(const char *cmd, const char *flag, const char *val, double min, double max,
                 float *out);
/* "1,2,3" -> malloc'd ids (each in [0, max_id)); empty items are errors. */
int epic_cli_ids(const char *cmd, const char *flag, const char *val, int64_t max_id, int32_t **ids,
                 int64_t *n);
/* Writes s (n bytes of UTF-8) as a JSON string literal with quotes. */
void epic_cli_json_string(FILE *f, const char *s, size_t n);
void epic_cli_json_ids(FILE *f, const int32_t *ids, int64_t n);

/* SIGTERM and SIGINT count drain requests from now on (the servers stop
 * admitting on the first, cut the grace period short on the second). Returns
 * the counter: process-wide, because a signal handler can reach nothing else. */
volatile sig_atomic_t *epic_cli_drain_signals(void);

#endif
