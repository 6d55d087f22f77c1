#include "cli_engine.h"

#include <string.h>

#include "cli_util.h"
#include "cmd_plan.h"
#include "coordinator/planner.h"

typedef struct flag_info {
  const char *name, *arg, *help;
} flag_info;

/* In epic_cli_engine_opt order. The ranges below are the widest any command
 * accepted before they shared this table, capped where the engine caps them
 * (engine.c: kv_pages and step_tokens <= INT32_MAX). */
static const flag_info FLAGS[EPIC_CLI_ENGINE_N] = {
    {"model", "DIR", "checkpoint directory (config.json, safetensors, tokenizer)"},
    {"load-format", "F",
     "auto (safetensors), dummy (random weights from config.json) or dummy-mtp\n"
     "(dummy, with an MTP layer that mostly drafts what the model picks: MTP\n"
     "benchmarks)"},
    {"num-layers", "N", "use only N layers (with dummy weights, for benchmarks)"},
    {"num-experts", "N", "use only N routed experts (likewise)"},
    {"weight-seed", "S", "seed of dummy weights (default 0)"},
    {"threads", "N", "compute threads per rank (default: all cores)"},
    {"comm", "NAME", "expert-parallel backend under mpirun: auto, mpi, ucx or nccl"},
    {"mem-per-rank", "SIZE",
     "memory a rank may use (e.g. 141GB): the plan must fit, checked before loading"},
    {"device", "D",
     "compute backend: auto (a GPU when the build and the node have one), cpu, cuda,\n"
     "or cuda:N (GPU N; plain cuda picks the node-local rank's GPU)"},
    {"cuda-graphs", "on|off",
     "record single-process decode steps of up to 128 sequences as CUDA graphs and\n"
     "replay them (default on; outputs are the same either way)"},
    {"precision", "P",
     "GPU numerics: fast (e4m3 / bf16 activations, bf16 latent cache, the fastest\n"
     "kernel for each row count), invariant (the same class, every row computed\n"
     "alike whatever the batch, so --mtp-draft auto drafts; slower at batch 1) or\n"
     "exact (fp32 GEMMs and cache, matching the CPU; slow). Default: invariant where\n"
     "--mtp-draft auto (serve, batch) has an MTP layer to draft with, else fast. CPU\n"
     "ranks always compute fp32 rows alike. Overrides EPIC_CUDA_PRECISION"},
    {"max-batch", "N", "running sequences in the cluster (default 256)"},
    {"max-queue", "N", "waiting requests in the engine (default 1024)"},
    {"kv-cache", "SIZE", "KV cache per worker, e.g. 4GiB (default 1GiB)"},
    {"kv-pages", "N", "KV cache pages per worker (default: 1 GiB worth)"},
    {"page-size", "N", "tokens per KV cache page (default 64)"},
    {"max-context", "N", "prompt + completion tokens of a request (default: the model's)"},
    {"step-tokens", "N",
     "per-worker token budget of one step (default 8192 on a GPU, 2048 on a CPU)"},
    {"prefill-chunk", "N", "prompt tokens of one sequence per step (default: --step-tokens)"},
    {"micro-batches", "N", "1, or 2 for two-micro-batch pipelining (default 1)"},
    {"prefix-cache", "SIZE|off",
     "KV cache per worker kept for prompt prefixes that later requests reuse\n"
     "(idle pages, given back when needed; default: half of the KV cache)"},
    {"mtp-draft", "K|auto|off",
     "MTP speculative decoding: K draft tokens per step (1..16), off, or auto\n"
     "(default: 1 draft for greedy requests when the checkpoint has an MTP layer,\n"
     "on CPU ranks and on GPUs in the exact or invariant precision, which is then\n"
     "the GPUs' default; with --precision fast only with an explicit K, see README;\n"
     "a sequence stops drafting when fewer than half of its drafts are accepted).\n"
     "Greedy output is identical to off; with K, sampled output has the same\n"
     "distribution (other draws: seeded requests give other tokens than off)"},
    {"eplb-redundant", "R",
     "expert load balancing under mpirun: R extra copies of hot experts per MoE\n"
     "layer, re-placed between steps from the live routing counts when that lowers\n"
     "the max/mean rank load by 5% (outputs unchanged); 0 = off (default: as many\n"
     "copies as ranks, i.e. one more expert per rank and layer, where a row's\n"
     "expert result does not depend on its group: CPU ranks, GPU ranks with FP8\n"
     "experts; off for one rank and for BF16 experts on GPUs, whose fast GEMMs\n"
     "follow the group's size). --mem-per-rank counts\n"
     "the copies' memory (epic plan --eplb-redundant R shows it)"},
    {"eplb-interval", "STEPS", "steps between expert re-placements (default 256)"},
    {"eplb-policy", "P",
     "global (LPT over all ranks, default) or hierarchical (expert groups spread\n"
     "over nodes first, copies packed within each node; nodes from mpirun's mapping)"},
};

