#include "scheduler.h"

#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "worker/kvpages.h"
#include "worker/step_plan.h"

typedef struct sseq {
  uint64_t id;
  void *user;
  const int32_t *prompt; /* borrowed; NULL = no prefix cache for it */
  int32_t *held;         /* its pages in the worker's table (mirror), once NEW went out */
  int64_t n_held;
  int64_t n_chain; /* leading pages that are cached */
  int chain_end;   /* a page could not be published: publish no more */
  int64_t n_prompt, max_new, pages;
  int64_t n_cached; /* tokens the worker holds in its KV cache */
  int64_t n_gen;    /* tokens sampled so far */
  int32_t rank;
  int emitted; /* a worker holds the sequence (its NEW entry went out) */
  int mtp;     /* drafts (counted in its worker's MTP cache) */
  int no_mtp;  /* never drafts (epic_sched_no_draft) */
  int mtp_end; /* stopped drafting; its MTP pages go when an entry without MTP goes out */
  int64_t avail; /* drafts its worker made for the next step */
  int64_t hist_d[EPIC_SCHED_MTP_WINDOW], hist_a[EPIC_SCHED_MTP_WINDOW]; /* ring: drafted, accepted */
  int64_t n_hist;
} sseq;

typedef struct release {
  uint64_t id;
  int32_t rank;
} release;

struct epic_sched {
  epic_sched_params p;
  /* FIFO: live requests are queue[q_head .. q_end). */
  sseq **queue;
  int64_t q_head, q_end, q_cap;
  /* Running sequences in admission order. */
  sseq **run;
  int64_t n_run, run_cap;
  epic_kvpages **mirror; /* per worker: its page table, as the worker keeps it */
  int64_t *pending;      /* per worker: reservations of admitted sequences before NEW */
  int64_t *rank_running, *budget; /* per worker */
  int64_t *mtp_used;              /* per worker: MTP cache pages of drafting sequences */
  int64_t hits, hit_tokens, mtp_stopped;
  release *rel;
  int64_t n_rel, rel_cap;
  epic_sched_entry *entries;
  int64_t e_cap;
};

static epic_status grow(void **arr, int64_t *cap, int64_t need, size_t elem) {
  if (need <= *cap)
    return EPIC_OK;
  int64_t c = *cap ? *cap : 16;
  while (c < need)
    c *= 2;
  void *n = realloc(*arr, (size_t)c * elem);
  if (!n)
    return EPIC_ERR_NOMEM;
  *arr = n;
  *cap = c;
  return EPIC_OK;
}

epic_status epic_sched_create(const epic_sched_params *p, epic_sched **out) {
  epic_sched *s;
  const char *bad = NULL;
  *out = NULL;
  if (!p || p->size != sizeof *p)
    bad = "size";
  else if (p->nranks < 1)
    bad = "nranks";
  else if (p->page_size < 1)
    bad = "page_size";
  else if (p->kv_pages < 1)
    bad = "kv_pages";
  else if (p->max_batch < 1)
    bad = "max_batch";
  else if (p->max_queue < 1)
    bad = "max_queue";
  else if (p->step_tokens < 1 || p->step_tokens > INT32_MAX)
    bad = "step_tokens";
  else if (p->prefill_chunk < 1)
    bad = "prefill_chunk";
  else if (p->prefix_cache_pages < 0)
    bad = "prefix_cache_pages";
  else if (p->mtp_draft < 0 || p->mtp_draft > EPIC_STEP_MAX_DRAFT)
    bad = "mtp_draft";
  if (bad) {
    EPIC_LOG_ERROR("scheduler: invalid parameter %s", bad);
    return EPIC_ERR_INVALID;
  }
  s = calloc(1, sizeof *s);
  if (!s)
    return EPIC_ERR_NOMEM;
  s->p = *p;
  s->mirror = calloc((size_t)p->nranks, sizeof *s->mirror);
  s->pending = calloc((size_t)p->nranks, sizeof *s->pending);
  s->rank_running = calloc((size_t)p->nranks, sizeof *s->rank_running);
  s->budget = calloc((size_t)p->nranks, sizeof *s->budget);
  s->mtp_used = calloc((size_t)p->nranks, sizeof *s->mtp_used);
  if (!s->mirror || !s->pending || !s->rank_running || !s->budget || !s->mtp_used) {
    epic_sched_destroy(s);
    return EPIC_ERR_NOMEM;
  }
  for (int r = 0; r < p->nranks; r++) {
    epic_kvpages_params kp = {.size = sizeof kp,
                              .n_pages = p->kv_pages,
                              .page_size = p->page_size,
                              .cache_pages = p->prefix_cache_pages};
    epic_status st = epic_kvpages_create(&kp, &s->mirror[r]);
    if (st != EPIC_OK) {
      epic_sched_destroy(s);
      return st;
    }
  }
  *out = s;
  return EPIC_OK;
}

