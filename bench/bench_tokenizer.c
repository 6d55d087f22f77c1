/* Tokenizer encode throughput on a generated ~10 MB mixed-language corpus, versus
 * a naive rescan-per-merge BPE over the same pre-tokenized pieces.
 * Prints one JSON object on stdout (MB = 1e6 bytes). */
#define _POSIX_C_SOURCE 200809L

#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "common/clock.h"
#include "common/log.h"
#include "coordinator/tokenizer/tokenizer.h"

static uint64_t g_rng = 0x2545F4914F6CDD1Dull;
static uint32_t rnd(void) {
  g_rng ^= g_rng << 13;
  g_rng ^= g_rng >> 7;
  g_rng ^= g_rng << 17;
  return (uint32_t)(g_rng >> 11);
}

typedef struct {
  char *p;
  size_t n, cap;
} buf;

static void put(buf *b, const char *s, size_t n) {
  if (b->n + n + 1 > b->cap) {
    while (b->n + n + 1 > b->cap) b->cap = b->cap ? b->cap * 2 : 1 << 20;
    b->p = realloc(b->p, b->cap);
    if (!b->p) {
      fprintf(stderr, "bench_tokenizer: out of memory\n");
      exit(1);
    }
  }
  memcpy(b->p + b->n, s, n);
  b->n += n;
  b->p[b->n] = 0;
}

static void puts_(buf *b, const char *s) { put(b, s, strlen(s)); }

static void put_cp(buf *b, uint32_t cp) {
  char o[4];
  size_t n;
  if (cp < 0x80) {
    o[0] = (char)cp;
    n = 1;
  } else if (cp < 0x800) {
    o[0] = (char)(0xC0 | (cp >> 6));
    o[1] = (char)(0x80 | (cp & 0x3F));
    n = 2;
  } else if (cp < 0x10000) {
    o[0] = (char)(0xE0 | (cp >> 12));
    o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[2] = (char)(0x80 | (cp & 0x3F));
    n = 3;
  } else {
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    n = 4;
  }
  put(b, o, n);
}

/* Mixed corpus: ~55% English prose, 20% code, 15% CJK (Chinese, Japanese,
 * Korean), the rest digits, emoji and whitespace runs. */
static void gen_corpus(buf *b, size_t target) {
  static const char *words[] = {
      "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not",
      "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "they", "you", "were",
      "model", "inference", "engine", "token", "attention", "expert", "routing", "latency", "throughput",
      "memory", "bandwidth", "quantization", "distributed", "scheduler", "request", "response", "stream",
      "DeepSeek", "transformer", "Hello", "world", "However", "therefore", "performance", "compute",
      "international", "understanding", "responsibility", "characteristics", "implementation"};
  static const char *code[] = {
      "int main(int argc, char **argv) {\n", "    for (size_t i = 0; i < n; i++) {\n",
      "        sum += a[i] * b[i];\n", "    }\n", "    return 0;\n}\n", "def forward(self, x):\n",
      "        return self.proj(torch.relu(x)) + x\n", "import numpy as np\n", "const x = await fetch(url);\n",
      "if (err != nil) { return err }\n", "#include <stdio.h>\n", "\t\tcase 'a': break;\n",
      "    /* TODO: handle the corner case */\n", "SELECT id, name FROM users WHERE age > 30;\n",
      "{\"role\": \"user\", \"content\": \"hi\"}\n", "x = [1, 2, 3]; y = {k: v for k, v in d.items()}\n"};
  static const char *cjk[] = {"人工智能", "深度学习", "的", "是", "在", "我们", "模型", "推理", "世界", "中国",
                              "数据", "。", "，", "こんにちは", "ありがとう", "コンピューター", "東京", "です",
                              "안녕하세요", "감사합니다", "한국어", "데이터"};
  static const uint32_t emoji[] = {0x1F600, 0x1F602, 0x1F44D, 0x2764, 0x1F680, 0x1F389, 0x1F914, 0x2705};
  size_t nw = sizeof words / sizeof *words, nc = sizeof code / sizeof *code, nk = sizeof cjk / sizeof *cjk;
  while (b->n < target) {
    uint32_t r = rnd() % 100;
    if (r < 55) { /* a sentence */
      int len = 5 + (int)(rnd() % 15);
      for (int i = 0; i < len; i++) {
        if (i) puts_(b, " ");
        puts_(b, words[rnd() % nw]);
        if (rnd() % 12 == 0) puts_(b, ",");
      }
      puts_(b, rnd() % 5 ? ". " : ".\n");
    } else if (r < 75) {
      int len = 1 + (int)(rnd() % 6);
      for (int i = 0; i < len; i++) puts_(b, code[rnd() % nc]);
    } else if (r < 85) {
      int len = 3 + (int)(rnd() % 12);
      for (int i = 0; i < len; i++) puts_(b, cjk[rnd() % nk]);
    } else if (r < 90) { /* rarer Han / Hangul / kana characters */
      int len = 2 + (int)(rnd() % 10);
      for (int i = 0; i < len; i++) {
        uint32_t k = rnd() % 3;
        put_cp(b, k == 0 ? 0x4E00 + rnd() % 0x51A5 : k == 1 ? 0xAC00 + rnd() % 11172 : 0x3041 + rnd() % 0x5D);
      }
      puts_(b, "\n");
    } else if (r < 95) {
      char d[32];
      snprintf(d, sizeof d, " %u.%02u%%, %u ", rnd() % 100000, rnd() % 100, rnd());
      puts_(b, d);
    } else if (r < 98) {
      put_cp(b, emoji[rnd() % 8]);
      puts_(b, " ");
    } else {
      int k = 2 + (int)(rnd() % 30);
      for (int i = 0; i < k; i++) puts_(b, rnd() % 4 ? " " : (rnd() % 2 ? "\t" : "\n"));
    }
  }
}

