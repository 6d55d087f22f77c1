/* Deterministic test data for the kernel tests: xorshift64 with one file-static state
 * per test program (rng_seed picks the stream; rng_seed_from_env takes it from
 * EPIC_TEST_SEED or the clock and prints it). Header-only, so that kernels/cuda/device_run.sh can build
 * test_ops_cuda.c on a GPU machine without the rest of the test library. */
#ifndef EPIC_TESTS_COMMON_TEST_RNG_H
#define EPIC_TESTS_COMMON_TEST_RNG_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static inline void rng_seed(uint64_t s) {
  rng_state = s * 0x9e3779b97f4a7c15ull + 1;
}

/* Seeds from EPIC_TEST_SEED, else the clock, and prints the seed so a failure can be
 * replayed. */
static inline void rng_seed_from_env(void) {
  const char *env = getenv("EPIC_TEST_SEED");
  const uint64_t seed = env ? strtoull(env, NULL, 10) : (uint64_t)time(NULL);
  printf("# seed %llu (EPIC_TEST_SEED to replay)\n", (unsigned long long)seed);
  rng_seed(seed);
}

static inline uint64_t rng_u64(void) {
  uint64_t x = rng_state;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return rng_state = x;
}

/* Uniform in [-1, 1). */
static inline float rng_f(void) {
  return (float)((double)(rng_u64() >> 11) * 0x1p-53 * 2.0 - 1.0);
}

#endif
