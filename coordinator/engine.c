/* The engine: rank 0's coordinator loop and every rank's worker loop around
 * the scheduler (policy) and the executor (one rank's compute). One step:
 *   rank 0 forms the step under the mutex, then, without holding it,
 *   broadcasts the plan (header, body), every rank runs its entries (the MoE
 *   layers exchange tokens among all ranks inside the forward), the ranks
 *   exchange replies (status + sampled ids) in one allgatherv, and rank 0
 *   commits the step, streams the tokens to the requests and decides which end.
 * Because every rank sees every reply, a failure on any rank ends the step on
 * all ranks with the same error (no rank waits for a plan that never comes). */
#define _POSIX_C_SOURCE 200809L
#include "engine.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "comm/comm.h"
#include "common/clock.h"
#include "common/log.h"
#include "coordinator/eplb.h"
#include "coordinator/scheduler.h"
#include "worker/executor.h"
#include "worker/step_plan.h"

#define DEFAULT_PAGE_SIZE 64
#define DEFAULT_KV_BYTES ((size_t)1 << 30)
#define DEFAULT_MAX_BATCH 256
#define DEFAULT_MAX_QUEUE 1024

/* One request on rank 0, from submit until on_finish. */
typedef struct ereq {
  uint64_t id;
  int32_t *prompt, *stop;
  int64_t n_prompt, max_new;
  int n_stop;
  epic_sampling_params sp;
  int ignore_eos;
  int (*on_token)(void *user, int32_t id, float logprob);
  int (*on_token_top)(void *user, const epic_engine_token *t);
  int top_n;
  void (*on_finish)(void *user, const epic_engine_result *r);
  void *user;
  int64_t n_gen;
  int32_t last;
  int32_t drafts[EPIC_ENGINE_MAX_MTP_DRAFT]; /* MTP drafts for the next step */
  int64_t n_drafts;
  double t_submit, t_admit, t_first;
} ereq;

/* What every rank appends to its reply after the samples (and their top
 * lists): its model's cumulative all-to-all counters, then n_expert_slots
 * cumulative per-expert token counts. */
typedef struct rank_trailer {
  int64_t dispatch_bytes, combine_bytes, a2a_calls;
  double dispatch_wait_s, combine_wait_s;
  int64_t graph_captures, graph_replays;
  double forward_s, mtp_forward_s, graph_record_s;
} rank_trailer;

/* A request that ended, waiting for its on_finish outside the mutex. */
typedef struct ended {
  ereq *r;
  epic_engine_finish finish;
  epic_status status;
} ended;

struct epic_engine {
  epic_engine_params p; /* with defaults filled in */
  epic_model *m;
  const epic_model_config *cfg;
  epic_comm *comm;
  int rank, nranks;
  epic_kvcache *kc, *kc_mtp;
  epic_executor *x;
  int64_t mtp_k; /* drafts per step (0 = no drafting) */
  int mtp_auto;
  uint64_t step_no;
  /* Driving thread's scratch. */
  char *body;
  size_t body_cap;
  char *reply, *replies; /* this rank's reply; all replies */
  size_t reply_cap, replies_cap;
  size_t *counts, *displs;
  int64_t *cursor;
  int top_n;              /* p.top_logprobs: top entries per sample in every reply */
  int64_t prefix_pages;   /* prefix cache budget per worker (0 = off) */
  int64_t n_expert_slots; /* per-expert counts in every reply (0 = not counted) */
  int64_t *expert_scratch;
  ended *ended;
  size_t n_ended, ended_cap;
  /* Rank 0: shared with submitting threads, under mu. */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int sync_ok;
  epic_sched *sched;
  uint64_t next_id;
  uint64_t *cancels;
  size_t n_cancel, cancel_cap;
  int shutdown, drain;
  int input_open; /* epic_engine_set_input_open */
  int stopped;  /* the other ranks were told to return (or cannot be told) */
  int mid_step; /* a plan went out and its replies are not in yet */
  epic_status failed;
  epic_engine_stats stats;
  rank_trailer *rank_stats; /* latest per rank (rank 0, under mu) */
  int64_t *rank_experts;    /* [nranks][n_expert_slots] (rank 0, under mu) */
  epic_eplb *eplb;          /* NULL: no expert rebalancing */
};

/* ------------------------------------------------------------------ helpers */

static epic_status grow_bytes(char **buf, size_t *cap, size_t need) {
  if (need <= *cap)
    return EPIC_OK;
  size_t c = *cap ? *cap : 4096;
  while (c < need)
    c *= 2;
  /* The body holds 8-byte fields: malloc's alignment covers them. */
  char *n = realloc(*buf, c);
  if (!n)
    return EPIC_ERR_NOMEM;
  *buf = n;
  *cap = c;
  return EPIC_OK;
}

static void free_req(ereq *r) {
  if (!r)
    return;
  free(r->prompt);
  free(r->stop);
  free(r);
}

/* Queue r for its on_finish (delivered by deliver_ended, outside the mutex). */
static epic_status push_ended(epic_engine *e, ereq *r, epic_engine_finish f, epic_status st) {
  if (e->n_ended == e->ended_cap) {
    size_t c = e->ended_cap ? e->ended_cap * 2 : 64;
    ended *n = realloc(e->ended, c * sizeof *n);
    if (!n)
      return EPIC_ERR_NOMEM;
    e->ended = n;
    e->ended_cap = c;
  }
  e->ended[e->n_ended++] = (ended){.r = r, .finish = f, .status = st};
  return EPIC_OK;
}

static void finish_req(epic_engine *e, ereq *r, epic_engine_finish f, epic_status st) {
  const double now = epic_now_seconds();
  const int timed = f != EPIC_ENGINE_FINISH_ERROR && r->n_gen > 0 && r->t_first > 0;
  epic_engine_result res = {.finish = f,
                            .status = f == EPIC_ENGINE_FINISH_ERROR ? st : EPIC_OK,
                            .prompt_tokens = r->n_prompt,
                            .completion_tokens = r->n_gen,
                            .queue_seconds = (r->t_admit > 0 ? r->t_admit : now) - r->t_submit,
                            .ttft_seconds = r->t_first > 0 ? r->t_first - r->t_submit : 0,
                            .total_seconds = now - r->t_submit};
  pthread_mutex_lock(&e->mu);
  if (f == EPIC_ENGINE_FINISH_CANCELLED)
    e->stats.cancelled++;
  else
    e->stats.finished++;
  if (timed) {
    epic_hist_observe(&e->stats.ttft, r->t_first - r->t_submit);
    if (r->n_gen > 1)
      epic_hist_observe(&e->stats.tpot, (now - r->t_first) / (double)(r->n_gen - 1));
    epic_hist_observe(&e->stats.e2e, now - r->t_submit);
  }
  pthread_mutex_unlock(&e->mu);
  if (r->on_finish)
    r->on_finish(r->user, &res);
  free_req(r);
}

static void deliver_ended(epic_engine *e) {
  /* on_finish may submit, which never touches the ended list: iterate safely. */
  for (size_t i = 0; i < e->n_ended; i++)
    finish_req(e, e->ended[i].r, e->ended[i].finish, e->ended[i].status);
  e->n_ended = 0;
}

