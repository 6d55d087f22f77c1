epic_test(NAME test_model SOURCES test_model.c LIBS epic_worker epic_test_util PkgConfig::CJSON)
epic_test(NAME test_sampler SOURCES test_sampler.c LIBS epic_worker)
epic_test(NAME test_kvcache SOURCES test_kvcache.c LIBS epic_worker)
