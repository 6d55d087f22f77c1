/* DeepSeek-V3 forward pass on epic_ops. See model.h for the contract and
 * ARCHITECTURE.md for the numerics this reproduces. */
#define _GNU_SOURCE
#include "model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../comm/comm.h"
#include "../common/clock.h"
#include "../common/log.h"
#include "checkpoint.h"

/* Weights per routed expert in layer_w.experts: gate, up, down and gate_up. On backends
 * without host memory, gate and up are uploaded into one block when their layouts allow
 * (same dtype and width, block scales that do not straddle the seam): gate_up then
 * views it as one [2 x moe_intermediate_size][hidden] weight, and gate and up view its
 * halves, so that expert_ffn runs both projections as one grouped matmul (half the
 * launches and GEMMs, one activation quantisation or conversion). gate_up is zeroed
 * otherwise. */
enum { EXPERT_GATE = 0, EXPERT_UP = 1, EXPERT_DOWN = 2, EXPERT_GATE_UP = 3, EXPERT_W = 4 };

typedef struct layer_w {
  int64_t index; /* tensor-name index in the checkpoint */
  int64_t slot;  /* row of the expert-owner table: 0..L-1, L for the MTP layer */
  float *attn_norm, *ffn_norm, *q_a_norm, *kv_a_norm;
  epic_weight q_a, q_b, q_proj, kv_a, kv_b, o_proj;
  /* q_a and kv_a in one block of backend memory (place_joined): one matmul of the
   * normed input for both; zeroed where they could not be joined (and on host backends). */
  epic_weight qkv_a;
  /* kv_b dequantised [H*(nope+v)][lora] for the absorbed form, in fp32 or (head_bf16)
   * rounded to bf16: one of the two is set. */
  float *kv_b_f32;
  uint16_t *kv_b_bf16;
  float *router_f32; /* GPU backends: the router weight in fp32 (see load_layer) */
  int moe;
  /* Dense MLP (moe == 0) or shared experts (moe && has_mlp). */
  int has_mlp;
  epic_weight gate, up, down;
  epic_weight gate_up; /* gate and up joined like qkv_a, or zeroed */
  int64_t mlp_width;
  epic_weight router;
  float *router_bias;   /* NULL when the checkpoint has no e_score_correction_bias */
  epic_weight *experts; /* [n_routed_experts][EXPERT_W]: see EXPERT_W */
} layer_w;

typedef struct mtp_w {
  epic_weight embed, eh_proj, head;
  float *enorm, *hnorm, *head_norm;
  layer_w layer;
} mtp_w;

/* Grow-only host buffers (see xbuf), per micro-batch slot: its counts, routing
 * plan and host staging of its exchange, which stay in use while its all-to-all
 * is in flight and the other micro-batch computes; and, in slot 0 only, work
 * space that one micro-batch uses at a time. */
enum {
  XB_CNT, XB_IDS, XB_PLAN, XB_HSEND, XB_HRECV, XB_ECNT, /* per micro-batch */
  XB_ARGS, XB_REXP, XB_ORDER, XB_EOFF, XB_GPLAN, XB_FWD, XB_COPY, XB_SOFF, XB_SWL,
  XB_DEST, XB_HIDDEN, /* shared */
  XB_N
};
/* Grow-only buffers in backend memory (see dbuf), the same way: a micro-batch's
 * exchange rows and expert results, then the experts' shared work space. */
enum {
  DB_SEND, DB_RECV, DB_OUT, DB_BACK, DB_PLAN, DB_SLOT, /* per micro-batch */
  DB_GPLAN, DB_X, DB_G, DB_U, DB_Y, DB_IOTA,           /* shared work space */
  DB_N
};
#define MAX_MB 2

/* One decode-step bucket: its key, and its graph once recorded. per_seq: rows per
 * sequence (1 for decoding, 1 + drafts for an MTP verify), out_rows: LM-head rows. */
typedef struct step_graph {
  int used; /* 0: free entry */
  const void *kc;
  int64_t n_seqs, stride, bound, per_seq, out_rows;
  int n_mb, pick, draw;
  epic_ops_graph *graph; /* NULL: run directly once (warm-up), recorded next time */
  int warm;              /* run directly once: buffers grown, tables built */
  int refused;           /* the backend would not record it: run directly */
  int64_t expert_rows;   /* what one forward adds to stats.expert_rows */
  uint64_t tick;         /* last use, for LRU */
} step_graph;

/* Per-forward scratch, carved from one grow-only device block. The rows that
 * live across an MoE layer's phases (residual h, MoE input a and output y,
 * positions, ids, routing) are whole-batch arrays of which each micro-batch
 * sees its slice; the rest is work space one micro-batch uses at a time. */
typedef struct scratch {
  float *h, *a, *y, *hn, *rows, *x2, *w;
  int32_t *pos, *ids, *idx; /* pos / ids point into plan */
  int32_t *tok_list; /* per (token, k) item: its row in the dispatch */
  int32_t *plan;     /* the forward's index arrays (see fwd_plan), uploaded once */
  float *logits;     /* LM-head output before download (backends without host memory) */
  int32_t *pick;     /* row_pick output: ids [out_rows], then logprobs [out_rows] (float bits) */
  float *q, *cq, *kv, *attn_o, *tmp, *g, *rl; /* work space from here on */
  float *q_abs, *q_pe, *ctx, *lat, *kpe, *kvb;
} scratch;

struct epic_model {
  epic_ops *ops;
  epic_checkpoint *ck;
  epic_model_config cfg;
  epic_weight embed, lm_head;
  float *final_norm;
  layer_w *layers;
  int64_t mtp_index; /* checkpoint layer index of the MTP module (before --num-layers) */
  int has_mtp;
  mtp_w mtp;
  double *inv_freq;
  float scale;
  size_t derived_bytes;
  void *arena;
  size_t arena_bytes;
  int progress;
  /* Expert parallelism: comm == NULL means every expert is local. */
  epic_comm *comm;
  int rank, nranks;
  /* Exchanges the backend's queue waits for on the device (ordered(), in flight): the
   * host waits for them (drain) before it next waits for the queue, which is where a
   * lost peer is noticed; wait_s: the stat their host wait counts to. */
  struct {
    epic_comm_req *req;
    double *wait_s;
  } queued[2 * MAX_MB];
  int n_queued;
  /* Expert placement (see epic_model_set_placement), rows 0..L-1 and L (MTP):
   * the copies of expert e of row l are on ranks rep_rank[rep_off[l*E+e] ..
   * rep_off[l*E+e+1]) (ascending); held[l*E+e] = 1 when this rank has one. */
  int32_t *rep_off, *rep_rank;
  unsigned char *held;
  /* Expert weight lists replaced by a placement change on a backend without host
   * memory, kept until destroy: a backend may cache per-list device tables keyed
   * by the list's address, so no address may come back with other weights. */
  epic_weight **retired;
  size_t n_retired;
  int64_t *layer_tokens; /* [(L + 1) * E]: see epic_model_expert_layer_tokens */
  void *xbuf[MAX_MB][XB_N];
  size_t xcap[MAX_MB][XB_N];
  void *dbuf[MAX_MB][DB_N];
  size_t dcap[MAX_MB][DB_N];
  /* Weights copied into backend memory (backends without host-visible memory). */
  void **placed;
  size_t n_placed, cap_placed;
  int micro_batches; /* 1 or 2, see epic_model_set_micro_batches */
  int join_weights;  /* place_pair joins: epic_model_params.join_weights resolved */
  int head_bf16;     /* kv_b_bf16 instead of kv_b_f32: epic_model_params.head_bf16 resolved */
  double router_skew; /* epic_model_params.router_skew */
  int64_t *expert_tokens; /* [n_routed_experts]: see epic_model_expert_tokens */
  /* Backend memory [(L + 1) * E]: the counts of the steps whose expert plan was built on
   * the backend (run_experts_dev), added to layer_tokens / expert_tokens when read. */
  int64_t *dev_tokens;
  /* Decode-step graphs (epic_model_set_step_graphs), valid while the backend's
   * graph_epoch is graph_epoch. */
  int step_graphs;
  step_graph graphs[EPIC_MODEL_STEP_GRAPHS];
  uint64_t graph_epoch, graph_tick;
  epic_model_stats stats;
};

/* Largest micro-batch (tokens) whose routed experts are planned on the backend instead
 * of the host (run_experts_dev): decode batches up to the largest the benchmarks run. A
 * token's experts are distinct, so no expert gets more rows than this: the max_rows bound
 * grouped_matmul_dev takes. (The CUDA backend plans any bound on the device with its
 * default kernels; with decode-sized kernels for small groups, EPIC_CUDA_FP8_SMALL_MMA and
 * mma_group_rows > 0, it reads the offsets back above EPIC_CUDA_FP8_MMA_GROUP_MAX_ROWS, and
 * such steps run without a graph.) Larger steps (prefill) plan on the host, where the
 * per-layer round trip is small against their compute. */
#define DEV_PLAN_MAX_TOKENS 512

/* Whether a single-process micro-batch of `tokens` tokens plans its experts on the
 * backend (run_experts_dev): then its MoE layers have no host round trip, which is also
 * what lets a decode step be recorded as a graph. */
static int dev_planned(epic_ops *o, int64_t tokens) {
  return !o->vt->host_visible && epic_ops_has_moe_plan(o) && tokens <= DEV_PLAN_MAX_TOKENS;
}

/* Rows per expert matmul call on host-memory backends (see run_experts): the CPU
 * matmul's fused-dot path (kernels/cpu/ops_cpu_matmul.c, EPIC_CPU_ROWS_MAX_M). */
#define EP_ROW_CHUNK EPIC_OPS_CPU_FIXED_ORDER_ROWS

static int expert_is_local(const epic_model *m, int64_t l, int64_t e) {
  return !m->comm || m->held[l * m->cfg.n_routed_experts + e];
}

/* ---------------------------------------------------------------- loading */

static epic_status load_vec(epic_model *m, const char *name, int64_t n, float **out) {
  epic_status st;
  float *host = malloc((size_t)n * sizeof(float));
  *out = NULL;
  if (!host) return EPIC_ERR_NOMEM;
  EPIC_CHECK_GOTO(epic_checkpoint_vector(m->ck, name, n, host), st, done);
  EPIC_CHECK_GOTO(m->ops->vt->alloc(m->ops, (size_t)n * sizeof(float), (void **)out), st, done);
  EPIC_CHECK_GOTO(m->ops->vt->upload(m->ops, *out, host, (size_t)n * sizeof(float)), st, done);
  m->derived_bytes += (size_t)n * sizeof(float);
done:
  free(host);
  return st;
}

#define LNAME(buf, l, suffix) snprintf(buf, sizeof buf, "model.layers.%lld.%s", (long long)(l), suffix)

/* n bytes of backend memory, freed with the model. */
static epic_status place_alloc(epic_model *m, size_t n, void **out) {
  if (m->n_placed == m->cap_placed) {
    size_t cap = m->cap_placed ? 2 * m->cap_placed : 256;
    void **p = realloc(m->placed, cap * sizeof *p);
    if (!p) return EPIC_ERR_NOMEM;
    m->placed = p;
    m->cap_placed = cap;
  }
  EPIC_CHECK(m->ops->vt->alloc(m->ops, n ? n : 1, out));
  m->placed[m->n_placed++] = *out;
  return EPIC_OK;
}

/* Scale blocks of w (0 without block scales). */
static int64_t scale_blocks(const epic_weight *w) {
  if (!w->scale_inv) return 0;
  return ((w->rows + w->block_rows - 1) / w->block_rows) *
         ((w->cols + w->block_cols - 1) / w->block_cols);
}

/* Bytes of w's elements (its block scales not counted). */
static size_t data_bytes(const epic_weight *w) {
  return (size_t)(w->rows * w->cols) * epic_dtype_size(w->dtype);
}

/* Whether b's rows can follow a's in one weight: the same dtype, width and block
 * layout, and a's rows a whole number of scale blocks (so b's scales start a block row). */
static int joinable(const epic_weight *a, const epic_weight *b) {
  if (a->dtype != b->dtype || a->cols != b->cols || !a->data || !b->data ||
      !a->scale_inv != !b->scale_inv)
    return 0;
  if (!a->scale_inv) return 1;
  return a->block_rows == b->block_rows && a->block_cols == b->block_cols && a->block_rows > 0 &&
         a->rows % a->block_rows == 0;
}

/* The count weights *w[0..count) (host views, each joinable to the one before it) in one
 * block of backend memory, one after another, and their block scales likewise; each now
 * views its part of the blocks. placed: the blocks live as long as the model (place_alloc);
 * else they are the caller's to free, as an expert's are when a placement change drops it
 * (drop_expert). All count are zeroed on failure. */
static epic_status upload_blocks(epic_model *m, epic_weight *const *w, int count, int placed) {
  epic_ops *o = m->ops;
  size_t n = 0, ns = 0;
  for (int i = 0; i < count; i++) {
    n += data_bytes(w[i]);
    ns += (size_t)scale_blocks(w[i]) * sizeof(float);
  }
  char *d = NULL, *sc = NULL;
  epic_status st;
  if (placed) {
    EPIC_CHECK_GOTO(place_alloc(m, n, (void **)&d), st, fail);
    if (ns) EPIC_CHECK_GOTO(place_alloc(m, ns, (void **)&sc), st, fail);
  } else {
    EPIC_CHECK_GOTO(o->vt->alloc(o, n ? n : 1, (void **)&d), st, fail);
    if (ns) EPIC_CHECK_GOTO(o->vt->alloc(o, ns, (void **)&sc), st, fail);
  }
  size_t off = 0, soff = 0;
  for (int i = 0; i < count; i++) {
    const size_t ni = data_bytes(w[i]), nsi = (size_t)scale_blocks(w[i]) * sizeof(float);
    EPIC_CHECK_GOTO(o->vt->upload(o, d + off, w[i]->data, ni), st, fail);
    if (nsi) EPIC_CHECK_GOTO(o->vt->upload(o, sc + soff, w[i]->scale_inv, nsi), st, fail);
    w[i]->data = d + off;
    w[i]->scale_inv = sc ? (const float *)(sc + soff) : NULL;
    off += ni;
    soff += nsi;
  }
  return EPIC_OK;
fail:
  if (!placed) { /* placed blocks are freed with the model */
    o->vt->free(o, d);
    o->vt->free(o, sc);
  }
  for (int i = 0; i < count; i++) memset(w[i], 0, sizeof *w[i]);
  return st;
}

/* Weights are uploaded once, at load, when the backend cannot read host memory; the
 * host copy (mapped file or dummy data) stays with the checkpoint. */
static epic_status place_weight(epic_model *m, epic_weight *w) {
  if (m->ops->vt->host_visible) return EPIC_OK;
  epic_weight *const one[1] = {w};
  return upload_blocks(m, one, 1, 1);
}

/* Host weights a and b (joinable) placed in one block of backend memory, a's rows then
 * b's, and their block scales likewise: a and b view their parts and *ab all of it
 * ([a.rows + b.rows][cols]). Two projections of the same input then run as one matmul:
 * one activation quantisation (a pass over the input) and one GEMM launch instead of two,
 * with each output computed as before. */
static epic_status place_joined(epic_model *m, epic_weight *a, epic_weight *b, epic_weight *ab) {
  epic_weight *const pair[2] = {a, b};
  EPIC_CHECK(upload_blocks(m, pair, 2, 1));
  if (m->ops->vt->host_visible) /* a second copy there */
    m->derived_bytes += data_bytes(a) + data_bytes(b) +
                        (size_t)(scale_blocks(a) + scale_blocks(b)) * sizeof(float);
  *ab = *a;
  ab->rows = a->rows + b->rows;
  return EPIC_OK;
}

/* Host weights a and b in backend memory: joined into *ab where the model joins weights
 * (epic_model_params.join_weights) and their layouts allow, else each on its own (ab
 * zeroed; on a host backend they stay where the checkpoint has them). */
static epic_status place_pair(epic_model *m, epic_weight *a, epic_weight *b, epic_weight *ab) {
  memset(ab, 0, sizeof *ab);
  if (m->join_weights && joinable(a, b)) return place_joined(m, a, b, ab);
  EPIC_CHECK(place_weight(m, a));
  return place_weight(m, b);
}

static epic_status get_weight(epic_model *m, const char *name, int64_t rows, int64_t cols,
                              epic_weight *w) {
  EPIC_CHECK(epic_checkpoint_weight(m->ck, name, rows, cols, w));
  return place_weight(m, w);
}

/* Layer l's weight `suffix` as the checkpoint holds it (host view, not placed). */
static epic_status host_weight_l(epic_model *m, int64_t l, const char *suffix, int64_t rows,
                                 int64_t cols, epic_weight *w) {
  char name[256];
  LNAME(name, l, suffix);
  return epic_checkpoint_weight(m->ck, name, rows, cols, w);
}

static epic_status load_weight_l(epic_model *m, int64_t l, const char *suffix, int64_t rows,
                                 int64_t cols, epic_weight *w) {
  EPIC_CHECK(host_weight_l(m, l, suffix, rows, cols, w));
  return place_weight(m, w);
}

static epic_status load_vec_l(epic_model *m, int64_t l, const char *suffix, int64_t n, float **out) {
  char name[256];
  LNAME(name, l, suffix);
  return load_vec(m, name, n, out);
}

/* gate, up and down of an MLP into w3, gate and up joined into *gate_up where they can
 * be (place_pair). */
