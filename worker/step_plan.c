#include "step_plan.h"

#include "../common/log.h"

/* The body's arrays are laid out back to back; their sizes keep 8-byte alignment
 * for the tokens that follow. */
_Static_assert(sizeof(epic_step_header) == 32, "step header is a fixed 32-byte message");
_Static_assert(sizeof(epic_step_entry) == 32, "entry layout");
_Static_assert(sizeof(epic_step_new) == 40, "new-sequence record layout");
_Static_assert(sizeof(epic_step_reply) == 8 && sizeof(epic_step_sample) == 8, "reply layout");

/* Bounds that keep every size computation far from overflow. */
#define MAX_ENTRIES (1u << 24)
#define MAX_TOKENS ((int64_t)1 << 34)

size_t epic_step_body_bytes(const epic_step_header *h) {
  if (h->op != EPIC_STEP_OP_RUN)
    return 0;
  return (size_t)h->n_entries * sizeof(epic_step_entry) + (size_t)h->n_new * sizeof(epic_step_new) +
         (size_t)h->n_tokens * sizeof(int32_t);
}

void epic_step_plan_bind(epic_step_plan *p, const epic_step_header *h, void *body) {
  char *b = body;
  p->h = *h;
  p->entries = (epic_step_entry *)(void *)b;
  b += (size_t)h->n_entries * sizeof(epic_step_entry);
  p->news = (epic_step_new *)(void *)b;
  b += (size_t)h->n_new * sizeof(epic_step_new);
  p->tokens = (int32_t *)(void *)b;
}

epic_status epic_step_header_check(const epic_step_header *h, uint64_t expect_step) {
  if (h->magic != EPIC_STEP_MAGIC || (h->op != EPIC_STEP_OP_RUN && h->op != EPIC_STEP_OP_STOP &&
                                     h->op != EPIC_STEP_OP_IDLE)) {
    EPIC_LOG_ERROR("step plan: bad header (magic 0x%08x, op %d): the ranks are out of step",
                   (unsigned)h->magic, (int)h->op);
    return EPIC_ERR_COMM;
  }
  if (h->op == EPIC_STEP_OP_STOP)
    return EPIC_OK;
  if (h->step != expect_step) {
    EPIC_LOG_ERROR("step plan: got step %llu, expected %llu: the ranks are out of step",
                   (unsigned long long)h->step, (unsigned long long)expect_step);
    return EPIC_ERR_COMM;
  }
  if (h->n_entries > MAX_ENTRIES || h->n_new > h->n_entries || h->n_tokens < 0 ||
      h->n_tokens > MAX_TOKENS) {
    EPIC_LOG_ERROR("step plan %llu: bad counts (%u entries, %u new, %lld tokens)",
                   (unsigned long long)h->step, h->n_entries, h->n_new, (long long)h->n_tokens);
    return EPIC_ERR_COMM;
  }
  return EPIC_OK;
}

