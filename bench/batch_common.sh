# Shared by the `epic batch` benchmarks (bench_mtp_gain.sh, bench_sampling.sh): sourced,
# with EPIC (the binary), tmp (a scratch folder) and SCRIPT (the caller's name, for
# messages) set.

# bench_model CONFIG_DIR TOKENIZER_DIR: $tmp/model, the config beside the tokenizer (for
# --load-format dummy / dummy-mtp).
bench_model() {
  mkdir "$tmp/model" && cp "$1/config.json" "$tmp/model/" &&
    cp "$2/tokenizer.json" "$2/tokenizer_config.json" "$tmp/model/"
}

# bench_requests CONFIG_DIR N MAX_TOKENS PROMPT_LEN [greedy|sampled]: N /v1/completions
# lines on stdout, token-id prompts different per request (ids past the specials),
# ignore_eos; greedy, or sampled with temperature 0.6, top_p 0.95 and the request's index
# as its seed (DeepSeek-R1's advice).
bench_requests() {
  python3 - "$1/config.json" "$2" "$3" "$4" "${5:-greedy}" <<'PY'
import json, sys
vocab = json.load(open(sys.argv[1]))["vocab_size"]
n, max_tokens, plen = (int(a) for a in sys.argv[2:5])
for i in range(n):
    body = {"prompt": [(7919 * (i + 1) + 104729 * j) % (vocab - 16) + 16 for j in range(plen)],
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    if sys.argv[5] == "sampled":
        body.update(temperature=0.6, top_p=0.95, seed=i)
    print(json.dumps({"custom_id": "r%d" % i, "method": "POST", "url": "/v1/completions",
                      "body": body}))
PY
}

# bench_batch NAME INPUT [epic batch FLAGS...]: `epic batch` on $tmp/model, records to
# $tmp/NAME.jsonl and stats to $tmp/NAME.json; ends the script when the run fails or
# writes error records (a request the engine refused or failed would make the numbers
# meaningless).
bench_batch() {
  local name="$1" input="$2"
  shift 2
  "$EPIC" batch --model "$tmp/model" --quiet --input "$input" --output "$tmp/$name.jsonl" \
    --stats-json "$tmp/$name.json" "$@" 2>"$tmp/$name.err" || {
    echo "$SCRIPT: $name failed:" >&2
    tail -n 5 "$tmp/$name.err" >&2
    exit 1
  }
  python3 - "$tmp/$name.jsonl" "$name" "$SCRIPT" <<'PY' || exit 1
import json, sys
bad = [r for r in map(json.loads, open(sys.argv[1])) if r.get("error")]
if bad:
    sys.exit("%s: %s: %d error records, first: %s"
             % (sys.argv[3], sys.argv[2], len(bad), json.dumps(bad[0]["error"])))
PY
}
