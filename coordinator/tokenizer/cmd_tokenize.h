/* `epic tokenize` and `epic detokenize` subcommands.
 * argv[0] is the subcommand name; both return a process exit code (0 success,
 * 1 runtime error, 2 usage error) and print results on stdout, errors on stderr.
 * They use getopt_long (process-global state): call from the main thread only. */
#ifndef EPIC_CMD_TOKENIZE_H
#define EPIC_CMD_TOKENIZE_H

/* epic tokenize --model DIR --text TEXT [--add-bos] [--chat [--system S] [--template auto|v3|r1]] [--json]
 * Prints the ids comma-separated, or as a JSON array with --json. */
int epic_cmd_tokenize(int argc, char **argv);
/* epic detokenize --model DIR --ids 1,2,3 [--skip-special]
 * Prints the decoded text followed by a newline. */
int epic_cmd_detokenize(int argc, char **argv);

#endif
