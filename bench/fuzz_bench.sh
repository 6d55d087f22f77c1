#!/usr/bin/env bash
# Fuzz benchmark: every libFuzzer target of fuzz/ for at least 1,000,000
# executions (deploy/fuzz.sh --runs), from the checked-in seed corpus plus what
# earlier runs in the same build directory found. Prints one JSON object:
# {"fuzz": {TARGET: {"executions", "seconds", "coverage", "ok"}...}, "runs_per_target"}.
# Usage: bench/fuzz_bench.sh [--runs N] [--build-dir DIR]   (default 1000000, build-fuzz)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=1000000 build=build-fuzz
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="$2"; shift ;;
    --build-dir) build="$2"; shift ;;
    --help|-h) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "fuzz_bench.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
  shift
done
rc=0
res=$(./deploy/fuzz.sh --runs "$runs" --build-dir "$build" --json) || rc=$?
echo "{\"fuzz\": $res, \"runs_per_target\": $runs, \"host_cpus\": $(nproc)}"
exit $rc
