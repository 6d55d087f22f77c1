#!/usr/bin/env bash
# The prefix cache end to end: `epic generate --requests` on requests that share
# prompt prefixes (two "system prompts" of several pages, whole-prompt repeats,
# a prompt equal to a shared prefix, greedy and seeded sampling) gives output
# byte-identical to --prefix-cache off for one process, under mpirun -np 2
# (sequences spread over two workers' caches), with two micro-batches, and with
# so few KV pages that cached pages are evicted and reused; and the cache was
# really hit (the run's -v summary reports hits and reused tokens), while off
# reports none.
# Usage: test_prefix.sh EPIC FIXTURES MPIEXEC [full|quick]
# quick (sanitizer builds): the single-process runs and one mpirun run.
set -u
EPIC="$1"
FX="$2"
MPIEXEC="$3"
MATRIX="${4:-full}"
M="$FX/tiny-bf16"
tmp=$(mktemp -d /tmp/epic-prefix-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok - $1"; }
bad() { fail=$((fail + 1)); echo "FAILED - $1"; [ -f "$tmp/err" ] && sed 's/^/    /' "$tmp/err" | tail -20; }

# 14 requests: prefix A (41 tokens: 5 full pages of 8 + 1), prefix B (24 tokens:
# exactly 3 pages) or none, then a suffix of 0..19 tokens of their own; request
# 6 repeats request 1's prompt, request 9 is prefix B alone.
awk 'BEGIN {
  x = 11;
  for (k = 1; k <= 41; k++) { x = (x * 1103515245 + 12345) % 2147483648; a[k] = 3 + int(x / 65536) % 1270; }
  for (k = 1; k <= 24; k++) { x = (x * 1103515245 + 12345) % 2147483648; b[k] = 3 + int(x / 65536) % 1270; }
  split("A A B A B A none B B A A B none A", pre, " ");
  split("3 11 7 19 1 0 5 16 0 8 2 13 9 6", suf, " ");
  split("6 9 4 12 7 9 5 3 8 10 1 6 4 11", nnew, " ");
  for (i = 1; i <= 14; i++) {
    ids = "";
    if (i == 6) { print line1; continue; }
    if (pre[i] == "A") for (k = 1; k <= 41; k++) ids = ids (k > 1 ? "," : "") a[k];
    if (pre[i] == "B") for (k = 1; k <= 24; k++) ids = ids (k > 1 ? "," : "") b[k];
    for (k = 1; k <= suf[i]; k++) {
      x = (x * 1103515245 + 12345) % 2147483648;
      ids = ids (ids != "" ? "," : "") 3 + int(x / 65536) % 1270;
    }
    extra = ",\"ignore_eos\":true";
    if (i % 4 == 2) extra = extra ",\"temperature\":0.8,\"top_p\":0.9,\"seed\":" (i * 7);
    if (i % 4 == 3) extra = extra ",\"temperature\":1.1,\"top_k\":30,\"seed\":" i;
    line = sprintf("{\"prompt_ids\":[%s],\"max_new_tokens\":%d%s}", ids, nnew[i], extra);
    if (i == 2) line1 = line;
    print line;
  }
}' >"$tmp/req.jsonl"

# --max-batch 2: later requests are admitted after earlier ones published their pages.
common=(--model "$M" --requests "$tmp/req.jsonl" --step-tokens 32 --prefill-chunk 16 --max-batch 2
        --page-size 8 -v)

# run NAME NP ARGS...: stdout in $tmp/NAME.out, stderr in $tmp/NAME.err (NP 0 = without mpirun).
run() {
  local name="$1" np="$2"
  shift 2
  if [ "$np" -eq 0 ]; then
    timeout 120 "$EPIC" generate "${common[@]}" "$@" >"$tmp/$name.out" 2>"$tmp/$name.err"
  else
    timeout 120 "$MPIEXEC" -np "$np" --oversubscribe "$EPIC" generate "${common[@]}" --comm mpi "$@" \
      >"$tmp/$name.out" 2>"$tmp/$name.err"
  fi
  local rc=$?
  cp "$tmp/$name.err" "$tmp/err"
  return $rc
}

# hits NAME: the reused prompt tokens the run reported (empty when no summary).
hits() { sed -n 's/.*prefix cache: \([0-9]*\) hits, \([0-9]*\) prompt tokens reused.*/\1 \2/p' "$tmp/$1.err"; }

if run off 0 --prefix-cache off; then ok "cache off"; else bad "cache off (exit $?)"; fi
[ "$(grep -c . "$tmp/off.out")" -eq 14 ] && ok "14 result lines" || bad "14 result lines"
[ -z "$(hits off)" ] && ok "cache off reports no prefix cache" || bad "cache off reports no prefix cache"

# same NAME NP ARGS...: identical output and at least one hit reusing whole pages.
same() {
  local name="$1"
  shift
  run "$name" "$@"
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    bad "$name runs (exit $rc)"
    return
  fi
  if cmp -s "$tmp/off.out" "$tmp/$name.out"; then ok "$name identical to cache off"; else
    bad "$name identical to cache off"
    diff "$tmp/off.out" "$tmp/$name.out" | head -5
  fi
  local h
  h=$(hits "$name")
  set -- $h
  if [ $# -eq 2 ] && [ "$1" -gt 0 ] && [ "$2" -ge 8 ] && [ $(($2 % 8)) -eq 0 ]; then
    ok "$name hit the cache ($1 hits, $2 tokens)"
  else
    bad "$name hit the cache (got '$h')"
  fi
}
same on 0
same evict 0 --kv-pages 16 --prefix-cache 64KiB
ev=$(sed -n 's/.*prompt tokens reused, \([0-9]*\) pages evicted.*/\1/p' "$tmp/evict.err")
[ -n "$ev" ] && [ "$ev" -gt 0 ] && ok "evict: $ev cached pages evicted" || bad "evict: cached pages evicted (got '$ev')"
same np2 2
if [ "$MATRIX" = full ]; then
  same np2_mb2 2 --micro-batches 2
fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
