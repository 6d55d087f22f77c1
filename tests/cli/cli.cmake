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

# Expert parallelism under mpirun: the same logits and greedy ids for any world
# size and backend (the experts are spread over the ranks, rank 0 owns the sequence).
if(PYTHON3 AND EXISTS ${EPIC_FIXTURES_DIR}/../tools/parity.py)
  set(_ep_runs "tiny-bf16\;2\;mpi")
  # Under the sanitizers each rank of each case pays for slow stack unwinding
  # (MPI leak suppressions): one mpirun case there; world sizes 1-4 and ucx
  # are also compared logit by logit in test_model_ep, which runs in both builds.
  if(NOT EPIC_SANITIZE)
    list(APPEND _ep_runs "tiny-fp8\;3\;mpi" "tiny-bf16\;4\;mpi")
    if(EPIC_UCX_ENABLED)
      list(APPEND _ep_runs "tiny-fp8\;2\;ucx")
    endif()
  endif()
  foreach(run ${_ep_runs})
    list(GET run 0 m)
    list(GET run 1 np)
    list(GET run 2 backend)
    add_test(NAME parity_${m}_np${np}_${backend}
             COMMAND ${PYTHON3} ${EPIC_FIXTURES_DIR}/../tools/parity.py $<TARGET_FILE:epic> ${EPIC_FIXTURES_DIR}/${m}
                     --launch "${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${np} --oversubscribe"
                     --extra "--comm ${backend}")
    set_tests_properties(parity_${m}_np${np}_${backend} PROPERTIES LABELS "e2e;mpi" TIMEOUT 900
      ENVIRONMENT "OMP_NUM_THREADS=1;${EPIC_MPI_TEST_ENV}")
  endforeach()
endif()
