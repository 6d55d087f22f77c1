/* Tokenizer tests: golden ids/decodings of both fixture tokenizers, round trips,
 * the incremental detokenizer, a naive reference BPE cross-check and fuzzing. */
#define _POSIX_C_SOURCE 200809L

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>
#include <cjson/cJSON.h>

#include "common/clock.h"
#include "common/log.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "tests/common/test_util.h"

typedef struct {
  epic_tokenizer *tok;
  cJSON *golden;
  const char *dir; /* fixtures subdirectory */
} fixture;

static fixture g_real = {.dir = "tokenizer"}, g_tiny = {.dir = "tiny-tokenizer"};

static int load_fixture(fixture *f) {
  char a[1024], b[1024], g[1024], rel[256];
  snprintf(rel, sizeof rel, "%s/tokenizer.json", f->dir);
  epic_test_path(a, sizeof a, rel);
  snprintf(rel, sizeof rel, "%s/tokenizer_config.json", f->dir);
  epic_test_path(b, sizeof b, rel);
  snprintf(rel, sizeof rel, "%s/golden.json", f->dir);
  epic_test_path(g, sizeof g, rel);
  if (epic_tokenizer_load(a, b, &f->tok) != EPIC_OK) return -1;
  char *txt = epic_test_read_file(g, NULL);
  if (!txt) return -1;
  f->golden = cJSON_Parse(txt);
  free(txt);
  return f->golden ? 0 : -1;
}

static int setup(void **state) {
  (void)state;
  epic_log_init(EPIC_LOG_LEVEL_WARN, -1);
  if (load_fixture(&g_real) || load_fixture(&g_tiny)) return -1;
  return 0;
}

static int teardown(void **state) {
  (void)state;
  fixture *fs[2] = {&g_real, &g_tiny};
  for (int i = 0; i < 2; i++) {
    epic_tokenizer_destroy(fs[i]->tok);
    cJSON_Delete(fs[i]->golden);
  }
  return 0;
}

static int32_t *json_ids(const cJSON *arr, size_t *n) {
  *n = (size_t)cJSON_GetArraySize(arr);
  int32_t *v = malloc((*n ? *n : 1) * sizeof *v);
  const cJSON *it;
  size_t i = 0;
  cJSON_ArrayForEach(it, arr) v[i++] = (int32_t)it->valuedouble;
  return v;
}

static void print_ids(const char *what, const int32_t *v, size_t n) {
  fprintf(stderr, "    %s:", what);
  for (size_t i = 0; i < n; i++) fprintf(stderr, " %d", v[i]);
  fprintf(stderr, "\n");
}

