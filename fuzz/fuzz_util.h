/* Shared by the libFuzzer targets in fuzz/: the fixture tokenizer, loaded once.
 * Thread contract: libFuzzer runs targets on one thread; the tokenizer is
 * read-only after the first call. */
#ifndef EPIC_FUZZ_UTIL_H
#define EPIC_FUZZ_UTIL_H

#include "coordinator/tokenizer/tokenizer.h"

/* The tokenizer of $EPIC_FUZZ_MODEL, else of the fixtures' tiny-bf16; aborts
 * when it cannot be loaded (a fuzz run without it would test nothing). */
const epic_tokenizer *epic_fuzz_tokenizer(void);

#endif
