/* `epic plan`: where every expert and byte goes on N ranks, without a GPU or weights. */
#define _GNU_SOURCE
#include "cmd_plan.h"

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "cli_util.h"
#include "common/log.h"
#include "coordinator/cli_engine.h"
#include "coordinator/cluster.h"
#include "coordinator/planner.h"
#include "worker/config.h"

static const char *USAGE =
    "usage: epic plan --model DIR --ranks N [options]\n"
    "\n"
    "Plans an expert-parallel deployment from DIR/config.json alone (no weights are\n"
    "read): which routed experts each rank holds, the bytes of every weight class,\n"
    "and per rank the replicated and expert weights, the activation reserve and the\n"
    "KV cache that fits in the rest of --gpu-mem. Exit code 0 if the plan fits (or\n"
    "without --gpu-mem), 1 if it does not, 2 for usage errors.\n"
    "\n"
    "  --model DIR              checkpoint directory (only config.json is read)\n"
    "  --ranks N                expert-parallel ranks (GPUs), N >= 1\n"
    "  --gpu-mem SIZE           memory per GPU, e.g. 80GiB, 141GB, 80G (= GiB), 1.5TiB,\n"
    "                           or bytes; KB/MB/GB/TB = powers of 1000, K/M/G/T and\n"
    "                           KiB/MiB/GiB/TiB = powers of 1024. Without it: no fit check\n"
    "  --no-mtp                 leave out the MTP layer (default: planned if the model has one)\n"
    "  --redundant R            R extra copies of the hottest experts per MoE layer\n"
    "                           (needs --load-stats)\n"
    "  --eplb-redundant R       set memory aside for the engine's run-time expert load\n"
    "                           balancing with R copies per MoE layer (as serve/batch\n"
    "                           --eplb-redundant R): per rank, the most experts its\n"
    "                           re-placements may add, plus one layer while re-placing\n"
    "                           (column \"EPLB GB\"; default: what serve reserves on\n"
    "                           GPUs, as many copies as ranks for FP8 experts with\n"
    "                           128 x 128 blocks, none otherwise; 0: none)\n"
    "  --eplb-policy P          placement of the copies: global (LPT over all ranks,\n"
    "                           default) or hierarchical (expert groups spread over\n"
    "                           nodes first, then copies packed within each node)\n"
    "  --ranks-per-node N       ranks of one node (hierarchical; must divide --ranks)\n"
    "  --load-stats FILE        expert load statistics, JSON:\n"
    "                           {\"layers\": {\"3\": [tokens per expert, ...], ...}}\n"
    "  --max-batch-tokens T     tokens per forward step, sizes the activation reserve\n"
    "                           and the minimum KV cache (default 8192, the step a GPU\n"
    "                           worker takes by default)\n"
    "  --num-layers N           plan only N layers (as with dummy weights)\n"
    "  --num-experts N          plan only N routed experts per layer\n"
    "  --precision P            the GPUs' numerics, as serve --precision (default as\n"
    "                           serve's: invariant with an MTP layer, else fast): fast\n"
    "                           and invariant keep BF16 latent-cache rows and kv_b\n"
    "                           copies, exact fp32 ones (twice the bytes); exact and\n"
    "                           invariant give any experts EPLB's default copies\n"
    "  --json                   print one JSON object instead of the table\n"
    "  -h, --help               this help\n"
    "\n"
    "Reserve per rank = 2 GiB + T x (activation bytes per token); a rank fits if its KV\n"
    "cache holds at least max(4096, T) tokens (see coordinator/planner.h).\n";

typedef struct plan_opts {
  const char *model, *stats, *gpu_mem_str;
  int64_t ranks, redundant, max_batch, num_layers, num_experts, eplb_redundant;
  uint64_t gpu_mem;
  int json, no_mtp;
  int precision; /* --precision (epic_cluster_parse_precision): 0 fast, 1 exact, 2 invariant;
                    -1 not given */
  epic_eplb_policy policy;
  int64_t ranks_per_node;
} plan_opts;

