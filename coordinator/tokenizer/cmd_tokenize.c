/* `epic tokenize` / `epic detokenize`: the tokenizer from the command line. */
#define _GNU_SOURCE

#include "coordinator/tokenizer/cmd_tokenize.h"

#include <errno.h>
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/tokenizer/chat.h"
#include "coordinator/tokenizer/tokenizer.h"

enum { EXIT_RUNTIME = 1, EXIT_USAGE = 2 };
/* Long-only options get vals outside the char range, so an unknown short
 * option (optopt = its char) is never mistaken for one of them. */
enum { O_MODEL = 256, O_TEXT, O_ADD_BOS, O_CHAT, O_SYSTEM, O_TEMPLATE, O_JSON, O_IDS, O_SKIP };

static void tokenize_usage(FILE *f) {
  fprintf(f,
          "usage: epic tokenize --model DIR --text TEXT [options]\n"
          "Encode text with DIR/tokenizer.json (and DIR/tokenizer_config.json).\n"
          "\n"
          "  --model DIR        model directory holding tokenizer.json\n"
          "  --text TEXT        text to encode; \"-\" reads standard input\n"
          "  --add-bos          prepend the BOS token (not with --chat)\n"
          "  --chat             render TEXT as one user message with the chat template\n"
          "                     and a generation prompt, then encode it\n"
          "  --system S         with --chat: a system message before the user message\n"
          "  --template T       with --chat: auto (default, from tokenizer_config), v3 or r1\n"
          "  --json             print the ids as a JSON array, e.g. [19923,14,2058,3]\n"
          "                     (default: comma-separated, the format of detokenize --ids)\n"
          "  -h, --help         show this help\n");
}

static void detokenize_usage(FILE *f) {
  fprintf(f,
          "usage: epic detokenize --model DIR --ids ID,ID,... [--skip-special]\n"
          "Decode token ids with DIR/tokenizer.json and print the text.\n"
          "\n"
          "  --model DIR        model directory holding tokenizer.json\n"
          "  --ids LIST         ids separated by commas and/or spaces; [1,2,3] works too\n"
          "  --skip-special     drop special tokens (BOS/EOS/pad)\n"
          "  -h, --help         show this help\n");
}

/* Names the option getopt rejected. getopt_long leaves optopt = the option's
 * val when its value is missing, 0 for an unknown long option. */
static int bad_option(const char *cmd, int argc, char **argv, const struct option *opts) {
  const char *word = optind >= 1 && optind - 1 < argc ? argv[optind - 1] : "?";
  for (const struct option *o = opts; optopt && o->name; o++) {
    if (o->val == optopt) {
      fprintf(stderr, "epic %s: --%s %s (see --help)\n", cmd, o->name,
              o->has_arg == required_argument ? "needs a value" : "takes no value");
      return EXIT_USAGE;
    }
  }
  if (optopt && optopt != '?' && !strchr(word, '='))
    fprintf(stderr, "epic %s: unknown option -%c (see --help)\n", cmd, optopt);
  else
    fprintf(stderr, "epic %s: unknown option %s (see --help)\n", cmd, word);
  return EXIT_USAGE;
}

static char *read_stdin(size_t *len) {
  size_t cap = 4096, n = 0;
  char *b = malloc(cap);
  if (!b) return NULL;
  for (;;) {
    if (n + 1 == cap) {
      char *q = realloc(b, cap * 2);
      if (!q) {
        free(b);
        return NULL;
      }
      b = q;
      cap *= 2;
    }
    size_t r = fread(b + n, 1, cap - n - 1, stdin);
    n += r;
    if (r == 0) break;
  }
  b[n] = 0;
  *len = n;
  return b;
}

