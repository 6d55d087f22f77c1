# epic_cluster: launcher detection, comm, expert plan and model loading shared by
# every engine command (coordinator/cluster.h).
add_library(epic_cluster STATIC ${CMAKE_CURRENT_SOURCE_DIR}/cluster.c)
target_include_directories(epic_cluster PUBLIC ${CMAKE_SOURCE_DIR})
target_link_libraries(epic_cluster PUBLIC epic_planner epic_worker epic_comm epic_common)
