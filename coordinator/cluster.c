#define _POSIX_C_SOURCE 200809L
#include "cluster.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "comm/comm.h"
#include "common/log.h"
#include "coordinator/planner.h"
#include "worker/config.h"
#include "worker/model.h"
#ifdef EPIC_HAVE_CUDA
#include "kernels/cuda/ops_cuda.h"
#endif

struct epic_cluster {
  int rank, nranks, mpi;
  epic_comm *comm;
  epic_plan *plan;
  epic_ops *ops;
  epic_model *model;
};

int epic_cluster_under_launcher(void) {
  return getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMI_SIZE") || getenv("PMIX_RANK");
}

/* Owner table the model takes ([num_hidden_layers + 1][E], last row MTP): each
 * MoE layer's first owner from the plan; rows the plan does not cover (dense
 * layers, MTP when not planned) are never routed, but must name valid ranks. */
static epic_status owner_table(const epic_plan *plan, const epic_model_config *cfg, int nranks,
                               int32_t **out) {
  const int64_t E = cfg->n_routed_experts, rows = cfg->num_hidden_layers + 1;
  int32_t *t = malloc((size_t)(rows * (E > 0 ? E : 1)) * sizeof *t);
  if (!t) return EPIC_ERR_NOMEM;
  for (int64_t l = 0; l < rows; l++)
    for (int64_t e = 0; e < E; e++) {
      const int32_t *ranks;
      int n = 0;
      t[l * E + e] = (int32_t)((e * nranks) / E);
      if (l < epic_plan_n_layers(plan) && epic_plan_is_moe_layer(plan, (int)l) &&
          epic_plan_expert_owners(plan, (int)l, (int)e, &ranks, &n) == EPIC_OK && n > 0)
        t[l * E + e] = ranks[0];
    }
  *out = t;
  return EPIC_OK;
}

/* One line naming the first rank that does not fit in mem_per_rank. */
static void report_misfit(const char *cmd, const epic_plan *plan, uint64_t mem) {
  for (int r = 0; r < epic_plan_n_ranks(plan); r++) {
    epic_rank_memory m;
    if (epic_plan_rank_memory(plan, r, &m) != EPIC_OK || m.fits) continue;
    EPIC_LOG_ERROR("%s: the expert placement does not fit: rank %d needs %.3g GB of weights + "
                   "%.3g GB reserve + %.3g GB for EPLB copies (%d per layer) and room for %lld "
                   "KV tokens in --mem-per-rank %.3g GB (run `epic plan` with the same model, "
                   "ranks and --eplb-redundant for the whole table)",
                   cmd, r, (double)m.weight_bytes / 1e9, (double)m.reserve_bytes / 1e9,
                   (double)m.eplb_bytes / 1e9, epic_plan_eplb_redundant(plan),
                   (long long)epic_plan_min_kv_tokens(plan), (double)mem / 1e9);
    return;
  }
}

/* Ranks sharing a node share its cores: without --threads each gets its part. */
static int64_t default_threads(int64_t threads) {
  const char *local = getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
  long cores = sysconf(_SC_NPROCESSORS_ONLN), n = local ? atol(local) : 1;
  if (threads > 0) return threads;
  if (n <= 1 || cores <= 0) return 0;
  return cores / n > 0 ? cores / n : 1;
}

epic_status epic_cluster_parse_device(const char *s, int *kind, int *index) {
  int k, idx = -1;
  if (!s || strcmp(s, "auto") == 0) {
    k = 0;
  } else if (strcmp(s, "cpu") == 0) {
    k = 1;
  } else if (strncmp(s, "cuda", 4) == 0 && (s[4] == '\0' || s[4] == ':')) {
    k = 2;
    if (s[4] == ':') {
      char *end;
      long v = strtol(s + 5, &end, 10);
      if (end == s + 5 || *end || v < 0 || v > 1023) return EPIC_ERR_INVALID;
      idx = (int)v;
    }
  } else {
    return EPIC_ERR_INVALID;
  }
  if (kind) *kind = k;
  if (index) *index = idx;
  return EPIC_OK;
}

/* --precision's values, in epic_cuda_precision order. */
static const char *const PRECISIONS[] = {"fast", "exact", "invariant"};

epic_status epic_cluster_parse_precision(const char *s, int *out) {
  for (int i = 0; s && i < 3; i++)
    if (strcmp(s, PRECISIONS[i]) == 0) {
      if (out) *out = i;
      return EPIC_OK;
    }
  return EPIC_ERR_INVALID;
}

const char *epic_cluster_precision_name(int p) {
  return p >= 0 && p < 3 ? PRECISIONS[p] : "?";
}

