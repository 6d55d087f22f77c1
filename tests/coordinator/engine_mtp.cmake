# MTP speculative decoding in the engine (batched drafts, rollback across pages, cuts).
epic_test(NAME test_engine_mtp SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_engine_mtp.c
          LIBS epic_engine epic_test_util PkgConfig::CJSON TIMEOUT 300)
set_tests_properties(test_engine_mtp PROPERTIES ENVIRONMENT
  "EPIC_FIXTURES=${EPIC_FIXTURES_DIR};OMP_NUM_THREADS=1;OPENBLAS_NUM_THREADS=1")
