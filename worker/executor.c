#include "executor.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../common/log.h"
#include "sampler.h"
#include "spec.h"

typedef struct xseq {
  uint64_t id;
  epic_kv_seq kv;
  epic_sampler *smp;
  epic_draw_params draw; /* this step's draw (SAMPLE entries of a sampled sequence) */
  int decoding; /* its prompt ended (a SAMPLE entry ran): no more publishing */
  int top_n;    /* alternatives its samples report (epic_step_new.top_logprobs) */
  epic_spec *spec; /* MTP drafting state (MTP entries), else NULL */
} xseq;

struct epic_executor {
  epic_model *m;
  epic_kvcache *kc, *kc_mtp;
  int rank, lockstep;
  int64_t V, D, mtp_draft;
  /* Sequence table: open addressing with linear probing (ids are arbitrary
   * 64-bit values and a step looks up every entry, so a linear scan would make
   * each step quadratic in the batch). */
  xseq **slots;
  size_t cap, n;
  /* Per-step scratch, grown as needed. */
  epic_seq_batch *batch;
  xseq **bseq;
  const epic_step_entry **bent;
  size_t bcap;
  float *logits;
  uint8_t *need;        /* per logits row: the sampler needs the whole row */
  epic_row_pick *picks; /* per logits row: greedy pick made on the backend */
  size_t lrows;
  /* MTP: hidden rows of the forward, the MTP calls' batch and logits. */
  float *hidden, *mlogits;
  uint8_t *mneed;        /* per MTP row: a sampled draft needs the whole row */
  epic_row_pick *mpicks; /* per MTP row: greedy draft picked on the backend */
  size_t hrows, mcap;
  epic_seq_batch *mbatch;
  xseq **mseq;
  int64_t *brow;  /* first output row of batch entry i */
  int64_t *bnout; /* tokens batch entry i produced (SAMPLE) */
  int32_t *blast; /* the last of them */
  /* The step's top-logprob jobs (row_work): rows, sample slots and how many, written to
   * top[slot * top_n ..]. */
  int64_t *trow, *tk, n_tops;
  int *twant;
  epic_step_sample *top;
  int top_n;
  int n_threads; /* top-logprob threads (epic_executor_params.sampler_threads, resolved) */
};

static size_t hash_id(uint64_t x) { /* splitmix64 finaliser: ids are often sequential */
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return (size_t)x;
}

static size_t find_slot(const epic_executor *x, uint64_t id) {
  size_t i = hash_id(id) & (x->cap - 1);
  while (x->slots[i] && x->slots[i]->id != id)
    i = (i + 1) & (x->cap - 1);
  return i;
}

static xseq *lookup(const epic_executor *x, uint64_t id) {
  return x->slots[find_slot(x, id)];
}

static epic_status grow_table(epic_executor *x) {
  size_t cap = x->cap * 2;
  xseq **old = x->slots, **ns = calloc(cap, sizeof *ns);
  size_t oldcap = x->cap;
  if (!ns)
    return EPIC_ERR_NOMEM;
  x->slots = ns;
  x->cap = cap;
  for (size_t i = 0; i < oldcap; i++)
    if (old[i])
      x->slots[find_slot(x, old[i]->id)] = old[i];
  free(old);
  return EPIC_OK;
}

static epic_status insert(epic_executor *x, xseq *s) {
  if (2 * (x->n + 1) > x->cap)
    EPIC_CHECK(grow_table(x));
  x->slots[find_slot(x, s->id)] = s;
  x->n++;
  return EPIC_OK;
}

/* Backward-shift deletion keeps every probe chain unbroken without tombstones. */
static void erase(epic_executor *x, uint64_t id) {
  size_t i = find_slot(x, id), mask = x->cap - 1;
  if (!x->slots[i])
    return;
  x->slots[i] = NULL;
  x->n--;
  for (size_t j = (i + 1) & mask; x->slots[j]; j = (j + 1) & mask) {
    size_t home = hash_id(x->slots[j]->id) & mask;
    /* Move slot j into the hole when its home does not lie cyclically in (i, j]. */
    if ((j > i && (home <= i || home > j)) || (j < i && home <= i && home > j)) {
      x->slots[i] = x->slots[j];
      x->slots[j] = NULL;
      i = j;
    }
  }
}

static void free_seq(epic_executor *x, xseq *s) {
  epic_spec_destroy(s->spec);
  epic_kvcache_seq_release(x->kc, &s->kv);
  epic_sampler_destroy(s->smp);
  free(s);
}

