/* Planner: checkpoint bytes, expert placement, per-rank memory (see planner.h). */
#include "planner.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "kernels/ops.h"

#define PLAN_BASE_RESERVE (2ull << 30)
#define PLAN_MIN_KV_TOKENS 4096

typedef struct plan_layer {
  int moe;
  double *counts;     /* E token counts, NULL without statistics */
  int32_t *rank_off;  /* N + 1 offsets into slots */
  int32_t *slots;     /* expert ids, rank-major, ascending within a rank */
  int32_t *owner_off; /* E + 1 offsets into owners */
  int32_t *owners;    /* rank ids, expert-major, ascending within an expert */
  double max_before, mean_before, max_after, mean_after;
} plan_layer;

struct epic_plan {
  epic_model_config cfg;
  int n_ranks, n_layers, n_experts, n_redundant, include_mtp;
  int eplb_redundant, eplb_layer_slots; /* run-time EPLB copies and per-layer bound */
  epic_eplb_policy policy;
  int ranks_per_node; /* hierarchical policy only, else 0 */
  uint64_t gpu_mem;
  int64_t max_batch_tokens, min_kv_tokens;
  uint64_t kv_per_token, replicated, reserve;
  epic_weight_bytes w;
  plan_layer *layers;
  epic_rank_memory *mem;
  int fits;
};

/* ---- checkpoint bytes ---------------------------------------------------------------- */

typedef struct wcount {
  const epic_model_config *c;
  int64_t n_tensors;
} wcount;

/* A projection [rows, cols]: F8_E4M3 + F32 block scales under fp8, else BF16. */
static uint64_t linear_bytes(wcount *wc, int64_t rows, int64_t cols) {
  const epic_quant_config *q = &wc->c->quant;
  if (!q->fp8) {
    wc->n_tensors += 1;
    return (uint64_t)rows * (uint64_t)cols * 2;
  }
  const int64_t b0 = q->weight_block_size[0] > 0 ? q->weight_block_size[0] : 128;
  const int64_t b1 = q->weight_block_size[1] > 0 ? q->weight_block_size[1] : 128;
  wc->n_tensors += 2;
  return (uint64_t)rows * (uint64_t)cols +
         4 * (uint64_t)((rows + b0 - 1) / b0) * (uint64_t)((cols + b1 - 1) / b1);
}

static uint64_t bf16_bytes(wcount *wc, int64_t rows, int64_t cols) {
  wc->n_tensors += 1;
  return (uint64_t)rows * (uint64_t)cols * 2;
}

static uint64_t swiglu_bytes(wcount *wc, int64_t width, int64_t d) {
  return linear_bytes(wc, width, d) + linear_bytes(wc, width, d) + linear_bytes(wc, d, width);
}

epic_status epic_weight_bytes_compute(const epic_model_config *c, int include_mtp,
                                      epic_weight_bytes *out) {
  if (!c || !out)
    return EPIC_ERR_INVALID;
  memset(out, 0, sizeof *out);
  wcount wc = {.c = c};
  const int64_t D = c->hidden_size, H = c->num_attention_heads, V = c->vocab_size;
  const int64_t E = c->n_routed_experts, M = c->moe_intermediate_size;
  const int64_t qk = epic_config_qk_head_dim(c);
  const int64_t n_mtp = include_mtp ? c->num_nextn_predict_layers : 0;
  const int64_t n_layers = c->num_hidden_layers + n_mtp;

  out->embedding = bf16_bytes(&wc, V, D);
  out->lm_head = bf16_bytes(&wc, V, D);
  out->norms = bf16_bytes(&wc, 1, D); /* model.norm */
  {
    /* One routed expert; counted separately so its tensors are not tallied here. */
    wcount one = {.c = c};
    out->expert = E > 0 ? swiglu_bytes(&one, M, D) : 0;
  }
  for (int64_t l = 0; l < n_layers; l++) {
    out->norms += bf16_bytes(&wc, 1, D) + bf16_bytes(&wc, 1, D);
    if (c->q_lora_rank > 0) {
      out->attention += linear_bytes(&wc, c->q_lora_rank, D);
      out->attention += bf16_bytes(&wc, 1, c->q_lora_rank);
      out->attention += linear_bytes(&wc, H * qk, c->q_lora_rank);
    } else {
      out->attention += linear_bytes(&wc, H * qk, D);
    }
    out->attention += linear_bytes(&wc, c->kv_lora_rank + c->qk_rope_head_dim, D);
    out->attention += bf16_bytes(&wc, 1, c->kv_lora_rank);
    out->attention += linear_bytes(&wc, H * (c->qk_nope_head_dim + c->v_head_dim), c->kv_lora_rank);
    out->attention += linear_bytes(&wc, D, H * c->v_head_dim);
    if (epic_config_is_moe_layer(c, l)) {
      out->router += bf16_bytes(&wc, E, D);
      if (strcmp(c->topk_method, "noaux_tc") == 0) {
        wc.n_tensors++;
        out->router += (uint64_t)E * 4;
      }
      for (int64_t e = 0; e < E; e++)
        out->routed_experts += swiglu_bytes(&wc, M, D);
      if (c->n_shared_experts > 0)
        out->shared_experts += swiglu_bytes(&wc, M * c->n_shared_experts, D);
    } else {
      out->dense_mlp += swiglu_bytes(&wc, c->intermediate_size, D);
    }
    if (l >= c->num_hidden_layers) {
      out->mtp_copies += bf16_bytes(&wc, V, D) + bf16_bytes(&wc, V, D);
      out->mtp_extra += bf16_bytes(&wc, 1, D) + bf16_bytes(&wc, 1, D); /* enorm, hnorm */
      out->mtp_extra += bf16_bytes(&wc, D, 2 * D);                     /* eh_proj */
      out->mtp_extra += bf16_bytes(&wc, 1, D);                         /* shared_head.norm */
    }
  }
  out->total = out->embedding + out->lm_head + out->attention + out->norms + out->dense_mlp +
               out->shared_experts + out->router + out->routed_experts + out->mtp_extra +
               out->mtp_copies;
  out->n_tensors = wc.n_tensors;
  return EPIC_OK;
}

/* ---- load statistics ------------------------------------------------------------------- */

static char *read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f)
    return NULL;
  size_t cap = 1 << 16, n = 0;
  char *buf = malloc(cap);
  while (buf) {
    size_t got = fread(buf + n, 1, cap - n - 1, f);
    n += got;
    if (n + 1 < cap)
      break;
    char *nb = realloc(buf, cap * 2);
    if (!nb) {
      free(buf);
      buf = NULL;
      break;
    }
    buf = nb;
    cap *= 2;
  }
  int err = ferror(f);
  fclose(f);
  if (!buf)
    return NULL;
  if (err) {
    free(buf);
    return NULL;
  }
  buf[n] = 0;
  *len = n;
  return buf;
}

