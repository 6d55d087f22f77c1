/* CPU matmul y = x . W^T for checkpoint-format weights.
 * Few tokens (decode, small expert batches): each thread streams its share of W's
 * rows once, converting in registers (FP8: through an L1-resident row buffer)
 * and dotting with every token, so W is read from memory exactly once.
 * Many tokens: each OpenMP thread owns a tile of W's rows, dequantises it into its
 * fp32 scratch and runs one single-threaded sgemm writing y[:, tile] for every
 * token. */
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdatomic.h>
#include <string.h>

#include "../../common/log.h"
#include "ops_cpu_impl.h"

/* Up to this many tokens, streaming W once with fused convert-and-dot beats
 * dequantise + sgemm. */
enum { EPIC_CPU_ROWS_MAX_M = EPIC_OPS_CPU_FIXED_ORDER_ROWS };

static inline float bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

/* Exact, branch-free conversions (loops using them vectorise). The source's
 * exponent and mantissa are placed in an fp32 bit pattern with the exponent
 * re-biased, which is exact for normal sources. A subnormal source 0.m * 2^emin is
 * built as 1.m * 2^emin - 2^emin (exact: same binade), so no fp32 subnormal is ever
 * formed: no denormal-operand slowdown, and FTZ/DAZ cannot change results.
 * Selections use integer masks rather than ?: on floats so that the compiler
 * if-converts them. */
static inline float cvt_bf16(uint16_t v) { return bits_f32((uint32_t)v << 16); }

static inline float cvt_f16(uint16_t v) {
  const uint32_t h = v, mag = h & 0x7fffu, rebias = 112u << 23; /* 127 - 15 */
  const uint32_t bn = (mag << 13) + rebias;
  const uint32_t bs = f32_bits(bits_f32(((mag | 0x400u) << 13) + rebias) - 0x1p-14f);
  const uint32_t bi = 0x7f800000u | (mag & 0x3ffu) << 13; /* inf / nan */
  const uint32_t sub = 0u - (uint32_t)(mag < 0x400u), spec = 0u - (uint32_t)(mag >= 0x7c00u);
  uint32_t b = (bs & sub) | (bn & ~sub);
  b = (bi & spec) | (b & ~spec);
  return bits_f32(b | (h & 0x8000u) << 16);
}

static inline float cvt_fp8(uint8_t v8) {                      /* unscaled e4m3fn value */
  const uint32_t v = v8, mag = v & 0x7fu, rebias = 120u << 23; /* 127 - 7 */
  const uint32_t bn = (mag << 20) + rebias;
  const uint32_t bs = f32_bits(bits_f32(((mag | 0x8u) << 20) + rebias) - 0x1p-6f);
  const uint32_t sub = 0u - (uint32_t)(mag < 0x8u), nan = 0u - (uint32_t)(mag == 0x7fu);
  uint32_t b = (bs & sub) | (bn & ~sub);
  b = (0x7fc00000u & nan) | (b & ~nan); /* e4m3fn has no inf; 0x7f/0xff are NaN */
  return bits_f32(b | (v & 0x80u) << 24);
}

static inline float cvt_f32(float v) { return v; }

/* Built for AVX-512 / AVX2 / baseline x86-64 and picked at load time (ifunc), so
 * one binary runs everywhere and still uses wide vectors where they exist. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__SANITIZE_ADDRESS__)
#define EPIC_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define EPIC_CPU_CLONES
#endif

EPIC_CPU_CLONES static void dq_bf16(const uint16_t *s, int64_t n, float *o) {
#pragma omp simd
  for (int64_t c = 0; c < n; c++)
    o[c] = cvt_bf16(s[c]);
}

EPIC_CPU_CLONES static void dq_f16(const uint16_t *s, int64_t n, float *o) {
#pragma omp simd
  for (int64_t c = 0; c < n; c++)
    o[c] = cvt_f16(s[c]);
}

EPIC_CPU_CLONES static void dq_fp8_generic(const uint8_t *s, int64_t n, float scale, float *o) {
#pragma omp simd
  for (int64_t c = 0; c < n; c++)
    o[c] = cvt_fp8(s[c]) * scale;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define EPIC_CPU_HAVE_F16C_PATH 1
/* e4m3 -> f16 is a pure bit move (sign to bit 15, exponent+mantissa shifted up by
 * 7; e4m3 subnormals land on f16 subnormals), the hardware f16 -> f32 conversion is
 * exact, and the 2^8 bias difference is folded into the scale: f * (256 * scale)
 * equals fp8 * scale rounded once, bit for bit the reference result. Eight codes per
 * step, about 4x fewer instructions than the integer-mask conversion. */
