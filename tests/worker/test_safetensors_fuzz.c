/* Mutation fuzzing of epic_safetensors_parse: real shard images with byte flips,
 * truncations, length-field and number corruptions, plus random JSON-ish
 * headers. Deterministic seed; run under ASan/UBSan to catch out-of-bounds
 * reads, leaks and undefined behaviour. The parser's error lines go to a log
 * file (path printed first) so that ctest output stays readable. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/clock.h"
#include "common/log.h"
#include "tests/common/test_util.h"
#include "worker/checkpoint.h"

#define FUZZ_SEED 0x5eedf00dull
#define FUZZ_MUTATIONS 12000
#define FUZZ_RANDOM_HEADERS 4000
#define FUZZ_TIME_BUDGET_S 15.0

static uint64_t g_rng = FUZZ_SEED;
static uint64_t rnd(void) {
  uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
static size_t rnd_below(size_t n) { return n ? (size_t)(rnd() % n) : 0; }

static size_t g_ok, g_err;

/* Parse and check the invariants of a successful result. Callers pass buffers
 * that end exactly at buf + len wherever the parser could read up to the end,
 * so that ASan sees any read past `len`. */
static void parse_one(const uint8_t *buf, size_t len) {
  epic_tensor_info *t = NULL;
  size_t n = 0;
  epic_status st = epic_safetensors_parse(buf, len, "fuzz.safetensors", &t, &n);
  if (st == EPIC_OK) {
    g_ok++;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
      hlen = (hlen << 8) | buf[i];
    for (size_t i = 0; i < n; i++) {
      const uint8_t *d = t[i].data;
      assert_non_null(t[i].name);
      assert_true(t[i].ndim >= 0 && t[i].ndim <= EPIC_MAX_DIMS);
      assert_true(d >= buf + 8 + hlen && d + t[i].nbytes <= buf + len);
      size_t es = epic_dtype_size(t[i].dtype);
      if (es && t[i].dtype != EPIC_DT_OTHER) {
        uint64_t numel = 1;
        for (int k = 0; k < t[i].ndim; k++)
          numel *= (uint64_t)t[i].shape[k];
        assert_true(numel * es == t[i].nbytes);
      }
    }
    epic_safetensors_free(t, n);
  } else {
    g_err++;
    assert_true(st < 0);
    assert_null(t);
    assert_int_equal(n, 0);
  }
}

typedef struct seed_file {
  uint8_t *buf;  /* pristine file */
  uint8_t *work; /* exact-size copy mutated in its first 8 + hlen bytes, then restored */
  size_t len, hlen;
} seed_file;

static void load_seed(seed_file *s, const char *rel) {
  char path[2048];
  s->buf = (uint8_t *)epic_test_read_file(epic_test_path(path, sizeof path, rel), &s->len);
  assert_non_null(s->buf);
  assert_true(s->len > 8);
  s->hlen = 0;
  for (int i = 7; i >= 0; i--)
    s->hlen = (s->hlen << 8) | s->buf[i];
  assert_true(s->hlen + 8 <= s->len);
  s->work = malloc(s->len);
  assert_non_null(s->work);
  memcpy(s->work, s->buf, s->len);
}

static const char k_interesting[] = "\"[]{},:-0123456789eE.+ \\\0\xff";

/* Mutate the header region of the seed's work image, parse, restore. The data
 * region is never read by the parser, so only truncations that cut into (or
 * near) the header need a fresh exact-size buffer. */
