/* epic_checkpoint: tiny fixture checkpoints (BF16 and FP8), error handling on
 * damaged copies of them, and the synthetic dummy checkpoint. */
#define _GNU_SOURCE
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/log.h"
#include "tests/common/test_util.h"
#include "worker/checkpoint.h"

#define SHARD1 "model-00001-of-00002.safetensors"
#define SHARD2 "model-00002-of-00002.safetensors"
#define INDEX "model.safetensors.index.json"

/* ----------------------------------------------------------------- helpers */

static void write_file(const char *dir, const char *name, const void *data, size_t len) {
  char path[2048];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE *f = fopen(path, "wb");
  assert_non_null(f);
  assert_int_equal(fwrite(data, 1, len, f), len);
  assert_int_equal(fclose(f), 0);
}

/* fixtures/<src_dir>/<name> -> dir/<name>, optionally cut to `keep` bytes. */
static void copy_fixture(const char *dir, const char *src_dir, const char *name, size_t keep) {
  char rel[512], path[2048];
  size_t len;
  snprintf(rel, sizeof rel, "%s/%s", src_dir, name);
  char *buf = epic_test_read_file(epic_test_path(path, sizeof path, rel), &len);
  assert_non_null(buf);
  write_file(dir, name, buf, keep && keep < len ? keep : len);
  free(buf);
}

static char *fixture_text(const char *src_dir, const char *name, size_t *len) {
  char rel[512], path[2048];
  snprintf(rel, sizeof rel, "%s/%s", src_dir, name);
  char *buf = epic_test_read_file(epic_test_path(path, sizeof path, rel), len);
  assert_non_null(buf);
  return buf;
}

static void rm_rf(const char *dir) {
  char cmd[2200];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  assert_int_equal(system(cmd), 0);
}

/* A fresh temp dir holding a complete copy of tiny-bf16 (config, index, shards). */
static char *tiny_copy(void) {
  char *dir = strdup("/tmp/epic-ckpt-XXXXXX");
  assert_non_null(dir);
  assert_non_null(mkdtemp(dir));
  copy_fixture(dir, "tiny-bf16", "config.json", 0);
  copy_fixture(dir, "tiny-bf16", INDEX, 0);
  copy_fixture(dir, "tiny-bf16", SHARD1, 0);
  copy_fixture(dir, "tiny-bf16", SHARD2, 0);
  return dir;
}

static void fixture_dir(char *buf, size_t n, const char *name) { epic_test_path(buf, n, name); }

typedef struct wspec {
  const char *name;
  int64_t rows, cols;
} wspec;

/* Every linear weight kind of the tiny model (layer 0 dense, 1..2 MoE, 3 MTP). */
static const wspec k_weights[] = {
    {"model.embed_tokens.weight", 1280, 256},
    {"lm_head.weight", 1280, 256},
    {"model.layers.0.self_attn.q_a_proj.weight", 192, 256},
    {"model.layers.0.self_attn.q_b_proj.weight", 192, 192},
    {"model.layers.0.self_attn.kv_a_proj_with_mqa.weight", 80, 256},
    {"model.layers.0.self_attn.kv_b_proj.weight", 256, 64},
    {"model.layers.0.self_attn.o_proj.weight", 256, 128},
    {"model.layers.0.mlp.gate_proj.weight", 384, 256},
    {"model.layers.0.mlp.up_proj.weight", 384, 256},
    {"model.layers.0.mlp.down_proj.weight", 256, 384},
    {"model.layers.2.self_attn.q_b_proj.weight", 192, 192},
    {"model.layers.2.mlp.gate.weight", 16, 256},
    {"model.layers.2.mlp.experts.0.gate_proj.weight", 64, 256},
    {"model.layers.2.mlp.experts.15.up_proj.weight", 64, 256},
    {"model.layers.2.mlp.experts.7.down_proj.weight", 256, 64},
    {"model.layers.1.mlp.shared_experts.gate_proj.weight", 64, 256},
    {"model.layers.1.mlp.shared_experts.down_proj.weight", 256, 64},
    {"model.layers.3.eh_proj.weight", 256, 512},
    {"model.layers.3.embed_tokens.weight", 1280, 256},
    {"model.layers.3.shared_head.head.weight", 1280, 256},
    {"model.layers.3.self_attn.kv_a_proj_with_mqa.weight", 80, 256},
    {"model.layers.3.mlp.experts.3.down_proj.weight", 256, 64},
};

static int bf16_in_fp8_checkpoint(const char *name) {
  static const char *s[] = {"embed_tokens.weight", "lm_head.weight", "mlp.gate.weight",
                            "eh_proj.weight", "head.weight"};
  for (size_t i = 0; i < sizeof s / sizeof s[0]; i++) {
    size_t n = strlen(name), m = strlen(s[i]);
    if (n >= m && strcmp(name + n - m, s[i]) == 0) return 1;
  }
  return 0;
}

/* ------------------------------------------------------------ fixture reads */

