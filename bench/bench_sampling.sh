#!/bin/bash
# What sampled decoding costs next to greedy, end to end: `epic batch` on dummy weights
# (--load-format dummy, --mtp-draft off) runs the same N token-id prompts once greedy and
# once sampled (temperature 0.6, top_p 0.95, a seed per request: DeepSeek-R1's advice),
# and prints one JSON object: per run the seconds, completion tokens/s and the engine's
# forward seconds (the rest is host work: sampling, detokenising, scheduling), and the
# sampled run's throughput as a fraction of the greedy one's.
# Usage:
#   bench/bench_sampling.sh EPIC CONFIG_DIR TOKENIZER_DIR [LAYERS=4] [N=32] [MAX_TOKENS=64]
#                           [PROMPT_LEN=64] [EXTRA epic batch FLAGS...]
# e.g. on a GPU: bench/bench_sampling.sh build/coordinator/epic bench/configs/deepseek-v3-671b
#   ../shared/fixtures/tokenizer 4 128 64 64 --device cuda
set -u
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  usage
  exit 0
fi
if [ $# -lt 3 ]; then
  echo "bench_sampling.sh: EPIC, CONFIG_DIR and TOKENIZER_DIR are required" >&2
  usage >&2
  exit 2
fi
EPIC="$1" CFG="$2" TOK="$3"
LAYERS="${4:-4}" N="${5:-32}" MAXTOK="${6:-64}" PLEN="${7:-64}"
shift $(($# < 7 ? $# : 7))
tmp=$(mktemp -d /tmp/epic-bench-sampling-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
SCRIPT=bench_sampling.sh
. "$(dirname "$0")/batch_common.sh"
bench_model "$CFG" "$TOK" || exit 1
for mode in greedy sampled; do
  bench_requests "$CFG" "$N" "$MAXTOK" "$PLEN" "$mode" >"$tmp/$mode.in" || exit 1
  bench_batch "$mode" "$tmp/$mode.in" --load-format dummy --num-layers "$LAYERS" \
    --mtp-draft off --max-batch "$N" "$@"
done
python3 - "$tmp" "$LAYERS" "$N" "$MAXTOK" "$PLEN" <<'PY'
import json, os, sys
d = sys.argv[1]
out = {"bench": "sampling", "layers": int(sys.argv[2]), "requests": int(sys.argv[3]),
       "max_tokens": int(sys.argv[4]), "prompt_len": int(sys.argv[5]), "runs": {}}
for mode in ("greedy", "sampled"):
    s = json.load(open(os.path.join(d, mode + ".json")))
    out["runs"][mode] = {k: s[k] for k in ("seconds", "completion_tokens", "steps",
                                           "forward_seconds", "graph_record_seconds")}
    out["runs"][mode]["completion_tokens_per_s"] = round(s["completion_tokens_per_s"], 1)
    out["runs"][mode]["host_seconds"] = round(s["seconds"] - s["forward_seconds"], 6)
g, smp = out["runs"]["greedy"], out["runs"]["sampled"]
out["sampled_over_greedy"] = round(smp["completion_tokens_per_s"] / g["completion_tokens_per_s"], 3)
print(json.dumps(out))
PY
