/* epic_http_limits: the request limits of the HTTP/OpenAI front (issue #12),
 * the same flags as gRPC (coordinator/cli_security.h), checked on a parsed
 * OpenAI request (coordinator/openai.h).
 *
 * `full` (epic serve, which runs the model): every limit a request shows
 * before tokenization: n (--max-n), top_logprobs / completions logprobs
 * (--max-top-logprobs), the stop strings' count and length
 * (--max-stop-strings, --max-stop-len), max_tokens (--max-tokens-limit) and a
 * token-id prompt's length (--max-prompt-tokens); the engine backend checks a
 * text / chat prompt's tokens after encoding it. Not full (epic gateway):
 * only n, which the gateway's HTTP front itself turns into gRPC calls (its
 * backend bounds top_logprobs: the gRPC API carries no alternatives); the
 * upstream `epic serve` applies the rest with its own flags and its refusal
 * comes back as the same 400.
 *
 * A refusal is a 400 whose param is the request field and whose message names
 * the field and the flag ("n: 3 exceeds --max-n 2").
 *
 * Thread contract: a pure function. Borrows everything. */
#ifndef EPIC_COORDINATOR_HTTP_LIMITS_H
#define EPIC_COORDINATOR_HTTP_LIMITS_H

#include "common/status.h"
#include "coordinator/gateway.h"
#include "coordinator/openai.h"

/* EPIC_OK, or EPIC_ERR_INVALID with err set (HTTP 400). lim: 0 fields take
 * their defaults (epic_gw_limits_effective). */
epic_status epic_http_check_limits(const epic_oai_request *rq, const epic_gw_request_limits *lim,
                                   int full, epic_oai_error *err);

#endif
