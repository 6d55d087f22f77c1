// Row movement for the model's MoE and decode paths (ABI 3 ops): indexed row copy
// (expert gathers, exchange packing, LM-head row picks), the ordered MoE combine, and
// the decode-batch cache store. All are memory-bound one-pass kernels.
#include <cuda_bf16.h>
#include <stdint.h>

#include "kern_mla_common.cuh"

namespace {

constexpr int kThreads = 256;

int grid_of(int64_t rows) {
  // Grid-stride loops below; 64k blocks cover any batch without a huge launch.
  return (int)(rows < 65535 ? (rows > 0 ? rows : 1) : 65535);
}

// 32-bit words, not floats: expert tags travel as int32 bit patterns and must not be
// touched by any float conversion.
__global__ void k_copy_rows(int64_t n, int64_t cols, const uint32_t *src, int64_t ld_src,
                            const int32_t *src_idx, uint32_t *dst, int64_t ld_dst,
                            const int32_t *dst_idx, int vec4) {
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int64_t r = src_idx ? src_idx[i] : i, w = dst_idx ? dst_idx[i] : i;
    const uint32_t *s = src + r * ld_src;
    uint32_t *d = dst + w * ld_dst;
    if (vec4) {
      const uint4 *s4 = reinterpret_cast<const uint4 *>(s);
      uint4 *d4 = reinterpret_cast<uint4 *>(d);
      for (int64_t j = threadIdx.x; j < cols / 4; j += blockDim.x) d4[j] = s4[j];
    } else {
      for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) d[j] = s[j];
    }
  }
}

// acc + w * v, rounded per step (no FMA contraction), per column.
__device__ __forceinline__ float add_weighted(float acc, float w, float v) {
  return __fadd_rn(acc, __fmul_rn(w, v));
}
__device__ __forceinline__ float4 add_weighted(float4 acc, float w, float4 v) {
  return make_float4(add_weighted(acc.x, w, v.x), add_weighted(acc.y, w, v.y),
                     add_weighted(acc.z, w, v.z), add_weighted(acc.w, w, v.w));
}

// One block per token; each thread owns columns (V: one float, or four where n % 4 == 0 and
// rows and y are 16-byte aligned: 16-byte accesses) and adds the token's k results in
// ascending k, so the sum order equals the CPU backend's whichever V. The rows are loaded
// kBatch at a time before they are added: with one 4-byte load per row in flight per
// thread an 8192-token prefill step's combine (2.35 GB moved) took 1,033 us (2.3 TB/s);
// four columns and batched loads take 544 us (4.3 TB/s; one H200, bench_kernels_cuda
// --only memory). n and the row indices count V elements.
// blockIdx.x: a tile of kThreads columns, so a decode token's row is spread over CTAs.
constexpr int kBatch = 8;
template <typename V>
__global__ void k_moe_combine(int64_t m, int64_t top_k, int64_t n, const V *rows,
                              const int32_t *slot, const float *w, V *y) {
  for (int64_t t = blockIdx.y; t < m; t += gridDim.y) {
    V *yt = y + t * n;
    for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < n;
         j += (int64_t)gridDim.x * blockDim.x) {
      V acc = yt[j];
      for (int64_t k0 = 0; k0 < top_k; k0 += kBatch) {
        V v[kBatch];
        float wk[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; u++)
          if (k0 + u < top_k) {
            const int64_t i = t * top_k + k0 + u;
            const int64_t r = slot ? (int64_t)slot[i] : i;
            wk[u] = w[i];
            v[u] = rows[r * n + j];
          }
#pragma unroll
        for (int u = 0; u < kBatch; u++)
          if (k0 + u < top_k)
            acc = add_weighted(acc, wk[u], v[u]);
      }
      yt[j] = acc;
    }
  }
}