int epic_cmd_tokenize(int argc, char **argv) {
  static const struct option opts[] = {
      {"model", required_argument, NULL, O_MODEL}, {"text", required_argument, NULL, O_TEXT},
      {"add-bos", no_argument, NULL, O_ADD_BOS},     {"chat", no_argument, NULL, O_CHAT},
      {"system", required_argument, NULL, O_SYSTEM}, {"template", required_argument, NULL, O_TEMPLATE},
      {"json", no_argument, NULL, O_JSON},        {"help", no_argument, NULL, 'h'},
      {NULL, 0, NULL, 0}};
  const char *model = NULL, *text = NULL, *system = NULL, *tmpl_name = NULL;
  int add_bos = 0, chat = 0, json = 0, c, rc = EXIT_RUNTIME;
  epic_tokenizer *tok = NULL;
  int32_t *ids = NULL;
  size_t n = 0;
  char *owned_text = NULL;
  epic_chat_template tmpl = EPIC_CHAT_AUTO;

  optind = 0; /* full re-initialisation of GNU getopt: main may have used it */
  opterr = 0;
  while ((c = getopt_long(argc, argv, "+h", opts, NULL)) != -1) {
    switch (c) {
    case O_MODEL: model = optarg; break;
    case O_TEXT: text = optarg; break;
    case O_ADD_BOS: add_bos = 1; break;
    case O_CHAT: chat = 1; break;
    case O_SYSTEM: system = optarg; break;
    case O_TEMPLATE: tmpl_name = optarg; break;
    case O_JSON: json = 1; break;
    case 'h': tokenize_usage(stdout); return 0;
    default: return bad_option("tokenize", argc, argv, opts);
    }
  }
  if (optind < argc) {
    fprintf(stderr, "epic tokenize: unexpected argument: %s\n", argv[optind]);
    return EXIT_USAGE;
  }
  if (!model || !text) {
    fprintf(stderr, "epic tokenize: %s is required (see --help)\n", !model ? "--model DIR" : "--text TEXT");
    return EXIT_USAGE;
  }
  if (!chat && (system || tmpl_name)) {
    fprintf(stderr, "epic tokenize: %s needs --chat\n", system ? "--system" : "--template");
    return EXIT_USAGE;
  }
  if (chat && add_bos) {
    fprintf(stderr, "epic tokenize: --add-bos cannot be combined with --chat (the template writes BOS)\n");
    return EXIT_USAGE;
  }
  if (tmpl_name && epic_chat_template_parse(tmpl_name, &tmpl) != EPIC_OK) {
    fprintf(stderr, "epic tokenize: --template must be auto, v3 or r1 (got \"%s\")\n", tmpl_name);
    return EXIT_USAGE;
  }
  size_t text_len = 0;
  if (strcmp(text, "-") == 0) {
    owned_text = read_stdin(&text_len);
    if (!owned_text) {
      fprintf(stderr, "epic tokenize: cannot read standard input\n");
      return EXIT_RUNTIME;
    }
    text = owned_text;
  } else {
    text_len = strlen(text);
  }
  epic_status st = epic_tokenizer_load_dir(model, &tok);
  if (st != EPIC_OK) {
    fprintf(stderr, "epic tokenize: cannot load the tokenizer of --model %s: %s\n", model, epic_status_str(st));
    goto out;
  }
  if (chat) {
    epic_chat_message msgs[2];
    size_t nm = 0;
    if (system) msgs[nm++] = (epic_chat_message){.role = EPIC_ROLE_SYSTEM, .content = system};
    msgs[nm++] = (epic_chat_message){.role = EPIC_ROLE_USER, .content = text};
    st = epic_chat_encode(tok, tmpl, msgs, nm, 1, &ids, &n, NULL, NULL);
  } else {
    st = epic_tokenizer_encode(tok, text, text_len, add_bos, &ids, &n);
  }
  if (st != EPIC_OK) {
    fprintf(stderr, "epic tokenize: encoding failed: %s\n", epic_status_str(st));
    goto out;
  }
  if (json) putchar('[');
  for (size_t i = 0; i < n; i++) printf(i ? ",%d" : "%d", ids[i]);
  if (json) putchar(']');
  putchar('\n');
  rc = fflush(stdout) == 0 ? 0 : EXIT_RUNTIME;
out:
  epic_tokenizer_ids_free(ids);
  epic_tokenizer_destroy(tok);
  free(owned_text);
  return rc;
}