static epic_status load_stats(epic_plan *pl, const char *path) {
  size_t len = 0;
  char *text = read_file(path, &len);
  epic_status st = EPIC_ERR_INVALID;
  cJSON *root = NULL;
  if (!text) {
    EPIC_LOG_ERROR("load statistics %s: cannot read the file", path);
    return EPIC_ERR_IO;
  }
  root = cJSON_ParseWithLength(text, len);
  if (!root || !cJSON_IsObject(root)) {
    EPIC_LOG_ERROR("load statistics %s: not a JSON object", path);
    goto done;
  }
  const cJSON *layers = cJSON_GetObjectItemCaseSensitive(root, "layers");
  if (!cJSON_IsObject(layers)) {
    EPIC_LOG_ERROR("load statistics %s: expected an object \"layers\": {\"<layer>\": [counts]}",
                   path);
    goto done;
  }
  const int64_t n_all = pl->cfg.num_hidden_layers + pl->cfg.num_nextn_predict_layers;
  const cJSON *it;
  cJSON_ArrayForEach(it, layers) {
    const char *key = it->string;
    char *end = NULL;
    long l = strtol(key, &end, 10);
    if (!*key || *end || l < 0 || l >= n_all || !epic_config_is_moe_layer(&pl->cfg, l)) {
      EPIC_LOG_ERROR("load statistics %s: \"layers\" key \"%s\" is not a MoE layer of this model",
                     path, key);
      goto done;
    }
    if (!cJSON_IsArray(it) || cJSON_GetArraySize(it) != pl->n_experts) {
      EPIC_LOG_ERROR("load statistics %s: layer %s: expected an array of %d expert counts", path,
                     key, pl->n_experts);
      goto done;
    }
    if (l >= pl->n_layers)
      continue; /* MTP layer that is not planned */
    plan_layer *L = &pl->layers[l];
    if (L->counts) {
      EPIC_LOG_ERROR("load statistics %s: layer %s appears twice", path, key);
      goto done;
    }
    L->counts = malloc(sizeof(double) * (size_t)pl->n_experts);
    if (!L->counts) {
      st = EPIC_ERR_NOMEM;
      goto done;
    }
    int e = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, it) {
      if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || v->valuedouble < 0) {
        EPIC_LOG_ERROR("load statistics %s: layer %s, expert %d: expected a non-negative number",
                       path, key, e);
        goto done;
      }
      L->counts[e++] = v->valuedouble;
    }
  }
  st = EPIC_OK;
done:
  cJSON_Delete(root);
  free(text);
  return st;
}

/* In-memory statistics: rows [n_rows][E], one per model layer from 0; rows of dense
 * layers, rows beyond the planned layers and all-zero rows are ignored. */
static epic_status take_counts(epic_plan *pl, const double *counts, int64_t n_rows) {
  const int E = pl->n_experts;
  for (int64_t l = 0; l < n_rows && l < pl->n_layers; l++) {
    plan_layer *L = &pl->layers[l];
    const double *row = counts + l * E;
    double sum = 0;
    if (!L->moe)
      continue;
    for (int e = 0; e < E; e++) {
      if (!isfinite(row[e]) || row[e] < 0) {
        EPIC_LOG_ERROR("planner: load count of layer %lld, expert %d is %g: expected a "
                       "non-negative number",
                       (long long)l, e, row[e]);
        return EPIC_ERR_INVALID;
      }
      sum += row[e];
    }
    if (sum <= 0)
      continue;
    if (!(L->counts = malloc(sizeof(double) * (size_t)E)))
      return EPIC_ERR_NOMEM;
    memcpy(L->counts, row, sizeof(double) * (size_t)E);
  }
  return EPIC_OK;
}

/* ---- placement ------------------------------------------------------------------------- */

/* Fill owner_off/owners from rank_off/slots. */
static epic_status build_owners(plan_layer *L, int N, int E) {
  L->owner_off = calloc((size_t)E + 1, sizeof(int32_t));
  L->owners = malloc(sizeof(int32_t) * ((size_t)L->rank_off[N] + 1));
  int32_t *fill = calloc((size_t)E + 1, sizeof(int32_t));
  if (!L->owner_off || !L->owners || !fill) {
    free(fill);
    return EPIC_ERR_NOMEM;
  }
  for (int32_t i = 0; i < L->rank_off[N]; i++)
    L->owner_off[L->slots[i] + 1]++;
  for (int e = 0; e < E; e++)
    L->owner_off[e + 1] += L->owner_off[e];
  for (int r = 0; r < N; r++) /* ranks in ascending order -> owners ascending */
    for (int32_t i = L->rank_off[r]; i < L->rank_off[r + 1]; i++) {
      const int32_t e = L->slots[i];
      L->owners[L->owner_off[e] + fill[e]++] = r;
    }
  free(fill);
  return EPIC_OK;
}

/* Contiguous blocks. The rem = E mod N larger blocks are dealt round-robin across layers:
 * in the k-th MoE layer they go to ranks k*rem, k*rem+1, ... (mod N), so over all layers
 * every rank holds the same number of experts, give or take one. */
static epic_status place_contiguous(plan_layer *L, int N, int E, int k) {
  L->rank_off = malloc(sizeof(int32_t) * ((size_t)N + 1));
  L->slots = malloc(sizeof(int32_t) * ((size_t)E + 1));
  if (!L->rank_off || !L->slots)
    return EPIC_ERR_NOMEM;
  const int base = E / N, rem = E % N;
  L->rank_off[0] = 0;
  for (int r = 0; r < N; r++) {
    const int first = (int)(((int64_t)k * rem) % N);
    const int shifted = ((r - first) % N + N) % N;
    L->rank_off[r + 1] = L->rank_off[r] + base + (shifted < rem ? 1 : 0);
  }
  for (int e = 0; e < E; e++)
    L->slots[e] = e;
  return EPIC_OK;
}

typedef struct replica {
  int32_t expert;
  double load;
} replica;

static int replica_cmp(const void *a, const void *b) {
  const replica *x = a, *y = b;
  if (x->load != y->load)
    return x->load > y->load ? -1 : 1;
  return (x->expert > y->expert) - (x->expert < y->expert);
}

static int i32_cmp(const void *a, const void *b) {
  const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
  return (x > y) - (x < y);
}

/* Redundant copies and longest-processing-time packing of the n experts ids[0..n)
 * (loads counts[ids[i]]) onto nr ranks of cap slots each: R extra copies go, one at a
 * time, to the expert whose copies carry the most tokens each (at most one copy per
 * rank), then every copy, heaviest first, to the least loaded rank that has a free
 * slot and does not hold that expert yet. Out: nheld[r] experts of rank r in
 * held[r * cap ..] (global ids, unsorted). Needs n + R <= nr * cap and every expert
 * at most nr copies. */
