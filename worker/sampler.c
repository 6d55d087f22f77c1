#include "sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../common/log.h"

struct epic_sampler {
  epic_sampling_params p;
  uint64_t s[4];  /* xoshiro256** state */
  void *scratch;  /* epic_draw_row's, grown to the vocabulary size */
  size_t cap;
};

static uint64_t splitmix64(uint64_t *x) {
  uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t next_u64(epic_sampler *s) {
  uint64_t *q = s->s, r = rotl(q[1] * 5, 7) * 9, t = q[1] << 17;
  q[2] ^= q[0];
  q[3] ^= q[1];
  q[1] ^= q[2];
  q[0] ^= q[3];
  q[2] ^= t;
  q[3] = rotl(q[3], 45);
  return r;
}

epic_status epic_sampler_create(const epic_sampling_params *p, epic_sampler **out) {
  epic_sampler *s;
  uint64_t x;
  *out = NULL;
  if (!p || p->size != sizeof *p) return EPIC_ERR_INVALID;
  if (!(p->temperature >= 0.0f) || !isfinite(p->temperature)) {
    EPIC_LOG_ERROR("sampling: temperature must be >= 0 (got %g)", (double)p->temperature);
    return EPIC_ERR_INVALID;
  }
  if (!(p->top_p > 0.0f && p->top_p <= 1.0f)) {
    EPIC_LOG_ERROR("sampling: top_p must be in (0, 1] (got %g)", (double)p->top_p);
    return EPIC_ERR_INVALID;
  }
  if (p->top_k < 0) {
    EPIC_LOG_ERROR("sampling: top_k must be >= 0 (got %lld)", (long long)p->top_k);
    return EPIC_ERR_INVALID;
  }
  s = calloc(1, sizeof *s);
  if (!s) return EPIC_ERR_NOMEM;
  s->p = *p;
  x = p->seed;
  for (int i = 0; i < 4; i++) s->s[i] = splitmix64(&x);
  *out = s;
  return EPIC_OK;
}

void epic_sampler_destroy(epic_sampler *s) {
  if (!s) return;
  free(s->scratch);
  free(s);
}

int32_t epic_argmax(const float *logits, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; i++)
    if (logits[i] > logits[best]) best = i;
  return (int32_t)best;
}

static double row_max(const float *logits, int64_t n) {
  double mx = logits[0];
  for (int64_t i = 1; i < n; i++)
    if (logits[i] > mx) mx = logits[i];
  return mx;
}

static double log_softmax_at(const float *logits, int64_t n, int64_t id) {
  const double mx = row_max(logits, n);
  double sum = 0;
  for (int64_t i = 0; i < n; i++) sum += exp((double)logits[i] - mx);
  return (double)logits[id] - mx - log(sum);
}

/* The k most likely ids and their logits (most likely first, lower id first on ties) in
 * one pass with a k-element insertion list; returns how many, *mx the row's max. */
static int top_list(const float *logits, int64_t n, int k, int32_t *ids, float *lps, double *mx) {
  int have = 0;
  *mx = logits[0];
  for (int64_t i = 0; i < n; i++) {
    const float v = logits[i];
    if (v > *mx)
      *mx = v;
    /* Strictly greater than the current k-th: an equal later id loses the tie. */
    if (have == k && !(v > lps[k - 1])) continue;
    int j = have < k ? have++ : k - 1;
    while (j > 0 && v > lps[j - 1]) {
      lps[j] = lps[j - 1];
      ids[j] = ids[j - 1];
      j--;
    }
    lps[j] = v;
    ids[j] = (int32_t)i;
  }
  return have;
}

int epic_top_logprobs_lse(const float *logits, int64_t n, int k, double lse, int32_t *ids,
                          float *lps) {
  double mx;
  if (k <= 0 || n <= 0)
    return 0;
  const int have = top_list(logits, n, (int64_t)k > n ? (int)n : k, ids, lps, &mx);
  for (int j = 0; j < have; j++)
    lps[j] = (float)((double)lps[j] - lse);
  return have;
}

int epic_top_logprobs(const float *logits, int64_t n, int k, int32_t *ids, float *lps) {
  double mx, sum = 0;
  if (k <= 0 || n <= 0)
    return 0;
  const int have = top_list(logits, n, (int64_t)k > n ? (int)n : k, ids, lps, &mx);
  for (int64_t i = 0; i < n; i++) sum += exp((double)logits[i] - mx);
  const double lse = mx + log(sum);
  for (int j = 0; j < have; j++) lps[j] = (float)((double)lps[j] - lse);
  return have;
}

/* The draw's parameters for one row (kernels/draw.h): a top_k beyond int32 keeps every
 * id of any row there is. */
static epic_draw_params draw_params(const epic_sampling_params *p, uint64_t u) {
  return (epic_draw_params){.temperature = p->temperature,
                            .top_p = p->top_p,
                            .top_k = p->top_k > INT32_MAX ? 0 : (int32_t)p->top_k,
                            .u = u};
}

int64_t epic_sampling_weights(const float *logits, int64_t n, const epic_sampling_params *p,
                              int32_t *idx, float *w, double *sum) {
  const epic_draw_params d = draw_params(p, 0);
  void *scratch = malloc(epic_draw_scratch_bytes(n));
  uint64_t *mass = malloc((size_t)n * sizeof *mass), total;
  int shift;
  if (!scratch || !mass) { /* out of memory: the most likely token alone */
    free(scratch);
    free(mass);
    idx[0] = epic_argmax(logits, n);
    w[0] = 1.0f;
    *sum = 1.0;
    return 1;
  }
  const int64_t k = epic_draw_kept(logits, n, &d, scratch, idx, mass, &total, &shift);
  for (int64_t i = 0; i < k; i++)
    w[i] = (float)ldexp((double)mass[i], -shift);
  *sum = ldexp((double)total, -shift);
  free(scratch);
  free(mass);
  return k;
}

double epic_logprob_at(const float *logits, int64_t n, int32_t id) {
  return log_softmax_at(logits, n, id);
}

int epic_sampler_greedy(const epic_sampler *s) {
  return s->p.temperature == 0.0f || s->p.top_k == 1;
}

int epic_sampler_draw(epic_sampler *s, epic_draw_params *d) {
  if (epic_sampler_greedy(s))
    return 0;
  *d = draw_params(&s->p, next_u64(s));
  return 1;
}

int32_t epic_sampler_sample(epic_sampler *s, const float *logits, int64_t n, float *logprob) {
  epic_draw_params d;
  int32_t tok;
  const size_t bytes = epic_draw_scratch_bytes(n);
  if (!epic_sampler_draw(s, &d)) {
    tok = epic_argmax(logits, n);
  } else {
    if (s->cap < bytes) {
      void *p = realloc(s->scratch, bytes);
      if (!p)
        return epic_argmax(logits, n); /* out of memory: degrade to greedy */
      s->scratch = p;
      s->cap = bytes;
    }
    tok = epic_draw_row(logits, n, &d, s->scratch);
  }
  if (logprob)
    *logprob = (float)log_softmax_at(logits, n, tok);
  return tok;
}
