# Conformance tests of the CPU backend of epic_ops against float64 references.
epic_test(NAME test_ops_cpu SOURCES test_ops_cpu.c LIBS epic_kernels)
