/* The in-process engine backend of the HTTP front (coordinator/http.h):
 * prompts are rendered and tokenized here (connection thread), tokens are
 * detokenized and stop strings matched in the engine's callbacks (engine
 * thread), exactly as the gRPC server does, so both fronts give the same text. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "coordinator/engine.h"
#include "coordinator/gateway_impl.h"
#include "coordinator/http.h"
#include "coordinator/reasoning.h"
#include "coordinator/tokenizer/chat.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "worker/config.h"

typedef struct eb {
  epic_http_engine_params p;
  char *comm_name;
  int64_t vocab, n_experts;
} eb;

/* One generation. The engine thread owns detok/stopper/scratch until finish. */
typedef struct eg {
  eb *b;
  epic_http_sink *sink;
  uint64_t id;
  int32_t *prompt;
  int64_t n_prompt;
  int logprobs, top;
  epic_detok *detok;
  char **stop_copies; /* the front bounds their number (--max-stop-strings) */
  size_t *stop_lens;
  epic_gw_stops stops;
  epic_gw_stopper stopper;
  epic_gw_buf scratch;
} eg;

static void eg_free(eg *g) {
  if (!g)
    return;
  free(g->prompt);
  epic_detok_destroy(g->detok);
  epic_gw_stopper_free(&g->stopper);
  epic_gw_buf_free(&g->scratch);
  for (int i = 0; i < g->stops.n; i++)
    free(g->stop_copies[i]);
  free(g->stop_copies);
  free(g->stop_lens);
  free(g);
}

static int on_token_top(void *user, const epic_engine_token *t) {
  eg *g = user;
  int ret = 0;
  g->scratch.n = 0;
  if (g->detok) {
    char *text = NULL;
    size_t n = 0;
    if (epic_detok_push(g->detok, t->id, &text, &n) == EPIC_OK) {
      if (epic_gw_stopper_push(&g->stopper, text, n, &g->scratch) != EPIC_OK)
        ret = -1;
      epic_tokenizer_text_free(text);
    }
    if (ret == 0 && g->stopper.matched >= 0)
      ret = 1;
  }
  epic_http_token tk = {.id = t->id, .logprob = t->logprob, .n_top = t->n_top};
  for (int j = 0; j < t->n_top && j < 20; j++) {
    tk.top_ids[j] = t->top_ids[j];
    tk.top_lps[j] = t->top_logprobs[j];
  }
  if (epic_http_sink_output(g->sink, g->scratch.p, g->scratch.n, &tk, g->logprobs ? 1 : 0) !=
      EPIC_OK)
    ret = -1;
  return ret;
}

static void on_finish(void *user, const epic_engine_result *r) {
  eg *g = user;
  g->scratch.n = 0;
  if (g->detok && g->stopper.matched < 0) {
    char *text = NULL;
    size_t n = 0;
    if (epic_detok_flush(g->detok, &text, &n) == EPIC_OK) {
      if (epic_gw_stopper_push(&g->stopper, text, n, &g->scratch) == EPIC_OK)
        epic_gw_stopper_finish(&g->stopper, &g->scratch);
      epic_tokenizer_text_free(text);
    }
  }
  if (g->scratch.n)
    epic_http_sink_output(g->sink, g->scratch.p, g->scratch.n, NULL, 0);
  int fin = EPIC_HTTP_FINISH_STOP, status = 0;
  const char *msg = NULL;
  char buf[200];
  switch (r->finish) {
  case EPIC_ENGINE_FINISH_LENGTH: fin = EPIC_HTTP_FINISH_LENGTH; break;
  case EPIC_ENGINE_FINISH_STOP: break;
  case EPIC_ENGINE_FINISH_CANCELLED:
    fin = EPIC_HTTP_FINISH_ERROR;
    status = 503;
    msg = "request cancelled (client gone or server shutting down)";
    break;
  default:
    fin = EPIC_HTTP_FINISH_ERROR;
    status = r->status == EPIC_ERR_COMM || r->status == EPIC_ERR_TIMEOUT ? 503 : 500;
    snprintf(buf, sizeof buf, "engine step failed: %s", epic_status_str(r->status));
    msg = buf;
  }
  /* The last touch of g: the front may release it as soon as this returns. */
  epic_http_sink_finish(g->sink, fin, r->prompt_tokens, r->completion_tokens, status, msg);
}