/* 1 if s[0..n) is valid UTF-8 (complete characters only). */
static int valid_utf8(const char *s, size_t n) {
  const unsigned char *p = (const unsigned char *)s;
  size_t i = 0;
  while (i < n) {
    unsigned c = p[i];
    size_t need;
    unsigned lo = 0x80, hi = 0xBF;
    if (c < 0x80) {
      i++;
      continue;
    }
    if (c >= 0xC2 && c <= 0xDF)
      need = 1;
    else if (c >= 0xE0 && c <= 0xEF) {
      need = 2;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      need = 3;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else
      return 0;
    if (i + need >= n) return 0; /* cut short */
    for (size_t k = 1; k <= need; k++) {
      unsigned d = p[i + k];
      if (d < lo || d > hi) return 0;
      lo = 0x80;
      hi = 0xBF;
    }
    i += need + 1;
  }
  return 1;
}

/* Streams ids through a detok; checks chunk validity; returns the joined text. */
static char *detok_all(const epic_tokenizer *tok, const int32_t *ids, size_t n, int skip, size_t *len,
                       int *bad_chunk) {
  epic_detok *d = NULL;
  assert_int_equal(epic_detok_create(tok, skip, &d), EPIC_OK);
  size_t cap = 64, o = 0;
  char *all = malloc(cap);
  *bad_chunk = 0;
  for (size_t i = 0; i <= n; i++) {
    char *t = NULL;
    size_t l = 0;
    if (i < n)
      assert_int_equal(epic_detok_push(d, ids[i], &t, &l), EPIC_OK);
    else
      assert_int_equal(epic_detok_flush(d, &t, &l), EPIC_OK);
    assert_non_null(t);
    assert_int_equal(strlen(t), l); /* NUL-terminated, no embedded NUL in these texts */
    if (!valid_utf8(t, l)) *bad_chunk = 1;
    while (o + l + 1 > cap) cap *= 2;
    all = realloc(all, cap);
    memcpy(all + o, t, l);
    o += l;
    epic_tokenizer_text_free(t);
  }
  all[o] = 0;
  *len = o;
  epic_detok_destroy(d);
  return all;
}

static void check_golden_cases(fixture *f) {
  const cJSON *cases = cJSON_GetObjectItem(f->golden, "cases"), *c;
  int fails = 0, count = 0;
  assert_true(cJSON_GetArraySize(cases) > 0);
  cJSON_ArrayForEach(c, cases) {
    const char *text = cJSON_GetObjectItem(c, "text")->valuestring;
    const char *decoded = cJSON_GetObjectItem(c, "decoded")->valuestring;
    size_t ne, ng;
    int32_t *want = json_ids(cJSON_GetObjectItem(c, "ids"), &ng);
    int32_t *got = NULL;
    count++;
    assert_int_equal(epic_tokenizer_encode(f->tok, text, strlen(text), 0, &got, &ne), EPIC_OK);
    if (ne != ng || (ng && memcmp(want, got, ng * sizeof *got) != 0)) {
      fprintf(stderr, "  [%s] encode mismatch for \"%s\"\n", f->dir, text);
      print_ids("want", want, ng);
      print_ids("got ", got, ne);
      fails++;
    }
    /* token strings */
    const cJSON *toks = cJSON_GetObjectItem(c, "tokens"), *t;
    size_t k = 0;
    cJSON_ArrayForEach(t, toks) {
      const char *s = epic_tokenizer_id_to_token(f->tok, want[k]);
      if (!s || strcmp(s, t->valuestring) != 0 || epic_tokenizer_token_to_id(f->tok, t->valuestring) != want[k]) {
        fprintf(stderr, "  [%s] token %zu of \"%s\": id %d is \"%s\", want \"%s\"\n", f->dir, k, text, want[k],
                s ? s : "(null)", t->valuestring);
        fails++;
      }
      k++;
    }
    /* decode of the golden ids, and of our ids (round trip) */
    char *out = NULL;
    size_t ol = 0;
    assert_int_equal(epic_tokenizer_decode(f->tok, want, ng, 0, &out, &ol), EPIC_OK);
    if (ol != strlen(decoded) || strcmp(out, decoded) != 0) {
      fprintf(stderr, "  [%s] decode mismatch for \"%s\": got \"%s\"\n", f->dir, decoded, out);
      fails++;
    }
    epic_tokenizer_text_free(out);
    assert_int_equal(epic_tokenizer_decode(f->tok, got, ne, 0, &out, &ol), EPIC_OK);
    if (strcmp(out, text) != 0) {
      fprintf(stderr, "  [%s] round trip failed for \"%s\": got \"%s\"\n", f->dir, text, out);
      fails++;
    }
    epic_tokenizer_text_free(out);
    /* incremental detokenizer, id by id */
    int bad = 0;
    size_t dl = 0;
    char *streamed = detok_all(f->tok, want, ng, 0, &dl, &bad);
    if (bad || strcmp(streamed, decoded) != 0) {
      fprintf(stderr, "  [%s] detok mismatch for \"%s\": got \"%s\"%s\n", f->dir, decoded, streamed,
              bad ? " (emitted an incomplete/invalid UTF-8 chunk)" : "");
      fails++;
    }
    free(streamed);
    /* skip_special: streamed equals one-shot */
    char *skipped = NULL;
    size_t sl = 0;
    assert_int_equal(epic_tokenizer_decode(f->tok, want, ng, 1, &skipped, &sl), EPIC_OK);
    streamed = detok_all(f->tok, want, ng, 1, &dl, &bad);
    if (bad || strcmp(streamed, skipped) != 0) {
      fprintf(stderr, "  [%s] detok(skip_special) mismatch for \"%s\"\n", f->dir, decoded);
      fails++;
    }
    free(streamed);
    epic_tokenizer_text_free(skipped);
    epic_tokenizer_ids_free(got);
    free(want);
  }
  fprintf(stderr, "  [%s] %d golden cases, %d failures\n", f->dir, count, fails);
  assert_int_equal(fails, 0);
}

static void test_golden_real(void **state) {
  (void)state;
  check_golden_cases(&g_real);
}

static void test_golden_tiny(void **state) {
  (void)state;
  check_golden_cases(&g_tiny);
}

static void test_metadata(void **state) {
  (void)state;
  fixture *fs[2] = {&g_real, &g_tiny};
  for (int i = 0; i < 2; i++) {
    epic_tokenizer *t = fs[i]->tok;
    int32_t bos = epic_tokenizer_bos_id(t), eos = epic_tokenizer_eos_id(t);
    assert_true(bos >= 0 && eos >= 0 && bos != eos);
    assert_string_equal(epic_tokenizer_id_to_token(t, bos), "<｜begin▁of▁sentence｜>");
    assert_string_equal(epic_tokenizer_id_to_token(t, eos), "<｜end▁of▁sentence｜>");
    assert_true(epic_tokenizer_is_special(t, bos));
    int32_t user = epic_tokenizer_token_to_id(t, "<｜User｜>");
    assert_true(user >= 0);
    assert_false(epic_tokenizer_is_special(t, user));
    assert_int_equal(epic_tokenizer_token_to_id(t, "no such token at all"), -1);
    assert_null(epic_tokenizer_id_to_token(t, -1));
    assert_null(epic_tokenizer_id_to_token(t, epic_tokenizer_vocab_size(t)));
    assert_non_null(epic_tokenizer_chat_template(t));
    /* add_bos prepends exactly BOS */
    int32_t *ids = NULL;
    size_t n = 0;
    assert_int_equal(epic_tokenizer_encode(t, "Hello", 5, 1, &ids, &n), EPIC_OK);
    assert_true(n >= 2);
    assert_int_equal(ids[0], bos);
    epic_tokenizer_ids_free(ids);
    assert_int_equal(epic_tokenizer_encode(t, "", 0, 0, &ids, &n), EPIC_OK);
    assert_int_equal(n, 0);
    epic_tokenizer_ids_free(ids);
  }
  /* the tiny tokenizer is exactly 1280 ids */
  assert_int_equal(epic_tokenizer_vocab_size(g_tiny.tok), 1280);
}

static void test_decode_errors(void **state) {
  (void)state;
  epic_tokenizer *t = g_tiny.tok;
  int32_t bad[3] = {5, 99999, 7};
  char *out = (char *)1;
  size_t len = 0;
  assert_int_equal(epic_tokenizer_decode(t, bad, 3, 0, &out, &len), EPIC_ERR_INVALID);
  assert_null(out);
  int32_t neg = -3;
  assert_int_equal(epic_tokenizer_decode(t, &neg, 1, 0, &out, &len), EPIC_ERR_INVALID);
  epic_detok *d = NULL;
  assert_int_equal(epic_detok_create(t, 0, &d), EPIC_OK);
  assert_int_equal(epic_detok_push(d, 1280, &out, &len), EPIC_ERR_INVALID);
  assert_int_equal(epic_detok_push(d, 10, &out, &len), EPIC_OK);
  epic_tokenizer_text_free(out);
  epic_detok_destroy(d);
  epic_detok_destroy(NULL);
  epic_tokenizer_destroy(NULL);
  /* generated text: ids past the tokenizer (a padded model vocabulary) decode to
   * nothing, the rest as without them, one-shot and streamed alike */
  int32_t good[2] = {5, 7};
  char *want = NULL, *got = NULL;
  size_t wl = 0, gl = 0;
  assert_int_equal(epic_tokenizer_decode(t, good, 2, 0, &want, &wl), EPIC_OK);
  assert_int_equal(epic_tokenizer_decode(t, bad, 3, EPIC_DECODE_SKIP_UNKNOWN, &got, &gl), EPIC_OK);
  assert_int_equal(gl, wl);
  assert_memory_equal(got, want, wl);
  epic_tokenizer_text_free(got);
  assert_int_equal(epic_detok_create(t, EPIC_DECODE_GENERATED, &d), EPIC_OK);
  size_t streamed = 0;
  for (int i = 0; i < 3; i++) {
    assert_int_equal(epic_detok_push(d, bad[i], &out, &len), EPIC_OK);
    assert_true(streamed + len <= wl);
    assert_memory_equal(out, want + streamed, len);
    streamed += len;
    epic_tokenizer_text_free(out);
  }
  assert_int_equal(epic_detok_push(d, neg, &out, &len), EPIC_OK);
  assert_int_equal(len, 0);
  epic_tokenizer_text_free(out);
  assert_int_equal(epic_detok_flush(d, &out, &len), EPIC_OK);
  assert_int_equal(streamed + len, wl);
  epic_tokenizer_text_free(out);
  epic_tokenizer_text_free(want);
  epic_detok_destroy(d);
  /* missing file */
  epic_tokenizer *x = (epic_tokenizer *)1;
  assert_int_equal(epic_tokenizer_load("/nonexistent/tokenizer.json", NULL, &x), EPIC_ERR_IO);
  assert_null(x);
  assert_int_equal(epic_tokenizer_load_dir("/nonexistent", &x), EPIC_ERR_IO);
}

/* ---------------- naive reference BPE, built from tokenizer.json directly ---------------- */

typedef struct {
  char **keys;
  int32_t *vals;
  size_t cap;
} smap;

static uint64_t fnv(const char *s, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
  return h;
}

static void smap_put(smap *m, const char *k, int32_t v) {
  size_t i = fnv(k, strlen(k)) & (m->cap - 1);
  while (m->keys[i] && strcmp(m->keys[i], k) != 0) i = (i + 1) & (m->cap - 1);
  if (!m->keys[i]) m->keys[i] = strdup(k);
  m->vals[i] = v;
}

static int32_t smap_get(const smap *m, const char *k) {
  size_t i = fnv(k, strlen(k)) & (m->cap - 1);
  while (m->keys[i]) {
    if (strcmp(m->keys[i], k) == 0) return m->vals[i];
    i = (i + 1) & (m->cap - 1);
  }
  return -1;
}

static void smap_free(smap *m) {
  for (size_t i = 0; i < m->cap; i++) free(m->keys[i]);
  free(m->keys);
  free(m->vals);
}

typedef struct {
  smap vocab, ranks; /* ranks keyed by "a b" */
  char bytes[256][4];
  const epic_tokenizer *tok;
  int32_t *ids;
  size_t n, cap;
} naive;

static void naive_init(naive *nv, const char *rel, const epic_tokenizer *tok) {
  char p[1024];
  char *txt = epic_test_read_file(epic_test_path(p, sizeof p, rel), NULL);
  assert_non_null(txt);
  cJSON *j = cJSON_Parse(txt);
  free(txt);
  assert_non_null(j);
  const cJSON *model = cJSON_GetObjectItem(j, "model"), *it;
  const cJSON *vocab = cJSON_GetObjectItem(model, "vocab"), *merges = cJSON_GetObjectItem(model, "merges");
  memset(nv, 0, sizeof *nv);
  nv->tok = tok;
  size_t cap = 1;
  while (cap < 2 * (size_t)(cJSON_GetArraySize(vocab) + cJSON_GetArraySize(merges)) + 16) cap <<= 1;
  nv->vocab = (smap){calloc(cap, sizeof(char *)), calloc(cap, sizeof(int32_t)), cap};
  nv->ranks = (smap){calloc(cap, sizeof(char *)), calloc(cap, sizeof(int32_t)), cap};
  cJSON_ArrayForEach(it, vocab) smap_put(&nv->vocab, it->string, (int32_t)it->valuedouble);
  int32_t r = 0;
  cJSON_ArrayForEach(it, merges) smap_put(&nv->ranks, it->valuestring, r++);
  cJSON_Delete(j);
  /* GPT-2 byte map, written independently of the library */
  int extra = 0;
  for (int b = 0; b < 256; b++) {
    int keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
    unsigned cp = keep ? (unsigned)b : 256u + (unsigned)extra++;
    char *o = nv->bytes[b];
    if (cp < 0x80) {
      o[0] = (char)cp;
    } else {
      o[0] = (char)(0xC0 | (cp >> 6));
      o[1] = (char)(0x80 | (cp & 0x3F));
    }
  }
}

static int naive_piece(void *user, const char *piece, size_t len, int32_t added_id) {
  naive *nv = user;
  if (nv->n + len + 1 > nv->cap) {
    nv->cap = (nv->n + len + 1) * 2;
    nv->ids = realloc(nv->ids, nv->cap * sizeof *nv->ids);
  }
  if (added_id >= 0) {
    nv->ids[nv->n++] = added_id;
    return 0;
  }
  char **sym = malloc(len * sizeof *sym);
  size_t n = len;
  for (size_t i = 0; i < len; i++) sym[i] = strdup(nv->bytes[(unsigned char)piece[i]]);
  char *buf = malloc(len * 4 * 2 + 2); /* any two symbols of this piece, a space, NUL */
  for (;;) {
    int32_t best = -1;
    size_t at = 0;
    for (size_t i = 0; i + 1 < n; i++) {
      size_t la = strlen(sym[i]), lb = strlen(sym[i + 1]);
      memcpy(buf, sym[i], la);
      buf[la] = ' ';
      memcpy(buf + la + 1, sym[i + 1], lb + 1);
      int32_t r = smap_get(&nv->ranks, buf);
      if (r >= 0 && (best < 0 || r < best)) {
        best = r;
        at = i;
      }
    }
    if (best < 0) break;
    char *m = malloc(strlen(sym[at]) + strlen(sym[at + 1]) + 1);
    strcpy(m, sym[at]);
    strcat(m, sym[at + 1]);
    free(sym[at]);
    free(sym[at + 1]);
    sym[at] = m;
    memmove(sym + at + 1, sym + at + 2, (n - at - 2) * sizeof *sym);
    n--;
  }
  free(buf);
  for (size_t i = 0; i < n; i++) {
    nv->ids[nv->n++] = smap_get(&nv->vocab, sym[i]);
    free(sym[i]);
  }
  free(sym);
  return 0;
}

static void naive_free(naive *nv) {
  smap_free(&nv->vocab);
  smap_free(&nv->ranks);
  free(nv->ids);
}

/* Deterministic mixed text: words, code, CJK, digits, emoji, whitespace runs,
 * long runs (to reach the heap-based merge path) and stray bytes if raw. */
static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) {
  g_rng ^= g_rng << 13;
  g_rng ^= g_rng >> 7;
  g_rng ^= g_rng << 17;
  return (uint32_t)(g_rng >> 11);
}