int epic_cluster_default_precision(int mtp_auto, int64_t mtp_layers) {
  return mtp_auto && mtp_layers > 0 ? 2 : 0;
}

/* The compute backend the device flag names, on this rank's GPU when it is CUDA (the
 * precision --precision, EPIC_CUDA_PRECISION or epic_cluster_default_precision for cfg
 * gives). */
static epic_status create_ops(epic_cluster *c, const epic_cluster_params *p,
                              const epic_model_config *cfg) {
  int kind, index, prec = -1;
  if (epic_cluster_parse_device(p->device, &kind, &index) != EPIC_OK) {
    EPIC_LOG_ERROR("%s: --device: expected auto, cpu, cuda or cuda:N, got '%s'", p->cmd, p->device);
    return EPIC_ERR_INVALID;
  }
  if (p->precision && epic_cluster_parse_precision(p->precision, &prec) != EPIC_OK) {
    EPIC_LOG_ERROR("%s: --precision: expected fast, exact or invariant, got '%s'", p->cmd,
                   p->precision);
    return EPIC_ERR_INVALID;
  }
#ifdef EPIC_HAVE_CUDA
  {
    const int n = epic_cuda_device_count();
    if (kind == 2 && n <= 0) {
      EPIC_LOG_ERROR("%s: --device %s: no usable CUDA GPU on this node", p->cmd, p->device);
      return EPIC_ERR_UNSUPPORTED;
    }
    if (kind == 2 || (kind == 0 && n > 0)) {
      const int local = c->comm ? epic_comm_local_rank(c->comm) : 0;
      const int dev = index >= 0 ? index : local % n;
      if (index >= n) {
        EPIC_LOG_ERROR("%s: --device %s: this node has %d GPU(s)", p->cmd, p->device, n);
        return EPIC_ERR_INVALID;
      }
      EPIC_CHECK(epic_ops_cuda_create(dev, &c->ops));
      const char *env = getenv("EPIC_CUDA_PRECISION"), *origin = "";
      if (prec < 0 && env && *env) {
        origin = " (EPIC_CUDA_PRECISION)";
      } else if (prec < 0) {
        prec = epic_cluster_default_precision(p->load_mtp && p->mtp_auto,
                                              cfg->num_nextn_predict_layers);
        origin =
            prec ? " (default: --mtp-draft auto drafts with the model's MTP layer)" : " (default)";
      }
      if (prec >= 0) /* before any cache or weight: the precision decides their layouts */
        EPIC_CHECK(epic_ops_cuda_set_precision(c->ops, (epic_cuda_precision)prec));
      const int now = (int)epic_ops_cuda_get_precision(c->ops);
      EPIC_LOG_INFO("%s: rank %d computes on GPU %d (%s), precision %s%s", p->cmd, c->rank, dev,
                    epic_ops_cuda_device_name(c->ops), epic_cluster_precision_name(now), origin);
      return EPIC_OK;
    }
  }
#else
  if (kind == 2) {
    EPIC_LOG_ERROR("%s: --device %s: this build has no CUDA backend (configure with "
                   "-DEPIC_CUDA=ON on a machine with the CUDA toolkit)",
                   p->cmd, p->device);
    return EPIC_ERR_UNSUPPORTED;
  }
  (void)index;
  (void)prec; /* a CPU rank computes every row in fp32 alike, whatever was asked */
  (void)cfg;
#endif
  return epic_ops_cpu_create((int)default_threads(p->threads), &c->ops);
}

