# Tokenizer encode throughput vs a naive BPE baseline; prints one JSON object.
add_executable(bench_tokenizer ${CMAKE_CURRENT_LIST_DIR}/bench_tokenizer.c)
target_link_libraries(bench_tokenizer PRIVATE epic_tokenizer epic_common PkgConfig::CJSON)