static char *mixed_text(size_t target, int raw_bytes, size_t *len) {
  static const char *parts[] = {
      "the ",        "quick ",        "brown ",     "fox ",          "jumps ",    "over ",
      "lazy ",       "dog. ",         "Hello, ",    "world! ",       "It's ",     "we'll ",
      "int main(void) {\n", "    return 0;\n}\n", "\tx += y * 2;\n", "if (a->b) { c[i] = d; }\n",
      "你好，世界！", "人工智能正在改变世界。", "こんにちは", "カタカナ", "안녕하세요 ",
      "12345",       "3.14159",       "2024-01-01", "😀",           "👨‍👩‍👧‍👦",      "🇯🇵",
      "   ",         "\n\n",          "\r\n",       "\t\t",          "  \n  ",    "Привет ",
      "مرحبا ",      "é",           "ñ",          "<｜User｜>",    "<think>",   "</think>\n",
      "DeepSeek-V3 ", "MoE ",         "x²+y³ ",     "«q» ",          "…",        "—"};
  size_t np = sizeof parts / sizeof parts[0];
  char *b = malloc(target + 4096);
  size_t n = 0;
  while (n < target) {
    uint32_t r = rnd() % 100;
    if (r < 2) { /* long run of one class */
      static const char *runs[] = {"a", " ", "漢", "9", "!", "😀", "\n"};
      const char *u = runs[rnd() % 7];
      size_t ul = strlen(u), k = 20 + rnd() % 200;
      for (size_t i = 0; i < k && n + ul < target + 4000; i++, n += ul) memcpy(b + n, u, ul);
    } else if (r < 4 && raw_bytes) {
      b[n++] = (char)(rnd() & 0xFF);
    } else {
      const char *p = parts[rnd() % np];
      size_t l = strlen(p);
      memcpy(b + n, p, l);
      n += l;
    }
  }
  b[n] = 0;
  *len = n;
  return b;
}

