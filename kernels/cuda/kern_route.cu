// MoE router (DeepSeek-V3 noaux_tc): one warp per token (k_route_lanes for the shapes it
// takes, DeepSeek-V3's among them; k_route for any other). Scores are computed in double
// and rounded to fp32 like the CPU reference; every top-k is a warp-wide argmax whose
// ties go to the lowest index, and the final weights are summed in ascending expert
// order on one lane, so the chosen experts (and, up to exp() rounding, the weights)
// are the CPU backend's.
#include <math.h>
#include <stdint.h>

#include "kern_mla_common.cuh"

namespace {

struct RouteArgs {
  int64_t ne, top_k, ng, topk_group;
  int scoring, norm;
  float rsf;
  const float *bias;
  size_t per_tok;
};

// A token's weights once its chosen experts' unbiased scores are in ow[0, top_k): summed
// in ascending expert order (renormalised if asked, like the CPU reference), times the
// scaling factor. One lane.
__device__ void scale_weights(const RouteArgs &a, float *ow) {
  double sum = 0.0;
  for (int64_t k = 0; k < a.top_k; k++)
    sum += ow[k];
  const double norm = a.norm ? 1.0 / (sum + 1e-20) : 1.0;
  for (int64_t k = 0; k < a.top_k; k++)
    ow[k] = (float)((double)ow[k] * norm * (double)a.rsf);
}

// Index of the largest v[i] with !used[i], lowest index on ties; -1 if none.
__device__ int64_t warp_argmax(const float *v, const unsigned char *used, int64_t n, int lane) {
  float bv = 0.0f;
  int64_t bi = -1;
  for (int64_t i = lane; i < n; i += 32)
    if (!used[i] && (bi < 0 || v[i] > bv)) {
      bv = v[i];
      bi = i;
    }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) {
      bv = ov;
      bi = oi;
    }
  }
  return bi;
}

__global__ void k_route(const float *logits, int64_t m, RouteArgs a, int32_t *idx, float *wt) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t t = (int64_t)blockIdx.x * (blockDim.x >> 5) + warp;
  if (t >= m)
    return; // whole warp; no block-wide barriers below
  const int64_t ne = a.ne, ng = a.ng;
  float *s = (float *)(smem + warp * a.per_tok);
  float *b = s + ne, *gsc = b + ne;
  unsigned char *taken = (unsigned char *)(gsc + ng), *keep = taken + ne;
  const float *lg = logits + t * ne;

  if (a.scoring == 1) {
    float mx = -INFINITY;
    for (int64_t e = lane; e < ne; e += 32)
      mx = lg[e] > mx ? lg[e] : mx;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    double sum = 0.0;
    for (int64_t e = lane; e < ne; e += 32)
      sum += exp((double)lg[e] - (double)mx);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
      sum += __shfl_xor_sync(0xffffffffu, sum, o);
    for (int64_t e = lane; e < ne; e += 32)
      s[e] = (float)(exp((double)lg[e] - (double)mx) / sum);
  } else {
    for (int64_t e = lane; e < ne; e += 32)
      s[e] = (float)(1.0 / (1.0 + exp(-(double)lg[e])));
  }
  for (int64_t e = lane; e < ne; e += 32) {
    b[e] = a.bias ? s[e] + a.bias[e] : s[e];
    taken[e] = 0;
  }
  __syncwarp();

  if (ng > 1) {
    const int64_t gs = ne / ng;
    for (int64_t g = lane; g < ng; g += 32) {
      const float *bg = b + g * gs;
      float t1 = -INFINITY, t2 = -INFINITY;
      if (a.bias) { // sum of the two largest biased scores
        for (int64_t e = 0; e < gs; e++) {
          if (bg[e] > t1) {
            t2 = t1;
            t1 = bg[e];
          } else if (bg[e] > t2) {
            t2 = bg[e];
          }
        }
        gsc[g] = gs > 1 ? t1 + t2 : t1;
      } else { // group max
        for (int64_t e = 0; e < gs; e++)
          t1 = bg[e] > t1 ? bg[e] : t1;
        gsc[g] = t1;
      }
      keep[g] = 0;
    }
    __syncwarp();
    for (int64_t k = 0; k < a.topk_group; k++) {
      const int64_t best = warp_argmax(gsc, keep, ng, lane);
      __syncwarp();
      if (lane == 0 && best >= 0)
        keep[best] = 1;
      __syncwarp();
    }
    for (int64_t e = lane; e < ne; e += 32)
      if (!keep[e / gs])
        b[e] = -INFINITY;
    __syncwarp();
  }
  for (int64_t k = 0; k < a.top_k; k++) {
    const int64_t best = warp_argmax(b, taken, ne, lane);
    __syncwarp();
    if (lane == 0 && best >= 0)
      taken[best] = 1;
    __syncwarp();
  }
  // Emit the chosen experts in ascending order, 32 at a time (ballot + prefix count),
  // then one lane sums their scores in that order, like the CPU reference.
  int32_t *oi = idx + t * a.top_k;
  float *ow = wt + t * a.top_k;
  int64_t base = 0;
  for (int64_t e0 = 0; e0 < ne && base < a.top_k; e0 += 32) {
    const int64_t e = e0 + lane;
    const int tk = e < ne && taken[e];
    const unsigned mask = __ballot_sync(0xffffffffu, tk);
    if (tk) {
      const int64_t pos = base + __popc(mask & ((1u << lane) - 1u));
      oi[pos] = (int32_t)e;
      ow[pos] = s[e];
    }
    base += __popc(mask);
  }
  __syncwarp();
  if (lane == 0)
    scale_weights(a, ow);
}

