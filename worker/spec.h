/* MTP speculative decoding (ARCHITECTURE §12.2, DESIGN §3.4): one sequence's
 * drafting state, used by `epic generate` (one sequence, epic_spec_draft_verify /
 * epic_spec_commit) and by the serving engine's executor (many sequences whose
 * model calls are batched: the phase functions below). Both paths run the same
 * code; the single-sequence calls are built from the phases.
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
 * decoding, not the same tokens; they depend only on the sequence's own tokens
 * and the number of drafts of each round.
 *
 * Drafts beyond the first reapply the single MTP layer to its own output, as
 * vLLM and SGLang do (ARCHITECTURE §12.2): draft d_{j+1} comes from the pair
 * (MTP block output that drafted d_j, d_j) at the next position, the block
 * output taken before shared_head.norm (epic_seq_batch.mtp_out). The MTP cache
 * rows written for drafts are dropped at commit (the verified pairs replace them).
 *
 * Positions: the main cache holds rows 0..n-1; `last` is the newest committed
 * token (position n, not yet in the main cache). The MTP cache holds rows for
 * positions below n whose (hidden, next token) pair has been processed; the rest
 * are pending inside the spec and run with the next MTP call.
 *
 * Rollback keeps pages: rows past the kept ones are forgotten (n_tokens lowered)
 * but their pages stay with the sequence, because a serving sequence reserves
 * its pages up front (and rank 0 mirrors its page table); the next forward
 * overwrites the rows. Releasing the sequence returns them.
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
/* The main model's logits rows of the last epic_spec_draft_verify ([*n_out][vocab] used:
 * row j gave out[j], as plain decoding's row for that position does), valid until the
 * next round: what `epic generate --dump-logits` writes while drafting. */
const float *epic_spec_verify_logits(const epic_spec *s);

/* Keep out[0..n_keep) of the last round (1 <= n_keep <= *n_out): the main cache
 * is truncated to n + n_keep rows, the MTP cache to n rows, and out[n_keep - 1]
 * becomes the next round's `last`. */
epic_status epic_spec_commit(epic_spec *s, epic_kv_seq *seq, int64_t n_keep);

void epic_spec_get_stats(const epic_spec *s, epic_spec_stats *out);
/* Rows of the spec's MTP cache sequence (for tests of the rollback). */
int64_t epic_spec_mtp_tokens(const epic_spec *s);

/* ---- Phases, for a driver that batches many sequences (worker/executor.c).
 * One step of a sequence whose prompt has ended:
 *   1. the main model runs [last, d_1..d_kd] (all_logits, hidden rows kept),
 *      d_i = epic_spec_drafts()[i - 1] from the previous step;
 *   2. epic_spec_verify(rows) gives the tokens out[0..n_out);
 *   3. epic_spec_keep(seq, hidden rows, n_keep) rolls both caches back to the
 *      kept tokens and queues their rows (and out[n_keep - 1] as the token after
 *      the last one) for the MTP layer;
 *   4. epic_spec_set_drafts(kd'), then for call c = 0, 1, .. (every sequence of
 *      the batch takes part in the same calls): epic_spec_mtp_input(c) gives the
 *      sequence's part of MTP forward c (if any), epic_spec_mtp_output(c) takes
 *      its logits row; afterwards epic_spec_drafts() holds d'_1..d'_kd'.
 * Prompt chunks go in with epic_spec_feed (their rows run in MTP call 0) and
 * the first sampled token with epic_spec_feed_next. */

/* Rows of the main model for positions n.. holding tokens[0..n_rows): tokens[0]
 * also completes the newest pending row's pair when it waits for its next token. */
epic_status epic_spec_feed(epic_spec *s, const int32_t *tokens, const float *hidden,
                           int64_t n_rows);
/* The token after the newest pending row (e.g. the first sampled token). */
epic_status epic_spec_feed_next(epic_spec *s, int32_t tok);
/* Reserve rows of the MTP cache (the engine reserves a sequence's whole length). */
epic_status epic_spec_reserve(epic_spec *s, int64_t n_tokens);
/* Drafts the coming MTP calls produce: 0..n_draft. Calls needed: max(1, kd)
 * when anything is pending (call 0 runs the pending pairs). */
epic_status epic_spec_set_drafts(epic_spec *s, int64_t kd);
/* 1 when the spec accepts by argmax (greedy sampling): it then takes the
 * backend's picks (model.h epic_row_pick) instead of logits rows, which a GPU
 * backend need not download. */
int epic_spec_greedy(const epic_spec *s);
/* The sequence's part of MTP call `call` in *b; 0 when it has none. */
int epic_spec_mtp_input(epic_spec *s, int64_t call, epic_seq_batch *b);
/* After the MTP forward: its logits row for this sequence (the last row of its part). */
void epic_spec_mtp_output(epic_spec *s, int64_t call, const float *logits_row);
/* epic_spec_mtp_output from the row's pick; greedy specs only (else EPIC_ERR_INVALID). */
epic_status epic_spec_mtp_output_pick(epic_spec *s, int64_t call, const epic_row_pick *pick);
/* The drafts of the last MTP calls (*n of them; borrowed until the next call). */
const int32_t *epic_spec_drafts(const epic_spec *s, int64_t *n);
/* Acceptance over the main model's logits rows [kd + 1][vocab] of [last,
 * drafts[0..kd)] (drafts must be the first kd of epic_spec_drafts; kd may be 0):
 * out[0..*n_out) as for epic_spec_draft_verify (logprobs may be NULL). */
epic_status epic_spec_verify(epic_spec *s, const int32_t *drafts, int64_t kd, const float *rows,
                             int32_t *out, float *logprobs, int64_t *n_out);
/* epic_spec_verify from the rows' picks [kd + 1]; greedy specs only (else
 * EPIC_ERR_INVALID). Same tokens and logprobs as from the rows themselves. */
epic_status epic_spec_verify_picks(epic_spec *s, const int32_t *drafts, int64_t kd,
                                   const epic_row_pick *picks, int32_t *out, float *logprobs,
                                   int64_t *n_out);
/* Keep out[0..n_keep) of the last verify: seq (whose rows n.. were written by
 * the verify forward, n = the position of `last`) is rolled back to n + n_keep
 * rows, the MTP cache to its verified rows, and hidden rows [n_keep][hidden]
 * (the verify forward's first n_keep rows) are queued with their next tokens. */
epic_status epic_spec_keep(epic_spec *s, epic_kv_seq *seq, const float *hidden, int64_t n_keep);

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
