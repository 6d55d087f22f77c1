#!/usr/bin/env bash
# Run the whole EPIC test suite: the normal build and an AddressSanitizer +
# UndefinedBehaviorSanitizer build, each with CTest (unit, CLI and fixture-parity tests),
# and a short libFuzzer run of every parser target (deploy/fuzz.sh, EPIC_FUZZ_SECONDS each).
# Usage: ./deploy/test.sh [--quick] (--quick: no sanitizer build, no fuzzing)
# Environment: EPIC_FIXTURES (default ../shared/fixtures).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
case "${1:-}" in
  --quick) quick=1 ;;
  --help|-h) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "test.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
esac

fixtures="${EPIC_FIXTURES:-$(cd .. && pwd)/shared/fixtures}"
jobs=$(nproc)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# ctest -j runs tests side by side on every core, so OpenMP threads (OMP_NUM_THREADS=2
# in the unit tests) share cores with other tests. libgomp's default spin before sleeping
# at a barrier (300k rounds) then burns the core a descheduled teammate needs: the
# sanitizer suite took 524 s on 2 cores, 403 s with the spin cut to what libgomp itself
# uses on oversubscribed machines (the normal suite is unchanged, 127 s).
export GOMP_SPINCOUNT="${GOMP_SPINCOUNT:-1000}"

run_suite() { # build_dir, extra cmake args...
  local dir="$1"; shift
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEPIC_FIXTURES_DIR="$fixtures" "$@"
  cmake --build "$dir" -j"$jobs"
  (cd "$dir" && ctest --output-on-failure -j"$jobs")
}

run_suite build
if [ "$quick" = 0 ]; then
  # libFuzzer targets (fuzz/, clang): a short run of each on its seed corpus
  # (~70 s with the build); bench/fuzz_bench.sh does the 1M-execution runs.
  if command -v clang-14 >/dev/null || command -v clang >/dev/null; then
    ./deploy/fuzz.sh --time "${EPIC_FUZZ_SECONDS:-8}" --build-dir build-fuzz
  else
    echo "test.sh: clang not found: fuzz targets not run (deploy/setup.sh installs clang-14)" >&2
    exit 1
  fi
  # ASan needs no leak checker ptrace games under CI; detect_leaks stays on.
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    run_suite build-asan -DEPIC_SANITIZE=ON
fi
echo "test.sh: all suites passed"