int epic_plan_cli_size(const char *cmd, const char *flag, const char *val, uint64_t *out) {
  static const struct {
    const char *unit;
    double mult;
  } UNITS[] = {
      {"", 1},
      {"b", 1},
      {"kb", 1e3},
      {"mb", 1e6},
      {"gb", 1e9},
      {"tb", 1e12},
      {"pb", 1e15},
      {"k", 1024.0},
      {"m", 1048576.0},
      {"g", 1073741824.0},
      {"t", 1099511627776.0},
      {"p", 1125899906842624.0},
      {"kib", 1024.0},
      {"mib", 1048576.0},
      {"gib", 1073741824.0},
      {"tib", 1099511627776.0},
      {"pib", 1125899906842624.0},
  };
  char *end;
  errno = 0;
  if (!val || !*val || !(isdigit((unsigned char)val[0]) || val[0] == '.'))
    goto bad;
  if (val[0] == '0' && (val[1] == 'x' || val[1] == 'X'))
    goto bad; /* strtod would take hex */
  const double v = strtod(val, &end);
  if (end == val || errno || !isfinite(v))
    goto bad;
  while (*end == ' ')
    end++;
  for (size_t i = 0; i < sizeof UNITS / sizeof UNITS[0]; i++) {
    if (strcasecmp(end, UNITS[i].unit) != 0)
      continue;
    const double bytes = floor(v * UNITS[i].mult);
    if (bytes < 1 || bytes >= 9223372036854775808.0) {
      fprintf(stderr, "epic %s: %s: '%s' is out of range (1 byte .. 8 EiB)\n", cmd, flag, val);
      return -1;
    }
    *out = (uint64_t)bytes;
    return 0;
  }
bad:
  fprintf(stderr, "epic %s: %s: expected a size like 80GiB, 141GB, 80G or a byte count, got '%s'\n",
          cmd, flag, val ? val : "");
  return -1;
}

