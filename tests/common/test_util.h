/* Helpers shared by the cmocka tests: where the fixtures are, small file readers. */
#ifndef EPIC_TEST_UTIL_H
#define EPIC_TEST_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* EPIC_FIXTURES (set by CTest) or ../shared/fixtures. */
const char *epic_test_fixtures(void);
/* fixtures/<rel> into buf; returns buf. */
char *epic_test_path(char *buf, size_t n, const char *rel);
/* Whole file, NUL-terminated, malloc'd; NULL if unreadable. *len may be NULL. */
char *epic_test_read_file(const char *path, size_t *len);

/* One case of fixtures/<model>/cases/cases.json (the fixtures README): its name,
 * prompt and greedy ids (malloc'd), and the .npy file names of its reference
 * logits in cases/ ("" when the case has none). */
typedef struct epic_test_case {
  char name[64];
  int32_t *prompt, *gen;
  int64_t n_prompt, n_gen;
  char prompt_logits[128], gen_logits[128], mtp_logits[128];
} epic_test_case;
/* Reads at most max cases of model into out; returns how many, or -1 when the
 * file is missing or malformed or holds more than max cases (out then holds
 * nothing to free). */
int epic_test_load_cases(const char *model, epic_test_case *out, int max);
/* Copies the case's prompt and greedy ids into fixed arrays of max_prompt and
 * max_gen ids; 0 (nothing copied) when either does not fit. */
int epic_test_case_copy(const epic_test_case *c, int32_t *prompt, int64_t max_prompt, int32_t *gen,
                        int64_t max_gen);
/* Frees the ids of n cases (NULL-safe per field). */
void epic_test_free_cases(epic_test_case *c, int n);

#endif