static void mutate_and_parse(seed_file *s) {
  size_t len = s->len;
  uint8_t *img = s->work;
  const size_t hend = 8 + s->hlen;
  int kind = (int)rnd_below(6);
  switch (kind) {
  case 0: { /* random byte flips in length field + header */
    int k = 1 + (int)rnd_below(8);
    for (int i = 0; i < k; i++)
      img[rnd_below(hend)] ^= (uint8_t)(1u << rnd_below(8));
    break;
  }
  case 1: { /* syntax-significant characters */
    int k = 1 + (int)rnd_below(4);
    for (int i = 0; i < k; i++)
      img[8 + rnd_below(s->hlen)] = (uint8_t)k_interesting[rnd_below(sizeof k_interesting - 1)];
    break;
  }
  case 2: /* truncation, anywhere (mostly inside data or header) */
    len = rnd_below(2) ? rnd_below(hend + 64) : hend + rnd_below(s->len - hend + 1);
    break;
  case 3: { /* length field corruption */
    uint64_t v;
    switch (rnd_below(7)) {
    case 0: v = s->hlen + 1 + rnd_below(64); break;
    case 1: v = s->hlen - rnd_below(s->hlen + 1); break;
    case 2: v = 0; break;
    case 3: v = UINT64_MAX - rnd_below(16); break;
    case 4: v = s->len - 8; break;
    case 5: v = s->len - 7; break;
    default: v = rnd(); break;
    }
    for (int i = 0; i < 8; i++)
      img[i] = (uint8_t)(v >> (8 * i));
    break;
  }
  case 4: { /* rewrite a run of digits in place: offsets, shapes go wrong */
    int k = 1 + (int)rnd_below(3);
    for (int i = 0; i < k; i++) {
      size_t p = 8 + rnd_below(s->hlen);
      while (p < hend && (img[p] < '0' || img[p] > '9'))
        p++;
      for (; p < hend && img[p] >= '0' && img[p] <= '9'; p++)
        img[p] = (uint8_t)('0' + rnd_below(10));
    }
    break;
  }
  default: { /* splice: copy a random header span over another */
    size_t a = 8 + rnd_below(s->hlen), b = 8 + rnd_below(s->hlen);
    size_t n = rnd_below(64);
    if (a + n > hend) n = hend - a;
    if (b + n > hend) n = hend - b;
    memmove(img + b, img + a, n);
    break;
  }
  }
  if (len < s->len && len <= hend + 4096) {
    uint8_t *cut = malloc(len ? len : 1);
    assert_non_null(cut);
    memcpy(cut, img, len);
    parse_one(cut, len);
    free(cut);
  } else {
    parse_one(img, len);
  }
  memcpy(s->work, s->buf, hend); /* restore */
}

/* Random JSON-ish header from safetensors-shaped tokens. */
static void random_header_and_parse(void) {
  char hdr[4096];
  size_t o = 0;
  static const char *dtypes[] = {"BF16", "F32", "F16", "F8_E4M3", "I32",  "I64",    "U8",
                                 "BOOL", "F64", "F4",  "",        "bf16", "F8_E5M2"};
  static const char *nums[] = {"0",
                               "1",
                               "2",
                               "-1",
                               "3.5",
                               "1e3",
                               "1e400",
                               "-0",
                               "18446744073709551615",
                               "9007199254740993",
                               "4294967296",
                               "null",
                               "\"2\"",
                               "[]",
                               "{}",
                               "true"};
  int ntens = (int)rnd_below(6);
  size_t off = 0;
  o += (size_t)snprintf(hdr + o, sizeof hdr - o, "{");
  for (int t = 0; t < ntens && o < sizeof hdr - 512; t++) {
    int valid = rnd_below(2);
    const char *dt = dtypes[rnd_below(sizeof dtypes / sizeof dtypes[0])];
    int nd = (int)rnd_below(valid ? 3 : 11);
    int64_t dims[10], numel = 1;
    o += (size_t)snprintf(hdr + o, sizeof hdr - o, "%s\"t%d\":{\"dtype\":\"%s\",\"shape\":[",
                          t ? "," : "", rnd_below(8) ? t : 0, dt);
    for (int d = 0; d < nd; d++) {
      dims[d] = (int64_t)rnd_below(5);
      numel *= dims[d];
      if (valid || rnd_below(3))
        o += (size_t)snprintf(hdr + o, sizeof hdr - o, "%s%lld", d ? "," : "", (long long)dims[d]);
      else
        o += (size_t)snprintf(hdr + o, sizeof hdr - o, "%s%s", d ? "," : "",
                              nums[rnd_below(sizeof nums / sizeof nums[0])]);
    }
    size_t es = strcmp(dt, "F32") == 0 || strcmp(dt, "I32") == 0    ? 4
                : strcmp(dt, "BF16") == 0 || strcmp(dt, "F16") == 0 ? 2
                : strcmp(dt, "I64") == 0 || strcmp(dt, "F64") == 0  ? 8
                                                                    : 1;
    size_t nb = (size_t)numel * es;
    if (valid) {
      o +=
          (size_t)snprintf(hdr + o, sizeof hdr - o, "],\"data_offsets\":[%zu,%zu]}", off, off + nb);
      off += rnd_below(4) ? nb : 0; /* sometimes overlap */
    } else {
      o += (size_t)snprintf(hdr + o, sizeof hdr - o, "],\"data_offsets\":[%s,%s]%s",
                            nums[rnd_below(sizeof nums / sizeof nums[0])],
                            nums[rnd_below(sizeof nums / sizeof nums[0])],
                            rnd_below(4) ? "}" : ",\"x\":[1}");
    }
  }
  if (rnd_below(2))
    o += (size_t)snprintf(hdr + o, sizeof hdr - o, "%s\"__metadata__\":{\"format\":\"pt\"}",
                          ntens ? "," : "");
  if (rnd_below(8)) o += (size_t)snprintf(hdr + o, sizeof hdr - o, "}");
  if (o >= sizeof hdr) o = sizeof hdr - 1;
  size_t data = off + rnd_below(3) * rnd_below(16);
  if (rnd_below(4) == 0 && data) data -= 1 + rnd_below(data);
  size_t len = 8 + o + data;
  uint8_t *img = calloc(1, len);
  assert_non_null(img);
  for (int i = 0; i < 8; i++)
    img[i] = (uint8_t)((uint64_t)o >> (8 * i));
  memcpy(img + 8, hdr, o);
  parse_one(img, len);
  free(img);
}

