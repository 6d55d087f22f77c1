// Seeded draws from logits rows on the GPU (row_draw): kernels/draw.c's algorithm, one
// CTA of 1024 threads per row, or for a few rows a cluster of kClusterCtas CTAs per row,
// each taking a slice of the ids (the cluster's histograms summed through distributed
// shared memory, identically in every CTA). The row is never sorted or copied: a
// weighing pass sums the candidates' fixed-point masses and histograms the first 8-bit
// digit of their order keys; each search (the top-k cut, the top-p cut, the draw) then
// narrows the key one digit per pass over the ids still sharing its prefix; a last pass
// finds the id of the chosen key's rank in id order. Masses are integers and every float
// operation comes from kernels/draw_impl.h, so the token equals the C reference's bit for
// bit, whatever order the atomics land in.
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "../draw.h"
#include "../draw_impl.h"

namespace {

namespace cg = cooperative_groups;

constexpr int kDrawThreads = 1024;
constexpr int kDrawWarps = kDrawThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
// CTAs per row for batches of at most kClusterRows rows (a row alone on one SM spent most
// of its time in the latency of about 11 dependent passes; 8 is the portable cluster size).
constexpr int kClusterCtas = 8, kClusterRows = 16;

// A digit's histogram: counts, and masses as two 32-bit halves (native shared-memory
// atomics; the low half's carries go to the high half).
struct Hist {
  unsigned int lo[EPIC_DRAW_BINS], hi[EPIC_DRAW_BINS], c[EPIC_DRAW_BINS];
  __device__ __forceinline__ uint64_t mass(int b) const { return ((uint64_t)hi[b] << 32) | lo[b]; }
};

struct DrawShared {
  Hist h0, h0_all; // first digit, from the weighing pass: this CTA's ids, the row's
  Hist h, h_all;   // the digit being searched
  unsigned int warp_hits[kDrawWarps];
  unsigned int all_hits[kClusterCtas * kDrawWarps];
  unsigned long long total;
  // the search's state, written by thread 0
  uint32_t prefix;
  unsigned long long above_n, above_m, rank;
  int sel_warp; // the (CTA rank x warps +) warp whose range holds the chosen id
};

struct Row {
  const float *x;
  int64_t n, lo, hi; // the row's ids, and this CTA's [lo, hi) of them
  float mx, inv_t;
  int shift;
};

__device__ __forceinline__ uint64_t mass_of(const Row &r, float l) {
  return epic_draw_mass(l, r.mx, r.inv_t, r.shift);
}

// Adds (mass q, one count) to bin b for the lanes with `in` (warp-uniform call): lanes of a
// warp with the same bin add once (their sum by warp reductions of the mass's two 21-bit
// halves: masses are at most 2^40); a warp without such lanes does nothing.
__device__ __forceinline__ void bin_add(Hist &h, uint32_t b, uint64_t q, bool in) {
  if (!__any_sync(kFull, in))
    return;
  const unsigned peers = __match_any_sync(kFull, in ? b : 0xffffffffu);
  const unsigned lo = __reduce_add_sync(peers, (unsigned)(q & 0x1fffffu));
  const unsigned hi = __reduce_add_sync(peers, (unsigned)(q >> 21));
  if (in && (threadIdx.x & 31) == (unsigned)(__ffs(peers) - 1)) {
    const uint64_t v = (uint64_t)lo + ((uint64_t)hi << 21);
    const unsigned v_lo = (unsigned)v, old = atomicAdd(&h.lo[b], v_lo);
    const unsigned v_hi = (unsigned)(v >> 32) + (old + v_lo < old ? 1u : 0u);
    if (v_hi)
      atomicAdd(&h.hi[b], v_hi);
    atomicAdd(&h.c[b], (unsigned)__popc(peers));
  }
}

// f(i, x[i]) for every id of the CTA's slice, each thread taking ids lo + threadIdx.x +
// k * threads: kUnroll loads issued before any is used (a pass is bound by the loads'
// latency; one load in flight per warp left the SM's memory pipe mostly idle). The calls
// are warp-uniform (ids past the slice come as i >= hi, value 0).
constexpr int kUnroll = 8;
template <typename F> __device__ __forceinline__ void for_row(const Row &r, F f) {
  for (int64_t base = r.lo; base < r.hi; base += (int64_t)kDrawThreads * kUnroll) {
    float v[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; j++) {
      const int64_t i = base + j * kDrawThreads + threadIdx.x;
      v[j] = i < r.hi ? r.x[i] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kUnroll; j++)
      f(base + j * kDrawThreads + threadIdx.x, v[j]);
  }
}

// The number of ids of [w0, w1) whose key is `key`, for one warp (lanes take 32 apart).
__device__ __forceinline__ unsigned warp_hits(const Row &r, int64_t w0, int64_t w1, uint32_t key) {
  const int lane = threadIdx.x & 31;
  unsigned hits = 0;
  for (int64_t base = w0; base < w1; base += 32 * kUnroll) {
    float v[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; j++) {
      const int64_t i = base + j * 32 + lane;
      v[j] = i < w1 ? r.x[i] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kUnroll; j++)
      hits += (unsigned)__popc(
          __ballot_sync(kFull, base + j * 32 + lane < w1 && epic_draw_key(v[j]) == key));
  }
  return hits;
}

__device__ __forceinline__ void hist_zero(Hist &h) {
  for (int b = threadIdx.x; b < EPIC_DRAW_BINS; b += kDrawThreads)
    h.lo[b] = h.hi[b] = h.c[b] = 0;
}

// The row's histogram from the CTAs' parts (part complete in every CTA of the cluster): C
// == 1 is part itself; else every CTA sums the C parts bin by bin into all (the same
// integer sums everywhere), and no part is touched again before every CTA has read it.
template <int C> __device__ __forceinline__ const Hist *gather(Hist &part, Hist &all) {
  if constexpr (C == 1) {
    return &part;
  } else {
    cg::cluster_group cl = cg::this_cluster();
    cl.sync();
    for (int b = threadIdx.x; b < EPIC_DRAW_BINS; b += kDrawThreads) {
      uint64_t m = 0;
      unsigned c = 0;
      for (int k = 0; k < C; k++) {
        const Hist *h = cl.map_shared_rank(&part, k);
        m += h->mass(b);
        c += h->c[b];
      }
      all.lo[b] = (unsigned)m;
      all.hi[b] = (unsigned)(m >> 32);
      all.c[b] = c;
    }
    cl.sync();
    return &all;
  }
}

// The first candidate (descending key, ascending id) where the running count (by_mass
// false) or mass exceeds x: leaves its key in sh.prefix, the count and mass of higher
// keys in sh.above_n / above_m and its rank among its key's ids in sh.rank. As locate()
// in kernels/draw.c.
template <int C> __device__ void locate(const Row &r, DrawShared &sh, bool by_mass, uint64_t x) {
  __syncthreads(); // every thread has read the last search's result
  if (threadIdx.x == 0) {
    sh.prefix = 0;
    sh.above_n = sh.above_m = 0;
  }
  __syncthreads();
  uint32_t mask = 0;
  for (int d = 0; d < 4; d++) {
    const int s = 24 - 8 * d;
    const Hist *h = C == 1 ? &sh.h0 : &sh.h0_all;
    if (d > 0) {
      hist_zero(sh.h);
      __syncthreads();
      const uint32_t prefix = sh.prefix;
      for_row(r, [&](int64_t i, float l) {
        const uint32_t k = epic_draw_key(l);
        const bool in = i < r.hi && (k & mask) == prefix;
        bin_add(sh.h, (k >> s) & 0xffu, in ? mass_of(r, l) : 0, in);
      });
      __syncthreads();
      h = gather<C>(sh.h, sh.h_all);
    }
    if (threadIdx.x == 0) {
      unsigned long long an = sh.above_n, am = sh.above_m;
      int b = EPIC_DRAW_BINS - 1;
      for (; b > 0; b--) {
        if ((by_mass ? am + h->mass(b) : an + h->c[b]) > x)
          break;
        an += h->c[b];
        am += h->mass(b);
      }
      sh.prefix |= (uint32_t)b << s;
      sh.above_n = an;
      sh.above_m = am;
    }
    mask |= 0xffu << s;
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const uint64_t qt = mass_of(r, epic_draw_logit(sh.prefix));
    sh.rank = by_mass ? (qt ? (x - sh.above_m) / qt : 0) : x - sh.above_n;
  }
  __syncthreads();
}

// The mass of the candidates up to and including the one locate() left in sh.
__device__ __forceinline__ uint64_t mass_through(const Row &r, const DrawShared &sh) {
  return sh.above_m + (sh.rank + 1) * mass_of(r, epic_draw_logit(sh.prefix));
}

template <int C>
__global__ void __launch_bounds__(kDrawThreads)
    k_row_draw(const float *x, int64_t n, const epic_draw_params *params, int32_t *ids,
               float *logprob) {
  __shared__ DrawShared sh;
  const int64_t row = blockIdx.x / C;
  const int rank = (int)(blockIdx.x % C); // the CTA's slice (cluster rank with C > 1)
  const epic_draw_params p = params[row];
  if (!(p.temperature > 0.0f))
    return; // the whole cluster leaves alike
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int32_t best = ids[row];
  const float lp_best = logprob[row];
  const int64_t slice = (n + 32 * C - 1) / (32 * C) * 32;
  Row r{x + row * n, n, rank * slice, 0, 0.0f, epic_draw_inv_t(p.temperature), epic_draw_shift(n)};
  r.hi = r.lo + slice < n ? r.lo + slice : n;
  r.mx = r.x[best];
  hist_zero(sh.h0);
  __syncthreads();
  for_row(r, [&](int64_t i, float l) {
    const bool in = i < r.hi;
    bin_add(sh.h0, epic_draw_key(l) >> 24, in ? mass_of(r, l) : 0, in);
  });
  __syncthreads();
  const Hist *h0 = gather<C>(sh.h0, sh.h0_all);
  if (threadIdx.x == 0) {
    unsigned long long t = 0;
    for (int b = 0; b < EPIC_DRAW_BINS; b++)
      t += h0->mass(b);
    sh.total = t;
  }
  __syncthreads();
  if (sh.total == 0)
    return; // no finite masses: the greedy pick stands (as epic_draw_row)

  // kept_mass() of kernels/draw.c
  uint64_t kept = sh.total;
  if (p.top_k > 0 && p.top_k < n) {
    locate<C>(r, sh, false, (uint64_t)p.top_k - 1);
    kept = mass_through(r, sh);
  }
  if (p.top_p < 1.0f) {
    const uint64_t want = epic_draw_top_p_mass(p.top_p, kept);
    if (want == 0) {
      kept = mass_of(r, r.mx);
    } else {
      locate<C>(r, sh, true, want - 1);
      kept = mass_through(r, sh);
    }
  }
  locate<C>(r, sh, true, epic_draw_scale(p.u, kept));

  // The rank-th id (in id order) holding the chosen key: each warp counts the hits in its
  // own contiguous range of the slice, thread 0 finds the (CTA,) warp holding the rank-th,
  // that warp finds it and writes the result.
  const uint32_t key = sh.prefix;
  const int64_t span = (r.hi - r.lo + 32 * kDrawWarps - 1) / (32 * kDrawWarps) * 32;
  const int64_t w0 = r.lo + warp * span, w1 = w0 + span < r.hi ? w0 + span : r.hi;
  const unsigned hits = warp_hits(r, w0, w1, key);
  if (lane == 0)
    sh.warp_hits[warp] = hits;
  if constexpr (C == 1) {
    __syncthreads();
    if (threadIdx.x < kDrawWarps)
      sh.all_hits[threadIdx.x] = sh.warp_hits[threadIdx.x];
  } else {
    cg::cluster_group cl = cg::this_cluster();
    cl.sync();
    if (threadIdx.x < C * kDrawWarps)
      sh.all_hits[threadIdx.x] =
          cl.map_shared_rank(sh.warp_hits, (int)threadIdx.x / kDrawWarps)[threadIdx.x % kDrawWarps];
    cl.sync(); // no CTA leaves while another still reads its counts
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long acc = 0;
    int w = 0;
    while (w < C * kDrawWarps - 1 && sh.rank >= acc + sh.all_hits[w])
      acc += sh.all_hits[w++];
    sh.sel_warp = w; // rank-major: slices and warp ranges ascend in id order
    sh.rank -= acc;
  }
  __syncthreads();
  if (rank * kDrawWarps + warp == sh.sel_warp) {
    unsigned rest = (unsigned)sh.rank;
    int64_t tok = -1;
    for (int64_t base = w0; base < w1 && tok < 0; base += 32) {
      const int64_t i = base + lane;
      const unsigned bits = __ballot_sync(kFull, i < w1 && epic_draw_key(r.x[i]) == key);
      const unsigned c = (unsigned)__popc(bits);
      if (rest < c) {
        unsigned b = bits;
        for (unsigned j = 0; j < rest; j++)
          b &= b - 1; // drop the lowest set bit
        tok = base + __ffs(b) - 1;
      } else {
        rest -= c;
      }
    }
    if (lane == 0 && tok >= 0) { // not found cannot happen: the pick would stand
      const double lse = (double)r.mx - (double)lp_best;
      ids[row] = (int32_t)tok;
      logprob[row] = (float)((double)r.x[tok] - lse);
    }
  }
}

} // namespace

extern "C" {

cudaError_t epic_cuk_row_draw(const float *x, int64_t m, int64_t n, const epic_draw_params *p,
                              int32_t *ids, float *logprob, cudaStream_t st) {
  if (m <= 0)
    return cudaSuccess;
  if (m > kClusterRows) {
    k_row_draw<1><<<(unsigned)m, kDrawThreads, 0, st>>>(x, n, p, ids, logprob);
    return cudaGetLastError();
  }
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = kClusterCtas;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.gridDim = dim3((unsigned)(m * kClusterCtas));
  cfg.blockDim = dim3(kDrawThreads);
  cfg.stream = st;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, k_row_draw<kClusterCtas>, x, n, p, ids, logprob);
}

} // extern "C"
