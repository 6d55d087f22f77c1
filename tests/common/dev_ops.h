/* The CPU backend posing as a device backend, for tests of the model's device paths on
 * machines without a GPU: the CPU ops with host_visible off, so that a model loaded on
 * them keeps its work arrays in "backend" memory, reads results back through download,
 * plans decode-sized MoE layers on the backend (moe_plan, grouped_matmul_dev, moe_combine
 * through slots) and takes the other host-side paths a GPU backend makes it take. The
 * numerics stay the CPU's. Header only (the tests that use it link the backends). */
#ifndef EPIC_TEST_DEV_OPS_H
#define EPIC_TEST_DEV_OPS_H

#include "kernels/ops.h"

typedef struct epic_test_dev_ops {
  epic_ops *ops; /* what models are loaded on; ops->vt points into this struct */
  epic_ops_vt vt;
  const epic_ops_vt *cpu_vt;
} epic_test_dev_ops;

/* d must stay where it is until epic_test_dev_ops_close. */
static inline epic_status epic_test_dev_ops_open(epic_test_dev_ops *d) {
  epic_status st = epic_ops_cpu_create(0, &d->ops);
  if (st != EPIC_OK)
    return st;
  d->cpu_vt = d->ops->vt;
  d->vt = *d->cpu_vt;
  d->vt.host_visible = 0;
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
