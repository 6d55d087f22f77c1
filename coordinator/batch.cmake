# Batch jobs: the line/record/resume module (epic_batch, coordinator/batch.h)
# and the `epic batch` subcommand (cmd_batch.c, driving coordinator/engine.h).
add_library(epic_batch STATIC ${CMAKE_CURRENT_LIST_DIR}/batch.c)
target_include_directories(epic_batch PUBLIC ${CMAKE_SOURCE_DIR})
target_link_libraries(epic_batch PUBLIC epic_tokenizer epic_common m)
if(TARGET epic)
  target_sources(epic PRIVATE ${CMAKE_CURRENT_LIST_DIR}/cmd_batch.c)
  target_link_libraries(epic PRIVATE epic_batch epic_engine Threads::Threads)
endif()
