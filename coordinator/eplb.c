/* EPLB at run time (see eplb.h). */
#include "eplb.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "comm/comm.h"
#include "common/log.h"

struct epic_eplb {
  epic_eplb_params p;
  epic_model *m;
  const epic_model_config *cfg;
  epic_comm *comm;
  int rank, nranks, ranks_per_node;
  int64_t rows, E;
  uint64_t next_step;
  int64_t *mine, *sum, *prev; /* [rows * E] cumulative per-layer counts */
  double *window;             /* [rows * E] counts since the last round (rank 0) */
  int32_t *off, *ranks;       /* the table rank 0 decides and every rank receives */
  pthread_mutex_t mu;         /* guards stats */
  epic_eplb_stats stats;
};

void epic_eplb_destroy(epic_eplb *b) {
  if (!b)
    return;
  free(b->mine);
  free(b->sum);
  free(b->prev);
  free(b->window);
  free(b->off);
  free(b->ranks);
  pthread_mutex_destroy(&b->mu);
  free(b);
}

/* Nodes for the hierarchical policy: ranks_per_node = the most ranks any node has;
 * 0 when the ranks of a node are not consecutive (or nodes differ in size). */
static epic_status find_nodes(epic_eplb *b, int *rpn) {
  int64_t mine = epic_comm_local_rank(b->comm) + 1, most = 0, ok = 0, all_ok = 0;
  EPIC_CHECK(epic_comm_allreduce_i64(b->comm, &mine, &most, 1, EPIC_COMM_MAX));
  ok = most > 0 && b->nranks % most == 0 && mine - 1 == b->rank % most;
  EPIC_CHECK(epic_comm_allreduce_i64(b->comm, &ok, &all_ok, 1, EPIC_COMM_MIN));
  *rpn = all_ok ? (int)most : 0;
  return EPIC_OK;
}

/* Whether the hierarchical policy can place R copies on nodes of rpn ranks (the
 * planner's conditions, see planner.h). */
static int hierarchical_ok(const epic_eplb *b, int rpn) {
  const int64_t E = b->E, N = b->nranks, R = b->p.n_redundant;
  if (rpn < 1 || N % rpn)
    return 0;
  const int64_t nn = N / rpn, G = b->cfg->n_group > 1 ? b->cfg->n_group : E;
  return E % G == 0 && G % nn == 0 && (R + nn - 1) / nn <= (E / nn) * (rpn - 1);
}

epic_status epic_eplb_create(const epic_eplb_params *p, epic_eplb **out) {
  epic_eplb *b;
  epic_status st = EPIC_OK;
  *out = NULL;
  if (!p || p->size != sizeof *p || !p->model || !p->comm) {
    EPIC_LOG_ERROR("eplb: invalid parameters (size, model or comm)");
    return EPIC_ERR_INVALID;
  }
  if (!(b = calloc(1, sizeof *b)))
    return EPIC_ERR_NOMEM;
  pthread_mutex_init(&b->mu, NULL);
  b->p = *p;
  b->m = p->model;
  b->comm = p->comm;
  b->cfg = epic_model_get_config(p->model);
  b->rank = epic_comm_rank(p->comm);
  b->nranks = epic_comm_size(p->comm);
  b->rows = b->cfg->num_hidden_layers + 1;
  b->E = b->cfg->n_routed_experts;
  {
    const char *bad = NULL;
    if (b->nranks < 2)
      bad = "comm (needs >= 2 ranks)";
    else if (p->n_redundant < 1 || (int64_t)p->n_redundant > b->E * (b->nranks - 1))
      bad = "n_redundant (1 .. experts x (ranks - 1))";
    else if (p->interval < 1)
      bad = "interval";
    else if (p->policy != EPIC_EPLB_GLOBAL && p->policy != EPIC_EPLB_HIERARCHICAL)
      bad = "policy";
    else if (!(p->margin >= 0 && p->margin < 1))
      bad = "margin";
    if (bad) {
      EPIC_LOG_ERROR("eplb: invalid parameter %s", bad);
      st = EPIC_ERR_INVALID;
    }
  }
  /* Every rank must run the same rounds: rank 0's parameters are the reference. */
  {
    int64_t mine[4] = {p->n_redundant, p->interval, (int64_t)p->policy,
                       (int64_t)(p->margin * 1e9)};
    int64_t root[4], s = st, worst;
    memcpy(root, mine, sizeof root);
    EPIC_CHECK_GOTO(epic_comm_bcast(b->comm, root, sizeof root, 0), st, fail);
    if (s == EPIC_OK && memcmp(root, mine, sizeof root) != 0) {
      EPIC_LOG_ERROR("eplb: rank %d: parameters (redundant, interval, policy, margin) differ "
                     "from rank 0's",
                     b->rank);
      s = EPIC_ERR_INVALID;
    }
    EPIC_CHECK_GOTO(epic_comm_allreduce_i64(b->comm, &s, &worst, 1, EPIC_COMM_MIN), st, fail);
    if (worst != EPIC_OK) {
      st = (epic_status)worst;
      goto fail;
    }
  }
  if (p->policy == EPIC_EPLB_HIERARCHICAL) {
    int rpn = 0;
    EPIC_CHECK_GOTO(find_nodes(b, &rpn), st, fail);
    if (hierarchical_ok(b, rpn)) {
      b->ranks_per_node = rpn;
    } else {
      if (b->rank == 0)
        EPIC_LOG_WARN("eplb: hierarchical policy not possible here (%d ranks per node%s, %lld "
                      "expert groups, %d copies): using the global one",
                      rpn, rpn ? "" : ": a node's ranks are not consecutive",
                      (long long)(b->cfg->n_group > 1 ? b->cfg->n_group : b->E), p->n_redundant);
      b->p.policy = EPIC_EPLB_GLOBAL;
    }
  }
  {
    const size_t n = (size_t)(b->rows * b->E);
    b->mine = calloc(n + 1, sizeof *b->mine);
    b->sum = calloc(n + 1, sizeof *b->sum);
    b->prev = calloc(n + 1, sizeof *b->prev);
    b->window = calloc(n + 1, sizeof *b->window);
    b->off = calloc(n + 1, sizeof *b->off);
    b->ranks = calloc(n * (size_t)b->nranks + 1, sizeof *b->ranks);
    if (!b->mine || !b->sum || !b->prev || !b->window || !b->off || !b->ranks) {
      st = EPIC_ERR_NOMEM;
      goto fail;
    }
  }
  b->next_step = (uint64_t)p->interval;
  *out = b;
  return EPIC_OK;
fail:
  epic_eplb_destroy(b);
  return st;
}