static void cross_check_naive(fixture *f, size_t bytes) {
  naive nv;
  char rel[256];
  snprintf(rel, sizeof rel, "%s/tokenizer.json", f->dir);
  naive_init(&nv, rel, f->tok);
  for (int raw = 0; raw < 2; raw++) {
    size_t len;
    char *text = mixed_text(bytes, raw, &len);
    nv.n = 0;
    assert_int_equal(epic_tokenizer_pretokenize(f->tok, text, len, naive_piece, &nv), EPIC_OK);
    int32_t *ids = NULL;
    size_t n = 0;
    assert_int_equal(epic_tokenizer_encode(f->tok, text, len, 0, &ids, &n), EPIC_OK);
    size_t first = 0;
    while (first < n && first < nv.n && ids[first] == nv.ids[first]) first++;
    if (n != nv.n || first != n) fprintf(stderr, "  [%s] naive BPE differs at id %zu (n %zu vs %zu)\n", f->dir, first, n, nv.n);
    assert_int_equal(n, nv.n);
    assert_int_equal(first, n);
    epic_tokenizer_ids_free(ids);
    free(text);
  }
  naive_free(&nv);
}

static void test_naive_crosscheck_tiny(void **state) {
  (void)state;
  cross_check_naive(&g_tiny, 200000);
}

