/* Byte-level BPE tokenizer: loader for tokenizer.json, encoder, decoder and the
 * incremental detokenizer. See tokenizer.h for the contract. */
#define _POSIX_C_SOURCE 200809L
#define PCRE2_CODE_UNIT_WIDTH 8

#include "coordinator/tokenizer/tokenizer.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/log.h"

/* Ids above this are refused: they would only come from a corrupt file, and the
 * per-id tables are sized by the largest id. */
#define TOK_MAX_ID (1 << 24)
#define TOK_MAX_STEPS 8
/* Pieces of at most this many bytes are merged by rescanning (faster for the
 * short pieces that dominate text); longer ones use the priority queue. */
#define BPE_SMALL 16
/* Texts longer than this get a per-call piece cache. */
#define CACHE_MIN_TEXT 2048
#define CACHE_MAX_ENTRIES (1u << 15)

enum { F_EXISTS = 1, F_ADDED = 2, F_SPECIAL = 4 };

enum split_behavior {
  SPLIT_REMOVED,
  SPLIT_ISOLATED,
  SPLIT_MERGED_PREV,
  SPLIT_MERGED_NEXT,
  SPLIT_CONTIGUOUS
};

/* The GPT-2 pre-tokenizer regex used by ByteLevel with use_regex=true. */
static const char k_gpt2_regex[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

typedef struct {
  pcre2_code *re;
  int behavior;
  int invert;
  int prefix_space; /* ByteLevel add_prefix_space, applied to each piece entering this step */
  int jit;          /* JIT-compiled: call pcre2_jit_match (skips the generic entry checks) */
} split_step;

typedef struct {
  int32_t id;
  uint32_t off, len; /* content in tok->arena */
  uint8_t lstrip, rstrip, single_word, normalized;
} added_token;

/* Byte trie over added-token contents: root has a direct table, deeper nodes a
 * sibling chain (few distinct bytes follow a common prefix like "<｜"). */
typedef struct {
  int32_t child, sibling, token; /* token: index into added[] or -1 */
  uint8_t byte;
} trie_node;

typedef struct {
  trie_node *nodes;
  size_t n, cap;
  int32_t root[256];
  int empty;
} trie;

typedef struct {
  uint64_t key; /* (left << 32) | right; UINT64_MAX = empty */
  int32_t rank, new_id;
} pair_entry;

struct epic_tokenizer {
  int32_t n_ids;
  uint8_t *flags;
  uint32_t *str_off, *str_len; /* token string (tokenizer.json form) in arena */
  uint32_t *dec_off, *dec_len; /* decoded bytes in arena */
  char *arena;
  size_t arena_len, arena_cap;

  int32_t *smap; /* open addressing: token string -> id, -1 empty */
  size_t smap_mask;

  pair_entry *pmap;
  size_t pmap_mask;

  int32_t byte_id[256];
  uint32_t b2u[256];
  int32_t unk_id;
  int ignore_merges;

  added_token *added;
  size_t n_added;
  trie trie_raw, trie_norm; /* normalized=false tokens, normalized=true tokens */
  pcre2_code *word_re;      /* \w, for single_word */

  split_step steps[TOK_MAX_STEPS];
  int n_steps;

  int32_t bos_id, eos_id;
  char *chat_template;
};

/* ------------------------------------------------------------------ utilities */

static uint64_t hash_bytes(const void *p, size_t n) {
  /* FNV-1a over 8-byte words then tail bytes, finished with a mixer; fast
   * enough and well spread for token strings. */
  const uint8_t *s = p;
  uint64_t h = 0xcbf29ce484222325ull ^ (n * 0x9E3779B97F4A7C15ull);
  while (n >= 8) {
    uint64_t w;
    memcpy(&w, s, 8);
    h = (h ^ w) * 0x100000001b3ull;
    h ^= h >> 29;
    s += 8;
    n -= 8;
  }
  while (n--) h = (h ^ *s++) * 0x100000001b3ull;
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  return h;
}

static uint64_t hash_u64(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdull;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ull;
  k ^= k >> 33;
  return k;
}

static size_t pow2_at_least(size_t n) {
  size_t c = 16;
  while (c < n) c <<= 1;
  return c;
}

/* GPT-2 byte <-> unicode map: printable Latin-1 bytes map to themselves, the
 * other 68 to U+0100.. in byte order. */
static void byte_unicode_tables(uint32_t b2u[256], int16_t u2b[324]) {
  int n = 0;
  for (int i = 0; i < 324; i++) u2b[i] = -1;
  for (int b = 0; b < 256; b++) {
    int keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    b2u[b] = keep ? (uint32_t)b : (uint32_t)(256 + n++);
    u2b[b2u[b]] = (int16_t)b;
  }
}

static size_t utf8_put(char *o, uint32_t cp) {
  if (cp < 0x80) {
    o[0] = (char)cp;
    return 1;
  }
  if (cp < 0x800) {
    o[0] = (char)(0xC0 | (cp >> 6));
    o[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
  }
  if (cp < 0x10000) {
    o[0] = (char)(0xE0 | (cp >> 12));
    o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[2] = (char)(0x80 | (cp & 0x3F));
    return 3;
  }
  o[0] = (char)(0xF0 | (cp >> 18));
  o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
  o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
  o[3] = (char)(0x80 | (cp & 0x3F));
  return 4;
}

enum { U8_VALID, U8_INVALID, U8_INCOMPLETE };

/* Classifies the sequence at s[0..n): VALID (*len = char length), INVALID
 * (*len = maximal invalid subpart, the unit one U+FFFD replaces), INCOMPLETE (a
 * valid prefix cut by the end of the buffer, *len = n). Follows the Unicode
 * "maximal subpart" practice that Rust's from_utf8_lossy implements. */
static int utf8_classify(const uint8_t *s, size_t n, size_t *len, uint32_t *cp) {
  uint8_t c = s[0];
  size_t need;
  uint8_t lo = 0x80, hi = 0xBF;
  uint32_t v;
  if (c < 0x80) {
    *len = 1;
    if (cp) *cp = c;
    return U8_VALID;
  }
  if (c >= 0xC2 && c <= 0xDF) {
    need = 1;
    v = c & 0x1F;
  } else if (c >= 0xE0 && c <= 0xEF) {
    need = 2;
    v = c & 0x0F;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    need = 3;
    v = c & 0x07;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    *len = 1;
    return U8_INVALID;
  }
  for (size_t i = 1; i <= need; i++) {
    if (i >= n) {
      *len = n;
      return U8_INCOMPLETE;
    }
    uint8_t d = s[i];
    if (d < lo || d > hi) {
      *len = i;
      return U8_INVALID;
    }
    lo = 0x80;
    hi = 0xBF;
    v = (v << 6) | (d & 0x3F);
  }
  *len = need + 1;
  if (cp) *cp = v;
  return U8_VALID;
}

/* Rust char::is_whitespace (Unicode White_Space). */
static int is_uspace(uint32_t c) {
  return (c >= 9 && c <= 13) || c == 32 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

/* Growable byte buffer used for output text. */
typedef struct {
  char *p;
  size_t n, cap;
} sbuf;

/* Ensures room for extra bytes plus the NUL, and keeps the buffer terminated
 * (an empty result is "" rather than garbage). */
static int sbuf_reserve(sbuf *b, size_t extra) {
  if (b->n + extra + 1 > b->cap) {
    size_t c = b->cap ? b->cap : 64;
    while (c < b->n + extra + 1) c *= 2;
    char *q = realloc(b->p, c);
    if (!q) return -1;
    b->p = q;
    b->cap = c;
  }
  b->p[b->n] = 0;
  return 0;
}

static int sbuf_add(sbuf *b, const void *s, size_t n) {
  if (sbuf_reserve(b, n)) return -1;
  memcpy(b->p + b->n, s, n);
  b->n += n;
  b->p[b->n] = 0;
  return 0;
}

/* Appends s[0..n) converting invalid UTF-8 to U+FFFD. With hold_incomplete, a
 * trailing incomplete sequence is not consumed; returns the bytes consumed. */
static size_t utf8_lossy_append(sbuf *b, const uint8_t *s, size_t n, int hold_incomplete, int *nomem) {
  size_t i = 0;
  while (i < n) {
    size_t run = i;
    while (run < n && s[run] < 0x80) run++; /* ASCII fast path */
    if (run > i) {
      if (sbuf_add(b, s + i, run - i)) goto oom;
      i = run;
      continue;
    }
    size_t l;
    int k = utf8_classify(s + i, n - i, &l, NULL);
    if (k == U8_VALID) {
      if (sbuf_add(b, s + i, l)) goto oom;
    } else if (k == U8_INCOMPLETE && hold_incomplete) {
      break;
    } else {
      if (sbuf_add(b, "\xEF\xBF\xBD", 3)) goto oom;
    }
    i += l;
  }
  return i;
oom:
  *nomem = 1;
  return i;
}

/* ------------------------------------------------------------------ tables */

static int arena_add(epic_tokenizer *t, const void *s, size_t n, uint32_t *off) {
  if (t->arena_len + n + 1 > t->arena_cap) {
    size_t c = t->arena_cap ? t->arena_cap : 4096;
    while (c < t->arena_len + n + 1) c *= 2;
    if (c > UINT32_MAX) return -1;
    char *q = realloc(t->arena, c);
    if (!q) return -1;
    t->arena = q;
    t->arena_cap = c;
  }
  *off = (uint32_t)t->arena_len;
  memcpy(t->arena + t->arena_len, s, n);
  t->arena[t->arena_len + n] = 0;
  t->arena_len += n + 1;
  return 0;
}

static int32_t smap_get(const epic_tokenizer *t, const char *s, size_t n) {
  if (!t->smap) return -1;
  size_t i = hash_bytes(s, n) & t->smap_mask;
  for (;;) {
    int32_t id = t->smap[i];
    if (id < 0) return -1;
    if (t->str_len[id] == n && memcmp(t->arena + t->str_off[id], s, n) == 0) return id;
    i = (i + 1) & t->smap_mask;
  }
}

/* Maps the token string of id to id, replacing an existing equal key. */
static void smap_put(epic_tokenizer *t, int32_t id) {
  const char *s = t->arena + t->str_off[id];
  size_t n = t->str_len[id];
  size_t i = hash_bytes(s, n) & t->smap_mask;
  for (;;) {
    int32_t cur = t->smap[i];
    if (cur < 0 || (t->str_len[cur] == n && memcmp(t->arena + t->str_off[cur], s, n) == 0)) {
      t->smap[i] = id;
      return;
    }
    i = (i + 1) & t->smap_mask;
  }
}

static inline const pair_entry *pmap_get(const epic_tokenizer *t, int32_t a, int32_t b) {
  uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
  size_t i = hash_u64(key) & t->pmap_mask;
  for (;;) {
    const pair_entry *e = &t->pmap[i];
    if (e->key == key) return e;
    if (e->key == UINT64_MAX) return NULL;
    i = (i + 1) & t->pmap_mask;
  }
}

static void pmap_put(epic_tokenizer *t, int32_t a, int32_t b, int32_t rank, int32_t new_id) {
  uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
  size_t i = hash_u64(key) & t->pmap_mask;
  for (;;) {
    pair_entry *e = &t->pmap[i];
    if (e->key == UINT64_MAX || e->key == key) {
      /* A repeated pair keeps the later rank, as a HashMap insert in HF does. */
      e->key = key;
      e->rank = rank;
      e->new_id = new_id;
      return;
    }
    i = (i + 1) & t->pmap_mask;
  }
}

static int trie_insert(trie *tr, const uint8_t *s, size_t n, int32_t token) {
  if (n == 0) return 0; /* an empty added token can never match */
  /* Reserve the worst case (n new nodes) first: slot points into nodes[], so
   * nodes must not move while we walk. */
  if (tr->n + n > tr->cap) {
    size_t c = tr->cap ? tr->cap : 256;
    while (c < tr->n + n) c *= 2;
    trie_node *q = realloc(tr->nodes, c * sizeof *q);
    if (!q) return -1;
    tr->nodes = q;
    tr->cap = c;
  }
  int32_t *slot = &tr->root[s[0]];
  for (size_t i = 0;; i++) {
    if (*slot < 0) {
      tr->nodes[tr->n] = (trie_node){.child = -1, .sibling = -1, .token = -1, .byte = s[i]};
      *slot = (int32_t)tr->n++;
    }
    int32_t node = *slot;
    tr->empty = 0;
    if (i + 1 == n) {
      tr->nodes[node].token = token;
      return 0;
    }
    /* find or append the child for s[i+1] */
    slot = &tr->nodes[node].child;
    while (*slot >= 0 && tr->nodes[*slot].byte != s[i + 1]) slot = &tr->nodes[*slot].sibling;
  }
}

/* Longest token starting at s; returns its added[] index or -1. */
static int32_t trie_longest(const trie *tr, const uint8_t *s, size_t n, size_t *mlen) {
  int32_t node = tr->root[s[0]], best = -1;
  size_t i = 0;
  while (node >= 0) {
    const trie_node *nd = &tr->nodes[node];
    if (nd->token >= 0) {
      best = nd->token;
      *mlen = i + 1;
    }
    if (++i >= n) break;
    node = nd->child;
    while (node >= 0 && tr->nodes[node].byte != s[i]) node = tr->nodes[node].sibling;
  }
  return best;
}

/* ------------------------------------------------------------------ loading */

static char *read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  char *buf = NULL;
  long sz;
  if (!f) {
    EPIC_LOG_ERROR("tokenizer: cannot open %s: %s", path, strerror(errno));
    return NULL;
  }
  if (fseek(f, 0, SEEK_END) != 0 || (sz = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) goto fail;
  buf = malloc((size_t)sz + 1);
  if (!buf) goto fail;
  if (fread(buf, 1, (size_t)sz, f) != (size_t)sz) goto fail;
  buf[sz] = 0;
  *len = (size_t)sz;
  fclose(f);
  return buf;
fail:
  EPIC_LOG_ERROR("tokenizer: cannot read %s", path);
  free(buf);
  fclose(f);
  return NULL;
}

static cJSON *parse_json_file(const char *path, epic_status *st) {
  size_t n = 0;
  char *buf = read_file(path, &n);
  if (!buf) {
    *st = EPIC_ERR_IO;
    return NULL;
  }
  const char *end = NULL;
  cJSON *j = cJSON_ParseWithLengthOpts(buf, n, &end, 0);
  if (!j) {
    size_t at = end ? (size_t)(end - buf) : 0;
    EPIC_LOG_ERROR("tokenizer: %s is not valid JSON (near byte %zu)", path, at);
    *st = EPIC_ERR_INVALID;
  }
  free(buf);
  return j;
}

static int json_flag(const cJSON *o, const char *key) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
  return cJSON_IsTrue(v);
}

static int json_is_nullish(const cJSON *v) { return !v || cJSON_IsNull(v); }

static epic_status check_normalizer(const cJSON *n) {
  if (json_is_nullish(n)) return EPIC_OK;
  const cJSON *type = cJSON_GetObjectItemCaseSensitive(n, "type");
  if (cJSON_IsString(type) && strcmp(type->valuestring, "Sequence") == 0) {
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "normalizers");
    const cJSON *it;
    if (!cJSON_IsArray(list)) goto bad;
    cJSON_ArrayForEach(it, list) EPIC_CHECK(check_normalizer(it));
    return EPIC_OK;
  }
bad:
  EPIC_LOG_ERROR("tokenizer: unsupported normalizer %s (only none or an empty Sequence is implemented)",
                 cJSON_IsString(type) ? type->valuestring : "(no type)");
  return EPIC_ERR_UNSUPPORTED;
}

static epic_status compile_step(epic_tokenizer *t, const char *pattern, size_t plen, int literal, int behavior,
                                int invert, int prefix_space) {
  if (t->n_steps == TOK_MAX_STEPS) {
    EPIC_LOG_ERROR("tokenizer: more than %d pre-tokenizer steps", TOK_MAX_STEPS);
    return EPIC_ERR_UNSUPPORTED;
  }
  int err;
  PCRE2_SIZE erroff;
  /* MATCH_INVALID_UTF: the subject may hold arbitrary bytes; invalid sequences
   * simply never match, so they end up in the gaps and still get encoded. */
  uint32_t opts = PCRE2_UTF | PCRE2_MATCH_INVALID_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
  pcre2_code *re = pcre2_compile((PCRE2_SPTR)pattern, plen, opts, &err, &erroff, NULL);
  if (!re) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    EPIC_LOG_ERROR("tokenizer: pre-tokenizer regex does not compile at offset %zu: %s", (size_t)erroff,
                   (const char *)msg);
    return EPIC_ERR_UNSUPPORTED;
  }
  int jrc = pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
  if (jrc != 0) EPIC_LOG_WARN("tokenizer: PCRE2 JIT unavailable (%d), matching interpreted", jrc);
  split_step *s = &t->steps[t->n_steps++];
  s->re = re;
  s->behavior = behavior;
  s->invert = invert;
  s->prefix_space = prefix_space;
  s->jit = jrc == 0;
  return EPIC_OK;
}

