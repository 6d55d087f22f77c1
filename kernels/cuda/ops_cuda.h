/* CUDA backend of epic_ops: what it adds to the contract of kernels/ops.h.
 *
 * Memory. Every pointer an op receives is device memory of this backend's GPU:
 * activations, the data and scale_inv of an epic_weight (the test, the bench or the
 * model uploads the checkpoint's storage as is), epic_kv_view.pool/block_table,
 * epic_kv_batch.block_tables/n_ctx, epic_router_params.bias, and the pos / ids arrays
 * of rope and embed. Two exceptions stay host memory because they are small and
 * constant: rope's inv_freq (copied into the kernel's launch parameters on every call,
 * so there is no cache to invalidate and the call can be captured in a CUDA graph;
 * rope_dim <= 256) and the epic_router_params / epic_kv_view / epic_weight structs
 * themselves. alloc returns zeroed cudaMalloc memory (256-byte aligned).
 *
 * Ordering. Ops are asynchronous and ordered on one CUDA stream owned by the backend
 * (epic_ops_cuda_stream); upload and download synchronise that stream. Arguments are
 * validated on the host; faults that only the device can see (an embed id out of
 * range) fill the affected rows with NaN and are reported as EPIC_ERR_INVALID by the
 * next download or epic_ops_cuda_sync.
 *
 * Precision.
 * - matmul: F32 weights: cuBLAS SGEMM (fp32). BF16: activations rounded to bf16, cuBLAS
 *   bf16 GEMM with fp32 accumulation and output. FP8 e4m3 with 128x128 block scales:
 *   activations quantised per token and 128-column block to e4m3 (scale = amax / 448),
 *   then cuBLASLt's block-scaled FP8 GEMM (VEC128 x BLK128x128 scale modes, fp32
 *   accumulation; expect about 3e-2 relative error from the activation rounding alone;
 *   token counts are padded to a multiple of 4 for it). Decode-sized FP8 calls (m <= 4,
 *   tokens fit in shared memory) use an own kernel that streams the weight once and
 *   keeps the activations in fp32 (fp32-level accuracy).
 *   FP8 weights that cuBLASLt cannot take (other block sizes, cols % 16 != 0) and F16
 *   weights are dequantised per row chunk (to bf16, resp. fp32) and multiplied there:
 *   correct, but they read the weight twice. epic_ops_cuda_matmul_path tells which.
 * - KV cache: kv_dtype is BF16 while the MLA precision is EPIC_CUDA_MLA_TF32 (fast, the
 *   default) and F32 under EPIC_CUDA_MLA_EXACT; caches keep the type they were created
 *   with, and every op reads whatever type its view names. kv_store rounds bf16 rows to
 *   nearest even, kv_gather widens them exactly.
 * - mla_absorbed (m <= 8 query tokens) and mla_absorbed_batch: flash-decoding kernels
 *   reading each cached row once per query token for 64 heads. bf16 rows (576-wide, the
 *   DeepSeek-V3 shape): BF16 tensor cores (wgmma), queries rounded to bf16, fp32 scores,
 *   softmax and accumulators, probabilities rounded to bf16 for P.V (about 1e-3 relative
 *   error against the same rounded rows and queries). fp32 rows: TF32 tensor
 *   cores; EPIC_CUDA_MLA_TF32 rounds queries and probabilities to TF32 and truncates the
 *   rows (about 3e-4 relative error measured); EPIC_CUDA_MLA_EXACT runs 3xTF32 (split
 *   operands, fp32-level accuracy) at about 1.7x the time. Reductions run in a fixed
 *   order, so results are reproducible. Longer query runs, other bf16 row widths and
 *   mla_naive use cuBLAS GEMMs on rows gathered to fp32: on TF32 tensor cores in the fast
 *   precision (about 1e-3 relative), in fp32 under EPIC_CUDA_MLA_EXACT.
 * - head_gemm: fp32 weights, fp32 cuBLAS. head_dtype is BF16 in the fast precision (the
 *   model then keeps kv_b's per-head slices in bf16, ABI 10) and F32 in the exact one.
 *   head_gemm_bf16 of up to EPIC_CUDA_HEAD_KERNEL_MAX_M tokens, where every weight row is
 *   whole 16-byte units (8 bf16) from a 16-byte aligned start, reads the weights once
 *   against fp32 x (sums in an order fixed by the shape, so a token's result does not
 *   depend on the tokens beside it); more tokens go to cuBLAS's bf16 batched GEMM with x
 *   rounded to bf16.
 * - rmsnorm, rope and route reduce in double like the CPU reference; route is
 *   deterministic and picks the same experts as the CPU backend.
 *
 * Thread contract: as epic_ops (one driving thread at a time). create makes `device`
 * current on the calling thread; a thread that drives the backend later must have the
 * same device current (cudaSetDevice) when it calls ops. */
