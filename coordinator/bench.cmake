# `epic bench`: end-to-end engine throughput (included after engine.cmake).
if(TARGET epic AND TARGET epic_engine)
  target_sources(epic PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/cmd_bench.c)
endif()
