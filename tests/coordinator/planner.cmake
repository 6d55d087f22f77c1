# Planner tests: exact checkpoint bytes, placement, redundancy, fit (config files only).
epic_test(NAME test_planner SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_planner.c
          LIBS epic_planner epic_test_util TIMEOUT 300
          ARGS ${CMAKE_SOURCE_DIR}/bench/configs/deepseek-v3-671b)