void epic_sched_destroy(epic_sched *s) {
  if (!s)
    return;
  for (int64_t i = s->q_head; i < s->q_end; i++)
    free(s->queue[i]);
  for (int64_t i = 0; i < s->n_run; i++) {
    free(s->run[i]->held);
    free(s->run[i]);
  }
  if (s->mirror)
    for (int r = 0; r < s->p.nranks; r++)
      epic_kvpages_destroy(s->mirror[r]);
  free(s->mirror);
  free(s->pending);
  free(s->queue);
  free(s->run);
  free(s->rank_running);
  free(s->budget);
  free(s->mtp_used);
  free(s->rel);
  free(s->entries);
  free(s);
}

int64_t epic_sched_pages_for(const epic_sched *s, int64_t n_prompt, int64_t max_new) {
  return (n_prompt + max_new + s->p.mtp_draft + s->p.page_size - 1) / s->p.page_size;
}

epic_status epic_sched_submit(epic_sched *s, uint64_t id, int64_t n_prompt, int64_t max_new,
                              void *user) {
  return epic_sched_submit_prompt(s, id, NULL, n_prompt, max_new, user);
}

epic_status epic_sched_submit_prompt(epic_sched *s, uint64_t id, const int32_t *prompt,
                                     int64_t n_prompt, int64_t max_new, void *user) {
  sseq *q;
  if (n_prompt < 1 || max_new < 1 || n_prompt > INT64_MAX / 4 || max_new > INT64_MAX / 4) {
    EPIC_LOG_ERROR("scheduler: request %llu: need n_prompt >= 1 and max_new >= 1",
                   (unsigned long long)id);
    return EPIC_ERR_INVALID;
  }
  int64_t pages = epic_sched_pages_for(s, n_prompt, max_new);
  if (pages > s->p.kv_pages) {
    EPIC_LOG_ERROR("scheduler: request %llu needs %lld KV pages (%lld prompt + %lld new tokens), "
                   "a worker has %lld",
                   (unsigned long long)id, (long long)pages, (long long)n_prompt,
                   (long long)max_new, (long long)s->p.kv_pages);
    return EPIC_ERR_INVALID;
  }
  if (s->q_end - s->q_head >= s->p.max_queue)
    return EPIC_ERR_BUSY;
  if (s->q_end == s->q_cap && s->q_head > 0) { /* compact before growing */
    memmove(s->queue, s->queue + s->q_head, (size_t)(s->q_end - s->q_head) * sizeof *s->queue);
    s->q_end -= s->q_head;
    s->q_head = 0;
  }
  EPIC_CHECK(grow((void **)&s->queue, &s->q_cap, s->q_end + 1, sizeof *s->queue));
  q = calloc(1, sizeof *q);
  if (!q)
    return EPIC_ERR_NOMEM;
  *q = (sseq){.id = id,
              .user = user,
              .prompt = prompt,
              .n_prompt = n_prompt,
              .max_new = max_new,
              .pages = pages,
              .rank = -1};
  s->queue[s->q_end++] = q;
  return EPIC_OK;
}

static void *take_running(epic_sched *s, int64_t i) {
  sseq *q = s->run[i];
  void *user = q->user;
  /* The worker unreferences the pages from the last one when it runs the
   * RELEASE entry, before anything else of the next step: do the same now. */
  if (q->emitted)
    while (q->n_held > 0)
      epic_kvpages_unref(s->mirror[q->rank], q->held[--q->n_held]);
  else
    s->pending[q->rank] -= q->pages;
  free(q->held);
  if (q->mtp || q->mtp_end)
    s->mtp_used[q->rank] -= q->pages;
  s->rank_running[q->rank]--;
  /* epic_sched_form keeps room for a release per running sequence, so removing
   * (which cannot fail) never allocates. */
  if (q->emitted)
    s->rel[s->n_rel++] = (release){.id = q->id, .rank = q->rank};
  memmove(s->run + i, s->run + i + 1, (size_t)(s->n_run - i - 1) * sizeof *s->run);
  s->n_run--;
  free(q);
  return user;
}

static void *take_queued(epic_sched *s, int64_t i) {
  sseq *q = s->queue[i];
  void *user = q->user;
  memmove(s->queue + i, s->queue + i + 1, (size_t)(s->q_end - i - 1) * sizeof *s->queue);
  s->q_end--;
  free(q);
  return user;
}

