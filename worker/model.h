/* The DeepSeek-V3 model on an epic_ops backend: weights from a checkpoint (or a
 * dummy one), and a batched forward pass over any mix of prefill chunks and
 * decode tokens of several sequences, with the paged latent KV cache.
 *
 * Numerics follow ARCHITECTURE.md: RMSNorm, MLA (naive form for prompt chunks,
 * absorbed form over the paged cache for decode tokens and short chunks after a
 * cached prefix, such as MTP verify steps),
 * interleaved RoPE with YaRN, dense SwiGLU, MoE with the sigmoid router
 * (bias for selection only, group-limited top-k), shared experts, MTP layer.
 * Thread contract: thread-compatible; one thread drives a model at a time. */
#ifndef EPIC_WORKER_MODEL_H
#define EPIC_WORKER_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "../common/status.h"
#include "../kernels/ops.h"
#include "config.h"
#include "kvcache.h"

typedef struct epic_model epic_model;
typedef struct epic_comm epic_comm; /* comm/comm.h */

/* DUMMY: random weights from the config alone; DUMMY_MTP: the same, with the MTP layer
 * set to draft what the main model will mostly pick (epic_checkpoint_set_mtp_successor:
 * MTP benchmarks, whose random layers accept nothing otherwise). */
typedef enum { EPIC_LOAD_AUTO = 0, EPIC_LOAD_DUMMY = 1, EPIC_LOAD_DUMMY_MTP = 2 } epic_load_format;

/* Where the routed experts live (expert parallelism with redundant copies, EPLB):
 * rows 0..num_hidden_layers-1 are the main layers, row num_hidden_layers the MTP
 * layer (rows of dense layers are never routed but must be valid); the copies of
 * expert e of row l are on ranks[off[l * n_experts + e] .. off[l * n_experts + e + 1]),
 * at least one, ascending, each rank at most once. Borrowed by every call. */
typedef struct epic_expert_placement {
  size_t size;         /* sizeof(epic_expert_placement) */
  int64_t n_rows;      /* num_hidden_layers + 1 */
  int64_t n_experts;   /* n_routed_experts */
  const int32_t *off;  /* [n_rows * n_experts + 1], off[0] = 0 */
  const int32_t *ranks;
} epic_expert_placement;

typedef struct epic_model_params {
  size_t size;                  /* sizeof(epic_model_params) */
  const char *dir;              /* model directory (config.json [+ safetensors]) */
  epic_load_format load_format; /* DUMMY: random weights from config.json alone */
  uint64_t seed;                /* dummy weights' seed */
  int64_t num_layers;           /* > 0: override num_hidden_layers (benchmarks) */
  int64_t num_experts;          /* > 0: override n_routed_experts (benchmarks) */
  int load_mtp;                 /* load the MTP layer when the config has one */
  int progress;                 /* report loading progress on stderr */
  /* Expert parallelism (DESIGN §2-3). comm == NULL: this process holds every
   * expert. Otherwise this rank loads only the routed experts it owns and every
   * MoE layer dispatches tokens to the owners and combines the results over comm
   * (borrowed; must outlive the model). expert_owner[l * n_routed_experts + e]
   * is the rank holding expert e of layer l, for l in 0..num_hidden_layers (the
   * last row is the MTP layer); NULL = contiguous blocks (rank r holds experts
   * [r*E/N, (r+1)*E/N)). Every rank must then run each forward in lock-step with
   * the others (a rank without tokens passes n_seqs = 0). The exchanged rows
   * live in the compute backend's memory: on a GPU backend a host-memory comm (mpi,
   * ucx) gets host copies, nccl moves them directly; nccl with the CPU backend is
   * EPIC_ERR_UNSUPPORTED. */
  epic_comm *comm;
  const int32_t *expert_owner;
  /* Instead of expert_owner: a placement with redundant copies (see
   * epic_model_set_placement). */
  const epic_expert_placement *placement;
  /* Benchmarks only, dummy weights only (EPIC_ERR_INVALID otherwise): a synthetic
   * routing skew. Adds -router_skew * log(1 + p) to e_score_correction_bias of the
   * expert with popularity rank p in a fixed pseudo-random order per layer, so a few
   * hot experts take most tokens (Zipf-like). 0 = off. */
  double router_skew;
  /* Decode-step graphs (epic_model_set_step_graphs): 0 = on where the backend records
   * graphs (CUDA), < 0 = off. */
  int step_graphs;
  /* Projections of the same input stored as one weight (q_a with kv_a, an MLP's gate
   * with up) where their layouts allow, so that one matmul computes both: 0 = on where
   * the backend has memory of its own (GPUs: the weights are copied there anyway), < 0 =
   * off, > 0 = on also where the backend reads host memory (the CPU: a second copy of
   * those weights; for tests). Each output is computed as before; a matmul that picks its
   * algorithm by the weight's height (cuBLAS, the CPU's sgemm above
   * EPIC_OPS_CPU_FIXED_ORDER_ROWS rows) may order its sums differently (fp32 rounding). */
  int join_weights;
  /* The absorbed attention's per-head kv_b slices kept in bf16 instead of fp32 (half the
   * bytes a decode step reads for them, and half the memory): 0 = where the backend asks
   * for it (epic_ops_head_dtype: CUDA's fast precision), < 0 = off, > 0 = on wherever the
   * backend has a bf16 head_gemm (the CPU too; for tests; EPIC_ERR_UNSUPPORTED without). */
  int head_bf16;
} epic_model_params;