static epic_status pack(const double *counts, const int32_t *ids, int n, int nr, int R, int cap,
                        int32_t *held, int *nheld) {
  const int S = n + R;
  epic_status st = EPIC_ERR_NOMEM;
  int *copies = malloc(sizeof(int) * ((size_t)n + 1));
  replica *items = malloc(sizeof(replica) * ((size_t)S + 1));
  int32_t *loc = malloc(sizeof(int32_t) * ((size_t)nr * (size_t)cap + 1)); /* local indices */
  double *load = calloc((size_t)nr, sizeof(double));
  unsigned char *has = calloc((size_t)nr * (size_t)n + 1, 1);
  if (!copies || !items || !loc || !load || !has)
    goto done;
  memset(nheld, 0, sizeof(int) * (size_t)nr);
#define CNT(i) (counts[ids[(i)]])
  for (int i = 0; i < n; i++)
    copies[i] = 1;
  for (int k = 0; k < R; k++) {
    int best = -1;
    for (int i = 0; i < n; i++)
      if (copies[i] < nr && (best < 0 || CNT(i) / copies[i] > CNT(best) / copies[best]))
        best = i;
    if (best < 0) {
      st = EPIC_ERR_INVALID; /* more copies than ranks: checked by the callers */
      goto done;
    }
    copies[best]++;
  }
  int m = 0;
  for (int i = 0; i < n; i++)
    for (int c = 0; c < copies[i]; c++)
      items[m++] = (replica){i, CNT(i) / copies[i]};
  qsort(items, (size_t)m, sizeof *items, replica_cmp);

  for (int it = 0; it < m; it++) {
    const int32_t e = items[it].expert;
    int best = -1;
    for (int r = 0; r < nr; r++) {
      if (nheld[r] >= cap || has[(size_t)r * n + e])
        continue;
      if (best < 0 || load[r] < load[best] || (load[r] == load[best] && nheld[r] < nheld[best]))
        best = r;
    }
    if (best < 0) {
      /* Every rank with a free slot already holds e. Move some expert x from a full rank p
       * without e to a rank q with a free slot (q lacks x: p holds more distinct experts
       * than q), then put e on p. */
      int p = -1, q = -1;
      for (int r = 0; r < nr; r++) {
        if (nheld[r] < cap && (q < 0 || load[r] < load[q]))
          q = r;
        if (!has[(size_t)r * n + e] && (p < 0 || load[r] < load[p]))
          p = r;
      }
      if (p < 0 || q < 0) {
        st = EPIC_ERR_INVALID; /* unreachable given the callers' checks */
        goto done;
      }
      int xi = -1;
      for (int j = 0; j < nheld[p]; j++) {
        const int32_t x = loc[(size_t)p * cap + j];
        if (has[(size_t)q * n + x])
          continue;
        const int32_t y = xi >= 0 ? loc[(size_t)p * cap + xi] : 0;
        if (xi < 0 || CNT(x) / copies[x] < CNT(y) / copies[y])
          xi = j;
      }
      if (xi < 0) {
        st = EPIC_ERR_INVALID;
        goto done;
      }
      const int32_t x = loc[(size_t)p * cap + xi];
      const double lx = CNT(x) / copies[x];
      loc[(size_t)p * cap + xi] = loc[(size_t)p * cap + --nheld[p]];
      has[(size_t)p * n + x] = 0;
      load[p] -= lx;
      loc[(size_t)q * cap + nheld[q]++] = x;
      has[(size_t)q * n + x] = 1;
      load[q] += lx;
      best = p;
    }
    loc[(size_t)best * cap + nheld[best]++] = e;
    has[(size_t)best * n + e] = 1;
    load[best] += items[it].load;
  }
#undef CNT
  for (int r = 0; r < nr; r++)
    for (int j = 0; j < nheld[r]; j++)
      held[(size_t)r * cap + j] = ids[loc[(size_t)r * cap + j]];
  st = EPIC_OK;
done:
  free(copies);
  free(items);
  free(loc);
  free(load);
  free(has);
  return st;
}

/* rank_off/slots (allocated here) from held[r * cap ..] / nheld[r], each rank sorted. */
static epic_status collect_slots(plan_layer *L, int N, int cap, int32_t *held, const int *nheld) {
  int64_t total = 0;
  for (int r = 0; r < N; r++)
    total += nheld[r];
  L->rank_off = malloc(sizeof(int32_t) * ((size_t)N + 1));
  L->slots = malloc(sizeof(int32_t) * ((size_t)total + 1));
  if (!L->rank_off || !L->slots)
    return EPIC_ERR_NOMEM;
  L->rank_off[0] = 0;
  for (int r = 0; r < N; r++) {
    qsort(held + (size_t)r * cap, (size_t)nheld[r], sizeof(int32_t), i32_cmp);
    memcpy(L->slots + L->rank_off[r], held + (size_t)r * cap, sizeof(int32_t) * (size_t)nheld[r]);
    L->rank_off[r + 1] = L->rank_off[r] + nheld[r];
  }
  return EPIC_OK;
}

/* Global policy: redundant copies of the hottest experts, then LPT over all ranks with
 * ceil((E+R)/N) slots each. */
static epic_status place_redundant(plan_layer *L, int N, int E, int R) {
  const int cap = (E + R + N - 1) / N;
  epic_status st = EPIC_ERR_NOMEM;
  int32_t *ids = malloc(sizeof(int32_t) * (size_t)E);
  int32_t *held = malloc(sizeof(int32_t) * (size_t)N * (size_t)cap);
  int *nheld = calloc((size_t)N, sizeof(int));
  if (!ids || !held || !nheld)
    goto done;
  for (int e = 0; e < E; e++)
    ids[e] = e;
  EPIC_CHECK_GOTO(pack(L->counts, ids, E, N, R, cap, held, nheld), st, done);
  st = collect_slots(L, N, cap, held, nheld);
done:
  free(ids);
  free(held);
  free(nheld);
  return st;
}

/* Groups of the hierarchical policy: n_group contiguous groups, or single experts
 * when the model has no groups. */
static int eplb_groups(const epic_model_config *c, int E) {
  return c->n_group > 1 ? (int)c->n_group : E;
}

/* Hierarchical policy (nodes of rpn ranks): the expert groups of group-limited routing
 * are spread over the nodes first (heaviest group to the least loaded node with room,
 * n_group / n_nodes groups each), so a token's topk_group groups touch few nodes and
 * every node carries about the same load; then each node replicates its own hottest
 * experts (R / n_nodes copies, the remainder to the heaviest nodes) and packs them
 * onto its ranks (LPT, ceil((E/n_nodes + R_node) / rpn) slots per rank). A copy never
 * leaves its group's node. */
