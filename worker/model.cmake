# epic_worker: model, KV cache, sampler, generation loop, MTP speculative decoding.
add_library(epic_worker STATIC
  ${CMAKE_CURRENT_SOURCE_DIR}/model.c
  ${CMAKE_CURRENT_SOURCE_DIR}/kvcache.c
  ${CMAKE_CURRENT_SOURCE_DIR}/sampler.c
  ${CMAKE_CURRENT_SOURCE_DIR}/generate.c
  ${CMAKE_CURRENT_SOURCE_DIR}/spec.c)
target_include_directories(epic_worker PUBLIC ${CMAKE_SOURCE_DIR})
target_link_libraries(epic_worker PUBLIC epic_checkpoint epic_kernels epic_comm epic_common m)
