# The `epic` executable.
add_executable(epic
  ${CMAKE_CURRENT_SOURCE_DIR}/main.c
  ${CMAKE_CURRENT_SOURCE_DIR}/cli_util.c
  ${CMAKE_CURRENT_SOURCE_DIR}/cli_engine.c
  ${CMAKE_CURRENT_SOURCE_DIR}/cmd_generate.c
  ${CMAKE_CURRENT_SOURCE_DIR}/cmd_plan.c)
target_include_directories(epic PRIVATE ${CMAKE_SOURCE_DIR} ${CMAKE_CURRENT_SOURCE_DIR})
target_compile_definitions(epic PRIVATE EPIC_VERSION="${PROJECT_VERSION}" EPIC_FEATURES="${EPIC_FEATURES}")
target_link_libraries(epic PRIVATE epic_cluster epic_planner epic_worker epic_tokenizer epic_common)