/* Parses "1,2,3", "1 2 3" or "[1, 2, 3]". */
static int parse_ids(const char *s, int32_t **out, size_t *n) {
  size_t cap = 16, k = 0;
  int32_t *v = malloc(cap * sizeof *v);
  if (!v) return -1;
  const char *p = s;
  for (;;) {
    while (*p == ' ' || *p == ',' || *p == '\t' || *p == '\n' || *p == '[' || *p == ']') p++;
    if (!*p) break;
    char *end;
    errno = 0;
    long x = strtol(p, &end, 10);
    if (end == p || errno || x < INT32_MIN || x > INT32_MAX ||
        !(*end == 0 || *end == ',' || *end == ' ' || *end == '\t' || *end == '\n' || *end == ']')) {
      const char *e = end == p ? p + 1 : end;
      fprintf(stderr, "epic detokenize: --ids: \"%.*s\" is not an integer id\n", (int)(e - p + (*e != 0)), p);
      free(v);
      return -2;
    }
    if (k == cap) {
      int32_t *q = realloc(v, cap * 2 * sizeof *q);
      if (!q) {
        free(v);
        return -1;
      }
      v = q;
      cap *= 2;
    }
    v[k++] = (int32_t)x;
    p = end;
  }
  *out = v;
  *n = k;
  return 0;
}

int epic_cmd_detokenize(int argc, char **argv) {
  static const struct option opts[] = {{"model", required_argument, NULL, O_MODEL},
                                       {"ids", required_argument, NULL, O_IDS},
                                       {"skip-special", no_argument, NULL, O_SKIP},
                                       {"help", no_argument, NULL, 'h'},
                                       {NULL, 0, NULL, 0}};
  const char *model = NULL, *ids_arg = NULL;
  int skip = 0, c, rc = EXIT_RUNTIME;
  epic_tokenizer *tok = NULL;
  int32_t *ids = NULL;
  size_t n = 0, len = 0;
  char *text = NULL;

  optind = 0;
  opterr = 0;
  while ((c = getopt_long(argc, argv, "+h", opts, NULL)) != -1) {
    switch (c) {
    case O_MODEL: model = optarg; break;
    case O_IDS: ids_arg = optarg; break;
    case O_SKIP: skip = 1; break;
    case 'h': detokenize_usage(stdout); return 0;
    default: return bad_option("detokenize", argc, argv, opts);
    }
  }
  if (optind < argc) {
    fprintf(stderr, "epic detokenize: unexpected argument: %s\n", argv[optind]);
    return EXIT_USAGE;
  }
  if (!model || !ids_arg) {
    fprintf(stderr, "epic detokenize: %s is required (see --help)\n", !model ? "--model DIR" : "--ids LIST");
    return EXIT_USAGE;
  }
  int pr = parse_ids(ids_arg, &ids, &n);
  if (pr == -2) return EXIT_USAGE;
  if (pr < 0) {
    fprintf(stderr, "epic detokenize: out of memory\n");
    return EXIT_RUNTIME;
  }
  epic_status st = epic_tokenizer_load_dir(model, &tok);
  if (st != EPIC_OK) {
    fprintf(stderr, "epic detokenize: cannot load the tokenizer of --model %s: %s\n", model,
            epic_status_str(st));
    goto out;
  }
  for (size_t i = 0; i < n; i++) {
    if (!epic_tokenizer_id_to_token(tok, ids[i])) {
      fprintf(stderr, "epic detokenize: --ids: id %d (position %zu) is not in the vocabulary (size %d)\n", ids[i],
              i, epic_tokenizer_vocab_size(tok));
      rc = EXIT_USAGE;
      goto out;
    }
  }
  st = epic_tokenizer_decode(tok, ids, n, skip, &text, &len);
  if (st != EPIC_OK) {
    fprintf(stderr, "epic detokenize: decoding failed: %s\n", epic_status_str(st));
    goto out;
  }
  fwrite(text, 1, len, stdout);
  putchar('\n');
  rc = fflush(stdout) == 0 ? 0 : EXIT_RUNTIME;
out:
  epic_tokenizer_text_free(text);
  epic_tokenizer_destroy(tok);
  free(ids);
  return rc;
}