static epic_status load_mlp(epic_model *m, int64_t l, const char *prefix, int64_t width,
                            epic_weight w3[3], epic_weight *gate_up) {
  static const char *parts[3] = {"gate_proj.weight", "up_proj.weight", "down_proj.weight"};
  const int64_t D = m->cfg.hidden_size;
  char suffix[200];
  for (int i = 0; i < 3; i++) {
    snprintf(suffix, sizeof suffix, "%s%s", prefix, parts[i]);
    EPIC_CHECK(host_weight_l(m, l, suffix, i < 2 ? width : D, i < 2 ? D : width, &w3[i]));
  }
  EPIC_CHECK(place_pair(m, &w3[0], &w3[1], gate_up));
  return place_weight(m, &w3[2]);
}

/* A copy of host weight w in backend memory (a derived buffer): dequantised to fp32, or
 * with bf16 set also rounded to bf16 (to nearest even). */
static epic_status derived_copy(epic_model *m, const epic_weight *w, int bf16, void **out) {
  const size_t n = (size_t)(w->rows * w->cols), bytes = n * (bf16 ? 2 : sizeof(float));
  float *host = malloc(n ? n * sizeof(float) : 1);
  uint16_t *h16 = bf16 ? malloc(n ? bytes : 1) : NULL;
  epic_status st = EPIC_ERR_NOMEM;
  *out = NULL;
  if (host && (h16 || !bf16)) {
    epic_weight_rows_f32(w, 0, w->rows, host);
    for (size_t i = 0; h16 && i < n; i++) h16[i] = epic_f32_to_bf16(host[i]);
    st = m->ops->vt->alloc(m->ops, bytes, out);
    if (st == EPIC_OK) st = m->ops->vt->upload(m->ops, *out, h16 ? (void *)h16 : host, bytes);
  }
  free(host);
  free(h16);
  if (st == EPIC_OK) m->derived_bytes += bytes;
  return st;
}

static epic_status f32_copy(epic_model *m, const epic_weight *w, float **out) {
  return derived_copy(m, w, 0, (void **)out);
}

/* w's bytes (and block scales) in backend memory of their own; w is zeroed on failure. */
static epic_status upload_owned(epic_model *m, epic_weight *w) {
  epic_weight *const one[1] = {w};
  return upload_blocks(m, one, 1, 0);
}

/* Whether gate and up can share one block (see EXPERT_W): joinable, and of one height
 * (gate_up's halves). */
static int fusable(const epic_weight *gate, const epic_weight *up) {
  return joinable(gate, up) && gate->rows == up->rows;
}

/* gate and up (host views) uploaded into one block of backend memory: w4[EXPERT_GATE_UP]
 * views all of it, gate and up its halves (fusable: the scales of gate end on a block
 * row, so up's start where gate's end). */
static epic_status upload_fused(epic_model *m, epic_weight w4[EXPERT_W]) {
  epic_weight *const gate_up[2] = {&w4[EXPERT_GATE], &w4[EXPERT_UP]};
  EPIC_CHECK(upload_blocks(m, gate_up, 2, 0));
  w4[EXPERT_GATE_UP] = w4[EXPERT_GATE];
  w4[EXPERT_GATE_UP].rows = 2 * w4[EXPERT_GATE].rows;
  return EPIC_OK;
}

/* Expert e's weights of layer lw into w4 (EXPERT_W entries, zeroed by the caller): the
 * checkpoint's mapped or generated weights (the dummy generator is keyed by the
 * tensor name, so every rank gets the same weights for the same expert), copied
 * into backend memory when the backend cannot read host memory (gate and up into one
 * block where fusable). On failure w4 may be partly set: drop_expert undoes it. */
static epic_status load_expert(epic_model *m, const layer_w *lw, int64_t e,
                               epic_weight w4[EXPERT_W]) {
  static const char *parts[3] = {"gate_proj.weight", "up_proj.weight", "down_proj.weight"};
  const int64_t D = m->cfg.hidden_size, I = m->cfg.moe_intermediate_size;
  const int dev = !m->ops->vt->host_visible;
  char name[256];
  epic_weight host[3]; /* into w4 only once all three are found */
  for (int i = 0; i < 3; i++) {
    snprintf(name, sizeof name, "model.layers.%lld.mlp.experts.%lld.%s", (long long)lw->index,
             (long long)e, parts[i]);
    EPIC_CHECK(epic_checkpoint_weight(m->ck, name, i < 2 ? I : D, i < 2 ? D : I, &host[i]));
  }
  memcpy(w4, host, sizeof host);
  if (!dev) return EPIC_OK;
  /* Each upload zeroes its weights on failure; the host views not yet uploaded are
   * zeroed too, so that drop_expert frees only backend blocks. */
  epic_status st;
  int next = EXPERT_UP;
  if (fusable(&w4[EXPERT_GATE], &w4[EXPERT_UP])) {
    st = upload_fused(m, w4);
    next = EXPERT_DOWN;
  } else {
    st = upload_owned(m, &w4[EXPERT_GATE]);
  }
  for (; st == EPIC_OK && next <= EXPERT_DOWN; next++) st = upload_owned(m, &w4[next]);
  if (st != EPIC_OK)
    for (; next <= EXPERT_DOWN; next++) memset(&w4[next], 0, sizeof w4[next]);
  return st;
}

/* Give up an expert's weights: backend copies are freed (a fused block once), mapped
 * ones only forgotten. */
static void drop_expert(epic_model *m, epic_weight w4[EXPERT_W]) {
  if (!m->ops->vt->host_visible) {
    /* upload_owned's / upload_fused's blocks: the const only says the weight is not
     * written. */
    const int first = w4[EXPERT_GATE_UP].data ? EXPERT_DOWN : EXPERT_GATE;
    for (int i = first; i <= EXPERT_GATE_UP; i++) {
      m->ops->vt->free(m->ops, (void *)(uintptr_t)w4[i].data);
      m->ops->vt->free(m->ops, (void *)(uintptr_t)w4[i].scale_inv);
    }
  }
  memset(w4, 0, EXPERT_W * sizeof *w4);
}

/* Synthetic routing skew (benchmarks, dummy weights): adds router_skew * -log(1 + p)
 * to the selection bias of the expert with popularity rank p in this layer (a fixed
 * pseudo-random order per layer), a Zipf-like preference for a few hot experts. */
static epic_status skew_bias(epic_model *m, int64_t slot, float *bias) {
  const int64_t E = m->cfg.n_routed_experts;
  float *h = malloc((size_t)E * sizeof *h);
  uint64_t *key = malloc((size_t)E * sizeof *key);
  epic_status st = EPIC_ERR_NOMEM;
  if (!h || !key) goto done;
  for (int64_t e = 0; e < E; e++) {
    uint64_t x = (uint64_t)(slot * E + e) + 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    key[e] = x ^ (x >> 31);
  }
  EPIC_CHECK_GOTO(m->ops->vt->download(m->ops, h, bias, (size_t)E * sizeof *h), st, done);
  for (int64_t e = 0; e < E; e++) {
    int64_t p = 0;
    for (int64_t j = 0; j < E; j++) p += key[j] < key[e] || (key[j] == key[e] && j < e);
    h[e] += (float)(-m->router_skew * log(1.0 + (double)p));
  }
  st = m->ops->vt->upload(m->ops, bias, h, (size_t)E * sizeof *h);
done:
  free(h);
  free(key);
  return st;
}

static epic_status load_layer(epic_model *m, int64_t l, int64_t slot, layer_w *lw) {
  const epic_model_config *c = &m->cfg;
  const int64_t D = c->hidden_size, H = c->num_attention_heads;
  const int64_t dq = c->qk_nope_head_dim + c->qk_rope_head_dim;
  const int64_t dkv = c->qk_nope_head_dim + c->v_head_dim;
  const int64_t L = c->kv_lora_rank, R = c->qk_rope_head_dim;
  epic_weight w3[3];
  lw->index = l;
  lw->slot = slot;
  EPIC_CHECK(load_vec_l(m, l, "input_layernorm.weight", D, &lw->attn_norm));
  EPIC_CHECK(load_vec_l(m, l, "post_attention_layernorm.weight", D, &lw->ffn_norm));
  if (c->q_lora_rank > 0) {
    /* q_a and kv_a both multiply the normed input: joined where they can be */
    EPIC_CHECK(host_weight_l(m, l, "self_attn.q_a_proj.weight", c->q_lora_rank, D, &lw->q_a));
    EPIC_CHECK(host_weight_l(m, l, "self_attn.kv_a_proj_with_mqa.weight", L + R, D, &lw->kv_a));
    EPIC_CHECK(place_pair(m, &lw->q_a, &lw->kv_a, &lw->qkv_a));
    EPIC_CHECK(load_vec_l(m, l, "self_attn.q_a_layernorm.weight", c->q_lora_rank, &lw->q_a_norm));
    EPIC_CHECK(load_weight_l(m, l, "self_attn.q_b_proj.weight", H * dq, c->q_lora_rank, &lw->q_b));
  } else {
    EPIC_CHECK(load_weight_l(m, l, "self_attn.q_proj.weight", H * dq, D, &lw->q_proj));
    EPIC_CHECK(load_weight_l(m, l, "self_attn.kv_a_proj_with_mqa.weight", L + R, D, &lw->kv_a));
  }
  EPIC_CHECK(load_vec_l(m, l, "self_attn.kv_a_layernorm.weight", L, &lw->kv_a_norm));
  EPIC_CHECK(load_weight_l(m, l, "self_attn.o_proj.weight", D, H * c->v_head_dim, &lw->o_proj));
  {
    char name[256];
    LNAME(name, l, "self_attn.kv_b_proj.weight");
    EPIC_CHECK(epic_checkpoint_weight(m->ck, name, H * dkv, L, &lw->kv_b)); /* host, placed below */
  }
  /* The absorbed form multiplies by per-head slices of kv_b; keep one fp32 or bf16 copy. */
  if (m->head_bf16)
    EPIC_CHECK(derived_copy(m, &lw->kv_b, 1, (void **)&lw->kv_b_bf16));
  else
    EPIC_CHECK(f32_copy(m, &lw->kv_b, &lw->kv_b_f32));
  EPIC_CHECK(place_weight(m, &lw->kv_b));
  lw->moe = epic_config_is_moe_layer(c, l);
  if (!lw->moe) {
    lw->has_mlp = 1;
    lw->mlp_width = c->intermediate_size;
    EPIC_CHECK(load_mlp(m, l, "mlp.", lw->mlp_width, w3, &lw->gate_up));
  } else {
    const int64_t E = c->n_routed_experts;
    char name[256];
    LNAME(name, l, "mlp.gate.weight");
    EPIC_CHECK(epic_checkpoint_weight(m->ck, name, E, D, &lw->router));
    if (!m->ops->vt->host_visible) {
      /* A GPU backend rounds activations to the weight's precision (the CPU one
       * multiplies in fp32 whatever the storage), and top-k selection is
       * discontinuous: a rounding flip changes the expert. The router is small
       * (E x hidden), so it runs in fp32. */
      EPIC_CHECK(f32_copy(m, &lw->router, &lw->router_f32));
      lw->router = (epic_weight){.dtype = EPIC_DT_F32, .rows = E, .cols = D, .data = lw->router_f32};
    }
    LNAME(name, l, "mlp.gate.e_score_correction_bias");
    /* noaux_tc routing needs the bias; other checkpoints may simply lack it. */
    if (strcmp(c->topk_method, "noaux_tc") == 0 || epic_checkpoint_find(m->ck, name))
      EPIC_CHECK(load_vec(m, name, E, &lw->router_bias));
    if (m->router_skew != 0 && lw->router_bias) EPIC_CHECK(skew_bias(m, slot, lw->router_bias));
    lw->experts = calloc((size_t)E * EXPERT_W, sizeof *lw->experts);
    if (!lw->experts) return EPIC_ERR_NOMEM;
    for (int64_t e = 0; e < E; e++) {
      if (!expert_is_local(m, slot, e)) continue; /* another rank serves it */
      EPIC_CHECK(load_expert(m, lw, e, &lw->experts[e * EXPERT_W]));
    }
    if (c->n_shared_experts > 0) {
      lw->has_mlp = 1;
      lw->mlp_width = c->moe_intermediate_size * c->n_shared_experts;
      EPIC_CHECK(load_mlp(m, l, "mlp.shared_experts.", lw->mlp_width, w3, &lw->gate_up));
    }
  }
  if (lw->has_mlp) {
    lw->gate = w3[0];
    lw->up = w3[1];
    lw->down = w3[2];
  }
  return EPIC_OK;
}

static void free_layer(epic_model *m, layer_w *lw) {
  epic_ops *o = m->ops;
  o->vt->free(o, lw->attn_norm);
  o->vt->free(o, lw->ffn_norm);
  o->vt->free(o, lw->q_a_norm);
  o->vt->free(o, lw->kv_a_norm);
  o->vt->free(o, lw->kv_b_f32);
  o->vt->free(o, lw->kv_b_bf16);
  o->vt->free(o, lw->router_f32);
  o->vt->free(o, lw->router_bias);
  if (lw->experts)
    for (int64_t e = 0; e < m->cfg.n_routed_experts; e++) drop_expert(m, &lw->experts[e * EXPERT_W]);
  free(lw->experts);
}

/* Weight from `name` if the checkpoint has it, else from `fallback` (the MTP
 * layer's embedding and head are copies of the main ones in real checkpoints). */
static epic_status load_weight_or(epic_model *m, const char *name, const epic_weight *fallback,
                                  int64_t rows, int64_t cols, epic_weight *w) {
  if (epic_checkpoint_find(m->ck, name)) return get_weight(m, name, rows, cols, w);
  *w = *fallback; /* already placed */
  return EPIC_OK;
}

static epic_status load_mtp(epic_model *m) {
  const epic_model_config *c = &m->cfg;
  const int64_t l = m->mtp_index, D = c->hidden_size;
  char name[256];
  LNAME(name, l, "embed_tokens.weight");
  EPIC_CHECK(load_weight_or(m, name, &m->embed, c->vocab_size, D, &m->mtp.embed));
  LNAME(name, l, "shared_head.head.weight");
  EPIC_CHECK(load_weight_or(m, name, &m->lm_head, c->vocab_size, D, &m->mtp.head));
  EPIC_CHECK(load_weight_l(m, l, "eh_proj.weight", D, 2 * D, &m->mtp.eh_proj));
  EPIC_CHECK(load_vec_l(m, l, "enorm.weight", D, &m->mtp.enorm));
  EPIC_CHECK(load_vec_l(m, l, "hnorm.weight", D, &m->mtp.hnorm));
  EPIC_CHECK(load_vec_l(m, l, "shared_head.norm.weight", D, &m->mtp.head_norm));
  EPIC_CHECK(load_layer(m, l, c->num_hidden_layers, &m->mtp.layer));
  return EPIC_OK;
}

/* Check placement p against this model and world; one error line naming the row,
 * expert and rank. */
static epic_status placement_check(const epic_model *m, const epic_expert_placement *p) {
  const int64_t E = m->cfg.n_routed_experts, rows = m->cfg.num_hidden_layers + 1;
  const int P = m->comm ? m->nranks : 1;
  if (!p || p->size != sizeof *p || p->n_rows != rows || p->n_experts != E || !p->off ||
      !p->ranks || p->off[0] != 0) {
    EPIC_LOG_ERROR("model: expert placement: expected %lld rows of %lld experts with offsets "
                   "from 0 (got %lld x %lld)",
                   (long long)rows, (long long)E, p ? (long long)p->n_rows : -1LL,
                   p ? (long long)p->n_experts : -1LL);
    return EPIC_ERR_INVALID;
  }
  for (int64_t i = 0; i < rows * E; i++) {
    const int32_t a = p->off[i], b = p->off[i + 1];
    if (b <= a || b - a > P) {
      EPIC_LOG_ERROR("model: expert placement: expert %lld of row %lld has %d copies (need 1..%d)",
                     (long long)(i % E), (long long)(i / E), (int)(b - a), P);
      return EPIC_ERR_INVALID;
    }
    for (int32_t j = a; j < b; j++)
      if (p->ranks[j] < 0 || p->ranks[j] >= P || (j > a && p->ranks[j] <= p->ranks[j - 1])) {
        EPIC_LOG_ERROR("model: expert placement: expert %lld of row %lld: rank %d is out of "
                       "range [0, %d) or not ascending",
                       (long long)(i % E), (long long)(i / E), p->ranks[j], P);
        return EPIC_ERR_INVALID;
      }
  }
  return EPIC_OK;
}

/* Copies of p for this model (checked): *off, *ranks, *held freshly allocated. */
static epic_status placement_copy(const epic_model *m, const epic_expert_placement *p,
                                  int32_t **off, int32_t **ranks, unsigned char **held) {
  const int64_t n = p->n_rows * p->n_experts, total = p->off[n];
  *off = malloc((size_t)(n + 1) * sizeof **off);
  *ranks = malloc((size_t)(total > 0 ? total : 1) * sizeof **ranks);
  *held = calloc((size_t)(n > 0 ? n : 1), 1);
  if (!*off || !*ranks || !*held) {
    free(*off);
    free(*ranks);
    free(*held);
    *off = *ranks = NULL;
    *held = NULL;
    return EPIC_ERR_NOMEM;
  }
  memcpy(*off, p->off, (size_t)(n + 1) * sizeof **off);
  memcpy(*ranks, p->ranks, (size_t)total * sizeof **ranks);
  for (int64_t i = 0; i < n; i++)
    for (int32_t j = p->off[i]; j < p->off[i + 1]; j++)
      if (p->ranks[j] == (m->comm ? m->rank : 0)) (*held)[i] = 1;
  return EPIC_OK;
}