static void test_tiny_bf16(void **state) {
  (void)state;
  char dir[1024];
  epic_checkpoint *ck = NULL;
  fixture_dir(dir, sizeof dir, "tiny-bf16");
  assert_int_equal(epic_checkpoint_open(dir, &ck), EPIC_OK);
  assert_int_equal(epic_checkpoint_config(ck)->hidden_size, 256);
  assert_true(epic_checkpoint_bytes(ck) > 9765056);
  for (size_t i = 0; i < sizeof k_weights / sizeof k_weights[0]; i++) {
    epic_weight w;
    const wspec *s = &k_weights[i];
    assert_int_equal(epic_checkpoint_weight(ck, s->name, s->rows, s->cols, &w), EPIC_OK);
    assert_int_equal(w.dtype, EPIC_DT_BF16);
    assert_int_equal(w.rows, s->rows);
    assert_int_equal(w.cols, s->cols);
    assert_null(w.scale_inv);
    const epic_tensor_info *t = epic_checkpoint_find(ck, s->name);
    assert_non_null(t);
    assert_ptr_equal(t->data, w.data);
    assert_int_equal(t->nbytes, (size_t)(s->rows * s->cols * 2));
  }
  /* The MTP copy of the embedding is bit-identical. */
  const epic_tensor_info *a = epic_checkpoint_find(ck, "model.embed_tokens.weight");
  const epic_tensor_info *b = epic_checkpoint_find(ck, "model.layers.3.embed_tokens.weight");
  assert_memory_equal(a->data, b->data, a->nbytes);
  /* Layer 2 straddles the two shards. */
  int in1 = 0, in2 = 0;
  static const char *l2[] = {"model.layers.2.input_layernorm.weight",
                             "model.layers.2.post_attention_layernorm.weight",
                             "model.layers.2.self_attn.q_a_proj.weight",
                             "model.layers.2.mlp.experts.15.down_proj.weight",
                             "model.layers.2.mlp.experts.0.gate_proj.weight",
                             "model.layers.2.mlp.gate.e_score_correction_bias"};
  for (size_t i = 0; i < sizeof l2 / sizeof l2[0]; i++) {
    const epic_tensor_info *t = epic_checkpoint_find(ck, l2[i]);
    assert_non_null(t);
    in1 += strcmp(t->file, SHARD1) == 0;
    in2 += strcmp(t->file, SHARD2) == 0;
  }
  assert_true(in1 + in2 == (int)(sizeof l2 / sizeof l2[0]));

  float v[1280];
  assert_int_equal(epic_checkpoint_vector(ck, "model.norm.weight", 256, v), EPIC_OK);
  assert_int_equal(epic_checkpoint_vector(ck, "model.layers.0.input_layernorm.weight", 256, v),
                   EPIC_OK);
  assert_int_equal(
      epic_checkpoint_vector(ck, "model.layers.1.self_attn.q_a_layernorm.weight", 192, v), EPIC_OK);
  assert_int_equal(
      epic_checkpoint_vector(ck, "model.layers.1.self_attn.kv_a_layernorm.weight", 64, v), EPIC_OK);
  assert_int_equal(epic_checkpoint_vector(ck, "model.layers.3.enorm.weight", 256, v), EPIC_OK);
  const epic_tensor_info *bias =
      epic_checkpoint_find(ck, "model.layers.1.mlp.gate.e_score_correction_bias");
  assert_non_null(bias);
  assert_int_equal(bias->dtype, EPIC_DT_F32);
  assert_int_equal(
      epic_checkpoint_vector(ck, "model.layers.1.mlp.gate.e_score_correction_bias", 16, v),
      EPIC_OK);
  int nonzero = 0;
  for (int i = 0; i < 16; i++) {
    float f;
    memcpy(&f, (const uint8_t *)bias->data + 4 * i, 4);
    assert_true(f == v[i]);
    nonzero += v[i] != 0.0f;
  }
  assert_true(nonzero > 0);
  /* A BF16 vector converted: compare with the raw bits. */
  const epic_tensor_info *nw = epic_checkpoint_find(ck, "model.norm.weight");
  assert_int_equal(epic_checkpoint_vector(ck, "model.norm.weight", 256, v), EPIC_OK);
  for (int i = 0; i < 256; i++) {
    uint16_t u;
    memcpy(&u, (const uint8_t *)nw->data + 2 * i, 2);
    assert_true(epic_bf16_to_f32(u) == v[i]);
  }
  epic_checkpoint_close(ck);
}