#define FAIL(code, field, ...)                                                                     \
  do {                                                                                             \
    snprintf(err, err_len, __VA_ARGS__);                                                           \
    snprintf(param, param_len, "%s", field);                                                       \
    rc = code;                                                                                     \
    goto fail;                                                                                     \
  } while (0)

static int eb_start(void *be, const epic_http_gen *q, epic_http_sink *sink, void **handle,
                    int *reasoning_open, char *err, size_t err_len, char *param, size_t param_len) {
  eb *b = be;
  const epic_tokenizer *tok = b->p.tokenizer;
  int rc = 0;
  eg *g = calloc(1, sizeof *g);
  *handle = NULL;
  *reasoning_open = 0;
  if (!g)
    FAIL(500, "", "out of memory");
  g->b = b;
  g->sink = sink;
  g->logprobs = q->logprobs;
  g->top = q->top_logprobs;
  const char *pfield = q->messages ? "messages" : "prompt";
  if (q->top_logprobs > b->p.top_logprobs)
    FAIL(400, q->messages ? "top_logprobs" : "logprobs",
         "%s: %d alternatives per token exceed this server's limit of %d",
         q->messages ? "top_logprobs" : "logprobs", q->top_logprobs, b->p.top_logprobs);
  if ((q->messages || q->prompt_text) && !tok)
    FAIL(400, pfield, "%s: this server has no tokenizer (tokenizer.json): send token ids", pfield);
  if (q->messages) {
    epic_chat_messages *msgs = NULL;
    epic_chat_template t = EPIC_CHAT_AUTO;
    if (epic_chat_template_parse(q->chat_template, &t) != EPIC_OK)
      FAIL(400, "epic_chat_template", "epic_chat_template: unknown template");
    if (epic_chat_messages_from_json(q->messages, &msgs) != EPIC_OK)
      FAIL(400, "messages", "messages: not a valid conversation (see the server log)");
    char *text = NULL;
    size_t len = 0, n = 0;
    int32_t *ids = NULL;
    epic_status st = epic_chat_encode(tok, t, epic_chat_messages_items(msgs),
                                      epic_chat_messages_count(msgs), 1, &ids, &n, &text, &len);
    epic_chat_messages_free(msgs);
    if (st != EPIC_OK) {
      epic_tokenizer_text_free(text);
      epic_tokenizer_ids_free(ids);
      FAIL(st == EPIC_ERR_NOMEM ? 500 : 400, "messages",
           "messages: cannot render the chat template (see the server log)");
    }
    *reasoning_open = epic_reasoning_prompt_opens(text, len);
    epic_tokenizer_text_free(text);
    g->prompt = malloc((n ? n : 1) * sizeof *g->prompt);
    if (g->prompt)
      memcpy(g->prompt, ids, n * sizeof *ids);
    epic_tokenizer_ids_free(ids);
    g->n_prompt = (int64_t)n;
  } else if (q->prompt_text) {
    int32_t *ids = NULL;
    size_t n = 0;
    const int bos = epic_tokenizer_bos_id(tok) >= 0;
    if (epic_tokenizer_encode(tok, q->prompt_text, q->prompt_len, bos, &ids, &n) != EPIC_OK)
      FAIL(400, "prompt", "prompt: cannot be tokenized");
    g->prompt = malloc((n ? n : 1) * sizeof *g->prompt);
    if (g->prompt)
      memcpy(g->prompt, ids, n * sizeof *ids);
    epic_tokenizer_ids_free(ids);
    g->n_prompt = (int64_t)n;
  } else {
    g->prompt = malloc((size_t)q->n_prompt_ids * sizeof *g->prompt);
    if (g->prompt)
      memcpy(g->prompt, q->prompt_ids, (size_t)q->n_prompt_ids * sizeof *g->prompt);
    g->n_prompt = q->n_prompt_ids;
    for (int64_t i = 0; i < q->n_prompt_ids; i++)
      if (q->prompt_ids[i] >= b->vocab)
        FAIL(400, "prompt", "prompt[%lld]: token id %d is outside the vocabulary (%lld)",
             (long long)i, (int)q->prompt_ids[i], (long long)b->vocab);
  }
  if (!g->prompt)
    FAIL(500, "", "out of memory");
  if (g->n_prompt < 1)
    FAIL(400, pfield, "%s: encodes to no tokens", pfield);
  if (b->p.max_prompt_tokens > 0 && g->n_prompt > b->p.max_prompt_tokens)
    FAIL(400, pfield, "%s: %lld tokens exceed --max-prompt-tokens %lld", pfield,
         (long long)g->n_prompt, (long long)b->p.max_prompt_tokens);
  if (g->n_prompt >= b->p.max_context)
    FAIL(400, pfield, "%s: %lld tokens leave no room in the context of %lld tokens", pfield,
         (long long)g->n_prompt, (long long)b->p.max_context);
  int64_t max_new = q->max_tokens;
  if (max_new <= 0) {
    max_new = b->p.default_max_tokens;
    if (max_new > b->p.max_context - g->n_prompt)
      max_new = b->p.max_context - g->n_prompt;
    if (b->p.max_tokens_limit > 0 && max_new > b->p.max_tokens_limit)
      max_new = b->p.max_tokens_limit; /* as gRPC: the limit caps the default too */
  } else if (max_new > b->p.max_context - g->n_prompt) {
    FAIL(400, "max_tokens",
         "max_tokens: %lld + %lld prompt tokens exceed the context of %lld tokens",
         (long long)max_new, (long long)g->n_prompt, (long long)b->p.max_context);
  }
  if (b->p.kv_tokens > 0 && b->p.page_size > 0) {
    const int64_t need =
        (g->n_prompt + max_new + b->p.page_size - 1) / b->p.page_size * b->p.page_size;
    if (need > b->p.kv_tokens)
      FAIL(400, "max_tokens",
           "max_tokens: %lld prompt + %lld new tokens need %lld KV cache rows; a worker has %lld",
           (long long)g->n_prompt, (long long)max_new, (long long)need, (long long)b->p.kv_tokens);
  }
  if (q->n_stops > 0) {
    g->stop_copies = calloc((size_t)q->n_stops, sizeof *g->stop_copies);
    g->stop_lens = calloc((size_t)q->n_stops, sizeof *g->stop_lens);
    if (!g->stop_copies || !g->stop_lens)
      FAIL(500, "", "out of memory");
  }
  for (int i = 0; i < q->n_stops; i++) {
    g->stop_copies[i] = malloc(q->stop_lens[i] + 1);
    if (!g->stop_copies[i])
      FAIL(500, "", "out of memory");
    memcpy(g->stop_copies[i], q->stops[i], q->stop_lens[i] + 1);
    g->stop_lens[i] = q->stop_lens[i];
    g->stops.n = i + 1;
  }
  g->stops.s = g->stop_copies;
  g->stops.len = g->stop_lens;
  epic_gw_stopper_init(&g->stopper, &g->stops);
  if (tok && epic_detok_create(tok, EPIC_DECODE_GENERATED, &g->detok) != EPIC_OK)
    FAIL(500, "", "cannot create the detokenizer");
  epic_engine_request er = {.size = sizeof er,
                            .prompt = g->prompt,
                            .n_prompt = g->n_prompt,
                            .max_new_tokens = max_new,
                            .sampling = {.size = sizeof(epic_sampling_params),
                                         .temperature = q->temperature,
                                         .top_p = q->top_p,
                                         .seed = q->seed},
                            .ignore_eos = q->ignore_eos,
                            .on_token_top = on_token_top,
                            .top_logprobs = q->top_logprobs,
                            .on_finish = on_finish,
                            .user = g};
  epic_status st = epic_engine_submit(b->p.engine, &er, &g->id);
  if (st == EPIC_ERR_BUSY)
    FAIL(429, "", "server busy: the request queue is full; retry later");
  if (st == EPIC_ERR_CANCELLED)
    FAIL(503, "", "server is shutting down: not accepting new requests");
  if (st != EPIC_OK)
    FAIL(st == EPIC_ERR_INVALID ? 400 : 500, "",
         "request rejected by the engine (see the server log)");
  *handle = g;
  return 0;
fail:
  eg_free(g);
  return rc;
}

