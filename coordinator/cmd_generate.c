/* `epic generate`: one prompt through the model on this machine, streamed; or
 * many prompts at once (--requests FILE.jsonl) through the serving engine, on
 * one process or under mpirun. */
#define _GNU_SOURCE
#include "cmd_generate.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli_engine.h"
#include "cli_util.h"
#include "cmd_plan.h"
#include "comm/comm.h"
#include "common/clock.h"
#include "common/log.h"
#include "common/npy.h"
#include "coordinator/cluster.h"
#include "coordinator/engine.h"
#include "coordinator/tokenizer/chat.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "kernels/ops.h"
#include "worker/generate.h"
#include "worker/model.h"

static const char *USAGE_HEAD =
    "usage: epic generate --model DIR (--prompt-ids IDS | --prompt TEXT [--chat]) [options]\n"
    "       epic generate --model DIR --requests FILE.jsonl [options]\n"
    "       mpirun -np N epic generate ... (experts spread over the N ranks)\n"
    "\n"
    "Runs one prompt through the model on this machine (CPU or GPU, --device) and streams the\n"
    "generated text to stdout (or prints one JSON line with --json).\n"
    "With --requests, runs every request of FILE at once through the serving engine\n"
    "(continuous batching, chunked prefill; under mpirun each sequence's KV cache\n"
    "lives on one rank) and prints one JSON line per request, in input order:\n"
    "  {\"index\",\"prompt_ids\",\"output_ids\",\"finish_reason\",\"text\" (with a tokenizer)}\n"
    "FILE has one JSON object per line: {\"prompt_ids\":[...],\"max_new_tokens\":N} and\n"
    "optionally \"temperature\", \"top_p\", \"top_k\", \"seed\", \"ignore_eos\"; the\n"
    "command-line values are the defaults of every field but prompt_ids. Blank lines\n"
    "are skipped.\n"
    "\n"
    "input:\n"
    "  --model DIR             checkpoint directory (config.json, safetensors, tokenizer)\n"
    "  --prompt-ids IDS        comma-separated token ids, used as given (e.g. 0,17,5)\n"
    "  --prompt TEXT           text prompt, tokenized with the model's tokenizer (BOS added)\n"
    "  --chat                  apply the chat template to --prompt as a user turn\n"
    "  --system TEXT           system prompt for --chat\n"
    "  --chat-template NAME    auto (from tokenizer_config.json), v3 or r1\n"
    "  --no-bos                with a raw --prompt, do not prepend BOS\n"
    "  --requests FILE         many requests, one JSON object per line (see above)\n"
    "sampling:\n"
    "  --max-new-tokens N      tokens to generate (default 128)\n"
    "  --temperature T         0 = greedy (default 0)\n"
    "  --top-p P               nucleus sampling mass in (0, 1] (default 1)\n"
    "  --top-k K               keep the K most likely tokens, 0 = all (default 0)\n"
    "  --seed S                sampling seed (default 0)\n"
    "  --ignore-eos            do not stop at the end-of-sequence token\n"
    "  --mtp-draft K           speculative decoding: the MTP layer drafts K tokens a step and\n"
    "                          the model verifies them (0 = off, default 0; not with --requests);\n"
    "                          greedy output is unchanged, sampling keeps its distribution\n"
    "output:\n"
    "  --json                  print {\"prompt_ids\",\"output_ids\",\"finish_reason\",\"text\",...}\n"
    "                          (with \"mtp_draft\", \"mtp_acceptance_rate\": accepted / drafted\n"
    "                          tokens, \"mtp_mean_accepted\": tokens per verify step)\n"
    "  --dump-logits FILE      float32 .npy [T+N-1, vocab]: a row per processed position\n"
    "  --dump-mtp-logits FILE  float32 .npy [T-1, vocab]: the MTP head over the prompt\n"
    "engine:\n";

static const char *USAGE_TAIL =
    "  -v, --verbose           timing and load information on stderr\n"
    "  -h, --help              this help\n";

typedef struct gen_opts {
  epic_cli_engine_opts e; /* model loading and engine scheduling */
  const char *prompt_ids, *prompt, *system, *dump_logits, *dump_mtp, *template_name;
  const char *requests;
  int chat, no_bos, json, ignore_eos, verbose;
  int64_t max_new, top_k, mtp_draft;
  float temperature, top_p;
  uint64_t seed;
} gen_opts;

typedef struct stream_ctx {
  epic_detok *detok;
  int json;
} stream_ctx;

static epic_status on_token(void *user, int32_t id, float logprob) {
  stream_ctx *sc = user;
  char *text = NULL;
  size_t n = 0;
  (void)logprob;
  if (sc->json || !sc->detok) return EPIC_OK;
  EPIC_CHECK(epic_detok_push(sc->detok, id, &text, &n));
  if (n) {
    fwrite(text, 1, n, stdout);
    fflush(stdout);
  }
  epic_tokenizer_text_free(text);
  return EPIC_OK;
}

