#!/usr/bin/env bash
# End-to-end checks of `epic plan` on the real 671B config (config.json only, no weights).
# Usage: test_plan.sh EPIC CONFIG_DIR
set -u
EPIC="$1"
M="$2"
tmp=$(mktemp -d /tmp/epic-plan-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok - $1"; }
bad() { fail=$((fail + 1)); echo "FAILED - $1"; sed 's/^/    /' "$tmp/err" "$tmp/out" | head -20; }

# expect RC NAME PATTERN(stderr, or '' for none) CMD...
expect() {
  local want="$1" name="$2" pat="$3"; shift 3
  "$@" >"$tmp/out" 2>"$tmp/err"
  local rc=$?
  if [ $rc -ne "$want" ]; then bad "$name (exit $rc, want $want)"; return; fi
  if [ -n "$pat" ] && ! grep -qE -- "$pat" "$tmp/err"; then bad "$name (stderr does not match /$pat/)"; return; fi
  ok "$name"
}

expect 0 "plan --help" "" "$EPIC" plan --help
expect 0 "8 x 141GB fits" "" "$EPIC" plan --model "$M" --ranks 8 --gpu-mem 141GB
grep -q "FITS" "$tmp/out" && ok "8 x 141GB table says FITS" || bad "8 x 141GB table says FITS"
expect 1 "8 x 80GB does not fit" "does not fit: rank [0-9]+ needs [0-9.]+ GB of weights.*--gpu-mem 80GB" \
  "$EPIC" plan --model "$M" --ranks 8 --gpu-mem 80GB
expect 0 "16 x 80GiB fits" "" "$EPIC" plan --model "$M" --ranks 16 --gpu-mem 80GiB
expect 0 "--json" "" "$EPIC" plan --model "$M" --ranks 8 --gpu-mem 141GB --json
if python3 -m json.tool "$tmp/out" >/dev/null 2>&1 && [ "$(grep -c . "$tmp/out")" -eq 1 ]; then
  ok "--json is one valid JSON object"
else
  bad "--json is one valid JSON object"
fi
python3 - "$tmp/out" <<'PY' && ok "--json numbers" || bad "--json numbers"
import json, sys
p = json.load(open(sys.argv[1]))
assert p["weights"]["total"] == 688574839360, p["weights"]["total"]
assert p["weights"]["n_tensors"] == 91991
assert p["fits"] is True and p["n_ranks"] == 8 and p["gpu_mem_bytes"] == 141 * 10**9
assert len(p["ranks"]) == 8 and p["placement"][0]["ranks"][1] == "32-63"
PY
# Sizes: G is GiB, GB is 10^9, fractions and plain bytes are accepted.
for s in "80G:85899345920" "80GiB:85899345920" "1.5TiB:1649267441664" "141gb:141000000000" "85899345920:85899345920"; do
  "$EPIC" plan --model "$M" --ranks 16 --gpu-mem "${s%%:*}" --json >"$tmp/out" 2>"$tmp/err"
  if grep -q "\"gpu_mem_bytes\":${s##*:}," "$tmp/out"; then ok "--gpu-mem ${s%%:*}"; else bad "--gpu-mem ${s%%:*}"; fi
done
for v in 80XB abc -5GB 0 0x10GB ""; do
  expect 2 "bad --gpu-mem '$v'" "--gpu-mem" "$EPIC" plan --model "$M" --ranks 8 --gpu-mem "$v"
done
expect 2 "--ranks 0" "--ranks" "$EPIC" plan --model "$M" --ranks 0
expect 2 "--redundant without --load-stats" "--load-stats" "$EPIC" plan --model "$M" --ranks 8 --redundant 4
# Redundancy from load statistics: skewed counts, the balance line is printed.
python3 - "$tmp/stats.json" <<'PY'
import json, sys
layers = {str(l): [100000 // (1 + (e * 37 + l) % 256) for e in range(256)] for l in range(3, 62)}
json.dump({"layers": layers}, open(sys.argv[1], "w"))
PY
expect 0 "--redundant 32 --load-stats" "" "$EPIC" plan --model "$M" --ranks 8 --gpu-mem 141GB \
  --redundant 32 --load-stats "$tmp/stats.json"
grep -q "expert load" "$tmp/out" && ok "balance line" || bad "balance line"
echo '{"layers": {"3": [1, 2]}}' >"$tmp/bad.json"
expect 1 "malformed --load-stats" "layer 3: expected an array of 256" \
  "$EPIC" plan --model "$M" --ranks 8 --load-stats "$tmp/bad.json"

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
