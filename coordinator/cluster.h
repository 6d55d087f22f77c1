/* epic_cluster: what every engine command (generate, serve, batch, bench) does
 * before it can run a step, in one place (DESIGN §2):
 *   1. under a launcher (mpirun/srun: OMPI_COMM_WORLD_SIZE, PMI_SIZE or
 *      PMIX_RANK in the environment) or when a comm backend is named, initialise
 *      MPI and create the epic_comm (a bad backend name fails here, before any
 *      weight is touched);
 *   2. create the compute backend;
 *   3. read config.json (with the benchmark overrides) and plan the expert
 *      placement with coordinator/planner: the same plan `epic plan` prints, so
 *      what a user planned is what runs; the memory of the run-time EPLB copies
 *      the engine will use on this backend is set aside (`epic plan
 *      --eplb-redundant R`); with mem_per_rank set, a plan that does not fit is
 *      an error naming the rank, before any weight is loaded;
 *   4. load the model: each rank maps the replicated weights and only the
 *      experts the plan gives it.
 * The engine's plan has one owner per expert (copies from load statistics are
 * `epic plan --redundant`'s, offline); the model loads each expert there, and
 * run-time EPLB (epic_model_set_placement) adds copies into the memory the plan
 * set aside, spreading each rank's rows over them.
 *
 * Ownership: epic_cluster_open allocates; epic_cluster_close (NULL-safe, collective
 * when a comm exists) destroys model, backend, plan and comm and finalises MPI if
 * open initialised it. After a communication failure (epic_comm_failed) close
 * instead ends the whole job with MPI_Abort and does not return: a stuck peer
 * would hang a collective teardown. Accessors hand out borrowed pointers valid until close.
 * Thread contract: open/close on the main thread; the accessors are pure. */
#ifndef EPIC_COORDINATOR_CLUSTER_H
#define EPIC_COORDINATOR_CLUSTER_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "kernels/ops.h"
#include "worker/model.h"

typedef struct epic_cluster epic_cluster;
typedef struct epic_comm epic_comm;
typedef struct epic_plan epic_plan;

typedef struct epic_cluster_params {
  size_t size;               /* sizeof(epic_cluster_params) */
  const char *cmd;           /* command name for messages, e.g. "serve" */
  const char *model_dir;     /* required */
  const char *comm;          /* backend: NULL = auto (only under a launcher), or a name */
  int dummy;                 /* --load-format dummy (1) or dummy-mtp (2) */
  uint64_t weight_seed;      /* dummy weights' seed */
  int64_t num_layers;        /* > 0: override (benchmarks) */
  int64_t num_experts;       /* > 0: override (benchmarks) */
  int64_t threads;           /* CPU compute threads; 0 = all cores */
  const char *device;        /* compute backend (epic_cluster_parse_device); NULL = "auto" */
  int load_mtp;              /* load the MTP layer when the config has one */
  uint64_t mem_per_rank;     /* bytes a rank may use; 0 = unknown (no fit check) */
  int64_t max_batch_tokens;  /* step tokens, for the plan's activation reserve; 0 = the
                                backend's default step (epic_ops_step_tokens) */
  int64_t eplb_redundant;    /* the engine's eplb_redundant (> 0 copies, < 0 off, 0 its
                                default): the plan sets their memory aside (planner.h) */
  int progress;              /* rank 0 reports loading progress */
  int step_graphs;           /* epic_model_params.step_graphs: 0 = on where the backend
                                records graphs, < 0 = off */
  const char *precision;     /* GPU ranks' numerics (epic_cluster_parse_precision); NULL =
                                EPIC_CUDA_PRECISION, else epic_cluster_default_precision */
  int mtp_auto;              /* --mtp-draft auto (with load_mtp): decides that default */
} epic_cluster_params;

/* Collective under a launcher. Errors are logged as one line naming the flag,
 * file or rank; every resource taken so far is released. */
epic_status epic_cluster_open(const epic_cluster_params *p, epic_cluster **out);
void epic_cluster_close(epic_cluster *c);

int epic_cluster_rank(const epic_cluster *c);   /* 0 without a launcher */
int epic_cluster_size(const epic_cluster *c);   /* 1 without a launcher */
epic_comm *epic_cluster_comm(epic_cluster *c);  /* NULL for a single process */
epic_ops *epic_cluster_ops(epic_cluster *c);
epic_model *epic_cluster_model(epic_cluster *c);
const epic_plan *epic_cluster_plan(const epic_cluster *c);

/* Compute backend names: "auto" (CUDA when the build has it and this node has a
 * GPU, else the CPU), "cpu", "cuda" (the GPU of the node-local rank, modulo the
 * GPUs visible) or "cuda:N". *kind gets 0 auto, 1 cpu, 2 cuda and *index N or -1
 * (either pointer may be NULL). EPIC_ERR_INVALID for anything else; a CUDA name
 * in a build without CUDA is refused later, by open, with its own message. */
epic_status epic_cluster_parse_device(const char *s, int *kind, int *index);

/* A --precision value: "fast" (0), "exact" (1) or "invariant" (2) into *out (may be NULL):
 * the CUDA backend's epic_cuda_precision. CPU ranks compute every row in fp32 alike
 * whatever is asked (as exact does). EPIC_ERR_INVALID for anything else. */
epic_status epic_cluster_parse_precision(const char *s, int *out);
/* The name of precision p (0..2), "?" for anything else. */
const char *epic_cluster_precision_name(int p);

/* The GPU precision (as above: 0 fast, 2 invariant) of a rank that neither --precision nor
 * EPIC_CUDA_PRECISION sets: invariant when MTP drafting is auto (mtp_auto) and the model
 * has an MTP layer (mtp_layers > 0), else fast. Why: auto drafts only where a verify step
 * computes plain decoding's rows (the invariant precision, at the fast numerics), and a
 * one-draft verify step there pays above about 80% / 47% / 26% acceptance at batch 1 / 32
 * / 128 on an H200 (bench/README.md), which DeepSeek's trained MTP layers exceed (85-90%):
 * about +26% / +47% tokens per second at batch 32 / 128. Without drafts accepted the
 * precision costs +1-5% at batch 32-128 and about +45% at batch 1. */
int epic_cluster_default_precision(int mtp_auto, int64_t mtp_layers);

/* 1 when this process was started by mpirun/srun (launcher variables set). */
int epic_cluster_under_launcher(void);

#endif