/* Where generate's wording differs: the single-prompt path has no scheduler,
 * several settings apply to --requests only. */
static const epic_cli_engine_help_line HELP_OWN[] = {
    {EPIC_CLI_ENGINE_COMM, NULL,
     "expert-parallel backend under mpirun: auto, mpi, ucx or nccl\n"
     "(default auto; used whenever the job has several ranks)"},
    {EPIC_CLI_ENGINE_MAX_BATCH, NULL, "--requests: sequences running at once in the job (default 256)"},
    {EPIC_CLI_ENGINE_KV_PAGES, NULL,
     "--requests: KV cache pages per rank (default: room for every\n"
     "request at once, at most 1 GiB)"},
    {EPIC_CLI_ENGINE_STEP_TOKENS, NULL, "--requests: tokens per rank and step (default 2048)"},
    {EPIC_CLI_ENGINE_PREFILL_CHUNK, NULL,
     "prompt tokens per forward step (default: whole prompt;\n"
     "with --requests, per sequence and step, default --step-tokens)"},
    {EPIC_CLI_ENGINE_MICRO_BATCHES, "1|2",
     "split each rank's batch in two so that one half's compute\n"
     "overlaps the other's all-to-alls (default 1; same results)"}};

static void usage(const epic_cli_engine_opts *e) {
  const unsigned model = EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_MODEL);
  const size_t n_own = sizeof HELP_OWN / sizeof HELP_OWN[0];
  fputs(USAGE_HEAD, stdout);
  epic_cli_engine_help(stdout, e, ~model, 26, HELP_OWN, n_own);
  fputs(USAGE_TAIL, stdout);
}

static int parse(int argc, char **argv, gen_opts *o) {
  enum { O_PIDS = 256, O_PROMPT, O_CHAT, O_SYSTEM, O_NOBOS, O_MAXNEW, O_TEMP, O_TOPP, O_TOPK,
         O_SEED, O_IGNEOS, O_JSON, O_DUMP, O_DUMPMTP, O_TEMPLATE, O_REQUESTS, O_MTPDRAFT };
  static const struct option own[] = {
      {"prompt-ids", required_argument, 0, O_PIDS},
      {"prompt", required_argument, 0, O_PROMPT},
      {"chat", no_argument, 0, O_CHAT},
      {"system", required_argument, 0, O_SYSTEM},
      {"chat-template", required_argument, 0, O_TEMPLATE},
      {"no-bos", no_argument, 0, O_NOBOS},
      {"max-new-tokens", required_argument, 0, O_MAXNEW},
      {"temperature", required_argument, 0, O_TEMP},
      {"top-p", required_argument, 0, O_TOPP},
      {"top-k", required_argument, 0, O_TOPK},
      {"seed", required_argument, 0, O_SEED},
      {"ignore-eos", no_argument, 0, O_IGNEOS},
      {"json", no_argument, 0, O_JSON},
      {"dump-logits", required_argument, 0, O_DUMP},
      {"dump-mtp-logits", required_argument, 0, O_DUMPMTP},
      {"requests", required_argument, 0, O_REQUESTS},
      {"mtp-draft", required_argument, 0, O_MTPDRAFT},
      {"verbose", no_argument, 0, 'v'},
      {"help", no_argument, 0, 'h'},
      {0, 0, 0, 0}};
  struct option longopts[64];
  const char *cmd = "generate";
  int c;
  memset(o, 0, sizeof *o);
  /* No --max-queue (sized to the file), --kv-cache or --max-context; the
   * scheduling settings left 0 take the engine's defaults. */
  epic_cli_engine_init(&o->e, cmd,
                       (EPIC_CLI_ENGINE_LOAD_ALL | EPIC_CLI_ENGINE_SCHED_ALL) &
                           ~(EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_MAX_QUEUE) |
                             EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_KV_CACHE) |
                             EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_MAX_CONTEXT) |
                             EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_MTP_DRAFT)));
  o->max_new = 128;
  o->top_p = 1.0f;
  o->template_name = "auto";
  if (epic_cli_engine_longopts(&o->e, own, longopts, sizeof longopts / sizeof longopts[0]))
    return -1;
  optind = 1;
  while ((c = getopt_long(argc, argv, "vh", longopts, NULL)) != -1) {
    int bad = epic_cli_engine_parse(&o->e, c, optarg);
    if (bad) {
      bad = bad < 0;
    } else {
      switch (c) {
      case O_PIDS: o->prompt_ids = optarg; break;
      case O_PROMPT: o->prompt = optarg; break;
      case O_CHAT: o->chat = 1; break;
      case O_SYSTEM: o->system = optarg; break;
      case O_TEMPLATE: o->template_name = optarg; break;
      case O_NOBOS: o->no_bos = 1; break;
      case O_MAXNEW: bad = epic_cli_i64(cmd, "--max-new-tokens", optarg, 0, 1 << 30, &o->max_new); break;
      case O_TEMP: bad = epic_cli_f32(cmd, "--temperature", optarg, 0, 1e6, &o->temperature); break;
      case O_TOPP: bad = epic_cli_f32(cmd, "--top-p", optarg, 1e-9, 1, &o->top_p); break;
      case O_TOPK: bad = epic_cli_i64(cmd, "--top-k", optarg, 0, INT32_MAX, &o->top_k); break;
      case O_SEED: bad = epic_cli_u64(cmd, "--seed", optarg, &o->seed); break;
      case O_IGNEOS: o->ignore_eos = 1; break;
      case O_JSON: o->json = 1; break;
      case O_DUMP: o->dump_logits = optarg; break;
      case O_DUMPMTP: o->dump_mtp = optarg; break;
      case O_REQUESTS: o->requests = optarg; break;
      case O_MTPDRAFT: bad = epic_cli_i64(cmd, "--mtp-draft", optarg, 0, 16, &o->mtp_draft); break;
      case 'v': o->verbose = 1; break;
      case 'h': usage(&o->e); return 1;
      default: fputs("epic generate: see --help\n", stderr); return -1;
      }
    }
    if (bad) return -1;
  }
  if (epic_cli_engine_check(&o->e, argc, argv)) return -1;
  if (o->requests) {
    const char *other = o->prompt_ids ? "--prompt-ids" : o->prompt ? "--prompt" : o->chat ? "--chat"
                        : o->system ? "--system" : o->dump_logits ? "--dump-logits"
                        : o->dump_mtp ? "--dump-mtp-logits" : o->mtp_draft ? "--mtp-draft" : NULL;
    if (other) {
      fprintf(stderr, "epic generate: %s cannot be combined with --requests\n", other);
      return -1;
    }
    return 0;
  }
  if (!!o->prompt_ids + !!o->prompt != 1) {
    fputs("epic generate: give exactly one of --prompt-ids, --prompt and --requests\n", stderr);
    return -1;
  }
  if ((o->chat || o->system) && !o->prompt) {
    fputs("epic generate: --chat and --system need --prompt TEXT\n", stderr);
    return -1;
  }
  if (o->system && !o->chat) {
    fputs("epic generate: --system needs --chat\n", stderr);
    return -1;
  }
  return 0;
}

