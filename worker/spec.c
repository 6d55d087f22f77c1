#define _GNU_SOURCE
#include "spec.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../common/log.h"

struct epic_spec {
  epic_model *m;
  epic_kvcache *kc, *kc_mtp;
  epic_spec_params p;
  int greedy;
  int64_t V, D, k;
  epic_kv_seq mseq; /* the MTP layer's cache rows */
  /* Main-model hidden rows for positions mseq.n_tokens.. not yet run through the
   * MTP layer; pend_t[i] is the token after row i, known for i < pend_next. */
  float *pend_h;
  int32_t *pend_t;
  int64_t pend_rows, pend_next, pend_cap;
  float *mlog;    /* [V] MTP logits of the latest draft */
  float *q;       /* [k][V] draft distributions (sampling only) */
  float *pdist;   /* [V] target distribution (sampling only) */
  int32_t *idx;   /* [V] scratch for epic_spec_probs */
  float *vlog;    /* [k+1][V] verify logits */
  float *vh;      /* [k+1][D] verify hidden rows */
  int32_t *vtok;  /* [k+1] verify input: last, drafts */
  int32_t *vout;  /* [k+1] tokens the round produced */
  float *hdraft;  /* [2][D] MTP block outputs: call c writes row c % 2, call c + 1 reads it */
  uint64_t rng;
  int64_t kd;       /* drafts the coming MTP calls produce */
  int64_t n_drafts; /* drafts made so far: vtok[1..n_drafts] */
  int64_t mtp_keep; /* MTP rows of verified pairs; rows past it are the drafts' */
  int in_round;     /* verified, not yet kept */
  int64_t round_kd, round_out;
  epic_spec_stats stats;
};

