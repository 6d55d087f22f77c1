# epic_executor: the step plan's wire format and one rank's part of a step
# (worker/step_plan.h, worker/executor.h).
add_library(epic_executor STATIC
  ${CMAKE_CURRENT_SOURCE_DIR}/executor.c
  ${CMAKE_CURRENT_SOURCE_DIR}/step_plan.c)
target_include_directories(epic_executor PUBLIC ${CMAKE_SOURCE_DIR})
target_link_libraries(epic_executor PUBLIC epic_worker epic_common Threads::Threads)
