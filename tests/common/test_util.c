#include "test_util.h"

#include <stdio.h>
#include <stdlib.h>

const char *epic_test_fixtures(void) {
  const char *e = getenv("EPIC_FIXTURES");
  return (e && *e) ? e : "../shared/fixtures";
}

char *epic_test_path(char *buf, size_t n, const char *rel) {
  snprintf(buf, n, "%s/%s", epic_test_fixtures(), rel);
  return buf;
}

char *epic_test_read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  char *buf = NULL;
  long sz;
  if (!f) return NULL;
  if (fseek(f, 0, SEEK_END) != 0 || (sz = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) goto out;
  buf = malloc((size_t)sz + 1);
  if (!buf) goto out;
  if (fread(buf, 1, (size_t)sz, f) != (size_t)sz) {
    free(buf);
    buf = NULL;
    goto out;
  }
  buf[sz] = 0;
  if (len) *len = (size_t)sz;
out:
  fclose(f);
  return buf;
}