/* Remove every live request and end it with f (mu held). */
static void end_all_locked(epic_engine *e, epic_engine_finish f, epic_status st) {
  void *u;
  while (epic_sched_pop_any(e->sched, NULL, &u)) {
    if (push_ended(e, u, f, st) != EPIC_OK) {
      /* Out of memory for the list itself: finish it now, still exactly once. */
      pthread_mutex_unlock(&e->mu);
      finish_req(e, u, f, st);
      pthread_mutex_lock(&e->mu);
    }
  }
}

/* -------------------------------------------------------------- step plumbing */

/* The broadcast body: the plan's body (step_plan.h), padded to 8 bytes, then
 * one epic_executor_prefix per NEW record (the prefix-cache hits), so every
 * rank knows its size from the header. */
static size_t prefix_offset(const epic_step_header *h) {
  return (epic_step_body_bytes(h) + 7) & ~(size_t)7;
}

static size_t plan_bytes(const epic_step_header *h) {
  size_t b = epic_step_body_bytes(h);
  return b ? prefix_offset(h) + (size_t)h->n_new * sizeof(epic_executor_prefix) : 0;
}

/* A rank's reply: header, sample slots, draft slots (epic_step_reply_bytes),
 * the slots' top lists, trailer, expert counts. */
static size_t reply_bytes(const epic_engine *e, const epic_step_plan *p, int rank) {
  return epic_step_reply_bytes(p, rank) +
         (size_t)epic_step_plan_samples(p, rank) * (size_t)e->top_n * sizeof(epic_step_sample) +
         sizeof(rank_trailer) + (size_t)e->n_expert_slots * sizeof(int64_t);
}

static epic_step_sample *reply_top(const epic_step_plan *p, int rank, char *reply) {
  return (epic_step_sample *)(void *)(reply + epic_step_reply_bytes(p, rank));
}

static rank_trailer *reply_trailer(const epic_engine *e, const epic_step_plan *p, int rank,
                                   char *reply) {
  return (rank_trailer *)(void *)(reply + epic_step_reply_bytes(p, rank) +
                                  (size_t)epic_step_plan_samples(p, rank) * (size_t)e->top_n *
                                      sizeof(epic_step_sample));
}

/* Rank 0: keep every rank's counters from the replies just exchanged. */
static void keep_rank_stats(epic_engine *e, const epic_step_plan *p) {
  pthread_mutex_lock(&e->mu);
  for (int r = 0; r < e->nranks; r++) {
    const rank_trailer *t = reply_trailer(e, p, r, e->replies + e->displs[r]);
    e->rank_stats[r] = *t;
    if (e->n_expert_slots)
      memcpy(e->rank_experts + (size_t)r * (size_t)e->n_expert_slots, t + 1,
             (size_t)e->n_expert_slots * sizeof(int64_t));
  }
  pthread_mutex_unlock(&e->mu);
}

/* Every rank: run this rank's part of plan p, exchange replies, and return the
 * step's status: the first failing rank's (logged by rank 0, naming it). */
static epic_status run_plan(epic_engine *e, const epic_step_plan *p) {
  epic_status st;
  size_t mine = reply_bytes(e, p, e->rank);
  const int64_t n_mine = epic_step_plan_samples(p, e->rank);
  EPIC_CHECK(grow_bytes(&e->reply, &e->reply_cap, mine));
  epic_step_reply *rep = (epic_step_reply *)(void *)e->reply;
  epic_step_sample *smp = (epic_step_sample *)(void *)(e->reply + sizeof *rep);
  int32_t *drafts = (int32_t *)(void *)(smp + n_mine);
  const int64_t n_drafts = epic_step_plan_drafts(p, e->rank);
  const epic_executor_prefix *pf =
      p->h.n_new ? (const epic_executor_prefix *)(const void *)(e->body + prefix_offset(&p->h))
                 : NULL;
  if (n_drafts & 1)
    drafts[n_drafts] = -1; /* the padding slot */
  st = epic_executor_step_prefix(e->x, p, pf, smp, e->top_n,
                                 e->top_n ? reply_top(p, e->rank, e->reply) : NULL, drafts);
  if (p->h.n_tokens == 0)
    return st; /* releases only: no forward, no replies (on any rank) */
  {
    epic_model_stats ms;
    epic_model_get_stats(e->m, &ms);
    rank_trailer *t = reply_trailer(e, p, e->rank, e->reply);
    *t = (rank_trailer){.dispatch_bytes = ms.dispatch_bytes,
                        .combine_bytes = ms.combine_bytes,
                        .a2a_calls = ms.a2a_calls,
                        .dispatch_wait_s = ms.dispatch_wait_s,
                        .combine_wait_s = ms.combine_wait_s,
                        .graph_captures = ms.graph_captures,
                        .graph_replays = ms.graph_replays,
                        .forward_s = ms.total_s,
                        .mtp_forward_s = ms.mtp_s,
                        .graph_record_s = ms.graph_record_s};
    if (e->n_expert_slots && epic_model_expert_tokens(e->m, e->expert_scratch) == EPIC_OK)
      memcpy(t + 1, e->expert_scratch, (size_t)e->n_expert_slots * sizeof(int64_t));
    else if (e->n_expert_slots)
      memset(t + 1, 0, (size_t)e->n_expert_slots * sizeof(int64_t));
  }
  /* A broken transport cannot carry the reply; otherwise every rank learns of it. */
  if (st == EPIC_ERR_COMM || st == EPIC_ERR_TIMEOUT)
    return st;
  rep->status = st;
  rep->n_samples = (int32_t)epic_step_plan_samples(p, e->rank);
  if (!e->comm) {
    EPIC_CHECK(grow_bytes(&e->replies, &e->replies_cap, mine));
    memcpy(e->replies, e->reply, mine);
    e->displs[0] = 0;
  } else {
    size_t total = 0;
    for (int r = 0; r < e->nranks; r++) {
      e->counts[r] = reply_bytes(e, p, r);
      e->displs[r] = total;
      total += e->counts[r];
    }
    EPIC_CHECK(grow_bytes(&e->replies, &e->replies_cap, total));
    EPIC_CHECK(epic_comm_allgatherv(e->comm, e->reply, mine, e->replies, e->counts, e->displs));
  }
  for (int r = 0; r < e->nranks; r++) {
    const epic_step_reply *rr = (const epic_step_reply *)(void *)(e->replies + e->displs[r]);
    if (rr->status != EPIC_OK) {
      if (e->rank == 0)
        EPIC_LOG_ERROR("engine: step %llu failed on rank %d: %s", (unsigned long long)p->h.step, r,
                       epic_status_str((epic_status)rr->status));
      return rr->status < 0 ? (epic_status)rr->status : EPIC_ERR_COMM;
    }
    if (rr->n_samples != epic_step_plan_samples(p, r)) {
      EPIC_LOG_ERROR("engine: step %llu: rank %d sent %d samples, the plan has %lld",
                     (unsigned long long)p->h.step, r, rr->n_samples,
                     (long long)epic_step_plan_samples(p, r));
      return EPIC_ERR_COMM;
    }
  }
  if (e->rank == 0)
    keep_rank_stats(e, p);
  return EPIC_OK;
}

