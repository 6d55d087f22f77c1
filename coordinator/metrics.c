/* Prometheus text exposition of an epic_metrics_snapshot (coordinator/metrics.h). */
#include "coordinator/metrics.h"

#include "common/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static epic_status put(epic_metrics_buf *b, const char *fmt, ...) {
  for (;;) {
    va_list ap;
    size_t room = b->cap - b->n;
    va_start(ap, fmt);
    int w = b->p ? vsnprintf(b->p + b->n, room, fmt, ap) : -2;
    va_end(ap);
    if (w >= 0 && (size_t)w < room) {
      b->n += (size_t)w;
      return EPIC_OK;
    }
    if (w == -1)
      return EPIC_ERR_INVALID;
    size_t cap = b->cap ? 2 * b->cap : 4096;
    while (w > 0 && cap - b->n <= (size_t)w)
      cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p)
      return EPIC_ERR_NOMEM;
    b->p = p;
    b->cap = cap;
  }
}

static epic_status family(epic_metrics_buf *b, const char *name, const char *type,
                          const char *help) {
  EPIC_CHECK(put(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type));
  return EPIC_OK;
}

static epic_status one_i(epic_metrics_buf *b, const char *name, const char *type, const char *help,
                         int64_t v) {
  EPIC_CHECK(family(b, name, type, help));
  EPIC_CHECK(put(b, "%s %lld\n", name, (long long)v));
  return EPIC_OK;
}

static epic_status hist(epic_metrics_buf *b, const char *name, const char *help,
                        const epic_hist *h) {
  int64_t cum = 0;
  EPIC_CHECK(family(b, name, "histogram", help));
  for (int i = 0; i < EPIC_HIST_BOUNDS; i++) {
    cum += h->bucket[i];
    EPIC_CHECK(put(b, "%s_bucket{le=\"%g\"} %lld\n", name, epic_hist_bound(i), (long long)cum));
  }
  cum += h->bucket[EPIC_HIST_BOUNDS];
  EPIC_CHECK(put(b, "%s_bucket{le=\"+Inf\"} %lld\n", name, (long long)cum));
  EPIC_CHECK(put(b, "%s_sum %.9g\n%s_count %lld\n", name, h->sum, name, (long long)h->count));
  return EPIC_OK;
}

/* Label values: backslash, quote and newline escaped. */
static epic_status label(epic_metrics_buf *b, const char *v) {
  for (const char *c = v; *c; c++) {
    if (*c == '\\' || *c == '"')
      EPIC_CHECK(put(b, "\\%c", *c));
    else if (*c == '\n')
      EPIC_CHECK(put(b, "\\n"));
    else
      EPIC_CHECK(put(b, "%c", *c));
  }
  return EPIC_OK;
}