static void test_tiny_fp8(void **state) {
  (void)state;
  char dir8[1024], dir16[1024];
  epic_checkpoint *c8 = NULL, *c16 = NULL;
  fixture_dir(dir8, sizeof dir8, "tiny-fp8");
  fixture_dir(dir16, sizeof dir16, "tiny-bf16");
  assert_int_equal(epic_checkpoint_open(dir8, &c8), EPIC_OK);
  assert_int_equal(epic_checkpoint_open(dir16, &c16), EPIC_OK);
  assert_true(epic_checkpoint_config(c8)->quant.fp8);
  for (size_t i = 0; i < sizeof k_weights / sizeof k_weights[0]; i++) {
    const wspec *s = &k_weights[i];
    epic_weight w8, w16;
    assert_int_equal(epic_checkpoint_weight(c8, s->name, s->rows, s->cols, &w8), EPIC_OK);
    assert_int_equal(epic_checkpoint_weight(c16, s->name, s->rows, s->cols, &w16), EPIC_OK);
    float *a = malloc((size_t)(s->rows * s->cols) * sizeof(float));
    float *b = malloc((size_t)(s->rows * s->cols) * sizeof(float));
    assert_non_null(a);
    assert_non_null(b);
    epic_weight_rows_f32(&w8, 0, s->rows, a);
    epic_weight_rows_f32(&w16, 0, s->rows, b);
    if (bf16_in_fp8_checkpoint(s->name)) {
      assert_int_equal(w8.dtype, EPIC_DT_BF16);
      assert_memory_equal(a, b, (size_t)(s->rows * s->cols) * sizeof(float));
    } else {
      assert_int_equal(w8.dtype, EPIC_DT_F8E4M3);
      assert_non_null(w8.scale_inv);
      assert_int_equal(w8.block_rows, 128);
      assert_int_equal(w8.block_cols, 128);
      char sname[256];
      snprintf(sname, sizeof sname, "%s_scale_inv", s->name);
      const epic_tensor_info *st = epic_checkpoint_find(c8, sname);
      assert_non_null(st);
      assert_int_equal(st->ndim, 2);
      assert_int_equal(st->shape[0], (s->rows + 127) / 128);
      assert_int_equal(st->shape[1], (s->cols + 127) / 128);
      const int64_t nbc = st->shape[1];
      double worst = 0;
      for (int64_t r = 0; r < s->rows; r++) {
        for (int64_t c = 0; c < s->cols; c++) {
          const float scale = w8.scale_inv[(r / 128) * nbc + c / 128];
          const double got = a[r * s->cols + c], want = b[r * s->cols + c];
          /* 3 mantissa bits: half-ulp relative 1/16; subnormals absolute scale*2^-10. */
          const double bound = fabs(want) / 16.0 + scale * 0x1p-10 + 1e-30;
          const double err = fabs(got - want);
          if (err > bound)
            fail_msg("%s[%lld][%lld]: fp8 %g vs bf16 %g", s->name, (long long)r, (long long)c, got,
                     want);
          if (fabs(want) > scale) worst = fmax(worst, err / fabs(want));
        }
      }
      assert_true(worst < 1.0 / 16);
    }
    free(a);
    free(b);
  }
  /* The partial row block of kv_a_proj_with_mqa (rows 0..79 in one block of 128). */
  epic_weight w;
  assert_int_equal(
      epic_checkpoint_weight(c8, "model.layers.1.self_attn.kv_a_proj_with_mqa.weight", 80, 256, &w),
      EPIC_OK);
  assert_int_equal(w.dtype, EPIC_DT_F8E4M3);
  /* Wrong block interpretation fails cleanly: FP8 vector request. */
  float v[256];
  assert_int_equal(
      epic_checkpoint_vector(c8, "model.layers.1.self_attn.kv_a_proj_with_mqa.weight", 256, v),
      EPIC_ERR_INVALID);
  /* Requesting an FP8 weight marks its scale as used too. */
  size_t total8 = 383;
  size_t unused = epic_checkpoint_report_unused(c8);
  size_t requested_fp8 = 0, requested_bf16 = 0;
  for (size_t i = 0; i < sizeof k_weights / sizeof k_weights[0]; i++)
    *(bf16_in_fp8_checkpoint(k_weights[i].name) ? &requested_bf16 : &requested_fp8) += 1;
  /* kv_a_proj of layer 1 (FP8, +scale) was requested in addition. */
  assert_int_equal(unused, total8 - requested_bf16 - 2 * (requested_fp8 + 1));
  epic_checkpoint_close(c8);
  epic_checkpoint_close(c16);
}

static void test_unused_report(void **state) {
  (void)state;
  char dir[1024];
  epic_checkpoint *ck = NULL;
  epic_weight w;
  float v[256];
  fixture_dir(dir, sizeof dir, "tiny-bf16");
  assert_int_equal(epic_checkpoint_open(dir, &ck), EPIC_OK);
  assert_int_equal(epic_checkpoint_report_unused(ck), 207);
  assert_int_equal(epic_checkpoint_weight(ck, "lm_head.weight", 1280, 256, &w), EPIC_OK);
  assert_int_equal(epic_checkpoint_weight(ck, "lm_head.weight", 1280, 256, &w), EPIC_OK);
  assert_int_equal(epic_checkpoint_vector(ck, "model.norm.weight", 256, v), EPIC_OK);
  /* Failed requests do not count as uses. */
  assert_int_equal(epic_checkpoint_weight(ck, "model.embed_tokens.weight", 256, 1280, &w),
                   EPIC_ERR_INVALID);
  assert_int_equal(epic_checkpoint_report_unused(ck), 205);
  epic_checkpoint_close(ck);
  epic_checkpoint_close(NULL);
}

/* ------------------------------------------------------------- error cases */

static void test_request_errors(void **state) {
  (void)state;
  char dir[1024];
  epic_checkpoint *ck = NULL;
  epic_weight w;
  float v[1024];
  fixture_dir(dir, sizeof dir, "tiny-bf16");
  assert_int_equal(epic_checkpoint_open(dir, &ck), EPIC_OK);
  /* Missing tensor (e.g. a layer the checkpoint does not have). */
  assert_int_equal(
      epic_checkpoint_weight(ck, "model.layers.4.self_attn.q_a_proj.weight", 192, 256, &w),
      EPIC_ERR_INVALID);
  assert_int_equal(epic_checkpoint_vector(ck, "model.layers.9.input_layernorm.weight", 256, v),
                   EPIC_ERR_INVALID);
  assert_null(epic_checkpoint_find(ck, "model.layers.4.self_attn.q_a_proj.weight"));
  /* Wrong shapes. */
  assert_int_equal(
      epic_checkpoint_weight(ck, "model.layers.0.self_attn.q_a_proj.weight", 256, 192, &w),
      EPIC_ERR_INVALID);
  assert_int_equal(
      epic_checkpoint_weight(ck, "model.layers.0.self_attn.q_a_proj.weight", 192, 255, &w),
      EPIC_ERR_INVALID);
  assert_int_equal(epic_checkpoint_vector(ck, "model.norm.weight", 255, v), EPIC_ERR_INVALID);
  /* 1-D as 2-D and the other way round. */
  assert_int_equal(epic_checkpoint_weight(ck, "model.norm.weight", 256, 1, &w), EPIC_ERR_INVALID);
  assert_int_equal(epic_checkpoint_weight(ck, "model.norm.weight", 1, 256, &w), EPIC_ERR_INVALID);
  assert_int_equal(
      epic_checkpoint_vector(ck, "model.layers.0.self_attn.q_a_proj.weight", 192 * 256, v),
      EPIC_ERR_INVALID);
  epic_checkpoint_close(ck);
}