static epic_status send_idle(epic_engine *e) {
  epic_step_header h = {.magic = EPIC_STEP_MAGIC, .op = EPIC_STEP_OP_IDLE, .step = e->step_no};
  return epic_comm_bcast(e->comm, &h, sizeof h, 0);
}

static epic_status send_stop(epic_engine *e) {
  epic_step_header h = {.magic = EPIC_STEP_MAGIC, .op = EPIC_STEP_OP_STOP, .step = e->step_no};
  e->stopped = 1;
  return e->comm ? epic_comm_bcast(e->comm, &h, sizeof h, 0) : EPIC_OK;
}

/* ---------------------------------------------------------------- rank 0 */

/* Encode the formed step as a wire plan in e->body. */
static epic_status encode(epic_engine *e, const epic_sched_step *st, epic_step_plan *p) {
  epic_step_header h = {.magic = EPIC_STEP_MAGIC,
                        .op = EPIC_STEP_OP_RUN,
                        .n_entries = (uint32_t)st->n_entries,
                        .step = e->step_no,
                        .n_tokens = st->n_tokens};
  for (int64_t i = 0; i < st->n_entries; i++)
    h.n_new += (st->entries[i].flags & EPIC_STEP_NEW) != 0;
  EPIC_CHECK(grow_bytes(&e->body, &e->body_cap, plan_bytes(&h) + 8));
  epic_step_plan_bind(p, &h, e->body);
  epic_executor_prefix *pf = (epic_executor_prefix *)(void *)(e->body + prefix_offset(&h));
  int32_t *tok = p->tokens;
  int32_t k = 0;
  const double now = epic_now_seconds();
  for (int64_t i = 0; i < st->n_entries; i++) {
    const epic_sched_entry *se = &st->entries[i];
    ereq *r = se->user;
    epic_step_entry *we = &p->entries[i];
    *we = (epic_step_entry){.seq = se->id,
                            .rank = se->rank,
                            .flags = se->flags,
                            .start = se->start,
                            .n_tokens = (int32_t)se->n_tokens,
                            .new_index = -1};
    if (se->flags & EPIC_STEP_RELEASE)
      continue;
    if (se->flags & EPIC_STEP_NEW) {
      if (se->prefix_page >= 0)
        we->start = 0; /* NEW entries start at 0 on the wire; the record says after what */
      pf[k] = (epic_executor_prefix){
          .page = se->prefix_page,
          .n_pages = se->prefix_page >= 0 ? (int32_t)(se->start / e->p.page_size) : 0,
          .key = se->prefix_key};
      we->new_index = k;
      p->news[k++] = (epic_step_new){.reserve_tokens = r->n_prompt + r->max_new + e->mtp_k,
                                     .top_k = r->sp.top_k,
                                     .seed = r->sp.seed,
                                     .temperature = r->sp.temperature,
                                     .top_p = r->sp.top_p,
                                     .top_logprobs = r->top_n};
      r->t_admit = now;
    }
    if (se->start < r->n_prompt) { /* a prefill chunk never crosses the prompt's end */
      memcpy(tok, r->prompt + se->start, (size_t)se->n_tokens * sizeof *tok);
    } else {
      *tok = r->last; /* decode: the token sampled last step, then the drafts to verify */
      if (se->n_drafts > r->n_drafts) {
        EPIC_LOG_ERROR("engine: request %llu: %lld drafts scheduled, %lld made",
                       (unsigned long long)r->id, (long long)se->n_drafts, (long long)r->n_drafts);
        return EPIC_ERR_INVALID;
      }
      memcpy(tok + 1, r->drafts, (size_t)se->n_drafts * sizeof *tok);
    }
    tok += se->n_tokens;
  }
  return EPIC_OK;
}

/* One sampled token for r: stream it, and end r when it is final (returns 1). */
static int take_token(epic_engine *e, ereq *r, const epic_step_sample *smp,
                      const epic_step_sample *top) {
  int fin = -1, rc = 0;
  r->n_gen++;
  r->last = smp->id;
  if (r->n_gen == 1)
    r->t_first = epic_now_seconds();
  if (r->on_token_top) {
    int32_t ids[EPIC_ENGINE_MAX_TOP_LOGPROBS];
    float lps[EPIC_ENGINE_MAX_TOP_LOGPROBS];
    int n = 0;
    for (int j = 0; j < r->top_n && top && top[j].id >= 0; j++, n++) {
      ids[j] = top[j].id;
      lps[j] = top[j].logprob;
    }
    epic_engine_token t = {.id = smp->id,
                           .logprob = smp->logprob,
                           .n_top = n,
                           .top_ids = ids,
                           .top_logprobs = lps};
    rc = r->on_token_top(r->user, &t);
  } else if (r->on_token) {
    rc = r->on_token(r->user, smp->id, smp->logprob);
  }
  if (rc < 0)
    fin = EPIC_ENGINE_FINISH_CANCELLED;
  else if (rc == 1 || (!r->ignore_eos && epic_config_is_eos(e->cfg, smp->id)))
    fin = EPIC_ENGINE_FINISH_STOP;
  for (int i = 0; fin < 0 && i < r->n_stop; i++)
    if (r->stop[i] == smp->id)
      fin = EPIC_ENGINE_FINISH_STOP;
  if (fin < 0 && r->n_gen >= r->max_new)
    fin = EPIC_ENGINE_FINISH_LENGTH;
  if (fin < 0)
    return 0;
  pthread_mutex_lock(&e->mu);
  int removed = epic_sched_remove(e->sched, r->id, NULL);
  pthread_mutex_unlock(&e->mu);
  if (removed)
    finish_req(e, r, (epic_engine_finish)fin, EPIC_OK);
  return 1;
}

static int has_work_locked(const epic_engine *e) {
  return e->n_cancel > 0 || epic_sched_has_work(e->sched);
}

/* Whether the next step's admissions no longer depend on when the open input's requests
 * arrive (epic_engine_set_input_open): the queue is full, or holds a request for every
 * free running slot. */
static int input_settled_locked(const epic_engine *e) {
  if (!e->input_open)
    return 1;
  epic_sched_stats ss;
  epic_sched_get_stats(e->sched, &ss);
  return ss.queued >= e->p.max_queue || ss.queued >= e->p.max_batch - ss.running;
}

static int ready_locked(const epic_engine *e) {
  return has_work_locked(e) && input_settled_locked(e);
}