/* ---------------- naive baseline: string symbols, rescan for every merge ---------------- */

typedef struct {
  char **keys;
  int32_t *vals;
  size_t mask;
} smap;

static uint64_t fnv(const char *s) {
  uint64_t h = 1469598103934665603ull;
  while (*s) h = (h ^ (unsigned char)*s++) * 1099511628211ull;
  return h;
}

static void smap_put(smap *m, const char *k, int32_t v) {
  size_t i = fnv(k) & m->mask;
  while (m->keys[i] && strcmp(m->keys[i], k) != 0) i = (i + 1) & m->mask;
  if (!m->keys[i]) m->keys[i] = strdup(k);
  m->vals[i] = v;
}

static int32_t smap_get(const smap *m, const char *k) {
  size_t i = fnv(k) & m->mask;
  while (m->keys[i]) {
    if (strcmp(m->keys[i], k) == 0) return m->vals[i];
    i = (i + 1) & m->mask;
  }
  return -1;
}

typedef struct {
  smap vocab, ranks;
  char bytes[256][3];
  int32_t *ids;
  size_t n, cap;
  char *scratch;
  size_t scratch_cap;
} naive;

static int naive_load(naive *nv, const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) return -1;
  fseek(f, 0, SEEK_END);
  long sz = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *txt = malloc((size_t)sz + 1);
  if (!txt || fread(txt, 1, (size_t)sz, f) != (size_t)sz) {
    fclose(f);
    free(txt);
    return -1;
  }
  fclose(f);
  txt[sz] = 0;
  cJSON *j = cJSON_Parse(txt);
  free(txt);
  if (!j) return -1;
  const cJSON *model = cJSON_GetObjectItem(j, "model"), *it;
  const cJSON *vocab = cJSON_GetObjectItem(model, "vocab"), *merges = cJSON_GetObjectItem(model, "merges");
  size_t cap = 1;
  while (cap < 2 * (size_t)(cJSON_GetArraySize(vocab) + cJSON_GetArraySize(merges)) + 16) cap <<= 1;
  memset(nv, 0, sizeof *nv);
  nv->vocab = (smap){calloc(cap, sizeof(char *)), calloc(cap, sizeof(int32_t)), cap - 1};
  nv->ranks = (smap){calloc(cap, sizeof(char *)), calloc(cap, sizeof(int32_t)), cap - 1};
  cJSON_ArrayForEach(it, vocab) smap_put(&nv->vocab, it->string, (int32_t)it->valuedouble);
  int32_t r = 0;
  cJSON_ArrayForEach(it, merges) {
    if (cJSON_IsString(it)) {
      smap_put(&nv->ranks, it->valuestring, r);
    } else { /* ["a", "b"] */
      char k[1024];
      snprintf(k, sizeof k, "%s %s", it->child->valuestring, it->child->next->valuestring);
      smap_put(&nv->ranks, k, r);
    }
    r++;
  }
  cJSON_Delete(j);
  int extra = 0;
  for (int b = 0; b < 256; b++) {
    int keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
    unsigned cp = keep ? (unsigned)b : 256u + (unsigned)extra++;
    if (cp < 0x80) {
      nv->bytes[b][0] = (char)cp;
    } else {
      nv->bytes[b][0] = (char)(0xC0 | (cp >> 6));
      nv->bytes[b][1] = (char)(0x80 | (cp & 0x3F));
    }
  }
  return 0;
}