#ifndef EPIC_KERNELS_CUDA_OPS_CUDA_H
#define EPIC_KERNELS_CUDA_OPS_CUDA_H

#include <stdint.h>

#include "../ops.h"

/* head_gemm_bf16's decode kernel takes calls of up to this many tokens (see above). */
#define EPIC_CUDA_HEAD_KERNEL_MAX_M 8

/* Number of CUDA devices usable here (0 when there is no driver or no GPU). Never fails. */
int epic_cuda_device_count(void);

/* The backend's stream (a cudaStream_t), for events and graph capture by callers. */
void *epic_ops_cuda_stream(epic_ops *o);

/* Wait for all queued work; reports asynchronous errors (see Ordering above). */
epic_status epic_ops_cuda_sync(epic_ops *o);

/* Device name and multiprocessor count, for logs and benchmarks. */
const char *epic_ops_cuda_device_name(epic_ops *o);
int epic_ops_cuda_sm_count(epic_ops *o);

typedef enum {
  EPIC_CUDA_MLA_TF32 = 0,  /* default */
  EPIC_CUDA_MLA_EXACT = 1, /* 3xTF32 */
} epic_cuda_mla_precision;
epic_status epic_ops_cuda_set_mla_precision(epic_ops *o, epic_cuda_mla_precision p);

/* Which implementation of the bf16-cache decode kernel runs (same results to rounding;
 * for cross-checks and benchmarks): scores Q.K^T and P.V each on wgmma or on mma.sync, or
 * FlashMLA's two-tile "seesaw" schedule on wgmma. */
typedef enum {
  EPIC_CUDA_MLA_BF16_MMA = 0,     /* both on mma.sync + ldmatrix */
  EPIC_CUDA_MLA_BF16_WGMMA_S = 1, /* scores on wgmma, P.V on mma.sync */
  EPIC_CUDA_MLA_BF16_WGMMA_O = 2, /* scores on mma.sync, P.V on wgmma */
  EPIC_CUDA_MLA_BF16_WGMMA = 3,   /* both on wgmma, one warpgroup's scores then both P.V */
  EPIC_CUDA_MLA_BF16_SEESAW = 4,  /* wgmma, a tile per warpgroup, softmax beside P.V; pages of
                                     whole 64-key tiles (TMA), else WGMMA */
  EPIC_CUDA_MLA_BF16_AUTO = 5,    /* default: SEESAW for splits of at least
                                     EPIC_CUDA_MLA_SEESAW_MIN_TILES tiles in the fast precision,
                                     else WGMMA (faster on short splits) */
} epic_cuda_mla_bf16_kernel;
#define EPIC_CUDA_MLA_BF16_DEFAULT EPIC_CUDA_MLA_BF16_AUTO /* the one a new backend runs */
enum { EPIC_CUDA_MLA_SEESAW_MIN_TILES = 32 };
epic_status epic_ops_cuda_set_mla_bf16_kernel(epic_ops *o, epic_cuda_mla_bf16_kernel k);

/* Key splits per query of the bf16-cache decode kernel: 0 (default) = the count its cost
 * model picks per call, else this many (at most one per 64-key tile and
 * EPIC_CUDA_MLA_MAX_SPLIT): for benchmarks that check the model. */
epic_status epic_ops_cuda_set_mla_split(epic_ops *o, int splits);

/* Column runs per weight row pair of the decode-sized FP8 kernel (m <= 4): 0 (default) =
 * by the weight's shape (runs of at least 2,048 columns: long rows are read by several
 * warps at once), else 1, 2, 4 or 8: for benchmarks and tests of the choice. */
epic_status epic_ops_cuda_set_skinny_split(epic_ops *o, int runs);

/* Which implementation of the flash prefill kernel (fast precision, DeepSeek-V3 heads)
 * runs: its products on wgmma (default) or on mma.sync + ldmatrix (the plain sm_90 code
 * always takes mma.sync). Same results to the order of fp32 accumulation.
 * EPIC_CUDA_MLA_PREFILL=wgmma|mma sets it at creation. */
