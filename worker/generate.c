#define _GNU_SOURCE
#include "generate.h"

#include <stdlib.h>
#include <string.h>

#include "../comm/comm.h"
#include "../common/clock.h"
#include "../common/log.h"
#include "spec.h"

/* Step announcements of an expert-parallel generate (rank 0 -> all). */
enum { STEP_STOP = 0, STEP_FORWARD = 1, STEP_MTP = 2 };

static epic_status announce(epic_comm *comm, int32_t op) {
  return comm ? epic_comm_bcast(comm, &op, sizeof op, 0) : EPIC_OK;
}

epic_status epic_generate_release(epic_comm *comm) { return announce(comm, STEP_STOP); }

epic_status epic_generate_follow(epic_model *m, epic_comm *comm) {
  for (;;) {
    int32_t op = STEP_STOP;
    EPIC_CHECK(epic_comm_bcast(comm, &op, sizeof op, 0));
    if (op == STEP_STOP) return EPIC_OK;
    if (op == STEP_FORWARD)
      EPIC_CHECK(epic_model_forward(m, NULL, NULL, 0, NULL, NULL));
    else if (op == STEP_MTP)
      EPIC_CHECK(epic_model_mtp_forward(m, NULL, NULL, 0, NULL));
    else
      return EPIC_ERR_COMM;
  }
}

/* MTP logits over the prompt: row i from the main model's final-normed hidden
 * state at position i and the embedding of prompt token i+1. */
static epic_status dump_mtp(epic_model *m, epic_kvcache *kc_mtp, const epic_generate_params *p,
                            const float *hidden) {
  const int64_t V = epic_model_get_config(m)->vocab_size, T = p->n_prompt;
  epic_kv_seq seq = {0};
  epic_status st;
  float *logits;
  if (T < 2) return EPIC_OK; /* no rows: the header still records shape (0, vocab) */
  logits = malloc((size_t)((T - 1) * V) * sizeof(float));
  if (!logits) return EPIC_ERR_NOMEM;
  epic_seq_batch b = {.tokens = p->prompt + 1,
                      .n_tokens = T - 1,
                      .start = 0,
                      .kv = &seq,
                      .all_logits = 1,
                      .hidden = hidden};
  st = announce(p->comm, STEP_MTP);
  if (st == EPIC_OK) st = epic_model_mtp_forward(m, kc_mtp, &b, 1, logits);
  if (st == EPIC_OK) st = epic_npy_writer_append(p->dump_mtp_logits, logits, T - 1);
  epic_kvcache_seq_release(kc_mtp, &seq);
  free(logits);
  return st;
}

static epic_status spec_announce(void *user, int mtp) {
  return announce(user, mtp ? STEP_MTP : STEP_FORWARD);
}

/* Hands a token to the caller; *stop when generation ends with it. */
static epic_status emit(const epic_generate_params *p, const epic_model_config *c,
                        epic_generate_result *r, int32_t tok, float lp, int *stop) {
  r->ids[r->n_ids++] = tok;
  if (p->on_token) EPIC_CHECK(p->on_token(p->user, tok, lp));
  if (!p->ignore_eos && epic_config_is_eos(c, tok)) {
    r->finish = EPIC_FINISH_STOP;
    *stop = 1;
  }
  if (r->n_ids >= p->max_new_tokens) *stop = 1;
  return EPIC_OK;
}

/* Speculative rounds after the first token: each commits the tokens the caller
 * keeps (up to EOS or the token budget), so the caches end as plain decoding's. */
static epic_status spec_decode(epic_model *m, epic_spec *sp, epic_kv_seq *seq, const epic_generate_params *p,
                               epic_generate_result *r, int32_t tok) {
  const epic_model_config *c = epic_model_get_config(m);
  int32_t out[65];
  float lps[65];
  int stop = 0;
  while (!stop) {
    int64_t n_out = 0, keep = 0;
    EPIC_CHECK(epic_spec_draft_verify(sp, seq, tok, p->max_new_tokens - r->n_ids, out, lps, &n_out));
    while (keep < n_out && !stop) {
      EPIC_CHECK(emit(p, c, r, out[keep], lps[keep], &stop));
      keep++;
    }
    /* the rows of the kept tokens: the rows plain decoding dumps for them */
    if (p->dump_logits)
      EPIC_CHECK(epic_npy_writer_append(p->dump_logits, epic_spec_verify_logits(sp), keep));
    EPIC_CHECK(epic_spec_commit(sp, seq, keep));
    tok = out[keep - 1];
  }
  return EPIC_OK;
}