/* 1 = --help shown, 0 = ok, -1 = usage error (message printed). */
static int parse(int argc, char **argv, plan_opts *o) {
  enum {
    O_MODEL = 256,
    O_RANKS,
    O_GPUMEM,
    O_JSON,
    O_NOMTP,
    O_RED,
    O_STATS,
    O_MAXB,
    O_NLAYERS,
    O_NEXPERTS,
    O_POLICY,
    O_RPN,
    O_EPLB_RED,
    O_PRECISION
  };
  static const struct option longopts[] = {{"model", required_argument, 0, O_MODEL},
                                           {"ranks", required_argument, 0, O_RANKS},
                                           {"gpu-mem", required_argument, 0, O_GPUMEM},
                                           {"json", no_argument, 0, O_JSON},
                                           {"no-mtp", no_argument, 0, O_NOMTP},
                                           {"redundant", required_argument, 0, O_RED},
                                           {"load-stats", required_argument, 0, O_STATS},
                                           {"max-batch-tokens", required_argument, 0, O_MAXB},
                                           {"num-layers", required_argument, 0, O_NLAYERS},
                                           {"num-experts", required_argument, 0, O_NEXPERTS},
                                           {"eplb-policy", required_argument, 0, O_POLICY},
                                           {"ranks-per-node", required_argument, 0, O_RPN},
                                           {"eplb-redundant", required_argument, 0, O_EPLB_RED},
                                           {"precision", required_argument, 0, O_PRECISION},
                                           {"help", no_argument, 0, 'h'},
                                           {0, 0, 0, 0}};
  const char *cmd = "plan";
  int c;
  memset(o, 0, sizeof *o);
  o->eplb_redundant = -1; /* not given: serve's default, per rank count (plan_params) */
  o->precision = -1;      /* not given: serve's default for the model (plan_params) */
  optind = 1;
  opterr = 0;
  while ((c = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
    int bad = 0;
    switch (c) {
    case O_MODEL: o->model = optarg; break;
    case O_RANKS: bad = epic_cli_i64(cmd, "--ranks", optarg, 1, 1 << 20, &o->ranks); break;
    case O_GPUMEM:
      o->gpu_mem_str = optarg;
      bad = epic_plan_cli_size(cmd, "--gpu-mem", optarg, &o->gpu_mem);
      break;
    case O_JSON: o->json = 1; break;
    case O_NOMTP: o->no_mtp = 1; break;
    case O_RED: bad = epic_cli_i64(cmd, "--redundant", optarg, 0, 1 << 24, &o->redundant); break;
    case O_STATS: o->stats = optarg; break;
    case O_MAXB:
      bad = epic_cli_i64(cmd, "--max-batch-tokens", optarg, 1, (int64_t)1 << 32, &o->max_batch);
      break;
    case O_NLAYERS:
      bad = epic_cli_i64(cmd, "--num-layers", optarg, 1, 1 << 20, &o->num_layers);
      break;
    case O_NEXPERTS:
      bad = epic_cli_i64(cmd, "--num-experts", optarg, 1, 1 << 20, &o->num_experts);
      break;
    case O_POLICY:
      if (epic_eplb_policy_parse(optarg, &o->policy) != EPIC_OK) {
        fprintf(stderr, "epic plan: --eplb-policy: expected global or hierarchical, got '%s'\n",
                optarg);
        bad = -1;
      }
      break;
    case O_RPN:
      bad = epic_cli_i64(cmd, "--ranks-per-node", optarg, 1, 1 << 20, &o->ranks_per_node);
      break;
    case O_EPLB_RED:
      bad = epic_cli_i64(cmd, "--eplb-redundant", optarg, 0, 1 << 24, &o->eplb_redundant);
      break;
    case O_PRECISION: bad = epic_cli_precision(cmd, "--precision", optarg, &o->precision); break;
    case 'h': fputs(USAGE, stdout); return 1;
    case ':':
      fprintf(stderr, "epic plan: %s needs a value (see --help)\n", argv[optind - 1]);
      return -1;
    default:
      fprintf(stderr, "epic plan: unknown option '%s' (see --help)\n", argv[optind - 1]);
      return -1;
    }
    if (bad)
      return -1;
  }
  if (optind < argc) {
    fprintf(stderr, "epic plan: unexpected argument '%s' (see --help)\n", argv[optind]);
    return -1;
  }
  if (!o->model) {
    fputs("epic plan: --model DIR is required (see --help)\n", stderr);
    return -1;
  }
  if (!o->ranks) {
    fputs("epic plan: --ranks N is required (see --help)\n", stderr);
    return -1;
  }
  if (o->policy == EPIC_EPLB_HIERARCHICAL) {
    if (!o->ranks_per_node) {
      fputs("epic plan: --eplb-policy hierarchical needs --ranks-per-node N\n", stderr);
      return -1;
    }
    if (o->ranks % o->ranks_per_node) {
      fprintf(stderr, "epic plan: --ranks-per-node: %lld does not divide --ranks %lld\n",
              (long long)o->ranks_per_node, (long long)o->ranks);
      return -1;
    }
    if (!o->stats && o->eplb_redundant <= 0) {
      fputs("epic plan: --eplb-policy hierarchical needs --load-stats FILE or --eplb-redundant R\n",
            stderr);
      return -1;
    }
  } else if (o->ranks_per_node) {
    fputs("epic plan: --ranks-per-node only applies to --eplb-policy hierarchical\n", stderr);
    return -1;
  }
  if (o->redundant > 0 && !o->stats) {
    fputs("epic plan: --redundant needs --load-stats FILE (which experts are hot)\n", stderr);
    return -1;
  }
  return 0;
}

/* Whether a GPU serve of cfg keeps EPLB copies on by default: the CUDA backend's expert
 * kernel computes a row alike in any group for FP8 experts with 128 x 128 blocks
 * (kernels/cuda/ops_cuda.c, cuda_grouped_invariant; the engine asks the backend itself). */
static int gpu_experts_invariant(const epic_model_config *c) {
  return c->quant.fp8 && c->quant.weight_block_size[0] == 128 &&
         c->quant.weight_block_size[1] == 128 && c->hidden_size % 16 == 0 &&
         c->moe_intermediate_size % 16 == 0;
}

/* --precision, or serve's default: --mtp-draft auto, with the MTP layer unless --no-mtp. */
static int plan_precision(const plan_opts *o, const epic_model_config *cfg) {
  return o->precision >= 0
             ? o->precision
             : epic_cluster_default_precision(!o->no_mtp, cfg->num_nextn_predict_layers);
}

static epic_plan_params plan_params(const plan_opts *o, const epic_model_config *cfg, int ranks,
                                    int with_stats) {
  const int prec = plan_precision(o, cfg);
  /* exact and invariant compute any expert's rows alike in any group (ops_cuda.h) */
  const int invariant = prec != 0 || gpu_experts_invariant(cfg);
  const int64_t eplb = o->eplb_redundant >= 0
                           ? o->eplb_redundant
                           : epic_plan_eplb_copies(0, cfg->n_routed_experts, ranks, invariant);
  const int elem = prec == 1 ? 4 : 2; /* exact: fp32 cache rows and kv_b copies */
  epic_plan_params p = {.size = sizeof p,
                        .cfg = cfg,
                        .n_ranks = ranks,
                        .gpu_mem_bytes = o->gpu_mem,
                        .include_mtp = !o->no_mtp,
                        .n_redundant = with_stats ? (int)o->redundant : 0,
                        .load_stats_path = with_stats ? o->stats : NULL,
                        .max_batch_tokens = o->max_batch, /* 0: the planner's default */
                        /* the policy places layers with statistics and bounds the
                         * run-time copies of --eplb-redundant */
                        .policy = with_stats || eplb ? o->policy : EPIC_EPLB_GLOBAL,
                        .ranks_per_node = with_stats || eplb ? (int)o->ranks_per_node : 0,
                        .eplb_redundant = (int)eplb,
                        .kv_elem_bytes = elem,
                        .head_elem_bytes = elem};
  return p;
}

/* Smallest rank count >= from that fits (no static redundancy; the run-time EPLB
 * copies of --eplb-redundant are counted), or 0 if none up to a bound. */
static int64_t ranks_needed(const plan_opts *o, const epic_model_config *cfg, int64_t from) {
  const int64_t limit = from + 4 * (cfg->n_routed_experts > 0 ? cfg->n_routed_experts : 1);
  for (int64_t n = from; n <= limit && n <= (1 << 20); n++) {
    epic_plan_params p = plan_params(o, cfg, (int)n, 0);
    epic_plan *pl = NULL;
    if (epic_plan_create(&p, &pl) != EPIC_OK)
      return 0;
    const int fits = epic_plan_fits(pl);
    epic_plan_destroy(pl);
    if (fits)
      return n;
  }
  return 0;
}

/* One line on stderr saying which rank does not fit and why. */
static void explain_misfit(const plan_opts *o, const epic_model_config *cfg, const epic_plan *pl) {
  int worst = -1;
  epic_rank_memory m, wm = {0};
  for (int r = 0; r < epic_plan_n_ranks(pl); r++) {
    epic_plan_rank_memory(pl, r, &m);
    if (!m.fits && (worst < 0 || m.kv_budget_bytes < wm.kv_budget_bytes)) {
      worst = r;
      wm = m;
    }
  }
  if (worst < 0)
    return;
  char hint[96] = "";
  const int64_t need = ranks_needed(o, cfg, epic_plan_n_ranks(pl) + 1);
  if (need > 0)
    snprintf(hint, sizeof hint, "; %lld ranks of this size would fit", (long long)need);
  char eplb[64] = "";
  if (wm.eplb_bytes)
    snprintf(eplb, sizeof eplb, " + %.1f GB for EPLB copies", (double)wm.eplb_bytes / 1e9);
  if (wm.weight_bytes + wm.reserve_bytes + wm.eplb_bytes > o->gpu_mem)
    fprintf(stderr,
            "epic plan: does not fit: rank %d needs %.1f GB of weights + %.1f GB reserve%s, more "
            "than --gpu-mem %s (%.1f GB)%s\n",
            worst, (double)wm.weight_bytes / 1e9, (double)wm.reserve_bytes / 1e9, eplb,
            o->gpu_mem_str, (double)o->gpu_mem / 1e9, hint);
  else
    fprintf(stderr,
            "epic plan: does not fit: rank %d has room for only %lld KV tokens after %.1f GB of "
            "weights + %.1f GB reserve%s in --gpu-mem %s; at least %lld needed%s\n",
            worst, (long long)wm.kv_tokens, (double)wm.weight_bytes / 1e9,
            (double)wm.reserve_bytes / 1e9, eplb, o->gpu_mem_str,
            (long long)epic_plan_min_kv_tokens(pl), hint);
}

int epic_cmd_plan(int argc, char **argv) {
  plan_opts o;
  epic_model_config cfg;
  epic_plan *pl = NULL;
  int rc = 1;
  const int pr = parse(argc, argv, &o);
  if (pr)
    return pr > 0 ? 0 : 2;
  epic_log_init(EPIC_LOG_LEVEL_WARN, -1);
  if (epic_config_load_dir(o.model, &cfg) != EPIC_OK)
    return 1;
  if ((o.num_layers || o.num_experts) &&
      epic_config_override(&cfg, o.num_layers, o.num_experts) != EPIC_OK)
    return 2;
  const int64_t E = cfg.n_routed_experts;
  if (o.redundant > E * (o.ranks - 1)) {
    fprintf(stderr,
            "epic plan: --redundant: %lld is more than %lld (each of %lld experts at most once "
            "per rank on %lld ranks)\n",
            (long long)o.redundant, (long long)(E * (o.ranks - 1)), (long long)E,
            (long long)o.ranks);
    return 2;
  }
  if (o.eplb_redundant > E * (o.ranks - 1)) {
    fprintf(stderr,
            "epic plan: --eplb-redundant: %lld is more than %lld (each of %lld experts at most "
            "once per rank on %lld ranks)\n",
            (long long)o.eplb_redundant, (long long)(E * (o.ranks - 1)), (long long)E,
            (long long)o.ranks);
    return 2;
  }
  epic_plan_params p = plan_params(&o, &cfg, (int)o.ranks, 1);
  if (epic_plan_create(&p, &pl) != EPIC_OK)
    return 1;
  if (!o.json) { /* what the bytes per token and the EPLB default assume */
    const int prec = plan_precision(&o, &cfg);
    printf("GPU precision: %s%s\n", epic_cluster_precision_name(prec),
           o.precision >= 0 ? ""
           : prec           ? " (serve's default: --mtp-draft auto drafts with the MTP layer)"
                            : " (serve's default)");
  }
  const epic_status st =
      o.json ? epic_plan_write_json(pl, stdout) : epic_plan_write_table(pl, stdout);
  if (st != EPIC_OK || fflush(stdout) != 0) {
    fputs("epic plan: cannot write the plan to stdout\n", stderr);
    goto done;
  }
  if (!epic_plan_fits(pl)) {
    explain_misfit(&o, &cfg, pl);
    goto done;
  }
  rc = 0;
done:
  epic_plan_destroy(pl);
  return rc;
}
