/* The `epic` program: one binary, one subcommand per job (DESIGN §1). */
#include <stdio.h>
#include <string.h>

#include "cmd_batch.h"
#include "cmd_bench.h"
#include "cmd_gateway.h"
#include "cmd_generate.h"
#include "cmd_plan.h"
#include "cmd_serve.h"
#include "coordinator/tokenizer/cmd_tokenize.h"

#ifndef EPIC_VERSION
#define EPIC_VERSION "unknown"
#endif
#ifndef EPIC_FEATURES
#define EPIC_FEATURES "cpu"
#endif

typedef struct subcommand {
  const char *name;
  int (*run)(int argc, char **argv);
  const char *summary;
} subcommand;

static const subcommand COMMANDS[] = {
    {"generate", epic_cmd_generate, "run one prompt on this machine and stream the output"},
    {"serve", epic_cmd_serve, "serve the model over gRPC (rank 0 serves under mpirun)"},
    {"gateway", epic_cmd_gateway, "route gRPC requests to the least loaded of several serve clusters"},
    {"batch", epic_cmd_batch, "run an OpenAI batch file (JSONL) on the engine, resumable"},
    {"bench", epic_cmd_bench, "engine throughput with synthetic prompts (JSON; runs under mpirun)"},
    {"plan", epic_cmd_plan, "expert placement and per-rank memory for N GPUs (config.json only)"},
    {"tokenize", epic_cmd_tokenize, "text to token ids (optionally through the chat template)"},
    {"detokenize", epic_cmd_detokenize, "token ids to text"},
};

static void usage(FILE *f) {
  fputs("usage: epic <command> [options]   (epic <command> --help for each)\n\ncommands:\n", f);
  for (size_t i = 0; i < sizeof COMMANDS / sizeof COMMANDS[0]; i++)
    fprintf(f, "  %-12s %s\n", COMMANDS[i].name, COMMANDS[i].summary);
  fputs("\n  --version    version and build features\n  --help       this help\n", f);
}

int main(int argc, char **argv) {
  if (argc < 2) {
    usage(stderr);
    return 2;
  }
  if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
    usage(stdout);
    return 0;
  }
  if (strcmp(argv[1], "--version") == 0) {
    printf("epic %s (features: %s)\n", EPIC_VERSION, EPIC_FEATURES);
    return 0;
  }
  for (size_t i = 0; i < sizeof COMMANDS / sizeof COMMANDS[0]; i++)
    if (strcmp(argv[1], COMMANDS[i].name) == 0) return COMMANDS[i].run(argc - 1, argv + 1);
  fprintf(stderr, "epic: unknown command '%s' (see epic --help)\n", argv[1]);
  return 2;
}
