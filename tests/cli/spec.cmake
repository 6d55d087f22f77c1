# `epic generate --mtp-draft K`: same output_ids as plain greedy, MTP fields in --json.
add_test(NAME cli_spec COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/test_spec.sh $<TARGET_FILE:epic> ${EPIC_FIXTURES_DIR})
set_tests_properties(cli_spec PROPERTIES LABELS e2e TIMEOUT 300 ENVIRONMENT "OMP_NUM_THREADS=1")
