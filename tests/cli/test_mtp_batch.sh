#!/usr/bin/env bash
# MTP speculative decoding in the batch engine (`epic batch --mtp-draft`) on the
# tiny fixture model: greedy records (content, finish reason, usage) are
# byte-identical with --mtp-draft off, 2 and auto, in one process and under
# mpirun -np 2 (expert-parallel lock-step, sequences on both ranks); sampled
# requests run with drafting; stop
# strings and max tokens cut inside accepted runs as without drafting (small
# pages: 4 tokens, so rollbacks cross page boundaries); the stats JSON reports
# the drafts. The same on a checkpoint derived so that most greedy drafts are accepted
# (tests/tools/mtp_successor.py), with `epic generate`'s ids and logits too, and on
# --load-format dummy-mtp.
# Usage: test_mtp_batch.sh EPIC FIXTURES [MPIEXEC]
set -u
EPIC="$1"
FX="$2"
MPIEXEC="${3:-}"
M="$FX/tiny-bf16"
tmp=$(mktemp -d /tmp/epic-mtp-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok - $1"; }
bad() { fail=$((fail + 1)); echo "FAILED - $1"; [ -f "$tmp/err" ] && tail -n 20 "$tmp/err" | sed 's/^/    /'; }

# Prompts of different lengths and budgets, so sequences join and leave mid-run.
: >"$tmp/greedy.jsonl"
for i in 1 2 3 4 5 6 7; do
  words=$(printf 'word%d ' $(seq 1 $((i * 3))))
  printf '{"custom_id":"g%d","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"Story %d: %s"}],"max_completion_tokens":%d,"temperature":0}}\n' \
    "$i" "$i" "$words" $((6 + i * 4)) >>"$tmp/greedy.jsonl"
done
# A stop string taken from the plain run's output is added below (s1).
: >"$tmp/sampled.jsonl"
for i in 1 2 3; do
  printf '{"custom_id":"s%d","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"Sample %d"}],"max_completion_tokens":16,"temperature":0.9,"seed":%d}}\n' \
    "$i" "$i" $((40 + i)) >>"$tmp/sampled.jsonl"
done

cat >"$tmp/cmp.py" <<'PY'
import json, sys
def load(p):
    out = {}
    for line in open(p):
        r = json.loads(line)
        b = r["response"]["body"]
        out[r["custom_id"]] = json.dumps([b["choices"], b["usage"]], sort_keys=True)
    return out
a, b = load(sys.argv[1]), load(sys.argv[2])
assert len(a) == len(b) and a.keys() == b.keys(), "different custom_ids"
for k in a:
    assert a[k] == b[k], "%s differs:\n  %s\n  %s" % (k, a[k], b[k])
PY
cat >"$tmp/stats.py" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
k, auto = int(sys.argv[2]), sys.argv[3] == "auto"
assert s["mtp_draft"] == k and s["mtp_auto"] == auto, s
assert s["mtp_drafted"] > 0 and 0 <= s["mtp_accepted"] <= s["mtp_drafted"], s
assert s["mtp_verify_steps"] > 0 and s["mtp_drafted"] <= k * s["mtp_verify_steps"], s
if auto:  # the fixture's MTP layer is untrained: every sequence stops drafting
    assert s["mtp_stopped"] > 0, s
PY

run() { # NAME INPUT MTP [launcher args...]
  local name="$1" input="$2" mtp="$3"
  shift 3
  "$@" "$EPIC" batch --model "$M" --threads 1 --page-size 4 --kv-pages 512 --step-tokens 24 \
    --prefill-chunk 7 --quiet --mtp-draft "$mtp" --input "$tmp/$input" --output "$tmp/$name.jsonl" \
    --stats-json "$tmp/$name.json" >"$tmp/out" 2>"$tmp/err"
  local rc=$?
  [ $rc -eq 0 ] && ok "$name exits 0" || bad "$name (exit $rc)"
}
same() { # DESC A B
  if python3 "$tmp/cmp.py" "$tmp/$2.jsonl" "$tmp/$3.jsonl" >"$tmp/err" 2>&1; then ok "$1"; else bad "$1"; fi
}

run off0 greedy.jsonl off
# A stop string from inside g7's plain output: drafting must cut at the same place.
stop=$(python3 -c '
import json,sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    if r["custom_id"] == "g7":
        t = r["response"]["body"]["choices"][0]["message"]["content"]
        print(json.dumps(t[len(t)//2:len(t)//2+2]))' "$tmp/off0.jsonl")
printf '{"custom_id":"stop1","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"Story 7: %s"}],"max_completion_tokens":34,"temperature":0,"stop":[%s]}}\n' \
  "$(printf 'word%d ' $(seq 1 21))" "$stop" >>"$tmp/greedy.jsonl"
run off greedy.jsonl off
for k in 2 auto; do
  run "k$k" greedy.jsonl "$k"
  same "greedy --mtp-draft $k == off (one process)" off "k$k"
  python3 "$tmp/stats.py" "$tmp/k$k.json" "$([ $k = auto ] && echo 1 || echo $k)" "$k" >"$tmp/err" 2>&1 &&
    ok "stats JSON reports --mtp-draft $k" || bad "stats JSON of --mtp-draft $k"
done
if python3 -c '
import json,sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    if r["custom_id"] == "stop1":
        sys.exit(0 if r["response"]["body"]["choices"][0]["finish_reason"] == "stop" else 1)
sys.exit(1)' "$tmp/k2.jsonl"; then ok "stop string inside a drafted run ends with stop"; else bad "stop string"; fi

run s_k2 sampled.jsonl 2
if [ -n "$MPIEXEC" ]; then
  for k in off 2 auto; do
    run "mpi_$k" greedy.jsonl "$k" "$MPIEXEC" -np 2 --oversubscribe
    same "mpirun -np 2 --mtp-draft $k == one process off" off "mpi_$k"
  done
fi
# A checkpoint whose MTP layer mostly drafts right (tests/tools/mtp_successor.py; the fixture's
# random MTP layer gets every greedy draft rejected): greedy drafts are accepted, runs of
# accepted tokens cross pages, and the records still equal off's, in one process and under
# mpirun; `epic generate` keeps plain decoding's ids and logits bit for bit.
S="$tmp/succ"
if python3 "$(dirname "$0")/../tools/mtp_successor.py" "$M" "$S" --alpha 0.03125 >"$tmp/err" 2>&1; then
  ok "derived a checkpoint whose MTP layer drafts the successor"
  M0="$M"
  M="$S"
  run succ_off greedy.jsonl off
  for k in 2 auto; do
    run "succ_$k" greedy.jsonl "$k"
    same "successor MTP: greedy --mtp-draft $k == off" succ_off "succ_$k"
  done
  python3 - "$tmp/succ_2.json" "$tmp/succ_auto.json" "$(wc -l <"$tmp/greedy.jsonl")" >"$tmp/err" 2>&1 <<'PY' &&
import json, sys
k2, auto = (json.load(open(p)) for p in sys.argv[1:3])
for s in (k2, auto):
    assert s["mtp_drafted"] > 0 and 2 * s["mtp_accepted"] > s["mtp_drafted"], s
assert auto["mtp_stopped"] < int(sys.argv[3]), auto  # drafting pays: most sequences keep it
PY
    ok "successor MTP: most drafts accepted, auto keeps drafting" ||
    bad "successor MTP: acceptance"
  if [ -n "$MPIEXEC" ]; then
    run mpi_succ_2 greedy.jsonl 2 "$MPIEXEC" -np 2 --oversubscribe
    same "successor MTP: mpirun -np 2 --mtp-draft 2 == one process off" succ_off mpi_succ_2
  fi
  M="$M0"
  for k in 0 2; do
    "$EPIC" generate --model "$S" --threads 1 --prompt-ids 0,17,5,900,33,12,401,7 --max-new-tokens 40 \
      --ignore-eos --json --mtp-draft $k --dump-logits "$tmp/gl$k.npy" >"$tmp/gen$k.json" 2>"$tmp/err" ||
      bad "generate --mtp-draft $k on the successor checkpoint"
  done
  python3 - "$tmp/gen0.json" "$tmp/gen2.json" >"$tmp/err" 2>&1 <<'PY' &&
import json, sys
a, b = (json.loads(open(p).read().strip().splitlines()[-1]) for p in sys.argv[1:3])
assert a["output_ids"] == b["output_ids"], (a["output_ids"], b["output_ids"])
assert b["mtp_acceptance_rate"] > 0.5 and b["mtp_mean_accepted"] > 1.5, b
PY
    cmp -s "$tmp/gl0.npy" "$tmp/gl2.npy" && ok "successor MTP: generate --mtp-draft 2 == 0, ids and logits" ||
    bad "successor MTP: generate --mtp-draft 2 vs 0"
else
  bad "derive the successor checkpoint"
fi
# The same made on the fly from a config (--load-format dummy-mtp, for benchmarks).
for k in off 2 auto; do
  "$EPIC" batch --model "$FX/tiny-fp8" --load-format dummy-mtp --threads 1 --quiet \
    --mtp-draft "$k" --input "$tmp/greedy.jsonl" --output "$tmp/dm_$k.jsonl" \
    --stats-json "$tmp/dm_$k.json" >"$tmp/out" 2>"$tmp/err" || bad "dummy-mtp --mtp-draft $k"
done
for k in 2 auto; do
  same "dummy-mtp: greedy --mtp-draft $k == off" dm_off "dm_$k"
done
python3 -c 'import json,sys; s=json.load(open(sys.argv[1]))
assert 2 * s["mtp_accepted"] > s["mtp_drafted"] > 0, s' \
  "$tmp/dm_auto.json" >"$tmp/err" 2>&1 && ok "dummy-mtp: most drafts accepted" ||
  bad "dummy-mtp: acceptance"
# where the seconds went: forwards within the run, the MTP layer's within them (none off)
python3 -c 'import json,sys; a, b = (json.load(open(f)) for f in sys.argv[1:])
assert 0 < a["mtp_forward_seconds"] < a["forward_seconds"] <= a["seconds"] and a["steps"] > 0, a
assert b["mtp_forward_seconds"] == 0 < b["forward_seconds"] <= b["seconds"], b
assert a["graph_record_seconds"] == b["graph_record_seconds"] == 0, (a, b)  # no graphs on CPUs' \
  "$tmp/dm_auto.json" "$tmp/dm_off.json" >"$tmp/err" 2>&1 &&
  ok "dummy-mtp: stats say where the seconds went" || bad "dummy-mtp: time breakdown"
# bench/bench_mtp_gain.sh (its GPU measurement) runs and its JSON holds: records equal; with
# two cuts, the extrapolation to the config's 3 layers is the 3-layer cut's own time.
if bash "$(dirname "$0")/../../bench/bench_mtp_gain.sh" "$EPIC" "$FX/tiny-fp8" \
  "$FX/tiny-tokenizer" 2,3 6 24 12 --threads 1 >"$tmp/gain.json" 2>"$tmp/err" &&
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); c=d["cuts"]; x=d["extrapolated"]
assert d["mtp_records_equal_invariant"] and c[0]["mtp_records_equal_invariant"], d
assert min(k["runs"]["mtp"]["mtp_acceptance_rate"] for k in c) > 0.5, d
assert x["layers"] == 3 and all(
    abs(x["runs"][n]["steady_seconds"] - c[1]["runs"][n]["steady_seconds"]) < 1e-3
    for n in ("plain", "mtp", "invariant")), d' \
    "$tmp/gain.json" >"$tmp/err" 2>&1; then
  ok "bench_mtp_gain.sh: JSON, mtp records equal invariant's, most drafts accepted, extrapolation"
else
  bad "bench_mtp_gain.sh"
fi
echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
