/* libFuzzer target: one line of a batch JSONL input file (coordinator/batch.h):
 * epic_batch_parse_line, then epic_batch_encode of a valid request. */
#include <stdint.h>
#include <stdlib.h>

#include "coordinator/batch.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const epic_tokenizer *tok = epic_fuzz_tokenizer();
  epic_batch_request *r = NULL;
  epic_status st = epic_batch_parse_line((const char *)data, size, 1, &r);
  if (st == EPIC_OK) {
    epic_batch_limits lim = {.vocab_size = 1280, .max_context = 256, .max_seq_tokens = 512,
                             .default_max_tokens = 16};
    int32_t *ids = NULL;
    int64_t n = 0, max_new = 0;
    if (epic_batch_encode(r, tok, EPIC_CHAT_AUTO, &lim, &ids, &n, &max_new) == EPIC_OK &&
        (n < 1 || max_new < 1 || n + max_new > lim.max_context))
      abort();
    free(ids);
  }
  epic_batch_request_free(r);
  return 0;
}