/* Expert ownership: the caller's table or contiguous blocks over the ranks. */
static epic_status setup_ep(epic_model *m, const epic_model_params *p) {
  const int64_t E = m->cfg.n_routed_experts, rows = m->cfg.num_hidden_layers + 1;
  int32_t *off = NULL, *ranks = NULL;
  epic_status st;
  if (!p->comm) return EPIC_OK;
  if (epic_comm_device_buffers(p->comm) && m->ops->vt->host_visible) {
    /* The exchange rows live in backend memory (see dbuf): host memory here. */
    EPIC_LOG_ERROR("model: comm backend %s exchanges GPU memory, but the %s compute backend "
                   "keeps activations in host memory; use --comm mpi or ucx, or --device cuda",
                   epic_comm_backend_name(p->comm), m->ops->vt->name);
    return EPIC_ERR_UNSUPPORTED;
  }
  m->comm = p->comm;
  m->rank = epic_comm_rank(p->comm);
  m->nranks = epic_comm_size(p->comm);
  if (p->placement) {
    EPIC_CHECK(placement_check(m, p->placement));
    return placement_copy(m, p->placement, &m->rep_off, &m->rep_rank, &m->held);
  }
  /* One copy per expert. */
  off = malloc((size_t)(rows * E + 1) * sizeof *off);
  ranks = malloc((size_t)(rows * (E > 0 ? E : 1)) * sizeof *ranks);
  if (!off || !ranks) {
    st = EPIC_ERR_NOMEM;
    goto done;
  }
  for (int64_t i = 0; i <= rows * E; i++) off[i] = (int32_t)i;
  for (int64_t l = 0; l < rows; l++)
    for (int64_t e = 0; e < E; e++) {
      int32_t r = p->expert_owner ? p->expert_owner[l * E + e] : (int32_t)((e * m->nranks) / E);
      if (r < 0 || r >= m->nranks) {
        EPIC_LOG_ERROR("model: expert %lld of layer %lld is placed on rank %d, but there are %d ranks",
                       (long long)e, (long long)l, r, m->nranks);
        st = EPIC_ERR_INVALID;
        goto done;
      }
      ranks[l * E + e] = r;
    }
  {
    const epic_expert_placement pl = {.size = sizeof pl, .n_rows = rows, .n_experts = E,
                                      .off = off, .ranks = ranks};
    st = placement_copy(m, &pl, &m->rep_off, &m->rep_rank, &m->held);
  }
done:
  free(off);
  free(ranks);
  return st;
}

/* Tensors this process leaves in the checkpoint on purpose: layers cut by
 * --num-layers, the MTP module when not asked for, and other ranks' experts. */
static int skip_unloaded(void *user, const char *name) {
  const epic_model *m = user;
  const int64_t L = m->cfg.num_hidden_layers;
  long long l, e;
  int n = 0;
  if (sscanf(name, "model.layers.%lld.%n", &l, &n) != 1 || n == 0) return 0;
  if (l == m->mtp_index && m->has_mtp) {
    l = L; /* owner-table row of the MTP layer */
  } else if (l >= L) {
    return 1;
  }
  if (sscanf(name + n, "mlp.experts.%lld.", &e) == 1 && e >= 0 && e < m->cfg.n_routed_experts)
    return !expert_is_local(m, l, e);
  return 0;
}

/* Progress of a long load: a rewritten line on a terminal, log lines otherwise. */
static void report_progress(const epic_model *m, int64_t done, int64_t total, double t0) {
  double el = epic_now_seconds() - t0, gb = (double)epic_checkpoint_bytes(m->ck) / 1e9;
  double eta = done > 0 ? el * (double)(total - done) / (double)done : 0;
  if (!m->progress) return;
  if (isatty(2))
    fprintf(stderr, "\rloading layer %lld/%lld  %.2f GB  %.2f GB/s  ETA %.0fs%s", (long long)done,
            (long long)total, gb, el > 0 ? gb / el : 0.0, eta, done == total ? "\n" : "");
  else if (done == total || done % 8 == 0)
    EPIC_LOG_INFO("loaded layer %lld/%lld: %.2f GB in %.1fs (%.2f GB/s), ETA %.0fs",
                  (long long)done, (long long)total, gb, el, el > 0 ? gb / el : 0.0, eta);
}

epic_status epic_model_load(epic_ops *ops, const epic_model_params *p, epic_model **out) {
  epic_model *m;
  epic_status st;
  int64_t n_layers;
  double t0 = epic_now_seconds();
  *out = NULL;
  if (!p || p->size != sizeof *p || !p->dir) {
    EPIC_LOG_ERROR("model: invalid load parameters");
    return EPIC_ERR_INVALID;
  }
  if (!ops || ops->vt->abi_version < 4) {
    EPIC_LOG_ERROR("model: compute backend %s implements epic_ops ABI %d; the model needs 4",
                   ops ? ops->vt->name : "(none)", ops ? ops->vt->abi_version : 0);
    return EPIC_ERR_UNSUPPORTED;
  }
  m = calloc(1, sizeof *m);
  if (!m) return EPIC_ERR_NOMEM;
  m->ops = ops;
  m->micro_batches = 1;
  m->step_graphs = p->step_graphs >= 0;
  m->progress = p->progress;
  m->router_skew = p->router_skew;
  m->join_weights = p->join_weights > 0 || (p->join_weights == 0 && !ops->vt->host_visible);
  if (p->head_bf16 > 0 && !epic_ops_has_head_bf16(ops)) {
    EPIC_LOG_ERROR("model: head_bf16: compute backend %s has no bf16 head_gemm", ops->vt->name);
    free(m);
    return EPIC_ERR_UNSUPPORTED;
  }
  m->head_bf16 =
      p->head_bf16 > 0 || (p->head_bf16 == 0 && epic_ops_head_dtype(ops) == EPIC_DT_BF16);
  const int dummy = p->load_format == EPIC_LOAD_DUMMY || p->load_format == EPIC_LOAD_DUMMY_MTP;
  if (p->router_skew != 0 && (!dummy || !isfinite(p->router_skew))) {
    EPIC_LOG_ERROR("model: router_skew (synthetic routing skew) needs dummy weights and a finite value");
    free(m);
    return EPIC_ERR_INVALID;
  }
  if (dummy) {
    epic_model_config cfg;
    EPIC_CHECK_GOTO(epic_config_load_dir(p->dir, &cfg), st, fail);
    EPIC_CHECK_GOTO(epic_config_override(&cfg, p->num_layers, p->num_experts), st, fail);
    EPIC_CHECK_GOTO(epic_checkpoint_open_dummy(&cfg, p->seed, &m->ck), st, fail);
    /* 2^-16: the main model's picks follow its token-to-successor map closely enough that
     * most drafts are accepted at V3's size too (2^-10 gave 54-68% there, 83-100% on the
     * tiny configs: random logits over 129k tokens leave small top-2 margins) */
    if (p->load_format == EPIC_LOAD_DUMMY_MTP)
      EPIC_CHECK_GOTO(epic_checkpoint_set_mtp_successor(m->ck, 1.0f / 65536), st, fail);
    m->mtp_index = epic_checkpoint_config(m->ck)->num_hidden_layers;
  } else {
    EPIC_CHECK_GOTO(epic_checkpoint_open(p->dir, &m->ck), st, fail);
    m->mtp_index = epic_checkpoint_config(m->ck)->num_hidden_layers;
    EPIC_CHECK_GOTO(epic_config_override(epic_checkpoint_config_mut(m->ck), p->num_layers,
                                         p->num_experts),
                    st, fail);
  }
  m->cfg = *epic_checkpoint_config(m->ck);
  {
    const epic_model_config *c = &m->cfg;
    const int64_t D = c->hidden_size;
    n_layers = c->num_hidden_layers;
    m->inv_freq = calloc((size_t)(c->qk_rope_head_dim / 2 + 1), sizeof(double));
    m->layers = calloc((size_t)n_layers, sizeof *m->layers);
    m->expert_tokens = calloc((size_t)(c->n_routed_experts > 0 ? c->n_routed_experts : 1),
                              sizeof *m->expert_tokens);
    m->layer_tokens = calloc((size_t)((n_layers + 1) * (c->n_routed_experts > 0 ? c->n_routed_experts : 1)),
                             sizeof *m->layer_tokens);
    if (!m->inv_freq || !m->layers || !m->expert_tokens || !m->layer_tokens) {
      st = EPIC_ERR_NOMEM;
      goto fail;
    }
    epic_config_rope_inv_freq(c, m->inv_freq);
    EPIC_CHECK_GOTO(setup_ep(m, p), st, fail);
    m->scale = (float)epic_config_softmax_scale(c);
    EPIC_CHECK_GOTO(get_weight(m, "model.embed_tokens.weight", c->vocab_size, D, &m->embed), st,
                    fail);
    EPIC_CHECK_GOTO(load_vec(m, "model.norm.weight", D, &m->final_norm), st, fail);
    if (c->tie_word_embeddings)
      m->lm_head = m->embed;
    else
      EPIC_CHECK_GOTO(get_weight(m, "lm_head.weight", c->vocab_size, D, &m->lm_head), st, fail);
    for (int64_t l = 0; l < n_layers; l++) {
      EPIC_CHECK_GOTO(load_layer(m, l, l, &m->layers[l]), st, fail);
      report_progress(m, l + 1, n_layers, t0);
    }
    if (p->load_mtp && c->num_nextn_predict_layers > 0) {
      EPIC_CHECK_GOTO(load_mtp(m), st, fail);
      m->has_mtp = 1;
    }
  }
  if (!dummy) {
    epic_checkpoint_skip(m->ck, skip_unloaded, m);
    epic_checkpoint_report_unused(m->ck);
  }
  *out = m;
  return EPIC_OK;
fail:
  epic_model_destroy(m);
  return st;
}

/* Drop every recorded decode-step graph. */
static void graphs_reset(epic_model *m) {
  for (int i = 0; i < EPIC_MODEL_STEP_GRAPHS; i++) {
    if (m->graphs[i].graph) m->ops->vt->graph_free(m->ops, m->graphs[i].graph);
    memset(&m->graphs[i], 0, sizeof m->graphs[i]);
  }
}

void epic_model_set_step_graphs(epic_model *m, int on) {
  if (!on) graphs_reset(m);
  m->step_graphs = on != 0;
}

void epic_model_destroy(epic_model *m) {
  if (!m) return;
  graphs_reset(m);
  if (m->layers)
    for (int64_t l = 0; l < m->cfg.num_hidden_layers; l++) free_layer(m, &m->layers[l]);
  free_layer(m, &m->mtp.layer); /* NULL-safe: zeroed when MTP was not loaded */
  m->ops->vt->free(m->ops, m->mtp.enorm);
  m->ops->vt->free(m->ops, m->mtp.hnorm);
  m->ops->vt->free(m->ops, m->mtp.head_norm);
  m->ops->vt->free(m->ops, m->final_norm);
  m->ops->vt->free(m->ops, m->arena);
  free(m->rep_off);
  free(m->rep_rank);
  free(m->held);
  for (size_t i = 0; i < m->n_retired; i++) free(m->retired[i]);
  free(m->retired);
  free(m->layer_tokens);
  for (int i = 0; i < MAX_MB; i++) {
    for (int j = 0; j < XB_N; j++) free(m->xbuf[i][j]);
    for (int j = 0; j < DB_N; j++) m->ops->vt->free(m->ops, m->dbuf[i][j]);
  }
  for (size_t i = 0; i < m->n_placed; i++) m->ops->vt->free(m->ops, m->placed[i]);
  free(m->placed);
  free(m->expert_tokens);
  m->ops->vt->free(m->ops, m->dev_tokens);
  free(m->layers);
  free(m->inv_freq);
  epic_checkpoint_close(m->ck);
  free(m);
}

epic_ops *epic_model_ops(const epic_model *m) { return m->ops; }

const epic_model_config *epic_model_get_config(const epic_model *m) { return &m->cfg; }

epic_status epic_model_set_micro_batches(epic_model *m, int n) {
  if (n != 1 && n != 2) {
    EPIC_LOG_ERROR("model: micro_batches must be 1 or 2, got %d", n);
    return EPIC_ERR_INVALID;
  }
  m->micro_batches = n;
  return EPIC_OK;
}

void epic_model_get_stats(const epic_model *m, epic_model_stats *out) { *out = m->stats; }
void epic_model_reset_stats(epic_model *m) { memset(&m->stats, 0, sizeof m->stats); }

/* The backend-held counts (dev_tokens) as host memory, or NULL when there are none. */
static epic_status dev_tokens_host(const epic_model *m, int64_t **out) {
  const size_t n = (size_t)((m->cfg.num_hidden_layers + 1) * m->cfg.n_routed_experts);
  *out = NULL;
  if (!m->dev_tokens) return EPIC_OK;
  int64_t *h = malloc(n * sizeof *h);
  if (!h) return EPIC_ERR_NOMEM;
  const epic_status st = m->ops->vt->download(m->ops, h, m->dev_tokens, n * sizeof *h);
  if (st != EPIC_OK) {
    free(h);
    return st;
  }
  *out = h;
  return EPIC_OK;
}

epic_status epic_model_expert_tokens(const epic_model *m, int64_t *counts) {
  if (!m || !counts) return EPIC_ERR_INVALID;
  const int64_t E = m->cfg.n_routed_experts, rows = m->cfg.num_hidden_layers + 1;
  int64_t *dev;
  if (E <= 0) return EPIC_OK;
  EPIC_CHECK(dev_tokens_host(m, &dev));
  memcpy(counts, m->expert_tokens, (size_t)E * sizeof *counts);
  for (int64_t r = 0; dev && r < rows; r++)
    for (int64_t e = 0; e < E; e++) counts[e] += dev[r * E + e];
  free(dev);
  return EPIC_OK;
}

epic_status epic_model_expert_layer_tokens(const epic_model *m, int64_t *counts) {
  if (!m || !counts) return EPIC_ERR_INVALID;
  const size_t n = (size_t)((m->cfg.num_hidden_layers + 1) * m->cfg.n_routed_experts);
  int64_t *dev;
  EPIC_CHECK(dev_tokens_host(m, &dev));
  memcpy(counts, m->layer_tokens, n * sizeof *counts);
  for (size_t i = 0; dev && i < n; i++) counts[i] += dev[i];
  free(dev);
  return EPIC_OK;
}

/* The loaded layer of owner-table row l (NULL for rows nothing is loaded for). */
static layer_w *row_layer(epic_model *m, int64_t l) {
  const int64_t L = m->cfg.num_hidden_layers;
  if (l < L) return m->layers[l].moe ? &m->layers[l] : NULL;
  return m->has_mtp && m->mtp.layer.moe ? &m->mtp.layer : NULL;
}

/* Into off/ranks: the placement of rows [0, cut) from (aoff, arank) and of rows
 * [cut, rows) from (boff, brank); ranks has room for both tables' entries. */
static void placement_mix(const epic_model *m, const int32_t *aoff, const int32_t *arank,
                          const int32_t *boff, const int32_t *brank, int64_t cut, int32_t *off,
                          int32_t *ranks) {
  const int64_t E = m->cfg.n_routed_experts, n = (m->cfg.num_hidden_layers + 1) * E;
  memcpy(off, aoff, (size_t)(cut * E + 1) * sizeof *off);
  memcpy(ranks, arank, (size_t)aoff[cut * E] * sizeof *ranks);
  for (int64_t i = cut * E; i < n; i++) off[i + 1] = off[i] + (boff[i + 1] - boff[i]);
  memcpy(ranks + aoff[cut * E], brank + boff[cut * E],
         (size_t)(boff[n] - boff[cut * E]) * sizeof *ranks);
}

