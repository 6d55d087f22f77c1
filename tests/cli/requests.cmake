# `epic generate --requests` on the tiny fixture: identical output for one process
# and mpirun -np 1..4 (mpi; ucx where built), micro-batching on and off; malformed
# request files and a bad --comm are clear errors before any compute.
set(_req_ucx 0)
set(_req_matrix full)
if(EPIC_SANITIZE)
  set(_req_matrix quick) # every rank runs ~10x slower: fewer launches
endif()
if(EPIC_UCX_ENABLED)
  set(_req_ucx 1)
endif()
add_test(NAME cli_requests
         COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/test_requests.sh $<TARGET_FILE:epic> ${EPIC_FIXTURES_DIR}
                 ${MPIEXEC_EXECUTABLE} ${_req_ucx} ${_req_matrix})
set_tests_properties(cli_requests PROPERTIES LABELS "e2e;mpi" TIMEOUT 600
                     ENVIRONMENT "OMP_NUM_THREADS=1;${EPIC_MPI_TEST_ENV}")
