/* The engine flags that `epic generate`, `serve`, `batch` and `bench` share: how
 * the model is loaded (--model, --load-format, --num-layers, --num-experts,
 * --weight-seed, --threads, --comm, --mem-per-rank, --device, --cuda-graphs, --precision) and
 * how the engine
 * schedules (--max-batch, --max-queue, --kv-cache, --kv-pages, --page-size,
 * --max-context, --step-tokens, --prefill-chunk, --micro-batches, --prefix-cache,
 * --mtp-draft): one option
 * table, one parser, one help text, and the epic_cluster_params /
 * epic_engine_params they fill.
 *
 * A command picks the flags it takes with a mask of EPIC_CLI_ENGINE_BIT()s and
 * sets its own defaults in the options after epic_cli_engine_init. Errors are
 * printed as "epic <cmd>: <flag>: ..." on stderr, as cli_util.h does.
 * Not thread-safe in the sense getopt is not: call from the parsing thread. No
 * function allocates; strings in the options borrow argv. */
#ifndef EPIC_CLI_ENGINE_H
#define EPIC_CLI_ENGINE_H

#include <getopt.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "comm/comm.h"
#include "coordinator/cluster.h"
#include "coordinator/engine.h"
#include "worker/model.h"

typedef enum epic_cli_engine_opt {
  /* loading */
  EPIC_CLI_ENGINE_MODEL,
  EPIC_CLI_ENGINE_LOAD_FORMAT,
  EPIC_CLI_ENGINE_NUM_LAYERS,
  EPIC_CLI_ENGINE_NUM_EXPERTS,
  EPIC_CLI_ENGINE_WEIGHT_SEED,
  EPIC_CLI_ENGINE_THREADS,
  EPIC_CLI_ENGINE_COMM,
  EPIC_CLI_ENGINE_MEM_PER_RANK,
  EPIC_CLI_ENGINE_DEVICE,
  EPIC_CLI_ENGINE_CUDA_GRAPHS,
  EPIC_CLI_ENGINE_PRECISION,
  /* scheduling */
  EPIC_CLI_ENGINE_MAX_BATCH,
  EPIC_CLI_ENGINE_MAX_QUEUE,
  EPIC_CLI_ENGINE_KV_CACHE,
  EPIC_CLI_ENGINE_KV_PAGES,
  EPIC_CLI_ENGINE_PAGE_SIZE,
  EPIC_CLI_ENGINE_MAX_CONTEXT,
  EPIC_CLI_ENGINE_STEP_TOKENS,
  EPIC_CLI_ENGINE_PREFILL_CHUNK,
  EPIC_CLI_ENGINE_MICRO_BATCHES,
  EPIC_CLI_ENGINE_PREFIX_CACHE,
  EPIC_CLI_ENGINE_MTP_DRAFT,
  EPIC_CLI_ENGINE_EPLB_REDUNDANT,
  EPIC_CLI_ENGINE_EPLB_INTERVAL,
  EPIC_CLI_ENGINE_EPLB_POLICY,
  EPIC_CLI_ENGINE_N
} epic_cli_engine_opt;

#define EPIC_CLI_ENGINE_BIT(opt) (1u << (opt))
/* Every loading flag, --model to --precision. */
#define EPIC_CLI_ENGINE_LOAD_ALL ((1u << EPIC_CLI_ENGINE_MAX_BATCH) - 1u)
/* Every scheduling flag, --max-batch to --mtp-draft. */
#define EPIC_CLI_ENGINE_SCHED_ALL (((1u << EPIC_CLI_ENGINE_N) - 1u) & ~EPIC_CLI_ENGINE_LOAD_ALL)

/* getopt codes of the shared flags; a command's own codes must stay below. */
#define EPIC_CLI_ENGINE_CODE_BASE 0x4000