static void naive_free(naive *nv) {
  smap *ms[2] = {&nv->vocab, &nv->ranks};
  for (int k = 0; k < 2; k++) {
    for (size_t i = 0; i <= ms[k]->mask; i++) free(ms[k]->keys[i]);
    free(ms[k]->keys);
    free(ms[k]->vals);
  }
  free(nv->ids);
  free(nv->scratch);
}

static void naive_push(naive *nv, int32_t id) {
  if (nv->n == nv->cap) {
    nv->cap = nv->cap ? nv->cap * 2 : 1 << 16;
    nv->ids = realloc(nv->ids, nv->cap * sizeof *nv->ids);
  }
  nv->ids[nv->n++] = id;
}

/* Pre-tokenizer callback: BPE the piece by rescanning all pairs after each merge. */
static int naive_piece(void *user, const char *piece, size_t len, int32_t added_id) {
  naive *nv = user;
  if (added_id >= 0) {
    naive_push(nv, added_id);
    return 0;
  }
  char **sym = malloc(len * sizeof *sym);
  size_t n = len;
  for (size_t i = 0; i < len; i++) sym[i] = strdup(nv->bytes[(unsigned char)piece[i]]);
  if (len * 4 + 2 > nv->scratch_cap) {
    nv->scratch_cap = len * 4 + 2;
    nv->scratch = realloc(nv->scratch, nv->scratch_cap);
  }
  char *key = nv->scratch;
  for (;;) {
    int32_t best = -1;
    size_t at = 0;
    for (size_t i = 0; i + 1 < n; i++) {
      size_t la = strlen(sym[i]), lb = strlen(sym[i + 1]);
      memcpy(key, sym[i], la);
      key[la] = ' ';
      memcpy(key + la + 1, sym[i + 1], lb + 1);
      int32_t r = smap_get(&nv->ranks, key);
      if (r >= 0 && (best < 0 || r < best)) {
        best = r;
        at = i;
      }
    }
    if (best < 0) break;
    size_t la = strlen(sym[at]), lb = strlen(sym[at + 1]);
    char *m = malloc(la + lb + 1);
    memcpy(m, sym[at], la);
    memcpy(m + la, sym[at + 1], lb + 1);
    free(sym[at]);
    free(sym[at + 1]);
    sym[at] = m;
    memmove(sym + at + 1, sym + at + 2, (n - at - 2) * sizeof *sym);
    n--;
  }
  for (size_t i = 0; i < n; i++) {
    naive_push(nv, smap_get(&nv->vocab, sym[i]));
    free(sym[i]);
  }
  free(sym);
  return 0;
}

static int count_piece(void *user, const char *piece, size_t len, int32_t added_id) {
  (void)piece;
  (void)len;
  (void)added_id;
  ++*(size_t *)user;
  return 0;
}

static void usage(FILE *f) {
  fprintf(f,
          "usage: bench_tokenizer [TOKENIZER] [--bytes N] [--baseline-bytes N] [--reps R]\n"
          "Encodes a generated mixed-language corpus (English, code, CJK, digits, emoji,\n"
          "whitespace runs; deterministic) and prints one JSON object.\n"
          "  TOKENIZER            tokenizer.json or a directory holding it\n"
          "                       (default: $EPIC_FIXTURES/tokenizer, else ../shared/fixtures/tokenizer)\n"
          "  --bytes N            corpus size (default 10000000)\n"
          "  --baseline-bytes N   prefix encoded by the naive baseline (default 1000000)\n"
          "  --reps R             timed repetitions of the fast encode, best kept (default 3)\n"
          "  -h, --help           this help\n");
}

