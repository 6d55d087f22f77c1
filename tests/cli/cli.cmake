# End-to-end tests of the `epic` program and the fixtures' parity contract.
find_program(PYTHON3 python3)
add_test(NAME cli COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/test_cli.sh $<TARGET_FILE:epic> ${EPIC_FIXTURES_DIR})
set_tests_properties(cli PROPERTIES LABELS e2e TIMEOUT 600 ENVIRONMENT "OMP_NUM_THREADS=2")
if(PYTHON3 AND EXISTS ${EPIC_FIXTURES_DIR}/../tools/parity.py)
  foreach(m tiny-bf16 tiny-fp8)
    add_test(NAME parity_${m} COMMAND ${PYTHON3} ${EPIC_FIXTURES_DIR}/../tools/parity.py
             $<TARGET_FILE:epic> ${EPIC_FIXTURES_DIR}/${m})
    set_tests_properties(parity_${m} PROPERTIES LABELS e2e TIMEOUT 600 ENVIRONMENT "OMP_NUM_THREADS=2")
    # Chunked prefill and tiny KV pages must not change a single logit beyond tolerance.
    add_test(NAME parity_${m}_chunked COMMAND ${PYTHON3} ${EPIC_FIXTURES_DIR}/../tools/parity.py
             $<TARGET_FILE:epic> ${EPIC_FIXTURES_DIR}/${m} --extra "--prefill-chunk 5 --page-size 3")
    set_tests_properties(parity_${m}_chunked PROPERTIES LABELS e2e TIMEOUT 600 ENVIRONMENT "OMP_NUM_THREADS=2")
  endforeach()
endif()
