# bench_sampler: host sampling per draw against a whole-row sort; prints one JSON object.
if(TARGET epic_worker)
  add_executable(bench_sampler ${CMAKE_CURRENT_SOURCE_DIR}/bench_sampler.c)
  target_include_directories(bench_sampler PRIVATE ${CMAKE_SOURCE_DIR})
  target_link_libraries(bench_sampler PRIVATE epic_worker)
endif()
