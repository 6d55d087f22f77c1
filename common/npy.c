#define _POSIX_C_SOURCE 200809L
#include "npy.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

/* Header block size: magic(6) + version(2) + len(2) + dict, padded to 128 bytes so
 * the dict can be rewritten in place with the final row count. */
#define NPY_HEADER_TOTAL 128

struct epic_npy_writer {
  FILE *f;
  char *path;
  int64_t cols, rows;
  epic_status err;
};

static epic_status write_header(FILE *f, int64_t rows, int64_t cols) {
  char dict[NPY_HEADER_TOTAL];
  unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, 0, 0};
  const size_t dict_len = NPY_HEADER_TOTAL - sizeof pre;
  int n = snprintf(dict, sizeof dict,
                   "{'descr': '<f4', 'fortran_order': False, 'shape': (%" PRId64 ", %" PRId64
                   "), }",
                   rows, cols);
  if (n < 0 || (size_t)n >= dict_len) return EPIC_ERR_INVALID;
  memset(dict + n, ' ', dict_len - (size_t)n);
  dict[dict_len - 1] = '\n';
  pre[8] = (unsigned char)(dict_len & 0xff);
  pre[9] = (unsigned char)(dict_len >> 8);
  if (fseek(f, 0, SEEK_SET) != 0 || fwrite(pre, 1, sizeof pre, f) != sizeof pre ||
      fwrite(dict, 1, dict_len, f) != dict_len)
    return EPIC_ERR_IO;
  return EPIC_OK;
}

epic_status epic_npy_writer_open(const char *path, int64_t cols, epic_npy_writer **out) {
  epic_npy_writer *w = calloc(1, sizeof *w);
  *out = NULL;
  if (!w) return EPIC_ERR_NOMEM;
  w->f = fopen(path, "wb");
  if (!w->f) {
    EPIC_LOG_ERROR("%s: cannot create file", path);
    free(w);
    return EPIC_ERR_IO;
  }
  w->path = strdup(path);
  w->cols = cols;
  if (!w->path || write_header(w->f, 0, cols) != EPIC_OK) {
    EPIC_LOG_ERROR("%s: cannot write", path);
    fclose(w->f);
    free(w->path);
    free(w);
    return EPIC_ERR_IO;
  }
  *out = w;
  return EPIC_OK;
}

epic_status epic_npy_writer_append(epic_npy_writer *w, const float *rows, int64_t n_rows) {
  size_t n = (size_t)(n_rows * w->cols);
  if (w->err) return w->err;
  /* The fixtures are little-endian '<f4'; so are all platforms EPIC targets. */
  if (fwrite(rows, sizeof(float), n, w->f) != n) {
    EPIC_LOG_ERROR("%s: write failed", w->path);
    w->err = EPIC_ERR_IO;
    return w->err;
  }
  w->rows += n_rows;
  return EPIC_OK;
}

epic_status epic_npy_writer_close(epic_npy_writer *w) {
  epic_status st;
  if (!w) return EPIC_OK;
  st = w->err;
  if (st == EPIC_OK) st = write_header(w->f, w->rows, w->cols);
  if (fclose(w->f) != 0 && st == EPIC_OK) st = EPIC_ERR_IO;
  if (st != EPIC_OK && w->err == EPIC_OK) EPIC_LOG_ERROR("%s: write failed", w->path);
  free(w->path);
  free(w);
  return st;
}

epic_status epic_npy_read_f32(const char *path, float **data, int64_t *rows, int64_t *cols) {
  FILE *f = fopen(path, "rb");
  unsigned char pre[10];
  char *hdr = NULL, *p;
  size_t hlen, n;
  long long a = 0, b = 1;
  epic_status st = EPIC_ERR_INVALID;
  *data = NULL;
  if (!f) {
    EPIC_LOG_ERROR("%s: cannot open", path);
    return EPIC_ERR_IO;
  }
  if (fread(pre, 1, 10, f) != 10 || memcmp(pre, "\x93NUMPY", 6) != 0 || pre[6] != 1) goto fail;
  hlen = (size_t)pre[8] | ((size_t)pre[9] << 8);
  hdr = calloc(1, hlen + 1);
  if (!hdr || fread(hdr, 1, hlen, f) != hlen) goto fail;
  if (!strstr(hdr, "'<f4'") || strstr(hdr, "'fortran_order': True")) goto fail;
  p = strstr(hdr, "'shape': (");
  if (!p) goto fail;
  p += 10;
  {
    /* shape is "(a, b)" or "(a,)" */
    char *end = strchr(p, ')'), *q;
    if (!end) goto fail;
    a = strtoll(p, &q, 10);
    if (q == p) goto fail;
    while (*q == ' ') q++;
    if (*q != ',') goto fail;
    q++;
    while (*q == ' ') q++;
    if (q == end) {
      b = a;
      a = 1;
    } else {
      char *r;
      b = strtoll(q, &r, 10);
      if (r == q) goto fail;
      while (*r == ' ' || *r == ',') r++;
      if (r != end) goto fail; /* more than 2 dimensions */
    }
  }
  if (a < 0 || b < 0) goto fail;
  n = (size_t)a * (size_t)b;
  *data = malloc(n ? n * sizeof(float) : 1);
  if (!*data || fread(*data, sizeof(float), n, f) != n) goto fail;
  *rows = a;
  *cols = b;
  st = EPIC_OK;
fail:
  if (st != EPIC_OK) {
    EPIC_LOG_ERROR("%s: not a float32 .npy array", path);
    free(*data);
    *data = NULL;
  }
  free(hdr);
  fclose(f);
  return st;
}
