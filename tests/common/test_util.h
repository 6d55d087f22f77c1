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

#endif