static void test_naive_crosscheck_real(void **state) {
  (void)state;
  cross_check_naive(&g_real, 60000);
}

/* ---------------- fuzz: random bytes, invalid UTF-8, long inputs ---------------- */

/* Raw bytes of ids: must reproduce the input exactly, valid UTF-8 or not. */
static void check_bytes_roundtrip(const epic_tokenizer *t, const char *s, size_t n) {
  int32_t *ids = NULL;
  size_t k = 0;
  assert_int_equal(epic_tokenizer_encode(t, s, n, 0, &ids, &k), EPIC_OK);
  size_t o = 0;
  int ok = 1;
  for (size_t i = 0; i < k && ok; i++) {
    size_t l = 0;
    const char *b = epic_tokenizer_token_bytes(t, ids[i], &l);
    assert_non_null(b);
    if (o + l > n || memcmp(s + o, b, l) != 0) ok = 0;
    o += l;
  }
  if (!ok || o != n) fprintf(stderr, "  byte round trip failed for a %zu-byte input\n", n);
  assert_true(ok && o == n);
  /* decode never fails and yields valid UTF-8; equal to the input when it was valid */
  char *txt = NULL;
  size_t tl = 0;
  assert_int_equal(epic_tokenizer_decode(t, ids, k, 0, &txt, &tl), EPIC_OK);
  assert_true(valid_utf8(txt, tl));
  if (valid_utf8(s, n)) {
    assert_int_equal(tl, n);
    assert_memory_equal(txt, s, n);
  }
  /* streaming gives the same bytes as one-shot decoding */
  epic_detok *d = NULL;
  assert_int_equal(epic_detok_create(t, 0, &d), EPIC_OK);
  size_t so = 0;
  for (size_t i = 0; i <= k; i++) {
    char *c = NULL;
    size_t cl = 0;
    if (i < k)
      assert_int_equal(epic_detok_push(d, ids[i], &c, &cl), EPIC_OK);
    else
      assert_int_equal(epic_detok_flush(d, &c, &cl), EPIC_OK);
    assert_true(valid_utf8(c, cl));
    assert_true(so + cl <= tl);
    assert_memory_equal(c, txt + so, cl);
    so += cl;
    epic_tokenizer_text_free(c);
  }
  assert_int_equal(so, tl);
  epic_detok_destroy(d);
  epic_tokenizer_text_free(txt);
  epic_tokenizer_ids_free(ids);
}

