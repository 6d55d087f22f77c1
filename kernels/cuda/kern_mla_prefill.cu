// Flash-style MLA prefill attention, the naive form mla_naive computes: per head, queries
// [q_nope | q_pe] (192) against keys [k_nope | k_pe] (k_nope decompressed by kv_b, k_pe
// shared by the heads) and values v (128), causal (query i sees keys 0 .. start + i).
// One CTA = one head x 64 queries, 4 warps of 16 query rows. Key tiles of 64 rows stream
// through two shared-memory stages by cp.async (keys and values as bf16, rows XOR-swizzled
// by 16-byte chunk so that ldmatrix reads are conflict-free); S = Q.K^T and O += P.V run on
// mma.sync m16n8k16 bf16 with fp32 accumulation; the softmax is online, in registers (a
// thread holds two query rows: two shuffles per row maximum), with P rounded to bf16 as
// the A operand of P.V straight from the score accumulators. No score matrix touches
// memory, and the 16 query tiles of a head read its keys and values mostly from L2.
// DeepSeek-V3 head shape only (nope 128, rope 64, v 128); inputs are bf16 copies made by
// the caller.
#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>

#include "kern_mla_common.cuh"

namespace {

constexpr int kNope = 128, kRope = 64, kV = 128, kDq = kNope + kRope, kDkv = kNope + kV;
constexpr int kTQ = 64, kTK = 64, kThreads = 128;
constexpr int kQC = kDq / 8, kVC = kV / 8; // 16-byte chunks per Q/K row and per V row
constexpr int kQBytes = kTQ * kDq * 2, kKBytes = kTK * kDq * 2, kVBytes = kTK * kV * 2;
constexpr int kStage = kKBytes + kVBytes;
constexpr int kSmem = kQBytes + 2 * kStage;

struct Params {
  const uint16_t *q;   // [m][H][192]
  const uint16_t *kv;  // [n_keys][H][256]: k_nope, v
  const uint16_t *kpe; // [n_keys][64]
  float *out;          // [m][H][128]
  int m, start, H;
  float scale_log2; // softmax scale * log2(e)
};

// Byte offset of 16-byte chunk c of row r in a panel of `chunks` chunks per row; the XOR
// spreads the 8 rows an ldmatrix reads over all banks (chunks is a multiple of 8).
__device__ __forceinline__ uint32_t swz(int r, int c, int chunks) {
  return (uint32_t)((r * chunks + (c ^ (r & 7))) * 16);
}

// Keys and values of key tile j into stage buffers (sK, sV); rows past n_keys are zeros
// (their scores are masked; zero values keep 0 * v finite).
__device__ __forceinline__ void load_kv(const Params &p, int h, int j, int n_keys, uint32_t sK,
                                        uint32_t sV) {
  for (int i = threadIdx.x; i < kTK * kQC; i += kThreads) {
    const int r = i / kQC, c = i % kQC, key = j * kTK + r;
    const bool ok = key < n_keys;
    const uint16_t *src = !ok ? p.kpe
                          : c < kNope / 8
                              ? p.kv + ((int64_t)key * p.H + h) * kDkv + c * 8
                              : p.kpe + (int64_t)key * kRope + (c - kNope / 8) * 8;
    epic_cp_async16(sK + swz(r, c, kQC), src, ok ? 16 : 0);
  }
  for (int i = threadIdx.x; i < kTK * kVC; i += kThreads) {
    const int r = i / kVC, c = i % kVC, key = j * kTK + r;
    const bool ok = key < n_keys;
    const uint16_t *src = ok ? p.kv + ((int64_t)key * p.H + h) * kDkv + kNope + c * 8 : p.kv;
    epic_cp_async16(sV + swz(r, c, kVC), src, ok ? 16 : 0);
  }
}

__global__ void __launch_bounds__(kThreads, 2) k_mla_prefill(const Params p) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int qt = (int)(gridDim.x - 1 - blockIdx.x); // the longest (last) query tiles first
  const int h = (int)blockIdx.y, q0 = qt * kTQ;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, qd = lane & 3;
  const int n_keys = p.start + p.m;
  const int q_last = (q0 + kTQ < p.m ? q0 + kTQ : p.m) - 1;
  const int n_tiles = (p.start + q_last + 1 + kTK - 1) / kTK;
  const uint32_t sQ = epic_smem_u32(smem), sS0 = sQ + kQBytes;

  for (int i = threadIdx.x; i < kTQ * kQC; i += kThreads) {
    const int r = i / kQC, c = i % kQC, row = q0 + r;
    const bool ok = row < p.m;
    epic_cp_async16(sQ + swz(r, c, kQC), ok ? p.q + ((int64_t)row * p.H + h) * kDq + c * 8 : p.q,
                    ok ? 16 : 0);
  }
  load_kv(p, h, 0, n_keys, sS0, sS0 + kKBytes);
  epic_cp_async_commit();

  uint32_t qf[kDq / 16][4]; // this warp's 16 query rows as A fragments
  float o[kV / 8][4], mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.0f, 0.0f};
