/* Unit tests of coordinator/auth.h: the keys file (plain, hashed, revoked,
 * bad lines named by line only), the Bearer check, per-key request and token
 * buckets on a test clock (limited, then recovered after the retry hint),
 * concurrent streams, and the plaintext policy of listen addresses. */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "coordinator/auth.h"

#define K1 "k1-0123456789abcdef-plain"
#define K2 "k2-fedcba9876543210-hashed"
#define K3 "k3-revoked-0000000000000"

static double test_now;
static double test_clock(void *user) {
  (void)user;
  return test_now;
}

static char *write_file(const char *text) {
  char *path = strdup("/tmp/epic-test-auth-XXXXXX");
  int fd = mkstemp(path);
  assert_true(fd >= 0);
  assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
  close(fd);
  return path;
}

/* The sha256 hex of s via the sha256sum tool: an implementation other than ours. */
static void sha_hex(const char *s, char out[65]) {
  char cmd[256];
  snprintf(cmd, sizeof cmd, "printf %%s '%s' | sha256sum", s);
  FILE *p = popen(cmd, "r");
  assert_non_null(p);
  assert_non_null(fgets(out, 65, p));
  pclose(p);
  assert_int_equal(strlen(out), 64);
}

static epic_auth *make(const char *keys_text, double rps, double burst, double tpm,
                       int64_t streams, char **path) {
  *path = keys_text ? write_file(keys_text) : NULL;
  epic_auth_params p = {.size = sizeof p,
                        .keys_file = *path,
                        .requests_per_s = rps,
                        .request_burst = burst,
                        .tokens_per_min = tpm,
                        .max_streams = streams,
                        .clock = test_clock};
  epic_auth *a = NULL;
  assert_int_equal(epic_auth_create(&p, &a), EPIC_OK);
  return a;
}

static epic_auth_verdict call(epic_auth *a, const char *authz, int stream, epic_auth_grant *g,
                              epic_auth_result *r) {
  return epic_auth_admit(a, authz, authz ? strlen(authz) : 0, stream, g, r);
}

static void keys_file(void **state) {
  (void)state;
  char hex[65], text[1024], *path;
  sha_hex(K2, hex);
  snprintf(text, sizeof text, "# keys\n\n  %s  \nsha256:%s\nrevoked %s\r\n", K1, hex, K3);
  epic_auth *a = make(text, 0, 0, 0, 0, &path);
  epic_auth_grant g;
  epic_auth_result r;
  assert_int_equal(epic_auth_keys_required(a), 1);
  assert_int_equal(epic_auth_n_keys(a), 2);
  assert_int_equal(call(a, "Bearer " K1, 0, &g, &r), EPIC_AUTH_OK);
  assert_string_equal(r.principal, "key@3");
  assert_int_equal(call(a, "bearer " K2, 0, &g, &r), EPIC_AUTH_OK);
  assert_string_equal(r.principal, "key@4");
  assert_int_equal(call(a, "Bearer " K3, 0, &g, &r), EPIC_AUTH_DENIED);
  assert_non_null(strstr(r.message, "revoked"));
  assert_int_equal(call(a, NULL, 0, &g, &r), EPIC_AUTH_DENIED);
  assert_non_null(strstr(r.message, "missing API key"));
  assert_int_equal(call(a, K1, 0, &g, &r), EPIC_AUTH_DENIED);
  assert_non_null(strstr(r.message, "expected 'Bearer <key>'"));
  assert_int_equal(call(a, "Bearer " K1 "x", 0, &g, &r), EPIC_AUTH_DENIED);
  assert_non_null(strstr(r.message, "invalid API key"));
  /* The hash itself is not a key. */
  char bearer_hash[80];
  snprintf(bearer_hash, sizeof bearer_hash, "Bearer %s", hex);
  assert_int_equal(call(a, bearer_hash, 0, &g, &r), EPIC_AUTH_DENIED);
  assert_int_equal(call(a, "Bearer ", 0, &g, &r), EPIC_AUTH_DENIED);
  /* No message names a key. */
  assert_null(strstr(r.message, "k1-"));
  epic_auth_destroy(a);
  unlink(path);
  free(path);
}

static void bad_files(void **state) {
  (void)state;
  static const char *bad[] = {
      "short\n",                                  /* under 16 characters */
      "sha256:abcd\n",                            /* not 64 hex digits */
      "sha256:zz" "0000000000000000000000000000000000000000000000000000000000000000\n",
      K1 "\n" K1 "\n",                            /* duplicate */
      "revoked " K1 "\n",                         /* no active key */
      "has a space in it 0123456789\n",
      "",                                         /* empty */
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    char *path = write_file(bad[i]);
    epic_auth_params p = {.size = sizeof p, .keys_file = path};
    epic_auth *a = (epic_auth *)1;
    assert_int_equal(epic_auth_create(&p, &a), EPIC_ERR_INVALID);
    assert_null(a);
    unlink(path);
    free(path);
  }
  epic_auth_params p = {.size = sizeof p, .keys_file = "/nonexistent/keys"};
  epic_auth *a;
  assert_int_equal(epic_auth_create(&p, &a), EPIC_ERR_IO);
  p.size = 1;
  assert_int_equal(epic_auth_create(&p, &a), EPIC_ERR_INVALID);
}

