/* Step executor: one rank's part of a forward step (DESIGN §2-§3).
 *
 * A worker holds the sequences the coordinator assigned to it: for each, its
 * pages in the rank's latent KV cache and its own seeded sampler, so that a
 * sequence's tokens depend only on its prompt and sampling parameters, never on
 * which rank holds it or what else shares its batch. epic_executor_step takes a
 * step plan (worker/step_plan.h), frees the sequences it releases, creates the
 * new ones, runs the rank's entries through epic_model_forward as one batch and
 * samples a token for every SAMPLE entry.
 *
 * Lock-step (expert parallelism): with lockstep = 1 every rank of the model's
 * comm must call epic_executor_step for every plan that has tokens, because each
 * forward exchanges tokens with all ranks; a rank without entries still runs the
 * forward (n_seqs = 0) to serve its experts, and so does a rank whose own part
 * failed before the forward (it then returns the error after the collective
 * forward), so that a local error never leaves peers waiting.
 *
 * MTP speculative decoding (step_plan.h: MTP, VERIFY, draft counts): with an
 * MTP cache (kc_mtp) a sequence created by an MTP entry keeps a worker/spec.h
 * state; its prompt rows and verified rows go through the MTP layer, VERIFY
 * entries are accepted by the spec's rule (greedy: identical to plain decoding),
 * both caches are rolled back to the produced tokens, and after the forward the
 * MTP calls (the same number on every rank, lock-step like the forward) make the
 * drafts the plan asks for. A sequence's MTP rows are reserved at creation
 * (reserve_tokens, like its main rows).
 *
 * Ownership: the model and the KV cache(s) are borrowed and must outlive the
 * executor; epic_executor_destroy releases every sequence's pages.
 * Thread contract: thread-compatible; the thread that drives the model. */
#ifndef EPIC_WORKER_EXECUTOR_H
#define EPIC_WORKER_EXECUTOR_H

#include <stddef.h>
#include <stdint.h>

#include "../common/status.h"
#include "kvcache.h"
#include "model.h"
#include "step_plan.h"

typedef struct epic_executor epic_executor;

typedef struct epic_executor_params {
  size_t size;       /* sizeof(epic_executor_params) */
  epic_model *model; /* borrowed */
  epic_kvcache *kc;  /* borrowed: this rank's cache, from epic_model_kvcache_create */
  int rank;          /* this rank: entries naming it are run here */
  int lockstep;      /* 1 when the model was loaded with a comm (see above) */
  epic_kvcache *kc_mtp; /* borrowed, optional: MTP cache (epic_model_kvcache_create(m, 1, ..)) */
  int64_t mtp_draft;    /* with kc_mtp: the most drafts an entry may ask for (1..64) */
  /* Threads computing a step's top logprobs (a pass over a vocabulary-wide row each,
   * 129k ids for DeepSeek-V3; sampled tokens are drawn by the backend, ops row_draw).
   * 0: the online CPUs, at most 8; 1: the calling thread alone. Results do not depend
   * on it. */
  int sampler_threads;
} epic_executor_params;

epic_status epic_executor_create(const epic_executor_params *p, epic_executor **out);
void epic_executor_destroy(epic_executor *x); /* NULL-safe */

/* Run this rank's part of plan p (already checked with epic_step_plan_check).
 * out receives epic_step_plan_samples(p, rank) samples in entry order (may be
 * NULL when there are none). A plan without tokens only releases sequences and
 * runs no forward (on any rank: the decision follows from the plan alone).
 * Errors: EPIC_ERR_INVALID (logged) for an entry that names an unknown sequence,
 * creates an existing one or does not continue at the sequence's cached length;
 * EPIC_ERR_NOMEM when the cache cannot hold a new sequence's reservation; the
 * forward's errors. After an error the engine stops: only destroy is left. */
epic_status epic_executor_step(epic_executor *x, const epic_step_plan *p, epic_step_sample *out);
/* epic_executor_step that also writes, for the i-th sample, the top_n most
 * likely tokens of the same logits row (epic_top_logprobs: most likely first)
 * to top[i * top_n .. (i + 1) * top_n); slots beyond the vocabulary get id -1.
 * top_n in [0, 64]; top may be NULL when top_n == 0. */
epic_status epic_executor_step_top(epic_executor *x, const epic_step_plan *p, epic_step_sample *out,
                                   int top_n, epic_step_sample *top);

/* Prefix-cache hit of one new sequence, one record per entry of the plan's
 * news[] (the engine sends them after the plan body): with page >= 0 the
 * sequence begins with the n_pages cached pages of the chain ending at page
 * `page` with key `key` in this rank's KV cache (rank 0 mirrors every rank's
 * page table, coordinator/scheduler.h), and its NEW entry's tokens start at
 * row n_pages * page_size (the entry's own start stays 0, as step_plan.c
 * checks NEW entries). page = -1: none. */
typedef struct epic_executor_prefix {
  int32_t page;
  int32_t n_pages;
  uint64_t key;
} epic_executor_prefix;

/* epic_executor_step_top with prefix hits: prefix[i] belongs to p->news[i]
 * (prefix may be NULL when no NEW entry starts past 0). Full prompt pages that
 * the step's prefill chunks complete are published to the prefix cache after
 * the forward. EPIC_ERR_INVALID (logged) when the cached chain of a prefix
 * record is not there. out holds epic_step_plan_samples(p, rank) slots
 * (VERIFY entries: produced tokens, then id -1); top has top_n per slot (-1
 * ids for unused slots); drafts receives epic_step_plan_drafts(p, rank) ids in
 * entry order (may be NULL when there are none). */
epic_status epic_executor_step_prefix(epic_executor *x, const epic_step_plan *p,
                                      const epic_executor_prefix *prefix, epic_step_sample *out,
                                      int top_n, epic_step_sample *top, int32_t *drafts);

/* Sequences this rank holds. */
int64_t epic_executor_sequences(const epic_executor *x);

#endif
