# epic_checkpoint: config.json parsing and safetensors checkpoint access.
add_library(epic_checkpoint STATIC
  ${CMAKE_CURRENT_SOURCE_DIR}/config.c
  ${CMAKE_CURRENT_SOURCE_DIR}/checkpoint.c)
target_include_directories(epic_checkpoint PUBLIC ${CMAKE_SOURCE_DIR})
target_link_libraries(epic_checkpoint PUBLIC epic_kernels epic_common PkgConfig::CJSON
                      OpenMP::OpenMP_C m)