static epic_status place_hierarchical(plan_layer *L, const epic_model_config *c, int N, int E,
                                      int R, int rpn) {
  const int nn = N / rpn, G = eplb_groups(c, E), gsize = E / G, gpn = G / nn, en = E / nn;
  epic_status st = EPIC_ERR_NOMEM;
  replica *groups = malloc(sizeof(replica) * (size_t)G);
  replica *nodes = malloc(sizeof(replica) * (size_t)nn);
  int *ngroups = calloc((size_t)nn, sizeof(int));
  double *nload = calloc((size_t)nn, sizeof(double));
  int32_t *ids = malloc(sizeof(int32_t) * (size_t)E); /* node-major expert ids */
  const int cap = (en + (R + nn - 1) / nn + rpn - 1) / rpn;
  int32_t *held = malloc(sizeof(int32_t) * (size_t)N * (size_t)cap);
  int *nheld = calloc((size_t)N, sizeof(int));
  int *gnode = malloc(sizeof(int) * (size_t)G);
  if (!groups || !nodes || !ngroups || !nload || !ids || !held || !nheld || !gnode)
    goto done;
  for (int g = 0; g < G; g++) {
    double s = 0;
    for (int e = g * gsize; e < (g + 1) * gsize; e++)
      s += L->counts[e];
    groups[g] = (replica){g, s};
  }
  qsort(groups, (size_t)G, sizeof *groups, replica_cmp);
  for (int i = 0; i < G; i++) {
    int best = -1;
    for (int k = 0; k < nn; k++)
      if (ngroups[k] < gpn && (best < 0 || nload[k] < nload[best]))
        best = k;
    gnode[groups[i].expert] = best;
    ngroups[best]++;
    nload[best] += groups[i].load;
  }
  for (int k = 0; k < nn; k++)
    nodes[k] = (replica){k, nload[k]};
  qsort(nodes, (size_t)nn, sizeof *nodes, replica_cmp);
  for (int i = 0; i < nn; i++) {
    const int k = nodes[i].expert;
    const int rk = R / nn + (i < R % nn ? 1 : 0); /* heaviest nodes take the remainder */
    int n = 0;
    for (int g = 0; g < G; g++)
      if (gnode[g] == k)
        for (int e = g * gsize; e < (g + 1) * gsize; e++)
          ids[k * en + n++] = e;
    EPIC_CHECK_GOTO(pack(L->counts, ids + k * en, en, rpn, rk, cap, held + (size_t)k * rpn * cap,
                         nheld + k * rpn),
                    st, done);
  }
  st = collect_slots(L, N, cap, held, nheld);
done:
  free(groups);
  free(nodes);
  free(ngroups);
  free(nload);
  free(ids);
  free(held);
  free(nheld);
  free(gnode);
  return st;
}

/* Max and mean rank load of a placement given owner counts. */
static void layer_load(const plan_layer *L, int N, const int32_t *rank_off, const int32_t *slots,
                       const int32_t *owner_off, double *max, double *mean) {
  double total = 0, mx = 0;
  for (int r = 0; r < N; r++) {
    double s = 0;
    for (int32_t i = rank_off[r]; i < rank_off[r + 1]; i++) {
      const int32_t e = slots[i];
      const int32_t c = owner_off ? owner_off[e + 1] - owner_off[e] : 1;
      s += L->counts[e] / c;
    }
    total += s;
    if (s > mx)
      mx = s;
  }
  *max = mx;
  *mean = total / N;
}

/* ---- create / destroy ------------------------------------------------------------------- */

void epic_plan_destroy(epic_plan *pl) {
  if (!pl)
    return;
  if (pl->layers)
    for (int l = 0; l < pl->n_layers; l++) {
      plan_layer *L = &pl->layers[l];
      free(L->counts);
      free(L->rank_off);
      free(L->slots);
      free(L->owner_off);
      free(L->owners);
    }
  free(pl->layers);
  free(pl->mem);
  free(pl);
}

/* S of planner.h's run-time EPLB: the most experts one MoE layer's re-placement with
 * eplb_redundant copies may give a rank; 0 without copies or MoE layers. The
 * hierarchical bound (never below the global one) counts when that policy applies to
 * these copies, as coordinator/eplb.c decides at run time. */
static int eplb_layer_slots(const epic_plan *pl, int n_moe, int rpn) {
  const int64_t E = pl->n_experts, N = pl->n_ranks, R = pl->eplb_redundant;
  if (R <= 0 || n_moe <= 0 || E <= 0)
    return 0;
  int64_t S = (E + R + N - 1) / N;
  if (pl->policy == EPIC_EPLB_HIERARCHICAL && rpn >= 1 && N % rpn == 0) {
    const int64_t nn = N / rpn, G = eplb_groups(&pl->cfg, (int)E);
    if (E % G == 0 && G % nn == 0 && (R + nn - 1) / nn <= (E / nn) * (rpn - 1)) {
      const int64_t h = (E / nn + (R + nn - 1) / nn + rpn - 1) / rpn;
      if (h > S)
        S = h;
    }
  }
  return (int)S;
}

static uint64_t reserve_bytes(const epic_model_config *c, int64_t tokens) {
  const int64_t D = c->hidden_size, H = c->num_attention_heads;
  const int64_t topk = c->n_routed_experts > 0 ? c->num_experts_per_tok : 0;
  int64_t ffn = c->intermediate_size;
  if (topk * c->moe_intermediate_size > ffn)
    ffn = topk * c->moe_intermediate_size;
  const int64_t per_token =
      2 * (6 * D + H * (epic_config_qk_head_dim(c) + c->v_head_dim) + 2 * topk * D + 3 * ffn) +
      4 * c->vocab_size;
  return PLAN_BASE_RESERVE + (uint64_t)tokens * (uint64_t)per_token;
}

/* What a worker's model derives from the checkpoint and keeps beside it (worker/model.c):
 * per attention layer kv_b's per-head slices for the absorbed form at head_bytes per
 * element (bf16 in CUDA's fast and invariant precisions: epic_model_params.head_bf16,
 * else fp32), per MoE layer the router in fp32. */
static uint64_t derived_bytes(const epic_model_config *c, int n_layers, int head_bytes) {
  const uint64_t kv_b = (uint64_t)(c->num_attention_heads * (c->qk_nope_head_dim + c->v_head_dim) *
                                   c->kv_lora_rank) * (uint64_t)head_bytes;
  uint64_t total = 0;
  for (int l = 0; l < n_layers; l++)
    total += kv_b + (l >= c->num_hidden_layers || epic_config_is_moe_layer(c, l)
                         ? (uint64_t)(c->n_routed_experts * c->hidden_size) * 4
                         : 0);
  return total;
}

