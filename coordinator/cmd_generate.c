/* `epic generate`: one prompt through the model on this machine, streamed. */
#define _GNU_SOURCE
#include "cmd_generate.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli_util.h"
#include "comm/comm.h"
#include "common/log.h"
#include "common/npy.h"
#include "coordinator/tokenizer/chat.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "kernels/ops.h"
#include "worker/generate.h"
#include "worker/model.h"

static const char *USAGE =
    "usage: epic generate --model DIR (--prompt-ids IDS | --prompt TEXT [--chat]) [options]\n"
    "\n"
    "Runs one prompt through the model on this machine (CPU) and streams the\n"
    "generated text to stdout (or prints one JSON line with --json).\n"
    "\n"
    "input:\n"
    "  --model DIR             checkpoint directory (config.json, safetensors, tokenizer)\n"
    "  --prompt-ids IDS        comma-separated token ids, used as given (e.g. 0,17,5)\n"
    "  --prompt TEXT           text prompt, tokenized with the model's tokenizer (BOS added)\n"
    "  --chat                  apply the chat template to --prompt as a user turn\n"
    "  --system TEXT           system prompt for --chat\n"
    "  --chat-template NAME    auto (from tokenizer_config.json), v3 or r1\n"
    "  --no-bos                with a raw --prompt, do not prepend BOS\n"
    "sampling:\n"
    "  --max-new-tokens N      tokens to generate (default 128)\n"
    "  --temperature T         0 = greedy (default 0)\n"
    "  --top-p P               nucleus sampling mass in (0, 1] (default 1)\n"
    "  --top-k K               keep the K most likely tokens, 0 = all (default 0)\n"
    "  --seed S                sampling seed (default 0)\n"
    "  --ignore-eos            do not stop at the end-of-sequence token\n"
    "output:\n"
    "  --json                  print {\"prompt_ids\",\"output_ids\",\"finish_reason\",\"text\",...}\n"
    "  --dump-logits FILE      float32 .npy [T+N-1, vocab]: a row per processed position\n"
    "  --dump-mtp-logits FILE  float32 .npy [T-1, vocab]: the MTP head over the prompt\n"
    "engine:\n"
    "  --load-format F         auto (safetensors) or dummy (random weights from config.json)\n"
    "  --num-layers N          use only N layers (with dummy weights, for benchmarks)\n"
    "  --num-experts N         use only N routed experts (likewise)\n"
    "  --weight-seed S         seed of dummy weights (default 0)\n"
    "  --threads N             compute threads (default: all cores)\n"
    "  --prefill-chunk N       prompt tokens per forward step (default: whole prompt)\n"
    "  --page-size N           KV cache page size in tokens (default 64)\n"
    "  --comm NAME             expert-parallel backend under mpirun: auto, mpi, ucx or nccl\n"
    "                          (default auto; used whenever the job has several ranks)\n"
    "  -v, --verbose           timing and load information on stderr\n"
    "  -h, --help              this help\n";

