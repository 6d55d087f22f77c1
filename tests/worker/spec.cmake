# MTP speculative decoding (worker/spec.c): greedy identity, rollback, rejection sampling.
set(_spec_args "")
if(EPIC_SANITIZE)
  set(_spec_args quick) # ~5x slower under the sanitizers: fewer sampling seeds
endif()
epic_test(NAME test_spec SOURCES test_spec.c LIBS epic_worker epic_test_util PkgConfig::CJSON ARGS ${_spec_args})
# Many small forwards: one OpenMP thread avoids spin-waiting on a loaded machine.
set_tests_properties(test_spec PROPERTIES ENVIRONMENT
  "EPIC_FIXTURES=${EPIC_FIXTURES_DIR};OMP_NUM_THREADS=1;OPENBLAS_NUM_THREADS=1")