// fp32 cache elements as they are; bf16 ones rounded to nearest even (epic_kv_dtype).
__device__ __forceinline__ void kv_put(float *p, float v) { *p = v; }
__device__ __forceinline__ void kv_put(uint16_t *p, float v) {
  *p = __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

template <typename T>
__global__ void k_kv_store_batch(T *pool, const int32_t *tables, int64_t stride,
                                 const int32_t *n_ctx, int64_t ps, int64_t width, int64_t lora,
                                 int64_t n_seq, const float *lat, int64_t ldl, const float *kpe,
                                 int64_t ldk) {
  for (int64_t s = blockIdx.x; s < n_seq; s += gridDim.x) {
    const int64_t t = (int64_t)n_ctx[s] - 1;
    const int32_t *table = tables + s * stride;
    T *row = pool + ((int64_t)table[t / ps] * ps + t % ps) * width;
    for (int64_t j = threadIdx.x; j < width; j += blockDim.x)
      kv_put(row + j, j < lora ? lat[s * ldl + j] : kpe[s * ldk + j - lora]);
  }
}

// The expert plan of moe_plan (kernels/ops.h) in one CTA: the items are counted per
// expert with shared-memory atomics (integers: any order gives the same counts), the
// counts turned into offsets by a block-wide scan (offsets and counts written by a thread
// per expert), and then one warp places the items 32 at a time in item order (lanes of one
// expert grouped by match_any), so the order within an expert is the item order. The ids are
// staged in shared memory when they fit. At decode sizes (n = tokens x top-k, up to a few
// thousand) a few microseconds, no host round trip. (Counting by a warp ballot per
// expert, one thread adding the 256 counts up and a lane per expert updating the counts
// in turn took 16 us per call at 32 tokens, H200.)
__global__ void k_moe_plan(const int32_t *idx, int n, int n_experts, int div, int staged,
                           int32_t *plan, long long *counts, int *err) {
  extern __shared__ int sm[]; // [n_experts + 1] offsets, then [n] ids when staged
  __shared__ int wsum[33];    // the scan's per-warp sums, then the chunk's total
  int *off = sm;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const int32_t *ids = idx;
  if (staged) {
    int *s = sm + n_experts + 1;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
      s[i] = __ldg(idx + i);
    ids = s;
  }
  for (int e = threadIdx.x; e < n_experts; e += blockDim.x)
    off[e] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int e = ids[i];
    if (e >= 0 && e < n_experts) // others are left out of the counts: reported below
      atomicAdd(&off[e], 1);
  }
  __syncthreads();
  // Exclusive scan of the counts, blockDim.x experts at a time.
  int carry = 0;
  for (int base = 0; base < n_experts; base += blockDim.x) {
    const int e = base + threadIdx.x;
    const int c = e < n_experts ? off[e] : 0;
    const int incl = epic_warp_incl_sum(c, lane);
    if (lane == 31)
      wsum[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      const int v = lane < warps ? wsum[lane] : 0;
      const int iv = epic_warp_incl_sum(v, lane);
      wsum[lane] = iv - v;
      if (lane == 31)
        wsum[32] = iv;
    }
    __syncthreads();
    if (e < n_experts)
      off[e] = carry + wsum[warp] + incl - c;
    carry += wsum[32];
    __syncthreads(); // wsum is rewritten by the next chunk
  }
  if (threadIdx.x == 0) {
    off[n_experts] = carry;
    plan[2 * n + n_experts] = carry;
    if (carry != n) // some id outside [0, n_experts)
      atomicOr(err, EPIC_CUK_ERR_EXPERT_ID);
  }
  __syncthreads();
  // The offsets and the counts of every expert at once (one lane per expert walking its
  // warp's experts took a global read-modify-write latency per expert in turn).
  for (int e = threadIdx.x; e < n_experts; e += blockDim.x) {
    plan[2 * n + e] = off[e];
    if (counts)
      counts[e] += off[e + 1] - off[e];
  }
  __syncthreads(); // off[] becomes the cursors below
  // Placement: one warp walks the items 32 at a time in item order; the lanes of a chunk
  // routed to the same expert find each other (match_any) and take consecutive places
  // from the expert's cursor (its offset, advanced by the group's lowest lane).
  if (warp == 0) {
    const unsigned below = (1u << lane) - 1u;
    for (int base = 0; base < n; base += 32) {
      const int i = base + lane;
      const int e = i < n ? ids[i] : -1;
      const unsigned peers = __match_any_sync(0xffffffffu, e);
      if (e >= 0 && e < n_experts) {
        const int p = off[e] + __popc(peers & below);
        plan[p] = i / div;
        plan[n + p] = i;
      }
      __syncwarp();
      if (e >= 0 && e < n_experts && (peers & below) == 0)
        off[e] += __popc(peers);
      __syncwarp();
    }
  }
}

} // namespace

