# The prefix cache end to end (test_prefix.sh): `epic generate --requests` on
# requests sharing prompt prefixes, byte-identical with --prefix-cache off for
# one process and mpirun -np 2, with cache hits and evictions observed.
set(_prefix_matrix full)
if(EPIC_SANITIZE)
  set(_prefix_matrix quick) # every rank runs ~10x slower: one mpirun launch
endif()
add_test(NAME cli_prefix
         COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/test_prefix.sh $<TARGET_FILE:epic> ${EPIC_FIXTURES_DIR}
                 ${MPIEXEC_EXECUTABLE} ${_prefix_matrix})
set_tests_properties(cli_prefix PROPERTIES LABELS "e2e;mpi" TIMEOUT 300
                     ENVIRONMENT "OMP_NUM_THREADS=1;${EPIC_MPI_TEST_ENV}")
