# Tests of epic_checkpoint (config parsing, safetensors, dummy weights).
epic_test(NAME test_config SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/test_config.c
          LIBS epic_checkpoint epic_test_util)
epic_test(NAME test_checkpoint SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/test_checkpoint.c
          LIBS epic_checkpoint epic_test_util)
epic_test(NAME test_safetensors_fuzz SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/test_safetensors_fuzz.c
          LIBS epic_checkpoint epic_test_util TIMEOUT 300)
