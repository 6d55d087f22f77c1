/* epic_sched: the coordinator's scheduling policy (DESIGN §2), without a model.
 *
 * Requests wait in a FIFO queue. Admission takes the queue's head while fewer
 * than max_batch sequences run and some worker has free KV pages for the
 * request's whole prompt + max_new_tokens (reserved up front, so a running
 * sequence is never preempted); the worker with the most free pages takes it
 * (ties: fewer running sequences, then the lower rank). Admission is strictly
 * in order: a head that does not fit yet blocks the queue, so a long request is
 * never starved by short ones.
 *
 * Each step, per worker, under a budget of step_tokens tokens:
 *   1. every sequence in decode gets one token. This always fits: a sequence
 *      enters decode through a prompt chunk that fit in the budget next to the
 *      decode tokens of its step, so a worker never has more than step_tokens
 *      sequences in decode;
 *   2. the rest of the budget goes to prefill chunks of at most prefill_chunk
 *      tokens, one chunk per sequence, in admission order (an admitted
 *      sequence waits for budget while the ones before it fill it).
 * Entries come in admission order within each of the two groups.
 * A chunk that ends the prompt, and every decode token, is SAMPLE: the caller
 * samples a token from its last row. A sequence's first entry is NEW. A removed
 * sequence (finished or cancelled) gives its pages back at once and, if a
 * worker already holds it, a RELEASE entry in the next step, which comes before
 * every other entry so the pages are free again before any new sequence uses them.
 *
 * Prefix cache (prefix_cache_pages > 0). The scheduler keeps a mirror of every
 * worker's KV page table (worker/kvpages.h) and applies to it exactly what the
 * worker does with the plans it receives, in the same order: a removed
 * sequence's pages are unreferenced (from its last page) when it is removed,
 * i.e. before the next step's entries, as the worker does with the RELEASE
 * entries that lead that step; a NEW entry takes the longest cached prefix of
 * the prompt (at most (n_prompt - 1) / page_size pages, so the last prompt
 * token is always computed) and then the rest of its reservation; commit
 * publishes the full prompt pages the step's chunks completed, in entry order.
 * A NEW entry with a hit starts at hit_pages * page_size and names the cached
 * chain's last page and key (prefix_page, prefix_key) for the worker. Idle
 * cached pages count as free for admission (the worker evicts them on demand);
 * an admitted sequence counts its whole reservation until its NEW entry goes
 * out, so a shorter hit by then never leaves it short. Admission prefers the
 * worker with the longest cached prefix among those with room. Only requests
 * submitted with their token ids (epic_sched_submit_prompt) use the cache.
 *
 * MTP speculative decoding (mtp_draft > 0, step_plan.h). An admitted sequence
 * drafts: all its entries carry MTP, its decode entries are VERIFY with
 * 1 + k tokens (k = mtp_draft: the drafts it received last step), and a
 * SAMPLE entry asks for k drafts unless it is the sequence's last step
 * (n_gen + 1 >= max_new). The draft count never depends on the batch or on
 * max_new, so a sequence's tokens depend only on its own prompt and sampling
 * parameters, and a shorter max_new gives a prefix (the caller cuts the
 * produced tokens at max_new). A drafting sequence's reservation covers
 * n_prompt + max_new + k rows (a verify writes k rows past the kept ones).
 * Decode tokens (1 + k each) come out of the same step_tokens budget. Each worker's MTP cache has kv_pages pages without a
 * prefix cache; a drafting sequence holds its whole reservation (pages) there
 * too, and admission waits for room in both caches.
 * With mtp_auto the sequence stops drafting for good once its drafts in its
 * last EPIC_SCHED_MTP_WINDOW verify steps number at least EPIC_SCHED_MTP_MIN
 * and fewer than half of them were accepted (break-even: a verify step that
 * rejects its draft costs a draft and a longer forward for no extra token;
 * on a GPU decode is bound by weight reads, so at one draft per step half
 * accepted leaves a clear gain, while a sequence whose MTP layer does not
 * predict it (an untrained one accepts ~0%) stops after EPIC_SCHED_MTP_MIN
 * drafts). It does not probe again later: drafting again would need the MTP
 * layer over every position since (its cache has no gaps), which costs as much
 * as having drafted all along. The decision uses only the sequence's own
 * acceptance, so it is reproducible. Its entries then carry no MTP (the worker
 * frees its MTP rows) and decode one token a step.
 *
 * The scheduler does not decide when a sequence ends: the caller removes it
 * (epic_sched_remove) after a token it judges final. It only never schedules a
 * sequence that has produced max_new tokens.
 *
 * Ownership: user pointers are the caller's, returned in entries and by remove.
 * Thread contract: thread-compatible; the engine serialises all calls with its
 * mutex. A formed step stays valid until the next epic_sched_form. */
#ifndef EPIC_COORDINATOR_SCHEDULER_H
#define EPIC_COORDINATOR_SCHEDULER_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"

typedef struct epic_sched epic_sched;

typedef struct epic_sched_params {
  size_t size;           /* sizeof(epic_sched_params) */
  int nranks;            /* workers, >= 1 */
  int64_t page_size;     /* KV tokens per page, >= 1 */
  int64_t kv_pages;      /* KV pages per worker, >= 1 */
  int64_t max_batch;     /* running sequences in the cluster, >= 1 */
  int64_t max_queue;     /* waiting requests, >= 1 */
  int64_t step_tokens;   /* per-worker tokens per step, >= 1 */
  int64_t prefill_chunk; /* prompt tokens of one sequence per step, >= 1 */
  int64_t prefix_cache_pages; /* per worker: idle cached prompt pages kept; 0 = no prefix cache */
  int64_t mtp_draft; /* drafts per verify step of a drafting sequence (0..64); 0 = no drafting */
  int mtp_auto;      /* with mtp_draft: sequences stop drafting when it does not pay (above) */
} epic_sched_params;