/* Prompt ids from --prompt-ids, or the (chat-templated) text prompt. */
static int build_prompt(const gen_opts *o, const epic_model_config *cfg, const epic_tokenizer *tok,
                        int32_t **ids, int64_t *n) {
  if (o->prompt_ids) return epic_cli_ids("generate", "--prompt-ids", o->prompt_ids, cfg->vocab_size, ids, n);
  if (!tok) {
    fprintf(stderr, "epic generate: --prompt needs %s/tokenizer.json\n", o->e.model);
    return -1;
  }
  size_t nn = 0;
  epic_status st;
  if (o->chat) {
    epic_chat_message msgs[2];
    size_t nm = 0;
    epic_chat_template tmpl;
    if (epic_chat_template_parse(o->template_name, &tmpl) != EPIC_OK) {
      fprintf(stderr, "epic generate: --chat-template: expected auto, v3 or r1, got '%s'\n",
              o->template_name);
      return -1;
    }
    if (o->system) msgs[nm++] = (epic_chat_message){.role = EPIC_ROLE_SYSTEM, .content = o->system};
    msgs[nm++] = (epic_chat_message){.role = EPIC_ROLE_USER, .content = o->prompt};
    st = epic_chat_encode(tok, tmpl, msgs, nm, 1, ids, &nn, NULL, NULL);
  } else {
    st = epic_tokenizer_encode(tok, o->prompt, strlen(o->prompt),
                               !o->no_bos && epic_tokenizer_bos_id(tok) >= 0, ids, &nn);
  }
  if (st != EPIC_OK) return -1;
  *n = (int64_t)nn;
  if (*n == 0) {
    fputs("epic generate: --prompt: the prompt encodes to no tokens\n", stderr);
    return -1;
  }
  for (int64_t i = 0; i < *n; i++)
    if ((*ids)[i] >= cfg->vocab_size) {
      fprintf(stderr, "epic generate: tokenizer id %d is outside the model's vocabulary (%lld)\n",
              (*ids)[i], (long long)cfg->vocab_size);
      return -1;
    }
  return 0;
}

/* ------------------------------------------------------------- --requests */

/* One request of the file and, after the run, its result. */
typedef struct req_line {
  int32_t *prompt;
  int64_t n_prompt, max_new;
  epic_sampling_params sp;
  int ignore_eos;
  int32_t *out;
  int64_t n_out, cap_out;
  epic_engine_finish finish;
  int done;
} req_line;

typedef struct req_file {
  const char *path;
  long long line;
} req_file;

