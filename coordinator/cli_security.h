/* Command-line options of the front doors' security (issue #12), shared by
 * `epic serve` and `epic gateway`, for their gRPC listener and their HTTP
 * front (--http, coordinator/http.h) alike:
 * TLS and mutual TLS, the plaintext policy, API keys, per-key rate limits,
 * the request limits of `serve`, and the gateway's TLS towards its upstreams.
 *
 *   epic_cli_security sec;
 *   if (epic_cli_security_take("serve", EPIC_CLI_SEC_SERVE, &argc, argv, &sec)) exit 2;
 *   ... the command parses what is left of argv ...
 *   if (epic_cli_security_open(&sec, listen)) exit 2;   (before any long load)
 *   params.security = &sec.gw; params.limits = sec.limits;
 *   ...
 *   epic_cli_security_close(&sec);
 *
 * take removes its options ("--flag VALUE" and "--flag=VALUE", up to a "--")
 * from argv so that the command's getopt never sees them. Errors are printed
 * as "epic <cmd>: <flag>: ..." on stderr. Thread-compatible; sec owns the
 * epic_auth it opens (close destroys it); argv strings are borrowed. */
#ifndef EPIC_CLI_SECURITY_H
#define EPIC_CLI_SECURITY_H

#include <stdio.h>

#include "coordinator/auth.h"
#include "coordinator/gateway.h"

enum {
  EPIC_CLI_SEC_SERVE = 1,   /* a server that validates requests: limits too */
  EPIC_CLI_SEC_GATEWAY = 2, /* the router: upstream TLS too */
};

typedef struct epic_cli_security {
  int mode;
  epic_gw_security gw;           /* for epic_gw_*_params.security */
  epic_gw_request_limits limits; /* for epic_gw_server_params.limits (serve) */
  epic_auth_params auth;         /* keys file and rate limits (opened into gw.auth) */
} epic_cli_security;

/* Zeroes o, then takes the options of `mode` out of argv. 0, or -1 after a message. */
int epic_cli_security_take(const char *cmd, int mode, int *argc, char **argv, epic_cli_security *o);
/* Checks the combination, the PEM files (certificate and key match, CA
 * parses) and the plaintext policy for `listen`, and loads the keys file.
 * 0, or -1 after a message. */
int epic_cli_security_open(const char *cmd, epic_cli_security *o, const char *listen);
void epic_cli_security_close(epic_cli_security *o);
/* The options' help lines of `mode`. */
void epic_cli_security_help(FILE *f, int mode);
/* One start-up line: TLS, keys (their number, never a key) and limits. */
void epic_cli_security_print(FILE *f, const char *cmd, const epic_cli_security *o);

#endif