/* A single-file checkpoint with odd dtypes, written by hand. */
static void append_tensor(char *hdr, size_t cap, size_t *off, const char *name, const char *dtype,
                          const char *shape, size_t nbytes) {
  size_t n = strlen(hdr);
  snprintf(hdr + n, cap - n, "%s\"%s\":{\"dtype\":\"%s\",\"shape\":%s,\"data_offsets\":[%zu,%zu]}",
           n > 1 ? "," : "", name, dtype, shape, *off, *off + nbytes);
  *off += nbytes;
}

static void test_dtype_errors(void **state) {
  (void)state;
  char *dir = strdup("/tmp/epic-ckpt-XXXXXX");
  assert_non_null(mkdtemp(dir));
  copy_fixture(dir, "tiny-bf16", "config.json", 0);
  char hdr[4096] = "{";
  size_t off = 0;
  append_tensor(hdr, sizeof hdr, &off, "w_i32.weight", "I32", "[2,2]", 16);
  append_tensor(hdr, sizeof hdr, &off, "w_bf16.weight", "BF16", "[2,4]", 16);
  append_tensor(hdr, sizeof hdr, &off, "w_f16.weight", "F16", "[2,4]", 16);
  append_tensor(hdr, sizeof hdr, &off, "w_f32.weight", "F32", "[2,2]", 16);
  append_tensor(hdr, sizeof hdr, &off, "v_f32", "F32", "[4]", 16);
  append_tensor(hdr, sizeof hdr, &off, "v_i64", "I64", "[2]", 16);
  append_tensor(hdr, sizeof hdr, &off, "noscale.weight", "F8_E4M3", "[4,4]", 16);
  append_tensor(hdr, sizeof hdr, &off, "badscale.weight", "F8_E4M3", "[4,4]", 16);
  append_tensor(hdr, sizeof hdr, &off, "badscale.weight_scale_inv", "F32", "[2,1]", 8);
  append_tensor(hdr, sizeof hdr, &off, "i32scale.weight", "F8_E4M3", "[4,4]", 16);
  append_tensor(hdr, sizeof hdr, &off, "i32scale.weight_scale_inv", "I32", "[1,1]", 4);
  append_tensor(hdr, sizeof hdr, &off, "good.weight", "F8_E4M3", "[4,4]", 16);
  append_tensor(hdr, sizeof hdr, &off, "good.weight_scale_inv", "F32", "[1,1]", 4);
  append_tensor(hdr, sizeof hdr, &off, "fp4.weight", "F4_E2M1", "[2,2]", 4);
  size_t n = strlen(hdr);
  snprintf(hdr + n, sizeof hdr - n, ",\"__metadata__\":{\"format\":\"pt\"}}");
  n = strlen(hdr);
  while (n % 8)
    hdr[n++] = ' ';
  hdr[n] = 0;
  size_t total = 8 + n + off;
  uint8_t *file = calloc(1, total);
  for (int i = 0; i < 8; i++)
    file[i] = (uint8_t)((uint64_t)n >> (8 * i));
  memcpy(file + 8, hdr, n);
  float one = 2.0f;
  for (size_t i = 8 + n; i < total; i++)
    file[i] = 0x38;                  /* fp8 1.0, harmless elsewhere */
  memcpy(file + total - 8, &one, 4); /* good.weight_scale_inv */
  write_file(dir, "model.safetensors", file, total);
  free(file);

  epic_checkpoint *ck = NULL;
  epic_weight w;
  float v[16];
  assert_int_equal(epic_checkpoint_open(dir, &ck), EPIC_OK);
  assert_int_equal(epic_checkpoint_weight(ck, "w_i32.weight", 2, 2, &w), EPIC_ERR_INVALID);
  assert_int_equal(epic_checkpoint_weight(ck, "fp4.weight", 2, 2, &w), EPIC_ERR_INVALID);
  assert_non_null(epic_checkpoint_find(ck, "fp4.weight")); /* listed, not usable */
  assert_int_equal(epic_checkpoint_find(ck, "fp4.weight")->dtype, EPIC_DT_OTHER);
  assert_int_equal(epic_checkpoint_vector(ck, "v_i64", 2, v), EPIC_ERR_INVALID);
  assert_int_equal(epic_checkpoint_weight(ck, "noscale.weight", 4, 4, &w), EPIC_ERR_INVALID);
  assert_int_equal(epic_checkpoint_weight(ck, "badscale.weight", 4, 4, &w), EPIC_ERR_INVALID);
  assert_int_equal(epic_checkpoint_weight(ck, "i32scale.weight", 4, 4, &w), EPIC_ERR_INVALID);
  assert_int_equal(epic_checkpoint_weight(ck, "w_bf16.weight", 2, 4, &w), EPIC_OK);
  assert_int_equal(w.dtype, EPIC_DT_BF16);
  assert_int_equal(epic_checkpoint_weight(ck, "w_f16.weight", 2, 4, &w), EPIC_OK);
  assert_int_equal(w.dtype, EPIC_DT_F16);
  assert_int_equal(epic_checkpoint_weight(ck, "w_f32.weight", 2, 2, &w), EPIC_OK);
  assert_int_equal(w.dtype, EPIC_DT_F32);
  assert_int_equal(epic_checkpoint_vector(ck, "v_f32", 4, v), EPIC_OK);
  assert_int_equal(epic_checkpoint_weight(ck, "good.weight", 4, 4, &w), EPIC_OK);
  assert_int_equal(w.dtype, EPIC_DT_F8E4M3);
  float rows[16];
  epic_weight_rows_f32(&w, 0, 4, rows);
  for (int i = 0; i < 16; i++)
    assert_true(rows[i] == 2.0f);
  epic_checkpoint_close(ck);
  rm_rf(dir);
  free(dir);
}