int epic_sched_remove(epic_sched *s, uint64_t id, void **user) {
  void *u = NULL;
  int found = 0;
  for (int64_t i = s->q_head; i < s->q_end && !found; i++)
    if (s->queue[i]->id == id) {
      u = take_queued(s, i);
      found = 1;
    }
  for (int64_t i = 0; i < s->n_run && !found; i++)
    if (s->run[i]->id == id) {
      u = take_running(s, i);
      found = 1;
    }
  if (user)
    *user = u;
  return found;
}

int epic_sched_no_draft(epic_sched *s, uint64_t id) {
  for (int64_t i = s->q_head; i < s->q_end; i++)
    if (s->queue[i]->id == id) {
      s->queue[i]->no_mtp = 1;
      return 1;
    }
  return 0;
}

int epic_sched_pop_any(epic_sched *s, uint64_t *id, void **user) {
  sseq *q = s->q_end > s->q_head ? s->queue[s->q_head] : s->n_run > 0 ? s->run[0] : NULL;
  if (!q)
    return 0;
  if (id)
    *id = q->id;
  return epic_sched_remove(s, q->id, user);
}

static int64_t free_pages(const epic_sched *s, int r) {
  return epic_kvpages_available(s->mirror[r]) - s->pending[r];
}

/* Full prompt pages a hit may cover: the last prompt token is always computed
 * so that its logits exist. */
static int64_t max_hit_pages(const epic_sched *s, const sseq *q) {
  return q->prompt && s->p.prefix_cache_pages > 0 ? (q->n_prompt - 1) / s->p.page_size : 0;
}

/* Among the workers with room for q: the longest cached prefix, then the most
 * free pages, fewer running sequences, the lower rank. -1 when none has room. */
static int pick_rank(const epic_sched *s, const sseq *q) {
  int best = -1;
  int64_t best_hit = -1;
  const int64_t max_hit = max_hit_pages(s, q);
  for (int r = 0; r < s->p.nranks; r++) {
    if (free_pages(s, r) < q->pages ||
        (s->p.mtp_draft > 0 && s->p.kv_pages - s->mtp_used[r] < q->pages))
      continue;
    int64_t hit = max_hit > 0 ? epic_kvpages_match(s->mirror[r], q->prompt, max_hit, NULL) : 0;
    if (best < 0 || hit > best_hit ||
        (hit == best_hit &&
         (free_pages(s, r) > free_pages(s, best) ||
          (free_pages(s, r) == free_pages(s, best) && s->rank_running[r] < s->rank_running[best])))) {
      best = r;
      best_hit = hit;
    }
  }
  return best;
}

/* q's NEW entry goes out: take its cached prefix and the rest of its pages in
 * the worker's table, as the worker is about to. */
static epic_status start_seq(epic_sched *s, sseq *q, epic_sched_entry *e) {
  epic_kvpages *pg = s->mirror[q->rank];
  const int64_t max_hit = max_hit_pages(s, q);
  int64_t hit = 0;
  q->held = malloc((size_t)q->pages * sizeof *q->held);
  if (!q->held)
    return EPIC_ERR_NOMEM;
  if (max_hit > 0)
    hit = epic_kvpages_match(pg, q->prompt, max_hit, q->held);
  for (int64_t i = 0; i < hit; i++)
    epic_kvpages_ref(pg, q->held[i]);
  s->pending[q->rank] -= q->pages;
  /* Cannot fail: the reservation was counted in pending since admission and
   * the hit's idle pages it just referenced are no more than the pages it saves. */
  EPIC_CHECK(epic_kvpages_alloc(pg, q->pages - hit, q->held + hit));
  q->n_held = q->pages;
  q->n_chain = hit;
  q->n_cached = hit * s->p.page_size;
  e->prefix_page = hit > 0 ? q->held[hit - 1] : -1;
  e->prefix_key = hit > 0 ? epic_kvpages_key(pg, q->held[hit - 1]) : 0;
  if (hit > 0) {
    s->hits++;
    s->hit_tokens += q->n_cached;
  }
  return EPIC_OK;
}

static epic_status add_entry(epic_sched *s, epic_sched_step *out, const epic_sched_entry *e) {
  EPIC_CHECK(grow((void **)&s->entries, &s->e_cap, out->n_entries + 1, sizeof *s->entries));
  out->entries = s->entries;
  s->entries[out->n_entries++] = *e;
  out->n_tokens += e->n_tokens;
  return EPIC_OK;
}