// The same selection with a lane's experts in registers (sigmoid scoring, n_experts = 32 E,
// groups whole runs of lanes; DeepSeek-V3's 256 experts in 8 groups: E = 8, 4 lanes a
// group). Lane l holds experts [l E, l E + E). A group's score is the multiset top-2 (or
// the max) of its lanes' local top-2s; a group is kept when fewer than topk_group groups
// beat it (higher score, or equal and a lower index), and each of the top_k rounds takes
// the highest biased score among the lanes' local bests, lowest lane on ties (lowest expert,
// as lanes hold ascending runs and a lane keeps its first best): the generic kernel's
// choices (warp_argmax: highest value, lowest index on ties), without its shared-memory
// scans, whose chain of dependent loads and 64-bit shuffles took 15.6 us per call at 32
// tokens (H200, ncu), a long stall in a decode step.
template <int E>
__global__ void k_route_lanes(const float *logits, int64_t m, RouteArgs a, int32_t *idx,
                              float *wt) {
  const int lane = threadIdx.x & 31;
  const int64_t t = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= m)
    return; // whole warp
  const float *lg = logits + t * a.ne + lane * E;
  float s[E], b[E];
#pragma unroll
  for (int j = 0; j < E; j++)
    s[j] = lg[j];
#pragma unroll
  for (int j = 0; j < E; j++) {
    s[j] = (float)(1.0 / (1.0 + exp(-(double)s[j])));
    b[j] = a.bias ? s[j] + a.bias[lane * E + j] : s[j];
  }
  if (a.ng > 1) {
    const int L = (int)(a.ne / a.ng) / E; // lanes of a group: a power of two
    float t1 = -INFINITY, t2 = -INFINITY;
#pragma unroll
    for (int j = 0; j < E; j++) {
      if (b[j] > t1) {
        t2 = t1;
        t1 = b[j];
      } else if (b[j] > t2) {
        t2 = b[j];
      }
    }
    for (int o = 1; o < L; o <<= 1) {
      const float u1 = __shfl_xor_sync(0xffffffffu, t1, o);
      const float u2 = __shfl_xor_sync(0xffffffffu, t2, o);
      t2 = fmaxf(fminf(t1, u1), fmaxf(t2, u2));
      t1 = fmaxf(t1, u1);
    }
    const float gv = !a.bias ? t1 : a.ne / a.ng > 1 ? t1 + t2 : t1;
    const int g = lane / L;
    int beaten = 0;
    for (int h = 0; h < (int)a.ng; h++) {
      const float hv = __shfl_sync(0xffffffffu, gv, h * L);
      beaten += hv > gv || (hv == gv && h < g);
    }
    if (beaten >= a.topk_group)
#pragma unroll
      for (int j = 0; j < E; j++)
        b[j] = -INFINITY;
  }
  unsigned taken = 0;
  for (int64_t r = 0; r < a.top_k; r++) {
    float bv = -INFINITY;
    int bj = -1;
#pragma unroll
    for (int j = 0; j < E; j++)
      if (!((taken >> j) & 1u) && (bj < 0 || b[j] > bv)) {
        bv = b[j];
        bj = j;
      }
    float mx = bv;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    unsigned cand = __ballot_sync(0xffffffffu, bj >= 0 && bv == mx);
    if (!cand) // NaN scores only: still take top_k experts
      cand = __ballot_sync(0xffffffffu, bj >= 0);
    if (lane == __ffs(cand) - 1)
      taken |= 1u << bj;
  }
  // The chosen experts in ascending order (lanes' runs in lane order), then one lane sums
  // their scores in that order, like the CPU reference.
  const int cnt = __popc(taken);
  const int incl = epic_warp_incl_sum(cnt, lane);
  int32_t *oi = idx + t * a.top_k;
  float *ow = wt + t * a.top_k;
  int pos = incl - cnt;
