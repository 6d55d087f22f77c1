# epic_proto: C messages of the public API (proto/README.md), generated with
# protoc-c at build time into ${CMAKE_BINARY_DIR}/proto (included by
# coordinator/gateway.cmake when EPIC_GRPC is enabled). Headers are included as
# "epic/v1/inference.pb-c.h" and "grpc/health/v1/health.pb-c.h".
set(EPIC_PROTO_DIR ${CMAKE_SOURCE_DIR}/proto)
set(EPIC_PROTO_FILES epic/v1/inference.proto grpc/health/v1/health.proto)
set(_epic_proto_gen ${CMAKE_BINARY_DIR}/proto)
set(_epic_proto_srcs)
foreach(f ${EPIC_PROTO_FILES})
  string(REGEX REPLACE "\\.proto$" "" _base ${f})
  list(APPEND _epic_proto_srcs ${_epic_proto_gen}/${_base}.pb-c.c)
  add_custom_command(
    OUTPUT ${_epic_proto_gen}/${_base}.pb-c.c ${_epic_proto_gen}/${_base}.pb-c.h
    COMMAND ${CMAKE_COMMAND} -E make_directory ${_epic_proto_gen}
    COMMAND ${PROTOC_C} --c_out=${_epic_proto_gen} -I${EPIC_PROTO_DIR} ${EPIC_PROTO_DIR}/${f}
    DEPENDS ${EPIC_PROTO_DIR}/${f}
    COMMENT "protoc-c ${f}"
    VERBATIM)
endforeach()
add_library(epic_proto STATIC ${_epic_proto_srcs})
target_include_directories(epic_proto PUBLIC ${_epic_proto_gen})
target_link_libraries(epic_proto PUBLIC PkgConfig::PROTOBUFC)