static epic_status coord_step(epic_engine *e, int *idle) {
  epic_sched_step st;
  epic_step_plan p;
  epic_status s;
  *idle = 1;
  pthread_mutex_lock(&e->mu);
  if (e->failed != EPIC_OK) {
    pthread_mutex_unlock(&e->mu);
    return e->failed;
  }
  for (size_t i = 0; i < e->n_cancel; i++) {
    void *u;
    if (epic_sched_remove(e->sched, e->cancels[i], &u) &&
        push_ended(e, u, EPIC_ENGINE_FINISH_CANCELLED, EPIC_OK) != EPIC_OK) {
      pthread_mutex_unlock(&e->mu);
      finish_req(e, u, EPIC_ENGINE_FINISH_CANCELLED, EPIC_OK);
      pthread_mutex_lock(&e->mu);
    }
  }
  e->n_cancel = 0;
  if (e->shutdown && !e->drain)
    end_all_locked(e, EPIC_ENGINE_FINISH_CANCELLED, EPIC_OK);
  s = epic_sched_form(e->sched, &st);
  pthread_mutex_unlock(&e->mu);
  deliver_ended(e);
  EPIC_CHECK(s);
  if (st.n_entries == 0)
    return EPIC_OK;
  *idle = 0;

  if (e->eplb && epic_eplb_due(e->eplb, e->step_no)) {
    /* Between steps: the round's collectives follow the header (step_plan.h). */
    epic_step_header ph = {.magic = EPIC_STEP_MAGIC, .op = EPIC_STEP_OP_PLACE, .step = e->step_no};
    EPIC_CHECK(epic_comm_bcast(e->comm, &ph, sizeof ph, 0));
    EPIC_CHECK(epic_eplb_round(e->eplb, e->step_no));
  }
  EPIC_CHECK(encode(e, &st, &p));
  e->mid_step = 1;
  if (e->comm) {
    EPIC_CHECK(epic_comm_bcast(e->comm, &p.h, sizeof p.h, 0));
    size_t bytes = plan_bytes(&p.h);
    if (bytes)
      EPIC_CHECK(epic_comm_bcast(e->comm, e->body, bytes, 0));
  }
  EPIC_CHECK(run_plan(e, &p));
  e->mid_step = 0;
  e->step_no++;

  /* What each SAMPLE entry produced (1, or 1..n_drafts + 1 for VERIFY: the
   * slots up to the first -1) and the drafts its rank made for the next step;
   * rank r's slots are its entries' in order. */
  for (int r = 0; r < e->nranks; r++)
    e->cursor[r] = 0;
  int64_t prompt_tokens = 0, verify_steps = 0, drafted = 0, accepted = 0;
  for (int64_t i = 0; i < st.n_entries; i++) {
    epic_sched_entry *se = &st.entries[i];
    if (se->flags & EPIC_STEP_RELEASE)
      continue;
    if (se->start < se->n_prompt)
      prompt_tokens += se->n_tokens;
    if (se->flags & EPIC_STEP_NEW)
      prompt_tokens += se->start; /* a cached prefix */
    if (!(se->flags & EPIC_STEP_SAMPLE))
      continue;
    const char *rb = e->replies + e->displs[se->rank];
    const epic_step_reply *rr = (const epic_step_reply *)(const void *)rb;
    const epic_step_sample *smp = (const epic_step_sample *)(const void *)(rr + 1) +
                                  e->cursor[se->rank];
    const int64_t slots = (se->flags & EPIC_STEP_VERIFY) ? se->n_tokens : 1;
    int64_t n = 0;
    while (n < slots && smp[n].id >= 0)
      n++;
    for (int64_t j = 0; j < slots; j++)
      if (smp[j].id >= e->cfg->vocab_size || (j < n) != (smp[j].id >= 0) || n == 0) {
        EPIC_LOG_ERROR("engine: rank %d sent token %d (slot %lld of %lld) outside the vocabulary "
                       "or out of order", se->rank, smp[j].id, (long long)j, (long long)slots);
        return EPIC_ERR_COMM;
      }
    se->n_out = n;
    if (se->n_drafts > 0) {
      verify_steps++;
      drafted += se->n_drafts;
      accepted += n - 1;
    }
    e->cursor[se->rank] += slots;
  }
  /* Drafts follow the rank's sample slots, in entry order. */
  for (int r = 0; r < e->nranks; r++)
    e->cursor[r] = 0;
  for (int64_t i = 0; i < st.n_entries; i++) {
    const epic_sched_entry *se = &st.entries[i];
    ereq *r = se->user;
    if ((se->flags & EPIC_STEP_RELEASE) || se->draft_next == 0) {
      if (!(se->flags & EPIC_STEP_RELEASE))
        r->n_drafts = 0;
      continue;
    }
    const epic_step_reply *rr = (const epic_step_reply *)(const void *)(e->replies + e->displs[se->rank]);
    const int32_t *d = (const int32_t *)(const void *)((const epic_step_sample *)(const void *)(rr + 1) +
                                                       rr->n_samples) +
                       e->cursor[se->rank];
    for (int64_t j = 0; j < se->draft_next; j++)
      if (d[j] < 0 || d[j] >= e->cfg->vocab_size || se->draft_next > EPIC_ENGINE_MAX_MTP_DRAFT) {
        EPIC_LOG_ERROR("engine: rank %d drafted token %d outside the vocabulary", se->rank, d[j]);
        return EPIC_ERR_COMM;
      }
    memcpy(r->drafts, d, (size_t)se->draft_next * sizeof *d);
    r->n_drafts = se->draft_next;
    e->cursor[se->rank] += se->draft_next;
  }
  pthread_mutex_lock(&e->mu);
  epic_sched_commit(e->sched, &st);
  if (st.n_tokens > 0)
    e->stats.steps++;
  e->stats.prompt_tokens += prompt_tokens;
  e->stats.mtp_verify_steps += verify_steps;
  e->stats.mtp_drafted += drafted;
  e->stats.mtp_accepted += accepted;
  pthread_mutex_unlock(&e->mu);

  /* Stream the tokens in plan order; a request that ends inside an accepted run
   * (stop id, stop string, max tokens) drops the rest of it. */
  if (st.n_tokens == 0)
    return EPIC_OK;
  int64_t streamed = 0;
  for (int r = 0; r < e->nranks; r++)
    e->cursor[r] = 0;
  for (int64_t i = 0; i < st.n_entries; i++) {
    const epic_sched_entry *se = &st.entries[i];
    if (!(se->flags & EPIC_STEP_SAMPLE))
      continue;
    const epic_step_reply *rr =
        (const epic_step_reply *)(void *)(e->replies + e->displs[se->rank]);
    const epic_step_sample *base = (const epic_step_sample *)(const void *)(rr + 1);
    const epic_step_sample *topb = e->top_n ? reply_top(&p, se->rank, e->replies + e->displs[se->rank]) : NULL;
    const int64_t k = e->cursor[se->rank];
    e->cursor[se->rank] += (se->flags & EPIC_STEP_VERIFY) ? se->n_tokens : 1;
    for (int64_t j = 0; j < se->n_out; j++) {
      streamed++;
      if (take_token(e, se->user, base + k + j, topb ? topb + (k + j) * e->top_n : NULL))
        break;
    }
  }
  pthread_mutex_lock(&e->mu);
  e->stats.generated_tokens += streamed;
  pthread_mutex_unlock(&e->mu);
  return EPIC_OK;
}