epic_status epic_generate(epic_model *m, epic_kvcache *kc, epic_kvcache *kc_mtp,
                          const epic_generate_params *p, epic_generate_result *r) {
  const epic_model_config *c = epic_model_get_config(m);
  const int64_t V = c->vocab_size, D = c->hidden_size;
  int32_t tok = 0;
  const int want_rows = p->dump_logits != NULL, want_hidden = p->dump_mtp_logits != NULL;
  const int64_t chunk = p->prefill_chunk > 0 ? p->prefill_chunk : p->n_prompt;
  epic_kv_seq seq = {0};
  epic_sampler *smp = NULL;
  epic_spec *sp = NULL;
  float *logits = NULL, *hidden = NULL, *chunk_hidden = NULL, lp = 0;
  epic_status st;
  double t0;
  memset(r, 0, sizeof *r);
  st = EPIC_ERR_INVALID;
  if (p->size != sizeof *p || p->n_prompt < 1 || p->max_new_tokens < 0 || p->mtp_draft < 0) {
    EPIC_LOG_ERROR("generate: need a prompt of at least one token, max_new_tokens >= 0 and mtp_draft >= 0");
    goto done;
  }
  if ((want_hidden || p->mtp_draft > 0) && !kc_mtp) {
    EPIC_LOG_ERROR("generate: %s needs the model's MTP layer and an MTP cache",
                   want_hidden ? "MTP logits" : "MTP drafting");
    goto done;
  }
  EPIC_CHECK_GOTO(epic_sampler_create(&p->sampling, &smp), st, done);
  if (p->mtp_draft > 0) {
    epic_spec_params spp = {.size = sizeof spp,
                            .n_draft = p->mtp_draft,
                            .sampling = p->sampling,
                            .before_forward = p->comm ? spec_announce : NULL,
                            .user = p->comm};
    EPIC_CHECK_GOTO(epic_spec_create(m, kc, kc_mtp, &spp, &sp), st, done);
    if (!want_hidden) chunk_hidden = malloc((size_t)(chunk * D) * sizeof(float));
  }
  r->ids = malloc((size_t)(p->max_new_tokens + 1) * sizeof *r->ids);
  logits = malloc((size_t)((want_rows ? chunk : 1) * V) * sizeof(float));
  if (want_hidden) hidden = malloc((size_t)(p->n_prompt * D) * sizeof(float));
  if (!r->ids || !logits || (want_hidden && !hidden) || (sp && !want_hidden && !chunk_hidden)) {
    st = EPIC_ERR_NOMEM;
    goto done;
  }

  /* Prefill in chunks; every chunk's rows are dumped when asked for. */
  t0 = epic_now_seconds();
  for (int64_t s0 = 0; s0 < p->n_prompt; s0 += chunk) {
    int64_t n = p->n_prompt - s0 < chunk ? p->n_prompt - s0 : chunk;
    epic_seq_batch b = {.tokens = p->prompt + s0,
                        .n_tokens = n,
                        .start = s0,
                        .kv = &seq,
                        .all_logits = want_rows || want_hidden,
                        .all_hidden = sp != NULL};
    float *hid = want_hidden ? hidden + s0 * D : chunk_hidden;
    /* Hidden rows are needed for all prompt positions; logits rows for the dump. */
    float *lg = logits;
    const int rows = epic_seq_out_rows(&b) > 1;
    if (rows && !want_rows) {
      lg = malloc((size_t)(n * V) * sizeof(float));
      if (!lg) {
        st = EPIC_ERR_NOMEM;
        goto done;
      }
    }
    st = announce(p->comm, STEP_FORWARD);
    if (st == EPIC_OK) st = epic_model_forward(m, kc, &b, 1, lg, hid);
    /* The MTP layer's cache follows the prompt chunk by chunk; the last row
     * waits for the first sampled token. */
    if (st == EPIC_OK && sp)
      st = epic_spec_observe(sp, hid, n, p->prompt + s0 + 1, s0 + n < p->n_prompt ? n : n - 1);
    if (st == EPIC_OK && want_rows) st = epic_npy_writer_append(p->dump_logits, lg, n);
    if (st == EPIC_OK && rows)
      memmove(logits, lg + (n - 1) * V, (size_t)V * sizeof(float)); /* keep the last row */
    if (lg != logits) free(lg);
    EPIC_CHECK_GOTO(st, st, done);
  }
  if (want_hidden) EPIC_CHECK_GOTO(dump_mtp(m, kc_mtp, p, hidden), st, done);
  r->prefill_seconds = epic_now_seconds() - t0;

  t0 = epic_now_seconds();
  r->finish = EPIC_FINISH_LENGTH;
  if (sp && p->max_new_tokens > 0) {
    int stop = 0;
    tok = epic_sampler_sample(smp, logits, V, &lp);
    EPIC_CHECK_GOTO(emit(p, c, r, tok, lp, &stop), st, done);
    if (!stop) EPIC_CHECK_GOTO(spec_decode(m, sp, &seq, p, r, tok), st, done);
  }
  /* Without a logits dump a decode step takes the backend's pick, or its draw (the host
   * sampler's token: the same definition and random value): no row to download. */
  const uint8_t need_row = want_rows;
  for (int64_t k = 0; !sp && k < p->max_new_tokens; k++) {
    epic_row_pick pick = {0};
    if (k > 0) {
      epic_draw_params d;
      epic_seq_batch b = {.tokens = &tok, .n_tokens = 1, .start = seq.n_tokens, .kv = &seq};
      if (!need_row && epic_sampler_draw(smp, &d)) b.draw = &d;
      EPIC_CHECK_GOTO(announce(p->comm, STEP_FORWARD), st, done);
      EPIC_CHECK_GOTO(epic_model_forward_pick(m, kc, &b, 1, logits, &need_row, &pick, NULL), st,
                      done);
      if (want_rows) EPIC_CHECK_GOTO(epic_npy_writer_append(p->dump_logits, logits, 1), st, done);
    }
    if (k > 0 && !need_row) {
      tok = pick.id;
      lp = pick.logprob;
    } else {
      tok = epic_sampler_sample(smp, logits, V, &lp);
    }
    r->ids[r->n_ids++] = tok;
    if (p->on_token) EPIC_CHECK_GOTO(p->on_token(p->user, tok, lp), st, done);
    if (!p->ignore_eos && epic_config_is_eos(c, tok)) {
      r->finish = EPIC_FINISH_STOP;
      break;
    }
  }
  r->decode_seconds = epic_now_seconds() - t0;
  r->kv_tokens = seq.n_tokens;
  if (sp) {
    epic_spec_stats ss;
    epic_spec_get_stats(sp, &ss);
    r->mtp_rounds = ss.rounds;
    r->mtp_drafted = ss.drafted;
    r->mtp_accepted = ss.accepted;
    r->mtp_kv_tokens = epic_spec_mtp_tokens(sp);
  }
  st = EPIC_OK;
done:
  if (p->comm) {
    /* Followers wait for the next announcement: always tell them we are done. */
    epic_status st2 = announce(p->comm, STEP_STOP);
    if (st == EPIC_OK) st = st2;
  }
  epic_kvcache_seq_release(kc, &seq);
  epic_spec_destroy(sp);
  epic_sampler_destroy(smp);
  free(logits);
  free(hidden);
  free(chunk_hidden);
  if (st != EPIC_OK) {
    free(r->ids);
    r->ids = NULL;
    r->n_ids = 0;
  }
  return st;
}
