# The OpenAI-compatible HTTP front (coordinator/http.h) of `epic serve --http`
# and `epic gateway --http`: libmicrohttpd + cJSON, over the gRPC build (it
# shares the gateway's stop-string matching and, for the gateway, calls its
# gRPC port). Without libmicrohttpd the flags say so.
add_library(epic_metrics STATIC ${CMAKE_CURRENT_LIST_DIR}/metrics.c ${CMAKE_CURRENT_LIST_DIR}/reasoning.c
            ${CMAKE_CURRENT_LIST_DIR}/openai.c)
target_include_directories(epic_metrics PUBLIC ${CMAKE_SOURCE_DIR})
target_link_libraries(epic_metrics PUBLIC epic_common PkgConfig::CJSON m)
pkg_check_modules(MHD IMPORTED_TARGET libmicrohttpd)
# GnuTLS (libmicrohttpd's TLS library; libmicrohttpd-dev depends on it): the
# HTTP front verifies client certificates itself (mutual TLS, http.h).
pkg_check_modules(GNUTLS IMPORTED_TARGET gnutls)
if(EPIC_GRPC_ENABLED AND TARGET epic_gateway AND MHD_FOUND AND GNUTLS_FOUND)
  add_library(epic_http STATIC ${CMAKE_CURRENT_LIST_DIR}/http.c ${CMAKE_CURRENT_LIST_DIR}/http_engine.c ${CMAKE_CURRENT_LIST_DIR}/http_cli.c
              ${CMAKE_CURRENT_LIST_DIR}/http_upstream.c ${CMAKE_CURRENT_LIST_DIR}/http_limits.c)
  target_include_directories(epic_http PUBLIC ${CMAKE_SOURCE_DIR})
  target_compile_definitions(epic_http PUBLIC EPIC_HAVE_HTTP=1)
  target_link_libraries(epic_http PUBLIC epic_metrics epic_gateway epic_engine epic_tokenizer epic_common
                        PkgConfig::MHD PkgConfig::GNUTLS PkgConfig::CJSON PkgConfig::GRPC Threads::Threads)
  if(TARGET epic)
    target_link_libraries(epic PRIVATE epic_http)
  endif()
elseif(NOT MHD_FOUND OR NOT GNUTLS_FOUND)
  message(STATUS "libmicrohttpd or gnutls not found: epic serve/gateway --http disabled (apt install libmicrohttpd-dev)")
endif()