static void eb_cancel(void *be, void *handle) {
  eb *b = be;
  eg *g = handle;
  epic_engine_cancel(b->p.engine, g->id);
}

static void eb_release(void *be, void *handle) {
  (void)be;
  eg_free(handle);
}

static const char *eb_token_bytes(void *be, int32_t id, size_t *len) {
  eb *b = be;
  return b->p.tokenizer ? epic_tokenizer_token_bytes(b->p.tokenizer, id, len) : NULL;
}

static void eb_metrics(void *be, epic_metrics_snapshot *s) {
  eb *b = be;
  epic_engine_stats es;
  epic_engine_get_stats(b->p.engine, &es);
  s->requests_running = es.running;
  s->requests_waiting = es.queued;
  s->prompt_tokens_total = es.prompt_tokens;
  s->generation_tokens_total = es.generated_tokens;
  s->requests_finished_total = es.finished;
  s->requests_cancelled_total = es.cancelled;
  s->ttft = es.ttft;
  s->tpot = es.tpot;
  s->e2e = es.e2e;
  s->has_engine = 1;
  s->kv_pages_used = es.kv_pages_used;
  s->kv_pages_total = es.kv_pages_total;
  s->has_prefix_cache = es.prefix_cache_pages > 0;
  s->prefix_hit_tokens_total = es.prefix_hit_tokens;
  s->prefix_cached_pages = es.prefix_cached_pages;
  s->steps_total = es.steps;
  s->graph_captures_total = es.graph_captures;
  s->graph_replays_total = es.graph_replays;
  s->has_mtp = es.mtp_draft > 0;
  s->mtp_draft_tokens_total = es.mtp_drafted;
  s->mtp_accepted_tokens_total = es.mtp_accepted;
  s->has_eplb = es.eplb_rounds > 0;
  s->eplb_rebalances_total = es.eplb_rebalances;
  s->eplb_imbalance = es.eplb_imbalance;
  s->has_a2a = 1;
  s->a2a_backend = b->comm_name ? b->comm_name : "none";
  s->a2a_dispatch_bytes = es.a2a_dispatch_bytes;
  s->a2a_combine_bytes = es.a2a_combine_bytes;
  s->a2a_calls = es.a2a_calls;
  s->a2a_dispatch_seconds = es.a2a_dispatch_wait_s;
  s->a2a_combine_seconds = es.a2a_combine_wait_s;
  if (b->n_experts > 0) {
    s->expert_tokens = calloc((size_t)b->n_experts, sizeof *s->expert_tokens);
    if (s->expert_tokens &&
        epic_engine_expert_tokens(b->p.engine, s->expert_tokens, b->n_experts) == EPIC_OK) {
      s->n_experts = b->n_experts;
    } else {
      free(s->expert_tokens);
      s->expert_tokens = NULL;
    }
  }
}

