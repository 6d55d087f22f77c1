# bench_step: per-rank step time breakdown of the expert-parallel model with one
# and two micro-batches (run under mpirun). Its CTest smoke run is registered in
# tests/worker/model_ep.cmake, where testing and EPIC_MPI_TEST_ENV exist (the
# top level configures bench/ before it enables testing).
if(TARGET epic_comm)
  add_executable(bench_step ${CMAKE_CURRENT_SOURCE_DIR}/bench_step.c)
  target_include_directories(bench_step PRIVATE ${CMAKE_SOURCE_DIR})
  target_link_libraries(bench_step PRIVATE epic_worker)
endif()
