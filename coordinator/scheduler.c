#include "scheduler.h"

#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "worker/step_plan.h"

typedef struct sseq {
  uint64_t id;
  void *user;
  int64_t n_prompt, max_new, pages;
  int64_t n_cached; /* tokens the worker holds in its KV cache */
  int64_t n_gen;    /* tokens sampled so far */
  int32_t rank;
  int emitted; /* a worker holds the sequence (its NEW entry went out) */
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
  int64_t *free_pages, *rank_running, *budget; /* per worker */
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
  if (bad) {
    EPIC_LOG_ERROR("scheduler: invalid parameter %s", bad);
    return EPIC_ERR_INVALID;
  }
  s = calloc(1, sizeof *s);
  if (!s)
    return EPIC_ERR_NOMEM;
  s->p = *p;
  s->free_pages = calloc((size_t)p->nranks, sizeof *s->free_pages);
  s->rank_running = calloc((size_t)p->nranks, sizeof *s->rank_running);
  s->budget = calloc((size_t)p->nranks, sizeof *s->budget);
  if (!s->free_pages || !s->rank_running || !s->budget) {
    epic_sched_destroy(s);
    return EPIC_ERR_NOMEM;
  }
  for (int r = 0; r < p->nranks; r++)
    s->free_pages[r] = p->kv_pages;
  *out = s;
  return EPIC_OK;
}

void epic_sched_destroy(epic_sched *s) {
  if (!s)
    return;
  for (int64_t i = s->q_head; i < s->q_end; i++)
    free(s->queue[i]);
  for (int64_t i = 0; i < s->n_run; i++)
    free(s->run[i]);
  free(s->queue);
  free(s->run);
  free(s->free_pages);
  free(s->rank_running);
  free(s->budget);
  free(s->rel);
  free(s->entries);
  free(s);
}

int64_t epic_sched_pages_for(const epic_sched *s, int64_t n_prompt, int64_t max_new) {
  return (n_prompt + max_new + s->p.page_size - 1) / s->p.page_size;
}

epic_status epic_sched_submit(epic_sched *s, uint64_t id, int64_t n_prompt, int64_t max_new,
                              void *user) {
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
  *q = (sseq){
      .id = id, .user = user, .n_prompt = n_prompt, .max_new = max_new, .pages = pages, .rank = -1};
  s->queue[s->q_end++] = q;
  return EPIC_OK;
}

static void *take_running(epic_sched *s, int64_t i) {
  sseq *q = s->run[i];
  void *user = q->user;
  s->free_pages[q->rank] += q->pages;
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

int epic_sched_pop_any(epic_sched *s, uint64_t *id, void **user) {
  sseq *q = s->q_end > s->q_head ? s->queue[s->q_head] : s->n_run > 0 ? s->run[0] : NULL;
  if (!q)
    return 0;
  if (id)
    *id = q->id;
  return epic_sched_remove(s, q->id, user);
}

/* The worker with the most free pages; ties: fewer running sequences, lower rank. */
static int pick_rank(const epic_sched *s) {
  int best = 0;
  for (int r = 1; r < s->p.nranks; r++)
    if (s->free_pages[r] > s->free_pages[best] ||
        (s->free_pages[r] == s->free_pages[best] && s->rank_running[r] < s->rank_running[best]))
      best = r;
  return best;
}

static epic_status add_entry(epic_sched *s, epic_sched_step *out, const epic_sched_entry *e) {
  EPIC_CHECK(grow((void **)&s->entries, &s->e_cap, out->n_entries + 1, sizeof *s->entries));
  out->entries = s->entries;
  s->entries[out->n_entries++] = *e;
  out->n_tokens += e->n_tokens;
  return EPIC_OK;
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
    int r = pick_rank(s);
    if (s->free_pages[r] < q->pages)
      break;
    EPIC_CHECK(grow((void **)&s->run, &s->run_cap, s->n_run + 1, sizeof *s->run));
    EPIC_CHECK(grow((void **)&s->rel, &s->rel_cap, s->n_run + 1, sizeof *s->rel));
    s->q_head++;
    q->rank = r;
    s->free_pages[r] -= q->pages;
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
    epic_sched_entry e = seq_entry(q, EPIC_STEP_SAMPLE, 1);
    EPIC_CHECK(add_entry(s, out, &e));
    s->budget[q->rank]--;
  }
  for (int64_t i = 0; i < s->n_run; i++) {
    sseq *q = s->run[i];
    int64_t n = q->n_prompt - q->n_cached;
    if (n <= 0 || s->budget[q->rank] < 1)
      continue;
    if (n > s->p.prefill_chunk)
      n = s->p.prefill_chunk;
    if (n > s->budget[q->rank])
      n = s->budget[q->rank];
    uint32_t flags = (q->emitted ? 0u : (uint32_t)EPIC_STEP_NEW) |
                     (q->n_cached + n == q->n_prompt ? (uint32_t)EPIC_STEP_SAMPLE : 0u);
    epic_sched_entry e = seq_entry(q, flags, n);
    EPIC_CHECK(add_entry(s, out, &e));
    q->emitted = 1;
    s->budget[q->rank] -= n;
  }
  return EPIC_OK;
}

void epic_sched_commit(epic_sched *s, const epic_sched_step *st) {
  (void)s;
  for (int64_t i = 0; i < st->n_entries; i++) {
    const epic_sched_entry *e = &st->entries[i];
    sseq *q = e->seq_;
    if (e->flags & EPIC_STEP_RELEASE)
      continue;
    q->n_cached += e->n_tokens;
    if (e->flags & EPIC_STEP_SAMPLE)
      q->n_gen++;
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
  for (int r = 0; r < s->p.nranks; r++)
    out->pages_used += s->p.kv_pages - s->free_pages[r];
}

int64_t epic_sched_rank_running(const epic_sched *s, int rank) {
  return rank >= 0 && rank < s->p.nranks ? s->rank_running[rank] : 0;
}

int64_t epic_sched_rank_free_pages(const epic_sched *s, int rank) {
  return rank >= 0 && rank < s->p.nranks ? s->free_pages[rank] : 0;
}
