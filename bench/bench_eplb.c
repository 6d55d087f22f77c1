/* bench_eplb: what expert load balancing (EPLB) buys on a skewed routing workload.
 *
 * The routing skew is SYNTHETIC: dummy weights with epic_model_params.router_skew,
 * which adds -skew * log(1 + p) to e_score_correction_bias of the expert with
 * popularity rank p (a fixed pseudo-random order per layer), a Zipf-like preference
 * for a few hot experts. Under mpirun every rank decodes --batch sequences; the run
 * measures, in the same process, after --steps untimed decode steps (first-use tables,
 * plans and buffers, which would otherwise land in the first phase):
 *   before: --steps decode steps with the default placement (contiguous blocks),
 *   then plans a placement with --redundant copies per MoE layer from the per-layer
 *   counts of those steps (coordinator/planner.h, --policy), applies it between steps
 *   (epic_model_set_placement) and measures
 *   after: --steps more decode steps of the same sequences.
 * Rank load = (token, expert) rows the rank ran through its routed experts
 * (epic_model_stats.expert_rows); step time = wall time of a decode step (max over
 * ranks, since every step is collective). Rank 0 prints one JSON object.
 * --device cuda puts rank r on GPU (local rank mod GPUs), --comm nccl exchanges in GPU
 * memory (both as epic serve/batch take them). */
#define _GNU_SOURCE
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm/comm.h"
#include "common/clock.h"
#include "common/log.h"
#include "coordinator/planner.h"
#include "kernels/ops.h"
#include "worker/model.h"
#include "worker/sampler.h"
#ifdef EPIC_HAVE_CUDA
#include "kernels/cuda/ops_cuda.h"
#endif

static const char *USAGE =
    "usage: mpirun -np N bench_eplb --model DIR [options]   (dummy weights from DIR/config.json)\n"
    "  --num-layers N --num-experts N   shrink the config\n"
    "  --skew S           synthetic routing skew (default 1.5; 0 = none)\n"
    "  --redundant R      extra copies per MoE layer (default: ranks)\n"
    "  --policy P         global or hierarchical (default global)\n"
    "  --batch B          decode sequences per rank (default 16)\n"
    "  --context C        prompt tokens per sequence (default 16)\n"
    "  --steps S          timed decode steps before and after (default 16)\n"
    "  --threads N        compute threads per rank (default 1)\n"
    "  --device D         cpu or cuda (default cpu; cuda: one GPU per rank on the node)\n"
    "  --comm B           exchange backend: mpi, nccl or ucx (default mpi)\n";

typedef struct opts {
  const char *dir, *policy, *device, *comm;
  double skew;
  long layers, experts, R, B, C, S, threads;
} opts;

typedef struct phase {
  double step_s, max_rows, mean_rows;
} phase;

/* S decode steps of the B sequences from position *pos; per-rank expert rows gathered. */
static epic_status decode(epic_comm *comm, epic_model *m, epic_kvcache *kc, epic_kv_seq *seqs,
                          int32_t *next, float *logits, const opts *o, int64_t *pos, phase *ph) {
  const int64_t V = epic_model_get_config(m)->vocab_size;
  const int P = epic_comm_size(comm);
  epic_seq_batch *b = calloc((size_t)o->B, sizeof *b);
  epic_model_stats s0, s1;
  double t_sum = 0;
  if (!b) return EPIC_ERR_NOMEM;
  epic_model_get_stats(m, &s0);
  for (long step = 0; step < o->S; step++) {
    for (long i = 0; i < o->B; i++)
      b[i] = (epic_seq_batch){.tokens = &next[i], .n_tokens = 1, .start = *pos, .kv = &seqs[i]};
    EPIC_CHECK(epic_comm_barrier(comm));
    const double t0 = epic_now_seconds();
    EPIC_CHECK(epic_model_forward(m, kc, b, (int)o->B, logits, NULL));
    double dt = epic_now_seconds() - t0, dmax = 0;
    EPIC_CHECK(epic_comm_allreduce_f64(comm, &dt, &dmax, 1, EPIC_COMM_MAX));
    t_sum += dmax;
    for (long i = 0; i < o->B; i++) next[i] = epic_argmax(logits + i * V, V);
    (*pos)++;
  }
  epic_model_get_stats(m, &s1);
  int64_t rows = s1.expert_rows - s0.expert_rows, mx = 0, sum = 0;
  EPIC_CHECK(epic_comm_allreduce_i64(comm, &rows, &mx, 1, EPIC_COMM_MAX));
  EPIC_CHECK(epic_comm_allreduce_i64(comm, &rows, &sum, 1, EPIC_COMM_SUM));
  ph->step_s = t_sum / (double)o->S;
  ph->max_rows = (double)mx;
  ph->mean_rows = (double)sum / P;
  free(b);
  return EPIC_OK;
}