epic_status epic_model_set_placement(epic_model *m, const epic_expert_placement *p) {
  const int64_t E = m->cfg.n_routed_experts, rows = m->cfg.num_hidden_layers + 1;
  const int dev = !m->ops->vt->host_visible;
  int32_t *off = NULL, *ranks = NULL, *moff = NULL, *mranks = NULL;
  unsigned char *held = NULL;
  epic_weight *fresh = NULL, *list = NULL;
  int64_t l = 0, switched = 0;
  epic_status st;
  EPIC_CHECK(placement_check(m, p));
  graphs_reset(m); /* recorded steps name the expert weight tables */
  if (!m->comm) return EPIC_OK; /* one process holds every expert */
  EPIC_CHECK(placement_copy(m, p, &off, &ranks, &held));
  fresh = calloc((size_t)(E * EXPERT_W), sizeof *fresh);
  /* Tables for a failure half-way (see fail:), taken now so that path cannot fail. */
  moff = malloc((size_t)(rows * E + 1) * sizeof *moff);
  mranks = malloc((size_t)(off[rows * E] + m->rep_off[rows * E] + 1) * sizeof *mranks);
  if (!fresh || !moff || !mranks) {
    st = EPIC_ERR_NOMEM;
    goto fail;
  }
  if (dev) {
    epic_weight **r = realloc(m->retired, (m->n_retired + (size_t)rows) * sizeof *r);
    if (!r) {
      st = EPIC_ERR_NOMEM;
      goto fail;
    }
    m->retired = r;
  }
  /* One row at a time, so that at most one layer's new experts are held beside the
   * old ones (the memory the planner sets aside for run-time EPLB: coordinator/
   * planner.h). A row first loads its newly held experts (a failure leaves it as
   * it was), then installs them and frees the ones it gives up (cannot fail). */
  for (l = 0; l < rows; l++) {
    layer_w *lw = row_layer(m, l);
    const unsigned char *now = m->held + l * E, *next = held + l * E;
    if (!lw) { /* a dense row: nothing loaded, never routed */
      memcpy(m->held + l * E, next, (size_t)E);
      switched = l + 1;
      continue;
    }
    for (int64_t e = 0; e < E; e++)
      if (next[e] && !now[e]) EPIC_CHECK_GOTO(load_expert(m, lw, e, &fresh[e * EXPERT_W]), st, fail);
    /* A backend without host memory gets a new list (see m->retired). */
    if (dev && !(list = calloc((size_t)E * EXPERT_W, sizeof *list))) {
      st = EPIC_ERR_NOMEM;
      goto fail;
    }
    epic_weight *to_list = list ? list : lw->experts;
    for (int64_t e = 0; e < E; e++) {
      epic_weight *w = &lw->experts[e * EXPERT_W], *to = &to_list[e * EXPERT_W];
      if (next[e] && !now[e]) {
        memcpy(to, &fresh[e * EXPERT_W], EXPERT_W * sizeof *to);
      } else if (!next[e] && now[e]) {
        drop_expert(m, w); /* a new list has zeros there already */
      } else if (to != w) {
        memcpy(to, w, EXPERT_W * sizeof *to);
      }
    }
    if (list) {
      m->retired[m->n_retired++] = lw->experts;
      lw->experts = list;
      list = NULL;
    }
    memcpy(m->held + l * E, next, (size_t)E);
    memset(fresh, 0, (size_t)(E * EXPERT_W) * sizeof *fresh);
    switched = l + 1;
  }
  free(m->rep_off);
  free(m->rep_rank);
  free(m->held);
  m->rep_off = off;
  m->rep_rank = ranks;
  m->held = held;
  free(fresh);
  free(moff);
  free(mranks);
  return EPIC_OK;
fail:
  /* Row l keeps its old experts and the rows before it have moved: the placement
   * in force says so (m->held already does). */
  if (fresh)
    for (int64_t e = 0; e < E; e++) drop_expert(m, &fresh[e * EXPERT_W]);
  free(list);
  if (switched > 0) {
    placement_mix(m, off, ranks, m->rep_off, m->rep_rank, switched, moff, mranks);
    free(m->rep_off);
    free(m->rep_rank);
    m->rep_off = moff;
    m->rep_rank = mranks;
    moff = mranks = NULL;
  }
  free(fresh);
  free(moff);
  free(mranks);
  free(off);
  free(ranks);
  free(held);
  return st;
}

epic_status epic_model_get_placement(const epic_model *m, epic_expert_placement *out) {
  if (!m || !out || !m->comm) return EPIC_ERR_INVALID;
  *out = (epic_expert_placement){.size = sizeof *out,
                                 .n_rows = m->cfg.num_hidden_layers + 1,
                                 .n_experts = m->cfg.n_routed_experts,
                                 .off = m->rep_off,
                                 .ranks = m->rep_rank};
  return EPIC_OK;
}

/* Routing statistics of n (token, expert) items (host ids) of owner-table row `slot`. */
static void count_experts(epic_model *m, int64_t slot, const int32_t *ids, int64_t n) {
  int64_t *row = m->layer_tokens + slot * m->cfg.n_routed_experts;
  for (int64_t i = 0; i < n; i++) {
    m->expert_tokens[ids[i]]++;
    row[ids[i]]++;
  }
}
int64_t epic_model_local_experts(const epic_model *m, int64_t layer) {
  int64_t n = 0;
  if (layer < 0 || layer > m->cfg.num_hidden_layers || !epic_config_is_moe_layer(&m->cfg, layer))
    return 0;
  for (int64_t e = 0; e < m->cfg.n_routed_experts; e++) n += expert_is_local(m, layer, e);
  return n;
}
int epic_model_experts_invariant(epic_ops *ops, const epic_model_config *cfg) {
  const int fp8 = cfg->quant.fp8;
  const epic_weight shape = {.dtype = fp8 ? EPIC_DT_F8E4M3 : EPIC_DT_BF16,
                             .block_rows = fp8 ? cfg->quant.weight_block_size[0] : 0,
                             .block_cols = fp8 ? cfg->quant.weight_block_size[1] : 0};
  epic_weight gate_up = shape, down = shape; /* gate and up alone: gate_up's layout halved */
  gate_up.rows = 2 * cfg->moe_intermediate_size;
  gate_up.cols = cfg->hidden_size;
  down.rows = cfg->hidden_size;
  down.cols = cfg->moe_intermediate_size;
  return epic_ops_experts_invariant(ops, &gate_up) && epic_ops_experts_invariant(ops, &down);
}

int epic_model_has_mtp(const epic_model *m) { return m->has_mtp; }
int epic_model_head_bf16(const epic_model *m) { return m->head_bf16; }

size_t epic_model_weight_bytes(const epic_model *m) {
  return epic_checkpoint_bytes(m->ck) + m->derived_bytes;
}

epic_status epic_model_kvcache_create(epic_model *m, int mtp, int64_t page_size, int64_t n_pages,
                                      epic_kvcache **out) {
  epic_kvcache_params p = {.size = sizeof p,
                           .n_layers = mtp ? 1 : m->cfg.num_hidden_layers,
                           .lora = m->cfg.kv_lora_rank,
                           .rope = m->cfg.qk_rope_head_dim,
                           .page_size = page_size,
                           .n_pages = n_pages};
  if (mtp && !m->has_mtp) {
    EPIC_LOG_ERROR("model: no MTP layer loaded");
    return EPIC_ERR_INVALID;
  }
  return epic_kvcache_create(m->ops, &p, out);
}

/* ---------------------------------------------------------------- forward */

int64_t epic_seq_out_rows(const epic_seq_batch *b) {
  return b->all_logits || b->all_hidden ? b->n_tokens : 1;
}

int64_t epic_batch_out_rows(const epic_seq_batch *seqs, int n_seqs) {
  int64_t r = 0;
  for (int i = 0; i < n_seqs; i++) r += epic_seq_out_rows(&seqs[i]);
  return r;
}

/* The rows of one sequence the LM head runs on (all_logits: every token's; else the
 * last). */
static int64_t seq_lm_rows(const epic_seq_batch *sq) {
  return sq->all_logits ? sq->n_tokens : 1;
}

/* The rows of a batch the LM head runs on. */
static int64_t lm_rows_of(const epic_seq_batch *seqs, int n_seqs) {
  int64_t r = 0;
  for (int i = 0; i < n_seqs; i++)
    r += seq_lm_rows(&seqs[i]);
  return r;
}

/* Sizes that shape one forward's scratch, from the batch (see prepare). */
typedef struct fwd_shape {
  int64_t M;        /* tokens */
  int64_t Mw;       /* tokens of the larger micro-batch */
  int64_t max_ctx;  /* keys of the longest naive-attention (prefill) chunk */
  int64_t n_dec;    /* rows of absorbed attention (absorbed()), the longest absorbed run */
  int64_t n_trows;  /* block-table rows: one per absorbed row, one per other sequence */
  int64_t dec_ctx;  /* keys the longest absorbed row sees (its own included) */
  int64_t out_rows; /* output rows (hidden rows to the caller, see epic_batch_out_rows) */
  int64_t lm_rows;  /* of which the LM head's (all of them unless some are all_hidden) */
  int64_t stride;   /* block-table row: the most pages any sequence holds */
  int64_t per_seq;  /* tokens of every sequence where all have as many, else 0 */
  int n_seqs;
  int draws;        /* some sequence's pick is a draw (epic_seq_batch.draw) */
} fwd_shape;

/* 32-bit words of one LM-head row's draw parameters in the plan. */
#define DRAW_WORDS ((int64_t)(sizeof(epic_draw_params) / sizeof(int32_t)))

/* Words of the plan's index arrays. */
static int64_t plan_index_len(const fwd_shape *sh) {
  return 2 * sh->M + sh->out_rows + sh->n_trows * (sh->stride + 1) +
         (sh->lm_rows < sh->out_rows ? sh->lm_rows : 0);
}

/* Where the plan's draw parameters start: after the index arrays, at an even word (8-byte
 * aligned, like the plan). */
static int64_t plan_draw_at(const fwd_shape *sh) {
  return (plan_index_len(sh) + 1) & ~(int64_t)1;
}

/* int32 entries of the forward plan: positions, ids, output rows, block tables, lengths,
 * the LM head's rows when they are fewer than the output rows, then, where a sequence
 * draws, every LM-head row's draw parameters. */
static int64_t plan_len(const fwd_shape *sh) {
  return plan_draw_at(sh) + (sh->draws ? sh->lm_rows * DRAW_WORDS : 0);
}

/* Chunks that take the absorbed decode attention, one row per token at its own context
 * length (the keys up to its position), as plain decoding does: single tokens, and runs
 * of at most ABSORB_MAX_TOKENS after a cached prefix (MTP verify steps, short
 * continuations). The naive form decompresses every cached key through kv_b for the
 * chunk (context x heads x (nope + v) x lora multiply-adds), the absorbed one reads each
 * 576-wide cached row once per row (rows x context x heads x 576): far less for a few
 * rows after a long prefix. Prompts from position 0 stay on the naive form. */
enum { ABSORB_MAX_TOKENS = 16 };
static int absorbed(const epic_seq_batch *sq) {
  return sq->n_tokens == 1 || (sq->start > 0 && sq->n_tokens <= ABSORB_MAX_TOKENS);
}

/* Carve the scratch for a forward of shape sh. */
static epic_status scratch_get(epic_model *m, const fwd_shape *sh, scratch *s) {
  const epic_model_config *c = &m->cfg;
  const int64_t D = c->hidden_size, H = c->num_attention_heads;
  const int64_t dq = c->qk_nope_head_dim + c->qk_rope_head_dim;
  const int64_t dkv = c->qk_nope_head_dim + c->v_head_dim;
  const int64_t L = c->kv_lora_rank, R = c->qk_rope_head_dim, V = c->v_head_dim;
  const int64_t E = c->n_routed_experts > 0 ? c->n_routed_experts : 1;
  const int64_t K = c->num_experts_per_tok > 0 ? c->num_experts_per_tok : 1;
  const int64_t M = sh->M, Mw = sh->Mw, max_ctx = sh->max_ctx, out_rows = sh->out_rows;
  const int64_t max_abs = sh->n_dec > 0 ? sh->n_dec : 1;
  const int64_t n_logits = m->ops->vt->host_visible ? 0 : sh->lm_rows * c->vocab_size;
  int64_t I = c->intermediate_size;
  if (c->moe_intermediate_size * (c->n_shared_experts > 1 ? c->n_shared_experts : 1) > I)
    I = c->moe_intermediate_size * (c->n_shared_experts > 1 ? c->n_shared_experts : 1);
  struct {
    void **p;
    size_t n;
  } parts[] = {
      /* whole batch */
      {(void **)&s->h, (size_t)(M * D) * 4},          {(void **)&s->a, (size_t)(M * D) * 4},
      {(void **)&s->y, (size_t)(M * D) * 4},          {(void **)&s->hn, (size_t)(M * D) * 4},
      {(void **)&s->rows, (size_t)(out_rows * D) * 4}, {(void **)&s->x2, (size_t)(M * 2 * D) * 4},
      {(void **)&s->idx, (size_t)(M * K) * 4},        {(void **)&s->w, (size_t)(M * K) * 4},
      {(void **)&s->tok_list, (size_t)(M * K) * 4},   {(void **)&s->plan, (size_t)plan_len(sh) * 4},
      {(void **)&s->logits, (size_t)n_logits * 4},
      {(void **)&s->pick, (size_t)(2 * sh->lm_rows) * 4},
      /* work space of one micro-batch */
      {(void **)&s->q, (size_t)(Mw * H * dq) * 4},
      {(void **)&s->cq, (size_t)(Mw * (c->q_lora_rank + L + R + 1)) * 4}, /* qkv_a's output */
      {(void **)&s->kv, (size_t)(Mw * (L + R)) * 4},  {(void **)&s->attn_o, (size_t)(Mw * H * V) * 4},
      {(void **)&s->tmp, (size_t)(Mw * D) * 4},       {(void **)&s->g, (size_t)(Mw * 2 * I) * 4},
      {(void **)&s->rl, (size_t)(Mw * E) * 4},
      {(void **)&s->q_abs, (size_t)(max_abs * H * L) * 4},
      {(void **)&s->q_pe, (size_t)(max_abs * H * R + 1) * 4},
      {(void **)&s->ctx, (size_t)(max_abs * H * L) * 4},
      {(void **)&s->lat, (size_t)(max_ctx * L) * 4},  {(void **)&s->kpe, (size_t)(max_ctx * R + 1) * 4},
      {(void **)&s->kvb, (size_t)(max_ctx * H * dkv) * 4},
  };
  const size_t n_parts = sizeof parts / sizeof parts[0];
  size_t total = 0;
  for (size_t i = 0; i < n_parts; i++) total += (parts[i].n + 255) & ~(size_t)255;
  if (total > m->arena_bytes) {
    m->ops->vt->free(m->ops, m->arena);
    m->arena = NULL;
    m->arena_bytes = 0;
    EPIC_CHECK(m->ops->vt->alloc(m->ops, total, &m->arena));
    m->arena_bytes = total;
  }
  {
    char *p = m->arena;
    for (size_t i = 0; i < n_parts; i++) {
      *parts[i].p = p;
      p += (parts[i].n + 255) & ~(size_t)255; /* 256: vector loads on every backend */
    }
  }
  return EPIC_OK;
}

/* The view of micro-batch rows [r0, ...): its slice of the batch arrays, the
 * shared work space as is. */
static scratch scratch_slice(const scratch *s, int64_t r0, int64_t D, int64_t K) {
  scratch t = *s;
  t.h += r0 * D;
  t.a += r0 * D;
  t.y += r0 * D;
  t.pos += r0;
  t.ids += r0;
  t.idx += r0 * K;
  t.w += r0 * K;
  t.tok_list += r0 * K;
  return t;
}

/* Host buffer `which` of micro-batch slot `slot`, grown to at least `bytes`
 * (never NULL on success, also for 0 bytes; contents are not kept when it
 * grows); NULL when out of memory. */
static void *xbuf(epic_model *m, int slot, int which, size_t bytes) {
  if (bytes > m->xcap[slot][which] || !m->xbuf[slot][which]) {
    free(m->xbuf[slot][which]);
    m->xbuf[slot][which] = malloc(bytes ? bytes : 1);
    m->xcap[slot][which] = m->xbuf[slot][which] ? bytes : 0;
  }
  return m->xbuf[slot][which];
}

/* The backend queue that device-buffer exchanges are ordered against without the host
 * waiting (NCCL on a CUDA backend), or NULL: then the host waits for each exchange and
 * synchronises the backend before one starts. */
static void *ordered(const epic_model *m) {
  return m->comm && epic_comm_device_buffers(m->comm) ? epic_ops_queue(m->ops) : NULL;
}

/* Wait on the host for the exchanges the backend queue waits for (see queued): before
 * anything makes the host wait for the queue, so that a lost peer ends in the
 * exchange's timeout and not in a wait without one. */
static epic_status drain(epic_model *m) {
  epic_status st = EPIC_OK;
  for (int i = 0; i < m->n_queued; i++) {
    const double t = epic_now_seconds();
    const epic_status s1 = epic_comm_wait(&m->queued[i].req);
    *m->queued[i].wait_s += epic_now_seconds() - t;
    if (st == EPIC_OK) st = s1;
  }
  m->n_queued = 0;
  return st;
}

/* upload, queued without the host waiting where exchanges are ordered on the queue
 * (the host must not wait there before it has drained them). */
static epic_status upload_plan(epic_model *m, void *dst, const void *src, size_t bytes) {
  if (ordered(m)) return m->ops->vt->upload_async(m->ops, dst, src, bytes);
  return m->ops->vt->upload(m->ops, dst, src, bytes);
}

/* The same in backend memory. Growing frees the old block, so no op may still be
 * queued on it: the callers grow only buffers whose last use is behind a host
 * round trip (a download) of the same forward or an earlier one. */
static void *dbuf(epic_model *m, int slot, int which, size_t bytes) {
  epic_ops *o = m->ops;
  if (bytes > m->dcap[slot][which] || !m->dbuf[slot][which]) {
    void *p = NULL;
    if (drain(m) != EPIC_OK || o->vt->sync(o) != EPIC_OK) return NULL;
    o->vt->free(o, m->dbuf[slot][which]);
    m->dbuf[slot][which] = NULL;
    m->dcap[slot][which] = 0;
    if (o->vt->alloc(o, bytes > 256 ? bytes : 256, &p) != EPIC_OK) return NULL;
    m->dbuf[slot][which] = p;
    m->dcap[slot][which] = bytes > 256 ? bytes : 256;
  }
  return m->dbuf[slot][which];
}

/* n int32 values of backend memory as host memory: the buffer itself when the
 * backend's memory is host memory, else a download into host buffer (slot, which). */
static epic_status to_host_i32(epic_model *m, const int32_t *dev, int64_t n, int slot, int which,
                               const int32_t **out) {
  int32_t *h;
  if (m->ops->vt->host_visible) {
    *out = dev;
    return EPIC_OK;
  }
  h = xbuf(m, slot, which, (size_t)n * sizeof *h);
  if (!h) return EPIC_ERR_NOMEM;
  EPIC_CHECK(drain(m));
  EPIC_CHECK(m->ops->vt->download(m->ops, h, dev, (size_t)n * sizeof *h));
  *out = h;
  return EPIC_OK;
}

/* A micro-batch: a contiguous run of the batch's sequences and, between the
 * phases of an MoE layer, the state of its expert-parallel exchange. */
