/* libFuzzer target: a safetensors file image (u64 header length, JSON header,
 * data) through epic_safetensors_parse; every tensor it accepts must lie
 * inside the buffer. */
#include <stdint.h>
#include <stdlib.h>

#include "common/log.h"
#include "worker/checkpoint.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static int init;
  if (!init) {
    epic_log_init(EPIC_LOG_LEVEL_ERROR, -1);
    init = 1;
  }
  epic_tensor_info *t = NULL;
  size_t n = 0;
  if (epic_safetensors_parse(data, size, "fuzz.safetensors", &t, &n) == EPIC_OK) {
    for (size_t i = 0; i < n; i++) {
      const uint8_t *p = t[i].data;
      if (t[i].nbytes && (p < data || p + t[i].nbytes > data + size))
        abort();
    }
    epic_safetensors_free(t, n);
  }
  return 0;
}