#pragma unroll
  for (int n = 0; n < kV / 8; n++)
    o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  // the two query rows this thread's accumulators hold
  const int qi0 = q0 + warp * 16 + g, qi1 = qi0 + 8;

  for (int j = 0; j < n_tiles; j++) {
    const uint32_t sK = sS0 + (uint32_t)((j & 1) * kStage), sV = sK + kKBytes;
    if (j + 1 < n_tiles) {
      const uint32_t nK = sS0 + (uint32_t)(((j + 1) & 1) * kStage);
      load_kv(p, h, j + 1, n_keys, nK, nK + kKBytes);
    }
    epic_cp_async_commit();
    epic_cp_async_wait<1>(); // tile j (and Q) landed; tile j + 1 may still be in flight
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < kDq / 16; kk++)
        ldsm4(sQ + swz(warp * 16 + (lane & 15), kk * 2 + (lane >> 4), kQC), qf[kk]);
    }
    float s[kTK / 8][4];
#pragma unroll
    for (int n = 0; n < kTK / 8; n++)
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kDq / 16; kk++)
#pragma unroll
      for (int np = 0; np < kTK / 16; np++) {
        uint32_t b[4];
        ldsm4(sK + swz(np * 16 + (lane & 7) + (lane >> 4) * 8, kk * 2 + ((lane >> 3) & 1), kQC),
              b);
        mma_bf16(s[2 * np][0], s[2 * np][1], s[2 * np][2], s[2 * np][3], qf[kk], b[0], b[1]);
        mma_bf16(s[2 * np + 1][0], s[2 * np + 1][1], s[2 * np + 1][2], s[2 * np + 1][3], qf[kk],
                 b[2], b[3]);
      }
    const int k0 = j * kTK;
    if (k0 + kTK - 1 > p.start + q0 + warp * 16) { // the tile reaches past the diagonal
#pragma unroll
      for (int n = 0; n < kTK / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int key = k0 + n * 8 + 2 * qd + (e & 1), qi = e < 2 ? qi0 : qi1;
          if (key > p.start + qi)
            s[n][e] = -INFINITY;
        }
    }
    // online softmax, rows qi0 (elements 0, 1) and qi1 (2, 3)
    uint32_t pa[kTK / 16][4];
#pragma unroll
    for (int r = 0; r < 2; r++) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < kTK / 8; n++)
        mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // every row has key 0 in tile 0, so the maximum is finite from the first tile on
      const float m_new = fmaxf(mrow[r], mx * p.scale_log2);
      const float corr = exp2f(mrow[r] - m_new);
      mrow[r] = m_new;
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < kTK / 8; n++) {
        s[n][2 * r] = exp2f(fmaf(s[n][2 * r], p.scale_log2, -m_new));
        s[n][2 * r + 1] = exp2f(fmaf(s[n][2 * r + 1], p.scale_log2, -m_new));
        sum += s[n][2 * r] + s[n][2 * r + 1];
      }
      lrow[r] = fmaf(lrow[r], corr, sum);
#pragma unroll
      for (int n = 0; n < kV / 8; n++) {
        o[n][2 * r] *= corr;
        o[n][2 * r + 1] *= corr;
      }
    }
#pragma unroll
    for (int kk = 0; kk < kTK / 16; kk++) {
      pa[kk][0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
      pa[kk][1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
      pa[kk][2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[kk][3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
#pragma unroll
    for (int kk = 0; kk < kTK / 16; kk++)
#pragma unroll
      for (int dp = 0; dp < kV / 16; dp++) {
        uint32_t b[4];
        ldsm4t(sV + swz(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dp * 2 + (lane >> 4), kVC),
               b);
        mma_bf16(o[2 * dp][0], o[2 * dp][1], o[2 * dp][2], o[2 * dp][3], pa[kk], b[0], b[1]);
        mma_bf16(o[2 * dp + 1][0], o[2 * dp + 1][1], o[2 * dp + 1][2], o[2 * dp + 1][3], pa[kk],
                 b[2], b[3]);
      }
    __syncthreads(); // every warp is done with this stage before tile j + 2 lands in it
  }
#pragma unroll
  for (int r = 0; r < 2; r++) {
    float l = lrow[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int qi = r ? qi1 : qi0;
    if (qi >= p.m)
      continue;
    const float inv = 1.0f / l;
    float *dst = p.out + ((int64_t)qi * p.H + h) * kV + 2 * qd;
#pragma unroll
    for (int n = 0; n < kV / 8; n++)
      *reinterpret_cast<float2 *>(dst + n * 8) = make_float2(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
  }
}

} // namespace

extern "C" {

int epic_cuk_mla_prefill_ok(int64_t nope, int64_t rope, int64_t v, int64_t m, int64_t start,
                            int64_t n_heads) {
  return nope == kNope && rope == kRope && v == kV && m > 0 && start >= 0 && n_heads > 0 &&
         n_heads <= 65535 && start + m < INT32_MAX / 2 &&
         (m + start) * n_heads * kDkv < ((int64_t)1 << 40);
}

cudaError_t epic_cuk_mla_prefill_prepare(void) {
  return cudaFuncSetAttribute(k_mla_prefill, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
}

cudaError_t epic_cuk_mla_prefill(const uint16_t *q, const uint16_t *kv, const uint16_t *kpe,
                                 int64_t m, int64_t start, int64_t n_heads, float scale, float *out,
                                 cudaStream_t st) {
  Params p;
  p.q = q;
  p.kv = kv;
  p.kpe = kpe;
  p.out = out;
  p.m = (int)m;
  p.start = (int)start;
  p.H = (int)n_heads;
  p.scale_log2 = scale * 1.4426950408889634f;
  const dim3 grid((unsigned)((m + kTQ - 1) / kTQ), (unsigned)n_heads);
  k_mla_prefill<<<grid, kThreads, kSmem, st>>>(p);
  return cudaGetLastError();
}

} // extern "C"