typedef struct micro_batch {
  int id; /* 0 or 1: its slot of the exchange buffers */
  const epic_seq_batch *seqs;
  int n_seqs;
  int seq0;  /* index of seqs[0] in the forward's batch (its block-table row) */
  int64_t M; /* tokens */
  scratch s; /* its slice of the batch rows, plus the shared work space */
  int64_t *send_rows, *recv_rows; /* [nranks]: dispatch rows to / from each rank */
  int64_t *ecnt; /* [2][nranks][experts]: the same per expert (sent, then received) */
  int64_t R;                      /* rows received for this rank's experts */
  float *send, *recv, *out, *back; /* backend memory */
  /* Single process: out holds the expert results in expert order, and slot[i] the
   * row of out that item i's result is in (moe_combine reads them through it). */
  int32_t *slot;
  epic_comm_req *req; /* the dispatch or combine in flight, if any */
  epic_status req_st; /* its result when progress() saw it finish */
  /* Host staging of the exchange in flight (device rows over a host-memory comm):
   * when it completes, stage_bytes of stage_host go up to stage_dev. */
  float *stage_dev;
  const float *stage_host;
  size_t stage_bytes;
} micro_batch;

/* One forward call over micro-batches. */
typedef struct fwd {
  epic_model *m;
  epic_kvcache *kc;
  int n_mb;
  micro_batch mb[MAX_MB];
  /* Parts of the uploaded plan (backend memory). */
  const int32_t *out_rows; /* hn row of each output row */
  /* With fewer LM-head rows than output rows (all_hidden), the hn row of each LM-head
   * row, and (host) the output row it is; else NULL. */
  const int32_t *lm_rows, *lm_out;
  const int32_t *tables;   /* [table rows][stride] page ids (see fwd_plan) */
  const int32_t *n_ctx;    /* [table rows] cache length each row's attention sees */
  const int32_t *trow;     /* host: the first table row of each sequence of the batch */
  const epic_draw_params *draw; /* [LM-head rows], or NULL: no draws */
  int64_t stride;
  int64_t dec_bound; /* decode attention's bound on every context (ctx_bound) */
} fwd;

/* MPI and UCX move large messages (rendezvous) only inside their own calls, so
 * a rank that computes while an exchange is in flight pokes it now and then. */
static void progress(fwd *f) {
  for (int i = 0; i < f->n_mb; i++) {
    micro_batch *b = &f->mb[i];
    int done = 0;
    if (b->req) {
      epic_status st = epic_comm_test(&b->req, &done);
      if (st < 0) b->req_st = st;
    }
  }
}

/* Block until the micro-batch's exchange is complete (and its staged rows are in
 * backend memory); the time goes to *wait_s. Where exchanges are ordered on the backend
 * queue, the queue waits for it instead and the host goes on (drain waits later). */
static epic_status wait_exchange(epic_model *m, micro_batch *b, double *wait_s) {
  void *q = ordered(m);
  if (q && b->req) {
    if (m->n_queued == (int)(sizeof m->queued / sizeof m->queued[0])) EPIC_CHECK(drain(m));
    EPIC_CHECK(epic_comm_req_queue_wait(b->req, q));
    m->queued[m->n_queued].req = b->req;
    m->queued[m->n_queued++].wait_s = wait_s;
    b->req = NULL;
    return EPIC_OK;
  }
  const double t = epic_now_seconds();
  epic_status st = b->req ? epic_comm_wait(&b->req) : b->req_st;
  b->req_st = EPIC_OK;
  if (st == EPIC_OK && b->stage_dev)
    st = m->ops->vt->upload(m->ops, b->stage_dev, b->stage_host, b->stage_bytes);
  b->stage_dev = NULL;
  *wait_s += epic_now_seconds() - t;
  return st;
}

/* Start the all-to-all of row-major float rows of `width` values: send_rows[p]
 * rows to rank p, recv_rows[p] rows from it, packed in rank order on both sides,
 * in backend memory. A comm backend that moves host memory gets host copies (the
 * received rows go up in wait_exchange); one that moves device memory (NCCL, on
 * its own stream) starts after the queued ops that wrote the rows. Adds the bytes
 * sent to other ranks to *sent. */
static epic_status exchange_start(epic_model *m, micro_batch *b, const float *send,
                                  const int64_t *send_rows, float *recv, const int64_t *recv_rows,
                                  int64_t width, int64_t *sent) {
  epic_ops *o = m->ops;
  const int P = m->nranks;
  size_t *sb = xbuf(m, 0, XB_ARGS, 4 * (size_t)P * sizeof(size_t)), *sd, *rb, *rd, so = 0, ro = 0;
  if (!sb) return EPIC_ERR_NOMEM;
  sd = sb + P;
  rb = sd + P;
  rd = rb + P;
  for (int p = 0; p < P; p++) {
    sb[p] = (size_t)(send_rows[p] * width) * sizeof(float);
    rb[p] = (size_t)(recv_rows[p] * width) * sizeof(float);
    sd[p] = so;
    rd[p] = ro;
    so += sb[p];
    ro += rb[p];
    if (p != m->rank) *sent += (int64_t)sb[p];
  }
  void *q = ordered(m);
  if (epic_comm_device_buffers(m->comm)) {
    /* after the queued ops that wrote the rows: on the device (q), else by waiting here */
    if (!q) EPIC_CHECK(o->vt->sync(o));
  } else if (!o->vt->host_visible) {
    float *hs = xbuf(m, b->id, XB_HSEND, so), *hr = xbuf(m, b->id, XB_HRECV, ro);
    if (!hs || !hr) return EPIC_ERR_NOMEM;
    EPIC_CHECK(o->vt->download(o, hs, send, so));
    b->stage_dev = recv;
    b->stage_host = hr;
    b->stage_bytes = ro;
    send = hs;
    recv = hr;
  }
  /* The start copies the counts it needs; only the data buffers stay in use. */
  epic_a2a_args a = {.send = send, .send_counts = sb, .send_displs = sd, .recv = recv,
                     .recv_counts = rb, .recv_displs = rd, .after = q};
  m->stats.a2a_calls++;
  return epic_comm_alltoallv_start(m->comm, &a, &b->req);
}

/* y = down(silu(gate(x)) * up(x)) for the dense MLP or shared experts of lw on rows of x.
 * g: work space of rows x 2W floats (W = the MLP's width): gate's outputs, then up's (or,
 * joined, [rows][2W] with gate then up in each row). */
static epic_status mlp(epic_model *m, const layer_w *lw, const float *x, int64_t rows, float *g,
                       float *y) {
  epic_ops *o = m->ops;
  const int64_t D = m->cfg.hidden_size, W = lw->gate.rows;
  const int joined = lw->gate_up.data != NULL;
  const int64_t ld = joined ? 2 * W : W; /* row stride of gate's and up's outputs */
  float *u = joined ? g + W : g + rows * W;
  if (joined) {
    EPIC_CHECK(o->vt->matmul(o, x, D, rows, &lw->gate_up, g, 2 * W));
  } else {
    EPIC_CHECK(o->vt->matmul(o, x, D, rows, &lw->gate, g, W));
    EPIC_CHECK(o->vt->matmul(o, x, D, rows, &lw->up, u, W));
  }
  EPIC_CHECK(o->vt->silu_mul(o, g, ld, u, ld, rows, W, g, ld));
  return o->vt->matmul(o, g, ld, rows, &lw->down, y, D);
}

/* Counting sort of n items by expert id (expert[i] in [0, E)): order[off[e] ..
 * off[e+1]) lists the items routed to e in item order, so results do not depend
 * on how the batch is laid out. off has E + 1 entries, fill is scratch of E. */
static void bucket_by_expert(const int32_t *expert, int64_t n, int64_t E, int64_t *off,
                             int64_t *fill, int32_t *order) {
  memset(fill, 0, (size_t)E * sizeof *fill);
  for (int64_t i = 0; i < n; i++) fill[expert[i]]++;
  off[0] = 0;
  for (int64_t e = 0; e < E; e++) off[e + 1] = off[e] + fill[e];
  memset(fill, 0, (size_t)E * sizeof *fill);
  for (int64_t i = 0; i < n; i++) order[off[expert[i]] + fill[expert[i]]++] = (int32_t)i;
}

/* Router (expert ids + weights into s->idx / s->w) and the shared experts into y
 * (zeros when the layer has none): the part of an MoE layer every rank does
 * locally for its own tokens. */
static epic_status route_and_share(epic_model *m, const layer_w *lw, const float *f, int64_t M,
                                   scratch *s, float *y) {
  epic_ops *o = m->ops;
  const epic_model_config *c = &m->cfg;
  const int64_t D = c->hidden_size, E = c->n_routed_experts;
  epic_router_params rp = {.n_experts = E,
                           .top_k = c->num_experts_per_tok,
                           .n_group = c->n_group,
                           .topk_group = c->topk_group,
                           .scoring = strcmp(c->scoring_func, "softmax") == 0,
                           .norm_topk_prob = c->norm_topk_prob,
                           .routed_scaling_factor = (float)c->routed_scaling_factor,
                           .bias = lw->router_bias};
  EPIC_CHECK(o->vt->matmul(o, f, D, M, &lw->router, s->rl, E));
  EPIC_CHECK(o->vt->route(o, s->rl, M, &rp, s->idx, s->w));
  if (lw->has_mlp) return mlp(m, lw, f, M, s->g, y);
  return o->vt->zero(o, y, (size_t)(M * D) * sizeof(float));
}

/* The expert groups of one MoE pass: host offsets (off, with off_dev their backend
 * copy or NULL) for grouped_matmul, or backend offsets only (off NULL) with a bound on
 * the rows per group for grouped_matmul_dev. w: n_groups entries of 3 projections.
 * rows (with off): the input's row of each group row (of n_src), for grouped_matmul_rows. */
typedef struct {
  const int64_t *off;
  const int32_t *off_dev, *rows;
  int64_t n_groups, max_rows, n_src;
  const epic_weight *w;
} expert_groups;

static epic_status grouped(epic_ops *o, const expert_groups *eg, int proj, const float *x,
                           int64_t ldx, int64_t n, float *y, int64_t ldy) {
  if (eg->rows)
    return o->vt->grouped_matmul_rows(o, x, ldx, eg->n_src, eg->rows, eg->off, eg->off_dev,
                                      eg->n_groups, &eg->w[proj], EXPERT_W, y, ldy);
  if (!eg->off)
    return o->vt->grouped_matmul_dev(o, x, ldx, n, eg->max_rows, eg->off_dev, eg->n_groups,
                                     &eg->w[proj], EXPERT_W, y, ldy);
  return o->vt->grouped_matmul(o, x, ldx, eg->off, eg->off_dev, eg->n_groups, &eg->w[proj], EXPERT_W, y,
                               ldy);
}

/* Whether every expert of eg that has weights has them fused (EXPERT_W): then gate and
 * up run as one grouped matmul over the gate_up views. */
static int groups_fused(const expert_groups *eg) {
  for (int64_t g = 0; g < eg->n_groups; g++) {
    const epic_weight *w = &eg->w[g * EXPERT_W];
    if (w[EXPERT_GATE].data && !w[EXPERT_GATE_UP].data) return 0;
  }
  return 1;
}

/* 0, 1, ..., n - 1 as int32 in backend memory (uploaded when it grows, which the first,
 * unrecorded step of a graph bucket does). */
static const int32_t *iota_dev(epic_model *m, int64_t n) {
  const size_t bytes = (size_t)n * sizeof(int32_t);
  if (m->dcap[0][DB_IOTA] < bytes || !m->dbuf[0][DB_IOTA]) {
    int32_t *d = dbuf(m, 0, DB_IOTA, bytes);
    const int64_t cap = d ? (int64_t)(m->dcap[0][DB_IOTA] / sizeof(int32_t)) : 0;
    int32_t *h = d ? malloc((size_t)cap * sizeof *h) : NULL;
    epic_status st = h ? EPIC_OK : EPIC_ERR_NOMEM;
    for (int64_t i = 0; h && i < cap; i++) h[i] = (int32_t)i;
    if (st == EPIC_OK) st = m->ops->vt->upload(m->ops, d, h, (size_t)cap * sizeof *h);
    free(h);
    if (st != EPIC_OK) { /* not filled: the next call tries again */
      m->ops->vt->free(m->ops, m->dbuf[0][DB_IOTA]);
      m->dbuf[0][DB_IOTA] = NULL;
      m->dcap[0][DB_IOTA] = 0;
      return NULL;
    }
  }
  return m->dbuf[0][DB_IOTA];
}

/* The experts' FFN over n items planned in dplan (backend memory, as moe_plan lays it
 * out; item i reads row i / div of src): rows gathered in expert order, one grouped
 * matmul per projection (gate and up as one where fused). Without slot the results are
 * scattered back to out in item order (the expert-parallel exchange sends them so). With
 * slot they stay in out in expert order and slot[i] gets the row of item i's result, for
 * moe_combine to read them through: the scatter pass (a write and a read of every result
 * row: about 1 ms per MoE layer of an 8192-token prefill step on an H200) and its buffer
 * are saved. */
static epic_status expert_ffn(fwd *f, const expert_groups *eg, int64_t n, const float *src,
                              int64_t ld, int64_t div, const int32_t *dplan, float *out,
                              int32_t *slot) {
  epic_model *m = f->m;
  epic_ops *o = m->ops;
  const int64_t D = m->cfg.hidden_size, I = m->cfg.moe_intermediate_size;
  const int fused = groups_fused(eg);
  /* With host offsets a backend that multiplies gathered rows reads the inputs through
   * the plan's source rows (no gathered copy: about 1 ms per MoE layer of an 8192-token
   * prefill step); otherwise they are gathered here. */
  const int in_op = eg->off && epic_ops_has_grouped_rows(o);
  const expert_groups egr = {.off = eg->off,
                             .off_dev = eg->off_dev,
                             .rows = dplan,
                             .n_groups = eg->n_groups,
                             .max_rows = eg->max_rows,
                             .n_src = (n + div - 1) / div,
                             .w = eg->w};
  float *x = in_op ? NULL : dbuf(m, 0, DB_X, (size_t)(n * D) * sizeof(float));
  float *g = dbuf(m, 0, DB_G, (size_t)(n * (fused ? 2 * I : I)) * sizeof(float));
  float *u = fused ? g + I : dbuf(m, 0, DB_U, (size_t)(n * I) * sizeof(float));
  float *ye = slot ? out : dbuf(m, 0, DB_Y, (size_t)(n * D) * sizeof(float));
  /* fused: one [n][2I] output, gate then up in each row */
  const int64_t ldg = fused ? 2 * I : I;
  if ((!x && !in_op) || !g || !u || !ye) return EPIC_ERR_NOMEM;
  if (!in_op) EPIC_CHECK(o->vt->copy_rows(o, n, D, src, ld, dplan, x, D, NULL));
  const expert_groups *gin = in_op ? &egr : eg; /* the first projection(s) */
  const float *xin = in_op ? src : x;
  const int64_t ldin = in_op ? ld : D;
  if (fused) {
    EPIC_CHECK(grouped(o, gin, EXPERT_GATE_UP, xin, ldin, n, g, 2 * I));
  } else {
    EPIC_CHECK(grouped(o, gin, EXPERT_GATE, xin, ldin, n, g, I));
    EPIC_CHECK(grouped(o, gin, EXPERT_UP, xin, ldin, n, u, I));
  }
  progress(f);
  EPIC_CHECK(o->vt->silu_mul(o, g, ldg, u, ldg, n, I, g, ldg));
  EPIC_CHECK(grouped(o, eg, EXPERT_DOWN, g, ldg, n, ye, D));
  progress(f);
  if (slot) {
    /* slot[dplan[n + j]] = j: the inverse of the plan's result rows */
    const int32_t *iota = iota_dev(m, n);
    if (!iota) return EPIC_ERR_NOMEM;
    return o->vt->copy_rows(o, n, 1, (const float *)iota, 1, NULL, (float *)slot, 1, dplan + n);
  }
  return o->vt->copy_rows(o, n, D, ye, D, NULL, out, D, dplan + n);
}

/* This rank's routed experts of lw over n items, item i routed to expert[i]
 * (host memory): out[i] = expert(src row i / div) for rows src + r * ld, all in
 * backend memory. The items' rows are gathered in expert order, run through one
 * grouped matmul per projection and scattered back, with one index upload. */
