#!/usr/bin/env bash
# epic-grpc-probe against a real `epic serve` (one process): health, and a greedy
# Generate whose ids equal `epic generate`'s; a closed port and a bad argument fail with
# one line. Usage: test_grpc_probe.sh EPIC PROBE FIXTURES_DIR
set -u
EPIC="$1"
PROBE="$2"
FX="$3"
tmp=$(mktemp -d /tmp/epic-probe-XXXXXX)
spid=""
cleanup() {
  if [ -n "$spid" ]; then kill -TERM "$spid" 2>/dev/null; wait "$spid" 2>/dev/null; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok - $1"; }
bad() { fail=$((fail + 1)); echo "FAILED - $1"; [ -s "$tmp/err" ] && sed 's/^/    /' "$tmp/err" | tail -n 10; return 0; }
ids_of() { sed -n 's/.*"output_ids":\[\([0-9,]*\)\].*/\1/p' "$1" | head -n1; }

"$EPIC" generate --model "$FX/tiny-bf16" --prompt-ids 0,10,20,30 --max-new-tokens 7 --ignore-eos --json \
  >"$tmp/ref.json" 2>"$tmp/err" || bad "reference generate"
"$EPIC" serve --model "$FX/tiny-bf16" --listen 127.0.0.1:0 --kv-pages 64 >"$tmp/serve.out" 2>"$tmp/serve.err" &
spid=$!
addr=""
for _ in $(seq 600); do
  addr=$(sed -n 's/^epic serve: listening on \([^ ]*\).*/\1/p' "$tmp/serve.out")
  [ -n "$addr" ] && break
  kill -0 "$spid" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$addr" ]; then
  cp "$tmp/serve.err" "$tmp/err"
  bad "epic serve did not start"
  echo "$pass passed, $fail failed"
  exit 1
fi

# Without --step-tokens the banner names the backend's default step (epic_ops_step_tokens:
# 2048 on a CPU, 8192 on a GPU) and the prefill chunk follows it.
if grep -Eq 'step_tokens (2048, prefill_chunk 2048|8192, prefill_chunk 8192),' "$tmp/serve.out"; then
  ok "default step budget: $(grep -o 'step_tokens [0-9]*' "$tmp/serve.out")"
else
  bad "default step budget in the banner: $(grep 'step_tokens' "$tmp/serve.out")"
fi

if "$PROBE" "$addr" --prompt-ids 0,10,20,30 --max-tokens 7 >"$tmp/probe.json" 2>"$tmp/err" &&
   [ -n "$(ids_of "$tmp/probe.json")" ] && [ "$(ids_of "$tmp/probe.json")" = "$(ids_of "$tmp/ref.json")" ] &&
   grep -q '"finish_reason":"length"' "$tmp/probe.json"; then
  ok "Generate over gRPC equals epic generate: [$(ids_of "$tmp/probe.json")]"
else
  bad "Generate over gRPC: $(cat "$tmp/probe.json") vs $(cat "$tmp/ref.json")"
fi
"$PROBE" "$addr" --health-only >"$tmp/out" 2>"$tmp/err" && grep -q '"health":"SERVING"' "$tmp/out" &&
  ok "health: SERVING" || bad "health"

# A port nobody listens on: the one this server used, after it is gone.
kill -TERM "$spid"
wait "$spid"
spid=""
"$PROBE" "$addr" --health-only --timeout 5 >"$tmp/out" 2>"$tmp/err"
rc=$?
[ $rc -eq 1 ] && [ "$(grep -c . "$tmp/err")" -ge 1 ] && grep -q "$addr /grpc.health.v1.Health/Check: " "$tmp/err" &&
  ok "no server: exit 1 naming the address and method" || bad "no server (exit $rc)"
"$PROBE" "$addr" --max-tokens 0 >"$tmp/out" 2>"$tmp/err"
rc=$?
[ $rc -eq 2 ] && grep -q -- "--max-tokens: expected a positive integer, got '0'" "$tmp/err" &&
  ok "bad --max-tokens: exit 2 naming the flag" || bad "bad --max-tokens (exit $rc)"

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