epic_status epic_executor_create(const epic_executor_params *p, epic_executor **out) {
  epic_executor *x;
  *out = NULL;
  if (!p || p->size != sizeof *p || !p->model || !p->kc || p->rank < 0) {
    EPIC_LOG_ERROR("executor: invalid parameters (model, kc and rank are required)");
    return EPIC_ERR_INVALID;
  }
  x = calloc(1, sizeof *x);
  if (!x)
    return EPIC_ERR_NOMEM;
  x->m = p->model;
  x->kc = p->kc;
  x->rank = p->rank;
  x->lockstep = p->lockstep;
  x->V = epic_model_get_config(p->model)->vocab_size;
  x->D = epic_model_get_config(p->model)->hidden_size;
  x->kc_mtp = p->kc_mtp;
  x->mtp_draft = p->mtp_draft;
  x->n_threads = p->sampler_threads;
  if (x->n_threads <= 0) {
    const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    x->n_threads = cpus < 1 ? 1 : cpus > 8 ? 8 : (int)cpus;
  }
  if (p->kc_mtp && (p->mtp_draft < 1 || p->mtp_draft > EPIC_STEP_MAX_DRAFT ||
                    !epic_model_has_mtp(p->model))) {
    EPIC_LOG_ERROR("executor: an MTP cache needs a model with its MTP layer and mtp_draft in "
                   "[1, %d] (got %lld)", EPIC_STEP_MAX_DRAFT, (long long)p->mtp_draft);
    free(x);
    return EPIC_ERR_INVALID;
  }
  x->cap = 64;
  x->slots = calloc(x->cap, sizeof *x->slots);
  if (!x->slots) {
    free(x);
    return EPIC_ERR_NOMEM;
  }
  *out = x;
  return EPIC_OK;
}

void epic_executor_destroy(epic_executor *x) {
  if (!x)
    return;
  for (size_t i = 0; i < x->cap; i++)
    if (x->slots[i])
      free_seq(x, x->slots[i]);
  free(x->slots);
  free(x->batch);
  free(x->bseq);
  free(x->bent);
  free(x->logits);
  free(x->need);
  free(x->picks);
  free(x->hidden);
  free(x->mneed);
  free(x->mpicks);
  free(x->mlogits);
  free(x->mbatch);
  free(x->mseq);
  free(x->brow);
  free(x->bnout);
  free(x->blast);
  free(x->trow);
  free(x->tk);
  free(x->twant);
  free(x);
}

int64_t epic_executor_sequences(const epic_executor *x) {
  return (int64_t)x->n;
}

/* realloc of the array at *pp (a T ** passed as void *) to n elements of elem
 * bytes: 1 on success; on failure the old array stays and 0 is returned. */
static int resize(void *pp, size_t n, size_t elem) {
  void **p = pp;
  void *q = realloc(*p, n * elem);
  if (!q)
    return 0;
  *p = q;
  return 1;
}

/* Capacity for n: doubling from 16. */
static size_t grown(size_t cap, size_t n) {
  cap = cap ? cap : 16;
  while (cap < n)
    cap *= 2;
  return cap;
}

static epic_status reserve_scratch(epic_executor *x, size_t n) {
  if (n <= x->bcap)
    return EPIC_OK;
  const size_t cap = grown(x->bcap, n);
  if (!resize(&x->batch, cap, sizeof *x->batch) || !resize(&x->bseq, cap, sizeof *x->bseq) ||
      !resize(&x->bent, cap, sizeof *x->bent) || !resize(&x->brow, cap, sizeof *x->brow) ||
      !resize(&x->bnout, cap, sizeof *x->bnout) || !resize(&x->blast, cap, sizeof *x->blast))
    return EPIC_ERR_NOMEM;
  x->bcap = cap;
  return EPIC_OK;
}

/* Per output row of the forward (MTP entries have a row per token): logits,
 * picks, and hidden rows when MTP entries need them. */