static epic_status run_experts(fwd *f, const layer_w *lw, const int32_t *expert, int64_t n,
                               const float *src, int64_t ld, int64_t div, float *out,
                               int32_t *slot) {
  epic_model *m = f->m;
  epic_ops *o = m->ops;
  const int64_t E = m->cfg.n_routed_experts;
  int64_t *off = xbuf(m, 0, XB_EOFF, (size_t)(2 * E + 1) * sizeof(int64_t));
  int32_t *order = xbuf(m, 0, XB_ORDER, (size_t)n * sizeof(int32_t));
  /* [n] source rows, [n] result rows, [E + 1] group offsets */
  int32_t *gplan = xbuf(m, 0, XB_GPLAN, (size_t)(2 * n + E + 1) * sizeof(int32_t)), *dplan;
  expert_groups eg = {.off = off, .n_groups = E, .w = lw->experts};
  if (!off || !order || !gplan) return EPIC_ERR_NOMEM;
  if (n == 0) return EPIC_OK;
  /* Ascending expert order with item order kept inside an expert: no result
   * depends on the batch layout. */
  bucket_by_expert(expert, n, E, off, off + E + 1, order);
  for (int64_t j = 0; j < n; j++) {
    gplan[j] = (int32_t)(order[j] / div); /* source row */
    gplan[n + j] = order[j];              /* result row */
  }
  for (int64_t e = 0; e <= E; e++) gplan[2 * n + e] = (int32_t)off[e];
  dplan = dbuf(m, 0, DB_GPLAN, (size_t)(2 * n + E + 1) * sizeof(int32_t));
  if (!dplan) return EPIC_ERR_NOMEM;
  eg.off_dev = dplan + 2 * n;
  EPIC_CHECK(upload_plan(m, dplan, gplan, (size_t)(2 * n + E + 1) * sizeof(int32_t)));
  if (o->vt->host_visible) {
    /* Row-independent expert math: the CPU matmul sums in one order up to
     * EP_ROW_CHUNK rows and in sgemm's beyond, so each expert's rows go in chunks
     * of at most that many. A row's result is then the same bitwise whichever
     * other rows share its expert here: on any copy of the expert (EPLB), in any
     * batch composition. */
    const int64_t cap = E + n / EP_ROW_CHUNK + 1;
    int64_t *soff = xbuf(m, 0, XB_SOFF, (size_t)(cap + 1) * sizeof *soff);
    epic_weight *swl = xbuf(m, 0, XB_SWL, (size_t)(cap * EXPERT_W) * sizeof *swl);
    int64_t ng = 0;
    if (!soff || !swl) return EPIC_ERR_NOMEM;
    soff[0] = 0;
    for (int64_t e = 0; e < E; e++)
      for (int64_t r = off[e]; r < off[e + 1]; r += EP_ROW_CHUNK) {
        memcpy(&swl[ng * EXPERT_W], &lw->experts[e * EXPERT_W], EXPERT_W * sizeof *swl);
        soff[++ng] = r + EP_ROW_CHUNK < off[e + 1] ? r + EP_ROW_CHUNK : off[e + 1];
      }
    eg = (expert_groups){.off = soff, .n_groups = ng, .w = swl};
  }
  return expert_ffn(f, &eg, n, src, ld, div, dplan, out, slot);
}

/* run_experts with the plan built on the backend from ids in backend memory (ABI 6
 * moe_plan): no host round trip. Every expert has at most max_rows items. The counts go
 * to m->dev_tokens (see epic_model_expert_tokens). */
static epic_status run_experts_dev(fwd *f, const layer_w *lw, const int32_t *idx, int64_t n,
                                   int64_t max_rows, const float *src, int64_t ld, int64_t div,
                                   float *out, int32_t *slot) {
  epic_model *m = f->m;
  epic_ops *o = m->ops;
  const int64_t E = m->cfg.n_routed_experts;
  const size_t n_counts = (size_t)((m->cfg.num_hidden_layers + 1) * E) * sizeof(int64_t);
  int32_t *dplan = dbuf(m, 0, DB_GPLAN, (size_t)(2 * n + E + 1) * sizeof(int32_t));
  if (!dplan) return EPIC_ERR_NOMEM;
  if (!m->dev_tokens) {
    EPIC_CHECK(o->vt->alloc(o, n_counts, (void **)&m->dev_tokens));
    EPIC_CHECK(o->vt->zero(o, m->dev_tokens, n_counts));
  }
  EPIC_CHECK(o->vt->moe_plan(o, idx, n, E, div, dplan, m->dev_tokens + lw->slot * E));
  const expert_groups eg = {
      .off_dev = dplan + 2 * n, .n_groups = E, .max_rows = max_rows, .w = lw->experts};
  return expert_ffn(f, &eg, n, src, ld, div, dplan, out, slot);
}

/* MoE phase 1 of 3 (DESIGN §3): router and shared experts for the
 * micro-batch's tokens; with expert parallelism also the dispatch, which sends
 * each (token, expert) row, tagged with the expert id, to the expert's owner.
 * The counts exchange blocks, the rows travel asynchronously. Collective: a
 * micro-batch without tokens still takes part. */
static epic_status moe_begin(fwd *f, micro_batch *b, const layer_w *lw) {
  epic_model *m = f->m;
  epic_ops *o = m->ops;
  scratch *s = &b->s;
  const int64_t D = m->cfg.hidden_size, E = m->cfg.n_routed_experts;
  const int64_t K = m->cfg.num_experts_per_tok, M = b->M;
  const int P = m->nranks;
  const int32_t *roff = m->rep_off ? m->rep_off + lw->slot * E : NULL, *ids;
  double t = epic_now_seconds();
  int64_t *ecnt, *next;
  int32_t *seen, *dest;
  int32_t *plan, *dplan; /* [M*K] source token of each send row, [M*K] tok_list */
  if (M > 0) EPIC_CHECK(route_and_share(m, lw, s->a, M, s, s->y));
  m->stats.dense_s += epic_now_seconds() - t;
  if (!m->comm) return EPIC_OK;
  b->send_rows = xbuf(m, b->id, XB_CNT, 2 * (size_t)P * sizeof(int64_t));
  /* [P][E] rows this micro-batch sends to each rank for each expert, then [P][E] those it
   * receives (kept for moe_experts), then [P][E] scratch */
  b->ecnt = ecnt = xbuf(m, b->id, XB_ECNT, 3 * (size_t)(P * E) * sizeof(int64_t));
  plan = xbuf(m, b->id, XB_PLAN, (size_t)(2 * M * K) * sizeof(int32_t));
  dest = xbuf(m, 0, XB_DEST, (size_t)(M * K) * sizeof(int32_t));
  b->send = dbuf(m, b->id, DB_SEND, (size_t)(M * K * D) * sizeof(float));
  dplan = dbuf(m, b->id, DB_PLAN, (size_t)(2 * M * K) * sizeof(int32_t));
  if (!b->send_rows || !ecnt || !plan || !dest || !b->send || !dplan) return EPIC_ERR_NOMEM;
  EPIC_CHECK(to_host_i32(m, s->idx, M * K, b->id, XB_IDS, &ids));
  count_experts(m, lw->slot, ids, M * K);
  seen = xbuf(m, 0, XB_COPY, (size_t)E * sizeof *seen);
  if (!seen) return EPIC_ERR_NOMEM;
  b->recv_rows = b->send_rows + P;
  next = ecnt + 2 * P * E;
  memset(b->send_rows, 0, 2 * (size_t)P * sizeof(int64_t));
  memset(ecnt, 0, (size_t)(P * E) * sizeof *ecnt);
  /* The copy of expert e that serves this rank's j-th row for e (in (token, k)
   * order): copy (j + rank) mod copies, so every rank spreads its rows evenly over
   * the copies, starting at a different one. Deterministic; any copy gives the same
   * result (same weights, row-independent expert math). */
  memset(seen, 0, (size_t)E * sizeof *seen);
  for (int64_t i = 0; i < M * K; i++) {
    const int32_t e = ids[i];
    dest[i] = m->rep_rank[roff[e] + (seen[e]++ + m->rank) % (roff[e + 1] - roff[e])];
    ecnt[dest[i] * E + e]++;
  }
  /* Rows grouped by destination rank, by expert inside, (token, k) order inside that:
   * the receiver knows each row's expert from the counts alone (no tags to read back),
   * and its groups keep the source-rank-then-(token, k) order they always had. */
  int64_t pos = 0;
  for (int64_t c = 0; c < P * E; c++) {
    next[c] = pos;
    pos += ecnt[c];
    b->send_rows[c / E] += ecnt[c];
  }
  for (int64_t i = 0; i < M * K; i++) {
    const int64_t at = next[dest[i] * E + ids[i]]++;
    plan[at] = (int32_t)(i / K);
    plan[M * K + i] = (int32_t)at; /* where (token, k)'s result comes back */
  }
  if (M > 0) {
    EPIC_CHECK(upload_plan(m, dplan, plan, (size_t)(2 * M * K) * sizeof(int32_t)));
    EPIC_CHECK(o->vt->copy_rows(o, M * K, D, s->a, D, dplan, b->send, D, NULL));
    EPIC_CHECK(o->vt->copy_rows(o, 1, M * K, (const float *)(dplan + M * K), 0, NULL,
                                (float *)s->tok_list, 0, NULL));
  }
  t = epic_now_seconds();
  EPIC_CHECK(epic_comm_alltoall_counts_n(m->comm, ecnt, ecnt + P * E, E));
  m->stats.dispatch_wait_s += epic_now_seconds() - t;
  b->R = 0;
  for (int64_t c = 0; c < P * E; c++) b->recv_rows[c / E] += ecnt[P * E + c];
  for (int p = 0; p < P; p++) b->R += b->recv_rows[p];
  b->recv = dbuf(m, b->id, DB_RECV, (size_t)(b->R * D) * sizeof(float));
  if (!b->recv) return EPIC_ERR_NOMEM;
  return exchange_start(m, b, b->send, b->send_rows, b->recv, b->recv_rows, D,
                        &m->stats.dispatch_bytes);
}

/* MoE phase 2 of 3: the routed experts this rank holds. Single process: over
 * the micro-batch's own tokens, one result row per (token, k). Expert parallel:
 * wait for the dispatch, run the experts on the rows that arrived and start
 * sending the results back along the reverse route (the combine). */
static epic_status moe_experts(fwd *f, micro_batch *b, const layer_w *lw) {
  epic_model *m = f->m;
  epic_ops *o = m->ops;
  scratch *s = &b->s;
  const int64_t D = m->cfg.hidden_size, E = m->cfg.n_routed_experts;
  const int64_t K = m->cfg.num_experts_per_tok;
  const int P = m->nranks;
  double t;
  int32_t *rexp; /* expert id of each received row */
  if (!m->comm) {
    const int32_t *ids;
    if (b->M == 0) return EPIC_OK;
    t = epic_now_seconds();
    b->out = dbuf(m, b->id, DB_OUT, (size_t)(b->M * K * D) * sizeof(float));
    b->slot = dbuf(m, b->id, DB_SLOT, (size_t)(b->M * K) * sizeof(int32_t));
    if (!b->out || !b->slot) return EPIC_ERR_NOMEM;
    m->stats.expert_rows += b->M * K;
    /* A backend without host memory plans decode-sized batches itself: the routing ids
     * stay where route wrote them. */
    if (dev_planned(o, b->M)) {
      EPIC_CHECK(run_experts_dev(f, lw, s->idx, b->M * K, b->M, s->a, D, K, b->out, b->slot));
    } else {
      EPIC_CHECK(to_host_i32(m, s->idx, b->M * K, b->id, XB_IDS, &ids));
      count_experts(m, lw->slot, ids, b->M * K);
      EPIC_CHECK(run_experts(f, lw, ids, b->M * K, s->a, D, K, b->out, b->slot));
    }
    m->stats.experts_s += epic_now_seconds() - t;
    return EPIC_OK;
  }
  EPIC_CHECK(wait_exchange(m, b, &m->stats.dispatch_wait_s));
  /* Each rank's rows come sorted by expert: their experts follow from the per-expert
   * counts of the exchange (moe_begin), with nothing read back from the rows. */
  const int64_t *rcnt = b->ecnt + P * E;
  rexp = xbuf(m, 0, XB_REXP, (size_t)b->R * sizeof *rexp);
  if (!rexp) return EPIC_ERR_NOMEM;
  int64_t r = 0;
  for (int64_t c = 0; c < P * E; c++) {
    const int32_t e = (int32_t)(c % E);
    if (rcnt[c] > 0 && !m->held[lw->slot * E + e]) {
      EPIC_LOG_ERROR("moe: rank %d received rows for expert %d it does not hold", m->rank, e);
      return EPIC_ERR_COMM;
    }
    for (int64_t j = 0; j < rcnt[c]; j++) rexp[r++] = e;
  }
  b->out = dbuf(m, b->id, DB_OUT, (size_t)(b->R * D) * sizeof(float));
  b->back = dbuf(m, b->id, DB_BACK, (size_t)(b->M * K * D) * sizeof(float));
  if (!b->out || !b->back) return EPIC_ERR_NOMEM;
  t = epic_now_seconds();
  m->stats.expert_rows += b->R;
  EPIC_CHECK(run_experts(f, lw, rexp, b->R, b->recv, D, 1, b->out, NULL));
  m->stats.experts_s += epic_now_seconds() - t;
  return exchange_start(m, b, b->out, b->recv_rows, b->back, b->send_rows, D,
                        &m->stats.combine_bytes);
}

/* MoE phase 3 of 3: add each (token, k) result times its weight, k ascending
 * (route() lists a token's experts in ascending order), the same order whether
 * the results were computed here or came back over the combine, so results do
 * not depend on the world size. */
static epic_status moe_end(fwd *f, micro_batch *b) {
  epic_model *m = f->m;
  epic_ops *o = m->ops;
  scratch *s = &b->s;
  const int64_t D = m->cfg.hidden_size, K = m->cfg.num_experts_per_tok;
  if (m->comm) EPIC_CHECK(wait_exchange(m, b, &m->stats.combine_wait_s));
  if (b->M == 0) return EPIC_OK;
  return o->vt->moe_combine(o, b->M, K, D, m->comm ? b->back : b->out,
                            m->comm ? s->tok_list : b->slot, s->w, s->y);
}

/* head_gemm of n tokens over the per-head slices of kv_b from element `at` of each
 * head's [nope+v][lora] rows, in the type kv_b is kept in. */
static epic_status kv_b_heads(epic_model *m, const layer_w *lw, const float *x, int64_t ld_tok,
                              int64_t ld_head, int64_t n, int64_t at, int64_t k, int64_t cols,
                              int trans, float *y, int64_t ldy_tok, int64_t ldy_head) {
  epic_ops *o = m->ops;
  const epic_model_config *c = &m->cfg;
  const int64_t H = c->num_attention_heads;
  const int64_t lda = (c->qk_nope_head_dim + c->v_head_dim) * c->kv_lora_rank;
  if (lw->kv_b_bf16)
    return o->vt->head_gemm_bf16(o, x, ld_tok, ld_head, n, H, lw->kv_b_bf16 + at, lda, k, cols,
                                 trans, y, ldy_tok, ldy_head);
  return o->vt->head_gemm(o, x, ld_tok, ld_head, n, H, lw->kv_b_f32 + at, lda, k, cols, trans, y,
                          ldy_tok, ldy_head);
}

/* Absorbed attention for n rows r0.. of the work arrays, table rows t0.. of the plan
 * (absorbed() chunks of the micro-batch from its sequence i0 on): one batched cache store
 * and one absorbed-MLA launch for the whole run. */
static epic_status attention_decode(fwd *f, micro_batch *b, const layer_w *lw, int64_t kv_layer,
                                    int i0, int64_t t0, int64_t n, int64_t r0) {
  epic_model *m = f->m;
  epic_ops *o = m->ops;
  scratch *s = &b->s;
  const epic_model_config *c = &m->cfg;
  const int64_t H = c->num_attention_heads, nope = c->qk_nope_head_dim;
  const int64_t R = c->qk_rope_head_dim, V = c->v_head_dim, L = c->kv_lora_rank;
  const int64_t dq = nope + R;
  const float *qs = s->q + r0 * H * dq;
  const epic_kv_view any = epic_kvcache_view(f->kc, kv_layer, b->seqs[i0].kv, 1);
  const epic_kv_batch kvb = {.pool = any.pool,
                             .dtype = any.dtype,
                             .page_size = any.page_size,
                             .width = any.width,
                             .lora = any.lora,
                             .block_tables = f->tables + t0 * f->stride,
                             .table_stride = f->stride,
                             .n_ctx = f->n_ctx + t0,
                             .max_ctx = f->dec_bound};
  EPIC_CHECK(o->vt->kv_store_batch(o, &kvb, n, s->kv + r0 * (L + R), L + R, s->kv + r0 * (L + R) + L,
                                   L + R));
  /* Absorbed form: q_nope through W_UK, then every cached 576-wide (for V3) row
   * read once per head group, then W_UV. */
  EPIC_CHECK(kv_b_heads(m, lw, qs, H * dq, dq, n, 0, nope, L, 0, s->q_abs, H * L, L));
  EPIC_CHECK(o->vt->copy_rows(o, n * H, R, qs + nope, dq, NULL, s->q_pe, R, NULL));
  EPIC_CHECK(o->vt->mla_absorbed_batch(o, &kvb, n, s->q_abs, s->q_pe, H, m->scale, s->ctx));
  return kv_b_heads(m, lw, s->ctx, H * L, L, n, nope * L, L, V, 1, s->attn_o + r0 * H * V, H * V,
                    V);
}

