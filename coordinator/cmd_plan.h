/* `epic plan` subcommand: expert placement and per-rank memory from config.json alone
 * (DESIGN §7). argv[0] is "plan". Returns the exit code: 0 if the plan fits (or no
 * --gpu-mem was given), 1 if it does not fit or the model/statistics cannot be read,
 * 2 for usage errors. */
#ifndef EPIC_CMD_PLAN_H
#define EPIC_CMD_PLAN_H

#include <stdint.h>

int epic_cmd_plan(int argc, char **argv);

/* Parse a memory size: a non-negative number with an optional unit. Units: B or none
 * (bytes), KB/MB/GB/TB/PB (powers of 1000), KiB/MiB/GiB/TiB/PiB and the single letters
 * K/M/G/T/P (powers of 1024, as in `free -g`); case-insensitive, e.g. 80GiB, 141GB,
 * 80G, 1.5TiB, 85899345920. Returns 0 and *out (rounded down to a byte), or -1 after
 * printing "epic <cmd>: <flag>: ..." on stderr. Values below 1 byte or above 2^63 are
 * errors. Thread-safe. */
int epic_plan_cli_size(const char *cmd, const char *flag, const char *val, uint64_t *out);

#endif