void epic_cli_engine_init(epic_cli_engine_opts *o, const char *cmd, unsigned mask) {
  memset(o, 0, sizeof *o);
  o->cmd = cmd;
  o->mask = mask;
  o->page_size = 64;
  o->micro_batches = 1;
  o->mtp_draft = (mask & EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_MTP_DRAFT)) ? 0 : -1;
}

int epic_cli_engine_longopts(const epic_cli_engine_opts *o, const struct option *own,
                             struct option *out, size_t cap) {
  size_t n = 0;
  for (; own && own->name; own++) {
    if (n + 1 >= cap)
      goto full;
    out[n++] = *own;
  }
  for (int i = 0; i < EPIC_CLI_ENGINE_N; i++) {
    if (!(o->mask & EPIC_CLI_ENGINE_BIT(i)))
      continue;
    if (n + 1 >= cap)
      goto full;
    out[n++] = (struct option){FLAGS[i].name, required_argument, NULL, EPIC_CLI_ENGINE_CODE_BASE + i};
  }
  out[n] = (struct option){0, 0, 0, 0};
  return 0;
full:
  fprintf(stderr, "epic %s: internal error: option table too small (%zu)\n", o->cmd, cap);
  return -1;
}

int epic_cli_precision(const char *cmd, const char *flag, const char *arg, int *out) {
  if (epic_cluster_parse_precision(arg, out) == EPIC_OK)
    return 0;
  fprintf(stderr, "epic %s: %s: expected fast, exact or invariant, got '%s'\n", cmd, flag, arg);
  return -1;
}

