/* Token sampling from a logits row: greedy (temperature 0; ties -> lowest id),
 * or temperature + top-k + top-p with a seeded PRNG (same seed, same tokens).
 * Thread contract: one epic_sampler per sequence; not shared between threads. */
#ifndef EPIC_WORKER_SAMPLER_H
#define EPIC_WORKER_SAMPLER_H

#include <stddef.h>
#include <stdint.h>

#include "../common/status.h"
#include "../kernels/draw.h"

typedef struct epic_sampling_params {
  size_t size;        /* sizeof(epic_sampling_params) */
  float temperature;  /* 0: greedy; must be >= 0 */
  float top_p;        /* (0, 1]; 1 disables */
  int64_t top_k;      /* 0 disables */
  uint64_t seed;
} epic_sampling_params;

typedef struct epic_sampler epic_sampler;

/* EPIC_ERR_INVALID (logged, naming the parameter) for temperature < 0, top_p
 * outside (0, 1] or top_k < 0. */
epic_status epic_sampler_create(const epic_sampling_params *p, epic_sampler **out);
void epic_sampler_destroy(epic_sampler *s); /* NULL-safe */

/* Pick a token from logits[0..n) (host memory): the argmax when greedy, else the draw of
 * kernels/draw.h with a fresh random value from s (the token a backend's row_draw gives
 * for the parameters epic_sampler_draw hands out at that point of the stream).
 * Optionally reports the chosen token's log-probability under the unmodified
 * distribution (softmax of the raw logits). */
int32_t epic_sampler_sample(epic_sampler *s, const float *logits, int64_t n, float *logprob);

/* The next draw's parameters for a backend's row_draw (kernels/ops.h), taking a random
 * value from s as epic_sampler_sample does: 1, or 0 (d untouched, nothing taken) when s is
 * greedy (epic_sampler_greedy). */
int epic_sampler_draw(epic_sampler *s, epic_draw_params *d);

/* 1 when s always takes the argmax (temperature 0 or top_k 1): its token and
 * logprob are then epic_row_pick's (worker/model.h), and the logits row itself is
 * not needed. */
int epic_sampler_greedy(const epic_sampler *s);

/* The k most likely tokens of logits[0..n) under the unmodified distribution
 * (softmax of the raw logits, as the sampled token's logprob): ids[0..k) and
 * their log-probabilities lps[0..k), most likely first, lower id first on ties.
 * Returns the number written, min(k, n); k <= 0 writes nothing. One pass over
 * the row plus a k-element insertion list (k is small: OpenAI allows <= 20). */
int epic_top_logprobs(const float *logits, int64_t n, int k, int32_t *ids, float *lps);
/* epic_top_logprobs with the row's log-normaliser lse = log sum exp(logits) given (from
 * a greedy pick: l[best] - its logprob), so that only the one pass is made. */
int epic_top_logprobs_lse(const float *logits, int64_t n, int k, double lse, int32_t *ids,
                          float *lps);

/* The sampler's distribution for temperature > 0 (kernels/draw.h): the k ids it keeps in
 * idx[0..k), ascending, their weights (exp((logit - max) / temperature), to the draw's
 * fixed point) in w[0..k); *sum is their total weight. idx and w have room for n.
 * (Speculative decoding's acceptance test needs the distribution the sampler draws
 * from.) */
int64_t epic_sampling_weights(const float *logits, int64_t n, const epic_sampling_params *p,
                              int32_t *idx, float *w, double *sum);

/* log softmax(logits)[id] under the unmodified distribution. */
double epic_logprob_at(const float *logits, int64_t n, int32_t id);

/* Greedy choice without a sampler: argmax, lowest id on ties. */
int32_t epic_argmax(const float *logits, int64_t n);

#endif