static epic_status add_pretok(epic_tokenizer *t, const cJSON *p, int *saw_bytelevel) {
  const cJSON *type = cJSON_GetObjectItemCaseSensitive(p, "type");
  const char *ty = cJSON_IsString(type) ? type->valuestring : "(no type)";
  if (*saw_bytelevel) {
    EPIC_LOG_ERROR("tokenizer: pre-tokenizer %s after ByteLevel is not supported", ty);
    return EPIC_ERR_UNSUPPORTED;
  }
  if (strcmp(ty, "Sequence") == 0) {
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(p, "pretokenizers");
    const cJSON *it;
    if (!cJSON_IsArray(list)) {
      EPIC_LOG_ERROR("tokenizer: pre_tokenizer Sequence without a pretokenizers array");
      return EPIC_ERR_INVALID;
    }
    cJSON_ArrayForEach(it, list) EPIC_CHECK(add_pretok(t, it, saw_bytelevel));
    return EPIC_OK;
  }
  if (strcmp(ty, "Split") == 0) {
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(p, "pattern");
    const cJSON *rx = cJSON_GetObjectItemCaseSensitive(pat, "Regex");
    const cJSON *lit = cJSON_GetObjectItemCaseSensitive(pat, "String");
    const cJSON *beh = cJSON_GetObjectItemCaseSensitive(p, "behavior");
    static const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"};
    int b = -1;
    for (int i = 0; i < 5 && cJSON_IsString(beh); i++)
      if (strcmp(beh->valuestring, names[i]) == 0) b = i;
    if (b < 0) {
      EPIC_LOG_ERROR("tokenizer: Split behavior %s is not supported",
                     cJSON_IsString(beh) ? beh->valuestring : "(missing)");
      return EPIC_ERR_UNSUPPORTED;
    }
    const cJSON *src = cJSON_IsString(rx) ? rx : lit;
    if (!cJSON_IsString(src)) {
      EPIC_LOG_ERROR("tokenizer: Split pattern must be {\"Regex\": str} or {\"String\": str}");
      return EPIC_ERR_UNSUPPORTED;
    }
    return compile_step(t, src->valuestring, strlen(src->valuestring), src == lit, b, json_flag(p, "invert"),
                        0);
  }
  if (strcmp(ty, "ByteLevel") == 0) {
    *saw_bytelevel = 1;
    int prefix = json_flag(p, "add_prefix_space");
    const cJSON *ur = cJSON_GetObjectItemCaseSensitive(p, "use_regex");
    int use_regex = ur ? cJSON_IsTrue(ur) : 1; /* HF default is true */
    if (use_regex)
      return compile_step(t, k_gpt2_regex, sizeof k_gpt2_regex - 1, 0, SPLIT_ISOLATED, 0, prefix);
    if (prefix) {
      /* No regex step to carry the prefix: add a step that never matches. */
      return compile_step(t, "(?!)", 4, 0, SPLIT_ISOLATED, 0, prefix);
    }
    return EPIC_OK;
  }
  EPIC_LOG_ERROR("tokenizer: unsupported pre-tokenizer type %s", ty);
  return EPIC_ERR_UNSUPPORTED;
}

