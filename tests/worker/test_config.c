/* epic_config: parsing, defaults, validation and the derived RoPE/YaRN constants. */
#include <cjson/cJSON.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/log.h"
#include "tests/common/test_util.h"
#include "worker/config.h"

/* The released DeepSeek-V3 config (ARCHITECTURE.md §1.1), inference fields. */
static const char *k_v3_config =
    "{\"architectures\":[\"DeepseekV3ForCausalLM\"],\"model_type\":\"deepseek_v3\","
    "\"vocab_size\":129280,\"hidden_size\":7168,\"intermediate_size\":18432,"
    "\"moe_intermediate_size\":2048,\"num_hidden_layers\":61,\"first_k_dense_replace\":3,"
    "\"moe_layer_freq\":1,\"num_attention_heads\":128,\"num_key_value_heads\":128,"
    "\"q_lora_rank\":1536,\"kv_lora_rank\":512,\"qk_nope_head_dim\":128,"
    "\"qk_rope_head_dim\":64,\"v_head_dim\":128,\"n_routed_experts\":256,"
    "\"n_shared_experts\":1,\"num_experts_per_tok\":8,\"n_group\":8,\"topk_group\":4,"
    "\"topk_method\":\"noaux_tc\",\"scoring_func\":\"sigmoid\",\"norm_topk_prob\":true,"
    "\"routed_scaling_factor\":2.5,\"hidden_act\":\"silu\",\"rms_norm_eps\":1e-6,"
    "\"rope_theta\":10000,\"rope_scaling\":{\"type\":\"yarn\",\"factor\":40,"
    "\"original_max_position_embeddings\":4096,\"beta_fast\":32,\"beta_slow\":1,"
    "\"mscale\":1.0,\"mscale_all_dim\":1.0},\"max_position_embeddings\":163840,"
    "\"attention_bias\":false,\"attention_dropout\":0.0,\"tie_word_embeddings\":false,"
    "\"bos_token_id\":0,\"eos_token_id\":1,\"num_nextn_predict_layers\":1,"
    "\"quantization_config\":{\"quant_method\":\"fp8\",\"fmt\":\"e4m3\","
    "\"activation_scheme\":\"dynamic\",\"weight_block_size\":[128,128]},\"ep_size\":1,"
    "\"torch_dtype\":\"bfloat16\",\"use_cache\":true,\"initializer_range\":0.02,"
    "\"aux_loss_alpha\":0.001,\"seq_aux\":true,\"pretraining_tp\":1,"
    "\"transformers_version\":\"4.33.1\"}";

static epic_status parse_str(const char *s, epic_model_config *c) {
  return epic_config_parse(s, strlen(s), "test-config.json", c);
}

/* Independent float64 evaluation of the YaRN formula (ARCHITECTURE §8.2). */
static void ref_inv_freq(int dim, double base, double factor, double L0, double bf, double bs,
                         double *out) {
  const double pi = 3.14159265358979323846;
  double lo = floor(dim * log(L0 / (2 * pi * bf)) / (2 * log(base)));
  double hi = ceil(dim * log(L0 / (2 * pi * bs)) / (2 * log(base)));
  lo = fmax(lo, 0);
  hi = fmin(hi, dim - 1);
  for (int j = 0; j < dim / 2; j++) {
    double f = 1.0 / pow(base, 2.0 * j / dim);
    double r = fmin(fmax((j - lo) / (hi - lo), 0.0), 1.0);
    out[j] = f / factor * r + f * (1 - r);
  }
}

static void assert_rel(double got, double want, double tol) {
  double err = fabs(got - want) / fmax(fabs(want), 1e-300);
  if (err > tol) fail_msg("got %.17g want %.17g (rel err %g)", got, want, err);
}