static int req_error(const req_file *f, const char *field, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int req_error(const req_file *f, const char *field, const char *fmt, ...) {
  va_list ap;
  fprintf(stderr, "epic generate: --requests %s line %lld: ", f->path, f->line);
  if (field) fprintf(stderr, "\"%s\": ", field);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  return -1;
}

/* An integral JSON number in [min, max] (doubles hold integers exactly up to 2^53). */
static int json_int(const cJSON *v, int64_t min, int64_t max, int64_t *out) {
  if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < (double)min ||
      v->valuedouble > (double)max)
    return -1;
  *out = (int64_t)v->valuedouble;
  return 0;
}

static int parse_request(const req_file *f, const cJSON *obj, const epic_model_config *cfg,
                         const gen_opts *o, req_line *r) {
  const cJSON *it;
  int have_prompt = 0;
  int64_t v;
  if (!cJSON_IsObject(obj)) return req_error(f, NULL, "expected a JSON object");
  r->max_new = o->max_new;
  r->ignore_eos = o->ignore_eos;
  r->sp = (epic_sampling_params){.size = sizeof r->sp,
                                 .temperature = o->temperature,
                                 .top_p = o->top_p,
                                 .top_k = o->top_k,
                                 .seed = o->seed};
  cJSON_ArrayForEach(it, obj) {
    const char *k = it->string;
    if (strcmp(k, "prompt_ids") == 0) {
      int n = cJSON_GetArraySize(it), i = 0;
      const cJSON *id;
      if (!cJSON_IsArray(it) || n < 1)
        return req_error(f, k, "expected a non-empty array of token ids");
      r->prompt = malloc((size_t)n * sizeof *r->prompt);
      if (!r->prompt) return req_error(f, k, "out of memory");
      cJSON_ArrayForEach(id, it) {
        if (json_int(id, 0, cfg->vocab_size - 1, &v))
          return req_error(f, k, "item %d is not a token id in [0, %lld)", i + 1,
                           (long long)cfg->vocab_size);
        r->prompt[i++] = (int32_t)v;
      }
      r->n_prompt = n;
      have_prompt = 1;
    } else if (strcmp(k, "max_new_tokens") == 0) {
      if (json_int(it, 0, 1 << 30, &r->max_new))
        return req_error(f, k, "expected an integer in [0, %d]", 1 << 30);
    } else if (strcmp(k, "temperature") == 0) {
      if (!cJSON_IsNumber(it) || !(it->valuedouble >= 0) || it->valuedouble > 1e6)
        return req_error(f, k, "expected a number in [0, 1e6]");
      r->sp.temperature = (float)it->valuedouble;
    } else if (strcmp(k, "top_p") == 0) {
      if (!cJSON_IsNumber(it) || !(it->valuedouble > 0) || it->valuedouble > 1)
        return req_error(f, k, "expected a number in (0, 1]");
      r->sp.top_p = (float)it->valuedouble;
    } else if (strcmp(k, "top_k") == 0) {
      if (json_int(it, 0, INT32_MAX, &r->sp.top_k))
        return req_error(f, k, "expected an integer >= 0");
    } else if (strcmp(k, "seed") == 0) {
      if (json_int(it, 0, (int64_t)1 << 53, &v))
        return req_error(f, k, "expected an integer in [0, 2^53]");
      r->sp.seed = (uint64_t)v;
    } else if (strcmp(k, "ignore_eos") == 0) {
      if (!cJSON_IsBool(it)) return req_error(f, k, "expected true or false");
      r->ignore_eos = cJSON_IsTrue(it);
    } else {
      return req_error(f, k, "unknown field (expected prompt_ids, max_new_tokens, temperature, "
                             "top_p, top_k, seed, ignore_eos)");
    }
  }
  if (!have_prompt) return req_error(f, "prompt_ids", "missing");
  if (r->n_prompt + r->max_new > cfg->max_position_embeddings)
    return req_error(f, "max_new_tokens", "prompt (%lld) + max_new_tokens (%lld) exceeds the context length %lld",
                     (long long)r->n_prompt, (long long)r->max_new,
                     (long long)cfg->max_position_embeddings);
  return 0;
}

static void free_requests(req_line *reqs, int64_t n) {
  for (int64_t i = 0; reqs && i < n; i++) {
    free(reqs[i].prompt);
    free(reqs[i].out);
  }
  free(reqs);
}

