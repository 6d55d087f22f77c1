/* CPU batched decode attention: one absorbed-MLA query token per sequence, each
 * against its own block table. The reference for every backend's batched kernel,
 * so it is exactly mla_absorbed(m = 1) applied sequence by sequence. */
#include "../../common/log.h"
#include "ops_cpu_impl.h"

epic_status epic_cpu_mla_absorbed_batch(epic_ops *o, const epic_kv_batch *kv, int64_t n_seq,
                                        const float *q_abs, const float *q_pe, int64_t n_heads,
                                        float scale, float *ctx) {
  if (n_seq == 0 || n_heads == 0)
    return EPIC_OK;
  if (!kv || !kv->block_tables || !kv->n_ctx || n_seq < 0 || n_heads < 0 || kv->lora <= 0 ||
      kv->lora > kv->width || kv->table_stride <= 0 || !q_abs || !ctx ||
      (kv->width > kv->lora && !q_pe)) {
    EPIC_LOG_ERROR("mla_absorbed_batch: invalid arguments (n_seq %lld)", (long long)n_seq);
    return EPIC_ERR_INVALID;
  }
  EPIC_CHECK(epic_cpu_kv_dtype_ok(kv->dtype, "mla_absorbed_batch"));
  const int64_t lora = kv->lora, rope = kv->width - kv->lora;
  for (int64_t s = 0; s < n_seq; s++) {
    const int64_t n = kv->n_ctx[s];
    if (n < 1 || n > kv->table_stride * kv->page_size || n > kv->max_ctx) {
      EPIC_LOG_ERROR("mla_absorbed_batch: sequence %lld holds %lld tokens (table room %lld, "
                     "max_ctx %lld)",
                     (long long)s, (long long)n, (long long)(kv->table_stride * kv->page_size),
                     (long long)kv->max_ctx);
      return EPIC_ERR_INVALID;
    }
    const epic_kv_view v = {.pool = kv->pool,
                            .page_size = kv->page_size,
                            .width = kv->width,
                            .lora = lora,
                            .block_table = kv->block_tables + s * kv->table_stride,
                            .n_ctx = n,
                            .dtype = kv->dtype};
    EPIC_CHECK(epic_cpu_mla_absorbed(o, &v, q_abs + s * n_heads * lora,
                                     rope ? q_pe + s * n_heads * rope : NULL, 1, n - 1, n_heads,
                                     scale, ctx + s * n_heads * lora));
  }
  return EPIC_OK;
}