static epic_status check_decoder(const cJSON *d) {
  const cJSON *type = cJSON_GetObjectItemCaseSensitive(d, "type");
  const char *ty = cJSON_IsString(type) ? type->valuestring : "(none)";
  if (strcmp(ty, "ByteLevel") == 0) return EPIC_OK;
  if (strcmp(ty, "Sequence") == 0) {
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(d, "decoders");
    const cJSON *it;
    if (cJSON_GetArraySize(list) == 1) {
      cJSON_ArrayForEach(it, list) return check_decoder(it);
    }
  }
  EPIC_LOG_ERROR("tokenizer: unsupported decoder %s (only ByteLevel is implemented)", ty);
  return EPIC_ERR_UNSUPPORTED;
}

/* Decoded bytes of a vocabulary string: the inverse byte map, or the raw UTF-8
 * when a character is outside the byte alphabet (as the HF ByteLevel decoder). */
static epic_status set_decoded(epic_tokenizer *t, int32_t id, const int16_t u2b[324], char *tmp) {
  const uint8_t *s = (const uint8_t *)t->arena + t->str_off[id];
  size_t n = t->str_len[id], o = 0, i = 0;
  int ok = 1;
  while (i < n) {
    size_t l;
    uint32_t cp;
    if (utf8_classify(s + i, n - i, &l, &cp) != U8_VALID || cp >= 324 || u2b[cp] < 0) {
      ok = 0;
      break;
    }
    tmp[o++] = (char)u2b[cp];
    i += l;
  }
  uint32_t off;
  /* Re-read s after arena_add: it may move the arena. */
  if (!ok) {
    memcpy(tmp, s, n);
    o = n;
  }
  if (arena_add(t, tmp, o, &off)) return EPIC_ERR_NOMEM;
  t->dec_off[id] = off;
  t->dec_len[id] = (uint32_t)o;
  return EPIC_OK;
}

static epic_status load_config(epic_tokenizer *t, const char *path) {
  epic_status st = EPIC_OK;
  cJSON *cfg = parse_json_file(path, &st);
  if (!cfg) return st;
  static const char *keys[2] = {"bos_token", "eos_token"};
  int32_t *dst[2] = {&t->bos_id, &t->eos_id};
  for (int k = 0; k < 2; k++) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, keys[k]);
    if (cJSON_IsObject(v)) v = cJSON_GetObjectItemCaseSensitive(v, "content");
    if (!cJSON_IsString(v)) continue;
    *dst[k] = smap_get(t, v->valuestring, strlen(v->valuestring));
    if (*dst[k] < 0) {
      EPIC_LOG_ERROR("tokenizer: %s %s \"%s\" is not a token of the vocabulary", path, keys[k], v->valuestring);
      st = EPIC_ERR_INVALID;
      goto out;
    }
  }
  const cJSON *ct = cJSON_GetObjectItemCaseSensitive(cfg, "chat_template");
  if (cJSON_IsArray(ct)) { /* [{name, template}, ...]: take "default" */
    const cJSON *it, *pick = NULL;
    cJSON_ArrayForEach(it, ct) {
      const cJSON *nm = cJSON_GetObjectItemCaseSensitive(it, "name");
      if (cJSON_IsString(nm) && strcmp(nm->valuestring, "default") == 0) pick = it;
    }
    ct = pick ? cJSON_GetObjectItemCaseSensitive(pick, "template") : NULL;
  }
  if (cJSON_IsString(ct)) {
    t->chat_template = strdup(ct->valuestring);
    if (!t->chat_template) st = EPIC_ERR_NOMEM;
  }
out:
  cJSON_Delete(cfg);
  return st;
}

static int json_id(const cJSON *v, int32_t *id) {
  if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble >= TOK_MAX_ID ||
      v->valuedouble != (double)(int32_t)v->valuedouble)
    return -1;
  *id = (int32_t)v->valuedouble;
  return 0;
}

