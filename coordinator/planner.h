/* Planner: where every routed expert and every byte of a DeepSeek-V3 model goes on
 * an expert-parallel cluster of N ranks (DESIGN §2, §7), computed from config.json
 * alone (no weights are read).
 *
 * What it computes:
 * - Exact checkpoint bytes of every weight class, with the dtypes of the released
 *   checkpoint (ARCHITECTURE §3): when quantization_config is fp8, every attention
 *   projection, dense MLP, routed and shared expert is F8_E4M3 (1 B) plus an F32
 *   weight_scale_inv of [ceil(rows/b0), ceil(cols/b1)] (b = weight_block_size);
 *   otherwise BF16. Embeddings, lm_head, norms, router gate and MTP eh_proj are
 *   BF16; e_score_correction_bias is F32. For the 671B config the total (MTP included,
 *   with its embed_tokens / shared_head.head copies) is 688,574,839,360 bytes.
 * - Expert placement per MoE layer (the MTP layer too when planned): by default
 *   contiguous blocks, each rank holding floor(E/N) or ceil(E/N) experts; the E mod N
 *   larger blocks are dealt round-robin from layer to layer, so the experts a rank holds
 *   over all layers differ from rank to rank by at most one (equal memory per rank).
 *   With n_redundant = R > 0 and load statistics, each such layer gets R extra copies
 *   of its hottest experts (repeatedly the expert with the most tokens per copy, at
 *   most one copy per rank; each copy of expert e is assumed to serve
 *   count[e]/copies[e] tokens), then every copy, heaviest first, goes to the least
 *   loaded rank that does not hold that expert yet and has fewer than
 *   ceil((E+R)/N) slots (longest-processing-time). That is the global policy; the
 *   hierarchical one (nodes of ranks_per_node ranks) first spreads the n_group expert
 *   groups of group-limited routing over the nodes (heaviest group to the least loaded
 *   node with room, n_group / n_nodes groups each; without groups every expert is its
 *   own group), so a token's topk_group groups touch few nodes, then replicates and
 *   packs each node's experts on its own ranks the same way, with R / n_nodes copies
 *   per node (the remainder to the heaviest nodes) and at most
 *   ceil((E / n_nodes + ceil(R / n_nodes)) / ranks_per_node) slots per rank.
 * - Per-rank memory: replicated weights (embedding, lm_head, attention, dense MLPs,
 *   shared experts, norms, router gates, and when MTP is planned its attention,
 *   shared expert, norms, eh_proj and its embed/head copies, which worker/model.c
 *   loads), the rank's routed experts, an activation/workspace reserve, the memory
 *   set aside for run-time EPLB copies (below), and the KV cache budget =
 *   gpu_mem - weights - reserve - EPLB.
 *
 * Run-time EPLB (coordinator/eplb.h, the engine's --eplb-redundant R): between steps
 * the engine re-places the experts with R extra copies per MoE layer, so a rank may
 * come to hold more experts than the plan gives it. With eplb_redundant = R > 0 the
 * plan sets aside, per rank,
 *   eplb_slots = (n_moe + 1) * S - expert_slots,   eplb_bytes = eplb_slots * expert
 * (0 when negative), n_moe = MoE layers planned, S = the most experts a re-placement
 * gives a rank in one layer: ceil((E + R) / N) for the global policy; for the
 * hierarchical one, when it applies to R (else the engine falls back to global),
 * ceil((E / n_nodes + ceil(R / n_nodes)) / ranks_per_node). The one layer more is the
 * re-placement itself: worker/model.c loads a layer's new experts before it frees
 * that layer's old ones, one layer at a time.
 *
 * Reserve (documented formula, bytes):
 *   reserve = 2 GiB (CUDA context, library workspaces, allocator slack)
 *           + T * ( 2 * (6*D + H*(qk_head_dim + v_head_dim) + 2*top_k*D
 *                        + 3*max(intermediate_size, top_k*moe_intermediate_size))
 *                   + 4 * vocab_size )
 *           + per layer 2 * H*(qk_nope_head_dim + v_head_dim)*kv_lora_rank
 *           + per MoE (and MTP) layer 4 * E*D
 *   with T = max_batch_tokens: bf16 hidden-state buffers, the per-head q/k/v of the
 *   naive prefill form, the MoE dispatch + combine buffers, the widest FFN
 *   intermediate (gate, up, product) and fp32 logits for every token of a step; then the
 *   model's derived copies: kv_b's per-head slices (the absorbed attention) at
 *   head_elem_bytes per element and the router in fp32.
 * KV cache: (kv_lora_rank + qk_rope_head_dim) * kv_elem_bytes (default 2: BF16) per token per attention
 *   layer (num_hidden_layers, plus the MTP layers when planned); kv_tokens =
 *   kv_budget / that.
 * Fit: a rank fits iff its KV budget holds at least max(4096, max_batch_tokens)
 *   tokens (one 4K-token sequence and one full step); the plan fits iff every rank
 *   does. With gpu_mem_bytes = 0 there is no fit check (every rank "fits").
 *
 * Load statistics file (JSON, e.g. dumped by a serving run):
 *   {"layers": {"3": [c_0, ..., c_{E-1}], "4": [...], ...}}
 * Keys are model layer indices of MoE layers (the MTP layer's index
 * num_hidden_layers is accepted, and ignored when MTP is not planned); each value
 * holds E non-negative numbers: tokens routed to each expert. Layers missing from the
 * file keep the default contiguous placement without redundant copies. The same
 * statistics can come from memory instead (load_counts, e.g. a running engine's). 
 *
 * Ownership: epic_plan_create allocates; epic_plan_destroy (NULL-safe) frees. The
 * params and the config are borrowed for the call only. Pointers handed out by the
 * accessors point into the plan and live until epic_plan_destroy.
 * Thread contract: a plan is immutable after creation; every accessor may be
 * called from any number of threads at once. */