/* Drafts a sequence asks for now: k, unless this is its last step. */
static int64_t draft_next(const epic_sched *s, const sseq *q) {
  return q->mtp && q->n_gen + 1 < q->max_new ? s->p.mtp_draft : 0;
}

/* MTP flags of q's entry: MTP, its draft request, and (decode) VERIFY. An
 * entry without MTP of a sequence that stopped drafting frees its MTP pages
 * on the worker, before any later entry of the step could need them. */
static uint32_t mtp_flags(epic_sched *s, sseq *q, int decode, int sample, int64_t *next) {
  *next = 0;
  if (!q->mtp) {
    if (q->mtp_end) {
      s->mtp_used[q->rank] -= q->pages;
      q->mtp_end = 0;
    }
    return 0;
  }
  if (sample)
    *next = draft_next(s, q);
  return EPIC_STEP_MTP | (decode ? (uint32_t)EPIC_STEP_VERIFY : 0u) |
         ((uint32_t)*next << EPIC_STEP_DRAFT_SHIFT);
}

static epic_sched_entry seq_entry(sseq *q, uint32_t flags, int64_t n) {
  return (epic_sched_entry){.id = q->id,
                            .user = q->user,
                            .rank = q->rank,
                            .flags = flags,
                            .start = q->n_cached,
                            .n_tokens = n,
                            .n_prompt = q->n_prompt,
                            .max_new = q->max_new,
                            .prefix_page = -1,
                            .seq_ = q};
}

epic_status epic_sched_form(epic_sched *s, epic_sched_step *out) {
  memset(out, 0, sizeof *out);
  out->entries = s->entries;
  for (int64_t i = 0; i < s->n_rel; i++) {
    epic_sched_entry e = {.id = s->rel[i].id, .rank = s->rel[i].rank, .flags = EPIC_STEP_RELEASE};
    EPIC_CHECK(add_entry(s, out, &e));
  }
  s->n_rel = 0;

  while (s->q_end > s->q_head && s->n_run < s->p.max_batch) {
    sseq *q = s->queue[s->q_head];
    int r = pick_rank(s, q);
    if (r < 0)
      break;
    EPIC_CHECK(grow((void **)&s->run, &s->run_cap, s->n_run + 1, sizeof *s->run));
    EPIC_CHECK(grow((void **)&s->rel, &s->rel_cap, s->n_run + 1, sizeof *s->rel));
    s->q_head++;
    q->rank = r;
    q->mtp = s->p.mtp_draft > 0 && !q->no_mtp;
    if (q->mtp)
      s->mtp_used[r] += q->pages;
    s->pending[r] += q->pages;
    s->rank_running[r]++;
    s->run[s->n_run++] = q;
    out->n_admitted++;
  }
  if (s->q_head == s->q_end)
    s->q_head = s->q_end = 0;

  for (int r = 0; r < s->p.nranks; r++)
    s->budget[r] = s->p.step_tokens;
  /* Decode never exceeds the budget: a sequence enters decode through a prompt
   * chunk that fit next to the decode tokens of its step, so a worker's decoding
   * sequences are at most step_tokens. The budget check only guards that. */
  for (int64_t i = 0; i < s->n_run; i++) {
    sseq *q = s->run[i];
    if (q->n_cached < q->n_prompt || q->n_gen >= q->max_new || s->budget[q->rank] < 1)
      continue;
    const int64_t kd = q->mtp ? q->avail : 0;
    int64_t next;
    const uint32_t mf = mtp_flags(s, q, 1, 1, &next);
    epic_sched_entry e = seq_entry(q, EPIC_STEP_SAMPLE | mf, 1 + kd);
    e.n_drafts = kd;
    e.draft_next = next;
    EPIC_CHECK(add_entry(s, out, &e));
    s->budget[q->rank] -= 1 + kd;
  }
  for (int64_t i = 0; i < s->n_run; i++) {
    sseq *q = s->run[i];
    int64_t n = q->n_prompt - q->n_cached;
    if (n <= 0 || s->budget[q->rank] < 1)
      continue;
    epic_sched_entry pe = {.prefix_page = -1};
    if (!q->emitted) {
      EPIC_CHECK(start_seq(s, q, &pe));
      n = q->n_prompt - q->n_cached;
    }
    if (n > s->p.prefill_chunk)
      n = s->p.prefill_chunk;
    if (n > s->budget[q->rank])
      n = s->budget[q->rank];
    const int last = q->n_cached + n == q->n_prompt;
    int64_t next;
    uint32_t flags = (q->emitted ? 0u : (uint32_t)EPIC_STEP_NEW) |
                     (last ? (uint32_t)EPIC_STEP_SAMPLE : 0u) | mtp_flags(s, q, 0, last, &next);
    epic_sched_entry e = seq_entry(q, flags, n);
    e.draft_next = next;
    e.prefix_page = pe.prefix_page;
    e.prefix_key = pe.prefix_key;
    EPIC_CHECK(add_entry(s, out, &e));
    q->emitted = 1;
    s->budget[q->rank] -= n;
  }
  return EPIC_OK;
}

