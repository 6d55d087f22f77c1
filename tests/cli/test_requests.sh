#!/usr/bin/env bash
# `epic generate --requests FILE.jsonl` end to end on the tiny fixture:
#   - 16 requests of different prompt lengths, max_new_tokens and sampling give
#     byte-identical output for one process and mpirun -np 1..4 (--comm mpi),
#     -np 2 and 3 with --comm ucx, and --micro-batches 1 and 2 (quick: one
#     process, -np 2 mpi, -np 2 ucx with 2 micro-batches); the output has
#     one line per request in input order; greedy lines equal the single-prompt
#     path (--prompt-ids);
#   - malformed lines are errors naming the line and field, before any compute;
#   - a bad --comm value is an error before loading.
# Usage: test_requests.sh EPIC FIXTURES MPIEXEC UCX(0|1) [full|quick]
# quick (sanitizer builds, where every rank runs ~10x slower): fewer launches.
set -u
EPIC="$1"
FX="$2"
MPIEXEC="$3"
UCX="$4"
MATRIX="${5:-full}"
M="$FX/tiny-bf16"
tmp=$(mktemp -d /tmp/epic-requests-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok - $1"; }
bad() { fail=$((fail + 1)); echo "FAILED - $1"; [ -f "$tmp/err" ] && sed 's/^/    /' "$tmp/err" | tail -20; }

# 16 requests: prompt lengths 1..150, max_new_tokens 1..24, greedy and seeded
# sampling, one stopping at EOS allowed (no ignore_eos), one with 0 new tokens.
awk 'BEGIN {
  split("1 2 3 5 8 13 21 34 55 89 150 7 40 1 17 64", len, " ");
  split("8 24 1 16 5 12 9 3 20 6 4 11 0 24 7 10", nnew, " ");
  x = 7;
  for (i = 1; i <= 16; i++) {
    ids = "";
    for (k = 1; k <= len[i]; k++) {
      x = (x * 1103515245 + 12345) % 2147483648;
      id = (k == 1 && len[i] > 1) ? 0 : 3 + int(x / 65536) % 1270;
      ids = ids (k > 1 ? "," : "") id;
    }
    extra = "";
    if (i % 4 == 2) extra = ",\"temperature\":0.8,\"top_p\":0.9,\"seed\":" (i * 11);
    if (i % 4 == 3) extra = ",\"temperature\":1.2,\"top_k\":20,\"seed\":" i;
    if (i != 5) extra = extra ",\"ignore_eos\":true";
    printf "{\"prompt_ids\":[%s],\"max_new_tokens\":%d%s}\n", ids, nnew[i], extra;
    if (i == 8) printf "\n";   # blank lines are skipped
  }
}' >"$tmp/req.jsonl"

common=(--model "$M" --requests "$tmp/req.jsonl" --step-tokens 40 --prefill-chunk 16 --max-batch 6 --page-size 8)

# run NAME NP CMD-ARGS...: output in $tmp/NAME.out (NP 0 = without mpirun).
run() {
  local name="$1" np="$2"
  shift 2
  if [ "$np" -eq 0 ]; then
    timeout 120 "$EPIC" generate "${common[@]}" "$@" >"$tmp/$name.out" 2>"$tmp/err"
  else
    timeout 120 "$MPIEXEC" -np "$np" --oversubscribe "$EPIC" generate "${common[@]}" "$@" \
      >"$tmp/$name.out" 2>"$tmp/err"
  fi
}

if run ref 0; then ok "single process"; else bad "single process (exit $?)"; fi
lines=$(grep -c . "$tmp/ref.out")
idx=$(grep -o '"index":[0-9]*' "$tmp/ref.out" | cut -d: -f2 | tr '\n' ' ')
if [ "$lines" -eq 16 ] && [ "$idx" = "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 " ]; then
  ok "one line per request, in input order"
else
  bad "one line per request, in input order ($lines lines, indices $idx)"
fi
grep -q '"index":12,"prompt_ids":\[[0-9,]*\],"output_ids":\[\],"finish_reason":"length"' "$tmp/ref.out" \
  && ok "max_new_tokens 0" || bad "max_new_tokens 0"
grep -q '"index":1,.*"output_ids":\[[0-9]*\(,[0-9]*\)\{23\}\],"finish_reason":"length","text":' "$tmp/ref.out" \
  && ok "24 tokens and text" || bad "24 tokens and text"

# Greedy requests agree with the single-prompt path.
for i in 0 3; do
  line=$(sed -n "$((i + 1))p" "$tmp/ref.out")
  pids=$(echo "$line" | sed 's/.*"prompt_ids":\[\([0-9,]*\)\].*/\1/')
  want=$(echo "$line" | sed 's/.*"output_ids":\[\([0-9,]*\)\].*/\1/')
  n=$(echo "$want" | tr ',' '\n' | grep -c .)
  got=$("$EPIC" generate --model "$M" --prompt-ids "$pids" --max-new-tokens "$n" --ignore-eos --json 2>/dev/null |
        sed 's/.*"output_ids":\[\([0-9,]*\)\].*/\1/')
  [ -n "$want" ] && [ "$got" = "$want" ] && ok "request $i equals --prompt-ids" || bad "request $i equals --prompt-ids ($got vs $want)"
