/* The step plan: what the coordinator (rank 0) tells every worker before each
 * forward step (DESIGN §3 step 1), and what comes back (step 3).
 *
 * Wire format. A plan travels as two broadcasts: a fixed 32-byte header
 * (epic_step_header), then, when the header says so, a body of
 * epic_step_body_bytes(header) bytes laid out as
 *     entries[n_entries] | news[n_new] | tokens[n_tokens]
 * Entries name a sequence, the rank that holds it and what to do this step:
 * run n_tokens tokens at positions start.. (a prefill chunk or one decode token),
 * create the sequence first (NEW: KV pages for reserve_tokens rows, a sampler with
 * the entry's sampling parameters, both from news[new_index]), sample a token from
 * its last row (SAMPLE), or free it (RELEASE, no tokens). tokens holds every
 * entry's tokens concatenated in entry order. Every rank receives the whole plan
 * (it is small: ids and positions, no activations) and runs the entries that name
 * it; all ranks then exchange results in one allgatherv whose counts follow from
 * the plan: rank r contributes an epic_step_reply followed by its sample slots
 * (epic_step_sample, epic_step_entry_samples(e) per SAMPLE entry of rank r, in
 * entry order), then its draft slots (int32 ids, epic_step_entry_drafts(e) per
 * entry of rank r, in entry order, padded with one -1 to an even count):
 * epic_step_reply_bytes(p, r) bytes. The engine appends its own fixed-size parts
 * after them (top-logprob lists, per-rank statistics and expert counts: see
 * reply_bytes in coordinator/engine.c), the same size on every rank.
 *
 * MTP speculative decoding (worker/spec.h). An entry of a sequence that drafts
 * carries MTP: its rows also go through the MTP layer (the sequence keeps an
 * MTP cache, created with NEW; an entry without MTP for a sequence that has one
 * ends its drafting for good and frees that cache). A decode entry of such a
 * sequence is VERIFY: tokens[0] is the last sampled token and tokens[1..n_tokens)
 * are the drafts the rank sent back in the previous step's draft slots (the
 * first n_tokens - 1 of them); it has n_tokens sample slots: the produced tokens
 * (accepted drafts, then the correction or bonus token) followed by id -1 in
 * the unused slots. The rank keeps the produced tokens' rows in both caches and
 * rolls the rest back. The draft count in the flags (EPIC_STEP_DRAFT_SHIFT,
 * SAMPLE + MTP entries only) asks for that many drafts for the sequence's next
 * step, made after the forward by MTP calls that every rank runs in lock-step:
 * epic_step_plan_mtp_calls(p) of them, the same on every rank (a rank without
 * MTP entries runs them with no sequences).
 * All ranks of a job run the same binary on the same architecture, so the
 * structs go over the wire as they are (fixed-width fields, no padding holes).
 *
 * Thread-safe: pure functions over caller memory. */
#ifndef EPIC_WORKER_STEP_PLAN_H
#define EPIC_WORKER_STEP_PLAN_H

#include <stddef.h>
#include <stdint.h>

#include "../common/status.h"

#define EPIC_STEP_MAGIC 0x50535045u /* "EPSP" */

/* IDLE: a keep-alive rank 0 sends while it has no work, so that the workers'
 * timed control-plane waits (comm timeout_ms) only fire when rank 0 is really
 * gone; no body, the step number does not advance. */
/* PLACE: an expert-placement round between two steps (EPLB, coordinator/eplb.h); no
 * step-plan body, the step number does not advance. Instead every rank joins:
 * an allreduce (sum) of its per-layer expert token counts, int64
 * [(num_hidden_layers + 1) * n_routed_experts]; a broadcast from rank 0 of int64
 * {apply, n} (apply: 1 = new placement, 0 = keep, -1 = rank 0 failed); when apply is
 * 1, broadcasts of the epic_expert_placement arrays (worker/model.h) int32
 * off[rows * E + 1] and int32 ranks[n]; then an allreduce (min) of every rank's
 * epic_model_set_placement status. Handled by the engine before
 * epic_step_header_check. */
enum { EPIC_STEP_OP_STOP = 0, EPIC_STEP_OP_RUN = 1, EPIC_STEP_OP_IDLE = 2, EPIC_STEP_OP_PLACE = 3 };

