/* DeepSeek-V3 config.json parsing and validation (cJSON), plus the derived
 * RoPE/YaRN and softmax-scale constants. Defaults follow Hugging Face's
 * DeepseekV2/V3 configuration classes where a field is absent. */
#define _POSIX_C_SOURCE 200809L
#include "config.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../common/log.h"

/* 2^53: the largest range where a JSON double holds every integer exactly. */
#define EPIC_CONFIG_INT_MAX 9007199254740992.0

/* Parsing context: the file name for error messages. */
typedef struct cfg_ctx {
  const char *src;
  const char *prefix; /* "rope_scaling." while inside that object */
} cfg_ctx;

static epic_status field_int(const cfg_ctx *x, const cJSON *root, const char *key, int required,
                             int64_t def, int64_t *out) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
  if (!v || cJSON_IsNull(v)) {
    if (required) {
      EPIC_LOG_ERROR("%s: required field \"%s%s\" is missing", x->src, x->prefix, key);
      return EPIC_ERR_INVALID;
    }
    *out = def;
    return EPIC_OK;
  }
  if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) ||
      fabs(v->valuedouble) > EPIC_CONFIG_INT_MAX) {
    EPIC_LOG_ERROR("%s: field \"%s%s\" must be an integer", x->src, x->prefix, key);
    return EPIC_ERR_INVALID;
  }
  *out = (int64_t)v->valuedouble;
  return EPIC_OK;
}

static epic_status field_double(const cfg_ctx *x, const cJSON *root, const char *key, int required,
                                double def, double *out) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
  if (!v || cJSON_IsNull(v)) {
    if (required) {
      EPIC_LOG_ERROR("%s: required field \"%s%s\" is missing", x->src, x->prefix, key);
      return EPIC_ERR_INVALID;
    }
    *out = def;
    return EPIC_OK;
  }
  if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble)) {
    EPIC_LOG_ERROR("%s: field \"%s%s\" must be a number", x->src, x->prefix, key);
    return EPIC_ERR_INVALID;
  }
  *out = v->valuedouble;
  return EPIC_OK;
}

static epic_status field_bool(const cfg_ctx *x, const cJSON *root, const char *key, int def,
                              int *out) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
  if (!v || cJSON_IsNull(v)) {
    *out = def;
    return EPIC_OK;
  }
  if (!cJSON_IsBool(v)) {
    EPIC_LOG_ERROR("%s: field \"%s%s\" must be true or false", x->src, x->prefix, key);
    return EPIC_ERR_INVALID;
  }
  *out = cJSON_IsTrue(v) ? 1 : 0;
  return EPIC_OK;
}

static epic_status field_str(const cfg_ctx *x, const cJSON *root, const char *key, const char *def,
                             char *out, size_t cap) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
  const char *s = def;
  if (v && !cJSON_IsNull(v)) {
    if (!cJSON_IsString(v) || !v->valuestring) {
      EPIC_LOG_ERROR("%s: field \"%s%s\" must be a string", x->src, x->prefix, key);
      return EPIC_ERR_INVALID;
    }
    s = v->valuestring;
  }
  if (strlen(s) >= cap) {
    EPIC_LOG_ERROR("%s: field \"%s%s\" is too long (%zu characters, at most %zu)", x->src,
                   x->prefix, key, strlen(s), cap - 1);
    return EPIC_ERR_INVALID;
  }
  memcpy(out, s, strlen(s) + 1);
  return EPIC_OK;
}