/* Every request of the file, validated against the model's config. */
static int read_requests(const gen_opts *o, const epic_model_config *cfg, req_line **out, int64_t *n_out) {
  req_file f = {.path = o->requests};
  FILE *fp = fopen(o->requests, "r");
  char *buf = NULL;
  size_t cap = 0;
  ssize_t len;
  req_line *reqs = NULL;
  int64_t n = 0, rcap = 0;
  int rc = 0;
  if (!fp) {
    fprintf(stderr, "epic generate: --requests %s: %s\n", o->requests, strerror(errno));
    return -1;
  }
  while (rc == 0 && (len = getline(&buf, &cap, fp)) >= 0) {
    f.line++;
    if (strspn(buf, " \t\r\n") == (size_t)len) continue;
    if (n == rcap) {
      int64_t c = rcap ? rcap * 2 : 64;
      req_line *nr = realloc(reqs, (size_t)c * sizeof *nr);
      if (!nr) {
        rc = req_error(&f, NULL, "out of memory");
        break;
      }
      reqs = nr;
      rcap = c;
    }
    memset(&reqs[n], 0, sizeof reqs[n]);
    cJSON *obj = cJSON_ParseWithLength(buf, (size_t)len);
    if (!obj)
      rc = req_error(&f, NULL, "malformed JSON");
    else
      rc = parse_request(&f, obj, cfg, o, &reqs[n]);
    cJSON_Delete(obj);
    n++;
  }
  if (rc == 0 && ferror(fp)) {
    fprintf(stderr, "epic generate: --requests %s: read error\n", o->requests);
    rc = -1;
  }
  if (rc == 0 && n == 0) {
    fprintf(stderr, "epic generate: --requests %s: no requests in the file\n", o->requests);
    rc = -1;
  }
  free(buf);
  fclose(fp);
  if (rc) {
    free_requests(reqs, n);
    return -1;
  }
  *out = reqs;
  *n_out = n;
  return 0;
}

static int req_on_token(void *user, int32_t id, float logprob) {
  req_line *r = user;
  (void)logprob;
  if (r->n_out == r->cap_out) {
    int64_t c = r->cap_out ? r->cap_out * 2 : 64;
    int32_t *n = realloc(r->out, (size_t)c * sizeof *n);
    if (!n) return -1; /* ends the request as cancelled; reported below */
    r->out = n;
    r->cap_out = c;
  }
  r->out[r->n_out++] = id;
  return 0;
}

static void req_on_finish(void *user, const epic_engine_result *res) {
  req_line *r = user;
  r->finish = res->finish;
  r->done = 1;
}

/* The launcher's rank of this process, known before MPI starts (0 without one). */
static int launcher_rank(void) {
  const char *v = getenv("OMPI_COMM_WORLD_RANK");
  if (!v) v = getenv("PMIX_RANK");
  if (!v) v = getenv("PMI_RANK");
  return v ? atoi(v) : 0;
}

/* KV pages per rank when --kv-pages is not given: room for every request at
 * once (so admission is bound by --max-batch only), at most 1 GiB of rows of
 * kv_elem bytes per element (the backend's cache element type). */
static int64_t default_kv_pages(const gen_opts *o, const epic_model_config *cfg, const req_line *reqs,
                                int64_t n, size_t kv_elem) {
  const int64_t per_page = cfg->num_hidden_layers * o->e.page_size *
                           (cfg->kv_lora_rank + cfg->qk_rope_head_dim) * (int64_t)kv_elem;
  int64_t sum = 0, one = 1, cap = ((int64_t)1 << 30) / (per_page > 0 ? per_page : 1);
  for (int64_t i = 0; i < n; i++) {
    int64_t p = (reqs[i].n_prompt + reqs[i].max_new + o->e.page_size - 1) / o->e.page_size;
    sum += p;
    if (p > one) one = p;
  }
  if (sum > cap) sum = cap;
  return sum > one ? sum : one;
}

static void print_result(int64_t i, const req_line *r, const epic_tokenizer *tok) {
  printf("{\"index\":%lld,\"prompt_ids\":", (long long)i);
  epic_cli_json_ids(stdout, r->prompt, r->n_prompt);
  printf(",\"output_ids\":");
  epic_cli_json_ids(stdout, r->out, r->n_out);
  printf(",\"finish_reason\":\"%s\"", r->finish == EPIC_ENGINE_FINISH_STOP ? "stop" : "length");
  if (tok) {
    char *text = NULL;
    size_t len = 0;
    if (epic_tokenizer_decode(tok, r->out, (size_t)r->n_out, EPIC_DECODE_GENERATED, &text, &len) ==
        EPIC_OK) {
      printf(",\"text\":");
      epic_cli_json_string(stdout, text, len);
    }
    epic_tokenizer_text_free(text);
  }
  printf("}\n");
}

/* What rank 0 tells the others before the engine starts. */
typedef struct run_setup {
  int64_t ok, kv_pages, max_queue;
} run_setup;