/* A step failed: the engine stops; every live request ends with ERROR. */
static void fail(epic_engine *e, epic_status st) {
  pthread_mutex_lock(&e->mu);
  if (e->failed == EPIC_OK)
    e->failed = st;
  e->shutdown = 1;
  end_all_locked(e, EPIC_ENGINE_FINISH_ERROR, st);
  pthread_cond_broadcast(&e->cv);
  pthread_mutex_unlock(&e->mu);
  deliver_ended(e);
  /* Failed before the plan went out: the other ranks still wait for one, so
   * release them. Failed after: they saw the same failure in the replies, or
   * the transport is broken. */
  if (!e->stopped && !e->mid_step)
    send_stop(e);
  e->stopped = 1;
}

epic_status epic_engine_step(epic_engine *e, int *idle) {
  int dummy;
  if (!idle)
    idle = &dummy;
  *idle = 1;
  if (!e || e->rank != 0)
    return EPIC_ERR_INVALID;
  epic_status st = coord_step(e, idle);
  if (st != EPIC_OK)
    fail(e, st);
  return st;
}

static epic_status coord_run(epic_engine *e) {
  epic_status st = EPIC_OK;
  /* Idle keep-alives at a quarter of the comm timeout (none without one). */
  const int timeout_ms = e->comm ? epic_comm_timeout_ms(e->comm) : -1;
  const long keepalive_ms = timeout_ms > 0 ? (timeout_ms + 3) / 4 : 0;
  for (;;) {
    int idle, stop;
    pthread_mutex_lock(&e->mu);
    while (!e->shutdown && !ready_locked(e)) {
      if (keepalive_ms <= 0) {
        pthread_cond_wait(&e->cv, &e->mu);
        continue;
      }
      struct timespec until;
      clock_gettime(CLOCK_REALTIME, &until);
      until.tv_sec += keepalive_ms / 1000;
      until.tv_nsec += (long)(keepalive_ms % 1000) * 1000000L;
      if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
      }
      if (pthread_cond_timedwait(&e->cv, &e->mu, &until) == ETIMEDOUT && !e->shutdown &&
          !ready_locked(e)) {
        pthread_mutex_unlock(&e->mu);
        st = send_idle(e);
        pthread_mutex_lock(&e->mu);
        if (st != EPIC_OK) {
          pthread_mutex_unlock(&e->mu);
          fail(e, st);
          return st;
        }
      }
    }
    /* Without drain the next step cancels what is left and sends its releases;
     * either way the loop ends once nothing is left to do. */
    stop = e->failed != EPIC_OK || (e->shutdown && !has_work_locked(e));
    if (e->failed != EPIC_OK)
      st = e->failed;
    pthread_mutex_unlock(&e->mu);
    if (stop)
      break;
    st = coord_step(e, &idle);
    if (st != EPIC_OK) {
      fail(e, st);
      return st;
    }
  }
  if (st == EPIC_OK && !e->stopped)
    st = send_stop(e);
  return st;
}

/* ---------------------------------------------------------------- other ranks */

static epic_status follow(epic_engine *e) {
  for (;;) {
    epic_step_header h;
    epic_step_plan p;
    EPIC_CHECK(epic_comm_bcast(e->comm, &h, sizeof h, 0));
    if (e->eplb && h.magic == EPIC_STEP_MAGIC && h.op == EPIC_STEP_OP_PLACE &&
        h.step == e->step_no) {
      EPIC_CHECK(epic_eplb_round(e->eplb, e->step_no));
      continue;
    }
    EPIC_CHECK(epic_step_header_check(&h, e->step_no));
    if (h.op == EPIC_STEP_OP_STOP)
      return EPIC_OK;
    if (h.op == EPIC_STEP_OP_IDLE)
      continue;
    size_t bytes = plan_bytes(&h);
    EPIC_CHECK(grow_bytes(&e->body, &e->body_cap, bytes + 8));
    if (bytes)
      EPIC_CHECK(epic_comm_bcast(e->comm, e->body, bytes, 0));
    epic_step_plan_bind(&p, &h, e->body);
    EPIC_CHECK(epic_step_plan_check(&p, e->nranks));
    EPIC_CHECK(run_plan(e, &p));
    e->step_no++;
  }
}

epic_status epic_engine_run(epic_engine *e) {
  if (!e)
    return EPIC_ERR_INVALID;
  if (e->rank == 0)
    return coord_run(e);
  epic_status st = follow(e);
  if (st != EPIC_OK)
    EPIC_LOG_ERROR("engine: rank %d stops after step %llu: %s", e->rank,
                   (unsigned long long)e->step_no, epic_status_str(st));
  return st;
}

/* ---------------------------------------------------------------- API */

static const char *check_params(const epic_engine_params *p) {
  if (!p || p->size != sizeof *p)
    return "size";
  if (!p->model)
    return "model";
  if (p->page_size < 0 || p->page_size > (1 << 20))
    return "page_size";
  if (p->kv_pages < 0 || p->kv_pages > INT32_MAX)
    return "kv_pages";
  if (p->max_batch < 0)
    return "max_batch";
  if (p->max_queue < 0)
    return "max_queue";
  if (p->step_tokens < 0 || p->step_tokens > INT32_MAX)
    return "step_tokens";
  if (p->prefill_chunk < 0)
    return "prefill_chunk";
  if (p->max_context < 0)
    return "max_context";
  if (p->micro_batches < 0 || p->micro_batches > 2)
    return "micro_batches";
  if (p->top_logprobs < 0 || p->top_logprobs > EPIC_ENGINE_MAX_TOP_LOGPROBS)
    return "top_logprobs";
  if (p->prefix_cache_pages < -1)
    return "prefix_cache_pages";
  if (p->mtp_draft < -1 || p->mtp_draft > EPIC_ENGINE_MAX_MTP_DRAFT)
    return "mtp_draft";
  return NULL;
}

/* Defaults, and kv_pages from kv_bytes (cache elements of kv_elem bytes: the backend's
 * kv_dtype; step_tokens by default the backend's, epic_ops_step_tokens). NULL or the bad
 * field. */
static const char *normalize(epic_engine_params *p, const epic_model_config *c, size_t kv_elem,
                             int64_t backend_step_tokens) {
  if (!kv_elem)
    return "kv_dtype (the backend names an unknown cache element type)";
  if (!p->page_size)
    p->page_size = DEFAULT_PAGE_SIZE;
  if (!p->max_batch)
    p->max_batch = DEFAULT_MAX_BATCH;
  if (!p->max_queue)
    p->max_queue = DEFAULT_MAX_QUEUE;
  if (!p->step_tokens)
    p->step_tokens = backend_step_tokens;
  /* One budget for the step, as chunked prefill usually runs: a long prompt in few big
   * chunks reads the expert weights once per chunk (at 512-token chunks an 8k prompt
   * streamed them 16 times, 2.7x slower on one H100). */
  if (!p->prefill_chunk)
    p->prefill_chunk = p->step_tokens;
  if (!p->max_context)
    p->max_context = c->max_position_embeddings;
  if (!p->micro_batches)
    p->micro_batches = 1;
  if (p->max_context > c->max_position_embeddings)
    return "max_context";
  const size_t per_page = (size_t)c->num_hidden_layers * (size_t)p->page_size *
                          (size_t)(c->kv_lora_rank + c->qk_rope_head_dim) * kv_elem;
  if (!p->kv_pages) {
    size_t bytes = p->kv_bytes ? p->kv_bytes : DEFAULT_KV_BYTES;
    if (bytes / per_page < 1 || bytes / per_page > INT32_MAX)
      return "kv_bytes";
    p->kv_pages = (int64_t)(bytes / per_page);
  }
  /* Idle cached pages are handed out again whenever a sequence needs them, so
   * the budget costs no admission; it only bounds what stays cached. */
  if (!p->prefix_cache_pages)
    p->prefix_cache_pages = p->prefix_cache_bytes
                                ? (int64_t)(p->prefix_cache_bytes / per_page < (size_t)p->kv_pages
                                                ? p->prefix_cache_bytes / per_page
                                                : (size_t)p->kv_pages)
                                : (p->kv_pages + 1) / 2;
  if (!p->prefix_cache_pages) /* a budget below one page */
    p->prefix_cache_pages = -1;
  return NULL;
}

