# Expert placement with redundant copies (EPLB): row-independent CPU matmul, placement
# checks, and rebalancing between forwards with bitwise-equal logits; single
# process (an MPI singleton) and under mpirun.
add_executable(test_model_eplb ${CMAKE_CURRENT_LIST_DIR}/test_model_eplb.c)
target_link_libraries(test_model_eplb PRIVATE epic_worker epic_test_util PkgConfig::CMOCKA epic_common)
target_include_directories(test_model_eplb PRIVATE ${CMAKE_SOURCE_DIR})
add_test(NAME test_model_eplb COMMAND $<TARGET_FILE:test_model_eplb>)
set_tests_properties(test_model_eplb PROPERTIES LABELS "unit" TIMEOUT 300
  ENVIRONMENT "EPIC_FIXTURES=${EPIC_FIXTURES_DIR};OMP_NUM_THREADS=1;OPENBLAS_NUM_THREADS=1;${EPIC_MPI_TEST_ENV}")
foreach(np 2 3)
  add_test(NAME test_model_eplb_np${np}
           COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${np} --oversubscribe
                   $<TARGET_FILE:test_model_eplb>)
  set_tests_properties(test_model_eplb_np${np} PROPERTIES LABELS "unit;mpi" TIMEOUT 300
    ENVIRONMENT "EPIC_FIXTURES=${EPIC_FIXTURES_DIR};OMP_NUM_THREADS=1;OPENBLAS_NUM_THREADS=1;${EPIC_MPI_TEST_ENV}")
endforeach()
