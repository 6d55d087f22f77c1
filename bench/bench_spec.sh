#!/usr/bin/env bash
# MTP speculative decoding on CPU: decode tokens/s and acceptance for plain
# decoding and --mtp-draft 1 / 2 on both tiny fixtures (--threads 1, greedy,
# --ignore-eos), best of REPEAT runs each, and on checkpoints derived from them whose
# MTP layer mostly drafts right (tests/tools/mtp_successor.py, ALPHA default 1/32:
# "<fixture>-successor"; the fixtures' own MTP layers are random). Prints one JSON
# object per line:
# {"model","mtp_draft","new_tokens","decode_tokens_per_s","mtp_acceptance_rate",
#  "mtp_mean_accepted","same_output_as_plain"}
# Then the batch engine (see below). Usage:
#   [BATCH_REQS=16] bench/bench_spec.sh EPIC_BINARY FIXTURES_DIR [NEW_TOKENS=128] [REPEAT=3]
set -eu
EPIC="$1"
FX="$2"
NEW="${3:-128}"
REPEAT="${4:-3}"
prompt=0,17,5,900,33,12,401,7,7,250,1000,64,3,88,19,640
btmp=$(mktemp -d /tmp/epic-bench-spec-XXXXXX)
trap 'rm -rf "$btmp"' EXIT
declare -A dir=([tiny-bf16]="$FX/tiny-bf16" [tiny-fp8]="$FX/tiny-fp8")
models="tiny-bf16 tiny-fp8"
for m in tiny-bf16 tiny-fp8; do
  python3 "$(dirname "$0")/../tests/tools/mtp_successor.py" "$FX/$m" "$btmp/$m-successor" \
    --alpha "${ALPHA:-0.03125}" >/dev/null
  dir[$m-successor]="$btmp/$m-successor"
  models="$models $m-successor"
done
for m in $models; do
  plain_ids=""
  for k in 0 1 2; do
    best=""
    for _ in $(seq "$REPEAT"); do
      out=$("$EPIC" generate --model "${dir[$m]}" --prompt-ids "$prompt" --max-new-tokens "$NEW" --ignore-eos \
        --threads 1 --json --mtp-draft "$k")
      best=$(python3 - "$out" "$best" <<'PY'
import json, sys
cur = json.loads(sys.argv[1])
old = json.loads(sys.argv[2]) if sys.argv[2] else None
print(json.dumps(cur if old is None or cur["decode_seconds"] < old["decode_seconds"] else old))
PY
)
    done
    ids=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["output_ids"])' "$best")
    [ "$k" -eq 0 ] && plain_ids="$ids"
    python3 - "$best" "$m" "$k" "$ids" "$plain_ids" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
n = len(r["output_ids"])
# The first token comes from the prefill; decode_seconds covers the other n - 1.
print(json.dumps({"model": sys.argv[2], "mtp_draft": int(sys.argv[3]), "new_tokens": n,
                  "decode_tokens_per_s": round((n - 1) / r["decode_seconds"], 1),
                  "mtp_acceptance_rate": r["mtp_acceptance_rate"],
                  "mtp_mean_accepted": r["mtp_mean_accepted"],
                  "same_output_as_plain": sys.argv[4] == sys.argv[5]}))
PY
  done
done

# The batch engine (`epic batch --mtp-draft`): BATCH_REQS greedy requests run
# together, completion tokens/s with off, 1, 2 and auto, plus acceptance from
# the --stats-json summary, and whether every record equals the off run's. One
# JSON object per line: {"engine":"batch","model","mtp_draft","requests",
# "completion_tokens","completion_tokens_per_s","mtp_acceptance_rate",
# "mtp_mean_accepted","mtp_stopped","same_output_as_off"}
BATCH_REQS="${BATCH_REQS:-16}"
for i in $(seq 1 "$BATCH_REQS"); do
  printf '{"custom_id":"b%d","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"Request %d: %s"}],"max_completion_tokens":%d,"temperature":0}}\n' \
    "$i" "$i" "$(printf 'w%d ' $(seq 1 $((i % 7 * 4 + 2))))" "$NEW"
done >"$btmp/in.jsonl"
for m in $models; do
  for k in off 1 2 auto; do
    best=""
    for r in $(seq "$REPEAT"); do
      rm -f "$btmp/out_$k.jsonl"
      "$EPIC" batch --model "${dir[$m]}" --threads 1 --quiet --mtp-draft "$k" --input "$btmp/in.jsonl" \
        --output "$btmp/out_$k.jsonl" --stats-json "$btmp/st.json" 2>/dev/null
      best=$(python3 - "$btmp/st.json" "$best" <<'PY'
import json, sys
cur = json.load(open(sys.argv[1]))
old = json.loads(sys.argv[2]) if sys.argv[2] else None
print(json.dumps(cur if old is None or cur["seconds"] < old["seconds"] else old))
PY
)
    done
    python3 - "$best" "$m" "$k" "$btmp/out_$k.jsonl" "$btmp/out_off.jsonl" <<'PY'
import json, sys
s = json.loads(sys.argv[1])
def recs(p):
    return {r["custom_id"]: r["response"]["body"]["choices"] for r in map(json.loads, open(p))}
print(json.dumps({"engine": "batch", "model": sys.argv[2], "mtp_draft": sys.argv[3],
                  "requests": s["completed"], "completion_tokens": s["completion_tokens"],
                  "completion_tokens_per_s": round(s["completion_tokens_per_s"], 1),
                  "mtp_acceptance_rate": s["mtp_acceptance_rate"] if s["mtp_draft"] else None,
                  "mtp_mean_accepted": s["mtp_mean_accepted"] if s["mtp_draft"] else None,
                  "mtp_stopped": s["mtp_stopped"],
                  "same_output_as_off": recs(sys.argv[4]) == recs(sys.argv[5])}))
PY
  done
done
