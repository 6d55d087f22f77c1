/* `epic serve` subcommand: serve a model over gRPC (coordinator/gateway.h).
 * argv[0] is "serve". Returns the exit code (0 after a SIGTERM drain). */
#ifndef EPIC_CMD_SERVE_H
#define EPIC_CMD_SERVE_H

int epic_cmd_serve(int argc, char **argv);

#endif