/* The parameters every rank must agree on (rank 0's are the reference). */
typedef struct agreed {
  int64_t page_size, kv_pages, max_batch, max_queue, step_tokens, prefill_chunk, max_context,
      micro_batches, top_logprobs, prefix_cache_pages, mtp_draft;
} agreed;

static epic_status agree(epic_engine *e, epic_status local) {
  agreed mine = {e->p.page_size,   e->p.kv_pages,      e->p.max_batch,
                 e->p.max_queue,   e->p.step_tokens,   e->p.prefill_chunk,
                 e->p.max_context, e->p.micro_batches, e->p.top_logprobs,
                 e->p.prefix_cache_pages, e->p.mtp_draft};
  agreed root = mine;
  static const char *names[] = {"page_size",   "kv_pages",      "max_batch",   "max_queue",
                                "step_tokens", "prefill_chunk", "max_context", "micro_batches",
                                "top_logprobs", "prefix_cache_pages", "mtp_draft"};
  int64_t st = local, worst = local;
  EPIC_CHECK(epic_comm_bcast(e->comm, &root, sizeof root, 0));
  if (st == EPIC_OK)
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
      if (((int64_t *)&mine)[i] != ((int64_t *)&root)[i]) {
        EPIC_LOG_ERROR("engine: rank %d: %s = %lld differs from rank 0's %lld", e->rank, names[i],
                       (long long)((int64_t *)&mine)[i], (long long)((int64_t *)&root)[i]);
        st = EPIC_ERR_INVALID;
        break;
      }
  EPIC_CHECK(epic_comm_allreduce_i64(e->comm, &st, &worst, 1, EPIC_COMM_MIN));
  if (worst != EPIC_OK && st == EPIC_OK && e->rank == 0)
    EPIC_LOG_ERROR("engine: another rank could not create its engine (see its message)");
  return (epic_status)worst;
}

