/* Seeded draws from a logits row by temperature, top-k and top-p, defined with integer
 * masses so that every backend draws the same token from the same row bits: the host's
 * sampler (worker/sampler.c), the CPU backend's row_draw and the CUDA kernel behind it.
 *
 * The distribution, for temperature t > 0:
 * - candidates in order of descending logit, lower id first on equal logits;
 * - mass of a candidate: exp((logit - max) * (1 / t)) in float (kernels/draw_impl.h
 *   spells out the exponential, so that it rounds alike everywhere) in fixed point with
 *   2^shift for 1 (shift = 40 for rows up to 2^22 ids), truncated;
 * - top_k > 0: the first top_k candidates are kept;
 * - top_p < 1: of those, the shortest run from the first whose mass reaches
 *   floor(top_p * their mass) (at least one);
 * - the token: the kept candidate where the running mass in candidate order first
 *   exceeds floor(u * kept mass / 2^64), u the draw's 64-bit random value.
 * Every sum is exact (integers), so no order of summation can change a token. */
#ifndef EPIC_KERNELS_DRAW_H
#define EPIC_KERNELS_DRAW_H

#include <stddef.h>
#include <stdint.h>

/* One row's draw (backend memory for row_draw, 24 bytes, 8-byte aligned). */
typedef struct epic_draw_params {
  float temperature; /* > 0: draw; 0: row_draw keeps the row's greedy pick */
  float top_p;       /* (0, 1]; 1: off */
  int32_t top_k;     /* >= 0; 0: off */
  uint32_t reserved; /* 0 */
  uint64_t u;        /* the draw's uniform random value */
} epic_draw_params;

/* Bytes of scratch epic_draw_row and epic_draw_kept need for a row of n. */
size_t epic_draw_scratch_bytes(int64_t n);

/* The token drawn from l[0..n) (n >= 1, p->temperature > 0, top_p in (0, 1], top_k >= 0;
 * not checked). A row whose masses are all 0 (its largest logit infinite or NaN) gives
 * its greedy pick (the first largest). scratch: epic_draw_scratch_bytes(n) bytes,
 * 8-byte aligned. */
int32_t epic_draw_row(const float *l, int64_t n, const epic_draw_params *p, void *scratch);

/* The candidates a draw from l keeps (u unused): their ids in ascending order in ids[],
 * their masses in mass[] (ids and mass with room for n), *total the kept mass; returns how
 * many; *shift: the masses' fixed-point bits. */
int64_t epic_draw_kept(const float *l, int64_t n, const epic_draw_params *p, void *scratch,
                       int32_t *ids, uint64_t *mass, uint64_t *total, int *shift);

#endif
