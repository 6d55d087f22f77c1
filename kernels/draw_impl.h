/* The arithmetic of a seeded draw (kernels/draw.h), shared by the C reference
 * (kernels/draw.c) and the CUDA kernel (kernels/cuda/kern_draw.cu): every float operation
 * is one IEEE operation rounded to nearest on both (CUDA spells the roundings out so
 * that nvcc cannot fuse a multiply and an add; draw.c is built with -ffp-contract=off),
 * and the masses are integers, so both compute the same weights, sums and tokens bit for
 * bit from the same row. Not a public header: draw.h is. */
#ifndef EPIC_KERNELS_DRAW_IMPL_H
#define EPIC_KERNELS_DRAW_IMPL_H

#include <stdint.h>

#ifdef __CUDACC__
#define EPIC_DRAW_FN static __device__ __forceinline__
#define DRAW_MUL(a, b) __fmul_rn(a, b)
#define DRAW_ADD(a, b) __fadd_rn(a, b)
#define DRAW_SUB(a, b) __fsub_rn(a, b)
#define DRAW_DIV(a, b) __fdiv_rn(a, b)
#define DRAW_DMUL(a, b) __dmul_rn(a, b)
#define DRAW_F2U(f) __float_as_uint(f)
#define DRAW_U2F(u) __uint_as_float(u)
#else
#include <math.h>
#include <string.h>
#define EPIC_DRAW_FN static inline
#define DRAW_MUL(a, b) ((a) * (b))
#define DRAW_ADD(a, b) ((a) + (b))
#define DRAW_SUB(a, b) ((a) - (b))
#define DRAW_DIV(a, b) ((a) / (b))
#define DRAW_DMUL(a, b) ((a) * (b))
static inline uint32_t epic_draw_f2u(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}
static inline float epic_draw_u2f(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}
#define DRAW_F2U(f) epic_draw_f2u(f)
#define DRAW_U2F(u) epic_draw_u2f(u)
#endif

/* Histogram digits of the order key: four of 8 bits, most significant first. */
#define EPIC_DRAW_BINS 256

/* The candidate order key: ascending with the logit, NaN lowest, -0 as +0 (equal logits,
 * equal keys). Candidates go by descending key, lower id first among equal keys. */
EPIC_DRAW_FN uint32_t epic_draw_key(float l) {
  if (l != l)
    return 0;
  const uint32_t b = DRAW_F2U(l == 0.0f ? 0.0f : l);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

/* The logit of a key (NaN for key 0). */
EPIC_DRAW_FN float epic_draw_logit(uint32_t key) {
  return DRAW_U2F((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

/* exp(x) for x <= 0 from multiplies and adds alone, so that it rounds alike everywhere
 * (expf differs by an ulp between libm and CUDA): 2^k * p(r) with r = x - k ln 2 (ln 2 in
 * two parts, the first exact in k * it), p the degree-7 Taylor polynomial (error below
 * 2 ulp over |r| <= ln 2 / 2). 0 below -80, where the fixed-point mass is 0 anyway. */
EPIC_DRAW_FN float epic_draw_exp(float x) {
  if (!(x >= -80.0f))
    return 0.0f;
  const float k = floorf(DRAW_ADD(DRAW_MUL(x, 0x1.715476p+0f), 0.5f));
  const float r = DRAW_SUB(DRAW_SUB(x, DRAW_MUL(k, 0x1.62e4p-1f)), DRAW_MUL(k, 0x1.7f7d1cp-20f));
  float p = 0x1.a01a02p-13f;
  p = DRAW_ADD(DRAW_MUL(p, r), 0x1.6c16c2p-10f);
  p = DRAW_ADD(DRAW_MUL(p, r), 0x1.111112p-7f);
  p = DRAW_ADD(DRAW_MUL(p, r), 0x1.555556p-5f);
  p = DRAW_ADD(DRAW_MUL(p, r), 0x1.555556p-3f);
  p = DRAW_ADD(DRAW_MUL(p, r), 0.5f);
  p = DRAW_ADD(DRAW_MUL(p, r), 1.0f);
  p = DRAW_ADD(DRAW_MUL(p, r), 1.0f);
  /* k in [-116, 0]: 2^k is a normal float */
  return DRAW_MUL(p, DRAW_U2F((uint32_t)((int32_t)k + 127) << 23));
}

/* Fixed-point bits of the masses for a row of n: 40, fewer for rows above 2^22 ids, so
 * that a row's total stays below 2^62. */
EPIC_DRAW_FN int epic_draw_shift(int64_t n) {
  int b = 0;
  while (b < 62 && ((int64_t)1 << b) < n)
    b++;
  return 62 - b < 40 ? 62 - b : 40;
}

/* 1 / temperature in float: what the logits' distances are multiplied by. */
EPIC_DRAW_FN float epic_draw_inv_t(float t) {
  return DRAW_DIV(1.0f, t);
}

/* A candidate's mass: exp((l - mx) * inv_t) in float, times 2^shift, truncated (the
 * largest logit's is 2^shift). */
EPIC_DRAW_FN uint64_t epic_draw_mass(float l, float mx, float inv_t, int shift) {
  const float w = epic_draw_exp(DRAW_MUL(DRAW_SUB(l, mx), inv_t));
  return (uint64_t)DRAW_MUL(w, DRAW_U2F((uint32_t)(shift + 127) << 23));
}

/* floor(u * m / 2^64): a uniform 64-bit u scaled into [0, m). */
EPIC_DRAW_FN uint64_t epic_draw_scale(uint64_t u, uint64_t m) {
#ifdef __CUDACC__
  return __umul64hi(u, m);
#else
  const uint64_t a0 = u & 0xffffffffu, a1 = u >> 32, b0 = m & 0xffffffffu, b1 = m >> 32;
  const uint64_t p0 = a0 * b0, p1 = a0 * b1, p2 = a1 * b0, p3 = a1 * b1;
  const uint64_t mid = (p0 >> 32) + (p1 & 0xffffffffu) + (p2 & 0xffffffffu);
  return p3 + (p1 >> 32) + (p2 >> 32) + (mid >> 32);
#endif
}

/* The mass top_p (< 1) asks for out of mk: (uint64) of top_p * mk in double. */
EPIC_DRAW_FN uint64_t epic_draw_top_p_mass(float top_p, uint64_t mk) {
  return (uint64_t)DRAW_DMUL((double)top_p, (double)mk);
}

#endif
