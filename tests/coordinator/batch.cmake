# Batch job lines: parsing, encoding limits, stop strings, records, resume scan.
epic_test(NAME test_batch SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_batch.c
          LIBS epic_batch epic_test_util TIMEOUT 120)