static void test_open_errors(void **state) {
  (void)state;
  epic_checkpoint *ck = NULL;
  char *dir;
  size_t len;

  /* Sanity: the untouched copy opens. */
  dir = tiny_copy();
  assert_int_equal(epic_checkpoint_open(dir, &ck), EPIC_OK);
  epic_checkpoint_close(ck);
  ck = NULL;

  /* Truncated shard (file shorter than its header says). */
  copy_fixture(dir, "tiny-bf16", SHARD2, 4000000);
  assert_true(epic_checkpoint_open(dir, &ck) < 0);
  assert_null(ck);
  /* Truncated inside the header. */
  copy_fixture(dir, "tiny-bf16", SHARD2, 100);
  assert_true(epic_checkpoint_open(dir, &ck) < 0);
  copy_fixture(dir, "tiny-bf16", SHARD2, 5);
  assert_true(epic_checkpoint_open(dir, &ck) < 0);
  copy_fixture(dir, "tiny-bf16", SHARD2, 0);

  /* Header length pointing past the end of the file. */
  {
    char *buf = fixture_text("tiny-bf16", SHARD1, &len);
    uint64_t big = (uint64_t)len;
    for (int i = 0; i < 8; i++)
      buf[i] = (char)(big >> (8 * i));
    write_file(dir, SHARD1, buf, len);
    assert_true(epic_checkpoint_open(dir, &ck) < 0);
    big = 1ull << 40;
    for (int i = 0; i < 8; i++)
      buf[i] = (char)(big >> (8 * i));
    write_file(dir, SHARD1, buf, len);
    assert_true(epic_checkpoint_open(dir, &ck) < 0);
    free(buf);
    copy_fixture(dir, "tiny-bf16", SHARD1, 0);
  }

  /* Malformed config.json. */
  write_file(dir, "config.json", "{\"hidden_size\": ", 16);
  assert_true(epic_checkpoint_open(dir, &ck) < 0);
  write_file(dir, "config.json", "{}", 2);
  assert_true(epic_checkpoint_open(dir, &ck) < 0);
  copy_fixture(dir, "tiny-bf16", "config.json", 0);

  /* Malformed index. */
  char *idx = fixture_text("tiny-bf16", INDEX, &len);
  write_file(dir, INDEX, idx, len / 2);
  assert_true(epic_checkpoint_open(dir, &ck) < 0);
  write_file(dir, INDEX, "{\"weight_map\": [1, 2]}", 22);
  assert_true(epic_checkpoint_open(dir, &ck) < 0);
  write_file(dir, INDEX, "{\"weight_map\": {\"a\": 7}}", 24);
  assert_true(epic_checkpoint_open(dir, &ck) < 0);
  write_file(dir, INDEX, "{\"weight_map\": {\"a\": \"../config.json\"}}", 39);
  assert_true(epic_checkpoint_open(dir, &ck) < 0);
  write_file(dir, INDEX, "{\"weight_map\": {}}", 18);
  assert_true(epic_checkpoint_open(dir, &ck) < 0);

  /* Index naming a shard file that does not exist. */
  {
    char *m = strdup(idx);
    for (char *p = m; (p = strstr(p, "00002-of")) != NULL; p++)
      p[4] = '3';
    write_file(dir, INDEX, m, strlen(m));
    assert_true(epic_checkpoint_open(dir, &ck) < 0);
    free(m);
  }
  /* Index mapping a tensor to the wrong (existing) shard. */
  {
    char *m = strdup(idx);
    char *p = strstr(m, "\"lm_head.weight\": \"model-00002");
    assert_non_null(p);
    p[strlen("\"lm_head.weight\": \"model-0000")] = '1';
    write_file(dir, INDEX, m, strlen(m));
    assert_true(epic_checkpoint_open(dir, &ck) < 0);
    free(m);
  }
  /* Index naming a tensor no shard holds. */
  {
    char *m = malloc(len + 128);
    const char *wm = strstr(idx, "\"weight_map\": {");
    assert_non_null(wm);
    size_t head = (size_t)(wm - idx) + strlen("\"weight_map\": {");
    memcpy(m, idx, head);
    int k = sprintf(m + head, "\"model.layers.7.ghost.weight\": \"%s\",", SHARD1);
    memcpy(m + head + (size_t)k, idx + head, len - head);
    write_file(dir, INDEX, m, len + (size_t)k);
    assert_true(epic_checkpoint_open(dir, &ck) < 0);
    free(m);
  }
  free(idx);

  /* No index and no model.safetensors. */
  {
    char path[2048];
    snprintf(path, sizeof path, "%s/%s", dir, INDEX);
    assert_int_equal(unlink(path), 0);
    assert_int_equal(epic_checkpoint_open(dir, &ck), EPIC_ERR_IO);
  }
  assert_null(ck);
  assert_true(epic_checkpoint_open("/nonexistent-epic-dir", &ck) < 0);
  rm_rf(dir);
  free(dir);
}

