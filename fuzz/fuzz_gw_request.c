/* libFuzzer target: a gRPC request body as the gateway gets it. The first byte
 * picks the message (GenerateRequest -> epic_gw_prepare with tight limits, or
 * TokenizeRequest -> epic_gw_encode_prompt with the rendered chat text); the
 * rest is the protobuf wire bytes. Whatever the bytes, decoding and validation
 * must neither crash nor leak, and an accepted job must respect the limits. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/gateway_impl.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  const epic_tokenizer *tok = epic_fuzz_tokenizer();
  epic_gw_limits lim = {.tok = tok,
                        .vocab_size = 1280,
                        .max_context = 256,
                        .default_max_tokens = 16,
                        .kv_tokens = 512,
                        .page_size = 16,
                        .req = {.max_prompt_tokens = 200, .max_tokens = 64}};
  char err[EPIC_GW_ERR_LEN];
  if (data[0] & 1) {
    Epic__V1__TokenizeRequest *rq = epic__v1__tokenize_request__unpack(NULL, size - 1, data + 1);
    if (!rq)
      return 0;
    int32_t *ids = NULL;
    int64_t n = 0;
    char *text = NULL;
    size_t text_len = 0;
    if (epic_gw_encode_prompt(rq->prompt, &lim, &ids, &n, &text, &text_len, err) == EPIC_OK) {
      for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= lim.vocab_size)
          abort();
    }
    free(ids);
    epic_tokenizer_text_free(text);
    epic__v1__tokenize_request__free_unpacked(rq, NULL);
    return 0;
  }
  Epic__V1__GenerateRequest *rq = epic__v1__generate_request__unpack(NULL, size - 1, data + 1);
  if (!rq)
    return 0;
  epic_gw_job job;
  if (epic_gw_prepare(rq, &lim, &job, err) == EPIC_OK) {
    if (job.n_prompt < 1 || job.n_prompt > 200 || job.max_tokens < 1 || job.max_tokens > 64 ||
        job.n_prompt + job.max_tokens > lim.max_context)
      abort();
    /* The stop strings go through the stopper as streamed text would. */
    epic_gw_stopper st;
    epic_gw_buf out = {0};
    epic_gw_stopper_init(&st, &job.stops);
    if (rq->request_id)
      epic_gw_stopper_push(&st, rq->request_id, strlen(rq->request_id), &out);
    epic_gw_stopper_finish(&st, &out);
    epic_gw_stopper_free(&st);
    epic_gw_buf_free(&out);
  }
  epic_gw_job_clear(&job);
  epic__v1__generate_request__free_unpacked(rq, NULL);
  return 0;
}