#define EPIC_SCHED_MTP_WINDOW 8
#define EPIC_SCHED_MTP_MIN 4

/* Entry flags are the step plan's (worker/step_plan.h): EPIC_STEP_NEW,
 * EPIC_STEP_RELEASE, EPIC_STEP_SAMPLE. */
typedef struct epic_sched_entry {
  uint64_t id;
  void *user; /* the request's user pointer (NULL for RELEASE entries) */
  int32_t rank;
  uint32_t flags;
  int64_t start;             /* position of the first token */
  int64_t n_tokens;          /* 0 for RELEASE */
  int64_t n_prompt, max_new; /* the request's (for NEW entries' reservation) */
  int32_t prefix_page;       /* NEW with start > 0: last page of the cached prefix, else -1 */
  uint64_t prefix_key;       /* its key */
  int64_t n_drafts;   /* VERIFY: drafts among n_tokens (tokens 1..n_drafts) */
  int64_t draft_next; /* drafts the entry asks for (also in flags) */
  /* Set by the caller before epic_sched_commit: tokens a SAMPLE entry produced
   * (1..n_drafts + 1; 0 counts as 1). */
  int64_t n_out;
  void *seq_;                /* internal */
} epic_sched_entry;

typedef struct epic_sched_step {
  epic_sched_entry *entries; /* owned by the scheduler */
  int64_t n_entries;
  int64_t n_tokens;   /* sum of n_tokens */
  int64_t n_admitted; /* requests admitted while forming this step */
} epic_sched_step;

typedef struct epic_sched_stats {
  int64_t queued, running;
  int64_t pages_used, pages_total; /* summed over workers (used: held by sequences) */
  int64_t prefix_hits;             /* NEW entries that started from a cached prefix */
  int64_t prefix_hit_tokens;       /* prompt tokens they did not compute */
  int64_t prefix_cached_pages;     /* idle cached pages, summed over workers */
  int64_t prefix_evictions;        /* idle cached pages dropped or reused */
  int64_t mtp_running;             /* running sequences that draft */
  int64_t mtp_stopped;             /* sequences that stopped drafting (mtp_auto) */
} epic_sched_stats;

/* EPIC_ERR_INVALID (logged, naming the field) for bad parameters. */
epic_status epic_sched_create(const epic_sched_params *p, epic_sched **out);
void epic_sched_destroy(epic_sched *s); /* NULL-safe */

/* KV pages a request of n_prompt + max_new tokens reserves (+ mtp_draft rows
 * when drafting). */
int64_t epic_sched_pages_for(const epic_sched *s, int64_t n_prompt, int64_t max_new);

/* Queue a request (id unique among live requests; n_prompt >= 1, max_new >= 1).
 * EPIC_ERR_BUSY when max_queue requests wait; EPIC_ERR_INVALID when it needs
 * more pages than a worker has (it could never be admitted); nothing is queued
 * then. */
epic_status epic_sched_submit(epic_sched *s, uint64_t id, int64_t n_prompt, int64_t max_new,
                              void *user);
/* epic_sched_submit with the prompt's token ids, for the prefix cache. prompt
 * (n_prompt ids) is borrowed until the request is removed. */
epic_status epic_sched_submit_prompt(epic_sched *s, uint64_t id, const int32_t *prompt,
                                     int64_t n_prompt, int64_t max_new, void *user);
/* Remove a request, queued or running: returns 1 and its user pointer (*user may
 * be NULL), or 0 when the id is unknown (never submitted or already removed).
 * A running sequence's pages are free for admission at once. */
int epic_sched_remove(epic_sched *s, uint64_t id, void **user);
/* Keep a queued request from drafting (it decodes one token a step even with
 * mtp_draft > 0). Returns 0 when id is not queued. */
int epic_sched_no_draft(epic_sched *s, uint64_t id);
/* Remove the first live request (queued ones first); 0 when none is left. */
int epic_sched_pop_any(epic_sched *s, uint64_t *id, void **user);

/* Form the next step (admission, releases, decode, prefill). The step may have
 * no entries (nothing to do). */
epic_status epic_sched_form(epic_sched *s, epic_sched_step *out);
/* The step formed last ran: advance every entry's sequence (cached tokens, and
 * n_out generated tokens for each SAMPLE entry; with mtp_auto, the drafting
 * decision). Call before removing any of them. */
void epic_sched_commit(epic_sched *s, const epic_sched_step *st);

/* 1 when a step would have something to do (queued or running requests, or
 * releases still to send). */
int epic_sched_has_work(const epic_sched *s);
void epic_sched_get_stats(const epic_sched *s, epic_sched_stats *out);
/* Running sequences and free pages of worker `rank` (tests, metrics). */
int64_t epic_sched_rank_running(const epic_sched *s, int rank);
int64_t epic_sched_rank_free_pages(const epic_sched *s, int rank);
/* Cached prompt pages of worker `rank` that prompt[0..n) would reuse now. */
int64_t epic_sched_rank_prefix_pages(const epic_sched *s, int rank, const int32_t *prompt,
                                     int64_t n);

#endif