static void test_tiny_config(void **state) {
  (void)state;
  char dir[1024];
  epic_model_config c;
  epic_test_path(dir, sizeof dir, "tiny-bf16");
  assert_int_equal(epic_config_load_dir(dir, &c), EPIC_OK);
  assert_string_equal(c.model_type, "deepseek_v3");
  assert_int_equal(c.vocab_size, 1280);
  assert_int_equal(c.hidden_size, 256);
  assert_int_equal(c.intermediate_size, 384);
  assert_int_equal(c.moe_intermediate_size, 64);
  assert_int_equal(c.num_hidden_layers, 3);
  assert_int_equal(c.num_nextn_predict_layers, 1);
  assert_int_equal(c.num_attention_heads, 4);
  assert_int_equal(c.num_key_value_heads, 4);
  assert_int_equal(c.q_lora_rank, 192);
  assert_int_equal(c.kv_lora_rank, 64);
  assert_int_equal(c.qk_nope_head_dim, 32);
  assert_int_equal(c.qk_rope_head_dim, 16);
  assert_int_equal(c.v_head_dim, 32);
  assert_int_equal(epic_config_qk_head_dim(&c), 48);
  assert_int_equal(c.n_routed_experts, 16);
  assert_int_equal(c.n_shared_experts, 1);
  assert_int_equal(c.num_experts_per_tok, 4);
  assert_int_equal(c.n_group, 4);
  assert_int_equal(c.topk_group, 2);
  assert_int_equal(c.first_k_dense_replace, 1);
  assert_int_equal(c.moe_layer_freq, 1);
  assert_string_equal(c.topk_method, "noaux_tc");
  assert_string_equal(c.scoring_func, "sigmoid");
  assert_string_equal(c.hidden_act, "silu");
  assert_string_equal(c.torch_dtype, "bfloat16");
  assert_true(c.norm_topk_prob);
  assert_true(c.routed_scaling_factor == 2.5);
  assert_true(c.rms_norm_eps == 1e-6);
  assert_true(c.rope_theta == 10000.0);
  assert_true(c.rope_scaling.yarn);
  assert_string_equal(c.rope_scaling.type, "yarn");
  assert_true(c.rope_scaling.factor == 40.0);
  assert_int_equal(c.rope_scaling.original_max_position_embeddings, 4096);
  assert_true(c.rope_scaling.beta_fast == 32.0 && c.rope_scaling.beta_slow == 1.0);
  assert_true(c.rope_scaling.mscale == 1.0 && c.rope_scaling.mscale_all_dim == 1.0);
  assert_int_equal(c.max_position_embeddings, 163840);
  assert_false(c.tie_word_embeddings);
  assert_false(c.attention_bias);
  assert_int_equal(c.bos_token_id, 0);
  assert_int_equal(c.n_eos, 1);
  assert_int_equal(c.eos_token_ids[0], 1);
  assert_true(epic_config_is_eos(&c, 1));
  assert_false(epic_config_is_eos(&c, 0));
  assert_false(c.quant.fp8);
  assert_int_equal(c.quant.weight_block_size[0], 128);
  assert_int_equal(c.quant.weight_block_size[1], 128);
  /* Layer 0 dense, 1..2 MoE, MTP layer 3 MoE. */
  assert_false(epic_config_is_moe_layer(&c, 0));
  assert_true(epic_config_is_moe_layer(&c, 1));
  assert_true(epic_config_is_moe_layer(&c, 2));
  assert_true(epic_config_is_moe_layer(&c, 3));

  /* Derived constants: fixtures README §1, and an independent evaluation. */
  const double want_scale = 0.2704675577217602;
  assert_rel(epic_config_softmax_scale(&c), want_scale, 1e-14);
  double m = 0.1 * log(40.0) + 1.0;
  assert_rel(epic_config_softmax_scale(&c), m * m / sqrt(48.0), 1e-14);
  const double want_freq[8] = {1.0,      0.31622776601683794,   0.1,     0.023914724805023366,
                               0.005125, 0.0008498621211702518, 2.5e-05, 7.905694150420949e-06};
  double f[8], r[8];
  epic_config_rope_inv_freq(&c, f);
  ref_inv_freq(16, 10000, 40, 4096, 32, 1, r);
  for (int j = 0; j < 8; j++) {
    assert_rel(f[j], want_freq[j], 1e-12);
    assert_rel(f[j], r[j], 1e-14);
  }

  epic_test_path(dir, sizeof dir, "tiny-fp8");
  assert_int_equal(epic_config_load_dir(dir, &c), EPIC_OK);
  assert_true(c.quant.fp8);
  assert_string_equal(c.quant.quant_method, "fp8");
  assert_string_equal(c.quant.fmt, "e4m3");
  assert_string_equal(c.quant.activation_scheme, "dynamic");
  assert_int_equal(c.quant.weight_block_size[0], 128);
  assert_int_equal(c.quant.weight_block_size[1], 128);
  assert_int_equal(c.hidden_size, 256);
}

