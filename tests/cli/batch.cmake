# End-to-end checks of `epic batch` on the tiny fixture model, including a
# SIGKILL/resume cycle and one run under mpirun -np 2.
find_program(PYTHON3 python3)
if(PYTHON3)
  add_test(NAME cli_batch COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/test_batch.sh $<TARGET_FILE:epic>
           ${EPIC_FIXTURES_DIR} ${MPIEXEC_EXECUTABLE})
  set_tests_properties(cli_batch PROPERTIES LABELS "e2e;mpi" TIMEOUT 600
    ENVIRONMENT "OMP_NUM_THREADS=2;${EPIC_MPI_TEST_ENV}")
endif()
