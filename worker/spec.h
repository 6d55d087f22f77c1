/* MTP speculative decoding for one sequence (ARCHITECTURE §12.2, DESIGN §3.4).
 *
 * Each round the MTP layer drafts k tokens, the main model verifies them in one
 * forward over [last, d_1..d_k], and the longest acceptable prefix plus one token
 * from the main model (the correction at the first rejection, or the bonus after
 * all were accepted) is handed to the caller; the caller keeps some or all of
 * them and commits, which rolls both KV caches back to the kept tokens.
 *
 * Acceptance: greedy sampling (temperature 0 or top_k 1) accepts d_j when it is
 * the main model's argmax, so the output equals plain greedy decoding token for
 * token. Otherwise the standard rejection rule keeps the main model's sampling
 * distribution exactly: with p and q the target and draft distributions after the
 * same temperature/top-k/top-p processing as epic_sampler, d_j ~ q is accepted
 * with probability min(1, p(d_j)/q(d_j)), and on rejection the correction is drawn
 * from normalize(max(0, p - q)). The random stream is the spec's own (seeded from
 * the sampling seed), so sampled outputs follow the same distribution as plain
 * decoding, not the same tokens.
 *
 * Drafts beyond the first reapply the MTP layer at the next positions. Its block
 * output is not exposed by model.h, so drafts 2..k pair the draft token with the
 * last verified main-model hidden state instead of the MTP layer's own output
 * (lower acceptance than vLLM's recursion; the output is unaffected). The MTP
 * cache rows written for those drafts are dropped at commit.
 *
 * Positions: the main cache holds rows 0..n-1; `last` is the newest committed
 * token (position n, not yet in the main cache). The MTP cache holds rows for
 * positions below n whose (hidden, next token) pair has been processed; the rest
 * are pending inside the spec and run with the next draft.
 *
 * Thread contract: thread-compatible; one thread drives a spec (and its model
 * and caches) at a time. Blocking. */
#ifndef EPIC_WORKER_SPEC_H
#define EPIC_WORKER_SPEC_H

#include <stddef.h>
#include <stdint.h>

#include "../common/status.h"
#include "kvcache.h"
#include "model.h"
#include "sampler.h"

typedef struct epic_spec epic_spec;

typedef struct epic_spec_params {
  size_t size;                   /* sizeof(epic_spec_params) */
  int64_t n_draft;               /* k >= 1 draft tokens per round */
  epic_sampling_params sampling; /* as for epic_sampler_create (validated there too) */
  /* Optional: called before every main (mtp = 0) and MTP (mtp = 1) forward, so
   * that an expert-parallel caller can announce the step to its followers. */
  epic_status (*before_forward)(void *user, int mtp);
  void *user;
} epic_spec_params;

/* Acceptance statistics since create. Rounds count draft_verify calls that
 * drafted at least one token; drafted/accepted count draft tokens. */
typedef struct epic_spec_stats {
  int64_t rounds;
  int64_t drafted;
  int64_t accepted;
} epic_spec_stats;

/* m, kc (main cache) and kc_mtp (MTP cache, from epic_model_kvcache_create(m, 1, ..))
 * are borrowed and must outlive the spec. EPIC_ERR_INVALID (logged) for a model
 * without an MTP layer, n_draft < 1 or bad sampling params. */
epic_status epic_spec_create(epic_model *m, epic_kvcache *kc, epic_kvcache *kc_mtp,
                             const epic_spec_params *p, epic_spec **out);
/* NULL-safe; releases the spec's MTP sequence (the main sequence is the caller's). */
void epic_spec_destroy(epic_spec *s);

/* Prefill: the main model's final-normed hidden rows [n_rows][hidden] for the
 * next positions of the sequence (in order, starting at 0), and the ids of the
 * tokens that follow them, next[0..n_next) with n_next = n_rows or n_rows - 1
 * (the last prompt row's successor is the first sampled token, passed to
 * draft_verify as `last`). Complete pairs run through the MTP layer now, so a
 * chunked prefill keeps only one chunk of hidden rows. Copies what it keeps. */
epic_status epic_spec_observe(epic_spec *s, const float *hidden, int64_t n_rows,
                              const int32_t *next, int64_t n_next);

/* One round on sequence seq (seq->n_tokens = n, the position of `last`):
 * drafts min(k, max_out - 1) tokens, verifies, and writes the tokens the main
 * model produces to out[0..*n_out) (1 <= *n_out <= min(k + 1, max_out)) with
 * their log-probabilities under the raw main-model logits to logprobs (may be
 * NULL). The main cache grows by drafts + 1 rows; call epic_spec_commit before
 * the next round. max_out >= 1. EPIC_ERR_NOMEM if a cache is full; after any
 * error the sequence cannot continue (release it and destroy the spec). */
epic_status epic_spec_draft_verify(epic_spec *s, epic_kv_seq *seq, int32_t last, int64_t max_out,
                                   int32_t *out, float *logprobs, int64_t *n_out);

/* Keep out[0..n_keep) of the last round (1 <= n_keep <= *n_out): the main cache
 * is truncated to n + n_keep rows, the MTP cache to n rows, and out[n_keep - 1]
 * becomes the next round's `last`. */
epic_status epic_spec_commit(epic_spec *s, epic_kv_seq *seq, int64_t n_keep);

void epic_spec_get_stats(const epic_spec *s, epic_spec_stats *out);
/* Rows of the spec's MTP cache sequence (for tests of the rollback). */
int64_t epic_spec_mtp_tokens(const epic_spec *s);

/* The sampler's distribution over logits[0..n) as dense probabilities
 * probs[0..n) summing to 1: temperature, then top-k, then top-p, exactly as
 * epic_sampler_sample (ties broken toward the lower id). Needs temperature > 0.
 * idx is scratch of n ids. */
void epic_spec_probs(const float *logits, int64_t n, const epic_sampling_params *sp, int32_t *idx,
                     float *probs);

/* The rejection rule for one draft token d drawn from q: accepted (returns d,
 * *accepted = 1) when u_accept * q[d] < p[d]; otherwise returns a token drawn by
 * inverse CDF with u_resample from normalize(max(0, p - q)) (from p when that
 * residual is empty through rounding). p, q: distributions over n tokens;
 * u_accept, u_resample in [0, 1). */
int32_t epic_spec_accept(const float *p, const float *q, int64_t n, int32_t d, double u_accept,
                         double u_resample, int *accepted);

#endif