/* MLA for the micro-batch: normed input s->a -> s->tmp (o_proj output). */
static epic_status attention(fwd *f, micro_batch *b, const layer_w *lw, int64_t kv_layer) {
  epic_model *m = f->m;
  epic_ops *o = m->ops;
  scratch *s = &b->s;
  const epic_model_config *c = &m->cfg;
  const int64_t D = c->hidden_size, H = c->num_attention_heads, nope = c->qk_nope_head_dim;
  const int64_t R = c->qk_rope_head_dim, V = c->v_head_dim, L = c->kv_lora_rank;
  const int64_t dq = nope + R, dkv = nope + V, M = b->M;
  const int64_t Qr = c->q_lora_rank, J = Qr + L + R;
  const float eps = (float)c->rms_norm_eps;
  if (lw->qkv_a.data) {
    /* joined: [M][J] rows of q_a's then kv_a's outputs in cq; the latent part normed into
     * kv, the rope part copied after it */
    EPIC_CHECK(o->vt->matmul(o, s->a, D, M, &lw->qkv_a, s->cq, J));
    EPIC_CHECK(o->vt->rmsnorm(o, s->cq + Qr, J, M, L, lw->kv_a_norm, eps, s->kv, L + R));
    EPIC_CHECK(o->vt->copy_rows(o, M, R, s->cq + Qr + L, J, NULL, s->kv + L, L + R, NULL));
    EPIC_CHECK(o->vt->rmsnorm(o, s->cq, J, M, Qr, lw->q_a_norm, eps, s->cq, J));
    EPIC_CHECK(o->vt->matmul(o, s->cq, J, M, &lw->q_b, s->q, H * dq));
  } else {
    if (Qr > 0) {
      EPIC_CHECK(o->vt->matmul(o, s->a, D, M, &lw->q_a, s->cq, Qr));
      EPIC_CHECK(o->vt->rmsnorm(o, s->cq, Qr, M, Qr, lw->q_a_norm, eps, s->cq, Qr));
      EPIC_CHECK(o->vt->matmul(o, s->cq, Qr, M, &lw->q_b, s->q, H * dq));
    } else {
      EPIC_CHECK(o->vt->matmul(o, s->a, D, M, &lw->q_proj, s->q, H * dq));
    }
    EPIC_CHECK(o->vt->matmul(o, s->a, D, M, &lw->kv_a, s->kv, L + R));
    EPIC_CHECK(o->vt->rmsnorm(o, s->kv, L + R, M, L, lw->kv_a_norm, eps, s->kv, L + R));
  }
  EPIC_CHECK(o->vt->rope(o, s->q + nope, M, H, H * dq, dq, R, s->pos, m->inv_freq));
  EPIC_CHECK(o->vt->rope(o, s->kv + L, M, 1, L + R, 0, R, s->pos, m->inv_freq));

  int64_t r0 = 0;
  for (int i = 0; i < b->n_seqs;) {
    const epic_seq_batch *sq = &b->seqs[i];
    if (absorbed(sq)) {
      int n = 1;
      int64_t rows = sq->n_tokens;
      for (; i + n < b->n_seqs && absorbed(&b->seqs[i + n]); n++) rows += b->seqs[i + n].n_tokens;
      EPIC_CHECK(attention_decode(f, b, lw, kv_layer, i, f->trow[b->seq0 + i], rows, r0));
      i += n;
      r0 += rows;
      continue;
    }
    /* Prefill chunk: naive form over the decompressed keys/values of all S keys. */
    const int64_t n = sq->n_tokens, start = sq->start, S = start + n;
    epic_kv_view view = epic_kvcache_view(f->kc, kv_layer, sq->kv, S);
    view.block_table = f->tables + (int64_t)f->trow[b->seq0 + i] * f->stride; /* backend memory */
    EPIC_CHECK(o->vt->kv_store(o, &view, start, n, s->kv + r0 * (L + R), L + R,
                               s->kv + r0 * (L + R) + L, L + R));
    EPIC_CHECK(o->vt->kv_gather(o, &view, S, s->lat, s->kpe));
    EPIC_CHECK(o->vt->matmul(o, s->lat, L, S, &lw->kv_b, s->kvb, H * dkv));
    EPIC_CHECK(o->vt->mla_naive(o, s->q + r0 * H * dq, s->kvb, s->kpe, n, start, H, nope, R, V,
                                m->scale, s->attn_o + r0 * H * V));
    r0 += n;
    i++;
  }
  EPIC_CHECK(o->vt->matmul(o, s->attn_o, H * V, M, &lw->o_proj, s->tmp, D));
  return EPIC_OK;
}

/* Decoder block lw for one micro-batch, in three parts so that run_layers can
 * interleave micro-batches. front: attention, then the dense MLP or the MoE's
 * first phase; experts and back: the MoE's other phases and its residual add
 * (nothing for a dense layer). */
static epic_status block_front(fwd *f, micro_batch *b, const layer_w *lw, int64_t kv_layer) {
  epic_model *m = f->m;
  epic_ops *o = m->ops;
  scratch *s = &b->s;
  const int64_t D = m->cfg.hidden_size, M = b->M;
  const float eps = (float)m->cfg.rms_norm_eps;
  double t = epic_now_seconds();
  if (M > 0) {
    EPIC_CHECK(o->vt->rmsnorm(o, s->h, D, M, D, lw->attn_norm, eps, s->a, D));
    EPIC_CHECK(attention(f, b, lw, kv_layer));
    EPIC_CHECK(o->vt->axpy(o, M * D, 1.0f, s->tmp, s->h));
    EPIC_CHECK(o->vt->rmsnorm(o, s->h, D, M, D, lw->ffn_norm, eps, s->a, D));
    m->stats.attention_s += epic_now_seconds() - t;
    progress(f);
  }
  if (lw->moe) return moe_begin(f, b, lw);
  if (M > 0) {
    t = epic_now_seconds();
    EPIC_CHECK(mlp(m, lw, s->a, M, s->g, s->y));
    EPIC_CHECK(o->vt->axpy(o, M * D, 1.0f, s->y, s->h));
    m->stats.dense_s += epic_now_seconds() - t;
  }
  return EPIC_OK;
}

static epic_status block_experts(fwd *f, micro_batch *b, const layer_w *lw) {
  return lw->moe ? moe_experts(f, b, lw) : EPIC_OK;
}

static epic_status block_back(fwd *f, micro_batch *b, const layer_w *lw) {
  epic_ops *o = f->m->ops;
  if (!lw->moe) return EPIC_OK;
  EPIC_CHECK(moe_end(f, b));
  if (b->M > 0)
    EPIC_CHECK(o->vt->axpy(o, b->M * f->m->cfg.hidden_size, 1.0f, b->s.y, b->s.h));
  return EPIC_OK;
}

/* The decoder blocks (block l uses cache layer l) over every micro-batch on the
 * residual streams. With two micro-batches (0, 1) the order per MoE layer is
 *   back(0, l-1) front(0, l)  back(1, l-1) front(1, l)  experts(0, l) experts(1, l)
 * so every exchange overlaps compute: dispatch(0) the attention of 1, dispatch(1)
 * the experts of 0, combine(0) the experts of 1, and combine(1) the attention
 * of 0 in the next layer. Every rank runs the same sequence whatever its tokens,
 * so the collectives match. */
static epic_status run_layers(fwd *f, const layer_w *layers, int64_t n_layers) {
  for (int64_t l = 0; l <= n_layers; l++) {
    for (int i = 0; i < f->n_mb; i++) {
      if (l > 0) EPIC_CHECK(block_back(f, &f->mb[i], &layers[l - 1]));
      if (l < n_layers) EPIC_CHECK(block_front(f, &f->mb[i], &layers[l], l));
    }
    for (int i = 0; i < f->n_mb && l < n_layers; i++)
      EPIC_CHECK(block_experts(f, &f->mb[i], &layers[l]));
  }
  return drain(f->m);
}

/* Validate the batch, reserve cache pages (all or nothing) and measure it. */
static epic_status prepare(epic_model *m, epic_kvcache *kc, const epic_seq_batch *seqs, int n_seqs,
                           fwd_shape *sh) {
  const epic_model_config *c = &m->cfg;
  memset(sh, 0, sizeof *sh);
  sh->max_ctx = 1;
  sh->n_seqs = n_seqs;
  if (n_seqs < 0 || (n_seqs == 0 && !m->comm)) return EPIC_ERR_INVALID;
  for (int i = 0; i < n_seqs; i++) {
    const epic_seq_batch *sq = &seqs[i];
    if (sq->n_tokens < 1 || !sq->tokens || !sq->kv || sq->start != sq->kv->n_tokens ||
        sq->start + sq->n_tokens > c->max_position_embeddings) {
      EPIC_LOG_ERROR("forward: sequence %d: invalid chunk (start %lld, %lld tokens, cache holds %lld)",
                     i, (long long)sq->start, (long long)sq->n_tokens,
                     sq->kv ? (long long)sq->kv->n_tokens : -1LL);
      return EPIC_ERR_INVALID;
    }
    for (int64_t t = 0; t < sq->n_tokens; t++)
      if (sq->tokens[t] < 0 || sq->tokens[t] >= c->vocab_size) {
        EPIC_LOG_ERROR("forward: token id %d out of range [0, %lld)", sq->tokens[t],
                       (long long)c->vocab_size);
        return EPIC_ERR_INVALID;
      }
    sh->draws |= sq->draw != NULL;
    sh->M += sq->n_tokens;
    sh->per_seq = i == 0 || sq->n_tokens == sh->per_seq ? sq->n_tokens : 0;
    if (absorbed(sq)) {
      sh->n_dec += sq->n_tokens;
      sh->n_trows += sq->n_tokens;
      if (sq->start + sq->n_tokens > sh->dec_ctx) sh->dec_ctx = sq->start + sq->n_tokens;
    } else {
      sh->n_trows++;
      if (sq->start + sq->n_tokens > sh->max_ctx) sh->max_ctx = sq->start + sq->n_tokens;
    }
  }
  sh->out_rows = epic_batch_out_rows(seqs, n_seqs);
  sh->lm_rows = lm_rows_of(seqs, n_seqs);
  for (int i = 0; i < n_seqs; i++) {
    epic_status st = epic_kvcache_seq_reserve(kc, seqs[i].kv, seqs[i].start + seqs[i].n_tokens);
    if (st != EPIC_OK) {
      for (int j = 0; j < i; j++) epic_kvcache_seq_truncate(kc, seqs[j].kv, seqs[j].start);
      epic_kvcache_seq_truncate(kc, seqs[i].kv, seqs[i].start);
      return st;
    }
    if (seqs[i].kv->n_pages > sh->stride) sh->stride = seqs[i].kv->n_pages;
  }
  /* A power of two: the plan's layout, and so a step graph, survives a context's growth
   * into new pages. */
  if (sh->stride > 0) {
    int64_t w = 1;
    while (w < sh->stride) w *= 2;
    sh->stride = w;
  }
  return EPIC_OK;
}

/* The bound on decode contexts that attention sizes its work split from: n rounded up
 * to 1/8 of its power of two (at least 64). Coarse enough that a step graph serves many
 * steps, fine enough that the split fits the context within 1/8; used by every forward,
 * recorded or not, so both split the same way. */
static int64_t ctx_bound(int64_t n) {
  int64_t p = 64;
  if (n <= p) return p;
  while (p * 2 <= n) p *= 2;
  const int64_t g = p / 8;
  return (n + g - 1) / g * g;
}

/* The forward's index arrays, built on the host and uploaded in one copy:
 * positions and ids of every token, the hn row of each LM-head row, and the block-table
 * rows of attention with the cache length each sees: an absorbed() chunk has one per
 * token (its sequence's table, the keys up to that token), any other chunk one (the
 * cache after the forward). f->trow (host) gives each sequence's first table row. */
static epic_status fwd_plan(fwd *f, const epic_seq_batch *seqs, const fwd_shape *sh, scratch *s) {
  epic_model *m = f->m;
  const int64_t n = plan_len(sh);
  const int split = sh->lm_rows < sh->out_rows;
  int32_t *h =
      xbuf(m, 0, XB_FWD, (size_t)(n + sh->n_seqs + (split ? sh->lm_rows : 0)) * sizeof(int32_t));
  int32_t *pos, *ids, *rows, *tables, *n_ctx, *lm, *trow, *lm_out;
  int64_t r = 0, out = 0, tr = 0, nl = 0;
  if (!h) return EPIC_ERR_NOMEM;
  pos = h;
  ids = pos + sh->M;
  rows = ids + sh->M;
  tables = rows + sh->out_rows;
  n_ctx = tables + sh->n_trows * sh->stride;
  lm = n_ctx + sh->n_trows;
  trow = h + n; /* host only, after the uploaded part */
  lm_out = trow + sh->n_seqs;
  memset(tables, 0, (size_t)(sh->n_trows * sh->stride) * sizeof(int32_t));
  for (int i = 0; i < sh->n_seqs; i++) {
    const epic_seq_batch *sq = &seqs[i];
    const int every = epic_seq_out_rows(sq) > 1; /* an output row per token */
    for (int64_t t = 0; t < sq->n_tokens; t++, r++) {
      const int last = t == sq->n_tokens - 1;
      pos[r] = (int32_t)(sq->start + t);
      ids[r] = sq->tokens[t];
      if (split && (sq->all_logits || last)) {
        lm[nl] = (int32_t)r;
        lm_out[nl++] = (int32_t)out;
      }
      if (every || last) rows[out++] = (int32_t)r;
    }
    trow[i] = (int32_t)tr;
    const int64_t n_rows = absorbed(sq) ? sq->n_tokens : 1;
    for (int64_t j = 0; j < n_rows; j++, tr++) {
      memcpy(tables + tr * sh->stride, sq->kv->pages, (size_t)sq->kv->n_pages * sizeof(int32_t));
      n_ctx[tr] = (int32_t)(sq->start + sq->n_tokens - (n_rows - 1 - j));
    }
  }
  if (plan_draw_at(sh) > plan_index_len(sh)) h[plan_index_len(sh)] = 0; /* alignment word */
  if (sh->draws) { /* a sequence's draw on its last LM-head row; other rows keep picks */
    epic_draw_params *d = (epic_draw_params *)(void *)(h + plan_draw_at(sh));
    memset(d, 0, (size_t)sh->lm_rows * sizeof *d);
    for (int64_t i = 0, c = 0; i < sh->n_seqs; i++) {
      c += seq_lm_rows(&seqs[i]);
      if (seqs[i].draw) d[c - 1] = *seqs[i].draw;
    }
  }
  EPIC_CHECK(m->ops->vt->upload(m->ops, s->plan, h, (size_t)n * sizeof(int32_t)));
  /* The pos / ids arrays the ops read are the plan's own. */
  s->pos = s->plan;
  s->ids = s->plan + sh->M;
  f->out_rows = s->plan + 2 * sh->M;
  f->tables = f->out_rows + sh->out_rows;
  f->n_ctx = f->tables + sh->n_trows * sh->stride;
  f->lm_rows = split ? f->n_ctx + sh->n_trows : NULL;
  f->lm_out = split ? lm_out : NULL;
  f->draw = sh->draws ? (const epic_draw_params *)(const void *)(s->plan + plan_draw_at(sh))
                      : NULL;
  f->trow = trow;
  f->stride = sh->stride > 0 ? sh->stride : 1;
  f->dec_bound = ctx_bound(sh->dec_ctx);
  return EPIC_OK;
}

/* What the caller wants from the LM head: logits rows (all, or those with need[r]
 * != 0) and, with picks, every row's greedy pick computed where the logits are. */
typedef struct head_out {
  float *logits;
  const uint8_t *need;
  epic_row_pick *picks;
} head_out;

/* The output row of LM-head row c (they differ with all_hidden rows, see fwd). */
static int64_t lm_out_row(const fwd *f, int64_t c) {
  return f->lm_out ? f->lm_out[c] : c;
}

/* Downloads the needed logits rows (need: by output row) from the n LM-head rows at src to
 * their output rows at dst, one copy per run of consecutive rows. */
static epic_status download_rows(const fwd *f, float *dst, const float *src, int64_t n, int64_t V,
                                 const uint8_t *need) {
  epic_ops *o = f->m->ops;
  for (int64_t c = 0; c < n;) {
    const int64_t r = lm_out_row(f, c);
    if (need && !need[r]) {
      c++;
      continue;
    }
    int64_t e = c + 1;
    while (e < n && lm_out_row(f, e) == r + (e - c) && (!need || need[r + (e - c)]))
      e++;
    EPIC_CHECK(o->vt->download(o, dst + r * V, src + c * V, (size_t)((e - c) * V) * sizeof(float)));
    c = e;
  }
  return EPIC_OK;
}

/* Final norm, LM head and, when asked, every LM-head row's greedy pick: backend work
 * only, so a step graph records it (see head_collect). The LM head runs on the output
 * rows, or, where some are all_hidden rows, on its own rows gathered into h (free once
 * normed; an MTP forward took its block output from it before). */
static epic_status head_run(fwd *f, const fwd_shape *sh, const float *norm_w,
                            const epic_weight *head, scratch *s, const head_out *ho) {
  epic_model *m = f->m;
  epic_ops *o = m->ops;
  const int64_t D = m->cfg.hidden_size, V = m->cfg.vocab_size, n = sh->lm_rows;
  float *L = o->vt->host_visible ? ho->logits : s->logits;
  const float *x = s->rows;
  EPIC_CHECK(o->vt->rmsnorm(o, s->h, D, sh->M, D, norm_w, (float)m->cfg.rms_norm_eps, s->hn, D));
  EPIC_CHECK(o->vt->copy_rows(o, sh->out_rows, D, s->hn, D, f->out_rows, s->rows, D, NULL));
  if (f->lm_rows) {
    EPIC_CHECK(o->vt->copy_rows(o, n, D, s->hn, D, f->lm_rows, s->h, D, NULL));
    x = s->h;
  }
  EPIC_CHECK(o->vt->matmul(o, x, D, n, head, L, V));
  if (ho->picks)
    EPIC_CHECK(o->vt->row_pick(o, L, n, V, s->pick, (float *)(s->pick + n)));
  if (ho->picks && f->draw)
    EPIC_CHECK(o->vt->row_draw(o, L, n, V, f->draw, s->pick, (float *)(s->pick + n)));
  return EPIC_OK;
}

/* head_run's results to the caller (normed hidden rows, the logits rows asked for, the
 * picks, each at its output row); commits cache lengths. */