int epic_eplb_due(const epic_eplb *b, uint64_t step_no) {
  return b && step_no >= b->next_step;
}

/* Sum over MoE rows with counts of each placement's max rank load, and of the mean. */
static epic_status predict(const epic_eplb *b, const int32_t *off, const int32_t *ranks,
                           double *max, double *mean) {
  *max = *mean = 0;
  for (int64_t l = 0; l < b->rows; l++) {
    const double *w = b->window + l * b->E;
    double total = 0, mx, mn;
    for (int64_t e = 0; e < b->E; e++)
      total += w[e];
    if (total <= 0)
      continue;
    /* off is global: shift to this row's offsets. */
    int32_t *o = malloc(sizeof *o * (size_t)(b->E + 1));
    if (!o)
      return EPIC_ERR_NOMEM;
    for (int64_t e = 0; e <= b->E; e++)
      o[e] = off[l * b->E + e] - off[l * b->E];
    epic_status st = epic_eplb_load(b->nranks, (int)b->E, w, o, ranks + off[l * b->E], &mx, &mn);
    free(o);
    EPIC_CHECK(st);
    *max += mx;
    *mean += mn;
  }
  return EPIC_OK;
}

/* Rank 0: plan from the window and fill b->off / b->ranks; *apply = 1 to switch. */
static epic_status decide(epic_eplb *b, uint64_t step_no, int64_t *apply, int64_t *n_entries) {
  const int64_t n = b->rows * b->E, E = b->E;
  double total = 0, cur_max, cur_mean, new_max, new_mean;
  epic_expert_placement cur;
  epic_plan *pl = NULL;
  epic_status st;
  *apply = 0;
  *n_entries = 0;
  for (int64_t i = 0; i < n; i++) {
    b->window[i] = (double)(b->sum[i] - b->prev[i]);
    total += b->window[i];
  }
  memcpy(b->prev, b->sum, (size_t)n * sizeof *b->prev);
  if (total <= 0)
    return EPIC_OK;
  EPIC_CHECK(epic_model_get_placement(b->m, &cur));
  EPIC_CHECK(predict(b, cur.off, cur.ranks, &cur_max, &cur_mean));
  epic_plan_params pp = {.size = sizeof pp,
                         .cfg = b->cfg,
                         .n_ranks = b->nranks,
                         .include_mtp = epic_model_has_mtp(b->m),
                         .n_redundant = b->p.n_redundant,
                         .load_counts = b->window,
                         .n_load_layers = b->rows,
                         .policy = b->p.policy,
                         .ranks_per_node = b->ranks_per_node};
  EPIC_CHECK(epic_plan_create(&pp, &pl));
  /* Rows with counts take the plan's placement, the others keep theirs. */
  int32_t k = 0;
  b->off[0] = 0;
  for (int64_t l = 0; l < b->rows; l++) {
    double rs = 0;
    for (int64_t e = 0; e < E; e++)
      rs += b->window[l * E + e];
    const int planned = rs > 0 && l < epic_plan_n_layers(pl) && epic_plan_is_moe_layer(pl, (int)l);
    for (int64_t e = 0; e < E; e++) {
      const int32_t *rk;
      int nr;
      if (planned) {
        EPIC_CHECK_GOTO(epic_plan_expert_owners(pl, (int)l, (int)e, &rk, &nr), st, done);
      } else {
        rk = cur.ranks + cur.off[l * E + e];
        nr = cur.off[l * E + e + 1] - cur.off[l * E + e];
      }
      memcpy(b->ranks + k, rk, sizeof *rk * (size_t)nr);
      k += nr;
      b->off[l * E + e + 1] = k;
    }
  }
  EPIC_CHECK_GOTO(predict(b, b->off, b->ranks, &new_max, &new_mean), st, done);
  {
    const double before = cur_mean > 0 ? cur_max / cur_mean : 0;
    const double after = new_mean > 0 ? new_max / new_mean : 0;
    *apply = after < before * (1.0 - b->p.margin);
    *n_entries = k;
    pthread_mutex_lock(&b->mu);
    b->stats.imbalance = *apply ? after : before;
    if (*apply) {
      b->stats.last_before = before;
      b->stats.last_after = after;
    }
    pthread_mutex_unlock(&b->mu);
    if (*apply)
      EPIC_LOG_INFO("eplb: step %llu: rebalanced experts (%s policy, %d redundant copies per "
                    "layer): predicted max/mean rank load %.3f -> %.3f over %.0f routed tokens",
                    (unsigned long long)step_no, epic_eplb_policy_name(b->p.policy),
                    b->p.n_redundant, before, after, total);
    else
      EPIC_LOG_DEBUG("eplb: step %llu: placement kept (max/mean %.3f, a new one would give %.3f)",
                     (unsigned long long)step_no, before, after);
  }
  st = EPIC_OK;
done:
  epic_plan_destroy(pl);
  return st;
}

