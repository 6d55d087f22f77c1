# bench_eplb: rank load and step time before/after expert re-placement on a
# synthetic skewed routing workload (run under mpirun; see bench_eplb.c).
if(TARGET epic_comm AND TARGET epic_planner)
  add_executable(bench_eplb ${CMAKE_CURRENT_SOURCE_DIR}/bench_eplb.c)
  target_include_directories(bench_eplb PRIVATE ${CMAKE_SOURCE_DIR})
  target_link_libraries(bench_eplb PRIVATE epic_planner epic_worker)
endif()
