# `epic batch --mtp-draft`: greedy records identical to off, in one process and under mpirun -np 2.
find_program(PYTHON3 python3)
if(PYTHON3)
  add_test(NAME cli_mtp_batch COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/test_mtp_batch.sh $<TARGET_FILE:epic>
           ${EPIC_FIXTURES_DIR} ${MPIEXEC_EXECUTABLE})
  set_tests_properties(cli_mtp_batch PROPERTIES LABELS "e2e;mpi" TIMEOUT 600
    ENVIRONMENT "OMP_NUM_THREADS=1;${EPIC_MPI_TEST_ENV}")
endif()