/* ------------------------------------------------------------------- dummy */

static void test_dummy(void **state) {
  (void)state;
  char dir[1024];
  epic_model_config cfg;
  epic_checkpoint *a = NULL, *b = NULL, *c = NULL;
  epic_weight wa, wb, wc;
  fixture_dir(dir, sizeof dir, "tiny-bf16");
  assert_int_equal(epic_config_load_dir(dir, &cfg), EPIC_OK);
  assert_int_equal(epic_checkpoint_open_dummy(&cfg, 42, &a), EPIC_OK);
  assert_int_equal(epic_checkpoint_open_dummy(&cfg, 42, &b), EPIC_OK);
  assert_int_equal(epic_checkpoint_open_dummy(&cfg, 43, &c), EPIC_OK);
  assert_int_equal(epic_checkpoint_config(a)->hidden_size, 256);
  const char *q = "model.layers.0.self_attn.q_a_proj.weight";
  assert_null(epic_checkpoint_find(a, q));
  assert_int_equal(epic_checkpoint_weight(a, q, 192, 256, &wa), EPIC_OK);
  assert_int_equal(epic_checkpoint_weight(b, q, 192, 256, &wb), EPIC_OK);
  assert_int_equal(epic_checkpoint_weight(c, q, 192, 256, &wc), EPIC_OK);
  assert_non_null(epic_checkpoint_find(a, q));
  assert_int_equal(wa.dtype, EPIC_DT_BF16);
  assert_memory_equal(wa.data, wb.data, 192 * 256 * 2);
  assert_memory_not_equal(wa.data, wc.data, 192 * 256 * 2);
  /* Values: uniform with std ~1/sqrt(cols). */
  float *f = malloc(192 * 256 * sizeof(float));
  epic_weight_rows_f32(&wa, 0, 192, f);
  double ss = 0;
  for (int i = 0; i < 192 * 256; i++) {
    assert_true(isfinite(f[i]));
    ss += (double)f[i] * f[i];
  }
  double rms = sqrt(ss / (192 * 256));
  assert_true(rms > 0.8 / 16 && rms < 1.2 / 16);
  free(f);
  /* Same request again returns the same tensor; a different shape is an error. */
  epic_weight again;
  assert_int_equal(epic_checkpoint_weight(a, q, 192, 256, &again), EPIC_OK);
  assert_ptr_equal(again.data, wa.data);
  assert_int_equal(epic_checkpoint_weight(a, q, 256, 192, &again), EPIC_ERR_INVALID);
  /* Norms ~1, router bias small F32. */
  float v[256], v2[256];
  assert_int_equal(epic_checkpoint_vector(a, "model.norm.weight", 256, v), EPIC_OK);
  assert_int_equal(epic_checkpoint_vector(b, "model.norm.weight", 256, v2), EPIC_OK);
  assert_memory_equal(v, v2, sizeof v);
  for (int i = 0; i < 256; i++)
    assert_true(v[i] > 0.9f && v[i] < 1.1f);
  assert_int_equal(
      epic_checkpoint_vector(a, "model.layers.1.mlp.gate.e_score_correction_bias", 16, v), EPIC_OK);
  assert_int_equal(
      epic_checkpoint_find(a, "model.layers.1.mlp.gate.e_score_correction_bias")->dtype,
      EPIC_DT_F32);
  for (int i = 0; i < 16; i++)
    assert_true(fabsf(v[i]) <= 0.011f);
  assert_true(epic_checkpoint_bytes(a) >= 192 * 256 * 2);
  assert_int_equal(epic_checkpoint_report_unused(a), 0);
  epic_checkpoint_close(a);
  epic_checkpoint_close(b);
  epic_checkpoint_close(c);

  /* FP8 config: FP8 projections with block scales, BF16 where the real checkpoint is. */
  fixture_dir(dir, sizeof dir, "tiny-fp8");
  assert_int_equal(epic_config_load_dir(dir, &cfg), EPIC_OK);
  assert_int_equal(epic_checkpoint_open_dummy(&cfg, 7, &a), EPIC_OK);
  for (size_t i = 0; i < sizeof k_weights / sizeof k_weights[0]; i++) {
    const wspec *s = &k_weights[i];
    epic_weight w;
    assert_int_equal(epic_checkpoint_weight(a, s->name, s->rows, s->cols, &w), EPIC_OK);
    if (bf16_in_fp8_checkpoint(s->name)) {
      assert_int_equal(w.dtype, EPIC_DT_BF16);
      continue;
    }
    assert_int_equal(w.dtype, EPIC_DT_F8E4M3);
    assert_int_equal(w.block_rows, 128);
    char sname[256];
    snprintf(sname, sizeof sname, "%s_scale_inv", s->name);
    const epic_tensor_info *st = epic_checkpoint_find(a, sname);
    assert_non_null(st);
    assert_int_equal(st->dtype, EPIC_DT_F32);
    assert_int_equal(st->shape[0], (s->rows + 127) / 128);
    assert_int_equal(st->shape[1], (s->cols + 127) / 128);
    const uint8_t *codes = w.data;
    for (int64_t k = 0; k < s->rows * s->cols; k++)
      assert_true((codes[k] & 0x7f) != 0x7f);
    float *rowbuf = malloc((size_t)(s->rows * s->cols) * sizeof(float));
    epic_weight_rows_f32(&w, 0, s->rows, rowbuf);
    double sum = 0;
    for (int64_t k = 0; k < s->rows * s->cols; k++)
      sum += (double)rowbuf[k] * rowbuf[k];
    double r = sqrt(sum / (double)(s->rows * s->cols)) * sqrt((double)s->cols);
    if (r < 0.5 || r > 2.0) fail_msg("%s: rms*sqrt(cols) = %g", s->name, r);
    free(rowbuf);
  }
  epic_checkpoint_close(a);
}