extern "C" {

cudaError_t epic_cuk_moe_plan(const int32_t *idx, int64_t n, int64_t n_experts, int64_t div,
                              int32_t *plan, int64_t *counts, int *err, cudaStream_t st) {
  const int threads = n_experts * 32 < 1024 ? (int)n_experts * 32 : 1024;
  // the ids go to shared memory while offsets and ids fit the default 48 KB
  const size_t offs = (size_t)(n_experts + 1) * sizeof(int), ids = (size_t)n * sizeof(int);
  const int staged = offs + ids <= 48u << 10;
  k_moe_plan<<<1, threads, offs + (staged ? ids : 0), st>>>(
      idx, (int)n, (int)n_experts, (int)div, staged, plan,
      reinterpret_cast<long long *>(counts), err);
  return cudaGetLastError();
}

cudaError_t epic_cuk_copy_rows(int64_t n, int64_t cols, const float *src, int64_t ld_src,
                               const int32_t *src_idx, float *dst, int64_t ld_dst,
                               const int32_t *dst_idx, cudaStream_t st) {
  const int vec4 = cols % 4 == 0 && ld_src % 4 == 0 && ld_dst % 4 == 0 &&
                   ((uintptr_t)src % 16) == 0 && ((uintptr_t)dst % 16) == 0;
  const int threads = cols / (vec4 ? 4 : 1) >= kThreads ? kThreads : 64;
  k_copy_rows<<<grid_of(n), threads, 0, st>>>(n, cols, reinterpret_cast<const uint32_t *>(src),
                                              ld_src, src_idx, reinterpret_cast<uint32_t *>(dst),
                                              ld_dst, dst_idx, vec4);
  return cudaGetLastError();
}

cudaError_t epic_cuk_moe_combine(int64_t m, int64_t top_k, int64_t n, const float *rows,
                                 const int32_t *slot, const float *w, float *y, cudaStream_t st) {
  const bool vec = n % 4 == 0 &&
                   ((reinterpret_cast<uintptr_t>(rows) | reinterpret_cast<uintptr_t>(y)) & 15) == 0;
  const int64_t nv = vec ? n / 4 : n, tiles = (nv + kThreads - 1) / kThreads;
  const dim3 grid((unsigned)(tiles < 65535 ? tiles : 65535), (unsigned)grid_of(m));
  if (vec)
    k_moe_combine<float4><<<grid, kThreads, 0, st>>>(m, top_k, nv,
                                                     reinterpret_cast<const float4 *>(rows), slot,
                                                     w, reinterpret_cast<float4 *>(y));
  else
    k_moe_combine<float><<<grid, kThreads, 0, st>>>(m, top_k, nv, rows, slot, w, y);
  return cudaGetLastError();
}

cudaError_t epic_cuk_kv_store_batch(const epic_kv_batch *kv, int64_t n_seq, const float *latent,
                                    int64_t ld_latent, const float *kpe, int64_t ld_kpe,
                                    cudaStream_t st) {
  if (kv->dtype == EPIC_KV_BF16)
    k_kv_store_batch<<<grid_of(n_seq), 128, 0, st>>>(
        static_cast<uint16_t *>(kv->pool), kv->block_tables, kv->table_stride, kv->n_ctx,
        kv->page_size, kv->width, kv->lora, n_seq, latent, ld_latent, kpe, ld_kpe);
  else
    k_kv_store_batch<<<grid_of(n_seq), 128, 0, st>>>(
        static_cast<float *>(kv->pool), kv->block_tables, kv->table_stride, kv->n_ctx,
        kv->page_size, kv->width, kv->lora, n_seq, latent, ld_latent, kpe, ld_kpe);
  return cudaGetLastError();
}

} // extern "C"