epic_status epic_metrics_render(const epic_metrics_snapshot *s, epic_metrics_buf *b) {
  static const char *eps[EPIC_METRICS_EP_COUNT] = {"/v1/chat/completions", "/v1/completions",
                                                   "/v1/models", "/health", "/metrics", "other"};
  static const char *codes[EPIC_METRICS_CODE_COUNT] = {"2xx", "4xx", "5xx"};
  EPIC_CHECK(family(b, "epic_process_start_time_seconds", "gauge",
                    "Start time of the process since the Unix epoch in seconds."));
  EPIC_CHECK(put(b, "epic_process_start_time_seconds %.3f\n", s->process_start_time));
  if (s->model_name) {
    EPIC_CHECK(family(b, "epic_model_info", "gauge", "The served model (value is always 1)."));
    EPIC_CHECK(put(b, "epic_model_info{model=\""));
    EPIC_CHECK(label(b, s->model_name));
    EPIC_CHECK(put(b, "\"} 1\n"));
  }
  EPIC_CHECK(one_i(b, "epic_requests_running", "gauge",
                   "Requests generating now (holding a batch slot).", s->requests_running));
  EPIC_CHECK(one_i(b, "epic_requests_waiting", "gauge", "Requests queued for admission.",
                   s->requests_waiting));
  EPIC_CHECK(one_i(b, "epic_prompt_tokens_total", "counter", "Prompt tokens processed.",
                   s->prompt_tokens_total));
  EPIC_CHECK(one_i(b, "epic_generation_tokens_total", "counter", "Tokens generated.",
                   s->generation_tokens_total));
  EPIC_CHECK(one_i(b, "epic_requests_finished_total", "counter",
                   "Requests that ended other than by cancellation.", s->requests_finished_total));
  EPIC_CHECK(one_i(b, "epic_requests_cancelled_total", "counter", "Requests cancelled.",
                   s->requests_cancelled_total));
  EPIC_CHECK(hist(b, "epic_time_to_first_token_seconds",
                  "Request received to first generated token.", &s->ttft));
  EPIC_CHECK(hist(b, "epic_time_per_output_token_seconds",
                  "Seconds per generated token after the first, per request.", &s->tpot));
  EPIC_CHECK(hist(b, "epic_e2e_request_latency_seconds", "Request received to finished.",
                  &s->e2e));
  if (s->has_engine) {
    EPIC_CHECK(one_i(b, "epic_kv_cache_pages_used", "gauge", "KV cache pages in use (all workers).",
                     s->kv_pages_used));
    EPIC_CHECK(one_i(b, "epic_kv_cache_pages_total", "gauge", "KV cache pages (all workers).",
                     s->kv_pages_total));
    EPIC_CHECK(family(b, "epic_kv_cache_usage_ratio", "gauge",
                      "Fraction of the KV cache in use (0 to 1)."));
    EPIC_CHECK(put(b, "epic_kv_cache_usage_ratio %.6f\n",
                   s->kv_pages_total > 0 ? (double)s->kv_pages_used / (double)s->kv_pages_total
                                         : 0.0));
    EPIC_CHECK(one_i(b, "epic_engine_steps_total", "counter", "Forward steps run.",
                     s->steps_total));
    EPIC_CHECK(one_i(b, "epic_step_graph_captures_total", "counter",
                     "Decode steps recorded as CUDA graphs (summed over ranks).",
                     s->graph_captures_total));
    EPIC_CHECK(one_i(b, "epic_step_graph_replays_total", "counter",
                     "Steps run by replaying a recorded graph (summed over ranks).",
                     s->graph_replays_total));
  }
  if (s->has_prefix_cache) {
    EPIC_CHECK(one_i(b, "epic_prefix_cache_hit_tokens_total", "counter",
                     "Prompt tokens reused from the prefix cache instead of computed.",
                     s->prefix_hit_tokens_total));
    EPIC_CHECK(one_i(b, "epic_prefix_cache_pages", "gauge",
                     "KV pages holding cached prompt prefixes no sequence uses now (all workers).",
                     s->prefix_cached_pages));
  }
  if (s->has_mtp) {
    EPIC_CHECK(one_i(b, "epic_mtp_draft_tokens_total", "counter",
                     "MTP draft tokens verified by the main model.", s->mtp_draft_tokens_total));
    EPIC_CHECK(one_i(b, "epic_mtp_accepted_tokens_total", "counter",
                     "MTP draft tokens accepted (each one a forward step saved).",
                     s->mtp_accepted_tokens_total));
  }
  if (s->has_eplb) {
    EPIC_CHECK(one_i(b, "epic_eplb_rebalances_total", "counter",
                     "Expert placements applied by the load balancer.", s->eplb_rebalances_total));
    EPIC_CHECK(family(b, "epic_eplb_imbalance", "gauge",
                      "Max over mean rank load of the expert placement in force (1 = balanced)."));
    EPIC_CHECK(put(b, "epic_eplb_imbalance %.6f\n", s->eplb_imbalance));
  }
  if (s->has_a2a) {
    const char *be = s->a2a_backend ? s->a2a_backend : "none";
    EPIC_CHECK(family(b, "epic_a2a_bytes_total", "counter",
                      "Bytes sent in MoE all-to-alls, summed over ranks."));
    EPIC_CHECK(put(b, "epic_a2a_bytes_total{backend=\"%s\",phase=\"dispatch\"} %lld\n", be,
                   (long long)s->a2a_dispatch_bytes));
    EPIC_CHECK(put(b, "epic_a2a_bytes_total{backend=\"%s\",phase=\"combine\"} %lld\n", be,
                   (long long)s->a2a_combine_bytes));
    EPIC_CHECK(family(b, "epic_a2a_wait_seconds_total", "counter",
                      "Seconds ranks sat blocked on MoE all-to-alls, summed over ranks."));
    EPIC_CHECK(put(b, "epic_a2a_wait_seconds_total{backend=\"%s\",phase=\"dispatch\"} %.9g\n", be,
                   s->a2a_dispatch_seconds));
    EPIC_CHECK(put(b, "epic_a2a_wait_seconds_total{backend=\"%s\",phase=\"combine\"} %.9g\n", be,
                   s->a2a_combine_seconds));
    EPIC_CHECK(family(b, "epic_a2a_calls_total", "counter", "MoE all-to-all operations."));
    EPIC_CHECK(put(b, "epic_a2a_calls_total{backend=\"%s\"} %lld\n", be, (long long)s->a2a_calls));
  }
  if (s->has_engine) {
    EPIC_CHECK(family(b, "epic_expert_tokens_total", "counter",
                      "Tokens routed to each routed expert, summed over MoE layers and ranks."));
    for (int64_t i = 0; s->expert_tokens && i < s->n_experts; i++)
      EPIC_CHECK(put(b, "epic_expert_tokens_total{expert=\"%lld\"} %lld\n", (long long)i,
                     (long long)s->expert_tokens[i]));
  }
  EPIC_CHECK(family(b, "epic_http_requests_total", "counter",
                    "HTTP requests answered, by endpoint and status class."));
  for (int e = 0; e < EPIC_METRICS_EP_COUNT; e++)
    for (int c = 0; c < EPIC_METRICS_CODE_COUNT; c++)
      EPIC_CHECK(put(b, "epic_http_requests_total{endpoint=\"%s\",code=\"%s\"} %lld\n", eps[e],
                     codes[c], (long long)s->http_requests[e][c]));
  EPIC_CHECK(one_i(b, "epic_http_streams_active", "gauge",
                   "HTTP generation requests being answered now.", s->http_streams_active));
  return EPIC_OK;
}

void epic_metrics_buf_free(epic_metrics_buf *b) {
  free(b->p);
  b->p = NULL;
  b->n = b->cap = 0;
}