static epic_status reserve_rows(epic_executor *x, size_t n, int hidden) {
  if (hidden && n > x->hrows) {
    if (!resize(&x->hidden, n, (size_t)x->D * sizeof *x->hidden))
      return EPIC_ERR_NOMEM;
    x->hrows = n;
  }
  if (n > x->lrows) {
    if (!resize(&x->logits, n, (size_t)x->V * sizeof *x->logits) ||
        !resize(&x->need, n, sizeof *x->need) || !resize(&x->picks, n, sizeof *x->picks) ||
        !resize(&x->trow, n, sizeof *x->trow) || !resize(&x->tk, n, sizeof *x->tk) ||
        !resize(&x->twant, n, sizeof *x->twant))
      return EPIC_ERR_NOMEM;
    x->lrows = n;
  }
  return EPIC_OK;
}

/* The MTP calls' scratch for n sequences. */
static epic_status reserve_mtp(epic_executor *x, size_t n) {
  if (n <= x->mcap)
    return EPIC_OK;
  const size_t cap = grown(x->mcap, n);
  if (!resize(&x->mbatch, cap, sizeof *x->mbatch) || !resize(&x->mseq, cap, sizeof *x->mseq) ||
      !resize(&x->mlogits, cap, (size_t)x->V * sizeof *x->mlogits) ||
      !resize(&x->mneed, cap, sizeof *x->mneed) || !resize(&x->mpicks, cap, sizeof *x->mpicks))
    return EPIC_ERR_NOMEM;
  x->mcap = cap;
  return EPIC_OK;
}

static epic_status create_seq(epic_executor *x, const epic_step_entry *e, const epic_step_new *nw,
                              const epic_executor_prefix *pf, xseq **out) {
  epic_sampling_params sp = {.size = sizeof sp,
                             .temperature = nw->temperature,
                             .top_p = nw->top_p,
                             .top_k = nw->top_k,
                             .seed = nw->seed};
  xseq *s;
  epic_status st;
  if (lookup(x, e->seq)) {
    EPIC_LOG_ERROR("executor rank %d: step creates sequence %llu, which exists", x->rank,
                   (unsigned long long)e->seq);
    return EPIC_ERR_INVALID;
  }
  s = calloc(1, sizeof *s);
  if (!s)
    return EPIC_ERR_NOMEM;
  s->id = e->seq;
  s->top_n = nw->top_logprobs;
  st = epic_sampler_create(&sp, &s->smp);
  if (st == EPIC_OK && pf && pf->page >= 0) {
    if (pf->n_pages < 1 || e->start != 0) {
      EPIC_LOG_ERROR("executor rank %d: new sequence %llu: bad cached prefix (%d pages, start %lld)",
                     x->rank, (unsigned long long)e->seq, (int)pf->n_pages, (long long)e->start);
      st = EPIC_ERR_INVALID;
    } else {
      st = epic_kvcache_seq_attach(x->kc, &s->kv, pf->page, pf->key, pf->n_pages);
    }
  }
  if (st == EPIC_OK) {
    /* The coordinator admitted the sequence against this rank's free pages: the
     * whole reservation is taken now so that it can never run out mid-way. */
    st = epic_kvcache_seq_reserve(x->kc, &s->kv, nw->reserve_tokens);
    if (st == EPIC_ERR_NOMEM)
      EPIC_LOG_ERROR(
          "executor rank %d: KV cache cannot hold sequence %llu (%lld pages needed, %lld free)",
          x->rank, (unsigned long long)e->seq,
          (long long)epic_kvcache_pages_for(x->kc, nw->reserve_tokens),
          (long long)epic_kvcache_free_pages(x->kc));
  }
  if (st == EPIC_OK && (e->flags & EPIC_STEP_MTP)) {
    epic_spec_params spp = {.size = sizeof spp, .n_draft = x->mtp_draft, .sampling = sp};
    if (!x->kc_mtp) {
      EPIC_LOG_ERROR("executor rank %d: sequence %llu drafts, but the engine has no MTP cache",
                     x->rank, (unsigned long long)e->seq);
      st = EPIC_ERR_INVALID;
    } else {
      st = epic_spec_create(x->m, x->kc, x->kc_mtp, &spp, &s->spec);
    }
    if (st == EPIC_OK) {
      st = epic_spec_reserve(s->spec, nw->reserve_tokens);
      if (st == EPIC_ERR_NOMEM)
        EPIC_LOG_ERROR("executor rank %d: MTP cache cannot hold sequence %llu (%lld rows)", x->rank,
                       (unsigned long long)e->seq, (long long)nw->reserve_tokens);
    }
  }
  if (st == EPIC_OK)
    st = insert(x, s);
  if (st != EPIC_OK) {
    free_seq(x, s);
    return st;
  }
  *out = s;
  return EPIC_OK;
}