/* Entry flags. */
enum {
  EPIC_STEP_NEW = 1u,
  EPIC_STEP_RELEASE = 2u,
  EPIC_STEP_SAMPLE = 4u,
  EPIC_STEP_MTP = 8u,    /* the sequence drafts with the MTP layer (see above) */
  EPIC_STEP_VERIFY = 16u /* decode entry of an MTP sequence: tokens[1..] are drafts */
};
/* Flags bits 8..15: drafts to make for the sequence's next step. */
#define EPIC_STEP_DRAFT_SHIFT 8
#define EPIC_STEP_DRAFT_MASK (0xffu << EPIC_STEP_DRAFT_SHIFT)
#define EPIC_STEP_MAX_DRAFT 64

typedef struct epic_step_header {
  uint32_t magic;     /* EPIC_STEP_MAGIC */
  int32_t op;         /* EPIC_STEP_OP_* ; STOP: no body, the workers return */
  uint32_t n_entries; /* entries in the body */
  uint32_t n_new;     /* new-sequence records in the body */
  uint64_t step;      /* step number (every rank counts too: a mismatch is a protocol error) */
  int64_t n_tokens;   /* sum of the entries' n_tokens */
} epic_step_header;

typedef struct epic_step_entry {
  uint64_t seq;      /* sequence id, unique in the job */
  int32_t rank;      /* worker holding the sequence's KV cache */
  uint32_t flags;    /* EPIC_STEP_* */
  int64_t start;     /* position of the first token = rows the sequence has cached */
  int32_t n_tokens;  /* tokens to run this step; 0 only for RELEASE */
  int32_t new_index; /* into news[] when flags has NEW, else -1 */
} epic_step_entry;

typedef struct epic_step_new {
  int64_t reserve_tokens; /* KV rows reserved when the sequence is created */
  int64_t top_k;
  uint64_t seed;
  float temperature, top_p;
  /* Most likely alternatives this sequence's samples report (0..the top_n the
   * executor is stepped with; its other slots come back with id -1). Only
   * sequences that ask pay for them (a GPU backend then downloads their rows). */
  int32_t top_logprobs;
  int32_t reserved; /* 0: keeps the record 8-byte aligned */
} epic_step_new;

/* What rank r sends back after a step: its status, then its samples. */
typedef struct epic_step_reply {
  int32_t status;    /* epic_status of the rank's part of the step */
  int32_t n_samples; /* samples that follow (= epic_step_plan_samples(plan, r)) */
} epic_step_reply;

typedef struct epic_step_sample {
  int32_t id;
  float logprob;
} epic_step_sample;

/* A plan as arrays (pointing into a body buffer). */
typedef struct epic_step_plan {
  epic_step_header h;
  epic_step_entry *entries;
  epic_step_new *news;
  int32_t *tokens;
} epic_step_plan;

/* Bytes of the body that follows header h (0 for STOP or an empty plan). */
size_t epic_step_body_bytes(const epic_step_header *h);
/* Point p's arrays into body (epic_step_body_bytes(h) bytes, 8-byte aligned) and copy h. */
void epic_step_plan_bind(epic_step_plan *p, const epic_step_header *h, void *body);
/* Check a received plan against a world of nranks ranks: magic, op, counts, ranks,
 * flags, new_index, token total. EPIC_ERR_COMM (logged, naming the entry and
 * field) when it is not well formed. */
epic_status epic_step_header_check(const epic_step_header *h, uint64_t expect_step);
epic_status epic_step_plan_check(const epic_step_plan *p, int nranks);
/* Sample slots of an entry (0 unless SAMPLE; n_tokens for VERIFY, else 1) and
 * the drafts it asks for. */
int64_t epic_step_entry_samples(const epic_step_entry *e);
int64_t epic_step_entry_drafts(const epic_step_entry *e);
/* Sample slots and draft slots of rank r's entries. */
int64_t epic_step_plan_samples(const epic_step_plan *p, int rank);
int64_t epic_step_plan_drafts(const epic_step_plan *p, int rank);
/* MTP calls every rank runs after the forward: max(1, drafts of any entry) when
 * some entry carries MTP, else 0. */
int64_t epic_step_plan_mtp_calls(const epic_step_plan *p);
/* Bytes of rank r's reply up to its draft slots (header, samples, drafts). */
size_t epic_step_reply_bytes(const epic_step_plan *p, int rank);

#endif