epic_status epic_plan_create(const epic_plan_params *p, epic_plan **out) {
  epic_status st = EPIC_ERR_NOMEM;
  epic_plan *pl = NULL;
  if (!out)
    return EPIC_ERR_INVALID;
  *out = NULL;
  if (!p || p->size != sizeof(epic_plan_params)) {
    EPIC_LOG_ERROR("planner: unknown epic_plan_params size");
    return EPIC_ERR_INVALID;
  }
  if (!p->cfg) {
    EPIC_LOG_ERROR("planner: no model config");
    return EPIC_ERR_INVALID;
  }
  const epic_model_config *c = p->cfg;
  if (p->n_ranks < 1 || p->n_ranks > (1 << 20)) {
    EPIC_LOG_ERROR("planner: the number of ranks must be in [1, %d] (got %d)", 1 << 20, p->n_ranks);
    return EPIC_ERR_INVALID;
  }
  if (c->n_routed_experts > INT32_MAX / 2 || c->num_hidden_layers > (1 << 20) ||
      c->num_nextn_predict_layers > 64) {
    EPIC_LOG_ERROR("planner: model config out of the planner's range");
    return EPIC_ERR_INVALID;
  }
  if (p->max_batch_tokens < 0) {
    EPIC_LOG_ERROR("planner: max_batch_tokens must not be negative (got %lld)",
                   (long long)p->max_batch_tokens);
    return EPIC_ERR_INVALID;
  }
  const int E = (int)c->n_routed_experts, N = p->n_ranks;
  if (p->n_redundant < 0 || (int64_t)p->n_redundant > (int64_t)E * (N - 1)) {
    EPIC_LOG_ERROR("planner: %d redundant copies per layer: must be in [0, %lld] "
                   "(each of %d experts at most once per rank on %d ranks)",
                   p->n_redundant, (long long)E * (N - 1), E, N);
    return EPIC_ERR_INVALID;
  }
  if (p->eplb_redundant < 0 || (int64_t)p->eplb_redundant > (int64_t)E * (N - 1)) {
    EPIC_LOG_ERROR("planner: %d run-time EPLB copies per layer (--eplb-redundant): must be in "
                   "[0, %lld] (each of %d experts at most once per rank on %d ranks)",
                   p->eplb_redundant, (long long)E * (N - 1), E, N);
    return EPIC_ERR_INVALID;
  }
  if (p->n_redundant > 0 && !p->load_stats_path && !p->load_counts) {
    EPIC_LOG_ERROR("planner: redundant expert copies need load statistics (a load-stats file)");
    return EPIC_ERR_INVALID;
  }
  if (p->load_stats_path && p->load_counts) {
    EPIC_LOG_ERROR("planner: load statistics from a file and from memory at once");
    return EPIC_ERR_INVALID;
  }
  if (p->load_counts && p->n_load_layers < 0) {
    EPIC_LOG_ERROR("planner: n_load_layers must not be negative (got %lld)",
                   (long long)p->n_load_layers);
    return EPIC_ERR_INVALID;
  }
  if (p->policy != EPIC_EPLB_GLOBAL && p->policy != EPIC_EPLB_HIERARCHICAL) {
    EPIC_LOG_ERROR("planner: unknown placement policy %d", (int)p->policy);
    return EPIC_ERR_INVALID;
  }
  if (p->policy == EPIC_EPLB_HIERARCHICAL) {
    const int rpn = p->ranks_per_node, G = eplb_groups(c, E);
    if (rpn < 1 || N % rpn != 0) {
      EPIC_LOG_ERROR("planner: hierarchical policy: ranks_per_node %d must divide the %d ranks",
                     rpn, N);
      return EPIC_ERR_INVALID;
    }
    const int nn = N / rpn;
    if (E % G != 0 || G % nn != 0) {
      EPIC_LOG_ERROR("planner: hierarchical policy: the %d expert groups (n_group) must split "
                     "evenly over %d nodes of %d ranks",
                     G, nn, rpn);
      return EPIC_ERR_INVALID;
    }
    if ((int64_t)(p->n_redundant + nn - 1) / nn > (int64_t)(E / nn) * (rpn - 1)) {
      EPIC_LOG_ERROR("planner: hierarchical policy: %d redundant copies over %d nodes is more "
                     "than one copy of each of a node's %d experts per rank (%d ranks per node)",
                     p->n_redundant, nn, E / nn, rpn);
      return EPIC_ERR_INVALID;
    }
  }
  if (!(pl = calloc(1, sizeof *pl)))
    return EPIC_ERR_NOMEM;
  pl->cfg = *c;
  pl->n_ranks = N;
  pl->n_experts = E;
  pl->n_redundant = p->n_redundant;
  pl->policy = p->policy;
  pl->ranks_per_node = p->policy == EPIC_EPLB_HIERARCHICAL ? p->ranks_per_node : 0;
  pl->include_mtp = p->include_mtp && c->num_nextn_predict_layers > 0;
  pl->n_layers = (int)(c->num_hidden_layers + (pl->include_mtp ? c->num_nextn_predict_layers : 0));
  pl->gpu_mem = p->gpu_mem_bytes;
  /* by default a GPU worker's default step: what epic serve reserves on GPUs */
  pl->max_batch_tokens =
      p->max_batch_tokens > 0 ? p->max_batch_tokens : EPIC_OPS_DEVICE_STEP_TOKENS;
  pl->min_kv_tokens =
      pl->max_batch_tokens > PLAN_MIN_KV_TOKENS ? pl->max_batch_tokens : PLAN_MIN_KV_TOKENS;
  pl->kv_per_token = (uint64_t)(c->kv_lora_rank + c->qk_rope_head_dim) *
                     (uint64_t)(p->kv_elem_bytes > 0 ? p->kv_elem_bytes : 2) * (uint64_t)pl->n_layers;
  EPIC_CHECK_GOTO(epic_weight_bytes_compute(c, pl->include_mtp, &pl->w), st, fail);
  pl->replicated = pl->w.total - pl->w.routed_experts;

  st = EPIC_ERR_NOMEM;
  pl->layers = calloc((size_t)pl->n_layers, sizeof(plan_layer));
  pl->mem = calloc((size_t)N, sizeof(epic_rank_memory));
  if (!pl->layers || !pl->mem)
    goto fail;
  pl->reserve = reserve_bytes(c, pl->max_batch_tokens) +
                derived_bytes(c, pl->n_layers, p->head_elem_bytes > 0 ? p->head_elem_bytes : 2);
  for (int l = 0; l < pl->n_layers; l++)
    pl->layers[l].moe = epic_config_is_moe_layer(c, l);
  if (p->load_stats_path)
    EPIC_CHECK_GOTO(load_stats(pl, p->load_stats_path), st, fail);
  if (p->load_counts)
    EPIC_CHECK_GOTO(take_counts(pl, p->load_counts, p->n_load_layers), st, fail);

  int k = 0;
  for (int l = 0; l < pl->n_layers; l++) {
    plan_layer *L = &pl->layers[l];
    if (!L->moe)
      continue;
    if (L->counts && p->policy == EPIC_EPLB_HIERARCHICAL)
      EPIC_CHECK_GOTO(place_hierarchical(L, c, N, E, p->n_redundant, p->ranks_per_node), st,
                      fail);
    else if (L->counts && p->n_redundant > 0)
      EPIC_CHECK_GOTO(place_redundant(L, N, E, p->n_redundant), st, fail);
    else
      EPIC_CHECK_GOTO(place_contiguous(L, N, E, k), st, fail);
    EPIC_CHECK_GOTO(build_owners(L, N, E), st, fail);
    if (L->counts) {
      /* "Before" is the default placement: contiguous, one copy each. */
      plan_layer def = {.counts = L->counts};
      st = place_contiguous(&def, N, E, k);
      if (st == EPIC_OK)
        layer_load(&def, N, def.rank_off, def.slots, NULL, &L->max_before, &L->mean_before);
      free(def.rank_off);
      free(def.slots);
      if (st != EPIC_OK)
        goto fail;
      layer_load(L, N, L->rank_off, L->slots, L->owner_off, &L->max_after, &L->mean_after);
    }
    for (int r = 0; r < N; r++)
      pl->mem[r].expert_slots += L->rank_off[r + 1] - L->rank_off[r];
    k++;
  }

  pl->eplb_redundant = p->eplb_redundant;
  pl->eplb_layer_slots = eplb_layer_slots(pl, k, p->ranks_per_node);
  pl->fits = 1;
  for (int r = 0; r < N; r++) {
    epic_rank_memory *m = &pl->mem[r];
    m->replicated_bytes = pl->replicated;
    m->expert_bytes = (uint64_t)m->expert_slots * pl->w.expert;
    m->weight_bytes = m->replicated_bytes + m->expert_bytes;
    m->reserve_bytes = pl->reserve;
    if (pl->eplb_layer_slots > 0) {
      /* One layer more than the steady state: a re-placement loads a layer's new
       * experts before it frees the old ones (worker/model.c). */
      const int64_t most = (int64_t)(k + 1) * pl->eplb_layer_slots;
      m->eplb_slots = most > m->expert_slots ? most - m->expert_slots : 0;
      m->eplb_bytes = (uint64_t)m->eplb_slots * pl->w.expert;
    }
    m->fits = 1;
    if (pl->gpu_mem) {
      const uint64_t gm = pl->gpu_mem > (uint64_t)INT64_MAX ? (uint64_t)INT64_MAX : pl->gpu_mem;
      m->kv_budget_bytes = (int64_t)gm - (int64_t)m->weight_bytes - (int64_t)m->reserve_bytes -
                           (int64_t)m->eplb_bytes;
      m->kv_tokens = m->kv_budget_bytes > 0 && pl->kv_per_token
                         ? m->kv_budget_bytes / (int64_t)pl->kv_per_token
                         : 0;
      m->fits = m->kv_tokens >= pl->min_kv_tokens;
    }
    if (!m->fits)
      pl->fits = 0;
  }
  *out = pl;
  return EPIC_OK;
fail:
  epic_plan_destroy(pl);
  return st;
}