typedef struct gen_opts {
  const char *model, *prompt_ids, *prompt, *system, *dump_logits, *dump_mtp, *template_name, *comm;
  int chat, no_bos, json, ignore_eos, verbose, dummy;
  int64_t max_new, top_k, num_layers, num_experts, threads, chunk, page_size;
  float temperature, top_p;
  uint64_t seed, weight_seed;
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

static int parse(int argc, char **argv, gen_opts *o) {
  enum { O_PIDS = 256, O_PROMPT, O_CHAT, O_SYSTEM, O_NOBOS, O_MAXNEW, O_TEMP, O_TOPP, O_TOPK,
         O_SEED, O_IGNEOS, O_JSON, O_DUMP, O_DUMPMTP, O_LOADFMT, O_NLAYERS, O_NEXPERTS, O_WSEED,
         O_THREADS, O_CHUNK, O_PAGE, O_MODEL, O_TEMPLATE, O_COMM };
  static const struct option longopts[] = {
      {"model", required_argument, 0, O_MODEL},
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
      {"load-format", required_argument, 0, O_LOADFMT},
      {"num-layers", required_argument, 0, O_NLAYERS},
      {"num-experts", required_argument, 0, O_NEXPERTS},
      {"weight-seed", required_argument, 0, O_WSEED},
      {"threads", required_argument, 0, O_THREADS},
      {"prefill-chunk", required_argument, 0, O_CHUNK},
      {"page-size", required_argument, 0, O_PAGE},
      {"comm", required_argument, 0, O_COMM},
      {"verbose", no_argument, 0, 'v'},
      {"help", no_argument, 0, 'h'},
      {0, 0, 0, 0}};
  const char *cmd = "generate";
  int c;
  memset(o, 0, sizeof *o);
  o->max_new = 128;
  o->top_p = 1.0f;
  o->page_size = 64;
  o->template_name = "auto";
  optind = 1;
  while ((c = getopt_long(argc, argv, "vh", longopts, NULL)) != -1) {
    int bad = 0;
    switch (c) {
    case O_MODEL: o->model = optarg; break;
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
    case O_LOADFMT:
      if (strcmp(optarg, "dummy") == 0)
        o->dummy = 1;
      else if (strcmp(optarg, "auto") != 0 && strcmp(optarg, "safetensors") != 0) {
        fprintf(stderr, "epic generate: --load-format: expected auto or dummy, got '%s'\n", optarg);
        bad = -1;
      }
      break;
    case O_NLAYERS: bad = epic_cli_i64(cmd, "--num-layers", optarg, 1, 1 << 20, &o->num_layers); break;
    case O_NEXPERTS: bad = epic_cli_i64(cmd, "--num-experts", optarg, 1, 1 << 20, &o->num_experts); break;
    case O_WSEED: bad = epic_cli_u64(cmd, "--weight-seed", optarg, &o->weight_seed); break;
    case O_THREADS: bad = epic_cli_i64(cmd, "--threads", optarg, 1, 4096, &o->threads); break;
    case O_CHUNK: bad = epic_cli_i64(cmd, "--prefill-chunk", optarg, 1, 1 << 30, &o->chunk); break;
    case O_COMM: o->comm = optarg; break;
    case O_PAGE: bad = epic_cli_i64(cmd, "--page-size", optarg, 1, 1 << 20, &o->page_size); break;
    case 'v': o->verbose = 1; break;
    case 'h': fputs(USAGE, stdout); return 1;
    default: fputs("epic generate: see --help\n", stderr); return -1;
    }
    if (bad) return -1;
  }
  if (optind < argc) {
    fprintf(stderr, "epic generate: unexpected argument '%s' (see --help)\n", argv[optind]);
    return -1;
  }
  if (!o->model) {
    fputs("epic generate: --model DIR is required (see --help)\n", stderr);
    return -1;
  }
  if (!!o->prompt_ids + !!o->prompt != 1) {
    fputs("epic generate: give exactly one of --prompt-ids and --prompt\n", stderr);
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
    fprintf(stderr, "epic generate: --prompt needs %s/tokenizer.json\n", o->model);
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

int epic_cmd_generate(int argc, char **argv) {
  gen_opts o;
  int rc = 1, pr = parse(argc, argv, &o);
  epic_ops *ops = NULL;
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
  int rank = 0, nranks = 1, mpi = 0, released = 0;
  if (pr) return pr > 0 ? 0 : 2;
  epic_log_init(o.verbose ? EPIC_LOG_LEVEL_INFO : EPIC_LOG_LEVEL_WARN, -1);

  /* Under mpirun/srun every rank is a worker holding a share of the experts;
   * rank 0 owns the sequence and writes the output. */
  if (o.comm || getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMI_SIZE") || getenv("PMIX_RANK")) {
    if (epic_comm_mpi_init(NULL, NULL, &rank, &nranks) != EPIC_OK) return 1;
    mpi = 1;
    if (nranks > 1) epic_log_init(o.verbose ? EPIC_LOG_LEVEL_INFO : EPIC_LOG_LEVEL_WARN, rank);
    epic_comm_params cp = {.size = sizeof cp, .backend = o.comm ? o.comm : "auto", .device = -1};
    if (epic_comm_create(&cp, &comm) != EPIC_OK) {
      epic_comm_mpi_finalize();
      return 1;
    }
  }

  if (epic_ops_cpu_create((int)o.threads, &ops) != EPIC_OK) goto done;
  {
    epic_model_params mp = {.size = sizeof mp,
                            .dir = o.model,
                            .load_format = o.dummy ? EPIC_LOAD_DUMMY : EPIC_LOAD_AUTO,
                            .seed = o.weight_seed,
                            .num_layers = o.num_layers,
                            .num_experts = o.num_experts,
                            .load_mtp = o.dump_mtp != NULL,
                            .progress = rank == 0,
                            .comm = comm};
    if (epic_model_load(ops, &mp, &model) != EPIC_OK) goto done;
  }
  if (rank != 0) {
    /* Serve experts for rank 0's steps until it is done. */
    rc = epic_generate_follow(model, comm) == EPIC_OK ? 0 : 1;
    goto done;
  }
  const epic_model_config *cfg = epic_model_get_config(model);
  if (o.dump_mtp && !epic_model_has_mtp(model)) {
    fprintf(stderr, "epic generate: --dump-mtp-logits: %s has no MTP layer (num_nextn_predict_layers = 0)\n",
            o.model);
    goto done;
  }
  snprintf(tok_path, sizeof tok_path, "%s/tokenizer.json", o.model);
  if (access(tok_path, R_OK) == 0) {
    if (epic_tokenizer_load_dir(o.model, &tok) != EPIC_OK) goto done;
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
    int64_t pages = (n_prompt + o.max_new + o.page_size - 1) / o.page_size + 1;
    if (epic_model_kvcache_create(model, 0, o.page_size, pages, &kc) != EPIC_OK) goto done;
    if (o.dump_mtp && epic_model_kvcache_create(model, 1, o.page_size, pages, &kc_mtp) != EPIC_OK)
      goto done;
  }
  if (o.dump_logits && epic_npy_writer_open(o.dump_logits, cfg->vocab_size, &dump) != EPIC_OK) goto done;
  if (o.dump_mtp && epic_npy_writer_open(o.dump_mtp, cfg->vocab_size, &dump_mtp) != EPIC_OK) goto done;
  sc.json = o.json;
  if (tok && !o.json && epic_detok_create(tok, 1, &sc.detok) != EPIC_OK) goto done;
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
                               .prefill_chunk = o.chunk,
                               .dump_logits = dump,
                               .dump_mtp_logits = dump_mtp,
                               .on_token = on_token,
                               .user = &sc,
                               .comm = comm};
    released = 1; /* epic_generate releases the followers whatever happens */
    if (epic_generate(model, kc, kc_mtp, &gp, &res) != EPIC_OK) goto done;
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
      if (epic_tokenizer_decode(tok, res.ids, (size_t)res.n_ids, 1, &text, &len) != EPIC_OK) goto done;
      printf(",\"text\":");
      epic_cli_json_string(stdout, text, len);
      epic_tokenizer_text_free(text);
    }
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
  epic_model_destroy(model);
  epic_ops_destroy(ops);
  epic_comm_destroy(comm);
  if (mpi) epic_comm_mpi_finalize();
  fflush(stdout);
  return rc;
}
