/* NumPy .npy v1.0 files of float32 2-D arrays (C order), the format of the
 * fixtures' reference logits and of `epic generate --dump-logits`.
 * Thread-compatible: one writer per handle. */
#ifndef EPIC_NPY_H
#define EPIC_NPY_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

/* A writer that does not know the row count in advance: rows are appended and
 * the header (a fixed-size, space-padded dict) is rewritten on close. */
typedef struct epic_npy_writer epic_npy_writer;

epic_status epic_npy_writer_open(const char *path, int64_t cols, epic_npy_writer **out);
epic_status epic_npy_writer_append(epic_npy_writer *w, const float *rows, int64_t n_rows);
/* Finalises the header and closes; NULL-safe. Returns the first error seen. */
epic_status epic_npy_writer_close(epic_npy_writer *w);

/* Read a '<f4' C-order 2-D (or 1-D: rows = 1) array; *data is malloc'd. */
epic_status epic_npy_read_f32(const char *path, float **data, int64_t *rows, int64_t *cols);

#endif