/* ---- accessors ------------------------------------------------------------------------- */

int epic_plan_n_ranks(const epic_plan *pl) {
  return pl ? pl->n_ranks : 0;
}
int epic_plan_n_experts(const epic_plan *pl) {
  return pl ? pl->n_experts : 0;
}
int epic_plan_n_layers(const epic_plan *pl) {
  return pl ? pl->n_layers : 0;
}
int epic_plan_is_moe_layer(const epic_plan *pl, int layer) {
  return pl && layer >= 0 && layer < pl->n_layers && pl->layers[layer].moe;
}
int epic_plan_eplb_redundant(const epic_plan *pl) {
  return pl ? pl->eplb_redundant : 0;
}
int epic_plan_eplb_layer_slots(const epic_plan *pl) {
  return pl ? pl->eplb_layer_slots : 0;
}
int64_t epic_plan_eplb_copies(int64_t requested, int64_t n_experts, int n_ranks,
                              int experts_invariant) {
  const int64_t most = n_ranks > 1 && n_experts > 0 ? n_experts * (n_ranks - 1) : 0;
  if (most == 0 || requested < 0)
    return 0;
  if (requested > 0)
    return requested;
  if (!experts_invariant)
    return 0;
  return n_ranks < most ? n_ranks : most;
}
int epic_plan_fits(const epic_plan *pl) {
  return pl ? pl->fits : 0;
}
uint64_t epic_plan_kv_bytes_per_token(const epic_plan *pl) {
  return pl ? pl->kv_per_token : 0;
}
int64_t epic_plan_min_kv_tokens(const epic_plan *pl) {
  return pl ? pl->min_kv_tokens : 0;
}
const epic_weight_bytes *epic_plan_weights(const epic_plan *pl) {
  return pl ? &pl->w : NULL;
}

epic_status epic_plan_rank_experts(const epic_plan *pl, int layer, int rank, const int32_t **ids,
                                   int *n) {
  if (!pl || !ids || !n || layer < 0 || layer >= pl->n_layers || rank < 0 || rank >= pl->n_ranks)
    return EPIC_ERR_INVALID;
  const plan_layer *L = &pl->layers[layer];
  if (!L->moe) {
    *ids = NULL;
    *n = 0;
    return EPIC_OK;
  }
  *ids = L->slots + L->rank_off[rank];
  *n = L->rank_off[rank + 1] - L->rank_off[rank];
  return EPIC_OK;
}

epic_status epic_plan_expert_owners(const epic_plan *pl, int layer, int expert,
                                    const int32_t **ranks, int *n) {
  if (!pl || !ranks || !n || layer < 0 || layer >= pl->n_layers || !pl->layers[layer].moe ||
      expert < 0 || expert >= pl->n_experts)
    return EPIC_ERR_INVALID;
  const plan_layer *L = &pl->layers[layer];
  *ranks = L->owners + L->owner_off[expert];
  *n = L->owner_off[expert + 1] - L->owner_off[expert];
  return EPIC_OK;
}

epic_status epic_plan_rank_memory(const epic_plan *pl, int rank, epic_rank_memory *out) {
  if (!pl || !out || rank < 0 || rank >= pl->n_ranks)
    return EPIC_ERR_INVALID;
  *out = pl->mem[rank];
  return EPIC_OK;
}

epic_status epic_plan_load_balance(const epic_plan *pl, int layer, epic_plan_balance *out) {
  if (!pl || !out || layer < -1 || layer >= pl->n_layers)
    return EPIC_ERR_INVALID;
  memset(out, 0, sizeof *out);
  for (int l = 0; l < pl->n_layers; l++) {
    const plan_layer *L = &pl->layers[l];
    if ((layer >= 0 && l != layer) || !L->moe || !L->counts)
      continue;
    out->n_layers++;
    out->max_before += L->max_before;
    out->mean_before += L->mean_before;
    out->max_after += L->max_after;
    out->mean_after += L->mean_after;
  }
  if (out->mean_before > 0)
    out->ratio_before = out->max_before / out->mean_before;
  if (out->mean_after > 0)
    out->ratio_after = out->max_after / out->mean_after;
  return EPIC_OK;
}