static void test_v3_config(void **state) {
  (void)state;
  epic_model_config c;
  assert_int_equal(parse_str(k_v3_config, &c), EPIC_OK);
  assert_int_equal(c.hidden_size, 7168);
  assert_int_equal(c.q_lora_rank, 1536);
  assert_int_equal(c.n_routed_experts, 256);
  assert_true(c.quant.fp8);
  assert_rel(epic_config_softmax_scale(&c), 0.1352337788608801, 1e-14);
  double f[32], r[32];
  epic_config_rope_inv_freq(&c, f);
  ref_inv_freq(64, 10000, 40, 4096, 32, 1, r);
  for (int j = 0; j < 32; j++)
    assert_rel(f[j], r[j], 1e-14);
  /* ARCHITECTURE §8.2 table (10 significant digits). */
  const struct {
    int j;
    double v;
  } tab[] = {{0, 1.0},
             {10, 5.623413252e-2},
             {11, 3.900692657e-2},
             {12, 2.687936011e-2},
             {13, 1.837814622e-2},
             {16, 5.5e-3},
             {20, 7.905694150e-4},
             {22, 1.778279410e-4},
             {23, 3.333803580e-5},
             {31, 3.333803580e-6}};
  for (size_t i = 0; i < sizeof tab / sizeof tab[0]; i++)
    assert_rel(f[tab[i].j], tab[i].v, 1e-9);
  assert_false(epic_config_is_moe_layer(&c, 2));
  assert_true(epic_config_is_moe_layer(&c, 3));
  assert_true(epic_config_is_moe_layer(&c, 60));
  assert_true(epic_config_is_moe_layer(&c, 61));

  /* Shrinking for benchmarks keeps the config valid. */
  assert_int_equal(epic_config_override(&c, 1, 8), EPIC_OK);
  assert_int_equal(c.num_hidden_layers, 1);
  assert_int_equal(c.first_k_dense_replace, 1);
  assert_int_equal(c.n_routed_experts, 8);
  assert_int_equal(c.n_group, 8);
  assert_int_equal(c.topk_group, 4);
  assert_int_equal(c.num_experts_per_tok, 4);
  assert_false(epic_config_is_moe_layer(&c, 0));
  assert_true(epic_config_is_moe_layer(&c, 1)); /* the MTP layer */
  assert_int_equal(parse_str(k_v3_config, &c), EPIC_OK);
  assert_int_equal(epic_config_override(&c, 0, 12), EPIC_OK); /* 12 % 8 != 0 -> 6 groups of 2 */
  assert_int_equal(c.num_hidden_layers, 61);
  assert_int_equal(c.n_group, 6);
  assert_int_equal(c.topk_group, 4);
  assert_int_equal(c.num_experts_per_tok, 8);
}

/* k_v3_config with one top-level field replaced (value is raw JSON, NULL deletes). */
static char *v3_with(const char *key, const char *value) {
  cJSON *root = cJSON_Parse(k_v3_config);
  assert_non_null(root);
  cJSON_DeleteItemFromObjectCaseSensitive(root, key);
  if (value) {
    cJSON *v = cJSON_Parse(value);
    assert_non_null(v);
    cJSON_AddItemToObject(root, key, v);
  }
  char *s = cJSON_PrintUnformatted(root);
  cJSON_Delete(root);
  assert_non_null(s);
  return s;
}

