# Expert load balancing at run time: `epic batch` under mpirun with experts
# re-placed every 2 steps gives the same greedy completions as EPLB off.
find_program(PYTHON3 python3)
if(PYTHON3 AND MPIEXEC_EXECUTABLE)
  set(_eplb_nps 2)
  if(NOT EPIC_SANITIZE)
    list(APPEND _eplb_nps 3) # under the sanitizers one world size is enough (slow start-up)
  endif()
  foreach(np ${_eplb_nps})
    set(policy global)
    if(np EQUAL 3)
      set(policy hierarchical)
    endif()
    add_test(NAME cli_eplb_np${np} COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/test_eplb.sh $<TARGET_FILE:epic>
             ${EPIC_FIXTURES_DIR} ${MPIEXEC_EXECUTABLE} ${np} ${policy})
    set_tests_properties(cli_eplb_np${np} PROPERTIES LABELS "e2e;mpi" TIMEOUT 300
      ENVIRONMENT "OMP_NUM_THREADS=1;OPENBLAS_NUM_THREADS=1;${EPIC_MPI_TEST_ENV}")
  endforeach()
endif()
