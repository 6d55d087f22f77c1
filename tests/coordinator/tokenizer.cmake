# Tokenizer + chat template tests (fixtures: tokenizer/ and tiny-tokenizer/).
epic_test(NAME test_tokenizer SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_tokenizer.c
          LIBS epic_tokenizer epic_test_util TIMEOUT 300)
epic_test(NAME test_chat SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_chat.c
          LIBS epic_tokenizer epic_test_util TIMEOUT 120)