static epic_status load_model(epic_tokenizer *t, const cJSON *root, const char *path) {
  epic_status st = EPIC_OK;
  const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
  const cJSON *type = cJSON_GetObjectItemCaseSensitive(model, "type");
  const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
  const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
  const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
  const cJSON *it;
  char *tmp = NULL;
  uint32_t *b2u = t->b2u;
  int16_t u2b[324];
  byte_unicode_tables(b2u, u2b);

  if (!cJSON_IsObject(model) || (cJSON_IsString(type) && strcmp(type->valuestring, "BPE") != 0) ||
      !cJSON_IsObject(vocab) || !cJSON_IsArray(merges)) {
    EPIC_LOG_ERROR("tokenizer: %s: model must be BPE with a vocab object and a merges array", path);
    return cJSON_IsString(type) && strcmp(type->valuestring, "BPE") != 0 ? EPIC_ERR_UNSUPPORTED
                                                                          : EPIC_ERR_INVALID;
  }
  const cJSON *dropout = cJSON_GetObjectItemCaseSensitive(model, "dropout");
  if (cJSON_IsNumber(dropout) && dropout->valuedouble > 0) {
    EPIC_LOG_ERROR("tokenizer: BPE dropout is not supported for inference");
    return EPIC_ERR_UNSUPPORTED;
  }
  static const char *affixes[2] = {"continuing_subword_prefix", "end_of_word_suffix"};
  for (int i = 0; i < 2; i++) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(model, affixes[i]);
    if (cJSON_IsString(v) && v->valuestring[0]) {
      EPIC_LOG_ERROR("tokenizer: BPE %s is not supported for byte-level BPE", affixes[i]);
      return EPIC_ERR_UNSUPPORTED;
    }
  }
  t->ignore_merges = json_flag(model, "ignore_merges");
  if (added && !cJSON_IsArray(added)) {
    EPIC_LOG_ERROR("tokenizer: %s: added_tokens must be an array", path);
    return EPIC_ERR_INVALID;
  }

  /* Size the per-id tables by the largest id. */
  int32_t max_id = -1, id = -1;
  size_t n_vocab = 0, n_added = 0, max_len = 0;
  cJSON_ArrayForEach(it, vocab) {
    if (json_id(it, &id)) {
      EPIC_LOG_ERROR("tokenizer: vocab entry \"%s\" has an invalid id", it->string);
      return EPIC_ERR_INVALID;
    }
    if (id > max_id) max_id = id;
    size_t l = strlen(it->string);
    if (l > max_len) max_len = l;
    n_vocab++;
  }
  cJSON_ArrayForEach(it, added) {
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(it, "content");
    if (json_id(cJSON_GetObjectItemCaseSensitive(it, "id"), &id) || !cJSON_IsString(c)) {
      EPIC_LOG_ERROR("tokenizer: added_tokens entry %zu needs an integer id and a content string", n_added);
      return EPIC_ERR_INVALID;
    }
    if (id > max_id) max_id = id;
    n_added++;
  }
  t->n_ids = max_id + 1;
  size_t nid = (size_t)t->n_ids;
  t->flags = calloc(nid ? nid : 1, 1);
  t->str_off = calloc(nid ? nid : 1, sizeof(uint32_t));
  t->str_len = calloc(nid ? nid : 1, sizeof(uint32_t));
  t->dec_off = calloc(nid ? nid : 1, sizeof(uint32_t));
  t->dec_len = calloc(nid ? nid : 1, sizeof(uint32_t));
  t->added = calloc(n_added ? n_added : 1, sizeof *t->added);
  tmp = malloc(max_len + 1);
  size_t scap = pow2_at_least((n_vocab + n_added) * 2 + 1);
  t->smap = malloc(scap * sizeof(int32_t));
  if (!t->flags || !t->str_off || !t->str_len || !t->dec_off || !t->dec_len || !t->added || !tmp || !t->smap) {
    st = EPIC_ERR_NOMEM;
    goto fail;
  }
  memset(t->smap, 0xff, scap * sizeof(int32_t));
  t->smap_mask = scap - 1;

  cJSON_ArrayForEach(it, vocab) {
    json_id(it, &id);
    if (t->flags[id] & F_EXISTS) {
      EPIC_LOG_ERROR("tokenizer: vocab id %d is used twice (\"%s\")", id, it->string);
      st = EPIC_ERR_INVALID;
      goto fail;
    }
    size_t l = strlen(it->string);
    if (arena_add(t, it->string, l, &t->str_off[id])) {
      st = EPIC_ERR_NOMEM;
      goto fail;
    }
    t->str_len[id] = (uint32_t)l;
    t->flags[id] = F_EXISTS;
    smap_put(t, id);
    EPIC_CHECK_GOTO(set_decoded(t, id, u2b, tmp), st, fail);
  }

  /* Byte symbols: the model vocabulary only (added tokens do not take part in BPE). */
  for (int b = 0; b < 256; b++) {
    char u[4];
    size_t l = utf8_put(u, b2u[b]);
    t->byte_id[b] = smap_get(t, u, l);
  }
  t->unk_id = -1;
  const cJSON *unk = cJSON_GetObjectItemCaseSensitive(model, "unk_token");
  if (cJSON_IsString(unk)) t->unk_id = smap_get(t, unk->valuestring, strlen(unk->valuestring));
  for (int b = 0; b < 256; b++) {
    if (t->byte_id[b] < 0 && json_flag(model, "byte_fallback")) {
      EPIC_LOG_ERROR("tokenizer: byte_fallback with an incomplete byte alphabet is not supported");
      st = EPIC_ERR_UNSUPPORTED;
      goto fail;
    }
  }

  /* Merges: rank = position. */
  size_t n_merges = (size_t)cJSON_GetArraySize(merges);
  size_t pcap = pow2_at_least(n_merges * 2 + 1);
  t->pmap = malloc(pcap * sizeof *t->pmap);
  if (!t->pmap) {
    st = EPIC_ERR_NOMEM;
    goto fail;
  }
  for (size_t i = 0; i < pcap; i++) t->pmap[i].key = UINT64_MAX;
  t->pmap_mask = pcap - 1;
  char *cat = NULL;
  size_t cat_cap = 0;
  int32_t rank = 0;
  cJSON_ArrayForEach(it, merges) {
    const char *a, *b;
    size_t la, lb;
    if (cJSON_IsString(it)) {
      const char *s = it->valuestring, *sp = strchr(s, ' ');
      if (!sp || strchr(sp + 1, ' ')) {
        EPIC_LOG_ERROR("tokenizer: merge %d \"%s\" is not two tokens separated by one space", rank, s);
        st = EPIC_ERR_INVALID;
        goto fail_cat;
      }
      a = s;
      la = (size_t)(sp - s);
      b = sp + 1;
      lb = strlen(b);
    } else if (cJSON_GetArraySize(it) == 2 && cJSON_IsString(it->child) && cJSON_IsString(it->child->next)) {
      a = it->child->valuestring;
      la = strlen(a);
      b = it->child->next->valuestring;
      lb = strlen(b);
    } else {
      EPIC_LOG_ERROR("tokenizer: merge %d is neither \"a b\" nor [\"a\", \"b\"]", rank);
      st = EPIC_ERR_INVALID;
      goto fail_cat;
    }
    int32_t ia = smap_get(t, a, la), ib = smap_get(t, b, lb);
    if (la + lb > cat_cap) {
      cat_cap = (la + lb) * 2;
      char *q = realloc(cat, cat_cap);
      if (!q) {
        st = EPIC_ERR_NOMEM;
        goto fail_cat;
      }
      cat = q;
    }
    memcpy(cat, a, la);
    memcpy(cat + la, b, lb);
    int32_t inew = smap_get(t, cat, la + lb);
    if (ia < 0 || ib < 0 || inew < 0) {
      EPIC_LOG_ERROR("tokenizer: merge %d (\"%.*s\" + \"%.*s\") uses a token missing from the vocab", rank,
                     (int)la, a, (int)lb, b);
      st = EPIC_ERR_INVALID;
      goto fail_cat;
    }
    pmap_put(t, ia, ib, rank, inew);
    rank++;
  }
  free(cat);
  cat = NULL;

  /* Added tokens: override the string map (HF looks them up first). */
  size_t k = 0;
  cJSON_ArrayForEach(it, added) {
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(it, "content");
    json_id(cJSON_GetObjectItemCaseSensitive(it, "id"), &id);
    size_t l = strlen(c->valuestring);
    added_token *a = &t->added[k++];
    a->id = id;
    if (arena_add(t, c->valuestring, l, &a->off)) {
      st = EPIC_ERR_NOMEM;
      goto fail;
    }
    a->len = (uint32_t)l;
    a->lstrip = (uint8_t)json_flag(it, "lstrip");
    a->rstrip = (uint8_t)json_flag(it, "rstrip");
    a->single_word = (uint8_t)json_flag(it, "single_word");
    const cJSON *nz = cJSON_GetObjectItemCaseSensitive(it, "normalized");
    /* HF default: normalized = !special */
    a->normalized = (uint8_t)(nz ? cJSON_IsTrue(nz) : !json_flag(it, "special"));
    t->str_off[id] = a->off;
    t->str_len[id] = a->len;
    t->dec_off[id] = a->off; /* added tokens decode to their content verbatim */
    t->dec_len[id] = a->len;
    t->flags[id] = (uint8_t)(F_EXISTS | F_ADDED | (json_flag(it, "special") ? F_SPECIAL : 0));
    smap_put(t, id);
  }
  t->n_added = k;
  for (size_t i = 0; i < k; i++) {
    trie *tr = t->added[i].normalized ? &t->trie_norm : &t->trie_raw;
    if (trie_insert(tr, (const uint8_t *)t->arena + t->added[i].off, t->added[i].len, (int32_t)i)) {
      st = EPIC_ERR_NOMEM;
      goto fail;
    }
  }
  free(tmp);
  return EPIC_OK;
