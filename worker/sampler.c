#define _GNU_SOURCE
#include "sampler.h"

#include <math.h>
#include <stdlib.h>

#include "../common/log.h"

struct epic_sampler {
  epic_sampling_params p;
  uint64_t s[4]; /* xoshiro256** state */
  int32_t *idx;  /* candidate ids, grown to the vocabulary size */
  float *prob;
  int64_t cap;
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

/* Uniform in [0, 1) with 53 random bits. */
static double next_unit(epic_sampler *s) { return (double)(next_u64(s) >> 11) * 0x1.0p-53; }

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
  free(s->idx);
  free(s->prob);
  free(s);
}

int32_t epic_argmax(const float *logits, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; i++)
    if (logits[i] > logits[best]) best = i;
  return (int32_t)best;
}

static double log_softmax_at(const float *logits, int64_t n, int64_t id) {
  double mx = logits[0], sum = 0;
  for (int64_t i = 1; i < n; i++)
    if (logits[i] > mx) mx = logits[i];
  for (int64_t i = 0; i < n; i++) sum += exp((double)logits[i] - mx);
  return (double)logits[id] - mx - log(sum);
}

int epic_top_logprobs(const float *logits, int64_t n, int k, int32_t *ids, float *lps) {
  if (k <= 0 || n <= 0) return 0;
  if ((int64_t)k > n) k = (int)n;
  int have = 0;
  double mx = logits[0], sum = 0;
  for (int64_t i = 0; i < n; i++) {
    const float v = logits[i];
    if (v > mx) mx = v;
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
  for (int64_t i = 0; i < n; i++) sum += exp((double)logits[i] - mx);
  const double lse = mx + log(sum);
  for (int j = 0; j < have; j++) lps[j] = (float)((double)lps[j] - lse);
  return have;
}

/* Sort candidates by descending logit (ties: lower id first). */
static int cmp_desc(const void *a, const void *b, void *keys) {
  const float *sort_keys = keys;
  int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
  if (sort_keys[x] > sort_keys[y]) return -1;
  if (sort_keys[x] < sort_keys[y]) return 1;
  return (x > y) - (x < y);
}

int64_t epic_sampling_weights(const float *logits, int64_t n, const epic_sampling_params *p,
                              int32_t *idx, float *w, double *sum) {
  int64_t k = n;
  double mx, total = 0;
  for (int64_t i = 0; i < n; i++) idx[i] = (int32_t)i;
  qsort_r(idx, (size_t)n, sizeof *idx, cmp_desc, (void *)logits);
  if (p->top_k > 0 && p->top_k < k) k = p->top_k;
  mx = logits[idx[0]];
  for (int64_t i = 0; i < k; i++) {
    w[i] = (float)exp(((double)logits[idx[i]] - mx) / p->temperature);
    total += w[i];
  }
  if (p->top_p < 1.0f) {
    /* Smallest prefix whose mass reaches top_p (at least one token). */
    int64_t keep = 0;
    double mass = 0;
    while (keep < k && (keep == 0 || mass < (double)p->top_p * total)) mass += w[keep++];
    k = keep;
    total = mass;
  }
  *sum = total;
  return k;
}

double epic_logprob_at(const float *logits, int64_t n, int32_t id) {
  return log_softmax_at(logits, n, id);
}

int epic_sampler_greedy(const epic_sampler *s) {
  return s->p.temperature == 0.0f || s->p.top_k == 1;
}

int32_t epic_sampler_sample(epic_sampler *s, const float *logits, int64_t n, float *logprob) {
  int32_t tok;
  if (epic_sampler_greedy(s)) {
    tok = epic_argmax(logits, n);
  } else {
    double sum, acc = 0, u;
    int64_t k;
    if (s->cap < n) {
      int32_t *ni = realloc(s->idx, (size_t)n * sizeof *ni);
      float *np = ni ? realloc(s->prob, (size_t)n * sizeof *np) : NULL;
      if (ni) s->idx = ni;
      if (np) s->prob = np;
      if (!ni || !np) return epic_argmax(logits, n); /* out of memory: degrade to greedy */
      s->cap = n;
    }
    k = epic_sampling_weights(logits, n, &s->p, s->idx, s->prob, &sum);
    u = next_unit(s) * sum;
    tok = s->idx[k - 1];
    for (int64_t i = 0; i < k; i++) {
      acc += s->prob[i];
      if (u < acc) {
        tok = s->idx[i];
        break;
      }
    }
  }
  if (logprob) *logprob = (float)log_softmax_at(logits, n, tok);
  return tok;
}