epic_status epic_engine_create(const epic_engine_params *p, epic_engine **out) {
  epic_engine *e;
  epic_status st = EPIC_OK;
  const char *bad = check_params(p);
  *out = NULL;
  if (bad && !(p && p->size == sizeof *p && p->comm)) {
    EPIC_LOG_ERROR("engine: invalid parameter %s", bad);
    return EPIC_ERR_INVALID;
  }
  e = calloc(1, sizeof *e);
  if (!e)
    return EPIC_ERR_NOMEM;
  e->p = *p;
  e->m = p->model;
  e->comm = p->comm;
  e->nranks = 1;
  e->failed = EPIC_OK;
  if (e->comm) {
    e->rank = epic_comm_rank(e->comm);
    e->nranks = epic_comm_size(e->comm);
  }
  /* From here on every rank reaches agree() (collective) whatever fails locally. */
  if (!bad) {
    e->cfg = epic_model_get_config(e->m);
    epic_ops *ops = epic_model_ops(e->m);
    bad = normalize(&e->p, e->cfg, epic_kv_dtype_size(epic_ops_kv_dtype(ops)),
                    epic_ops_step_tokens(ops));
  }
  if (bad) {
    EPIC_LOG_ERROR("engine: invalid parameter %s", bad);
    st = EPIC_ERR_INVALID;
  }
  e->counts = calloc((size_t)e->nranks, sizeof *e->counts);
  e->displs = calloc((size_t)e->nranks, sizeof *e->displs);
  e->cursor = calloc((size_t)e->nranks, sizeof *e->cursor);
  e->rank_stats = calloc((size_t)e->nranks, sizeof *e->rank_stats);
  if (st == EPIC_OK && (!e->counts || !e->displs || !e->cursor || !e->rank_stats))
    st = EPIC_ERR_NOMEM;
  if (st == EPIC_OK) {
    /* Every rank runs the same binary and model, so every rank decides alike. */
    e->top_n = e->p.top_logprobs;
    const int64_t n_exp = e->cfg->n_routed_experts;
    e->expert_scratch = n_exp > 0 ? calloc((size_t)n_exp, sizeof(int64_t)) : NULL;
    if (e->expert_scratch && epic_model_expert_tokens(e->m, e->expert_scratch) == EPIC_OK) {
      e->n_expert_slots = n_exp;
      e->rank_experts = calloc((size_t)e->nranks * (size_t)n_exp, sizeof(int64_t));
      if (!e->rank_experts)
        st = EPIC_ERR_NOMEM;
    }
  }
  if (st == EPIC_OK)
    st = epic_model_set_micro_batches(e->m, (int)e->p.micro_batches);
  if (st == EPIC_OK)
    st = epic_model_kvcache_create(e->m, 0, e->p.page_size, e->p.kv_pages, &e->kc);
  if (st == EPIC_OK) {
    e->prefix_pages = e->p.prefix_cache_pages > 0 ? e->p.prefix_cache_pages : 0;
    st = epic_kvcache_set_prefix_cache(e->kc, e->prefix_pages);
  }
  if (st == EPIC_OK) {
    /* auto drafts one token when the checkpoint's MTP layer is loaded, on a backend
     * whose verify forward matches the plain decode bit for bit
     * (epic_ops_rows_invariant: every matmul row computed alike whatever the row count;
     * the verify's attention takes the decode kernel row by row, worker/model.c
     * absorbed()): the CPU, and GPUs in the exact and invariant precisions. In the GPUs'
     * fast precision the dense matmuls' rounding depends on the row count (<= 2 rows with
     * fp32 activations, <= 8 bf16, more FP8), so drafting could flip near-tied greedy
     * tokens: there it takes an explicit --mtp-draft K. */
    const int has_mtp = epic_model_has_mtp(e->m);
    e->mtp_auto = e->p.mtp_draft == 0 && has_mtp && epic_ops_rows_invariant(epic_model_ops(e->m));
    e->mtp_k = e->p.mtp_draft > 0 ? e->p.mtp_draft : e->mtp_auto ? 1 : 0;
    if (e->p.mtp_draft > 0 && !has_mtp) {
      EPIC_LOG_ERROR("engine: invalid parameter mtp_draft: the model has no MTP layer loaded "
                     "(num_nextn_predict_layers = 0, or loaded without it)");
      st = EPIC_ERR_INVALID;
    } else if (e->mtp_k > 0) {
      /* A verify writes mtp_k rows past the sequence's last token: keep them
       * inside the model's positions. */
      if (e->p.max_context > e->cfg->max_position_embeddings - e->mtp_k)
        e->p.max_context = e->cfg->max_position_embeddings - e->mtp_k;
      /* One layer's rows: 1/num_hidden_layers of the main cache. */
      st = epic_model_kvcache_create(e->m, 1, e->p.page_size, e->p.kv_pages, &e->kc_mtp);
    }
  }
  if (st == EPIC_OK) {
    epic_executor_params xp = {.size = sizeof xp,
                               .model = e->m,
                               .kc = e->kc,
                               .rank = e->rank,
                               .lockstep = e->comm != NULL,
                               .kc_mtp = e->kc_mtp,
                               .mtp_draft = e->mtp_k,
                               .sampler_threads = e->p.sampler_threads};
    st = epic_executor_create(&xp, &e->x);
  }
  if (st == EPIC_OK && e->rank == 0) {
    epic_sched_params sp = {.size = sizeof sp,
                            .nranks = e->nranks,
                            .page_size = e->p.page_size,
                            .kv_pages = e->p.kv_pages,
                            .max_batch = e->p.max_batch,
                            .max_queue = e->p.max_queue,
                            .step_tokens = e->p.step_tokens,
                            .prefill_chunk = e->p.prefill_chunk,
                            .prefix_cache_pages = e->prefix_pages,
                            .mtp_draft = e->mtp_k,
                            .mtp_auto = e->mtp_auto};
    st = epic_sched_create(&sp, &e->sched);
  }
  if (st == EPIC_OK && e->rank == 0) {
    if (pthread_mutex_init(&e->mu, NULL) != 0) {
      st = EPIC_ERR_NOMEM;
    } else if (pthread_cond_init(&e->cv, NULL) != 0) {
      pthread_mutex_destroy(&e->mu);
      st = EPIC_ERR_NOMEM;
    } else {
      e->sync_ok = 1;
    }
  }
  if (e->comm)
    st = agree(e, st);
  if (st == EPIC_OK && e->comm && e->nranks > 1 && e->p.eplb_redundant >= 0 &&
      e->cfg->n_routed_experts > 0) {
    /* Collective like agree(): every rank gets here with the same parameters. */
    const int64_t E = e->cfg->n_routed_experts, most = E * (e->nranks - 1);
    /* The default (epic_plan_eplb_copies, which epic_cluster's memory plan uses
     * too) is on where re-placement keeps outputs unchanged: where the backend's expert
     * GEMMs compute a row alike whatever rows share its expert, as copies split a hot
     * expert's group (epic_model_experts_invariant: the CPU backend; CUDA's FP8 experts
     * on its default kernels and any experts in the exact or invariant precision; not
     * CUDA's fast BF16 expert GEMMs, whose cuBLAS algorithm follows the group's size). */
    const int64_t R = epic_plan_eplb_copies(
        e->p.eplb_redundant, E, e->nranks,
        epic_model_experts_invariant(epic_model_ops(e->m), e->cfg));
    epic_eplb_params bp = {.size = sizeof bp,
                           .model = e->m,
                           .comm = e->comm,
                           .n_redundant = (int)(R < most ? R : most),
                           .interval = e->p.eplb_interval ? e->p.eplb_interval : 256,
                           .policy = (epic_eplb_policy)e->p.eplb_policy,
                           .margin = 0.05};
    if (R > most) {
      EPIC_LOG_ERROR("engine: invalid parameter eplb_redundant: %lld copies, at most %lld "
                     "(each of %lld experts once per rank)",
                     (long long)R, (long long)most, (long long)E);
      bp.n_redundant = 0; /* every rank fails alike inside the collective create */
    }
    if (R == 0 && e->rank == 0)
      EPIC_LOG_INFO("engine: expert load balancing is off by default here: these expert "
                    "GEMMs may round a row differently when copies split its expert's rows "
                    "(--eplb-redundant R turns it on)");
    else if (e->rank == 0)
      EPIC_LOG_INFO("engine: expert load balancing: %lld copies per MoE layer, re-placed "
                    "every %lld steps when that evens the load",
                    (long long)bp.n_redundant, (long long)bp.interval);
    if (R != 0)
      st = epic_eplb_create(&bp, &e->eplb);
  }
  if (st != EPIC_OK) {
    e->stopped = 1; /* nobody runs: nothing to release */
    epic_engine_destroy(e);
    return st;
  }
  e->stats.nranks = e->nranks;
  e->stats.kv_pages_total = e->p.kv_pages * e->nranks;
  *out = e;
  return EPIC_OK;
}

void epic_engine_destroy(epic_engine *e) {
  if (!e)
    return;
  if (e->rank == 0 && e->sync_ok) {
    /* Ranks still following (rank 0 drove with epic_engine_step, or never ran)
     * wait for a plan: tell them to return. */
    if (!e->stopped && e->failed == EPIC_OK)
      send_stop(e);
    pthread_mutex_lock(&e->mu);
    e->shutdown = 1;
    end_all_locked(e, EPIC_ENGINE_FINISH_CANCELLED, EPIC_OK);
    pthread_mutex_unlock(&e->mu);
    deliver_ended(e);
    pthread_cond_destroy(&e->cv);
    pthread_mutex_destroy(&e->mu);
  }
  epic_executor_destroy(e->x);
  epic_kvcache_destroy(e->kc);
  epic_kvcache_destroy(e->kc_mtp);
  epic_sched_destroy(e->sched);
  epic_eplb_destroy(e->eplb);
  free(e->body);
  free(e->reply);
  free(e->replies);
  free(e->counts);
  free(e->displs);
  free(e->cursor);
  free(e->rank_stats);
  free(e->rank_experts);
  free(e->expert_scratch);
  free(e->ended);
  free(e->cancels);
  free(e);
}

static const char *check_request(const epic_engine *e, const epic_engine_request *r) {
  if (!r || r->size != sizeof *r)
    return "size";
  if (!r->prompt || r->n_prompt < 1)
    return "prompt";
  for (int64_t i = 0; i < r->n_prompt; i++)
    if (r->prompt[i] < 0 || r->prompt[i] >= e->cfg->vocab_size)
      return "prompt (token id outside the vocabulary)";
  if (r->max_new_tokens < 1)
    return "max_new_tokens";
  if (r->n_prompt > e->p.max_context || r->max_new_tokens > e->p.max_context - r->n_prompt)
    return "max_new_tokens (prompt + max_new_tokens exceeds the context length)";
  if (r->sampling.size != sizeof r->sampling)
    return "sampling.size";
  if (!(r->sampling.temperature >= 0))
    return "sampling.temperature";
  if (!(r->sampling.top_p > 0 && r->sampling.top_p <= 1))
    return "sampling.top_p";
  if (r->sampling.top_k < 0)
    return "sampling.top_k";
  if (r->n_stop_ids < 0 || (r->n_stop_ids > 0 && !r->stop_ids))
    return "stop_ids";
  if (r->top_logprobs < 0 || r->top_logprobs > e->top_n)
    return "top_logprobs (above the engine's top_logprobs)";
  for (int i = 0; i < r->n_stop_ids; i++)
    if (r->stop_ids[i] < 0 || r->stop_ids[i] >= e->cfg->vocab_size)
      return "stop_ids";
  return NULL;
}