static void test_fuzz_random(void **state) {
  (void)state;
  static const char *frags[] = {"\xC3", "\xA9", "\xE4\xB8", "\x96", "\xF0\x9F\x98", "\x80", "\xFF", "\xC0\xAF",
                                "\xED\xA0\x80", "<｜", "User｜>", "<｜User｜>", " ", "\n", "a", "1", "漢", "\0"};
  char buf[600];
  fixture *fs[2] = {&g_tiny, &g_real};
  for (int f = 0; f < 2; f++) {
    for (int iter = 0; iter < 400; iter++) {
      size_t n = rnd() % 300;
      if (iter % 2) {
        for (size_t i = 0; i < n; i++) buf[i] = (char)(rnd() & 0xFF);
      } else {
        size_t o = 0;
        while (o < n) {
          const char *p = frags[rnd() % (sizeof frags / sizeof frags[0])];
          size_t l = *p ? strlen(p) : 1;
          memcpy(buf + o, p, l);
          o += l;
        }
        n = o;
      }
      check_bytes_roundtrip(fs[f]->tok, buf, n);
    }
  }
}

static void test_detok_random_ids(void **state) {
  (void)state;
  /* Any id sequence over the tiny vocabulary: streamed == one-shot (lossy). */
  const epic_tokenizer *t = g_tiny.tok;
  int32_t ids[64];
  for (int iter = 0; iter < 2000; iter++) {
    size_t n = rnd() % 64;
    for (size_t i = 0; i < n; i++) ids[i] = (int32_t)(rnd() % 1280);
    for (int skip = 0; skip < 2; skip++) {
      char *one = NULL;
      size_t ol = 0, sl = 0;
      int bad = 0;
      assert_int_equal(epic_tokenizer_decode(t, ids, n, skip, &one, &ol), EPIC_OK);
      assert_true(valid_utf8(one, ol));
      /* texts may hold NUL (byte 0 token), so compare by length */
      epic_detok *d = NULL;
      assert_int_equal(epic_detok_create(t, skip, &d), EPIC_OK);
      size_t so = 0;
      for (size_t i = 0; i <= n; i++) {
        char *c = NULL;
        size_t cl = 0;
        if (i < n)
          assert_int_equal(epic_detok_push(d, ids[i], &c, &cl), EPIC_OK);
        else
          assert_int_equal(epic_detok_flush(d, &c, &cl), EPIC_OK);
        if (!valid_utf8(c, cl)) bad = 1;
        assert_true(so + cl <= ol);
        assert_memory_equal(c, one + so, cl);
        so += cl;
        epic_tokenizer_text_free(c);
      }
      sl = so;
      assert_false(bad);
      assert_int_equal(sl, ol);
      epic_detok_destroy(d);
      epic_tokenizer_text_free(one);
    }
  }
}

static void timed_encode(const epic_tokenizer *t, const char *what, const char *s, size_t n) {
  double t0 = epic_now_seconds();
  check_bytes_roundtrip(t, s, n);
  double dt = epic_now_seconds() - t0;
  fprintf(stderr, "  %-28s %8zu bytes  %.3f s (encode+decode+stream)\n", what, n, dt);
  assert_true(dt < 30.0); /* only absurd (quadratic) behaviour fails */
}