__attribute__((target("avx2,f16c"))) static void dq_fp8_f16c(const uint8_t *s, int64_t n,
                                                             float scale, float *o) {
  const __m256 k = _mm256_set1_ps(256.0f * scale);
  const __m128i m7f = _mm_set1_epi16(0x7f), sign = _mm_set1_epi16((short)0x8000);
  const __m128i nan16 = _mm_set1_epi16(0x7e00);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m128i v = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(s + c)));
    const __m128i mag = _mm_and_si128(v, m7f);
    __m128i h = _mm_or_si128(_mm_and_si128(_mm_slli_epi16(v, 8), sign), _mm_slli_epi16(mag, 7));
    h = _mm_or_si128(h, _mm_and_si128(_mm_cmpeq_epi16(mag, m7f), nan16)); /* 0x7f: NaN */
    _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_cvtph_ps(h), k));
  }
  for (; c < n; c++)
    o[c] = cvt_fp8(s[c]) * scale;
}
#endif

static void dq_fp8(const uint8_t *s, int64_t n, float scale, float *o) {
#ifdef EPIC_CPU_HAVE_F16C_PATH
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) {
    dq_fp8_f16c(s, n, scale, o);
    return;
  }
#endif
  dq_fp8_generic(s, n, scale, o);
}

/* Fused convert-and-dot for few tokens: acc[k] = sum_c x[k][c] * cvt(w[c]) for up to
 * four token rows per pass, so each weight element is loaded and converted once
 * for all of them and never stored. Vectorised partial sums (the order differs
 * from sgemm's; both are fp32-accurate). */
#define EPIC_CPU_DEF_DOT(NAME, T, CVT)                                                             \
  EPIC_CPU_CLONES static void NAME(const float *x, int64_t ldx, int64_t m, const T *w, int64_t n,  \
                                   float *acc) {                                                   \
    int64_t i = 0;                                                                                 \
    for (; i + 4 <= m; i += 4) {                                                                   \
      const float *x0 = x + i * ldx, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;               \
      float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;                                            \
      _Pragma("omp simd reduction(+ : a0, a1, a2, a3)") for (int64_t c = 0; c < n; c++) {          \
        const float wc = CVT(w[c]);                                                                \
        a0 += x0[c] * wc;                                                                          \
        a1 += x1[c] * wc;                                                                          \
        a2 += x2[c] * wc;                                                                          \
        a3 += x3[c] * wc;                                                                          \
      }                                                                                            \
      acc[i] = a0;                                                                                 \
      acc[i + 1] = a1;                                                                             \
      acc[i + 2] = a2;                                                                             \
      acc[i + 3] = a3;                                                                             \
    }                                                                                              \
    for (; i + 2 <= m; i += 2) {                                                                   \
      const float *x0 = x + i * ldx, *x1 = x0 + ldx;                                               \
      float a0 = 0.0f, a1 = 0.0f;                                                                  \
      _Pragma("omp simd reduction(+ : a0, a1)") for (int64_t c = 0; c < n; c++) {                  \
        const float wc = CVT(w[c]);                                                                \
        a0 += x0[c] * wc;                                                                          \
        a1 += x1[c] * wc;                                                                          \
      }                                                                                            \
      acc[i] = a0;                                                                                 \
      acc[i + 1] = a1;                                                                             \
    }                                                                                              \
    for (; i < m; i++) {                                                                           \
      const float *x0 = x + i * ldx;                                                               \
      float a0 = 0.0f;                                                                             \
      _Pragma("omp simd reduction(+ : a0)") for (int64_t c = 0; c < n; c++) a0 +=                  \
          x0[c] * CVT(w[c]);                                                                       \
      acc[i] = a0;                                                                                 \
    }                                                                                              \
  }

