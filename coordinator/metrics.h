/* epic_metrics: what `GET /metrics` shows, in the Prometheus text exposition
 * format (version 0.0.4), plus the latency histogram type that the engine and
 * the HTTP front fill.
 *
 * A snapshot is a plain struct filled by whoever knows the numbers (the
 * in-process engine for `epic serve`, the HTTP front's own accounting for
 * `epic gateway`); fields marked "has_*" say whether a family is known, so
 * that a gateway without an engine does not print engine gauges as zero.
 * Every metric name starts with "epic_".
 *
 * Thread contract: epic_hist is plain data (the owner serialises updates);
 * epic_metrics_render is pure. Ownership: render appends to a caller-owned
 * growable buffer (free with epic_metrics_buf_free). */
#ifndef EPIC_COORDINATOR_METRICS_H
#define EPIC_COORDINATOR_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"

/* Latency histogram with fixed bounds (seconds): per-bucket (non-cumulative)
 * counts, the last bucket is +Inf. */
#define EPIC_HIST_BOUNDS 16
typedef struct epic_hist {
  int64_t bucket[EPIC_HIST_BOUNDS + 1];
  int64_t count;
  double sum;
} epic_hist;

/* Upper bound of bucket i (i < EPIC_HIST_BOUNDS). */
static inline double epic_hist_bound(int i) {
  static const double b[EPIC_HIST_BOUNDS] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                             0.1,   0.25,   0.5,   1,    2.5,   5,
                                             10,    30,     60,    300};
  return b[i];
}

static inline void epic_hist_observe(epic_hist *h, double v) {
  int i = 0;
  while (i < EPIC_HIST_BOUNDS && !(v <= epic_hist_bound(i)))
    i++;
  h->bucket[i]++;
  h->count++;
  h->sum += v;
}

static inline void epic_hist_add(epic_hist *into, const epic_hist *h) {
  for (int i = 0; i <= EPIC_HIST_BOUNDS; i++)
    into->bucket[i] += h->bucket[i];
  into->count += h->count;
  into->sum += h->sum;
}

/* HTTP request outcomes counted by the front, by endpoint and status class. */
enum {
  EPIC_METRICS_EP_CHAT,
  EPIC_METRICS_EP_COMPLETIONS,
  EPIC_METRICS_EP_MODELS,
  EPIC_METRICS_EP_HEALTH,
  EPIC_METRICS_EP_METRICS,
  EPIC_METRICS_EP_OTHER,
  EPIC_METRICS_EP_COUNT
};
enum { EPIC_METRICS_CODE_2XX, EPIC_METRICS_CODE_4XX, EPIC_METRICS_CODE_5XX, EPIC_METRICS_CODE_COUNT };

typedef struct epic_metrics_snapshot {
  const char *model_name;   /* label of the epic_model_info gauge; NULL = omitted */
  double process_start_time; /* seconds since the Unix epoch */
  /* Requests and tokens (the engine's counts in serve: gRPC and HTTP alike). */
  int64_t requests_running, requests_waiting;
  int64_t prompt_tokens_total, generation_tokens_total;
  int64_t requests_finished_total, requests_cancelled_total;
  epic_hist ttft, tpot, e2e;
  /* Engine-only families. */
  int has_engine;
  int64_t kv_pages_used, kv_pages_total, steps_total;
  int64_t graph_captures_total, graph_replays_total; /* decode-step graphs (engine stats) */
  /* Prefix cache (engine stats): prompt tokens taken from cached pages so far,
   * idle cached pages now (all workers). Omitted unless has_prefix_cache. */
  int has_prefix_cache;
  int64_t prefix_hit_tokens_total, prefix_cached_pages;
  /* MTP speculative decoding (engine stats): draft tokens verified and accepted.
   * Omitted unless has_mtp. */
  int has_mtp;
  int64_t mtp_draft_tokens_total, mtp_accepted_tokens_total;
  /* Expert load balancing: placements applied, predicted max/mean rank load of
   * the placement in force. Omitted unless has_eplb. */
  int has_eplb;
  int64_t eplb_rebalances_total;
  double eplb_imbalance;
  /* All-to-all traffic summed over ranks, labelled by the comm backend. */
  int has_a2a;
  const char *a2a_backend; /* "mpi", "nccl", "ucx", "none" */
  int64_t a2a_dispatch_bytes, a2a_combine_bytes, a2a_calls;
  double a2a_dispatch_seconds, a2a_combine_seconds;
  /* Tokens routed to each expert (summed over MoE layers and ranks); NULL or
   * n_experts 0 = not available: the family is declared without samples.
   * malloc'd by whoever fills the snapshot; its user frees it. */
  int64_t *expert_tokens;
  int64_t n_experts;
  /* The HTTP front's own counts. */
  int64_t http_requests[EPIC_METRICS_EP_COUNT][EPIC_METRICS_CODE_COUNT];
  int64_t http_streams_active;
} epic_metrics_snapshot;

typedef struct epic_metrics_buf {
  char *p;
  size_t n, cap;
} epic_metrics_buf;

/* Appends the exposition of s to out. EPIC_ERR_NOMEM. */
epic_status epic_metrics_render(const epic_metrics_snapshot *s, epic_metrics_buf *out);
void epic_metrics_buf_free(epic_metrics_buf *b);

#endif
