epic_test(NAME test_model SOURCES test_model.c LIBS epic_worker epic_test_util PkgConfig::CJSON)
epic_test(NAME test_sampler SOURCES test_sampler.c LIBS epic_worker)
epic_test(NAME test_kvcache SOURCES test_kvcache.c LIBS epic_worker)
# bench_sampler's smoke run: its JSON (the sampler against a whole-row sort) on a small row.
if(TARGET bench_sampler)
  add_test(NAME bench_sampler_smoke COMMAND bench_sampler --vocab 5000 --draws 2)
  set_tests_properties(bench_sampler_smoke PROPERTIES LABELS "unit")
endif()