int main(int argc, char **argv) {
  const char *path = NULL;
  size_t bytes = 10000000, base_bytes = 1000000;
  int reps = 3;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
      usage(stdout);
      return 0;
    } else if (!strcmp(argv[i], "--bytes") && i + 1 < argc) {
      bytes = strtoull(argv[++i], NULL, 10);
    } else if (!strcmp(argv[i], "--baseline-bytes") && i + 1 < argc) {
      base_bytes = strtoull(argv[++i], NULL, 10);
    } else if (!strcmp(argv[i], "--reps") && i + 1 < argc) {
      reps = atoi(argv[++i]);
    } else if (argv[i][0] == '-') {
      fprintf(stderr, "bench_tokenizer: unknown option or missing value: %s\n", argv[i]);
      usage(stderr);
      return 2;
    } else {
      path = argv[i];
    }
  }
  if (bytes == 0 || reps < 1) {
    fprintf(stderr, "bench_tokenizer: --bytes and --reps must be positive\n");
    return 2;
  }
  epic_log_init(EPIC_LOG_LEVEL_WARN, -1);
  char json_path[4200], dir[4096];
  if (!path) {
    const char *fx = getenv("EPIC_FIXTURES");
    snprintf(dir, sizeof dir, "%s/tokenizer", fx && *fx ? fx : "../shared/fixtures");
    path = dir;
  }
  struct stat st;
  if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
    snprintf(json_path, sizeof json_path, "%s/tokenizer.json", path);
  else
    snprintf(json_path, sizeof json_path, "%s", path);

  double t0 = epic_now_seconds();
  epic_tokenizer *tok = NULL;
  if (epic_tokenizer_load(json_path, NULL, &tok) != EPIC_OK) {
    fprintf(stderr, "bench_tokenizer: cannot load %s\n", json_path);
    return 1;
  }
  double load_s = epic_now_seconds() - t0;

  buf corpus = {0};
  gen_corpus(&corpus, bytes);
  if (base_bytes > corpus.n) base_bytes = corpus.n;
  /* cut the baseline sample at a newline so both runs see whole pieces */
  while (base_bytes > 0 && base_bytes < corpus.n && corpus.p[base_bytes - 1] != '\n') base_bytes--;

  int32_t *ids = NULL;
  size_t n = 0;
  double best = 1e30;
  for (int r = 0; r < reps; r++) {
    epic_tokenizer_ids_free(ids);
    t0 = epic_now_seconds();
    if (epic_tokenizer_encode(tok, corpus.p, corpus.n, 0, &ids, &n) != EPIC_OK) {
      fprintf(stderr, "bench_tokenizer: encode failed\n");
      return 1;
    }
    double dt = epic_now_seconds() - t0;
    if (dt < best) best = dt;
  }

  size_t pieces = 0;
  t0 = epic_now_seconds();
  epic_tokenizer_pretokenize(tok, corpus.p, corpus.n, count_piece, &pieces);
  double pre_s = epic_now_seconds() - t0;

  /* fast encode of the baseline sample, for an equal-input comparison */
  int32_t *sids = NULL;
  size_t sn = 0;
  t0 = epic_now_seconds();
  epic_tokenizer_encode(tok, corpus.p, base_bytes, 0, &sids, &sn);
  double fast_sample_s = epic_now_seconds() - t0;

  naive nv;
  if (naive_load(&nv, json_path)) {
    fprintf(stderr, "bench_tokenizer: baseline cannot read %s\n", json_path);
    return 1;
  }
  t0 = epic_now_seconds();
  epic_tokenizer_pretokenize(tok, corpus.p, base_bytes, naive_piece, &nv);
  double base_s = epic_now_seconds() - t0;
  int match = nv.n == sn && memcmp(nv.ids, sids, sn * sizeof *sids) == 0;

  double mbps = corpus.n / best / 1e6, base_mbps = base_bytes / base_s / 1e6;
  printf("{\"bench\":\"tokenizer\",\"tokenizer\":\"%s\",\"load_seconds\":%.3f,"
         "\"bytes\":%zu,\"tokens\":%zu,\"pieces\":%zu,\"bytes_per_token\":%.3f,\"seconds\":%.4f,"
         "\"mb_per_s\":%.2f,\"ns_per_token\":%.1f,\"pretokenize_mb_per_s\":%.2f,"
         "\"baseline\":{\"algorithm\":\"rescan-per-merge BPE on string symbols, same pieces, no cache\","
         "\"bytes\":%zu,\"tokens\":%zu,\"seconds\":%.4f,\"mb_per_s\":%.2f,\"ids_match\":%s,"
         "\"fast_mb_per_s_same_sample\":%.2f},\"speedup\":%.2f}\n",
         json_path, load_s, corpus.n, n, pieces, (double)corpus.n / (n ? n : 1), best, mbps,
         best * 1e9 / (n ? n : 1), corpus.n / pre_s / 1e6, base_bytes, nv.n, base_s, base_mbps,
         match ? "true" : "false", base_bytes / fast_sample_s / 1e6, mbps / base_mbps);
  naive_free(&nv);
  epic_tokenizer_ids_free(sids);
  epic_tokenizer_ids_free(ids);
  epic_tokenizer_destroy(tok);
  free(corpus.p);
  return match ? 0 : 1;
}
