/* `epic generate` subcommand. argv[0] is "generate". Returns the exit code. */
#ifndef EPIC_CMD_GENERATE_H
#define EPIC_CMD_GENERATE_H

int epic_cmd_generate(int argc, char **argv);

#endif
