// Grouped FP8 GEMM on Hopper's FP8 tensor cores for the large groups of a grouped matmul
// (a prefill step's experts, a few hundred rows each): y[r] = x[r] . W_g^T for the rows r
// of group g, e4m3 activations with one scale per row and 128-column block (the
// quantiser of the cuBLASLt path, epic_cuk_quant_fp8_groups) and e4m3 weights with
// 128 x 128 block scales, in one persistent launch for up to EPIC_CUK_WG_GROUPS_MAX groups
// planned on the host, or (device-planned form: decode steps whose expert plan stays on
// the GPU, epic_cuk_quant_fp8_dev's layout) for the groups of device offsets above a bound.
//
// Why not cuBLASLt: one block-scaled GEMM per expert of ~256 rows fills a fraction of the
// GPU, and even side by side on four streams the 256 GEMMs of a projection reached 0.32
// of the FP8 peak (kernels/cuda/NOTES.md). Here every CTA walks the tiles of all groups.
//
// Layout: a CTA of three warpgroups takes 128 x 256 output tiles. Warpgroup 0 is the
// producer: one thread feeds a ring of kStages shared-memory stages with the tensor
// memory accelerator (TMA: a 128-row x 128-byte box of activation codes, or 16-row boxes
// for a tile of at most 64 rows, and a 256-row one of weight codes per stage, written with
// the 128-byte swizzle that wgmma reads; rows and columns past the tensors' ends arrive as
// zeros), plus the stage's scales (a bulk copy of the tile's 128 activation scales, two
// 4-byte cp.async of the weight block scales), so no consumer ever waits on a global load.
// Each stage has a "full" mbarrier (bytes and copies landed) and an "empty" one (every
// consumer warp is done with it). Warpgroups 1 and 2 are the consumers, 64 rows each: per
// 128-column block and weight scale block, 4 `wgmma m64n128k32` e4m3 steps into a zeroed
// block accumulator, then one FMA per output with the two scales into the fp32 total: the
// block-scaled sum of the official fp8_gemm, which also keeps the tensor cores'
// reduced-precision FP8 accumulation to 128 products.
// (setmaxnreg moves registers from the producer to the consumers: 64 + 2 x 64 accumulators.)
// Tiles are ordered group, then weight column tile, then row tile, so the CTAs that run
// at once share weight tiles through L2. A launch whose 128 x 256 tiles would leave most
// SMs idle (a dense weight at decode sizes) takes 128 x 128 tiles (tile_cfg: one wgmma n
// = 128 pass each, a deeper ring), twice the CTAs and the same bits; a launch of one group
// of a few rows on such a weight runs the thin form below (k_fp8_wgmma_thin). A tile's
// outputs are stored during the next tile's first k-block, while its wgmma steps run.
//
// Measured (kernels/cuda/NOTES.md): 128 x 128 tiles were L2-traffic bound (5.5 TB/s of
// boxes at 0.43 of the FP8 peak); 128 x 256 tiles read 25% fewer bytes per output. A
// prefill step's ~256-row experts then run at about cuBLASLt's pace for gate/up and 1.2x
// it for down, in one launch; the large gains are at 17-128 rows (ops_cuda.h,
// mma_group_rows), where this kernel replaced the decode-sized tensor-core kernel.
//
// Row invariance: an output is its row's 4-step chains per block, scaled and added in k
// order; which tile, CTA or launch a row lands in does not change the operations (and
// the results equal cuBLASLt's block-scaled GEMM bit for bit in test_ops_cuda).
#include <cuda.h>
#include <cudaTypedefs.h>
#include <stdint.h>

#include <type_traits>

#include "kern_mla_common.cuh"