epic_status epic_eplb_round(epic_eplb *b, uint64_t step_no) {
  const int64_t n = b->rows * b->E;
  int64_t hdr[2] = {0, 0}; /* apply, table entries */
  epic_status st = EPIC_OK;
  int64_t s, worst;
  EPIC_CHECK(epic_model_expert_layer_tokens(b->m, b->mine));
  EPIC_CHECK(epic_comm_allreduce_i64(b->comm, b->mine, b->sum, (size_t)n, EPIC_COMM_SUM));
  /* Rank 0's decision failing must still reach the others: it goes out as a header
   * with apply = -1. */
  if (b->rank == 0 && (st = decide(b, step_no, &hdr[0], &hdr[1])) != EPIC_OK)
    hdr[0] = -1;
  EPIC_CHECK(epic_comm_bcast(b->comm, hdr, sizeof hdr, 0));
  b->next_step = step_no + (uint64_t)b->p.interval;
  pthread_mutex_lock(&b->mu);
  b->stats.rounds++;
  pthread_mutex_unlock(&b->mu);
  if (hdr[0] < 0)
    return b->rank == 0 ? st : EPIC_ERR_COMM;
  if (hdr[0] == 0)
    return EPIC_OK;
  if (hdr[1] < n || hdr[1] > n * b->nranks) {
    EPIC_LOG_ERROR("eplb: rank %d: placement of %lld entries for %lld experts", b->rank,
                   (long long)hdr[1], (long long)n);
    return EPIC_ERR_COMM;
  }
  EPIC_CHECK(epic_comm_bcast(b->comm, b->off, (size_t)(n + 1) * sizeof *b->off, 0));
  EPIC_CHECK(epic_comm_bcast(b->comm, b->ranks, (size_t)hdr[1] * sizeof *b->ranks, 0));
  const epic_expert_placement pl = {.size = sizeof pl, .n_rows = b->rows, .n_experts = b->E,
                                    .off = b->off, .ranks = b->ranks};
  s = epic_model_set_placement(b->m, &pl);
  EPIC_CHECK(epic_comm_allreduce_i64(b->comm, &s, &worst, 1, EPIC_COMM_MIN));
  if (worst != EPIC_OK) {
    if (s == EPIC_OK || b->rank == 0)
      EPIC_LOG_ERROR("eplb: rank %d: a rank could not apply the new expert placement: %s",
                     b->rank, epic_status_str((epic_status)worst));
    return (epic_status)worst;
  }
  pthread_mutex_lock(&b->mu);
  b->stats.rebalances++;
  pthread_mutex_unlock(&b->mu);
  return EPIC_OK;
}

void epic_eplb_get_stats(const epic_eplb *b, epic_eplb_stats *out) {
  memset(out, 0, sizeof *out);
  if (!b)
    return;
  pthread_mutex_lock((pthread_mutex_t *)&b->mu);
  *out = b->stats;
  pthread_mutex_unlock((pthread_mutex_t *)&b->mu);
}