epic_status epic_step_plan_check(const epic_step_plan *p, int nranks) {
  int64_t tokens = 0;
  for (uint32_t i = 0; i < p->h.n_entries; i++) {
    const epic_step_entry *e = &p->entries[i];
    const char *bad = NULL;
    if (e->rank < 0 || e->rank >= nranks)
      bad = "rank";
    else if (e->flags & ~(uint32_t)(EPIC_STEP_NEW | EPIC_STEP_RELEASE | EPIC_STEP_SAMPLE |
                                    EPIC_STEP_MTP | EPIC_STEP_VERIFY | EPIC_STEP_DRAFT_MASK))
      bad = "flags";
    else if (epic_step_entry_drafts(e) > EPIC_STEP_MAX_DRAFT ||
             (epic_step_entry_drafts(e) > 0 &&
              (e->flags & (EPIC_STEP_SAMPLE | EPIC_STEP_MTP)) != (EPIC_STEP_SAMPLE | EPIC_STEP_MTP)))
      bad = "flags (draft count)";
    else if ((e->flags & EPIC_STEP_VERIFY) &&
             ((e->flags & (EPIC_STEP_SAMPLE | EPIC_STEP_MTP | EPIC_STEP_NEW)) !=
                  (EPIC_STEP_SAMPLE | EPIC_STEP_MTP) ||
              e->n_tokens > EPIC_STEP_MAX_DRAFT + 1))
      bad = "flags (VERIFY)";
    else if ((e->flags & EPIC_STEP_RELEASE) ? (e->flags != EPIC_STEP_RELEASE || e->n_tokens != 0)
                                            : e->n_tokens < 1)
      bad = "n_tokens";
    else if (e->start < 0)
      bad = "start";
    else if ((e->flags & EPIC_STEP_NEW)
                 ? (e->new_index < 0 || (uint32_t)e->new_index >= p->h.n_new || e->start != 0)
                 : e->new_index != -1)
      bad = "new_index";
    if (bad) {
      EPIC_LOG_ERROR("step plan %llu: entry %u (sequence %llu): bad %s",
                     (unsigned long long)p->h.step, i, (unsigned long long)e->seq, bad);
      return EPIC_ERR_COMM;
    }
    tokens += e->n_tokens;
  }
  if (tokens != p->h.n_tokens) {
    EPIC_LOG_ERROR("step plan %llu: entries hold %lld tokens, header says %lld",
                   (unsigned long long)p->h.step, (long long)tokens, (long long)p->h.n_tokens);
    return EPIC_ERR_COMM;
  }
  for (uint32_t i = 0; i < p->h.n_new; i++)
    if (p->news[i].top_logprobs < 0 || p->news[i].top_logprobs > 64 || p->news[i].reserved != 0) {
      EPIC_LOG_ERROR("step plan %llu: new-sequence record %u: bad top_logprobs (%d) or reserved field",
                     (unsigned long long)p->h.step, i, (int)p->news[i].top_logprobs);
      return EPIC_ERR_COMM;
    }
  return EPIC_OK;
}

int64_t epic_step_entry_samples(const epic_step_entry *e) {
  if (!(e->flags & EPIC_STEP_SAMPLE))
    return 0;
  return (e->flags & EPIC_STEP_VERIFY) ? e->n_tokens : 1;
}

int64_t epic_step_entry_drafts(const epic_step_entry *e) {
  return (int64_t)((e->flags & EPIC_STEP_DRAFT_MASK) >> EPIC_STEP_DRAFT_SHIFT);
}

int64_t epic_step_plan_samples(const epic_step_plan *p, int rank) {
  int64_t n = 0;
  for (uint32_t i = 0; i < p->h.n_entries; i++)
    if (p->entries[i].rank == rank)
      n += epic_step_entry_samples(&p->entries[i]);
  return n;
}

int64_t epic_step_plan_drafts(const epic_step_plan *p, int rank) {
  int64_t n = 0;
  for (uint32_t i = 0; i < p->h.n_entries; i++)
    if (p->entries[i].rank == rank)
      n += epic_step_entry_drafts(&p->entries[i]);
  return n;
}

int64_t epic_step_plan_mtp_calls(const epic_step_plan *p) {
  int64_t n = 0;
  for (uint32_t i = 0; i < p->h.n_entries; i++) {
    const epic_step_entry *e = &p->entries[i];
    if (!(e->flags & EPIC_STEP_MTP) || (e->flags & EPIC_STEP_RELEASE))
      continue;
    const int64_t d = epic_step_entry_drafts(e);
    if (n < (d > 1 ? d : 1))
      n = d > 1 ? d : 1;
  }
  return n;
}

size_t epic_step_reply_bytes(const epic_step_plan *p, int rank) {
  const int64_t d = epic_step_plan_drafts(p, rank);
  return sizeof(epic_step_reply) + (size_t)epic_step_plan_samples(p, rank) * sizeof(epic_step_sample) +
         (size_t)(d + (d & 1)) * sizeof(int32_t);
}