const epic_http_backend_ops epic_http_engine_ops = {.abi_version = EPIC_HTTP_BACKEND_ABI,
                                                    .name = "engine",
                                                    .start = eb_start,
                                                    .cancel = eb_cancel,
                                                    .release = eb_release,
                                                    .token_bytes = eb_token_bytes,
                                                    .metrics = eb_metrics,
                                                    .ready = NULL,
                                                    .max_top_logprobs =
                                                        EPIC_ENGINE_MAX_TOP_LOGPROBS};

epic_status epic_http_engine_backend_create(const epic_http_engine_params *p, void **out) {
  *out = NULL;
  if (!p || p->size != sizeof *p || !p->engine || !p->config || p->max_context <= 0) {
    EPIC_LOG_ERROR("http: epic_http_engine_params: size, engine, config and max_context are "
                   "required");
    return EPIC_ERR_INVALID;
  }
  eb *b = calloc(1, sizeof *b);
  if (!b)
    return EPIC_ERR_NOMEM;
  b->p = *p;
  if (b->p.default_max_tokens <= 0)
    b->p.default_max_tokens = 128;
  b->vocab = p->config->vocab_size;
  b->n_experts = p->config->n_routed_experts;
  b->comm_name = p->comm_name ? strdup(p->comm_name) : NULL;
  *out = b;
  return EPIC_OK;
}

void epic_http_engine_backend_destroy(void *be) {
  eb *b = be;
  if (!b)
    return;
  free(b->comm_name);
  free(b);
}