#ifndef EPIC_COORDINATOR_PLANNER_H
#define EPIC_COORDINATOR_PLANNER_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "common/status.h"
#include "worker/config.h"

/* Checkpoint bytes by weight class (one copy of everything). */
typedef struct epic_weight_bytes {
  uint64_t embedding; /* model.embed_tokens.weight */
  uint64_t lm_head;   /* lm_head.weight */
  uint64_t attention; /* q/kv/o projections (+scales), q_a/kv_a layernorms, all counted layers */
  uint64_t norms;     /* input/post_attention layernorms of every counted layer + model.norm */
  uint64_t dense_mlp; /* the first_k_dense_replace dense MLPs */
  uint64_t shared_experts; /* every MoE layer's shared expert(s) */
  uint64_t router;         /* mlp.gate.weight (BF16) + e_score_correction_bias (F32) */
  uint64_t routed_experts; /* every routed expert of every counted MoE layer */
  uint64_t mtp_extra;      /* MTP enorm, hnorm, eh_proj, shared_head.norm */
  uint64_t mtp_copies;     /* MTP embed_tokens + shared_head.head (copies of the main ones) */
  uint64_t expert;         /* one routed expert: gate + up + down (+ scales) */
  uint64_t total;          /* sum of every class above except .expert */
  int64_t n_tensors;       /* tensors in the checkpoint (weight_scale_inv counted) */
} epic_weight_bytes;

/* Bytes per class for cfg. include_mtp != 0 counts the num_nextn_predict_layers MTP
 * layers as the checkpoint stores them. EPIC_ERR_INVALID on a NULL argument. */
epic_status epic_weight_bytes_compute(const epic_model_config *cfg, int include_mtp,
                                      epic_weight_bytes *out);

/* Expert placement policy with load statistics (see above). */
typedef enum { EPIC_EPLB_GLOBAL = 0, EPIC_EPLB_HIERARCHICAL = 1 } epic_eplb_policy;
const char *epic_eplb_policy_name(epic_eplb_policy p); /* "global", "hierarchical" */
/* "global" / "hierarchical"; EPIC_ERR_INVALID for anything else. */
epic_status epic_eplb_policy_parse(const char *s, epic_eplb_policy *out);