EPIC_CPU_DEF_DOT(dot_f32, float, cvt_f32)
EPIC_CPU_DEF_DOT(dot_bf16, uint16_t, cvt_bf16)
EPIC_CPU_DEF_DOT(dot_f16, uint16_t, cvt_f16)

/* y[k][r] (stride ldy) = x[k] . W[r] for m <= 8 tokens; rowbuf holds w->cols floats. */
static void dot_row(const epic_weight *w, int64_t r, const float *x, int64_t ldx, int64_t m,
                    float *y, int64_t ldy, float *rowbuf) {
  const int64_t cols = w->cols;
  float acc[EPIC_CPU_ROWS_MAX_M];
  switch (w->dtype) {
  case EPIC_DT_F32: dot_f32(x, ldx, m, (const float *)w->data + r * cols, cols, acc); break;
  case EPIC_DT_BF16: dot_bf16(x, ldx, m, (const uint16_t *)w->data + r * cols, cols, acc); break;
  case EPIC_DT_F16: dot_f16(x, ldx, m, (const uint16_t *)w->data + r * cols, cols, acc); break;
  case EPIC_DT_F8E4M3:
    /* The e4m3 conversion is ALU-heavy without F16C vectors: dequantise once into
     * the thread's L1-resident row buffer, then dot every token with it. */
    epic_cpu_dequant_rows(w, r, 1, rowbuf);
    dot_f32(x, ldx, m, rowbuf, cols, acc);
    break;
  default:
    for (int64_t k = 0; k < m; k++)
      acc[k] = 0.0f;
    break;
  }
  for (int64_t k = 0; k < m; k++)
    y[k * ldy + r] = acc[k];
}

void epic_cpu_dequant_rows(const epic_weight *w, int64_t r0, int64_t n, float *out) {
  const int64_t cols = w->cols;
  for (int64_t i = 0; i < n; i++) {
    const int64_t r = r0 + i;
    float *o = out + i * cols;
    switch (w->dtype) {
    case EPIC_DT_F32:
      memcpy(o, (const float *)w->data + r * cols, (size_t)cols * sizeof(float));
      break;
    case EPIC_DT_BF16: dq_bf16((const uint16_t *)w->data + r * cols, cols, o); break;
    case EPIC_DT_F16: dq_f16((const uint16_t *)w->data + r * cols, cols, o); break;
    case EPIC_DT_F8E4M3: {
      const uint8_t *s = (const uint8_t *)w->data + r * cols;
      const int64_t bc = w->block_cols, nbc = (cols + bc - 1) / bc;
      const float *sc = w->scale_inv + (r / w->block_rows) * nbc;
      for (int64_t b = 0; b < nbc; b++) {
        const int64_t c0 = b * bc, len = cols - c0 < bc ? cols - c0 : bc;
        dq_fp8(s + c0, len, sc[b], o + c0);
      }
      break;
    }
    default: memset(o, 0, (size_t)cols * sizeof(float)); break;
    }
  }
}

static int weight_ok(const epic_weight *w) {
  if (!w || !w->data || w->rows < 0 || w->cols <= 0) return 0;
  switch (w->dtype) {
  case EPIC_DT_F32:
  case EPIC_DT_BF16:
  case EPIC_DT_F16: return 1;
  case EPIC_DT_F8E4M3: return w->scale_inv && w->block_rows > 0 && w->block_cols > 0;
  default: return 0;
  }
}

