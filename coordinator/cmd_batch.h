/* `epic batch` subcommand: an OpenAI batch file (JSONL) through the engine,
 * results appended to an output JSONL that a rerun resumes (coordinator/batch.h
 * has the formats). argv[0] is "batch". Returns the exit code: 0 when every
 * input line has a record, 1 on errors, 2 on bad usage, 128 + signal when
 * interrupted by SIGINT/SIGTERM (rerun the same command to resume). */
#ifndef EPIC_CMD_BATCH_H
#define EPIC_CMD_BATCH_H

int epic_cmd_batch(int argc, char **argv);

#endif