/* Releases, creations and the batch of this rank's entries; *rows: the
 * forward's output rows, *mtp: some entry needs hidden rows. */
static epic_status prepare(epic_executor *x, const epic_step_plan *p,
                           const epic_executor_prefix *prefix, size_t *nb, int64_t *rows,
                           int *mtp) {
  const int32_t *tok = p->tokens;
  *nb = 0;
  *rows = 0;
  *mtp = 0;
  for (uint32_t i = 0; i < p->h.n_entries; i++) {
    const epic_step_entry *e = &p->entries[i];
    const int32_t *t = tok;
    tok += e->n_tokens;
    if (e->rank != x->rank)
      continue;
    xseq *s = lookup(x, e->seq);
    if (e->flags & EPIC_STEP_RELEASE) {
      if (!s) {
        EPIC_LOG_ERROR("executor rank %d: step releases unknown sequence %llu", x->rank,
                       (unsigned long long)e->seq);
        return EPIC_ERR_INVALID;
      }
      erase(x, e->seq);
      free_seq(x, s);
      continue;
    }
    if (e->flags & EPIC_STEP_NEW) {
      EPIC_CHECK(create_seq(x, e, &p->news[e->new_index], prefix ? &prefix[e->new_index] : NULL,
                            &s));
    } else if (!s) {
      EPIC_LOG_ERROR("executor rank %d: step names unknown sequence %llu", x->rank,
                     (unsigned long long)e->seq);
      return EPIC_ERR_INVALID;
    }
    if (!(e->flags & EPIC_STEP_MTP) && s->spec) {
      /* Drafting ended for this sequence: its MTP rows are not needed again. */
      epic_spec_destroy(s->spec);
      s->spec = NULL;
    }
    if ((e->flags & EPIC_STEP_MTP) &&
        (!s->spec || epic_step_entry_drafts(e) > x->mtp_draft ||
         s->decoding != ((e->flags & EPIC_STEP_VERIFY) != 0))) {
      EPIC_LOG_ERROR("executor rank %d: sequence %llu: MTP entry without drafting state, with "
                     "%lld drafts (at most %lld), or VERIFY not matching its decoding state",
                     x->rank, (unsigned long long)e->seq, (long long)epic_step_entry_drafts(e),
                     (long long)x->mtp_draft);
      return EPIC_ERR_INVALID;
    }
    /* A NEW entry's start counts after its cached prefix (the plan check
     * wants NEW entries at 0). */
    int64_t start = e->start;
    if ((e->flags & EPIC_STEP_NEW) && prefix && prefix[e->new_index].page >= 0)
      start += s->kv.n_tokens;
    if (start != s->kv.n_tokens) {
      EPIC_LOG_ERROR("executor rank %d: sequence %llu continues at %lld but holds %lld tokens",
                     x->rank, (unsigned long long)e->seq, (long long)start,
                     (long long)s->kv.n_tokens);
      return EPIC_ERR_INVALID;
    }
    EPIC_CHECK(reserve_scratch(x, *nb + 1));
    /* MTP entries need every row's hidden state for the MTP layer; only a VERIFY
     * entry needs every row's logits (its drafts' verification), the others the last
     * row's (the LM head skips the rest: a prompt chunk's would cost as much again). */
    const int all = (e->flags & EPIC_STEP_MTP) != 0;
    x->batch[*nb] = (epic_seq_batch){.tokens = t,
                                     .n_tokens = e->n_tokens,
                                     .start = start,
                                     .kv = &s->kv,
                                     .all_logits = all && (e->flags & EPIC_STEP_VERIFY),
                                     .all_hidden = all};
    x->bseq[*nb] = s;
    x->bent[*nb] = e;
    x->brow[*nb] = *rows;
    *rows += epic_seq_out_rows(&x->batch[*nb]);
    *mtp |= all;
    (*nb)++;
  }
  return EPIC_OK;
}

epic_status epic_executor_step(epic_executor *x, const epic_step_plan *p, epic_step_sample *out) {
  return epic_executor_step_top(x, p, out, 0, NULL);
}

/* After the forward, for this rank's MTP entries: queue their kept rows for the
 * MTP layer (VERIFY: keep the produced tokens, rolling both caches back) and
 * set the drafts each asks for. */