typedef struct epic_cli_engine_opts {
  const char *cmd;      /* "serve", for messages and epic_cluster_params.cmd */
  unsigned mask;        /* flags the command takes (EPIC_CLI_ENGINE_BIT) */
  const char *model;    /* --model (required) */
  const char *comm;     /* --comm, checked against the known backends; NULL = auto */
  const char *device;   /* --device: auto, cpu, cuda or cuda:N (checked); NULL = auto */
  int no_graphs;        /* --cuda-graphs off */
  const char *precision; /* --precision fast|exact|invariant (checked); NULL = default */
  int dummy;             /* --load-format dummy (1) or dummy-mtp (2) */
  uint64_t weight_seed; /* --weight-seed */
  uint64_t mem_per_rank; /* --mem-per-rank, 0 = no fit check */
  uint64_t kv_bytes;    /* --kv-cache, 0 = the engine's default */
  int64_t num_layers, num_experts, threads; /* 0 = the model's / all cores */
  /* 0 = the engine's default for each (engine.h) */
  int64_t max_batch, max_queue, kv_pages, page_size, max_context, step_tokens, prefill_chunk,
      micro_batches;
  /* --prefix-cache SIZE|off: bytes per worker (0 = the engine's default), off = -1 pages */
  uint64_t prefix_cache_bytes;
  int64_t prefix_cache_pages;
  /* --mtp-draft K|auto|off: epic_engine_params.mtp_draft (0 auto, -1 off); -1
   * for a command without the flag. Not -1: the MTP layer is loaded. */
  int64_t mtp_draft;
  /* --eplb-redundant R (0 = off: -1 to the engine; unset = the engine's auto),
   * --eplb-interval STEPS, --eplb-policy global|hierarchical */
  int64_t eplb_redundant, eplb_interval;
  int eplb_policy;
} epic_cli_engine_opts;

/* Zeroes o and sets the defaults every command shares (--page-size 64,
 * --micro-batches 1, --mtp-draft auto where taken); a command sets its own
 * after this call. */
void epic_cli_engine_init(epic_cli_engine_opts *o, const char *cmd, unsigned mask);

/* Writes the command's own options (own, terminated by a zero entry) followed
 * by the shared ones of o->mask, then a zero entry, into out[cap]. Returns 0,
 * or -1 if cap is too small (a programming error; message printed). */
int epic_cli_engine_longopts(const epic_cli_engine_opts *o, const struct option *own,
                             struct option *out, size_t cap);

/* Handles one getopt_long code: 1 if it was a shared flag and arg is valid,
 * 0 if code is not a shared flag (the command handles it), -1 if arg is bad
 * (message printed). */
int epic_cli_engine_parse(epic_cli_engine_opts *o, int code, const char *arg);

/* A --precision value (epic_cluster_parse_precision) into *out (may be NULL): 0, or -1
 * with "epic <cmd>: <flag>: expected ..." printed. */
int epic_cli_precision(const char *cmd, const char *flag, const char *arg, int *out);

/* Checks after getopt_long's last flag: no operand left in argv (optind),
 * --model given, --kv-cache > 0. 0 or -1 (message printed). */
int epic_cli_engine_check(const epic_cli_engine_opts *o, int argc, char **argv);

/* One help line of a shared flag with a command's own wording. */
typedef struct epic_cli_engine_help_line {
  epic_cli_engine_opt opt;
  const char *arg;  /* NULL = the shared one ("N", "SIZE", ...) */
  const char *text; /* may hold '\n': continuation lines are indented to the column */
} epic_cli_engine_help_line;

/* Prints "  --flag ARG   text" lines for the flags in mask (and o->mask), in
 * the enum's order, the text starting at column (0-based). own[n_own]
 * replaces the shared wording of some flags; may be NULL. */
void epic_cli_engine_help(FILE *f, const epic_cli_engine_opts *o, unsigned mask, int column,
                          const epic_cli_engine_help_line *own, size_t n_own);

/* Fills *cp from o: model, comm, load format, overrides, threads, memory per
 * rank, the plan's step tokens, the MTP layer unless --mtp-draft off (or not
 * taken); progress on. Other fields zero. */
void epic_cli_engine_cluster_params(const epic_cli_engine_opts *o, epic_cluster_params *cp);

/* Fills *ep from o's scheduling settings for model and comm (borrowed). */
void epic_cli_engine_engine_params(const epic_cli_engine_opts *o, epic_model *model,
                                   epic_comm *comm, epic_engine_params *ep);

#endif