int epic_cli_engine_parse(epic_cli_engine_opts *o, int code, const char *arg) {
  const int i = code - EPIC_CLI_ENGINE_CODE_BASE;
  if (i < 0 || i >= EPIC_CLI_ENGINE_N || !(o->mask & EPIC_CLI_ENGINE_BIT(i)))
    return 0;
  const char *cmd = o->cmd;
  char flag[32];
  snprintf(flag, sizeof flag, "--%s", FLAGS[i].name);
  int bad = 0;
  switch ((epic_cli_engine_opt)i) {
  case EPIC_CLI_ENGINE_MODEL: o->model = arg; break;
  case EPIC_CLI_ENGINE_LOAD_FORMAT:
    if (strcmp(arg, "dummy") == 0) {
      o->dummy = 1;
    } else if (strcmp(arg, "dummy-mtp") == 0) {
      o->dummy = 2;
    } else if (strcmp(arg, "auto") != 0 && strcmp(arg, "safetensors") != 0) {
      fprintf(stderr, "epic %s: %s: expected auto, dummy or dummy-mtp, got '%s'\n", cmd, flag, arg);
      bad = -1;
    }
    break;
  case EPIC_CLI_ENGINE_NUM_LAYERS: bad = epic_cli_i64(cmd, flag, arg, 1, 1 << 20, &o->num_layers); break;
  case EPIC_CLI_ENGINE_NUM_EXPERTS:
    bad = epic_cli_i64(cmd, flag, arg, 1, 1 << 20, &o->num_experts);
    break;
  case EPIC_CLI_ENGINE_WEIGHT_SEED: bad = epic_cli_u64(cmd, flag, arg, &o->weight_seed); break;
  case EPIC_CLI_ENGINE_THREADS: bad = epic_cli_i64(cmd, flag, arg, 1, 4096, &o->threads); break;
  case EPIC_CLI_ENGINE_COMM:
    /* Checked here so that a typo fails at once on every rank, before MPI or loading. */
    if (strcmp(arg, "auto") && strcmp(arg, "mpi") && strcmp(arg, "ucx") && strcmp(arg, "nccl")) {
      fprintf(stderr, "epic %s: %s: expected auto, mpi, ucx or nccl, got '%s' (this build has %s)\n",
              cmd, flag, arg, epic_comm_backends());
      bad = -1;
    }
    o->comm = arg;
    break;
  case EPIC_CLI_ENGINE_MEM_PER_RANK: bad = epic_plan_cli_size(cmd, flag, arg, &o->mem_per_rank); break;
  case EPIC_CLI_ENGINE_DEVICE:
    if (epic_cluster_parse_device(arg, NULL, NULL) != EPIC_OK) {
      fprintf(stderr, "epic %s: %s: expected auto, cpu, cuda or cuda:N, got '%s'\n", cmd, flag, arg);
      bad = -1;
    }
    o->device = arg;
    break;
  case EPIC_CLI_ENGINE_CUDA_GRAPHS:
    if (strcmp(arg, "on") != 0 && strcmp(arg, "off") != 0) {
      fprintf(stderr, "epic %s: %s: expected on or off, got '%s'\n", cmd, flag, arg);
      bad = -1;
    }
    o->no_graphs = strcmp(arg, "off") == 0;
    break;
  case EPIC_CLI_ENGINE_PRECISION:
    bad = epic_cli_precision(cmd, flag, arg, NULL);
    o->precision = arg;
    break;
  case EPIC_CLI_ENGINE_MAX_BATCH: bad = epic_cli_i64(cmd, flag, arg, 1, 1 << 24, &o->max_batch); break;
  case EPIC_CLI_ENGINE_MAX_QUEUE: bad = epic_cli_i64(cmd, flag, arg, 1, 1 << 24, &o->max_queue); break;
  case EPIC_CLI_ENGINE_KV_CACHE: bad = epic_plan_cli_size(cmd, flag, arg, &o->kv_bytes); break;
  case EPIC_CLI_ENGINE_KV_PAGES: bad = epic_cli_i64(cmd, flag, arg, 1, INT32_MAX, &o->kv_pages); break;
  case EPIC_CLI_ENGINE_PAGE_SIZE: bad = epic_cli_i64(cmd, flag, arg, 1, 1 << 20, &o->page_size); break;
  case EPIC_CLI_ENGINE_MAX_CONTEXT:
    bad = epic_cli_i64(cmd, flag, arg, 2, INT32_MAX, &o->max_context);
    break;
  case EPIC_CLI_ENGINE_STEP_TOKENS:
    bad = epic_cli_i64(cmd, flag, arg, 1, INT32_MAX, &o->step_tokens);
    break;
  case EPIC_CLI_ENGINE_PREFILL_CHUNK:
    bad = epic_cli_i64(cmd, flag, arg, 1, INT32_MAX, &o->prefill_chunk);
    break;
  case EPIC_CLI_ENGINE_MICRO_BATCHES:
    bad = epic_cli_i64(cmd, flag, arg, 1, 2, &o->micro_batches);
    break;
  case EPIC_CLI_ENGINE_PREFIX_CACHE:
    o->prefix_cache_pages = 0;
    o->prefix_cache_bytes = 0;
    if (strcmp(arg, "off") == 0)
      o->prefix_cache_pages = -1;
    else if ((bad = epic_plan_cli_size(cmd, flag, arg, &o->prefix_cache_bytes)) == 0 &&
             o->prefix_cache_bytes == 0)
      o->prefix_cache_pages = -1; /* 0 bytes: off, not the default */
    break;
  case EPIC_CLI_ENGINE_MTP_DRAFT:
    if (strcmp(arg, "auto") == 0)
      o->mtp_draft = 0;
    else if (strcmp(arg, "off") == 0)
      o->mtp_draft = -1;
    else
      bad = epic_cli_i64(cmd, flag, arg, 1, EPIC_ENGINE_MAX_MTP_DRAFT, &o->mtp_draft);
    break;
  case EPIC_CLI_ENGINE_EPLB_REDUNDANT:
    bad = epic_cli_i64(cmd, flag, arg, 0, 1 << 24, &o->eplb_redundant);
    if (!bad && o->eplb_redundant == 0)
      o->eplb_redundant = -1; /* off, not the engine's auto */
    break;
  case EPIC_CLI_ENGINE_EPLB_INTERVAL:
    bad = epic_cli_i64(cmd, flag, arg, 1, INT32_MAX, &o->eplb_interval);
    break;
  case EPIC_CLI_ENGINE_EPLB_POLICY: {
    epic_eplb_policy pol = EPIC_EPLB_GLOBAL;
    if (epic_eplb_policy_parse(arg, &pol) != EPIC_OK) {
      fprintf(stderr, "epic %s: %s: expected global or hierarchical, got '%s'\n", cmd, flag, arg);
      bad = -1;
    }
    o->eplb_policy = (int)pol;
    break;
  }
  case EPIC_CLI_ENGINE_N: return 0;
  }
  return bad ? -1 : 1;
}