static void request_rate(void **state) {
  (void)state;
  char *path;
  test_now = 100.0;
  epic_auth *a = make(K1 "\n" K2 "\n", 2.0, 2.0, 0, 0, &path);
  epic_auth_grant g;
  epic_auth_result r;
  assert_int_equal(call(a, "Bearer " K1, 0, &g, &r), EPIC_AUTH_OK);
  assert_int_equal(call(a, "Bearer " K1, 0, &g, &r), EPIC_AUTH_OK);
  assert_int_equal(call(a, "Bearer " K1, 0, &g, &r), EPIC_AUTH_LIMITED);
  assert_non_null(strstr(r.message, "--rate-limit-rps 2"));
  assert_int_equal(r.retry_after_ms, 500);
  /* Another key has its own bucket. */
  assert_int_equal(call(a, "Bearer " K2, 0, &g, &r), EPIC_AUTH_OK);
  /* A wrong key does not spend anyone's budget, and is refused as such. */
  assert_int_equal(call(a, "Bearer nope-nope-nope-nope", 0, &g, &r), EPIC_AUTH_DENIED);
  test_now += 0.25;
  assert_int_equal(call(a, "Bearer " K1, 0, &g, &r), EPIC_AUTH_LIMITED);
  assert_int_equal(r.retry_after_ms, 250);
  test_now += 0.25;
  assert_int_equal(call(a, "Bearer " K1, 0, &g, &r), EPIC_AUTH_OK);
  epic_auth_destroy(a);
  unlink(path);
  free(path);
}

static void token_rate_and_streams(void **state) {
  (void)state;
  char *path;
  test_now = 5.0;
  epic_auth *a = make(K1 "\n", 0, 0, 60.0, 1, &path); /* 1 token/s, 1 stream */
  epic_auth_grant g, g2;
  epic_auth_result r;
  assert_int_equal(call(a, "Bearer " K1, 1, &g, &r), EPIC_AUTH_OK);
  assert_int_equal(call(a, "Bearer " K1, 1, &g2, &r), EPIC_AUTH_LIMITED);
  assert_non_null(strstr(r.message, "--max-streams-per-key 1"));
  assert_true(r.retry_after_ms > 0);
  /* A unary call holds no stream and is not token-limited. */
  assert_int_equal(call(a, "Bearer " K1, 0, &g2, &r), EPIC_AUTH_OK);
  epic_auth_charge(a, &g, 70); /* 60 - 70 = -10 */
  epic_auth_release(a, &g);
  epic_auth_release(a, &g); /* idempotent */
  assert_int_equal(call(a, "Bearer " K1, 1, &g2, &r), EPIC_AUTH_LIMITED);
  assert_non_null(strstr(r.message, "--rate-limit-tokens-per-min 60"));
  assert_int_equal(r.retry_after_ms, 11000);
  test_now += 10.5;
  assert_int_equal(call(a, "Bearer " K1, 1, &g2, &r), EPIC_AUTH_OK);
  epic_auth_release(a, &g2);
  epic_auth_destroy(a);
  unlink(path);
  free(path);
}

static void anonymous(void **state) {
  (void)state;
  char *path;
  test_now = 0;
  epic_auth *a = make(NULL, 1.0, 1.0, 0, 0, &path);
  epic_auth_grant g;
  epic_auth_result r;
  assert_int_equal(epic_auth_keys_required(a), 0);
  /* Without keys nothing is required, whatever is sent. */
  assert_int_equal(call(a, NULL, 0, &g, &r), EPIC_AUTH_OK);
  assert_string_equal(r.principal, "anonymous");
  assert_int_equal(call(a, "Bearer whatever", 0, &g, &r), EPIC_AUTH_LIMITED);
  epic_auth_destroy(a);
  epic_auth_release(NULL, NULL);
  epic_auth_destroy(NULL);
}

static void listen_policy(void **state) {
  (void)state;
  assert_true(epic_listen_is_local("127.0.0.1:0"));
  assert_true(epic_listen_is_local("127.3.2.1:50051"));
  assert_true(epic_listen_is_local("localhost:1"));
  assert_true(epic_listen_is_local("[::1]:50051"));
  assert_true(epic_listen_is_local("unix:/tmp/epic.sock"));
  assert_false(epic_listen_is_local("0.0.0.0:50051"));
  assert_false(epic_listen_is_local(":50051"));
  assert_false(epic_listen_is_local("[::]:50051"));
  assert_false(epic_listen_is_local("10.0.0.1:50051"));
  assert_false(epic_listen_is_local("127.0.0.1.example.com:1"));
  assert_false(epic_listen_is_local("node1:50051"));
  assert_int_equal(epic_listen_check_plaintext("t", "--listen", "0.0.0.0:1", 0, 0),
                   EPIC_ERR_INVALID);
  assert_int_equal(epic_listen_check_plaintext("t", "--listen", "0.0.0.0:1", 0, 1), EPIC_OK);
  assert_int_equal(epic_listen_check_plaintext("t", "--listen", "0.0.0.0:1", 1, 0), EPIC_OK);
  assert_int_equal(epic_listen_check_plaintext("t", "--listen", "127.0.0.1:1", 0, 0), EPIC_OK);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(keys_file),      cmocka_unit_test(bad_files),
      cmocka_unit_test(request_rate),   cmocka_unit_test(token_rate_and_streams),
      cmocka_unit_test(anonymous),      cmocka_unit_test(listen_policy),
  };
  return cmocka_run_group_tests_name("auth", tests, NULL, NULL);
}
