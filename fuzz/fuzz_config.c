/* libFuzzer target: config.json text through epic_config_parse. */
#include <stdint.h>
#include <stdlib.h>

#include "common/log.h"
#include "worker/config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static int init;
  if (!init) {
    epic_log_init(EPIC_LOG_LEVEL_ERROR, -1);
    init = 1;
  }
  epic_model_config cfg;
  epic_config_parse((const char *)data, size, "fuzz/config.json", &cfg);
  return 0;
}
