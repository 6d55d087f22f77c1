# bench_a2a: MoE dispatch all-to-all latency/bandwidth per epic_comm backend (run under mpirun).
if(TARGET epic_comm)
  add_executable(bench_a2a ${CMAKE_CURRENT_SOURCE_DIR}/bench_a2a.c)
  target_link_libraries(bench_a2a PRIVATE epic_comm m)
endif()