/* Plan from the counts of the window [before, now) summed over ranks and apply. */
static epic_status rebalance(epic_comm *comm, epic_model *m, const opts *o, const int64_t *before,
                             double *pred_before, double *pred_after) {
  const epic_model_config *c = epic_model_get_config(m);
  const int64_t rows = c->num_hidden_layers + 1, E = c->n_routed_experts, n = rows * E;
  const int P = epic_comm_size(comm);
  int64_t *mine = calloc((size_t)n, sizeof *mine), *sum = calloc((size_t)n, sizeof *sum);
  double *w = calloc((size_t)n, sizeof *w);
  int32_t *off = calloc((size_t)n + 1, sizeof *off), *rk = calloc((size_t)(n * P), sizeof *rk);
  epic_plan *pl = NULL;
  epic_status st = EPIC_ERR_NOMEM;
  epic_eplb_policy pol = EPIC_EPLB_GLOBAL;
  if (!mine || !sum || !w || !off || !rk) goto done;
  EPIC_CHECK_GOTO(epic_model_expert_layer_tokens(m, mine), st, done);
  for (int64_t i = 0; i < n; i++) mine[i] -= before[i];
  EPIC_CHECK_GOTO(epic_comm_allreduce_i64(comm, mine, sum, (size_t)n, EPIC_COMM_SUM), st, done);
  for (int64_t i = 0; i < n; i++) w[i] = (double)sum[i];
  EPIC_CHECK_GOTO(epic_eplb_policy_parse(o->policy, &pol), st, done);
  epic_plan_params pp = {.size = sizeof pp, .cfg = c, .n_ranks = P, .include_mtp = 0,
                         .n_redundant = (int)o->R, .load_counts = w, .n_load_layers = rows,
                         .policy = pol, .ranks_per_node = pol == EPIC_EPLB_HIERARCHICAL ? P : 0};
  EPIC_CHECK_GOTO(epic_plan_create(&pp, &pl), st, done);
  int32_t k = 0;
  for (int64_t l = 0; l < rows; l++)
    for (int64_t e = 0; e < E; e++) {
      const int32_t *r;
      int nr = 0;
      if (l < epic_plan_n_layers(pl) && epic_plan_is_moe_layer(pl, (int)l)) {
        EPIC_CHECK_GOTO(epic_plan_expert_owners(pl, (int)l, (int)e, &r, &nr), st, done);
        memcpy(rk + k, r, sizeof *r * (size_t)nr);
        k += nr;
      } else {
        rk[k++] = (int32_t)((e * P) / E); /* never routed */
      }
      off[l * E + e + 1] = k;
    }
  epic_plan_balance b;
  epic_plan_load_balance(pl, -1, &b);
  *pred_before = b.ratio_before;
  *pred_after = b.ratio_after;
  const epic_expert_placement p = {.size = sizeof p, .n_rows = rows, .n_experts = E, .off = off,
                                   .ranks = rk};
  st = epic_model_set_placement(m, &p);
done:
  epic_plan_destroy(pl);
  free(mine);
  free(sum);
  free(w);
  free(off);
  free(rk);
  return st;
}

