# The gRPC gateway (coordinator/gateway.h): `epic serve` and `epic gateway`.
# Built when EPIC_GRPC is enabled (grpc + protobuf-c + protoc-c found); without
# it the two subcommands still exist and say that gRPC is missing.
if(TARGET epic)
  target_sources(epic PRIVATE ${CMAKE_CURRENT_LIST_DIR}/cmd_serve.c ${CMAKE_CURRENT_LIST_DIR}/cmd_gateway.c)
endif()
if(EPIC_GRPC_ENABLED)
  include(${CMAKE_SOURCE_DIR}/proto/proto.cmake)
  # libcrypto (a dependency of gRPC already): SHA-256 of API keys, constant-time
  # compares, PEM checks at start-up (coordinator/auth.h, cli_security.h).
  find_package(OpenSSL REQUIRED COMPONENTS Crypto)
  add_library(epic_gateway STATIC
    ${CMAKE_CURRENT_LIST_DIR}/auth.c
    ${CMAKE_CURRENT_LIST_DIR}/gateway_request.c
    ${CMAKE_CURRENT_LIST_DIR}/gateway_grpc.c
    ${CMAKE_CURRENT_LIST_DIR}/gateway_server.c
    ${CMAKE_CURRENT_LIST_DIR}/gateway_router.c)
  target_include_directories(epic_gateway PUBLIC ${CMAKE_SOURCE_DIR})
  target_compile_definitions(epic_gateway PRIVATE EPIC_VERSION="${PROJECT_VERSION}")
  target_link_libraries(epic_gateway PUBLIC epic_proto epic_engine epic_tokenizer epic_common PkgConfig::GRPC
                        OpenSSL::Crypto Threads::Threads m)
  if(TARGET epic)
    target_sources(epic PRIVATE ${CMAKE_CURRENT_LIST_DIR}/cli_security.c)
    target_compile_definitions(epic PRIVATE EPIC_HAVE_GRPC=1)
    target_link_libraries(epic PRIVATE epic_gateway epic_cluster epic_engine)
  endif()
endif()
