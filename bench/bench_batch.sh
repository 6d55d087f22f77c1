#!/usr/bin/env bash
# bench_batch: `epic batch` throughput. Builds N chat requests (greedy,
# ignore_eos, MAX_TOKENS new tokens each), runs them once one at a time
# (--max-batch 1) and once all together (the default scheduling), and prints
# one JSON object: per run the job's own counters from --stats-json (seconds
# from the first request read to the last record synced, model load excluded)
# and the process wall time, plus the speed-up of batching.
#
#   bench/bench_batch.sh EPIC MODEL_DIR [N=64] [MAX_TOKENS=32] [THREADS=1] [EXTRA_FLAGS...]
set -eu
EPIC="$1"
MODEL="$2"
N="${3:-64}"
MAXTOK="${4:-32}"
THREADS="${5:-1}"
shift $(($# < 5 ? $# : 5))
tmp=$(mktemp -d /tmp/epic-bench-batch-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
for i in $(seq 1 "$N"); do
  printf '{"custom_id":"r%d","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"Request number %d: tell me something."}],"max_tokens":%d,"temperature":0,"ignore_eos":true}}\n' \
    "$i" "$i" "$MAXTOK"
done >"$tmp/in.jsonl"

run() { # run NAME FLAGS...: one job from scratch; prints "NAME": {...}
  local name="$1"; shift
  local t0 t1
  t0=$(date +%s%N)
  "$EPIC" batch --model "$MODEL" --input "$tmp/in.jsonl" --output "$tmp/$name.jsonl" --threads "$THREADS" \
    --quiet --stats-json "$tmp/$name.json" "$@" 2>"$tmp/$name.err" || { cat "$tmp/$name.err" >&2; exit 1; }
  t1=$(date +%s%N)
  printf '"%s": {"wall_seconds": %d.%03d, "job": %s}' "$name" $(((t1 - t0) / 1000000000)) \
    $((((t1 - t0) / 1000000) % 1000)) "$(tr -d '\n' <"$tmp/$name.json")"
}

seq1=$(run sequential --max-batch 1 "$@")
all=$(run batched "$@")
rps() { sed -n 's/.*"requests_per_s": \([0-9.]*\).*/\1/p' "$tmp/$1.json"; }
printf '{"bench": "batch", "model": "%s", "requests": %d, "max_tokens": %d, "threads": %d, %s, %s, "batching_speedup": %s}\n' \
  "$MODEL" "$N" "$MAXTOK" "$THREADS" "$seq1" "$all" "$(awk -v a="$(rps batched)" -v b="$(rps sequential)" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')"
