/* DeepSeek-V3 model configuration (Hugging Face config.json), parsed and validated.
 * Every field of the released V3/R1 config is represented; nothing model-size
 * specific is hard-coded anywhere else in EPIC: all shapes derive from here.
 * Thread-safe: plain data and pure functions. */
#ifndef EPIC_WORKER_CONFIG_H
#define EPIC_WORKER_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include "../common/status.h"

#define EPIC_CONFIG_MAX_EOS 8

typedef struct epic_rope_scaling {
  int yarn;                 /* 1 if rope_scaling.type (or rope_type) == "yarn", 0 if absent/null */
  char type[32];            /* as written ("yarn", "linear", ...); "" when absent */
  double factor;            /* 1 when absent */
  int64_t original_max_position_embeddings;
  double beta_fast, beta_slow; /* defaults 32, 1 */
  double mscale, mscale_all_dim; /* defaults 1, 0 (HF semantics: 0 -> no softmax mscale) */
} epic_rope_scaling;

typedef struct epic_quant_config {
  int fp8;                  /* quant_method == "fp8" */
  char quant_method[32], fmt[16], activation_scheme[16], scale_fmt[16];
  int64_t weight_block_size[2]; /* [128, 128] by default */
} epic_quant_config;

typedef struct epic_model_config {
  char model_type[64];
  int64_t vocab_size, hidden_size, intermediate_size, moe_intermediate_size;
  int64_t num_hidden_layers, num_nextn_predict_layers;
  int64_t num_attention_heads, num_key_value_heads;
  int64_t q_lora_rank;      /* 0 when null/absent: queries use q_proj directly */
  int64_t kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim;
  int64_t n_routed_experts, n_shared_experts, num_experts_per_tok;
  int64_t n_group, topk_group;   /* 1 / 1 when absent */
  int64_t first_k_dense_replace, moe_layer_freq;
  char topk_method[32], scoring_func[32], hidden_act[32], torch_dtype[32];
  int norm_topk_prob;
  double routed_scaling_factor;
  double rms_norm_eps, rope_theta;
  epic_rope_scaling rope_scaling;
  int64_t max_position_embeddings;
  int tie_word_embeddings, attention_bias;
  int64_t bos_token_id;
  int64_t eos_token_ids[EPIC_CONFIG_MAX_EOS]; /* eos_token_id may be an int or a list */
  int n_eos;
  epic_quant_config quant;  /* quant.fp8 == 0 when quantization_config is absent */
} epic_model_config;

/* Parse config.json text. `src` names the file in error messages. Logs one
 * EPIC_LOG_ERROR line naming the file and field on failure and returns
 * EPIC_ERR_INVALID (malformed JSON, wrong type, missing required field,
 * inconsistent values). */
epic_status epic_config_parse(const char *json, size_t len, const char *src,
                              epic_model_config *out);
/* Read and parse DIR/config.json (EPIC_ERR_IO if unreadable). */
epic_status epic_config_load_dir(const char *dir, epic_model_config *out);

/* Shrink a config for synthetic benchmarks (--num-layers / --num-experts);
 * a value <= 0 leaves the field alone. Keeps the config valid: n_group, topk_group,
 * top_k and first_k_dense_replace are clamped to what the new sizes allow. */
epic_status epic_config_override(epic_model_config *c, int64_t num_layers,
                                 int64_t num_experts);

/* Derived quantities. */
int epic_config_is_moe_layer(const epic_model_config *c, int64_t layer); /* layer may be the MTP index */
int epic_config_is_eos(const epic_model_config *c, int64_t id);
int64_t epic_config_qk_head_dim(const epic_model_config *c); /* nope + rope */
/* Softmax scale: qk_head_dim^-0.5 * mscale(factor, mscale_all_dim)^2 under YaRN. */
double epic_config_softmax_scale(const epic_model_config *c);
/* RoPE inverse frequencies, qk_rope_head_dim/2 values (YaRN blend when enabled). */
void epic_config_rope_inv_freq(const epic_model_config *c, double *inv_freq);

#endif
