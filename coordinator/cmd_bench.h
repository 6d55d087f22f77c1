/* `epic bench` subcommand. argv[0] is "bench". Returns the exit code. */
#ifndef EPIC_CMD_BENCH_H
#define EPIC_CMD_BENCH_H

int epic_cmd_bench(int argc, char **argv);

#endif