static epic_status parse_rope_scaling(const cfg_ctx *outer, const cJSON *root,
                                      epic_rope_scaling *r) {
  const cfg_ctx xs = {.src = outer->src, .prefix = "rope_scaling."}, *x = &xs;
  const cJSON *rs = cJSON_GetObjectItemCaseSensitive(root, "rope_scaling");
  memset(r, 0, sizeof *r);
  r->factor = 1.0;
  r->beta_fast = 32.0;
  r->beta_slow = 1.0;
  r->mscale = 1.0;
  r->mscale_all_dim = 0.0;
  if (!rs || cJSON_IsNull(rs)) return EPIC_OK;
  if (!cJSON_IsObject(rs)) {
    EPIC_LOG_ERROR("%s: field \"rope_scaling\" must be an object or null", x->src);
    return EPIC_ERR_INVALID;
  }
  const char *key = cJSON_GetObjectItemCaseSensitive(rs, "type") ? "type" : "rope_type";
  EPIC_CHECK(field_str(x, rs, key, "", r->type, sizeof r->type));
  if (strcmp(r->type, "yarn") == 0) {
    r->yarn = 1;
  } else if (r->type[0] != '\0' && strcmp(r->type, "default") != 0) {
    /* linear/dynamic/longrope would change the frequencies: refuse rather than ignore. */
    EPIC_LOG_ERROR("%s: field \"rope_scaling.%s\" = \"%s\" is not supported (only \"yarn\")",
                   x->src, key, r->type);
    return EPIC_ERR_INVALID;
  }
  if (!r->yarn) return EPIC_OK;
  EPIC_CHECK(field_double(x, rs, "factor", 1, 1.0, &r->factor));
  EPIC_CHECK(field_int(x, rs, "original_max_position_embeddings", 1, 0,
                       &r->original_max_position_embeddings));
  EPIC_CHECK(field_double(x, rs, "beta_fast", 0, 32.0, &r->beta_fast));
  EPIC_CHECK(field_double(x, rs, "beta_slow", 0, 1.0, &r->beta_slow));
  EPIC_CHECK(field_double(x, rs, "mscale", 0, 1.0, &r->mscale));
  EPIC_CHECK(field_double(x, rs, "mscale_all_dim", 0, 0.0, &r->mscale_all_dim));
  if (!(r->factor > 0.0)) {
    EPIC_LOG_ERROR("%s: field \"rope_scaling.factor\" must be positive (got %g)", x->src,
                   r->factor);
    return EPIC_ERR_INVALID;
  }
  if (r->original_max_position_embeddings <= 0) {
    EPIC_LOG_ERROR("%s: field \"rope_scaling.original_max_position_embeddings\" must be "
                   "positive (got %lld)",
                   x->src, (long long)r->original_max_position_embeddings);
    return EPIC_ERR_INVALID;
  }
  if (!(r->beta_fast > 0.0) || !(r->beta_slow > 0.0)) {
    EPIC_LOG_ERROR("%s: fields \"rope_scaling.beta_fast\"/\"beta_slow\" must be positive", x->src);
    return EPIC_ERR_INVALID;
  }
  return EPIC_OK;
}

static epic_status parse_quant(const cfg_ctx *outer, const cJSON *root, epic_quant_config *q) {
  const cfg_ctx xs = {.src = outer->src, .prefix = "quantization_config."}, *x = &xs;
  const cJSON *qc = cJSON_GetObjectItemCaseSensitive(root, "quantization_config");
  memset(q, 0, sizeof *q);
  q->weight_block_size[0] = 128;
  q->weight_block_size[1] = 128;
  if (!qc || cJSON_IsNull(qc)) return EPIC_OK;
  if (!cJSON_IsObject(qc)) {
    EPIC_LOG_ERROR("%s: field \"quantization_config\" must be an object", x->src);
    return EPIC_ERR_INVALID;
  }
  EPIC_CHECK(field_str(x, qc, "quant_method", "", q->quant_method, sizeof q->quant_method));
  EPIC_CHECK(field_str(x, qc, "fmt", "e4m3", q->fmt, sizeof q->fmt));
  EPIC_CHECK(field_str(x, qc, "activation_scheme", "dynamic", q->activation_scheme,
                       sizeof q->activation_scheme));
  EPIC_CHECK(field_str(x, qc, "scale_fmt", "", q->scale_fmt, sizeof q->scale_fmt));
  if (strcmp(q->quant_method, "fp8") != 0) {
    EPIC_LOG_ERROR("%s: field \"quantization_config.quant_method\" = \"%s\" is not supported "
                   "(only \"fp8\")",
                   x->src, q->quant_method);
    return EPIC_ERR_INVALID;
  }
  if (strcmp(q->fmt, "e4m3") != 0) {
    EPIC_LOG_ERROR("%s: field \"quantization_config.fmt\" = \"%s\" is not supported "
                   "(only \"e4m3\")",
                   x->src, q->fmt);
    return EPIC_ERR_INVALID;
  }
  q->fp8 = 1;
  const cJSON *bs = cJSON_GetObjectItemCaseSensitive(qc, "weight_block_size");
  if (bs && !cJSON_IsNull(bs)) {
    int ok = cJSON_IsArray(bs) && cJSON_GetArraySize(bs) == 2;
    for (int i = 0; ok && i < 2; i++) {
      const cJSON *e = cJSON_GetArrayItem(bs, i);
      ok = cJSON_IsNumber(e) && e->valuedouble == floor(e->valuedouble) && e->valuedouble >= 1 &&
           e->valuedouble <= 1048576.0;
      if (ok) q->weight_block_size[i] = (int64_t)e->valuedouble;
    }
    if (!ok) {
      EPIC_LOG_ERROR("%s: field \"quantization_config.weight_block_size\" must be two "
                     "positive integers",
                     x->src);
      return EPIC_ERR_INVALID;
    }
  }
  return EPIC_OK;
}

