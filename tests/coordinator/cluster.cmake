# epic_cluster: plan-driven placement, fit check and backend errors; single
# process and under mpirun (every rank checks its own experts against the plan).
epic_test(NAME test_cluster SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_cluster.c
          LIBS epic_cluster epic_test_util TIMEOUT 120)
# The bad-backend case initialises MPI as a singleton: same environment (LSan
# suppressions for the MPI libraries) as the mpirun tests.
set_property(TEST test_cluster APPEND PROPERTY ENVIRONMENT "${EPIC_MPI_TEST_ENV}")
foreach(np 2 3)
  add_test(NAME test_cluster_np${np}
           COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${np} --oversubscribe
                   $<TARGET_FILE:test_cluster>)
  set_tests_properties(test_cluster_np${np} PROPERTIES LABELS "unit;mpi" TIMEOUT 120
    ENVIRONMENT "EPIC_FIXTURES=${EPIC_FIXTURES_DIR};OMP_NUM_THREADS=1;OPENBLAS_NUM_THREADS=1;${EPIC_MPI_TEST_ENV}")
endforeach()
