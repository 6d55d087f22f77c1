# epic_eplb: run-time expert load balancing of the engine (coordinator/eplb.h).
add_library(epic_eplb STATIC ${CMAKE_CURRENT_SOURCE_DIR}/eplb.c)
target_include_directories(epic_eplb PUBLIC ${CMAKE_SOURCE_DIR})
target_link_libraries(epic_eplb PUBLIC epic_planner epic_worker epic_comm epic_common Threads::Threads)
if(TARGET epic_engine)
  target_link_libraries(epic_engine PUBLIC epic_eplb)
endif()