static void test_long_inputs(void **state) {
  (void)state;
  size_t big = 1 << 20;
  char *s = malloc(big + 1);
  fixture *fs[2] = {&g_real, &g_tiny};
  for (int f = 0; f < 2; f++) {
    const epic_tokenizer *t = fs[f]->tok;
    memset(s, 'a', big);
    timed_encode(t, "1 MB of 'a'", s, big);
    memset(s, ' ', 200 * 1024);
    timed_encode(t, "200 KB of spaces", s, 200 * 1024);
    memset(s, '\n', 200 * 1024);
    timed_encode(t, "200 KB of newlines", s, 200 * 1024);
    for (size_t i = 0; i + 3 <= 300 * 1024; i += 3) memcpy(s + i, "漢", 3);
    timed_encode(t, "300 KB of one CJK char", s, 300 * 1024 / 3 * 3);
    for (size_t i = 0; i < 100 * 1024; i++) s[i] = "0123456789"[i % 10];
    timed_encode(t, "100 KB of digits", s, 100 * 1024);
    size_t ml;
    char *m = mixed_text(big, f == 1, &ml);
    timed_encode(t, "1 MB mixed text", m, ml);
    free(m);
  }
  free(s);
}

/* ---------------- synthetic tokenizer.json: behaviours and rejections ---------------- */

/* Writes a tokenizer.json with the 256 byte symbols as vocab (id = 3 + byte),
 * no merges, and the given JSON fragments; returns the load status. */
static epic_status load_synthetic(const char *normalizer, const char *pre, const char *added, const char *decoder,
                                  epic_tokenizer **out) {
  char path[] = "/tmp/epic_tok_test_XXXXXX";
  int fd = mkstemp(path);
  assert_true(fd >= 0);
  FILE *f = fdopen(fd, "w");
  assert_non_null(f);
  fprintf(f, "{\"normalizer\":%s,\"pre_tokenizer\":%s,\"added_tokens\":%s,\"decoder\":%s,", normalizer, pre,
          added, decoder);
  fprintf(f, "\"model\":{\"type\":\"BPE\",\"merges\":[\"a b\"],\"vocab\":{\"<s>\":0,\"ab\":259");
  int extra = 0;
  for (int b = 0; b < 256; b++) {
    int keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
    unsigned cp = keep ? (unsigned)b : 256u + (unsigned)extra++;
    char u[3] = {0};
    if (cp < 0x80) {
      u[0] = (char)cp;
    } else {
      u[0] = (char)(0xC0 | (cp >> 6));
      u[1] = (char)(0x80 | (cp & 0x3F));
    }
    if (b == '"' || b == '\\')
      fprintf(f, ",\"\\%s\":%d", u, 3 + b);
    else
      fprintf(f, ",\"%s\":%d", u, 3 + b);
  }
  fprintf(f, "}}}");
  fclose(f);
  epic_status st = epic_tokenizer_load(path, NULL, out);
  remove(path);
  return st;
}

#define BL "{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"use_regex\":false}"
#define DEC "{\"type\":\"ByteLevel\"}"
#define EMPTY_NORM "{\"type\":\"Sequence\",\"normalizers\":[]}"

typedef struct {
  char out[512];
  size_t n;
} pieces;

static int collect(void *user, const char *piece, size_t len, int32_t added_id) {
  pieces *p = user;
  p->n += (size_t)snprintf(p->out + p->n, sizeof p->out - p->n, "[%.*s]%s", (int)len, piece,
                           added_id >= 0 ? "*" : "");
  return 0;
}

static void expect_pieces(const char *pre, const char *added, const char *text, const char *want) {
  epic_tokenizer *t = NULL;
  assert_int_equal(load_synthetic(EMPTY_NORM, pre, added, DEC, &t), EPIC_OK);
  pieces p = {{0}, 0};
  assert_int_equal(epic_tokenizer_pretokenize(t, text, strlen(text), collect, &p), EPIC_OK);
  if (strcmp(p.out, want) != 0) fprintf(stderr, "  pre %s on \"%s\": got %s want %s\n", pre, text, p.out, want);
  assert_string_equal(p.out, want);
  /* the pieces still encode and decode */
  int32_t *ids = NULL;
  size_t n = 0;
  assert_int_equal(epic_tokenizer_encode(t, text, strlen(text), 0, &ids, &n), EPIC_OK);
  epic_tokenizer_ids_free(ids);
  epic_tokenizer_destroy(t);
}

#define SPLIT(pat, beh) "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":" pat \
                        ",\"behavior\":\"" beh "\",\"invert\":false}," BL "]}"