fail_cat:
  free(cat);
fail:
  free(tmp);
  return st;
}

static void trie_init(trie *tr) {
  memset(tr, 0, sizeof *tr);
  for (int i = 0; i < 256; i++) tr->root[i] = -1;
  tr->empty = 1;
}

epic_status epic_tokenizer_load(const char *json_path, const char *config_path, epic_tokenizer **out) {
  epic_status st = EPIC_OK;
  cJSON *root = NULL;
  epic_tokenizer *t = NULL;
  if (!json_path || !out) return EPIC_ERR_INVALID;
  *out = NULL;
  t = calloc(1, sizeof *t);
  if (!t) return EPIC_ERR_NOMEM;
  t->bos_id = t->eos_id = -1;
  trie_init(&t->trie_raw);
  trie_init(&t->trie_norm);
  root = parse_json_file(json_path, &st);
  if (!root) goto fail;

  EPIC_CHECK_GOTO(check_normalizer(cJSON_GetObjectItemCaseSensitive(root, "normalizer")), st, fail);
  const cJSON *pre = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
  int saw_bl = 0;
  if (!json_is_nullish(pre)) EPIC_CHECK_GOTO(add_pretok(t, pre, &saw_bl), st, fail);
  if (!saw_bl) {
    EPIC_LOG_ERROR("tokenizer: %s has no ByteLevel pre-tokenizer; only byte-level BPE is supported", json_path);
    st = EPIC_ERR_UNSUPPORTED;
    goto fail;
  }
  EPIC_CHECK_GOTO(check_decoder(cJSON_GetObjectItemCaseSensitive(root, "decoder")), st, fail);
  EPIC_CHECK_GOTO(load_model(t, root, json_path), st, fail);
  cJSON_Delete(root);
  root = NULL;

  for (size_t i = 0; i < t->n_added; i++) {
    if (t->added[i].single_word) {
      int err;
      PCRE2_SIZE eo;
      t->word_re = pcre2_compile((PCRE2_SPTR) "\\w", 2, PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err,
                                 &eo, NULL);
      if (!t->word_re) {
        st = EPIC_ERR_NOMEM;
        goto fail;
      }
      break;
    }
  }
  if (config_path) EPIC_CHECK_GOTO(load_config(t, config_path), st, fail);
  EPIC_LOG_DEBUG("tokenizer: loaded %s: %d ids, %zu added tokens, %d pre-tokenizer steps", json_path, t->n_ids,
                 t->n_added, t->n_steps);
  *out = t;
  return EPIC_OK;
fail:
  cJSON_Delete(root);
  epic_tokenizer_destroy(t);
  return st;
}

epic_status epic_tokenizer_load_dir(const char *dir, epic_tokenizer **out) {
  if (!dir || !out) return EPIC_ERR_INVALID;
  size_t n = strlen(dir) + 32;
  char *a = malloc(n), *b = malloc(n);
  epic_status st = EPIC_ERR_NOMEM;
  struct stat sb;
  if (a && b) {
    snprintf(a, n, "%s/tokenizer.json", dir);
    snprintf(b, n, "%s/tokenizer_config.json", dir);
    st = epic_tokenizer_load(a, stat(b, &sb) == 0 ? b : NULL, out);
  }
  free(a);
  free(b);
  return st;
}

void epic_tokenizer_destroy(epic_tokenizer *t) {
  if (!t) return;
  for (int i = 0; i < t->n_steps; i++) pcre2_code_free(t->steps[i].re);
  pcre2_code_free(t->word_re);
  free(t->flags);
  free(t->str_off);
  free(t->str_len);
  free(t->dec_off);
  free(t->dec_len);
  free(t->arena);
  free(t->smap);
  free(t->pmap);
  free(t->added);
  free(t->trie_raw.nodes);
  free(t->trie_norm.nodes);
  free(t->chat_template);
  free(t);
}

/* ------------------------------------------------------------------ encoding */

typedef struct {
  size_t s, e;
  int m; /* is a match */
} seg;

typedef struct {
  seg *v;
  size_t n, cap;
} segbuf;

typedef struct {
  int32_t rank, pos, right, new_id;
} heap_item;

/* Direct-mapped piece cache: one 64-byte line per entry holding the key and
 * its ids inline, so a hit costs one cache-line load. A small table that keeps
 * the most recent piece per slot beats a large exact table here: text reuses a
 * working set of common words, and a big table spends its time in cache misses. */
#define CACHE_KEY 28
#define CACHE_IDS 6
typedef struct {
  uint64_t h;
  uint8_t key_len, n_ids;
  uint8_t pad[2];
  int32_t ids[CACHE_IDS];
  char key[CACHE_KEY];
} cache_entry;
_Static_assert(sizeof(cache_entry) == 64, "cache entry is one cache line");

typedef struct {
  const epic_tokenizer *t;
  int32_t *ids;
  size_t n, cap;
  pcre2_match_data *md;
  pcre2_match_context *mctx;
  pcre2_jit_stack *jstack;
  segbuf lv[TOK_MAX_STEPS];
  char *pfx; /* piece with the ByteLevel prefix space */
  size_t pfx_cap;
  /* BPE scratch */
  int32_t *sym, *prev, *next;
  size_t sym_cap, link_cap;
  heap_item *heap;
  size_t heap_cap;
  /* piece cache */
  cache_entry *cache;
  size_t cache_mask;
  /* pretokenize-only mode */
  epic_tokenizer_piece_cb cb;
  void *user;
} enc_ctx;

static epic_status push_id(enc_ctx *c, int32_t id) {
  if (c->n == c->cap) {
    size_t cap = c->cap ? c->cap * 2 : 64;
    int32_t *q = realloc(c->ids, cap * sizeof *q);
    if (!q) return EPIC_ERR_NOMEM;
    c->ids = q;
    c->cap = cap;
  }
  c->ids[c->n++] = id;
  return EPIC_OK;
}

static int grow(void **p, size_t *cap, size_t need, size_t elem) {
  if (need <= *cap) return 0;
  size_t c = *cap ? *cap : 64;
  while (c < need) c *= 2;
  void *q = realloc(*p, c * elem);
  if (!q) return -1;
  *p = q;
  *cap = c;
  return 0;
}