static epic_status parse_eos(const cfg_ctx *x, const cJSON *root, epic_model_config *c) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, "eos_token_id");
  c->n_eos = 0;
  if (!v || cJSON_IsNull(v)) return EPIC_OK;
  if (cJSON_IsNumber(v)) {
    EPIC_CHECK(field_int(x, root, "eos_token_id", 1, 0, &c->eos_token_ids[0]));
    c->n_eos = 1;
    return EPIC_OK;
  }
  if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) > EPIC_CONFIG_MAX_EOS) {
    EPIC_LOG_ERROR("%s: field \"eos_token_id\" must be an integer or a list of at most %d "
                   "integers",
                   x->src, EPIC_CONFIG_MAX_EOS);
    return EPIC_ERR_INVALID;
  }
  const cJSON *e;
  cJSON_ArrayForEach(e, v) {
    if (!cJSON_IsNumber(e) || e->valuedouble != floor(e->valuedouble) ||
        fabs(e->valuedouble) > EPIC_CONFIG_INT_MAX) {
      EPIC_LOG_ERROR("%s: field \"eos_token_id\" has a non-integer element", x->src);
      return EPIC_ERR_INVALID;
    }
    c->eos_token_ids[c->n_eos++] = (int64_t)e->valuedouble;
  }
  return EPIC_OK;
}