#pragma unroll
  for (int j = 0; j < E; j++)
    if ((taken >> j) & 1u) {
      oi[pos] = lane * E + j;
      ow[pos] = s[j];
      pos++;
    }
  __syncwarp();
  if (lane == 0)
    scale_weights(a, ow);
}

// Experts per lane for k_route_lanes, 0 when the router's shape is not one it takes.
int lanes_per_expert_run(const RouteArgs &a) {
  if (a.scoring != 0 || a.ne % 32 != 0 || a.top_k > a.ne)
    return 0;
  const int64_t e = a.ne / 32;
  if (e != 1 && e != 2 && e != 4 && e != 8)
    return 0;
  if (a.ng > 1) {
    if (a.ne % a.ng != 0 || (a.ne / a.ng) % e != 0 || a.topk_group > a.ng)
      return 0;
    const int64_t l = a.ne / a.ng / e; // lanes of a group
    if (l & (l - 1))
      return 0;
  }
  return (int)e;
}

size_t per_token_smem(int64_t ne, int64_t ng) {
  const size_t bytes =
      (size_t)ne * 2 * sizeof(float) + (size_t)ng * sizeof(float) + (size_t)ne + (size_t)ng;
  return (bytes + 15) / 16 * 16;
}

} // namespace

extern "C" {

size_t epic_cuk_route_smem(int64_t n_experts, int64_t n_group) {
  return per_token_smem(n_experts, n_group > 1 ? n_group : 1);
}

cudaError_t epic_cuk_route(const float *logits, int64_t m, const epic_router_params *p,
                           int32_t *idx, float *weight, cudaStream_t st) {
  RouteArgs a;
  a.ne = p->n_experts;
  a.top_k = p->top_k;
  a.ng = p->n_group > 1 ? p->n_group : 1;
  a.topk_group = p->topk_group;
  a.scoring = p->scoring;
  a.norm = p->norm_topk_prob;
  a.rsf = p->routed_scaling_factor;
  a.bias = p->bias;
  a.per_tok = per_token_smem(a.ne, a.ng);
  const int e = lanes_per_expert_run(a);
  if (e) { // 4 tokens (warps) per block
    const int64_t nb = (m + 3) / 4;
    if (nb > 2147483647)
      return cudaErrorInvalidValue;
    switch (e) {
    case 1: k_route_lanes<1><<<(unsigned)nb, 128, 0, st>>>(logits, m, a, idx, weight); break;
    case 2: k_route_lanes<2><<<(unsigned)nb, 128, 0, st>>>(logits, m, a, idx, weight); break;
    case 4: k_route_lanes<4><<<(unsigned)nb, 128, 0, st>>>(logits, m, a, idx, weight); break;
    default: k_route_lanes<8><<<(unsigned)nb, 128, 0, st>>>(logits, m, a, idx, weight); break;
    }
    return cudaGetLastError();
  }
  int tpb = (int)((48 * 1024) / a.per_tok);
  tpb = tpb > 4 ? 4 : (tpb < 1 ? 1 : tpb);
  const int64_t blocks = (m + tpb - 1) / tpb;
  if (blocks > 2147483647)
    return cudaErrorInvalidValue;
  k_route<<<(unsigned)blocks, 32 * tpb, (size_t)tpb * a.per_tok, st>>>(logits, m, a, idx, weight);
  return cudaGetLastError();
}

} // extern "C"
