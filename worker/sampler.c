#include "sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../common/log.h"

struct epic_sampler {
  epic_sampling_params p;
  uint64_t s[4]; /* xoshiro256** state */
  int32_t *idx;  /* candidate ids and weights, grown to the vocabulary size */
  float *w;
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
  free(s->w);
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

/* The candidate order: descending logit, lower id first on ties; NaN logits last (as
 * -inf, weight 0). A total order on ids, so selections below need no tie rules. */
static float key(float v) {
  return v == v ? v : -INFINITY;
}
static int before(const float *l, int32_t a, int32_t b) {
  const float x = key(l[a]), y = key(l[b]);
  return x > y || (x == y && a < b);
}

/* A row's weights and their selections. Sorting a whole 129k-token row took 28 ms a draw;
 * top_k and top_p only need to know which ids come first in the order: a pass over weight
 * buckets (cut below) finds the bucket where a cut ends, partitions around median-of-three
 * pivots (quickselect style) select inside it, and the draw walks the kept ids in the
 * order the selections left them. */
typedef struct row {
  const float *l;
  int64_t n;
  int32_t *ids; /* the candidates, reordered by the selections */
  float *w;     /* w[id]: expf((l[id] - mx) / temperature) */
  double mx;
} row;

/* The weights and, in id order, their total (returned) and the unmodified distribution's
 * normaliser sum exp(l - mx) (*sum_1, may be NULL); one pass. The row's exps are most of a
 * draw's cost, hence float ones (the sums stay double). */
static double row_weigh(row *r, float t, double *sum_1) {
  const float mx = (float)r->mx;
  double st = 0, s1 = 0;
  for (int64_t i = 0; i < r->n; i++) {
    const float x = r->l[i] - mx, e = sum_1 || t == 1.0f ? expf(x) : 0;
    const float w = t == 1.0f ? e : expf(x / t);
    r->w[i] = w == w ? w : 0; /* NaN logits weigh nothing */
    st += r->w[i];
    s1 += e;
    r->ids[i] = (int32_t)i;
  }
  if (sum_1)
    *sum_1 = s1;
  return st;
}

static void swap_ids(int32_t *a, int32_t *b) {
  const int32_t t = *a;
  *a = *b;
  *b = t;
}

/* Partition ids[lo, hi) (hi - lo >= 1) around a median-of-three pivot: ids[lo, p) come
 * before it, ids[p] is it, ids(p, hi) after. Returns p; *mass: the weight of ids[lo, p). */
static int64_t partition(const row *r, int64_t lo, int64_t hi, double *mass) {
  int32_t *v = r->ids;
  const int64_t mid = lo + (hi - lo) / 2;
  if (before(r->l, v[mid], v[lo]))
    swap_ids(&v[mid], &v[lo]);
  if (before(r->l, v[hi - 1], v[lo]))
    swap_ids(&v[hi - 1], &v[lo]);
  if (before(r->l, v[hi - 1], v[mid]))
    swap_ids(&v[hi - 1], &v[mid]);
  swap_ids(&v[mid], &v[hi - 1]); /* the median, out of the way */
  const int32_t piv = v[hi - 1];
  int64_t p = lo;
  double m = 0;
  for (int64_t j = lo; j < hi - 1; j++)
    if (before(r->l, v[j], piv)) {
      m += r->w[v[j]];
      swap_ids(&v[p++], &v[j]);
    }
  swap_ids(&v[p], &v[hi - 1]);
  *mass = m;
  return p;
}

/* Reorder ids[lo, hi) so that its first k in the order come first (0 < k < hi - lo). */
static void select_first(row *r, int64_t lo, int64_t hi, int64_t k) {
  const int64_t end = lo + k;
  double m;
  while (hi - lo > 1) {
    const int64_t p = partition(r, lo, hi, &m);
    if (p == end)
      return;
    if (p > end)
      hi = p;
    else
      lo = p + 1;
  }
}

/* The fewest of ids[lo, hi) first in the order (at least one) whose weight reaches q:
 * moved to ids[lo, ..), their count returned and their weight in *mass (all of them
 * where it is not reached). */
static int64_t select_mass(row *r, int64_t lo, int64_t hi, double q, double *mass) {
  const int64_t first = lo, end = hi;
  double acc = 0, m; /* the weight of ids[first, lo): all before ids[lo, hi) */
  while (hi > lo) {
    const int64_t p = partition(r, lo, hi, &m);
    if (p > lo && acc + m >= q) { /* the boundary lies in ids[lo, p) */
      hi = p;
      continue;
    }
    acc += m + r->w[r->ids[p]];
    if (acc >= q || p + 1 == end) {
      *mass = acc;
      return p + 1 - first;
    }
    lo = p + 1;
  }
  *mass = acc;
  return end - first;
}

/* Weight buckets, a radix pass before the selections: the bucket of w in [0, 1] is its
 * float bits' top 12 (8 buckets per binade), so bucket order is weight order, and weight
 * order is the candidate order (weights do not fall as logits rise). A cut is then a run
 * of whole top buckets plus a selection inside one bucket, not over the whole row. */
enum { N_BUCKETS = (0x3f800000 >> 20) + 1 };
static int bucket(float w) {
  uint32_t b;
  memcpy(&b, &w, sizeof b);
  return (int)(b >> 20);
}

/* Reorder ids[0, k): the ids of buckets above b first (their count returned), then those
 * of bucket b. */
static int64_t bucket_front(row *r, int64_t k, int b) {
  int64_t m = 0;
  for (int64_t i = 0; i < k; i++)
    if (bucket(r->w[r->ids[i]]) > b)
      swap_ids(&r->ids[m++], &r->ids[i]);
  for (int64_t i = m, j = m; i < k; i++)
    if (bucket(r->w[r->ids[i]]) == b)
      swap_ids(&r->ids[j++], &r->ids[i]);
  return m;
}

/* The kept ids first in r->ids for a cut to the first `count` (count > 0) or, with count 0,
 * to the fewest first reaching weight q, among ids[0, k); returns how many are kept and
 * their weight in *mass. */
static int64_t cut(row *r, int64_t k, int64_t count, double q, double *mass) {
  int64_t cnt[N_BUCKETS] = {0}, kept = k, above = 0, n_b; /* 16 KiB of stack together */
  double bm[N_BUCKETS] = {0}, above_mass = 0, m = 0;
  for (int64_t i = 0; i < k; i++) {
    const float w = r->w[r->ids[i]];
    cnt[bucket(w)]++;
    bm[bucket(w)] += w;
  }
  int b = N_BUCKETS - 1;
  for (; b >= 0; b--) { /* the bucket where the cut ends (one with ids: at least one kept) */
    if (cnt[b] > 0 && (count > 0 ? above + cnt[b] >= count : above_mass + bm[b] >= q))
      break;
    above += cnt[b];
    above_mass += bm[b];
  }
  if (b >= 0) {
    n_b = cnt[b];
    above = bucket_front(r, k, b);
    if (count > 0) {
      if (count - above < n_b)
        select_first(r, above, above + n_b, count - above);
      kept = count;
      for (int64_t i = above; i < kept; i++)
        m += r->w[r->ids[i]];
    } else {
      kept = above + select_mass(r, above, above + n_b, q - above_mass, &m);
    }
  } else { /* rounding: q not reached, keep all */
    above_mass = 0;
    for (int64_t i = 0; i < k; i++)
      m += r->w[r->ids[i]];
  }
  *mass = above_mass + m;
  return kept;
}

/* The distribution of epic_sampling_weights on r (weighed): the kept ids first in r->ids,
 * their count returned and their total weight in *sum. */
static int64_t row_cut(row *r, const epic_sampling_params *p, double total, double *sum) {
  int64_t k = r->n;
  if (p->top_k > 0 && p->top_k < k)
    k = cut(r, k, p->top_k, 0, &total);
  if (p->top_p < 1.0f)
    k = cut(r, k, 0, (double)p->top_p * total, &total);
  *sum = total;
  return k;
}

int64_t epic_sampling_weights(const float *logits, int64_t n, const epic_sampling_params *p,
                              int32_t *idx, float *w, double *sum) {
  float *wt = malloc((size_t)n * sizeof *wt);
  if (!wt) { /* out of memory: the most likely token alone */
    idx[0] = epic_argmax(logits, n);
    w[0] = 1.0f;
    *sum = 1.0;
    return 1;
  }
  row r = {.l = logits, .n = n, .ids = idx, .w = wt, .mx = row_max(logits, n)};
  const int64_t k = row_cut(&r, p, row_weigh(&r, p->temperature, NULL), sum);
  for (int64_t i = 0; i < k; i++)
    w[i] = wt[idx[i]];
  free(wt);
  return k;
}

double epic_logprob_at(const float *logits, int64_t n, int32_t id) {
  return log_softmax_at(logits, n, id);
}

int epic_sampler_greedy(const epic_sampler *s) {
  return s->p.temperature == 0.0f || s->p.top_k == 1;
}

int32_t epic_sampler_sample(epic_sampler *s, const float *logits, int64_t n, float *logprob) {
  if (epic_sampler_greedy(s)) {
    const int32_t tok = epic_argmax(logits, n);
    if (logprob)
      *logprob = (float)log_softmax_at(logits, n, tok);
    return tok;
  }
  double sum, sum_1, acc = 0;
  if (s->cap < n) {
    int32_t *ni = realloc(s->idx, (size_t)n * sizeof *ni);
    if (ni)
      s->idx = ni;
    float *nw = ni ? realloc(s->w, (size_t)n * sizeof *nw) : NULL;
    if (nw)
      s->w = nw;
    if (!ni || !nw)
      return epic_argmax(logits, n); /* out of memory: degrade to greedy */
    s->cap = n;
  }
  row r = {.l = logits, .n = n, .ids = s->idx, .w = s->w, .mx = row_max(logits, n)};
  const int64_t k = row_cut(&r, &s->p, row_weigh(&r, s->p.temperature, &sum_1), &sum);
  /* Inverse CDF over the kept ids in the order the selections left them. */
  const double u = next_unit(s) * sum;
  int32_t tok = r.ids[k - 1]; /* u in the rounding slack past the end */
  for (int64_t i = 0; i < k; i++) {
    acc += r.w[r.ids[i]];
    if (u < acc) {
      tok = r.ids[i];
      break;
    }
  }
  /* log softmax at tok, from the same max and sum (as epic_logprob_at, to float rounding) */
  if (logprob)
    *logprob = (float)((double)logits[tok] - r.mx - log(sum_1));
  return tok;
}
