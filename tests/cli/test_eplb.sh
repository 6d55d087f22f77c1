#!/usr/bin/env bash
# Expert load balancing (EPLB) end to end: `epic batch` under mpirun -np NP on the
# tiny fixture model with experts re-placed every 2 steps while sequences are
# running (greedy, prefill and decode mixed) must write the same completions as
# the same job with EPLB off, and must actually have rebalanced (its log says so).
# Usage: test_eplb.sh EPIC FIXTURES MPIEXEC NP [POLICY]
set -u
EPIC="$1"
FX="$2"
MPIEXEC="$3"
NP="$4"
POLICY="${5:-global}"
M="$FX/tiny-bf16"
tmp=$(mktemp -d /tmp/epic-eplb-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
fail=0
ok() { echo "ok - $1"; }
bad() { fail=1; echo "FAILED - $1"; [ -n "${2:-}" ] && [ -f "$2" ] && tail -n 20 "$2" | sed 's/^/    /'; }

for i in $(seq 1 14); do
  printf '{"custom_id":"r%d","method":"POST","url":"/v1/completions","body":{"prompt":"Story %d: once upon a time %s","max_tokens":%d,"temperature":0}}\n' \
    "$i" "$i" "$(printf 'x%.0s' $(seq 1 $((i % 5 + 1))))" $((8 + i % 9))
done >"$tmp/in.jsonl"

run() { # OUT ERR ARGS...
  local out="$1" err="$2"
  shift 2
  "$MPIEXEC" -np "$NP" --oversubscribe "$EPIC" batch --model "$M" --threads 1 --kv-pages 256 \
    --max-batch 6 --input "$tmp/in.jsonl" --output "$out" -v "$@" 2>"$err"
}
run "$tmp/ref.jsonl" "$tmp/err0" --eplb-redundant 0
[ $? -eq 0 ] && ok "np $NP, EPLB off" || bad "np $NP, EPLB off" "$tmp/err0"
run "$tmp/out.jsonl" "$tmp/err1" --eplb-redundant $((2 * NP)) --eplb-interval 2 --eplb-policy "$POLICY"
[ $? -eq 0 ] && ok "np $NP, EPLB every 2 steps ($POLICY)" || bad "np $NP, EPLB on" "$tmp/err1"
if grep -q "eplb: step [0-9]*: rebalanced experts ($POLICY policy" "$tmp/err1"; then
  ok "rebalanced while running ($(grep -c 'rebalanced experts' "$tmp/err1") times)"
else
  bad "no rebalancing in the log" "$tmp/err1"
fi
grep -q "eplb:" "$tmp/err0" && bad "EPLB off still logged rebalancing" "$tmp/err0"
python3 - "$tmp/ref.jsonl" "$tmp/out.jsonl" <<'PY' && ok "same completions as EPLB off" || bad "completions differ"
import json, sys
def load(p):
    d = {}
    for line in open(p, encoding="utf-8"):
        r = json.loads(line)
        b = r["response"]["body"]
        d[r["custom_id"]] = ([c["text"] for c in b["choices"]], b["usage"])
    return d
a, b = load(sys.argv[1]), load(sys.argv[2])
assert len(a) == 14 and a == b, "results differ"
PY
# A bad policy is a usage error on every rank.
"$MPIEXEC" -np "$NP" --oversubscribe "$EPIC" batch --model "$M" --input "$tmp/in.jsonl" \
  --output "$tmp/x.jsonl" --eplb-policy nearest >/dev/null 2>"$tmp/err2"
rc=$?
if [ $rc -ne 0 ] && grep -q "eplb-policy: expected global or hierarchical" "$tmp/err2"; then
  ok "bad --eplb-policy rejected"
else
  bad "bad --eplb-policy (exit $rc)" "$tmp/err2"
fi
exit $fail