static void test_fuzz(void **state) {
  (void)state;
  seed_file seeds[4];
  load_seed(&seeds[0], "tiny-bf16/model-00001-of-00002.safetensors");
  load_seed(&seeds[1], "tiny-bf16/model-00002-of-00002.safetensors");
  load_seed(&seeds[2], "tiny-fp8/model-00001-of-00002.safetensors");
  load_seed(&seeds[3], "tiny-fp8/model-00002-of-00002.safetensors");

  /* Unmutated seeds parse. */
  for (int i = 0; i < 4; i++) {
    epic_tensor_info *t = NULL;
    size_t n = 0;
    assert_int_equal(epic_safetensors_parse(seeds[i].buf, seeds[i].len, "seed", &t, &n), EPIC_OK);
    assert_true(n > 0);
    epic_safetensors_free(t, n);
  }

  char logpath[] = "/tmp/epic-fuzz-log-XXXXXX";
  int logfd = mkstemp(logpath);
  assert_true(logfd >= 0);
  printf("fuzz: seed 0x%llx, parser messages in %s\n", (unsigned long long)FUZZ_SEED, logpath);
  fflush(stdout);
  fflush(stderr);
  int saved = dup(2);
  assert_true(saved >= 0);
  dup2(logfd, 2);

  const double t0 = epic_now_seconds();
  int done = 0, rdone = 0;
  for (; done < FUZZ_MUTATIONS && epic_now_seconds() - t0 < FUZZ_TIME_BUDGET_S * 0.7; done++)
    mutate_and_parse(&seeds[done % 4]);
  for (; rdone < FUZZ_RANDOM_HEADERS && epic_now_seconds() - t0 < FUZZ_TIME_BUDGET_S; rdone++)
    random_header_and_parse();

  fflush(stderr);
  dup2(saved, 2);
  close(saved);
  close(logfd);
  unlink(logpath);
  printf("fuzz: %d mutations + %d random headers in %.1f s: %zu parsed, %zu rejected\n", done,
         rdone, epic_now_seconds() - t0, g_ok, g_err);
  assert_true(done >= 500 && rdone >= 200);
  assert_true(g_err > 0 && g_ok > 0);
  for (int i = 0; i < 4; i++) {
    assert_memory_equal(seeds[i].work, seeds[i].buf, seeds[i].len);
    free(seeds[i].buf);
    free(seeds[i].work);
  }
}

int main(void) {
  epic_log_init(EPIC_LOG_LEVEL_ERROR, -1);
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_fuzz)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
