#!/usr/bin/env bash
# Build EPIC's libFuzzer targets (fuzz/, clang + ASan + UBSan) and run each one
# on its checked-in seed corpus for a bounded time or number of executions.
# Usage: ./deploy/fuzz.sh [--time SECS | --runs N] [--build-dir DIR] [--json] [TARGET...]
#   --time SECS   per target (default 10);  --runs N: stop each after N executions
#   --json        print one JSON object with the executions of every target
# New inputs go to DIR/corpus/TARGET (fuzz/corpus/ stays as checked in); a crash
# leaves its reproducer in DIR/crashes/ and makes the script exit 1.
# Needs clang-14 and libclang-rt-14-dev (deploy/setup.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."

time_s=10 runs="" build=build-fuzz json=0 targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --time) time_s="$2"; shift ;;
    --runs) runs="$2"; shift ;;
    --build-dir) build="$2"; shift ;;
    --json) json=1 ;;
    --help|-h) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "fuzz.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    *) targets+=("$1") ;;
  esac
  shift
done
all=(fuzz_gw_request fuzz_batch_line fuzz_tokenizer fuzz_safetensors fuzz_config fuzz_http_request)
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
cc="${CC:-$(command -v clang-14 || command -v clang || true)}"
[ -n "$cc" ] || { echo "fuzz.sh: clang not found (apt-get install clang-14 libclang-rt-14-dev)" >&2; exit 2; }
fixtures="${EPIC_FIXTURES:-$(cd .. && pwd)/shared/fixtures}"

log() { [ "$json" = 1 ] && echo "$*" >&2 || echo "$*"; }
CC="$cc" cmake -S fuzz -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEPIC_FIXTURES_DIR="$fixtures" >&2
cmake --build "$build" -j"$(nproc)" --target "${targets[@]}" >&2

mkdir -p "$build/crashes"
limit=(-max_total_time="$time_s")
[ -z "$runs" ] || limit=(-runs="$runs")
failed=0 out="{"
for t in "${targets[@]}"; do
  mkdir -p "$build/corpus/$t"
  start=$(date +%s.%N)
  set +e
  "$build/$t" "${limit[@]}" -close_fd_mask=2 -max_len=65536 -timeout=25 -rss_limit_mb=2048 \
    -artifact_prefix="$build/crashes/$t-" "$build/corpus/$t" "fuzz/corpus/$t" >"$build/$t.log" 2>&1
  rc=$?
  set -e
  secs=$(echo "$(date +%s.%N) - $start" | bc)
  n=$(sed -n 's/^Done \([0-9]*\) runs in .*/\1/p' "$build/$t.log" | tail -n1)
  cov=$(grep -o 'cov: [0-9]*' "$build/$t.log" | tail -n1 | cut -d' ' -f2)
  if [ $rc -ne 0 ] || [ -z "$n" ]; then
    failed=1
    log "fuzz.sh: $t FAILED (exit $rc); log $build/$t.log, reproducers $build/crashes/"
    grep -E 'ERROR|SUMMARY|Test unit written' "$build/$t.log" | head -5 >&2 || true
    n=${n:-0}
  else
    log "fuzz.sh: $t: $n executions in ${secs%.*} s, coverage ${cov:-?}, corpus $(ls "$build/corpus/$t" | wc -l) new inputs"
  fi
  [ "$out" = "{" ] || out="$out, "
  out="$out\"$t\": {\"executions\": $n, \"seconds\": $(printf '%.1f' "$secs"), \"coverage\": ${cov:-0}, \"ok\": $([ $rc -eq 0 ] && echo true || echo false)}"
done
out="$out}"
[ "$json" = 0 ] || echo "$out"
exit $failed
