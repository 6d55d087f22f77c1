/* common/: status strings, logger levels, .npy round trip. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "common/log.h"
#include "common/npy.h"
#include "common/status.h"

static void test_status_str(void **state) {
  (void)state;
  assert_string_equal(epic_status_str(EPIC_OK), "ok");
  assert_string_equal(epic_status_str(EPIC_ERR_NOMEM), "out of memory");
  assert_string_equal(epic_status_str((epic_status)-99), "unknown status");
}

static void test_log_levels(void **state) {
  (void)state;
  unsetenv("EPIC_LOG_LEVEL");
  epic_log_init(EPIC_LOG_LEVEL_INFO, -1);
  assert_true(epic_log_enabled(EPIC_LOG_LEVEL_ERROR));
  assert_true(epic_log_enabled(EPIC_LOG_LEVEL_INFO));
  assert_false(epic_log_enabled(EPIC_LOG_LEVEL_DEBUG));
  setenv("EPIC_LOG_LEVEL", "trace", 1);
  epic_log_init(EPIC_LOG_LEVEL_ERROR, 3);
  assert_true(epic_log_enabled(EPIC_LOG_LEVEL_TRACE));
  unsetenv("EPIC_LOG_LEVEL");
  epic_log_init(EPIC_LOG_LEVEL_WARN, -1);
}

static void test_npy_roundtrip(void **state) {
  (void)state;
  char path[] = "/tmp/epic-npy-XXXXXX";
  int fd = mkstemp(path);
  epic_npy_writer *w;
  float rows[6] = {1, 2, 3, 4, 5, 6}, *back;
  int64_t r, c;
  assert_true(fd >= 0);
  close(fd);
  assert_int_equal(epic_npy_writer_open(path, 3, &w), EPIC_OK);
  assert_int_equal(epic_npy_writer_append(w, rows, 1), EPIC_OK);
  assert_int_equal(epic_npy_writer_append(w, rows + 3, 1), EPIC_OK);
  assert_int_equal(epic_npy_writer_close(w), EPIC_OK);
  assert_int_equal(epic_npy_read_f32(path, &back, &r, &c), EPIC_OK);
  assert_int_equal(r, 2);
  assert_int_equal(c, 3);
  assert_memory_equal(back, rows, sizeof rows);
  free(back);
  /* a file that is not .npy is an error, not a crash */
  FILE *f = fopen(path, "wb");
  fputs("not numpy", f);
  fclose(f);
  assert_int_equal(epic_npy_read_f32(path, &back, &r, &c), EPIC_ERR_INVALID);
  unlink(path);
}

static void test_npy_fixture(void **state) {
  (void)state;
  char path[1024];
  const char *fx = getenv("EPIC_FIXTURES");
  float *d;
  int64_t r, c;
  snprintf(path, sizeof path, "%s/tiny-bf16/cases/c1_len5.prompt_logits.npy",
           fx ? fx : "../shared/fixtures");
  assert_int_equal(epic_npy_read_f32(path, &d, &r, &c), EPIC_OK);
  assert_int_equal(r, 5);
  assert_true(c > 1);
  free(d);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_status_str),
      cmocka_unit_test(test_log_levels),
      cmocka_unit_test(test_npy_roundtrip),
      cmocka_unit_test(test_npy_fixture),
  };
  return cmocka_run_group_tests_name("common", tests, NULL, NULL);
}
