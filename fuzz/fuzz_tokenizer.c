/* libFuzzer target: text from clients through the tokenizer (encode with BOS,
 * pre-tokenize, decode of the ids, incremental detokenize). Any bytes, valid
 * UTF-8 or not. */
#include <stdint.h>
#include <stdlib.h>

#include "fuzz_util.h"

static int count_piece(void *user, const char *piece, size_t len, int32_t added_id) {
  (void)piece;
  (void)added_id;
  *(size_t *)user += len;
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const epic_tokenizer *tok = epic_fuzz_tokenizer();
  const char *text = (const char *)data;
  size_t covered = 0;
  epic_tokenizer_pretokenize(tok, text, size, count_piece, &covered);
  int32_t *ids = NULL;
  size_t n = 0;
  if (epic_tokenizer_encode(tok, text, size, 1, &ids, &n) == EPIC_OK) {
    char *out = NULL;
    size_t out_len = 0;
    if (epic_tokenizer_decode(tok, ids, n, 0, &out, &out_len) == EPIC_OK)
      epic_tokenizer_text_free(out);
    epic_detok *d = NULL;
    if (epic_detok_create(tok, 1, &d) == EPIC_OK) {
      for (size_t i = 0; i < n; i++) {
        char *t = NULL;
        size_t tl = 0;
        if (epic_detok_push(d, ids[i], &t, &tl) == EPIC_OK)
          epic_tokenizer_text_free(t);
      }
      char *t = NULL;
      size_t tl = 0;
      if (epic_detok_flush(d, &t, &tl) == EPIC_OK)
        epic_tokenizer_text_free(t);
      epic_detok_destroy(d);
    }
    epic_tokenizer_ids_free(ids);
  }
  return 0;
}