epic_status epic_engine_submit(epic_engine *e, const epic_engine_request *r, uint64_t *id) {
  ereq *q;
  epic_status st;
  const char *bad;
  if (!e || e->rank != 0)
    return EPIC_ERR_INVALID;
  if ((bad = check_request(e, r))) {
    EPIC_LOG_ERROR("engine: submit: invalid %s", bad);
    return EPIC_ERR_INVALID;
  }
  q = calloc(1, sizeof *q);
  if (!q)
    return EPIC_ERR_NOMEM;
  q->prompt = malloc((size_t)r->n_prompt * sizeof *q->prompt);
  q->stop = malloc((size_t)(r->n_stop_ids + 1) * sizeof *q->stop);
  if (!q->prompt || !q->stop) {
    free_req(q);
    return EPIC_ERR_NOMEM;
  }
  memcpy(q->prompt, r->prompt, (size_t)r->n_prompt * sizeof *q->prompt);
  if (r->n_stop_ids)
    memcpy(q->stop, r->stop_ids, (size_t)r->n_stop_ids * sizeof *q->stop);
  q->n_prompt = r->n_prompt;
  q->max_new = r->max_new_tokens;
  q->n_stop = r->n_stop_ids;
  q->sp = r->sampling;
  q->ignore_eos = r->ignore_eos;
  q->on_token = r->on_token;
  q->on_token_top = r->on_token_top;
  q->top_n = r->top_logprobs;
  q->on_finish = r->on_finish;
  q->user = r->user;
  q->t_submit = epic_now_seconds();
  pthread_mutex_lock(&e->mu);
  if (e->shutdown) {
    st = EPIC_ERR_CANCELLED;
  } else {
    q->id = ++e->next_id;
    st = epic_sched_submit_prompt(e->sched, q->id, q->prompt, q->n_prompt, q->max_new, q);
    /* Auto drafts for greedy requests only: their output is plain decoding's
     * token for token, while a sampled request's tokens would change (same
     * distribution, other draws), and a seeded request should give the same
     * tokens with and without MTP unless the user asks (--mtp-draft K). */
    if (st == EPIC_OK && e->mtp_auto && !(r->sampling.temperature == 0.0f || r->sampling.top_k == 1))
      epic_sched_no_draft(e->sched, q->id);
    if (st == EPIC_OK)
      pthread_cond_signal(&e->cv);
  }
  pthread_mutex_unlock(&e->mu);
  if (st != EPIC_OK) {
    free_req(q);
    return st;
  }
  if (id)
    *id = q->id;
  return EPIC_OK;
}

void epic_engine_cancel(epic_engine *e, uint64_t id) {
  if (!e || e->rank != 0)
    return;
  pthread_mutex_lock(&e->mu);
  if (e->n_cancel == e->cancel_cap) {
    size_t c = e->cancel_cap ? e->cancel_cap * 2 : 16;
    uint64_t *n = realloc(e->cancels, c * sizeof *n);
    if (!n) {
      pthread_mutex_unlock(&e->mu);
      EPIC_LOG_ERROR("engine: out of memory recording the cancellation of request %llu",
                     (unsigned long long)id);
      return;
    }
    e->cancels = n;
    e->cancel_cap = c;
  }
  e->cancels[e->n_cancel++] = id;
  pthread_cond_signal(&e->cv);
  pthread_mutex_unlock(&e->mu);
}

void epic_engine_get_stats(epic_engine *e, epic_engine_stats *out) {
  epic_sched_stats ss;
  memset(out, 0, sizeof *out);
  if (!e)
    return;
  if (e->rank != 0) {
    out->nranks = e->nranks;
    out->kv_pages_total = e->p.kv_pages * e->nranks;
    return;
  }
  pthread_mutex_lock(&e->mu);
  *out = e->stats;
  epic_sched_get_stats(e->sched, &ss);
  out->queued = ss.queued;
  out->running = ss.running;
  out->kv_pages_used = ss.pages_used;
  out->kv_pages_total = ss.pages_total;
  out->prefix_hits = ss.prefix_hits;
  out->prefix_hit_tokens = ss.prefix_hit_tokens;
  out->prefix_cached_pages = ss.prefix_cached_pages;
  out->prefix_evictions = ss.prefix_evictions;
  out->prefix_cache_pages = e->prefix_pages * e->nranks;
  out->mtp_draft = e->mtp_k;
  out->mtp_auto = e->mtp_auto;
  out->mtp_running = ss.mtp_running;
  out->mtp_stopped = ss.mtp_stopped;
  if (e->eplb) {
    epic_eplb_stats es;
    epic_eplb_get_stats(e->eplb, &es);
    out->eplb_rounds = es.rounds;
    out->eplb_rebalances = es.rebalances;
    out->eplb_imbalance = es.imbalance;
  }
  for (int r = 0; r < e->nranks; r++) {
    const rank_trailer *t = &e->rank_stats[r];
    out->a2a_dispatch_bytes += t->dispatch_bytes;
    out->a2a_combine_bytes += t->combine_bytes;
    out->a2a_calls += t->a2a_calls;
    out->a2a_dispatch_wait_s += t->dispatch_wait_s;
    out->a2a_combine_wait_s += t->combine_wait_s;
    out->graph_captures += t->graph_captures;
    out->graph_replays += t->graph_replays;
    out->forward_s += t->forward_s;
    out->mtp_forward_s += t->mtp_forward_s;
    out->graph_record_s += t->graph_record_s;
  }
  pthread_mutex_unlock(&e->mu);
}

epic_status epic_engine_expert_tokens(epic_engine *e, int64_t *counts, int64_t n) {
  if (!e || e->rank != 0 || !counts || n != e->cfg->n_routed_experts)
    return EPIC_ERR_INVALID;
  if (!e->n_expert_slots)
    return EPIC_ERR_UNSUPPORTED;
  memset(counts, 0, (size_t)n * sizeof *counts);
  pthread_mutex_lock(&e->mu);
  for (int r = 0; r < e->nranks; r++)
    for (int64_t i = 0; i < n; i++)
      counts[i] += e->rank_experts[(size_t)r * (size_t)n + (size_t)i];
  pthread_mutex_unlock(&e->mu);
  return EPIC_OK;
}

void epic_engine_set_input_open(epic_engine *e, int open) {
  if (!e || e->rank != 0)
    return;
  pthread_mutex_lock(&e->mu);
  e->input_open = open != 0;
  pthread_cond_broadcast(&e->cv);
  pthread_mutex_unlock(&e->mu);
}

void epic_engine_shutdown(epic_engine *e, int drain) {
  if (!e || e->rank != 0)
    return;
  pthread_mutex_lock(&e->mu);
  if (!e->shutdown)
    e->drain = drain;
  else if (!drain)
    e->drain = 0; /* a later hard shutdown overrides a drain */
  e->shutdown = 1;
  pthread_cond_broadcast(&e->cv);
  pthread_mutex_unlock(&e->mu);
}