/* Consistency checks shared by parse and override. */
static epic_status config_validate(const epic_model_config *c, const char *src) {
  /* min: 1 for sizes, 0 for counts that may be absent. bounded: sizes far beyond
   * any real model are almost certainly corruption, and bounding them keeps every
   * derived product (rows * cols) clear of int64 overflow. */
  const int64_t big = (int64_t)1 << 24;
  const struct {
    const char *name;
    int64_t v, min;
    int bounded;
  } fields[] = {
      {"vocab_size", c->vocab_size, 1, 1},
      {"hidden_size", c->hidden_size, 1, 1},
      {"intermediate_size", c->intermediate_size, 1, 1},
      {"num_hidden_layers", c->num_hidden_layers, 1, 1},
      {"num_attention_heads", c->num_attention_heads, 1, 1},
      {"kv_lora_rank", c->kv_lora_rank, 1, 1},
      {"qk_nope_head_dim", c->qk_nope_head_dim, 1, 1},
      {"qk_rope_head_dim", c->qk_rope_head_dim, 1, 1},
      {"v_head_dim", c->v_head_dim, 1, 1},
      {"moe_layer_freq", c->moe_layer_freq, 1, 0},
      {"max_position_embeddings", c->max_position_embeddings, 1, 0},
      {"q_lora_rank", c->q_lora_rank, 0, 1},
      {"n_routed_experts", c->n_routed_experts, 0, 1},
      {"n_shared_experts", c->n_shared_experts, 0, 1},
      {"first_k_dense_replace", c->first_k_dense_replace, 0, 0},
      {"num_nextn_predict_layers", c->num_nextn_predict_layers, 0, 0},
      {"num_key_value_heads", c->num_key_value_heads, 0, 0},
      {"moe_intermediate_size", c->moe_intermediate_size, INT64_MIN, 1},
  };
  for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
    if (fields[i].v < fields[i].min) {
      EPIC_LOG_ERROR("%s: field \"%s\" must be %s (got %lld)", src, fields[i].name,
                     fields[i].min > 0 ? "positive" : "non-negative", (long long)fields[i].v);
      return EPIC_ERR_INVALID;
    }
    if (fields[i].bounded && fields[i].v > big) {
      EPIC_LOG_ERROR("%s: field \"%s\" is implausibly large (%lld > %lld)", src, fields[i].name,
                     (long long)fields[i].v, (long long)big);
      return EPIC_ERR_INVALID;
    }
  }
  if (c->qk_rope_head_dim % 2 != 0) {
    EPIC_LOG_ERROR("%s: field \"qk_rope_head_dim\" must be even (got %lld)", src,
                   (long long)c->qk_rope_head_dim);
    return EPIC_ERR_INVALID;
  }
  if (c->n_routed_experts > 0) {
    if (c->moe_intermediate_size <= 0 || c->num_experts_per_tok <= 0 || c->n_group <= 0 ||
        c->topk_group <= 0) {
      EPIC_LOG_ERROR("%s: fields \"moe_intermediate_size\", \"num_experts_per_tok\", "
                     "\"n_group\" and \"topk_group\" must be positive for a MoE model",
                     src);
      return EPIC_ERR_INVALID;
    }
    if (c->n_routed_experts % c->n_group != 0) {
      EPIC_LOG_ERROR("%s: field \"n_routed_experts\" (%lld) must be a multiple of \"n_group\" "
                     "(%lld)",
                     src, (long long)c->n_routed_experts, (long long)c->n_group);
      return EPIC_ERR_INVALID;
    }
    if (c->topk_group > c->n_group) {
      EPIC_LOG_ERROR("%s: field \"topk_group\" (%lld) exceeds \"n_group\" (%lld)", src,
                     (long long)c->topk_group, (long long)c->n_group);
      return EPIC_ERR_INVALID;
    }
    const int64_t eligible = c->topk_group * (c->n_routed_experts / c->n_group);
    if (c->num_experts_per_tok > c->n_routed_experts || c->num_experts_per_tok > eligible) {
      EPIC_LOG_ERROR("%s: field \"num_experts_per_tok\" (%lld) exceeds the experts "
                     "available (%lld routed, %lld in the %lld kept groups)",
                     src, (long long)c->num_experts_per_tok, (long long)c->n_routed_experts,
                     (long long)eligible, (long long)c->topk_group);
      return EPIC_ERR_INVALID;
    }
  }
  if (strcmp(c->hidden_act, "silu") != 0) {
    EPIC_LOG_ERROR("%s: field \"hidden_act\" = \"%s\" is not supported (only \"silu\")", src,
                   c->hidden_act);
    return EPIC_ERR_INVALID;
  }
  if (strcmp(c->scoring_func, "sigmoid") != 0 && strcmp(c->scoring_func, "softmax") != 0) {
    EPIC_LOG_ERROR("%s: field \"scoring_func\" = \"%s\" is not supported (\"sigmoid\" or "
                   "\"softmax\")",
                   src, c->scoring_func);
    return EPIC_ERR_INVALID;
  }
  if (!(c->rms_norm_eps > 0.0) || !(c->rope_theta > 1.0)) {
    EPIC_LOG_ERROR("%s: fields \"rms_norm_eps\" must be > 0 and \"rope_theta\" > 1", src);
    return EPIC_ERR_INVALID;
  }
  return EPIC_OK;
}

