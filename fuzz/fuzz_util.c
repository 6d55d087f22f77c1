/* The fixture tokenizer of the fuzz targets (fuzz_util.h). */
#include "fuzz_util.h"

#include <stdio.h>
#include <stdlib.h>

#include "common/log.h"

const epic_tokenizer *epic_fuzz_tokenizer(void) {
  static epic_tokenizer *tok;
  if (!tok) {
    char dir[4096];
    const char *m = getenv("EPIC_FUZZ_MODEL");
    snprintf(dir, sizeof dir, "%s", m ? m : EPIC_FUZZ_FIXTURES "/tiny-bf16");
    epic_log_init(EPIC_LOG_LEVEL_ERROR, -1);
    if (epic_tokenizer_load_dir(dir, &tok) != EPIC_OK) {
      fprintf(stderr, "fuzz: cannot load the tokenizer of %s (set EPIC_FUZZ_MODEL)\n", dir);
      abort();
    }
  }
  return tok;
}
