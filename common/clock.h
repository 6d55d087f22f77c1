/* Monotonic wall clock for timings, progress and timeouts. Thread-safe. */
#ifndef EPIC_CLOCK_H
#define EPIC_CLOCK_H

/* Seconds since an arbitrary fixed point (CLOCK_MONOTONIC). */
double epic_now_seconds(void);

#endif
