/* Checkpoint access: Hugging Face safetensors shards (memory-mapped, never read
 * whole), through model.safetensors.index.json or a single model.safetensors,
 * plus a synthetic "dummy" checkpoint that makes random weights of the right
 * shapes from a config alone (--load-format dummy).
 *
 * Every validation failure logs ONE EPIC_LOG_ERROR line naming the file and the
 * tensor (and the expected vs found shape/dtype) and returns EPIC_ERR_INVALID
 * (or EPIC_ERR_IO for unreadable files); nothing crashes on hostile input.
 * Thread contract: open/close from one thread; lookups are read-only and may be
 * called concurrently after open. */
#ifndef EPIC_WORKER_CHECKPOINT_H
#define EPIC_WORKER_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "../common/status.h"
#include "../kernels/ops.h"
#include "config.h"

#define EPIC_MAX_DIMS 8

typedef struct epic_checkpoint epic_checkpoint;

typedef struct epic_tensor_info {
  const char *name;   /* owned by the checkpoint */
  const char *file;   /* shard file name (base name), owned by the checkpoint */
  epic_dtype dtype;
  int ndim;
  int64_t shape[EPIC_MAX_DIMS];
  const void *data;   /* inside the mapping; valid until epic_checkpoint_close */
  size_t nbytes;
} epic_tensor_info;

/* Parse one safetensors file image (header and bounds validation only; `data`
 * pointers of the result point into `buf`). On success *out holds *n_out entries
 * allocated with malloc (names too): free with epic_safetensors_free. `src` names
 * the file in errors. Exposed for the fuzz test of the header parser. */
epic_status epic_safetensors_parse(const uint8_t *buf, size_t len, const char *src,
                                   epic_tensor_info **out, size_t *n_out);
void epic_safetensors_free(epic_tensor_info *t, size_t n);

/* Open DIR: config.json, then model.safetensors.index.json (every shard it names
 * must exist and hold the tensors the map says) or model.safetensors. */
epic_status epic_checkpoint_open(const char *dir, epic_checkpoint **out);
/* A synthetic checkpoint for `cfg`: any tensor the model asks for is created on
 * demand with random values (deterministic in seed), in the checkpoint's dtype
 * (FP8 + block scales when cfg->quant.fp8, else BF16; router bias F32). */
epic_status epic_checkpoint_open_dummy(const epic_model_config *cfg, uint64_t seed,
                                       epic_checkpoint **out);
/* Dummy checkpoints, before any tensor is made: every block's output projection
 * (self_attn.o_proj, mlp ... down_proj) scaled by alpha, so the main model mostly maps a
 * token to a fixed successor (embedding, final norm, LM head), and the MTP layer set to
 * the same map from the next token (eh_proj = [I | 0], enorm = 1, shared_head.norm and
 * .head and its embed_tokens made as model.norm, lm_head and model.embed_tokens): its
 * greedy drafts are mostly accepted (tests/tools/mtp_successor.py does the same to a
 * checkpoint on disk). EPIC_ERR_INVALID for a real checkpoint or alpha outside (0, 1]. */
epic_status epic_checkpoint_set_mtp_successor(epic_checkpoint *ck, float alpha);
/* NULL-safe; unmaps every shard and frees dummy tensors. */
void epic_checkpoint_close(epic_checkpoint *ck);

/* The config read from DIR/config.json (or the one given to open_dummy). */
const epic_model_config *epic_checkpoint_config(const epic_checkpoint *ck);
/* Mutable access, for overrides (--num-layers) applied before weights are read. */
epic_model_config *epic_checkpoint_config_mut(epic_checkpoint *ck);

/* Lookup without side effects; NULL when absent. For dummy checkpoints only
 * tensors already created are found. */
const epic_tensor_info *epic_checkpoint_find(const epic_checkpoint *ck, const char *name);

/* A linear weight `name` of shape [rows, cols]: BF16/F16/F32, or F8_E4M3 with its
 * `<name minus "weight">weight_scale_inv` F32 [ceil(rows/128), ceil(cols/128)].
 * Errors name the tensor and file: missing, wrong shape, unsupported dtype,
 * missing or mis-shaped scale. Marks the tensors as used. */
epic_status epic_checkpoint_weight(epic_checkpoint *ck, const char *name, int64_t rows,
                                   int64_t cols, epic_weight *out);
/* A 1-D tensor of n values (BF16/F16/F32) converted to fp32 into out[n]. */
epic_status epic_checkpoint_vector(epic_checkpoint *ck, const char *name, int64_t n,
                                   float *out);
/* Mark every tensor for which skip(user, name) returns non-zero as deliberately
 * not loaded (the MTP layer when MTP is off, other ranks' experts), so it is not
 * reported as unused. One pass over the tensors; returns how many matched. */
size_t epic_checkpoint_skip(epic_checkpoint *ck, int (*skip)(void *user, const char *name),
                            void *user);
/* Log (WARN) the tensors never requested, e.g. a layer the config does not have;
 * returns how many there were. */
size_t epic_checkpoint_report_unused(const epic_checkpoint *ck);
/* Total bytes mapped (or allocated, for dummy). */
size_t epic_checkpoint_bytes(const epic_checkpoint *ck);

#endif