/* The worker publishes the prompt pages the step completed (executor.c): so
 * does its mirror, in the same entry order. */
static void publish(epic_sched *s, sseq *q) {
  const int64_t ps = s->p.page_size;
  const int64_t full = (q->n_cached < q->n_prompt ? q->n_cached : q->n_prompt) / ps;
  while (!q->chain_end && q->n_chain < full) {
    if (!epic_kvpages_publish(s->mirror[q->rank], q->held[q->n_chain],
                              q->n_chain ? q->held[q->n_chain - 1] : -1,
                              q->prompt + q->n_chain * ps))
      q->chain_end = 1;
    else
      q->n_chain++;
  }
}

void epic_sched_commit(epic_sched *s, const epic_sched_step *st) {
  for (int64_t i = 0; i < st->n_entries; i++) {
    const epic_sched_entry *e = &st->entries[i];
    sseq *q = e->seq_;
    if (e->flags & EPIC_STEP_RELEASE)
      continue;
    const int64_t n_out = (e->flags & EPIC_STEP_SAMPLE) && e->n_out > 0 ? e->n_out : 1;
    /* A VERIFY entry keeps the rows of last and the accepted drafts. */
    q->n_cached += (e->flags & EPIC_STEP_VERIFY) ? n_out : e->n_tokens;
    if (e->start < q->n_prompt && q->prompt && s->p.prefix_cache_pages > 0)
      publish(s, q);
    if (e->flags & EPIC_STEP_SAMPLE) {
      q->n_gen += n_out;
      q->avail = e->draft_next;
    }
    if ((e->flags & EPIC_STEP_VERIFY) && e->n_drafts > 0 && s->p.mtp_auto && q->mtp) {
      const int64_t w = q->n_hist++ % EPIC_SCHED_MTP_WINDOW;
      int64_t d = 0, a = 0;
      q->hist_d[w] = e->n_drafts;
      q->hist_a[w] = n_out - 1;
      for (int64_t j = 0; j < EPIC_SCHED_MTP_WINDOW && j < q->n_hist; j++) {
        d += q->hist_d[j];
        a += q->hist_a[j];
      }
      if (d >= EPIC_SCHED_MTP_MIN && 2 * a < d) {
        q->mtp = 0;
        q->mtp_end = 1;
        q->avail = 0;
        s->mtp_stopped++;
      }
    }
  }
}

int epic_sched_has_work(const epic_sched *s) {
  return s->q_end > s->q_head || s->n_run > 0 || s->n_rel > 0;
}

void epic_sched_get_stats(const epic_sched *s, epic_sched_stats *out) {
  memset(out, 0, sizeof *out);
  out->queued = s->q_end - s->q_head;
  out->running = s->n_run;
  out->pages_total = s->p.kv_pages * s->p.nranks;
  for (int r = 0; r < s->p.nranks; r++) {
    out->pages_used += s->p.kv_pages - free_pages(s, r); /* idle cached pages count as free */
    out->prefix_cached_pages += epic_kvpages_idle(s->mirror[r]);
    out->prefix_evictions += epic_kvpages_evictions(s->mirror[r]);
  }
  for (int64_t i = 0; i < s->n_run; i++)
    out->mtp_running += s->run[i]->mtp;
  out->mtp_stopped = s->mtp_stopped;
  out->prefix_hits = s->hits;
  out->prefix_hit_tokens = s->hit_tokens;
}

int64_t epic_sched_rank_running(const epic_sched *s, int rank) {
  return rank >= 0 && rank < s->p.nranks ? s->rank_running[rank] : 0;
}

int64_t epic_sched_rank_free_pages(const epic_sched *s, int rank) {
  return rank >= 0 && rank < s->p.nranks ? free_pages(s, rank) : 0;
}

int64_t epic_sched_rank_prefix_pages(const epic_sched *s, int rank, const int32_t *prompt,
                                     int64_t n) {
  if (rank < 0 || rank >= s->p.nranks || !prompt || n < 1 || s->p.prefix_cache_pages == 0)
    return 0;
  return epic_kvpages_match(s->mirror[rank], prompt, (n - 1) / s->p.page_size, NULL);
}