static epic_status plan_and_load(epic_cluster *c, const epic_cluster_params *p) {
  epic_model_config cfg;
  int32_t *owner = NULL;
  epic_status st;
  EPIC_CHECK(epic_config_load_dir(p->model_dir, &cfg));
  EPIC_CHECK(epic_config_override(&cfg, p->num_layers, p->num_experts));
  /* The backend first: the engine's default EPLB copies depend on it. */
  EPIC_CHECK(create_ops(c, p, &cfg));
  {
    const int64_t R = epic_plan_eplb_copies(p->eplb_redundant, cfg.n_routed_experts, c->nranks,
                                            epic_model_experts_invariant(c->ops, &cfg));
    epic_plan_params pp = {.size = sizeof pp,
                           .cfg = &cfg,
                           .n_ranks = c->nranks,
                           .gpu_mem_bytes = p->mem_per_rank,
                           .include_mtp = p->load_mtp,
                           .max_batch_tokens = p->max_batch_tokens > 0
                                                   ? p->max_batch_tokens
                                                   : epic_ops_step_tokens(c->ops),
                           .eplb_redundant = R > INT32_MAX ? INT32_MAX : (int)R,
                           .kv_elem_bytes = (int)epic_kv_dtype_size(epic_ops_kv_dtype(c->ops)),
                           .head_elem_bytes = (int)epic_dtype_size(epic_ops_head_dtype(c->ops))};
    EPIC_CHECK(epic_plan_create(&pp, &c->plan));
  }
  if (p->mem_per_rank && !epic_plan_fits(c->plan)) {
    report_misfit(p->cmd, c->plan, p->mem_per_rank);
    return EPIC_ERR_INVALID;
  }
  if (c->comm) EPIC_CHECK(owner_table(c->plan, &cfg, c->nranks, &owner));
  epic_model_params mp = {.size = sizeof mp,
                          .dir = p->model_dir,
                          .load_format = p->dummy == 2 ? EPIC_LOAD_DUMMY_MTP
                                         : p->dummy    ? EPIC_LOAD_DUMMY
                                                       : EPIC_LOAD_AUTO,
                          .seed = p->weight_seed,
                          .num_layers = p->num_layers,
                          .num_experts = p->num_experts,
                          .load_mtp = p->load_mtp,
                          .progress = p->progress && c->rank == 0,
                          .comm = c->comm,
                          .expert_owner = owner,
                          .step_graphs = p->step_graphs};
  st = epic_model_load(c->ops, &mp, &c->model);
  free(owner);
  return st;
}

epic_status epic_cluster_open(const epic_cluster_params *p, epic_cluster **out) {
  epic_cluster *c;
  epic_status st;
  *out = NULL;
  if (!p || p->size != sizeof *p || !p->model_dir || !p->cmd) {
    EPIC_LOG_ERROR("cluster: invalid parameters");
    return EPIC_ERR_INVALID;
  }
  c = calloc(1, sizeof *c);
  if (!c) return EPIC_ERR_NOMEM;
  c->nranks = 1;
  if (p->comm || epic_cluster_under_launcher()) {
    EPIC_CHECK_GOTO(epic_comm_mpi_init(NULL, NULL, &c->rank, &c->nranks), st, fail);
    c->mpi = 1;
    if (c->nranks > 1) epic_log_set_rank(c->rank);
    int kind = 0, index = -1;
    epic_comm_params cp = {.size = sizeof cp, .backend = p->comm ? p->comm : "auto", .device = -1};
    (void)epic_cluster_parse_device(p->device, &kind, &index); /* a bad name fails in create_ops */
    cp.device = index;
    /* Activations in host memory: auto must not pick a GPU-memory transport. */
    if (kind == 1 && strcmp(cp.backend, "auto") == 0 && !getenv("EPIC_COMM"))
      cp.backend = strstr(epic_comm_backends(), "ucx") ? "ucx" : "mpi";
    EPIC_CHECK_GOTO(epic_comm_create(&cp, &c->comm), st, fail);
  }
  st = plan_and_load(c, p);
  if (c->comm) {
    /* A rank that failed to load must not leave the others waiting in their
     * first step: everyone learns the worst status here. */
    int64_t mine = st, worst = st;
    epic_status st2 = epic_comm_allreduce_i64(c->comm, &mine, &worst, 1, EPIC_COMM_MIN);
    if (st2 != EPIC_OK) st = st2;
    else if (worst < 0 && st == EPIC_OK) {
      EPIC_LOG_ERROR("%s: another rank failed to load the model (see its message)", p->cmd);
      st = (epic_status)worst;
    }
  }
  if (st != EPIC_OK) goto fail;
  *out = c;
  return EPIC_OK;
fail:
  epic_cluster_close(c);
  return st;
}

void epic_cluster_close(epic_cluster *c) {
  if (!c) return;
  if (c->comm && epic_comm_failed(c->comm)) {
    /* A peer is gone or stuck: a collective teardown would wait for it. */
    EPIC_LOG_ERROR("rank %d: ending the job after the communication failure above", c->rank);
    epic_comm_abort(c->comm, 1);
  }
  epic_model_destroy(c->model);
  epic_ops_destroy(c->ops);
  epic_plan_destroy(c->plan);
  epic_comm_destroy(c->comm);
  if (c->mpi) epic_comm_mpi_finalize();
  free(c);
}

int epic_cluster_rank(const epic_cluster *c) { return c->rank; }
int epic_cluster_size(const epic_cluster *c) { return c->nranks; }
epic_comm *epic_cluster_comm(epic_cluster *c) { return c->comm; }
epic_ops *epic_cluster_ops(epic_cluster *c) { return c->ops; }
epic_model *epic_cluster_model(epic_cluster *c) { return c->model; }
const epic_plan *epic_cluster_plan(const epic_cluster *c) { return c->plan; }