static epic_status spec_rows(epic_executor *x, size_t nb) {
  for (size_t i = 0; i < nb; i++) {
    const epic_step_entry *e = x->bent[i];
    epic_spec *sp = x->bseq[i]->spec;
    if (!(e->flags & EPIC_STEP_MTP))
      continue;
    const float *h = x->hidden + x->brow[i] * x->D;
    if (e->flags & EPIC_STEP_VERIFY) {
      EPIC_CHECK(epic_spec_keep(sp, &x->bseq[i]->kv, h, x->bnout[i]));
    } else {
      EPIC_CHECK(epic_spec_feed(sp, x->batch[i].tokens, h, e->n_tokens));
      if (e->flags & EPIC_STEP_SAMPLE)
        EPIC_CHECK(epic_spec_feed_next(sp, x->blast[i]));
    }
    EPIC_CHECK(epic_spec_set_drafts(sp, epic_step_entry_drafts(e)));
  }
  return EPIC_OK;
}

/* The plan's MTP calls (every rank makes the same number: lock-step), then the
 * drafts into drafts[] in entry order. Runs the calls with no sequences when
 * *st already failed, so peers are not left waiting. */
static epic_status spec_calls(epic_executor *x, const epic_step_plan *p, size_t nb, epic_status st,
                              int32_t *drafts) {
  const int64_t calls = epic_step_plan_mtp_calls(p);
  if (st == EPIC_OK)
    st = reserve_mtp(x, nb);
  for (int64_t c = 0; c < calls; c++) {
    size_t m = 0;
    for (size_t i = 0; st == EPIC_OK && i < nb; i++) {
      epic_spec *sp = x->bseq[i]->spec;
      if ((x->bent[i]->flags & EPIC_STEP_MTP) && epic_spec_mtp_input(sp, c, &x->mbatch[m])) {
        x->mneed[m] = !epic_spec_greedy(sp);
        x->mseq[m++] = x->bseq[i];
      }
    }
    if (m == 0 && !x->lockstep)
      continue;
    epic_status s2 = epic_model_mtp_forward_pick(x->m, x->kc_mtp, m ? x->mbatch : NULL, (int)m,
                                                 m ? x->mlogits : NULL, x->mneed, x->mpicks);
    if (st == EPIC_OK)
      st = s2;
    for (size_t j = 0; st == EPIC_OK && j < m; j++) {
      if (x->mneed[j])
        epic_spec_mtp_output(x->mseq[j]->spec, c, x->mlogits + j * (size_t)x->V);
      else
        st = epic_spec_mtp_output_pick(x->mseq[j]->spec, c, &x->mpicks[j]);
    }
  }
  EPIC_CHECK(st);
  int64_t k = 0;
  for (size_t i = 0; i < nb; i++) {
    const int64_t want = epic_step_entry_drafts(x->bent[i]);
    if (want == 0)
      continue;
    int64_t got = 0;
    const int32_t *d = epic_spec_drafts(x->bseq[i]->spec, &got);
    if (got < want) {
      EPIC_LOG_ERROR("executor rank %d: sequence %llu: %lld of %lld drafts made", x->rank,
                     (unsigned long long)x->bent[i]->seq, (long long)got, (long long)want);
      return EPIC_ERR_INVALID;
    }
    memcpy(drafts + k, d, (size_t)want * sizeof *d);
    k += want;
  }
  return EPIC_OK;
}

/* A row's log-normaliser from its greedy pick (logprob = l[best] - lse), which the backend
 * computes for every row: the top logprobs then need no pass of exponentials over the
 * row. */
static double row_lse(const epic_executor *x, int64_t row) {
  const epic_row_pick *pk = &x->picks[row];
  return (double)x->logits[row * x->V + pk->id] - (double)pk->logprob;
}

/* The step's top-logprob jobs, share `first` of `stride`: a row (trow) and its sample slot
 * of the step's output (tk). Every job writes its own slots, so threads do not interact. */
typedef struct row_share {
  epic_executor *x;
  int64_t first, stride;
} row_share;

static void *row_jobs(void *arg) {
  const row_share *d = arg;
  epic_executor *x = d->x;
  for (int64_t j = d->first; j < x->n_tops; j += d->stride) {
    int32_t ids[64];
    float lps[64];
    epic_step_sample *t = x->top + x->tk[j] * x->top_n;
    const int got = epic_top_logprobs_lse(x->logits + x->trow[j] * x->V, x->V, x->twant[j],
                                          row_lse(x, x->trow[j]), ids, lps);
    for (int k = 0; k < x->top_n; k++)
      t[k] = k < got ? (epic_step_sample){.id = ids[k], .logprob = lps[k]}
                     : (epic_step_sample){.id = -1, .logprob = 0};
  }
  return NULL;
}

