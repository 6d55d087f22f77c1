# End-to-end checks of `epic plan` on the real 671B config.json (no weights needed).
add_test(NAME cli_plan COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/test_plan.sh $<TARGET_FILE:epic>
         ${CMAKE_SOURCE_DIR}/bench/configs/deepseek-v3-671b)
set_tests_properties(cli_plan PROPERTIES LABELS e2e TIMEOUT 300)
