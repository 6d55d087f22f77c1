# Scheduler policy (no model) and the engine on the tiny fixtures (single process).
epic_test(NAME test_scheduler SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_scheduler.c LIBS epic_scheduler)
epic_test(NAME test_engine SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_engine.c
          LIBS epic_engine epic_test_util PkgConfig::CJSON Threads::Threads TIMEOUT 600)