done

# Same bytes for every world size, backend and micro-batching.
same() {
  local name="$1"
  shift
  if run "$name" "$@" && cmp -s "$tmp/ref.out" "$tmp/$name.out"; then
    ok "$name identical"
  else
    bad "$name identical"
    diff "$tmp/ref.out" "$tmp/$name.out" | head -5
  fi
}
same mb2 0 --micro-batches 2
if [ "$MATRIX" = full ]; then
  for np in 1 2 3 4; do same "np${np}_mpi" "$np" --comm mpi; done
  same np2_mpi_mb2 2 --comm mpi --micro-batches 2
  same np4_mpi_mb2 4 --comm mpi --micro-batches 2 --max-batch 16
  [ "$UCX" = 1 ] && same np2_ucx 2 --comm ucx
  [ "$UCX" = 1 ] && same np3_ucx_mb2 3 --comm ucx --micro-batches 2
else
  same np2_mpi 2 --comm mpi
  [ "$UCX" = 1 ] && same np2_ucx_mb2 2 --comm ucx --micro-batches 2
fi

# Malformed files: one error line naming the line and field, non-zero exit.
# expect_bad NAME PATTERN FILE-CONTENT
expect_bad() {
  printf '%b' "$3" >"$tmp/bad.jsonl"
  timeout 60 "$EPIC" generate --model "$M" --requests "$tmp/bad.jsonl" >"$tmp/out" 2>"$tmp/err"
  local rc=$?
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && grep -qE -- "$2" "$tmp/err" && [ ! -s "$tmp/out" ]; then
    ok "$1"
  else
    bad "$1 (exit $rc, want /$2/)"
  fi
}
good='{"prompt_ids":[0,5],"max_new_tokens":2}\n'
expect_bad "malformed JSON" "line 2: malformed JSON" "$good{\"prompt_ids\":[1,2\n"
expect_bad "missing prompt_ids" 'line 1: "prompt_ids": missing' '{"max_new_tokens":3}\n'
expect_bad "token id out of range" 'line 3: "prompt_ids": item 2 is not a token id' \
  "$good\n{\"prompt_ids\":[0,99999]}\n"
expect_bad "bad max_new_tokens" 'line 2: "max_new_tokens": expected an integer' \
  "$good{\"prompt_ids\":[0],\"max_new_tokens\":\"x\"}\n"
expect_bad "bad top_p" 'line 1: "top_p"' '{"prompt_ids":[0],"top_p":0}\n'
expect_bad "bad ignore_eos" 'line 1: "ignore_eos"' '{"prompt_ids":[0],"ignore_eos":1}\n'
expect_bad "unknown field" 'line 2: "max_tokens": unknown field' "$good{\"prompt_ids\":[0],\"max_tokens\":3}\n"
expect_bad "not an object" 'line 1: expected a JSON object' '[1,2,3]\n'
expect_bad "context exceeded" 'line 1: "max_new_tokens": prompt' '{"prompt_ids":[0],"max_new_tokens":1000000000}\n'
expect_bad "empty file" "no requests" '\n\n'
printf '%b' "$good{\"prompt_ids\":[0],\"seed\":-1}\n" >"$tmp/bad.jsonl"
start=$(date +%s)
timeout 60 "$MPIEXEC" -np 2 --oversubscribe "$EPIC" generate --model "$M" --requests "$tmp/bad.jsonl" \
  >"$tmp/out" 2>"$tmp/err"
rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && grep -q 'line 2: "seed"' "$tmp/err"; then
  ok "malformed line under mpirun ($(( $(date +%s) - start )) s)"
else
  bad "malformed line under mpirun (exit $rc)"
fi
"$EPIC" generate --model "$M" --requests "$tmp/req.jsonl" --comm carrier-pigeon >"$tmp/out" 2>"$tmp/err"
rc=$?
if [ "$rc" -eq 2 ] && grep -q -- "--comm: expected auto, mpi, ucx or nccl, got 'carrier-pigeon'" "$tmp/err"; then
  ok "bad --comm"
else
  bad "bad --comm (exit $rc)"
fi
"$EPIC" generate --model "$M" --requests "$tmp/req.jsonl" --prompt-ids 1 >"$tmp/out" 2>"$tmp/err"
[ $? -eq 2 ] && grep -q "cannot be combined with --requests" "$tmp/err" && ok "--requests excludes --prompt-ids" \
  || bad "--requests excludes --prompt-ids"

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