static epic_status matmul_rows(epic_cpu_ops *c, const float *x, int64_t ldx, int64_t m,
                               const epic_weight *w, float *y, int64_t ldy) {
  const int64_t rows = w->rows, chunk = 16; /* 16 rows: one cache line of y per token */
  const int64_t n_chunks = (rows + chunk - 1) / chunk;
  const int need_buf = w->dtype == EPIC_DT_F8E4M3;
  int nt = c->n_threads;
  if (nt > n_chunks) nt = (int)n_chunks;
  atomic_int failed = 0;
#pragma omp parallel num_threads(nt)
  {
    float *buf = need_buf ? epic_cpu_scratch_get(c, omp_get_thread_num(), (size_t)w->cols) : NULL;
    if (need_buf && !buf) atomic_store(&failed, 1);
#pragma omp for schedule(dynamic, 4)
    for (int64_t ch = 0; ch < n_chunks; ch++) {
      if (need_buf && !buf) continue;
      const int64_t r1 = (ch + 1) * chunk < rows ? (ch + 1) * chunk : rows;
      for (int64_t r = ch * chunk; r < r1; r++)
        dot_row(w, r, x, ldx, m, y, ldy, buf);
    }
  }
  return atomic_load(&failed) ? EPIC_ERR_NOMEM : EPIC_OK;
}

epic_status epic_cpu_matmul(epic_ops *o, const float *x, int64_t ldx, int64_t m,
                            const epic_weight *w, float *y, int64_t ldy) {
  if (!weight_ok(w) || !x || !y || m < 0 || ldx < w->cols || ldy < w->rows) {
    EPIC_LOG_ERROR("matmul: invalid arguments (dtype %s, W [%lld, %lld], m %lld)",
                   w ? epic_dtype_name(w->dtype) : "?", w ? (long long)w->rows : -1LL,
                   w ? (long long)w->cols : -1LL, (long long)m);
    return EPIC_ERR_INVALID;
  }
  if (m == 0 || w->rows == 0) return EPIC_OK;
  epic_cpu_ops *c = epic_cpu_of(o);
  const int64_t rows = w->rows, cols = w->cols;
  if (m <= EPIC_CPU_ROWS_MAX_M) return matmul_rows(c, x, ldx, m, w, y, ldy);
  /* Many tokens: tiles large enough to amortise sgemm's re-packing of x per tile
   * (for m >= 256 a 512-row tile gets within ~2% of one whole-matrix sgemm, 128
   * rows within ~10%), bounded to 16 MiB of scratch per thread and to at least two
   * tiles per thread for balance. FP8 tiles stay multiples of the scale block. */
  int64_t tile = 128;
  if (m >= 256)
    while (tile < 512 && 2 * tile * cols * 4 <= (16 << 20) &&
           (rows + 2 * tile - 1) / (2 * tile) >= 2 * (int64_t)c->n_threads)
      tile *= 2;
  if (w->dtype == EPIC_DT_F8E4M3 && w->block_rows >= 32 && w->block_rows <= 256 &&
      tile % w->block_rows != 0)
    tile = w->block_rows;
  const int64_t n_tiles = (rows + tile - 1) / tile;
  const int is_f32 = w->dtype == EPIC_DT_F32;
  int nt = c->n_threads;
  if (nt > n_tiles) nt = (int)n_tiles;
  atomic_int failed = 0;

#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    float *buf = is_f32 ? NULL : epic_cpu_scratch_get(c, tid, (size_t)(tile * cols));
    if (!is_f32 && !buf) atomic_store(&failed, 1);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < n_tiles; t++) {
      if (!is_f32 && !buf) continue;
      const int64_t r0 = t * tile, nr = rows - r0 < tile ? rows - r0 : tile;
      const float *wt;
      if (is_f32) {
        wt = (const float *)w->data + r0 * cols;
      } else {
        epic_cpu_dequant_rows(w, r0, nr, buf);
        wt = buf;
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, (int)nr, (int)cols, 1.0f, x,
                  (int)ldx, wt, (int)cols, 0.0f, y + r0, (int)ldy);
    }
  }
  if (atomic_load(&failed)) return EPIC_ERR_NOMEM;
  return EPIC_OK;
}