int epic_cli_engine_check(const epic_cli_engine_opts *o, int argc, char **argv) {
  if (optind < argc) {
    fprintf(stderr, "epic %s: unexpected argument '%s' (see --help)\n", o->cmd, argv[optind]);
    return -1;
  }
  if (!o->model) {
    fprintf(stderr, "epic %s: --model DIR is required (see --help)\n", o->cmd);
    return -1;
  }
  /* 0 would silently mean the engine's default, which the user did not ask for. */
  if ((o->mask & EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_KV_CACHE)) && o->kv_bytes == 0) {
    fprintf(stderr, "epic %s: --kv-cache: must be > 0\n", o->cmd);
    return -1;
  }
  return 0;
}

/* Writes text at column, continuation lines (after '\n') indented alike. */
static void help_text(FILE *f, const char *text, int column) {
  while (*text) {
    const char *nl = strchr(text, '\n');
    const int len = nl ? (int)(nl - text) : (int)strlen(text);
    fprintf(f, "%.*s\n", len, text);
    if (!nl)
      return;
    text = nl + 1;
    fprintf(f, "%*s", column, "");
  }
  fputc('\n', f);
}

void epic_cli_engine_help(FILE *f, const epic_cli_engine_opts *o, unsigned mask, int column,
                          const epic_cli_engine_help_line *own, size_t n_own) {
  for (int i = 0; i < EPIC_CLI_ENGINE_N; i++) {
    if (!(mask & o->mask & EPIC_CLI_ENGINE_BIT(i)))
      continue;
    const char *arg = FLAGS[i].arg, *text = FLAGS[i].help;
    if (i == EPIC_CLI_ENGINE_KV_PAGES && (o->mask & EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_KV_CACHE)))
      text = "KV cache pages per worker (overrides --kv-cache)";
    for (size_t k = 0; k < n_own; k++)
      if ((int)own[k].opt == i) {
        arg = own[k].arg ? own[k].arg : arg;
        text = own[k].text;
      }
    int w = fprintf(f, "  --%s %s", FLAGS[i].name, arg);
    fprintf(f, "%*s", w < column ? column - w : 1, "");
    help_text(f, text, column);
  }
}

void epic_cli_engine_cluster_params(const epic_cli_engine_opts *o, epic_cluster_params *cp) {
  *cp = (epic_cluster_params){.size = sizeof *cp,
                              .cmd = o->cmd,
                              .model_dir = o->model,
                              .comm = o->comm,
                              .dummy = o->dummy,
                              .weight_seed = o->weight_seed,
                              .num_layers = o->num_layers,
                              .num_experts = o->num_experts,
                              .threads = o->threads,
                              .device = o->device,
                              .step_graphs = o->no_graphs ? -1 : 0,
                              .precision = o->precision,
                              .mem_per_rank = o->mem_per_rank,
                              .max_batch_tokens = o->step_tokens,
                              .eplb_redundant = o->eplb_redundant,
                              .load_mtp = o->mtp_draft >= 0,
                              .mtp_auto = o->mtp_draft == 0,
                              .progress = 1};
}

void epic_cli_engine_engine_params(const epic_cli_engine_opts *o, epic_model *model,
                                   epic_comm *comm, epic_engine_params *ep) {
  *ep = (epic_engine_params){.size = sizeof *ep,
                             .model = model,
                             .comm = comm,
                             .page_size = o->page_size,
                             .kv_pages = o->kv_pages,
                             .kv_bytes = (size_t)o->kv_bytes,
                             .max_batch = o->max_batch,
                             .max_queue = o->max_queue,
                             /* unset: the backend's step (the plan reserved for it) */
                             .step_tokens = o->step_tokens
                                                ? o->step_tokens
                                                : epic_ops_step_tokens(epic_model_ops(model)),
                             .prefill_chunk = o->prefill_chunk,
                             .max_context = o->max_context,
                             .micro_batches = (int)o->micro_batches,
                             .prefix_cache_pages = o->prefix_cache_pages,
                             .prefix_cache_bytes = (size_t)o->prefix_cache_bytes,
                             .mtp_draft = o->mtp_draft,
                             .eplb_redundant = o->eplb_redundant,
                             .eplb_interval = o->eplb_interval,
                             .eplb_policy = o->eplb_policy};
}