typedef enum {
  EPIC_CUDA_MLA_PREFILL_MMA = 0,
  EPIC_CUDA_MLA_PREFILL_WGMMA = 1, /* default */
} epic_cuda_mla_prefill_kernel;
epic_status epic_ops_cuda_set_mla_prefill_kernel(epic_ops *o, epic_cuda_mla_prefill_kernel k);

/* Which kernels multiply FP8 weights by few token rows in the FAST precision.
 * MMA (default): the tensor-core kernel of kern_fp8_mma.cu (activations rounded to bf16
 * by a conversion pass, e4m3 weights converted exactly, block scales in fp32) takes the
 * dense matmuls of at most EPIC_CUDA_FP8_MMA_DENSE_MAX_M rows, and the groups of grouped
 * matmuls of at most mma_group_rows rows (below: by default none; one launch per size
 * class, groups above 64 rows in 64-row tiles, device-planned groups up to
 * EPIC_CUDA_FP8_MMA_GROUP_MAX_ROWS, the decode batches whose expert plan stays on the
 * GPU, worker/model.c). Larger dense ones go to cuBLASLt (e4m3 activations), which is
 * faster there; dense matmuls of at most EPIC_CUDA_FP8_SKINNY_MAX_M rows on weights below
 * EPIC_CUDA_FP8_SKINNY_MAX_BYTES (every DeepSeek-V3 projection but the FP8 LM head) go
 * to the fp32 skinny kernel, one launch without the conversion pass, which is what
 * counts at batch 1. Within the kernel's ranges a row's result does not depend on how
 * many rows share the call or its group, nor on whether it goes through the dense or
 * the grouped op. FP32: the fp32
 * CUDA-core kernels (m <= 4 dense, groups <= 16, no activation rounding), cuBLASLt
 * beyond; kept for cross-checks and benchmarks. EPIC_CUDA_FP8_SMALL=mma|fp32 sets it at
 * create. */
enum { EPIC_CUDA_FP8_MMA_DENSE_MAX_M = 8, EPIC_CUDA_FP8_MMA_GROUP_MAX_ROWS = 128 };
/* mma_group_rows: grouped_matmul groups of up to this many rows (0..
 * EPIC_CUDA_FP8_MMA_GROUP_MAX_ROWS) take the MMA kernel, larger ones the large-group
 * kernel (epic_cuda_grouped_large; WGMMA: e4m3 activations). Device-planned calls
 * (grouped_matmul_dev, decode steps of up to 512 tokens) split their groups the same way
 * on the device (the wgmma kernel's device-planned form counts its tiles from the offsets),
 * so a row gets the same result whether its step's plan stayed on the GPU or not, and with
 * expert parallelism. Default 0: every group on the wgmma kernel, so a row's result does
 * not depend on its group's size (what EPLB's expert copies need:
 * epic_ops_experts_invariant), and it is also the faster choice at every size measured
 * (one H200, 256 experts: decode steps of 32 / 128 sequences 4.3 -> 4.0 / 6.5 -> 6.0 ms;
 * from 17 rows on, the MMA kernel, which streams the weights once per 64-row tile on
 * mma.sync, was 2-4x slower). EPIC_CUDA_FP8_MMA_GROUP_ROWS sets it at create. */
enum { EPIC_CUDA_FP8_MMA_GROUP_ROWS_DEFAULT = 0 };
epic_status epic_ops_cuda_set_mma_group_rows(epic_ops *o, int64_t rows);
int64_t epic_ops_cuda_mma_group_rows(epic_ops *o);
enum { EPIC_CUDA_FP8_SKINNY_MAX_M = 2, EPIC_CUDA_FP8_SKINNY_MAX_BYTES = 256 << 20 };
typedef enum {
  EPIC_CUDA_FP8_SMALL_MMA = 0,
  EPIC_CUDA_FP8_SMALL_FP32 = 1,
} epic_cuda_fp8_small;
epic_status epic_ops_cuda_set_fp8_small(epic_ops *o, epic_cuda_fp8_small k);

/* How many streams ("lanes") grouped_matmul runs the cuBLASLt GEMMs of its FP8 groups
 * above the small-group bound on (those the large-group kernel does not take: LANES
 * chosen, or shapes or strides it refuses), side by side after one quantisation launch (a
 * prefill step's experts: one GEMM of a few hundred rows fills a fraction of the GPU). 0:
 * one after another on the backend's stream, each
 * behind its own quantisation (the per-group path; for benchmarks and cross-checks).
 * Default EPIC_CUDA_LT_LANES_DEFAULT; the environment variable EPIC_CUDA_GROUPED_LANES
 * sets it at create. A lane (created on first use) is a stream and an event. The lanes'
 * GEMMs take cuBLASLt algorithms chosen without workspace (no split-K): e4m3 activations
 * as on the per-group path, possibly another summation order. EPIC_ERR_INVALID outside
 * 0..EPIC_CUDA_LT_LANES_MAX. */
