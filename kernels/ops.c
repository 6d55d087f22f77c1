/* Backend-independent parts of epic_ops: dtype helpers and the reference
 * dequantisation every backend (and every test) shares. */
#include "ops.h"

#include <math.h>
#include <string.h>

#include "../common/log.h"

size_t epic_dtype_size(epic_dtype dt) {
  switch (dt) {
  case EPIC_DT_F32: return 4;
  case EPIC_DT_BF16: return 2;
  case EPIC_DT_F16: return 2;
  case EPIC_DT_F8E4M3: return 1;
  case EPIC_DT_I32: return 4;
  case EPIC_DT_I64: return 8;
  case EPIC_DT_U8: return 1;
  case EPIC_DT_OTHER: return 0;
  }
  return 0;
}

const char *epic_dtype_name(epic_dtype dt) {
  switch (dt) {
  case EPIC_DT_F32: return "F32";
  case EPIC_DT_BF16: return "BF16";
  case EPIC_DT_F16: return "F16";
  case EPIC_DT_F8E4M3: return "F8_E4M3";
  case EPIC_DT_I32: return "I32";
  case EPIC_DT_I64: return "I64";
  case EPIC_DT_U8: return "U8";
  case EPIC_DT_OTHER: return "other";
  }
  return "other";
}

