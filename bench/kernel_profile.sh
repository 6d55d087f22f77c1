#!/bin/bash
# Where a model step's GPU time goes (issue #7): bench_model under ncu, every kernel launch
# timed alone (gpu__time_duration), summed per kernel by bench/kernel_profile.py for the
# whole run (prefill, then decode) and for the last decode step. Decode steps run without
# graphs here (--cuda-graphs off), so that each kernel is its own launch.
#
# Usage: bench/kernel_profile.sh BUILD_DIR OUT_DIR [bench_model options...]
#   options default to: --model bench/configs/deepseek-v3-671b --load-format dummy
#   --num-layers 4 --batch 32 --prompt-len 1024 --decode-steps 2; --device cuda is added.
# Writes OUT_DIR/ncu.csv, OUT_DIR/all.json and OUT_DIR/last_step.json (tables on stderr).
# ncu flushes the caches before every kernel: memory-bound kernels read slower than inside
# a step, so take the shares as where the time goes, not as step times.
set -euo pipefail
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  usage
  exit 0
fi
if [ $# -lt 2 ]; then
  usage >&2
  exit 2
fi
BUILD=$1 OUT=$2
shift 2
BIN=$BUILD/bench/bench_model
[ -x "$BIN" ] || { echo "kernel_profile.sh: $BIN not found (build with -DEPIC_CUDA=ON)" >&2; exit 2; }
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1 || true)
[ -n "$NCU" ] || { echo "kernel_profile.sh: ncu (Nsight Compute) not found" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
if [ $# -eq 0 ]; then
  set -- --model "$HERE/configs/deepseek-v3-671b" --load-format dummy --num-layers 4 \
    --batch 32 --prompt-len 1024 --decode-steps 2
fi
mkdir -p "$OUT"
"$NCU" --clock-control none --metrics gpu__time_duration.sum --csv \
  "$BIN" "$@" --device cuda --cuda-graphs off > "$OUT/ncu.csv" 2> "$OUT/ncu.err" || {
  echo "kernel_profile.sh: ncu failed (rc $?): see $OUT/ncu.err" >&2
  exit 1
}
python3 "$HERE/kernel_profile.py" "$OUT/ncu.csv" > "$OUT/all.json"
python3 "$HERE/kernel_profile.py" "$OUT/ncu.csv" --last-step > "$OUT/last_step.json"
echo "kernel_profile.sh: $OUT/all.json, $OUT/last_step.json" >&2