static const char *k_v3_small =
    "{\"model_type\":\"deepseek_v3\",\"vocab_size\":129280,\"hidden_size\":7168,"
    "\"intermediate_size\":18432,\"moe_intermediate_size\":2048,\"num_hidden_layers\":61,"
    "\"first_k_dense_replace\":3,\"moe_layer_freq\":1,\"num_attention_heads\":128,"
    "\"num_key_value_heads\":128,\"q_lora_rank\":1536,\"kv_lora_rank\":512,"
    "\"qk_nope_head_dim\":128,\"qk_rope_head_dim\":64,\"v_head_dim\":128,"
    "\"n_routed_experts\":256,\"n_shared_experts\":1,\"num_experts_per_tok\":8,\"n_group\":8,"
    "\"topk_group\":4,\"topk_method\":\"noaux_tc\",\"scoring_func\":\"sigmoid\","
    "\"norm_topk_prob\":true,\"routed_scaling_factor\":2.5,\"hidden_act\":\"silu\","
    "\"rms_norm_eps\":1e-6,\"rope_theta\":10000,\"rope_scaling\":{\"type\":\"yarn\","
    "\"factor\":40,\"original_max_position_embeddings\":4096,\"beta_fast\":32,\"beta_slow\":1,"
    "\"mscale\":1.0,\"mscale_all_dim\":1.0},\"max_position_embeddings\":163840,"
    "\"bos_token_id\":0,\"eos_token_id\":1,\"num_nextn_predict_layers\":1,"
    "\"quantization_config\":{\"quant_method\":\"fp8\",\"fmt\":\"e4m3\","
    "\"activation_scheme\":\"dynamic\",\"weight_block_size\":[128,128]}}";

static void test_dummy_v3(void **state) {
  (void)state;
  epic_model_config cfg;
  epic_checkpoint *ck = NULL;
  epic_weight w;
  assert_int_equal(epic_config_parse(k_v3_small, strlen(k_v3_small), "v3", &cfg), EPIC_OK);
  assert_int_equal(epic_config_override(&cfg, 1, 8), EPIC_OK);
  assert_int_equal(epic_checkpoint_open_dummy(&cfg, 1, &ck), EPIC_OK);
  static const struct {
    const char *name;
    int64_t rows, cols, srows, scols;
    epic_dtype dt;
  } t[] = {
      {"model.layers.0.self_attn.q_a_proj.weight", 1536, 7168, 12, 56, EPIC_DT_F8E4M3},
      {"model.layers.0.self_attn.kv_a_proj_with_mqa.weight", 576, 7168, 5, 56, EPIC_DT_F8E4M3},
      {"model.layers.0.self_attn.kv_b_proj.weight", 32768, 512, 256, 4, EPIC_DT_F8E4M3},
      {"model.layers.1.mlp.experts.7.down_proj.weight", 7168, 2048, 56, 16, EPIC_DT_F8E4M3},
      {"model.layers.1.mlp.gate.weight", 8, 7168, 0, 0, EPIC_DT_BF16},
      {"model.layers.1.eh_proj.weight", 7168, 14336, 0, 0, EPIC_DT_BF16},
  };
  for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
    assert_int_equal(epic_checkpoint_weight(ck, t[i].name, t[i].rows, t[i].cols, &w), EPIC_OK);
    assert_int_equal(w.dtype, t[i].dt);
    if (t[i].dt == EPIC_DT_F8E4M3) {
      char sname[256];
      snprintf(sname, sizeof sname, "%s_scale_inv", t[i].name);
      const epic_tensor_info *s = epic_checkpoint_find(ck, sname);
      assert_non_null(s);
      assert_int_equal(s->shape[0], t[i].srows);
      assert_int_equal(s->shape[1], t[i].scols);
      /* The last partial row block of kv_a_proj (rows 512..575) dequantises finitely. */
      float row[7168];
      epic_weight_rows_f32(&w, t[i].rows - 1, 1, row);
      for (int64_t c = 0; c < t[i].cols; c++)
        assert_true(isfinite(row[c]) && row[c] != 0.0f);
    }
  }
  /* Deterministic across instances. */
  epic_checkpoint *ck2 = NULL;
  epic_weight w2;
  assert_int_equal(epic_checkpoint_open_dummy(&cfg, 1, &ck2), EPIC_OK);
  assert_int_equal(epic_checkpoint_weight(ck2, t[1].name, t[1].rows, t[1].cols, &w2), EPIC_OK);
  assert_int_equal(epic_checkpoint_weight(ck, t[1].name, t[1].rows, t[1].cols, &w), EPIC_OK);
  assert_memory_equal(w.data, w2.data, (size_t)(t[1].rows * t[1].cols));
  assert_memory_equal(w.scale_inv, w2.scale_inv, 5 * 56 * sizeof(float));
  epic_checkpoint_close(ck2);
  epic_checkpoint_close(ck);
}