static inline int heap_less(const heap_item *a, const heap_item *b) {
  return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void heap_push(heap_item *h, size_t *n, heap_item x) {
  size_t i = (*n)++;
  while (i > 0) {
    size_t p = (i - 1) / 2;
    if (!heap_less(&x, &h[p])) break;
    h[i] = h[p];
    i = p;
  }
  h[i] = x;
}

static heap_item heap_pop(heap_item *h, size_t *n) {
  heap_item top = h[0], x = h[--(*n)];
  size_t i = 0, m = *n;
  for (;;) {
    size_t l = 2 * i + 1, r = l + 1, s = i;
    const heap_item *best = &x;
    if (l < m && heap_less(&h[l], best)) {
      s = l;
      best = &h[l];
    }
    if (r < m && heap_less(&h[r], best)) s = r;
    if (s == i) break;
    h[i] = h[s];
    i = s;
  }
  if (m) h[i] = x;
  return top;
}

/* BPE over one piece, appending ids. Merges the lowest-rank adjacent pair,
 * leftmost first, until none applies: the HF BPE order. */
static epic_status bpe(enc_ctx *c, const uint8_t *p, size_t n) {
  const epic_tokenizer *t = c->t;
  if (n == 0) return EPIC_OK;
  if (t->ignore_merges) {
    /* Whole piece already a token? Compare in the byte-level alphabet. */
    char *s = malloc(n * 2 + 1);
    if (!s) return EPIC_ERR_NOMEM;
    size_t o = 0;
    for (size_t i = 0; i < n; i++) o += utf8_put(s + o, t->b2u[p[i]]);
    int32_t id = smap_get(t, s, o);
    free(s);
    if (id >= 0 && !(t->flags[id] & F_ADDED)) return push_id(c, id);
  }
  if (grow((void **)&c->sym, &c->sym_cap, n, sizeof(int32_t))) return EPIC_ERR_NOMEM;
  int32_t *sym = c->sym;
  size_t k = 0;
  for (size_t i = 0; i < n; i++) {
    int32_t id = t->byte_id[p[i]];
    if (id < 0) id = t->unk_id;
    if (id >= 0) sym[k++] = id; /* no symbol and no unk: HF drops the byte */
  }
  n = k;
  if (n <= BPE_SMALL) {
    int32_t rank[BPE_SMALL], nid[BPE_SMALL];
    for (size_t i = 0; i + 1 < n; i++) {
      const pair_entry *e = pmap_get(t, sym[i], sym[i + 1]);
      rank[i] = e ? e->rank : INT32_MAX;
      nid[i] = e ? e->new_id : -1;
    }
    while (n > 1) {
      size_t best = 0;
      for (size_t i = 1; i + 1 < n; i++)
        if (rank[i] < rank[best]) best = i;
      if (rank[best] == INT32_MAX) break;
      sym[best] = nid[best];
      /* drop symbol best+1 and pair best */
      memmove(sym + best + 1, sym + best + 2, (n - best - 2) * sizeof *sym);
      memmove(rank + best, rank + best + 1, (n - best - 2) * sizeof *rank);
      memmove(nid + best, nid + best + 1, (n - best - 2) * sizeof *nid);
      n--;
      if (best > 0) {
        const pair_entry *e = pmap_get(t, sym[best - 1], sym[best]);
        rank[best - 1] = e ? e->rank : INT32_MAX;
        nid[best - 1] = e ? e->new_id : -1;
      }
      if (best + 1 < n) {
        const pair_entry *e = pmap_get(t, sym[best], sym[best + 1]);
        rank[best] = e ? e->rank : INT32_MAX;
        nid[best] = e ? e->new_id : -1;
      }
    }
    for (size_t i = 0; i < n; i++) EPIC_CHECK(push_id(c, sym[i]));
    return EPIC_OK;
  }

  /* Long piece: doubly linked symbols plus a heap of candidate pairs with lazy
   * invalidation (an entry is stale when either side changed since its push). */
  if (n > c->link_cap) {
    int32_t *pv = realloc(c->prev, n * sizeof *pv);
    if (pv) c->prev = pv;
    int32_t *nx = realloc(c->next, n * sizeof *nx);
    if (nx) c->next = nx;
    if (!pv || !nx) return EPIC_ERR_NOMEM;
    c->link_cap = n;
  }
  if (grow((void **)&c->heap, &c->heap_cap, n, sizeof(heap_item))) return EPIC_ERR_NOMEM;
  int32_t *prev = c->prev, *next = c->next;
  heap_item *h = c->heap;
  size_t hn = 0;
  for (size_t i = 0; i < n; i++) {
    prev[i] = (int32_t)i - 1;
    next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
  }
  for (size_t i = 0; i + 1 < n; i++) {
    const pair_entry *e = pmap_get(t, sym[i], sym[i + 1]);
    if (e) heap_push(h, &hn, (heap_item){e->rank, (int32_t)i, (int32_t)i + 1, e->new_id});
  }
  while (hn) {
    heap_item x = heap_pop(h, &hn);
    if (sym[x.pos] < 0 || next[x.pos] != x.right || sym[x.right] < 0) continue;
    const pair_entry *chk = pmap_get(t, sym[x.pos], sym[x.right]);
    if (!chk || chk->new_id != x.new_id) continue;
    sym[x.pos] = x.new_id;
    sym[x.right] = -1;
    next[x.pos] = next[x.right];
    if (next[x.pos] >= 0) prev[next[x.pos]] = x.pos;
    /* At most n-1 merges and each pushes <= 2 entries: the heap never
     * exceeds n + 2n entries; grow when needed. */
    if (hn + 2 > c->heap_cap) {
      if (grow((void **)&c->heap, &c->heap_cap, hn + 2, sizeof(heap_item))) return EPIC_ERR_NOMEM;
      h = c->heap;
    }
    if (prev[x.pos] >= 0) {
      const pair_entry *e = pmap_get(t, sym[prev[x.pos]], sym[x.pos]);
      if (e) heap_push(h, &hn, (heap_item){e->rank, prev[x.pos], x.pos, e->new_id});
    }
    if (next[x.pos] >= 0) {
      const pair_entry *e = pmap_get(t, sym[x.pos], sym[next[x.pos]]);
      if (e) heap_push(h, &hn, (heap_item){e->rank, x.pos, next[x.pos], e->new_id});
    }
  }
  for (int32_t i = 0; i >= 0; i = next[i]) EPIC_CHECK(push_id(c, sym[i]));
  return EPIC_OK;
}

/* BPE with the per-call cache for short pieces (text repeats words a lot). */
static epic_status bpe_cached(enc_ctx *c, const uint8_t *p, size_t n) {
  if (!c->cache || n > CACHE_KEY) return bpe(c, p, n);
  uint64_t h = hash_bytes(p, n);
  cache_entry *e = &c->cache[h & c->cache_mask];
  if (e->h == h && e->key_len == n && memcmp(e->key, p, n) == 0) {
    if (c->n + e->n_ids > c->cap && grow((void **)&c->ids, &c->cap, c->n + e->n_ids, sizeof(int32_t)))
      return EPIC_ERR_NOMEM;
    memcpy(c->ids + c->n, e->ids, e->n_ids * sizeof(int32_t));
    c->n += e->n_ids;
    return EPIC_OK;
  }
  size_t before = c->n;
  EPIC_CHECK(bpe(c, p, n));
  size_t m = c->n - before;
  if (m <= CACHE_IDS) {
    e->h = h;
    e->key_len = (uint8_t)n;
    e->n_ids = (uint8_t)m;
    memcpy(e->key, p, n);
    memcpy(e->ids, c->ids + before, m * sizeof(int32_t));
  }
  return EPIC_OK;
}

static epic_status emit_piece(enc_ctx *c, const uint8_t *p, size_t n) {
  if (n == 0) return EPIC_OK;
  if (c->cb) return c->cb(c->user, (const char *)p, n, -1) ? EPIC_ERR_CANCELLED : EPIC_OK;
  return bpe_cached(c, p, n);
}

/* Runs step `level` over subject base[0..n) and recurses into the resulting
 * pieces; past the last step the piece goes to BPE. */
static epic_status pretok(enc_ctx *c, int level, const uint8_t *base, size_t n) {
  const epic_tokenizer *t = c->t;
  if (n == 0) return EPIC_OK;
  if (level == t->n_steps) return emit_piece(c, base, n);
  const split_step *st = &t->steps[level];
  if (st->prefix_space && base[0] != ' ') {
    /* ByteLevel add_prefix_space: this piece gets a leading space; later steps
     * only read the copy, so one buffer suffices. */
    if (grow((void **)&c->pfx, &c->pfx_cap, n + 1, 1)) return EPIC_ERR_NOMEM;
    c->pfx[0] = ' ';
    memmove(c->pfx + 1, base, n);
    base = (const uint8_t *)c->pfx;
    n++;
  }
  segbuf *sb = &c->lv[level];
  sb->n = 0;
  size_t pos = 0, prev_end = 0;
  int have_match = 0;
  size_t last_match_end = 0;
  while (pos <= n) {
    int rc = st->jit ? pcre2_jit_match(st->re, base, n, pos, 0, c->md, c->mctx)
                     : pcre2_match(st->re, base, n, pos, 0, c->md, c->mctx);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT && !c->jstack) {
      c->jstack = pcre2_jit_stack_create(64 * 1024, 64 * 1024 * 1024, NULL);
      if (!c->jstack) return EPIC_ERR_NOMEM;
      pcre2_jit_stack_assign(c->mctx, NULL, c->jstack);
      continue;
    }
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      PCRE2_UCHAR msg[160];
      pcre2_get_error_message(rc, msg, sizeof msg);
      EPIC_LOG_ERROR("tokenizer: pre-tokenizer regex failed: %s", (const char *)msg);
      return rc == PCRE2_ERROR_NOMEMORY ? EPIC_ERR_NOMEM : EPIC_ERR_INVALID;
    }
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(c->md);
    size_t ms = ov[0], me = ov[1];
    int record = 1;
    if (me == ms) {
      /* Empty match: advance one character; like onig's find_iter, skip an
       * empty match that sits right at the previous match's end. */
      if (have_match && ms == last_match_end) record = 0;
      size_t l = 1;
      if (ms < n) utf8_classify(base + ms, n - ms, &l, NULL);
      pos = ms + l;
    } else {
      pos = me;
    }
    if (record) {
      if (grow((void **)&sb->v, &sb->cap, sb->n + 2, sizeof(seg))) return EPIC_ERR_NOMEM;
      if (ms > prev_end) sb->v[sb->n++] = (seg){prev_end, ms, 0};
      sb->v[sb->n++] = (seg){ms, me, 1};
      prev_end = me;
      have_match = 1;
      last_match_end = me;
    }
    if (ms >= n) break;
  }
  if (grow((void **)&sb->v, &sb->cap, sb->n + 1, sizeof(seg))) return EPIC_ERR_NOMEM;
  if (prev_end < n) sb->v[sb->n++] = (seg){prev_end, n, 0};
  if (st->invert)
    for (size_t i = 0; i < sb->n; i++) sb->v[i].m = !sb->v[i].m;

  /* Apply the behaviour in place (the HF fold over (offsets, is_match)). */
  seg *v = sb->v;
  size_t m = 0;
  switch (st->behavior) {
  case SPLIT_ISOLATED:
    m = sb->n;
    break;
  case SPLIT_REMOVED:
    for (size_t i = 0; i < sb->n; i++)
      if (!v[i].m) v[m++] = v[i];
    break;
  case SPLIT_MERGED_PREV: {
    int pm = 0;
    for (size_t i = 0; i < sb->n; i++) {
      seg x = v[i];
      if (x.m && !pm && m > 0)
        v[m - 1].e = x.e;
      else
        v[m++] = x;
      pm = x.m;
    }
    break;
  }
  case SPLIT_MERGED_NEXT: {
    /* Right-to-left fold, written into the tail then moved to the front. */
    int pm = 0;
    size_t w = sb->n; /* next write slot from the back */
    for (size_t i = sb->n; i-- > 0;) {
      seg x = v[i];
      if (x.m && !pm && w < sb->n)
        v[w].s = x.s;
      else
        v[--w] = x;
      pm = x.m;
    }
    m = sb->n - w;
    memmove(v, v + w, m * sizeof *v);
    break;
  }
  case SPLIT_CONTIGUOUS: {
    int pm = 0;
    for (size_t i = 0; i < sb->n; i++) {
      seg x = v[i];
      if (x.m == pm && m > 0)
        v[m - 1].e = x.e;
      else
        v[m++] = x;
      pm = x.m;
    }
    break;
  }
  }
  /* Deeper levels use only their own segment buffers and never rewrite pfx (a
   * single step carries the ByteLevel prefix), so base stays valid here. */
  for (size_t i = 0; i < m; i++) {
    seg x = sb->v[i];
    if (x.e > x.s) EPIC_CHECK(pretok(c, level + 1, base + x.s, x.e - x.s));
  }
  return EPIC_OK;
}

