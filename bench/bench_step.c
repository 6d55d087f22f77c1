/* bench_step: where an expert-parallel decode step's time goes, per rank, with
 * one and with two micro-batches (DESIGN §3 pipelining). Run under mpirun; rank
 * 0 prints one JSON object on stdout.
 *
 *   mpirun -np N bench_step --model DIR [--load-format dummy] [options]
 *
 * Every rank loads the model with its share of the routed experts (contiguous
 * blocks), prefills B sequences of C tokens, then runs W warm-up and S timed
 * decode steps (one token per sequence per step), first with micro-batches 1,
 * then 2, each from a fresh cache so both see the same context. Per rank and
 * per step it reports the model's own breakdown (epic_model_stats): attention,
 * dense (dense MLP, shared experts, router), experts, dispatch and combine
 * wait (time blocked on the all-to-alls: transfer time not hidden by compute,
 * plus waiting for slower ranks), other, and idle = wait / total. The
 * comm_hidden_fraction is 1 - (waits with 2) / (waits with 1), summed over ranks. */
#define _GNU_SOURCE
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm/comm.h"
#include "common/clock.h"
#include "common/log.h"
#include "kernels/ops.h"
#include "worker/model.h"
#include "worker/sampler.h"

static const char *USAGE =
    "usage: mpirun -np N bench_step --model DIR [--load-format dummy] [options]\n"
    "  --num-layers N --num-experts N   shrink the config (dummy weights)\n"
    "  --comm mpi|ucx     all-to-all backend (default mpi)\n"
    "  --batch B          decode sequences per rank (default 8)\n"
    "  --context C        prompt tokens per sequence, prefilled first (default 64)\n"
    "  --warmup W         untimed decode steps (default 2)\n"
    "  --steps S          timed decode steps (default 8)\n"
    "  --threads N        compute threads per rank (default 1)\n"
    "Rank 0 prints one JSON object on stdout.\n";

/* What each rank reports for one micro-batch setting (gathered on rank 0). */
enum { F_TOTAL, F_ATTN, F_DENSE, F_EXPERTS, F_DISPATCH, F_COMBINE, F_OTHER, F_DBYTES, F_CBYTES,
       F_CALLS, F_N };

typedef struct opts {
  const char *dir, *comm;
  int dummy;
  long layers, experts, B, C, W, S, threads;
} opts;

/* Prefill, warm up and time the decode steps with n_mb micro-batches: this
 * rank's per-step figures in out[F_N], the timed wall time in *wall_s. */
static epic_status run(epic_comm *comm, epic_model *m, const opts *o, int n_mb, double *out,
                       double *wall_s) {
  const epic_model_config *cfg = epic_model_get_config(m);
  const int64_t V = cfg->vocab_size, page = 64, B = o->B, C = o->C;
  const long steps = o->W + o->S;
  epic_kvcache *kc = NULL;
  epic_kv_seq *seqs = calloc((size_t)B, sizeof *seqs);
  epic_seq_batch *b = calloc((size_t)B, sizeof *b);
  int32_t *prompt = malloc((size_t)(B * C) * sizeof *prompt);
  int32_t *next = malloc((size_t)B * sizeof *next);
  float *logits = malloc((size_t)(B * V) * sizeof(float));
  uint64_t x = 12345 + (uint64_t)epic_comm_rank(comm);
  epic_model_stats st;
  epic_status s;
  double t = 0;
  if (!seqs || !b || !prompt || !next || !logits) {
    s = EPIC_ERR_NOMEM;
    goto done;
  }
  EPIC_CHECK_GOTO(epic_model_set_micro_batches(m, n_mb), s, done);
  EPIC_CHECK_GOTO(
      epic_model_kvcache_create(m, 0, page, B * ((C + steps + page - 1) / page + 1), &kc), s, done);
  for (int64_t i = 0; i < B * C; i++) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    prompt[i] = (int32_t)((x >> 33) % (uint64_t)V);
  }
  for (int64_t i = 0; i < B; i++)
    b[i] = (epic_seq_batch){.tokens = prompt + i * C, .n_tokens = C, .kv = &seqs[i]};
  EPIC_CHECK_GOTO(epic_model_forward(m, kc, b, (int)B, logits, NULL), s, done);
  for (int64_t i = 0; i < B; i++) next[i] = epic_argmax(logits + i * V, V);
  for (long step = 0; step < steps; step++) {
    if (step == o->W) {
      EPIC_CHECK_GOTO(epic_comm_barrier(comm), s, done);
      epic_model_reset_stats(m);
      t = epic_now_seconds();
    }
    for (int64_t i = 0; i < B; i++)
      b[i] = (epic_seq_batch){.tokens = &next[i], .n_tokens = 1, .start = C + step, .kv = &seqs[i]};
    EPIC_CHECK_GOTO(epic_model_forward(m, kc, b, (int)B, logits, NULL), s, done);
    for (int64_t i = 0; i < B; i++) next[i] = epic_argmax(logits + i * V, V);
  }
  EPIC_CHECK_GOTO(epic_comm_barrier(comm), s, done);
  *wall_s = epic_now_seconds() - t;
  epic_model_get_stats(m, &st);
  out[F_TOTAL] = st.total_s / (double)o->S;
  out[F_ATTN] = st.attention_s / (double)o->S;
  out[F_DENSE] = st.dense_s / (double)o->S;
  out[F_EXPERTS] = st.experts_s / (double)o->S;
  out[F_DISPATCH] = st.dispatch_wait_s / (double)o->S;
  out[F_COMBINE] = st.combine_wait_s / (double)o->S;
  out[F_OTHER] = st.other_s / (double)o->S;
  out[F_DBYTES] = (double)st.dispatch_bytes / (double)o->S;
  out[F_CBYTES] = (double)st.combine_bytes / (double)o->S;
  out[F_CALLS] = (double)st.a2a_calls / (double)o->S;
  s = EPIC_OK;
