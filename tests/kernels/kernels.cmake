# Conformance tests of the CPU backend of epic_ops against float64 references.
epic_test(NAME test_ops_cpu SOURCES test_ops_cpu.c LIBS epic_kernels)
# The seeded draw against its definition, and the CPU backend's row_draw.
epic_test(NAME test_draw SOURCES test_draw.c LIBS epic_kernels)
