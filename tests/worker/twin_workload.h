/* One workload run through two models side by side, in lock-step with the other
 * ranks (tests of expert parallelism and of expert re-placement): each rank's
 * sequences (random prompts, admitted one per step), chunked prefill beside
 * greedy decode, the same tokens on both models, each with its own KV cache. */
#ifndef EPIC_TESTS_TWIN_WORKLOAD_H
#define EPIC_TESTS_TWIN_WORKLOAD_H

#include <stdint.h>
#include <string.h>

#include "comm/comm.h"
#include "worker/model.h"
#include "worker/sampler.h"

enum { TWIN_CHUNK = 8, TWIN_MAX_SEQS = 16, TWIN_MAX_PROMPT = 24 };

typedef struct twin_seq {
  int32_t prompt[TWIN_MAX_PROMPT];
  int64_t n_prompt, n_gen, fed, gen_done;
  int32_t next;
  int admit_step;
  epic_kv_seq kv_a, kv_b; /* the sequence in model a's and model b's cache */
} twin_seq;

static inline uint64_t twin_mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return x;
}

/* Rank `rank` of `size`: 2 + rank sequences (none on the last of 3 or more
 * ranks), prompts of 1..24 tokens below V, gen_min .. gen_min + gen_span - 1
 * generated tokens. Returns how many. */
static inline int twin_make(int rank, int size, int64_t V, int64_t gen_min, int64_t gen_span,
                            twin_seq *w) {
  int n = size >= 3 && rank == size - 1 ? 0 : 2 + rank;
  if (n > TWIN_MAX_SEQS) n = TWIN_MAX_SEQS;
  for (int j = 0; j < n; j++) {
    const uint64_t h = twin_mix((uint64_t)(rank * 1000 + j + 1));
    memset(&w[j], 0, sizeof w[j]);
    w[j].n_prompt = 1 + (int64_t)(h % TWIN_MAX_PROMPT);
    w[j].n_gen = gen_min + (int64_t)((h >> 8) % (uint64_t)gen_span);
    w[j].admit_step = j;
    for (int64_t t = 0; t < w[j].n_prompt; t++)
      w[j].prompt[t] = (int32_t)(twin_mix(h + (uint64_t)t) % (uint64_t)V);
  }
  return n;
}

/* Collective: 1 while a sequence of any rank has tokens to generate. */
static inline int twin_left(epic_comm *comm, const twin_seq *w, int n) {
  int64_t left = 0, all = 0;
  for (int j = 0; j < n; j++) left += w[j].gen_done < w[j].n_gen;
  if (epic_comm_allreduce_i64(comm, &left, &all, 1, EPIC_COMM_SUM) != EPIC_OK) return -1;
  return all > 0;
}

/* Step `step`'s batches: a prefill chunk (every row's logits) or one decode token
 * per admitted unfinished sequence, ba on kv_a and bb on kv_b; map[k] = sequence
 * of entry k. Returns the entries. */
static inline int twin_batches(twin_seq *w, int n, int step, epic_seq_batch *ba,
                               epic_seq_batch *bb, int *map) {
  int nb = 0;
  for (int j = 0; j < n; j++) {
    twin_seq *s = &w[j];
    if (s->gen_done >= s->n_gen || step < s->admit_step) continue;
    if (s->fed < s->n_prompt) {
      const int64_t take = s->n_prompt - s->fed < TWIN_CHUNK ? s->n_prompt - s->fed : TWIN_CHUNK;
      ba[nb] = (epic_seq_batch){.tokens = s->prompt + s->fed, .n_tokens = take, .start = s->fed,
                                .all_logits = 1};
    } else {
      ba[nb] = (epic_seq_batch){.tokens = &s->next, .n_tokens = 1, .start = s->fed};
    }
    bb[nb] = ba[nb];
    ba[nb].kv = &s->kv_a;
    bb[nb].kv = &s->kv_b;
    map[nb++] = j;
  }
  return nb;
}

/* After the step: prefill progress, and the greedy next token of every sequence
 * whose prompt is done, taken from `logits` (the rows of batch ba), so that both
 * models go on with the same tokens. */
static inline void twin_advance(twin_seq *w, const int *map, const epic_seq_batch *ba, int nb,
                                const float *logits, int64_t V) {
  int64_t row = 0;
  for (int k = 0; k < nb; k++) {
    twin_seq *s = &w[map[k]];
    row += ba[k].all_logits ? ba[k].n_tokens : 1;
    s->fed += ba[k].n_tokens;
    if (s->fed < s->n_prompt) continue;
    s->next = epic_argmax(logits + (row - 1) * V, V);
    s->gen_done++;
  }
}

#endif