typedef struct epic_plan_params {
  size_t size;                  /* sizeof(epic_plan_params) */
  const epic_model_config *cfg; /* required */
  int n_ranks;                  /* >= 1 */
  uint64_t gpu_mem_bytes;       /* per rank; 0 = unknown: no KV budget, no fit check */
  int include_mtp;              /* plan the MTP layer(s) too (ignored if the config has none) */
  int n_redundant;              /* extra expert copies per MoE layer (needs load_stats_path) */
  const char *load_stats_path;  /* NULL = none (see the file format above) */
  int64_t max_batch_tokens;     /* tokens per forward step; 0 = EPIC_OPS_DEVICE_STEP_TOKENS
                                   (8192, a GPU worker's default step) */
  /* In-memory statistics instead of a file: [n_load_layers][E] tokens per expert,
   * row l for model layer l (rows of dense layers, rows past the planned layers and
   * all-zero rows are ignored). Borrowed for the call. */
  const double *load_counts;
  int64_t n_load_layers;
  epic_eplb_policy policy; /* placement of layers with statistics; with eplb_redundant
                              also the run-time policy whose bound is set aside */
  int ranks_per_node;      /* hierarchical: ranks of one node, must divide n_ranks */
  /* Run-time EPLB copies per MoE layer to set memory aside for (see above; 0 = none,
   * at most E * (N - 1)); needs no statistics. */
  int eplb_redundant;
  /* Bytes per latent-cache element: the backend's kv_dtype (4 on CPU ranks and in
   * CUDA's exact precision); 0 = 2, the BF16 rows of CUDA's default precision. */
  int kv_elem_bytes;
  /* Bytes per element of kv_b's per-head copies the model keeps for the absorbed attention
   * (epic_ops_head_dtype): 4 on CPU ranks and in CUDA's exact precision; 0 = 2, the BF16
   * copies of CUDA's fast and invariant precisions. */
  int head_elem_bytes;
} epic_plan_params;

typedef struct epic_plan epic_plan;

/* Build a plan. EPIC_ERR_INVALID (one EPIC_LOG_ERROR line saying why) for: unknown
 * params size, NULL cfg, n_ranks < 1, n_redundant < 0 or > E*(N-1), n_redundant > 0
 * without load statistics, a file and load_counts at once, a malformed statistics file
 * or a negative or non-finite count, a hierarchical plan whose ranks_per_node does not
 * divide n_ranks, whose groups do not split evenly over the nodes, or with more copies
 * per node than its ranks can hold; EPIC_ERR_IO if the file cannot
 * be read; EPIC_ERR_NOMEM. Does not block beyond reading the statistics file. */
epic_status epic_plan_create(const epic_plan_params *p, epic_plan **out);
void epic_plan_destroy(epic_plan *plan);

int epic_plan_n_ranks(const epic_plan *plan);
int epic_plan_n_experts(const epic_plan *plan); /* routed experts per MoE layer (E) */
/* Layers the plan covers: model layer indices 0 .. n_layers-1 (num_hidden_layers,
 * plus the MTP layers when planned). */
int epic_plan_n_layers(const epic_plan *plan);
int epic_plan_is_moe_layer(const epic_plan *plan, int layer);

/* Experts rank `rank` holds in `layer` (ascending ids; *n may be 0, e.g. with more ranks
 * than experts, and is 0 for dense layers). EPIC_ERR_INVALID for a layer or rank out of
 * range. */
epic_status epic_plan_rank_experts(const epic_plan *plan, int layer, int rank, const int32_t **ids,
                                   int *n);
/* Ranks holding a copy of `expert` in MoE layer `layer` (ascending, *n >= 1).
 * EPIC_ERR_INVALID for a dense layer or an index out of range. */
epic_status epic_plan_expert_owners(const epic_plan *plan, int layer, int expert,
                                    const int32_t **ranks, int *n);

