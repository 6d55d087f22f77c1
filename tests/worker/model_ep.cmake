# The expert-parallel model under mpirun: logits and greedy ids of many
# concurrent sequences equal a single-process reference, with one and two
# micro-batches, for several world sizes and every host-memory backend built.
add_executable(test_model_ep ${CMAKE_CURRENT_LIST_DIR}/test_model_ep.c)
target_link_libraries(test_model_ep PRIVATE epic_worker epic_test_util PkgConfig::CMOCKA epic_common)
target_include_directories(test_model_ep PRIVATE ${CMAKE_SOURCE_DIR})
set(_model_ep_runs "mpi\;2" "mpi\;3")
if(NOT EPIC_SANITIZE)
  # 4 ranks (the last owns no expert of the scattered placement) only where the
  # run is cheap: under the sanitizers MPI start-up alone takes tens of seconds.
  list(APPEND _model_ep_runs "mpi\;4")
endif()
if(EPIC_UCX_ENABLED)
  list(APPEND _model_ep_runs "ucx\;2")
endif()
# The GPU backends' host-side paths of expert parallelism (exchange buffers in backend
# memory, staged through the host for MPI) on the CPU posing as a device backend.
list(APPEND _model_ep_runs "mpi\;2\;device")
foreach(run ${_model_ep_runs})
  list(GET run 0 backend)
  list(GET run 1 np)
  list(LENGTH run n_fields)
  set(paths "")
  set(suffix "")
  if(n_fields GREATER 2)
    list(GET run 2 paths)
    set(suffix "_${paths}")
  endif()
  add_test(NAME test_model_ep_${backend}_np${np}${suffix}
           COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${np} --oversubscribe
                   $<TARGET_FILE:test_model_ep> ${backend} ${paths})
  set_tests_properties(test_model_ep_${backend}_np${np}${suffix} PROPERTIES LABELS "unit;mpi"
    TIMEOUT 300
    ENVIRONMENT "EPIC_FIXTURES=${EPIC_FIXTURES_DIR};OMP_NUM_THREADS=1;OPENBLAS_NUM_THREADS=1;${EPIC_MPI_TEST_ENV}")
endforeach()

# Smoke run of bench/bench_step on the tiny fixture (label bench: it checks that
# the benchmark runs and prints its JSON, not any timing).
if(TARGET bench_step)
  add_test(NAME bench_step_smoke
           COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} 2 --oversubscribe
                   $<TARGET_FILE:bench_step> --model ${EPIC_FIXTURES_DIR}/tiny-fp8
                   --batch 3 --context 8 --warmup 1 --steps 2)
  set_tests_properties(bench_step_smoke PROPERTIES LABELS bench TIMEOUT 120
    PASS_REGULAR_EXPRESSION "\"comm_hidden_fraction\""
    ENVIRONMENT "OMP_NUM_THREADS=1;OPENBLAS_NUM_THREADS=1;${EPIC_MPI_TEST_ENV}")
endif()
