// Seeded draws from logits rows on the GPU (row_draw): kernels/draw.c's algorithm, one
// CTA of 1024 threads per row. The row is never sorted or copied: a weighing pass sums
// the candidates' fixed-point masses and histograms the first 8-bit digit of their order
// keys; each search (the top-k cut, the top-p cut, the draw) then narrows the key one
// digit per pass over the ids still sharing its prefix; a last pass finds the id of the
// chosen key's rank in id order. Masses are integers and every float operation comes from
// kernels/draw_impl.h, so the token equals the C reference's bit for bit, whatever order
// the atomics land in.
#include <cuda_runtime.h>
#include <stdint.h>

#include "../draw.h"
#include "../draw_impl.h"

namespace {

constexpr int kDrawThreads = 1024;
constexpr int kDrawWarps = kDrawThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

// A digit's histogram: counts, and masses as two 32-bit halves (native shared-memory
// atomics; the low half's carries go to the high half).
struct Hist {
  unsigned int lo[EPIC_DRAW_BINS], hi[EPIC_DRAW_BINS], c[EPIC_DRAW_BINS];
  __device__ __forceinline__ uint64_t mass(int b) const { return ((uint64_t)hi[b] << 32) | lo[b]; }
};

struct DrawShared {
  Hist h0; // first digit, from the weighing pass
  Hist h;  // the digit being searched
  unsigned long long warp_sum[kDrawWarps];
  unsigned int warp_hits[kDrawWarps];
  unsigned long long total;
  // the search's state, written by thread 0
  uint32_t prefix;
  unsigned long long above_n, above_m, rank;
  int sel_warp;  // the warp whose range holds the chosen id
  int64_t found; // the chosen id
};

struct Row {
  const float *x;
  int64_t n;
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

// f(i, x[i]) for every id of the row, each thread taking ids threadIdx.x + k * threads:
// kUnroll loads issued before any is used (a pass is bound by the loads' latency; one
// load in flight per warp left the SM's memory pipe mostly idle). The calls are
// warp-uniform (ids past the row come as i >= n, value 0).
constexpr int kUnroll = 8;
template <typename F> __device__ __forceinline__ void for_row(const Row &r, F f) {
  for (int64_t base = 0; base < r.n; base += (int64_t)kDrawThreads * kUnroll) {
    float v[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; j++) {
      const int64_t i = base + j * kDrawThreads + threadIdx.x;
      v[j] = i < r.n ? r.x[i] : 0.0f;
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

// The first candidate (descending key, ascending id) where the running count (by_mass
// false) or mass exceeds x: leaves its key in sh.prefix, the count and mass of higher
// keys in sh.above_n / above_m and its rank among its key's ids in sh.rank. As locate()
// in kernels/draw.c.
__device__ void locate(const Row &r, DrawShared &sh, bool by_mass, uint64_t x) {
  __syncthreads(); // every thread has read the last search's result
  if (threadIdx.x == 0) {
    sh.prefix = 0;
    sh.above_n = sh.above_m = 0;
  }
  __syncthreads();
  uint32_t mask = 0;
  for (int d = 0; d < 4; d++) {
    const int s = 24 - 8 * d;
    const Hist *h = &sh.h0;
    if (d > 0) {
      hist_zero(sh.h);
      __syncthreads();
      const uint32_t prefix = sh.prefix;
      for_row(r, [&](int64_t i, float l) {
        const uint32_t k = epic_draw_key(l);
        const bool in = i < r.n && (k & mask) == prefix;
        bin_add(sh.h, (k >> s) & 0xffu, in ? mass_of(r, l) : 0, in);
      });
      __syncthreads();
      h = &sh.h;
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

__global__ void __launch_bounds__(kDrawThreads)
    k_row_draw(const float *x, int64_t n, const epic_draw_params *params, int32_t *ids,
               float *logprob) {
  __shared__ DrawShared sh;
  const epic_draw_params p = params[blockIdx.x];
  if (!(p.temperature > 0.0f))
    return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int32_t best = ids[blockIdx.x];
  const float lp_best = logprob[blockIdx.x];
  Row r{x + (int64_t)blockIdx.x * n, n, 0.0f, epic_draw_inv_t(p.temperature), epic_draw_shift(n)};
  r.mx = r.x[best];
  hist_zero(sh.h0);
  __syncthreads();
  uint64_t sum = 0;
  for_row(r, [&](int64_t i, float l) {
    const uint64_t q = i < n ? mass_of(r, l) : 0;
    sum += q;
    bin_add(sh.h0, epic_draw_key(l) >> 24, q, i < n);
  });
  for (int o = 16; o > 0; o >>= 1)
    sum += __shfl_down_sync(kFull, sum, o);
  if (lane == 0)
    sh.warp_sum[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long t = 0;
    for (int w = 0; w < kDrawWarps; w++)
      t += sh.warp_sum[w];
    sh.total = t;
  }
  __syncthreads();
  if (sh.total == 0)
    return; // no finite masses: the greedy pick stands (as epic_draw_row)

  // kept_mass() of kernels/draw.c
  uint64_t kept = sh.total;
  if (p.top_k > 0 && p.top_k < n) {
    locate(r, sh, false, (uint64_t)p.top_k - 1);
    kept = mass_through(r, sh);
  }
  if (p.top_p < 1.0f) {
    const uint64_t want = epic_draw_top_p_mass(p.top_p, kept);
    if (want == 0) {
      kept = mass_of(r, r.mx);
    } else {
      locate(r, sh, true, want - 1);
      kept = mass_through(r, sh);
    }
  }
  locate(r, sh, true, epic_draw_scale(p.u, kept));

  // The rank-th id (in id order) holding the chosen key: each warp counts the hits in its
  // own contiguous range, thread 0 finds the warp holding the rank-th, that warp finds it.
  const uint32_t key = sh.prefix;
  const int64_t span = (n + 32 * kDrawWarps - 1) / (32 * kDrawWarps) * 32;
  const int64_t w0 = warp * span, w1 = w0 + span < n ? w0 + span : n;
  const unsigned hits = warp_hits(r, w0, w1, key);
  if (lane == 0)
    sh.warp_hits[warp] = hits;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long acc = 0;
    int w = 0;
    while (w < kDrawWarps - 1 && sh.rank >= acc + sh.warp_hits[w])
      acc += sh.warp_hits[w++];
    sh.sel_warp = w;
    sh.rank -= acc;
    sh.found = -1;
  }
  __syncthreads();
  if (warp == sh.sel_warp) {
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
    if (lane == 0)
      sh.found = tok;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int64_t tok = sh.found >= 0 ? sh.found : best;
    const double lse = (double)r.mx - (double)lp_best;
    ids[blockIdx.x] = (int32_t)tok;
    logprob[blockIdx.x] = (float)((double)r.x[tok] - lse);
  }
}

} // namespace

extern "C" {

cudaError_t epic_cuk_row_draw(const float *x, int64_t m, int64_t n, const epic_draw_params *p,
                              int32_t *ids, float *logprob, cudaStream_t st) {
  if (m <= 0)
    return cudaSuccess;
  k_row_draw<<<(unsigned)m, kDrawThreads, 0, st>>>(x, n, p, ids, logprob);
  return cudaGetLastError();
}

} // extern "C"