/* With top_n > 0, the top logprobs of every row a sample may report (a VERIFY entry's rows
 * past its accepted ones are overwritten later), on up to n_threads threads, before the
 * samples are assembled in entry order. (Draws are the backend's: epic_seq_batch.draw.) */
static void row_work(epic_executor *x, size_t nb, int top_n, epic_step_sample *top) {
  enum { MAX_THREADS = 64 };
  int64_t k = 0;
  x->n_tops = 0;
  x->top = top;
  x->top_n = top_n;
  for (size_t i = 0; i < nb; i++) {
    const epic_step_entry *e = x->bent[i];
    if (!(e->flags & EPIC_STEP_SAMPLE))
      continue;
    const int64_t row = x->brow[i] + epic_seq_out_rows(&x->batch[i]) - 1;
    const int64_t slots = epic_step_entry_samples(e);
    const int64_t rows = (e->flags & EPIC_STEP_VERIFY) ? x->batch[i].n_tokens : 1;
    const int want = x->bseq[i]->top_n < top_n ? x->bseq[i]->top_n : top_n;
    for (int64_t j = 0; j < slots && j < rows && want > 0; j++) {
      x->trow[x->n_tops] = (e->flags & EPIC_STEP_VERIFY) ? x->brow[i] + j : row;
      x->tk[x->n_tops] = k + j;
      x->twant[x->n_tops++] = want;
    }
    k += slots;
  }
  int64_t t = x->n_tops < x->n_threads ? x->n_tops : x->n_threads;
  t = t > MAX_THREADS ? MAX_THREADS : t < 1 ? 1 : t;
  pthread_t th[MAX_THREADS];
  row_share sh[MAX_THREADS];
  int64_t started = 0;
  for (int64_t s = 0; s < t; s++)
    sh[s] = (row_share){.x = x, .first = s, .stride = t};
  /* shares 1.. on threads (one that cannot start runs here), share 0 here */
  for (int64_t s = 1; s < t; s++) {
    if (pthread_create(&th[started], NULL, row_jobs, &sh[s]) == 0)
      started++;
    else
      row_jobs(&sh[s]);
  }
  row_jobs(&sh[0]);
  for (int64_t s = 0; s < started; s++)
    pthread_join(th[s], NULL);
}

epic_status epic_executor_step_top(epic_executor *x, const epic_step_plan *p, epic_step_sample *out,
                                   int top_n, epic_step_sample *top) {
  return epic_executor_step_prefix(x, p, NULL, out, top_n, top, NULL);
}

