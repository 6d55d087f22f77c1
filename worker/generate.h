/* Single-sequence generation loop on a model: chunked prefill, then one token
 * per step (or, with mtp_draft > 0, MTP speculative rounds of worker/spec.h that
 * commit 1..k+1 tokens each) until max_new_tokens or EOS, streaming each token to a callback and
 * optionally dumping every logits row (and the MTP head's rows over the prompt)
 * to .npy files. This is what `epic generate` runs; the serving scheduler runs
 * many sequences through epic_model_forward directly.
 * Thread contract: blocking; one call per model at a time. */
#ifndef EPIC_WORKER_GENERATE_H
#define EPIC_WORKER_GENERATE_H

#include <stddef.h>
#include <stdint.h>

#include "../common/npy.h"
#include "../common/status.h"
#include "model.h"
#include "sampler.h"

typedef enum { EPIC_FINISH_LENGTH = 0, EPIC_FINISH_STOP = 1 } epic_finish_reason;

typedef struct epic_generate_params {
  size_t size;                    /* sizeof(epic_generate_params) */
  const int32_t *prompt;          /* n_prompt >= 1 ids */
  int64_t n_prompt;
  int64_t max_new_tokens;         /* >= 0 */
  epic_sampling_params sampling;
  int ignore_eos;                 /* do not stop at the config's eos ids */
  int64_t prefill_chunk;          /* tokens per prefill step; 0 = whole prompt at once */
  epic_npy_writer *dump_logits;   /* optional: [T+N-1][vocab], one row per processed position */
  epic_npy_writer *dump_mtp_logits; /* optional: [T-1][vocab] MTP rows over the prompt */
  /* Called after each sampled token (may be NULL); a negative return stops
   * generation with that status. */
  epic_status (*on_token)(void *user, int32_t id, float logprob);
  void *user;
  /* Expert parallelism: the comm the model was loaded with (NULL otherwise).
   * The caller is rank 0 and owns the sequence; every other rank runs
   * epic_generate_follow so that all ranks take part in each step. */
  epic_comm *comm;
  /* > 0: MTP speculative decoding with this many draft tokens per round (needs
   * the model's MTP layer and kc_mtp). Greedy output equals mtp_draft = 0; with
   * sampling the distribution is the same (rejection sampling), not the tokens. */
  int64_t mtp_draft;
} epic_generate_params;

typedef struct epic_generate_result {
  int32_t *ids;                   /* generated ids (malloc'd; free with free()) */
  int64_t n_ids;
  epic_finish_reason finish;
  double prefill_seconds, decode_seconds;
  /* mtp_draft > 0: verify rounds that drafted, draft tokens proposed and accepted. */
  int64_t mtp_rounds, mtp_drafted, mtp_accepted;
  /* Rows in the main and MTP caches when generation ended (before release). */
  int64_t kv_tokens, mtp_kv_tokens;
} epic_generate_result;

/* Runs on caches sized by the caller: room for n_prompt + max_new_tokens rows in
 * kc and, with mtp_draft, in kc_mtp (twice that with dump_mtp_logits as well).
 * kc_mtp is needed only with dump_mtp_logits or mtp_draft. Sequences are
 * released on return. */
epic_status epic_generate(epic_model *m, epic_kvcache *kc, epic_kvcache *kc_mtp,
                          const epic_generate_params *p, epic_generate_result *r);

/* The loop of a rank without sequences in an expert-parallel epic_generate:
 * takes part in every step rank 0 announces (serving its experts) until rank 0
 * finishes. Returns the first error of a step, or EPIC_OK. */
epic_status epic_generate_follow(epic_model *m, epic_comm *comm);
/* Rank 0 when it gives up before calling epic_generate: releases the followers. */
epic_status epic_generate_release(epic_comm *comm);

#endif
