/* EPLB at run time: the engine's expert load balancer (DESIGN §7).
 *
 * Every MoE layer of every rank counts the tokens it routes to each expert
 * (epic_model_expert_layer_tokens). Every `interval` steps rank 0 starts a round
 * (EPIC_STEP_OP_PLACE, worker/step_plan.h) between two steps, in which every rank
 *   1. sums its per-layer counts with everyone's (one allreduce),
 *   2. receives rank 0's decision: rank 0 plans a placement with `n_redundant`
 *      extra copies per MoE layer from the counts of the window since the last
 *      round (coordinator/planner.h, global or hierarchical policy) and keeps it
 *      only when the predicted max/mean rank load (summed over layers) drops by at
 *      least `margin` (relative) below that of the placement in force,
 *   3. if kept, applies it (epic_model_set_placement), so the next step already
 *      dispatches to the new copies.
 * Outputs do not change: a row's expert result is the same on any copy.
 *
 * Ownership: create/destroy pair; the model and comm are borrowed and must
 * outlive the balancer. Thread contract: one thread (the engine's driving thread)
 * uses a balancer; epic_eplb_get_stats may be called from any thread. */
#ifndef EPIC_COORDINATOR_EPLB_H
#define EPIC_COORDINATOR_EPLB_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "coordinator/planner.h"
#include "worker/model.h"

typedef struct epic_comm epic_comm;
typedef struct epic_eplb epic_eplb;

typedef struct epic_eplb_params {
  size_t size;             /* sizeof(epic_eplb_params) */
  epic_model *model;       /* expert parallel over comm */
  epic_comm *comm;         /* >= 2 ranks */
  int n_redundant;         /* extra copies per MoE layer, 1 .. E * (ranks - 1) */
  int64_t interval;        /* steps between rounds, >= 1 */
  epic_eplb_policy policy; /* hierarchical: nodes from the ranks' node-local ranks */
  double margin;           /* relative drop of max/mean needed to apply, in [0, 1) */
} epic_eplb_params;

/* Collective (every rank of comm, same parameters: checked against rank 0's). For
 * the hierarchical policy the ranks of a node must be consecutive (as mpirun maps
 * them by default); otherwise, or when the expert groups do not split evenly over
 * the nodes, the policy falls back to global with a warning. EPIC_ERR_INVALID
 * (logged, naming the field) for bad parameters. */
epic_status epic_eplb_create(const epic_eplb_params *p, epic_eplb **out);
void epic_eplb_destroy(epic_eplb *b); /* NULL-safe */

/* Rank 0: 1 when a round is due before step `step_no`. */
int epic_eplb_due(const epic_eplb *b, uint64_t step_no);
/* Every rank, between steps (rank 0 after broadcasting the PLACE header, the others
 * on receiving it): one round as described above. Errors are collective: a rank
 * that fails to load its new experts fails the round everywhere (the old placement
 * stays on ranks that did not switch yet only if every rank failed alike, so the
 * engine treats any error as fatal). */
epic_status epic_eplb_round(epic_eplb *b, uint64_t step_no);

typedef struct epic_eplb_stats {
  int64_t rounds;     /* rounds run */
  int64_t rebalances; /* placements applied */
  double imbalance;   /* predicted max/mean rank load of the placement in force on the
                         last round's window (after applying; 0 before any round) */
  double last_before, last_after; /* of the last applied placement */
} epic_eplb_stats;
void epic_eplb_get_stats(const epic_eplb *b, epic_eplb_stats *out);

#endif
