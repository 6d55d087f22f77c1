#include "status.h"

const char *epic_status_str(epic_status s) {
  switch (s) {
  case EPIC_OK: return "ok";
  case EPIC_INPROGRESS: return "in progress";
  case EPIC_ERR_INVALID: return "invalid argument or data";
  case EPIC_ERR_NOMEM: return "out of memory";
  case EPIC_ERR_IO: return "i/o error";
  case EPIC_ERR_COMM: return "communication error";
  case EPIC_ERR_CUDA: return "cuda error";
  case EPIC_ERR_TIMEOUT: return "timeout";
  case EPIC_ERR_CANCELLED: return "cancelled";
  case EPIC_ERR_UNSUPPORTED: return "unsupported";
  case EPIC_ERR_BUSY: return "busy (queue full)";
  }
  return "unknown status";
}