static int is_word_at(const epic_tokenizer *t, enc_ctx *c, const uint8_t *s, size_t n, size_t at) {
  return pcre2_match(t->word_re, s, n, at, PCRE2_ANCHORED, c->md, NULL) >= 0;
}

/* Start of the UTF-8 character that ends right before `at`. */
static size_t char_start_before(const uint8_t *s, size_t at) {
  size_t i = at - 1;
  while (i > 0 && at - i < 4 && (s[i] & 0xC0) == 0x80) i--;
  return i;
}

/* Splits text[0..n) on added tokens of `pass` (0: normalized=false set, 1:
 * normalized=true set); gaps go to the next pass, then the pre-tokenizer. */
static epic_status split_added(enc_ctx *c, int pass, const uint8_t *s, size_t n) {
  const epic_tokenizer *t = c->t;
  if (n == 0) return EPIC_OK;
  if (pass == 2) return pretok(c, 0, s, n);
  const trie *tr = pass == 0 ? &t->trie_raw : &t->trie_norm;
  if (tr->empty) return split_added(c, pass + 1, s, n);
  size_t gap = 0, i = 0;
  while (i < n) {
    if (tr->root[s[i]] < 0) {
      i++;
      continue;
    }
    size_t ml = 0;
    int32_t k = trie_longest(tr, s + i, n - i, &ml);
    if (k < 0) {
      i++;
      continue;
    }
    const added_token *a = &t->added[k];
    size_t ms = i, me = i + ml;
    if (a->single_word) {
      int before = ms > 0 && is_word_at(t, c, s, n, char_start_before(s, ms));
      int after = me < n && is_word_at(t, c, s, n, me);
      if (before || after) {
        i = me; /* HF skips this match and resumes after it */
        continue;
      }
    }
    if (a->lstrip) {
      while (ms > gap) {
        size_t cs = char_start_before(s, ms), l;
        uint32_t cp;
        if (utf8_classify(s + cs, ms - cs, &l, &cp) != U8_VALID || l != ms - cs || !is_uspace(cp)) break;
        ms = cs;
      }
    }
    if (a->rstrip) {
      while (me < n) {
        size_t l;
        uint32_t cp;
        if (utf8_classify(s + me, n - me, &l, &cp) != U8_VALID || !is_uspace(cp)) break;
        me += l;
      }
    }
    EPIC_CHECK(split_added(c, pass + 1, s + gap, ms - gap));
    if (c->cb) {
      if (c->cb(c->user, (const char *)s + ms, me - ms, a->id)) return EPIC_ERR_CANCELLED;
    } else {
      EPIC_CHECK(push_id(c, a->id));
    }
    gap = i = me;
  }
  return split_added(c, pass + 1, s + gap, n - gap);
}

static void enc_ctx_free(enc_ctx *c) {
  pcre2_match_data_free(c->md);
  pcre2_match_context_free(c->mctx);
  pcre2_jit_stack_free(c->jstack);
  for (int i = 0; i < TOK_MAX_STEPS; i++) free(c->lv[i].v);
  free(c->pfx);
  free(c->sym);
  free(c->prev);
  free(c->next);
  free(c->heap);
  free(c->cache);
  free(c->ids);
}

static epic_status enc_ctx_init(enc_ctx *c, const epic_tokenizer *t, size_t len) {
  memset(c, 0, sizeof *c);
  c->t = t;
  c->md = pcre2_match_data_create(4, NULL);
  c->mctx = pcre2_match_context_create(NULL);
  if (!c->md || !c->mctx) return EPIC_ERR_NOMEM;
  if (len >= CACHE_MIN_TEXT) {
    size_t want = pow2_at_least(len / 16 < CACHE_MAX_ENTRIES ? len / 16 : CACHE_MAX_ENTRIES);
    /* key_len 0 never matches a piece (pieces are non-empty): calloc = empty */
    c->cache = calloc(want, sizeof *c->cache);
    if (c->cache) c->cache_mask = want - 1; /* optional: no cache on failure */
  }
  return EPIC_OK;
}

