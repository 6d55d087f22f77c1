#!/usr/bin/env bash
# `epic generate --mtp-draft K` end to end: the same output_ids as plain greedy
# decoding on both tiny fixtures (K = 1 and 2, pages of 3 and 64 tokens), the same
# --dump-logits file byte for byte (a row per processed position, verify rows
# included), the JSON reports mtp_draft / mtp_acceptance_rate / mtp_mean_accepted, and
# --mtp-draft with --requests or out of range is a clear error.
# Usage: test_spec.sh EPIC FIXTURES
set -u
EPIC="$1"
FX="$2"
tmp=$(mktemp -d /tmp/epic-spec-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok - $1"; }
bad() { fail=$((fail + 1)); echo "FAILED - $1"; [ -f "$tmp/err" ] && sed 's/^/    /' "$tmp/err" | tail -20; }
ids() { sed -n 's/.*"output_ids":\(\[[0-9,]*\]\).*/\1/p' "$1"; }

prompt=0,17,5,900,33,12,401,7,7,250,1000,64,3
for m in tiny-bf16 tiny-fp8; do
  for ps in 3 64; do
    base=(generate --model "$FX/$m" --prompt-ids "$prompt" --max-new-tokens 12 --ignore-eos --json --page-size "$ps")
    if ! timeout 60 "$EPIC" "${base[@]}" --dump-logits "$tmp/plain.npy" >"$tmp/plain.json" 2>"$tmp/err"; then
      bad "$m page $ps: plain generate"
      continue
    fi
    for k in 1 2; do
      if ! timeout 60 "$EPIC" "${base[@]}" --mtp-draft "$k" --dump-logits "$tmp/spec.npy" \
        >"$tmp/spec.json" 2>"$tmp/err"; then
        bad "$m page $ps: --mtp-draft $k"
        continue
      fi
      p=$(ids "$tmp/plain.json")
      s=$(ids "$tmp/spec.json")
      if [ -n "$p" ] && [ "$p" = "$s" ]; then ok "$m page $ps --mtp-draft $k: output_ids equal plain"; else
        echo "    plain $p" >"$tmp/err"; echo "    spec  $s" >>"$tmp/err"; bad "$m page $ps --mtp-draft $k: output_ids differ"; fi
      if cmp -s "$tmp/plain.npy" "$tmp/spec.npy"; then ok "$m page $ps --mtp-draft $k: logits dump equals plain"; else
        cmp "$tmp/plain.npy" "$tmp/spec.npy" >"$tmp/err" 2>&1; bad "$m page $ps --mtp-draft $k: logits dump differs"; fi
      if grep -q "\"mtp_draft\":$k,\"mtp_acceptance_rate\":[0-9.]*,\"mtp_mean_accepted\":[0-9.]*" "$tmp/spec.json"; then
        ok "$m page $ps --mtp-draft $k: JSON has the MTP fields"
      else
        cp "$tmp/spec.json" "$tmp/err"; bad "$m page $ps --mtp-draft $k: MTP fields missing"
      fi
    done
  done
done
if grep -q '"mtp_draft":0,"mtp_acceptance_rate":null,"mtp_mean_accepted":null' "$tmp/plain.json"; then
  ok "plain run reports mtp_draft 0"; else cp "$tmp/plain.json" "$tmp/err"; bad "plain run: MTP fields"; fi

echo '{"prompt_ids":[0,5],"max_new_tokens":2}' >"$tmp/req.jsonl"
if ! "$EPIC" generate --model "$FX/tiny-bf16" --requests "$tmp/req.jsonl" --mtp-draft 1 >/dev/null 2>"$tmp/err" &&
  grep -q -- "--mtp-draft cannot be combined with --requests" "$tmp/err"; then
  ok "--mtp-draft with --requests is an error"; else bad "--mtp-draft with --requests"; fi
if ! "$EPIC" generate --model "$FX/tiny-bf16" --prompt-ids 0,5 --mtp-draft 99 >/dev/null 2>"$tmp/err" &&
  grep -q -- "--mtp-draft" "$tmp/err"; then
  ok "--mtp-draft 99 is an error naming the flag"; else bad "--mtp-draft 99"; fi

echo "# $pass passed, $fail failed"
[ "$fail" -eq 0 ]