namespace {

constexpr int kBM = EPIC_CUK_WG_TILE_ROWS, kBK = 128;
constexpr int kABytes = kBM * kBK; // one stage's activation box
constexpr int kBoxRows = EPIC_CUK_WG_BOX_ROWS, kABox = kBoxRows * kBK; // small activation boxes
static_assert(kABox % 1024 == 0, "small boxes keep the 128-byte swizzle's 1024-byte period");
constexpr int kThreads = 384;
constexpr int kConsumerWarps = 8;
// 1024 bytes of slack to align the stages to the 128-byte swizzle's 1024-byte period.
// Per stage besides the two boxes: the 128 rows' activation scales of its column block and
// the weight tile's (up to two) block scales (kScaleBytes, padded to 16 bytes).
constexpr int kScaleBytes = (kBM + 4) * 4;
// Dynamic tile order (host-planned form): the producer hands each tile's index to the
// consumers through a ring of kTileSlots slots, each with a "full" and an "empty" mbarrier.
constexpr int kTileSlots = 4;
// A tile's weight columns BN: EPIC_CUK_WG_TILE_COLS, or EPIC_CUK_WG_NARROW_COLS for the
// narrow form (weights of few column tiles, whose wide tiles leave most SMs idle: twice the
// CTAs, each with a deeper ring of half-size weight boxes). Either way an output is one
// wgmma m64n128k32 chain per block, scaled and added alike: the same bits.
template <int BN> struct tile_cfg {
  static constexpr int kStages = BN == EPIC_CUK_WG_TILE_COLS ? 4 : 6;
  static constexpr int kWBytes = BN * kBK;  // one stage's weight box
  static constexpr int kHalves = BN / 128; // weight scale blocks (and wgmma n = 128 passes)
  static constexpr size_t kSmem = 1024 + (size_t)kStages * (kABytes + kWBytes + kScaleBytes) +
                                  2 * kStages * sizeof(uint64_t) +
                                  kTileSlots * (2 * sizeof(uint64_t) + 4);
  // Device-planned launches add their tile prefix sums (EPIC_CUK_WG_DEV_GROUPS_MAX + 1 ints).
  static constexpr size_t kSmemDev = kSmem + 4 * (EPIC_CUK_WG_DEV_GROUPS_MAX + 1);
  static_assert(kSmemDev <= 227 * 1024, "shared memory per CTA");
};

// `bytes` (a multiple of 16) from global src (16-byte aligned) to shared dst, counted on bar.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void *src, uint32_t bytes,
                                          uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"
               " [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}
// One float from global src to shared dst by cp.async; with _arrive, bar gets an arrival
// (counted in its expected count) once this thread's copies have landed, so the thread does
// not wait for them.
__device__ __forceinline__ void cp_async4(uint32_t dst, const float *src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async4_arrive(uint32_t dst, const float *src, uint32_t bar) {
  cp_async4(dst, src);
  epic_cp_async_arrive(bar);
}

// d (+)= A . B^T for a 64 x 128 x 32 step, both operands K-major e4m3 in shared memory.
__device__ __forceinline__ void wgmma_e4m3(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {"
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
               "}, %64, %65, p, 1, 1;\n}\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
               : "l"(da), "l"(db), "r"(scale_d));
#else
  __trap();
#endif
}

// A k-block's wgmma sums d into the running totals: one FMA per output with its row's
// activation scale times the block's weight scale (d[i]: row lo, or hi where i & 2), the
// block-scaled sum of the official fp8_gemm. Every form adds its blocks this way, in k
// order, which is what gives a row the same bits in every form.
template <int N>
__device__ __forceinline__ void promote(float (&acc)[N], const float (&d)[N], float sa_lo,
                                        float sa_hi, float sw) {
  const float f_lo = sa_lo * sw, f_hi = sa_hi * sw;
#pragma unroll
  for (int i = 0; i < N; i++)
    acc[i] = fmaf(d[i], (i & 2) ? f_hi : f_lo, acc[i]);
}

// A tile and its group: row tile, weight column tile, the group's rows [row0, row0 + rows)
// of the codes and output, its weight index, and its scales' base and stride.
struct tile_pos {
  int g, mt, nt, row0, rows, widx, sbase, mp;
};
// Tile t of the launch: its group (the last g with tile0[g] <= t: groups without tiles
// share the next one's start) and its place in it. Host-planned groups come from the
// parameters; device-planned ones from the offsets (see epic_cuk_fp8_wgmma_args).
__device__ __forceinline__ tile_pos locate(const epic_cuk_fp8_wgmma_args &a,
                                           const int32_t *tile0, int t) {
  const int lo = (int)epic_group_of(tile0, a.n_groups, t);
  tile_pos p;
  p.g = lo;
  if (a.off_dev) {
    p.row0 = a.off_dev[lo];
    p.rows = a.off_dev[lo + 1] - p.row0;
    p.widx = lo;
    p.sbase = ((p.row0 + 3) & ~3) + 4 * lo;
    p.mp = a.lds;
  } else {
    p.row0 = a.row0[lo];
    p.rows = a.rows[lo];
    p.widx = a.widx[lo];
    p.sbase = a.sbase[lo];
    p.mp = a.mp[lo];
  }
  const int n_mt = (p.rows + kBM - 1) / kBM, local = t - tile0[lo];
  p.nt = local / n_mt;
  p.mt = local - p.nt * n_mt;
  return p;
}

// Device-planned groups: every CTA counts the tiles of the groups above min_rows into
// tile0 (shared memory, n_groups + 1 entries), one warp scanning 32 groups at a time.
template <int BN>
__device__ __forceinline__ void count_tiles(const epic_cuk_fp8_wgmma_args &a, int32_t *tile0) {
  const int lane = threadIdx.x % 32, n_nt = (a.n + BN - 1) / BN;
  int carry = 0;
  for (int base = 0; base < a.n_groups; base += 32) {
    const int g = base + lane;
    int v = 0;
    if (g < a.n_groups) {
      const int r = a.off_dev[g + 1] - a.off_dev[g];
      v = r > a.min_rows ? (r + kBM - 1) / kBM * n_nt : 0;
      if (a.err && r > a.bound && blockIdx.x == 0) // reported once per launch
        atomicOr(a.err, EPIC_CUK_ERR_GROUP_ROWS);
    }
    const int incl = epic_warp_incl_sum(v, lane);
    if (g < a.n_groups)
      tile0[g] = carry + incl - v;
    carry += __shfl_sync(0xffffffffu, incl, 31);
  }
  if (lane == 0)
    tile0[a.n_groups] = carry;
}

// Where a consumer thread's outputs of a tile go: rows row and row + 8 of y, `left` rows
// from row to the group's end, columns from c0. (Few registers: it lives beside the
// accumulators of the next tile.)
struct out_tile {
  int row, c0, left;
  bool half;
};
// Half h of a thread's accumulators (v[i]: row `row`, +8 where i & 2, column h * 128 +
// (i / 4) * 8 + (i & 1) from c0) to its outputs in a.y below column a.n; column pairs as
// one 8-byte store where every row start is 8-byte aligned.
__device__ __forceinline__ void store_half(const epic_cuk_fp8_wgmma_args &a, const out_tile &o,
                                           const float (&v)[64], int h) {
  const bool pairs = a.ldy % 2 == 0 && (reinterpret_cast<uintptr_t>(a.y) & 7u) == 0;
  float *y_lo = a.y + (int64_t)o.row * a.ldy, *y_hi = y_lo + 8 * a.ldy;
#pragma unroll
  for (int j = 0; j < 16; j++) {
    const int c = o.c0 + h * 128 + j * 8;
    if (c + 1 < a.n && pairs) {
      if (o.left > 0)
        *reinterpret_cast<float2 *>(y_lo + c) = make_float2(v[4 * j], v[4 * j + 1]);
      if (o.left > 8)
        *reinterpret_cast<float2 *>(y_hi + c) = make_float2(v[4 * j + 2], v[4 * j + 3]);
    } else {
#pragma unroll
      for (int e = 0; e < 2; e++)
        if (c + e < a.n) {
          if (o.left > 0)
            y_lo[c + e] = v[4 * j + e];
          if (o.left > 8)
            y_hi[c + e] = v[4 * j + 2 + e];
        }
    }
  }
}

// kHalf: a tile of at most 64 rows, a group's last, is split by columns instead of rows:
// both consumer warpgroups take all its rows, warpgroup cw the weight scale block cw, so
// the tile takes half the time; each output is the same chains, scaled and added alike
// (same bits).
// kDyn (with kHalf in the host-planned form): after its first tile (blockIdx.x) a CTA
// takes the next tile from a counter in global memory (a.next_tile, zero at launch) when
// its producer is done with the last one, instead of every gridDim.x-th tile. Tiles of
// uneven length (half tiles) then still leave the tiles in flight a contiguous run, which
// is what lets the CTAs running at once share weight tiles through L2. Host-planned calls
// with large groups (prefill steps of 8k tokens) run whole tiles in the static order:
// faster there (kernels/cuda/NOTES.md).
template <bool kHalf, bool kDyn, int BN>
__global__ void __launch_bounds__(kThreads, 1)
    k_fp8_wgmma(const __grid_constant__ epic_cuk_fp8_wgmma_args a) {
  // (The plain sm_90 build compiles this too; its wgmma traps, and the host runs the
  // sm_90a code on Hopper.)
  using C = tile_cfg<BN>;
  constexpr int kStages = C::kStages, kWBytes = C::kWBytes, kHalves = C::kHalves;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (epic_smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t s_a = base, s_b = base + kStages * kABytes;
  const uint32_t s_sc = s_b + kStages * kWBytes; // scales: [kStages][kBM + 4] floats
  const uint32_t bar_full = s_sc + kStages * kScaleBytes, bar_empty = bar_full + kStages * 8;
  const float *const sc =
      reinterpret_cast<const float *>(smem_raw + (s_sc - epic_smem_u32(smem_raw)));
  const uint32_t bar_tfull = bar_empty + kStages * 8, bar_tempty = bar_tfull + kTileSlots * 8;
  volatile int32_t *const s_tile = reinterpret_cast<volatile int32_t *>(
      smem_raw + (bar_tempty + kTileSlots * 8 - epic_smem_u32(smem_raw)));
  int32_t *const dev_tile0 = reinterpret_cast<int32_t *>(
      smem_raw + (bar_tempty + kTileSlots * 12 - epic_smem_u32(smem_raw)));
  const int32_t *const tile0 = a.off_dev ? dev_tile0 : a.tile0;
  const int wg = threadIdx.x / 128;
  const int nkb = (a.k + kBK - 1) / kBK;
  if (a.off_dev && threadIdx.x < 32)
    count_tiles<BN>(a, dev_tile0);
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; s++) {
      mbar_init(bar_full + 8 * s, 2); // the producer (with the bytes) and its 4-byte copy
      mbar_init(bar_empty + 8 * s, kConsumerWarps);
    }
    for (int s = 0; s < kTileSlots; s++) {
      mbar_init(bar_tfull + 8 * s, 1);
      mbar_init(bar_tempty + 8 * s, kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  const int total = tile0[a.n_groups];

  if (wg == 0) { // producer: one thread
    set_maxnreg_dec<40>();
    if (threadIdx.x != 0)
      return;
    uint32_t it = 0, handed = 0;
    // kDyn: tile t to the consumers (total: no more tiles)
    auto hand = [&](int t) {
      const uint32_t slot = handed % kTileSlots, r = handed / kTileSlots;
      if (r > 0)
        mbar_wait(bar_tempty + 8 * slot, (r - 1) & 1);
      s_tile[slot] = t;
      mbar_arrive(bar_tfull + 8 * slot);
      handed++;
    };
    for (int t = blockIdx.x; t < total;
         t = kDyn ? (int)gridDim.x + atomicAdd(a.next_tile, 1) : t + (int)gridDim.x) {
      if (kDyn)
        hand(t);
      const tile_pos p = locate(a, tile0, t);
      const epic_cuk_tmap *wmap = &a.wmaps[p.widx];
      const int row = p.row0 + p.mt * kBM, wrow = p.nt * BN, r0 = p.mt * kBM;
      // This tile's rows of the scale blocks: the group's rows rounded up to 4 (its slot
      // in the layout is), so the copy is whole 16-byte units; rows past the group's end
      // hold pad scales or stale values, and their outputs are never stored.
      const int mp = p.mp, left = (p.rows - r0 + 3) & ~3;
      const uint32_t sa_bytes = 4u * (uint32_t)(left < kBM ? left : kBM);
      const float *as = a.as + p.sbase + r0;
      // the tile's weight scale rows (the second one only where the weight has it)
      const int nbr = (a.n + 127) / 128, b0 = p.nt * kHalves;
      const float *ws0 = a.tab[p.widx].scale + (int64_t)b0 * nkb;
      const float *ws1 = ws0 + (b0 + 1 < nbr ? nkb : 0);
      // A tile of at most 64 rows takes its rows in 16-row boxes (n_box of them) instead of
      // the 128-row box: a decode step's groups have a few rows each, and the whole box
      // brought 16 KiB of other groups' rows from L2 per 32 KiB of weights. The wgmma still
      // reads 64 rows; those past the boxes hold stale codes, and their outputs are never
      // stored (an output row depends on its activation row only).
      const int t_rows = p.rows - r0;
      const int n_box = t_rows <= 64 ? (t_rows + kBoxRows - 1) / kBoxRows : 0;
      const uint32_t a_bytes = n_box ? (uint32_t)(n_box * kABox) : (uint32_t)kABytes;
      for (int kb = 0; kb < nkb; kb++, it++) {
        const uint32_t s = it % kStages, r = it / kStages, full = bar_full + 8 * s;
        const uint32_t dsc = s_sc + s * kScaleBytes;
        if (r > 0)
          mbar_wait(bar_empty + 8 * s, (r - 1) & 1);
        mbar_expect_tx(full, a_bytes + kWBytes + sa_bytes);
        if (n_box == 0)
          tma_load(s_a + s * kABytes, &a.amap, kb * kBK, row, full);
        else
          for (int b = 0; b < n_box; b++)
            tma_load(s_a + s * kABytes + b * kABox, &a.amap16, kb * kBK, row + b * kBoxRows,
                     full);
        tma_load(s_b + s * kWBytes, wmap, kb * kBK, wrow, full);
        bulk_load(dsc, as + (int64_t)kb * mp, sa_bytes, full);
        cp_async4(dsc + kBM * 4, ws0 + kb);
        cp_async4_arrive(dsc + kBM * 4 + 4, ws1 + kb, full); // the second arrival
      }
    }
    if (kDyn)
      hand(total);
    return;
  }

  set_maxnreg_inc<232>();
  const int cw = wg - 1, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  uint32_t it = 0;
  float d[64];
#pragma unroll
  for (int i = 0; i < 64; i++)
    d[i] = 0.f;
  float acc[kHalves][64];
  // The last tile's outputs are stored during the next tile's first k-block, each half
  // while that half's first wgmma runs, instead of between the tiles with the tensor cores
  // idle (both consumer warpgroups reach a shared tile's end together).
  out_tile prev;
  bool pending = false;
  uint32_t taken = 0;
  for (int t = blockIdx.x;; t += gridDim.x) {
    if (kDyn) { // the producer's next tile
      const uint32_t slot = taken % kTileSlots;
      mbar_wait(bar_tfull + 8 * slot, (taken / kTileSlots) & 1);
      t = s_tile[slot];
      __syncwarp();
      if (lane == 0)
        mbar_arrive(bar_tempty + 8 * slot);
      taken++;
    }
    if (t >= total)
      break;
    const tile_pos p = locate(a, tile0, t);
    const bool half = kHalf && p.rows - p.mt * kBM <= 64;
    const int r_lo = p.mt * kBM + (half ? 0 : cw * 64) + warp * 16 + lane / 4;
    // One k-block; the first one of a tile (kFirst) also stores the last tile's outputs
    // and starts the sums. (Peeled, so that the stores sit outside the loop: inside it the
    // consumers' registers overflow.)
    auto k_block = [&](auto first_c) {
      constexpr bool kFirst = decltype(first_c)::value;
      const uint32_t s = it % kStages, r = it / kStages;
      mbar_wait(bar_full + 8 * s, r & 1);
      const float *scs = sc + s * (kScaleBytes / 4);
      const float sa_lo = scs[r_lo - p.mt * kBM], sa_hi = scs[r_lo + 8 - p.mt * kBM];
      const uint64_t da = sw128_desc(s_a + s * kABytes + (half ? 0 : cw * 64 * kBK), 16, 1024);
      // the first k-block's stores of the last tile's half h
      auto flush = [&](int h) {
        if (kFirst && pending && (!prev.half || h == cw))
          store_half(a, prev, acc[h], h);
      };
#pragma unroll
      for (int h = 0; h < kHalves; h++) {
        if (half && h != cw) { // the other warpgroup's half of this tile
          flush(h);
          continue;
        }
        // one wgmma n = 128 pass per weight scale block: its 4 steps, then its scales
        const uint64_t db = sw128_desc(s_b + s * kWBytes + h * 128 * kBK, 16, 1024);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < kBK / 32; kk++) // 32 bytes of a row per step: +2 in 16-byte units
          wgmma_e4m3(d, da + 2 * kk, db + 2 * kk, kk);
        wg_commit();
        flush(h);
        if (kFirst)
#pragma unroll
          for (int i = 0; i < 64; i++)
            acc[h][i] = 0.f;
        wg_wait_all();
        reg_fence(d);
        promote(acc[h], d, sa_lo, sa_hi, scs[kBM + h]);
      }
      __syncwarp();
      if (lane == 0)
        mbar_arrive(bar_empty + 8 * s);
      it++;
    };
    k_block(std::true_type{});
    for (int kb = 1; kb < nkb; kb++)
      k_block(std::false_type{});
    prev = out_tile{p.row0 + r_lo, p.nt * BN + (lane % 4) * 2, p.rows - r_lo, half};
    pending = true;
  }
  if (pending)
#pragma unroll
    for (int h = 0; h < kHalves; h++)
      if (!prev.half || h == cw)
        store_half(a, prev, acc[h], h);
}

// The thin form (a.thin): one group of at most EPIC_CUK_WG_THIN_ROWS rows whose narrow
// tiles would leave SMs idle, e.g. a dense weight at decode sizes in the invariant
// precision. The tiled forms give such a call one CTA per 128 weight rows, a few SMs
// streaming all of k (k cut into parts on more CTAs, with a second kernel adding their raw
// block sums in k order, was the earlier answer: each CTA then filled and drained a ring
// of 128-row boxes for a handful of blocks). Here a CTA is one warpgroup over
// kThinCols weight rows and all of k: its outputs are the same chains, scaled and added in
// k order in registers, as the tiled forms compute them (wgmma m64n16k32 steps instead of
// m64n128k32 ones: an output's chain does not depend on the width; test_ops_cuda compares
// them bit for bit), and the weight streams through many small CTAs, four per SM, each with
// a ring of kThinStages cp.async stages (2 KiB of weights, at most 2 KiB of activation rows
// each) taken kThinBatch blocks at a time.
constexpr int kThinCols = 16, kThinStages = 12, kThinBatch = 4, kThinThreads = 128;
static_assert(kThinStages % kThinBatch == 0 && kThinStages >= 2 * kThinBatch, "the ring");
constexpr int kThinA = EPIC_CUK_WG_THIN_ROWS * kBK, kThinW = kThinCols * kBK;
static_assert(kThinA % 1024 == 0 && kThinW % 1024 == 0, "stages keep the swizzle's period");
// A stage's activation rows [16][128 bytes] at s_a + s * kThinA; wgmma reads 64 rows from
// there, the 48 past them other stages' bytes: rows whose outputs are never stored. The
// last stage's 64 rows end inside the weight stages that follow.
static_assert(kThinStages * kThinW >= 64 * kBK - kThinA, "the last stage's A rows stay inside");
constexpr size_t kThinSmem = 1024 + (size_t)kThinStages * (kThinA + kThinW);

// d (+)= A . B^T for a 64 x 16 x 32 step (see wgmma_e4m3).
__device__ __forceinline__ void wgmma_e4m3_n16(float (&d)[8], uint64_t da, uint64_t db,
                                               int scale_d) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3 "
               "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1;\n}\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),
                 "+f"(d[6]), "+f"(d[7])
               : "l"(da), "l"(db), "r"(scale_d));
#else
  __trap();
#endif
}

__global__ void __launch_bounds__(kThinThreads)
    k_fp8_wgmma_thin(const __grid_constant__ epic_cuk_fp8_wgmma_args a) {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t s_a = (epic_smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t s_b = s_a + kThinStages * kThinA;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int nkb = (a.k + kBK - 1) / kBK, rows = a.rows[0], col0 = blockIdx.x * kThinCols;
  // Loads: a batch's blocks kb0 .. kb0 + kThinBatch - 1, thread tid taking 16-byte chunk
  // tid % 8 of row tid / 8 of each, written where the 128-byte swizzle puts it. Chunks past
  // k are zero-filled (both operands: nothing past k adds to a sum); activation rows past
  // the group and weight rows past n are not loaded (their outputs are never stored).
  const int lr = tid / 8, ch = tid % 8;
  const uint32_t sw_off = sw128_off(lr, ch);
  const uint8_t *xa = a.aq + (int64_t)(a.row0[0] + lr) * a.k + ch * 16;
  const uint8_t *xw = a.tab[a.widx[0]].data + (int64_t)(col0 + lr) * a.k + ch * 16;
  const bool load_a = lr < rows, load_w = col0 + lr < a.n;
  auto load_batch = [&](int kb0) {
#pragma unroll
    for (int b = 0; b < kThinBatch; b++) {
      const int kb = kb0 + b;
      if (kb < nkb) {
        const int s = kb % kThinStages, inside = kb * kBK + ch * 16 < a.k ? 16 : 0;
        if (load_a)
          epic_cp_async16(s_a + s * kThinA + sw_off, xa + (inside ? kb * kBK : 0), inside);
        if (load_w)
          epic_cp_async16(s_b + s * kThinW + sw_off, xw + (inside ? kb * kBK : 0), inside);
      }
    }
    epic_cp_async_commit(); // empty past the end: the wait counts below stay uniform
  };
  // This thread's outputs: rows g and g + 8 of the group (warp 0 only; the other warps'
  // rows are past it), columns col0 + 8 j + 2 t (+1), j < 2.
  const int g = lane / 4, t = lane % 4;
  const bool lo_ok = warp == 0 && g < rows, hi_ok = warp == 0 && g + 8 < rows;
  const float *as = a.as + a.sbase[0];
  const float *ws = a.tab[a.widx[0]].scale + (int64_t)(col0 / 128) * nkb;
  float acc[8];
#pragma unroll
  for (int i = 0; i < 8; i++)
    acc[i] = 0.f;
  for (int kb = 0; kb < kThinStages - kThinBatch; kb += kThinBatch)
    load_batch(kb);
  // kThinBatch blocks at a time: once this batch's stages have landed (and, by the same
  // barrier, every warp's wgmma is done with the last batch's), the batch kThinStages -
  // kThinBatch blocks ahead goes into the last batch's stages; this batch's 4-step chains
  // run side by side (one chain alone leaves the tensor pipe waiting on each step), then
  // their sums are promoted in k order. (Refilling before the wait, behind a second
  // barrier, measured 10% slower on the small weights.)
  float d[kThinBatch][8];
  // A batch's scales are read a batch ahead: a global load's latency per batch on the
  // critical path had cost a third of the kernel's time.
  float sw[2][kThinBatch], sa_lo[2][kThinBatch], sa_hi[2][kThinBatch];
  auto scales = [&](int kb0, float(&w)[kThinBatch], float(&lo)[kThinBatch],
                    float(&hi)[kThinBatch]) {
#pragma unroll
    for (int b = 0; b < kThinBatch; b++) {
      const int kc = kb0 + b < nkb ? kb0 + b : nkb - 1;
      w[b] = ws[kc];
      lo[b] = lo_ok ? as[(int64_t)kc * a.mp[0] + g] : 0.f;
      hi[b] = hi_ok ? as[(int64_t)kc * a.mp[0] + g + 8] : 0.f;
    }
  };
  scales(0, sw[0], sa_lo[0], sa_hi[0]);
  auto batch = [&](auto cur_c, int kb) { // cur: which scale registers hold this batch's
    constexpr int cur = decltype(cur_c)::value;
    if (kb + kThinBatch < nkb)
      scales(kb + kThinBatch, sw[cur ^ 1], sa_lo[cur ^ 1], sa_hi[cur ^ 1]);
    epic_cp_async_wait<kThinStages / kThinBatch - 2>();
    fence_proxy_async();
    __syncthreads();
    load_batch(kb + kThinStages - kThinBatch);
    wg_fence();
#pragma unroll
    for (int b = 0; b < kThinBatch; b++) { // (blocks past k: stale stages, never promoted)
      const int s = (kb + b) % kThinStages;
      const uint64_t da = sw128_desc(s_a + s * kThinA, 16, 1024);
      const uint64_t db = sw128_desc(s_b + s * kThinW, 16, 1024);
#pragma unroll
      for (int kk = 0; kk < kBK / 32; kk++)
        wgmma_e4m3_n16(d[b], da + 2 * kk, db + 2 * kk, kk);
    }
    wg_commit();
    wg_wait_all();
#pragma unroll
    for (int b = 0; b < kThinBatch; b++) {
      reg_fence(d[b]);
      if (kb + b < nkb)
        promote(acc, d[b], sa_lo[cur][b], sa_hi[cur][b], sw[cur][b]);
    }
  };
  for (int kb = 0; kb < nkb; kb += 2 * kThinBatch) {
    batch(std::integral_constant<int, 0>{}, kb);
    if (kb + kThinBatch < nkb)
      batch(std::integral_constant<int, 1>{}, kb + kThinBatch);
  }
  if (!lo_ok)
    return;
  float *y = a.y + (int64_t)(a.row0[0] + g) * a.ldy;
#pragma unroll
  for (int j = 0; j < 2; j++)
#pragma unroll
    for (int e = 0; e < 2; e++) {
      const int c = col0 + 8 * j + 2 * t + e;
      if (c < a.n) {
        y[c] = acc[4 * j + e];
        if (hi_ok)
          y[8 * a.ldy + c] = acc[4 * j + 2 + e];
      }
    }
}

} // namespace

// The kernel's forms: host-planned with half tiles (dynamic tile order) or whole tiles
// (static order), wide or narrow (a.narrow), and device-planned (wide, half tiles, static
// order: its tiles are counted per CTA from the offsets).
constexpr int kWide = EPIC_CUK_WG_TILE_COLS, kNarrow = EPIC_CUK_WG_NARROW_COLS;
template <bool HALF, int BN> struct host_form {
  static constexpr auto kernel = k_fp8_wgmma<HALF, HALF, BN>;
  static constexpr size_t kSmem = tile_cfg<BN>::kSmem;
};
#define EPIC_WG_DEV k_fp8_wgmma<true, false, kWide>

template <typename F> static cudaError_t smem_attr(F f, size_t bytes) {
  return cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
}

template <bool HALF, int BN> static cudaError_t host_prepare() {
  return smem_attr(host_form<HALF, BN>::kernel, host_form<HALF, BN>::kSmem);
}

// The host-planned form of a->narrow's width on grid CTAs.
template <bool HALF>
static cudaError_t host_launch(const epic_cuk_fp8_wgmma_args *a, int grid, cudaStream_t st) {
  if (a->narrow)
    host_form<HALF, kNarrow>::kernel<<<grid, kThreads, host_form<HALF, kNarrow>::kSmem, st>>>(*a);
  else
    host_form<HALF, kWide>::kernel<<<grid, kThreads, host_form<HALF, kWide>::kSmem, st>>>(*a);
  return cudaGetLastError();
}

cudaError_t epic_cuk_fp8_wgmma_prepare(void) {
  const cudaError_t forms[] = {host_prepare<true, kWide>(),
                               host_prepare<false, kWide>(),
                               host_prepare<true, kNarrow>(),
                               host_prepare<false, kNarrow>(),
                               smem_attr(EPIC_WG_DEV, tile_cfg<kWide>::kSmemDev),
                               smem_attr(k_fp8_wgmma_thin, kThinSmem)};
  for (cudaError_t e : forms)
    if (e != cudaSuccess)
      return e;
  return cudaSuccess;
}

int epic_cuk_fp8_wgmma_layout_ok(const epic_weight *w) {
  return w && w->dtype == EPIC_DT_F8E4M3 && w->block_rows == 128 && w->block_cols == kBK &&
         w->cols % 16 == 0 && w->cols > 0 && w->rows > 0 && w->rows <= INT32_MAX &&
         w->cols <= INT32_MAX;
}

int epic_cuk_fp8_wgmma_ok(const epic_weight *w) {
  return epic_cuk_fp8_wgmma_layout_ok(w) && w->scale_inv && ((uintptr_t)w->data & 15) == 0;
}

cudaError_t epic_cuk_tmap_fp8(epic_cuk_tmap *m, const void *base, int64_t rows, int64_t cols,
                              int box_rows) {
  static_assert(sizeof(epic_cuk_tmap) == sizeof(CUtensorMap), "tensor map size");
  // The encoder is a driver function; the runtime hands out its address (no libcuda link).
  // Looked up once per process: maps are encoded at every grouped FP8 and long-split MLA
  // launch.
  struct encoder {
    void *fn = nullptr;
    cudaError_t err;
    encoder() {
      cudaDriverEntryPointQueryResult q;
      err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                             cudaEnableDefault, &q);
      if (err == cudaSuccess && (q != cudaDriverEntryPointSuccess || !fn))
        err = cudaErrorSymbolNotFound;
    }
  };
  static const encoder enc; // thread-safe one-time initialisation
  if (enc.err != cudaSuccess)
    return enc.err;
  void *const fn = enc.fn;
  const cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
  const cuuint64_t strides[1] = {(cuuint64_t)cols};
  if (box_rows < 1 || box_rows > 256)
    return cudaErrorInvalidValue;
  const cuuint32_t box[2] = {kBK, (cuuint32_t)box_rows}, estr[2] = {1, 1};
  const CUresult r = ((PFN_cuTensorMapEncodeTiled_v12000)fn)(
      reinterpret_cast<CUtensorMap *>(m), CU_TENSOR_MAP_DATA_TYPE_UINT8, 2,
      const_cast<void *>(base), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

int epic_cuk_fp8_wgmma_tiles(int64_t rows, int64_t n, int narrow) {
  const int64_t bn = narrow ? kNarrow : kWide;
  return (int)(((rows + kBM - 1) / kBM) * ((n + bn - 1) / bn));
}

cudaError_t epic_cuk_fp8_wgmma(const epic_cuk_fp8_wgmma_args *a, int sm_count, cudaStream_t st) {
  if (a->off_dev) { // tiles counted on the device: every SM, idle ones leave at once
    if (a->n_groups < 1 || a->n_groups > EPIC_CUK_WG_DEV_GROUPS_MAX || a->lds % 4 != 0)
      return cudaErrorInvalidValue;
    EPIC_WG_DEV<<<sm_count, kThreads, tile_cfg<kWide>::kSmemDev, st>>>(*a);
    return cudaGetLastError();
  }
  if (a->n_groups < 1 || a->n_groups > EPIC_CUK_WG_GROUPS_MAX)
    return cudaErrorInvalidValue;
  if (a->thin) {
    if (a->n_groups != 1 || a->rows[0] > EPIC_CUK_WG_THIN_ROWS || !a->aq)
      return cudaErrorInvalidValue;
    if (a->rows[0] <= 0)
      return cudaSuccess;
    k_fp8_wgmma_thin<<<(a->n + kThinCols - 1) / kThinCols, kThinThreads, kThinSmem, st>>>(*a);
    return cudaGetLastError();
  }
  const int total = a->tile0[a->n_groups];
  if (total <= 0)
    return cudaSuccess;
  const int grid = total < sm_count ? total : sm_count;
  if (!a->half)
    return host_launch<false>(a, grid, st);
  if (!a->next_tile)
    return cudaErrorInvalidValue;
  const cudaError_t e = cudaMemsetAsync(a->next_tile, 0, sizeof(int32_t), st);
  return e != cudaSuccess ? e : host_launch<true>(a, grid, st);
}
