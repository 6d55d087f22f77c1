/* Status codes shared by every EPIC module.
 * Every fallible function returns an epic_status; negative values are errors.
 * Thread-safe: pure functions only. */
#ifndef EPIC_STATUS_H
#define EPIC_STATUS_H

typedef enum {
  EPIC_OK = 0,
  EPIC_INPROGRESS = 1,
  EPIC_ERR_INVALID = -1,
  EPIC_ERR_NOMEM = -2,
  EPIC_ERR_IO = -3,
  EPIC_ERR_COMM = -4,
  EPIC_ERR_CUDA = -5,
  EPIC_ERR_TIMEOUT = -6,
  EPIC_ERR_CANCELLED = -7,
  EPIC_ERR_UNSUPPORTED = -8,
  EPIC_ERR_BUSY = -9 /* a bounded queue is full: retry later */
} epic_status;

/* Static string naming the status (never NULL). */
const char *epic_status_str(epic_status s);

#endif