static int run_requests(const gen_opts *o) {
  const int parses = launcher_rank() == 0;
  epic_model_config cfg;
  req_line *reqs = NULL;
  int64_t n_req = 0;
  int refused = 0;
  epic_cluster *cl = NULL;
  epic_engine *eng = NULL;
  epic_tokenizer *tok = NULL;
  run_setup setup = {0};
  char tok_path[4096];
  int rank, rc = 1, collective_ok = 1;
  double t0 = 0, seconds = 0;
  epic_engine_stats stats = {0};

  /* Rank 0 reads and checks every request before anything is loaded. */
  if (parses) {
    if (epic_config_load_dir(o->e.model, &cfg) != EPIC_OK ||
        epic_config_override(&cfg, o->e.num_layers, o->e.num_experts) != EPIC_OK)
      return 1;
    if (read_requests(o, &cfg, &reqs, &n_req) != 0) return 2;
  }
  {
    epic_cluster_params cp;
    epic_cli_engine_cluster_params(&o->e, &cp);
    if (epic_cluster_open(&cp, &cl) != EPIC_OK) {
      free_requests(reqs, n_req);
      return 1;
    }
  }
  rank = epic_cluster_rank(cl);
  if (epic_cluster_size(cl) > 1)
    epic_log_init(o->verbose ? EPIC_LOG_LEVEL_INFO : EPIC_LOG_LEVEL_WARN, rank);
  const epic_model_config *mc = epic_model_get_config(epic_cluster_model(cl));
  if (rank == 0) {
    setup.ok = 1;
    if (!parses) {
      fprintf(stderr, "epic generate: rank 0 could not tell its rank before MPI started "
                      "(set OMPI_COMM_WORLD_RANK, PMIX_RANK or PMI_RANK)\n");
      setup.ok = 0;
    }
    snprintf(tok_path, sizeof tok_path, "%s/tokenizer.json", o->e.model);
    if (setup.ok && access(tok_path, R_OK) == 0 && epic_tokenizer_load_dir(o->e.model, &tok) != EPIC_OK)
      setup.ok = 0;
    const size_t kv_elem = epic_kv_dtype_size(epic_ops_kv_dtype(epic_cluster_ops(cl)));
    setup.kv_pages = o->e.kv_pages ? o->e.kv_pages
                                   : default_kv_pages(o, mc, reqs, n_req, kv_elem ? kv_elem : 4);
    setup.max_queue = n_req > 1024 ? n_req : 1024;
  }
  if (epic_cluster_comm(cl) &&
      epic_comm_bcast(epic_cluster_comm(cl), &setup, sizeof setup, 0) != EPIC_OK) {
    collective_ok = 0;
    goto done;
  }
  if (!setup.ok) goto done;
  {
    epic_engine_params ep;
    epic_cli_engine_engine_params(&o->e, epic_cluster_model(cl), epic_cluster_comm(cl), &ep);
    ep.kv_pages = setup.kv_pages;
    ep.max_queue = setup.max_queue;
    if (epic_engine_create(&ep, &eng) != EPIC_OK) goto done;
  }
  t0 = epic_now_seconds();
  if (rank == 0) {
    for (int64_t i = 0; i < n_req; i++) {
      req_line *r = &reqs[i];
      if (r->max_new == 0) { /* nothing to generate: a result without a step */
        r->finish = EPIC_ENGINE_FINISH_LENGTH;
        r->done = 1;
        continue;
      }
      epic_engine_request er = {.size = sizeof er,
                                .prompt = r->prompt,
                                .n_prompt = r->n_prompt,
                                .max_new_tokens = r->max_new,
                                .sampling = r->sp,
                                .ignore_eos = r->ignore_eos,
                                .on_token = req_on_token,
                                .on_finish = req_on_finish,
                                .user = r};
      if (epic_engine_submit(eng, &er, NULL) != EPIC_OK) {
        fprintf(stderr, "epic generate: request %lld was refused (see above)\n", (long long)i);
        refused = 1;
        break;
      }
    }
    /* Drain: finish every request, then release the other ranks (after a refusal:
     * cancel what was submitted instead). */
    epic_engine_shutdown(eng, !refused);
  }
  if (epic_engine_run(eng) != EPIC_OK) {
    fprintf(stderr, "epic generate: rank %d: the engine stopped with an error (see above)\n", rank);
    /* Peers may be gone or stuck in a collective: do not wait for them in a
     * collective teardown; exiting non-zero makes the launcher end the job. */
    collective_ok = epic_cluster_size(cl) == 1;
    goto done;
  }
  seconds = epic_now_seconds() - t0;
  if (rank != 0) {
    rc = 0;
    goto done;
  }
  epic_engine_get_stats(eng, &stats);
  if (refused) goto done;
  for (int64_t i = 0; i < n_req; i++) {
    if (!reqs[i].done || reqs[i].finish == EPIC_ENGINE_FINISH_ERROR ||
        reqs[i].finish == EPIC_ENGINE_FINISH_CANCELLED) {
      fprintf(stderr, "epic generate: request %lld did not complete\n", (long long)i);
      goto done;
    }
  }
  for (int64_t i = 0; i < n_req; i++) print_result(i, &reqs[i], tok);
  if (o->verbose)
    fprintf(stderr, "epic generate: %lld requests on %d rank(s): %lld prompt + %lld generated tokens "
                    "in %lld steps, %.3f s (%.1f tokens/s, %.1f generated tokens/s)\n",
            (long long)n_req, epic_cluster_size(cl), (long long)stats.prompt_tokens,
            (long long)stats.generated_tokens, (long long)stats.steps, seconds,
            seconds > 0 ? (double)(stats.prompt_tokens + stats.generated_tokens) / seconds : 0.0,
            seconds > 0 ? (double)stats.generated_tokens / seconds : 0.0);
  if (o->verbose && stats.prefix_cache_pages > 0)
    fprintf(stderr, "epic generate: prefix cache: %lld hits, %lld prompt tokens reused, %lld pages "
                    "evicted, %lld cached at the end (budget %lld)\n",
            (long long)stats.prefix_hits, (long long)stats.prefix_hit_tokens,
            (long long)stats.prefix_evictions, (long long)stats.prefix_cached_pages,
            (long long)stats.prefix_cache_pages);
  rc = 0;
done:
  fflush(stdout);
  epic_engine_destroy(eng);
  epic_tokenizer_destroy(tok);
  free_requests(reqs, n_req);
  if (collective_ok) epic_cluster_close(cl);
  return rc;
}