enum { EPIC_CUDA_LT_LANES_MAX = 8, EPIC_CUDA_LT_LANES_DEFAULT = 4 };
epic_status epic_ops_cuda_set_grouped_lanes(epic_ops *o, int lanes);

/* Which kernel multiplies the FP8 groups above the small-group bound (a prefill step's
 * experts, after one quantisation launch of their rows, e4m3 with 1x128 scales). WGMMA
 * (default): one persistent launch per EPIC_CUK_WG_GROUPS_MAX groups of kern_fp8_wgmma.cu
 * (TMA-fed FP8 wgmma, block scales applied per 128 columns in fp32), where its shapes allow.
 * LANES: cuBLASLt GEMMs per group on the lanes above. EPIC_CUDA_GROUPED_LARGE=wgmma|lanes
 * sets it at create. */
typedef enum {
  EPIC_CUDA_GROUPED_LARGE_WGMMA = 0,
  EPIC_CUDA_GROUPED_LARGE_LANES = 1,
} epic_cuda_grouped_large;
epic_status epic_ops_cuda_set_grouped_large(epic_ops *o, epic_cuda_grouped_large k);
/* How many times the WGMMA kernel was launched so far (tests and benchmarks check that the
 * path they time or check is the one taken). */
int64_t epic_ops_cuda_wgmma_launches(epic_ops *o);
/* How the WGMMA kernel's host-planned launches walk their 128 x 256 tiles (the same bits
 * either way). AUTO (default): HALF where the groups average at most 192 rows, else WHOLE.
 * HALF: a group's last tile of at most 64 rows on both consumer warpgroups (each on all
 * its rows and half its columns), tiles in a dynamic order; WHOLE: whole tiles in a static
 * order. For tests and benchmarks; EPIC_CUDA_WGMMA_FORM=auto|half|whole sets it at
 * create. */
typedef enum {
  EPIC_CUDA_WGMMA_AUTO = 0,
  EPIC_CUDA_WGMMA_HALF = 1,
  EPIC_CUDA_WGMMA_WHOLE = 2,
} epic_cuda_wgmma_form;
epic_status epic_ops_cuda_set_wgmma_form(epic_ops *o, epic_cuda_wgmma_form f);
/* The thin form (on by default): a host-planned launch of one group of at most 16 rows
 * whose narrow tiles would not fill the SMs (the invariant precision's dense FP8 weights at
 * decode sizes) runs on CTAs of 16 weight rows over all of k instead of 128-row tiles: the
 * tiled forms' bits (kern_fp8_wgmma.cu). For tests and benchmarks;
 * EPIC_CUDA_WGMMA_THIN=on|off sets it at create. _thin_launches counts them. */
epic_status epic_ops_cuda_set_wgmma_thin(epic_ops *o, int on);
int64_t epic_ops_cuda_wgmma_thin_launches(epic_ops *o);
/* The invariant precision's head_gemm_bf16 (on by default): one mma.sync launch per call at
 * every token count where the shape allows (kern_head_gemm.cu), instead of zero-padded
 * chunks of EPIC_CUDA_INVARIANT_ROWS tokens through cuBLAS (off, and shapes it does not
 * take); both row-invariant, with different bits. For tests and benchmarks;
 * EPIC_CUDA_HEAD_ROWS=on|off sets it at create. */
epic_status epic_ops_cuda_set_head_rows(epic_ops *o, int on);

