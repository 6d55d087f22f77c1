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
# Run-time EPLB copies (--eplb-redundant R): their memory comes out of the KV budget.
expect 0 "--eplb-redundant 8" "" "$EPIC" plan --model "$M" --ranks 8 --gpu-mem 141GB --eplb-redundant 8
grep -q "run-time EPLB: 8 copies per MoE layer: up to 33 experts per layer" "$tmp/out" &&
  grep -q "EPLB GB" "$tmp/out" && ok "EPLB line and column" || bad "EPLB line and column"
grep -q "EPLB GB" <("$EPIC" plan --model "$M" --ranks 8 --gpu-mem 141GB --eplb-redundant 0) &&
  bad "EPLB column with --eplb-redundant 0" || ok "no EPLB column with --eplb-redundant 0"
for r in 0 8; do
  "$EPIC" plan --model "$M" --ranks 8 --gpu-mem 141GB --eplb-redundant $r --json >"$tmp/e$r.json" 2>"$tmp/err"
done
# The default is what serve reserves on GPUs: FP8 experts with 128 x 128 blocks keep EPLB
# on, one copy per rank (8 here); the same model in BF16 has none in the fast precision,
# which is the default without the MTP layer (with it, serve's default is invariant).
"$EPIC" plan --model "$M" --ranks 8 --gpu-mem 141GB --json >"$tmp/ed.json" 2>"$tmp/err"
cmp -s "$tmp/ed.json" "$tmp/e8.json" && ok "default = --eplb-redundant 8 for FP8 experts on 8 ranks" ||
  bad "default = --eplb-redundant 8 for FP8 experts on 8 ranks"
mkdir -p "$tmp/bf16"
python3 - "$M/config.json" "$tmp/bf16/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c.pop("quantization_config", None)
json.dump(c, open(sys.argv[2], "w"))
PY
bplan() { "$EPIC" plan --model "$tmp/bf16" --ranks 8 --gpu-mem 200GB --json "$@" 2>"$tmp/err"; }
bplan --no-mtp >"$tmp/bn.json"
bplan >"$tmp/bd.json"
bplan --precision fast >"$tmp/b.json"
python3 - "$tmp/bn.json" "$tmp/bd.json" "$tmp/b.json" <<'PY' &&
import json, sys
n, d, f = (json.load(open(p))["eplb_redundant"] for p in sys.argv[1:4])
assert (n, d, f) == (0, 8, 0), (n, d, f)
PY
  ok "BF16 experts: no default copies without the MTP layer or in fast, 8 with it (invariant)" ||
  bad "BF16 experts: default copies follow the default precision"
grep -q "^GPU precision: invariant (serve's default" <("$EPIC" plan --model "$tmp/bf16" \
  --ranks 8 --gpu-mem 200GB 2>/dev/null) &&
  grep -q "^GPU precision: fast (serve's default)" <("$EPIC" plan --model "$tmp/bf16" --ranks 8 \
    --gpu-mem 200GB --no-mtp 2>/dev/null) &&
  ok "the table names the precision it assumes" || bad "the table names the precision it assumes"
# --precision: exact keeps fp32 cache rows and kv_b copies (61 + 1 MTP layers of 128 heads x
# 256 x 512 at 2 more bytes); invariant the default's bytes; both make BF16 experts
# row-invariant, so EPLB's default copies apply to them.
for p in exact invariant; do
  "$EPIC" plan --model "$tmp/bf16" --ranks 8 --gpu-mem 200GB --json --precision $p >"$tmp/b_$p.json" 2>"$tmp/err"
done
python3 - "$tmp/b.json" "$tmp/b_exact.json" "$tmp/b_invariant.json" <<'PY' &&
import json, sys
f, e, i = (json.load(open(n)) for n in sys.argv[1:4])
assert e["kv_bytes_per_token"] == 2 * f["kv_bytes_per_token"] == 2 * i["kv_bytes_per_token"]
kv_b = 62 * 128 * 256 * 512 * 2
for rf, re, ri in zip(f["ranks"], e["ranks"], i["ranks"]):
    assert re["reserve_bytes"] == rf["reserve_bytes"] + kv_b and ri["reserve_bytes"] == rf["reserve_bytes"]
assert f["eplb_redundant"] == 0 and e["eplb_redundant"] == 8 and i["eplb_redundant"] == 8
PY
  ok "--precision exact: fp32 cache and kv_b copies; exact and invariant: EPLB copies for BF16" ||
  bad "--precision exact / invariant"
expect 2 "bad --precision" "--precision: expected fast, exact or invariant, got 'fp4'" \
  "$EPIC" plan --model "$M" --ranks 8 --precision fp4
python3 - "$tmp/e0.json" "$tmp/e8.json" <<'PY' && ok "--eplb-redundant JSON: reserve = 92 experts, out of the KV budget" || bad "--eplb-redundant JSON"
import json, sys
a, b = (json.load(open(f)) for f in sys.argv[1:3])
assert a["eplb_redundant"] == 0 and b["eplb_redundant"] == 8 and b["eplb_layer_slots"] == 33
for ra, rb in zip(a["ranks"], b["ranks"]):
    assert ra["eplb_bytes"] == 0 and rb["eplb_slots"] == 60 * 33 - 32 * 59
    assert rb["eplb_bytes"] == rb["eplb_slots"] * b["weights"]["expert"]
    assert rb["kv_budget_bytes"] == ra["kv_budget_bytes"] - rb["eplb_bytes"]
PY
# A budget between the two: fits without the copies, not with them.
mem=$(python3 -c 'import json,sys; p=json.load(open(sys.argv[1])); r=p["ranks"][0]
print(r["weight_bytes"] + r["reserve_bytes"] + p["min_kv_tokens"] * p["kv_bytes_per_token"] + 2 * 10**9)' "$tmp/e0.json")
expect 0 "--gpu-mem $mem fits without EPLB copies" "" "$EPIC" plan --model "$M" --ranks 8 \
  --gpu-mem "$mem" --eplb-redundant 0
expect 1 "--gpu-mem $mem with the default copies does not fit" "GB for EPLB copies" \
  "$EPIC" plan --model "$M" --ranks 8 --gpu-mem "$mem"
expect 1 "--gpu-mem $mem with --eplb-redundant 8 does not fit" "GB for EPLB copies" \
  "$EPIC" plan --model "$M" --ranks 8 --gpu-mem "$mem" --eplb-redundant 8
expect 2 "--eplb-redundant beyond E x (N - 1)" "--eplb-redundant: 1793 is more than 1792" \
  "$EPIC" plan --model "$M" --ranks 8 --eplb-redundant 1793
expect 2 "--eplb-redundant -1" "--eplb-redundant" "$EPIC" plan --model "$M" --ranks 8 --eplb-redundant -1
# (96 GB: on 80 GB ranks the 17th expert's copies no longer leave room for the minimum KV
# cache once the model's derived kv_b and router copies are counted in the reserve)
expect 0 "hierarchical bound with --eplb-redundant, no statistics" "" \
  "$EPIC" plan --model "$M" --ranks 16 --gpu-mem 96GB --eplb-redundant 3 \
  --eplb-policy hierarchical --ranks-per-node 8
grep -q "up to 17 experts per layer" "$tmp/out" && ok "hierarchical bound: ceil((128 + 2) / 8) = 17" ||
  bad "hierarchical bound"
echo '{"layers": {"3": [1, 2]}}' >"$tmp/bad.json"
expect 1 "malformed --load-stats" "layer 3: expected an array of 256" \
  "$EPIC" plan --model "$M" --ranks 8 --load-stats "$tmp/bad.json"

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