const char *epic_eplb_policy_name(epic_eplb_policy p) {
  return p == EPIC_EPLB_HIERARCHICAL ? "hierarchical" : "global";
}

epic_status epic_eplb_policy_parse(const char *s, epic_eplb_policy *out) {
  if (!s || !out)
    return EPIC_ERR_INVALID;
  if (strcmp(s, "global") == 0)
    *out = EPIC_EPLB_GLOBAL;
  else if (strcmp(s, "hierarchical") == 0)
    *out = EPIC_EPLB_HIERARCHICAL;
  else
    return EPIC_ERR_INVALID;
  return EPIC_OK;
}

epic_status epic_eplb_load(int n_ranks, int n_experts, const double *counts, const int32_t *off,
                           const int32_t *ranks, double *max, double *mean) {
  if (n_ranks < 1 || n_experts < 0 || !counts || !off || !ranks || !max || !mean)
    return EPIC_ERR_INVALID;
  double *load = calloc((size_t)n_ranks, sizeof(double)), total = 0;
  if (!load)
    return EPIC_ERR_NOMEM;
  for (int e = 0; e < n_experts; e++) {
    const int32_t n = off[e + 1] - off[e];
    if (n < 1) {
      free(load);
      return EPIC_ERR_INVALID;
    }
    for (int32_t i = off[e]; i < off[e + 1]; i++) {
      if (ranks[i] < 0 || ranks[i] >= n_ranks) {
        free(load);
        return EPIC_ERR_INVALID;
      }
      load[ranks[i]] += counts[e] / n;
    }
    total += counts[e];
  }
  *max = 0;
  for (int r = 0; r < n_ranks; r++)
    if (load[r] > *max)
      *max = load[r];
  *mean = total / n_ranks;
  free(load);
  return EPIC_OK;
}

/* ---- output ---------------------------------------------------------------------------- */

/* "a-b,c,d-e" for an ascending id list. */
static void write_ranges(FILE *f, const int32_t *ids, int n) {
  for (int i = 0; i < n;) {
    int j = i;
    while (j + 1 < n && ids[j + 1] == ids[j] + 1)
      j++;
    if (i)
      fputc(',', f);
    if (j > i)
      fprintf(f, "%d-%d", ids[i], ids[j]);
    else
      fprintf(f, "%d", ids[i]);
    i = j + 1;
  }
}

static int same_placement(const plan_layer *a, const plan_layer *b, int N) {
  return memcmp(a->rank_off, b->rank_off, sizeof(int32_t) * ((size_t)N + 1)) == 0 &&
         memcmp(a->slots, b->slots, sizeof(int32_t) * (size_t)a->rank_off[N]) == 0;
}

static void write_balance_json(FILE *f, const epic_plan_balance *b) {
  fprintf(f,
          "{\"layers_with_stats\":%d,\"max_before\":%.6g,\"mean_before\":%.6g,"
          "\"ratio_before\":%.6g,\"max_after\":%.6g,\"mean_after\":%.6g,\"ratio_after\":%.6g}",
          b->n_layers, b->max_before, b->mean_before, b->ratio_before, b->max_after, b->mean_after,
          b->ratio_after);
}

epic_status epic_plan_write_json(const epic_plan *pl, FILE *f) {
  if (!pl || !f)
    return EPIC_ERR_INVALID;
  const epic_model_config *c = &pl->cfg;
  const epic_weight_bytes *w = &pl->w;
  const int N = pl->n_ranks;
  int n_moe = 0;
  for (int l = 0; l < pl->n_layers; l++)
    n_moe += pl->layers[l].moe;
  fprintf(f,
          "{\"model\":{\"model_type\":\"%s\",\"num_hidden_layers\":%lld,"
          "\"num_nextn_predict_layers\":%lld,\"n_routed_experts\":%d,\"fp8\":%s},",
          c->model_type, (long long)c->num_hidden_layers, (long long)c->num_nextn_predict_layers,
          pl->n_experts, c->quant.fp8 ? "true" : "false");
  fprintf(f,
          "\"n_ranks\":%d,\"gpu_mem_bytes\":%llu,\"include_mtp\":%s,\"n_layers\":%d,"
          "\"n_moe_layers\":%d,\"n_redundant\":%d,\"eplb_policy\":\"%s\","
          "\"ranks_per_node\":%d,\"eplb_redundant\":%d,\"eplb_layer_slots\":%d,"
          "\"max_batch_tokens\":%lld,"
          "\"kv_bytes_per_token\":%llu,\"min_kv_tokens\":%lld,\"fits\":%s,",
          N, (unsigned long long)pl->gpu_mem, pl->include_mtp ? "true" : "false", pl->n_layers,
          n_moe, pl->n_redundant, epic_eplb_policy_name(pl->policy), pl->ranks_per_node,
          pl->eplb_redundant, pl->eplb_layer_slots, (long long)pl->max_batch_tokens,
          (unsigned long long)pl->kv_per_token, (long long)pl->min_kv_tokens,
          pl->fits ? "true" : "false");
  fprintf(f,
          "\"weights\":{\"embedding\":%llu,\"lm_head\":%llu,\"attention\":%llu,\"norms\":%llu,"
          "\"dense_mlp\":%llu,\"shared_experts\":%llu,\"router\":%llu,\"routed_experts\":%llu,"
          "\"mtp_extra\":%llu,\"mtp_copies\":%llu,\"expert\":%llu,\"total\":%llu,"
          "\"n_tensors\":%lld},",
          (unsigned long long)w->embedding, (unsigned long long)w->lm_head,
          (unsigned long long)w->attention, (unsigned long long)w->norms,
          (unsigned long long)w->dense_mlp, (unsigned long long)w->shared_experts,
          (unsigned long long)w->router, (unsigned long long)w->routed_experts,
          (unsigned long long)w->mtp_extra, (unsigned long long)w->mtp_copies,
          (unsigned long long)w->expert, (unsigned long long)w->total, (long long)w->n_tensors);
  fputs("\"ranks\":[", f);
  for (int r = 0; r < N; r++) {
    const epic_rank_memory *m = &pl->mem[r];
    fprintf(f,
            "%s{\"rank\":%d,\"expert_slots\":%lld,\"replicated_bytes\":%llu,\"expert_bytes\":%llu,"
            "\"weight_bytes\":%llu,\"reserve_bytes\":%llu,\"eplb_slots\":%lld,"
            "\"eplb_bytes\":%llu,\"kv_budget_bytes\":%lld,"
            "\"kv_tokens\":%lld,\"fits\":%s}",
            r ? "," : "", r, (long long)m->expert_slots, (unsigned long long)m->replicated_bytes,
            (unsigned long long)m->expert_bytes, (unsigned long long)m->weight_bytes,
            (unsigned long long)m->reserve_bytes, (long long)m->eplb_slots,
            (unsigned long long)m->eplb_bytes, (long long)m->kv_budget_bytes,
            (long long)m->kv_tokens, m->fits ? "true" : "false");
  }
  /* Placement: layers with identical placement share one entry. */
  fputs("],\"placement\":[", f);
  unsigned char *done = calloc((size_t)pl->n_layers + 1, 1);
  if (!done)
    return EPIC_ERR_NOMEM;
  int first = 1;
  for (int l = 0; l < pl->n_layers; l++) {
    const plan_layer *L = &pl->layers[l];
    if (!L->moe || done[l])
      continue;
    int32_t *group = malloc(sizeof(int32_t) * (size_t)pl->n_layers);
    if (!group) {
      free(done);
      return EPIC_ERR_NOMEM;
    }
    int ng = 0;
    for (int m = l; m < pl->n_layers; m++)
      if (pl->layers[m].moe && !done[m] && same_placement(L, &pl->layers[m], N)) {
        done[m] = 1;
        group[ng++] = m;
      }
    fprintf(f, "%s{\"layers\":\"", first ? "" : ",");
    write_ranges(f, group, ng);
    fputs("\",\"ranks\":[", f);
    for (int r = 0; r < N; r++) {
      fprintf(f, "%s\"", r ? "," : "");
      write_ranges(f, L->slots + L->rank_off[r], L->rank_off[r + 1] - L->rank_off[r]);
      fputc('"', f);
    }
    fputs("]}", f);
    free(group);
    first = 0;
  }
  free(done);
  fputs("]", f);
  epic_plan_balance b;
  epic_plan_load_balance(pl, -1, &b);
  if (b.n_layers) {
    fputs(",\"balance\":", f);
    write_balance_json(f, &b);
  }
  fputs("}\n", f);
  return ferror(f) ? EPIC_ERR_IO : EPIC_OK;
}

