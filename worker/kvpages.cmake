# epic_kvpages: KV page bookkeeping and the prefix cache index (worker/kvpages.h),
# shared by the worker's KV cache and the coordinator's per-worker mirrors.
add_library(epic_kvpages STATIC ${CMAKE_CURRENT_SOURCE_DIR}/kvpages.c)
target_include_directories(epic_kvpages PUBLIC ${CMAKE_SOURCE_DIR})
target_link_libraries(epic_kvpages PUBLIC epic_common)
target_link_libraries(epic_worker PUBLIC epic_kvpages)
