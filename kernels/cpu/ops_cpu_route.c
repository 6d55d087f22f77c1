/* CPU MoE router: DeepSeek-V3 noaux_tc group-limited top-k (ARCHITECTURE §7).
 * Selection uses the biased scores; the weights use the unbiased ones. Every
 * top-k here breaks ties toward the lowest index, so results are deterministic
 * and identical across backends. */
#include <math.h>
#include <omp.h>
#include <stdatomic.h>

#include "../../common/log.h"
#include "ops_cpu_impl.h"

/* Index of the largest v[i] among i with !taken[i] (lowest index on ties); -1 if none. */
static int64_t argmax_free(const float *v, const unsigned char *taken, int64_t n) {
  int64_t best = -1;
  for (int64_t i = 0; i < n; i++)
    if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
  return best;
}

static void route_one(const float *logits, const epic_router_params *p, float *s, float *b,
                      float *gscore, unsigned char *taken, int32_t *idx, float *weight) {
  const int64_t ne = p->n_experts, ng = p->n_group > 1 ? p->n_group : 1, gs = ne / ng;
  if (p->scoring == 1) {
    float mx = -INFINITY;
    for (int64_t e = 0; e < ne; e++)
      mx = logits[e] > mx ? logits[e] : mx;
    double sum = 0.0;
    for (int64_t e = 0; e < ne; e++)
      sum += exp((double)logits[e] - (double)mx);
    for (int64_t e = 0; e < ne; e++)
      s[e] = (float)(exp((double)logits[e] - (double)mx) / sum);
  } else {
    for (int64_t e = 0; e < ne; e++)
      s[e] = (float)(1.0 / (1.0 + exp(-(double)logits[e])));
  }
  for (int64_t e = 0; e < ne; e++)
    b[e] = p->bias ? s[e] + p->bias[e] : s[e];

  if (ng > 1) {
    for (int64_t g = 0; g < ng; g++) {
      const float *bg = b + g * gs;
      if (p->bias) { /* sum of the two largest biased scores */
        float t1 = -INFINITY, t2 = -INFINITY;
        for (int64_t e = 0; e < gs; e++) {
          if (bg[e] > t1) {
            t2 = t1;
            t1 = bg[e];
          } else if (bg[e] > t2) {
            t2 = bg[e];
          }
        }
        gscore[g] = gs > 1 ? t1 + t2 : t1;
      } else { /* DeepSeek-V2 style: group max */
        float t1 = -INFINITY;
        for (int64_t e = 0; e < gs; e++)
          t1 = bg[e] > t1 ? bg[e] : t1;
        gscore[g] = t1;
      }
      taken[g] = 0;
    }
    /* taken[] marks the kept groups here; reset below for the expert pass. */
    unsigned char keep[1024];
    for (int64_t g = 0; g < ng; g++)
      keep[g] = 0;
    for (int64_t k = 0; k < p->topk_group; k++) {
      int64_t g = argmax_free(gscore, taken, ng);
      taken[g] = 1;
      keep[g] = 1;
    }
    for (int64_t g = 0; g < ng; g++)
      if (!keep[g])
        for (int64_t e = 0; e < gs; e++)
          b[g * gs + e] = -INFINITY;
  }
  for (int64_t e = 0; e < ne; e++)
    taken[e] = 0;
  for (int64_t k = 0; k < p->top_k; k++)
    taken[argmax_free(b, taken, ne)] = 1;

  double sum = 0.0;
  int64_t k = 0;
  for (int64_t e = 0; e < ne; e++)
    if (taken[e]) {
      idx[k] = (int32_t)e;
      weight[k] = s[e];
      sum += s[e];
      k++;
    }
  const double norm = p->norm_topk_prob ? 1.0 / (sum + 1e-20) : 1.0;
  for (k = 0; k < p->top_k; k++)
    weight[k] = (float)((double)weight[k] * norm * (double)p->routed_scaling_factor);
}

epic_status epic_cpu_route(epic_ops *o, const float *logits, int64_t m, const epic_router_params *p,
                           int32_t *idx, float *weight) {
  if (m == 0) return EPIC_OK;
  if (m < 0 || !logits || !idx || !weight || !epic_router_params_ok(p))
    return EPIC_ERR_INVALID;
  const int64_t ng = p->n_group > 1 ? p->n_group : 1;
  epic_cpu_ops *c = epic_cpu_of(o);
  const int64_t ne = p->n_experts;
  atomic_int failed = 0;
#pragma omp parallel num_threads(c->n_threads) if (m >= 16)
  {
    /* s, b, gscore as floats, then one byte per expert for the taken flags */
    float *buf = epic_cpu_scratch_get(c, omp_get_thread_num(), (size_t)(3 * ne + ng + 1));
    if (!buf) atomic_store(&failed, 1);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < m; t++)
      if (buf)
        route_one(logits + t * ne, p, buf, buf + ne, buf + 2 * ne,
                  (unsigned char *)(buf + 2 * ne + ng), idx + t * p->top_k, weight + t * p->top_k);
  }
  return atomic_load(&failed) ? EPIC_ERR_NOMEM : EPIC_OK;
}