epic_status epic_config_parse(const char *json, size_t len, const char *src,
                              epic_model_config *out) {
  cfg_ctx x = {.src = src ? src : "config.json", .prefix = ""};
  epic_model_config c;
  epic_status st = EPIC_ERR_INVALID;
  cJSON *root;

  memset(&c, 0, sizeof c);
  if (!json || !out) return EPIC_ERR_INVALID;
  root = cJSON_ParseWithLength(json, len);
  if (!root) {
    EPIC_LOG_ERROR("%s: malformed JSON", x.src);
    return EPIC_ERR_INVALID;
  }
  if (!cJSON_IsObject(root)) {
    EPIC_LOG_ERROR("%s: top level must be a JSON object", x.src);
    goto fail;
  }
  EPIC_CHECK_GOTO(
      field_str(&x, root, "model_type", "deepseek_v3", c.model_type, sizeof c.model_type), st,
      fail);
  EPIC_CHECK_GOTO(field_int(&x, root, "vocab_size", 1, 0, &c.vocab_size), st, fail);
  EPIC_CHECK_GOTO(field_int(&x, root, "hidden_size", 1, 0, &c.hidden_size), st, fail);
  EPIC_CHECK_GOTO(field_int(&x, root, "intermediate_size", 1, 0, &c.intermediate_size), st, fail);
  EPIC_CHECK_GOTO(field_int(&x, root, "moe_intermediate_size", 0, 0, &c.moe_intermediate_size), st,
                  fail);
  EPIC_CHECK_GOTO(field_int(&x, root, "num_hidden_layers", 1, 0, &c.num_hidden_layers), st, fail);
  EPIC_CHECK_GOTO(
      field_int(&x, root, "num_nextn_predict_layers", 0, 0, &c.num_nextn_predict_layers), st, fail);
  EPIC_CHECK_GOTO(field_int(&x, root, "num_attention_heads", 1, 0, &c.num_attention_heads), st,
                  fail);
  EPIC_CHECK_GOTO(
      field_int(&x, root, "num_key_value_heads", 0, c.num_attention_heads, &c.num_key_value_heads),
      st, fail);
  EPIC_CHECK_GOTO(field_int(&x, root, "q_lora_rank", 0, 0, &c.q_lora_rank), st, fail);
  EPIC_CHECK_GOTO(field_int(&x, root, "kv_lora_rank", 1, 0, &c.kv_lora_rank), st, fail);
  EPIC_CHECK_GOTO(field_int(&x, root, "qk_nope_head_dim", 1, 0, &c.qk_nope_head_dim), st, fail);
  EPIC_CHECK_GOTO(field_int(&x, root, "qk_rope_head_dim", 1, 0, &c.qk_rope_head_dim), st, fail);
  EPIC_CHECK_GOTO(field_int(&x, root, "v_head_dim", 1, 0, &c.v_head_dim), st, fail);
  EPIC_CHECK_GOTO(field_int(&x, root, "n_routed_experts", 0, 0, &c.n_routed_experts), st, fail);
  EPIC_CHECK_GOTO(field_int(&x, root, "n_shared_experts", 0, 0, &c.n_shared_experts), st, fail);
  EPIC_CHECK_GOTO(field_int(&x, root, "num_experts_per_tok", 0, 0, &c.num_experts_per_tok), st,
                  fail);
  EPIC_CHECK_GOTO(field_int(&x, root, "n_group", 0, 1, &c.n_group), st, fail);
  EPIC_CHECK_GOTO(field_int(&x, root, "topk_group", 0, 1, &c.topk_group), st, fail);
  EPIC_CHECK_GOTO(field_int(&x, root, "first_k_dense_replace", 0, 0, &c.first_k_dense_replace), st,
                  fail);
  EPIC_CHECK_GOTO(field_int(&x, root, "moe_layer_freq", 0, 1, &c.moe_layer_freq), st, fail);
  /* HF DeepseekV2 defaults: greedy top-k over softmax scores. */
  EPIC_CHECK_GOTO(field_str(&x, root, "topk_method", "greedy", c.topk_method, sizeof c.topk_method),
                  st, fail);
  EPIC_CHECK_GOTO(
      field_str(&x, root, "scoring_func", "softmax", c.scoring_func, sizeof c.scoring_func), st,
      fail);
  EPIC_CHECK_GOTO(field_str(&x, root, "hidden_act", "silu", c.hidden_act, sizeof c.hidden_act), st,
                  fail);
  EPIC_CHECK_GOTO(
      field_str(&x, root, "torch_dtype", "bfloat16", c.torch_dtype, sizeof c.torch_dtype), st,
      fail);
  EPIC_CHECK_GOTO(field_bool(&x, root, "norm_topk_prob", 0, &c.norm_topk_prob), st, fail);
  EPIC_CHECK_GOTO(field_double(&x, root, "routed_scaling_factor", 0, 1.0, &c.routed_scaling_factor),
                  st, fail);
  EPIC_CHECK_GOTO(field_double(&x, root, "rms_norm_eps", 0, 1e-6, &c.rms_norm_eps), st, fail);
  EPIC_CHECK_GOTO(field_double(&x, root, "rope_theta", 0, 10000.0, &c.rope_theta), st, fail);
  EPIC_CHECK_GOTO(parse_rope_scaling(&x, root, &c.rope_scaling), st, fail);
  EPIC_CHECK_GOTO(
      field_int(&x, root, "max_position_embeddings", 0, 4096, &c.max_position_embeddings), st,
      fail);
  EPIC_CHECK_GOTO(field_bool(&x, root, "tie_word_embeddings", 0, &c.tie_word_embeddings), st, fail);
  EPIC_CHECK_GOTO(field_bool(&x, root, "attention_bias", 0, &c.attention_bias), st, fail);
  EPIC_CHECK_GOTO(field_int(&x, root, "bos_token_id", 0, 0, &c.bos_token_id), st, fail);
  EPIC_CHECK_GOTO(parse_eos(&x, root, &c), st, fail);
  EPIC_CHECK_GOTO(parse_quant(&x, root, &c.quant), st, fail);
  EPIC_CHECK_GOTO(config_validate(&c, x.src), st, fail);
  *out = c;
  st = EPIC_OK;
fail:
  cJSON_Delete(root);
  return st;
}