/* ops is borrowed and must outlive the model. Errors are logged as one line
 * naming the file/tensor (see worker/checkpoint.h). */
epic_status epic_model_load(epic_ops *ops, const epic_model_params *p, epic_model **out);
void epic_model_destroy(epic_model *m); /* NULL-safe */

const epic_model_config *epic_model_get_config(const epic_model *m);
/* The compute backend the model runs on (the ops passed to epic_model_load). */
epic_ops *epic_model_ops(const epic_model *m);
int epic_model_has_mtp(const epic_model *m);
/* Whether the model keeps kv_b's per-head slices in bf16 (epic_model_params.head_bf16). */
int epic_model_head_bf16(const epic_model *m);
/* Whether ops computes a routed expert's rows alike whatever group they land in, for
 * the expert weights a checkpoint of cfg loads (FP8 with its block sizes, or BF16):
 * epic_ops_experts_invariant on their layouts. EPLB copies are on by default where it
 * holds (known before the weights are loaded, for the memory plan). */
int epic_model_experts_invariant(epic_ops *ops, const epic_model_config *cfg);
/* Routed experts of MoE layer `layer` held by this process. */
int64_t epic_model_local_experts(const epic_model *m, int64_t layer);
/* Bytes of weights the model reads (mapped or generated) and of derived buffers. */
size_t epic_model_weight_bytes(const epic_model *m);

/* KV cache shaped for this model: all main layers (mtp = 0) or the MTP layer (mtp = 1). */
epic_status epic_model_kvcache_create(epic_model *m, int mtp, int64_t page_size,
                                      int64_t n_pages, epic_kvcache **out);

/* One sequence's part of a forward batch. */
typedef struct epic_seq_batch {
  const int32_t *tokens; /* n_tokens new tokens (host memory) */
  int64_t n_tokens;      /* >= 1 */
  int64_t start;         /* position of tokens[0]; must equal kv->n_tokens */
  epic_kv_seq *kv;       /* the sequence's cache pages (grown as needed) */
  int all_logits;        /* 1: a logits row per new token; 0: only the last token's row */
  /* 1: an output row per new token for `hidden` (epic_model_forward_pick) while the LM
   * head still runs on the last token's row alone (unless all_logits): what an MTP
   * prefill needs (every position's hidden state, one next token). The logits / picks
   * of the other output rows are undefined. */
  int all_hidden;
  /* MTP only: final-normed main-model hidden rows [n_tokens][hidden] (host memory),
   * row i pairing with tokens[i] (the token after the hidden state's position). */
  const float *hidden;
  /* MTP only, optional (NULL: not wanted; epic_model_forward ignores it): host
   * memory receiving the MTP block's output rows [out rows][hidden] of this
   * sequence (n_tokens rows with all_logits, else the last token's), the state
   * before shared_head.norm. A recursive draft feeds it back as the hidden input
   * of the next position (ARCHITECTURE §12.2). Written after `hidden` was read, so
   * the two may be the same buffer; it may be written even when the call then fails
   * (a caller that retries after a failure must not alias them). */
  float *mtp_out;
  /* Optional (NULL: greedy): the last LM-head row's pick is instead the seeded draw with
   * these parameters (kernels/draw.h; temperature > 0, top_p in (0, 1], top_k >= 0),
   * made where the logits are: picks are then required, and the logits row need not be
   * asked for. Read during the call only. */
  const epic_draw_params *draw;
} epic_seq_batch;

