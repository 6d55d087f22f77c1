# A rank killed in the middle of `mpirun -np 3 epic generate --requests` ends the
# job quickly, non-zero, with a message naming the rank (per comm backend).
set(_kill_backends mpi)
if(EPIC_UCX_ENABLED)
  list(APPEND _kill_backends ucx)
endif()
foreach(b ${_kill_backends})
  add_test(NAME cli_kill_rank_${b}
           COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/test_kill_rank.sh $<TARGET_FILE:epic> ${EPIC_FIXTURES_DIR}
                   ${MPIEXEC_EXECUTABLE} ${b})
  set_tests_properties(cli_kill_rank_${b} PROPERTIES LABELS "e2e;mpi" TIMEOUT 330
                       ENVIRONMENT "OMP_NUM_THREADS=1;${EPIC_MPI_TEST_ENV}")
endforeach()
# A rank that is stopped (alive but silent) must not hang the others either:
# with ucx the comm timeout (5 s in the test) bounds every wait, the control
# plane's included. (The test stops the rank only after loading: stopped inside
# MPI_Init, a rank hangs Open MPI's start-up exchange, which no EPIC timeout covers;
# that race was the hang seen on loaded machines.)
if(EPIC_UCX_ENABLED)
  add_test(NAME cli_kill_rank_ucx_stop
           COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/test_kill_rank.sh $<TARGET_FILE:epic> ${EPIC_FIXTURES_DIR}
                   ${MPIEXEC_EXECUTABLE} ucx stop)
  set_tests_properties(cli_kill_rank_ucx_stop PROPERTIES LABELS "e2e;mpi" TIMEOUT 330
                       ENVIRONMENT "OMP_NUM_THREADS=1;${EPIC_MPI_TEST_ENV}")
endif()
