/* `epic gateway` subcommand: a gRPC router in front of several `epic serve`
 * clusters (coordinator/gateway.h). argv[0] is "gateway". Returns the exit code
 * (0 after a SIGTERM drain). */
#ifndef EPIC_CMD_GATEWAY_H
#define EPIC_CMD_GATEWAY_H

int epic_cmd_gateway(int argc, char **argv);

#endif