typedef struct epic_rank_memory {
  uint64_t replicated_bytes; /* non-expert weights every rank holds */
  uint64_t expert_bytes;     /* this rank's routed experts, all layers */
  uint64_t weight_bytes;     /* replicated + expert */
  uint64_t reserve_bytes;    /* activation / workspace reserve */
  int64_t kv_budget_bytes; /* gpu_mem - weights - reserve - eplb (negative: does not fit);
                              0 if unknown */
  int64_t kv_tokens;       /* KV cache capacity in tokens (0 if the budget is <= 0 or unknown) */
  int64_t expert_slots;    /* experts held, summed over layers */
  int fits;                /* 1 if kv_tokens >= epic_plan_min_kv_tokens (or gpu_mem unknown) */
  int64_t eplb_slots;      /* experts more that run-time EPLB may put here (see above) */
  uint64_t eplb_bytes;     /* their bytes, set aside before the KV budget */
} epic_rank_memory;

epic_status epic_plan_rank_memory(const epic_plan *plan, int rank, epic_rank_memory *out);
/* 1 if every rank fits (always 1 when gpu_mem_bytes was 0). */
int epic_plan_fits(const epic_plan *plan);
/* Run-time EPLB: the copies per layer planned for (eplb_redundant) and S, the most
 * experts one layer may put on a rank (0 without copies). */
int epic_plan_eplb_redundant(const epic_plan *plan);
int epic_plan_eplb_layer_slots(const epic_plan *plan);
/* The copies per MoE layer the engine's EPLB uses (coordinator/engine.h
 * eplb_redundant): requested > 0 as given, < 0 none, 0 the default: as many as
 * ranks where the backend's expert rows are invariant (epic_model_experts_invariant:
 * CPU ranks, CUDA ranks on FP8 experts), at most E * (N - 1), else none; none for one
 * rank or a model without routed experts. */
int64_t epic_plan_eplb_copies(int64_t requested, int64_t n_experts, int n_ranks,
                              int experts_invariant);
/* KV bytes per token (all planned attention layers) and the fit threshold in tokens. */
uint64_t epic_plan_kv_bytes_per_token(const epic_plan *plan);
int64_t epic_plan_min_kv_tokens(const epic_plan *plan);
/* Checkpoint bytes of the planned layers (MTP counted iff planned). */
const epic_weight_bytes *epic_plan_weights(const epic_plan *plan);

/* Expert load balance on the statistics (ratios are 0 when there are none). Rank load
 * in a layer = sum over its experts of count[e] / copies[e]. */
typedef struct epic_plan_balance {
  int n_layers;                     /* MoE layers with statistics */
  double max_before, mean_before;   /* summed over those layers: default placement */
  double max_after, mean_after;     /* the plan's placement */
  double ratio_before, ratio_after; /* max / mean (1 = perfect) */
} epic_plan_balance;
/* layer = -1: summed over all layers with statistics; otherwise one MoE layer
 * (n_layers = 0 and all zeros if that layer has no statistics). */
epic_status epic_plan_load_balance(const epic_plan *plan, int layer, epic_plan_balance *out);

/* Max and mean rank load of one layer's placement given as replica lists: expert e
 * has copies on ranks[off[e] .. off[e+1]) and each copy serves counts[e] / copies
 * tokens. EPIC_ERR_INVALID for an expert without a copy or a rank out of range. */
epic_status epic_eplb_load(int n_ranks, int n_experts, const double *counts, const int32_t *off,
                           const int32_t *ranks, double *max, double *mean);

/* One JSON object (ends with a newline): params, weight classes, per-rank memory,
 * placement (per layer, per rank, the experts as ranges "a-b"; layers with identical
 * placement are grouped), balance. EPIC_ERR_IO if writing fails. */
epic_status epic_plan_write_json(const epic_plan *plan, FILE *f);
/* Readable table: one row per rank and a summary line. EPIC_ERR_IO if writing fails. */
epic_status epic_plan_write_table(const epic_plan *plan, FILE *f);

#endif