/* Whole-backend precision. FAST (the backend's default; the engine commands take INVARIANT
 * where MTP drafting is auto and the model has an MTP layer: epic_cluster_default_precision):
 * the paths described above. EXACT: BF16 and
 * FP8 weights are dequantised to fp32 and multiplied by cuBLAS SGEMM (fp32
 * activations, no TF32), KV caches created from then on keep fp32 rows and MLA decode
 * runs 3xTF32, so a model matches the CPU reference to fp32 rounding (for parity checks;
 * weights are read twice). EXACT is also row-invariant (epic_ops_rows_invariant): every
 * matmul, grouped or per head, runs its rows in zero-padded chunks of one fixed size
 * through one GEMM shape, and MLA decode splits each query's keys at fixed chunk
 * boundaries (by its own key count), so a row's result does not depend on the other rows
 * of its call (what MTP's verify forward needs to match the plain decode bit for bit).
 * INVARIANT: the fast precision's numerics class (e4m3 / bf16 activations, bf16 cache)
 * made row-invariant like EXACT, at fast-kernel speed in decode:
 * - FP8 weights the expert kernel takes (kern_fp8_wgmma.cu), dense ones included, go
 *   through it as one group at every row count (e4m3 activations quantised per row, the
 *   block-scaled sum in one fixed order: the kernel's own row invariance), instead of
 *   the skinny / tensor-core kernels and cuBLASLt, whose choice and rounding follow m;
 * - other weights (BF16, F32, F16, other FP8 layouts), dense or per expert, run their
 *   rows in zero-padded chunks of EPIC_CUDA_INVARIANT_ROWS through one cuBLAS shape
 *   (bf16 activations for BF16 / FP8 weights, fp32 for F32 and F16; a BF16 weight such as
 *   the LM head in one GEMM per chunk, others in parts of 64 MB of weights);
 * - head_gemm_bf16 runs its own mma.sync kernel at every token count (x rounded to bf16,
 *   fp32 sums chained in k order: epic_ops_cuda_set_head_rows), or, for shapes it does
 *   not take, EPIC_CUDA_INVARIANT_ROWS tokens at a time through one cuBLAS bf16 batched
 *   shape; head_gemm as EXACT;
 * - the BF16-cache decode kernel cuts each query's keys at EXACT's fixed boundaries and
 *   always merges its splits (no direct single-split form).
 * What it costs against FAST: kernels/cuda/NOTES.md. MTP drafting is on by default here
 * (epic_ops_rows_invariant), as in EXACT.
 * The environment variable EPIC_CUDA_PRECISION=fast|exact|invariant sets it at create. */
typedef enum {
  EPIC_CUDA_PREC_FAST = 0,
  EPIC_CUDA_PREC_EXACT = 1,
  EPIC_CUDA_PREC_INVARIANT = 2,
} epic_cuda_precision;

/* Rows per chunk of the invariant precision's cuBLAS GEMMs (see above): one chunk covers
 * a decode step of up to this many rows, so its weights are read once. */
#define EPIC_CUDA_INVARIANT_ROWS 128
epic_status epic_ops_cuda_set_precision(epic_ops *o, epic_cuda_precision p);
/* The precision o computes in now (the environment's at create, or the last set). */
epic_cuda_precision epic_ops_cuda_get_precision(epic_ops *o);

typedef enum {
  EPIC_CUDA_MM_INVALID = 0,
  EPIC_CUDA_MM_SGEMM,        /* F32 weight, cuBLAS fp32 */
  EPIC_CUDA_MM_BF16,         /* BF16 weight, bf16 activations, cuBLAS */
  EPIC_CUDA_MM_FP8_LT,       /* FP8 weight, e4m3 activations, cuBLASLt block-scaled, fp32 out */
  EPIC_CUDA_MM_FP8_LT_BF16,  /* same, bf16 output widened to fp32 (cuBLASLt had no fp32 out) */
  EPIC_CUDA_MM_DEQUANT_BF16, /* FP8 weight dequantised to bf16 per row chunk, cuBLAS bf16 */
  EPIC_CUDA_MM_DEQUANT_F32,  /* F16 weight dequantised to fp32 per row chunk, cuBLAS fp32 */
  EPIC_CUDA_MM_FP8_SKINNY,   /* FP8 weight, m <= 4 fp32 tokens: own weight-streaming kernel */
  EPIC_CUDA_MM_FP8_MMA,      /* FP8 weight, m <= 64 bf16-rounded tokens: own tensor-core kernel */
  EPIC_CUDA_MM_EXACT_ROWS,   /* exact precision, any weight: fp32 rows in fixed-size chunks */
  EPIC_CUDA_MM_FP8_WGMMA,    /* invariant precision, FP8: the expert kernel, one group */
  EPIC_CUDA_MM_FAST_ROWS,    /* invariant precision, other weights: fixed-size row chunks */
} epic_cuda_mm_path;

/* The path matmul takes for this weight and token count (may run a cuBLASLt
 * heuristic query the first time; never launches work). */
epic_cuda_mm_path epic_ops_cuda_matmul_path(epic_ops *o, const epic_weight *w, int64_t m,
                                            int64_t ldy);
const char *epic_cuda_mm_path_name(epic_cuda_mm_path p);

#endif