static epic_status parse_with(const char *key, const char *value, epic_model_config *c) {
  char *s = v3_with(key, value);
  epic_status st = parse_str(s, c);
  free(s);
  return st;
}

static void test_defaults(void **state) {
  (void)state;
  epic_model_config c;
  assert_int_equal(parse_with("q_lora_rank", "null", &c), EPIC_OK);
  assert_int_equal(c.q_lora_rank, 0);
  assert_int_equal(parse_with("q_lora_rank", NULL, &c), EPIC_OK);
  assert_int_equal(c.q_lora_rank, 0);
  assert_int_equal(parse_with("eos_token_id", "[1, 128805, 7]", &c), EPIC_OK);
  assert_int_equal(c.n_eos, 3);
  assert_true(epic_config_is_eos(&c, 128805));
  assert_true(epic_config_is_eos(&c, 7));
  assert_false(epic_config_is_eos(&c, 2));
  assert_int_equal(parse_with("eos_token_id", NULL, &c), EPIC_OK);
  assert_int_equal(c.n_eos, 0);
  assert_int_equal(parse_with("quantization_config", NULL, &c), EPIC_OK);
  assert_false(c.quant.fp8);
  assert_int_equal(c.quant.weight_block_size[0], 128);
  assert_int_equal(parse_with("quantization_config", "{\"quant_method\":\"fp8\"}", &c), EPIC_OK);
  assert_true(c.quant.fp8);
  assert_int_equal(c.quant.weight_block_size[1], 128);
  assert_int_equal(parse_with("quantization_config",
                              "{\"quant_method\":\"fp8\",\"weight_block_size\":[64,32],"
                              "\"scale_fmt\":\"ue8m0\"}",
                              &c),
                   EPIC_OK);
  assert_int_equal(c.quant.weight_block_size[0], 64);
  assert_int_equal(c.quant.weight_block_size[1], 32);
  assert_string_equal(c.quant.scale_fmt, "ue8m0");

  /* No rope_scaling: plain RoPE, scale = qk_head_dim^-0.5. */
  assert_int_equal(parse_with("rope_scaling", "null", &c), EPIC_OK);
  assert_false(c.rope_scaling.yarn);
  assert_true(c.rope_scaling.factor == 1.0);
  assert_rel(epic_config_softmax_scale(&c), 0.07216878364870322, 1e-14);
  double f[32];
  epic_config_rope_inv_freq(&c, f);
  for (int j = 0; j < 32; j++)
    assert_rel(f[j], pow(10000.0, -2.0 * j / 64), 1e-14);
  assert_int_equal(parse_with("rope_scaling", NULL, &c), EPIC_OK);
  assert_false(c.rope_scaling.yarn);

  /* "rope_type" spelling; absent mscale_all_dim -> 0 -> no softmax mscale. */
  assert_int_equal(parse_with("rope_scaling",
                              "{\"rope_type\":\"yarn\",\"factor\":40,"
                              "\"original_max_position_embeddings\":4096}",
                              &c),
                   EPIC_OK);
  assert_true(c.rope_scaling.yarn);
  assert_true(c.rope_scaling.beta_fast == 32.0 && c.rope_scaling.beta_slow == 1.0);
  assert_true(c.rope_scaling.mscale == 1.0 && c.rope_scaling.mscale_all_dim == 0.0);
  assert_rel(epic_config_softmax_scale(&c), 0.07216878364870322, 1e-14);
  double r[32];
  epic_config_rope_inv_freq(&c, f);
  ref_inv_freq(64, 10000, 40, 4096, 32, 1, r);
  for (int j = 0; j < 32; j++)
    assert_rel(f[j], r[j], 1e-14);

  /* Grouping absent -> one group. */
  char *s = v3_with("n_group", NULL);
  cJSON *root = cJSON_Parse(s);
  free(s);
  cJSON_DeleteItemFromObjectCaseSensitive(root, "topk_group");
  s = cJSON_PrintUnformatted(root);
  cJSON_Delete(root);
  assert_int_equal(parse_str(s, &c), EPIC_OK);
  free(s);
  assert_int_equal(c.n_group, 1);
  assert_int_equal(c.topk_group, 1);

  /* HF defaults for the router strings. */
  assert_int_equal(parse_with("topk_method", NULL, &c), EPIC_OK);
  assert_string_equal(c.topk_method, "greedy");
  assert_int_equal(parse_with("scoring_func", NULL, &c), EPIC_OK);
  assert_string_equal(c.scoring_func, "softmax");
  assert_int_equal(parse_with("scoring_func", "\"softmax\"", &c), EPIC_OK);
}