/* Rows of output one sequence's part produces: n_tokens with all_logits or all_hidden,
 * else 1 (its last token's); and a batch's, their sum. */
int64_t epic_seq_out_rows(const epic_seq_batch *b);
int64_t epic_batch_out_rows(const epic_seq_batch *seqs, int n_seqs);

/* Run the main model over the batch; appends the new tokens' keys to each
 * sequence's cache. With expert parallelism the call is collective and n_seqs
 * may be 0 (the rank then only serves its experts to the others). logits: [out_rows][vocab] (host memory, required).
 * hidden: optional [out_rows][hidden] final-normed states (input of the LM head
 * and of the MTP layer). EPIC_ERR_NOMEM if the cache has no room (nothing is
 * changed then); EPIC_ERR_INVALID for a bad token id or position. */
epic_status epic_model_forward(epic_model *m, epic_kvcache *kc, const epic_seq_batch *seqs,
                               int n_seqs, float *logits, float *hidden);

/* A logits row's greedy token (argmax, lowest id on ties) and its log-softmax. */
typedef struct epic_row_pick {
  int32_t id;
  float logprob;
} epic_row_pick;

/* epic_model_forward that also computes, on the backend, every output row's greedy
 * pick (picks: [out_rows], may be NULL) and writes only the logits rows r with
 * need_logits[r] != 0 (need_logits NULL: every row; logits is still required, and rows
 * not needed may or may not be written). On a GPU backend a greedy row then costs 8
 * bytes of download instead of vocab_size * 4. Picks equal epic_argmax and
 * epic_logprob_at on the same row (worker/sampler.h); the CPU backend bit for bit. */
epic_status epic_model_forward_pick(epic_model *m, epic_kvcache *kc, const epic_seq_batch *seqs,
                                    int n_seqs, float *logits, const uint8_t *need_logits,
                                    epic_row_pick *picks, float *hidden);

/* Run the MTP layer: for each sequence, tokens[i] is the token at position
 * start+i+1 of the main sequence and hidden[i] the main model's final-normed
 * state at position start+i (or, drafting recursively, the MTP block output of
 * position start+i-1, see mtp_out); positions start.. are used for RoPE and for
 * the MTP layer's own cache (kc from epic_model_kvcache_create(m, 1, ...)).
 * logits: [out_rows][vocab]; sequences with mtp_out also get the block output. */
epic_status epic_model_mtp_forward(epic_model *m, epic_kvcache *kc, const epic_seq_batch *seqs,
                                   int n_seqs, float *logits);
/* epic_model_mtp_forward with picks and needed rows as in epic_model_forward_pick. */
epic_status epic_model_mtp_forward_pick(epic_model *m, epic_kvcache *kc,
                                        const epic_seq_batch *seqs, int n_seqs, float *logits,
                                        const uint8_t *need_logits, epic_row_pick *picks);

/* Two-micro-batch pipelining (DESIGN §3). With n = 2 a forward splits its
 * sequences into two micro-batches of about equal token counts and runs them
 * interleaved layer by layer, so that one micro-batch's attention and expert
 * compute proceed while the other's dispatch/combine all-to-all is in flight
 * (asynchronous epic_comm_alltoallv_start). Every rank of an expert-parallel
 * model must use the same n (it fixes the number of all-to-alls per layer).
 * Outputs equal n = 1 up to fp32 reassociation. Default 1; EPIC_ERR_INVALID
 * for other values than 1 and 2. */
epic_status epic_model_set_micro_batches(epic_model *m, int n);

/* Decode-step graphs. On a backend that records graphs (epic_ops_has_graphs: CUDA), a
 * single-process forward whose sequences all decode one token, or all verify the same
 * number of MTP drafts (as many rows each, on the decode attention; at most 512 tokens,
 * the device expert plan's bound) is recorded once per bucket and then replayed as one
 * launch. A bucket is: the sequence count, the rows per sequence and LM-head rows, the
 * micro-batch count, the cache, whether greedy picks are asked for, the block-table
 * width rounded up to a power of two, and the longest context rounded up to 1/8 of its
 * power of two (so one graph serves 128 steps of context at 1k, 1024 at 8k): decode
 * attention sizes its work split from that
 * bound in every forward, recorded or not, so a replay gives the bits the forward run
 * directly gives. A bucket's first forward runs directly (it grows the buffers), its
 * second is recorded and launched; any free or move of backend memory drops every
 * graph (epic_ops graph_epoch), as does a new expert placement. A forward the backend
 * refuses to record (a shape without a kernel, the exact precision's host round trips)
 * runs directly from then on. on = 0 turns graphs off (the outputs do not change). */