epic_status epic_config_load_dir(const char *dir, epic_model_config *out) {
  char path[4096];
  FILE *f;
  char *buf = NULL;
  long sz;
  epic_status st = EPIC_ERR_IO;

  if (!dir || !out) return EPIC_ERR_INVALID;
  if (snprintf(path, sizeof path, "%s/config.json", dir) >= (int)sizeof path) {
    EPIC_LOG_ERROR("%s/config.json: path too long", dir);
    return EPIC_ERR_INVALID;
  }
  f = fopen(path, "rb");
  if (!f) {
    EPIC_LOG_ERROR("%s: cannot open: %s", path, strerror(errno));
    return EPIC_ERR_IO;
  }
  if (fseek(f, 0, SEEK_END) != 0 || (sz = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
    EPIC_LOG_ERROR("%s: cannot read: %s", path, strerror(errno));
    goto out;
  }
  if (sz > 64L * 1024 * 1024) {
    EPIC_LOG_ERROR("%s: file too large for a config (%ld bytes)", path, sz);
    st = EPIC_ERR_INVALID;
    goto out;
  }
  buf = malloc((size_t)sz + 1);
  if (!buf) {
    st = EPIC_ERR_NOMEM;
    goto out;
  }
  if (fread(buf, 1, (size_t)sz, f) != (size_t)sz) {
    EPIC_LOG_ERROR("%s: short read", path);
    goto out;
  }
  buf[sz] = '\0';
  st = epic_config_parse(buf, (size_t)sz, path, out);
out:
  free(buf);
  fclose(f);
  return st;
}

/* Largest divisor of n that is <= cap (>= 1). */
static int64_t largest_divisor_le(int64_t n, int64_t cap) {
  for (int64_t d = cap < n ? cap : n; d > 1; d--)
    if (n % d == 0) return d;
  return 1;
}

epic_status epic_config_override(epic_model_config *c, int64_t num_layers, int64_t num_experts) {
  if (!c) return EPIC_ERR_INVALID;
  if (num_layers > 0) {
    c->num_hidden_layers = num_layers;
    if (c->first_k_dense_replace > num_layers) c->first_k_dense_replace = num_layers;
  }
  if (num_experts > 0) {
    c->n_routed_experts = num_experts;
    if (c->n_group < 1) c->n_group = 1;
    c->n_group = largest_divisor_le(num_experts, c->n_group);
    if (c->topk_group > c->n_group) c->topk_group = c->n_group;
    if (c->topk_group < 1) c->topk_group = 1;
    const int64_t eligible = c->topk_group * (num_experts / c->n_group);
    if (c->num_experts_per_tok > eligible) c->num_experts_per_tok = eligible;
    if (c->num_experts_per_tok < 1) c->num_experts_per_tok = 1;
    if (c->moe_intermediate_size <= 0) c->moe_intermediate_size = c->intermediate_size;
  }
  return config_validate(c, "config override");
}

int epic_config_is_moe_layer(const epic_model_config *c, int64_t layer) {
  return c->n_routed_experts > 0 && layer >= c->first_k_dense_replace && c->moe_layer_freq > 0 &&
         layer % c->moe_layer_freq == 0;
}

int epic_config_is_eos(const epic_model_config *c, int64_t id) {
  for (int i = 0; i < c->n_eos; i++)
    if (c->eos_token_ids[i] == id) return 1;
  return 0;
}

int64_t epic_config_qk_head_dim(const epic_model_config *c) {
  return c->qk_nope_head_dim + c->qk_rope_head_dim;
}

/* HF yarn_get_mscale: 0.1 * m * ln(scale) + 1 for scale > 1, else 1. */
static double yarn_get_mscale(double scale, double m) {
  return scale <= 1.0 ? 1.0 : 0.1 * m * log(scale) + 1.0;
}

double epic_config_softmax_scale(const epic_model_config *c) {
  double scale = 1.0 / sqrt((double)epic_config_qk_head_dim(c));
  const epic_rope_scaling *r = &c->rope_scaling;
  /* HF applies mscale^2 only when mscale_all_dim is non-zero. */
  if (r->yarn && r->mscale_all_dim != 0.0) {
    double m = yarn_get_mscale(r->factor, r->mscale_all_dim);
    scale *= m * m;
  }
  return scale;
}

/* Dimension index at which `rot` full rotations happen over `max_pos` positions. */
static double yarn_correction_dim(double rot, double dim, double base, double max_pos) {
  return dim * log(max_pos / (rot * 2.0 * 3.14159265358979323846)) / (2.0 * log(base));
}

void epic_config_rope_inv_freq(const epic_model_config *c, double *inv_freq) {
  const int64_t dim = c->qk_rope_head_dim, half = dim / 2;
  const double base = c->rope_theta;
  const epic_rope_scaling *r = &c->rope_scaling;
  for (int64_t j = 0; j < half; j++)
    inv_freq[j] = pow(base, -(double)(2 * j) / (double)dim);
  if (!r->yarn) return;
  const double L0 = (double)r->original_max_position_embeddings;
  double low = floor(yarn_correction_dim(r->beta_fast, (double)dim, base, L0));
  double high = ceil(yarn_correction_dim(r->beta_slow, (double)dim, base, L0));
  if (low < 0.0) low = 0.0;
  if (high > (double)(dim - 1)) high = (double)(dim - 1);
  if (low == high) high += 0.001; /* avoid a zero-width ramp, as HF does */
  for (int64_t j = 0; j < half; j++) {
    double ramp = ((double)j - low) / (high - low);
    if (ramp < 0.0) ramp = 0.0;
    if (ramp > 1.0) ramp = 1.0;
    inv_freq[j] = inv_freq[j] * (1.0 - ramp) + (inv_freq[j] / r->factor) * ramp;
  }
}
