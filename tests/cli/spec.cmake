# `epic generate --mtp-draft K`: same output_ids as plain greedy, MTP fields in --json.
# Normal build only: test_spec runs the same paths under the sanitizers.
if(NOT EPIC_SANITIZE)
  add_test(NAME cli_spec COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/test_spec.sh $<TARGET_FILE:epic> ${EPIC_FIXTURES_DIR})
  set_tests_properties(cli_spec PROPERTIES LABELS e2e TIMEOUT 300 ENVIRONMENT "OMP_NUM_THREADS=1")
endif()
