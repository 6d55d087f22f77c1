/* Request limits of the HTTP front (coordinator/http_limits.h). */
#include "coordinator/http_limits.h"

#include <stdio.h>
#include <string.h>

#include "coordinator/gateway_impl.h"

#define REFUSE(field, ...)                                                                         \
  do {                                                                                             \
    epic_oai_error_set(err, 400, "invalid_request_error", field, NULL, __VA_ARGS__);               \
    return EPIC_ERR_INVALID;                                                                       \
  } while (0)

epic_status epic_http_check_limits(const epic_oai_request *rq, const epic_gw_request_limits *lim,
                                   int full, epic_oai_error *err) {
  epic_gw_limits gl;
  memset(&gl, 0, sizeof gl);
  if (lim)
    gl.req = *lim;
  /* Completions' logprobs is the count of alternatives, chat's top_logprobs. */
  const char *lp_field = rq->chat ? "top_logprobs" : "logprobs";
  char msg[EPIC_GW_ERR_LEN];
  /* The gateway has no --max-top-logprobs: its backend bounds top_logprobs. */
  if (epic_gw_check_choices(rq->n, "n", full ? rq->top_logprobs : 0, lp_field, &gl, msg) != EPIC_OK)
    REFUSE(strncmp(msg, "n:", 2) == 0 ? "n" : lp_field, "%s", msg);
  if (!full)
    return EPIC_OK;
  const epic_gw_request_limits rl = epic_gw_limits_effective(&gl.req);
  if (rq->n_stops > rl.max_stop_strings)
    REFUSE("stop", "stop: %d stop strings exceed --max-stop-strings %lld", rq->n_stops,
           (long long)rl.max_stop_strings);
  for (int i = 0; i < rq->n_stops; i++)
    if ((int64_t)rq->stop_lens[i] > rl.max_stop_len) {
      char f[32];
      snprintf(f, sizeof f, "stop[%d]", i);
      REFUSE(f, "%s: %zu bytes exceed --max-stop-len %lld", f, rq->stop_lens[i],
             (long long)rl.max_stop_len);
    }
  if (rl.max_tokens > 0 && rq->max_tokens > rl.max_tokens)
    REFUSE("max_tokens", "max_tokens: %lld exceeds --max-tokens-limit %lld",
           (long long)rq->max_tokens, (long long)rl.max_tokens);
  if (rl.max_prompt_tokens > 0 && rq->n_prompt_ids > rl.max_prompt_tokens)
    REFUSE("prompt", "prompt: %lld tokens exceed --max-prompt-tokens %lld",
           (long long)rq->n_prompt_ids, (long long)rl.max_prompt_tokens);
  return EPIC_OK;
}
