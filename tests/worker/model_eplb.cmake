# Expert placement with redundant copies (EPLB): row-independent CPU matmul, placement
# checks, and rebalancing between forwards with bitwise-equal logits; single
# process (an MPI singleton) and under mpirun.
add_executable(test_model_eplb ${CMAKE_CURRENT_LIST_DIR}/test_model_eplb.c)
target_link_libraries(test_model_eplb PRIVATE epic_worker epic_test_util PkgConfig::CMOCKA epic_common)
target_include_directories(test_model_eplb PRIVATE ${CMAKE_SOURCE_DIR})
add_test(NAME test_model_eplb COMMAND $<TARGET_FILE:test_model_eplb>)
set_tests_properties(test_model_eplb PROPERTIES LABELS "unit" TIMEOUT 300
  ENVIRONMENT "EPIC_FIXTURES=${EPIC_FIXTURES_DIR};OMP_NUM_THREADS=1;OPENBLAS_NUM_THREADS=1;${EPIC_MPI_TEST_ENV}")
# np2_device: the GPU backends' host-side paths (tests/common/dev_ops.h).
foreach(run "2" "3" "2;device")
  list(GET run 0 np)
  list(LENGTH run n_fields)
  set(paths "")
  set(suffix "")
  if(n_fields GREATER 1)
    list(GET run 1 paths)
    set(suffix "_${paths}")
  endif()
  add_test(NAME test_model_eplb_np${np}${suffix}
           COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${np} --oversubscribe
                   $<TARGET_FILE:test_model_eplb> ${paths})
  set_tests_properties(test_model_eplb_np${np}${suffix} PROPERTIES LABELS "unit;mpi" TIMEOUT 300
    ENVIRONMENT "EPIC_FIXTURES=${EPIC_FIXTURES_DIR};OMP_NUM_THREADS=1;OPENBLAS_NUM_THREADS=1;${EPIC_MPI_TEST_ENV}")
endforeach()