int epic_cmd_generate(int argc, char **argv) {
  gen_opts o;
  int rc = 1, pr = parse(argc, argv, &o);
  epic_cluster *cl = NULL;
  epic_model *model = NULL;
  epic_tokenizer *tok = NULL;
  epic_kvcache *kc = NULL, *kc_mtp = NULL;
  epic_npy_writer *dump = NULL, *dump_mtp = NULL;
  int32_t *prompt = NULL;
  int64_t n_prompt = 0;
  stream_ctx sc = {0};
  epic_generate_result res = {0};
  char tok_path[4096];
  epic_comm *comm = NULL;
  int rank = 0, released = 0;
  if (pr) return pr > 0 ? 0 : 2;
  /* Under a launcher the rank is known from its environment before MPI starts:
   * tag the loading messages of every rank with it. */
  epic_log_init(o.verbose ? EPIC_LOG_LEVEL_INFO : EPIC_LOG_LEVEL_WARN,
                epic_cluster_under_launcher() ? launcher_rank() : -1);
  if (o.requests) return run_requests(&o);

  /* Under mpirun/srun every rank is a worker holding the experts the plan gives
   * it; rank 0 owns the sequence and writes the output. */
  {
    epic_cluster_params cp;
    epic_cli_engine_cluster_params(&o.e, &cp);
    cp.max_batch_tokens = 0; /* one sequence: the backend's default step sizes the reserve */
    cp.load_mtp = o.dump_mtp != NULL || o.mtp_draft > 0;
    if (epic_cluster_open(&cp, &cl) != EPIC_OK) return 1;
    rank = epic_cluster_rank(cl);
    comm = epic_cluster_comm(cl);
    model = epic_cluster_model(cl);
    if (epic_cluster_size(cl) > 1)
      epic_log_init(o.verbose ? EPIC_LOG_LEVEL_INFO : EPIC_LOG_LEVEL_WARN, rank);
    if (epic_model_set_micro_batches(model, (int)o.e.micro_batches) != EPIC_OK) goto done;
  }
  if (rank != 0) {
    /* Serve experts for rank 0's steps until it is done. */
    rc = epic_generate_follow(model, comm) == EPIC_OK ? 0 : 1;
    goto done;
  }
  const epic_model_config *cfg = epic_model_get_config(model);
  if ((o.dump_mtp || o.mtp_draft) && !epic_model_has_mtp(model)) {
    fprintf(stderr, "epic generate: %s: %s has no MTP layer (num_nextn_predict_layers = 0)\n",
            o.dump_mtp ? "--dump-mtp-logits" : "--mtp-draft", o.e.model);
    goto done;
  }
  snprintf(tok_path, sizeof tok_path, "%s/tokenizer.json", o.e.model);
  if (access(tok_path, R_OK) == 0) {
    if (epic_tokenizer_load_dir(o.e.model, &tok) != EPIC_OK) goto done;
  } else if (o.prompt) {
    fprintf(stderr, "epic generate: --prompt needs %s\n", tok_path);
    goto done;
  }
  if (build_prompt(&o, cfg, tok, &prompt, &n_prompt) != 0) goto done;
  if (n_prompt + o.max_new > cfg->max_position_embeddings) {
    fprintf(stderr, "epic generate: prompt (%lld) + --max-new-tokens (%lld) exceeds the context length %lld\n",
            (long long)n_prompt, (long long)o.max_new, (long long)cfg->max_position_embeddings);
    goto done;
  }
  {
    int64_t pages = (n_prompt + o.max_new + o.e.page_size - 1) / o.e.page_size + 1;
    if (epic_model_kvcache_create(model, 0, o.e.page_size, pages, &kc) != EPIC_OK) goto done;
    /* The MTP dump runs its own sequence beside the drafting one. */
    if ((o.dump_mtp || o.mtp_draft) &&
        epic_model_kvcache_create(model, 1, o.e.page_size, o.dump_mtp && o.mtp_draft ? 2 * pages : pages,
                                  &kc_mtp) != EPIC_OK)
      goto done;
  }
  if (o.dump_logits && epic_npy_writer_open(o.dump_logits, cfg->vocab_size, &dump) != EPIC_OK) goto done;
  if (o.dump_mtp && epic_npy_writer_open(o.dump_mtp, cfg->vocab_size, &dump_mtp) != EPIC_OK) goto done;
  sc.json = o.json;
  if (tok && !o.json && epic_detok_create(tok, EPIC_DECODE_GENERATED, &sc.detok) != EPIC_OK)
    goto done;
  {
    epic_generate_params gp = {.size = sizeof gp,
                               .prompt = prompt,
                               .n_prompt = n_prompt,
                               .max_new_tokens = o.max_new,
                               .sampling = {.size = sizeof(epic_sampling_params),
                                            .temperature = o.temperature,
                                            .top_p = o.top_p,
                                            .top_k = o.top_k,
                                            .seed = o.seed},
                               .ignore_eos = o.ignore_eos,
                               .prefill_chunk = o.e.prefill_chunk,
                               .dump_logits = dump,
                               .dump_mtp_logits = dump_mtp,
                               .on_token = on_token,
                               .user = &sc,
                               .comm = comm,
                               .mtp_draft = o.mtp_draft};
    released = 1; /* epic_generate releases the followers whatever happens */
    const epic_status gs = epic_generate(model, kc, kc_mtp, &gp, &res);
    if (gs != EPIC_OK) { /* the failing layer logged what it could; say that it stopped */
      fprintf(stderr, "epic generate: generation stopped: %s\n", epic_status_str(gs));
      goto done;
    }
  }
  if (epic_npy_writer_close(dump) != EPIC_OK) {
    dump = NULL;
    goto done;
  }
  dump = NULL;
  if (epic_npy_writer_close(dump_mtp) != EPIC_OK) {
    dump_mtp = NULL;
    goto done;
  }
  dump_mtp = NULL;
  if (o.json) {
    printf("{\"prompt_ids\":");
    epic_cli_json_ids(stdout, prompt, n_prompt);
    printf(",\"output_ids\":");
    epic_cli_json_ids(stdout, res.ids, res.n_ids);
    printf(",\"finish_reason\":\"%s\"", res.finish == EPIC_FINISH_STOP ? "stop" : "length");
    if (tok) {
      char *text = NULL;
      size_t len = 0;
      if (epic_tokenizer_decode(tok, res.ids, (size_t)res.n_ids, EPIC_DECODE_GENERATED, &text,
                                &len) != EPIC_OK)
        goto done;
      printf(",\"text\":");
      epic_cli_json_string(stdout, text, len);
      epic_tokenizer_text_free(text);
    }
    printf(",\"mtp_draft\":%lld", (long long)o.mtp_draft);
    if (res.mtp_rounds > 0)
      printf(",\"mtp_acceptance_rate\":%.6f,\"mtp_mean_accepted\":%.6f",
             (double)res.mtp_accepted / (double)res.mtp_drafted,
             1.0 + (double)res.mtp_accepted / (double)res.mtp_rounds);
    else
      printf(",\"mtp_acceptance_rate\":null,\"mtp_mean_accepted\":null");
    printf(",\"prefill_seconds\":%.6f,\"decode_seconds\":%.6f}\n", res.prefill_seconds,
           res.decode_seconds);
  } else if (sc.detok) {
    char *text = NULL;
    size_t len = 0;
    if (epic_detok_flush(sc.detok, &text, &len) != EPIC_OK) goto done;
    fwrite(text, 1, len, stdout);
    fputc('\n', stdout);
    epic_tokenizer_text_free(text);
  } else {
    epic_cli_json_ids(stdout, res.ids, res.n_ids);
    fputc('\n', stdout);
  }
  if (o.verbose)
    fprintf(stderr, "epic generate: prompt %lld tokens in %.3fs (%.1f tok/s), %lld new tokens in %.3fs (%.1f tok/s)\n",
            (long long)n_prompt, res.prefill_seconds,
            res.prefill_seconds > 0 ? (double)n_prompt / res.prefill_seconds : 0.0,
            (long long)res.n_ids, res.decode_seconds,
            res.decode_seconds > 0 ? (double)res.n_ids / res.decode_seconds : 0.0);
  if (o.verbose && res.mtp_rounds > 0)
    fprintf(stderr, "epic generate: MTP: %lld verify steps, %lld of %lld drafts accepted (%.1f%%), "
                    "%.2f tokens per step\n",
            (long long)res.mtp_rounds, (long long)res.mtp_accepted, (long long)res.mtp_drafted,
            100.0 * (double)res.mtp_accepted / (double)res.mtp_drafted,
            1.0 + (double)res.mtp_accepted / (double)res.mtp_rounds);
  rc = 0;
done:
  if (comm && rank == 0 && model && !released) epic_generate_release(comm);
  epic_npy_writer_close(dump);
  epic_npy_writer_close(dump_mtp);
  epic_detok_destroy(sc.detok);
  free(res.ids);
  free(prompt);
  epic_kvcache_destroy(kc);
  epic_kvcache_destroy(kc_mtp);
  epic_tokenizer_destroy(tok);
  epic_cluster_close(cl);
  fflush(stdout);
  return rc;
}