static epic_status head_collect(fwd *f, const epic_seq_batch *seqs, int n_seqs,
                                const fwd_shape *sh, scratch *s, const head_out *ho,
                                float *hidden) {
  epic_ops *o = f->m->ops;
  const int64_t D = f->m->cfg.hidden_size, V = f->m->cfg.vocab_size, n = sh->lm_rows;
  if (hidden)
    EPIC_CHECK(o->vt->download(o, hidden, s->rows, (size_t)(sh->out_rows * D) * sizeof(float)));
  if (!o->vt->host_visible) {
    EPIC_CHECK(download_rows(f, ho->logits, s->logits, n, V, ho->need));
  } else if (f->lm_out) { /* written packed into the caller's rows: move each to its own */
    for (int64_t c = n - 1; c >= 0; c--)
      if (f->lm_out[c] != c)
        memmove(ho->logits + f->lm_out[c] * V, ho->logits + c * V, (size_t)V * sizeof(float));
  }
  if (ho->picks) {
    const int32_t *h;
    EPIC_CHECK(to_host_i32(f->m, s->pick, 2 * n, 0, XB_COPY, &h));
    for (int64_t c = 0; c < n; c++) {
      const int64_t r = lm_out_row(f, c);
      ho->picks[r].id = h[c];
      memcpy(&ho->picks[r].logprob, &h[n + c], sizeof(float));
    }
  }
  for (int i = 0; i < n_seqs; i++) seqs[i].kv->n_tokens = seqs[i].start + seqs[i].n_tokens;
  return EPIC_OK;
}

/* The MTP block's output rows (before shared_head.norm) for the sequences that
 * ask (mtp_out): gathered like head_run's LM-head rows, before head_run reuses the
 * buffer. */
static epic_status mtp_block_out(fwd *f, const epic_seq_batch *seqs, int n_seqs,
                                 const fwd_shape *sh, scratch *s) {
  epic_ops *o = f->m->ops;
  const int64_t D = f->m->cfg.hidden_size;
  int64_t r = 0, want = 0;
  for (int i = 0; i < n_seqs; i++) want |= seqs[i].mtp_out != NULL;
  if (!want) return EPIC_OK;
  EPIC_CHECK(o->vt->copy_rows(o, sh->out_rows, D, s->h, D, f->out_rows, s->rows, D, NULL));
  for (int i = 0; i < n_seqs; i++) {
    const int64_t n = epic_seq_out_rows(&seqs[i]);
    if (seqs[i].mtp_out)
      EPIC_CHECK(o->vt->download(o, seqs[i].mtp_out, s->rows + r * D,
                                 (size_t)(n * D) * sizeof(float)));
    r += n;
  }
  return EPIC_OK;
}

/* On failure after pages were reserved, give back what this call took. */
static void rollback(epic_kvcache *kc, const epic_seq_batch *seqs, int n_seqs) {
  for (int i = 0; i < n_seqs; i++) epic_kvcache_seq_truncate(kc, seqs[i].kv, seqs[i].start);
}

/* Where micro-batch 1 starts: the sequence boundary that best balances the
 * token counts (ties: the later one, so a lone sequence goes to micro-batch 0). */
static int split_point(const epic_seq_batch *seqs, int n_seqs, int64_t M) {
  int64_t pre = 0, best_d = INT64_MAX;
  int best = n_seqs;
  for (int k = 0; k <= n_seqs; k++) {
    const int64_t d = 2 * pre > M ? 2 * pre - M : M - 2 * pre;
    if (d <= best_d) {
      best_d = d;
      best = k;
    }
    if (k < n_seqs) pre += seqs[k].n_tokens;
  }
  return best;
}

/* Whether the batch's draws can be made: parameters in range, picks asked for, a backend
 * that draws (logged, naming the sequence and field). */
static epic_status draws_ok(const epic_model *m, const epic_seq_batch *seqs, int n_seqs,
                            const head_out *ho) {
  for (int i = 0; i < n_seqs; i++) {
    const epic_draw_params *d = seqs[i].draw;
    if (!d) continue;
    const char *bad = !(d->temperature > 0.0f) || !isfinite(d->temperature) ? "temperature"
                      : !(d->top_p > 0.0f && d->top_p <= 1.0f)              ? "top_p"
                      : d->top_k < 0                                        ? "top_k"
                                                                            : NULL;
    if (bad) {
      EPIC_LOG_ERROR("forward: sequence %d: draw %s out of range (temperature > 0, top_p in "
                     "(0, 1], top_k >= 0)", i, bad);
      return EPIC_ERR_INVALID;
    }
    if (!ho->picks) {
      EPIC_LOG_ERROR("forward: sequence %d asks for a draw, but the call takes no picks", i);
      return EPIC_ERR_INVALID;
    }
    if (!epic_ops_has_row_draw(m->ops)) {
      EPIC_LOG_ERROR("forward: backend %s cannot draw tokens (ops ABI %d, row_draw needs 13)",
                     m->ops->vt->name, m->ops->vt->abi_version);
      return EPIC_ERR_UNSUPPORTED;
    }
  }
  return EPIC_OK;
}

/* Start a forward: validate and reserve (prepare), carve the scratch, upload the
 * plan, and split the batch into the model's micro-batches. On error nothing is
 * reserved. */
static epic_status fwd_open(epic_model *m, epic_kvcache *kc, const epic_seq_batch *seqs,
                            int n_seqs, fwd *f, scratch *s, fwd_shape *sh) {
  const int64_t D = m->cfg.hidden_size;
  const int64_t K = m->cfg.num_experts_per_tok > 0 ? m->cfg.num_experts_per_tok : 1;
  int64_t M0 = 0;
  int cut;
  epic_status st;
  memset(f, 0, sizeof *f);
  f->m = m;
  f->kc = kc;
  f->n_mb = m->micro_batches;
  EPIC_CHECK(prepare(m, kc, seqs, n_seqs, sh));
  cut = f->n_mb == 2 ? split_point(seqs, n_seqs, sh->M) : n_seqs;
  for (int i = 0; i < cut; i++) M0 += seqs[i].n_tokens;
  sh->Mw = M0 > sh->M - M0 ? M0 : sh->M - M0;
  st = scratch_get(m, sh, s);
  if (st == EPIC_OK) st = fwd_plan(f, seqs, sh, s);
  if (st != EPIC_OK) {
    rollback(kc, seqs, n_seqs);
    return st;
  }
  for (int i = 0; i < f->n_mb; i++) {
    micro_batch *b = &f->mb[i];
    b->id = i;
    b->seq0 = i ? cut : 0;
    b->seqs = seqs + b->seq0;
    b->n_seqs = i ? n_seqs - cut : cut;
    b->M = i ? sh->M - M0 : M0;
    b->s = scratch_slice(s, i ? M0 : 0, D, K);
  }
  return EPIC_OK;
}

/* End a forward (also after an error): abandon exchanges still in flight and
 * account the call's time; other_s gets what no phase claimed. */
static void fwd_close(fwd *f, const epic_model_stats *before, double t0, int64_t M) {
  epic_model_stats *st = &f->m->stats;
  const double dt = epic_now_seconds() - t0;
  for (int i = 0; i < f->n_mb; i++) {
    epic_comm_req_free(f->mb[i].req);
    f->mb[i].req = NULL;
  }
  for (int i = 0; i < f->m->n_queued; i++) epic_comm_req_free(f->m->queued[i].req);
  f->m->n_queued = 0;
  st->forwards++;
  st->tokens += M;
  st->total_s += dt;
  st->other_s += dt - ((st->attention_s - before->attention_s) + (st->dense_s - before->dense_s) +
                       (st->experts_s - before->experts_s) +
                       (st->dispatch_wait_s - before->dispatch_wait_s) +
                       (st->combine_wait_s - before->combine_wait_s));
}

/* The main model's backend work of one forward, embedding to LM head: what a step graph
 * records. */
static epic_status main_body(fwd *f, const fwd_shape *sh, scratch *s, const head_out *ho) {
  epic_model *m = f->m;
  epic_ops *o = m->ops;
  if (sh->M > 0) EPIC_CHECK(o->vt->embed(o, &m->embed, s->ids, sh->M, s->h));
  EPIC_CHECK(run_layers(f, m->layers, m->cfg.num_hidden_layers));
  if (sh->M > 0) EPIC_CHECK(head_run(f, sh, m->final_norm, &m->lm_head, s, ho));
  return EPIC_OK;
}

/* The decode-step bucket of this forward (see epic_model_set_step_graphs), found or
 * newly made; NULL when the forward is not one graphs serve: every row on the absorbed
 * attention, as many rows per sequence (a decode step, or an MTP verify step whose
 * sequences all carry the same number of drafts), the LM head on every output row (no
 * all_hidden rows: the key does not hold their layout). Drops every graph first when the
 * backend freed or moved memory since they were recorded. */
static step_graph *graph_bucket(fwd *f, const fwd_shape *sh, const head_out *ho) {
  epic_model *m = f->m;
  epic_ops *o = m->ops;
  step_graph *g = NULL;
  if (!m->step_graphs || m->comm || !epic_ops_has_graphs(o) || sh->M == 0 || sh->per_seq < 1 ||
      sh->n_dec != sh->M || !dev_planned(o, sh->Mw) || sh->lm_rows != sh->out_rows)
    return NULL;
  const uint64_t epoch = o->vt->graph_epoch(o);
  if (epoch != m->graph_epoch) {
    graphs_reset(m);
    m->graph_epoch = epoch;
  }
  const step_graph key = {.used = 1, .kc = f->kc, .n_seqs = sh->n_seqs, .stride = sh->stride,
                          .bound = f->dec_bound, .per_seq = sh->per_seq,
                          .out_rows = sh->out_rows, .n_mb = f->n_mb, .pick = ho->picks != NULL,
                          .draw = f->draw != NULL};
  for (int i = 0; i < EPIC_MODEL_STEP_GRAPHS; i++) {
    step_graph *e = &m->graphs[i];
    if (e->used && e->kc == key.kc && e->n_seqs == key.n_seqs && e->stride == key.stride &&
        e->bound == key.bound && e->per_seq == key.per_seq && e->out_rows == key.out_rows &&
        e->n_mb == key.n_mb && e->pick == key.pick && e->draw == key.draw) {
      e->tick = ++m->graph_tick;
      return e;
    }
    if (!g || (g->used && (!e->used || e->tick < g->tick))) g = e; /* free, else LRU */
  }
  if (g->graph) o->vt->graph_free(o, g->graph);
  *g = key;
  g->tick = ++m->graph_tick;
  return g;
}

/* Run main_body: directly, or as its bucket's graph (recorded on the bucket's second
 * forward, when the first has grown every buffer it needs). */
static epic_status step_run(fwd *f, const fwd_shape *sh, scratch *s, const head_out *ho) {
  epic_model *m = f->m;
  epic_ops *o = m->ops;
  step_graph *g = graph_bucket(f, sh, ho);
  const int64_t rows0 = m->stats.expert_rows;
  if (g && g->warm && !g->graph && !g->refused) {
    /* Recording: the ops are queued into the graph, not run; a refusal (or any other
     * failure) leaves a forward that runs directly below. */
    epic_ops_graph *gr = NULL;
    const double t0 = epic_now_seconds();
    epic_status st = o->vt->graph_begin(o);
    if (st == EPIC_OK) {
      const epic_status body = main_body(f, sh, s, ho);
      st = o->vt->graph_end(o, &gr);
      if (body != EPIC_OK && st == EPIC_OK) st = body;
    }
    m->stats.expert_rows = rows0;
    m->stats.graph_record_s += epic_now_seconds() - t0;
    if (st == EPIC_OK && o->vt->graph_epoch(o) == m->graph_epoch) {
      g->graph = gr;
      m->stats.graph_captures++;
    } else {
      if (gr) o->vt->graph_free(o, gr);
      g->refused = 1;
      EPIC_LOG_DEBUG("model: decode steps of %lld sequences run without a graph (status %d)",
                     (long long)sh->n_seqs, (int)st);
    }
  }
  if (g && g->graph) {
    m->stats.graph_replays++;
    m->stats.expert_rows += g->expert_rows;
    return o->vt->graph_launch(o, g->graph);
  }
  EPIC_CHECK(main_body(f, sh, s, ho));
  if (g) {
    g->warm = 1;
    g->expert_rows = m->stats.expert_rows - rows0;
  }
  return EPIC_OK;
}

epic_status epic_model_forward(epic_model *m, epic_kvcache *kc, const epic_seq_batch *seqs,
                               int n_seqs, float *logits, float *hidden) {
  return epic_model_forward_pick(m, kc, seqs, n_seqs, logits, NULL, NULL, hidden);
}

epic_status epic_model_forward_pick(epic_model *m, epic_kvcache *kc, const epic_seq_batch *seqs,
                                    int n_seqs, float *logits, const uint8_t *need_logits,
                                    epic_row_pick *picks, float *hidden) {
  const head_out ho = {.logits = logits, .need = need_logits, .picks = picks};
  const epic_model_stats before = m->stats;
  const double t0 = epic_now_seconds();
  fwd f;
  scratch s;
  fwd_shape sh = {0};
  epic_status st;
  EPIC_CHECK(draws_ok(m, seqs, n_seqs, &ho));
  EPIC_CHECK_GOTO(fwd_open(m, kc, seqs, n_seqs, &f, &s, &sh), st, done);
  EPIC_CHECK_GOTO(step_run(&f, &sh, &s, &ho), st, fail);
  if (sh.M > 0) EPIC_CHECK_GOTO(head_collect(&f, seqs, n_seqs, &sh, &s, &ho, hidden), st, fail);
  st = EPIC_OK;
  goto done;
fail:
  rollback(kc, seqs, n_seqs);
done:
  fwd_close(&f, &before, t0, sh.M);
  return st;
}

/* The sequences' hidden rows (host memory, one array each; M rows in all) into dst:
 * gathered on the host and uploaded at once where the backend's memory is not the host's
 * (an upload per sequence waited for the queue each time: 128 waits in a batch-128 MTP
 * step). */
static epic_status upload_hidden(epic_model *m, const epic_seq_batch *seqs, int n_seqs,
                                 int64_t M, float *dst) {
  epic_ops *o = m->ops;
  const int64_t D = m->cfg.hidden_size;
  float *h =
      o->vt->host_visible || n_seqs < 2 ? NULL : xbuf(m, 0, XB_HIDDEN, (size_t)(M * D) * sizeof *h);
  for (int64_t i = 0, r = 0; i < n_seqs; r += seqs[i++].n_tokens) {
    const size_t bytes = (size_t)(seqs[i].n_tokens * D) * sizeof(float);
    if (h)
      memcpy(h + r * D, seqs[i].hidden, bytes);
    else
      EPIC_CHECK(o->vt->upload(o, dst + r * D, seqs[i].hidden, bytes));
  }
  return h ? o->vt->upload(o, dst, h, (size_t)(M * D) * sizeof(float)) : EPIC_OK;
}

epic_status epic_model_mtp_forward(epic_model *m, epic_kvcache *kc, const epic_seq_batch *seqs,
                                   int n_seqs, float *logits) {
  return epic_model_mtp_forward_pick(m, kc, seqs, n_seqs, logits, NULL, NULL);
}

epic_status epic_model_mtp_forward_pick(epic_model *m, epic_kvcache *kc,
                                        const epic_seq_batch *seqs, int n_seqs, float *logits,
                                        const uint8_t *need_logits, epic_row_pick *picks) {
  const head_out ho = {.logits = logits, .need = need_logits, .picks = picks};
  epic_ops *o = m->ops;
  const int64_t D = m->cfg.hidden_size;
  const float eps = (float)m->cfg.rms_norm_eps;
  const epic_model_stats before = m->stats;
  const double t0 = epic_now_seconds();
  fwd f;
  scratch s;
  fwd_shape sh = {0};
  epic_status st;
  if (!m->has_mtp) {
    EPIC_LOG_ERROR("model: no MTP layer loaded");
    return EPIC_ERR_INVALID;
  }
  for (int i = 0; i < n_seqs; i++)
    if (!seqs[i].hidden) {
      EPIC_LOG_ERROR("mtp forward: sequence %d has no hidden states", i);
      return EPIC_ERR_INVALID;
    }
  EPIC_CHECK(draws_ok(m, seqs, n_seqs, &ho));
  EPIC_CHECK_GOTO(fwd_open(m, kc, seqs, n_seqs, &f, &s, &sh), st, done);
  if (sh.M > 0) {
    /* x = eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)]): embedding half first. */
    EPIC_CHECK_GOTO(o->vt->embed(o, &m->mtp.embed, s.ids, sh.M, s.a), st, fail);
    EPIC_CHECK_GOTO(upload_hidden(m, seqs, n_seqs, sh.M, s.hn), st, fail);
    EPIC_CHECK_GOTO(o->vt->rmsnorm(o, s.a, D, sh.M, D, m->mtp.enorm, eps, s.x2, 2 * D), st, fail);
    EPIC_CHECK_GOTO(o->vt->rmsnorm(o, s.hn, D, sh.M, D, m->mtp.hnorm, eps, s.x2 + D, 2 * D), st,
                    fail);
    EPIC_CHECK_GOTO(o->vt->matmul(o, s.x2, 2 * D, sh.M, &m->mtp.eh_proj, s.h, D), st, fail);
  }
  EPIC_CHECK_GOTO(run_layers(&f, &m->mtp.layer, 1), st, fail);
  if (sh.M > 0) {
    EPIC_CHECK_GOTO(mtp_block_out(&f, seqs, n_seqs, &sh, &s), st, fail);
    EPIC_CHECK_GOTO(head_run(&f, &sh, m->mtp.head_norm, &m->mtp.head, &s, &ho), st, fail);
    EPIC_CHECK_GOTO(head_collect(&f, seqs, n_seqs, &sh, &s, &ho, NULL), st, fail);
  }
  st = EPIC_OK;
  goto done;
fail:
  rollback(kc, seqs, n_seqs);
done:
  fwd_close(&f, &before, t0, sh.M);
  m->stats.mtp_forwards++;
  m->stats.mtp_s += m->stats.total_s - before.total_s;
  return st;
}