epic_status epic_executor_step_prefix(epic_executor *x, const epic_step_plan *p,
                                      const epic_executor_prefix *prefix, epic_step_sample *out,
                                      int top_n, epic_step_sample *top, int32_t *drafts) {
  size_t nb = 0;
  int64_t rows = 0;
  int mtp = 0;
  epic_status st = prepare(x, p, prefix, &nb, &rows, &mtp);
  if (st == EPIC_OK && (top_n < 0 || top_n > 64 || (top_n > 0 && !top))) {
    /* Reported after the collective forward below, like any local error. */
    EPIC_LOG_ERROR("executor: top_n %d outside [0, 64] or no top buffer", top_n);
    st = EPIC_ERR_INVALID;
  }
  if (st == EPIC_OK && epic_step_plan_drafts(p, x->rank) > 0 && !drafts) {
    EPIC_LOG_ERROR("executor: the plan asks for drafts and there is no drafts buffer");
    st = EPIC_ERR_INVALID;
  }
  if (st == EPIC_OK && nb > 0)
    st = reserve_rows(x, (size_t)rows, mtp);
  if (p->h.n_tokens == 0)
    return st;
  if (st != EPIC_OK || nb == 0) {
    /* Peers are about to enter the forward's all-to-alls: take part with no
     * tokens so they are not left waiting, then report our own error. */
    if (x->lockstep) {
      epic_status st2 = epic_model_forward(x->m, x->kc, NULL, 0, NULL, NULL);
      if (st == EPIC_OK)
        st = st2;
      st = spec_calls(x, p, 0, st, drafts);
    }
    return st;
  }
  /* Samples come back as picks: greedy ones, and draws, which the backend makes where
   * the logits are (a GPU backend then downloads 8 bytes a row); only rows whose top
   * logprobs are asked for need their vocabulary-wide logits row. A VERIFY entry's rows
   * go to the spec's acceptance rule: as picks when it is greedy, else as rows. */
  for (size_t i = 0; i < nb; i++) {
    const epic_step_entry *e = x->bent[i];
    xseq *s = x->bseq[i];
    const int64_t n = epic_seq_out_rows(&x->batch[i]);
    if ((e->flags & EPIC_STEP_SAMPLE) && !(e->flags & EPIC_STEP_VERIFY) &&
        epic_sampler_draw(s->smp, &s->draw))
      x->batch[i].draw = &s->draw;
    for (int64_t j = 0; j < n; j++)
      x->need[x->brow[i] + j] =
          ((e->flags & EPIC_STEP_VERIFY) && (s->top_n > 0 || !epic_spec_greedy(s->spec))) ||
          ((e->flags & EPIC_STEP_SAMPLE) && j == n - 1 && s->top_n > 0);
  }
  EPIC_CHECK(epic_model_forward_pick(x->m, x->kc, x->batch, (int)nb, x->logits, x->need,
                                     x->picks, mtp ? x->hidden : NULL));
  /* The rows are written: prompt pages they complete become shareable. The
   * coordinator's mirror publishes the same pages in the same (entry) order. */
  for (size_t i = 0; st == EPIC_OK && i < nb; i++) {
    xseq *s = x->bseq[i];
    if (s->decoding)
      continue;
    st = epic_kvcache_seq_publish(x->kc, &s->kv, x->batch[i].start, x->batch[i].tokens,
                                  x->batch[i].n_tokens);
    if (x->bent[i]->flags & EPIC_STEP_SAMPLE)
      s->decoding = 1;
  }
  int64_t k = 0;
  if (st == EPIC_OK)
    row_work(x, nb, top_n, top);
  for (size_t i = 0; st == EPIC_OK && i < nb; i++) {
    if (!(x->bent[i]->flags & EPIC_STEP_SAMPLE))
      continue;
    const int64_t row = x->brow[i] + epic_seq_out_rows(&x->batch[i]) - 1;
    int64_t n_out = 1;
    int32_t ids_v[EPIC_STEP_MAX_DRAFT + 1];
    float lps_v[EPIC_STEP_MAX_DRAFT + 1];
    if (x->bent[i]->flags & EPIC_STEP_VERIFY) {
      /* Drafts tokens[1..n) against the rows of [last, drafts]: 1..n tokens. */
      if (x->need[x->brow[i]])
        st = epic_spec_verify(x->bseq[i]->spec, x->batch[i].tokens + 1, x->bent[i]->n_tokens - 1,
                              x->logits + x->brow[i] * x->V, ids_v, lps_v, &n_out);
      else
        st = epic_spec_verify_picks(x->bseq[i]->spec, x->batch[i].tokens + 1,
                                    x->bent[i]->n_tokens - 1, x->picks + x->brow[i], ids_v,
                                    lps_v, &n_out);
      if (st != EPIC_OK)
        break;
    } else { /* the greedy pick, or the draw made in its place */
      ids_v[0] = x->picks[row].id;
      lps_v[0] = x->picks[row].logprob;
    }
    const int64_t slots = epic_step_entry_samples(x->bent[i]);
    /* Only a sequence that asked gets alternatives: its rows were downloaded. */
    const int want = x->bseq[i]->top_n < top_n ? x->bseq[i]->top_n : top_n;
    for (int64_t j = 0; j < slots; j++, k++) {
      if (top_n > 0 && !(j < n_out && want > 0)) /* else row_work wrote them */
        for (int t = 0; t < top_n; t++)
          top[k * top_n + t] = (epic_step_sample){.id = -1, .logprob = 0};
      out[k] = j < n_out ? (epic_step_sample){.id = ids_v[j], .logprob = lps_v[j]}
                         : (epic_step_sample){.id = -1, .logprob = 0};
    }
    x->bnout[i] = n_out;
    x->blast[i] = ids_v[n_out - 1];
  }
  if (st == EPIC_OK && mtp)
    st = spec_rows(x, nb);
  /* Without MTP entries anywhere the plan has no MTP calls. */
  return spec_calls(x, p, st == EPIC_OK ? nb : 0, st, drafts);
}
