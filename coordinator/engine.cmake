# epic_scheduler: scheduling policy without a model (coordinator/scheduler.h).
add_library(epic_scheduler STATIC ${CMAKE_CURRENT_SOURCE_DIR}/scheduler.c)
target_include_directories(epic_scheduler PUBLIC ${CMAKE_SOURCE_DIR})
target_link_libraries(epic_scheduler PUBLIC epic_kvpages epic_common)
# epic_engine: coordinator + worker loops of one cluster (coordinator/engine.h).
add_library(epic_engine STATIC ${CMAKE_CURRENT_SOURCE_DIR}/engine.c)
target_include_directories(epic_engine PUBLIC ${CMAKE_SOURCE_DIR})
target_link_libraries(epic_engine PUBLIC epic_scheduler epic_executor epic_worker epic_comm epic_common
                      Threads::Threads)
# `epic generate --requests` runs on the engine (included after cli.cmake).
if(TARGET epic)
  target_link_libraries(epic PRIVATE epic_engine PkgConfig::CJSON)
endif()