static void test_split_behaviors(void **state) {
  (void)state;
  expect_pieces(SPLIT("{\"String\":\" \"}", "Isolated"), "[]", "a b  c", "[a][ ][b][ ][ ][c]");
  expect_pieces(SPLIT("{\"String\":\" \"}", "Removed"), "[]", "a b  c", "[a][b][c]");
  expect_pieces(SPLIT("{\"String\":\" \"}", "MergedWithPrevious"), "[]", "a b  c", "[a ][b ][ ][c]");
  expect_pieces(SPLIT("{\"String\":\" \"}", "MergedWithNext"), "[]", "a b  c", "[a][ b][ ][ c]");
  expect_pieces(SPLIT("{\"Regex\":\"a\"}", "Contiguous"), "[]", "aabab", "[aa][b][a][b]");
  /* a lone ByteLevel with use_regex applies the GPT-2 regex */
  expect_pieces("{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"use_regex\":true}", "[]",
                "Hello world's 42!", "[Hello][ world]['s][ 42][!]");
  /* add_prefix_space: each piece entering ByteLevel gets a leading space */
  expect_pieces("{\"type\":\"ByteLevel\",\"add_prefix_space\":true,\"use_regex\":true}", "[]", "Hi there",
                "[ Hi][ there]");
  /* added tokens: lstrip/rstrip absorb whitespace, single_word needs word boundaries */
  expect_pieces(BL,
                "[{\"id\":0,\"content\":\"<s>\",\"lstrip\":true,\"rstrip\":true,\"single_word\":false,"
                "\"normalized\":false,\"special\":true}]",
                "a  <s>  b", "[a][  <s>  ]*[b]");
  expect_pieces(BL,
                "[{\"id\":0,\"content\":\"<s>\",\"lstrip\":false,\"rstrip\":false,\"single_word\":true,"
                "\"normalized\":false,\"special\":true}]",
                "x<s> <s>", "[x<s> ][<s>]*");
}

static void test_rejections(void **state) {
  (void)state;
  epic_tokenizer *t = (epic_tokenizer *)1;
  epic_log_init(EPIC_LOG_LEVEL_ERROR, -1);
  assert_int_equal(load_synthetic("{\"type\":\"NFC\"}", BL, "[]", DEC, &t), EPIC_ERR_UNSUPPORTED);
  assert_null(t);
  assert_int_equal(load_synthetic("null", "{\"type\":\"Metaspace\"}", "[]", DEC, &t), EPIC_ERR_UNSUPPORTED);
  assert_int_equal(load_synthetic("null", "null", "[]", DEC, &t), EPIC_ERR_UNSUPPORTED);
  assert_int_equal(load_synthetic("null", SPLIT("{\"Regex\":\"(\"}", "Isolated"), "[]", DEC, &t),
                   EPIC_ERR_UNSUPPORTED);
  assert_int_equal(load_synthetic("null", SPLIT("{\"Regex\":\"a\"}", "Sideways"), "[]", DEC, &t),
                   EPIC_ERR_UNSUPPORTED);
  assert_int_equal(load_synthetic("null", BL, "[]", "{\"type\":\"WordPiece\"}", &t), EPIC_ERR_UNSUPPORTED);
  /* null normalizer and a single merge work; "ab" merges */
  assert_int_equal(load_synthetic("null", BL, "[]", DEC, &t), EPIC_OK);
  int32_t *ids = NULL;
  size_t n = 0;
  assert_int_equal(epic_tokenizer_encode(t, "abc", 3, 0, &ids, &n), EPIC_OK);
  assert_int_equal(n, 2);
  assert_int_equal(ids[0], 259);
  assert_int_equal(ids[1], 3 + 'c');
  epic_tokenizer_ids_free(ids);
  /* no bos_token without a config: add_bos is an error, not a crash */
  assert_int_equal(epic_tokenizer_bos_id(t), -1);
  assert_int_equal(epic_tokenizer_encode(t, "abc", 3, 1, &ids, &n), EPIC_ERR_INVALID);
  epic_tokenizer_destroy(t);
  epic_log_init(EPIC_LOG_LEVEL_WARN, -1);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_golden_real),
      cmocka_unit_test(test_golden_tiny),
      cmocka_unit_test(test_metadata),
      cmocka_unit_test(test_decode_errors),
      cmocka_unit_test(test_naive_crosscheck_tiny),
      cmocka_unit_test(test_naive_crosscheck_real),
      cmocka_unit_test(test_fuzz_random),
      cmocka_unit_test(test_detok_random_ids),
      cmocka_unit_test(test_long_inputs),
      cmocka_unit_test(test_split_behaviors),
      cmocka_unit_test(test_rejections),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