int main(int argc, char **argv) {
  int rank, P;
  opts o = {.policy = "global", .device = "cpu", .comm = "mpi", .skew = 1.5, .R = -1, .B = 16,
            .C = 16, .S = 16, .threads = 1};
  static const struct option lo[] = {
      {"model", 1, 0, 'm'},  {"num-layers", 1, 0, 'l'}, {"num-experts", 1, 0, 'e'},
      {"skew", 1, 0, 'k'},   {"redundant", 1, 0, 'r'},  {"policy", 1, 0, 'p'},
      {"batch", 1, 0, 'b'},  {"context", 1, 0, 'c'},    {"steps", 1, 0, 's'},
      {"threads", 1, 0, 't'}, {"device", 1, 0, 'd'},    {"comm", 1, 0, 'x'},
      {"help", 0, 0, 'h'},   {0, 0, 0, 0}};
  if (epic_comm_mpi_init(&argc, &argv, &rank, &P) != EPIC_OK) return 2;
  epic_log_init(EPIC_LOG_LEVEL_WARN, rank);
  for (int c; (c = getopt_long(argc, argv, "h", lo, NULL)) != -1;) {
    switch (c) {
    case 'm': o.dir = optarg; break;
    case 'l': o.layers = atol(optarg); break;
    case 'e': o.experts = atol(optarg); break;
    case 'k': o.skew = atof(optarg); break;
    case 'r': o.R = atol(optarg); break;
    case 'p': o.policy = optarg; break;
    case 'b': o.B = atol(optarg); break;
    case 'c': o.C = atol(optarg); break;
    case 's': o.S = atol(optarg); break;
    case 't': o.threads = atol(optarg); break;
    case 'd': o.device = optarg; break;
    case 'x': o.comm = optarg; break;
    default:
      if (rank == 0) fputs(USAGE, c == 'h' ? stdout : stderr);
      epic_comm_mpi_finalize();
      return c == 'h' ? 0 : 2;
    }
  }
  if (!o.dir || o.B < 1 || o.C < 1 || o.S < 1 || o.threads < 1 ||
      (strcmp(o.device, "cpu") != 0 && strcmp(o.device, "cuda") != 0)) {
    if (rank == 0) fputs(USAGE, stderr);
    epic_comm_mpi_finalize();
    return 2;
  }
  if (o.R < 0) o.R = P;
  epic_comm *comm = NULL;
  epic_ops *ops = NULL;
  epic_model *m = NULL;
  epic_kvcache *kc = NULL;
  epic_kv_seq *seqs = calloc((size_t)o.B, sizeof *seqs);
  int32_t *prompt = malloc((size_t)(o.B * o.C) * sizeof *prompt), *next = calloc((size_t)o.B, 4);
  int64_t *before = NULL, pos = o.C;
  float *logits = NULL;
  phase ph0, ph1;
  double pb = 0, pa = 0;
  epic_status st;
  const int gpu = strcmp(o.device, "cuda") == 0;
  epic_comm_params cp = {.size = sizeof cp, .backend = o.comm, .device = -1};
#ifdef EPIC_HAVE_CUDA
  const int n_gpus = gpu ? epic_cuda_device_count() : 0;
  int dev = 0;
  if (gpu && n_gpus <= 0) {
    fprintf(stderr, "bench_eplb: --device cuda: no usable CUDA GPU on this node\n");
    st = EPIC_ERR_UNSUPPORTED;
    goto done;
  }
#else
  if (gpu) {
    fprintf(stderr, "bench_eplb: --device cuda: this build has no CUDA backend\n");
    st = EPIC_ERR_UNSUPPORTED;
    goto done;
  }
#endif
  EPIC_CHECK_GOTO(epic_comm_create(&cp, &comm), st, done);
#ifdef EPIC_HAVE_CUDA
  if (gpu) {
    dev = epic_comm_local_rank(comm) % n_gpus;
    EPIC_CHECK_GOTO(epic_ops_cuda_create(dev, &ops), st, done);
  }
#endif
  if (!gpu)
    EPIC_CHECK_GOTO(epic_ops_cpu_create((int)o.threads, &ops), st, done);
  epic_model_params mp = {.size = sizeof mp, .dir = o.dir, .load_format = EPIC_LOAD_DUMMY,
                          .num_layers = o.layers, .num_experts = o.experts, .comm = comm,
                          .router_skew = o.skew};
  EPIC_CHECK_GOTO(epic_model_load(ops, &mp, &m), st, done);
  const epic_model_config *c = epic_model_get_config(m);
  const int64_t V = c->vocab_size, n = (c->num_hidden_layers + 1) * c->n_routed_experts;
  logits = malloc((size_t)(o.B * o.C * V) * sizeof *logits);
  before = calloc((size_t)n, sizeof *before);
  st = EPIC_ERR_NOMEM;
  if (!seqs || !prompt || !next || !logits || !before) goto done;
  EPIC_CHECK_GOTO(epic_model_kvcache_create(m, 0, 64, o.B * ((o.C + 3 * o.S + 63) / 64 + 1), &kc),
                  st, done);
  {
    epic_seq_batch *b = calloc((size_t)o.B, sizeof *b);
    if (!b) goto done;
    for (long i = 0; i < o.B; i++) {
      for (long t = 0; t < o.C; t++)
        prompt[i * o.C + t] = (int32_t)(((uint64_t)(rank * 7919 + i * 104729 + t * 31)) % (uint64_t)V);
      b[i] = (epic_seq_batch){.tokens = prompt + i * o.C, .n_tokens = o.C, .kv = &seqs[i]};
    }
    st = epic_model_forward(m, kc, b, (int)o.B, logits, NULL);
    free(b);
    if (st != EPIC_OK) goto done;
  }
  for (long i = 0; i < o.B; i++) next[i] = epic_argmax(logits + i * V, V);
  EPIC_CHECK_GOTO(epic_model_expert_layer_tokens(m, before), st, done);
  EPIC_CHECK_GOTO(decode(comm, m, kc, seqs, next, logits, &o, &pos, &ph0), st, done); /* warm-up */
  EPIC_CHECK_GOTO(decode(comm, m, kc, seqs, next, logits, &o, &pos, &ph0), st, done);
  EPIC_CHECK_GOTO(rebalance(comm, m, &o, before, &pb, &pa), st, done);
  EPIC_CHECK_GOTO(decode(comm, m, kc, seqs, next, logits, &o, &pos, &ph1), st, done);
  if (rank == 0)
    printf("{\"bench\":\"eplb\",\"device\":\"%s\",\"comm\":\"%s\",\"synthetic_skew\":%g,\"ranks\":%d,\"layers\":%lld,\"experts\":%lld,"
           "\"top_k\":%lld,\"redundant\":%ld,\"policy\":\"%s\",\"batch_per_rank\":%ld,\"steps\":%ld,"
           "\"before\":{\"max_rank_rows\":%.0f,\"mean_rank_rows\":%.1f,\"max_over_mean\":%.3f,"
           "\"step_ms\":%.3f},"
           "\"after\":{\"max_rank_rows\":%.0f,\"mean_rank_rows\":%.1f,\"max_over_mean\":%.3f,"
           "\"step_ms\":%.3f},\"predicted_max_over_mean\":{\"before\":%.3f,\"after\":%.3f}}\n",
           o.device, o.comm, o.skew, P, (long long)c->num_hidden_layers, (long long)c->n_routed_experts,
           (long long)c->num_experts_per_tok, o.R, o.policy, o.B, o.S, ph0.max_rows, ph0.mean_rows,
           ph0.mean_rows > 0 ? ph0.max_rows / ph0.mean_rows : 0, ph0.step_s * 1e3, ph1.max_rows,
           ph1.mean_rows, ph1.mean_rows > 0 ? ph1.max_rows / ph1.mean_rows : 0, ph1.step_s * 1e3,
           pb, pa);
  st = EPIC_OK;
done:
  if (st != EPIC_OK) fprintf(stderr, "bench_eplb: rank %d: %s\n", rank, epic_status_str(st));
  if (kc)
    for (long i = 0; i < o.B; i++) epic_kvcache_seq_release(kc, &seqs[i]);
  epic_kvcache_destroy(kc);
  epic_model_destroy(m);
  epic_ops_destroy(ops);
  epic_comm_destroy(comm);
  free(seqs);
  free(prompt);
  free(next);
  free(logits);
  free(before);
  epic_comm_mpi_finalize();
  return st == EPIC_OK ? 0 : 1;
}