void epic_model_set_step_graphs(epic_model *m, int on);
/* Decode-step graphs a model keeps; beyond, the least recently used bucket's is freed. */
#define EPIC_MODEL_STEP_GRAPHS 32

/* Where a rank's forward time went, accumulated since load or the last reset
 * (wall-clock seconds on the driving thread). The wait fields are the time the
 * rank sat blocked on an all-to-all, i.e. communication not hidden by compute. */
typedef struct epic_model_stats {
  int64_t forwards;          /* forward calls (main model and MTP) */
  int64_t tokens;            /* tokens this rank processed */
  double total_s;            /* whole forward calls */
  double attention_s;        /* norms, MLA, o_proj */
  double dense_s;            /* dense MLP layers, shared experts, router */
  double experts_s;          /* routed expert GEMMs run on this rank */
  double dispatch_wait_s;    /* blocked on dispatch all-to-alls (counts + rows) */
  double combine_wait_s;     /* blocked on combine all-to-alls */
  double other_s;            /* embedding, final norm, LM head, bookkeeping */
  int64_t dispatch_bytes;    /* bytes this rank sent in dispatch all-to-alls */
  int64_t combine_bytes;     /* bytes this rank sent in combine all-to-alls */
  int64_t a2a_calls;         /* all-to-all operations (dispatch + combine) */
  int64_t expert_rows;       /* (token, expert) rows this rank ran through routed experts */
  int64_t graph_captures;    /* decode-step graphs recorded (epic_model_set_step_graphs) */
  int64_t graph_replays;     /* forwards run by launching a recorded graph; their time is
                                all in other_s (nothing is enqueued phase by phase) */
  double graph_record_s;     /* recording and instantiating those graphs (part of total_s) */
  int64_t mtp_forwards;      /* MTP layer forwards (part of forwards) */
  double mtp_s;              /* their time (part of total_s) */
} epic_model_stats;

void epic_model_get_stats(const epic_model *m, epic_model_stats *out);

/* Tokens this rank routed to each global routed expert since load, summed over the
 * MoE layers (main model and MTP): counts[n_routed_experts]. Each (token, expert)
 * pair counts once, on the rank that owns the token, whichever rank runs the
 * expert: the load statistics for expert placement (DESIGN §7). */
epic_status epic_model_expert_tokens(const epic_model *m, int64_t *counts);
void epic_model_reset_stats(epic_model *m);
/* The same per MoE layer: counts[(num_hidden_layers + 1) * n_routed_experts], row l
 * for owner-table row l (epic_expert_placement). */
epic_status epic_model_expert_layer_tokens(const epic_model *m, int64_t *counts);

/* Move the routed experts to placement p (EPLB). Collective in the sense that every
 * rank must call it with the same p between the same two forwards (no forward in
 * flight on any rank): dispatch then sends each (token, expert) row to one copy of
 * the expert, spreading a rank's rows for an expert evenly over its copies. This
 * rank loads the experts it newly holds (from the checkpoint's mapping or the dummy
 * generator, uploaded on backends without host memory) and frees those it gives
 * up (backend copies; mapped and dummy host weights stay with the checkpoint), one
 * owner-table row at a time: at most one layer's new experts are held beside its
 * old ones (what coordinator/planner.h sets aside for run-time EPLB).
 * Outputs do not change where the backend computes a row's expert result alike on
 * every copy (the CPU backend; see coordinator/engine.c for GPUs). Without comm
 * every expert is local and p is only checked. EPIC_ERR_INVALID (logged, naming
 * the row and expert) for a malformed p, with nothing changed; EPIC_ERR_NOMEM / the
 * checkpoint's errors when loading fails: the rows before the failing one have then
 * moved and the others have not (epic_model_get_placement tells), so the ranks no
 * longer agree unless all failed alike: treat it as fatal. */
epic_status epic_model_set_placement(epic_model *m, const epic_expert_placement *p);
/* The placement in force (pointers into the model, valid until the next
 * set_placement or destroy). EPIC_ERR_INVALID without comm. */
epic_status epic_model_get_placement(const epic_model *m, epic_expert_placement *out);

#endif
