/* The CPU backend posing as a device backend, for tests of the model's device paths on
 * machines without a GPU: the CPU ops with host_visible off, so that a model loaded on
 * them keeps its work arrays in "backend" memory, reads results back through download,
 * plans decode-sized MoE layers on the backend (moe_plan, grouped_matmul_dev, moe_combine
 * through slots) and takes the other host-side paths a GPU backend makes it take. The
 * numerics stay the CPU's. Like the GPU backend's expert kernel, the grouped matmuls
 * compute a row alike whatever group it lands in (grouped_invariant): each group's rows
 * go EPIC_OPS_CPU_FIXED_ORDER_ROWS at a time through the CPU's fixed-order matmul, so
 * expert copies (EPLB) keep every output bit. Header only (the tests that use it link
 * the backends). */
#ifndef EPIC_TEST_DEV_OPS_H
#define EPIC_TEST_DEV_OPS_H

#include <stddef.h>
#include <stdlib.h>

#include "kernels/ops.h"

typedef struct epic_test_dev_ops {
  epic_ops *ops; /* what models are loaded on; ops->vt points into this struct */
  epic_ops_vt vt;
  const epic_ops_vt *cpu_vt;
} epic_test_dev_ops;

static inline const epic_ops_vt *epic_test_dev_cpu_vt(epic_ops *o) {
  const char *vt = (const char *)o->vt;
  return ((const epic_test_dev_ops *)(vt - offsetof(epic_test_dev_ops, vt)))->cpu_vt;
}

/* grouped_matmul with every group cut into chunks of at most
 * EPIC_OPS_CPU_FIXED_ORDER_ROWS rows (the CPU's grouped_matmul_dev comes here too). */
static inline epic_status epic_test_dev_grouped(epic_ops *o, const float *x, int64_t ldx,
                                                const int64_t *off, const int32_t *off_dev,
                                                int64_t n_groups, const epic_weight *w,
                                                int64_t w_stride, float *y, int64_t ldy) {
  const int64_t R = EPIC_OPS_CPU_FIXED_ORDER_ROWS;
  int64_t cap = n_groups + 1;
  if (n_groups < 0 || !off)
    return EPIC_ERR_INVALID;
  for (int64_t g = 0; g < n_groups; g++)
    cap += (off[g + 1] - off[g]) / R;
  int64_t *coff = malloc((size_t)(cap + 1) * sizeof *coff), n = 0;
  epic_weight *cw = malloc((size_t)cap * sizeof *cw); /* chunk n's weight: cw[n] */
  epic_status st = coff && cw ? EPIC_OK : EPIC_ERR_NOMEM;
  if (st == EPIC_OK) {
    coff[0] = off[0];
    for (int64_t g = 0; g < n_groups; g++)
      for (int64_t r = off[g]; r < off[g + 1]; r += R, n++) {
        cw[n] = w[g * w_stride]; /* the op reads only these entries of w */
        coff[n + 1] = r + R < off[g + 1] ? r + R : off[g + 1];
      }
    (void)off_dev; /* host memory here: the CPU reads coff */
    st = epic_test_dev_cpu_vt(o)->grouped_matmul(o, x, ldx, coff, NULL, n, cw, 1, y, ldy);
  }
  free(coff);
  free(cw);
  return st;
}

static inline int epic_test_dev_grouped_invariant(epic_ops *o, const epic_weight *w) {
  (void)o;
  (void)w;
  return 1;
}

/* d must stay where it is until epic_test_dev_ops_close. */
static inline epic_status epic_test_dev_ops_open(epic_test_dev_ops *d) {
  epic_status st = epic_ops_cpu_create(0, &d->ops);
  if (st != EPIC_OK)
    return st;
  d->cpu_vt = d->ops->vt;
  d->vt = *d->cpu_vt;
  d->vt.host_visible = 0;
  d->vt.grouped_matmul = epic_test_dev_grouped;
  d->vt.grouped_invariant = epic_test_dev_grouped_invariant;
  d->ops->vt = &d->vt;
  return EPIC_OK;
}

/* After every model on d->ops is destroyed. */
static inline void epic_test_dev_ops_close(epic_test_dev_ops *d) {
  if (!d->ops)
    return;
  d->ops->vt = d->cpu_vt;
  epic_ops_destroy(d->ops);
  d->ops = NULL;
}

#endif