epic_status epic_tokenizer_encode(const epic_tokenizer *t, const char *text, size_t len, int add_bos,
                                  int32_t **ids, size_t *n) {
  enc_ctx c;
  epic_status st;
  if (!t || (!text && len) || !ids || !n) return EPIC_ERR_INVALID;
  *ids = NULL;
  *n = 0;
  if (add_bos && t->bos_id < 0) {
    EPIC_LOG_ERROR("tokenizer: add_bos requested but the tokenizer has no bos_token");
    return EPIC_ERR_INVALID;
  }
  EPIC_CHECK_GOTO(enc_ctx_init(&c, t, len), st, fail);
  if (add_bos) EPIC_CHECK_GOTO(push_id(&c, t->bos_id), st, fail);
  EPIC_CHECK_GOTO(split_added(&c, 0, (const uint8_t *)text, len), st, fail);
  *ids = c.ids;
  *n = c.n;
  c.ids = NULL;
  enc_ctx_free(&c);
  return EPIC_OK;
fail:
  enc_ctx_free(&c);
  return st;
}

epic_status epic_tokenizer_pretokenize(const epic_tokenizer *t, const char *text, size_t len,
                                       epic_tokenizer_piece_cb cb, void *user) {
  enc_ctx c;
  epic_status st;
  if (!t || (!text && len) || !cb) return EPIC_ERR_INVALID;
  EPIC_CHECK_GOTO(enc_ctx_init(&c, t, 0), st, out);
  c.cb = cb;
  c.user = user;
  st = split_added(&c, 0, (const uint8_t *)text, len);
out:
  enc_ctx_free(&c);
  return st;
}

void epic_tokenizer_ids_free(int32_t *ids) { free(ids); }
void epic_tokenizer_text_free(char *text) { free(text); }

/* ------------------------------------------------------------------ decoding */

static int id_ok(const epic_tokenizer *t, int32_t id) {
  return id >= 0 && id < t->n_ids && (t->flags[id] & F_EXISTS);
}

/* An id that decoding leaves out: a special one with EPIC_DECODE_SKIP_SPECIAL, an unknown
 * one (which reaches here only with EPIC_DECODE_SKIP_UNKNOWN: the callers refuse it
 * otherwise). */
static int left_out(const epic_tokenizer *t, int flags, int32_t id) {
  return !id_ok(t, id) || ((flags & EPIC_DECODE_SKIP_SPECIAL) && (t->flags[id] & F_SPECIAL));
}

epic_status epic_tokenizer_decode(const epic_tokenizer *t, const int32_t *ids, size_t n, int flags,
                                  char **text, size_t *len) {
  if (!t || (!ids && n) || !text) return EPIC_ERR_INVALID;
  *text = NULL;
  if (len) *len = 0;
  size_t total = 0;
  for (size_t i = 0; i < n; i++) {
    if (!id_ok(t, ids[i])) {
      if (flags & EPIC_DECODE_SKIP_UNKNOWN)
        continue;
      EPIC_LOG_ERROR("tokenizer: cannot decode unknown token id %d (at index %zu; vocab size %d)", ids[i], i,
                     t->n_ids);
      return EPIC_ERR_INVALID;
    }
    total += t->dec_len[ids[i]];
  }
  uint8_t *raw = malloc(total + 1);
  if (!raw) return EPIC_ERR_NOMEM;
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    int32_t id = ids[i];
    if (left_out(t, flags, id))
      continue;
    memcpy(raw + o, t->arena + t->dec_off[id], t->dec_len[id]);
    o += t->dec_len[id];
  }
  sbuf b = {0};
  int nomem = 0;
  if (sbuf_reserve(&b, o)) nomem = 1;
  if (!nomem) utf8_lossy_append(&b, raw, o, 0, &nomem);
  free(raw);
  if (nomem) {
    free(b.p);
    return EPIC_ERR_NOMEM;
  }
  *text = b.p;
  if (len) *len = b.n;
  return EPIC_OK;
}

int32_t epic_tokenizer_token_to_id(const epic_tokenizer *t, const char *token) {
  if (!t || !token) return -1;
  return smap_get(t, token, strlen(token));
}

const char *epic_tokenizer_id_to_token(const epic_tokenizer *t, int32_t id) {
  if (!t || !id_ok(t, id)) return NULL;
  return t->arena + t->str_off[id];
}

const char *epic_tokenizer_token_bytes(const epic_tokenizer *t, int32_t id, size_t *len) {
  if (len) *len = 0;
  if (!t || !id_ok(t, id)) return NULL;
  if (len) *len = t->dec_len[id];
  return t->arena + t->dec_off[id];
}

int32_t epic_tokenizer_vocab_size(const epic_tokenizer *t) { return t ? t->n_ids : 0; }
int32_t epic_tokenizer_bos_id(const epic_tokenizer *t) { return t ? t->bos_id : -1; }
int32_t epic_tokenizer_eos_id(const epic_tokenizer *t) { return t ? t->eos_id : -1; }
int epic_tokenizer_is_special(const epic_tokenizer *t, int32_t id) {
  return t && id_ok(t, id) && (t->flags[id] & F_SPECIAL) ? 1 : 0;
}
const char *epic_tokenizer_chat_template(const epic_tokenizer *t) { return t ? t->chat_template : NULL; }

/* ------------------------------------------------------------------ streaming */

struct epic_detok {
  const epic_tokenizer *tok;
  int flags;       /* EPIC_DECODE_* */
  uint8_t pend[8]; /* held-back incomplete sequence: at most 3 bytes */
  size_t npend;
};

epic_status epic_detok_create(const epic_tokenizer *tok, int flags, epic_detok **out) {
  if (!tok || !out) return EPIC_ERR_INVALID;
  *out = calloc(1, sizeof **out);
  if (!*out) return EPIC_ERR_NOMEM;
  (*out)->tok = tok;
  (*out)->flags = flags;
  return EPIC_OK;
}

void epic_detok_destroy(epic_detok *d) { free(d); }

static epic_status detok_emit(epic_detok *d, const uint8_t *tail, size_t tn, int final, char **out,
                              size_t *out_len) {
  /* The pending bytes are a prefix of one character; joining them with the new
   * bytes and converting all but an incomplete tail gives exactly what the
   * one-shot lossy conversion produces for that stretch. */
  sbuf b = {0};
  int nomem = 0;
  size_t head = d->npend;
  uint8_t *buf = malloc(head + tn + 1);
  if (!buf) return EPIC_ERR_NOMEM;
  memcpy(buf, d->pend, head);
  if (tn) memcpy(buf + head, tail, tn);
  size_t all = head + tn;
  if (sbuf_reserve(&b, all + 3)) nomem = 1;
  size_t used = nomem ? 0 : utf8_lossy_append(&b, buf, all, !final, &nomem);
  if (nomem) {
    free(buf);
    free(b.p);
    return EPIC_ERR_NOMEM;
  }
  d->npend = all - used;
  memcpy(d->pend, buf + used, d->npend);
  free(buf);
  *out = b.p;
  if (out_len) *out_len = b.n;
  return EPIC_OK;
}

epic_status epic_detok_push(epic_detok *d, int32_t id, char **out_text, size_t *out_len) {
  if (!d || !out_text) return EPIC_ERR_INVALID;
  *out_text = NULL;
  if (out_len) *out_len = 0;
  const epic_tokenizer *t = d->tok;
  if (!id_ok(t, id) && !(d->flags & EPIC_DECODE_SKIP_UNKNOWN)) {
    EPIC_LOG_ERROR("tokenizer: cannot decode unknown token id %d (vocab size %d)", id, t->n_ids);
    return EPIC_ERR_INVALID;
  }
  if (left_out(t, d->flags, id))
    return detok_emit(d, NULL, 0, 0, out_text, out_len);
  return detok_emit(d, (const uint8_t *)t->arena + t->dec_off[id], t->dec_len[id], 0, out_text, out_len);
}

epic_status epic_detok_flush(epic_detok *d, char **out_text, size_t *out_len) {
  if (!d || !out_text) return EPIC_ERR_INVALID;
  *out_text = NULL;
  if (out_len) *out_len = 0;
  return detok_emit(d, NULL, 0, 1, out_text, out_len);
}