float epic_bf16_to_f32(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

uint16_t epic_f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

float epic_f16_to_f32(uint16_t v) {
  uint32_t sign = (uint32_t)(v >> 15) & 1u, exp = (v >> 10) & 0x1fu, man = v & 0x3ffu;
  float r;
  if (exp == 0)
    r = ldexpf((float)man, -24);
  else if (exp == 31)
    r = man ? NAN : INFINITY;
  else
    r = ldexpf((float)(man | 0x400u), (int)exp - 25);
  return sign ? -r : r;
}

float epic_fp8e4m3_to_f32(uint8_t v) {
  uint32_t sign = (v >> 7) & 1u, exp = (v >> 3) & 0xfu, man = v & 0x7u;
  float r;
  if (exp == 0xf && man == 0x7) return NAN;
  if (exp == 0)
    r = ldexpf((float)man, -9); /* subnormal: man * 2^-3 * 2^(1-7) */
  else
    r = ldexpf((float)(man | 0x8u), (int)exp - 10);
  return sign ? -r : r;
}

uint8_t epic_f32_to_fp8e4m3(float f) {
  uint8_t sign = signbit(f) ? 0x80 : 0;
  float a = fabsf(f);
  if (isnan(f)) return 0x7f;
  if (a >= 448.0f) return sign | 0x7e; /* saturate */
  /* Exhaustive nearest search over the 127 non-negative finite codes: exact and
   * simple; only used for tests and dummy weights, never on a hot path. */
  uint8_t best = 0;
  float bestd = INFINITY;
  for (uint8_t c = 0; c < 0x7f; c++) {
    float d = fabsf(epic_fp8e4m3_to_f32(c) - a);
    if (d < bestd || (d == bestd && (c & 1) == 0)) {
      bestd = d;
      best = c;
    }
  }
  return sign | best;
}

void epic_weight_rows_f32(const epic_weight *w, int64_t r0, int64_t n, float *out) {
  const int64_t cols = w->cols;
  for (int64_t i = 0; i < n; i++) {
    const int64_t r = r0 + i;
    float *o = out + i * cols;
    switch (w->dtype) {
    case EPIC_DT_F32:
      memcpy(o, (const float *)w->data + r * cols, (size_t)cols * sizeof(float));
      break;
    case EPIC_DT_BF16: {
      const uint16_t *s = (const uint16_t *)w->data + r * cols;
      for (int64_t c = 0; c < cols; c++) o[c] = epic_bf16_to_f32(s[c]);
      break;
    }
    case EPIC_DT_F16: {
      const uint16_t *s = (const uint16_t *)w->data + r * cols;
      for (int64_t c = 0; c < cols; c++) o[c] = epic_f16_to_f32(s[c]);
      break;
    }
    case EPIC_DT_F8E4M3: {
      const uint8_t *s = (const uint8_t *)w->data + r * cols;
      const int64_t nbc = (cols + w->block_cols - 1) / w->block_cols;
      const float *sc = w->scale_inv + (r / w->block_rows) * nbc;
      for (int64_t c = 0; c < cols; c++) o[c] = epic_fp8e4m3_to_f32(s[c]) * sc[c / w->block_cols];
      break;
    }
    default:
      memset(o, 0, (size_t)cols * sizeof(float));
      break;
    }
  }
}

void epic_ops_destroy(epic_ops *o) {
  if (o && o->vt && o->vt->destroy) o->vt->destroy(o);
}

int epic_ops_rows_invariant(epic_ops *o) {
  if (o->vt->host_visible) return 1; /* the CPU backend, the one backend in host memory */
  return o->vt->abi_version >= 12 && o->vt->rows_invariant ? o->vt->rows_invariant(o) : 0;
}

int epic_ops_experts_invariant(epic_ops *o, const epic_weight *w) {
  if (epic_ops_rows_invariant(o))
    return 1;
  return o->vt->abi_version >= 9 && o->vt->grouped_invariant && w ? o->vt->grouped_invariant(o, w)
                                                                  : 0;
}

int64_t epic_ops_step_tokens(epic_ops *o) {
  return o->vt->host_visible ? 2048 : EPIC_OPS_DEVICE_STEP_TOKENS;
}

epic_kv_dtype epic_ops_kv_dtype(epic_ops *o) {
  return o->vt->abi_version >= 5 && o->vt->kv_dtype ? o->vt->kv_dtype(o) : EPIC_KV_F32;
}

int epic_ops_has_head_bf16(epic_ops *o) {
  return o->vt->abi_version >= 10 && o->vt->head_gemm_bf16;
}

epic_dtype epic_ops_head_dtype(epic_ops *o) {
  if (!epic_ops_has_head_bf16(o) || !o->vt->head_dtype) return EPIC_DT_F32;
  return o->vt->head_dtype(o) == EPIC_DT_BF16 ? EPIC_DT_BF16 : EPIC_DT_F32;
}

int epic_ops_has_moe_plan(epic_ops *o) {
  return o->vt->abi_version >= 6 && o->vt->moe_plan && o->vt->grouped_matmul_dev;
}

int epic_ops_has_graphs(epic_ops *o) {
  return o->vt->abi_version >= 7 && o->vt->graph_begin && o->vt->graph_end &&
         o->vt->graph_launch && o->vt->graph_free && o->vt->graph_epoch;
}

int epic_ops_has_row_draw(epic_ops *o) {
  return o->vt->abi_version >= 13 && o->vt->row_draw;
}

int epic_ops_has_grouped_rows(epic_ops *o) {
  return o->vt->abi_version >= 11 && o->vt->grouped_matmul_rows;
}

void *epic_ops_queue(epic_ops *o) {
  return o->vt->abi_version >= 8 && o->vt->queue && o->vt->upload_async ? o->vt->queue(o) : NULL;
}

int epic_router_params_ok(const epic_router_params *p) {
  const int64_t ng = p && p->n_group > 1 ? p->n_group : 1;
  if (!p || p->n_experts <= 0 || p->top_k <= 0 || p->top_k > p->n_experts || ng > 1024 ||
      p->n_experts % ng != 0 || (p->scoring != 0 && p->scoring != 1) ||
      (ng > 1 && (p->topk_group <= 0 || p->topk_group > ng ||
                  p->top_k > p->topk_group * (p->n_experts / ng)))) {
    EPIC_LOG_ERROR("route: invalid router parameters");
    return 0;
  }
  return 1;
}

epic_status epic_ops_group_offsets(const int32_t *off, int64_t n_groups, int64_t rows,
                                   int64_t max_rows, int64_t *out) {
  for (int64_t g = 0; g <= n_groups; g++) {
    out[g] = off[g];
    if (g == 0 ? out[0] != 0 : out[g] < out[g - 1] || out[g] - out[g - 1] > max_rows) {
      EPIC_LOG_ERROR("grouped_matmul_dev: group %lld has %lld rows (offsets must start at 0 and "
                     "ascend, bound %lld)",
                     (long long)(g ? g - 1 : 0), (long long)(g ? out[g] - out[g - 1] : out[0]),
                     (long long)max_rows);
      return EPIC_ERR_INVALID;
    }
  }
  if (out[n_groups] != rows) {
    EPIC_LOG_ERROR("grouped_matmul_dev: the offsets end at %lld, not at rows = %lld",
                   (long long)out[n_groups], (long long)rows);
    return EPIC_ERR_INVALID;
  }
  return EPIC_OK;
}