done:
  if (kc)
    for (int64_t i = 0; i < B; i++) epic_kvcache_seq_release(kc, &seqs[i]);
  epic_kvcache_destroy(kc);
  free(seqs);
  free(b);
  free(prompt);
  free(next);
  free(logits);
  return s;
}

/* One micro-batch setting as JSON; returns the waits summed over ranks. */
static double print_run(int n_mb, const double *all, int P, const opts *o, double wall) {
  double waits = 0, dbytes = 0, cbytes = 0;
  printf("{\"micro_batches\":%d,\"step_s\":%.6f,\"tokens_per_s\":%.2f,", n_mb, wall / (double)o->S,
         (double)(P * o->B * o->S) / wall);
  printf("\"ranks\":[");
  for (int r = 0; r < P; r++) {
    const double *v = all + r * F_N, wait = v[F_DISPATCH] + v[F_COMBINE];
    waits += wait;
    dbytes += v[F_DBYTES];
    cbytes += v[F_CBYTES];
    printf("%s{\"rank\":%d,\"total_s\":%.6f,\"attention_s\":%.6f,\"dense_s\":%.6f,"
           "\"experts_s\":%.6f,\"dispatch_wait_s\":%.6f,\"combine_wait_s\":%.6f,\"other_s\":%.6f,"
           "\"idle\":%.4f,\"dispatch_bytes\":%.0f,\"combine_bytes\":%.0f,\"a2a_calls\":%.0f}",
           r ? "," : "", r, v[F_TOTAL], v[F_ATTN], v[F_DENSE], v[F_EXPERTS], v[F_DISPATCH],
           v[F_COMBINE], v[F_OTHER], v[F_TOTAL] > 0 ? wait / v[F_TOTAL] : 0.0, v[F_DBYTES],
           v[F_CBYTES], v[F_CALLS]);
  }
  printf("],\"dispatch_bytes_per_step\":%.0f,\"combine_bytes_per_step\":%.0f,"
         "\"wait_s_per_step\":%.6f}",
         dbytes, cbytes, waits);
  return waits;
}