static double gb(uint64_t b) {
  return (double)b / 1e9;
}

epic_status epic_plan_write_table(const epic_plan *pl, FILE *f) {
  if (!pl || !f)
    return EPIC_ERR_INVALID;
  const epic_model_config *c = &pl->cfg;
  const int N = pl->n_ranks;
  int n_moe = 0;
  for (int l = 0; l < pl->n_layers; l++)
    n_moe += pl->layers[l].moe;
  fprintf(f, "model: %s, %d layers%s (%d MoE x %d routed experts), %s weights\n", c->model_type,
          pl->n_layers, pl->include_mtp ? " incl. MTP" : "", n_moe, pl->n_experts,
          c->quant.fp8 ? "fp8" : "bf16");
  fprintf(f,
          "weights of the planned layers: %.2f GB (%lld tensors): routed experts %.2f GB (%.1f MB "
          "each), "
          "replicated %.2f GB\n",
          gb(pl->w.total), (long long)pl->w.n_tensors, gb(pl->w.routed_experts),
          (double)pl->w.expert / 1e6, gb(pl->replicated));
  fprintf(f, "cluster: %d ranks", N);
  if (pl->gpu_mem)
    fprintf(f, " x %.2f GB", gb(pl->gpu_mem));
  fprintf(f,
          ", %d redundant experts per layer (%s placement), KV %llu B/token, reserve %.2f GB "
          "(max batch %lld tokens)\n\n",
          pl->n_redundant, epic_eplb_policy_name(pl->policy), (unsigned long long)pl->kv_per_token, gb(pl->reserve),
          (long long)pl->max_batch_tokens);
  const int eplb = pl->eplb_layer_slots > 0;
  if (eplb)
    fprintf(f,
            "run-time EPLB: %d copies per MoE layer: up to %d experts per layer on a rank; "
            "\"EPLB GB\" is set aside for them (one layer more while re-placing)\n\n",
            pl->eplb_redundant, pl->eplb_layer_slots);
  fprintf(f, "%5s %13s %10s %9s %10s %10s", "rank", "experts/layer", "replic GB", "expert GB",
          "weights GB", "reserve GB");
  if (eplb)
    fprintf(f, " %8s", "EPLB GB");
  fprintf(f, " %12s %12s %5s\n", "KV budget GB", "KV tokens", "fits");
  for (int r = 0; r < N; r++) {
    const epic_rank_memory *m = &pl->mem[r];
    int lo = -1, hi = -1;
    for (int l = 0; l < pl->n_layers; l++) {
      const plan_layer *L = &pl->layers[l];
      if (!L->moe)
        continue;
      const int n = L->rank_off[r + 1] - L->rank_off[r];
      if (lo < 0 || n < lo)
        lo = n;
      if (n > hi)
        hi = n;
    }
    char per[32];
    if (lo < 0)
      snprintf(per, sizeof per, "-");
    else if (lo == hi)
      snprintf(per, sizeof per, "%d", lo);
    else
      snprintf(per, sizeof per, "%d-%d", lo, hi);
    fprintf(f, "%5d %13s %10.2f %9.2f %10.2f %10.2f", r, per, gb(m->replicated_bytes),
            gb(m->expert_bytes), gb(m->weight_bytes), gb(m->reserve_bytes));
    if (eplb)
      fprintf(f, " %8.2f", gb(m->eplb_bytes));
    if (pl->gpu_mem)
      fprintf(f, " %12.2f %12lld %5s\n", (double)m->kv_budget_bytes / 1e9, (long long)m->kv_tokens,
              m->fits ? "yes" : "no");
    else
      fprintf(f, " %12s %12s %5s\n", "-", "-", "-");
  }
  epic_plan_balance b;
  epic_plan_load_balance(pl, -1, &b);
  if (b.n_layers)
    fprintf(f,
            "\nexpert load (max/mean rank load over %d layers with statistics): "
            "%.3f before, %.3f after\n",
            b.n_layers, b.ratio_before, b.ratio_after);
  uint64_t wmax = 0;
  int64_t kv_min = -1, kv_total = 0;
  for (int r = 0; r < N; r++) {
    if (pl->mem[r].weight_bytes > wmax)
      wmax = pl->mem[r].weight_bytes;
    if (kv_min < 0 || pl->mem[r].kv_tokens < kv_min)
      kv_min = pl->mem[r].kv_tokens;
    kv_total += pl->mem[r].kv_tokens;
  }
  if (!pl->gpu_mem)
    fprintf(
        f,
        "\nsummary: %d ranks, at most %.2f GB of weights per rank (no --gpu-mem: no fit check)\n",
        N, gb(wmax));
  else
    fprintf(f,
            "\nsummary: %s: %d ranks x %.2f GB, at most %.2f GB of weights per rank, "
            "KV cache for %lld tokens per rank (min), %lld in total (need >= %lld per rank)\n",
            pl->fits ? "FITS" : "DOES NOT FIT", N, gb(pl->gpu_mem), gb(wmax), (long long)kv_min,
            (long long)kv_total, (long long)pl->min_kv_tokens);
  return ferror(f) ? EPIC_ERR_IO : EPIC_OK;
}
