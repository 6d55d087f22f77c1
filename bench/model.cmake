add_executable(bench_model ${CMAKE_CURRENT_SOURCE_DIR}/bench_model.c)
target_include_directories(bench_model PRIVATE ${CMAKE_SOURCE_DIR})
target_link_libraries(bench_model PRIVATE epic_worker)