/* splitmix64 as a stream: enough for acceptance coins, independent of the sampler. */
static double next_unit(epic_spec *s) {
  uint64_t z = (s->rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return (double)(z >> 11) * 0x1.0p-53;
}

void epic_spec_probs(const float *logits, int64_t n, const epic_sampling_params *sp, int32_t *idx,
                     float *probs) {
  double sum;
  const int64_t k = epic_sampling_weights(logits, n, sp, idx, probs, &sum);
  /* probs holds the weights in candidate order; scatter them to token order through
   * a copy (candidate i's id may be any earlier or later slot). */
  float *w = malloc((size_t)k * sizeof *w);
  if (!w) {
    memset(probs, 0, (size_t)n * sizeof *probs);
    probs[idx[0]] = 1.0f; /* out of memory: the most likely token */
    return;
  }
  memcpy(w, probs, (size_t)k * sizeof *w);
  memset(probs, 0, (size_t)n * sizeof *probs);
  for (int64_t i = 0; i < k; i++) probs[idx[i]] = (float)(w[i] / sum);
  free(w);
}

/* Inverse CDF in id order; u in [0, 1) scaled by the (unnormalised) total. */
static int32_t draw(const float *w, int64_t n, double u_total) {
  double acc = 0;
  int64_t last = 0;
  for (int64_t i = 0; i < n; i++) {
    if (w[i] <= 0) continue;
    acc += w[i];
    last = i;
    if (u_total < acc) return (int32_t)i;
  }
  return (int32_t)last; /* u landed in the rounding slack past the end */
}

int32_t epic_spec_accept(const float *p, const float *q, int64_t n, int32_t d, double u_accept,
                         double u_resample, int *accepted) {
  double sum = 0, acc = 0;
  int64_t last = -1;
  if (q[d] > 0 && u_accept * (double)q[d] < (double)p[d]) {
    *accepted = 1;
    return d;
  }
  *accepted = 0;
  for (int64_t i = 0; i < n; i++)
    if (p[i] > q[i]) sum += (double)p[i] - (double)q[i];
  if (!(sum > 0)) {
    double tot = 0;
    for (int64_t i = 0; i < n; i++) tot += p[i];
    return draw(p, n, u_resample * tot);
  }
  for (int64_t i = 0; i < n; i++) {
    if (!(p[i] > q[i])) continue;
    acc += (double)p[i] - (double)q[i];
    last = i;
    if (u_resample * sum < acc) return (int32_t)i;
  }
  return (int32_t)last;
}

epic_status epic_spec_create(epic_model *m, epic_kvcache *kc, epic_kvcache *kc_mtp,
                             const epic_spec_params *p, epic_spec **out) {
  epic_spec *s;
  epic_sampler *probe = NULL;
  *out = NULL;
  if (!p || p->size != sizeof *p || !m || !kc) return EPIC_ERR_INVALID;
  if (!epic_model_has_mtp(m) || !kc_mtp) {
    EPIC_LOG_ERROR("spec: MTP drafting needs a model loaded with its MTP layer and an MTP cache");
    return EPIC_ERR_INVALID;
  }
  if (p->n_draft < 1 || p->n_draft > 64) {
    EPIC_LOG_ERROR("spec: n_draft must be in [1, 64] (got %lld)", (long long)p->n_draft);
    return EPIC_ERR_INVALID;
  }
  /* One place validates sampling parameters: the sampler. */
  EPIC_CHECK(epic_sampler_create(&p->sampling, &probe));
  epic_sampler_destroy(probe);
  s = calloc(1, sizeof *s);
  if (!s) return EPIC_ERR_NOMEM;
  const epic_model_config *c = epic_model_get_config(m);
  s->m = m;
  s->kc = kc;
  s->kc_mtp = kc_mtp;
  s->p = *p;
  s->k = p->n_draft;
  s->V = c->vocab_size;
  s->D = c->hidden_size;
  s->greedy = p->sampling.temperature == 0.0f || p->sampling.top_k == 1;
  s->rng = p->sampling.seed ^ 0x6d74702d73706563ull; /* differs from the sampler's stream */
  const size_t V = (size_t)s->V, D = (size_t)s->D, K = (size_t)s->k;
  s->mlog = malloc(V * sizeof(float));
  s->vlog = malloc((K + 1) * V * sizeof(float));
  s->vh = malloc((K + 1) * D * sizeof(float));
  s->vtok = malloc((K + 1) * sizeof(int32_t));
  s->vout = malloc((K + 1) * sizeof(int32_t));
  s->hdraft = malloc(2 * D * sizeof(float));
  if (!s->greedy) {
    s->q = malloc(K * V * sizeof(float));
    s->pdist = malloc(V * sizeof(float));
    s->idx = malloc(V * sizeof(int32_t));
  }
  if (!s->mlog || !s->vlog || !s->vh || !s->vtok || !s->vout || !s->hdraft ||
      (!s->greedy && (!s->q || !s->pdist || !s->idx))) {
    epic_spec_destroy(s);
    return EPIC_ERR_NOMEM;
  }
  *out = s;
  return EPIC_OK;
}

void epic_spec_destroy(epic_spec *s) {
  if (!s) return;
  epic_kvcache_seq_release(s->kc_mtp, &s->mseq);
  free(s->pend_h);
  free(s->pend_t);
  free(s->mlog);
  free(s->q);
  free(s->pdist);
  free(s->idx);
  free(s->vlog);
  free(s->vh);
  free(s->vtok);
  free(s->vout);
  free(s->hdraft);
  free(s);
}

static epic_status pend_reserve(epic_spec *s, int64_t rows) {
  if (rows <= s->pend_cap) return EPIC_OK;
  int64_t cap = s->pend_cap ? s->pend_cap : 16;
  while (cap < rows) cap *= 2;
  float *h = realloc(s->pend_h, (size_t)(cap * s->D) * sizeof *h);
  if (!h) return EPIC_ERR_NOMEM;
  s->pend_h = h;
  int32_t *t = realloc(s->pend_t, (size_t)cap * sizeof *t);
  if (!t) return EPIC_ERR_NOMEM;
  s->pend_t = t;
  s->pend_cap = cap;
  return EPIC_OK;
}

/* Queue hidden rows whose next tokens are next[0..n_next), n_next = n_rows or
 * n_rows - 1; the rows before must all be complete. */
static epic_status push_rows(epic_spec *s, const float *hidden, int64_t n_rows, const int32_t *next,
                             int64_t n_next) {
  if (s->pend_next != s->pend_rows) {
    EPIC_LOG_ERROR("spec: new rows while row %lld still waits for its next token",
                   (long long)(s->mseq.n_tokens + s->pend_rows - 1));
    return EPIC_ERR_INVALID;
  }
  EPIC_CHECK(pend_reserve(s, s->pend_rows + n_rows));
  memcpy(s->pend_h + s->pend_rows * s->D, hidden, (size_t)(n_rows * s->D) * sizeof(float));
  memcpy(s->pend_t + s->pend_rows, next, (size_t)n_next * sizeof(int32_t));
  s->pend_rows += n_rows;
  s->pend_next += n_next;
  return EPIC_OK;
}

/* Forget rows >= n, keeping their pages (see the header: reservations). */
static void rewind_rows(epic_kv_seq *kv, int64_t n) {
  if (n < kv->n_tokens) kv->n_tokens = n;
}

epic_status epic_spec_feed_next(epic_spec *s, int32_t tok) {
  if (s->in_round || s->pend_next != s->pend_rows - 1) {
    EPIC_LOG_ERROR("spec: a next token without a row waiting for it");
    return EPIC_ERR_INVALID;
  }
  s->pend_t[s->pend_next++] = tok;
  return EPIC_OK;
}

epic_status epic_spec_feed(epic_spec *s, const int32_t *tokens, const float *hidden,
                           int64_t n_rows) {
  if (s->in_round || n_rows < 1) return EPIC_ERR_INVALID;
  if (s->pend_next == s->pend_rows - 1) EPIC_CHECK(epic_spec_feed_next(s, tokens[0]));
  return push_rows(s, hidden, n_rows, tokens + 1, n_rows - 1);
}

epic_status epic_spec_reserve(epic_spec *s, int64_t n_tokens) {
  return epic_kvcache_seq_reserve(s->kc_mtp, &s->mseq, n_tokens);
}

epic_status epic_spec_set_drafts(epic_spec *s, int64_t kd) {
  if (kd < 0 || kd > s->k || s->in_round) {
    EPIC_LOG_ERROR("spec: %lld drafts asked, at most %lld per round", (long long)kd, (long long)s->k);
    return EPIC_ERR_INVALID;
  }
  s->kd = kd;
  s->n_drafts = 0;
  return EPIC_OK;
}

/* Call c's MTP block output when call c + 1 drafts from it (NULL otherwise). */
static float *draft_out(epic_spec *s, int64_t call) {
  return call + 1 < s->kd ? s->hdraft + (call % 2) * s->D : NULL;
}

int epic_spec_mtp_input(epic_spec *s, int64_t call, epic_seq_batch *b) {
  if (call == 0) {
    if (s->pend_next == 0) return 0;
    /* The last pending pair (newest verified hidden row, `last`) drafts d_1; its
     * block output is the hidden state that drafts d_2. */
    *b = (epic_seq_batch){.tokens = s->pend_t,
                          .n_tokens = s->pend_next,
                          .start = s->mseq.n_tokens,
                          .kv = &s->mseq,
                          .hidden = s->pend_h,
                          .mtp_out = draft_out(s, 0)};
    return 1;
  }
  if (call >= s->kd || s->n_drafts != call) return 0;
  /* d_call at the next position, paired with the block output of the call
   * that drafted it: the MTP layer applied to its own output. */
  *b = (epic_seq_batch){.tokens = &s->vtok[call],
                        .n_tokens = 1,
                        .start = s->mseq.n_tokens,
                        .kv = &s->mseq,
                        .hidden = s->hdraft + ((call - 1) % 2) * s->D,
                        .mtp_out = draft_out(s, call)};
  return 1;
}

int epic_spec_greedy(const epic_spec *s) { return s->greedy; }

/* row: the MTP logits row; pick: its backend pick (greedy specs may pass it
 * instead of the row). */
static void mtp_output(epic_spec *s, int64_t call, const float *row, const epic_row_pick *pick) {
  if (call == 0) {
    const int64_t n = s->pend_next;
    s->pend_rows -= n;
    memmove(s->pend_h, s->pend_h + n * s->D, (size_t)(s->pend_rows * s->D) * sizeof(float));
    memmove(s->pend_t, s->pend_t + n, (size_t)s->pend_rows * sizeof(int32_t));
    s->pend_next = 0;
    s->mtp_keep = s->mseq.n_tokens;
  }
  if (call >= s->kd || s->n_drafts != call) return;
  if (s->greedy) {
    s->vtok[call + 1] = pick ? pick->id : epic_argmax(row, s->V);
  } else {
    float *q = s->q + call * s->V;
    epic_spec_probs(row, s->V, &s->p.sampling, s->idx, q);
    s->vtok[call + 1] = draw(q, s->V, next_unit(s));
  }
  s->n_drafts = call + 1;
}

void epic_spec_mtp_output(epic_spec *s, int64_t call, const float *row) {
  mtp_output(s, call, row, NULL);
}

epic_status epic_spec_mtp_output_pick(epic_spec *s, int64_t call, const epic_row_pick *pick) {
  if (!s->greedy) {
    EPIC_LOG_ERROR("spec: a sampled draft needs the MTP logits row, not a pick");
    return EPIC_ERR_INVALID;
  }
  mtp_output(s, call, NULL, pick);
  return EPIC_OK;
}

const int32_t *epic_spec_drafts(const epic_spec *s, int64_t *n) {
  *n = s->n_drafts;
  return s->vtok + 1;
}

/* Acceptance over logits rows, or for a greedy spec over the rows' picks. */
static epic_status verify(epic_spec *s, const int32_t *drafts, int64_t kd, const float *rows,
                          const epic_row_pick *picks, int32_t *out, float *logprobs,
                          int64_t *n_out) {
  const int64_t V = s->V;
  int64_t m = 0;
  int32_t tok = 0;
  *n_out = 0;
  if (s->in_round || kd < 0 || kd > s->n_drafts) {
    EPIC_LOG_ERROR("spec: verify of %lld drafts, %lld were made", (long long)kd,
                   (long long)s->n_drafts);
    return EPIC_ERR_INVALID;
  }
  for (int64_t i = 0; i < kd; i++)
    if (drafts[i] != s->vtok[i + 1]) {
      EPIC_LOG_ERROR("spec: draft %lld is %d, the MTP layer drafted %d", (long long)i,
                     (int)drafts[i], (int)s->vtok[i + 1]);
      return EPIC_ERR_INVALID;
    }
  /* Accept drafts while the main model agrees; the row at the first
   * disagreement (or after the last draft) gives one more token. */
  for (;;) {
    const float *row = rows ? rows + m * V : NULL;
    if (s->greedy) {
      tok = picks ? picks[m].id : epic_argmax(row, V);
      if (m < kd && tok == s->vtok[m + 1]) {
        s->vout[m++] = tok;
        continue;
      }
    } else {
      epic_spec_probs(row, V, &s->p.sampling, s->idx, s->pdist);
      if (m < kd) {
        int acc = 0;
        double u1 = next_unit(s), u2 = next_unit(s);
        tok = epic_spec_accept(s->pdist, s->q + m * V, V, s->vtok[m + 1], u1, u2, &acc);
        if (acc) {
          s->vout[m++] = tok;
          continue;
        }
      } else {
        tok = draw(s->pdist, V, next_unit(s));
      }
    }
    break;
  }
  s->vout[m] = tok;
  for (int64_t i = 0; i <= m; i++) {
    out[i] = s->vout[i];
    if (logprobs)
      logprobs[i] = picks ? picks[i].logprob : (float)epic_logprob_at(rows + i * V, V, s->vout[i]);
  }
  if (kd > 0) {
    s->stats.rounds++;
    s->stats.drafted += kd;
    s->stats.accepted += m;
  }
  s->in_round = 1;
  s->round_kd = kd;
  s->round_out = m + 1;
  s->n_drafts = 0; /* used up: the next round drafts anew */
  *n_out = m + 1;
  return EPIC_OK;
}

epic_status epic_spec_verify(epic_spec *s, const int32_t *drafts, int64_t kd, const float *rows,
                             int32_t *out, float *logprobs, int64_t *n_out) {
  return verify(s, drafts, kd, rows, NULL, out, logprobs, n_out);
}

epic_status epic_spec_verify_picks(epic_spec *s, const int32_t *drafts, int64_t kd,
                                   const epic_row_pick *picks, int32_t *out, float *logprobs,
                                   int64_t *n_out) {
  if (!s->greedy) {
    *n_out = 0;
    EPIC_LOG_ERROR("spec: sampled acceptance needs the logits rows, not picks");
    return EPIC_ERR_INVALID;
  }
  return verify(s, drafts, kd, NULL, picks, out, logprobs, n_out);
}

epic_status epic_spec_keep(epic_spec *s, epic_kv_seq *seq, const float *hidden, int64_t n_keep) {
  const int64_t n = seq->n_tokens - (s->round_kd + 1);
  if (!s->in_round || n_keep < 1 || n_keep > s->round_out || n < 0) {
    EPIC_LOG_ERROR("spec: keeping %lld tokens without a round that produced them",
                   (long long)n_keep);
    return EPIC_ERR_INVALID;
  }
  /* Main rows n.. hold last and the kept drafts; rows past them are rejected
   * or unused drafts. MTP rows past the verified pairs paired drafts with MTP
   * block outputs, not with the main model's hidden states: they are recomputed
   * from the verified rows. */
  rewind_rows(seq, n + n_keep);
  rewind_rows(&s->mseq, s->mtp_keep);
  s->in_round = 0;
  return push_rows(s, hidden, n_keep, s->vout, n_keep);
}

/* Run the MTP calls of one round on this sequence alone. */
static epic_status run_mtp(epic_spec *s, int64_t kd) {
  EPIC_CHECK(epic_spec_set_drafts(s, kd));
  for (int64_t c = 0; c < (kd > 1 ? kd : 1); c++) {
    epic_seq_batch b;
    if (!epic_spec_mtp_input(s, c, &b)) continue;
    if (s->p.before_forward) EPIC_CHECK(s->p.before_forward(s->p.user, 1));
    EPIC_CHECK(epic_model_mtp_forward(s->m, s->kc_mtp, &b, 1, s->mlog));
    epic_spec_mtp_output(s, c, s->mlog);
  }
  return EPIC_OK;
}

epic_status epic_spec_observe(epic_spec *s, const float *hidden, int64_t n_rows, const int32_t *next,
                              int64_t n_next) {
  if (s->in_round || n_rows < 1 || (n_next != n_rows && n_next != n_rows - 1)) {
    EPIC_LOG_ERROR("spec: observe needs hidden rows whose earlier rows all have a next token "
                   "(n_rows %lld, n_next %lld)", (long long)n_rows, (long long)n_next);
    return EPIC_ERR_INVALID;
  }
  EPIC_CHECK(push_rows(s, hidden, n_rows, next, n_next));
  return run_mtp(s, 0);
}

epic_status epic_spec_draft_verify(epic_spec *s, epic_kv_seq *seq, int32_t last, int64_t max_out,
                                   int32_t *out, float *logprobs, int64_t *n_out) {
  const int64_t n = seq->n_tokens;
  int64_t kd = s->k < max_out - 1 ? s->k : max_out - 1, nd = 0;
  *n_out = 0;
  if (s->in_round || max_out < 1 || s->pend_rows < 1 ||
      s->mseq.n_tokens + s->pend_rows != n) {
    EPIC_LOG_ERROR("spec: draft_verify out of order (main cache %lld rows, MTP %lld + %lld pending)",
                   (long long)n, (long long)s->mseq.n_tokens, (long long)s->pend_rows);
    return EPIC_ERR_INVALID;
  }
  if (kd < 0) kd = 0;
  if (s->pend_next == s->pend_rows - 1) EPIC_CHECK(epic_spec_feed_next(s, last));
  s->vtok[0] = last;
  if (kd > 0) EPIC_CHECK(run_mtp(s, kd));
  const int32_t *d = epic_spec_drafts(s, &nd);
  {
    epic_seq_batch b = {.tokens = s->vtok, .n_tokens = nd + 1, .start = n, .kv = seq, .all_logits = 1};
    if (s->p.before_forward) EPIC_CHECK(s->p.before_forward(s->p.user, 0));
    EPIC_CHECK(epic_model_forward(s->m, s->kc, &b, 1, s->vlog, s->vh));
  }
  return epic_spec_verify(s, d, nd, s->vlog, out, logprobs, n_out);
}

const float *epic_spec_verify_logits(const epic_spec *s) { return s->vlog; }

epic_status epic_spec_commit(epic_spec *s, epic_kv_seq *seq, int64_t n_keep) {
  return epic_spec_keep(s, seq, s->vh, n_keep);
}

void epic_spec_get_stats(const epic_spec *s, epic_spec_stats *out) { *out = s->stats; }

int64_t epic_spec_mtp_tokens(const epic_spec *s) { return s->mseq.n_tokens; }