static void test_errors(void **state) {
  (void)state;
  epic_model_config c;
  static const struct {
    const char *key, *value;
  } bad[] = {
      {"hidden_size", "\"7168\""},
      {"hidden_size", "0"},
      {"hidden_size", "-7168"},
      {"hidden_size", "7168.5"},
      {"hidden_size", "1e30"},
      {"hidden_size", NULL},
      {"vocab_size", "true"},
      {"num_hidden_layers", "0"},
      {"kv_lora_rank", "[512]"},
      {"q_lora_rank", "-1"},
      {"n_routed_experts", "255"},
      {"topk_group", "9"},
      {"num_experts_per_tok", "257"},
      {"num_experts_per_tok", "129"},
      {"qk_rope_head_dim", "63"},
      {"hidden_act", "\"gelu\""},
      {"hidden_act", "7"},
      {"scoring_func", "\"relu\""},
      {"quantization_config", "{\"quant_method\":\"awq\"}"},
      {"quantization_config", "{\"quant_method\":\"fp8\",\"weight_block_size\":[128]}"},
      {"quantization_config", "{\"quant_method\":\"fp8\",\"weight_block_size\":[0,128]}"},
      {"quantization_config", "{\"quant_method\":\"fp8\",\"fmt\":\"e5m2\"}"},
      {"quantization_config", "[]"},
      {"rope_scaling", "{\"type\":\"linear\",\"factor\":2}"},
      {"rope_scaling", "{\"type\":\"yarn\",\"factor\":40}"},
      {"rope_scaling", "{\"type\":\"yarn\",\"factor\":\"40\","
                       "\"original_max_position_embeddings\":4096}"},
      {"rope_scaling", "{\"type\":\"yarn\",\"factor\":-1,"
                       "\"original_max_position_embeddings\":4096}"},
      {"rope_scaling", "7"},
      {"eos_token_id", "\"1\""},
      {"eos_token_id", "[1, \"2\"]"},
      {"eos_token_id", "[1,2,3,4,5,6,7,8,9]"},
      {"norm_topk_prob", "\"yes\""},
      {"rms_norm_eps", "0"},
      {"moe_layer_freq", "0"},
      {"topk_method", "\"" /* 40 chars: longer than the field */
                      "0123456789012345678901234567890123456789\""},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    epic_status st = parse_with(bad[i].key, bad[i].value, &c);
    if (st != EPIC_ERR_INVALID)
      fail_msg("case %zu (%s = %s) returned %d", i, bad[i].key,
               bad[i].value ? bad[i].value : "(absent)", st);
  }
  assert_int_equal(parse_str("{", &c), EPIC_ERR_INVALID);
  assert_int_equal(parse_str("", &c), EPIC_ERR_INVALID);
  assert_int_equal(parse_str("[]", &c), EPIC_ERR_INVALID);
  assert_int_equal(parse_str("{\"hidden_size\": 7168,}", &c), EPIC_ERR_INVALID);
  /* Length bound respected: the valid config cut short is malformed. */
  assert_int_equal(epic_config_parse(k_v3_config, strlen(k_v3_config) - 1, "cut", &c),
                   EPIC_ERR_INVALID);
  assert_int_equal(epic_config_load_dir("/nonexistent-epic-dir", &c), EPIC_ERR_IO);
}

int main(void) {
  epic_log_init(EPIC_LOG_LEVEL_ERROR, -1);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_tiny_config),
      cmocka_unit_test(test_v3_config),
      cmocka_unit_test(test_defaults),
      cmocka_unit_test(test_errors),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
