#!/usr/bin/env bash
# Prefix cache: time to first token of requests that share a system prompt,
# without and with the cache, measured in the same run (`epic bench
# --shared-prefix`). Per setting a fresh engine first runs one request of the
# shared PREFIX tokens plus SUFFIX of its own (the system prompt seen before),
# then BATCH requests of the same prefix plus SUFFIX tokens of their own arrive
# at once; their TTFT is measured (after an untimed warm-up round of both).
# Prints epic bench's JSON object on stdout:
# {"bench":"prefix_cache",...,"results":[{"prefix_cache":"off","ttft_ms_p50","ttft_ms_p90",
#  "prompt_tokens","prefix_hits","prefix_hit_tokens",...},{"prefix_cache":"on",...}],
#  "ttft_p50_speedup","ttft_p90_speedup"}
# Usage: bench/bench_prefix.sh EPIC_BINARY FIXTURES_DIR [BATCH=16] [PREFIX=1024] [SUFFIX=32]
#        [more epic bench flags, e.g. --threads 2 or --model DIR --load-format dummy ...]
# Default model: FIXTURES_DIR/tiny-fp8, --threads 1 (2 threads on a loaded 2-core box mostly measure
# descheduled thread-pool barriers), 4 output tokens per request.
set -eu
EPIC="$1"
FX="$2"
BATCH="${3:-16}"
PREFIX="${4:-1024}"
SUFFIX="${5:-32}"
shift $(($# < 5 ? $# : 5))
exec "$EPIC" bench --model "$FX/tiny-fp8" --threads 1 --micro-batches 1 --gen 4 \
  --batch "$BATCH" --shared-prefix "$PREFIX" --prompt-len "$SUFFIX" "$@"
