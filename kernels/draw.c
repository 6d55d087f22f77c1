#include "draw.h"

#include <string.h>

#include "draw_impl.h"

/* A row being drawn from: its candidates' keys and masses, weighed once, and the
 * histograms of the keys' first digit, which every search below starts from. */
typedef struct drow {
  const float *l;
  int64_t n, best;
  float mx, inv_t;
  int shift;
  uint32_t *key;
  uint64_t *q;
  int32_t *list; /* a search's candidates past its first digit */
  uint64_t total;
  uint64_t c0[EPIC_DRAW_BINS], m0[EPIC_DRAW_BINS];
} drow;

/* A candidate found by locate: its key, the count and mass of the candidates of higher
 * keys, its rank among the ids of its key, and the mass of one of them. */
typedef struct dpos {
  uint32_t key;
  uint64_t above_n, above_m, rank, qt;
} dpos;

size_t epic_draw_scratch_bytes(int64_t n) {
  return (size_t)n * (sizeof(uint64_t) + sizeof(uint32_t) + sizeof(int32_t));
}

static void weigh(drow *r, const float *l, int64_t n, float t, void *scratch) {
  memset(r, 0, sizeof *r);
  r->l = l;
  r->n = n;
  r->inv_t = epic_draw_inv_t(t);
  r->q = scratch;
  r->key = (uint32_t *)(r->q + n);
  r->list = (int32_t *)(r->key + n);
  for (int64_t i = 1; i < n; i++) /* the first largest, as epic_argmax and row_pick */
    if (l[i] > l[r->best])
      r->best = i;
  r->mx = l[r->best];
  r->shift = epic_draw_shift(n);
  for (int64_t i = 0; i < n; i++) {
    const uint32_t k = epic_draw_key(l[i]);
    const uint64_t q = epic_draw_mass(l[i], r->mx, r->inv_t, r->shift);
    r->key[i] = k;
    r->q[i] = q;
    r->total += q;
    r->c0[k >> 24]++;
    r->m0[k >> 24] += q;
  }
}

/* The first candidate (descending key, ascending id) at which the running count (by_mass
 * 0) or mass (1) exceeds x, for x below the row's total of that measure: one digit of
 * the key per round, each round a histogram of the candidates that share the digits so
 * far (the first round's came from weigh; the later ones go over the candidates of the
 * first digit's bin, listed once). */
static dpos locate(const drow *r, int by_mass, uint64_t x) {
  uint32_t prefix = 0, mask = 0;
  uint64_t an = 0, am = 0, hc[EPIC_DRAW_BINS], hm[EPIC_DRAW_BINS];
  int64_t n_list = 0;
  for (int d = 0; d < 4; d++) {
    const int sh = 24 - 8 * d;
    const uint64_t *c = r->c0, *m = r->m0;
    if (d == 1)
      for (int64_t i = 0; i < r->n; i++)
        if ((r->key[i] >> 24) == prefix >> 24)
          r->list[n_list++] = (int32_t)i;
    if (d > 0) {
      memset(hc, 0, sizeof hc);
      memset(hm, 0, sizeof hm);
      for (int64_t j = 0; j < n_list; j++) {
        const int32_t i = r->list[j];
        if ((r->key[i] & mask) == prefix) {
          const uint32_t b = (r->key[i] >> sh) & 0xffu;
          hc[b]++;
          hm[b] += r->q[i];
        }
      }
      c = hc;
      m = hm;
    }
    int b = EPIC_DRAW_BINS - 1;
    for (; b > 0; b--) {
      if ((by_mass ? am + m[b] : an + c[b]) > x)
        break;
      an += c[b];
      am += m[b];
    }
    prefix |= (uint32_t)b << sh;
    mask |= 0xffu << sh;
  }
  dpos p = {.key = prefix, .above_n = an, .above_m = am};
  p.qt = epic_draw_mass(epic_draw_logit(prefix), r->mx, r->inv_t, r->shift);
  p.rank = by_mass ? (p.qt ? (x - am) / p.qt : 0) : x - an;
  return p;
}

/* The mass of the candidates the draw keeps (top_k, then top_p); *last (optional): the
 * last of them. */
static uint64_t kept_mass(const drow *r, const epic_draw_params *p, dpos *last) {
  const int64_t k = p->top_k > 0 && p->top_k < r->n ? p->top_k : r->n;
  uint64_t mk = r->total;
  dpos pos = {0};
  int found = 0;
  if (k < r->n) {
    pos = locate(r, 0, (uint64_t)k - 1);
    mk = pos.above_m + (pos.rank + 1) * pos.qt;
    found = 1;
  }
  if (p->top_p < 1.0f) {
    const uint64_t want = epic_draw_top_p_mass(p->top_p, mk);
    if (want == 0) /* the first candidate alone */
      pos = (dpos){.key = r->key[r->best], .qt = r->q[r->best]};
    else
      pos = locate(r, 1, want - 1);
    mk = pos.above_m + (pos.rank + 1) * pos.qt;
    found = 1;
  }
  if (last)
    *last = found ? pos : locate(r, 0, (uint64_t)r->n - 1);
  return mk;
}

int32_t epic_draw_row(const float *l, int64_t n, const epic_draw_params *p, void *scratch) {
  drow r;
  weigh(&r, l, n, p->temperature, scratch);
  if (r.total == 0)
    return (int32_t)r.best;
  const dpos pos = locate(&r, 1, epic_draw_scale(p->u, kept_mass(&r, p, NULL)));
  uint64_t seen = 0; /* the rank-th id of the key, in id order */
  for (int64_t i = 0; i < n; i++)
    if (r.key[i] == pos.key && seen++ == pos.rank)
      return (int32_t)i;
  return (int32_t)r.best; /* not reached: locate found a candidate of that key */
}

int64_t epic_draw_kept(const float *l, int64_t n, const epic_draw_params *p, void *scratch,
                       int32_t *ids, uint64_t *mass, uint64_t *total, int *shift) {
  drow r;
  dpos last;
  int64_t k = 0;
  uint64_t seen = 0;
  weigh(&r, l, n, p->temperature, scratch);
  *shift = r.shift;
  if (r.total == 0) {
    ids[0] = (int32_t)r.best;
    mass[0] = *total = 1;
    return 1;
  }
  *total = kept_mass(&r, p, &last);
  for (int64_t i = 0; i < n; i++)
    if (r.key[i] > last.key || (r.key[i] == last.key && seen++ <= last.rank)) {
      ids[k] = (int32_t)i;
      mass[k++] = r.q[i];
    }
  return k;
}
