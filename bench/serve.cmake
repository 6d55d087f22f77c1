# Serving benchmark: bench_serve (the in-process engine baseline) and the
# bench_serve.py driver that runs the same workload over gRPC (epic serve,
# epic gateway) and prints the overhead ratios. Needs the gRPC build.
if(TARGET epic_engine)
  add_executable(bench_serve ${CMAKE_CURRENT_SOURCE_DIR}/bench_serve.c)
  target_include_directories(bench_serve PRIVATE ${CMAKE_SOURCE_DIR})
  target_link_libraries(bench_serve PRIVATE epic_engine epic_worker epic_common Threads::Threads)
endif()