int main(int argc, char **argv) {
  static const struct option lo[] = {
      {"model", 1, 0, 'm'},  {"load-format", 1, 0, 'f'}, {"num-layers", 1, 0, 'l'},
      {"num-experts", 1, 0, 'e'}, {"comm", 1, 0, 'c'},   {"batch", 1, 0, 'b'},
      {"context", 1, 0, 'x'}, {"warmup", 1, 0, 'w'},     {"steps", 1, 0, 's'},
      {"threads", 1, 0, 't'}, {"help", 0, 0, 'h'},       {0, 0, 0, 0}};
  opts o = {.comm = "mpi", .B = 8, .C = 64, .W = 2, .S = 8, .threads = 1};
  int rank = 0, P = 1, c, rc = 1;
  epic_comm *comm = NULL;
  epic_ops *ops = NULL;
  epic_model *m = NULL;
  double mine[2][F_N], *all = NULL, wall[2] = {0, 0};
  while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
    switch (c) {
    case 'm': o.dir = optarg; break;
    case 'f': o.dummy = strcmp(optarg, "dummy") == 0; break;
    case 'l': o.layers = atol(optarg); break;
    case 'e': o.experts = atol(optarg); break;
    case 'c': o.comm = optarg; break;
    case 'b': o.B = atol(optarg); break;
    case 'x': o.C = atol(optarg); break;
    case 'w': o.W = atol(optarg); break;
    case 's': o.S = atol(optarg); break;
    case 't': o.threads = atol(optarg); break;
    case 'h': fputs(USAGE, stdout); return 0;
    default: fputs(USAGE, stderr); return 2;
    }
  }
  if (!o.dir || o.B < 1 || o.C < 1 || o.W < 0 || o.S < 1 || o.threads < 0) {
    fputs(USAGE, stderr);
    return 2;
  }
  if (epic_comm_mpi_init(&argc, &argv, &rank, &P) != EPIC_OK) return 1;
  epic_log_init(EPIC_LOG_LEVEL_WARN, rank);
  epic_comm_params cp = {.size = sizeof cp, .backend = o.comm};
  epic_model_params mp = {.size = sizeof mp, .dir = o.dir,
                          .load_format = o.dummy ? EPIC_LOAD_DUMMY : EPIC_LOAD_AUTO, .seed = 1,
                          .num_layers = o.layers, .num_experts = o.experts};
  if (epic_comm_create(&cp, &comm) != EPIC_OK) goto done;
  mp.comm = comm;
  if (epic_ops_cpu_create((int)o.threads, &ops) != EPIC_OK) goto done;
  double t_load = epic_now_seconds();
  if (epic_model_load(ops, &mp, &m) != EPIC_OK) goto done;
  t_load = epic_now_seconds() - t_load;
  all = calloc((size_t)(2 * P * F_N), sizeof *all);
  if (!all) goto done;
  for (int k = 0; k < 2; k++) {
    if (run(comm, m, &o, k + 1, mine[k], &wall[k]) != EPIC_OK) goto done;
    if (epic_comm_gather(comm, mine[k], all + k * P * F_N, sizeof mine[k], 0) != EPIC_OK) goto done;
  }
  if (rank == 0) {
    const epic_model_config *cfg = epic_model_get_config(m);
    double waits[2];
    printf("{\"bench\":\"step\",\"model\":\"%s\",\"load_format\":\"%s\",\"comm\":\"%s\","
           "\"ranks\":%d,"
           "\"threads_per_rank\":%ld,\"layers\":%lld,\"experts\":%lld,\"batch_per_rank\":%ld,"
           "\"context\":%ld,\"warmup\":%ld,\"steps\":%ld,\"load_seconds\":%.3f,\"runs\":[",
           o.dir, o.dummy ? "dummy" : "safetensors", epic_comm_backend_name(comm), P, o.threads,
           (long long)cfg->num_hidden_layers, (long long)cfg->n_routed_experts, o.B, o.C, o.W, o.S,
           t_load);
    waits[0] = print_run(1, all, P, &o, wall[0]);
    putchar(',');
    waits[1] = print_run(2, all + P * F_N, P, &o, wall[1]);
    printf("],\"speedup_2_vs_1\":%.4f,\"comm_hidden_fraction\":%.4f}\n", wall[0] / wall[1],
           waits[0] > 0 ? 1.0 - waits[1] / waits[0] : 0.0);
    fflush(stdout);
  }
  rc = 0;
done:
  if (rc) {
    /* Leave without the collective teardown: the other ranks may be inside a
     * step; mpirun ends the job when this rank exits non-zero. */
    EPIC_LOG_ERROR("bench_step: rank %d failed", rank);
    return rc;
  }
  free(all);
  epic_model_destroy(m);
  epic_ops_destroy(ops);
  epic_comm_destroy(comm);
  epic_comm_mpi_finalize();
  return rc;
}