/* The successor mode (epic_checkpoint_set_mtp_successor) on the FP8 config: output
 * projections keep their codes and take alpha on their block scales, the MTP layer's
 * eh_proj is [I | 0], enorm ones, shared_head.head / .norm and embed_tokens the main
 * model's lm_head / norm / embedding; the rest as without it. Refused on a real
 * checkpoint, for alpha outside (0, 1], and once tensors exist. */
static void test_dummy_mtp_successor(void **state) {
  (void)state;
  char dir[1024];
  epic_model_config cfg;
  epic_checkpoint *a = NULL, *b = NULL, *real = NULL;
  fixture_dir(dir, sizeof dir, "tiny-fp8");
  assert_int_equal(epic_config_load_dir(dir, &cfg), EPIC_OK);
  assert_int_equal(epic_checkpoint_open(dir, &real), EPIC_OK);
  assert_int_equal(epic_checkpoint_set_mtp_successor(real, 0.5f), EPIC_ERR_INVALID);
  epic_checkpoint_close(real);
  assert_int_equal(epic_checkpoint_open_dummy(&cfg, 5, &a), EPIC_OK);
  assert_int_equal(epic_checkpoint_open_dummy(&cfg, 5, &b), EPIC_OK);
  assert_int_equal(epic_checkpoint_set_mtp_successor(a, 0.0f), EPIC_ERR_INVALID);
  assert_int_equal(epic_checkpoint_set_mtp_successor(a, 2.0f), EPIC_ERR_INVALID);
  assert_int_equal(epic_checkpoint_set_mtp_successor(a, 0.25f), EPIC_OK);
  const int64_t D = cfg.hidden_size, V = cfg.vocab_size, L = cfg.num_hidden_layers;
  epic_weight wa, wb;
  const char *o = "model.layers.1.self_attn.o_proj.weight";
  const int64_t o_cols = cfg.num_attention_heads * cfg.v_head_dim;
  assert_int_equal(epic_checkpoint_weight(a, o, D, o_cols, &wa), EPIC_OK);
  assert_int_equal(epic_checkpoint_weight(b, o, D, o_cols, &wb), EPIC_OK);
  assert_memory_equal(wa.data, wb.data, (size_t)(D * o_cols));
  const int64_t ns = ((D + 127) / 128) * ((o_cols + 127) / 128);
  for (int64_t i = 0; i < ns; i++)
    assert_true(wa.scale_inv[i] == 0.25f * wb.scale_inv[i]);
  char name[128];
  snprintf(name, sizeof name, "model.layers.%lld.eh_proj.weight", (long long)L);
  assert_int_equal(epic_checkpoint_weight(a, name, D, 2 * D, &wa), EPIC_OK);
  const uint16_t *eh = wa.data;
  for (int64_t r = 0; r < D; r++)
    for (int64_t c = 0; c < 2 * D; c++)
      if (eh[r * 2 * D + c] != (c == r ? 0x3F80 : 0))
        fail_msg("eh_proj[%lld][%lld] = 0x%04x", (long long)r, (long long)c, eh[r * 2 * D + c]);
  static const char *const copies[3][2] = {{"shared_head.head.weight", "lm_head.weight"},
                                           {"embed_tokens.weight", "model.embed_tokens.weight"},
                                           {"shared_head.norm.weight", "model.norm.weight"}};
  for (int i = 0; i < 3; i++) {
    snprintf(name, sizeof name, "model.layers.%lld.%s", (long long)L, copies[i][0]);
    if (i < 2) {
      assert_int_equal(epic_checkpoint_weight(a, name, V, D, &wa), EPIC_OK);
      assert_int_equal(epic_checkpoint_weight(a, copies[i][1], V, D, &wb), EPIC_OK);
      assert_memory_equal(wa.data, wb.data, (size_t)(V * D * 2));
    } else {
      float x[256], y[256];
      assert_true(D <= 256);
      assert_int_equal(epic_checkpoint_vector(a, name, D, x), EPIC_OK);
      assert_int_equal(epic_checkpoint_vector(a, copies[i][1], D, y), EPIC_OK);
      assert_memory_equal(x, y, (size_t)D * sizeof(float));
    }
  }
  float e[256];
  snprintf(name, sizeof name, "model.layers.%lld.enorm.weight", (long long)L);
  assert_int_equal(epic_checkpoint_vector(a, name, D, e), EPIC_OK);
  for (int64_t i = 0; i < D; i++)
    assert_true(e[i] == 1.0f);
  assert_int_equal(epic_checkpoint_set_mtp_successor(a, 0.5f), EPIC_ERR_INVALID); /* made */
  epic_checkpoint_close(a);
  epic_checkpoint_close(b);
}

int main(void) {
  epic_log_init(EPIC_LOG_LEVEL_ERROR, -1);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_tiny_bf16),
      cmocka_unit_test(test_tiny_fp8),
      cmocka_unit_test(test_unused_report),
      cmocka_unit_test(test_request_errors),
      cmocka_unit_test(test_dtype_errors),
      cmocka_unit_test(test_open_errors),
      cmocka_unit_test(test_dummy),
      cmocka_unit_test(test_dummy_v3),
      cmocka_unit_test(test_dummy_mtp_successor),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
