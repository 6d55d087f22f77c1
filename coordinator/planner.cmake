# epic_planner: expert placement, checkpoint bytes and per-rank memory (`epic plan`).
add_library(epic_planner STATIC ${CMAKE_CURRENT_SOURCE_DIR}/planner.c)
target_include_directories(epic_planner PUBLIC ${CMAKE_SOURCE_DIR})
target_link_libraries(epic_planner PUBLIC epic_checkpoint epic_common PkgConfig::CJSON m)
