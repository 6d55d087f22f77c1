#!/usr/bin/env bash
# End-to-end tests of the `epic` command line: help, flag validation, loader
# errors on damaged checkpoints (one clear line naming the file/tensor, non-zero
# exit, never a crash), dummy weights, text prompts. Usage: test_cli.sh EPIC FIXTURES
set -u
EPIC="$1"
FX="$2"
tmp=$(mktemp -d /tmp/epic-cli-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
pass=0
fail=0

ok() { pass=$((pass + 1)); echo "ok - $1"; }
bad() { fail=$((fail + 1)); echo "FAILED - $1"; [ -f "$tmp/err" ] && sed 's/^/    /' "$tmp/err"; }

# expect_error NAME PATTERN CMD...: exit code 1 or 2, stderr one line matching PATTERN, no crash.
expect_error() {
  local name="$1" pat="$2"; shift 2
  "$@" >"$tmp/out" 2>"$tmp/err"
  local rc=$?
  local lines
  lines=$(grep -c . "$tmp/err")
  if { [ $rc -eq 1 ] || [ $rc -eq 2 ]; } && [ "$lines" -eq 1 ] && grep -qE -- "$pat" "$tmp/err"; then
    ok "$name"
  else
    bad "$name (exit $rc, $lines stderr lines, want /$pat/)"
  fi
}

expect_ok() {
  local name="$1"; shift
  if "$@" >"$tmp/out" 2>"$tmp/err"; then ok "$name"; else bad "$name (exit $?)"; fi
}

# copy_model SRC DST: a writable copy of a fixture checkpoint.
copy_model() { mkdir -p "$2"; cp "$1"/*.json "$1"/*.safetensors "$2"/; chmod -R u+w "$2"; }

expect_ok "epic --help" "$EPIC" --help
expect_ok "epic --version" "$EPIC" --version
expect_ok "generate --help" "$EPIC" generate --help
grep -q -- "--max-new-tokens" "$tmp/out" && ok "help lists flags" || bad "help lists flags"
expect_error "unknown command" "unknown command 'frobnicate'" "$EPIC" frobnicate
expect_error "missing --model" "--model DIR is required" "$EPIC" generate --prompt-ids 1
expect_error "bad --max-new-tokens" "--max-new-tokens: expected an integer" \
  "$EPIC" generate --model "$FX/tiny-bf16" --prompt-ids 1 --max-new-tokens abc
expect_error "negative --temperature" "--temperature: -1 is out of range" \
  "$EPIC" generate --model "$FX/tiny-bf16" --prompt-ids 1 --temperature -1
expect_error "prompt id out of vocab" "--prompt-ids: item 2 \('99999'\) is not a token id" \
  "$EPIC" generate --model "$FX/tiny-bf16" --prompt-ids 1,99999
expect_error "missing model dir" "/nonexistent.*config.json" "$EPIC" generate --model /nonexistent --prompt-ids 1
expect_error "plan does not fit --mem-per-rank" "does not fit: rank 0 needs .*--mem-per-rank" \
  "$EPIC" generate --model "$FX/tiny-bf16" --prompt-ids 1 --mem-per-rank 1MB
expect_error "bad --mem-per-rank" "--mem-per-rank" \
  "$EPIC" generate --model "$FX/tiny-bf16" --prompt-ids 1 --mem-per-rank lots
expect_error "bad --precision" "--precision: expected fast, exact or invariant, got 'fp4'" \
  "$EPIC" generate --model "$FX/tiny-bf16" --prompt-ids 1 --precision fp4
grep -q -- "--precision P" <("$EPIC" serve --help) && ok "serve --help lists --precision" ||
  bad "serve --help lists --precision"
# On a CPU rank every precision computes the same fp32 rows: the same logits.
for p in fast invariant; do
  expect_ok "--precision $p on the CPU" "$EPIC" generate --model "$FX/tiny-bf16" --device cpu \
    --prompt-ids 1,2,3 --max-new-tokens 3 --precision $p --dump-logits "$tmp/prec_$p.npy"
done
cmp -s "$tmp/prec_fast.npy" "$tmp/prec_invariant.npy" && ok "CPU logits equal under every --precision" ||
  bad "CPU logits equal under every --precision"

m="$tmp/trunc"; copy_model "$FX/tiny-bf16" "$m"
truncate -s 1000000 "$m/model-00002-of-00002.safetensors"
expect_error "truncated shard" "model-00002-of-00002.safetensors" "$EPIC" generate --model "$m" --prompt-ids 1

m="$tmp/badcfg"; copy_model "$FX/tiny-bf16" "$m"
printf '{"hidden_size": 256, ' >"$m/config.json"
expect_error "malformed config.json" "config.json" "$EPIC" generate --model "$m" --prompt-ids 1

m="$tmp/cfgtype"; copy_model "$FX/tiny-bf16" "$m"
sed -i 's/"hidden_size": 256/"hidden_size": "wide"/' "$m/config.json"
expect_error "config field of wrong type" "hidden_size" "$EPIC" generate --model "$m" --prompt-ids 1

m="$tmp/badshape"; copy_model "$FX/tiny-bf16" "$m"
sed -i 's/"intermediate_size": 384/"intermediate_size": 320/' "$m/config.json"
expect_error "wrong tensor shape" "mlp.gate_proj.weight.*\[320, 256\]|\[320, 256\].*mlp.gate_proj.weight" \
  "$EPIC" generate --model "$m" --prompt-ids 1

# rename_tensor DIR OLD NEW: rename a tensor in its shard header (same length,
# in place) and in the index, so the checkpoint is consistent but lacks OLD.
rename_tensor() {
  python3 - "$1" "$2" "$3" <<'PY'
import json, os, sys
d, old, new = sys.argv[1:]
assert len(old) == len(new)
ip = os.path.join(d, "model.safetensors.index.json"); idx = json.load(open(ip))
shard = os.path.join(d, idx["weight_map"].pop(old)); idx["weight_map"][new] = os.path.basename(shard)
json.dump(idx, open(ip, "w"))
b = open(shard, "rb").read(); key = ('"%s"' % old).encode()
assert b.count(key) == 1
open(shard, "wb").write(b.replace(key, ('"%s"' % new).encode()))
PY
}
m="$tmp/missing"; copy_model "$FX/tiny-bf16" "$m"
rename_tensor "$m" model.layers.1.mlp.experts.7.up_proj.weight model.layers.1.mlp.experts.7.up_proj.weighX
expect_error "missing tensor" "model.layers.1.mlp.experts.7.up_proj.weight" "$EPIC" generate --model "$m" --prompt-ids 1

m="$tmp/unlisted"; copy_model "$FX/tiny-bf16" "$m"
python3 - "$m/model.safetensors.index.json" <<'PY'
import json, sys
p = sys.argv[1]; d = json.load(open(p))
d["weight_map"]["model.layers.0.self_attn.extra.weight"] = "model-00001-of-00002.safetensors"
json.dump(d, open(p, "w"))
PY
expect_error "index names a tensor its shard lacks" "model.layers.0.self_attn.extra.weight" \
  "$EPIC" generate --model "$m" --prompt-ids 1

m="$tmp/badhdr"; copy_model "$FX/tiny-bf16" "$m"
python3 - "$m/model-00001-of-00002.safetensors" <<'PY'
import struct, sys
p = sys.argv[1]; b = bytearray(open(p, "rb").read())
b[0:8] = struct.pack("<Q", len(b) * 4)   # header length past the end of the file
open(p, "wb").write(b)
PY
expect_error "header past end of file" "model-00001-of-00002.safetensors" "$EPIC" generate --model "$m" --prompt-ids 1

m="$tmp/noscale"; copy_model "$FX/tiny-fp8" "$m"
rename_tensor "$m" model.layers.0.self_attn.q_b_proj.weight_scale_inv model.layers.0.self_attn.q_b_proj.weight_scale_inX
expect_error "missing FP8 scale" "q_b_proj.weight_scale_inv" "$EPIC" generate --model "$m" --prompt-ids 1

# Dummy weights from a config alone, with the real 671B-style routing shrunk.
m="$tmp/dummy"; mkdir -p "$m"; cp "$FX/tiny-fp8/config.json" "$m/"
expect_ok "dummy weights" "$EPIC" generate --model "$m" --load-format dummy --prompt-ids 0,5,9 --max-new-tokens 4 --json
grep -q '"output_ids":\[[0-9]*,[0-9]*,[0-9]*,[0-9]*\]' "$tmp/out" && ok "dummy output" || bad "dummy output"

# A vocabulary padded past its tokenizer (DeepSeek-V3: 129280 rows, 128815 tokens): generated
# padding ids decode to no text instead of failing the request (random weights pick them).
m="$tmp/padded"; mkdir -p "$m"; cp "$FX/tiny-tokenizer"/tokenizer*.json "$m/"
python3 - "$FX/tiny-fp8/config.json" "$m/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1])); c["vocab_size"] = 4096; json.dump(c, open(sys.argv[2], "w"))
PY
expect_ok "padded vocabulary: generate" "$EPIC" generate --model "$m" --load-format dummy \
  --prompt "Hello" --max-new-tokens 16 --ignore-eos --json
python3 - "$tmp/out" <<'PY' && ok "padded vocabulary: ids past the tokenizer, text" ||
import json, sys
r = json.loads(open(sys.argv[1]).readline())
sys.exit(not (max(r["output_ids"]) >= 1280 and isinstance(r["text"], str)))
PY
  bad "padded vocabulary: output $(head -c 300 "$tmp/out")"
u='"method":"POST","url":"/v1/completions"'
printf '{"custom_id":"%s",%s,"body":{"prompt":"%s","max_tokens":16,"ignore_eos":true}}\n' \
  a "$u" Hello b "$u" world >"$tmp/pad.jsonl"
expect_ok "padded vocabulary: batch" "$EPIC" batch --model "$m" --load-format dummy --quiet \
  --input "$tmp/pad.jsonl" --output "$tmp/pad_out.jsonl"
[ "$(grep -c '"error":null' "$tmp/pad_out.jsonl")" = 2 ] &&
  ok "padded vocabulary: no error records" || bad "padded vocabulary: $(head -c 300 "$tmp/pad_out.jsonl")"

# Text in, text out.
expect_ok "text prompt" "$EPIC" generate --model "$FX/tiny-bf16" --prompt "Hello, world!" --max-new-tokens 8 --json
grep -q '"text":' "$tmp/out" && ok "json carries text" || bad "json carries text"
expect_ok "chat prompt streams" "$EPIC" generate --model "$FX/tiny-bf16" --prompt "Hi" --chat --system "Be brief" --max-new-tokens 8 --ignore-eos
[ -s "$tmp/out" ] && ok "streamed text" || bad "streamed text"

# Sampling with a seed is reproducible.
"$EPIC" generate --model "$FX/tiny-bf16" --prompt-ids 0,10,20 --temperature 0.8 --top-p 0.9 --seed 5 --json --max-new-tokens 8 >"$tmp/s1" 2>/dev/null
"$EPIC" generate --model "$FX/tiny-bf16" --prompt-ids 0,10,20 --temperature 0.8 --top-p 0.9 --seed 5 --json --max-new-tokens 8 >"$tmp/s2" 2>/dev/null
if [ -s "$tmp/s1" ] && [ "$(grep -o '"output_ids":[^]]*' "$tmp/s1")" = "$(grep -o '"output_ids":[^]]*' "$tmp/s2")" ]; then
  ok "seeded sampling reproducible"
else
  bad "seeded sampling reproducible"
fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
